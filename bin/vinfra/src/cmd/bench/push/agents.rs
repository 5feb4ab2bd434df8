//! The agent rows of `vinfra bench push`: real `vinfra agent --driver sim` processes
//! hold the event streams, and a command is timed until the agent acted on it.
//!
//! `--agents` agents (hosts `bench-a<i>`, as `vinfra up --driver sim` starts them: one
//! process each, its own data dir, one shared origin dir), one simulated VM each,
//! running. Then `--agent-ops` stop/start commands one after another, alternating over
//! the VMs, each through the API; the next is sent once the server shows the VM's new
//! observed state (the agent reported it), so that they never overlap.
//!
//! The agents run with the log target `latency` at debug: the reconciler logs the
//! wall-clock time at which it hands a VM's new assignment to the VM's task (and whether
//! it came pushed or by the once-a-second poll), the sim driver the time at which the
//! VM's task calls it to stop or start the VM. After the run both are read back from the
//! logs and set against the wall-clock time taken just before each command was sent
//! (one machine, one clock). What the rows include:
//! - handed to the VM's task: server write, event, the agent reading it and routing it;
//! - driver called to stop: that, plus the VM task's `stopping` report to the server
//!   (its own round trip and store write) before it stops the VM;
//! - driver called to start: that, plus the `starting` report, the image files, opening
//!   the disk cache and exporting the disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use model::api::{CreateImage, CreateVm};
use model::{DesiredState, ObservedState, VmId};
use tokio::process::{Child, Command};

use super::{command, Measured, Row, MISSED_AFTER};

/// Tick period of the simulated guests (as `vinfra up --driver sim`): cheap.
const SIM_TICK_MS: u32 = 1000;

/// How long the agents may take to register and their VMs to run.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// One `vinfra agent` child.
struct AgentProc {
    host: String,
    log: PathBuf,
    child: Child,
}

/// The agent rows: handed to the VM task, driver called to stop, to start; and the
/// commands' own answers in this phase.
pub(super) async fn measure(
    exe: &Path,
    url: &str,
    admin: &client::Client,
    agent_token: &str,
    dir: &Path,
    agents: usize,
    ops: usize,
) -> anyhow::Result<Vec<Row>> {
    let dir = dir.join("agents");
    std::fs::create_dir_all(&dir).context("cannot create the agents' dir")?;
    upload_sim_image(admin, &dir).await?;
    let token_file = dir.join("agent.token");
    write_private(&token_file, agent_token)?;
    let mut procs = Vec::new();
    for i in 0..agents {
        procs.push(spawn_agent(
            exe,
            url,
            &token_file,
            &dir,
            &format!("bench-a{i}"),
        )?);
    }
    let result = run_ops(admin, &mut procs, ops).await;
    for p in &mut procs {
        let _ = p.child.kill().await;
    }
    let commands = result?;
    let mut routed = HashMap::new();
    let mut acted = HashMap::new();
    for p in &procs {
        let text = std::fs::read_to_string(&p.log)
            .with_context(|| format!("cannot read {}", p.log.display()))?;
        for line in text.lines() {
            match parse_line(line) {
                Some(Mark::Routed {
                    vm,
                    desired,
                    via,
                    at_us,
                }) => routed
                    .entry(vm)
                    .or_insert_with(Vec::new)
                    .push((desired, via, at_us)),
                Some(Mark::Acted { vm, action, at_us }) => acted
                    .entry(vm)
                    .or_insert_with(Vec::new)
                    .push((action, at_us)),
                None => {}
            }
        }
    }
    Ok(rows(&commands, &routed, &acted))
}

/// A command sent.
#[derive(Debug, Clone, Copy)]
struct Sent {
    vm: VmId,
    to: DesiredState,
    /// The wall clock just before it was sent, µs.
    t0_us: u64,
    /// Its own answer's time, ms.
    answer_ms: f64,
    /// The server showed the VM's new observed state in time (else: missed).
    shown: bool,
}

/// What a `latency` log line says.
#[derive(Debug, PartialEq, Eq)]
enum Mark {
    /// The reconciler handed the VM's assignment (desired `desired`) to its task.
    Routed {
        vm: String,
        desired: String,
        via: String,
        at_us: u64,
    },
    /// The VM's task called the sim driver to `action` (`stop`, `start`) it.
    Acted {
        vm: String,
        action: String,
        at_us: u64,
    },
}

/// Drops ANSI colour sequences (the log may be coloured).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // `ESC [ ... m`
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `key=value` in a log line's fields (quotes removed): the last one, as the event's own
/// fields come after its spans' (`stop{id="…" vm=…}: latency: … vm=…`).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .filter_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .next_back()
        .map(|v| v.trim_matches('"'))
}

fn parse_line(raw: &str) -> Option<Mark> {
    if !raw.contains("latency") {
        return None;
    }
    let line = strip_ansi(raw);
    let vm = field(&line, "vm")?.to_owned();
    let at_us = field(&line, "at_us")?.parse().ok()?;
    if line.contains("routed to the vm task") {
        Some(Mark::Routed {
            vm,
            desired: field(&line, "desired")?.to_owned(),
            via: field(&line, "via")?.to_owned(),
            at_us,
        })
    } else if line.contains("sim driver called") {
        Some(Mark::Acted {
            vm,
            action: field(&line, "action")?.to_owned(),
            at_us,
        })
    } else {
        None
    }
}

/// Per command, the first mark of its VM at or after it was sent that matches it.
fn rows(
    commands: &[Sent],
    routed: &HashMap<String, Vec<(String, String, u64)>>,
    acted: &HashMap<String, Vec<(String, u64)>>,
) -> Vec<Row> {
    let (mut routed_ms, mut stop_ms, mut start_ms) = (Vec::new(), Vec::new(), Vec::new());
    let (mut after_ms, mut answer_ms) = (Vec::new(), Vec::new());
    let (mut routed_missed, mut stop_missed, mut start_missed, mut via_poll) = (0, 0, 0, 0);
    let ms = |at: u64, t0: u64| at.saturating_sub(t0) as f64 / 1e3;
    for c in commands {
        let (vm, to, t0, shown) = (c.vm.to_string(), c.to, c.t0_us, c.shown);
        answer_ms.push(c.answer_ms);
        let desired = format!("{to:?}");
        let r = shown
            .then(|| routed.get(&vm))
            .flatten()
            .and_then(|v| v.iter().find(|(d, _, at)| *d == desired && *at >= t0));
        match r {
            Some((_, via, at)) => {
                routed_ms.push(ms(*at, t0));
                after_ms.push(ms(*at, t0) - c.answer_ms);
                if via != "push" {
                    via_poll += 1;
                }
            }
            None => routed_missed += 1,
        }
        let action = if to == DesiredState::Stopped {
            "stop"
        } else {
            "start"
        };
        let a = shown
            .then(|| acted.get(&vm))
            .flatten()
            .and_then(|v| v.iter().find(|(x, at)| x == action && *at >= t0));
        let (samples, missed) = if to == DesiredState::Stopped {
            (&mut stop_ms, &mut stop_missed)
        } else {
            (&mut start_ms, &mut start_missed)
        };
        match a {
            Some((_, at)) => samples.push(ms(*at, t0)),
            None => *missed += 1,
        }
    }
    vec![
        Row::of(Measured::AgentRouted { via_poll }, routed_ms, routed_missed),
        Row::of(Measured::AgentAfterAnswer, after_ms, routed_missed),
        Row::of(Measured::AgentStop, stop_ms, stop_missed),
        Row::of(Measured::AgentStart, start_ms, start_missed),
        Row::of(Measured::AgentAnswer, answer_ms, 0),
    ]
}

/// Waits for the agents, creates one VM on each, then sends the commands.
async fn run_ops(
    admin: &client::Client,
    procs: &mut [AgentProc],
    ops: usize,
) -> anyhow::Result<Vec<Sent>> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    for p in procs.iter_mut() {
        loop {
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "agent {} exited during startup ({status}); see {}",
                    p.host,
                    p.log.display()
                );
            }
            if admin
                .get_host(&p.host)
                .await
                .is_ok_and(|h| h.state == model::HostState::Up)
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("agent {} did not register; see {}", p.host, p.log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut vms = Vec::new();
    for (i, p) in procs.iter().enumerate() {
        let vm = admin
            .create_vm(&CreateVm {
                name: format!("bench-sim-{i}"),
                image: "bench-sim".into(),
                vcpus: 1,
                memory_mib: 64,
                host: Some(p.host.clone()),
                ..Default::default()
            })
            .await
            .context("cannot create a VM")?;
        vms.push(vm.id);
    }
    for vm in &vms {
        if !observed(admin, *vm, ObservedState::Running, SETUP_TIMEOUT).await? {
            bail!("VM {vm} did not start; see the agents' logs");
        }
    }
    eprintln!(
        "[agents] {ops} stop/start commands over {} agents (sim driver)",
        procs.len()
    );
    let mut sent = Vec::new();
    for k in 0..ops {
        let vm = vms[k % vms.len()];
        let to = if (k / vms.len()).is_multiple_of(2) {
            DesiredState::Stopped
        } else {
            DesiredState::Running
        };
        let want = if to == DesiredState::Stopped {
            ObservedState::Stopped
        } else {
            ObservedState::Running
        };
        let t0_us = wall_us();
        let t0 = Instant::now();
        command(admin, vm, to).await?;
        let answer_ms = t0.elapsed().as_secs_f64() * 1e3;
        let shown = observed(admin, vm, want, MISSED_AFTER).await?;
        sent.push(Sent {
            vm,
            to,
            t0_us,
            answer_ms,
            shown,
        });
    }
    Ok(sent)
}

/// Polls the VM until the server shows `want` as its observed state; `false` after
/// `within`. (Only paces the commands: the rows come from the agents' logs.)
async fn observed(
    admin: &client::Client,
    vm: VmId,
    want: ObservedState,
    within: Duration,
) -> anyhow::Result<bool> {
    let id = vm.to_string();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if admin.get_vm(&id).await?.observed == want {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(false)
}

/// The sim driver's placeholder image, registered as `bench-sim`.
async fn upload_sim_image(admin: &client::Client, dir: &Path) -> anyhow::Result<()> {
    let img = compute::sim::write_image(&dir.join("image"), 16)?;
    admin
        .upload_image(
            &client::ImageFiles {
                kernel: Some(img.kernel),
                initrd: Some(img.initrd),
                disk_template: Some(img.disk_template),
            },
            CreateImage {
                name: "bench-sim".into(),
                kernel: None,
                initrd: None,
                disk_template: None,
                cmdline: format!("{} vinfra.tick_ms={SIM_TICK_MS}", img.cmdline),
                disk_mib: 16,
                tenant: None,
            },
        )
        .await
        .context("cannot create the sim image")?;
    Ok(())
}

/// `vinfra agent --driver sim` for `host`, logging to `<dir>/<host>/agent.log` with
/// the `latency` marks on.
fn spawn_agent(
    exe: &Path,
    url: &str,
    token_file: &Path,
    dir: &Path,
    host: &str,
) -> anyhow::Result<AgentProc> {
    let hdir = dir.join(host);
    std::fs::create_dir_all(&hdir).with_context(|| format!("cannot create {}", hdir.display()))?;
    let log = hdir.join("agent.log");
    let out =
        std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new(exe)
        .arg("agent")
        .arg("--server")
        .arg(url)
        .arg("--host-name")
        .arg(host)
        .arg("--data-dir")
        .arg(&hdir)
        .arg("--token-file")
        .arg(token_file)
        .arg("--origin-dir")
        .arg(dir.join("origin"))
        .arg("--driver")
        .arg("sim")
        // Ends with us, even if we are killed: we hold its stdin.
        .arg("--exit-with-stdin")
        .env("RUST_LOG", "info,latency=debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start the agent of {host}"))?;
    Ok(AgentProc {
        host: host.to_owned(),
        log,
        child,
    })
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The wall clock, µs since the Unix epoch: the agents' marks use the same clock.
fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_read_from_plain_and_coloured_lines() {
        let plain = "2026-12-02T20:30:00.123456Z DEBUG latency: routed to the vm task \
                     vm=0192 desired=Stopped via=\"push\" at_us=1700000000123456";
        assert_eq!(
            parse_line(plain),
            Some(Mark::Routed {
                vm: "0192".into(),
                desired: "Stopped".into(),
                via: "push".into(),
                at_us: 1_700_000_000_123_456
            })
        );
        let coloured = "\u{1b}[2m2026-12-02T20:30:00Z\u{1b}[0m \u{1b}[34mDEBUG\u{1b}[0m \
                        stop{id=\"x\" vm=x}: \u{1b}[2mlatency\u{1b}[0m\u{1b}[2m:\u{1b}[0m sim driver called \
                        \u{1b}[3mvm\u{1b}[0m\u{1b}[2m=\u{1b}[0m0192 \u{1b}[3maction\u{1b}[0m\
                        \u{1b}[2m=\u{1b}[0m\"stop\" \u{1b}[3mat_us\u{1b}[0m\u{1b}[2m=\u{1b}[0m5";
        assert_eq!(
            parse_line(coloured),
            Some(Mark::Acted {
                vm: "0192".into(),
                action: "stop".into(),
                at_us: 5
            })
        );
        assert_eq!(parse_line("2026 INFO agent: registered host=a"), None);
        // A mark without its time is not a sample.
        assert_eq!(
            parse_line("DEBUG latency: sim driver called vm=1 action=\"stop\""),
            None
        );
    }

    #[test]
    fn each_command_takes_the_first_matching_mark_after_it() {
        let vm = VmId::new_random();
        let id = vm.to_string();
        let sent = |to, t0_us, shown| Sent {
            vm,
            to,
            t0_us,
            answer_ms: 0.5,
            shown,
        };
        let commands = vec![
            sent(DesiredState::Stopped, 1_000, true),
            sent(DesiredState::Running, 10_000, true),
            sent(DesiredState::Stopped, 20_000, false),
        ];
        let routed = HashMap::from([(
            id.clone(),
            vec![
                // The poll before the command: the old state.
                ("Running".to_owned(), "poll".to_owned(), 900),
                ("Stopped".to_owned(), "push".to_owned(), 2_000),
                ("Running".to_owned(), "poll".to_owned(), 13_000),
            ],
        )]);
        let acted = HashMap::from([(
            id,
            vec![("stop".to_owned(), 4_000), ("start".to_owned(), 16_000)],
        )]);
        let rows = rows(&commands, &routed, &acted);
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.samples, r.missed, r.max_ms))
            .collect();
        assert_eq!(
            got,
            [
                (2, 1, Some(3.0)),
                (2, 1, Some(2.5)),
                (1, 1, Some(3.0)),
                (1, 0, Some(6.0)),
                (3, 0, Some(0.5))
            ]
        );
        assert!(matches!(
            rows[0].path,
            Measured::AgentRouted { via_poll: 1 }
        ));
    }
}
