//! NBD (Network Block Device) protocol: codec, server and client.
//!
//! Owns: the wire protocol (fixed newstyle negotiation, transmission phase), a
//! server that exports any [`BlockDevice`], and a blocking client used to pull
//! blocks from a peer host's cache or from an origin NBD server.
//! Must not depend on: the cache (the cache depends on us and implements
//! [`BlockDevice`]), the control plane, tokio.
//!
//! The server is thread-per-connection with blocking I/O: the cache-hit path is
//! a `pread` from the cache file, and threads keep it free of executor hops.
#![warn(missing_docs)]

use std::io;

/// A disk that can be exported over NBD. Offsets and lengths are in bytes and
/// are bounds-checked by the server against [`BlockDevice::size`] before a call.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size of the device in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `data` at `offset`; with `fua`, durable before returning.
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Hints that the range is no longer needed. The default does nothing, which is
    /// a valid NBD trim (the data may stay readable).
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Whether writes are refused (exported with `NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool {
        false
    }
}
