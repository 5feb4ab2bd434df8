//! The per-connection input and output buffers.

use std::io::{self, Read};
use std::sync::atomic::Ordering;

use super::connection::ConnError;
use super::{Shared, INBUF_LEN, SHRINK_ABOVE};
use crate::stream::Stream;

/// Buffered input: request headers and small write payloads.
pub(super) struct InBuf {
    pub(super) buf: Vec<u8>,
    pub(super) start: usize,
    pub(super) end: usize,
}

impl InBuf {
    pub(super) fn new() -> InBuf {
        InBuf {
            buf: vec![0; INBUF_LEN],
            start: 0,
            end: 0,
        }
    }

    pub(super) fn avail(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start += n.min(self.avail());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads until at least `n` (≤ buffer size) bytes are buffered. Returns
    /// `Ok(false)` on a clean EOF at a message boundary. `idle_ok`: a read timeout
    /// with nothing buffered just means an idle client.
    pub(super) fn fill(
        &mut self,
        s: &mut Stream,
        n: usize,
        idle_ok: bool,
        shared: &Shared,
    ) -> Result<bool, ConnError> {
        if self.buf.len() - self.start < n {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.avail() < n {
            match s.read(&mut self.buf[self.end..]) {
                Ok(0) if self.avail() == 0 && idle_ok => return Ok(false),
                Ok(0) => return Err(ConnError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(k) => self.end += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) && self.avail() == 0
                        && idle_ok =>
                {
                    if shared.shutting_down.load(Ordering::SeqCst) {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }
}

/// Reply bytes waiting to be written. `buf` only grows (up to a cap), so the
/// zero-fill of `Vec::resize` is paid once, not per read reply.
pub(super) struct OutBuf {
    pub(super) buf: Vec<u8>,
    pub(super) len: usize,
}

impl OutBuf {
    pub(super) fn new() -> OutBuf {
        OutBuf {
            buf: Vec::new(),
            len: 0,
        }
    }

    pub(super) fn reserve(&mut self, n: usize) -> &mut [u8] {
        let end = self.len + n;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        &mut self.buf[self.len..end]
    }

    pub(super) fn commit(&mut self, n: usize) {
        self.len += n;
    }

    pub(super) fn push(&mut self, b: &[u8]) {
        self.reserve(b.len()).copy_from_slice(b);
        self.commit(b.len());
    }

    pub(super) fn flush(&mut self, s: &mut Stream) -> io::Result<()> {
        use std::io::Write;
        if self.len > 0 {
            s.write_all(&self.buf[..self.len])?;
            self.len = 0;
        }
        if self.buf.len() > SHRINK_ABOVE {
            // After a large read: give back the memory.
            self.buf = Vec::new();
        }
        Ok(())
    }
}
