use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shm::{AuditKind, Device, Element, ElementConfig, RevokeReason};

use crate::{wait_until, DeviceProc};

/// `kill -9` of a device writing an entry as fast as it can: the element
/// notices (pidfd / socket), revokes, rolls back a half-written entry, and a
/// checksumming reader running throughout never sees a torn entry.
#[test]
fn kill_9_of_a_writer_revokes_and_nobody_reads_a_torn_entry() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("t.sock");
    let el = Element::start(ElementConfig::new(&sock, 4, 4088)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, torn) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (sock, stop, reads, torn) = (sock.clone(), stop.clone(), reads.clone(), torn.clone());
        std::thread::spawn(move || {
            let dev = Device::connect(&sock).unwrap();
            let mut buf = vec![0u8; 4088];
            while !stop.load(Ordering::Relaxed) {
                dev.read_into(1, &mut buf).unwrap();
                reads.fetch_add(1, Ordering::Relaxed);
                if !shm::selfcheck::verify(&buf) {
                    torn.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    for round in 0..8 {
        let mut w = DeviceProc::spawn(&sock);
        assert!(w.cmd("req 1 0").starts_with("granted"), "round {round}");
        w.send("spin 1");
        assert_eq!(w.read_line(), "spinning");
        std::thread::sleep(Duration::from_millis(5));
        w.kill9();
        wait_until("the dead writer's grant is revoked", || {
            el.holder(1).is_none()
        });
        assert!(el.audit(0).iter().any(|e| e.device == w.id
            && e.kind
                == AuditKind::Revoked {
                    reason: RevokeReason::DeviceGone
                }));
        wait_until("the dead writer is detached", || {
            el.devices().iter().all(|d| d.id != w.id)
        });
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert_eq!(torn.load(Ordering::Relaxed), 0, "a reader saw a torn entry");
    let (_, data) = el.read(1).unwrap();
    assert!(shm::selfcheck::verify(&data));
}

/// A device that dies mid-write (sequence word odd) leaves the entry rolled
/// back to its content when granted, as a new version.
#[test]
fn a_half_written_entry_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("t.sock");
    let el = Element::start(ElementConfig::new(&sock, 4, 4088)).unwrap();
    let before = shm::selfcheck::payload(7, 4088 / 8);
    assert_eq!(el.write(2, &before).unwrap(), 2);
    let mut w = DeviceProc::spawn(&sock);
    assert_eq!(w.cmd("req 2 0"), "granted 2");
    assert_eq!(w.cmd("put 2 8"), "put 4");
    // Start a write by hand (odd sequence word, one payload word) and die.
    assert_eq!(w.cmd("store 2 0 5"), "stored");
    assert_eq!(w.cmd("store 2 8 12345"), "stored");
    w.kill9();
    wait_until("the grant is revoked", || el.holder(2).is_none());
    let (version, data) = el.read(2).unwrap();
    assert_eq!(version, 6, "a new version after the torn one");
    assert_eq!(data, before, "the content at grant time");
    assert!(el
        .audit(0)
        .iter()
        .any(|e| e.kind == AuditKind::RolledBack && e.entry == Some(2)));
    assert_eq!(el.totals().rolled_back, 1);
}
