//! Frames a VM (or the uplink) hands the virtual switch: the Ethernet/IP sanity checks and
//! the switch core's classification, learning, counting and forwarding decision. None may
//! panic; a frame the parser refuses is dropped and counted as an error. The first byte
//! picks the ingress ports (two VMs and the uplink) and the
//! clock step; the rest is a sequence of frames separated by a 0xA5 0x5A marker.
#![no_main]

use libfuzzer_sys::fuzz_target;
use net::core::{CoreTimeouts, PortId, PortKind, SwitchCore, Verdict};
use net::{MacAddr, PortAddress};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let vm = |n: u8| {
        PortKind::Vm(PortAddress {
            vm: format!("vm{n}"),
            mac: MacAddr([2, 0, 0, 0, 0, n]),
            ip: None,
        })
    };
    let ports = vec![vm(1), vm(2), PortKind::Uplink];
    let mut sw = SwitchCore::new("h1".into(), "dom-a".into(), ports, CoreTimeouts::default());
    let mut now = 0u64;
    let mut i = 0usize;
    let mut start = 0usize;
    while start <= rest.len() {
        let end = rest[start..]
            .windows(2)
            .position(|w| w == [0xA5, 0x5A])
            .map_or(rest.len(), |p| start + p);
        let frame = &rest[start..end];
        let ingress = PortId(u16::from((pick >> (2 * (i % 4))) & 3) % 3);
        let parsed = net::frame::parse(frame);
        let errors = sw.counters().errors;
        let verdict = sw.process(ingress, frame, now);
        if parsed.is_err() {
            assert!(
                matches!(verdict, Verdict::Drop(_)),
                "malformed frame not dropped"
            );
            assert_eq!(sw.counters().errors, errors + 1);
        }
        if let Verdict::Forward(p) = verdict {
            assert!(usize::from(p.0) < sw.port_count());
        }
        now += u64::from(pick) * 1000;
        let _ = sw.expire(now);
        let (flows, marker) = sw.snapshot();
        if i % 2 == 1 {
            sw.ack(marker);
        }
        let _ = flows;
        i += 1;
        start = end + 2;
    }
});
