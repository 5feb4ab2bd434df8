//! Operations: every long job (migrations, drains, NS jobs) with its step and progress.

use api::{ApiError, AppState};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use model::api::{Operation, OperationKind, OperationState};
use model::Role;

use crate::layout::{self, badge, form_error, wire, Change, FormError};
use crate::session::Session;
use crate::{done, Fields};

async fn list(state: &AppState, s: &Session) -> Result<Vec<Operation>, ApiError> {
    s.caller
        .require(&[Role::Admin, Role::Member], "listing operations")?;
    Ok(state.control().operations(s.caller.scope()?).await?)
}

fn table(s: &Session, ops: &[Operation]) -> Markup {
    html! {
        table #operations-table {
            caption { "Operations (" (ops.len()) "), newest first, updated every second" }
            thead { tr {
                th scope="col" { "Kind" } th scope="col" { "Target" } th scope="col" { "State" }
                th scope="col" { "Step" } th scope="col" { "Progress" }
                th scope="col" { "Started" } th scope="col" { "Finished" } th scope="col" { "Actions" }
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
                        td {
                            // Only a drain stops on request; the others finish on their own
                            // (the API says so when asked).
                            @if o.state == OperationState::Running && o.kind == OperationKind::Drain {
                                form.inline method="post" action={ "/ui/operations/" (o.id) "/cancel" } {
                                    (layout::csrf(s))
                                    button type="submit" aria-label={ "Cancel " (o.target) } { "Cancel" }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `GET /ui/operations`.
pub(crate) async fn page(
    State(state): State<AppState>,
    s: Session,
    Query(q): Query<Fields>,
) -> Response {
    render(&state, &s, q.get("done").map(String::as_str), None).await
}

async fn render(
    state: &AppState,
    s: &Session,
    flash: Option<&str>,
    err: Option<(&FormError, axum::http::StatusCode)>,
) -> Response {
    match list(state, s).await {
        Ok(ops) => {
            let body = html! {
                (form_error(err.map(|e| e.0), "cancel"))
                (layout::live("operations-live", "/ui/operations/live", "operations", table(s, &ops)))
            };
            let page = layout::page(s, "/ui/operations", "Operations", flash, body);
            match err {
                Some((_, status)) => (status, page).into_response(),
                None => page.into_response(),
            }
        }
        Err(e) => layout::error_page(&e),
    }
}

/// `POST /ui/operations/{id}/cancel`.
pub(crate) async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Change { s, .. }: Change,
) -> Response {
    let r: Result<Operation, ApiError> = async {
        s.caller
            .require(&[Role::Admin, Role::Member], "cancelling an operation")?;
        Ok(state
            .control()
            .cancel_operation(s.caller.scope()?, &id)
            .await?)
    }
    .await;
    match r {
        Ok(o) => done("/ui/operations", &format!("{} cancelled", o.target)),
        Err(e) => {
            let fe = FormError::from_api("cancel", &e, &[]);
            render(&state, &s, None, Some((&fe, e.status().0))).await
        }
    }
}

/// `GET /ui/operations/live`.
pub(crate) async fn live(State(state): State<AppState>, s: Session) -> Response {
    layout::fragment(list(&state, &s).await.map(|ops| table(&s, &ops)))
}
