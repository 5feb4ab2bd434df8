//! Why a request could not be placed, for the best candidates: as data (what
//! `POST /v1/placements:explain` returns) and as text (what the CLI prints).
//!
//! The explanation is computed only on refusal. It ranks storages by how few
//! constraints they fail, then by free capacity, and evaluates the pairs among the
//! best [`EXPLAIN_STORAGES`] of them, so it stays bounded on large inventories.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{FailureDomain, Request, ServerName, StorageName};

/// Storages considered for candidate pairs in an explanation.
pub const EXPLAIN_STORAGES: usize = 16;
/// Candidate pairs reported.
pub const EXPLAIN_PAIRS: usize = 5;
/// Servers reported per storage whose servers are the problem.
pub const EXPLAIN_SERVERS: usize = 3;

/// One failed constraint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reason {
    /// The storage has no replication group at all.
    NotReplicationCapable {
        /// The storage.
        storage: StorageName,
    },
    /// Both can replicate, but not with each other.
    NotPairable {
        /// One storage.
        a: StorageName,
        /// The other.
        b: StorageName,
    },
    /// Both storages would fail together.
    SameFailureDomain {
        /// Their common domain.
        domain: FailureDomain,
    },
    /// Not enough free capacity for the disk.
    InsufficientStorage {
        /// The storage.
        storage: StorageName,
        /// The disk size.
        need_gib: u64,
        /// Its free capacity.
        free_gib: u64,
    },
    /// The connectivity table connects no server to this storage.
    NoServerReaches {
        /// The storage.
        storage: StorageName,
    },
    /// Servers reach the storage, but each is down or in maintenance.
    NoLiveServerReaches {
        /// The storage.
        storage: StorageName,
        /// Reaching servers that are down.
        down: usize,
        /// Reaching servers (live) in maintenance.
        in_maintenance: usize,
    },
    /// Live servers reach the storage, but none has the vCPUs and memory free.
    NoServerFits {
        /// The storage.
        storage: StorageName,
        /// Live servers reaching it, none of which fits.
        live: usize,
    },
    /// Both storages are served by one and the same single server, and primary and
    /// standby must be distinct.
    NoDistinctServers {
        /// The only server that fits for both.
        server: ServerName,
    },
    /// The server's agent is not alive.
    ServerDown {
        /// The server.
        server: ServerName,
    },
    /// The server is in maintenance and takes no new VMs.
    ServerInMaintenance {
        /// The server.
        server: ServerName,
    },
    /// Too few free vCPUs.
    InsufficientCpu {
        /// The server.
        server: ServerName,
        /// vCPUs requested.
        need: u32,
        /// vCPUs free.
        free: u32,
    },
    /// Too little free memory.
    InsufficientMemory {
        /// The server.
        server: ServerName,
        /// Memory requested.
        need_mib: u64,
        /// Memory free.
        free_mib: u64,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NotReplicationCapable { storage } => {
                write!(f, "{storage} is not replication-capable")
            }
            Reason::NotPairable { a, b } => {
                write!(f, "{a} and {b} share no replication group and are not peers")
            }
            Reason::SameFailureDomain { domain } => {
                write!(f, "both are in failure domain {domain}")
            }
            Reason::InsufficientStorage {
                storage,
                need_gib,
                free_gib,
            } => write!(f, "{storage} has {free_gib} GiB free, {need_gib} GiB needed"),
            Reason::NoServerReaches { storage } => {
                write!(f, "no server is connected to {storage}")
            }
            Reason::NoLiveServerReaches {
                storage,
                down,
                in_maintenance,
            } => write!(
                f,
                "no live server reaches {storage} ({down} down, {in_maintenance} in maintenance)"
            ),
            Reason::NoServerFits { storage, live } => write!(
                f,
                "none of the {live} live servers reaching {storage} has the vCPUs and memory free"
            ),
            Reason::NoDistinctServers { server } => write!(
                f,
                "{server} is the only server that fits for both storages, and primary and standby must differ"
            ),
            Reason::ServerDown { server } => write!(f, "{server} is down"),
            Reason::ServerInMaintenance { server } => write!(f, "{server} is in maintenance"),
            Reason::InsufficientCpu { server, need, free } => {
                write!(f, "{server} has {free} vCPU free, {need} needed")
            }
            Reason::InsufficientMemory {
                server,
                need_mib,
                free_mib,
            } => write!(f, "{server} has {free_mib} MiB free, {need_mib} MiB needed"),
        }
    }
}

/// What failed for one candidate: a storage pair, a single storage, or a server
/// reaching a storage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateReport {
    /// The candidate pair, larger free capacity first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_pair: Option<[StorageName; 2]>,
    /// The storage, for a single-storage or a server report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageName>,
    /// The server, for a server report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerName>,
    /// Every constraint it fails; never empty.
    pub reasons: Vec<Reason>,
}

/// A refusal that says why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// The request refused.
    pub request: Request,
    /// One paragraph for humans.
    pub summary: String,
    /// The best candidates and what each fails, best first.
    pub candidates: Vec<CandidateReport>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary)?;
        for c in &self.candidates {
            let reasons = c
                .reasons
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            match (&c.storage_pair, &c.storage, &c.server) {
                (Some([a, b]), _, _) => write!(f, "\n  pair {a} + {b}: {reasons}")?,
                (None, Some(st), Some(sv)) => write!(f, "\n    server {sv} (for {st}): {reasons}")?,
                (None, Some(st), None) => write!(f, "\n  storage {st}: {reasons}")?,
                _ => write!(f, "\n  {reasons}")?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for Explanation {}

pub(crate) fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
