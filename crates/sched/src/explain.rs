//! Why a request could not be placed, for the best candidates: as data (what
//! `POST /v1/placements:explain` returns) and as text (what the CLI prints).
//!
//! The explanation is computed only on refusal. It ranks storages by how few
//! constraints they fail, then by free capacity, and evaluates the pairs among the
//! best [`EXPLAIN_STORAGES`] of them, so it stays bounded on large inventories.

use std::cmp::Reverse;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{FailureDomain, Request, ServerName, StorageName};
use crate::plan::Planner;

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

impl Planner {
    /// What stands in the way of placing `req`, for the best candidates.
    /// [`Planner::place`] returns this on refusal; callable on its own for a dry run.
    pub fn explain(&self, req: &Request) -> Explanation {
        let n = self.storages.len();
        let per_storage: Vec<Vec<Reason>> =
            (0..n).map(|st| self.storage_reasons(st, req)).collect();

        let mut counts = [0usize; 5];
        for reasons in &per_storage {
            match reasons.first() {
                None => counts[0] += 1,
                Some(Reason::NotReplicationCapable { .. }) => counts[1] += 1,
                Some(Reason::InsufficientStorage { .. }) => counts[2] += 1,
                Some(Reason::NoServerReaches { .. } | Reason::NoLiveServerReaches { .. }) => {
                    counts[3] += 1
                }
                Some(_) => counts[4] += 1,
            }
        }

        // Best storages: fewest failed constraints, then most free, then name.
        let mut ranked: Vec<usize> = (0..n).collect();
        ranked.sort_by_key(|&st| {
            (
                per_storage[st].len(),
                Reverse(self.storages[st].free_gib),
                st,
            )
        });
        ranked.truncate(EXPLAIN_STORAGES);

        // (constraints failed, smaller free capacity, a, b, reasons): sorts best first.
        type Pair = (usize, Reverse<u64>, usize, usize, Vec<Reason>);
        let mut pairs: Vec<Pair> = Vec::new();
        for (i, &x) in ranked.iter().enumerate() {
            for &y in &ranked[i + 1..] {
                // The storage with more free space first, as in a placement.
                let (a, b) = if (Reverse(self.storages[x].free_gib), x)
                    <= (Reverse(self.storages[y].free_gib), y)
                {
                    (x, y)
                } else {
                    (y, x)
                };
                let reasons = self.pair_reasons(a, b, &per_storage, req);
                let score = Reverse(self.storages[b].free_gib);
                pairs.push((reasons.len(), score, a, b, reasons));
            }
        }
        // A pair failing nothing exists only in a dry run; it is no candidate for blame.
        pairs.retain(|p| !p.4.is_empty());
        pairs.sort_by_key(|p| (p.0, p.1, p.2, p.3));
        pairs.truncate(EXPLAIN_PAIRS);

        let mut candidates = Vec::new();
        let mut server_reports_for: Vec<usize> = Vec::new();
        for (_, _, a, b, reasons) in &pairs {
            for st in [*a, *b] {
                let servers_at_fault = reasons.iter().any(|r| {
                    matches!(r,
                        Reason::NoLiveServerReaches { storage, .. } | Reason::NoServerFits { storage, .. }
                            if *storage == self.storages[st].name)
                }) || reasons
                    .iter()
                    .any(|r| matches!(r, Reason::NoDistinctServers { .. }));
                if servers_at_fault && !server_reports_for.contains(&st) {
                    server_reports_for.push(st);
                }
            }
            candidates.push(CandidateReport {
                storage_pair: Some([
                    self.storages[*a].name.clone(),
                    self.storages[*b].name.clone(),
                ]),
                storage: None,
                server: None,
                reasons: reasons.clone(),
            });
        }
        if pairs.is_empty() {
            // Fewer than two storages: report the storages themselves.
            for &st in &ranked {
                if per_storage[st].is_empty() {
                    continue;
                }
                candidates.push(CandidateReport {
                    storage_pair: None,
                    storage: Some(self.storages[st].name.clone()),
                    server: None,
                    reasons: per_storage[st].clone(),
                });
            }
        }
        for st in server_reports_for {
            candidates.extend(self.server_reports(st, req));
        }

        // `place` calls this only on refusal; a direct call (a dry run) may find one.
        let verdict = if self.search(req).is_some() {
            "a redundant placement exists"
        } else {
            "no redundant placement"
        };
        let mut summary = format!(
            "{verdict} for {req}: {n} storage{}, {} server{}",
            plural(n),
            self.servers.len(),
            plural(self.servers.len())
        );
        if n < 2 {
            summary.push_str("; a redundant placement needs two storages");
        }
        let labels = [
            "usable alone",
            "not replication-capable",
            "too small",
            "reached by no live server",
            "without a server that fits",
        ];
        let parts: Vec<String> = counts
            .iter()
            .zip(labels)
            .filter(|(c, _)| **c > 0)
            .map(|(c, l)| format!("{c} {l}"))
            .collect();
        if !parts.is_empty() {
            summary.push_str(" (");
            summary.push_str(&parts.join(", "));
            summary.push(')');
        }
        if let Some((_, _, a, b, reasons)) = pairs.first() {
            let first = reasons.first().map(ToString::to_string).unwrap_or_default();
            summary.push_str(&format!(
                "; best candidate pair {} + {}: {first}",
                self.storages[*a].name, self.storages[*b].name
            ));
        }
        Explanation {
            request: *req,
            summary,
            candidates,
        }
    }

    fn storage_reasons(&self, st: usize, req: &Request) -> Vec<Reason> {
        let s = &self.storages[st];
        let mut reasons = Vec::new();
        if !s.replication_capable() {
            reasons.push(Reason::NotReplicationCapable {
                storage: s.name.clone(),
            });
        }
        if s.free_gib < req.disk_gib {
            reasons.push(Reason::InsufficientStorage {
                storage: s.name.clone(),
                need_gib: req.disk_gib,
                free_gib: s.free_gib,
            });
        }
        let reach = &self.reach[st];
        if reach.is_empty() {
            reasons.push(Reason::NoServerReaches {
                storage: s.name.clone(),
            });
        } else {
            let servers = reach.iter().map(|&sv| &self.servers[sv as usize]);
            let live = servers.clone().filter(|sv| sv.eligible()).count();
            if live == 0 {
                reasons.push(Reason::NoLiveServerReaches {
                    storage: s.name.clone(),
                    down: servers.clone().filter(|sv| !sv.live).count(),
                    in_maintenance: servers.filter(|sv| sv.live && sv.in_maintenance).count(),
                });
            } else if self
                .best_fit(crate::plan::ix(st), req, None, None)
                .is_none()
            {
                reasons.push(Reason::NoServerFits {
                    storage: s.name.clone(),
                    live,
                });
            }
        }
        reasons
    }

    fn pair_reasons(
        &self,
        a: usize,
        b: usize,
        per_storage: &[Vec<Reason>],
        req: &Request,
    ) -> Vec<Reason> {
        let (sa, sb) = (&self.storages[a], &self.storages[b]);
        let mut reasons: Vec<Reason> = per_storage[a]
            .iter()
            .chain(&per_storage[b])
            .cloned()
            .collect();
        if sa.replication_capable() && sb.replication_capable() && !sa.pairable_with(sb) {
            reasons.push(Reason::NotPairable {
                a: sa.name.clone(),
                b: sb.name.clone(),
            });
        }
        if sa.failure_domain == sb.failure_domain {
            reasons.push(Reason::SameFailureDomain {
                domain: sa.failure_domain.clone(),
            });
        }
        if per_storage[a].is_empty() && per_storage[b].is_empty() {
            let (a32, b32) = (crate::plan::ix(a), crate::plan::ix(b));
            if self.assign_servers(a32, b32, req).is_none() {
                if let Some(sv) = self.best_fit(a32, req, None, None) {
                    reasons.push(Reason::NoDistinctServers {
                        server: self.servers[sv as usize].name.clone(),
                    });
                }
            }
        }
        reasons
    }

    /// Reports for the servers reaching `st` that came closest to fitting.
    fn server_reports(&self, st: usize, req: &Request) -> Vec<CandidateReport> {
        let mut reports: Vec<(usize, Reverse<u64>, u32, Vec<Reason>)> = self.reach[st]
            .iter()
            .map(|&sv| {
                let s = &self.servers[sv as usize];
                let mut reasons = Vec::new();
                if !s.live {
                    reasons.push(Reason::ServerDown {
                        server: s.name.clone(),
                    });
                }
                if s.in_maintenance {
                    reasons.push(Reason::ServerInMaintenance {
                        server: s.name.clone(),
                    });
                }
                if s.free_cpus < req.vcpus {
                    reasons.push(Reason::InsufficientCpu {
                        server: s.name.clone(),
                        need: req.vcpus,
                        free: s.free_cpus,
                    });
                }
                if s.free_memory_mib < req.memory_mib {
                    reasons.push(Reason::InsufficientMemory {
                        server: s.name.clone(),
                        need_mib: req.memory_mib,
                        free_mib: s.free_memory_mib,
                    });
                }
                (reasons.len(), Reverse(s.free_memory_mib), sv, reasons)
            })
            .filter(|r| !r.3.is_empty())
            .collect();
        reports.sort_by_key(|p| (p.0, p.1, p.2));
        reports
            .into_iter()
            .take(EXPLAIN_SERVERS)
            .map(|(_, _, sv, reasons)| CandidateReport {
                storage_pair: None,
                storage: Some(self.storages[st].name.clone()),
                server: Some(self.servers[sv as usize].name.clone()),
                reasons,
            })
            .collect()
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
