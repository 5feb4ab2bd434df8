//! Shared resource tables whose entries are granted read/write to one device
//! at a time.
//!
//! An *element* (the host agent) keeps a table of fixed-size entries in a
//! sealed memfd that every attached *device* (a process on the host) maps.
//! Every device's mapping is write-protected; a device asks for one entry,
//! the element makes that entry's pages writable in that device's address
//! space only, tells it, and takes the access back when the device releases
//! it, the grant times out, or the device dies. The device writes the entry
//! in place — nothing is copied through the element.
//!
//! `mprotect` only changes the caller's own mapping, so the element cannot
//! use it on a device. userfaultfd write-protect can: the device registers
//! its mapping (`UFFDIO_REGISTER_MODE_WP`, shared memory needs
//! `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`, Linux ≥ 5.19) and passes the
//! userfaultfd to the element over the Unix socket; the element then flips
//! the device's pages with `UFFDIO_WRITEPROTECT`. With `UFFD_FEATURE_SIGBUS`
//! a store to a protected page raises SIGBUS in the device (no fault thread).
//!
//! Readers never see a half-written entry: each entry starts with a sequence
//! word that is odd while a write is in progress (see `entry.rs`), and an
//! entry whose writer died mid-write is rolled back when the grant ends.
//!
//! Protection is against stray and late writes by devices using this
//! library (the way one ivshmem peer clobbers another), not against a
//! process that wants to defeat it: whoever holds the memfd can map it again
//! without registering, and the device creates the userfaultfd it hands over.
//! See docs/SHM.md.

// The crate wraps system calls and shared memory; each unsafe block says
// why it is sound.
#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod device;
mod element;
mod entry;
mod probe;
mod proto;
pub mod selfcheck;
mod snapshot;
mod sys;

pub use device::{Device, WriteGuard};
pub use element::{
    AuditEvent, AuditKind, DeviceInfo, Element, ElementConfig, GrantInfo, GuestWindow,
    RevokeReason, Totals, ELEMENT_PEER, GUEST_PEER, WINDOW_PAYLOAD,
};
pub use entry::{Layout, MAX_ENTRIES, MAX_ENTRY_SIZE};
pub use probe::StoreOutcome;
pub use proto::Notify;
pub use snapshot::{decode_snapshot, encode_snapshot};
pub use sys::{pin_current_thread, raise_fd_limit, unshare_network};

/// A device's id at its element (1, 2, …; never reused by one element).
pub type DeviceId = u32;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A table shape or argument out of range.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The entry does not exist.
    #[error("entry {entry} does not exist (the table has {entries})")]
    NoSuchEntry {
        /// Asked for.
        entry: u32,
        /// Entries in the table.
        entries: u32,
    },
    /// No attached device has this id.
    #[error("device {0} is not attached")]
    NoSuchDevice(DeviceId),
    /// Another device holds the entry.
    #[error("entry {entry} is granted to device {holder}")]
    Held {
        /// The entry.
        entry: u32,
        /// Its holder.
        holder: DeviceId,
    },
    /// The device does not hold the entry.
    #[error("device {device} does not hold entry {entry}")]
    NotHeld {
        /// The device.
        device: DeviceId,
        /// The entry.
        entry: u32,
    },
    /// The entry stayed mid-write for too long (its writer is stuck or died
    /// and has not been rolled back yet).
    #[error("entry {entry} is being written; try again")]
    Busy {
        /// The entry.
        entry: u32,
    },
    /// Data larger than an entry.
    #[error("{len} bytes do not fit an entry of {entry_size}")]
    TooLarge {
        /// Bytes given.
        len: usize,
        /// Payload size.
        entry_size: u32,
    },
    /// Only a guest's window is copied into an entry (a process writes its
    /// entry in place).
    #[error("only a guest (a VM's window) commits or writes through the element")]
    NotAGuest,
    /// The element closed the connection or stopped answering.
    #[error("the element is gone")]
    ElementGone,
    /// The other side broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A system call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Runs every handshake-message decoder on `data` (what a device or an
/// element reads from the other side before trusting it); for the fuzz target.
/// Returns how many decoded.
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) -> usize {
    let mut ok = 0;
    if let Some(b) = data.get(..proto::WELCOME_LEN) {
        let mut a = [0u8; proto::WELCOME_LEN];
        a.copy_from_slice(b);
        if let Ok(w) = proto::Welcome::decode(&a) {
            assert_eq!(w.encode()[..20], a[..20]);
            ok += 1;
            let _ = Layout::new(w.entries, w.entry_size);
        }
    }
    if let Some(b) = data.get(..proto::ATTACH_LEN) {
        let mut a = [0u8; proto::ATTACH_LEN];
        a.copy_from_slice(b);
        ok += usize::from(proto::Attach::decode(&a).is_ok());
    }
    if let Some(b) = data.get(..proto::READY_LEN) {
        let mut a = [0u8; proto::READY_LEN];
        a.copy_from_slice(b);
        ok += usize::from(proto::decode_ready(&a).is_ok());
    }
    ok
}

impl Error {
    pub(crate) fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
        move |source| Error::Io { what, source }
    }
}
