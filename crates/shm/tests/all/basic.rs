use shm::{AuditKind, Element, ElementConfig, RevokeReason};

use crate::DeviceProc;

/// Grant, write through the guard, release; refused while another device
/// holds the entry; a stray store before and after the grant is SIGBUS.
#[test]
fn a_grant_is_for_one_device_and_one_entry() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("t.sock");
    let el = Element::start(ElementConfig::new(&sock, 8, 4088)).unwrap();
    let mut a = DeviceProc::spawn(&sock);
    let mut b = DeviceProc::spawn(&sock);
    assert_eq!(el.devices().len(), 2);

    assert_eq!(a.cmd("store 2 8 7"), "sigbus", "write before any grant");
    assert!(a.cmd("req 2 0").starts_with("granted"));
    assert_eq!(el.holder(2), Some(a.id));
    assert_eq!(b.cmd("req 2 0"), format!("held {}", a.id));
    assert_eq!(b.cmd("store 2 8 7"), "sigbus", "another device's entry");
    assert_eq!(a.cmd("store 3 8 7"), "sigbus", "a neighbouring entry");
    assert!(a.cmd("put 2 41").starts_with("put "));
    assert_eq!(b.cmd("read 2"), "read 2 ok");
    let (v, data) = el.read(2).unwrap();
    assert_eq!(v, 2);
    assert_eq!(data, shm::selfcheck::payload(41, 4088 / 8));
    assert_eq!(a.cmd("rel 2"), "released");
    assert_eq!(el.holder(2), None);
    assert_eq!(a.cmd("store 2 8 7"), "sigbus", "write after release");
    assert!(b.cmd("req 2 0").starts_with("granted"));
    assert_eq!(b.cmd("store 2 8 7"), "stored");

    let kinds: Vec<AuditKind> = el.audit(0).into_iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&AuditKind::Refused { holder: a.id }));
    assert!(kinds.contains(&AuditKind::Revoked {
        reason: RevokeReason::Released
    }));
    assert!(
        el.write(2, b"x").is_err(),
        "the element does not write a granted entry"
    );
}

/// Dropping a guard posts the release without waiting; the device's next
/// request collects the answer, and the entry is free for others.
#[test]
fn a_dropped_guard_releases() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("t.sock");
    let el = Element::start(ElementConfig::new(&sock, 8, 56)).unwrap();
    let mut a = DeviceProc::spawn(&sock);
    let mut b = DeviceProc::spawn(&sock);
    assert!(a.cmd("req 3 0").starts_with("granted"));
    assert_eq!(a.cmd("drop 3"), "dropped");
    assert!(a.cmd("req 4 0").starts_with("granted"));
    crate::wait_until("the dropped grant is revoked", || el.holder(3).is_none());
    assert_eq!(a.cmd("store 3 8 1"), "sigbus");
    assert!(b.cmd("req 3 0").starts_with("granted"));
    assert_eq!(el.holder(4), Some(a.id));
}

/// A grant with a timeout ends by itself; the device's next store faults.
#[test]
fn a_grant_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("t.sock");
    let el = Element::start(ElementConfig::new(&sock, 4, 56)).unwrap();
    let mut a = DeviceProc::spawn(&sock);
    assert!(a.cmd("req 1 30").starts_with("granted"));
    assert_eq!(a.cmd("store 1 8 9"), "stored");
    crate::wait_until("the grant expired", || el.holder(1).is_none());
    assert_eq!(a.cmd("store 1 8 10"), "sigbus");
    assert_eq!(a.cmd("rel 1"), "notheld");
    assert!(el.audit(0).iter().any(|e| e.kind
        == AuditKind::Revoked {
            reason: RevokeReason::Timeout
        }));
}

/// Bad shapes and entries are errors, not panics.
#[test]
fn bad_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("t.sock");
    assert!(Element::start(ElementConfig::new(&sock, 0, 64)).is_err());
    assert!(Element::start(ElementConfig::new(&sock, 4, 12)).is_err());
    assert!(Element::start(ElementConfig::new(&sock, 1 << 21, 64)).is_err());
    let el = Element::start(ElementConfig::new(&sock, 4, 64)).unwrap();
    assert!(el.grant(99, 0, None).is_err());
    assert!(el.read(4).is_err());
    assert!(el.write(0, &[0u8; 72]).is_err());
    let mut a = DeviceProc::spawn(&sock);
    assert!(a.cmd("req 9 0").starts_with("err entry 9 does not exist"));
}

/// A dropped guard does not wake the element (the device protected the entry
/// itself), yet the entry is free at once: another device's request for it is
/// granted, the element says nobody holds it, and two guards dropped in a row
/// are both released, each revoked once.
#[test]
fn a_dropped_guard_is_free_at_once_for_others() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("t.sock");
    let el = Element::start(ElementConfig::new(&sock, 8, 56)).unwrap();
    let mut a = DeviceProc::spawn(&sock);
    let mut b = DeviceProc::spawn(&sock);
    for e in [3, 5, 6] {
        assert!(a.cmd(&format!("req {e} 0")).starts_with("granted"));
    }
    assert_eq!(a.cmd("drop 3"), "dropped");
    assert!(b.cmd("req 3 0").starts_with("granted"), "a's entry 3");
    assert_eq!(el.holder(3), Some(b.id));
    assert_eq!(a.cmd("drop 5"), "dropped");
    assert_eq!(a.cmd("drop 6"), "dropped");
    assert_eq!(el.holder(5), None);
    assert_eq!(el.holder(6), None);
    for e in [3, 5, 6] {
        assert_eq!(a.cmd(&format!("store {e} 8 1")), "sigbus", "entry {e}");
    }
    let released: Vec<u32> = el
        .audit(0)
        .into_iter()
        .filter(|e| {
            e.device == a.id
                && e.kind
                    == AuditKind::Revoked {
                        reason: RevokeReason::Released,
                    }
        })
        .filter_map(|e| e.entry)
        .collect();
    assert_eq!(released, vec![3, 5, 6]);
}

/// A dropped guard's release goes beside the request words: asking again for
/// the same entry at once is served after the release, in either notification
/// mode, and the entry ends up writable by the device that asked last.
#[test]
fn a_request_right_after_a_dropped_guard_is_served_after_its_release() {
    for notify in [shm::Notify::EventFd, shm::Notify::Polled] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("t.sock");
        let mut cfg = ElementConfig::new(&sock, 8, 56);
        cfg.notify = notify;
        let el = Element::start(cfg).unwrap();
        let mut a = DeviceProc::spawn(&sock);
        let mut b = DeviceProc::spawn(&sock);
        for _ in 0..50 {
            // Asked again straight after its drop, the entry is granted again
            // without being write-protected in between by the element (the
            // device protected it): writable under each grant, never between.
            assert!(a.cmd("req 3 0").starts_with("granted"), "{notify:?}");
            assert_eq!(a.cmd("store 3 8 1"), "stored", "{notify:?}");
            assert_eq!(a.cmd("drop 3"), "dropped");
            assert_eq!(a.cmd("store 3 8 1"), "sigbus", "{notify:?}");
        }
        assert!(a.cmd("req 3 0").starts_with("granted"));
        assert_eq!(a.cmd("store 3 8 1"), "stored", "{notify:?}");
        assert_eq!(el.holder(3), Some(a.id));
        assert_eq!(a.cmd("drop 3"), "dropped");
        crate::wait_until("the last release is done", || el.holder(3).is_none());
        assert_eq!(a.cmd("store 3 8 1"), "sigbus", "{notify:?}");
        assert!(b.cmd("req 3 0").starts_with("granted"));
        let revoked = el
            .audit(0)
            .iter()
            .filter(|e| {
                e.kind
                    == AuditKind::Revoked {
                        reason: RevokeReason::Released,
                    }
            })
            .count();
        assert_eq!(revoked, 51, "{notify:?}: every posted release revoked once");
    }
}
