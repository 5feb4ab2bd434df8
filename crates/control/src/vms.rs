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
    /// No room (on the host asked for, or anywhere); names the host and the constraint,
    /// and the drain reservations that hold room there.
    #[error("{reason}{}", .held.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    NoRoom {
        /// The constraint.
        reason: PlaceError,
        /// What maintenance drains hold there, if anything.
        held: Option<String>,
    },
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
    /// A resource table named in `resource_tables` cannot be mapped (none of the
    /// tenant's on the host, or not all on one host); the reason names it.
    #[error("resource_tables: {0}")]
    Tables(String),
    /// The store, or a lost race.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// Up to 2 ms × 2^attempt (at most 64 ms), drawn at random.
async fn backoff(attempt: usize) {
    let cap_us = 2_000u64 << attempt.min(5);
    let mut rng = model::SplitMix64::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos().into())
            .unwrap_or(0),
    );
    tokio::time::sleep(std::time::Duration::from_micros(rng.below(cap_us))).await;
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
        for attempt in 0..CAS_ATTEMPTS {
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
            // A VM with resource tables goes where its tables are, and nowhere else.
            let pin = self
                .pin_to_tables(tenant, &req.resource_tables, req.host.as_ref(), &hosts)
                .await?;
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
                        pin.as_ref().map(|p| &p.host).or(req.host.as_ref()),
                    )
                    .map_err(|e| match e {
                        PlaceError::NoSuchHost(_) => CreateVmError::NoSuchHost(e),
                        PlaceError::NoRoom { ref host, .. } => CreateVmError::NoRoom {
                            held: ledger.drain_holds_note(Some(host)),
                            reason: e,
                        },
                        PlaceError::NoHostFits { .. } => CreateVmError::NoRoom {
                            held: ledger.drain_holds_note(None),
                            reason: e,
                        },
                        _ => CreateVmError::NoRoom {
                            reason: e,
                            held: None,
                        },
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
                trace: None,
                resource_tables: req.resource_tables.clone(),
            };
            let (pin_compares, pin_ops) = pin.map(|p| p.txn()).unwrap_or_default();
            let res = self
                .store()
                .txn(
                    std::iter::once(Compare::ModRevision {
                        key: name_key.clone(),
                        expect: None,
                    })
                    .chain(reserve_compares)
                    .chain(nets.compares)
                    .chain(pin_compares)
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
                    .chain(pin_ops)
                    .collect(),
                )
                .await;
            match res {
                Ok(_) => {
                    tracing::info!(vm = %vm.name, id = %vm.id, host = %vm.host, "vm created");
                    return Ok(vm);
                }
                // Any compare may have failed: the next round's name check tells a taken
                // name from a lost placement or address race. Concurrent creates pick the
                // same best host, so the losers wait a random while before re-planning
                // (they would otherwise keep colliding on it).
                Err(StoreError::Conflict { .. }) => {
                    backoff(attempt).await;
                    continue;
                }
                Err(e) => return Err(ControlError::from(e).into()),
            }
        }
        Err(ControlError::Contended {
            what: "host placement (it kept racing with other requests)".to_owned(),
        }
        .into())
    }
}

/// Why a VM's desired state or record cannot change.
#[derive(Debug, thiserror::Error)]
pub enum VmChangeError {
    /// Start or stop of a VM being deleted.
    #[error("vm {0} is being deleted")]
    BeingDeleted(Name),
    /// An agent reported a VM that is assigned elsewhere.
    #[error("host: vm {vm} is assigned to {assigned}, not {reporter}")]
    WrongHost {
        /// The VM.
        vm: VmId,
        /// Where it is assigned.
        assigned: Name,
        /// Who reported.
        reporter: Name,
    },
    /// `deleted` reported for a VM nobody asked to delete.
    #[error("state: deleted is accepted only for a vm whose desired state is deleted, vm {vm} is {}", .desired.as_str())]
    NotBeingDeleted {
        /// The VM.
        vm: VmId,
        /// What is asked of it.
        desired: DesiredState,
    },
    /// A trace was asked of a VM that does not run.
    #[error("vm {vm} is {} (desired {}): only a running vm's disk can be traced", .observed.as_str(), .desired.as_str())]
    NotRunning {
        /// The VM.
        vm: Name,
        /// What it is.
        observed: ObservedState,
        /// What is asked of it.
        desired: DesiredState,
    },
    /// A trace stop of a VM that is not recording.
    #[error("vm {0} is not recording a trace")]
    NotRecording(Name),
    /// An agent uploaded a trace nobody is waiting for.
    #[error("vm {0} has no stopped trace waiting for its file")]
    NoTraceAwaited(VmId),
    /// The store, a lost race, or no such VM.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// What a delete did.
#[derive(Debug)]
pub enum VmDeleted {
    /// `desired: deleted` is recorded; the record goes when its agent confirms.
    Pending(Box<Vm>),
    /// The record is gone (its host is down or gone: nobody would confirm).
    Removed(Box<Vm>),
}

/// What an agent's observed report did.
#[derive(Debug, PartialEq, Eq)]
pub enum Observed {
    /// Recorded (or unchanged).
    Recorded,
    /// The deletion was confirmed and the record removed.
    Removed,
}

impl Control {
    /// Sets a VM's desired state (`running` or `stopped`).
    pub async fn set_desired(
        &self,
        scope: Scope,
        id: &str,
        desired: DesiredState,
    ) -> Result<Vm, VmChangeError> {
        for _ in 0..CAS_ATTEMPTS {
            let (mut vm, rev) = self.vm(scope, id).await?;
            if vm.desired == DesiredState::Deleted {
                return Err(VmChangeError::BeingDeleted(vm.name));
            }
            if vm.desired == desired {
                return Ok(vm);
            }
            vm.desired = desired;
            match self
                .store()
                .cas(&keys::vm(vm.id), Some(rev), to_bytes(&vm)?)
                .await
            {
                Ok(_) => return Ok(vm),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(ControlError::from(e).into()),
            }
        }
        Err(ControlError::Contended {
            what: format!("vm {id}"),
        }
        .into())
    }

    /// Deletes a VM: `desired: deleted`, confirmed later by its agent; or, when its
    /// host is down or gone, the record at once (an agent that comes back destroys VMs
    /// it is no longer assigned).
    pub async fn delete_vm(&self, scope: Scope, id: &str) -> Result<VmDeleted, ControlError> {
        for _ in 0..CAS_ATTEMPTS {
            let (mut vm, rev) = self.vm(scope, id).await?;
            let host_up = self
                .hosts()
                .await?
                .iter()
                .any(|h| h.name == vm.host && h.state == model::HostState::Up);
            let res = if host_up {
                if vm.desired == DesiredState::Deleted {
                    return Ok(VmDeleted::Pending(Box::new(vm)));
                }
                vm.desired = DesiredState::Deleted;
                self.store()
                    .cas(&keys::vm(vm.id), Some(rev), to_bytes(&vm)?)
                    .await
            } else {
                self.remove_vm(&vm, rev).await?
            };
            match res {
                Ok(_) if host_up => return Ok(VmDeleted::Pending(Box::new(vm))),
                Ok(_) => {
                    tracing::info!(vm = %vm.name, id = %vm.id, host = %vm.host, "vm removed, its host is down");
                    return Ok(VmDeleted::Removed(Box::new(vm)));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Contended {
            what: format!("vm {id}"),
        })
    }

    /// Removes a VM record, its name and its addresses, if the record is still at `rev`;
    /// terminal operations held for it (its migration was on) are answered `failed` in
    /// the same transaction. The outer error is one reading the store; the inner one is
    /// the transaction's (a conflict: read again).
    async fn remove_vm(
        &self,
        vm: &Vm,
        rev: store::Revision,
    ) -> Result<Result<store::Revision, StoreError>, ControlError> {
        let key = keys::vm(vm.id);
        let (held_compares, held_writes) = self.fail_held(vm.id).await?;
        Ok(self
            .store()
            .txn(
                std::iter::once(Compare::ModRevision {
                    key: key.clone(),
                    expect: Some(rev),
                })
                .chain(held_compares)
                .collect(),
                [
                    TxnOp::Delete { key },
                    TxnOp::Delete {
                        key: keys::vm_name(vm.tenant, &vm.name),
                    },
                ]
                .into_iter()
                .chain(crate::networks::release(&vm.nics))
                .chain(held_writes)
                .collect(),
            )
            .await)
    }

    /// Every VM assigned to `host`, across tenants, with its image and (while it
    /// migrates to or from the host) its migration: what the host's agent must converge
    /// to. A migrating VM is assigned to both ends until the migration is over.
    pub async fn assignments(
        &self,
        host: &Name,
    ) -> Result<Vec<model::api::Assignment>, ControlError> {
        use crate::records::{get_json, list_json};
        self.require_host(host).await?;
        let mut images: std::collections::HashMap<model::ImageId, model::Image> =
            std::collections::HashMap::new();
        let mut out = Vec::new();
        for (vm, _) in list_json::<Vm>(self.store(), keys::VMS).await? {
            let migration = match vm.migration {
                Some(m) => get_json::<model::Migration>(self.store(), &keys::migration(m))
                    .await?
                    .map(|(m, _)| m),
                None => None,
            };
            if !assigned_hosts(&vm, migration.as_ref()).contains(host) {
                continue;
            }
            let image = match images.get(&vm.image) {
                Some(i) => i.clone(),
                None => {
                    let i = image_of(self.store(), &vm).await?;
                    images.insert(vm.image, i.clone());
                    i
                }
            };
            out.extend(assignment_for(host, vm, migration, image));
        }
        Ok(out)
    }

    /// An agent's report from `host` about VM `id`: `deleted` confirms a deletion and
    /// removes the record; other states are recorded (repeats write nothing).
    pub async fn report_observed(
        &self,
        id: &str,
        host: &Name,
        observed: Option<ObservedState>,
        error: Option<String>,
    ) -> Result<Observed, VmChangeError> {
        let not_found = || ControlError::NotFound {
            kind: "vm",
            id: id.to_owned(),
        };
        let vm_id: VmId = id.parse().map_err(|_| not_found())?;
        for _ in 0..CAS_ATTEMPTS {
            let (mut vm, rev) = crate::records::get_json::<Vm>(self.store(), &keys::vm(vm_id))
                .await?
                .ok_or_else(not_found)?;
            if &vm.host != host {
                return Err(VmChangeError::WrongHost {
                    vm: vm.id,
                    assigned: vm.host,
                    reporter: host.clone(),
                });
            }
            let res = match observed {
                None => {
                    if vm.desired != DesiredState::Deleted {
                        return Err(VmChangeError::NotBeingDeleted {
                            vm: vm.id,
                            desired: vm.desired,
                        });
                    }
                    self.remove_vm(&vm, rev).await?
                }
                Some(observed) => {
                    if vm.observed == observed && vm.error == error {
                        // Agents repeat reports; skip the write when nothing changed.
                        return Ok(Observed::Recorded);
                    }
                    vm.observed = observed;
                    vm.error.clone_from(&error);
                    self.store()
                        .cas(&keys::vm(vm.id), Some(rev), to_bytes(&vm)?)
                        .await
                }
            };
            match res {
                Ok(_) if observed.is_none() => {
                    tracing::info!(vm = %vm.name, id = %vm.id, "vm deleted");
                    return Ok(Observed::Removed);
                }
                Ok(_) => return Ok(Observed::Recorded),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(ControlError::from(e).into()),
            }
        }
        Err(ControlError::Contended {
            what: format!("vm {id}"),
        }
        .into())
    }
}

/// The hosts `vm` is assigned to: its host and, while the migration it names is on
/// (`migration` is that record, if it exists), both ends of it. The assignments list and
/// the push channel (`push`) both ask this, so the two cannot disagree.
pub(crate) fn assigned_hosts(
    vm: &Vm,
    migration: Option<&model::Migration>,
) -> std::collections::BTreeSet<Name> {
    let mut hosts = std::collections::BTreeSet::from([vm.host.clone()]);
    if let Some(m) = migration.filter(|m| vm.migration == Some(m.id)) {
        hosts.insert(m.from_host.clone());
        hosts.insert(m.to_host.clone());
    }
    hosts
}

/// What `host`'s agent is told about `vm` (with `image`, and `migration`: the record
/// `vm.migration` names, if it exists), or `None` when the VM is not assigned to it.
/// The migration is attached only for its two ends.
pub(crate) fn assignment_for(
    host: &Name,
    vm: Vm,
    migration: Option<model::Migration>,
    image: model::Image,
) -> Option<model::api::Assignment> {
    if !assigned_hosts(&vm, migration.as_ref()).contains(host) {
        return None;
    }
    let migration = migration
        .filter(|m| vm.migration == Some(m.id) && (&m.from_host == host || &m.to_host == host));
    Some(model::api::Assignment {
        vm,
        image,
        migration,
    })
}

/// The image of `vm`. Images in use cannot be deleted, so a missing one is a broken
/// invariant.
pub(crate) async fn image_of(
    store: &dyn store::Store,
    vm: &Vm,
) -> Result<model::Image, ControlError> {
    crate::records::get_json::<model::Image>(store, &keys::image(vm.image))
        .await?
        .map(|(i, _)| i)
        .ok_or_else(|| {
            ControlError::Invariant(format!("vm {} uses missing image {}", vm.id, vm.image))
        })
}
