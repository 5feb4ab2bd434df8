//! What the agent does when the hypervisor fails: a start that fails, a VM that dies.

use std::time::Duration;

use compute::{ComputeDriver, VmStatus};
use model::{DesiredState, ObservedState};

use crate::harness::{self, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_is_reported_and_a_new_request_retries() {
    let c = Cluster::start().await;
    let drv = Cluster::driver();
    let _a = c.agent("host-a", &drv).await;
    // A fault is armed per VM id, known once the VM exists: boot it, stop it, arm.
    let vm = c.create_vm("web", "host-a").await;
    let id = vm.id.to_string();
    c.wait_running(&vm).await;
    c.admin.stop_vm(&id).await.unwrap();
    c.wait_vm(&vm, "stopped", |v| v.observed == ObservedState::Stopped)
        .await;

    drv.fail_next_start(&id, "qemu: cannot allocate guest memory");
    c.admin.start_vm(&id).await.unwrap();
    let v = c
        .wait_vm(&vm, "observed failed", |v| {
            v.observed == ObservedState::Failed
        })
        .await;
    let err = v.error.unwrap_or_default();
    assert!(
        err.contains("cannot allocate guest memory"),
        "the reason reaches the user: {err}"
    );
    // Not retried in a tight loop: the failure sticks for this desired state.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(drv.start_count(&id), 1);
    assert_eq!(
        c.admin.get_vm(&id).await.unwrap().observed,
        ObservedState::Failed
    );

    // A new desired state clears the failure; the next start works.
    c.admin.stop_vm(&id).await.unwrap();
    c.wait_vm(&vm, "stopped", |v| v.observed == ObservedState::Stopped)
        .await;
    c.admin.start_vm(&id).await.unwrap();
    c.wait_running(&vm).await;
    assert_eq!(drv.start_count(&id), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_dies_is_noticed_and_booted_again() {
    let c = Cluster::start().await;
    let drv = Cluster::driver();
    let _a = c.agent("host-a", &drv).await;
    let vm = c.create_vm("web", "host-a").await;
    let id = vm.id.to_string();
    c.wait_running(&vm).await;

    drv.crash(&id, "qemu died (signal 9)").await.unwrap();
    assert!(matches!(
        drv.status(&id).await.unwrap(),
        VmStatus::Crashed { .. }
    ));
    // The agent notices the exit on its next pass and, the VM being wanted running,
    // boots it again (the agent's restart policy: always).
    let d = drv.clone();
    let want = id.clone();
    harness::wait("a second boot", || {
        let (d, want) = (d.clone(), want.clone());
        async move { d.start_count(&want) == 2 }
    })
    .await;
    harness::wait_driver(&drv, &id, "running", |s| *s == VmStatus::Running).await;
    let v = c
        .wait_vm(&vm, "observed running", |v| {
            v.observed == ObservedState::Running && v.desired == DesiredState::Running
        })
        .await;
    assert_eq!(v.error, None);
    c.wait_ticks(&vm, 0, 2).await;
}
