//! Host maintenance mode: cordon a host, move its VMs away by live migration
//! with cache warm-up, keep it in maintenance, release it.
//!
//! The plan (which VM goes where) is made and checked whole before anything moves: if
//! one VM cannot be placed, the request is refused naming that VM and why, and nothing
//! changes. The drain itself is driven by [`drive`], a server task that moves one VM at
//! a time through the migration machinery and records per-VM progress in the session,
//! so a client can disconnect, watch, or abort. A server restart resumes the drain
//! (the session is in the store); the cordon is a field of the host record that agents'
//! re-registration preserves.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use model::api::{EnterMaintenance, Problem};
use model::{
    DesiredState, DrainItem, DrainItemState, Host, Maintenance, MaintenanceId, MaintenanceState,
    Migration, MigrationState, Name, Role, Vm,
};
use store::{Compare, StoreError, TxnOp};

use crate::extract::AppPath;
use crate::routes::hosts::{all_hosts, host_name};
use crate::routes::migrations;
use crate::{ApiError, AppJson, AppState, Caller};
use control::records::{get_json, keys, list_json, now_ms, to_bytes, CAS_ATTEMPTS};
use sched::usage;
use sched::{place, PlaceError, Usage};

/// Plans where each VM of `host` goes. Pure: `hosts` with fresh states, `vms` all VM
/// records. VMs being deleted are left alone (their record goes with them).
pub(crate) fn plan_drain(
    host: &Name,
    hosts: &[Host],
    vms: &[Vm],
    to: Option<&Name>,
) -> Result<Vec<DrainItem>, String> {
    if to == Some(host) {
        return Err(format!("to: {host} is the host going into maintenance"));
    }
    // The host being drained cannot receive; count every VM where it is now.
    let others: Vec<Host> = hosts.iter().filter(|h| &h.name != host).cloned().collect();
    let mut used: HashMap<Name, Usage> = usage(vms.iter());
    let mut items = Vec::new();
    let mut mine: Vec<&Vm> = vms
        .iter()
        .filter(|v| &v.host == host && v.desired != DesiredState::Deleted)
        .collect();
    // Biggest first: they are the hardest to fit.
    mine.sort_by(|a, b| (b.memory_mib, b.vcpus, &b.name).cmp(&(a.memory_mib, a.vcpus, &a.name)));
    for vm in mine {
        let target = place(&others, &used, vm.vcpus, vm.memory_mib, to).map_err(|e| {
            let why = match e {
                PlaceError::NoHostFits { .. } => format!("no other up host has room ({e})"),
                other => other.to_string(),
            };
            format!("vm {}: cannot be placed: {why}", vm.name)
        })?;
        let u = used.entry(target.clone()).or_default();
        u.vcpus = u.vcpus.saturating_add(u64::from(vm.vcpus));
        u.memory_mib = u.memory_mib.saturating_add(vm.memory_mib);
        items.push(DrainItem {
            vm: vm.id,
            vm_name: vm.name.clone(),
            to: target,
            live: vm.desired == DesiredState::Running,
            migration: None,
            state: DrainItemState::Pending,
            error: None,
        });
    }
    Ok(items)
}

/// Puts a host into maintenance: cordons it and drains it (202), or with `dry_run`
/// returns the plan without changing anything (200).
#[utoipa::path(post, path = "/v1/hosts/{name}/maintenance", operation_id = "enter_maintenance", tag = "maintenance", request_body = EnterMaintenance,
    params(("name" = String, Path, description = "host name")),
    responses(
        (status = 202, description = "draining", body = Maintenance),
        (status = 200, description = "dry run: the plan", body = Maintenance),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "a VM cannot be placed (named), or already in maintenance", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn enter(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(name): AppPath,
    AppJson(body): AppJson<EnterMaintenance>,
) -> Result<(StatusCode, Json<Maintenance>), ApiError> {
    caller.require(&[Role::Admin], "putting a host into maintenance")?;
    let name = host_name(&name)?;
    let (to, strategy) = body.validate()?;
    for _ in 0..CAS_ATTEMPTS {
        let Some((mut host, hrev)) = get_json::<Host>(state.store(), &keys::host(&name)).await?
        else {
            return Err(ApiError::NotFound {
                kind: "host",
                id: name.to_string(),
            });
        };
        if let Some(m) = host.maintenance {
            return Err(ApiError::Conflict(format!(
                "host {name} is already in maintenance (session {m})"
            )));
        }
        let hosts = all_hosts(&state).await?;
        let vms: Vec<Vm> = list_json::<Vm>(state.store(), keys::VMS)
            .await?
            .into_iter()
            .map(|(v, _)| v)
            .collect();
        let items = plan_drain(&name, &hosts, &vms, to.as_ref()).map_err(ApiError::Conflict)?;
        let now = now_ms();
        let session = Maintenance {
            id: MaintenanceId::new_random(),
            host: name.clone(),
            state: MaintenanceState::Entering,
            items,
            strategy: strategy.clone(),
            error: None,
            created_at: now,
            updated_at: now,
        };
        if body.dry_run {
            return Ok((StatusCode::OK, Json(session)));
        }
        host.maintenance = Some(session.id);
        let res = state
            .store()
            .txn(
                vec![Compare::ModRevision {
                    key: keys::host(&name),
                    expect: Some(hrev),
                }],
                vec![
                    TxnOp::Put {
                        key: keys::host(&name),
                        value: to_bytes(&host)?,
                    },
                    TxnOp::Put {
                        key: keys::maintenance(session.id),
                        value: to_bytes(&session)?,
                    },
                ],
            )
            .await;
        match res {
            Ok(_) => {
                tracing::info!(host = %name, vms = session.items.len(), "maintenance: cordoned, draining");
                return Ok((StatusCode::ACCEPTED, Json(session)));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict(format!(
        "host {name} is being updated concurrently, retry"
    )))
}

/// Every maintenance session, newest first.
#[utoipa::path(get, path = "/v1/maintenance", operation_id = "list_maintenance", tag = "maintenance",
    responses((status = 200, body = Vec<Maintenance>)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Maintenance>>, ApiError> {
    caller.require(&[Role::Admin], "listing maintenance sessions")?;
    let mut out: Vec<Maintenance> = list_json::<Maintenance>(state.store(), keys::MAINTENANCE)
        .await?
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.created_at));
    Ok(Json(out))
}

async fn load(state: &AppState, id: &str) -> Result<(Maintenance, store::Revision), ApiError> {
    let not_found = || ApiError::NotFound {
        kind: "maintenance session",
        id: id.to_owned(),
    };
    let mid: MaintenanceId = id.parse().map_err(|_| not_found())?;
    get_json::<Maintenance>(state.store(), &keys::maintenance(mid))
        .await?
        .ok_or_else(not_found)
}

/// One maintenance session.
#[utoipa::path(get, path = "/v1/maintenance/{id}", operation_id = "get_maintenance", tag = "maintenance",
    params(("id" = String, Path, description = "session id")),
    responses((status = 200, body = Maintenance), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<Json<Maintenance>, ApiError> {
    caller.require(&[Role::Admin], "reading a maintenance session")?;
    Ok(Json(load(&state, &id).await?.0))
}

/// Stops a drain: no further VM starts moving (one in flight finishes), the host is
/// uncordoned, and the session's items say what stays where.
#[utoipa::path(post, path = "/v1/maintenance/{id}/abort", operation_id = "abort_maintenance", tag = "maintenance",
    params(("id" = String, Path, description = "session id")),
    responses((status = 200, body = Maintenance), (status = 409, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn abort(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<Json<Maintenance>, ApiError> {
    caller.require(&[Role::Admin], "aborting a maintenance session")?;
    let (m, _) = load(&state, &id).await?;
    if !matches!(
        m.state,
        MaintenanceState::Entering | MaintenanceState::Draining
    ) {
        return Err(ApiError::Conflict(format!(
            "maintenance {} is {}: only a drain can be aborted (use exit to release)",
            m.id,
            m.state.as_str()
        )));
    }
    finish(
        &state,
        m.id,
        MaintenanceState::Aborted,
        Some("aborted on request".into()),
    )
    .await
    .map(Json)
}

/// Releases a host from maintenance.
#[utoipa::path(post, path = "/v1/hosts/{name}/maintenance/exit", operation_id = "exit_maintenance", tag = "maintenance",
    params(("name" = String, Path, description = "host name")),
    responses((status = 200, body = Maintenance), (status = 409, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn exit(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(name): AppPath,
) -> Result<Json<Maintenance>, ApiError> {
    caller.require(&[Role::Admin], "releasing a host from maintenance")?;
    let name = host_name(&name)?;
    let host = get_json::<Host>(state.store(), &keys::host(&name))
        .await?
        .ok_or_else(|| ApiError::NotFound {
            kind: "host",
            id: name.to_string(),
        })?
        .0;
    let Some(mid) = host.maintenance else {
        return Err(ApiError::Conflict(format!(
            "host {name} is not in maintenance"
        )));
    };
    let (m, _) = load(&state, &mid.to_string()).await?;
    if m.state != MaintenanceState::InMaintenance {
        return Err(ApiError::Conflict(format!(
            "host {name} is still {}: abort the drain first",
            m.state.as_str()
        )));
    }
    update(&state, mid, |m| {
        m.state = MaintenanceState::Releasing;
    })
    .await?;
    finish(&state, mid, MaintenanceState::Released, None)
        .await
        .map(Json)
}

/// Ends a session in `end` and uncordons its host, in one transaction.
async fn finish(
    state: &AppState,
    id: MaintenanceId,
    end: MaintenanceState,
    error: Option<String>,
) -> Result<Maintenance, ApiError> {
    for _ in 0..CAS_ATTEMPTS {
        let (mut m, mrev) = load(state, &id.to_string()).await?;
        let (mut host, hrev) = get_json::<Host>(state.store(), &keys::host(&m.host))
            .await?
            .ok_or_else(|| ApiError::invariant(format!("maintenance {id} of missing host")))?;
        m.state = end;
        m.error = error.clone();
        m.updated_at = now_ms();
        if host.maintenance == Some(id) {
            host.maintenance = None;
        }
        let res = state
            .store()
            .txn(
                vec![
                    Compare::ModRevision {
                        key: keys::maintenance(id),
                        expect: Some(mrev),
                    },
                    Compare::ModRevision {
                        key: keys::host(&m.host),
                        expect: Some(hrev),
                    },
                ],
                vec![
                    TxnOp::Put {
                        key: keys::maintenance(id),
                        value: to_bytes(&m)?,
                    },
                    TxnOp::Put {
                        key: keys::host(&m.host),
                        value: to_bytes(&host)?,
                    },
                ],
            )
            .await;
        match res {
            Ok(_) => {
                tracing::info!(host = %m.host, state = m.state.as_str(), "maintenance ended");
                return Ok(m);
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict(format!(
        "maintenance {id} is being updated concurrently, retry"
    )))
}

/// Read-modify-write of a session.
async fn update(
    state: &AppState,
    id: MaintenanceId,
    f: impl Fn(&mut Maintenance),
) -> Result<Maintenance, ApiError> {
    for _ in 0..CAS_ATTEMPTS {
        let (mut m, rev) = load(state, &id.to_string()).await?;
        f(&mut m);
        m.updated_at = now_ms();
        match state
            .store()
            .cas(&keys::maintenance(id), Some(rev), to_bytes(&m)?)
            .await
        {
            Ok(_) => return Ok(m),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict(format!(
        "maintenance {id} is being updated concurrently, retry"
    )))
}

/// The drain driver: runs for the server's life, one step per active session per tick.
pub(crate) async fn drive(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let sessions = match list_json::<Maintenance>(state.store(), keys::MAINTENANCE).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "maintenance driver cannot list sessions");
                continue;
            }
        };
        for (m, _) in sessions {
            if matches!(
                m.state,
                MaintenanceState::Entering | MaintenanceState::Draining
            ) {
                if let Err(e) = step(&state, m).await {
                    tracing::warn!(error = %e, "maintenance step failed; retrying");
                }
            }
        }
    }
}

/// One step of a drain: follow the VM in flight, or start the next one.
async fn step(state: &AppState, m: Maintenance) -> Result<(), ApiError> {
    let id = m.id;
    if m.state == MaintenanceState::Entering {
        update(state, id, |m| m.state = MaintenanceState::Draining).await?;
    }
    if let Some((i, item)) = m
        .items
        .iter()
        .enumerate()
        .find(|(_, it)| it.state == DrainItemState::Migrating)
    {
        let Some(mid) = item.migration else {
            return Ok(());
        };
        let mig = get_json::<Migration>(state.store(), &keys::migration(mid)).await?;
        let (st, err) = match mig.map(|(x, _)| x) {
            // Switched over is enough for the host: the VM runs elsewhere; the
            // destination finishes warming its cache on its own.
            Some(x) if matches!(x.state, MigrationState::Warming | MigrationState::Completed) => {
                (DrainItemState::Moved, None)
            }
            Some(x) if x.state == MigrationState::Failed => (DrainItemState::Failed, x.error),
            Some(_) => return Ok(()),
            None => (
                DrainItemState::Failed,
                Some("migration record vanished".into()),
            ),
        };
        let err2 = err.clone();
        let m = update(state, id, move |m| {
            if let Some(it) = m.items.get_mut(i) {
                it.state = st;
                it.error = err2.clone();
            }
        })
        .await?;
        if st == DrainItemState::Failed {
            let why = format!(
                "vm {} could not move: {}; VMs already moved stay on their new hosts",
                item.vm_name,
                err.unwrap_or_default()
            );
            finish(state, m.id, MaintenanceState::Failed, Some(why)).await?;
        }
        return Ok(());
    }
    let Some((i, item)) = m
        .items
        .iter()
        .enumerate()
        .find(|(_, it)| it.state == DrainItemState::Pending)
    else {
        update(state, id, |m| m.state = MaintenanceState::InMaintenance).await?;
        tracing::info!(host = %m.host, "maintenance: host empty");
        return Ok(());
    };
    let Some((vm, rev)) = get_json::<Vm>(state.store(), &keys::vm(item.vm)).await? else {
        // Deleted meanwhile: nothing to move.
        update(state, id, move |m| {
            if let Some(it) = m.items.get_mut(i) {
                it.state = DrainItemState::Moved;
            }
        })
        .await?;
        return Ok(());
    };
    if vm.host != m.host {
        update(state, id, move |m| {
            if let Some(it) = m.items.get_mut(i) {
                it.state = DrainItemState::Moved;
            }
        })
        .await?;
        return Ok(());
    }
    if vm.desired == DesiredState::Running {
        match migrations::try_start(state, vm, rev, &item.to, &m.strategy).await {
            Ok(Some(mig)) => {
                update(state, id, move |m| {
                    if let Some(it) = m.items.get_mut(i) {
                        it.state = DrainItemState::Migrating;
                        it.migration = Some(mig.id);
                    }
                })
                .await?;
            }
            Ok(None) => {} // the VM changed under us: next tick
            Err(e) => {
                let why = format!(
                    "vm {} could not move: {e}; VMs already moved stay on their new hosts",
                    item.vm_name
                );
                let e2 = e.to_string();
                update(state, id, move |m| {
                    if let Some(it) = m.items.get_mut(i) {
                        it.state = DrainItemState::Failed;
                        it.error = Some(e2.clone());
                    }
                })
                .await?;
                finish(state, id, MaintenanceState::Failed, Some(why)).await?;
            }
        }
    } else {
        // A stopped VM moves cold: its disk is in the shared origin, so re-assigning
        // it is enough; the old host's agent drops its cache, the new one starts it
        // when asked.
        let mut moved = vm;
        moved.host = item.to.clone();
        match state
            .store()
            .cas(&keys::vm(moved.id), Some(rev), to_bytes(&moved)?)
            .await
        {
            Ok(_) => {
                update(state, id, move |m| {
                    if let Some(it) = m.items.get_mut(i) {
                        it.state = DrainItemState::Moved;
                    }
                })
                .await?;
            }
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{HostId, HostState, ImageId, ObservedState, TenantId, VmId};

    fn n(s: &str) -> Name {
        model::validate_name("n", s).unwrap()
    }

    fn host(name: &str, mem: u64) -> Host {
        Host {
            id: HostId::new_random(),
            name: n(name),
            cpus: 8,
            vcpus: 8,
            memory_mib: mem,
            disk_gib: 10,
            drivers: vec![],
            agent_url: None,
            nbd_addr: Some("127.0.0.1:1".into()),
            link_addr: None,
            uplink_ip: None,
            maintenance: None,
            last_heartbeat: 0,
            state: HostState::Up,
        }
    }

    fn vm(name: &str, on: &str, mem: u64) -> Vm {
        Vm {
            id: VmId::new_random(),
            tenant: TenantId::new_random(),
            name: n(name),
            image: ImageId::new_random(),
            vcpus: 1,
            memory_mib: mem,
            host: n(on),
            desired: DesiredState::Running,
            observed: ObservedState::Running,
            error: None,
            created_at: 0,
            migration: None,
            redundancy: None,
            nics: Vec::new(),
            kernel_args: None,
        }
    }

    #[test]
    fn every_vm_gets_a_target_that_fits_counting_earlier_moves() {
        let hosts = [host("a", 4096), host("b", 1024), host("c", 1024)];
        let vms = [vm("x", "a", 768), vm("y", "a", 768), vm("z", "b", 128)];
        let plan = plan_drain(&n("a"), &hosts, &vms, None).unwrap();
        assert_eq!(plan.len(), 2);
        // b has 896 free, c 1024: the first goes to c, the second cannot join it.
        let targets: Vec<&str> = plan.iter().map(|i| i.to.as_str()).collect();
        assert!(
            targets.contains(&"b") && targets.contains(&"c"),
            "{targets:?}"
        );
    }

    #[test]
    fn an_unplaceable_vm_is_named_and_nothing_is_planned() {
        let hosts = [host("a", 4096), host("b", 1024)];
        let vms = [vm("small", "a", 256), vm("huge", "a", 2048)];
        let err = plan_drain(&n("a"), &hosts, &vms, None).unwrap_err();
        assert!(err.starts_with("vm huge: cannot be placed"), "{err}");
    }

    #[test]
    fn the_host_itself_and_cordoned_hosts_are_not_targets() {
        let mut b = host("b", 4096);
        b.maintenance = Some(MaintenanceId::new_random());
        let hosts = [host("a", 4096), b];
        let vms = [vm("x", "a", 256)];
        assert!(plan_drain(&n("a"), &hosts, &vms, Some(&n("a")))
            .unwrap_err()
            .starts_with("to:"));
        let err = plan_drain(&n("a"), &hosts, &vms, Some(&n("b"))).unwrap_err();
        assert!(err.contains("in maintenance"), "{err}");
        assert!(plan_drain(&n("a"), &hosts, &vms, None).is_err());
    }
}
