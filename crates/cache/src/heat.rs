//! Heat map: per-block access counts with exponential decay, in bounded memory.
//!
//! Time is logical and passed in by the caller (the cache uses its access counter), so the
//! map is deterministic and testable: no wall clock is read here.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::types::BlockIdx;

/// Decayed access counts for the hottest blocks of one disk.
///
/// Each tracked block keeps `(score, last)`: its decayed count as of logical time `last`.
/// Its heat at a later time `now` is `score * 0.5^((now - last) / half_life)`, so an access
/// `half_life` ticks ago weighs half as much as one now. Memory is bounded by `max_tracked`:
/// when the map grows 25% past it, the coldest blocks are forgotten (their heat is small by
/// construction, so the error is confined to the cold tail that no plan starts with).
#[derive(Clone, Debug)]
pub struct HeatMap {
    half_life: u64,
    max_tracked: usize,
    now: u64,
    entries: HashMap<BlockIdx, Entry>,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    score: f64,
    last: u64,
}

/// Serializable form of a [`HeatMap`]: heats normalised to one instant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeatSnapshot {
    /// Half-life in ticks of logical time.
    pub half_life: u64,
    /// Bound on the number of tracked blocks.
    pub max_tracked: usize,
    /// The instant the heats are given at.
    pub now: u64,
    /// `(block, heat at now)`, hottest first.
    pub entries: Vec<(u64, f64)>,
}

impl HeatMap {
    /// An empty map. `half_life` is in ticks (0 is treated as 1); `max_tracked` bounds memory.
    pub fn new(half_life: u64, max_tracked: usize) -> Self {
        Self {
            half_life: half_life.max(1),
            max_tracked: max_tracked.max(1),
            now: 0,
            entries: HashMap::new(),
        }
    }

    fn decay(&self, from: u64, to: u64) -> f64 {
        let dt = to.saturating_sub(from);
        // Ticks fit f64 exactly up to 2^53; beyond that decay is 0 anyway.
        #[allow(clippy::cast_precision_loss)]
        let halves = dt as f64 / self.half_life as f64;
        0.5f64.powf(halves)
    }

    /// Records one access to `b` at logical time `now` (times must not go backwards; an
    /// earlier time is treated as the latest seen).
    pub fn record(&mut self, b: BlockIdx, now: u64) {
        let now = now.max(self.now);
        self.now = now;
        let d = self.entries.get(&b).map(|e| self.decay(e.last, now));
        match (self.entries.get_mut(&b), d) {
            (Some(e), Some(d)) => {
                e.score = e.score * d + 1.0;
                e.last = now;
            }
            _ => {
                self.entries.insert(
                    b,
                    Entry {
                        score: 1.0,
                        last: now,
                    },
                );
            }
        }
        if self.entries.len() > self.max_tracked + self.max_tracked / 4 {
            self.prune();
        }
    }

    /// Forgets the coldest blocks down to `max_tracked`.
    fn prune(&mut self) {
        let ranked = self.hottest();
        let keep: std::collections::HashSet<BlockIdx> = ranked
            .iter()
            .take(self.max_tracked)
            .map(|(b, _)| *b)
            .collect();
        self.entries.retain(|b, _| keep.contains(b));
        tracing::debug!(kept = self.entries.len(), "heat map pruned");
    }

    /// Heat of `b` at the latest time seen (0 for an untracked block).
    pub fn heat(&self, b: BlockIdx) -> f64 {
        self.entries
            .get(&b)
            .map_or(0.0, |e| e.score * self.decay(e.last, self.now))
    }

    /// The latest logical time seen.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Number of tracked blocks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no block is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sum of all heats at the latest time seen: the denominator of a block's share.
    pub fn total(&self) -> f64 {
        self.entries.keys().map(|b| self.heat(*b)).sum()
    }

    /// All tracked blocks, hottest first; ties broken by block index for determinism.
    pub fn hottest(&self) -> Vec<(BlockIdx, f64)> {
        let mut v: Vec<(BlockIdx, f64)> =
            self.entries.keys().map(|b| (*b, self.heat(*b))).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// The map as plain data, heats normalised to the latest time seen.
    pub fn snapshot(&self) -> HeatSnapshot {
        HeatSnapshot {
            half_life: self.half_life,
            max_tracked: self.max_tracked,
            now: self.now,
            entries: self.hottest().into_iter().map(|(b, h)| (b.0, h)).collect(),
        }
    }

    /// Rebuilds a map from a snapshot. Non-finite or negative heats are dropped.
    pub fn from_snapshot(s: &HeatSnapshot) -> Self {
        let mut m = Self::new(s.half_life, s.max_tracked);
        m.now = s.now;
        for &(b, h) in &s.entries {
            if h.is_finite() && h > 0.0 {
                m.entries.insert(
                    BlockIdx(b),
                    Entry {
                        score: h,
                        last: s.now,
                    },
                );
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decays_by_half_per_half_life() {
        let mut h = HeatMap::new(100, 10);
        h.record(BlockIdx(1), 0);
        h.record(BlockIdx(2), 100);
        assert!((h.heat(BlockIdx(1)) - 0.5).abs() < 1e-9);
        assert!((h.heat(BlockIdx(2)) - 1.0).abs() < 1e-9);
        h.record(BlockIdx(1), 100);
        assert!((h.heat(BlockIdx(1)) - 1.5).abs() < 1e-9);
    }

    #[test]
    fn recent_beats_old_with_equal_counts() {
        let mut h = HeatMap::new(50, 100);
        for t in 0..10 {
            h.record(BlockIdx(7), t);
        }
        for t in 1000..1010 {
            h.record(BlockIdx(9), t);
        }
        assert_eq!(h.hottest()[0].0, BlockIdx(9));
    }

    #[test]
    fn memory_is_bounded_and_keeps_the_hot() {
        let mut h = HeatMap::new(1_000_000, 100);
        for t in 0..1000u64 {
            h.record(BlockIdx(0), t * 3);
            h.record(BlockIdx(1000 + t), t * 3 + 1);
        }
        assert!(h.len() <= 125, "{}", h.len());
        assert_eq!(h.hottest()[0].0, BlockIdx(0));
    }

    #[test]
    fn snapshot_round_trips() {
        let mut h = HeatMap::new(10, 100);
        for t in 0..50u64 {
            h.record(BlockIdx(t % 7), t);
        }
        let s = h.snapshot();
        let json = serde_json::to_string(&s).unwrap();
        let back: HeatSnapshot = serde_json::from_str(&json).unwrap();
        let h2 = HeatMap::from_snapshot(&back);
        for b in 0..7 {
            assert!((h.heat(BlockIdx(b)) - h2.heat(BlockIdx(b))).abs() < 1e-9);
        }
    }
}
