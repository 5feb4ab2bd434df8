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
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::proto::{self, *};
use crate::stream::Stream;
use crate::{BlockDevice, NbdAddr, NbdError};

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

/// Counters of one export since it was added, over all its connections.
/// Request counts include failed requests; `errors` counts error replies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// `NBD_CMD_READ` requests.
    pub reads: u64,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// `NBD_CMD_WRITE` requests.
    pub writes: u64,
    /// Bytes stored by successful writes.
    pub bytes_written: u64,
    /// `NBD_CMD_FLUSH` requests.
    pub flushes: u64,
    /// `NBD_CMD_TRIM` requests.
    pub trims: u64,
    /// `NBD_CMD_WRITE_ZEROES` requests.
    pub write_zeroes: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Connections that reached transmission on this export.
    pub connections_total: u64,
    /// Connections currently in transmission on this export.
    pub connections_active: u64,
}

#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    bytes_read: AtomicU64,
    writes: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    write_zeroes: AtomicU64,
    errors: AtomicU64,
    connections_total: AtomicU64,
    connections_active: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ExportStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExportStats {
            reads: g(&self.reads),
            bytes_read: g(&self.bytes_read),
            writes: g(&self.writes),
            bytes_written: g(&self.bytes_written),
            flushes: g(&self.flushes),
            trims: g(&self.trims),
            write_zeroes: g(&self.write_zeroes),
            errors: g(&self.errors),
            connections_total: g(&self.connections_total),
            connections_active: g(&self.connections_active),
        }
    }
}

/// Per-connection counts, added to the shared atomics once per batch (at each
/// output flush) rather than once per request.
#[derive(Default)]
struct LocalStats {
    reads: u64,
    bytes_read: u64,
    writes: u64,
    bytes_written: u64,
    flushes: u64,
    trims: u64,
    write_zeroes: u64,
    errors: u64,
}

impl LocalStats {
    fn publish(&mut self, c: &Counters) {
        let add = |a: &AtomicU64, v: &mut u64| {
            if *v != 0 {
                a.fetch_add(*v, Ordering::Relaxed);
                *v = 0;
            }
        };
        add(&c.reads, &mut self.reads);
        add(&c.bytes_read, &mut self.bytes_read);
        add(&c.writes, &mut self.writes);
        add(&c.bytes_written, &mut self.bytes_written);
        add(&c.flushes, &mut self.flushes);
        add(&c.trims, &mut self.trims);
        add(&c.write_zeroes, &mut self.write_zeroes);
        add(&c.errors, &mut self.errors);
    }
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

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }
}

fn accept_loop(shared: Arc<Shared>, listener: Listener) {
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                if shared.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "nbd accept failed");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        {
            let mut active = shared.active.lock().unwrap_or_else(|e| e.into_inner());
            if *active >= shared.max_connections {
                tracing::warn!(
                    max = shared.max_connections,
                    "nbd connection limit reached; closing new connection"
                );
                continue;
            }
            *active += 1;
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            shared
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, clone);
        }
        let conn_shared = shared.clone();
        let spawned = thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .stack_size(512 << 10)
            .spawn(move || run_connection(conn_shared, stream, id));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start nbd connection thread");
            drop(ConnGuard {
                shared: &shared,
                id,
            });
        }
    }
}

/// Unregisters a connection when its thread ends, even by panic.
struct ConnGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        let mut active = self.shared.active.lock().unwrap_or_else(|e| e.into_inner());
        *active = active.saturating_sub(1);
        self.shared.active_cv.notify_all();
    }
}

/// Why a connection ended early. Internal: logged, never returned to a caller.
#[derive(Debug)]
enum ConnError {
    Io(io::Error),
    Proto(ProtoError),
    Policy(&'static str),
}

impl From<io::Error> for ConnError {
    fn from(e: io::Error) -> Self {
        ConnError::Io(e)
    }
}

impl From<ProtoError> for ConnError {
    fn from(e: ProtoError) -> Self {
        ConnError::Proto(e)
    }
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Io(e) => write!(f, "i/o: {e}"),
            ConnError::Proto(e) => write!(f, "protocol: {e}"),
            ConnError::Policy(m) => f.write_str(m),
        }
    }
}

fn run_connection(shared: Arc<Shared>, mut stream: Stream, id: u64) {
    let _guard = ConnGuard {
        shared: &shared,
        id,
    };
    let peer = stream.peer();
    stream.set_nodelay();
    let deadline = Instant::now() + shared.handshake_timeout;
    match negotiate(&shared, &mut stream, deadline) {
        Ok(Some(neg)) => {
            let c = &neg.export.counters;
            c.connections_total.fetch_add(1, Ordering::Relaxed);
            c.connections_active.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, name = %neg.name, structured = neg.structured, "nbd transmission started");
            let r = Transmission::new(&shared, &neg).run(&mut stream);
            c.connections_active.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(()) => tracing::debug!(%peer, "nbd connection closed"),
                Err(e) => tracing::debug!(%peer, error = %e, "nbd connection ended"),
            }
        }
        Ok(None) => tracing::debug!(%peer, "nbd client ended negotiation"),
        Err(e) => tracing::debug!(%peer, error = %e, "nbd negotiation failed"),
    }
    stream.shutdown();
}

struct Negotiated {
    name: String,
    export: Arc<Export>,
    size: u64,
    flags: u16,
    structured: bool,
}

fn transmission_flags(dev: &dyn BlockDevice, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN;
    if dev.read_only() {
        flags |= FLAG_READ_ONLY;
    }
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

fn push_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    encode_option_reply(out, option, reply, data);
}

/// Fixed newstyle negotiation. `Ok(None)`: the client aborted cleanly.
fn negotiate(
    shared: &Shared,
    s: &mut Stream,
    deadline: Instant,
) -> Result<Option<Negotiated>, ConnError> {
    use std::io::Write;
    s.set_write_timeout(Some(shared.handshake_timeout))?;
    s.write_all(&encode_handshake(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))?;
    let mut cf = [0u8; 4];
    s.read_exact_by(&mut cf, deadline)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::Policy("unknown client flags"));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut data = Vec::new();
    let mut out = Vec::with_capacity(512);
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; OPTION_HEADER_LEN];
        s.read_exact_by(&mut h, deadline)?;
        let hdr = OptionHeader::parse(&h)?;
        out.clear();
        if hdr.length > MAX_OPTION_LEN {
            if hdr.option != OPT_EXPORT_NAME {
                push_reply(
                    &mut out,
                    hdr.option,
                    REP_ERR_TOO_BIG,
                    b"option data too long",
                );
                let _ = s.write_all(&out);
            }
            return Err(ConnError::Policy("option data too long"));
        }
        data.resize(len_usize(hdr.length), 0);
        s.read_exact_by(&mut data, deadline)?;
        if hdr.option == OPT_STARTTLS {
            match (&shared.tls, s.is_tls()) {
                (Some(cfg), false) if data.is_empty() => {
                    push_reply(&mut out, hdr.option, REP_ACK, &[]);
                    s.write_all(&out)?;
                    // Everything after this ACK, option haggling included, is inside TLS.
                    s.start_tls_server(cfg.clone(), deadline)?;
                }
                (Some(_), false) => {
                    push_reply(
                        &mut out,
                        hdr.option,
                        REP_ERR_INVALID,
                        b"STARTTLS takes no data",
                    );
                    s.write_all(&out)?;
                }
                (Some(_), true) => {
                    push_reply(&mut out, hdr.option, REP_ERR_INVALID, b"TLS is already on");
                    s.write_all(&out)?;
                }
                (None, _) => {
                    push_reply(
                        &mut out,
                        hdr.option,
                        REP_ERR_UNSUP,
                        b"this server has no TLS",
                    );
                    s.write_all(&out)?;
                }
            }
            continue;
        }
        if shared.tls_required && !s.is_tls() && hdr.option != OPT_ABORT {
            if hdr.option == OPT_EXPORT_NAME {
                // No reply is possible to EXPORT_NAME: end the connection.
                return Err(ConnError::Policy("TLS required"));
            }
            push_reply(
                &mut out,
                hdr.option,
                REP_ERR_TLS_REQD,
                b"TLS required (NBD_OPT_STARTTLS)",
            );
            s.write_all(&out)?;
            continue;
        }
        let opt = match ClientOption::parse(hdr.option, &data) {
            Ok(o) => o,
            Err(e) if hdr.option == OPT_EXPORT_NAME => return Err(e.into()),
            Err(e) => {
                push_reply(
                    &mut out,
                    hdr.option,
                    REP_ERR_INVALID,
                    e.to_string().as_bytes(),
                );
                s.write_all(&out)?;
                continue;
            }
        };
        let shutting_down = shared.shutting_down.load(Ordering::SeqCst);
        match opt {
            ClientOption::Abort => {
                push_reply(&mut out, hdr.option, REP_ACK, &[]);
                let _ = s.write_all(&out);
                return Ok(None);
            }
            ClientOption::ExportName(name) => {
                if shutting_down {
                    return Err(ConnError::Policy("shutting down"));
                }
                let export = shared
                    .export(&name)
                    .ok_or(ConnError::Policy("unknown export"))?;
                let size = export.dev.size();
                let flags = transmission_flags(&*export.dev, structured);
                encode_export_name_reply(&mut out, size, flags, no_zeroes);
                s.write_all(&out)?;
                return Ok(Some(Negotiated {
                    name,
                    export,
                    size,
                    flags,
                    structured,
                }));
            }
            _ if shutting_down => {
                push_reply(
                    &mut out,
                    hdr.option,
                    REP_ERR_SHUTDOWN,
                    b"server shutting down",
                );
            }
            ClientOption::List => {
                for name in shared.export_names() {
                    push_reply(&mut out, hdr.option, REP_SERVER, &encode_rep_server(&name));
                }
                push_reply(&mut out, hdr.option, REP_ACK, &[]);
            }
            ClientOption::StructuredReply => {
                if shared.structured_replies {
                    structured = true;
                    push_reply(&mut out, hdr.option, REP_ACK, &[]);
                } else {
                    push_reply(&mut out, hdr.option, REP_ERR_UNSUP, &[]);
                }
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let Some(export) = shared.export(&req.name) else {
                    let msg = format!("export {:?} not found", req.name);
                    push_reply(&mut out, hdr.option, REP_ERR_UNKNOWN, msg.as_bytes());
                    s.write_all(&out)?;
                    continue;
                };
                let size = export.dev.size();
                let flags = transmission_flags(&*export.dev, structured);
                push_reply(
                    &mut out,
                    hdr.option,
                    REP_INFO,
                    &encode_info_export(size, flags),
                );
                // Sent unasked too (allowed): these are the defaults, nothing to enforce.
                push_reply(
                    &mut out,
                    hdr.option,
                    REP_INFO,
                    &encode_info_block_size(1, PREFERRED_BLOCK, MAX_REQUEST_LEN),
                );
                if req.requests.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(req.name.as_bytes());
                    push_reply(&mut out, hdr.option, REP_INFO, &d);
                }
                push_reply(&mut out, hdr.option, REP_ACK, &[]);
                if hdr.option == OPT_GO {
                    s.write_all(&out)?;
                    return Ok(Some(Negotiated {
                        name: req.name,
                        export,
                        size,
                        flags,
                        structured,
                    }));
                }
            }
            ClientOption::Unsupported(o) => {
                let msg = format!("{} ({o}) not supported", proto::option_name(o));
                push_reply(&mut out, o, REP_ERR_UNSUP, msg.as_bytes());
            }
        }
        s.write_all(&out)?;
    }
    Err(ConnError::Policy("too many options"))
}

/// Buffered input: request headers and small write payloads.
struct InBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl InBuf {
    fn new() -> InBuf {
        InBuf {
            buf: vec![0; INBUF_LEN],
            start: 0,
            end: 0,
        }
    }

    fn avail(&self) -> usize {
        self.end - self.start
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n.min(self.avail());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads until at least `n` (≤ buffer size) bytes are buffered. Returns
    /// `Ok(false)` on a clean EOF at a message boundary. `idle_ok`: a read timeout
    /// with nothing buffered just means an idle client.
    fn fill(
        &mut self,
        s: &mut Stream,
        n: usize,
        idle_ok: bool,
        shared: &Shared,
    ) -> Result<bool, ConnError> {
        if self.buf.len() - self.start < n {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.avail() < n {
            match s.read(&mut self.buf[self.end..]) {
                Ok(0) if self.avail() == 0 && idle_ok => return Ok(false),
                Ok(0) => return Err(ConnError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(k) => self.end += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) && self.avail() == 0
                        && idle_ok =>
                {
                    if shared.shutting_down.load(Ordering::SeqCst) {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }
}

/// Reply bytes waiting to be written. `buf` only grows (up to a cap), so the
/// zero-fill of `Vec::resize` is paid once, not per read reply.
struct OutBuf {
    buf: Vec<u8>,
    len: usize,
}

impl OutBuf {
    fn new() -> OutBuf {
        OutBuf {
            buf: Vec::new(),
            len: 0,
        }
    }

    fn reserve(&mut self, n: usize) -> &mut [u8] {
        let end = self.len + n;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        &mut self.buf[self.len..end]
    }

    fn commit(&mut self, n: usize) {
        self.len += n;
    }

    fn push(&mut self, b: &[u8]) {
        self.reserve(b.len()).copy_from_slice(b);
        self.commit(b.len());
    }

    fn flush(&mut self, s: &mut Stream) -> io::Result<()> {
        use std::io::Write;
        if self.len > 0 {
            s.write_all(&self.buf[..self.len])?;
            self.len = 0;
        }
        if self.buf.len() > SHRINK_ABOVE {
            // After a large read: give back the memory.
            self.buf = Vec::new();
        }
        Ok(())
    }
}

/// Executes requests against one export; shared by the inline loop and the
/// worker threads of the pooled mode.
struct Handler<'a> {
    dev: &'a dyn BlockDevice,
    counters: &'a Counters,
    size: u64,
    read_only: bool,
    structured: bool,
}

impl<'a> Handler<'a> {
    fn new(neg: &'a Negotiated) -> Handler<'a> {
        Handler {
            dev: &*neg.export.dev,
            counters: &neg.export.counters,
            size: neg.size,
            read_only: neg.flags & FLAG_READ_ONLY != 0,
            structured: neg.structured,
        }
    }

    /// Runs `req` (any command but `DISC` and unknown ones) and appends its reply
    /// to `out`. `payload`: the data of a write (already received in full).
    fn execute(&self, req: &Request, payload: &[u8], out: &mut OutBuf, stats: &mut LocalStats) {
        let r = match req.command {
            Command::Read => return self.read(req, out, stats),
            Command::Write => {
                stats.writes += 1;
                let r = self.write(req, payload);
                if r.is_ok() {
                    stats.bytes_written += u64::from(req.length);
                }
                r
            }
            Command::Flush => {
                stats.flushes += 1;
                self.check_flags(req, CMD_FLAG_FUA)
                    .and_then(|()| dev_result(self.dev.flush()))
            }
            Command::Trim => {
                stats.trims += 1;
                self.trim(req)
            }
            Command::WriteZeroes => {
                stats.write_zeroes += 1;
                self.write_zeroes(req)
            }
            Command::Cache | Command::BlockStatus | Command::Disc | Command::Unknown(_) => {
                Err(ErrorCode::Inval)
            }
        };
        push_simple_reply(out, stats, req.handle, r);
    }

    fn check_flags(&self, req: &Request, allowed: u16) -> Result<(), ErrorCode> {
        if req.flags & !allowed != 0 {
            Err(ErrorCode::Inval)
        } else {
            Ok(())
        }
    }

    fn check_writable(&self) -> Result<(), ErrorCode> {
        if self.read_only {
            Err(ErrorCode::Perm)
        } else {
            Ok(())
        }
    }

    /// `beyond`: the error for a range past the end (ENOSPC for writes).
    fn check_range(&self, req: &Request, beyond: ErrorCode) -> Result<(), ErrorCode> {
        match req.end() {
            None => Err(ErrorCode::Inval),
            Some(end) if end > self.size => Err(beyond),
            Some(_) => Ok(()),
        }
    }

    fn write(&self, req: &Request, data: &[u8]) -> Result<(), ErrorCode> {
        self.check_flags(req, CMD_FLAG_FUA)?;
        if req.length == 0 {
            return Err(ErrorCode::Inval);
        }
        self.check_writable()?;
        self.check_range(req, ErrorCode::NoSpc)?;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        dev_result(self.dev.write_at(data, req.offset, fua))
    }

    fn trim(&self, req: &Request) -> Result<(), ErrorCode> {
        self.check_flags(req, CMD_FLAG_FUA)?;
        self.check_writable()?;
        self.check_range(req, ErrorCode::Inval)?;
        dev_result(self.dev.trim(req.offset, u64::from(req.length)))?;
        if req.flags & CMD_FLAG_FUA != 0 {
            dev_result(self.dev.flush())?;
        }
        Ok(())
    }

    fn write_zeroes(&self, req: &Request) -> Result<(), ErrorCode> {
        self.check_flags(req, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE)?;
        self.check_writable()?;
        self.check_range(req, ErrorCode::NoSpc)?;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        dev_result(
            self.dev
                .write_zeroes(req.offset, u64::from(req.length), fua),
        )
    }

    fn read(&self, req: &Request, out: &mut OutBuf, stats: &mut LocalStats) {
        stats.reads += 1;
        match self.read_into(req, out) {
            Ok(()) => stats.bytes_read += u64::from(req.length),
            Err(code) => {
                if self.structured {
                    stats.errors += 1;
                    let mut v = Vec::with_capacity(64);
                    encode_structured_error(&mut v, req.handle, code.to_wire(), "read failed");
                    out.push(&v);
                } else {
                    push_simple_reply(out, stats, req.handle, Err(code));
                }
            }
        }
    }

    /// Reads straight into the output buffer, behind the reply header.
    fn read_into(&self, req: &Request, out: &mut OutBuf) -> Result<(), ErrorCode> {
        let allowed = if self.structured {
            CMD_FLAG_FUA | CMD_FLAG_DF
        } else {
            CMD_FLAG_FUA
        };
        self.check_flags(req, allowed)?;
        if req.length == 0 || req.length > MAX_REQUEST_LEN {
            return Err(ErrorCode::Inval);
        }
        self.check_range(req, ErrorCode::Inval)?;
        let len = len_usize(req.length);
        let hdr_len = if self.structured {
            STRUCTURED_REPLY_LEN + 8
        } else {
            SIMPLE_REPLY_LEN
        };
        let region = out.reserve(hdr_len + len);
        let (hdr, data) = region.split_at_mut(hdr_len);
        dev_result(self.dev.read_at(data, req.offset))?;
        if self.structured {
            let chunk = StructuredReply {
                flags: REPLY_FLAG_DONE,
                reply_type: REPLY_TYPE_OFFSET_DATA,
                handle: req.handle,
                length: 8 + req.length,
            };
            encode_structured_reply_into(hdr, &chunk);
            hdr[STRUCTURED_REPLY_LEN..].copy_from_slice(&req.offset.to_be_bytes());
        } else {
            encode_simple_reply_into(hdr, 0, req.handle);
        }
        out.commit(hdr_len + len);
        Ok(())
    }
}

fn push_simple_reply(
    out: &mut OutBuf,
    stats: &mut LocalStats,
    handle: u64,
    r: Result<(), ErrorCode>,
) {
    let error = match r {
        Ok(()) => 0,
        Err(code) => {
            stats.errors += 1;
            code.to_wire()
        }
    };
    let hdr = out.reserve(SIMPLE_REPLY_LEN);
    encode_simple_reply_into(hdr, error, handle);
    out.commit(SIMPLE_REPLY_LEN);
}

/// Reads the next request header. `Ok(None)`: clean end (EOF between requests,
/// or shutdown while idle). `before_block` runs before any blocking read.
fn next_request(
    s: &mut Stream,
    inb: &mut InBuf,
    shared: &Shared,
    before_block: &mut dyn FnMut(&mut Stream) -> io::Result<()>,
) -> Result<Option<Request>, ConnError> {
    if inb.avail() < REQUEST_LEN {
        before_block(s)?;
        if !inb.fill(s, REQUEST_LEN, true, shared)? {
            return Ok(None);
        }
    }
    let req = Request::parse(inb.data())?;
    inb.consume(REQUEST_LEN);
    Ok(Some(req))
}

/// What to do with a header before executing it.
enum Next {
    Execute,
    /// `NBD_CMD_DISC`: end cleanly.
    Stop,
    /// Reply with an error, then close: the stream cannot be trusted further.
    Abort(ErrorCode, &'static str),
}

fn classify(req: &Request) -> Next {
    match req.command {
        Command::Disc => Next::Stop,
        Command::Unknown(_) => Next::Abort(ErrorCode::Inval, "unknown command"),
        Command::Write if req.length > MAX_REQUEST_LEN => {
            Next::Abort(ErrorCode::Inval, "write payload over the request limit")
        }
        _ => Next::Execute,
    }
}

/// The transmission phase of one connection.
struct Transmission<'a> {
    shared: &'a Shared,
    neg: &'a Negotiated,
}

impl<'a> Transmission<'a> {
    fn new(shared: &'a Shared, neg: &'a Negotiated) -> Transmission<'a> {
        Transmission { shared, neg }
    }

    fn run(self, s: &mut Stream) -> Result<(), ConnError> {
        s.set_read_timeout(Some(self.shared.io_timeout))?;
        s.set_write_timeout(Some(self.shared.io_timeout))?;
        if s.is_tls() {
            // A TLS session cannot be split between a reader and writer threads.
            self.run_inline(s, &mut Direct)
        } else if self.shared.threads_per_connection > 1 {
            self.run_pooled(s)
        } else if SPLIT_WRITER {
            self.run_split(s)
        } else {
            self.run_inline(s, &mut Direct)
        }
    }

    /// Execute each request as it is parsed; replies batched in `out` and handed
    /// to `sink` per batch.
    fn run_inline(&self, s: &mut Stream, sink: &mut dyn ReplySink) -> Result<(), ConnError> {
        let h = Handler::new(self.neg);
        let mut inb = InBuf::new();
        let mut out = OutBuf::new();
        let mut stats = LocalStats::default();
        // Write payloads too large for the input buffer. Only grows (see OutBuf).
        let mut payload: Vec<u8> = Vec::new();
        let result = loop {
            let mut flush = |s: &mut Stream| {
                stats.publish(h.counters);
                sink.flush(&mut out, s)
            };
            let req = match next_request(s, &mut inb, self.shared, &mut flush) {
                Ok(Some(req)) => req,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            match classify(&req) {
                Next::Execute => {}
                Next::Stop => break Ok(()),
                Next::Abort(code, why) => {
                    push_simple_reply(&mut out, &mut stats, req.handle, Err(code));
                    break Err(ConnError::Policy(why));
                }
            }
            if req.command != Command::Write {
                h.execute(&req, &[], &mut out, &mut stats);
            } else {
                let len = len_usize(req.length);
                if len <= inb.avail() {
                    h.execute(&req, &inb.data()[..len], &mut out, &mut stats);
                    inb.consume(len);
                } else {
                    // Large payload: take what is buffered, read the rest straight
                    // into `payload`, and don't sit on replies meanwhile.
                    let have = inb.avail();
                    if payload.len() < len {
                        payload.resize(len, 0);
                    }
                    payload[..have].copy_from_slice(inb.data());
                    inb.consume(have);
                    stats.publish(h.counters);
                    if let Err(e) = sink
                        .flush(&mut out, s)
                        .and_then(|()| read_exact_stalling(s, &mut payload[have..len]))
                    {
                        break Err(e.into());
                    }
                    h.execute(&req, &payload[..len], &mut out, &mut stats);
                    if payload.len() > SHRINK_ABOVE {
                        payload = Vec::new();
                    }
                }
            }
            if out.len >= FLUSH_THRESHOLD {
                stats.publish(h.counters);
                if let Err(e) = sink.flush(&mut out, s) {
                    break Err(e.into());
                }
            }
        };
        // Publish counts and send what is buffered, even after an error reply.
        stats.publish(h.counters);
        let _ = sink.flush(&mut out, s);
        result
    }

    /// The connection thread executes requests; a second thread writes the
    /// batches of replies, so that device reads overlap socket writes.
    fn run_split(&self, s: &mut Stream) -> Result<(), ConnError> {
        let writer = s.try_clone()?;
        let failed = AtomicBool::new(false);
        let pending = AtomicUsize::new(0);
        let (full_tx, full_rx) = mpsc::sync_channel::<OutBuf>(REPLY_BUFFERS);
        let (free_tx, free_rx) = mpsc::sync_channel::<OutBuf>(REPLY_BUFFERS);
        for _ in 1..REPLY_BUFFERS {
            let _ = free_tx.send(OutBuf::new());
        }
        thread::scope(|scope| {
            let (failed, pending) = (&failed, &pending);
            thread::Builder::new()
                .name("nbd-reply".into())
                .spawn_scoped(scope, move || {
                    reply_writer(writer, full_rx, free_tx, pending, failed)
                })?;
            let mut pipe = Pipe {
                full: full_tx,
                free: free_rx,
                pending,
                failed,
            };
            let r = self.run_inline(s, &mut pipe);
            drop(pipe); // the writer sends what is queued, then exits
            r
        })
    }

    /// This thread reads requests (and write payloads); `threads_per_connection`
    /// workers execute them concurrently and write each reply under a lock.
    fn run_pooled(&self, s: &mut Stream) -> Result<(), ConnError> {
        let workers = self.shared.threads_per_connection;
        let writer = Mutex::new(s.try_clone()?);
        let (tx, rx) = mpsc::sync_channel::<(Request, Vec<u8>)>(workers * 2);
        let rx = Mutex::new(rx);
        let budget = Budget {
            used: Mutex::new(0),
            cv: Condvar::new(),
        };
        let h = Handler::new(self.neg);
        thread::scope(|scope| {
            for _ in 0..workers {
                thread::Builder::new()
                    .name("nbd-worker".into())
                    .spawn_scoped(scope, || pooled_worker(&h, &rx, &writer, &budget))?;
            }
            let result = self.pooled_reader(s, &tx, &budget, &writer, &h);
            drop(tx); // workers drain the queue and exit
            result
        })
    }

    fn pooled_reader(
        &self,
        s: &mut Stream,
        tx: &mpsc::SyncSender<(Request, Vec<u8>)>,
        budget: &Budget,
        writer: &Mutex<Stream>,
        h: &Handler<'_>,
    ) -> Result<(), ConnError> {
        let mut inb = InBuf::new();
        let mut nothing = |_: &mut Stream| Ok(());
        loop {
            let Some(req) = next_request(s, &mut inb, self.shared, &mut nothing)? else {
                return Ok(());
            };
            match classify(&req) {
                Next::Execute => {}
                Next::Stop => return Ok(()),
                Next::Abort(code, why) => {
                    let mut out = OutBuf::new();
                    let mut stats = LocalStats::default();
                    push_simple_reply(&mut out, &mut stats, req.handle, Err(code));
                    stats.publish(h.counters);
                    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = out.flush(&mut w);
                    return Err(ConnError::Policy(why));
                }
            }
            let mut payload = Vec::new();
            if req.command == Command::Write {
                let len = len_usize(req.length);
                budget.acquire(len);
                payload.resize(len, 0);
                let have = inb.avail().min(len);
                payload[..have].copy_from_slice(&inb.data()[..have]);
                inb.consume(have);
                read_exact_stalling(s, &mut payload[have..])?;
            }
            if tx.send((req, payload)).is_err() {
                return Err(ConnError::Policy("reply writer failed"));
            }
        }
    }
}

/// Where a batch of replies goes.
trait ReplySink {
    /// Sends (or queues) `out` and leaves it empty.
    fn flush(&mut self, out: &mut OutBuf, s: &mut Stream) -> io::Result<()>;
}

/// Written by the connection thread itself.
struct Direct;

impl ReplySink for Direct {
    fn flush(&mut self, out: &mut OutBuf, s: &mut Stream) -> io::Result<()> {
        out.flush(s)
    }
}

/// Whether inline mode hands reply batches to a writer thread.
const SPLIT_WRITER: bool = true;
/// Reply buffers in rotation between a connection thread and its writer.
const REPLY_BUFFERS: usize = 4;

/// Batches smaller than this are written by the connection thread itself when
/// the writer thread is idle: a thread hop costs more than it overlaps.
const HAND_OFF_MIN: usize = 128 << 10;

/// Large batches go to the connection's writer thread; buffers come back for
/// reuse. Small ones are written directly when nothing is queued (`pending` is
/// 0 only once the writer has written everything it was given, so the two
/// threads never write to the socket at the same time).
struct Pipe<'a> {
    full: mpsc::SyncSender<OutBuf>,
    free: mpsc::Receiver<OutBuf>,
    pending: &'a AtomicUsize,
    failed: &'a AtomicBool,
}

impl ReplySink for Pipe<'_> {
    fn flush(&mut self, out: &mut OutBuf, s: &mut Stream) -> io::Result<()> {
        let broken = || io::Error::new(io::ErrorKind::BrokenPipe, "reply writer failed");
        if self.failed.load(Ordering::Acquire) {
            return Err(broken());
        }
        if out.len == 0 {
            return Ok(());
        }
        if out.len < HAND_OFF_MIN && self.pending.load(Ordering::Acquire) == 0 {
            return out.flush(s);
        }
        let next = self.free.recv().map_err(|_| broken())?;
        let batch = std::mem::replace(out, next);
        self.pending.fetch_add(1, Ordering::AcqRel);
        self.full.send(batch).map_err(|_| broken())
    }
}

fn reply_writer(
    mut w: Stream,
    full: mpsc::Receiver<OutBuf>,
    free: mpsc::SyncSender<OutBuf>,
    pending: &AtomicUsize,
    failed: &AtomicBool,
) {
    for mut batch in full {
        if !failed.load(Ordering::Acquire) {
            if let Err(e) = batch.flush(&mut w) {
                tracing::debug!(error = %e, "nbd reply write failed");
                failed.store(true, Ordering::Release);
                // Wake the connection thread if it is blocked reading.
                w.shutdown();
            }
        }
        batch.len = 0;
        pending.fetch_sub(1, Ordering::AcqRel);
        let _ = free.send(batch);
    }
}

/// Bounds the write payload bytes queued for workers on one connection.
struct Budget {
    used: Mutex<usize>,
    cv: Condvar,
}

/// Most write payload bytes a pooled connection holds in memory at once.
const MAX_INFLIGHT_PAYLOAD: usize = 64 << 20;

impl Budget {
    fn acquire(&self, n: usize) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + n > MAX_INFLIGHT_PAYLOAD {
            used = self.cv.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += n;
    }

    fn release(&self, n: usize) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(n);
        self.cv.notify_all();
    }
}

fn pooled_worker(
    h: &Handler<'_>,
    rx: &Mutex<mpsc::Receiver<(Request, Vec<u8>)>>,
    writer: &Mutex<Stream>,
    budget: &Budget,
) {
    let mut out = OutBuf::new();
    let mut stats = LocalStats::default();
    loop {
        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok((req, payload)) = job else { return };
        h.execute(&req, &payload, &mut out, &mut stats);
        budget.release(payload.len());
        drop(payload);
        stats.publish(h.counters);
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = out.flush(&mut w) {
            tracing::debug!(error = %e, "nbd reply write failed");
            // Wake the reader, which then ends the connection.
            w.shutdown();
            out.len = 0;
        }
    }
}

/// `read_exact` where a read timeout (the socket's, `io_timeout`) is fatal.
fn read_exact_stalling(s: &mut Stream, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match s.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Maps a device result to the reply's error value, logging failures.
fn dev_result(r: io::Result<()>) -> Result<(), ErrorCode> {
    r.map_err(|e| {
        let code = ErrorCode::from_io(&e);
        tracing::warn!(error = %e, %code, "nbd export i/o error");
        code
    })
}
