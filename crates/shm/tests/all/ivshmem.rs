//! A guest's view of a table through QEMU, driven with qtest as QEMU's own
//! `tests/qtest/ivshmem-test.c` does: the table's memfd behind a read-only
//! `memory-backend-file` and an `ivshmem-plain` device. The table is visible at
//! the device's BAR 2; the guest's stores to it are dropped (the table and the
//! element's view unchanged).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use shm::{Element, ElementConfig};

/// Where the test maps BAR 2 in guest-physical memory (inside the `pc` machine's
/// PCI hole with 128 MiB of RAM).
const BAR: u64 = 0xc000_0000;
/// The ivshmem device's PCI slot (bus 0).
const SLOT: u32 = 4;

pub(crate) struct Qtest {
    r: BufReader<UnixStream>,
    w: UnixStream,
    /// The PCI slot `cfg_read`/`cfg_write` address.
    pub slot: u32,
}

impl Qtest {
    pub fn cmd(&mut self, c: &str) -> String {
        writeln!(self.w, "{c}").unwrap();
        loop {
            let mut l = String::new();
            assert!(
                self.r.read_line(&mut l).unwrap() > 0,
                "qtest closed after {c}"
            );
            // Asynchronous lines (interrupts) are not answers.
            if l.starts_with("OK") || l.starts_with("FAIL") || l.starts_with("ERR") {
                assert!(l.starts_with("OK"), "{c}: {l}");
                return l.trim_end().trim_start_matches("OK").trim().to_owned();
            }
        }
    }

    fn cfg_addr(&self, reg: u32) -> String {
        format!("outl 0xcf8 {:#x}", 0x8000_0000u32 | (self.slot << 11) | reg)
    }

    pub fn cfg_read(&mut self, reg: u32) -> u32 {
        {
            let a = self.cfg_addr(reg);
            self.cmd(&a);
        }
        let v = self.cmd("inl 0xcfc");
        u32::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
    }

    pub fn cfg_write(&mut self, reg: u32, v: u32) {
        {
            let a = self.cfg_addr(reg);
            self.cmd(&a);
        }
        self.cmd(&format!("outl 0xcfc {v:#x}"));
    }

    pub fn readq(&mut self, addr: u64) -> u64 {
        let v = self.cmd(&format!("readq {addr:#x}"));
        u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
    }
}

/// QEMU started stopped (`-S`) with `extra` arguments, connected to a qtest
/// socket in `dir`.
pub(crate) fn start_qemu(dir: &std::path::Path, extra: &[String]) -> (Qemu, Qtest) {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("qemu-system-x86_64 is needed (scripts/setup.sh installs it)");
    }
    let sock = dir.join("qtest.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut qemu = Command::new("qemu-system-x86_64")
        // `-S`: no vCPU runs (the firmware would probe PCI through the same ports);
        // this QEMU build has no `qtest` accelerator, so qtest drives a stopped machine.
        .args([
            "-S",
            "-M",
            "pc",
            "-m",
            "128M",
            "-display",
            "none",
            "-nodefaults",
        ])
        .arg("-qtest")
        .arg(format!("unix:{}", sock.display()))
        .args(["-qtest-log", "/dev/null"])
        .args(extra)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu");
    // QEMU connects to us; if it exits instead (a bad option), say why.
    listener.set_nonblocking(true).unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(30);
    let conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if qemu.try_wait().unwrap().is_some() || std::time::Instant::now() > end {
            let _ = qemu.kill();
            let out = qemu.wait_with_output().unwrap();
            panic!(
                "qemu did not connect: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let q = Qtest {
        r: BufReader::new(conn.try_clone().unwrap()),
        w: conn,
        slot: SLOT,
    };
    (Qemu(qemu), q)
}

/// A QEMU process, killed when the test ends (also when it fails).
pub(crate) struct Qemu(pub std::process::Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_guest_sees_the_table_read_only_through_ivshmem() {
    let dir = tempfile::tempdir().unwrap();
    // 16 entries of one page: a 64 KiB table, a power of two as a BAR must be.
    let el = Element::start(ElementConfig::new(dir.path().join("t.sock"), 16, 4088)).unwrap();
    let slot = el.layout().slot_size() as u64;
    let size = el.layout().table_bytes();
    let payload: Vec<u8> = (0..64u8).collect();
    let version = el.write(1, &payload).unwrap();

    let mem_path = format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        el.table_fd().as_raw_fd()
    );
    let (_qemu, mut q) = start_qemu(
        dir.path(),
        &[
            "-object".into(),
            format!(
                "memory-backend-file,id=table,mem-path={mem_path},size={size},share=on,readonly=on"
            ),
            "-device".into(),
            format!("ivshmem-plain,memdev=table,addr={SLOT:#x}"),
        ],
    );

    // Red Hat's ivshmem ids (1af4:1110), as the guest's driver would find them.
    assert_eq!(q.cfg_read(0), 0x1110_1af4);
    // BAR 2 is a 64-bit prefetchable memory BAR of the table's size.
    q.cfg_write(0x18, 0xffff_ffff);
    let mask = q.cfg_read(0x18) & !0xf;
    assert_eq!(u64::from(!mask) + 1, size as u64, "BAR 2 size");
    q.cfg_write(0x18, BAR as u32);
    q.cfg_write(0x1c, 0);
    // Memory space on.
    q.cfg_write(0x04, 0x2);

    // The entry the element wrote, sequence word and payload, at the BAR.
    let at = BAR + slot;
    assert_eq!(q.readq(at), version);
    let word = |i: usize| u64::from_le_bytes(payload[i * 8..i * 8 + 8].try_into().unwrap());
    assert_eq!(q.readq(at + 8), word(0));
    assert_eq!(q.readq(at + 16), word(1));

    // The guest's stores go nowhere: not into the entry, not into its sequence word,
    // not into an entry never written.
    for (addr, v) in [(at + 8, 0xdead_beef_u64), (at, 1), (BAR + 3 * slot + 64, 7)] {
        q.cmd(&format!("writeq {addr:#x} {v:#x}"));
    }
    assert_eq!(q.readq(at + 8), word(0));
    assert_eq!(q.readq(at), version);
    assert_eq!(q.readq(BAR + 3 * slot + 64), 0);
    let (v, bytes) = el.read(1).unwrap();
    assert_eq!((v, &bytes[..64]), (version, &payload[..]));
    assert_eq!(el.read(3).unwrap().0, 0);

    // Written by the element later: the guest sees the new version at once (one
    // memory, no copy).
    let v2 = el.write(1, &[9u8; 16]).unwrap();
    assert_eq!(q.readq(at), v2);
    assert_eq!(q.readq(at + 8), u64::from_le_bytes([9; 8]));
}
