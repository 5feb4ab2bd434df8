//! A transparency log: an append-only Merkle log in the RFC 6962 / RFC 9162 shape
//! (leaf hash `SHA-256(0x00 || entry)`, node hash `SHA-256(0x01 || l || r)`,
//! inclusion and consistency proofs) of Ed25519-signed entries, whose signed
//! checkpoints are committed through the store's compare-and-swap.
//!
//! Owns: the hash definitions ([`hash`]), the writer ([`log::TransLog`], over a
//! [`store::Store`]: redb or etcd), and a verifier ([`verify`]) that shares only
//! [`hash`] with the writer and audits a log from its raw keys.
//! Must not depend on: the control layer, HTTP, store backends.
//!
//! Tasks: one writer task per open log ([`log::TransLog::open`]), which alone owns
//! the log's tree; it ends when the last handle is dropped.
#![warn(missing_docs)]

pub mod hash;
pub mod log;
pub mod sign;
pub mod tree;
pub mod verify;

pub use hash::Hash;
pub use log::{Appended, Checkpoint, LogConfig, LogError, SignedCheckpoint, TransLog};
pub use sign::{KeyError, Signer};
pub use tree::MerkleTree;
pub use verify::{audit, AuditError, Audited, TrustedKeys, VerifiedCheckpoint};
