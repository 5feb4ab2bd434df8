//! An agent restarted around running VMs: after a crash it adopts them (they kept
//! running); after an orderly shutdown it boots them again.

use std::time::Duration;

use compute::{ComputeDriver, VmStatus};
use model::ObservedState;

use crate::harness::{self, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_agent_adopts_its_running_vms_and_their_disks() {
    let c = Cluster::start().await;
    let drv = Cluster::driver();
    let a = c.agent("host-a", &drv).await;
    let vm = c.create_vm("web", "host-a").await;
    let id = vm.id.to_string();
    c.wait_running(&vm).await;

    a.kill().await;
    // The guest outlives its agent; its disk server died with the agent, so its disk
    // requests wait for the next one (as QEMU's reconnect-delay does).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(drv.status(&id).await.unwrap(), VmStatus::Running);

    let _a = c.agent("host-a", &drv).await;
    let before = harness::good_ticks(&c.admin.console(&id).await.unwrap());
    // Adopted, not rebooted: one boot, and the disk works again through the new
    // agent's NBD server (same port) and the reopened cache.
    let console = c.wait_ticks(&vm, before, 3).await;
    assert_eq!(drv.start_count(&id), 1);
    assert_eq!(
        console.matches("GUEST: init started").count(),
        1,
        "{console}"
    );
    let ticks = harness::tick_numbers(&console);
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "tick numbers jump: {ticks:?}"
    );
    let v = c.admin.get_vm(&id).await.unwrap();
    assert_eq!(v.observed, ObservedState::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_process_adopts_vms_from_their_run_dirs() {
    let c = Cluster::start().await;
    let drv = Cluster::driver();
    let a = c.agent("host-a", &drv).await;
    let vm = c.create_vm("web", "host-a").await;
    let id = vm.id.to_string();
    c.wait_running(&vm).await;

    // kill -9 of a `vinfra agent --driver sim` process: the agent and the driver go.
    a.kill().await;
    drop(drv);
    let drv = Cluster::driver();
    let _a = c.agent("host-a", &drv).await;
    let before = harness::good_ticks(&c.admin.console(&id).await.unwrap());
    let console = c.wait_ticks(&vm, before, 3).await;
    assert_eq!(drv.start_count(&id), 0, "adopted, not started");
    assert_eq!(drv.running(), vec![id.clone()]);
    assert_eq!(
        console.matches("GUEST: init started").count(),
        1,
        "{console}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_shut_down_stops_its_vms_and_the_next_one_boots_them() {
    let c = Cluster::start().await;
    let drv = Cluster::driver();
    let a = c.agent("host-a", &drv).await;
    let vm = c.create_vm("web", "host-a").await;
    let id = vm.id.to_string();
    c.wait_running(&vm).await;

    a.shutdown().await;
    let v = c.admin.get_vm(&id).await.unwrap();
    assert_eq!(v.observed, ObservedState::Stopped);
    assert_eq!(v.error.as_deref(), Some("host agent shut down"));
    assert!(matches!(
        drv.status(&id).await.unwrap(),
        VmStatus::Stopped { .. }
    ));

    let _a = c.agent("host-a", &drv).await;
    c.wait_running(&vm).await;
    assert_eq!(drv.start_count(&id), 2);
}
