//! A randomized model test: grants, releases, element revokes, timeouts,
//! stray stores and device crashes against the kernel mechanism, checked
//! against a model of who holds what.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use shm::{Element, ElementConfig};

use crate::{wait_until, DeviceProc};

const DEVICES: usize = 3;
const ENTRIES: u32 = 5;

#[derive(Debug, Clone)]
enum Op {
    /// Device asks for an entry; `timed`: with a timeout `Expire` ends.
    Request {
        dev: usize,
        entry: u32,
        timed: bool,
    },
    Release {
        dev: usize,
        entry: u32,
    },
    /// The element takes an entry back from whoever holds it.
    Revoke {
        entry: u32,
    },
    /// Every timed grant's time passes.
    Expire,
    /// A stray store by the device into the entry's payload.
    Store {
        dev: usize,
        entry: u32,
    },
    /// kill -9 of the device; a new device takes its place.
    Crash {
        dev: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let dev = 0..DEVICES;
    let entry = 0..ENTRIES;
    prop_oneof![
        4 => (dev.clone(), entry.clone(), any::<bool>()).prop_map(|(dev, entry, timed)| Op::Request { dev, entry, timed }),
        2 => (dev.clone(), entry.clone()).prop_map(|(dev, entry)| Op::Release { dev, entry }),
        1 => entry.clone().prop_map(|entry| Op::Revoke { entry }),
        1 => Just(Op::Expire),
        5 => (dev.clone(), entry).prop_map(|(dev, entry)| Op::Store { dev, entry }),
        1 => dev.prop_map(|dev| Op::Crash { dev }),
    ]
}

#[derive(Default)]
struct Model {
    /// entry → (device slot, timed)
    holder: Vec<Option<(usize, bool)>>,
    /// Guards each device process keeps (outlive a revoke it did not ask for).
    guards: Vec<BTreeSet<u32>>,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn writes_succeed_exactly_when_the_model_says(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("t.sock");
        let mut cfg = ElementConfig::new(&sock, ENTRIES, 248);
        cfg.max_grant = None;
        let el = Element::start(cfg).unwrap();
        let mut devs: Vec<DeviceProc> = (0..DEVICES).map(|_| DeviceProc::spawn(&sock)).collect();
        let mut m = Model { holder: vec![None; ENTRIES as usize], guards: vec![BTreeSet::new(); DEVICES] };
        let mut stamp = 1000u64;
        for op in ops {
            match op {
                Op::Request { dev, entry, timed } => {
                    let ms = if timed { 3_600_000 } else { 0 };
                    let got = devs[dev].cmd(&format!("req {entry} {ms}"));
                    match m.holder[entry as usize] {
                        Some((h, _)) if h != dev => prop_assert_eq!(got, format!("held {}", devs[h].id)),
                        _ => {
                            prop_assert!(got.starts_with("granted"), "{}", got);
                            m.holder[entry as usize] = Some((dev, timed));
                            m.guards[dev].insert(entry);
                        }
                    }
                }
                Op::Release { dev, entry } => {
                    let got = devs[dev].cmd(&format!("rel {entry}"));
                    let want = if !m.guards[dev].remove(&entry) {
                        "noguard"
                    } else if m.holder[entry as usize].map(|h| h.0) == Some(dev) {
                        m.holder[entry as usize] = None;
                        "released"
                    } else {
                        "notheld"
                    };
                    prop_assert_eq!(got, want);
                }
                Op::Revoke { entry } => {
                    let r = el.holder(entry).map(|h| el.revoke(h, entry));
                    prop_assert_eq!(r.is_some(), m.holder[entry as usize].is_some());
                    prop_assert!(r.is_none_or(|r| r.is_ok()));
                    m.holder[entry as usize] = None;
                }
                Op::Expire => {
                    el.expire(Instant::now() + Duration::from_secs(7200));
                    for h in &mut m.holder {
                        if h.is_some_and(|(_, timed)| timed) {
                            *h = None;
                        }
                    }
                }
                Op::Store { dev, entry } => {
                    stamp += 1;
                    let (_, before) = el.read(entry).unwrap();
                    let got = devs[dev].cmd(&format!("store {entry} 8 {stamp}"));
                    let (_, after) = el.read(entry).unwrap();
                    let landed = after[..8] == stamp.to_le_bytes();
                    if m.holder[entry as usize].map(|h| h.0) == Some(dev) {
                        prop_assert_eq!(got, "stored");
                        prop_assert!(landed);
                    } else {
                        prop_assert_eq!(got, "sigbus");
                        prop_assert_eq!(before, after, "a refused store changed the entry");
                    }
                }
                Op::Crash { dev } => {
                    let old = devs[dev].id;
                    devs[dev].kill9();
                    wait_until("the crashed device is detached", || el.devices().iter().all(|d| d.id != old));
                    for h in &mut m.holder {
                        if h.is_some_and(|(d, _)| d == dev) {
                            *h = None;
                        }
                    }
                    m.guards[dev].clear();
                    devs[dev] = DeviceProc::spawn(&sock);
                }
            }
            for e in 0..ENTRIES {
                let want = m.holder[e as usize].map(|(d, _)| devs[d].id);
                prop_assert_eq!(el.holder(e), want, "holder of entry {}", e);
            }
        }
    }
}
