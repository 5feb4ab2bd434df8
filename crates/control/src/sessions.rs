//! Terminal sessions: a terminal's operation messages over one long-lived connection
//! (the API serves it as a WebSocket), each message checked exactly as a single one is
//! (`Control::perform_operation`), with what a connection adds: it belongs to the
//! terminal of its first accepted message, and it knows which keys and pointer buttons
//! its operations hold down, so that when it ends — closed, dropped, or its client
//! killed — the server releases them on the VM. A key left down in a guest after a
//! viewer vanished is what x11vnc and minimega users report; here the release is the
//! server's own operation (a number from [`SERVER_SEQ_BASE`]), recorded in the
//! terminal's log like any other.
//!
//! Owns: the held keys of one session, in this server's memory. A server that dies
//! with sessions open cannot release their keys: the terminal's next session (on any
//! server) should send the key-ups it needs.

use model::terminal_ops::{Operation, PointerButton, QCode};
use model::terminals::{PerformedOperation, SERVER_SEQ_BASE};
use model::{TerminalId, VmId};

use crate::records::{get_json, now_ms};
use crate::terminals::{op_key, Accepted, CachedTerminal, Pending, Refused};
use crate::{Control, ControlError};

/// One terminal session.
#[derive(Debug)]
pub struct TerminalSession {
    control: Control,
    /// The terminal of the first accepted message.
    terminal: Option<TerminalId>,
    /// What this session's operations hold down, and on which VM (the binding may change
    /// meanwhile: a release goes where the press went).
    held_keys: Vec<(Accepted, QCode)>,
    held_buttons: Vec<(Accepted, PointerButton)>,
    /// The terminal's MAC key and binding, read once and again only after they changed.
    cache: Option<CachedTerminal>,
}

/// A refused message of a session.
#[derive(Debug)]
pub struct SessionRefusal {
    /// Why.
    pub refused: Refused,
    /// The message's sequence number, when its header could be read.
    pub seq: Option<u64>,
    /// For a number taken before by an authentic message of this terminal: that
    /// message's record, so that a terminal resending what it had no answer for after a
    /// reconnect learns how it fared (it is never performed twice).
    pub previous: Option<Box<PerformedOperation>>,
}

impl Control {
    /// A new session; it belongs to no terminal until its first message is accepted.
    pub fn terminal_session(&self) -> TerminalSession {
        TerminalSession {
            control: self.clone(),
            terminal: None,
            held_keys: Vec::new(),
            held_buttons: Vec::new(),
            cache: None,
        }
    }
}

impl TerminalSession {
    /// The session's terminal, once it has one.
    pub fn terminal(&self) -> Option<TerminalId> {
        self.terminal
    }

    /// Checks one message and records its operation (in the order messages come); the
    /// host's answer comes through what is returned. A refusal is counted and logged.
    pub async fn submit(&mut self, raw: &[u8]) -> Result<Pending, SessionRefusal> {
        self.submit_all(&[raw]).await.pop().unwrap_or_else(|| {
            Err(SessionRefusal {
                refused: ControlError::Invariant("one message, no result".into()).into(),
                seq: None,
                previous: None,
            })
        })
    }

    /// Checks messages that came together and records their operations in one
    /// transaction, in order; one result per message.
    pub async fn submit_all(&mut self, raws: &[&[u8]]) -> Vec<Result<Pending, SessionRefusal>> {
        let mut out: Vec<Option<Result<Pending, SessionRefusal>>> = Vec::with_capacity(raws.len());
        let mut accepted = Vec::new();
        for (i, raw) in raws.iter().enumerate() {
            let seq = header_seq(raw);
            match self.accept(raw).await {
                Ok(a) => {
                    accepted.push((i, a));
                    out.push(None);
                }
                Err(refused) => out.push(Some(Err(self.refusal(refused, seq).await))),
            }
        }
        let batch: Vec<Accepted> = accepted.iter().map(|(_, a)| a.clone()).collect();
        match self.control.dispatch_all(batch).await {
            Ok(results) => {
                for ((i, a), r) in accepted.into_iter().zip(results) {
                    let seq = Some(a.seq);
                    out[i] = Some(match r {
                        Ok(p) => {
                            self.track(a);
                            Ok(p)
                        }
                        Err(refused) => Err(self.refusal(refused, seq).await),
                    });
                }
            }
            Err(e) => {
                // The whole batch failed: each message gets the reason.
                let (reason, detail) = (e.reason(), e.to_string());
                self.control.refused(&e);
                for (i, a) in accepted {
                    out[i] = Some(Err(SessionRefusal {
                        refused: Refused::Batch {
                            reason,
                            detail: detail.clone(),
                        },
                        seq: Some(a.seq),
                        previous: None,
                    }));
                }
            }
        }
        out.into_iter().flatten().collect()
    }

    /// Checks one message and that it is this session's terminal's.
    async fn accept(&mut self, raw: &[u8]) -> Result<Accepted, Refused> {
        let a = self
            .control
            .check_operation_with(raw, Some(&mut self.cache), self.terminal)
            .await?;
        match self.terminal {
            Some(session) if session != a.terminal => {
                return Err(Refused::OtherTerminal {
                    session,
                    got: a.terminal,
                });
            }
            _ => self.terminal = Some(a.terminal),
        }
        Ok(a)
    }

    /// Counts and logs a refusal; for a number taken before, finds that message's record.
    async fn refusal(&self, refused: Refused, seq: Option<u64>) -> SessionRefusal {
        if !matches!(refused, Refused::Batch { .. }) {
            self.control.refused(&refused);
        }
        let previous = match (&refused, self.terminal, seq) {
            (Refused::Replay(_), Some(t), Some(seq)) => {
                get_json::<PerformedOperation>(self.control.store(), &op_key(t, seq))
                    .await
                    .ok()
                    .flatten()
                    .map(|(r, _)| Box::new(r))
            }
            _ => None,
        };
        SessionRefusal {
            refused,
            seq,
            previous,
        }
    }

    /// Follows what the accepted operation leaves held down.
    fn track(&mut self, a: Accepted) {
        match a.op {
            Operation::Key { qcode, down } => {
                self.held_keys
                    .retain(|(h, q)| !(*q == qcode && h.vm == a.vm));
                if down {
                    self.held_keys.push((a, qcode));
                }
            }
            Operation::PointerButton { button, down } => {
                self.held_buttons
                    .retain(|(h, b)| !(*b == button && h.vm == a.vm));
                if down {
                    self.held_buttons.push((a, button));
                }
            }
            _ => {}
        }
    }

    /// How many keys and buttons the session holds down now.
    pub fn held(&self) -> usize {
        self.held_keys.len() + self.held_buttons.len()
    }

    /// Ends the session: every key and button it holds is released on the VM it was
    /// pressed on (last pressed, first released), by the server's own operations.
    /// Returns how many were sent.
    pub async fn end(self) -> usize {
        let releases = self
            .held_buttons
            .into_iter()
            .rev()
            .map(|(a, button)| {
                (
                    a,
                    Operation::PointerButton {
                        button,
                        down: false,
                    },
                )
            })
            .chain(
                self.held_keys
                    .into_iter()
                    .rev()
                    .map(|(a, qcode)| (a, Operation::Key { qcode, down: false })),
            );
        let mut sent = 0;
        for (a, op) in releases {
            let vm: VmId = a.vm;
            let release = Accepted {
                seq: SERVER_SEQ_BASE,
                op,
                received: now_ms(),
                ..a
            };
            match self.control.dispatch(release).await {
                Ok(_) => sent += 1,
                Err(e) => {
                    tracing::warn!(%vm, error = %e, "cannot release a key a closed terminal session held");
                }
            }
        }
        if sent > 0 {
            tracing::info!(terminal = ?self.terminal, released = sent, "terminal session ended holding keys: released");
        }
        sent
    }
}

/// The header's sequence number, read without trusting anything else in the message.
fn header_seq(raw: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Header {
        seq: u64,
    }
    #[derive(serde::Deserialize)]
    struct Message {
        header: Header,
    }
    serde_json::from_slice::<Message>(raw)
        .ok()
        .map(|m| m.header.seq)
}
