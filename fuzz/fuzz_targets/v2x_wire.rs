//! What a MEC's V2X service reads from outside: PC5 link-protocol messages and relay
//! datagrams (from any device on the medium), and the JSON bodies and query strings of its
//! HTTP API (devices, operators, MEC applications), the console status the dashboard reads
//! from it, and its state journals as a restart reads
//! them from disk. None may panic; a decoded PC5 message re-encodes to the bytes it came from.
#![no_main]

use std::future::Future;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use v2x::function::OperatorConfig;
use v2x::pc5::Msg;
use v2x::vis::Vis;

/// Runs a future that never waits (the VIS without a journal answers at once).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("the VIS without a journal waited"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            if let Ok(m) = Msg::decode(rest) {
                if !matches!(m, Msg::Data { .. }) {
                    assert_eq!(m.encode(), rest, "{m:?}");
                }
            }
            let _ = v2x::pc5::open(&[7u8; 32], rest);
            let _ = v2x::relay::decode(rest);
        }
        1 => {
            let _ = serde_json::from_slice::<v2x::types::V2xSubscription>(rest).map(|s| s.validate());
            let _ = serde_json::from_slice::<v2x::types::AuthorizationRequest>(rest);
            let _ = serde_json::from_slice::<v2x::types::LinkRequest>(rest).map(|l| l.peer_plmn.validate());
            // What the dashboard reads back from a MEC it was pointed at.
            let _ = serde_json::from_slice::<v2x::types::MecStatus>(rest);
        }
        3 => {
            let p = Path::new("state.jsonl");
            let _ = v2x::journal::parse::<v2x::function::Change>(rest, p);
            let _ = v2x::journal::parse::<v2x::vis::VisChange>(rest, p);
        }
        _ => {
            let cfg = OperatorConfig {
                plmn: "001-01".parse().unwrap(),
                peers: Vec::new(),
                roaming_secret: b"s".to_vec(),
                relay: "127.0.0.1:4700".parse().unwrap(),
                cell_id: 0x123_4567,
                site: (48.85, 2.35),
            };
            let vis = Vis::new(&cfg, "http://127.0.0.1/vis/v2");
            vis.set_urls("http://127.0.0.1/vis/v2", Some("ws://127.0.0.1/vis/v2/ws"));
            if let Ok(s) = std::str::from_utf8(rest) {
                let _ = vis.uu_unicast(s);
                let _ = vis.pc5(s);
            }
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(rest) {
                let _ = vis.predicted_qos(v.clone());
                let _ = vis.distribution_server(&v);
                let _ = vis.publish(&v);
                if let Ok((id, body, _)) = now(vis.subscribe(v.clone())) {
                    let _ = now(vis.put(&id, body, Some("\"x\"")));
                    let _ = now(vis.put(&id, v, None));
                }
            }
        }
    }
});
