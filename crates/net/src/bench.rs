//! `vinfra bench vswitch`: classification + forwarding throughput of [`SwitchCore`] on an
//! in-memory frame stream, and of the real switch on veth ports with the Linux bridge forwarding
//! the same traffic as the baseline.
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
    /// `memory/vswitch`, `veth/vswitch` or `veth/linux-bridge`.
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
            "| path | frame | offered | forwarded | frames/s | frames/s per core (CPU) |"
        )?;
        writeln!(f, "| --- | ---: | ---: | ---: | ---: | ---: |")?;
        for r in &self.rows {
            let cpu = r
                .frames_per_cpu_s
                .map_or_else(|| "n/a (softirq)".to_owned(), |v| format!("{v:.0}"));
            writeln!(
                f,
                "| {} | {} B | {} | {} | {:.0} | {} |",
                r.path, r.frame_len, r.offered, r.forwarded, r.frames_per_s, cpu
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
            let (a, b) = bench_veth(len, cfg.duration)?;
            t.rows.push(a);
            t.rows.push(b);
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
    }
}

/// Blasts frames `s -> r` for `duration`; returns (offered, received).
fn pump(tx: &RawPort, rx: &RawPort, frame: &[u8], dst: MacAddr, duration: Duration) -> (u64, u64) {
    let done = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let sender = sc.spawn(|| {
            let mut sent = 0u64;
            while !done.load(Ordering::Relaxed) {
                // ENOBUFS under overload is part of what is measured: count only accepted frames.
                if tx.send(frame).is_ok() {
                    sent += 1;
                }
            }
            sent
        });
        let mut buf = vec![0u8; 2048];
        let mut got = 0u64;
        let start = Instant::now();
        let mut last_rx = Instant::now();
        // Receive for the duration, then until 100 ms pass with nothing (the pipeline drained).
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
        (sender.join().unwrap_or(0), got)
    })
}

fn bench_veth(len: usize, duration: Duration) -> Result<(BenchRow, BenchRow), BenchError> {
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
    let (offered, got) = pump(&tx, &rx, &frame, mr, duration);
    let st = sw.stop()?;
    let wall = duration;
    let ours = BenchRow {
        path: "veth/vswitch".into(),
        frame_len: len,
        offered,
        forwarded: got,
        wall,
        frames_per_s: got as f64 / wall.as_secs_f64(),
        frames_per_cpu_s: (!st.cpu.is_zero()).then(|| got as f64 / st.cpu.as_secs_f64()),
    };

    ip(&["-n", &w, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &w, "link", "set", "dev", "ws", "master", "br0"])?;
    ip(&["-n", &w, "link", "set", "dev", "wr", "master", "br0"])?;
    ip(&["-n", &w, "link", "set", "dev", "br0", "up"])?;
    let (offered, got) = pump(&tx, &rx, &frame, mr, duration);
    let bridge = BenchRow {
        path: "veth/linux-bridge".into(),
        frame_len: len,
        offered,
        forwarded: got,
        wall,
        frames_per_s: got as f64 / wall.as_secs_f64(),
        frames_per_cpu_s: None,
    };
    drop(lab);
    Ok((ours, bridge))
}
