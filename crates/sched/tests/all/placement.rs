use std::path::Path;

use sched::{
    takeover, CommitError, Explanation, Inventory, Planner, Reason, ServerName, StorageName,
    TakeoverDecision,
};

use crate::{check_placement, inv, req};

fn refuse(inv: &Inventory, r: &sched::Request) -> Explanation {
    match Planner::new(inv).unwrap().place(r) {
        Ok(p) => panic!("expected a refusal, got {p}"),
        Err(e) => e,
    }
}

fn pair_reasons(e: &Explanation) -> Vec<(String, String, Vec<Reason>)> {
    e.candidates
        .iter()
        .filter_map(|c| {
            let [a, b] = c.storage_pair.as_ref()?;
            Some((a.to_string(), b.to_string(), c.reasons.clone()))
        })
        .collect()
}

const TWO_ROOMS: &str = r#"
storage:
  - { name: a, capacity_gib: 1000, free_gib: 800, replication: [sync], failure_domain: r1 }
  - { name: b, capacity_gib: 1000, free_gib: 900, replication: [sync], failure_domain: r2 }
  - { name: c, capacity_gib: 1000, free_gib: 1000, replication: [async], failure_domain: r2 }
servers:
  - { name: h1, cpus: 8, free_cpus: 8, memory_mib: 16384, free_memory_mib: 16384, failure_domain: r1 }
  - { name: h2, cpus: 8, free_cpus: 8, memory_mib: 16384, free_memory_mib: 8192, failure_domain: r2 }
  - { name: h3, cpus: 8, free_cpus: 8, memory_mib: 16384, free_memory_mib: 12000, failure_domain: r2 }
connectivity:
  h1: [a]
  h2: [b, c]
  h3: [b, c]
"#;

#[test]
fn valid_pair_found() {
    let inv = inv(TWO_ROOMS);
    let r = req(100, 2, 4096);
    let p = Planner::new(&inv).unwrap().place(&r).unwrap();
    check_placement(&inv, &r, &p);
    // c cannot pair with anyone (async only); b has more free than a, so it carries
    // the primary, on its server with the most free memory (h3).
    assert_eq!(p.to_string(), "primary h3 on b, standby h1 on a");
}

#[test]
fn example_inventory_skips_down_and_maintenance_servers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/storage.yaml");
    let inv = Inventory::load_file(&path).unwrap();
    let r = req(100, 4, 8192);
    let p = Planner::new(&inv).unwrap().place(&r).unwrap();
    check_placement(&inv, &r, &p);
    // array-a is reached by host-a, host-d (down) and host-e (maintenance, and with
    // the most free memory of the three): only host-a may be the standby.
    assert_eq!(
        p.to_string(),
        "primary host-b on array-b, standby host-a on array-a"
    );
}

#[test]
fn server_in_maintenance_is_skipped_even_when_it_fits_best() {
    let inv = inv(r#"
storage:
  - { name: a, capacity_gib: 100, free_gib: 100, replication: [s], failure_domain: r1 }
  - { name: b, capacity_gib: 100, free_gib: 100, replication: [s], failure_domain: r2 }
servers:
  - { name: big, cpus: 64, free_cpus: 64, memory_mib: 99999, free_memory_mib: 99999, in_maintenance: true }
  - { name: small1, cpus: 4, free_cpus: 4, memory_mib: 4096, free_memory_mib: 4096 }
  - { name: small2, cpus: 4, free_cpus: 4, memory_mib: 4096, free_memory_mib: 4096 }
connectivity: { big: [a, b], small1: [a], small2: [b] }
"#);
    let r = req(10, 2, 2048);
    let p = Planner::new(&inv).unwrap().place(&r).unwrap();
    check_placement(&inv, &r, &p);
    assert_eq!(p.to_string(), "primary small1 on a, standby small2 on b");

    // With small2 gone, b is reachable only by the server in maintenance.
    let mut only_maint = inv.clone();
    only_maint.connectivity.remove(&ServerName::new("small2"));
    let e = refuse(&only_maint, &r);
    let pairs = pair_reasons(&e);
    assert_eq!(
        pairs[0].2,
        [Reason::NoLiveServerReaches {
            storage: "b".into(),
            down: 0,
            in_maintenance: 1
        }]
    );
    let server_report = e
        .candidates
        .iter()
        .find(|c| c.server.as_ref().is_some_and(|s| s.as_str() == "big"))
        .expect("a report on the server in maintenance");
    assert_eq!(server_report.storage, Some(StorageName::new("b")));
    assert_eq!(
        server_report.reasons,
        [Reason::ServerInMaintenance {
            server: "big".into()
        }]
    );
}

#[test]
fn no_replication_capable_pair() {
    let inv = inv(r#"
storage:
  - { name: a, capacity_gib: 100, free_gib: 100, failure_domain: r1 }
  - { name: b, capacity_gib: 100, free_gib: 90, failure_domain: r2 }
servers:
  - { name: h1, cpus: 4, free_cpus: 4, memory_mib: 4096, free_memory_mib: 4096 }
  - { name: h2, cpus: 4, free_cpus: 4, memory_mib: 4096, free_memory_mib: 4096 }
connectivity: { h1: [a], h2: [b] }
"#);
    let e = refuse(&inv, &req(10, 1, 1024));
    assert_eq!(
        pair_reasons(&e),
        [(
            "a".to_owned(),
            "b".to_owned(),
            vec![
                Reason::NotReplicationCapable {
                    storage: "a".into()
                },
                Reason::NotReplicationCapable {
                    storage: "b".into()
                },
            ]
        )]
    );
    assert!(
        e.summary.contains("2 not replication-capable"),
        "{}",
        e.summary
    );
    assert!(
        e.to_string()
            .contains("pair a + b: a is not replication-capable; b is not replication-capable"),
        "{e}"
    );
}

#[test]
fn capable_but_incompatible_storages_are_not_pairable() {
    let inv = inv(r#"
storage:
  - { name: a, capacity_gib: 100, free_gib: 100, replication: [sync], failure_domain: r1 }
  - { name: b, capacity_gib: 100, free_gib: 90, replication: [async], failure_domain: r2 }
servers:
  - { name: h1, cpus: 4, free_cpus: 4, memory_mib: 4096, free_memory_mib: 4096 }
  - { name: h2, cpus: 4, free_cpus: 4, memory_mib: 4096, free_memory_mib: 4096 }
connectivity: { h1: [a], h2: [b] }
"#);
    let r = req(10, 1, 1024);
    let e = refuse(&inv, &r);
    assert_eq!(
        pair_reasons(&e)[0].2,
        [Reason::NotPairable {
            a: "a".into(),
            b: "b".into()
        }]
    );
    // An explicit peering makes them a pair despite the tags.
    let mut peered = inv.clone();
    peered.storage[1].peers.insert("a".into());
    let p = Planner::new(&peered).unwrap().place(&r).unwrap();
    check_placement(&peered, &r, &p);
    assert_eq!(p.to_string(), "primary h1 on a, standby h2 on b");
}

#[test]
fn pair_only_in_the_same_failure_domain() {
    let inv = inv(r#"
storage:
  - { name: a, capacity_gib: 100, free_gib: 100, replication: [s], failure_domain: rack-7 }
  - { name: b, capacity_gib: 100, free_gib: 100, replication: [s], failure_domain: rack-7 }
  - { name: c, capacity_gib: 100, free_gib: 100, replication: [s], failure_domain: rack-9 }
servers:
  - { name: h1, cpus: 4, free_cpus: 4, memory_mib: 4096, free_memory_mib: 4096 }
  - { name: h2, cpus: 4, free_cpus: 4, memory_mib: 4096, free_memory_mib: 4096 }
connectivity: { h1: [a], h2: [b] }
"#);
    let e = refuse(&inv, &req(10, 1, 1024));
    let pairs = pair_reasons(&e);
    // The best candidate is the pair that fails one constraint only: the domain.
    assert_eq!(
        pairs[0],
        (
            "a".to_owned(),
            "b".to_owned(),
            vec![Reason::SameFailureDomain {
                domain: "rack-7".into()
            }]
        )
    );
    // c is in another domain but nobody reaches it.
    assert!(
        pairs[1].2.contains(&Reason::NoServerReaches {
            storage: "c".into()
        }),
        "{e}"
    );
    assert!(
        e.summary
            .ends_with("best candidate pair a + b: both are in failure domain rack-7"),
        "{}",
        e.summary
    );
}

#[test]
fn storage_reachable_by_no_live_server() {
    let inv = inv(r#"
storage:
  - { name: a, capacity_gib: 100, free_gib: 100, replication: [s], failure_domain: r1 }
  - { name: b, capacity_gib: 100, free_gib: 100, replication: [s], failure_domain: r2 }
servers:
  - { name: h1, cpus: 4, free_cpus: 4, memory_mib: 4096, free_memory_mib: 4096 }
  - { name: h2, cpus: 4, free_cpus: 4, memory_mib: 4096, free_memory_mib: 4096, live: false }
  - { name: h3, cpus: 4, free_cpus: 4, memory_mib: 4096, free_memory_mib: 4096, live: false, in_maintenance: true }
connectivity: { h1: [a], h2: [b], h3: [b] }
"#);
    let e = refuse(&inv, &req(10, 1, 1024));
    assert_eq!(
        pair_reasons(&e)[0].2,
        [Reason::NoLiveServerReaches {
            storage: "b".into(),
            down: 2,
            in_maintenance: 0
        }]
    );
    let servers: Vec<_> = e
        .candidates
        .iter()
        .filter(|c| c.server.is_some())
        .map(|c| (c.server.clone().unwrap().0, c.reasons.len()))
        .collect();
    assert_eq!(servers, [("h2".to_owned(), 1), ("h3".to_owned(), 2)]);
    assert!(
        e.summary.contains("1 reached by no live server"),
        "{}",
        e.summary
    );
}

#[test]
fn the_two_servers_must_be_distinct() {
    let shared = r#"
storage:
  - { name: a, capacity_gib: 100, free_gib: 100, replication: [s], failure_domain: r1 }
  - { name: b, capacity_gib: 100, free_gib: 100, replication: [s], failure_domain: r2 }
servers:
  - { name: h1, cpus: 4, free_cpus: 4, memory_mib: 4096, free_memory_mib: 4096 }
  - { name: h2, cpus: 4, free_cpus: 1, memory_mib: 4096, free_memory_mib: 4096 }
connectivity: { h1: [a, b], h2: [b] }
"#;
    let r = req(10, 2, 1024);
    let e = refuse(&inv(shared), &r);
    assert_eq!(
        pair_reasons(&e)[0].2,
        [Reason::NoDistinctServers {
            server: "h1".into()
        }]
    );
    assert!(e.candidates.iter().any(|c| c.reasons
        == [Reason::InsufficientCpu {
            server: "h2".into(),
            need: 2,
            free: 1
        }]));
    // Once h2 has room, h1 goes to a (its only option) and h2 to b.
    let roomy = inv(&shared.replace("free_cpus: 1", "free_cpus: 4"));
    let p = Planner::new(&roomy).unwrap().place(&r).unwrap();
    check_placement(&roomy, &r, &p);
    assert_eq!(p.to_string(), "primary h1 on a, standby h2 on b");
}

#[test]
fn insufficient_storage_is_explained_with_numbers() {
    let e = refuse(&inv(TWO_ROOMS), &req(850, 1, 1024));
    let text = e.to_string();
    assert!(
        text.contains("a has 800 GiB free, 850 GiB needed"),
        "{text}"
    );
    assert!(
        e.summary.contains("(2 usable alone, 1 too small)"),
        "{}",
        e.summary
    );
}

#[test]
fn explanation_is_json_for_the_api() {
    let e = refuse(&inv(TWO_ROOMS), &req(10, 64, 1024));
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["request"]["vcpus"], 64);
    let first = &json["candidates"][0];
    assert_eq!(first["storage_pair"], serde_json::json!(["b", "a"]));
    assert_eq!(first["reasons"][0]["reason"], "no_server_fits");
    let back: Explanation = serde_json::from_value(json).unwrap();
    assert_eq!(back, e);
}

#[test]
fn fewer_than_two_storages() {
    let e = refuse(
        &inv(r#"
storage:
  - { name: only, capacity_gib: 100, free_gib: 100, failure_domain: r1 }
"#),
        &req(1, 1, 1),
    );
    assert!(
        e.summary
            .contains("a redundant placement needs two storages"),
        "{}",
        e.summary
    );
    assert_eq!(e.candidates[0].storage, Some(StorageName::new("only")));
}

#[test]
fn deterministic_whatever_the_input_order() {
    let base = inv(TWO_ROOMS);
    let mut shuffled = base.clone();
    shuffled.storage.reverse();
    shuffled.servers.rotate_left(1);
    for list in shuffled.connectivity.values_mut() {
        list.reverse();
    }
    let r = req(100, 2, 4096);
    let p1 = Planner::new(&base).unwrap().place(&r).unwrap();
    for _ in 0..3 {
        assert_eq!(Planner::new(&shuffled).unwrap().place(&r).unwrap(), p1);
    }
    let e1 = refuse(&base, &req(10, 99, 1));
    assert_eq!(refuse(&shuffled, &req(10, 99, 1)), e1);
}

#[test]
fn commit_takes_capacity_and_rejects_stale_placements() {
    let inv = inv(TWO_ROOMS);
    let mut planner = Planner::new(&inv).unwrap();
    let r = req(500, 2, 4096);
    let p = planner.place(&r).unwrap();
    planner.commit(&p, &r).unwrap();
    let b = planner
        .storages()
        .iter()
        .find(|s| s.name.as_str() == "b")
        .unwrap();
    assert_eq!(b.free_gib, 400);
    let h1 = planner
        .servers()
        .iter()
        .find(|s| s.name.as_str() == "h1")
        .unwrap();
    assert_eq!((h1.free_cpus, h1.free_memory_mib), (6, 12288));
    // The same placement again no longer fits the storages.
    assert_eq!(
        planner.commit(&p, &r),
        Err(CommitError::NoRoom("storage b".to_owned()))
    );
    let mut swapped = p.clone();
    swapped.standby.server = p.primary.server.clone();
    assert!(matches!(
        planner.commit(&swapped, &req(1, 1, 1)),
        Err(CommitError::NotRedundant(_))
    ));
    // a has 300 GiB left after the first placement; b 400: a second 500 GiB VM cannot fit.
    assert!(planner.place(&r).is_err());
}

#[test]
fn standby_takes_over_when_the_primary_is_down() {
    let mut inv = inv(TWO_ROOMS);
    let r = req(100, 2, 4096);
    let p = Planner::new(&inv).unwrap().place(&r).unwrap();
    assert_eq!(takeover(&p, &inv.servers), TakeoverDecision::PrimaryHealthy);

    // A live primary in maintenance is drained by migration, not restarted.
    let primary = |inv: &mut Inventory| {
        let name = p.primary.server.clone();
        inv.servers
            .iter_mut()
            .find(|s| s.name == name)
            .unwrap()
            .clone()
    };
    let ix = inv
        .servers
        .iter()
        .position(|s| s.name == p.primary.server)
        .unwrap();
    inv.servers[ix].in_maintenance = true;
    assert_eq!(takeover(&p, &inv.servers), TakeoverDecision::PrimaryHealthy);

    inv.servers[ix].live = false;
    let d = takeover(&p, &inv.servers);
    let t = d.restart().expect("a takeover");
    assert_eq!(t.failed, p.primary);
    assert_eq!(t.new_primary, p.standby);
    assert!(!t.standby_in_maintenance);
    assert!(!primary(&mut inv).live);

    let sx = inv
        .servers
        .iter()
        .position(|s| s.name == p.standby.server)
        .unwrap();
    inv.servers[sx].live = false;
    assert_eq!(takeover(&p, &inv.servers), TakeoverDecision::Stranded);
    // A primary missing from the list counts as down.
    inv.servers[sx].live = true;
    inv.servers.remove(ix);
    assert!(takeover(&p, &inv.servers).restart().is_some());
}

#[test]
fn explain_as_a_dry_run_says_when_a_placement_exists() {
    let planner = Planner::new(&inv(TWO_ROOMS)).unwrap();
    let e = planner.explain(&req(100, 2, 4096));
    assert!(
        e.summary.starts_with("a redundant placement exists for "),
        "{}",
        e.summary
    );
    // c pairs with nobody: the candidates say so.
    assert!(e.to_string().contains("share no replication group"), "{e}");
    assert!(e.candidates.iter().all(|c| !c.reasons.is_empty()), "{e}");
}
