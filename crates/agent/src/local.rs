//! A VM's files on this host and the steps to start and stop it.
//!
//! Layout: `<data_dir>/vms/<first 12 hex digits of the id>/` holds `vm-id` (the full
//! id), `disk.img`, `nbd.sock` + `nbd.pid` (the disk server) and the driver's files
//! (`console.log`, `qmp.sock`, pidfile). The short directory name keeps unix socket
//! paths under the 108-byte limit even in a deep checkout.

use std::path::{Path, PathBuf};

use compute::{Accel, ComputeDriver, DiskTarget, NbdListen, QemuNbdDisk, VmSpec};
use model::api::{Assignment, ObservedReport};
use model::VmId;

/// Subdirectory of the data dir holding one directory per VM.
pub const VMS_DIR: &str = "vms";
const NBD_EXPORT: &str = "disk0";

/// What this agent knows about one VM.
#[derive(Debug, Default)]
pub struct LocalVm {
    /// Its hypervisor runs.
    pub running: bool,
    /// The disk server, when started by this agent process.
    pub disk: Option<QemuNbdDisk>,
    /// A start failure for this desired state: (desired state, reason).
    pub failed: Option<(model::DesiredState, String)>,
    /// Why the hypervisor exited on its own, if it did.
    pub exit_note: Option<String>,
    /// The last report sent, to skip identical ones.
    pub last_report: Option<ObservedReport>,
}

impl LocalVm {
    /// The planner's view.
    pub fn have(&self) -> crate::reconcile::Have {
        use crate::reconcile::Have;
        match (&self.failed, self.running) {
            (_, true) => Have::Running,
            (Some((_, r)), false) => Have::Failed(r.clone()),
            (None, false) => Have::Stopped,
        }
    }
}

/// Paths of one VM's files.
#[derive(Clone, Debug)]
pub struct VmFiles {
    dir: PathBuf,
    id: VmId,
}

impl VmFiles {
    /// The files of VM `id` under `data_dir`.
    pub fn new(data_dir: &Path, id: VmId) -> Self {
        let short: String = id.0.simple().to_string().chars().take(12).collect();
        Self {
            dir: data_dir.join(VMS_DIR).join(short),
            id,
        }
    }
    /// The run dir handed to the compute driver.
    pub fn run_dir(&self) -> &Path {
        &self.dir
    }
    /// The id the compute driver knows the VM by.
    pub fn driver_id(&self) -> String {
        self.id.to_string()
    }
    /// The hypervisor's pidfile (see `compute::qemu::files`).
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join(compute::qemu::files::PID)
    }
    fn disk(&self) -> PathBuf {
        self.dir.join("disk.img")
    }
    fn nbd_sock(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }
    fn nbd_pid(&self) -> PathBuf {
        self.dir.join("nbd.pid")
    }
    /// The last `max` bytes of the console log, if any.
    pub fn console_tail(&self, max: u64) -> Option<String> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.dir.join(compute::qemu::files::CONSOLE);
        let mut f = std::fs::File::open(path).ok()?;
        let len = f.metadata().ok()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(max))).ok()?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf).into_owned())
    }
    /// Removes every file of the VM.
    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

/// VM directories found under `data_dir` (from an earlier agent process).
pub fn scan(data_dir: &Path) -> Vec<(VmId, VmFiles)> {
    let Ok(entries) = std::fs::read_dir(data_dir.join(VMS_DIR)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let id: VmId = std::fs::read_to_string(e.path().join("vm-id"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some((id, VmFiles::new(data_dir, id)))
        })
        .collect()
}

/// Errors of starting a VM here.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The VM's files could not be prepared.
    #[error("cannot prepare {path}")]
    Files {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
    /// The image cannot boot on this driver.
    #[error("image {image} has no kernel: the qemu driver boots kernels directly")]
    NoKernel {
        /// The image name.
        image: String,
    },
    /// The disk could not be prepared or served.
    #[error("cannot serve the disk")]
    Disk(#[from] compute::DiskError),
    /// The hypervisor did not start.
    #[error("the hypervisor did not start")]
    Compute(#[from] compute::ComputeError),
}

/// Prepares the disk (first start only), serves it over NBD and boots the VM.
pub async fn start(
    driver: &dyn ComputeDriver,
    files: &VmFiles,
    a: &Assignment,
    accel: Accel,
) -> Result<QemuNbdDisk, StartError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |err| StartError::Files { path, err }
    };
    std::fs::create_dir_all(&files.dir).map_err(io(&files.dir))?;
    std::fs::write(files.dir.join("vm-id"), files.driver_id()).map_err(io(&files.dir))?;
    let (Some(kernel), initrd) = (&a.image.kernel, &a.image.initrd) else {
        return Err(StartError::NoKernel {
            image: a.image.name.to_string(),
        });
    };
    let disk = files.disk();
    if !disk.exists() {
        match &a.image.disk_template {
            Some(t) => {
                compute::prepare_vm_disk(Path::new(t), &disk).await?;
            }
            None => {
                let f = std::fs::File::create(&disk).map_err(io(&disk))?;
                f.set_len(a.image.disk_mib.max(1) << 20)
                    .map_err(io(&disk))?;
            }
        }
    }
    kill_stale_disk_server(files);
    let server = QemuNbdDisk::spawn(&disk, NbdListen::Unix(files.nbd_sock()), NBD_EXPORT).await?;
    std::fs::write(files.nbd_pid(), server.pid().to_string()).map_err(io(&files.nbd_pid()))?;
    let spec = VmSpec {
        id: files.driver_id(),
        name: a.vm.name.to_string(),
        vcpus: a.vm.vcpus,
        memory_mib: u32::try_from(a.vm.memory_mib).unwrap_or(u32::MAX),
        kernel: PathBuf::from(kernel),
        initrd: initrd.as_ref().map(PathBuf::from).unwrap_or_default(),
        cmdline: a.image.cmdline.clone(),
        disk: DiskTarget::NbdUnix {
            path: files.nbd_sock(),
            export: NBD_EXPORT.to_owned(),
        },
        run_dir: files.dir.clone(),
        accel,
    };
    match driver.start(&spec).await {
        Ok(_) => Ok(server),
        Err(e) => {
            let _ = server.stop().await;
            Err(e.into())
        }
    }
}

/// Stops the hypervisor and the disk server (also one left by an earlier agent).
pub async fn stop(driver: &dyn ComputeDriver, files: &VmFiles, vm: &mut LocalVm) {
    if vm.running || files.pidfile().exists() {
        if let Err(e) = driver.stop(&files.driver_id()).await {
            tracing::warn!(vm = %files.driver_id(), error = %e, "stop failed");
        }
    }
    vm.running = false;
    if let Some(disk) = vm.disk.take() {
        let _ = disk.stop().await;
    }
    kill_stale_disk_server(files);
}

/// A disk server started by a previous agent process is not our child: find it by its
/// pidfile, check that it really is qemu-nbd, and end it.
fn kill_stale_disk_server(files: &VmFiles) {
    let Ok(pid) = std::fs::read_to_string(files.nbd_pid()) else {
        return;
    };
    let _ = std::fs::remove_file(files.nbd_pid());
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return;
    };
    let is_qemu_nbd = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0)
                .next()
                .is_some_and(|a0| a0.ends_with(b"qemu-nbd"))
        })
        .unwrap_or(false);
    if is_qemu_nbd {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}
