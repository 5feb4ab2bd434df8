//! Checkpoints: on demand, every few thousand journal records, and from a periodic thread.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use model::error_chain;

use super::{lock, State};
use crate::meta::{self, BlockMeta, CheckpointBody};
use crate::{BlockCache, CacheError};

impl BlockCache {
    pub(super) fn maybe_checkpoint(&self, st: MutexGuard<'_, State>) -> Result<(), CacheError> {
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

    pub(super) fn checkpoint_locked(
        &self,
        mut st: MutexGuard<'_, State>,
    ) -> Result<(), CacheError> {
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
