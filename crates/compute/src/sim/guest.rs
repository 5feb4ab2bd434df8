//! The simulated guest: what vinfra's test guest (`scripts/build-guest.sh`) does and prints
//! on its serial console, as pure functions. No clock, no I/O: the VM actor
//! (`sim/actor.rs`) feeds in times and disk results and writes the lines out.
//!
//! Same protocol as the real guest, so that everything that reads consoles (the agent's
//! reports, `vinfra vm create`'s wait for `READY`, the tests' TICK parsers) works
//! unchanged:
//!
//! ```text
//! GUEST: init started, uptime 0.00s           once per boot (none after a migration)
//! GUEST: NIC eth0 mac=<mac> ip=<a.b.c.d/p>    one per vinfra.nic= (before READY)
//! GUEST: READY vda=<MiB>MiB uptime <s>s       the disk is there, the workload starts
//! TICK <i> up=<s> off=<MiB>MiB read=ok|BAD(..) write=ok|BAD(..)   one per tick
//! GUEST: POWEROFF reason=<why>                last line before the guest powers off
//! ```
//!
//! Each tick reads the block at MiB `(i*37) % (vda-1)` and checks its `BLK%06d` header
//! (the default image's disk template starts every MiB with one), then writes a
//! `SEQ%08d` record into the last MiB, flushes and reads it back. The real guest reads
//! 1 MiB per tick; the simulated one reads one 64 KiB cache block, which exercises the
//! same path (the host's block cache) at a sixteenth of the bytes.

use serde::{Deserialize, Serialize};

/// Bytes the simulated guest reads per tick (one cache block).
pub const TICK_READ_BYTES: usize = 64 * 1024;
/// Bytes of the sequence record (one guest page, padded with zeros as `dd conv=sync` does).
pub const SEQ_RECORD_BYTES: usize = 4096;
const MIB: u64 = 1 << 20;

/// The guest's knobs from the kernel command line (`vinfra.*=`), as the real guest's
/// `/init` reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestArgs {
    /// `vinfra.tick_ms`: pause between ticks (default 100).
    pub tick_ms: u64,
    /// `vinfra.ticks`: power off after this many ticks (0: never).
    pub ticks: u64,
    /// `vinfra.nic=<mac>,<ip>/<prefix>[,<cp>]`, in order.
    pub nics: Vec<GuestNic>,
}

/// One `vinfra.nic=` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNic {
    /// The MAC.
    pub mac: String,
    /// `a.b.c.d/p`.
    pub addr: String,
}

impl GuestArgs {
    /// Reads the knobs; unknown or malformed ones are ignored, like the shell `case` does.
    pub fn parse(cmdline: &str) -> Self {
        let mut out = GuestArgs {
            tick_ms: 100,
            ticks: 0,
            nics: Vec::new(),
        };
        for a in cmdline.split_whitespace() {
            if let Some(v) = a.strip_prefix("vinfra.tick_ms=") {
                out.tick_ms = v.parse().unwrap_or(out.tick_ms);
            } else if let Some(v) = a.strip_prefix("vinfra.ticks=") {
                out.ticks = v.parse().unwrap_or(out.ticks);
            } else if let Some(v) = a.strip_prefix("vinfra.nic=") {
                let mut parts = v.split(',');
                if let (Some(mac), Some(addr)) = (parts.next(), parts.next()) {
                    out.nics.push(GuestNic {
                        mac: mac.to_owned(),
                        addr: addr.to_owned(),
                    });
                }
            }
        }
        out
    }
}

/// The guest's RAM as far as the simulation needs it: what a live migration carries
/// (the tick counter lives in guest RAM, so it continues on the destination).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMemory {
    /// The next tick's number.
    pub next_tick: u64,
    /// Guest uptime, ms, when this was taken.
    pub uptime_ms: u64,
    /// The workload runs (`READY` was printed); `false` while booting.
    pub ready: bool,
    /// The disk size the guest saw at boot, MiB.
    pub disk_mib: u64,
}

impl GuestMemory {
    /// The guest's state recovered from the end of its console log (the last `TICK`
    /// line), for a hypervisor that picks up a guest it did not start. `None` when the
    /// log shows no tick.
    pub fn from_console(text: &str) -> Option<GuestMemory> {
        let (tick, up) = text.lines().rev().find_map(|l| {
            let rest = l.strip_prefix("TICK ")?;
            let mut words = rest.split_whitespace();
            let tick: u64 = words.next()?.parse().ok()?;
            let up = words
                .next()
                .and_then(|w| w.strip_prefix("up="))
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0);
            Some((tick, up))
        })?;
        let disk_mib = text
            .lines()
            .rev()
            .find_map(|l| {
                l.strip_prefix("GUEST: READY vda=")?
                    .split("MiB")
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0);
        Some(GuestMemory {
            next_tick: tick.saturating_add(1),
            uptime_ms: secs_to_ms(up),
            ready: true,
            disk_mib,
        })
    }
}

fn secs_to_ms(s: f64) -> u64 {
    let ms = (s * 1000.0).round();
    if (0.0..1.0e15).contains(&ms) {
        // In range and integral, so the cast is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        {
            ms as u64
        }
    } else {
        0
    }
}

fn secs(ms: u64) -> String {
    format!("{}.{:02}", ms / 1000, (ms % 1000) / 10)
}

/// What a tick's disk check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// The data was right.
    Ok,
    /// It was not: what the guest saw instead (or the I/O error).
    Bad(String),
    /// The simulation does no disk I/O ([`super::SimConfig::disk_io`] off).
    Off,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Check::Ok => f.write_str("ok"),
            Check::Bad(s) => write!(f, "BAD({s})"),
            Check::Off => f.write_str("off"),
        }
    }
}

/// The first console line of a boot.
pub fn init_line(uptime_ms: u64) -> String {
    format!("GUEST: init started, uptime {}s", secs(uptime_ms))
}

/// The NIC lines of a boot, one per `vinfra.nic=` (devices in order, `eth0` first).
pub fn nic_lines(args: &GuestArgs) -> Vec<String> {
    args.nics
        .iter()
        .enumerate()
        .map(|(i, n)| format!("GUEST: NIC eth{i} mac={} ip={}", n.mac, n.addr))
        .collect()
}

/// What the guest found at `/dev/vda` when it booted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSeen {
    /// A disk of this many MiB.
    Mib(u64),
    /// None: the disk could not be opened (why).
    Missing(String),
    /// Not looked at: the simulation does no disk I/O.
    Unchecked,
}

/// What the guest does once its disk is there: `Ok(READY line)`, or the fatal line and
/// the power-off reason when the disk is missing or too small.
pub fn ready(disk: &DiskSeen, uptime_ms: u64) -> Result<String, (String, &'static str)> {
    let mib = match disk {
        DiskSeen::Missing(_) => return Err(("GUEST: FATAL no /dev/vda".into(), "no-disk")),
        DiskSeen::Mib(m) if *m < 2 => {
            return Err(("GUEST: FATAL disk too small".into(), "disk-too-small"))
        }
        DiskSeen::Mib(m) => *m,
        DiskSeen::Unchecked => 0,
    };
    Ok(format!(
        "GUEST: READY vda={mib}MiB uptime {}s",
        secs(uptime_ms)
    ))
}

/// The MiB tick `i` reads, on a disk of `disk_mib` MiB (the last MiB is the scratch area).
pub fn tick_offset_mib(i: u64, disk_mib: u64) -> u64 {
    let last = disk_mib.saturating_sub(1).max(1);
    i.wrapping_mul(37) % last
}

/// The header every MiB `off` of the template starts with.
pub fn block_header(off_mib: u64) -> String {
    format!("BLK{off_mib:06}")
}

/// The record tick `i` writes (padded to [`SEQ_RECORD_BYTES`] with zeros).
pub fn seq_record(i: u64) -> Vec<u8> {
    let mut v = format!("SEQ{i:08}").into_bytes();
    v.resize(SEQ_RECORD_BYTES, 0);
    v
}

/// Byte offset of the sequence record on a disk of `disk_mib` MiB.
pub fn seq_offset(disk_mib: u64) -> u64 {
    disk_mib.saturating_sub(1) * MIB
}

/// Byte offset of the block tick `i` reads.
pub fn read_offset(i: u64, disk_mib: u64) -> u64 {
    tick_offset_mib(i, disk_mib) * MIB
}

/// The read check: the first bytes of what was read against the header expected there.
pub fn check_read(i: u64, disk_mib: u64, data: &[u8]) -> Check {
    check_prefix(&block_header(tick_offset_mib(i, disk_mib)), data)
}

/// The write check: what was read back against the record written.
pub fn check_write(i: u64, data: &[u8]) -> Check {
    check_prefix(&format!("SEQ{i:08}"), data)
}

fn check_prefix(want: &str, data: &[u8]) -> Check {
    let got = &data[..data.len().min(want.len())];
    if got == want.as_bytes() {
        Check::Ok
    } else {
        // The shell drops NUL bytes from `$(...)`: a zeroed block shows as BAD().
        let shown: String = String::from_utf8_lossy(got)
            .chars()
            .filter(|c| *c != '\0')
            .collect();
        Check::Bad(shown)
    }
}

/// One tick's console line.
pub fn tick_line(i: u64, uptime_ms: u64, disk_mib: u64, read: &Check, write: &Check) -> String {
    format!(
        "TICK {i} up={} off={}MiB read={read} write={write}",
        secs(uptime_ms),
        tick_offset_mib(i, disk_mib)
    )
}

/// The last line before the guest powers off.
pub fn poweroff_line(reason: &str) -> String {
    format!("GUEST: POWEROFF reason={reason}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_knobs_the_real_guest_reads() {
        let a = GuestArgs::parse(
            "console=ttyS0 quiet vinfra.tick_ms=250 vinfra.ticks=3 \
             vinfra.nic=02:aa:bb:46:00:01,10.70.0.1/24,fw-cp vinfra.nic=bad vinfra.tick_ms=x",
        );
        assert_eq!(a.tick_ms, 250);
        assert_eq!(a.ticks, 3);
        assert_eq!(
            a.nics,
            vec![GuestNic {
                mac: "02:aa:bb:46:00:01".into(),
                addr: "10.70.0.1/24".into()
            }]
        );
        assert_eq!(GuestArgs::parse("").tick_ms, 100);
        assert_eq!(
            nic_lines(&a),
            vec!["GUEST: NIC eth0 mac=02:aa:bb:46:00:01 ip=10.70.0.1/24"]
        );
    }

    #[test]
    fn lines_match_the_real_guest() {
        assert_eq!(init_line(1234), "GUEST: init started, uptime 1.23s");
        assert_eq!(
            ready(&DiskSeen::Mib(64), 50).unwrap(),
            "GUEST: READY vda=64MiB uptime 0.05s"
        );
        assert_eq!(ready(&DiskSeen::Mib(1), 0).unwrap_err().1, "disk-too-small");
        assert_eq!(
            ready(&DiskSeen::Missing("x".into()), 0).unwrap_err().1,
            "no-disk"
        );
        assert!(ready(&DiskSeen::Unchecked, 0).is_ok());
        assert_eq!(
            tick_line(3, 2_500, 64, &Check::Ok, &Check::Bad("SEQ".into())),
            "TICK 3 up=2.50 off=48MiB read=ok write=BAD(SEQ)"
        );
        assert_eq!(
            poweroff_line("ticks-done"),
            "GUEST: POWEROFF reason=ticks-done"
        );
    }

    #[test]
    fn checks_compare_headers_and_records() {
        let mut blk = block_header(tick_offset_mib(2, 64)).into_bytes();
        blk.resize(TICK_READ_BYTES, 0);
        assert_eq!(check_read(2, 64, &blk), Check::Ok);
        assert_eq!(check_read(3, 64, &blk), Check::Bad("BLK000011".into()));
        assert_eq!(check_read(3, 64, &[0u8; 16]), Check::Bad(String::new()));
        assert_eq!(check_write(7, &seq_record(7)), Check::Ok);
        assert!(matches!(check_write(8, &seq_record(7)), Check::Bad(_)));
        assert_eq!(seq_record(1).len(), SEQ_RECORD_BYTES);
        assert_eq!(seq_offset(64), 63 << 20);
        // Offsets stay off the scratch MiB, also on tiny disks.
        for i in 0..200 {
            assert!(tick_offset_mib(i, 64) < 63);
            assert_eq!(tick_offset_mib(i, 2), 0);
        }
    }

    #[test]
    fn memory_is_recovered_from_the_console() {
        let log = "GUEST: init started, uptime 0.00s\nGUEST: READY vda=64MiB uptime 0.30s\n\
                   TICK 0 up=0.40 off=0MiB read=ok write=ok\nTICK 1 up=1.42 off=37MiB read=ok wr";
        let m = GuestMemory::from_console(log).unwrap();
        assert_eq!(
            m,
            GuestMemory {
                next_tick: 2,
                uptime_ms: 1420,
                ready: true,
                disk_mib: 64
            }
        );
        assert_eq!(GuestMemory::from_console("GUEST: init started"), None);
    }
}
