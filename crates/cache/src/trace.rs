//! Block I/O workloads: readers for public trace formats and seeded synthetic generators.
//!
//! Every reader turns a trace into [`IoRequest`]s (time in µs from the first request,
//! byte offset and length) and fails on a malformed line with an error naming the file and
//! the line, never a panic.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use model::SplitMix64;

/// Read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A read.
    Read,
    /// A write.
    Write,
}

/// One request of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoRequest {
    /// Microseconds since the first request.
    pub time_us: u64,
    /// Read or write.
    pub op: Op,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be opened or read.
    #[error("cannot read trace {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        err: io::Error,
    },
    /// A line is not in the expected format.
    #[error("trace {path} line {line}: {what}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        what: String,
    },
}

/// Supported trace formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TraceFormat {
    /// CloudPhysics CSV: `version,time,op,size,lbn` (op `28` read, `2a` write; size in
    /// bytes; lbn in 512-byte sectors; time in seconds).
    CloudPhysics,
    /// SNIA / MSR Cambridge CSV: `Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime`
    /// (Windows filetime ticks of 100 ns; `Read`/`Write`; bytes).
    Msr,
    /// Alibaba block traces 2020: `device_id,opcode,offset,length,timestamp` (`R`/`W`;
    /// bytes; µs).
    Alibaba,
}

impl TraceFormat {
    /// Every format, in the order [`TraceFormat::detect`] tries them.
    pub const ALL: [TraceFormat; 3] = [
        TraceFormat::Msr,
        TraceFormat::Alibaba,
        TraceFormat::CloudPhysics,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            TraceFormat::CloudPhysics => "cloudphysics",
            TraceFormat::Msr => "msr",
            TraceFormat::Alibaba => "alibaba",
        }
    }

    /// Recognises a format from a trace's first non-empty, non-comment line: a header
    /// (`version,…`, `Timestamp,…`, `device_id,…`) or the shape of a first record (field
    /// count and the op field's spelling). `None` when no format fits.
    pub fn detect(first_line: &str) -> Option<TraceFormat> {
        let f: Vec<&str> = first_line.split(',').map(str::trim).collect();
        let head = f.first().map(|s| s.to_ascii_lowercase());
        match head.as_deref() {
            Some("version") => return Some(TraceFormat::CloudPhysics),
            Some("timestamp") => return Some(TraceFormat::Msr),
            Some("device_id") => return Some(TraceFormat::Alibaba),
            _ => {}
        }
        let numeric = |i: usize| f.get(i).is_some_and(|s| s.parse::<u64>().is_ok());
        let op = |i: usize| f.get(i).map(|s| s.to_ascii_lowercase());
        if f.len() == 7 && numeric(0) && matches!(op(3).as_deref(), Some("read" | "write")) {
            Some(TraceFormat::Msr)
        } else if f.len() == 5 && numeric(0) && matches!(op(1).as_deref(), Some("r" | "w")) {
            Some(TraceFormat::Alibaba)
        } else if f.len() == 5 && numeric(1) && matches!(op(2).as_deref(), Some("28" | "2a")) {
            Some(TraceFormat::CloudPhysics)
        } else {
            None
        }
    }
}

impl std::str::FromStr for TraceFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TraceFormat::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown trace format {s:?} (expected msr, alibaba or cloudphysics)")
            })
    }
}

/// Recognises the format of the trace at `path` from its first record (see
/// [`TraceFormat::detect`]).
pub fn detect_format(path: &Path) -> Result<TraceFormat, TraceError> {
    let f = File::open(path).map_err(|err| TraceError::Io {
        path: path.to_owned(),
        err,
    })?;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|err| TraceError::Io {
            path: path.to_owned(),
            err,
        })?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        return TraceFormat::detect(line).ok_or_else(|| TraceError::Parse {
            path: path.to_owned(),
            line: i + 1,
            what: "not a trace in a known format (msr, alibaba, cloudphysics): pass --trace-format"
                .into(),
        });
    }
    Err(TraceError::Parse {
        path: path.to_owned(),
        line: 0,
        what: "the trace is empty".into(),
    })
}

/// One request as a SNIA / MSR Cambridge CSV line (no newline): `Timestamp` in Windows
/// filetime ticks of 100 ns counted from `epoch_ticks`, `Hostname`, `DiskNumber`, `Type`,
/// `Offset`, `Size`, `ResponseTime` (ticks). The format most block-trace tools read, and
/// the one [`parse_trace`] reads back exactly (time to the µs).
pub fn msr_line(
    epoch_ticks: u64,
    host: &str,
    disk: u32,
    r: &IoRequest,
    response_ticks: u64,
) -> String {
    let op = match r.op {
        Op::Read => "Read",
        Op::Write => "Write",
    };
    format!(
        "{},{},{disk},{op},{},{},{response_ticks}",
        epoch_ticks.saturating_add(r.time_us.saturating_mul(10)),
        host.replace(',', "_"),
        r.offset,
        r.len
    )
}

/// Windows filetime ticks (100 ns since 1601-01-01) at the Unix epoch: MSR timestamps
/// count from 1601.
pub const FILETIME_UNIX_EPOCH: u64 = 116_444_736_000_000_000;

/// Writes a live recording of block requests as MSR Cambridge CSV (see [`msr_line`]):
/// what the agent's NBD server does for `vinfra vm trace`. Buffered; [`MsrRecorder::finish`]
/// flushes and syncs it.
#[derive(Debug)]
pub struct MsrRecorder {
    out: io::BufWriter<File>,
    path: PathBuf,
    host: String,
    epoch_ticks: u64,
    started: std::time::Instant,
    requests: u64,
}

impl MsrRecorder {
    /// Creates (truncates) `path`; timestamps count from now (wall clock, as filetime).
    pub fn create(path: &Path, host: &str) -> io::Result<Self> {
        let since_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let ticks = u64::try_from(since_unix.as_nanos() / 100).unwrap_or(u64::MAX);
        Ok(Self {
            out: io::BufWriter::new(File::create(path)?),
            path: path.to_owned(),
            host: host.to_owned(),
            epoch_ticks: FILETIME_UNIX_EPOCH.saturating_add(ticks),
            started: std::time::Instant::now(),
            requests: 0,
        })
    }

    /// Records one request that arrived `at` and took `took`.
    pub fn record(
        &mut self,
        op: Op,
        offset: u64,
        len: u32,
        at: std::time::Instant,
        took: std::time::Duration,
    ) -> io::Result<()> {
        use std::io::Write as _;
        let time_us = u64::try_from(at.saturating_duration_since(self.started).as_micros())
            .unwrap_or(u64::MAX);
        let r = IoRequest {
            time_us,
            op,
            offset,
            len,
        };
        let response = u64::try_from(took.as_nanos() / 100).unwrap_or(u64::MAX);
        writeln!(
            self.out,
            "{}",
            msr_line(self.epoch_ticks, &self.host, 0, &r, response)
        )?;
        self.requests += 1;
        Ok(())
    }

    /// Requests recorded so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Flushes and syncs the file; returns its path and the request count.
    pub fn finish(mut self) -> io::Result<(PathBuf, u64)> {
        use std::io::Write as _;
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        Ok((self.path, self.requests))
    }
}

/// Reads the trace at `path` in `format`.
pub fn read_trace(path: &Path, format: TraceFormat) -> Result<Vec<IoRequest>, TraceError> {
    let f = File::open(path).map_err(|err| TraceError::Io {
        path: path.to_owned(),
        err,
    })?;
    parse_trace(BufReader::new(f), path, format)
}

/// Parses a trace from `r`; `path` only names it in errors.
pub fn parse_trace(
    r: impl BufRead,
    path: &Path,
    format: TraceFormat,
) -> Result<Vec<IoRequest>, TraceError> {
    let mut out = Vec::new();
    let mut t0: Option<u64> = None;
    for (i, line) in r.lines().enumerate() {
        let lineno = i + 1;
        let line = line.map_err(|err| TraceError::Io {
            path: path.to_owned(),
            err,
        })?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |what: String| TraceError::Parse {
            path: path.to_owned(),
            line: lineno,
            what,
        };
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let num = |idx: usize, name: &str| -> Result<u64, TraceError> {
            let s = f
                .get(idx)
                .ok_or_else(|| bad(format!("missing field {name}")))?;
            s.parse::<u64>()
                .map_err(|_| bad(format!("field {name} is not a number: {s:?}")))
        };
        let parsed: Option<(u64, Op, u64, u64)> = match format {
            TraceFormat::CloudPhysics => {
                if lineno == 1 && f.first() == Some(&"version") {
                    None
                } else {
                    let op = match f.get(2).copied() {
                        Some("28") => Op::Read,
                        Some("2a") | Some("2A") => Op::Write,
                        other => {
                            return Err(bad(format!("unknown op {other:?} (expected 28 or 2a)")))
                        }
                    };
                    let lbn = num(4, "lbn")?;
                    let off = lbn
                        .checked_mul(512)
                        .ok_or_else(|| bad(format!("lbn {lbn} overflows")))?;
                    let secs = num(1, "time")?;
                    Some((secs.saturating_mul(1_000_000), op, off, num(3, "size")?))
                }
            }
            TraceFormat::Msr => {
                if lineno == 1
                    && f.first()
                        .is_some_and(|s| s.eq_ignore_ascii_case("timestamp"))
                {
                    None
                } else {
                    let op = match f.get(3).map(|s| s.to_ascii_lowercase()) {
                        Some(s) if s == "read" => Op::Read,
                        Some(s) if s == "write" => Op::Write,
                        other => {
                            return Err(bad(format!(
                                "unknown type {other:?} (expected Read or Write)"
                            )))
                        }
                    };
                    // Filetime ticks are 100 ns.
                    Some((
                        num(0, "Timestamp")? / 10,
                        op,
                        num(4, "Offset")?,
                        num(5, "Size")?,
                    ))
                }
            }
            TraceFormat::Alibaba => {
                if lineno == 1 && f.first() == Some(&"device_id") {
                    None
                } else {
                    let op = match f.get(1).copied() {
                        Some("R") | Some("r") => Op::Read,
                        Some("W") | Some("w") => Op::Write,
                        other => {
                            return Err(bad(format!("unknown opcode {other:?} (expected R or W)")))
                        }
                    };
                    Some((
                        num(4, "timestamp")?,
                        op,
                        num(2, "offset")?,
                        num(3, "length")?,
                    ))
                }
            }
        };
        let Some((t, op, offset, len)) = parsed else {
            continue;
        };
        let len = u32::try_from(len).map_err(|_| bad(format!("length {len} is too large")))?;
        if len == 0 {
            continue;
        }
        let base = *t0.get_or_insert(t);
        out.push(IoRequest {
            time_us: t.saturating_sub(base),
            op,
            offset,
            len,
        });
    }
    Ok(out)
}

/// Parameters of a synthetic workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SynthSpec {
    /// RNG seed: equal seeds give equal workloads.
    pub seed: u64,
    /// Requests to generate.
    pub requests: usize,
    /// Size of the region addressed, in bytes.
    pub span_bytes: u64,
    /// Request size in bytes.
    pub io_size: u32,
    /// Requests per second (sets `time_us`).
    pub iops: u64,
}

fn time_of(i: usize, iops: u64) -> u64 {
    (i as u64).saturating_mul(1_000_000) / iops.max(1)
}

/// Zipf-distributed ranks over `n` items with exponent `theta`, by inverse CDF.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// A sampler over ranks `0..n` (rank 0 most popular).
    pub fn new(n: usize, theta: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf = Vec::with_capacity(n.max(1));
        for k in 1..=n.max(1) {
            // k fits f64 exactly for any n we can allocate.
            #[allow(clippy::cast_precision_loss)]
            let w = 1.0 / (k as f64).powf(theta);
            acc += w;
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Self { cdf }
    }

    /// Draws one rank.
    pub fn sample(&self, rng: &mut SplitMix64) -> usize {
        let u = rng.next_f64();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

/// Scatters rank `r` over `n` slots (as fio does, so hot blocks are not adjacent): a
/// multiplicative permutation with a multiplier coprime to `n`.
fn scatter(r: u64, n: u64) -> u64 {
    let mut m = 0x9E37_79B9_7F4A_7C15u64 % n.max(1);
    while gcd(m, n) != 1 {
        m += 1;
    }
    ((u128::from(r) * u128::from(m)) % u128::from(n.max(1))) as u64
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Random reads with a zipf(`theta`) popularity over the span (fio
/// `rw=randread random_distribution=zipf:theta`).
pub fn zipf_random(spec: &SynthSpec, theta: f64, read_pct: u8) -> Vec<IoRequest> {
    let io = u64::from(spec.io_size.max(1));
    let slots = (spec.span_bytes / io).max(1);
    let zipf = Zipf::new(usize::try_from(slots).unwrap_or(usize::MAX), theta);
    let mut rng = SplitMix64::new(spec.seed);
    (0..spec.requests)
        .map(|i| {
            let slot = scatter(zipf.sample(&mut rng) as u64, slots);
            let op = if rng.below(100) < u64::from(read_pct) {
                Op::Read
            } else {
                Op::Write
            };
            IoRequest {
                time_us: time_of(i, spec.iops),
                op,
                offset: slot * io,
                len: spec.io_size,
            }
        })
        .collect()
}

/// Sequential reads looping over the span (fio `rw=read`).
pub fn sequential(spec: &SynthSpec) -> Vec<IoRequest> {
    let io = u64::from(spec.io_size.max(1));
    let slots = (spec.span_bytes / io).max(1);
    (0..spec.requests)
        .map(|i| IoRequest {
            time_us: time_of(i, spec.iops),
            op: Op::Read,
            offset: (i as u64 % slots) * io,
            len: spec.io_size,
        })
        .collect()
}

/// A mixed job, as a fio job file with two sections run together would produce: an
/// OLTP-like `randrw` with zipf(`theta`) popularity and `read_pct`% reads over the span,
/// next to a reporting job that scans tables (128 KiB sequential reads). There are
/// `tables` tables of `table_bytes` each, placed at seeded offsets; the scanner reads one
/// table start to end, then picks the next at random. One request in `seq_every` is the
/// scanner's.
pub fn mixed(
    spec: &SynthSpec,
    theta: f64,
    read_pct: u8,
    seq_every: u32,
    tables: u32,
    table_bytes: u64,
) -> Vec<IoRequest> {
    let random = zipf_random(spec, theta, read_pct);
    let mut rng = SplitMix64::new(spec.seed ^ u64_mask());
    let scan_io: u64 = 128 * 1024;
    let table_len = (table_bytes / scan_io).max(1);
    let regions = (spec.span_bytes / scan_io).saturating_sub(table_len).max(1);
    let starts: Vec<u64> = (0..tables.max(1)).map(|_| rng.below(regions)).collect();
    let (mut pos, mut left) = (0u64, 0u64);
    random
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            if seq_every > 0 && i % seq_every as usize == 0 {
                if left == 0 {
                    pos = starts[usize::try_from(rng.below(starts.len() as u64))
                        .expect("below table count")];
                    left = table_len;
                }
                let req = IoRequest {
                    time_us: r.time_us,
                    op: Op::Read,
                    offset: pos * scan_io,
                    len: 128 * 1024,
                };
                pos += 1;
                left -= 1;
                req
            } else {
                r
            }
        })
        .collect()
}

/// A recurring scan beside a hot set: an application reads and writes (`read_pct`% reads)
/// a zipf(`theta`) hot set of `hot_bytes`, while a backup or report job reads a region of
/// `scan_bytes` (larger than a cache, typically) start to end in 128 KiB requests, over and
/// over. One request in `scan_every` is the scan's. The scan's blocks are hot by count but
/// useless to prefetch; the hot set is what a moved VM needs first.
pub fn scan_hot(
    spec: &SynthSpec,
    theta: f64,
    read_pct: u8,
    hot_bytes: u64,
    scan_bytes: u64,
    scan_every: u32,
) -> Vec<IoRequest> {
    let hot = zipf_random(
        &SynthSpec {
            span_bytes: hot_bytes.min(spec.span_bytes),
            ..spec.clone()
        },
        theta,
        read_pct,
    );
    let mut rng = SplitMix64::new(spec.seed ^ u64_mask());
    let scan_io: u64 = 128 * 1024;
    let scan_len = (scan_bytes / scan_io).max(1);
    // The hot set lives at the start of the disk; the scanned region somewhere after it.
    let first = hot_bytes.div_ceil(scan_io);
    let room = (spec.span_bytes / scan_io)
        .saturating_sub(first + scan_len)
        .max(1);
    let base = first + rng.below(room);
    let mut pos = 0u64;
    hot.into_iter()
        .enumerate()
        .map(|(i, r)| {
            if scan_every > 0 && i % scan_every as usize == 0 {
                let req = IoRequest {
                    time_us: r.time_us,
                    op: Op::Read,
                    offset: (base + pos) * scan_io,
                    len: 128 * 1024,
                };
                pos = (pos + 1) % scan_len;
                req
            } else {
                r
            }
        })
        .collect()
}

/// B-tree index lookups: a tree of the given `fanout` whose leaves fill the span, stored
/// level by level (the root first). Each lookup of a zipf(`theta`)-popular key reads the
/// root, one inner node per level and the leaf; one lookup in ten then rewrites its leaf.
/// Every lookup starts at the same few blocks and fans out: the order a moved VM needs
/// its blocks in is the tree's, not the heat's alone.
pub fn btree(spec: &SynthSpec, fanout: u64, theta: f64) -> Vec<IoRequest> {
    let io = u64::from(spec.io_size.max(1));
    let slots = (spec.span_bytes / io).max(2);
    let fanout = fanout.max(2);
    // Level sizes from the leaves up, until the inner nodes fit the span with them.
    let mut leaves = slots - slots / fanout;
    let levels = loop {
        let mut levels = vec![leaves];
        while levels.last().is_some_and(|n| *n > 1) {
            let up = levels.last().copied().unwrap_or(1).div_ceil(fanout);
            levels.push(up);
        }
        if levels.iter().sum::<u64>() <= slots || leaves <= 1 {
            levels.reverse(); // root first
            break levels;
        }
        leaves -= leaves / 16 + 1;
    };
    let starts: Vec<u64> = levels
        .iter()
        .scan(0u64, |acc, n| {
            let s = *acc;
            *acc += n;
            Some(s)
        })
        .collect();
    let leaf_count = levels.last().copied().unwrap_or(1);
    let zipf = Zipf::new(usize::try_from(leaf_count).unwrap_or(usize::MAX), theta);
    let mut rng = SplitMix64::new(spec.seed);
    let depth = levels.len();
    let mut out = Vec::with_capacity(spec.requests);
    while out.len() < spec.requests {
        let leaf = scatter(zipf.sample(&mut rng) as u64, leaf_count);
        for (d, start) in starts.iter().enumerate() {
            // The node on level d above `leaf`.
            let node = leaf / fanout.pow(u32::try_from(depth - 1 - d).unwrap_or(0));
            out.push((Op::Read, (start + node) * io));
        }
        if rng.below(10) == 0 {
            out.push((Op::Write, (starts[depth - 1] + leaf) * io));
        }
    }
    out.truncate(spec.requests);
    out.into_iter()
        .enumerate()
        .map(|(i, (op, offset))| IoRequest {
            time_us: time_of(i, spec.iops),
            op,
            offset,
            len: spec.io_size,
        })
        .collect()
}

/// A Pareto mix: block popularity from a Pareto(`alpha`) distribution (≈80/20 at
/// `alpha` = 1.16) scattered over the span, `read_pct`% reads, request sizes of 4, 16 or
/// 64 KiB (aligned to their size), as a file server's mix would show.
pub fn pareto(spec: &SynthSpec, alpha: f64, read_pct: u8) -> Vec<IoRequest> {
    let unit: u64 = 4096;
    let slots = (spec.span_bytes / (16 * unit)).max(1);
    let mut rng = SplitMix64::new(spec.seed);
    (0..spec.requests)
        .map(|i| {
            // Inverse CDF of Pareto(x_m = 1, alpha), shifted to start at 0 and scaled so
            // that the head spans 1/64 of the span (at alpha 1.16: half the requests in
            // ~1.3% of it, 90% in ~10%, 1% beyond it, wrapped around).
            let u = rng.next_f64();
            let x = (1.0 - u).max(1e-12).powf(-1.0 / alpha.max(0.01)) - 1.0;
            #[allow(clippy::cast_precision_loss)]
            let scale = (slots as f64 / 64.0).max(1.0);
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let rank = ((x * scale).min(1e18) as u64) % slots;
            let chunk = scatter(rank, slots) * 16 * unit;
            let len = [unit, 4 * unit, 16 * unit][usize::try_from(rng.below(3)).unwrap_or(0)];
            let offset = chunk + rng.below(16 * unit / len) * len;
            let op = if rng.below(100) < u64::from(read_pct) {
                Op::Read
            } else {
                Op::Write
            };
            IoRequest {
                time_us: time_of(i, spec.iops),
                op,
                offset,
                #[allow(clippy::cast_possible_truncation)]
                len: len as u32,
            }
        })
        .collect()
}

const fn u64_mask() -> u64 {
    0x00ff_00ff_00ff_00ff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str, f: TraceFormat) -> Result<Vec<IoRequest>, TraceError> {
        parse_trace(s.as_bytes(), Path::new("t.csv"), f)
    }

    #[test]
    fn parses_cloudphysics() {
        let r = parse(
            "version,time,op,size,lbn\n1,100,28,4096,8\n1,102,2a,512,16\n",
            TraceFormat::CloudPhysics,
        )
        .unwrap();
        assert_eq!(
            r[0],
            IoRequest {
                time_us: 0,
                op: Op::Read,
                offset: 4096,
                len: 4096
            }
        );
        assert_eq!(
            r[1],
            IoRequest {
                time_us: 2_000_000,
                op: Op::Write,
                offset: 8192,
                len: 512
            }
        );
    }

    #[test]
    fn parses_msr_and_alibaba() {
        let msr = "128166372003061629,hm,0,Read,383496192,32768,1153\n128166372013061629,hm,0,Write,0,512,10\n";
        let r = parse(msr, TraceFormat::Msr).unwrap();
        assert_eq!(
            r[1],
            IoRequest {
                time_us: 1_000_000,
                op: Op::Write,
                offset: 0,
                len: 512
            }
        );
        let ali = "device_id,opcode,offset,length,timestamp\n3,R,4096,8192,1577808000000\n3,W,0,4096,1577808000500\n";
        let r = parse(ali, TraceFormat::Alibaba).unwrap();
        assert_eq!(
            r[1],
            IoRequest {
                time_us: 500,
                op: Op::Write,
                offset: 0,
                len: 4096
            }
        );
    }

    #[test]
    fn detects_each_format_from_its_header_or_first_record() {
        let cases = [
            ("version,time,op,size,lbn", Some(TraceFormat::CloudPhysics)),
            ("1,100,28,4096,8", Some(TraceFormat::CloudPhysics)),
            (
                "Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime",
                Some(TraceFormat::Msr),
            ),
            (
                "128166372003061629,hm,0,Read,383496192,32768,1153",
                Some(TraceFormat::Msr),
            ),
            (
                "device_id,opcode,offset,length,timestamp",
                Some(TraceFormat::Alibaba),
            ),
            ("3,W,0,4096,1577808000500", Some(TraceFormat::Alibaba)),
            ("hello,world", None),
            ("1,2,3,4,5", None),
        ];
        for (line, want) in cases {
            assert_eq!(TraceFormat::detect(line), want, "{line}");
        }
        assert_eq!("MSR".parse::<TraceFormat>(), Ok(TraceFormat::Msr));
        assert!("blk"
            .parse::<TraceFormat>()
            .unwrap_err()
            .contains("msr, alibaba"));
    }

    #[test]
    fn msr_lines_read_back_exactly() {
        let reqs = [
            IoRequest {
                time_us: 0,
                op: Op::Read,
                offset: 4096,
                len: 65536,
            },
            IoRequest {
                time_us: 1_234_567,
                op: Op::Write,
                offset: 1 << 33,
                len: 512,
            },
        ];
        let text: String = reqs
            .iter()
            .map(|r| msr_line(133_000_000_000_000_000, "host,a", 2, r, 7) + "\n")
            .collect();
        assert!(
            text.starts_with("133000000000000000,host_a,2,Read,4096,65536,7\n"),
            "{text}"
        );
        assert_eq!(
            TraceFormat::detect(text.lines().next().unwrap()),
            Some(TraceFormat::Msr)
        );
        assert_eq!(parse(&text, TraceFormat::Msr).unwrap(), reqs);
    }

    #[test]
    fn a_recording_reads_back_as_msr() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        let mut rec = MsrRecorder::create(&p, "host-a").unwrap();
        let t0 = std::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        rec.record(Op::Read, 65536, 4096, t0, ms(1)).unwrap();
        rec.record(Op::Write, 0, 512, t0 + ms(5), ms(2)).unwrap();
        assert_eq!(rec.requests(), 2);
        let (path, n) = rec.finish().unwrap();
        assert_eq!(n, 2);
        assert_eq!(detect_format(&path).unwrap(), TraceFormat::Msr);
        let r = read_trace(&path, TraceFormat::Msr).unwrap();
        assert_eq!((r[0].op, r[0].offset, r[0].len), (Op::Read, 65536, 4096));
        assert_eq!((r[1].op, r[1].offset, r[1].len), (Op::Write, 0, 512));
        // Times are relative to the first request, to the µs.
        assert!((4_000..6_000).contains(&r[1].time_us), "{r:?}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.lines().all(|l| l.split(',').nth(1) == Some("host-a")),
            "{text}"
        );
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let e = parse(
            "version,time,op,size,lbn\n1,1,28,4096,8\n1,1,99,4096,8\n",
            TraceFormat::CloudPhysics,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "trace t.csv line 3: unknown op Some(\"99\") (expected 28 or 2a)"
        );
        let e = parse("1,x,28,4096,8\n", TraceFormat::CloudPhysics).unwrap_err();
        assert!(
            e.to_string().contains("line 1: field time is not a number"),
            "{e}"
        );
        let e = parse("1,R,4096\n", TraceFormat::Alibaba).unwrap_err();
        assert!(e.to_string().contains("missing field"), "{e}");
        let e = parse("1,1,2a,99999999999,8\n", TraceFormat::CloudPhysics).unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
    }

    #[test]
    fn reads_the_real_cloudphysics_trace() {
        let p = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/traces/cloudphysics.csv"
        ));
        let r = read_trace(p, TraceFormat::CloudPhysics).unwrap();
        assert_eq!(r.len(), 113_872);
        let reads = r.iter().filter(|x| x.op == Op::Read).count();
        assert_eq!(reads, 46_974);
        assert_eq!(r.last().unwrap().time_us, 7_200_000_000);
    }

    #[test]
    fn synthetic_workloads_are_seeded_and_shaped() {
        let spec = SynthSpec {
            seed: 1,
            requests: 20_000,
            span_bytes: 1 << 30,
            io_size: 4096,
            iops: 1000,
        };
        let a = zipf_random(&spec, 1.1, 100);
        assert_eq!(a, zipf_random(&spec, 1.1, 100));
        assert_ne!(
            a,
            zipf_random(
                &SynthSpec {
                    seed: 2,
                    ..spec.clone()
                },
                1.1,
                100
            )
        );
        let mut counts = std::collections::HashMap::new();
        for r in &a {
            *counts.entry(r.offset).or_insert(0u32) += 1;
        }
        let top = counts.values().max().copied().unwrap();
        assert!(top > 1000, "zipf head too flat: {top}");
        assert_eq!(a[1000].time_us, 1_000_000);
        let s = sequential(&spec);
        assert!(s
            .windows(2)
            .take(100)
            .all(|w| w[1].offset == w[0].offset + 4096));
        let m = mixed(&spec, 1.1, 70, 4, 8, 64 << 20);
        let writes = m.iter().filter(|r| r.op == Op::Write).count();
        assert!(writes > 3000 && writes < 6000, "{writes}");
        assert!(m.iter().filter(|r| r.len == 128 * 1024).count() >= 5000);

        // Scan beside a hot set: every 4th request continues one sequential scan.
        let h = scan_hot(&spec, 1.1, 70, 64 << 20, 256 << 20, 4);
        let scan: Vec<&IoRequest> = h.iter().step_by(4).collect();
        assert!(scan
            .windows(2)
            .all(|w| w[1].offset == w[0].offset + 128 * 1024 || w[1].offset == scan[0].offset));
        assert!(
            scan.iter().skip(1).any(|r| r.offset == scan[0].offset),
            "the scan recurs"
        );
        assert!(scan[0].offset >= 64 << 20);
        assert!(h
            .iter()
            .filter(|r| r.len == 4096)
            .all(|r| r.offset < 64 << 20));

        // B-tree: every lookup starts at the root (offset 0); leaves are rewritten.
        let b = btree(&spec, 64, 1.0);
        assert_eq!(b.len(), spec.requests);
        let roots = b.iter().filter(|r| r.offset == 0).count();
        assert!(roots > spec.requests / 5, "{roots}");
        assert!(b.iter().all(|r| r.offset + 4096 <= spec.span_bytes));
        assert!(b.iter().any(|r| r.op == Op::Write));
        assert_eq!(b, btree(&spec, 64, 1.0));

        // Pareto: heavy head, aligned requests of three sizes inside the span.
        let p = pareto(&spec, 1.16, 70);
        assert!(p
            .iter()
            .all(|r| r.offset % u64::from(r.len) == 0
                && r.offset + u64::from(r.len) <= spec.span_bytes));
        let mut chunks = std::collections::HashMap::new();
        for r in &p {
            *chunks.entry(r.offset / 65536).or_insert(0usize) += 1;
        }
        let mut c: Vec<usize> = chunks.into_values().collect();
        c.sort_unstable_by(|a, b| b.cmp(a));
        let top5: usize = c.iter().take(c.len() / 5).sum();
        assert!(
            top5 * 10 > p.len() * 6,
            "top 20% of chunks take {top5} of {}",
            p.len()
        );
    }
}
