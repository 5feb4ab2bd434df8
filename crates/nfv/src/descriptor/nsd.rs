//! NSD validation against the VNFDs it uses.

use std::collections::{BTreeMap, BTreeSet};

use super::walker::{check_ref, join, parse_doc, requirements, templates, Walker};
use super::{CpBinding, DescriptorError, NsVirtualLink, NsVnf, Nsd, Vnfd, NS_VIRTUAL_LINK, NS_VNF};

/// Validates an NSD against the VNFDs it uses, returning it or every error found. Text
/// over the [`check_limits`](super::check_limits) limits is refused before it is parsed.
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
