//! `vinfra host …`

use crate::cmd::Ctx;
use crate::output;

/// Host commands.
#[derive(Debug, clap::Subcommand)]
pub enum HostCmd {
    /// List hosts with their state and capacity.
    List,
    /// Show one host.
    Show {
        /// Host name.
        name: String,
    },
}

/// Runs a host command.
pub async fn run(ctx: &Ctx, cmd: HostCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    let hosts = match cmd {
        HostCmd::List => c.list_hosts().await?,
        HostCmd::Show { name } => vec![c.get_host(&name).await?],
    };
    output::emit(
        ctx.format,
        &hosts,
        &["name", "state", "cpus", "memory", "disk", "drivers"],
        || {
            hosts
                .iter()
                .map(|h| {
                    vec![
                        h.name.to_string(),
                        h.state.as_str().to_owned(),
                        h.cpus.to_string(),
                        format!("{} MiB", h.memory_mib),
                        format!("{} GiB", h.disk_gib),
                        h.drivers.join(","),
                    ]
                })
                .collect()
        },
    )
}
