//! Integration tests of the placement planner: one binary (STYLE.md §12).

mod load;
mod placement;
mod property;

use sched::{Inventory, Placement, Request};

pub fn inv(yaml: &str) -> Inventory {
    Inventory::from_yaml_str(yaml).unwrap_or_else(|e| panic!("fixture: {e}"))
}

pub fn req(disk_gib: u64, vcpus: u32, memory_mib: u64) -> Request {
    Request {
        disk_gib,
        vcpus,
        memory_mib,
    }
}

/// Checks every constraint of a placement against the inventory, independently of
/// the planner's indexes. Returns the storage score (the smaller free capacity).
pub fn check_placement(inv: &Inventory, r: &Request, p: &Placement) -> u64 {
    let st = |n: &sched::StorageName| {
        inv.storage
            .iter()
            .find(|s| &s.name == n)
            .unwrap_or_else(|| panic!("unknown storage {n}"))
    };
    let sv = |n: &sched::ServerName| {
        inv.servers
            .iter()
            .find(|s| &s.name == n)
            .unwrap_or_else(|| panic!("unknown server {n}"))
    };
    let (a, b) = (st(&p.primary.storage), st(&p.standby.storage));
    assert_ne!(a.name, b.name, "{p}: one storage twice");
    assert!(a.pairable_with(b), "{p}: storages not pairable");
    assert_ne!(
        a.failure_domain, b.failure_domain,
        "{p}: same failure domain"
    );
    assert!(
        a.free_gib >= r.disk_gib && b.free_gib >= r.disk_gib,
        "{p}: no room for disk"
    );
    assert!(
        a.free_gib >= b.free_gib,
        "{p}: primary storage has less free space"
    );
    let (s1, s2) = (sv(&p.primary.server), sv(&p.standby.server));
    assert_ne!(s1.name, s2.name, "{p}: one server twice");
    for (s, storage) in [(s1, a), (s2, b)] {
        assert!(s.live, "{p}: {} down", s.name);
        assert!(!s.in_maintenance, "{p}: {} in maintenance", s.name);
        assert!(s.free_cpus >= r.vcpus, "{p}: {} lacks vCPUs", s.name);
        assert!(
            s.free_memory_mib >= r.memory_mib,
            "{p}: {} lacks memory",
            s.name
        );
        assert!(
            inv.reaches(&s.name, &storage.name),
            "{p}: {} cannot reach {}",
            s.name,
            storage.name
        );
    }
    a.free_gib.min(b.free_gib)
}
