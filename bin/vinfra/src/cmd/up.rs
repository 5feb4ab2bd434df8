//! `vinfra up`: the all-in-one job on one machine.
//!
//! Starts the control plane (redb store under `.vinfra/`) and three node agents as
//! child processes of this one — real processes, so that each can crash and restart
//! on its own like on separate machines — builds or finds the default guest image,
//! registers it, and waits for Ctrl-C. On Ctrl-C each agent stops its VMs and exits,
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

use crate::locate::{self, ADMIN_TOKEN_FILE, URL_FILE};
use crate::progress;

/// Options of `vinfra up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where state, host data dirs and the guest image live.
    #[arg(long, default_value = locate::DATA_DIR)]
    pub data_dir: PathBuf,
    /// Address of the REST API.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Address of the vSwitch controller (traffic statistics).
    #[arg(long, default_value = "127.0.0.1:7071")]
    pub vswitch_listen: String,
    /// Names of the local hosts to start, one agent each.
    #[arg(long, value_delimiter = ',', default_value = "host-a,host-b,host-c")]
    pub hosts: Vec<String>,
    /// Accelerator for VMs: auto (KVM only where it really works), kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: String,
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
    std::fs::create_dir_all(&dd).with_context(|| format!("cannot create {}", dd.display()))?;
    let exe = std::env::current_exe().context("cannot find the vinfra executable")?;

    // The guest image first: a failure here should not leave processes behind.
    let image = crate::cmd::image::ensure_default(&dd.join("images")).await?;

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

        crate::cmd::image::register_default(&client, &image).await?;
        let agent_token = crate::cmd::agent::agent_token(&client, &dd).await?;

        for host in &args.hosts {
            let hdir = dd.join("hosts").join(host);
            std::fs::create_dir_all(&hdir)?;
            let p = spawn(
                &exe,
                host,
                &[
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
                ],
                &hdir.join("agent.log"),
            )?;
            procs.push(p);
        }
        wait_for_hosts(&client, &args.hosts, &mut procs).await?;

        println!("vinfra is up in {:.1} s", started.elapsed().as_secs_f64());
        println!("  API        {url}/v1   (OpenAPI: {url}/v1/openapi.json)");
        println!("  admin token {}", token_path.display());
        println!("  hosts      {}", args.hosts.join(", "));
        println!(
            "  logs       {}/server.log, {}/hosts/*/agent.log",
            dd.display(),
            dd.display()
        );
        println!("try:  vinfra host list");
        println!(
            "      vinfra vm create demo --image default --host {}",
            args.hosts.first().map(String::as_str).unwrap_or("host-a")
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
    let deadline = Instant::now() + Duration::from_secs(30);
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
                "only {up} of {} hosts registered within 30 s; see .vinfra/hosts/*/agent.log",
                names.len()
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
