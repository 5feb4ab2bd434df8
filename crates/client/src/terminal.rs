//! The terminal side of operation messages: a terminal's credentials (what
//! `POST /v1/terminals` answered, kept by the terminal) and signing a message.

use model::terminals::{message_mac, CreatedTerminal, OperationHeader};
use model::TerminalId;
use serde::{Deserialize, Serialize};

/// What a terminal keeps to send messages: who it is, its secret, the server id its
/// headers name, and where to send them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalCredentials {
    /// The terminal.
    pub terminal: TerminalId,
    /// Its name (for messages to the user).
    pub name: String,
    /// Its secret, the MAC key.
    pub secret: String,
    /// The server id message headers name.
    pub server: String,
    /// The API base URL(s) to send messages to.
    pub url: String,
}

impl TerminalCredentials {
    /// The credentials of a terminal just created on the server at `url`.
    pub fn new(created: &CreatedTerminal, url: &str) -> Self {
        Self {
            terminal: created.terminal.id,
            name: created.terminal.name.to_string(),
            secret: created.secret.clone(),
            server: created.server.clone(),
            url: url.to_owned(),
        }
    }

    /// A signed message carrying `body` (a JSON object, sent byte for byte as given).
    pub fn sign(&self, seq: u64, timestamp: u64, body: &str) -> Vec<u8> {
        let header = self.header(seq, timestamp, body);
        // The header serializes infallibly (strings and numbers only).
        let head = serde_json::to_string(&header).unwrap_or_default();
        format!("{{\"header\":{head},\"body\":{body}}}").into_bytes()
    }

    /// A signed message for a session that already has this terminal (its first
    /// accepted message named it): the header leaves out `server` and `terminal`, which
    /// the MAC covers all the same (~100 bytes fewer per message).
    pub fn sign_in_session(&self, seq: u64, timestamp: u64, body: &str) -> Vec<u8> {
        let OperationHeader { mac, .. } = self.header(seq, timestamp, body);
        format!(
            "{{\"header\":{{\"seq\":{seq},\"timestamp\":{timestamp},\"mac\":\"{mac}\"}},\"body\":{body}}}"
        )
        .into_bytes()
    }

    /// The header of a message carrying `body`, its MAC computed.
    fn header(&self, seq: u64, timestamp: u64, body: &str) -> OperationHeader {
        let mut header = OperationHeader {
            server: self.server.clone(),
            terminal: self.terminal,
            seq,
            timestamp,
            mac: String::new(),
        };
        header.mac = message_mac(self.secret.as_bytes(), &header, body.as_bytes());
        header
    }
}

/// A sequence number for a terminal that keeps no counter: microseconds since the
/// epoch, which grow from one invocation to the next (gaps are allowed, repeats are
/// refused), paired with the millisecond timestamp of the same instant.
pub fn clock_seq() -> (u64, u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (
        u64::try_from(now.as_micros()).unwrap_or(u64::MAX),
        u64::try_from(now.as_millis()).unwrap_or(u64::MAX),
    )
}
