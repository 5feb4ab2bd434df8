//! [`ControlError`]: the failures every control operation shares (the store, a record
//! that does not decode, a lost race). Each operation's own refusals are its own enum,
//! with a `Control(ControlError)` variant for these.

use store::StoreError;

/// What can go wrong under any control operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The store failed.
    #[error("store operation failed")]
    Store(#[from] StoreError),
    /// A stored record does not decode: a bug or a hand-edited store.
    #[error("record {key} cannot be decoded")]
    Decode {
        /// Its key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A record could not be encoded.
    #[error("a record cannot be encoded")]
    Encode(#[source] serde_json::Error),
    /// No such object, or one the caller may not see (the same answer, on purpose).
    #[error("{kind} {id} not found")]
    NotFound {
        /// `vm`, `host`, `migration`, ...
        kind: &'static str,
        /// What the caller asked for.
        id: String,
    },
    /// An admin named an object by a name that several tenants use.
    #[error("{kind} name {name} exists in {tenants} tenants; use the {kind} id")]
    AmbiguousName {
        /// The object kind.
        kind: &'static str,
        /// The name.
        name: String,
        /// How many tenants use it.
        tenants: usize,
    },
    /// A unique name is already used (the message names it).
    #[error("{0}")]
    Taken(String),
    /// A read-modify-write kept losing races with other writers.
    #[error("{what} is being updated concurrently, retry")]
    Contended {
        /// The record.
        what: String,
    },
    /// A stored state breaks an invariant (a migration of a missing VM...).
    #[error("internal error: {0}")]
    Invariant(String),
}
