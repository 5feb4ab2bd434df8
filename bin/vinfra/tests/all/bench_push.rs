//! `vinfra bench push` in miniature: a real `vinfra server` child, three subscribers, a
//! few commands over the event streams and a few by polling. Checks the shape of the
//! report, never a timing.

use std::process::Command;

use crate::harness::VINFRA;

#[test]
fn bench_push_measures_the_stream_and_the_polling_baseline() {
    let out = Command::new(VINFRA)
        .args(["bench", "push", "-o", "json"])
        .args(["--ops", "12", "--poll-samples", "3", "--poll-ms", "100"])
        .output()
        .expect("run vinfra bench push");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(r["hosts"], 3);
    assert_eq!(r["poll_ms"], 100);
    let rows = r["rows"].as_array().unwrap();
    let paths: Vec<&str> = rows
        .iter()
        .map(|row| row["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["push", "answer", "after_answer", "poll"]);
    for (row, samples) in rows.iter().zip([12, 12, 12, 3]) {
        // Every command's change was seen, on the stream and by the pollers.
        assert_eq!(row["missed"], 0, "{row}");
        assert_eq!(row["samples"], samples, "{row}");
        let q = |k: &str| row[k].as_f64().unwrap();
        // Only the difference of two times may be negative.
        assert!(
            (row["path"] == "after_answer" || 0.0 <= q("p50_ms"))
                && q("p50_ms") <= q("p90_ms")
                && q("p90_ms") <= q("p99_ms")
                && q("p99_ms") <= q("max_ms"),
            "{row}"
        );
    }
}
