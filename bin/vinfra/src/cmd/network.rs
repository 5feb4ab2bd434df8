//! `vinfra network …`: virtual networks (L2 segments with an IPv4 subnet) for VM NICs.

use model::api::CreateNetwork;
use model::Network;

use crate::cmd::Ctx;
use crate::output;

/// Network commands.
#[derive(Debug, clap::Subcommand)]
pub enum NetworkCmd {
    /// Create a network; VMs join it with `vinfra vm create --nic NAME[=IP]`.
    Create {
        /// Network name.
        name: String,
        /// IPv4 subnet, e.g. 10.70.0.0/24 (addresses are given from .1 upwards).
        #[arg(long)]
        cidr: String,
    },
    /// List networks.
    List,
    /// Delete a network no VM is on.
    Delete {
        /// Network name or id.
        network: String,
    },
}

fn show(ctx: &Ctx, nets: &[Network]) -> anyhow::Result<()> {
    output::emit(ctx.format, &nets, &["name", "id", "cidr"], || {
        nets.iter()
            .map(|n| vec![n.name.to_string(), n.id.to_string(), n.cidr.clone()])
            .collect()
    })
}

/// Runs a network command.
pub async fn run(ctx: &Ctx, cmd: NetworkCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    match cmd {
        NetworkCmd::Create { name, cidr } => {
            let n = c
                .create_network(&CreateNetwork {
                    name,
                    cidr,
                    tenant: None,
                })
                .await?;
            show(ctx, &[n])
        }
        NetworkCmd::List => show(ctx, &c.list_networks().await?),
        NetworkCmd::Delete { network } => {
            c.delete_network(&network).await?;
            eprintln!("network {network} deleted");
            Ok(())
        }
    }
}
