//! The IPFIX decoder (what a collector, and our tests, read from the controller's UDP
//! export). None may panic; whatever it decodes re-encodes to records that decode the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use net::ipfix::{parse_message, IpfixExporter};

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = parse_message(data) else {
        return;
    };
    let mut exporter = IpfixExporter::new(msg.observation_domain);
    let mut again = Vec::new();
    for m in exporter.encode(&msg.records, u64::from(msg.export_time)) {
        let back = parse_message(&m).expect("our own message does not decode");
        assert_eq!(back.observation_domain, msg.observation_domain);
        again.extend(back.records);
    }
    assert_eq!(again, msg.records);
});
