//! `vinfra terminal connect`: this terminal as a terminal of a VM. Keystrokes are read
//! raw and each becomes an operation message on one session (`GET
//! /v1/terminal-sessions`); the VM's serial console is printed as it grows. Ctrl-]
//! ends, as in telnet. Keys are sent as whole presses (`type_text`, `key_combo`), so
//! nothing is left held down whatever happens to this process; the server releases
//! raw key-downs of a session that drops anyway.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use client::session::TerminalSession;
use model::terminals::{OperationOutcome, SessionReplies, SessionReply};
use tokio::io::AsyncReadExt;

use crate::cmd::Ctx;

/// Ctrl-]: ends the session (the byte is not sent).
const QUIT: u8 = 0x1d;

/// What a chunk of keyboard bytes means: operations to send, and whether to stop.
#[derive(Debug, Default, PartialEq)]
pub struct Keystrokes {
    /// Operation JSON objects, in order.
    pub ops: Vec<serde_json::Value>,
    /// Ctrl-] was pressed (what came before it is in `ops`).
    pub quit: bool,
}

/// Maps bytes read from a raw terminal to operations: runs of printable characters
/// (with Enter and Tab) become one `type_text`; control characters, Backspace and the
/// ANSI cursor and editing keys become `key_combo`s.
pub fn keystrokes(bytes: &[u8]) -> Keystrokes {
    let mut out = Keystrokes::default();
    let mut text = String::new();
    let flush = |text: &mut String, ops: &mut Vec<serde_json::Value>| {
        if !text.is_empty() {
            ops.push(serde_json::json!({"op": "type_text", "text": std::mem::take(text)}));
        }
    };
    let combo = |keys: &[&str]| serde_json::json!({"op": "key_combo", "qcodes": keys});
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        i += 1;
        let keys: Vec<&str> = match b {
            QUIT => {
                out.quit = true;
                break;
            }
            b'\r' | b'\n' => {
                text.push('\n');
                // Type-text length is bounded: send long pastes in pieces.
                if text.len() >= 200 {
                    flush(&mut text, &mut out.ops);
                }
                continue;
            }
            b'\t' | 0x20..=0x7e => {
                text.push(char::from(b));
                if text.len() >= 200 {
                    flush(&mut text, &mut out.ops);
                }
                continue;
            }
            0x7f | 0x08 => vec!["backspace"],
            0x1b => {
                // ESC [ X: a cursor or editing key; a lone ESC is Escape.
                if bytes.get(i) == Some(&b'[') {
                    let (key, used) = match (bytes.get(i + 1), bytes.get(i + 2)) {
                        (Some(b'A'), _) => ("up", 2),
                        (Some(b'B'), _) => ("down", 2),
                        (Some(b'C'), _) => ("right", 2),
                        (Some(b'D'), _) => ("left", 2),
                        (Some(b'H'), _) => ("home", 2),
                        (Some(b'F'), _) => ("end", 2),
                        (Some(b'3'), Some(b'~')) => ("delete", 3),
                        (Some(b'5'), Some(b'~')) => ("pgup", 3),
                        (Some(b'6'), Some(b'~')) => ("pgdn", 3),
                        _ => ("esc", 0),
                    };
                    i += used;
                    vec![key]
                } else {
                    vec!["esc"]
                }
            }
            // Ctrl-A … Ctrl-Z (Tab, Enter and Backspace were taken above).
            0x01..=0x1a => vec!["ctrl", LETTERS[usize::from(b - 1)]],
            // Other bytes (non-ASCII, the rest of the C0 set) have no key on a US layout.
            _ => continue,
        };
        flush(&mut text, &mut out.ops);
        out.ops.push(combo(&keys));
    }
    flush(&mut text, &mut out.ops);
    out
}

const LETTERS: [&str; 26] = [
    "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s",
    "t", "u", "v", "w", "x", "y", "z",
];

/// The terminal's settings, put back when dropped.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    /// Raw mode on stdin when it is a terminal (a pipe is read as it is).
    fn enter() -> Self {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            return RawMode(None);
        }
        RawMode(Some(saved))
    }

    fn is_raw(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// Prints a line while the terminal may be raw (which does not turn `\n` into `\r\n`).
fn say(raw: bool, text: &str) {
    if raw {
        eprint!("{}\r\n", text.replace('\n', "\r\n"));
    } else {
        eprintln!("{text}");
    }
}

/// Runs `vinfra terminal connect`.
pub async fn connect(ctx: &Ctx, credentials: &PathBuf, console: bool) -> anyhow::Result<()> {
    let creds = crate::cmd::terminal::read_credentials(credentials)?;
    let tls = match &ctx.ca_file {
        Some(f) => Some(client::ClientTls {
            ca_pem: std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the CA file {}", f.display()))?,
            identity: None,
        }),
        None => None,
    };
    // Brief answers: this client knows what it sent, and a keystroke's answer is then
    // ~60 bytes instead of its whole record (~270).
    let session =
        TerminalSession::connect_with(&creds, tls.as_ref(), SessionReplies::Brief).await?;
    // What each sent number was, for a failure's message.
    let sent: std::sync::Mutex<std::collections::BTreeMap<u64, String>> = Default::default();
    let (mut tx, mut rx) = session.split();
    // The console needs an API token that can read the VM; without one, keys only.
    let follow = if console {
        console_follower(ctx, &creds).await
    } else {
        None
    };
    let raw = RawMode::enter();
    let is_raw = raw.is_raw();
    say(
        is_raw,
        &format!("connected as terminal {}; Ctrl-] ends", creds.name),
    );
    let replies = async {
        while let Some(r) = rx.next().await {
            match r {
                Ok(SessionReply::Outcome {
                    seq,
                    outcome,
                    detail,
                    ..
                }) => {
                    let kind = sent.lock().ok().and_then(|mut m| m.remove(&seq));
                    if outcome == OperationOutcome::Failed {
                        let kind = kind.unwrap_or_else(|| "operation".into());
                        let detail = detail.unwrap_or_default();
                        say(is_raw, &format!("[{kind} failed: {detail}]"));
                    }
                }
                Ok(SessionReply::Answer { operation }) => {
                    // Not asked for; said as the brief answer would be.
                    if operation.outcome == OperationOutcome::Failed {
                        let detail = operation.detail.unwrap_or_default();
                        say(
                            is_raw,
                            &format!("[{} failed: {detail}]", operation.op.kind()),
                        );
                    }
                }
                Ok(SessionReply::Refused { seq, detail, .. }) => {
                    if let (Some(seq), Ok(mut m)) = (seq, sent.lock()) {
                        m.remove(&seq);
                    }
                    say(is_raw, &format!("[refused: {detail}]"));
                }
                Err(e) => {
                    say(is_raw, &format!("[{e}]"));
                    return;
                }
            }
        }
    };
    let console = async {
        match follow {
            Some(f) => f.run(is_raw).await,
            None => std::future::pending().await,
        }
    };
    let keys = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        let mut last_seq = 0u64;
        loop {
            let n = stdin.read(&mut buf).await.context("reading the keyboard")?;
            if n == 0 {
                break;
            }
            let k = keystrokes(&buf[..n]);
            for op in k.ops {
                let (seq, ts) = client::terminal::clock_seq();
                // Two keys in one microsecond still get two numbers.
                last_seq = seq.max(last_seq + 1);
                let body = serde_json::to_string(&serde_json::json!({ "operation": op }))?;
                if let (Some(kind), Ok(mut m)) = (op["op"].as_str(), sent.lock()) {
                    m.insert(last_seq, kind.to_owned());
                }
                tx.send(last_seq, ts, &body).await?;
            }
            if k.quit {
                break;
            }
        }
        // Give the last replies a moment before the session closes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        tx.close().await?;
        anyhow::Ok(())
    };
    let r = tokio::select! {
        r = keys => r,
        () = replies => Err(anyhow::anyhow!("the server ended the session")),
        () = console => Ok(()),
    };
    drop(raw);
    r
}

/// Follows the console of the terminal's VM, when an API token can read both.
struct ConsoleFollower {
    client: client::Client,
    vm: String,
}

async fn console_follower(
    ctx: &Ctx,
    creds: &client::terminal::TerminalCredentials,
) -> Option<ConsoleFollower> {
    let client = ctx.client().ok()?;
    let t = client
        .get_terminal(&creds.terminal.to_string())
        .await
        .ok()?;
    let vm = t.binding?.vm.to_string();
    Some(ConsoleFollower { client, vm })
}

impl ConsoleFollower {
    async fn run(self, raw: bool) {
        let mut printed = String::new();
        loop {
            if let Ok(text) = self.client.console(&self.vm).await {
                let new = if printed.is_empty() {
                    &text[..]
                } else {
                    crate::cmd::vm::new_suffix(&printed, &text)
                };
                if !new.is_empty() {
                    let shown = if raw {
                        new.replace('\n', "\r\n")
                    } else {
                        new.to_owned()
                    };
                    print!("{shown}");
                    let _ = std::io::Write::flush(&mut std::io::stdout());
                }
                printed = text;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_runs_are_typed_and_control_keys_are_combos() {
        let k = keystrokes(b"ls -l\r\x7f\x03\x1b[A\x1bq\x1dignored");
        assert!(k.quit);
        let ops: Vec<String> = k.ops.iter().map(|o| o.to_string()).collect();
        assert_eq!(
            ops,
            [
                r#"{"op":"type_text","text":"ls -l\n"}"#,
                r#"{"op":"key_combo","qcodes":["backspace"]}"#,
                r#"{"op":"key_combo","qcodes":["ctrl","c"]}"#,
                r#"{"op":"key_combo","qcodes":["up"]}"#,
                r#"{"op":"key_combo","qcodes":["esc"]}"#,
                r#"{"op":"type_text","text":"q"}"#,
            ]
        );
        // Every operation it makes is valid.
        for o in k.ops {
            let _: model::terminal_ops::Operation = serde_json::from_value(o).unwrap();
        }
    }

    #[test]
    fn any_bytes_make_valid_operations() {
        let mut rng = model::SplitMix64::new(7);
        for _ in 0..2000 {
            let n = rng.below(64) as usize;
            let bytes: Vec<u8> = (0..n).map(|_| rng.below(256) as u8).collect();
            for o in keystrokes(&bytes).ops {
                let r: Result<model::terminal_ops::Operation, _> =
                    serde_json::from_value(o.clone());
                assert!(r.is_ok(), "{bytes:?} → {o}: {r:?}");
            }
        }
    }
}
