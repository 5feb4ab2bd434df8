//! The host side of VM NICs: one Linux bridge per vinfra network on this machine, one
//! persistent tap per NIC, enslaved to its network's bridge. QEMU opens the tap by name.
//!
//! Decisions:
//! - The bridge is named after the network (`vbr` + 8 hex digits of its id), not after
//!   the host, so every agent on one machine plugs into the same segment: VMs of one
//!   network on two hosts of a single-machine deployment (`vinfra up`, the tests) reach
//!   each other through it.
//! - Machines are joined per network by VXLAN when the agent has an uplink address
//!   (`--uplink-ip`): a `vx<8 hex>` port on the bridge, VNI from the network id, flooding
//!   to every other host's uplink address (head-end replication, MACs learned). One agent
//!   per machine then: two VXLAN ports on one shared bridge would loop.
//! - Bridges carry no IP address, so the host never routes or answers for guest
//!   traffic; guests only reach guests on their own network.
//! - Tap names derive from the VM's run dir (unique per host and VM), so the source and
//!   destination of a migration on one machine never share a tap.
//! - Everything is done with `ip` (iproute2), whose errors are clear and logged verbatim.

use std::path::Path;

use model::{NetworkId, Nic};

/// Prefix of every bridge vinfra makes.
pub const BRIDGE_PREFIX: &str = "vbr";
/// Prefix of every tap vinfra makes.
pub const TAP_PREFIX: &str = "vtp";
/// Prefix of every VXLAN port vinfra makes.
pub const VXLAN_PREFIX: &str = "vvx";
/// The IANA VXLAN port.
pub const VXLAN_PORT: &str = "4789";

/// This host's end of the VM networks' tunnels and the other hosts' ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    /// This host's data-network address.
    pub local: std::net::Ipv4Addr,
    /// The other hosts' (up ones, with an uplink).
    pub peers: Vec<std::net::Ipv4Addr>,
}

/// The VXLAN network identifier of `net`: 24 bits of its id (never 0).
pub fn vni(net: NetworkId) -> u32 {
    let b = net.0.as_bytes();
    u32::from_be_bytes([0, b[0], b[1], b[2]]).max(1)
}

fn vxlan_name(net: NetworkId) -> String {
    format!("{VXLAN_PREFIX}{}", &net.0.simple().to_string()[..8])
}

/// Why a NIC could not be plugged.
#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    /// `ip` or `bridge` failed.
    #[error("{args}: {stderr}")]
    Ip {
        /// The command line.
        args: String,
        /// What it said.
        stderr: String,
    },
    /// The CP names could not be recorded.
    #[error("cannot write the VM's CP list")]
    CpsFile(#[source] std::io::Error),
    /// A NIC's MAC that is not one.
    #[error("invalid MAC address {0:?}")]
    Mac(String),
    /// The traffic classifier could not be attached to a tap.
    #[error("cannot attach the traffic classifier")]
    Counting(#[source] net::KernelSwitchError),
    /// The attaching task died.
    #[error("the classifier attach task failed")]
    CountingTask,
    /// `ip` could not be run at all.
    #[error("cannot run ip (install iproute2: scripts/setup.sh): {0}")]
    Spawn(#[source] std::io::Error),
}

/// The bridge of `net` on this machine.
pub fn bridge_name(net: NetworkId) -> String {
    format!("{BRIDGE_PREFIX}{}", &net.0.simple().to_string()[..8])
}

/// The tap prefix of the VM whose run dir is `run_dir`; NIC `i` is `<prefix><i>`.
pub fn tap_prefix(run_dir: &Path) -> String {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let h = run_dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
        });
    format!("{TAP_PREFIX}{h:08x}")
}

/// The name of this host's classifier instance (its pinned maps): the host name and a hash
/// of the agent's data dir, so two agents of one machine (or two test runs) never share
/// counters, and a restarted agent finds its own again.
pub fn datapath_instance(host: &str, data_dir: &Path) -> String {
    format!("{host}-{}", &tap_prefix(data_dir)[TAP_PREFIX.len()..])
}

/// The tap of NIC `i` (at most 8 NICs: one digit).
pub fn tap_name(run_dir: &Path, i: usize) -> String {
    format!("{}{i:x}", tap_prefix(run_dir))
}

fn exists(dev: &str) -> bool {
    Path::new("/sys/class/net").join(dev).exists()
}

async fn ip(args: &[&str]) -> Result<(), NetdevError> {
    tool("ip", args).await.map(drop)
}

async fn ensure_bridge(br: &str) -> Result<(), NetdevError> {
    if !exists(br) {
        match ip(&["link", "add", br, "type", "bridge"]).await {
            // Another agent on this machine made it first.
            Err(NetdevError::Ip { .. }) if exists(br) => {}
            r => r?,
        }
    }
    ip(&["link", "set", br, "up"]).await
}

/// What QEMU gets for a VM's NICs: the taps [`plug`] makes and the MACs.
pub fn attachments(run_dir: &Path, nics: &[Nic]) -> Vec<compute::NicAttach> {
    nics.iter()
        .enumerate()
        .map(|(i, n)| compute::NicAttach {
            tap: tap_name(run_dir, i),
            mac: n.mac.clone(),
        })
        .collect()
}

/// Whether VM NICs get host devices.
#[derive(Clone, Debug)]
pub enum Plumbing {
    /// Taps on bridges, and VXLAN ports when there is an uplink (a copy: the host's
    /// uplink changes as hosts come and go, while a VM task plugs with what it saw).
    Host {
        /// The VXLAN uplink.
        uplink: Option<Uplink>,
        /// The host's traffic classifier, attached to every tap when present.
        counting: Option<std::sync::Arc<net::KernelSwitch>>,
    },
    /// None: the guests open no taps (the sim driver).
    Off,
}

impl Plumbing {
    /// [`plug`] under this plumbing, then [`Plumbing::count`]; nothing when it is off.
    pub async fn plug(self, run_dir: &Path, vm: &str, nics: &[Nic]) -> Result<(), NetdevError> {
        match &self {
            Plumbing::Host { uplink, .. } => plug(run_dir, nics, uplink.as_ref()).await?,
            Plumbing::Off => return Ok(()),
        }
        self.count(run_dir, vm, nics).await
    }

    /// Attaches the host's classifier to VM `vm`'s taps (again, for a VM adopted after an
    /// agent restart: attaching is idempotent). Before the guest starts, so its first frame
    /// is counted. A tap that goes away is dropped by the classifier's reporter on its own.
    pub async fn count(&self, run_dir: &Path, vm: &str, nics: &[Nic]) -> Result<(), NetdevError> {
        let Plumbing::Host {
            counting: Some(sw), ..
        } = self
        else {
            return Ok(());
        };
        let mut ports = Vec::new();
        for (i, nic) in nics.iter().enumerate() {
            let mac = nic
                .mac
                .parse()
                .map_err(|_| NetdevError::Mac(nic.mac.clone()))?;
            ports.push((
                tap_name(run_dir, i),
                net::PortAddress {
                    vm: vm.to_owned(),
                    mac,
                    ip: Some(std::net::IpAddr::V4(nic.ip)),
                },
            ));
        }
        let sw = sw.clone();
        tokio::task::spawn_blocking(move || {
            for (tap, addr) in ports {
                sw.attach(None, &tap, addr)?;
            }
            Ok::<_, net::KernelSwitchError>(())
        })
        .await
        .map_err(|_| NetdevError::CountingTask)?
        .map_err(NetdevError::Counting)
    }
}

/// Creates (or reuses) the taps of a VM's NICs and plugs each into its network's bridge
/// (with its VXLAN port when there is an uplink), and records the VM's CP names for the
/// link relay.
pub async fn plug(
    run_dir: &Path,
    nics: &[Nic],
    uplink: Option<&Uplink>,
) -> Result<(), NetdevError> {
    let names: String = nics
        .iter()
        .filter_map(|n| n.name.as_ref().map(|n| format!("{n}\n")))
        .collect();
    if !names.is_empty() {
        std::fs::write(run_dir.join(crate::files::CPS_FILE), names)
            .map_err(NetdevError::CpsFile)?;
    }
    for (i, nic) in nics.iter().enumerate() {
        let (br, tap) = (bridge_name(nic.network), tap_name(run_dir, i));
        if !exists(&tap) {
            ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]).await?;
        }
        ensure_bridge(&br).await?;
        // A bridge another agent removed just now (its last port went) is made again.
        if ip(&["link", "set", &tap, "master", &br, "up"])
            .await
            .is_err()
        {
            ensure_bridge(&br).await?;
            ip(&["link", "set", &tap, "master", &br, "up"]).await?;
        }
        if let Some(up) = uplink {
            ensure_vxlan(nic.network, &br, up).await?;
        }
        tracing::debug!(tap, bridge = br, ip = %nic.ip, "nic plugged");
    }
    Ok(())
}

async fn ensure_vxlan(net: NetworkId, br: &str, up: &Uplink) -> Result<(), NetdevError> {
    let vx = vxlan_name(net);
    if !exists(&vx) {
        let (id, local) = (vni(net).to_string(), up.local.to_string());
        ip(&[
            "link", "add", &vx, "type", "vxlan", "id", &id, "local", &local, "dstport", VXLAN_PORT,
        ])
        .await?;
    }
    ip(&["link", "set", &vx, "master", br, "up"]).await?;
    sync_fdb(&vx, &up.peers).await
}

async fn tool(bin: &str, args: &[&str]) -> Result<String, NetdevError> {
    let out = tokio::process::Command::new(bin)
        .args(args)
        .output()
        .await
        .map_err(NetdevError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetdevError::Ip {
            args: format!("{bin} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Makes the flood entries of VXLAN port `vx` exactly `peers`.
async fn sync_fdb(vx: &str, peers: &[std::net::Ipv4Addr]) -> Result<(), NetdevError> {
    const ALL: &str = "00:00:00:00:00:00";
    let shown = tool("bridge", &["fdb", "show", "dev", vx]).await?;
    let have: Vec<String> = shown
        .lines()
        .filter(|l| l.starts_with(ALL))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "dst")?;
            w.next().map(str::to_owned)
        })
        .collect();
    for p in peers.iter().map(ToString::to_string) {
        if !have.contains(&p) {
            tool("bridge", &["fdb", "append", ALL, "dev", vx, "dst", &p]).await?;
        }
    }
    for old in have
        .iter()
        .filter(|h| !peers.iter().any(|p| p.to_string() == **h))
    {
        tool("bridge", &["fdb", "del", ALL, "dev", vx, "dst", old]).await?;
    }
    Ok(())
}

/// Points every VXLAN port on this machine at `up.peers` (best effort, logged).
pub async fn sync_uplinks(up: &Uplink) {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return;
    };
    let ports: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(VXLAN_PREFIX))
        .collect();
    for vx in ports {
        if let Err(e) = sync_fdb(&vx, &up.peers).await {
            tracing::warn!(port = vx, error = %e, "cannot update VXLAN peers");
        }
    }
}

fn ip_sync(args: &[&str]) -> Result<(), NetdevError> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(NetdevError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetdevError::Ip {
            args: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Removes the taps of every VM under every agent data dir in `root` (`root/*/vms/*`):
/// for test harnesses, whose QEMUs are killed without their agents' help.
pub fn unplug_all_under(root: &Path) {
    let Ok(hosts) = std::fs::read_dir(root) else {
        return;
    };
    for h in hosts.flatten() {
        // And their classifier instances (named `<host>-<hash of the data dir>`).
        let suffix = format!("-{}", &tap_prefix(&h.path())[TAP_PREFIX.len()..]);
        if let Ok(pins) = std::fs::read_dir(net::kernel::BPF_ROOT) {
            for p in pins.flatten() {
                if p.file_name().to_string_lossy().ends_with(&suffix) {
                    let _ = std::fs::remove_dir_all(p.path());
                }
            }
        }
        if let Ok(vms) = std::fs::read_dir(h.path().join(crate::files::VMS_DIR)) {
            for vm in vms.flatten() {
                unplug(&vm.path());
            }
        }
    }
}

/// Removes a VM's taps (whatever they were) and every bridge left without ports.
/// Best effort: a failure is logged, never fatal (the VM is going away). Synchronous:
/// a few `ip` calls of a millisecond each.
pub fn unplug(run_dir: &Path) {
    let prefix = tap_prefix(run_dir);
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return;
    };
    let taps: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    for tap in taps {
        let master = std::fs::read_link(Path::new("/sys/class/net").join(&tap).join("master"))
            .ok()
            .and_then(|p| p.file_name()?.to_str().map(str::to_owned));
        if let Err(e) = ip_sync(&["link", "del", &tap]) {
            tracing::warn!(tap, error = %e, "cannot remove tap");
        }
        if let Some(br) = master.filter(|b| b.starts_with(BRIDGE_PREFIX)) {
            // Left with no port but our VXLAN one: the network has no VM here any more.
            let ports: Vec<String> =
                std::fs::read_dir(Path::new("/sys/class/net").join(&br).join("brif"))
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_else(|_| vec![String::from("?")]);
            if ports.iter().all(|p| p.starts_with(VXLAN_PREFIX)) {
                for vx in &ports {
                    if let Err(e) = ip_sync(&["link", "del", vx]) {
                        tracing::debug!(port = vx, error = %e, "vxlan port not removed");
                    }
                }
                if let Err(e) = ip_sync(&["link", "del", &br]) {
                    tracing::debug!(bridge = br, error = %e, "bridge not removed");
                }
            }
        }
    }
}

/// The kernel arguments that tell the guest its addresses and CP names (see
/// `scripts/build-guest.sh`).
pub fn kernel_args(nics: &[Nic]) -> String {
    nics.iter()
        .map(|n| {
            let name = n.name.as_ref().map(|n| format!(",{n}")).unwrap_or_default();
            format!(
                "{}{},{}/{}{name}",
                model::api::NIC_KERNEL_ARG,
                n.mac,
                n.ip,
                n.prefix
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz_and_differ_per_run_dir() {
        let a = tap_name(Path::new("/var/lib/vinfra/host-a/vms/0123456789ab"), 7);
        let b = tap_name(Path::new("/var/lib/vinfra/host-b/vms/0123456789ab"), 7);
        assert!(a.len() <= 15 && b.len() <= 15, "{a} {b}");
        assert_ne!(a, b);
        assert!(a.starts_with(&tap_prefix(Path::new(
            "/var/lib/vinfra/host-a/vms/0123456789ab"
        ))));
        let br = bridge_name(NetworkId::new_random());
        assert!(br.len() <= 15 && br.starts_with(BRIDGE_PREFIX), "{br}");
    }

    #[test]
    fn kernel_args_list_every_nic() {
        let net = NetworkId::new_random();
        let nic = |ip: [u8; 4]| Nic {
            name: Some(model::validate_name("n", "fw-cp").unwrap()),
            network: net,
            network_name: model::validate_name("n", "blue").unwrap(),
            ip: ip.into(),
            prefix: 24,
            mac: Nic::mac_for(net, ip.into()),
        };
        let args = kernel_args(&[nic([10, 70, 0, 1]), nic([10, 70, 0, 2])]);
        let parts: Vec<&str> = args.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts[0].starts_with("vinfra.nic=02:"));
        assert!(parts[0].ends_with(":46:00:01,10.70.0.1/24,fw-cp"), "{args}");
        assert!(parts[1].ends_with(",10.70.0.2/24,fw-cp"), "{args}");
    }
}
