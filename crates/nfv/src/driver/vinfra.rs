//! vinfra site: a vinfra control plane, through the `client` crate; VDUs are vinfra VMs.
//!
//! VM creation is asynchronous in vinfra too (the server records the VM, an agent boots it
//! and reports `observed`), so `create_vdu` polls until `running` or `failed`, and
//! `delete_vdu` until the record is gone.
//!
//! Gap, stated plainly: vinfra's REST API has no network or port objects yet (the vSwitch of
//! the `net` crate is per host, not an API resource). Until it has, this driver keeps the
//! site's networks and CP addresses in its own memory: they are correct for the life of the
//! driver, are not seen by the agents, and a new driver process does not know them (deletes
//! of unknown networks succeed, as for every driver).

use std::collections::BTreeMap;
use std::time::Duration;

use client::{Client, ClientError, VmDeletion};
use model::api::CreateVm;
use model::ObservedState;
use tokio::sync::Mutex;

use super::{CpInfo, DriverError, SiteDriver, SiteInventory};
use crate::descriptor::Ipv4Cidr;
use crate::plan::{CpSpec, VduSpec};

const SITE: &str = "vinfra";

/// How to reach a vinfra control plane.
#[derive(Debug, Clone)]
pub struct VinfraConfig {
    /// Server URL (`http://127.0.0.1:7070`).
    pub base_url: String,
    /// Bearer token (a member's or the admin's).
    pub token: String,
    /// Host to place VDUs on; `None` lets the scheduler choose.
    pub host: Option<String>,
    /// Poll interval for VM state.
    pub poll: Duration,
    /// How long to wait for running / gone.
    pub timeout: Duration,
}

#[derive(Debug, Default)]
struct Local {
    networks: BTreeMap<String, Ipv4Cidr>,
    cps: BTreeMap<String, Vec<CpSpec>>,
}

/// A site run by vinfra.
#[derive(Debug)]
pub struct VinfraDriver {
    cfg: VinfraConfig,
    client: Client,
    local: Mutex<Local>,
}

fn api(op: &str, err: ClientError) -> DriverError {
    DriverError::Vinfra {
        op: op.to_owned(),
        err: Box::new(err),
    }
}

impl VinfraDriver {
    /// A driver for one control plane.
    pub fn new(cfg: VinfraConfig) -> Result<Self, DriverError> {
        let client = Client::new(&cfg.base_url, &cfg.token).map_err(|e| api("connect", e))?;
        Ok(VinfraDriver {
            cfg,
            client,
            local: Mutex::new(Local::default()),
        })
    }

    async fn wait(&self, name: &str, gone: bool) -> Result<(), DriverError> {
        let deadline = tokio::time::Instant::now() + self.cfg.timeout;
        loop {
            match self.client.get_vm(name).await {
                Err(e) if e.status() == Some(404) => {
                    if gone {
                        return Ok(());
                    }
                    return Err(DriverError::NotFound {
                        site: SITE,
                        kind: "vm",
                        name: name.into(),
                    });
                }
                Err(e) => return Err(api("GET /v1/vms/{id}", e)),
                Ok(vm) if !gone && vm.observed == ObservedState::Running => return Ok(()),
                Ok(vm) if !gone && vm.observed == ObservedState::Failed => {
                    return Err(DriverError::Failed {
                        site: SITE,
                        kind: "vm",
                        name: name.into(),
                        reason: vm.error.unwrap_or_else(|| "observed failed".into()),
                    })
                }
                Ok(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DriverError::Timeout {
                    site: SITE,
                    kind: "vm",
                    name: name.into(),
                    state: if gone { "deleted" } else { "running" },
                    secs: self.cfg.timeout.as_secs_f64(),
                });
            }
            tokio::time::sleep(self.cfg.poll).await;
        }
    }
}

#[async_trait::async_trait]
impl SiteDriver for VinfraDriver {
    fn kind(&self) -> &'static str {
        SITE
    }

    async fn create_network(&self, name: &str, cidr: Ipv4Cidr) -> Result<(), DriverError> {
        self.local
            .lock()
            .await
            .networks
            .insert(name.to_owned(), cidr);
        Ok(())
    }

    async fn delete_network(&self, name: &str) -> Result<(), DriverError> {
        self.local.lock().await.networks.remove(name);
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(site = SITE, vdu = %spec.name))]
    async fn create_vdu(&self, spec: &VduSpec) -> Result<(), DriverError> {
        {
            let local = self.local.lock().await;
            if let Some(cp) = spec
                .cps
                .iter()
                .find(|c| !local.networks.contains_key(&c.network))
            {
                return Err(DriverError::NotFound {
                    site: SITE,
                    kind: "network",
                    name: cp.network.clone(),
                });
            }
        }
        // Built through serde so that fields other crates add to CreateVm later, all optional
        // with defaults, do not break this crate.
        let mut body = serde_json::json!({"name": spec.name, "image": spec.image,
            "vcpus": spec.vcpus, "memory_mib": spec.memory_mib});
        if let Some(h) = &self.cfg.host {
            body["host"] = serde_json::json!(h);
        }
        let req: CreateVm = serde_json::from_value(body).map_err(|e| DriverError::Protocol {
            site: SITE,
            op: "POST /v1/vms".into(),
            what: format!("cannot build the request: {e}"),
        })?;
        match self.client.create_vm(&req).await {
            Ok(_) => {}
            // The API answers 422 `image: no image named X` for an unknown image.
            Err(e)
                if e.status() == Some(422)
                    && e.detail().is_some_and(|d| d.starts_with("image:")) =>
            {
                return Err(DriverError::NotFound {
                    site: SITE,
                    kind: "image",
                    name: spec.image.clone(),
                })
            }
            Err(e) => return Err(api("POST /v1/vms", e)),
        }
        self.local
            .lock()
            .await
            .cps
            .insert(spec.name.clone(), spec.cps.clone());
        let r = self.wait(&spec.name, false).await;
        if r.is_err() {
            if let Err(e) = self.delete_vdu(&spec.name).await {
                tracing::warn!(error = %e, "cleanup after failed VM failed");
            }
        }
        r
    }

    async fn delete_vdu(&self, name: &str) -> Result<(), DriverError> {
        self.local.lock().await.cps.remove(name);
        match self.client.delete_vm(name).await {
            Ok(VmDeletion::Deleted) => Ok(()),
            Ok(VmDeletion::Pending(_)) => self.wait(name, true).await,
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(api("DELETE /v1/vms/{id}", e)),
        }
    }

    async fn cp_info(&self, vdu: &str, cp: &str) -> Result<CpInfo, DriverError> {
        match self.client.get_vm(vdu).await {
            Err(e) if e.status() == Some(404) => {
                return Err(DriverError::NotFound {
                    site: SITE,
                    kind: "vm",
                    name: vdu.into(),
                })
            }
            Err(e) => return Err(api("GET /v1/vms/{id}", e)),
            Ok(_) => {}
        }
        let local = self.local.lock().await;
        let spec = local
            .cps
            .get(vdu)
            .and_then(|cps| cps.iter().find(|c| c.name == cp))
            .ok_or_else(|| DriverError::NotFound {
                site: SITE,
                kind: "cp",
                name: cp.into(),
            })?;
        Ok(CpInfo {
            cp: cp.to_owned(),
            port_id: None,
            mac: None,
            ips: vec![spec.ip],
        })
    }

    async fn inventory(&self) -> Result<SiteInventory, DriverError> {
        let vms = self
            .client
            .list_vms()
            .await
            .map_err(|e| api("GET /v1/vms", e))?;
        Ok(SiteInventory {
            networks: self.local.lock().await.networks.keys().cloned().collect(),
            vdus: vms.into_iter().map(|v| v.name.to_string()).collect(),
        })
    }
}
