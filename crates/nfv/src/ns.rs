//! NS lifecycle executor: runs an [`NsPlan`] on its sites, in parallel, all or nothing.
//!
//! Sites work at the same time, and so do the VNFs on one site (OSM creates VNFs one after
//! another; an NS of N VNFs then takes N times as long). Per site, networks come first; per
//! VNF, its commands run in order. If anything fails, every site is torn down (deletes are
//! idempotent, so a teardown of what was never created is harmless) and the error says
//! which site and VNF failed first. Links between VNF connection points are established
//! after every VNF runs and the guests at their ends are ready
//! ([`SiteDriver::wait_guest`]), each with a deadline ([`crate::link`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use crate::driver::{apply, CpInfo, DriverError, SiteDriver};
use crate::link::{establish_with_auth, LinkRecord, LinkState, LinkTable};
use crate::plan::{GenericCommand, NsPlan, SitePlan};

/// A progress report, per VNF and per link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    /// A site's networks exist.
    NetworksReady {
        /// Site.
        site: String,
    },
    /// A VNF's VDUs run and its CPs are attached.
    VnfReady {
        /// Site.
        site: String,
        /// VNF.
        vnf: String,
        /// Milliseconds since instantiation started.
        ms: u64,
    },
    /// A link ended up or failed.
    Link(LinkRecord),
    /// Rolling back after a failure.
    RollingBack,
}

/// A running NS instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NsInstance {
    /// Its plan (what terminate undoes).
    pub plan: NsPlan,
    /// Run-time CP information by CP id (SOL003 `extCpInfo[].cpProtocolInfo`).
    pub cps: BTreeMap<String, CpInfo>,
    /// Its links.
    pub links: Vec<LinkRecord>,
    /// Wall-clock time of the instantiation.
    pub elapsed_ms: u64,
}

impl NsInstance {
    /// One VNF's run-time record in the shape of ETSI SOL003's `VnfInstance`
    /// (`instantiatedVnfInfo.extCpInfo[].cpProtocolInfo[].ipOverEthernet.ipAddresses`), with
    /// the addresses the sites reported. `None` for a VNF not in this NS.
    pub fn vnf_instance_sol003(&self, vnf: &str) -> Option<serde_json::Value> {
        let (site, vp) = self
            .plan
            .sites
            .iter()
            .find_map(|s| s.vnfs.iter().find(|v| v.vnf == vnf).map(|v| (&s.site, v)))?;
        let ext: Vec<serde_json::Value> = vp
            .ext_cps
            .iter()
            .map(|(cpd, res)| {
                let info = self.cps.get(res);
                let ips: Vec<String> = info
                    .map(|i| i.ips.iter().map(ToString::to_string).collect())
                    .unwrap_or_default();
                serde_json::json!({"id": res, "cpdId": cpd, "cpProtocolInfo": [{
                    "layerProtocol": "IP_OVER_ETHERNET",
                    "ipOverEthernet": {"macAddress": info.and_then(|i| i.mac.clone()),
                        "ipAddresses": [{"type": "IPV4", "addresses": ips, "isDynamic": false}]}}]})
            })
            .collect();
        let vnfcs: Vec<serde_json::Value> = vp
            .commands
            .iter()
            .filter_map(|c| match c {
                GenericCommand::CreateVdu(v) => Some(serde_json::json!({"id": v.name,
                    "computeResource": {"vimConnectionId": site, "resourceId": v.name}})),
                _ => None,
            })
            .collect();
        Some(serde_json::json!({
            "id": format!("{}-{vnf}", self.plan.ns), "vnfInstanceName": vnf, "vnfdId": vp.vnfd,
            "instantiationState": "INSTANTIATED",
            "instantiatedVnfInfo": {"vnfState": "STARTED", "extCpInfo": ext, "vnfcResourceInfo": vnfcs}
        }))
    }
}

/// Why an instantiation failed (everything was rolled back before this is returned).
#[derive(Debug, thiserror::Error)]
pub enum InstantiateError {
    /// The plan names a site the executor has no driver for.
    #[error("no driver for site '{0}'")]
    UnknownSite(String),
    /// A site command failed.
    #[error("site '{site}'{} failed; rolled back every site{}", vnf.as_ref().map(|v| format!(", VNF '{v}',")).unwrap_or_default(), rollback_note(.rollback))]
    Site {
        /// Site.
        site: String,
        /// VNF, if the failure was in one.
        vnf: Option<String>,
        /// Cause (boxed: keeps the Ok path of every Result small).
        #[source]
        err: Box<DriverError>,
        /// Teardown errors during rollback.
        rollback: Vec<String>,
    },
    /// A link could not be established.
    #[error("link '{link}' failed: {reason}; rolled back every site{}", rollback_note(.rollback))]
    Link {
        /// Link.
        link: String,
        /// Why.
        reason: String,
        /// All link records.
        records: Vec<LinkRecord>,
        /// Teardown errors during rollback.
        rollback: Vec<String>,
    },
}

fn rollback_note(errors: &[String]) -> String {
    if errors.is_empty() {
        String::new()
    } else {
        format!(" (rollback errors: {})", errors.join("; "))
    }
}

/// Errors of a terminate; it tried everything on every site regardless.
#[derive(Debug, thiserror::Error)]
#[error("terminate left errors: {}", .0.join("; "))]
pub struct TerminateError(pub Vec<String>);

/// Runs NS plans on a set of sites.
#[derive(Debug, Clone)]
pub struct NsExecutor {
    sites: BTreeMap<String, Arc<dyn SiteDriver>>,
    link_deadline: Duration,
}

fn ms(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl NsExecutor {
    /// An executor over named sites; links fail after `link_deadline`.
    pub fn new(sites: BTreeMap<String, Arc<dyn SiteDriver>>, link_deadline: Duration) -> Self {
        NsExecutor {
            sites,
            link_deadline,
        }
    }

    /// The names of the sites it drives (for the planner's `available`).
    pub fn site_names(&self) -> Vec<String> {
        self.sites.keys().cloned().collect()
    }

    fn driver(&self, site: &str) -> Result<&Arc<dyn SiteDriver>, InstantiateError> {
        self.sites
            .get(site)
            .ok_or_else(|| InstantiateError::UnknownSite(site.to_owned()))
    }

    /// Instantiates the plan; `endpoints` maps VNF id → its link agent's address.
    #[tracing::instrument(skip_all, fields(ns = %plan.ns))]
    pub async fn instantiate(
        &self,
        plan: &NsPlan,
        endpoints: &BTreeMap<String, SocketAddr>,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<NsInstance, InstantiateError> {
        let start = Instant::now();
        for sp in &plan.sites {
            self.driver(&sp.site)?;
        }
        let results = join_all(
            plan.sites
                .iter()
                .map(|sp| self.run_site(sp, start, progress)),
        )
        .await;
        let mut cps = BTreeMap::new();
        let mut first_err = None;
        for r in results {
            match r {
                Ok(c) => cps.extend(c),
                Err(e) if first_err.is_none() => first_err = Some(e),
                Err(_) => {}
            }
        }
        if let Some((site, vnf, err)) = first_err {
            tracing::error!(site, vnf, error = %err, "instantiation failed; rolling back");
            progress(Progress::RollingBack);
            let rollback = self.teardown(plan).await;
            return Err(InstantiateError::Site {
                site,
                vnf,
                err: Box::new(err),
                rollback,
            });
        }
        let links = self.links(plan, &cps, endpoints, progress).await;
        if let Some(bad) = links
            .iter()
            .find(|l| matches!(l.state, LinkState::Failed { .. }))
        {
            let reason = match &bad.state {
                LinkState::Failed { reason } => reason.clone(),
                _ => String::new(),
            };
            progress(Progress::RollingBack);
            let rollback = self.teardown(plan).await;
            return Err(InstantiateError::Link {
                link: bad.link.clone(),
                reason,
                records: links,
                rollback,
            });
        }
        Ok(NsInstance {
            plan: plan.clone(),
            cps,
            links,
            elapsed_ms: ms(start),
        })
    }

    async fn run_site(
        &self,
        sp: &SitePlan,
        start: Instant,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<BTreeMap<String, CpInfo>, (String, Option<String>, DriverError)> {
        let d = self.sites.get(&sp.site).map(Arc::as_ref).ok_or_else(|| {
            (
                sp.site.clone(),
                None,
                DriverError::NotASiteCommand("(no driver)"),
            )
        })?;
        for cmd in &sp.networks {
            apply(d, cmd)
                .await
                .map_err(|e| (sp.site.clone(), None, e))?;
        }
        progress(Progress::NetworksReady {
            site: sp.site.clone(),
        });
        let vnfs = sp.vnfs.iter().map(|v| async move {
            let mut cps = BTreeMap::new();
            for cmd in &v.commands {
                if let Some(info) = apply(d, cmd)
                    .await
                    .map_err(|e| (sp.site.clone(), Some(v.vnf.clone()), e))?
                {
                    cps.insert(info.cp.clone(), info);
                }
            }
            progress(Progress::VnfReady {
                site: sp.site.clone(),
                vnf: v.vnf.clone(),
                ms: ms(start),
            });
            Ok(cps)
        });
        let mut all = BTreeMap::new();
        let mut first_err = None;
        // Wait for every VNF even after a failure: a VDU still being created must finish
        // (or fail) before the rollback deletes it, or the rollback could miss it.
        for r in join_all(vnfs).await {
            match r {
                Ok(c) => all.extend(c),
                Err(e) if first_err.is_none() => first_err = Some(e),
                Err(_) => {}
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(all),
        }
    }

    async fn links(
        &self,
        plan: &NsPlan,
        cps: &BTreeMap<String, CpInfo>,
        endpoints: &BTreeMap<String, SocketAddr>,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Vec<LinkRecord> {
        let table = LinkTable::from_plan(plan);
        // Endpoints not given are asked of the second VNF's site (a vinfra site relays
        // the request into the guest through the host's agent).
        let mut endpoints = endpoints.clone();
        let mut auth = BTreeMap::new();
        for cmd in plan.links() {
            if let GenericCommand::ConnectLink { second, .. } = cmd {
                if endpoints.contains_key(&second.vnf) {
                    continue;
                }
                let found = match self.sites.get(&second.site) {
                    Some(d) => d.link_endpoint(&second.vdu).await,
                    None => Ok(None),
                };
                match found {
                    Ok(Some(ep)) => {
                        endpoints.insert(second.vnf.clone(), ep);
                        if let Some(a) = self.sites.get(&second.site).and_then(|d| d.link_auth()) {
                            auth.insert(second.vnf.clone(), a);
                        }
                    }
                    Ok(None) => {}
                    // The link then fails with "no link endpoint", naming the VNF.
                    Err(e) => tracing::warn!(vnf = second.vnf, error = %e, "no site link endpoint"),
                }
            }
        }
        // A link's deadline is for the link, not for the boot of the guests at its ends
        // (their VMs run, but a guest under TCG may boot for tens of seconds more): wait
        // for each of them first. A guest that never gets there is left to the link,
        // which then fails by its deadline with its own reason.
        let mut guests = BTreeSet::new();
        for cmd in plan.links() {
            if let GenericCommand::ConnectLink { first, second, .. } = cmd {
                guests.insert((&first.site, &first.vdu));
                guests.insert((&second.site, &second.vdu));
            }
        }
        join_all(guests.into_iter().map(|(site, vdu)| async move {
            let Some(d) = self.sites.get(site) else {
                return;
            };
            if let Err(e) = d.wait_guest(vdu).await {
                tracing::warn!(site, vdu, error = %e, "guest not ready; linking anyway");
            }
        }))
        .await;
        let endpoints = &endpoints;
        // Step 1 per first CP: its id and the IP the *site* reports (not the planned one).
        let mut firsts = BTreeMap::new();
        for cmd in plan.links() {
            if let GenericCommand::ConnectLink { first, .. } = cmd {
                let ip = cps
                    .get(&first.resource)
                    .and_then(|i| i.ips.first().copied());
                firsts.insert(first.resource.clone(), (first.vnf.clone(), ip));
            }
        }
        let futs = firsts.iter().map(|(cp, (vnf, ip))| {
            establish_with_auth(&table, vnf, cp, *ip, endpoints, &auth, self.link_deadline)
        });
        let records: Vec<LinkRecord> = join_all(futs).await.into_iter().flatten().collect();
        for r in &records {
            progress(Progress::Link(r.clone()));
        }
        records
    }

    /// Scales `vnf` of a running NS by one VDU, out (`out`) or in, on its site. A failed
    /// scale-out deletes what it created and leaves the instance as it was. Returns the
    /// VDU's site resource name.
    pub async fn scale(
        &self,
        inst: &mut NsInstance,
        vnf: &str,
        out: bool,
    ) -> Result<String, ScaleExecError> {
        let mut plan = inst.plan.clone();
        if out {
            let (site, cmds) = crate::scale::plan_scale_out(&mut plan, vnf)?;
            let d = self.site_driver(&site)?;
            let name = match cmds.first() {
                Some(GenericCommand::CreateVdu(spec)) => spec.name.clone(),
                _ => String::new(),
            };
            let mut new_cps = Vec::new();
            for c in &cmds {
                match apply(d, c).await {
                    Ok(Some(info)) => new_cps.push(info),
                    Ok(None) => {}
                    Err(e) => {
                        let _ = apply(d, &GenericCommand::DeleteVdu { name: name.clone() }).await;
                        return Err(ScaleExecError::Driver { site, err: e });
                    }
                }
            }
            for info in new_cps {
                inst.cps.insert(info.cp.clone(), info);
            }
            inst.plan = plan;
            Ok(name)
        } else {
            let (site, vdu, cmds) = crate::scale::plan_scale_in(&mut plan, vnf)?;
            let d = self.site_driver(&site)?;
            for c in &cmds {
                apply(d, c).await.map_err(|err| ScaleExecError::Driver {
                    site: site.clone(),
                    err,
                })?;
            }
            for cp in &vdu.cps {
                inst.cps.remove(&cp.name);
            }
            inst.plan = plan;
            Ok(vdu.name)
        }
    }

    fn site_driver(&self, site: &str) -> Result<&dyn SiteDriver, ScaleExecError> {
        self.sites
            .get(site)
            .map(Arc::as_ref)
            .ok_or_else(|| ScaleExecError::NoSite(site.to_owned()))
    }

    /// Removes everything the plan creates, on every site, in parallel; absent is fine.
    pub async fn terminate(&self, plan: &NsPlan) -> Result<(), TerminateError> {
        let errors = self.teardown(plan).await;
        if errors.is_empty() {
            Ok(())
        } else {
            Err(TerminateError(errors))
        }
    }

    async fn teardown(&self, plan: &NsPlan) -> Vec<String> {
        let per_site = plan.sites.iter().map(|sp| async move {
            let Some(d) = self.sites.get(&sp.site).map(Arc::as_ref) else {
                return vec![format!("no driver for site '{}'", sp.site)];
            };
            let (vdus, nets): (Vec<_>, Vec<_>) = sp
                .teardown()
                .into_iter()
                .partition(|c| matches!(c, GenericCommand::DeleteVdu { .. }));
            let mut errors: Vec<String> = join_all(vdus.iter().map(|c| apply(d, c)))
                .await
                .into_iter()
                .filter_map(|r| {
                    r.err()
                        .map(|e| format!("{}: {}", sp.site, model::error_chain(&e)))
                })
                .collect();
            for c in &nets {
                if let Err(e) = apply(d, c).await {
                    errors.push(format!("{}: {}", sp.site, model::error_chain(&e)));
                }
            }
            errors
        });
        join_all(per_site).await.into_iter().flatten().collect()
    }
}

/// Why a scale operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ScaleExecError {
    /// The plan cannot be scaled.
    #[error(transparent)]
    Plan(#[from] crate::scale::ScaleError),
    /// No driver for the VNF's site.
    #[error("no driver for site '{0}'")]
    NoSite(String),
    /// The site refused.
    #[error("site {site} failed")]
    Driver {
        /// Site.
        site: String,
        /// Cause.
        #[source]
        err: DriverError,
    },
}
