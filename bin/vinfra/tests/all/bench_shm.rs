//! `vinfra bench shm` in miniature: a real element, device children pinned where each
//! row says, every row present with its baseline. Checks the shape, never a timing.

use std::process::Command;

use crate::harness::VINFRA;

#[test]
fn bench_shm_measures_each_row_beside_its_baseline_at_each_placement() {
    let out = Command::new(VINFRA)
        .args(["bench", "shm", "--json", "--iters", "200"])
        .args([
            "--devices",
            "4",
            "--entries",
            "64",
            "--grants",
            "2000",
            "--kills",
            "2",
        ])
        .output()
        .expect("run vinfra bench shm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)));
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    let two_cores = std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    let mut want = vec![
        "grant call (element → other process's page tables)",
        "request+grant+notify+update+release (eventfd), one core",
        "4 KiB update under a standing grant, one core",
    ];
    if two_cores {
        want.extend([
            "request+grant+notify+update+release (eventfd), two cores",
            "request+grant+notify+update+release (polled), two cores",
            "4 KiB update under a standing grant, two cores",
        ]);
    }
    want.extend([
        "kill -9 of a device holding a grant → revoked",
        "grants/s, 4 devices × 64 entries (grant+revoke pairs)",
    ]);
    assert_eq!(names, want, "{stderr}");
    for r in &rows {
        let name = r["name"].as_str().unwrap();
        assert!(r["p50"].as_f64().unwrap() > 0.0, "{name}: no measurement");
        assert!(
            r["baseline_p50"].as_f64().unwrap() > 0.0,
            "{name}: no baseline"
        );
        // A latency row and its baseline ran at the same placement.
        for place in ["one core", "two cores"] {
            if name.ends_with(place) {
                let base = r["baseline"].as_str().unwrap();
                assert!(base.ends_with(place), "{name} against {base}");
            }
        }
    }
}
