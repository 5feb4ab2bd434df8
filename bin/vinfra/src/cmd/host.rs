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
    /// Maintenance mode: cordon, drain by live migration, release.
    #[command(subcommand)]
    Maintenance(crate::cmd::maintenance::MaintenanceCmd),
}

/// Runs a host command.
pub async fn run(ctx: &Ctx, cmd: HostCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    let hosts = match cmd {
        HostCmd::List => c.list_hosts().await?,
        HostCmd::Show { name } => vec![c.get_host(&name).await?],
        HostCmd::Maintenance(m) => return crate::cmd::maintenance::run(ctx, m).await,
    };
    output::emit(
        ctx.format,
        &hosts,
        &[
            "name",
            "state",
            "cpus",
            "vcpus",
            "memory",
            "disk",
            "drivers",
            "maintenance",
        ],
        || {
            hosts
                .iter()
                .map(|h| {
                    vec![
                        h.name.to_string(),
                        h.state.as_str().to_owned(),
                        h.cpus.to_string(),
                        h.schedulable_vcpus().to_string(),
                        format!("{} MiB", h.memory_mib),
                        format!("{} GiB", h.disk_gib),
                        h.drivers.join(","),
                        h.maintenance.map(|m| m.to_string()).unwrap_or_default(),
                    ]
                })
                .collect()
        },
    )
}
