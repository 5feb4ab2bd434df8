//! `vinfra slice …`: network slice instances, client associations by slice type, and
//! measured loads; `vinfra ledger …`: the slice ledger's head, proofs, and a full
//! audit that recomputes every association and allocation.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use model::slices::{CreateNsi, Nsi, SliceLoads, Snssai};
use translog::hash::{from_hex, hash_from_hex, leaf_hash, Hash};
use translog::verify::{audit, verify_inclusion, TrustedKeys, VerifiedCheckpoint};

use crate::cmd::Ctx;
use crate::output;

/// Slice commands.
#[derive(Debug, clap::Subcommand)]
pub enum SliceCmd {
    /// Create a network slice instance (NSI) over an NS instance of the tenant.
    Create {
        /// NSI name.
        name: String,
        /// Slice/Service Type (1 eMBB, 2 URLLC, 3 MIoT, 4 V2X, 5 HMTC, 128-255 operator).
        #[arg(long)]
        sst: u8,
        /// Slice Differentiator, 6 hex digits.
        #[arg(long)]
        sd: Option<String>,
        /// The resource provider whose resources it uses.
        #[arg(long)]
        provider: String,
        /// Load it is sized for, Mbit/s.
        #[arg(long)]
        capacity_mbps: u32,
        /// Most clients at once.
        #[arg(long, default_value_t = 100)]
        max_clients: u32,
        /// The NS instance realising it (`vinfra ns instantiate`).
        #[arg(long)]
        ns: Option<String>,
    },
    /// List NSIs with their measured, forecast and allocated load.
    List,
    /// Delete an NSI.
    Delete {
        /// NSI name or id.
        nsi: String,
    },
    /// Associate a client with the NSI of a slice type with room and the lowest
    /// forecast utilization (logged in the ledger).
    Associate {
        /// Slice type: an SST (`1`) or `embb`, `urllc`, `miot`, `v2x`, `hmtc`, optionally `-SD`.
        slice_type: String,
        /// The client (a UE's SUPI or any name).
        client: String,
    },
    /// List associations of a slice type.
    Associations {
        /// Slice type.
        slice_type: String,
    },
    /// Record one sampling period's measured load (admin): `NSI=MBPS …`.
    Loads {
        /// `name=Mbit/s` pairs.
        #[arg(required = true)]
        loads: Vec<String>,
    },
}

/// Ledger commands.
#[derive(Debug, clap::Subcommand)]
pub enum LedgerCmd {
    /// The latest signed checkpoint and the keys that sign the ledger.
    Show,
    /// An entry with its inclusion proof, checked here against the signed head.
    Proof {
        /// Entry index.
        index: u64,
    },
    /// Audit the whole ledger (admin): signatures, no gap, every checkpoint's root,
    /// no rollback or fork since the witnessed checkpoint, and every association
    /// and allocation recomputed from its logged inputs.
    Verify {
        /// Trusted public key (hex), repeatable. Without one, the keys the server
        /// announces are trusted (say so: pin them for a real audit).
        #[arg(long = "key")]
        keys: Vec<String>,
        /// File keeping the last checkpoint this auditor accepted; checked against,
        /// then advanced.
        #[arg(long)]
        witness: Option<PathBuf>,
    },
}

/// An NSI's CPU: forecast (or measured) cores over its vCPUs, `-` before the sampler
/// has seen its VMs.
fn cores(n: &Nsi) -> String {
    match (n.forecast_cores.or(n.measured_cores), n.vcpus) {
        (Some(c), Some(v)) => format!("{c:.2}/{v}"),
        _ => "-".into(),
    }
}

fn show_nsis(ctx: &Ctx, nsis: &[Nsi]) -> anyhow::Result<()> {
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    output::emit(
        ctx.format,
        &nsis,
        &[
            "name",
            "s-nssai",
            "provider",
            "ns",
            "clients",
            "capacity",
            "measured",
            "forecast",
            "allocated",
            "cpu",
        ],
        || {
            nsis.iter()
                .map(|n| {
                    vec![
                        n.name.to_string(),
                        n.snssai.to_string(),
                        n.provider.to_string(),
                        n.ns_instance.as_ref().map_or("-".into(), |s| s.to_string()),
                        format!("{}/{}", n.clients, n.max_clients),
                        n.capacity_mbps.to_string(),
                        f(n.measured_mbps),
                        f(n.forecast_mbps),
                        f(n.allocated_mbps),
                        cores(n),
                    ]
                })
                .collect()
        },
    )
}

/// Runs a slice command.
pub async fn run(ctx: &Ctx, cmd: SliceCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    match cmd {
        SliceCmd::Create {
            name,
            sst,
            sd,
            provider,
            capacity_mbps,
            max_clients,
            ns,
        } => {
            let n = c
                .create_nsi(&CreateNsi {
                    name,
                    snssai: Snssai { sst, sd },
                    provider,
                    capacity_mbps,
                    max_clients,
                    ns_instance: ns,
                    tenant: None,
                })
                .await?;
            show_nsis(ctx, &[n])
        }
        SliceCmd::List => show_nsis(ctx, &c.list_nsis().await?),
        SliceCmd::Delete { nsi } => {
            c.delete_nsi(&nsi).await?;
            eprintln!("network slice instance {nsi} deleted");
            Ok(())
        }
        SliceCmd::Associate { slice_type, client } => {
            let a = c.associate(&slice_type, &client).await?;
            output::emit(
                ctx.format,
                &a,
                &["client", "nsi", "s-nssai", "ledger index"],
                || {
                    vec![vec![
                        a.client.clone(),
                        a.nsi_name.clone(),
                        a.snssai.to_string(),
                        a.ledger_index.to_string(),
                    ]]
                },
            )
        }
        SliceCmd::Associations { slice_type } => {
            let v = c.list_associations(&slice_type).await?;
            output::emit(
                ctx.format,
                &v,
                &["client", "nsi", "s-nssai", "ledger index"],
                || {
                    v.iter()
                        .map(|a| {
                            vec![
                                a.client.clone(),
                                a.nsi_name.clone(),
                                a.snssai.to_string(),
                                a.ledger_index.to_string(),
                            ]
                        })
                        .collect()
                },
            )
        }
        SliceCmd::Loads { loads } => {
            let mut map = BTreeMap::new();
            for l in loads {
                let (k, v) = l
                    .split_once('=')
                    .with_context(|| format!("{l:?}: expected NSI=MBPS"))?;
                let v: f64 = v.parse().with_context(|| format!("{l:?}: not a number"))?;
                map.insert(k.to_owned(), v);
            }
            let r = c.record_slice_loads(&SliceLoads { loads: map }).await?;
            println!("allocations logged at ledger indices {:?}", r.allocations);
            Ok(())
        }
    }
}

fn hashes(v: &[String]) -> anyhow::Result<Vec<Hash>> {
    v.iter()
        .map(|h| hash_from_hex(h).with_context(|| format!("{h:?} is not a hash")))
        .collect()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Witness {
    size: u64,
    root: String,
}

/// Runs a ledger command.
pub async fn run_ledger(ctx: &Ctx, cmd: LedgerCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    match cmd {
        LedgerCmd::Show => {
            let h = c.ledger_head().await?;
            output::emit(ctx.format, &h, &["origin", "size", "root", "keys"], || {
                vec![vec![
                    h.origin.clone(),
                    h.size.to_string(),
                    h.root.clone(),
                    h.keys
                        .iter()
                        .map(|k| format!("{}={}", k.id, k.public_key))
                        .collect::<Vec<_>>()
                        .join(" "),
                ]]
            })
        }
        LedgerCmd::Proof { index } => {
            let head = c.ledger_head().await?;
            let p = c.ledger_proof(index, Some(head.size)).await?;
            let root = hash_from_hex(&head.root).context("the head's root is not a hash")?;
            verify_inclusion(
                index,
                head.size,
                &leaf_hash(p.entry.as_bytes()),
                &hashes(&p.inclusion)?,
                &root,
            )
            .with_context(|| format!("entry {index} is not in the ledger the server signed"))?;
            output::emit(
                ctx.format,
                &p,
                &["index", "size", "root", "proof", "entry"],
                || {
                    vec![vec![
                        p.index.to_string(),
                        p.size.to_string(),
                        p.root.clone(),
                        format!("{} hashes, verified", p.inclusion.len()),
                        p.entry.rsplit('\n').next().unwrap_or_default().to_owned(),
                    ]]
                },
            )
        }
        LedgerCmd::Verify { keys, witness } => {
            let mut trusted = TrustedKeys::new();
            if keys.is_empty() {
                // Only then is the server asked anything but the raw keys: a server
                // that refuses its own head (it saw the log go back) cannot stop an
                // audit with pinned keys.
                let head = c.ledger_head().await?;
                eprintln!("warning: trusting the keys the server announces; pin them with --key for an audit that does not trust the server");
                for k in &head.keys {
                    trusted.add(
                        &from_hex(&k.public_key)
                            .with_context(|| format!("key {} is not hex", k.id))?,
                    );
                }
            }
            for k in &keys {
                trusted.add(&from_hex(k).with_context(|| format!("--key {k:?} is not hex"))?);
            }
            let seen = match &witness {
                Some(path) if path.exists() => {
                    let w: Witness =
                        serde_json::from_slice(&std::fs::read(path)?).with_context(|| {
                            format!("witness {} is not a checkpoint", path.display())
                        })?;
                    Some(VerifiedCheckpoint {
                        origin: control::slices::LEDGER_ORIGIN.into(),
                        size: w.size,
                        root: hash_from_hex(&w.root).context("witness root")?,
                        key_id: String::new(),
                        prev: 0,
                    })
                }
                _ => None,
            };
            let raw: Vec<(String, Vec<u8>)> = c
                .ledger_entries()
                .await?
                .into_iter()
                .map(|kv| (kv.key, kv.value.into_bytes()))
                .collect();
            let audited = audit(
                control::records::keys::SLICE_LEDGER,
                control::slices::LEDGER_ORIGIN,
                &trusted,
                &raw,
                seen.as_ref(),
            )
            .context("the ledger does not verify")?;
            let (mut assoc, mut alloc) = (0, 0);
            for (i, body) in audited.entries.iter().enumerate() {
                match control::slices::recheck(body)
                    .with_context(|| format!("entry {i} does not recompute"))?
                {
                    control::slices::LedgerEntry::Association { .. } => assoc += 1,
                    control::slices::LedgerEntry::Allocation { .. } => alloc += 1,
                }
            }
            // The server's inclusion proof of every entry, against the root audited
            // above: a server that cannot prove an entry it stores is caught here.
            let size = audited.head.size;
            let by_key: std::collections::HashMap<&str, &[u8]> = raw
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            for i in 0..size {
                let p = c.ledger_proof(i, Some(size)).await?;
                let key = translog::log::keys::entry(control::records::keys::SLICE_LEDGER, i);
                let stored = by_key.get(key.as_str()).copied();
                anyhow::ensure!(
                    stored == Some(p.entry.as_bytes()),
                    "the server's proof of entry {i} is for another entry than it stores"
                );
                verify_inclusion(
                    i,
                    size,
                    &leaf_hash(p.entry.as_bytes()),
                    &hashes(&p.inclusion)?,
                    &audited.head.root,
                )
                .with_context(|| {
                    format!("the server's inclusion proof of entry {i} does not verify")
                })?;
            }
            if let Some(path) = &witness {
                let w = Witness {
                    size: audited.head.size,
                    root: translog::hash::to_hex(&audited.head.root),
                };
                std::fs::write(path, serde_json::to_vec(&w)?)
                    .with_context(|| format!("cannot write witness {}", path.display()))?;
            }
            println!(
                "ledger verified: {} entries ({assoc} associations, {alloc} allocations recomputed), every inclusion proof checked, {} checkpoints, root {}{}",
                audited.head.size,
                audited.checkpoints,
                translog::hash::to_hex(&audited.head.root),
                if seen.is_some() { ", consistent with the witnessed checkpoint" } else { "" }
            );
            Ok(())
        }
    }
}
