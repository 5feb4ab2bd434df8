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
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use model::error_chain;
use serde::{Deserialize, Serialize};

use crate::heat::{HeatMap, HeatSnapshot};
use crate::meta::{self, BlockMeta, CheckpointBody, Journal, MetaSaveError, Record};
use crate::pattern::{AccessPattern, PatternSnapshot};
use crate::source::{BlockOrigin, BlockSource, SourceError};
use crate::types::{BlockIdx, BlockSet, BlockSize, Generation};
use model::SplitMix64;

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
    /// Opens (or creates) the cache in `cfg.dir` in front of `origin`. After a crash this
    /// replays the journal, then verifies every cached block's checksum and generation and
    /// drops those that fail, so they are never served. A checkpoint that cannot be loaded
    /// (corrupt, other format, other geometry) is discarded with a warning: the cache then
    /// starts empty, which is always safe.
    pub fn open(
        cfg: CacheConfig,
        origin: Arc<dyn BlockOrigin>,
    ) -> Result<(Self, OpenReport), CacheOpenError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|err| CacheOpenError::CreateDir {
            path: cfg.dir.clone(),
            err,
        })?;
        let data_path = cfg.dir.join("data");
        let meta_path = cfg.dir.join("meta");
        let journal_path = cfg.dir.join("journal");
        let bs = u64::from(cfg.block_size.bytes());
        let data_err = |err| CacheOpenError::Data {
            path: data_path.clone(),
            err,
        };
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(data_err)?;
        let data_len = cfg.capacity_blocks.checked_mul(bs).ok_or_else(|| {
            data_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "capacity times block size overflows",
            ))
        })?;
        data.set_len(data_len).map_err(data_err)?;
        let disk_size = origin.size();
        let dir = cfg.dir.clone();
        let meta_err = |err| CacheOpenError::Meta {
            path: dir.clone(),
            err,
        };

        let mut report = OpenReport::default();
        let checkpoint = match meta::load_checkpoint(&meta_path) {
            Ok(Some(c)) if c.block_size != cfg.block_size.bytes() || c.disk_size != disk_size => {
                report.discarded_checkpoint = Some(format!(
                    "geometry changed: block size {} -> {}, disk size {} -> {}",
                    c.block_size,
                    cfg.block_size.bytes(),
                    c.disk_size,
                    disk_size
                ));
                None
            }
            Ok(c) => c,
            Err(e) => {
                report.discarded_checkpoint = Some(error_chain(&e));
                None
            }
        };
        if let Some(why) = &report.discarded_checkpoint {
            tracing::warn!(path = %meta_path.display(), why, "discarding cache checkpoint, starting empty");
        }
        let epoch = checkpoint.as_ref().map_or(0, |c| c.epoch);
        let (journal, replay) = Journal::open(&journal_path, epoch).map_err(meta_err)?;
        report.journal_records = replay.records.len() as u64;
        report.journal_torn = replay.torn_at.is_some();
        if let Some(at) = replay.torn_at {
            tracing::warn!(path = %journal_path.display(), offset = at, "cache journal ends in a torn record");
        }

        // Rebuild the map: checkpoint, then journal, each block's last word wins.
        let mut map: HashMap<BlockIdx, Mapping> = HashMap::new();
        let mut gens: HashMap<BlockIdx, Generation> = HashMap::new();
        let (heat, pattern) = match &checkpoint {
            Some(c) => {
                for m in &c.blocks {
                    map.insert(
                        BlockIdx(m.block),
                        Mapping {
                            slot: m.slot,
                            gen: Generation(m.gen),
                            crc: m.crc,
                        },
                    );
                    gens.insert(BlockIdx(m.block), Generation(m.gen));
                }
                (
                    HeatMap::from_snapshot(&c.heat),
                    AccessPattern::from_snapshot(&c.pattern),
                )
            }
            None => (
                HeatMap::new(cfg.heat_half_life, cfg.heat_max_tracked),
                AccessPattern::new(cfg.pattern_max_blocks),
            ),
        };
        let mut bumped_out = std::collections::HashSet::new();
        for r in &replay.records {
            match *r {
                Record::Map {
                    block,
                    slot,
                    gen,
                    crc,
                } => {
                    if gen < gens.get(&block).copied().unwrap_or_default() {
                        // A fill older than a journalled write: never valid.
                        report.dropped_generation += 1;
                        continue;
                    }
                    map.retain(|b, m| m.slot != slot || *b == block);
                    map.insert(block, Mapping { slot, gen, crc });
                    bumped_out.remove(&block);
                    gens.insert(block, gen);
                }
                Record::Bump { block, gen } => {
                    if map.get(&block).is_some_and(|m| m.gen < gen) {
                        map.remove(&block);
                        // Dropped for good unless the write's own Map record follows.
                        bumped_out.insert(block);
                    }
                    gens.insert(block, gen);
                }
                Record::Unmap { block } => {
                    map.remove(&block);
                }
            }
        }
        report.dropped_generation += bumped_out.len() as u64;

        // Verify every surviving block against its checksum before serving it.
        let cap = usize::try_from(cfg.capacity_blocks).map_err(|_| {
            data_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "capacity does not fit in memory",
            ))
        })?;
        let total_blocks = cfg.block_size.blocks_for(disk_size);
        let mut slots: Vec<Option<BlockIdx>> = vec![None; cap];
        let mut buf = vec![0u8; cfg.block_size.as_usize()];
        let mut entries: Vec<(BlockIdx, Mapping)> = map.into_iter().collect();
        entries.sort_by_key(|(b, _)| *b);
        let mut map = HashMap::new();
        for (b, m) in entries {
            let in_range = m.slot < cfg.capacity_blocks && b.0 < total_blocks;
            if !in_range || slots[State::slot_index(m.slot)].is_some() {
                report.dropped_invalid += 1;
                continue;
            }
            data.read_exact_at(&mut buf, m.slot * bs)
                .map_err(data_err)?;
            if crc32fast::hash(&buf) != m.crc {
                report.dropped_checksum += 1;
                continue;
            }
            if gens.get(&b).is_some_and(|g| *g != m.gen) {
                report.dropped_generation += 1;
                continue;
            }
            slots[State::slot_index(m.slot)] = Some(b);
            map.insert(b, m);
        }
        report.verified = map.len() as u64;
        let free: Vec<u64> = (0..cfg.capacity_blocks)
            .rev()
            .filter(|s| slots[State::slot_index(*s)].is_none())
            .collect();
        let epochs: Arc<[AtomicU64]> = (0..cap).map(|_| AtomicU64::new(0)).collect();
        let state = State {
            map,
            gens,
            slots,
            epochs: epochs.clone(),
            free,
            heat,
            pattern,
            tick: 0,
            journal,
            rng: SplitMix64::new(0x5eed_cace),
            peer_stale: std::collections::HashSet::new(),
            peer_attached: false,
            checkpointed_tick: 0,
        };
        let mut state = state;
        state.tick = state.heat.now();
        let cache = Self {
            data_path,
            meta_path,
            data,
            origin,
            peer: RwLock::new(None),
            state: Mutex::new(state),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            epochs,
            counters: Counters::default(),
            demand_inflight: AtomicUsize::new(0),
            demand_done: (Mutex::new(()), Condvar::new()),
            disk_size,
            cfg,
        };
        // Persist the verified state at once, so a second crash cannot resurrect a block
        // this open dropped.
        cache.checkpoint().map_err(|e| match e {
            CacheError::Meta(err) => meta_err(err),
            other => meta_err(MetaSaveError::Io {
                step: "checkpoint",
                path: cache.meta_path.clone(),
                err: io::Error::other(error_chain(&other)),
            }),
        })?;
        tracing::info!(
            dir = %cache.cfg.dir.display(),
            verified = report.verified,
            dropped_checksum = report.dropped_checksum,
            dropped_generation = report.dropped_generation,
            "cache opened"
        );
        Ok((cache, report))
    }

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

    /// Sets (or clears) the peer that misses try before the origin.
    pub fn set_peer(&self, peer: Option<Arc<dyn BlockSource>>) {
        {
            let mut st = lock(&self.state);
            st.peer_attached = peer.is_some();
            st.peer_stale.clear();
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

    /// Reads the cached copy of `b` into `buf` (whole block) if present, verifying its
    /// checksum, without filling on a miss or counting as a guest access: what a peer serves.
    pub fn peek_block(
        &self,
        b: BlockIdx,
        buf: &mut [u8],
    ) -> Result<Option<Generation>, CacheError> {
        loop {
            let (m, epoch) = {
                let st = lock(&self.state);
                match st.map.get(&b) {
                    Some(m) => (
                        *m,
                        st.epochs[State::slot_index(m.slot)].load(Ordering::SeqCst),
                    ),
                    None => return Ok(None),
                }
            };
            self.data
                .read_exact_at(buf, self.slot_offset(m.slot))
                .map_err(self.data_err(m.slot))?;
            if self.epochs[State::slot_index(m.slot)].load(Ordering::SeqCst) != epoch {
                continue;
            }
            if crc32fast::hash(buf) != m.crc {
                tracing::warn!(
                    block = b.0,
                    slot = m.slot,
                    "cached block fails its checksum, not served"
                );
                return Ok(None);
            }
            return Ok(Some(m.gen));
        }
    }

    /// Reads part of one block: `within` bytes into it, `out.len()` bytes long.
    fn read_in_block(&self, b: BlockIdx, within: usize, out: &mut [u8]) -> Result<(), CacheError> {
        let mut first = true;
        loop {
            // One lock per block on the hit path: record the access and look the block up
            // together; the epoch is re-checked after the read without the lock.
            let hit = {
                let mut st = lock(&self.state);
                if first {
                    st.tick += 1;
                    let t = st.tick;
                    st.heat.record(b, t);
                    st.pattern.record(b);
                    first = false;
                }
                st.map.get(&b).map(|m| {
                    (
                        m.slot,
                        self.epochs[State::slot_index(m.slot)].load(Ordering::SeqCst),
                    )
                })
            };
            if let Some((slot, epoch)) = hit {
                self.data
                    .read_exact_at(out, self.slot_offset(slot) + within as u64)
                    .map_err(self.data_err(slot))?;
                if self.epochs[State::slot_index(slot)].load(Ordering::SeqCst) == epoch {
                    self.counters.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                continue; // evicted or rewritten under us: look again
            }
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            let mut buf = vec![0u8; self.cfg.block_size.as_usize()];
            self.demand_inflight.fetch_add(1, Ordering::AcqRel);
            let r = self.fetch_and_install(b, &mut buf);
            if self.demand_inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.demand_done.1.notify_all();
            }
            r?;
            out.copy_from_slice(&buf[within..within + out.len()]);
            return Ok(());
        }
    }

    /// Fetches `b` (peer first, then origin) into `buf` and installs it unless a write
    /// bumped its generation meanwhile. Returns where the data came from.
    pub(crate) fn fetch_and_install(
        &self,
        b: BlockIdx,
        buf: &mut [u8],
    ) -> Result<(Fetched, bool), CacheError> {
        // Read the generation under the stripe lock: a write in progress holds it from
        // before its bump until its data is on the origin, so we never start a fetch in
        // the middle of one.
        let g0 = {
            let _s = self.stripe(b);
            lock(&self.state).gen(b)
        };
        let from = self.fetch(b, buf)?;
        let installed = self.install(b, g0, buf)?;
        Ok((from, installed))
    }

    fn fetch(&self, b: BlockIdx, buf: &mut [u8]) -> Result<Fetched, CacheError> {
        let peer = self
            .peer
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let peer = peer.filter(|_| !lock(&self.state).peer_stale.contains(&b));
        let len = buf.len() as u64;
        if let Some(p) = peer {
            match p.read_block(b, buf) {
                Ok(Some(_)) => {
                    self.counters
                        .bytes_from_peer
                        .fetch_add(len, Ordering::Relaxed);
                    return Ok(Fetched::Peer);
                }
                Ok(None) => {}
                // The peer is an optimisation: a failing peer must not fail the guest.
                Err(e) => {
                    tracing::warn!(block = b.0, error = %error_chain(&e), "peer read failed, using origin")
                }
            }
        }
        self.origin.read_block(b, buf)?;
        self.counters
            .bytes_from_origin
            .fetch_add(len, Ordering::Relaxed);
        Ok(Fetched::Origin)
    }

    /// Installs `data` as block `b` if its generation is still `g0` and it is not cached yet.
    pub(crate) fn install(
        &self,
        b: BlockIdx,
        g0: Generation,
        data: &[u8],
    ) -> Result<bool, CacheError> {
        let _s = self.stripe(b);
        let slot = {
            let mut st = lock(&self.state);
            if st.gen(b) != g0 {
                return Ok(false);
            }
            if st.map.contains_key(&b) {
                return Ok(true);
            }
            match st.take_slot(&self.counters.evictions)? {
                Some(s) => s,
                None => return Ok(false),
            }
        };
        // The slot is reserved (neither free nor mapped) while we write it.
        if let Err(e) = self.data.write_all_at(data, self.slot_offset(slot)) {
            lock(&self.state).free.push(slot);
            return Err(self.data_err(slot)(e));
        }
        crate::failpoint::hit("install::after_data");
        let crc = crc32fast::hash(data);
        let mut st = lock(&self.state);
        st.map_block(b, Mapping { slot, gen: g0, crc })?;
        self.maybe_checkpoint(st)?;
        Ok(true)
    }

    /// Prefetches `b` for a rebuild: fetch outside any lock, install only if no write
    /// bumped the block meanwhile. Returns where it came from and whether it was installed.
    pub fn prefetch(&self, b: BlockIdx) -> Result<Option<(Fetched, bool)>, CacheError> {
        if self.contains(b) || b.0 >= self.total_blocks() {
            return Ok(None);
        }
        let mut buf = vec![0u8; self.cfg.block_size.as_usize()];
        let (from, installed) = self.fetch_and_install(b, &mut buf)?;
        if installed {
            self.counters.prefetched.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.prefetch_raced.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Some((from, installed)))
    }

    /// Blocks while guest misses are being fetched, for at most `max`: demand goes first.
    pub fn wait_for_demand_idle(&self, max: Duration) {
        let (m, cv) = &self.demand_done;
        let g = lock(m);
        if self.demand_inflight.load(Ordering::Acquire) > 0 {
            let _ = cv
                .wait_timeout_while(g, max, |_| self.demand_inflight.load(Ordering::Acquire) > 0)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), CacheError> {
        let len = len as u64;
        match offset.checked_add(len) {
            Some(end) if end <= self.disk_size => Ok(()),
            _ => Err(CacheError::OutOfRange {
                offset,
                len,
                size: self.disk_size,
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset`, filling the cache on misses.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), CacheError> {
        self.check_range(offset, buf.len())?;
        let bs = u64::from(self.cfg.block_size.bytes());
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let b = BlockIdx(pos / bs);
            let within = usize::try_from(pos % bs).expect("below block size");
            let n = (self.cfg.block_size.as_usize() - within).min(buf.len() - done);
            self.read_in_block(b, within, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset`: through to the origin, then into the cache. Each touched
    /// block's generation is bumped (and journalled) before the origin sees the data, so a
    /// fetch of the old contents that is in flight can never be installed afterwards.
    pub fn write(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), CacheError> {
        self.check_range(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let bs = u64::from(self.cfg.block_size.bytes());
        let first = offset / bs;
        let last = (offset + data.len() as u64 - 1) / bs;
        // Lock every stripe the write touches, in index order (no deadlock between writers).
        let mut stripe_ids: Vec<usize> = (first..=last)
            .map(|b| usize::try_from(b % STRIPES as u64).expect("below STRIPES"))
            .collect();
        stripe_ids.sort_unstable();
        stripe_ids.dedup();
        let _guards: Vec<MutexGuard<'_, ()>> =
            stripe_ids.iter().map(|i| lock(&self.stripes[*i])).collect();

        // 1. Bump generations; take cached blocks out of the map (their slots stay reserved).
        let mut touched: Vec<(BlockIdx, Generation, Option<Mapping>)> = Vec::new();
        {
            let mut st = lock(&self.state);
            for b in (first..=last).map(BlockIdx) {
                let g = st.gen(b).next();
                st.journal.append(&Record::Bump { block: b, gen: g })?;
                st.gens.insert(b, g);
                if st.peer_attached {
                    st.peer_stale.insert(b);
                }
                let old = st.map.remove(&b);
                if let Some(m) = old {
                    let i = State::slot_index(m.slot);
                    st.slots[i] = None;
                    st.epochs[i].fetch_add(1, Ordering::SeqCst);
                }
                touched.push((b, g, old));
            }
            if fua {
                st.journal.sync()?;
            }
        }
        crate::failpoint::hit("write::after_bump");
        // 2. Write through.
        let origin_result = self.origin.write_at(data, offset, fua);
        crate::failpoint::hit("write::after_origin");
        // 3. Update cached copies (read-modify-write for partial blocks); on an origin
        //    error, drop them instead: the origin's contents are now unknown.
        let mut buf = vec![0u8; self.cfg.block_size.as_usize()];
        let mut first_err: Option<CacheError> = origin_result.err().map(CacheError::from);
        for (b, g, old) in touched {
            let bstart = b.0 * bs;
            let lo = offset.max(bstart);
            let hi = (offset + data.len() as u64).min(bstart + bs);
            let src = &data[usize::try_from(lo - offset).expect("within data")
                ..usize::try_from(hi - offset).expect("within data")];
            let within = usize::try_from(lo - bstart).expect("below block size");
            let full = src.len() == buf.len();
            let slot = match (old, full, first_err.is_some()) {
                (Some(m), _, true) => {
                    lock(&self.state).free.push(m.slot);
                    continue;
                }
                (_, _, true) => continue,
                (Some(m), _, false) => m.slot,
                (None, true, false) => {
                    match lock(&self.state).take_slot(&self.counters.evictions)? {
                        Some(s) => s,
                        None => continue,
                    }
                }
                // Partial write to an uncached block: write-around, nothing to update.
                (None, false, false) => continue,
            };
            if !full {
                if let Err(e) = self.data.read_exact_at(&mut buf, self.slot_offset(slot)) {
                    lock(&self.state).free.push(slot);
                    first_err.get_or_insert(self.data_err(slot)(e));
                    continue;
                }
            }
            buf[within..within + src.len()].copy_from_slice(src);
            if let Err(e) = self.data.write_all_at(&buf, self.slot_offset(slot)) {
                lock(&self.state).free.push(slot);
                first_err.get_or_insert(self.data_err(slot)(e));
                continue;
            }
            crate::failpoint::hit("write::after_slot");
            let crc = crc32fast::hash(&buf);
            lock(&self.state).map_block(b, Mapping { slot, gen: g, crc })?;
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let st = lock(&self.state);
        self.maybe_checkpoint(st)
    }

    /// Makes every completed write durable: origin, cache data, journal.
    pub fn flush(&self) -> Result<(), CacheError> {
        self.origin.flush()?;
        self.data.sync_data().map_err(self.data_err(0))?;
        lock(&self.state).journal.sync()?;
        Ok(())
    }

    fn maybe_checkpoint(&self, st: MutexGuard<'_, State>) -> Result<(), CacheError> {
        if st.journal.since_checkpoint() >= self.cfg.checkpoint_every {
            self.checkpoint_locked(st)?;
        }
        Ok(())
    }

    /// Writes a checkpoint (block map, heat map, pattern) and starts a new journal epoch.
    pub fn checkpoint(&self) -> Result<(), CacheError> {
        self.checkpoint_locked(lock(&self.state))
    }

    /// Checkpoints if anything changed since the last checkpoint (guest accesses, which
    /// only checkpoints persist, or journal records). Returns whether it wrote one.
    pub fn checkpoint_if_changed(&self) -> Result<bool, CacheError> {
        let st = lock(&self.state);
        if st.tick == st.checkpointed_tick && st.journal.since_checkpoint() == 0 {
            return Ok(false);
        }
        self.checkpoint_locked(st)?;
        Ok(true)
    }

    /// Starts a thread that calls [`BlockCache::checkpoint_if_changed`] every `every`, so
    /// that heat and pattern learned from a hit-only workload (which journals nothing)
    /// survive a crash too. Stopping or dropping the handle stops the thread promptly.
    pub fn spawn_checkpointer(self: &Arc<Self>, every: Duration) -> Checkpointer {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (cache, st) = (Arc::clone(self), Arc::clone(&stop));
        let handle = std::thread::Builder::new()
            .name("cache-checkpoint".into())
            .spawn(move || loop {
                let (m, cv) = &*st;
                let stopped = cv
                    .wait_timeout_while(lock(m), every, |stopped| !*stopped)
                    .unwrap_or_else(PoisonError::into_inner);
                if *stopped.0 {
                    return;
                }
                drop(stopped);
                if let Err(e) = cache.checkpoint_if_changed() {
                    tracing::warn!(error = %error_chain(&e), "periodic cache checkpoint failed");
                }
            })
            .map_err(|e| tracing::error!(error = %e, "cannot spawn the checkpoint thread"))
            .ok();
        Checkpointer { stop, handle }
    }

    fn checkpoint_locked(&self, mut st: MutexGuard<'_, State>) -> Result<(), CacheError> {
        // Data first: a checkpoint may name a slot only once its bytes are durable (else
        // a power loss would leave a checksum mismatch: safe, but a needless drop).
        self.data.sync_data().map_err(self.data_err(0))?;
        let epoch = st.journal.epoch() + 1;
        let mut blocks: Vec<BlockMeta> = st
            .map
            .iter()
            .map(|(b, m)| BlockMeta {
                block: b.0,
                slot: m.slot,
                gen: m.gen.0,
                crc: m.crc,
            })
            .collect();
        blocks.sort_by_key(|m| m.block);
        let body = CheckpointBody {
            epoch,
            block_size: self.cfg.block_size.bytes(),
            capacity_blocks: self.cfg.capacity_blocks,
            disk_size: self.disk_size,
            blocks,
            heat: st.heat.snapshot(),
            pattern: st.pattern.snapshot(),
        };
        crate::failpoint::hit("checkpoint::before_save");
        meta::save_checkpoint(&self.meta_path, &body)?;
        crate::failpoint::hit("checkpoint::before_journal_reset");
        st.journal.reset(epoch)?;
        st.checkpointed_tick = st.tick;
        tracing::debug!(epoch, blocks = body.blocks.len(), "cache checkpoint");
        Ok(())
    }
}

/// The periodic checkpoint thread of [`BlockCache::spawn_checkpointer`].
#[derive(Debug)]
pub struct Checkpointer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Stops the thread and waits for it (a checkpoint in progress completes first).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        *lock(&self.stop.0) = true;
        self.stop.1.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(feature = "nbd")]
impl nbd::BlockDevice for BlockCache {
    fn size(&self) -> u64 {
        self.disk_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read(buf, offset).map_err(to_io)
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.write(data, offset, fua).map_err(to_io)
    }

    fn flush(&self) -> io::Result<()> {
        BlockCache::flush(self).map_err(to_io)
    }
}

#[cfg(feature = "nbd")]
fn to_io(e: CacheError) -> io::Error {
    let kind = match &e {
        CacheError::OutOfRange { .. } => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    };
    tracing::error!(error = %error_chain(&e), "cache I/O failed");
    io::Error::new(kind, e)
}
