//! Host maintenance mode: cordon a host, move its VMs away by live migration with cache
//! warm-up, keep it in maintenance, release it.
//!
//! The plan (which VM goes where) is made and checked whole before anything moves: if one
//! VM cannot be placed, the request is refused naming that VM and why, and nothing
//! changes. The drain itself is a persisted session moved along by
//! [`Control::drain_step`], which the operation driver calls: one VM at a time through
//! the migration machinery, per-VM progress recorded in the session, so that a client can
//! disconnect, watch, or abort, and a restarted (or newly elected) server goes on from
//! the session's last recorded step. The cordon is a field of the host record that
//! agents' re-registration preserves.
//!
//! Reservations: the accepted plan holds each VM's destination in the ledger (see
//! [`crate::ledger`]) until that VM's migration starts or the drain ends, so a VM created
//! during the drain cannot take the room planned for a drained VM.

use std::collections::HashMap;

use model::{
    DesiredState, DrainItem, DrainItemState, Host, Maintenance, MaintenanceId, MaintenanceState,
    Migration, MigrationState, Name, Vm,
};
use sched::{place, PlaceError, Usage};
use store::{Compare, Revision, StoreError, TxnOp};

use crate::records::{get_json, keys, list_json, now_ms, to_bytes, update_cas, CAS_ATTEMPTS};
use crate::{Control, ControlError};

/// Why a drain cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrainPlanError {
    /// The target named is the host going into maintenance.
    #[error("to: {host} is the host going into maintenance")]
    TargetIsHost {
        /// The host.
        host: Name,
    },
    /// A VM maps resource tables of the host: it cannot leave it (live, QEMU blocks
    /// the migration of ivshmem peers; cold, its tables stay here). Nothing is planned.
    #[error("vm {vm}: cannot leave host {host}: it maps resource tables of the host ({}), which do not move, and QEMU does not migrate ivshmem peers live; stop and delete it first", .tables.join(", "))]
    PinnedByTables {
        /// The VM.
        vm: Name,
        /// The host.
        host: Name,
        /// The tables it names.
        tables: Vec<String>,
    },
    /// One VM fits nowhere; nothing is planned.
    #[error("vm {vm}: cannot be placed: {}", match .reason {
        PlaceError::NoHostFits { .. } => format!("no other up host has room ({})", .reason),
        other => other.to_string(),
    })]
    Unplaceable {
        /// The VM.
        vm: Name,
        /// Why.
        reason: PlaceError,
    },
}

/// Why a maintenance request is refused.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    /// The host already has a session.
    #[error("host {host} is already in maintenance (session {session})")]
    AlreadyInMaintenance {
        /// The host.
        host: Name,
        /// Its session.
        session: MaintenanceId,
    },
    /// The drain cannot be planned.
    #[error(transparent)]
    Plan(#[from] DrainPlanError),
    /// Only a drain (entering or draining) can be aborted.
    #[error("maintenance {id} is {}: only a drain can be aborted (use exit to release)", .state.as_str())]
    NotDraining {
        /// The session.
        id: MaintenanceId,
        /// Its state.
        state: MaintenanceState,
    },
    /// Exit of a host that is not in maintenance.
    #[error("host {host} is not in maintenance")]
    NotInMaintenance {
        /// The host.
        host: Name,
    },
    /// Exit while the drain still runs.
    #[error("host {host} is still {}: abort the drain first", .state.as_str())]
    StillDraining {
        /// The host.
        host: Name,
        /// The session's state.
        state: MaintenanceState,
    },
    /// The store, a lost race, or an unknown host or session.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// Plans where each VM of `host` goes. Pure: `hosts` with fresh states, `vms` all VM
/// records, `used` the ledger's reservations per host. VMs being deleted are left alone
/// (their record goes with them).
pub fn plan_drain(
    host: &Name,
    hosts: &[Host],
    vms: &[Vm],
    used: &HashMap<Name, Usage>,
    to: Option<&Name>,
) -> Result<Vec<DrainItem>, DrainPlanError> {
    if to == Some(host) {
        return Err(DrainPlanError::TargetIsHost { host: host.clone() });
    }
    // The host being drained cannot receive.
    let others: Vec<Host> = hosts.iter().filter(|h| &h.name != host).cloned().collect();
    let mut used = used.clone();
    let mut items = Vec::new();
    let mut mine: Vec<&Vm> = vms
        .iter()
        .filter(|v| &v.host == host && v.desired != DesiredState::Deleted)
        .collect();
    // A VM pinned by its tables refuses the whole drain, before any placement.
    mine.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(vm) = mine.iter().find(|v| !v.resource_tables.is_empty()) {
        return Err(DrainPlanError::PinnedByTables {
            vm: vm.name.clone(),
            host: host.clone(),
            tables: vm.resource_tables.iter().map(Name::to_string).collect(),
        });
    }
    // Biggest first: they are the hardest to fit.
    mine.sort_by(|a, b| (b.memory_mib, b.vcpus, &b.name).cmp(&(a.memory_mib, a.vcpus, &a.name)));
    for vm in mine {
        let target = place(&others, &used, vm.vcpus, vm.memory_mib, to).map_err(|reason| {
            DrainPlanError::Unplaceable {
                vm: vm.name.clone(),
                reason,
            }
        })?;
        used.entry(target.clone())
            .or_default()
            .add(vm.vcpus, vm.memory_mib);
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

fn host_not_found(name: &Name) -> ControlError {
    ControlError::NotFound {
        kind: "host",
        id: name.to_string(),
    }
}

impl Control {
    /// Puts `name` into maintenance: cordons it and records the drain session, which the
    /// operation driver then carries out. With `dry_run`, only plans (nothing changes).
    pub async fn enter_maintenance(
        &self,
        name: &Name,
        to: Option<&Name>,
        strategy: &str,
        dry_run: bool,
    ) -> Result<Maintenance, MaintenanceError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some((mut host, hrev)) = get_json::<Host>(self.store(), &keys::host(name)).await?
            else {
                return Err(host_not_found(name).into());
            };
            if let Some(session) = host.maintenance {
                return Err(MaintenanceError::AlreadyInMaintenance {
                    host: name.clone(),
                    session,
                });
            }
            let ledger = self.ledger().await?;
            let hosts = self.hosts().await?;
            let vms: Vec<Vm> = ledger.vms.iter().map(|(v, _)| v.clone()).collect();
            let items = plan_drain(name, &hosts, &vms, &ledger.hosts, to)?;
            let now = now_ms();
            let session = Maintenance {
                id: MaintenanceId::new_random(),
                host: name.clone(),
                state: MaintenanceState::Entering,
                items,
                strategy: strategy.to_owned(),
                error: None,
                created_at: now,
                updated_at: now,
            };
            if dry_run {
                return Ok(session);
            }
            host.maintenance = Some(session.id);
            // The plan's destinations are held from now (the ledger counts every pending
            // item): their counters are compared and bumped with the session record, so a
            // VM created meanwhile on a destination makes one of the two re-plan.
            let (reserve_compares, reserve_ops) =
                ledger.reserve(session.items.iter().map(|i| &i.to), [])?;
            let res = self
                .store()
                .txn(
                    std::iter::once(Compare::ModRevision {
                        key: keys::host(name),
                        expect: Some(hrev),
                    })
                    .chain(reserve_compares)
                    .collect(),
                    [
                        TxnOp::Put {
                            key: keys::host(name),
                            value: to_bytes(&host)?,
                        },
                        TxnOp::Put {
                            key: keys::maintenance(session.id),
                            value: to_bytes(&session)?,
                        },
                    ]
                    .into_iter()
                    .chain(reserve_ops)
                    .collect(),
                )
                .await;
            match res {
                Ok(_) => {
                    tracing::info!(host = %name, vms = session.items.len(), "maintenance: cordoned, draining");
                    return Ok(session);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(ControlError::from(e).into()),
            }
        }
        Err(ControlError::Contended {
            what: format!("host {name}"),
        }
        .into())
    }

    /// Every maintenance session, newest first.
    pub async fn maintenance_sessions(&self) -> Result<Vec<Maintenance>, ControlError> {
        let mut out: Vec<Maintenance> = list_json::<Maintenance>(self.store(), keys::MAINTENANCE)
            .await?
            .into_iter()
            .map(|(m, _)| m)
            .collect();
        out.sort_by_key(|m| std::cmp::Reverse(m.created_at));
        Ok(out)
    }

    /// One maintenance session by id.
    pub async fn maintenance_session(
        &self,
        id: &str,
    ) -> Result<(Maintenance, Revision), ControlError> {
        let not_found = || ControlError::NotFound {
            kind: "maintenance session",
            id: id.to_owned(),
        };
        let mid: MaintenanceId = id.parse().map_err(|_| not_found())?;
        get_json::<Maintenance>(self.store(), &keys::maintenance(mid))
            .await?
            .ok_or_else(not_found)
    }

    /// Stops a drain: no further VM starts moving (one in flight finishes), the host is
    /// uncordoned, and the session's items say what stays where.
    pub async fn abort_maintenance(&self, id: &str) -> Result<Maintenance, MaintenanceError> {
        let (m, _) = self.maintenance_session(id).await?;
        if !matches!(
            m.state,
            MaintenanceState::Entering | MaintenanceState::Draining
        ) {
            return Err(MaintenanceError::NotDraining {
                id: m.id,
                state: m.state,
            });
        }
        Ok(self
            .finish_maintenance(
                m.id,
                MaintenanceState::Aborted,
                Some("aborted on request".into()),
            )
            .await?)
    }

    /// Releases a host from maintenance.
    pub async fn exit_maintenance(&self, name: &Name) -> Result<Maintenance, MaintenanceError> {
        let host = get_json::<Host>(self.store(), &keys::host(name))
            .await?
            .ok_or_else(|| host_not_found(name))?
            .0;
        let Some(mid) = host.maintenance else {
            return Err(MaintenanceError::NotInMaintenance { host: name.clone() });
        };
        let (m, _) = self.maintenance_session(&mid.to_string()).await?;
        if m.state != MaintenanceState::InMaintenance {
            return Err(MaintenanceError::StillDraining {
                host: name.clone(),
                state: m.state,
            });
        }
        self.update_maintenance(mid, |m| m.state = MaintenanceState::Releasing)
            .await?;
        Ok(self
            .finish_maintenance(mid, MaintenanceState::Released, None)
            .await?)
    }

    /// Ends a session in `end` and uncordons its host, in one transaction.
    async fn finish_maintenance(
        &self,
        id: MaintenanceId,
        end: MaintenanceState,
        error: Option<String>,
    ) -> Result<Maintenance, ControlError> {
        for _ in 0..CAS_ATTEMPTS {
            let (mut m, mrev) = self.maintenance_session(&id.to_string()).await?;
            let (mut host, hrev) = get_json::<Host>(self.store(), &keys::host(&m.host))
                .await?
                .ok_or_else(|| {
                    ControlError::Invariant(format!("maintenance {id} of missing host"))
                })?;
            m.state = end;
            m.error = error.clone();
            m.updated_at = now_ms();
            if host.maintenance == Some(id) {
                host.maintenance = None;
            }
            let res = self
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
        Err(ControlError::Contended {
            what: format!("maintenance {id}"),
        })
    }

    /// Read-modify-write of a session.
    async fn update_maintenance(
        &self,
        id: MaintenanceId,
        mut f: impl FnMut(&mut Maintenance),
    ) -> Result<Maintenance, ControlError> {
        update_cas(
            self.store(),
            &keys::maintenance(id),
            || format!("maintenance {id}"),
            || ControlError::NotFound {
                kind: "maintenance session",
                id: id.to_string(),
            },
            |m: &mut Maintenance| {
                f(m);
                m.updated_at = now_ms();
                Ok(())
            },
        )
        .await
    }

    /// Sets the state (and error) of item `i` of session `id`.
    async fn set_item(
        &self,
        id: MaintenanceId,
        i: usize,
        state: DrainItemState,
        error: Option<String>,
    ) -> Result<Maintenance, ControlError> {
        self.update_maintenance(id, |m| {
            if let Some(it) = m.items.get_mut(i) {
                it.state = state;
                it.error = error.clone();
            }
        })
        .await
    }

    /// The sessions whose drain is not finished: what the driver has to move along.
    pub async fn active_drains(&self) -> Result<Vec<Maintenance>, ControlError> {
        Ok(self
            .maintenance_sessions()
            .await?
            .into_iter()
            .filter(|m| {
                matches!(
                    m.state,
                    MaintenanceState::Entering | MaintenanceState::Draining
                )
            })
            .collect())
    }

    /// One step of a drain: follow the VM in flight, or start the next one. Every
    /// decision is recorded in the session before the next step reads it, so a step
    /// interrupted anywhere is taken again from the record.
    pub async fn drain_step(&self, m: Maintenance) -> Result<(), ControlError> {
        let id = m.id;
        if m.state == MaintenanceState::Entering {
            self.update_maintenance(id, |m| m.state = MaintenanceState::Draining)
                .await?;
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
            let mig = get_json::<Migration>(self.store(), &keys::migration(mid)).await?;
            let (st, err) = match mig.map(|(x, _)| x) {
                // Switched over is enough for the host: the VM runs elsewhere; the
                // destination finishes warming its cache on its own.
                Some(x)
                    if matches!(x.state, MigrationState::Warming | MigrationState::Completed) =>
                {
                    (DrainItemState::Moved, None)
                }
                Some(x) if x.state == MigrationState::Failed => (DrainItemState::Failed, x.error),
                Some(_) => return Ok(()),
                None => (
                    DrainItemState::Failed,
                    Some("migration record vanished".into()),
                ),
            };
            let m = self.set_item(id, i, st, err.clone()).await?;
            if st == DrainItemState::Failed {
                let why = format!(
                    "vm {} could not move: {}; VMs already moved stay on their new hosts",
                    item.vm_name,
                    err.unwrap_or_default()
                );
                self.finish_maintenance(m.id, MaintenanceState::Failed, Some(why))
                    .await?;
            }
            return Ok(());
        }
        let Some((i, item)) = m
            .items
            .iter()
            .enumerate()
            .find(|(_, it)| it.state == DrainItemState::Pending)
        else {
            self.update_maintenance(id, |m| m.state = MaintenanceState::InMaintenance)
                .await?;
            tracing::info!(host = %m.host, "maintenance: host empty");
            return Ok(());
        };
        let Some((vm, rev)) = get_json::<Vm>(self.store(), &keys::vm(item.vm)).await? else {
            // Deleted meanwhile: nothing to move.
            self.set_item(id, i, DrainItemState::Moved, None).await?;
            return Ok(());
        };
        if vm.host != m.host {
            self.set_item(id, i, DrainItemState::Moved, None).await?;
            return Ok(());
        }
        if vm.desired == DesiredState::Running {
            match self
                .try_start_migration(vm, rev, &item.to, &m.strategy, false)
                .await
            {
                Ok(Some(mig)) => {
                    self.update_maintenance(id, |m| {
                        if let Some(it) = m.items.get_mut(i) {
                            it.state = DrainItemState::Migrating;
                            it.migration = Some(mig.id);
                            it.error = None;
                        }
                    })
                    .await?;
                }
                Ok(None) => {} // the VM changed under us: next step
                Err(crate::MigrateStartError::Control(e)) => return Err(e),
                // A host that missed a heartbeat (its agent restarting, a store member
                // failing over) may be back in seconds: the item waits, saying why, and
                // the drain goes on when it is; an operator who knows better cancels.
                Err(e @ crate::MigrateStartError::SourceDown { .. }) => {
                    let why = format!("waiting: {e}");
                    if item.error.as_deref() != Some(why.as_str()) {
                        tracing::warn!(vm = %item.vm_name, "drain waits: {e}");
                        self.set_item(id, i, DrainItemState::Pending, Some(why))
                            .await?;
                    }
                }
                Err(e) => {
                    let why = format!(
                        "vm {} could not move: {e}; VMs already moved stay on their new hosts",
                        item.vm_name
                    );
                    self.set_item(id, i, DrainItemState::Failed, Some(e.to_string()))
                        .await?;
                    self.finish_maintenance(id, MaintenanceState::Failed, Some(why))
                        .await?;
                }
            }
        } else if !vm.resource_tables.is_empty() {
            // Planning refused such a VM; one that gained tables since cannot move.
            let why = format!(
                "vm {} could not move: it maps resource tables of host {}; VMs already moved \
                 stay on their new hosts",
                item.vm_name, m.host
            );
            self.set_item(id, i, DrainItemState::Failed, Some(why.clone()))
                .await?;
            self.finish_maintenance(id, MaintenanceState::Failed, Some(why))
                .await?;
        } else {
            // A stopped VM moves cold: its disk is in the shared origin, so re-assigning
            // it is enough; the old host's agent drops its cache, the new one starts it
            // when asked.
            let mut moved = vm;
            moved.host = item.to.clone();
            match self
                .store()
                .cas(&keys::vm(moved.id), Some(rev), to_bytes(&moved)?)
                .await
            {
                Ok(_) => {
                    self.set_item(id, i, DrainItemState::Moved, None).await?;
                }
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
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
            trace: None,
            resource_tables: Vec::new(),
        }
    }

    #[test]
    fn every_vm_gets_a_target_that_fits_counting_earlier_moves() {
        let hosts = [host("a", 4096), host("b", 1024), host("c", 1024)];
        let vms = [vm("x", "a", 768), vm("y", "a", 768), vm("z", "b", 128)];
        let plan = plan_drain(&n("a"), &hosts, &vms, &sched::usage(vms.iter()), None).unwrap();
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
        let err = plan_drain(&n("a"), &hosts, &vms, &sched::usage(vms.iter()), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("vm huge: cannot be placed: no other up host has room"),
            "{err}"
        );
    }

    #[test]
    fn the_host_itself_and_cordoned_hosts_are_not_targets() {
        let mut b = host("b", 4096);
        b.maintenance = Some(MaintenanceId::new_random());
        let hosts = [host("a", 4096), b];
        let vms = [vm("x", "a", 256)];
        assert_eq!(
            plan_drain(
                &n("a"),
                &hosts,
                &vms,
                &sched::usage(vms.iter()),
                Some(&n("a"))
            )
            .unwrap_err(),
            DrainPlanError::TargetIsHost { host: n("a") }
        );
        let err = plan_drain(
            &n("a"),
            &hosts,
            &vms,
            &sched::usage(vms.iter()),
            Some(&n("b")),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("in maintenance"), "{err}");
        assert!(plan_drain(&n("a"), &hosts, &vms, &sched::usage(vms.iter()), None).is_err());
    }
}
