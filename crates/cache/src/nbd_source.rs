//! Block sources over NBD, and the export a source host offers its peers.
//!
//! - [`PeerExport`]: a read-only [`nbd::BlockDevice`] view of a [`BlockCache`] for peers:
//!   it serves only blocks the cache holds (checksum-verified), answers an NBD error for
//!   any other block instead of filling from its own origin, and does not count peer
//!   reads as guest accesses (they would distort the heat map).
//! - [`PeerNbdSource`]: the destination's side: asks only for blocks the source listed in
//!   its migration snapshot; an NBD error reply means "not here any more" (`Ok(None)`,
//!   the cache falls back to the origin); a broken connection is retried by
//!   [`nbd::ReconnectingClient`] under its policy, so a source agent that is killed and
//!   restarted mid-warm-up is ridden through.
//! - [`OriginNbdSource`]: the origin behind an NBD server (`qemu-nbd`, `nbdkit`, ours).

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use nbd::{NbdAddr, NbdError, ReconnectPolicy, ReconnectingClient};

use crate::block_cache::BlockCache;
use crate::source::{BlockOrigin, BlockSource, SourceError};
use crate::types::{BlockIdx, BlockSet, BlockSize, Generation};

/// A read-only, no-fill view of a cache, exported to peers over NBD.
#[derive(Debug, Clone)]
pub struct PeerExport(pub Arc<BlockCache>);

impl nbd::BlockDevice for PeerExport {
    fn size(&self) -> u64 {
        self.0.disk_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bs = self.0.block_size();
        let mut block = vec![0u8; bs.as_usize()];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let b = bs.block_of(pos);
            let start = bs
                .offset_of(b)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            let within = usize::try_from(pos - start)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let n = (block.len() - within).min(buf.len() - done);
            match self.0.peek_block(b, &mut block) {
                Ok(Some(_)) => buf[done..done + n].copy_from_slice(&block[within..within + n]),
                Ok(None) => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{b} is not cached here"),
                    ))
                }
                Err(e) => return Err(io::Error::other(e)),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, _data: &[u8], _offset: u64, _fua: bool) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn read_only(&self) -> bool {
        true
    }
}

/// A peer (the source host's cache, exported with [`PeerExport`]) over NBD.
#[derive(Debug)]
pub struct PeerNbdSource {
    name: String,
    client: Mutex<ReconnectingClient>,
    have: BlockSet,
    block_size: BlockSize,
    disk_size: u64,
}

/// Connects a reconnecting client, naming the source (`nbd peer ADDR/EXPORT`) for errors.
fn open_client(
    role: &str,
    addr: NbdAddr,
    export: &str,
    policy: ReconnectPolicy,
) -> Result<(String, ReconnectingClient), SourceError> {
    let name = format!("nbd {role} {addr}/{export}");
    let client =
        ReconnectingClient::connect(addr, export, policy).map_err(|e| SourceError::Open {
            source_name: name.clone(),
            err: io::Error::other(e),
        })?;
    Ok((name, client))
}

impl PeerNbdSource {
    /// Connects to `export` at `addr`; only blocks in `have` (the source's migration
    /// snapshot) are asked for.
    pub fn connect(
        addr: NbdAddr,
        export: &str,
        policy: ReconnectPolicy,
        have: BlockSet,
        block_size: BlockSize,
    ) -> Result<Self, SourceError> {
        let (name, client) = open_client("peer", addr, export, policy)?;
        let disk_size = client.size();
        Ok(Self {
            name,
            client: Mutex::new(client),
            have,
            block_size,
            disk_size,
        })
    }

    /// Times the connection was re-established (the peer restarted).
    pub fn reconnects(&self) -> u64 {
        self.client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reconnects()
    }
}

impl BlockSource for PeerNbdSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn read_block(&self, idx: BlockIdx, buf: &mut [u8]) -> Result<Option<Generation>, SourceError> {
        if !self.have.contains(&idx) {
            return Ok(None);
        }
        read_block_over(
            &self.client,
            &self.name,
            self.block_size,
            self.disk_size,
            idx,
            buf,
            true,
        )
    }
}

/// Reads block `idx` through `client`, zero-filling past the end of the disk. With
/// `missing_ok`, an error reply from the server (not a broken connection) means the
/// server does not have the block.
fn read_block_over(
    client: &Mutex<ReconnectingClient>,
    name: &str,
    bs: BlockSize,
    disk_size: u64,
    idx: BlockIdx,
    buf: &mut [u8],
    missing_ok: bool,
) -> Result<Option<Generation>, SourceError> {
    let err = |err| SourceError::Read {
        source_name: name.to_owned(),
        block: idx,
        err,
    };
    let off = bs
        .offset_of(idx)
        .filter(|o| *o < disk_size)
        .ok_or_else(|| {
            err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "block past the end of the disk",
            ))
        })?;
    let avail = usize::try_from(disk_size - off)
        .unwrap_or(usize::MAX)
        .min(buf.len());
    let r = client
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .read_at(&mut buf[..avail], off);
    match r {
        Ok(()) => {
            buf[avail..].fill(0);
            Ok(Some(Generation::default()))
        }
        Err(e @ NbdError::Request { .. }) if missing_ok && !e.is_connection_error() => Ok(None),
        Err(e) => Err(err(io::Error::other(e))),
    }
}

/// The origin behind an NBD server.
#[derive(Debug)]
pub struct OriginNbdSource {
    name: String,
    client: Mutex<ReconnectingClient>,
    block_size: BlockSize,
    disk_size: u64,
}

impl OriginNbdSource {
    /// Connects to `export` at `addr`.
    pub fn connect(
        addr: NbdAddr,
        export: &str,
        policy: ReconnectPolicy,
        block_size: BlockSize,
    ) -> Result<Self, SourceError> {
        let (name, client) = open_client("origin", addr, export, policy)?;
        let disk_size = client.size();
        Ok(Self {
            name,
            client: Mutex::new(client),
            block_size,
            disk_size,
        })
    }
}

impl BlockSource for OriginNbdSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn read_block(&self, idx: BlockIdx, buf: &mut [u8]) -> Result<Option<Generation>, SourceError> {
        read_block_over(
            &self.client,
            &self.name,
            self.block_size,
            self.disk_size,
            idx,
            buf,
            false,
        )
    }
}

impl BlockOrigin for OriginNbdSource {
    fn size(&self) -> u64 {
        self.disk_size
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), SourceError> {
        let err = |e: NbdError| SourceError::Write {
            source_name: self.name.clone(),
            offset,
            len: data.len(),
            err: io::Error::other(e),
        };
        let mut c = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        c.write_at(data, offset).map_err(err)?;
        if fua {
            c.flush().map_err(err)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), SourceError> {
        self.client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush()
            .map_err(|e| SourceError::Flush {
                source_name: self.name.clone(),
                err: io::Error::other(e),
            })
    }
}
