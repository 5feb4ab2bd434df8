//! The NBD server: named exports of [`BlockDevice`]s over TCP or a unix socket.
//!
//! # Threads
//! [`NbdServer::listen`] starts one acceptor thread (`nbd-accept`); every accepted
//! connection gets its own thread (`nbd-conn-N`) that negotiates and then serves
//! requests inline, in order, with blocking I/O. Replies go to a per-connection
//! output buffer that is written when the input holds no further complete
//! request header (so a pipelining client gets its replies in one `write` per
//! batch), when it passes [`FLUSH_THRESHOLD`], and before any blocking read.
//! Each connection also has a reply-writer thread (`nbd-reply`): batches of
//! 128 KiB or more (large reads) are handed to it over a channel (four
//! rotating buffers), so the next `pread` overlaps the socket write; smaller
//! batches are written by the connection thread itself whenever the writer is
//! idle, because for 4 KiB requests a thread hop costs more than it overlaps.
//! Replies still leave in order. A request that waits on the device (a cache miss fetched from a peer) therefore
//! delays the requests queued behind it on the same connection; clients wanting
//! overlap use several connections (`NBD_FLAG_CAN_MULTI_CONN` is advertised: all
//! connections of an export share one device and its flush).
//!
//! With [`ServeConfig::threads_per_connection`] = N > 1 (pooled mode) the
//! connection thread reads requests and write payloads and queues them on a
//! bounded channel (2N jobs, at most 64 MiB of write payload in flight); N scoped
//! worker threads execute them and write each reply under a lock on the socket.
//! `NBD_CMD_DISC` or EOF drains the queue before the connection closes. Ordering
//! is what NBD requires and no more: a reply is sent only after its write has
//! completed on the device, and a flush covers every write already replied to.
//!
//! # Protocol subset
//! Fixed newstyle only (a non-fixed client may still use `NBD_OPT_EXPORT_NAME`).
//! Options: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO` (answering
//! `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE` min 1 / preferred 4096 / max 32 MiB),
//! `STRUCTURED_REPLY` (reads then answer with one `OFFSET_DATA` chunk, so
//! `NBD_FLAG_SEND_DF` is honoured for free); every other option gets
//! `NBD_REP_ERR_UNSUP`. Commands: `READ`, `WRITE` (FUA), `DISC`, `FLUSH`, `TRIM`,
//! `WRITE_ZEROES` (FUA, NO_HOLE). `CACHE` and `BLOCK_STATUS` are not advertised
//! and get `EINVAL`.
//!
//! # Limits and hostile clients
//! * Negotiation must finish within [`ServeConfig::handshake_timeout`] (10 s) in
//!   total, whatever the pace of the bytes; at most [`MAX_OPTIONS`] options, each
//!   at most [`MAX_OPTION_LEN`] bytes of data. A longer option gets
//!   `NBD_REP_ERR_TOO_BIG` and the connection is closed (we never allocate what a
//!   client announces beyond the limit). Unknown client flags close the connection.
//! * Transmission: an idle connection may stay open indefinitely (QEMU keeps one
//!   per disk), but a request header or write payload that stalls for
//!   [`ServeConfig::io_timeout`] (30 s), or a client that does not read its replies
//!   for that long, closes the connection.
//! * `READ`/`WRITE` lengths above [`MAX_REQUEST_LEN`] (32 MiB, the size the spec
//!   says clients should stay under): a read gets `EINVAL`; a write gets `EINVAL`
//!   and the connection is closed, since its payload cannot be skipped safely.
//! * Ranges: `offset + length` overflowing or beyond the export size gets `ENOSPC`
//!   for writes and write-zeroes and `EINVAL` otherwise; zero-length reads and
//!   writes get `EINVAL`; writes to a read-only export get `EPERM` (their payload
//!   is still consumed). Unknown command flags get `EINVAL`.
//! * A bad request magic or an unknown command type closes the connection (after
//!   an `EINVAL` reply for the latter): framing can no longer be trusted.
//! * At most [`ServeConfig::max_connections`] connections at once; more are
//!   accepted and closed at once. Per connection: a 256 KiB input buffer, an
//!   output buffer per batch in flight (four rotate between the connection and
//!   its writer thread; each holds ≤ 256 KiB, or one read of up to 32 MiB and is
//!   released after use when over 8 MiB), and a write-payload buffer likewise. A
//!   client that stops reading replies thus pins at most 4 × 32 MiB before the
//!   connection blocks, and is dropped after `io_timeout`.
//!
//! # Shutdown
//! [`ServerHandle::shutdown`] stops accepting, shuts down every connection's
//! socket (a blocked read returns), and waits up to 5 s for the connection
//! threads to finish their current request. Dropping the handle does the same.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::stream::Stream;
use crate::{BlockDevice, NbdAddr, NbdError};

mod buffers;
mod connection;
mod handler;
mod handshake;
mod stats;
mod transmission;

use connection::{accept_loop, Listener};
use stats::Counters;
pub use stats::ExportStats;

/// Largest `READ` or `WRITE` the server accepts (32 MiB).
pub const MAX_REQUEST_LEN: u32 = 32 << 20;
/// Largest option data accepted during negotiation.
pub const MAX_OPTION_LEN: u32 = 16 << 10;
/// Most options one negotiation may send.
pub const MAX_OPTIONS: usize = 256;
/// Output buffered past this many bytes is written even if more requests are queued.
pub const FLUSH_THRESHOLD: usize = 256 << 10;
/// Per-connection buffers larger than this (after a request near
/// [`MAX_REQUEST_LEN`]) are freed once used; smaller ones are kept for reuse.
const SHRINK_ABOVE: usize = 8 << 20;
/// Size of the per-connection input buffer (request headers and small writes).
const INBUF_LEN: usize = 256 << 10;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
const PREFERRED_BLOCK: u32 = 4096;

/// How to run a server: where to listen, what to export, limits.
#[derive(Clone)]
pub struct ServeConfig {
    /// TCP address (port 0 picks a free port) or unix socket path.
    pub listen: NbdAddr,
    /// Exports by name; "" is the default export.
    pub exports: HashMap<String, Arc<dyn BlockDevice>>,
    /// Deadline for the whole negotiation phase of a connection.
    pub handshake_timeout: Duration,
    /// How long a half-received request or an unread reply may stall.
    pub io_timeout: Duration,
    /// Most concurrent connections.
    pub max_connections: usize,
    /// Whether `NBD_OPT_STRUCTURED_REPLY` is accepted.
    pub structured_replies: bool,
    /// Threads executing requests per connection. 1 (the default): requests run
    /// inline on the connection thread, in order, with batched replies — fastest
    /// when the device answers from memory or page cache. N > 1: the connection
    /// thread only reads requests and N workers run them concurrently, each
    /// writing its reply as it completes (out of order, as NBD allows) — for
    /// devices whose reads can block (a cache miss fetched from a peer), so that
    /// hits queued behind a miss are not delayed.
    pub threads_per_connection: usize,
    /// TLS for `NBD_OPT_STARTTLS` (TCP only); `None`: the option is refused.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Refuse every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` until TLS is up
    /// (`NBD_REP_ERR_TLS_REQD`): for listeners other hosts can reach.
    pub tls_required: bool,
}

impl ServeConfig {
    /// Defaults: no exports, 10 s handshake, 30 s I/O stall, 1024 connections,
    /// structured replies on.
    pub fn new(listen: NbdAddr) -> ServeConfig {
        ServeConfig {
            listen,
            exports: HashMap::new(),
            handshake_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            max_connections: 1024,
            structured_replies: true,
            threads_per_connection: 1,
            tls: None,
            tls_required: false,
        }
    }

    /// Adds (or replaces) export `name`.
    pub fn export(mut self, name: impl Into<String>, dev: Arc<dyn BlockDevice>) -> ServeConfig {
        self.exports.insert(name.into(), dev);
        self
    }
}

impl fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.exports.keys().collect();
        names.sort();
        f.debug_struct("ServeConfig")
            .field("listen", &self.listen)
            .field("exports", &names)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("io_timeout", &self.io_timeout)
            .field("max_connections", &self.max_connections)
            .field("structured_replies", &self.structured_replies)
            .field("threads_per_connection", &self.threads_per_connection)
            .field("tls", &self.tls.is_some())
            .field("tls_required", &self.tls_required)
            .finish()
    }
}

/// Starts a server as configured; it runs until the handle is shut down or dropped.
pub fn serve(config: ServeConfig) -> Result<ServerHandle, NbdError> {
    let listen = config.listen.clone();
    NbdServer::from_config(config).listen(&listen)
}

struct Export {
    dev: Arc<dyn BlockDevice>,
    counters: Counters,
}

struct Shared {
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    handshake_timeout: Duration,
    io_timeout: Duration,
    max_connections: usize,
    structured_replies: bool,
    threads_per_connection: usize,
    tls: Option<Arc<rustls::ServerConfig>>,
    tls_required: bool,
    shutting_down: AtomicBool,
    /// Clones of every live connection's socket, to shut them down.
    conns: Mutex<HashMap<u64, Stream>>,
    next_id: AtomicU64,
    /// Number of live connection threads.
    active: Mutex<usize>,
    active_cv: Condvar,
    stopped: Mutex<bool>,
    stopped_cv: Condvar,
}

impl Shared {
    fn export(&self, name: &str) -> Option<Arc<Export>> {
        self.exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    fn export_names(&self) -> Vec<String> {
        self.exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

/// A server under construction: exports and limits, not yet listening.
pub struct NbdServer {
    shared: Arc<Shared>,
}

impl fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer")
            .field("exports", &self.shared.export_names())
            .finish()
    }
}

impl Default for NbdServer {
    fn default() -> Self {
        NbdServer::new()
    }
}

impl NbdServer {
    /// A server with no exports and default limits (see [`ServeConfig::new`]).
    pub fn new() -> NbdServer {
        NbdServer::from_config(ServeConfig::new(NbdAddr::Tcp(SocketAddr::from((
            [127, 0, 0, 1],
            0,
        )))))
    }

    /// A server with the exports and limits of `config` (its `listen` is ignored).
    pub fn from_config(config: ServeConfig) -> NbdServer {
        let exports = config
            .exports
            .into_iter()
            .map(|(name, dev)| {
                (
                    name,
                    Arc::new(Export {
                        dev,
                        counters: Counters::default(),
                    }),
                )
            })
            .collect();
        NbdServer {
            shared: Arc::new(Shared {
                exports: RwLock::new(exports),
                handshake_timeout: config.handshake_timeout,
                io_timeout: config.io_timeout,
                max_connections: config.max_connections,
                structured_replies: config.structured_replies,
                threads_per_connection: config.threads_per_connection.clamp(1, 64),
                tls: config.tls.clone(),
                // Requiring TLS without a way to start it would refuse everyone.
                tls_required: config.tls_required && config.tls.is_some(),
                shutting_down: AtomicBool::new(false),
                conns: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                active: Mutex::new(0),
                active_cv: Condvar::new(),
                stopped: Mutex::new(false),
                stopped_cv: Condvar::new(),
            }),
        }
    }

    /// Adds (or replaces) export `name`.
    pub fn add_export(&self, name: impl Into<String>, dev: Arc<dyn BlockDevice>) {
        add_export(&self.shared, name.into(), dev);
    }

    /// Binds `addr` and starts accepting connections. For TCP, port 0 picks a free
    /// port: read it back with [`ServerHandle::local_addr`]. A stale unix socket
    /// file (nobody listening) is replaced.
    pub fn listen(self, addr: &NbdAddr) -> Result<ServerHandle, NbdError> {
        let bind_err = |err| NbdError::Bind {
            addr: addr.to_string(),
            err,
        };
        let (listener, local) = match addr {
            NbdAddr::Tcp(sa) => {
                let l = TcpListener::bind(sa).map_err(bind_err)?;
                let local = l.local_addr().map_err(bind_err)?;
                (Listener::Tcp(l), NbdAddr::Tcp(local))
            }
            NbdAddr::Unix(path) => {
                let l = match UnixListener::bind(path) {
                    Err(e)
                        if e.kind() == io::ErrorKind::AddrInUse
                            && UnixStream::connect(path).is_err() =>
                    {
                        std::fs::remove_file(path).map_err(bind_err)?;
                        UnixListener::bind(path).map_err(bind_err)?
                    }
                    r => r.map_err(bind_err)?,
                };
                (Listener::Unix(l), NbdAddr::Unix(path.clone()))
            }
        };
        let shared = self.shared.clone();
        let acceptor = thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(shared, listener))
            .map_err(NbdError::Spawn)?;
        tracing::info!(addr = %local, exports = ?self.shared.export_names(), "nbd server listening");
        Ok(ServerHandle {
            shared: self.shared,
            local,
            acceptor: Mutex::new(Some(acceptor)),
        })
    }
}

fn add_export(shared: &Shared, name: String, dev: Arc<dyn BlockDevice>) {
    let export = Arc::new(Export {
        dev,
        counters: Counters::default(),
    });
    shared
        .exports
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name, export);
}

/// A running server. Dropping it shuts the server down.
pub struct ServerHandle {
    shared: Arc<Shared>,
    local: NbdAddr,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local", &self.local)
            .finish()
    }
}

impl ServerHandle {
    /// The bound address (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> NbdAddr {
        self.local.clone()
    }

    /// An `nbd://` or `nbd+unix://` URI for `export` on this server.
    pub fn uri(&self, export: &str) -> String {
        crate::NbdUri {
            addr: self.local.clone(),
            export: export.to_owned(),
        }
        .to_string()
    }

    /// Adds (or replaces) export `name`; new connections see it at once.
    pub fn add_export(&self, name: impl Into<String>, dev: Arc<dyn BlockDevice>) {
        add_export(&self.shared, name.into(), dev);
    }

    /// Removes export `name` for new connections; open connections keep it.
    /// Returns whether it existed.
    pub fn remove_export(&self, name: &str) -> bool {
        self.shared
            .exports
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .is_some()
    }

    /// Names of the exports, sorted.
    pub fn exports(&self) -> Vec<String> {
        self.shared.export_names()
    }

    /// Counters of export `name`.
    pub fn stats(&self, name: &str) -> Option<ExportStats> {
        self.shared.export(name).map(|e| e.counters.snapshot())
    }

    /// Counters of every export.
    pub fn all_stats(&self) -> BTreeMap<String, ExportStats> {
        let exports = self
            .shared
            .exports
            .read()
            .unwrap_or_else(|e| e.into_inner());
        exports
            .iter()
            .map(|(n, e)| (n.clone(), e.counters.snapshot()))
            .collect()
    }

    /// Number of open connections (negotiating or transmitting).
    pub fn connections(&self) -> usize {
        *self.shared.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until [`ServerHandle::shutdown`] has completed (from another thread).
    pub fn wait(&self) {
        let mut stopped = self
            .shared
            .stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while !*stopped {
            stopped = self
                .shared
                .stopped_cv
                .wait(stopped)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops accepting, closes every connection and waits (up to 5 s) for their
    /// threads. Idempotent.
    pub fn shutdown(&self) {
        if self.shared.shutting_down.swap(true, Ordering::SeqCst) {
            self.wait();
            return;
        }
        // Wake the acceptor blocked in accept(): it sees the flag and returns.
        let woke = match &self.local {
            NbdAddr::Tcp(sa) => {
                let ip = match sa.ip() {
                    IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                    ip => ip,
                };
                TcpStream::connect_timeout(&SocketAddr::new(ip, sa.port()), Duration::from_secs(1))
                    .is_ok()
            }
            NbdAddr::Unix(path) => UnixStream::connect(path).is_ok(),
        };
        let acceptor = self
            .acceptor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(acceptor) = acceptor {
            if woke {
                let _ = acceptor.join();
            }
        }
        for s in self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            s.shutdown();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut active = self.shared.active.lock().unwrap_or_else(|e| e.into_inner());
        while *active > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    connections = *active,
                    "nbd connections still busy after shutdown"
                );
                break;
            }
            active = self
                .shared
                .active_cv
                .wait_timeout(active, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(active);
        if let NbdAddr::Unix(path) = &self.local {
            let _ = std::fs::remove_file(path);
        }
        *self
            .shared
            .stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.stopped_cv.notify_all();
        tracing::info!(addr = %self.local, "nbd server stopped");
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}
