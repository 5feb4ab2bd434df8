//! The kernel datapath with real pings: VMs are namespaces whose veth's host end sits on one
//! Linux bridge in a "machine" namespace — the layout `vinfra up` gives taps (one bridge per
//! network shared by every host of the machine). Hosts h1 (VMs a, b) and h2 (VM c) are in
//! domain A, h3 (VM d) in domain B; each host's classifier instance is attached to its VMs'
//! host ends exactly as the agent attaches it to taps, and reports to its domain's controller.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::nfcapd::Nfcapd;
use net::controller::{serve_switches, Controller};
use net::kernel::KernelDatapath;
use net::netns::NetnsLab;
use net::{
    KernelSwitch, KernelSwitchConfig, MacAddr, PortAddress, SwitchId, TrafficClass, TrafficReport,
};

/// ICMP echo frames: 14 Ethernet + 20 IPv4 + 8 ICMP + 56 payload.
const PING_FRAME: u64 = 98;

fn mac(n: u8) -> MacAddr {
    MacAddr([0x02, 0x6b, 0x74, 0, 0, n])
}

struct Lab {
    ns: BTreeMap<&'static str, String>,
    /// The machine namespace each VM's tap is in.
    tap_ns: BTreeMap<&'static str, String>,
    rt: tokio::runtime::Runtime,
    ctl: [Controller; 2],
    addrs: [std::net::SocketAddr; 2],
    instances: Vec<KernelDatapath>,
    /// Unique per lab in this process (the tests run in parallel).
    tag: String,
    /// How idle a pair must be before its switch ages it out of the kernel map.
    pair_idle: Option<Duration>,
    _lab: NetnsLab,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for dp in self.instances.drain(..) {
            let _ = dp.remove();
        }
    }
}

/// (vm, host, ip)
const VMS: [(&str, &str, u8); 4] = [
    ("a", "h1", 1),
    ("b", "h1", 2),
    ("c", "h2", 3),
    ("d", "h3", 4),
];

fn setup() -> Lab {
    setup_on(false)
}

/// The lab on one machine namespace (every host's taps on one bridge, as `vinfra up` does),
/// or with `vxlan` on two: m1 runs h1, m2 runs h2 and h3, each machine has its own bridge
/// with a VXLAN port flooding to the other machine over a veth "data network" — what agents
/// started with `--uplink-ip` build (`agent::netdev`: VNI, UDP 4789, `bridge fdb append`).
fn setup_on(vxlan: bool) -> Lab {
    static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let sfx = format!("{:x}{n}", std::process::id() % 0xfffff);
    let mut lab = NetnsLab::new();
    let ip = |args: &[&str]| net::netns::ip(args).expect("ip");
    let machines: Vec<String> = if vxlan {
        vec![format!("vk{sfx}m"), format!("vk{sfx}n")]
    } else {
        vec![format!("vk{sfx}m")]
    };
    for m in &machines {
        lab.add(m).expect("machine namespace");
        ip(&["-n", m, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", m, "link", "set", "br0", "up"]);
    }
    if vxlan {
        lab.veth(&machines[0], "dl0", &machines[1], "dl0", None)
            .expect("data network");
        for (i, m) in machines.iter().enumerate() {
            let (me, peer) = (
                format!("192.168.77.{}", i + 1),
                format!("192.168.77.{}", 2 - i),
            );
            ip(&["-n", m, "addr", "add", &format!("{me}/24"), "dev", "dl0"]);
            ip(&[
                "-n", m, "link", "add", "vx0", "type", "vxlan", "id", "4242", "local", &me,
                "dstport", "4789",
            ]);
            ip(&["-n", m, "link", "set", "vx0", "master", "br0", "up"]);
            let out = Command::new("bridge")
                .args(["-n", m, "fdb", "append", "00:00:00:00:00:00", "dev", "vx0"])
                .args(["dst", &peer])
                .output()
                .expect("run bridge");
            assert!(out.status.success(), "{out:?}");
        }
    }
    let mut ns = BTreeMap::new();
    let mut tap_ns = BTreeMap::new();
    for (i, (vm, host, addr)) in VMS.iter().enumerate() {
        let machine = machines[usize::from(vxlan && *host != "h1")].clone();
        let name = format!("vk{sfx}{vm}");
        lab.add(&name).expect("vm namespace");
        let port = format!("tap{vm}");
        lab.veth(
            &name,
            "eth0",
            &machine,
            &port,
            Some(&mac(u8::try_from(i + 1).unwrap_or(0)).to_string()),
        )
        .expect("vm veth");
        ip(&["-n", &machine, "link", "set", "dev", &port, "master", "br0"]);
        tap_ns.insert(*vm, machine);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("10.77.0.{addr}/24"),
            "dev",
            "eth0",
        ]);
        ns.insert(*vm, name);
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ctl = [
        Controller::new("dom-a".into()),
        Controller::new("dom-b".into()),
    ];
    let mut addrs = Vec::new();
    for c in &ctl {
        let l = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        addrs.push(l.local_addr().expect("addr"));
        rt.spawn(serve_switches(l, c.clone()));
    }
    Lab {
        ns,
        tap_ns,
        rt,
        ctl,
        addrs: [addrs[0], addrs[1]],
        instances: Vec::new(),
        tag: format!("{}-{n}", std::process::id()),
        pair_idle: None,
        _lab: lab,
    }
}

impl Lab {
    fn instance(&mut self, host: &str) -> KernelDatapath {
        let name = format!("test-{}-{host}", self.tag);
        let dp = KernelDatapath::open(&name)
            .expect("load the classifier (bash scripts/setup.sh installs clang and bpftool)");
        if !self.instances.iter().any(|d| d.dir() == dp.dir()) {
            self.instances.push(dp.clone());
        }
        dp
    }

    /// Starts `host`'s switch and attaches it to its VMs' ports.
    fn switch(&mut self, host: &str, vms: &[&str]) -> KernelSwitch {
        let dom = usize::from(host == "h3");
        let cfg = KernelSwitchConfig {
            switch: SwitchId(host.to_owned()),
            domain: if dom == 0 {
                "dom-a".into()
            } else {
                "dom-b".into()
            },
            controller: Some(self.addrs[dom]),
            report_interval: Duration::from_millis(100),
            pair_idle: self.pair_idle,
            bridge_only: false,
        };
        let dp = self.instance(host);
        let sw = KernelSwitch::start_on(cfg, dp).expect("start kernel switch");
        for vm in vms {
            self.attach(&sw, vm);
        }
        sw
    }

    fn attach(&self, sw: &KernelSwitch, vm: &str) {
        let i = VMS.iter().position(|v| v.0 == vm).expect("vm");
        let address = PortAddress {
            vm: vm.to_owned(),
            mac: mac(u8::try_from(i + 1).unwrap_or(0)),
            ip: None,
        };
        sw.attach(Some(&self.tap_ns[vm]), &format!("tap{vm}"), address)
            .expect("attach classifier");
    }

    /// `count` pings from `from` to `to`, all answered.
    fn ping(&self, from: &str, to: &str, count: u32) {
        let dst = VMS.iter().find(|v| v.0 == to).expect("vm").2;
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns[from], "ping", "-q", "-c"])
            .arg(count.to_string())
            .args(["-i", "0.02", "-W", "2"])
            .arg(format!("10.77.0.{dst}"))
            .output()
            .expect("run ping");
        assert!(
            out.status.success(),
            "ping {from} -> {to}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    fn report(&self, dom: usize) -> TrafficReport {
        self.ctl[dom].traffic(&Default::default())
    }
}

fn class(r: &TrafficReport, k: TrafficClass) -> (u64, u64) {
    let c = r.classes.iter().find(|c| c.class == k).expect("class row");
    (c.packets, c.bytes)
}

fn pair(r: &TrafficReport, src: &str, dst: &str) -> (TrafficClass, u64) {
    let i = |vm: &str| VMS.iter().position(|v| v.0 == vm).expect("vm");
    let (s, d) = (
        mac(u8::try_from(i(src) + 1).unwrap_or(0)),
        mac(u8::try_from(i(dst) + 1).unwrap_or(0)),
    );
    r.pairs
        .iter()
        .find(|p| p.src_mac == s && p.dst_mac == d)
        .map_or_else(
            || panic!("no pair {src} -> {dst} in {:?}", r.pairs),
            |p| (p.class, p.packets),
        )
}

fn wait_tables(sws: &[(&KernelSwitch, usize)]) {
    let end = Instant::now() + Duration::from_secs(10);
    while !sws.iter().all(|(s, n)| s.table().entries.len() == *n) {
        assert!(
            Instant::now() < end,
            "address tables did not reach every switch"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn flush(sws: &[&KernelSwitch]) {
    for s in sws {
        s.flush().expect("report");
    }
}

#[test]
fn kernel_classifier_counts_pings_by_class_and_pair_across_restart_and_move() {
    let mut lab = setup();
    let h1 = lab.switch("h1", &["a", "b"]);
    let h2 = lab.switch("h2", &["c"]);
    let h3 = lab.switch("h3", &["d"]);
    wait_tables(&[(&h1, 3), (&h2, 3), (&h3, 1)]);

    lab.ping("a", "b", 3); // intra-server at h1, both ways
    lab.ping("a", "c", 4); // inter-server: a->c counted by h1, c->a by h2
    lab.ping("b", "d", 2); // inter-domain: each domain counts both directions once
    flush(&[&h1, &h2, &h3]);

    let a = lab.report(0);
    assert_eq!(class(&a, TrafficClass::IntraServer), (6, 6 * PING_FRAME));
    assert_eq!(class(&a, TrafficClass::InterServer), (8, 8 * PING_FRAME));
    assert_eq!(class(&a, TrafficClass::InterDomain), (4, 4 * PING_FRAME));
    assert_eq!(pair(&a, "a", "b"), (TrafficClass::IntraServer, 3));
    assert_eq!(pair(&a, "b", "a"), (TrafficClass::IntraServer, 3));
    assert_eq!(pair(&a, "a", "c"), (TrafficClass::InterServer, 4));
    assert_eq!(pair(&a, "c", "a"), (TrafficClass::InterServer, 4));
    assert_eq!(pair(&a, "b", "d"), (TrafficClass::InterDomain, 2));
    assert_eq!(pair(&a, "d", "b"), (TrafficClass::InterDomain, 2));
    // ARP went into its own row, not into a class or a pair.
    assert!(
        a.neighbor.packets >= 2,
        "ARP counted as neighbour discovery: {:?}",
        a.neighbor
    );
    assert_eq!(a.pairs.len(), 6, "only the pinged pairs: {:?}", a.pairs);
    let b = lab.report(1);
    assert_eq!(class(&b, TrafficClass::InterDomain), (4, 4 * PING_FRAME));
    assert_eq!(
        class(&b, TrafficClass::IntraServer).0 + class(&b, TrafficClass::InterServer).0,
        0
    );
    assert_eq!(pair(&b, "d", "b"), (TrafficClass::InterDomain, 2));
    assert_eq!(pair(&b, "b", "d"), (TrafficClass::InterDomain, 2));
    // The same per-pair counts exported as IPFIX reach Debian's nfcapd and come back out of
    // nfdump (which ignores the class, an enterprise element; our own decoder checks it).
    let nf = Nfcapd::start();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    let mut exporter = net::ipfix::IpfixExporter::new(7);
    let sent = lab.ctl[0]
        .export_ipfix(&mut exporter, &sock, nf.addr)
        .expect("export");
    assert_eq!(sent, 6);
    let collected = nf.stop_and_read();
    let want: BTreeMap<(String, String), (u64, u64)> = a
        .pairs
        .iter()
        .map(|p| {
            (
                (p.src_mac.to_string(), p.dst_mac.to_string()),
                (p.packets, p.bytes),
            )
        })
        .collect();
    assert_eq!(collected, want, "nfdump's flows = the controller's pairs");
    let prom = lab.ctl[0].prometheus();
    assert!(
        prom.contains("vinfra_traffic_packets_total{domain=\"dom-a\",class=\"inter_server\"} 8"),
        "{prom}"
    );

    // h1's reporter restarts (the agent restarting): the kernel kept counting, the same epoch
    // continues, and the controller neither loses nor doubles anything.
    let epoch = h1.status().epoch;
    drop(h1);
    lab.ping("a", "b", 2);
    let h1 = lab.switch("h1", &["a", "b"]);
    assert_eq!(
        h1.status().epoch,
        epoch,
        "the instance's epoch survives the restart"
    );
    flush(&[&h1]);
    lab.ping("a", "b", 1);
    flush(&[&h1, &h1]);
    let a = lab.report(0);
    assert_eq!(class(&a, TrafficClass::IntraServer), (12, 12 * PING_FRAME));
    assert_eq!(pair(&a, "a", "b"), (TrafficClass::IntraServer, 6));

    // VM c moves from h2 to h1 (its NIC detached there, attached here, as a migration does):
    // its traffic with a becomes intra-server, counted by h1 only, and nothing is lost.
    h2.detach("tapc").expect("detach");
    lab.attach(&h1, "c");
    flush(&[&h2, &h1]);
    wait_tables(&[(&h1, 3), (&h2, 3)]);
    lab.ping("a", "c", 5);
    flush(&[&h1, &h2]);
    let a = lab.report(0);
    assert_eq!(class(&a, TrafficClass::InterServer), (8, 8 * PING_FRAME));
    assert_eq!(class(&a, TrafficClass::IntraServer), (22, 22 * PING_FRAME));
    assert_eq!(pair(&a, "a", "c"), (TrafficClass::IntraServer, 9));
    assert_eq!(pair(&a, "c", "a"), (TrafficClass::IntraServer, 9));
    drop((h1, h2, h3));
    let _ = &lab.rt;
}

/// Pairs that stopped talking leave the kernel's pair map once the controller has their
/// counts; the controller's totals keep them, and a pair that talks again is a new flow
/// counted from zero on top of them.
#[test]
fn idle_pairs_age_out_of_the_kernel_map_without_losing_counts() {
    let mut lab = setup();
    lab.pair_idle = Some(Duration::from_millis(300));
    let h1 = lab.switch("h1", &["a", "b"]);
    let h2 = lab.switch("h2", &["c"]);
    wait_tables(&[(&h1, 3), (&h2, 3)]);
    lab.ping("a", "b", 3);
    lab.ping("c", "a", 2);
    flush(&[&h1, &h2]);
    let dp1 = lab.instance("h1");
    assert_eq!(dp1.read().expect("read").flows.len(), 3, "a->b, b->a, a->c");
    // Idle: after 300 ms and an acknowledged report the entries go.
    let end = Instant::now() + Duration::from_secs(20);
    while !dp1.read().expect("read").flows.is_empty() || h2.status().pairs_aged < 1 {
        assert!(
            Instant::now() < end,
            "pairs not aged: {:?} {:?}",
            h1.status(),
            dp1.read().map(|c| c.flows)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(h1.status().pairs_aged, 3);
    flush(&[&h1, &h2]);
    let a = lab.report(0);
    assert_eq!(class(&a, TrafficClass::IntraServer), (6, 6 * PING_FRAME));
    assert_eq!(class(&a, TrafficClass::InterServer), (4, 4 * PING_FRAME));
    assert_eq!(pair(&a, "a", "b"), (TrafficClass::IntraServer, 3));
    assert_eq!(pair(&a, "c", "a"), (TrafficClass::InterServer, 2));

    // The pairs talk again: new map entries (a later ageing round), added to the totals.
    lab.ping("a", "b", 2);
    lab.ping("c", "a", 1);
    flush(&[&h1, &h2]);
    let flows = dp1.read().expect("read").flows;
    assert!(
        flows
            .iter()
            .all(|f| f.flow_seq > 1 && f.counter.packets <= 2),
        "re-created entries: {flows:?}"
    );
    let a = lab.report(0);
    assert_eq!(class(&a, TrafficClass::IntraServer), (10, 10 * PING_FRAME));
    assert_eq!(class(&a, TrafficClass::InterServer), (6, 6 * PING_FRAME));
    assert_eq!(pair(&a, "a", "b"), (TrafficClass::IntraServer, 5));
    assert_eq!(pair(&a, "b", "a"), (TrafficClass::IntraServer, 5));
    assert_eq!(pair(&a, "c", "a"), (TrafficClass::InterServer, 3));
    assert_eq!(pair(&a, "a", "c"), (TrafficClass::InterServer, 3));
    drop((h1, h2));
    let _ = &lab.rt;
}

/// Hosts on two machines joined by VXLAN, as multi-machine agents build them: frames between
/// machines leave through the bridge's VXLAN port and are counted once, at the sending tap;
/// the classifier needs nothing on the VXLAN device.
#[test]
fn vxlan_uplinks_between_machines_count_once_per_domain() {
    let mut lab = setup_on(true);
    let h1 = lab.switch("h1", &["a", "b"]);
    let h2 = lab.switch("h2", &["c"]);
    let h3 = lab.switch("h3", &["d"]);
    wait_tables(&[(&h1, 3), (&h2, 3), (&h3, 1)]);
    let vx_tx = |m: &str| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                m,
                "cat",
                "/sys/class/net/vx0/statistics/tx_packets",
            ])
            .output()
            .expect("read vx0 counters");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    let before = vx_tx(&lab.tap_ns["a"]);

    lab.ping("a", "b", 2); // intra-server, on m1's bridge only
    lab.ping("a", "c", 4); // inter-server, m1 -> VXLAN -> m2
    lab.ping("b", "d", 3); // inter-domain, m1 -> VXLAN -> m2
    flush(&[&h1, &h2, &h3]);

    assert!(
        vx_tx(&lab.tap_ns["a"]) >= before + 7,
        "the echoes to c and d crossed the VXLAN port"
    );
    let a = lab.report(0);
    assert_eq!(class(&a, TrafficClass::IntraServer), (4, 4 * PING_FRAME));
    assert_eq!(class(&a, TrafficClass::InterServer), (8, 8 * PING_FRAME));
    assert_eq!(class(&a, TrafficClass::InterDomain), (6, 6 * PING_FRAME));
    assert_eq!(pair(&a, "a", "c"), (TrafficClass::InterServer, 4));
    assert_eq!(pair(&a, "c", "a"), (TrafficClass::InterServer, 4));
    assert_eq!(pair(&a, "b", "d"), (TrafficClass::InterDomain, 3));
    assert_eq!(pair(&a, "d", "b"), (TrafficClass::InterDomain, 3));
    assert_eq!(a.pairs.len(), 6, "only the pinged pairs: {:?}", a.pairs);
    let b = lab.report(1);
    assert_eq!(class(&b, TrafficClass::InterDomain), (6, 6 * PING_FRAME));
    assert_eq!(b.pairs.len(), 2, "{:?}", b.pairs);
    drop((h1, h2, h3));
    let _ = &lab.rt;
}

/// `bpftool -j net show dev IF` in `ns`: the (kind, program name) of every tc program.
fn hooks(ns: &str, dev: &str) -> Vec<(String, String)> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "bpftool", "-j", "net", "show", "dev", dev,
        ])
        .output()
        .expect("run bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    v[0]["tc"]
        .as_array()
        .expect("tc list")
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (s("kind"), s("name"))
        })
        .collect()
}

/// The kernel's id of `dp`'s pinned ingress program.
fn ingress_prog_id(dp: &KernelDatapath) -> u64 {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show", "pinned"])
        .arg(dp.dir().join("progs/vinfra_ingress"))
        .output()
        .expect("run bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["id"].as_u64().expect("id")
}

#[test]
fn attach_is_idempotent_at_tcx_and_takes_over_from_stale_and_clsact_programs() {
    let help = Command::new("bpftool")
        .args(["net", "help"])
        .output()
        .expect("run bpftool (bash scripts/setup.sh installs it)");
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("tcx_ingress")
            || String::from_utf8_lossy(&help.stderr).contains("tcx_ingress"),
        "this bpftool cannot attach at tcx: bash scripts/setup.sh installs bpftool 7.5 from \
         bookworm-backports"
    );
    let tag = format!("{}", std::process::id());
    let mut lab = NetnsLab::new();
    let (m, v) = (format!("vka{tag}m"), format!("vka{tag}v"));
    lab.add(&m).expect("machine namespace");
    lab.add(&v).expect("vm namespace");
    lab.veth(&v, "eth0", &m, "tapx", None).expect("veth");
    let old = KernelDatapath::open(&format!("test-{tag}-old")).expect("load the classifier");
    let new = KernelDatapath::open(&format!("test-{tag}-new")).expect("load the classifier");
    let both = [
        ("tcx/ingress".to_owned(), "vinfra_ingress".to_owned()),
        ("tcx/egress".to_owned(), "vinfra_egress".to_owned()),
    ];
    // A NIC an older vinfra classified at a clsact qdisc, and a stale instance at tcx.
    let p = format!("{}/progs/vinfra_ingress", old.dir().display());
    for args in [
        vec!["-n", &m, "qdisc", "add", "dev", "tapx", "clsact"],
        vec![
            "-n",
            &m,
            "filter",
            "add",
            "dev",
            "tapx",
            "ingress",
            "bpf",
            "direct-action",
            "object-pinned",
            &p,
        ],
    ] {
        let out = Command::new("tc").args(&args).output().expect("run tc");
        assert!(out.status.success(), "tc {args:?}: {out:?}");
    }
    old.attach(Some(&m), "tapx", mac(9)).expect("attach old");
    assert_eq!(hooks(&m, "tapx"), both, "tcx only, the clsact filter gone");
    // The new instance replaces the stale one's programs; attaching again changes nothing.
    for _ in 0..2 {
        new.attach(Some(&m), "tapx", mac(9)).expect("attach new");
        assert_eq!(hooks(&m, "tapx"), both);
    }
    let out = Command::new("ip")
        .args([
            "netns", "exec", &m, "bpftool", "-j", "net", "show", "dev", "tapx",
        ])
        .output()
        .expect("run bpftool");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        shown[0]["tc"][0]["prog_id"].as_u64(),
        Some(ingress_prog_id(&new))
    );
    let ifindex = net::kernel::ifindex(Some(&m), "tapx").expect("ifindex");
    new.detach(Some(&m), "tapx", ifindex, mac(9))
        .expect("detach");
    assert!(hooks(&m, "tapx").is_empty());
    new.detach(Some(&m), "tapx", ifindex, mac(9))
        .expect("detach twice");
    drop(lab);
    let _ = old.remove();
    let _ = new.remove();
}

#[test]
fn both_ways_of_attaching_count_every_frame_once() {
    let tag = format!("{}", std::process::id());
    let mut lab = NetnsLab::new();
    let m = format!("vkw{tag}m");
    lab.add(&m).expect("machine namespace");
    let (src, dst) = (mac(21), mac(22));
    for (i, clsact) in [false, true].into_iter().enumerate() {
        let v = format!("vkw{tag}v{i}");
        lab.add(&v).expect("vm namespace");
        let tap = format!("tapw{i}");
        lab.veth(&v, "eth0", &m, &tap, Some(&src.to_string()))
            .expect("veth");
        let dp = KernelDatapath::open(&format!("test-{tag}-ways{i}")).expect("load the classifier");
        let mut addrs = BTreeMap::new();
        addrs.insert(src, net::kernel::AddrLocation::Local);
        addrs.insert(dst, net::kernel::AddrLocation::Local);
        dp.set_addresses(&addrs).expect("addresses");
        if clsact {
            dp.attach_clsact(Some(&m), &tap, src)
                .expect("attach clsact");
        } else {
            dp.attach(Some(&m), &tap, src).expect("attach tcx");
        }
        // Frames the VM sends reach the classifier at its tap's ingress (and go nowhere:
        // the tap is on no bridge).
        let port = net::rawsock::RawPort::open(Some(&v), "eth0").expect("packet socket");
        let frame = net::frame::build(dst, src, 0x88b5, 100);
        for _ in 0..37 {
            port.send(&frame).expect("send");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let counted = loop {
            let c = dp.read().expect("read counters");
            let n = c.counters.classes[0].packets;
            if n >= 37 || Instant::now() > deadline {
                break c;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let how = if clsact { "clsact" } else { "tcx" };
        assert_eq!(
            counted.counters.classes[0].packets, 37,
            "{how}: {counted:?}"
        );
        assert_eq!(counted.counters.classes[0].bytes, 37 * 100, "{how}");
        let f = counted
            .flows
            .iter()
            .find(|f| f.src == src && f.dst == dst)
            .expect("the pair");
        assert_eq!(
            (f.class, f.counter.packets),
            (TrafficClass::IntraServer, 37),
            "{how}"
        );
        drop(port);
        let _ = dp.remove();
    }
    drop(lab);
}

/// Frames of `ethertype` for `dst` that `port` receives within `within` (the socket is
/// non-blocking: poll it until then).
fn received(port: &net::rawsock::RawPort, dst: MacAddr, within: Duration) -> usize {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match port.recv(&mut buf) {
            Ok(net::rawsock::Recv::Frame(len)) if len >= 14 && buf[..6] == dst.0 => {
                if buf[12..14] == [0x88, 0xb5] {
                    n += 1;
                }
            }
            Ok(net::rawsock::Recv::Frame(_)) | Ok(net::rawsock::Recv::Outgoing) => {}
            Ok(net::rawsock::Recv::Empty) | Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    n
}

/// The classifier forwards a frame between two VMs of one host on one bridge itself, and
/// only when that is what the bridge would do: here the receiver's bridge port learns nothing
/// and floods nothing, so the bridge alone never delivers to it, and a frame that arrives
/// there skipped the bridge. It does once the receiver has sent from its tap; not before
/// (it may not run there yet: a migration's destination), not to another bridge's tap, not
/// with `bridge_only`, and no longer once a frame from the receiver's MAC came in from
/// elsewhere (it runs on another host now), until it sends from its tap again. Every frame is
/// counted once in its pair, skipped bridge or not.
#[test]
fn frames_between_vms_of_one_host_skip_the_bridge_only_when_the_bridge_would_deliver_them() {
    let tag = format!("{}", std::process::id());
    let mut lab = NetnsLab::new();
    let m = format!("vkf{tag}m");
    lab.add(&m).expect("machine namespace");
    let ip = |args: &[&str]| net::netns::ip(args).expect("ip");
    for br in ["br0", "br1"] {
        ip(&["-n", &m, "link", "add", br, "type", "bridge"]);
        ip(&["-n", &m, "link", "set", br, "up"]);
    }
    let (x, y, z, u) = (mac(31), mac(32), mac(33), mac(34));
    // x and y on br0, z on br1, and an uplink on br0 (what a VXLAN port is: frames from
    // other hosts come in there), not a VM: nothing attached to it.
    let mut ports = BTreeMap::new();
    for (name, addr, br) in [
        ("x", x, "br0"),
        ("y", y, "br0"),
        ("z", z, "br1"),
        ("u", u, "br0"),
    ] {
        let v = format!("vkf{tag}{name}");
        lab.add(&v).expect("vm namespace");
        let tap = format!("tap{name}");
        lab.veth(&v, "eth0", &m, &tap, Some(&addr.to_string()))
            .expect("veth");
        ip(&["-n", &m, "link", "set", "dev", &tap, "master", br, "up"]);
        ports.insert(
            name,
            net::rawsock::RawPort::open(Some(&v), "eth0").expect("socket"),
        );
    }
    let out = Command::new("bridge")
        .args([
            "-n", &m, "link", "set", "dev", "tapy", "learning", "off", "flood", "off",
        ])
        .output()
        .expect("run bridge");
    assert!(out.status.success(), "{out:?}");
    let dp = KernelDatapath::open(&format!("test-{tag}-shortcut")).expect("load the classifier");
    let addrs: BTreeMap<MacAddr, net::kernel::AddrLocation> = [x, y, z]
        .into_iter()
        .map(|a| (a, net::kernel::AddrLocation::Local))
        .collect();
    dp.set_addresses(&addrs).expect("addresses");
    for (name, addr) in [("x", x), ("y", y), ("z", z)] {
        dp.attach(Some(&m), &format!("tap{name}"), addr)
            .expect("attach");
    }
    let send = |from: &str, dst: MacAddr, src: MacAddr, n: usize| {
        let f = net::frame::build(dst, src, 0x88b5, 100);
        for _ in 0..n {
            ports[from].send(&f).expect("send");
        }
    };
    let wait = Duration::from_millis(300);
    let x_to_y = |n: usize| {
        send("x", y, x, n);
        received(&ports["y"], y, wait)
    };

    assert_eq!(
        x_to_y(10),
        0,
        "y has not sent from its tap: the bridge's way"
    );
    send("y", x, y, 1);
    assert_eq!(
        x_to_y(10),
        10,
        "y runs at its tap: x's frames skip the bridge"
    );
    send("z", x, z, 1);
    send("x", z, x, 10);
    assert_eq!(
        received(&ports["z"], z, wait),
        0,
        "never to another bridge's tap"
    );

    dp.set_bridge_only(true).expect("bridge only");
    assert_eq!(x_to_y(10), 0, "bridge only: nothing skips the bridge");
    dp.set_bridge_only(false).expect("shortcut again");
    assert_eq!(x_to_y(10), 10);

    // y's MAC comes in through the uplink (y was migrated to another host and announces
    // itself there, as QEMU does with RARP broadcasts): frames to y go the bridge's way.
    send("u", MacAddr([0xff; 6]), y, 1);
    assert_eq!(x_to_y(10), 0, "y runs elsewhere: the bridge's way");
    send("y", x, y, 1);
    assert_eq!(x_to_y(10), 10, "y is back at its tap");

    let counts = dp.read().expect("read counters");
    let pair = counts
        .flows
        .iter()
        .find(|f| f.src == x && f.dst == y)
        .expect("the pair x -> y");
    assert_eq!(
        (pair.class, pair.counter.packets, pair.counter.bytes),
        (TrafficClass::IntraServer, 60, 6000),
        "every frame x sent y counted once, delivered or not"
    );
    // Detaching y stops frames skipping the bridge to its tap at once.
    let ify = net::kernel::ifindex(Some(&m), "tapy").expect("ifindex");
    dp.detach(Some(&m), "tapy", ify, y).expect("detach");
    assert_eq!(x_to_y(10), 0, "y detached");
    drop(ports);
    drop(lab);
    let _ = dp.remove();
}

/// An instance loaded by a vinfra from before the classifier forwarded (no `taps` or `fwd`
/// map) gets the current programs on its old maps: what it counted and its epoch stay.
#[test]
fn an_instance_of_an_older_classifier_is_upgraded_keeping_its_counts() {
    let tag = format!("{}", std::process::id());
    let name = format!("test-{tag}-upgrade");
    let dp = KernelDatapath::open(&name).expect("load the classifier");
    let mut lab = NetnsLab::new();
    let (m, v) = (format!("vku{tag}m"), format!("vku{tag}v"));
    lab.add(&m).expect("machine namespace");
    lab.add(&v).expect("vm namespace");
    let (src, dst) = (mac(41), mac(42));
    lab.veth(&v, "eth0", &m, "tapw", Some(&src.to_string()))
        .expect("veth");
    let addrs: BTreeMap<MacAddr, net::kernel::AddrLocation> = [src, dst]
        .into_iter()
        .map(|a| (a, net::kernel::AddrLocation::Local))
        .collect();
    dp.set_addresses(&addrs).expect("addresses");
    dp.attach(Some(&m), "tapw", src).expect("attach");
    let port = net::rawsock::RawPort::open(Some(&v), "eth0").expect("socket");
    let frame = net::frame::build(dst, src, 0x88b5, 100);
    let sent = |n: u64| {
        for _ in 0..n {
            port.send(&frame).expect("send");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let c = dp.read().expect("read");
            let got = c.counters.class(TrafficClass::IntraServer).packets;
            if got >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(sent(5), 5);
    let epoch = dp.epoch().expect("epoch");
    let old_prog = ingress_prog_id(&dp);
    // What an older vinfra left: the same pins without the maps it did not have.
    for map in ["taps", "fwd"] {
        std::fs::remove_file(dp.dir().join("maps").join(map)).expect("unpin");
    }
    let up = KernelDatapath::open(&name).expect("upgrade");
    assert!(up.dir().join("maps/taps").exists() && up.dir().join("maps/fwd").exists());
    assert!(!up.dir().join("next").exists());
    assert_ne!(ingress_prog_id(&up), old_prog, "new programs");
    assert_eq!(up.epoch().expect("epoch"), epoch, "the same epoch");
    // The NIC still runs the old program on the kept maps; attaching again moves it over.
    up.attach(Some(&m), "tapw", src).expect("attach again");
    assert_eq!(
        sent(7),
        12,
        "nothing counted before the upgrade lost, nothing twice"
    );
    drop(port);
    drop(lab);
    let _ = up.remove();
}
