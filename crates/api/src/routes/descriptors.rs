//! VNF and NS descriptors: stored per tenant after validation, refused
//! with every error and its path in the document — the same messages as
//! `vinfra vnfd validate`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use model::api::{DescriptorUpload, Problem, StoredDescriptor};
use model::Role;

use crate::{ApiError, AppJson, AppState, Caller, Scope};

/// The descriptor size limit, checked (O(1)) before the body takes a CPU permit, so
/// that it is a 413. The depth pre-scan, a pass over up to 256 KiB, runs first thing
/// in the pool as part of `validate_*` (its refusal is a 422 like any other
/// validation error).
pub(crate) fn check_size(text: &str) -> Result<(), ApiError> {
    let limit = nfv::descriptor::MAX_DESCRIPTOR_BYTES;
    if text.len() > limit {
        return Err(ApiError::PayloadTooLarge {
            what: "descriptor",
            size: Some(u64::try_from(text.len()).unwrap_or(u64::MAX)),
            limit,
        });
    }
    Ok(())
}

/// What a refusal from the CPU pool calls descriptor work.
pub(crate) const VALIDATING: &str = "descriptor validation";

fn refuse(errors: &[nfv::descriptor::DescriptorError]) -> ApiError {
    ApiError::Unprocessable(
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

async fn store(
    state: &AppState,
    caller: &Caller,
    kind: &str,
    id: String,
    text: String,
) -> Result<(StatusCode, Json<StoredDescriptor>), ApiError> {
    let tenant = crate::routes::tenants::write_tenant(state, caller, None).await?;
    let d = state
        .control()
        .put_descriptor(tenant, kind, id, text)
        .await?;
    Ok((StatusCode::CREATED, Json(d)))
}

async fn list_kind(
    state: &AppState,
    scope: Scope,
    kind: &str,
) -> Result<Vec<StoredDescriptor>, ApiError> {
    Ok(state.control().descriptors(scope, kind).await?)
}

/// Validates and stores a VNFD (replacing one with the same descriptor id). The
/// descriptor is at most 256 KiB and 32 levels deep, checked before it is parsed;
/// parsing runs off the async workers, a few at a time.
#[utoipa::path(post, path = "/v1/vnfds", tag = "nfv", request_body = DescriptorUpload,
    responses((status = 201, body = StoredDescriptor),
        (status = 413, description = "the descriptor is over 262144 bytes, or the body over 2 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "every error with its path, one per line; or nested deeper than 32 levels", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "over the rate limit, or the server is already validating as many descriptors as it runs at once; see Retry-After", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn create_vnfd(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<DescriptorUpload>,
) -> Result<(StatusCode, Json<StoredDescriptor>), ApiError> {
    caller.require(&[Role::Admin, Role::Member], "uploading a vnfd")?;
    check_size(&body.descriptor)?;
    let text = body.descriptor;
    let (v, text) = state
        .cpu()
        .run(VALIDATING, move || {
            (nfv::descriptor::validate_vnfd(&text), text)
        })
        .await?;
    let v = v.map_err(|e| refuse(&e))?;
    store(&state, &caller, "vnfd", v.id, text).await
}

/// Validates an NSD against the tenant's stored VNFDs and stores it. Limits as for
/// VNFDs.
#[utoipa::path(post, path = "/v1/nsds", tag = "nfv", request_body = DescriptorUpload,
    responses((status = 201, body = StoredDescriptor),
        (status = 413, description = "the descriptor is over 262144 bytes, or the body over 2 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "every error with its path, one per line; or nested deeper than 32 levels", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "over the rate limit, or the server is already validating as many descriptors as it runs at once; see Retry-After", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn create_nsd(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<DescriptorUpload>,
) -> Result<(StatusCode, Json<StoredDescriptor>), ApiError> {
    caller.require(&[Role::Admin, Role::Member], "uploading an nsd")?;
    check_size(&body.descriptor)?;
    let tenant = crate::routes::tenants::write_tenant(&state, &caller, None).await?;
    let stored = list_kind(&state, Scope::Tenant(tenant), "vnfd").await?;
    let text = body.descriptor;
    let (n, text) = state
        .cpu()
        .run(VALIDATING, move || {
            let vnfds: Vec<nfv::descriptor::Vnfd> = stored
                .iter()
                .filter_map(|d| nfv::descriptor::validate_vnfd(&d.descriptor).ok())
                .collect();
            (nfv::descriptor::validate_nsd(&text, &vnfds), text)
        })
        .await?;
    let n = n.map_err(|e| refuse(&e))?;
    store(&state, &caller, "nsd", n.id, text).await
}

/// The caller's VNFDs.
#[utoipa::path(get, path = "/v1/vnfds", tag = "nfv", responses((status = 200, body = Vec<StoredDescriptor>)))]
pub(crate) async fn list_vnfds(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<StoredDescriptor>>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "listing vnfds")?;
    Ok(Json(list_kind(&state, caller.scope()?, "vnfd").await?))
}

/// The caller's NSDs.
#[utoipa::path(get, path = "/v1/nsds", tag = "nfv", responses((status = 200, body = Vec<StoredDescriptor>)))]
pub(crate) async fn list_nsds(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<StoredDescriptor>>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "listing nsds")?;
    Ok(Json(list_kind(&state, caller.scope()?, "nsd").await?))
}
