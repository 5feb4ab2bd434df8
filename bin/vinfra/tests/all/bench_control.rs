//! `vinfra bench control` in miniature: every setup (redb, etcd, three servers on etcd)
//! and one leader kill, on real etcd members and `vinfra server` processes. Checks the
//! shape of the report, never a timing.

use std::process::Command;

use crate::harness::VINFRA;

#[test]
fn bench_control_measures_every_setup_and_a_failover() {
    test_utils::require_tool("etcd", test_utils::ETCD_INSTALL_HINT).unwrap();
    let out = Command::new(VINFRA)
        .args(["bench", "control", "-o", "json"])
        .args(["--ops", "20", "--clients", "4", "--failovers", "1"])
        .output()
        .expect("run vinfra bench control");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(r["rate_limit"], "off");
    let api = r["api"].as_array().unwrap();
    assert_eq!(api.len(), 6, "{api:?}");
    for setup in ["redb", "etcd", "etcd3"] {
        for op in ["vm_create", "vm_list"] {
            let row = api
                .iter()
                .find(|a| a["setup"] == setup && a["op"] == op)
                .unwrap_or_else(|| panic!("no {op} row for {setup}"));
            let (ok, errors) = (row["ok"].as_u64().unwrap(), row["errors"].as_u64().unwrap());
            assert_eq!(ok + errors, 20, "{row}");
            // Concurrent creates may lose the race for a host 16 times in a row and get
            // 409 "retry" (the bench counts it, does not retry); nothing else may fail.
            if errors > 0 {
                let first = row["first_error"].as_str().unwrap();
                assert!(op == "vm_create" && first.contains("409"), "{row}");
            }
            assert!(ok > 0, "{row}");
            assert!(row["p99_ms"].as_f64().unwrap() >= row["p50_ms"].as_f64().unwrap());
        }
        let created = &api
            .iter()
            .find(|a| a["setup"] == setup && a["op"] == "vm_create")
            .unwrap()["ok"];
        let list = api
            .iter()
            .find(|a| a["setup"] == setup && a["op"] == "vm_list")
            .unwrap();
        assert_eq!(list["errors"], 0, "{list}");
        assert_eq!(&list["vms_per_list"], created, "{list}");
    }
    let f = &r["failover"];
    assert_eq!(f["rounds"].as_array().unwrap().len(), 1);
    let round = &f["rounds"][0];
    assert_ne!(round["killed"], round["new_leader"]);
    let (leads, step, drained) = (
        round["leads_ms"].as_f64().unwrap(),
        round["first_step_ms"].as_f64().unwrap(),
        round["drained_ms"].as_f64().unwrap(),
    );
    assert!(leads > 0.0 && leads <= step && step <= drained, "{round}");
}
