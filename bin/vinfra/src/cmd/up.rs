//! `vinfra up`: the all-in-one job on one machine.
//!
//! Starts the control plane (redb store under `.vinfra/`) and three node agents as
//! child processes of this one — real processes, so that each can crash and restart
//! on its own like on separate machines — builds or finds the default guest image,
//! registers it, and waits for Ctrl-C. With `--driver sim --hosts 50` the agents run
//! simulated VMs (no QEMU, no root) and the default image is a placeholder the sim
//! boots: the control plane with 50 hosts on a laptop. On Ctrl-C each agent stops its VMs and exits,
//! then the server; the store keeps every VM's desired state, so the next `vinfra up`
//! starts the same VMs again ("resumes").
//!
//! Children are started with a piped stdin and the hidden `--exit-with-stdin` flag:
//! if this process dies without cleaning up (even `kill -9`), their stdin closes and
//! they exit, so nothing is left behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

use crate::cmd::agent::DriverKind;
use crate::locate::{self, ADMIN_TOKEN_FILE, URL_FILE};
use crate::progress;

/// Most hosts `vinfra up` starts.
const MAX_HOSTS: usize = 200;

/// Disk size of the sim driver's placeholder image, MiB (the default image's size).
const SIM_IMAGE_MIB: u64 = 64;

/// Tick period of the simulated guests `vinfra up --driver sim` boots: one console
/// line a second per VM keeps 200 VMs cheap.
const SIM_TICK_MS: u32 = 1000;

/// The host names of `--hosts`: the names given, or `N` names `host-01` … `host-N`.
fn host_names(hosts: &[String]) -> anyhow::Result<Vec<String>> {
    let names = match hosts {
        [one] if one.chars().all(|c| c.is_ascii_digit()) => {
            let n: usize = one.parse().context("--hosts")?;
            if n == 0 || n > MAX_HOSTS {
                bail!("--hosts {n}: between 1 and {MAX_HOSTS}");
            }
            let width = n.to_string().len().max(2);
            (1..=n).map(|i| format!("host-{i:0width$}")).collect()
        }
        names => names.to_vec(),
    };
    for n in &names {
        model::validate_name("hosts", n)?;
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = names.iter().find(|n| !seen.insert(n.as_str())) {
        bail!("--hosts names {dup} twice");
    }
    Ok(names)
}

/// `a, b, c`, or `first … last (N)` for a long list.
fn show_hosts(names: &[String]) -> String {
    match names {
        [first, .., last] if names.len() > 6 => format!("{first} … {last} ({})", names.len()),
        _ => names.join(", "),
    }
}

/// Options of `vinfra up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where state, host data dirs and the guest image live.
    #[arg(long, default_value = locate::DATA_DIR)]
    pub data_dir: PathBuf,
    /// Address of the REST API.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Address of the server's vSwitch controller (traffic statistics).
    #[arg(long, default_value = "127.0.0.1:7071")]
    pub vswitch_listen: String,
    /// The local hosts to start, one agent each: their names, comma-separated, or how
    /// many (N: host-01 … host-N).
    #[arg(long, value_delimiter = ',', default_value = "host-a,host-b,host-c")]
    pub hosts: Vec<String>,
    /// Accelerator for VMs: auto (KVM only where it really works), kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: String,
    /// The agents' hypervisor: qemu, or sim (simulated VMs, no QEMU or root needed).
    #[arg(long, value_enum, default_value = "qemu")]
    pub driver: DriverKind,
    /// Start everything, print where it is, and exit after this many seconds
    /// (for scripted smoke tests); by default run until Ctrl-C.
    #[arg(long, hide = true)]
    pub exit_after: Option<u64>,
}

struct Proc {
    name: String,
    child: Child,
}

/// Runs `vinfra up` until Ctrl-C.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let dd = absolute(&args.data_dir)?;
    let hosts = host_names(&args.hosts)?;
    std::fs::create_dir_all(&dd).with_context(|| format!("cannot create {}", dd.display()))?;
    let exe = std::env::current_exe().context("cannot find the vinfra executable")?;

    // The guest image first: a failure here should not leave processes behind.
    let image = match args.driver {
        DriverKind::Qemu => crate::cmd::image::ensure_default(&dd.join("images")).await?,
        DriverKind::Sim => {
            let dir = dd.join("images").join("sim");
            let mut img =
                tokio::task::spawn_blocking(move || compute::sim::write_image(&dir, SIM_IMAGE_MIB))
                    .await
                    .context("the sim image writer panicked")?
                    .context("cannot write the sim driver's image")?;
            img.cmdline = format!("{} vinfra.tick_ms={SIM_TICK_MS}", img.cmdline);
            img
        }
    };

    let mut procs: Vec<Proc> = Vec::new();
    let result = async {
        let url = format!("http://{}", args.listen);
        let server = spawn(
            &exe,
            "server",
            &[
                "server".into(),
                "--store".into(),
                format!("redb:{}", dd.join("state.redb").display()),
                "--listen".into(),
                args.listen.clone(),
                "--data-dir".into(),
                dd.display().to_string(),
                "--vswitch-listen".into(),
                args.vswitch_listen.clone(),
            ],
            &dd.join("server.log"),
        )?;
        procs.push(server);
        let token_path = dd.join(ADMIN_TOKEN_FILE);
        let client = wait_for_server(&url, &token_path, &mut procs).await?;
        locate::write_private(&dd.join(URL_FILE), &url, 0o644)?;

        crate::cmd::image::register_default(&client, &image, args.driver).await?;

        for host in &hosts {
            let hdir = dd.join("hosts").join(host);
            std::fs::create_dir_all(&hdir)?;
            let agent_token = crate::cmd::agent::agent_token(&client, host, &hdir).await?;
            let mut argv: Vec<String> = vec![
                "agent".into(),
                "--server".into(),
                url.clone(),
                "--host-name".into(),
                host.clone(),
                "--data-dir".into(),
                hdir.display().to_string(),
                "--token-file".into(),
                agent_token.display().to_string(),
                "--accel".into(),
                args.accel.clone(),
                // One shared origin dir stands in for the SAN all hosts see.
                "--origin-dir".into(),
                dd.join("origin").display().to_string(),
                "--driver".into(),
                args.driver.as_str().into(),
            ];
            if args.driver == DriverKind::Qemu {
                // Every VM tap is classified and counted in the kernel (docs/NET.md).
                argv.extend(["--vswitch".into(), args.vswitch_listen.clone()]);
            }
            if args.driver == DriverKind::Sim {
                // A second from start to READY: a small guest's boot, visible in `vm create`.
                argv.extend(["--sim-boot-ms".into(), "1000".into()]);
            }
            let p = spawn(&exe, host, &argv, &hdir.join("agent.log"))?;
            procs.push(p);
        }
        wait_for_hosts(&client, &hosts, &mut procs).await?;

        println!("vinfra is up in {:.1} s", started.elapsed().as_secs_f64());
        println!("  API        {url}/v1   (OpenAPI: {url}/v1/openapi.json)");
        println!("  dashboard  {url}/ui   (log in with the admin token)");
        println!("  admin token {}", token_path.display());
        println!(
            "  hosts      {}{}",
            show_hosts(&hosts),
            if args.driver == DriverKind::Sim {
                " — simulated (sim driver)"
            } else {
                ""
            }
        );
        println!(
            "  logs       {}/server.log, {}/hosts/*/agent.log",
            dd.display(),
            dd.display()
        );
        println!("try:  vinfra host list");
        println!(
            "      vinfra vm create demo --image default --host {}",
            hosts.first().map(String::as_str).unwrap_or("host-a")
        );
        println!("      vinfra vm console demo");
        println!("Ctrl-C stops everything; `vinfra up` again resumes the same state.");

        wait_for_stop(args.exit_after, &mut procs).await
    }
    .await;
    shutdown(&mut procs).await;
    // Agents stop their VMs on SIGTERM; a VM an agent lost track of (or an agent that
    // died) would outlive us: nothing under our data dir keeps running after `up`.
    let stray = compute::kill_qemus_under(&dd);
    if stray > 0 {
        tracing::warn!(count = stray, "ended QEMU processes the agents left behind");
    }
    // Their NICs' taps are persistent: remove those (and bridges left empty) too.
    agent::netdev::unplug_all_under(&dd.join("hosts"));
    result
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(std::env::current_dir()?.join(p))
}

fn spawn(exe: &Path, name: &str, args: &[String], log: &Path) -> anyhow::Result<Proc> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open log {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .arg("--exit-with-stdin")
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Proc {
        name: name.to_owned(),
        child,
    })
}

fn check_alive(procs: &mut [Proc]) -> anyhow::Result<()> {
    for p in procs.iter_mut() {
        if let Some(status) = p.child.try_wait()? {
            bail!(
                "{} exited early ({status}); see its log under .vinfra/",
                p.name
            );
        }
    }
    Ok(())
}

async fn wait_for_server(
    url: &str,
    token_path: &Path,
    procs: &mut [Proc],
) -> anyhow::Result<client::Client> {
    let bar = progress::spinner("starting the control plane");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        check_alive(procs)?;
        if let Ok(token) = locate::read_trimmed(token_path) {
            let c = client::Client::new(url, &token)?;
            if c.list_hosts().await.is_ok() {
                bar.finish_with_message("control plane up");
                return Ok(c);
            }
        }
        if Instant::now() > deadline {
            bail!("the server did not answer on {url} within 30 s; see .vinfra/server.log");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_hosts(
    c: &client::Client,
    names: &[String],
    procs: &mut [Proc],
) -> anyhow::Result<()> {
    let bar = progress::spinner("waiting for the hosts to register");
    // Many agents start on few cores: allow half a second each beyond the first 30 s.
    let budget = Duration::from_secs(30)
        + Duration::from_millis(500) * u32::try_from(names.len()).unwrap_or(u32::MAX);
    let deadline = Instant::now() + budget;
    loop {
        check_alive(procs)?;
        let hosts = c.list_hosts().await?;
        let up = names
            .iter()
            .filter(|n| {
                hosts
                    .iter()
                    .any(|h| h.name.as_str() == n.as_str() && h.state == model::HostState::Up)
            })
            .count();
        bar.set_message(format!("hosts up: {up}/{}", names.len()));
        if up == names.len() {
            bar.finish_with_message(format!("{up} hosts up"));
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "only {up} of {} hosts registered within {} s; see .vinfra/hosts/*/agent.log",
                names.len(),
                budget.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for_stop(exit_after: Option<u64>, procs: &mut [Proc]) -> anyhow::Result<()> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let timer = async {
        match exit_after {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timer);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { println!("\nstopping…"); return Ok(()); }
            _ = sigterm.recv() => return Ok(()),
            _ = &mut timer => return Ok(()),
            _ = tick.tick() => check_alive(procs)?,
        }
    }
}

/// Agents first (they stop their VMs), then the server.
async fn shutdown(procs: &mut Vec<Proc>) {
    while let Some(mut p) = procs.pop() {
        if let Some(pid) = p.child.id() {
            // SIGTERM: the child's own clean-shutdown path.
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        match tokio::time::timeout(Duration::from_secs(20), p.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(name = %p.name, "did not stop within 20 s; killing");
                let _ = p.child.kill().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_names_or_a_count() {
        let v = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            host_names(&v(&["host-a", "host-b"])).unwrap(),
            v(&["host-a", "host-b"])
        );
        let fifty = host_names(&v(&["50"])).unwrap();
        assert_eq!(fifty.len(), 50);
        assert_eq!(
            (fifty[0].as_str(), fifty[49].as_str()),
            ("host-01", "host-50")
        );
        assert_eq!(
            host_names(&v(&["3"])).unwrap(),
            v(&["host-01", "host-02", "host-03"])
        );
        assert_eq!(host_names(&v(&["120"])).unwrap()[0], "host-001");
        assert!(host_names(&v(&["0"])).is_err());
        assert!(host_names(&v(&["100000"])).is_err());
        assert!(host_names(&v(&["a", "a"])).is_err());
        assert!(host_names(&v(&["Bad_Name"])).is_err());
        assert_eq!(show_hosts(&fifty), "host-01 … host-50 (50)");
        assert_eq!(show_hosts(&v(&["a", "b"])), "a, b");
    }
}
