//! Redundant placement's inputs: the operator's storage inventory document, joined with
//! the registered hosts and the reservation ledger into the planner's inventory.
//!
//! The planner (`sched`) is pure; this module builds its inventory from three sources:
//! the operator's storage/connectivity document (`PUT /v1/storage`), the registered hosts
//! (capacity, liveness, maintenance) and the ledger (what is reserved where).

use std::collections::{BTreeMap, HashMap};

use model::api::StorageInventory;
use model::{Host, HostState, Name};
use sched::{Inventory, Planner, ServerName, ServerResource, StorageName, StorageResource, Usage};

use crate::records::{get_json, keys, to_bytes};
use crate::{Control, ControlError};

/// Why the storage document cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A problem of the document, with its path (`storage[2]: ...`).
    #[error("{0}")]
    Document(String),
    /// The store failed.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// The planner's inventory: free storage after the ledger's reservations, and servers
/// from hosts (free capacity after the ledger's reservations, standbys and migration
/// destinations included).
pub fn inventory(
    doc: &StorageInventory,
    hosts: &[Host],
    used_hosts: &HashMap<Name, Usage>,
    used_storage: &HashMap<String, u64>,
) -> Result<Inventory, StorageError> {
    let mut storage: Vec<StorageResource> = doc
        .storage
        .iter()
        .enumerate()
        .map(|(i, v)| {
            serde_json::from_value(v.clone())
                .map_err(|e| StorageError::Document(format!("storage[{i}]: {e}")))
        })
        .collect::<Result<_, _>>()?;
    for s in &mut storage {
        let used = used_storage.get(s.name.as_str()).copied().unwrap_or(0);
        s.free_gib = s.free_gib.saturating_sub(used);
    }
    let mut servers: Vec<ServerResource> = hosts
        .iter()
        .map(|h| {
            let u = used_hosts.get(&h.name).copied().unwrap_or_default();
            ServerResource {
                name: ServerName::new(h.name.as_str()),
                cpus: h.schedulable_vcpus(),
                free_cpus: u32::try_from(u64::from(h.schedulable_vcpus()).saturating_sub(u.vcpus))
                    .unwrap_or(0),
                memory_mib: h.memory_mib,
                free_memory_mib: h.memory_mib.saturating_sub(u.memory_mib),
                live: h.state == HostState::Up,
                in_maintenance: h.maintenance.is_some(),
                failure_domain: None,
            }
        })
        .collect();
    // Connectivity may name hosts that have not registered yet: they exist, down.
    for name in doc.connectivity.keys() {
        if !servers.iter().any(|s| s.name.as_str() == name) {
            servers.push(ServerResource {
                name: ServerName::new(name.as_str()),
                cpus: 0,
                free_cpus: 0,
                memory_mib: 0,
                free_memory_mib: 0,
                live: false,
                in_maintenance: false,
                failure_domain: None,
            });
        }
    }
    let connectivity: BTreeMap<ServerName, Vec<StorageName>> = doc
        .connectivity
        .iter()
        .map(|(h, ss)| {
            (
                ServerName::new(h.as_str()),
                ss.iter().map(|s| StorageName::new(s.as_str())).collect(),
            )
        })
        .collect();
    Ok(Inventory {
        storage,
        servers,
        connectivity,
    })
}

/// Everything a planner is built from, read at one moment.
#[derive(Debug)]
pub struct PlannerInputs {
    /// The operator's document.
    pub doc: StorageInventory,
    /// The hosts, with fresh states.
    pub hosts: Vec<Host>,
    /// The ledger's per-host reservations.
    pub used_hosts: HashMap<Name, Usage>,
    /// The ledger's per-storage reservations.
    pub used_storage: HashMap<String, u64>,
}

impl PlannerInputs {
    /// Builds the planner (CPU work over the whole document: callers with a request to
    /// answer run it off the async workers).
    pub fn planner(&self) -> Result<Planner, StorageError> {
        let inv = inventory(&self.doc, &self.hosts, &self.used_hosts, &self.used_storage)?;
        Planner::new(&inv).map_err(|e| StorageError::Document(e.to_string()))
    }
}

impl Control {
    /// The stored document: storage resources and connectivity, as the operator gave
    /// them (empty before the first `put_storage`).
    pub async fn storage_doc(&self) -> Result<StorageInventory, ControlError> {
        Ok(get_json::<StorageInventory>(self.store(), keys::STORAGE)
            .await?
            .map(|(s, _)| s)
            .unwrap_or_default())
    }

    /// Replaces the storage document after checking it whole (every problem named).
    pub async fn put_storage(
        &self,
        doc: StorageInventory,
    ) -> Result<StorageInventory, StorageError> {
        let hosts = self.hosts().await?;
        let inv = inventory(&doc, &hosts, &HashMap::new(), &HashMap::new())?;
        inv.validate()
            .map_err(|e| StorageError::Document(e.to_string()))?;
        self.store()
            .put(keys::STORAGE, to_bytes(&doc)?)
            .await
            .map_err(ControlError::from)?;
        Ok(doc)
    }

    /// The planner's inputs now.
    pub async fn planner_inputs(&self) -> Result<PlannerInputs, ControlError> {
        let ledger = self.ledger().await?;
        Ok(PlannerInputs {
            doc: self.storage_doc().await?,
            hosts: self.hosts().await?,
            used_hosts: ledger.hosts,
            used_storage: ledger.storage_gib,
        })
    }
}
