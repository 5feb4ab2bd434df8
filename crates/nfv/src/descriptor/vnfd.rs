//! VNFD validation: VDUs, connection points, virtual links and the substitution mappings.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::walker::{check_ref, join, parse_doc, requirements, templates, Walker};
use super::{
    DescriptorError, ExtCp, Vdu, VduCp, VnfVirtualLink, Vnfd, VDU_COMPUTE, VDU_CP, VNF_VIRTUAL_LINK,
};

/// Validates a VNFD, returning it or every error found. Text over the [`check_limits`](super::check_limits)
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

pub(super) fn vdu(w: &mut Walker, id: &str, node: &Value, path: &str) -> Option<Vdu> {
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

pub(super) fn substitution(
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
