//! VNF and NS descriptors in YAML, modelled on ETSI NFV SOL001 (TOSCA).
//!
//! Validation walks the YAML tree by hand rather than through `serde` derives so that it can
//! report *every* problem at once, each with its path in the file
//! (`topology_template.node_templates.fw_cp.requirements[0].virtual_binding: unknown node 'x'`),
//! instead of stopping at the first type mismatch.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod limits;
mod load;
mod nsd;
mod vnfd;
mod walker;

pub use limits::{check_limits, LimitError, MAX_DESCRIPTOR_BYTES, MAX_DESCRIPTOR_DEPTH};
pub use load::{load_nsd, load_vnfd, LoadError};
pub use nsd::validate_nsd;
pub use vnfd::validate_vnfd;

/// TOSCA type of a VDU.
pub const VDU_COMPUTE: &str = "tosca.nodes.nfv.VDU.Compute";
/// TOSCA type of a VDU connection point.
pub const VDU_CP: &str = "tosca.nodes.nfv.VduCp";
/// TOSCA type of a VNF-internal virtual link.
pub const VNF_VIRTUAL_LINK: &str = "tosca.nodes.nfv.VnfVirtualLink";
/// TOSCA type of a VNF inside an NSD.
pub const NS_VNF: &str = "tosca.nodes.nfv.VNF";
/// TOSCA type of an NS virtual link.
pub const NS_VIRTUAL_LINK: &str = "tosca.nodes.nfv.NsVirtualLink";

/// One problem in a descriptor, at a path in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DescriptorError {
    /// Dotted path from the document root, with `[i]` for list items.
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

/// An IPv4 network in CIDR notation, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

/// Why a CIDR string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not `a.b.c.d/n`.
    #[error("bad CIDR '{0}' (want a.b.c.d/n)")]
    Syntax(String),
    /// Prefix longer than 30 leaves no room for two hosts.
    #[error("bad CIDR '{0}': prefix must be 8..=30")]
    Prefix(String),
    /// `10.0.0.1/24` instead of `10.0.0.0/24`.
    #[error("bad CIDR '{0}': host bits set")]
    HostBits(String),
}

impl Ipv4Cidr {
    /// The network address.
    pub fn network(self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(self) -> u8 {
        self.prefix
    }

    fn mask(self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// The `n`th host address (1-based), if it is inside the network and not broadcast.
    pub fn host(self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix));
        if n == 0 || u64::from(n) >= size - 1 {
            return None;
        }
        Some(Ipv4Addr::from(u32::from(self.addr) + n))
    }

    /// Whether two networks share any address.
    pub fn overlaps(self, other: Ipv4Cidr) -> bool {
        let m = self.mask() & other.mask();
        u32::from(self.addr) & m == u32::from(other.addr) & m
    }
}

impl FromStr for Ipv4Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, CidrError> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| CidrError::Syntax(s.into()))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| CidrError::Syntax(s.into()))?;
        let prefix: u8 = p.parse().map_err(|_| CidrError::Syntax(s.into()))?;
        if !(8..=30).contains(&prefix) {
            return Err(CidrError::Prefix(s.into()));
        }
        let c = Ipv4Cidr { addr, prefix };
        if u32::from(addr) & !c.mask() != 0 {
            return Err(CidrError::HostBits(s.into()));
        }
        Ok(c)
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = CidrError;
    fn try_from(s: String) -> Result<Self, CidrError> {
        s.parse()
    }
}

impl From<Ipv4Cidr> for String {
    fn from(c: Ipv4Cidr) -> String {
        c.to_string()
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Layer protocols of SOL001 `layer_protocols`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerProtocol {
    /// Ethernet.
    Ethernet,
    /// MPLS.
    Mpls,
    /// ODU2.
    Odu2,
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
    /// Pseudo-wire.
    PseudoWire,
}

impl FromStr for LayerProtocol {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "ethernet" => Self::Ethernet,
            "mpls" => Self::Mpls,
            "odu2" => Self::Odu2,
            "ipv4" => Self::Ipv4,
            "ipv6" => Self::Ipv6,
            "pseudo_wire" | "pseudo-wire" => Self::PseudoWire,
            _ => return Err(()),
        })
    }
}

/// A validated VNF descriptor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vnfd {
    /// `metadata.descriptor_id`.
    pub id: String,
    /// `metadata.provider`, if given.
    pub provider: Option<String>,
    /// `metadata.version`, if given.
    pub version: Option<String>,
    /// VDUs in file order.
    pub vdus: Vec<Vdu>,
    /// Connection points in file order.
    pub cps: Vec<VduCp>,
    /// VNF-internal virtual links in file order.
    pub virtual_links: Vec<VnfVirtualLink>,
    /// CPs exposed to the NS through `substitution_mappings.requirements`.
    pub ext_cps: Vec<ExtCp>,
}

/// A `tosca.nodes.nfv.VDU.Compute`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vdu {
    /// Node template name.
    pub id: String,
    /// `properties.name`.
    pub name: String,
    /// `virtual_cpu.num_virtual_cpu`.
    pub vcpus: u32,
    /// `virtual_memory.virtual_mem_size`, in MiB.
    pub memory_mib: u64,
    /// Sum of `virtual_local_storage[].size_of_storage`, in MiB.
    pub storage_mib: u64,
    /// `artifacts.sw_image.file`: an image name known to the site.
    pub image: String,
    /// `vdu_profile.min_number_of_instances` (default 1).
    pub min_instances: u32,
    /// `vdu_profile.max_number_of_instances` (default = min).
    pub max_instances: u32,
}

/// A `tosca.nodes.nfv.VduCp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VduCp {
    /// Node template name: the CP id.
    pub id: String,
    /// The VDU it is bound to (`virtual_binding`).
    pub vdu: String,
    /// The internal VL (`virtual_link`), `None` for an external CP.
    pub virtual_link: Option<String>,
    /// `properties.layer_protocols`.
    pub layer_protocols: Vec<LayerProtocol>,
    /// `properties.order` (default 0): interface order on the VDU.
    pub order: u32,
}

/// A `tosca.nodes.nfv.VnfVirtualLink`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnfVirtualLink {
    /// Node template name.
    pub id: String,
    /// `vl_profile.virtual_link_protocol_data[0].l3_protocol_data.cidr`.
    pub cidr: Ipv4Cidr,
}

/// An external CP: a substitution-mapping requirement naming a VduCp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtCp {
    /// Requirement name the NSD binds (`wan` in `wan: [fw_wan_cp, virtual_link]`).
    pub requirement: String,
    /// The VduCp it exposes.
    pub cp: String,
}

impl Vnfd {
    /// The CP exposed under a requirement name.
    pub fn ext_cp(&self, requirement: &str) -> Option<&VduCp> {
        let ext = self.ext_cps.iter().find(|e| e.requirement == requirement)?;
        self.cps.iter().find(|c| c.id == ext.cp)
    }
}

/// A validated NS descriptor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Nsd {
    /// `metadata.descriptor_id`.
    pub id: String,
    /// `imports`, as written (relative to the NSD file).
    pub imports: Vec<String>,
    /// VNFs in file order.
    pub vnfs: Vec<NsVnf>,
    /// NS virtual links in file order.
    pub virtual_links: Vec<NsVirtualLink>,
}

/// A `tosca.nodes.nfv.VNF` in an NSD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsVnf {
    /// Node template name: the VNF's id in the NS.
    pub id: String,
    /// `properties.descriptor_id`: which VNFD.
    pub vnfd_id: String,
    /// `properties.vinfra_sites`: the sites it may be placed on, preferred first.
    pub sites: Vec<String>,
    /// Its external CPs bound to NS virtual links.
    pub links: Vec<CpBinding>,
}

/// An external CP of a VNF bound to an NS virtual link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpBinding {
    /// The VNFD's substitution requirement name.
    pub requirement: String,
    /// The VduCp behind it.
    pub cp: String,
    /// The NS virtual link.
    pub virtual_link: String,
}

/// A `tosca.nodes.nfv.NsVirtualLink`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsVirtualLink {
    /// Node template name.
    pub id: String,
    /// Its IPv4 network.
    pub cidr: Ipv4Cidr,
}

#[cfg(test)]
mod tests {
    use super::walker::parse_size_bytes;
    use super::*;

    #[test]
    fn cidr_parsing_and_hosts() {
        let c: Ipv4Cidr = "10.60.0.0/24".parse().unwrap();
        assert_eq!(c.host(1), Some(Ipv4Addr::new(10, 60, 0, 1)));
        assert_eq!(c.host(254), Some(Ipv4Addr::new(10, 60, 0, 254)));
        assert_eq!(c.host(255), None);
        assert_eq!(c.host(0), None);
        assert!(matches!(
            "10.60.0.1/24".parse::<Ipv4Cidr>(),
            Err(CidrError::HostBits(_))
        ));
        assert!(matches!(
            "10.60.0.0/31".parse::<Ipv4Cidr>(),
            Err(CidrError::Prefix(_))
        ));
        assert!(matches!(
            "10.60.0/24".parse::<Ipv4Cidr>(),
            Err(CidrError::Syntax(_))
        ));
        let d: Ipv4Cidr = "10.60.0.128/25".parse().unwrap();
        assert!(c.overlaps(d) && d.overlaps(c));
        assert!(!c.overlaps("10.61.0.0/24".parse().unwrap()));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_bytes("512 MiB"), Some(512 << 20));
        assert_eq!(parse_size_bytes("1GiB"), Some(1 << 30));
        assert_eq!(parse_size_bytes("1 GB"), Some(1_000_000_000));
        assert_eq!(parse_size_bytes("12 parsecs"), None);
        assert_eq!(parse_size_bytes("MiB"), None);
    }
}
