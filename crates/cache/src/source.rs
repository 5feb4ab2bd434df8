//! Where a cache gets blocks it does not have: the origin (the VM's disk image) and peers
//! (another host's cache). A peer may lack a block; the origin never does.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::types::{BlockIdx, BlockSize, Generation};

/// A block source failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Reading a block failed.
    #[error("cannot read {block} from {source_name}")]
    Read {
        /// The source, e.g. a path or an NBD address.
        source_name: String,
        /// The block.
        block: BlockIdx,
        /// The cause.
        #[source]
        err: io::Error,
    },
    /// Writing to the origin failed.
    #[error("cannot write {len} bytes at offset {offset} to {source_name}")]
    Write {
        /// The origin.
        source_name: String,
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: usize,
        /// The cause.
        #[source]
        err: io::Error,
    },
    /// Flushing the origin failed.
    #[error("cannot flush {source_name}")]
    Flush {
        /// The origin.
        source_name: String,
        /// The cause.
        #[source]
        err: io::Error,
    },
    /// Opening the source failed.
    #[error("cannot open block source {source_name}")]
    Open {
        /// The source.
        source_name: String,
        /// The cause.
        #[source]
        err: io::Error,
    },
}

/// Something that can hand out whole blocks.
pub trait BlockSource: Send + Sync + std::fmt::Debug {
    /// A name for logs and errors (a path, an NBD address).
    fn name(&self) -> &str;
    /// Fills `buf` (exactly one block; bytes past the end of the disk are zero) with block
    /// `idx`. `Ok(None)` means this source does not hold the block (a peer's cache that
    /// never had it): the caller falls back to the origin. `Ok(Some(g))` gives the
    /// generation of the copy, as the source knows it.
    fn read_block(&self, idx: BlockIdx, buf: &mut [u8]) -> Result<Option<Generation>, SourceError>;
}

/// The origin: the authoritative disk, which also takes the cache's write-through.
pub trait BlockOrigin: BlockSource {
    /// Size of the disk in bytes.
    fn size(&self) -> u64;
    /// Writes `data` at byte `offset`; with `fua`, durable before returning.
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), SourceError>;
    /// Makes completed writes durable.
    fn flush(&self) -> Result<(), SourceError>;
}

/// A bandwidth + latency limiter modelling a remote SAN link: transfers queue on one link
/// of `bytes_per_sec`, and each request pays `latency` once on top.
#[derive(Debug)]
pub struct Throttle {
    bytes_per_sec: u64,
    latency: Duration,
    busy_until: Mutex<Instant>,
}

impl Throttle {
    /// A link of `bytes_per_sec` (0 = unlimited) with a fixed per-request `latency`.
    pub fn new(bytes_per_sec: u64, latency: Duration) -> Self {
        Self {
            bytes_per_sec,
            latency,
            busy_until: Mutex::new(Instant::now()),
        }
    }

    /// Blocks the caller for as long as moving `bytes` over the link takes.
    pub fn wait(&self, bytes: usize) {
        let xfer = if self.bytes_per_sec == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64)
        };
        let done = {
            // A poisoned lock only means another reader panicked mid-update; the instant
            // inside is still a valid instant.
            let mut busy = self
                .busy_until
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let start = (*busy).max(Instant::now());
            *busy = start + xfer;
            *busy
        } + self.latency;
        let now = Instant::now();
        if done > now {
            std::thread::sleep(done - now);
        }
    }
}

/// The origin as a local file (a disk image), optionally behind a [`Throttle`].
#[derive(Debug)]
pub struct FileOrigin {
    path: PathBuf,
    name: String,
    file: File,
    size: u64,
    block_size: BlockSize,
    throttle: Option<Throttle>,
}

impl FileOrigin {
    /// Opens `path` read-write as the origin of a disk with blocks of `block_size`.
    pub fn open(
        path: &Path,
        block_size: BlockSize,
        throttle: Option<Throttle>,
    ) -> Result<Self, SourceError> {
        let name = path.display().to_string();
        let open_err = |err| SourceError::Open {
            source_name: name.clone(),
            err,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        Ok(Self {
            path: path.to_owned(),
            name,
            file,
            size,
            block_size,
            throttle,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockSource for FileOrigin {
    fn name(&self) -> &str {
        &self.name
    }

    fn read_block(&self, idx: BlockIdx, buf: &mut [u8]) -> Result<Option<Generation>, SourceError> {
        let err = |err| SourceError::Read {
            source_name: self.name.clone(),
            block: idx,
            err,
        };
        let off = self
            .block_size
            .offset_of(idx)
            .filter(|o| *o < self.size)
            .ok_or_else(|| {
                err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "block past the end of the disk",
                ))
            })?;
        let avail = usize::try_from(self.size - off)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if let Some(t) = &self.throttle {
            t.wait(buf.len());
        }
        self.file
            .read_exact_at(&mut buf[..avail], off)
            .map_err(err)?;
        buf[avail..].fill(0);
        Ok(Some(Generation::default()))
    }
}

impl BlockOrigin for FileOrigin {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), SourceError> {
        let err = |err| SourceError::Write {
            source_name: self.name.clone(),
            offset,
            len: data.len(),
            err,
        };
        if let Some(t) = &self.throttle {
            t.wait(data.len());
        }
        self.file.write_all_at(data, offset).map_err(err)?;
        if fua {
            self.file.sync_data().map_err(err)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), SourceError> {
        self.file.sync_data().map_err(|err| SourceError::Flush {
            source_name: self.name.clone(),
            err,
        })
    }
}

/// A peer that is another [`crate::BlockCache`] in this process (tests, the benchmark).
/// It serves only what that cache holds, verified, and never fills it.
#[derive(Debug, Clone)]
pub struct CacheSource {
    cache: Arc<crate::BlockCache>,
    name: String,
}

impl CacheSource {
    /// A peer source over `cache`.
    pub fn new(cache: Arc<crate::BlockCache>) -> Self {
        let name = format!("cache {}", cache.dir().display());
        Self { cache, name }
    }
}

impl BlockSource for CacheSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn read_block(&self, idx: BlockIdx, buf: &mut [u8]) -> Result<Option<Generation>, SourceError> {
        self.cache
            .peek_block(idx, buf)
            .map_err(|e| SourceError::Read {
                source_name: self.name.clone(),
                block: idx,
                err: io::Error::other(e),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_origin_reads_blocks_and_zero_fills_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        let data: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let o = FileOrigin::open(&p, BlockSize::new(1024).unwrap(), None).unwrap();
        let mut buf = vec![0xffu8; 1024];
        o.read_block(BlockIdx(1), &mut buf).unwrap();
        assert_eq!(&buf[..476], &data[1024..]);
        assert!(buf[476..].iter().all(|b| *b == 0));
        assert!(o.read_block(BlockIdx(2), &mut buf).is_err());
    }

    #[test]
    fn throttle_paces_transfers() {
        let t = Throttle::new(10_000_000, Duration::from_millis(1));
        let start = Instant::now();
        for _ in 0..5 {
            t.wait(20_000); // 2 ms each on a 10 MB/s link
        }
        assert!(
            start.elapsed() >= Duration::from_millis(10),
            "{:?}",
            start.elapsed()
        );
    }
}
