//! A light site where QEMU would be too heavy: each VDU is a real process in its own
//! network namespace, each CP a real veth whose other end is on the network's Linux bridge
//! in the site's own namespace. Nothing is simulated: namespaces, links, addresses and
//! processes are the kernel's, so a link agent can run in a VDU's namespace and the
//! link-establishment traffic crosses the bridge. Used by `vinfra bench ns` and passes the
//! conformance suite.
//!
//! Names: the site namespace is `vps-<tag>`, a VDU's is `vpv-<tag>-<vdu>`; bridges are
//! `b<8 hex>` of the network name, host-side veths `c<8 hex>` of the VDU and CP names,
//! the VDU side `eth<i>` in CP order. `tag` keeps two sites (or two test runs) apart.
//! Everything is made with `ip` (iproute2); a failed create removes what it made.

use std::collections::BTreeMap;

use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use super::{CpInfo, DriverError, SiteDriver, SiteInventory};
use crate::descriptor::Ipv4Cidr;
use crate::plan::{CpSpec, VduSpec};

const SITE: &str = "process";

/// How the site runs its VDUs.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Distinguishes this site's namespaces (`[a-z0-9]`, short).
    pub tag: String,
    /// Images the site knows: every one runs `program`.
    pub images: Vec<String>,
    /// What a VDU runs (inside its namespace), e.g. `["sleep", "infinity"]`.
    pub program: Vec<String>,
}

struct Vdu {
    cps: Vec<CpSpec>,
    child: Child,
}

impl std::fmt::Debug for Vdu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vdu").field("cps", &self.cps).finish()
    }
}

/// A site of processes in namespaces.
#[derive(Debug)]
pub struct ProcessDriver {
    cfg: ProcessConfig,
    networks: Mutex<BTreeMap<String, Ipv4Cidr>>,
    vdus: Mutex<BTreeMap<String, Vdu>>,
}

fn fnv8(parts: &[&str]) -> String {
    let h = parts
        .iter()
        .flat_map(|p| p.bytes().chain(std::iter::once(0)))
        .fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
    format!("{h:08x}")
}

fn tool(cmd: &[&str], stderr: String) -> DriverError {
    DriverError::Tool {
        site: SITE,
        cmd: cmd.join(" "),
        stderr,
    }
}

async fn ip(args: &[&str]) -> Result<String, DriverError> {
    let out = Command::new("ip").args(args).output().await.map_err(|e| {
        tool(
            args,
            format!("cannot run ip ({e}); install iproute2 (scripts/setup.sh)"),
        )
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(tool(
            &[&["ip"], args].concat(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

impl ProcessDriver {
    /// A site; nothing is made until the first command.
    pub fn new(cfg: ProcessConfig) -> Self {
        ProcessDriver {
            cfg,
            networks: Mutex::new(BTreeMap::new()),
            vdus: Mutex::new(BTreeMap::new()),
        }
    }

    fn site_ns(&self) -> String {
        format!("vps-{}", self.cfg.tag)
    }

    /// The namespace a VDU's process and CPs live in (where a link agent for it runs).
    pub fn vdu_netns(&self, vdu: &str) -> String {
        format!("vpv-{}-{vdu}", self.cfg.tag)
    }

    fn bridge(net: &str) -> String {
        format!("b{}", fnv8(&[net]))
    }

    async fn ensure_site(&self) -> Result<(), DriverError> {
        let ns = self.site_ns();
        if !netns_exists(&ns) {
            match ip(&["netns", "add", &ns]).await {
                Err(_) if netns_exists(&ns) => {}
                r => {
                    r?;
                }
            }
        }
        Ok(())
    }

    /// Removes the site's namespace once it holds no network and no VDU.
    async fn drop_site_if_empty(&self) -> Result<(), DriverError> {
        let site = self.site_ns();
        let empty = self.networks.lock().await.is_empty() && self.vdus.lock().await.is_empty();
        if empty && netns_exists(&site) {
            ip(&["netns", "del", &site]).await?;
        }
        Ok(())
    }

    async fn build(&self, spec: &VduSpec, ns: &str) -> Result<Child, DriverError> {
        ip(&["netns", "add", ns]).await?;
        ip(&["-n", ns, "link", "set", "lo", "up"]).await?;
        let site = self.site_ns();
        for (i, cp) in spec.cps.iter().enumerate() {
            let host = format!("c{}", fnv8(&[&spec.name, &cp.name]));
            let guest = format!("eth{i}");
            ip(&[
                "-n", &site, "link", "add", &host, "type", "veth", "peer", "name", &guest, "netns",
                ns,
            ])
            .await?;
            let br = Self::bridge(&cp.network);
            ip(&["-n", &site, "link", "set", &host, "master", &br, "up"]).await?;
            let addr = format!("{}/{}", cp.ip, cp.prefix);
            ip(&["-n", ns, "addr", "add", &addr, "dev", &guest]).await?;
            ip(&["-n", ns, "link", "set", &guest, "up"]).await?;
        }
        let mut argv = vec!["netns", "exec", ns];
        argv.extend(self.cfg.program.iter().map(String::as_str));
        let mut child = Command::new("ip")
            .args(&argv)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| tool(&argv, format!("cannot start the VDU process: {e}")))?;
        // "Running" means the process is there and did not exit at once.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if let Ok(Some(st)) = child.try_wait() {
            return Err(DriverError::Failed {
                site: SITE,
                kind: "vdu",
                name: spec.name.clone(),
                reason: format!("its process exited at once ({st})"),
            });
        }
        Ok(child)
    }
}

#[async_trait::async_trait]
impl SiteDriver for ProcessDriver {
    fn kind(&self) -> &'static str {
        SITE
    }

    async fn create_network(&self, name: &str, cidr: Ipv4Cidr) -> Result<(), DriverError> {
        self.ensure_site().await?;
        let (site, br) = (self.site_ns(), Self::bridge(name));
        let mut nets = self.networks.lock().await;
        if !nets.contains_key(name) {
            match ip(&["-n", &site, "link", "add", &br, "type", "bridge"]).await {
                Ok(_) => {}
                // Made by an earlier driver of this site: adopt it.
                Err(_) if ip(&["-n", &site, "link", "show", &br]).await.is_ok() => {}
                Err(e) => return Err(e),
            }
            ip(&["-n", &site, "link", "set", &br, "up"]).await?;
        }
        nets.insert(name.to_owned(), cidr);
        Ok(())
    }

    async fn delete_network(&self, name: &str) -> Result<(), DriverError> {
        let (site, br) = (self.site_ns(), Self::bridge(name));
        if netns_exists(&site) && ip(&["-n", &site, "link", "show", &br]).await.is_ok() {
            ip(&["-n", &site, "link", "del", &br]).await?;
        }
        self.networks.lock().await.remove(name);
        self.drop_site_if_empty().await
    }

    async fn create_vdu(&self, spec: &VduSpec) -> Result<(), DriverError> {
        if !self.cfg.images.contains(&spec.image) {
            return Err(DriverError::NotFound {
                site: SITE,
                kind: "image",
                name: spec.image.clone(),
            });
        }
        {
            let nets = self.networks.lock().await;
            if let Some(cp) = spec.cps.iter().find(|c| !nets.contains_key(&c.network)) {
                return Err(DriverError::NotFound {
                    site: SITE,
                    kind: "network",
                    name: cp.network.clone(),
                });
            }
        }
        self.ensure_site().await?;
        let ns = self.vdu_netns(&spec.name);
        // No lock while building: VDUs start concurrently, as on a real site.
        match self.build(spec, &ns).await {
            Ok(child) => {
                self.vdus.lock().await.insert(
                    spec.name.clone(),
                    Vdu {
                        cps: spec.cps.clone(),
                        child,
                    },
                );
                Ok(())
            }
            Err(e) => {
                // Deleting the namespace removes its veths (and their bridge ports).
                if netns_exists(&ns) {
                    let _ = ip(&["netns", "del", &ns]).await;
                }
                Err(e)
            }
        }
    }

    async fn delete_vdu(&self, name: &str) -> Result<(), DriverError> {
        let vdu = self.vdus.lock().await.remove(name);
        if let Some(mut v) = vdu {
            let _ = v.child.kill().await;
        }
        let ns = self.vdu_netns(name);
        if netns_exists(&ns) {
            ip(&["netns", "del", &ns]).await?;
        }
        self.drop_site_if_empty().await
    }

    async fn cp_info(&self, vdu: &str, cp: &str) -> Result<CpInfo, DriverError> {
        let idx = {
            let vdus = self.vdus.lock().await;
            let v = vdus.get(vdu).ok_or_else(|| DriverError::NotFound {
                site: SITE,
                kind: "vdu",
                name: vdu.into(),
            })?;
            v.cps
                .iter()
                .position(|c| c.name == cp)
                .ok_or_else(|| DriverError::NotFound {
                    site: SITE,
                    kind: "cp",
                    name: cp.into(),
                })?
        };
        // What the kernel has, not what was asked for.
        let dev = format!("eth{idx}");
        let ns = self.vdu_netns(vdu);
        let out = ip(&["-n", &ns, "-j", "addr", "show", "dev", &dev]).await?;
        let v: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| DriverError::Protocol {
                site: SITE,
                op: "ip -j addr show".into(),
                what: e.to_string(),
            })?;
        let ips = v[0]["addr_info"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|i| i["family"] == "inet")
                    .filter_map(|i| i["local"].as_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        Ok(CpInfo {
            cp: cp.into(),
            port_id: Some(format!("{ns}/{dev}")),
            mac: v[0]["address"].as_str().map(str::to_owned),
            ips,
        })
    }

    async fn inventory(&self) -> Result<SiteInventory, DriverError> {
        // From the kernel: namespaces of this site, bridges in its namespace.
        let prefix = format!("vpv-{}-", self.cfg.tag);
        let vdus = std::fs::read_dir("/run/netns")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter_map(|n| n.strip_prefix(&prefix).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let site = self.site_ns();
        let mut networks = Vec::new();
        if netns_exists(&site) {
            let out = ip(&["-n", &site, "-j", "link", "show", "type", "bridge"]).await?;
            let v: serde_json::Value =
                serde_json::from_str(&out).map_err(|e| DriverError::Protocol {
                    site: SITE,
                    op: "ip -j link show type bridge".into(),
                    what: e.to_string(),
                })?;
            let nets = self.networks.lock().await;
            for br in v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l["ifname"].as_str())
            {
                // A bridge no network of ours maps to (left by an earlier driver) is
                // listed by its own name, so that a leak is visible.
                let name = nets.keys().find(|n| Self::bridge(n) == br);
                networks.push(name.cloned().unwrap_or_else(|| br.to_owned()));
            }
        }
        Ok(SiteInventory { networks, vdus })
    }
}
