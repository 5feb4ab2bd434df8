//! Two operators on real networks, in network namespaces made for the run:
//!
//! ```text
//!   {p}-va (devices of A)  --acc-- {p}-mecA ==x== {p}-mecB --acc-- {p}-vb (devices of B)
//!            \ pc5                                                      / pc5
//!             `------------ {p}-pc5: bridge br0, nftables gate --------'
//! ```
//!
//! - access networks: `10.70.1.0/24` (A: MEC .1, devices .2) and `10.70.2.0/24` (B);
//! - inter-operator link between the MECs: `10.70.0.1/30` ↔ `10.70.0.2/30`;
//! - the PC5 medium: devices of A hold `10.77.1.N/32`, of B `10.77.2.N/32`; each side
//!   routes the other's /24 through a fixed neighbour entry naming the peer's MAC, so no ARP
//!   has to cross the gate (the bridge's forward chain drops everything not opened).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;

use net::netns::{ip, LabError, NetnsLab};

use crate::function::PeerOperator;
use crate::gate::Pc5Gate;
use crate::serve::{start, MecHandle, ServeOptions};
use crate::types::Plmn;

/// MAC of operator A's devices' PC5 interface.
pub const MAC_A: &str = "02:00:0a:4d:01:01";
/// MAC of operator B's devices' PC5 interface.
pub const MAC_B: &str = "02:00:0a:4d:02:01";

/// The lab's namespaces and addresses.
#[derive(Debug)]
pub struct TwoOperators {
    /// Namespace prefix.
    pub prefix: String,
    _lab: NetnsLab,
    /// Devices of A / of B.
    pub dev_ns: [String; 2],
    /// MEC hosts of A / B.
    pub mec_ns: [String; 2],
    /// The PC5 medium.
    pub pc5_ns: String,
    pc5_count: [u32; 2],
}

/// A lab failure.
#[derive(Debug, thiserror::Error)]
pub enum LabFailure {
    /// `ip` failed.
    #[error(transparent)]
    Ip(#[from] LabError),
    /// Something else.
    #[error("{0}")]
    Other(String),
}

fn batch(ns: Option<&str>, script: &str) -> Result<(), LabFailure> {
    use std::io::Write as _;
    let mut c = Command::new("ip");
    if let Some(n) = ns {
        c.args(["-n", n]);
    }
    let mut child = c
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| LabFailure::Other(format!("cannot run ip (install iproute2): {e}")))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(script.as_bytes())
            .map_err(|e| LabFailure::Other(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| LabFailure::Other(e.to_string()))?;
    if !out.status.success() {
        return Err(LabFailure::Other(format!(
            "ip -batch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn sysctl(ns: &str, kv: &str) {
    let _ = Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-qw", kv])
        .status();
}

impl TwoOperators {
    /// Builds the topology (namespaces `{prefix}-…`, deleted on drop).
    pub fn build(prefix: &str) -> Result<TwoOperators, LabFailure> {
        let mut lab = NetnsLab::new();
        let n = |s: &str| format!("{prefix}-{s}");
        let (va, vb, ma, mb, pc5) = (n("va"), n("vb"), n("meca"), n("mecb"), n("pc5"));
        for ns in [&va, &vb, &ma, &mb, &pc5] {
            lab.add(ns)?;
            sysctl(ns, "net.ipv4.conf.all.rp_filter=0");
            sysctl(ns, "net.ipv4.conf.default.rp_filter=0");
        }
        // Access networks and the inter-operator link.
        lab.veth(&va, "acc", &ma, "acc", None)?;
        lab.veth(&vb, "acc", &mb, "acc", None)?;
        lab.veth(&ma, "x", &mb, "x", None)?;
        ip(&["-n", &va, "addr", "add", "10.70.1.2/24", "dev", "acc"])?;
        ip(&["-n", &ma, "addr", "add", "10.70.1.1/24", "dev", "acc"])?;
        ip(&["-n", &vb, "addr", "add", "10.70.2.2/24", "dev", "acc"])?;
        ip(&["-n", &mb, "addr", "add", "10.70.2.1/24", "dev", "acc"])?;
        // Each side's devices can also attach to the other operator's access network (a
        // device that moves): 10.70.3.0/24 (A's devices at B) and 10.70.4.0/24 (B's at A).
        lab.veth(&va, "visit", &mb, "visit", None)?;
        lab.veth(&vb, "visit", &ma, "visit", None)?;
        ip(&["-n", &va, "addr", "add", "10.70.3.2/24", "dev", "visit"])?;
        ip(&["-n", &mb, "addr", "add", "10.70.3.1/24", "dev", "visit"])?;
        ip(&["-n", &vb, "addr", "add", "10.70.4.2/24", "dev", "visit"])?;
        ip(&["-n", &ma, "addr", "add", "10.70.4.1/24", "dev", "visit"])?;
        ip(&["-n", &ma, "addr", "add", "10.70.0.1/30", "dev", "x"])?;
        ip(&["-n", &mb, "addr", "add", "10.70.0.2/30", "dev", "x"])?;
        // The PC5 medium.
        lab.veth(&va, "pc5", &pc5, "pa", Some(MAC_A))?;
        lab.veth(&vb, "pc5", &pc5, "pb", Some(MAC_B))?;
        ip(&["-n", &pc5, "link", "add", "br0", "type", "bridge"])?;
        for p in ["pa", "pb"] {
            ip(&["-n", &pc5, "link", "set", p, "master", "br0"])?;
        }
        ip(&["-n", &pc5, "link", "set", "br0", "up"])?;
        batch(
            Some(&va),
            &format!(
                "neigh replace 10.77.0.2 lladdr {MAC_B} dev pc5 nud permanent\nroute add 10.77.2.0/24 via 10.77.0.2 dev pc5 onlink\n"
            ),
        )?;
        batch(
            Some(&vb),
            &format!(
                "neigh replace 10.77.0.1 lladdr {MAC_A} dev pc5 nud permanent\nroute add 10.77.1.0/24 via 10.77.0.1 dev pc5 onlink\n"
            ),
        )?;
        Ok(TwoOperators {
            prefix: prefix.to_owned(),
            _lab: lab,
            dev_ns: [va, vb],
            mec_ns: [ma, mb],
            pc5_ns: pc5,
            pc5_count: [0, 0],
        })
    }

    /// Adds `n` PC5 addresses for devices of operator `side` (0 = A, 1 = B); returns them.
    pub fn add_devices(&mut self, side: usize, n: u32) -> Result<Vec<Ipv4Addr>, LabFailure> {
        let third = u8::try_from(side + 1).unwrap_or(1);
        let mut script = String::new();
        let mut out = Vec::new();
        for _ in 0..n {
            self.pc5_count[side] += 1;
            let k = self.pc5_count[side];
            if k > 250 * 250 {
                return Err(LabFailure::Other("too many devices".into()));
            }
            // 10.77.{1,2}.1-250 for the first 250, then 10.78.{1,2}.x, 10.79.{1,2}.x, …
            let a = if k <= 250 {
                Ipv4Addr::new(10, 77, third, u8::try_from(k).unwrap_or(0))
            } else {
                let hi = u8::try_from(k / 250).unwrap_or(0);
                Ipv4Addr::new(10, 77 + hi, third, u8::try_from(k % 250 + 1).unwrap_or(1))
            };
            script.push_str(&format!("addr add {a}/32 dev pc5\n"));
            out.push(a);
        }
        batch(Some(&self.dev_ns[side]), &script)?;
        // Routes for the spill-over blocks.
        let other = 1 - side;
        let max_hi = self.pc5_count[side] / 250;
        // The other side reaches this side's addresses through its neighbour entry for
        // this side's MAC.
        let gw = if side == 0 { "10.77.0.1" } else { "10.77.0.2" };
        let mut r = String::new();
        for hi in 1..=max_hi {
            let net = format!("10.{}.{}.0/24", 77 + hi, third);
            r.push_str(&format!("route replace {net} via {gw} dev pc5 onlink\n"));
        }
        if !r.is_empty() {
            batch(Some(&self.dev_ns[other]), &r)?;
        }
        Ok(out)
    }

    /// The PC5 gate.
    pub fn gate(&self) -> Pc5Gate {
        Pc5Gate::new(Some(&self.pc5_ns))
    }

    /// Starts both MECs (A = `plmns[0]`), each in its namespace, peers of each other, their
    /// state in memory.
    pub async fn start_mecs(
        &self,
        plmns: [Plmn; 2],
        token: &str,
        secret: &[u8],
    ) -> std::io::Result<[MecHandle; 2]> {
        let a = self.start_mec(0, &plmns, token, secret, None).await?;
        let b = self.start_mec(1, &plmns, token, secret, None).await?;
        Ok([a, b])
    }

    /// Starts the MEC of `side` (again, after it stopped: same ports), its durable state in
    /// `state_dir` when given. A installs the gate's table; B only adds and deletes elements.
    pub async fn start_mec(
        &self,
        side: usize,
        plmns: &[Plmn; 2],
        token: &str,
        secret: &[u8],
        state_dir: Option<std::path::PathBuf>,
    ) -> std::io::Result<MecHandle> {
        let ports = [7801u16, 7802];
        let relay_ports = [4701u16, 4702];
        let xip = [Ipv4Addr::new(10, 70, 0, 1), Ipv4Addr::new(10, 70, 0, 2)];
        let other = 1 - side;
        let mut o = ServeOptions::local(plmns[side].clone(), token, secret);
        o.listen = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ports[side]);
        o.relay_port = relay_ports[side];
        o.netns = Some(self.mec_ns[side].clone());
        o.gate = Some(self.gate());
        o.advertise = Some(IpAddr::V4(Ipv4Addr::new(
            10,
            70,
            u8::try_from(side + 1).unwrap_or(1),
            1,
        )));
        o.peers = vec![PeerOperator {
            plmn: plmns[other].clone(),
            uri: format!("http://{}:{}", xip[other], ports[other]),
            relay: SocketAddr::new(xip[other].into(), relay_ports[other]),
        }];
        o.install_gate = side == 0;
        o.state_dir = state_dir;
        start(o).await
    }

    /// Address a device of `side` reaches its MEC's HTTP at.
    pub fn mec_http(side: usize) -> SocketAddr {
        let third = u8::try_from(side + 1).unwrap_or(1);
        SocketAddr::new(Ipv4Addr::new(10, 70, third, 1).into(), [7801, 7802][side])
    }

    /// Address a device of `side` reaches the other operator's MEC at, once it moved there.
    pub fn visited_http(side: usize) -> SocketAddr {
        let third = u8::try_from(side + 3).unwrap_or(3);
        SocketAddr::new(Ipv4Addr::new(10, 70, third, 1).into(), [7802, 7801][side])
    }

    /// A device's access-network address.
    pub fn device_access(side: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 70, u8::try_from(side + 1).unwrap_or(1), 2)
    }
}
