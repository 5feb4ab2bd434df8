//! The reservation ledger: what is reserved on each host and each storage, and the
//! counters that make a reservation part of the transaction that needs it.
//!
//! What a host holds: every VM record placed on it (whatever its state: a stopped VM
//! keeps its room so that it can start again), the standby of every redundant VM whose
//! standby it is (so a takeover always fits), and the destination of every migration
//! from the moment it starts until it ends (so a VM created during a migration cannot
//! take the room the migrating VM lands in). What a storage holds: the disk of both
//! halves of every redundant pair.
//!
//! How it stays true under concurrency: every write that reserves on a host or a
//! storage (a VM create, a migration start) compares and bumps that host's or storage's
//! counter key in its own transaction. The counters are read before the records the
//! ledger is computed from, so any reservation committed after the read has bumped a
//! counter the transaction compares, and the loser re-reads instead of overcommitting.

use std::collections::HashMap;

use model::{Migration, Name, Vm};
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
    /// Reads the ledger: the counters first, then the VMs and migrations.
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
        let plain: Vec<Vm> = vms.iter().map(|(v, _)| v.clone()).collect();
        Ok(Ledger {
            counters,
            hosts: host_reservations(&plain, &migrations),
            storage_gib: storage_reservations(&plain),
            vms,
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
