//! Operations: every long job (migrations, drains, NS jobs) with its step and progress.

use api::{ApiError, AppState};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use model::api::Operation;
use model::Role;

use crate::layout::{self, badge, wire};
use crate::session::Session;

async fn list(state: &AppState, s: &Session) -> Result<Vec<Operation>, ApiError> {
    s.caller
        .require(&[Role::Admin, Role::Member], "listing operations")?;
    Ok(state.control().operations(s.caller.scope()?).await?)
}

fn table(ops: &[Operation]) -> Markup {
    html! {
        table #operations-table {
            caption { "Operations (" (ops.len()) "), newest first, updated every second" }
            thead { tr {
                th scope="col" { "Kind" } th scope="col" { "Target" } th scope="col" { "State" }
                th scope="col" { "Step" } th scope="col" { "Progress" }
                th scope="col" { "Started" } th scope="col" { "Finished" }
            } }
            tbody {
                @for o in ops {
                    tr data-operation=(o.id) {
                        th scope="row" { (wire(&o.kind)) }
                        td { (o.target) }
                        td.state { (badge(&wire(&o.state))) @if let Some(e) = &o.error { br; span.error { (e) } } }
                        td { (o.step) }
                        td {
                            @if o.total > 0 {
                                progress max=(o.total) value=(o.done) aria-label={ "progress of " (o.target) } {}
                                " " (o.done) " / " (o.total)
                            } @else { "—" }
                        }
                        td { (layout::clock(o.started_at)) }
                        td { @match o.finished_at { Some(f) => (layout::clock(f)), None => "—" } }
                    }
                }
            }
        }
    }
}

/// `GET /ui/operations`.
pub(crate) async fn page(State(state): State<AppState>, s: Session) -> Response {
    match list(&state, &s).await {
        Ok(ops) => {
            let body = layout::live(
                "operations-live",
                "/ui/operations/live",
                "operations",
                table(&ops),
            );
            layout::page(&s, "/ui/operations", "Operations", None, body).into_response()
        }
        Err(e) => layout::error_page(&e),
    }
}

/// `GET /ui/operations/live`.
pub(crate) async fn live(State(state): State<AppState>, s: Session) -> Response {
    match list(&state, &s).await {
        Ok(ops) => table(&ops).into_response(),
        Err(e) => layout::error_page(&e),
    }
}
