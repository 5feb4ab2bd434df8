//! V2X: the MEC services this server was told of (`vinfra server --mec NAME=URL`), each
//! with its subscribed devices, authorized links and PC5 gate, read live from the MEC's
//! operator API (`GET /v2x/v1/status`, one call a second while the page is open).
//!
//! The control plane keeps no V2X state: a MEC is its own service with its own operator
//! token. The page asks for that token once and keeps it in an HttpOnly, SameSite=Strict
//! cookie of this browser (`vinfra_mec_<name>`, Path=/ui/v2x), cleared by "Forget" and by
//! logging out. The server sends it to that MEC only, and fetches only the MECs named at
//! its start, never a URL typed in a page. Tenancy: what a MEC shows belongs to its
//! operator, so a session sees it only with that operator's token; without one the page
//! shows the MEC's name and URL and nothing else.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use api::{ApiError, AppState, MecEndpoint};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use v2x::types::MecStatus;

use crate::layout::{self, badge, field, form_error, Change, FormError};
use crate::session::{cookie, over_tls, Session};
use crate::{done, val};

/// The MEC token cookie of MEC `name`.
fn cookie_name(name: &str) -> String {
    format!("vinfra_mec_{}", name.replace('-', "_"))
}

/// `Set-Cookie` values that clear every MEC's token cookie (at logout).
pub(crate) fn clear_cookies(state: &AppState) -> Vec<HeaderValue> {
    state
        .mecs()
        .iter()
        .filter_map(|m| {
            HeaderValue::from_str(&format!(
                "{}=; Path=/ui/v2x; HttpOnly; SameSite=Strict; Max-Age=0",
                cookie_name(&m.name)
            ))
            .ok()
        })
        .collect()
}

fn find<'a>(state: &'a AppState, name: &str) -> Result<&'a MecEndpoint, ApiError> {
    state
        .mecs()
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| ApiError::NotFound {
            kind: "MEC",
            id: name.to_owned(),
        })
}

/// One client for every MEC call: short timeouts, so a dead MEC costs its own region a
/// few seconds and nothing else.
fn http() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap_or_default()
    })
}

/// The MEC's status with `token`; its refusal and its absence as the errors a page shows.
async fn fetch(mec: &MecEndpoint, token: &str) -> Result<MecStatus, ApiError> {
    let unreachable = |e: &dyn std::fmt::Display| {
        ApiError::Unavailable(format!(
            "MEC {} at {} did not answer: {e}",
            mec.name, mec.url
        ))
    };
    let res = http()
        .get(format!("{}/v2x/v1/status", mec.url))
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| unreachable(&e))?;
    match res.status().as_u16() {
        200 => res.json::<MecStatus>().await.map_err(|e| {
            ApiError::Unavailable(format!(
                "MEC {} answered something that is not its status: {e}",
                mec.name
            ))
        }),
        401 | 403 => Err(ApiError::Unprocessable(format!(
            "token: MEC {} refused this operator token",
            mec.name
        ))),
        s => Err(unreachable(&format!("HTTP {s}"))),
    }
}

fn status_tables(mec: &MecEndpoint, st: &MecStatus) -> Markup {
    let plmn = |p: &v2x::types::Plmn| format!("{}-{}", p.mcc, p.mnc);
    html! {
        p { "Operator " strong { (plmn(&st.operator)) } ": " (st.devices.len()) " devices, "
            (st.links.len()) " links." }
        table data-mec=(mec.name) .v2x-devices {
            caption { "Devices" }
            thead { tr {
                th scope="col" { "Device" } th scope="col" { "Services" }
                th scope="col" { "May talk to" } th scope="col" { "Subscription" }
                th scope="col" { "PC5 address" } th scope="col" { "Parameters" }
            } }
            tbody {
                @for d in &st.devices {
                    tr data-device=(d.device_id) {
                        th scope="row" { (d.device_id) }
                        td { (d.subscription.services.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")) }
                        td { (d.subscription.plmns.iter().map(plmn).collect::<Vec<_>>().join(", ")) }
                        td { @match &d.roaming_from {
                            Some(h) => { "roaming from " (plmn(h)) }
                            None => { "home" }
                        } }
                        td { (d.pc5_address.map(|a| a.to_string()).unwrap_or_else(|| "-".to_owned())) }
                        td.auth { @match d.expires_in_s {
                            Some(0) => (badge("expired")),
                            Some(s) => { (badge("authorized")) " " (s) " s left" }
                            None => (badge("not authorized")),
                        } }
                    }
                }
            }
        }
        table data-mec=(mec.name) .v2x-links {
            caption { "Links" }
            thead { tr {
                th scope="col" { "Link" } th scope="col" { "Device" } th scope="col" { "From" }
                th scope="col" { "To" } th scope="col" { "Peer operator" } th scope="col" { "Service" }
            } }
            tbody {
                @for l in &st.links {
                    tr data-link=(l.id) {
                        th scope="row" { (l.id) }
                        td { (l.device_id) } td { (l.address) } td { (l.peer_address) }
                        td { (plmn(&l.peer_plmn)) } td { (l.v2x_service_id) }
                    }
                }
            }
        }
        @match &st.gate {
            Some(g) => {
                table data-mec=(mec.name) .v2x-gate {
                    caption { "PC5 gate: " (g.dropped_packets) " packets dropped on closed paths" }
                    thead { tr { th scope="col" { "From" } th scope="col" { "To" } th scope="col" { "Packets through" } } }
                    tbody {
                        @for p in &g.open {
                            tr { th scope="row" { (p.src) } td { (p.dst) } td { (p.packets) } }
                        }
                    }
                }
            }
            None => p { "This MEC runs no PC5 gate." },
        }
    }
}

/// One MEC's section: its live status with the token this browser holds, or the form
/// asking for one.
fn section(
    s: &Session,
    mec: &MecEndpoint,
    has_token: bool,
    status: Option<Result<MecStatus, ApiError>>,
    err: Option<&FormError>,
) -> Markup {
    let form = format!("mec-{}", mec.name);
    let live = format!("/ui/v2x/{}/live", mec.name);
    html! {
        section aria-labelledby={ "h-" (form) } data-mec=(mec.name) {
            h2 id={ "h-" (form) } { "MEC " (mec.name) " " small { (mec.url) } }
            @if let (true, Some(st)) = (has_token, status) {
                (layout::live(&format!("{form}-live"), &live, &format!("MEC {}", mec.name),
                    match st { Ok(st) => status_tables(mec, &st), Err(e) => html! { p.error role="alert" { (e.problem().detail) } } }))
                form.inline method="post" action={ "/ui/v2x/" (mec.name) "/forget" } {
                    (layout::csrf(s))
                    button type="submit" { "Forget this MEC's token" }
                }
            } @else {
                form.card id=(form) method="post" action={ "/ui/v2x/" (mec.name) "/token" } {
                    (layout::csrf(s))
                    (form_error(err, "token"))
                    @let id = format!("token-{}", mec.name);
                    (field(err.filter(|e| e.form == "token"), &id, "Operator token of this MEC", html! {
                        input id=(id) type="password" name="token" required autocomplete="off"
                            aria-describedby={ (id) "-error" };
                    }))
                    div.actions { button type="submit" { "Show this MEC" } }
                }
            }
        }
    }
}

async fn render(
    state: &AppState,
    s: &Session,
    headers: &HeaderMap,
    flash: Option<&str>,
    err: Option<(&str, &FormError)>,
) -> Markup {
    let mut sections = Vec::new();
    for mec in state.mecs() {
        let token = cookie(headers, &cookie_name(&mec.name));
        let status = match token {
            Some(t) => Some(fetch(mec, t).await),
            None => None,
        };
        let e = err.filter(|(n, _)| *n == mec.name).map(|(_, e)| e);
        sections.push(section(s, mec, token.is_some(), status, e));
    }
    let body = html! {
        p { "Each MEC service (" code { "vinfra mec serve" } ") keeps its own V2X state: the devices its operator subscribed, their configuration parameters, the PC5 links it authorized and its gate. Give a MEC's operator token to see it; the token stays in an HttpOnly cookie of this browser." }
        @if state.mecs().is_empty() {
            p #no-mecs { "This server was started without MEC services: add " code { "--mec NAME=URL" } " to " code { "vinfra server" } "." }
        }
        @for sec in &sections { (sec) }
    };
    layout::page(s, "/ui/v2x", "V2X", flash, body)
}

/// `GET /ui/v2x`.
pub(crate) async fn page(
    State(state): State<AppState>,
    s: Session,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    render(
        &state,
        &s,
        &headers,
        q.get("done").map(String::as_str),
        None,
    )
    .await
    .into_response()
}

/// `GET /ui/v2x/{mec}/live`.
pub(crate) async fn live(
    State(state): State<AppState>,
    _s: Session,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let r = async {
        let mec = find(&state, &name)?;
        let token = cookie(&headers, &cookie_name(&mec.name)).ok_or_else(|| {
            ApiError::Unprocessable(format!("no operator token for MEC {name}: reload the page"))
        })?;
        Ok::<_, ApiError>(status_tables(mec, &fetch(mec, token).await?))
    }
    .await;
    match r {
        Ok(m) => m.into_response(),
        // The region shows why, and keeps polling (a MEC restarting comes back).
        Err(e) => html! { p.error role="alert" { (e.problem().detail) } }.into_response(),
    }
}

/// Whether `t` can travel in a cookie as it is (RFC 6265 cookie-octets).
fn cookie_safe(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 512
        && t.bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && !matches!(b, b'"' | b',' | b';' | b'\\'))
}

/// `POST /ui/v2x/{mec}/token`: checks the token against the MEC, then keeps it.
pub(crate) async fn token(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    ext: axum::http::Extensions,
    Change { s, form }: Change,
) -> Response {
    let r = async {
        let mec = find(&state, &name)?;
        let t = val(&form, "token").trim();
        if !cookie_safe(t) {
            return Err(ApiError::Unprocessable(
                "token: 1-512 printable characters without spaces, quotes, commas, semicolons or backslashes".to_owned(),
            ));
        }
        fetch(mec, t).await?;
        let secure = if over_tls(&ext) { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{}={t}; Path=/ui/v2x; HttpOnly; SameSite=Strict{secure}",
            cookie_name(&mec.name)
        ))
        .map_err(|e| ApiError::internal("building the MEC token cookie", e))
    }
    .await;
    match r {
        Ok(c) => {
            let mut res = done("/ui/v2x", &format!("showing MEC {name}"));
            res.headers_mut().append(header::SET_COOKIE, c);
            res
        }
        Err(e) => {
            // The token's own field is named `token-<mec>` on the page.
            let mut fe = FormError::from_api("token", &e, &["token"]);
            if fe.field.is_some() {
                fe.field = Some(format!("token-{name}"));
            }
            let status = if e.status().0.is_server_error() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                e.status().0
            };
            (
                status,
                render(&state, &s, &headers, None, Some((&name, &fe))).await,
            )
                .into_response()
        }
    }
}

/// `POST /ui/v2x/{mec}/forget`: drops this browser's token of the MEC.
pub(crate) async fn forget(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Change { s: _, form: _ }: Change,
) -> Response {
    match find(&state, &name) {
        Ok(mec) => {
            let mut res = done("/ui/v2x", &format!("token of MEC {name} forgotten"));
            if let Ok(v) = HeaderValue::from_str(&format!(
                "{}=; Path=/ui/v2x; HttpOnly; SameSite=Strict; Max-Age=0",
                cookie_name(&mec.name)
            )) {
                res.headers_mut().append(header::SET_COOKIE, v);
            }
            res
        }
        Err(e) => layout::error_page(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cookie_octets_travel() {
        assert!(cookie_safe("op-token"));
        assert!(cookie_safe("a.b_c~d+e/f=="));
        for bad in ["", "a b", "a;b", "a,b", "a\"b", "a\\b", "é", "a\u{7f}"] {
            assert!(!cookie_safe(bad), "{bad:?}");
        }
        assert!(!cookie_safe(&"x".repeat(513)));
        assert_eq!(cookie_name("op-a"), "vinfra_mec_op_a");
    }
}
