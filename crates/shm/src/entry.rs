//! The table's memory layout and the per-entry sequence word (a seqlock) that
//! keeps readers from ever seeing a half-written entry.
//!
//! An entry occupies a page-aligned slot (write protection is granted per
//! page, so two entries never share one): a 64-bit sequence word, then
//! `entry_size` payload bytes. The writer (the one device holding the grant,
//! or the element when nobody does) makes the sequence odd, stores the
//! payload, and makes it even again; a reader copies the payload between two
//! loads of the sequence and retries unless both are the same even value.
//! Every access is an atomic 64-bit load or store, so the protocol is
//! well-defined across processes — except a device's update, one `memcpy`
//! between the two stores of the sequence word (see `Slots::write`).

use std::sync::atomic::{fence, AtomicU64, Ordering};

use crate::sys::Mapping;
use crate::Error;

/// Largest payload of one entry.
pub const MAX_ENTRY_SIZE: u32 = 1 << 20;
/// Most entries one table holds.
pub const MAX_ENTRIES: u32 = 1 << 20;
/// Largest table (all slots together).
const MAX_TABLE_BYTES: usize = 64 << 30;
/// Bytes before an entry's payload (the sequence word).
const HEADER: usize = 8;

/// Shape of a table: how many entries, how big, where each slot starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    entries: u32,
    entry_size: u32,
    slot: usize,
}

impl Layout {
    /// Validates a table shape: `entries` in 1..=2^20, `entry_size` a positive
    /// multiple of 8 up to 1 MiB, and the whole table at most 64 GiB.
    pub fn new(entries: u32, entry_size: u32) -> Result<Layout, Error> {
        if entries == 0 || entries > MAX_ENTRIES {
            return Err(Error::Invalid(format!(
                "entries must be 1..={MAX_ENTRIES}, got {entries}"
            )));
        }
        if entry_size == 0 || !entry_size.is_multiple_of(8) || entry_size > MAX_ENTRY_SIZE {
            return Err(Error::Invalid(format!(
                "entry_size must be a positive multiple of 8 up to {MAX_ENTRY_SIZE}, got {entry_size}"
            )));
        }
        let page = crate::sys::page_size();
        let slot = (HEADER + entry_size as usize).div_ceil(page) * page;
        match slot.checked_mul(entries as usize) {
            Some(total) if total <= MAX_TABLE_BYTES => Ok(Layout {
                entries,
                entry_size,
                slot,
            }),
            _ => Err(Error::Invalid(format!(
                "{entries} entries of {entry_size} bytes exceed {} GiB",
                MAX_TABLE_BYTES >> 30
            ))),
        }
    }

    /// Number of entries.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Payload bytes per entry.
    pub fn entry_size(&self) -> u32 {
        self.entry_size
    }

    /// Bytes per slot (page multiple): the unit of a grant.
    pub fn slot_size(&self) -> usize {
        self.slot
    }

    /// Bytes of the whole table.
    pub fn table_bytes(&self) -> usize {
        self.slot * self.entries as usize
    }

    pub(crate) fn slot_offset(&self, entry: u32) -> usize {
        self.slot * entry as usize
    }

    pub(crate) fn check(&self, entry: u32) -> Result<(), Error> {
        if entry < self.entries {
            Ok(())
        } else {
            Err(Error::NoSuchEntry {
                entry,
                entries: self.entries,
            })
        }
    }
}

/// A mapping of a table, read and written only through the seqlock.
#[derive(Debug)]
pub(crate) struct Slots {
    map: Mapping,
    layout: Layout,
}

/// Outcome of one read attempt.
pub(crate) enum Attempt {
    /// A complete entry at this (even) version.
    Done(u64),
    /// A writer was active; try again.
    Busy,
}

impl Slots {
    pub(crate) fn new(map: Mapping, layout: Layout) -> Slots {
        debug_assert!(map.len() >= layout.table_bytes());
        Slots { map, layout }
    }

    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Address of entry `entry`'s slot in this process.
    pub(crate) fn slot_addr(&self, entry: u32) -> usize {
        self.map.as_ptr() as usize + self.layout.slot_offset(entry)
    }

    pub(crate) fn base(&self) -> usize {
        self.map.as_ptr() as usize
    }

    fn seq_word(&self, entry: u32) -> &AtomicU64 {
        debug_assert!(entry < self.layout.entries);
        let off = self.layout.slot_offset(entry);
        // SAFETY: the slot of an existing entry lies inside the mapping, which
        // lives as long as `self.map`; slots are page-aligned, so the word is
        // 8-aligned. AtomicU64 has u64's layout, and every process touches
        // this memory only with atomic accesses (or the faulting test store),
        // so no non-atomic race is created.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU64) }
    }

    fn payload(&self, entry: u32) -> &[AtomicU64] {
        debug_assert!(entry < self.layout.entries);
        let off = self.layout.slot_offset(entry) + HEADER;
        // SAFETY: as for `seq_word`: `entry_size / 8` words after the
        // sequence word are inside the slot (slot ≥ HEADER + entry_size),
        // aligned, alive as long as `self`, and only accessed atomically.
        unsafe {
            std::slice::from_raw_parts(
                self.map.as_ptr().add(off) as *const AtomicU64,
                self.layout.entry_size as usize / 8,
            )
        }
    }

    /// The entry's sequence word (odd while a write is in progress).
    pub(crate) fn seq(&self, entry: u32) -> u64 {
        self.seq_word(entry).load(Ordering::Acquire)
    }

    /// One read attempt: copies the payload (up to `out.len()` bytes).
    pub(crate) fn try_read(&self, entry: u32, out: &mut [u8]) -> Attempt {
        let seq = self.seq_word(entry);
        let s1 = seq.load(Ordering::Acquire);
        if s1 & 1 == 1 {
            return Attempt::Busy;
        }
        let words = self.payload(entry);
        let n = out.len().min(words.len() * 8);
        let mut chunks = out[..n].chunks_exact_mut(8);
        for (c, w) in (&mut chunks).zip(words) {
            c.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let w = words[n / 8].load(Ordering::Relaxed).to_le_bytes();
            let len = rest.len();
            rest.copy_from_slice(&w[..len]);
        }
        fence(Ordering::Acquire);
        let s2 = seq.load(Ordering::Relaxed);
        if s1 == s2 {
            Attempt::Done(s1)
        } else {
            Attempt::Busy
        }
    }

    /// Reads a complete entry, retrying while a writer is active; gives up
    /// with [`Error::Busy`] after `spins` attempts (a writer that died mid-write
    /// leaves the entry odd until the element rolls it back).
    pub(crate) fn read(&self, entry: u32, out: &mut [u8], spins: u32) -> Result<u64, Error> {
        self.layout.check(entry)?;
        for i in 0..spins {
            if let Attempt::Done(v) = self.try_read(entry, out) {
                return Ok(v);
            }
            if i % 64 == 63 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        Err(Error::Busy { entry })
    }

    /// Writes `data` (zero-padded to a multiple of 8) at the start of the
    /// payload as one new version; returns that version. The caller must be
    /// the entry's only writer (holds the grant, or is the element while no
    /// device does).
    pub(crate) fn write(&self, entry: u32, data: &[u8]) -> Result<u64, Error> {
        self.layout.check(entry)?;
        if data.len() > self.layout.entry_size as usize {
            return Err(Error::TooLarge {
                len: data.len(),
                entry_size: self.layout.entry_size,
            });
        }
        let seq = self.seq_word(entry);
        let words = self.payload(entry);
        let s = seq.load(Ordering::Relaxed) & !1;
        seq.store(s + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        let whole = data.len() / 8 * 8;
        // SAFETY: `words` is the entry's payload inside the mapping (aligned,
        // alive as long as `self`, at least `entry_size` ≥ `data.len()` bytes,
        // checked above) and `data` is a separate buffer. The caller is the
        // entry's only writer; readers (other processes, or threads here) load
        // it with atomic loads between two loads of the sequence word, which
        // is odd from before this copy (the Release fence above) until after
        // it (the Release store below), so a reader that overlaps the copy
        // discards what it read and retries — the seqlock's usual bargain, as
        // in crossbeam's `AtomicCell`. One `memcpy` (vector stores) instead of
        // a store per word: 4 KiB in ~0.05 µs against ~0.2–0.35 µs, and an
        // update in place is what a grant is for.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                words.as_ptr().cast::<u8>().cast_mut(),
                whole,
            );
        }
        let rest = &data[whole..];
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            words[whole / 8].store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        seq.store(s + 2, Ordering::Release);
        Ok(s + 2)
    }

    /// The whole payload as words, for rolling back (only while no device
    /// can write the entry).
    pub(crate) fn snapshot(&self, entry: u32, into: &mut Vec<u64>) -> u64 {
        let words = self.payload(entry);
        // SAFETY: `words` are initialized, aligned u64s (AtomicU64 has u64's layout)
        // inside the mapping, alive as long as `self`. While no device can write the
        // entry (every mapping of it protected) and the element, its only other
        // writer, is the caller, nothing writes them during the copy, so this plain
        // read races with nothing (other processes only read them). One memcpy instead
        // of an atomic load per word: for a 4 KiB entry the per-word loop was a third
        // of a grant's time beside the ioctl.
        let plain =
            unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u64>(), words.len()) };
        into.clear();
        into.extend_from_slice(plain);
        self.seq(entry)
    }

    /// Writes a whole payload of words as the next version; returns it. The
    /// caller must be the entry's only writer.
    pub(crate) fn write_words(&self, entry: u32, words: &[u64]) -> u64 {
        let version = (self.seq(entry) & !1) + 2;
        self.restore(entry, words, version);
        version
    }

    /// Puts back a snapshot as version `version` (even).
    pub(crate) fn restore(&self, entry: u32, words: &[u64], version: u64) {
        let seq = self.seq_word(entry);
        seq.store(version | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        for (w, v) in self.payload(entry).iter().zip(words) {
            w.store(*v, Ordering::Relaxed);
        }
        seq.store(version & !1, Ordering::Release);
    }
}
