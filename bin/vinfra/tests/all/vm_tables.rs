//! A VM as a device of a resource table, end to end (docs/SHM.md, "VMs as devices"):
//! a real server, a real agent with the QEMU driver (TCG), the default image. The VM
//! is created through the CLI with `--resource-table`; the agent opens its window on
//! the table before QEMU starts, and QEMU's ivshmem doorbell device connects to it, so
//! the table's report shows a device with `vm` set; stopping the VM detaches it.

use std::time::{Duration, Instant};

use model::resource_tables::{ResourceTable, TableAuditKind};

use crate::harness::{cli, cluster, path_in, spawn_agent, wait_host_up};

/// Waits until `f` holds for table `flows` of host-a; returns it.
async fn table_where(
    c: &client::Client,
    what: &str,
    f: impl Fn(&ResourceTable) -> bool,
) -> ResourceTable {
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(t) = c.get_resource_table("host-a", "flows").await {
            if f(&t) {
                return t;
            }
            last = Some(t);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within 45 s; last {last:#?}");
}

fn vm_device(t: &ResourceTable) -> Option<(u32, i32)> {
    t.state
        .as_ref()?
        .devices
        .iter()
        .find(|d| d.vm.as_deref() == Some("tv"))
        .map(|d| (d.id, d.pid))
}

#[tokio::test]
async fn a_vm_named_on_a_table_is_its_device_while_it_runs() {
    let (s, token_file) = cluster().await;
    let admin = s.admin();
    let host_dir = path_in(&s, "h");
    let _agent = spawn_agent(&s, "host-a", &host_dir, &token_file);
    wait_host_up(&s, "host-a").await;
    let t = s.admin_token();
    let log = || test_utils::log_tail(&host_dir.join("agent.log"), 30);

    let (ok, out, err) = cli(
        &s,
        &t,
        &[
            "resource-table",
            "create",
            "flows",
            "--host",
            "host-a",
            "--entries",
            "16",
            "--entry-size",
            "248",
        ],
    );
    assert!(ok, "{out}{err}");
    // A name the tenant has no table of is refused before anything starts.
    let (ok, _, err) = cli(&s, &t, &["vm", "create", "tv", "--resource-table", "nope"]);
    assert!(!ok);
    assert!(
        err.contains("resource_tables: no resource table nope on any host"),
        "{err}"
    );

    let (ok, out, err) = cli(
        &s,
        &t,
        &[
            "vm",
            "create",
            "tv",
            "--resource-table",
            "flows",
            "--no-wait",
        ],
    );
    assert!(ok, "vm create failed: {out}{err}\n{}", log());
    assert!(out.contains("host-a") && out.contains("flows"), "{out}");
    let (ok, out, err) = cli(&s, &t, &["vm", "show", "tv", "-o", "json"]);
    assert!(ok, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        shown[0]["resource_tables"],
        serde_json::json!(["flows"]),
        "{out}"
    );

    // QEMU connects to its window as it starts: the VM is a device of the table, with
    // QEMU's pid, until it stops.
    let table = table_where(&admin, "the vm attached as a device", |t| {
        vm_device(t).is_some()
    })
    .await;
    let (device, pid) = vm_device(&table).unwrap();
    let qemu = crate::vm_lifecycle::qemu_pids_under(&host_dir);
    assert_eq!(qemu.len(), 1, "one qemu: {qemu:?}");
    assert_eq!(
        u32::try_from(pid).ok(),
        Some(qemu[0]),
        "the device is the vm's qemu"
    );
    let audit = &table.state.as_ref().unwrap().audit;
    assert!(
        audit
            .iter()
            .any(|a| a.device == device && a.kind == TableAuditKind::Attached),
        "{audit:#?}"
    );
    let (ok, out, err) = cli(
        &s,
        &t,
        &["resource-table", "show", "flows", "--host", "host-a"],
    );
    assert!(ok, "{err}");
    let row = out
        .lines()
        .find(|l| l.split_whitespace().last() == Some("tv"))
        .unwrap_or_else(|| panic!("no device row of vm tv in:\n{out}"));
    assert!(row.starts_with(&device.to_string()), "{row}");
    // QEMU connects before the driver's start returns: the agent reports the VM
    // running a moment later.
    test_utils::wait_for(Duration::from_secs(45), || async {
        admin
            .get_vm("tv")
            .await
            .is_ok_and(|v| v.observed == model::ObservedState::Running)
    })
    .await
    .unwrap_or_else(|_| panic!("vm tv did not run: {}", log()));

    // The table cannot be deleted under the VM.
    let (ok, _, err) = cli(
        &s,
        &t,
        &["resource-table", "delete", "flows", "--host", "host-a"],
    );
    assert!(!ok && err.contains("is mapped by vm tv"), "{err}");

    // Stopped, its QEMU is gone and so is the device (detached, in the audit).
    let (ok, out, err) = cli(&s, &t, &["vm", "stop", "tv"]);
    assert!(ok && out.contains("stopped"), "{out}{err}");
    let table = table_where(&admin, "the vm's device gone", |t| vm_device(t).is_none()).await;
    assert!(
        table
            .state
            .as_ref()
            .unwrap()
            .audit
            .iter()
            .any(|a| a.device == device && a.kind == TableAuditKind::Detached),
        "{:#?}",
        table.state
    );
    let sockets: Vec<_> = std::fs::read_dir(host_dir.join("vms"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter(|f| f.file_name().to_string_lossy().starts_with("table-"))
        .map(|f| f.path())
        .collect();
    assert!(sockets.is_empty(), "window sockets left: {sockets:?}");
}
