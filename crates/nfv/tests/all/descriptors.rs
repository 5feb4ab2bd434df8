//! Broken descriptors, each with its exact messages.

use nfv::descriptor::{load_nsd, validate_nsd, validate_vnfd, Vnfd};

fn example(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../../examples/nfv/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn errors_of(
    result: Result<impl std::fmt::Debug, Vec<nfv::descriptor::DescriptorError>>,
) -> Vec<String> {
    match result {
        Ok(v) => panic!("expected errors, got {v:?}"),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

const N: &str = "topology_template.node_templates";

/// (name, text replacements applied to the example, expected messages in order)
type Case = (&'static str, Vec<(&'static str, &'static str)>, Vec<String>);

#[test]
fn examples_are_valid() {
    let fw = validate_vnfd(&example("vnfd-firewall.yaml")).unwrap();
    assert_eq!(fw.vdus.len(), 1);
    assert_eq!(
        (
            fw.vdus[0].vcpus,
            fw.vdus[0].memory_mib,
            fw.vdus[0].storage_mib
        ),
        (1, 256, 16)
    );
    assert_eq!(fw.ext_cp("wan").unwrap().id, "fw_wan_cp");
    let dir = format!(
        "{}/../../examples/nfv/nsd-edge.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let (nsd, vnfds) = load_nsd(std::path::Path::new(&dir)).unwrap();
    assert_eq!(vnfds.len(), 2);
    assert_eq!(nsd.vnfs[1].sites, ["site-b", "site-a"]);
}

#[test]
fn broken_vnfds_report_every_error_at_its_path() {
    let base = example("vnfd-firewall.yaml");
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("unknown node type", vec![("type: tosca.nodes.nfv.VnfVirtualLink", "type: tosca.nodes.nfv.VirtualLink")],
         vec![format!("{N}.fw_mgmt_vl.type: unknown node type 'tosca.nodes.nfv.VirtualLink' (known: tosca.nodes.nfv.VDU.Compute, tosca.nodes.nfv.VduCp, tosca.nodes.nfv.VnfVirtualLink)"),
              format!("{N}.fw_mgmt_cp.requirements[1].virtual_link: unknown node 'fw_mgmt_vl'")]),
        ("bad CIDR", vec![("cidr: 10.61.0.0/24", "cidr: 10.61.0.0/33")],
         vec![format!("{N}.fw_mgmt_vl.properties.vl_profile.virtual_link_protocol_data[0].l3_protocol_data.cidr: bad CIDR '10.61.0.0/33': prefix must be 8..=30")]),
        ("host bits", vec![("cidr: 10.61.0.0/24", "cidr: 10.61.0.9/24")],
         vec![format!("{N}.fw_mgmt_vl.properties.vl_profile.virtual_link_protocol_data[0].l3_protocol_data.cidr: bad CIDR '10.61.0.9/24': host bits set")]),
        ("unknown VDU and VL references, two errors at once",
         vec![("- virtual_binding: fw_vdu\n        - virtual_link", "- virtual_binding: fw_vdux\n        - virtual_link"), ("- virtual_link: fw_mgmt_vl", "- virtual_link: nope_vl")],
         vec![format!("{N}.fw_mgmt_cp.requirements[0].virtual_binding: unknown node 'fw_vdux'"),
              format!("{N}.fw_mgmt_cp.requirements[1].virtual_link: unknown node 'nope_vl'")]),
        ("binding to a node of the wrong type", vec![("- virtual_binding: fw_vdu\n        - virtual_link", "- virtual_binding: fw_mgmt_vl\n        - virtual_link")],
         vec![format!("{N}.fw_mgmt_cp.requirements[0].virtual_binding: 'fw_mgmt_vl' is a tosca.nodes.nfv.VnfVirtualLink, not a tosca.nodes.nfv.VDU.Compute")]),
        ("bad sizes and counts",
         vec![("num_virtual_cpu: 1", "num_virtual_cpu: 0"), ("virtual_mem_size: 256 MiB", "virtual_mem_size: 256 parsecs"), ("size_of_storage: 16 MiB", "size_of_storage: 12 KiB")],
         vec![format!("{N}.fw_vdu.capabilities.virtual_compute.properties.virtual_cpu.num_virtual_cpu: must be at least 1, found 0"),
              format!("{N}.fw_vdu.capabilities.virtual_compute.properties.virtual_memory.virtual_mem_size: bad size '256 parsecs' (want e.g. '512 MiB' or '1 GiB')"),
              format!("{N}.fw_vdu.capabilities.virtual_compute.properties.virtual_local_storage[0].size_of_storage: size '12 KiB' is below 1 MiB")]),
        ("max below min", vec![("max_number_of_instances: 2", "max_number_of_instances: 0")],
         vec![format!("{N}.fw_vdu.properties.vdu_profile.max_number_of_instances: must be at least 1, found 0")]),
        ("unknown layer protocol", vec![("layer_protocols: [ipv4]\n        order: 0", "layer_protocols: [ipx]\n        order: 0")],
         vec![format!("{N}.fw_wan_cp.properties.layer_protocols[0]: unknown layer protocol 'ipx' (ethernet, mpls, odu2, ipv4, ipv6, pseudo_wire)")]),
        ("missing image and VDU name", vec![("        name: fw\n", ""), ("          file: default\n", "")],
         vec![format!("{N}.fw_vdu.properties.name: required"), format!("{N}.fw_vdu.artifacts.sw_image.file: required")]),
        ("dangling CP: neither internal VL nor exposed", vec![("wan: [fw_wan_cp, virtual_link]", "wan: [fw_mgmt_cp, virtual_link]")],
         vec![format!("topology_template.substitution_mappings.requirements.wan: CP 'fw_mgmt_cp' is on internal virtual link 'fw_mgmt_vl'; an external CP must not be"),
              format!("{N}.fw_wan_cp: not connected: give it a virtual_link or expose it in substitution_mappings")]),
        ("CP without binding, and a bad node name",
         vec![("      requirements:\n        - virtual_binding: fw_vdu\n    fw_mgmt_cp", "    fw_mgmt_cp"), ("    fw_mgmt_vl:", "    Fw-Mgmt:"), ("virtual_link: fw_mgmt_vl", "virtual_link: Fw-Mgmt")],
         // Names are checked while the templates are listed, before any template's contents.
         vec![format!("{N}.Fw-Mgmt: invalid name (start with a-z; then a-z, 0-9, '_' or '-'; at most 40)"),
              format!("{N}.fw_wan_cp.requirements: missing virtual_binding")]),
        ("duplicate interface order on one VDU", vec![("order: 1", "order: 0")],
         vec![format!("{N}.fw_mgmt_cp.properties.order: duplicate: CP 'fw_wan_cp' already has order 0 on VDU 'fw_vdu'")]),
        ("header", vec![("tosca_definitions_version: tosca_simple_yaml_1_3", "tosca_definitions_version: tosca_simple_yaml_2_0\nnode_typez: {}"), ("  descriptor_id: vnfd-firewall\n", "")],
         vec!["tosca_definitions_version: unsupported 'tosca_simple_yaml_2_0' (want tosca_simple_yaml_1_x)".into(),
              "node_typez: unknown key".into(), "metadata.descriptor_id: required".into()]),
        ("not YAML", vec![("    fw_vdu:\n", "    fw_vdu: [\n")], vec![]),
    ];
    for (name, edits, want) in cases {
        let mut text = base.clone();
        for (from, to) in &edits {
            assert!(
                text.contains(from),
                "case '{name}': pattern {from:?} not in the example"
            );
            text = text.replacen(from, to, 1);
        }
        let got = errors_of(validate_vnfd(&text));
        if want.is_empty() {
            assert!(
                got.len() == 1 && got[0].starts_with("(document): invalid YAML: "),
                "case '{name}': {got:#?}"
            );
        } else {
            assert_eq!(got, want, "case '{name}'");
        }
    }
}

fn vnfds() -> Vec<Vnfd> {
    vec![
        validate_vnfd(&example("vnfd-firewall.yaml")).unwrap(),
        validate_vnfd(&example("vnfd-web.yaml")).unwrap(),
    ]
}

#[test]
fn broken_nsds_report_every_error_at_its_path() {
    let base = example("nsd-edge.yaml");
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("unknown VNFD, unknown VL, no sites",
         vec![("descriptor_id: vnfd-web", "descriptor_id: vnfd-mail"), ("- wan: edge_vl", "- wan: core_vl"), ("vinfra_sites: [site-a]", "vinfra_sites: []")],
         vec![format!("{N}.fw.properties.vinfra_sites: must name at least one site"),
              format!("{N}.fw.requirements[0].wan: unknown node 'core_vl'"),
              format!("{N}.web.properties.descriptor_id: unknown VNFD 'vnfd-mail' (not among the imports)")]),
        ("requirement the VNFD does not expose", vec![("- uplink: edge_vl", "- downlink: edge_vl")],
         vec![format!("{N}.web.requirements[0].downlink: VNFD 'vnfd-web' has no external CP requirement 'downlink'")]),
        ("duplicate site, bad NS VL CIDR", vec![("[site-b, site-a]", "[site-b, site-b]"), ("cidr: 10.60.0.0/24", "cidr: 10.60.0/24")],
         vec![format!("{N}.web.properties.vinfra_sites[1]: duplicate site 'site-b'"),
              format!("{N}.edge_vl.properties.vl_profile.virtual_link_protocol_data[0].l3_protocol_data.cidr: bad CIDR '10.60.0/24' (want a.b.c.d/n)")]),
        ("a VL with one CP cannot be a link", vec![("      requirements:\n        - uplink: edge_vl\n", "")],
         vec![format!("{N}.edge_vl: connects 1 CP(s); a link needs at least 2")]),
        ("requirements that are not a list", vec![("        - uplink: edge_vl\n", "")],
         vec![format!("{N}.web.requirements: expected a list, found null")]),
    ];
    for (name, edits, want) in cases {
        let mut text = base.clone();
        for (from, to) in &edits {
            assert!(
                text.contains(from),
                "case '{name}': pattern {from:?} not in the example"
            );
            text = text.replacen(from, to, 1);
        }
        assert_eq!(
            errors_of(validate_nsd(&text, &vnfds())),
            want,
            "case '{name}'"
        );
    }
}

/// The limits apply before parsing, with the same messages for the API and the CLI
/// (`load_*`), and the largest documents within them validate quickly.
#[test]
fn limits_refuse_before_parsing() {
    let huge = "[".repeat(1_900_000);
    let started = std::time::Instant::now();
    assert_eq!(
        errors_of(validate_vnfd(&huge)),
        ["descriptor: 1900000 bytes exceeds the limit of 262144 bytes"]
    );
    assert_eq!(
        errors_of(validate_nsd(&huge, &[])),
        ["descriptor: 1900000 bytes exceeds the limit of 262144 bytes"]
    );
    let deep = format!("{}\n{}", example("vnfd-firewall.yaml"), "[".repeat(200_000));
    assert_eq!(
        errors_of(validate_vnfd(&deep)),
        [format!(
            "descriptor: nesting deeper than the limit of 32 levels at line {}",
            deep.lines().count()
        )]
    );
    let deep_block: String = (0..40)
        .map(|d| format!("{}k{d}:\n", "  ".repeat(d)))
        .collect();
    assert_eq!(
        errors_of(validate_vnfd(&deep_block)),
        ["descriptor: nesting deeper than the limit of 32 levels at line 33"]
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(1));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("huge.yaml");
    std::fs::write(&file, &huge).unwrap();
    let e = nfv::descriptor::load_vnfd(&file).unwrap_err().to_string();
    assert!(
        e.contains("descriptor: 1900000 bytes exceeds the limit of 262144 bytes"),
        "{e}"
    );
    let e = load_nsd(&file).unwrap_err().to_string();
    assert!(
        e.contains("descriptor: 1900000 bytes exceeds the limit of 262144 bytes"),
        "{e}"
    );

    // Worst cases within the limits: as deep as allowed, as long as allowed.
    let max = nfv::descriptor::MAX_DESCRIPTOR_BYTES;
    let nested = format!("{}{},", "[".repeat(30), "]".repeat(30));
    let wide = format!("a: [{}]\n", nested.repeat(max / (nested.len() + 1) - 1));
    assert!(wide.len() <= max);
    let items = "- x\n".repeat(max / 4);
    for text in [wide, items] {
        let started = std::time::Instant::now();
        assert!(validate_vnfd(&text).is_err());
        eprintln!(
            "{} bytes refused by validation in {:?}",
            text.len(),
            started.elapsed()
        );
    }
}
