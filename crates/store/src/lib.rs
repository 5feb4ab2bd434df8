//! The state store contract: a small, etcd-shaped key-value API.
//!
//! Owns: the [`Store`] trait, its error type, the conformance suite
//! ([`suite`]) that every implementation must pass, and, with the `testing`
//! feature, an in-memory implementation for other crates' tests
//! (`testing::MemStore`).
//! Must not depend on: any backend (`redb`, `etcd-client`); those live in
//! `store-redb` and `store-etcd` so that the control plane compiles against
//! this trait alone.
//!
//! Semantics (modelled on etcd v3, which is the stricter of the two):
//! - Keys are UTF-8 strings such as `/vinfra/vms/<tenant>/<id>`; values are bytes.
//! - Every successful write gets a store-wide, strictly increasing [`Revision`].
//!   A key's `mod_revision` is the revision of its last write. A deleted and
//!   re-created key gets a new, larger revision.
//! - [`Store::cas`] writes only if the key's current `mod_revision` equals
//!   `expect` (`None`: only if the key does not exist).
//! - [`Store::txn`] applies all its operations atomically, or none if any
//!   compare fails.
//! - A write that returned `Ok` is durable: it survives `kill -9` of the
//!   process (redb: fsync'd commit; etcd: raft-committed).
//! - [`Store::campaign`] elects one leader per election name; the leader's
//!   [`Leadership`] carries a fencing compare for its writes (see [`election`]).
#![warn(missing_docs)]

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;

pub mod election;
pub mod suite;
#[cfg(feature = "testing")]
pub mod testing;

pub use election::{election_key, Leadership};

/// A store-wide revision number, strictly increasing with every write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub u64);

/// One key with its value and the revision of its last write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The full key.
    pub key: String,
    /// The stored bytes.
    pub value: Bytes,
    /// Revision of the write that produced this value.
    pub mod_revision: Revision,
}

/// A condition checked inside a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_revision` equals this (`None`: the key does not exist).
    ModRevision {
        /// Key to check.
        key: String,
        /// Expected revision, or `None` for "absent".
        expect: Option<Revision>,
    },
}

/// One write inside a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    /// Set `key` to `value`.
    Put {
        /// Key to write.
        key: String,
        /// New value.
        value: Bytes,
    },
    /// Remove `key` (no error if absent).
    Delete {
        /// Key to remove.
        key: String,
    },
}

/// A change seen by a watcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or updated.
    Put(KeyValue),
    /// The key was deleted at `revision`.
    Delete {
        /// The deleted key.
        key: String,
        /// Revision of the delete.
        revision: Revision,
    },
}

/// A stream of changes under a prefix, in revision order. Dropping it cancels the watch.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A compare-and-swap or transaction compare did not hold.
    #[error("revision conflict on {key}")]
    Conflict {
        /// The key whose compare failed (the first one, for a transaction).
        key: String,
    },
    /// The key is not a valid key (empty, or not starting with `/`).
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The rejected key.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A [`Store::campaign`] argument is not acceptable (election name,
    /// candidate name or ttl).
    #[error("invalid campaign in election {election:?}: {reason}")]
    InvalidCampaign {
        /// The election campaigned in.
        election: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The backend could not be reached or failed (I/O, network, corrupt file).
    #[error("store backend failed: {context}")]
    Backend {
        /// What the store was doing.
        context: String,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    /// Wraps a backend error with what the store was doing.
    pub fn backend(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StoreError::Backend {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// Checks a key against the rules shared by every backend.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let reason = if key.is_empty() {
        "empty"
    } else if !key.starts_with('/') {
        "must start with '/'"
    } else if key.contains('\0') {
        "contains NUL"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidKey {
        key: key.to_owned(),
        reason,
    })
}

impl Compare {
    /// The key this compare checks.
    pub fn key(&self) -> &str {
        match self {
            Compare::ModRevision { key, .. } => key,
        }
    }
}

impl TxnOp {
    /// The key this operation writes.
    pub fn key(&self) -> &str {
        match self {
            TxnOp::Put { key, .. } | TxnOp::Delete { key } => key,
        }
    }
}

/// Checks a transaction against the rules shared by every backend: every key
/// valid, and no key written twice (etcd rejects that, so no backend allows it).
pub fn validate_txn(compares: &[Compare], ops: &[TxnOp]) -> Result<(), StoreError> {
    for c in compares {
        validate_key(c.key())?;
    }
    let mut seen = std::collections::HashSet::with_capacity(ops.len());
    for op in ops {
        validate_key(op.key())?;
        if !seen.insert(op.key()) {
            return Err(StoreError::InvalidKey {
                key: op.key().to_owned(),
                reason: "written twice in one transaction",
            });
        }
    }
    Ok(())
}

/// The state store. `Arc<dyn Store>` is what the control plane holds.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Writes one key unconditionally; returns the new revision.
    async fn put(&self, key: &str, value: Bytes) -> Result<Revision, StoreError>;

    /// Deletes one key; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;

    /// Writes `key` only if its `mod_revision` equals `expect` (`None`: only if
    /// absent). Returns the new revision, or [`StoreError::Conflict`].
    async fn cas(
        &self,
        key: &str,
        expect: Option<Revision>,
        value: Bytes,
    ) -> Result<Revision, StoreError>;

    /// All keys starting with `prefix`, sorted by key. `prefix` follows the
    /// key rules ([`validate_key`]): `/` lists everything.
    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError>;

    /// Applies `ops` atomically if every compare holds. Returns the revision of
    /// the transaction, or [`StoreError::Conflict`] naming the first failed compare.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<Revision, StoreError>;

    /// Most operations one [`Store::txn`] may carry (and, apart from them, most
    /// compares); beyond it the call fails with the backend's error. Writers that batch
    /// (the slice ledger) size their batches by it. No limit unless the backend has one.
    fn max_txn_ops(&self) -> usize {
        usize::MAX
    }

    /// Changes under `prefix` that happen after this call returns.
    ///
    /// `prefix` follows the key rules ([`validate_key`]). Events arrive in
    /// revision order; the ops of one transaction share its revision. An `Err`
    /// item (a lagging watcher, a lost connection) is the last item: the stream
    /// ends after it, and the caller re-lists and watches again. Nothing is lost
    /// silently.
    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError>;

    /// Waits until `candidate` is the leader of `election`, then returns its
    /// [`Leadership`] (see [`election`] for the model and fencing).
    ///
    /// `election` is a name without `/` (the leader is recorded at
    /// [`election_key`]); `candidate` names this contender (a server's name,
    /// reported by [`Store::leader`]). `ttl` is how long the leadership
    /// outlives its holder: if the holder dies or is cut off from the store,
    /// it notices (its `lost` fires) within `ttl`, and another candidate takes
    /// over soon after. On etcd it is the lease's time to live, rounded up to
    /// whole seconds; stores owned by one process have no lease and ignore it.
    ///
    /// While several candidates wait, which one wins next is unspecified.
    /// Cancel-safe: dropping the future withdraws the candidacy (a leadership
    /// won at that very moment is released). Errors: a bad argument
    /// ([`StoreError::InvalidCampaign`]) or an unreachable store; waiting for
    /// a live leader is not an error, however long it takes.
    async fn campaign(
        &self,
        election: &str,
        candidate: &str,
        ttl: Duration,
    ) -> Result<Leadership, StoreError>;

    /// The candidate that leads `election` now, if any (for diagnostics: it
    /// may change as soon as this returns).
    async fn leader(&self, election: &str) -> Result<Option<String>, StoreError> {
        let key = election_key(election)?;
        let Some(kv) = self.get(&key).await? else {
            return Ok(None);
        };
        String::from_utf8(kv.value.to_vec())
            .map(Some)
            .map_err(|e| StoreError::backend(format!("cannot read the leader of {election}"), e))
    }
}
