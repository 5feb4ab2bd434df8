//! Terminals: clients that operate one VM by operation messages instead of streaming
//! its screen. A terminal is a tenant's object with a secret (shown once) and a binding
//! to one VM of its tenant; a message from it carries a header (server, terminal,
//! sequence number, timestamp, MAC) and one operation. The server checks the message
//! (size, shape, addressee, MAC, clock, replay, rate) and finds the VM **only from the
//! terminal's binding** — a VM named in the body means nothing.
//!
//! State: terminal records (`/vinfra/terminals/<id>`, with a name index) hold the
//! binding, the sealed secret and the replay window; `/vinfra/vm-terminals/<vm>` lists
//! the terminals bound to a VM, so that a bind checks `exclusive` against it in the
//! same transaction. The per-terminal rate buckets, the refusal counters and the
//! recent operations of each terminal are this server's memory ([`Terminals`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use model::terminal_ops::{Operation, PowerAction};
use model::terminals::{
    message_mac, CreatedTerminal, OperationHeader, OperationOutcome, OperationResult,
    PerformedOperation, ReplayError, ReplayWindow, SharePolicy, Terminal, TerminalBinding,
    TerminalRecord, MAX_OPERATION_MESSAGE, SERVER_SEQ_BASE, TERMINAL_SECRET_PREFIX,
};
use model::{hex, Name, TenantId, TerminalId, Vm, VmId};
use ring::aead;
use serde::{Deserialize, Serialize};
use store::{Compare, Revision, StoreError, TxnOp, WatchEvent};

use crate::records::{get_json, keys, list_json, now_ms, to_bytes, CAS_ATTEMPTS};
use crate::{Control, ControlError, Scope};

/// How far a message's timestamp may be from the server's clock, ms.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;
/// Operations a terminal may send per second, sustained.
pub const RATE_PER_SECOND: f64 = 50.0;
/// Operations a terminal may send at once after a pause.
pub const RATE_BURST: f64 = 100.0;
/// Operations kept per terminal for `GET /v1/terminals/{t}/operations` (older ones are
/// removed as new ones come).
pub const LOG_PER_TERMINAL: usize = 1000;
/// How long `POST /v1/terminal-operations` waits for the host's answer before it
/// answers `sent` (the record then shows the outcome).
pub const DISPATCH_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The server's key for sealing terminal secrets (AES-256-GCM). Servers sharing a
/// store must share it (`vinfra server --secrets-key-file`).
pub struct SecretsKey(aead::LessSafeKey);

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretsKey(..)")
    }
}

/// The secrets key cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("the secrets key must be 32 bytes, got {0}")]
pub struct SecretsKeyError(usize);

impl SecretsKey {
    /// Length of a key, bytes.
    pub const LEN: usize = 32;

    /// A key from its 32 bytes.
    pub fn new(bytes: &[u8]) -> Result<Self, SecretsKeyError> {
        let key = aead::UnboundKey::new(&aead::AES_256_GCM, bytes)
            .map_err(|_| SecretsKeyError(bytes.len()))?;
        Ok(Self(aead::LessSafeKey::new(key)))
    }

    /// `plain` sealed: hex of a random nonce, the ciphertext and the tag. The terminal
    /// id is the associated data: a sealed secret copied to another record never opens.
    fn seal(&self, id: TerminalId, plain: &[u8]) -> Result<String, ControlError> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| ControlError::Invariant("the system random source failed".into()))?;
        let mut buf = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(id.0.as_bytes()),
                &mut buf,
            )
            .map_err(|_| ControlError::Invariant("sealing a terminal secret failed".into()))?;
        let mut out = hex(&nonce);
        out.push_str(&hex(&buf));
        Ok(out)
    }

    /// The secret sealed by [`SecretsKey::seal`]; `None` when it does not open (another
    /// key, another record, or tampered).
    fn open(&self, id: TerminalId, sealed: &str) -> Option<Vec<u8>> {
        let bytes = unhex(sealed)?;
        if bytes.len() < aead::NONCE_LEN {
            return None;
        }
        let (nonce, rest) = bytes.split_at(aead::NONCE_LEN);
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = rest.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, aead::Aad::from(id.0.as_bytes()), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|p| {
            let d = |c: u8| (c as char).to_digit(16);
            u8::try_from(d(p[0])? * 16 + d(p[1])?).ok()
        })
        .collect()
}

/// Why a terminal request is refused (not a message: see [`Refused`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TerminalError {
    /// This server cannot seal secrets.
    #[error("this server has no secrets key, so it cannot keep terminal secrets (start it with --secrets-key-file or a data dir)")]
    NoSecretsKey,
    /// The VM is bound exclusively to another terminal, or this exclusive bind would
    /// share it with others.
    #[error("vm: {vm} is bound to terminal {holder} ({policy}); unbind it first")]
    VmTaken {
        /// The VM.
        vm: String,
        /// A terminal bound to it.
        holder: String,
        /// How that terminal or this bind shares it.
        policy: &'static str,
    },
    /// The store or a record failed, or the terminal or VM is not there.
    #[error(transparent)]
    Control(#[from] ControlError),
}

impl From<StoreError> for TerminalError {
    fn from(e: StoreError) -> Self {
        TerminalError::Control(e.into())
    }
}

/// Why an operation message is refused. Each refusal is counted by
/// [`Refused::reason`] and logged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// Longer than [`MAX_OPERATION_MESSAGE`].
    #[error("message: {len} bytes, more than the {MAX_OPERATION_MESSAGE} allowed")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// Not an operation message.
    #[error("message: {0}")]
    Malformed(String),
    /// Addressed to another server.
    #[error("header.server: addressed to {got:?}, this server is {ours:?}")]
    WrongServer {
        /// What the header says.
        got: String,
        /// This server's id.
        ours: String,
    },
    /// No such terminal (or its secret does not open here).
    #[error("header.terminal: unknown terminal {0}")]
    UnknownTerminal(TerminalId),
    /// The MAC does not verify.
    #[error("header.mac: does not verify with the terminal's secret")]
    BadMac,
    /// The timestamp is too far from the server's clock.
    #[error("header.timestamp: {skew_ms} ms from the server's clock, more than {MAX_CLOCK_SKEW_MS} allowed")]
    Stale {
        /// How far, ms.
        skew_ms: u64,
    },
    /// The sequence number was used (or is too old to tell).
    #[error("header.{0}")]
    Replay(ReplayError),
    /// Over the terminal's rate.
    #[error("terminal {terminal}: more than {RATE_PER_SECOND} operations per second; retry in {retry_after_ms} ms")]
    RateLimited {
        /// The terminal.
        terminal: TerminalId,
        /// When a token is free again.
        retry_after_ms: u64,
    },
    /// The terminal is not bound to a VM.
    #[error("terminal {0} is not bound to a VM")]
    Unbound(TerminalId),
    /// The bound VM is gone.
    #[error("the VM bound to terminal {terminal} ({vm}) no longer exists")]
    VmGone {
        /// The terminal.
        terminal: TerminalId,
        /// The VM.
        vm: VmId,
    },
    /// The operation itself is not valid.
    #[error("body.op: {0}")]
    BadOperation(String),
    /// The batch of messages this one came with failed as a whole (the store, the VM
    /// gone): its reason and words.
    #[error("{detail}")]
    Batch {
        /// The batch's reason.
        reason: &'static str,
        /// The batch's refusal in words.
        detail: String,
    },
    /// A session carries one terminal's messages: the one of its first message.
    #[error("header.terminal: this session is terminal {session}'s, not {got}'s")]
    OtherTerminal {
        /// The session's terminal.
        session: TerminalId,
        /// The message's.
        got: TerminalId,
    },
    /// The store failed.
    #[error(transparent)]
    Control(#[from] ControlError),
}

impl Refused {
    /// A short name of the reason, for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::TooLarge { .. } => "too_large",
            Refused::Malformed(_) => "malformed",
            Refused::WrongServer { .. } => "wrong_server",
            Refused::UnknownTerminal(_) => "unknown_terminal",
            Refused::BadMac => "bad_mac",
            Refused::Stale { .. } => "stale_timestamp",
            Refused::Replay(_) => "replay",
            Refused::RateLimited { .. } => "rate_limited",
            Refused::Unbound(_) => "unbound",
            Refused::VmGone { .. } => "vm_gone",
            Refused::BadOperation(_) => "bad_operation",
            Refused::OtherTerminal { .. } => "other_terminal",
            Refused::Batch { reason, .. } => reason,
            Refused::Control(_) => "server_error",
        }
    }
}

impl From<StoreError> for Refused {
    fn from(e: StoreError) -> Self {
        Refused::Control(e.into())
    }
}

/// An operation message as sent: the header, and the body kept as its exact bytes
/// (the MAC covers them).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message<'a> {
    header: SentHeader,
    #[serde(borrow)]
    body: &'a serde_json::value::RawValue,
}

/// [`OperationHeader`] as it may come on a session: once the session has a terminal
/// (its first accepted message named it), a message may leave out `server` and
/// `terminal` — they are the session's, and the MAC still covers them, so nothing a
/// message proves is lost, and ~100 bytes per message are. A single message (and a
/// session's first) names both.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SentHeader {
    #[serde(default)]
    server: Option<String>,
    #[serde(default)]
    terminal: Option<TerminalId>,
    seq: u64,
    timestamp: u64,
    mac: String,
}

/// A message's body: one operation. Other fields (a VM named by the terminal) are not
/// refused but ignored: the VM comes from the binding.
#[derive(Deserialize)]
struct Body {
    operation: Operation,
}

/// A message that passed every check: what to perform, on which VM, where.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The sending terminal.
    pub terminal: TerminalId,
    /// Its tenant.
    pub tenant: TenantId,
    /// The VM from its binding.
    pub vm: VmId,
    /// The host that runs it.
    pub host: Name,
    /// The message's sequence number.
    pub seq: u64,
    /// The operation.
    pub op: Operation,
    /// When the server took it, unix ms.
    pub received: u64,
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

/// This server's terminal state: rate buckets and refusal counters.
#[derive(Debug, Default)]
pub struct Terminals {
    /// Set once, when the server starts with a secrets key.
    secrets: std::sync::OnceLock<SecretsKey>,
    /// The store's server id, once read.
    server_id: std::sync::OnceLock<String>,
    buckets: Mutex<HashMap<TerminalId, Bucket>>,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Operations this server waits to answer, and answers taken but not yet committed.
    early: Arc<Mutex<HashMap<(TerminalId, u64), Early>>>,
}

/// An operation this server waits to answer, by its host's answer given to this server
/// (see [`Control::answer_operation`]).
#[derive(Debug)]
struct Early {
    /// The record as sent (`sent`, to its host).
    record: PerformedOperation,
    /// The waiting reply (`None` once answered).
    reply: Option<tokio::sync::oneshot::Sender<PerformedOperation>>,
    /// The answered record while its commit is under way: the log shows it meanwhile.
    answered: Option<PerformedOperation>,
}

/// A [`Pending`]'s place in [`Terminals::early`]; dropped, it leaves unless answered
/// (then the answer's commit removes it).
struct EarlyWait {
    key: (TerminalId, u64),
    answer: tokio::sync::oneshot::Receiver<PerformedOperation>,
    registry: Arc<Mutex<HashMap<(TerminalId, u64), Early>>>,
}

impl Drop for EarlyWait {
    fn drop(&mut self) {
        let mut m = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&self.key).is_some_and(|e| e.answered.is_none()) {
            m.remove(&self.key);
        }
    }
}

impl Terminals {
    fn take_token(&self, t: TerminalId) -> Result<(), u64> {
        let mut m = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let b = m.entry(t).or_insert(Bucket {
            tokens: RATE_BURST,
            at: now,
        });
        let refill = now.duration_since(b.at).as_secs_f64() * RATE_PER_SECOND;
        b.tokens = (b.tokens + refill).min(RATE_BURST);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            // a few ms, positive
            let wait = ((1.0 - b.tokens) / RATE_PER_SECOND * 1000.0).ceil() as u64;
            Err(wait)
        }
    }

    /// Waits for the answer to `record` (sent to its host) given to this server.
    fn wait_early(&self, record: &PerformedOperation) -> EarlyWait {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let key = (record.terminal, record.seq);
        self.early.lock().unwrap_or_else(|p| p.into_inner()).insert(
            key,
            Early {
                record: record.clone(),
                reply: Some(tx),
                answered: None,
            },
        );
        EarlyWait {
            key,
            answer: rx,
            registry: self.early.clone(),
        }
    }

    /// Hands `result` to the reply waiting for it, if it waits here and `result` comes
    /// from the host the operation was sent to (what the commit will check too).
    fn answer_early(&self, t: TerminalId, seq: u64, result: &OperationResult, performed: u64) {
        let mut m = self.early.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = m.get_mut(&(t, seq)) else {
            return;
        };
        if e.answered.is_some() || e.record.host.as_str() != result.host {
            return;
        }
        let mut r = e.record.clone();
        r.outcome = result.outcome;
        r.detail = result.detail.clone();
        r.screenshot = result.screenshot.clone();
        r.performed = Some(performed);
        if let Some(reply) = e.reply.take() {
            // The reply may have given up (its wait ended): the commit still records it.
            let _ = reply.send(r.clone());
        }
        e.answered = Some(r);
    }

    /// The answer to `(t, seq)` is committed (or failed to be): the store has the last word.
    fn answer_committed(&self, t: TerminalId, seq: u64) {
        let mut m = self.early.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&(t, seq)).is_some_and(|e| e.answered.is_some()) {
            m.remove(&(t, seq));
        }
    }

    /// `r` as answered here when its answer's commit is still under way.
    fn overlay(&self, r: PerformedOperation) -> PerformedOperation {
        if r.outcome != OperationOutcome::Sent {
            return r;
        }
        let m = self.early.lock().unwrap_or_else(|p| p.into_inner());
        match m
            .get(&(r.terminal, r.seq))
            .and_then(|e| e.answered.as_ref())
        {
            Some(a) => a.clone(),
            None => r,
        }
    }

    fn count_refusal(&self, r: &Refused) {
        let mut m = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(r.reason()).or_default() += 1;
    }
}

/// The VMs a terminal is bound to list: `/vinfra/vm-terminals/<vm>`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct VmTerminals {
    terminals: Vec<(TerminalId, SharePolicy)>,
}

fn vm_terminals_key(vm: VmId) -> String {
    format!("/vinfra/vm-terminals/{vm}")
}

/// Where terminal records live.
pub const TERMINALS: &str = "/vinfra/terminals/";
const TERMINAL_NAMES: &str = "/vinfra/terminal-names/";
const SERVER_ID: &str = "/vinfra/server-id";

/// Where operation records live: `<prefix><terminal>/<seq, 20 digits>`, so that a
/// terminal's list comes in sequence order.
pub const TERMINAL_OPS: &str = "/vinfra/terminal-ops/";

/// The operations held for a VM while its migration moves memory (their record keys,
/// in the order they came): `/vinfra/held-operations/<vm>`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct HeldOperations {
    keys: Vec<String>,
}

/// What becomes of a VM's held operations.
#[derive(Clone, Copy)]
enum Settle<'a> {
    /// Sent to the host the VM runs on after its migration.
    SendTo(&'a Name),
    /// Answered `failed`, for this reason.
    Fail(&'static str),
}

fn held_key(vm: VmId) -> String {
    format!("/vinfra/held-operations/{vm}")
}

/// Where [`Control::route_vm`] sends a VM's operations.
struct VmRoute {
    host: Name,
    compares: Vec<Compare>,
    /// The VM's held list (its key, and its operations so far) while they are held.
    held: Option<(String, HeldOperations)>,
}

/// What checking a terminal's messages needs of it.
struct TerminalView {
    id: TerminalId,
    tenant: TenantId,
    /// The MAC key.
    secret: Vec<u8>,
    /// The key as stored, sealed: a session compares it with the record's as it changes.
    sealed: String,
    /// The bound VM and its host (`None`: the VM no longer exists).
    binding: Option<(VmId, Option<Name>)>,
}

/// A session's [`TerminalView`], until a change of the terminal's record or of its VM's
/// makes it stale.
pub(crate) struct CachedTerminal {
    view: TerminalView,
    stale: Arc<std::sync::atomic::AtomicBool>,
    watcher: tokio::task::JoinHandle<()>,
}

impl CachedTerminal {
    fn stale(&self) -> bool {
        self.stale.load(std::sync::atomic::Ordering::SeqCst) || self.watcher.is_finished()
    }
}

impl Drop for CachedTerminal {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl std::fmt::Debug for CachedTerminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("CachedTerminal")
            .field("terminal", &self.view.id)
            .field("binding", &self.view.binding)
            .field("stale", &self.stale())
            .finish_non_exhaustive()
    }
}

/// An accepted operation on its way to the VM's host.
pub struct Pending {
    record: PerformedOperation,
    /// The watch on its record (`None`: answered already).
    answers: Option<store::WatchStream>,
    /// The host's answer when it is given to this server: it comes before its commit.
    early: Option<EarlyWait>,
    /// Where to read the record again when the watch fails.
    store: Arc<dyn store::Store>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

impl Pending {
    /// The record as written.
    pub fn record(&self) -> &PerformedOperation {
        &self.record
    }

    /// Waits up to `wait` for the host's answer; the record as it then stands.
    pub async fn answer(self, wait: std::time::Duration) -> PerformedOperation {
        let Pending {
            record,
            answers,
            early,
            store,
        } = self;
        let Some(answers) = answers else {
            return record;
        };
        let watched = Self::watched(record, answers, store, wait);
        match early {
            Some(mut early) => {
                tokio::select! {
                    biased;
                    Ok(r) = &mut early.answer => r,
                    r = watched => r,
                }
            }
            None => watched.await,
        }
    }

    /// Follows the record in the store until it is answered or `wait` has passed.
    async fn watched(
        mut record: PerformedOperation,
        mut answers: store::WatchStream,
        store: Arc<dyn store::Store>,
        wait: std::time::Duration,
    ) -> PerformedOperation {
        let key = op_key(record.terminal, record.seq);
        let deadline = tokio::time::Instant::now() + wait;
        // Takes a version of the record; true once it is the answer.
        let mut take = |kv: &store::KeyValue| match crate::records::decode::<PerformedOperation>(kv)
        {
            Ok(r) => {
                let done = !matches!(r.outcome, OperationOutcome::Sent | OperationOutcome::Held);
                record = r;
                done
            }
            Err(_) => false,
        };
        loop {
            match tokio::time::timeout_at(deadline, answers.next()).await {
                Ok(Some(Ok(WatchEvent::Put(kv)))) => {
                    if take(&kv) {
                        break;
                    }
                }
                Ok(Some(Ok(WatchEvent::Delete { .. }))) | Ok(None) | Err(_) => break,
                Ok(Some(Err(e))) => {
                    // A watch that fell behind (its queue overflowed under load) lost
                    // events, not the record: watch again, then read the record as it
                    // stands, so that an answer written meanwhile is not missed either.
                    tracing::debug!(error = %e, "watch on a terminal operation failed: reading it again");
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    match store.watch(&key).await {
                        Ok(w) => answers = w,
                        Err(e) => {
                            tracing::warn!(error = %e, "watching a terminal operation failed");
                            break;
                        }
                    }
                    match store.get(&key).await {
                        Ok(Some(kv)) if take(&kv) => break,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "reading a terminal operation failed");
                            break;
                        }
                    }
                }
            }
        }
        record
    }
}

pub(crate) fn op_key(t: TerminalId, seq: u64) -> String {
    format!("{TERMINAL_OPS}{t}/{seq:020}")
}

fn terminal_key(id: TerminalId) -> String {
    format!("{TERMINALS}{id}")
}

fn terminal_name_key(tenant: TenantId, name: &Name) -> String {
    format!("{TERMINAL_NAMES}{tenant}/{name}")
}

impl Control {
    /// Seals terminal secrets with `key` from now on. Once: a later call is ignored and
    /// answers `false`, as secrets sealed with the first key would no longer open.
    pub fn set_secrets_key(&self, key: SecretsKey) -> bool {
        self.terminals().secrets.set(key).is_ok()
    }

    /// This control plane's id, as message headers name it: made once, kept in the
    /// store (every server of a cluster answers to the same one).
    pub async fn server_id(&self) -> Result<String, ControlError> {
        // Written once and never changed: every message names it, so it is read once.
        if let Some(id) = self.terminals().server_id.get() {
            return Ok(id.clone());
        }
        let id = match get_json::<String>(self.store(), SERVER_ID).await? {
            Some((id, _)) => id,
            None => {
                let id = format!("vinfra-{}", uuid::Uuid::new_v4().simple());
                match self.store().cas(SERVER_ID, None, to_bytes(&id)?).await {
                    Ok(_) => id,
                    Err(StoreError::Conflict { .. }) => get_json::<String>(self.store(), SERVER_ID)
                        .await?
                        .map(|(id, _)| id)
                        .ok_or_else(|| ControlError::Invariant("the server id vanished".into()))?,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        Ok(self.terminals().server_id.get_or_init(|| id).clone())
    }

    /// Registers a terminal in `tenant`; its secret is in the answer and nowhere else.
    pub async fn create_terminal(
        &self,
        tenant: TenantId,
        name: Name,
    ) -> Result<CreatedTerminal, TerminalError> {
        let Some(secrets) = self.terminals().secrets.get() else {
            return Err(TerminalError::NoSecretsKey);
        };
        let mut raw = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| ControlError::Invariant("the system random source failed".into()))?;
        let secret = format!("{TERMINAL_SECRET_PREFIX}{}", hex(&raw));
        let id = TerminalId::new_random();
        let terminal = Terminal {
            id,
            tenant,
            name,
            secret_prefix: secret
                .chars()
                .take(TERMINAL_SECRET_PREFIX.len() + 6)
                .collect(),
            binding: None,
            created_at: now_ms(),
        };
        let record = StoredTerminal {
            record: TerminalRecord {
                terminal: terminal.clone(),
                secret_sha256: hex(
                    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref(),
                ),
                secret_sealed: secrets.seal(id, secret.as_bytes())?,
            },
            window: ReplayWindow::default(),
            server_seq: 0,
        };
        crate::records::insert_named(
            self.store(),
            terminal_key(id),
            terminal_name_key(tenant, &terminal.name),
            &record,
            &id,
            || format!("name: terminal {} already exists", terminal.name),
        )
        .await?;
        tracing::info!(terminal = %terminal.name, %id, "terminal created");
        Ok(CreatedTerminal {
            terminal,
            secret,
            server: self.server_id().await?,
        })
    }

    /// The terminals `scope` sees, by tenant then name.
    pub async fn list_terminals(&self, scope: Scope) -> Result<Vec<Terminal>, ControlError> {
        let mut out: Vec<Terminal> = list_json::<StoredTerminal>(self.store(), TERMINALS)
            .await?
            .into_iter()
            .map(|(t, _)| t.record.terminal)
            .filter(|t| scope.sees(t.tenant))
            .collect();
        out.sort_by(|a, b| (a.tenant, &a.name).cmp(&(b.tenant, &b.name)));
        Ok(out)
    }

    async fn stored_terminal(
        &self,
        scope: Scope,
        s: &str,
    ) -> Result<(StoredTerminal, Revision), ControlError> {
        crate::records::resolve_named::<TerminalId, StoredTerminal>(
            self.store(),
            scope,
            s,
            "terminal",
            TERMINAL_NAMES,
            terminal_key,
            |t| t.record.terminal.tenant,
        )
        .await
    }

    /// One terminal, by name or id.
    pub async fn terminal(&self, scope: Scope, s: &str) -> Result<Terminal, ControlError> {
        Ok(self.stored_terminal(scope, s).await?.0.record.terminal)
    }

    /// Deletes a terminal (and its binding): its secret is worthless from then on.
    pub async fn delete_terminal(&self, scope: Scope, s: &str) -> Result<(), TerminalError> {
        for _ in 0..CAS_ATTEMPTS {
            let (t, rev) = self.stored_terminal(scope, s).await?;
            let term = &t.record.terminal;
            let mut compares = vec![Compare::ModRevision {
                key: terminal_key(term.id),
                expect: Some(rev),
            }];
            let mut ops = vec![
                TxnOp::Delete {
                    key: terminal_key(term.id),
                },
                TxnOp::Delete {
                    key: terminal_name_key(term.tenant, &term.name),
                },
            ];
            if let Some(b) = &term.binding {
                self.unbind_ops(term.id, b.vm, &mut compares, &mut ops)
                    .await?;
            }
            match self.store().txn(compares, ops).await {
                Ok(_) => {
                    tracing::info!(terminal = %term.name, "terminal deleted");
                    return Ok(());
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Contended {
            what: format!("terminal {s}"),
        }
        .into())
    }

    /// The compare and the write that take terminal `t` off VM `vm`'s list.
    async fn unbind_ops(
        &self,
        t: TerminalId,
        vm: VmId,
        compares: &mut Vec<Compare>,
        ops: &mut Vec<TxnOp>,
    ) -> Result<(), ControlError> {
        let key = vm_terminals_key(vm);
        let (mut list, rev) = match get_json::<VmTerminals>(self.store(), &key).await? {
            Some((l, r)) => (l, Some(r)),
            None => (VmTerminals::default(), None),
        };
        list.terminals.retain(|(id, _)| *id != t);
        compares.push(Compare::ModRevision {
            key: key.clone(),
            expect: rev,
        });
        ops.push(if list.terminals.is_empty() {
            TxnOp::Delete { key }
        } else {
            TxnOp::Put {
                key,
                value: to_bytes(&list)?,
            }
        });
        Ok(())
    }

    /// Binds a terminal to a VM of its tenant (moving it off the VM it was bound to).
    /// `exclusive` is refused while any other terminal is bound to the VM, and a bind
    /// to a VM held exclusively is refused: nobody is kicked off silently.
    pub async fn bind_terminal(
        &self,
        scope: Scope,
        s: &str,
        vm: &str,
        policy: SharePolicy,
    ) -> Result<Terminal, TerminalError> {
        for _ in 0..CAS_ATTEMPTS {
            let (mut t, rev) = self.stored_terminal(scope, s).await?;
            let tenant = t.record.terminal.tenant;
            let id = t.record.terminal.id;
            // The VM must be the terminal's tenant's, whoever asks.
            let (target, _) = self.vm(Scope::Tenant(tenant), vm).await?;
            let key = vm_terminals_key(target.id);
            let (mut list, list_rev) = match get_json::<VmTerminals>(self.store(), &key).await? {
                Some((l, r)) => (l, Some(r)),
                None => (VmTerminals::default(), None),
            };
            let others: Vec<_> = list.terminals.iter().filter(|(o, _)| *o != id).collect();
            if let Some((holder, p)) = others.iter().find(|(_, p)| *p == SharePolicy::Exclusive) {
                return Err(self.taken(&target, *holder, p.as_str()).await);
            }
            if policy == SharePolicy::Exclusive {
                if let Some((holder, _)) = others.first() {
                    return Err(self.taken(&target, *holder, "this bind is exclusive").await);
                }
            }
            let mut compares = vec![Compare::ModRevision {
                key: terminal_key(id),
                expect: Some(rev),
            }];
            let mut ops = Vec::new();
            if let Some(old) = t
                .record
                .terminal
                .binding
                .as_ref()
                .filter(|b| b.vm != target.id)
            {
                self.unbind_ops(id, old.vm, &mut compares, &mut ops).await?;
            }
            list.terminals.retain(|(o, _)| *o != id);
            list.terminals.push((id, policy));
            compares.push(Compare::ModRevision {
                key: key.clone(),
                expect: list_rev,
            });
            ops.push(TxnOp::Put {
                key,
                value: to_bytes(&list)?,
            });
            t.record.terminal.binding = Some(TerminalBinding {
                vm: target.id,
                vm_name: target.name.clone(),
                policy,
                bound_at: now_ms(),
            });
            ops.push(TxnOp::Put {
                key: terminal_key(id),
                value: to_bytes(&t)?,
            });
            match self.store().txn(compares, ops).await {
                Ok(_) => {
                    tracing::info!(terminal = %t.record.terminal.name, vm = %target.name, ?policy, "terminal bound");
                    return Ok(t.record.terminal);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Contended {
            what: format!("terminal {s}"),
        }
        .into())
    }

    async fn taken(&self, vm: &Vm, holder: TerminalId, policy: &'static str) -> TerminalError {
        let holder = match get_json::<StoredTerminal>(self.store(), &terminal_key(holder)).await {
            Ok(Some((t, _))) => t.record.terminal.name.to_string(),
            _ => holder.to_string(),
        };
        TerminalError::VmTaken {
            vm: vm.name.to_string(),
            holder,
            policy,
        }
    }

    /// Unbinds a terminal; its messages are refused until it is bound again.
    pub async fn unbind_terminal(&self, scope: Scope, s: &str) -> Result<Terminal, TerminalError> {
        for _ in 0..CAS_ATTEMPTS {
            let (mut t, rev) = self.stored_terminal(scope, s).await?;
            let Some(b) = t.record.terminal.binding.take() else {
                return Ok(t.record.terminal);
            };
            let id = t.record.terminal.id;
            let mut compares = vec![Compare::ModRevision {
                key: terminal_key(id),
                expect: Some(rev),
            }];
            let mut ops = vec![TxnOp::Put {
                key: terminal_key(id),
                value: to_bytes(&t)?,
            }];
            self.unbind_ops(id, b.vm, &mut compares, &mut ops).await?;
            match self.store().txn(compares, ops).await {
                Ok(_) => return Ok(t.record.terminal),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Contended {
            what: format!("terminal {s}"),
        }
        .into())
    }

    /// Checks an operation message. The order matters: nothing about a terminal is
    /// revealed before its MAC verifies, and the sequence number is taken (by
    /// [`Control::perform_operation`]) only for a message that passed every other check.
    pub(crate) async fn check_operation(&self, raw: &[u8]) -> Result<Accepted, Refused> {
        self.check_operation_with(raw, None, None).await
    }

    /// [`Control::check_operation`], with a session's cache of its terminal's MAC key
    /// and binding: read from the store for the first message (and again after the
    /// terminal's record or its VM's changed), not for every message; and the session's
    /// terminal, once it has one, for a header that leaves it out ([`SentHeader`]).
    pub(crate) async fn check_operation_with(
        &self,
        raw: &[u8],
        cache: Option<&mut Option<CachedTerminal>>,
        session: Option<TerminalId>,
    ) -> Result<Accepted, Refused> {
        if raw.len() > MAX_OPERATION_MESSAGE {
            return Err(Refused::TooLarge { len: raw.len() });
        }
        let msg: Message<'_> =
            serde_json::from_slice(raw).map_err(|e| Refused::Malformed(e.to_string()))?;
        let body = msg.body.get().as_bytes();
        let ours = self.server_id().await?;
        let sent = msg.header;
        let (server, terminal) = match (sent.server, sent.terminal, session) {
            (Some(server), Some(terminal), _) => (server, terminal),
            (None, None, Some(terminal)) => (ours.clone(), terminal),
            (None, None, None) => {
                return Err(Refused::Malformed(
                    "header: server and terminal are missing (only a session's messages \
                     after its first accepted one may leave them out)"
                        .into(),
                ))
            }
            (None, Some(_), _) => {
                return Err(Refused::Malformed(
                    "header: terminal without server (name both, or neither on a session)".into(),
                ))
            }
            (Some(_), None, _) => {
                return Err(Refused::Malformed(
                    "header: server without terminal (name both, or neither on a session)".into(),
                ))
            }
        };
        let h = &OperationHeader {
            server,
            terminal,
            seq: sent.seq,
            timestamp: sent.timestamp,
            mac: sent.mac,
        };
        if h.server != ours {
            return Err(Refused::WrongServer {
                got: h.server.clone(),
                ours,
            });
        }
        let fresh;
        let view = match cache {
            Some(slot) => {
                let usable = slot
                    .as_ref()
                    .is_some_and(|c| c.view.id == h.terminal && !c.stale());
                if !usable {
                    *slot = Some(self.cache_terminal(h.terminal).await?);
                }
                match slot.as_ref() {
                    Some(c) => &c.view,
                    None => return Err(Refused::UnknownTerminal(h.terminal)),
                }
            }
            None => {
                fresh = self.terminal_view(h.terminal).await?;
                &fresh
            }
        };
        let expect = message_mac(&view.secret, h, body);
        if !constant_time_eq(expect.as_bytes(), h.mac.as_bytes()) {
            return Err(Refused::BadMac);
        }
        let received = now_ms();
        let skew_ms = received.abs_diff(h.timestamp);
        if skew_ms > MAX_CLOCK_SKEW_MS {
            return Err(Refused::Stale { skew_ms });
        }
        let body: Body =
            serde_json::from_slice(body).map_err(|e| Refused::BadOperation(e.to_string()))?;
        let (vm, host) = match &view.binding {
            None => return Err(Refused::Unbound(view.id)),
            Some((vm, None)) => {
                return Err(Refused::VmGone {
                    terminal: view.id,
                    vm: *vm,
                })
            }
            Some((vm, Some(host))) => (*vm, host.clone()),
        };
        self.terminals()
            .take_token(view.id)
            .map_err(|retry_after_ms| Refused::RateLimited {
                terminal: view.id,
                retry_after_ms,
            })?;
        let accepted = Accepted {
            terminal: view.id,
            tenant: view.tenant,
            vm,
            // Where the VM ran when the view was read: the transaction that records the
            // operation reads the VM again and sends it where the VM is then.
            host,
            seq: h.seq,
            op: body.operation,
            received,
        };
        Ok(accepted)
    }

    /// What checking a message of terminal `id` needs, from the store: its MAC key, its
    /// tenant, and its binding with the VM's host (`None`: the VM is gone). An unknown
    /// terminal and a secret that does not open are the same refusal.
    async fn terminal_view(&self, id: TerminalId) -> Result<TerminalView, Refused> {
        let Some((stored, _)) = get_json::<StoredTerminal>(self.store(), &terminal_key(id)).await?
        else {
            return Err(Refused::UnknownTerminal(id));
        };
        let secret = self
            .terminals()
            .secrets
            .get()
            .and_then(|s| s.open(id, &stored.record.secret_sealed))
            .ok_or(Refused::UnknownTerminal(id))?;
        let term = &stored.record.terminal;
        let binding = match &term.binding {
            None => None,
            Some(b) => Some((
                b.vm,
                get_json::<Vm>(self.store(), &keys::vm(b.vm))
                    .await?
                    .map(|(vm, _)| vm.host),
            )),
        };
        Ok(TerminalView {
            id,
            tenant: term.tenant,
            secret,
            sealed: stored.record.secret_sealed.clone(),
            binding,
        })
    }

    /// [`Control::terminal_view`] for a session, watched: the watches on the terminal's
    /// record and its VM's start before the reads, so no change slips between them, and
    /// any change (a new binding, a deleted terminal, the VM moved or deleted) makes the
    /// session read again before its next message.
    async fn cache_terminal(&self, id: TerminalId) -> Result<CachedTerminal, Refused> {
        let stale = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut on_terminal = self.store_arc().watch(&terminal_key(id)).await?;
        let view = self.terminal_view(id).await?;
        let mut on_vm = match &view.binding {
            Some((vm, _)) => Some(self.store_arc().watch(&keys::vm(*vm)).await?),
            None => None,
        };
        // The VM's record may have changed between the view's read and its watch: read
        // it once more under the watch.
        let view = match &view.binding {
            Some(_) => self.terminal_view(id).await?,
            None => view,
        };
        let flag = stale.clone();
        let (sealed, bound) = (
            view.sealed.clone(),
            view.binding.as_ref().map(|(vm, _)| *vm),
        );
        let watcher = tokio::spawn(async move {
            let vm_changed = async {
                match on_vm.as_mut() {
                    Some(w) => {
                        w.next().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            // The terminal's record changes with every message (its replay window): only
            // a new secret or binding, or its deletion, makes the view stale.
            let terminal_changed = async {
                while let Some(Ok(WatchEvent::Put(kv))) = on_terminal.next().await {
                    match crate::records::decode::<StoredTerminal>(&kv) {
                        Ok(t)
                            if t.record.secret_sealed == sealed
                                && t.record.terminal.binding.as_ref().map(|b| b.vm) == bound => {}
                        _ => return,
                    }
                }
            };
            tokio::select! {
                () = terminal_changed => {}
                () = vm_changed => {}
            }
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        Ok(CachedTerminal {
            view,
            stale,
            watcher,
        })
    }

    /// Checks a message (`check_operation`), takes its sequence number and
    /// records the operation in one transaction, has the VM's host perform it (its agent
    /// gets it pushed), and answers with the record once the host answered, or as it
    /// stands (`sent`, `held`) after [`DISPATCH_WAIT`]. `power on` is the server's own: it
    /// sets the VM's desired state.
    pub async fn perform_operation(&self, raw: &[u8]) -> Result<PerformedOperation, Refused> {
        let r = async {
            let a = self.check_operation(raw).await?;
            self.dispatch(a).await
        }
        .await;
        match r {
            Ok(pending) => Ok(pending.answer(DISPATCH_WAIT).await),
            Err(e) => {
                self.refused(&e);
                Err(e)
            }
        }
    }

    /// Counts and logs a refusal.
    pub(crate) fn refused(&self, e: &Refused) {
        self.terminals().count_refusal(e);
        tracing::info!(reason = e.reason(), error = %e, "terminal operation refused");
    }

    /// Takes `a`'s sequence number and records it; what comes back brings the host's
    /// answer.
    pub(crate) async fn dispatch(&self, a: Accepted) -> Result<Pending, Refused> {
        let mut all = self.dispatch_all(vec![a]).await?;
        all.pop().unwrap_or_else(|| {
            Err(ControlError::Invariant("one operation dispatched, no result".into()).into())
        })
    }

    /// Takes the sequence numbers of `batch` — operations of **one terminal**, in the
    /// order they came — and records them in one transaction (a session sends many while
    /// one commits: they share it). One result per operation, in order; `Err` when the
    /// whole batch failed (the store, a VM gone).
    pub(crate) async fn dispatch_all(
        &self,
        batch: Vec<Accepted>,
    ) -> Result<Vec<Result<Pending, Refused>>, Refused> {
        let mut records = Vec::with_capacity(batch.len());
        let mut watches = Vec::with_capacity(batch.len());
        for a in &batch {
            records.push(PerformedOperation {
                terminal: a.terminal,
                vm: a.vm,
                host: a.host.clone(),
                seq: a.seq,
                op: a.op.clone(),
                received: a.received,
                performed: None,
                outcome: OperationOutcome::Sent,
                detail: None,
                screenshot: None,
            });
            // Watching before the write: the host's answer cannot slip past. (The
            // server's own operations are not waited for: their number is only known
            // once written.)
            watches.push(if a.seq < SERVER_SEQ_BASE {
                Some(self.store_arc().watch(&op_key(a.terminal, a.seq)).await?)
            } else {
                None
            });
        }
        let taken = self.take_seqs_and_record(&batch, &mut records).await?;
        let mut out = Vec::with_capacity(batch.len());
        let mut trim = false;
        for (((a, record), answers), refused) in
            batch.into_iter().zip(records).zip(watches).zip(taken)
        {
            if let Some(r) = refused {
                out.push(Err(r));
                continue;
            }
            trim |= record.seq.is_multiple_of(64);
            if matches!(
                a.op,
                Operation::Power {
                    action: PowerAction::On
                }
            ) {
                out.push(self.power_on(&a, &record).await);
                continue;
            }
            let early = (answers.is_some() && record.outcome == OperationOutcome::Sent)
                .then(|| self.terminals().wait_early(&record));
            out.push(Ok(Pending {
                record,
                answers,
                early,
                store: self.store_arc(),
            }));
        }
        let terminal = out.iter().flatten().map(|p| p.record.terminal).next();
        if let (true, Some(t)) = (trim, terminal) {
            self.trim_operations(t).await;
        }
        Ok(out)
    }

    /// `power on` is the server's own: it sets the VM's desired state to running.
    async fn power_on(
        &self,
        a: &Accepted,
        record: &PerformedOperation,
    ) -> Result<Pending, Refused> {
        let r = self
            .set_desired(
                Scope::Tenant(a.tenant),
                &a.vm.to_string(),
                model::DesiredState::Running,
            )
            .await;
        let result = OperationResult {
            host: record.host.to_string(),
            outcome: if r.is_ok() {
                OperationOutcome::Performed
            } else {
                OperationOutcome::Failed
            },
            detail: r.err().map(|e| model::error_chain(&e)),
            screenshot: None,
        };
        let done = self
            .answer_operation(a.terminal, record.seq, result)
            .await?;
        Ok(Pending {
            record: done,
            answers: None,
            early: None,
            store: self.store_arc(),
        })
    }

    /// Takes the sequence numbers in the terminal's stored replay window and writes the
    /// operations' records, in one transaction: every server sharing the store, and this
    /// one after a restart, refuses a number again, and no operation is taken without
    /// its record (which is what reaches the host). A number already taken refuses its
    /// operation only (`Some` at its place). Server-originated operations (`seq` from
    /// [`SERVER_SEQ_BASE`]) take their number from the terminal's own counter instead.
    async fn take_seqs_and_record(
        &self,
        batch: &[Accepted],
        records: &mut [PerformedOperation],
    ) -> Result<Vec<Option<Refused>>, Refused> {
        let Some(first) = batch.first() else {
            return Ok(Vec::new());
        };
        let terminal = first.terminal;
        if batch.iter().any(|a| a.terminal != terminal) {
            return Err(ControlError::Invariant("a batch of several terminals".into()).into());
        }
        let tkey = terminal_key(terminal);
        for _ in 0..CAS_ATTEMPTS {
            let Some((mut stored, rev)) = get_json::<StoredTerminal>(self.store(), &tkey).await?
            else {
                return Err(Refused::UnknownTerminal(terminal));
            };
            let mut refused = Vec::with_capacity(batch.len());
            let mut routes: Vec<(VmId, VmRoute)> = Vec::new();
            let mut writes = Vec::new();
            let mut compares = vec![Compare::ModRevision {
                key: tkey.clone(),
                expect: Some(rev),
            }];
            let bound = stored.record.terminal.binding.as_ref().map(|b| b.vm);
            for (a, record) in batch.iter().zip(records.iter_mut()) {
                if a.seq < SERVER_SEQ_BASE {
                    // Checked against the binding as it was (a session's is cached until
                    // it changes): one changed since acts on nothing. (The server's own
                    // releases go where their presses went, whatever the binding.)
                    match bound {
                        Some(vm) if vm == a.vm => {}
                        None => {
                            refused.push(Some(Refused::Unbound(terminal)));
                            continue;
                        }
                        Some(vm) => {
                            refused.push(Some(Refused::Batch {
                                reason: "unbound",
                                detail: format!(
                                    "terminal {terminal} was bound to VM {vm} instead of {} while the message was checked; send it again",
                                    a.vm
                                ),
                            }));
                            continue;
                        }
                    }
                    if let Err(e) = stored.window.take(a.seq) {
                        refused.push(Some(Refused::Replay(e)));
                        continue;
                    }
                } else {
                    stored.server_seq += 1;
                    record.seq = SERVER_SEQ_BASE.saturating_add(stored.server_seq);
                }
                let key = op_key(terminal, record.seq);
                let route = match routes.iter_mut().find(|(vm, _)| *vm == a.vm) {
                    Some((_, r)) => r,
                    None => {
                        let r = self.route_vm(terminal, a.vm).await?;
                        compares.extend(r.compares.iter().cloned());
                        routes.push((a.vm, r));
                        &mut routes.last_mut().expect("just pushed").1
                    }
                };
                record.host = route.host.clone();
                record.outcome = match &mut route.held {
                    Some((_, list)) => {
                        list.keys.push(key.clone());
                        OperationOutcome::Held
                    }
                    None => OperationOutcome::Sent,
                };
                writes.push(TxnOp::Put {
                    key,
                    value: to_bytes(&*record)?,
                });
                refused.push(None);
            }
            if writes.is_empty() {
                return Ok(refused);
            }
            writes.push(TxnOp::Put {
                key: tkey.clone(),
                value: to_bytes(&stored)?,
            });
            for (_, r) in &routes {
                if let Some((hkey, list)) = &r.held {
                    writes.push(TxnOp::Put {
                        key: hkey.clone(),
                        value: to_bytes(list)?,
                    });
                }
            }
            match self.store().txn(compares, writes).await {
                Ok(_) => return Ok(refused),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Contended {
            what: format!("terminal {terminal}"),
        }
        .into())
    }

    /// Where operations for `vm` go now: its host, or held while its live migration
    /// moves memory (the source may already have sent the state an operation would
    /// change). The compares make the records' transaction lose to any change of the VM,
    /// of its migration or of its held list since they were read, so that no operation is
    /// sent to a host the VM just left nor held past the release.
    async fn route_vm(&self, terminal: TerminalId, vm_id: VmId) -> Result<VmRoute, Refused> {
        let Some((vm, vm_rev)) = get_json::<Vm>(self.store(), &keys::vm(vm_id)).await? else {
            return Err(Refused::VmGone {
                terminal,
                vm: vm_id,
            });
        };
        let mut compares = vec![Compare::ModRevision {
            key: keys::vm(vm_id),
            expect: Some(vm_rev),
        }];
        let mut held = None;
        if let Some(mid) = vm.migration {
            let mkey = keys::migration(mid);
            let m = get_json::<model::Migration>(self.store(), &mkey).await?;
            compares.push(Compare::ModRevision {
                key: mkey,
                expect: m.as_ref().map(|(_, r)| *r),
            });
            // Held from the migration's start, not only while memory moves: an operation
            // sent to the source just before it moves the memory would reach its VM task
            // after the guest left (the task is busy moving it) and fail.
            let moving = m.is_some_and(|(m, _)| {
                matches!(
                    m.state,
                    model::MigrationState::Pending
                        | model::MigrationState::Ready
                        | model::MigrationState::Migrating
                )
            });
            if moving {
                let hkey = held_key(vm_id);
                let list = get_json::<HeldOperations>(self.store(), &hkey).await?;
                compares.push(Compare::ModRevision {
                    key: hkey.clone(),
                    expect: list.as_ref().map(|(_, r)| *r),
                });
                held = Some((hkey, list.map(|(l, _)| l).unwrap_or_default()));
            }
        }
        Ok(VmRoute {
            host: vm.host,
            compares,
            held,
        })
    }

    /// The writes that send `vm`'s held operations to `host` (where the VM runs once its
    /// migration switched over or failed), in the order they came, and the compare that
    /// makes the caller's transaction lose to an operation held meanwhile. Nothing when
    /// none is held.
    pub(crate) async fn release_held(
        &self,
        vm: VmId,
        host: &Name,
    ) -> Result<(Vec<Compare>, Vec<TxnOp>), ControlError> {
        self.settle_held(vm, Settle::SendTo(host)).await
    }

    /// The writes that answer `vm`'s held operations `failed` because the VM is being
    /// removed (no host will ever perform them, and a record left `held` would wait
    /// forever), and the compare that makes the removal lose to an operation held
    /// meanwhile. Nothing when none is held.
    pub(crate) async fn fail_held(
        &self,
        vm: VmId,
    ) -> Result<(Vec<Compare>, Vec<TxnOp>), ControlError> {
        self.settle_held(
            vm,
            Settle::Fail("the VM was deleted before its migration ended"),
        )
        .await
    }

    async fn settle_held(
        &self,
        vm: VmId,
        how: Settle<'_>,
    ) -> Result<(Vec<Compare>, Vec<TxnOp>), ControlError> {
        let hkey = held_key(vm);
        let Some((list, rev)) = get_json::<HeldOperations>(self.store(), &hkey).await? else {
            return Ok((
                vec![Compare::ModRevision {
                    key: hkey,
                    expect: None,
                }],
                Vec::new(),
            ));
        };
        let mut writes = Vec::with_capacity(list.keys.len() + 1);
        for key in &list.keys {
            let Some((mut op, _)) = get_json::<PerformedOperation>(self.store(), key).await? else {
                continue; // trimmed from the log meanwhile
            };
            if op.outcome == OperationOutcome::Held {
                match how {
                    Settle::SendTo(host) => {
                        op.outcome = OperationOutcome::Sent;
                        op.host = host.clone();
                    }
                    Settle::Fail(why) => {
                        op.outcome = OperationOutcome::Failed;
                        op.detail = Some(why.to_owned());
                        op.performed = Some(now_ms());
                    }
                }
                writes.push(TxnOp::Put {
                    key: key.clone(),
                    value: to_bytes(&op)?,
                });
            }
        }
        writes.push(TxnOp::Delete { key: hkey.clone() });
        Ok((
            vec![Compare::ModRevision {
                key: hkey,
                expect: Some(rev),
            }],
            writes,
        ))
    }

    /// Records the host's answer for operation `seq` of terminal `t`. Only the host the
    /// operation was sent to may answer; a second identical answer is accepted.
    pub async fn answer_operation(
        &self,
        t: TerminalId,
        seq: u64,
        result: OperationResult,
    ) -> Result<PerformedOperation, ControlError> {
        let key = op_key(t, seq);
        // The reply waiting on this server gets the answer now, not after the commit (an
        // fsync): the host performed the operation, which is what the terminal waits to
        // know. The commit follows; should this server die before it ends, the host's
        // answer failed and the host sends it again (agent `terminal::answer`).
        let performed = now_ms();
        self.terminals().answer_early(t, seq, &result, performed);
        let r = crate::records::update_cas(
            self.store(),
            &key,
            || format!("terminal operation {t}/{seq}"),
            || ControlError::NotFound {
                kind: "terminal operation",
                id: format!("{t}/{seq}"),
            },
            |r: &mut PerformedOperation| {
                if r.host.as_str() != result.host {
                    return Err(ControlError::Taken(format!(
                        "host: operation {seq} of terminal {t} was sent to {}, not {}",
                        r.host, result.host
                    )));
                }
                if r.outcome != OperationOutcome::Sent {
                    return Ok(());
                }
                r.outcome = result.outcome;
                r.detail = result.detail.clone();
                r.screenshot = result.screenshot.clone();
                r.performed = Some(performed);
                Ok(())
            },
        )
        .await;
        self.terminals().answer_committed(t, seq);
        r
    }

    /// Records several hosts' answers ([`Control::answer_operation`] each, concurrently:
    /// the store commits them together). One result per answer, in order.
    pub async fn answer_operations(
        &self,
        answers: Vec<model::terminals::OperationAnswer>,
    ) -> Vec<Result<PerformedOperation, ControlError>> {
        futures_util::future::join_all(
            answers
                .into_iter()
                .map(|a| self.answer_operation(a.terminal, a.seq, a.result)),
        )
        .await
    }

    /// Removes a terminal's oldest operation records beyond [`LOG_PER_TERMINAL`].
    async fn trim_operations(&self, t: TerminalId) {
        let prefix = format!("{TERMINAL_OPS}{t}/");
        let Ok(all) = self.store().list(&prefix).await else {
            return;
        };
        for kv in all.iter().take(all.len().saturating_sub(LOG_PER_TERMINAL)) {
            if let Err(e) = self.store().delete(&kv.key).await {
                tracing::warn!(error = %e, "cannot trim a terminal's operations");
                return;
            }
        }
    }

    /// A terminal's operations (the last [`LOG_PER_TERMINAL`] or so), oldest first.
    pub async fn terminal_operations(
        &self,
        scope: Scope,
        s: &str,
    ) -> Result<Vec<PerformedOperation>, ControlError> {
        let t = self.terminal(scope, s).await?;
        Ok(
            list_json::<PerformedOperation>(self.store(), &format!("{TERMINAL_OPS}{}/", t.id))
                .await?
                .into_iter()
                .map(|(r, _)| self.terminals().overlay(r))
                .collect(),
        )
    }

    /// How many operation messages this server refused, by reason.
    pub fn terminal_refusals(&self) -> BTreeMap<&'static str, u64> {
        self.terminals()
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Compares without stopping at the first difference, so that the time a refusal takes
/// does not tell how much of a forged MAC was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the store keeps per terminal: the record and its replay window.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredTerminal {
    #[serde(flatten)]
    record: TerminalRecord,
    #[serde(default)]
    window: ReplayWindow,
    /// The last of the server's own sequence numbers taken for this terminal, above
    /// [`SERVER_SEQ_BASE`].
    #[serde(default)]
    server_seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_for_its_terminal_and_key() {
        let k = SecretsKey::new(&[7u8; 32]).unwrap();
        let (a, b) = (TerminalId::new_random(), TerminalId::new_random());
        let sealed = k.seal(a, b"vterm_secret").unwrap();
        assert!(!sealed.contains("secret"));
        assert_eq!(k.open(a, &sealed).as_deref(), Some(&b"vterm_secret"[..]));
        assert_eq!(k.open(b, &sealed), None, "another record");
        let other = SecretsKey::new(&[8u8; 32]).unwrap();
        assert_eq!(other.open(a, &sealed), None, "another key");
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(k.open(a, std::str::from_utf8(&tampered).unwrap()), None);
        assert!(SecretsKey::new(&[0u8; 16]).is_err());
    }

    #[test]
    fn hex_round_trips_and_refuses_junk() {
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])),
            Some(vec![0, 1, 0xab, 0xff])
        );
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert!(constant_time_eq(b"ab", b"ab"));
        assert!(!constant_time_eq(b"ab", b"ac"));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
