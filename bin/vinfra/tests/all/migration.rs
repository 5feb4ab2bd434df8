//! Live migration of a real QEMU VM between two agents, with its cache rebuilt on the
//! destination from the source host's cache — also across a `kill -9` of the source.

use std::time::Duration;

use model::api::{CreateVm, MigrateVm};
use model::MigrationState;

use crate::harness::{cli, cluster, path_in, spawn_agent, spawn_agent_env, ticks, wait_host_up};
use crate::vm_lifecycle::qemu_pids_under;

async fn boot_and_warm(admin: &client::Client, host: &str, min_tick: u64) {
    admin
        .create_vm(&CreateVm {
            name: "mover".into(),
            image: "default".into(),
            vcpus: 1,
            memory_mib: 256,
            host: Some(host.into()),
            tenant: None,
            redundant: false,
            disk_gib: None,
            ..Default::default()
        })
        .await
        .unwrap();
    // The guest reads every MiB of its disk in turn: by tick `min_tick` the source
    // cache holds the whole working set, and has learned its heat and pattern.
    test_utils::wait_for(Duration::from_secs(120), || async {
        let (last, _) = ticks(&admin.console("mover").await.unwrap_or_default());
        last.is_some_and(|n| n >= min_tick)
    })
    .await
    .expect("guest runs its disk workload");
}

#[tokio::test]
async fn a_running_vm_moves_and_keeps_its_workload_with_a_cache_rebuilt_from_the_source() {
    let (s, token_file) = cluster().await;
    let admin = s.admin();
    let (a_dir, b_dir) = (path_in(&s, "a"), path_in(&s, "b"));
    let _a = spawn_agent(&s, "host-a", &a_dir, &token_file);
    let _b = spawn_agent(&s, "host-b", &b_dir, &token_file);
    wait_host_up(&s, "host-a").await;
    wait_host_up(&s, "host-b").await;
    boot_and_warm(&admin, "host-a", 5).await;

    let t = s.admin_token();
    let (ok, out, err) = cli(
        &s,
        &t,
        &["vm", "migrate", "mover", "--to", "host-b", "-o", "json"],
    );
    assert!(ok, "migrate failed: {out}{err}");
    let ms: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ms[0]["state"], "completed", "{out}");
    assert!(
        ms[0]["progress"]["peer_bytes"].as_u64().unwrap() > 0,
        "blocks came from the source cache: {out}"
    );

    let vm = admin.get_vm("mover").await.unwrap();
    assert_eq!(vm.host.as_str(), "host-b");
    assert!(vm.migration.is_none());
    let (before, _) = ticks(&admin.console("mover").await.unwrap());
    test_utils::wait_for(Duration::from_secs(60), || async {
        let (last, _) = ticks(&admin.console("mover").await.unwrap_or_default());
        last > before.map(|n| n + 3)
    })
    .await
    .expect("the guest keeps ticking on the destination");
    let (_, bad) = ticks(&admin.console("mover").await.unwrap());
    assert!(!bad, "a read or write check failed in the guest");
    // The source let go of everything.
    test_utils::wait_until(Duration::from_secs(10), || {
        qemu_pids_under(&a_dir).is_empty()
    })
    .await
    .expect("source qemu gone");
    assert_eq!(qemu_pids_under(&b_dir).len(), 1, "destination qemu runs");
    // Bad input to the migration API is refused with the field named.
    let e = admin
        .migrate_vm(
            "mover",
            &MigrateVm {
                to: "host-a".into(),
                strategy: Some("fastest".into()),
                precopy: false,
            },
        )
        .await
        .unwrap_err();
    assert!(e.detail().unwrap_or("").starts_with("strategy:"), "{e}");
    let e = admin
        .migrate_vm(
            "mover",
            &MigrateVm {
                to: "host-b".into(),
                strategy: None,
                precopy: false,
            },
        )
        .await
        .unwrap_err();
    assert!(
        e.detail().unwrap_or("").contains("already runs on host-b"),
        "{e}"
    );
}

#[tokio::test]
async fn the_destination_finishes_from_the_restarted_source_cache_after_a_kill9() {
    let (s, token_file) = cluster().await;
    let admin = s.admin();
    let (a_dir, b_dir) = (path_in(&s, "a"), path_in(&s, "b"));
    let mut a = spawn_agent(&s, "host-a", &a_dir, &token_file);
    // Slow peer reads (fail point) so that the rebuild takes seconds, not 100 ms.
    let _b = spawn_agent_env(
        &s,
        "host-b",
        &b_dir,
        &token_file,
        &[("VINFRA_PEER_DELAY_MS", "15")],
    );
    wait_host_up(&s, "host-a").await;
    wait_host_up(&s, "host-b").await;
    // 63 ticks cover every MiB of the disk (the guest strides by 37 MiB mod 63).
    boot_and_warm(&admin, "host-a", 66).await;

    let m = admin
        .migrate_vm(
            "mover",
            &MigrateVm {
                to: "host-b".into(),
                strategy: None,
                precopy: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        m.strategy, "heat+pattern",
        "the seed's method is the default"
    );
    // Mid warm-up: switched over, some blocks rebuilt, many left.
    test_utils::wait_for(Duration::from_secs(60), || async {
        admin.get_migration(m.id).await.is_ok_and(|m| {
            m.state == MigrationState::Warming
                && m.progress
                    .as_ref()
                    .is_some_and(|p| p.done > 20 && p.left > 200)
        })
    })
    .await
    .expect("migration reaches mid warm-up");
    a.kill(); // SIGKILL: the source host's cache service dies with its agent
    let at_crash = admin.get_migration(m.id).await.unwrap();
    let p0 = at_crash.progress.clone().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _a2 = spawn_agent(&s, "host-a", &a_dir, &token_file);
    test_utils::wait_for(Duration::from_secs(120), || async {
        admin
            .get_migration(m.id)
            .await
            .is_ok_and(|m| m.state.is_final())
    })
    .await
    .expect("migration completes after the source restarts");
    let done = admin.get_migration(m.id).await.unwrap();
    assert_eq!(done.state, MigrationState::Completed, "{:?}", done.error);
    let p1 = done.progress.unwrap();
    assert!(
        p1.peer_bytes > p0.peer_bytes,
        "the rest came from the restarted source cache: {p0:?} -> {p1:?}"
    );
    // Nothing more from the origin after the crash, except the one block the guest keeps
    // rewriting (its sequence record, 4 KiB in the first 64 KiB block of the disk's last
    // MiB): a write after the snapshot makes the peer's copy stale, so the destination
    // must take that block from the origin, crash or no crash.
    assert!(
        p1.origin_bytes.saturating_sub(p0.origin_bytes) <= 64 * 1024,
        "at most the guest's rewritten block from the origin after the crash: {p0:?} -> {p1:?}"
    );
    let log = test_utils::log_tail(&a_dir.join("agent.log"), 400);
    assert!(
        log.contains("serving the cache to the destination again"),
        "{log}"
    );
    // The guest rode through: still ticking, no failed check.
    let (before, _) = ticks(&admin.console("mover").await.unwrap());
    test_utils::wait_for(Duration::from_secs(60), || async {
        let (last, _) = ticks(&admin.console("mover").await.unwrap_or_default());
        last > before.map(|n| n + 2)
    })
    .await
    .expect("the guest keeps ticking");
    let (_, bad) = ticks(&admin.console("mover").await.unwrap());
    assert!(!bad, "a read or write check failed in the guest");
}

/// Two machines (network namespaces joined by a bridge), agents joined over TLS: a VM
/// moves from one to the other, its memory over QEMU's TLS and its cache from the
/// source's peer export over NBD with STARTTLS; that export refuses clear text.
#[tokio::test]
async fn a_vm_migrates_between_two_machines_over_tls() {
    use crate::vm_network::TwoMachines;
    let (two, s) = TwoMachines::start(&[251, 1]).await;
    let admin = s.admin();
    boot_and_warm(&admin, "host-a", 3).await;

    // host-a's peer exports are on the data network, and refuse clear text.
    let a = admin.get_host("host-a").await.unwrap();
    let nbd_addr: std::net::SocketAddr = a.nbd_addr.as_deref().unwrap().parse().unwrap();
    assert_eq!(nbd_addr.ip().to_string(), "10.251.1.2");
    let vm = admin.get_vm("mover").await.unwrap();
    let plain = tokio::task::spawn_blocking(move || {
        nbd::NbdClient::connect(&nbd::NbdAddr::Tcp(nbd_addr), &format!("peer-{}", vm.id))
    })
    .await
    .unwrap();
    assert!(
        matches!(&plain, Err(nbd::NbdError::OptionRefused { reply, .. }) if *reply == nbd::proto::REP_ERR_TLS_REQD),
        "{plain:?}"
    );

    let t = s.admin_token();
    let (ok, out, err) = cli(
        &s,
        &t,
        &["vm", "migrate", "mover", "--to", "host-b", "-o", "json"],
    );
    if !ok {
        panic!(
            "migrate failed: {out}{err}\n{}\n{}",
            test_utils::log_tail(&two.dirs[0].join("agent.log"), 30),
            test_utils::log_tail(&two.dirs[1].join("agent.log"), 30)
        );
    }
    let ms: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ms[0]["state"], "completed", "{out}");
    assert!(
        ms[0]["progress"]["peer_bytes"].as_u64().unwrap() > 0,
        "blocks came from the source cache over TLS: {out}"
    );
    assert_eq!(admin.get_vm("mover").await.unwrap().host.as_str(), "host-b");
    let (before, _) = ticks(&admin.console("mover").await.unwrap());
    test_utils::wait_for(Duration::from_secs(60), || async {
        let (last, _) = ticks(&admin.console("mover").await.unwrap_or_default());
        last > before.map(|n| n + 2)
    })
    .await
    .expect("the guest keeps ticking on the other machine");
    let (_, bad) = ticks(&admin.console("mover").await.unwrap());
    assert!(!bad, "a read or write check failed in the guest");
}
