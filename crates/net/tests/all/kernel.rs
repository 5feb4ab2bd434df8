//! The kernel datapath with real pings: VMs are namespaces whose veth's host end sits on one
//! Linux bridge in a "machine" namespace — the layout `vinfra up` gives taps (one bridge per
//! network shared by every host of the machine). Hosts h1 (VMs a, b) and h2 (VM c) are in
//! domain A, h3 (VM d) in domain B; each host's classifier instance is attached to its VMs'
//! host ends exactly as the agent attaches it to taps, and reports to its domain's controller.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

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
    machine: String,
    rt: tokio::runtime::Runtime,
    ctl: [Controller; 2],
    addrs: [std::net::SocketAddr; 2],
    instances: Vec<KernelDatapath>,
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
    let sfx = format!("{:x}", std::process::id() % 0xfffff);
    let mut lab = NetnsLab::new();
    let machine = format!("vk{sfx}m");
    lab.add(&machine).expect("machine namespace");
    let ip = |args: &[&str]| net::netns::ip(args).expect("ip");
    ip(&["-n", &machine, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &machine, "link", "set", "br0", "up"]);
    let mut ns = BTreeMap::new();
    for (i, (vm, _, addr)) in VMS.iter().enumerate() {
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
        machine,
        rt,
        ctl,
        addrs: [addrs[0], addrs[1]],
        instances: Vec::new(),
        _lab: lab,
    }
}

impl Lab {
    fn instance(&mut self, host: &str) -> KernelDatapath {
        let name = format!("test-{}-{host}", std::process::id());
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
        sw.attach(Some(&self.machine), &format!("tap{vm}"), address)
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

/// Debian's `nfcapd` (package nfdump) on a loopback port, writing into its own directory.
struct Nfcapd {
    child: std::process::Child,
    dir: std::path::PathBuf,
    addr: std::net::SocketAddr,
}

impl Nfcapd {
    fn start() -> Nfcapd {
        let dir = std::env::temp_dir().join(format!("vinfra-nfcapd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("collector dir");
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("free udp port")
            .port();
        let log = std::fs::File::create(dir.join("nfcapd.log")).expect("log");
        let flows = dir.join("flows");
        std::fs::create_dir(&flows).expect("flows dir");
        let child = Command::new("nfcapd")
            .args([
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                "3600",
                "-w",
            ])
            .arg(&flows)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("run nfcapd (install nfdump: bash scripts/setup.sh)");
        let n = Nfcapd {
            child,
            addr: ([127, 0, 0, 1], port).into(),
            dir,
        };
        let end = Instant::now() + Duration::from_secs(10);
        while !n.log().contains("Startup") {
            assert!(Instant::now() < end, "nfcapd did not start: {}", n.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nfcapd.log")).unwrap_or_default()
    }

    /// Stops the collector (it writes its file on SIGTERM) and reads every flow back with
    /// `nfdump`: (source MAC, destination MAC) -> (packets, bytes), summed.
    fn stop_and_read(mut self) -> BTreeMap<(String, String), (u64, u64)> {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let out = Command::new("nfdump")
            .arg("-R")
            .arg(self.dir.join("flows"))
            .args(["-o", "json"])
            .output()
            .expect("run nfdump");
        assert!(
            out.status.success(),
            "nfdump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "nfdump json ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        let mut flows = BTreeMap::new();
        for f in v.as_array().into_iter().flatten() {
            let key = (
                f["in_src_mac"].as_str().unwrap_or_default().to_owned(),
                f["in_dst_mac"].as_str().unwrap_or_default().to_owned(),
            );
            let e = flows.entry(key).or_insert((0, 0));
            e.0 += f["in_packets"].as_u64().unwrap_or(0);
            e.1 += f["in_bytes"].as_u64().unwrap_or(0);
        }
        flows
    }
}

impl Drop for Nfcapd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
