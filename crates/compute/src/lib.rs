//! Compute: runs virtual machines on one host, behind the [`ComputeDriver`] trait.
//!
//! Owns: the `qemu` driver ([`qemu::QemuDriver`]: QEMU processes, their QMP connections,
//! adoption after an agent restart, live migration, terminal operations), the `sim` driver
//! ([`sim::SimDriver`]: the same contract without a hypervisor, for tests and for trying the
//! control plane with many hosts), the QMP client ([`qmp`]), the Debian guest's workload lines ([`workload`]), the guest images
//! ([`guest`]: the busybox default and the Debian one), screenshot PNGs ([`png`]), and a VM's own copy of its disk template
//! ([`prepare_vm_disk`]; the agent serves VM disks, through its block cache and `nbd`).
//! Must not depend on: the control plane, the store, the API, the cache. The node agent
//! calls us. (`nbd` only as a client: the simulated guest reads its disk over NBD; `model`
//! for the terminal operations the agent hands us.)
//!
//! Tasks: per QEMU, one QMP actor (owns the socket) and one watcher (reaps the process and
//! records why it exited); per simulated VM, one task that owns the guest. The drivers' VM
//! tables are `std` mutexes that are never held across an `.await`.
//!
//! ```no_run
//! use compute::{ComputeDriver, DiskTarget, QemuDriver, VmSpec, Accel};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let img = compute::ensure_default_image(&compute::default_cache_dir(), |l| println!("{l}"))?;
//! compute::prepare_vm_disk(&img.disk_template, "/srv/vm/web-1.img".as_ref()).await?;
//! // Any NBD server will do; the agent's is the `nbd` crate's, serving its block cache.
//! let disk = DiskTarget::NbdTcp { host: "127.0.0.1".into(), port: 10809, export: "web-1".into() };
//! let driver = QemuDriver::new();
//! let vm = driver.start(&VmSpec {
//!     id: "web-1".into(), name: "web-1".into(), vcpus: 1, memory_mib: 256,
//!     kernel: img.kernel, initrd: img.initrd, cmdline: img.cmdline,
//!     disk, nics: vec![], run_dir: "/run/vinfra/web-1".into(), accel: Accel::Auto, tables: vec![],
//! }).await?;
//! println!("console: {}", vm.console_log.display());
//! driver.stop("web-1").await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod disk;
pub mod guest;
pub mod png;
mod proc;
pub use proc::kill_qemus_under;
pub mod qemu;
pub mod qmp;
pub mod sim;
pub mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use model::terminal_ops::Operation;
use serde::{Deserialize, Serialize};

pub use disk::{prepare_vm_disk, DiskError};
pub use guest::{
    default_cache_dir, ensure_default_image, ensure_image, GuestImage, GuestImageError, GuestKind,
};
pub use qemu::QemuDriver;
pub use qmp::{QmpClient, QmpError, QmpEvent};
pub use sim::{SimConfig, SimDriver};

/// What to run: everything a driver needs to start one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Stable id, unique on the host: `[A-Za-z0-9._-]`, at most 64 bytes.
    pub id: String,
    /// Human-readable name (shown by QEMU as the guest name).
    pub name: String,
    /// Virtual CPUs (1..=64).
    pub vcpus: u32,
    /// Guest RAM in MiB (16..=65536).
    pub memory_mib: u32,
    /// Kernel image for direct boot.
    pub kernel: PathBuf,
    /// Initramfs for direct boot.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// The VM's one disk.
    pub disk: DiskTarget,
    /// Network interfaces, in guest order.
    #[serde(default)]
    pub nics: Vec<NicAttach>,
    /// Per-VM directory for the console log, QMP socket and pidfile. Keep it short: unix
    /// socket paths must stay under 108 bytes.
    pub run_dir: PathBuf,
    /// Accelerator.
    pub accel: Accel,
    /// Resource tables the VM maps (docs/SHM.md, "VMs as devices"): each read-only,
    /// with the VM's own writable window on it.
    #[serde(default)]
    pub tables: Vec<TableAttach>,
}

/// One resource table as a VM sees it (docs/SHM.md): the table itself read-only
/// behind an `ivshmem-plain` device (a guest store to it is dropped), and the VM's
/// window behind an `ivshmem-doorbell` device whose ivshmem server is the table's
/// element (`shm::Element::attach_guest`, in the agent). QEMU
/// blocks live migration of a VM with ivshmem devices in peer mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableAttach {
    /// The table's memfd by path (`/proc/PID/fd/N` of the element's process).
    pub table: PathBuf,
    /// The memfd's size: a power of two (it becomes a BAR).
    pub table_bytes: u64,
    /// The element's socket for this VM's window (QEMU connects to it).
    pub window: PathBuf,
}

/// Most tables one VM maps.
pub const MAX_VM_TABLES: usize = 8;

/// One virtio NIC on a tap device that the caller created (and bridged) beforehand.
/// QEMU opens the tap by name, so it needs no helper and no privileges beyond that.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicAttach {
    /// Tap interface name (`[a-z0-9-]`, at most 15 bytes: IFNAMSIZ).
    pub tap: String,
    /// The guest's MAC, `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
}

/// Where the VM's disk lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskTarget {
    /// An NBD export over TCP.
    NbdTcp {
        /// Server host (loopback in tests).
        host: String,
        /// Server port.
        port: u16,
        /// Export name.
        export: String,
    },
    /// An NBD export over a unix socket.
    NbdUnix {
        /// Socket path.
        path: PathBuf,
        /// Export name.
        export: String,
    },
    /// A raw image file opened by QEMU itself (not migratable between hosts).
    File(PathBuf),
}

/// Accelerator choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Accel {
    /// KVM when `/dev/kvm` is usable and is not `kvm_pvm` (stock kernels crawl under it),
    /// else TCG.
    Auto,
    /// Hardware virtualization; fails to start if `/dev/kvm` is not usable.
    Kvm,
    /// Software emulation: slow, but works everywhere and migrates the same way.
    Tcg,
}

impl Accel {
    /// The accelerator [`Accel::Auto`] picks on this host (never returns `Auto`).
    pub fn resolve(self) -> Accel {
        match self {
            Accel::Auto if kvm_usable() => Accel::Kvm,
            Accel::Auto => Accel::Tcg,
            a => a,
        }
    }
}

/// Whether stock guest kernels can use `/dev/kvm` here.
pub fn kvm_usable() -> bool {
    // kvm_pvm is a nested "pagetable-based VM" hypervisor: a stock kernel did not finish
    // decompressing in 10 minutes under it (qemu-migration-notes.md), so it counts as no KVM.
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        return false;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// A started (or adopted) VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRuntime {
    /// The VM id.
    pub id: String,
    /// Host process id of the hypervisor (for `sim`: the process the simulation runs in).
    pub pid: u32,
    /// The accelerator actually used (never `Auto`).
    pub accel: Accel,
    /// Serial console log.
    pub console_log: PathBuf,
    /// QMP socket (empty for `sim`, which has no monitor).
    pub qmp_socket: PathBuf,
    /// The run directory.
    pub run_dir: PathBuf,
    /// For a VM started with [`ComputeDriver::start_incoming`]: where it listens for the
    /// migration stream (the real port when port 0 was asked for).
    pub incoming: Option<SocketAddr>,
}

/// What a VM is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStatus {
    /// Guest CPUs execute.
    Running,
    /// The hypervisor is up but the guest does not execute; `state` is QEMU's RunState
    /// (`paused`, `inmigrate`, `postmigrate`, ...).
    Paused {
        /// QEMU's RunState.
        state: String,
    },
    /// The hypervisor exited in an orderly way (guest poweroff, stop, after migration).
    Stopped {
        /// Why.
        reason: String,
    },
    /// The hypervisor died or exited with an error.
    Crashed {
        /// Why (exit code or signal, and QEMU's last log line when known).
        reason: String,
    },
}

impl VmStatus {
    /// Whether the hypervisor process is gone.
    pub fn is_exited(&self) -> bool {
        matches!(self, VmStatus::Stopped { .. } | VmStatus::Crashed { .. })
    }
}

/// Knobs of one live migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateOptions {
    /// Maximum tolerated downtime in ms (QEMU default 300).
    pub downtime_limit_ms: Option<u64>,
    /// Bandwidth cap in bytes/s (QEMU default 128 MiB/s).
    pub max_bandwidth: Option<u64>,
    /// Give up (and cancel) after this long.
    pub timeout: Duration,
    /// Quit the source QEMU once the migration completed (it sits in `postmigrate` otherwise).
    pub quit_source: bool,
    /// Run the migration stream over TLS (between machines).
    #[serde(default)]
    pub tls: Option<MigrationTls>,
}

/// TLS of a migration stream: a directory of PEM files as QEMU's `tls-creds-x509`
/// reads them (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
/// `client-key.pem`), and on the source the host name the destination's certificate
/// must carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationTls {
    /// The PEM directory.
    pub dir: PathBuf,
    /// Source only: the destination's host name.
    pub peer_name: String,
}

/// Id of the QEMU TLS credentials object of a migration.
pub(crate) const MIGRATION_TLS_ID: &str = "vinfra-migration-tls";

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            downtime_limit_ms: None,
            max_bandwidth: None,
            timeout: Duration::from_secs(300),
            quit_source: true,
            tls: None,
        }
    }
}

/// The outcome of a completed live migration, from the source's point of view.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationStats {
    /// QEMU's total migration time in ms.
    pub total_time_ms: u64,
    /// QEMU's downtime in ms (guest paused).
    pub downtime_ms: u64,
    /// QEMU's setup time in ms.
    pub setup_time_ms: u64,
    /// RAM bytes sent.
    pub ram_transferred_bytes: u64,
    /// Guest RAM size.
    pub ram_total_bytes: u64,
    /// Dirty-bitmap sync passes.
    pub dirty_sync_count: u64,
    /// Host wall time from the `migrate` command to `completed`.
    pub wall_time: Duration,
    /// Host wall clock (µs since the epoch, QEMU's event timestamp) when the source
    /// stopped the guest; compare with the destination's `RESUME` for host-seen downtime.
    pub source_stopped_at_us: Option<i64>,
    /// `query-migrate` polls made.
    pub polls: u32,
}

/// What a performed terminal operation returns.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpOutcome {
    /// Performed; nothing to return (input, power actions).
    Done,
    /// The picture a `screenshot` took.
    Screenshot(Screenshot),
}

/// A picture of a VM's display.
#[derive(Clone, PartialEq, Eq)]
pub struct Screenshot {
    /// The PNG file.
    pub png: Vec<u8>,
    /// Its width in pixels (from its header).
    pub width: u32,
    /// Its height in pixels.
    pub height: u32,
}

impl std::fmt::Debug for Screenshot {
    // Not the bytes: a screenshot is hundreds of KiB.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Screenshot")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("png_bytes", &self.png.len())
            .finish()
    }
}

/// Whether a terminal operation may be performed on VM `id`, whose hypervisor exited
/// with `exited` if it did: the operation must be valid, and nothing is performed on a VM
/// whose hypervisor is gone (`power on` included: starting it is the agent's, which has
/// its spec). Both drivers check the same way.
pub(crate) fn check_operation(
    id: &str,
    op: &Operation,
    exited: Option<VmStatus>,
) -> Result<(), ComputeError> {
    op.validate()
        .map_err(|err| ComputeError::InvalidOperation {
            id: id.to_owned(),
            err,
        })?;
    match exited {
        None => Ok(()),
        Some(st) => Err(ComputeError::InvalidState {
            id: id.to_owned(),
            state: format!("{st:?}"),
            op: match op {
                Operation::Power {
                    action: model::terminal_ops::PowerAction::On,
                } => "power on",
                _ => op.kind(),
            },
        }),
    }
}

/// Errors of compute drivers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ComputeError {
    /// No VM with this id on this driver.
    #[error("vm {id} not found")]
    NotFound {
        /// The VM id.
        id: String,
    },
    /// A VM with this id is already running here.
    #[error("vm {id} is already running")]
    AlreadyRunning {
        /// The VM id.
        id: String,
    },
    /// The spec cannot be run.
    #[error("invalid spec for vm {id}: {reason}")]
    InvalidSpec {
        /// The VM id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The run dir is too deep for a unix socket path.
    #[error(
        "socket path {path} is {len} bytes, unix sockets allow at most 107: use a shorter run dir"
    )]
    SocketPathTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// A file or directory operation failed.
    #[error("cannot {action} {path}")]
    Io {
        /// What we tried.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
    /// The hypervisor binary could not be started.
    #[error("cannot run {binary} (install it with scripts/setup.sh)")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
    /// The hypervisor exited while starting.
    #[error("qemu for vm {id} exited during startup ({status}): {log_tail}")]
    StartFailed {
        /// The VM id.
        id: String,
        /// Exit status.
        status: String,
        /// The end of QEMU's own log.
        log_tail: String,
    },
    /// Something did not happen in time.
    #[error("vm {id}: timed out waiting for {what}")]
    Timeout {
        /// The VM id.
        id: String,
        /// What we waited for.
        what: &'static str,
    },
    /// A QMP exchange failed.
    #[error("qmp with vm {id} failed")]
    Qmp {
        /// The VM id.
        id: String,
        /// The cause.
        #[source]
        err: QmpError,
    },
    /// A VM could not be re-attached after an agent restart.
    #[error("cannot adopt vm {id} from {run_dir}: {reason}")]
    Adopt {
        /// The VM id.
        id: String,
        /// Its run dir.
        run_dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// The migration ended in a state other than `completed`.
    #[error("migration of vm {id} ended as {status}: {desc}")]
    MigrationFailed {
        /// The VM id.
        id: String,
        /// QEMU's final status.
        status: String,
        /// QEMU's error description.
        desc: String,
    },
    /// The VM is not in a state that allows the operation.
    #[error("vm {id} cannot {op}: {state}")]
    InvalidState {
        /// The VM id.
        id: String,
        /// What it is doing instead.
        state: String,
        /// The operation.
        op: &'static str,
    },
    /// A terminal operation breaks a rule (see `model::terminal_ops::Operation::validate`).
    #[error("vm {id}: invalid terminal operation")]
    InvalidOperation {
        /// The VM id.
        id: String,
        /// What is wrong, naming the field.
        #[source]
        err: model::ValidationError,
    },
    /// A screenshot came back unreadable.
    #[error("vm {id}: the screenshot is not a readable png")]
    Screenshot {
        /// The VM id.
        id: String,
        /// What is wrong with it.
        #[source]
        err: png::PngError,
    },
    /// The driver cannot do this.
    #[error("{driver} driver does not support {op}")]
    Unsupported {
        /// The driver.
        driver: &'static str,
        /// The operation.
        op: &'static str,
    },
}

/// A way to run VMs on this host. Dyn-safe: the agent holds `Arc<dyn ComputeDriver>`.
///
/// Lifecycle contract: VMs outlive the driver value (dropping the driver does not stop
/// them); after an agent restart, [`ComputeDriver::adopt`] re-attaches to them.
#[async_trait::async_trait]
pub trait ComputeDriver: Send + Sync + std::fmt::Debug {
    /// Driver name, e.g. `qemu`.
    fn name(&self) -> &'static str;

    /// Where this driver's hypervisor records its pid in a VM's run dir. While the file
    /// exists a VM may run there: the agent adopts it after a restart and stops it before
    /// it removes the run dir.
    fn pidfile(&self, run_dir: &std::path::Path) -> PathBuf;

    /// Starts a VM and returns once its hypervisor answers (not when the guest booted).
    async fn start(&self, spec: &VmSpec) -> Result<VmRuntime, ComputeError>;

    /// Stops a VM: orderly first, then forcibly. Returns its final status.
    async fn stop(&self, id: &str) -> Result<VmStatus, ComputeError>;

    /// Current status. Exited VMs stay known (as stopped/crashed) until started again.
    async fn status(&self, id: &str) -> Result<VmStatus, ComputeError>;

    /// Path of the VM's serial console log.
    fn console_path(&self, id: &str) -> Result<PathBuf, ComputeError>;

    /// CPU time the VM has used since its hypervisor started (user + system), when the
    /// driver can tell; `None` when it cannot (the VM is unknown or has exited). What the
    /// agents report and the slice sampler turns into cores in use.
    fn cpu_time(&self, id: &str) -> Option<std::time::Duration> {
        let _ = id;
        None
    }

    /// Re-attaches to a VM left running by a previous agent.
    async fn adopt(&self, id: &str, run_dir: &std::path::Path) -> Result<VmRuntime, ComputeError> {
        let _ = (id, run_dir);
        Err(ComputeError::Unsupported {
            driver: self.name(),
            op: "adopt",
        })
    }

    /// Starts a migration destination: the VM waits for a migration stream on `listen`
    /// (port 0 picks a free port, reported in [`VmRuntime::incoming`]), over TLS when
    /// `tls` is given (the source must present a certificate from the same CA).
    async fn start_incoming(
        &self,
        spec: &VmSpec,
        listen: SocketAddr,
        tls: Option<&MigrationTls>,
    ) -> Result<VmRuntime, ComputeError> {
        let _ = (spec, listen, tls);
        Err(ComputeError::Unsupported {
            driver: self.name(),
            op: "start_incoming",
        })
    }

    /// Pauses the guest's CPUs (the hypervisor keeps running).
    async fn pause(&self, id: &str) -> Result<(), ComputeError> {
        let _ = id;
        Err(ComputeError::Unsupported {
            driver: self.name(),
            op: "pause",
        })
    }

    /// Resumes a paused guest (also a migration destination that arrived paused).
    async fn resume(&self, id: &str) -> Result<(), ComputeError> {
        let _ = id;
        Err(ComputeError::Unsupported {
            driver: self.name(),
            op: "resume",
        })
    }

    /// Performs a terminal operation on the VM: keyboard or pointer input, a power action,
    /// or a screenshot (`op` is validated first: [`ComputeError::InvalidOperation`]).
    ///
    /// Operations on one VM are performed one at a time, in the order the calls were made
    /// (a fair queue per VM), so that the events of one operation are never interleaved
    /// with another's. Input needs a running guest: a paused or migrating one refuses it
    /// ([`ComputeError::InvalidState`]), delivering nothing. `power on` succeeds while the
    /// hypervisor runs and is refused once it exited: starting a VM takes its spec, which
    /// the agent has. Dropping the future in the middle of an operation sent in several
    /// commands (a long text; a combination too large for the keyboard's queue) may leave
    /// it partly performed.
    async fn perform(&self, id: &str, op: &Operation) -> Result<OpOutcome, ComputeError> {
        let _ = (id, op);
        Err(ComputeError::Unsupported {
            driver: self.name(),
            op: "terminal operations",
        })
    }

    /// Live-migrates a running VM to a destination started with
    /// [`ComputeDriver::start_incoming`] (`to_uri` like `tcp:127.0.0.1:4444`).
    async fn migrate(
        &self,
        id: &str,
        to_uri: &str,
        opts: &MigrateOptions,
    ) -> Result<MigrationStats, ComputeError> {
        let _ = (id, to_uri, opts);
        Err(ComputeError::Unsupported {
            driver: self.name(),
            op: "migrate",
        })
    }
}
