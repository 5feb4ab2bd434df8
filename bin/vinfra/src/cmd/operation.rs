//! `vinfra operation list|show|cancel`: every kind of long work (migrations, drains,
//! network-service jobs) in one table.

use model::api::{Operation, OperationKind, OperationState};

use crate::cmd::Ctx;
use crate::output;

/// Operation commands.
#[derive(Debug, clap::Subcommand)]
pub enum OperationCmd {
    /// List operations, newest first.
    List,
    /// Show one operation.
    Show {
        /// Operation id (the id of its migration, drain session or NS instance).
        id: String,
    },
    /// Cancel a running operation (a drain stops; other kinds say why they cannot).
    Cancel {
        /// Operation id.
        id: String,
    },
}

const HEADER: &[&str] = &[
    "id", "kind", "target", "state", "step", "progress", "started", "error",
];

fn kind(k: OperationKind) -> &'static str {
    match k {
        OperationKind::Migration => "migration",
        OperationKind::Drain => "drain",
        OperationKind::NsInstantiate => "ns-instantiate",
        OperationKind::NsScale => "ns-scale",
        OperationKind::NsTerminate => "ns-terminate",
    }
}

fn state(s: OperationState) -> &'static str {
    match s {
        OperationState::Running => "running",
        OperationState::Succeeded => "succeeded",
        OperationState::Failed => "failed",
        OperationState::Cancelled => "cancelled",
    }
}

fn row(o: &Operation) -> Vec<String> {
    let ago = age(o.started_at);
    vec![
        o.id.clone(),
        kind(o.kind).to_owned(),
        o.target.clone(),
        state(o.state).to_owned(),
        o.step.clone(),
        if o.total > 0 {
            format!("{}/{}", o.done, o.total)
        } else {
            String::new()
        },
        ago,
        o.error.clone().unwrap_or_default(),
    ]
}

/// `12s ago`, `3m ago`, `2h ago` from a unix-ms start.
fn age(started_ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let s = now.saturating_sub(started_ms) / 1000;
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

fn show(ctx: &Ctx, ops: &[Operation]) -> anyhow::Result<()> {
    output::emit(ctx.format, &ops, HEADER, || ops.iter().map(row).collect())
}

/// Runs an operation command.
pub async fn run(ctx: &Ctx, cmd: OperationCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    match cmd {
        OperationCmd::List => show(ctx, &c.list_operations().await?),
        OperationCmd::Show { id } => show(ctx, &[c.get_operation(&id).await?]),
        OperationCmd::Cancel { id } => show(ctx, &[c.cancel_operation(&id).await?]),
    }
}
