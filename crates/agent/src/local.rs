//! A VM's files on this host and the steps to start and stop it.
//!
//! Layout: `<data_dir>/vms/<first 12 hex digits of the id>/` holds `vm-id` (the full
//! id), `cache/` (the VM's block cache on this host) and the driver's files
//! (`console.log`, `qmp.sock`, pidfile). The short directory name keeps unix socket
//! paths under the 108-byte limit even in a deep checkout. The disk itself (the
//! origin) lives in the shared origin dir, see [`crate::disks`].

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cache::BlockCache;
use compute::{Accel, ComputeDriver, DiskTarget, VmSpec};
use model::api::{Assignment, ObservedReport};
use model::VmId;

use crate::disks::{guest_export, DiskStack};
use crate::images::{ImageFiles, ImagePaths};
use crate::migrate::MigLocal;
use crate::netdev;

/// A failed start is retried after this long (a transient cause, e.g. a busy port or
/// a full disk that was cleaned, should not need the user to stop and start the VM).
pub const RETRY_FAILED_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// Subdirectory of the data dir holding one directory per VM.
pub const VMS_DIR: &str = "vms";

/// What this agent knows about one VM.
#[derive(Debug, Default)]
pub struct LocalVm {
    /// Its hypervisor runs (the guest executes here).
    pub running: bool,
    /// Its block cache on this host, when open.
    pub cache: Option<Arc<BlockCache>>,
    /// Saves the cache's heat map and pattern every few seconds (a hit-only workload
    /// journals nothing), so that they too survive a crash.
    pub checkpointer: Option<cache::Checkpointer>,
    /// A start failure for this desired state: (desired state, reason).
    pub failed: Option<(model::DesiredState, String)>,
    /// When the start failed: it is retried after [`RETRY_FAILED_AFTER`].
    pub failed_at: Option<std::time::Instant>,
    /// Why the hypervisor exited on its own, if it did.
    pub exit_note: Option<String>,
    /// The last report sent, to skip identical ones.
    pub last_report: Option<ObservedReport>,
    /// This host's part in a live migration of the VM.
    pub mig: Option<MigLocal>,
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
    /// The VM's cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.join("cache")
    }
    /// Creates the run dir and records the VM id in it (found again by [`scan`]).
    pub fn create(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(self.dir.join("vm-id"), self.driver_id())
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
    /// The image's files are not on this host and cannot be fetched.
    #[error("the image's files are not here")]
    Image(#[source] Box<crate::images::ImageError>),
    /// The image cannot boot on this driver.
    #[error("image {image} has no kernel: the qemu driver boots kernels directly")]
    NoKernel {
        /// The image name.
        image: String,
    },
    /// The disk stack failed.
    #[error("cannot serve the disk")]
    Disk(#[from] crate::disks::DiskError),
    /// The hypervisor did not start.
    #[error("the hypervisor did not start")]
    Compute(#[from] compute::ComputeError),
    /// The VM's NICs could not be plugged.
    #[error("cannot plug the VM's NICs")]
    Netdev(#[from] crate::netdev::NetdevError),
    /// A blocking task died.
    #[error("a background task failed")]
    Join(#[from] tokio::task::JoinError),
}

impl From<crate::images::ImageError> for StartError {
    fn from(e: crate::images::ImageError) -> Self {
        StartError::Image(Box::new(e))
    }
}

/// The VM's spec for the driver, with its disk on this host's NBD server.
pub fn vm_spec(
    files: &VmFiles,
    a: &Assignment,
    image: &ImagePaths,
    accel: Accel,
    nbd: SocketAddr,
) -> Result<VmSpec, StartError> {
    let Some(kernel) = &image.kernel else {
        return Err(StartError::NoKernel {
            image: a.image.name.to_string(),
        });
    };
    Ok(VmSpec {
        id: files.driver_id(),
        name: a.vm.name.to_string(),
        vcpus: a.vm.vcpus,
        memory_mib: u32::try_from(a.vm.memory_mib).unwrap_or(u32::MAX),
        kernel: kernel.clone(),
        initrd: image.initrd.clone().unwrap_or_default(),
        cmdline: [
            a.image.cmdline.as_str(),
            &netdev::kernel_args(&a.vm.nics),
            a.vm.kernel_args.as_deref().unwrap_or_default(),
        ]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" "),
        disk: DiskTarget::NbdTcp {
            host: Ipv4Addr::LOCALHOST.to_string(),
            port: nbd.port(),
            export: guest_export(a.vm.id),
        },
        nics: netdev::attachments(&files.dir, &a.vm.nics),
        run_dir: files.dir.clone(),
        accel,
    })
}

/// Opens the VM's cache on this host unless it is open (after an agent restart this
/// verifies every cached block), creating the origin image first if needed.
pub async fn ensure_cache(
    disks: &Arc<DiskStack>,
    files: &VmFiles,
    a: &Assignment,
    image: &ImagePaths,
    vm: &mut LocalVm,
) -> Result<Arc<BlockCache>, StartError> {
    if let Some(c) = &vm.cache {
        return Ok(c.clone());
    }
    files.create().map_err(|err| StartError::Files {
        path: files.dir.clone(),
        err,
    })?;
    disks
        .ensure_origin(a.vm.id, image.disk_template.as_deref(), a.image.disk_mib)
        .await?;
    let (d, id, dir) = (disks.clone(), a.vm.id, files.cache_dir());
    let cache = tokio::task::spawn_blocking(move || d.open_cache(id, &dir)).await??;
    vm.checkpointer = Some(cache.spawn_checkpointer(std::time::Duration::from_secs(5)));
    vm.cache = Some(cache.clone());
    Ok(cache)
}

/// Opens the cache, exports the disk through it, plugs the NICs and boots the VM.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    driver: &dyn ComputeDriver,
    disks: &Arc<DiskStack>,
    images: &ImageFiles,
    files: &VmFiles,
    a: &Assignment,
    accel: Accel,
    nics: netdev::Plumbing<'_>,
    vm: &mut LocalVm,
) -> Result<(), StartError> {
    let image = images.paths(&a.image).await?;
    let spec = vm_spec(files, a, &image, accel, disks.addr())?;
    let cache = ensure_cache(disks, files, a, &image, vm).await?;
    nics.plug(&files.dir, &a.vm.nics).await?;
    disks.export(a.vm.id, &cache);
    driver.start(&spec).await?;
    Ok(())
}

/// Serves the disk of a VM whose hypervisor this agent adopted (it kept running while
/// the agent was down): reopens its cache, verifying every block, and exports it again,
/// so that the guest's NBD client, retrying meanwhile, finds its disk.
pub async fn reattach(
    disks: &Arc<DiskStack>,
    images: &ImageFiles,
    files: &VmFiles,
    a: &Assignment,
    vm: &mut LocalVm,
) -> Result<(), StartError> {
    let image = images.paths(&a.image).await?;
    let cache = ensure_cache(disks, files, a, &image, vm).await?;
    disks.export(a.vm.id, &cache);
    Ok(())
}

/// Stops the hypervisor (if any) and the VM's exports; closes its cache.
pub async fn stop(
    driver: &dyn ComputeDriver,
    disks: &DiskStack,
    files: &VmFiles,
    vm: &mut LocalVm,
) {
    if vm.running || driver.pidfile(files.run_dir()).exists() {
        if let Err(e) = driver.stop(&files.driver_id()).await {
            tracing::warn!(vm = %files.driver_id(), error = %e, "stop failed");
        }
    }
    vm.running = false;
    netdev::unplug(&files.dir);
    disks.unexport(files.id);
    vm.checkpointer = None;
    if let Some(c) = vm.cache.take() {
        match tokio::task::spawn_blocking(move || c.checkpoint()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot checkpoint the cache"),
            Err(e) => tracing::warn!(error = %e, "cache checkpoint task failed"),
        }
    }
}
