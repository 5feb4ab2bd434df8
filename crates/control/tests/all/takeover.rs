//! The standby takeover waits until the primary's lease (the heartbeat timeout) has
//! expired plus the margin, timed on the watcher's own clock from the last heartbeat it
//! saw change; a heartbeat in time keeps the VM where it is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use control::{Control, LeaseWatch, Scope};
use model::{
    DesiredState, Host, HostId, HostState, ImageId, ObservedState, Redundancy, TenantId, Vm, VmId,
};
use store::testing::MemStore;
use store::Store;

use crate::drain::{n, put};

const LEASE_MS: u64 = 300;
const MARGIN: Duration = Duration::from_millis(200);
/// Between two passes of the test's watcher.
const PASS: Duration = Duration::from_millis(20);

/// Host `name` whose last heartbeat was `ago` before now by the wall clock.
async fn host(store: &dyn Store, name: &str, ago: Duration) {
    let ago = u64::try_from(ago.as_millis()).unwrap();
    let h = Host {
        id: HostId::new_random(),
        name: n(name),
        cpus: 4,
        vcpus: 16,
        memory_mib: 4096,
        disk_gib: 10,
        drivers: vec![],
        agent_url: None,
        nbd_addr: None,
        link_addr: None,
        uplink_ip: None,
        maintenance: None,
        last_heartbeat: control::now_ms() - ago,
        state: HostState::Up,
    };
    put(store, &control::records::keys::host(&h.name), &h).await;
}

/// A redundant VM on `primary` with its standby on `standby`.
async fn redundant_vm(store: &dyn Store, primary: &str, standby: &str) -> VmId {
    let v = Vm {
        id: VmId::new_random(),
        tenant: TenantId::new_random(),
        name: n("db"),
        image: ImageId::new_random(),
        vcpus: 1,
        memory_mib: 512,
        host: n(primary),
        desired: DesiredState::Running,
        observed: ObservedState::Running,
        error: None,
        created_at: 0,
        migration: None,
        redundancy: Some(Redundancy {
            disk_gib: 2,
            primary_storage: "array-1".into(),
            standby_host: n(standby),
            standby_storage: "array-2".into(),
            takeovers: 0,
        }),
        nics: Vec::new(),
        kernel_args: None,
        trace: None,
        resource_tables: Vec::new(),
    };
    put(store, &control::records::keys::vm(v.id), &v).await;
    v.id
}

/// Runs takeover passes every [`PASS`], the live hosts in `beating` heartbeating before
/// each, until one moves the VM; returns when (or panics after `limit`).
async fn pass_until_moved(
    c: &Control,
    watch: &mut LeaseWatch,
    beating: &[&str],
    limit: Duration,
) -> Instant {
    let start = Instant::now();
    loop {
        for h in beating {
            c.heartbeat(&n(h)).await.unwrap();
        }
        if c.takeover_pass(watch, MARGIN).await.unwrap() == 1 {
            return Instant::now();
        }
        assert!(start.elapsed() < limit, "no takeover within {limit:?}");
        tokio::time::sleep(PASS).await;
    }
}

#[tokio::test]
async fn a_takeover_waits_for_the_lease_and_the_margin_on_the_watchers_clock() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let c = Control::new(store.clone(), LEASE_MS);
    let wait = Duration::from_millis(LEASE_MS) + MARGIN;
    // h1's last heartbeat is a minute old by the wall clock, but this watcher never saw
    // it: as a newly elected leader, it times the lease from its first pass.
    host(store.as_ref(), "h1", Duration::from_secs(60)).await;
    host(store.as_ref(), "h2", Duration::ZERO).await;
    let id = redundant_vm(store.as_ref(), "h1", "h2").await;
    let mut watch = LeaseWatch::default();
    let first = Instant::now();
    let moved_at = pass_until_moved(&c, &mut watch, &["h2"], Duration::from_secs(5)).await;
    assert!(
        moved_at - first > wait,
        "taken over {:?} after the first pass, before the lease and margin ({wait:?})",
        moved_at - first
    );
    let (vm, _) = c.vm(Scope::All, &id.to_string()).await.unwrap();
    assert_eq!(vm.host, n("h2"));
    let r = vm.redundancy.unwrap();
    assert_eq!((r.standby_host, r.takeovers), (n("h1"), 1));

    // Now h2 is the primary, h1 (back) its standby. h2's agent heartbeats a while, then
    // is cut off: the takeover comes only the lease and margin after the last heartbeat
    // this watcher saw, however long h2 was down by the wall clock before.
    let mut last_beat = Instant::now();
    let until = last_beat + Duration::from_millis(400);
    while Instant::now() < until {
        c.heartbeat(&n("h1")).await.unwrap();
        c.heartbeat(&n("h2")).await.unwrap();
        assert_eq!(c.takeover_pass(&mut watch, MARGIN).await.unwrap(), 0);
        // The watcher saw this heartbeat by the end of this pass.
        last_beat = Instant::now();
        tokio::time::sleep(PASS).await;
    }
    let moved_at = pass_until_moved(&c, &mut watch, &["h1"], Duration::from_secs(5)).await;
    assert!(
        moved_at - last_beat > wait - PASS,
        "taken over {:?} after h2's last heartbeat",
        moved_at - last_beat
    );
    let (vm, _) = c.vm(Scope::All, &id.to_string()).await.unwrap();
    assert_eq!(vm.host, n("h1"));
    assert_eq!(vm.redundancy.unwrap().takeovers, 2);
}
