//! The transmission phase: request loop, reply batching and the writer thread (inline
//! mode), and the worker pool (pooled mode).

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};
use std::thread;

use super::buffers::{InBuf, OutBuf};
use super::connection::ConnError;
use super::handler::{push_simple_reply, Handler};
use super::handshake::Negotiated;
use super::stats::LocalStats;
use super::{Shared, FLUSH_THRESHOLD, MAX_REQUEST_LEN, SHRINK_ABOVE};
use crate::proto::*;
use crate::stream::Stream;

/// Reads the next request header. `Ok(None)`: clean end (EOF between requests,
/// or shutdown while idle). `before_block` runs before any blocking read.
pub(super) fn next_request(
    s: &mut Stream,
    inb: &mut InBuf,
    shared: &Shared,
    before_block: &mut dyn FnMut(&mut Stream) -> io::Result<()>,
) -> Result<Option<Request>, ConnError> {
    if inb.avail() < REQUEST_LEN {
        before_block(s)?;
        if !inb.fill(s, REQUEST_LEN, true, shared)? {
            return Ok(None);
        }
    }
    let req = Request::parse(inb.data())?;
    inb.consume(REQUEST_LEN);
    Ok(Some(req))
}

/// What to do with a header before executing it.
pub(super) enum Next {
    Execute,
    /// `NBD_CMD_DISC`: end cleanly.
    Stop,
    /// Reply with an error, then close: the stream cannot be trusted further.
    Abort(ErrorCode, &'static str),
}

pub(super) fn classify(req: &Request) -> Next {
    match req.command {
        Command::Disc => Next::Stop,
        Command::Unknown(_) => Next::Abort(ErrorCode::Inval, "unknown command"),
        Command::Write if req.length > MAX_REQUEST_LEN => {
            Next::Abort(ErrorCode::Inval, "write payload over the request limit")
        }
        _ => Next::Execute,
    }
}

/// The transmission phase of one connection.
pub(super) struct Transmission<'a> {
    pub(super) shared: &'a Shared,
    pub(super) neg: &'a Negotiated,
}

impl<'a> Transmission<'a> {
    pub(super) fn new(shared: &'a Shared, neg: &'a Negotiated) -> Transmission<'a> {
        Transmission { shared, neg }
    }

    pub(super) fn run(self, s: &mut Stream) -> Result<(), ConnError> {
        s.set_read_timeout(Some(self.shared.io_timeout))?;
        s.set_write_timeout(Some(self.shared.io_timeout))?;
        if s.is_tls() {
            // A TLS session cannot be split between a reader and writer threads.
            self.run_inline(s, &mut Direct)
        } else if self.shared.threads_per_connection > 1 {
            self.run_pooled(s)
        } else if SPLIT_WRITER {
            self.run_split(s)
        } else {
            self.run_inline(s, &mut Direct)
        }
    }

    /// Execute each request as it is parsed; replies batched in `out` and handed
    /// to `sink` per batch.
    pub(super) fn run_inline(
        &self,
        s: &mut Stream,
        sink: &mut dyn ReplySink,
    ) -> Result<(), ConnError> {
        let h = Handler::new(self.neg);
        let mut inb = InBuf::new();
        let mut out = OutBuf::new();
        let mut stats = LocalStats::default();
        // Write payloads too large for the input buffer. Only grows (see OutBuf).
        let mut payload: Vec<u8> = Vec::new();
        let result = loop {
            let mut flush = |s: &mut Stream| {
                stats.publish(h.counters);
                sink.flush(&mut out, s)
            };
            let req = match next_request(s, &mut inb, self.shared, &mut flush) {
                Ok(Some(req)) => req,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            match classify(&req) {
                Next::Execute => {}
                Next::Stop => break Ok(()),
                Next::Abort(code, why) => {
                    push_simple_reply(&mut out, &mut stats, req.handle, Err(code));
                    break Err(ConnError::Policy(why));
                }
            }
            if req.command != Command::Write {
                h.execute(&req, &[], &mut out, &mut stats);
            } else {
                let len = len_usize(req.length);
                if len <= inb.avail() {
                    h.execute(&req, &inb.data()[..len], &mut out, &mut stats);
                    inb.consume(len);
                } else {
                    // Large payload: take what is buffered, read the rest straight
                    // into `payload`, and don't sit on replies meanwhile.
                    let have = inb.avail();
                    if payload.len() < len {
                        payload.resize(len, 0);
                    }
                    payload[..have].copy_from_slice(inb.data());
                    inb.consume(have);
                    stats.publish(h.counters);
                    if let Err(e) = sink
                        .flush(&mut out, s)
                        .and_then(|()| read_exact_stalling(s, &mut payload[have..len]))
                    {
                        break Err(e.into());
                    }
                    h.execute(&req, &payload[..len], &mut out, &mut stats);
                    if payload.len() > SHRINK_ABOVE {
                        payload = Vec::new();
                    }
                }
            }
            if out.len >= FLUSH_THRESHOLD {
                stats.publish(h.counters);
                if let Err(e) = sink.flush(&mut out, s) {
                    break Err(e.into());
                }
            }
        };
        // Publish counts and send what is buffered, even after an error reply.
        stats.publish(h.counters);
        let _ = sink.flush(&mut out, s);
        result
    }

    /// The connection thread executes requests; a second thread writes the
    /// batches of replies, so that device reads overlap socket writes.
    pub(super) fn run_split(&self, s: &mut Stream) -> Result<(), ConnError> {
        let writer = s.try_clone()?;
        let failed = AtomicBool::new(false);
        let pending = AtomicUsize::new(0);
        let (full_tx, full_rx) = mpsc::sync_channel::<OutBuf>(REPLY_BUFFERS);
        let (free_tx, free_rx) = mpsc::sync_channel::<OutBuf>(REPLY_BUFFERS);
        for _ in 1..REPLY_BUFFERS {
            let _ = free_tx.send(OutBuf::new());
        }
        thread::scope(|scope| {
            let (failed, pending) = (&failed, &pending);
            thread::Builder::new()
                .name("nbd-reply".into())
                .spawn_scoped(scope, move || {
                    reply_writer(writer, full_rx, free_tx, pending, failed)
                })?;
            let mut pipe = Pipe {
                full: full_tx,
                free: free_rx,
                pending,
                failed,
            };
            let r = self.run_inline(s, &mut pipe);
            drop(pipe); // the writer sends what is queued, then exits
            r
        })
    }

    /// This thread reads requests (and write payloads); `threads_per_connection`
    /// workers execute them concurrently and write each reply under a lock.
    pub(super) fn run_pooled(&self, s: &mut Stream) -> Result<(), ConnError> {
        let workers = self.shared.threads_per_connection;
        let writer = Mutex::new(s.try_clone()?);
        let (tx, rx) = mpsc::sync_channel::<(Request, Vec<u8>)>(workers * 2);
        let rx = Mutex::new(rx);
        let budget = Budget {
            used: Mutex::new(0),
            cv: Condvar::new(),
        };
        let h = Handler::new(self.neg);
        thread::scope(|scope| {
            for _ in 0..workers {
                thread::Builder::new()
                    .name("nbd-worker".into())
                    .spawn_scoped(scope, || pooled_worker(&h, &rx, &writer, &budget))?;
            }
            let result = self.pooled_reader(s, &tx, &budget, &writer, &h);
            drop(tx); // workers drain the queue and exit
            result
        })
    }

    pub(super) fn pooled_reader(
        &self,
        s: &mut Stream,
        tx: &mpsc::SyncSender<(Request, Vec<u8>)>,
        budget: &Budget,
        writer: &Mutex<Stream>,
        h: &Handler<'_>,
    ) -> Result<(), ConnError> {
        let mut inb = InBuf::new();
        let mut nothing = |_: &mut Stream| Ok(());
        loop {
            let Some(req) = next_request(s, &mut inb, self.shared, &mut nothing)? else {
                return Ok(());
            };
            match classify(&req) {
                Next::Execute => {}
                Next::Stop => return Ok(()),
                Next::Abort(code, why) => {
                    let mut out = OutBuf::new();
                    let mut stats = LocalStats::default();
                    push_simple_reply(&mut out, &mut stats, req.handle, Err(code));
                    stats.publish(h.counters);
                    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = out.flush(&mut w);
                    return Err(ConnError::Policy(why));
                }
            }
            let mut payload = Vec::new();
            if req.command == Command::Write {
                let len = len_usize(req.length);
                budget.acquire(len);
                payload.resize(len, 0);
                let have = inb.avail().min(len);
                payload[..have].copy_from_slice(&inb.data()[..have]);
                inb.consume(have);
                read_exact_stalling(s, &mut payload[have..])?;
            }
            if tx.send((req, payload)).is_err() {
                return Err(ConnError::Policy("reply writer failed"));
            }
        }
    }
}

/// Where a batch of replies goes.
pub(super) trait ReplySink {
    /// Sends (or queues) `out` and leaves it empty.
    fn flush(&mut self, out: &mut OutBuf, s: &mut Stream) -> io::Result<()>;
}

/// Written by the connection thread itself.
pub(super) struct Direct;

impl ReplySink for Direct {
    fn flush(&mut self, out: &mut OutBuf, s: &mut Stream) -> io::Result<()> {
        out.flush(s)
    }
}

/// Whether inline mode hands reply batches to a writer thread.
pub(super) const SPLIT_WRITER: bool = true;
/// Reply buffers in rotation between a connection thread and its writer.
pub(super) const REPLY_BUFFERS: usize = 4;

/// Batches smaller than this are written by the connection thread itself when
/// the writer thread is idle: a thread hop costs more than it overlaps.
pub(super) const HAND_OFF_MIN: usize = 128 << 10;

/// Large batches go to the connection's writer thread; buffers come back for
/// reuse. Small ones are written directly when nothing is queued (`pending` is
/// 0 only once the writer has written everything it was given, so the two
/// threads never write to the socket at the same time).
pub(super) struct Pipe<'a> {
    pub(super) full: mpsc::SyncSender<OutBuf>,
    pub(super) free: mpsc::Receiver<OutBuf>,
    pub(super) pending: &'a AtomicUsize,
    pub(super) failed: &'a AtomicBool,
}

impl ReplySink for Pipe<'_> {
    fn flush(&mut self, out: &mut OutBuf, s: &mut Stream) -> io::Result<()> {
        let broken = || io::Error::new(io::ErrorKind::BrokenPipe, "reply writer failed");
        if self.failed.load(Ordering::Acquire) {
            return Err(broken());
        }
        if out.len == 0 {
            return Ok(());
        }
        if out.len < HAND_OFF_MIN && self.pending.load(Ordering::Acquire) == 0 {
            return out.flush(s);
        }
        let next = self.free.recv().map_err(|_| broken())?;
        let batch = std::mem::replace(out, next);
        self.pending.fetch_add(1, Ordering::AcqRel);
        self.full.send(batch).map_err(|_| broken())
    }
}

pub(super) fn reply_writer(
    mut w: Stream,
    full: mpsc::Receiver<OutBuf>,
    free: mpsc::SyncSender<OutBuf>,
    pending: &AtomicUsize,
    failed: &AtomicBool,
) {
    for mut batch in full {
        if !failed.load(Ordering::Acquire) {
            if let Err(e) = batch.flush(&mut w) {
                tracing::debug!(error = %e, "nbd reply write failed");
                failed.store(true, Ordering::Release);
                // Wake the connection thread if it is blocked reading.
                w.shutdown();
            }
        }
        batch.len = 0;
        pending.fetch_sub(1, Ordering::AcqRel);
        let _ = free.send(batch);
    }
}

/// Bounds the write payload bytes queued for workers on one connection.
pub(super) struct Budget {
    pub(super) used: Mutex<usize>,
    pub(super) cv: Condvar,
}

/// Most write payload bytes a pooled connection holds in memory at once.
pub(super) const MAX_INFLIGHT_PAYLOAD: usize = 64 << 20;

impl Budget {
    pub(super) fn acquire(&self, n: usize) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + n > MAX_INFLIGHT_PAYLOAD {
            used = self.cv.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += n;
    }

    pub(super) fn release(&self, n: usize) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(n);
        self.cv.notify_all();
    }
}

pub(super) fn pooled_worker(
    h: &Handler<'_>,
    rx: &Mutex<mpsc::Receiver<(Request, Vec<u8>)>>,
    writer: &Mutex<Stream>,
    budget: &Budget,
) {
    let mut out = OutBuf::new();
    let mut stats = LocalStats::default();
    loop {
        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok((req, payload)) = job else { return };
        h.execute(&req, &payload, &mut out, &mut stats);
        budget.release(payload.len());
        drop(payload);
        stats.publish(h.counters);
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = out.flush(&mut w) {
            tracing::debug!(error = %e, "nbd reply write failed");
            // Wake the reader, which then ends the connection.
            w.shutdown();
            out.len = 0;
        }
    }
}

/// `read_exact` where a read timeout (the socket's, `io_timeout`) is fatal.
pub(super) fn read_exact_stalling(s: &mut Stream, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match s.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
