//! Fetch planner: the order in which a warming cache pulls blocks from its peer.
//!
//! Pure and deterministic: no clock, no I/O, no randomness. The rebuild engine executes
//! the plan; the benchmark compares strategies on the same snapshot.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::heat::HeatMap;
use crate::pattern::AccessPattern;
use crate::types::{BlockIdx, BlockSet};

/// How a destination cache is warmed after a migration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Strategy {
    /// Cold cache: misses go to the origin, nothing is prefetched.
    #[serde(rename = "none")]
    None,
    /// Misses read from the source host's cache, nothing is prefetched.
    #[serde(rename = "redirect")]
    Redirect,
    /// Background copy of the source's blocks in block order (dm-clone, drive-mirror).
    #[serde(rename = "linear")]
    Linear,
    /// Copy all of the source's blocks before switch-over (vSphere Flash Read Cache).
    #[serde(rename = "full-copy")]
    FullCopy,
    /// Hottest first: the heat map alone (the prior art).
    #[serde(rename = "heat")]
    Heat,
    /// Walk the access pattern from the cursor, then block order.
    #[serde(rename = "pattern")]
    Pattern,
    /// The seed's method: earliest expected access first, from heat and pattern together.
    #[default]
    #[serde(rename = "heat+pattern")]
    HeatPattern,
}

impl Strategy {
    /// Every strategy, in the order tables list them.
    pub const ALL: [Strategy; 7] = [
        Strategy::None,
        Strategy::Redirect,
        Strategy::Linear,
        Strategy::FullCopy,
        Strategy::Heat,
        Strategy::Pattern,
        Strategy::HeatPattern,
    ];

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::None => "none",
            Strategy::Redirect => "redirect",
            Strategy::Linear => "linear",
            Strategy::FullCopy => "full-copy",
            Strategy::Heat => "heat",
            Strategy::Pattern => "pattern",
            Strategy::HeatPattern => "heat+pattern",
        }
    }

    /// Whether demand misses may read from the peer (source host's cache).
    pub fn uses_peer(self) -> bool {
        self != Strategy::None
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A strategy name that is not one of [`Strategy::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown fetch strategy {0:?} (expected none, redirect, linear, full-copy, heat, pattern or heat+pattern)")]
pub struct UnknownStrategy(pub String);

impl FromStr for Strategy {
    type Err = UnknownStrategy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| UnknownStrategy(s.to_owned()))
    }
}

/// How far ahead (in expected guest accesses) [`lookahead`] guesses.
pub const LOOKAHEAD_HORIZON: f64 = 64.0;

/// Bound on blocks visited by the pattern walk, so planning stays O(plan) for huge tables.
const MAX_WALK: usize = 1 << 18;
/// Recent blocks the walk starts from besides the cursor: the VM may be running a few
/// interleaved streams, and recently touched blocks are likely to be touched again.
const START_POINTS: usize = 8;

/// The order in which to fetch the blocks in `have` (the blocks the peer can serve), for a
/// disk of `total_blocks` blocks. Returns a permutation of `have ∩ [0, total_blocks)` for
/// the prefetching strategies and an empty plan for `none` and `redirect`.
///
/// `heat+pattern` ranks every block by its *expected number of accesses until the VM
/// touches it*, and fetches the smallest first:
/// - from the heat map, a block with share `s` of all (decayed) accesses is touched on
///   average every `1/s` accesses;
/// - from the pattern, a block reached from the cursor along successor edges after `d`
///   steps with path probability `p` is expected after about `d/p` steps (times the
///   accesses one step is worth).
///
/// A block takes the smaller of the two, so the next blocks of a scan in progress come
/// before hot blocks elsewhere, and hot blocks come before improbable pattern guesses.
///
/// ```
/// use cache::{plan_fetch, AccessPattern, BlockIdx, BlockSet, HeatMap, Strategy};
/// let (mut heat, mut pat) = (HeatMap::new(1000, 100), AccessPattern::new(100));
/// for (t, b) in [5u64, 5, 5, 1, 2].into_iter().enumerate() {
///     heat.record(BlockIdx(b), t as u64);
///     pat.record(BlockIdx(b));
/// }
/// let have: BlockSet = [1, 2, 3, 5].into_iter().map(BlockIdx).collect();
/// let plan = plan_fetch(Strategy::Heat, &heat, &pat, &have, pat.cursor(), 10);
/// assert_eq!(plan[0], BlockIdx(5));
/// ```
pub fn plan_fetch(
    strategy: Strategy,
    heat: &HeatMap,
    pattern: &AccessPattern,
    have: &BlockSet,
    cursor: Option<BlockIdx>,
    total_blocks: u64,
) -> Vec<BlockIdx> {
    let needed = || have.iter().copied().filter(|b| b.0 < total_blocks);
    match strategy {
        Strategy::None | Strategy::Redirect => Vec::new(),
        Strategy::Linear | Strategy::FullCopy => needed().collect(),
        Strategy::Heat => {
            let mut v: Vec<(BlockIdx, f64)> = needed().map(|b| (b, heat.heat(b))).collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            v.into_iter().map(|(b, _)| b).collect()
        }
        Strategy::Pattern => {
            let walk = pattern_costs(pattern, cursor, total_blocks);
            let mut v: Vec<(BlockIdx, f64)> = needed()
                .map(|b| (b, walk.get(&b).copied().unwrap_or(f64::INFINITY)))
                .collect();
            sort_by_cost(&mut v);
            v.into_iter().map(|(b, _)| b).collect()
        }
        Strategy::HeatPattern => {
            let walk = pattern_costs(pattern, cursor, total_blocks);
            let total = heat.total();
            let mut v: Vec<(BlockIdx, f64)> = needed()
                .map(|b| {
                    let h = heat.heat(b);
                    let by_heat = if h > 0.0 { total / h } else { f64::INFINITY };
                    // A block that reliably follows its predecessor (inside a table scan)
                    // is fetched just in time by the look-ahead once the guest reaches
                    // that predecessor; spending the link on it early delays blocks that
                    // nothing predicts.
                    let by_heat = if followable(pattern, have, b) {
                        by_heat * FOLLOW_DEFER
                    } else {
                        by_heat
                    };
                    let by_pattern = walk.get(&b).copied().unwrap_or(f64::INFINITY);
                    (b, by_heat.min(by_pattern))
                })
                .collect();
            sort_by_cost(&mut v);
            v.into_iter().map(|(b, _)| b).collect()
        }
    }
}

/// Factor by which [`Strategy::HeatPattern`] defers the heat-based cost of a followable
/// block (see [`followable`]).
const FOLLOW_DEFER: f64 = 4.0;

/// Whether `b`'s predecessor is on the peer too and `b` was seen following it more than
/// once: the look-ahead will then bring `b` right after the guest reads `b − 1`.
fn followable(pattern: &AccessPattern, have: &BlockSet, b: BlockIdx) -> bool {
    let Some(prev) = b.0.checked_sub(1).map(BlockIdx) else {
        return false;
    };
    have.contains(&prev) && pattern.successors(prev).any(|(n, p)| n == b && p > 0.0)
}

/// Ascending cost, ties (and the infinite tail) in block order.
fn sort_by_cost(v: &mut [(BlockIdx, f64)]) {
    v.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
}

#[derive(PartialEq)]
struct Node {
    cost: f64,
    depth: u32,
    prob: f64,
    /// The least likely step on the path so far (1 at a start point).
    step: f64,
    run: u64,
    scale: f64,
    /// Cost of the start point this path began at (how long ago its stream was active).
    base: f64,
    block: BlockIdx,
}
impl Eq for Node {}
impl Ord for Node {
    fn cmp(&self, o: &Self) -> Ordering {
        // Min-heap on cost; block index breaks ties so the walk is deterministic.
        o.cost.total_cmp(&self.cost).then(o.block.cmp(&self.block))
    }
}
impl PartialOrd for Node {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// Expected accesses until each block reachable from the cursor is touched, by a
/// best-first walk of the successor graph (cost `d/p` only grows along a path, so the
/// first time a block is popped is its cheapest route, as in Dijkstra).
fn pattern_costs(
    pattern: &AccessPattern,
    cursor: Option<BlockIdx>,
    total_blocks: u64,
) -> HashMap<BlockIdx, f64> {
    // Only the cursor and the live streams: a block read just before switch-over is no
    // likelier than its heat says to be read again soon (the heat map has it), and
    // pricing it as imminent put useless fetches first on random workloads.
    walk(pattern, cursor, total_blocks, MAX_WALK, 0)
        .into_iter()
        .map(|(b, c, _, _)| (b, c))
        .collect()
}

/// The blocks the VM is expected to read next from where it reads now, by the access
/// pattern alone, cheapest first: at most `k`, excluding the blocks it just read. The
/// rebuild engine prefetches these ahead of its static plan as the VM moves (the plan was
/// made at switch-over; the cursor has moved on since).
///
/// Only blocks expected within [`LOOKAHEAD_HORIZON`] guest accesses qualify: a guess
/// further out would displace cached blocks for data that may never be read.
pub fn lookahead(pattern: &AccessPattern, k: usize, total_blocks: u64) -> Vec<BlockIdx> {
    let limit = k + START_POINTS + crate::pattern::STREAMS + 1;
    walk(pattern, pattern.cursor(), total_blocks, limit, START_POINTS)
        .into_iter()
        // Start points (the cursor, recent blocks, stream heads) were read already.
        .filter(|(_, cost, depth, step)| {
            *depth > 0 && *cost <= LOOKAHEAD_HORIZON && *step >= MIN_GUESS_PROB
        })
        .map(|(b, _, _, _)| b)
        .take(k)
        .collect()
}

/// Every step on a look-ahead guess's path must be more likely than not: fetching one of
/// several possible children (a B-tree node's) ahead of the static plan takes the link
/// from blocks the heat map ranks surer, while a scan's next blocks qualify however far.
pub const MIN_GUESS_PROB: f64 = 0.5;

/// Best-first walk; returns up to `limit` blocks with their costs and depths, cheapest first.
fn walk(
    pattern: &AccessPattern,
    cursor: Option<BlockIdx>,
    total_blocks: u64,
    limit: usize,
    start_points: usize,
) -> Vec<(BlockIdx, f64, u32, f64)> {
    let scale = pattern.accesses_per_transition();
    let now = pattern.accesses();
    let mut heap = BinaryHeap::new();
    let mut starts: Vec<BlockIdx> = cursor.into_iter().collect();
    starts.extend(
        pattern
            .recent()
            .filter(|b| Some(*b) != cursor)
            .take(start_points),
    );
    for (rank, b) in starts.into_iter().enumerate() {
        // The i-th most recent block: the VM is likely still near it, less so the older it is.
        let rank = u32::try_from(rank).unwrap_or(u32::MAX);
        let prob = 0.5f64.powi(i32::try_from(rank).unwrap_or(i32::MAX));
        let run = pattern.run_len_at(b);
        let base = f64::from(rank) * scale;
        heap.push(Node {
            cost: base,
            depth: 0,
            prob,
            step: 1.0,
            run,
            scale,
            base,
            block: b,
        });
    }
    // Every live sequential stream is a start point too, paced by its own rate: a scan
    // that reads one block per 4 guest accesses reaches its k-th next block after ~4k.
    for st in pattern.streams() {
        #[allow(clippy::cast_precision_loss)]
        let spacing = ((st.last_tick - st.first_tick) as f64 / st.run.max(1) as f64).max(1.0);
        #[allow(clippy::cast_precision_loss)]
        let idle = now.saturating_sub(st.last_tick) as f64;
        // A stream that has missed several of its expected steps has probably ended.
        let prob = 0.5f64.powf(idle / (4.0 * spacing));
        // The head itself was read `idle` accesses ago: that, not 0, is its own cost (a
        // stream head is not a prediction); its successors are priced by the stream's pace.
        heap.push(Node {
            cost: idle,
            depth: 0,
            prob,
            step: 1.0,
            run: st.run,
            scale: spacing,
            base: idle,
            block: BlockIdx(st.last),
        });
    }
    let mut done: HashMap<BlockIdx, f64> = HashMap::new();
    let mut order: Vec<(BlockIdx, f64, u32, f64)> = Vec::new();
    while let Some(n) = heap.pop() {
        if done.len() >= limit {
            break;
        }
        if done.contains_key(&n.block) {
            continue;
        }
        done.insert(n.block, n.cost);
        order.push((n.block, n.cost, n.depth, n.step));
        let depth = n.depth + 1;
        let next = n.block.0.checked_add(1).map(BlockIdx);
        let mut push = |b: BlockIdx, p: f64| {
            let prob = n.prob * p;
            let step = n.step.min(p);
            if b.0 < total_blocks && prob > 1e-9 && !done.contains_key(&b) {
                let cost = n.base + f64::from(depth) / prob * n.scale;
                let run = if Some(b) == next {
                    n.run.saturating_add(1)
                } else {
                    0
                };
                heap.push(Node {
                    cost,
                    depth,
                    prob,
                    step,
                    run,
                    scale: n.scale,
                    base: n.base,
                    block: b,
                });
            }
        };
        // Extrapolate a scan into blocks it has not reached yet: a run of this length
        // continues with the learned probability, whatever the successor table says.
        let seq = pattern.seq_continue_prob(n.run);
        let mut seq_done = false;
        for (s, p) in pattern.successors(n.block) {
            if Some(s) == next {
                seq_done = true;
                push(s, p.max(seq));
            } else {
                push(s, p);
            }
        }
        if let (Some(b), false) = (next, seq_done) {
            push(b, seq);
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::SplitMix64;

    /// Hot blocks 1000..1010 read at random; a cold sequential scan over 0..200 that the
    /// VM is in the middle of (cursor at 50) when it is migrated.
    fn scenario() -> (HeatMap, AccessPattern, BlockSet) {
        let mut heat = HeatMap::new(100_000, 10_000);
        let mut pat = AccessPattern::new(10_000);
        let mut rng = SplitMix64::new(7);
        let mut t = 0u64;
        let mut touch = |b: u64, heat: &mut HeatMap, pat: &mut AccessPattern| {
            t += 1;
            heat.record(BlockIdx(b), t);
            pat.record(BlockIdx(b));
        };
        for _ in 0..2000 {
            touch(1000 + rng.below(10), &mut heat, &mut pat);
        }
        for b in 0..=50 {
            touch(b, &mut heat, &mut pat);
        }
        let have: BlockSet = (0..200).chain(1000..1010).map(BlockIdx).collect();
        (heat, pat, have)
    }

    fn pos(plan: &[BlockIdx], b: u64) -> usize {
        plan.iter().position(|x| *x == BlockIdx(b)).unwrap()
    }

    #[test]
    fn colder_block_touched_first_after_resume_is_fetched_before_hotter_blocks() {
        let (heat, pat, have) = scenario();
        let next = 51; // what the VM reads right after resume
        assert!(
            heat.heat(BlockIdx(next)) < heat.heat(BlockIdx(1000)),
            "51 must be colder"
        );
        let hot_first = |plan: &[BlockIdx]| (1000..1010).map(|h| pos(plan, h)).min().unwrap();

        let hp = plan_fetch(
            Strategy::HeatPattern,
            &heat,
            &pat,
            &have,
            pat.cursor(),
            2000,
        );
        assert!(
            pos(&hp, next) < hot_first(&hp),
            "heat+pattern: {:?}",
            &hp[..20]
        );
        // The scan's next few blocks all arrive before the unrelated hot set.
        for b in 51..55 {
            assert!(pos(&hp, b) < hot_first(&hp));
        }

        // The heat map alone gets it wrong by construction: 51 was never accessed.
        let h = plan_fetch(Strategy::Heat, &heat, &pat, &have, pat.cursor(), 2000);
        assert!(pos(&h, next) > hot_first(&h));
    }

    #[test]
    fn heat_pattern_still_fetches_hot_blocks_before_improbable_guesses() {
        let (heat, pat, have) = scenario();
        let hp = plan_fetch(
            Strategy::HeatPattern,
            &heat,
            &pat,
            &have,
            pat.cursor(),
            2000,
        );
        // Far down the scan the run might have ended; the hot set is worth more by then.
        let hot_last = (1000..1010).map(|h| pos(&hp, h)).max().unwrap();
        assert!(hot_last < pos(&hp, 199), "{:?}", &hp[..40]);
    }

    #[test]
    fn non_prefetching_strategies_plan_nothing() {
        let (heat, pat, have) = scenario();
        for s in [Strategy::None, Strategy::Redirect] {
            assert!(plan_fetch(s, &heat, &pat, &have, pat.cursor(), 2000).is_empty());
        }
        let lin = plan_fetch(Strategy::Linear, &heat, &pat, &have, pat.cursor(), 2000);
        assert!(lin.windows(2).all(|w| w[0] < w[1]));
    }

    /// Property: every prefetching plan is a permutation of the needed blocks, with no
    /// duplicates, for random heat maps, patterns, block sets and disk sizes.
    #[test]
    fn plan_is_a_permutation_of_needed_blocks() {
        let mut rng = SplitMix64::new(42);
        for case in 0..100 {
            let total = 1 + rng.below(300);
            let mut heat = HeatMap::new(1 + rng.below(500), 1 + rng.below(200) as usize);
            let mut pat = AccessPattern::new(1 + rng.below(200) as usize);
            for t in 0..rng.below(2000) {
                let b = if rng.below(3) == 0 {
                    t % 400
                } else {
                    rng.below(400)
                };
                heat.record(BlockIdx(b), t);
                pat.record(BlockIdx(b));
            }
            let have: BlockSet = (0..rng.below(400))
                .map(|_| BlockIdx(rng.below(400)))
                .collect();
            let needed: BlockSet = have.iter().copied().filter(|b| b.0 < total).collect();
            let cursor = (rng.below(4) > 0).then(|| BlockIdx(rng.below(400)));
            for s in [
                Strategy::Linear,
                Strategy::FullCopy,
                Strategy::Heat,
                Strategy::Pattern,
                Strategy::HeatPattern,
            ] {
                let plan = plan_fetch(s, &heat, &pat, &have, cursor, total);
                let as_set: BlockSet = plan.iter().copied().collect();
                assert_eq!(plan.len(), as_set.len(), "case {case} {s}: duplicates");
                assert_eq!(as_set, needed, "case {case} {s}: not the needed blocks");
                let again = plan_fetch(s, &heat, &pat, &have, cursor, total);
                assert_eq!(plan, again, "case {case} {s}: not deterministic");
            }
        }
    }

    #[test]
    fn lookahead_follows_the_scan_from_where_the_vm_reads_now() {
        let (_, mut pat, _) = scenario();
        assert_eq!(
            lookahead(&pat, 4, 2000),
            [51, 52, 53, 54].map(BlockIdx).to_vec()
        );
        // The VM moves on: the look-ahead moves with it.
        for b in 51..=60 {
            pat.record(BlockIdx(b));
        }
        assert_eq!(lookahead(&pat, 2, 2000), vec![BlockIdx(61), BlockIdx(62)]);
    }

    #[test]
    fn strategy_names_round_trip() {
        for s in Strategy::ALL {
            assert_eq!(s.name().parse::<Strategy>().unwrap(), s);
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.name())
            );
        }
        assert!("hot".parse::<Strategy>().is_err());
    }
}
