//! The indexed planner: redundant storage pair first, then a connectable server for
//! each half, the two servers paired as primary and standby.
//!
//! The search never enumerates pairs. Storages are walked once in descending free
//! capacity; for each storage `b` the best partner among the storages already walked
//! is found in O(tags + peers) from a per-replication-tag record of the two earliest
//! storages in *different* failure domains. The first `b` with a partner therefore
//! maximises the pair's smaller free capacity (the balance objective), and the walk
//! usually stops after a few storages. Servers are found through a per-storage set
//! of eligible servers ordered by free memory then free vCPUs.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

use crate::explain::Explanation;
use crate::model::{
    Inventory, InventoryError, Placement, Replica, Request, ServerName, ServerResource,
    StorageName, StorageResource,
};

/// Servers looked at, beyond the best-fitting one, when looking for a standby in a
/// failure domain other than the primary's. Bounds a decision's cost on storages
/// reached by thousands of servers all in one domain.
const DOMAIN_SCAN: usize = 64;

/// Per-storage key of an eligible server: most free memory first, then most free
/// vCPUs, then name order (indices follow names), so that choices are deterministic.
type ServerKey = (Reverse<u64>, Reverse<u32>, u32);

const UNSEEN: u32 = u32::MAX;

/// Why [`Planner::commit`] refused a placement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// The placement names a storage the planner does not know.
    #[error("unknown storage {0}")]
    UnknownStorage(StorageName),
    /// The placement names a server the planner does not know.
    #[error("unknown server {0}")]
    UnknownServer(ServerName),
    /// Primary and standby must be distinct servers on distinct storages.
    #[error("primary and standby share {0}")]
    NotRedundant(String),
    /// The server does not reach the storage it was given.
    #[error("server {server} cannot reach storage {storage}")]
    NotConnected {
        /// The server.
        server: ServerName,
        /// The storage.
        storage: StorageName,
    },
    /// Capacity changed since the placement was planned.
    #[error("{0} no longer has room for the request")]
    NoRoom(String),
}

/// The planner's indexed view of an [`Inventory`]. Build it once per inventory
/// snapshot; [`Planner::place`] is then cheap, and [`Planner::commit`] keeps the
/// indexes current when placements are applied one after another.
#[derive(Debug, Clone)]
pub struct Planner {
    /// Sorted by name: an index order that is also the tie-break order.
    pub(crate) storages: Vec<StorageResource>,
    pub(crate) servers: Vec<ServerResource>,
    storage_ix: HashMap<StorageName, u32>,
    server_ix: HashMap<ServerName, u32>,
    /// Interned failure domains (storages and servers share one namespace).
    pub(crate) st_domain: Vec<u32>,
    sv_domain: Vec<Option<u32>>,
    /// Interned replication tags per storage.
    st_tags: Vec<Vec<u32>>,
    n_tags: usize,
    /// Declared peerings, made symmetric.
    st_peers: Vec<Vec<u32>>,
    /// Storage -> every server reaching it (eligible or not), in index order.
    pub(crate) reach: Vec<Vec<u32>>,
    /// Server -> storages it reaches.
    server_reach: Vec<Vec<u32>>,
    /// Storages by free capacity, largest first.
    by_free: BTreeSet<(Reverse<u64>, u32)>,
    /// Storage -> eligible (live, not in maintenance) servers reaching it.
    fit: Vec<BTreeSet<ServerKey>>,
}

pub(crate) fn ix(i: usize) -> u32 {
    u32::try_from(i).expect("inventories hold fewer than 2^32 items")
}

/// The two earliest-walked storages of one tag that lie in different failure domains.
#[derive(Clone, Copy, Default)]
struct Top2 {
    first: Option<(u32, u32, u32)>, // (walk position, storage, domain)
    alt: Option<(u32, u32)>,        // (walk position, storage), domain != first's
}

impl Top2 {
    fn push(&mut self, pos: u32, st: u32, dom: u32) {
        match self.first {
            None => self.first = Some((pos, st, dom)),
            Some((_, _, d)) if self.alt.is_none() && d != dom => self.alt = Some((pos, st)),
            Some(_) => {}
        }
    }

    /// The earliest walked storage of this tag outside domain `dom`.
    fn other_than(&self, dom: u32) -> Option<(u32, u32)> {
        let (pos, st, d) = self.first?;
        if d != dom {
            Some((pos, st))
        } else {
            self.alt
        }
    }
}

impl Planner {
    /// Validates the inventory and builds the indexes (O(n log n) in servers,
    /// storages and connectivity entries).
    pub fn new(inv: &Inventory) -> Result<Planner, InventoryError> {
        inv.validate()?;
        let mut storages = inv.storage.clone();
        storages.sort_by(|a, b| a.name.cmp(&b.name));
        let mut servers = inv.servers.clone();
        servers.sort_by(|a, b| a.name.cmp(&b.name));
        let storage_ix: HashMap<StorageName, u32> = storages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), ix(i)))
            .collect();
        let server_ix: HashMap<ServerName, u32> = servers
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), ix(i)))
            .collect();

        let mut domains: HashMap<String, u32> = HashMap::new();
        let mut intern = |d: &str| {
            let next = ix(domains.len());
            *domains.entry(d.to_owned()).or_insert(next)
        };
        let st_domain: Vec<u32> = storages
            .iter()
            .map(|s| intern(s.failure_domain.as_str()))
            .collect();
        let sv_domain: Vec<Option<u32>> = servers
            .iter()
            .map(|s| s.failure_domain.as_ref().map(|d| intern(d.as_str())))
            .collect();

        let mut tags: HashMap<&str, u32> = HashMap::new();
        let st_tags: Vec<Vec<u32>> = storages
            .iter()
            .map(|s| {
                s.replication
                    .iter()
                    .map(|t| {
                        let next = ix(tags.len());
                        *tags.entry(t.as_str()).or_insert(next)
                    })
                    .collect()
            })
            .collect();

        let mut st_peers: Vec<Vec<u32>> = vec![Vec::new(); storages.len()];
        for (i, s) in storages.iter().enumerate() {
            for p in &s.peers {
                // validate() guarantees the peer exists.
                if let Some(&j) = storage_ix.get(p) {
                    st_peers[i].push(j);
                    st_peers[j as usize].push(ix(i));
                }
            }
        }
        for p in &mut st_peers {
            p.sort_unstable();
            p.dedup();
        }

        let mut reach: Vec<Vec<u32>> = vec![Vec::new(); storages.len()];
        let mut server_reach: Vec<Vec<u32>> = vec![Vec::new(); servers.len()];
        for (server, list) in &inv.connectivity {
            let Some(&sv) = server_ix.get(server) else {
                continue;
            };
            for st in list {
                if let Some(&st) = storage_ix.get(st) {
                    reach[st as usize].push(sv);
                    server_reach[sv as usize].push(st);
                }
            }
        }
        for r in reach.iter_mut().chain(server_reach.iter_mut()) {
            r.sort_unstable();
            r.dedup();
        }

        let by_free = storages
            .iter()
            .enumerate()
            .map(|(i, s)| (Reverse(s.free_gib), ix(i)))
            .collect();
        let mut planner = Planner {
            n_tags: tags.len(),
            fit: vec![BTreeSet::new(); storages.len()],
            storages,
            servers,
            storage_ix,
            server_ix,
            st_domain,
            sv_domain,
            st_tags,
            st_peers,
            reach,
            server_reach,
            by_free,
        };
        for sv in 0..planner.servers.len() {
            planner.index_server(ix(sv));
        }
        Ok(planner)
    }

    fn server_key(&self, sv: u32) -> ServerKey {
        let s = &self.servers[sv as usize];
        (Reverse(s.free_memory_mib), Reverse(s.free_cpus), sv)
    }

    fn index_server(&mut self, sv: u32) {
        if !self.servers[sv as usize].eligible() {
            return;
        }
        let key = self.server_key(sv);
        for &st in &self.server_reach[sv as usize] {
            self.fit[st as usize].insert(key);
        }
    }

    fn unindex_server(&mut self, sv: u32) {
        let key = self.server_key(sv);
        for &st in &self.server_reach[sv as usize] {
            self.fit[st as usize].remove(&key);
        }
    }

    /// The storages, in name order, with their current free capacity.
    pub fn storages(&self) -> &[StorageResource] {
        &self.storages
    }

    /// The servers, in name order, with their current free capacity.
    pub fn servers(&self) -> &[ServerResource] {
        &self.servers
    }

    /// Chooses a redundant placement, or explains why there is none.
    ///
    /// Order: first the storage pair — both replication-capable with each
    /// other, distinct failure domains, both with `disk_gib` free — maximising the
    /// smaller of the two free capacities; then, for each storage, a live server not in
    /// maintenance that reaches it and has the vCPUs and memory free, the two servers
    /// distinct, the standby preferably in another failure domain than the primary.
    /// The storage with more free space carries the primary.
    ///
    /// ```
    /// let inv = sched::Inventory::from_yaml_str(r#"
    /// storage:
    ///   - { name: a, capacity_gib: 100, free_gib: 100, replication: [sync], failure_domain: r1 }
    ///   - { name: b, capacity_gib: 100, free_gib: 90, replication: [sync], failure_domain: r2 }
    /// servers:
    ///   - { name: h1, cpus: 8, free_cpus: 8, memory_mib: 8192, free_memory_mib: 8192 }
    ///   - { name: h2, cpus: 8, free_cpus: 8, memory_mib: 8192, free_memory_mib: 8192 }
    /// connectivity: { h1: [a], h2: [b] }
    /// "#).unwrap();
    /// let planner = sched::Planner::new(&inv).unwrap();
    /// let req = sched::Request { disk_gib: 10, vcpus: 2, memory_mib: 1024 };
    /// let p = planner.place(&req).unwrap();
    /// assert_eq!(p.to_string(), "primary h1 on a, standby h2 on b");
    /// ```
    pub fn place(&self, req: &Request) -> Result<Placement, Explanation> {
        match self.search(req) {
            Some((a, pa, b, sb)) => Ok(Placement {
                primary: self.replica(pa, a),
                standby: self.replica(sb, b),
            }),
            None => Err(self.explain(req)),
        }
    }

    fn replica(&self, sv: u32, st: u32) -> Replica {
        Replica {
            server: self.servers[sv as usize].name.clone(),
            storage: self.storages[st as usize].name.clone(),
        }
    }

    /// Returns (primary storage, primary server, standby storage, standby server).
    pub(crate) fn search(&self, req: &Request) -> Option<(u32, u32, u32, u32)> {
        let mut tops = vec![Top2::default(); self.n_tags];
        let mut pos_of: Vec<u32> = vec![UNSEEN; self.storages.len()];
        let mut walked: Vec<u32> = Vec::new();
        for &(Reverse(free), b) in &self.by_free {
            if free < req.disk_gib {
                break; // every later storage has even less
            }
            if self.st_tags[b as usize].is_empty() || self.best_fit(b, req, None, None).is_none() {
                continue;
            }
            let db = self.st_domain[b as usize];
            let mut best: Option<(u32, u32)> = None;
            for &t in &self.st_tags[b as usize] {
                if let Some(c) = tops[t as usize].other_than(db) {
                    best = Some(best.map_or(c, |b| b.min(c)));
                }
            }
            for &p in &self.st_peers[b as usize] {
                let pos = pos_of[p as usize];
                if pos != UNSEEN && self.st_domain[p as usize] != db {
                    let c = (pos, p);
                    best = Some(best.map_or(c, |b| b.min(c)));
                }
            }
            if let Some((_, a)) = best {
                if let Some((pa, sb)) = self.assign_servers(a, b, req) {
                    return Some((a, pa, b, sb));
                }
                // a and b can only be served by one and the same server; another
                // walked partner may have a different one. Rare, so a scan will do.
                for &a2 in &walked {
                    if a2 != a && self.compatible(a2, b) {
                        if let Some((pa, sb)) = self.assign_servers(a2, b, req) {
                            return Some((a2, pa, b, sb));
                        }
                    }
                }
            }
            let pos = ix(walked.len());
            walked.push(b);
            pos_of[b as usize] = pos;
            for &t in &self.st_tags[b as usize] {
                tops[t as usize].push(pos, b, db);
            }
        }
        None
    }

    /// Pairable and in different failure domains (capacity aside).
    pub(crate) fn compatible(&self, a: u32, b: u32) -> bool {
        self.st_domain[a as usize] != self.st_domain[b as usize]
            && self.storages[a as usize].pairable_with(&self.storages[b as usize])
    }

    /// Primary server for `a` and standby server for `b`, distinct.
    pub(crate) fn assign_servers(&self, a: u32, b: u32, req: &Request) -> Option<(u32, u32)> {
        let pa = self.best_fit(a, req, None, None)?;
        if let Some(sb) = self.best_fit(b, req, Some(pa), self.sv_domain[pa as usize]) {
            return Some((pa, sb));
        }
        // The best server of `a` is the only one fitting `b`: give it to `b`.
        let sb = self.best_fit(b, req, None, None)?;
        let pa = self.best_fit(a, req, Some(sb), self.sv_domain[sb as usize])?;
        Some((pa, sb))
    }

    /// The best-fitting eligible server reaching `st`, not `exclude`, preferably
    /// outside domain `avoid`.
    pub(crate) fn best_fit(
        &self,
        st: u32,
        req: &Request,
        exclude: Option<u32>,
        avoid: Option<u32>,
    ) -> Option<u32> {
        let mut first = None;
        let mut scanned = 0;
        for &(Reverse(mem), Reverse(cpus), sv) in &self.fit[st as usize] {
            if mem < req.memory_mib {
                break; // ordered by memory: nobody further has enough
            }
            if cpus < req.vcpus || Some(sv) == exclude {
                continue;
            }
            let Some(avoid) = avoid else { return Some(sv) };
            let dom = self.sv_domain[sv as usize];
            if dom.is_some() && dom != Some(avoid) {
                return Some(sv);
            }
            first = first.or(Some(sv));
            scanned += 1;
            if scanned > DOMAIN_SCAN {
                break;
            }
        }
        first
    }

    /// Applies a placement: the disk is allocated on both storages, the vCPUs and
    /// memory on both servers (the standby is a reservation, so that a takeover always
    /// finds room). Checks the placement against the current state first.
    pub fn commit(&mut self, p: &Placement, req: &Request) -> Result<(), CommitError> {
        let st = |name: &StorageName| {
            self.storage_ix
                .get(name)
                .copied()
                .ok_or_else(|| CommitError::UnknownStorage(name.clone()))
        };
        let (a, b) = (st(&p.primary.storage)?, st(&p.standby.storage)?);
        let sv = |name: &ServerName| {
            self.server_ix
                .get(name)
                .copied()
                .ok_or_else(|| CommitError::UnknownServer(name.clone()))
        };
        let (pa, sb) = (sv(&p.primary.server)?, sv(&p.standby.server)?);
        if a == b {
            return Err(CommitError::NotRedundant(format!(
                "storage {}",
                p.primary.storage
            )));
        }
        if pa == sb {
            return Err(CommitError::NotRedundant(format!(
                "server {}",
                p.primary.server
            )));
        }
        for (sv, st, r) in [(pa, a, &p.primary), (sb, b, &p.standby)] {
            if self.reach[st as usize].binary_search(&sv).is_err() {
                return Err(CommitError::NotConnected {
                    server: r.server.clone(),
                    storage: r.storage.clone(),
                });
            }
            if self.storages[st as usize].free_gib < req.disk_gib {
                return Err(CommitError::NoRoom(format!("storage {}", r.storage)));
            }
            if !self.servers[sv as usize].fits(req) {
                return Err(CommitError::NoRoom(format!("server {}", r.server)));
            }
        }
        for st in [a, b] {
            let s = &mut self.storages[st as usize];
            self.by_free.remove(&(Reverse(s.free_gib), st));
            s.free_gib -= req.disk_gib;
            self.by_free.insert((Reverse(s.free_gib), st));
        }
        for sv in [pa, sb] {
            self.unindex_server(sv);
            let s = &mut self.servers[sv as usize];
            s.free_cpus -= req.vcpus;
            s.free_memory_mib -= req.memory_mib;
            self.index_server(sv);
        }
        Ok(())
    }
}
