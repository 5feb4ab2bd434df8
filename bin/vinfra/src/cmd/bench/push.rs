//! `vinfra bench push`: how soon a host's agent learns of a VM stop or start, over the
//! push channel (`GET /v1/hosts/{name}/events`) and, side by side, by polling the
//! assignments every second as the agent does today.
//!
//! One `vinfra server` child of this binary on a redb file (plain HTTP on loopback),
//! `--hosts` hosts registered through the API (no agents run) with one VM each, and per
//! host one event-stream subscriber: the typed client, each with its own connection,
//! as an agent would hold it. Then:
//! - push: `--ops` commands one after another, each a stop or a start (alternating) of
//!   the VM of the next host, sent through the API; measured from just before the
//!   command is sent until its host's subscriber has read the line with the VM's new
//!   desired state. The command's own answer time is shown too, and per command the
//!   event's time minus the answer's: what the push path adds to the write itself.
//! - poll (the baseline): per host a poller reads `GET /v1/hosts/{name}/assignments`,
//!   sleeps `--poll-ms`, and again (the agent's reconcile loop); `--poll-samples`
//!   commands, spread over the hosts, each sent at a random moment of the poll period;
//!   measured until the first poll answer that shows it. Fewer samples: each takes about
//!   a period.
//!
//! - agents (`--agents`, default 3; 0 leaves them out): real `vinfra agent --driver sim`
//!   processes hold the streams instead, and a command is timed until the agent acted:
//!   until its reconciler handed the change to the VM's task, and until the VM's task
//!   called the (simulated) hypervisor to stop or start the VM; both read back from the
//!   agents' logs after the run (`push/agents.rs`).
//!
//! No pass/fail: the numbers are for people (the target is p99 under 5 ms on loopback).

mod agents;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use model::api::{CreateVm, HostEvent};
use model::{DesiredState, VmId};
use serde::Serialize;
use tokio::sync::mpsc;

use super::control::procs::Server;
use super::control::{filesystem_of, loadavg, quantile};

/// Options of `vinfra bench push`.
#[derive(Debug, Clone, clap::Args)]
pub struct PushArgs {
    /// Commands measured over the event streams.
    #[arg(long, default_value_t = 1000)]
    pub ops: usize,
    /// Hosts, each with one VM and one event-stream subscriber.
    #[arg(long, default_value_t = 3)]
    pub hosts: usize,
    /// Commands measured by polling (each takes about one poll period).
    #[arg(long, default_value_t = 50)]
    pub poll_samples: usize,
    /// The baseline's poll period, ms (the agent's reconcile period).
    #[arg(long, default_value_t = 1000)]
    pub poll_ms: u64,
    /// Real `vinfra agent --driver sim` processes for the agent rows (0: none).
    #[arg(long, default_value_t = 3)]
    pub agents: usize,
    /// Commands measured through the agents (each waits for the agent's report).
    #[arg(long, default_value_t = 300)]
    pub agent_ops: usize,
}

/// How the agent learns of the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Measured {
    /// The event stream: command → its line read by the host's subscriber.
    Push,
    /// The command's own HTTP answer (for reference: the event comes about then).
    Answer,
    /// Event read minus the command's answer, per command: what the push path adds to
    /// the write itself (negative: the event was read first).
    AfterAnswer,
    /// Polling the assignments: command → the first poll answer that shows it.
    Poll,
    /// Real agents: command → the agent's reconciler handed it to the VM's task (its
    /// log); `via_poll` of them came by the agent's poll, not pushed.
    AgentRouted {
        /// Samples that came by the poll.
        via_poll: usize,
    },
    /// Real agents: handed to the VM's task minus the command's answer, per command.
    AgentAfterAnswer,
    /// Real agents: stop command → the VM's task called the sim driver's stop.
    AgentStop,
    /// Real agents: start command → the VM's task called the sim driver's start.
    AgentStart,
    /// Real agents: the command's own answer in that phase.
    AgentAnswer,
}

impl Measured {
    fn label(self, poll_ms: u64) -> String {
        match self {
            Measured::Push => "event stream: command → event read".to_owned(),
            Measured::Answer => "(the command's own answer)".to_owned(),
            Measured::AfterAnswer => {
                "event read − answer, per command (< 0: event first)".to_owned()
            }
            Measured::Poll => format!("polling every {poll_ms} ms: command → poll that shows it"),
            Measured::AgentRouted { via_poll } => format!(
                "agents: command → handed to the VM's task ({via_poll} via the agent's poll)"
            ),
            Measured::AgentAfterAnswer => {
                "agents: handed to the VM's task − answer, per command".to_owned()
            }
            Measured::AgentStop => {
                "agents: stop → VM task calls driver stop (after its `stopping` report)".to_owned()
            }
            Measured::AgentStart => {
                "agents: start → VM task calls driver start (after report, cache, export)"
                    .to_owned()
            }
            Measured::AgentAnswer => "agents: (the command's own answer)".to_owned(),
        }
    }
}

/// A latency distribution.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured.
    pub path: Measured,
    /// Samples measured.
    pub samples: usize,
    /// Commands whose change was not seen within 10 s (not in the samples).
    pub missed: usize,
    /// Median, ms.
    pub p50_ms: Option<f64>,
    /// 90th percentile, ms.
    pub p90_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
    /// Largest, ms.
    pub max_ms: Option<f64>,
}

impl Row {
    fn of(path: Measured, mut ms: Vec<f64>, missed: usize) -> Row {
        ms.sort_by(f64::total_cmp);
        Row {
            path,
            samples: ms.len(),
            missed,
            p50_ms: quantile(&ms, 50),
            p90_ms: quantile(&ms, 90),
            p99_ms: quantile(&ms, 99),
            max_ms: ms.last().copied(),
        }
    }
}

/// Everything `vinfra bench push` measured.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    /// CPUs this process may use.
    pub cores: usize,
    /// Load average (1, 5, 15 min) before the run.
    pub load_before: Option<[f64; 3]>,
    /// The filesystem the redb file is on.
    pub data_fs: String,
    /// `release` or `debug`.
    pub build: &'static str,
    /// Hosts, each with one subscriber.
    pub hosts: usize,
    /// `vinfra agent --driver sim` processes of the agent rows.
    pub agents: usize,
    /// The baseline's poll period, ms.
    pub poll_ms: u64,
    /// Push, the commands' answers, poll.
    pub rows: Vec<Row>,
}

/// How long a command's change may take to be seen before it counts as missed.
const MISSED_AFTER: Duration = Duration::from_secs(10);

/// Runs the bench (progress on stderr).
pub async fn run(args: &PushArgs) -> anyhow::Result<PushReport> {
    if args.ops == 0 || args.hosts == 0 || args.poll_ms == 0 {
        bail!("--ops, --hosts and --poll-ms must be at least 1");
    }
    let exe = std::env::current_exe().context("cannot find this vinfra binary")?;
    let tmp = tempfile::Builder::new()
        .prefix("vinfra-bench-push-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let load_before = loadavg();
    let spec = format!("redb:{}", tmp.path().join("state.redb").display());
    let mut server = Server::spawn(
        &exe,
        "bench-push",
        tmp.path(),
        &spec,
        &tmp.path().join("blobs"),
        2,
    )?;
    let token = server.wait_ready(None).await?;
    let (admin, agent_token, vms) = prepare(&server.url, &token, tmp.path(), args.hosts).await?;

    eprintln!(
        "[push] {} stop/start commands over {} hosts",
        args.ops, args.hosts
    );
    let push = measure_push(&server.url, &admin, &agent_token, &vms, args.ops).await?;
    eprintln!(
        "[poll] {} commands, polling every {} ms",
        args.poll_samples, args.poll_ms
    );
    let poll = measure_poll(&server.url, &admin, &agent_token, &vms, args).await?;
    let mut rows = push;
    rows.push(poll);
    if args.agents > 0 {
        match agents::measure(
            &exe,
            &server.url,
            &admin,
            &agent_token,
            tmp.path(),
            args.agents,
            args.agent_ops,
        )
        .await
        {
            Ok(r) => rows.extend(r),
            Err(e) => {
                server.stop().await;
                return Err(e);
            }
        }
    }
    server.stop().await;

    Ok(PushReport {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_before,
        data_fs: filesystem_of(tmp.path()),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        hosts: args.hosts,
        agents: args.agents,
        poll_ms: args.poll_ms,
        rows,
    })
}

/// Hosts `bench-h<i>` with one VM each (`bench-vm-<i>`, running), made through the API.
/// Returns the admin client, an agent token and each host's (name, VM).
async fn prepare(
    url: &str,
    token: &str,
    dir: &Path,
    hosts: usize,
) -> anyhow::Result<(client::Client, String, Vec<(String, VmId)>)> {
    let kernel = dir.join("kernel");
    std::fs::write(&kernel, vec![0u8; 4096]).context("cannot write the bench image")?;
    let (admin, agent_token, agent) = super::bench_clients(url, token, &kernel).await?;
    let mut vms = Vec::new();
    for i in 0..hosts {
        let host = format!("bench-h{i}");
        agent
            .register_host(&super::bench_host(&host, 64, 1 << 16))
            .await
            .context("cannot register a host")?;
        let vm = admin
            .create_vm(&CreateVm {
                name: format!("bench-vm-{i}"),
                image: "bench".into(),
                vcpus: 1,
                memory_mib: 64,
                host: Some(host.clone()),
                ..Default::default()
            })
            .await
            .context("cannot create a VM")?;
        vms.push((host, vm.id));
    }
    Ok((admin, agent_token, vms))
}

/// What a subscriber or poller saw: the VM, its new desired state, when.
type Seen = (VmId, DesiredState, Instant);

/// Stops or starts `vm` (to `to`) through the API.
async fn command(admin: &client::Client, vm: VmId, to: DesiredState) -> anyhow::Result<()> {
    let id = vm.to_string();
    match to {
        DesiredState::Stopped => admin.stop_vm(&id).await?,
        _ => admin.start_vm(&id).await?,
    };
    Ok(())
}

/// Waits for `(vm, to)` on `seen`, skipping anything else; `None` after [`MISSED_AFTER`].
async fn seen_at(
    seen: &mut mpsc::UnboundedReceiver<Seen>,
    vm: VmId,
    to: DesiredState,
) -> anyhow::Result<Option<Instant>> {
    let deadline = tokio::time::Instant::now() + MISSED_AFTER;
    loop {
        match tokio::time::timeout_at(deadline, seen.recv()).await {
            Err(_) => return Ok(None),
            Ok(None) => bail!("every subscriber stopped"),
            Ok(Some((v, d, at))) if v == vm && d == to => return Ok(Some(at)),
            Ok(Some(_)) => {}
        }
    }
}

/// The event-stream rows: each command until its host's subscriber reads it.
async fn measure_push(
    url: &str,
    admin: &client::Client,
    agent_token: &str,
    vms: &[(String, VmId)],
    ops: usize,
) -> anyhow::Result<Vec<Row>> {
    let (tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    let mut subscribers = tokio::task::JoinSet::new();
    for (host, _) in vms {
        // One client each: its own connection, as each agent has.
        let c = client::Client::new(url, agent_token)?;
        let mut stream = c
            .host_events(host)
            .await
            .with_context(|| format!("cannot open the event stream of {host}"))?;
        match stream.next().await {
            Some(Ok(HostEvent::Resync)) => {}
            other => bail!("{host}: the stream did not start with resync: {other:?}"),
        }
        let tx = tx.clone();
        subscribers.spawn(async move {
            while let Some(ev) = stream.next().await {
                if let Ok(HostEvent::Assignment { assignment }) = ev {
                    let at = Instant::now();
                    if tx
                        .send((assignment.vm.id, assignment.vm.desired, at))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
    }
    drop(tx);
    let (mut event_ms, mut answer_ms, mut after_ms, mut missed) =
        (Vec::new(), Vec::new(), Vec::new(), 0);
    for k in 0..ops {
        let (_, vm) = vms[k % vms.len()];
        // Each VM alternates: stop on its odd rounds, start on its even ones.
        let to = if (k / vms.len()).is_multiple_of(2) {
            DesiredState::Stopped
        } else {
            DesiredState::Running
        };
        let t0 = Instant::now();
        command(admin, vm, to).await?;
        let answered = t0.elapsed().as_secs_f64() * 1e3;
        answer_ms.push(answered);
        match seen_at(&mut seen, vm, to).await? {
            Some(at) => {
                let read = at.duration_since(t0).as_secs_f64() * 1e3;
                event_ms.push(read);
                after_ms.push(read - answered);
            }
            None => missed += 1,
        }
    }
    subscribers.abort_all();
    // Leave every VM running, as the poll phase expects (a start of a running VM
    // changes nothing).
    for (_, vm) in vms {
        command(admin, *vm, DesiredState::Running).await?;
    }
    Ok(vec![
        Row::of(Measured::Push, event_ms, missed),
        Row::of(Measured::Answer, answer_ms, 0),
        Row::of(Measured::AfterAnswer, after_ms, missed),
    ])
}

/// The polling row: pollers like the agent's reconcile loop, commands at random moments.
async fn measure_poll(
    url: &str,
    admin: &client::Client,
    agent_token: &str,
    vms: &[(String, VmId)],
    args: &PushArgs,
) -> anyhow::Result<Row> {
    let period = Duration::from_millis(args.poll_ms);
    let mut pollers = tokio::task::JoinSet::new();
    let mut samplers = tokio::task::JoinSet::new();
    for (i, (host, vm)) in vms.iter().enumerate() {
        let (tx, mut seen) = mpsc::unbounded_channel::<Seen>();
        let c = client::Client::new(url, agent_token)?;
        let (host, vm) = (host.clone(), *vm);
        pollers.spawn(async move {
            // What the last poll said, so that only a change is reported.
            let mut last = None;
            loop {
                if let Ok(list) = c.assignments(&host).await {
                    let at = Instant::now();
                    if let Some(a) = list.iter().find(|a| a.vm.id == vm) {
                        if last != Some(a.vm.desired) {
                            last = Some(a.vm.desired);
                            if tx.send((vm, a.vm.desired, at)).is_err() {
                                return;
                            }
                        }
                    }
                }
                tokio::time::sleep(period).await;
            }
        });
        // This host's share of the samples.
        let n = args.poll_samples / vms.len() + usize::from(i < args.poll_samples % vms.len());
        let admin = admin.clone();
        samplers.spawn(async move {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::from(d.subsec_nanos()));
            let mut rng = model::SplitMix64::new(seed ^ i as u64);
            // The first poll's answer (running) comes before the first command.
            seen_at(&mut seen, vm, DesiredState::Running).await?;
            let (mut ms, mut missed) = (Vec::new(), 0);
            for k in 0..n {
                // A random moment of the poll period: the command does not know when
                // the next poll comes, as a real one does not.
                let phase = rng.below(u64::try_from(period.as_micros()).unwrap_or(1_000_000));
                tokio::time::sleep(Duration::from_micros(phase)).await;
                let to = if k.is_multiple_of(2) {
                    DesiredState::Stopped
                } else {
                    DesiredState::Running
                };
                let t0 = Instant::now();
                command(&admin, vm, to).await?;
                match seen_at(&mut seen, vm, to).await? {
                    Some(at) => ms.push(at.duration_since(t0).as_secs_f64() * 1e3),
                    None => missed += 1,
                }
            }
            anyhow::Ok((ms, missed))
        });
    }
    let (mut ms, mut missed) = (Vec::new(), 0);
    while let Some(done) = samplers.join_next().await {
        let (m, x) = done.context("a sampler panicked")??;
        ms.extend(m);
        missed += x;
    }
    pollers.abort_all();
    Ok(Row::of(Measured::Poll, ms, missed))
}

/// The report as a Markdown table.
pub fn table(r: &PushReport) -> String {
    use std::fmt::Write as _;
    let ms = |v: Option<f64>| {
        v.map_or_else(
            || "-".to_owned(),
            |v| {
                if v.abs() < 10.0 {
                    format!("{v:.2} ms")
                } else {
                    format!("{v:.0} ms")
                }
            },
        )
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "vinfra bench push: a VM stop/start through the API until its host's agent side has \
         it; {} hosts, one event-stream subscriber each (the typed client over loopback \
         HTTP), then {} `vinfra agent --driver sim` processes, one VM each (times read back \
         from their logs); one `vinfra server` on redb ({}); {} cores, load {} before; {} \
         build",
        r.hosts,
        r.agents,
        r.data_fs,
        r.cores,
        r.load_before.map_or_else(
            || "unknown".to_owned(),
            |[a, b, c]| format!("{a:.2} {b:.2} {c:.2}")
        ),
        r.build
    );
    s.push('\n');
    let _ = writeln!(
        s,
        "| path | samples | missed | p50 | p90 | p99 | max |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in &r.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.path.label(r.poll_ms),
            row.samples,
            row.missed,
            ms(row.p50_ms),
            ms(row.p90_ms),
            ms(row.p99_ms),
            ms(row.max_ms)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_nearest_rank_and_the_table_names_the_paths() {
        let row = Row::of(Measured::Push, (1..=100).rev().map(f64::from).collect(), 2);
        assert_eq!(
            (
                row.samples,
                row.missed,
                row.p50_ms,
                row.p90_ms,
                row.p99_ms,
                row.max_ms
            ),
            (100, 2, Some(50.0), Some(90.0), Some(99.0), Some(100.0))
        );
        let report = PushReport {
            cores: 2,
            load_before: None,
            data_fs: "ext4 (/)".into(),
            build: "debug",
            hosts: 3,
            agents: 3,
            poll_ms: 1000,
            rows: vec![row, Row::of(Measured::Poll, vec![], 0)],
        };
        let t = table(&report);
        assert!(
            t.contains(
                "| event stream: command → event read | 100 | 2 | 50 ms | 90 ms | 99 ms | 100 ms |"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "| polling every 1000 ms: command → poll that shows it | 0 | 0 | - | - | - | - |"
            ),
            "{t}"
        );
    }
}
