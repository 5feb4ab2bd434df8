//! Computing an [`Explanation`]: the candidates the planner's indexes rank best, and
//! every constraint each of them fails. Apart from the report types (`explain`) so that
//! the planner and the report do not depend on each other.

use std::cmp::Reverse;

use crate::explain::{
    plural, CandidateReport, Explanation, Reason, EXPLAIN_PAIRS, EXPLAIN_SERVERS, EXPLAIN_STORAGES,
};
use crate::model::Request;
use crate::plan::Planner;

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
