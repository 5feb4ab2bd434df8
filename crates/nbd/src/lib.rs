//! NBD (Network Block Device) protocol: codec, server and client.
//!
//! Owns: the wire protocol ([`proto`]: fixed newstyle negotiation, transmission
//! phase), a server ([`server`]) that exports any [`BlockDevice`], a [`FileDevice`]
//! backed by a plain file, and a blocking client ([`client`]) used to pull blocks
//! from a peer host's cache or from an origin NBD server.
//! Must not depend on: the cache (the cache depends on us and implements
//! [`BlockDevice`]), the control plane, tokio.
//!
//! # Threads
//! The server is thread-per-connection with blocking I/O: the cache-hit path is
//! a `pread` from the cache file, and threads keep it free of executor hops. One
//! acceptor thread per listener; each connection thread negotiates, then runs the
//! transmission loop inline (parse a request, call the device, append the reply
//! to an output buffer). Replies are batched: the output buffer is written only
//! when no further complete request is already buffered (or it grows past
//! 256 KiB), so a pipelining client (QEMU, libnbd at queue depth 16) costs one
//! `read` and one `write` system call per batch rather than per request. Large
//! batches (big reads) go to a per-connection writer thread so that the device
//! read of the next request overlaps the socket write of this one.
//! Clients that want parallelism across cores open several connections:
//! `NBD_FLAG_CAN_MULTI_CONN` is advertised because every connection of an export
//! shares one [`BlockDevice`], whose `flush` covers all completed writes.
//!
//! Inline execution means a request that blocks in the device (a cache miss
//! fetched from a peer) holds up the requests queued behind it on the same
//! connection. [`ServeConfig::threads_per_connection`] > 1 switches a server to
//! pooled mode: the connection thread only reads requests, N scoped worker
//! threads execute them and write each reply as it completes (out of order, as
//! NBD allows). Pooled mode costs a lock and a `write` per reply, so it is slower
//! for page-cache-speed devices (see `benches/compare.sh`) and is meant for
//! exports whose reads can wait on the network.
//!
//! # Limits
//! See [`server`] for timeouts, request and option size limits. The client
//! speaks simple replies only and splits requests at 32 MiB (or the server's
//! advertised maximum).
//!
//! ```no_run
//! use std::sync::Arc;
//! use nbd::{FileDevice, NbdAddr, NbdClient, ServeConfig};
//!
//! let dev = FileDevice::open("disk.raw", false)?;
//! let config = ServeConfig::new(NbdAddr::Tcp("127.0.0.1:0".parse()?)).export("", Arc::new(dev));
//! let server = nbd::serve(config)?;
//! let mut client = NbdClient::connect(&server.local_addr(), "")?;
//! let mut buf = vec![0u8; 4096];
//! client.read_at(&mut buf, 0)?;
//! server.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

use std::io;
use std::path::PathBuf;

pub mod client;
mod file;
pub mod proto;
pub mod server;
mod stream;

pub use client::{ClientTls, NbdAddr, NbdClient, NbdUri, ReconnectPolicy, ReconnectingClient};
pub use file::FileDevice;
pub use proto::{ErrorCode, ProtoError};
pub use server::{serve, ExportStats, NbdServer, ServeConfig, ServerHandle};

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
    /// Makes the range read as zeroes; with `fua`, durable before returning. The
    /// default writes zero buffers (at most 1 MiB at a time) through
    /// [`BlockDevice::write_at`].
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; usize::try_from(len.min(CHUNK)).unwrap_or(1 << 20)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK);
            let n_usize = usize::try_from(n).unwrap_or(zeroes.len());
            self.write_at(&zeroes[..n_usize], offset + done, false)?;
            done += n;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }
}

/// Errors of the server, the client and [`FileDevice`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// The listener could not be set up.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        err: io::Error,
    },
    /// A server thread could not be started.
    #[error("cannot start server thread")]
    Spawn(#[source] io::Error),
    /// A device file could not be opened.
    #[error("cannot open block device file {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        err: io::Error,
    },
    /// The TCP or unix connection could not be made.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The server address.
        addr: String,
        /// The cause.
        #[source]
        err: io::Error,
    },
    /// Reading or writing the connection failed (includes timeouts and a closed peer).
    #[error("i/o error on nbd connection to {peer}")]
    Io {
        /// The server address.
        peer: String,
        /// The cause.
        #[source]
        err: io::Error,
    },
    /// The peer sent bytes that do not follow the protocol.
    #[error("protocol violation by {peer}")]
    Protocol {
        /// The server address.
        peer: String,
        /// What was wrong.
        #[source]
        err: ProtoError,
    },
    /// The server does not have the export.
    #[error("export {name:?} not found on {peer}")]
    ExportNotFound {
        /// The export name.
        name: String,
        /// The server address.
        peer: String,
    },
    /// The server refused an option the client needs.
    #[error("{peer} refused {option} with reply {reply:#x}: {message}")]
    OptionRefused {
        /// The server address.
        peer: String,
        /// The option name.
        option: &'static str,
        /// The reply type.
        reply: u32,
        /// The server's message, if any.
        message: String,
    },
    /// The server answered a request with an error value.
    #[error("{peer} failed the request with {code}")]
    Request {
        /// The server address.
        peer: String,
        /// The NBD error.
        code: ErrorCode,
    },
    /// The request does not fit the export or the protocol.
    #[error("invalid request: offset {offset} length {length} on an export of {size} bytes")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
        /// Export size.
        size: u64,
    },
    /// The export is read-only.
    #[error("export is read-only")]
    ReadOnly,
    /// The server does not support the operation.
    #[error("server does not support {0}")]
    Unsupported(&'static str),
    /// An `nbd://` or `nbd+unix://` URI could not be parsed.
    #[error("invalid nbd uri {uri:?}: {reason}")]
    BadUri {
        /// The URI.
        uri: String,
        /// What is wrong.
        reason: &'static str,
    },
}

impl NbdError {
    /// Whether the error means the connection is unusable (and a reconnect may
    /// help), as opposed to a refused request.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            NbdError::Connect { .. } | NbdError::Io { .. } | NbdError::Protocol { .. }
        ) || matches!(
            self,
            NbdError::Request {
                code: ErrorCode::Shutdown,
                ..
            }
        ) || matches!(
            self,
            NbdError::OptionRefused {
                reply: proto::REP_ERR_SHUTDOWN,
                ..
            }
        )
    }
}
