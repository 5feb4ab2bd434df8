//! Real guests' traffic counted by the kernel classifier on their taps: three QEMU guests on
//! one network, two hosts of one domain (as `vinfra up` builds them: agents with `--vswitch`,
//! one bridge per network shared by the hosts). Two guests ping a third a known number of
//! times (`vinfra.ticks=N vinfra.ping=IP`: one echo per tick, then the guest powers off), and
//! `vinfra traffic top -o json` shows exactly those echoes and replies in the right class and
//! VM pair, ARP in its own row. (Two domains and a move of a VM between hosts are covered on
//! veths in `crates/net/tests/all/kernel.rs`: four guests under TCG would cost minutes.)

use std::time::Duration;

use crate::harness::{cli, cluster_with, path_in, spawn_agent_in, Server};

fn count(console: &str, needle: &str) -> usize {
    console.lines().filter(|l| l.contains(needle)).count()
}

/// ICMP echo frames: 14 Ethernet + 20 IPv4 + 8 ICMP + 56 payload.
const PING_FRAME: u64 = 98;

#[tokio::test]
async fn guests_pings_are_counted_by_class_and_pair() {
    test_utils::require_tool("bpftool", "install bpftool (scripts/setup.sh)").unwrap();
    let port = test_utils::free_tcp_port();
    let vsw = format!("127.0.0.1:{port}");
    let dir = tempfile::Builder::new()
        .prefix("vi")
        .tempdir_in("/tmp")
        .unwrap();
    let store = format!("redb:{}", dir.path().join("state.redb").display());
    let (s, token_file) = cluster_with(Server::start_with_args(
        dir,
        store,
        &["--vswitch-listen", &vsw],
    ))
    .await;
    let admin = s.admin();
    let t = s.admin_token();
    let (dir_a, dir_b) = (path_in(&s, "ha"), path_in(&s, "hb"));
    let extra = ["--vswitch", vsw.as_str()];
    let _agent_a = spawn_agent_in(&s, "host-a", &dir_a, &token_file, &[], None, &extra);
    let _agent_b = spawn_agent_in(&s, "host-b", &dir_b, &token_file, &[], None, &extra);
    crate::harness::wait_host_up(&s, "host-a").await;
    crate::harness::wait_host_up(&s, "host-b").await;
    let logs = || {
        format!(
            "{}\n{}",
            test_utils::log_tail(&dir_a.join("agent.log"), 60),
            test_utils::log_tail(&dir_b.join("agent.log"), 60)
        )
    };
    let (ok, out, err) = cli(
        &s,
        &t,
        &["network", "create", "blue", "--cidr", "10.72.0.0/24"],
    );
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cli(
        &s,
        &t,
        &["vm", "create", "a", "--host", "host-a", "--nic", "blue"],
    );
    assert!(ok, "vm a: {out}{err}\n{}", logs());
    if test_utils::wait_for(Duration::from_secs(90), || async {
        admin
            .console("a")
            .await
            .unwrap_or_default()
            .contains("GUEST: READY")
    })
    .await
    .is_err()
    {
        panic!(
            "a boots: {}\n{}",
            admin.console("a").await.unwrap_or_default(),
            logs()
        );
    }
    // b on a's host pings it 4 times, c on the other host 3 times.
    for (vm, host, n) in [("b", "host-a", 4), ("c", "host-b", 3)] {
        let args = format!("vinfra.ticks={n} vinfra.ping=10.72.0.1");
        let (ok, out, err) = cli(
            &s,
            &t,
            &[
                "vm",
                "create",
                vm,
                "--host",
                host,
                "--nic",
                "blue",
                "--kernel-args",
                &args,
                "--no-wait",
            ],
        );
        assert!(ok, "vm {vm}: {out}{err}\n{}", logs());
    }
    // Each pinger powers off after its pings; its desired state is still running, so the
    // agent would boot it again within a second. It is stopped as soon as its serial log
    // (read directly: a restarted QEMU truncates it) shows its last ping, long before a
    // rebooted guest (a TCG boot takes many seconds) could configure its NIC again.
    let mut pending = Vec::new();
    for (vm, n) in [("b", 4usize), ("c", 3)] {
        let id = admin.get_vm(vm).await.unwrap().id.0.simple().to_string();
        let host_dir = if vm == "b" { &dir_a } else { &dir_b };
        pending.push((
            vm,
            n,
            host_dir.join("vms").join(&id[..12]).join("console.log"),
        ));
    }
    let end = std::time::Instant::now() + Duration::from_secs(150);
    while !pending.is_empty() {
        assert!(
            std::time::Instant::now() < end,
            "pings not done: {pending:?}\n{}",
            logs()
        );
        let mut i = 0;
        while i < pending.len() {
            let (vm, n, log) = &pending[i];
            let c = std::fs::read_to_string(log).unwrap_or_default();
            let (oks, fails) = (
                count(&c, "PING 10.72.0.1 ok"),
                count(&c, "PING 10.72.0.1 fail"),
            );
            if oks + fails >= *n || c.contains("POWEROFF") {
                admin.stop_vm(vm).await.unwrap();
                assert_eq!((oks, fails), (*n, 0), "{vm}: every echo answered: {c}");
                pending.remove(i);
            } else {
                i += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The controller gets the counts within a report interval or two.
    let want = |r: &serde_json::Value| {
        let class = |k: &str| {
            r["classes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["class"] == k)
                .map(|c| {
                    (
                        c["packets"].as_u64().unwrap_or(0),
                        c["bytes"].as_u64().unwrap_or(0),
                    )
                })
        };
        class("intra_server") == Some((8, 8 * PING_FRAME))
            && class("inter_server") == Some((6, 6 * PING_FRAME))
    };
    let top = || {
        let (ok, out, err) = cli(&s, &t, &["traffic", "top", "-o", "json"]);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    if test_utils::wait_until(Duration::from_secs(20), || want(&top()))
        .await
        .is_err()
    {
        panic!("traffic top: {}\n{}", top(), logs());
    }
    // Settled: another report round adds nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = top();
    assert!(want(&r), "{r}");
    let class = |k: &str| {
        r["classes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["class"] == k)
            .map(|c| c["packets"].clone())
    };
    assert_eq!(class("inter_domain"), Some(serde_json::json!(0)), "{r}");
    let pair = |src: &str, dst: &str| {
        r["pairs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["src_vm"] == src && p["dst_vm"] == dst)
            .map(|p| {
                (
                    p["class"].as_str().unwrap_or("").to_owned(),
                    p["packets"].as_u64().unwrap_or(0),
                )
            })
    };
    assert_eq!(pair("b", "a"), Some(("intra_server".into(), 4)), "{r}");
    assert_eq!(pair("a", "b"), Some(("intra_server".into(), 4)), "{r}");
    assert_eq!(pair("c", "a"), Some(("inter_server".into(), 3)), "{r}");
    assert_eq!(pair("a", "c"), Some(("inter_server".into(), 3)), "{r}");
    assert_eq!(
        r["pairs"].as_array().map(Vec::len),
        Some(4),
        "only the pinged pairs: {r}"
    );
    assert!(
        r["neighbor"]["packets"].as_u64().unwrap_or(0) >= 2,
        "ARP in its own row: {r}"
    );
    let metrics = admin.metrics().await.unwrap();
    assert!(
        metrics
            .contains("vinfra_traffic_packets_total{domain=\"default\",class=\"intra_server\"} 8"),
        "{metrics}"
    );
    let (ok, out, err) = cli(&s, &t, &["traffic", "top"]);
    assert!(ok && out.contains("neighbor"), "{out}{err}");

    for vm in ["a", "b", "c"] {
        let (ok, out, err) = cli(&s, &t, &["vm", "delete", vm]);
        assert!(ok, "{out}{err}");
    }
}
