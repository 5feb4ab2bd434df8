//! vinfra site: a vinfra control plane, through the `client` crate; VDUs are vinfra VMs.
//!
//! This is the driver for a vinfra control plane reached over HTTP (another one, or this
//! one from outside). A vinfra server running an NS on itself does not call itself back:
//! its control layer has an in-process driver (`control::ns_site`) with the same
//! behaviour.
//!
//! VM creation is asynchronous in vinfra too (the server records the VM, an agent boots it
//! and reports `observed`), so `create_vdu` polls until `running` or `failed`, and
//! `delete_vdu` until the record is gone.
//!
//! Networks are vinfra networks (`/v1/networks`), CPs are named VM NICs with the planned
//! fixed addresses, allocated by vinfra's IPAM (which refuses an address in use), plugged by
//! the agent into the network's bridge and configured in the guest. The driver holds no
//! state of its own: a new driver process finds everything through the API.

use std::collections::BTreeMap;
use std::time::Duration;

use client::{Client, ClientError, VmDeletion};
use model::api::{CreateNetwork, CreateVm, NicRequest};

use super::{CpInfo, DriverError, SiteDriver, SiteInventory};
use crate::descriptor::Ipv4Cidr;
use crate::plan::VduSpec;

const SITE: &str = "vinfra";

/// What vinfra's guest (`scripts/build-guest.sh`) prints once its link service runs.
/// Its workload's `TICK` lines follow, and can push this line out of the console tail.
const GUEST_READY: &str = "GUEST: READY";
const GUEST_TICK: &str = "TICK ";

/// Whether a vinfra guest's console tail shows its link service running (shared with
/// the in-process vinfra site of the control layer).
pub fn guest_ready(console: &str) -> bool {
    console.contains(GUEST_READY) || console.lines().any(|l| l.starts_with(GUEST_TICK))
}

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
    /// Link relay addresses (`IP:PORT`) by host name, from a caller that may know
    /// them when the token may not: members get hosts without their internal
    /// addresses, so the control plane running a member's NS passes them here.
    /// A host not in the map is asked of the API (`link_addr`).
    pub link_addrs: BTreeMap<String, String>,
}

/// A site run by vinfra.
#[derive(Debug)]
pub struct VinfraDriver {
    cfg: VinfraConfig,
    client: Client,
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
        Ok(VinfraDriver { cfg, client })
    }

    async fn wait(&self, name: &str, gone: bool) -> Result<(), DriverError> {
        let (timeout, poll) = (self.cfg.timeout, self.cfg.poll);
        super::wait_vm(SITE, name, gone, timeout, poll, || async {
            match self.client.get_vm(name).await {
                Err(e) if e.status() == Some(404) => Err(DriverError::NotFound {
                    site: SITE,
                    kind: "vm",
                    name: name.into(),
                }),
                Err(e) => Err(api("GET /v1/vms/{id}", e)),
                Ok(vm) => Ok(vm),
            }
        })
        .await
    }
}

#[async_trait::async_trait]
impl SiteDriver for VinfraDriver {
    fn kind(&self) -> &'static str {
        SITE
    }

    async fn create_network(&self, name: &str, cidr: Ipv4Cidr) -> Result<(), DriverError> {
        let req = CreateNetwork {
            name: name.to_owned(),
            cidr: cidr.to_string(),
            tenant: None,
        };
        match self.client.create_network(&req).await {
            Ok(_) => Ok(()),
            // Idempotent like the other drivers: the same network again is fine.
            Err(e) if e.status() == Some(409) => match self.client.get_network(name).await {
                Ok(n) if n.cidr == req.cidr => Ok(()),
                Ok(n) => Err(DriverError::Failed {
                    site: SITE,
                    kind: "network",
                    name: name.into(),
                    reason: format!("exists with subnet {}, not {}", n.cidr, req.cidr),
                }),
                Err(e) => Err(api("GET /v1/networks/{name}", e)),
            },
            Err(e) => Err(api("POST /v1/networks", e)),
        }
    }

    async fn delete_network(&self, name: &str) -> Result<(), DriverError> {
        // A concurrent change (another site deleting the same shared network) answers
        // 409 "changed concurrently"; the next round sees 404 or the truth.
        for _ in 0..5 {
            match self.client.delete_network(name).await {
                Ok(()) => return Ok(()),
                Err(e) if e.status() == Some(404) => return Ok(()),
                // Two sites of one NS on one vinfra control plane share the NS virtual
                // link's network (same name, same subnet). Teardown deletes a site's VDUs
                // before its networks, so NICs still on it are the other site's: that site
                // deletes the network after its own VDUs.
                Err(e)
                    if e.status() == Some(409)
                        && e.detail().is_some_and(|d| d.contains("NIC(s) on it")) =>
                {
                    tracing::info!(
                        network = name,
                        "network still used by another site's VDUs; left to it"
                    );
                    return Ok(());
                }
                Err(e)
                    if e.status() == Some(409)
                        && e.detail().is_some_and(|d| d.contains("concurrently")) =>
                {
                    tokio::time::sleep(self.cfg.poll).await;
                }
                Err(e) => return Err(api("DELETE /v1/networks/{name}", e)),
            }
        }
        Err(DriverError::Failed {
            site: SITE,
            kind: "network",
            name: name.into(),
            reason: "kept changing concurrently while being deleted".into(),
        })
    }

    #[tracing::instrument(skip_all, fields(site = SITE, vdu = %spec.name))]
    async fn create_vdu(&self, spec: &VduSpec) -> Result<(), DriverError> {
        let req = CreateVm {
            name: spec.name.clone(),
            image: spec.image.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            host: self.cfg.host.clone(),
            nics: spec
                .cps
                .iter()
                .map(|c| NicRequest {
                    network: c.network.clone(),
                    name: Some(c.name.clone()),
                    ip: Some(c.ip),
                })
                .collect(),
            ..CreateVm::default()
        };
        match self.client.create_vm(&req).await {
            Ok(_) => {}
            // The API answers 422 `image: no image named X` for an unknown image and
            // `nics[i].network: no network named X` for an unknown network.
            Err(e) if e.status() == Some(422) => {
                let detail = e.detail().unwrap_or_default();
                if detail.starts_with("image:") {
                    return Err(DriverError::NotFound {
                        site: SITE,
                        kind: "image",
                        name: spec.image.clone(),
                    });
                }
                if let Some(i) = detail
                    .strip_prefix("nics[")
                    .and_then(|r| r.split_once("].network: no network"))
                    .and_then(|(i, _)| i.parse::<usize>().ok())
                {
                    if let Some(cp) = spec.cps.get(i) {
                        return Err(DriverError::NotFound {
                            site: SITE,
                            kind: "network",
                            name: cp.network.clone(),
                        });
                    }
                }
                return Err(api("POST /v1/vms", e));
            }
            Err(e) => return Err(api("POST /v1/vms", e)),
        }
        let r = self.wait(&spec.name, false).await;
        if r.is_err() {
            if let Err(e) = self.delete_vdu(&spec.name).await {
                tracing::warn!(error = %e, "cleanup after failed VM failed");
            }
        }
        r
    }

    async fn delete_vdu(&self, name: &str) -> Result<(), DriverError> {
        match self.client.delete_vm(name).await {
            Ok(VmDeletion::Deleted) => Ok(()),
            Ok(VmDeletion::Pending(_)) => self.wait(name, true).await,
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(api("DELETE /v1/vms/{id}", e)),
        }
    }

    async fn cp_info(&self, vdu: &str, cp: &str) -> Result<CpInfo, DriverError> {
        let vm = match self.client.get_vm(vdu).await {
            Err(e) if e.status() == Some(404) => {
                return Err(DriverError::NotFound {
                    site: SITE,
                    kind: "vm",
                    name: vdu.into(),
                })
            }
            Err(e) => return Err(api("GET /v1/vms/{id}", e)),
            Ok(vm) => vm,
        };
        let nic = vm
            .nics
            .iter()
            .find(|n| n.name.as_ref().is_some_and(|n| n.as_str() == cp))
            .ok_or_else(|| DriverError::NotFound {
                site: SITE,
                kind: "cp",
                name: cp.into(),
            })?;
        Ok(CpInfo {
            cp: cp.to_owned(),
            port_id: Some(format!("{}/{}", vm.id, nic.network)),
            mac: Some(nic.mac.clone()),
            ips: vec![nic.ip],
        })
    }

    /// A vinfra VM runs once QEMU starts; its guest then boots (seconds with KVM, tens
    /// of seconds under TCG on a loaded machine) before it answers link requests.
    async fn wait_guest(&self, vdu: &str) -> Result<(), DriverError> {
        let (timeout, poll) = (self.cfg.timeout, self.cfg.poll);
        super::wait_guest_console(SITE, vdu, timeout, poll, || async {
            self.client
                .console(vdu)
                .await
                .map_err(|e| api("GET /v1/vms/{id}/console", e))
        })
        .await
    }

    /// The agent checks that this token may see the VM before relaying into its guest.
    fn link_auth(&self) -> Option<String> {
        Some(self.cfg.token.clone())
    }

    /// The agent of the host running `vdu` relays link requests into the guest.
    async fn link_endpoint(&self, vdu: &str) -> Result<Option<std::net::SocketAddr>, DriverError> {
        let vm = self
            .client
            .get_vm(vdu)
            .await
            .map_err(|e| api("GET /v1/vms/{id}", e))?;
        let addr = match self.cfg.link_addrs.get(vm.host.as_str()) {
            Some(a) => Some(a.clone()),
            None => {
                self.client
                    .get_host(vm.host.as_str())
                    .await
                    .map_err(|e| api("GET /v1/hosts/{name}", e))?
                    .link_addr
            }
        };
        Ok(addr.and_then(|a| a.parse().ok()))
    }

    async fn inventory(&self) -> Result<SiteInventory, DriverError> {
        let vms = self
            .client
            .list_vms()
            .await
            .map_err(|e| api("GET /v1/vms", e))?;
        let networks = self
            .client
            .list_networks()
            .await
            .map_err(|e| api("GET /v1/networks", e))?;
        Ok(SiteInventory {
            networks: networks.into_iter().map(|n| n.name.to_string()).collect(),
            vdus: vms.into_iter().map(|v| v.name.to_string()).collect(),
        })
    }
}
