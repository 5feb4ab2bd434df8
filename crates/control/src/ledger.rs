//! The reservation ledger: what is reserved on each host and each storage, and the
//! counters that make a reservation part of the transaction that needs it.
//!
//! What a host holds: every VM record placed on it (whatever its state: a stopped VM
//! keeps its room so that it can start again), the standby of every redundant VM whose
//! standby it is (so a takeover always fits), and the destination of every migration
//! from the moment it starts until it ends (so a VM created during a migration cannot
//! take the room the migrating VM lands in), and the planned destination of every VM a
//! maintenance drain has yet to move, from the moment the drain is accepted until that
//! VM's migration starts (its own reservation takes over in the same transaction: the
//! VM's record gains the migration and the plan's hold ends) or the drain ends. What a
//! storage holds: the disk of both halves of every redundant pair.
//!
//! How it stays true under concurrency: every write that reserves on a host or a
//! storage (a VM create, a migration start) compares and bumps that host's or storage's
//! counter key in its own transaction. The counters are read before the records the
//! ledger is computed from, so any reservation committed after the read has bumped a
//! counter the transaction compares, and the loser re-reads instead of overcommitting.

use std::collections::HashMap;

use model::{
    DesiredState, DrainItemState, Maintenance, MaintenanceId, MaintenanceState, Migration, Name,
    Vm, VmId,
};
use sched::Usage;
use store::{Compare, Revision, TxnOp};

use crate::records::{get_json, keys, list_json, to_bytes};
use crate::{Control, ControlError};

/// The reservations now, with the counters they were computed under.
#[derive(Debug, Default)]
pub struct Ledger {
    counters: HashMap<String, (u64, Revision)>,
    /// Reserved per host.
    pub hosts: HashMap<Name, Usage>,
    /// Reserved per storage, GiB.
    pub storage_gib: HashMap<String, u64>,
    /// The VM records it was computed from.
    pub vms: Vec<(Vm, Revision)>,
    /// The drains' holds on their planned destinations (counted in `hosts`).
    pub drain_holds: Vec<DrainHold>,
}

/// Room a maintenance drain holds on a VM's planned destination until its move starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainHold {
    /// The destination.
    pub host: Name,
    /// The VM that will move there.
    pub vm: VmId,
    /// The drain.
    pub session: MaintenanceId,
    /// The host being drained.
    pub from: Name,
    /// vCPUs held.
    pub vcpus: u32,
    /// Memory held, MiB.
    pub memory_mib: u64,
}

/// The holds of the unfinished drains, pure: a pending item holds its destination while
/// its VM is still on the drained host with no migration in flight (a migration holds
/// its own destination; a VM gone or moved needs nothing).
pub fn drain_holds(vms: &[Vm], sessions: &[Maintenance]) -> Vec<DrainHold> {
    let mut out = Vec::new();
    for m in sessions.iter().filter(|m| {
        matches!(
            m.state,
            MaintenanceState::Entering | MaintenanceState::Draining
        )
    }) {
        for it in m
            .items
            .iter()
            .filter(|i| i.state == DrainItemState::Pending)
        {
            let Some(vm) = vms.iter().find(|v| v.id == it.vm) else {
                continue;
            };
            if vm.host != m.host || vm.migration.is_some() || vm.desired == DesiredState::Deleted {
                continue;
            }
            out.push(DrainHold {
                host: it.to.clone(),
                vm: vm.id,
                session: m.id,
                from: m.host.clone(),
                vcpus: vm.vcpus,
                memory_mib: vm.memory_mib,
            });
        }
    }
    out
}

/// Reserved per host, pure: `vms` at their host and standby, and at the destination of
/// their migration while `migrations` has it unfinished.
pub fn host_reservations(vms: &[Vm], migrations: &[Migration]) -> HashMap<Name, Usage> {
    let mut out = sched::usage(vms.iter());
    for vm in vms {
        let Some(id) = vm.migration else { continue };
        if let Some(m) = migrations
            .iter()
            .find(|m| m.id == id && !m.state.is_final())
        {
            // Before switch-over the VM's record is at the source; after it, at the
            // destination, and the source still holds it until the migration ends.
            let other = if vm.host == m.to_host {
                &m.from_host
            } else {
                &m.to_host
            };
            out.entry(other.clone())
                .or_default()
                .add(vm.vcpus, vm.memory_mib);
        }
    }
    out
}

/// Reserved per storage, pure: both halves of every redundant VM.
pub fn storage_reservations(vms: &[Vm]) -> HashMap<String, u64> {
    let mut out: HashMap<String, u64> = HashMap::new();
    for r in vms.iter().filter_map(|v| v.redundancy.as_ref()) {
        for s in [&r.primary_storage, &r.standby_storage] {
            let e = out.entry(s.clone()).or_default();
            *e = e.saturating_add(r.disk_gib);
        }
    }
    out
}

impl Ledger {
    /// The reservations per host without the drain hold of `vm`: what a migration of
    /// `vm` is checked against (its start ends that hold in the same transaction).
    pub fn hosts_without_hold_of(&self, vm: VmId) -> HashMap<Name, Usage> {
        let mut out = self.hosts.clone();
        for h in self.drain_holds.iter().filter(|h| h.vm == vm) {
            if let Some(u) = out.get_mut(&h.host) {
                u.vcpus = u.vcpus.saturating_sub(u64::from(h.vcpus));
                u.memory_mib = u.memory_mib.saturating_sub(h.memory_mib);
            }
        }
        out
    }

    /// What the drains hold on `host` (all hosts with `None`), for a refusal to name:
    /// `None` when they hold nothing there. Names sessions and hosts, never another
    /// tenant's VM.
    pub fn drain_holds_note(&self, host: Option<&Name>) -> Option<String> {
        // Per (destination, session): vCPUs and MiB.
        let mut sums: Vec<(&Name, MaintenanceId, &Name, u64, u64)> = Vec::new();
        for h in self
            .drain_holds
            .iter()
            .filter(|h| host.is_none_or(|w| *w == h.host))
        {
            match sums.iter_mut().find(|s| *s.0 == h.host && s.1 == h.session) {
                Some(s) => {
                    s.3 = s.3.saturating_add(u64::from(h.vcpus));
                    s.4 = s.4.saturating_add(h.memory_mib);
                }
                None => sums.push((
                    &h.host,
                    h.session,
                    &h.from,
                    u64::from(h.vcpus),
                    h.memory_mib,
                )),
            }
        }
        if sums.is_empty() {
            return None;
        }
        sums.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        Some(
            sums.iter()
                .map(|(to, session, from, vcpus, mib)| {
                    format!(
                        "{vcpus} vCPUs and {mib} MiB of {to} are reserved by maintenance drain \
                         {session} of host {from} for the VMs it will move there"
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        )
    }

    /// The compares and writes that make a reservation on `hosts` and `storage` part of
    /// a transaction: each counter must be where this ledger read it, and is bumped.
    pub fn reserve<'a>(
        &self,
        hosts: impl IntoIterator<Item = &'a Name>,
        storage: impl IntoIterator<Item = &'a str>,
    ) -> Result<(Vec<Compare>, Vec<TxnOp>), ControlError> {
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        let keys: Vec<String> = hosts
            .into_iter()
            .map(keys::host_alloc)
            .chain(storage.into_iter().map(keys::storage_alloc))
            .collect();
        for key in keys {
            if compares
                .iter()
                .any(|c: &Compare| matches!(c, Compare::ModRevision { key: k, .. } if *k == key))
            {
                continue;
            }
            let (count, rev) = match self.counters.get(&key) {
                Some((n, rev)) => (*n, Some(*rev)),
                None => (0, None),
            };
            compares.push(Compare::ModRevision {
                key: key.clone(),
                expect: rev,
            });
            ops.push(TxnOp::Put {
                key,
                value: to_bytes(&count.wrapping_add(1))?,
            });
        }
        Ok((compares, ops))
    }
}

impl Control {
    /// Reads the ledger: the counters first, then the VMs, migrations and drains.
    pub async fn ledger(&self) -> Result<Ledger, ControlError> {
        let mut counters = HashMap::new();
        for prefix in [keys::HOST_ALLOC, keys::STORAGE_ALLOC] {
            for kv in self.store().list(prefix).await? {
                let n: u64 =
                    serde_json::from_slice(&kv.value).map_err(|source| ControlError::Decode {
                        key: kv.key.clone(),
                        source,
                    })?;
                counters.insert(kv.key, (n, kv.mod_revision));
            }
        }
        let vms = list_json::<Vm>(self.store(), keys::VMS).await?;
        let mut migrations = Vec::new();
        for id in vms.iter().filter_map(|(v, _)| v.migration) {
            if let Some((m, _)) = get_json::<Migration>(self.store(), &keys::migration(id)).await? {
                migrations.push(m);
            }
        }
        let sessions: Vec<Maintenance> = list_json::<Maintenance>(self.store(), keys::MAINTENANCE)
            .await?
            .into_iter()
            .map(|(m, _)| m)
            .collect();
        let plain: Vec<Vm> = vms.iter().map(|(v, _)| v.clone()).collect();
        let mut hosts = host_reservations(&plain, &migrations);
        let holds = drain_holds(&plain, &sessions);
        for h in &holds {
            hosts
                .entry(h.host.clone())
                .or_default()
                .add(h.vcpus, h.memory_mib);
        }
        Ok(Ledger {
            counters,
            hosts,
            storage_gib: storage_reservations(&plain),
            vms,
            drain_holds: holds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{
        DesiredState, ImageId, MigrationId, MigrationState, ObservedState, Redundancy, TenantId,
        VmId,
    };

    fn n(s: &str) -> Name {
        model::validate_name("n", s).unwrap()
    }

    fn vm(on: &str) -> Vm {
        Vm {
            id: VmId::new_random(),
            tenant: TenantId::new_random(),
            name: n("v"),
            image: ImageId::new_random(),
            vcpus: 2,
            memory_mib: 512,
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

    fn migration(v: &Vm, from: &str, to: &str, state: MigrationState) -> Migration {
        Migration {
            id: MigrationId::new_random(),
            vm: v.id,
            tenant: v.tenant,
            vm_name: v.name.clone(),
            from_host: n(from),
            to_host: n(to),
            strategy: "heat".into(),
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

    #[test]
    fn a_migrating_vm_holds_both_ends_until_its_migration_ends() {
        let mut v = vm("a");
        let m = migration(&v, "a", "b", MigrationState::Pending);
        v.migration = Some(m.id);
        let r = host_reservations(std::slice::from_ref(&v), std::slice::from_ref(&m));
        assert_eq!(r[&n("a")].vcpus, 2);
        assert_eq!(r[&n("b")].vcpus, 2);
        // After switch-over the record is on b; a still holds it.
        v.host = n("b");
        let r = host_reservations(std::slice::from_ref(&v), std::slice::from_ref(&m));
        assert_eq!((r[&n("a")].vcpus, r[&n("b")].vcpus), (2, 2));
        // Finished: only where the record is.
        let done = migration(&v, "a", "b", MigrationState::Completed);
        v.migration = Some(done.id);
        let r = host_reservations(&[v], &[done]);
        assert_eq!(r.get(&n("a")), None);
        assert_eq!(r[&n("b")].memory_mib, 512);
    }

    #[test]
    fn a_redundant_vm_holds_its_standby_and_both_storages() {
        let mut v = vm("a");
        v.redundancy = Some(Redundancy {
            disk_gib: 10,
            primary_storage: "s1".into(),
            standby_host: n("b"),
            standby_storage: "s2".into(),
            takeovers: 0,
        });
        let vms = [v.clone(), v];
        let r = host_reservations(&vms, &[]);
        assert_eq!((r[&n("a")].vcpus, r[&n("b")].vcpus), (4, 4));
        let s = storage_reservations(&vms);
        assert_eq!((s["s1"], s["s2"]), (20, 20));
    }
}
