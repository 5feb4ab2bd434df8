//! `vinfra traffic top`: what the domain's virtual switches counted.

use crate::cmd::Ctx;
use crate::output::{self, Format};

/// Traffic commands.
#[derive(Debug, clap::Subcommand)]
pub enum TrafficCmd {
    /// Traffic by class and the busiest VM pairs.
    Top {
        /// The last this many seconds (default: since the start).
        #[arg(long)]
        window: Option<u64>,
        /// How many VM pairs to show.
        #[arg(long, default_value_t = 10)]
        pairs: usize,
    },
}

fn u(v: &serde_json::Value, k: &str) -> String {
    v.get(k).and_then(|x| x.as_u64()).unwrap_or(0).to_string()
}

/// A VM's name when the domain knows it, else its MAC.
fn end(v: &serde_json::Value, vm: &str, mac: &str) -> String {
    match v.get(vm).and_then(|x| x.as_str()) {
        Some(n) => n.to_owned(),
        None => s(v, mac),
    }
}

fn s(v: &serde_json::Value, k: &str) -> String {
    match v.get(k) {
        Some(serde_json::Value::String(x)) => x.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// Runs a traffic command.
pub async fn run(ctx: &Ctx, cmd: TrafficCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    match cmd {
        TrafficCmd::Top { window, pairs } => {
            let r = c.traffic(window).await?;
            if ctx.format == Format::Json {
                return output::emit(ctx.format, &r, &[], Vec::new);
            }
            println!(
                "domain {}  malformed frames {}",
                s(&r, "domain"),
                u(&r, "errors")
            );
            let empty = Vec::new();
            let classes = r
                .get("classes")
                .and_then(|c| c.as_array())
                .unwrap_or(&empty);
            print!(
                "{}",
                output::table(
                    &["class", "packets", "bytes"],
                    &classes
                        .iter()
                        .map(|c| vec![s(c, "class"), u(c, "packets"), u(c, "bytes")])
                        .chain(["flood", "neighbor"].iter().map(|k| {
                            let c = r.get(*k).cloned().unwrap_or_default();
                            vec![(*k).to_owned(), u(&c, "packets"), u(&c, "bytes")]
                        }))
                        .collect::<Vec<_>>(),
                )
            );
            let ps = r.get("pairs").and_then(|c| c.as_array()).unwrap_or(&empty);
            println!();
            print!(
                "{}",
                output::table(
                    &["src", "dst", "class", "packets", "bytes"],
                    &ps.iter()
                        .take(pairs)
                        .map(|p| {
                            vec![
                                end(p, "src_vm", "src_mac"),
                                end(p, "dst_vm", "dst_mac"),
                                s(p, "class"),
                                u(p, "packets"),
                                u(p, "bytes"),
                            ]
                        })
                        .collect::<Vec<_>>(),
                )
            );
            Ok(())
        }
    }
}
