//! Terminals: each terminal of the caller's scope with its binding, and the operations it
//! sent lately with their outcome; and a browser terminal. The browser terminal is the
//! page's script acting as the terminal: the user gives it the terminal's credentials
//! (the file `vinfra terminal create --credentials` wrote), the script signs each
//! operation message with the secret in the browser (WebCrypto HMAC-SHA256) and posts it
//! to `/v1/terminal-operations` like any terminal. The secret never reaches this server
//! (no form posts it; not in the cookie, not in a URL) and the server computes nothing
//! for the page: it checks the message as it checks every terminal's (docs/UI.md).

use api::{ApiError, AppState};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use model::terminals::{PerformedOperation, Terminal};
use model::Role;

use crate::layout::{self, badge, wire};
use crate::session::Session;

/// Operations shown per terminal (the most recent).
const RECENT: usize = 10;

async fn load(
    state: &AppState,
    s: &Session,
) -> Result<Vec<(Terminal, Vec<PerformedOperation>)>, ApiError> {
    s.caller
        .require(&[Role::Admin, Role::Member], "listing terminals")?;
    let c = state.control();
    let scope = s.caller.scope()?;
    let mut out = Vec::new();
    for t in c.list_terminals(scope).await? {
        let mut ops = c.terminal_operations(scope, &t.id.to_string()).await?;
        ops.sort_by_key(|o| std::cmp::Reverse(o.seq));
        ops.truncate(RECENT);
        out.push((t, ops));
    }
    Ok(out)
}

fn tables(ts: &[(Terminal, Vec<PerformedOperation>)]) -> Markup {
    html! {
        @if ts.is_empty() { p { "No terminals (" code { "vinfra terminal create NAME --credentials FILE" } ")." } }
        @for (t, ops) in ts {
            article.ns data-terminal=(t.name) aria-labelledby={ "term-" (t.name) } {
                h3 id={ "term-" (t.name) } { (t.name) " " span.muted { "(" (t.secret_prefix) "…)" } }
                p.binding {
                    @match &t.binding {
                        Some(b) => { "bound to " a href={ "/ui/vms/" (b.vm) } { (b.vm_name) } " (" (wire(&b.policy)) ", since " (layout::clock(b.bound_at)) " UTC)" }
                        None => "not bound",
                    }
                }
                @if !ops.is_empty() {
                    table {
                        caption { "Recent operations" }
                        thead { tr {
                            th scope="col" { "Seq" } th scope="col" { "Operation" } th scope="col" { "Host" }
                            th scope="col" { "Outcome" } th scope="col" { "Received" }
                        } }
                        tbody {
                            @for o in ops {
                                tr {
                                    th scope="row" { (o.seq) }
                                    td { (serde_json::to_string(&o.op).unwrap_or_default()) }
                                    td { (o.host) }
                                    td { (badge(&wire(&o.outcome))) @if let Some(d) = &o.detail { " " (d) } }
                                    td { (layout::clock(o.received)) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The browser terminal: credentials in, keys out (`app.js`, `terminal()`). Not a form:
/// nothing here is ever posted to the dashboard.
fn browser_terminal() -> Markup {
    html! {
        section #browser-terminal aria-labelledby="bt-title" {
            h2 #bt-title { "Browser terminal" }
            p #bt-help {
                "Act as a terminal from this page: give it the terminal's credentials (the file "
                code { "vinfra terminal create NAME --credentials FILE" } " wrote), then type in the box: "
                "each key becomes an operation message for the VM bound to that terminal. "
                "The page signs the messages in this browser; the secret is not sent to the server, "
                "not kept in a cookie or a URL, and forgotten when the page closes."
            }
            div.field {
                label for="bt-creds" { "Terminal credentials (JSON)" }
                textarea #bt-creds rows="3" autocomplete="off" spellcheck="false" aria-describedby="bt-help" {}
            }
            div.field {
                label for="bt-file" { "or read them from the file" }
                input #bt-file type="file" accept=".json,application/json";
            }
            button #bt-use type="button" { "Use these credentials" }
            p #bt-status role="status" aria-live="polite" { "No terminal yet." }
            div #bt-keys.keys tabindex="0" role="textbox" aria-multiline="true"
                aria-label="Keys typed here go to the bound VM" aria-describedby="bt-status" {
                "Focus here and type (Tab moves on)."
            }
            div #bt-pointer.pointer tabindex="0" role="application"
                aria-label="The VM's display: moving, clicking and scrolling here act on the bound VM's pointer" {
                "Pointer: move, click and scroll here."
            }
            div.actions role="group" aria-label="Power and display" {
                @for (action, label) in [("shutdown", "Shut down"), ("reset", "Reset"), ("pause", "Pause"), ("resume", "Resume"), ("on", "Power on")] {
                    button type="button" data-power=(action) { (label) }
                }
                button #bt-screenshot type="button" { "Screenshot" }
            }
            img #bt-shot hidden alt="";
            ol #bt-log aria-label="Operations sent from this page" {}
        }
    }
}

/// `GET /ui/terminals`.
pub(crate) async fn page(State(state): State<AppState>, s: Session) -> Response {
    match load(&state, &s).await {
        Ok(ts) => {
            let body = layout::live(
                "terminals-live",
                "/ui/terminals/live",
                "terminals",
                tables(&ts),
            );
            let body = html! { (browser_terminal()) (body) };
            layout::page(&s, "/ui/terminals", "Terminals", None, body).into_response()
        }
        Err(e) => layout::error_page(&e),
    }
}

/// `GET /ui/terminals/live`.
pub(crate) async fn live(State(state): State<AppState>, s: Session) -> Response {
    layout::fragment(load(&state, &s).await.map(|ts| tables(&ts)))
}
