//! The `vinfra` NS site: this control plane, driven in process.
//!
//! An NS instance whose site is `vinfra` makes its VDUs and networks on the very control
//! plane that runs the NS. The HTTP driver (`nfv::driver::vinfra`) would call this server
//! back over its own API with a bearer token that has to live as long as the job (the
//! requester's, or one minted after a restart); [`LocalSite`] calls the control layer
//! instead, with the same rules and the same answers.
//!
//! Tenancy is the instance's: every VM and network is made, read and deleted as
//! `Scope::Tenant(instance tenant)`, exactly what the requester's member token (or the
//! admin's default tenant) gave the HTTP driver. The one credential left is for the
//! agents' link relay, which checks over the API that a link request's token may see the
//! VM owning the CP: the requester's token, held in memory for the job's link step (an
//! interrupted instantiate is rolled back after a restart, and a rollback or a terminate
//! makes no link, so nothing is minted or stored for it).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use model::api::{CreateNetwork, CreateVm, NicRequest};
use model::{TenantId, Vm, VmId};
use nfv::descriptor::Ipv4Cidr;
use nfv::driver::{CpInfo, DriverError, SiteDriver, SiteInventory};
use nfv::plan::VduSpec;

use crate::networks::{NetworkDeleteError, NicError};
use crate::vms::{CreateVmError, VmDeleted};
use crate::{Control, ControlError, Scope};

const SITE: &str = "vinfra";

/// The console tails the agents report, which the server keeps in memory (they are not
/// records): the site waits on a guest's console for its link service to run.
pub trait Consoles: Send + Sync {
    /// The latest tail of `vm` (empty if none).
    fn tail(&self, vm: VmId) -> String;
    /// Forgets `vm`'s tail (its record is gone).
    fn forget(&self, vm: VmId);
}

/// How a [`LocalSite`] acts.
#[derive(Clone)]
pub struct LocalSiteConfig {
    /// The instance's tenant: owner of everything the site makes.
    pub tenant: TenantId,
    /// Host for every VDU; `None` lets the scheduler choose.
    pub host: Option<String>,
    /// Poll interval for VM state and consoles.
    pub poll: Duration,
    /// How long a VM may take to run, to go, or its guest to be ready.
    pub timeout: Duration,
    /// The credential link requests carry to the agents' relays (see the module doc).
    pub link_auth: Option<String>,
}

impl fmt::Debug for LocalSiteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalSiteConfig")
            .field("tenant", &self.tenant)
            .field("host", &self.host)
            .field("poll", &self.poll)
            .field("timeout", &self.timeout)
            .field("link_auth", &self.link_auth.as_ref().map(|_| "********"))
            .finish()
    }
}

/// The `vinfra` site of this control plane.
pub struct LocalSite {
    control: Control,
    consoles: Arc<dyn Consoles>,
    cfg: LocalSiteConfig,
}

impl fmt::Debug for LocalSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalSite")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn failed(
    op: impl Into<String>,
    err: impl std::error::Error + Send + Sync + 'static,
) -> DriverError {
    DriverError::InProcess {
        site: SITE,
        op: op.into(),
        err: Box::new(err),
    }
}

fn not_found(kind: &'static str, name: &str) -> DriverError {
    DriverError::NotFound {
        site: SITE,
        kind,
        name: name.to_owned(),
    }
}

impl LocalSite {
    /// The site over `control`, reading console tails from `consoles`.
    pub fn new(control: Control, consoles: Arc<dyn Consoles>, cfg: LocalSiteConfig) -> Self {
        Self {
            control,
            consoles,
            cfg,
        }
    }

    fn scope(&self) -> Scope {
        Scope::Tenant(self.cfg.tenant)
    }

    /// The VDU's VM record, as the instance's tenant sees it.
    async fn vm(&self, name: &str) -> Result<Vm, DriverError> {
        match self.control.vm(self.scope(), name).await {
            Ok((vm, _)) => Ok(vm),
            Err(ControlError::NotFound { .. }) => Err(not_found("vm", name)),
            Err(e) => Err(failed(format!("read vm {name}"), e)),
        }
    }

    /// Waits until the VM runs (or fails), or, with `gone`, until its record is gone.
    async fn wait(&self, name: &str, gone: bool) -> Result<(), DriverError> {
        let (timeout, poll) = (self.cfg.timeout, self.cfg.poll);
        nfv::driver::wait_vm(SITE, name, gone, timeout, poll, || self.vm(name)).await
    }
}

#[async_trait::async_trait]
impl SiteDriver for LocalSite {
    fn kind(&self) -> &'static str {
        SITE
    }

    async fn create_network(&self, name: &str, cidr: Ipv4Cidr) -> Result<(), DriverError> {
        let op = || format!("create network {name}");
        let (net, cidr, _) = CreateNetwork {
            name: name.to_owned(),
            cidr: cidr.to_string(),
            tenant: None,
        }
        .validate()
        .map_err(|e| failed(op(), e))?;
        match self
            .control
            .create_network(self.cfg.tenant, net, cidr.clone())
            .await
        {
            Ok(_) => Ok(()),
            // Idempotent like the other drivers: the same network again is fine.
            Err(ControlError::Taken(_)) => match self.control.network(self.scope(), name).await {
                Ok((n, _)) if n.cidr == cidr => Ok(()),
                Ok((n, _)) => Err(DriverError::Failed {
                    site: SITE,
                    kind: "network",
                    name: name.into(),
                    reason: format!("exists with subnet {}, not {cidr}", n.cidr),
                }),
                Err(e) => Err(failed(format!("read network {name}"), e)),
            },
            Err(e) => Err(failed(op(), e)),
        }
    }

    async fn delete_network(&self, name: &str) -> Result<(), DriverError> {
        // A concurrent change (another site deleting the same shared network) is a lost
        // race; the next round sees it gone or the truth.
        for _ in 0..5 {
            match self.control.delete_network(self.scope(), name).await {
                Ok(()) | Err(NetworkDeleteError::Control(ControlError::NotFound { .. })) => {
                    return Ok(())
                }
                // Two sites of one NS on this control plane share the NS virtual link's
                // network (same name, same subnet). Teardown deletes a site's VDUs before
                // its networks, so NICs still on it are the other site's: that site
                // deletes the network after its own VDUs.
                Err(NetworkDeleteError::InUse { .. }) => {
                    tracing::info!(
                        network = name,
                        "network still used by another site's VDUs; left to it"
                    );
                    return Ok(());
                }
                Err(NetworkDeleteError::Control(ControlError::Contended { .. })) => {
                    tokio::time::sleep(self.cfg.poll).await;
                }
                Err(e) => return Err(failed(format!("delete network {name}"), e)),
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
        let op = || format!("create vm {}", spec.name);
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
        }
        .validate()
        .map_err(|e| failed(op(), e))?;
        match self.control.create_vm(self.cfg.tenant, &req).await {
            Ok(_) => {}
            Err(CreateVmError::NoSuchImage(_)) => return Err(not_found("image", &spec.image)),
            Err(CreateVmError::Nic(NicError::NoSuchNetwork { network, .. })) => {
                return Err(not_found("network", &network))
            }
            Err(e) => return Err(failed(op(), e)),
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
        match self.control.delete_vm(self.scope(), name).await {
            Ok(VmDeleted::Removed(vm)) => {
                self.consoles.forget(vm.id);
                Ok(())
            }
            // The agent confirms, and its report (through the API) forgets the console.
            Ok(VmDeleted::Pending(_)) => self.wait(name, true).await,
            Err(ControlError::NotFound { .. }) => Ok(()),
            Err(e) => Err(failed(format!("delete vm {name}"), e)),
        }
    }

    async fn cp_info(&self, vdu: &str, cp: &str) -> Result<CpInfo, DriverError> {
        let vm = self.vm(vdu).await?;
        let nic = vm
            .nics
            .iter()
            .find(|n| n.name.as_ref().is_some_and(|n| n.as_str() == cp))
            .ok_or_else(|| not_found("cp", cp))?;
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
        let vm = self.vm(vdu).await?;
        let (timeout, poll) = (self.cfg.timeout, self.cfg.poll);
        nfv::driver::wait_guest_console(SITE, vdu, timeout, poll, || async {
            Ok(self.consoles.tail(vm.id))
        })
        .await
    }

    /// The agent checks that this token may see the VM before relaying into its guest.
    fn link_auth(&self) -> Option<String> {
        self.cfg.link_auth.clone()
    }

    /// The agent of the host running `vdu` relays link requests into the guest. Its
    /// address is read here, by the server: a member's token does not see hosts'
    /// internal addresses, yet its NS needs them.
    async fn link_endpoint(&self, vdu: &str) -> Result<Option<std::net::SocketAddr>, DriverError> {
        let vm = self.vm(vdu).await?;
        let hosts = self
            .control
            .hosts()
            .await
            .map_err(|e| failed("read hosts", e))?;
        Ok(hosts
            .into_iter()
            .find(|h| h.name == vm.host)
            .and_then(|h| h.link_addr)
            .and_then(|a| a.parse().ok()))
    }

    async fn inventory(&self) -> Result<SiteInventory, DriverError> {
        let vms = self
            .control
            .vms(self.scope())
            .await
            .map_err(|e| failed("list vms", e))?;
        let networks = self
            .control
            .networks(self.scope())
            .await
            .map_err(|e| failed("list networks", e))?;
        Ok(SiteInventory {
            networks: networks.into_iter().map(|n| n.name.to_string()).collect(),
            vdus: vms.into_iter().map(|v| v.name.to_string()).collect(),
        })
    }
}
