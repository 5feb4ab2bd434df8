//! Network-service instances: their records, and the jobs that instantiate, scale and
//! terminate them across sites.
//!
//! The caller checks everything it can first (the NSD, the plan, the site drivers) and
//! hands over the plan and the drivers; a job owned by the control layer's [`Tasks`]
//! (never a detached task) runs the executor and writes per-VNF and per-link progress
//! into the record as it happens. The plan is stored with the record, so a terminate
//! works after a restart. Each record names the server running its work (`runner`):
//! only that server, restarted, declares the work interrupted.
//!
//! [`Tasks`]: crate::Tasks

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use model::api::{NsInstanceRecord, NsState, ScaleDirection};
use model::TenantId;
use nfv::driver::SiteDriver;
use nfv::ns::{NsExecutor, Progress};
use store::{Revision, StoreError};

use crate::records::{insert_named, keys, list_json, remove_named, resolve_named, to_bytes};
use crate::{Control, ControlError, Scope};

/// The drivers of an instance's sites, by site name.
pub type Drivers = BTreeMap<String, Arc<dyn SiteDriver>>;

/// The reason an interrupted instantiate carries while it is rolled back.
const INTERRUPTED: &str =
    "interrupted by a server restart while instantiating; rolling back what was made";

fn ns_key(id: uuid::Uuid) -> String {
    format!("{}{id}", keys::NS_INSTANCES)
}

/// What a record's job is doing, if it has one.
pub fn busy(state: NsState) -> Option<&'static str> {
    match state {
        NsState::Instantiating => Some("instantiating"),
        NsState::Terminating => Some("terminating"),
        NsState::Scaling => Some("scaling"),
        NsState::Instantiated | NsState::Failed => None,
    }
}

/// Why an NS request is refused.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    /// A job runs on it.
    #[error("ns instance {name} is {doing}; wait for it to finish")]
    Busy {
        /// The instance.
        name: model::Name,
        /// What its job does.
        doing: &'static str,
    },
    /// `forget` of an instance that did not fail.
    #[error("forget: ns instance {0} is not failed; terminate it (DELETE without forget)")]
    NotFailed(model::Name),
    /// Scale of an instance that is not instantiated.
    #[error("ns instance {name} is {state}; only an instantiated NS scales")]
    NotInstantiated {
        /// The instance.
        name: model::Name,
        /// Its state.
        state: &'static str,
    },
    /// Scale of a VNF the instance does not have.
    #[error("vnf: ns instance {name} has no VNF {vnf}")]
    NoSuchVnf {
        /// The instance.
        name: model::Name,
        /// The VNF asked for.
        vnf: String,
    },
    /// The store, a lost race, a taken name, or no such instance.
    #[error(transparent)]
    Control(#[from] ControlError),
}

fn record_id(rec: &NsInstanceRecord) -> Result<uuid::Uuid, ControlError> {
    rec.id
        .parse()
        .map_err(|e| ControlError::Invariant(format!("stored ns instance id {}: {e}", rec.id)))
}

fn stored_plan(rec: &NsInstanceRecord) -> Result<nfv::plan::NsPlan, ControlError> {
    serde_json::from_value(rec.plan.clone()).map_err(|source| ControlError::Decode {
        key: format!("the plan of ns instance {}", rec.name),
        source,
    })
}

impl Control {
    /// An NS instance by id or name, as `scope` sees it.
    pub async fn ns_instance(
        &self,
        scope: Scope,
        s: &str,
    ) -> Result<(NsInstanceRecord, Revision), ControlError> {
        resolve_named::<uuid::Uuid, NsInstanceRecord>(
            self.store(),
            scope,
            s,
            "ns instance",
            keys::NS_NAMES,
            ns_key,
            |r| r.tenant,
        )
        .await
    }

    /// The NS instances `scope` sees.
    pub async fn ns_instances(&self, scope: Scope) -> Result<Vec<NsInstanceRecord>, ControlError> {
        Ok(
            list_json::<NsInstanceRecord>(self.store(), keys::NS_INSTANCES)
                .await?
                .into_iter()
                .map(|(r, _)| r)
                .filter(|r| scope.sees(r.tenant))
                .collect(),
        )
    }

    /// Records a new instance (`rec`, state `instantiating`, name free in its tenant)
    /// and starts its instantiate job with `drivers`.
    pub async fn instantiate_ns(
        &self,
        rec: NsInstanceRecord,
        plan: nfv::plan::NsPlan,
        drivers: Drivers,
        endpoints: BTreeMap<String, std::net::SocketAddr>,
    ) -> Result<NsInstanceRecord, ControlError> {
        let id = record_id(&rec)?;
        insert_named(
            self.store(),
            ns_key(id),
            keys::ns_name(rec.tenant, &rec.name),
            &rec,
            &id,
            || format!("name: ns instance {} already exists", rec.name),
        )
        .await?;
        tracing::info!(ns = %rec.name, %id, "instantiating network service");
        let executor = NsExecutor::new(drivers, Duration::from_millis(rec.link_deadline_ms));
        let job = run_instantiate(self.clone(), rec.clone(), plan, executor, endpoints);
        self.jobs()
            .spawn(format!("instantiate ns {}", rec.name), job);
        Ok(rec)
    }

    /// Forgets a failed instance's record without touching its sites.
    pub async fn forget_ns(&self, scope: Scope, s: &str) -> Result<(), NsError> {
        let (rec, rev) = self.ns_instance(scope, s).await?;
        if let Some(doing) = busy(rec.state) {
            return Err(NsError::Busy {
                name: rec.name,
                doing,
            });
        }
        if rec.state != NsState::Failed {
            return Err(NsError::NotFailed(rec.name));
        }
        match self.remove_ns(&rec, Some(rev)).await {
            Ok(_) => {
                tracing::warn!(ns = %rec.name, "ns instance forgotten without terminate");
                Ok(())
            }
            Err(StoreError::Conflict { .. }) => Err(ControlError::Contended {
                what: format!("ns instance {}", rec.name),
            }
            .into()),
            Err(e) => Err(ControlError::from(e).into()),
        }
    }

    /// Marks an instance `terminating` (by `runner`) and starts the job that removes
    /// what every site made, then the record.
    pub async fn terminate_ns(
        &self,
        scope: Scope,
        s: &str,
        runner: &str,
        drivers: Drivers,
    ) -> Result<NsInstanceRecord, NsError> {
        let (mut rec, rev) = self.ns_instance(scope, s).await?;
        if let Some(doing) = busy(rec.state) {
            return Err(NsError::Busy {
                name: rec.name,
                doing,
            });
        }
        let plan = stored_plan(&rec)?;
        rec.state = NsState::Terminating;
        rec.error = None;
        rec.runner = Some(runner.to_owned());
        self.write_ns(&rec, rev).await?;
        let executor = NsExecutor::new(drivers, Duration::from_millis(rec.link_deadline_ms));
        let (c, r) = (self.clone(), rec.clone());
        self.jobs()
            .spawn(format!("terminate ns {}", rec.name), async move {
                match executor.terminate(&plan).await {
                    Ok(()) => match c.remove_ns(&r, None).await {
                        Ok(_) => tracing::info!(ns = %r.name, "network service terminated"),
                        Err(e) => {
                            tracing::error!(ns = %r.name, error = %e, "cannot remove the record")
                        }
                    },
                    Err(e) => {
                        let mut r = r;
                        r.state = NsState::Failed;
                        r.error = Some(format!("terminate: {}", model::error_chain(&e)));
                        c.save_ns(&r).await;
                    }
                }
            });
        Ok(rec)
    }

    /// Marks an instantiated instance `scaling` (by `runner`) and starts the job that
    /// adds or removes one VDU of `vnf`.
    pub async fn scale_ns(
        &self,
        scope: Scope,
        s: &str,
        vnf: String,
        direction: ScaleDirection,
        runner: &str,
        drivers: Drivers,
    ) -> Result<NsInstanceRecord, NsError> {
        let (mut rec, rev) = self.ns_instance(scope, s).await?;
        if rec.state != NsState::Instantiated {
            return Err(NsError::NotInstantiated {
                name: rec.name,
                state: busy(rec.state).unwrap_or("failed"),
            });
        }
        if !rec.vnfs.iter().any(|v| v.vnf == vnf) {
            return Err(NsError::NoSuchVnf {
                name: rec.name,
                vnf,
            });
        }
        let inst = nfv::ns::NsInstance {
            plan: stored_plan(&rec)?,
            cps: serde_json::from_value(rec.cps.clone()).unwrap_or_default(),
            links: Vec::new(),
            elapsed_ms: rec.elapsed_ms.unwrap_or(0),
        };
        rec.state = NsState::Scaling;
        rec.error = None;
        rec.runner = Some(runner.to_owned());
        self.write_ns(&rec, rev).await?;
        let executor = NsExecutor::new(drivers, Duration::from_millis(rec.link_deadline_ms));
        let (c, mut r) = (self.clone(), rec.clone());
        self.jobs()
            .spawn(format!("scale ns {}", rec.name), async move {
                let mut inst = inst;
                let out = direction == ScaleDirection::Out;
                let word = if out { "out" } else { "in" };
                match executor.scale(&mut inst, &vnf, out).await {
                    Ok(vdu) => {
                        tracing::info!(ns = %r.name, vnf, vdu, "scaled {word}");
                        if let Ok(p) = serde_json::to_value(&inst.plan) {
                            r.plan = p;
                        }
                        r.cps = serde_json::to_value(&inst.cps).unwrap_or_default();
                        r.vnf_instances = r
                            .vnfs
                            .iter()
                            .filter_map(|v| inst.vnf_instance_sol003(&v.vnf))
                            .collect();
                    }
                    Err(e) => {
                        r.error = Some(format!(
                            "scale {word} of {vnf} failed (nothing changed): {}",
                            model::error_chain(&e)
                        ));
                    }
                }
                r.state = NsState::Instantiated;
                c.save_ns(&r).await;
            });
        Ok(rec)
    }

    /// The work `runner` (this server) left mid-way, taken up again after a restart:
    /// an interrupted instantiate becomes a rollback (`terminating`, then `failed` with
    /// the reason, nothing left on the sites), an interrupted terminate is finished; both
    /// are returned for [`Control::resume_ns`] with their drivers. An interrupted scale
    /// is marked failed (a VDU being added is not in the stored plan yet, the message
    /// says so). Another server's work is that server's to take up.
    pub async fn recover_ns(&self, runner: &str) -> Vec<NsInstanceRecord> {
        let recs = match list_json::<NsInstanceRecord>(self.store(), keys::NS_INSTANCES).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot list ns instances");
                return Vec::new();
            }
        };
        let mut resume = Vec::new();
        for (mut r, _) in recs {
            if r.runner.as_deref().is_some_and(|x| x != runner) {
                continue;
            }
            match r.state {
                NsState::Instantiating => {
                    r.state = NsState::Terminating;
                    r.error = Some(INTERRUPTED.to_owned());
                    r.runner = Some(runner.to_owned());
                    self.save_ns(&r).await;
                    resume.push(r);
                }
                NsState::Terminating => {
                    r.runner = Some(runner.to_owned());
                    self.save_ns(&r).await;
                    resume.push(r);
                }
                NsState::Scaling => {
                    r.error = Some(
                        "interrupted by a server restart while scaling; DELETE it to remove \
                         what was made (a VDU being added may remain on its site)"
                            .to_owned(),
                    );
                    r.state = NsState::Failed;
                    self.save_ns(&r).await;
                }
                NsState::Instantiated | NsState::Failed => {}
            }
        }
        resume
    }

    /// Runs the rollback (or the interrupted terminate) of a record [`recover_ns`]
    /// returned, with `drivers` for its sites.
    ///
    /// [`recover_ns`]: Control::recover_ns
    pub fn resume_ns(&self, rec: NsInstanceRecord, drivers: Drivers) {
        let plan = match stored_plan(&rec) {
            Ok(p) => p,
            Err(e) => {
                let c = self.clone();
                self.jobs()
                    .spawn(format!("fail ns {}", rec.name), async move {
                        c.fail_ns(rec, e.to_string()).await;
                    });
                return;
            }
        };
        let rollback = rec.error.as_deref() == Some(INTERRUPTED);
        let executor = NsExecutor::new(drivers, Duration::from_millis(rec.link_deadline_ms));
        let c = self.clone();
        let what = if rollback { "roll back" } else { "terminate" };
        self.jobs()
            .spawn(format!("{what} ns {}", rec.name), async move {
                let mut r = rec;
                match executor.terminate(&plan).await {
                    Ok(()) if rollback => {
                        r.state = NsState::Failed;
                        r.error = Some(
                            "interrupted by a server restart while instantiating; rolled back: \
                         every site removed what it had made"
                                .to_owned(),
                        );
                        for v in &mut r.vnfs {
                            v.state = "rolled_back".into();
                        }
                        tracing::warn!(ns = %r.name, "interrupted network service rolled back");
                        c.save_ns(&r).await;
                    }
                    Ok(()) => match c.remove_ns(&r, None).await {
                        Ok(_) => tracing::info!(ns = %r.name, "network service terminated"),
                        Err(e) => {
                            tracing::error!(ns = %r.name, error = %e, "cannot remove the record")
                        }
                    },
                    Err(e) => {
                        c.fail_ns(
                            r,
                            format!("{what} after a server restart: {}", model::error_chain(&e)),
                        )
                        .await;
                    }
                }
            });
    }

    /// Marks an instance failed with `why` (DELETE cleans up).
    pub async fn fail_ns(&self, mut rec: NsInstanceRecord, why: String) {
        rec.state = NsState::Failed;
        rec.error = Some(why);
        self.save_ns(&rec).await;
    }

    async fn write_ns(&self, rec: &NsInstanceRecord, rev: Revision) -> Result<(), ControlError> {
        let id = record_id(rec)?;
        match self
            .store()
            .cas(&ns_key(id), Some(rev), to_bytes(rec)?)
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::Conflict { .. }) => Err(ControlError::Contended {
                what: format!("ns instance {}", rec.name),
            }),
            Err(e) => Err(e.into()),
        }
    }

    async fn remove_ns(
        &self,
        rec: &NsInstanceRecord,
        rev: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        let id = record_id(rec).map_err(|e| StoreError::backend("ns instance id", e))?;
        remove_named(
            self.store(),
            ns_key(id),
            keys::ns_name(rec.tenant, &rec.name),
            rev,
        )
        .await
    }

    /// Writes a job's progress (best effort: a lost write is logged; the next one or the
    /// end result carries the state).
    async fn save_ns(&self, rec: &NsInstanceRecord) {
        let res = match (record_id(rec), to_bytes(rec)) {
            (Ok(id), Ok(b)) => self.store().put(&ns_key(id), b).await.map(drop),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot encode an ns instance");
                return;
            }
        };
        if let Err(e) = res {
            tracing::error!(ns = %rec.name, error = %e, "cannot save ns instance progress");
        }
    }

    /// The tenant's stored NSD `id` and every VNFD text of the tenant.
    pub async fn nsd_texts(
        &self,
        tenant: TenantId,
        id: &str,
    ) -> Result<Option<(String, Vec<String>)>, ControlError> {
        let scope = Scope::Tenant(tenant);
        let vnfds = self
            .descriptors(scope, "vnfd")
            .await?
            .into_iter()
            .map(|d| d.descriptor)
            .collect();
        Ok(self
            .descriptors(scope, "nsd")
            .await?
            .into_iter()
            .find(|d| d.id == id)
            .map(|d| (d.descriptor, vnfds)))
    }
}

async fn run_instantiate(
    c: Control,
    rec: NsInstanceRecord,
    plan: nfv::plan::NsPlan,
    executor: NsExecutor,
    endpoints: BTreeMap<String, std::net::SocketAddr>,
) {
    let rec = Arc::new(tokio::sync::Mutex::new(rec));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
    let writer = {
        let (c, rec) = (c.clone(), rec.clone());
        async move {
            while let Some(p) = rx.recv().await {
                let mut r = rec.lock().await;
                match p {
                    Progress::VnfReady { vnf, ms, .. } => {
                        if let Some(v) = r.vnfs.iter_mut().find(|v| v.vnf == vnf) {
                            v.state = "ready".into();
                            v.ready_ms = Some(ms);
                        }
                    }
                    Progress::Link(l) => {
                        if let Ok(v) = serde_json::to_value(&l) {
                            r.links.retain(|x| x["link"] != v["link"]);
                            r.links.push(v);
                        }
                    }
                    Progress::NetworksReady { .. } | Progress::RollingBack => continue,
                }
                c.save_ns(&r).await;
            }
        }
    };
    let progress = move |p: Progress| {
        let _ = tx.send(p);
    };
    let work = async {
        let result = executor.instantiate(&plan, &endpoints, &progress).await;
        drop(progress);
        result
    };
    // The writer ends when the executor drops its progress sender.
    let (result, ()) = tokio::join!(work, writer);
    let mut r = rec.lock().await;
    match result {
        Ok(inst) => {
            r.state = NsState::Instantiated;
            r.elapsed_ms = Some(inst.elapsed_ms);
            r.cps = serde_json::to_value(&inst.cps).unwrap_or_default();
            r.links = inst
                .links
                .iter()
                .filter_map(|l| serde_json::to_value(l).ok())
                .collect();
            r.vnf_instances = r
                .vnfs
                .iter()
                .filter_map(|v| inst.vnf_instance_sol003(&v.vnf))
                .collect();
            tracing::info!(ns = %r.name, ms = inst.elapsed_ms, "network service instantiated");
        }
        Err(e) => {
            r.state = NsState::Failed;
            r.error = Some(model::error_chain(&e));
            for v in &mut r.vnfs {
                v.state = "rolled_back".into();
            }
            tracing::warn!(ns = %r.name, error = %model::error_chain(&e), "network service failed");
        }
    }
    c.save_ns(&r).await;
}
