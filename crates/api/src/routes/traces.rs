//! Block traces of VM disks: start and stop (members), the host agent's upload of the
//! recorded file after a stop, and its download (MSR Cambridge CSV).

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Json;
use model::api::{Problem, SetTrace};
use model::{Role, Vm};

use crate::blobs::file_stream;
use crate::extract::AppPath;
use crate::routes::blobs::{files, record};
use crate::{ApiError, AppJson, AppState, Caller, Scope};

/// Starts (`recording: true`) or stops recording the block requests the VM's disk
/// receives on its host. Starting replaces a finished trace.
#[utoipa::path(put, path = "/v1/vms/{id}/trace", operation_id = "set_trace", tag = "vms", request_body = SetTrace,
    params(("id" = String, Path, description = "vm id or name")),
    responses(
        (status = 200, body = Vm),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "not running (start) or not recording (stop)", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn set_trace(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
    AppJson(body): AppJson<SetTrace>,
) -> Result<Json<Vm>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "tracing a vm")?;
    Ok(Json(
        state
            .control()
            .set_trace(caller.scope()?, &id, body.recording)
            .await?,
    ))
}

/// The stopped trace of the VM, as MSR Cambridge CSV
/// (`Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime`).
#[utoipa::path(get, path = "/v1/vms/{id}/trace", operation_id = "get_trace", tag = "vms",
    params(("id" = String, Path, description = "vm id or name")),
    responses(
        (status = 200, description = "the trace", content_type = "text/csv", body = String),
        (status = 404, description = "no such vm, or it was never traced", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "still recording, or its agent has not uploaded it yet", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn get_trace(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "reading a trace")?;
    let (vm, _) = state.control().vm(caller.scope()?, &id).await?;
    let Some(t) = vm.trace else {
        return Err(ApiError::NotFound {
            kind: "trace of vm",
            id: vm.name.to_string(),
        });
    };
    if t.recording {
        return Err(ApiError::Conflict(format!(
            "vm {} is still recording its trace: stop it first",
            vm.name
        )));
    }
    let Some(digest) = t.blob else {
        return Err(ApiError::Conflict(format!(
            "the trace of vm {} is not uploaded by its host's agent yet: try again shortly",
            vm.name
        )));
    };
    let (file, size) = files(&state)?.open_read(&digest).await?;
    let mut res = Response::new(Body::from_stream(file_stream(file)));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    Ok(res)
}

/// Query of a trace upload.
#[derive(Debug, Clone, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct TraceUploadQuery {
    /// The uploading host: the VM's.
    host: String,
}

/// The host's agent uploads a stopped trace (`application/octet-stream`, streamed into
/// the blob store, owned by the VM's tenant).
#[utoipa::path(put, path = "/v1/vms/{id}/trace/data", operation_id = "upload_trace", tag = "agent",
    params(("id" = String, Path, description = "vm id"), TraceUploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 204, description = "stored"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "no stopped trace awaits a file, or the vm is on another host", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "over the server's blob limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "not application/octet-stream", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn upload_trace(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
    q: Result<Query<TraceUploadQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Role::Agent, Role::Admin], "uploading a trace")?;
    let Query(q) = q.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    let host = model::validate_name("host", &q.host)?;
    let octets = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim().eq_ignore_ascii_case("application/octet-stream"));
    if !octets {
        return Err(ApiError::UnsupportedMediaTypeFor {
            expected: "application/octet-stream",
        });
    }
    // Refuse before storing anything when nobody awaits it.
    let (vm, _) = state.control().vm(Scope::All, &id).await?;
    let awaited = vm
        .trace
        .as_ref()
        .is_some_and(|t| !t.recording && t.blob.is_none());
    if !awaited {
        return Err(control::VmChangeError::NoTraceAwaited(vm.id).into());
    }
    let stored = files(&state)?
        .put_stream(body.into_data_stream(), None)
        .await?;
    let (digest, size) = (stored.digest.clone(), stored.size);
    record(&state, Some(vm.tenant), stored).await?;
    state
        .control()
        .trace_uploaded(&id, &host, digest, size)
        .await?;
    tracing::info!(vm = %vm.name, size, "trace stored");
    Ok(StatusCode::NO_CONTENT)
}
