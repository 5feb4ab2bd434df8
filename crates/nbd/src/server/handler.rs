//! Request execution against one export: checks, device I/O and replies.

use std::io;

use super::buffers::OutBuf;
use super::handshake::Negotiated;
use super::stats::{Counters, LocalStats};
use super::MAX_REQUEST_LEN;
use crate::proto::*;
use crate::BlockDevice;

/// Executes requests against one export; shared by the inline loop and the
/// worker threads of the pooled mode.
pub(super) struct Handler<'a> {
    pub(super) dev: &'a dyn BlockDevice,
    pub(super) counters: &'a Counters,
    pub(super) size: u64,
    pub(super) read_only: bool,
    pub(super) structured: bool,
}

impl<'a> Handler<'a> {
    pub(super) fn new(neg: &'a Negotiated) -> Handler<'a> {
        Handler {
            dev: &*neg.export.dev,
            counters: &neg.export.counters,
            size: neg.size,
            read_only: neg.flags & FLAG_READ_ONLY != 0,
            structured: neg.structured,
        }
    }

    /// Runs `req` (any command but `DISC` and unknown ones) and appends its reply
    /// to `out`. `payload`: the data of a write (already received in full).
    pub(super) fn execute(
        &self,
        req: &Request,
        payload: &[u8],
        out: &mut OutBuf,
        stats: &mut LocalStats,
    ) {
        let r = match req.command {
            Command::Read => return self.read(req, out, stats),
            Command::Write => {
                stats.writes += 1;
                let r = self.write(req, payload);
                if r.is_ok() {
                    stats.bytes_written += u64::from(req.length);
                }
                r
            }
            Command::Flush => {
                stats.flushes += 1;
                self.check_flags(req, CMD_FLAG_FUA)
                    .and_then(|()| dev_result(self.dev.flush()))
            }
            Command::Trim => {
                stats.trims += 1;
                self.trim(req)
            }
            Command::WriteZeroes => {
                stats.write_zeroes += 1;
                self.write_zeroes(req)
            }
            Command::Cache | Command::BlockStatus | Command::Disc | Command::Unknown(_) => {
                Err(ErrorCode::Inval)
            }
        };
        push_simple_reply(out, stats, req.handle, r);
    }

    pub(super) fn check_flags(&self, req: &Request, allowed: u16) -> Result<(), ErrorCode> {
        if req.flags & !allowed != 0 {
            Err(ErrorCode::Inval)
        } else {
            Ok(())
        }
    }

    pub(super) fn check_writable(&self) -> Result<(), ErrorCode> {
        if self.read_only {
            Err(ErrorCode::Perm)
        } else {
            Ok(())
        }
    }

    /// `beyond`: the error for a range past the end (ENOSPC for writes).
    pub(super) fn check_range(&self, req: &Request, beyond: ErrorCode) -> Result<(), ErrorCode> {
        match req.end() {
            None => Err(ErrorCode::Inval),
            Some(end) if end > self.size => Err(beyond),
            Some(_) => Ok(()),
        }
    }

    pub(super) fn write(&self, req: &Request, data: &[u8]) -> Result<(), ErrorCode> {
        self.check_flags(req, CMD_FLAG_FUA)?;
        if req.length == 0 {
            return Err(ErrorCode::Inval);
        }
        self.check_writable()?;
        self.check_range(req, ErrorCode::NoSpc)?;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        dev_result(self.dev.write_at(data, req.offset, fua))
    }

    pub(super) fn trim(&self, req: &Request) -> Result<(), ErrorCode> {
        self.check_flags(req, CMD_FLAG_FUA)?;
        self.check_writable()?;
        self.check_range(req, ErrorCode::Inval)?;
        dev_result(self.dev.trim(req.offset, u64::from(req.length)))?;
        if req.flags & CMD_FLAG_FUA != 0 {
            dev_result(self.dev.flush())?;
        }
        Ok(())
    }

    pub(super) fn write_zeroes(&self, req: &Request) -> Result<(), ErrorCode> {
        self.check_flags(req, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE)?;
        self.check_writable()?;
        self.check_range(req, ErrorCode::NoSpc)?;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        dev_result(
            self.dev
                .write_zeroes(req.offset, u64::from(req.length), fua),
        )
    }

    pub(super) fn read(&self, req: &Request, out: &mut OutBuf, stats: &mut LocalStats) {
        stats.reads += 1;
        match self.read_into(req, out) {
            Ok(()) => stats.bytes_read += u64::from(req.length),
            Err(code) => {
                if self.structured {
                    stats.errors += 1;
                    let mut v = Vec::with_capacity(64);
                    encode_structured_error(&mut v, req.handle, code.to_wire(), "read failed");
                    out.push(&v);
                } else {
                    push_simple_reply(out, stats, req.handle, Err(code));
                }
            }
        }
    }

    /// Reads straight into the output buffer, behind the reply header.
    pub(super) fn read_into(&self, req: &Request, out: &mut OutBuf) -> Result<(), ErrorCode> {
        let allowed = if self.structured {
            CMD_FLAG_FUA | CMD_FLAG_DF
        } else {
            CMD_FLAG_FUA
        };
        self.check_flags(req, allowed)?;
        if req.length == 0 || req.length > MAX_REQUEST_LEN {
            return Err(ErrorCode::Inval);
        }
        self.check_range(req, ErrorCode::Inval)?;
        let len = len_usize(req.length);
        let hdr_len = if self.structured {
            STRUCTURED_REPLY_LEN + 8
        } else {
            SIMPLE_REPLY_LEN
        };
        let region = out.reserve(hdr_len + len);
        let (hdr, data) = region.split_at_mut(hdr_len);
        dev_result(self.dev.read_at(data, req.offset))?;
        if self.structured {
            let chunk = StructuredReply {
                flags: REPLY_FLAG_DONE,
                reply_type: REPLY_TYPE_OFFSET_DATA,
                handle: req.handle,
                length: 8 + req.length,
            };
            encode_structured_reply_into(hdr, &chunk);
            hdr[STRUCTURED_REPLY_LEN..].copy_from_slice(&req.offset.to_be_bytes());
        } else {
            encode_simple_reply_into(hdr, 0, req.handle);
        }
        out.commit(hdr_len + len);
        Ok(())
    }
}

pub(super) fn push_simple_reply(
    out: &mut OutBuf,
    stats: &mut LocalStats,
    handle: u64,
    r: Result<(), ErrorCode>,
) {
    let error = match r {
        Ok(()) => 0,
        Err(code) => {
            stats.errors += 1;
            code.to_wire()
        }
    };
    let hdr = out.reserve(SIMPLE_REPLY_LEN);
    encode_simple_reply_into(hdr, error, handle);
    out.commit(SIMPLE_REPLY_LEN);
}

/// Maps a device result to the reply's error value, logging failures.
pub(super) fn dev_result(r: io::Result<()>) -> Result<(), ErrorCode> {
    r.map_err(|e| {
        let code = ErrorCode::from_io(&e);
        tracing::warn!(error = %e, %code, "nbd export i/o error");
        code
    })
}
