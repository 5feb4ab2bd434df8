//! Live migrations: started by a user or a drain, moved along by the two agents.
//!
//! The control plane is only the meeting point: it checks that each report is a legal
//! transition from the right host, records it, and flips the VM's host at switch-over in
//! the same transaction as the migration record, so that no reader ever sees a VM on the
//! destination with a migration not yet switched (or the reverse).

use model::api::MigrationReport;
use model::{
    DesiredState, HostState, Migration, MigrationId, MigrationState, Name, ObservedState, Vm,
};
use sched::{place, PlaceError};
use store::{Compare, Revision, StoreError, TxnOp};

use crate::records::{get_json, keys, list_json, now_ms, to_bytes, CAS_ATTEMPTS};
use crate::{Control, ControlError, Scope};

/// Why a migration cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MigrateStartError {
    /// The VM has a migration in flight.
    #[error("vm {vm} is already migrating (migration {migration})")]
    AlreadyMigrating {
        /// The VM.
        vm: Name,
        /// Its migration.
        migration: MigrationId,
    },
    /// Only a running VM migrates live.
    #[error("vm {vm} must be running to migrate live; it is {} (desired {})", .observed.as_str(), .desired.as_str())]
    NotRunning {
        /// The VM.
        vm: Name,
        /// What its agent last saw.
        observed: ObservedState,
        /// What was asked of it.
        desired: DesiredState,
    },
    /// The VM maps resource tables of its host: QEMU blocks live migration of a VM
    /// with ivshmem devices in peer mode, and the tables do not leave their host.
    #[error("vm {vm} maps resource tables of host {host} ({}): it stays on that host (QEMU does not migrate ivshmem peers live, and a table does not move); stop or delete it instead", .tables.join(", "))]
    PinnedByTables {
        /// The VM.
        vm: Name,
        /// Its host.
        host: Name,
        /// The tables it names.
        tables: Vec<String>,
    },
    /// The destination is where the VM runs.
    #[error("to: vm {vm} already runs on {host}")]
    SameHost {
        /// The VM.
        vm: Name,
        /// Its host.
        host: Name,
    },
    /// The source serves no block cache to rebuild from.
    #[error("host {host} serves no block cache (no nbd_addr): cannot migrate from it")]
    SourceNoCache {
        /// The source host.
        host: Name,
    },
    /// The source host missed its heartbeats.
    #[error("host {host} is down")]
    SourceDown {
        /// The source host.
        host: Name,
    },
    /// No host has the destination's name.
    #[error("to: no host named {host}")]
    NoSuchDestination {
        /// The name asked for.
        host: Name,
    },
    /// The destination is down, cordoned, or has no room (the reason names it).
    #[error("{}", .0.to_string().replacen("host:", "to:", 1))]
    Destination(PlaceError),
    /// The destination serves no block cache to rebuild into.
    #[error("to: host {host} serves no block cache (no nbd_addr)")]
    DestinationNoCache {
        /// The destination.
        host: Name,
    },
    /// The store, or a lost race.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// Why an agent's report on a migration is refused.
#[derive(Debug, thiserror::Error)]
pub enum MigrationReportError {
    /// The reporting host is neither end of the migration.
    #[error("host: {host} is neither the source ({from}) nor the destination ({to})")]
    NotParticipant {
        /// Who reported.
        host: Name,
        /// The source.
        from: Name,
        /// The destination.
        to: Name,
    },
    /// That end may not make that move from the current state.
    #[error("state: the {side} may not move migration {migration} from {} to {}", .from.as_str(), .to.as_str())]
    IllegalTransition {
        /// `source` or `destination`.
        side: &'static str,
        /// The migration.
        migration: MigrationId,
        /// Its state.
        from: MigrationState,
        /// The state reported.
        to: MigrationState,
    },
    /// A progress report after `completed`, later than the server accepts them.
    #[error("state: migration {migration} completed {ago_ms} ms ago; progress after completion is accepted for {window_ms} ms")]
    ReportWindowClosed {
        /// The migration.
        migration: MigrationId,
        /// Since `finished_at`.
        ago_ms: u64,
        /// The window.
        window_ms: u64,
    },
    /// The store, a lost race, or an unknown migration.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// Checks that `host` may move `m` to `report.state`.
fn check_transition(
    m: &Migration,
    host: &Name,
    report: &MigrationReport,
) -> Result<(), MigrationReportError> {
    use MigrationState::*;
    let is_src = *host == m.from_host;
    let is_dst = *host == m.to_host;
    if !is_src && !is_dst {
        return Err(MigrationReportError::NotParticipant {
            host: host.clone(),
            from: m.from_host.clone(),
            to: m.to_host.clone(),
        });
    }
    let ok = match (m.state, report.state) {
        (from, Failed) => !from.is_final() && (is_dst || from != Warming),
        (Pending, Ready) => is_dst && report.incoming_uri.is_some(),
        (Ready, Migrating) => is_src,
        (Ready | Migrating, Warming) => is_src,
        (Warming, Warming) | (Warming, Completed) => is_dst,
        // After the rebuild: the destination's cache figures, for the hit-ratio curve
        // (`model::WARMUP_REPORT_MS`); nothing else of the record changes.
        (Completed, Completed) => is_dst && report.progress.is_some(),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(MigrationReportError::IllegalTransition {
            side: if is_src { "source" } else { "destination" },
            migration: m.id,
            from: m.state,
            to: report.state,
        })
    }
}

impl Control {
    /// A VM by id or name, as `scope` sees it.
    pub async fn vm(&self, scope: Scope, s: &str) -> Result<(Vm, Revision), ControlError> {
        crate::records::resolve_named::<model::VmId, Vm>(
            self.store(),
            scope,
            s,
            "vm",
            keys::VM_NAMES,
            keys::vm,
            |v| v.tenant,
        )
        .await
    }

    /// Starts a live migration of the VM `vm` (id or name, as `scope` sees it) to `to`,
    /// with cache pre-copy if `precopy`.
    pub async fn start_migration(
        &self,
        scope: Scope,
        vm: &str,
        to: &Name,
        strategy: &str,
        precopy: bool,
    ) -> Result<Migration, MigrateStartError> {
        for _ in 0..CAS_ATTEMPTS {
            let (record, rev) = self.vm(scope, vm).await?;
            if let Some(m) = self
                .try_start_migration(record, rev, to, strategy, precopy)
                .await?
            {
                return Ok(m);
            }
        }
        Err(ControlError::Contended {
            what: format!("vm {vm}"),
        }
        .into())
    }

    /// Starts a migration of `vm` (read at `rev`) to `to`: checks, then one transaction
    /// writing the migration and the VM's link to it. `None` when the VM changed
    /// meanwhile (the caller re-reads and retries).
    pub(crate) async fn try_start_migration(
        &self,
        mut vm: Vm,
        rev: Revision,
        to: &Name,
        strategy: &str,
        precopy: bool,
    ) -> Result<Option<Migration>, MigrateStartError> {
        if let Some(migration) = vm.migration {
            return Err(MigrateStartError::AlreadyMigrating {
                vm: vm.name,
                migration,
            });
        }
        if !vm.resource_tables.is_empty() {
            return Err(MigrateStartError::PinnedByTables {
                tables: vm.resource_tables.iter().map(Name::to_string).collect(),
                vm: vm.name,
                host: vm.host,
            });
        }
        if vm.desired != DesiredState::Running || vm.observed != ObservedState::Running {
            return Err(MigrateStartError::NotRunning {
                vm: vm.name,
                observed: vm.observed,
                desired: vm.desired,
            });
        }
        if vm.host == *to {
            return Err(MigrateStartError::SameHost {
                vm: vm.name,
                host: vm.host,
            });
        }
        let hosts = self.hosts().await?;
        let source = hosts.iter().find(|h| h.name == vm.host);
        let peer_nbd = source.and_then(|h| h.nbd_addr.clone()).ok_or_else(|| {
            MigrateStartError::SourceNoCache {
                host: vm.host.clone(),
            }
        })?;
        if source.is_some_and(|h| h.state != HostState::Up) {
            return Err(MigrateStartError::SourceDown { host: vm.host });
        }
        // The destination's room is reserved from now until the migration ends: the
        // ledger counts it there, and its counter is bumped in the transaction below.
        // A drain's hold for this VM ends in the transaction below (the VM gains its
        // migration), so it does not count against the VM's own move.
        let ledger = self.ledger().await?;
        let used = ledger.hosts_without_hold_of(vm.id);
        place(&hosts, &used, vm.vcpus, vm.memory_mib, Some(to)).map_err(|e| match e {
            PlaceError::NoSuchHost(host) => MigrateStartError::NoSuchDestination { host },
            other => MigrateStartError::Destination(other),
        })?;
        if !hosts.iter().any(|h| h.name == *to && h.nbd_addr.is_some()) {
            return Err(MigrateStartError::DestinationNoCache { host: to.clone() });
        }
        let m = Migration {
            id: MigrationId::new_random(),
            vm: vm.id,
            tenant: vm.tenant,
            vm_name: vm.name.clone(),
            from_host: vm.host.clone(),
            to_host: to.clone(),
            strategy: strategy.to_owned(),
            precopy,
            dirty: None,
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
        let (reserve_compares, reserve_ops) = ledger.reserve([to], [])?;
        let res = self
            .store()
            .txn(
                std::iter::once(Compare::ModRevision {
                    key: keys::vm(vm.id),
                    expect: Some(rev),
                })
                .chain(reserve_compares)
                .collect(),
                [
                    TxnOp::Put {
                        key: keys::vm(vm.id),
                        value: to_bytes(&vm)?,
                    },
                    TxnOp::Put {
                        key: keys::migration(m.id),
                        value: to_bytes(&m)?,
                    },
                ]
                .into_iter()
                .chain(reserve_ops)
                .collect(),
            )
            .await;
        match res {
            Ok(_) => {
                tracing::info!(vm = %vm.name, from = %m.from_host, to = %m.to_host, strategy = %m.strategy, "migration requested");
                Ok(Some(m))
            }
            Err(StoreError::Conflict { .. }) => Ok(None),
            Err(e) => Err(ControlError::from(e).into()),
        }
    }

    /// The migrations `scope` sees, newest first.
    pub async fn migrations(&self, scope: Scope) -> Result<Vec<Migration>, ControlError> {
        let mut out: Vec<Migration> = list_json::<Migration>(self.store(), keys::MIGRATIONS)
            .await?
            .into_iter()
            .map(|(m, _)| m)
            .filter(|m| scope.sees(m.tenant))
            .collect();
        out.sort_by_key(|m| std::cmp::Reverse(m.created_at));
        Ok(out)
    }

    /// One migration by id, as `scope` sees it.
    pub async fn migration(
        &self,
        scope: Scope,
        id: &str,
    ) -> Result<(Migration, Revision), ControlError> {
        let not_found = || ControlError::NotFound {
            kind: "migration",
            id: id.to_owned(),
        };
        let mid: MigrationId = id.parse().map_err(|_| not_found())?;
        match get_json::<Migration>(self.store(), &keys::migration(mid)).await? {
            Some((m, rev)) if scope.sees(m.tenant) => Ok((m, rev)),
            _ => Err(not_found()),
        }
    }

    /// Records an agent's report on migration `id` from `host`: a legal transition
    /// only; at switch-over the VM's host flips in the same transaction.
    pub async fn report_migration(
        &self,
        id: &str,
        host: &Name,
        report: &MigrationReport,
    ) -> Result<Migration, MigrationReportError> {
        for _ in 0..CAS_ATTEMPTS {
            let (mut m, mrev) = self.migration(Scope::All, id).await?;
            check_transition(&m, host, report)?;
            if m.state == MigrationState::Completed {
                // The destination's figures after the rebuild (the transition check
                // allows nothing else from `completed`): the progress only, for a
                // bounded time (twice the agent's window: slack for a slow pass).
                let window_ms = 2 * model::WARMUP_REPORT_MS;
                let now = now_ms();
                let ago_ms = now.saturating_sub(m.finished_at.unwrap_or(now));
                if ago_ms > window_ms {
                    return Err(MigrationReportError::ReportWindowClosed {
                        migration: m.id,
                        ago_ms,
                        window_ms,
                    });
                }
                m.progress = report.progress.clone();
                match self
                    .store()
                    .cas(&keys::migration(m.id), Some(mrev), to_bytes(&m)?)
                    .await
                {
                    Ok(_) => return Ok(m),
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(ControlError::from(e).into()),
                }
            }
            let (mut vm, vrev) = get_json::<Vm>(self.store(), &keys::vm(m.vm))
                .await?
                .ok_or_else(|| {
                    ControlError::Invariant(format!("migration {} of missing vm {}", m.id, m.vm))
                })?;
            let now = now_ms();
            let previous = m.state;
            m.state = report.state;
            if report.incoming_uri.is_some() {
                m.incoming_uri = report.incoming_uri.clone();
            }
            if report.qemu.is_some() {
                m.qemu = report.qemu.clone();
            }
            if report.progress.is_some() {
                m.progress = report.progress.clone();
            }
            if report.dirty.is_some() {
                m.dirty = report.dirty.clone();
            }
            // At switch-over the VM's record moves to the destination. A ledger read in
            // two steps (the VM before, its migration after it ended) would count it
            // nowhere there; bumping the destination's counter makes any reservation
            // planned on such a read lose its compare and re-read.
            let mut bump = None;
            match report.state {
                MigrationState::Warming if previous != MigrationState::Warming => {
                    m.switched_at = Some(now);
                    vm.host = m.to_host.clone();
                    let key = keys::host_alloc(&m.to_host);
                    let count = get_json::<u64>(self.store(), &key)
                        .await?
                        .map_or(0, |(n, _)| n);
                    bump = Some(TxnOp::Put {
                        key,
                        value: to_bytes(&count.wrapping_add(1))?,
                    });
                }
                MigrationState::Completed | MigrationState::Failed => {
                    m.finished_at = Some(now);
                    m.error = report.error.clone();
                    vm.migration = None;
                }
                _ => {}
            }
            let res = if m.state == previous
                && m.state == MigrationState::Warming
                && vm.migration == Some(m.id)
            {
                // Progress only: the VM record does not change.
                self.store()
                    .cas(&keys::migration(m.id), Some(mrev), to_bytes(&m)?)
                    .await
            } else {
                // Terminal operations held while memory moved go, in the same
                // transaction, to the host the VM runs on from now on.
                let (held_compares, held_writes) = if m.state != previous
                    && !matches!(
                        m.state,
                        MigrationState::Pending | MigrationState::Ready | MigrationState::Migrating
                    ) {
                    self.release_held(vm.id, &vm.host).await?
                } else {
                    (Vec::new(), Vec::new())
                };
                self.store()
                    .txn(
                        [
                            Compare::ModRevision {
                                key: keys::migration(m.id),
                                expect: Some(mrev),
                            },
                            Compare::ModRevision {
                                key: keys::vm(vm.id),
                                expect: Some(vrev),
                            },
                        ]
                        .into_iter()
                        .chain(held_compares)
                        .collect(),
                        [
                            TxnOp::Put {
                                key: keys::migration(m.id),
                                value: to_bytes(&m)?,
                            },
                            TxnOp::Put {
                                key: keys::vm(vm.id),
                                value: to_bytes(&vm)?,
                            },
                        ]
                        .into_iter()
                        .chain(bump)
                        .chain(held_writes)
                        .collect(),
                    )
                    .await
            };
            match res {
                Ok(_) => {
                    if m.state != previous {
                        tracing::info!(migration = %m.id, vm = %m.vm_name, state = m.state.as_str(), error = ?m.error, "migration moved");
                    }
                    if m.state.is_final() && !previous.is_final() {
                        // Nobody reads the cache snapshot any more.
                        self.drop_snapshots(m.id).await;
                    }
                    return Ok(m);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(ControlError::from(e).into()),
            }
        }
        Err(ControlError::Contended {
            what: format!("migration {id}"),
        }
        .into())
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
            precopy: false,
            dirty: None,
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
                dirty: None,
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
            (Completed, "a", Completed, false, false), // figures after completion: the destination's only
            (Pending, "c", Failed, false, false),      // a stranger
        ];
        for (from, host, to, uri, ok) in cases {
            let (h, r) = report(host, to, uri);
            assert_eq!(
                check_transition(&m(from), &h, &r).is_ok(),
                ok,
                "{from:?} --{host}--> {to:?}"
            );
        }
        // Completed -> completed: only with figures.
        let (h, mut r) = report("b", Completed, false);
        assert!(check_transition(&m(Completed), &h, &r).is_err());
        r.progress = Some(model::CacheProgress::default());
        assert!(check_transition(&m(Completed), &h, &r).is_ok());
    }
}
