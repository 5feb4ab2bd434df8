//! `vinfra bench terminal`: operation → performed latency for many terminals at once,
//! over sessions (one WebSocket per terminal) and, side by side in the same run, as
//! one-off `POST /v1/terminal-operations` messages at the same rate.
//!
//! In this process: a server on a redb file (plain HTTP on loopback) and one node agent
//! on the sim driver (the hypervisor simulated: its input queue stands in for QMP's
//! `input-send-event`), with `--vms` VMs; `--terminals` terminals bound to them in turn
//! (shared). Each terminal sends `--rate` key operations per second (down, up, down,
//! …) for `--secs`; latency is from the message sent to its reply saying `performed`
//! (the host's agent performed it through the driver and answered). The one-off rows
//! send the same operations, each its own HTTP request on a kept-alive connection.
//!
//! Bytes on the wire, side by side in the same run: one scripted typing session
//! ([`SCRIPT`]) sent by a terminal over a session, as key operations and as text
//! operations, every byte of its connection counted both ways; and the same session
//! through QEMU's VNC server behind websockify, typed by vncdotool ([`super::vnc`];
//! `--no-vnc` leaves that row out).
//!
//! And the same key operations into real QEMU processes, to the reply and to the
//! scancodes in each VM's keyboard controller ([`super::kbd`]; `--kbd-vms 0` leaves
//! that row out).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use client::session::TerminalSession;
use client::terminal::TerminalCredentials;
use model::api::{CreateImage, CreateToken, CreateVm};
use model::terminals::{
    BindTerminal, CreateTerminal, CreatedTerminal, OperationOutcome, SessionReplies, SessionReply,
    SharePolicy,
};
use model::{ObservedState, Role};
use serde::Serialize;

use super::control::quantile;

/// Options of `vinfra bench terminal`.
#[derive(Debug, Clone, clap::Args)]
pub struct TerminalArgs {
    /// Terminals sending at once.
    #[arg(long, default_value_t = 200)]
    pub terminals: usize,
    /// Operations per second per terminal.
    #[arg(long, default_value_t = 20)]
    pub rate: u32,
    /// VMs the terminals are bound to (in turn).
    #[arg(long, default_value_t = 4)]
    pub vms: usize,
    /// Seconds per row.
    #[arg(long, default_value_t = 5)]
    pub secs: u64,
    /// VMs of the keyboard-controller row (QEMU in qtest mode, one terminal each; 0
    /// leaves the row out).
    #[arg(long, default_value_t = 4)]
    pub kbd_vms: usize,
    /// Operations per second per terminal in the keyboard-controller row.
    #[arg(long, default_value_t = 20)]
    pub kbd_rate: u32,
    /// Leave out the VNC row of the bytes comparison (it boots a guest under QEMU and
    /// needs websockify and vncdotool: scripts/setup.sh).
    #[arg(long)]
    pub no_vnc: bool,
    /// The Python with vncdotool installed.
    #[arg(long, default_value = super::vnc::DEFAULT_VNC_PYTHON)]
    pub vnc_python: std::path::PathBuf,
    /// What the latency rows' sessions ask to be answered with: `full` (the record) or
    /// `brief` (number and outcome; what `vinfra terminal connect` asks for).
    #[arg(long, default_value = "full", value_parser = ["full", "brief"])]
    pub replies: String,
}

/// The scripted typing session of the bytes rows: ten lines of lower-case words, digits
/// and spaces (keys a VNC client and a `key` operation name alike).
pub const SCRIPT: [&str; 10] = [
    "echo hello vinfra",
    "uname a",
    "ls l tmp",
    "cat proc uptime",
    "date",
    "free m",
    "df h",
    "ps",
    "id",
    "echo 12345 67890",
];

/// One way of typing [`SCRIPT`]: what crossed the wire.
#[derive(Debug, Clone, Serialize)]
pub struct WireRow {
    /// `vinfra key`, `vinfra key_combo`, `vinfra type_text` (the operation typed with)
    /// or `vnc`.
    pub path: String,
    /// Messages the client sent (operations; for VNC, RFB requests are not counted).
    pub messages: Option<usize>,
    /// Bytes from the client to the server (TCP payload: WebSocket frames and the
    /// upgrade request).
    pub to_server: u64,
    /// Bytes from the server to the client.
    pub from_server: u64,
    /// Both ways.
    pub total: u64,
}

/// One transport's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `session` or `one-off`.
    pub path: &'static str,
    /// Operations sent.
    pub sent: usize,
    /// Answered `performed`.
    pub performed: usize,
    /// Refused, failed, or not answered `performed`.
    pub other: usize,
    /// Why, by reason (`sent`: no answer from the host within 3 s).
    pub other_reasons: std::collections::BTreeMap<String, usize>,
    /// Operations per second performed.
    pub per_s: f64,
    /// Median, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
    /// Largest, ms.
    pub max_ms: Option<f64>,
}

/// Everything measured.
#[derive(Debug, Clone, Serialize)]
pub struct TerminalReport {
    /// CPUs.
    pub cores: usize,
    /// `release` or `debug`.
    pub build: &'static str,
    /// The load asked for.
    pub terminals: usize,
    /// Per terminal, operations/s.
    pub rate: u32,
    /// VMs.
    pub vms: usize,
    /// What the session rows' answers carried (`full` or `brief`).
    pub replies: String,
    /// Session and one-off rows.
    pub rows: Vec<Row>,
    /// Characters typed by each bytes row (Return counted).
    pub script_chars: usize,
    /// Bytes rows: vinfra's three with full answers, the three with brief ones, then VNC's
    /// unless left out.
    pub wire: Vec<WireRow>,
    /// Through QEMU's keyboard controller, unless left out.
    pub keyboard: Option<super::kbd::KbdRow>,
}

/// Runs the bench (progress on stderr).
pub async fn run(args: &TerminalArgs) -> anyhow::Result<TerminalReport> {
    if args.terminals == 0
        || args.rate == 0
        || args.vms == 0
        || args.secs == 0
        || args.kbd_rate == 0
    {
        bail!("--terminals, --rate, --vms, --secs and --kbd-rate must be at least 1");
    }
    let tmp = tempfile::Builder::new()
        .prefix("vinfra-bench-terminal-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let dir = tmp.path();
    let store = crate::store_spec::open_store(&crate::store_spec::parse_store_spec(&format!(
        "redb:{}",
        dir.join("state.redb").display()
    ))?)
    .await?;
    let admin_token = api::bootstrap_admin(store.as_ref(), dir)
        .await?
        .context("no admin token was made")?;
    let server = api::serve(
        api::ServerConfig {
            listen: "127.0.0.1:0".parse()?,
            blobs: Some(api::BlobConfig {
                dir: dir.join("blobs"),
                import_dir: None,
                max_bytes: api::DEFAULT_MAX_BLOB_BYTES,
            }),
            // Hundreds of terminals share one address: the per-token limit is not measured here.
            rate_limit: None,
            secrets_key_file: Some(dir.join("secrets.key")),
            ..api::ServerConfig::default()
        },
        store,
    )
    .await?;
    let url = format!("http://{}", server.addr());
    let admin = client::Client::new(&url, &admin_token)?;
    let agent_token = admin
        .create_token(&CreateToken::new(Role::Agent))
        .await?
        .token;
    let img = compute::sim::write_image(&dir.join("image"), 16)?;
    admin
        .upload_image(
            &client::ImageFiles {
                kernel: Some(img.kernel),
                initrd: Some(img.initrd),
                disk_template: Some(img.disk_template),
            },
            CreateImage {
                name: "bench".into(),
                kernel: None,
                initrd: None,
                disk_template: None,
                cmdline: img.cmdline,
                disk_mib: 16,
                tenant: None,
            },
        )
        .await?;
    let driver = Arc::new(compute::SimDriver::new(compute::sim::SimConfig {
        boot_time: Duration::from_millis(100),
        ..compute::sim::SimConfig::default()
    }));
    let agent = spawn_agent(
        &url,
        &agent_token,
        "bench-a",
        &dir.join("host-a"),
        &dir.join("origin"),
        driver,
    );
    host_up(&admin, "bench-a").await?;

    eprintln!("[setup] {} VMs, {} terminals", args.vms, args.terminals);
    for i in 0..args.vms {
        running_vm(&admin, &format!("vm{i}"), "bench-a").await?;
    }
    let mut creds = Vec::new();
    for i in 0..args.terminals {
        let vm = format!("vm{}", i % args.vms);
        let made = terminal_on(&admin, &format!("t{i}"), &vm, SharePolicy::Shared).await?;
        creds.push(TerminalCredentials::new(&made, &url));
    }

    eprintln!(
        "[session] {} terminals × {} ops/s for {} s",
        args.terminals, args.rate, args.secs
    );
    let session = measure(&creds, args, true).await?;
    eprintln!(
        "[one-off] {} terminals × {} ops/s for {} s",
        args.terminals, args.rate, args.secs
    );
    let one_off = measure(&creds, args, false).await?;
    eprintln!("[bytes] the scripted typing session as key and as text operations");
    let mut wire = Vec::new();
    for form in [SessionReplies::Full, SessionReplies::Brief] {
        for how in [Typing::KeyEvents, Typing::KeyPresses, Typing::Lines] {
            wire.push(vinfra_wire(&admin, &url, how, form).await?);
        }
    }
    if !args.no_vnc {
        eprintln!("[bytes] the same through QEMU's VNC, websockify and vncdotool");
        let lines: Vec<String> = SCRIPT.iter().map(|l| (*l).to_owned()).collect();
        let (to_server, from_server) =
            super::vnc::typing_session(&args.vnc_python, &lines, dir).await?;
        wire.push(WireRow {
            path: "vnc".into(),
            messages: None,
            to_server,
            from_server,
            total: to_server + from_server,
        });
    }
    agent.stop().await;
    let keyboard = if args.kbd_vms == 0 {
        None
    } else {
        eprintln!(
            "[keyboard] {} QEMU VMs (qtest), one terminal each × {} ops/s for {} s",
            args.kbd_vms, args.kbd_rate, args.secs
        );
        Some(
            super::kbd::measure(
                &admin,
                &url,
                &agent_token,
                dir,
                args.kbd_vms,
                args.kbd_rate,
                args.secs,
            )
            .await?,
        )
    };
    drop(server);
    Ok(TerminalReport {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        terminals: args.terminals,
        rate: args.rate,
        replies: args.replies.clone(),
        vms: args.vms,
        rows: vec![session, one_off],
        script_chars: SCRIPT.iter().map(|l| l.len() + 1).sum(),
        wire,
        keyboard,
    })
}

/// Waits until `host` is registered and up.
pub(super) async fn host_up(admin: &client::Client, host: &str) -> anyhow::Result<()> {
    wait_until(&format!("host {host} up"), || async {
        admin
            .get_host(host)
            .await
            .is_ok_and(|h| h.state == model::HostState::Up)
    })
    .await
}

/// Creates VM `name` on `host` (64 MiB, the bench's image) and waits until it runs.
pub(super) async fn running_vm(
    admin: &client::Client,
    name: &str,
    host: &str,
) -> anyhow::Result<model::Vm> {
    let vm = admin
        .create_vm(&CreateVm {
            name: name.into(),
            host: Some(host.into()),
            memory_mib: 64,
            vcpus: 1,
            image: "bench".into(),
            ..CreateVm::default()
        })
        .await?;
    wait_until(&format!("{name} running"), || async {
        admin
            .get_vm(name)
            .await
            .is_ok_and(|v| v.observed == ObservedState::Running)
    })
    .await?;
    Ok(vm)
}

/// A new terminal `name` bound to `vm`.
pub(super) async fn terminal_on(
    admin: &client::Client,
    name: &str,
    vm: &str,
    policy: SharePolicy,
) -> anyhow::Result<CreatedTerminal> {
    let made = admin
        .create_terminal(&CreateTerminal {
            name: name.into(),
            tenant: None,
        })
        .await?;
    admin
        .bind_terminal(
            name,
            &BindTerminal {
                vm: vm.into(),
                policy,
            },
        )
        .await?;
    Ok(made)
}

/// How a terminal types [`SCRIPT`].
#[derive(Clone, Copy, PartialEq)]
enum Typing {
    /// A `key` operation down and one up per character (a terminal forwarding raw key
    /// events), `ret` per line.
    KeyEvents,
    /// One `key_combo` of one key per character (press and release).
    KeyPresses,
    /// One `type_text` per line.
    Lines,
}

impl Typing {
    fn name(self) -> &'static str {
        match self {
            Typing::KeyEvents => "key",
            Typing::KeyPresses => "key_combo",
            Typing::Lines => "type_text",
        }
    }

    /// The operation bodies that type [`SCRIPT`].
    fn bodies(self) -> Vec<String> {
        let mut out = Vec::new();
        for line in SCRIPT {
            if self == Typing::Lines {
                let op = serde_json::json!({"op": "type_text", "text": format!("{line}\n")});
                out.push(serde_json::json!({ "operation": op }).to_string());
                continue;
            }
            for ch in line.chars().chain(['\n']) {
                let qcode = match ch {
                    ' ' => "spc".to_owned(),
                    '\n' => "ret".to_owned(),
                    c => c.to_string(),
                };
                if self == Typing::KeyPresses {
                    out.push(format!(
                        r#"{{"operation":{{"op":"key_combo","qcodes":["{qcode}"]}}}}"#
                    ));
                    continue;
                }
                for down in [true, false] {
                    out.push(format!(
                        r#"{{"operation":{{"op":"key","qcode":"{qcode}","down":{down}}}}}"#
                    ));
                }
            }
        }
        out
    }
}

/// A new terminal bound to `vm0` types [`SCRIPT`] over one session through a byte
/// counter, each operation answered `performed` before the next and sent at most at 80%
/// of a terminal's rate limit; the session's answers in `form`.
async fn vinfra_wire(
    admin: &client::Client,
    url: &str,
    how: Typing,
    form: SessionReplies,
) -> anyhow::Result<WireRow> {
    let brief = form == SessionReplies::Brief;
    let name = format!(
        "wire-{}{}",
        how.name().replace('_', "-"),
        if brief { "-brief" } else { "" }
    );
    let name = name.as_str();
    let made = terminal_on(admin, name, "vm0", SharePolicy::Shared).await?;
    let server: std::net::SocketAddr = url
        .trim_start_matches("http://")
        .parse()
        .context("the bench server's address")?;
    let counter = super::vnc::Counter::start(server).await?;
    let creds = TerminalCredentials::new(&made, &format!("http://{}", counter.addr));
    let bodies = how.bodies();
    let (mut tx, mut rx) = TerminalSession::connect_with(&creds, None, form)
        .await?
        .split();
    // Typing paced under a terminal's rate limit (a fast loopback would exceed it).
    let mut pace = tokio::time::interval(Duration::from_secs_f64(
        1.0 / (control::terminals::RATE_PER_SECOND * 0.8),
    ));
    for (n, body) in bodies.iter().enumerate() {
        pace.tick().await;
        let (_, ts) = client::terminal::clock_seq();
        tx.send(n as u64 + 1, ts, body).await?;
        match rx.next().await {
            Some(Ok(SessionReply::Answer { operation }))
                if !brief && operation.outcome == OperationOutcome::Performed => {}
            Some(Ok(SessionReply::Outcome { seq, outcome, .. }))
                if brief && outcome == OperationOutcome::Performed && seq == n as u64 + 1 => {}
            other => bail!("{name}: operation {} not performed: {other:?}", n + 1),
        }
    }
    tx.close().await?;
    drop(rx);
    let (to_server, from_server) = counter.bytes().await?;
    Ok(WireRow {
        path: format!(
            "vinfra {}{}",
            how.name(),
            if brief { ", brief" } else { "" }
        ),
        messages: Some(bodies.len()),
        to_server,
        from_server,
        total: to_server + from_server,
    })
}

/// Every terminal sends at the rate for the duration, over a session or one-off.
async fn measure(
    creds: &[TerminalCredentials],
    args: &TerminalArgs,
    over_session: bool,
) -> anyhow::Result<Row> {
    let period = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let ops_each = usize::try_from(u64::from(args.rate) * args.secs)?;
    let form = if args.replies == "brief" {
        SessionReplies::Brief
    } else {
        SessionReplies::Full
    };
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in creds.iter().enumerate() {
        let c = c.clone();
        // Spread the terminals' ticks over the period.
        let offset = period.mul_f64(i as f64 / creds.len() as f64);
        tasks.spawn(async move {
            tokio::time::sleep(offset).await;
            if over_session {
                one_terminal_session(c, period, ops_each, form).await
            } else {
                one_terminal_posts(c, period, ops_each).await
            }
        });
    }
    let (mut ms, mut sent, mut other) = (Vec::new(), 0, Vec::new());
    while let Some(r) = tasks.join_next().await {
        let (m, s, o) = r??;
        ms.extend(m);
        sent += s;
        other.extend(o);
    }
    let mut other_reasons = std::collections::BTreeMap::new();
    for why in &other {
        *other_reasons.entry(why.clone()).or_insert(0) += 1;
    }
    let took = started.elapsed().as_secs_f64();
    ms.sort_by(f64::total_cmp);
    Ok(Row {
        path: if over_session { "session" } else { "one-off" },
        sent,
        performed: ms.len(),
        other: other.len(),
        other_reasons,
        per_s: ms.len() as f64 / took,
        p50_ms: quantile(&ms, 50),
        p99_ms: quantile(&ms, 99),
        max_ms: ms.last().copied(),
    })
}

fn key_body(n: usize) -> String {
    format!(
        r#"{{"operation":{{"op":"key","qcode":"a","down":{}}}}}"#,
        n.is_multiple_of(2)
    )
}

type Measured = (Vec<f64>, usize, Vec<String>);

async fn one_terminal_session(
    c: TerminalCredentials,
    period: Duration,
    ops: usize,
    form: SessionReplies,
) -> anyhow::Result<Measured> {
    let s = TerminalSession::connect_with(&c, None, form).await?;
    let (mut tx, mut rx) = s.split();
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let reader = tokio::spawn(async move {
        let (mut ms, mut other) = (Vec::new(), Vec::new());
        while let Some(at) = sent_rx.recv().await {
            match rx.next().await {
                Some(Ok(SessionReply::Answer { operation }))
                    if operation.outcome == OperationOutcome::Performed =>
                {
                    ms.push(at.elapsed().as_secs_f64() * 1000.0);
                }
                Some(Ok(SessionReply::Answer { operation })) => {
                    other.push(format!("{:?}", operation.outcome).to_lowercase());
                }
                Some(Ok(SessionReply::Outcome {
                    outcome: OperationOutcome::Performed,
                    ..
                })) => ms.push(at.elapsed().as_secs_f64() * 1000.0),
                Some(Ok(SessionReply::Outcome { outcome, .. })) => {
                    other.push(format!("{outcome:?}").to_lowercase());
                }
                Some(Ok(SessionReply::Refused { reason, .. })) => other.push(reason),
                Some(Err(e)) => {
                    other.push(format!("session: {e}"));
                    break;
                }
                None => {
                    other.push("session closed".into());
                    break;
                }
            }
        }
        (ms, other)
    });
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..ops {
        tick.tick().await;
        let (_, ts) = client::terminal::clock_seq();
        let _ = sent_tx.send(Instant::now());
        tx.send(n as u64 + 1, ts, &key_body(n)).await?;
    }
    drop(sent_tx);
    let (ms, other) = reader.await?;
    let _ = tx.close().await;
    Ok((ms, ops, other))
}

async fn one_terminal_posts(
    c: TerminalCredentials,
    period: Duration,
    ops: usize,
) -> anyhow::Result<Measured> {
    let http = client::Client::new(&c.url, "-")?;
    let (mut ms, mut other) = (Vec::new(), Vec::new());
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Numbers above those the session rows used.
    let first = ops as u64 + 1;
    for n in 0..ops {
        tick.tick().await;
        let (_, ts) = client::terminal::clock_seq();
        let t0 = Instant::now();
        match http
            .send_operation(c.sign(first + n as u64, ts, &key_body(n)))
            .await
        {
            Ok(r) if r.outcome == OperationOutcome::Performed => {
                ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            Ok(r) => other.push(format!("{:?}", r.outcome).to_lowercase()),
            Err(e) => other.push(e.status().map_or("error".into(), |s| format!("http {s}"))),
        }
    }
    Ok((ms, ops, other))
}

pub(super) async fn wait_until<F, Fut>(what: &str, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond().await {
        if Instant::now() > deadline {
            bail!("{what}: not within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The bench's agent on its own thread and runtime (as a separate process would be).
pub(super) struct BenchAgent {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl BenchAgent {
    /// Stops the agent (it stops its VMs) and waits for it, before the server goes.
    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

/// An agent for host `host` with `driver`, data in `data_dir`.
pub(super) fn spawn_agent(
    url: &str,
    token: &str,
    host: &str,
    data_dir: &std::path::Path,
    origin_dir: &std::path::Path,
    driver: Arc<dyn compute::ComputeDriver>,
) -> BenchAgent {
    let mut cfg = agent::AgentConfig::simulated(url, token, host, data_dir.to_owned(), driver);
    cfg.disks.origin_dir = origin_dir.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let shutdown = async move {
                let _ = rx.await;
            };
            if let Err(e) = agent::run(cfg, shutdown).await {
                eprintln!("bench agent: {e}");
            }
        });
    });
    BenchAgent { stop: tx, thread }
}

/// The report as a table.
pub fn table(r: &TerminalReport) -> String {
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    let mut s = format!(
        "vinfra bench terminal: {} terminals × {} ops/s on {} VMs (sim driver), {} build, {} cores, {} session answers\n\n",
        r.terminals, r.rate, r.vms, r.build, r.cores, r.replies
    );
    s.push_str(&format!(
        "{:<10} {:>8} {:>10} {:>6} {:>9} {:>9} {:>9} {:>9}\n",
        "path", "sent", "performed", "other", "ops/s", "p50 ms", "p99 ms", "max ms"
    ));
    for row in &r.rows {
        s.push_str(&format!(
            "{:<10} {:>8} {:>10} {:>6} {:>9.0} {:>9} {:>9} {:>9}\n",
            row.path,
            row.sent,
            row.performed,
            row.other,
            row.per_s,
            f(row.p50_ms),
            f(row.p99_ms),
            f(row.max_ms)
        ));
    }
    for row in &r.rows {
        if !row.other_reasons.is_empty() {
            s.push_str(&format!(
                "{} not performed: {:?}\n",
                row.path, row.other_reasons
            ));
        }
    }
    s.push_str("\nlatency: message sent → reply `performed` (server checked and recorded it, the host's agent performed it through the driver and answered)\n");
    if let Some(k) = &r.keyboard {
        s.push_str(&format!(
            "\nthrough QEMU's keyboard controller: {} VMs (qtest), one terminal each × {} key ops/s\n\n",
            k.vms, k.rate
        ));
        s.push_str(&format!(
            "{:>6} {:>10} {:>14} {:>17} {:>17} {:>17} {:>17}\n",
            "sent",
            "performed",
            "at controller",
            "performed p50 ms",
            "performed p99 ms",
            "i8042 p50 ms",
            "i8042 p99 ms"
        ));
        s.push_str(&format!(
            "{:>6} {:>10} {:>14} {:>17} {:>17} {:>17} {:>17}\n",
            k.sent,
            k.performed,
            k.at_controller,
            f(k.performed_p50_ms),
            f(k.performed_p99_ms),
            f(k.controller_p50_ms),
            f(k.controller_p99_ms)
        ));
        s.push_str("performed: reply `performed` (the agent answered once QMP acknowledged input-send-event); i8042: the op's last scancode read at the VM's keyboard controller (one qtest poller over all VMs)\n");
    }
    if !r.wire.is_empty() {
        s.push_str(&format!(
            "\nbytes on the wire, one scripted typing session ({} lines, {} keys; TCP payload both ways)\n\n",
            SCRIPT.len(),
            r.script_chars
        ));
        s.push_str(&format!(
            "{:<26} {:>9} {:>11} {:>11} {:>11} {:>12}\n",
            "path", "messages", "to server", "from server", "total", "VNC / this"
        ));
        let vnc = r.wire.iter().find(|w| w.path == "vnc").map(|w| w.total);
        for w in &r.wire {
            let ratio = match vnc {
                Some(v) if w.total > 0 => format!("{:.1}×", v as f64 / w.total as f64),
                _ => "-".into(),
            };
            s.push_str(&format!(
                "{:<26} {:>9} {:>11} {:>11} {:>11} {:>12}\n",
                w.path,
                w.messages.map_or("-".into(), |m| m.to_string()),
                w.to_server,
                w.from_server,
                w.total,
                ratio
            ));
        }
        s.push_str("\nvinfra: signed operation messages over one WebSocket session, each answered");
        if vnc.is_some() {
            s.push_str("; vnc: QEMU's VNC server behind websockify, vncdotool as the viewer (ZRLE; the whole screen once, then after each key its changes), over WebSocket as a browser's client");
        }
        s.push('\n');
    }
    s
}
