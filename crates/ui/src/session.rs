//! Logging in and out, the session cookie, and CSRF checks.
//!
//! The cookie carries the API token itself (HttpOnly, SameSite=Strict, Path=/ui, Secure
//! over TLS): the server keeps no session, so a restart logs nobody out, and a token
//! revoked or expired ends its sessions at once (every request reads the token's record,
//! as the API does). Every change is a POST carrying a CSRF token derived from the
//! session's API token (`sha256("vinfra-ui-csrf\0" ‖ token)`): a page of another site
//! cannot read it, it survives restarts like the session, and it is checked on every
//! POST beside SameSite=Strict and an Origin check.

use std::collections::HashMap;

use api::{ApiError, AppState, Caller};
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use model::Role;
use sha2::{Digest, Sha256};

use crate::layout::{self, FormError};
use crate::Posted;

/// The session cookie's name.
pub(crate) const COOKIE: &str = "vinfra_ui";
/// The hidden form field carrying the CSRF token.
pub(crate) const CSRF_FIELD: &str = "_csrf";

/// A logged-in user: the token from the cookie, checked against the store.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub token: String,
    pub caller: Caller,
}

impl Session {
    /// The CSRF token of this session.
    pub fn csrf(&self) -> String {
        csrf_for(&self.token)
    }

    pub fn is_admin(&self) -> bool {
        self.caller.role == Role::Admin
    }

    /// Who is logged in, for the header.
    pub fn who(&self) -> String {
        match (self.caller.role, self.caller.tenant) {
            (Role::Admin, _) => "admin".to_owned(),
            (_, Some(t)) => format!("member of tenant {t}"),
            (r, None) => r.as_str().to_owned(),
        }
    }

    /// Checks a POST: its CSRF field, and that the token may change things (a read-only
    /// token gets the API's refusal). The error is shown on the page.
    pub async fn check_post(
        &self,
        state: &AppState,
        form: &HashMap<String, String>,
    ) -> Result<(), ApiError> {
        let sent = form.get(CSRF_FIELD).map(String::as_str).unwrap_or("");
        if !same(sent.as_bytes(), self.csrf().as_bytes()) {
            return Err(ApiError::Forbidden(
                "the form's CSRF token is missing or wrong: reload the page".to_owned(),
            ));
        }
        api::authenticate(state, &self.token, &Method::POST).await?;
        Ok(())
    }
}

/// `sha256("vinfra-ui-csrf\0" ‖ token)`, hex, first 32 digits.
pub(crate) fn csrf_for(token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"vinfra-ui-csrf\0");
    h.update(token.as_bytes());
    let mut s = model::hex(&h.finalize());
    s.truncate(32);
    s
}

/// Compares without stopping at the first difference (the CSRF token is a secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Where an unauthenticated request goes: the login page (htmx requests get the
/// redirect as a header, which htmx follows for the whole page).
fn to_login(parts: &Parts) -> Response {
    if parts.headers.contains_key("hx-request") {
        (StatusCode::UNAUTHORIZED, [("hx-redirect", "/ui/login")]).into_response()
    } else {
        Redirect::to("/ui/login").into_response()
    }
}

impl FromRequestParts<AppState> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let Some(token) = cookie(&parts.headers, COOKIE).map(str::to_owned) else {
            return Err(to_login(parts));
        };
        // Read access is what a page needs; a POST checks write access itself, so that a
        // read-only token still sees the pages and gets the API's refusal on a change
        // (`layout::Change`).
        match api::authenticate(state, &token, &Method::GET).await {
            Ok(caller) if caller.role != Role::Agent => Ok(Session { token, caller }),
            Ok(_) | Err(ApiError::Unauthorized | ApiError::TokenExpired) => Err(to_login(parts)),
            Err(e) => Err(layout::error_page(&e)),
        }
    }
}

/// Whether the request came over TLS (then the cookie is `Secure`).
pub(crate) fn over_tls(parts_ext: &axum::http::Extensions) -> bool {
    parts_ext
        .get::<ConnectInfo<api::Peer>>()
        .is_some_and(|p| p.0.tls)
}

/// Refuses a POST whose `Origin` (when the browser sends one) is not this server:
/// a second line behind SameSite=Strict and the CSRF token.
pub(crate) fn check_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or("");
    if !host.is_empty() && origin_host == host {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "a form posted from {origin} is not accepted here"
        )))
    }
}

/// `GET /ui/login`.
pub(crate) async fn login_page() -> Response {
    login_form(None, StatusCode::OK)
}

fn login_form(err: Option<&FormError>, status: StatusCode) -> Response {
    let body = html! {
        p { "Log in with an API token (" code { "vinfra token create" } ", or the admin token in "
            code { ".vinfra/admin-token" } "). The token stays in an HttpOnly cookie of this browser." }
        form.card method="post" action="/ui/login" {
            (layout::form_error(err, "login"))
            (layout::field(err, "token", "API token", html! {
                input #token type="password" name="token" autocomplete="current-password"
                    required autofocus aria-describedby="token-error";
            }))
            button type="submit" { "Log in" }
        }
    };
    (status, layout::bare_page("Log in", body)).into_response()
}

/// `POST /ui/login`.
pub(crate) async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    req_ext: axum::extract::Request,
) -> Response {
    let tls = over_tls(req_ext.extensions());
    let form =
        <Posted as axum::extract::FromRequest<AppState>>::from_request(req_ext, &state).await;
    let fail = |e: ApiError| {
        let fe = FormError::from_api("login", &e, &["token"]);
        let status = e.status().0;
        login_form(Some(&fe), status)
    };
    if let Err(e) = check_origin(&headers) {
        return fail(e);
    }
    let token = match &form {
        Ok(Posted(f)) => f
            .get("token")
            .map(|t| t.trim().to_owned())
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    // The cookie carries the token verbatim: only a token's own alphabet may go there.
    if token.is_empty()
        || token.len() > 256
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return fail(ApiError::Unprocessable(
            "token: paste a vinfra API token (vinfra_ and 64 hex digits)".to_owned(),
        ));
    }
    match api::authenticate(&state, &token, &Method::GET).await {
        Ok(c) if c.role == Role::Agent => fail(ApiError::Forbidden(
            "token: an agent token cannot log in to the dashboard".to_owned(),
        )),
        Ok(c) => {
            // The cookie lives as long as the token (a session cookie when it never expires).
            let max_age = c
                .expires_at
                .map(|e| format!("; Max-Age={}", e.saturating_sub(control::now_ms()) / 1000))
                .unwrap_or_default();
            let secure = if tls { "; Secure" } else { "" };
            let value =
                format!("{COOKIE}={token}; Path=/ui; HttpOnly; SameSite=Strict{secure}{max_age}");
            let mut res = Redirect::to("/ui/hosts").into_response();
            match HeaderValue::from_str(&value) {
                Ok(v) => {
                    res.headers_mut().insert(header::SET_COOKIE, v);
                    res
                }
                Err(e) => layout::error_page(&ApiError::internal("building the session cookie", e)),
            }
        }
        Err(ApiError::Unauthorized) => fail(ApiError::Unprocessable(
            "token: unknown or revoked token".to_owned(),
        )),
        Err(ApiError::TokenExpired) => {
            fail(ApiError::Unprocessable("token: token expired".to_owned()))
        }
        Err(e) => fail(e),
    }
}

/// `POST /ui/logout`: forgets the cookie (the token itself stays valid: it is the
/// user's, revocable with `vinfra token revoke`).
pub(crate) async fn logout(
    State(state): State<AppState>,
    session: Session,
    headers: HeaderMap,
    Posted(form): Posted,
) -> Response {
    let sent = form.get(CSRF_FIELD).map(String::as_str).unwrap_or("");
    if check_origin(&headers).is_err() || !same(sent.as_bytes(), session.csrf().as_bytes()) {
        return layout::error_page(&ApiError::Forbidden(
            "the form's CSRF token is missing or wrong: reload the page".to_owned(),
        ));
    }
    let mut res = Redirect::to("/ui/login").into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("vinfra_ui=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    // The MEC operator tokens this browser gave the V2X page go with the session.
    for c in crate::v2x::clear_cookies(&state) {
        res.headers_mut().append(header::SET_COOKIE, c);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_and_csrf() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; vinfra_ui=vinfra_abc; b=2"),
        );
        assert_eq!(cookie(&h, COOKIE), Some("vinfra_abc"));
        assert_eq!(cookie(&h, "c"), None);
        assert_eq!(csrf_for("x").len(), 32);
        assert_ne!(csrf_for("x"), csrf_for("y"));
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }

    #[test]
    fn foreign_origins_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:7070"));
        assert!(check_origin(&h).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:7070"),
        );
        assert!(check_origin(&h).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(check_origin(&h).is_err());
    }
}
