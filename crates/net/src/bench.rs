//! `vinfra bench vswitch`: classification + forwarding throughput of [`SwitchCore`] on an
//! in-memory frame stream, and on veth ports of four datapaths side by side: the Linux bridge
//! alone (`linux-bridge`, the baseline), the bridge with vinfra's BPF classifier on both ports
//! attached as on VM taps (`vinfra`; at the kernel's tcx hooks, forwarding from one port to the
//! other itself), the same with the classifier as clsact filters (`vinfra-clsact`, the
//! fallback where tcx is missing), the classifier leaving every frame to the bridge
//! (`vinfra-bridge-only`, the agent's `--bridge-only`), and the old user-space switch
//! (`userspace`). Rounds of the bridge and the classified paths take turns
//! (the order rotating), 25 rounds each of a tenth of the configured time; each row is its
//! path's median round, and a classified path's "vs bridge" is the median of its rounds'
//! ratios to the bridge round of the same turn, so neither a burst of other load nor one lucky
//! round decides the comparison. The sender and the receiver are pinned to different cores
//! (on a machine with two or more): the sender's core then does the forwarding of every round,
//! in softirq, and rounds differ only in the path under test (unpinned, the two threads' moves
//! between cores made the bridge alone vary by ±15% from run to run).
//!
//! In-memory rows run on one thread, so frames per CPU-second is frames per second per core.
//! Veth rows need root: they build throwaway namespaces `vb<pid>{s,w,r}` (sender, switch,
//! receiver), blast frames from `s` to `r` through `w` for the configured duration and count what
//! arrives. The bridge forwards in softirq context, so only the vswitch rows have a CPU figure.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::core::{CoreTimeouts, PortId, PortKind, SwitchCore, Verdict};
use crate::frame::build;
use crate::netns::{ip, LabError, NetnsLab};
use crate::rawsock::{RawPort, RawPortError, Recv};
use crate::switch::{PortConfig, Switch, SwitchConfig, SwitchError};
use crate::types::{AddressEntry, AddressTable, MacAddr, PortAddress};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Time per row.
    pub duration: Duration,
    /// Also run the veth rows (needs root).
    pub veth: bool,
    /// Frame sizes, bytes without FCS.
    pub frame_lens: Vec<usize>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            duration: Duration::from_secs(2),
            veth: true,
            frame_lens: vec![64, 1500],
        }
    }
}

/// One measured row.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchRow {
    /// `memory/vswitch`, `linux-bridge`, `vinfra` or `userspace`.
    pub path: String,
    /// Frame size.
    pub frame_len: usize,
    /// Frames offered (sent by the generator).
    pub offered: u64,
    /// Frames forwarded (arrived at the receiver, or processed in memory).
    pub forwarded: u64,
    /// Wall time.
    pub wall: Duration,
    /// Forwarded frames per second of wall time.
    pub frames_per_s: f64,
    /// Forwarded frames per CPU-second of the forwarding thread, when measurable.
    pub frames_per_cpu_s: Option<f64>,
    /// Kernel CPU time of the classifier per frame (ns; ingress + egress runs), `vinfra` rows.
    pub classify_ns_per_frame: Option<f64>,
    /// Against the bridge: the median over rounds of this path's frames/s over the bridge
    /// round's of the same turn, with the interquartile range of those ratios — the noise
    /// of the comparison (the classified paths' rows; others compare their frames/s).
    pub vs_bridge: Option<Ratio>,
}

impl BenchRow {
    /// Share of the offered frames that did not arrive.
    pub fn drop_ratio(&self) -> f64 {
        if self.offered == 0 {
            return 0.0;
        }
        1.0 - (self.forwarded.min(self.offered) as f64 / self.offered as f64)
    }

    /// The row as JSON: `path`, `frame_bytes`, `frames_per_s`, `drop_ratio` and the rest.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.path,
            "frame_bytes": self.frame_len,
            "frames_per_s": self.frames_per_s.round(),
            "drop_ratio": (self.drop_ratio() * 1e4).round() / 1e4,
            "offered": self.offered,
            "forwarded": self.forwarded,
            "wall_s": self.wall.as_secs_f64(),
            "frames_per_cpu_s": self.frames_per_cpu_s.map(f64::round),
            "classify_ns_per_frame": self.classify_ns_per_frame.map(|v| (v * 10.0).round() / 10.0),
            "vs_bridge": self.vs_bridge.map(|v| (v.p50 * 1e3).round() / 1e3),
            "vs_bridge_iqr": self.vs_bridge.map(|v| [(v.p25 * 1e3).round() / 1e3, (v.p75 * 1e3).round() / 1e3]),
        })
    }
}

/// A median ratio and its interquartile range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ratio {
    /// 25th percentile.
    pub p25: f64,
    /// Median.
    pub p50: f64,
    /// 75th percentile.
    pub p75: f64,
}

/// The benchmark's result.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BenchTable {
    /// Rows in run order.
    pub rows: Vec<BenchRow>,
}

impl fmt::Display for BenchTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| path | frame | offered | forwarded | frames/s | vs bridge (IQR) | drop | frames/s per core (CPU) | classify ns/frame |"
        )?;
        writeln!(
            f,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        )?;
        for r in &self.rows {
            let cpu = r
                .frames_per_cpu_s
                .map_or_else(|| "n/a (softirq)".to_owned(), |v| format!("{v:.0}"));
            let bridge = self
                .rows
                .iter()
                .find(|b| b.path == "linux-bridge" && b.frame_len == r.frame_len)
                .filter(|_| r.path != "memory/vswitch")
                .filter(|b| b.frames_per_s > 0.0)
                .map_or_else(
                    || "-".to_owned(),
                    |b| match r.vs_bridge {
                        Some(v) => format!("{:.2}x ({:.2}–{:.2})", v.p50, v.p25, v.p75),
                        None => format!("{:.2}x", r.frames_per_s / b.frames_per_s),
                    },
                );
            let ns = r
                .classify_ns_per_frame
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
            writeln!(
                f,
                "| {} | {} B | {} | {} | {:.0} | {} | {:.1}% | {} | {} |",
                r.path,
                r.frame_len,
                r.offered,
                r.forwarded,
                r.frames_per_s,
                bridge,
                r.drop_ratio() * 100.0,
                cpu,
                ns
            )?;
        }
        Ok(())
    }
}

/// The benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Namespace or veth setup failed (root needed).
    #[error("cannot build the benchmark topology")]
    Lab(#[from] LabError),
    /// A packet socket failed.
    #[error("packet socket")]
    Port(#[from] RawPortError),
    /// The switch failed.
    #[error("switch")]
    Switch(#[from] SwitchError),
    /// The BPF classifier could not be loaded or attached.
    #[error("kernel classifier")]
    Kernel(#[from] crate::kernel::KernelError),
}

fn mac(n: u8) -> MacAddr {
    MacAddr([0x02, 0x76, 0x62, 0, 0, n])
}

/// Runs every row the config asks for.
pub fn bench_vswitch(cfg: &BenchConfig) -> Result<BenchTable, BenchError> {
    let mut t = BenchTable::default();
    for &len in &cfg.frame_lens {
        t.rows.push(bench_memory(len, cfg.duration));
    }
    if cfg.veth {
        for &len in &cfg.frame_lens {
            t.rows.extend(bench_veth(len, cfg.duration)?);
        }
    }
    Ok(t)
}

fn thread_cpu() -> Duration {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::new(u64::try_from(tv.tv_sec()).unwrap_or(0), 0)
                    + Duration::from_micros(u64::try_from(tv.tv_usec()).unwrap_or(0))
            };
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or_default()
}

/// 8 VMs here, 8 on another host of the domain, and outsiders: every class and every verdict.
fn bench_memory(len: usize, duration: Duration) -> BenchRow {
    let ports: Vec<PortKind> = (0..8)
        .map(|n| {
            PortKind::Vm(PortAddress {
                vm: format!("vm{n}"),
                mac: mac(n),
                ip: None,
            })
        })
        .chain([PortKind::Uplink])
        .collect();
    let mut core = SwitchCore::new("bench".into(), "d".into(), ports, CoreTimeouts::default());
    let entries = (0..16)
        .map(|n| AddressEntry {
            switch: if n < 8 {
                "bench".into()
            } else {
                "other".into()
            },
            vm: format!("vm{n}"),
            mac: mac(n),
            ip: None,
        })
        .collect();
    core.apply_table(AddressTable {
        domain: "d".into(),
        version: 1,
        entries,
    });
    let mut stream = Vec::new();
    for i in 0..64u8 {
        let src = i % 8;
        let dst = match i % 3 {
            0 => (src + 1) % 8, // intra-server
            1 => 8 + src,       // inter-server
            _ => 100 + src,     // inter-domain
        };
        stream.push((
            PortId(u16::from(src)),
            build(mac(dst), mac(src), 0x0800, len),
        ));
    }
    // A valid IPv4 header so the header checks run as they would on real traffic.
    for (_, f) in &mut stream {
        if f.len() >= 34 {
            f[14] = 0x45;
            let total = u16::try_from(len - 14).unwrap_or(u16::MAX);
            f[16..18].copy_from_slice(&total.to_be_bytes());
        }
    }
    let mut tx = vec![0u8; 2048];
    let (start, cpu0) = (Instant::now(), thread_cpu());
    let mut n = 0u64;
    let mut now_ms = 0;
    while start.elapsed() < duration {
        for (port, f) in &stream {
            match core.process(*port, f, now_ms) {
                // The copy stands in for the transmit path's copy into a socket buffer.
                Verdict::Forward(_) | Verdict::Flood { .. } => {
                    tx[..f.len()].copy_from_slice(f);
                    std::hint::black_box(&tx);
                }
                Verdict::Drop(_) => {}
            }
        }
        n += stream.len() as u64;
        now_ms += 1;
    }
    let (wall, cpu) = (start.elapsed(), thread_cpu().saturating_sub(cpu0));
    BenchRow {
        path: "memory/vswitch".into(),
        frame_len: len,
        offered: n,
        forwarded: n,
        wall,
        frames_per_s: n as f64 / wall.as_secs_f64(),
        frames_per_cpu_s: (!cpu.is_zero()).then(|| n as f64 / cpu.as_secs_f64()),
        classify_ns_per_frame: None,
        vs_bridge: None,
    }
}

/// Blasts frames `s -> r` for `duration`; returns (offered, received).
fn pump(tx: &RawPort, rx: &RawPort, frame: &[u8], dst: MacAddr, duration: Duration) -> (u64, u64) {
    let done = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let sender = sc.spawn(|| {
            pin_to(0);
            let mut sent = 0u64;
            while !done.load(Ordering::Relaxed) {
                // ENOBUFS under overload is part of what is measured: count only accepted frames.
                if tx.send(frame).is_ok() {
                    sent += 1;
                }
            }
            sent
        });
        let receiver = sc.spawn(|| receive(rx, dst, duration, &done));
        (sender.join().unwrap_or(0), receiver.join().unwrap_or(0))
    })
}

/// Pins the calling thread to core `cpu`, when the machine has another one for the other
/// side (best effort: a refusal leaves the thread where the scheduler puts it).
fn pin_to(cpu: usize) {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return;
    }
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Counts the frames for `dst` arriving on `rx` for `duration`, then until 100 ms pass with
/// nothing (the pipeline drained); tells the sender to stop when the duration is up.
fn receive(rx: &RawPort, dst: MacAddr, duration: Duration, done: &AtomicBool) -> u64 {
    pin_to(1);
    let mut buf = vec![0u8; 2048];
    let mut got = 0u64;
    let start = Instant::now();
    let mut last_rx = Instant::now();
    loop {
        if start.elapsed() >= duration {
            done.store(true, Ordering::Relaxed);
            if last_rx.elapsed() > Duration::from_millis(100) {
                break;
            }
        }
        match rx.recv(&mut buf) {
            Ok(Recv::Frame(n)) if n >= 6 && buf[..6] == dst.0 => {
                got += 1;
                last_rx = Instant::now();
            }
            Ok(Recv::Frame(_)) | Ok(Recv::Outgoing) => {}
            Ok(Recv::Empty) | Err(_) => {
                let mut fds = [nix::poll::PollFd::new(
                    rx.fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10u8));
            }
        }
    }
    got
}

fn row(path: &str, len: usize, (offered, got): (u64, u64), wall: Duration) -> BenchRow {
    BenchRow {
        path: path.into(),
        frame_len: len,
        offered,
        forwarded: got,
        wall,
        frames_per_s: got as f64 / wall.as_secs_f64(),
        frames_per_cpu_s: None,
        classify_ns_per_frame: None,
        vs_bridge: None,
    }
}

/// Rounds per compared path (the median is kept), each the configured time over
/// [`ROUND_DIVISOR`].
const ROUNDS: usize = 25;
const ROUND_DIVISOR: u32 = 10;

/// The round with the median frames/s (`rounds` is never empty: [`ROUNDS`] > 0).
fn median(mut rounds: Vec<BenchRow>) -> Option<BenchRow> {
    rounds.sort_by(|a, b| a.frames_per_s.total_cmp(&b.frames_per_s));
    let mid = rounds.len() / 2;
    rounds.into_iter().nth(mid)
}

/// The rounds' ratios `path[i] / bridge[i]` (median and quartiles): on this machine a
/// round of the same path varies by ±15% with the hypervisor's other load, which moves two
/// adjacent rounds together, so a paired ratio is steadier than the ratio of two medians.
fn paired_ratio(path: &[BenchRow], bridge: &[BenchRow]) -> Option<Ratio> {
    let mut r: Vec<f64> = path
        .iter()
        .zip(bridge)
        .filter(|(_, b)| b.frames_per_s > 0.0)
        .map(|(p, b)| p.frames_per_s / b.frames_per_s)
        .collect();
    r.sort_by(f64::total_cmp);
    let at = |q: usize| r.get((r.len().saturating_sub(1)) * q / 4).copied();
    Some(Ratio {
        p25: at(1)?,
        p50: at(2)?,
        p75: at(3)?,
    })
}

/// Turns kernel BPF run-time statistics on while alive, restoring the previous setting.
struct BpfStats(Option<String>);

impl BpfStats {
    const KNOB: &'static str = "/proc/sys/kernel/bpf_stats_enabled";
    fn on() -> BpfStats {
        let prev = std::fs::read_to_string(Self::KNOB).ok();
        let _ = std::fs::write(Self::KNOB, "1");
        BpfStats(prev)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::write(Self::KNOB, p.trim());
        }
    }
}

fn bench_veth(len: usize, duration: Duration) -> Result<Vec<BenchRow>, BenchError> {
    let sfx = format!("{:x}", std::process::id() % 0xfffff);
    let (s, w, r) = (
        format!("vb{sfx}s"),
        format!("vb{sfx}w"),
        format!("vb{sfx}r"),
    );
    let mut lab = NetnsLab::new();
    for n in [&s, &w, &r] {
        lab.add(n)?;
    }
    let (ms, mr) = (mac(1), mac(2));
    lab.veth(&s, "eth0", &w, "ws", Some(&ms.to_string()))?;
    lab.veth(&r, "eth0", &w, "wr", Some(&mr.to_string()))?;
    let tx = RawPort::open(Some(&s), "eth0")?;
    let rx = RawPort::open(Some(&r), "eth0")?;
    let mut frame = build(mr, ms, 0x88b5, len);
    frame.truncate(len);
    let wall = duration;

    // The old user-space switch first (it needs the ports outside a bridge).
    let mut cfg = SwitchConfig::new("bench".into(), "bench".into());
    cfg.netns = Some(w.clone());
    cfg.ports = vec![
        PortConfig {
            ifname: "ws".into(),
            address: PortAddress {
                vm: "s".into(),
                mac: ms,
                ip: None,
            },
        },
        PortConfig {
            ifname: "wr".into(),
            address: PortAddress {
                vm: "r".into(),
                mac: mr,
                ip: None,
            },
        },
    ];
    cfg.report_interval = Duration::from_millis(200);
    let sw = Switch::start(cfg)?;
    let counts = pump(&tx, &rx, &frame, mr, duration);
    let st = sw.stop()?;
    let mut userspace = row("userspace", len, counts, wall);
    userspace.frames_per_cpu_s =
        (!st.cpu.is_zero()).then(|| counts.1 as f64 / st.cpu.as_secs_f64());

    // Four identical bridged paths side by side: the classifier on both ports at the
    // kernel's tcx hooks (as on a host's VM taps, where it counts at ingress of the sender's
    // and egress of the receiver's, and forwards from one to the other itself), the same as
    // clsact filters (the fallback where tcx is missing), the same leaving every frame to the
    // bridge (`--bridge-only`, a second instance), and the bridge alone; all set up once:
    // rounds go round them with no reconfiguration in between, whose process spawns would
    // otherwise weigh on the next round.
    let names = [
        "vinfra",
        "vinfra-clsact",
        "vinfra-bridge-only",
        "linux-bridge",
    ];
    let paths: Vec<(MacAddr, MacAddr, String, String, String, String)> = (0..names.len())
        .map(|i| {
            let n = u8::try_from(i).unwrap_or(0);
            let (eth, ws, wr) = if i == 0 {
                ("eth0".to_owned(), "ws".to_owned(), "wr".to_owned())
            } else {
                (format!("eth{i}"), format!("ws{i}"), format!("wr{i}"))
            };
            (
                mac(2 * n + 1),
                mac(2 * n + 2),
                eth,
                ws,
                wr,
                format!("br{i}"),
            )
        })
        .collect();
    let mut ports = Vec::new();
    for (i, (a, b, eth, ws, wr, br)) in paths.iter().enumerate() {
        if i > 0 {
            lab.veth(&s, eth, &w, ws, Some(&a.to_string()))?;
            lab.veth(&r, eth, &w, wr, Some(&b.to_string()))?;
        }
        ip(&["-n", &w, "link", "add", br, "type", "bridge"])?;
        ip(&["-n", &w, "link", "set", "dev", ws, "master", br])?;
        ip(&["-n", &w, "link", "set", "dev", wr, "master", br])?;
        ip(&["-n", &w, "link", "set", "dev", br, "up"])?;
        let (tx, rx) = if i == 0 {
            (None, None)
        } else {
            (
                Some(RawPort::open(Some(&s), eth)?),
                Some(RawPort::open(Some(&r), eth)?),
            )
        };
        let mut f = build(*b, *a, 0x88b5, len);
        f.truncate(len);
        ports.push((tx, rx, f, *b));
    }
    let tag = std::process::id();
    let dp = crate::kernel::KernelDatapath::open(&format!("bench-{tag}"))?;
    let dp_bridged = match crate::kernel::KernelDatapath::open(&format!("bench-{tag}-b")) {
        Ok(d) => d,
        Err(e) => {
            let _ = dp.remove();
            return Err(e.into());
        }
    };
    let res = (|| {
        dp_bridged.set_bridge_only(true)?;
        let mut addrs = std::collections::BTreeMap::new();
        for (a, b, ..) in &paths[..3] {
            addrs.insert(*a, crate::kernel::AddrLocation::Local);
            addrs.insert(*b, crate::kernel::AddrLocation::Local);
        }
        for d in [&dp, &dp_bridged] {
            d.set_addresses(&addrs)?;
        }
        for (i, (a, b, _, ws, wr, _)) in paths.iter().enumerate() {
            match i {
                0 => {
                    dp.attach(Some(&w), ws, *a)?;
                    dp.attach(Some(&w), wr, *b)?;
                }
                1 => {
                    dp.attach_clsact(Some(&w), ws, *a)?;
                    dp.attach_clsact(Some(&w), wr, *b)?;
                }
                2 => {
                    dp_bridged.attach(Some(&w), ws, *a)?;
                    dp_bridged.attach(Some(&w), wr, *b)?;
                }
                _ => {}
            }
        }
        // Like a VM, the receiver has said something (an ARP, say) before it is sent to:
        // only then does the classifier know it runs at its port and skip the bridge to it.
        for (i, (_, rx_p, _, dst)) in ports.iter().enumerate() {
            let rx_p = rx_p.as_ref().unwrap_or(&rx);
            let mut hello = build(paths[i].0, *dst, 0x88b5, 64);
            hello.truncate(64);
            let _ = rx_p.send(&hello);
        }
        let mut rounds: Vec<Vec<BenchRow>> = vec![Vec::new(); names.len()];
        let round = duration / ROUND_DIVISOR;
        for i in 0..ROUNDS {
            // The order rotates, so that no path gains from its place.
            for k in 0..names.len() {
                let p = (i + k) % names.len();
                let (tx_p, rx_p, f, dst) = &ports[p];
                let (tx_p, rx_p) = (tx_p.as_ref().unwrap_or(&tx), rx_p.as_ref().unwrap_or(&rx));
                let c = pump(tx_p, rx_p, f, *dst, round);
                rounds[p].push(row(names[p], len, c, round));
            }
        }
        let bridge = rounds.pop().unwrap_or_default();
        // The classifier's own cost, from the kernel's BPF run-time statistics (off during
        // the throughput rounds: the timing itself costs a little).
        let stats = BpfStats::on();
        let before = dp.run_stats()?;
        let (_, got) = pump(&tx, &rx, &frame, mr, duration / 2);
        let after = dp.run_stats()?;
        drop(stats);
        let ns = after.0.saturating_sub(before.0);
        let classify_ns_per_frame = (got > 0 && ns > 0).then(|| ns as f64 / got as f64);
        let ratios: Vec<Option<Ratio>> = rounds.iter().map(|r| paired_ratio(r, &bridge)).collect();
        let mut rows: Vec<BenchRow> = median(bridge).into_iter().collect();
        for (i, (path, vs_bridge)) in rounds.into_iter().zip(ratios).enumerate() {
            rows.extend(median(path).map(|c| BenchRow {
                vs_bridge,
                classify_ns_per_frame: if i == 0 { classify_ns_per_frame } else { None },
                ..c
            }));
        }
        rows.push(userspace);
        Ok::<_, BenchError>(rows)
    })();
    drop(lab);
    let _ = dp.remove();
    let _ = dp_bridged.remove();
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(fps: f64) -> BenchRow {
        BenchRow {
            frames_per_s: fps,
            ..row("x", 64, (0, 0), Duration::from_secs(1))
        }
    }

    #[test]
    fn paired_ratio_is_the_median_of_round_ratios_with_quartiles() {
        // The bridge drifts 2x over the rounds; the path is always 0.9 of its round.
        let bridge: Vec<_> = [100.0, 200.0, 150.0, 120.0, 180.0].map(r).into();
        let path: Vec<_> = [90.0, 180.0, 135.0, 108.0, 162.0].map(r).into();
        let q = paired_ratio(&path, &bridge).expect("rounds");
        assert!(
            (q.p50 - 0.9).abs() < 1e-9 && (q.p25 - 0.9).abs() < 1e-9,
            "{q:?}"
        );
        // A path twice as fast in one round moves the upper quartile only when it is a
        // quarter of the rounds.
        let path: Vec<_> = [90.0, 360.0, 135.0, 108.0, 162.0].map(r).into();
        let q = paired_ratio(&path, &bridge).expect("rounds");
        assert!(
            (q.p50 - 0.9).abs() < 1e-9 && (q.p75 - 0.9).abs() < 1e-9,
            "{q:?}"
        );
        // Rounds where the bridge forwarded nothing are left out; none left: no ratio.
        assert!(paired_ratio(&[r(1.0)], &[r(0.0)]).is_none());
        let t = BenchTable {
            rows: vec![
                r(100.0).with_path("linux-bridge"),
                BenchRow {
                    vs_bridge: Some(Ratio {
                        p25: 0.9,
                        p50: 0.95,
                        p75: 1.0,
                    }),
                    ..r(90.0).with_path("vinfra")
                },
            ],
        };
        assert!(t.to_string().contains("| 0.95x (0.90–1.00) |"), "{t}");
    }

    impl BenchRow {
        fn with_path(self, p: &str) -> BenchRow {
            BenchRow {
                path: p.into(),
                ..self
            }
        }
    }
}
