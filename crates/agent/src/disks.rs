//! This host's disk stack: one NBD server, and per VM a block cache in front of the
//! VM's origin image.
//!
//! Exports, per VM id `ID`: `ID` — the VM's disk through this host's cache (what QEMU
//! attaches to), and `peer-ID` — the cache itself, read-only, serving only blocks it
//! holds (what a migration destination pulls from).
//!
//! The NBD server runs inside the agent on purpose: when the agent dies, the host's
//! cache service dies with it, which is the crash the cache must survive. The server
//! binds the same TCP port after a restart (remembered in `nbd.port`), so QEMU
//! (`reconnect-delay`) and migration peers (`ReconnectingClient`) find it again.
//!
//! The origin is the VM's image in a directory every host sees (`--origin-dir`, a
//! shared filesystem standing in for a SAN), optionally throttled to model a remote
//! array's bandwidth and latency.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cache::{BlockCache, BlockOrigin, BlockSize, CacheConfig, FileOrigin, PeerExport, Throttle};
use model::VmId;
use nbd::{NbdAddr, ServeConfig, ServerHandle};

/// Settings of the disk stack.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// Directory holding every VM's origin image (shared between hosts).
    pub origin_dir: PathBuf,
    /// Origin bandwidth limit in bytes/s (0: none).
    pub origin_rate: u64,
    /// Origin latency per request.
    pub origin_latency: std::time::Duration,
    /// Most blocks a VM's cache holds.
    pub max_cache_blocks: u64,
}

/// Errors of the disk stack.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The NBD server could not start.
    #[error("cannot start the NBD server on {addr}")]
    Serve {
        /// Where.
        addr: String,
        /// Why.
        #[source]
        err: nbd::NbdError,
    },
    /// A file could not be prepared.
    #[error("cannot prepare {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        err: std::io::Error,
    },
    /// The origin image could not be created from the template.
    #[error("cannot create the origin image")]
    Template(#[from] compute::DiskError),
    /// The origin could not be opened.
    #[error("cannot open the origin")]
    Origin(#[from] cache::SourceError),
    /// The cache could not be opened.
    #[error("cannot open the block cache")]
    Cache(#[from] cache::CacheOpenError),
}

/// The host's NBD server and settings.
#[derive(Debug)]
pub struct DiskStack {
    cfg: DiskConfig,
    server: ServerHandle,
    addr: SocketAddr,
    /// The peer exports again, on the data network with TLS required, for
    /// migrations to other machines (present on a joined agent with an uplink).
    peers: Option<(ServerHandle, SocketAddr)>,
    /// Per VM, the recorder slot its guest export writes through (`vinfra vm trace`).
    traces: std::sync::Mutex<std::collections::HashMap<VmId, Arc<TraceSlot>>>,
}

/// Where a VM's guest export records its requests while a trace is on: checked with one
/// atomic load per request when off.
#[derive(Debug, Default)]
pub struct TraceSlot {
    on: std::sync::atomic::AtomicBool,
    rec: std::sync::Mutex<Option<cache::trace::MsrRecorder>>,
}

impl TraceSlot {
    fn record(&self, op: cache::trace::Op, offset: u64, len: usize, at: std::time::Instant) {
        if !self.on.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let took = at.elapsed();
        let mut g = self
            .rec
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(r) = g.as_mut() {
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            if let Err(e) = r.record(op, offset, len, at, took) {
                // A full disk must not fail the guest's I/O: the trace stops instead.
                tracing::warn!(error = %e, "trace recording failed; stopped");
                *g = None;
                self.on.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// A VM's guest export: its cache, with the requests recorded while a trace is on.
struct TracedDisk {
    cache: Arc<BlockCache>,
    slot: Arc<TraceSlot>,
}

impl nbd::BlockDevice for TracedDisk {
    fn size(&self) -> u64 {
        nbd::BlockDevice::size(self.cache.as_ref())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let at = std::time::Instant::now();
        let r = self.cache.read_at(buf, offset);
        self.slot
            .record(cache::trace::Op::Read, offset, buf.len(), at);
        r
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        let at = std::time::Instant::now();
        let r = self.cache.write_at(data, offset, fua);
        self.slot
            .record(cache::trace::Op::Write, offset, data.len(), at);
        r
    }

    fn flush(&self) -> std::io::Result<()> {
        nbd::BlockDevice::flush(self.cache.as_ref())
    }

    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.cache.trim(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        let at = std::time::Instant::now();
        let r = self.cache.write_zeroes(offset, len, fua);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        self.slot.record(cache::trace::Op::Write, offset, len, at);
        r
    }
}

/// Where peer exports are served beyond loopback, and the TLS they require.
#[derive(Debug, Clone)]
pub struct PeerListen {
    /// The data-network address (port 0: any).
    pub ip: std::net::IpAddr,
    /// The agent's certificate; clients must present one from the cluster CA.
    pub tls: Arc<rustls::ServerConfig>,
}

/// The guest export of VM `id`.
pub fn guest_export(id: VmId) -> String {
    id.to_string()
}

/// The peer export of VM `id`.
pub fn peer_export(id: VmId) -> String {
    format!("peer-{id}")
}

impl DiskStack {
    /// Starts the NBD server on 127.0.0.1, on the port used last time if there was one,
    /// and, with `peer`, a second one on the data network for other machines.
    pub fn start(
        data_dir: &Path,
        cfg: DiskConfig,
        peer: Option<PeerListen>,
    ) -> Result<Self, DiskError> {
        let port_file = data_dir.join("nbd.port");
        let old_port = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|s| s.trim().parse::<u16>().ok());
        let bind = |port: u16| {
            let mut sc =
                ServeConfig::new(NbdAddr::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, port))));
            // A miss may wait on a peer or the origin: let hits on the same
            // connection overtake it.
            sc.threads_per_connection = 4;
            nbd::serve(sc)
        };
        let server = match old_port.map(bind) {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                // The old port is taken by someone else: a new port still serves new
                // clients; old ones will not find us (logged, not fatal).
                tracing::warn!(port = old_port, error = %e, "cannot rebind the previous NBD port");
                bind(0).map_err(|err| DiskError::Serve {
                    addr: "127.0.0.1:0".into(),
                    err,
                })?
            }
            None => bind(0).map_err(|err| DiskError::Serve {
                addr: "127.0.0.1:0".into(),
                err,
            })?,
        };
        let addr = match server.local_addr() {
            NbdAddr::Tcp(a) => a,
            NbdAddr::Unix(_) => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        };
        std::fs::write(&port_file, addr.port().to_string()).map_err(|err| DiskError::Io {
            path: port_file.clone(),
            err,
        })?;
        std::fs::create_dir_all(&cfg.origin_dir).map_err(|err| DiskError::Io {
            path: cfg.origin_dir.clone(),
            err,
        })?;
        tracing::info!(%addr, "nbd server listening");
        let peers = match peer {
            Some(p) => {
                let mut sc = ServeConfig::new(NbdAddr::Tcp(SocketAddr::new(p.ip, 0)));
                sc.tls = Some(p.tls);
                sc.tls_required = true;
                let h = nbd::serve(sc).map_err(|err| DiskError::Serve {
                    addr: format!("{}:0", p.ip),
                    err,
                })?;
                let a = match h.local_addr() {
                    NbdAddr::Tcp(a) => a,
                    NbdAddr::Unix(_) => SocketAddr::new(p.ip, 0),
                };
                tracing::info!(addr = %a, "nbd peer exports listening (TLS required)");
                Some((h, a))
            }
            None => None,
        };
        Ok(Self {
            cfg,
            server,
            addr,
            peers,
            traces: std::sync::Mutex::default(),
        })
    }

    /// Where other hosts fetch peer exports: the data-network listener when there is
    /// one, else loopback (hosts of one machine).
    pub fn peer_addr(&self) -> SocketAddr {
        self.peers.as_ref().map_or(self.addr, |(_, a)| *a)
    }

    /// Where the NBD server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The VM's origin image path.
    pub fn origin_path(&self, id: VmId) -> PathBuf {
        self.cfg.origin_dir.join(format!("{id}.img"))
    }

    /// Creates the VM's origin image from `template` (or empty, `size_mib`) if missing.
    pub async fn ensure_origin(
        &self,
        id: VmId,
        template: Option<&Path>,
        size_mib: u64,
    ) -> Result<PathBuf, DiskError> {
        let path = self.origin_path(id);
        if path.exists() {
            return Ok(path);
        }
        match template {
            Some(t) => {
                compute::prepare_vm_disk(t, &path).await?;
            }
            None => {
                let f = std::fs::File::create(&path).map_err(|err| DiskError::Io {
                    path: path.clone(),
                    err,
                })?;
                f.set_len(size_mib.max(1) << 20)
                    .map_err(|err| DiskError::Io {
                        path: path.clone(),
                        err,
                    })?;
            }
        }
        Ok(path)
    }

    /// Opens (or reopens after a crash, verifying every block) the VM's cache in
    /// `cache_dir` in front of its origin. Blocking: call from `spawn_blocking`.
    pub fn open_cache(&self, id: VmId, cache_dir: &Path) -> Result<Arc<BlockCache>, DiskError> {
        let origin_path = self.origin_path(id);
        let throttle = (self.cfg.origin_rate > 0 || !self.cfg.origin_latency.is_zero())
            .then(|| Throttle::new(self.cfg.origin_rate, self.cfg.origin_latency));
        let origin = FileOrigin::open(&origin_path, BlockSize::DEFAULT, throttle)?;
        let disk_size = std::fs::metadata(&origin_path)
            .map_err(|err| DiskError::Io {
                path: origin_path.clone(),
                err,
            })?
            .len();
        let blocks = BlockSize::DEFAULT.blocks_for(disk_size).max(1);
        let cfg = CacheConfig::new(cache_dir, blocks.min(self.cfg.max_cache_blocks));
        let origin: Arc<dyn BlockOrigin> = Arc::new(origin);
        let (cache, report) = BlockCache::open(cfg, origin)?;
        if report.dropped_checksum + report.dropped_generation + report.dropped_invalid > 0
            || report.journal_torn
        {
            tracing::warn!(vm = %id, ?report, "cache reopened after a crash: bad blocks dropped");
        } else {
            tracing::info!(vm = %id, verified = report.verified, "cache opened");
        }
        Ok(Arc::new(cache))
    }

    /// Exports the VM's disk (through `cache`, and its trace slot) and the cache
    /// itself for peers.
    pub fn export(&self, id: VmId, cache: &Arc<BlockCache>) {
        let disk = TracedDisk {
            cache: cache.clone(),
            slot: self.trace_slot(id),
        };
        self.server.add_export(guest_export(id), Arc::new(disk));
        self.export_peer(id, cache);
    }

    fn trace_slot(&self, id: VmId) -> Arc<TraceSlot> {
        let mut t = self
            .traces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        t.entry(id).or_default().clone()
    }

    /// Whether the VM's guest export is recording.
    pub fn tracing(&self, id: VmId) -> bool {
        self.trace_slot(id)
            .on
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts recording the VM's guest requests into `path` (MSR Cambridge CSV).
    pub fn start_trace(&self, id: VmId, path: &Path, host: &str) -> std::io::Result<()> {
        let slot = self.trace_slot(id);
        let rec = cache::trace::MsrRecorder::create(path, host)?;
        *slot
            .rec
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(rec);
        slot.on.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Stops recording; returns the file and its request count (`None` if it was not
    /// recording).
    pub fn stop_trace(&self, id: VmId) -> std::io::Result<Option<(PathBuf, u64)>> {
        let slot = self.trace_slot(id);
        slot.on.store(false, std::sync::atomic::Ordering::Relaxed);
        let rec = slot
            .rec
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        rec.map(cache::trace::MsrRecorder::finish).transpose()
    }

    /// Exports only the cache for peers (a migration source after switch-over).
    pub fn export_peer(&self, id: VmId, cache: &Arc<BlockCache>) {
        let export = Arc::new(PeerExport(cache.clone()));
        if let Some((p, _)) = &self.peers {
            p.add_export(peer_export(id), export.clone());
        }
        self.server.add_export(peer_export(id), export);
    }

    /// Removes the guest export (QEMU is gone) but keeps serving peers.
    pub fn unexport_guest(&self, id: VmId) {
        self.server.remove_export(&guest_export(id));
    }

    /// Removes both exports.
    pub fn unexport(&self, id: VmId) {
        self.server.remove_export(&guest_export(id));
        self.server.remove_export(&peer_export(id));
        if let Some((p, _)) = &self.peers {
            p.remove_export(&peer_export(id));
        }
    }

    /// Removes the VM's origin image (the VM is deleted), and its trace slot.
    pub fn remove_origin(&self, id: VmId) {
        self.traces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
        let p = self.origin_path(id);
        if let Err(e) = std::fs::remove_file(&p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove origin image");
            }
        }
    }
}
