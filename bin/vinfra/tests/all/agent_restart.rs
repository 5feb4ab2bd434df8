//! A real QEMU VM across a `kill -9` of its agent: the next agent adopts the QEMU and
//! serves its disk again before QEMU's NBD reconnect gives up.

use std::time::Duration;

use model::api::CreateVm;

use crate::harness::{cluster, path_in, spawn_agent, ticks, wait_host_up};
use crate::vm_lifecycle::qemu_pids_under;

fn good_ticks(console: &str) -> usize {
    console
        .lines()
        .filter(|l| l.starts_with("TICK") && l.contains("read=ok write=ok"))
        .count()
}

#[tokio::test]
async fn a_vm_keeps_its_disk_across_a_kill9_of_its_agent() {
    let (s, token_file) = cluster().await;
    let admin = s.admin();
    let host_dir = path_in(&s, "h");
    let mut agent = spawn_agent(&s, "host-a", &host_dir, &token_file);
    wait_host_up(&s, "host-a").await;
    admin
        .create_vm(&CreateVm {
            name: "demo".into(),
            image: "default".into(),
            vcpus: 1,
            memory_mib: 256,
            host: Some("host-a".into()),
            tenant: None,
            redundant: false,
            disk_gib: None,
            nics: vec![],
            kernel_args: None,
            resource_tables: vec![],
        })
        .await
        .unwrap();
    test_utils::wait_for(Duration::from_secs(90), || async {
        good_ticks(&admin.console("demo").await.unwrap_or_default()) >= 3
    })
    .await
    .expect("guest ticks on the console");
    let pids = qemu_pids_under(&host_dir);
    assert_eq!(pids.len(), 1, "qemu runs");

    agent.kill();
    let (before, _) = ticks(&admin.console("demo").await.unwrap());
    let before = before.unwrap();
    let _agent = spawn_agent(&s, "host-a", &host_dir, &token_file);
    // Well within QEMU's 30 s reconnect-delay: the guest's reads and writes go on.
    let resumed = test_utils::wait_for(Duration::from_secs(25), || async {
        let c = admin.console("demo").await.unwrap_or_default();
        matches!(ticks(&c), (Some(n), false) if n >= before + 5)
    })
    .await;
    let console = admin.console("demo").await.unwrap_or_default();
    assert!(
        resumed.is_ok(),
        "the guest's disk did not come back after the agent restart (ticks before: \
         {before}):\n{console}\n{}",
        test_utils::log_tail(&host_dir.join("agent.log"), 30)
    );
    assert_eq!(qemu_pids_under(&host_dir), pids, "adopted, not rebooted");
    assert_eq!(
        console.matches("GUEST: init started").count(),
        1,
        "{console}"
    );
}
