//! `vinfra bench push` in miniature: a real `vinfra server` child, three subscribers, a
//! few commands over the event streams, a few by polling, and a few through three real
//! `vinfra agent --driver sim` processes. Checks the shape of the report, never a timing.

use std::process::Command;

use crate::harness::VINFRA;

#[test]
fn bench_push_measures_the_stream_and_the_polling_baseline() {
    let out = Command::new(VINFRA)
        .args(["bench", "push", "-o", "json"])
        .args(["--ops", "12", "--poll-samples", "3", "--poll-ms", "100"])
        .args(["--agents", "3", "--agent-ops", "6"])
        .output()
        .expect("run vinfra bench push");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(r["hosts"], 3);
    assert_eq!(r["poll_ms"], 100);
    let rows = r["rows"].as_array().unwrap();
    // A path is a name, or an object named by its one key (`agent_routed` carries how many
    // samples came by the agent's poll).
    let paths: Vec<&str> = rows
        .iter()
        .map(|row| match &row["path"] {
            serde_json::Value::Object(o) => o.keys().next().unwrap().as_str(),
            p => p.as_str().unwrap(),
        })
        .collect();
    assert_eq!(
        paths,
        [
            "push",
            "answer",
            "after_answer",
            "poll",
            "agent_routed",
            "agent_after_answer",
            "agent_stop",
            "agent_start",
            "agent_answer"
        ]
    );
    let via_poll = rows[4]["path"]["agent_routed"]["via_poll"]
        .as_u64()
        .unwrap();
    assert!(via_poll <= 6, "{}", rows[4]);
    for (row, samples) in rows.iter().zip([12, 12, 12, 3, 6, 6, 3, 3, 6]) {
        // Every command's change was seen, on the stream and by the pollers.
        assert_eq!(row["missed"], 0, "{row}");
        assert_eq!(row["samples"], samples, "{row}");
        let q = |k: &str| row[k].as_f64().unwrap();
        // Only the difference of two times may be negative.
        assert!(
            (row["path"] == "after_answer"
                || row["path"] == "agent_after_answer"
                || 0.0 <= q("p50_ms"))
                && q("p50_ms") <= q("p90_ms")
                && q("p90_ms") <= q("p99_ms")
                && q("p99_ms") <= q("max_ms"),
            "{row}"
        );
    }
}
