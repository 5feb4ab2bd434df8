//! The node agent: makes this host run what the control plane assigns to it.
//!
//! Owns: host registration and heartbeats, the set of VMs on this host (their run
//! dirs, disks and hypervisor processes), and the reconcile loop.
//! Must not depend on: the server's internals; it talks to the control plane only
//! through `client` (the REST API), so an agent on another machine works the same.
//!
//! Tasks: one heartbeat task (every `heartbeat`, at least three per lease) and the lease
//! watchdog ([`lease`]), which alone owns the host lease's state and publishes it; the
//! reconciler, which every `poll` fetches the host's assignments and routes each to its
//! VM's task; and one task per VM, which alone owns that VM's phase
//! ([`phase::VmPhase`]), cache and reports, does its I/O at its own pace (a slow start of
//! one VM never delays another's migration), and pauses its guest by itself when the
//! lease expires and the VM is redundant (fencing: its standby may take over). The
//! shared parts (config, client, hypervisor, disk stack, image files, uplink, the lease
//! receiver) are one `Host` value behind an `Arc`.
//!
//! Lifecycle: on shutdown the agent stops its VMs and reports them stopped; their
//! desired state stays in the store, so the next agent start boots them again. After a
//! crash (`kill -9`) the VMs keep running and the next agent adopts them through their
//! pidfile and QMP socket, and serves their disks again.
//!
//! The hypervisor is [`AgentConfig::driver`]: QEMU, or [`compute::SimDriver`] (a
//! simulated one; `tests/all/` runs the agent on it against an in-process server).
#![warn(missing_docs)]

pub mod disks;
pub mod files;
mod hostinfo;
pub mod images;
pub mod lease;
pub mod linkrelay;
mod local;
mod migrate;
pub mod netdev;
pub mod phase;
mod push;
pub mod tables;
mod terminal;
mod vm;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::Client;
use compute::{Accel, ComputeDriver, QemuDriver};
use model::api::{HostLease, RegisterHost};
use model::VmId;
use tokio::sync::watch;

use crate::lease::{Lease, Renewal};
use crate::phase::VmPhase;
use crate::vm::{Msg, VmHandle};

/// How to run an agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Control plane base URL, e.g. `http://127.0.0.1:7070`.
    pub server_url: String,
    /// Token with the `agent` (or `admin`) role.
    pub token: String,
    /// This host's name (`[a-z0-9][a-z0-9-]*`).
    pub host_name: String,
    /// Where VM run dirs and disks live.
    pub data_dir: PathBuf,
    /// Accelerator for the VMs.
    pub accel: Accel,
    /// Heartbeat period (shortened to a third of the host lease the server grants).
    pub heartbeat: Duration,
    /// Reconcile period.
    pub poll: Duration,
    /// The disk stack (origin dir, SAN model, cache size).
    pub disks: disks::DiskConfig,
    /// Where link requests for this host's guests are taken ([`linkrelay`]).
    pub link_listen: std::net::SocketAddr,
    /// This host's data-network address: when set, every VM network's bridge gets a VXLAN
    /// port towards the other hosts' ([`netdev::Uplink`]). One agent per machine then.
    pub uplink_ip: Option<std::net::Ipv4Addr>,
    /// The server's CA and this agent's client certificate, for an `https://` server
    /// (from joining with a join token); `None` for plain HTTP on loopback.
    pub tls: Option<client::ClientTls>,
    /// vCPUs offered per CPU (overcommit, like Nova's `cpu_allocation_ratio`).
    pub cpu_allocation_ratio: f64,
    /// The hypervisor: QEMU by default, or the simulated one ([`compute::SimDriver`]).
    /// VMs outlive the agent, and the driver value may too: a test restarts an agent
    /// around the same driver, as a host's QEMUs outlive its agent.
    pub driver: Arc<dyn ComputeDriver>,
    /// Give VM NICs host devices (taps on bridges, VXLAN ports with an uplink). Off for
    /// the sim driver, whose guests open no taps (and which needs no root).
    pub host_network: bool,
    /// Count this host's VM traffic in the kernel (a BPF classifier on every VM tap) and
    /// report it to the domain's vSwitch controller; `None`: not counted.
    pub traffic: Option<TrafficReporting>,
    /// What this host offers the scheduler; `None` measures the machine. Simulated hosts
    /// set it (50 of them share one laptop).
    pub resources: Option<HostResources>,
}

/// Where this host's traffic counters go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficReporting {
    /// The domain controller's switch endpoint (the server's `--vswitch-listen`).
    pub controller: std::net::SocketAddr,
    /// The controller's domain (the server's `--domain`).
    pub domain: String,
    /// Leave every frame to the bridge (see [`net::KernelSwitchConfig::bridge_only`]).
    pub bridge_only: bool,
}

/// CPUs, memory and disk a host registers with, when not measured from the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostResources {
    /// CPUs (the scheduler offers `cpus × cpu_allocation_ratio` vCPUs).
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Free disk, GiB.
    pub disk_gib: u64,
}

impl HostResources {
    /// A simulated host: 16 CPUs (64 vCPUs at the default ratio), 64 GiB of memory,
    /// 1 TiB of disk — 200 VMs of 1 vCPU and 256 MiB fit on 50 of them four times over.
    pub const SIM_DEFAULT: HostResources = HostResources {
        cpus: 16,
        memory_mib: 64 * 1024,
        disk_gib: 1024,
    };
}

impl AgentConfig {
    /// A config with the default periods (heartbeat 2 s, reconcile 1 s).
    pub fn new(server_url: &str, token: &str, host_name: &str, data_dir: PathBuf) -> Self {
        Self {
            server_url: server_url.to_owned(),
            token: token.to_owned(),
            host_name: host_name.to_owned(),
            accel: Accel::Auto,
            heartbeat: Duration::from_secs(2),
            poll: Duration::from_secs(1),
            disks: disks::DiskConfig {
                origin_dir: data_dir.join("origin"),
                origin_rate: 0,
                origin_latency: Duration::ZERO,
                max_cache_blocks: 16384,
            },
            data_dir,
            link_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            uplink_ip: None,
            traffic: None,
            tls: None,
            cpu_allocation_ratio: f64::from(model::api::DEFAULT_CPU_ALLOCATION_RATIO),
            driver: Arc::new(QemuDriver::new()),
            host_network: true,
            resources: None,
        }
    }

    /// [`AgentConfig::new`] for a simulated host: `driver` (a [`compute::SimDriver`]), no
    /// host network devices, [`HostResources::SIM_DEFAULT`].
    pub fn simulated(
        server_url: &str,
        token: &str,
        host_name: &str,
        data_dir: PathBuf,
        driver: Arc<dyn ComputeDriver>,
    ) -> Self {
        Self {
            driver,
            host_network: false,
            resources: Some(HostResources::SIM_DEFAULT),
            ..Self::new(server_url, token, host_name, data_dir)
        }
    }
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The server URL or token cannot be used.
    #[error("cannot create the API client for {url}")]
    Client {
        /// The server URL.
        url: String,
        /// The cause.
        #[source]
        err: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The data dir cannot be used.
    #[error("cannot use data dir {path}")]
    DataDir {
        /// The data dir.
        path: PathBuf,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
    /// The disk stack (NBD server, origin dir) could not start.
    #[error("cannot start the disk stack")]
    Disks(#[from] disks::DiskError),
    /// The link relay could not listen.
    #[error("cannot listen for link requests on {addr}")]
    LinkListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
    /// The server refused our registration (bad token, invalid host name, ...).
    #[error("cannot set up TLS for the peer exports")]
    Tls(#[source] tls::TlsError),
    /// The kernel traffic classifier could not be loaded.
    #[error("cannot count VM traffic (kernel datapath)")]
    Traffic(#[source] net::KernelSwitchError),
    /// The server refused to register this host.
    #[error("the server refused to register host {host}")]
    Register {
        /// Our host name.
        host: String,
        /// The cause.
        #[source]
        err: Box<client::ClientError>,
    },
}

/// Runs the agent until `shutdown` resolves, then stops this host's VMs.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let client = api_client(&cfg.server_url, &cfg.token, cfg.tls.as_ref()).map_err(|err| {
        AgentError::Client {
            url: cfg.server_url.clone(),
            err,
        }
    })?;
    std::fs::create_dir_all(cfg.data_dir.join(files::VMS_DIR)).map_err(|err| {
        AgentError::DataDir {
            path: cfg.data_dir.clone(),
            err,
        }
    })?;
    let driver = cfg.driver.clone();
    let peer_listen = peer_listen(&cfg)?;
    write_qemu_tls(&cfg)?;
    let disks = Arc::new(disks::DiskStack::start(
        &cfg.data_dir,
        cfg.disks.clone(),
        peer_listen,
    )?);
    let counting = start_counting(&cfg).await?;
    tokio::pin!(shutdown);

    let link_err = |err| AgentError::LinkListen {
        addr: cfg.link_listen,
        err,
    };
    let links = tokio::net::TcpListener::bind(cfg.link_listen)
        .await
        .map_err(link_err)?;
    let link_addr = links.local_addr().map_err(link_err)?;
    let relay = tokio::spawn(linkrelay::serve(
        links,
        cfg.data_dir.clone(),
        cfg.server_url.clone(),
        cfg.tls.clone(),
    ));
    let registration = hostinfo::registration(&cfg, disks.peer_addr(), link_addr);
    let first = tokio::select! {
        r = register(&client, &registration) => r?,
        _ = &mut shutdown => return Ok(()),
    };
    tracing::info!(host = %cfg.host_name, lease_ms = first.lease.as_millis(), "registered");

    let (renewals_tx, renewals) = watch::channel(first);
    let (lease_tx, lease) = watch::channel(Lease::Held {
        since: first.answered_at,
    });
    let watchdog = tokio::spawn(lease::watchdog(renewals, lease_tx));
    let hb = tokio::spawn(heartbeat_loop(
        client.clone(),
        registration,
        cfg.heartbeat,
        renewals_tx,
    ));
    let poll = cfg.poll;
    let (tables_tx, tables_rx) = tokio::sync::mpsc::channel(16);
    let (answers, answers_rx) = tokio::sync::mpsc::channel(ANSWER_QUEUE);
    tokio::spawn(terminal::answerer(client.clone(), answers_rx));
    let mut agent = Agent {
        host: Arc::new(Host {
            answers,
            tables: tables_tx.clone(),
            images: images::ImageFiles::new(&cfg.data_dir, client.clone()),
            cfg,
            client,
            driver,
            disks,
            uplink: std::sync::RwLock::new(None),
            counting,
            lease,
        }),
        vms: BTreeMap::new(),
        tables: None,
    };
    agent.adopt_existing().await;
    let tables_task = tokio::spawn(tables::run(
        agent.host.client.clone(),
        agent.host.cfg.host_name.clone(),
        agent.host.cfg.data_dir.clone(),
        tables_rx,
    ));
    agent.tables = Some(tables_tx);
    let (events_tx, mut events) = tokio::sync::mpsc::channel(256);
    let pushing = tokio::spawn(push::follow(
        agent.host.client.clone(),
        agent.host.cfg.host_name.clone(),
        events_tx,
    ));
    // A change of the lease (expired, or back) gives up the pass under way and starts
    // the next at once: a pass started before a cut may hang on a dead connection for
    // the client's whole timeout, and the VMs want their assignments soon after the
    // lease came back (a fenced one asks for its own as well, `Step::Confirm`).
    let mut lease = agent.host.lease.clone();
    let mut lease_open = true;
    let mut pass_now = false;
    let mut next_pass = tokio::time::Instant::now() + poll;
    loop {
        if pass_now {
            next_pass = tokio::time::Instant::now();
        }
        pass_now = false;
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep_until(next_pass) => {}
            changed = lease.changed(), if lease_open => lease_open = changed.is_ok(),
            // A pushed change goes to its VM's task at once; the pass stays the
            // fallback (and the tick), and a resync asks for one now.
            Some(ev) = events.recv() => {
                if !agent.pushed(ev) {
                    continue;
                }
            }
        }
        lease.borrow_and_update();
        tokio::select! {
            _ = &mut shutdown => break,
            m = agent.reconcile_once() => {
                // While a migration is in flight the next step is usually due at once
                // (switch-over, progress): poll faster then.
                let pause = if m { poll.min(Duration::from_millis(200)) } else { poll };
                next_pass = tokio::time::Instant::now() + pause;
            }
            changed = lease.changed(), if lease_open => {
                lease_open = changed.is_ok();
                tracing::debug!("reconcile pass given up: the host lease changed");
                pass_now = true;
            }
        }
    }
    hb.abort();
    watchdog.abort();
    relay.abort();
    pushing.abort();
    // The tables' last contents are saved before the VMs stop (devices outlive it).
    if let Some(tx) = agent.tables.take() {
        let (done, saved) = tokio::sync::oneshot::channel();
        if tx.send(tables::Cmd::Shutdown(done)).await.is_ok() {
            let _ = saved.await;
        }
    }
    let _ = tables_task.await;
    agent.stop_all().await;
    if let Some(sw) = agent.host.counting.clone() {
        match tokio::task::spawn_blocking(move || sw.retire()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %model::error_chain(&e), "final traffic report failed; counters kept for the next start")
            }
            Err(e) => tracing::warn!(error = %e, "final traffic report task failed"),
        }
    }
    Ok(())
}

/// A joined agent with a data-network address serves its peer exports there, TLS
/// required, with its own certificate.
fn peer_listen(cfg: &AgentConfig) -> Result<Option<disks::PeerListen>, AgentError> {
    let (Some(ip), Some(t)) = (cfg.uplink_ip, &cfg.tls) else {
        return Ok(None);
    };
    let Some(id) = &t.identity else {
        return Ok(None);
    };
    let tls = tls::peer_server_config(&t.ca_pem, id).map_err(AgentError::Tls)?;
    Ok(Some(disks::PeerListen {
        ip: std::net::IpAddr::V4(ip),
        tls: Arc::new(tls),
    }))
}

/// The NBD client TLS for fetching `from_host`'s peer exports at `addr`: none on
/// loopback (hosts of one machine); beyond it, the agent's own identity, verifying the
/// peer by its host name. A peer beyond loopback without TLS is refused.
pub(crate) fn peer_tls(
    cfg: &AgentConfig,
    addr: std::net::SocketAddr,
    from_host: &str,
) -> Result<Option<nbd::ClientTls>, String> {
    if addr.ip().is_loopback() {
        return Ok(None);
    }
    let Some(t) = &cfg.tls else {
        return Err(format!(
            "peer {from_host} at {addr} is beyond loopback: cache blocks cross only over TLS \
             (join the cluster over https)"
        ));
    };
    let config = tls::client_config(&t.ca_pem, t.identity.as_ref()).map_err(|e| e.to_string())?;
    Ok(Some(nbd::ClientTls {
        config: Arc::new(config),
        server_name: from_host.to_owned(),
    }))
}

/// Subdirectory of the data dir with the agent's certificate as QEMU's
/// `tls-creds-x509` reads it (for migration streams between machines).
const QEMU_TLS_DIR: &str = "qemu-tls";

/// Writes the agent's identity where QEMU reads it: the same certificate serves as
/// server (incoming migrations) and client (outgoing ones).
fn write_qemu_tls(cfg: &AgentConfig) -> Result<(), AgentError> {
    let Some(t) = &cfg.tls else { return Ok(()) };
    let Some(id) = &t.identity else { return Ok(()) };
    let dir = cfg.data_dir.join(QEMU_TLS_DIR);
    let io = |err| AgentError::DataDir {
        path: dir.clone(),
        err,
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    for (name, text, mode) in [
        ("ca-cert.pem", &t.ca_pem, 0o644),
        ("server-cert.pem", &id.cert_pem, 0o644),
        ("client-cert.pem", &id.cert_pem, 0o644),
        ("server-key.pem", &id.key_pem, 0o600),
        ("client-key.pem", &id.key_pem, 0o600),
    ] {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
    }
    Ok(())
}

/// QEMU's TLS directory, when this agent joined over TLS.
pub(crate) fn qemu_tls_dir(cfg: &AgentConfig) -> Option<PathBuf> {
    cfg.tls
        .as_ref()
        .and_then(|t| t.identity.as_ref())
        .map(|_| cfg.data_dir.join(QEMU_TLS_DIR))
}

/// TLS for a migration stream to `uri` (`tcp:IP:PORT`): none on loopback; beyond it
/// the agent's certificate, verifying the destination as `to_host`. Clear text beyond
/// loopback is refused.
pub(crate) fn migration_tls(
    cfg: &AgentConfig,
    uri: &str,
    to_host: &str,
) -> Result<Option<compute::MigrationTls>, String> {
    let addr: Option<std::net::SocketAddr> = uri.strip_prefix("tcp:").and_then(|a| a.parse().ok());
    if addr.is_some_and(|a| a.ip().is_loopback()) {
        return Ok(None);
    }
    match qemu_tls_dir(cfg) {
        Some(dir) => Ok(Some(compute::MigrationTls {
            dir,
            peer_name: to_host.to_owned(),
        })),
        None => Err(format!(
            "the destination {to_host} ({uri}) is beyond loopback: memory crosses only over \
             TLS (join the cluster over https)"
        )),
    }
}

/// A client of the control plane with `token`: over TLS when `tls` is given.
pub(crate) fn api_client(
    server: &str,
    token: &str,
    tls: Option<&client::ClientTls>,
) -> Result<Client, Box<dyn std::error::Error + Send + Sync>> {
    Ok(match tls {
        Some(t) => Client::with_tls(server, token, t)?,
        None => Client::new(server, token)?,
    })
}

/// The wall clock, µs since the Unix epoch (0 if it is set before it).
fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Registers, retrying while the server is unreachable; a refusal (4xx) is final.
/// The registration is the lease's first renewal.
async fn register(client: &Client, req: &RegisterHost) -> Result<Renewal, AgentError> {
    let mut delay = Duration::from_millis(100);
    loop {
        let sent_at = Instant::now();
        match client.register_host(req).await {
            Ok(reply) => return Ok(renewal(sent_at, &reply)),
            Err(err) if err.status().is_some_and(|s| (400..500).contains(&s)) => {
                return Err(AgentError::Register {
                    host: req.name.clone(),
                    err: Box::new(err),
                })
            }
            Err(err) => {
                tracing::warn!(error = %err, "server not reachable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The lease renewed by a heartbeat sent at `sent_at` and answered now.
fn renewal(sent_at: Instant, reply: &HostLease) -> Renewal {
    Renewal {
        sent_at,
        answered_at: Instant::now(),
        lease: Duration::from_millis(reply.lease_ms),
    }
}

/// Sends a heartbeat every period (see [`lease::heartbeat_period`]) and publishes each
/// answered one on `renewals`. A heartbeat that fails or takes longer than
/// [`lease::attempt_timeout`] is sent again after [`lease::retry_after`]: the lease is at
/// risk, and a short cut should not cost more than the lease.
async fn heartbeat_loop(
    client: Client,
    registration: RegisterHost,
    every: Duration,
    renewals: watch::Sender<Renewal>,
) {
    let mut failing = false;
    let mut next = Instant::now() + lease::heartbeat_period(every, renewals.borrow().lease);
    loop {
        tokio::time::sleep_until(next.into()).await;
        let lease_now = renewals.borrow().lease;
        let period = lease::heartbeat_period(every, lease_now);
        let sent_at = Instant::now();
        let attempt = async {
            match client.heartbeat(&registration.name).await {
                // The server forgot us (new store): register again, which renews too.
                Err(e) if e.status() == Some(404) => client.register_host(&registration).await,
                r => r,
            }
        };
        let failure = match tokio::time::timeout(lease::attempt_timeout(lease_now), attempt).await {
            Ok(Ok(reply)) => {
                renewals.send_replace(renewal(sent_at, &reply));
                if failing {
                    tracing::info!("heartbeats answered again");
                }
                failing = false;
                next = sent_at + period;
                continue;
            }
            Ok(Err(e)) => model::error_chain(&e),
            Err(_) => "no answer in time".to_owned(),
        };
        // The first failure in a row is worth a warning; the retries that follow are not.
        if failing {
            tracing::debug!(error = %failure, "heartbeat failed again");
        } else {
            tracing::warn!(error = %failure, "heartbeat failed; retrying");
        }
        failing = true;
        next = Instant::now() + lease::retry_after(period);
    }
}

/// How many answers to terminal operations may wait for the server before a VM task
/// waits to queue its next one.
const ANSWER_QUEUE: usize = 4096;

/// What every VM task of this host shares: the config, the API client, the
/// hypervisor, the disk stack, the image files, and the VXLAN uplink (which the
/// reconciler refreshes as hosts come and go).
pub(crate) struct Host {
    pub(crate) cfg: AgentConfig,
    pub(crate) client: Client,
    pub(crate) driver: Arc<dyn ComputeDriver>,
    pub(crate) disks: Arc<disks::DiskStack>,
    /// The image files of this host's VMs, fetched from the image store.
    pub(crate) images: images::ImageFiles,
    /// The VXLAN uplink of VM networks, when this host has a data-network address.
    uplink: std::sync::RwLock<Option<netdev::Uplink>>,
    /// The kernel classifier's reporter, when this host counts traffic.
    pub(crate) counting: Option<Arc<net::KernelSwitch>>,
    /// The host lease, as the watchdog publishes it (each VM task clones it).
    pub(crate) lease: watch::Receiver<Lease>,
    /// The resource tables task's queue: VM tasks ask it for their windows.
    pub(crate) tables: tokio::sync::mpsc::Sender<tables::Cmd>,
    /// The answers to terminal operations, on their way to the server
    /// ([`terminal::answerer`]).
    pub(crate) answers: tokio::sync::mpsc::Sender<model::terminals::OperationAnswer>,
}

/// Loads (or finds, after a restart) this host's classifier and starts reporting it.
async fn start_counting(cfg: &AgentConfig) -> Result<Option<Arc<net::KernelSwitch>>, AgentError> {
    let Some(t) = cfg.traffic.clone().filter(|_| cfg.host_network) else {
        return Ok(None);
    };
    let kcfg = net::KernelSwitchConfig {
        switch: net::SwitchId(cfg.host_name.clone()),
        domain: net::DomainId(t.domain),
        controller: Some(t.controller),
        report_interval: std::time::Duration::from_secs(1),
        // A pair silent for 5 minutes leaves the kernel's 65 536-entry pair map (its
        // totals stay at the controller).
        pair_idle: Some(std::time::Duration::from_secs(300)),
        bridge_only: t.bridge_only,
    };
    let instance = netdev::datapath_instance(&cfg.host_name, &cfg.data_dir);
    let sw = tokio::task::spawn_blocking(move || net::KernelSwitch::start(kcfg, &instance))
        .await
        .map_err(|_| {
            AgentError::Traffic(net::KernelSwitchError::Thread {
                switch: net::SwitchId(cfg.host_name.clone()),
            })
        })?
        .map_err(AgentError::Traffic)?;
    Ok(Some(Arc::new(sw)))
}

impl Host {
    /// How VM NICs are plugged on this host now.
    pub(crate) fn plumbing(&self) -> netdev::Plumbing {
        if self.cfg.host_network {
            let uplink = self.uplink.read().map(|u| u.clone()).unwrap_or_default();
            netdev::Plumbing::Host {
                uplink,
                counting: self.counting.clone(),
            }
        } else {
            netdev::Plumbing::Off
        }
    }
}

/// The reconciler: owns the VM tasks (one per VM on this host) and routes to each what
/// the server wants for it. It never waits for a task.
struct Agent {
    host: Arc<Host>,
    vms: BTreeMap<VmId, VmHandle>,
    /// The resource tables task's queue ([`tables`]).
    tables: Option<tokio::sync::mpsc::Sender<tables::Cmd>>,
}

impl Agent {
    /// Starts a task for every VM a previous agent process left on this host; one
    /// whose hypervisor still runs is adopted (`Running`).
    async fn adopt_existing(&mut self) {
        for (id, files) in files::scan(&self.host.cfg.data_dir) {
            let mut phase = VmPhase::Stopped { note: None };
            let driver = &self.host.driver;
            if driver.pidfile(files.run_dir()).exists() {
                match driver.adopt(&files.driver_id(), files.run_dir()).await {
                    Ok(rt) => {
                        tracing::info!(vm = %id, pid = rt.pid, "adopted running vm");
                        phase = VmPhase::Running;
                    }
                    Err(e) => tracing::warn!(vm = %id, error = %e, "cannot adopt vm"),
                }
            }
            // The first assignment pass tells the task what to do with it.
            let h = VmHandle::spawn(self.host.clone(), id, phase, Msg::Awaiting);
            self.vms.insert(id, h);
        }
    }

    /// Learns the other hosts' data-network addresses and points every VXLAN port of
    /// this host's bridges at them (hosts come and go).
    async fn refresh_uplink(&self) {
        let Some(local) = self.host.cfg.uplink_ip else {
            return;
        };
        let hosts = match self.host.client.list_hosts().await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list hosts for the uplink");
                return;
            }
        };
        let peers: Vec<std::net::Ipv4Addr> = hosts
            .iter()
            .filter(|h| h.name.as_str() != self.host.cfg.host_name)
            .filter(|h| h.state == model::HostState::Up)
            .filter_map(|h| h.uplink_ip.as_deref()?.parse().ok())
            .filter(|ip| *ip != local)
            .collect();
        let uplink = netdev::Uplink { local, peers };
        netdev::sync_uplinks(&uplink).await;
        if let Ok(mut u) = self.host.uplink.write() {
            *u = Some(uplink);
        }
    }

    /// One pass: fetches the host's assignments and routes each to its VM's task
    /// (starting tasks for new VMs); tells the tasks of VMs no longer assigned here to
    /// leave. Returns whether a migration is under way (the next pass comes sooner).
    async fn reconcile_once(&mut self) -> bool {
        self.refresh_uplink().await;
        let assignments = match self.host.client.assignments(&self.host.cfg.host_name).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch assignments");
                return false;
            }
        };
        // Tasks that ended (deleted, dropped) make room for a new one next time.
        self.vms.retain(|_, h| !h.is_finished());
        let migrating = assignments.iter().any(|a| a.migration.is_some());
        let assigned: BTreeSet<VmId> = assignments.iter().map(|a| a.vm.id).collect();
        for a in assignments {
            self.route(a, "poll");
        }
        for (id, h) in self.vms.iter_mut() {
            if !assigned.contains(id) {
                h.route(Msg::Unassigned);
            }
        }
        migrating
    }

    /// Hands a VM's assignment to its task, starting one for a VM new here; `via` says
    /// how it came (`push`, `poll`).
    fn route(&mut self, a: model::api::Assignment, via: &'static str) {
        let id = a.vm.id;
        // For `vinfra bench push` (target `latency`, off unless switched on): when a
        // change reached the VM's task, by the wall clock, to compare with the command's.
        tracing::debug!(target: "latency", vm = %id, desired = ?a.vm.desired, via, at_us = wall_us(), "routed to the vm task");
        let msg = Msg::Assigned(Box::new(a));
        match self.vms.get_mut(&id) {
            Some(h) if !h.is_finished() => h.route(msg),
            _ => {
                let phase = VmPhase::Stopped { note: None };
                let h = VmHandle::spawn(self.host.clone(), id, phase, msg);
                self.vms.insert(id, h);
            }
        }
    }

    /// Acts on one event pushed by the server; `true` when it asks for a full pass.
    fn pushed(&mut self, ev: model::api::HostEvent) -> bool {
        use model::api::HostEvent;
        match ev {
            HostEvent::Resync => {
                self.sync_tables();
                return true;
            }
            HostEvent::ResourceTables => self.sync_tables(),
            HostEvent::Assignment { assignment } => self.route(*assignment, "push"),
            HostEvent::Unassigned { vm } => {
                if let Some(h) = self.vms.get_mut(&vm) {
                    h.route(Msg::Unassigned);
                }
            }
            HostEvent::Ping => {}
            HostEvent::TerminalOperation { operation } => {
                let op = *operation;
                let refused = match self.vms.get(&op.vm) {
                    Some(h) => h
                        .operation(op)
                        .err()
                        .map(|op| (*op, "the VM's operation queue is full")),
                    None => Some((op, "the VM is not on this host")),
                };
                if let Some((op, why)) = refused {
                    let host = self.host.clone();
                    tokio::spawn(async move {
                        let result = terminal::refused(&host, why);
                        terminal::answer(&host, &op, result).await;
                    });
                }
            }
        }
        false
    }

    /// Asks the tables task to list this host's tables (a full queue already holds a
    /// sync).
    fn sync_tables(&self) {
        if let Some(tx) = &self.tables {
            let _ = tx.try_send(tables::Cmd::Sync);
        }
    }

    /// Stops every VM (each task reports its VM stopped) and waits for the tasks.
    async fn stop_all(&mut self) {
        let handles = std::mem::take(&mut self.vms);
        for h in handles.values() {
            h.shutdown();
        }
        for h in handles.into_values() {
            h.join().await;
        }
    }
}
