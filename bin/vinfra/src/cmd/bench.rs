//! `vinfra bench …`: benchmarks that print a comparison against a baseline run side by
//! side in the same process. No pass/fail: the numbers are for people.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::output::Format;

pub mod control;
mod kbd;
pub mod migrate_vm;
pub mod push;
mod record;
mod render;
pub mod shm;
pub mod slice;
pub mod terminal;
mod vnc;

/// The control-plane benchmarks' common start on a fresh server: an agent token (its
/// client returned beside the admin's) and an image `bench` booting `kernel`.
async fn bench_clients(
    url: &str,
    token: &str,
    kernel: &Path,
) -> anyhow::Result<(client::Client, String, client::Client)> {
    let admin = client::Client::new(url, token)?;
    let agent_token = admin
        .create_token(&model::api::CreateToken::new(model::Role::Agent))
        .await
        .context("cannot mint an agent token")?
        .token;
    let agent = client::Client::new(url, &agent_token)?;
    admin
        .upload_image(
            &client::ImageFiles {
                kernel: Some(kernel.to_owned()),
                ..Default::default()
            },
            model::api::CreateImage {
                name: "bench".into(),
                kernel: None,
                initrd: None,
                disk_template: None,
                cmdline: String::new(),
                disk_mib: 64,
                tenant: None,
            },
        )
        .await
        .context("cannot create the bench image")?;
    Ok((admin, agent_token, agent))
}

/// A bench host: `cpus` CPUs, `memory_mib` of memory, 1 TiB of disk, no agent behind it.
fn bench_host(name: &str, cpus: u32, memory_mib: u64) -> model::api::RegisterHost {
    model::api::RegisterHost {
        name: name.to_owned(),
        cpus,
        vcpus: None,
        memory_mib,
        disk_gib: 1024,
        drivers: vec!["process".into()],
        agent_url: None,
        nbd_addr: None,
        link_addr: None,
        uplink_ip: None,
    }
}

/// Benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCmd {
    /// Cache rebuild after migration: every fetch order on the same workloads.
    MigrateCache {
        /// A run of a few minutes on a 2-core machine.
        #[arg(long)]
        quick: bool,
        /// Print rows as JSON.
        #[arg(long)]
        json: bool,
        /// Draw hit ratio over time, one curve per strategy, to this SVG file.
        #[arg(long, conflicts_with = "real")]
        plot: Option<PathBuf>,
        /// Write the result with its curves, as the dashboard's Migrations page takes it
        /// (upload it there: "Last benchmark"), to this JSON file.
        #[arg(long, conflicts_with = "real")]
        result: Option<PathBuf>,
        /// Block traces to replay besides the synthetic workloads, each a workload named
        /// after its file (repeat the flag for several). Default: the CloudPhysics trace
        /// in ../shared/traces/cloudphysics.csv if present.
        #[arg(long, conflicts_with = "real")]
        trace: Vec<PathBuf>,
        /// Format of the --trace files: msr (what `vinfra vm trace` records), alibaba or
        /// cloudphysics. Default: recognised from each file's header or first record.
        #[arg(long, requires = "trace")]
        trace_format: Option<cache::trace::TraceFormat>,
        /// Replay the --trace files this many times faster than recorded (default: 100
        /// for CloudPhysics, whose 2 h at 15 requests/s would idle the links, 1 for
        /// the others).
        #[arg(long, requires = "trace")]
        trace_speedup: Option<f64>,
        /// Also replay traces recorded from real applications in the Debian guest (boot +
        /// PostgreSQL + pgbench, and fio), recorded on first use (several minutes under
        /// TCG; needs root and QEMU) and cached under the guest image cache.
        #[arg(long, conflicts_with = "real")]
        recorded: bool,
        /// Run on the real stack instead of the simulation: caches on disk, the source
        /// exported over NBD, the workload replayed through an NBD client (wall clock).
        #[arg(long)]
        real: bool,
    },
    /// A real VM's users across a migration: the Debian guest (`vinfra image build
    /// debian`) runs pgbench while it migrates between two local agents, once per strategy
    /// and once without migrating; prints QEMU downtime, tps and latency p50/p99 in each
    /// second after the switch-over, the time until tps is back to 95% of the unmigrated
    /// run, and the bytes from peer and origin (root, QEMU; ~2.5 min per run under TCG).
    MigrateVm(migrate_vm::MigrateVmArgs),
    /// Redundant placement decisions per second at 100 / 1,000 / 10,000 servers.
    Placement {
        /// Decisions per row.
        #[arg(long, default_value_t = 10_000)]
        decisions: usize,
    },
    /// Network-service instantiation time for 2 / 10 / 50 VNFs (sites in parallel)
    /// against the one-after-another estimate.
    Ns {
        /// Simulated boot time of one VNF, ms (the `sim` rows).
        #[arg(long, default_value_t = 200)]
        boot_ms: u64,
        /// Only the simulated rows (the `process` rows need root and `ip`).
        #[arg(long)]
        sim_only: bool,
    },
    /// Control-plane API operations/s and p50/p99 for VM create and list on 1 server
    /// with redb, 1 server and 3 servers on a 3-member etcd; and the leader failover
    /// time (kill -9 of the leading server -> first drain step under the next one).
    /// Needs etcd; `-o json` prints the report as JSON.
    Control(control::ControlArgs),
    /// How soon a host's agent side learns of a VM stop/start: over the host event
    /// stream (p50/p90/p99/max of N commands, 3 hosts with a subscriber each) against
    /// polling the assignments every second as the agent does. One `vinfra server` child
    /// on redb; `-o json` prints the report as JSON.
    Push(push::PushArgs),
    /// Network slices: selection p50/p99 at a request rate with the ledger idle and
    /// appending; forecast MAPE/MASE vs seasonal naive; ledger appends/s and durable-ack
    /// p99 on redb and etcd beside raw etcd puts of the same size (needs etcd).
    Slice(slice::SliceArgs),
    /// Multi-operator C-V2X: N vehicles on two operators in network namespaces
    /// (authorization, link establishment, one-way latency direct and through both MECs
    /// against bare UDP, losses, revocation, operator change). Needs root, ip, nft.
    V2x {
        /// Vehicles (half per operator).
        #[arg(long, default_value_t = 1000)]
        vehicles: u32,
        /// Seconds of 10 Hz CAM-sized messages on the direct path (both ways).
        #[arg(long, default_value_t = 30)]
        secs: u64,
        /// Seconds of messages through the two MECs.
        #[arg(long, default_value_t = 10)]
        relay_secs: u64,
        /// Vehicles revoked, and vehicles moved to the other operator.
        #[arg(long, default_value_t = 50)]
        lifecycle: u32,
        /// MECs keep their state in memory only (default: durable, as `--state-dir`).
        #[arg(long)]
        in_memory: bool,
    },
    /// Terminal operations: operation → performed p50/p99 with many terminals at once,
    /// over sessions (WebSocket) against one-off POSTs at the same rate; in-process
    /// server and agent on the sim driver. `-o json` prints the report as JSON.
    Terminal(terminal::TerminalArgs),
    /// Resource tables: grant call p50/p99, grant + notify + update + revoke against a
    /// Unix-socket round trip, 4 KiB updates under a standing grant against sending them
    /// over the socket, kill -9 → revoke, grants/s with 1,000 devices × 65,536 entries.
    /// Needs Linux ≥ 5.19 (userfaultfd write-protect on shared memory).
    Shm(shm::ShmArgs),
    /// Frames/s and drops on veth ports of the Linux bridge alone, the bridge with vinfra's
    /// BPF classifier (the datapath VM taps use, forwarding between the ports itself; also as
    /// clsact filters, its fallback, and leaving every frame to the bridge, as with the
    /// agent's --bridge-only) and the old user-space switch, side by side at 64 B and 1500 B,
    /// with the classifier's CPU cost per frame; plus the user-space switch's core in memory.
    Vswitch {
        /// Seconds per row; the bridge and the classified paths take turns in 25 rounds of
        /// a tenth of it each.
        #[arg(long, default_value_t = 2)]
        secs: u64,
        /// Print the rows as JSON (`path`, `frame_bytes`, `frames_per_s`, `drop_ratio`, ...).
        #[arg(long)]
        json: bool,
        /// Only the in-memory rows (no root needed).
        #[arg(long)]
        memory_only: bool,
    },
}

fn default_trace() -> Option<PathBuf> {
    let candidates = [
        PathBuf::from("../shared/traces/cloudphysics.csv"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/traces/cloudphysics.csv"),
    ];
    candidates.into_iter().find(|p| p.is_file())
}

/// Runs a benchmark.
pub async fn run(cmd: BenchCmd, format: Format) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Control(args) => {
            // Interrupted: dropping the run kills its etcd members and servers and
            // removes their data.
            let report = tokio::select! {
                r = control::run(&args) => r?,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
            };
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Format::Table => print!("{}", control::render::control_table(&report)),
            }
            Ok(())
        }
        BenchCmd::MigrateVm(args) => {
            // Interrupted: dropping the run kills its server, agents and QEMUs and
            // removes the work dir.
            let rep = tokio::select! {
                r = migrate_vm::run(&args) => r?,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
            };
            if args.json || matches!(format, Format::Json) {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                print!("{}", migrate_vm::table(&rep));
            }
            if let Some(p) = &args.plot {
                std::fs::write(p, migrate_vm::svg(&rep))
                    .with_context(|| format!("cannot write {}", p.display()))?;
                eprintln!("plot written to {}", p.display());
            }
            Ok(())
        }
        BenchCmd::Slice(args) => {
            let report = tokio::select! {
                r = slice::run(&args) => r?,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
            };
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Format::Table => print!("{}", slice::table(&report)),
            }
            Ok(())
        }
        BenchCmd::Terminal(args) => {
            let report = tokio::select! {
                r = terminal::run(&args) => r?,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
            };
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Format::Table => print!("{}", terminal::table(&report)),
            }
            Ok(())
        }
        BenchCmd::Push(args) => {
            // Interrupted: dropping the run kills its server and removes its data.
            let report = tokio::select! {
                r = push::run(&args) => r?,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
            };
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Format::Table => print!("{}", push::table(&report)),
            }
            Ok(())
        }
        BenchCmd::Shm(args) => {
            let child = args.device_child.is_some();
            let json = args.json || matches!(format, Format::Json);
            let rows = tokio::task::spawn_blocking(move || shm::run(&args)).await??;
            if child {
                return Ok(());
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", shm::table(&rows));
            }
            Ok(())
        }
        BenchCmd::MigrateCache {
            quick,
            json,
            real: true,
            ..
        } => {
            let rows = tokio::task::spawn_blocking(move || real_bench(quick)).await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", render::real_table(&rows));
            }
            Ok(())
        }
        BenchCmd::MigrateCache {
            quick,
            json,
            plot,
            result,
            trace,
            trace_format,
            trace_speedup,
            recorded,
            real: false,
        } => {
            let mut opts = cache::bench::BenchOptions::standard(quick, None);
            if recorded {
                for path in record::ensure_recorded(&compute::default_cache_dir()).await? {
                    opts = opts.with_trace(path, cache::trace::TraceFormat::Msr, 1.0);
                }
            }
            let traces = if trace.is_empty() {
                let found: Vec<PathBuf> = default_trace().into_iter().collect();
                if found.is_empty() {
                    eprintln!("note: no CloudPhysics trace found; pass --trace FILE to include it");
                }
                found
            } else {
                trace
            };
            for path in traces {
                let format = match trace_format {
                    Some(f) => f,
                    None => cache::trace::detect_format(&path)?,
                };
                let speedup = trace_speedup.unwrap_or(match format {
                    cache::trace::TraceFormat::CloudPhysics => 100.0,
                    _ => 1.0,
                });
                anyhow::ensure!(
                    speedup.is_finite() && speedup > 0.0,
                    "--trace-speedup must be a positive number, not {speedup}"
                );
                opts = opts.with_trace(path, format, speedup);
            }
            let rows = tokio::task::spawn_blocking(move || cache::bench::run_bench(opts)).await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", render::migrate_table(&rows));
            }
            if let Some(p) = plot {
                std::fs::write(&p, render::migrate_svg(&rows))
                    .with_context(|| format!("cannot write {}", p.display()))?;
                eprintln!("plot written to {}", p.display());
            }
            if let Some(p) = result {
                let doc = cache::bench::result_doc(&rows, quick, ::control::now_ms());
                std::fs::write(&p, serde_json::to_vec(&doc)?)
                    .with_context(|| format!("cannot write {}", p.display()))?;
                eprintln!(
                    "result written to {} (upload it on the dashboard's Migrations page)",
                    p.display()
                );
            }
            Ok(())
        }
        BenchCmd::Ns { boot_ms, sim_only } => {
            if !sim_only {
                let tag = format!("b{}", std::process::id());
                let rows = nfv::bench::bench_ns_process(&[2, 10, 50], &tag)
                    .await
                    .context("ns benchmark on process sites failed (needs root and iproute2; --sim-only skips it)")?;
                println!("`process` sites (a namespace, a veth on a bridge and a process per VDU; both columns measured):");
                println!("| VNFs | instantiate (parallel sites and VNFs) | same commands one after another | speed-up | terminate |");
                println!("| ---: | ---: | ---: | ---: | ---: |");
                for r in rows {
                    println!(
                        "| {} | {:.0} ms | {:.0} ms | {:.1}x | {:.0} ms |",
                        r.vnfs,
                        r.parallel.as_secs_f64() * 1e3,
                        r.sequential.as_secs_f64() * 1e3,
                        r.sequential.as_secs_f64() / r.parallel.as_secs_f64().max(1e-9),
                        r.terminate.as_secs_f64() * 1e3
                    );
                }
                println!();
                println!("`sim` sites ({boot_ms} ms per VDU boot):");
            }
            let rows =
                nfv::bench::bench_ns(&[2, 10, 50], std::time::Duration::from_millis(boot_ms))
                    .await
                    .context("ns benchmark failed")?;
            println!("| VNFs | instantiate (parallel sites) | one after another (estimate) | terminate |");
            println!("| ---: | ---: | ---: | ---: |");
            for r in rows {
                println!(
                    "| {} | {:.0} ms | {:.0} ms | {:.0} ms |",
                    r.vnfs,
                    r.instantiate.as_secs_f64() * 1e3,
                    r.sequential_estimate.as_secs_f64() * 1e3,
                    r.terminate.as_secs_f64() * 1e3
                );
            }
            Ok(())
        }
        BenchCmd::Placement { decisions } => {
            let rows =
                tokio::task::spawn_blocking(move || sched::bench_table(decisions, 6)).await?;
            print!("{}", sched::format_table(&rows));
            Ok(())
        }
        BenchCmd::V2x {
            vehicles,
            secs,
            relay_secs,
            lifecycle,
            in_memory,
        } => {
            let o = v2x::bench::BenchOptions {
                vehicles,
                direct_secs: secs,
                relay_secs,
                lifecycle,
                durable: !in_memory,
                ..Default::default()
            };
            let report = tokio::select! {
                r = v2x::bench::run(&o) => r?,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
            };
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Format::Table => print!("{}", super::v2x::bench_table(&report)),
            }
            Ok(())
        }
        BenchCmd::Vswitch {
            secs,
            json,
            memory_only,
        } => {
            let cfg = net::bench::BenchConfig {
                duration: std::time::Duration::from_secs(secs.max(1)),
                veth: !memory_only,
                ..Default::default()
            };
            let table = tokio::task::spawn_blocking(move || net::bench::bench_vswitch(&cfg))
                .await?
                .context("vswitch benchmark failed")?;
            if json || format == Format::Json {
                let rows: Vec<serde_json::Value> = table
                    .rows
                    .iter()
                    .map(net::bench::BenchRow::to_json)
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{table}");
            }
            Ok(())
        }
    }
}

/// The real-stack migration benchmark on a zipf and a mixed read/write workload.
fn real_bench(quick: bool) -> anyhow::Result<Vec<cache::bench_nbd::NbdBenchRow>> {
    use cache::trace::{mixed, zipf_random, SynthSpec};
    let opts = cache::bench_nbd::NbdBenchOptions::standard();
    let spec = |seed| SynthSpec {
        seed,
        requests: if quick { 40_000 } else { 160_000 },
        span_bytes: opts.disk_mib << 20,
        io_size: 4096,
        iops: 4000,
    };
    let workloads = [
        ("zipf", zipf_random(&spec(1), 1.2, 100)),
        ("mixed", mixed(&spec(2), 1.2, 70, 4, 8, 16 << 20)),
    ];
    let mut rows = Vec::new();
    for (name, reqs) in &workloads {
        rows.extend(
            cache::bench_nbd::run_nbd_bench(&opts, name, reqs, &|m| eprintln!("{m}"))
                .map_err(anyhow::Error::from)?,
        );
    }
    Ok(rows)
}
