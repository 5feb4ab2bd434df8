//! A VM as a device, through QEMU driven by qtest: the table read-only at an
//! `ivshmem-plain` BAR, and the VM's own window at an `ivshmem-doorbell`
//! whose server is the element. The guest writes an entry only by asking
//! through the window: without a grant nothing lands, with one the element
//! copies the window into the entry as one new version, and the entry is the
//! guest's alone while it holds it. QEMU's exit revokes what it held.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use shm::{AuditKind, Element, ElementConfig, RevokeReason, WINDOW_PAYLOAD};

use crate::ivshmem::{start_qemu, Qtest};
use crate::{wait_until, DeviceProc};

/// Guest-physical addresses the test programs the BARs to.
const TABLE: u64 = 0xc000_0000;
const WINDOW: u64 = 0xc010_0000;
const REGS: u64 = 0xfebf_0000;
const TABLE_SLOT: u32 = 4;
const WINDOW_SLOT: u32 = 5;

// The window's request/answer words (`shm::GuestWindow`'s layout).
const REQ_SEQ: u64 = 0;
const REQ_OP: u64 = 8;
const REQ_ENTRY: u64 = 16;
const RESP_SEQ: u64 = 64;
const RESP_STATUS: u64 = 72;
const RESP_VALUE: u64 = 80;
const OP_REQUEST: u64 = 1;
const OP_RELEASE: u64 = 2;
const OP_COMMIT: u64 = 4;
const OP_WRITE: u64 = 5;
const ST_GRANTED: u64 = 1;
const ST_RELEASED: u64 = 2;
const ST_HELD: u64 = 3;
const ST_NO_SUCH_ENTRY: u64 = 4;
const ST_NOT_HELD: u64 = 5;
const ST_COMMITTED: u64 = 7;

struct Guest {
    q: Qtest,
    seq: u64,
}

impl Guest {
    fn writeq(&mut self, addr: u64, v: u64) {
        self.q.cmd(&format!("writeq {addr:#x} {v:#x}"));
    }

    fn readl(&mut self, addr: u64) -> u64 {
        let v = self.q.cmd(&format!("readl {addr:#x}"));
        u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
    }

    /// Fills the window's payload with `words`.
    fn fill(&mut self, words: &[u64]) {
        for (i, w) in words.iter().enumerate() {
            self.writeq(WINDOW + WINDOW_PAYLOAD as u64 + 8 * i as u64, *w);
        }
    }

    /// One request: the words, the doorbell, then the answer polled in the
    /// window as a guest driver would (the vCPUs are stopped: no interrupt
    /// handler runs).
    fn request(&mut self, op: u64, entry: u64) -> (u64, u64) {
        self.seq += 1;
        self.writeq(WINDOW + REQ_OP, op);
        self.writeq(WINDOW + REQ_ENTRY, entry);
        self.writeq(WINDOW + REQ_SEQ, self.seq);
        // DOORBELL (BAR 0 + 12): peer 0 (the element), vector 0.
        self.q.cmd(&format!(
            "writel {:#x} {:#x}",
            REGS + 12,
            u32::from(shm::ELEMENT_PEER) << 16
        ));
        let end = Instant::now() + Duration::from_secs(10);
        while self.q.readq(WINDOW + RESP_SEQ) != self.seq {
            assert!(
                Instant::now() < end,
                "no answer to op {op} on entry {entry}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        (
            self.q.readq(WINDOW + RESP_STATUS),
            self.q.readq(WINDOW + RESP_VALUE),
        )
    }
}

fn pattern(tag: u64, n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| (tag << 32) | i).collect()
}

fn words_of(bytes: &[u8], n: usize) -> Vec<u64> {
    bytes[..n * 8]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn a_guest_writes_an_entry_through_its_window_only_under_a_grant() {
    let dir = tempfile::tempdir().unwrap();
    // 16 entries of one page: a 64 KiB table.
    let mut cfg = ElementConfig::new(dir.path().join("t.sock"), 16, 4088);
    // No grant timeout: QEMU may take longer than the default 10 s to start on
    // a loaded machine, and the process device's grant must outlast it.
    cfg.max_grant = None;
    let el = Element::start(cfg).unwrap();
    let slot = el.layout().slot_size() as u64;
    let n = el.layout().entry_size() as usize / 8;
    // A process device holds entry 3.
    let mut dev = DeviceProc::spawn(el.socket_path());
    assert!(dev.cmd("req 3 0").starts_with("granted"));

    let win = el.attach_guest(&dir.path().join("w.sock"), "vm-a").unwrap();
    let mem_path = format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        el.table_fd().as_raw_fd()
    );
    let (mut qemu, mut q) = start_qemu(
        dir.path(),
        &[
            "-object".into(),
            format!(
                "memory-backend-file,id=table,mem-path={mem_path},size={},share=on,readonly=on",
                el.table_file_bytes()
            ),
            "-device".into(),
            format!("ivshmem-plain,memdev=table,addr={TABLE_SLOT:#x}"),
            "-chardev".into(),
            format!("socket,id=win,path={}", win.socket.display()),
            "-device".into(),
            format!("ivshmem-doorbell,chardev=win,vectors=1,addr={WINDOW_SLOT:#x}"),
        ],
    );
    // QEMU connected while it built the device: the guest is a device, with
    // QEMU's pid, and its socket is gone (one QEMU per window).
    wait_until("the guest attached", || {
        el.devices()
            .iter()
            .any(|d| d.id == win.device && d.guest.as_deref() == Some("vm-a"))
    });
    let info = el
        .devices()
        .into_iter()
        .find(|d| d.id == win.device)
        .unwrap();
    assert_eq!(info.pid, qemu.0.id() as i32);
    assert!(!win.socket.exists());

    // Map both BARs as a guest's firmware would.
    q.slot = TABLE_SLOT;
    q.cfg_write(0x18, TABLE as u32);
    q.cfg_write(0x1c, 0);
    q.cfg_write(0x04, 0x2);
    q.slot = WINDOW_SLOT;
    assert_eq!(q.cfg_read(0), 0x1110_1af4);
    q.cfg_write(0x18, 0xffff_ffff);
    let mask = q.cfg_read(0x18) & !0xf;
    assert_eq!(
        u64::from(!mask) + 1,
        win.window_bytes as u64,
        "window BAR size"
    );
    q.cfg_write(0x10, REGS as u32);
    q.cfg_write(0x18, WINDOW as u32);
    q.cfg_write(0x1c, 0);
    q.cfg_write(0x04, 0x2);
    let mut g = Guest { q, seq: 0 };
    // IVPOSITION: the guest's id among the window's peers.
    assert_eq!(g.readl(REGS + 8), u64::from(shm::GUEST_PEER));

    let a = pattern(0xa, n);
    g.fill(&a);
    // A store into the table itself is dropped.
    g.writeq(TABLE + 2 * slot + 8, 0xdead);
    assert_eq!(g.q.readq(TABLE + 2 * slot + 8), 0);
    // No grant: a commit lands nowhere.
    assert_eq!(g.request(OP_COMMIT, 2), (ST_NOT_HELD, 0));
    assert_eq!(el.read(2).unwrap().0, 0);
    // Held by the process device: refused, naming it.
    assert_eq!(g.request(OP_REQUEST, 3), (ST_HELD, u64::from(dev.id)));
    assert_eq!(g.request(OP_WRITE, 3), (ST_HELD, u64::from(dev.id)));
    assert_eq!(g.request(OP_REQUEST, 99).0, ST_NO_SUCH_ENTRY);

    // Granted: the entry is the guest's, and the process is refused it.
    assert_eq!(g.request(OP_REQUEST, 2), (ST_GRANTED, 0));
    assert_eq!(el.holder(2), Some(win.device));
    assert_eq!(dev.cmd("req 2 0"), format!("held {}", win.device));
    let (st, v1) = g.request(OP_COMMIT, 2);
    assert_eq!(st, ST_COMMITTED);
    assert!(v1 > 0 && v1 % 2 == 0, "version {v1}");
    let (v, bytes) = el.read(2).unwrap();
    assert_eq!((v, words_of(&bytes, n)), (v1, a.clone()));
    // The guest sees the new version at the table's BAR; so does the process.
    assert_eq!(g.q.readq(TABLE + 2 * slot), v1);
    assert_eq!(g.q.readq(TABLE + 2 * slot + 8), a[0]);
    assert_eq!(g.q.readq(TABLE + 2 * slot + 8 * n as u64), a[n - 1]);
    assert!(dev.cmd("read 2").starts_with(&format!("read {v1} ")));
    // A second commit under the same grant is the next version.
    let b = pattern(0xb, n);
    g.fill(&b);
    assert_eq!(g.request(OP_COMMIT, 2), (ST_COMMITTED, v1 + 2));
    assert_eq!(words_of(&el.read(2).unwrap().1, n), b);
    assert_eq!(g.request(OP_RELEASE, 2), (ST_RELEASED, 0));
    assert_eq!(el.holder(2), None);
    // Released: a commit lands nowhere again.
    g.fill(&a);
    assert_eq!(g.request(OP_COMMIT, 2), (ST_NOT_HELD, 0));
    assert_eq!(words_of(&el.read(2).unwrap().1, n), b);

    // One doorbell: grant, copy, release.
    let r = dev.cmd("rel 3");
    assert_eq!(r, "released");
    let (st, v3) = g.request(OP_WRITE, 3);
    assert_eq!(st, ST_COMMITTED);
    assert_eq!(el.read(3).unwrap(), (v3, el.read(3).unwrap().1));
    assert_eq!(words_of(&el.read(3).unwrap().1, n), a);
    assert_eq!(el.holder(3), None);

    // In the audit as a device like any other.
    let audit = el.audit(0);
    let of_guest = |k: &AuditKind, e: Option<u32>| {
        audit
            .iter()
            .any(|r| r.device == win.device && &r.kind == k && r.entry == e)
    };
    assert!(of_guest(&AuditKind::Attached, None));
    assert!(of_guest(&AuditKind::Refused { holder: dev.id }, Some(3)));
    assert!(of_guest(&AuditKind::Granted, Some(2)));
    assert!(of_guest(
        &AuditKind::Revoked {
            reason: RevokeReason::Released
        },
        Some(3)
    ));

    // QEMU dies holding a grant: revoked as the device gone, guest detached.
    assert_eq!(g.request(OP_REQUEST, 5).0, ST_GRANTED);
    assert_eq!(el.holder(5), Some(win.device));
    qemu.0.kill().unwrap();
    qemu.0.wait().unwrap();
    wait_until("the guest's grant was revoked", || el.holder(5).is_none());
    wait_until("the guest detached", || {
        el.devices().iter().all(|d| d.id != win.device)
    });
    assert!(el.audit(0).iter().any(|r| r.device == win.device
        && r.entry == Some(5)
        && r.kind
            == AuditKind::Revoked {
                reason: RevokeReason::DeviceGone
            }));
    // The process device is untouched and can now take entry 5.
    assert!(dev.cmd("req 5 0").starts_with("granted"));
}

#[test]
fn a_window_nobody_connected_to_is_detached_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let el = Element::start(ElementConfig::new(dir.path().join("t.sock"), 4, 248)).unwrap();
    let win = el.attach_guest(&dir.path().join("w.sock"), "vm-b").unwrap();
    assert!(win.socket.exists());
    assert_eq!(win.window_bytes, 8192);
    // Not a device until its QEMU connects.
    assert!(el.devices().is_empty());
    el.detach(win.device).unwrap();
    assert!(!win.socket.exists());
    assert!(el.detach(win.device).is_err());
    // A window on a path that cannot be bound is an error, not a panic.
    assert!(el
        .attach_guest(&dir.path().join("no/such/dir/w.sock"), "vm-c")
        .is_err());
}
