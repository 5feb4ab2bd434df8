//! The `sim` compute driver: the [`ComputeDriver`] contract without a hypervisor
//! (omicron's simulated sled agent is the model). The agent above it runs unchanged, so
//! its real state machines, disk stack and migration protocol are what a test exercises.
//!
//! What is simulated, per VM, by one task (`actor.rs`):
//! - **the guest**: it prints the same console lines as vinfra's test guest (`GUEST:
//!   READY`, `TICK n ...`, see [`guest`]), honours `vinfra.tick_ms`/`vinfra.ticks`, and
//!   does real disk I/O through its disk target — the agent's NBD server and block cache
//!   serve it exactly as they serve QEMU (`disk.rs`; off with [`SimConfig::disk_io`]).
//! - **the hypervisor**: start, stop, pause, resume, a status like QEMU's RunStates
//!   (`inmigrate`, `finish-migrate`, `postmigrate`), a pidfile (`sim.pid`) and a record
//!   (`sim.json`) in the run dir.
//! - **live migration**: a short real TCP transfer between the source's and the
//!   destination's driver carrying the guest's memory (`stream.rs`); the destination
//!   continues the tick count, a cut stream kills the destination.
//!
//! What it does not simulate: NICs (no taps are opened; the guest prints its `NIC` lines
//! from the command line), the guest's link-control port, migration over TLS, guest RAM
//! dirtying.
//!
//! Lifecycle: the VMs live in the driver value, on the tokio runtime it was created on,
//! so they outlive an agent that is restarted around the same driver (tests do that). A
//! new driver (a restarted `vinfra agent --driver sim` process) adopts a VM from its run
//! dir when the pidfile is there: it continues from the last `TICK` on the console, as a
//! QEMU that kept running would have. Dropping the driver ends its VMs' tasks and keeps
//! their pidfiles: it is the hypervisor process dying.
//!
//! Terminal operations: input reaches the simulated guest, which prints one console line
//! per event (`INPUT key a down`, `INPUT move 100 200`, `INPUT button left up`) and
//! refuses input while paused, as QEMU does; the power button powers it off
//! (`GUEST: POWEROFF reason=power-button`, on resume when pressed while paused), reset
//! reboots it (a new `GUEST: init started`, ticks from 0), pause and resume are the
//! driver's; a screenshot is a [`SIM_SCREEN_WIDTH`]x[`SIM_SCREEN_HEIGHT`] grayscale PNG.
//! Every performed operation is kept, per VM id, for [`SimDriver::performed`].
//!
//! Failure injection for tests: [`SimDriver::fail_next_start`],
//! [`SimDriver::delay_next_start`], [`SimDriver::crash`],
//! [`SimDriver::interrupt_next_migration`].
//!
//! ```
//! use compute::{ComputeDriver, DiskTarget, SimConfig, SimDriver, VmSpec, VmStatus};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let img = compute::sim::write_image(&dir.path().join("image"), 4)?;
//! std::fs::copy(&img.disk_template, dir.path().join("disk.img"))?;
//! let driver = SimDriver::new(SimConfig::default());
//! let spec = VmSpec {
//!     id: "web-1".into(), name: "web-1".into(), vcpus: 1, memory_mib: 256,
//!     kernel: img.kernel, initrd: img.initrd, cmdline: "vinfra.tick_ms=10".into(),
//!     disk: DiskTarget::File(dir.path().join("disk.img")), nics: vec![],
//!     run_dir: dir.path().join("run"), accel: compute::Accel::Auto, tables: vec![],
//! };
//! let vm = driver.start(&spec).await?;
//! while !std::fs::read_to_string(&vm.console_log)?.contains("read=ok write=ok") {
//!     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
//! }
//! assert!(matches!(driver.stop("web-1").await?, VmStatus::Stopped { .. }));
//! # Ok(()) }
//! ```

mod actor;
mod disk;
pub mod guest;
mod image;
mod stream;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

pub use image::{write_image, SIM_IMAGE_MARK};

use self::actor::{ActorConfig, Boot, Cmd};
use self::disk::SimDisk;
use self::guest::{GuestArgs, GuestMemory};
use crate::{
    Accel, ComputeDriver, ComputeError, MigrateOptions, MigrationStats, MigrationTls, OpOutcome,
    Screenshot, VmRuntime, VmSpec, VmStatus,
};
use model::terminal_ops::{Operation, PowerAction};

/// File names in a simulated VM's run dir.
pub mod files {
    /// Serial console log (same name as QEMU's, so the agent finds it).
    pub const CONSOLE: &str = crate::qemu::files::CONSOLE;
    /// Pid of the process hosting the simulated hypervisor; present while the VM runs.
    pub const PID: &str = "sim.pid";
    /// What a new driver needs to adopt the VM.
    pub const RECORD: &str = "sim.json";
}

const RECORD_FORMAT: u32 = 1;

/// Width of a simulated screenshot, pixels (VGA's 320x200: small, and a real size).
pub const SIM_SCREEN_WIDTH: u32 = 320;
/// Height of a simulated screenshot, pixels.
pub const SIM_SCREEN_HEIGHT: u32 = 200;
/// Performed operations kept per VM id (the oldest are dropped), so that a long-running
/// simulated host does not grow without bound.
pub const PERFORMED_KEPT: usize = 4096;

/// Settings of the simulation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// From start to `GUEST: READY` (a real guest takes seconds under TCG).
    pub boot_time: Duration,
    /// Do the guest's disk I/O (attach at boot, a read and a durable write per tick).
    /// Off, the console says `read=off write=off` and the disk is never opened.
    pub disk_io: bool,
    /// Bytes of "RAM" a migration stream carries per MiB of guest memory: a guest of
    /// mostly zero pages. The default, 4 KiB, sends 1 MiB for a 256 MiB guest.
    pub ram_bytes_per_mib: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            boot_time: Duration::from_millis(200),
            disk_io: true,
            ram_bytes_per_mib: 4096,
        }
    }
}

/// `sim.json`.
#[derive(Debug, Serialize, Deserialize)]
struct SimRecord {
    format: u32,
    id: String,
    spec: VmSpec,
    /// A migration destination whose guest has not arrived: nothing to adopt.
    incoming: bool,
}

/// Failures armed for the next operation on a VM id.
#[derive(Debug, Default)]
struct Faults {
    fail_start: HashMap<String, String>,
    delay_start: HashMap<String, Duration>,
    interrupt_migration: HashSet<String>,
}

#[derive(Debug)]
struct SimVm {
    run_dir: PathBuf,
    incoming: Option<SocketAddr>,
    memory_mib: u32,
    tx: mpsc::Sender<Cmd>,
    status: watch::Receiver<VmStatus>,
    task: tokio::task::JoinHandle<()>,
    /// Terminal operations take turns (a fair queue), as on the QEMU driver.
    ops: tokio::sync::Mutex<()>,
}

impl Drop for SimVm {
    fn drop(&mut self) {
        // The simulated hypervisor dies with its driver (its pidfile stays).
        self.task.abort();
    }
}

impl SimVm {
    fn status(&self) -> VmStatus {
        self.status.borrow().clone()
    }

    fn exited(&self) -> Option<VmStatus> {
        Some(self.status()).filter(VmStatus::is_exited)
    }

    fn runtime(&self, id: &str) -> VmRuntime {
        VmRuntime {
            id: id.to_owned(),
            pid: std::process::id(),
            accel: Accel::Tcg,
            console_log: self.run_dir.join(files::CONSOLE),
            qmp_socket: PathBuf::new(),
            run_dir: self.run_dir.clone(),
            incoming: self.incoming,
        }
    }

    /// Sends `cmd`; `Err(final status)` when the VM already exited.
    async fn send(&self, cmd: Cmd) -> Result<(), VmStatus> {
        self.tx.send(cmd).await.map_err(|_| self.status())
    }
}

/// The simulated compute driver. Cheap to share behind an `Arc`; create it inside a
/// tokio runtime (its VMs run there).
#[derive(Debug)]
pub struct SimDriver {
    cfg: SimConfig,
    rt: OnceLock<tokio::runtime::Handle>,
    vms: Mutex<HashMap<String, Arc<SimVm>>>,
    /// Ids with a start or adoption in progress.
    starting: Mutex<HashSet<String>>,
    faults: Mutex<Faults>,
    /// Successful starts per id (fresh boots and incoming migrations).
    starts: Mutex<HashMap<String, u32>>,
    /// Terminal operations performed per id, oldest first (at most [`PERFORMED_KEPT`]).
    performed: Mutex<HashMap<String, VecDeque<Operation>>>,
}

#[derive(Debug)]
struct Claim<'a> {
    drv: &'a SimDriver,
    id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(&self.drv.starting).remove(&self.id);
    }
}

/// The driver's tables hold plain maps updated by single inserts and removes: a panic
/// elsewhere cannot leave them half-updated, so a poisoned lock is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ComputeError {
    let path = path.to_owned();
    move |err| ComputeError::Io { action, path, err }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_micros()).ok())
        .unwrap_or(0)
}

/// Logs that the agent asked the simulated hypervisor to `action` VM `id`, with the wall
/// clock in µs: `vinfra bench push` reads these lines back from the agents' logs (target
/// `latency`, off unless switched on) to time a command until the VM's task acted.
fn acted(id: &str, action: &'static str) {
    tracing::debug!(target: "latency", vm = %id, action, at_us = now_us(), "sim driver called");
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl SimDriver {
    /// A driver with `cfg`. Its VMs run on the current tokio runtime (or, when called
    /// outside one, on the runtime of the first start).
    pub fn new(cfg: SimConfig) -> Self {
        let rt = OnceLock::new();
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            let _ = rt.set(h);
        }
        Self {
            cfg,
            rt,
            vms: Mutex::new(HashMap::new()),
            starting: Mutex::new(HashSet::new()),
            faults: Mutex::new(Faults::default()),
            starts: Mutex::new(HashMap::new()),
            performed: Mutex::new(HashMap::new()),
        }
    }

    /// The terminal operations performed on VM `id` by this driver, oldest first (the last
    /// [`PERFORMED_KEPT`]; across restarts of the VM). Refused ones are not there.
    pub fn performed(&self, id: &str) -> Vec<Operation> {
        lock(&self.performed)
            .get(id)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn record(&self, id: &str, op: &Operation) -> usize {
        let mut all = lock(&self.performed);
        let q = all.entry(id.to_owned()).or_default();
        if q.len() >= PERFORMED_KEPT {
            q.pop_front();
        }
        q.push_back(op.clone());
        q.len()
    }

    /// The next start (or incoming start) of VM `id` fails as a QEMU exiting during
    /// startup would, with `reason` as its log.
    pub fn fail_next_start(&self, id: &str, reason: &str) {
        lock(&self.faults)
            .fail_start
            .insert(id.to_owned(), reason.to_owned());
    }

    /// The next start (or incoming start) of VM `id` takes `delay` before it returns (a
    /// slow QEMU start: a loaded host, a disk that is slow to open).
    pub fn delay_next_start(&self, id: &str, delay: Duration) {
        lock(&self.faults).delay_start.insert(id.to_owned(), delay);
    }

    /// The next outgoing migration of VM `id` breaks off halfway through the memory
    /// stream: the source reports the migration failed and runs on; the destination
    /// dies, as a QEMU whose incoming migration failed does.
    pub fn interrupt_next_migration(&self, id: &str) {
        lock(&self.faults).interrupt_migration.insert(id.to_owned());
    }

    /// Kills VM `id` now: its status becomes `Crashed { reason }`, as a QEMU that died.
    pub async fn crash(&self, id: &str, reason: &str) -> Result<(), ComputeError> {
        let vm = self.get(id)?;
        // An exited VM stays exited.
        let _ = vm
            .send(Cmd::Crash {
                reason: reason.to_owned(),
            })
            .await;
        let mut rx = vm.status.clone();
        let _ =
            tokio::time::timeout(Duration::from_secs(5), rx.wait_for(VmStatus::is_exited)).await;
        Ok(())
    }

    /// How many times VM `id` was started here (fresh boots and migration arrivals'
    /// starts, not adoptions).
    pub fn start_count(&self, id: &str) -> u32 {
        lock(&self.starts).get(id).copied().unwrap_or(0)
    }

    /// Ids of the VMs whose simulated hypervisor runs (not exited).
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.vms)
            .iter()
            .filter(|(_, vm)| vm.exited().is_none())
            .map(|(id, _)| id.clone())
            .collect();
        v.sort();
        v
    }

    fn rt(&self) -> tokio::runtime::Handle {
        self.rt.get_or_init(tokio::runtime::Handle::current).clone()
    }

    fn get(&self, id: &str) -> Result<Arc<SimVm>, ComputeError> {
        lock(&self.vms)
            .get(id)
            .cloned()
            .ok_or_else(|| ComputeError::NotFound { id: id.to_owned() })
    }

    fn claim(&self, id: &str) -> Result<Claim<'_>, ComputeError> {
        let vms = lock(&self.vms);
        let mut busy = lock(&self.starting);
        let running = vms.get(id).is_some_and(|vm| vm.exited().is_none());
        if running || !busy.insert(id.to_owned()) {
            return Err(ComputeError::AlreadyRunning { id: id.into() });
        }
        Ok(Claim {
            drv: self,
            id: id.to_owned(),
        })
    }

    fn actor_config(
        &self,
        spec: &VmSpec,
        run_dir: &Path,
        incoming: bool,
    ) -> Result<ActorConfig, ComputeError> {
        let disk = if self.cfg.disk_io {
            Some(SimDisk::new(&spec.disk).map_err(|reason| invalid(spec, reason))?)
        } else {
            None
        };
        let mut arrived = spec.clone();
        arrived.run_dir = run_dir.to_owned();
        Ok(ActorConfig {
            id: spec.id.clone(),
            args: GuestArgs::parse(&spec.cmdline),
            boot_time: self.cfg.boot_time,
            disk,
            console: run_dir.join(files::CONSOLE),
            pidfile: run_dir.join(files::PID),
            max_ram: self.ram_bytes(spec.memory_mib).saturating_mul(2),
            arrival_record: incoming.then_some(arrived),
        })
    }

    fn ram_bytes(&self, memory_mib: u32) -> u64 {
        u64::from(memory_mib).saturating_mul(self.cfg.ram_bytes_per_mib)
    }

    /// Applies the armed start faults of `id`.
    async fn start_faults(&self, id: &str) -> Result<(), ComputeError> {
        let (delay, fail) = {
            let mut f = lock(&self.faults);
            (f.delay_start.remove(id), f.fail_start.remove(id))
        };
        if let Some(d) = delay {
            tracing::info!(vm = %id, delay_ms = ms(d), "simulated start delayed (injected)");
            tokio::time::sleep(d).await;
        }
        if let Some(reason) = fail {
            return Err(ComputeError::StartFailed {
                id: id.to_owned(),
                status: "exit code 1 (injected fault)".into(),
                log_tail: reason,
            });
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(vm = %spec.id, incoming = ?listen))]
    async fn launch(
        &self,
        spec: &VmSpec,
        listen: Option<SocketAddr>,
    ) -> Result<VmRuntime, ComputeError> {
        crate::qemu::validate(spec)?;
        let _claim = self.claim(&spec.id)?;
        self.start_faults(&spec.id).await?;
        let run_dir =
            std::path::absolute(&spec.run_dir).map_err(io_err("resolve run dir", &spec.run_dir))?;
        std::fs::create_dir_all(&run_dir).map_err(io_err("create run dir", &run_dir))?;
        // A simulated hypervisor in another live process may still own this run dir.
        if let Some(pid) = read_pid(&run_dir) {
            if pid != std::process::id() && crate::proc::alive(pid) {
                return Err(ComputeError::AlreadyRunning {
                    id: spec.id.clone(),
                });
            }
        }
        if self.cfg.disk_io {
            let target = spec.disk.clone();
            let probed = tokio::task::spawn_blocking(move || SimDisk::probe(&target))
                .await
                .unwrap_or_else(|e| Err(format!("disk probe died: {e}")));
            if let Err(log_tail) = probed {
                return Err(ComputeError::StartFailed {
                    id: spec.id.clone(),
                    status: "exit code 1".into(),
                    log_tail,
                });
            }
        }
        let (boot, incoming) = match listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                    ComputeError::StartFailed {
                        id: spec.id.clone(),
                        status: "exit code 1".into(),
                        log_tail: format!("cannot listen for the migration stream on {addr}: {e}"),
                    }
                })?;
                let at = l.local_addr().map_err(io_err("listen in", &run_dir))?;
                (Boot::Incoming(l), Some(at))
            }
            None => (Boot::Fresh, None),
        };
        let mut rec_spec = spec.clone();
        rec_spec.run_dir = run_dir.clone();
        write_record(&run_dir, &rec_spec, incoming.is_some())?;
        let cfg = self.actor_config(spec, &run_dir, incoming.is_some())?;
        let vm = self.spawn(&spec.id, &rec_spec, &run_dir, incoming, cfg, boot)?;
        *lock(&self.starts).entry(spec.id.clone()).or_insert(0) += 1;
        tracing::info!(pid = std::process::id(), "simulated vm started");
        Ok(vm.runtime(&spec.id))
    }

    fn spawn(
        &self,
        id: &str,
        spec: &VmSpec,
        run_dir: &Path,
        incoming: Option<SocketAddr>,
        cfg: ActorConfig,
        boot: Boot,
    ) -> Result<Arc<SimVm>, ComputeError> {
        let pidfile = run_dir.join(files::PID);
        std::fs::write(&pidfile, format!("{}\n", std::process::id()))
            .map_err(io_err("write", &pidfile))?;
        let (tx, rx) = mpsc::channel(16);
        let initial = match boot {
            Boot::Incoming(_) => VmStatus::Paused {
                state: "inmigrate".into(),
            },
            _ => VmStatus::Running,
        };
        let (status_tx, status) = watch::channel(initial);
        let task = actor::spawn(&self.rt(), cfg, boot, rx, status_tx);
        let vm = Arc::new(SimVm {
            run_dir: run_dir.to_owned(),
            incoming,
            memory_mib: spec.memory_mib,
            tx,
            status,
            task,
            ops: tokio::sync::Mutex::new(()),
        });
        lock(&self.vms).insert(id.to_owned(), vm.clone());
        Ok(vm)
    }

    /// The migration itself, from connect to the destination's `OK`. The guest runs
    /// during the RAM phase and is frozen for the switch-over.
    async fn migrate_stream(
        &self,
        id: &str,
        vm: &SimVm,
        to: SocketAddr,
        opts: &MigrateOptions,
        interrupt: bool,
        frozen: &mut bool,
    ) -> Result<MigrationStats, ComputeError> {
        let fail = |desc: String| ComputeError::MigrationFailed {
            id: id.to_owned(),
            status: "failed".into(),
            desc,
        };
        let t0 = Instant::now();
        let mut out = stream::Outgoing::connect(to)
            .await
            .map_err(|e| fail(format!("cannot connect to {to}: {e}")))?;
        let setup = t0.elapsed();
        let ram = self.ram_bytes(vm.memory_mib);
        out.send_ram(id, ram, opts.max_bandwidth, interrupt.then_some(ram / 2))
            .await
            .map_err(|e| fail(format!("sending memory to {to}: {e}")))?;
        let (reply, rx) = oneshot::channel();
        vm.send(Cmd::Freeze(reply))
            .await
            .map_err(|st| fail(format!("the guest exited ({st:?})")))?;
        let sw = rx
            .await
            .map_err(|_| fail("the guest exited".into()))?
            .map_err(|e| fail(format!("cannot pause the guest: {e}")))?;
        *frozen = true;
        let stopped_at = Instant::now();
        let source_stopped_at_us = Some(now_us());
        out.switch_over(&sw)
            .await
            .map_err(|e| fail(format!("switch-over to {to}: {e}")))?;
        let downtime = stopped_at.elapsed();
        let wall_time = t0.elapsed();
        Ok(MigrationStats {
            total_time_ms: ms(wall_time),
            downtime_ms: ms(downtime),
            setup_time_ms: ms(setup),
            ram_transferred_bytes: out.sent,
            ram_total_bytes: u64::from(vm.memory_mib) << 20,
            dirty_sync_count: 1,
            wall_time,
            source_stopped_at_us,
            polls: 0,
        })
    }

    async fn request(
        &self,
        id: &str,
        op: &'static str,
        make: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Cmd,
    ) -> Result<(), ComputeError> {
        let vm = self.get(id)?;
        let (reply, rx) = oneshot::channel();
        let refused = |state: String| ComputeError::InvalidState {
            id: id.to_owned(),
            state,
            op,
        };
        if let Err(st) = vm.send(make(reply)).await {
            return Err(refused(format!("{st:?}")));
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(refused(why)),
            Err(_) => Err(refused(format!("{:?}", vm.status()))),
        }
    }
}

fn invalid(spec: &VmSpec, reason: impl Into<String>) -> ComputeError {
    ComputeError::InvalidSpec {
        id: spec.id.clone(),
        reason: reason.into(),
    }
}

fn read_pid(run_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(run_dir.join(files::PID))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn write_record(run_dir: &Path, spec: &VmSpec, incoming: bool) -> Result<(), ComputeError> {
    let path = run_dir.join(files::RECORD);
    let tmp = run_dir.join(".sim.json.tmp");
    let rec = SimRecord {
        format: RECORD_FORMAT,
        id: spec.id.clone(),
        spec: spec.clone(),
        incoming,
    };
    let body = serde_json::to_vec_pretty(&rec).expect("SimRecord serializes");
    std::fs::write(&tmp, body)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(io_err("write", &path))
}

/// The simulated display: a diagonal gradient that moves with every operation performed,
/// so that two screenshots with input between them differ.
fn sim_screen(performed: usize) -> Screenshot {
    let (w, h) = (SIM_SCREEN_WIDTH, SIM_SCREEN_HEIGHT);
    let shift = performed % 256;
    let wu = usize::try_from(w).expect("a constant");
    let n = wu * usize::try_from(h).expect("a constant");
    let pixels: Vec<u8> = (0..n)
        .map(|i| {
            let v = (i % wu + i / wu + shift) % 256;
            u8::try_from(v).expect("below 256")
        })
        .collect();
    Screenshot {
        png: crate::png::encode_gray(w, h, &pixels),
        width: w,
        height: h,
    }
}

/// The last 16 KiB of the console log.
fn console_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

#[async_trait::async_trait]
impl ComputeDriver for SimDriver {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn pidfile(&self, run_dir: &Path) -> PathBuf {
        run_dir.join(files::PID)
    }

    async fn start(&self, spec: &VmSpec) -> Result<VmRuntime, ComputeError> {
        acted(&spec.id, "start");
        self.launch(spec, None).await
    }

    #[tracing::instrument(skip(self), fields(vm = %id))]
    async fn stop(&self, id: &str) -> Result<VmStatus, ComputeError> {
        acted(id, "stop");
        let vm = self.get(id)?;
        if let Some(st) = vm.exited() {
            return Ok(st);
        }
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Stop {
            reason: "stopped by request".into(),
            reply,
        };
        if let Err(st) = vm.send(cmd).await {
            return Ok(st);
        }
        let st = rx.await.unwrap_or_else(|_| vm.status());
        // The task clears the pidfile as it ends: wait for that, as for a QEMU's exit.
        let mut w = vm.status.clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), w.wait_for(VmStatus::is_exited)).await;
        tracing::info!(status = ?st, "simulated vm stopped");
        Ok(st)
    }

    async fn status(&self, id: &str) -> Result<VmStatus, ComputeError> {
        Ok(self.get(id)?.status())
    }

    /// Zero while the VM runs: the simulated guest is a task of the agent's own process
    /// that sleeps between its ticks and has no CPU time of its own to report (the
    /// process's CPU time would be every VM's and the agent's together).
    fn cpu_time(&self, id: &str) -> Option<std::time::Duration> {
        let vm = self.get(id).ok()?;
        vm.exited().is_none().then_some(Duration::ZERO)
    }

    fn console_path(&self, id: &str) -> Result<PathBuf, ComputeError> {
        Ok(self.get(id)?.run_dir.join(files::CONSOLE))
    }

    #[tracing::instrument(skip(self), fields(vm = %id))]
    async fn adopt(&self, id: &str, run_dir: &Path) -> Result<VmRuntime, ComputeError> {
        let run_dir = std::path::absolute(run_dir).map_err(io_err("resolve run dir", run_dir))?;
        if let Ok(vm) = self.get(id) {
            if vm.exited().is_none() && vm.run_dir == run_dir {
                // It kept running in this driver while the agent restarted.
                tracing::info!("simulated vm still running: adopted");
                return Ok(vm.runtime(id));
            }
        }
        let _claim = self.claim(id)?;
        let fail = |reason: String| ComputeError::Adopt {
            id: id.to_owned(),
            run_dir: run_dir.clone(),
            reason,
        };
        let rec_path = run_dir.join(files::RECORD);
        let rec: SimRecord = std::fs::read(&rec_path)
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
        let Some(pid) = read_pid(&run_dir) else {
            return Err(fail("no pidfile: the vm is not running".into()));
        };
        if pid != std::process::id() && crate::proc::alive(pid) {
            return Err(fail(format!(
                "its simulated hypervisor runs in process {pid}"
            )));
        }
        if rec.incoming {
            return Err(fail(
                "it was waiting for an incoming migration, which died with its hypervisor".into(),
            ));
        }
        let mem = GuestMemory::from_console(&console_tail(&run_dir.join(files::CONSOLE)))
            .unwrap_or_default();
        let cfg = self.actor_config(&rec.spec, &run_dir, false)?;
        let vm = self.spawn(id, &rec.spec, &run_dir, None, cfg, Boot::Resumed(mem))?;
        tracing::info!(
            next_tick = mem.next_tick,
            "simulated vm adopted from its files"
        );
        Ok(vm.runtime(id))
    }

    async fn start_incoming(
        &self,
        spec: &VmSpec,
        listen: SocketAddr,
        tls: Option<&MigrationTls>,
    ) -> Result<VmRuntime, ComputeError> {
        if tls.is_some() {
            return Err(ComputeError::Unsupported {
                driver: self.name(),
                op: "migration over TLS",
            });
        }
        self.launch(spec, Some(listen)).await
    }

    async fn pause(&self, id: &str) -> Result<(), ComputeError> {
        self.request(id, "pause", Cmd::Pause).await
    }

    #[tracing::instrument(skip(self, op), fields(vm = %id, op = op.kind()))]
    async fn perform(&self, id: &str, op: &Operation) -> Result<OpOutcome, ComputeError> {
        let vm = self.get(id)?;
        let _turn = vm.ops.lock().await;
        crate::check_operation(id, op, vm.exited())?;
        let outcome = match op {
            Operation::Power { action } => {
                match action {
                    // The simulated hypervisor runs: the VM is on.
                    PowerAction::On => {}
                    PowerAction::Shutdown => {
                        self.request(id, "power shutdown", Cmd::PowerButton).await?
                    }
                    PowerAction::Reset => self.request(id, "power reset", Cmd::Reset).await?,
                    PowerAction::Pause => self.pause(id).await?,
                    PowerAction::Resume => self.resume(id).await?,
                }
                OpOutcome::Done
            }
            Operation::Screenshot => {
                let n = lock(&self.performed).get(id).map_or(0, VecDeque::len);
                OpOutcome::Screenshot(sim_screen(n))
            }
            _ => {
                let events = op.input_events();
                self.request(id, op.kind(), |reply| Cmd::Input { events, reply })
                    .await?;
                OpOutcome::Done
            }
        };
        let n = self.record(id, op);
        tracing::debug!(performed = n, "terminal operation performed");
        Ok(outcome)
    }

    async fn resume(&self, id: &str) -> Result<(), ComputeError> {
        self.request(id, "resume", Cmd::Resume).await
    }

    #[tracing::instrument(skip(self, opts), fields(vm = %id, to = %to_uri))]
    async fn migrate(
        &self,
        id: &str,
        to_uri: &str,
        opts: &MigrateOptions,
    ) -> Result<MigrationStats, ComputeError> {
        let vm = self.get(id)?;
        if opts.tls.is_some() {
            return Err(ComputeError::Unsupported {
                driver: self.name(),
                op: "migration over TLS",
            });
        }
        let Some(to) = stream::parse_uri(to_uri) else {
            return Err(ComputeError::MigrationFailed {
                id: id.to_owned(),
                status: "failed".into(),
                desc: format!("{to_uri} is not tcp:IP:PORT"),
            });
        };
        match vm.status() {
            VmStatus::Running | VmStatus::Paused { .. } => {}
            st => {
                return Err(ComputeError::InvalidState {
                    id: id.to_owned(),
                    state: format!("{st:?}"),
                    op: "migrate",
                })
            }
        }
        let interrupt = lock(&self.faults).interrupt_migration.remove(id);
        tracing::info!(interrupt, "migration started");
        let mut frozen = false;
        let r = tokio::time::timeout(
            opts.timeout,
            self.migrate_stream(id, &vm, to, opts, interrupt, &mut frozen),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ComputeError::Timeout {
                id: id.to_owned(),
                what: "migration to complete",
            })
        });
        let stats = match r {
            Ok(s) => s,
            Err(e) => {
                // QEMU's source runs on after a failed migration.
                if frozen {
                    let _ = vm.send(Cmd::Thaw).await;
                }
                return Err(e);
            }
        };
        let _ = vm.send(Cmd::Migrated).await;
        tracing::info!(
            total_ms = stats.total_time_ms,
            downtime_ms = stats.downtime_ms,
            ram_bytes = stats.ram_transferred_bytes,
            "migration completed"
        );
        if opts.quit_source {
            let (reply, rx) = oneshot::channel();
            let cmd = Cmd::Stop {
                reason: format!("migrated to {to_uri}"),
                reply,
            };
            if vm.send(cmd).await.is_ok() {
                let _ = rx.await;
                let mut w = vm.status.clone();
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), w.wait_for(VmStatus::is_exited))
                        .await;
            }
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests;
