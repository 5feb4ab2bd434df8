//! Virtual networks and their IPAM: a tenant's L2 segments with one IPv4 subnet each.
//! VM NICs are created with the VM (`POST /v1/vms` with `nics`), which is where an
//! address is allocated (`control::networks`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use model::api::{CreateNetwork, Problem};
use model::{Network, Role};
use store::Revision;

use crate::extract::AppPath;
use crate::routes::tenants::write_tenant;
use crate::{ApiError, AppJson, AppState, Caller, Scope};

/// Creates a network.
#[utoipa::path(post, path = "/v1/networks", tag = "networks", request_body = CreateNetwork,
    responses(
        (status = 201, body = Network),
        (status = 409, description = "name taken in the tenant", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "bad name or CIDR", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create_network(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateNetwork>,
) -> Result<(StatusCode, Json<Network>), ApiError> {
    caller.require(&[Role::Admin, Role::Member], "creating a network")?;
    let (name, cidr, tenant) = body.validate()?;
    let tenant = write_tenant(&state, &caller, tenant.as_ref()).await?;
    let net = state.control().create_network(tenant, name, cidr).await?;
    Ok((StatusCode::CREATED, Json(net)))
}

/// Lists the caller's networks (an admin: every tenant's).
#[utoipa::path(get, path = "/v1/networks", tag = "networks",
    responses((status = 200, body = Vec<Network>)))]
pub(crate) async fn list_networks(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Network>>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "listing networks")?;
    Ok(Json(state.control().networks(caller.scope()?).await?))
}

/// One network, by name or id.
#[utoipa::path(get, path = "/v1/networks/{name}", tag = "networks",
    params(("name" = String, Path, description = "network name or id")),
    responses((status = 200, body = Network), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get_network(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(name): AppPath,
) -> Result<Json<Network>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "reading a network")?;
    Ok(Json(resolve(&state, caller.scope()?, &name).await?.0))
}

/// Deletes a network no NIC is on.
#[utoipa::path(delete, path = "/v1/networks/{name}", tag = "networks",
    params(("name" = String, Path, description = "network name or id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "a VM has a NIC on it", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn delete_network(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(name): AppPath,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "deleting a network")?;
    state
        .control()
        .delete_network(caller.scope()?, &name)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn resolve(
    state: &AppState,
    scope: Scope,
    s: &str,
) -> Result<(Network, Revision), ApiError> {
    Ok(state.control().network(scope, s).await?)
}
