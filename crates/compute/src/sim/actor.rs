//! One task per simulated VM: it alone owns the guest (its memory, disk connection and
//! console file) and publishes the VM's status on a watch channel. The driver talks to
//! it over a bounded command channel; nothing here is shared or locked.
//!
//! Phases: `Booting` (init lines printed, `READY` due after the boot time once the disk
//! is attached) → `Running` (a tick every `vinfra.tick_ms`, its disk I/O in
//! `spawn_blocking`) ⇄ `Paused`; `Incoming` (waiting for a migration stream) → `Running`
//! or `Paused`; after a migration away, `Postmigrate`. The task ends when the VM exits
//! (stop, crash, guest power-off, a failed incoming migration), leaving the final status
//! in the watch channel, or when the driver goes away (its command channel closes).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::disk::{tick_io, SimDisk};
use super::guest::{self, Check, DiskSeen, GuestArgs, GuestMemory};
use super::stream::{self, Arrived, Switchover};
use crate::VmStatus;

/// A request to the VM's task.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// Pause the guest's CPUs (after its in-flight disk request completes).
    Pause(oneshot::Sender<Result<(), String>>),
    /// Resume a paused guest.
    Resume(oneshot::Sender<Result<(), String>>),
    /// Source switch-over: drain the guest's I/O, pause it and hand out its memory.
    Freeze(oneshot::Sender<Result<Switchover, String>>),
    /// The migration failed after a freeze: run on as before.
    Thaw,
    /// The migration completed: the guest runs elsewhere now; release the disk.
    Migrated,
    /// Stop (an orderly quit), with the reason to report.
    Stop {
        /// Why.
        reason: String,
        /// The final status.
        reply: oneshot::Sender<VmStatus>,
    },
    /// Die at once (an injected hypervisor crash).
    Crash {
        /// Why.
        reason: String,
    },
    /// Keyboard and pointer events for the guest (refused unless it runs).
    Input {
        /// The events, in order.
        events: Vec<model::terminal_ops::InputEvent>,
        /// `Err(state)` when the guest does not run.
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The power button (ACPI): the simulated guest powers off, at once or, when paused,
    /// once it runs again.
    PowerButton(oneshot::Sender<Result<(), String>>),
    /// The reset button: the guest reboots (its memory is gone; a paused one stays paused).
    Reset(oneshot::Sender<Result<(), String>>),
}

/// How the task begins.
#[derive(Debug)]
pub(crate) enum Boot {
    /// A fresh boot: init lines, boot time, `READY`.
    Fresh,
    /// A migration destination: wait for the stream on this listener.
    Incoming(tokio::net::TcpListener),
    /// A guest picked up from its files by a new driver: it runs on from this memory.
    Resumed(GuestMemory),
}

/// Everything the task needs besides its [`Boot`].
#[derive(Debug)]
pub(crate) struct ActorConfig {
    pub id: String,
    pub args: GuestArgs,
    pub boot_time: Duration,
    /// `None`: the simulation does no disk I/O.
    pub disk: Option<SimDisk>,
    pub console: PathBuf,
    pub pidfile: PathBuf,
    /// Most RAM bytes an incoming stream may carry.
    pub max_ram: u64,
    /// A migration destination's record, rewritten once the guest arrived (from then
    /// on a new driver may adopt it).
    pub arrival_record: Option<crate::VmSpec>,
}

#[derive(Clone, Debug)]
enum Resume {
    Booting {
        left: Duration,
        attached: Option<DiskSeen>,
    },
    Running,
}

#[derive(Clone, Debug)]
enum Phase {
    Booting {
        ready_at: Instant,
        attached: Option<DiskSeen>,
    },
    Running {
        next_at: Instant,
    },
    Paused {
        state: &'static str,
        resume: Resume,
    },
    Incoming,
    Postmigrate,
}

/// What a blocking disk job returns (with the disk, lent to it).
#[derive(Debug)]
enum IoDone {
    Attached(Result<u64, String>),
    Tick { i: u64, read: Check, write: Check },
}

type IoJob = JoinHandle<(SimDisk, IoDone)>;
type IncomingJob = JoinHandle<Result<(Switchover, Arrived), String>>;

/// Sets the disk's cancel flag when the actor ends, also when its task is aborted (the
/// driver dropped): a disk request waiting to reconnect then gives up.
struct CancelOnDrop(Option<std::sync::Arc<std::sync::atomic::AtomicBool>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

struct Actor {
    cfg: ActorConfig,
    _cancel: CancelOnDrop,
    disk: Option<SimDisk>,
    console: Option<std::fs::File>,
    mem: GuestMemory,
    /// Since when the guest's clock runs (`None`: paused).
    running_since: Option<Instant>,
    phase: Phase,
    before_freeze: Option<Phase>,
    /// The power button was pressed while the guest was paused: it powers off on resume.
    power_button: bool,
    status: watch::Sender<VmStatus>,
}

/// Why the loop ends.
enum Exit {
    /// The VM exited with this status.
    Status(VmStatus),
    /// The driver is gone: stop quietly (the pidfile stays, as a killed hypervisor's).
    Orphaned,
}

/// Starts the task on `rt`; returns its handle.
pub(crate) fn spawn(
    rt: &tokio::runtime::Handle,
    mut cfg: ActorConfig,
    boot: Boot,
    rx: mpsc::Receiver<Cmd>,
    status: watch::Sender<VmStatus>,
) -> JoinHandle<()> {
    let truncate = !matches!(boot, Boot::Resumed(_));
    let console = std::fs::OpenOptions::new()
        .create(true)
        .append(!truncate)
        .write(true)
        .truncate(truncate)
        .open(&cfg.console)
        .map_err(|e| tracing::warn!(vm = %cfg.id, error = %e, "cannot open the console log"))
        .ok();
    let disk = cfg.disk.take();
    let actor = Actor {
        cfg,
        _cancel: CancelOnDrop(disk.as_ref().and_then(SimDisk::cancel)),
        disk,
        console,
        mem: GuestMemory::default(),
        running_since: None,
        phase: Phase::Incoming,
        before_freeze: None,
        power_button: false,
        status,
    };
    rt.spawn(actor.run(boot, rx))
}

impl Actor {
    fn say(&mut self, line: &str) {
        if let Some(f) = &mut self.console {
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }

    /// Writes lines in one go (a typed text is hundreds of `INPUT` lines).
    fn say_all(&mut self, lines: impl Iterator<Item = String>) {
        if let Some(f) = &mut self.console {
            let mut buf = String::new();
            for l in lines {
                buf.push_str(&l);
                buf.push('\n');
            }
            let _ = f.write_all(buf.as_bytes());
        }
    }

    /// Why the guest takes no input now (`None`: it runs).
    fn not_running(&self) -> Option<String> {
        match &self.phase {
            Phase::Booting { .. } | Phase::Running { .. } => None,
            Phase::Paused { state, .. } => Some((*state).to_owned()),
            Phase::Incoming => Some("inmigrate".into()),
            Phase::Postmigrate => Some("postmigrate".into()),
        }
    }

    /// The reset button: a new boot from an empty memory, as after power-on.
    fn reboot(&mut self, io: &mut Option<IoJob>) {
        self.mem = GuestMemory::default();
        self.power_button = false;
        let running = self.running_since.is_some();
        self.running_since = running.then(Instant::now);
        self.say(&guest::init_line(0));
        for l in guest::nic_lines(&self.cfg.args) {
            self.say(&l);
        }
        match self.phase.clone() {
            Phase::Paused { state, .. } => {
                self.phase = Phase::Paused {
                    state,
                    resume: Resume::Booting {
                        left: self.cfg.boot_time,
                        attached: None,
                    },
                };
            }
            _ => self.boot(io, self.cfg.boot_time),
        }
    }

    fn uptime_ms(&self) -> u64 {
        let run = self.running_since.map_or(0, |t| {
            u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
        });
        self.mem.uptime_ms.saturating_add(run)
    }

    fn clock_stop(&mut self) {
        self.mem.uptime_ms = self.uptime_ms();
        self.running_since = None;
    }

    fn clock_start(&mut self) {
        if self.running_since.is_none() {
            self.running_since = Some(Instant::now());
        }
    }

    fn tick_period(&self) -> Duration {
        Duration::from_millis(self.cfg.args.tick_ms)
    }

    fn set_status(&self, st: VmStatus) {
        self.status.send_replace(st);
    }

    /// Lends the disk to a blocking job.
    fn start_io(
        &mut self,
        job: impl FnOnce(&mut SimDisk) -> IoDone + Send + 'static,
    ) -> Option<IoJob> {
        let mut disk = self.disk.take()?;
        Some(tokio::task::spawn_blocking(move || {
            let done = job(&mut disk);
            (disk, done)
        }))
    }

    async fn run(mut self, boot: Boot, mut rx: mpsc::Receiver<Cmd>) {
        let mut io: Option<IoJob> = None;
        let mut incoming: Option<IncomingJob> = None;
        match boot {
            Boot::Fresh => {
                self.clock_start();
                self.say(&guest::init_line(0));
                for l in guest::nic_lines(&self.cfg.args) {
                    self.say(&l);
                }
                self.boot(&mut io, self.cfg.boot_time);
                self.set_status(VmStatus::Running);
            }
            Boot::Incoming(listener) => {
                let (id, max) = (self.cfg.id.clone(), self.cfg.max_ram);
                incoming = Some(tokio::spawn(async move {
                    stream::receive(listener, &id, max).await
                }));
                self.phase = Phase::Incoming;
                self.set_status(VmStatus::Paused {
                    state: "inmigrate".into(),
                });
            }
            Boot::Resumed(mem) => {
                self.mem = mem;
                self.clock_start();
                self.run_from_memory(&mut io);
                self.set_status(VmStatus::Running);
            }
        }
        let exit = loop {
            let due = match &self.phase {
                Phase::Booting {
                    ready_at,
                    attached: Some(_),
                } if io.is_none() => Some(*ready_at),
                Phase::Running { next_at } if io.is_none() => Some(*next_at),
                _ => None,
            };
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None => break Exit::Orphaned,
                    Some(cmd) => if let Some(st) = self.command(cmd, &mut io).await {
                        break Exit::Status(st);
                    },
                },
                r = async { io.as_mut().expect("guarded").await }, if io.is_some() => {
                    io = None;
                    match r {
                        Ok((disk, done)) => {
                            self.disk = Some(disk);
                            if let Some(st) = self.io_done(done) {
                                break Exit::Status(st);
                            }
                        }
                        Err(e) => break Exit::Status(VmStatus::Crashed {
                            reason: format!("the simulated guest's disk job died: {e}"),
                        }),
                    }
                }
                r = async { incoming.as_mut().expect("guarded").await }, if incoming.is_some() => {
                    incoming = None;
                    let r = r.unwrap_or_else(|e| Err(format!("receiver died: {e}")));
                    if let Some(st) = self.arrived(r, &mut io).await {
                        break Exit::Status(st);
                    }
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()), if due.is_some() => {
                    if let Some(st) = self.timer(&mut io) {
                        break Exit::Status(st);
                    }
                }
            }
        };
        if let Some(j) = incoming {
            j.abort();
        }
        match exit {
            Exit::Orphaned => {}
            Exit::Status(st) => {
                // The hypervisor is gone: like QEMU, it takes its pidfile with it.
                if let Some(j) = io {
                    j.abort();
                }
                if let Some(d) = &mut self.disk {
                    d.close();
                }
                let _ = std::fs::remove_file(&self.cfg.pidfile);
                tracing::info!(vm = %self.cfg.id, status = ?st, "simulated vm exited");
                self.set_status(st);
            }
        }
    }

    /// Enters `Booting`, attaching the disk meanwhile.
    fn boot(&mut self, io: &mut Option<IoJob>, boot_time: Duration) {
        let attached = self.attach(io);
        self.phase = Phase::Booting {
            ready_at: Instant::now() + boot_time,
            attached,
        };
    }

    /// Starts attaching the disk (its size is what the guest sees as `/dev/vda`);
    /// without disk I/O there is nothing to wait for.
    fn attach(&mut self, io: &mut Option<IoJob>) -> Option<DiskSeen> {
        if io.is_some() {
            return None;
        }
        match self.start_io(|d| IoDone::Attached(d.size())) {
            Some(job) => {
                *io = Some(job);
                None
            }
            None => Some(DiskSeen::Unchecked),
        }
    }

    /// Continues a guest whose memory arrived (migration) or was recovered (adoption).
    fn run_from_memory(&mut self, io: &mut Option<IoJob>) {
        if self.mem.ready {
            self.phase = Phase::Running {
                next_at: Instant::now() + self.tick_period(),
            };
        } else {
            // It was still booting: it boots on (no second init line).
            self.boot(io, self.cfg.boot_time);
        }
    }

    fn power_off(&mut self, reason: &str) -> VmStatus {
        self.say(&guest::poweroff_line(reason));
        VmStatus::Stopped {
            reason: "guest powered off".into(),
        }
    }

    fn timer(&mut self, io: &mut Option<IoJob>) -> Option<VmStatus> {
        match self.phase.clone() {
            Phase::Booting {
                attached: Some(seen),
                ..
            } => match guest::ready(&seen, self.uptime_ms()) {
                Ok(line) => {
                    self.say(&line);
                    self.mem.ready = true;
                    if let DiskSeen::Mib(m) = seen {
                        self.mem.disk_mib = m;
                    }
                    self.phase = Phase::Running {
                        next_at: Instant::now(),
                    };
                    None
                }
                Err((line, reason)) => {
                    if let DiskSeen::Missing(why) = &seen {
                        tracing::warn!(vm = %self.cfg.id, error = %why, "simulated guest found no disk");
                    }
                    self.say(&line);
                    Some(self.power_off(reason))
                }
            },
            Phase::Running { .. } => {
                let (i, mib) = (self.mem.next_tick, self.mem.disk_mib);
                match self.start_io(move |d| {
                    let (read, write) = tick_io(d, i, mib);
                    IoDone::Tick { i, read, write }
                }) {
                    Some(job) => {
                        *io = Some(job);
                        None
                    }
                    None => self.io_done(IoDone::Tick {
                        i,
                        read: Check::Off,
                        write: Check::Off,
                    }),
                }
            }
            _ => None,
        }
    }

    fn io_done(&mut self, done: IoDone) -> Option<VmStatus> {
        match done {
            IoDone::Attached(r) => {
                let seen = match r {
                    Ok(bytes) => DiskSeen::Mib(bytes >> 20),
                    Err(e) => DiskSeen::Missing(e),
                };
                if let Phase::Booting { attached, .. } = &mut self.phase {
                    *attached = Some(seen);
                }
                None
            }
            IoDone::Tick { i, read, write } => {
                let line = guest::tick_line(i, self.uptime_ms(), self.mem.disk_mib, &read, &write);
                self.say(&line);
                self.mem.next_tick = i + 1;
                if self.cfg.args.ticks > 0 && self.mem.next_tick >= self.cfg.args.ticks {
                    return Some(self.power_off("ticks-done"));
                }
                if let Phase::Running { next_at } = &mut self.phase {
                    *next_at = Instant::now() + Duration::from_millis(self.cfg.args.tick_ms);
                }
                None
            }
        }
    }

    /// Waits for the in-flight disk request (QEMU drains I/O before it stops CPUs).
    async fn drain(&mut self, io: &mut Option<IoJob>) -> Option<VmStatus> {
        let job = io.take()?;
        match job.await {
            Ok((disk, done)) => {
                self.disk = Some(disk);
                self.io_done(done)
            }
            Err(e) => Some(VmStatus::Crashed {
                reason: format!("the simulated guest's disk job died: {e}"),
            }),
        }
    }

    fn pause_as(&mut self, state: &'static str) -> Result<(), String> {
        let resume = match &self.phase {
            Phase::Booting { ready_at, attached } => Resume::Booting {
                left: ready_at.saturating_duration_since(Instant::now()),
                attached: attached.clone(),
            },
            Phase::Running { .. } => Resume::Running,
            Phase::Paused { resume, .. } => resume.clone(),
            Phase::Incoming => return Err("it is waiting for an incoming migration".into()),
            Phase::Postmigrate => return Err("it migrated away".into()),
        };
        self.clock_stop();
        self.phase = Phase::Paused { state, resume };
        self.set_status(VmStatus::Paused {
            state: state.into(),
        });
        Ok(())
    }

    fn resume(&mut self, io: &mut Option<IoJob>) -> Result<(), String> {
        match self.phase.clone() {
            Phase::Paused { resume, .. } => {
                self.clock_start();
                match resume {
                    Resume::Booting { left, attached } => {
                        let attached = match attached {
                            Some(a) => Some(a),
                            None => self.attach(io),
                        };
                        self.phase = Phase::Booting {
                            ready_at: Instant::now() + left,
                            attached,
                        };
                    }
                    Resume::Running => {
                        self.phase = Phase::Running {
                            next_at: Instant::now() + self.tick_period(),
                        };
                    }
                }
                self.set_status(VmStatus::Running);
                Ok(())
            }
            Phase::Booting { .. } | Phase::Running { .. } => Ok(()),
            Phase::Incoming => Err("it is waiting for an incoming migration".into()),
            Phase::Postmigrate => Err("it migrated away".into()),
        }
    }

    /// Handles one command; `Some(status)` when the VM exits.
    async fn command(&mut self, cmd: Cmd, io: &mut Option<IoJob>) -> Option<VmStatus> {
        match cmd {
            Cmd::Pause(reply) => {
                if let Some(st) = self.drain(io).await {
                    let _ = reply.send(Err("the guest exited".into()));
                    return Some(st);
                }
                let _ = reply.send(self.pause_as("paused"));
                None
            }
            Cmd::Resume(reply) => {
                let r = self.resume(io);
                let resumed = r.is_ok();
                let _ = reply.send(r);
                if resumed && self.power_button {
                    return Some(self.power_off("power-button"));
                }
                None
            }
            Cmd::Input { events, reply } => {
                match self.not_running() {
                    Some(state) => {
                        let _ = reply.send(Err(state));
                    }
                    None => {
                        self.say_all(events.iter().map(|e| format!("INPUT {e}")));
                        let _ = reply.send(Ok(()));
                    }
                }
                None
            }
            Cmd::PowerButton(reply) => match &self.phase {
                Phase::Booting { .. } | Phase::Running { .. } => {
                    let _ = reply.send(Ok(()));
                    Some(self.power_off("power-button"))
                }
                Phase::Paused { .. } => {
                    self.power_button = true;
                    let _ = reply.send(Ok(()));
                    None
                }
                Phase::Incoming | Phase::Postmigrate => {
                    let _ = reply.send(Err(self.not_running().unwrap_or_default()));
                    None
                }
            },
            Cmd::Reset(reply) => {
                if matches!(self.phase, Phase::Incoming | Phase::Postmigrate) {
                    let _ = reply.send(Err(self.not_running().unwrap_or_default()));
                    return None;
                }
                // The in-flight disk request completes first, as QEMU drains I/O on reset.
                if let Some(st) = self.drain(io).await {
                    let _ = reply.send(Err("the guest exited".into()));
                    return Some(st);
                }
                self.reboot(io);
                let _ = reply.send(Ok(()));
                None
            }
            Cmd::Freeze(reply) => {
                if let Some(st) = self.drain(io).await {
                    let _ = reply.send(Err("the guest exited".into()));
                    return Some(st);
                }
                let running = matches!(self.phase, Phase::Running { .. } | Phase::Booting { .. });
                let before = self.phase.clone();
                match self.pause_as("finish-migrate") {
                    Ok(()) => {
                        self.before_freeze = Some(before);
                        let _ = reply.send(Ok(Switchover {
                            memory: self.mem,
                            running,
                        }));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
                None
            }
            Cmd::Thaw => {
                match self.before_freeze.take() {
                    Some(Phase::Paused { state, resume }) => {
                        self.phase = Phase::Paused { state, resume };
                        self.set_status(VmStatus::Paused {
                            state: state.into(),
                        });
                    }
                    Some(_) => {
                        if let Err(e) = self.resume(io) {
                            tracing::warn!(vm = %self.cfg.id, error = %e, "cannot resume after a failed migration");
                        }
                    }
                    None => {}
                }
                None
            }
            Cmd::Migrated => {
                self.before_freeze = None;
                self.phase = Phase::Postmigrate;
                if let Some(d) = &mut self.disk {
                    d.close();
                }
                self.set_status(VmStatus::Paused {
                    state: "postmigrate".into(),
                });
                None
            }
            Cmd::Stop { reason, reply } => {
                let st = VmStatus::Stopped { reason };
                let _ = reply.send(st.clone());
                Some(st)
            }
            Cmd::Crash { reason } => Some(VmStatus::Crashed { reason }),
        }
    }

    /// The incoming migration ended: the guest runs here, or this hypervisor dies.
    async fn arrived(
        &mut self,
        r: Result<(Switchover, Arrived), String>,
        io: &mut Option<IoJob>,
    ) -> Option<VmStatus> {
        match r {
            Ok((sw, arrived)) => {
                self.mem = sw.memory;
                if let Some(spec) = self.cfg.arrival_record.take() {
                    if let Err(e) = super::write_record(&spec.run_dir, &spec, false) {
                        tracing::warn!(vm = %self.cfg.id, error = %e, "cannot update the adoption record");
                    }
                }
                if sw.running {
                    self.clock_start();
                    self.run_from_memory(io);
                    self.set_status(VmStatus::Running);
                } else {
                    let resume = if self.mem.ready {
                        Resume::Running
                    } else {
                        Resume::Booting {
                            left: self.cfg.boot_time,
                            attached: None,
                        }
                    };
                    self.phase = Phase::Paused {
                        state: "paused",
                        resume,
                    };
                    self.set_status(VmStatus::Paused {
                        state: "paused".into(),
                    });
                }
                tracing::info!(vm = %self.cfg.id, next_tick = self.mem.next_tick, running = sw.running, "simulated guest arrived");
                arrived.ack().await;
                None
            }
            Err(why) => Some(VmStatus::Crashed {
                reason: format!("incoming migration failed: {why}"),
            }),
        }
    }
}
