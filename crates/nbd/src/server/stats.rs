//! Per-export counters: the shared atomics and the per-connection batch that feeds them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one export since it was added, over all its connections.
/// Request counts include failed requests; `errors` counts error replies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// `NBD_CMD_READ` requests.
    pub reads: u64,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// `NBD_CMD_WRITE` requests.
    pub writes: u64,
    /// Bytes stored by successful writes.
    pub bytes_written: u64,
    /// `NBD_CMD_FLUSH` requests.
    pub flushes: u64,
    /// `NBD_CMD_TRIM` requests.
    pub trims: u64,
    /// `NBD_CMD_WRITE_ZEROES` requests.
    pub write_zeroes: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Connections that reached transmission on this export.
    pub connections_total: u64,
    /// Connections currently in transmission on this export.
    pub connections_active: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) reads: AtomicU64,
    pub(super) bytes_read: AtomicU64,
    pub(super) writes: AtomicU64,
    pub(super) bytes_written: AtomicU64,
    pub(super) flushes: AtomicU64,
    pub(super) trims: AtomicU64,
    pub(super) write_zeroes: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) connections_total: AtomicU64,
    pub(super) connections_active: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> ExportStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExportStats {
            reads: g(&self.reads),
            bytes_read: g(&self.bytes_read),
            writes: g(&self.writes),
            bytes_written: g(&self.bytes_written),
            flushes: g(&self.flushes),
            trims: g(&self.trims),
            write_zeroes: g(&self.write_zeroes),
            errors: g(&self.errors),
            connections_total: g(&self.connections_total),
            connections_active: g(&self.connections_active),
        }
    }
}

/// Per-connection counts, added to the shared atomics once per batch (at each
/// output flush) rather than once per request.
#[derive(Default)]
pub(super) struct LocalStats {
    pub(super) reads: u64,
    pub(super) bytes_read: u64,
    pub(super) writes: u64,
    pub(super) bytes_written: u64,
    pub(super) flushes: u64,
    pub(super) trims: u64,
    pub(super) write_zeroes: u64,
    pub(super) errors: u64,
}

impl LocalStats {
    pub(super) fn publish(&mut self, c: &Counters) {
        let add = |a: &AtomicU64, v: &mut u64| {
            if *v != 0 {
                a.fetch_add(*v, Ordering::Relaxed);
                *v = 0;
            }
        };
        add(&c.reads, &mut self.reads);
        add(&c.bytes_read, &mut self.bytes_read);
        add(&c.writes, &mut self.writes);
        add(&c.bytes_written, &mut self.bytes_written);
        add(&c.flushes, &mut self.flushes);
        add(&c.trims, &mut self.trims);
        add(&c.write_zeroes, &mut self.write_zeroes);
        add(&c.errors, &mut self.errors);
    }
}
