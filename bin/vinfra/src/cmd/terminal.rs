//! `vinfra terminal …`: terminals that operate one VM by operation messages.
//!
//! A terminal's credentials (id, secret, server id, URL) are written once, at create,
//! to a file of mode 0600 (`--credentials`), or printed once; `send` reads them and
//! needs no API token: the message's MAC is the terminal's credential.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::Context;
use base64::Engine;
use client::terminal::{clock_seq, TerminalCredentials};
use model::terminals::{BindTerminal, CreateTerminal, SharePolicy, Terminal};

use crate::cmd::Ctx;
use crate::output;

/// Terminal commands.
#[derive(Debug, clap::Subcommand)]
pub enum TerminalCmd {
    /// Register a terminal; its secret is shown (or written) this once.
    Create {
        /// Terminal name.
        name: String,
        /// Write the credentials (id, secret, server id, URL) to this file, mode 0600,
        /// instead of printing them.
        #[arg(long)]
        credentials: Option<PathBuf>,
    },
    /// List terminals and their bindings.
    List,
    /// One terminal.
    Show {
        /// Terminal name or id.
        terminal: String,
    },
    /// Delete a terminal: its secret stops working at once.
    Delete {
        /// Terminal name or id.
        terminal: String,
    },
    /// Bind a terminal to a VM of its tenant.
    Bind {
        /// Terminal name or id.
        terminal: String,
        /// VM name or id.
        vm: String,
        /// No other terminal may be bound to the VM meanwhile (refused if one is).
        #[arg(long)]
        exclusive: bool,
    },
    /// Unbind a terminal; its messages are refused until it is bound again.
    Unbind {
        /// Terminal name or id.
        terminal: String,
    },
    /// The terminal's recent operations: what was performed on which VM.
    Operations {
        /// Terminal name or id.
        terminal: String,
    },
    /// Send one operation as the terminal (needs its credentials, not an API token).
    Send {
        /// The credentials file written by `vinfra terminal create --credentials`.
        #[arg(long)]
        credentials: PathBuf,
        /// Type this text (US layout; `\n` for Enter).
        #[arg(long, group = "what")]
        text: Option<String>,
        /// Press these keys together, e.g. ctrl-alt-delete (QEMU key names).
        #[arg(long, group = "what")]
        keys: Option<String>,
        /// on, shutdown, reset, pause or resume.
        #[arg(long, group = "what")]
        power: Option<String>,
        /// Any operation as JSON, e.g. '{"op":"key","qcode":"a","down":true}'.
        #[arg(long, group = "what")]
        op: Option<String>,
        /// Take a screenshot of the VM and write it here as PNG.
        #[arg(long, group = "what")]
        screenshot: Option<PathBuf>,
    },
    /// Take a screenshot of the terminal's VM as PNG.
    Screenshot {
        /// The credentials file written by `vinfra terminal create --credentials`.
        #[arg(long)]
        credentials: PathBuf,
        /// Where to write the PNG (a positional path: `-o` is the output format of
        /// every command).
        png: PathBuf,
    },
    /// Operate the terminal's VM from this terminal: every keystroke is sent as an
    /// operation over a session (raw mode; Ctrl-] ends), with the VM's serial console
    /// printed as it grows when an API token can read it.
    Connect {
        /// The credentials file written by `vinfra terminal create --credentials`.
        #[arg(long)]
        credentials: PathBuf,
        /// Do not follow the VM's serial console.
        #[arg(long)]
        no_console: bool,
    },
}

fn show(ctx: &Ctx, ts: &[Terminal]) -> anyhow::Result<()> {
    output::emit(
        ctx.format,
        &ts,
        &["name", "id", "secret", "vm", "policy"],
        || {
            ts.iter()
                .map(|t| {
                    let (vm, policy) = match &t.binding {
                        Some(b) => (b.vm_name.to_string(), b.policy.as_str().to_owned()),
                        None => ("-".to_owned(), "-".to_owned()),
                    };
                    vec![
                        t.name.to_string(),
                        t.id.to_string(),
                        format!("{}…", t.secret_prefix),
                        vm,
                        policy,
                    ]
                })
                .collect()
        },
    )
}

/// Runs a terminal command.
pub async fn run(ctx: &Ctx, cmd: TerminalCmd) -> anyhow::Result<()> {
    if let TerminalCmd::Send {
        credentials,
        text,
        keys,
        power,
        op,
        screenshot,
    } = cmd
    {
        let what = What {
            text,
            keys,
            power,
            op,
            screenshot,
        };
        return send_cmd(ctx, &credentials, what).await;
    }
    if let TerminalCmd::Screenshot { credentials, png } = cmd {
        let what = What {
            text: None,
            keys: None,
            power: None,
            op: None,
            screenshot: Some(png),
        };
        return send_cmd(ctx, &credentials, what).await;
    }
    if let TerminalCmd::Connect {
        credentials,
        no_console,
    } = cmd
    {
        return crate::cmd::terminal_connect::connect(ctx, &credentials, !no_console).await;
    }
    let c = ctx.client()?;
    match cmd {
        TerminalCmd::Create { name, credentials } => {
            let created = c
                .create_terminal(&CreateTerminal { name, tenant: None })
                .await?;
            let (url, _) = crate::locate::endpoint(ctx.server.clone(), ctx.token.clone())?;
            let creds = TerminalCredentials::new(&created, &url);
            let text = serde_json::to_string_pretty(&creds)?;
            match credentials {
                Some(path) => {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    writeln!(f, "{text}")
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!(
                        "terminal {} ({}): credentials in {} (the secret is shown nowhere else)",
                        created.terminal.name,
                        created.terminal.id,
                        path.display()
                    );
                }
                None => println!("{text}"),
            }
            Ok(())
        }
        TerminalCmd::List => show(ctx, &c.list_terminals().await?),
        TerminalCmd::Show { terminal } => show(ctx, &[c.get_terminal(&terminal).await?]),
        TerminalCmd::Delete { terminal } => {
            c.delete_terminal(&terminal).await?;
            eprintln!("terminal {terminal} deleted");
            Ok(())
        }
        TerminalCmd::Bind {
            terminal,
            vm,
            exclusive,
        } => {
            let policy = if exclusive {
                SharePolicy::Exclusive
            } else {
                SharePolicy::Shared
            };
            let t = c
                .bind_terminal(&terminal, &BindTerminal { vm, policy })
                .await?;
            show(ctx, &[t])
        }
        TerminalCmd::Unbind { terminal } => show(ctx, &[c.unbind_terminal(&terminal).await?]),
        TerminalCmd::Operations { terminal } => {
            let ops = c.terminal_operations(&terminal).await?;
            output::emit(
                ctx.format,
                &ops,
                &["seq", "vm", "host", "op", "outcome"],
                || {
                    ops.iter()
                        .map(|o| {
                            vec![
                                o.seq.to_string(),
                                o.vm.to_string(),
                                o.host.to_string(),
                                o.op.kind().to_owned(),
                                format!("{:?}", o.outcome).to_lowercase(),
                            ]
                        })
                        .collect()
                },
            )
        }
        // Handled above: they need no API token.
        TerminalCmd::Send { .. } | TerminalCmd::Screenshot { .. } | TerminalCmd::Connect { .. } => {
            Ok(())
        }
    }
}

/// What `vinfra terminal send` was asked to send (clap allows one of them).
struct What {
    text: Option<String>,
    keys: Option<String>,
    power: Option<String>,
    op: Option<String>,
    screenshot: Option<PathBuf>,
}

async fn send_cmd(ctx: &Ctx, credentials: &PathBuf, w: What) -> anyhow::Result<()> {
    let op = match (&w.text, &w.keys, &w.power, &w.op, &w.screenshot) {
        (Some(t), ..) => serde_json::json!({"op": "type_text", "text": t.replace("\\n", "\n")}),
        (_, Some(k), ..) => {
            serde_json::json!({"op": "key_combo", "qcodes": k.split('-').collect::<Vec<_>>()})
        }
        (_, _, Some(p), ..) => serde_json::json!({"op": "power", "action": p}),
        (_, _, _, Some(o), _) => serde_json::from_str(o)
            .context("--op is not JSON (e.g. '{\"op\":\"power\",\"action\":\"reset\"}')")?,
        (_, _, _, _, Some(_)) => serde_json::json!({"op": "screenshot"}),
        _ => anyhow::bail!("say what to send: --text, --keys, --power, --op or --screenshot"),
    };
    let done = send(ctx, credentials, op).await?;
    if let (Some(out), Some(png)) = (&w.screenshot, &done.screenshot) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&png.png_base64)
            .context("the screenshot is not base64")?;
        std::fs::write(out, &bytes).with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!(
            "{}x{} PNG written to {}",
            png.width,
            png.height,
            out.display()
        );
    }
    output::emit(
        ctx.format,
        &done,
        &["seq", "vm", "host", "outcome", "detail"],
        || {
            vec![vec![
                done.seq.to_string(),
                done.vm.to_string(),
                done.host.to_string(),
                format!("{:?}", done.outcome).to_lowercase(),
                done.detail.clone().unwrap_or_default(),
            ]]
        },
    )
}

/// Sends `op` as the terminal whose credentials are in `path`; the server's record.
async fn send(
    ctx: &Ctx,
    path: &PathBuf,
    op: serde_json::Value,
) -> anyhow::Result<model::terminals::PerformedOperation> {
    let creds = read_credentials(path)?;
    // Checked here too, so that a typo is named before anything is sent.
    let _: model::terminal_ops::Operation =
        serde_json::from_value(op.clone()).context("not a valid operation")?;
    let body = serde_json::to_string(&serde_json::json!({ "operation": op }))?;
    let (seq, ts) = clock_seq();
    // The terminal holds no API token: the message's MAC authenticates it.
    let c = ctx.client_for(&creds.url, "-")?;
    Ok(c.send_operation(creds.sign(seq, ts, &body)).await?)
}

/// The terminal credentials in `path`.
pub fn read_credentials(path: &PathBuf) -> anyhow::Result<TerminalCredentials> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the credentials file {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a terminal credentials file", path.display()))
}
