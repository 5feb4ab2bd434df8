//! `BlockCache::open` on the metadata a crashed (or foreign, or corrupted) host left: a
//! checkpoint and a journal with valid framing and checksums but any content. Opening must
//! not panic; whatever it keeps must be served, written and checkpointed like any other
//! block, and a second open of what the first one saved must succeed and verify the same
//! blocks.
//!
//! Input: a little-endian `u16` body length, the checkpoint body (JSON), then journal
//! records; the target adds the headers and checksums. The files live in a per-process
//! directory under /dev/shm (tmpfs: the cache fsyncs).
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use cache::meta::{parse_checkpoint, META_FORMAT, RECORD_LEN};
use cache::source::{BlockOrigin, BlockSource, SourceError};
use cache::{BlockCache, BlockIdx, BlockSize, CacheConfig, Generation};
use libfuzzer_sys::fuzz_target;

const BS: u32 = 512;
const DISK_BLOCKS: u64 = 32;
const CAPACITY: u64 = 8;

/// The origin disk, in memory: block `i` is filled with byte `i`.
#[derive(Debug)]
struct MemOrigin(Mutex<Vec<u8>>);

impl MemOrigin {
    fn new() -> Self {
        let bs = BS as usize;
        MemOrigin(Mutex::new(
            (0..DISK_BLOCKS as usize * bs)
                .map(|i| (i / bs) as u8)
                .collect(),
        ))
    }
}

impl BlockSource for MemOrigin {
    fn name(&self) -> &str {
        "mem"
    }
    fn read_block(&self, idx: BlockIdx, buf: &mut [u8]) -> Result<Option<Generation>, SourceError> {
        let d = self.0.lock().unwrap();
        buf.fill(0);
        let off = usize::try_from(idx.0 * u64::from(BS)).unwrap_or(usize::MAX);
        if off < d.len() {
            let n = buf.len().min(d.len() - off);
            buf[..n].copy_from_slice(&d[off..off + n]);
        }
        Ok(Some(Generation(0)))
    }
}

impl BlockOrigin for MemOrigin {
    fn size(&self) -> u64 {
        DISK_BLOCKS * u64::from(BS)
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), SourceError> {
        let mut d = self.0.lock().unwrap();
        let off = offset as usize;
        d[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), SourceError> {
        Ok(())
    }
}

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        base.join(format!("vinfra-fuzz-cache-open-{}", std::process::id()))
    })
}

fn config() -> CacheConfig {
    let mut cfg = CacheConfig::new(dir().clone(), CAPACITY);
    cfg.block_size = BlockSize::new(BS).unwrap();
    cfg.checkpoint_every = 32;
    cfg
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let body_len = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    let (body, records) = data[2..].split_at(body_len);

    let dir = dir();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let mut meta = Vec::with_capacity(24 + body.len());
    meta.extend_from_slice(b"VCMETA01");
    meta.extend_from_slice(&META_FORMAT.to_le_bytes());
    meta.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    meta.extend_from_slice(&(body.len() as u64).to_le_bytes());
    meta.extend_from_slice(body);
    let epoch = parse_checkpoint(&meta, &dir.join("meta")).map_or(0, |c| c.epoch);
    let mut journal = b"VCJRNL01".to_vec();
    journal.extend_from_slice(&epoch.to_le_bytes());
    for chunk in records.chunks(RECORD_LEN) {
        let mut r = chunk.to_vec();
        if r.len() == RECORD_LEN {
            r[4..8].fill(0);
            let sum = crc32fast::hash(&r);
            r[4..8].copy_from_slice(&sum.to_le_bytes());
        }
        journal.extend_from_slice(&r);
    }
    std::fs::write(dir.join("meta"), &meta).unwrap();
    std::fs::write(dir.join("journal"), &journal).unwrap();

    let origin = Arc::new(MemOrigin::new());
    let (cache, report) = BlockCache::open(config(), origin.clone()).expect("open on tmpfs");
    assert!(report.verified <= CAPACITY);
    let kept: Vec<u64> = (0..DISK_BLOCKS)
        .filter(|b| cache.contains(BlockIdx(*b)))
        .collect();
    assert_eq!(kept.len() as u64, report.verified);

    // Use it: reads (hits and misses), a write, a prefetch, a checkpoint.
    let mut buf = vec![0u8; BS as usize];
    for b in 0..DISK_BLOCKS {
        cache.read(&mut buf, b * u64::from(BS)).expect("read");
    }
    cache.write(&[0xee; 700], 300, false).expect("write");
    let _ = cache.prefetch(BlockIdx(DISK_BLOCKS - 1));
    let _ = cache.migration_snapshot();
    let _ = cache.lookahead(8);
    cache.flush().expect("flush");
    cache.checkpoint().expect("checkpoint");
    let kept: Vec<u64> = (0..DISK_BLOCKS)
        .filter(|b| cache.contains(BlockIdx(*b)))
        .collect();
    drop(cache);

    // What this open saved reopens cleanly, with the same blocks.
    let (again, report) = BlockCache::open(config(), origin).expect("reopen");
    assert!(report.discarded_checkpoint.is_none(), "{report:?}");
    assert_eq!(
        report.dropped_checksum + report.dropped_generation + report.dropped_invalid,
        0
    );
    let now: Vec<u64> = (0..DISK_BLOCKS)
        .filter(|b| again.contains(BlockIdx(*b)))
        .collect();
    assert_eq!(now, kept);
    // The write reached the origin and is what the cache serves.
    again.read(&mut buf, 0).expect("read");
    assert!(buf[300..].iter().all(|&b| b == 0xee));
});
