//! Terminals and their operation messages: the shapes a terminal (a thin client, a
//! kiosk, a phone app) and the server exchange, and the bytes a message's MAC covers.
//!
//! A terminal never names the VM it acts on: the server finds it from the terminal's
//! binding. Its secret is shown once at creation; the message MAC is
//! HMAC-SHA256(secret, [`mac_input`]) in lowercase hex.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validate::{validate_name, Name, ValidationError};
use crate::{TenantId, TerminalId, VmId};

impl SharePolicy {
    /// The policy as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            SharePolicy::Shared => "shared",
            SharePolicy::Exclusive => "exclusive",
        }
    }
}

/// How a terminal shares the VM it is bound to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SharePolicy {
    /// Other `shared` terminals may be bound to the same VM.
    #[default]
    Shared,
    /// No other terminal may be bound to the VM while this binding lasts; a bind that
    /// would break it is refused (nobody is kicked off silently).
    Exclusive,
}

/// A terminal's binding to a VM of its tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TerminalBinding {
    /// The VM the terminal operates.
    pub vm: VmId,
    /// Its name at binding time (for display; the id is what counts).
    pub vm_name: Name,
    /// How the terminal shares it.
    pub policy: SharePolicy,
    /// Binding time, unix milliseconds.
    pub bound_at: u64,
}

/// A terminal, as the API shows it (never its secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Terminal {
    /// Stable id: the `terminal` of every message header.
    pub id: TerminalId,
    /// Owning tenant.
    pub tenant: TenantId,
    /// Name, unique within the tenant.
    pub name: Name,
    /// The first characters of the secret, to tell terminals apart.
    pub secret_prefix: String,
    /// The VM it operates, when bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<TerminalBinding>,
    /// Creation time, unix milliseconds.
    pub created_at: u64,
}

/// The stored terminal: the API view and its sealed MAC key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalRecord {
    /// What the API shows.
    #[serde(flatten)]
    pub terminal: Terminal,
    /// SHA-256 of the secret, hex: proof of which secret was issued, without it.
    pub secret_sha256: String,
    /// The secret sealed (AES-256-GCM) under the server's secrets key, hex: the server
    /// needs the key itself to check MACs, so it keeps it encrypted, never in the clear.
    pub secret_sealed: String,
}

/// Prefix of every terminal secret.
pub const TERMINAL_SECRET_PREFIX: &str = "vterm_";

/// `POST /v1/terminals`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "kiosk-1"}))]
pub struct CreateTerminal {
    /// Name, unique within the tenant.
    pub name: String,
    /// Admin only: the owning tenant (default: `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl CreateTerminal {
    /// Checks the name and the tenant.
    pub fn validate(&self) -> Result<(Name, Option<Name>), ValidationError> {
        let name = validate_name("name", &self.name)?;
        let tenant = match &self.tenant {
            Some(t) => Some(validate_name("tenant", t)?),
            None => None,
        };
        Ok((name, tenant))
    }
}

/// The answer to `POST /v1/terminals`: the only time the secret is shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedTerminal {
    /// The terminal.
    pub terminal: Terminal,
    /// Its secret (`vterm_` and 64 hex digits): the MAC key of its messages. Shown once.
    pub secret: String,
    /// What a message header's `server` must say: this control plane's id.
    pub server: String,
}

/// `PUT /v1/terminals/{terminal}/binding`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"vm": "web-1", "policy": "shared"}))]
pub struct BindTerminal {
    /// VM name or id, in the terminal's tenant.
    pub vm: String,
    /// How the terminal shares the VM (default `shared`).
    #[serde(default)]
    pub policy: SharePolicy,
}

/// The header of an operation message: to whom, from whom, which one, when, and the
/// MAC over all of it and the body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OperationHeader {
    /// The server it is addressed to ([`CreatedTerminal::server`]).
    pub server: String,
    /// The sending terminal.
    pub terminal: TerminalId,
    /// Sequence number, increasing per terminal (gaps allowed, repeats refused).
    pub seq: u64,
    /// When the terminal sent it, unix milliseconds (too old or too far ahead: refused).
    pub timestamp: u64,
    /// HMAC-SHA256 of [`mac_input`] with the terminal's secret, 64 lowercase hex digits.
    pub mac: String,
}

/// The MAC's domain: a MAC made for anything else never verifies as a message.
pub const MAC_CONTEXT: &str = "vinfra-terminal-operation-v1";

/// The bytes a message's MAC covers: the context, each header field but the MAC on its
/// own line, then the body exactly as sent (no re-serialization, so the terminal and
/// the server need not agree on JSON formatting).
pub fn mac_input(
    server: &str,
    terminal: TerminalId,
    seq: u64,
    timestamp: u64,
    body: &[u8],
) -> Vec<u8> {
    let head = format!("{MAC_CONTEXT}\n{server}\n{terminal}\n{seq}\n{timestamp}\n");
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    out
}

/// HMAC-SHA256 of a message's header fields and body with `secret` (the terminal's
/// secret as text), 64 lowercase hex digits: what the terminal puts in `header.mac`
/// and what the server checks.
pub fn message_mac(secret: &[u8], header: &OperationHeader, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let input = mac_input(
        &header.server,
        header.terminal,
        header.seq,
        header.timestamp,
        body,
    );
    crate::hex(ring::hmac::sign(&key, &input).as_ref())
}

/// Sequence numbers from here up are the server's own, never a terminal's: the key-ups
/// the server sends for the keys a session still held when it ended are recorded under
/// them, in the terminal's log, without touching its replay window.
pub const SERVER_SEQ_BASE: u64 = 1 << 63;

/// Longest operation message, bytes.
pub const MAX_OPERATION_MESSAGE: usize = 16 * 1024;

/// How a message fared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationOutcome {
    /// Sent to the VM's host; no answer yet.
    Sent,
    /// Waiting for the VM's live migration to switch over: sent, in order with the
    /// others held, to the host the VM runs on afterwards (so that none is performed on
    /// a source whose state was already copied, and none is lost).
    Held,
    /// The hypervisor performed it.
    Performed,
    /// The hypervisor could not perform it (`detail` says why).
    Failed,
}

/// The server's record of an operation performed on a VM for a terminal (the "second
/// operation information": this operation, from this terminal, on this VM).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PerformedOperation {
    /// The terminal that sent it.
    pub terminal: TerminalId,
    /// The VM it acted on (from the terminal's binding).
    pub vm: VmId,
    /// The host the VM ran on.
    pub host: Name,
    /// The message's sequence number.
    pub seq: u64,
    /// The operation.
    pub op: crate::terminal_ops::Operation,
    /// When the server took the message, unix milliseconds.
    pub received: u64,
    /// When the host answered, unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub performed: Option<u64>,
    /// How it fared.
    pub outcome: OperationOutcome,
    /// Why it failed, or what it returned (a screenshot's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// A screenshot's picture, when the operation took one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screenshot: Option<ScreenshotPng>,
}

/// What the server sends back on a terminal session (`GET /v1/terminal-sessions`, a
/// WebSocket), one JSON text message per operation message received, in the order
/// they came.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum SessionReply {
    /// The operation's record once its host answered (or as it stands after the wait:
    /// `sent`, `held`).
    Answer {
        /// The record.
        operation: Box<PerformedOperation>,
    },
    /// The operation's outcome alone, on a session opened with `?replies=brief`: what
    /// a terminal that knows what it sent needs, in a fifth of the bytes of the record
    /// (which stays readable at `GET /v1/terminals/{t}/operations`).
    Outcome {
        /// The message's sequence number.
        seq: u64,
        /// How it fared.
        outcome: OperationOutcome,
        /// Why it failed, or what it returned (a screenshot's size).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
        /// A screenshot's picture, when the operation took one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        screenshot: Option<ScreenshotPng>,
    },
    /// The message was refused; nothing was performed for it.
    Refused {
        /// Its sequence number, when its header could be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        /// The reason as one word (as counted in `vinfra_terminal_refusals_total`).
        reason: String,
        /// The reason in words, naming the field.
        detail: String,
        /// For a sequence number taken before: that message's record (a terminal
        /// resending after a reconnect learns how it fared; it is never performed twice).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous: Option<Box<PerformedOperation>>,
    },
}

/// What a session's answers carry (`GET /v1/terminal-sessions?replies=…`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionReplies {
    /// The operation's whole record ([`SessionReply::Answer`]).
    #[default]
    Full,
    /// Its sequence number and outcome ([`SessionReply::Outcome`]).
    Brief,
}

impl SessionReply {
    /// The reply to a message whose host answered (or whose wait ended), in `form`.
    pub fn answer(operation: PerformedOperation, form: SessionReplies) -> SessionReply {
        match form {
            SessionReplies::Full => SessionReply::Answer {
                operation: Box::new(operation),
            },
            SessionReplies::Brief => SessionReply::Outcome {
                seq: operation.seq,
                outcome: operation.outcome,
                detail: operation.detail,
                screenshot: operation.screenshot,
            },
        }
    }
}

/// A screenshot as PNG.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ScreenshotPng {
    /// Width, pixels.
    pub width: u32,
    /// Height, pixels.
    pub height: u32,
    /// The PNG file, base64 (standard alphabet, padded).
    pub png_base64: String,
}

/// `PUT /v1/terminal-operations/{terminal}/{seq}/result`: the agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OperationResult {
    /// The reporting host (the one the operation was sent to).
    pub host: String,
    /// `performed` or `failed`.
    pub outcome: OperationOutcome,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// A screenshot's picture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screenshot: Option<ScreenshotPng>,
}

/// One answer of an [`OperationAnswers`] batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OperationAnswer {
    /// The operation's terminal.
    #[schema(value_type = String)]
    pub terminal: TerminalId,
    /// The operation's sequence number.
    pub seq: u64,
    /// What the host did.
    pub result: OperationResult,
}

/// `POST /v1/terminal-operations/results`: several answers of a host in one request (the
/// agent sends what its VMs performed while its previous requests were under way).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OperationAnswers {
    /// At most [`MAX_ANSWERS`].
    pub answers: Vec<OperationAnswer>,
}

/// The most answers one [`OperationAnswers`] request may carry.
pub const MAX_ANSWERS: usize = 256;

/// What became of one answer of a batch, in the batch's order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AnswerOutcome {
    /// The operation's terminal.
    #[schema(value_type = String)]
    pub terminal: TerminalId,
    /// The operation's sequence number.
    pub seq: u64,
    /// The HTTP status the answer alone would have had (200: recorded; 5xx: send again).
    pub status: u16,
    /// Why it was not recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// How many sequence numbers below the highest seen are still accepted (once each):
/// messages sent in parallel may arrive out of order.
pub const REPLAY_WINDOW: u64 = 64;

/// A terminal's replay window: the highest sequence number taken and which of the
/// [`REPLAY_WINDOW`] below it were taken too (bit `i`: `highest - 1 - i`). Stored with
/// the terminal, so that a restarted server refuses what its predecessor performed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayWindow {
    /// The highest sequence number taken; 0: none yet (sequence numbers start at 1).
    pub highest: u64,
    /// Which of the numbers just below `highest` were taken.
    pub below: u64,
}

/// Why a sequence number is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// Sequence numbers start at 1.
    #[error("seq: must be at least 1")]
    Zero,
    /// Taken before.
    #[error("seq: {0} was already performed (replay)")]
    Repeated(u64),
    /// At or above [`SERVER_SEQ_BASE`]: the server's own numbers.
    #[error("seq: {0} is reserved for the server (must be below 2^63)")]
    Reserved(u64),
    /// Older than the window: it may have been taken, the server cannot tell.
    #[error("seq: {seq} is more than {REPLAY_WINDOW} below the highest taken ({highest})")]
    TooOld {
        /// The number.
        seq: u64,
        /// The highest taken.
        highest: u64,
    },
}

impl ReplayWindow {
    /// Takes `seq` if it was never taken; the window moves up with a new highest.
    pub fn take(&mut self, seq: u64) -> Result<(), ReplayError> {
        if seq == 0 {
            return Err(ReplayError::Zero);
        }
        if seq >= SERVER_SEQ_BASE {
            return Err(ReplayError::Reserved(seq));
        }
        if seq > self.highest {
            let shift = seq - self.highest;
            self.below = if shift > REPLAY_WINDOW {
                0
            } else {
                // The old highest becomes bit `shift - 1`.
                let moved = if shift == REPLAY_WINDOW {
                    0
                } else {
                    self.below << shift
                };
                if self.highest == 0 {
                    moved
                } else {
                    moved | (1 << (shift - 1))
                }
            };
            self.highest = seq;
            return Ok(());
        }
        if seq == self.highest {
            return Err(ReplayError::Repeated(seq));
        }
        let back = self.highest - seq; // 1..
        if back > REPLAY_WINDOW {
            return Err(ReplayError::TooOld {
                seq,
                highest: self.highest,
            });
        }
        let bit = 1u64 << (back - 1);
        if self.below & bit != 0 {
            return Err(ReplayError::Repeated(seq));
        }
        self.below |= bit;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_number_is_taken_once_in_any_order_within_the_window() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.take(0), Err(ReplayError::Zero));
        for s in [5, 3, 4, 1, 2, 7, 6] {
            assert_eq!(w.take(s), Ok(()), "{s}");
        }
        for s in 1..=7 {
            assert_eq!(w.take(s), Err(ReplayError::Repeated(s)), "{s}");
        }
        assert_eq!(w.take(7 + REPLAY_WINDOW + 1), Ok(()));
        assert!(matches!(w.take(7), Err(ReplayError::TooOld { .. })));
        // The one just inside the window is still free once.
        assert_eq!(w.take(7 + 1 + 1), Ok(()));
        assert_eq!(w.take(7 + 1 + 1), Err(ReplayError::Repeated(9)));
    }

    #[test]
    fn a_window_matches_a_set_of_taken_numbers() {
        // Against a plain set, over a pseudo-random order with repeats.
        let mut rng = crate::SplitMix64::new(11);
        let mut w = ReplayWindow::default();
        let mut taken = std::collections::BTreeSet::new();
        let mut highest = 0u64;
        for _ in 0..20_000 {
            let seq = 1 + rng.next_u64() % 400;
            let expect_ok = !taken.contains(&seq) && seq + REPLAY_WINDOW >= highest;
            let got = w.take(seq);
            assert_eq!(
                got.is_ok(),
                expect_ok,
                "seq {seq} highest {highest}: {got:?}"
            );
            if got.is_ok() {
                taken.insert(seq);
                highest = highest.max(seq);
            }
        }
    }

    #[test]
    fn the_mac_input_separates_every_field() {
        let t = TerminalId(uuid::Uuid::nil());
        let a = mac_input("s", t, 1, 2, b"{}");
        assert_eq!(a, format!("{MAC_CONTEXT}\ns\n{t}\n1\n2\n{{}}").into_bytes());
        assert_ne!(a, mac_input("s", t, 12, 2, b"{}"));
    }
}
