//! `vinfra host maintenance …`.

use std::time::{Duration, Instant};

use anyhow::bail;
use model::api::EnterMaintenance;
use model::{Maintenance, MaintenanceState};

use crate::cmd::Ctx;
use crate::{output, progress};

/// Maintenance commands.
#[derive(Debug, clap::Subcommand)]
pub enum MaintenanceCmd {
    /// Cordon HOST and live-migrate its VMs away; waits until it is empty.
    Enter {
        /// The host.
        host: String,
        /// Move every VM to this host (default: the scheduler picks).
        #[arg(long)]
        to: Option<String>,
        /// Print the plan (which VM goes where) and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Fetch order for the cache rebuilds.
        #[arg(long)]
        strategy: Option<String>,
        /// Return at once instead of following the drain.
        #[arg(long)]
        no_wait: bool,
    },
    /// Release HOST from maintenance.
    Exit {
        /// The host.
        host: String,
    },
    /// Stop HOST's drain; says what stays where.
    Abort {
        /// The host.
        host: String,
    },
    /// Show HOST's current (or last) maintenance session.
    Status {
        /// The host.
        host: String,
    },
}

fn show(ctx: &Ctx, m: &Maintenance) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = m
        .items
        .iter()
        .map(|i| {
            vec![
                i.vm_name.to_string(),
                m.host.to_string(),
                i.to.to_string(),
                if i.live { "live" } else { "cold" }.to_owned(),
                format!("{:?}", i.state).to_lowercase(),
                i.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    if ctx.format == output::Format::Table {
        println!(
            "host {} maintenance {}: {}{}",
            m.host,
            m.id,
            m.state.as_str(),
            m.error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
    }
    output::emit(
        ctx.format,
        m,
        &["vm", "from", "to", "move", "state", "error"],
        || rows,
    )
}

async fn session_of(c: &client::Client, host: &str) -> anyhow::Result<Maintenance> {
    let all = c.list_maintenance().await?;
    match all.into_iter().find(|m| m.host.as_str() == host) {
        Some(m) => Ok(m),
        None => bail!("host {host} has no maintenance session"),
    }
}

/// Runs a maintenance command.
pub async fn run(ctx: &Ctx, cmd: MaintenanceCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    match cmd {
        MaintenanceCmd::Enter {
            host,
            to,
            dry_run,
            strategy,
            no_wait,
        } => {
            let m = c
                .enter_maintenance(
                    &host,
                    &EnterMaintenance {
                        to,
                        dry_run,
                        strategy,
                    },
                )
                .await?;
            if dry_run || no_wait {
                return show(ctx, &m);
            }
            let bar = progress::spinner(format!("draining {host}"));
            let deadline = Instant::now() + Duration::from_secs(1800);
            let m = loop {
                let m = c.get_maintenance(m.id).await?;
                let moved = m
                    .items
                    .iter()
                    .filter(|i| i.state == model::DrainItemState::Moved)
                    .count();
                let now = m
                    .items
                    .iter()
                    .find(|i| i.state == model::DrainItemState::Migrating)
                    .map(|i| format!(", moving {} → {}", i.vm_name, i.to))
                    .unwrap_or_default();
                bar.set_message(format!(
                    "{host}: {} — {moved}/{} VMs moved{now}",
                    m.state.as_str(),
                    m.items.len()
                ));
                if !matches!(
                    m.state,
                    MaintenanceState::Entering | MaintenanceState::Draining
                ) {
                    break m;
                }
                if Instant::now() > deadline {
                    bail!("host {host} is still draining after 30 minutes; `vinfra host maintenance abort {host}` stops it");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            };
            bar.finish_and_clear();
            show(ctx, &m)?;
            if m.state != MaintenanceState::InMaintenance {
                bail!(
                    "maintenance of {host} ended {}: {}",
                    m.state.as_str(),
                    m.error.unwrap_or_default()
                );
            }
            Ok(())
        }
        MaintenanceCmd::Exit { host } => show(ctx, &c.exit_maintenance(&host).await?),
        MaintenanceCmd::Abort { host } => {
            let m = session_of(&c, &host).await?;
            show(ctx, &c.abort_maintenance(m.id).await?)
        }
        MaintenanceCmd::Status { host } => show(ctx, &session_of(&c, &host).await?),
    }
}
