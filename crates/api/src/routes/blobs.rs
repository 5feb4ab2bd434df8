//! The image store's routes: upload, admin import, list, download.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Json;
use model::api::{ImportBlob, Problem};
use model::{Blob, BlobDigest, Role, TenantId};

use crate::blobs::{file_stream, BlobFiles, Stored};
use crate::extract::AppPath;
use crate::{ApiError, AppJson, AppState, Caller, Scope};

/// Query of an upload.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct UploadBlobQuery {
    /// The digest the client computed: the upload is refused unless the bytes hash to it.
    #[param(pattern = "^sha256:[0-9a-f]{64}$")]
    expect: Option<String>,
}

pub(crate) fn files(state: &AppState) -> Result<&BlobFiles, ApiError> {
    state.blobs().ok_or(ApiError::ImageStoreOff)
}

/// Records that `owner` (a tenant; `None`: shared, for an admin) may use a stored file.
pub(crate) async fn record(
    state: &AppState,
    owner: Option<TenantId>,
    stored: Stored,
) -> Result<Blob, ApiError> {
    Ok(state
        .control()
        .record_blob(owner, stored.digest, stored.size)
        .await?)
}

/// The owner of what `caller` stores: its tenant, or shared for an admin.
fn owner(caller: &Caller) -> Result<Option<TenantId>, ApiError> {
    Ok(match caller.scope()? {
        Scope::All => None,
        Scope::Tenant(t) => Some(t),
    })
}

/// Uploads a file into the image store: the body is the file's bytes, streamed
/// (`application/octet-stream`), hashed while written, refused over the server's
/// limit. With `expect`, refused unless the bytes hash to it.
#[utoipa::path(post, path = "/v1/blobs", operation_id = "upload_blob", tag = "images",
    params(UploadBlobQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 201, body = Blob),
        (status = 400, description = "the upload broke off", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "over the server's blob limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "not application/octet-stream", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "the bytes do not hash to `expect`", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<UploadBlobQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Blob>), ApiError> {
    caller.require(&[Role::Admin, Role::Member], "uploading a blob")?;
    let owner = owner(&caller)?;
    let Query(q) = q.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    let expect = q
        .expect
        .as_deref()
        .map(|e| model::parse_digest("expect", e))
        .transpose()?;
    let octets = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim().eq_ignore_ascii_case("application/octet-stream"));
    if !octets {
        return Err(ApiError::UnsupportedMediaTypeFor {
            expected: "application/octet-stream",
        });
    }
    let stored = files(&state)?
        .put_stream(body.into_data_stream(), expect.as_ref())
        .await?;
    let blob = record(&state, owner, stored).await?;
    tracing::info!(digest = %blob.digest, size = blob.size, tenant = ?owner, "blob stored");
    Ok((StatusCode::CREATED, Json(blob)))
}

/// Admin: copies a file from the server's import directory (`--image-import-dir`)
/// into the image store. The path is resolved (symlinks, `..`) and must stay inside
/// that directory.
#[utoipa::path(post, path = "/v1/blobs/import", operation_id = "import_blob", tag = "images", request_body = ImportBlob,
    responses(
        (status = 201, body = Blob),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "over the server's blob limit", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "imports off, or the path is outside the import directory or not a file", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn import(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<ImportBlob>,
) -> Result<(StatusCode, Json<Blob>), ApiError> {
    caller.require(&[Role::Admin], "importing a blob")?;
    let stored = files(&state)?.import(&body.path).await?;
    let blob = record(&state, None, stored).await?;
    tracing::info!(digest = %blob.digest, size = blob.size, "blob imported");
    Ok((StatusCode::CREATED, Json(blob)))
}

/// The blobs the caller may use: its tenant's and the shared ones (an admin: all).
#[utoipa::path(get, path = "/v1/blobs", operation_id = "list_blobs", tag = "images",
    responses(
        (status = 200, body = Vec<Blob>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Blob>>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "listing blobs")?;
    Ok(Json(state.control().blobs(caller.scope()?).await?))
}

/// Whether `scope` may use `digest`: a record for its tenant or a shared one
/// (an admin: any record).
pub(crate) async fn usable(
    state: &AppState,
    scope: Scope,
    digest: &BlobDigest,
) -> Result<bool, ApiError> {
    Ok(state.control().blob_usable(scope, digest).await?)
}

/// Downloads a blob. Agents fetch the files of the images they boot; members
/// their tenant's and shared blobs.
#[utoipa::path(get, path = "/v1/blobs/{digest}", operation_id = "download_blob", tag = "images",
    params(("digest" = String, Path, description = "sha256:<64 hex digits>")),
    responses(
        (status = 200, description = "the file's bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn download(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(digest): AppPath,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound {
        kind: "blob",
        id: digest.chars().take(80).collect(),
    };
    let d = model::parse_digest("digest", &digest).map_err(|_| not_found())?;
    let scope = match caller.role {
        // An agent boots whatever image the control plane assigns to its host.
        Role::Agent => Scope::All,
        _ => caller.scope()?,
    };
    if !usable(&state, scope, &d).await? {
        return Err(not_found());
    }
    let (file, size) = files(&state)?.open_read(&d).await?;
    let mut res = Response::new(Body::from_stream(file_stream(file)));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    Ok(res)
}
