//! Randomized concurrency against hosts near full: VM creates, migrations and a
//! maintenance drain issued at once never reserve more than any host has (a drain's plan
//! counting on its destinations), checked from the store after every change it sees;
//! every refusal names its constraint.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use control::{Control, CreateVmError, Driver, DriverConfig, MigrateStartError, Scope, Tasks};
use model::api::{MigrationReport, VmRequest};
use model::{
    Host, HostId, HostState, Image, ImageId, Migration, MigrationState, ObservedState, SplitMix64,
    Vm,
};
use store::testing::MemStore;
use store::{Store, WatchEvent};

use control::records::{keys, list_json, update_cas};

use crate::drain::n;

const HOSTS: [&str; 4] = ["h1", "h2", "h3", "h4"];
/// VMs made before the storm: about 60 % of the vCPUs.
const BASE: usize = 13;

async fn setup(store: &dyn Store) {
    for name in HOSTS {
        let h = Host {
            id: HostId::new_random(),
            name: n(name),
            cpus: 2,
            vcpus: 8,
            memory_mib: 4096,
            disk_gib: 10,
            drivers: vec![],
            agent_url: None,
            nbd_addr: Some("127.0.0.1:1".into()),
            link_addr: None,
            uplink_ip: None,
            maintenance: None,
            last_heartbeat: control::now_ms() + 600_000,
            state: HostState::Up,
        };
        let v = serde_json::to_vec(&h).unwrap();
        store.put(&keys::host(&h.name), v.into()).await.unwrap();
    }
    let digest = format!("sha256:{}", "ab".repeat(32));
    let image = Image {
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
    store
        .put(
            &keys::image(image.id),
            serde_json::to_vec(&image).unwrap().into(),
        )
        .await
        .unwrap();
    store
        .put(
            &keys::image_name(None, &image.name),
            serde_json::to_vec(&image.id).unwrap().into(),
        )
        .await
        .unwrap();
}

/// Every host's reservations against its capacity, from the store as it is now.
async fn check_no_overcommit(store: &dyn Store) -> Result<(), String> {
    let hosts: Vec<Host> = list_json::<Host>(store, keys::HOSTS)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(h, _)| h)
        .collect();
    let vms: Vec<Vm> = list_json::<Vm>(store, keys::VMS)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(v, _)| v)
        .collect();
    let migrations: Vec<Migration> = list_json::<Migration>(store, keys::MIGRATIONS)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    let sessions: Vec<model::Maintenance> = list_json(store, keys::MAINTENANCE)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    let mut used = control::ledger::host_reservations(&vms, &migrations);
    // A drain's plan holds its destinations too.
    for h in control::ledger::drain_holds(&vms, &sessions) {
        used.entry(h.host).or_default().add(h.vcpus, h.memory_mib);
    }
    for h in &hosts {
        let u = used.get(&h.name).copied().unwrap_or_default();
        if u.vcpus > u64::from(h.schedulable_vcpus()) || u.memory_mib > h.memory_mib {
            return Err(format!(
                "host {} holds {} vCPUs / {} MiB of {} / {}",
                h.name,
                u.vcpus,
                u.memory_mib,
                h.schedulable_vcpus(),
                h.memory_mib
            ));
        }
    }
    Ok(())
}

/// Plays the agents: marks new VMs running, and carries every migration through.
async fn agents(c: Control, stop: Arc<AtomicUsize>) {
    while stop.load(Ordering::Relaxed) == 0 {
        for (vm, _) in list_json::<Vm>(c.store(), keys::VMS).await.unwrap() {
            if vm.observed == ObservedState::Pending {
                let _ = update_cas(
                    c.store(),
                    &keys::vm(vm.id),
                    || "vm".into(),
                    || control::ControlError::Invariant("gone".into()),
                    |v: &mut Vm| {
                        v.observed = ObservedState::Running;
                        Ok(())
                    },
                )
                .await;
            }
        }
        for (m, _) in list_json::<Migration>(c.store(), keys::MIGRATIONS)
            .await
            .unwrap()
        {
            let (who, next) = match m.state {
                MigrationState::Pending => (&m.to_host, MigrationState::Ready),
                MigrationState::Ready => (&m.from_host, MigrationState::Migrating),
                MigrationState::Migrating => (&m.from_host, MigrationState::Warming),
                MigrationState::Warming => (&m.to_host, MigrationState::Completed),
                _ => continue,
            };
            let report = MigrationReport {
                host: who.to_string(),
                state: next,
                incoming_uri: (next == MigrationState::Ready).then(|| "tcp:127.0.0.1:1".into()),
                qemu: None,
                progress: None,
                error: None,
                dirty: None,
            };
            let _ = c.report_migration(&m.id.to_string(), who, &report).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creates_migrations_and_a_drain_at_once_never_overcommit_a_host() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    setup(store.as_ref()).await;
    let c = Control::new(store.clone(), 6_000);
    let tenant = model::TenantId::new_random();
    let mut rng = SplitMix64::new(0x5eed);
    let req = |name: String, rng: &mut SplitMix64| VmRequest {
        name: n(&name),
        image: "default".into(),
        vcpus: rng.range(1, 2) as u32,
        memory_mib: 256 * rng.range(1, 4),
        host: None,
        tenant: None,
        redundant_disk_gib: None,
        nics: vec![],
        kernel_args: None,
        resource_tables: vec![],
    };
    // Near full before the storm.
    for i in 0..BASE {
        c.create_vm(tenant, &req(format!("base-{i}"), &mut rng))
            .await
            .unwrap();
    }

    // The checker: after every change the store reports, no host is over.
    let mut events = store.watch("/vinfra/").await.unwrap();
    let checker = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut checks = 0usize;
            use futures_util::StreamExt;
            while let Some(ev) = events.next().await {
                let ev = ev.expect("watch");
                if matches!(&ev, WatchEvent::Put(kv) if kv.key == "/vinfra/test-end") {
                    return checks;
                }
                check_no_overcommit(store.as_ref()).await.unwrap();
                checks += 1;
            }
            checks
        })
    };
    let stop = Arc::new(AtomicUsize::new(0));
    let agent_task = tokio::spawn(agents(c.clone(), stop.clone()));
    let driver = Driver::start(
        c.clone(),
        DriverConfig {
            drain_period: Duration::from_millis(10),
            ..DriverConfig::default()
        },
        Tasks::default(),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;

    let mut jobs = tokio::task::JoinSet::new();
    for i in 0..50 {
        let (c, r) = (c.clone(), req(format!("new-{i}"), &mut rng));
        let delay = Duration::from_millis(rng.range(10, 90));
        jobs.spawn(async move {
            tokio::time::sleep(delay).await;
            c.create_vm(tenant, &r).await.map(drop).map_err(|e| {
                let named = matches!(e, CreateVmError::NoRoom { .. });
                ("create", e.to_string(), named)
            })
        });
    }
    for i in 0..10 {
        let (c, vm, pick) = (c.clone(), format!("base-{}", rng.index(BASE)), rng.index(3));
        let delay = Duration::from_millis(rng.range(0, 40));
        jobs.spawn(async move {
            tokio::time::sleep(delay).await;
            // Another host than the VM's, so that the refusals are about room.
            let (v, _) = c.vm(Scope::All, &vm).await.unwrap();
            let others: Vec<&str> = HOSTS
                .iter()
                .copied()
                .filter(|h| *h != v.host.as_str())
                .collect();
            let to = n(others[pick % others.len()]);
            c.start_migration(Scope::All, &vm, &to, "heat", false)
                .await
                .map(drop)
                .map_err(|e| {
                    let named = !matches!(e, MigrateStartError::Control(_));
                    ("migrate", format!("{i}: {e}"), named)
                })
        });
    }
    let drain = {
        let c = c.clone();
        tokio::spawn(async move { c.enter_maintenance(&n("h1"), None, "heat", false).await })
    };
    let mut outcomes: HashMap<&str, (usize, usize)> = HashMap::new();
    while let Some(r) = jobs.join_next().await {
        match r.unwrap() {
            Ok(()) => {}
            Err((kind, msg, named)) => {
                outcomes.entry(kind).or_default().1 += 1;
                eprintln!("refused: {kind}: {msg}");
                // Each refusal names the host or the VM and the constraint.
                assert!(named, "{kind} refused without a constraint: {msg}");
                let names_one = msg.contains("host:")
                    || msg.contains("to:")
                    || msg.contains("already migrating")
                    || msg.contains("must be running")
                    || msg.contains("already runs on")
                    || msg.contains("in maintenance");
                assert!(names_one, "{kind}: {msg}");
                if kind == "create" {
                    assert!(msg.contains("free vCPUs"), "{msg}");
                }
                continue;
            }
        }
        outcomes.entry("ok").or_default().0 += 1;
    }
    match drain.await.unwrap() {
        Ok(session) => {
            // The drain finishes or fails naming the VM that could not move.
            let end = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let (m, _) = c
                    .maintenance_session(&session.id.to_string())
                    .await
                    .unwrap();
                if m.state == model::MaintenanceState::InMaintenance {
                    break;
                }
                if m.state == model::MaintenanceState::Failed {
                    let e = m.error.unwrap_or_default();
                    assert!(e.contains("could not move"), "{e}");
                    break;
                }
                assert!(std::time::Instant::now() < end, "drain stuck: {m:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("cannot be placed"), "{msg}");
        }
    }
    stop.store(1, Ordering::Relaxed);
    agent_task.await.unwrap();
    driver.shutdown().await;
    store.put("/vinfra/test-end", "1".into()).await.unwrap();
    let checks = checker.await.unwrap();
    check_no_overcommit(store.as_ref()).await.unwrap();
    eprintln!("outcomes {outcomes:?}, {checks} checks");
    // At least every successful create and migration step was checked.
    assert!(checks > 20, "the checker saw only {checks} changes");
    let created = outcomes.get("ok").map(|o| o.0).unwrap_or(0);
    assert!(created > 0, "nothing succeeded: {outcomes:?}");
    assert!(
        outcomes.get("create").map(|o| o.1).unwrap_or(0) > 0,
        "hosts were not near full: no create was refused ({outcomes:?})"
    );
}
