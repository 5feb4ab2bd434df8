//! VNF and NS descriptors in YAML, modelled on ETSI NFV SOL001 (TOSCA).
//!
//! Validation walks the YAML tree by hand rather than through `serde` derives so that it can
//! report *every* problem at once, each with its path in the file
//! (`topology_template.node_templates.fw_cp.requirements[0].virtual_binding: unknown node 'x'`),
//! instead of stopping at the first type mismatch.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

mod limits;
pub use limits::{check_limits, LimitError, MAX_DESCRIPTOR_BYTES, MAX_DESCRIPTOR_DEPTH};

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

/// Collects errors while walking the YAML tree.
#[derive(Default)]
struct Walker {
    errors: Vec<DescriptorError>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

impl Walker {
    fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(DescriptorError {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn finish<T>(self, value: T) -> Result<T, Vec<DescriptorError>> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self.errors)
        }
    }

    /// `parent[key]` when it must be present.
    fn required<'a>(&mut self, parent: &'a Value, key: &str, path: &str) -> Option<&'a Value> {
        match parent.get(key) {
            Some(Value::Null) | None => {
                self.err(&join(path, key), "required");
                None
            }
            Some(v) => Some(v),
        }
    }

    fn string(&mut self, v: &Value, path: &str) -> Option<String> {
        match v {
            Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            Value::String(_) => {
                self.err(path, "must not be empty");
                None
            }
            // YAML reads `version: 1.0` as a number; accept it as the text it was.
            Value::Number(n) => Some(n.to_string()),
            other => {
                self.err(path, format!("expected a string, found {}", kind_of(other)));
                None
            }
        }
    }

    fn req_string(&mut self, parent: &Value, key: &str, path: &str) -> Option<String> {
        let v = self.required(parent, key, path)?;
        self.string(v, &join(path, key))
    }

    fn opt_string(&mut self, parent: &Value, key: &str, path: &str) -> Option<String> {
        match parent.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => self.string(v, &join(path, key)),
        }
    }

    fn uint(&mut self, v: &Value, path: &str, min: u64) -> Option<u64> {
        match v.as_u64() {
            Some(n) if n >= min => Some(n),
            Some(n) => {
                self.err(path, format!("must be at least {min}, found {n}"));
                None
            }
            None => {
                self.err(path, format!("expected an integer >= {min}"));
                None
            }
        }
    }

    fn mapping<'a>(&mut self, v: &'a Value, path: &str) -> Option<&'a serde_yaml_ng::Mapping> {
        match v.as_mapping() {
            Some(m) => Some(m),
            None => {
                self.err(path, format!("expected a mapping, found {}", kind_of(v)));
                None
            }
        }
    }

    fn sequence<'a>(&mut self, v: &'a Value, path: &str) -> Option<&'a Vec<Value>> {
        match v.as_sequence() {
            Some(s) => Some(s),
            None => {
                self.err(path, format!("expected a list, found {}", kind_of(v)));
                None
            }
        }
    }

    fn size_mib(&mut self, v: &Value, path: &str) -> Option<u64> {
        let Some(s) = v.as_str() else {
            self.err(path, "expected a size such as '512 MiB'");
            return None;
        };
        match parse_size_bytes(s) {
            Some(b) if b >= MIB => Some(b / MIB),
            Some(_) => {
                self.err(path, format!("size '{s}' is below 1 MiB"));
                None
            }
            None => {
                self.err(
                    path,
                    format!("bad size '{s}' (want e.g. '512 MiB' or '1 GiB')"),
                );
                None
            }
        }
    }

    fn layer_protocols(&mut self, parent: &Value, path: &str) -> Vec<LayerProtocol> {
        let lp_path = join(path, "layer_protocols");
        let Some(v) = self.required(parent, "layer_protocols", path) else {
            return Vec::new();
        };
        let Some(seq) = self.sequence(v, &lp_path) else {
            return Vec::new();
        };
        if seq.is_empty() {
            self.err(&lp_path, "must not be empty");
        }
        let mut out = Vec::new();
        for (i, item) in seq.iter().enumerate() {
            let p = format!("{lp_path}[{i}]");
            match item.as_str().map(LayerProtocol::from_str) {
                Some(Ok(lp)) => out.push(lp),
                Some(Err(())) => self.err(
                    &p,
                    format!(
                        "unknown layer protocol '{}' (ethernet, mpls, odu2, ipv4, ipv6, pseudo_wire)",
                        item.as_str().unwrap_or_default()
                    ),
                ),
                None => self.err(&p, "expected a string"),
            }
        }
        out
    }

    /// `vl_profile.virtual_link_protocol_data[0].l3_protocol_data.cidr`, the SOL001 spot.
    fn vl_cidr(&mut self, props: &Value, path: &str) -> Option<Ipv4Cidr> {
        let vp = self.required(props, "vl_profile", path)?;
        let vp_path = join(path, "vl_profile");
        let data = self.required(vp, "virtual_link_protocol_data", &vp_path)?;
        let data_path = join(&vp_path, "virtual_link_protocol_data");
        let seq = self.sequence(data, &data_path)?;
        let Some(first) = seq.first() else {
            self.err(&data_path, "must not be empty");
            return None;
        };
        let p0 = format!("{data_path}[0]");
        let l3 = self.required(first, "l3_protocol_data", &p0)?;
        let l3_path = join(&p0, "l3_protocol_data");
        if let Some(ver) = self.opt_string(l3, "ip_version", &l3_path) {
            if ver != "ipv4" {
                self.err(
                    &join(&l3_path, "ip_version"),
                    format!("only ipv4 is supported, found '{ver}'"),
                );
            }
        }
        let cidr = self.req_string(l3, "cidr", &l3_path)?;
        match cidr.parse::<Ipv4Cidr>() {
            Ok(c) => Some(c),
            Err(e) => {
                self.err(&join(&l3_path, "cidr"), e.to_string());
                None
            }
        }
    }

    fn header<'a>(&mut self, doc: &'a Value) -> (Option<String>, Option<&'a Value>) {
        if let Some(v) = self.opt_string(doc, "tosca_definitions_version", "") {
            if !v.starts_with("tosca_simple_yaml_1_") {
                self.err(
                    "tosca_definitions_version",
                    format!("unsupported '{v}' (want tosca_simple_yaml_1_x)"),
                );
            }
        } else if doc.get("tosca_definitions_version").is_none() {
            self.err("tosca_definitions_version", "required");
        }
        if let Some(m) = doc.as_mapping() {
            for k in m.keys() {
                let k = k.as_str().unwrap_or("?");
                if !TOP_KEYS.contains(&k) {
                    self.err(k, "unknown key");
                }
            }
        }
        let id = self
            .required(doc, "metadata", "")
            .and_then(|md| self.req_string(md, "descriptor_id", "metadata"));
        let templates = self
            .required(doc, "topology_template", "")
            .and_then(|tt| self.required(tt, "node_templates", "topology_template"));
        (id, templates)
    }
}

const TOP_KEYS: &[&str] = &[
    "tosca_definitions_version",
    "description",
    "metadata",
    "imports",
    "node_types",
    "data_types",
    "topology_template",
];

const MIB: u64 = 1 << 20;

/// Parses a TOSCA `scalar-unit.size` ("512 MiB", "1 GB") to bytes.
fn parse_size_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "B" => 1,
        "kB" | "KB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "TiB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl From<LimitError> for DescriptorError {
    fn from(e: LimitError) -> Self {
        DescriptorError {
            path: "descriptor".into(),
            message: e.to_string(),
        }
    }
}

/// Parses `text` after [`check_limits`]: a document over the limits is never parsed.
fn parse_doc(text: &str) -> Result<Value, Vec<DescriptorError>> {
    check_limits(text).map_err(|e| vec![e.into()])?;
    match serde_yaml_ng::from_str::<Value>(text) {
        Ok(v @ Value::Mapping(_)) => Ok(v),
        Ok(other) => Err(vec![DescriptorError {
            path: "(document)".into(),
            message: format!("expected a mapping, found {}", kind_of(&other)),
        }]),
        Err(e) => Err(vec![DescriptorError {
            path: "(document)".into(),
            message: format!("invalid YAML: {e}"),
        }]),
    }
}

/// Named node templates with their type, checking names and types.
fn templates<'a>(
    w: &mut Walker,
    templates: &'a Value,
    known: &[&'static str],
) -> Vec<(String, &'static str, &'a Value)> {
    let base = "topology_template.node_templates";
    let Some(map) = w.mapping(templates, base) else {
        return Vec::new();
    };
    if map.is_empty() {
        w.err(base, "must not be empty");
    }
    let mut out = Vec::new();
    for (k, v) in map {
        let Some(name) = k.as_str() else {
            w.err(base, "node template names must be strings");
            continue;
        };
        let path = join(base, name);
        if !valid_name(name) {
            w.err(
                &path,
                "invalid name (start with a-z; then a-z, 0-9, '_' or '-'; at most 40)",
            );
        }
        let Some(ty) = w.req_string(v, "type", &path) else {
            continue;
        };
        match known.iter().find(|k| **k == ty) {
            Some(k) => out.push((name.to_owned(), *k, v)),
            None => w.err(
                &join(&path, "type"),
                format!("unknown node type '{ty}' (known: {})", known.join(", ")),
            ),
        }
    }
    out
}

/// One `requirements` list: `[{name: target}, ...]`, returned with each item's path.
fn requirements(w: &mut Walker, node: &Value, path: &str) -> Vec<(String, String, String)> {
    let Some(v) = node.get("requirements") else {
        return Vec::new();
    };
    let rpath = join(path, "requirements");
    let Some(seq) = w.sequence(v, &rpath) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in seq.iter().enumerate() {
        let ipath = format!("{rpath}[{i}]");
        match item.as_mapping() {
            Some(m) if m.len() == 1 => {
                for (k, target) in m {
                    let Some(k) = k.as_str() else {
                        w.err(&ipath, "requirement name must be a string");
                        continue;
                    };
                    let tpath = join(&ipath, k);
                    if let Some(t) = w.string(target, &tpath) {
                        out.push((k.to_owned(), t, tpath));
                    }
                }
            }
            _ => w.err(&ipath, "expected one 'name: target' pair"),
        }
    }
    out
}

fn check_ref(
    w: &mut Walker,
    types: &BTreeMap<String, &'static str>,
    target: &str,
    want: &str,
    path: &str,
) -> bool {
    match types.get(target) {
        None => {
            w.err(path, format!("unknown node '{target}'"));
            false
        }
        Some(t) if *t != want => {
            w.err(path, format!("'{target}' is a {t}, not a {want}"));
            false
        }
        Some(_) => true,
    }
}

/// Validates a VNFD, returning it or every error found. Text over the [`check_limits`]
/// limits is refused (`descriptor: ...`) before it is parsed.
///
/// ```
/// let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/nfv/vnfd-firewall.yaml")).unwrap();
/// let vnfd = nfv::descriptor::validate_vnfd(&text).unwrap();
/// assert_eq!(vnfd.id, "vnfd-firewall");
/// assert!(nfv::descriptor::validate_vnfd("tosca_definitions_version: 1").is_err());
/// ```
pub fn validate_vnfd(text: &str) -> Result<Vnfd, Vec<DescriptorError>> {
    let doc = parse_doc(text)?;
    let mut w = Walker::default();
    let (id, node_templates) = w.header(&doc);
    let md = doc.get("metadata");
    let provider = md.and_then(|m| w.opt_string(m, "provider", "metadata"));
    let version = md.and_then(|m| w.opt_string(m, "version", "metadata"));
    let nodes = match node_templates {
        Some(t) => templates(&mut w, t, &[VDU_COMPUTE, VDU_CP, VNF_VIRTUAL_LINK]),
        None => Vec::new(),
    };
    let types: BTreeMap<String, &'static str> =
        nodes.iter().map(|(n, t, _)| (n.clone(), *t)).collect();

    let mut vdus = Vec::new();
    let mut cps = Vec::new();
    let mut vls: Vec<VnfVirtualLink> = Vec::new();
    let mut vdu_names: BTreeMap<String, String> = BTreeMap::new();
    for (name, ty, node) in &nodes {
        let path = join("topology_template.node_templates", name);
        match *ty {
            VDU_COMPUTE => {
                if let Some(v) = vdu(&mut w, name, node, &path) {
                    if let Some(prev) = vdu_names.insert(v.name.clone(), name.clone()) {
                        w.err(
                            &join(&path, "properties.name"),
                            format!("duplicate: '{}' is also the name of VDU '{prev}'", v.name),
                        );
                    }
                    vdus.push(v);
                }
            }
            VDU_CP => {
                let props = node.get("properties").unwrap_or(&Value::Null);
                let ppath = join(&path, "properties");
                let layer_protocols = if props.is_null() {
                    w.err(&ppath, "required");
                    Vec::new()
                } else {
                    w.layer_protocols(props, &ppath)
                };
                let order = match props.get("order") {
                    Some(o) => w
                        .uint(o, &join(&ppath, "order"), 0)
                        .and_then(|n| u32::try_from(n).ok())
                        .unwrap_or(0),
                    None => 0,
                };
                let mut binding = None;
                let mut link = None;
                for (req, target, rpath) in requirements(&mut w, node, &path) {
                    match req.as_str() {
                        "virtual_binding" if binding.is_some() => {
                            w.err(&rpath, "duplicate: a CP binds to one VDU")
                        }
                        "virtual_binding" => {
                            if check_ref(&mut w, &types, &target, VDU_COMPUTE, &rpath) {
                                binding = Some(target);
                            } else {
                                binding = Some(String::new());
                            }
                        }
                        "virtual_link" if link.is_some() => {
                            w.err(&rpath, "duplicate: a CP joins one virtual link")
                        }
                        "virtual_link" => {
                            check_ref(&mut w, &types, &target, VNF_VIRTUAL_LINK, &rpath);
                            link = Some(target);
                        }
                        other => w.err(
                            &rpath,
                            format!(
                                "unknown requirement '{other}' (virtual_binding, virtual_link)"
                            ),
                        ),
                    }
                }
                match binding {
                    None => w.err(&join(&path, "requirements"), "missing virtual_binding"),
                    Some(vdu) if !vdu.is_empty() => cps.push(VduCp {
                        id: name.clone(),
                        vdu,
                        virtual_link: link,
                        layer_protocols,
                        order,
                    }),
                    Some(_) => {}
                }
            }
            _ => {
                let ppath = join(&path, "properties");
                let Some(props) = w.required(node, "properties", &path) else {
                    continue;
                };
                if let Some(ct) = w.required(props, "connectivity_type", &ppath) {
                    w.layer_protocols(ct, &join(&ppath, "connectivity_type"));
                }
                if let Some(cidr) = w.vl_cidr(props, &ppath) {
                    if let Some(other) = vls.iter().find(|o| o.cidr.overlaps(cidr)) {
                        w.err(
                            &join(
                                &ppath,
                                "vl_profile.virtual_link_protocol_data[0].l3_protocol_data.cidr",
                            ),
                            format!("{cidr} overlaps {} of '{}'", other.cidr, other.id),
                        );
                    }
                    vls.push(VnfVirtualLink {
                        id: name.clone(),
                        cidr,
                    });
                }
            }
        }
    }

    // Two CPs at the same interface order on one VDU would make the NIC order ambiguous.
    let mut orders: BTreeMap<(String, u32), String> = BTreeMap::new();
    for cp in &cps {
        if let Some(prev) = orders.insert((cp.vdu.clone(), cp.order), cp.id.clone()) {
            w.err(
                &join(
                    &join("topology_template.node_templates", &cp.id),
                    "properties.order",
                ),
                format!(
                    "duplicate: CP '{prev}' already has order {} on VDU '{}'",
                    cp.order, cp.vdu
                ),
            );
        }
    }
    let ext_cps = substitution(&mut w, &doc, &types, &cps);
    for (name, ty, _) in &nodes {
        if *ty != VDU_CP {
            continue;
        }
        let Some(cp) = cps.iter().find(|c| &c.id == name) else {
            continue;
        };
        let external = ext_cps.iter().any(|e| &e.cp == name);
        let path = join("topology_template.node_templates", name);
        if cp.virtual_link.is_none() && !external {
            w.err(
                &path,
                "not connected: give it a virtual_link or expose it in substitution_mappings",
            );
        }
    }
    if vdus.is_empty() && w.errors.is_empty() {
        w.err(
            "topology_template.node_templates",
            "no VDU (tosca.nodes.nfv.VDU.Compute)",
        );
    }
    w.finish(Vnfd {
        id: id.unwrap_or_default(),
        provider,
        version,
        vdus,
        cps,
        virtual_links: vls,
        ext_cps,
    })
}

fn vdu(w: &mut Walker, id: &str, node: &Value, path: &str) -> Option<Vdu> {
    let ppath = join(path, "properties");
    let props = w.required(node, "properties", path);
    let name = props.and_then(|p| w.req_string(p, "name", &ppath));
    let (mut min, mut max) = (1, None);
    if let Some(prof) = props.and_then(|p| p.get("vdu_profile")) {
        let pp = join(&ppath, "vdu_profile");
        if let Some(v) = prof.get("min_number_of_instances") {
            min = w
                .uint(v, &join(&pp, "min_number_of_instances"), 1)
                .unwrap_or(1);
        }
        if let Some(v) = prof.get("max_number_of_instances") {
            max = w.uint(v, &join(&pp, "max_number_of_instances"), 1);
            if let Some(m) = max.filter(|m| *m < min) {
                w.err(
                    &join(&pp, "max_number_of_instances"),
                    format!("{m} is below min_number_of_instances {min}"),
                );
            }
        }
    }
    let cpath = join(path, "capabilities.virtual_compute.properties");
    let vc = node
        .get("capabilities")
        .and_then(|c| c.get("virtual_compute"))
        .and_then(|c| c.get("properties"));
    let (mut vcpus, mut mem, mut storage) = (None, None, 0);
    match vc {
        None => w.err(&cpath, "required"),
        Some(vc) => {
            if let Some(cpu) = w.required(vc, "virtual_cpu", &cpath) {
                let p = join(&cpath, "virtual_cpu");
                if let Some(n) = w.required(cpu, "num_virtual_cpu", &p) {
                    vcpus = w.uint(n, &join(&p, "num_virtual_cpu"), 1);
                }
            }
            if let Some(m) = w.required(vc, "virtual_memory", &cpath) {
                let p = join(&cpath, "virtual_memory");
                if let Some(n) = w.required(m, "virtual_mem_size", &p) {
                    mem = w.size_mib(n, &join(&p, "virtual_mem_size"));
                }
            }
            if let Some(st) = vc.get("virtual_local_storage") {
                let p = join(&cpath, "virtual_local_storage");
                for (i, s) in w.sequence(st, &p).into_iter().flatten().enumerate() {
                    let ip = format!("{p}[{i}]");
                    if let Some(n) = w.required(s, "size_of_storage", &ip) {
                        storage += w.size_mib(n, &join(&ip, "size_of_storage")).unwrap_or(0);
                    }
                }
            }
        }
    }
    let apath = join(path, "artifacts.sw_image");
    let image = match node.get("artifacts").and_then(|a| a.get("sw_image")) {
        None => {
            w.err(&apath, "required");
            None
        }
        Some(img) => {
            if let Some(t) = w.opt_string(img, "type", &apath) {
                if t != "tosca.artifacts.nfv.SwImage" {
                    w.err(
                        &join(&apath, "type"),
                        format!("expected tosca.artifacts.nfv.SwImage, found '{t}'"),
                    );
                }
            }
            w.req_string(img, "file", &apath)
        }
    };
    let vcpus = vcpus.and_then(|v| u32::try_from(v).ok());
    Some(Vdu {
        id: id.to_owned(),
        name: name?,
        vcpus: vcpus?,
        memory_mib: mem?,
        storage_mib: storage,
        image: image?,
        min_instances: u32::try_from(min).ok()?,
        max_instances: u32::try_from(max.unwrap_or(min).max(min)).ok()?,
    })
}

fn substitution(
    w: &mut Walker,
    doc: &Value,
    types: &BTreeMap<String, &'static str>,
    cps: &[VduCp],
) -> Vec<ExtCp> {
    let path = "topology_template.substitution_mappings";
    let Some(sm) = doc
        .get("topology_template")
        .and_then(|t| t.get("substitution_mappings"))
    else {
        return Vec::new();
    };
    w.req_string(sm, "node_type", path);
    let Some(reqs) = sm.get("requirements") else {
        return Vec::new();
    };
    let rpath = join(path, "requirements");
    let Some(map) = w.mapping(reqs, &rpath) else {
        return Vec::new();
    };
    let mut out: Vec<ExtCp> = Vec::new();
    for (k, v) in map {
        let Some(req) = k.as_str() else {
            w.err(&rpath, "requirement names must be strings");
            continue;
        };
        let p = join(&rpath, req);
        let pair: Vec<Option<&str>> = v
            .as_sequence()
            .map(|s| s.iter().map(Value::as_str).collect())
            .unwrap_or_default();
        let [Some(cp), Some(target)] = pair.as_slice() else {
            w.err(&p, "expected [<cp>, virtual_link]");
            continue;
        };
        if *target != "virtual_link" {
            w.err(
                &p,
                format!("expected [<cp>, virtual_link], found '{target}'"),
            );
            continue;
        }
        if !check_ref(w, types, cp, VDU_CP, &p) {
            continue;
        }
        if let Some(prev) = out.iter().find(|e| e.cp == *cp) {
            w.err(
                &p,
                format!(
                    "duplicate: CP '{cp}' is already exposed as '{}'",
                    prev.requirement
                ),
            );
            continue;
        }
        if let Some(vl) = cps
            .iter()
            .find(|c| c.id == *cp)
            .and_then(|c| c.virtual_link.as_ref())
        {
            w.err(
                &p,
                format!("CP '{cp}' is on internal virtual link '{vl}'; an external CP must not be"),
            );
            continue;
        }
        out.push(ExtCp {
            requirement: req.to_owned(),
            cp: (*cp).to_owned(),
        });
    }
    out
}

/// Validates an NSD against the VNFDs it uses, returning it or every error found. Text
/// over the [`check_limits`] limits is refused before it is parsed.
pub fn validate_nsd(text: &str, vnfds: &[Vnfd]) -> Result<Nsd, Vec<DescriptorError>> {
    let doc = parse_doc(text)?;
    let mut w = Walker::default();
    let (id, node_templates) = w.header(&doc);
    let mut imports = Vec::new();
    if let Some(v) = doc.get("imports") {
        for (i, item) in w.sequence(v, "imports").into_iter().flatten().enumerate() {
            if let Some(s) = w.string(item, &format!("imports[{i}]")) {
                imports.push(s);
            }
        }
    }
    let nodes = match node_templates {
        Some(t) => templates(&mut w, t, &[NS_VNF, NS_VIRTUAL_LINK]),
        None => Vec::new(),
    };
    let types: BTreeMap<String, &'static str> =
        nodes.iter().map(|(n, t, _)| (n.clone(), *t)).collect();
    let mut vnfs = Vec::new();
    let mut vls = Vec::new();
    for (name, ty, node) in &nodes {
        let path = join("topology_template.node_templates", name);
        let ppath = join(&path, "properties");
        let Some(props) = w.required(node, "properties", &path) else {
            continue;
        };
        if *ty == NS_VIRTUAL_LINK {
            if let Some(ct) = w.required(props, "connectivity_type", &ppath) {
                w.layer_protocols(ct, &join(&ppath, "connectivity_type"));
            }
            if let Some(cidr) = w.vl_cidr(props, &ppath) {
                vls.push(NsVirtualLink {
                    id: name.clone(),
                    cidr,
                });
            }
            continue;
        }
        let vnfd_id = w.req_string(props, "descriptor_id", &ppath);
        let vnfd = match &vnfd_id {
            Some(d) => {
                let found = vnfds.iter().find(|v| &v.id == d);
                if found.is_none() {
                    w.err(
                        &join(&ppath, "descriptor_id"),
                        format!("unknown VNFD '{d}' (not among the imports)"),
                    );
                }
                found
            }
            None => None,
        };
        let mut sites = Vec::new();
        let spath = join(&ppath, "vinfra_sites");
        if let Some(v) = w.required(props, "vinfra_sites", &ppath) {
            {
                let seq = w.sequence(v, &spath).cloned().unwrap_or_default();
                if seq.is_empty() {
                    w.err(&spath, "must name at least one site");
                }
                let mut seen = BTreeSet::new();
                for (i, s) in seq.iter().enumerate() {
                    let p = format!("{spath}[{i}]");
                    if let Some(s) = w.string(s, &p) {
                        if !seen.insert(s.clone()) {
                            w.err(&p, format!("duplicate site '{s}'"));
                        }
                        sites.push(s);
                    }
                }
            }
        }
        let mut links: Vec<CpBinding> = Vec::new();
        for (req, target, rpath) in requirements(&mut w, node, &path) {
            if !check_ref(&mut w, &types, &target, NS_VIRTUAL_LINK, &rpath) {
                continue;
            }
            let Some(vnfd) = vnfd else { continue };
            let Some(cp) = vnfd.ext_cp(&req) else {
                w.err(
                    &rpath,
                    format!("VNFD '{}' has no external CP requirement '{req}'", vnfd.id),
                );
                continue;
            };
            if links.iter().any(|l| l.requirement == req) {
                w.err(&rpath, format!("duplicate: '{req}' is already bound"));
                continue;
            }
            links.push(CpBinding {
                requirement: req,
                cp: cp.id.clone(),
                virtual_link: target,
            });
        }
        vnfs.push(NsVnf {
            id: name.clone(),
            vnfd_id: vnfd_id.unwrap_or_default(),
            sites,
            links,
        });
    }
    for vl in &vls {
        let n = vnfs
            .iter()
            .flat_map(|v| &v.links)
            .filter(|l| l.virtual_link == vl.id)
            .count();
        if n < 2 && w.errors.is_empty() {
            w.err(
                &join("topology_template.node_templates", &vl.id),
                format!("connects {n} CP(s); a link needs at least 2"),
            );
        }
    }
    if vnfs.is_empty() && w.errors.is_empty() {
        w.err(
            "topology_template.node_templates",
            "no VNF (tosca.nodes.nfv.VNF)",
        );
    }
    w.finish(Nsd {
        id: id.unwrap_or_default(),
        imports,
        vnfs,
        virtual_links: vls,
    })
}

/// Why an NSD file and its imports could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
    /// A descriptor is invalid; every error is listed.
    #[error("{path} is invalid:\n{}", list(.errors))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every error in it.
        errors: Vec<DescriptorError>,
    },
}

fn list(errors: &[DescriptorError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|err| LoadError::Read {
        path: path.to_owned(),
        err,
    })
}

/// Reads and validates a VNFD file (what `vinfra vnfd validate FILE` runs).
pub fn load_vnfd(path: &Path) -> Result<Vnfd, LoadError> {
    validate_vnfd(&read(path)?).map_err(|errors| LoadError::Invalid {
        path: path.to_owned(),
        errors,
    })
}

/// Reads an NSD file and the VNFDs it `imports` (paths relative to it), validating all.
pub fn load_nsd(path: &Path) -> Result<(Nsd, Vec<Vnfd>), LoadError> {
    let text = read(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    // Imports are read before validation so that descriptor_id references can be checked;
    // the limits apply before this first parse too.
    check_limits(&text).map_err(|e| LoadError::Invalid {
        path: path.to_owned(),
        errors: vec![e.into()],
    })?;
    let imports: Vec<String> = serde_yaml_ng::from_str::<Value>(&text)
        .ok()
        .and_then(|d| d.get("imports").and_then(Value::as_sequence).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let mut vnfds = Vec::new();
    for i in &imports {
        vnfds.push(load_vnfd(&dir.join(i))?);
    }
    let nsd = validate_nsd(&text, &vnfds).map_err(|errors| LoadError::Invalid {
        path: path.to_owned(),
        errors,
    })?;
    Ok((nsd, vnfds))
}

#[cfg(test)]
mod tests {
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
