//! Migration cache: a per-disk block cache that can be rebuilt on another host in the
//! order the VM will need it, and that survives a crash of its host.
//!
//! Owns: the heat map and access pattern learned from a disk's reads, the fetch planner,
//! the on-disk cache (data file + crash-consistent metadata), block sources (origin file,
//! another cache, NBD peers), the rebuild engine, block-trace readers and the migration
//! benchmark. Must not depend on: the control plane, the agent, tokio. Depends on `nbd`
//! only for the [`nbd::BlockDevice`] trait it implements, and on `model` only for its
//! error-chain printer ([`model::error_chain`]).
//!
//! Threads: a [`BlockCache`] is shared by reference (`Send + Sync`, short internal locks,
//! I/O outside them); a rebuild runs one background prefetch thread per destination.
#![warn(missing_docs)]

pub mod bench;
#[cfg(feature = "nbd")]
pub mod bench_nbd;
pub mod block_cache;
mod failpoint;
pub mod heat;
pub mod meta;
#[cfg(feature = "nbd")]
pub mod nbd_source;
pub mod pattern;
pub mod plan;
pub mod rebuild;
pub mod source;
pub mod trace;
pub mod types;

pub use block_cache::{
    BlockCache, CacheConfig, CacheError, CacheOpenError, CacheStats, Checkpointer, Fetched,
    MigrationSnapshot, OpenReport,
};
pub use heat::{HeatMap, HeatSnapshot};
#[cfg(feature = "nbd")]
pub use nbd_source::{OriginNbdSource, PeerExport, PeerNbdSource};
pub use pattern::{AccessPattern, PatternSnapshot};
pub use plan::{lookahead, plan_fetch, Strategy, UnknownStrategy};
pub use rebuild::{prepare_destination, Rebuild, RebuildPlan, RebuildProgress};
pub use source::{BlockOrigin, BlockSource, CacheSource, FileOrigin, SourceError, Throttle};
pub use types::{BlockIdx, BlockSet, BlockSize, Generation};
