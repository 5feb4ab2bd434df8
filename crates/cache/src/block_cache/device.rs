//! The cache as an NBD export ([`nbd::BlockDevice`]).

use std::io;

use model::error_chain;

use crate::{BlockCache, CacheError};

#[cfg(feature = "nbd")]
impl nbd::BlockDevice for BlockCache {
    fn size(&self) -> u64 {
        self.disk_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read(buf, offset).map_err(to_io)
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.write(data, offset, fua).map_err(to_io)
    }

    fn flush(&self) -> io::Result<()> {
        BlockCache::flush(self).map_err(to_io)
    }
}

#[cfg(feature = "nbd")]
fn to_io(e: CacheError) -> io::Error {
    let kind = match &e {
        CacheError::OutOfRange { .. } => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    };
    tracing::error!(error = %error_chain(&e), "cache I/O failed");
    io::Error::new(kind, e)
}
