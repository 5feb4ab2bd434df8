//! VMs: create (with placement), read, start/stop/delete, console, and the
//! agent side (assignments, observed-state reports).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use model::api::{Assignment, CreateVm, ObservedReport, Problem};
use model::{DesiredState, Role, Vm};
use store::Revision;

use crate::extract::AppPath;
use crate::routes::hosts::host_name;
use crate::routes::tenants::write_tenant;
use crate::{ApiError, AppJson, AppState, Caller, Scope};

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
    Ok(Json(state.control().vms(caller.scope()?).await?))
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
    Ok(Json(
        state
            .control()
            .set_desired(caller.scope()?, id, desired)
            .await?,
    ))
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
    match state.control().delete_vm(caller.scope()?, &id).await? {
        control::VmDeleted::Pending(vm) => Ok((StatusCode::ACCEPTED, Json(*vm)).into_response()),
        control::VmDeleted::Removed(vm) => {
            state.forget_console(vm.id);
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
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
    Ok(Json(state.control().assignments(&name).await?))
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
    let observed = body.state.observed();
    let outcome = state
        .control()
        .report_observed(&id, &host, observed, body.error.clone())
        .await?;
    match outcome {
        control::Observed::Removed => {
            if let Ok(vm) = id.parse() {
                state.forget_console(vm);
            }
        }
        control::Observed::Recorded => {
            if let (Some(tail), Ok(vm)) = (&body.console_tail, id.parse()) {
                state.set_console(vm, tail.clone());
            }
            if let (Some(ms), Ok(vm)) = (body.cpu_time_ms, id.parse()) {
                state.set_cpu_ms(vm, ms);
            }
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Finds a VM by id or name as seen from `scope`.
pub(crate) async fn resolve(
    state: &AppState,
    scope: Scope,
    s: &str,
) -> Result<(Vm, Revision), ApiError> {
    Ok(state.control().vm(scope, s).await?)
}
