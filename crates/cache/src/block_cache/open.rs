//! Opening a cache: load the checkpoint, replay the journal, then verify every cached
//! block against its checksum and generation before serving it.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use model::error_chain;
use model::SplitMix64;

use super::{Counters, Mapping, State, STRIPES};
use crate::heat::HeatMap;
use crate::meta::{self, Journal, MetaSaveError, Record};
use crate::pattern::AccessPattern;
use crate::source::BlockOrigin;
use crate::types::{BlockIdx, Generation};
use crate::{BlockCache, CacheConfig, CacheError, CacheOpenError, OpenReport};

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
        // A pre-copy was interrupted: which blocks were provisional is not known, so none
        // is trusted (see `precopy`).
        let precopy_interrupted = super::precopy::interrupted(&cfg.dir);
        for (b, m) in entries {
            if precopy_interrupted {
                report.dropped_precopy += 1;
                continue;
            }
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
            dirty: None,
            provisional: None,
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
        if precopy_interrupted {
            let marker = cache.cfg.dir.join(super::precopy::MARKER);
            std::fs::remove_file(&marker).map_err(|err| {
                meta_err(MetaSaveError::Io {
                    step: "remove the pre-copy marker",
                    path: marker.clone(),
                    err,
                })
            })?;
            tracing::warn!(dir = %cache.cfg.dir.display(), dropped = report.dropped_precopy, "a cache pre-copy was interrupted: its blocks were dropped");
        }
        tracing::info!(
            dir = %cache.cfg.dir.display(),
            verified = report.verified,
            dropped_checksum = report.dropped_checksum,
            dropped_generation = report.dropped_generation,
            "cache opened"
        );
        Ok((cache, report))
    }
}
