//! Real guests' traffic counted by the kernel classifier on their taps, end to end: four QEMU
//! guests on one network in two domains, as `vinfra up`-style deployments build them (agents
//! with `--vswitch`, one bridge per network shared by the hosts of a machine).
//!
//! Domain `east` is one server with hosts host-a (guests a, b) and host-b (guest c); domain
//! `west` is a second server with host-d (guest d). Each server has its own network `blue`
//! (same subnet, disjoint addresses); the two networks' bridges are joined by a veth the
//! test makes — the link between the domains. b, c and d ping a a known number of times
//! (`vinfra.ticks=N vinfra.ping=IP`: one echo per tick, then the guest powers off), and
//! `vinfra traffic top -o json` of each server shows exactly those echoes and replies in the
//! right class and VM pair, ARP in its own row; each server exports IPFIX to its own
//! Debian `nfcapd`, and `nfdump` reads back the same per-pair counts. Then a fifth guest on
//! host-b pings a while it is live-migrated to host-a: its counting moves to host-a's
//! classifier and not one frame is lost or counted twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{cli, cluster_with, path_in, spawn_agent_in, Server};
use crate::nfcapd::Nfcapd;

fn count(console: &str, needle: &str) -> usize {
    console.lines().filter(|l| l.contains(needle)).count()
}

/// ICMP echo frames: 14 Ethernet + 20 IPv4 + 8 ICMP + 56 payload.
const PING_FRAME: u64 = 98;

/// The veth joining the two domains' bridges (and the bridges, made before the agents'
/// first tap so the link is up before any guest sends), removed at the end or on failure.
struct DomainLink {
    veth: String,
    bridges: [String; 2],
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl DomainLink {
    fn new(east: &str, west: &str) -> DomainLink {
        let sfx = format!("{:x}", std::process::id() % 0xfffff);
        let (v0, v1) = (format!("vdl{sfx}e"), format!("vdl{sfx}w"));
        let link = DomainLink {
            veth: v0.clone(),
            bridges: [east.to_owned(), west.to_owned()],
        };
        for br in [east, west] {
            ip(&["link", "add", br, "type", "bridge"]);
            ip(&["link", "set", br, "up"]);
        }
        ip(&["link", "add", &v0, "type", "veth", "peer", "name", &v1]);
        for (v, br) in [(&v0, east), (&v1, west)] {
            ip(&["link", "set", v, "master", br]);
            ip(&["link", "set", v, "up"]);
        }
        link
    }
}

impl Drop for DomainLink {
    fn drop(&mut self) {
        for dev in std::iter::once(&self.veth).chain(&self.bridges) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", dev])
                .output();
        }
    }
}

/// One domain: its server, the collector of its IPFIX export, its token.
struct Domain {
    s: Server,
    t: String,
    token_file: PathBuf,
    vsw: String,
    nf: Nfcapd,
}

async fn domain(name: &str) -> Domain {
    let nf = Nfcapd::start();
    let vsw = format!("127.0.0.1:{}", test_utils::free_tcp_port());
    let dir = tempfile::Builder::new()
        .prefix("vi")
        .tempdir_in("/tmp")
        .unwrap();
    let store = format!("redb:{}", dir.path().join("state.redb").display());
    let collector = nf.addr.to_string();
    let (s, token_file) = cluster_with(Server::start_with_args(
        dir,
        store,
        &[
            "--vswitch-listen",
            &vsw,
            "--domain",
            name,
            "--ipfix-collector",
            &collector,
        ],
    ))
    .await;
    let t = s.admin_token();
    Domain {
        s,
        t,
        token_file,
        vsw,
        nf,
    }
}

impl Domain {
    fn agent(&self, host: &str, dir: &Path, name: &str) -> test_utils::ChildGuard {
        let extra = ["--vswitch", self.vsw.as_str(), "--domain", name];
        spawn_agent_in(&self.s, host, dir, &self.token_file, &[], None, &extra)
    }

    fn cli(&self, args: &[&str]) -> String {
        let (ok, out, err) = cli(&self.s, &self.t, args);
        assert!(ok, "vinfra {args:?}: {out}{err}");
        out
    }

    fn top(&self) -> Value {
        serde_json::from_str(&self.cli(&["traffic", "top", "-o", "json"])).unwrap()
    }
}

fn class(r: &Value, k: &str) -> (u64, u64) {
    r["classes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["class"] == k)
        .map_or((0, 0), |c| {
            (
                c["packets"].as_u64().unwrap_or(0),
                c["bytes"].as_u64().unwrap_or(0),
            )
        })
}

/// The row of pair `src` -> `dst` (MACs): (class, packets, bytes).
fn pair(r: &Value, src: &str, dst: &str) -> Option<(String, u64, u64)> {
    r["pairs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["src_mac"] == src && p["dst_mac"] == dst)
        .map(|p| {
            (
                p["class"].as_str().unwrap_or("").to_owned(),
                p["packets"].as_u64().unwrap_or(0),
                p["bytes"].as_u64().unwrap_or(0),
            )
        })
}

/// Every pair as nfdump reports flows: (src MAC, dst MAC) -> (packets, bytes).
fn pairs_by_mac(r: &Value) -> BTreeMap<(String, String), (u64, u64)> {
    r["pairs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                (
                    p["src_mac"].as_str().unwrap_or("").to_owned(),
                    p["dst_mac"].as_str().unwrap_or("").to_owned(),
                ),
                (
                    p["packets"].as_u64().unwrap_or(0),
                    p["bytes"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect()
}

/// Waits until the guest whose serial log is `log` has printed `n` ping results (or powered
/// off), then stops it: its desired state is still running, so the agent would boot it
/// again; the log is read directly (a restarted QEMU truncates it) and a rebooted guest
/// takes many seconds under TCG to configure its NIC again. Returns (ok, fail).
async fn pings_done(c: &client::Client, vm: &str, n: usize, log: &Path) -> (usize, usize) {
    let end = std::time::Instant::now() + Duration::from_secs(240);
    loop {
        let l = std::fs::read_to_string(log).unwrap_or_default();
        let (oks, fails) = (
            count(&l, "PING 10.72.0.1 ok"),
            count(&l, "PING 10.72.0.1 fail"),
        );
        if oks + fails >= n || l.contains("POWEROFF") {
            c.stop_vm(vm).await.unwrap();
            return (oks, fails);
        }
        assert!(
            std::time::Instant::now() < end,
            "{vm}: {n} pings not done: {l}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn console_log(c: &client::Client, vm: &str, host_dir: &Path) -> (PathBuf, String) {
    let v = c.get_vm(vm).await.unwrap();
    let id = v.id.0.simple().to_string();
    let mac = v.nics[0].mac.clone();
    (
        host_dir.join("vms").join(&id[..12]).join("console.log"),
        mac,
    )
}

#[tokio::test]
async fn four_guests_in_two_domains_are_counted_by_class_pair_and_nfdump_across_a_migration() {
    test_utils::require_tool("bpftool", "install bpftool (scripts/setup.sh)").unwrap();
    test_utils::require_tool("nfcapd", "install nfdump (scripts/setup.sh)").unwrap();
    let east = domain("east").await;
    let west = domain("west").await;
    let (dir_a, dir_b, dir_d) = (
        path_in(&east.s, "ha"),
        path_in(&east.s, "hb"),
        path_in(&west.s, "hd"),
    );
    let _agent_a = east.agent("host-a", &dir_a, "east");
    let _agent_b = east.agent("host-b", &dir_b, "east");
    let _agent_d = west.agent("host-d", &dir_d, "west");
    crate::harness::wait_host_up(&east.s, "host-a").await;
    crate::harness::wait_host_up(&east.s, "host-b").await;
    crate::harness::wait_host_up(&west.s, "host-d").await;
    let logs = || {
        [&dir_a, &dir_b, &dir_d]
            .iter()
            .map(|d| test_utils::log_tail(&d.join("agent.log"), 40))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for d in [&east, &west] {
        d.cli(&["network", "create", "blue", "--cidr", "10.72.0.0/24"]);
    }
    let (ea, wa) = (east.s.admin(), west.s.admin());
    let bridge = |n: model::Network| agent::netdev::bridge_name(n.id);
    let _link = DomainLink::new(
        &bridge(ea.get_network("blue").await.unwrap()),
        &bridge(wa.get_network("blue").await.unwrap()),
    );

    east.cli(&["vm", "create", "a", "--host", "host-a", "--nic", "blue"]);
    if test_utils::wait_for(Duration::from_secs(120), || async {
        ea.console("a")
            .await
            .unwrap_or_default()
            .contains("GUEST: READY")
    })
    .await
    .is_err()
    {
        panic!(
            "a boots: {}\n{}",
            ea.console("a").await.unwrap_or_default(),
            logs()
        );
    }
    // b on a's host pings it 4 times, c on the other host of the domain 3 times, d in the
    // other domain (address .10 of the same subnet) twice.
    let pingers = [
        (&east, "b", "host-a", "blue", 4usize, &dir_a),
        (&east, "c", "host-b", "blue", 3, &dir_b),
        (&west, "d", "host-d", "blue=10.72.0.10", 2, &dir_d),
    ];
    for (d, vm, host, nic, n, _) in pingers {
        let args = format!("vinfra.ticks={n} vinfra.ping=10.72.0.1");
        d.cli(&[
            "vm",
            "create",
            vm,
            "--host",
            host,
            "--nic",
            nic,
            "--kernel-args",
            &args,
            "--no-wait",
        ]);
    }
    let mut mac = BTreeMap::new();
    mac.insert("a", console_log(&ea, "a", &dir_a).await.1);
    let mut waits = Vec::new();
    for (d, vm, _, _, n, dir) in pingers {
        let c = d.s.admin();
        let (log, m) = console_log(&c, vm, dir).await;
        mac.insert(vm, m);
        waits.push(async move { (vm, pings_done(&c, vm, n, &log).await) });
    }
    for (vm, r) in futures_util::future::join_all(waits).await {
        let n = pingers.iter().find(|p| p.1 == vm).map_or(0, |p| p.4);
        assert_eq!(r, (n, 0), "{vm}: every echo answered\n{}", logs());
    }

    // The controllers get the counts within a report interval or two.
    let (ia, ib, ic, id) = (&mac["a"], &mac["b"], &mac["c"], &mac["d"]);
    let want_east = |r: &Value| {
        class(r, "intra_server") == (8, 8 * PING_FRAME)
            && class(r, "inter_server") == (6, 6 * PING_FRAME)
            && class(r, "inter_domain") == (4, 4 * PING_FRAME)
    };
    let want_west = |r: &Value| {
        class(r, "inter_domain") == (4, 4 * PING_FRAME)
            && class(r, "intra_server").0 + class(r, "inter_server").0 == 0
    };
    if test_utils::wait_until(Duration::from_secs(20), || {
        want_east(&east.top()) && want_west(&west.top())
    })
    .await
    .is_err()
    {
        panic!("traffic top: {}\n{}\n{}", east.top(), west.top(), logs());
    }
    // Settled: another report round adds nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (re, rw) = (east.top(), west.top());
    assert!(want_east(&re) && want_west(&rw), "{re}\n{rw}");
    let p = |n: u64, k: &str| Some((k.to_owned(), n, n * PING_FRAME));
    assert_eq!(pair(&re, ib, ia), p(4, "intra_server"), "{re}");
    assert_eq!(pair(&re, ia, ib), p(4, "intra_server"), "{re}");
    assert_eq!(pair(&re, ic, ia), p(3, "inter_server"), "{re}");
    assert_eq!(pair(&re, ia, ic), p(3, "inter_server"), "{re}");
    assert_eq!(pair(&re, id, ia), p(2, "inter_domain"), "{re}");
    assert_eq!(pair(&re, ia, id), p(2, "inter_domain"), "{re}");
    assert_eq!(
        re["pairs"].as_array().map(Vec::len),
        Some(6),
        "only the pinged pairs: {re}"
    );
    assert_eq!(pair(&rw, id, ia), p(2, "inter_domain"), "{rw}");
    assert_eq!(pair(&rw, ia, id), p(2, "inter_domain"), "{rw}");
    assert_eq!(rw["pairs"].as_array().map(Vec::len), Some(2), "{rw}");
    // Names: each domain names its own VMs only.
    let named = |r: &Value, src: &str| {
        r["pairs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["src_mac"] == src)
            .map(|p| p["src_vm"].clone())
    };
    assert_eq!(named(&re, ib), Some(serde_json::json!("b")), "{re}");
    assert_eq!(named(&re, id), Some(Value::Null), "{re}");
    assert_eq!(named(&rw, id), Some(serde_json::json!("d")), "{rw}");
    // ARP is counted in its own row (the class counts above are exactly the echoes, so
    // none of it went there). How many ARP frames a domain's taps carry depends on the
    // guests' neighbour caches and on the three pingers' requests racing each other: a CI
    // run saw west count only one (d's request or a's answer), so at least one.
    for r in [&re, &rw] {
        assert!(
            r["neighbor"]["packets"].as_u64().unwrap_or(0) >= 1,
            "ARP in its own row: {r}"
        );
    }
    let metrics = ea.metrics().await.unwrap();
    assert!(
        metrics.contains("vinfra_traffic_packets_total{domain=\"east\",class=\"inter_domain\"} 4"),
        "{metrics}"
    );
    let out = east.cli(&["traffic", "top"]);
    assert!(out.contains("neighbor"), "{out}");

    // A fifth guest on host-b pings a once a second and is live-migrated to host-a after its
    // third echo. Every frame it sends passes exactly one tap's ingress (host-b's before the
    // switch-over, host-a's after), so its requests are counted exactly once, first as
    // inter-server, then as intra-server.
    const TICKS: usize = 16;
    let args = format!("vinfra.tick_ms=1000 vinfra.ticks={TICKS} vinfra.ping=10.72.0.1");
    east.cli(&[
        "vm",
        "create",
        "e",
        "--host",
        "host-b",
        "--nic",
        "blue",
        "--kernel-args",
        &args,
        "--no-wait",
    ]);
    let (src_log, me) = console_log(&ea, "e", &dir_b).await;
    let dst_log = console_log(&ea, "e", &dir_a).await.0;
    let mut seen_src = String::new();
    let end = std::time::Instant::now() + Duration::from_secs(180);
    while count(&seen_src, "PING 10.72.0.1") < 3 {
        assert!(
            std::time::Instant::now() < end,
            "e pings: {seen_src}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        seen_src = std::fs::read_to_string(&src_log).unwrap_or_default();
    }
    let (s, t) = (east.s.url.clone(), east.t.clone());
    let migrate = tokio::task::spawn_blocking(move || {
        std::process::Command::new(crate::harness::VINFRA)
            .args(["vm", "migrate", "e", "--to", "host-a"])
            .env("VINFRA_URL", s)
            .env("VINFRA_TOKEN", t)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run vinfra")
    });
    // The source's log is read until its run dir goes: the lines it printed before the
    // switch-over are not in the destination's.
    while !migrate.is_finished() {
        if let Ok(l) = std::fs::read_to_string(&src_log) {
            if l.len() >= seen_src.len() {
                seen_src = l;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = migrate.await.unwrap();
    assert!(
        out.status.success(),
        "migrate: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    assert_eq!(ea.get_vm("e").await.unwrap().host.as_str(), "host-a");
    let end = std::time::Instant::now() + Duration::from_secs(120);
    let dst = loop {
        let l = std::fs::read_to_string(&dst_log).unwrap_or_default();
        // `i` lives in guest RAM: the last tick is TICKS - 1 on whichever side ran it.
        let last = format!("TICK {} ", TICKS - 1);
        if l.lines()
            .skip_while(|x| !x.starts_with(&last))
            .any(|x| x.starts_with("PING "))
            || l.contains("POWEROFF")
        {
            ea.stop_vm("e").await.unwrap();
            break l;
        }
        assert!(
            std::time::Instant::now() < end,
            "e's last ping: {l}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let src_pings = count(&seen_src, "PING 10.72.0.1");
    let dst_pings = count(&dst, "PING 10.72.0.1");
    let fails = count(&seen_src, "PING 10.72.0.1 fail") + count(&dst, "PING 10.72.0.1 fail");
    assert!(
        src_pings >= 3 && dst_pings >= 1,
        "pings on both sides of the migration: {seen_src}\n---\n{dst}"
    );
    let n = TICKS as u64;
    // e's requests: one per tick, each counted once. a's replies: one per request that
    // reached it (a reply lost in the switch-over is a failed ping in the guest).
    let settled = |r: &Value| {
        let req = pair(r, &me, ia).map_or(0, |p| p.1);
        let rep = pair(r, ia, &me).map_or(0, |p| p.1);
        let moved = (class(r, "intra_server").0 + class(r, "inter_server").0).saturating_sub(14);
        req == n && rep + fails as u64 >= n && rep <= n && moved == req + rep
    };
    if test_utils::wait_until(Duration::from_secs(20), || settled(&east.top()))
        .await
        .is_err()
    {
        panic!(
            "after the migration: {}\nsource: {seen_src}\n---\n{dst}\n{}",
            east.top(),
            logs()
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let re = east.top();
    assert!(settled(&re), "{re}");
    assert_eq!(
        fails, 0,
        "no echo lost across the migration: {seen_src}\n---\n{dst}"
    );
    // Counted on both hosts: inter-server before, intra-server after; the pair's class is
    // where it was last counted.
    let (intra, inter) = (class(&re, "intra_server").0, class(&re, "inter_server").0);
    assert!(intra > 8 && inter > 6, "{re}");
    assert_eq!(
        pair(&re, &me, ia).map(|p| p.0),
        Some("intra_server".to_owned()),
        "{re}"
    );
    assert_eq!(
        pair(&re, &me, ia).map(|p| p.2),
        Some(n * PING_FRAME),
        "{re}"
    );
    // The earlier pairs did not move.
    assert_eq!(pair(&re, ic, ia), p(3, "inter_server"), "{re}");
    assert_eq!(pair(&re, id, ia), p(2, "inter_domain"), "{re}");
    assert_eq!(re["pairs"].as_array().map(Vec::len), Some(8), "{re}");

    // nfdump reads back from each domain's nfcapd the same per-pair counts (the server
    // exports every 10 s: wait for one more export after the last count).
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (re2, rw) = (east.top(), west.top());
    assert_eq!(re2["pairs"], re["pairs"], "settled");
    let (re_pairs, rw_pairs) = (pairs_by_mac(&re), pairs_by_mac(&rw));
    assert_eq!(re_pairs.len(), 8);
    assert_eq!(
        east.nf.stop_and_read(),
        re_pairs,
        "east: nfdump = traffic top"
    );
    assert_eq!(
        west.nf.stop_and_read(),
        rw_pairs,
        "west: nfdump = traffic top"
    );

    for (d, vms) in [(&east.s, &["a", "b", "c", "e"][..]), (&west.s, &["d"][..])] {
        for vm in vms {
            let (ok, out, err) = cli(d, &d.admin_token(), &["vm", "delete", vm]);
            assert!(ok, "{out}{err}");
        }
    }
}
