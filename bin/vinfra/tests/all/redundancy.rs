//! Redundant placement: storage pair first, then connectable servers, paired;
//! and the standby taking over when the primary host dies.

use std::time::Duration;

use crate::harness::{cli, cluster, path_in, spawn_agent, ticks, wait_host_up};
use crate::vm_lifecycle::qemu_pids_under;

const INVENTORY: &str = r#"
storage:
  - {name: array-1, capacity_gib: 100, free_gib: 80, replication: [sync], failure_domain: rack-1}
  - {name: array-2, capacity_gib: 100, free_gib: 60, replication: [sync], failure_domain: rack-2}
  - {name: scratch, capacity_gib: 500, free_gib: 500, failure_domain: rack-1}
connectivity:
  host-a: [array-1, scratch]
  host-b: [array-2]
"#;

#[tokio::test]
async fn a_redundant_vm_is_placed_on_a_pair_and_restarts_on_its_standby() {
    let (s, token_file) = cluster().await;
    let admin = s.admin();
    let dirs = [path_in(&s, "a"), path_in(&s, "b")];
    let mut agents = vec![
        spawn_agent(&s, "host-a", &dirs[0], &token_file),
        spawn_agent(&s, "host-b", &dirs[1], &token_file),
    ];
    wait_host_up(&s, "host-a").await;
    wait_host_up(&s, "host-b").await;
    let t = s.admin_token();
    let file = path_in(&s, "storage.yaml");
    std::fs::write(&file, INVENTORY).unwrap();
    let (ok, out, err) = cli(&s, &t, &["storage", "load", file.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("array-2") && out.contains("host-b"), "{out}");

    // Too big for any pair: the refusal says which constraint failed, as data and text.
    let (ok, out, err) = cli(
        &s,
        &t,
        &["placement", "explain", "--disk-gib", "70", "-o", "json"],
    );
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["placed"], false, "{out}");
    assert!(r["text"].as_str().unwrap().contains("array-2"), "{out}");
    assert!(
        !r["explanation"]["candidates"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{out}"
    );
    // A bad inventory is refused with the path of the problem.
    std::fs::write(
        &file,
        "storage:\n  - {name: x, capacity_gib: 1, free_gib: 5, failure_domain: r}\n",
    )
    .unwrap();
    let (ok, _, err) = cli(&s, &t, &["storage", "load", file.to_str().unwrap()]);
    assert!(!ok && err.contains("storage[0]"), "{err}");

    let (ok, out, err) = cli(
        &s,
        &t,
        &["vm", "create", "db", "--redundant", "--disk-gib", "2"],
    );
    assert!(ok, "create failed: {out}{err}");
    let vm = admin.get_vm("db").await.unwrap();
    let red = vm.redundancy.clone().expect("redundant placement recorded");
    let (primary, standby) = (vm.host.clone(), red.standby_host.clone());
    assert_ne!(primary, standby);
    let storages = [red.primary_storage.as_str(), red.standby_storage.as_str()];
    assert!(
        storages.contains(&"array-1") && storages.contains(&"array-2"),
        "{red:?}"
    );
    test_utils::wait_for(Duration::from_secs(60), || async {
        ticks(&admin.console("db").await.unwrap_or_default()).0 >= Some(2)
    })
    .await
    .expect("guest runs on the primary");

    // The primary host dies: its agent and its QEMU, at once.
    let p = if primary.as_str() == "host-a" { 0 } else { 1 };
    agents[p].kill();
    for pid in qemu_pids_under(&dirs[p]) {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    test_utils::wait_for(Duration::from_secs(60), || async {
        admin
            .get_vm("db")
            .await
            .is_ok_and(|v| v.host == standby && v.observed == model::ObservedState::Running)
    })
    .await
    .expect("the standby takes over");
    let vm = admin.get_vm("db").await.unwrap();
    let red = vm.redundancy.unwrap();
    assert_eq!(red.takeovers, 1);
    assert_eq!(
        red.standby_host, primary,
        "the failed host is the new standby"
    );
    test_utils::wait_for(Duration::from_secs(60), || async {
        let c = admin.console("db").await.unwrap_or_default();
        c.contains("GUEST: READY") && ticks(&c).0 >= Some(2)
    })
    .await
    .expect("the guest runs on the standby");
    assert!(!ticks(&admin.console("db").await.unwrap()).1);
    assert_eq!(qemu_pids_under(&dirs[1 - p]).len(), 1);
    drop(agents);
}
