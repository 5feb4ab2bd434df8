//! Live migrations over HTTP; the rules are in `control::migrations`. The source's
//! cache snapshot (heat map + access pattern + block list) is streamed into the store
//! and back out of it (`control::snapshots`), so that any server can serve it, after a
//! restart too, and none holds it whole.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use model::api::{MigrateVm, MigrationReport, Problem};
use model::{Migration, Role};

use crate::extract::AppPath;
use crate::{ApiError, AppJson, AppState, Caller, Scope};

use control::snapshots::MAX_SNAPSHOT;

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
    use futures_util::StreamExt;
    caller.require(&[Role::Agent, Role::Admin], "uploading a cache snapshot")?;
    let too_large = |size| ApiError::PayloadTooLarge {
        what: "snapshot",
        size,
        limit: MAX_SNAPSHOT,
    };
    // A declared length over the limit is refused before anything is read or written.
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_SNAPSHOT as u64) {
        return Err(too_large(declared));
    }
    // Begun only once the caller and the migration are known good.
    let mut upload = state.control().begin_snapshot(&id).await?;
    let mut body = req.into_body().into_data_stream();
    while let Some(frame) = body.next().await {
        let res = match frame {
            Ok(data) => upload.write(&data).await,
            Err(_) => {
                upload.abandon().await;
                return Err(ApiError::BadRequest("snapshot: cannot be read".into()));
            }
        };
        if let Err(e) = res {
            upload.abandon().await;
            return Err(e.into());
        }
    }
    upload.finish().await?;
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
    use futures_util::StreamExt;
    caller.require(&[Role::Agent, Role::Admin], "downloading a cache snapshot")?;
    let snap = state.control().snapshot(&id).await?;
    let len = snap.len();
    // Chunk by chunk from the store: a chunk gone mid-way (the migration ended) cuts the
    // response short of its Content-Length, which the client sees as an error.
    let chunks = futures_util::stream::iter(0..snap.chunks()).then(move |i| {
        let snap = snap.clone();
        async move { snap.chunk(i).await }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        axum::body::Body::from_stream(chunks),
    )
        .into_response())
}
