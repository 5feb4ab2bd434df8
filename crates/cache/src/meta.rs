//! Crash-consistent cache metadata: a checkpoint file replaced atomically plus an
//! append-only journal of block-map changes since that checkpoint.
//!
//! Why both: the block map changes on every miss, eviction and write, and rewriting a
//! whole checkpoint each time would put an fsync'd multi-megabyte write on the I/O path.
//! A 40-byte journal record per change keeps that path to one small `pwrite`; the
//! checkpoint (heat map, pattern, block map) is rewritten every few thousand records.
//!
//! Checkpoint file `meta`: `b"VCMETA01"`, format `u32`, crc32 of the body `u32`, body
//! length `u64`, then the body as JSON ([`CheckpointBody`]). Saved as `meta.tmp`, fsync,
//! rename onto `meta`, fsync of the directory.
//!
//! Journal file `journal`: `b"VCJRNL01"`, epoch `u64`, then [`Record`]s of 40 bytes, each
//! with its own crc32. Records are replayed only if the journal's epoch equals the
//! checkpoint's, so a crash between saving a checkpoint and resetting the journal cannot
//! replay changes twice. A torn or corrupt record ends the replay (records after it
//! cannot be trusted to follow it in order).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::heat::HeatSnapshot;
use crate::pattern::PatternSnapshot;
use crate::types::{BlockIdx, Generation};

/// Version of the checkpoint format this build reads and writes.
pub const META_FORMAT: u32 = 1;
const META_MAGIC: &[u8; 8] = b"VCMETA01";
const JOURNAL_MAGIC: &[u8; 8] = b"VCJRNL01";
const JOURNAL_HEADER: u64 = 16;
/// Size of one journal record in bytes.
pub const RECORD_LEN: usize = 40;

/// One cached block in a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMeta {
    /// The block.
    pub block: u64,
    /// Slot in the data file.
    pub slot: u64,
    /// Generation of the cached copy.
    pub gen: u64,
    /// crc32 of the slot's bytes.
    pub crc: u32,
}

/// Everything a checkpoint holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointBody {
    /// Journal epoch whose records apply on top of this checkpoint.
    pub epoch: u64,
    /// Block size the data file was laid out with.
    pub block_size: u32,
    /// Slots in the data file.
    pub capacity_blocks: u64,
    /// Size of the origin disk when written.
    pub disk_size: u64,
    /// The block map.
    pub blocks: Vec<BlockMeta>,
    /// Heat map.
    pub heat: HeatSnapshot,
    /// Access pattern.
    pub pattern: PatternSnapshot,
}

/// Loading a checkpoint failed; the cache must then start empty.
#[derive(Debug, thiserror::Error)]
pub enum MetaLoadError {
    /// The file could not be read.
    #[error("cannot read cache metadata {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        err: io::Error,
    },
    /// The file is shorter than its header says.
    #[error("cache metadata {path} is truncated")]
    Truncated {
        /// The file.
        path: PathBuf,
    },
    /// Not a checkpoint at all.
    #[error("cache metadata {path} has a bad magic number")]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// Written by a newer (or unknown) version.
    #[error("cache metadata {path} has unknown format {format}")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// The format found.
        format: u32,
    },
    /// The body does not match its checksum.
    #[error("cache metadata {path} fails its checksum")]
    BadChecksum {
        /// The file.
        path: PathBuf,
    },
    /// The body is not a valid checkpoint.
    #[error("cache metadata {path} has an invalid body")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        err: serde_json::Error,
    },
}

/// Saving a checkpoint or appending to the journal failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaSaveError {
    /// An I/O step failed.
    #[error("cannot {step} cache metadata {path}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        err: io::Error,
    },
    /// Serializing the body failed.
    #[error("cannot encode cache metadata {path}")]
    Encode {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        err: serde_json::Error,
    },
}

/// Reads and validates the checkpoint at `path`; `Ok(None)` if there is none.
pub fn load_checkpoint(path: &Path) -> Result<Option<CheckpointBody>, MetaLoadError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(MetaLoadError::Read {
                path: path.to_owned(),
                err,
            })
        }
    };
    parse_checkpoint(&bytes, path).map(Some)
}

/// Decodes and validates the bytes of a checkpoint file (magic, format, length, checksum,
/// body); `path` only names the file in errors.
pub fn parse_checkpoint(bytes: &[u8], path: &Path) -> Result<CheckpointBody, MetaLoadError> {
    let p = || path.to_owned();
    if bytes.len() < 24 {
        return Err(MetaLoadError::Truncated { path: p() });
    }
    if &bytes[..8] != META_MAGIC {
        return Err(MetaLoadError::BadMagic { path: p() });
    }
    let format = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if format != META_FORMAT {
        return Err(MetaLoadError::UnknownFormat { path: p(), format });
    }
    let crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let body = usize::try_from(len)
        .ok()
        .and_then(|l| bytes.get(24..24usize.checked_add(l)?))
        .ok_or_else(|| MetaLoadError::Truncated { path: p() })?;
    if crc32fast::hash(body) != crc {
        return Err(MetaLoadError::BadChecksum { path: p() });
    }
    serde_json::from_slice(body).map_err(|err| MetaLoadError::Parse { path: p(), err })
}

/// Atomically replaces the checkpoint at `path`: write `path.tmp`, fsync, rename, fsync dir.
pub fn save_checkpoint(path: &Path, body: &CheckpointBody) -> Result<(), MetaSaveError> {
    let json = serde_json::to_vec(body).map_err(|err| MetaSaveError::Encode {
        path: path.to_owned(),
        err,
    })?;
    let tmp = path.with_extension("tmp");
    fn io<'a>(step: &'static str, p: &'a Path) -> impl FnOnce(io::Error) -> MetaSaveError + 'a {
        move |err| MetaSaveError::Io {
            step,
            path: p.to_owned(),
            err,
        }
    }
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    let mut head = Vec::with_capacity(24);
    head.extend_from_slice(META_MAGIC);
    head.extend_from_slice(&META_FORMAT.to_le_bytes());
    head.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
    head.extend_from_slice(&(json.len() as u64).to_le_bytes());
    f.write_all(&head).map_err(io("write", &tmp))?;
    f.write_all(&json).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io("rename onto", path))?;
    sync_dir(path).map_err(io("fsync the directory of", path))
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// A change to the block map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// `block` now lives in `slot`, at generation `gen`, with data crc32 `crc`.
    Map {
        /// The block.
        block: BlockIdx,
        /// Its slot.
        slot: u64,
        /// Its generation.
        gen: Generation,
        /// crc32 of the slot.
        crc: u32,
    },
    /// A write bumped `block` to `gen`: any cached copy of an older generation is invalid.
    /// Journalled before the write reaches the origin.
    Bump {
        /// The block.
        block: BlockIdx,
        /// Its new generation.
        gen: Generation,
    },
    /// `block` was evicted; its slot is free.
    Unmap {
        /// The block.
        block: BlockIdx,
    },
}

impl Record {
    /// The record as it is appended to the journal: kind, crc32 of the record (computed
    /// with its own field zeroed), block, slot, generation, data crc32, little-endian.
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let (kind, block, slot, gen, crc) = match *self {
            Record::Map {
                block,
                slot,
                gen,
                crc,
            } => (1u32, block, slot, gen, crc),
            Record::Bump { block, gen } => (2, block, 0, gen, 0),
            Record::Unmap { block } => (3, block, 0, Generation(0), 0),
        };
        let mut r = [0u8; RECORD_LEN];
        r[0..4].copy_from_slice(&kind.to_le_bytes());
        r[8..16].copy_from_slice(&block.0.to_le_bytes());
        r[16..24].copy_from_slice(&slot.to_le_bytes());
        r[24..32].copy_from_slice(&gen.0.to_le_bytes());
        r[32..36].copy_from_slice(&crc.to_le_bytes());
        let sum = crc32fast::hash(&r);
        r[4..8].copy_from_slice(&sum.to_le_bytes());
        r
    }

    fn decode(r: &[u8; RECORD_LEN]) -> Option<Record> {
        let u64_at = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(r[i..i + 4].try_into().expect("4 bytes"));
        let mut zeroed = *r;
        zeroed[4..8].fill(0);
        if crc32fast::hash(&zeroed) != u32_at(4) {
            return None;
        }
        let block = BlockIdx(u64_at(8));
        match u32_at(0) {
            1 => Some(Record::Map {
                block,
                slot: u64_at(16),
                gen: Generation(u64_at(24)),
                crc: u32_at(32),
            }),
            2 => Some(Record::Bump {
                block,
                gen: Generation(u64_at(24)),
            }),
            3 => Some(Record::Unmap { block }),
            _ => None,
        }
    }
}

/// What replaying a journal found.
#[derive(Debug, Default)]
pub struct Replay {
    /// Valid records, in order.
    pub records: Vec<Record>,
    /// Byte offset of the first bad record, if the journal ended in one (a torn append).
    pub torn_at: Option<u64>,
}

/// Decodes the bytes of a journal file: the records that belong to checkpoint epoch
/// `epoch`, up to the first torn or corrupt one. A bad header or another epoch yields no
/// records.
pub fn replay_journal(bytes: &[u8], epoch: u64) -> Replay {
    let mut replay = Replay::default();
    let header_ok = bytes.len() >= 16
        && &bytes[..8] == JOURNAL_MAGIC
        && u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) == epoch;
    if header_ok {
        for (i, chunk) in bytes[16..].chunks(RECORD_LEN).enumerate() {
            let rec = <&[u8; RECORD_LEN]>::try_from(chunk)
                .ok()
                .and_then(Record::decode);
            match rec {
                Some(r) => replay.records.push(r),
                None => {
                    replay.torn_at = Some(JOURNAL_HEADER + (i * RECORD_LEN) as u64);
                    break;
                }
            }
        }
    }
    replay
}

/// The append-only journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    len: u64,
    epoch: u64,
    since_checkpoint: u64,
}

impl Journal {
    /// Opens (creating if needed) the journal at `path` and reads back the records that
    /// belong to checkpoint epoch `epoch`; records of another epoch are ignored.
    pub fn open(path: &Path, epoch: u64) -> Result<(Self, Replay), MetaSaveError> {
        let io = |step| {
            move |err| MetaSaveError::Io {
                step,
                path: path.to_owned(),
                err,
            }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("open"))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io("read"))?;
        let replay = replay_journal(&bytes, epoch);
        let mut j = Self {
            path: path.to_owned(),
            file,
            len: 0,
            epoch,
            since_checkpoint: 0,
        };
        // Rewrite from the valid prefix on: later appends must not land behind garbage.
        j.reset(epoch)?;
        for r in &replay.records {
            j.append(r)?;
        }
        Ok((j, replay))
    }

    /// Empties the journal and starts epoch `epoch` (after a checkpoint of that epoch).
    pub fn reset(&mut self, epoch: u64) -> Result<(), MetaSaveError> {
        let path = self.path.clone();
        let io = |step| {
            let path = path.clone();
            move |err| MetaSaveError::Io { step, path, err }
        };
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(JOURNAL_MAGIC);
        head[8..].copy_from_slice(&epoch.to_le_bytes());
        self.file.set_len(0).map_err(io("truncate"))?;
        self.file.write_all_at(&head, 0).map_err(io("write"))?;
        self.file.sync_data().map_err(io("fsync"))?;
        self.len = JOURNAL_HEADER;
        self.epoch = epoch;
        self.since_checkpoint = 0;
        Ok(())
    }

    /// Appends one record. One `pwrite`, no fsync: it survives a process crash at once and
    /// a power loss after the next [`Journal::sync`].
    pub fn append(&mut self, r: &Record) -> Result<(), MetaSaveError> {
        self.file
            .write_all_at(&r.encode(), self.len)
            .map_err(|err| MetaSaveError::Io {
                step: "append to",
                path: self.path.clone(),
                err,
            })?;
        self.len += RECORD_LEN as u64;
        self.since_checkpoint += 1;
        Ok(())
    }

    /// Makes appended records durable.
    pub fn sync(&self) -> Result<(), MetaSaveError> {
        self.file.sync_data().map_err(|err| MetaSaveError::Io {
            step: "fsync",
            path: self.path.clone(),
            err,
        })
    }

    /// Records appended since the last reset.
    pub fn since_checkpoint(&self) -> u64 {
        self.since_checkpoint
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AccessPattern, HeatMap};

    fn body(epoch: u64) -> CheckpointBody {
        CheckpointBody {
            epoch,
            block_size: 4096,
            capacity_blocks: 8,
            disk_size: 1 << 20,
            blocks: vec![BlockMeta {
                block: 3,
                slot: 1,
                gen: 2,
                crc: 99,
            }],
            heat: HeatMap::new(10, 10).snapshot(),
            pattern: AccessPattern::new(10).snapshot(),
        }
    }

    #[test]
    fn checkpoint_round_trips_and_rejects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta");
        assert!(load_checkpoint(&p).unwrap().is_none());
        save_checkpoint(&p, &body(5)).unwrap();
        assert_eq!(load_checkpoint(&p).unwrap(), Some(body(5)));

        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x20;
        std::fs::write(&p, &bytes).unwrap();
        let e = load_checkpoint(&p).unwrap_err();
        assert!(matches!(e, MetaLoadError::BadChecksum { .. }), "{e}");
        assert!(e.to_string().contains(&p.display().to_string()));

        std::fs::write(&p, b"VCMETA01\x07\0\0\0").unwrap();
        assert!(matches!(
            load_checkpoint(&p).unwrap_err(),
            MetaLoadError::Truncated { .. }
        ));
        let mut future = std::fs::read(dir.path().join("meta.tmp")).unwrap_or_default();
        future.clear();
        future.extend_from_slice(b"VCMETA01\x07\0\0\0");
        future.extend_from_slice(&[0u8; 12]);
        std::fs::write(&p, &future).unwrap();
        assert!(matches!(
            load_checkpoint(&p).unwrap_err(),
            MetaLoadError::UnknownFormat { format: 7, .. }
        ));
        std::fs::write(&p, [0u8; 40]).unwrap();
        assert!(matches!(
            load_checkpoint(&p).unwrap_err(),
            MetaLoadError::BadMagic { .. }
        ));
    }

    #[test]
    fn journal_replays_its_epoch_and_stops_at_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        let recs = [
            Record::Map {
                block: BlockIdx(1),
                slot: 0,
                gen: Generation(0),
                crc: 7,
            },
            Record::Bump {
                block: BlockIdx(1),
                gen: Generation(1),
            },
            Record::Unmap { block: BlockIdx(9) },
        ];
        {
            let (mut j, replay) = Journal::open(&p, 3).unwrap();
            assert!(replay.records.is_empty());
            for r in &recs {
                j.append(r).unwrap();
            }
        }
        let (_, replay) = Journal::open(&p, 3).unwrap();
        assert_eq!(replay.records, recs);
        // Another epoch's records are not ours to replay.
        let (_, other) = Journal::open(&p, 4).unwrap();
        assert!(other.records.is_empty());

        let (mut j, _) = Journal::open(&p, 3).unwrap();
        for r in &recs {
            j.append(r).unwrap();
        }
        drop(j);
        // Tear the last record in half, as a crash mid-append would.
        let len = std::fs::metadata(&p).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len - 20)
            .unwrap();
        let (_, replay) = Journal::open(&p, 3).unwrap();
        assert_eq!(replay.records, recs[..2]);
        assert_eq!(replay.torn_at, Some(16 + 2 * RECORD_LEN as u64));
    }
}
