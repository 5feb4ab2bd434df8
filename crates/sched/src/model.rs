//! The inventory the planner reads: storage resources, server resources and the
//! connectivity table saying which server can reach which storage.
//!
//! These types are both the YAML file format (`examples/storage.yaml`) and the JSON
//! body the API will accept; [`Inventory::validate`] checks what serde cannot and
//! names the exact path of every problem.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

::model::name_type!(
    /// Name of a storage resource (an array or pool).
    StorageName
);
::model::name_type!(
    /// Name of a server resource (a host).
    ServerName
);
::model::name_type!(
    /// A failure domain (rack, room, site): two replicas in one domain share its fate.
    FailureDomain
);
::model::name_type!(
    /// A replication group or technology; two storages sharing one can replicate to each other.
    ReplicationTag
);

/// A storage resource that can hold a VM disk and, if replication-capable, mirror it to a peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageResource {
    /// Unique name.
    pub name: StorageName,
    /// Total capacity.
    pub capacity_gib: u64,
    /// Capacity not yet allocated; at most `capacity_gib`.
    pub free_gib: u64,
    /// Replication groups/technologies this storage takes part in. Empty means the
    /// storage is not replication-capable and can never be half of a redundant pair.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub replication: BTreeSet<ReplicationTag>,
    /// Storages this one is explicitly set up to replicate with, whatever their tags
    /// (a pairing declared by the operator counts from either side).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub peers: BTreeSet<StorageName>,
    /// Where this storage can fail together with others.
    pub failure_domain: FailureDomain,
}

impl StorageResource {
    /// Whether the storage can be half of a redundant pair at all.
    pub fn replication_capable(&self) -> bool {
        !self.replication.is_empty()
    }

    /// Whether `self` and `other` can be paired in a redundant configuration, failure
    /// domains aside: both replication-capable, and a shared tag or an explicit peering.
    pub fn pairable_with(&self, other: &StorageResource) -> bool {
        self.name != other.name
            && self.replication_capable()
            && other.replication_capable()
            && (self
                .replication
                .intersection(&other.replication)
                .next()
                .is_some()
                || self.peers.contains(&other.name)
                || other.peers.contains(&self.name))
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A server resource that can run the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerResource {
    /// Unique name.
    pub name: ServerName,
    /// Total vCPUs.
    pub cpus: u32,
    /// vCPUs not yet allocated; at most `cpus`.
    pub free_cpus: u32,
    /// Total memory.
    pub memory_mib: u64,
    /// Memory not yet allocated; at most `memory_mib`.
    pub free_memory_mib: u64,
    /// Whether the server's agent is alive (absent means yes).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub live: bool,
    /// A server in maintenance takes no new VMs.
    #[serde(default, skip_serializing_if = "is_false")]
    pub in_maintenance: bool,
    /// Optional failure domain; primary and standby prefer different ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_domain: Option<FailureDomain>,
}

impl ServerResource {
    /// Whether the server may take new VMs at all (capacity aside).
    pub fn eligible(&self) -> bool {
        self.live && !self.in_maintenance
    }

    /// Whether the server may take this request now.
    pub fn fits(&self, req: &Request) -> bool {
        self.eligible() && self.free_cpus >= req.vcpus && self.free_memory_mib >= req.memory_mib
    }
}

/// Everything the planner knows: storages, servers, and who reaches what.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// Storage resources.
    #[serde(default)]
    pub storage: Vec<StorageResource>,
    /// Server resources.
    #[serde(default)]
    pub servers: Vec<ServerResource>,
    /// Server name -> the storages it can connect to. A server absent here reaches nothing.
    #[serde(default)]
    pub connectivity: BTreeMap<ServerName, Vec<StorageName>>,
}

/// A VM to place redundantly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Disk size, allocated on both storages of the pair.
    pub disk_gib: u64,
    /// vCPUs, reserved on both the primary and the standby server.
    pub vcpus: u32,
    /// Memory, reserved on both the primary and the standby server.
    pub memory_mib: u64,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "disk {} GiB, {} vCPU, {} MiB",
            self.disk_gib, self.vcpus, self.memory_mib
        )
    }
}

/// One half of a redundant placement: a server and the storage it runs the VM from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Replica {
    /// The server.
    pub server: ServerName,
    /// The storage holding this replica of the disk; `server` can reach it.
    pub storage: StorageName,
}

impl fmt::Display for Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}", self.server, self.storage)
    }
}

/// A redundant placement: the VM runs on `primary`; its disk is replicated to
/// `standby.storage`, and `standby.server` is reserved to restart it there.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Placement {
    /// Where the VM runs.
    pub primary: Replica,
    /// Where it restarts if the primary server fails.
    pub standby: Replica,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "primary {}, standby {}", self.primary, self.standby)
    }
}

/// What is wrong at one path of an inventory.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// A required field is absent.
    #[error("missing")]
    Missing,
    /// A field nobody reads; likely a typo.
    #[error("unknown field")]
    UnknownField,
    /// The value has the wrong YAML/JSON type.
    #[error("expected {expected}, found {found}")]
    WrongType {
        /// What was expected.
        expected: &'static str,
        /// What was there.
        found: &'static str,
    },
    /// A number does not fit.
    #[error("{value} is out of range for {expected}")]
    OutOfRange {
        /// The offending number as written.
        value: String,
        /// The type it must fit.
        expected: &'static str,
    },
    /// An empty name.
    #[error("empty")]
    Empty,
    /// A name used twice.
    #[error("duplicate of {first}")]
    Duplicate {
        /// Path of the first use.
        first: String,
    },
    /// A reference to something not declared.
    #[error("unknown {kind} {name:?}")]
    UnknownName {
        /// `storage` or `server`.
        kind: &'static str,
        /// The name referred to.
        name: String,
    },
    /// A free amount larger than the total.
    #[error("{free} exceeds {total_field} {total}")]
    FreeExceedsTotal {
        /// The free amount.
        free: u64,
        /// The field holding the total.
        total_field: &'static str,
        /// The total.
        total: u64,
    },
    /// A storage that lists itself as its own peer.
    #[error("a storage cannot peer with itself")]
    SelfPeer,
    /// Peers declared on a storage without any replication tag.
    #[error("peers given but the storage has no replication tag")]
    PeersWithoutReplication,
}

/// One problem at one path, e.g. `storage[3].failure_domain: missing`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct FieldError {
    /// Where, e.g. `servers[2].free_cpus` or `connectivity.host-a[1]`.
    pub path: String,
    /// What.
    pub problem: Problem,
}

/// Every problem found in an inventory, in document order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InventoryError {
    /// The problems; never empty.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for InventoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "invalid inventory ({n} problem{})",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for InventoryError {}

impl Inventory {
    /// Checks what the types cannot: unique names, free <= total, references to
    /// declared storages and servers. Reports every problem, not just the first.
    pub fn validate(&self) -> Result<(), InventoryError> {
        let mut errors = Vec::new();
        let mut err = |path: String, problem: Problem| errors.push(FieldError { path, problem });

        let mut storages: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, s) in self.storage.iter().enumerate() {
            if s.name.0.is_empty() {
                err(format!("storage[{i}].name"), Problem::Empty);
            } else if let Some(first) = storages.get(s.name.as_str()) {
                let first = format!("storage[{first}].name");
                err(format!("storage[{i}].name"), Problem::Duplicate { first });
            } else {
                storages.insert(s.name.as_str(), i);
            }
        }
        for (i, s) in self.storage.iter().enumerate() {
            if s.free_gib > s.capacity_gib {
                err(
                    format!("storage[{i}].free_gib"),
                    Problem::FreeExceedsTotal {
                        free: s.free_gib,
                        total_field: "capacity_gib",
                        total: s.capacity_gib,
                    },
                );
            }
            if s.failure_domain.0.is_empty() {
                err(format!("storage[{i}].failure_domain"), Problem::Empty);
            }
            if s.replication.iter().any(|t| t.0.is_empty()) {
                err(format!("storage[{i}].replication"), Problem::Empty);
            }
            if !s.peers.is_empty() && !s.replication_capable() {
                err(
                    format!("storage[{i}].peers"),
                    Problem::PeersWithoutReplication,
                );
            }
            for p in &s.peers {
                if *p == s.name {
                    err(format!("storage[{i}].peers"), Problem::SelfPeer);
                } else if !storages.contains_key(p.as_str()) {
                    let name = p.0.clone();
                    err(
                        format!("storage[{i}].peers"),
                        Problem::UnknownName {
                            kind: "storage",
                            name,
                        },
                    );
                }
            }
        }

        let mut servers: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, s) in self.servers.iter().enumerate() {
            if s.name.0.is_empty() {
                err(format!("servers[{i}].name"), Problem::Empty);
            } else if let Some(first) = servers.get(s.name.as_str()) {
                let first = format!("servers[{first}].name");
                err(format!("servers[{i}].name"), Problem::Duplicate { first });
            } else {
                servers.insert(s.name.as_str(), i);
            }
            if s.free_cpus > s.cpus {
                err(
                    format!("servers[{i}].free_cpus"),
                    Problem::FreeExceedsTotal {
                        free: u64::from(s.free_cpus),
                        total_field: "cpus",
                        total: u64::from(s.cpus),
                    },
                );
            }
            if s.free_memory_mib > s.memory_mib {
                err(
                    format!("servers[{i}].free_memory_mib"),
                    Problem::FreeExceedsTotal {
                        free: s.free_memory_mib,
                        total_field: "memory_mib",
                        total: s.memory_mib,
                    },
                );
            }
            if s.failure_domain.as_ref().is_some_and(|d| d.0.is_empty()) {
                err(format!("servers[{i}].failure_domain"), Problem::Empty);
            }
        }

        for (server, reach) in &self.connectivity {
            if !servers.contains_key(server.as_str()) {
                let name = server.0.clone();
                err(
                    format!("connectivity.{server}"),
                    Problem::UnknownName {
                        kind: "server",
                        name,
                    },
                );
            }
            let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
            for (k, st) in reach.iter().enumerate() {
                if !storages.contains_key(st.as_str()) {
                    let name = st.0.clone();
                    err(
                        format!("connectivity.{server}[{k}]"),
                        Problem::UnknownName {
                            kind: "storage",
                            name,
                        },
                    );
                } else if let Some(first) = seen.get(st.as_str()) {
                    let first = format!("connectivity.{server}[{first}]");
                    err(
                        format!("connectivity.{server}[{k}]"),
                        Problem::Duplicate { first },
                    );
                } else {
                    seen.insert(st.as_str(), k);
                }
            }
        }

        if errors.is_empty() {
            Ok(())
        } else {
            Err(InventoryError { errors })
        }
    }

    /// Whether `server` can reach `storage` according to the connectivity table.
    pub fn reaches(&self, server: &ServerName, storage: &StorageName) -> bool {
        self.connectivity
            .get(server)
            .is_some_and(|list| list.contains(storage))
    }
}
