//! The virtual switch of one host: one thread that owns the [`SwitchCore`] and the ports' packet
//! sockets, polls them, forwards each frame per the core's verdict, and every report interval
//! sends its counters and addresses to the domain controller and installs any newer table.
//!
//! Lifecycle: [`Switch::start`] opens every port (fails fast if one is missing) and spawns the
//! thread; [`SwitchHandle::stop`] makes it leave the loop, send a final report (retrying until
//! `stop_flush_timeout`) and return a summary. A crash (no final report) loses at most the
//! counts of one report interval; a restart starts a new epoch, so nothing is counted twice.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::controller::unix_ms;
use crate::core::{CoreTimeouts, PortId, PortKind, SwitchCore, Verdict};
use crate::proto::{read_msg, write_msg, ProtoError, ReportAck};
use crate::rawsock::{RawPort, RawPortError, Recv};
use crate::stats::{ReportOutcome, SwitchReport};
use crate::types::{ClassCounters, DomainId, PortAddress, SwitchId};

/// One VM port of a switch.
#[derive(Clone, Debug)]
pub struct PortConfig {
    /// The host-side interface (veth end or tap) in the switch's namespace.
    pub ifname: String,
    /// The VM behind it.
    pub address: PortAddress,
}

/// How to run one switch.
#[derive(Clone, Debug)]
pub struct SwitchConfig {
    /// This host.
    pub switch: SwitchId,
    /// The domain (controller) it belongs to.
    pub domain: DomainId,
    /// Network namespace holding the interfaces (`/run/netns/NAME`); `None` = the caller's.
    pub netns: Option<String>,
    /// VM ports.
    pub ports: Vec<PortConfig>,
    /// The uplink interface to the other hosts, if any.
    pub uplink: Option<String>,
    /// The controller's switch endpoint; `None` runs standalone (no table, no reports).
    pub controller: Option<SocketAddr>,
    /// How often to report.
    pub report_interval: Duration,
    /// How long a final report may retry when stopping.
    pub stop_flush_timeout: Duration,
    /// Learning and flow timeouts.
    pub timeouts: CoreTimeouts,
}

impl SwitchConfig {
    /// A config with 1 s reports and default timeouts.
    pub fn new(switch: SwitchId, domain: DomainId) -> SwitchConfig {
        SwitchConfig {
            switch,
            domain,
            netns: None,
            ports: Vec::new(),
            uplink: None,
            controller: None,
            report_interval: Duration::from_secs(1),
            stop_flush_timeout: Duration::from_secs(5),
            timeouts: CoreTimeouts::default(),
        }
    }
}

/// The switch could not start or failed while running.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// A port could not be opened.
    #[error("cannot open port of switch {switch}")]
    Port {
        /// Switch.
        switch: SwitchId,
        /// Cause.
        #[source]
        err: RawPortError,
    },
    /// More ports than a [`PortId`] can name.
    #[error("switch {switch} has too many ports")]
    TooManyPorts {
        /// Switch.
        switch: SwitchId,
    },
    /// poll(2) failed.
    #[error("poll failed on switch {switch}")]
    Poll {
        /// Switch.
        switch: SwitchId,
        /// Cause.
        #[source]
        err: nix::errno::Errno,
    },
    /// The switch thread could not be spawned or panicked.
    #[error("switch thread of {switch} failed")]
    Thread {
        /// Switch.
        switch: SwitchId,
    },
    /// The final report did not reach the controller before the flush timeout.
    #[error("final report of switch {switch} not acknowledged")]
    FinalReport {
        /// Switch.
        switch: SwitchId,
        /// Last cause.
        #[source]
        err: ProtoError,
    },
}

/// What a running switch shows to its owner.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SwitchStatus {
    /// Counter epoch of this run.
    pub epoch: u64,
    /// Version of the address table in use.
    pub table_version: u64,
    /// Entries in that table.
    pub table_entries: usize,
    /// Reports the controller applied.
    pub reports_applied: u64,
    /// Cumulative counters of this epoch (as of the last report).
    pub counters: ClassCounters,
    /// Frames that could not be sent (socket errors).
    pub tx_errors: u64,
    /// Frames received on all ports (including malformed and not-for-us).
    pub rx_frames: u64,
    /// CPU time of the switch thread (as of the last report).
    pub cpu: Duration,
}

/// A running switch.
#[derive(Debug)]
pub struct SwitchHandle {
    switch: SwitchId,
    stop: Arc<AtomicBool>,
    status: Arc<Mutex<SwitchStatus>>,
    thread: Option<JoinHandle<Result<SwitchStatus, SwitchError>>>,
}

impl SwitchHandle {
    /// The latest status (updated at each report interval).
    pub fn status(&self) -> SwitchStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops the switch after a final report; returns its final status.
    pub fn stop(mut self) -> Result<SwitchStatus, SwitchError> {
        self.join()
    }

    fn join(&mut self) -> Result<SwitchStatus, SwitchError> {
        self.stop.store(true, Ordering::Release);
        let t = self.thread.take().ok_or(SwitchError::Thread {
            switch: self.switch.clone(),
        })?;
        t.join().map_err(|_| SwitchError::Thread {
            switch: self.switch.clone(),
        })?
    }
}

impl Drop for SwitchHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.join();
        }
    }
}

/// Entry point.
#[derive(Debug)]
pub struct Switch;

/// Epochs are start times in unix ns, made strictly increasing within this process so two
/// runs started in the same nanosecond tick still differ.
fn next_epoch() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(1);
    let prev = LAST.fetch_max(now, Ordering::AcqRel);
    if prev >= now {
        LAST.fetch_add(1, Ordering::AcqRel) + 1
    } else {
        now
    }
}

impl Switch {
    /// Opens the ports and starts the switch thread.
    pub fn start(cfg: SwitchConfig) -> Result<SwitchHandle, SwitchError> {
        let port_err = |err| SwitchError::Port {
            switch: cfg.switch.clone(),
            err,
        };
        let mut kinds = Vec::new();
        let mut socks = Vec::new();
        for p in &cfg.ports {
            socks.push(RawPort::open(cfg.netns.as_deref(), &p.ifname).map_err(port_err)?);
            kinds.push(PortKind::Vm(p.address.clone()));
        }
        if let Some(up) = &cfg.uplink {
            socks.push(RawPort::open(cfg.netns.as_deref(), up).map_err(port_err)?);
            kinds.push(PortKind::Uplink);
        }
        if u16::try_from(kinds.len()).is_err() {
            return Err(SwitchError::TooManyPorts { switch: cfg.switch });
        }
        let core = SwitchCore::new(cfg.switch.clone(), cfg.domain.clone(), kinds, cfg.timeouts);
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(Mutex::new(SwitchStatus {
            epoch: next_epoch(),
            ..Default::default()
        }));
        let worker = Worker {
            link: cfg.controller.map(ControllerLink::new),
            cfg: cfg.clone(),
            core,
            socks,
            stop: stop.clone(),
            status: status.clone(),
            seq: 0,
            pending: None,
            tx_errors: 0,
            rx_frames: 0,
            reports_applied: 0,
        };
        let thread = std::thread::Builder::new()
            .name(format!("vswitch-{}", cfg.switch))
            .spawn(move || worker.run())
            .map_err(|_| SwitchError::Thread {
                switch: cfg.switch.clone(),
            })?;
        tracing::info!(switch = %cfg.switch, domain = %cfg.domain, "switch started");
        Ok(SwitchHandle {
            switch: cfg.switch,
            stop,
            status,
            thread: Some(thread),
        })
    }
}

/// A persistent connection to the controller, re-made after any error.
#[derive(Debug)]
pub(crate) struct ControllerLink {
    addr: SocketAddr,
    stream: Option<TcpStream>,
}

impl ControllerLink {
    pub(crate) fn new(addr: SocketAddr) -> ControllerLink {
        ControllerLink { addr, stream: None }
    }

    pub(crate) fn exchange(&mut self, r: &SwitchReport) -> Result<ReportAck, ProtoError> {
        let res = self.try_exchange(r);
        if res.is_err() {
            self.stream = None;
        }
        res
    }

    fn try_exchange(&mut self, r: &SwitchReport) -> Result<ReportAck, ProtoError> {
        let s = match &mut self.stream {
            Some(s) => s,
            None => {
                let s = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.set_write_timeout(Some(Duration::from_secs(2)))?;
                s.set_nodelay(true)?;
                self.stream.insert(s)
            }
        };
        write_msg(s, r)?;
        read_msg(s)
    }
}

struct Worker {
    cfg: SwitchConfig,
    core: SwitchCore,
    socks: Vec<RawPort>,
    link: Option<ControllerLink>,
    stop: Arc<AtomicBool>,
    status: Arc<Mutex<SwitchStatus>>,
    seq: u64,
    /// A report not acknowledged yet, resent as is (same seq) until it is.
    pending: Option<(SwitchReport, u64)>,
    tx_errors: u64,
    rx_frames: u64,
    reports_applied: u64,
}

fn thread_cpu() -> Duration {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::new(u64::try_from(tv.tv_sec()).unwrap_or(0), 0)
                    + Duration::from_micros(u64::try_from(tv.tv_usec()).unwrap_or(0))
            };
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or_default()
}

impl Worker {
    fn run(mut self) -> Result<SwitchStatus, SwitchError> {
        let epoch = self.status.lock().unwrap_or_else(|e| e.into_inner()).epoch;
        let start = Instant::now();
        let base_ms = unix_ms();
        let now_ms = |start: Instant| {
            base_ms + u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
        };
        let mut buf = vec![0u8; 65536];
        // Register first so the controller's table is in place before the first frame is
        // classified (a restarted switch would otherwise count its first frames as inter-domain).
        if self.link.is_some() {
            if let Err(e) = self.report(epoch) {
                tracing::warn!(switch = %self.cfg.switch, error = &e as &dyn std::error::Error, "registration failed; will retry");
            }
        }
        let mut next_report = Instant::now() + self.cfg.report_interval;
        let res = loop {
            if self.stop.load(Ordering::Acquire) {
                break Ok(());
            }
            if let Err(err) = self.poll_once(&mut buf, now_ms(start)) {
                break Err(SwitchError::Poll {
                    switch: self.cfg.switch.clone(),
                    err,
                });
            }
            if Instant::now() >= next_report {
                next_report = Instant::now() + self.cfg.report_interval;
                if let Err(e) = self.report(epoch) {
                    tracing::warn!(switch = %self.cfg.switch, error = &e as &dyn std::error::Error, "report failed; will retry");
                }
                self.core.expire(now_ms(start));
            }
        };
        res?;
        // Final report: everything counted in this epoch reaches the controller before exit.
        let deadline = Instant::now() + self.cfg.stop_flush_timeout;
        loop {
            match self.report(epoch) {
                Ok(()) if self.pending.is_none() => break,
                Ok(()) => {}
                Err(err) if Instant::now() >= deadline => {
                    return Err(SwitchError::FinalReport {
                        switch: self.cfg.switch.clone(),
                        err,
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        tracing::info!(switch = %self.cfg.switch, "switch stopped");
        Ok(self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone())
    }

    fn poll_once(&mut self, buf: &mut [u8], now_ms: u64) -> Result<(), nix::errno::Errno> {
        let ready: Vec<bool> = {
            let mut fds: Vec<PollFd<'_>> = self
                .socks
                .iter()
                .map(|s| PollFd::new(s.fd(), PollFlags::POLLIN))
                .collect();
            match nix::poll::poll(&mut fds, PollTimeout::from(10u8)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => return Ok(()),
                Err(e) => return Err(e),
            }
            fds.iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect()
        };
        for (i, r) in ready.into_iter().enumerate() {
            if !r {
                continue;
            }
            let Ok(port) = u16::try_from(i) else { continue };
            // Bounded batch per port so one busy port cannot starve the others.
            for _ in 0..256 {
                let n = match self.socks[i].recv(buf) {
                    Ok(Recv::Frame(n)) => n.min(buf.len()),
                    Ok(Recv::Outgoing) => continue,
                    Ok(Recv::Empty) => break,
                    Err(e) => {
                        tracing::warn!(port = self.socks[i].ifname(), error = %e, "recv failed");
                        break;
                    }
                };
                self.rx_frames += 1;
                let frame = &buf[..n];
                match self.core.process(PortId(port), frame, now_ms) {
                    Verdict::Forward(PortId(p)) => self.send(usize::from(p), frame),
                    Verdict::Flood { except } => {
                        for p in 0..self.socks.len() {
                            if p != usize::from(except.0) {
                                self.send(p, frame);
                            }
                        }
                    }
                    Verdict::Drop(reason) => tracing::trace!(?reason, "frame dropped"),
                }
            }
        }
        Ok(())
    }

    fn send(&mut self, port: usize, frame: &[u8]) {
        if let Some(s) = self.socks.get(port) {
            if s.send(frame).is_err() {
                self.tx_errors += 1;
            }
        }
    }

    fn report(&mut self, epoch: u64) -> Result<(), ProtoError> {
        let marker = if self.pending.is_none() {
            self.seq += 1;
            let (flows, marker) = self.core.snapshot();
            let r = SwitchReport {
                switch: self.cfg.switch.clone(),
                domain: self.cfg.domain.clone(),
                epoch,
                seq: self.seq,
                known_table_version: self.core.table().version,
                ports: self.core.local_addresses(),
                counters: *self.core.counters(),
                flows,
            };
            self.pending = Some((r, marker));
            marker
        } else {
            self.pending.as_ref().map_or(0, |p| p.1)
        };
        let counters = self
            .pending
            .as_ref()
            .map(|p| p.0.counters)
            .unwrap_or_default();
        let result = match (&mut self.link, &self.pending) {
            (Some(link), Some((r, _))) => link.exchange(r).map(Some),
            _ => Ok(None),
        };
        match result {
            Ok(ack) => {
                self.pending = None;
                self.core.ack(marker);
                if let Some(ack) = ack {
                    if matches!(
                        ack.outcome,
                        ReportOutcome::Applied | ReportOutcome::Duplicate
                    ) {
                        self.reports_applied += 1;
                    } else {
                        tracing::warn!(switch = %self.cfg.switch, outcome = ?ack.outcome, "controller refused report");
                    }
                    if let Some(t) = ack.table {
                        let v = t.version;
                        if self.core.apply_table(t) {
                            tracing::debug!(switch = %self.cfg.switch, version = v, "address table applied");
                        }
                    }
                }
            }
            Err(e) => {
                self.publish(counters);
                return Err(e);
            }
        }
        self.publish(counters);
        Ok(())
    }

    fn publish(&self, counters: ClassCounters) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.table_version = self.core.table().version;
        s.table_entries = self.core.table().entries.len();
        s.reports_applied = self.reports_applied;
        s.counters = counters;
        s.tx_errors = self.tx_errors;
        s.rx_frames = self.rx_frames;
        s.cpu = thread_cpu();
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("switch", &self.cfg.switch)
            .finish_non_exhaustive()
    }
}

/// Errors of a port are I/O errors too.
impl From<RawPortError> for io::Error {
    fn from(e: RawPortError) -> io::Error {
        io::Error::other(e)
    }
}
