//! A drain is moved along by the operation driver from its stored session only: a
//! driver stopped in the middle (as a server killed, or a leader deposed) leaves the
//! session where it was, and a second driver over the same store finishes it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use control::{Control, Driver, DriverConfig, Scope, Tasks};
use model::api::{MigrationReport, OperationKind, OperationState};
use model::{
    DesiredState, Host, HostId, HostState, ImageId, MaintenanceState, MigrationState, Name,
    ObservedState, TenantId, Vm, VmId,
};
use store::testing::MemStore;
use store::Store;

pub(crate) fn n(s: &str) -> Name {
    model::validate_name("name", s).unwrap()
}

pub(crate) async fn put<T: serde::Serialize>(store: &dyn Store, key: &str, v: &T) {
    store
        .put(key, serde_json::to_vec(v).unwrap().into())
        .await
        .unwrap();
}

pub(crate) async fn host(store: &dyn Store, name: &str) {
    let h = Host {
        id: HostId::new_random(),
        name: n(name),
        cpus: 4,
        vcpus: 4,
        memory_mib: 4096,
        disk_gib: 10,
        drivers: vec![],
        agent_url: None,
        nbd_addr: Some(format!("127.0.0.1:{}", 10_000 + name.len())),
        link_addr: None,
        uplink_ip: None,
        maintenance: None,
        last_heartbeat: control::now_ms(),
        state: HostState::Up,
    };
    put(store, &control::records::keys::host(&h.name), &h).await;
}

pub(crate) async fn vm(store: &dyn Store, tenant: TenantId, name: &str, on: &str) -> VmId {
    let v = Vm {
        id: VmId::new_random(),
        tenant,
        name: n(name),
        image: ImageId::new_random(),
        vcpus: 1,
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
    };
    put(store, &control::records::keys::vm(v.id), &v).await;
    v.id
}

pub(crate) fn report(host: &str, state: MigrationState) -> MigrationReport {
    MigrationReport {
        host: host.into(),
        state,
        incoming_uri: (state == MigrationState::Ready).then(|| "tcp:127.0.0.1:4444".into()),
        qemu: None,
        progress: None,
        error: None,
        dirty: None,
    }
}

fn fast() -> DriverConfig {
    DriverConfig {
        drain_period: Duration::from_millis(20),
        takeover_period: Duration::from_millis(50),
        ..DriverConfig::default()
    }
}

/// Waits until the session's item `i` has a migration, and returns it.
async fn migration_of(c: &Control, session: &str, i: usize) -> String {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (m, _) = c.maintenance_session(session).await.unwrap();
        if let Some(id) = m.items.get(i).and_then(|it| it.migration) {
            return id.to_string();
        }
        assert!(Instant::now() < end, "item {i} never started: {m:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The agents' side of a migration up to switch-over.
pub(crate) async fn switch_over(c: &Control, mig: &str) {
    let (m, _) = c.migration(Scope::All, mig).await.unwrap();
    let (src, dst) = (m.from_host.to_string(), m.to_host.to_string());
    for (who, st) in [
        (&dst, MigrationState::Ready),
        (&src, MigrationState::Migrating),
        (&src, MigrationState::Warming),
    ] {
        c.report_migration(mig, &n(who), &report(who, st))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_drain_stopped_midway_is_finished_by_the_next_driver() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    for h in ["h1", "h2", "h3"] {
        host(store.as_ref(), h).await;
    }
    let t = TenantId::new_random();
    let a = vm(store.as_ref(), t, "a", "h1").await;
    let b = vm(store.as_ref(), t, "b", "h1").await;
    let first = Control::new(store.clone(), 6_000);
    let session = first
        .enter_maintenance(&n("h1"), None, "heat", false)
        .await
        .unwrap();
    let sid = session.id.to_string();
    assert_eq!(session.items.len(), 2);

    // Driver one starts the first VM's migration; the agents switch it over; then the
    // driver stops (the server died) before it recorded the move.
    let d1 = Driver::start(first.clone(), fast(), Tasks::default());
    let m1 = migration_of(&first, &sid, 0).await;
    d1.shutdown().await;
    switch_over(&first, &m1).await;
    let op = first.operation(Scope::All, &sid).await.unwrap();
    assert_eq!(op.kind, OperationKind::Drain);
    assert_eq!(op.state, OperationState::Running);
    assert_eq!((op.done, op.total), (0, 2), "{op:?}");

    // Driver two, a fresh control layer over the same store, takes it from there.
    let second = Control::new(store.clone(), 6_000);
    let d2 = Driver::start(second.clone(), fast(), Tasks::default());
    let m2 = migration_of(&second, &sid, 1).await;
    assert_ne!(m1, m2);
    switch_over(&second, &m2).await;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (m, _) = second.maintenance_session(&sid).await.unwrap();
        if m.state == MaintenanceState::InMaintenance {
            break;
        }
        assert!(Instant::now() < end, "drain never finished: {m:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    d2.shutdown().await;
    // Switched over was enough for the drain; the destinations finish warming after.
    for m in [&m1, &m2] {
        let (rec, _) = second.migration(Scope::All, m).await.unwrap();
        let dst = rec.to_host.to_string();
        second
            .report_migration(m, &rec.to_host, &report(&dst, MigrationState::Completed))
            .await
            .unwrap();
    }
    let op = second.operation(Scope::All, &sid).await.unwrap();
    assert_eq!(op.state, OperationState::Succeeded);
    assert_eq!((op.done, op.total), (2, 2), "{op:?}");
    for id in [a, b] {
        let (v, _) = second.vm(Scope::All, &id.to_string()).await.unwrap();
        assert_ne!(v.host, n("h1"), "vm {} still on the drained host", v.name);
        assert_eq!(v.migration, None);
    }
    // The migrations are operations of the VMs' tenant; the drain is the operator's.
    let mine = second.operations(Scope::Tenant(t)).await.unwrap();
    assert_eq!(mine.len(), 2, "{mine:?}");
    assert!(mine.iter().all(|o| o.kind == OperationKind::Migration));
    assert!(second
        .operations(Scope::Tenant(TenantId::new_random()))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn cancelling_a_drain_uncordons_and_other_kinds_say_why_not() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    for h in ["h1", "h2"] {
        host(store.as_ref(), h).await;
    }
    let t = TenantId::new_random();
    vm(store.as_ref(), t, "a", "h1").await;
    let c = Control::new(store.clone(), 6_000);
    let session = c
        .enter_maintenance(&n("h1"), None, "heat", false)
        .await
        .unwrap();
    let sid = session.id.to_string();
    let d = Driver::start(c.clone(), fast(), Tasks::default());
    let mig = migration_of(&c, &sid, 0).await;
    d.shutdown().await;

    let e = c
        .cancel_operation(Scope::Tenant(t), &mig)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("cannot be cancelled: a live migration finishes"),
        "{e}"
    );
    // A tenant does not see the operator's drain at all.
    let e = c
        .cancel_operation(Scope::Tenant(t), &sid)
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), format!("operation {sid} not found"));
    let op = c.cancel_operation(Scope::All, &sid).await.unwrap();
    assert_eq!(op.state, OperationState::Cancelled);
    let h1 = c.hosts().await.unwrap();
    assert!(h1.iter().all(|h| h.maintenance.is_none()), "{h1:?}");
    let e = c.cancel_operation(Scope::All, &sid).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("operation {sid} is already cancelled")
    );
}

/// Two drivers on one store: one leads; when its leadership is lost (its lease expired:
/// here its election key is deleted, which is what expiry does in etcd), it stops and the
/// other leads and moves the drain along.
#[tokio::test]
async fn only_the_elected_driver_moves_drains_and_a_deposed_one_stops() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    for h in ["h1", "h2"] {
        host(store.as_ref(), h).await;
    }
    let t = TenantId::new_random();
    vm(store.as_ref(), t, "a", "h1").await;
    let c = Control::new(store.clone(), 6_000);
    let one = Driver::start(c.clone(), fast(), Tasks::default());
    one.until_leading().await;
    let two = Driver::start(Control::new(store.clone(), 6_000), fast(), Tasks::default());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!two.is_leading(), "two leaders at once");

    let key = store::election::election_key(control::driver::ELECTION).unwrap();
    store.delete(&key).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), two.until_leading())
        .await
        .expect("the second driver never took over");
    // The deposed driver campaigns again but does not lead while the second does.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!one.is_leading(), "the deposed driver still leads");

    let session = c
        .enter_maintenance(&n("h1"), None, "heat", false)
        .await
        .unwrap();
    let mig = migration_of(&c, &session.id.to_string(), 0).await;
    let (m, _) = c.migration(Scope::All, &mig).await.unwrap();
    assert_eq!(m.to_host, n("h2"));
    two.shutdown().await;
    // With the second gone, the first leads again.
    tokio::time::timeout(Duration::from_secs(5), one.until_leading())
        .await
        .expect("the first driver never led again");
    one.shutdown().await;
}

/// A drained host that misses its heartbeats (an agent restarting, a store member failing
/// over) makes the drain wait, saying why, not fail; it goes on when the host is back.
#[tokio::test]
async fn a_drain_waits_for_a_source_host_that_missed_its_heartbeats() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    for h in ["h1", "h2"] {
        host(store.as_ref(), h).await;
    }
    vm(store.as_ref(), TenantId::new_random(), "a", "h1").await;
    let c = Control::new(store.clone(), 6_000);
    let session = c
        .enter_maintenance(&n("h1"), None, "heat", false)
        .await
        .unwrap();
    let sid = session.id.to_string();
    // h1's last heartbeat is now an hour old.
    let key = control::records::keys::host(&n("h1"));
    let (mut h1, _) = control::records::get_json::<Host>(store.as_ref(), &key)
        .await
        .unwrap()
        .unwrap();
    h1.last_heartbeat = control::now_ms() - 3_600_000;
    put(store.as_ref(), &key, &h1).await;
    let d = Driver::start(c.clone(), fast(), Tasks::default());
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let (m, _) = c.maintenance_session(&sid).await.unwrap();
        if m.items[0].error.as_deref() == Some("waiting: host h1 is down") {
            assert_eq!(m.state, MaintenanceState::Draining);
            break;
        }
        assert!(Instant::now() < end, "the drain did not wait: {m:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h1.last_heartbeat = control::now_ms();
    put(store.as_ref(), &key, &h1).await;
    let mig = migration_of(&c, &sid, 0).await;
    assert!(!mig.is_empty());
    let (m, _) = c.maintenance_session(&sid).await.unwrap();
    assert_eq!(m.items[0].error, None, "{m:?}");
    d.shutdown().await;
}

pub(crate) fn small(name: &str, host: Option<&str>) -> model::api::VmRequest {
    model::api::VmRequest {
        name: n(name),
        image: "default".into(),
        vcpus: 1,
        memory_mib: 256,
        host: host.map(n),
        tenant: None,
        redundant_disk_gib: None,
        nics: vec![],
        kernel_args: None,
        resource_tables: vec![],
    }
}

/// A public image in the store, for creates.
pub(crate) async fn image(store: &dyn Store) {
    let digest = format!("sha256:{}", "ab".repeat(32));
    let image = model::Image {
        id: ImageId::new_random(),
        tenant: None,
        name: n("default"),
        kernel: Some(digest.clone()),
        initrd: None,
        disk_template: Some(digest),
        cmdline: String::new(),
        disk_mib: 64,
        created_at: 0,
    };
    put(store, &control::records::keys::image(image.id), &image).await;
    put(
        store,
        &control::records::keys::image_name(None, &image.name),
        &image.id,
    )
    .await;
}

/// h1 with VM `a` (1 vCPU, 512 MiB) to drain; h2, its only destination, with 1 vCPU free.
async fn nearly_full() -> (Arc<dyn Store>, Control, TenantId) {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    for h in ["h1", "h2"] {
        host(store.as_ref(), h).await;
    }
    image(store.as_ref()).await;
    let t = TenantId::new_random();
    vm(store.as_ref(), t, "a", "h1").await;
    for f in ["f1", "f2", "f3"] {
        vm(store.as_ref(), t, f, "h2").await;
    }
    let c = Control::new(store.clone(), 6_000);
    (store, c, t)
}

/// The accepted plan holds the drained VM's destination before anything moves: a VM
/// created meanwhile cannot take that room, and its refusal names the drain that holds
/// it. The hold ends when the drain does.
#[tokio::test]
async fn a_create_during_a_drain_cannot_take_the_room_planned_for_a_drained_vm() {
    let (_store, c, t) = nearly_full().await;
    // Before the drain the last vCPU of h2 is free: this create would fit.
    let ledger = c.ledger().await.unwrap();
    assert_eq!(ledger.hosts[&n("h2")].vcpus, 3);
    let session = c
        .enter_maintenance(&n("h1"), None, "heat", false)
        .await
        .unwrap();
    let sid = session.id.to_string();
    assert_eq!(session.items[0].to, n("h2"));
    let ledger = c.ledger().await.unwrap();
    assert_eq!(ledger.hosts[&n("h2")].vcpus, 4, "the plan holds a's vCPU");

    // No driver runs: nothing has moved, yet the room is taken.
    for host in [Some("h2"), None] {
        let e = c
            .create_vm(t, &small("x", host))
            .await
            .unwrap_err()
            .to_string();
        let why = match host {
            Some(_) => "host: h2 has 0 free vCPUs",
            None => "host: no up host has 1 free vCPUs",
        };
        assert!(e.starts_with(why), "{e}");
        assert!(
            e.contains(&format!(
                "1 vCPUs and 512 MiB of h2 are reserved by maintenance drain {sid} of host h1"
            )),
            "{e}"
        );
    }

    // Cancelled: the hold is gone and the same create fits.
    c.cancel_operation(Scope::All, &sid).await.unwrap();
    assert!(c.ledger().await.unwrap().drain_holds.is_empty());
    let x = c.create_vm(t, &small("x", Some("h2"))).await.unwrap();
    assert_eq!(x.host, n("h2"));
}

/// When the drained VM's migration starts, its own reservation takes over from the
/// plan's hold in the same transaction: the destination counts the VM once.
#[tokio::test]
async fn a_drain_hold_becomes_the_migrations_reservation_when_the_move_starts() {
    let (_store, c, t) = nearly_full().await;
    let session = c
        .enter_maintenance(&n("h1"), None, "heat", false)
        .await
        .unwrap();
    let sid = session.id.to_string();
    // The hold does not count against the held VM's own move (h2 is full with it).
    let d = Driver::start(c.clone(), fast(), Tasks::default());
    let mig = migration_of(&c, &sid, 0).await;
    d.shutdown().await;
    let ledger = c.ledger().await.unwrap();
    assert!(ledger.drain_holds.is_empty(), "{:?}", ledger.drain_holds);
    assert_eq!(ledger.hosts[&n("h2")].vcpus, 4, "a counted once on h2");
    let e = c
        .create_vm(t, &small("x", Some("h2")))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("h2 has 0 free vCPUs"), "{e}");
    // The migration's reservation now, not the drain's.
    assert!(!e.contains("maintenance drain"), "{e}");
    switch_over(&c, &mig).await;
    let (m, _) = c.migration(Scope::All, &mig).await.unwrap();
    assert_eq!(m.to_host, n("h2"));
}
