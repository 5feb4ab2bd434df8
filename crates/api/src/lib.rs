//! The control plane's REST API: an axum [`router`] over a [`store::Store`],
//! token auth, tenancy, scheduling of new VMs onto hosts, the agent protocol,
//! an OpenAPI document and Prometheus metrics.
//!
//! Owns: request handling and the store key layout of hosts, images, VMs,
//! tenants and tokens; the in-memory console tails and HTTP counters.
//! Must not depend on: store backends (it holds an `Arc<dyn Store>`), the
//! agent, compute drivers. Wire bodies come from `model::api`.
//!
//! Tasks: [`serve`] spawns one task running the axum server, and starts the control
//! layer's operation driver (which runs its loops only while this server is the elected
//! leader of its store); [`ServerHandle::shutdown`] stops both. Host liveness is computed
//! from the last heartbeat whenever a host is read.
#![warn(missing_docs)]

mod auth;
mod blobs;
mod curves;
mod error;
mod extract;
mod limits;
mod listen;
mod metrics;
mod openapi;
mod pki;
mod routes;
mod session;

use std::collections::HashMap;
use std::future::IntoFuture;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use model::{MigrationId, VmId};
use store::Store;

pub use auth::{bootstrap_admin, hash_token, ADMIN_TOKEN_FILE};
pub use blobs::{BlobConfig, BlobError, BlobFiles, DEFAULT_MAX_BLOB_BYTES};
pub use control::Scope;
pub use curves::ProgressSample;
pub use error::{ApiError, STORE_UNAVAILABLE};
pub use extract::{authenticate, AppJson, Caller};
pub use limits::RateLimit;
pub use listen::Peer;
pub use openapi::{openapi, openapi_json};
pub use pki::TlsConfig;

/// Network-service instances for callers other than the REST handlers (the web UI).
pub mod ns {
    pub use crate::routes::ns_instances::{instantiate, list_for, scale_by as scale, terminate};
}

/// Tenants for callers other than the REST handlers (the web UI).
pub mod tenants {
    pub use crate::routes::tenants::write_tenant;
}

/// Default port of the control-plane API.
pub const DEFAULT_PORT: u16 = 7070;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:7070`: loopback unless the
    /// operator asks for more.
    pub listen: SocketAddr,
    /// A host is `down` when its last heartbeat is older than this
    /// (default 6 s: three missed heartbeats at the agents' 2 s period). It is also the
    /// host lease: an agent that has not renewed it for this long pauses its redundant
    /// VMs.
    pub heartbeat_timeout: Duration,
    /// How long beyond a primary's lease a standby takeover waits (the agent's pause
    /// latency, clock rates); `None`: half the heartbeat timeout, at least 2 s
    /// ([`control::default_takeover_margin`]).
    pub takeover_margin: Option<Duration>,
    /// Traffic statistics: where this server's vSwitch controller listens
    /// for switch reports; `None` turns statistics off.
    pub vswitch_listen: Option<SocketAddr>,
    /// The controller's domain name.
    pub domain: String,
    /// Where to export flow records as IPFIX (RFC 7011) over UDP, if anywhere.
    pub ipfix_collector: Option<SocketAddr>,
    /// The image store (kernels, initrds, disk templates); `None`: image files
    /// cannot be uploaded, and images cannot be made.
    pub blobs: Option<BlobConfig>,
    /// Serve HTTPS with a certificate from the cluster CA (made on first use, kept in
    /// the store); agents join with join tokens and present client certificates.
    /// `None`: plain HTTP, for loopback.
    pub tls: Option<TlsConfig>,
    /// Requests allowed per bearer token (per client address without one); over it,
    /// 429 with `Retry-After`. Default 100/s, burst 200; `None` turns it off.
    pub rate_limit: Option<RateLimit>,
    /// How many CPU-heavy jobs (descriptor validation, NS planning) run at once, off
    /// the async workers; more at the same time get 429. Default 2.
    pub cpu_jobs: usize,
    /// This server's name among the servers of one store: the operation driver's
    /// identity in the leader election, and the runner named in NS records so that only
    /// this server, restarted, declares their work interrupted. Default:
    /// `server-<listen address>` (stable across restarts; servers on several machines
    /// listening on one address need their own).
    pub server_id: Option<String>,
    /// The operation driver's leader lease: when the leading server dies, another one
    /// leads within about this time. Default 4 s.
    pub election_lease: Duration,
    /// The key that seals terminal secrets in the store (32 bytes, made with mode 0600
    /// if missing). Servers sharing a store need the same file. `None`: terminals
    /// cannot be created.
    pub secrets_key_file: Option<std::path::PathBuf>,
    /// The Ed25519 key (PKCS#8) this server signs the slice ledger with (created if
    /// missing; each server of a store has its own). `None`: a key of this process only.
    pub ledger_key_file: Option<std::path::PathBuf>,
    /// A host event stream (`GET /v1/hosts/{name}/events`) quiet for this long gets a
    /// `ping` line, so that both ends notice a dead connection. Default 10 s.
    pub push_keepalive: Duration,
    /// Routes served beside the API under `/ui` (the web dashboard, crate `ui`, which
    /// builds on this crate and so cannot be called from it): built over this server's
    /// state. `None`: no dashboard.
    pub ui: Option<fn(AppState) -> Router>,
    /// The slice sampler's period: every period the leading server measures each
    /// NSI's load from its VMs' traffic and CPU counters, forecasts and allocates
    /// (`docs/SLICES.md`), and reconciles associations left without a ledger entry.
    /// Default 60 s; `None` turns the sampler off.
    pub slice_sample_period: Option<Duration>,
    /// MEC services (`vinfra mec serve`) the dashboard's V2X page may read, by name. Only
    /// these: the page never fetches a URL a user typed. Their operator tokens are not
    /// kept here; a user gives one in the page.
    pub mecs: Vec<MecEndpoint>,
}

/// A MEC service the dashboard can show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MecEndpoint {
    /// Its name on the page (a DNS label).
    pub name: String,
    /// Its base URL (`http://host:port`, no path).
    pub url: String,
}

impl std::str::FromStr for MecEndpoint {
    type Err = String;

    /// `NAME=URL`, e.g. `op-a=http://127.0.0.1:7300`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, url) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=URL, e.g. op-a=http://127.0.0.1:7300"))?;
        model::validate_name("MEC name", name).map_err(|e| format!("{s:?}: {e}"))?;
        // `vinfra mec serve` speaks plain HTTP (on loopback or the operator's network).
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{s:?}: the URL must start with http://"))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty()
            || authority.contains(['/', '?', '#', '@'])
            || authority
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "{s:?}: the URL must be scheme://host[:port] with no path, query or user"
            ));
        }
        Ok(MecEndpoint {
            name: name.to_owned(),
            url: url.trim_end_matches('/').to_owned(),
        })
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_PORT)),
            heartbeat_timeout: Duration::from_secs(6),
            takeover_margin: None,
            vswitch_listen: None,
            domain: "default".to_owned(),
            ipfix_collector: None,
            blobs: None,
            tls: None,
            rate_limit: Some(RateLimit::default()),
            cpu_jobs: 2,
            server_id: None,
            election_lease: Duration::from_secs(4),
            secrets_key_file: None,
            ledger_key_file: None,
            push_keepalive: control::push::DEFAULT_KEEPALIVE,
            ui: None,
            slice_sample_period: Some(Duration::from_secs(60)),
            mecs: Vec::new(),
        }
    }
}

/// Shared state of every request: the store, settings, and the two pieces of
/// state kept in memory only (console tails, HTTP counters).
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    control: control::Control,
    /// Latest console tail per VM. In memory on purpose: it is large,
    /// changes every report, and losing it on restart costs nothing.
    consoles: Mutex<HashMap<VmId, String>>,
    /// The CPU time (ms) each VM's agent last reported: what the slice sampler reads.
    /// In memory like the console tails: it is cumulative, so a restarted server
    /// continues from the agents' next reports (the sampler keeps its own cursor).
    cpu_ms: Mutex<HashMap<VmId, u64>>,
    /// The cache-rebuild progress of recent migrations as reported, one sample a report:
    /// the curves the dashboard plots. In memory like the console tails (the record keeps
    /// the latest figures only); a restart starts the curves anew.
    curves: Mutex<curves::Curves>,
    http: metrics::HttpCounters,
    /// The vSwitch controller of this server's domain, when statistics are on.
    traffic: Option<net::Controller>,
    /// This server's own URL (set by `serve` once bound): the `vinfra` site of an NS.
    self_url: std::sync::OnceLock<String>,
    /// The image store's files, once opened (see [`AppState::set_blobs`]).
    blobs: std::sync::OnceLock<Arc<BlobFiles>>,
    /// The cluster CA, when this server serves TLS.
    ca: std::sync::OnceLock<Arc<tls::Ca>>,
    /// Token buckets per caller, when rate limiting is on.
    limiter: Option<limits::Limiter>,
    /// Where CPU-heavy request work runs.
    cpu: limits::CpuPool,
    /// This server's name among the servers of its store.
    server_id: String,
    /// MEC services the dashboard may read.
    mecs: Vec<MecEndpoint>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("control", &self.inner.control)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// State over `store` with `config`'s settings.
    pub fn new(store: Arc<dyn Store>, config: &ServerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                control: control::Control::new(
                    store,
                    u64::try_from(config.heartbeat_timeout.as_millis()).unwrap_or(u64::MAX),
                )
                .with_push_keepalive(config.push_keepalive),
                consoles: Mutex::new(HashMap::new()),
                cpu_ms: Mutex::new(HashMap::new()),
                curves: Mutex::new(curves::Curves::default()),
                http: metrics::HttpCounters::default(),
                traffic: config
                    .vswitch_listen
                    .map(|_| net::Controller::new(net::DomainId(config.domain.clone()))),
                self_url: std::sync::OnceLock::new(),
                blobs: std::sync::OnceLock::new(),
                ca: std::sync::OnceLock::new(),
                limiter: config.rate_limit.map(limits::Limiter::new),
                cpu: limits::CpuPool::new(config.cpu_jobs),
                server_id: config
                    .server_id
                    .clone()
                    .unwrap_or_else(|| format!("server-{}", config.listen)),
                mecs: config.mecs.clone(),
            }),
        }
    }

    /// This server's URL, once `serve` bound it (loopback when it listens on all
    /// addresses).
    pub fn self_url(&self) -> Option<String> {
        self.inner.self_url.get().cloned()
    }

    /// Gives the state its image store (once; later calls are ignored).
    pub fn set_blobs(&self, files: BlobFiles) {
        let _ = self.inner.blobs.set(Arc::new(files));
    }

    pub(crate) fn ca(&self) -> Option<&tls::Ca> {
        self.inner.ca.get().map(|c| c.as_ref())
    }

    pub(crate) fn blobs(&self) -> Option<&BlobFiles> {
        self.inner.blobs.get().map(|b| b.as_ref())
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        self.inner.control.store()
    }

    /// The control layer.
    pub fn control(&self) -> &control::Control {
        &self.inner.control
    }

    pub(crate) fn set_console(&self, vm: VmId, tail: String) {
        self.consoles().insert(vm, tail);
    }

    /// The latest console tail the VM's agent reported (empty if none since this server
    /// started).
    pub fn console(&self, vm: VmId) -> String {
        self.consoles().get(&vm).cloned().unwrap_or_default()
    }

    /// Forgets a VM's console tail and CPU time (the VM is gone).
    pub fn forget_console(&self, vm: VmId) {
        self.consoles().remove(&vm);
        lock(&self.inner.cpu_ms).remove(&vm);
    }

    pub(crate) fn set_cpu_ms(&self, vm: VmId, ms: u64) {
        lock(&self.inner.cpu_ms).insert(vm, ms);
    }

    /// What the slice sampler reads now: the vSwitch controller's lifetime bytes per
    /// VM pair (none when statistics are off) and the CPU time the agents last
    /// reported per VM.
    pub fn slice_counters(&self) -> control::slices::Counters {
        let pairs = self
            .traffic()
            .map(|c| {
                c.traffic(&net::TrafficQuery::default())
                    .pairs
                    .into_iter()
                    .map(|p| (p.src_mac.to_string(), p.dst_mac.to_string(), p.bytes))
                    .collect()
            })
            .unwrap_or_default();
        control::slices::Counters {
            pairs,
            cpu_ms: self.slice_cpu_ms(),
        }
    }

    /// The CPU time the agents last reported per VM (by id), ms.
    fn slice_cpu_ms(&self) -> std::collections::BTreeMap<String, u64> {
        lock(&self.inner.cpu_ms)
            .iter()
            .map(|(vm, ms)| (vm.to_string(), *ms))
            .collect()
    }

    fn consoles(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, String>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (single insert/remove), so a poisoned lock is still usable.
        self.inner
            .consoles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a sample of `m`'s progress to its curve.
    pub(crate) fn record_progress(&self, m: &model::Migration) {
        lock(&self.inner.curves).record(m, control::now_ms());
    }

    /// The progress samples of migration `m` this server received, oldest first.
    pub fn curve(&self, m: MigrationId) -> Vec<ProgressSample> {
        lock(&self.inner.curves).get(m)
    }

    /// The MEC services the dashboard may read (`vinfra server --mec`).
    pub fn mecs(&self) -> &[MecEndpoint] {
        &self.inner.mecs
    }

    /// This server's vSwitch controller, when traffic statistics are on.
    pub fn traffic(&self) -> Option<&net::Controller> {
        self.inner.traffic.as_ref()
    }

    pub(crate) fn http(&self) -> &metrics::HttpCounters {
        &self.inner.http
    }

    pub(crate) fn limiter(&self) -> Option<&limits::Limiter> {
        self.inner.limiter.as_ref()
    }

    pub(crate) fn cpu(&self) -> &limits::CpuPool {
        &self.inner.cpu
    }

    /// This server's name among the servers of its store.
    pub fn server_id(&self) -> &str {
        &self.inner.server_id
    }
}

/// Locks a map whose updates are single inserts/removes: a panic elsewhere cannot
/// leave it half-updated, so a poisoned lock is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The API router: every route under `/v1`, plus `/metrics`.
pub fn router(state: AppState) -> Router {
    routes::router(state)
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    ca_pem: Option<String>,
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl ServerHandle {
    /// The bound address (the real port when the config asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The cluster CA certificate (PEM) when the server serves TLS.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Stops accepting connections, lets in-flight requests finish, and waits
    /// for the server task.
    pub async fn shutdown(self) -> Result<(), ApiError> {
        // The task may already have ended (and dropped the receiver); then
        // its result below says why.
        let _ = self.shutdown.send(());
        match self.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ApiError::Serve(Box::new(e))),
            Err(e) => Err(ApiError::Serve(Box::new(e))),
        }
    }
}

/// The terminal secrets key in `path`, made (32 random bytes, mode 0600) if missing.
fn secrets_key(path: &std::path::Path) -> Result<control::terminals::SecretsKey, ApiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| ApiError::DataDir {
        path: path.to_owned(),
        source,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; control::terminals::SecretsKey::LEN];
            getrandom::fill(&mut key).map_err(|e| io(std::io::Error::other(e.to_string())))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            f.write_all(&key).and_then(|()| f.sync_all()).map_err(io)?;
            key.to_vec()
        }
        Err(e) => return Err(io(e)),
    };
    control::terminals::SecretsKey::new(&bytes)
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// Binds `config.listen` and serves the API on it in a spawned task.
pub async fn serve(config: ServerConfig, store: Arc<dyn Store>) -> Result<ServerHandle, ApiError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ApiError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ApiError::Bind {
        addr: config.listen,
        source,
    })?;
    let state = AppState::new(store, &config);
    if let Some(cfg) = config.blobs.clone() {
        state.set_blobs(BlobFiles::open(cfg)?);
    }
    if let Some(path) = &config.secrets_key_file {
        let key = secrets_key(path)?;
        state.control().set_secrets_key(key);
    }
    if let Some(path) = &config.ledger_key_file {
        state.control().set_ledger_key_file(path.clone());
    }
    let own = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let tls_config = match &config.tls {
        Some(t) => {
            let ca = pki::cluster_ca(state.store()).await?;
            let cfg = pki::server_tls(&ca, t, addr)?;
            let _ = state.inner.ca.set(Arc::new(ca));
            Some(cfg)
        }
        None => None,
    };
    let ca_pem = state.ca().map(|c| c.cert_pem().to_owned());
    let scheme = if tls_config.is_some() {
        "https"
    } else {
        "http"
    };
    let _ = state.inner.self_url.set(format!("{scheme}://{own}"));
    routes::ns_instances::resume(&state).await;
    let mut app = router(state.clone());
    if let Some(ui) = config.ui {
        app = app.nest("/ui", ui(state.clone()));
    }
    let switches = match (config.vswitch_listen, state.traffic().cloned()) {
        (Some(at), Some(ctrl)) => {
            // The totals of earlier runs first, before any switch reports.
            restore_traffic(&state, &ctrl, &config.domain).await;
            tokio::spawn(save_traffic_every(
                state.clone(),
                ctrl.clone(),
                config.domain.clone(),
                Duration::from_secs(3),
            ));
            let l = tokio::net::TcpListener::bind(at)
                .await
                .map_err(|source| ApiError::Bind { addr: at, source })?;
            let bound = l
                .local_addr()
                .map_err(|source| ApiError::Bind { addr: at, source })?;
            tracing::info!(addr = %bound, domain = %config.domain, "vswitch controller listening");
            if let Some(collector) = config.ipfix_collector {
                let c = ctrl.clone();
                tokio::spawn(async move {
                    if let Err(e) = c
                        .export_ipfix_every(collector, 1, Duration::from_secs(10))
                        .await
                    {
                        tracing::error!(error = %e, "ipfix export stopped");
                    }
                });
            }
            Some((l, ctrl))
        }
        _ => None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    // Background work of the control plane (drains, takeovers, request-started jobs):
    // one driver, stopped with the server.
    let defaults = control::DriverConfig::default();
    let driver = control::Driver::start(
        state.control().clone(),
        control::DriverConfig {
            identity: state.server_id().to_owned(),
            lease: config.election_lease,
            takeover_margin: config.takeover_margin,
            ..defaults
        },
        state.control().jobs().clone(),
    );
    if let Some(period) = config.slice_sample_period {
        tokio::spawn(sample_slices_every(state.clone(), driver.leading(), period));
        tokio::spawn(publish_slice_cpu_every(
            state.clone(),
            driver.leading(),
            period,
        ));
    }
    let switch_server = async move {
        if let Some((l, ctrl)) = switches {
            if let Err(e) = net::controller::serve_switches(l, ctrl).await {
                tracing::error!(error = %e, "vswitch controller stopped");
            }
        }
        std::future::pending::<()>().await
    };
    let control = state.control().clone();
    let stop = async move {
        let _ = rx.await;
        // Host event streams last as long as their connections: ended here, or the
        // graceful shutdown below would wait for them forever.
        control.close_push();
    };
    // Every request learns its connection (`Peer`): agent tokens over TLS need the
    // agent's client certificate.
    let app = app.into_make_service_with_connect_info::<Peer>();
    let http: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> =
        match tls_config {
            Some(cfg) => {
                let l =
                    listen::TlsListener::new(listener, cfg).map_err(|source| ApiError::Bind {
                        addr: config.listen,
                        source,
                    })?;
                Box::pin(
                    axum::serve(l, app)
                        .with_graceful_shutdown(stop)
                        .into_future(),
                )
            }
            None => Box::pin(
                axum::serve(listen::plain(listener), app)
                    .with_graceful_shutdown(stop)
                    .into_future(),
            ),
        };
    let task = tokio::spawn(async move {
        let r = tokio::select! {
            r = http => r,
            _ = switch_server => Ok(()),
        };
        driver.shutdown().await;
        r
    });
    tracing::info!(%addr, scheme, "API listening");
    Ok(ServerHandle {
        addr,
        ca_pem,
        shutdown: tx,
        task,
    })
}

/// Associations younger than this may still be being appended by the server that
/// made them: the sampler's reconciliation leaves them alone.
const RECONCILE_GRACE: Duration = Duration::from_secs(30);

/// The slice sampler: while this server leads, every `period` one sample of every
/// NSI's load from the counters of every server sharing the store
/// ([`cluster_counters`]), then the reconciliation of associations left without a
/// ledger entry. Only the leader samples, so that one period gives one sample.
async fn sample_slices_every(
    state: AppState,
    mut leading: tokio::sync::watch::Receiver<bool>,
    period: Duration,
) {
    let policy = control::slices::default_policy();
    let grace = u64::try_from(RECONCILE_GRACE.as_millis()).unwrap_or(u64::MAX);
    loop {
        if leading.wait_for(|l| *l).await.is_err() {
            return; // the driver stopped
        }
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while *leading.borrow() {
            tick.tick().await;
            if !*leading.borrow() {
                break;
            }
            let counters = cluster_counters(&state, period).await;
            match state.control().sample_slices(&counters, &policy).await {
                Ok(o) if !o.measured.is_empty() => {
                    tracing::debug!(measured = ?o.measured, allocations = ?o.allocations, "slices sampled")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %model::error_chain(&e), "slice sampling failed; next period retries")
                }
            }
            match state.control().reconcile_slice_ledger(grace).await {
                Ok((0, 0)) => {}
                Ok((appended, found)) => tracing::warn!(
                    appended,
                    found,
                    "associations reconciled with the slice ledger"
                ),
                Err(e) => {
                    tracing::warn!(error = %model::error_chain(&e), "slice ledger reconciliation failed; next period retries")
                }
            }
        }
    }
}

/// This server's counters ([`AppState::slice_counters`]) merged with what the other
/// servers sharing the store saved: their controllers' snapshots and the CPU times
/// their agents reported, published within the last three periods
/// (`control::slices::peers`). A record that cannot be read is logged and left out;
/// a store that cannot be read leaves this server's counters alone.
async fn cluster_counters(state: &AppState, period: Duration) -> control::slices::Counters {
    let own = state.slice_counters();
    let stale = u64::try_from(period.as_millis().saturating_mul(3)).unwrap_or(u64::MAX);
    let fresh_since = control::now_ms().saturating_sub(stale);
    let peers = match state
        .control()
        .peer_counters(state.server_id(), fresh_since)
        .await
    {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %model::error_chain(&e), "cannot read the other servers' counters; sampling this server's alone");
            return own;
        }
    };
    for why in &peers.unreadable {
        tracing::warn!(record = %why, "another server's CPU report is unreadable; left out");
    }
    let pairs: Vec<Vec<(String, String, u64)>> = peers
        .traffic
        .iter()
        .filter_map(|(key, snap)| match net::controller::snapshot_pair_bytes(snap) {
            Ok(v) => Some(
                v.into_iter()
                    .map(|(s, d, b)| (s.to_string(), d.to_string(), b))
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(%key, error = %e, "another server's traffic snapshot is unreadable; left out");
                None
            }
        })
        .collect();
    control::slices::peers::merge(own, &pairs, &peers.cpu)
}

/// Publishes the CPU times this server's agents report every `period`, leader or
/// not, for the leader's sampler; stops with the operation driver (`leading` closes).
async fn publish_slice_cpu_every(
    state: AppState,
    mut leading: tokio::sync::watch::Receiver<bool>,
    period: Duration,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = leading.changed() => {
                if r.is_err() {
                    return; // the driver stopped
                }
                continue;
            }
        }
        let cpu = state.slice_cpu_ms();
        if let Err(e) = state
            .control()
            .publish_slice_cpu(state.server_id(), cpu)
            .await
        {
            tracing::warn!(error = %model::error_chain(&e), "cannot publish CPU times for the slice sampler; next period retries");
        }
    }
}

/// Continues the counters of this server's controller from its last saved snapshot. A
/// snapshot that cannot be read is logged and skipped (the counters start from zero).
async fn restore_traffic(state: &AppState, ctrl: &net::Controller, domain: &str) {
    match state
        .control()
        .traffic_snapshot(domain, state.server_id())
        .await
    {
        Ok(Some(snap)) => match ctrl.restore(&snap) {
            Ok(()) => tracing::info!(domain, "traffic counters restored"),
            Err(e) => tracing::error!(domain, error = %e, "saved traffic counters not restored"),
        },
        Ok(None) => {}
        Err(e) => tracing::error!(domain, error = %e, "cannot read saved traffic counters"),
    }
}

/// Saves the controller's snapshot every `interval` while reports keep being applied.
/// What a crash loses (at most one interval of applied reports) comes back from the
/// switches' cumulative counters after the restart: snapshot and per-switch cursors are
/// saved together, so nothing is counted twice.
async fn save_traffic_every(
    state: AppState,
    ctrl: net::Controller,
    domain: String,
    interval: Duration,
) {
    let mut saved = ctrl.applied();
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let applied = ctrl.applied();
        if applied == saved {
            continue;
        }
        // `applied` read before the snapshot: the snapshot covers at least that many.
        let snap = bytes::Bytes::from(ctrl.snapshot());
        match state
            .control()
            .save_traffic_snapshot(&domain, state.server_id(), snap)
            .await
        {
            Ok(()) => {
                saved = applied;
                ctrl.mark_persisted(applied);
            }
            Err(e) => {
                tracing::warn!(domain, error = %e, "cannot save traffic counters; will retry")
            }
        }
    }
}

#[cfg(test)]
mod mec_endpoint_tests {
    use super::MecEndpoint;

    #[test]
    fn mec_endpoints_parse_or_say_why_not() {
        let m: MecEndpoint = "op-a=http://127.0.0.1:7300/".parse().unwrap();
        assert_eq!(m.name, "op-a");
        assert_eq!(m.url, "http://127.0.0.1:7300");
        for (bad, why) in [
            ("op-a", "expected NAME=URL"),
            ("Op=http://127.0.0.1:1", "MEC name"),
            ("op=ftp://127.0.0.1:1", "must start with http://"),
            ("op=https://127.0.0.1:1", "must start with http://"),
            ("op=http://", "no path"),
            ("op=http://127.0.0.1:1/v2x", "no path"),
            ("op=http://u@127.0.0.1:1", "no path"),
            ("op=http://a b", "no path"),
        ] {
            let e = bad.parse::<MecEndpoint>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
