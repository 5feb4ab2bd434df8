//! Host maintenance mode over HTTP; the plan, the drain and its session are in
//! `control::maintenance`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use model::api::{EnterMaintenance, Problem};
use model::{Maintenance, Role};

use crate::extract::AppPath;
use crate::routes::hosts::host_name;
use crate::{ApiError, AppJson, AppState, Caller};

/// Puts a host into maintenance: cordons it and drains it (202), or with `dry_run`
/// returns the plan without changing anything (200).
#[utoipa::path(post, path = "/v1/hosts/{name}/maintenance", operation_id = "enter_maintenance", tag = "maintenance", request_body = EnterMaintenance,
    params(("name" = String, Path, description = "host name")),
    responses(
        (status = 202, description = "draining", body = Maintenance),
        (status = 200, description = "dry run: the plan", body = Maintenance),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "a VM cannot be placed (named), or already in maintenance", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn enter(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(name): AppPath,
    AppJson(body): AppJson<EnterMaintenance>,
) -> Result<(StatusCode, Json<Maintenance>), ApiError> {
    caller.require(&[Role::Admin], "putting a host into maintenance")?;
    let name = host_name(&name)?;
    let (to, strategy) = body.validate()?;
    let session = state
        .control()
        .enter_maintenance(&name, to.as_ref(), &strategy, body.dry_run)
        .await?;
    let status = if body.dry_run {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(session)))
}

/// Every maintenance session, newest first.
#[utoipa::path(get, path = "/v1/maintenance", operation_id = "list_maintenance", tag = "maintenance",
    responses((status = 200, body = Vec<Maintenance>)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Maintenance>>, ApiError> {
    caller.require(&[Role::Admin], "listing maintenance sessions")?;
    Ok(Json(state.control().maintenance_sessions().await?))
}

/// One maintenance session.
#[utoipa::path(get, path = "/v1/maintenance/{id}", operation_id = "get_maintenance", tag = "maintenance",
    params(("id" = String, Path, description = "session id")),
    responses((status = 200, body = Maintenance), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<Json<Maintenance>, ApiError> {
    caller.require(&[Role::Admin], "reading a maintenance session")?;
    Ok(Json(state.control().maintenance_session(&id).await?.0))
}

/// Stops a drain: no further VM starts moving (one in flight finishes), the host is
/// uncordoned, and the session's items say what stays where.
#[utoipa::path(post, path = "/v1/maintenance/{id}/abort", operation_id = "abort_maintenance", tag = "maintenance",
    params(("id" = String, Path, description = "session id")),
    responses((status = 200, body = Maintenance), (status = 409, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn abort(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<Json<Maintenance>, ApiError> {
    caller.require(&[Role::Admin], "aborting a maintenance session")?;
    Ok(Json(state.control().abort_maintenance(&id).await?))
}

/// Releases a host from maintenance.
#[utoipa::path(post, path = "/v1/hosts/{name}/maintenance/exit", operation_id = "exit_maintenance", tag = "maintenance",
    params(("name" = String, Path, description = "host name")),
    responses((status = 200, body = Maintenance), (status = 409, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn exit(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(name): AppPath,
) -> Result<Json<Maintenance>, ApiError> {
    caller.require(&[Role::Admin], "releasing a host from maintenance")?;
    let name = host_name(&name)?;
    Ok(Json(state.control().exit_maintenance(&name).await?))
}
