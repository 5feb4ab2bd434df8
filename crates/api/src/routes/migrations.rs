//! Live migrations: started by a user, moved along by the two agents.
//!
//! The server is only the meeting point: it checks that each report is a legal
//! transition from the right host, records it, and flips the VM's host at
//! switch-over in the same transaction as the migration record, so that no reader
//! ever sees a VM on the destination with a migration not yet switched (or the
//! reverse). The source's cache snapshot (heat map + access pattern + block list)
//! passes through server memory: it is needed once, by one agent, within seconds.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use model::api::{MigrateVm, MigrationReport, Problem};
use model::{
    DesiredState, HostState, Migration, MigrationId, MigrationState, Name, ObservedState, Role, Vm,
};
use store::{Compare, StoreError, TxnOp};

use crate::extract::{read_body, AppPath};
use crate::routes::hosts::all_hosts;
use crate::routes::vms::resolve;
use crate::{ApiError, AppJson, AppState, Caller, Scope};
use control::records::{get_json, keys, list_json, now_ms, to_bytes, CAS_ATTEMPTS};
use sched::place;
use sched::usage;

/// Largest snapshot accepted: the heat map and pattern are bounded by the cache's
/// capacity (a few MiB for a 1 GiB cache of 64 KiB blocks).
pub(crate) const MAX_SNAPSHOT: usize = 64 << 20;

/// Starts a live migration of a running VM to another host (202). The VM's memory
/// moves with QEMU's migration; its disk cache is rebuilt on the destination from
/// the source host's cache in the order `strategy` plans.
#[utoipa::path(post, path = "/v1/vms/{id}/migrate", tag = "migrations", request_body = MigrateVm,
    params(("id" = String, Path, description = "vm id or name")),
    responses(
        (status = 202, body = Migration),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "not running, already migrating, or the destination cannot take it", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn migrate_vm(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
    AppJson(body): AppJson<MigrateVm>,
) -> Result<(StatusCode, Json<Migration>), ApiError> {
    caller.require(&[Role::Admin, Role::Member], "migrating a vm")?;
    let (to, strategy) = body.validate()?;
    let scope = caller.scope()?;
    for _ in 0..CAS_ATTEMPTS {
        let (vm, rev) = resolve(&state, scope, &id).await?;
        if let Some(m) = try_start(&state, vm, rev, &to, &strategy).await? {
            return Ok((StatusCode::ACCEPTED, Json(m)));
        }
    }
    Err(ApiError::Conflict(format!(
        "vm {id} is being updated concurrently, retry"
    )))
}

/// Starts a migration of `vm` (read at `rev`) to `to`: checks, then one transaction
/// writing the migration and the VM's link to it. `None` when the VM changed meanwhile
/// (the caller re-reads and retries).
pub(crate) async fn try_start(
    state: &AppState,
    mut vm: Vm,
    rev: store::Revision,
    to: &Name,
    strategy: &str,
) -> Result<Option<Migration>, ApiError> {
    if let Some(m) = vm.migration {
        return Err(ApiError::Conflict(format!(
            "vm {} is already migrating (migration {m})",
            vm.name
        )));
    }
    if vm.desired != DesiredState::Running || vm.observed != ObservedState::Running {
        return Err(ApiError::Conflict(format!(
            "vm {} must be running to migrate live; it is {} (desired {})",
            vm.name,
            vm.observed.as_str(),
            vm.desired.as_str()
        )));
    }
    if vm.host == *to {
        return Err(ApiError::Unprocessable(format!(
            "to: vm {} already runs on {to}",
            vm.name
        )));
    }
    let hosts = all_hosts(state).await?;
    let source = hosts.iter().find(|h| h.name == vm.host);
    let peer_nbd = source.and_then(|h| h.nbd_addr.clone()).ok_or_else(|| {
        ApiError::Conflict(format!(
            "host {} serves no block cache (no nbd_addr): cannot migrate from it",
            vm.host
        ))
    })?;
    if source.is_some_and(|h| h.state != HostState::Up) {
        return Err(ApiError::Conflict(format!("host {} is down", vm.host)));
    }
    let vms = list_json::<Vm>(state.store(), keys::VMS).await?;
    place(
        &hosts,
        &usage(vms.iter().map(|(v, _)| v)),
        vm.vcpus,
        vm.memory_mib,
        Some(to),
    )
    .map_err(|e| match e {
        sched::PlaceError::NoSuchHost(_) => {
            ApiError::Unprocessable(format!("to: no host named {to}"))
        }
        other => ApiError::Conflict(other.to_string().replacen("host:", "to:", 1)),
    })?;
    if !hosts.iter().any(|h| h.name == *to && h.nbd_addr.is_some()) {
        return Err(ApiError::Conflict(format!(
            "to: host {to} serves no block cache (no nbd_addr)"
        )));
    }
    let m = Migration {
        id: MigrationId::new_random(),
        vm: vm.id,
        tenant: vm.tenant,
        vm_name: vm.name.clone(),
        from_host: vm.host.clone(),
        to_host: to.clone(),
        strategy: strategy.to_owned(),
        state: MigrationState::Pending,
        peer_nbd: Some(peer_nbd),
        incoming_uri: None,
        qemu: None,
        progress: None,
        error: None,
        created_at: now_ms(),
        switched_at: None,
        finished_at: None,
    };
    vm.migration = Some(m.id);
    let res = state
        .store()
        .txn(
            vec![Compare::ModRevision {
                key: keys::vm(vm.id),
                expect: Some(rev),
            }],
            vec![
                TxnOp::Put {
                    key: keys::vm(vm.id),
                    value: to_bytes(&vm)?,
                },
                TxnOp::Put {
                    key: keys::migration(m.id),
                    value: to_bytes(&m)?,
                },
            ],
        )
        .await;
    match res {
        Ok(_) => {
            tracing::info!(vm = %vm.name, from = %m.from_host, to = %m.to_host, strategy = %m.strategy, "migration requested");
            Ok(Some(m))
        }
        Err(StoreError::Conflict { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The caller's migrations, newest first.
#[utoipa::path(get, path = "/v1/migrations", tag = "migrations",
    responses((status = 200, body = Vec<Migration>)))]
pub(crate) async fn list_migrations(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Migration>>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "listing migrations")?;
    let scope = caller.scope()?;
    let mut out: Vec<Migration> = list_json::<Migration>(state.store(), keys::MIGRATIONS)
        .await?
        .into_iter()
        .map(|(m, _)| m)
        .filter(|m| scope.sees(m.tenant))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.created_at));
    Ok(Json(out))
}

/// One migration.
#[utoipa::path(get, path = "/v1/migrations/{id}", tag = "migrations",
    params(("id" = String, Path, description = "migration id")),
    responses((status = 200, body = Migration), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get_migration(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<Json<Migration>, ApiError> {
    let scope = match caller.role {
        Role::Agent => Scope::All,
        _ => caller.scope()?,
    };
    let (m, _) = load(&state, scope, &id).await?;
    Ok(Json(m))
}

async fn load(
    state: &AppState,
    scope: Scope,
    id: &str,
) -> Result<(Migration, store::Revision), ApiError> {
    let not_found = || ApiError::NotFound {
        kind: "migration",
        id: id.to_owned(),
    };
    let mid: MigrationId = id.parse().map_err(|_| not_found())?;
    match get_json::<Migration>(state.store(), &keys::migration(mid)).await? {
        Some((m, rev)) if scope.sees(m.tenant) => Ok((m, rev)),
        _ => Err(not_found()),
    }
}

/// Which side may make which transition. Returns a reason when not allowed.
fn check_transition(m: &Migration, host: &Name, report: &MigrationReport) -> Result<(), String> {
    use MigrationState::*;
    let is_src = *host == m.from_host;
    let is_dst = *host == m.to_host;
    if !is_src && !is_dst {
        return Err(format!(
            "host: {host} is neither the source ({}) nor the destination ({})",
            m.from_host, m.to_host
        ));
    }
    let ok = match (m.state, report.state) {
        (from, Failed) => !from.is_final() && (is_dst || from != Warming),
        (Pending, Ready) => is_dst && report.incoming_uri.is_some(),
        (Ready, Migrating) => is_src,
        (Ready | Migrating, Warming) => is_src,
        (Warming, Warming) | (Warming, Completed) => is_dst,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "state: {} may not move migration {} from {} to {}",
            if is_src {
                "the source"
            } else {
                "the destination"
            },
            m.id,
            m.state.as_str(),
            report.state.as_str()
        ))
    }
}

/// An agent moves a migration along (see the state machine in `docs/API.md`).
/// At `warming` (switch-over) the VM's host becomes the destination.
#[utoipa::path(put, path = "/v1/migrations/{id}/report", tag = "agent", request_body = MigrationReport,
    params(("id" = String, Path, description = "migration id")),
    responses(
        (status = 200, body = Migration),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "not a legal transition from this host", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn report_migration(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
    AppJson(body): AppJson<MigrationReport>,
) -> Result<Json<Migration>, ApiError> {
    caller.require(&[Role::Agent, Role::Admin], "reporting on a migration")?;
    let host = body.validate()?;
    for _ in 0..CAS_ATTEMPTS {
        let (mut m, mrev) = load(&state, Scope::All, &id).await?;
        check_transition(&m, &host, &body).map_err(ApiError::Conflict)?;
        let (mut vm, vrev) = get_json::<Vm>(state.store(), &keys::vm(m.vm))
            .await?
            .ok_or_else(|| {
                ApiError::invariant(format!("migration {} of missing vm {}", m.id, m.vm))
            })?;
        let now = now_ms();
        let previous = m.state;
        m.state = body.state;
        if body.incoming_uri.is_some() {
            m.incoming_uri = body.incoming_uri.clone();
        }
        if body.qemu.is_some() {
            m.qemu = body.qemu.clone();
        }
        if body.progress.is_some() {
            m.progress = body.progress.clone();
        }
        match body.state {
            MigrationState::Warming if previous != MigrationState::Warming => {
                m.switched_at = Some(now);
                vm.host = m.to_host.clone();
            }
            MigrationState::Completed | MigrationState::Failed => {
                m.finished_at = Some(now);
                m.error = body.error.clone();
                vm.migration = None;
            }
            _ => {}
        }
        if m.state == previous && m.state == MigrationState::Warming && vm.migration == Some(m.id) {
            // Progress only: the VM record does not change.
            match state
                .store()
                .cas(&keys::migration(m.id), Some(mrev), to_bytes(&m)?)
                .await
            {
                Ok(_) => return Ok(Json(m)),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let res = state
            .store()
            .txn(
                vec![
                    Compare::ModRevision {
                        key: keys::migration(m.id),
                        expect: Some(mrev),
                    },
                    Compare::ModRevision {
                        key: keys::vm(vm.id),
                        expect: Some(vrev),
                    },
                ],
                vec![
                    TxnOp::Put {
                        key: keys::migration(m.id),
                        value: to_bytes(&m)?,
                    },
                    TxnOp::Put {
                        key: keys::vm(vm.id),
                        value: to_bytes(&vm)?,
                    },
                ],
            )
            .await;
        match res {
            Ok(_) => {
                tracing::info!(migration = %m.id, vm = %m.vm_name, state = m.state.as_str(), error = ?m.error, "migration moved");
                if m.state.is_final() {
                    state.forget_snapshot(m.id);
                }
                return Ok(Json(m));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict(format!(
        "migration {id} is being updated concurrently, retry"
    )))
}

/// The source agent uploads its cache snapshot (opaque bytes, JSON in practice).
#[utoipa::path(put, path = "/v1/migrations/{id}/snapshot", tag = "agent",
    params(("id" = String, Path, description = "migration id")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204), (status = 404, body = Problem, content_type = "application/problem+json"), (status = 409, body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "over the snapshot limit (64 MiB)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "over the rate limit; see Retry-After", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn put_snapshot(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
    req: Request,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Role::Agent, Role::Admin], "uploading a cache snapshot")?;
    let (m, _) = load(&state, Scope::All, &id).await?;
    if m.state.is_final() {
        return Err(ApiError::Conflict(format!(
            "migration {} is {}",
            m.id,
            m.state.as_str()
        )));
    }
    // Read only once the caller and the migration are known good.
    let body = read_body(req, "snapshot", MAX_SNAPSHOT).await?;
    state.set_snapshot(m.id, body);
    Ok(StatusCode::NO_CONTENT)
}

/// The destination agent downloads the source's snapshot; 404 until uploaded.
#[utoipa::path(get, path = "/v1/migrations/{id}/snapshot", tag = "agent",
    params(("id" = String, Path, description = "migration id")),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get_snapshot(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Agent, Role::Admin], "downloading a cache snapshot")?;
    let (m, _) = load(&state, Scope::All, &id).await?;
    match state.snapshot(m.id) {
        Some(b) => Ok(([(header::CONTENT_TYPE, "application/octet-stream")], b).into_response()),
        None => Err(ApiError::NotFound {
            kind: "snapshot of migration",
            id: m.id.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(state: MigrationState) -> Migration {
        Migration {
            id: MigrationId::new_random(),
            vm: model::VmId::new_random(),
            tenant: model::TenantId::new_random(),
            vm_name: model::validate_name("n", "vm").unwrap(),
            from_host: model::validate_name("n", "a").unwrap(),
            to_host: model::validate_name("n", "b").unwrap(),
            strategy: "heat+pattern".into(),
            state,
            peer_nbd: None,
            incoming_uri: None,
            qemu: None,
            progress: None,
            error: None,
            created_at: 0,
            switched_at: None,
            finished_at: None,
        }
    }

    fn report(host: &str, state: MigrationState, uri: bool) -> (Name, MigrationReport) {
        (
            model::validate_name("n", host).unwrap(),
            MigrationReport {
                host: host.into(),
                state,
                incoming_uri: uri.then(|| "tcp:127.0.0.1:4444".into()),
                qemu: None,
                progress: None,
                error: None,
            },
        )
    }

    #[test]
    fn only_the_right_side_moves_each_step() {
        use MigrationState::*;
        let cases = [
            (Pending, "b", Ready, true, true),
            (Pending, "b", Ready, false, false), // no incoming uri
            (Pending, "a", Ready, true, false),  // the source cannot be ready
            (Ready, "a", Migrating, false, true),
            (Ready, "b", Migrating, false, false),
            (Migrating, "a", Warming, false, true),
            (Warming, "b", Completed, false, true),
            (Warming, "a", Completed, false, false),
            (Warming, "a", Failed, false, false), // after switch-over only the destination can fail it
            (Warming, "b", Failed, false, true),
            (Completed, "b", Failed, false, false),
            (Pending, "c", Failed, false, false), // a stranger
        ];
        for (from, host, to, uri, ok) in cases {
            let (h, r) = report(host, to, uri);
            assert_eq!(
                check_transition(&m(from), &h, &r).is_ok(),
                ok,
                "{from:?} --{host}--> {to:?}"
            );
        }
    }
}
