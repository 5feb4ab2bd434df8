//! VNF and NS descriptors: stored per tenant after validation, refused
//! with every error and its path in the document — the same messages as
//! `vinfra vnfd validate`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use model::api::{DescriptorUpload, Problem, StoredDescriptor};
use model::Role;

use crate::store_io::{keys, list_json, now_ms, to_bytes};
use crate::{ApiError, AppJson, AppState, Caller, Scope};

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
    let d = StoredDescriptor {
        id,
        kind: kind.to_owned(),
        tenant,
        descriptor: text,
        created_at: now_ms(),
    };
    state
        .store()
        .put(&keys::descriptor(kind, tenant, &d.id), to_bytes(&d)?)
        .await?;
    Ok((StatusCode::CREATED, Json(d)))
}

async fn list_kind(
    state: &AppState,
    scope: Scope,
    kind: &str,
) -> Result<Vec<StoredDescriptor>, ApiError> {
    Ok(
        list_json::<StoredDescriptor>(state.store(), &keys::descriptors(kind))
            .await?
            .into_iter()
            .map(|(d, _)| d)
            .filter(|d| scope.sees(d.tenant))
            .collect(),
    )
}

/// Validates and stores a VNFD (replacing one with the same descriptor id).
#[utoipa::path(post, path = "/v1/vnfds", tag = "nfv", request_body = DescriptorUpload,
    responses((status = 201, body = StoredDescriptor),
        (status = 422, description = "every error with its path, one per line", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn create_vnfd(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<DescriptorUpload>,
) -> Result<(StatusCode, Json<StoredDescriptor>), ApiError> {
    caller.require(&[Role::Admin, Role::Member], "uploading a vnfd")?;
    let v = nfv::descriptor::validate_vnfd(&body.descriptor).map_err(|e| refuse(&e))?;
    store(&state, &caller, "vnfd", v.id, body.descriptor).await
}

/// Validates an NSD against the tenant's stored VNFDs and stores it.
#[utoipa::path(post, path = "/v1/nsds", tag = "nfv", request_body = DescriptorUpload,
    responses((status = 201, body = StoredDescriptor),
        (status = 422, description = "every error with its path, one per line", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn create_nsd(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<DescriptorUpload>,
) -> Result<(StatusCode, Json<StoredDescriptor>), ApiError> {
    caller.require(&[Role::Admin, Role::Member], "uploading an nsd")?;
    let tenant = crate::routes::tenants::write_tenant(&state, &caller, None).await?;
    let vnfds: Vec<nfv::descriptor::Vnfd> = list_kind(&state, Scope::Tenant(tenant), "vnfd")
        .await?
        .iter()
        .filter_map(|d| nfv::descriptor::validate_vnfd(&d.descriptor).ok())
        .collect();
    let n = nfv::descriptor::validate_nsd(&body.descriptor, &vnfds).map_err(|e| refuse(&e))?;
    store(&state, &caller, "nsd", n.id, body.descriptor).await
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
