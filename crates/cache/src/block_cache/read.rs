//! The read path: hits without the state lock (epoch-checked), misses filled from the peer
//! or the origin, prefetches for a rebuild, and what a peer is served.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::time::Duration;

use model::error_chain;

use super::{lock, Mapping, State};
use crate::types::{BlockIdx, Generation};
use crate::{BlockCache, CacheError, Fetched};

impl BlockCache {
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
    pub(super) fn read_in_block(
        &self,
        b: BlockIdx,
        within: usize,
        out: &mut [u8],
    ) -> Result<(), CacheError> {
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
                // A provisional block (copied during a pre-copy, the source's dirty list
                // not applied yet) may be stale: fetch it afresh instead.
                let provisional = st.provisional.as_ref().is_some_and(|p| p.contains(&b));
                st.map.get(&b).filter(|_| !provisional).map(|m| {
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

    pub(super) fn fetch(&self, b: BlockIdx, buf: &mut [u8]) -> Result<Fetched, CacheError> {
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
        if let Some(p) = st.provisional.as_mut() {
            p.insert(b);
        }
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

    pub(super) fn check_range(&self, offset: u64, len: usize) -> Result<(), CacheError> {
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
}
