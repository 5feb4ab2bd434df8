//! The simulated guest's disk: real block I/O on the VM's [`DiskTarget`], as QEMU's
//! virtio-blk would do it, so that the host's disk path (the agent's NBD server and block
//! cache, its heat map, a migration's cache rebuild) serves a simulated guest exactly as
//! it serves a real one.
//!
//! Blocking (std sockets and files): the VM actor runs every call in `spawn_blocking`.
//! A lost NBD connection is re-established for up to [`NBD_RECONNECT_DELAY_S`] like
//! QEMU's `reconnect-delay`, so a guest rides through an agent restart; the wait ends
//! early when the VM is gone ([`SimDisk::cancel`]), so that no thread outlives it.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd::client::ClientOptions;
use nbd::{NbdAddr, NbdClient, NbdError};

use crate::qemu::NBD_RECONNECT_DELAY_S;
use crate::DiskTarget;

/// Where the guest's disk is and, once attached, its connection.
#[derive(Debug)]
pub(crate) enum SimDisk {
    /// An NBD export.
    Nbd {
        /// The server.
        addr: NbdAddr,
        /// The export.
        export: String,
        /// Connected on first use, and again after a loss.
        client: Option<Box<NbdClient>>,
        /// Set when the VM is gone: stop retrying.
        cancel: Arc<AtomicBool>,
    },
    /// A raw image file.
    File {
        /// The image.
        path: PathBuf,
        /// Opened on first use.
        file: Option<std::fs::File>,
    },
}

fn nbd_addr(target: &DiskTarget) -> Result<Option<(NbdAddr, String)>, String> {
    Ok(match target {
        DiskTarget::NbdTcp { host, port, export } => {
            let sa = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve nbd server {host}:{port}: {e}"))?
                .next()
                .ok_or_else(|| format!("nbd server {host}:{port} has no address"))?;
            Some((NbdAddr::Tcp(sa), export.clone()))
        }
        DiskTarget::NbdUnix { path, export } => Some((NbdAddr::Unix(path.clone()), export.clone())),
        DiskTarget::File(_) => None,
    })
}

impl SimDisk {
    /// The disk of `target`, not connected yet.
    pub(crate) fn new(target: &DiskTarget) -> Result<Self, String> {
        Ok(match nbd_addr(target)? {
            Some((addr, export)) => SimDisk::Nbd {
                addr,
                export,
                client: None,
                cancel: Arc::new(AtomicBool::new(false)),
            },
            None => match target {
                DiskTarget::File(p) => SimDisk::File {
                    path: p.clone(),
                    file: None,
                },
                _ => unreachable!("nbd targets handled above"),
            },
        })
    }

    /// Checks once, without retrying, that the disk can be opened: QEMU opens its
    /// block devices at startup and exits if one is missing, so a simulated start fails
    /// the same way. Blocking.
    pub(crate) fn probe(target: &DiskTarget) -> Result<(), String> {
        match nbd_addr(target)? {
            Some((addr, export)) => {
                let opts = ClientOptions {
                    connect_timeout: Duration::from_secs(5),
                    ..ClientOptions::default()
                };
                let c = NbdClient::connect_with(&addr, &export, opts)
                    .map_err(|e| format!("cannot open nbd export {export} at {addr}: {e}"))?;
                let _ = c.disconnect();
                Ok(())
            }
            None => match target {
                DiskTarget::File(p) => std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(p)
                    .map(drop)
                    .map_err(|e| format!("cannot open {}: {e}", p.display())),
                _ => Ok(()),
            },
        }
    }

    /// A flag that, once set, ends this disk's reconnect waits (the VM is gone).
    pub(crate) fn cancel(&self) -> Option<Arc<AtomicBool>> {
        match self {
            SimDisk::Nbd { cancel, .. } => Some(cancel.clone()),
            SimDisk::File { .. } => None,
        }
    }

    /// Runs `op` on the NBD connection, reconnecting with backoff while the server is
    /// unreachable (or up without the export yet), until the deadline or cancellation.
    fn with_nbd<T>(
        &mut self,
        mut op: impl FnMut(&mut NbdClient) -> Result<T, NbdError>,
    ) -> Result<T, String> {
        let SimDisk::Nbd {
            addr,
            export,
            client,
            cancel,
        } = self
        else {
            return Err("not an nbd disk".into());
        };
        let deadline = Duration::from_secs(u64::from(NBD_RECONNECT_DELAY_S));
        let mut first_failure: Option<Instant> = None;
        let mut backoff = Duration::from_millis(20);
        loop {
            let err = match client.as_mut() {
                Some(c) => match op(c) {
                    Ok(v) => return Ok(v),
                    Err(e) if e.is_connection_error() => {
                        *client = None;
                        e
                    }
                    Err(e) => return Err(e.to_string()),
                },
                None => match NbdClient::connect(addr, export) {
                    Ok(c) => {
                        *client = Some(Box::new(c));
                        continue;
                    }
                    Err(e)
                        if e.is_connection_error()
                            || matches!(e, NbdError::ExportNotFound { .. }) =>
                    {
                        e
                    }
                    Err(e) => return Err(e.to_string()),
                },
            };
            let since = *first_failure.get_or_insert_with(Instant::now);
            if cancel.load(Ordering::Relaxed) || since.elapsed() + backoff > deadline {
                return Err(format!("nbd {export} at {addr}: {err}"));
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    fn file(&mut self) -> Result<&mut std::fs::File, String> {
        let SimDisk::File { path, file } = self else {
            return Err("not a file disk".into());
        };
        if file.is_none() {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&*path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            *file = Some(f);
        }
        Ok(file.as_mut().expect("opened above"))
    }

    /// The disk's size in bytes (attaching it first).
    pub(crate) fn size(&mut self) -> Result<u64, String> {
        match self {
            SimDisk::Nbd { .. } => self.with_nbd(|c| Ok(c.size())),
            SimDisk::File { .. } => self
                .file()?
                .metadata()
                .map(|m| m.len())
                .map_err(|e| e.to_string()),
        }
    }

    /// Reads `buf.len()` bytes at `off`.
    pub(crate) fn read(&mut self, buf: &mut [u8], off: u64) -> Result<(), String> {
        match self {
            SimDisk::Nbd { .. } => self.with_nbd(|c| c.read_at(buf, off)),
            SimDisk::File { .. } => {
                let f = self.file()?;
                f.seek(SeekFrom::Start(off))
                    .and_then(|_| f.read_exact(buf))
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Writes `data` at `off` and makes it durable (the guest's `conv=fsync`).
    pub(crate) fn write_durable(&mut self, data: &[u8], off: u64) -> Result<(), String> {
        match self {
            SimDisk::Nbd { .. } => {
                self.with_nbd(|c| c.write_at(data, off))?;
                self.with_nbd(NbdClient::flush)
            }
            SimDisk::File { .. } => {
                let f = self.file()?;
                f.seek(SeekFrom::Start(off))
                    .and_then(|_| f.write_all(data))
                    .and_then(|()| f.sync_data())
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Closes the connection (QEMU releases its disk when it exits or migrates away).
    pub(crate) fn close(&mut self) {
        match self {
            SimDisk::Nbd { client, .. } => {
                if let Some(c) = client.take() {
                    let _ = c.disconnect();
                }
            }
            SimDisk::File { file, .. } => *file = None,
        }
    }
}

/// One tick's disk work: read the block at tick `i`'s offset, write and flush the
/// sequence record, read it back. Returns `(read check, write check)`.
pub(crate) fn tick_io(
    disk: &mut SimDisk,
    i: u64,
    disk_mib: u64,
) -> (super::guest::Check, super::guest::Check) {
    use super::guest::{self, Check};
    let mut buf = vec![0u8; guest::TICK_READ_BYTES];
    let read = match disk.read(&mut buf, guest::read_offset(i, disk_mib)) {
        Ok(()) => guest::check_read(i, disk_mib, &buf),
        Err(e) => Check::Bad(format!("io: {e}")),
    };
    let off = guest::seq_offset(disk_mib);
    let write = match disk.write_durable(&guest::seq_record(i), off) {
        Ok(()) => {
            let mut back = vec![0u8; guest::SEQ_RECORD_BYTES];
            match disk.read(&mut back, off) {
                Ok(()) => guest::check_write(i, &back),
                Err(e) => Check::Bad(format!("io: {e}")),
            }
        }
        Err(e) => Check::Bad(format!("io: {e}")),
    };
    (read, write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::guest::Check;

    #[test]
    fn ticks_check_a_file_disk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let mut img = vec![0u8; 4 << 20];
        for m in 0..4 {
            let h = crate::sim::guest::block_header(m);
            img[(m as usize) << 20..][..h.len()].copy_from_slice(h.as_bytes());
        }
        std::fs::write(&p, &img).unwrap();
        let t = DiskTarget::File(p.clone());
        SimDisk::probe(&t).unwrap();
        let mut d = SimDisk::new(&t).unwrap();
        assert_eq!(d.size().unwrap(), 4 << 20);
        for i in 0..5 {
            assert_eq!(tick_io(&mut d, i, 4), (Check::Ok, Check::Ok), "tick {i}");
        }
        assert!(SimDisk::probe(&DiskTarget::File(dir.path().join("nope"))).is_err());
    }
}
