//! Virtual networks and their IPAM: a tenant's L2 segments with one IPv4 subnet each.
//! VM NICs are created with the VM (`POST /v1/vms` with `nics`), which is where an
//! address is allocated; see [`allocate`].

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use model::api::{CreateNetwork, NicRequest, Problem};
use model::{Network, NetworkId, Nic, Role, TenantId};
use store::{Compare, Revision, StoreError, TxnOp};

use crate::extract::AppPath;
use crate::routes::tenants::write_tenant;
use crate::{ApiError, AppJson, AppState, Caller, Scope};
use control::records::{
    insert_named, keys, list_json, list_keyed, now_ms, remove_named, resolve_named, to_bytes,
};

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
    resolve_named::<NetworkId, Network>(
        state.store(),
        scope,
        s,
        "network",
        keys::NETWORK_NAMES,
        keys::network,
        |n| n.tenant,
    )
    .await
    .map_err(ApiError::from)
}

/// The NICs of a VM being created, with the store compares and writes that make the
/// allocation atomic with the VM record: each address key must be absent, and each
/// network record is rewritten unchanged so that a concurrent delete of the network
/// fails its own compare.
pub(crate) struct Allocation {
    pub nics: Vec<Nic>,
    pub compares: Vec<Compare>,
    pub ops: Vec<TxnOp>,
}

/// Allocates addresses for `reqs` on the tenant's networks: the asked one (inside the
/// subnet, not its network or broadcast address, free) or the lowest free one.
pub(crate) async fn allocate(
    state: &AppState,
    tenant: TenantId,
    reqs: &[NicRequest],
    vm: model::VmId,
) -> Result<Allocation, ApiError> {
    let mut out = Allocation {
        nics: Vec::new(),
        compares: Vec::new(),
        ops: Vec::new(),
    };
    for (i, r) in reqs.iter().enumerate() {
        let field = format!("nics[{i}]");
        let (net, rev) = resolve(state, Scope::Tenant(tenant), &r.network)
            .await
            .map_err(|e| match e {
                ApiError::NotFound { .. } => ApiError::Unprocessable(format!(
                    "{field}.network: no network named {}",
                    r.network
                )),
                other => other,
            })?;
        let (base, prefix) = model::parse_cidr("cidr", &net.cidr)
            .map_err(|e| ApiError::invariant(format!("stored network {}: {e}", net.name)))?;
        let mut used: BTreeSet<Ipv4Addr> =
            list_keyed::<model::VmId>(state.store(), &keys::ipam_prefix(net.id))
                .await?
                .into_iter()
                .filter_map(|(k, _)| k.rsplit('/').next().and_then(|ip| ip.parse().ok()))
                .collect();
        // Earlier NICs of this same VM on this network.
        used.extend(
            out.nics
                .iter()
                .filter(|n| n.network == net.id)
                .map(|n| n.ip),
        );
        let first = u32::from(base) + 1;
        let last = u32::from(base) + (1u32 << (32 - u32::from(prefix))) - 2;
        let ip = match r.ip {
            Some(ip) => {
                let n = u32::from(ip);
                if n < first || n > last {
                    return Err(ApiError::Unprocessable(format!(
                        "{field}.ip: {ip} is not a host address of {} ({})",
                        net.name, net.cidr
                    )));
                }
                if used.contains(&ip) {
                    return Err(ApiError::Conflict(format!(
                        "{field}.ip: {ip} is already in use on network {}",
                        net.name
                    )));
                }
                ip
            }
            None => (first..=last)
                .map(Ipv4Addr::from)
                .find(|ip| !used.contains(ip))
                .ok_or_else(|| {
                    ApiError::Conflict(format!(
                        "{field}: network {} ({}) has no free address",
                        net.name, net.cidr
                    ))
                })?,
        };
        let nic = Nic {
            name: r
                .name
                .as_deref()
                .map(|n| model::validate_name(&format!("{field}.name"), n))
                .transpose()?,
            network: net.id,
            network_name: net.name.clone(),
            ip,
            prefix,
            mac: Nic::mac_for(net.id, ip),
        };
        if let Some(twin) = out.nics.iter().position(|n| n.mac == nic.mac) {
            return Err(ApiError::Unprocessable(format!(
                "{field}: same address {ip} as nics[{twin}] on a network with the same subnet; the guest could not tell them apart"
            )));
        }
        let ipam_key = keys::ipam(net.id, ip);
        out.compares.push(Compare::ModRevision {
            key: ipam_key.clone(),
            expect: None,
        });
        out.ops.push(TxnOp::Put {
            key: ipam_key,
            value: to_bytes(&vm)?,
        });
        if !out.nics.iter().any(|n| n.network == net.id) {
            out.compares.push(Compare::ModRevision {
                key: keys::network(net.id),
                expect: Some(rev),
            });
            out.ops.push(TxnOp::Put {
                key: keys::network(net.id),
                value: to_bytes(&net)?,
            });
        }
        out.nics.push(nic);
    }
    Ok(out)
}

/// The store deletes that free a VM's addresses (in its removal transaction).
pub(crate) fn release(nics: &[Nic]) -> Vec<TxnOp> {
    nics.iter()
        .map(|n| TxnOp::Delete {
            key: keys::ipam(n.network, n.ip),
        })
        .collect()
}
