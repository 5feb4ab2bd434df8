//! The I/O steps of a VM's life on this host: start (image files, cache, disk export,
//! NICs, hypervisor), reattach an adopted VM's disk, and stop. The VM task
//! ([`crate::vm`]) calls them; the on-disk layout is [`crate::files`].

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use cache::BlockCache;
use compute::{Accel, ComputeDriver, DiskTarget, VmSpec};
use model::api::Assignment;

use crate::disks::{guest_export, DiskStack};
use crate::files::VmFiles;
use crate::images::{ImageFiles, ImagePaths};
use crate::netdev;

/// A VM's disk on this host: its block cache, when open, and what checkpoints it.
#[derive(Debug, Default)]
pub struct VmDisk {
    /// Its block cache on this host, when open.
    pub cache: Option<Arc<BlockCache>>,
    /// Saves the cache's heat map and pattern every few seconds (a hit-only workload
    /// journals nothing), so that they too survive a crash.
    pub checkpointer: Option<cache::Checkpointer>,
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
    /// The VM's resource tables cannot be mapped.
    #[error("cannot map the vm's resource tables")]
    Tables(#[from] crate::tables::TableAttachError),
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
        nics: netdev::attachments(files.run_dir(), &a.vm.nics),
        run_dir: files.run_dir().to_owned(),
        accel,
        tables: Vec::new(),
    })
}

/// Opens the VM's cache on this host unless it is open (after an agent restart this
/// verifies every cached block), creating the origin image first if needed.
pub async fn ensure_cache(
    disks: &Arc<DiskStack>,
    files: &VmFiles,
    a: &Assignment,
    image: &ImagePaths,
    vm: &mut VmDisk,
) -> Result<Arc<BlockCache>, StartError> {
    if let Some(c) = &vm.cache {
        return Ok(c.clone());
    }
    files.create().map_err(|err| StartError::Files {
        path: files.run_dir().to_owned(),
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

/// Opens the cache, exports the disk through it, plugs the NICs and boots the VM with
/// its windows on resource tables (`tables`, from `tables::attach_vm`).
#[allow(clippy::too_many_arguments)]
pub async fn start(
    driver: &dyn ComputeDriver,
    disks: &Arc<DiskStack>,
    images: &ImageFiles,
    files: &VmFiles,
    a: &Assignment,
    accel: Accel,
    nics: netdev::Plumbing,
    tables: Vec<compute::TableAttach>,
    vm: &mut VmDisk,
) -> Result<(), StartError> {
    let image = images.paths(&a.image).await?;
    let mut spec = vm_spec(files, a, &image, accel, disks.addr())?;
    spec.tables = tables;
    let cache = ensure_cache(disks, files, a, &image, vm).await?;
    nics.plug(files.run_dir(), a.vm.name.as_str(), &a.vm.nics)
        .await?;
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
    vm: &mut VmDisk,
) -> Result<(), StartError> {
    let image = images.paths(&a.image).await?;
    let cache = ensure_cache(disks, files, a, &image, vm).await?;
    disks.export(a.vm.id, &cache);
    Ok(())
}

/// Stops the hypervisor (if `running`, or if its pidfile says a process may be
/// there) and the VM's exports; checkpoints and closes its cache.
pub async fn stop(
    driver: &dyn ComputeDriver,
    disks: &DiskStack,
    files: &VmFiles,
    running: bool,
    vm: &mut VmDisk,
) {
    if running || driver.pidfile(files.run_dir()).exists() {
        if let Err(e) = driver.stop(&files.driver_id()).await {
            tracing::warn!(vm = %files.driver_id(), error = %e, "stop failed");
        }
    }
    netdev::unplug(files.run_dir());
    disks.unexport(files.id());
    vm.checkpointer = None;
    if let Some(c) = vm.cache.take() {
        match tokio::task::spawn_blocking(move || c.checkpoint()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot checkpoint the cache"),
            Err(e) => tracing::warn!(error = %e, "cache checkpoint task failed"),
        }
    }
}
