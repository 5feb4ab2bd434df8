//! The keyboard-controller row of `vinfra bench terminal`: key operations through the
//! whole system into real QEMU processes, timed twice — to the reply saying `performed`
//! (the agent answered once QMP acknowledged `input-send-event`) and to the moment the
//! scancodes are in the VM's i8042 keyboard controller.
//!
//! A second agent in this process runs QEMU in its qtest firmware mode (production's
//! machine and devices; a firmware that only halts, so nothing in the VM reads its
//! keyboard and QEMU costs no CPU). One terminal per VM, bound exclusively, sends
//! alternately `a` down and `a` up over a session at the row's rate; one poller reads
//! every VM's controller through qtest in turn, and each op's time at the controller is
//! when the poller found its last scancode (`1c` down, `f0 1c` up; set 2, as nothing
//! turned on the controller's translation). So the second column includes up to one
//! pass of the poller over the VMs (a few qtest round trips each). The poller reads only
//! the VMs with an operation on its way and sleeps while there is none (and reads every
//! VM once at the end, so that a scancode no operation sent is still found): spinning
//! over idle VMs took a core from the server, the agent and QEMU it measures.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use client::session::TerminalSession;
use client::terminal::TerminalCredentials;
use compute::qemu::qtest::{write_halting_firmware, Qtest};
use compute::qemu::{files, ps2};
use model::terminal_ops::QCode;
use model::terminals::{OperationOutcome, SessionReply, SharePolicy};
use serde::Serialize;

use super::control::quantile;
use super::terminal::{host_up, running_vm, spawn_agent, terminal_on, wait_until};

/// The keyboard-controller row.
#[derive(Debug, Clone, Serialize)]
pub struct KbdRow {
    /// VMs (one terminal each).
    pub vms: usize,
    /// Operations per second per terminal.
    pub rate: u32,
    /// Operations sent.
    pub sent: usize,
    /// Answered `performed`.
    pub performed: usize,
    /// Whose scancodes reached the controller.
    pub at_controller: usize,
    /// Message sent → reply `performed` (QMP acknowledged), median ms.
    pub performed_p50_ms: Option<f64>,
    /// … 99th percentile, ms.
    pub performed_p99_ms: Option<f64>,
    /// Message sent → its scancodes in the i8042, median ms.
    pub controller_p50_ms: Option<f64>,
    /// … 99th percentile, ms.
    pub controller_p99_ms: Option<f64>,
}

/// Per VM: each op sent and not yet seen at the controller (sent at, bytes it puts
/// there), and the bytes of the head op already seen.
#[derive(Default)]
struct Outstanding {
    ops: VecDeque<(Instant, usize)>,
    seen: usize,
}

type Shared = Arc<Mutex<Outstanding>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Outstanding> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs the row: `vms` VMs on a qtest agent of the server at `url`, `rate` ops/s each
/// for `secs`.
pub async fn measure(
    admin: &client::Client,
    url: &str,
    agent_token: &str,
    dir: &Path,
    vms: usize,
    rate: u32,
    secs: u64,
) -> anyhow::Result<KbdRow> {
    let fw = dir.join("hlt.bin");
    write_halting_firmware(&fw).context("write the qtest firmware")?;
    let driver = Arc::new(compute::QemuDriver::new().with_qtest_firmware(&fw));
    let host_dir = dir.join("host-q");
    let agent = spawn_agent(
        url,
        agent_token,
        "bench-q",
        &host_dir,
        &dir.join("origin-q"),
        driver,
    );
    let r = run(admin, url, &host_dir, vms, rate, secs).await;
    // Agents leave their VMs running when they stop: delete them first.
    for i in 0..vms {
        let _ = admin.delete_vm(&format!("kbd{i}")).await;
    }
    let gone = wait_until("the keyboard row's VMs deleted", || async {
        admin
            .list_vms()
            .await
            .is_ok_and(|v| !v.iter().any(|vm| vm.name.as_str().starts_with("kbd")))
    })
    .await;
    agent.stop().await;
    let row = r?;
    gone?;
    Ok(row)
}

async fn run(
    admin: &client::Client,
    url: &str,
    host_dir: &Path,
    vms: usize,
    rate: u32,
    secs: u64,
) -> anyhow::Result<KbdRow> {
    host_up(admin, "bench-q").await?;
    let mut controllers = Vec::new();
    let mut creds = Vec::new();
    for i in 0..vms {
        let name = format!("kbd{i}");
        let vm = running_vm(admin, &name, "bench-q").await?;
        let short: String = vm.id.0.simple().to_string().chars().take(12).collect();
        let sock = host_dir.join("vms").join(short).join(files::QTEST);
        let q = Qtest::connect(&sock, Duration::from_secs(30))
            .await
            .with_context(|| format!("qtest of {name}"))?;
        controllers.push(q);
        let made = terminal_on(admin, &format!("kbd-t{i}"), &name, SharePolicy::Exclusive).await?;
        creds.push(TerminalCredentials::new(&made, url));
    }
    let key = QCode::from_name("a").context("qcode a")?;
    let outstanding: Vec<Shared> = (0..vms).map(|_| Shared::default()).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(tokio::sync::Notify::new());
    let poller = {
        let (outstanding, stop, sent) = (outstanding.clone(), stop.clone(), sent.clone());
        tokio::spawn(async move { poll(controllers, outstanding, stop, sent).await })
    };
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let ops = usize::try_from(u64::from(rate) * secs)?;
    let mut senders = tokio::task::JoinSet::new();
    for (i, c) in creds.into_iter().enumerate() {
        let (out, sent) = (outstanding[i].clone(), sent.clone());
        let offset = period.mul_f64(i as f64 / vms as f64);
        senders.spawn(async move {
            tokio::time::sleep(offset).await;
            type_keys(c, out, sent, key, period, ops).await
        });
    }
    let mut performed = Vec::new();
    while let Some(r) = senders.join_next().await {
        performed.extend(r??);
    }
    // What is still on its way to a controller gets a moment, then the poller stops.
    let deadline = Instant::now() + Duration::from_secs(5);
    while outstanding.iter().any(|o| !lock(o).ops.is_empty()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut at_controller = poller.await??;
    performed.sort_by(f64::total_cmp);
    at_controller.sort_by(f64::total_cmp);
    Ok(KbdRow {
        vms,
        rate,
        sent: ops * vms,
        performed: performed.len(),
        at_controller: at_controller.len(),
        performed_p50_ms: quantile(&performed, 50),
        performed_p99_ms: quantile(&performed, 99),
        controller_p50_ms: quantile(&at_controller, 50),
        controller_p99_ms: quantile(&at_controller, 99),
    })
}

/// One terminal's ops over a session: the time of each to its `performed` reply, ms.
async fn type_keys(
    c: TerminalCredentials,
    out: Shared,
    sent: Arc<tokio::sync::Notify>,
    key: QCode,
    period: Duration,
    ops: usize,
) -> anyhow::Result<Vec<f64>> {
    let (mut tx, mut rx) = TerminalSession::connect(&c, None).await?.split();
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let reader = tokio::spawn(async move {
        let mut ms = Vec::new();
        while let Some(at) = sent_rx.recv().await {
            match rx.next().await {
                Some(Ok(SessionReply::Answer { operation }))
                    if operation.outcome == OperationOutcome::Performed =>
                {
                    ms.push(at.elapsed().as_secs_f64() * 1000.0);
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
        ms
    });
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..ops {
        tick.tick().await;
        let down = n % 2 == 0;
        let body = format!(
            r#"{{"operation":{{"op":"key","qcode":"{}","down":{down}}}}}"#,
            key.as_str()
        );
        let (_, ts) = client::terminal::clock_seq();
        let now = Instant::now();
        lock(&out)
            .ops
            .push_back((now, ps2::scancodes(key, down).len()));
        sent.notify_one();
        let _ = sent_tx.send(now);
        tx.send(n as u64 + 1, ts, &body).await?;
    }
    drop(sent_tx);
    let ms = reader.await?;
    let _ = tx.close().await;
    Ok(ms)
}

/// Reads the controllers of the VMs with an operation on its way, in turn, until stopped
/// (waiting for `sent` while there is none), then every controller once; each op's time
/// to its last scancode.
async fn poll(
    mut controllers: Vec<Qtest>,
    outstanding: Vec<Shared>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    sent: Arc<tokio::sync::Notify>,
) -> anyhow::Result<Vec<f64>> {
    let mut ms = Vec::new();
    let mut last = false;
    loop {
        last |= stop.load(std::sync::atomic::Ordering::Relaxed);
        let mut busy = false;
        for (q, out) in controllers.iter_mut().zip(&outstanding) {
            if !last && lock(out).ops.is_empty() {
                continue;
            }
            busy = true;
            let bytes = q.drain_keyboard().await?;
            if bytes.is_empty() {
                continue;
            }
            let now = Instant::now();
            let mut o = lock(out);
            o.seen += bytes.len();
            while let Some(&(at, n)) = o.ops.front() {
                if o.seen < n {
                    break;
                }
                o.seen -= n;
                o.ops.pop_front();
                ms.push(now.duration_since(at).as_secs_f64() * 1000.0);
            }
            if o.ops.is_empty() && o.seen > 0 {
                bail!(
                    "{} scancode bytes at a controller that no operation sent",
                    o.seen
                );
            }
        }
        if last {
            return Ok(ms);
        }
        if busy {
            tokio::task::yield_now().await;
        } else {
            // Bounded, so that a stop is seen.
            let _ = tokio::time::timeout(Duration::from_millis(5), sent.notified()).await;
        }
    }
}
