//! The writer: one task per log owns its Merkle tree, signs entries and
//! checkpoints, and commits each batch of appends with the new signed head in one
//! store transaction guarded by a compare on the head's revision. A write that
//! returned is durable (the store's contract), so an acknowledged entry is never
//! lost; two servers appending to one log through etcd are totally ordered by that
//! compare: the loser reads the winner's entries and retries on top of them.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use store::{Compare, Revision, Store, StoreError, TxnOp};
use tokio::sync::{mpsc, oneshot};

use crate::hash::{checkpoint_message, entry_message, hash_from_hex, leaf_hash, to_hex, Hash};
use crate::sign::Signer;
use crate::tree::{MerkleTree, ProofRequestError};

/// Where a log lives and what it is called.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Store prefix of every key of the log, ending in `/`.
    pub prefix: String,
    /// The log's name, in every checkpoint and entry signature.
    pub origin: String,
    /// Most entries committed in one transaction. The writer also keeps each batch
    /// within the store's [`Store::max_txn_ops`] (a batch adds two checkpoint keys to
    /// its entries: 126 entries on etcd's default).
    pub max_batch: usize,
}

impl LogConfig {
    /// A log at `prefix` named `origin`, with batches of up to 1,024 entries (about
    /// 700 KiB of association entries: one commit, one checkpoint signature).
    pub fn new(prefix: impl Into<String>, origin: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            origin: origin.into(),
            max_batch: 1024,
        }
    }

    /// Entries per batch on `store`: at most `max_batch`, and within its transaction limit.
    fn batch_limit(&self, store: &dyn Store) -> usize {
        self.max_batch
            .min(store.max_txn_ops().saturating_sub(2))
            .max(1)
    }
}

/// Store keys of a log (the verifier parses the same layout on its own).
pub mod keys {
    /// The latest signed checkpoint.
    pub fn head(prefix: &str) -> String {
        format!("{prefix}head")
    }
    /// Entry `index`.
    pub fn entry(prefix: &str, index: u64) -> String {
        format!("{prefix}entries/{index:020}")
    }
    /// The checkpoint published at `size`.
    pub fn checkpoint(prefix: &str, size: u64) -> String {
        format!("{prefix}checkpoints/{size:020}")
    }
    /// A signing key's announcement (hex public key).
    pub fn key(prefix: &str, id: &str) -> String {
        format!("{prefix}keys/{id}")
    }
}

/// A signed checkpoint as stored: the text `origin\nsize\nroot-hex\nprevious-size\n`,
/// the key id and the Ed25519 signature over the text. The previous size chains
/// every published checkpoint to the one before, so none can be dropped unseen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCheckpoint {
    /// The checkpoint text.
    pub text: String,
    /// Id of the signing key.
    pub key_id: String,
    /// Hex signature over the domain-tagged text.
    pub signature: String,
}

/// A checkpoint the writer committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Leaves in the tree.
    pub size: u64,
    /// The tree's root.
    pub root: Hash,
    /// The signed form, as stored.
    pub signed: SignedCheckpoint,
}

/// An acknowledged append: durable once returned.
#[derive(Debug, Clone)]
pub struct Appended {
    /// The entry's index.
    pub index: u64,
    /// The checkpoint that first includes it.
    pub checkpoint: Checkpoint,
}

/// Why the log could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The store failed (an append's outcome is then unknown: it was not acknowledged).
    #[error("ledger store operation failed")]
    Store(#[from] StoreError),
    /// What the store holds does not hash to its own head: the writer refuses to
    /// extend a log it cannot vouch for.
    #[error("ledger at {prefix} is inconsistent: {why}")]
    Corrupt {
        /// The log's prefix.
        prefix: String,
        /// What does not add up.
        why: String,
    },
    /// A proof was asked for sizes the log does not have.
    #[error(transparent)]
    Proof(#[from] ProofRequestError),
    /// A batch could not be committed: none of its entries is acknowledged (the
    /// first to fail carries the cause; its batch-mates share it).
    #[error("ledger append not acknowledged")]
    Unacknowledged(#[source] Arc<LogError>),
    /// The log's task has stopped (shutdown).
    #[error("ledger writer stopped")]
    Stopped,
}

enum Cmd {
    Append {
        /// The entry as stored, signed by the caller's task (so that the writer task
        /// spends its time on commits, and signatures run on every core).
        stored: Bytes,
        reply: oneshot::Sender<Result<Appended, LogError>>,
    },
    Head {
        reply: oneshot::Sender<Result<Checkpoint, LogError>>,
    },
    Inclusion {
        index: u64,
        size: u64,
        reply: oneshot::Sender<Result<Vec<Hash>, LogError>>,
    },
    Consistency {
        from: u64,
        to: u64,
        reply: oneshot::Sender<Result<Vec<Hash>, LogError>>,
    },
    RootAt {
        size: u64,
        reply: oneshot::Sender<Result<Hash, LogError>>,
    },
}

/// A handle on a log's writer task. Cheap to clone; the task ends when the last
/// handle is dropped.
#[derive(Clone)]
pub struct TransLog {
    tx: mpsc::Sender<Cmd>,
    cfg: Arc<LogConfig>,
    signer: Arc<Signer>,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for TransLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransLog")
            .field("prefix", &self.cfg.prefix)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

impl TransLog {
    /// Opens the log at `cfg.prefix` (empty or not), checks that its entries hash
    /// to its head, announces the signer's public key, and starts the writer task.
    pub async fn open(
        store: Arc<dyn Store>,
        cfg: LogConfig,
        signer: Signer,
    ) -> Result<Self, LogError> {
        let signer = Arc::new(signer);
        let mut w = Writer {
            store: store.clone(),
            batch: cfg.batch_limit(store.as_ref()),
            cfg: cfg.clone(),
            signer: signer.clone(),
            tree: MerkleTree::new(),
            head: None,
            head_rev: None,
        };
        w.load().await?;
        let announce = keys::key(&cfg.prefix, w.signer.id());
        match store
            .cas(&announce, None, Bytes::from(to_hex(w.signer.public_key())))
            .await
        {
            Ok(_) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(w.run(rx));
        Ok(Self {
            tx,
            cfg: Arc::new(cfg),
            signer,
            store,
        })
    }

    /// The log's configuration.
    pub fn config(&self) -> &LogConfig {
        &self.cfg
    }

    async fn ask<T>(
        &self,
        cmd: impl FnOnce(oneshot::Sender<Result<T, LogError>>) -> Cmd,
    ) -> Result<T, LogError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(cmd(reply))
            .await
            .map_err(|_| LogError::Stopped)?;
        rx.await.map_err(|_| LogError::Stopped)?
    }

    /// Appends `body`; returns once it is durable in the store under a signed head.
    pub async fn append(&self, body: Vec<u8>) -> Result<Appended, LogError> {
        let stored = entry_bytes(&self.signer, &self.cfg.origin, &body);
        self.ask(|reply| Cmd::Append { stored, reply }).await
    }

    /// The latest checkpoint (after reading what other servers appended).
    pub async fn head(&self) -> Result<Checkpoint, LogError> {
        self.ask(|reply| Cmd::Head { reply }).await
    }

    /// The audit path of entry `index` in the tree of `size` entries.
    pub async fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, LogError> {
        self.ask(|reply| Cmd::Inclusion { index, size, reply })
            .await
    }

    /// The proof that the tree of `from` entries is a prefix of the tree of `to`.
    pub async fn consistency_proof(&self, from: u64, to: u64) -> Result<Vec<Hash>, LogError> {
        self.ask(|reply| Cmd::Consistency { from, to, reply }).await
    }

    /// The root of the tree of the first `size` entries.
    pub async fn root_at(&self, size: u64) -> Result<Hash, LogError> {
        self.ask(|reply| Cmd::RootAt { size, reply }).await
    }

    /// The stored form of entry `index` (`key-id\nsignature\nbody`), if it exists.
    pub async fn entry(&self, index: u64) -> Result<Option<Bytes>, LogError> {
        Ok(self
            .store
            .get(&keys::entry(&self.cfg.prefix, index))
            .await?
            .map(|kv| kv.value))
    }

    /// Every raw key of the log, for a verifier to audit on its own.
    pub async fn raw(&self) -> Result<Vec<(String, Vec<u8>)>, LogError> {
        Ok(self
            .store
            .list(&self.cfg.prefix)
            .await?
            .into_iter()
            .map(|kv| (kv.key, kv.value.to_vec()))
            .collect())
    }
}

/// The body of an entry as stored: `key-id\nsignature-hex\nbody`.
fn entry_bytes(signer: &Signer, origin: &str, body: &[u8]) -> Bytes {
    let sig = signer.sign(&entry_message(origin, body));
    let mut v = Vec::with_capacity(body.len() + 150);
    v.extend_from_slice(signer.id().as_bytes());
    v.push(b'\n');
    v.extend_from_slice(to_hex(&sig).as_bytes());
    v.push(b'\n');
    v.extend_from_slice(body);
    Bytes::from(v)
}

struct Writer {
    store: Arc<dyn Store>,
    cfg: LogConfig,
    /// Entries per commit ([`LogConfig::batch_limit`]).
    batch: usize,
    signer: Arc<Signer>,
    tree: MerkleTree,
    head: Option<Checkpoint>,
    /// Revision of the head key as last read or written (`None`: absent).
    head_rev: Option<Revision>,
}

impl Writer {
    fn corrupt(&self, why: String) -> LogError {
        LogError::Corrupt {
            prefix: self.cfg.prefix.clone(),
            why,
        }
    }

    fn parse_head(&self, value: &[u8]) -> Result<(u64, Hash, SignedCheckpoint), LogError> {
        let signed: SignedCheckpoint = serde_json::from_slice(value)
            .map_err(|e| self.corrupt(format!("head is not a checkpoint: {e}")))?;
        let mut lines = signed.text.split('\n');
        let (Some(_origin), Some(size), Some(root)) = (lines.next(), lines.next(), lines.next())
        else {
            return Err(self.corrupt("head text is not three lines".into()));
        };
        let size = size
            .parse()
            .map_err(|_| self.corrupt("head size is not a number".into()))?;
        let root =
            hash_from_hex(root).ok_or_else(|| self.corrupt("head root is not hex".into()))?;
        Ok((size, root, signed))
    }

    /// Reads the whole log into the tree.
    async fn load(&mut self) -> Result<(), LogError> {
        let head_key = keys::head(&self.cfg.prefix);
        let Some(kv) = self.store.get(&head_key).await? else {
            return Ok(());
        };
        let (size, root, signed) = self.parse_head(&kv.value)?;
        let entries = self
            .store
            .list(&format!("{}entries/", self.cfg.prefix))
            .await?;
        for (i, kv) in entries.iter().enumerate() {
            if i as u64 >= size {
                break;
            }
            if kv.key != keys::entry(&self.cfg.prefix, i as u64) {
                return Err(self.corrupt(format!("entry {i} is missing")));
            }
            self.tree.push(leaf_hash(&kv.value));
        }
        self.adopt(size, root, signed, kv.mod_revision)
    }

    fn adopt(
        &mut self,
        size: u64,
        root: Hash,
        signed: SignedCheckpoint,
        rev: Revision,
    ) -> Result<(), LogError> {
        if self.tree.len() != size || self.tree.root() != root {
            return Err(self.corrupt(format!(
                "{} entries do not hash to the head's root at size {size}",
                self.tree.len()
            )));
        }
        self.head = Some(Checkpoint { size, root, signed });
        self.head_rev = Some(rev);
        Ok(())
    }

    /// Catches up with entries another server appended since our last look.
    async fn sync(&mut self) -> Result<(), LogError> {
        let kv = self.store.get(&keys::head(&self.cfg.prefix)).await?;
        let Some(kv) = kv else {
            if self.head_rev.is_some() {
                return Err(self.corrupt("the head checkpoint disappeared".into()));
            }
            return Ok(());
        };
        if Some(kv.mod_revision) == self.head_rev {
            return Ok(());
        }
        let (size, root, signed) = self.parse_head(&kv.value)?;
        if size < self.tree.len() {
            return Err(self.corrupt(format!(
                "the head went back from size {} to {size}",
                self.tree.len()
            )));
        }
        for i in self.tree.len()..size {
            let entry = self
                .store
                .get(&keys::entry(&self.cfg.prefix, i))
                .await?
                .ok_or_else(|| self.corrupt(format!("entry {i} is missing")))?;
            self.tree.push(leaf_hash(&entry.value));
        }
        self.adopt(size, root, signed, kv.mod_revision)
    }

    fn sign_checkpoint(&self, size: u64, root: &Hash) -> SignedCheckpoint {
        let prev = self.head.as_ref().map_or(0, |h| h.size);
        let text = format!("{}\n{size}\n{}\n{prev}\n", self.cfg.origin, to_hex(root));
        let signature = to_hex(&self.signer.sign(&checkpoint_message(&text)));
        SignedCheckpoint {
            text,
            key_id: self.signer.id().to_owned(),
            signature,
        }
    }

    /// Commits `bodies` as the next entries; retries on top of another server's
    /// appends when the head moved.
    async fn commit(&mut self, bodies: &[Bytes]) -> Result<(u64, Checkpoint), LogError> {
        loop {
            let start = self.tree.len();
            let mut ops = Vec::with_capacity(bodies.len() + 2);
            for (i, stored) in bodies.iter().enumerate() {
                self.tree.push(leaf_hash(stored));
                ops.push(TxnOp::Put {
                    key: keys::entry(&self.cfg.prefix, start + i as u64),
                    value: stored.clone(),
                });
            }
            let size = self.tree.len();
            let root = self.tree.root();
            let signed = self.sign_checkpoint(size, &root);
            let value = Bytes::from(serde_json::to_vec(&signed).expect("a checkpoint serializes"));
            ops.push(TxnOp::Put {
                key: keys::head(&self.cfg.prefix),
                value: value.clone(),
            });
            ops.push(TxnOp::Put {
                key: keys::checkpoint(&self.cfg.prefix, size),
                value,
            });
            let compare = Compare::ModRevision {
                key: keys::head(&self.cfg.prefix),
                expect: self.head_rev,
            };
            match self.store.txn(vec![compare], ops).await {
                Ok(rev) => {
                    let cp = Checkpoint { size, root, signed };
                    self.head = Some(cp.clone());
                    self.head_rev = Some(rev);
                    return Ok((start, cp));
                }
                Err(StoreError::Conflict { .. }) => {
                    self.tree.truncate(start);
                    tracing::debug!(prefix = %self.cfg.prefix, "ledger head moved; catching up");
                    self.sync().await?;
                }
                Err(e) => {
                    // Outcome unknown (a lost answer may hide a commit): drop the
                    // batch from the tree; the next commit's compare fails if it
                    // did land, and `sync` then reads it back.
                    self.tree.truncate(start);
                    return Err(e.into());
                }
            }
        }
    }

    fn head_or_empty(&self) -> Checkpoint {
        self.head.clone().unwrap_or_else(|| {
            let root = self.tree.root();
            Checkpoint {
                size: 0,
                root,
                signed: self.sign_checkpoint(0, &root),
            }
        })
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut next: Option<Cmd> = None;
        loop {
            let cmd = match next.take() {
                Some(c) => c,
                None => match rx.recv().await {
                    Some(c) => c,
                    None => return,
                },
            };
            match cmd {
                Cmd::Append { stored, reply } => {
                    let mut bodies = vec![stored];
                    let mut replies = vec![reply];
                    while replies.len() < self.batch {
                        match rx.try_recv() {
                            Ok(Cmd::Append { stored, reply }) => {
                                bodies.push(stored);
                                replies.push(reply);
                            }
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    match self.commit(&bodies).await {
                        Ok((start, cp)) => {
                            for (i, r) in replies.into_iter().enumerate() {
                                let _ = r.send(Ok(Appended {
                                    index: start + i as u64,
                                    checkpoint: cp.clone(),
                                }));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(prefix = %self.cfg.prefix, error = %e, "ledger append failed");
                            let cause = Arc::new(e);
                            for r in replies {
                                let _ = r.send(Err(LogError::Unacknowledged(cause.clone())));
                            }
                        }
                    }
                }
                Cmd::Head { reply } => {
                    let r = self.sync().await.map(|()| self.head_or_empty());
                    let _ = reply.send(r);
                }
                Cmd::Inclusion { index, size, reply } => {
                    let r = match self.sync().await {
                        Ok(()) => self.tree.inclusion_proof(index, size).map_err(Into::into),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(r);
                }
                Cmd::RootAt { size, reply } => {
                    let r = match self.sync().await {
                        Ok(()) => self.tree.root_at(size).ok_or(LogError::Proof(
                            ProofRequestError::Consistency {
                                from: size,
                                to: size,
                                len: self.tree.len(),
                            },
                        )),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(r);
                }
                Cmd::Consistency { from, to, reply } => {
                    let r = match self.sync().await {
                        Ok(()) => self.tree.consistency_proof(from, to).map_err(Into::into),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(r);
                }
            }
        }
    }
}
