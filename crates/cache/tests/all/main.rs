//! Integration tests of the cache crate: one binary (STYLE.md §12).

mod block_cache;
mod crash;
#[cfg(feature = "nbd")]
mod nbd;
mod precopy;
mod rebuild;

use std::path::Path;
use std::sync::Arc;

use cache::{BlockCache, BlockSize, CacheConfig, FileOrigin, OpenReport};

/// Block size used by the tests: small, so disks and caches stay tiny.
pub const BS: u32 = 4096;

/// Writes a disk image of `blocks` blocks with recognisable contents and opens it.
pub fn origin(dir: &Path, blocks: u64) -> Arc<FileOrigin> {
    let p = dir.join("disk.img");
    let data: Vec<u8> = (0..blocks * u64::from(BS))
        .map(|i| (i / 7 % 251) as u8)
        .collect();
    std::fs::write(&p, data).unwrap();
    Arc::new(FileOrigin::open(&p, BlockSize::new(BS).unwrap(), None).unwrap())
}

/// Opens a cache of `capacity` blocks in `dir/name` in front of `origin`.
pub fn open(
    dir: &Path,
    name: &str,
    capacity: u64,
    origin: &Arc<FileOrigin>,
) -> (Arc<BlockCache>, OpenReport) {
    let mut cfg = CacheConfig::new(dir.join(name), capacity);
    cfg.block_size = BlockSize::new(BS).unwrap();
    let (c, r) = BlockCache::open(cfg, origin.clone()).unwrap();
    (Arc::new(c), r)
}

/// The disk's bytes, read straight from the image file.
pub fn image(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("disk.img")).unwrap()
}
