//! Host maintenance mode with real QEMU VMs moved by live migration.

use std::time::Duration;

use model::api::CreateVm;

use crate::harness::{cli, cluster, path_in, spawn_agent, ticks, wait_host_up};
use crate::vm_lifecycle::qemu_pids_under;

#[tokio::test]
async fn a_host_in_maintenance_is_drained_live_kept_cordoned_and_released() {
    let (s, token_file) = cluster().await;
    let admin = s.admin();
    let dirs: Vec<_> = ["a", "b", "c"].iter().map(|d| path_in(&s, d)).collect();
    let mut agents: Vec<_> = ["host-a", "host-b", "host-c"]
        .iter()
        .zip(&dirs)
        .map(|(h, d)| spawn_agent(&s, h, d, &token_file))
        .collect();
    for h in ["host-a", "host-b", "host-c"] {
        wait_host_up(&s, h).await;
    }
    for name in ["web-1", "web-2"] {
        admin
            .create_vm(&CreateVm {
                name: name.into(),
                image: "default".into(),
                vcpus: 1,
                memory_mib: 256,
                host: Some("host-a".into()),
                tenant: None,
                redundant: false,
                disk_gib: None,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for name in ["web-1", "web-2"] {
        test_utils::wait_for(Duration::from_secs(120), || async {
            ticks(&admin.console(name).await.unwrap_or_default()).0 >= Some(3)
        })
        .await
        .expect("guest runs");
    }
    let t = s.admin_token();

    // Dry run: a plan, nothing changes.
    let (ok, out, err) = cli(
        &s,
        &t,
        &[
            "host",
            "maintenance",
            "enter",
            "host-a",
            "--dry-run",
            "-o",
            "json",
        ],
    );
    assert!(ok, "{out}{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["items"].as_array().map(|a| a.len()), Some(2), "{out}");
    assert!(admin
        .get_host("host-a")
        .await
        .unwrap()
        .maintenance
        .is_none());
    // Nonsense target: refused naming the field, nothing cordoned.
    let (ok, _, err) = cli(
        &s,
        &t,
        &["host", "maintenance", "enter", "host-a", "--to", "host-a"],
    );
    assert!(!ok && err.contains("to:"), "{err}");
    assert!(admin
        .get_host("host-a")
        .await
        .unwrap()
        .maintenance
        .is_none());

    let (ok, out, err) = cli(&s, &t, &["host", "maintenance", "enter", "host-a"]);
    assert!(ok, "maintenance enter failed: {out}{err}");
    assert!(out.contains("in_maintenance"), "{out}");
    for name in ["web-1", "web-2"] {
        let vm = admin.get_vm(name).await.unwrap();
        assert_ne!(vm.host.as_str(), "host-a", "{name} moved");
        let (before, _) = ticks(&admin.console(name).await.unwrap());
        test_utils::wait_for(Duration::from_secs(60), || async {
            ticks(&admin.console(name).await.unwrap_or_default()).0 > before.map(|n| n + 2)
        })
        .await
        .expect("the workload keeps running on the new host");
        assert!(
            !ticks(&admin.console(name).await.unwrap()).1,
            "{name}: a check failed"
        );
    }
    test_utils::wait_until(Duration::from_secs(15), || {
        qemu_pids_under(&dirs[0]).is_empty()
    })
    .await
    .expect("host-a runs no VM");
    // Cordoned: no new VM lands there, even after its agent is killed and restarts.
    agents[0].kill();
    agents[0] = spawn_agent(&s, "host-a", &dirs[0], &token_file);
    wait_host_up(&s, "host-a").await;
    assert!(admin
        .get_host("host-a")
        .await
        .unwrap()
        .maintenance
        .is_some());
    let e = admin
        .create_vm(&CreateVm {
            name: "late".into(),
            image: "default".into(),
            vcpus: 1,
            memory_mib: 64,
            host: Some("host-a".into()),
            tenant: None,
            redundant: false,
            disk_gib: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.detail().unwrap_or("").contains("in maintenance"), "{e}");

    let (ok, out, err) = cli(&s, &t, &["host", "maintenance", "exit", "host-a"]);
    assert!(ok && out.contains("released"), "{out}{err}");
    assert!(admin
        .get_host("host-a")
        .await
        .unwrap()
        .maintenance
        .is_none());
    drop(agents);
}
