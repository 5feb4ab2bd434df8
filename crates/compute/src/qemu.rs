//! The `qemu` compute driver: one `qemu-system-x86_64` process per VM, driven over QMP.
//!
//! Per VM, in its run dir: `console.log` (serial), `qmp.sock`, `qemu.pid` (written by QEMU),
//! `qemu.log` (QEMU's own stdout/stderr) and `vm.json` (what [`QemuDriver::adopt`] needs).
//! QEMU runs in its own process group so that a Ctrl-C aimed at the agent does not kill
//! the VMs: VMs outlive the agent, and a restarted agent adopts them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::qmp::{MigrationParameters, QmpClient, QmpEvent};
use crate::{
    proc, Accel, ComputeDriver, ComputeError, DiskTarget, MigrateOptions, MigrationStats,
    VmRuntime, VmSpec, VmStatus,
};

/// Longest unix socket path (sun_path is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;
const START_TIMEOUT: Duration = Duration::from_secs(15);
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
const RECORD_FORMAT: u32 = 1;

/// Seconds QEMU keeps retrying a lost NBD connection before failing guest I/O: the
/// disk server (the host's block cache) restarts with its agent, and a guest must ride
/// through that rather than see I/O errors.
pub const NBD_RECONNECT_DELAY_S: u32 = 30;

/// File names inside a VM's run dir.
pub mod files {
    /// Serial console log.
    pub const CONSOLE: &str = "console.log";
    /// QMP socket.
    pub const QMP: &str = "qmp.sock";
    /// Pidfile written by QEMU.
    pub const PID: &str = "qemu.pid";
    /// QEMU's stdout and stderr.
    pub const LOG: &str = "qemu.log";
    /// Our record for adoption.
    pub const RECORD: &str = "vm.json";
    /// The guest's control port (virtio-serial `vinfra.link`, a unix socket QEMU serves)
    /// for VMs with NICs: the agent drives link establishment between VNF connection points
    /// through it.
    pub const LINK: &str = "link.sock";
}

/// What a restarted agent needs to re-attach (`vm.json`).
#[derive(Debug, Serialize, Deserialize)]
struct VmRecord {
    format: u32,
    id: String,
    pid: u32,
    accel: Accel,
}

/// The QEMU driver. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct QemuDriver {
    binary: PathBuf,
    quit_timeout: Duration,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
    /// Ids with a start or adoption in progress.
    starting: Mutex<std::collections::HashSet<String>>,
}

#[derive(Debug)]
struct Reservation<'a> {
    drv: &'a QemuDriver,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.drv
            .starting
            .lock()
            .expect("starting lock poisoned")
            .remove(&self.id);
    }
}

/// What the VM's watcher and the driver both see.
#[derive(Debug, Default)]
struct Shared {
    /// Why we are stopping it, set before an intended quit so the exit reads as orderly.
    stop_note: Mutex<Option<String>>,
    /// QEMU's timestamp of the last `RESUME` event (µs since the epoch).
    resumed_at_us: Mutex<Option<i64>>,
}

#[derive(Debug)]
struct Vm {
    id: String,
    run_dir: PathBuf,
    pid: u32,
    accel: Accel,
    incoming: Option<SocketAddr>,
    /// Adopted VMs are not our children: no exit status, and their pid must be re-checked
    /// before a kill (it could have been reused).
    adopted: bool,
    qmp: QmpClient,
    /// `Some` once the process is gone.
    exit: watch::Receiver<Option<VmStatus>>,
    /// Shared with the watcher.
    shared: Arc<Shared>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        // The VM outlives us; only the watching stops (and with it our QMP connection, so
        // that the next agent can connect).
        self.watcher.abort();
    }
}

impl Vm {
    fn runtime(&self) -> VmRuntime {
        VmRuntime {
            id: self.id.clone(),
            pid: self.pid,
            accel: self.accel,
            console_log: self.run_dir.join(files::CONSOLE),
            qmp_socket: self.run_dir.join(files::QMP),
            run_dir: self.run_dir.clone(),
            incoming: self.incoming,
        }
    }

    fn exited(&self) -> Option<VmStatus> {
        self.exit.borrow().clone()
    }

    async fn wait_exit(&self, timeout: Duration) -> Option<VmStatus> {
        let mut rx = self.exit.clone();
        let r = tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await;
        match r {
            Ok(Ok(v)) => v.clone(),
            _ => self.exited(),
        }
    }

    fn note(&self, why: &str) {
        let mut n = self
            .shared
            .stop_note
            .lock()
            .expect("stop note lock poisoned");
        if n.is_none() {
            *n = Some(why.to_owned());
        }
    }
}

impl Default for QemuDriver {
    fn default() -> Self {
        Self::new()
    }
}

impl QemuDriver {
    /// A driver running `qemu-system-x86_64` from `PATH`.
    pub fn new() -> Self {
        Self::with_binary("qemu-system-x86_64")
    }

    /// A driver running the given QEMU binary.
    pub fn with_binary(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            quit_timeout: Duration::from_secs(5),
            vms: Mutex::new(HashMap::new()),
            starting: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// The QMP connection of a live VM, to send other commands or watch events. Do not
    /// open a second connection to its socket: QEMU serves one client at a time.
    pub fn qmp(&self, id: &str) -> Result<QmpClient, ComputeError> {
        Ok(self.get(id)?.qmp.clone())
    }

    /// Runtime facts about a known VM.
    pub fn runtime(&self, id: &str) -> Result<VmRuntime, ComputeError> {
        Ok(self.get(id)?.runtime())
    }

    /// QEMU's timestamp (µs since the epoch) of the VM's last `RESUME` event, if any. On a
    /// migration destination this is the end of the switch-over: minus the source's
    /// [`MigrationStats::source_stopped_at_us`] it gives the downtime as the host saw it.
    pub fn resumed_at_us(&self, id: &str) -> Result<Option<i64>, ComputeError> {
        let vm = self.get(id)?;
        let t = *vm
            .shared
            .resumed_at_us
            .lock()
            .expect("resume lock poisoned");
        Ok(t)
    }

    fn get(&self, id: &str) -> Result<Arc<Vm>, ComputeError> {
        self.vms
            .lock()
            .expect("vm table lock poisoned")
            .get(id)
            .cloned()
            .ok_or_else(|| ComputeError::NotFound { id: id.to_owned() })
    }

    /// Claims `id` for a start or adoption in progress, so that two concurrent starts of
    /// one VM cannot both spawn a QEMU. Released when the returned guard drops.
    fn reserve(&self, id: &str) -> Result<Reservation<'_>, ComputeError> {
        let vms = self.vms.lock().expect("vm table lock poisoned");
        let mut busy = self.starting.lock().expect("starting lock poisoned");
        let running = vms.get(id).is_some_and(|vm| vm.exited().is_none());
        if running || !busy.insert(id.to_owned()) {
            return Err(ComputeError::AlreadyRunning { id: id.into() });
        }
        Ok(Reservation {
            drv: self,
            id: id.to_owned(),
        })
    }

    #[tracing::instrument(skip_all, fields(vm = %spec.id, incoming = ?incoming.as_ref().map(|i| i.0)))]
    async fn launch(
        &self,
        spec: &VmSpec,
        incoming: Option<(SocketAddr, Option<crate::MigrationTls>)>,
    ) -> Result<VmRuntime, ComputeError> {
        validate(spec)?;
        let _claim = self.reserve(&spec.id)?;
        let accel = spec.accel.resolve();
        if spec.accel == Accel::Kvm && !crate::kvm_usable() {
            return Err(invalid(
                spec,
                "accel Kvm asked for but /dev/kvm is not usable",
            ));
        }
        let run_dir = std::path::absolute(&spec.run_dir).map_err(|err| ComputeError::Io {
            action: "resolve run dir",
            path: spec.run_dir.clone(),
            err,
        })?;
        let qmp_path = run_dir.join(files::QMP);
        check_socket_path(&qmp_path)?;
        std::fs::create_dir_all(&run_dir).map_err(|err| ComputeError::Io {
            action: "create run dir",
            path: run_dir.clone(),
            err,
        })?;
        // A QEMU from before an agent restart may still own this run dir.
        if let Ok(pid) = read_pid(&run_dir) {
            if owns_run_dir(pid, &qmp_path) {
                return Err(ComputeError::AlreadyRunning {
                    id: spec.id.clone(),
                });
            }
        }
        for f in [files::QMP, files::PID, files::RECORD] {
            remove_if_exists(&run_dir.join(f))?;
        }
        let args = qemu_args(spec, accel, &run_dir, incoming.is_some())?;
        let log_path = run_dir.join(files::LOG);
        let log = std::fs::File::create(&log_path).map_err(|err| ComputeError::Io {
            action: "create",
            path: log_path.clone(),
            err,
        })?;
        let log2 = log.try_clone().map_err(|err| ComputeError::Io {
            action: "dup",
            path: log_path.clone(),
            err,
        })?;
        let t0 = Instant::now();
        let mut child = tokio::process::Command::new(&self.binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|err| ComputeError::Spawn {
                binary: self.binary.clone(),
                err,
            })?;
        let pid = child.id().ok_or_else(|| ComputeError::StartFailed {
            id: spec.id.clone(),
            status: "exited immediately".into(),
            log_tail: log_tail(&log_path),
        })?;
        tracing::debug!(pid, ?accel, "qemu spawned");

        let attached = async {
            let qmp = connect_child(&spec.id, &mut child, &qmp_path, &log_path).await?;
            let events = qmp.subscribe();
            let incoming = match incoming {
                Some((listen, tls)) => {
                    Some(listen_incoming(&spec.id, &qmp, listen, tls.as_ref()).await?)
                }
                None => None,
            };
            write_record(
                &run_dir,
                &VmRecord {
                    format: RECORD_FORMAT,
                    id: spec.id.clone(),
                    pid,
                    accel,
                },
            )?;
            Ok::<_, ComputeError>((qmp, events, incoming))
        }
        .await;
        let (qmp, events, incoming) = match attached {
            Ok(v) => v,
            Err(e) => {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                return Err(e);
            }
        };

        let (exit_tx, exit) = watch::channel(None);
        let shared = Arc::new(Shared::default());
        let watcher = tokio::spawn(watch_child(
            child,
            events,
            shared.clone(),
            exit_tx,
            log_path,
        ));
        let vm = Arc::new(Vm {
            id: spec.id.clone(),
            run_dir,
            pid,
            accel,
            incoming,
            adopted: false,
            qmp,
            exit,
            shared,
            watcher,
        });
        let rt = vm.runtime();
        self.vms
            .lock()
            .expect("vm table lock poisoned")
            .insert(spec.id.clone(), vm);
        tracing::info!(
            pid,
            ?accel,
            elapsed_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
            "vm started"
        );
        Ok(rt)
    }
}

#[async_trait::async_trait]
impl ComputeDriver for QemuDriver {
    async fn pause(&self, id: &str) -> Result<(), ComputeError> {
        let qmp = self.qmp(id)?;
        qmp.stop().await.map_err(|err| ComputeError::Qmp {
            id: id.to_owned(),
            err,
        })
    }

    async fn resume(&self, id: &str) -> Result<(), ComputeError> {
        let qmp = self.qmp(id)?;
        qmp.cont().await.map_err(|err| ComputeError::Qmp {
            id: id.to_owned(),
            err,
        })
    }

    fn name(&self) -> &'static str {
        "qemu"
    }

    fn pidfile(&self, run_dir: &Path) -> PathBuf {
        run_dir.join(files::PID)
    }

    async fn start(&self, spec: &VmSpec) -> Result<VmRuntime, ComputeError> {
        self.launch(spec, None).await
    }

    #[tracing::instrument(skip(self), fields(vm = %id))]
    async fn stop(&self, id: &str) -> Result<VmStatus, ComputeError> {
        let vm = self.get(id)?;
        if let Some(st) = vm.exited() {
            return Ok(st);
        }
        vm.note("stopped by request");
        if let Err(e) = vm
            .qmp
            .execute_timeout("quit", None, self.quit_timeout)
            .await
        {
            tracing::debug!(error = %e, "quit not acknowledged");
        }
        if let Some(st) = vm.wait_exit(self.quit_timeout).await {
            tracing::info!(status = ?st, "vm stopped");
            return Ok(st);
        }
        tracing::warn!(pid = vm.pid, "qemu ignored quit, killing it");
        // An adopted pid could in theory have been recycled: only kill our QEMU.
        if !vm.adopted || owns_run_dir(vm.pid, &vm.run_dir.join(files::QMP)) {
            proc::kill9(vm.pid).map_err(|err| ComputeError::Io {
                action: "kill qemu of",
                path: vm.run_dir.clone(),
                err,
            })?;
        }
        vm.wait_exit(Duration::from_secs(10))
            .await
            .ok_or_else(|| ComputeError::Timeout {
                id: id.to_owned(),
                what: "qemu to exit after SIGKILL",
            })
    }

    async fn status(&self, id: &str) -> Result<VmStatus, ComputeError> {
        let vm = self.get(id)?;
        if let Some(st) = vm.exited() {
            return Ok(st);
        }
        match vm
            .qmp
            .execute_timeout("query-status", None, QMP_TIMEOUT)
            .await
        {
            Ok(v) => {
                let st: crate::qmp::RunStatus =
                    serde_json::from_value(v).map_err(|err| ComputeError::Qmp {
                        id: id.to_owned(),
                        err: crate::qmp::QmpError::Decode {
                            command: "query-status".into(),
                            err,
                        },
                    })?;
                Ok(if st.running {
                    VmStatus::Running
                } else {
                    VmStatus::Paused { state: st.status }
                })
            }
            // QEMU may be exiting: its watcher will say how.
            Err(err) => match vm.wait_exit(Duration::from_secs(3)).await {
                Some(st) => Ok(st),
                None => Err(ComputeError::Qmp {
                    id: id.to_owned(),
                    err,
                }),
            },
        }
    }

    fn console_path(&self, id: &str) -> Result<PathBuf, ComputeError> {
        Ok(self.get(id)?.run_dir.join(files::CONSOLE))
    }

    #[tracing::instrument(skip(self), fields(vm = %id))]
    async fn adopt(&self, id: &str, run_dir: &Path) -> Result<VmRuntime, ComputeError> {
        let _claim = self.reserve(id)?;
        let run_dir = std::path::absolute(run_dir).map_err(|err| ComputeError::Io {
            action: "resolve run dir",
            path: run_dir.to_owned(),
            err,
        })?;
        let fail = |reason: String| ComputeError::Adopt {
            id: id.to_owned(),
            run_dir: run_dir.clone(),
            reason,
        };
        let rec_path = run_dir.join(files::RECORD);
        let rec: VmRecord = std::fs::read(&rec_path)
            .map_err(|e| format!("cannot read {}: {e}", rec_path.display()))
            .and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| format!("bad {}: {e}", rec_path.display()))
            })
            .map_err(fail)?;
        if rec.format != RECORD_FORMAT || rec.id != id {
            return Err(fail(format!(
                "record is for vm {} (format {})",
                rec.id, rec.format
            )));
        }
        let qmp_path = run_dir.join(files::QMP);
        let pid = read_pid(&run_dir).unwrap_or(rec.pid);
        if !owns_run_dir(pid, &qmp_path) {
            return Err(fail(format!("qemu pid {pid} is not running")));
        }
        let qmp = QmpClient::connect(&qmp_path, QMP_TIMEOUT)
            .await
            .map_err(|e| fail(format!("qmp: {e}")))?;
        let events = qmp.subscribe();
        let (exit_tx, exit) = watch::channel(None);
        let shared = Arc::new(Shared::default());
        let watcher = tokio::spawn(watch_adopted(
            pid,
            qmp.clone(),
            events,
            shared.clone(),
            exit_tx,
        ));
        let vm = Arc::new(Vm {
            id: id.to_owned(),
            run_dir,
            pid,
            accel: rec.accel,
            incoming: None,
            adopted: true,
            qmp,
            exit,
            shared,
            watcher,
        });
        let rt = vm.runtime();
        self.vms
            .lock()
            .expect("vm table lock poisoned")
            .insert(id.to_owned(), vm);
        tracing::info!(pid, "vm adopted");
        Ok(rt)
    }

    async fn start_incoming(
        &self,
        spec: &VmSpec,
        listen: SocketAddr,
        tls: Option<&crate::MigrationTls>,
    ) -> Result<VmRuntime, ComputeError> {
        self.launch(spec, Some((listen, tls.cloned()))).await
    }

    #[tracing::instrument(skip(self, opts), fields(vm = %id, to = %to_uri))]
    async fn migrate(
        &self,
        id: &str,
        to_uri: &str,
        opts: &MigrateOptions,
    ) -> Result<MigrationStats, ComputeError> {
        let vm = self.get(id)?;
        let qmp_err = |err| ComputeError::Qmp {
            id: id.to_owned(),
            err,
        };
        qmp_set_events(&vm.qmp).await.map_err(qmp_err)?;
        if let Some(t) = &opts.tls {
            vm.qmp
                .add_tls_creds(crate::MIGRATION_TLS_ID, &t.dir, "client")
                .await
                .map_err(qmp_err)?;
        }
        let params = MigrationParameters {
            downtime_limit: opts.downtime_limit_ms,
            max_bandwidth: opts.max_bandwidth,
            tls_creds: opts
                .tls
                .as_ref()
                .map(|_| crate::MIGRATION_TLS_ID.to_owned()),
            tls_hostname: opts.tls.as_ref().map(|t| t.peer_name.clone()),
        };
        if params != MigrationParameters::default() {
            vm.qmp
                .migrate_set_parameters(&params)
                .await
                .map_err(qmp_err)?;
        }
        let mut events = vm.qmp.subscribe();
        let t0 = Instant::now();
        tracing::info!("migration started");
        vm.qmp.migrate(to_uri).await.map_err(qmp_err)?;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut polls = 0u32;
        let info = loop {
            tick.tick().await;
            polls += 1;
            let info = vm.qmp.query_migrate().await.map_err(qmp_err)?;
            match info.status.as_deref() {
                Some("completed") => break info,
                Some(s @ ("failed" | "cancelled")) => {
                    return Err(ComputeError::MigrationFailed {
                        id: id.to_owned(),
                        status: s.to_owned(),
                        desc: info.error_desc.unwrap_or_default(),
                    })
                }
                _ if t0.elapsed() > opts.timeout => {
                    if let Err(e) = vm.qmp.migrate_cancel().await {
                        tracing::warn!(error = %e, "migrate_cancel failed");
                    }
                    return Err(ComputeError::Timeout {
                        id: id.to_owned(),
                        what: "migration to complete",
                    });
                }
                _ => {}
            }
        };
        let wall_time = t0.elapsed();
        let mut source_stopped_at_us = None;
        while let Ok(ev) = events.try_recv() {
            if ev.name == "STOP" {
                source_stopped_at_us = ev.timestamp.map(|t| t.as_micros());
            }
        }
        let ram = info.ram.unwrap_or_default();
        let stats = MigrationStats {
            total_time_ms: info.total_time.unwrap_or_default(),
            downtime_ms: info.downtime.unwrap_or_default(),
            setup_time_ms: info.setup_time.unwrap_or_default(),
            ram_transferred_bytes: ram.transferred,
            ram_total_bytes: ram.total,
            dirty_sync_count: ram.dirty_sync_count,
            wall_time,
            source_stopped_at_us,
            polls,
        };
        tracing::info!(
            total_ms = stats.total_time_ms,
            downtime_ms = stats.downtime_ms,
            ram_bytes = stats.ram_transferred_bytes,
            "migration completed"
        );
        if opts.quit_source {
            vm.note(&format!("migrated to {to_uri}"));
            // The guest already runs on the destination: a source that will not quit is
            // a leftover paused process (status shows `postmigrate`), not a failed migration.
            if let Err(e) = self.stop(id).await {
                tracing::warn!(error = %e, "source qemu did not quit after migration");
            }
        }
        Ok(stats)
    }
}

async fn qmp_set_events(qmp: &QmpClient) -> Result<(), crate::QmpError> {
    qmp.migrate_set_capabilities(&[("events", true)]).await
}

/// Waits for QEMU's QMP socket and connects, failing early if QEMU exits.
async fn connect_child(
    id: &str,
    child: &mut tokio::process::Child,
    qmp_path: &Path,
    log_path: &Path,
) -> Result<QmpClient, ComputeError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ComputeError::StartFailed {
                id: id.to_owned(),
                status: describe_exit(status),
                log_tail: log_tail(log_path),
            });
        }
        // QEMU greets once its main loop runs, after opening the disk: on a loaded host
        // that can take a while, so the greeting may use the rest of the start budget.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        match QmpClient::connect(qmp_path, left).await {
            Ok(q) => return Ok(q),
            Err(crate::QmpError::Connect { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => {
                return Err(ComputeError::Qmp {
                    id: id.to_owned(),
                    err,
                })
            }
        }
    }
}

/// Starts listening for the migration stream and returns the address QEMU listens on.
async fn listen_incoming(
    id: &str,
    qmp: &QmpClient,
    listen: SocketAddr,
    tls: Option<&crate::MigrationTls>,
) -> Result<SocketAddr, ComputeError> {
    let qmp_err = |err| ComputeError::Qmp {
        id: id.to_owned(),
        err,
    };
    if let Some(t) = tls {
        qmp.add_tls_creds(crate::MIGRATION_TLS_ID, &t.dir, "server")
            .await
            .map_err(qmp_err)?;
        qmp.migrate_set_parameters(&MigrationParameters {
            tls_creds: Some(crate::MIGRATION_TLS_ID.to_owned()),
            ..MigrationParameters::default()
        })
        .await
        .map_err(qmp_err)?;
    }
    // `-incoming defer` + migrate-incoming rather than `-incoming tcp:..`: a busy port then
    // comes back as a QMP error instead of a dead QEMU, and port 0 works (QEMU reports it).
    qmp_set_events(qmp).await.map_err(qmp_err)?;
    let uri = match listen {
        SocketAddr::V4(a) => format!("tcp:{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("tcp:[{}]:{}", a.ip(), a.port()),
    };
    qmp.migrate_incoming(&uri).await.map_err(qmp_err)?;
    let info = qmp.query_migrate().await.map_err(qmp_err)?;
    let port = info
        .socket_address
        .as_ref()
        .and_then(|l| l.first())
        .and_then(|a| match &a["port"] {
            serde_json::Value::String(s) => s.parse::<u16>().ok(),
            v => v.as_u64().and_then(|p| u16::try_from(p).ok()),
        });
    match port {
        Some(p) => Ok(SocketAddr::new(listen.ip(), p)),
        None if listen.port() != 0 => Ok(listen),
        None => Err(ComputeError::StartFailed {
            id: id.to_owned(),
            status: "running".into(),
            log_tail: "qemu did not report its incoming migration port".into(),
        }),
    }
}

#[derive(Debug, Default)]
struct Observed {
    shutdown_reason: Option<String>,
    panicked: bool,
}

impl Observed {
    fn see(&mut self, ev: &QmpEvent, shared: &Shared) {
        match ev.name.as_str() {
            "RESUME" => {
                *shared.resumed_at_us.lock().expect("resume lock poisoned") =
                    ev.timestamp.map(|t| t.as_micros());
            }
            "SHUTDOWN" => {
                self.shutdown_reason = ev.data["reason"].as_str().map(str::to_owned);
            }
            "GUEST_PANICKED" => self.panicked = true,
            _ => {}
        }
    }
}

/// Reaps our QEMU child and records why it exited.
async fn watch_child(
    mut child: tokio::process::Child,
    mut events: broadcast::Receiver<QmpEvent>,
    shared: Arc<Shared>,
    exit: watch::Sender<Option<VmStatus>>,
    log_path: PathBuf,
) {
    let mut seen = Observed::default();
    let mut events_open = true;
    let status = loop {
        tokio::select! {
            st = child.wait() => break st.ok(),
            ev = events.recv(), if events_open => match ev {
                Ok(ev) => seen.see(&ev, &shared),
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => events_open = false,
            },
        }
    };
    // SHUTDOWN precedes the exit but may still sit in the channel.
    while let Ok(ev) = events.try_recv() {
        seen.see(&ev, &shared);
    }
    let note = shared
        .stop_note
        .lock()
        .expect("stop note lock poisoned")
        .clone();
    let st = classify(
        status.map(Some).unwrap_or(None),
        &seen,
        note,
        &log_tail(&log_path),
    );
    tracing::info!(status = ?st, "qemu exited");
    exit.send_replace(Some(st));
}

/// Watches an adopted QEMU (not our child: no exit status) until it is gone.
async fn watch_adopted(
    pid: u32,
    qmp: QmpClient,
    mut events: broadcast::Receiver<QmpEvent>,
    shared: Arc<Shared>,
    exit: watch::Sender<Option<VmStatus>>,
) {
    let mut seen = Observed::default();
    loop {
        tokio::select! {
            _ = qmp.closed() => break,
            ev = events.recv() => match ev {
                Ok(ev) => seen.see(&ev, &shared),
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    while let Ok(ev) = events.try_recv() {
        seen.see(&ev, &shared);
    }
    // The monitor closes as QEMU exits; the process may linger a moment.
    while !proc::wait_gone(pid, Duration::from_secs(1)).await {}
    let note = shared
        .stop_note
        .lock()
        .expect("stop note lock poisoned")
        .clone();
    let st = classify(None, &seen, note, "");
    tracing::info!(status = ?st, "adopted qemu exited");
    exit.send_replace(Some(st));
}

fn describe_exit(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => st.to_string(),
    }
}

fn shutdown_text(reason: &str) -> String {
    match reason {
        "guest-shutdown" => "guest powered off".into(),
        "host-qmp-quit" => "quit over qmp".into(),
        "host-signal" => "qemu got a termination signal".into(),
        "guest-reset" => "guest reset".into(),
        other => format!("qemu shut down ({other})"),
    }
}

/// Turns what we know about an exit into a status. `exit` is `None` for adopted processes.
fn classify(
    exit: Option<ExitStatus>,
    seen: &Observed,
    note: Option<String>,
    tail: &str,
) -> VmStatus {
    if seen.panicked || seen.shutdown_reason.as_deref() == Some("guest-panic") {
        return VmStatus::Crashed {
            reason: "guest panicked".into(),
        };
    }
    let orderly = note
        .clone()
        .or_else(|| seen.shutdown_reason.as_deref().map(shutdown_text));
    let with_tail = |s: String| {
        if tail.is_empty() {
            s
        } else {
            format!("{s}: {tail}")
        }
    };
    match exit {
        Some(st) if st.success() => VmStatus::Stopped {
            reason: orderly.unwrap_or_else(|| "qemu exited".into()),
        },
        // We killed it after a quit timeout: still the stop that was asked for.
        Some(st) if note.is_some() => VmStatus::Stopped {
            reason: format!("{} ({})", note.unwrap_or_default(), describe_exit(st)),
        },
        Some(st) => VmStatus::Crashed {
            reason: with_tail(format!("qemu died ({})", describe_exit(st))),
        },
        None => match orderly {
            Some(reason) => VmStatus::Stopped { reason },
            // Every orderly QEMU exit emits SHUTDOWN first; without one it was killed.
            None => VmStatus::Crashed {
                reason: "qemu exited without shutting down (adopted: exit status unknown)".into(),
            },
        },
    }
}

fn invalid(spec: &VmSpec, reason: impl Into<String>) -> ComputeError {
    ComputeError::InvalidSpec {
        id: spec.id.clone(),
        reason: reason.into(),
    }
}

/// Checks a spec the way QEMU would refuse it (the sim driver refuses the same specs).
pub(crate) fn validate(spec: &VmSpec) -> Result<(), ComputeError> {
    let id_ok = !spec.id.is_empty()
        && spec.id.len() <= 64
        && spec
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !id_ok {
        return Err(invalid(spec, "id must be 1-64 bytes of [A-Za-z0-9._-]"));
    }
    if !(1..=64).contains(&spec.vcpus) {
        return Err(invalid(spec, "vcpus must be 1..=64"));
    }
    if !(16..=65536).contains(&spec.memory_mib) {
        return Err(invalid(spec, "memory_mib must be 16..=65536"));
    }
    for (what, p) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
        if !p.is_file() {
            return Err(invalid(
                spec,
                format!("{what} {} is not a file", p.display()),
            ));
        }
    }
    for (i, n) in spec.nics.iter().enumerate() {
        let tap_ok = !n.tap.is_empty()
            && n.tap.len() <= 15
            && n.tap
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !tap_ok {
            return Err(invalid(
                spec,
                format!("nics[{i}].tap must be 1-15 bytes of [a-z0-9-]"),
            ));
        }
        let mac_ok = n.mac.len() == 17
            && n.mac.split(':').count() == 6
            && n.mac
                .split(':')
                .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
        if !mac_ok {
            return Err(invalid(
                spec,
                format!("nics[{i}].mac '{}' is not xx:xx:xx:xx:xx:xx", n.mac),
            ));
        }
    }
    match &spec.disk {
        DiskTarget::NbdTcp { host, port, export } => {
            if host.is_empty() || *port == 0 || export.is_empty() {
                return Err(invalid(spec, "nbd tcp disk needs host, port and export"));
            }
        }
        DiskTarget::NbdUnix { path, export } => {
            check_socket_path(path)?;
            if export.is_empty() {
                return Err(invalid(spec, "nbd unix disk needs an export"));
            }
        }
        DiskTarget::File(p) => {
            if !p.is_file() {
                return Err(invalid(spec, format!("disk {} is not a file", p.display())));
            }
        }
    }
    Ok(())
}

fn check_socket_path(p: &Path) -> Result<(), ComputeError> {
    let len = p.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(ComputeError::SocketPathTooLong {
            path: p.to_owned(),
            len,
        });
    }
    Ok(())
}

/// QEMU splits option values at commas; a literal comma is written twice.
fn esc(s: &str) -> String {
    s.replace(',', ",,")
}

fn utf8<'a>(spec: &VmSpec, p: &'a Path) -> Result<&'a str, ComputeError> {
    p.to_str()
        .ok_or_else(|| invalid(spec, format!("path {} is not UTF-8", p.display())))
}

/// The QEMU command line for `spec`. Both ends of a migration must get identical machine,
/// RAM and devices, which holds because both come from this one function.
pub fn qemu_args(
    spec: &VmSpec,
    accel: Accel,
    run_dir: &Path,
    incoming: bool,
) -> Result<Vec<String>, ComputeError> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| (*s).to_owned()));
    push(&["-name", &format!("guest={}", esc(&spec.name))]);
    match accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        _ => push(&["-accel", "tcg"]),
    }
    push(&[
        "-machine",
        "q35",
        "-m",
        &spec.memory_mib.to_string(),
        "-smp",
        &spec.vcpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]);
    push(&[
        "-kernel",
        utf8(spec, &spec.kernel)?,
        "-initrd",
        utf8(spec, &spec.initrd)?,
        "-append",
        &spec.cmdline,
    ]);
    match &spec.disk {
        DiskTarget::NbdTcp { host, port, export } => push(&[
            "-blockdev",
            &format!(
                "driver=nbd,node-name=disk0,server.type=inet,server.host={},server.port={port},export={},reconnect-delay={NBD_RECONNECT_DELAY_S}",
                esc(host),
                esc(export)
            ),
        ]),
        DiskTarget::NbdUnix { path, export } => push(&[
            "-blockdev",
            &format!(
                "driver=nbd,node-name=disk0,server.type=unix,server.path={},export={},reconnect-delay={NBD_RECONNECT_DELAY_S}",
                esc(utf8(spec, path)?),
                esc(export)
            ),
        ]),
        DiskTarget::File(p) => push(&[
            "-blockdev",
            &format!(
                "driver=file,node-name=file0,filename={}",
                esc(utf8(spec, p)?)
            ),
            "-blockdev",
            "driver=raw,node-name=disk0,file=file0",
        ]),
    }
    push(&["-device", "virtio-blk-pci,drive=disk0,id=vblk0"]);
    for (i, n) in spec.nics.iter().enumerate() {
        push(&[
            "-netdev",
            &format!("tap,id=net{i},ifname={},script=no,downscript=no", n.tap),
            "-device",
            &format!("virtio-net-pci,netdev=net{i},mac={},id=vnic{i}", n.mac),
        ]);
    }
    if !spec.nics.is_empty() {
        let link = run_dir.join(files::LINK);
        push(&[
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
            &format!(
                "socket,id=link0,path={},server=on,wait=off",
                esc(utf8(spec, &link)?)
            ),
            "-device",
            "virtserialport,bus=vser0.0,chardev=link0,name=vinfra.link",
        ]);
    }
    let console = run_dir.join(files::CONSOLE);
    let qmp = run_dir.join(files::QMP);
    let pid = run_dir.join(files::PID);
    push(&[
        "-chardev",
        &format!("file,id=serial0,path={}", esc(utf8(spec, &console)?)),
        "-serial",
        "chardev:serial0",
        "-chardev",
        &format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            esc(utf8(spec, &qmp)?)
        ),
        "-mon",
        "chardev=qmp0,mode=control",
        "-pidfile",
        utf8(spec, &pid)?,
    ]);
    if incoming {
        push(&["-incoming", "defer"]);
    }
    Ok(a)
}

fn read_pid(run_dir: &Path) -> Result<u32, ()> {
    std::fs::read_to_string(run_dir.join(files::PID))
        .map_err(drop)?
        .trim()
        .parse()
        .map_err(drop)
}

/// Whether `pid` is a live QEMU serving `qmp_path` (guards against recycled pids).
fn owns_run_dir(pid: u32, qmp_path: &Path) -> bool {
    if !proc::alive(pid) {
        return false;
    }
    let needle = esc(&qmp_path.to_string_lossy());
    proc::cmdline(pid).is_some_and(|args| args.iter().any(|a| a.contains(&needle)))
}

fn remove_if_exists(p: &Path) -> Result<(), ComputeError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(ComputeError::Io {
            action: "remove",
            path: p.to_owned(),
            err,
        }),
    }
}

fn write_record(run_dir: &Path, rec: &VmRecord) -> Result<(), ComputeError> {
    let path = run_dir.join(files::RECORD);
    let tmp = run_dir.join(".vm.json.tmp");
    let body = serde_json::to_vec_pretty(rec).expect("VmRecord serializes");
    std::fs::write(&tmp, body)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|err| ComputeError::Io {
            action: "write",
            path,
            err,
        })
}

/// The last few lines of QEMU's log, on one line, for error messages.
fn log_tail(path: &Path) -> String {
    let Ok(body) = std::fs::read(path) else {
        return String::new();
    };
    let start = body.len().saturating_sub(2048);
    let text = String::from_utf8_lossy(&body[start..]);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn spec(dir: &Path) -> VmSpec {
        let k = dir.join("vmlinuz");
        std::fs::write(&k, b"k").unwrap();
        VmSpec {
            id: "web-1".into(),
            name: "web, one".into(),
            vcpus: 1,
            memory_mib: 256,
            kernel: k.clone(),
            initrd: k,
            cmdline: "console=ttyS0 quiet".into(),
            disk: DiskTarget::NbdTcp {
                host: "127.0.0.1".into(),
                port: 10809,
                export: "disk0".into(),
            },
            nics: vec![],
            run_dir: dir.join("run"),
            accel: Accel::Tcg,
        }
    }

    #[test]
    fn args_have_the_migration_relevant_shape() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let a = qemu_args(&s, Accel::Tcg, Path::new("/r,x"), true).unwrap();
        let j = a.join(" ");
        assert!(j.contains("-name guest=web,, one"), "{j}");
        assert!(j.contains("-accel tcg -machine q35 -m 256 -smp 1 -nodefaults"));
        assert!(j.contains("-blockdev driver=nbd,node-name=disk0,server.type=inet,server.host=127.0.0.1,server.port=10809,export=disk0,reconnect-delay=30"));
        assert!(j.contains("-device virtio-blk-pci,drive=disk0,id=vblk0"));
        assert!(j.contains("socket,id=qmp0,path=/r,,x/qmp.sock,server=on,wait=off"));
        assert!(j.contains("file,id=serial0,path=/r,,x/console.log"));
        assert!(j.ends_with("-incoming defer"));
        // The append string is one argument, spaces and all.
        assert!(a.iter().any(|x| x == "console=ttyS0 quiet"));
        let k = qemu_args(&s, Accel::Kvm, Path::new("/r"), false).unwrap();
        assert!(k.join(" ").contains("-accel kvm -cpu host"));
        assert!(!j.contains("-netdev"));
        let mut n = spec(dir.path());
        n.nics = vec![crate::NicAttach {
            tap: "vtp1234abcd0".into(),
            mac: "02:aa:bb:46:00:01".into(),
        }];
        let j = qemu_args(&n, Accel::Tcg, Path::new("/r"), false)
            .unwrap()
            .join(" ");
        assert!(j.contains("-netdev tap,id=net0,ifname=vtp1234abcd0,script=no,downscript=no -device virtio-net-pci,netdev=net0,mac=02:aa:bb:46:00:01,id=vnic0"), "{j}");
        assert!(j.contains("socket,id=link0,path=/r/link.sock,server=on,wait=off -device virtserialport,bus=vser0.0,chardev=link0,name=vinfra.link"), "{j}");
        assert!(!k.iter().any(|x| x == "-incoming"));
    }

    #[test]
    fn validation_rejects_bad_specs() {
        let dir = tempfile::tempdir().unwrap();
        let good = spec(dir.path());
        assert!(validate(&good).is_ok());
        let mut s = good.clone();
        s.id = "a/b".into();
        assert!(matches!(
            validate(&s),
            Err(ComputeError::InvalidSpec { .. })
        ));
        let mut s = good.clone();
        s.vcpus = 0;
        assert!(validate(&s).is_err());
        let mut s = good.clone();
        s.kernel = dir.path().join("missing");
        assert!(validate(&s).is_err());
        let mut s = good.clone();
        s.disk = DiskTarget::NbdUnix {
            path: PathBuf::from(format!("/{}", "x".repeat(120))),
            export: "d".into(),
        };
        assert!(matches!(
            validate(&s),
            Err(ComputeError::SocketPathTooLong { len: 121, .. })
        ));
        for (tap, mac, why) in [
            ("tap-name-too-long", "02:00:00:00:00:01", "nics[0].tap"),
            ("tap,x", "02:00:00:00:00:01", "nics[0].tap"),
            ("tap0", "02:00:00:00:00", "nics[0].mac"),
            ("tap0", "02:00:00:00:00:0g", "nics[0].mac"),
        ] {
            let mut s = good.clone();
            s.nics = vec![crate::NicAttach {
                tap: tap.into(),
                mac: mac.into(),
            }];
            let e = validate(&s).unwrap_err().to_string();
            assert!(e.contains(why), "{tap} {mac}: {e}");
        }
    }

    #[tokio::test]
    async fn deep_run_dir_fails_clearly_before_spawning() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        s.run_dir = dir.path().join("d".repeat(100));
        let drv = QemuDriver::with_binary("/nonexistent/qemu");
        let e = drv.start(&s).await.unwrap_err();
        assert!(matches!(e, ComputeError::SocketPathTooLong { .. }), "{e}");
        assert!(e.to_string().contains("shorter run dir"));
    }

    #[tokio::test]
    async fn missing_binary_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let drv = QemuDriver::with_binary("/nonexistent/qemu");
        let e = drv.start(&spec(dir.path())).await.unwrap_err();
        assert!(matches!(e, ComputeError::Spawn { .. }), "{e}");
        assert!(e.to_string().contains("scripts/setup.sh"));
        assert!(matches!(
            drv.status("web-1").await,
            Err(ComputeError::NotFound { .. })
        ));
    }

    #[test]
    fn exit_classification() {
        let ok = ExitStatus::from_raw(0);
        let killed = ExitStatus::from_raw(9); // terminated by SIGKILL
        let code1 = ExitStatus::from_raw(1 << 8);
        let quit = Observed {
            shutdown_reason: Some("host-qmp-quit".into()),
            panicked: false,
        };
        let poweroff = Observed {
            shutdown_reason: Some("guest-shutdown".into()),
            panicked: false,
        };
        let none = Observed::default();
        assert_eq!(
            classify(Some(ok), &poweroff, None, ""),
            VmStatus::Stopped {
                reason: "guest powered off".into()
            }
        );
        assert_eq!(
            classify(Some(ok), &quit, Some("stopped by request".into()), ""),
            VmStatus::Stopped {
                reason: "stopped by request".into()
            }
        );
        assert!(matches!(
            classify(Some(killed), &none, None, "oops"),
            VmStatus::Crashed { reason } if reason.contains("signal 9") && reason.contains("oops")
        ));
        assert!(matches!(
            classify(Some(killed), &none, Some("stopped by request".into()), ""),
            VmStatus::Stopped { .. }
        ));
        assert!(matches!(
            classify(Some(code1), &none, None, ""),
            VmStatus::Crashed { reason } if reason.contains("exit code 1")
        ));
        assert!(matches!(
            classify(None, &none, None, ""),
            VmStatus::Crashed { .. }
        ));
        assert!(matches!(
            classify(None, &quit, None, ""),
            VmStatus::Stopped { .. }
        ));
        let panicked = Observed {
            shutdown_reason: None,
            panicked: true,
        };
        assert!(matches!(
            classify(Some(ok), &panicked, None, ""),
            VmStatus::Crashed { .. }
        ));
    }
}
