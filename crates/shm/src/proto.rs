//! What element and device exchange: three fixed-size messages on the Unix
//! socket while a device attaches (with descriptors passed by SCM_RIGHTS), then
//! a per-device control page of atomic words for requests and replies.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::AtomicU64;

use crate::sys::{self, Mapping};
use crate::Error;

const MAGIC: u32 = 0x5653_484d; // "VSHM"
/// 2: the element signals a device only when `RESP_WAITING` says it sleeps.
const VERSION: u16 = 2;

/// How the element learns of a device's request and the device of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    /// The waiting side sleeps on an eventfd the other side signals.
    EventFd,
    /// Both sides spin on the control page's words (lowest latency; costs a
    /// core on the element while it serves).
    Polled,
}

/// Element → device, with the table memfd, the control-page memfd and the two
/// eventfds (request, response).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Welcome {
    pub device: u32,
    pub notify: Notify,
    pub entries: u32,
    pub entry_size: u32,
    pub generation: u64,
}

pub(crate) const WELCOME_LEN: usize = 32;

impl Welcome {
    pub(crate) fn encode(&self) -> [u8; WELCOME_LEN] {
        let mut b = [0u8; WELCOME_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        let mode: u16 = match self.notify {
            Notify::EventFd => 0,
            Notify::Polled => 1,
        };
        b[6..8].copy_from_slice(&mode.to_le_bytes());
        b[8..12].copy_from_slice(&self.device.to_le_bytes());
        b[12..16].copy_from_slice(&self.entries.to_le_bytes());
        b[16..20].copy_from_slice(&self.entry_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.generation.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8; WELCOME_LEN]) -> Result<Welcome, Error> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if u32_at(0) != MAGIC {
            return Err(Error::Protocol("not a resource-table socket".into()));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(Error::Protocol(format!(
                "protocol version {version}, this library speaks {VERSION}"
            )));
        }
        let notify = match u16::from_le_bytes([b[6], b[7]]) {
            0 => Notify::EventFd,
            1 => Notify::Polled,
            m => return Err(Error::Protocol(format!("unknown notification mode {m}"))),
        };
        let mut g = [0u8; 8];
        g.copy_from_slice(&b[24..32]);
        Ok(Welcome {
            device: u32_at(8),
            notify,
            entries: u32_at(12),
            entry_size: u32_at(16),
            generation: u64::from_le_bytes(g),
        })
    }
}

/// Device → element, with the device's userfaultfd: where the device mapped
/// the table (registered for write-protect tracking).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attach {
    pub base: u64,
    pub len: u64,
}

pub(crate) const ATTACH_LEN: usize = 24;

impl Attach {
    pub(crate) fn encode(&self) -> [u8; ATTACH_LEN] {
        let mut b = [0u8; ATTACH_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[8..16].copy_from_slice(&self.base.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8; ATTACH_LEN]) -> Result<Attach, Error> {
        if b[0..4] != MAGIC.to_le_bytes() {
            return Err(Error::Protocol("attach message without magic".into()));
        }
        let mut base = [0u8; 8];
        let mut len = [0u8; 8];
        base.copy_from_slice(&b[8..16]);
        len.copy_from_slice(&b[16..24]);
        Ok(Attach {
            base: u64::from_le_bytes(base),
            len: u64::from_le_bytes(len),
        })
    }
}

/// Element → device: 0 when the device's mapping is protected and it may
/// start, else the errno of what failed.
pub(crate) const READY_LEN: usize = 8;

pub(crate) fn encode_ready(status: u32) -> [u8; READY_LEN] {
    let mut b = [0u8; READY_LEN];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&status.to_le_bytes());
    b
}

pub(crate) fn decode_ready(b: &[u8; READY_LEN]) -> Result<u32, Error> {
    if b[0..4] != MAGIC.to_le_bytes() {
        return Err(Error::Protocol("ready message without magic".into()));
    }
    Ok(u32::from_le_bytes([b[4], b[5], b[6], b[7]]))
}

// Control-page word indices. Requests, replies, posted releases and their
// acknowledgement sit on separate cache lines.
pub(crate) const REQ_SEQ: usize = 0;
pub(crate) const REQ_OP: usize = 1;
pub(crate) const REQ_ENTRY: usize = 2;
pub(crate) const REQ_TIMEOUT_MS: usize = 3;
pub(crate) const RESP_SEQ: usize = 8;
pub(crate) const RESP_STATUS: usize = 9;
pub(crate) const RESP_VALUE: usize = 10;
/// The request whose answer the device sleeps on its eventfd for (device →
/// element): the element signals the eventfd only for that one.
pub(crate) const RESP_WAITING: usize = 11;
/// A dropped guard's release, posted beside the request words so that the
/// device's next request does not wait for the revoke (device → element; the
/// element reads `REQ_SEQ` first, so a request it sees is never served before
/// a release posted ahead of it).
pub(crate) const REL_SEQ: usize = 16;
pub(crate) const REL_ENTRY: usize = 17;
/// The last posted release the element has done (element → device).
pub(crate) const REL_DONE: usize = 24;
const CTRL_WORDS: usize = 32;
pub(crate) const CTRL_BYTES: usize = 4096;

pub(crate) const OP_REQUEST_WRITE: u64 = 1;
pub(crate) const OP_RELEASE: u64 = 2;
/// The device's library caught a SIGBUS from a store into the entry (it had no
/// grant): for the element's audit. Answered `ST_RELEASED`.
pub(crate) const OP_REFUSED_STORE: u64 = 3;
/// A guest: copy its window's payload into the entry it holds.
pub(crate) const OP_COMMIT: u64 = 4;
/// A guest: grant, commit and release in one request.
pub(crate) const OP_WRITE: u64 = 5;

pub(crate) const ST_GRANTED: u64 = 1;
pub(crate) const ST_RELEASED: u64 = 2;
/// Value: the holder's device id.
pub(crate) const ST_HELD: u64 = 3;
pub(crate) const ST_NO_SUCH_ENTRY: u64 = 4;
pub(crate) const ST_NOT_HELD: u64 = 5;
/// Value: errno.
pub(crate) const ST_FAILED: u64 = 6;
/// Value: the entry's new version.
pub(crate) const ST_COMMITTED: u64 = 7;
/// A process asked for a guest's operation.
pub(crate) const ST_NOT_A_GUEST: u64 = 8;

/// One device's control page (its own memfd, shared by the element and that
/// device only): the device writes a request and bumps `REQ_SEQ`; the element
/// answers and sets `RESP_SEQ` to the same number.
#[derive(Debug)]
pub(crate) struct Ctrl {
    map: Mapping,
}

impl Ctrl {
    /// A new control page and the memfd to pass to the device.
    pub(crate) fn create() -> Result<(Ctrl, OwnedFd), Error> {
        let fd = sys::sealed_memfd(c"vinfra-shm-ctrl", CTRL_BYTES)
            .map_err(Error::io("control page memfd"))?;
        let map = Mapping::shared(fd.as_fd(), CTRL_BYTES)
            .map_err(Error::io("mapping the control page"))?;
        Ok((Ctrl { map }, fd))
    }

    pub(crate) fn open(fd: BorrowedFd<'_>) -> Result<Ctrl, Error> {
        let len = sys::file_len(fd).map_err(Error::io("control page size"))?;
        if len < CTRL_BYTES as u64 {
            return Err(Error::Protocol(format!("control page of {len} bytes")));
        }
        let map = Mapping::shared(fd, CTRL_BYTES).map_err(Error::io("mapping the control page"))?;
        Ok(Ctrl { map })
    }

    /// A guest's window: the control words on its first page, then a payload.
    pub(crate) fn from_mapping(map: Mapping) -> Ctrl {
        assert!(map.len() >= CTRL_BYTES);
        Ctrl { map }
    }

    /// The `words` payload words after the control page of a guest's window.
    pub(crate) fn window_payload(&self, words: usize) -> &[AtomicU64] {
        assert!(CTRL_BYTES + words * 8 <= self.map.len());
        // SAFETY: the words lie within the mapping owned by `self` (checked
        // above), are 8-aligned (page-aligned start), and this process reads
        // them only through atomics; the guest's stores are another process's
        // (QEMU's) and cannot make a Rust reference dangle.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(CTRL_BYTES) as *const AtomicU64, words)
        }
    }

    pub(crate) fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < CTRL_WORDS);
        // SAFETY: word `i` (< 32) lies within the 4096-byte mapping owned by
        // `self`, is 8-aligned (the mapping is page-aligned), and both
        // processes access the page only through atomics.
        unsafe { &*(self.map.as_ptr().add(i * 8) as *const AtomicU64) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_reject_garbage() {
        let w = Welcome {
            device: 7,
            notify: Notify::Polled,
            entries: 65536,
            entry_size: 4088,
            generation: 3,
        };
        assert_eq!(Welcome::decode(&w.encode()).unwrap(), w);
        assert!(Welcome::decode(&[0u8; WELCOME_LEN]).is_err());
        let mut bad_mode = w.encode();
        bad_mode[6] = 9;
        assert!(Welcome::decode(&bad_mode).is_err());
        let a = Attach {
            base: 0x7f00_0000_0000,
            len: 1 << 28,
        };
        assert_eq!(Attach::decode(&a.encode()).unwrap(), a);
        assert!(Attach::decode(&[1u8; ATTACH_LEN]).is_err());
        assert_eq!(decode_ready(&encode_ready(22)).unwrap(), 22);
        assert!(decode_ready(&[0u8; READY_LEN]).is_err());
    }
}
