//! `vinfra vm migrate` and `vinfra migration …`: live migration with cache rebuild.

use std::time::{Duration, Instant};

use anyhow::bail;
use indicatif::{ProgressBar, ProgressStyle};
use model::api::MigrateVm;
use model::{Migration, MigrationState};

use crate::cmd::Ctx;
use crate::output;

/// Migration commands.
#[derive(Debug, clap::Subcommand)]
pub enum MigrationCmd {
    /// List migrations, newest first.
    List,
    /// Show one migration.
    Show {
        /// Migration id.
        id: String,
    },
}

const HEADER: &[&str] = &[
    "id",
    "vm",
    "from",
    "to",
    "strategy",
    "state",
    "downtime",
    "rebuilt",
    "hit ratio",
    "peer",
    "origin",
    "error",
];

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

fn row(m: &Migration) -> Vec<String> {
    let p = m.progress.clone().unwrap_or_default();
    vec![
        m.id.to_string(),
        m.vm_name.to_string(),
        m.from_host.to_string(),
        m.to_host.to_string(),
        m.strategy.clone(),
        m.state.as_str().to_owned(),
        m.qemu
            .as_ref()
            .map(|q| format!("{} ms", q.downtime_ms))
            .unwrap_or_default(),
        format!("{}/{}", p.done, p.planned),
        format!("{:.0}%", p.hit_ratio * 100.0),
        mib(p.peer_bytes),
        mib(p.origin_bytes),
        m.error.clone().unwrap_or_default(),
    ]
}

/// Prints migrations.
pub fn show(ctx: &Ctx, ms: &[Migration]) -> anyhow::Result<()> {
    output::emit(ctx.format, &ms, HEADER, || ms.iter().map(row).collect())
}

/// Runs a migration command.
pub async fn run(ctx: &Ctx, cmd: MigrationCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    match cmd {
        MigrationCmd::List => show(ctx, &c.list_migrations().await?),
        MigrationCmd::Show { id } => {
            let id = id.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            show(ctx, &[c.get_migration(id).await?])
        }
    }
}

/// `vinfra vm migrate VM --to HOST`: starts it, then follows it with a progress bar.
pub async fn migrate(
    ctx: &Ctx,
    vm: &str,
    to: String,
    strategy: Option<String>,
    precopy: bool,
    no_wait: bool,
) -> anyhow::Result<()> {
    let c = ctx.client()?;
    let m = c
        .migrate_vm(
            vm,
            &MigrateVm {
                to,
                strategy,
                precopy,
            },
        )
        .await?;
    if no_wait {
        return show(ctx, &[m]);
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} blocks [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    let deadline = Instant::now() + Duration::from_secs(600);
    let m = loop {
        let m = c.get_migration(m.id).await?;
        let p = m.progress.clone().unwrap_or_default();
        bar.set_length(p.planned);
        bar.set_position(p.done);
        bar.set_message(format!(
            "{} {}→{} {} (hit {:.0}%, peer {}, origin {})",
            m.vm_name,
            m.from_host,
            m.to_host,
            m.state.as_str(),
            p.hit_ratio * 100.0,
            mib(p.peer_bytes),
            mib(p.origin_bytes)
        ));
        if m.state.is_final() {
            break m;
        }
        if Instant::now() > deadline {
            bar.abandon();
            bail!(
                "migration {} is still {} after 10 minutes",
                m.id,
                m.state.as_str()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    bar.finish_and_clear();
    show(ctx, std::slice::from_ref(&m))?;
    if m.state == MigrationState::Failed {
        bail!(
            "migration of {} failed: {}",
            m.vm_name,
            m.error.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(())
}
