//! Live migration between two agents through the real server: the source and
//! destination steps, the real cache snapshot, peer export and rebuild, and the
//! simulated memory stream.

use compute::{ComputeDriver, VmStatus};
use model::api::MigrateVm;
use model::{Migration, MigrationState, ObservedState};

use crate::harness::{self, Cluster, WAIT};

async fn wait_migration(c: &Cluster, m: &Migration, done: MigrationState) -> Migration {
    wait_migration_for(c, m, done, WAIT).await
}

async fn wait_migration_for(
    c: &Cluster,
    m: &Migration,
    done: MigrationState,
    wait: std::time::Duration,
) -> Migration {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let now = c.admin.get_migration(m.id).await.unwrap();
        if now.state == done {
            return now;
        }
        assert!(
            !now.state.is_final() && tokio::time::Instant::now() < deadline,
            "migration ended as {:?}, not {done:?}: {now:?}",
            now.state
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn two_hosts() -> (
    Cluster,
    std::sync::Arc<compute::SimDriver>,
    std::sync::Arc<compute::SimDriver>,
    harness::TestAgent,
    harness::TestAgent,
) {
    let c = Cluster::start().await;
    let (da, db) = (Cluster::driver(), Cluster::driver());
    let a = c.agent("host-a", &da).await;
    let b = c.agent("host-b", &db).await;
    (c, da, db, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_moves_with_its_memory_and_its_cache() {
    let (c, da, db, _a, _b) = two_hosts().await;
    let vm = c.create_vm("web", "host-a").await;
    let id = vm.id.to_string();
    c.wait_running(&vm).await;
    // Let the guest touch a few blocks, so that the source cache has some to hand over.
    c.wait_ticks(&vm, 0, 8).await;

    let m = c
        .admin
        .migrate_vm(
            &id,
            &MigrateVm {
                to: "host-b".into(),
                strategy: None,
                precopy: false,
            },
        )
        .await
        .unwrap();
    let done = wait_migration(&c, &m, MigrationState::Completed).await;
    assert_eq!(done.error, None);
    let stats = done
        .qemu
        .expect("the source reports the memory stream's figures");
    assert!(stats.ram_bytes > 0, "{stats:?}");
    let p = done.progress.expect("the destination reports the rebuild");
    assert!(p.planned > 0 && p.left == 0, "{p:?}");
    assert!(
        p.peer_bytes > 0,
        "blocks came from the source's cache: {p:?}"
    );

    let v = c.admin.get_vm(&id).await.unwrap();
    assert_eq!(v.host.as_str(), "host-b");
    assert_eq!(v.observed, ObservedState::Running);
    assert_eq!(v.migration, None);
    assert!(matches!(
        da.status(&id).await.unwrap(),
        VmStatus::Stopped { reason } if reason.starts_with("migrated to tcp:127.0.0.1:")
    ));
    assert_eq!(db.status(&id).await.unwrap(), VmStatus::Running);
    assert_eq!(db.start_count(&id), 1);
    // The guest runs on: no reboot, the tick count continues, and its disk checks
    // pass through the destination's cache.
    let console = c.wait_ticks(&vm, 0, 3).await;
    assert!(!console.contains("GUEST: init"), "{console}");
    let ticks = harness::tick_numbers(&console);
    assert!(ticks[0] > 8, "the count continued: {ticks:?}");
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "{ticks:?}");
    // The source forgets the VM once the migration is over.
    let src = harness::run_dir(&c.host_dir("host-a"), &vm);
    harness::wait("the source's run dir to go", || {
        let src = src.clone();
        async move { !src.exists() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_copy_pauses_the_guest_and_resumes_it_on_the_destination() {
    let (c, _da, db, _a, _b) = two_hosts().await;
    let vm = c.create_vm("web", "host-a").await;
    let id = vm.id.to_string();
    c.wait_running(&vm).await;
    let m = c
        .admin
        .migrate_vm(
            &id,
            &MigrateVm {
                to: "host-b".into(),
                strategy: Some("full-copy".into()),
                precopy: false,
            },
        )
        .await
        .unwrap();
    wait_migration(&c, &m, MigrationState::Completed).await;
    assert_eq!(db.status(&id).await.unwrap(), VmStatus::Running);
    c.wait_vm(&vm, "running on host-b", |v| {
        v.host.as_str() == "host-b" && v.observed == ObservedState::Running
    })
    .await;
    c.wait_ticks(&vm, 0, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_migration_fails_and_the_vm_stays_on_the_source() {
    let (c, da, db, _a, _b) = two_hosts().await;
    let vm = c.create_vm("web", "host-a").await;
    let id = vm.id.to_string();
    c.wait_running(&vm).await;

    da.interrupt_next_migration(&id);
    let m = c
        .admin
        .migrate_vm(
            &id,
            &MigrateVm {
                to: "host-b".into(),
                strategy: None,
                precopy: false,
            },
        )
        .await
        .unwrap();
    let failed = wait_migration(&c, &m, MigrationState::Failed).await;
    let err = failed.error.unwrap_or_default();
    assert!(err.contains("injected fault"), "{err}");

    let v = c.admin.get_vm(&id).await.unwrap();
    assert_eq!(v.host.as_str(), "host-a");
    assert_eq!(v.migration, None);
    assert_eq!(da.status(&id).await.unwrap(), VmStatus::Running);
    // The destination's hypervisor died with the stream; its agent drops the VM.
    assert!(matches!(
        db.status(&id).await.unwrap(),
        VmStatus::Crashed { reason } if reason.starts_with("incoming migration failed")
    ));
    let dst = harness::run_dir(&c.host_dir("host-b"), &vm);
    harness::wait("the destination's run dir to go", || {
        let dst = dst.clone();
        async move { !dst.exists() }
    })
    .await;
    // The guest never stopped on the source.
    let before = harness::good_ticks(&c.admin.console(&id).await.unwrap());
    c.wait_ticks(&vm, before, 2).await;
    c.wait_vm(&vm, "running", |v| v.observed == ObservedState::Running)
        .await;
    assert_eq!(da.start_count(&id), 1);
}

/// One task per VM: a slow start of one VM (10 s here) never delays another VM's
/// migration off the same host. Before the per-VM tasks, the agent's sequential
/// reconcile loop made this migration wait for the start (10.6 s instead of under one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_start_does_not_delay_another_vms_migration() {
    let (c, da, _db, _a, _b) = two_hosts().await;
    let moving = c.create_vm("moving", "host-a").await;
    let slow = c.create_vm("slow", "host-a").await;
    c.wait_running(&moving).await;
    c.wait_running(&slow).await;
    let slow_id = slow.id.to_string();
    c.admin.stop_vm(&slow_id).await.unwrap();
    c.wait_vm(&slow, "stopped", |v| v.observed == ObservedState::Stopped)
        .await;

    da.delay_next_start(&slow_id, std::time::Duration::from_secs(10));
    c.admin.start_vm(&slow_id).await.unwrap();
    c.wait_vm(&slow, "starting", |v| v.observed == ObservedState::Starting)
        .await;
    let t0 = std::time::Instant::now();
    let m = c
        .admin
        .migrate_vm(
            &moving.id.to_string(),
            &MigrateVm {
                to: "host-b".into(),
                strategy: None,
                precopy: false,
            },
        )
        .await
        .unwrap();
    wait_migration_for(&c, &m, MigrationState::Completed, WAIT * 3).await;
    let took = t0.elapsed();
    // The slow start is still under way: the migration did not wait for it.
    let still = c.admin.get_vm(&slow_id).await.unwrap();
    assert_eq!(still.observed, ObservedState::Starting, "{still:?}");
    assert!(
        took < std::time::Duration::from_secs(5),
        "the migration waited for another VM's start: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_precopy_migration_drops_what_the_source_guest_rewrote_and_serves_only_fresh_blocks() {
    let c = Cluster::start().await;
    // A memory stream long enough (256 MiB at the source's 1 GiB/s cap) for the guest to
    // write several sequence records while the destination already copies its cache.
    let slow_ram = || {
        std::sync::Arc::new(compute::SimDriver::new(compute::SimConfig {
            boot_time: std::time::Duration::from_millis(100),
            ram_bytes_per_mib: 4 << 20,
            ..compute::SimConfig::default()
        }))
    };
    let (da, db) = (slow_ram(), slow_ram());
    let _a = c.agent("host-a", &da).await;
    let _b = c.agent("host-b", &db).await;
    let vm = c.create_vm("web", "host-a").await;
    let id = vm.id.to_string();
    c.wait_running(&vm).await;
    c.wait_ticks(&vm, 0, 6).await;

    let m = c
        .admin
        .migrate_vm(
            &id,
            &MigrateVm {
                to: "host-b".into(),
                strategy: None,
                precopy: true,
            },
        )
        .await
        .unwrap();
    assert!(m.precopy);
    let done = wait_migration(&c, &m, MigrationState::Completed).await;
    assert_eq!(done.error, None);
    // The guest rewrote its sequence record during the memory copy: that block is on the
    // source's dirty list, and the destination dropped the copy it had made of it.
    let dirty = done.dirty.clone().expect("the source sends its dirty list");
    let seq_block =
        compute::sim::guest::seq_offset(16) / u64::from(cache::BlockSize::DEFAULT.bytes());
    assert!(
        dirty
            .iter()
            .any(|r| (r[0]..r[0] + r[1]).contains(&seq_block)),
        "the sequence block {seq_block} is dirty: {dirty:?}"
    );
    let p = done.progress.expect("the destination reports the rebuild");
    assert!(p.precopy_dropped >= 1, "{p:?}");
    assert!(p.peer_bytes > 0, "{p:?}");

    // Freeze the guest, then every block the destination serves equals the origin's.
    db.pause(&id).await.unwrap();
    let hosts = c.admin.list_hosts().await.unwrap();
    let nbd_addr: std::net::SocketAddr = hosts
        .iter()
        .find(|h| h.name.as_str() == "host-b")
        .and_then(|h| h.nbd_addr.clone())
        .expect("host-b serves NBD")
        .parse()
        .unwrap();
    let origin = c.dir.path().join("origin").join(format!("{id}.img"));
    let export = agent::disks::guest_export(vm.id);
    tokio::task::spawn_blocking(move || {
        let want = std::fs::read(&origin).unwrap();
        let mut client = nbd::NbdClient::connect(&nbd::NbdAddr::Tcp(nbd_addr), &export).unwrap();
        assert_eq!(client.size(), want.len() as u64);
        let bs = cache::BlockSize::DEFAULT.as_usize();
        let mut buf = vec![0u8; bs];
        for (i, chunk) in want.chunks(bs).enumerate() {
            client
                .read_at(&mut buf[..chunk.len()], (i * bs) as u64)
                .unwrap();
            assert!(
                buf[..chunk.len()] == *chunk,
                "block {i} served by the destination differs from the origin"
            );
        }
    })
    .await
    .unwrap();
}
