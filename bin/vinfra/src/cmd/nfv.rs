//! `vinfra vnfd validate`, `vinfra nsd validate` (ETSI SOL001-style descriptors).

use std::path::PathBuf;

use anyhow::Context;

use crate::cmd::Ctx;
use crate::output;

/// Descriptor commands.
#[derive(Debug, clap::Subcommand)]
pub enum DescriptorCmd {
    /// Check a descriptor file and report every error with its path in the file.
    Validate {
        /// The YAML file.
        file: PathBuf,
    },
    /// Upload a descriptor to the control plane (refused with the same errors).
    Create {
        /// The YAML file.
        file: PathBuf,
    },
    /// List the descriptors stored in the control plane.
    List,
}

/// Uploads or lists descriptors of `kind` (`vnfd`, `nsd`); `Validate` runs locally.
async fn run_remote(ctx: &Ctx, kind: &str, cmd: DescriptorCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    let ds = match cmd {
        DescriptorCmd::Create { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            vec![c.upload_descriptor(kind, &text).await?]
        }
        DescriptorCmd::List | DescriptorCmd::Validate { .. } => c.list_descriptors(kind).await?,
    };
    output::emit(ctx.format, &ds, &["id", "kind", "tenant"], || {
        ds.iter()
            .map(|d| vec![d.id.clone(), d.kind.clone(), d.tenant.to_string()])
            .collect()
    })
}

/// `vinfra vnfd …`
pub async fn run_vnfd(ctx: &Ctx, cmd: DescriptorCmd) -> anyhow::Result<()> {
    match cmd {
        DescriptorCmd::Validate { file } => {
            let v = nfv::descriptor::load_vnfd(&file)?;
            println!(
                "{}: valid VNFD {} ({} VDUs, {} CPs, {} virtual links)",
                file.display(),
                v.id,
                v.vdus.len(),
                v.cps.len(),
                v.virtual_links.len()
            );
            Ok(())
        }
        other => run_remote(ctx, "vnfd", other).await,
    }
}

/// `vinfra nsd …`
pub async fn run_nsd(ctx: &Ctx, cmd: DescriptorCmd) -> anyhow::Result<()> {
    match cmd {
        DescriptorCmd::Validate { file } => {
            let (_nsd, vnfds) = nfv::descriptor::load_nsd(&file)?;
            println!("{}: valid NSD over {} VNFDs", file.display(), vnfds.len());
            Ok(())
        }
        other => run_remote(ctx, "nsd", other).await,
    }
}

/// Network-service commands.
#[derive(Debug, clap::Subcommand)]
pub enum NsCmd {
    /// Print the generic commands (seed 3) an NS turns into, per site: the commands
    /// each site's driver translates into its own cloud-management API.
    Plan {
        /// The NSD file (its `imports` name the VNFDs, relative to it).
        nsd: PathBuf,
        /// NS instance name (prefix of every site resource).
        #[arg(long, default_value = "demo")]
        name: String,
        /// Sites available, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "site-a,site-b")]
        sites: Vec<String>,
    },
}

/// `vinfra ns …`
pub fn run_ns(ctx: &Ctx, cmd: NsCmd) -> anyhow::Result<()> {
    match cmd {
        NsCmd::Plan { nsd, name, sites } => {
            let (nsd, vnfds) = nfv::descriptor::load_nsd(&nsd)?;
            let plan = nfv::plan::plan_ns(&name, &nsd, &vnfds, &sites)?;
            if ctx.format == output::Format::Json {
                return output::emit(ctx.format, &plan, &[], Vec::new);
            }
            for sp in &plan.sites {
                println!("site {}:", sp.site);
                for c in sp.commands() {
                    println!("  {}", serde_json::to_string(&c)?);
                }
            }
            Ok(())
        }
    }
}
