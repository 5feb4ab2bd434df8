//! Live migrations over HTTP; the rules are in `control::migrations`. The source's
//! cache snapshot (heat map + access pattern + block list)
//! passes through server memory: it is needed once, by one agent, within seconds.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use model::api::{MigrateVm, MigrationReport, Problem};
use model::{Migration, Role};

use crate::extract::{read_body, AppPath};
use crate::{ApiError, AppJson, AppState, Caller, Scope};

/// Largest snapshot accepted: the heat map and pattern are bounded by the cache's
/// capacity (a few MiB for a 1 GiB cache of 64 KiB blocks).
pub(crate) const MAX_SNAPSHOT: usize = 64 << 20;

/// Starts a live migration of a running VM to another host (202). The VM's memory
/// moves with QEMU's migration; its disk cache is rebuilt on the destination from
/// the source host's cache in the order `strategy` plans.
#[utoipa::path(post, path = "/v1/vms/{id}/migrate", tag = "migrations", request_body = MigrateVm,
    params(("id" = String, Path, description = "vm id or name")),
    responses(
        (status = 202, body = Migration),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "not running, already migrating, or the destination cannot take it", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn migrate_vm(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
    AppJson(body): AppJson<MigrateVm>,
) -> Result<(StatusCode, Json<Migration>), ApiError> {
    caller.require(&[Role::Admin, Role::Member], "migrating a vm")?;
    let (to, strategy) = body.validate()?;
    let m = state
        .control()
        .start_migration(caller.scope()?, &id, &to, &strategy, body.precopy)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(m)))
}

/// The caller's migrations, newest first.
#[utoipa::path(get, path = "/v1/migrations", tag = "migrations",
    responses((status = 200, body = Vec<Migration>)))]
pub(crate) async fn list_migrations(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Migration>>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "listing migrations")?;
    Ok(Json(state.control().migrations(caller.scope()?).await?))
}

/// One migration.
#[utoipa::path(get, path = "/v1/migrations/{id}", tag = "migrations",
    params(("id" = String, Path, description = "migration id")),
    responses((status = 200, body = Migration), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get_migration(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<Json<Migration>, ApiError> {
    let scope = match caller.role {
        Role::Agent => Scope::All,
        _ => caller.scope()?,
    };
    let (m, _) = load(&state, scope, &id).await?;
    Ok(Json(m))
}

async fn load(
    state: &AppState,
    scope: Scope,
    id: &str,
) -> Result<(Migration, store::Revision), ApiError> {
    Ok(state.control().migration(scope, id).await?)
}

#[utoipa::path(put, path = "/v1/migrations/{id}/report", tag = "agent", request_body = MigrationReport,
    params(("id" = String, Path, description = "migration id")),
    responses(
        (status = 200, body = Migration),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "not a legal transition from this host", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn report_migration(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
    AppJson(body): AppJson<MigrationReport>,
) -> Result<Json<Migration>, ApiError> {
    caller.require(&[Role::Agent, Role::Admin], "reporting on a migration")?;
    let host = body.validate()?;
    let m = state.control().report_migration(&id, &host, &body).await?;
    state.record_progress(&m);
    if m.state.is_final() {
        state.forget_snapshot(m.id);
    }
    Ok(Json(m))
}

#[utoipa::path(put, path = "/v1/migrations/{id}/snapshot", tag = "agent",
    params(("id" = String, Path, description = "migration id")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204), (status = 404, body = Problem, content_type = "application/problem+json"), (status = 409, body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "over the snapshot limit (64 MiB)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "over the rate limit; see Retry-After", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn put_snapshot(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
    req: Request,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Role::Agent, Role::Admin], "uploading a cache snapshot")?;
    let (m, _) = load(&state, Scope::All, &id).await?;
    if m.state.is_final() {
        return Err(ApiError::Conflict(format!(
            "migration {} is {}",
            m.id,
            m.state.as_str()
        )));
    }
    // Read only once the caller and the migration are known good.
    let body = read_body(req, "snapshot", MAX_SNAPSHOT).await?;
    state.set_snapshot(m.id, body);
    Ok(StatusCode::NO_CONTENT)
}

/// The destination agent downloads the source's snapshot; 404 until uploaded.
#[utoipa::path(get, path = "/v1/migrations/{id}/snapshot", tag = "agent",
    params(("id" = String, Path, description = "migration id")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get_snapshot(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Agent, Role::Admin], "downloading a cache snapshot")?;
    let (m, _) = load(&state, Scope::All, &id).await?;
    match state.snapshot(m.id) {
        Some(b) => Ok(([(header::CONTENT_TYPE, "application/octet-stream")], b).into_response()),
        None => Err(ApiError::NotFound {
            kind: "snapshot of migration",
            id: m.id.to_string(),
        }),
    }
}
