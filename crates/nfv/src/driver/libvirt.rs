//! libvirt site: a real `libvirtd`, driven through `virsh` with domain and network XML.
//!
//! `virsh` (Debian `libvirt-clients`) rather than the `virt` crate: it needs no `libvirt-dev`
//! at build time and speaks libvirt's own protocol over its socket. Networks are transient
//! isolated libvirt networks (a bridge, no `<ip>`: no dnsmasq, no firewall rules); VDUs are
//! transient domains (TCG, direct kernel boot, `<acpi/>` because libvirt 9 otherwise passes
//! QEMU 10 the removed `-no-acpi`), each CP a virtio `<interface type='network'>` with a MAC
//! derived from its planned IP and recorded, with the IP, in the domain's `<metadata>`.
//! libvirt cannot see a guest's IP without a guest agent, so `cp_info` reports the planned
//! address and the MAC libvirt actually attached.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use super::{CpInfo, DriverError, SiteDriver, SiteInventory};
use crate::descriptor::Ipv4Cidr;
use crate::plan::VduSpec;

const SITE: &str = "libvirt";
const META_NS: &str = "https://vinfra.dev/nfv/1";

/// A bootable image known to a libvirt site.
#[derive(Debug, Clone)]
pub struct LibvirtImage {
    /// Kernel for direct boot.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Raw disk copied per VDU.
    pub disk_template: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
}

/// How to reach libvirtd and where to keep VDU disks.
#[derive(Debug, Clone)]
pub struct LibvirtConfig {
    /// Connection URI (`qemu:///system`).
    pub uri: String,
    /// Directory (mode 0755 all the way up: libvirt's DAC) for disks and serial logs.
    pub work_dir: PathBuf,
    /// Images by name.
    pub images: BTreeMap<String, LibvirtImage>,
    /// `virt` type: `qemu` (TCG) or `kvm`.
    pub domain_type: String,
}

/// A site run by libvirt.
#[derive(Debug)]
pub struct LibvirtDriver {
    cfg: LibvirtConfig,
}

/// Output of one virsh call.
struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// A bridge name ≤ 15 chars, stable per network name.
pub(crate) fn bridge_name(net: &str) -> String {
    // FNV-1a: stable across runs and Rust versions, unlike DefaultHasher.
    let h = net.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("nfvb{:08x}", h & 0xffff_ffff)
}

/// A locally administered MAC carrying the IP's low 24 bits: unique per planned address.
pub fn mac_for(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3])
}

/// virsh's ways of saying "no such object" (libvirt 9: `failed to get domain 'x'` on some
/// verbs, `Domain not found: no domain with matching name` on others).
fn not_found(stderr: &str) -> bool {
    [
        "not found",
        "no domain with matching",
        "no network with matching",
        "failed to get domain",
        "failed to get network",
    ]
    .iter()
    .any(|p| stderr.contains(p))
}

impl LibvirtDriver {
    /// A driver; nothing is contacted until the first call.
    pub fn new(cfg: LibvirtConfig) -> Self {
        LibvirtDriver { cfg }
    }

    async fn virsh(&self, args: &[&str]) -> Result<Out, DriverError> {
        let out = tokio::process::Command::new("virsh")
            .arg("-q")
            .arg("-c")
            .arg(&self.cfg.uri)
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| DriverError::Tool {
                site: SITE,
                cmd: format!("virsh {}", args.join(" ")),
                stderr: format!(
                    "cannot run virsh ({e}); install libvirt-clients (scripts/setup.sh)"
                ),
            })?;
        Ok(Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    async fn virsh_ok(&self, args: &[&str]) -> Result<String, DriverError> {
        let out = self.virsh(args).await?;
        if out.ok {
            Ok(out.stdout)
        } else {
            Err(DriverError::Tool {
                site: SITE,
                cmd: format!("virsh {}", args.join(" ")),
                stderr: out.stderr,
            })
        }
    }

    /// Runs virsh with an XML document passed as a file (virsh reads XML from files only).
    async fn virsh_xml(&self, verb: &str, name: &str, xml: &str) -> Result<(), DriverError> {
        let path = self.cfg.work_dir.join(format!("{name}.{verb}.xml"));
        tokio::fs::write(&path, xml)
            .await
            .map_err(|e| DriverError::Tool {
                site: SITE,
                cmd: format!("write {}", path.display()),
                stderr: e.to_string(),
            })?;
        let r = self
            .virsh_ok(&[verb, &path.to_string_lossy()])
            .await
            .map(drop);
        let _ = tokio::fs::remove_file(&path).await;
        r
    }

    fn paths(&self, vdu: &str) -> (PathBuf, PathBuf) {
        (
            self.cfg.work_dir.join(format!("{vdu}.img")),
            self.cfg.work_dir.join(format!("{vdu}.serial.log")),
        )
    }

    fn domain_xml(&self, spec: &VduSpec, img: &LibvirtImage, disk: &str, serial: &str) -> String {
        let mut ifaces = String::new();
        let mut meta = String::new();
        for cp in &spec.cps {
            let mac = mac_for(cp.ip);
            // driver qemu: no vhost-net on this kernel, and userspace virtio works everywhere.
            ifaces.push_str(&format!(
                "<interface type='network'><source network='{}'/><mac address='{mac}'/>\
                 <model type='virtio'/><driver name='qemu'/></interface>\n",
                xml_escape(&cp.network)
            ));
            meta.push_str(&format!(
                "<nfv:cp name='{}' network='{}' ip='{}' prefix='{}' mac='{mac}'/>",
                xml_escape(&cp.name),
                xml_escape(&cp.network),
                cp.ip,
                cp.prefix
            ));
        }
        format!(
            "<domain type='{ty}'>
  <name>{name}</name>
  <metadata><nfv:cps xmlns:nfv='{META_NS}'>{meta}</nfv:cps></metadata>
  <memory unit='MiB'>{mem}</memory><vcpu>{vcpus}</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    {ifaces}
    <serial type='file'><source path='{serial}' append='on'/><target port='0'/></serial>
    <console type='file'><source path='{serial}' append='on'/><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>",
            ty = xml_escape(&self.cfg.domain_type),
            name = xml_escape(&spec.name),
            mem = spec.memory_mib,
            vcpus = spec.vcpus,
            kernel = xml_escape(&img.kernel.to_string_lossy()),
            initrd = xml_escape(&img.initrd.to_string_lossy()),
            cmdline = xml_escape(&img.cmdline),
            disk = xml_escape(disk),
            serial = xml_escape(serial),
        )
    }

    /// The serial console output of a VDU so far.
    pub async fn console(&self, vdu: &str) -> String {
        tokio::fs::read_to_string(self.paths(vdu).1)
            .await
            .unwrap_or_default()
    }

    async fn boot(&self, spec: &VduSpec) -> Result<(), DriverError> {
        let img = self
            .cfg
            .images
            .get(&spec.image)
            .ok_or_else(|| DriverError::NotFound {
                site: SITE,
                kind: "image",
                name: spec.image.clone(),
            })?;
        let (disk, serial) = self.paths(&spec.name);
        let io = |what: &str, e: std::io::Error| DriverError::Tool {
            site: SITE,
            cmd: format!("{what} {}", disk.display()),
            stderr: e.to_string(),
        };
        // A copy per VDU: libvirt would chown a shared template, and guests write to it.
        tokio::fs::copy(&img.disk_template, &disk)
            .await
            .map_err(|e| io("copy to", e))?;
        let want = spec.storage_mib * 1024 * 1024;
        let f = tokio::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .await
            .map_err(|e| io("open", e))?;
        let len = f.metadata().await.map_err(|e| io("stat", e))?.len();
        if want > len {
            f.set_len(want).await.map_err(|e| io("grow", e))?;
        }
        let xml = self.domain_xml(
            spec,
            img,
            &disk.to_string_lossy(),
            &serial.to_string_lossy(),
        );
        self.virsh_xml("create", &spec.name, &xml).await?;
        let state = self.virsh_ok(&["domstate", &spec.name]).await?;
        if state.trim() != "running" {
            return Err(DriverError::Failed {
                site: SITE,
                kind: "domain",
                name: spec.name.clone(),
                reason: format!("state '{}' after create", state.trim()),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl SiteDriver for LibvirtDriver {
    fn kind(&self) -> &'static str {
        SITE
    }

    #[tracing::instrument(skip_all, fields(site = SITE, network = name))]
    async fn create_network(&self, name: &str, _cidr: Ipv4Cidr) -> Result<(), DriverError> {
        if self.virsh(&["net-info", name]).await?.ok {
            return Ok(());
        }
        // No <ip>: libvirt would start dnsmasq and add firewall rules; addresses are ours.
        let xml = format!(
            "<network><name>{}</name><bridge name='{}' stp='off'/></network>",
            xml_escape(name),
            bridge_name(name)
        );
        self.virsh_xml("net-create", name, &xml).await
    }

    async fn delete_network(&self, name: &str) -> Result<(), DriverError> {
        let out = self.virsh(&["net-destroy", name]).await?;
        if out.ok || not_found(&out.stderr) {
            return Ok(());
        }
        Err(DriverError::Tool {
            site: SITE,
            cmd: format!("virsh net-destroy {name}"),
            stderr: out.stderr,
        })
    }

    #[tracing::instrument(skip_all, fields(site = SITE, vdu = %spec.name))]
    async fn create_vdu(&self, spec: &VduSpec) -> Result<(), DriverError> {
        let r = self.boot(spec).await;
        if r.is_err() {
            if let Err(e) = self.delete_vdu(&spec.name).await {
                tracing::warn!(error = %e, "cleanup after failed boot failed");
            }
        }
        r
    }

    async fn delete_vdu(&self, name: &str) -> Result<(), DriverError> {
        let out = self.virsh(&["destroy", name]).await?;
        if !out.ok && !not_found(&out.stderr) {
            return Err(DriverError::Tool {
                site: SITE,
                cmd: format!("virsh destroy {name}"),
                stderr: out.stderr,
            });
        }
        // Transient domains are gone when destroy returns; a persistent one left by hand is
        // undefined too, so that terminate leaves nothing.
        let out = self.virsh(&["undefine", name]).await?;
        if !out.ok && !not_found(&out.stderr) && !out.stderr.contains("transient") {
            return Err(DriverError::Tool {
                site: SITE,
                cmd: format!("virsh undefine {name}"),
                stderr: out.stderr,
            });
        }
        let (disk, serial) = self.paths(name);
        for p in [disk, serial] {
            match tokio::fs::remove_file(&p).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove VDU file")
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn cp_info(&self, vdu: &str, cp: &str) -> Result<CpInfo, DriverError> {
        let out = self.virsh(&["metadata", vdu, META_NS]).await?;
        if !out.ok {
            if not_found(&out.stderr) {
                return Err(DriverError::NotFound {
                    site: SITE,
                    kind: "domain",
                    name: vdu.to_owned(),
                });
            }
            return Err(DriverError::Tool {
                site: SITE,
                cmd: format!("virsh metadata {vdu}"),
                stderr: out.stderr,
            });
        }
        let attr = |elem: &str, key: &str| -> Option<String> {
            let start = elem.find(&format!("{key}=\""))? + key.len() + 2;
            let rest = &elem[start..];
            Some(rest[..rest.find('"')?].to_owned())
        };
        // virsh prints the metadata element re-serialised, with double quotes.
        let elem = out
            .stdout
            .split('<')
            .find(|e| attr(e, "name").as_deref() == Some(cp))
            .ok_or_else(|| DriverError::NotFound {
                site: SITE,
                kind: "cp",
                name: cp.to_owned(),
            })?;
        let mac = attr(elem, "mac");
        let ip: Option<Ipv4Addr> = attr(elem, "ip").and_then(|i| i.parse().ok());
        // The interface must really be attached: domiflist lists MACs of the running domain.
        let list = self.virsh_ok(&["domiflist", vdu]).await?;
        let attached = mac
            .as_ref()
            .is_some_and(|m| list.lines().any(|l| l.split_whitespace().any(|w| w == m)));
        if !attached {
            return Err(DriverError::Failed {
                site: SITE,
                kind: "cp",
                name: cp.to_owned(),
                reason: "interface not attached to the domain".into(),
            });
        }
        Ok(CpInfo {
            cp: cp.to_owned(),
            port_id: mac.clone(),
            mac,
            ips: ip.into_iter().collect(),
        })
    }

    async fn inventory(&self) -> Result<SiteInventory, DriverError> {
        let names = |s: String| -> Vec<String> {
            s.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        };
        Ok(SiteInventory {
            networks: names(self.virsh_ok(&["net-list", "--all", "--name"]).await?),
            vdus: names(self.virsh_ok(&["list", "--all", "--name"]).await?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_and_are_stable() {
        let b = bridge_name("ns1-edge-vl");
        assert!(b.len() <= 15, "{b}");
        assert_eq!(b, bridge_name("ns1-edge-vl"));
        assert_ne!(b, bridge_name("ns1-edge-vm"));
        assert_eq!(mac_for(Ipv4Addr::new(10, 60, 0, 1)), "52:54:00:3c:00:01");
    }
}
