//! The block cache of one VM disk on one host: a data file of block-sized slots, the
//! block map with generations and checksums (persisted by [`crate::meta`]), the heat map
//! and access pattern learned from the guest's reads, and heat-based eviction.
//!
//! Locking: `state` (one mutex) guards the map, slots, heat and pattern; it is held only
//! for bookkeeping, never across data I/O. Per-block ordering between writes and fills
//! comes from a small array of stripe locks keyed by block index. A reader copies its
//! slot's epoch, reads the data without any lock, and re-checks the epoch afterwards: a
//! slot evicted or rewritten meanwhile makes the read retry instead of returning mixed data.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};

use serde::{Deserialize, Serialize};

use crate::heat::{HeatMap, HeatSnapshot};
use crate::meta::{Journal, MetaSaveError, Record};
use crate::pattern::{AccessPattern, PatternSnapshot};
use crate::source::{BlockOrigin, BlockSource, SourceError};
use crate::types::{BlockIdx, BlockSet, BlockSize, Generation};
use model::SplitMix64;

mod checkpoint;
#[cfg(feature = "nbd")]
mod device;
mod open;
mod precopy;
mod read;
mod write;

pub use checkpoint::Checkpointer;

const STRIPES: usize = 64;
/// Slots sampled per eviction: the coldest of a random sample approximates the coldest
/// overall (as Redis does) at O(1) cost instead of a scan or a second index.
const EVICTION_SAMPLE: usize = 16;

/// How to lay out and run a cache.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Directory holding `data`, `meta` and `journal`.
    pub dir: PathBuf,
    /// Block size.
    pub block_size: BlockSize,
    /// Capacity in blocks (slots in the data file).
    pub capacity_blocks: u64,
    /// Heat half-life, in accesses.
    pub heat_half_life: u64,
    /// Bound on blocks tracked by the heat map.
    pub heat_max_tracked: usize,
    /// Bound on blocks with a successor list.
    pub pattern_max_blocks: usize,
    /// Journal records between automatic checkpoints.
    pub checkpoint_every: u64,
}

impl CacheConfig {
    /// Defaults for a cache of `capacity_blocks` blocks of 64 KiB in `dir`.
    pub fn new(dir: impl Into<PathBuf>, capacity_blocks: u64) -> Self {
        let cap = usize::try_from(capacity_blocks).unwrap_or(usize::MAX);
        Self {
            dir: dir.into(),
            block_size: BlockSize::DEFAULT,
            capacity_blocks: capacity_blocks.max(1),
            heat_half_life: capacity_blocks.saturating_mul(8).max(1024),
            heat_max_tracked: cap.saturating_mul(2).max(1024),
            pattern_max_blocks: cap.saturating_mul(2).max(1024),
            checkpoint_every: 4096,
        }
    }
}

/// Opening a cache failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheOpenError {
    /// The cache directory could not be created.
    #[error("cannot create cache directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        err: io::Error,
    },
    /// The data file could not be opened or sized.
    #[error("cannot open cache data file {path}")]
    Data {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        err: io::Error,
    },
    /// The journal or the fresh checkpoint could not be written.
    #[error("cannot write cache metadata in {path}")]
    Meta {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        err: MetaSaveError,
    },
}

/// A cache operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The origin or a peer failed.
    #[error("block source failed")]
    Source(#[from] SourceError),
    /// The cache's own data file failed.
    #[error("cannot access slot {slot} of cache data file {path}")]
    Data {
        /// The data file.
        path: PathBuf,
        /// The slot.
        slot: u64,
        /// The cause.
        #[source]
        err: io::Error,
    },
    /// Metadata could not be persisted.
    #[error("cache metadata")]
    Meta(#[from] MetaSaveError),
    /// The request lies outside the disk.
    #[error("request of {len} bytes at offset {offset} is outside the disk of {size} bytes")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
        /// Disk size.
        size: u64,
    },
}

/// What opening a cache found on disk.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenReport {
    /// Blocks whose checksum and generation verified: they will be served.
    pub verified: u64,
    /// Blocks dropped because their data no longer matched their checksum.
    pub dropped_checksum: u64,
    /// Blocks dropped because a newer write generation was journalled.
    pub dropped_generation: u64,
    /// Blocks dropped because their slot or index was out of range.
    pub dropped_invalid: u64,
    /// Blocks dropped because a migration's cache pre-copy into this cache was
    /// interrupted before the source's dirty list arrived.
    #[serde(default)]
    pub dropped_precopy: u64,
    /// Journal records replayed.
    pub journal_records: u64,
    /// Whether the journal ended in a torn record.
    pub journal_torn: bool,
    /// Why the checkpoint was discarded, if it was (the cache then starts empty).
    pub discarded_checkpoint: Option<String>,
}

/// Counters of a cache, monotonic since open.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    /// Guest block reads served from the cache.
    pub hits: u64,
    /// Guest block reads that had to fetch.
    pub misses: u64,
    /// Bytes fetched from the peer (demand and prefetch).
    pub bytes_from_peer: u64,
    /// Bytes fetched from the origin (demand and prefetch).
    pub bytes_from_origin: u64,
    /// Blocks installed by prefetch.
    pub prefetched: u64,
    /// Prefetched blocks discarded because a write bumped their generation meanwhile.
    pub prefetch_raced: u64,
    /// Blocks evicted.
    pub evictions: u64,
    /// Blocks cached now.
    pub cached_blocks: u64,
}

/// What the source host hands the destination at migration time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationSnapshot {
    /// Block size of the source cache.
    pub block_size: u32,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Heat map.
    pub heat: HeatSnapshot,
    /// Access pattern (with the cursor).
    pub pattern: PatternSnapshot,
    /// Blocks the source holds, with their generations.
    pub blocks: Vec<(u64, u64)>,
}

impl MigrationSnapshot {
    /// The blocks the source can serve.
    pub fn block_set(&self) -> BlockSet {
        self.blocks.iter().map(|(b, _)| BlockIdx(*b)).collect()
    }
}

#[derive(Debug, Clone, Copy)]
struct Mapping {
    slot: u64,
    gen: Generation,
    crc: u32,
}

#[derive(Debug)]
struct State {
    map: HashMap<BlockIdx, Mapping>,
    gens: HashMap<BlockIdx, Generation>,
    slots: Vec<Option<BlockIdx>>,
    /// Per-slot change counters, bumped (under this state's lock) whenever a slot is
    /// unmapped, reassigned or rewritten; read without the lock by the hit path.
    epochs: Arc<[AtomicU64]>,
    free: Vec<u64>,
    heat: HeatMap,
    pattern: AccessPattern,
    tick: u64,
    journal: Journal,
    rng: SplitMix64,
    /// Blocks written since the peer was attached: the peer's copy is older than the
    /// origin's, so misses on them must skip the peer.
    peer_stale: std::collections::HashSet<BlockIdx>,
    peer_attached: bool,
    /// Source of a migration: blocks written since the snapshot (see `precopy`).
    dirty: Option<std::collections::BTreeSet<u64>>,
    /// Destination during a pre-copy: blocks copied that the source may have rewritten
    /// since; never served until the dirty list is applied (see `precopy`).
    provisional: Option<std::collections::HashSet<BlockIdx>>,
    /// `tick` at the last checkpoint.
    checkpointed_tick: u64,
}

impl State {
    fn gen(&self, b: BlockIdx) -> Generation {
        self.gens.get(&b).copied().unwrap_or_default()
    }

    fn slot_index(slot: u64) -> usize {
        usize::try_from(slot).expect("slot numbers are below capacity, which fits in memory")
    }

    /// Takes a free slot, evicting the coldest of a random sample if there is none.
    fn take_slot(&mut self, evictions: &AtomicU64) -> Result<Option<u64>, MetaSaveError> {
        if let Some(s) = self.free.pop() {
            return Ok(Some(s));
        }
        let n = self.slots.len() as u64;
        let mut victim: Option<(f64, BlockIdx, u64)> = None;
        for _ in 0..EVICTION_SAMPLE {
            let s = self.rng.below(n);
            if let Some(b) = self.slots[Self::slot_index(s)] {
                let h = self.heat.heat(b);
                if victim.is_none_or(|(vh, vb, _)| h < vh || (h == vh && b < vb)) {
                    victim = Some((h, b, s));
                }
            }
        }
        let Some((_, b, s)) = victim else {
            return Ok(None);
        };
        self.journal.append(&Record::Unmap { block: b })?;
        self.map.remove(&b);
        self.slots[Self::slot_index(s)] = None;
        self.epochs[Self::slot_index(s)].fetch_add(1, Ordering::SeqCst);
        evictions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(block = b.0, slot = s, "evicted");
        Ok(Some(s))
    }

    fn map_block(&mut self, b: BlockIdx, m: Mapping) -> Result<(), MetaSaveError> {
        self.journal.append(&Record::Map {
            block: b,
            slot: m.slot,
            gen: m.gen,
            crc: m.crc,
        })?;
        self.map.insert(b, m);
        self.slots[Self::slot_index(m.slot)] = Some(b);
        self.epochs[Self::slot_index(m.slot)].fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    bytes_from_peer: AtomicU64,
    bytes_from_origin: AtomicU64,
    prefetched: AtomicU64,
    prefetch_raced: AtomicU64,
    evictions: AtomicU64,
}

/// The cache of one VM disk on one host. See the module docs for the locking rules.
#[derive(Debug)]
pub struct BlockCache {
    cfg: CacheConfig,
    data_path: PathBuf,
    meta_path: PathBuf,
    data: File,
    origin: Arc<dyn BlockOrigin>,
    peer: RwLock<Option<Arc<dyn BlockSource>>>,
    state: Mutex<State>,
    stripes: Vec<Mutex<()>>,
    epochs: Arc<[AtomicU64]>,
    counters: Counters,
    demand_inflight: AtomicUsize,
    demand_done: (Mutex<()>, Condvar),
    disk_size: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning means a thread panicked while holding the lock; every critical section
    // here leaves the state consistent at each statement, so carry on.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How a fetched block got here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// From the peer.
    Peer,
    /// From the origin.
    Origin,
}

impl BlockCache {
    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// The block size.
    pub fn block_size(&self) -> BlockSize {
        self.cfg.block_size
    }

    /// Disk size in bytes (the origin's).
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Number of blocks of the disk.
    pub fn total_blocks(&self) -> u64 {
        self.cfg.block_size.blocks_for(self.disk_size)
    }

    /// Sets (or clears) the peer that misses try before the origin. Blocks written since
    /// a peer was first attached stay barred from the peer when it is replaced (a
    /// pre-copy's re-plan at switch-over attaches the same source again: its copies of
    /// what the guest wrote here since are older than the origin's); detaching forgets
    /// them.
    pub fn set_peer(&self, peer: Option<Arc<dyn BlockSource>>) {
        {
            let mut st = lock(&self.state);
            st.peer_attached = peer.is_some();
            if peer.is_none() {
                st.peer_stale.clear();
            }
        }
        *self.peer.write().unwrap_or_else(PoisonError::into_inner) = peer;
    }

    /// Counters since open.
    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            bytes_from_peer: c.bytes_from_peer.load(Ordering::Relaxed),
            bytes_from_origin: c.bytes_from_origin.load(Ordering::Relaxed),
            prefetched: c.prefetched.load(Ordering::Relaxed),
            prefetch_raced: c.prefetch_raced.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            cached_blocks: lock(&self.state).map.len() as u64,
        }
    }

    /// Whether `b` is cached now.
    pub fn contains(&self, b: BlockIdx) -> bool {
        lock(&self.state).map.contains_key(&b)
    }

    /// The current write generation of `b`.
    pub fn generation(&self, b: BlockIdx) -> Generation {
        lock(&self.state).gen(b)
    }

    /// Heat map, pattern and block list, for the destination of a migration.
    pub fn migration_snapshot(&self) -> MigrationSnapshot {
        let st = lock(&self.state);
        let mut blocks: Vec<(u64, u64)> = st.map.iter().map(|(b, m)| (b.0, m.gen.0)).collect();
        blocks.sort_unstable();
        MigrationSnapshot {
            block_size: self.cfg.block_size.bytes(),
            disk_size: self.disk_size,
            heat: st.heat.snapshot(),
            pattern: st.pattern.snapshot(),
            blocks,
        }
    }

    /// The next `k` blocks the guest is expected to read, from where it reads now
    /// (see [`crate::plan::lookahead`]).
    pub fn lookahead(&self, k: usize) -> Vec<BlockIdx> {
        let st = lock(&self.state);
        crate::plan::lookahead(&st.pattern, k, self.total_blocks())
    }

    /// Guest block accesses recorded (the logical clock of heat and pattern).
    pub fn accesses(&self) -> u64 {
        lock(&self.state).tick
    }

    /// Seeds this (new, destination) cache's heat map and pattern from a migration
    /// snapshot, so that eviction and a later migration know the VM's history.
    pub fn adopt_history(&self, snap: &MigrationSnapshot) {
        let mut st = lock(&self.state);
        st.heat = HeatMap::from_snapshot(&snap.heat);
        st.pattern = AccessPattern::from_snapshot(&snap.pattern);
        st.tick = st.heat.now();
    }

    fn stripe(&self, b: BlockIdx) -> MutexGuard<'_, ()> {
        let i = usize::try_from(b.0 % STRIPES as u64).expect("stripe index below STRIPES");
        lock(&self.stripes[i])
    }

    fn slot_offset(&self, slot: u64) -> u64 {
        slot * u64::from(self.cfg.block_size.bytes())
    }

    fn data_err(&self, slot: u64) -> impl FnOnce(io::Error) -> CacheError + '_ {
        move |err| CacheError::Data {
            path: self.data_path.clone(),
            slot,
            err,
        }
    }
}
