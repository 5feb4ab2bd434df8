//! The page shell, navigation, form fields with their errors, and error pages.

use api::{ApiError, AppState};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup, PreEscaped, DOCTYPE};

use crate::session::{check_origin, Session, CSRF_FIELD};
use crate::{Fields, Posted};

/// A change posted from one of the dashboard's forms, checked before the handler runs:
/// a session, the request's `Origin` this server (when the browser sends one), the
/// form's CSRF token, and a token that may change things. A failed check is an error
/// page naming it (403): the post did not come from this session's page, or the token
/// is read-only (the API's refusal). Every POST handler but login and logout takes one
/// (a form of at most `LIMIT` bytes).
#[derive(Debug)]
pub(crate) struct Change<const LIMIT: usize = 65_536> {
    /// Who posted.
    pub s: Session,
    /// The form's fields.
    pub form: Fields,
}

impl<const LIMIT: usize> FromRequest<AppState> for Change<LIMIT> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let s = Session::from_request_parts(&mut parts, state).await?;
        check_origin(&parts.headers).map_err(|e| error_page(&e))?;
        let Posted(form) =
            Posted::<LIMIT>::from_request(Request::from_parts(parts, body), state).await?;
        s.check_post(state, &form)
            .await
            .map_err(|e| error_page(&e))?;
        Ok(Change { s, form })
    }
}

/// A live region's fragment, or the error page.
pub(crate) fn fragment(r: Result<Markup, ApiError>) -> Response {
    match r {
        Ok(m) => m.into_response(),
        Err(e) => error_page(&e),
    }
}

/// The pages in the navigation: (path, title).
pub(crate) const NAV: [(&str, &str); 11] = [
    ("/ui/hosts", "Hosts"),
    ("/ui/vms", "VMs"),
    ("/ui/networks", "Networks"),
    ("/ui/migrations", "Migrations"),
    ("/ui/operations", "Operations"),
    ("/ui/ns", "Network services"),
    ("/ui/traffic", "Traffic"),
    ("/ui/slices", "Slices"),
    ("/ui/terminals", "Terminals"),
    ("/ui/v2x", "V2X"),
    ("/ui/resource-tables", "Resource tables"),
];

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            // htmx must not inject a <style> element (the CSP allows none).
            meta name="htmx-config" content=r#"{"includeIndicatorStyles":false}"#;
            title { (title) " · vinfra" }
            link rel="stylesheet" href="/ui/assets/app.css";
            link rel="stylesheet" href="/ui/assets/uPlot.min.css";
            script src="/ui/assets/htmx.min.js" defer {}
            script src="/ui/assets/uPlot.iife.min.js" defer {}
            script src="/ui/assets/app.js" defer {}
        }
    }
}

/// A page without navigation (the login page).
pub(crate) fn bare_page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header.top { span.brand { "vinfra" } }
                main #main { h1 { (title) } (body) }
            }
        }
    }
}

/// A page of the dashboard: navigation, who is logged in, a flash message, `body`.
pub(crate) fn page(
    s: &Session,
    current: &str,
    title: &str,
    flash: Option<&str>,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    span.brand { "vinfra" }
                    nav aria-label="Main" {
                        ul {
                            @for (path, name) in NAV {
                                li {
                                    @if path == current {
                                        a href=(path) aria-current="page" { (name) }
                                    } @else {
                                        a href=(path) { (name) }
                                    }
                                }
                            }
                        }
                    }
                    div.who {
                        span #who { (s.who()) }
                        form method="post" action="/ui/logout" {
                            (csrf(s))
                            button.link type="submit" { "Log out" }
                        }
                    }
                }
                main #main {
                    h1 { (title) }
                    @if let Some(f) = flash {
                        p.flash role="status" { (f) }
                    }
                    (body)
                }
            }
        }
    }
}

/// The hidden CSRF field of a form.
pub(crate) fn csrf(s: &Session) -> Markup {
    html! { input type="hidden" name=(CSRF_FIELD) value=(s.csrf()); }
}

/// An API error shown in a form: beside the field it names, or at the top of the form.
#[derive(Debug, Clone)]
pub(crate) struct FormError {
    /// Which form (several on a page).
    pub form: &'static str,
    /// The field the message names, when it is one of the form's.
    pub field: Option<String>,
    pub message: String,
}

impl FormError {
    /// The API's message for `e`; beside `field` when the message starts with `field:`
    /// and the form has that field (the API's validation messages name the field first).
    pub fn from_api(form: &'static str, e: &ApiError, fields: &[&str]) -> Self {
        if e.status().0.is_server_error() {
            // The page says "internal error", as the API does; the chain goes to the log.
            tracing::error!(error = %model::error_chain(e), form, "dashboard change failed");
        }
        let message = e.problem().detail;
        // `nics[0].network: …` belongs beside `nics`.
        let field = message
            .split_once(':')
            .map(|(f, _)| f.trim())
            .map(|f| f.split(['[', '.']).next().unwrap_or(f))
            .filter(|f| fields.contains(f))
            .map(str::to_owned);
        FormError {
            form,
            field,
            message,
        }
    }

    fn at(&self, form: &str, field: Option<&str>) -> Option<&str> {
        (self.form == form && self.field.as_deref() == field).then_some(self.message.as_str())
    }
}

/// The form-wide error (one that names none of the form's fields).
pub(crate) fn form_error(err: Option<&FormError>, form: &str) -> Markup {
    let msg = err.and_then(|e| e.at(form, None));
    html! {
        @if let Some(m) = msg {
            p.error role="alert" id={ (form) "-error" } { (m) }
        }
    }
}

/// A labelled field; `input` must have id `name` and `aria-describedby="{name}-error"`.
/// The error, when it names this field, is shown beside it.
pub(crate) fn field(err: Option<&FormError>, name: &str, label: &str, input: Markup) -> Markup {
    let msg = err.and_then(|e| (e.field.as_deref() == Some(name)).then_some(e.message.as_str()));
    html! {
        div.field.invalid[msg.is_some()] {
            label for=(name) { (label) }
            (input)
            @if let Some(m) = msg {
                span.error role="alert" id={ (name) "-error" } { (m) }
            }
        }
    }
}

/// An error page in the shell (for errors outside a form: a missing object, a store
/// failure); a 5xx is logged with its chain and shown as "internal error".
pub(crate) fn error_page(e: &ApiError) -> Response {
    let p = e.problem();
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() {
        tracing::error!(error = %model::error_chain(e), "dashboard request failed");
    }
    let body = html! {
        p.error role="alert" { (p.detail) }
        p { a href="/ui/hosts" { "Back to the dashboard" } }
    };
    (status, bare_page(&p.title, body)).into_response()
}

/// A live region: its content is fetched from `src` every second and replaced.
pub(crate) fn live(id: &str, src: &str, label: &str, content: Markup) -> Markup {
    html! {
        div.live id=(id) hx-get=(src) hx-trigger="every 1s" hx-swap="innerHTML"
            aria-label=(label) {
            (content)
        }
    }
}

/// The wire name of a serde enum (`in_maintenance`), for display.
pub(crate) fn wire<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".to_owned(),
    }
}

/// A unix-ms time as `HH:MM:SS` UTC (the dashboard's times are all recent).
pub(crate) fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

/// Bytes for people.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A state as a badge (its class colours it).
pub(crate) fn badge(state: &str) -> Markup {
    html! { span class={ "badge s-" (state) } { (state) } }
}

/// Raw markup (vendored assets are served, never inlined; this is for `&nbsp;`-like
/// constants only).
#[allow(dead_code)]
pub(crate) fn raw(s: &'static str) -> PreEscaped<&'static str> {
    PreEscaped(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_messages_go_beside_the_field_they_name() {
        let fields = ["name", "nics"];
        let at = |m: &str| {
            FormError::from_api("f", &ApiError::Unprocessable(m.to_owned()), &fields).field
        };
        assert_eq!(at("name: must be lowercase").as_deref(), Some("name"));
        assert_eq!(
            at("nics[0].network: no network named x").as_deref(),
            Some("nics")
        );
        assert_eq!(at("vm web-1 not found"), None);
        assert_eq!(
            at("image: no image named x"),
            None,
            "not a field of this form"
        );
        let e = FormError::from_api("f", &ApiError::invariant("boom"), &fields);
        assert_eq!(e.message, "internal error", "a 5xx shows no detail");
    }
}
