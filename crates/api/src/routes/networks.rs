//! Virtual networks and their IPAM: a tenant's L2 segments with one IPv4 subnet each.
//! VM NICs are created with the VM (`POST /v1/vms` with `nics`), which is where an
//! address is allocated (`control::networks`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use model::api::{CreateNetwork, Problem};
use model::{Network, NetworkId, Role};
use store::{Revision, StoreError};

use crate::extract::AppPath;
use crate::routes::tenants::write_tenant;
use crate::{ApiError, AppJson, AppState, Caller, Scope};
use control::records::{insert_named, keys, list_json, list_keyed, now_ms, remove_named};

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
    let net = Network {
        id: NetworkId::new_random(),
        tenant,
        name,
        cidr,
        created_at: now_ms(),
    };
    insert_named(
        state.store(),
        keys::network(net.id),
        keys::network_name(tenant, &net.name),
        &net,
        &net.id,
        || format!("name: network {} already exists", net.name),
    )
    .await?;
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
    let scope = caller.scope()?;
    let mut nets: Vec<Network> = list_json::<Network>(state.store(), keys::NETWORKS)
        .await?
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| scope.sees(n.tenant))
        .collect();
    nets.sort_by(|a, b| (a.tenant, &a.name).cmp(&(b.tenant, &b.name)));
    Ok(Json(nets))
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
    let (net, rev) = resolve(&state, caller.scope()?, &name).await?;
    let used = list_keyed::<model::VmId>(state.store(), &keys::ipam_prefix(net.id)).await?;
    if let Some((key, vm)) = used.first() {
        let ip = key.rsplit('/').next().unwrap_or_default();
        return Err(ApiError::Conflict(format!(
            "network {} has {} NIC(s) on it (vm {vm} has {ip}); delete those VMs first",
            net.name,
            used.len()
        )));
    }
    // Compare the record's revision: a VM create on this network rewrites the record
    // in its transaction, so a NIC added after the check above makes this fail.
    let res = remove_named(
        state.store(),
        keys::network(net.id),
        keys::network_name(net.tenant, &net.name),
        Some(rev),
    )
    .await;
    match res {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(StoreError::Conflict { .. }) => Err(ApiError::Conflict(format!(
            "network {} changed concurrently, retry",
            net.name
        ))),
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn resolve(
    state: &AppState,
    scope: Scope,
    s: &str,
) -> Result<(Network, Revision), ApiError> {
    Ok(state.control().network(scope, s).await?)
}
