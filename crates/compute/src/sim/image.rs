//! A guest image for the sim driver: placeholder kernel and initrd files (the image
//! store and the agent's image fetch still handle real files), and a disk template laid
//! out like the default image's (every MiB begins with `BLK%06d`), so the simulated
//! guest's read checks pass. Made in milliseconds, without root or downloads.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use crate::guest::{GuestImage, GuestImageError};

/// Word in a sim image's kernel command line: it boots on the sim driver only.
pub const SIM_IMAGE_MARK: &str = "vinfra.sim_image=1";

const KERNEL: &str = "vinfra sim placeholder kernel: this image boots on the sim compute \
                      driver only (vinfra agent --driver sim)\n";
const INITRD: &str = "vinfra sim placeholder initrd\n";

/// Writes the sim image into `dir` (kernel, initrd, a `disk_mib` MiB sparse disk
/// template), replacing what is there, and returns it.
pub fn write_image(dir: &Path, disk_mib: u64) -> Result<GuestImage, GuestImageError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |err| GuestImageError::Io { action, path, err }
    };
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.cpio.gz");
    let disk = dir.join("disk.img");
    std::fs::write(&kernel, KERNEL).map_err(io("write", &kernel))?;
    std::fs::write(&initrd, INITRD).map_err(io("write", &initrd))?;
    let tmp = dir.join("disk.img.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.set_len(disk_mib.max(2) << 20).map_err(io("size", &tmp))?;
    for m in 0..disk_mib.max(2) {
        f.seek(SeekFrom::Start(m << 20))
            .and_then(|_| f.write_all(format!("{}\n", super::guest::block_header(m)).as_bytes()))
            .map_err(io("write", &tmp))?;
    }
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, &disk).map_err(io("rename", &disk))?;
    Ok(GuestImage {
        kernel,
        initrd,
        disk_template: disk,
        cmdline: format!("console=ttyS0 quiet {SIM_IMAGE_MARK}"),
        kernel_package: "none (sim driver placeholder)".into(),
        pgbench_scale: None,
    })
}
