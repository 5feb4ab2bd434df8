//! Cache pre-copy across a live migration: the destination fetches from the source's cache
//! while the memory still moves and the guest still writes on the source.
//!
//! Source: [`BlockCache::track_writes`] (at the snapshot) starts a dirty list of every
//! block written from then on, as QEMU keeps a dirty bitmap for block migration;
//! [`BlockCache::take_dirty`] (after QEMU's switch-over, when the source guest can no
//! longer write) ends it.
//!
//! Destination: [`BlockCache::begin_precopy`] makes every block installed from then on
//! *provisional*: never served to the guest (a read of one is fetched afresh, from the
//! source — whose cache is current once its guest stopped — or the origin), because the
//! source may have rewritten it after it was copied. [`BlockCache::apply_dirty`] with the
//! source's dirty list drops exactly the written blocks (their generation moves on, so a
//! fill of one still in flight is discarded too) and trusts the rest.
//!
//! Crash: `begin_precopy` leaves a `precopy` marker file in the cache directory until
//! `apply_dirty` removes it; an open that finds it drops every block (it cannot know
//! which were provisional), so a crash never turns a stale copy into a trusted one.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;

use super::{lock, State};
use crate::meta::Record;
use crate::types::BlockIdx;
use crate::{BlockCache, CacheError};

/// Name of the marker file of an unfinished pre-copy.
pub(super) const MARKER: &str = "precopy";

/// Whether `dir` holds the marker of an interrupted pre-copy.
pub(super) fn interrupted(dir: &Path) -> bool {
    dir.join(MARKER).exists()
}

impl BlockCache {
    /// Source: starts (or restarts) the dirty list: blocks written from now on.
    pub fn track_writes(&self) {
        lock(&self.state).dirty = Some(BTreeSet::new());
    }

    /// Source: ends the dirty list and returns it as sorted, disjoint ranges
    /// `[first block, block count]`. `None` if [`BlockCache::track_writes`] was not called
    /// since the cache was opened (the caller must then treat every block as dirty).
    pub fn take_dirty(&self) -> Option<Vec<[u64; 2]>> {
        let dirty = lock(&self.state).dirty.take()?;
        let mut ranges: Vec<[u64; 2]> = Vec::new();
        for b in dirty {
            match ranges.last_mut() {
                Some(r) if r[0] + r[1] == b => r[1] += 1,
                _ => ranges.push([b, 1]),
            }
        }
        Some(ranges)
    }

    /// Destination: from now on every installed block is provisional until
    /// [`BlockCache::apply_dirty`]. Persists the marker first.
    pub fn begin_precopy(&self) -> Result<(), CacheError> {
        let path = self.cfg.dir.join(MARKER);
        let marker = File::create(&path)
            .and_then(|f| f.sync_all())
            .and_then(|()| File::open(&self.cfg.dir)?.sync_all());
        marker.map_err(|err| CacheError::Data { path, slot: 0, err })?;
        let mut st = lock(&self.state);
        // Blocks already here were not copied from this source: they stay as they are.
        st.provisional = Some(HashSet::new());
        Ok(())
    }

    /// Whether a pre-copy awaits its dirty list.
    pub fn precopy_pending(&self) -> bool {
        lock(&self.state).provisional.is_some()
    }

    /// Destination: the source's dirty list (ranges `[first, count]`) arrived. Every
    /// block in it leaves the cache and its generation moves on (a fill of it in flight
    /// is discarded); every other provisional block is trusted from now on. Returns the
    /// number of cached blocks dropped.
    pub fn apply_dirty(&self, dirty: &[[u64; 2]]) -> Result<u64, CacheError> {
        let total = self.total_blocks();
        let mut dropped = 0u64;
        {
            let mut st = lock(&self.state);
            for r in dirty {
                let end = r[0].saturating_add(r[1]).min(total);
                for b in (r[0]..end).map(BlockIdx) {
                    // The new generation voids any fill of `b` in flight (`install` checks
                    // it under this lock). Only a cached copy needs it journalled: a fill
                    // voided in memory never writes its `Map` record.
                    let g = st.gen(b).next();
                    st.gens.insert(b, g);
                    if let Some(p) = st.provisional.as_mut() {
                        p.remove(&b);
                    }
                    if let Some(m) = st.map.remove(&b) {
                        st.journal.append(&Record::Bump { block: b, gen: g })?;
                        st.journal.append(&Record::Unmap { block: b })?;
                        let i = State::slot_index(m.slot);
                        st.slots[i] = None;
                        st.epochs[i].fetch_add(1, Ordering::SeqCst);
                        st.free.push(m.slot);
                        dropped += 1;
                    }
                }
            }
            st.journal.sync()?;
            st.provisional = None;
        }
        let path = self.cfg.dir.join(MARKER);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(CacheError::Data { path, slot: 0, err }),
        }
        tracing::info!(dropped, ranges = dirty.len(), "pre-copy dirty list applied");
        Ok(dropped)
    }
}
