//! VM disks until the block cache serves them: per-VM copies of a template, exported by
//! `qemu-nbd`.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::DiskTarget;

const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep the end of qemu-nbd's stderr for error messages, not all of it.
const STDERR_KEEP: usize = 4096;

/// Errors of the disk helpers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
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
    /// qemu-nbd could not be started.
    #[error("cannot run qemu-nbd (install qemu-utils with scripts/setup.sh)")]
    Spawn(#[source] std::io::Error),
    /// qemu-nbd exited before serving.
    #[error("qemu-nbd for {image} exited before serving ({status}): {stderr}")]
    Exited {
        /// The image.
        image: PathBuf,
        /// Its exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// qemu-nbd did not accept connections in time.
    #[error("qemu-nbd for {image} did not accept connections within {timeout:?}")]
    NotReady {
        /// The image.
        image: PathBuf,
        /// How long we waited.
        timeout: Duration,
    },
    /// Bad arguments.
    #[error("invalid nbd disk arguments: {0}")]
    Invalid(String),
}

/// Where `qemu-nbd` listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdListen {
    /// A unix socket path (under 108 bytes).
    Unix(PathBuf),
    /// A TCP address; port 0 picks a free port.
    Tcp(SocketAddr),
}

/// A running `qemu-nbd` exporting one raw image. Killed on [`QemuNbdDisk::stop`] or drop.
#[derive(Debug)]
pub struct QemuNbdDisk {
    child: tokio::process::Child,
    pid: u32,
    image: PathBuf,
    target: DiskTarget,
}

impl QemuNbdDisk {
    /// Starts `qemu-nbd -f raw -e 8 -t` on `image` and returns once it accepts connections.
    ///
    /// `-e 8` (8 clients) because a migration destination QEMU connects while the source
    /// still is (with the default of 1 it hangs in negotiation); `-t` so it does not exit when
    /// its last client leaves.
    pub async fn spawn(image: &Path, listen: NbdListen, export: &str) -> Result<Self, DiskError> {
        if export.is_empty() || export.len() > 4096 {
            return Err(DiskError::Invalid(
                "export name must be 1..=4096 bytes".into(),
            ));
        }
        if !image.is_file() {
            return Err(DiskError::Invalid(format!(
                "image {} is not a file",
                image.display()
            )));
        }
        match listen {
            NbdListen::Unix(path) => {
                if path.as_os_str().len() > 107 {
                    return Err(DiskError::Invalid(format!(
                        "socket path {} is longer than 107 bytes",
                        path.display()
                    )));
                }
                let _ = std::fs::remove_file(&path);
                let target = DiskTarget::NbdUnix {
                    path: path.clone(),
                    export: export.to_owned(),
                };
                let args = vec!["-k".into(), path.to_string_lossy().into_owned()];
                Self::try_spawn(image, args, export, target).await
            }
            NbdListen::Tcp(addr) if addr.port() != 0 => {
                let target = DiskTarget::NbdTcp {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                    export: export.to_owned(),
                };
                Self::try_spawn(image, tcp_args(addr), export, target).await
            }
            NbdListen::Tcp(addr) => {
                // qemu-nbd cannot report a port it picked, so we pick one; another process
                // may take it in between, hence a few attempts.
                let mut last = None;
                for _ in 0..5 {
                    let port = free_port(addr)?;
                    let a = SocketAddr::new(addr.ip(), port);
                    let target = DiskTarget::NbdTcp {
                        host: addr.ip().to_string(),
                        port,
                        export: export.to_owned(),
                    };
                    match Self::try_spawn(image, tcp_args(a), export, target).await {
                        Err(DiskError::Exited { stderr, .. })
                            if stderr.contains("Address already in use") =>
                        {
                            last = Some(stderr);
                        }
                        r => return r,
                    }
                }
                Err(DiskError::Exited {
                    image: image.to_owned(),
                    status: "port in use 5 times".into(),
                    stderr: last.unwrap_or_default(),
                })
            }
        }
    }

    async fn try_spawn(
        image: &Path,
        listen_args: Vec<String>,
        export: &str,
        target: DiskTarget,
    ) -> Result<Self, DiskError> {
        let mut child = tokio::process::Command::new("qemu-nbd")
            .args(["-f", "raw", "-e", "8", "-t", "-x", export])
            .args(&listen_args)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(DiskError::Spawn)?;
        let pid = child.id().unwrap_or_default();
        // Drain stderr so qemu-nbd never blocks on a full pipe; keep the tail for errors.
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let keep = stderr.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut s = keep.lock().expect("stderr lock poisoned");
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if s.len() > STDERR_KEEP {
                        let cut = s.len() - STDERR_KEEP;
                        let cut = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                        s.drain(..cut);
                    }
                }
            });
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                // Give the stderr drain a moment to catch the last words.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Err(DiskError::Exited {
                    image: image.to_owned(),
                    status: st.to_string(),
                    stderr: stderr
                        .lock()
                        .expect("stderr lock poisoned")
                        .trim()
                        .to_owned(),
                });
            }
            if probe(&target).await {
                tracing::debug!(pid, image = %image.display(), "qemu-nbd ready");
                return Ok(Self {
                    child,
                    pid,
                    image: image.to_owned(),
                    target,
                });
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                return Err(DiskError::NotReady {
                    image: image.to_owned(),
                    timeout: READY_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The disk as a VM sees it.
    pub fn target(&self) -> DiskTarget {
        self.target.clone()
    }

    /// qemu-nbd's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exported image.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// Kills qemu-nbd and waits for it to exit.
    pub async fn stop(mut self) -> Result<(), DiskError> {
        let _ = self.child.start_kill();
        self.child.wait().await.map_err(|err| DiskError::Io {
            action: "wait for qemu-nbd serving",
            path: self.image.clone(),
            err,
        })?;
        if let DiskTarget::NbdUnix { path, .. } = &self.target {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }
}

fn tcp_args(a: SocketAddr) -> Vec<String> {
    vec![
        "-b".into(),
        a.ip().to_string(),
        "-p".into(),
        a.port().to_string(),
    ]
}

fn free_port(addr: SocketAddr) -> Result<u16, DiskError> {
    let l = TcpListener::bind(SocketAddr::new(addr.ip(), 0)).map_err(|err| DiskError::Io {
        action: "bind a free port on",
        path: PathBuf::from(addr.ip().to_string()),
        err,
    })?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|err| DiskError::Io {
            action: "read local address of",
            path: PathBuf::from(Ipv4Addr::LOCALHOST.to_string()),
            err,
        })
}

/// Whether an NBD server greets on `target` (newstyle servers send "NBDMAGIC" at once).
async fn probe(target: &DiskTarget) -> bool {
    let mut magic = [0u8; 8];
    let read = async {
        match target {
            DiskTarget::NbdUnix { path, .. } => {
                let mut s = tokio::net::UnixStream::connect(path).await?;
                s.read_exact(&mut magic).await
            }
            DiskTarget::NbdTcp { host, port, .. } => {
                let mut s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                s.read_exact(&mut magic).await
            }
            DiskTarget::File(_) => Ok(0),
        }
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), read).await,
        Ok(Ok(_))
    ) && &magic == b"NBDMAGIC"
}

/// Creates a VM's own disk from a template, unless it exists already (a VM's disk holds its
/// data: it is never overwritten). Returns whether it was created. The copy is sparse and
/// reflinked where the filesystem allows, and appears under `dest` only when complete.
pub async fn prepare_vm_disk(template: &Path, dest: &Path) -> Result<bool, DiskError> {
    if dest.exists() {
        return Ok(false);
    }
    if !template.is_file() {
        return Err(DiskError::Invalid(format!(
            "template {} is not a file",
            template.display()
        )));
    }
    let mut tmp = dest.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let cp = tokio::process::Command::new("cp")
        .args(["--reflink=auto", "--sparse=always"])
        .arg(template)
        .arg(&tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    let copied = match cp {
        Ok(st) if st.success() => Ok(()),
        // No GNU cp: a plain copy is correct, just not sparse.
        _ => tokio::fs::copy(template, &tmp).await.map(drop),
    };
    let res = match copied {
        Ok(()) => tokio::fs::rename(&tmp, dest).await,
        Err(e) => Err(e),
    };
    res.map_err(|err| {
        let _ = std::fs::remove_file(&tmp);
        DiskError::Io {
            action: "copy disk template to",
            path: dest.to_owned(),
            err,
        }
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn prepare_copies_once_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t.img");
        std::fs::write(&t, b"BLK000000\n").unwrap();
        let d = dir.path().join("vm.img");
        assert!(prepare_vm_disk(&t, &d).await.unwrap());
        assert_eq!(std::fs::read(&d).unwrap(), b"BLK000000\n");
        std::fs::write(&d, b"guest data").unwrap();
        assert!(!prepare_vm_disk(&t, &d).await.unwrap());
        assert_eq!(std::fs::read(&d).unwrap(), b"guest data");
        let e = prepare_vm_disk(&dir.path().join("nope"), &dir.path().join("x"))
            .await
            .unwrap_err();
        assert!(matches!(e, DiskError::Invalid(_)));
    }

    #[tokio::test]
    async fn qemu_nbd_serves_on_a_free_tcp_port_and_stops() {
        if which("qemu-nbd").is_none() {
            panic!("qemu-nbd missing: run scripts/setup.sh");
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let d = QemuNbdDisk::spawn(&img, NbdListen::Tcp("127.0.0.1:0".parse().unwrap()), "d0")
            .await
            .unwrap();
        let DiskTarget::NbdTcp { port, .. } = d.target() else {
            panic!("not tcp")
        };
        assert_ne!(port, 0);
        // Two clients at once (migration source + destination) must both get a greeting.
        let t = d.target();
        let (a, b) = tokio::join!(probe(&t), probe(&t));
        assert!(a && b);
        let pid = d.pid();
        d.stop().await.unwrap();
        assert!(!crate::proc::alive(pid));
        assert!(!probe(&t).await);
    }

    fn which(bin: &str) -> Option<PathBuf> {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(bin))
                .find(|c| c.is_file())
        })
    }
}
