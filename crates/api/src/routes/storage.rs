//! Redundant placement: the storage inventory, placement explanations, and the
//! standby takeover when a redundant VM's primary host goes down.
//!
//! The planner (`sched`) is pure; this module builds its inventory from three sources:
//! the operator's storage/connectivity document (`PUT /v1/storage`), the registered
//! hosts (capacity, liveness, maintenance) and the VM records (what is reserved).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use model::api::{PlacementQuery, Problem, StorageInventory};
use model::{Host, HostState, Role, Vm};
use sched::{Inventory, Planner, ServerName, ServerResource, StorageName, StorageResource};

use crate::routes::hosts::all_hosts;
use crate::{ApiError, AppJson, AppState, Caller};
use control::records::{get_json, keys, list_json, to_bytes};
use sched::usage;

/// The stored document: storage resources and connectivity, as the operator gave them.
async fn stored(state: &AppState) -> Result<StorageInventory, ApiError> {
    Ok(get_json::<StorageInventory>(state.store(), keys::STORAGE)
        .await?
        .map(|(s, _)| s)
        .unwrap_or_default())
}

/// The planner's inventory now: free storage after redundant VMs' reservations, and
/// servers from hosts (free capacity after every VM's reservation, standby included).
pub(crate) fn inventory(
    doc: &StorageInventory,
    hosts: &[Host],
    vms: &[Vm],
) -> Result<Inventory, ApiError> {
    let mut storage: Vec<StorageResource> = doc
        .storage
        .iter()
        .enumerate()
        .map(|(i, v)| {
            serde_json::from_value(v.clone())
                .map_err(|e| ApiError::Unprocessable(format!("storage[{i}]: {e}")))
        })
        .collect::<Result<_, _>>()?;
    for vm in vms {
        if let Some(r) = &vm.redundancy {
            for s in storage.iter_mut().filter(|s| {
                s.name.as_str() == r.primary_storage || s.name.as_str() == r.standby_storage
            }) {
                s.free_gib = s.free_gib.saturating_sub(r.disk_gib);
            }
        }
    }
    let used = usage(vms.iter());
    let mut servers: Vec<ServerResource> = hosts
        .iter()
        .map(|h| {
            let u = used.get(&h.name).copied().unwrap_or_default();
            ServerResource {
                name: ServerName::new(h.name.as_str()),
                cpus: h.schedulable_vcpus(),
                free_cpus: u32::try_from(u64::from(h.schedulable_vcpus()).saturating_sub(u.vcpus))
                    .unwrap_or(0),
                memory_mib: h.memory_mib,
                free_memory_mib: h.memory_mib.saturating_sub(u.memory_mib),
                live: h.state == HostState::Up,
                in_maintenance: h.maintenance.is_some(),
                failure_domain: None,
            }
        })
        .collect();
    // Connectivity may name hosts that have not registered yet: they exist, down.
    for name in doc.connectivity.keys() {
        if !servers.iter().any(|s| s.name.as_str() == name) {
            servers.push(ServerResource {
                name: ServerName::new(name.as_str()),
                cpus: 0,
                free_cpus: 0,
                memory_mib: 0,
                free_memory_mib: 0,
                live: false,
                in_maintenance: false,
                failure_domain: None,
            });
        }
    }
    let connectivity: BTreeMap<ServerName, Vec<StorageName>> = doc
        .connectivity
        .iter()
        .map(|(h, ss)| {
            (
                ServerName::new(h.as_str()),
                ss.iter().map(|s| StorageName::new(s.as_str())).collect(),
            )
        })
        .collect();
    Ok(Inventory {
        storage,
        servers,
        connectivity,
    })
}

/// What a planner is built from: the stored document, the hosts, the VMs.
type PlannerInputs = (StorageInventory, Vec<Host>, Vec<Vm>);

async fn planner_inputs(state: &AppState) -> Result<PlannerInputs, ApiError> {
    let doc = stored(state).await?;
    let hosts = all_hosts(state).await?;
    let vms: Vec<Vm> = list_json::<Vm>(state.store(), keys::VMS)
        .await?
        .into_iter()
        .map(|(v, _)| v)
        .collect();
    Ok((doc, hosts, vms))
}

fn build_planner((doc, hosts, vms): &PlannerInputs) -> Result<Planner, ApiError> {
    let inv = inventory(doc, hosts, vms)?;
    Planner::new(&inv).map_err(|e| ApiError::Unprocessable(e.to_string()))
}

/// A planner over the current state; 422 naming every problem of the stored document.
pub(crate) async fn planner(state: &AppState) -> Result<Planner, ApiError> {
    build_planner(&planner_inputs(state).await?)
}

/// Replaces the storage inventory (storage resources and connectivity).
#[utoipa::path(put, path = "/v1/storage", tag = "placement", request_body = StorageInventory,
    responses(
        (status = 200, body = StorageInventory),
        (status = 422, description = "every problem, with its path", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn put_storage(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<StorageInventory>,
) -> Result<Json<StorageInventory>, ApiError> {
    caller.require(&[Role::Admin], "changing the storage inventory")?;
    let hosts = all_hosts(&state).await?;
    let inv = inventory(&body, &hosts, &[])?;
    inv.validate()
        .map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    state.store().put(keys::STORAGE, to_bytes(&body)?).await?;
    Ok(Json(body))
}

/// The storage inventory.
#[utoipa::path(get, path = "/v1/storage", tag = "placement",
    responses((status = 200, body = StorageInventory)))]
pub(crate) async fn get_storage(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<StorageInventory>, ApiError> {
    caller.require(&[Role::Admin], "reading the storage inventory")?;
    Ok(Json(stored(&state).await?))
}

/// What a redundant VM of this size would get: the placement, or, when nothing
/// fits, which constraint failed for the best candidates (as data and as text).
/// Building the planner and explaining walk the whole inventory (up to a 2 MiB document
/// of storage and connectivity), so they run in the CPU pool; members may call this.
#[utoipa::path(post, path = "/v1/placements:explain", operation_id = "explain_placement", tag = "placement", request_body = PlacementQuery,
    responses((status = 200, description = "{placed, placement?, explanation?, text}", body = Object),
        (status = 429, description = "over the rate limit, or the server is already running as many CPU-heavy jobs as it runs at once; see Retry-After", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn explain(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(q): AppJson<PlacementQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "asking for a placement")?;
    q.validate()?;
    let inputs = planner_inputs(&state).await?;
    let req = sched::Request {
        disk_gib: q.disk_gib,
        vcpus: q.vcpus,
        memory_mib: q.memory_mib,
    };
    let answer = state
        .cpu()
        .run("placement explanation", move || {
            let p = build_planner(&inputs)?;
            Ok::<_, ApiError>(match p.place(&req) {
                Ok(pl) => {
                    serde_json::json!({"placed": true, "placement": pl, "text": pl.to_string()})
                }
                Err(ex) => {
                    serde_json::json!({"placed": false, "explanation": ex, "text": ex.to_string()})
                }
            })
        })
        .await??;
    Ok(Json(answer))
}
