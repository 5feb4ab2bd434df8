//! VMs: create (with placement), read, start/stop/delete, console, and the
//! agent side (assignments, observed-state reports).

use std::collections::HashMap;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use model::api::{Assignment, CreateVm, ObservedReport, Problem, ReportedState};
use model::{DesiredState, HostState, Image, ImageId, Migration, Role, Vm, VmId};
use store::{Compare, Revision, StoreError, TxnOp};

use crate::extract::AppPath;
use crate::routes::hosts::{all_hosts, host_name};
use crate::routes::tenants::write_tenant;
use crate::{ApiError, AppJson, AppState, Caller, Scope};
use control::records::{get_json, keys, list_json, to_bytes, CAS_ATTEMPTS};

/// Creates a VM and places it on a host: the requested one, or the up host
/// with the most free memory that has room for it.
#[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = CreateVm,
    responses(
        (status = 201, body = Vm),
        (status = 409, description = "name taken, or no room on an up host", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid field, unknown image/host/tenant", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create_vm(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateVm>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    caller.require(&[Role::Admin, Role::Member], "creating a vm")?;
    let req = body.validate()?;
    let tenant = write_tenant(&state, &caller, req.tenant.as_ref()).await?;
    let vm = state.control().create_vm(tenant, &req).await?;
    Ok((StatusCode::CREATED, Json(vm)))
}

/// Lists the caller's VMs (an admin: every tenant's).
#[utoipa::path(get, path = "/v1/vms", tag = "vms",
    responses((status = 200, body = Vec<Vm>), (status = 403, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list_vms(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Vm>>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "listing vms")?;
    let scope = caller.scope()?;
    let mut vms: Vec<Vm> = list_json::<Vm>(state.store(), keys::VMS)
        .await?
        .into_iter()
        .map(|(v, _)| v)
        .filter(|v| scope.sees(v.tenant))
        .collect();
    vms.sort_by(|a, b| (a.tenant, &a.name).cmp(&(b.tenant, &b.name)));
    Ok(Json(vms))
}

/// One VM, by id or name. Another tenant's VM is 404, like a missing one.
#[utoipa::path(get, path = "/v1/vms/{id}", tag = "vms",
    params(("id" = String, Path, description = "vm id or name")),
    responses(
        (status = 200, body = Vm),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "an admin named a VM that several tenants have; use the id", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn get_vm(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<Json<Vm>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "reading a vm")?;
    let (vm, _) = resolve(&state, caller.scope()?, &id).await?;
    Ok(Json(vm))
}

/// Sets the desired state to `running`.
#[utoipa::path(post, path = "/v1/vms/{id}/start", tag = "vms",
    params(("id" = String, Path, description = "vm id or name")),
    responses(
        (status = 200, body = Vm),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the VM is being deleted", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn start_vm(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<Json<Vm>, ApiError> {
    set_desired(&state, &caller, &id, DesiredState::Running).await
}

/// Sets the desired state to `stopped` (its resources stay reserved).
#[utoipa::path(post, path = "/v1/vms/{id}/stop", tag = "vms",
    params(("id" = String, Path, description = "vm id or name")),
    responses(
        (status = 200, body = Vm),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the VM is being deleted", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn stop_vm(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<Json<Vm>, ApiError> {
    set_desired(&state, &caller, &id, DesiredState::Stopped).await
}

async fn set_desired(
    state: &AppState,
    caller: &Caller,
    id: &str,
    desired: DesiredState,
) -> Result<Json<Vm>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "changing a vm")?;
    let scope = caller.scope()?;
    for _ in 0..CAS_ATTEMPTS {
        let (mut vm, rev) = resolve(state, scope, id).await?;
        if vm.desired == DesiredState::Deleted {
            return Err(ApiError::Conflict(format!(
                "vm {} is being deleted",
                vm.name
            )));
        }
        if vm.desired == desired {
            return Ok(Json(vm));
        }
        vm.desired = desired;
        match state
            .store()
            .cas(&keys::vm(vm.id), Some(rev), to_bytes(&vm)?)
            .await
        {
            Ok(_) => return Ok(Json(vm)),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict(format!(
        "vm {id} is being updated concurrently, retry"
    )))
}

/// Deletes a VM: sets `desired: deleted` and answers 202; the record goes
/// when the host's agent confirms with `observed: deleted`. If the VM's host
/// is gone or down, the record goes at once (204): nobody would confirm, and
/// an agent that comes back destroys VMs it is no longer assigned.
#[utoipa::path(delete, path = "/v1/vms/{id}", tag = "vms",
    params(("id" = String, Path, description = "vm id or name")),
    responses(
        (status = 202, description = "deletion pending the agent's confirmation", body = Vm),
        (status = 204, description = "deleted"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn delete_vm(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "deleting a vm")?;
    let scope = caller.scope()?;
    for _ in 0..CAS_ATTEMPTS {
        let (mut vm, rev) = resolve(&state, scope, &id).await?;
        let host_up = all_hosts(&state)
            .await?
            .iter()
            .any(|h| h.name == vm.host && h.state == HostState::Up);
        let res = if host_up {
            if vm.desired == DesiredState::Deleted {
                return Ok((StatusCode::ACCEPTED, Json(vm)).into_response());
            }
            vm.desired = DesiredState::Deleted;
            state
                .store()
                .cas(&keys::vm(vm.id), Some(rev), to_bytes(&vm)?)
                .await
        } else {
            remove(&state, &vm, rev).await
        };
        match res {
            Ok(_) if host_up => return Ok((StatusCode::ACCEPTED, Json(vm)).into_response()),
            Ok(_) => {
                tracing::info!(vm = %vm.name, id = %vm.id, host = %vm.host, "vm removed, its host is down");
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict(format!(
        "vm {id} is being updated concurrently, retry"
    )))
}

/// Removes a VM record and its name index, if the record is still at `rev`.
async fn remove(state: &AppState, vm: &Vm, rev: Revision) -> Result<Revision, StoreError> {
    let key = keys::vm(vm.id);
    let res = state
        .store()
        .txn(
            vec![Compare::ModRevision {
                key: key.clone(),
                expect: Some(rev),
            }],
            [
                TxnOp::Delete { key },
                TxnOp::Delete {
                    key: keys::vm_name(vm.tenant, &vm.name),
                },
            ]
            .into_iter()
            .chain(control::networks::release(&vm.nics))
            .collect(),
        )
        .await;
    if res.is_ok() {
        state.forget_console(vm.id);
    }
    res
}

/// The latest console output the agent reported (empty if none), as text.
/// Kept in server memory only; a server restart forgets it until the next report.
#[utoipa::path(get, path = "/v1/vms/{id}/console", operation_id = "get_console", tag = "vms",
    params(("id" = String, Path, description = "vm id or name")),
    responses(
        (status = 200, body = String, content_type = "text/plain"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn console(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "reading a console")?;
    let (vm, _) = resolve(&state, caller.scope()?, &id).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        state.console(vm.id),
    )
        .into_response())
}

/// Every VM assigned to the host, across tenants, with its image: what the
/// host's agent must converge to. VMs absent from this list must not run there.
#[utoipa::path(get, path = "/v1/hosts/{name}/assignments", operation_id = "list_assignments", tag = "agent",
    params(("name" = String, Path, description = "host name")),
    responses(
        (status = 200, body = Vec<Assignment>),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn assignments(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(name): AppPath,
) -> Result<Json<Vec<Assignment>>, ApiError> {
    caller.require(&[Role::Agent, Role::Admin], "reading assignments")?;
    let name = host_name(&name)?;
    if state.store().get(&keys::host(&name)).await?.is_none() {
        return Err(ApiError::NotFound {
            kind: "host",
            id: name.to_string(),
        });
    }
    let mut images: HashMap<ImageId, Image> = HashMap::new();
    let mut out = Vec::new();
    for (vm, _) in list_json::<Vm>(state.store(), keys::VMS).await? {
        // A migrating VM is assigned to both ends until the migration is over.
        let migration = match vm.migration {
            Some(m) => get_json::<Migration>(state.store(), &keys::migration(m))
                .await?
                .map(|(m, _)| m)
                .filter(|m| m.from_host == name || m.to_host == name),
            None => None,
        };
        if vm.host != name && migration.is_none() {
            continue;
        }
        let image = match images.get(&vm.image) {
            Some(i) => i.clone(),
            None => {
                // Images in use cannot be deleted, so a miss is a broken invariant.
                let (i, _) = get_json::<Image>(state.store(), &keys::image(vm.image))
                    .await?
                    .ok_or_else(|| {
                        ApiError::invariant(format!("vm {} uses missing image {}", vm.id, vm.image))
                    })?;
                images.insert(vm.image, i.clone());
                i
            }
        };
        out.push(Assignment {
            vm,
            image,
            migration,
        });
    }
    Ok(Json(out))
}

/// An agent's report about one VM on its host. `state: deleted` confirms a
/// deletion (only when `desired` is `deleted`) and removes the record.
#[utoipa::path(put, path = "/v1/vms/{id}/observed", tag = "agent", request_body = ObservedReport,
    params(("id" = String, Path, description = "vm id")),
    responses(
        (status = 204, description = "recorded"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the VM is on another host, or deleted while not desired deleted", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn report_observed(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
    AppJson(body): AppJson<ObservedReport>,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Role::Agent, Role::Admin], "reporting observed state")?;
    let host = body.validate()?;
    let not_found = || ApiError::NotFound {
        kind: "vm",
        id: id.clone(),
    };
    let vm_id: VmId = id.parse().map_err(|_| not_found())?;
    for _ in 0..CAS_ATTEMPTS {
        let (mut vm, rev) = get_json::<Vm>(state.store(), &keys::vm(vm_id))
            .await?
            .ok_or_else(not_found)?;
        if vm.host != host {
            return Err(ApiError::Conflict(format!(
                "host: vm {} is assigned to {}, not {host}",
                vm.id, vm.host
            )));
        }
        let res = match body.state.observed() {
            None => {
                if vm.desired != DesiredState::Deleted {
                    return Err(ApiError::Conflict(format!(
                        "state: deleted is accepted only for a vm whose desired state is deleted, vm {} is {}",
                        vm.id, vm.desired.as_str()
                    )));
                }
                remove(&state, &vm, rev).await
            }
            Some(observed) => {
                if let Some(tail) = &body.console_tail {
                    state.set_console(vm.id, tail.clone());
                }
                if vm.observed == observed && vm.error == body.error {
                    // Agents repeat reports; skip the write when nothing changed.
                    return Ok(StatusCode::NO_CONTENT);
                }
                vm.observed = observed;
                vm.error = body.error.clone();
                state
                    .store()
                    .cas(&keys::vm(vm.id), Some(rev), to_bytes(&vm)?)
                    .await
            }
        };
        match res {
            Ok(_) => {
                if body.state == ReportedState::Deleted {
                    tracing::info!(vm = %vm.name, id = %vm.id, "vm deleted");
                }
                return Ok(StatusCode::NO_CONTENT);
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict(format!(
        "vm {id} is being updated concurrently, retry"
    )))
}

/// Finds a VM by id or name as seen from `scope`.
pub(crate) async fn resolve(
    state: &AppState,
    scope: Scope,
    s: &str,
) -> Result<(Vm, Revision), ApiError> {
    control::records::resolve_named::<VmId, Vm>(
        state.store(),
        scope,
        s,
        "vm",
        keys::VM_NAMES,
        keys::vm,
        |v| v.tenant,
    )
    .await
    .map_err(ApiError::from)
}
