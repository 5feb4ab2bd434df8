//! A real QEMU VM through server + agent processes and the CLI.

use std::path::Path;
use std::time::Duration;

use crate::harness::{cli, path_in, spawn_agent, Server};

fn qemu_pids_under(dir: &Path) -> Vec<u32> {
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
    test_utils::require_tool("qemu-system-x86_64", "run scripts/setup.sh").unwrap();
    let image = tokio::task::spawn_blocking(|| {
        compute::ensure_default_image(&compute::default_cache_dir(), |_| {})
    })
    .await
    .unwrap()
    .expect("default guest image (scripts/setup.sh installs what it needs)");

    let s = Server::start().await;
    let admin = s.admin();
    let agent_token = admin
        .create_token(&model::api::CreateToken {
            role: model::Role::Agent,
            tenant: None,
        })
        .await
        .unwrap()
        .token;
    let token_file = path_in(&s, "agent-token");
    std::fs::write(&token_file, &agent_token).unwrap();
    let host_dir = path_in(&s, "h");
    let _agent = spawn_agent(&s, "host-b", &host_dir, &token_file);
    test_utils::wait_for(Duration::from_secs(30), || async {
        admin
            .get_host("host-b")
            .await
            .is_ok_and(|h| h.state == model::HostState::Up)
    })
    .await
    .expect("agent registers");
    admin
        .create_image(&model::api::CreateImage {
            name: "default".into(),
            kernel: Some(image.kernel.display().to_string()),
            initrd: Some(image.initrd.display().to_string()),
            disk_template: Some(image.disk_template.display().to_string()),
            cmdline: image.cmdline.clone(),
            disk_mib: 64,
            tenant: None,
        })
        .await
        .unwrap();

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
    assert_eq!(qemu_pids_under(&host_dir).len(), 2, "qemu + qemu-nbd run");

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
