//! Migration-cache benchmark: a deterministic simulation with a virtual clock.
//!
//! For each workload: replay the first part on a *source* cache (it learns heat and
//! pattern), migrate (snapshot → plan → destination), then replay the rest on the
//! *destination* while it warms up under each strategy, and on a *twin* cache that never
//! moved. The model (documented in docs/CACHE.md):
//! - requests arrive at their (re-timed) trace times, open loop;
//! - a cache hit costs `hit_latency_us`;
//! - the peer and the origin are each one link with a bandwidth and a per-request latency;
//!   transfers on a link are serial, latency overlaps (pipelined requests);
//! - prefetches use the peer link only when it is idle, and a guest miss waits for at most
//!   the one prefetch transfer in progress (demand goes first);
//! - a write bumps the block's generation: a prefetch in flight for it is discarded, and
//!   the peer's copy is never used for it again;
//! - cache policy (capacity, heat-sampled eviction, write-allocate of full blocks,
//!   write-around of partial ones) mirrors [`crate::BlockCache`].
//!
//! Nothing here reads a wall clock, so a run is reproducible and takes seconds.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::heat::HeatMap;
use crate::pattern::AccessPattern;
use crate::plan::{lookahead, plan_fetch, Strategy};
use crate::trace::{self, IoRequest, Op, SynthSpec, TraceError, TraceFormat};
use crate::types::{BlockIdx, BlockSet, BlockSize};
use model::SplitMix64;

/// A link (to the peer or to the origin).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkModel {
    /// Bandwidth in bytes per second.
    pub bytes_per_sec: f64,
    /// Per-request latency in microseconds.
    pub latency_us: f64,
}

impl LinkModel {
    fn xfer_s(&self, bytes: u64) -> f64 {
        // Block sizes are far below 2^53.
        #[allow(clippy::cast_precision_loss)]
        let b = bytes as f64;
        b / self.bytes_per_sec
    }
}

/// A workload to replay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WorkloadSpec {
    /// fio-like random reads, zipf popularity.
    Zipf {
        /// Generator parameters.
        spec: SynthSpec,
        /// Zipf exponent.
        theta: f64,
    },
    /// fio-like sequential reads.
    Sequential {
        /// Generator parameters.
        spec: SynthSpec,
    },
    /// fio-like mixed job (see [`trace::mixed`]).
    Mixed {
        /// Generator parameters.
        spec: SynthSpec,
        /// Zipf exponent of the random part.
        theta: f64,
        /// Percentage of reads in the random part.
        read_pct: u8,
        /// One request in this many belongs to the sequential scanners.
        seq_every: u32,
        /// Tables the scanner reads.
        tables: u32,
        /// Bytes per table.
        table_bytes: u64,
    },
    /// A recurring scan beside a hot set (see [`trace::scan_hot`]).
    ScanHot {
        /// Generator parameters.
        spec: SynthSpec,
        /// Zipf exponent of the hot set.
        theta: f64,
        /// Bytes of the hot set.
        hot_bytes: u64,
        /// Bytes the scan covers.
        scan_bytes: u64,
        /// One request in this many is the scan's.
        scan_every: u32,
    },
    /// B-tree index lookups (see [`trace::btree`]).
    BTree {
        /// Generator parameters.
        spec: SynthSpec,
        /// Children per inner node.
        fanout: u64,
        /// Zipf exponent of key popularity.
        theta: f64,
    },
    /// A Pareto popularity mix of 4–64 KiB requests (see [`trace::pareto`]).
    Pareto {
        /// Generator parameters.
        spec: SynthSpec,
        /// Pareto shape.
        alpha: f64,
    },
    /// A block trace file, replayed `speedup` times faster than recorded.
    Trace {
        /// Name in the table.
        name: String,
        /// The file.
        path: PathBuf,
        /// Its format.
        format: TraceFormat,
        /// Time compression factor.
        speedup: f64,
    },
}

impl WorkloadSpec {
    /// The name used in the table.
    pub fn name(&self) -> String {
        match self {
            WorkloadSpec::Zipf { .. } => "zipf".into(),
            WorkloadSpec::Sequential { .. } => "sequential".into(),
            WorkloadSpec::Mixed { .. } => "mixed".into(),
            WorkloadSpec::ScanHot { .. } => "scan+hot".into(),
            WorkloadSpec::BTree { .. } => "btree".into(),
            WorkloadSpec::Pareto { .. } => "pareto".into(),
            WorkloadSpec::Trace { name, .. } => name.clone(),
        }
    }

    /// Generates or reads the requests.
    pub fn requests(&self) -> Result<Vec<IoRequest>, TraceError> {
        Ok(match self {
            WorkloadSpec::Zipf { spec, theta } => trace::zipf_random(spec, *theta, 100),
            WorkloadSpec::Sequential { spec } => trace::sequential(spec),
            WorkloadSpec::Mixed {
                spec,
                theta,
                read_pct,
                seq_every,
                tables,
                table_bytes,
            } => trace::mixed(spec, *theta, *read_pct, *seq_every, *tables, *table_bytes),
            WorkloadSpec::ScanHot {
                spec,
                theta,
                hot_bytes,
                scan_bytes,
                scan_every,
            } => trace::scan_hot(spec, *theta, 70, *hot_bytes, *scan_bytes, *scan_every),
            WorkloadSpec::BTree {
                spec,
                fanout,
                theta,
            } => trace::btree(spec, *fanout, *theta),
            WorkloadSpec::Pareto { spec, alpha } => trace::pareto(spec, *alpha, 70),
            WorkloadSpec::Trace {
                path,
                format,
                speedup,
                ..
            } => {
                let mut r = trace::read_trace(path, *format)?;
                let k = speedup.max(1e-9);
                for q in &mut r {
                    // Truncation to whole µs is intended.
                    #[allow(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        clippy::cast_precision_loss
                    )]
                    let t = (q.time_us as f64 / k) as u64;
                    q.time_us = t;
                }
                r
            }
        })
    }
}

/// Benchmark parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchOptions {
    /// Workloads, each run under every strategy.
    pub workloads: Vec<WorkloadSpec>,
    /// Strategies to compare.
    pub strategies: Vec<Strategy>,
    /// Cache block size in bytes.
    pub block_size: u32,
    /// Cache capacity in blocks (source, destination and twin alike).
    pub cache_blocks: u64,
    /// Fraction of each workload replayed on the source before the migration.
    pub warm_fraction: f64,
    /// Link to the peer (the source host's cache).
    pub peer: LinkModel,
    /// Link to the origin (a SAN).
    pub origin: LinkModel,
    /// Latency of a cache hit in microseconds.
    pub hit_latency_us: f64,
    /// Block reads per hit-ratio interval (intervals by count, not time, so that every
    /// interval has the same statistical weight however bursty the trace).
    pub interval_reads: usize,
    /// "Warm" means an interval hit ratio of at least this fraction of the twin's.
    pub warm_threshold: f64,
    /// Misses and latencies are measured over this many seconds after switch-over.
    pub early_s: f64,
    /// Seconds the memory copy takes (QEMU's stream, beside the peer link), during which
    /// the guest still runs on the source.
    pub memory_copy_s: f64,
    /// Strategies also run with cache pre-copy (prefetching from the migration start;
    /// rows named `STRATEGY+precopy`).
    pub precopy: Vec<Strategy>,
}

impl BenchOptions {
    /// The standard suite: zipf, mixed, and the CloudPhysics trace if `cloudphysics` is
    /// given. `quick` shrinks the synthetic workloads (a few seconds on 2 cores).
    pub fn standard(quick: bool, cloudphysics: Option<PathBuf>) -> Self {
        let requests = if quick { 240_000 } else { 1_000_000 };
        let spec = |seed| SynthSpec {
            seed,
            requests,
            span_bytes: 4 << 30,
            io_size: 4096,
            iops: 4000,
        };
        let mut workloads = vec![
            WorkloadSpec::Zipf {
                spec: spec(1),
                theta: 1.2,
            },
            WorkloadSpec::Mixed {
                spec: spec(2),
                theta: 1.2,
                read_pct: 70,
                seq_every: 4,
                tables: 8,
                table_bytes: 64 << 20,
            },
            // Shapes chosen to test that the method carries over beyond the first two:
            // hot-by-count blocks that are useless first (the scan), an order that starts
            // at the same few blocks (the tree), and a heavy-tailed mix of sizes.
            WorkloadSpec::ScanHot {
                spec: spec(3),
                theta: 1.1,
                hot_bytes: 512 << 20,
                scan_bytes: 2 << 30,
                // 500 scan reads/s of 128 KiB: most of the origin link, not all of it.
                scan_every: 8,
            },
            WorkloadSpec::BTree {
                spec: spec(4),
                fanout: 128,
                theta: 0.9,
            },
            WorkloadSpec::Pareto {
                spec: spec(5),
                alpha: 1.16,
            },
        ];
        if let Some(path) = cloudphysics {
            workloads.push(WorkloadSpec::Trace {
                name: "cloudphysics".into(),
                path,
                format: TraceFormat::CloudPhysics,
                speedup: 100.0,
            });
        }
        Self {
            workloads,
            strategies: Strategy::ALL.to_vec(),
            block_size: BlockSize::DEFAULT.bytes(),
            cache_blocks: 16_384,
            warm_fraction: 0.5,
            peer: LinkModel {
                bytes_per_sec: 250e6,
                latency_us: 200.0,
            },
            origin: LinkModel {
                bytes_per_sec: 100e6,
                latency_us: 1000.0,
            },
            hit_latency_us: 20.0,
            interval_reads: 250,
            warm_threshold: 0.95,
            early_s: 10.0,
            // A 2 GiB guest on a 10 Gbit/s migration network, with a few dirty rounds.
            memory_copy_s: 4.0,
            precopy: vec![Strategy::Heat, Strategy::HeatPattern],
        }
    }
}

impl BenchOptions {
    /// A run of about a second: one mixed workload of 10,000 requests on a small cache,
    /// every strategy (tests of what consumes the rows).
    pub fn tiny() -> Self {
        let mut o = BenchOptions::standard(true, None);
        let spec = SynthSpec {
            seed: 3,
            requests: 10_000,
            span_bytes: 512 << 20,
            io_size: 4096,
            iops: 4000,
        };
        o.workloads = vec![WorkloadSpec::Mixed {
            spec,
            theta: 1.0,
            read_pct: 70,
            seq_every: 4,
            tables: 4,
            table_bytes: 16 << 20,
        }];
        o.cache_blocks = 1024;
        // The run after the migration point is 1.25 s long.
        o.memory_copy_s = 0.25;
        o
    }

    /// Adds a trace file as a workload named after the file (its stem), replayed
    /// `speedup` times faster than recorded.
    pub fn with_trace(mut self, path: PathBuf, format: TraceFormat, speedup: f64) -> Self {
        let name = path
            .file_stem()
            .map_or_else(|| "trace".to_owned(), |s| s.to_string_lossy().into_owned());
        self.workloads.push(WorkloadSpec::Trace {
            name,
            path,
            format,
            speedup,
        });
        self
    }
}

/// One row of the result table: one workload under one strategy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    /// Workload name.
    pub workload: String,
    /// Strategy name.
    pub strategy: String,
    /// Seconds from the migration until the destination's interval hit ratio reached
    /// `warm_threshold` of the twin's and stayed there; `None` if not within the run.
    pub time_to_warm_s: Option<f64>,
    /// Seconds from the migration start until the VM runs on the destination.
    pub switchover_s: f64,
    /// Destination block-read misses in the first `early_s` seconds after switch-over.
    pub misses_first_10s: u64,
    /// Bytes read from the origin by the destination.
    pub origin_bytes: u64,
    /// Bytes read from the peer by the destination (demand and prefetch).
    pub peer_bytes: u64,
    /// Bytes the twin (which never moved) read from the origin over the same requests:
    /// the part of `origin_bytes` that no warm-up strategy can avoid.
    pub twin_origin_bytes: u64,
    /// Median guest read latency in the first `early_s` seconds, µs.
    pub read_p50_us: f64,
    /// 99th-percentile guest read latency in the first `early_s` seconds, µs.
    pub read_p99_us: f64,
    /// Blocks in the fetch plan.
    pub planned_blocks: u64,
    /// Seconds of workload replayed after the migration.
    pub run_s: f64,
    /// Destination block-read misses in excess of the twin's over the same requests, over
    /// the whole run: the migration's cost in misses. Unlike `time_to_warm_s` it cannot
    /// saturate when the twin itself misses a lot. Negative when prefetching beat the twin.
    pub penalty_misses: i64,
    /// The same, over the reads in the first `early_s` seconds after switch-over.
    pub penalty_misses_10s: i64,
    /// Guest read-stall seconds in excess of the twin's (the sum over read requests of
    /// the time each waited for data, minus the twin's for the same request), whole run.
    pub penalty_stall_s: f64,
    /// The same, over the first `early_s` seconds after switch-over.
    pub penalty_stall_10s_s: f64,
    /// Seconds from the migration start until 95% of the final excess misses had accrued
    /// (the switch-over time when there is no excess).
    pub penalty_warm_s: f64,
    /// Destination hit ratio per interval: `(end of interval in s, ratio)`.
    #[serde(skip)]
    pub curve: Vec<(f64, f64)>,
    /// The twin's hit ratio per interval.
    #[serde(skip)]
    pub twin_curve: Vec<(f64, f64)>,
}

/// The simulated cache: the same policy as [`crate::BlockCache`], in memory.
#[derive(Clone, Debug)]
struct SimCache {
    map: HashMap<u64, usize>,
    slots: Vec<Option<u64>>,
    free: Vec<usize>,
    heat: HeatMap,
    pattern: AccessPattern,
    tick: u64,
    rng: SplitMix64,
}

impl SimCache {
    fn new(capacity: u64) -> Self {
        let cap = usize::try_from(capacity.max(1)).unwrap_or(usize::MAX);
        let d = crate::CacheConfig::new("", capacity);
        Self {
            map: HashMap::new(),
            slots: vec![None; cap],
            free: (0..cap).rev().collect(),
            heat: HeatMap::new(d.heat_half_life, d.heat_max_tracked),
            pattern: AccessPattern::new(d.pattern_max_blocks),
            tick: 0,
            rng: SplitMix64::new(0x5eed_cace),
        }
    }

    fn touch(&mut self, b: u64) -> bool {
        self.tick += 1;
        self.heat.record(BlockIdx(b), self.tick);
        self.pattern.record(BlockIdx(b));
        self.map.contains_key(&b)
    }

    fn insert(&mut self, b: u64) {
        if self.map.contains_key(&b) {
            return;
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                let n = self.slots.len() as u64;
                let mut victim: Option<(f64, u64, usize)> = None;
                for _ in 0..16 {
                    let s = usize::try_from(self.rng.below(n)).expect("below slot count");
                    if let Some(v) = self.slots[s] {
                        let h = self.heat.heat(BlockIdx(v));
                        if victim.is_none_or(|(vh, vb, _)| h < vh || (h == vh && v < vb)) {
                            victim = Some((h, v, s));
                        }
                    }
                }
                let Some((_, v, s)) = victim else { return };
                self.map.remove(&v);
                s
            }
        };
        self.slots[slot] = Some(b);
        self.map.insert(b, slot);
    }

    /// Applies a request the way [`crate::BlockCache`] would, ignoring timing; returns
    /// (block reads, hits).
    fn apply(&mut self, r: &IoRequest, bs: u64) -> (u64, u64) {
        let (mut reads, mut hits) = (0, 0);
        for (b, full) in blocks_of(r, bs) {
            match r.op {
                Op::Read => {
                    reads += 1;
                    if self.touch(b) {
                        hits += 1;
                    } else {
                        self.insert(b);
                    }
                }
                Op::Write => {
                    if full {
                        self.insert(b);
                    }
                }
            }
        }
        (reads, hits)
    }
}

/// Blocks a request touches, each with whether the request covers it fully.
fn blocks_of(r: &IoRequest, bs: u64) -> impl Iterator<Item = (u64, bool)> {
    let start = r.offset;
    let end = r.offset.saturating_add(u64::from(r.len));
    let (first, last) = (start / bs, end.saturating_sub(1) / bs);
    (first..=last).map(move |b| (b, start <= b * bs && end >= (b + 1) * bs))
}

fn secs(us: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let s = us as f64 / 1e6;
    s
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Runs the benchmark: every workload under every strategy. Fails, before simulating
/// anything, on the first trace that cannot be read.
pub fn run_bench(opts: BenchOptions) -> Result<Vec<BenchRow>, TraceError> {
    let mut loaded = Vec::with_capacity(opts.workloads.len());
    for w in &opts.workloads {
        loaded.push((w.name(), w.requests()?));
    }
    let mut rows = Vec::new();
    for (name, reqs) in &loaded {
        rows.extend(run_workload(&opts, name, reqs));
    }
    Ok(rows)
}

/// Runs every strategy of `opts` on one workload given as requests.
pub fn run_workload(opts: &BenchOptions, name: &str, reqs: &[IoRequest]) -> Vec<BenchRow> {
    let bs = u64::from(opts.block_size.max(512));
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let split = ((reqs.len() as f64) * opts.warm_fraction.clamp(0.0, 1.0)) as usize;
    let (warm, rest) = reqs.split_at(split.min(reqs.len()));
    let mut source = SimCache::new(opts.cache_blocks);
    for r in warm {
        source.apply(r, bs);
    }
    let t0 = rest.first().map_or(0, |r| r.time_us);
    let run_s = rest.last().map_or(0.0, |r| secs(r.time_us - t0));
    let total_blocks = reqs
        .iter()
        .map(|r| (r.offset + u64::from(r.len)).div_ceil(bs))
        .max()
        .unwrap_or(0);

    // The twin: the source cache carrying on as if nothing moved.
    // Its read stalls use the same origin link model as the destination's, so that the
    // penalty compares like with like.
    let mut twin = source.clone();
    let mut twin_reads: Vec<(f64, bool)> = Vec::new();
    let mut twin_stalls: Vec<f64> = Vec::new();
    let mut twin_origin_bytes = 0u64;
    let mut twin_origin_free = 0.0f64;
    let (o_xfer, o_lat) = (opts.origin.xfer_s(bs), opts.origin.latency_us / 1e6);
    for r in rest {
        let t = secs(r.time_us - t0);
        if r.op == Op::Read {
            let mut stall: f64 = 0.0;
            for (b, _) in blocks_of(r, bs) {
                let hit = twin.touch(b);
                if hit {
                    stall = stall.max(opts.hit_latency_us / 1e6);
                } else {
                    twin.insert(b);
                    twin_origin_bytes += bs;
                    twin_origin_free = twin_origin_free.max(t) + o_xfer;
                    stall = stall.max(twin_origin_free - t + o_lat);
                }
                twin_reads.push((t, hit));
            }
            twin_stalls.push(stall);
        } else {
            twin.apply(r, bs);
        }
    }
    let twin_curve = curve(&twin_reads, opts.interval_reads);

    let mut rows = Vec::new();
    let runs = opts
        .strategies
        .iter()
        .map(|s| (*s, false))
        .chain(opts.precopy.iter().map(|s| (*s, true)));
    for (s, precopy) in runs {
        let mut row = simulate(
            opts,
            s,
            precopy,
            &source,
            rest,
            t0,
            Twin {
                reads: &twin_reads,
                stalls: &twin_stalls,
            },
            total_blocks,
        );
        row.workload = name.to_owned();
        row.run_s = run_s;
        row.twin_origin_bytes = twin_origin_bytes;
        row.twin_curve.clone_from(&twin_curve);
        tracing::info!(workload = name, strategy = %row.strategy, penalty_misses = row.penalty_misses, "strategy simulated");
        rows.push(row);
    }
    rows
}

/// Hit ratio per interval of `n` reads: `(time of the interval's last read, ratio)`.
fn curve(reads: &[(f64, bool)], n: usize) -> Vec<(f64, f64)> {
    reads
        .chunks(n.max(1))
        .map(|c| {
            let hits = c.iter().filter(|r| r.1).count();
            #[allow(clippy::cast_precision_loss)]
            let ratio = hits as f64 / c.len() as f64;
            (c.last().map_or(0.0, |r| r.0), ratio)
        })
        .collect()
}

/// Intervals smoothed together when judging warmth (one unlucky interval of a few
/// hundred reads must not decide).
pub const SMOOTH: usize = 4;

/// When the destination became warm for good: the end of the first interval from which on
/// every run of [`SMOOTH`] intervals has at least `threshold` times the twin's hits. Asking
/// for "from then on" rather than "first touched" matters on real traces, where the twin
/// itself goes through cold phases that a cold destination can match by chance.
fn time_to_warm(
    dest: &[(f64, bool)],
    twin: &[(f64, bool)],
    n: usize,
    threshold: f64,
) -> Option<f64> {
    let n = n.max(1);
    let len = dest.len().min(twin.len());
    let chunks = len.div_ceil(n);
    let hits = |v: &[(f64, bool)], i: usize| {
        v[i * n..((i + 1) * n).min(len)]
            .iter()
            .filter(|r| r.1)
            .count()
    };
    let d: Vec<usize> = (0..chunks).map(|i| hits(dest, i)).collect();
    let t: Vec<usize> = (0..chunks).map(|i| hits(twin, i)).collect();
    // Scan backwards for the earliest start of an unbroken warm suffix.
    let mut warm_from = None;
    for i in (0..chunks).rev() {
        let end = (i + SMOOTH).min(chunks);
        let (dh, th): (usize, usize) = (d[i..end].iter().sum(), t[i..end].iter().sum());
        #[allow(clippy::cast_precision_loss)]
        let ok = dh as f64 >= threshold * th as f64;
        if !ok {
            break;
        }
        warm_from = Some(i);
    }
    warm_from.map(|i| dest[((i + 1) * n).min(len) - 1].0)
}

/// What the twin saw over the requests after the migration point.
#[derive(Clone, Copy)]
struct Twin<'a> {
    /// Per block read: (time, hit).
    reads: &'a [(f64, bool)],
    /// Per read request: stall seconds.
    stalls: &'a [f64],
}

/// The migration penalty: the destination's misses and stalls in excess of the twin's over
/// the same requests. Both sequences are in request order, so index *i* is the same read
/// on both sides.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Penalty {
    misses: i64,
    misses_early: i64,
    stall_s: f64,
    stall_early_s: f64,
    warm_s: f64,
}

/// Share of the final excess misses after which the destination counts as warm.
const PENALTY_WARM_SHARE: f64 = 0.95;

impl Penalty {
    fn measure(
        dest: &[(f64, bool)],
        twin: &[(f64, bool)],
        dest_stalls: &[(f64, f64)],
        twin_stalls: &[f64],
        switchover: f64,
        early_s: f64,
    ) -> Self {
        let early = |t: f64| t >= switchover && t - switchover < early_s;
        let miss = |hit: bool| i64::from(!hit);
        let mut cum: Vec<(f64, i64)> = Vec::with_capacity(dest.len());
        let (mut misses, mut misses_early) = (0i64, 0i64);
        for (d, w) in dest.iter().zip(twin) {
            let x = miss(d.1) - miss(w.1);
            misses += x;
            if early(d.0) {
                misses_early += x;
            }
            cum.push((d.0, misses));
        }
        let (mut stall_s, mut stall_early_s) = (0.0, 0.0);
        for (d, w) in dest_stalls.iter().zip(twin_stalls) {
            let x = d.1 - w;
            stall_s += x;
            if early(d.0) {
                stall_early_s += x;
            }
        }
        // The first moment the running excess reaches 95% of the final one. The running
        // excess can dip (a prefetched block the twin missed), so "reaches" is the first
        // crossing, which is when the migration's cost was essentially paid.
        let warm_s = if misses <= 0 {
            switchover
        } else {
            #[allow(clippy::cast_precision_loss)]
            let goal = PENALTY_WARM_SHARE * misses as f64;
            #[allow(clippy::cast_precision_loss)]
            let at = cum
                .iter()
                .find(|c| c.1 as f64 >= goal)
                .map_or(switchover, |c| c.0);
            at.max(switchover)
        };
        Self {
            misses,
            misses_early,
            stall_s,
            stall_early_s,
            warm_s,
        }
    }
}

/// Blocks the look-ahead proposes per guest read.
const LOOKAHEAD: usize = 16;
/// Bound on look-ahead blocks waiting for the link (the oldest guesses go first).
const LANE_MAX: usize = 256;

/// The destination's background fetcher on the peer link: blocks to fetch again first
/// (pre-copy's dirty list), then look-ahead guesses, then the static plan.
struct Prefetcher<'p> {
    plan: &'p [BlockIdx],
    next: usize,
    refetch: VecDeque<u64>,
    lane: VecDeque<u64>,
    lane_set: HashSet<u64>,
    inflight: VecDeque<(u64, f64, u64)>,
    inflight_set: HashMap<u64, f64>,
    peer_free: f64,
    peer_bytes: u64,
    /// Transfer time, latency (s) and size of one block on the peer link.
    xfer: f64,
    latency: f64,
    bs: u64,
}

impl Prefetcher<'_> {
    /// Installs the fills completed by `now` whose generation no write moved on, then
    /// uses the link whenever it was idle before `now` (never before `not_before`).
    fn pump(
        &mut self,
        now: f64,
        not_before: f64,
        dest: &mut SimCache,
        gens: &HashMap<u64, u64>,
        usable: &dyn Fn(u64) -> bool,
    ) {
        self.land(now, dest, gens);
        while self.peer_free <= now {
            let b = if let Some(b) = self.refetch.pop_front() {
                b
            } else if let Some(b) = self.lane.pop_front() {
                self.lane_set.remove(&b);
                b
            } else if self.next < self.plan.len() {
                self.next += 1;
                self.plan[self.next - 1].0
            } else {
                break;
            };
            if dest.map.contains_key(&b) || !usable(b) || self.inflight_set.contains_key(&b) {
                continue;
            }
            let start = self.peer_free.max(not_before);
            self.peer_free = start + self.xfer;
            let done = self.peer_free + self.latency;
            self.inflight
                .push_back((b, done, gens.get(&b).copied().unwrap_or(0)));
            self.inflight_set.insert(b, done);
            self.peer_bytes += self.bs;
        }
    }

    /// Installs the fills completed by `now` whose generation no write moved on.
    fn land(&mut self, now: f64, dest: &mut SimCache, gens: &HashMap<u64, u64>) {
        while self.inflight.front().is_some_and(|f| f.1 <= now) {
            if let Some((b, _, g)) = self.inflight.pop_front() {
                self.inflight_set.remove(&b);
                if gens.get(&b).copied().unwrap_or(0) == g {
                    dest.insert(b);
                }
            }
        }
    }

    /// After a guest read: queue what the access pattern says comes next.
    fn follow(&mut self, dest: &SimCache, total_blocks: u64, useful: &dyn Fn(u64) -> bool) {
        for a in lookahead(&dest.pattern, LOOKAHEAD, total_blocks) {
            let a = a.0;
            if useful(a) && !self.inflight_set.contains_key(&a) && self.lane_set.insert(a) {
                self.lane.push_back(a);
                if self.lane.len() > LANE_MAX {
                    if let Some(old) = self.lane.pop_front() {
                        self.lane_set.remove(&old);
                    }
                }
            }
        }
    }
}

/// Called before each request the guest makes on the source: (time, the source's cache,
/// the block generations).
type OnSourceStep<'a> = dyn FnMut(f64, &SimCache, &HashMap<u64, u64>) + 'a;

/// One strategy on the destination, with or without cache pre-copy. Times are in seconds
/// from the migration start.
///
/// The migration: the memory copy runs for `memory_copy_s` on QEMU's own stream while the
/// guest keeps running on the source (it sees exactly what the twin sees). Without
/// pre-copy the plan is made from the source's cache at switch-over and prefetching
/// starts then; full copy sends the whole plan before switching over. With pre-copy the
/// plan is made at the migration start and prefetching starts at once; every block the
/// guest writes on the source meanwhile is on the source's dirty list, which the
/// destination receives at switch-over: it drops those blocks (and any fill of them in
/// flight, by generation), fetches them again from the source, which has them fresh, and
/// goes on with a plan made again from the source's cache as of switch-over (the first
/// one went stale while memory moved: the guest kept reading blocks it does not know).
#[allow(clippy::too_many_arguments)]
fn simulate(
    opts: &BenchOptions,
    strategy: Strategy,
    precopy: bool,
    at_start: &SimCache,
    rest: &[IoRequest],
    t0: u64,
    twin: Twin<'_>,
    total_blocks: u64,
) -> BenchRow {
    // The pattern strategies also follow the VM as it moves (see `plan::lookahead`).
    let follow = matches!(strategy, Strategy::Pattern | Strategy::HeatPattern);
    let precopy = precopy && strategy.uses_peer() && strategy != Strategy::FullCopy;
    let bs = u64::from(opts.block_size.max(512));
    let o_xfer = opts.origin.xfer_s(bs);
    let o_lat = opts.origin.latency_us / 1e6;
    let plan_of = |c: &SimCache| {
        let have: BlockSet = c.map.keys().map(|b| BlockIdx(*b)).collect();
        let plan = plan_fetch(
            strategy,
            &c.heat,
            &c.pattern,
            &have,
            c.pattern.cursor(),
            total_blocks,
        );
        (plan, have)
    };
    let mem = opts.memory_copy_s.max(0.0);

    // The source runs the guest until switch-over; without pre-copy the plan is made then.
    let mut src = at_start.clone();
    let mut i = 0usize;
    let mut gens: HashMap<u64, u64> = HashMap::new();
    let mut dirty: HashSet<u64> = HashSet::new();
    let mut reads: Vec<(f64, bool)> = Vec::with_capacity(twin.reads.len());
    // Per read request, in order (aligned with `twin.stalls`): (time, stall seconds).
    let mut stalls: Vec<(f64, f64)> = Vec::with_capacity(twin.stalls.len());
    // The guest on the source until `until`: what the twin sees (same cache, same
    // requests), every write on the dirty list.
    let mut on_source =
        |until: f64, src: &mut SimCache, i: &mut usize, mut each: Option<&mut OnSourceStep<'_>>| {
            while *i < rest.len() && secs(rest[*i].time_us - t0) < until {
                let r = &rest[*i];
                let t = secs(r.time_us - t0);
                if let Some(f) = each.as_mut() {
                    f(t, src, &gens);
                }
                if r.op == Op::Read {
                    for (b, _) in blocks_of(r, bs) {
                        let hit = src.touch(b);
                        if !hit {
                            src.insert(b);
                        }
                        reads.push((t, hit));
                    }
                    let same = twin.stalls.get(stalls.len()).copied().unwrap_or(0.0);
                    stalls.push((t, same));
                } else {
                    for (b, _) in blocks_of(r, bs) {
                        *gens.entry(b).or_insert(0) += 1;
                        dirty.insert(b);
                    }
                    src.apply(r, bs);
                }
                *i += 1;
            }
        };
    let plan = if precopy {
        plan_of(at_start).0
    } else {
        Vec::new()
    };
    let mut dest = SimCache::new(opts.cache_blocks);
    dest.heat = at_start.heat.clone();
    dest.pattern = at_start.pattern.clone();
    dest.tick = at_start.tick;
    let mut pf = Prefetcher {
        plan: &plan,
        next: 0,
        refetch: VecDeque::new(),
        lane: VecDeque::new(),
        lane_set: HashSet::new(),
        inflight: VecDeque::new(),
        inflight_set: HashMap::new(),
        peer_free: 0.0,
        peer_bytes: 0,
        xfer: opts.peer.xfer_s(bs),
        latency: opts.peer.latency_us / 1e6,
        bs,
    };
    if precopy {
        // Pre-copy: the plan goes over the peer link while memory moves.
        let mut fill = |t: f64, src: &SimCache, gens: &HashMap<u64, u64>| {
            pf.pump(t, 0.0, &mut dest, gens, &|b| src.map.contains_key(&b));
        };
        on_source(mem, &mut src, &mut i, Some(&mut fill));
    } else {
        on_source(mem, &mut src, &mut i, None);
    }
    let mut switchover = mem;
    // At switch-over the plan is made (again, with pre-copy) from the source's cache as
    // it is then: while memory moved, the guest kept reading blocks the first plan did
    // not know, and the heat moved; what pre-copy already brought is skipped.
    let early_plan = pf.plan.len() as u64;
    let (late_plan, mut have) = plan_of(&src);
    pf.plan = &late_plan;
    pf.next = 0;
    let planned_blocks = early_plan.max(pf.plan.len() as u64);
    if strategy == Strategy::FullCopy {
        // The whole plan crosses the peer link before the VM switches over; at switch-over
        // the destination holds what the source holds then (writes during the copy are
        // sent again, as dirty tracking would).
        #[allow(clippy::cast_precision_loss)]
        let n = pf.plan.len() as f64;
        switchover = mem + n * pf.xfer + pf.latency;
        on_source(switchover, &mut src, &mut i, None);
        pf.peer_bytes += pf.plan.len() as u64 * bs;
        pf.next = pf.plan.len();
        dest = src.clone();
        have = src.map.keys().map(|b| BlockIdx(*b)).collect();
    } else {
        if precopy {
            // Fills done by now land; then the dirty list: written blocks leave the
            // destination, fills of them in flight are void (their generation moved on),
            // and the source's fresh copies are fetched first.
            pf.land(switchover, &mut dest, &gens);
            let mut dropped: Vec<u64> = dirty.iter().copied().collect();
            dropped.sort_unstable();
            for b in dropped {
                if let Some(slot) = dest.map.remove(&b) {
                    dest.slots[slot] = None;
                    dest.free.push(slot);
                }
                if src.map.contains_key(&b) {
                    pf.refetch.push_back(b);
                }
            }
        }
        // The source's heat map and pattern as of switch-over travel with the VM.
        dest.heat = src.heat.clone();
        dest.pattern = src.pattern.clone();
        dest.tick = src.tick;
    }

    let mut origin_free = 0.0f64;
    let mut origin_bytes = 0u64;
    let mut peer_stale: HashSet<u64> = HashSet::new();
    let mut early_lat: Vec<f64> = Vec::new();
    let mut early_misses = 0u64;
    for r in &rest[i..] {
        let t = secs(r.time_us - t0);
        let usable = |b: u64| have.contains(&BlockIdx(b)) && !peer_stale.contains(&b);
        pf.pump(t, switchover, &mut dest, &gens, &usable);
        let early = t - switchover < opts.early_s;
        let mut req_lat: f64 = 0.0;
        for (b, full) in blocks_of(r, bs) {
            if r.op == Op::Write {
                *gens.entry(b).or_insert(0) += 1;
                if strategy.uses_peer() {
                    peer_stale.insert(b);
                }
                if full {
                    dest.insert(b);
                }
                continue;
            }
            let hit = dest.touch(b);
            reads.push((t, hit));
            if follow {
                let useful = |a: u64| {
                    have.contains(&BlockIdx(a))
                        && !peer_stale.contains(&a)
                        && !dest.map.contains_key(&a)
                };
                pf.follow(&dest, total_blocks, &useful);
            }
            let lat = if hit {
                opts.hit_latency_us / 1e6
            } else {
                if early {
                    early_misses += 1;
                }
                if let Some(done) = pf.inflight_set.get(&b) {
                    // A prefetch is bringing it: wait for that, not a second fetch.
                    (done - t).max(0.0)
                } else if strategy.uses_peer()
                    && have.contains(&BlockIdx(b))
                    && !peer_stale.contains(&b)
                {
                    let start = pf.peer_free.max(t);
                    pf.peer_free = start + pf.xfer;
                    pf.peer_bytes += bs;
                    dest.insert(b);
                    pf.peer_free - t + pf.latency
                } else {
                    let start = origin_free.max(t);
                    origin_free = start + o_xfer;
                    origin_bytes += bs;
                    dest.insert(b);
                    origin_free - t + o_lat
                }
            };
            req_lat = req_lat.max(lat);
        }
        if r.op == Op::Read {
            stalls.push((t, req_lat));
            if early {
                early_lat.push(req_lat * 1e6);
            }
        }
    }
    let penalty = Penalty::measure(
        &reads,
        twin.reads,
        &stalls,
        twin.stalls,
        switchover,
        opts.early_s,
    );

    let time_to_warm = time_to_warm(&reads, twin.reads, opts.interval_reads, opts.warm_threshold)
        .map(|t| t.max(switchover));
    BenchRow {
        workload: String::new(),
        strategy: if precopy {
            format!("{}+precopy", strategy.name())
        } else {
            strategy.name().to_owned()
        },
        time_to_warm_s: time_to_warm,
        switchover_s: switchover,
        misses_first_10s: early_misses,
        origin_bytes,
        peer_bytes: pf.peer_bytes,
        twin_origin_bytes: 0,
        read_p50_us: percentile(&mut early_lat, 0.5),
        read_p99_us: percentile(&mut early_lat, 0.99),
        planned_blocks,
        run_s: 0.0,
        penalty_misses: penalty.misses,
        penalty_misses_10s: penalty.misses_early,
        penalty_stall_s: penalty.stall_s,
        penalty_stall_10s_s: penalty.stall_early_s,
        penalty_warm_s: penalty.warm_s,
        curve: curve(&reads, opts.interval_reads),
        twin_curve: Vec::new(),
    }
}

/// The result document the dashboard's Migrations page plots (`--result FILE`): each
/// row's curve thinned to [`model::bench::MAX_POINTS`], and per workload the twin's
/// (the VM that never moved) as the strategy `no migration`.
pub fn result_doc(rows: &[BenchRow], quick: bool, now_ms: u64) -> model::bench::MigrateCacheResult {
    use model::bench::{thin, MigrateCacheRow, MAX_POINTS};
    let mut out = Vec::new();
    let mut twins: Vec<&str> = Vec::new();
    for r in rows {
        if !twins.contains(&r.workload.as_str()) && !r.twin_curve.is_empty() {
            twins.push(&r.workload);
            out.push(MigrateCacheRow {
                workload: r.workload.clone(),
                strategy: "no migration".into(),
                time_to_warm_s: None,
                peer_bytes: 0,
                origin_bytes: r.twin_origin_bytes,
                curve: rounded(thin(&r.twin_curve, MAX_POINTS)),
            });
        }
        out.push(MigrateCacheRow {
            workload: r.workload.clone(),
            strategy: r.strategy.clone(),
            time_to_warm_s: r.time_to_warm_s,
            peer_bytes: r.peer_bytes,
            origin_bytes: r.origin_bytes,
            curve: rounded(thin(&r.curve, MAX_POINTS)),
        });
    }
    model::bench::MigrateCacheResult {
        kind: model::bench::MIGRATE_CACHE_KIND.into(),
        created_at_ms: now_ms,
        quick,
        rows: out,
    }
}

/// Milliseconds and a hundredth of a percent are all a plot shows: a smaller document.
fn rounded(curve: Vec<[f64; 2]>) -> Vec<[f64; 2]> {
    curve
        .into_iter()
        .map(|[t, r]| [(t * 1e3).round() / 1e3, (r * 1e4).round() / 1e4])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> BenchOptions {
        BenchOptions::tiny()
    }

    #[test]
    fn bench_is_deterministic_and_reports_every_strategy() {
        let a = run_bench(small()).unwrap();
        let b = run_bench(small()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), Strategy::ALL.len() + small().precopy.len());
        let row = |s: Strategy| a.iter().find(|r| r.strategy == s.name()).unwrap();
        // Cold: everything from the origin, nothing from the peer.
        assert_eq!(row(Strategy::None).peer_bytes, 0);
        assert!(row(Strategy::None).origin_bytes > 0);
        // Every strategy waits for the memory copy; only full copy also for its disk copy.
        let mem = small().memory_copy_s;
        assert!(row(Strategy::FullCopy).switchover_s > mem);
        assert_eq!(row(Strategy::HeatPattern).switchover_s, mem);
        // Prefetching from the peer saves origin traffic.
        assert!(row(Strategy::HeatPattern).origin_bytes < row(Strategy::None).origin_bytes);
        let json = serde_json::to_value(&a).unwrap();
        for key in [
            "workload",
            "strategy",
            "time_to_warm_s",
            "switchover_s",
            "misses_first_10s",
            "origin_bytes",
            "peer_bytes",
            "read_p50_us",
            "read_p99_us",
            "penalty_misses",
            "penalty_misses_10s",
            "penalty_stall_s",
            "penalty_stall_10s_s",
            "penalty_warm_s",
        ] {
            assert!(json[0].get(key).is_some(), "missing {key}");
        }
    }

    #[test]
    fn penalty_counts_only_the_excess_over_the_twin() {
        // The twin misses a lot (a scan): the old warm metric would call the destination
        // warm at once; the penalty still sees the 3 extra misses, two of them early.
        let twin = [
            (0.0, false),
            (1.0, false),
            (2.0, true),
            (12.0, false),
            (13.0, true),
        ];
        let dest = [
            (0.0, false),
            (1.0, false),
            (2.0, false),
            (12.0, false),
            (13.0, false),
        ];
        let p = Penalty::measure(&dest, &twin, &[], &[], 0.0, 10.0);
        assert_eq!((p.misses, p.misses_early), (2, 1));
        // 95% of 2 excess misses = 1.9: reached at the 13 s read.
        assert_eq!(p.warm_s, 13.0);
        // Stalls: per request, the excess over the twin's, split at 10 s.
        let p = Penalty::measure(
            &dest,
            &twin,
            &[(0.0, 0.5), (11.0, 0.25)],
            &[0.25, 0.5],
            0.0,
            10.0,
        );
        assert_eq!((p.stall_s, p.stall_early_s), (0.0, 0.25));
        // A destination that beat the twin has a negative penalty and is warm at switch-over.
        let p = Penalty::measure(&twin, &dest, &[], &[], 3.0, 10.0);
        assert_eq!((p.misses, p.warm_s), (-2, 3.0));
    }

    #[test]
    fn a_saturating_workload_still_separates_the_strategies() {
        let rows = run_bench(small()).unwrap();
        let row = |s: Strategy| rows.iter().find(|r| r.strategy == s.name()).unwrap();
        // Cold start pays the most, and the penalty says so even where warm_s cannot.
        assert!(row(Strategy::None).penalty_misses > 0);
        assert!(row(Strategy::HeatPattern).penalty_misses < row(Strategy::None).penalty_misses);
        assert!(row(Strategy::None).penalty_stall_s > row(Strategy::HeatPattern).penalty_stall_s);
        for r in &rows {
            assert!(r.penalty_warm_s >= r.switchover_s, "{r:?}");
        }
        // Pre-copy spends the memory copy's time prefetching: never worse than without.
        let pre = rows
            .iter()
            .find(|r| r.strategy == "heat+pattern+precopy")
            .unwrap();
        assert!(
            pre.penalty_misses <= row(Strategy::HeatPattern).penalty_misses,
            "{} > {}",
            pre.penalty_misses,
            row(Strategy::HeatPattern).penalty_misses
        );
    }

    #[test]
    fn blocks_of_marks_full_coverage() {
        let r = IoRequest {
            time_us: 0,
            op: Op::Write,
            offset: 100,
            len: 300,
        };
        assert_eq!(
            blocks_of(&r, 128).collect::<Vec<_>>(),
            vec![(0, false), (1, true), (2, true), (3, false)]
        );
    }

    #[test]
    fn the_result_document_is_one_the_dashboard_takes() {
        let rows = run_bench(small()).unwrap();
        let doc = result_doc(&rows, true, 1);
        doc.validate().unwrap();
        // Per workload the twin, then every row.
        assert_eq!(doc.rows.len(), rows.len() + 1);
        assert_eq!(doc.rows[0].strategy, "no migration");
        let text = serde_json::to_string(&doc).unwrap();
        assert_eq!(model::bench::MigrateCacheResult::parse(&text).unwrap(), doc);
    }
}
