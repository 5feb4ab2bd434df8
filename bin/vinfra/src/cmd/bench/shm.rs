//! `vinfra bench shm`: resource tables (crates/shm) against the Unix socket a device
//! would otherwise send its updates over, side by side in one run.
//!
//! The element (the table's owner) runs in this process; the device is a child of this
//! binary (`vinfra bench shm --device-child …`, hidden), so every grant, notification and
//! write crosses processes as it would on a host. Rows:
//! - grant call: the element makes one entry of the device's mapping writable
//!   (`UFFDIO_WRITEPROTECT` on the other process) — p50/p99; the revoke beside it.
//! - request → grant → notify → first update → release posted (the guard dropped; the
//!   element revokes while the device goes on), measured in the device, with eventfd
//!   notification and with polled words, against one 64-byte round trip on a Unix
//!   socket between the same two processes.
//! - a 4 KiB update under a standing grant (written in place) against sending the
//!   4 KiB to the element over the socket, which writes the entry and acknowledges.
//! - the two rows above at two placements, each with its baseline: the device on the
//!   element's core and on another core (see `Placement`), each row alternating with
//!   its baseline in rounds.
//! - kill -9 of a device holding a grant → the grant revoked (the element notices
//!   through the pidfd / the socket closing).
//! - grant + revoke pairs per second with `--devices` devices (one idle child process
//!   holds them all) on a
//!   table of `--entries` entries, random device and entry each time, against the same
//!   loop with one device on 64 entries.
//!
//! No pass/fail: the numbers are for people (targets in docs/SHM.md).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use shm::{Device, Element, ElementConfig, Notify};

use super::control::quantile;

/// Options of `vinfra bench shm`.
#[derive(Debug, Clone, clap::Args)]
pub struct ShmArgs {
    /// Samples per latency row.
    #[arg(long, default_value_t = 20_000)]
    pub iters: usize,
    /// Devices in the grants-per-second row.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Entries of the table in the grants-per-second row.
    #[arg(long, default_value_t = 65_536)]
    pub entries: u32,
    /// Grant + revoke pairs in the grants-per-second row.
    #[arg(long, default_value_t = 400_000)]
    pub grants: usize,
    /// Devices killed in the crash row.
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// Print the rows as JSON.
    #[arg(long)]
    pub json: bool,
    /// (internal) run as the device child attached to this socket.
    #[arg(long, hide = true)]
    pub device_child: Option<PathBuf>,
    /// (internal) the child's baseline socket.
    #[arg(long, hide = true)]
    pub echo: Option<PathBuf>,
    /// (internal) the CPU the device child pins itself to.
    #[arg(long, hide = true)]
    pub cpu: Option<usize>,
    /// (internal) the child only takes a grant and holds it.
    #[arg(long, hide = true)]
    pub hold: bool,
    /// (internal) the child attaches this many devices and waits.
    #[arg(long, hide = true)]
    pub many: Option<usize>,
}

/// One measurement and its baseline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// Its unit.
    pub unit: String,
    /// shm: median (or the rate).
    pub p50: f64,
    /// shm: 99th percentile (the worst for the crash row; 0 for rates).
    pub p99: f64,
    /// What it is compared with.
    pub baseline: String,
    /// The baseline's median (or rate); 0 when there is none.
    pub baseline_p50: f64,
    /// The baseline's 99th percentile.
    pub baseline_p99: f64,
    /// The target (docs/SHM.md).
    pub target: String,
}

/// Payload bytes of the latency tables' entries (a 4 KiB update fills one).
const ENTRY: u32 = 4096;
const SMALL: usize = 64;

fn summary(mut ns: Vec<f64>) -> (f64, f64) {
    ns.sort_by(f64::total_cmp);
    (
        quantile(&ns, 50).unwrap_or(0.0),
        quantile(&ns, 99).unwrap_or(0.0),
    )
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn time_n(n: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Vec<f64>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        v.push(us(t.elapsed()));
    }
    Ok(v)
}

/// What the device child measured, printed as one JSON line.
#[derive(Debug, Serialize, Deserialize)]
struct ChildReport {
    cycle: Vec<f64>,
    rtt: Vec<f64>,
    update: Vec<f64>,
    socket_update: Vec<f64>,
}

/// Runs the benchmark (or, with `--device-child`, the device side of it).
pub fn run(args: &ShmArgs) -> anyhow::Result<Vec<Row>> {
    if let Some(sock) = &args.device_child {
        device_child(args, sock)?;
        return Ok(Vec::new());
    }
    let dir = tempfile::tempdir()?;
    let mut rows = Vec::new();
    rows.extend(latency_rows(args, dir.path())?);
    rows.push(crash_row(args, dir.path())?);
    rows.push(scale_row(args, dir.path())?);
    Ok(rows)
}

fn spawn_child(args: &ShmArgs, sock: &Path, extra: &[&str]) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find this binary")?;
    Command::new(exe)
        .args([
            "bench",
            "shm",
            "--iters",
            &args.iters.to_string(),
            "--device-child",
        ])
        .arg(sock)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the device child")
}

fn line(r: &mut impl BufRead) -> anyhow::Result<String> {
    let mut s = String::new();
    if r.read_line(&mut s)? == 0 {
        bail!("the device child exited");
    }
    Ok(s.trim_end().to_owned())
}

/// Where the device child runs; the element's threads and the baseline's server
/// run on CPU 0. A sleeping thread woken on its own core costs a context switch; woken
/// on the other core it costs an inter-processor interrupt, which on a VM is a
/// hypervisor exit (tens of µs here when the other vCPU sleeps). Left to the
/// scheduler, the two sides of one row and of its baseline land on one core or two at
/// random, so each comparison is made at one placement, both measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    OneCore,
    TwoCores,
}

impl Placement {
    fn device_cpu(self) -> usize {
        match self {
            Placement::OneCore => 0,
            Placement::TwoCores => 1,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Placement::OneCore => "one core",
            Placement::TwoCores => "two cores",
        }
    }
}

/// Rounds of the alternating measurements: each row and its baseline take turns,
/// so a change in the machine's state during the run falls on both.
const ROUNDS: usize = 10;

fn latency_rows(args: &ShmArgs, dir: &Path) -> anyhow::Result<Vec<Row>> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    // A thread of its own, pinned to CPU 0: the elements' and the baseline server's
    // threads started from it inherit the placement; the other rows run unpinned.
    std::thread::scope(|s| {
        s.spawn(|| {
            shm::pin_current_thread(&[0]).context("pinning the element to CPU 0")?;
            placed_rows(args, dir, cpus)
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the latency rows panicked")))
    })
}

fn placed_rows(args: &ShmArgs, dir: &Path, cpus: usize) -> anyhow::Result<Vec<Row>> {
    let mut cfg = ElementConfig::new(dir.join("evt.sock"), 8, ENTRY);
    cfg.max_grant = None;
    let el = Element::start(cfg)?;
    let placements: &[Placement] = if cpus >= 2 {
        &[Placement::OneCore, Placement::TwoCores]
    } else {
        eprintln!("one CPU: the two-core rows are left out");
        &[Placement::OneCore]
    };
    let mut rows = Vec::new();
    for &placement in placements {
        let cpu = placement.device_cpu();
        let echo_path = dir.join(format!("echo-{cpu}.sock"));
        let listener = UnixListener::bind(&echo_path)?;
        let mut child = spawn_child(
            args,
            el.socket_path(),
            &[
                "--echo",
                &echo_path.to_string_lossy(),
                "--cpu",
                &cpu.to_string(),
            ],
        )?;
        let mut out = BufReader::new(child.stdout.take().context("child stdout")?);
        let mut input = child.stdin.take().context("child stdin")?;
        let attached = line(&mut out)?;
        let dev: u32 = attached
            .strip_prefix("attached ")
            .and_then(|d| d.parse().ok())
            .with_context(|| format!("device child said {attached:?}"))?;
        if rows.is_empty() {
            rows.push(grant_row(args, &el, dev)?);
        }
        let report = with_baseline_server(&el, listener, || {
            writeln!(input, "go")?;
            serde_json::from_str::<ChildReport>(&line(&mut out)?).context("device child report")
        })?;
        let (rtt50, rtt99) = summary(report.rtt.clone());
        let rtt_name = format!(
            "one {SMALL}-byte Unix-socket round trip, {}",
            placement.label()
        );
        let (c50, c99) = summary(report.cycle);
        rows.push(Row {
            name: format!(
                "request+grant+notify+update+release (eventfd), {}",
                placement.label()
            ),
            unit: "µs".into(),
            p50: c50,
            p99: c99,
            baseline: rtt_name.clone(),
            baseline_p50: rtt50,
            baseline_p99: rtt99,
            target: "≤ 1× the round trip".into(),
        });
        if placement == Placement::TwoCores {
            // Polled: a second element that spins on the control pages. Not on one
            // core, where the two spinners would take turns at the scheduler's pace.
            let mut pcfg = ElementConfig::new(dir.join("poll.sock"), 8, ENTRY);
            pcfg.max_grant = None;
            pcfg.notify = Notify::Polled;
            let pel = Element::start(pcfg)?;
            writeln!(input, "polled {}", pel.socket_path().display())?;
            let polled: Vec<f64> =
                serde_json::from_str(&line(&mut out)?).context("device child report")?;
            drop(pel);
            let (p50, p99) = summary(polled);
            rows.push(Row {
                name: "request+grant+notify+update+release (polled), two cores".into(),
                unit: "µs".into(),
                p50,
                p99,
                baseline: rtt_name,
                baseline_p50: rtt50,
                baseline_p99: rtt99,
                target: "≤ 0.3× the round trip".into(),
            });
        }
        drop(input);
        let _ = child.wait();
        let (u50, u99) = summary(report.update);
        let (s50, s99) = summary(report.socket_update);
        rows.push(Row {
            name: format!("4 KiB update under a standing grant, {}", placement.label()),
            unit: "µs".into(),
            p50: u50,
            p99: u99,
            baseline: format!(
                "4 KiB sent to the element, written, acked, {}",
                placement.label()
            ),
            baseline_p50: s50,
            baseline_p99: s99,
            target: "≥ 50× faster".into(),
        });
    }
    Ok(rows)
}

/// The grant call, element side, while the device is idle.
fn grant_row(args: &ShmArgs, el: &Element, dev: u32) -> anyhow::Result<Row> {
    let mut grant = Vec::with_capacity(args.iters);
    let mut revoke = Vec::with_capacity(args.iters);
    for i in 0..args.iters {
        let e = 3 + (i % 4) as u32;
        let t = Instant::now();
        el.grant(dev, e, None)?;
        let t1 = Instant::now();
        el.revoke(dev, e)?;
        revoke.push(us(t1.elapsed()));
        grant.push(us(t1 - t));
    }
    let (g50, g99) = summary(grant);
    let (r50, r99) = summary(revoke);
    Ok(Row {
        name: "grant call (element → other process's page tables)".into(),
        unit: "µs".into(),
        p50: g50,
        p99: g99,
        baseline: "revoke call".into(),
        baseline_p50: r50,
        baseline_p99: r99,
        target: "grant ≤ 1 µs p50".into(),
    })
}

/// Runs `f` while a thread serves the baseline on `listener` (one connection): 64-byte
/// messages come back as they are; a 4 KiB update is written to the element's entry 2,
/// then acknowledged.
fn with_baseline_server<T>(
    el: &Element,
    listener: UnixListener,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        let server = s.spawn(move || -> anyhow::Result<()> {
            let (mut c, _) = listener.accept()?;
            let mut hdr = [0u8; 4];
            let mut buf = vec![0u8; ENTRY as usize];
            loop {
                if c.read_exact(&mut hdr).is_err() {
                    return Ok(());
                }
                let n = u32::from_le_bytes(hdr) as usize;
                if n > buf.len() {
                    bail!("baseline message of {n} bytes");
                }
                c.read_exact(&mut buf[..n])?;
                if n > SMALL {
                    el.write(2, &buf[..n])?;
                    c.write_all(&[0u8; 8])?;
                } else {
                    c.write_all(&buf[..n])?;
                }
            }
        });
        let out = f();
        let _ = server.join();
        out
    })
}

/// The device child: pins itself, attaches, prints `attached ID`, waits for `go`,
/// measures, prints its report; then `polled SOCKET` runs the cycle against a polling
/// element, and the end of its input ends it.
fn device_child(args: &ShmArgs, sock: &Path) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if let Some(n) = args.many {
        shm::raise_fd_limit()?;
        let devs = (0..n)
            .map(|_| Device::connect(sock))
            .collect::<Result<Vec<_>, _>>()?;
        writeln!(out, "attached {}", devs.len())?;
        out.flush()?;
        // Until stdin closes.
        let _ = line(&mut std::io::stdin().lock());
        return Ok(());
    }
    if let Some(cpu) = args.cpu {
        shm::pin_current_thread(&[cpu]).with_context(|| format!("pinning to CPU {cpu}"))?;
    }
    let dev = Device::connect(sock)?;
    if args.hold {
        let _g = dev.request_write(4, None)?;
        writeln!(out, "holding {}", dev.id())?;
        out.flush()?;
        // Until killed.
        loop {
            std::thread::park();
        }
    }
    writeln!(out, "attached {}", dev.id())?;
    out.flush()?;
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    if line(&mut input)? != "go" {
        bail!("expected go");
    }
    let n = (args.iters / ROUNDS).max(1);
    let small = [7u8; 8];
    let echo = args.echo.as_deref().context("--echo missing")?;
    let mut c = UnixStream::connect(echo)?;
    let mut msg = vec![0u8; 4 + SMALL];
    msg[..4].copy_from_slice(&(SMALL as u32).to_le_bytes());
    let mut back = [0u8; SMALL];
    let update_data = vec![0x5au8; ENTRY as usize];
    let mut big = vec![0x5au8; 4 + ENTRY as usize];
    big[..4].copy_from_slice(&ENTRY.to_le_bytes());
    let mut ack = [0u8; 8];
    let mut rep = ChildReport {
        cycle: Vec::new(),
        rtt: Vec::new(),
        update: Vec::new(),
        socket_update: Vec::new(),
    };
    for _ in 0..ROUNDS {
        // Dropping the guard posts the release; the next request does not wait for it.
        rep.cycle.extend(time_n(n, || {
            let mut g = dev.request_write(0, None)?;
            g.write(&small)?;
            drop(g);
            Ok(())
        })?);
        rep.rtt.extend(time_n(n, || {
            c.write_all(&msg)?;
            c.read_exact(&mut back)?;
            Ok(())
        })?);
        let mut g = dev.request_write(1, None)?;
        rep.update.extend(time_n(n, || {
            g.write(&update_data)?;
            Ok(())
        })?);
        g.release()?;
        rep.socket_update.extend(time_n(n, || {
            c.write_all(&big)?;
            c.read_exact(&mut ack)?;
            Ok(())
        })?);
    }
    drop(c);
    writeln!(out, "{}", serde_json::to_string(&rep)?)?;
    out.flush()?;
    let mut cmd = String::new();
    if input.read_line(&mut cmd)? == 0 {
        return Ok(());
    }
    let psock = cmd
        .trim_end()
        .strip_prefix("polled ")
        .context("expected polled")?;
    let pdev = Device::connect(Path::new(psock))?;
    let polled = time_n(args.iters, || {
        let mut g = pdev.request_write(0, None)?;
        g.write(&small)?;
        drop(g);
        Ok(())
    })?;
    writeln!(out, "{}", serde_json::to_string(&polled)?)?;
    out.flush()?;
    Ok(())
}

fn crash_row(args: &ShmArgs, dir: &Path) -> anyhow::Result<Row> {
    let el = Element::start(ElementConfig::new(dir.join("crash.sock"), 8, ENTRY))?;
    let (mut revoked, mut reaped) = (Vec::new(), Vec::new());
    for _ in 0..args.kills.max(1) {
        let mut child = spawn_child(args, el.socket_path(), &["--hold"])?;
        let mut out = BufReader::new(child.stdout.take().context("child stdout")?);
        let said = line(&mut out)?;
        if !said.starts_with("holding") {
            bail!("device child said {said:?}");
        }
        let t = Instant::now();
        child.kill()?;
        let (mut rev, mut reap) = (None, None);
        while rev.is_none() || reap.is_none() {
            if t.elapsed() > Duration::from_secs(5) {
                bail!("the killed device's grant was not revoked within 5 s");
            }
            if rev.is_none() && el.holder(4).is_none() {
                rev = Some(us(t.elapsed()));
            }
            if reap.is_none() && child.try_wait()?.is_some() {
                reap = Some(us(t.elapsed()));
            }
            std::hint::spin_loop();
        }
        revoked.extend(rev);
        reaped.extend(reap);
    }
    revoked.sort_by(f64::total_cmp);
    reaped.sort_by(f64::total_cmp);
    Ok(Row {
        name: "kill -9 of a device holding a grant → revoked".into(),
        unit: "µs".into(),
        p50: quantile(&revoked, 50).unwrap_or(0.0),
        p99: revoked.last().copied().unwrap_or(0.0),
        baseline: "kill -9 → its parent reaps it (waitpid)".into(),
        baseline_p50: quantile(&reaped, 50).unwrap_or(0.0),
        baseline_p99: reaped.last().copied().unwrap_or(0.0),
        target: "≤ 10 ms (p99 columns: worst)".into(),
    })
}

/// Grant + revoke pairs per second over random (device, entry).
fn pairs_per_sec(el: &Element, ids: &[u32], entries: u32, pairs: usize) -> anyhow::Result<f64> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let t = Instant::now();
    for _ in 0..pairs {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let d = ids[(x % ids.len() as u64) as usize];
        let e = ((x >> 32) % u64::from(entries)) as u32;
        el.grant(d, e, None)?;
        el.revoke(d, e)?;
    }
    #[allow(clippy::cast_precision_loss)]
    Ok(pairs as f64 / t.elapsed().as_secs_f64())
}

/// `n` devices attached to `el` from one child process (idle while measured, as
/// devices mostly are when the element flips their pages).
fn device_host(args: &ShmArgs, el: &Element, n: usize) -> anyhow::Result<(Child, Vec<u32>)> {
    let mut child = spawn_child(args, el.socket_path(), &["--many", &n.to_string()])?;
    let mut out = BufReader::new(child.stdout.take().context("child stdout")?);
    let said = line(&mut out)?;
    if said != format!("attached {n}") {
        bail!("device host said {said:?}");
    }
    let ids = el.devices().iter().map(|d| d.id).collect();
    Ok((child, ids))
}

fn scale_row(args: &ShmArgs, dir: &Path) -> anyhow::Result<Row> {
    let small = {
        let mut cfg = ElementConfig::new(dir.join("small.sock"), 64, 4088);
        cfg.max_grant = None;
        let el = Element::start(cfg)?;
        let (mut child, ids) = device_host(args, &el, 1)?;
        let rate = pairs_per_sec(&el, &ids, 64, args.grants.min(100_000))?;
        drop(child.stdin.take());
        let _ = child.wait();
        rate
    };
    let mut cfg = ElementConfig::new(dir.join("scale.sock"), args.entries, 4088);
    cfg.max_grant = None;
    cfg.audit_capacity = 1024;
    let el = Element::start(cfg)?;
    let t = Instant::now();
    let (mut child, ids) = device_host(args, &el, args.devices)?;
    eprintln!(
        "attached {} devices × {} entries in {:.1} s",
        args.devices,
        args.entries,
        t.elapsed().as_secs_f64()
    );
    let rate = pairs_per_sec(&el, &ids, args.entries, args.grants)?;
    drop(child.stdin.take());
    let _ = child.wait();
    Ok(Row {
        name: format!(
            "grants/s, {} devices × {} entries (grant+revoke pairs)",
            args.devices, args.entries
        ),
        unit: "/s".into(),
        p50: rate,
        p99: 0.0,
        baseline: "1 device × 64 entries".into(),
        baseline_p50: small,
        baseline_p99: 0.0,
        target: "≥ 200,000 grants/s".into(),
    })
}

/// The rows as an aligned table.
pub fn table(rows: &[Row]) -> String {
    let fmt = |v: f64| {
        if v >= 10_000.0 {
            format!("{v:.0}")
        } else if v >= 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.2}")
        }
    };
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            // How many times better shm is: shorter times, higher rates.
            let ratio = if r.baseline_p50 > 0.0 && r.p50 > 0.0 {
                if r.unit == "/s" {
                    format!("{:.2}×", r.p50 / r.baseline_p50)
                } else {
                    format!("{:.2}×", r.baseline_p50 / r.p50)
                }
            } else {
                "-".into()
            };
            vec![
                r.name.clone(),
                format!("{} {}", fmt(r.p50), r.unit),
                if r.p99 > 0.0 {
                    format!("{} {}", fmt(r.p99), r.unit)
                } else {
                    "-".into()
                },
                if r.baseline.is_empty() {
                    "-".into()
                } else {
                    r.baseline.clone()
                },
                if r.baseline_p50 > 0.0 {
                    format!("{} {}", fmt(r.baseline_p50), r.unit)
                } else {
                    "-".into()
                },
                if r.baseline_p99 > 0.0 {
                    format!("{} {}", fmt(r.baseline_p99), r.unit)
                } else {
                    "-".into()
                },
                ratio,
                r.target.clone(),
            ]
        })
        .collect();
    crate::output::table(
        &[
            "measured",
            "shm p50",
            "shm p99",
            "baseline",
            "baseline p50",
            "baseline p99",
            "shm better by",
            "target",
        ],
        &body,
    )
}
