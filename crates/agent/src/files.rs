//! The on-disk layout of this host's VMs: a leaf module (it imports nothing of the
//! agent), so the VM tasks, the NIC plumbing and the link relay all find a VM's files
//! the same way without importing each other.
//!
//! Layout: `<data_dir>/vms/<first 12 hex digits of the id>/` holds `vm-id` (the full
//! id), `cache/` (the VM's block cache on this host), `cps` (its named NICs, for the
//! link relay) and the driver's files (`console.log`, `qmp.sock`, pidfile). The short
//! directory name keeps unix socket paths under the 108-byte limit even in a deep
//! checkout. The disk itself (the origin) lives in the shared origin dir, see
//! [`crate::disks`].

use std::path::{Path, PathBuf};

use model::VmId;

/// Subdirectory of the data dir holding one directory per VM.
pub const VMS_DIR: &str = "vms";

/// The file in a VM's run dir naming its CPs (named NICs), one per line: how the link
/// relay finds the guest that owns a CP, also after an agent restart.
pub const CPS_FILE: &str = "cps";

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
    /// The VM.
    pub fn id(&self) -> VmId {
        self.id
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
    /// Where a block-trace recording of the VM's disk is written until uploaded.
    pub fn trace_file(&self) -> PathBuf {
        self.dir.join("trace.csv")
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
