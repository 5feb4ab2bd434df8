//! The controller's saved traffic counters as the API server reads them back from the store
//! after a restart (`Controller::restore`): any bytes are either refused with an error or
//! restored, and a restored controller answers queries, takes reports and saves a snapshot
//! that restores to the same lifetime counts (by class and by pair), without panicking.
//!
//! The first line is the snapshot; every further line is a switch report applied after it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use net::stats::SwitchReport;
use net::{Controller, TrafficQuery};

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let snapshot = lines.next().unwrap_or_default();
    let controller = Controller::new("dom-a".into());
    if controller.restore(snapshot).is_err() {
        return;
    }
    let mut now_ms = 1_000_000u64;
    for line in lines {
        if let Ok(report) = serde_json::from_slice::<SwitchReport>(line) {
            let _ = controller.handle_report_at(&report, now_ms);
            now_ms += 700;
        }
    }
    let _ = controller.traffic(&TrafficQuery::default());
    let _ = controller.traffic(&TrafficQuery {
        window_s: Some(60),
        ..TrafficQuery::default()
    });
    let _ = controller.prometheus();
    let saved = controller.snapshot();
    let again = Controller::new("dom-a".into());
    again.restore(&saved).expect("a saved snapshot restores");
    let counts = |c: &Controller| {
        let r = c.traffic(&TrafficQuery::default());
        let mut pairs: Vec<_> = r
            .pairs
            .iter()
            .map(|p| (p.src_mac, p.dst_mac, p.class, p.packets, p.bytes))
            .collect();
        pairs.sort();
        (r.classes, r.flood, r.neighbor, r.errors, pairs)
    };
    assert_eq!(
        counts(&again),
        counts(&controller),
        "restore(snapshot) keeps the counts"
    );
});
