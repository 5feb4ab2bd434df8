//! The node agent: makes this host run what the control plane assigns to it.
//!
//! Owns: host registration and heartbeats, the set of VMs on this host (their run
//! dirs, disks and hypervisor processes), and the reconcile loop.
//! Must not depend on: the server's internals; it talks to the control plane only
//! through `client` (the REST API), so an agent on another machine works the same.
//!
//! Tasks: one heartbeat task (every `heartbeat`), and the reconcile loop, which alone
//! owns the VM table (no locks): every `poll` it fetches the host's assignments, plans
//! with [`reconcile::plan`] and executes the actions, then reports each VM's observed
//! state with its console tail.
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
mod hostinfo;
pub mod images;
pub mod linkrelay;
mod local;
mod migrate;
pub mod netdev;
#[allow(dead_code)]
mod push;
pub mod reconcile;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use client::Client;
use compute::{Accel, ComputeDriver, QemuDriver};
use model::api::{ObservedReport, RegisterHost, ReportedState};
use model::{DesiredState, VmId};

use crate::local::{LocalVm, VmFiles};
use crate::reconcile::{Action, Have, Want};

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
    /// Heartbeat period.
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
    /// What this host offers the scheduler; `None` measures the machine. Simulated hosts
    /// set it (50 of them share one laptop).
    pub resources: Option<HostResources>,
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
    std::fs::create_dir_all(cfg.data_dir.join(local::VMS_DIR)).map_err(|err| {
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
    tokio::select! {
        r = register(&client, &registration) => r?,
        _ = &mut shutdown => return Ok(()),
    }
    tracing::info!(host = %cfg.host_name, "registered");

    let hb = tokio::spawn(heartbeat_loop(client.clone(), registration, cfg.heartbeat));
    let mut agent = Agent {
        images: images::ImageFiles::new(&cfg.data_dir, client.clone()),
        cfg,
        client,
        driver,
        disks,
        vms: BTreeMap::new(),
        uplink: None,
    };
    agent.adopt_existing().await;
    loop {
        // While a migration is in flight the next step is usually due at once
        // (switch-over, progress): poll faster then.
        let pause = if agent.migrating() {
            agent.cfg.poll.min(Duration::from_millis(200))
        } else {
            agent.cfg.poll
        };
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(pause) => agent.reconcile_once().await,
        }
    }
    hb.abort();
    relay.abort();
    agent.stop_all().await;
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

/// Registers, retrying while the server is unreachable; a refusal (4xx) is final.
async fn register(client: &Client, req: &RegisterHost) -> Result<(), AgentError> {
    let mut delay = Duration::from_millis(100);
    loop {
        match client.register_host(req).await {
            Ok(_) => return Ok(()),
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

async fn heartbeat_loop(client: Client, registration: RegisterHost, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match client.heartbeat(&registration.name).await {
            Ok(_) => {}
            // The server forgot us (new store): register again.
            Err(e) if e.status() == Some(404) => {
                if let Err(e) = client.register_host(&registration).await {
                    tracing::warn!(error = %e, "re-registration failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

pub(crate) struct Agent {
    pub(crate) cfg: AgentConfig,
    pub(crate) client: Client,
    pub(crate) driver: Arc<dyn ComputeDriver>,
    pub(crate) disks: Arc<disks::DiskStack>,
    /// The image files of this host's VMs, fetched from the image store.
    pub(crate) images: images::ImageFiles,
    pub(crate) vms: BTreeMap<VmId, LocalVm>,
    /// The VXLAN uplink of VM networks, when this host has a data-network address.
    pub(crate) uplink: Option<netdev::Uplink>,
}

impl Agent {
    fn files(&self, id: VmId) -> VmFiles {
        VmFiles::new(&self.cfg.data_dir, id)
    }

    /// How VM NICs are plugged on this host.
    pub(crate) fn plumbing(&self) -> netdev::Plumbing<'_> {
        if self.cfg.host_network {
            netdev::Plumbing::Host(self.uplink.as_ref())
        } else {
            netdev::Plumbing::Off
        }
    }

    fn migrating(&self) -> bool {
        self.vms.values().any(|v| v.mig.is_some())
    }

    /// Re-attaches to VMs a previous agent process left running.
    async fn adopt_existing(&mut self) {
        for (id, files) in local::scan(&self.cfg.data_dir) {
            let mut vm = LocalVm::default();
            if self.driver.pidfile(files.run_dir()).exists() {
                match self.driver.adopt(&files.driver_id(), files.run_dir()).await {
                    Ok(rt) => {
                        tracing::info!(vm = %id, pid = rt.pid, "adopted running vm");
                        vm.running = true;
                    }
                    Err(e) => tracing::warn!(vm = %id, error = %e, "cannot adopt vm"),
                }
            }
            self.vms.insert(id, vm);
        }
    }

    /// Learns the other hosts' data-network addresses and points every VXLAN port of
    /// this host's bridges at them (hosts come and go).
    async fn refresh_uplink(&mut self) {
        let Some(local) = self.cfg.uplink_ip else {
            return;
        };
        let hosts = match self.client.list_hosts().await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list hosts for the uplink");
                return;
            }
        };
        let peers: Vec<std::net::Ipv4Addr> = hosts
            .iter()
            .filter(|h| h.name.as_str() != self.cfg.host_name)
            .filter(|h| h.state == model::HostState::Up)
            .filter_map(|h| h.uplink_ip.as_deref()?.parse().ok())
            .filter(|ip| *ip != local)
            .collect();
        let uplink = netdev::Uplink { local, peers };
        netdev::sync_uplinks(&uplink).await;
        self.uplink = Some(uplink);
    }

    async fn reconcile_once(&mut self) {
        self.refresh_uplink().await;
        let assignments = match self.client.assignments(&self.cfg.host_name).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch assignments");
                return;
            }
        };
        // Notice VMs whose hypervisor exited on its own (guest poweroff, crash).
        for (id, vm) in self.vms.iter_mut() {
            if vm.running {
                if let Ok(st) = self
                    .driver
                    .status(&VmFiles::new(&self.cfg.data_dir, *id).driver_id())
                    .await
                {
                    if st.is_exited() {
                        tracing::info!(vm = %id, status = ?st, "vm exited");
                        vm.running = false;
                        vm.exit_note = Some(format!("{st:?}"));
                    }
                }
            }
        }
        let mut wanted = BTreeMap::new();
        let mut specs = BTreeMap::new();
        let mut migrations = Vec::new();
        // VMs whose life here is driven by a migration, not by the plain planner: a
        // destination before switch-over, a source after it (or after QEMU moved it).
        let mut by_migration = std::collections::BTreeSet::new();
        for a in assignments {
            if let Some(m) = a.migration.clone() {
                let here = a.vm.host.as_str() == self.cfg.host_name;
                let moved_away = self
                    .vms
                    .get(&a.vm.id)
                    .and_then(|v| v.mig.as_ref())
                    .is_some_and(|x| x.migrated_away);
                let incoming = m.to_host.as_str() == self.cfg.host_name;
                migrations.push((a.clone(), m));
                if !here || moved_away || incoming {
                    by_migration.insert(a.vm.id);
                    continue;
                }
            }
            let want = match a.vm.desired {
                DesiredState::Running => Want::Running,
                DesiredState::Stopped => Want::Stopped,
                DesiredState::Deleted => Want::Deleted,
            };
            // A new desired state clears a failure at once, so the user can retry; time
            // clears it too (a transient cause).
            if let Some(vm) = self.vms.get_mut(&a.vm.id) {
                let retry = vm
                    .failed_at
                    .is_some_and(|t| t.elapsed() >= local::RETRY_FAILED_AFTER);
                if retry || vm.failed.as_ref().is_some_and(|(d, _)| *d != a.vm.desired) {
                    vm.failed = None;
                    vm.failed_at = None;
                }
            }
            wanted.insert(a.vm.id, want);
            specs.insert(a.vm.id, a);
        }
        let have: BTreeMap<VmId, Have> = self
            .vms
            .iter()
            .filter(|(id, _)| !by_migration.contains(id))
            .map(|(id, vm)| (*id, vm.have()))
            .collect();
        for action in reconcile::plan(&wanted, &have) {
            self.execute(action, &specs).await;
        }
        self.reattach_adopted(&specs).await;
        for (a, m) in &migrations {
            self.migration_step(a, m).await;
        }
        // A migration that ended (vm.migration cleared) leaves no trace here; a source
        // that paused its guest for a full copy that then failed resumes it.
        let mut resume = Vec::new();
        for (id, vm) in self.vms.iter_mut() {
            if !migrations.iter().any(|(a, _)| a.vm.id == *id) {
                if let Some(x) = vm.mig.take() {
                    if let Some(r) = x.rebuild {
                        r.cancel();
                    }
                    if x.paused_at.is_some() && !x.migrated_away {
                        resume.push(*id);
                    }
                }
            }
        }
        for id in resume {
            let files = self.files(id);
            match self.driver.resume(&files.driver_id()).await {
                Ok(()) => tracing::info!(vm = %id, "migration ended here: guest resumed"),
                Err(e) => tracing::error!(vm = %id, error = %e, "cannot resume the guest"),
            }
        }
        for (id, a) in &specs {
            if a.vm.desired != DesiredState::Deleted {
                self.report(*id).await;
            }
        }
        // A destination after switch-over runs the VM: it reports it.
        for (a, _) in &migrations {
            if a.vm.host.as_str() == self.cfg.host_name && !specs.contains_key(&a.vm.id) {
                self.report(a.vm.id).await;
            }
        }
    }

    async fn execute(
        &mut self,
        action: Action<VmId>,
        specs: &BTreeMap<VmId, model::api::Assignment>,
    ) {
        match action {
            Action::Start(id) => {
                let Some(a) = specs.get(&id) else { return };
                let files = self.files(id);
                self.send(id, ReportedState::Starting, None).await;
                let mut vm = self.vms.remove(&id).unwrap_or_default();
                let result = local::start(
                    self.driver.as_ref(),
                    &self.disks,
                    &self.images,
                    &files,
                    a,
                    self.cfg.accel,
                    self.plumbing(),
                    &mut vm,
                )
                .await;
                let vm = self.vms.entry(id).or_insert(vm);
                match result {
                    Ok(()) => {
                        tracing::info!(vm = %id, name = %a.vm.name, "vm started");
                        vm.running = true;
                        vm.exit_note = None;
                    }
                    Err(e) => {
                        let reason = model::error_chain(&e);
                        tracing::error!(vm = %id, error = %reason, "vm failed to start");
                        vm.running = false;
                        vm.failed = Some((a.vm.desired, reason));
                        vm.failed_at = Some(std::time::Instant::now());
                    }
                }
            }
            Action::Stop(id) => {
                self.send(id, ReportedState::Stopping, None).await;
                let files = self.files(id);
                if let Some(vm) = self.vms.get_mut(&id) {
                    local::stop(self.driver.as_ref(), &self.disks, &files, vm).await;
                }
            }
            Action::Destroy(id) => {
                let files = self.files(id);
                let mut vm = self.vms.remove(&id).unwrap_or_default();
                local::stop(self.driver.as_ref(), &self.disks, &files, &mut vm).await;
                if let Err(e) = files.remove() {
                    tracing::warn!(vm = %id, error = %e, "cannot remove vm files");
                }
                // The VM is gone for good: its disk too.
                self.disks.remove_origin(id);
                self.send(id, ReportedState::Deleted, None).await;
                tracing::info!(vm = %id, "vm deleted");
            }
            Action::DropOrphan(id) => {
                let files = self.files(id);
                let mut vm = self.vms.remove(&id).unwrap_or_default();
                local::stop(self.driver.as_ref(), &self.disks, &files, &mut vm).await;
                if let Err(e) = files.remove() {
                    tracing::warn!(vm = %id, error = %e, "cannot remove orphan vm files");
                }
                tracing::info!(vm = %id, "removed a vm no longer assigned to this host");
            }
        }
    }

    /// Serves the disks of adopted VMs again: their hypervisors kept running through
    /// the agent's restart, but the disk server (and the caches) restarted with it.
    async fn reattach_adopted(&mut self, specs: &BTreeMap<VmId, model::api::Assignment>) {
        for (id, a) in specs {
            let Some(mut vm) = self.vms.remove(id) else {
                continue;
            };
            if vm.running && vm.cache.is_none() {
                let files = self.files(*id);
                match local::reattach(&self.disks, &self.images, &files, a, &mut vm).await {
                    Ok(()) => tracing::info!(vm = %id, "disk of an adopted vm served again"),
                    Err(e) => {
                        tracing::warn!(vm = %id, error = %model::error_chain(&e), "cannot serve the disk of an adopted vm")
                    }
                }
            }
            self.vms.insert(*id, vm);
        }
    }

    /// Reports a VM's state with its console tail.
    async fn report(&mut self, id: VmId) {
        let Some(vm) = self.vms.get(&id) else {
            return;
        };
        let (state, error) = match (&vm.failed, vm.running) {
            (Some((_, reason)), _) => (ReportedState::Failed, Some(reason.clone())),
            (None, true) => (ReportedState::Running, None),
            (None, false) => (ReportedState::Stopped, vm.exit_note.clone()),
        };
        self.send(id, state, error).await;
    }

    async fn send(&mut self, id: VmId, state: ReportedState, error: Option<String>) {
        let files = self.files(id);
        let console_tail = files.console_tail(16 * 1024);
        let report = ObservedReport {
            host: self.cfg.host_name.clone(),
            state,
            error,
            console_tail,
        };
        // Skip identical reports: the console tail changes while a guest runs, so a
        // running VM is still reported every pass, an idle one is not.
        if let Some(vm) = self.vms.get_mut(&id) {
            if vm.last_report.as_ref() == Some(&report) {
                return;
            }
            vm.last_report = Some(report.clone());
        }
        if let Err(e) = self.client.report_observed(id, &report).await {
            tracing::warn!(vm = %id, error = %e, "cannot report observed state");
        }
    }

    async fn stop_all(&mut self) {
        let ids: Vec<VmId> = self.vms.keys().copied().collect();
        for id in ids {
            let files = self.files(id);
            if let Some(vm) = self.vms.get_mut(&id) {
                // Also a VM whose state we lost track of: `stop` checks the pidfile.
                if vm.running || self.driver.pidfile(files.run_dir()).exists() {
                    tracing::info!(vm = %id, "stopping vm: agent shutting down");
                    local::stop(self.driver.as_ref(), &self.disks, &files, vm).await;
                    self.send(
                        id,
                        ReportedState::Stopped,
                        Some("host agent shut down".into()),
                    )
                    .await;
                }
            }
        }
    }
}
