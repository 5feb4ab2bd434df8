use shm::{Element, ElementConfig};

use crate::{storm_counts, wait_until, DeviceProc};

/// Stray stores in the four kinds land nowhere: to another device's
/// granted entry, to an entry never granted, to an entry after its grant was
/// revoked, and after the element restarted. A million in all.
#[test]
fn a_million_stray_stores_land_nowhere() {
    const PER_STORM: u64 = 250_000;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("t.sock");
    let el = Element::start(ElementConfig::new(&sock, 64, 4088)).unwrap();
    for e in 0..64 {
        el.write(e, &shm::selfcheck::payload(u64::from(e) + 1, 4088 / 8))
            .unwrap();
    }
    let mut a = DeviceProc::spawn(&sock);
    let mut b = DeviceProc::spawn(&sock);
    for e in 0..8 {
        assert!(a.cmd(&format!("req {e} 0")).starts_with("granted"));
    }
    // b: everything it holds no grant for, a's granted entries included.
    assert_eq!(
        storm_counts(&b.cmd(&format!("storm {PER_STORM} 1"))),
        (0, PER_STORM)
    );
    // a: the entries it does not hold.
    let (stored, sigbus) = storm_counts(&a.cmd(&format!("storm {PER_STORM} 2")));
    assert_eq!(stored, 0);
    assert!(sigbus > PER_STORM / 2);
    // a, after giving its grants back: the guards are gone, so the storm
    // covers the revoked entries too.
    for e in 0..8 {
        assert_eq!(a.cmd(&format!("rel {e}")), "released");
    }
    assert_eq!(
        storm_counts(&a.cmd(&format!("storm {PER_STORM} 3"))),
        (0, PER_STORM)
    );
    for e in 0..64 {
        let (v, data) = el.read(e).unwrap();
        assert_eq!(
            (v, data),
            (2, shm::selfcheck::payload(u64::from(e) + 1, 4088 / 8)),
            "entry {e}"
        );
    }
    // The element restarts (a new table on the same socket): the devices'
    // mappings of the old table stay write-protected.
    drop(el);
    let el = Element::start(ElementConfig::new(&sock, 64, 4088)).unwrap();
    assert_eq!(
        storm_counts(&b.cmd(&format!("storm {PER_STORM} 4"))),
        (0, PER_STORM)
    );
    assert_eq!(
        b.cmd("read 5"),
        "read 2 ok",
        "the old table as the device sees it"
    );
    for e in 0..64 {
        assert_eq!(el.read(e).unwrap(), (0, vec![0u8; 4088]));
    }
    let mut c = DeviceProc::spawn(&sock);
    wait_until("the new device attached", || el.devices().len() == 1);
    assert_eq!(c.cmd("store 0 8 1"), "sigbus");
}
