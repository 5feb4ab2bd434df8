//! The switch <-> controller protocol (length-prefixed JSON over TCP): the controller reads
//! switch reports and merges them into its counters, address table, traffic report,
//! Prometheus text and IPFIX export; a switch reads the controller's acks and installs the
//! address table they carry. None may panic, and exported flow deltas decode as IPFIX.
//!
//! Each input line is one message body (framed here with its length, so that the framing
//! is exercised and JSON gets through); the whole input is also read as one raw frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use net::core::{CoreTimeouts, SwitchCore};
use net::ipfix::{parse_message, IpfixExporter};
use net::proto::{read_msg, ReportAck};
use net::stats::SwitchReport;
use net::{Controller, TrafficQuery};

fuzz_target!(|data: &[u8]| {
    let _ = read_msg::<SwitchReport>(&mut &data[..]);
    let _ = read_msg::<ReportAck>(&mut &data[..]);

    let controller = Controller::new("dom-a".into());
    let mut core = SwitchCore::new(
        "h1".into(),
        "dom-a".into(),
        Vec::new(),
        CoreTimeouts::default(),
    );
    let mut now_ms = 1_000_000u64;
    for body in data.split(|&b| b == b'\n') {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        if let Ok(report) = read_msg::<SwitchReport>(&mut &frame[..]) {
            let _ = controller.handle_report_at(&report, now_ms);
            now_ms += 700;
        }
        if let Ok(ack) = read_msg::<ReportAck>(&mut &frame[..]) {
            if let Some(table) = ack.table {
                let _ = core.apply_table(table);
            }
        }
    }
    let _ = controller.traffic(&TrafficQuery::default());
    let _ = controller.traffic(&TrafficQuery {
        from: Some(1000),
        to: Some(1002),
        ..TrafficQuery::default()
    });
    let _ = controller.prometheus();
    let deltas = controller.take_flow_deltas();
    let mut exporter = IpfixExporter::new(1);
    let mut exported = Vec::new();
    for m in exporter.encode(&deltas, now_ms / 1000) {
        exported.extend(
            parse_message(&m)
                .expect("exported ipfix does not decode")
                .records,
        );
    }
    assert_eq!(exported, deltas);
});
