//! `vinfra resource-table …`: shared resource tables kept by a host's agent, whose
//! entries every device on the host reads and one device at a time may write
//! (docs/SHM.md).

use model::resource_tables::{CreateResourceTable, ResourceTable};

use crate::cmd::Ctx;
use crate::output;

/// Resource table commands.
#[derive(Debug, clap::Subcommand)]
pub enum ResourceTableCmd {
    /// Create a table on a host; devices connect to the socket `show` prints.
    Create {
        /// Table name.
        name: String,
        /// The host whose agent keeps it.
        #[arg(long)]
        host: String,
        /// Number of entries (1..=65536).
        #[arg(long)]
        entries: u32,
        /// Payload bytes per entry (a multiple of 8, 8..=65536).
        #[arg(long)]
        entry_size: u32,
        /// Longest a grant lasts, ms (default 10000, at most 60000).
        #[arg(long)]
        max_grant_ms: Option<u64>,
    },
    /// List a host's tables.
    List {
        /// The host.
        #[arg(long)]
        host: String,
    },
    /// One table: spec, socket, devices, written entries' versions, totals.
    Show {
        /// Table name or id.
        table: String,
        /// The host.
        #[arg(long)]
        host: String,
    },
    /// A table's current grants and its audit (grants, revokes, refusals, crashes).
    Grants {
        /// Table name or id.
        table: String,
        /// The host.
        #[arg(long)]
        host: String,
    },
    /// Attach to a table as a device (on its host, at the socket `show` prints) and
    /// drive it line by line on stdin: `req E [MS]` (ask for write access to entry E,
    /// for at most MS ms), `write E TEXT` (write through the grant), `rel E`,
    /// `store E OFF VALUE` (one 8-byte store at byte OFF of E's slot without asking:
    /// refused with SIGBUS unless granted, and then reported to the agent's audit),
    /// `read E`, `exit`. Prints `ready DEVICE-ID`, then one answer line per command.
    Attach {
        /// The table's device socket.
        socket: std::path::PathBuf,
    },
    /// Delete a table (its devices see the agent gone).
    Delete {
        /// Table name or id.
        table: String,
        /// The host.
        #[arg(long)]
        host: String,
    },
}

fn list(ctx: &Ctx, tables: &[ResourceTable]) -> anyhow::Result<()> {
    output::emit(
        ctx.format,
        &tables,
        &[
            "name",
            "id",
            "entries",
            "entry size",
            "devices",
            "grants",
            "socket",
        ],
        || {
            tables
                .iter()
                .map(|t| {
                    let s = t.state.as_ref();
                    vec![
                        t.name.to_string(),
                        t.id.to_string(),
                        t.entries.to_string(),
                        t.entry_size.to_string(),
                        s.map_or("-".into(), |s| s.devices.len().to_string()),
                        s.map_or("-".into(), |s| s.grants.len().to_string()),
                        s.map_or_else(
                            || "(not reported yet)".into(),
                            |s| s.error.clone().unwrap_or_else(|| s.socket.clone()),
                        ),
                    ]
                })
                .collect()
        },
    )
}

fn show(ctx: &Ctx, t: &ResourceTable) -> anyhow::Result<()> {
    if ctx.format == output::Format::Json {
        return output::emit(ctx.format, t, &[], Vec::new);
    }
    list(ctx, std::slice::from_ref(t))?;
    let Some(s) = &t.state else { return Ok(()) };
    println!(
        "\ntotals: {} grants, {} revokes, {} refused requests, {} refused writes, {} rolled back; {} entries written",
        s.totals.grants,
        s.totals.revokes,
        s.totals.refused,
        s.totals.refused_writes,
        s.totals.rolled_back,
        s.written_entries
    );
    if !s.devices.is_empty() {
        println!();
        print!(
            "{}",
            output::table(
                &["device", "pid", "grants", "vm"],
                &s.devices
                    .iter()
                    .map(|d| vec![
                        d.id.to_string(),
                        d.pid.to_string(),
                        d.grants.to_string(),
                        d.vm.clone().unwrap_or_else(|| "-".into()),
                    ])
                    .collect::<Vec<_>>()
            )
        );
    }
    if !s.versions.is_empty() {
        println!();
        print!(
            "{}",
            output::table(
                &["entry", "version"],
                &s.versions
                    .iter()
                    .map(|v| vec![v.entry.to_string(), v.version.to_string()])
                    .collect::<Vec<_>>()
            )
        );
    }
    Ok(())
}

fn grants(ctx: &Ctx, t: &ResourceTable) -> anyhow::Result<()> {
    let empty = model::resource_tables::ResourceTableReport::default();
    let s = t.state.as_ref().unwrap_or(&empty);
    if ctx.format == output::Format::Json {
        let v = serde_json::json!({ "grants": s.grants, "audit": s.audit });
        return output::emit(ctx.format, &v, &[], Vec::new);
    }
    print!(
        "{}",
        output::table(
            &["entry", "device", "version", "expires in ms"],
            &s.grants
                .iter()
                .map(|g| {
                    vec![
                        g.entry.to_string(),
                        g.device.to_string(),
                        g.version.to_string(),
                        g.expires_in_ms.map_or("-".into(), |m| m.to_string()),
                    ]
                })
                .collect::<Vec<_>>()
        )
    );
    println!();
    print!(
        "{}",
        output::table(
            &["seq", "at", "device", "entry", "version", "event", "detail"],
            &s.audit
                .iter()
                .map(|a| {
                    let kind = serde_json::to_value(a.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    let detail = match (&a.reason, a.holder) {
                        (Some(r), _) => r.clone(),
                        (None, Some(h)) => format!("held by device {h}"),
                        (None, None) => String::new(),
                    };
                    vec![
                        a.seq.to_string(),
                        a.at.to_string(),
                        a.device.to_string(),
                        a.entry.map_or("-".into(), |e| e.to_string()),
                        a.version.to_string(),
                        kind,
                        detail,
                    ]
                })
                .collect::<Vec<_>>()
        )
    );
    Ok(())
}

/// A device driven by lines on stdin (see [`ResourceTableCmd::Attach`]).
fn attach(socket: &std::path::Path) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    let dev = shm::Device::connect(socket).map_err(|e| {
        anyhow::Error::new(e).context(format!("cannot attach to {}", socket.display()))
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {}", dev.id())?;
    out.flush()?;
    let mut guards: std::collections::HashMap<u32, shm::WriteGuard<'_>> =
        std::collections::HashMap::new();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let f: Vec<&str> = line.split_whitespace().collect();
        let reply = match device_command(&dev, &mut guards, &f) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => format!("err {e:#}"),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

/// One command of [`attach`]; `None`: exit.
fn device_command<'d>(
    dev: &'d shm::Device,
    guards: &mut std::collections::HashMap<u32, shm::WriteGuard<'d>>,
    f: &[&str],
) -> anyhow::Result<Option<String>> {
    let num = |i: usize, what: &str| -> anyhow::Result<u64> {
        let s = f.get(i).ok_or_else(|| anyhow::anyhow!("missing {what}"))?;
        s.parse::<u64>()
            .map_err(|_| anyhow::anyhow!("{what} {s:?} is not a number"))
    };
    let entry = |i: usize| -> anyhow::Result<u32> { Ok(u32::try_from(num(i, "entry")?)?) };
    Ok(Some(match f.first().copied() {
        Some("req") => {
            let e = entry(1)?;
            let ms = if f.len() > 2 { num(2, "timeout")? } else { 0 };
            let t = (ms > 0).then(|| std::time::Duration::from_millis(ms));
            match dev.request_write(e, t) {
                Ok(g) => {
                    let v = g.version();
                    // Asking again while holding extends the grant; keep one guard
                    // (dropping the old one would release it).
                    if let Some(old) = guards.insert(e, g) {
                        std::mem::forget(old);
                    }
                    format!("granted {v}")
                }
                Err(shm::Error::Held { holder, .. }) => format!("held {holder}"),
                Err(e) => return Err(e.into()),
            }
        }
        Some("write") => {
            let e = entry(1)?;
            let text = f.get(2..).unwrap_or_default().join(" ");
            let g = guards
                .get_mut(&e)
                .ok_or_else(|| anyhow::anyhow!("no grant of entry {e}: req it first"))?;
            format!("written {}", g.write(text.as_bytes())?)
        }
        Some("rel") => {
            let e = entry(1)?;
            let g = guards
                .remove(&e)
                .ok_or_else(|| anyhow::anyhow!("no grant of entry {e}"))?;
            g.release()?;
            "released".to_owned()
        }
        Some("store") => {
            let off = usize::try_from(num(2, "offset")?)?;
            match dev.try_store(entry(1)?, off, num(3, "value")?)? {
                shm::StoreOutcome::Stored => "stored".to_owned(),
                shm::StoreOutcome::Sigbus => "sigbus".to_owned(),
            }
        }
        Some("read") => {
            let (v, bytes) = dev.read(entry(1)?)?;
            let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            format!("read {v} {}", String::from_utf8_lossy(&bytes[..end]))
        }
        Some("exit") => return Ok(None),
        _ => anyhow::bail!("unknown command {:?}", f.join(" ")),
    }))
}

/// Runs a resource table command.
pub async fn run(ctx: &Ctx, cmd: ResourceTableCmd) -> anyhow::Result<()> {
    match cmd {
        // A device of the host: no server involved.
        ResourceTableCmd::Attach { socket } => {
            tokio::task::spawn_blocking(move || attach(&socket)).await?
        }
        cmd => run_api(ctx, cmd).await,
    }
}

async fn run_api(ctx: &Ctx, cmd: ResourceTableCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    match cmd {
        ResourceTableCmd::Attach { socket } => {
            anyhow::bail!("attach {} needs no server", socket.display())
        }
        ResourceTableCmd::Create {
            name,
            host,
            entries,
            entry_size,
            max_grant_ms,
        } => {
            let t = c
                .create_resource_table(
                    &host,
                    &CreateResourceTable {
                        name,
                        entries,
                        entry_size,
                        max_grant_ms,
                        tenant: None,
                    },
                )
                .await?;
            list(ctx, &[t])
        }
        ResourceTableCmd::List { host } => list(ctx, &c.list_resource_tables(&host).await?),
        ResourceTableCmd::Show { table, host } => {
            show(ctx, &c.get_resource_table(&host, &table).await?)
        }
        ResourceTableCmd::Grants { table, host } => {
            grants(ctx, &c.get_resource_table(&host, &table).await?)
        }
        ResourceTableCmd::Delete { table, host } => {
            c.delete_resource_table(&host, &table).await?;
            eprintln!("resource table {table} deleted");
            Ok(())
        }
    }
}
