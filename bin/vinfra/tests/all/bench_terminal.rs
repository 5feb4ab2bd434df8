//! `vinfra bench terminal` in miniature: a few terminals for a second over sessions and
//! one-off messages, then the bytes of one scripted typing session through vinfra's
//! operations and through QEMU's VNC behind websockify (a real guest; vncdotool types,
//! and the bench fails unless the guest's console shows every line). Checks the shape
//! of the report and that every operation was performed, never a timing or a ratio.
//! The keyboard row: two QEMU VMs in qtest mode, every key operation performed and its
//! scancodes found at its VM's keyboard controller.

use std::process::Command;

use crate::harness::VINFRA;

#[test]
fn bench_terminal_measures_sessions_and_one_off_messages() {
    let out = Command::new(VINFRA)
        .args(["bench", "terminal", "-o", "json"])
        .args([
            "--terminals",
            "6",
            "--rate",
            "10",
            "--vms",
            "2",
            "--secs",
            "1",
            "--kbd-vms",
            "2",
            "--kbd-rate",
            "10",
            // The latency rows over brief-answer sessions (the bytes rows take both).
            "--replies",
            "brief",
        ])
        .env("RUST_LOG", "error")
        .output()
        .expect("run vinfra bench terminal");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(
        (r["terminals"].as_u64(), r["vms"].as_u64()),
        (Some(6), Some(2))
    );
    let rows = r["rows"].as_array().unwrap();
    let paths: Vec<&str> = rows
        .iter()
        .map(|row| row["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["session", "one-off"]);
    for row in rows {
        // 6 terminals × 10 ops, every one performed on its VM.
        assert_eq!(
            (row["sent"].as_u64(), row["performed"].as_u64()),
            (Some(60), Some(60)),
            "{row}"
        );
        assert_eq!(row["other"], 0, "{row}");
        let q = |k: &str| row[k].as_f64().unwrap();
        assert!(
            0.0 < q("p50_ms") && q("p50_ms") <= q("p99_ms") && q("p99_ms") <= q("max_ms"),
            "{row}"
        );
    }
    assert_eq!(r["replies"], "brief");
    let wire = r["wire"].as_array().unwrap();
    let paths: Vec<&str> = wire.iter().map(|w| w["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        [
            "vinfra key",
            "vinfra key_combo",
            "vinfra type_text",
            "vinfra key, brief",
            "vinfra key_combo, brief",
            "vinfra type_text, brief",
            "vnc"
        ]
    );
    // 10 lines of 81 characters and 10 Returns: 91 keys, pressed and released.
    assert_eq!(r["script_chars"], 91);
    let messages: Vec<Option<u64>> = wire.iter().map(|w| w["messages"].as_u64()).collect();
    assert_eq!(
        messages,
        [
            Some(182),
            Some(91),
            Some(10),
            Some(182),
            Some(91),
            Some(10),
            None
        ]
    );
    // Brief answers: the same messages to the server, fewer bytes back.
    let bytes = |i: usize, k: &str| wire[i][k].as_u64().unwrap();
    for i in 0..3 {
        assert!(
            bytes(i + 3, "from_server") < bytes(i, "from_server"),
            "{} against {}",
            wire[i + 3],
            wire[i]
        );
    }
    for w in wire {
        let b = |k: &str| w[k].as_u64().unwrap();
        assert!(b("to_server") > 0 && b("from_server") > 0, "{w}");
        assert_eq!(b("total"), b("to_server") + b("from_server"), "{w}");
    }
    let k = &r["keyboard"];
    // 2 VMs × 10 ops/s × 1 s, every one performed and at its controller.
    assert_eq!(
        (
            k["sent"].as_u64(),
            k["performed"].as_u64(),
            k["at_controller"].as_u64()
        ),
        (Some(20), Some(20), Some(20)),
        "{k}"
    );
    let q = |key: &str| k[key].as_f64().unwrap();
    assert!(
        q("controller_p50_ms") > 0.0 && q("controller_p50_ms") <= q("controller_p99_ms"),
        "{k}"
    );
}
