//! The naive baseline the indexed planner is measured and checked against: it
//! enumerates every storage pair and, for each valid one, every server pair.
//!
//! It optimises the same objective as [`crate::Planner::place`] (the pair's smaller
//! free capacity), so tests can check the planner finds a placement whenever this
//! does, with the same storage score. It is far too slow for real inventories; the
//! benchmark runs it under a time budget and extrapolates.

use crate::model::{
    Inventory, InventoryError, Placement, Replica, Request, ServerResource, StorageResource,
};

/// Which server pairs the baseline enumerates for each valid storage pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BruteMode {
    /// Every server × every server, checking connectivity for each (the literal
    /// brute force: storage pairs × server pairs).
    AllServerPairs,
    /// Only servers listed as reaching each storage (a naive search that at least
    /// reads the connectivity table by storage).
    ConnectedServerPairs,
}

/// How a bounded run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BruteOutcome {
    /// The search completed.
    Done {
        /// Its answer.
        placement: Option<Placement>,
        /// Combinations examined.
        ops: u64,
    },
    /// The budget callback stopped it.
    Stopped {
        /// Combinations examined before stopping.
        ops: u64,
    },
}

/// The inventory as flat tables, without any index beyond a reachability matrix.
#[derive(Debug, Clone)]
pub struct BruteForce {
    storages: Vec<StorageResource>,
    servers: Vec<ServerResource>,
    /// `reach[sv * storages + st]`.
    reach: Vec<bool>,
    /// Storage -> servers listed as reaching it.
    reach_lists: Vec<Vec<usize>>,
}

impl BruteForce {
    /// Validates and flattens the inventory (storages and servers in name order).
    pub fn new(inv: &Inventory) -> Result<BruteForce, InventoryError> {
        inv.validate()?;
        let mut storages = inv.storage.clone();
        storages.sort_by(|a, b| a.name.cmp(&b.name));
        let mut servers = inv.servers.clone();
        servers.sort_by(|a, b| a.name.cmp(&b.name));
        let ns = storages.len();
        let mut reach = vec![false; servers.len() * ns];
        let mut reach_lists = vec![Vec::new(); ns];
        for (sv, server) in servers.iter().enumerate() {
            for (st, storage) in storages.iter().enumerate() {
                if inv.reaches(&server.name, &storage.name) {
                    reach[sv * ns + st] = true;
                    reach_lists[st].push(sv);
                }
            }
        }
        Ok(BruteForce {
            storages,
            servers,
            reach,
            reach_lists,
        })
    }

    fn valid_pair(&self, a: &StorageResource, b: &StorageResource, req: &Request) -> bool {
        a.pairable_with(b)
            && a.failure_domain != b.failure_domain
            && a.free_gib >= req.disk_gib
            && b.free_gib >= req.disk_gib
    }

    /// Runs the search to the end.
    pub fn place(&self, req: &Request, mode: BruteMode) -> Option<Placement> {
        match self.place_bounded(req, mode, &mut |_| true) {
            BruteOutcome::Done { placement, .. } => placement,
            BruteOutcome::Stopped { .. } => None, // unreachable: the callback never stops
        }
    }

    /// Runs the search, asking `keep_going(ops_so_far)` after each storage pair.
    pub fn place_bounded(
        &self,
        req: &Request,
        mode: BruteMode,
        keep_going: &mut dyn FnMut(u64) -> bool,
    ) -> BruteOutcome {
        let fits: Vec<bool> = self.servers.iter().map(|s| s.fits(req)).collect();
        let ns = self.storages.len();
        let all: Vec<usize> = (0..self.servers.len()).collect();
        let mut ops = 0u64;
        // ((storage score, server score), storage i, server 1, storage j, server 2).
        type Best = ((u64, u64), usize, usize, usize, usize);
        let mut best: Option<Best> = None;
        for i in 0..ns {
            for j in i + 1..ns {
                ops += 1;
                let (a, b) = (&self.storages[i], &self.storages[j]);
                if !self.valid_pair(a, b, req) {
                    continue;
                }
                let (li, lj) = match mode {
                    BruteMode::AllServerPairs => (&all, &all),
                    BruteMode::ConnectedServerPairs => (&self.reach_lists[i], &self.reach_lists[j]),
                };
                let score = a.free_gib.min(b.free_gib);
                for &s1 in li {
                    for &s2 in lj {
                        ops += 1;
                        if s1 == s2
                            || !fits[s1]
                            || !fits[s2]
                            || !self.reach[s1 * ns + i]
                            || !self.reach[s2 * ns + j]
                        {
                            continue;
                        }
                        let server_score = self.servers[s1]
                            .free_memory_mib
                            .min(self.servers[s2].free_memory_mib);
                        let key = (score, server_score);
                        if best.as_ref().is_none_or(|b| key > b.0) {
                            best = Some((key, i, s1, j, s2));
                        }
                    }
                }
                if !keep_going(ops) {
                    return BruteOutcome::Stopped { ops };
                }
            }
        }
        let placement = best.map(|(_, i, s1, j, s2)| {
            let ri = Replica {
                server: self.servers[s1].name.clone(),
                storage: self.storages[i].name.clone(),
            };
            let rj = Replica {
                server: self.servers[s2].name.clone(),
                storage: self.storages[j].name.clone(),
            };
            // The storage with more free space carries the primary, as in the planner.
            if self.storages[j].free_gib > self.storages[i].free_gib {
                Placement {
                    primary: rj,
                    standby: ri,
                }
            } else {
                Placement {
                    primary: ri,
                    standby: rj,
                }
            }
        });
        BruteOutcome::Done { placement, ops }
    }

    /// How many combinations a complete search examines, computed without doing it.
    pub fn cost(&self, req: &Request, mode: BruteMode) -> u64 {
        let ns = self.storages.len();
        let n = self.servers.len() as u64;
        let mut ops = 0u64;
        for i in 0..ns {
            for j in i + 1..ns {
                ops += 1;
                if self.valid_pair(&self.storages[i], &self.storages[j], req) {
                    ops += match mode {
                        BruteMode::AllServerPairs => n * n,
                        BruteMode::ConnectedServerPairs => {
                            (self.reach_lists[i].len() * self.reach_lists[j].len()) as u64
                        }
                    };
                }
            }
        }
        ops
    }

    /// Applies a placement by name lookups (no validation: baseline only).
    pub fn commit(&mut self, p: &Placement, req: &Request) {
        for r in [&p.primary, &p.standby] {
            if let Some(s) = self.storages.iter_mut().find(|s| s.name == r.storage) {
                s.free_gib = s.free_gib.saturating_sub(req.disk_gib);
            }
            if let Some(s) = self.servers.iter_mut().find(|s| s.name == r.server) {
                s.free_cpus = s.free_cpus.saturating_sub(req.vcpus);
                s.free_memory_mib = s.free_memory_mib.saturating_sub(req.memory_mib);
            }
        }
    }
}
