//! NS → per-site lists of generic commands. Pure: no I/O, no clock.
//!
//! The commands are in no site software's format; each [`crate::driver::SiteDriver`]
//! translates them. The planner also does the IP address management: every CP gets its
//! address here, from its virtual link's CIDR, so that addresses never collide across sites
//! that know nothing of each other.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::descriptor::{Ipv4Cidr, Nsd, Vnfd};

/// A CP as it is created on a site, with its planned address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpSpec {
    /// Site resource name of the CP (port / interface).
    pub name: String,
    /// Site resource name of the network it joins.
    pub network: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Prefix length of `network`.
    pub prefix: u8,
}

/// A VDU instance as it is created on a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VduSpec {
    /// Site resource name.
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Local storage in MiB (0: the image's own disk).
    pub storage_mib: u64,
    /// Image name known to the site.
    pub image: String,
    /// Its CPs in interface order. Created with the VDU: Nova ports at boot, libvirt
    /// `<interface>`s and Multus annotations are all fixed at creation on some site software.
    pub cps: Vec<CpSpec>,
}

/// One end of a link, as planned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedCp {
    /// Site that hosts the VNF.
    pub site: String,
    /// VNF id in the NSD.
    pub vnf: String,
    /// CP id in the VNFD.
    pub cp: String,
    /// Site resource name of the VDU that carries it.
    pub vdu: String,
    /// Site resource name of the CP: the CP's id in link establishment.
    pub resource: String,
    /// Planned address.
    pub ip: Ipv4Addr,
}

/// A generic command: what to do, not how a given site does it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum GenericCommand {
    /// Create an isolated L2 network (segment) with an IPv4 subnet.
    CreateNetwork {
        /// Site resource name.
        name: String,
        /// Its subnet.
        cidr: Ipv4Cidr,
    },
    /// Create a VDU with its CPs and wait until it runs.
    CreateVdu(VduSpec),
    /// Make sure a CP is attached and report its run-time address.
    AttachCp {
        /// VDU resource name.
        vdu: String,
        /// CP resource name.
        cp: String,
    },
    /// Establish a link from `second` to `first` by the link-establishment procedure.
    ConnectLink {
        /// Link name.
        link: String,
        /// The CP whose address is sent.
        first: PlannedCp,
        /// The CP that starts the connection.
        second: PlannedCp,
    },
    /// Delete a VDU (absent is fine) and wait until it is gone.
    DeleteVdu {
        /// VDU resource name.
        name: String,
    },
    /// Delete a network (absent is fine).
    DeleteNetwork {
        /// Site resource name.
        name: String,
    },
}

/// The commands for one VNF on its site, run in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnfPlan {
    /// VNF id in the NSD.
    pub vnf: String,
    /// Its VNFD id.
    pub vnfd: String,
    /// Its external CPs: (CP id in the VNFD, CP resource name), for SOL003's `extCpInfo`.
    pub ext_cps: Vec<(String, String)>,
    /// CreateVdu and AttachCp commands.
    pub commands: Vec<GenericCommand>,
}

/// Everything one site must do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SitePlan {
    /// Site name.
    pub site: String,
    /// CreateNetwork commands, run before any VNF.
    pub networks: Vec<GenericCommand>,
    /// Per VNF, run in parallel with each other.
    pub vnfs: Vec<VnfPlan>,
    /// ConnectLink commands whose second (connecting) CP lives on this site.
    pub links: Vec<GenericCommand>,
}

impl SitePlan {
    /// All commands in execution order.
    pub fn commands(&self) -> Vec<GenericCommand> {
        let mut out = self.networks.clone();
        out.extend(self.vnfs.iter().flat_map(|v| v.commands.iter().cloned()));
        out.extend(self.links.iter().cloned());
        out
    }

    /// The commands that undo this plan: VDUs first, then networks.
    pub fn teardown(&self) -> Vec<GenericCommand> {
        let mut out: Vec<GenericCommand> = self
            .vnfs
            .iter()
            .flat_map(|v| &v.commands)
            .filter_map(|c| match c {
                GenericCommand::CreateVdu(s) => Some(GenericCommand::DeleteVdu {
                    name: s.name.clone(),
                }),
                _ => None,
            })
            .collect();
        out.extend(self.networks.iter().filter_map(|c| match c {
            GenericCommand::CreateNetwork { name, .. } => {
                Some(GenericCommand::DeleteNetwork { name: name.clone() })
            }
            _ => None,
        }));
        out
    }
}

/// A whole NS instance's plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsPlan {
    /// NS instance name: the prefix of every site resource.
    pub ns: String,
    /// Per site, in site-name order.
    pub sites: Vec<SitePlan>,
}

impl NsPlan {
    /// Every ConnectLink, across sites.
    pub fn links(&self) -> impl Iterator<Item = &GenericCommand> {
        self.sites.iter().flat_map(|s| &s.links)
    }
}

/// Why an NS could not be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The instance name cannot prefix resource names on every site software.
    #[error("bad NS instance name '{0}' (a-z, 0-9, '-', at most 20, starting with a letter)")]
    BadName(String),
    /// None of the VNF's allowed sites is available.
    #[error("VNF '{vnf}' may go to {allowed:?}, none of which is available")]
    NoSite {
        /// VNF id.
        vnf: String,
        /// Its allowed sites.
        allowed: Vec<String>,
    },
    /// The NSD names a VNFD that was not given.
    #[error("VNF '{vnf}' uses unknown VNFD '{vnfd}'")]
    UnknownVnfd {
        /// VNF id.
        vnf: String,
        /// VNFD id.
        vnfd: String,
    },
    /// A virtual link has no address left.
    #[error("virtual link '{0}' has no address left")]
    AddressesExhausted(String),
}

/// A resource name valid on every driver (Kubernetes DNS-1123 labels are the strictest).
fn resource(parts: &[&str]) -> String {
    let s: String = parts
        .join("-")
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    s.chars().take(63).collect()
}

/// Hands out addresses per virtual link, from host 1 upwards.
#[derive(Default)]
struct Ipam {
    next: BTreeMap<String, u32>,
}

impl Ipam {
    fn take(&mut self, vl: &str, cidr: Ipv4Cidr) -> Result<Ipv4Addr, PlanError> {
        let n = self.next.entry(vl.to_owned()).or_insert(1);
        let ip = cidr
            .host(*n)
            .ok_or_else(|| PlanError::AddressesExhausted(vl.to_owned()))?;
        *n += 1;
        Ok(ip)
    }
}

/// Plans an NS instance over the available sites.
///
/// Each VNF goes to the first of its `vinfra_sites` that is in `available`. A site gets
/// one network per NS virtual link its VNFs use (the same CIDR on every site: the link
/// between sites joins the segments) and one per VNF-internal virtual link per VNF.
///
/// ```
/// use nfv::descriptor::{validate_nsd, validate_vnfd};
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/nfv/");
/// let read = |f: &str| std::fs::read_to_string(format!("{dir}{f}")).unwrap();
/// let vnfds = [validate_vnfd(&read("vnfd-firewall.yaml")).unwrap(), validate_vnfd(&read("vnfd-web.yaml")).unwrap()];
/// let nsd = validate_nsd(&read("nsd-edge.yaml"), &vnfds).unwrap();
/// let plan = nfv::plan::plan_ns("demo", &nsd, &vnfds, &["site-a".into(), "site-b".into()]).unwrap();
/// assert_eq!(plan.sites.len(), 2);
/// ```
pub fn plan_ns(
    ns: &str,
    nsd: &Nsd,
    vnfds: &[Vnfd],
    available: &[String],
) -> Result<NsPlan, PlanError> {
    let name_ok = !ns.is_empty()
        && ns.len() <= 20
        && ns.starts_with(|c: char| c.is_ascii_lowercase())
        && ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !name_ok {
        return Err(PlanError::BadName(ns.to_owned()));
    }
    let mut ipam = Ipam::default();
    let mut sites: BTreeMap<String, SitePlan> = BTreeMap::new();
    // External CPs per NS VL in NSD order, for the links.
    let mut ends: BTreeMap<String, Vec<PlannedCp>> = BTreeMap::new();
    for vnf in &nsd.vnfs {
        let vnfd =
            vnfds
                .iter()
                .find(|d| d.id == vnf.vnfd_id)
                .ok_or_else(|| PlanError::UnknownVnfd {
                    vnf: vnf.id.clone(),
                    vnfd: vnf.vnfd_id.clone(),
                })?;
        let site = vnf
            .sites
            .iter()
            .find(|s| available.contains(s))
            .ok_or_else(|| PlanError::NoSite {
                vnf: vnf.id.clone(),
                allowed: vnf.sites.clone(),
            })?;
        let sp = sites.entry(site.clone()).or_insert_with(|| SitePlan {
            site: site.clone(),
            networks: Vec::new(),
            vnfs: Vec::new(),
            links: Vec::new(),
        });
        let mut commands = Vec::new();
        let mut ext_cps = Vec::new();
        let mut internal_nets = BTreeMap::new();
        for vl in &vnfd.virtual_links {
            let name = resource(&[ns, &vnf.id, &vl.id]);
            sp.networks.push(GenericCommand::CreateNetwork {
                name: name.clone(),
                cidr: vl.cidr,
            });
            internal_nets.insert(vl.id.clone(), (name, vl.cidr));
        }
        for vdu in &vnfd.vdus {
            for i in 0..vdu.min_instances {
                let vdu_name = resource(&[ns, &vnf.id, &vdu.name, &i.to_string()]);
                let mut cps: Vec<_> = vnfd.cps.iter().filter(|c| c.vdu == vdu.id).collect();
                cps.sort_by_key(|c| c.order);
                let mut specs = Vec::new();
                for cp in cps {
                    let cp_name = resource(&[&vdu_name, &cp.id]);
                    let (vl_key, net, cidr) = match &cp.virtual_link {
                        Some(vl) => {
                            let Some((net, cidr)) = internal_nets.get(vl) else {
                                continue; // validation guarantees it exists
                            };
                            (format!("{}/{vl}", vnf.id), net.clone(), *cidr)
                        }
                        None => {
                            let Some(b) = vnf.links.iter().find(|l| l.cp == cp.id) else {
                                continue; // an external CP the NS leaves unconnected
                            };
                            let Some(nvl) =
                                nsd.virtual_links.iter().find(|v| v.id == b.virtual_link)
                            else {
                                continue;
                            };
                            let net = resource(&[ns, &nvl.id]);
                            if !sp.networks.iter().any(
                                |c| matches!(c, GenericCommand::CreateNetwork { name, .. } if *name == net),
                            ) {
                                sp.networks.insert(
                                    0,
                                    GenericCommand::CreateNetwork {
                                        name: net.clone(),
                                        cidr: nvl.cidr,
                                    },
                                );
                            }
                            (nvl.id.clone(), net, nvl.cidr)
                        }
                    };
                    let ip = ipam.take(&vl_key, cidr)?;
                    if cp.virtual_link.is_none() {
                        ext_cps.push((cp.id.clone(), cp_name.clone()));
                    }
                    if cp.virtual_link.is_none() && i == 0 {
                        ends.entry(vl_key.clone()).or_default().push(PlannedCp {
                            site: site.clone(),
                            vnf: vnf.id.clone(),
                            cp: cp.id.clone(),
                            vdu: vdu_name.clone(),
                            resource: cp_name.clone(),
                            ip,
                        });
                    }
                    specs.push(CpSpec {
                        name: cp_name,
                        network: net,
                        ip,
                        prefix: cidr.prefix(),
                    });
                }
                let attach: Vec<_> = specs
                    .iter()
                    .map(|c| GenericCommand::AttachCp {
                        vdu: vdu_name.clone(),
                        cp: c.name.clone(),
                    })
                    .collect();
                commands.push(GenericCommand::CreateVdu(VduSpec {
                    name: vdu_name,
                    vcpus: vdu.vcpus,
                    memory_mib: vdu.memory_mib,
                    storage_mib: vdu.storage_mib,
                    image: vdu.image.clone(),
                    cps: specs,
                }));
                commands.extend(attach);
            }
        }
        sp.vnfs.push(VnfPlan {
            vnf: vnf.id.clone(),
            vnfd: vnfd.id.clone(),
            ext_cps,
            commands,
        });
    }
    // Link establishment: on each NS virtual link, the first CP (NSD order) is the one whose
    // address is sent; every other CP on it is a second CP that connects to it.
    for vl in &nsd.virtual_links {
        let Some(cps) = ends.get(&vl.id) else {
            continue;
        };
        let Some((first, rest)) = cps.split_first() else {
            continue;
        };
        for (k, second) in rest.iter().enumerate() {
            let link = resource(&[ns, &vl.id, &(k + 1).to_string()]);
            if let Some(sp) = sites.get_mut(&second.site) {
                sp.links.push(GenericCommand::ConnectLink {
                    link,
                    first: first.clone(),
                    second: second.clone(),
                });
            }
        }
    }
    Ok(NsPlan {
        ns: ns.to_owned(),
        sites: sites.into_values().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor::{validate_nsd, validate_vnfd};

    fn example() -> (Nsd, Vec<Vnfd>) {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/nfv/");
        let read = |f: &str| std::fs::read_to_string(format!("{dir}{f}")).unwrap();
        let vnfds = vec![
            validate_vnfd(&read("vnfd-firewall.yaml")).unwrap(),
            validate_vnfd(&read("vnfd-web.yaml")).unwrap(),
        ];
        (validate_nsd(&read("nsd-edge.yaml"), &vnfds).unwrap(), vnfds)
    }

    #[test]
    fn example_ns_over_two_sites() {
        let (nsd, vnfds) = example();
        let plan = plan_ns("ns1", &nsd, &vnfds, &["site-a".into(), "site-b".into()]).unwrap();
        let a = &plan.sites[0];
        let b = &plan.sites[1];
        assert_eq!((a.site.as_str(), b.site.as_str()), ("site-a", "site-b"));
        let cidr: Ipv4Cidr = "10.60.0.0/24".parse().unwrap();
        let mgmt: Ipv4Cidr = "10.61.0.0/24".parse().unwrap();
        assert_eq!(
            a.networks,
            vec![
                GenericCommand::CreateNetwork {
                    name: "ns1-edge-vl".into(),
                    cidr
                },
                GenericCommand::CreateNetwork {
                    name: "ns1-fw-fw-mgmt-vl".into(),
                    cidr: mgmt
                },
            ]
        );
        assert_eq!(
            b.networks,
            vec![GenericCommand::CreateNetwork {
                name: "ns1-edge-vl".into(),
                cidr
            }]
        );
        let GenericCommand::CreateVdu(fw) = &a.vnfs[0].commands[0] else {
            panic!()
        };
        assert_eq!(fw.name, "ns1-fw-fw-0");
        let ips: Vec<_> = fw
            .cps
            .iter()
            .map(|c| (c.name.as_str(), c.ip.to_string()))
            .collect();
        assert_eq!(
            ips,
            [
                ("ns1-fw-fw-0-fw-wan-cp", "10.60.0.1".to_owned()),
                ("ns1-fw-fw-0-fw-mgmt-cp", "10.61.0.1".to_owned())
            ]
        );
        assert_eq!(a.vnfs[0].commands.len(), 3); // CreateVdu + 2 AttachCp
                                                 // The web server's CP starts the link to the firewall's CP; it lives on site-b.
        assert!(a.links.is_empty());
        let [GenericCommand::ConnectLink {
            link,
            first,
            second,
        }] = b.links.as_slice()
        else {
            panic!()
        };
        assert_eq!(link, "ns1-edge-vl-1");
        assert_eq!(
            (first.vnf.as_str(), first.ip.to_string()),
            ("fw", "10.60.0.1".to_owned())
        );
        assert_eq!(
            (second.vnf.as_str(), second.ip.to_string()),
            ("web", "10.60.0.2".to_owned())
        );
        assert_eq!(
            a.teardown(),
            vec![
                GenericCommand::DeleteVdu {
                    name: "ns1-fw-fw-0".into()
                },
                GenericCommand::DeleteNetwork {
                    name: "ns1-edge-vl".into()
                },
                GenericCommand::DeleteNetwork {
                    name: "ns1-fw-fw-mgmt-vl".into()
                },
            ]
        );
    }

    #[test]
    fn falls_back_to_the_next_allowed_site_and_fails_without_one() {
        let (nsd, vnfds) = example();
        let plan = plan_ns("ns1", &nsd, &vnfds, &["site-a".into()]).unwrap();
        assert_eq!(plan.sites.len(), 1);
        assert_eq!(plan.sites[0].vnfs.len(), 2);
        // Both ends on one site: the link is still planned, site-local.
        assert_eq!(plan.links().count(), 1);
        assert_eq!(
            plan_ns("ns1", &nsd, &vnfds, &["site-b".into()]),
            Err(PlanError::NoSite {
                vnf: "fw".into(),
                allowed: vec!["site-a".into()]
            })
        );
        assert_eq!(
            plan_ns("NS", &nsd, &vnfds, &[]),
            Err(PlanError::BadName("NS".into()))
        );
    }

    #[test]
    fn planning_is_deterministic_and_addresses_unique() {
        let (nsd, vnfds) = example();
        let sites = ["site-a".to_owned(), "site-b".to_owned()];
        let p1 = plan_ns("x", &nsd, &vnfds, &sites).unwrap();
        assert_eq!(p1, plan_ns("x", &nsd, &vnfds, &sites).unwrap());
        let mut ips: Vec<_> = p1
            .sites
            .iter()
            .flat_map(|s| s.commands())
            .filter_map(|c| match c {
                GenericCommand::CreateVdu(v) => Some(v.cps),
                _ => None,
            })
            .flatten()
            .map(|c| c.ip)
            .collect();
        let n = ips.len();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), n);
    }
}
