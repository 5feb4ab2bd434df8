//! Access pattern: an online, bounded model of what block follows what.
//!
//! Three parts, all learned from the stream of block accesses:
//! - a successor table: for each block, its most frequent next blocks (at most
//!   [`FANOUT`], kept with the Misra–Gries frequent-items rule so memory is fixed);
//! - sequential streams: up to [`STREAMS`] concurrent `+1` runs, tracked separately so
//!   that a scan interleaved with random I/O (or with other scans) is still recognised,
//!   with statistics of how often a run of a given length continues; this lets the
//!   planner extrapolate a scan into blocks it has never seen;
//! - the recent history tail, whose newest entry is the cursor: where the VM reads now.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::types::BlockIdx;

/// Successors kept per block.
pub const FANOUT: usize = 4;
/// Distinct recent blocks kept in the history tail.
pub const HISTORY: usize = 16;
/// Concurrent sequential streams tracked (like a readahead engine's stream table).
pub const STREAMS: usize = 16;

/// One sequential stream: its head, length, and when it was active.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stream {
    /// The last block the stream read.
    pub last: u64,
    /// `+1` steps taken so far.
    pub run: u64,
    /// Access count when the stream started.
    pub first_tick: u64,
    /// Access count when the stream last read.
    pub last_tick: u64,
}

#[derive(Clone, Debug, Default)]
struct Succ {
    next: Vec<(BlockIdx, u32)>,
    total: u32,
    last: u64,
}

/// Online successor model of one disk's block accesses.
#[derive(Clone, Debug)]
pub struct AccessPattern {
    max_blocks: usize,
    accesses: u64,
    transitions: u64,
    succ: HashMap<BlockIdx, Succ>,
    streams: Vec<Stream>,
    seq_continue: [u64; RUN_BUCKETS],
    seq_break: [u64; RUN_BUCKETS],
    history: VecDeque<BlockIdx>,
}

/// Run-length buckets for the continuation statistics: 0, 1, 2–3, 4–7, 8–15, 16+.
pub const RUN_BUCKETS: usize = 6;

fn bucket(run_len: u64) -> usize {
    // A short +1 blip inside random I/O and a 1000-block scan continue with very
    // different odds, so continuation is learned per (log2) run length.
    let b = if run_len == 0 {
        0
    } else {
        1 + run_len.ilog2() as usize
    };
    b.min(RUN_BUCKETS - 1)
}

/// One successor list in a snapshot: `(block, transitions out of it, [(successor, count)])`.
pub type SuccRow = (u64, u32, Vec<(u64, u32)>);

/// Serializable form of an [`AccessPattern`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PatternSnapshot {
    /// Bound on the number of blocks with a successor list.
    pub max_blocks: usize,
    /// Accesses recorded, repeats of the same block included.
    pub accesses: u64,
    /// Transitions between distinct blocks recorded.
    pub transitions: u64,
    /// `(block, transitions out of it, [(successor, count)])`, by block index.
    pub succ: Vec<SuccRow>,
    /// Active sequential streams.
    #[serde(default)]
    pub streams: Vec<Stream>,
    /// Per run-length bucket: steps that were `+1`.
    pub seq_continue: Vec<u64>,
    /// Per run-length bucket: steps that were not.
    pub seq_break: Vec<u64>,
    /// Recent distinct blocks, oldest first; the last is the cursor.
    pub history: Vec<u64>,
}

impl AccessPattern {
    /// An empty model keeping successor lists for at most about `max_blocks` blocks.
    pub fn new(max_blocks: usize) -> Self {
        Self {
            max_blocks: max_blocks.max(1),
            accesses: 0,
            transitions: 0,
            succ: HashMap::new(),
            streams: Vec::with_capacity(STREAMS),
            seq_continue: [0; RUN_BUCKETS],
            seq_break: [0; RUN_BUCKETS],
            history: VecDeque::with_capacity(HISTORY),
        }
    }

    /// Records an access to `b`. Repeated accesses to the block under the cursor (several
    /// small reads inside one cache block) count as accesses but not as transitions, so
    /// they do not teach the model that a block follows itself.
    pub fn record(&mut self, b: BlockIdx) {
        // Saturating: a restored snapshot may carry any count.
        self.accesses = self.accesses.saturating_add(1);
        let tick = self.accesses;
        let prev = self.history.back().copied();
        if prev == Some(b) {
            if let Some(st) = self.streams.iter_mut().find(|st| st.last == b.0) {
                st.last_tick = tick;
            }
            return;
        }
        if let Some(p) = prev {
            self.transitions = self.transitions.saturating_add(1);
            self.learn(p, b);
        }
        self.follow_stream(b, prev, tick);
        self.history.retain(|h| *h != b);
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(b);
    }

    /// Counts `p -> b` in `p`'s successor list.
    fn learn(&mut self, p: BlockIdx, b: BlockIdx) {
        let tick = self.transitions;
        let e = self.succ.entry(p).or_default();
        e.total = e.total.saturating_add(1);
        e.last = tick;
        if let Some(slot) = e.next.iter_mut().find(|(n, _)| *n == b) {
            slot.1 = slot.1.saturating_add(1);
        } else if e.next.len() < FANOUT {
            e.next.push((b, 1));
        } else {
            // Misra–Gries: a newcomer that finds no room wears every counter down by
            // one, so only successors seen more than total/(FANOUT+1) times survive.
            for slot in &mut e.next {
                slot.1 -= 1;
            }
            e.next.retain(|(_, c)| *c > 0);
        }
        e.next.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
        if self.succ.len() > self.max_blocks + self.max_blocks / 4 {
            self.prune();
        }
    }

    /// Extends the stream that `b` continues, or starts a new one. A stream that ages out
    /// of the table without continuing counts as a run that broke at its length.
    fn follow_stream(&mut self, b: BlockIdx, prev: Option<BlockIdx>, tick: u64) {
        if let Some(st) = self.streams.iter_mut().find(|st| st.last == b.0) {
            st.last_tick = tick;
            return;
        }
        if let Some(i) = self
            .streams
            .iter()
            .position(|st| st.last.checked_add(1) == Some(b.0))
        {
            let st = self.streams[i];
            let k = bucket(st.run);
            self.seq_continue[k] = self.seq_continue[k].saturating_add(1);
            if prev != Some(BlockIdx(st.last)) {
                // Interleaved with other I/O: teach the table the stream's own order too.
                self.learn(BlockIdx(st.last), b);
            }
            self.streams[i] = Stream {
                last: b.0,
                run: st.run.saturating_add(1),
                last_tick: tick,
                ..st
            };
            return;
        }
        if self.streams.len() >= STREAMS {
            let (i, old) = self
                .streams
                .iter()
                .enumerate()
                .min_by_key(|(_, st)| st.last_tick)
                .map(|(i, st)| (i, *st))
                .expect("the table is full, so not empty");
            let k = bucket(old.run);
            self.seq_break[k] = self.seq_break[k].saturating_add(1);
            self.streams.swap_remove(i);
        }
        self.streams.push(Stream {
            last: b.0,
            run: 0,
            first_tick: tick,
            last_tick: tick,
        });
    }

    /// Forgets the least recently updated successor lists down to `max_blocks`.
    fn prune(&mut self) {
        let mut lasts: Vec<u64> = self.succ.values().map(|s| s.last).collect();
        lasts.sort_unstable();
        let cut = lasts[lasts.len() - self.max_blocks];
        self.succ.retain(|_, s| s.last >= cut);
    }

    /// The block the VM touched last, if any.
    pub fn cursor(&self) -> Option<BlockIdx> {
        self.history.back().copied()
    }

    /// Recent distinct blocks, newest first (the cursor first).
    pub fn recent(&self) -> impl Iterator<Item = BlockIdx> + '_ {
        self.history.iter().rev().copied()
    }

    /// Known successors of `b` with their estimated probability of coming next.
    ///
    /// Absolute discounting (as in Kneser–Ney smoothing): one observation is subtracted
    /// from every count, so a successor seen once — in random I/O, almost always chance —
    /// gets no weight, while one seen n times out of n gets (n−1)/n.
    pub fn successors(&self, b: BlockIdx) -> impl Iterator<Item = (BlockIdx, f64)> + '_ {
        self.succ.get(&b).into_iter().flat_map(|s| {
            let total = f64::from(s.total.max(1));
            s.next
                .iter()
                .filter(|(_, c)| *c > 1)
                .map(move |(n, c)| (*n, f64::from(*c - 1) / total))
        })
    }

    /// Probability that the next step is `+1` when the current run has `run_len` steps
    /// (smoothed towards 1/4 when there is little evidence).
    pub fn seq_continue_prob(&self, run_len: u64) -> f64 {
        let k = bucket(run_len);
        // Counts fit f64 exactly far beyond any run length we record.
        #[allow(clippy::cast_precision_loss)]
        let p = (self.seq_continue[k] as f64 + 0.5)
            / (self.seq_continue[k] as f64 + self.seq_break[k] as f64 + 2.0);
        p
    }

    /// Length (in `+1` steps) of the sequential stream whose head is `b`; 0 if none.
    pub fn run_len_at(&self, b: BlockIdx) -> u64 {
        self.streams
            .iter()
            .find(|st| st.last == b.0)
            .map_or(0, |st| st.run)
    }

    /// Length of the run the cursor is in; 0 if none.
    pub fn run_len(&self) -> u64 {
        self.cursor().map_or(0, |c| self.run_len_at(c))
    }

    /// Active sequential streams (at least one `+1` step), newest first.
    pub fn streams(&self) -> Vec<Stream> {
        let mut v: Vec<Stream> = self
            .streams
            .iter()
            .filter(|st| st.run > 0)
            .copied()
            .collect();
        v.sort_by(|a, b| b.last_tick.cmp(&a.last_tick).then(a.last.cmp(&b.last)));
        v
    }

    /// Accesses recorded so far (the pattern's logical clock).
    pub fn accesses(&self) -> u64 {
        self.accesses
    }

    /// Accesses per transition: how many accesses one step along the pattern is worth.
    pub fn accesses_per_transition(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let r = self.accesses as f64 / self.transitions.max(1) as f64;
        r.max(1.0)
    }

    /// Number of blocks with a successor list.
    pub fn len(&self) -> usize {
        self.succ.len()
    }

    /// Whether nothing has been learned yet.
    pub fn is_empty(&self) -> bool {
        self.succ.is_empty() && self.history.is_empty()
    }

    /// The model as plain data, sorted for deterministic output.
    pub fn snapshot(&self) -> PatternSnapshot {
        let mut succ: Vec<SuccRow> = self
            .succ
            .iter()
            .map(|(b, s)| {
                (
                    b.0,
                    s.total,
                    s.next.iter().map(|(n, c)| (n.0, *c)).collect(),
                )
            })
            .collect();
        succ.sort_by_key(|e| e.0);
        PatternSnapshot {
            max_blocks: self.max_blocks,
            accesses: self.accesses,
            transitions: self.transitions,
            succ,
            streams: self.streams.clone(),
            seq_continue: self.seq_continue.to_vec(),
            seq_break: self.seq_break.to_vec(),
            history: self.history.iter().map(|b| b.0).collect(),
        }
    }

    /// Rebuilds a model from a snapshot, clamping anything out of bounds.
    pub fn from_snapshot(s: &PatternSnapshot) -> Self {
        let mut m = Self::new(s.max_blocks);
        m.accesses = s.accesses;
        m.transitions = s.transitions;
        // A stream cannot end before it started (the planner divides by its duration).
        m.streams = s
            .streams
            .iter()
            .take(STREAMS)
            .map(|st| Stream {
                first_tick: st.first_tick.min(st.last_tick),
                ..*st
            })
            .collect();
        for (dst, src) in m.seq_continue.iter_mut().zip(&s.seq_continue) {
            *dst = *src;
        }
        for (dst, src) in m.seq_break.iter_mut().zip(&s.seq_break) {
            *dst = *src;
        }
        for (i, (b, total, next)) in s.succ.iter().enumerate() {
            let mut next: Vec<(BlockIdx, u32)> = next
                .iter()
                // A count of 0 is never kept in memory (eviction decrements to it and
                // drops the entry); restored, it would underflow on the next decrement.
                .filter(|(_, c)| *c > 0)
                .take(FANOUT)
                .map(|(n, c)| (BlockIdx(*n), *c))
                .collect();
            next.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
            let sum = next.iter().fold(0u32, |a, (_, c)| a.saturating_add(*c));
            let total = (*total).max(sum);
            m.succ.insert(
                BlockIdx(*b),
                Succ {
                    next,
                    total,
                    last: i as u64,
                },
            );
        }
        let skip = s.history.len().saturating_sub(HISTORY);
        m.history = s.history.iter().skip(skip).map(|b| BlockIdx(*b)).collect();
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_most_frequent_successor() {
        let mut p = AccessPattern::new(100);
        for _ in 0..10 {
            p.record(BlockIdx(1));
            p.record(BlockIdx(5));
        }
        p.record(BlockIdx(1));
        p.record(BlockIdx(9));
        let s: Vec<_> = p.successors(BlockIdx(1)).collect();
        assert_eq!(s[0].0, BlockIdx(5));
        assert!(s[0].1 > 0.8);
        // 1 -> 9 was seen once: chance, not a pattern.
        assert_eq!(s.len(), 1);
        assert_eq!(p.cursor(), Some(BlockIdx(9)));
    }

    #[test]
    fn repeats_are_not_transitions() {
        let mut p = AccessPattern::new(100);
        for _ in 0..5 {
            p.record(BlockIdx(3));
        }
        assert_eq!(p.successors(BlockIdx(3)).count(), 0);
        assert!((p.accesses_per_transition() - 5.0).abs() < 1e-9);
    }

    #[test]
    fn fan_out_and_table_are_bounded() {
        let mut p = AccessPattern::new(50);
        for i in 0..10_000u64 {
            p.record(BlockIdx(0));
            p.record(BlockIdx(1 + i));
        }
        assert!(p.successors(BlockIdx(0)).count() <= FANOUT);
        assert!(p.len() <= 50 + 50 / 4 + 1, "{}", p.len());
        assert!(p.recent().count() <= HISTORY);
    }

    #[test]
    fn detects_sequential_runs() {
        let mut seq = AccessPattern::new(1000);
        for i in 0..200 {
            seq.record(BlockIdx(i));
        }
        assert_eq!(seq.run_len(), 199);
        assert!(seq.seq_continue_prob(199) > 0.95);
        // Interleaved with random I/O, a scan is still recognised as one stream.
        let mut mix = AccessPattern::new(1000);
        for pass in 0..2u64 {
            for i in 0..200u64 {
                mix.record(BlockIdx(10_000 + i));
                mix.record(BlockIdx((i + pass * 200).wrapping_mul(7919) % 1009));
                mix.record(BlockIdx(
                    (i + pass * 200).wrapping_mul(104_729) % 5003 + 2000,
                ));
            }
        }
        assert!(mix.seq_continue_prob(150) > 0.9);
        assert_eq!(mix.run_len_at(BlockIdx(10_199)), 199);
        // Seen in two scans, the stream's own order is in the successor table.
        assert!(mix
            .successors(BlockIdx(10_100))
            .any(|(n, _)| n == BlockIdx(10_101)));
        let mut rnd = AccessPattern::new(1000);
        for i in 0..200u64 {
            rnd.record(BlockIdx(i.wrapping_mul(7919) % 1009));
        }
        assert!(rnd.seq_continue_prob(0) < 0.01);
        // A fresh +1 blip in random I/O is not evidence of a scan.
        assert!(rnd.seq_continue_prob(1) <= 0.25);
    }

    #[test]
    fn snapshot_round_trips() {
        let mut p = AccessPattern::new(100);
        for i in 0..300u64 {
            p.record(BlockIdx(i % 13));
            p.record(BlockIdx((i * 5) % 17));
        }
        let s = p.snapshot();
        let json = serde_json::to_string(&s).unwrap();
        let back = AccessPattern::from_snapshot(&serde_json::from_str(&json).unwrap());
        assert_eq!(back.snapshot(), s);
    }

    /// Found by the `cache_meta` fuzz target: a checkpoint (or a migration snapshot) is
    /// outside input, and a stream that ends before it starts, a zero successor count or
    /// counters at their maximum made the planner or the next access overflow.
    #[test]
    fn hostile_snapshot_is_clamped() {
        let s = PatternSnapshot {
            max_blocks: 4,
            accesses: u64::MAX,
            transitions: u64::MAX,
            succ: vec![
                (1, 0, vec![(2, 0), (3, u32::MAX), (4, u32::MAX), (5, 1)]),
                (2, u32::MAX, vec![(3, u32::MAX)]),
            ],
            streams: vec![Stream {
                last: 3,
                run: u64::MAX,
                first_tick: 1,
                last_tick: 0,
            }],
            seq_continue: vec![u64::MAX; RUN_BUCKETS],
            seq_break: vec![u64::MAX; RUN_BUCKETS],
            history: vec![1, 2, 3],
        };
        let mut p = AccessPattern::from_snapshot(&s);
        assert!(p.streams.iter().all(|st| st.first_tick <= st.last_tick));
        assert!(p.succ.values().all(|e| e.next.iter().all(|(_, c)| *c > 0)));
        let have: crate::BlockSet = (0..8).map(BlockIdx).collect();
        let heat = crate::HeatMap::new(10, 10);
        for strategy in [crate::Strategy::Pattern, crate::Strategy::HeatPattern] {
            let plan = crate::plan_fetch(strategy, &heat, &p, &have, p.cursor(), 8);
            assert_eq!(plan.len(), have.len());
        }
        for b in [4, 1, 9, 10, 11, 1, 1, 2, 3, 4] {
            p.record(BlockIdx(b));
        }
        for b in 20..60 {
            p.record(BlockIdx(b * 7));
        }
        assert!(p.seq_continue_prob(u64::MAX).is_finite());
        assert_eq!(p.accesses(), u64::MAX);
    }
}
