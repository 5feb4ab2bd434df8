//! The README's walk-through, tried as a new user would: `vinfra up` in an empty
//! directory, then every command of the README's ```` ```sh ```` block that follows "In
//! another terminal, in the same directory", in order, with the built `vinfra` in that
//! directory (the CLI finds `.vinfra/` by itself). The commands are read from README.md
//! at build time (`include_str!`), so the README and this test cannot drift apart: edit
//! the README and the test runs the new commands.
//!
//! How the block is read ([`walkthrough`]), and why it fails instead of skipping:
//! - one command per line; `;` separates several commands on one line;
//! - `#` at the start of a word starts a comment (as in sh); a line holding only a
//!   comment continues the comment of the command line above it;
//! - every command starts with `vinfra`; shell syntax this reader does not interpret
//!   (quotes, `$`, pipes, redirections, globs, `\`) fails the test, naming the line;
//! - a word in capitals (`ID`) is a placeholder the reader fills in; see [`Placeholder`].
//!   An unknown placeholder fails the test.
//!
//! Substitution rule: `ID` (in `vinfra token revoke ID`) is the id of the token that the
//! walk-through's latest `vinfra token create` minted (printed on stderr as
//! `token <id> (…)`, and listed by `vinfra token list`, which the test checks). Not any
//! id from the list: the list also holds the admin token the later commands use.
//!
//! Each command must exit 0 within a bound ([`bound`]): generous, for TCG on a loaded
//! 2-core machine, but finite, so a command that waits (vm create, migrate, drain,
//! ns instantiate) cannot hang the test. Where the README promises something (an
//! address, a console line, "nothing left on either site"), [`PROMISES`] checks it; the
//! values (`gets 10.70.0.1`, `console: PING 10.70.0.1 ok`) are read from the README's
//! comments, and each promise must match exactly one command of the block.
//!
//! Where the test departs from a bare `vinfra up` (say so here, not silently): `up`
//! listens on free loopback ports instead of 7070/7071 (other tests and users share the
//! machine), runs with `--accel tcg` like every other test of this harness (what `auto`
//! picks on the development machine), and finds the default guest image the harness
//! builds (`compute::ensure_default_image`) copied into `.vinfra/images/` beforehand, so
//! the first run does not download a kernel package again. `examples/` is a symlink to
//! the checkout's, as the README's relative paths expect to run in the checkout.
//! Finally Ctrl-C (SIGINT) stops `up`, which must exit 0 leaving no QEMU behind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::VINFRA;

/// README.md of the checkout, as built.
const README: &str = include_str!("../../../../README.md");
/// The line before the walk-through's code block.
const ANCHOR: &str = "In another terminal, in the same directory";
/// Characters of shell syntax the reader does not interpret.
const SHELL_SYNTAX: &[char] = &[
    '\'', '"', '`', '$', '|', '&', '<', '>', '(', ')', '{', '}', '\\', '*', '?', '!', '~',
];

/// One command of the walk-through.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Step {
    /// 1-based line in README.md.
    line: usize,
    /// The command as written.
    text: String,
    /// Its arguments after `vinfra`.
    args: Vec<String>,
    /// Its line's comment and the comment lines continuing it.
    comment: String,
}

/// A word of a README command that the test fills in before running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder {
    /// `ID`: the id of the token the latest `vinfra token create` minted.
    TokenId,
}

impl Placeholder {
    fn parse(word: &str) -> Option<Result<Placeholder, String>> {
        let caps = word.len() >= 2
            && word.starts_with(|c: char| c.is_ascii_uppercase())
            && word
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !caps {
            return None;
        }
        Some(match word {
            "ID" => Ok(Placeholder::TokenId),
            other => Err(format!(
                "unknown placeholder {other:?} (this test fills in only ID, the id of the \
                 token the latest `vinfra token create` minted)"
            )),
        })
    }
}

/// Splits `line` at its comment: `#` at the start of a word, as in sh.
fn split_comment(line: &str) -> (&str, &str) {
    let b = line.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b'#' && (i == 0 || b[i - 1].is_ascii_whitespace()) {
            return (&line[..i], line[i + 1..].trim());
        }
    }
    (line, "")
}

/// The commands of the code block after [`ANCHOR`] in `readme`, in order.
fn walkthrough(readme: &str) -> Result<Vec<Step>, String> {
    let lines: Vec<&str> = readme.lines().collect();
    let anchor = lines
        .iter()
        .position(|l| l.contains(ANCHOR))
        .ok_or_else(|| format!("README.md has no line with {ANCHOR:?} before the walk-through"))?;
    let open = lines[anchor..]
        .iter()
        .position(|l| l.trim_start().starts_with("```"))
        .map(|i| anchor + i)
        .ok_or_else(|| format!("no code block after README.md line {}", anchor + 1))?;
    if lines[open].trim() != "```sh" {
        return Err(format!(
            "README.md line {}: the block after {ANCHOR:?} opens with {:?}, expected ```sh",
            open + 1,
            lines[open].trim()
        ));
    }
    let close = lines[open + 1..]
        .iter()
        .position(|l| l.trim() == "```")
        .map(|i| open + 1 + i)
        .ok_or_else(|| format!("README.md line {}: the ```sh block never closes", open + 1))?;

    let mut steps: Vec<Step> = Vec::new();
    for (i, raw) in lines[open + 1..close].iter().enumerate() {
        let line = open + 2 + i;
        let at = |why: String| format!("README.md line {line} ({:?}): {why}", raw.trim());
        if raw.trim().is_empty() {
            continue;
        }
        let (code, comment) = split_comment(raw);
        if code.trim().is_empty() {
            // A comment-only line continues the comment of the command line above.
            let Some(prev) = steps.last().map(|s| s.line) else {
                return Err(at("a comment line before any command".into()));
            };
            for s in steps.iter_mut().filter(|s| s.line == prev) {
                s.comment = format!("{} {comment}", s.comment).trim().to_owned();
            }
            continue;
        }
        if let Some(c) = code.chars().find(|c| SHELL_SYNTAX.contains(c)) {
            return Err(at(format!(
                "{c:?} is shell syntax this test does not interpret"
            )));
        }
        let parts: Vec<&str> = code.split(';').map(str::trim).collect();
        for (j, part) in parts.iter().enumerate() {
            if part.is_empty() {
                if j + 1 == parts.len() && j > 0 {
                    continue; // a trailing `;`
                }
                return Err(at("an empty command between `;`".into()));
            }
            let words: Vec<&str> = part.split_whitespace().collect();
            if words[0] != "vinfra" {
                return Err(at(format!(
                    "{:?} is not a vinfra command (the walk-through runs only vinfra)",
                    words[0]
                )));
            }
            if words.len() < 2 {
                return Err(at("`vinfra` without a command".into()));
            }
            for w in &words {
                if let Some(Err(e)) = Placeholder::parse(w) {
                    return Err(at(e));
                }
            }
            steps.push(Step {
                line,
                text: (*part).to_owned(),
                args: words[1..].iter().map(|w| (*w).to_owned()).collect(),
                comment: comment.to_owned(),
            });
        }
    }
    if steps.is_empty() {
        return Err(format!(
            "README.md line {}: the walk-through block holds no command",
            open + 1
        ));
    }
    Ok(steps)
}

/// What the README promises, by the command words it is about. A step gets the
/// promise with the longest matching prefix; each promise matches exactly one step.
const PROMISES: &[&str] = &[
    "host list",
    "image list",
    "vm create demo",
    "vm console demo",
    "network create blue",
    "vm create n1",
    "vm create n2",
    "vm trace stop demo",
    "vm migrate demo",
    "migration list",
    "host maintenance enter host-c --dry-run",
    "host maintenance enter host-c",
    "host maintenance exit host-c",
    "placement explain",
    "vm create db",
    "ns instantiate",
    "ns terminate edge",
    "vm list -o json",
    "token create",
    "token list",
    "token revoke",
    "vm delete demo",
];

fn words(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

/// The promise of `step`, if any.
fn promise_of(step: &Step) -> Option<&'static str> {
    PROMISES
        .iter()
        .copied()
        .filter(|p| {
            let p = words(p);
            step.args.len() >= p.len() && step.args.iter().zip(&p).all(|(a, b)| a == b)
        })
        .max_by_key(|p| words(p).len())
}

/// The `i`th word after `vinfra` (`vm create NAME`: 2).
fn arg(step: &Step, i: usize) -> Result<&str, String> {
    step.args
        .get(i)
        .map(String::as_str)
        .ok_or_else(|| format!("{:?} has no word {}", step.text, i + 2))
}

/// The value after `flag` in `args`.
fn flag<'a>(step: &'a Step, flag: &str) -> Result<&'a str, String> {
    step.args
        .iter()
        .position(|a| a == flag)
        .and_then(|i| step.args.get(i + 1))
        .map(String::as_str)
        .ok_or_else(|| format!("{:?} has no {flag}", step.text))
}

/// The word after `marker` in the step's comment (`gets 10.70.0.1` → `10.70.0.1`), or
/// everything after it with `rest`.
fn promised<'a>(step: &'a Step, marker: &str, rest: bool) -> Result<&'a str, String> {
    let (_, after) = step.comment.split_once(marker).ok_or_else(|| {
        format!(
            "README.md line {}: the comment no longer says {marker:?}: {:?}",
            step.line, step.comment
        )
    })?;
    let after = after.trim();
    let v = if rest {
        after
    } else {
        after.split_whitespace().next().unwrap_or("")
    };
    let v = v.trim_end_matches([',', '.', ';', ')']);
    if v.is_empty() {
        return Err(format!(
            "README.md line {}: nothing after {marker:?}",
            step.line
        ));
    }
    Ok(v)
}

/// How long a command may take: the commands that wait for guests get several minutes
/// (TCG on a loaded 2-core machine), the others a minute.
fn bound(step: &Step) -> Duration {
    let waits = [
        "vm create",
        "vm migrate",
        "vm delete",
        "host maintenance enter",
        "ns instantiate",
        "ns terminate",
    ];
    let a = step.args.join(" ");
    if waits.iter().any(|w| a.starts_with(w)) && !a.contains("--dry-run") {
        Duration::from_secs(420)
    } else {
        Duration::from_secs(60)
    }
}

/// `vinfra up` running in a temp dir; on drop it is stopped and every QEMU and tap under
/// the dir is removed (as the harness's `Server` does).
struct Up {
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl Up {
    async fn start() -> Up {
        test_utils::require_tool("qemu-system-x86_64", "run scripts/setup.sh").unwrap();
        let image = tokio::task::spawn_blocking(|| {
            compute::ensure_default_image(&compute::default_cache_dir(), |_| {})
        })
        .await
        .unwrap()
        .expect("default guest image (scripts/setup.sh installs what it needs)");
        let dir = tempfile::Builder::new()
            .prefix("vi")
            .tempdir_in("/tmp")
            .unwrap();
        // `up` finds the built image in its data dir instead of building it again.
        let src = image.kernel.parent().unwrap();
        let dst = dir.path().join(".vinfra/images/default");
        std::fs::create_dir_all(&dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
        std::os::unix::fs::symlink(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples"),
            dir.path().join("examples"),
        )
        .unwrap();

        let [api, vswitch] = test_utils::free_tcp_ports::<2>();
        let out = std::fs::File::create(dir.path().join("up.out")).unwrap();
        let child = std::process::Command::new(VINFRA)
            .args(["up", "--accel", "tcg", "--listen"])
            .arg(format!("127.0.0.1:{api}"))
            .arg("--vswitch-listen")
            .arg(format!("127.0.0.1:{vswitch}"))
            .current_dir(dir.path())
            .env_remove("VINFRA_URL")
            .env_remove("VINFRA_TOKEN")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn vinfra up");
        let mut up = Up {
            dir,
            child: Some(child),
        };
        let started = Instant::now();
        loop {
            let said = std::fs::read_to_string(up.path("up.out")).unwrap_or_default();
            if said.contains("vinfra is up") {
                break;
            }
            if let Some(status) = up.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("vinfra up exited ({status}):\n{said}\n{}", up.logs());
            }
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "vinfra up did not say it is up within 180 s:\n{said}\n{}",
                up.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!(
            "readme: vinfra up ready in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        up
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The admin client of the `.vinfra/` that `up` wrote.
    fn admin(&self) -> client::Client {
        let read = |f: &str| {
            std::fs::read_to_string(self.path(f))
                .unwrap()
                .trim()
                .to_owned()
        };
        client::Client::new(&read(".vinfra/url"), &read(".vinfra/admin-token")).unwrap()
    }

    fn client(&self, token: &str) -> client::Client {
        let url = std::fs::read_to_string(self.path(".vinfra/url")).unwrap();
        client::Client::new(url.trim(), token).unwrap()
    }

    /// The ends of `up`'s, the server's and the agents' logs.
    fn logs(&self) -> String {
        let mut s = String::new();
        let mut logs = vec![self.path("up.out"), self.path(".vinfra/server.log")];
        if let Ok(hosts) = std::fs::read_dir(self.path(".vinfra/hosts")) {
            let mut h: Vec<PathBuf> = hosts
                .flatten()
                .map(|e| e.path().join("agent.log"))
                .collect();
            h.sort();
            logs.extend(h);
        }
        for l in logs {
            s.push_str(&format!(
                "--- {}\n{}\n",
                l.display(),
                test_utils::log_tail(&l, 25)
            ));
        }
        s
    }

    /// Runs the CLI in `up`'s directory, as a user in another terminal would.
    async fn vinfra(&self, args: &[String], bound: Duration) -> Result<Ran, String> {
        let started = Instant::now();
        let run = tokio::process::Command::new(VINFRA)
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("VINFRA_URL")
            .env_remove("VINFRA_TOKEN")
            .env_remove("VINFRA_CA_FILE")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(bound, run)
            .await
            .map_err(|_| format!("did not finish within {} s", bound.as_secs()))?
            .map_err(|e| format!("cannot run {VINFRA}: {e}"))?;
        Ok(Ran {
            ok: out.status.success(),
            status: out.status.to_string(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: started.elapsed(),
        })
    }

    /// Ctrl-C, as the README says: `up` stops the VMs and every process and exits 0.
    async fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        signal(&child, "-INT");
        let started = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                panic!(
                    "vinfra up did not stop within 120 s of Ctrl-C:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(status.success(), "vinfra up: {status}\n{}", self.logs());
        let left = compute::kill_qemus_under(self.dir.path());
        assert_eq!(left, 0, "QEMUs left after Ctrl-C:\n{}", self.logs());
        eprintln!(
            "readme: vinfra up stopped in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
}

fn signal(child: &std::process::Child, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(sig)
        .arg(child.id().to_string())
        .status();
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Its own shutdown first (it stops the agents, which stop their VMs)…
            signal(&child, "-TERM");
            let deadline = Instant::now() + Duration::from_secs(60);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
            // …else SIGKILL: its children exit when their stdin closes.
            let _ = child.kill();
            let _ = child.wait();
        }
        // …and whatever is still there, as the harness does.
        compute::kill_qemus_under(self.dir.path());
        agent::netdev::unplug_all_under(&self.path(".vinfra/hosts"));
    }
}

/// A finished CLI command.
struct Ran {
    ok: bool,
    status: String,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// What the walk-through learnt on the way (for placeholders and later checks).
#[derive(Default)]
struct Learnt {
    /// Every VM and its host, as the API said after the previous command.
    vms: BTreeMap<String, String>,
    /// The VM, source and destination of the latest `vm migrate`.
    migration: Option<(String, String, String)>,
    /// Id and secret of the token `token create` minted.
    token: Option<(String, String)>,
    /// Network names before `ns instantiate`.
    networks_before_ns: Option<BTreeSet<String>>,
}

async fn network_names(c: &client::Client) -> BTreeSet<String> {
    c.list_networks()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.name.to_string())
        .collect()
}

/// Whether a console shows the default guest ready: its READY line, or the workload's
/// TICK lines that follow it (and can push it out of the console tail).
fn guest_ready(console: &str) -> bool {
    console.contains("GUEST: READY") || console.lines().any(|l| l.starts_with("TICK "))
}

/// Polls `vm`'s console until `done` says so.
async fn console_shows(
    c: &client::Client,
    vm: &str,
    what: &str,
    done: impl Fn(&str) -> bool,
    within: Duration,
) -> Result<(), String> {
    let last = std::cell::RefCell::new(String::new());
    let seen = &last;
    let done = &done;
    let ok = test_utils::wait_for(within, move || async move {
        let now = c.console(vm).await.unwrap_or_default();
        let found = done(&now);
        *seen.borrow_mut() = now;
        found
    })
    .await;
    ok.map_err(|_| {
        let last = last.borrow();
        let tail: Vec<&str> = last.lines().rev().take(10).collect();
        format!(
            "vm {vm}'s console did not show {what} within {} s; its last lines:\n{}",
            within.as_secs(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })
}

async fn vm(c: &client::Client, name: &str) -> Result<model::Vm, String> {
    c.get_vm(name).await.map_err(|e| format!("vm {name}: {e}"))
}

fn running_on(v: &model::Vm, host: &str) -> Result<(), String> {
    if v.host.as_str() != host || v.observed != model::ObservedState::Running {
        return Err(format!(
            "vm {} is {} on {}, expected running on {host}",
            v.name,
            v.observed.as_str(),
            v.host
        ));
    }
    Ok(())
}

fn has(out: &str, text: &str) -> Result<(), String> {
    if out.contains(text) {
        Ok(())
    } else {
        Err(format!("output lacks {text:?}"))
    }
}

/// Fills in the step's placeholders.
fn substitute(step: &Step, learnt: &Learnt) -> Result<Vec<String>, String> {
    step.args
        .iter()
        .map(|w| match Placeholder::parse(w) {
            None => Ok(w.clone()),
            Some(Err(e)) => Err(e),
            Some(Ok(Placeholder::TokenId)) => learnt
                .token
                .as_ref()
                .map(|(id, _)| id.clone())
                .ok_or_else(|| "ID, but no `vinfra token create` ran before it".to_owned()),
        })
        .collect()
}

/// Checks what the README promises for `step` (see [`PROMISES`]), after it succeeded.
async fn keep(
    promise: &str,
    step: &Step,
    ran: &Ran,
    up: &Up,
    learnt: &mut Learnt,
) -> Result<(), String> {
    let admin = up.admin();
    let out = ran.stdout.as_str();
    let guest = Duration::from_secs(180);
    match promise {
        "host list" => {
            for h in ["host-a", "host-b", "host-c"] {
                let up = out
                    .lines()
                    .any(|l| words(l).get(..2) == Some(&[h, "up"][..]));
                if !up {
                    return Err(format!("{h} is not listed as up"));
                }
            }
            Ok(())
        }
        "image list" => {
            if out.lines().any(|l| words(l).first() == Some(&"default")) {
                Ok(())
            } else {
                Err("image default is not listed".into())
            }
        }
        // "boots a real QEMU VM (… until the guest is ready)"
        "vm create demo" => {
            let name = arg(step, 2)?;
            running_on(&vm(&admin, name).await?, flag(step, "--host")?)?;
            console_shows(&admin, name, "the guest ready", guest_ready, guest).await
        }
        "vm console demo" => {
            if guest_ready(out) {
                Ok(())
            } else {
                Err("the console does not show the guest ready".into())
            }
        }
        "network create blue" => has(out, flag(step, "--cidr")?),
        // "NIC on blue, gets 10.70.0.1"
        "vm create n1" => {
            let ip = promised(step, "gets ", false)?;
            has(out, &format!("{}:{ip}", flag(step, "--nic")?))
        }
        // "console: PING 10.70.0.1 ok"
        "vm create n2" => {
            let line = promised(step, "console: ", true)?;
            let what = format!("{line:?}");
            console_shows(&admin, arg(step, 2)?, &what, |c| c.contains(line), guest).await
        }
        // "MSR Cambridge CSV": the file is there, each line a request in that format.
        "vm trace stop demo" => {
            let file = up.dir.path().join(arg(step, 4)?);
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            has(out, &format!("written to {}", arg(step, 4)?))?;
            match text.lines().next() {
                None => Ok(()),
                Some(l)
                    if cache::trace::TraceFormat::detect(l)
                        == Some(cache::trace::TraceFormat::Msr) =>
                {
                    cache::trace::read_trace(&file, cache::trace::TraceFormat::Msr)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
                Some(l) => Err(format!("not an MSR Cambridge line: {l:?}")),
            }
        }
        "vm migrate demo" => {
            let (name, to) = (arg(step, 2)?, flag(step, "--to")?);
            running_on(&vm(&admin, name).await?, to)?;
            has(out, "completed")?;
            let from = learnt.vms.get(name).cloned().unwrap_or_default();
            learnt.migration = Some((name.to_owned(), from, to.to_owned()));
            Ok(())
        }
        // "downtime, blocks rebuilt, …" of the migration above.
        "migration list" => {
            let (name, from, to) = learnt.migration.as_ref().ok_or("no vm migrate before")?;
            let row = out.lines().any(|l| {
                let w = words(l);
                [name, from, to, "completed"].iter().all(|x| w.contains(x))
            });
            if row {
                Ok(())
            } else {
                Err(format!(
                    "no completed migration of {name} from {from} to {to}"
                ))
            }
        }
        // "which VM would go where", and nothing moves.
        "host maintenance enter host-c --dry-run" => {
            let host = arg(step, 3)?;
            let on: Vec<&String> = learnt
                .vms
                .iter()
                .filter(|(_, h)| *h == host)
                .map(|(n, _)| n)
                .collect();
            if on.is_empty() {
                return Err(format!("the walk-through put no VM on {host} to drain"));
            }
            for name in on {
                has(out, name)?;
                running_on(&vm(&admin, name).await?, host)?;
            }
            Ok(())
        }
        // "drain by live migration"
        "host maintenance enter host-c" => {
            let host = arg(step, 3)?;
            for v in admin.list_vms().await.map_err(|e| e.to_string())? {
                if v.host.as_str() == host {
                    return Err(format!("{host} still runs {}", v.name));
                }
                if learnt.vms.get(v.name.as_str()).is_some_and(|h| h == host) {
                    running_on(&v, v.host.as_str())?;
                }
            }
            Ok(())
        }
        // "release it"
        "host maintenance exit host-c" => {
            let host = arg(step, 3)?;
            let h = admin.get_host(host).await.map_err(|e| e.to_string())?;
            match h.maintenance {
                None => Ok(()),
                Some(m) => Err(format!("{host} is still in maintenance {m}")),
            }
        }
        "placement explain" => {
            if out.trim().is_empty() {
                Err("explains nothing".into())
            } else {
                Ok(())
            }
        }
        // "storage pair first, then paired primary/standby hosts"
        "vm create db" => {
            let db = vm(&admin, arg(step, 2)?).await?;
            running_on(&db, db.host.as_str())?;
            if db.redundancy.is_none() {
                return Err("vm db has no redundancy".into());
            }
            Ok(())
        }
        // "2 VNFs on 2 sites, their link up between the guests"
        "ns instantiate" => {
            has(out, "instantiated")?;
            has(out, "1/1 up")?;
            // Where the time went, for whoever reads the log.
            let name = flag(step, "--name")?;
            let rec = admin
                .get_ns_instance(name)
                .await
                .map_err(|e| e.to_string())?;
            for v in &rec.vnfs {
                eprintln!("readme:   vnf {} ready at {:?} ms", v.vnf, v.ready_ms);
            }
            for l in &rec.links {
                eprintln!("readme:   link {} history {}", l["link"], l["history"]);
            }
            Ok(())
        }
        // "nothing left on either site"
        "ns terminate edge" => {
            let ns = admin.list_ns_instances().await.map_err(|e| e.to_string())?;
            if ns.iter().any(|r| r.name.as_str() == "edge") {
                return Err("ns edge is still listed".into());
            }
            let vms: Vec<String> = admin
                .list_vms()
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|v| v.name.to_string())
                .filter(|n| n.starts_with("edge"))
                .collect();
            if !vms.is_empty() {
                return Err(format!("VMs of edge left: {vms:?}"));
            }
            let before = learnt.networks_before_ns.take().unwrap_or_default();
            let now = network_names(&admin).await;
            if now != before {
                return Err(format!("networks {now:?}, before the NS {before:?}"));
            }
            Ok(())
        }
        "vm list -o json" => {
            let vms: Vec<model::Vm> =
                serde_json::from_str(out).map_err(|e| format!("not a JSON list of VMs: {e}"))?;
            let names: BTreeSet<&str> = vms.iter().map(|v| v.name.as_str()).collect();
            let want: BTreeSet<&str> = learnt.vms.keys().map(String::as_str).collect();
            if names != want {
                return Err(format!("the JSON lists {names:?}, the API has {want:?}"));
            }
            Ok(())
        }
        // "secret printed once"
        "token create" => {
            let id = ran
                .stderr
                .lines()
                .find_map(|l| l.strip_prefix("token ")?.split_whitespace().next())
                .ok_or("stderr has no `token <id> (…)` line")?
                .to_owned();
            let secret = out.trim().to_owned();
            if secret.is_empty() || secret.contains(char::is_whitespace) {
                return Err(format!("stdout is not one secret: {out:?}"));
            }
            up.client(&secret)
                .list_hosts()
                .await
                .map_err(|e| format!("the new read-only token cannot read: {e}"))?;
            learnt.token = Some((id, secret));
            Ok(())
        }
        // "ids, prefixes, scope, expiry (never a secret)"
        "token list" => {
            let (id, secret) = learnt.token.as_ref().ok_or("no token was created")?;
            has(out, id)?;
            if out.contains(secret.as_str()) {
                return Err("the list shows a secret".into());
            }
            Ok(())
        }
        // "refused at once"
        "token revoke" => {
            let (_, secret) = learnt.token.as_ref().ok_or("no token was created")?;
            match up.client(secret).list_hosts().await {
                Err(e) if e.status() == Some(401) => Ok(()),
                Err(e) => Err(format!("the revoked token got {e}, not 401")),
                Ok(_) => Err("the revoked token still reads".into()),
            }
        }
        // "removes the VM, its disk and its processes"
        "vm delete demo" => match admin.get_vm(arg(step, 2)?).await {
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e.to_string()),
            Ok(v) => Err(format!(
                "vm {} is still there ({})",
                v.name,
                v.observed.as_str()
            )),
        },
        other => unreachable!("promise {other:?} has no check"),
    }
}

#[tokio::test]
async fn readme_walkthrough_runs_as_written() {
    let steps = walkthrough(README).unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let up = Up::start().await;
    let admin = up.admin();
    let mut learnt = Learnt::default();
    let mut times = Vec::new();
    for step in &steps {
        let args = substitute(step, &learnt)
            .unwrap_or_else(|e| panic!("README.md line {}: {}: {e}", step.line, step.text));
        if step.args.starts_with(&["ns".into(), "instantiate".into()]) {
            learnt.networks_before_ns = Some(network_names(&admin).await);
        }
        let fail = |why: &str, ran: Option<&Ran>| -> String {
            let (o, e) = ran.map_or(("", ""), |r| (r.stdout.as_str(), r.stderr.as_str()));
            format!(
                "README.md line {}: `{}` (run as {args:?}): {why}\n--- stdout\n{o}--- stderr\n{e}{}",
                step.line,
                step.text,
                up.logs()
            )
        };
        eprintln!("readme: line {}: {}", step.line, step.text);
        let ran = match up.vinfra(&args, bound(step)).await {
            Ok(r) => r,
            Err(e) => panic!("{}", fail(&e, None)),
        };
        if !ran.ok {
            panic!("{}", fail(&format!("exited {}", ran.status), Some(&ran)));
        }
        if let Some(p) = promise_of(step) {
            if let Err(e) = keep(p, step, &ran, &up, &mut learnt).await {
                panic!(
                    "{}",
                    fail(&format!("the README promises more: {e}"), Some(&ran))
                );
            }
        }
        learnt.vms = admin
            .list_vms()
            .await
            .unwrap()
            .into_iter()
            .map(|v| (v.name.to_string(), v.host.to_string()))
            .collect();
        eprintln!("readme:   ok in {:.1} s", ran.took.as_secs_f64());
        times.push((step.line, ran.took));
    }
    up.stop().await;
    let slow: Vec<String> = times
        .iter()
        .filter(|(_, t)| *t > Duration::from_secs(5))
        .map(|(l, t)| format!("line {l}: {:.1} s", t.as_secs_f64()))
        .collect();
    eprintln!(
        "readme: {} commands in {:.1} s (slowest: {})",
        steps.len(),
        started.elapsed().as_secs_f64(),
        slow.join(", ")
    );
}

#[test]
fn the_readme_walkthrough_parses_and_every_promise_has_its_command() {
    let steps = walkthrough(README).unwrap_or_else(|e| panic!("{e}"));
    // `vnfd create a; vinfra vnfd create b` is two commands on one line.
    let vnfd: Vec<&Step> = steps
        .iter()
        .filter(|s| s.args.starts_with(&["vnfd".into(), "create".into()]))
        .collect();
    assert_eq!(vnfd.len(), 2, "{vnfd:?}");
    assert_eq!(vnfd[0].line, vnfd[1].line);
    // The comment-only line under `ns instantiate` is its comment, not a command.
    let ns = steps
        .iter()
        .find(|s| s.args.starts_with(&["ns".into(), "instantiate".into()]))
        .expect("ns instantiate");
    assert!(ns.comment.contains("2 VNFs on 2 sites"), "{ns:?}");
    assert!(steps.iter().all(|s| !s.text.contains('#')), "{steps:?}");
    for p in PROMISES {
        let n = steps.iter().filter(|s| promise_of(s) == Some(p)).count();
        assert_eq!(n, 1, "promise {p:?} matches {n} README commands, not 1");
    }
}

#[test]
fn walkthrough_reader_splits_commands_and_comments_and_refuses_what_it_cannot_read() {
    let doc = |body: &str| format!("intro\n\n{ANCHOR} (text):\n\n```sh\n{body}```\nafter\n");
    let steps = walkthrough(&doc(
        "vinfra a b   # one #two\n           # more\nvinfra c; vinfra d x=y,z # e\n\nvinfra token revoke ID\n",
    ))
    .unwrap();
    let got: Vec<(usize, Vec<&str>, &str)> = steps
        .iter()
        .map(|s| {
            (
                s.line,
                s.args.iter().map(String::as_str).collect(),
                s.comment.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (6, vec!["a", "b"], "one #two more"),
            (8, vec!["c"], "e"),
            (8, vec!["d", "x=y,z"], "e"),
            (10, vec!["token", "revoke", "ID"], ""),
        ]
    );
    for (body, why) in [
        ("# first\nvinfra a\n", "a comment line before any command"),
        ("vinfra a 'b c'\n", "shell syntax"),
        ("vinfra a | head\n", "shell syntax"),
        ("vinfra a;; vinfra b\n", "empty command"),
        ("ls -l\n", "not a vinfra command"),
        ("vinfra vm delete NAME\n", "unknown placeholder \"NAME\""),
        ("", "holds no command"),
    ] {
        let e = walkthrough(&doc(body)).unwrap_err();
        assert!(e.contains(why), "{body:?}: {e}");
    }
    assert!(walkthrough("no anchor\n```sh\nvinfra a\n```\n")
        .unwrap_err()
        .contains("has no line"));
    assert!(walkthrough(&format!("{ANCHOR}\n```text\nvinfra a\n```\n"))
        .unwrap_err()
        .contains("expected ```sh"));
    assert!(walkthrough(&format!("{ANCHOR}\n```sh\nvinfra a\n"))
        .unwrap_err()
        .contains("never closes"));
}
