//! Terminals (read-only): each terminal of the caller's scope with its binding, and the
//! operations it sent lately with their outcome. Sending operations from the browser is
//! not built: an operation message is signed with the terminal's secret, which the
//! dashboard does not hold (docs/UI.md).

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
            layout::page(&s, "/ui/terminals", "Terminals", None, body).into_response()
        }
        Err(e) => layout::error_page(&e),
    }
}

/// `GET /ui/terminals/live`.
pub(crate) async fn live(State(state): State<AppState>, s: Session) -> Response {
    match load(&state, &s).await {
        Ok(ts) => tables(&ts).into_response(),
        Err(e) => layout::error_page(&e),
    }
}
