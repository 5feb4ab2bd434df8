//! Rebuild engine: warms a destination cache after a migration by prefetching the plan
//! from the peer (the source host's cache), origin only for blocks the peer lacks.
//!
//! One background thread per rebuild. Guest misses on the destination go first: before
//! each prefetch the thread waits (briefly) while any demand fetch is in flight. A
//! prefetched block is installed only if no write bumped its generation meanwhile (see
//! [`BlockCache::prefetch`]). Cancel with [`Rebuild::cancel`]; the thread stops after the
//! block in hand, and dropping a [`Rebuild`] cancels and joins it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use model::error_chain;

use crate::block_cache::{BlockCache, Fetched, MigrationSnapshot};
use crate::heat::HeatMap;
use crate::pattern::AccessPattern;
use crate::plan::{plan_fetch, Strategy};
use crate::source::BlockSource;
use crate::types::{BlockIdx, BlockSet, BlockSize};

/// Progress of a rebuild, as numbers for a bar or the migration object.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildProgress {
    /// Blocks in the plan.
    pub planned: u64,
    /// Plan entries handled (installed, skipped, raced or failed).
    pub done: u64,
    /// Blocks installed by the prefetcher.
    pub installed: u64,
    /// Blocks already cached (a guest miss got there first).
    pub skipped: u64,
    /// Blocks discarded because a guest write bumped them mid-fetch.
    pub raced: u64,
    /// Blocks that could not be fetched at all.
    pub failed: u64,
    /// Prefetched bytes that came from the peer.
    pub bytes_from_peer: u64,
    /// Prefetched bytes that came from the origin.
    pub bytes_from_origin: u64,
}

impl RebuildProgress {
    /// Plan entries not handled yet.
    pub fn left(&self) -> u64 {
        self.planned.saturating_sub(self.done)
    }
}

#[derive(Debug, Default)]
struct Shared {
    done: AtomicU64,
    installed: AtomicU64,
    skipped: AtomicU64,
    raced: AtomicU64,
    failed: AtomicU64,
    peer: AtomicU64,
    origin: AtomicU64,
    cancel: AtomicBool,
}

/// A running rebuild.
#[derive(Debug)]
pub struct Rebuild {
    planned: u64,
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

/// What a rebuild executes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildPlan {
    /// The static fetch order made at switch-over.
    pub blocks: Vec<BlockIdx>,
    /// For the pattern strategies: the peer's blocks, among which the engine also
    /// prefetches [`BlockCache::lookahead`] as the guest moves, ahead of the static order.
    pub follow: Option<BlockSet>,
}

/// Blocks of look-ahead taken each time the guest has moved.
const LOOKAHEAD: usize = 16;

/// Prepares a destination for a migration: adopts the source's history, points misses at
/// `peer` and returns the plan for `strategy` (empty for `none` and `redirect`; `none`
/// also leaves the peer unset, so misses go to the origin).
pub fn prepare_destination(
    dest: &BlockCache,
    snap: &MigrationSnapshot,
    peer: Arc<dyn BlockSource>,
    strategy: Strategy,
) -> RebuildPlan {
    dest.adopt_history(snap);
    if strategy.uses_peer() {
        dest.set_peer(Some(peer));
    }
    let heat = HeatMap::from_snapshot(&snap.heat);
    let pattern = AccessPattern::from_snapshot(&snap.pattern);
    let total = BlockSize::new(snap.block_size)
        .map_or(0, |bs| bs.blocks_for(snap.disk_size))
        .min(dest.total_blocks());
    let have = snap.block_set();
    let blocks = plan_fetch(strategy, &heat, &pattern, &have, pattern.cursor(), total);
    let follow = matches!(strategy, Strategy::Pattern | Strategy::HeatPattern).then_some(have);
    RebuildPlan { blocks, follow }
}

impl Rebuild {
    /// Starts prefetching `plan` into `dest` on a background thread.
    pub fn start(dest: Arc<BlockCache>, plan: RebuildPlan) -> Self {
        let shared = Arc::new(Shared::default());
        let planned = plan.blocks.len() as u64;
        let sh = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("cache-rebuild".into())
            .spawn(move || run(&dest, &plan, &sh))
            .map_err(|e| tracing::error!(error = %e, "cannot spawn the rebuild thread"))
            .ok();
        Self {
            planned,
            shared,
            handle,
        }
    }

    /// Progress so far.
    pub fn progress(&self) -> RebuildProgress {
        let s = &self.shared;
        RebuildProgress {
            planned: self.planned,
            done: s.done.load(Ordering::Relaxed),
            installed: s.installed.load(Ordering::Relaxed),
            skipped: s.skipped.load(Ordering::Relaxed),
            raced: s.raced.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            bytes_from_peer: s.peer.load(Ordering::Relaxed),
            bytes_from_origin: s.origin.load(Ordering::Relaxed),
        }
    }

    /// Whether the prefetch thread has finished.
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Asks the prefetch thread to stop after the block in hand.
    pub fn cancel(&self) {
        self.shared.cancel.store(true, Ordering::Relaxed);
    }

    /// Waits for the prefetch thread and returns the final progress.
    pub fn join(mut self) -> RebuildProgress {
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                tracing::error!("rebuild thread panicked");
            }
        }
        self.progress()
    }
}

/// Prefetches one block, demand first, and accounts for it.
fn fetch_one(dest: &BlockCache, b: BlockIdx, bs: u64, sh: &Shared) {
    // Guest misses first: they share the link to the peer and a guest is waiting.
    dest.wait_for_demand_idle(Duration::from_millis(50));
    match dest.prefetch(b) {
        Ok(None) => {
            sh.skipped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Some((from, installed))) => {
            let ctr = if from == Fetched::Peer {
                &sh.peer
            } else {
                &sh.origin
            };
            ctr.fetch_add(bs, Ordering::Relaxed);
            let ctr = if installed { &sh.installed } else { &sh.raced };
            ctr.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            // One unreadable block must not stop the warm-up; the guest will fetch it on
            // demand (and see the error then, if it persists).
            tracing::warn!(block = b.0, error = %error_chain(&e), "prefetch failed");
            sh.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Rebuild {
    fn drop(&mut self) {
        self.cancel();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run(dest: &BlockCache, plan: &RebuildPlan, sh: &Shared) {
    let bs = u64::from(dest.block_size().bytes());
    tracing::info!(
        planned = plan.blocks.len(),
        follow = plan.follow.is_some(),
        "rebuild started"
    );
    let mut seen = dest.accesses();
    for &b in &plan.blocks {
        if sh.cancel.load(Ordering::Relaxed) {
            tracing::info!("rebuild cancelled");
            return;
        }
        // The guest moved since we last looked: fetch what it will read next first.
        if let Some(have) = &plan.follow {
            let now = dest.accesses();
            if now != seen {
                seen = now;
                for a in dest.lookahead(LOOKAHEAD) {
                    if have.contains(&a) && !dest.contains(a) {
                        fetch_one(dest, a, bs, sh);
                    }
                }
            }
        }
        fetch_one(dest, b, bs, sh);
        sh.done.fetch_add(1, Ordering::Relaxed);
    }
    tracing::info!(
        installed = sh.installed.load(Ordering::Relaxed),
        raced = sh.raced.load(Ordering::Relaxed),
        "rebuild finished"
    );
}
