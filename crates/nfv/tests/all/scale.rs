//! VNF scale out / in by one VDU on a running NS (simulated site).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nfv::descriptor::{validate_nsd, validate_vnfd};
use nfv::driver::sim::SimDriver;
use nfv::driver::SiteDriver;
use nfv::ns::{NsExecutor, Progress, ScaleExecError};
use nfv::plan::{plan_ns, GenericCommand};
use nfv::scale::ScaleError;

const NSD: &str = "tosca_definitions_version: tosca_simple_yaml_1_3
metadata: {descriptor_id: nsd-scale}
topology_template:
  node_templates:
    web:
      type: tosca.nodes.nfv.VNF
      properties: {descriptor_id: vnfd-firewall, vinfra_sites: [site-a]}
";

#[tokio::test]
async fn a_vnf_scales_out_and_in_by_one_vdu_and_terminate_removes_everything() {
    let web = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/nfv/vnfd-firewall.yaml"
    ))
    .unwrap();
    let vnfd = validate_vnfd(&web).unwrap();
    let nsd = validate_nsd(NSD, std::slice::from_ref(&vnfd)).unwrap();
    let sim = Arc::new(SimDriver::new(Duration::from_millis(5), &["default"]));
    let sites: BTreeMap<String, Arc<dyn SiteDriver>> =
        [("site-a".to_owned(), sim.clone() as Arc<dyn SiteDriver>)]
            .into_iter()
            .collect();
    let exec = NsExecutor::new(sites, Duration::from_secs(2));
    let plan = plan_ns("sc", &nsd, std::slice::from_ref(&vnfd), &exec.site_names()).unwrap();
    let mut inst = exec
        .instantiate(&plan, &BTreeMap::new(), &|_: Progress| {})
        .await
        .unwrap();
    let vdus = |n: usize| {
        let sim = sim.clone();
        async move {
            let inv = sim.inventory().await.unwrap().with_prefix("sc");
            assert_eq!(inv.vdus.len(), n, "{inv:?}");
        }
    };
    vdus(1).await;
    // Nothing to scale in yet.
    let e = exec.scale(&mut inst, "web", false).await.unwrap_err();
    assert!(
        matches!(e, ScaleExecError::Plan(ScaleError::NothingToRemove(_))),
        "{e}"
    );
    let a = exec.scale(&mut inst, "web", true).await.unwrap();
    let b = exec.scale(&mut inst, "web", true).await.unwrap();
    assert_ne!(a, b);
    vdus(3).await;
    // Every CP of the NS has its own address in its network.
    let ips: Vec<_> = inst
        .plan
        .sites
        .iter()
        .flat_map(|s| s.vnfs.iter().flat_map(|v| v.commands.iter()))
        .filter_map(|c| match c {
            GenericCommand::CreateVdu(s) => Some(s.cps.iter().map(|c| c.ip).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    let distinct: std::collections::BTreeSet<_> = ips.iter().collect();
    assert_eq!(distinct.len(), ips.len(), "{ips:?}");
    assert!(ips.len() >= 3, "{ips:?}");
    // Scale in removes the most recent one.
    assert_eq!(exec.scale(&mut inst, "web", false).await.unwrap(), b);
    vdus(2).await;
    // Unknown VNF: a clear error.
    let e = exec.scale(&mut inst, "nope", true).await.unwrap_err();
    assert!(e.to_string().contains("no VNF named 'nope'"), "{e}");
    exec.scale(&mut inst, "web", true).await.unwrap();
    vdus(3).await;
    // Terminate removes scaled-out VDUs too.
    exec.terminate(&inst.plan).await.unwrap();
    vdus(0).await;
}
