//! VNF scaling by one VDU (SOL002/003 "scale out / scale in" with a step of one): a pure
//! planner over an [`NsPlan`], so that terminate (which is derived from the plan) also
//! removes scaled-out instances, and the executor step in [`crate::ns::NsExecutor::scale`].
//!
//! A scale-out copies the VNF's first VDU (name suffixed `-sN`) with new CPs on the same
//! networks; their addresses come from the same IPAM rule as the planner's: the first host
//! address of the network's CIDR that no CP of the NS (on any site) uses. A scale-in
//! removes the most recent scaled-out VDU; the VNF's instantiated VDUs are never removed.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::plan::{CpSpec, GenericCommand, NsPlan, VduSpec};

/// Why a VNF cannot be scaled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScaleError {
    /// No such VNF in the NS.
    #[error("no VNF named '{0}' in this NS")]
    NoVnf(String),
    /// The VNF has no VDU to copy.
    #[error("VNF '{0}' has no VDU")]
    NoVdu(String),
    /// Nothing was scaled out.
    #[error("VNF '{0}' has no scaled-out VDU to remove")]
    NothingToRemove(String),
    /// A network is full.
    #[error("network '{0}' has no free address left")]
    NoAddress(String),
}

/// Where a VNF's plan is: (site index, VNF index).
fn locate(plan: &NsPlan, vnf: &str) -> Result<(usize, usize), ScaleError> {
    plan.sites
        .iter()
        .enumerate()
        .find_map(|(s, sp)| sp.vnfs.iter().position(|v| v.vnf == vnf).map(|v| (s, v)))
        .ok_or_else(|| ScaleError::NoVnf(vnf.to_owned()))
}

fn vdus(cmds: &[GenericCommand]) -> impl Iterator<Item = &VduSpec> {
    cmds.iter().filter_map(|c| match c {
        GenericCommand::CreateVdu(s) => Some(s),
        _ => None,
    })
}

/// Scale-out by one VDU: updates `plan` and returns the site and the commands to run there.
pub fn plan_scale_out(
    plan: &mut NsPlan,
    vnf: &str,
) -> Result<(String, Vec<GenericCommand>), ScaleError> {
    let (s, v) = locate(plan, vnf)?;
    let base = vdus(&plan.sites[s].vnfs[v].commands)
        .next()
        .cloned()
        .ok_or_else(|| ScaleError::NoVdu(vnf.to_owned()))?;
    let names: BTreeSet<String> = plan
        .sites
        .iter()
        .flat_map(|sp| {
            sp.vnfs
                .iter()
                .flat_map(|v| vdus(&v.commands).map(|d| d.name.clone()))
        })
        .collect();
    let name = (1u32..)
        .map(|n| format!("{}-s{n}", base.name))
        .find(|c| !names.contains(c))
        .unwrap_or_else(|| format!("{}-s", base.name));
    let suffix = name.trim_start_matches(&base.name).to_owned();
    let mut used: BTreeSet<Ipv4Addr> = plan
        .sites
        .iter()
        .flat_map(|sp| {
            sp.vnfs
                .iter()
                .flat_map(|v| vdus(&v.commands).flat_map(|d| d.cps.iter().map(|c| c.ip)))
        })
        .collect();
    let mut cps = Vec::new();
    for cp in &base.cps {
        let cidr = plan.sites[s]
            .networks
            .iter()
            .find_map(|c| match c {
                GenericCommand::CreateNetwork { name, cidr } if *name == cp.network => Some(*cidr),
                _ => None,
            })
            .ok_or_else(|| ScaleError::NoAddress(cp.network.clone()))?;
        let ip = (1u32..)
            .map_while(|n| cidr.host(n))
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| ScaleError::NoAddress(cp.network.clone()))?;
        used.insert(ip);
        cps.push(CpSpec {
            name: format!("{}{suffix}", cp.name),
            network: cp.network.clone(),
            ip,
            prefix: cp.prefix,
        });
    }
    let spec = VduSpec {
        name: name.clone(),
        cps,
        ..base
    };
    let mut cmds = vec![GenericCommand::CreateVdu(spec.clone())];
    cmds.extend(spec.cps.iter().map(|c| GenericCommand::AttachCp {
        vdu: name.clone(),
        cp: c.name.clone(),
    }));
    plan.sites[s].vnfs[v].commands.extend(cmds.iter().cloned());
    Ok((plan.sites[s].site.clone(), cmds))
}

/// Scale-in by one VDU (the most recent scale-out): updates `plan` and returns the site,
/// the removed VDU and the commands to run there.
pub fn plan_scale_in(
    plan: &mut NsPlan,
    vnf: &str,
) -> Result<(String, VduSpec, Vec<GenericCommand>), ScaleError> {
    let (s, v) = locate(plan, vnf)?;
    let vp = &mut plan.sites[s].vnfs[v];
    let base = vdus(&vp.commands)
        .next()
        .map(|d| d.name.clone())
        .ok_or_else(|| ScaleError::NoVdu(vnf.to_owned()))?;
    let prefix = format!("{base}-s");
    let last = vdus(&vp.commands)
        .filter(|d| d.name.starts_with(&prefix))
        .last()
        .cloned()
        .ok_or_else(|| ScaleError::NothingToRemove(vnf.to_owned()))?;
    vp.commands.retain(|c| match c {
        GenericCommand::CreateVdu(d) => d.name != last.name,
        GenericCommand::AttachCp { vdu, .. } => *vdu != last.name,
        _ => true,
    });
    let site = plan.sites[s].site.clone();
    let name = last.name.clone();
    Ok((site, last, vec![GenericCommand::DeleteVdu { name }]))
}
