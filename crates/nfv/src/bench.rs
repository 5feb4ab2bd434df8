//! `vinfra bench ns`: time to instantiate an NS of N VNFs over two sites.
//!
//! [`bench_ns`]: each VDU takes a fixed boot time on its [`SimDriver`] site; the executor
//! runs sites and VNFs in parallel, so the total should stay near one boot time as N grows
//! (OSM-style one-after-another instantiation would grow as N × boot).
//!
//! [`bench_ns_process`]: the same over two [`ProcessDriver`] sites (real namespaces, veths,
//! bridges and processes), each VNF with a CP on its own internal network, measured side
//! by side with the *same* commands run one VNF after another (OSM's order) on the same
//! sites.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::descriptor::{validate_nsd, validate_vnfd, Vnfd};
use crate::driver::process::{ProcessConfig, ProcessDriver};
use crate::driver::sim::SimDriver;
use crate::driver::{apply, SiteDriver};
use crate::ns::{NsExecutor, Progress};
use crate::plan::plan_ns;

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchRow {
    /// VNFs in the NS.
    pub vnfs: usize,
    /// Wall-clock instantiation time.
    pub instantiate: Duration,
    /// Wall-clock terminate time.
    pub terminate: Duration,
    /// What one-after-another would take: `vnfs × boot`.
    pub sequential_estimate: Duration,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The built-in descriptors did not validate (a bug).
    #[error("built-in descriptor invalid: {0}")]
    Descriptor(String),
    /// Planning failed.
    #[error("planning failed")]
    Plan(#[from] crate::plan::PlanError),
    /// Instantiation failed.
    #[error("instantiation failed")]
    Instantiate(#[from] crate::ns::InstantiateError),
    /// Terminate failed.
    #[error("terminate failed")]
    Terminate(#[from] crate::ns::TerminateError),
}

/// The bench VNF's one VDU (the descriptor without its CPs).
macro_rules! bench_vdu {
    () => {
        "tosca_definitions_version: tosca_simple_yaml_1_3
metadata: {descriptor_id: vnfd-bench}
topology_template:
  node_templates:
    vdu:
      type: tosca.nodes.nfv.VDU.Compute
      properties: {name: vdu}
      capabilities:
        virtual_compute:
          properties:
            virtual_cpu: {num_virtual_cpu: 1}
            virtual_memory: {virtual_mem_size: 64 MiB}
      artifacts:
        sw_image: {type: tosca.artifacts.nfv.SwImage, file: default}
"
    };
}

const VNFD: &str = bench_vdu!();

/// The process bench's VNF: one VDU with one CP on an internal network.
const VNFD_CP: &str = concat!(
    bench_vdu!(),
    "    cp:
      type: tosca.nodes.nfv.VduCp
      properties: {layer_protocols: [ipv4], order: 0}
      requirements:
        - virtual_binding: vdu
        - virtual_link: vl
    vl:
      type: tosca.nodes.nfv.VnfVirtualLink
      properties:
        connectivity_type: {layer_protocols: [ipv4]}
        vl_profile:
          virtual_link_protocol_data:
            - associated_layer_protocol: ipv4
              l3_protocol_data: {ip_version: ipv4, cidr: 10.62.0.0/24}
"
);

/// One process-site measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessRow {
    /// VNFs in the NS.
    pub vnfs: usize,
    /// Instantiation by the executor (sites and VNFs in parallel).
    pub parallel: Duration,
    /// The same commands, one VNF after another (networks first), measured.
    pub sequential: Duration,
    /// Terminate by the executor.
    pub terminate: Duration,
}

/// Instantiates an NS of each size over two process sites in parallel, terminates it,
/// then runs the same commands one VNF after another and tears them down. Needs root and
/// `ip`; `tag` keeps the namespaces apart from other runs.
pub async fn bench_ns_process(sizes: &[usize], tag: &str) -> Result<Vec<ProcessRow>, BenchError> {
    let vnfd: Vnfd = validate_vnfd(VNFD_CP).map_err(errs)?;
    let sites: BTreeMap<String, Arc<dyn SiteDriver>> = ["site-a", "site-b"]
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let d = ProcessDriver::new(ProcessConfig {
                tag: format!("{tag}{i}"),
                images: vec!["default".into()],
                program: vec!["sleep".into(), "infinity".into()],
            });
            ((*s).to_owned(), Arc::new(d) as Arc<dyn SiteDriver>)
        })
        .collect();
    let exec = NsExecutor::new(sites.clone(), Duration::from_secs(5));
    let mut rows = Vec::new();
    for &n in sizes {
        let (plan, parallel, terminate) = timed_run(&exec, &vnfd, n, "pb").await?;
        // The baseline: every command of every site, one after another.
        let t = Instant::now();
        let mut failed = None;
        'all: for sp in &plan.sites {
            let Some(d) = sites.get(&sp.site) else {
                continue;
            };
            for c in sp.commands() {
                if matches!(c, crate::plan::GenericCommand::ConnectLink { .. }) {
                    continue;
                }
                if let Err(e) = apply(d.as_ref(), &c).await {
                    failed = Some(crate::ns::InstantiateError::Site {
                        site: sp.site.clone(),
                        vnf: None,
                        err: Box::new(e),
                        rollback: Vec::new(),
                    });
                    break 'all;
                }
            }
        }
        let sequential = t.elapsed();
        exec.terminate(&plan).await?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        rows.push(ProcessRow {
            vnfs: n,
            parallel,
            sequential,
            terminate,
        });
    }
    Ok(rows)
}

/// Plans an NS of `n` VNFs (named `<prefix><n>`), instantiates and terminates it; returns
/// the plan and both times.
async fn timed_run(
    exec: &NsExecutor,
    vnfd: &Vnfd,
    n: usize,
    prefix: &str,
) -> Result<(crate::plan::NsPlan, Duration, Duration), BenchError> {
    let nsd = validate_nsd(&nsd_text(n), std::slice::from_ref(vnfd)).map_err(errs)?;
    let plan = plan_ns(
        &format!("{prefix}{n}"),
        &nsd,
        std::slice::from_ref(vnfd),
        &exec.site_names(),
    )?;
    let t = Instant::now();
    let inst = exec
        .instantiate(&plan, &BTreeMap::new(), &|_: Progress| {})
        .await?;
    let instantiate = t.elapsed();
    let t = Instant::now();
    exec.terminate(&inst.plan).await?;
    Ok((plan, instantiate, t.elapsed()))
}

fn nsd_text(n: usize) -> String {
    let mut s = String::from(
        "tosca_definitions_version: tosca_simple_yaml_1_3\nmetadata: {descriptor_id: nsd-bench}\ntopology_template:\n  node_templates:\n",
    );
    for i in 0..n {
        let site = if i % 2 == 0 { "site-a" } else { "site-b" };
        s.push_str(&format!(
            "    vnf{i}:\n      type: tosca.nodes.nfv.VNF\n      properties: {{descriptor_id: vnfd-bench, vinfra_sites: [{site}]}}\n"
        ));
    }
    s
}

fn errs(e: Vec<crate::descriptor::DescriptorError>) -> BenchError {
    BenchError::Descriptor(
        e.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    )
}

/// Instantiates and terminates an NS of each size in `sizes` over two simulated sites.
pub async fn bench_ns(sizes: &[usize], boot: Duration) -> Result<Vec<BenchRow>, BenchError> {
    let vnfd: Vnfd = validate_vnfd(VNFD).map_err(errs)?;
    let sites: BTreeMap<String, Arc<dyn SiteDriver>> = ["site-a", "site-b"]
        .iter()
        .map(|s| {
            (
                (*s).to_owned(),
                Arc::new(SimDriver::new(boot, &["default"])) as Arc<dyn SiteDriver>,
            )
        })
        .collect();
    let exec = NsExecutor::new(sites, Duration::from_secs(5));
    let mut rows = Vec::new();
    for &n in sizes {
        let (_, instantiate, terminate) = timed_run(&exec, &vnfd, n, "bench").await?;
        rows.push(BenchRow {
            vnfs: n,
            instantiate,
            terminate,
            sequential_estimate: boot * u32::try_from(n).unwrap_or(u32::MAX),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn bench_runs_and_stays_near_one_boot_time() {
        let boot = std::time::Duration::from_millis(50);
        let rows = super::bench_ns(&[2, 10, 50], boot).await.unwrap();
        assert_eq!(rows.iter().map(|r| r.vnfs).collect::<Vec<_>>(), [2, 10, 50]);
        for r in &rows {
            eprintln!("{r:?}");
        }
        // 50 VNFs one after another would take 2.5 s; in parallel, about one boot.
        assert!(
            rows[2].instantiate < rows[2].sequential_estimate / 5,
            "{rows:?}"
        );
    }
}
