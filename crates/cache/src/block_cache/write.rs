//! The write path: generations bumped and journalled before the origin sees the data,
//! then the cache updated; and flush.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use super::{lock, Mapping, State, STRIPES};
use crate::meta::Record;
use crate::types::{BlockIdx, Generation};
use crate::{BlockCache, CacheError};

impl BlockCache {
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
                if let Some(d) = st.dirty.as_mut() {
                    d.insert(b.0);
                }
                let mut old = st.map.remove(&b);
                if let Some(m) = old {
                    let i = State::slot_index(m.slot);
                    st.slots[i] = None;
                    st.epochs[i].fetch_add(1, Ordering::SeqCst);
                }
                // A provisional copy may be stale: a partial write must not merge into it
                // (read-modify-write), so its slot is freed and the write goes around.
                if st.provisional.as_mut().is_some_and(|p| p.remove(&b)) {
                    if let Some(m) = old.take() {
                        st.free.push(m.slot);
                    }
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
}
