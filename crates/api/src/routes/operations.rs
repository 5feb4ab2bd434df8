//! `GET /v1/operations[/{id}]`, `POST /v1/operations/{id}/cancel`: every kind of long
//! work (migrations, drains, NS jobs) listed, followed and cancelled one way; the view is
//! built in `control::operations`.

use axum::extract::State;
use axum::Json;
use model::api::{Operation, Problem};
use model::Role;

use crate::extract::AppPath;
use crate::{ApiError, AppState, Caller};

/// The caller's operations, newest first (an admin: every tenant's, and the drains).
#[utoipa::path(get, path = "/v1/operations", operation_id = "list_operations", tag = "operations",
    responses((status = 200, body = Vec<Operation>)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Operation>>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "listing operations")?;
    Ok(Json(state.control().operations(caller.scope()?).await?))
}

/// One operation: kind, target, step, progress, start and end, error.
#[utoipa::path(get, path = "/v1/operations/{id}", operation_id = "get_operation", tag = "operations",
    params(("id" = String, Path, description = "operation id (the id of its migration, drain session or NS instance)")),
    responses((status = 200, body = Operation), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<Json<Operation>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "reading an operation")?;
    Ok(Json(state.control().operation(caller.scope()?, &id).await?))
}

/// Cancels a running operation. A drain stops (the VM in flight finishes its move, the
/// host is uncordoned); migrations and NS jobs finish on their own (409 says why).
#[utoipa::path(post, path = "/v1/operations/{id}/cancel", operation_id = "cancel_operation", tag = "operations",
    params(("id" = String, Path, description = "operation id")),
    responses(
        (status = 200, body = Operation),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "finished, or a kind that finishes on its own", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<Json<Operation>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "cancelling an operation")?;
    Ok(Json(
        state
            .control()
            .cancel_operation(caller.scope()?, &id)
            .await?,
    ))
}
