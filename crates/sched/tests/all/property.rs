//! Seeded random clusters: every placement satisfies every constraint, the planner
//! finds one exactly when the brute force does, with the same storage score, and its
//! incrementally maintained indexes agree with indexes rebuilt from scratch.

use model::SplitMix64;
use sched::baseline::{BruteForce, BruteMode};
use sched::bench::{random_inventory, random_request, ClusterShape};
use sched::{Inventory, Planner, Request};

use crate::check_placement;

fn small_shape(rng: &mut SplitMix64) -> ClusterShape {
    ClusterShape {
        servers: 1 + rng.index(12),
        storages: rng.index(11),
        domains: 1 + rng.index(4),
        tags: 1 + rng.index(2),
        links_per_server: 1 + rng.index(4),
        no_replication_permille: rng.range(0, 300),
        peer_permille: rng.range(0, 300),
        down_permille: rng.range(0, 250),
        maintenance_permille: rng.range(0, 200),
        max_capacity_gib: rng.range(100, 2000),
        max_memory_mib: rng.range(8, 128) * 1024,
    }
}

fn storage_score(inv: &Inventory, p: &sched::Placement) -> u64 {
    let free = |n: &sched::StorageName| inv.storage.iter().find(|s| &s.name == n).unwrap().free_gib;
    free(&p.primary.storage).min(free(&p.standby.storage))
}

#[test]
fn planner_agrees_with_brute_force_on_random_clusters() {
    let mut rng = SplitMix64::new(0xC0FFEE);
    let (mut placed, mut refused) = (0, 0);
    for cluster in 0..400 {
        let shape = small_shape(&mut rng);
        let inv = random_inventory(&shape, cluster);
        let planner = Planner::new(&inv).unwrap();
        let brute = BruteForce::new(&inv).unwrap();
        for _ in 0..8 {
            // Sized to the cluster, so that both outcomes are common.
            let r = Request {
                disk_gib: rng.range(1, shape.max_capacity_gib / 5),
                vcpus: u32::try_from(rng.range(1, 16)).unwrap(),
                memory_mib: rng.range(1, shape.max_memory_mib / 5),
            };
            let fast = planner.place(&r);
            let all = brute.place(&r, BruteMode::AllServerPairs);
            let connected = brute.place(&r, BruteMode::ConnectedServerPairs);
            assert_eq!(
                all, connected,
                "cluster {cluster} {r}: the two baselines differ"
            );
            match (&fast, &all) {
                (Ok(p), Some(b)) => {
                    let score = check_placement(&inv, &r, p);
                    check_placement(&inv, &r, b);
                    assert_eq!(
                        score,
                        storage_score(&inv, b),
                        "cluster {cluster} {r}: {p} vs {b}"
                    );
                    placed += 1;
                }
                (Err(e), None) => {
                    assert!(!e.summary.is_empty());
                    // Every reported candidate fails at least one named constraint.
                    assert!(e.candidates.iter().all(|c| !c.reasons.is_empty()), "{e}");
                    refused += 1;
                }
                (Ok(p), None) => {
                    panic!("cluster {cluster} {r}: planner found {p}, brute force none")
                }
                (Err(e), Some(b)) => {
                    panic!("cluster {cluster} {r}: brute force found {b}, planner refused: {e}")
                }
            }
        }
    }
    // The generator must exercise both outcomes, or the test proves little.
    eprintln!("placed {placed}, refused {refused}");
    assert!(
        placed > 300 && refused > 300,
        "placed {placed}, refused {refused}"
    );
}

#[test]
fn committed_indexes_match_rebuilt_ones() {
    let mut rng = SplitMix64::new(42);
    for cluster in 0..40 {
        let mut shape = ClusterShape::datacenter(60, 12);
        shape.max_capacity_gib = 3000;
        shape.max_memory_mib = 256 * 1024;
        let inv = random_inventory(&shape, 1000 + cluster);
        let mut planner = Planner::new(&inv).unwrap();
        let mut current = inv.clone();
        for step in 0..30 {
            let r: Request = random_request(&mut rng);
            let fresh = Planner::new(&current).unwrap().place(&r);
            let incremental = planner.place(&r);
            assert_eq!(incremental, fresh, "cluster {cluster} step {step}");
            if let Ok(p) = incremental {
                check_placement(&current, &r, &p);
                planner.commit(&p, &r).unwrap();
                current.storage = planner.storages().to_vec();
                current.servers = planner.servers().to_vec();
            }
        }
    }
}

#[test]
fn benchmark_runs_and_places() {
    let row = sched::bench::bench_placement_with_budget(
        100,
        10,
        200,
        7,
        std::time::Duration::from_millis(50),
    );
    assert_eq!(row.decisions, 200);
    assert!(row.placed > 0, "{row:?}");
    assert!(row.fast_per_sec > 0.0 && row.naive.per_sec > 0.0 && row.brute.per_sec > 0.0);
    let table = sched::format_table(&[row]);
    assert!(table.lines().count() == 3, "{table}");
}
