//! Assignment → running → observed, and the user's stop, start and delete.

use compute::{ComputeDriver, VmStatus};
use model::{DesiredState, ObservedState};

use crate::harness::{self, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assigned_vm_boots_reports_running_and_its_console() {
    let c = Cluster::start().await;
    let drv = Cluster::driver();
    let _a = c.agent("host-a", &drv).await;
    let host = c.admin.get_host("host-a").await.unwrap();
    assert_eq!(host.drivers, vec!["sim".to_owned()]);
    assert_eq!(host.memory_mib, 64 * 1024);

    let vm = c.create_vm("web", "host-a").await;
    let v = c.wait_running(&vm).await;
    assert_eq!(v.host.as_str(), "host-a");
    assert_eq!(v.error, None);
    let id = vm.id.to_string();
    assert_eq!(drv.running(), vec![id.clone()]);
    assert_eq!(drv.start_count(&id), 1);
    // The guest's disk is the VM's origin through this host's cache and NBD server.
    let console = c.admin.console(&id).await.unwrap();
    assert!(console.starts_with("GUEST: init started"), "{console}");
    assert!(c
        .dir
        .path()
        .join("origin")
        .join(format!("{id}.img"))
        .exists());
    assert!(harness::run_dir(&c.host_dir("host-a"), &vm)
        .join("cache")
        .is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_and_delete_reach_the_hypervisor() {
    let c = Cluster::start().await;
    let drv = Cluster::driver();
    let _a = c.agent("host-a", &drv).await;
    let vm = c.create_vm("db", "host-a").await;
    let id = vm.id.to_string();
    c.wait_running(&vm).await;

    c.admin.stop_vm(&id).await.unwrap();
    c.wait_vm(&vm, "observed stopped", |v| {
        v.observed == ObservedState::Stopped
    })
    .await;
    assert_eq!(
        drv.status(&id).await.unwrap(),
        VmStatus::Stopped {
            reason: "stopped by request".into()
        }
    );
    assert!(drv.running().is_empty());

    c.admin.start_vm(&id).await.unwrap();
    c.wait_vm(&vm, "observed running again", |v| {
        v.observed == ObservedState::Running && v.desired == DesiredState::Running
    })
    .await;
    // A second boot: the console starts over, the disk kept what the first one wrote.
    let console = c.wait_ticks(&vm, 0, 2).await;
    assert_eq!(
        console.matches("GUEST: init started").count(),
        1,
        "{console}"
    );
    assert_eq!(drv.start_count(&id), 2);

    let run_dir = harness::run_dir(&c.host_dir("host-a"), &vm);
    assert!(run_dir.exists());
    c.admin.delete_vm(&id).await.unwrap();
    let admin = c.admin.clone();
    harness::wait("the vm record to go", || {
        let (admin, id) = (admin.clone(), id.clone());
        async move {
            admin
                .get_vm(&id)
                .await
                .is_err_and(|e| e.status() == Some(404))
        }
    })
    .await;
    assert!(drv.running().is_empty());
    assert!(!run_dir.exists(), "run dir left behind");
    assert!(!c
        .dir
        .path()
        .join("origin")
        .join(format!("{id}.img"))
        .exists());
}

/// The server pushes each change to the host's agent: with the poll a minute apart, a
/// new VM boots and a stop reaches the hypervisor within a second or two (the first pass
/// after the stream opens, then the pushed events alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_changes_reach_the_vm_without_waiting_for_a_poll() {
    let c = Cluster::start().await;
    let drv = Cluster::driver();
    let mut cfg = c.agent_config("host-a", &drv);
    cfg.poll = std::time::Duration::from_secs(60);
    let _a = harness::TestAgent::spawn(cfg);
    // Registered, stream open (its first event asks for a full pass at once).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let within = |what: &'static str, cond: Box<dyn Fn() -> bool>| async move {
        let t0 = std::time::Instant::now();
        while !cond() {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(5),
                "{what} waited for a poll (60 s away)"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        t0.elapsed()
    };
    let vm = c.create_vm("web", "host-a").await;
    let id = vm.id.to_string();
    let (d, i) = (drv.clone(), id.clone());
    let booted = within("the boot", Box::new(move || d.running().contains(&i))).await;
    c.admin.stop_vm(&id).await.unwrap();
    let (d, i) = (drv.clone(), id.clone());
    let stopped = within("the stop", Box::new(move || !d.running().contains(&i))).await;
    eprintln!("pushed: create -> running {booted:?}, stop -> stopped {stopped:?}");
    let v = c
        .wait_vm(&vm, "stopped", |v| {
            v.desired == DesiredState::Stopped && v.observed == ObservedState::Stopped
        })
        .await;
    assert_eq!(v.error, None);
}
