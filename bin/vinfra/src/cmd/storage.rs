//! `vinfra storage …` and `vinfra placement explain`.

use std::path::PathBuf;

use anyhow::Context;
use model::api::{PlacementQuery, StorageInventory};

use crate::cmd::Ctx;
use crate::output::{self, Format};

/// Storage inventory commands.
#[derive(Debug, clap::Subcommand)]
pub enum StorageCmd {
    /// Load storage resources and connectivity from a YAML or JSON file
    /// (see examples/storage.yaml; its `servers` section, if any, is ignored:
    /// servers are the registered hosts).
    Load {
        /// The file.
        file: PathBuf,
    },
    /// Show the storage inventory.
    Show,
}

/// Placement commands.
#[derive(Debug, clap::Subcommand)]
pub enum PlacementCmd {
    /// Where a redundant VM of this size would go, or why it cannot go anywhere.
    Explain {
        /// Disk on each storage of the pair, GiB.
        #[arg(long, default_value_t = 1)]
        disk_gib: u64,
        /// Virtual CPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory, MiB.
        #[arg(long, default_value_t = 256)]
        memory: u64,
    },
}

/// Reads an inventory file (YAML or JSON) into the API body. The server validates it
/// against the registered hosts and names the path of every problem.
pub fn read_inventory(file: &PathBuf) -> anyhow::Result<StorageInventory> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut doc: serde_json::Value = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("{} is not YAML or JSON", file.display()))?;
    if let Some(map) = doc.as_object_mut() {
        // Servers are the registered hosts; a `servers` section (the planner's file
        // format) is accepted and ignored.
        map.remove("servers");
    }
    serde_json::from_value(doc).with_context(|| format!("{}", file.display()))
}

/// Runs a storage command.
pub async fn run(ctx: &Ctx, cmd: StorageCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    let inv = match cmd {
        StorageCmd::Load { file } => c.put_storage(&read_inventory(&file)?).await?,
        StorageCmd::Show => c.get_storage().await?,
    };
    if ctx.format == Format::Json {
        return output::emit(ctx.format, &inv, &[], Vec::new);
    }
    let rows = inv
        .storage
        .iter()
        .map(|s| {
            let f = |k: &str| {
                s.get(k)
                    .map(|v| v.to_string().trim_matches('"').to_owned())
                    .unwrap_or_default()
            };
            let hosts: Vec<&str> = inv
                .connectivity
                .iter()
                .filter(|(_, ss)| {
                    ss.iter()
                        .any(|x| Some(x.as_str()) == s.get("name").and_then(|n| n.as_str()))
                })
                .map(|(h, _)| h.as_str())
                .collect();
            vec![
                f("name"),
                f("failure_domain"),
                f("free_gib"),
                f("capacity_gib"),
                f("replication"),
                hosts.join(","),
            ]
        })
        .collect::<Vec<_>>();
    print!(
        "{}",
        output::table(
            &[
                "storage",
                "failure domain",
                "free gib",
                "capacity gib",
                "replication",
                "reachable from"
            ],
            &rows
        )
    );
    Ok(())
}

/// Runs a placement command.
pub async fn run_placement(ctx: &Ctx, cmd: PlacementCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    match cmd {
        PlacementCmd::Explain {
            disk_gib,
            vcpus,
            memory,
        } => {
            let r = c
                .explain_placement(&PlacementQuery {
                    disk_gib,
                    vcpus,
                    memory_mib: memory,
                })
                .await?;
            if ctx.format == Format::Json {
                return output::emit(ctx.format, &r, &[], Vec::new);
            }
            println!(
                "{}",
                r.get("text").and_then(|t| t.as_str()).unwrap_or_default()
            );
            Ok(())
        }
    }
}
