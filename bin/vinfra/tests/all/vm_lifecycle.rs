//! A real QEMU VM through server + agent processes and the CLI.

use std::path::Path;
use std::time::Duration;

use crate::harness::{cli, cluster, path_in, spawn_agent, wait_host_up};

pub fn qemu_pids_under(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return pids;
    };
    let needle = dir.to_string_lossy().into_owned();
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(p.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.starts_with("qemu") && cmd.contains(&needle) {
                pids.push(pid);
            }
        }
    }
    pids
}

#[tokio::test]
async fn vm_boots_runs_its_workload_stops_starts_and_is_deleted() {
    let (s, token_file) = cluster().await;
    let admin = s.admin();
    let host_dir = path_in(&s, "h");
    let _agent = spawn_agent(&s, "host-b", &host_dir, &token_file);
    wait_host_up(&s, "host-b").await;

    let t = s.admin_token();
    let (ok, out, err) = cli(&s, &t, &["vm", "create", "demo", "--host", "host-b"]);
    assert!(
        ok,
        "vm create failed: {err}\n{}",
        test_utils::log_tail(&host_dir.join("agent.log"), 30)
    );
    assert!(out.contains("running"), "{out}");
    // The guest's disk workload runs: reads and writes through NBD check out.
    test_utils::wait_for(Duration::from_secs(60), || async {
        let c = admin.console("demo").await.unwrap_or_default();
        c.lines()
            .filter(|l| l.starts_with("TICK") && l.contains("read=ok write=ok"))
            .count()
            >= 3
    })
    .await
    .expect("guest ticks on the console");
    let console = cli(&s, &t, &["vm", "console", "demo"]).1;
    assert!(console.contains("GUEST: READY"), "{console}");
    assert!(!console.contains("BAD"), "{console}");
    assert_eq!(qemu_pids_under(&host_dir).len(), 1, "qemu runs");

    let (ok, out, err) = cli(&s, &t, &["vm", "stop", "demo"]);
    assert!(ok && out.contains("stopped"), "{out}{err}");
    let (ok, out, err) = cli(&s, &t, &["vm", "start", "demo"]);
    assert!(ok && out.contains("running"), "{out}{err}");

    let (ok, out, err) = cli(&s, &t, &["vm", "delete", "demo"]);
    assert!(ok, "{out}{err}");
    assert!(admin.get_vm("demo").await.unwrap_err().status() == Some(404));
    test_utils::wait_until(Duration::from_secs(10), || {
        qemu_pids_under(&host_dir).is_empty()
    })
    .await
    .expect("no qemu or qemu-nbd process left");
    let vms_dir = host_dir.join("vms");
    assert_eq!(
        std::fs::read_dir(&vms_dir).unwrap().count(),
        0,
        "vm files removed"
    );
}
