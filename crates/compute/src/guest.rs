//! vinfra's guest images, built offline from Debian packages, each reporting on its serial
//! console ([`GuestKind`]):
//! - `default`: a Debian kernel and a busybox initramfs whose `/init` runs a disk workload
//!   (`scripts/build-guest.sh`);
//! - `debian`: a Debian kernel, a small initramfs that mounts an ext4 root file system made
//!   with mmdebstrap (systemd, PostgreSQL 15 with pgbench, fio), whose workload is chosen
//!   with `vinfra.workload=` (`scripts/build-guest-debian.sh`).
//!
//! The builder scripts are embedded in the binary, so this works outside the repository.
//! Images are cached in a directory per kind; a cache entry is used only if its
//! `manifest.json` matches the embedded builder and every file's size and sha256.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// `scripts/build-guest.sh`, embedded.
pub const BUILD_SCRIPT: &str = include_str!("../../../scripts/build-guest.sh");
/// `scripts/build-guest-debian.sh`, embedded.
pub const BUILD_SCRIPT_DEBIAN: &str = include_str!("../../../scripts/build-guest-debian.sh");

const MANIFEST_FORMAT: u32 = 1;

/// Which guest image to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GuestKind {
    /// The busybox guest with a disk loop (~10 MiB, boots in seconds under TCG).
    Default,
    /// Debian bookworm with systemd, PostgreSQL 15 + pgbench and fio on an ext4 root
    /// (1.5 GiB sparse disk, ~0.75 GiB used; READY in ~15 s under TCG).
    Debian,
}

impl GuestKind {
    /// Every kind, for help texts and errors.
    pub const ALL: [GuestKind; 2] = [GuestKind::Default, GuestKind::Debian];

    /// Its name: the image directory in the cache and the image name it is uploaded as.
    pub fn name(self) -> &'static str {
        match self {
            GuestKind::Default => "default",
            GuestKind::Debian => "debian",
        }
    }

    /// The kind called `name`.
    pub fn from_name(name: &str) -> Option<GuestKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The embedded builder script.
    pub fn script(self) -> &'static str {
        match self {
            GuestKind::Default => BUILD_SCRIPT,
            GuestKind::Debian => BUILD_SCRIPT_DEBIAN,
        }
    }

    fn builder_sha256(self) -> String {
        hex(Sha256::digest(self.script().as_bytes()))
    }
}

impl std::fmt::Display for GuestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A bootable guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestImage {
    /// Kernel for `-kernel`.
    pub kernel: PathBuf,
    /// Initramfs for `-initrd`.
    pub initrd: PathBuf,
    /// Raw disk template: copy it per VM (see [`crate::prepare_vm_disk`]).
    pub disk_template: PathBuf,
    /// Kernel command line to boot with (append `vinfra.ticks=N` to power off after N ticks).
    pub cmdline: String,
    /// The Debian kernel package it came from.
    pub kernel_package: String,
    /// The pgbench scale factor of the database in the image (the `debian` image).
    pub pgbench_scale: Option<u32>,
}

/// Errors getting the guest image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuestImageError {
    /// A file operation failed.
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
    /// The cached image is incomplete or stale (rebuilt by [`ensure_default_image`]).
    #[error("guest image in {dir} is not valid: {reason}")]
    Invalid {
        /// The image dir.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The builder failed.
    #[error("building the {kind} guest image failed ({status}); needs root, apt, busybox-static and for debian mmdebstrap and kmod (scripts/setup.sh): {stderr}")]
    Build {
        /// Which image.
        kind: GuestKind,
        /// Exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
}

#[derive(Debug, Deserialize)]
struct Manifest {
    format: u32,
    builder_sha256: String,
    kernel_package: String,
    cmdline: String,
    #[serde(default)]
    pgbench_scale: Option<u32>,
    files: std::collections::BTreeMap<String, FileEntry>,
}

#[derive(Debug, Deserialize)]
struct FileEntry {
    size: u64,
    sha256: String,
}

/// `$VINFRA_GUEST_CACHE`, else `/var/cache/vinfra/guest`.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("VINFRA_GUEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/vinfra/guest"))
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> GuestImageError {
    let path = path.to_owned();
    move |err| GuestImageError::Io { action, path, err }
}

fn sha256_file(path: &Path) -> Result<String, GuestImageError> {
    let mut f = std::fs::File::open(path).map_err(io("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            return Ok(hex(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Loads and verifies the default image in `dir` (built by `scripts/build-guest.sh dir`).
pub fn load_image(dir: &Path) -> Result<GuestImage, GuestImageError> {
    load_image_of(GuestKind::Default, dir)
}

/// Loads and verifies the image of `kind` in `dir` (built by its script).
pub fn load_image_of(kind: GuestKind, dir: &Path) -> Result<GuestImage, GuestImageError> {
    let invalid = |reason: String| GuestImageError::Invalid {
        dir: dir.to_owned(),
        reason,
    };
    let mpath = dir.join("manifest.json");
    let body = match std::fs::read(&mpath) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid("no manifest.json".into()))
        }
        Err(e) => return Err(io("read", &mpath)(e)),
    };
    let m: Manifest =
        serde_json::from_slice(&body).map_err(|e| invalid(format!("bad manifest.json: {e}")))?;
    if m.format != MANIFEST_FORMAT {
        return Err(invalid(format!("manifest format {}", m.format)));
    }
    if m.builder_sha256 != kind.builder_sha256() {
        return Err(invalid(
            "built by another version of its builder script".into(),
        ));
    }
    for name in ["vmlinuz", "initramfs.cpio.gz", "disk.img"] {
        let e = m
            .files
            .get(name)
            .ok_or_else(|| invalid(format!("manifest lacks {name}")))?;
        let p = dir.join(name);
        let size = match std::fs::metadata(&p) {
            Ok(md) => md.len(),
            Err(_) => return Err(invalid(format!("{name} missing"))),
        };
        if size != e.size {
            return Err(invalid(format!(
                "{name} is {size} bytes, manifest says {}",
                e.size
            )));
        }
        if sha256_file(&p)? != e.sha256 {
            return Err(invalid(format!("{name} sha256 mismatch")));
        }
    }
    Ok(GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initramfs.cpio.gz"),
        disk_template: dir.join("disk.img"),
        cmdline: m.cmdline,
        kernel_package: m.kernel_package,
        pgbench_scale: m.pgbench_scale,
    })
}

/// Returns the cached default guest image under `cache_dir`, building it first if it is
/// missing, incomplete or stale. `progress` gets the builder's progress lines.
///
/// Blocking (it may download ~70 MiB and take ~10 s): call it from `spawn_blocking` in
/// async code. Concurrent callers (threads or processes) serialize on a lock file, and the
/// builder publishes the image with a rename, so nobody sees half an image.
pub fn ensure_default_image(
    cache_dir: &Path,
    progress: impl Fn(&str),
) -> Result<GuestImage, GuestImageError> {
    ensure_image(GuestKind::Default, cache_dir, progress)
}

/// [`ensure_default_image`] for any kind. The `debian` image takes ~2 minutes to build
/// (mmdebstrap downloads ~150 MiB of packages) and ~0.5 GiB in the cache.
pub fn ensure_image(
    kind: GuestKind,
    cache_dir: &Path,
    progress: impl Fn(&str),
) -> Result<GuestImage, GuestImageError> {
    let dir = cache_dir.join(kind.name());
    if let Ok(img) = load_image_of(kind, &dir) {
        return Ok(img);
    }
    std::fs::create_dir_all(cache_dir).map_err(io("create", cache_dir))?;
    let lock_path = cache_dir.join(".build.lock");
    let lock = std::fs::File::create(&lock_path).map_err(io("create", &lock_path))?;
    lock.lock().map_err(io("lock", &lock_path))?;
    // Someone may have built it while we waited for the lock.
    match load_image_of(kind, &dir) {
        Ok(img) => return Ok(img),
        Err(e) => progress(&format!("building guest image: {e}")),
    }
    remove_stale_builds(kind, cache_dir);
    run_builder(kind, &dir, &progress)?;
    let img = load_image_of(kind, &dir)?;
    progress(&format!("guest image ready in {}", dir.display()));
    Ok(img)
}

/// Removes what a killed builder left behind (`default.tmp.PID`, `default.old.PID`). Only
/// called under the build lock, so no live build owns them. A killed Debian build may
/// also leave mounts under its `rootfs`: those are unmounted first (never followed).
fn remove_stale_builds(kind: GuestKind, cache_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    let prefixes = [format!("{kind}.tmp."), format!("{kind}.old.")];
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            tracing::info!(path = %e.path().display(), "removing stale guest build");
            unmount_under(&e.path());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Lazily unmounts whatever is mounted under `dir` (deepest first), so that removing a
/// killed build's chroot cannot descend into the host's `/dev` or `/proc`.
fn unmount_under(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut under: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in under {
        let st = Command::new("umount")
            .args(["-l", m])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        tracing::info!(
            mount = m,
            ok = st.is_ok_and(|s| s.success()),
            "unmounted stale build mount"
        );
    }
}

fn run_builder(
    kind: GuestKind,
    dir: &Path,
    progress: &dyn Fn(&str),
) -> Result<(), GuestImageError> {
    let mut child = Command::new("bash")
        .arg("-s")
        .arg(dir)
        .env("GUEST_BUILDER_SHA256", kind.builder_sha256())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("run bash for", dir))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(kind.script().as_bytes())
            .map_err(io("feed the builder script for", dir))?;
    }
    // stderr on its own thread so neither pipe can fill up and stall the builder.
    let err_thread = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = e.read_to_string(&mut s);
            s
        })
    });
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            match line {
                Ok(l) => {
                    tracing::debug!(line = %l, "build-guest");
                    progress(&l);
                }
                Err(_) => break,
            }
        }
    }
    let status = child.wait().map_err(io("wait for the builder of", dir))?;
    let stderr = err_thread.and_then(|t| t.join().ok()).unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(GuestImageError::Build {
            kind,
            status: status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_have_names_and_their_own_builders() {
        assert_eq!(GuestKind::from_name("debian"), Some(GuestKind::Debian));
        assert_eq!(GuestKind::from_name("default"), Some(GuestKind::Default));
        assert_eq!(GuestKind::from_name("ubuntu"), None);
        assert_ne!(
            GuestKind::Default.builder_sha256(),
            GuestKind::Debian.builder_sha256()
        );
        assert!(GuestKind::Debian.script().contains("mmdebstrap"));
    }

    #[test]
    fn stale_build_dirs_are_removed_but_the_image_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        for d in [
            "default",
            "default.tmp.123",
            "default.old.9",
            "debian.tmp.5",
            "other",
        ] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        remove_stale_builds(GuestKind::Default, dir.path());
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["debian.tmp.5", "default", "other"]);
    }

    #[test]
    fn rejects_missing_and_tampered_images() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(matches!(
            load_image(d),
            Err(GuestImageError::Invalid { .. })
        ));
        for (n, body) in [
            ("vmlinuz", "k"),
            ("initramfs.cpio.gz", "i"),
            ("disk.img", "d"),
        ] {
            std::fs::write(d.join(n), body).unwrap();
        }
        let entry = |n: &str| {
            let p = d.join(n);
            format!(
                "\"{n}\": {{\"size\": 1, \"sha256\": \"{}\"}}",
                sha256_file(&p).unwrap()
            )
        };
        let manifest = |builder: &str| {
            format!(
                "{{\"format\": 1, \"builder_sha256\": \"{builder}\", \"kernel_package\": \"linux-image-x\", \"kernel_version\": \"x\", \"cmdline\": \"console=ttyS0\", \"disk_mib\": 1, \"files\": {{{}, {}, {}}}}}",
                entry("vmlinuz"),
                entry("initramfs.cpio.gz"),
                entry("disk.img")
            )
        };
        std::fs::write(
            d.join("manifest.json"),
            manifest(&GuestKind::Default.builder_sha256()),
        )
        .unwrap();
        let img = load_image(d).unwrap();
        assert_eq!(img.cmdline, "console=ttyS0");
        assert_eq!(img.kernel, d.join("vmlinuz"));
        // Same size, other content.
        std::fs::write(d.join("initramfs.cpio.gz"), "X").unwrap();
        let e = load_image(d).unwrap_err();
        assert!(e.to_string().contains("sha256"), "{e}");
        std::fs::write(d.join("initramfs.cpio.gz"), "i").unwrap();
        // Built by another builder.
        std::fs::write(d.join("manifest.json"), manifest("0000")).unwrap();
        assert!(load_image(d)
            .unwrap_err()
            .to_string()
            .contains("another version"));
        // The Debian builder's manifest does not pass for the default image, nor the reverse.
        std::fs::write(
            d.join("manifest.json"),
            manifest(&GuestKind::Debian.builder_sha256()),
        )
        .unwrap();
        assert!(load_image(d).is_err());
        assert!(load_image_of(GuestKind::Debian, d).is_ok());
        std::fs::write(d.join("manifest.json"), "{").unwrap();
        assert!(load_image(d).is_err());
    }
}
