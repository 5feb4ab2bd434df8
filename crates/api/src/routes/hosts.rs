//! Host registration, heartbeats and listing.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use model::api::{HostEvent, HostLease, Problem, RegisterHost};
use model::{Host, Name, Role};

use crate::extract::AppPath;
use crate::{ApiError, AppJson, AppState, Caller};

/// Registers a host, or re-registers it under the same name (keeping its id;
/// capacity, drivers and agent URL are replaced). Counts as a heartbeat: the answer
/// carries the lease it renewed.
#[utoipa::path(post, path = "/v1/hosts", tag = "hosts", request_body = RegisterHost,
    responses(
        (status = 201, description = "registered for the first time", body = HostLease),
        (status = 200, description = "re-registered", body = HostLease),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn register_host(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<RegisterHost>,
) -> Result<(StatusCode, Json<HostLease>), ApiError> {
    caller.require(&[Role::Agent, Role::Admin], "registering a host")?;
    let name = body.validate()?;
    let (host, new) = state.control().register_host(&name, &body).await?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(host)))
}

/// Records a heartbeat from the host's agent; the answer carries the lease it renewed
/// (`lease_ms`, counted from when the agent sent the heartbeat).
#[utoipa::path(post, path = "/v1/hosts/{name}/heartbeat", tag = "hosts",
    params(("name" = String, Path, description = "host name")),
    responses(
        (status = 200, body = HostLease),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn heartbeat(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(name): AppPath,
) -> Result<Json<HostLease>, ApiError> {
    caller.require(&[Role::Agent, Role::Admin], "sending a heartbeat")?;
    let name = host_name(&name)?;
    Ok(Json(state.control().heartbeat(&name).await?))
}

/// The host's events, pushed as they happen: newline-delimited JSON, one `HostEvent`
/// per line, for as long as the connection lasts. The first line is `resync` (read the
/// assignments); then each change of what the host must run (`assignment`,
/// `unassigned`), `resync` again when the server may have missed changes, and `ping`
/// after 10 s of silence. The assignments list stays the source of truth.
#[utoipa::path(get, path = "/v1/hosts/{name}/events", operation_id = "host_events", tag = "agent",
    params(("name" = String, Path, description = "host name")),
    responses(
        (status = 200, description = "a stream of HostEvent lines (application/x-ndjson); ends when the server shuts down", body = HostEvent, content_type = "application/x-ndjson"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the server is shutting down; connect to another one", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn host_events(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(name): AppPath,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Agent, Role::Admin], "following a host's events")?;
    let name = host_name(&name)?;
    let events = state.control().host_events(&name).await?;
    let lines = events.map(|ev| {
        serde_json::to_vec(ev.as_ref()).map(|mut line| {
            line.push(b'\n');
            Bytes::from(line)
        })
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            // Each line is news: nothing in between may hold it back or keep it.
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(lines),
    )
        .into_response())
}

/// Lists hosts with their liveness. Members get each host without its
/// internal addresses (`agent_url`, `nbd_addr`, `link_addr`, `uplink_ip`).
#[utoipa::path(get, path = "/v1/hosts", tag = "hosts",
    responses((status = 200, body = Vec<Host>), (status = 401, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list_hosts(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Host>>, ApiError> {
    let hosts = all_hosts(&state).await?;
    Ok(Json(hosts.into_iter().map(|h| view(&caller, h)).collect()))
}

/// One host with its liveness (for members, without its internal addresses).
#[utoipa::path(get, path = "/v1/hosts/{name}", tag = "hosts",
    params(("name" = String, Path, description = "host name")),
    responses((status = 200, body = Host), (status = 401, body = Problem, content_type = "application/problem+json"), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get_host(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(name): AppPath,
) -> Result<Json<Host>, ApiError> {
    let name = host_name(&name)?;
    let (host, _) = state.control().host(&name).await?;
    Ok(Json(view(&caller, host)))
}

/// A host as `caller` may see it. Admins and agents (which reach each other's
/// NBD servers and tunnel ends) get every field; a member learns capacity and
/// liveness only: the addresses inside the infrastructure are not its business
/// and would help an attacker who holds a member token.
fn view(caller: &Caller, host: Host) -> Host {
    match caller.role {
        Role::Admin | Role::Agent => host,
        Role::Member => host.without_internals(),
    }
}

/// A path segment as a host name; a malformed one cannot exist, so it is 404.
pub(crate) fn host_name(s: &str) -> Result<Name, ApiError> {
    model::validate_name("host", s).map_err(|_| ApiError::NotFound {
        kind: "host",
        id: s.to_owned(),
    })
}

/// Every host, with `state` computed for now.
pub(crate) async fn all_hosts(state: &AppState) -> Result<Vec<Host>, ApiError> {
    Ok(state.control().hosts().await?)
}
