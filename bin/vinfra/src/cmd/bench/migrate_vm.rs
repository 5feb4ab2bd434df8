//! `vinfra bench migrate-vm`: the Debian guest (`vinfra image build debian`) runs pgbench
//! while it migrates between two local agents, once per cache-rebuild strategy and once
//! without migrating; what pgbench's clients feel after the switch-over is printed side by
//! side (tps and latency each second, time until tps is back to 95% of the unmigrated run)
//! with QEMU's downtime and the bytes the destination's cache took from the peer and origin.
//!
//! Real processes: a `vinfra server` and two `vinfra agent`s of this binary (children that
//! end with us), real QEMU (TCG unless `--accel` says otherwise), the agents' NBD servers
//! and block caches, the origin throttled like `migrate-cache --real`'s.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use compute::workload::{parse_pgbench, PgbenchLatency};
use model::api::{CreateVm, MigrateVm};
use serde::Serialize;
use tokio::process::{Child, Command};

use super::control::procs;

/// Options of `vinfra bench migrate-vm`.
#[derive(Debug, clap::Args)]
pub struct MigrateVmArgs {
    /// pgbench's run length in the guest, s (must cover `--migrate-at` + `--window`).
    #[arg(long, default_value_t = 90)]
    pub secs: u32,
    /// Migrate when pgbench has run this long, s (its tables are cached by then).
    #[arg(long, default_value_t = 20)]
    pub migrate_at: u32,
    /// Seconds after the switch-over that are compared.
    #[arg(long, default_value_t = 60)]
    pub window: u32,
    /// Cache-rebuild strategies to migrate with, in order (`vinfra vm migrate --strategy`;
    /// `STRATEGY+precopy` migrates with `--precopy`).
    #[arg(long, value_delimiter = ',', default_value = "none,heat,heat+pattern")]
    pub strategies: Vec<String>,
    /// pgbench clients.
    #[arg(long, default_value_t = 2)]
    pub clients: u32,
    /// Guest memory, MiB (less than the database, as for most databases: pgbench's reads
    /// reach the disk).
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// The agents' accelerator (this machine's /dev/kvm is kvm_pvm: TCG).
    #[arg(long, default_value = "tcg")]
    pub accel: String,
    /// The shared origin's rate, MB/s (a SAN; as `migrate-cache --real`).
    #[arg(long, default_value_t = 100)]
    pub origin_rate_mbps: u64,
    /// The shared origin's latency per request, ms.
    #[arg(long, default_value_t = 1)]
    pub origin_latency_ms: u64,
    /// Draw pgbench tps over time around the switch-over, one curve per run, to this SVG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One second of pgbench after the switch-over.
#[derive(Clone, Debug, Serialize)]
pub struct Second {
    /// Seconds after the switch-over (negative: before it).
    pub sec: i32,
    /// Transactions per second.
    pub tps: f64,
    /// Median latency, ms (from pgbench's per-transaction log).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, ms.
    pub p99_ms: Option<f64>,
}

/// One run: a strategy, or no migration.
#[derive(Clone, Debug, Serialize)]
pub struct VmRun {
    /// `no migration` or the strategy.
    pub label: String,
    /// The strategy (`None`: the unmigrated run).
    pub strategy: Option<String>,
    /// QEMU's downtime, ms.
    pub downtime_ms: Option<u64>,
    /// QEMU's whole memory migration, ms.
    pub qemu_total_ms: Option<u64>,
    /// pgbench time of the switch-over, s.
    pub switch_t_s: f64,
    /// From 10 s before the switch-over to `window` s after it.
    pub seconds: Vec<Second>,
    /// Mean tps in the first 10 s after the switch-over.
    pub tps_10s: f64,
    /// Mean tps over the window.
    pub tps_window: f64,
    /// The host's mean 1-minute load average over the window (the machine is shared: a
    /// TCG guest's speed follows the CPU it gets).
    pub load: Option<f64>,
    /// Highest p99 latency in the first 10 s, ms.
    pub p99_max_10s_ms: Option<f64>,
    /// Seconds after the switch-over until tps (mean of 5 s) is back to 95% of the
    /// unmigrated run's mean over the same window; `None`: not within the window.
    pub back_to_95_s: Option<u32>,
    /// Bytes the destination cache took from the source host's cache.
    pub peer_bytes: Option<u64>,
    /// Bytes it took from the origin.
    pub origin_bytes: Option<u64>,
    /// pgbench's summary tps over the whole run.
    pub tps_total: Option<f64>,
    /// pgbench finished without an error and the database was consistent.
    pub consistent: bool,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct MigrateVmReport {
    /// pgbench scale factor.
    pub scale: Option<u32>,
    /// Accelerator.
    pub accel: String,
    /// pgbench clients.
    pub clients: u32,
    /// pgbench run length, s.
    pub secs: u32,
    /// The compared window after the switch-over, s.
    pub window: u32,
    /// The unmigrated runs' mean tps over the window (the 95% reference; one run before
    /// the migrations and one after, against drift in what the shared machine gives).
    pub baseline_tps: f64,
    /// Every run.
    pub runs: Vec<VmRun>,
}

/// What was seen of one run, before it is cut to the window.
struct RawRun {
    label: String,
    strategy: Option<String>,
    /// pgbench second -> (tps, unix ms when the line was first seen).
    progress: BTreeMap<u32, (f64, u64)>,
    latency: Vec<PgbenchLatency>,
    migration: Option<model::Migration>,
    tps_total: Option<f64>,
    consistent: bool,
    scale: Option<u32>,
    /// (unix ms, 1-minute load average) sampled during the run.
    load: Vec<(u64, f64)>,
}

fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Starts `vinfra agent` for `host` (a child that ends with us) on the shared `origin`,
/// throttled like a SAN (`--origin-rate-mbps`, `--origin-latency-ms` of `args`).
pub(super) fn spawn_agent(
    exe: &Path,
    url: &str,
    host: &str,
    dir: &Path,
    token_file: &Path,
    origin: &Path,
    args: &AgentArgs<'_>,
) -> anyhow::Result<Child> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log = std::fs::File::create(dir.join("agent.log"))
        .with_context(|| format!("cannot create {}/agent.log", dir.display()))?;
    Command::new(exe)
        .args(["agent", "--server", url, "--host-name", host, "--data-dir"])
        .arg(dir)
        .arg("--token-file")
        .arg(token_file)
        .arg("--origin-dir")
        .arg(origin)
        .args(["--accel", args.accel])
        .args(["--origin-rate-mbps", &args.origin_rate_mbps.to_string()])
        .args(["--origin-latency-ms", &args.origin_latency_ms.to_string()])
        // Ends with us, even if we are killed: we hold its stdin.
        .arg("--exit-with-stdin")
        .stdin(Stdio::piped())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start agent {host}"))
}

/// A `vinfra server` (redb) under `dir`, an admin client to it, an agent token in
/// `dir/agent-token`, and `image` uploaded as the image `debian`.
pub(super) async fn debian_server(
    exe: &Path,
    dir: &Path,
    image: &compute::GuestImage,
) -> anyhow::Result<(procs::Server, client::Client, PathBuf)> {
    let mut server = procs::Server::spawn(
        exe,
        "s1",
        &dir.join("server"),
        &format!("redb:{}", dir.join("server/state.redb").display()),
        &dir.join("blobs"),
        4,
    )?;
    let token = server.wait_ready(None).await?;
    let admin = client::Client::new(&server.url, &token)?;
    let agent_token = admin
        .create_token(&model::api::CreateToken::new(model::Role::Agent))
        .await
        .context("cannot mint an agent token")?
        .token;
    let token_file = dir.join("agent-token");
    std::fs::write(&token_file, &agent_token)?;
    crate::cmd::image::upload_guest(&admin, image, "debian", None).await?;
    Ok((server, admin, token_file))
}

/// How the benchmark's agents run.
pub(super) struct AgentArgs<'a> {
    /// `--accel`.
    pub accel: &'a str,
    /// The origin's rate, MB/s.
    pub origin_rate_mbps: u64,
    /// The origin's latency per request, ms.
    pub origin_latency_ms: u64,
}

/// Runs the benchmark.
pub async fn run(args: &MigrateVmArgs) -> anyhow::Result<MigrateVmReport> {
    if args.secs < args.migrate_at + args.window + 5 {
        bail!(
            "--secs {} must cover --migrate-at {} + --window {} + 5 s of slack",
            args.secs,
            args.migrate_at,
            args.window
        );
    }
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let image =
        crate::cmd::image::ensure(compute::GuestKind::Debian, &compute::default_cache_dir())
            .await?;
    let tmp = tempfile::Builder::new()
        .prefix("vbm")
        .tempdir_in("/tmp")
        .context("cannot make a work dir")?;
    let dir = tmp.path();
    // VMs outlive their agents by design (a restarted agent adopts them): whatever way
    // this ends (error, Ctrl-C), end the QEMUs under the work dir before it is removed.
    let _reaper = QemuReaper(dir.to_owned());
    eprintln!("starting a server and uploading the debian image");
    let (server, admin, token_file) = debian_server(&exe, dir, &image).await?;
    let origin = dir.join("origin");
    let mut agents = Vec::new();
    for h in ["host-a", "host-b"] {
        agents.push(spawn_agent(
            &exe,
            &server.url,
            h,
            &dir.join(h),
            &token_file,
            &origin,
            &AgentArgs {
                accel: &args.accel,
                origin_rate_mbps: args.origin_rate_mbps,
                origin_latency_ms: args.origin_latency_ms,
            },
        )?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for h in ["host-a", "host-b"] {
        while !admin
            .get_host(h)
            .await
            .is_ok_and(|x| x.state == model::HostState::Up)
        {
            if Instant::now() > deadline {
                bail!(
                    "agent {h} did not register; its log:\n{}",
                    procs::log_tail(&dir.join(h).join("agent.log"), 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // The destination fetches the image (1.5 GiB) on its first VM: not inside a run.
    warm_host(&admin, "host-b").await?;
    // Unmigrated runs first and last: the machine is shared, and what it gives drifts.
    let mut plan: Vec<Option<String>> = vec![None];
    plan.extend(args.strategies.iter().cloned().map(Some));
    plan.push(None);
    let mut raw = Vec::new();
    for (i, strategy) in plan.into_iter().enumerate() {
        let label = match (&strategy, i) {
            (Some(s), _) => s.clone(),
            (None, 0) => "no migration".into(),
            (None, _) => "no migration (again)".into(),
        };
        eprintln!("run {}: {label}", i + 1);
        let r = one_run(&admin, &format!("pg{i}"), strategy, args, dir).await;
        let mut r = r.with_context(|| format!("run {label}"))?;
        r.label = label;
        eprintln!(
            "  done: tps {} consistent {}",
            r.tps_total.map_or("-".into(), |t| format!("{t:.1}")),
            r.consistent
        );
        raw.push(r);
    }
    drop(agents);
    server.stop().await;
    Ok(report(raw, args))
}

/// Ends every QEMU whose files are under its dir when dropped.
pub(super) struct QemuReaper(pub(super) PathBuf);

impl Drop for QemuReaper {
    fn drop(&mut self) {
        compute::kill_qemus_under(&self.0);
    }
}

/// Boots an idle Debian guest on `host` and deletes it once READY, so that the host has
/// the image's files before anything is measured on it.
async fn warm_host(admin: &client::Client, host: &str) -> anyhow::Result<()> {
    eprintln!("fetching the image on {host}");
    admin
        .create_vm(&CreateVm {
            name: "warm".into(),
            image: "debian".into(),
            vcpus: 1,
            memory_mib: 256,
            host: Some(host.into()),
            kernel_args: Some("vinfra.workload=idle".into()),
            ..Default::default()
        })
        .await
        .context("cannot create the warm-up VM")?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !admin
        .console("warm")
        .await
        .unwrap_or_default()
        .contains("GUEST: READY")
    {
        if Instant::now() > deadline {
            bail!("the warm-up VM on {host} did not boot");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    admin
        .delete_vm("warm")
        .await
        .context("cannot delete the warm-up VM")?;
    let gone = Instant::now() + Duration::from_secs(60);
    while admin.get_vm("warm").await.is_ok() && Instant::now() < gone {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

async fn one_run(
    admin: &client::Client,
    name: &str,
    strategy: Option<String>,
    args: &MigrateVmArgs,
    dir: &Path,
) -> anyhow::Result<RawRun> {
    admin
        .create_vm(&CreateVm {
            name: name.into(),
            image: "debian".into(),
            vcpus: 1,
            memory_mib: args.memory_mib,
            host: Some("host-a".into()),
            kernel_args: Some(format!(
                "vinfra.workload=pgbench vinfra.pgbench_secs={} vinfra.pgbench_clients={}",
                args.secs, args.clients
            )),
            ..Default::default()
        })
        .await
        .context("cannot create the VM")?;
    let mut run = RawRun {
        label: strategy.clone().unwrap_or_else(|| "no migration".into()),
        strategy: strategy.clone(),
        progress: BTreeMap::new(),
        latency: Vec::new(),
        migration: None,
        tps_total: None,
        consistent: false,
        scale: None,
        load: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(u64::from(args.secs) + 300);
    let mut migration: Option<model::MigrationId> = None;
    loop {
        if Instant::now() > deadline {
            bail!(
                "pgbench did not finish in time; console:\n{}\nhost-a:\n{}\nhost-b:\n{}",
                admin.console(name).await.unwrap_or_default(),
                procs::log_tail(&dir.join("host-a/agent.log"), 15),
                procs::log_tail(&dir.join("host-b/agent.log"), 15)
            );
        }
        let text = admin.console(name).await.unwrap_or_default();
        let now = unix_ms();
        if let Some(l) = loadavg() {
            run.load.push((now, l));
        }
        let p = parse_pgbench(&text);
        for pr in &p.progress {
            // Whole seconds (pgbench -P 1): the key is the second, the line's tps the value.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let k = pr.t_s.round().max(0.0) as u32;
            run.progress.entry(k).or_insert((pr.tps, now));
        }
        if let (Some(s), None) = (&strategy, migration) {
            if run
                .progress
                .keys()
                .last()
                .is_some_and(|&t| t >= args.migrate_at)
            {
                // `STRATEGY+precopy` is the strategy with cache pre-copy.
                let (s, precopy) = s
                    .strip_suffix("+precopy")
                    .map_or((s.as_str(), false), |base| (base, true));
                let m = admin
                    .migrate_vm(
                        name,
                        &MigrateVm {
                            to: "host-b".into(),
                            strategy: Some(s.to_owned()),
                            precopy,
                        },
                    )
                    .await
                    .context("cannot start the migration")?;
                migration = Some(m.id);
            }
        }
        if let Some(id) = migration {
            if !run.migration.as_ref().is_some_and(|m| m.state.is_final()) {
                run.migration = admin.get_migration(id).await.ok();
            }
        }
        let migrated =
            migration.is_none() || run.migration.as_ref().is_some_and(|m| m.state.is_final());
        if p.result.is_some() && migrated && (strategy.is_none() || migration.is_some()) {
            run.latency = p.latency;
            run.tps_total = p.tps;
            run.scale = p.scale;
            run.consistent =
                p.result == Some(Ok(())) && p.check.as_ref().is_some_and(|c| c.is_consistent());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if let Some(m) = &run.migration {
        if m.state != model::MigrationState::Completed {
            bail!("migration ended {:?}: {:?}", m.state, m.error);
        }
    }
    admin
        .delete_vm(name)
        .await
        .context("cannot delete the VM")?;
    // Wait until it is gone, so that the next run has the CPU to itself.
    let gone = Instant::now() + Duration::from_secs(60);
    while admin.get_vm(name).await.is_ok() && Instant::now() < gone {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(run)
}

/// The pgbench time of the switch-over: interpolated from when the progress lines around
/// it were seen on the console.
fn switch_time(r: &RawRun) -> Option<f64> {
    let at = r.migration.as_ref()?.switched_at?;
    let (&t, &(_, seen)) = r.progress.iter().find(|(_, (_, seen))| *seen >= at)?;
    #[allow(clippy::cast_precision_loss)]
    let back = (seen - at) as f64 / 1000.0;
    Some((f64::from(t) - back).max(0.0))
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0u32), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        0.0
    } else {
        s / f64::from(n)
    }
}

fn report(raw: Vec<RawRun>, args: &MigrateVmArgs) -> MigrateVmReport {
    let switches: Vec<f64> = raw.iter().filter_map(switch_time).collect();
    // The unmigrated run is compared over the same pgbench seconds as the others.
    let nominal = if switches.is_empty() {
        f64::from(args.migrate_at)
    } else {
        mean(switches.iter().copied())
    };
    let mut runs: Vec<VmRun> = raw
        .iter()
        .map(|r| {
            let sw = switch_time(r).unwrap_or(nominal);
            #[allow(clippy::cast_possible_truncation)]
            let first = sw.floor() as i64 + 1; // the first progress second ending after it
            let seconds: Vec<Second> = (-10..i64::from(args.window))
                .filter_map(|k| {
                    let t = u32::try_from(first + k).ok()?;
                    let (tps, _) = *r.progress.get(&t)?;
                    // LAT sec=n covers pgbench time [n, n+1): progress line t = n + 1.
                    let lat = r.latency.iter().find(|l| l.sec + 1 == t);
                    Some(Second {
                        sec: i32::try_from(k).ok()?,
                        tps,
                        p50_ms: lat.map(|l| l.p50_ms),
                        p99_ms: lat.map(|l| l.p99_ms),
                    })
                })
                .collect();
            let after = |lo: i32, hi: i32| {
                seconds
                    .iter()
                    .filter(move |s| s.sec >= lo && s.sec < hi)
                    .collect::<Vec<_>>()
            };
            let w = i32::try_from(args.window).unwrap_or(i32::MAX);
            let seen = |k: i64| {
                u32::try_from(first + k)
                    .ok()
                    .and_then(|t| r.progress.get(&t))
                    .map(|p| p.1)
            };
            let (from, to) = (
                seen(0).unwrap_or(0),
                seen(i64::from(w) - 1).unwrap_or(u64::MAX),
            );
            let in_window: Vec<f64> = r
                .load
                .iter()
                .filter(|(t, _)| *t >= from && *t <= to)
                .map(|p| p.1)
                .collect();
            let load = (!in_window.is_empty()).then(|| mean(in_window.iter().copied()));
            VmRun {
                label: r.label.clone(),
                strategy: r.strategy.clone(),
                downtime_ms: r
                    .migration
                    .as_ref()
                    .and_then(|m| m.qemu.as_ref())
                    .map(|q| q.downtime_ms),
                qemu_total_ms: r
                    .migration
                    .as_ref()
                    .and_then(|m| m.qemu.as_ref())
                    .map(|q| q.total_ms),
                switch_t_s: sw,
                load,
                tps_10s: mean(after(0, 10).iter().map(|s| s.tps)),
                tps_window: mean(after(0, w).iter().map(|s| s.tps)),
                p99_max_10s_ms: after(0, 10)
                    .iter()
                    .filter_map(|s| s.p99_ms)
                    .reduce(f64::max),
                back_to_95_s: None,
                peer_bytes: r
                    .migration
                    .as_ref()
                    .and_then(|m| m.progress.as_ref())
                    .map(|p| p.peer_bytes),
                origin_bytes: r
                    .migration
                    .as_ref()
                    .and_then(|m| m.progress.as_ref())
                    .map(|p| p.origin_bytes),
                tps_total: r.tps_total,
                consistent: r.consistent,
                seconds,
            }
        })
        .collect();
    let baseline_tps = mean(
        runs.iter()
            .filter(|r| r.strategy.is_none())
            .map(|r| r.tps_window),
    );
    for r in &mut runs {
        r.back_to_95_s = back_to(&r.seconds, 0.95 * baseline_tps, args.window);
    }
    MigrateVmReport {
        scale: raw.iter().find_map(|r| r.scale),
        accel: args.accel.clone(),
        clients: args.clients,
        secs: args.secs,
        window: args.window,
        baseline_tps,
        runs,
    }
}

/// The first second `k >= 0` after the switch-over from which the mean tps of 5 seconds
/// reaches `target` (pgbench's per-second tps under TCG varies ±40%: one second says little).
fn back_to(seconds: &[Second], target: f64, window: u32) -> Option<u32> {
    let w = i32::try_from(window).ok()?;
    (0..w.saturating_sub(4)).find_map(|k| {
        let xs: Vec<f64> = seconds
            .iter()
            .filter(|s| s.sec >= k && s.sec < k + 5)
            .map(|s| s.tps)
            .collect();
        (xs.len() == 5 && mean(xs.iter().copied()) >= target).then(|| u32::try_from(k).ok())?
    })
}

fn opt(x: Option<f64>, prec: usize) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

fn mib(b: Option<u64>) -> String {
    #[allow(clippy::cast_precision_loss)]
    b.map_or_else(|| "-".into(), |v| format!("{:.1}", v as f64 / 1048576.0))
}

/// The report as text: a summary row per run, then each second after the switch-over.
pub fn table(rep: &MigrateVmReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "pgbench scale {} ({} clients, TPC-B-like, {} s runs) in the Debian guest under {}; \
         the unmigrated run's mean over the window: {:.1} tps",
        rep.scale.map_or("?".into(), |x| x.to_string()),
        rep.clients,
        rep.secs,
        rep.accel.to_uppercase(),
        rep.baseline_tps
    );
    let _ = writeln!(
        s,
        "\n| run | downtime ms | QEMU total ms | tps 0-10 s | tps 0-{} s | p99 max 0-10 s ms | back to 95% s | peer MiB | origin MiB | pgbench tps | load | consistent |",
        rep.window
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for r in &rep.runs {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            r.downtime_ms.map_or("-".into(), |d| d.to_string()),
            r.qemu_total_ms.map_or("-".into(), |d| d.to_string()),
            r.tps_10s,
            r.tps_window,
            opt(r.p99_max_10s_ms, 0),
            r.back_to_95_s.map_or_else(
                || format!(">{}", rep.window.saturating_sub(5)),
                |k| k.to_string()
            ),
            mib(r.peer_bytes),
            mib(r.origin_bytes),
            opt(r.tps_total, 1),
            opt(r.load, 1),
            if r.consistent { "yes" } else { "NO" }
        );
    }
    let _ = writeln!(
        s,
        "\nEach second after the switch-over: tps / p50 ms / p99 ms"
    );
    let mut head = String::from("| s |");
    let mut rule = String::from("| ---: |");
    for r in &rep.runs {
        let _ = write!(head, " {} |", r.label);
        rule.push_str(" ---: |");
    }
    let _ = writeln!(s, "{head}\n{rule}");
    for k in 0..i32::try_from(rep.window).unwrap_or(0) {
        let _ = write!(s, "| {k} |");
        for r in &rep.runs {
            match r.seconds.iter().find(|x| x.sec == k) {
                Some(x) => {
                    let _ = write!(
                        s,
                        " {:.0} / {} / {} |",
                        x.tps,
                        opt(x.p50_ms, 0),
                        opt(x.p99_ms, 0)
                    );
                }
                None => s.push_str(" - |"),
            }
        }
        s.push('\n');
    }
    s
}

const COLORS: [&str; 5] = ["#000000", "#888888", "#4e79a7", "#e15759", "#59a14f"];

/// An SVG of pgbench tps per second around the switch-over (x = 0), one curve per run
/// (the unmigrated run black), each a 3-second moving mean.
pub fn svg(rep: &MigrateVmReport) -> String {
    let (pw, ph, ml, mt) = (760.0, 320.0, 60.0, 50.0);
    let tmin = -10.0;
    let tmax = f64::from(rep.window);
    let ymax = rep
        .runs
        .iter()
        .flat_map(|r| r.seconds.iter().map(|s| s.tps))
        .fold(1.0f64, f64::max)
        * 1.1;
    let x = |t: f64| ml + (t - tmin) / (tmax - tmin) * pw;
    let y = |v: f64| mt + ph - (v / ymax).clamp(0.0, 1.0) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="12">"#,
        ml + pw + 170.0,
        mt + ph + 50.0
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{ml}" y="22" font-size="15">pgbench tps around the switch-over (scale {}, {}, 3 s mean)</text>"#,
        rep.scale.map_or("?".into(), |x| x.to_string()),
        rep.accel.to_uppercase()
    );
    let _ = writeln!(
        s,
        r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
    );
    for k in 0..=4 {
        let v = ymax * f64::from(k) / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" x2="{}" y1="{yy}" y2="{yy}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{v:.0}</text>"##,
            ml + pw,
            ml - 6.0,
            y(v) + 4.0,
            yy = y(v)
        );
    }
    let mut t = tmin;
    while t <= tmax {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{t:.0}s</text>"#,
            x(t),
            mt + ph + 16.0
        );
        t += 10.0;
    }
    let _ = writeln!(
        s,
        r##"<line x1="{x0}" x2="{x0}" y1="{mt}" y2="{}" stroke="#444" stroke-dasharray="4,3"/><text x="{}" y="{}">switch-over</text>"##,
        mt + ph,
        x(0.0) + 4.0,
        mt + 12.0,
        x0 = x(0.0)
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds after the switch-over</text>"#,
        ml + pw / 2.0,
        mt + ph + 36.0
    );
    for (i, r) in rep.runs.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<String> = r
            .seconds
            .windows(3)
            .map(|w| {
                let m = mean(w.iter().map(|s| s.tps));
                format!("{:.1},{:.1}", x(f64::from(w[1].sec)), y(m))
            })
            .collect();
        let wdt = if r.strategy.as_deref() == Some("heat+pattern") {
            2.5
        } else {
            1.5
        };
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="{wdt}"/>"#,
            pts.join(" ")
        );
        #[allow(clippy::cast_precision_loss)]
        let ly = mt + 14.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="{wdt}"/><text x="{}" y="{}">{}</text>"#,
            ml + pw + 12.0,
            ml + pw + 32.0,
            ml + pw + 38.0,
            ly + 4.0,
            r.label
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(label: &str, strategy: Option<&str>, tps: &[f64]) -> VmRun {
        VmRun {
            label: label.into(),
            strategy: strategy.map(str::to_owned),
            downtime_ms: strategy.map(|_| 12),
            qemu_total_ms: strategy.map(|_| 900),
            switch_t_s: 20.3,
            seconds: tps
                .iter()
                .enumerate()
                .map(|(i, &t)| Second {
                    sec: i32::try_from(i).unwrap() - 2,
                    tps: t,
                    p50_ms: Some(40.0),
                    p99_ms: Some(120.0),
                })
                .collect(),
            tps_10s: 30.0,
            tps_window: 35.0,
            p99_max_10s_ms: Some(120.0),
            load: Some(2.0),
            back_to_95_s: None,
            peer_bytes: strategy.map(|_| 40 << 20),
            origin_bytes: strategy.map(|_| 1 << 20),
            tps_total: Some(35.0),
            consistent: true,
        }
    }

    #[test]
    fn back_to_95_needs_five_seconds_at_the_target() {
        let secs = run(
            "x",
            None,
            &[
                40.0, 40.0, 0.0, 5.0, 20.0, 40.0, 40.0, 40.0, 40.0, 40.0, 40.0, 40.0,
            ],
        )
        .seconds;
        // sec 0 = index 2. Mean of secs 3..8 = 40.
        assert_eq!(back_to(&secs, 38.0, 12), Some(3));
        assert_eq!(back_to(&secs, 41.0, 12), None);
    }

    #[test]
    fn table_and_plot_name_every_run() {
        let rep = MigrateVmReport {
            scale: Some(4),
            accel: "tcg".into(),
            clients: 2,
            secs: 90,
            window: 5,
            baseline_tps: 35.0,
            runs: vec![
                run("no migration", None, &[35.0; 8]),
                run(
                    "heat+pattern",
                    Some("heat+pattern"),
                    &[35.0, 35.0, 10.0, 20.0, 30.0, 35.0, 35.0, 35.0],
                ),
            ],
        };
        let t = table(&rep);
        assert!(t.contains("| heat+pattern | 12 | 900 |"), "{t}");
        assert!(t.contains("under TCG"), "{t}");
        assert!(t.contains("| 0 | 35 / 40 / 120 | 10 / 40 / 120 |"), "{t}");
        let svg = svg(&rep);
        assert!(svg.contains("heat+pattern") && svg.contains("no migration"));
        assert_eq!(svg.matches("<polyline").count(), 2);
    }
}
