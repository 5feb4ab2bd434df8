//! `vinfra vm …`

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use model::api::{CreateVm, NicRequest};
use model::{DesiredState, ObservedState, Vm};

use crate::cmd::Ctx;
use crate::{output, progress};

/// VM commands.
#[derive(Debug, clap::Subcommand)]
pub enum VmCmd {
    /// Create a VM and boot it (waits until it runs, with a progress bar).
    Create {
        /// VM name.
        name: String,
        /// Image name or id.
        #[arg(long, default_value = "default")]
        image: String,
        /// Virtual CPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u64,
        /// Host to run on (default: the scheduler picks one that fits).
        #[arg(long)]
        host: Option<String>,
        /// Return at once instead of waiting for the VM to boot.
        #[arg(long)]
        no_wait: bool,
        /// Place on a redundant storage pair with a paired standby host, which takes
        /// over if this VM's host goes down (see `vinfra storage load`).
        #[arg(long, conflicts_with = "host")]
        redundant: bool,
        /// Disk to reserve on each storage of the pair, GiB (with --redundant).
        #[arg(long, requires = "redundant")]
        disk_gib: Option<u64>,
        /// A network interface on NETWORK, with a fixed address or the next free one;
        /// repeat for more (guest order).
        #[arg(long = "nic", value_name = "NETWORK[=IP]", value_parser = parse_nic)]
        nics: Vec<NicRequest>,
        /// Extra kernel arguments for the guest (e.g. `vinfra.ping=10.70.0.1`).
        #[arg(long)]
        kernel_args: Option<String>,
        /// Map resource table NAME of the VM's host (read-only, with a window of the
        /// VM's own to write entries through; docs/SHM.md); repeat for more. The VM
        /// is placed on the host that keeps them and stays there (no live migration).
        #[arg(
            long = "resource-table",
            value_name = "NAME",
            conflicts_with = "redundant"
        )]
        resource_tables: Vec<String>,
    },
    /// List VMs.
    List,
    /// Show one VM.
    Show {
        /// VM name or id.
        vm: String,
    },
    /// Start a stopped VM.
    Start {
        /// VM name or id.
        vm: String,
    },
    /// Stop a running VM (its disk is kept).
    Stop {
        /// VM name or id.
        vm: String,
    },
    /// Delete a VM, its disk and its processes.
    Delete {
        /// VM name or id.
        vm: String,
    },
    /// Live-migrate a running VM to another host, rebuilding its disk cache there
    /// from this host's cache (fetch order: --strategy).
    Migrate {
        /// VM name or id.
        vm: String,
        /// Destination host.
        #[arg(long)]
        to: String,
        /// Fetch order: none, redirect, linear, full-copy, heat, pattern, heat+pattern.
        #[arg(long)]
        strategy: Option<String>,
        /// Cache pre-copy: start fetching from this host's cache while the memory still
        /// moves, not only at switch-over (what the guest rewrites meanwhile is dropped
        /// by the dirty list handed over at switch-over).
        #[arg(long)]
        precopy: bool,
        /// Return at once instead of following the migration.
        #[arg(long)]
        no_wait: bool,
    },
    /// Record the block requests the VM's disk receives on its host (MSR Cambridge
    /// CSV, which `vinfra bench migrate-cache --trace` replays).
    #[command(subcommand)]
    Trace(TraceCmd),
    /// Print the VM's serial console output.
    Console {
        /// VM name or id.
        vm: String,
        /// Keep printing new output until Ctrl-C.
        #[arg(short, long)]
        follow: bool,
    },
}

/// `vinfra vm trace …`
#[derive(Debug, clap::Subcommand)]
pub enum TraceCmd {
    /// Start recording (a new recording replaces a finished one).
    Start {
        /// VM name or id.
        vm: String,
    },
    /// Stop recording and download the trace.
    Stop {
        /// VM name or id.
        vm: String,
        /// Where to write the trace (`-o` is the global output format).
        file: std::path::PathBuf,
    },
}

/// How long `trace stop` waits for the host's agent to upload the file.
const TRACE_UPLOAD_WAIT: Duration = Duration::from_secs(120);

async fn trace(c: &client::Client, cmd: TraceCmd) -> anyhow::Result<()> {
    match cmd {
        TraceCmd::Start { vm } => {
            let v = c.set_trace(&vm, true).await?;
            println!(
                "recording the block requests of vm {} on {}",
                v.name, v.host
            );
            Ok(())
        }
        TraceCmd::Stop { vm, file: output } => {
            let v = c.set_trace(&vm, false).await?;
            let bar = progress::spinner(format!("waiting for {} to upload the trace", v.host));
            let deadline = Instant::now() + TRACE_UPLOAD_WAIT;
            let (digest, size) = loop {
                let now = c.get_vm(&v.id.to_string()).await?;
                if let Some((d, n)) = now.trace.and_then(|t| t.blob.zip(t.size)) {
                    break (d, n);
                }
                if Instant::now() > deadline {
                    bar.finish_and_clear();
                    bail!(
                        "the agent of {} did not upload the trace within {} s (is it up?); `vinfra vm trace stop {vm} FILE` again waits again",
                        v.host,
                        TRACE_UPLOAD_WAIT.as_secs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            };
            bar.finish_and_clear();
            c.download_blob(&digest, &output)
                .await
                .with_context(|| format!("cannot download the trace to {}", output.display()))?;
            let requests = std::fs::read_to_string(&output)
                .map(|t| t.lines().count())
                .unwrap_or(0);
            println!(
                "{requests} requests ({size} bytes, MSR Cambridge CSV) written to {}",
                output.display()
            );
            Ok(())
        }
    }
}

fn parse_nic(s: &str) -> Result<NicRequest, String> {
    let (network, ip) = match s.split_once('=') {
        Some((n, ip)) => (
            n,
            Some(
                ip.parse()
                    .map_err(|_| format!("'{ip}' is not an IPv4 address"))?,
            ),
        ),
        None => (s, None),
    };
    Ok(NicRequest {
        network: network.to_owned(),
        name: None,
        ip,
    })
}

const HEADER: &[&str] = &[
    "name", "id", "host", "desired", "observed", "vcpus", "memory", "nics", "tables", "error",
];

fn row(v: &Vm) -> Vec<String> {
    vec![
        v.name.to_string(),
        v.id.to_string(),
        v.host.to_string(),
        v.desired.as_str().to_owned(),
        v.observed.as_str().to_owned(),
        v.vcpus.to_string(),
        format!("{} MiB", v.memory_mib),
        v.nics
            .iter()
            .map(|n| format!("{}:{}", n.network_name, n.ip))
            .collect::<Vec<_>>()
            .join(","),
        v.resource_tables
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(","),
        v.error.clone().unwrap_or_default(),
    ]
}

fn show(ctx: &Ctx, vms: &[Vm]) -> anyhow::Result<()> {
    output::emit(ctx.format, &vms, HEADER, || vms.iter().map(row).collect())
}

/// Runs a VM command.
pub async fn run(ctx: &Ctx, cmd: VmCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    match cmd {
        VmCmd::Create {
            name,
            image,
            vcpus,
            memory,
            host,
            no_wait,
            redundant,
            disk_gib,
            nics,
            kernel_args,
            resource_tables,
        } => {
            let vm = c
                .create_vm(&CreateVm {
                    name,
                    image,
                    vcpus,
                    memory_mib: memory,
                    host,
                    tenant: None,
                    redundant,
                    disk_gib,
                    nics,
                    kernel_args,
                    resource_tables,
                })
                .await?;
            let vm = if no_wait {
                vm
            } else {
                wait_running(&c, &vm).await?
            };
            show(ctx, &[vm])
        }
        VmCmd::List => show(ctx, &c.list_vms().await?),
        VmCmd::Migrate {
            vm,
            to,
            strategy,
            precopy,
            no_wait,
        } => crate::cmd::migration::migrate(ctx, &vm, to, strategy, precopy, no_wait).await,
        VmCmd::Show { vm } => show(ctx, &[c.get_vm(&vm).await?]),
        VmCmd::Start { vm } => {
            let vm = c.start_vm(&vm).await?;
            let vm = wait_running(&c, &vm).await?;
            show(ctx, &[vm])
        }
        VmCmd::Stop { vm } => {
            let vm = c.stop_vm(&vm).await?;
            let vm = wait_for(&c, &vm, "stopping", |v| {
                v.observed == ObservedState::Stopped
            })
            .await?;
            show(ctx, &[vm])
        }
        VmCmd::Delete { vm } => {
            let target = c.get_vm(&vm).await?;
            c.delete_vm(&vm).await?;
            let bar = progress::spinner(format!("deleting {}", target.name));
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match c.get_vm(&target.id.to_string()).await {
                    Err(e) if e.status() == Some(404) => break,
                    Err(e) => return Err(e.into()),
                    Ok(_) if Instant::now() > deadline => {
                        bail!(
                            "vm {} is still being deleted after 60 s; is its host up?",
                            target.name
                        )
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
            bar.finish_and_clear();
            println!("deleted vm {} ({})", target.name, target.id);
            Ok(())
        }
        VmCmd::Trace(cmd) => trace(&c, cmd).await,
        VmCmd::Console { vm, follow } => {
            let mut printed = String::new();
            loop {
                let text = c.console(&vm).await?;
                // The server keeps a moving tail: print only what is new since last time.
                let new = if printed.is_empty() {
                    &text[..]
                } else {
                    new_suffix(&printed, &text)
                };
                print!("{new}");
                printed = text.clone();
                if !follow {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// The part of `now` after the longest suffix of `before` that `now` starts with.
pub(crate) fn new_suffix<'a>(before: &str, now: &'a str) -> &'a str {
    for start in 0..before.len() {
        if !before.is_char_boundary(start) {
            continue;
        }
        if let Some(rest) = now.strip_prefix(&before[start..]) {
            return rest;
        }
    }
    now
}

async fn wait_running(c: &client::Client, vm: &Vm) -> anyhow::Result<Vm> {
    let vm = wait_for(c, vm, "booting", |v| v.observed == ObservedState::Running).await?;
    // The default guest says when it is ready; other images may print nothing.
    let bar = progress::spinner(format!("{}: waiting for the guest", vm.name));
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        let console = c.console(&vm.id.to_string()).await.unwrap_or_default();
        if console.contains("READY") || console.contains("login:") {
            bar.finish_with_message(format!("{}: guest ready", vm.name));
            return Ok(c.get_vm(&vm.id.to_string()).await?);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bar.finish_with_message(format!(
        "{}: running (no ready line on the console yet)",
        vm.name
    ));
    Ok(vm)
}

async fn wait_for(
    c: &client::Client,
    vm: &Vm,
    what: &str,
    done: impl Fn(&Vm) -> bool,
) -> anyhow::Result<Vm> {
    let bar = progress::spinner(format!("{}: {what}", vm.name));
    let deadline = Instant::now() + Duration::from_secs(120);
    let id = vm.id.to_string();
    loop {
        let v = c
            .get_vm(&id)
            .await
            .with_context(|| format!("cannot read vm {}", vm.name))?;
        bar.set_message(format!(
            "{}: {what} (on {}, {})",
            v.name,
            v.host,
            v.observed.as_str()
        ));
        if done(&v) {
            bar.finish_and_clear();
            return Ok(v);
        }
        if v.observed == ObservedState::Failed && v.desired != DesiredState::Stopped {
            bar.finish_and_clear();
            bail!(
                "vm {} failed on {}: {}",
                v.name,
                v.host,
                v.error.as_deref().unwrap_or("no reason given")
            );
        }
        if Instant::now() > deadline {
            bail!("vm {} is still {} after 120 s", v.name, v.observed.as_str());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::new_suffix;

    #[test]
    fn console_follow_prints_only_new_text() {
        assert_eq!(new_suffix("a\nb\n", "b\nc\n"), "c\n");
        assert_eq!(new_suffix("a\nb\n", "a\nb\nc\n"), "c\n");
        assert_eq!(new_suffix("x", "yz"), "yz");
    }
}
