//! Seeded random clusters, and the placement benchmark: the indexed planner against
//! the naive baselines, side by side in one process, on the same requests.
//!
//! The baselines run under a wall-clock budget; when not even one decision finishes
//! in it, their rate is extrapolated from the combinations they examined per second
//! and the exact number a full decision needs ([`BruteForce::cost`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use ::model::SplitMix64;

use crate::baseline::{BruteForce, BruteMode, BruteOutcome};
use crate::model::{
    FailureDomain, Inventory, ReplicationTag, Request, ServerName, ServerResource, StorageName,
    StorageResource,
};
use crate::plan::Planner;

/// The shape of a random cluster.
#[derive(Clone, Debug)]
pub struct ClusterShape {
    /// Number of servers.
    pub servers: usize,
    /// Number of storages.
    pub storages: usize,
    /// Number of failure domains (at least 1).
    pub domains: usize,
    /// Number of replication tags (at least 1).
    pub tags: usize,
    /// Storages reached by each server.
    pub links_per_server: usize,
    /// Per mille of storages that are not replication-capable.
    pub no_replication_permille: u64,
    /// Per mille of storages with an explicit peer.
    pub peer_permille: u64,
    /// Per mille of servers down.
    pub down_permille: u64,
    /// Per mille of servers in maintenance.
    pub maintenance_permille: u64,
    /// Largest storage capacity.
    pub max_capacity_gib: u64,
    /// Largest server memory.
    pub max_memory_mib: u64,
}

impl ClusterShape {
    /// A data-centre-like shape: 10 servers per storage, 4 links per server, one
    /// failure domain per 25 storages, three replication technologies.
    pub fn datacenter(servers: usize, storages: usize) -> ClusterShape {
        ClusterShape {
            servers,
            storages,
            domains: (storages / 25).max(4),
            tags: 3,
            links_per_server: 4,
            no_replication_permille: 100,
            peer_permille: 20,
            down_permille: 30,
            maintenance_permille: 20,
            max_capacity_gib: 50_000,
            max_memory_mib: 1024 * 1024,
        }
    }
}

/// A random, valid inventory of the given shape; the same seed gives the same one.
pub fn random_inventory(shape: &ClusterShape, seed: u64) -> Inventory {
    let mut rng = SplitMix64::new(seed);
    let domains = shape.domains.max(1);
    let tags = shape.tags.max(1);
    let mut storage: Vec<StorageResource> = (0..shape.storages)
        .map(|i| {
            let capacity_gib = rng.range(shape.max_capacity_gib / 10, shape.max_capacity_gib);
            let mut replication = std::collections::BTreeSet::new();
            if !rng.chance(shape.no_replication_permille) {
                replication.insert(ReplicationTag(format!("repl-{}", rng.index(tags))));
                if rng.chance(200) {
                    replication.insert(ReplicationTag(format!("repl-{}", rng.index(tags))));
                }
            }
            StorageResource {
                name: StorageName(format!("st-{i:05}")),
                capacity_gib,
                free_gib: rng.range(0, capacity_gib),
                replication,
                peers: Default::default(),
                failure_domain: FailureDomain(format!("fd-{}", rng.index(domains))),
            }
        })
        .collect();
    let n = storage.len();
    for i in 0..n {
        if n > 1 && storage[i].replication_capable() && rng.chance(shape.peer_permille) {
            let j = rng.index(n);
            if j != i {
                let peer = storage[j].name.clone();
                storage[i].peers.insert(peer);
            }
        }
    }
    let servers: Vec<ServerResource> = (0..shape.servers)
        .map(|i| {
            let cpus = u32::try_from(rng.range(8, 128)).expect("at most 128");
            let memory_mib = rng.range(shape.max_memory_mib / 8, shape.max_memory_mib);
            let live = !rng.chance(shape.down_permille);
            ServerResource {
                name: ServerName(format!("sv-{i:05}")),
                cpus,
                free_cpus: u32::try_from(rng.range(0, u64::from(cpus))).expect("at most cpus"),
                memory_mib,
                free_memory_mib: rng.range(0, memory_mib),
                live,
                in_maintenance: rng.chance(shape.maintenance_permille),
                failure_domain: Some(FailureDomain(format!("fd-{}", rng.index(domains)))),
            }
        })
        .collect();
    let mut connectivity = BTreeMap::new();
    if n > 0 {
        for s in &servers {
            let mut list: Vec<StorageName> = (0..shape.links_per_server.min(n))
                .map(|_| storage[rng.index(n)].name.clone())
                .collect();
            list.sort();
            list.dedup();
            connectivity.insert(s.name.clone(), list);
        }
    }
    Inventory {
        storage,
        servers,
        connectivity,
    }
}

/// A random VM request: 10–500 GiB disk, 1–16 vCPUs, 1–64 GiB memory.
pub fn random_request(rng: &mut SplitMix64) -> Request {
    Request {
        disk_gib: rng.range(10, 500),
        vcpus: u32::try_from(rng.range(1, 16)).expect("at most 16"),
        memory_mib: rng.range(1, 64) * 1024,
    }
}

/// One baseline's measured (or extrapolated) rate.
#[derive(Clone, Debug)]
pub struct BaselineRate {
    /// Decisions per second.
    pub per_sec: f64,
    /// Decisions that finished within the budget.
    pub completed: usize,
    /// True when no decision finished and the rate is extrapolated.
    pub extrapolated: bool,
}

/// One line of the benchmark.
#[derive(Clone, Debug)]
pub struct BenchRow {
    /// Servers in the cluster.
    pub servers: usize,
    /// Storages in the cluster.
    pub storages: usize,
    /// Decisions made by the indexed planner.
    pub decisions: usize,
    /// How many of them found a placement (all on the same snapshot).
    pub placed: usize,
    /// Time to build the planner's indexes, in milliseconds.
    pub build_ms: f64,
    /// Indexed planner: decisions per second (a refusal includes its explanation).
    pub fast_per_sec: f64,
    /// Decisions that found a placement when each one is committed.
    pub fill_placed: usize,
    /// Indexed planner, place + commit, cluster filling up: decisions per second.
    pub fill_per_sec: f64,
    /// Naive search over storage pairs × connected server pairs.
    pub naive: BaselineRate,
    /// Brute force over storage pairs × all server pairs.
    pub brute: BaselineRate,
}

/// Wall-clock budget each baseline gets per row.
pub const BASELINE_BUDGET: Duration = Duration::from_millis(1500);

/// Benchmarks `decisions` placements on a seeded datacenter-shaped cluster.
pub fn bench_placement(servers: usize, storages: usize, decisions: usize, seed: u64) -> BenchRow {
    bench_placement_with_budget(servers, storages, decisions, seed, BASELINE_BUDGET)
}

/// [`bench_placement`] with an explicit budget for each baseline.
pub fn bench_placement_with_budget(
    servers: usize,
    storages: usize,
    decisions: usize,
    seed: u64,
    budget: Duration,
) -> BenchRow {
    let inv = random_inventory(&ClusterShape::datacenter(servers, storages), seed);
    let mut rng = SplitMix64::new(seed ^ 0x5EED);
    let requests: Vec<Request> = (0..decisions.max(1))
        .map(|_| random_request(&mut rng))
        .collect();

    let t = Instant::now();
    let planner = Planner::new(&inv).expect("generated inventories are valid");
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    // Every decision sees the same snapshot (nothing is committed), for the planner
    // and the baselines alike: a cluster of 100 servers could not take 10,000 VMs,
    // and a filling cluster would measure refusals instead of placements.
    let t = Instant::now();
    let mut placed = 0;
    for req in &requests {
        if planner.place(req).is_ok() {
            placed += 1;
        }
    }
    let fast_per_sec = requests.len() as f64 / t.elapsed().as_secs_f64().max(1e-9);

    // The same requests again, each placement committed before the next: the indexes
    // are updated, the cluster fills up, and refusals pay for their explanation.
    let mut filling = planner.clone();
    let t = Instant::now();
    let mut fill_placed = 0;
    for req in &requests {
        if let Ok(p) = filling.place(req) {
            filling.commit(&p, req).expect("a fresh placement commits");
            fill_placed += 1;
        }
    }
    let fill_per_sec = requests.len() as f64 / t.elapsed().as_secs_f64().max(1e-9);

    let naive = baseline_rate(&inv, &requests, BruteMode::ConnectedServerPairs, budget);
    let brute = baseline_rate(&inv, &requests, BruteMode::AllServerPairs, budget);
    BenchRow {
        servers,
        storages,
        decisions: requests.len(),
        placed,
        build_ms,
        fast_per_sec,
        fill_placed,
        fill_per_sec,
        naive,
        brute,
    }
}

fn baseline_rate(
    inv: &Inventory,
    requests: &[Request],
    mode: BruteMode,
    budget: Duration,
) -> BaselineRate {
    let bf = BruteForce::new(inv).expect("generated inventories are valid");
    let first_cost = requests.first().map_or(1, |r| bf.cost(r, mode)).max(1);
    let start = Instant::now();
    let deadline = start + budget;
    let mut completed = 0;
    let mut partial_ops = 0;
    for req in requests {
        match bf.place_bounded(req, mode, &mut |_| Instant::now() < deadline) {
            BruteOutcome::Done { .. } => completed += 1,
            BruteOutcome::Stopped { ops } => {
                partial_ops = ops;
                break;
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    if completed > 0 {
        BaselineRate {
            per_sec: completed as f64 / secs,
            completed,
            extrapolated: false,
        }
    } else {
        // Not one decision in the budget: combinations per second over the
        // combinations one decision needs.
        BaselineRate {
            per_sec: partial_ops as f64 / secs / first_cost as f64,
            completed: 0,
            extrapolated: true,
        }
    }
}

/// The benchmark at 100 / 1,000 / 10,000 servers (10 servers per storage).
pub fn bench_table(decisions: usize, seed: u64) -> Vec<BenchRow> {
    [(100, 10), (1_000, 100), (10_000, 1_000)]
        .into_iter()
        .map(|(servers, storages)| bench_placement(servers, storages, decisions, seed))
        .collect()
}

fn rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else if r >= 0.01 {
        format!("{r:.2}")
    } else {
        format!("{r:.1e}")
    }
}

/// The rows as a Markdown table; `~` marks an extrapolated rate.
pub fn format_table(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| servers | storages | decisions | index build | indexed, one snapshot (placed) | indexed, place + commit (placed) | naive: storage pairs × connected servers | brute: storage pairs × all server pairs | speed-up vs naive |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let base = |b: &BaselineRate| {
            format!(
                "{}{}/s",
                if b.extrapolated { "~" } else { "" },
                rate(b.per_sec)
            )
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} ms | {}/s ({}) | {}/s ({}) | {} | {} | {:.0}× |",
            r.servers,
            r.storages,
            r.decisions,
            r.build_ms,
            rate(r.fast_per_sec),
            r.placed,
            rate(r.fill_per_sec),
            r.fill_placed,
            base(&r.naive),
            base(&r.brute),
            r.fast_per_sec / r.naive.per_sec.max(1e-12),
        );
    }
    out
}
