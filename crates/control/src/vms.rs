//! VM creation: image, placement (plain or redundant), addresses and the reservation,
//! in one transaction.

use model::api::VmRequest;
use model::{DesiredState, Name, ObservedState, TenantId, Vm, VmId};
use sched::{place, PlaceError};
use store::{Compare, StoreError, TxnOp};

use crate::networks::NicError;
use crate::records::{keys, now_ms, to_bytes, CAS_ATTEMPTS};
use crate::storage::StorageError;
use crate::{Control, ControlError, Scope};

/// Why a VM cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateVmError {
    /// The tenant sees no such image.
    #[error("image: no image named {0}")]
    NoSuchImage(String),
    /// The image names host files (from before the image store).
    #[error("image: {0}")]
    ImageNotInStore(String),
    /// The tenant already has a VM of that name.
    #[error("name: vm {0} already exists")]
    NameTaken(Name),
    /// The host asked for does not exist.
    #[error("{0}")]
    NoSuchHost(PlaceError),
    /// No room (on the host asked for, or anywhere); names the host and the constraint.
    #[error("{0}")]
    NoRoom(PlaceError),
    /// No storage pair and server pair fits a redundant VM; the explanation names the
    /// failed constraint of the best candidates.
    #[error("redundant: {0}")]
    NoRedundantPlacement(Box<sched::Explanation>),
    /// The storage document cannot be used.
    #[error(transparent)]
    Storage(StorageError),
    /// A NIC cannot get its address.
    #[error(transparent)]
    Nic(#[from] NicError),
    /// The store, or a lost race.
    #[error(transparent)]
    Control(#[from] ControlError),
}

impl From<StorageError> for CreateVmError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Control(c) => CreateVmError::Control(c),
            other => CreateVmError::Storage(other),
        }
    }
}

impl Control {
    /// Creates a VM of `tenant`: places it (a storage pair and two servers for a
    /// redundant one), addresses its NICs, and writes it with its name, its addresses
    /// and its reservations in one transaction; a lost race re-plans.
    pub async fn create_vm(&self, tenant: TenantId, req: &VmRequest) -> Result<Vm, CreateVmError> {
        // The image is looked up as the VM's tenant sees it, even for an admin.
        let (image, _) = self
            .image(Scope::Tenant(tenant), &req.image)
            .await
            .map_err(|e| match e {
                ControlError::NotFound { .. } => CreateVmError::NoSuchImage(req.image.clone()),
                other => other.into(),
            })?;
        // An image from before the image store names host files: refused here with the
        // way out, and by the agent for VMs that already use it.
        image
            .blobs()
            .map_err(|e| CreateVmError::ImageNotInStore(e.message))?;
        let name_key = keys::vm_name(tenant, &req.name);
        for _ in 0..CAS_ATTEMPTS {
            if self
                .store()
                .get(&name_key)
                .await
                .map_err(ControlError::from)?
                .is_some()
            {
                return Err(CreateVmError::NameTaken(req.name.clone()));
            }
            let ledger = self.ledger().await?;
            let hosts = self.hosts().await?;
            let (host, redundancy) = match req.redundant_disk_gib {
                // Redundant placement: storage pair first, then a connectable server for
                // each, paired.
                Some(disk_gib) => {
                    let inputs = crate::storage::PlannerInputs {
                        doc: self.storage_doc().await?,
                        hosts: hosts.clone(),
                        used_hosts: ledger.hosts.clone(),
                        used_storage: ledger.storage_gib.clone(),
                    };
                    let p = inputs
                        .planner()?
                        .place(&sched::Request {
                            disk_gib,
                            vcpus: req.vcpus,
                            memory_mib: req.memory_mib,
                        })
                        .map_err(|ex| CreateVmError::NoRedundantPlacement(Box::new(ex)))?;
                    let as_host = |s: &str| {
                        model::validate_name("host", s).map_err(|e| {
                            ControlError::Invariant(format!("planner chose host {s}: {e}"))
                        })
                    };
                    (
                        as_host(p.primary.server.as_str())?,
                        Some(model::Redundancy {
                            disk_gib,
                            primary_storage: p.primary.storage.to_string(),
                            standby_host: as_host(p.standby.server.as_str())?,
                            standby_storage: p.standby.storage.to_string(),
                            takeovers: 0,
                        }),
                    )
                }
                None => {
                    let host = place(
                        &hosts,
                        &ledger.hosts,
                        req.vcpus,
                        req.memory_mib,
                        req.host.as_ref(),
                    )
                    .map_err(|e| match e {
                        PlaceError::NoSuchHost(_) => CreateVmError::NoSuchHost(e),
                        _ => CreateVmError::NoRoom(e),
                    })?;
                    (host, None)
                }
            };
            let (reserve_compares, reserve_ops) = ledger.reserve(
                std::iter::once(&host).chain(redundancy.as_ref().map(|r| &r.standby_host)),
                redundancy
                    .iter()
                    .flat_map(|r| [r.primary_storage.as_str(), r.standby_storage.as_str()]),
            )?;
            let id = VmId::new_random();
            let nets = self.allocate_nics(tenant, &req.nics, id).await?;
            let vm = Vm {
                id,
                tenant,
                name: req.name.clone(),
                image: image.id,
                vcpus: req.vcpus,
                memory_mib: req.memory_mib,
                host,
                desired: DesiredState::Running,
                observed: ObservedState::Pending,
                error: None,
                created_at: now_ms(),
                migration: None,
                redundancy,
                nics: nets.nics,
                kernel_args: req.kernel_args.clone(),
            };
            let res = self
                .store()
                .txn(
                    std::iter::once(Compare::ModRevision {
                        key: name_key.clone(),
                        expect: None,
                    })
                    .chain(reserve_compares)
                    .chain(nets.compares)
                    .collect(),
                    [
                        TxnOp::Put {
                            key: keys::vm(vm.id),
                            value: to_bytes(&vm)?,
                        },
                        TxnOp::Put {
                            key: name_key.clone(),
                            value: to_bytes(&vm.id)?,
                        },
                    ]
                    .into_iter()
                    .chain(reserve_ops)
                    .chain(nets.ops)
                    .collect(),
                )
                .await;
            match res {
                Ok(_) => {
                    tracing::info!(vm = %vm.name, id = %vm.id, host = %vm.host, "vm created");
                    return Ok(vm);
                }
                // Any compare may have failed: the next round's name check tells a taken
                // name from a lost placement or address race.
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(ControlError::from(e).into()),
            }
        }
        Err(ControlError::Contended {
            what: "host placement (it kept racing with other requests)".to_owned(),
        }
        .into())
    }
}
