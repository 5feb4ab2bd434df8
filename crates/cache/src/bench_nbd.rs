//! The migration benchmark on the real stack, next to the simulation in [`crate::bench`]:
//! real caches on disk, the source cache exported over NBD on loopback, the destination
//! pulling from it with [`PeerNbdSource`] and rebuilding with [`Rebuild`], the origin a
//! real file behind a [`Throttle`] (a SAN), and the workload replayed through an NBD
//! client against the destination's export — no QEMU needed, wall-clock time.
//!
//! Per strategy: a fresh destination; the second half of the workload is replayed as
//! fast as the stack answers (closed loop), so a strategy that misses more also runs
//! longer. "Warm" is the first 250-read interval from which the destination's hit ratio
//! stays at ≥ 95% of a twin's — a copy of the source cache, taken at the migration, that
//! replays the same reads without moving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd::{NbdAddr, NbdClient, ReconnectPolicy, ServeConfig};

use crate::trace::{IoRequest, Op};
use crate::{
    prepare_destination, BlockCache, BlockOrigin, BlockSize, CacheConfig, FileOrigin, PeerExport,
    PeerNbdSource, Rebuild, Strategy, Throttle,
};

/// What to run.
#[derive(Clone, Debug)]
pub struct NbdBenchOptions {
    /// Disk size, MiB (a random-data file).
    pub disk_mib: u64,
    /// Cache capacity of source, twin and destination, blocks of 64 KiB.
    pub cache_blocks: u64,
    /// Origin model: bytes/s and latency per request.
    pub origin_rate: u64,
    /// Origin latency.
    pub origin_latency: Duration,
    /// Strategies to compare.
    pub strategies: Vec<Strategy>,
    /// Reads per hit-ratio interval.
    pub interval: usize,
}

impl NbdBenchOptions {
    /// 256 MiB disk, 64 MiB caches, a 100 MB/s / 1 ms origin, every strategy.
    pub fn standard() -> Self {
        Self {
            disk_mib: 256,
            cache_blocks: 1024,
            origin_rate: 100_000_000,
            origin_latency: Duration::from_millis(1),
            strategies: Strategy::ALL.to_vec(),
            interval: 250,
        }
    }
}

/// One strategy's outcome.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NbdBenchRow {
    /// Workload name.
    pub workload: String,
    /// Strategy.
    pub strategy: String,
    /// Seconds from switch-over until warm (`None`: never within the run).
    pub time_to_warm_s: Option<f64>,
    /// Seconds spent before switch-over (full-copy's copy).
    pub switchover_s: f64,
    /// Destination misses in the first 10 s.
    pub misses_first_10s: u64,
    /// Bytes the destination read from the origin.
    pub origin_bytes: u64,
    /// Bytes the destination read from the source's cache.
    pub peer_bytes: u64,
    /// Guest read latency in the first 10 s, µs.
    pub read_p50_us: u64,
    /// 99th percentile, µs.
    pub read_p99_us: u64,
    /// Wall time of the replay, s.
    pub replay_s: f64,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum NbdBenchError {
    /// Files or sockets.
    #[error("benchmark I/O failed: {0}")]
    Io(String),
}

fn io<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> NbdBenchError {
    move |e| NbdBenchError::Io(format!("{what}: {e}"))
}

fn origin(
    path: &std::path::Path,
    throttle: Option<Throttle>,
) -> Result<Arc<dyn BlockOrigin>, NbdBenchError> {
    Ok(Arc::new(
        FileOrigin::open(path, BlockSize::DEFAULT, throttle).map_err(io("open origin"))?,
    ))
}

fn replay_direct(cache: &BlockCache, reqs: &[IoRequest]) -> Result<Vec<bool>, NbdBenchError> {
    let mut hits = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for r in reqs {
        let len = (r.len as usize).min(buf.len());
        match r.op {
            Op::Read => {
                let before = cache.stats().misses;
                cache.read(&mut buf[..len], r.offset).map_err(io("read"))?;
                hits.push(cache.stats().misses == before);
            }
            Op::Write => cache
                .write(&buf[..len], r.offset, false)
                .map_err(io("write"))?,
        }
    }
    Ok(hits)
}

/// Hit ratio per interval of `n` reads.
fn intervals(hits: &[bool], n: usize) -> Vec<f64> {
    hits.chunks(n.max(1))
        .map(|c| c.iter().filter(|h| **h).count() as f64 / c.len() as f64)
        .collect()
}

/// Runs `workload` (its requests must fit the disk) under every strategy.
pub fn run_nbd_bench(
    opts: &NbdBenchOptions,
    workload: &str,
    reqs: &[IoRequest],
    progress: &dyn Fn(&str),
) -> Result<Vec<NbdBenchRow>, NbdBenchError> {
    let dir = tempfile::Builder::new()
        .prefix("vinfra-bench")
        .tempdir()
        .map_err(io("tempdir"))?;
    let disk = dir.path().join("origin.raw");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&disk).map_err(io("create origin"))?;
        let mut rng = model::SplitMix64::new(7);
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..opts.disk_mib {
            for w in chunk.chunks_mut(8) {
                w.copy_from_slice(&rng.next_u64().to_le_bytes()[..w.len()]);
            }
            f.write_all(&chunk).map_err(io("fill origin"))?;
        }
        f.sync_all().map_err(io("sync origin"))?;
    }
    let (warm, measure) = reqs.split_at(reqs.len() / 2);
    let cfg = |name: &str| CacheConfig::new(dir.path().join(name), opts.cache_blocks);
    progress("warming the source cache");
    let (src, _) =
        BlockCache::open(cfg("src"), origin(&disk, None)?).map_err(io("open source cache"))?;
    replay_direct(&src, warm)?;
    src.checkpoint().map_err(io("checkpoint"))?;
    let snap = src.migration_snapshot();
    let src = Arc::new(src);
    let server = nbd::serve(
        ServeConfig::new(NbdAddr::Tcp(([127, 0, 0, 1], 0).into()))
            .export("peer", Arc::new(PeerExport(src.clone()))),
    )
    .map_err(io("serve source"))?;
    let peer_addr = server.local_addr();

    // The twin: the source cache as it was at the migration, replaying the same reads.
    progress("replaying on the twin");
    copy_dir(&dir.path().join("src"), &dir.path().join("twin"))?;
    let (twin, _) = BlockCache::open(cfg("twin"), origin(&disk, None)?).map_err(io("open twin"))?;
    let twin_ratio = intervals(&replay_direct(&twin, measure)?, opts.interval);
    drop(twin);

    let mut rows = Vec::new();
    for &strategy in &opts.strategies {
        progress(&format!("{workload}: {strategy}"));
        let name = format!("dst-{}", strategy.name().replace('+', "-"));
        let throttle = Throttle::new(opts.origin_rate, opts.origin_latency);
        let (dst, _) = BlockCache::open(cfg(&name), origin(&disk, Some(throttle))?)
            .map_err(io("open destination"))?;
        let dst = Arc::new(dst);
        let peer = PeerNbdSource::connect(
            peer_addr.clone(),
            "peer",
            ReconnectPolicy::default(),
            snap.block_set(),
            BlockSize::DEFAULT,
        )
        .map_err(io("connect peer"))?;
        let plan = prepare_destination(&dst, &snap, Arc::new(peer), strategy);
        let t_switch = Instant::now();
        let mut rebuild = None;
        if strategy == Strategy::FullCopy {
            Rebuild::start(dst.clone(), plan).join();
        } else if !plan.blocks.is_empty() || plan.follow.is_some() {
            rebuild = Some(Rebuild::start(dst.clone(), plan));
        }
        let switchover_s = t_switch.elapsed().as_secs_f64();
        let dserver = nbd::serve({
            let mut sc =
                ServeConfig::new(NbdAddr::Tcp(([127, 0, 0, 1], 0).into())).export("", dst.clone());
            sc.threads_per_connection = 4;
            sc
        })
        .map_err(io("serve destination"))?;
        let mut client =
            NbdClient::connect(&dserver.local_addr(), "").map_err(io("connect destination"))?;
        let base = dst.stats();
        let start = Instant::now();
        let mut hits = Vec::new();
        let mut ends = Vec::new();
        let mut lat_10s = Vec::new();
        let mut misses_10s = 0;
        let mut buf = vec![0u8; 1 << 20];
        for r in measure {
            let len = (r.len as usize).min(buf.len());
            let t0 = Instant::now();
            match r.op {
                Op::Read => {
                    let before = dst.stats().misses;
                    client
                        .read_at(&mut buf[..len], r.offset)
                        .map_err(io("nbd read"))?;
                    let hit = dst.stats().misses == before;
                    hits.push(hit);
                    ends.push(start.elapsed().as_secs_f64());
                    if start.elapsed() < Duration::from_secs(10) {
                        lat_10s.push(t0.elapsed().as_micros() as u64);
                        misses_10s += u64::from(!hit);
                    }
                }
                Op::Write => client
                    .write_at(&buf[..len], r.offset)
                    .map_err(io("nbd write"))?,
            }
        }
        let replay_s = start.elapsed().as_secs_f64();
        if let Some(r) = rebuild {
            r.cancel();
        }
        let _ = client.disconnect();
        dserver.shutdown();
        let ratio = intervals(&hits, opts.interval);
        // First interval from which the destination stays within 95% of the twin.
        let warm_at = (0..ratio.len()).find(|&i| {
            (i..ratio.len()).all(|j| ratio[j] >= 0.95 * twin_ratio.get(j).copied().unwrap_or(1.0))
        });
        let time_to_warm_s = warm_at.map(|i| {
            let end = ((i + 1) * opts.interval).min(ends.len());
            if i == 0 {
                0.0
            } else {
                ends.get(i * opts.interval - 1).copied().unwrap_or(replay_s)
            }
            .min(ends.get(end.saturating_sub(1)).copied().unwrap_or(replay_s))
        });
        lat_10s.sort_unstable();
        let pct = |p: f64| {
            lat_10s
                .get(((lat_10s.len() as f64 * p) as usize).min(lat_10s.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        let s = dst.stats();
        rows.push(NbdBenchRow {
            workload: workload.to_owned(),
            strategy: strategy.name().to_owned(),
            time_to_warm_s,
            switchover_s,
            misses_first_10s: misses_10s,
            origin_bytes: s.bytes_from_origin - base.bytes_from_origin,
            peer_bytes: s.bytes_from_peer - base.bytes_from_peer,
            read_p50_us: pct(0.5),
            read_p99_us: pct(0.99),
            replay_s,
        });
    }
    server.shutdown();
    Ok(rows)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<(), NbdBenchError> {
    std::fs::create_dir_all(to).map_err(io("create twin dir"))?;
    for e in std::fs::read_dir(from)
        .map_err(io("read source dir"))?
        .flatten()
    {
        std::fs::copy(e.path(), to.join(e.file_name())).map_err(io("copy source cache"))?;
    }
    Ok(())
}
