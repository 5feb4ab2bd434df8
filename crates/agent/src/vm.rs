//! One task per VM: the shell around [`crate::phase`]. The task alone owns the VM's
//! phase, its cache and its last report; the reconciler only routes what the server
//! wants to it ([`VmHandle::route`]). Each task does its own I/O (a QEMU start, a
//! snapshot upload, a migration step) at its own pace, so a slow start of one VM never
//! delays another VM's migration.
//!
//! Messages coalesce (a `watch` channel): a task busy with a 10 s start acts, when it
//! is done, on what the server wants *then*, not on every state it passed through. The
//! reconciler sends each VM's assignment on every pass even when unchanged: that is the
//! task's tick (noticing a hypervisor that exited, retrying a failed start, reporting a
//! migration's progress).
//!
//! Each task also watches the host lease ([`crate::lease`]): when it expires, the task
//! acts on its last message again at once, which pauses a redundant guest (the
//! reconciler is not needed for that, and cannot reach the server anyway). Reports
//! are not sent while the lease is expired, and one under way is given up when it
//! expires, so that no report waiting on a dead connection holds up the pause.

use std::sync::Arc;
use std::time::Instant;

use model::api::{Assignment, ObservedReport, ReportedState};
use model::terminals::PerformedOperation;
use model::{DesiredState, VmId};
use tokio::sync::{mpsc, watch};

use crate::files::VmFiles;
use crate::lease::{self, Lease};
use crate::local::{self, VmDisk};
use crate::phase::{self, Authority, Desired, MigLocal, Side, Step, VmPhase};
use crate::Host;

/// The error note of a fenced VM's report (constant, so that repeated reports are
/// recognised as unchanged).
const FENCED_NOTE: &str = "paused by its agent: the host lease expired (cut off from the \
    control plane); resumed if still assigned here when the server answers again";

/// What the reconciler tells a VM task.
#[derive(Clone, Debug)]
pub(crate) enum Msg {
    /// The VM's current assignment to this host (also the tick).
    Assigned(Box<Assignment>),
    /// No assignment yet (a VM adopted from an earlier agent process, before the first
    /// pass): only the lease is acted on.
    Awaiting,
    /// The VM is no longer assigned here: stop it, remove its files, end.
    Unassigned,
    /// The agent shuts down: stop the VM, report it, end.
    Shutdown,
}

/// The reconciler's end of a VM task.
#[derive(Debug)]
pub(crate) struct VmHandle {
    tx: watch::Sender<Msg>,
    /// Terminal operations for the VM, performed in the order they came.
    ops: mpsc::Sender<PerformedOperation>,
    task: tokio::task::JoinHandle<()>,
    /// `Unassigned` or `Shutdown` was sent: the task is on its way out.
    leaving: bool,
}

impl VmHandle {
    /// Starts the task of VM `id` in `phase` (an adopted VM starts `Running`), acting
    /// on `first` at once (`Awaiting` for an adopted VM).
    pub(crate) fn spawn(host: Arc<Host>, id: VmId, phase: VmPhase, first: Msg) -> VmHandle {
        let (tx, rx) = watch::channel(first);
        let (ops, ops_rx) = mpsc::channel(OPS_QUEUE);
        let task = VmTask {
            files: VmFiles::new(&host.cfg.data_dir, id),
            lease: host.lease.clone(),
            host,
            phase,
            disk: VmDisk::default(),
            last_report: None,
            mig_reported: None,
            redundant: None,
            confirmed_at: None,
            windows: Vec::new(),
        };
        VmHandle {
            tx,
            ops,
            task: tokio::spawn(task.run(rx, ops_rx)),
            leaving: false,
        }
    }

    /// Hands the task what the server wants now; never waits for the task.
    pub(crate) fn route(&mut self, msg: Msg) {
        if self.leaving {
            return;
        }
        self.leaving = matches!(msg, Msg::Unassigned | Msg::Shutdown);
        self.tx.send_replace(msg);
    }

    /// Queues a terminal operation for the VM; gives it back when the queue is full or
    /// the task is gone (the caller answers it failed).
    pub(crate) fn operation(&self, op: PerformedOperation) -> Result<(), Box<PerformedOperation>> {
        self.ops.try_send(op).map_err(|e| match e {
            mpsc::error::TrySendError::Full(op) | mpsc::error::TrySendError::Closed(op) => {
                Box::new(op)
            }
        })
    }

    /// Tells the task to stop its VM for the agent's shutdown.
    pub(crate) fn shutdown(&self) {
        self.tx.send_replace(Msg::Shutdown);
    }

    /// The task ended (after `Unassigned`, `Shutdown`, a deletion, or a panic).
    pub(crate) fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the task to end.
    pub(crate) async fn join(self) {
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "a vm task failed");
        }
    }
}

/// Terminal operations queued per VM before new ones are answered `failed` (a VM
/// task busy with a long step, a start, holds them meanwhile).
const OPS_QUEUE: usize = 256;

/// How many steps one message may take (e.g. retry, then start): a bound, so that a
/// transition function that never settles cannot spin.
const MAX_STEPS_PER_MESSAGE: usize = 4;

/// The VM task's state.
pub(crate) struct VmTask {
    pub(crate) host: Arc<Host>,
    pub(crate) files: VmFiles,
    pub(crate) phase: VmPhase,
    pub(crate) disk: VmDisk,
    last_report: Option<ObservedReport>,
    /// This host's last accepted report on a migration of the VM: an assignment that
    /// shows the migration at an earlier state is older than that report
    /// ([`phase::is_behind`]). Kept past the migration's end here (a destination that
    /// completed must not act on a late `warming` view).
    pub(crate) mig_reported: Option<(model::MigrationId, model::MigrationState)>,
    /// The host lease, as the watchdog publishes it.
    lease: watch::Receiver<Lease>,
    /// Whether the VM is redundant, from its last assignment (`None`: none seen yet).
    redundant: Option<bool>,
    /// When this task sent its own request that found the VM assigned here
    /// ([`Step::Confirm`]): only such an answer, asked for after the lease was (re)gained,
    /// lets a redundant guest start or resume (see [`crate::lease`]).
    confirmed_at: Option<Instant>,
    /// The VM's windows on its resource tables, from its last start (closed when it
    /// stops).
    windows: Vec<crate::tables::VmWindow>,
}

impl VmTask {
    fn id(&self) -> VmId {
        self.files.id()
    }

    async fn run(mut self, rx: watch::Receiver<Msg>, mut ops: mpsc::Receiver<PerformedOperation>) {
        self.serve(rx, &mut ops).await;
        // Operations still queued when the VM leaves (deleted, moved, the agent shutting
        // down) are answered, not dropped: their records would stay `sent` forever.
        ops.close();
        while let Ok(op) = ops.try_recv() {
            let result = crate::terminal::refused(
                &self.host,
                "the VM left this host before it was performed",
            );
            crate::terminal::answer(&self.host, &op, result).await;
        }
    }

    async fn serve(
        &mut self,
        mut rx: watch::Receiver<Msg>,
        ops: &mut mpsc::Receiver<PerformedOperation>,
    ) {
        // The watchdog ends with the agent; after that only messages wake the task.
        let mut lease_open = true;
        let mut act = true;
        loop {
            if act {
                // Operations that arrived first are performed first: a migration step
                // may move the guest away, and an operation the server routed here
                // before it held them would then fail.
                while let Ok(op) = ops.try_recv() {
                    self.terminal_operation(op).await;
                }
                let msg = rx.borrow_and_update().clone();
                if !self.handle(msg).await {
                    return;
                }
            }
            act = true;
            tokio::select! {
                // A terminal's operation: performed between steps, in order.
                Some(op) = ops.recv() => {
                    self.terminal_operation(op).await;
                    act = false;
                }
                changed = rx.changed() => {
                    // The reconciler is gone without a shutdown (the agent was dropped,
                    // as a `kill -9` would): leave the VM as it is, for the next agent
                    // to adopt.
                    if changed.is_err() {
                        return;
                    }
                }
                // The lease expired or returned: act on the last message again.
                changed = self.lease.changed(), if lease_open => lease_open = changed.is_ok(),
            }
        }
    }

    /// What the lease allows now.
    fn authority(&mut self) -> Authority {
        let lease = *self.lease.borrow_and_update();
        lease::authority(self.redundant, lease, self.confirmed_at)
    }

    /// Whether `a` shows a migration at a state older than this host's own last report
    /// on it.
    fn behind(&self, a: &Assignment) -> bool {
        a.migration
            .as_ref()
            .is_some_and(|m| phase::is_behind(m.id, m.state, self.mig_reported))
    }

    /// Asks the server, now, whether the VM is still assigned here (the lease came back,
    /// or was just gained, and the assignment at hand may predate a takeover). `None`:
    /// no answer; `Some(None)`: no longer assigned here.
    async fn confirm(&mut self) -> Option<Option<Box<Assignment>>> {
        let sent_at = Instant::now();
        let host = self.host.clone();
        let mut lease = self.lease.clone();
        let expired = async move {
            if lease.wait_for(|l| l.is_expired()).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let answer = tokio::select! {
            r = host.client.assignments(&host.cfg.host_name) => r,
            () = expired => return None,
        };
        match answer {
            Ok(list) => {
                let mine = list.into_iter().find(|a| a.vm.id == self.id());
                if mine.is_some() {
                    self.confirmed_at = Some(sent_at);
                }
                tracing::info!(vm = %self.id(), here = mine.is_some(), "asked the server whether the vm is still assigned here");
                Some(mine.map(Box::new))
            }
            Err(e) => {
                tracing::warn!(vm = %self.id(), error = %e, "cannot ask whether the vm is still assigned here");
                None
            }
        }
    }

    /// Acts on one message; `false` when the task is over.
    async fn handle(&mut self, msg: Msg) -> bool {
        let (mut desired, mut assignment, mut stale) = match msg {
            Msg::Shutdown => (Desired::Shutdown, None, false),
            Msg::Unassigned => (Desired::Unassigned, None, false),
            Msg::Awaiting => (Desired::Unknown, None, false),
            Msg::Assigned(a) => {
                self.redundant = Some(a.vm.redundancy.is_some());
                (self.desired(&a), Some(a), false)
            }
        };
        if let Some(a) = &assignment {
            stale = self.behind(a);
            self.observe(a).await;
        }
        for _ in 0..MAX_STEPS_PER_MESSAGE {
            // Read per step: the lease may have expired during the previous one.
            let authority = self.authority();
            let step = phase::next(&self.phase, desired, authority, Instant::now());
            let migration_step = matches!(
                step,
                Step::Migrate | Step::BeginMigration(..) | Step::EndMigration
            );
            if stale && migration_step {
                break;
            }
            match step {
                Step::Idle => break,
                Step::Retry => self.phase = VmPhase::Stopped { note: None },
                Step::BeginMigration(side, id) => {
                    self.phase = match side {
                        Side::Source => VmPhase::MigratingOut(MigLocal::new(id)),
                        Side::Destination => VmPhase::MigratingIn(MigLocal::new(id)),
                    };
                }
                Step::Start => {
                    if let Some(a) = &assignment {
                        self.start(a).await;
                    }
                    break;
                }
                Step::Stop => {
                    self.send(ReportedState::Stopping, None).await;
                    self.halt().await;
                    self.phase = VmPhase::Stopped { note: None };
                    break;
                }
                Step::Migrate => {
                    if let Some(a) = &assignment {
                        self.migration_step(a).await;
                    }
                    break;
                }
                Step::EndMigration => self.end_migration().await,
                Step::Fence => self.fence().await,
                Step::Confirm => {
                    // The server answers again: it learns first that the guest was
                    // paused (refused, and harmless, if the VM has moved meanwhile).
                    if matches!(self.phase, VmPhase::Fenced { .. }) {
                        self.send(ReportedState::Fenced, Some(FENCED_NOTE.to_owned()))
                            .await;
                    }
                    match self.confirm().await {
                        // Decide again on the fresh answer (now with the lease's
                        // authority).
                        Some(Some(a)) => {
                            stale = self.behind(&a);
                            self.redundant = Some(a.vm.redundancy.is_some());
                            desired = self.desired(&a);
                            assignment = Some(a);
                        }
                        Some(None) => desired = Desired::Unassigned,
                        None => break,
                    }
                }
                Step::Resume => self.resume_fenced().await,
                Step::Destroy => {
                    self.halt().await;
                    if let Err(e) = self.files.remove() {
                        tracing::warn!(vm = %self.id(), error = %e, "cannot remove vm files");
                    }
                    // The VM is gone for good: its disk too.
                    self.host.disks.remove_origin(self.id());
                    self.send(ReportedState::Deleted, None).await;
                    tracing::info!(vm = %self.id(), "vm deleted");
                    return false;
                }
                Step::Drop => {
                    self.halt().await;
                    if let Err(e) = self.files.remove() {
                        tracing::warn!(vm = %self.id(), error = %e, "cannot remove orphan vm files");
                    }
                    tracing::info!(vm = %self.id(), "removed a vm no longer assigned to this host");
                    return false;
                }
                Step::Shutdown => {
                    let running = self.phase.guest_here()
                        || self.host.driver.pidfile(self.files.run_dir()).exists();
                    if running {
                        tracing::info!(vm = %self.id(), "stopping vm: agent shutting down");
                        self.halt().await;
                        self.send(ReportedState::Stopped, Some("host agent shut down".into()))
                            .await;
                    }
                    return false;
                }
            }
        }
        if let Some(a) = &assignment {
            self.trace_step(a).await;
            self.report(a).await;
        }
        true
    }

    /// Follows the VM's trace recording (`vinfra vm trace`): records while it is wanted
    /// and the guest runs here; after a stop, uploads the file (again on later passes if
    /// the upload failed) and removes it.
    async fn trace_step(&mut self, a: &Assignment) {
        let id = self.id();
        let here = a.vm.host.as_str() == self.host.cfg.host_name;
        let want = here && a.vm.trace.as_ref().is_some_and(|t| t.recording);
        let disks = &self.host.disks;
        if want && !disks.tracing(id) && matches!(self.phase, VmPhase::Running) {
            let file = self.files.trace_file();
            match disks.start_trace(id, &file, &self.host.cfg.host_name) {
                Ok(()) => tracing::info!(vm = %id, file = %file.display(), "trace recording"),
                Err(e) => tracing::warn!(vm = %id, error = %e, "cannot start the trace"),
            }
            return;
        }
        if !want && disks.tracing(id) {
            match disks.stop_trace(id) {
                Ok(Some((_, n))) => tracing::info!(vm = %id, requests = n, "trace stopped"),
                Ok(None) => {}
                Err(e) => tracing::warn!(vm = %id, error = %e, "cannot finish the trace file"),
            }
        }
        let awaited = here
            && a.vm
                .trace
                .as_ref()
                .is_some_and(|t| !t.recording && t.blob.is_none());
        let file = self.files.trace_file();
        if awaited && !disks.tracing(id) && file.exists() {
            let up = self
                .host
                .client
                .upload_trace(id, &self.host.cfg.host_name, &file)
                .await;
            match up {
                Ok(()) => {
                    tracing::info!(vm = %id, "trace uploaded");
                    if let Err(e) = std::fs::remove_file(&file) {
                        tracing::warn!(vm = %id, error = %e, "cannot remove the uploaded trace file");
                    }
                }
                Err(e) => {
                    tracing::warn!(vm = %id, error = %model::error_chain(&e), "trace upload failed; retried on the next pass")
                }
            }
        }
    }

    /// What the server wants of this host, from the VM's assignment.
    fn desired(&self, a: &Assignment) -> Desired {
        if let Some(m) = &a.migration {
            if let Some(side) = phase::side(m, &self.host.cfg.host_name) {
                return Desired::Migration { id: m.id, side };
            }
        }
        Desired::Plain(a.vm.desired)
    }

    /// Notices what changed under the task: a hypervisor that exited on its own (guest
    /// poweroff, crash), and the disk of an adopted VM that nobody serves yet.
    async fn observe(&mut self, a: &Assignment) {
        if matches!(self.phase, VmPhase::Running | VmPhase::Fenced { .. }) {
            if let Ok(st) = self.host.driver.status(&self.files.driver_id()).await {
                if st.is_exited() {
                    tracing::info!(vm = %self.id(), status = ?st, "vm exited");
                    self.phase = VmPhase::Stopped {
                        note: Some(format!("{st:?}")),
                    };
                }
            }
        }
        // An adopted VM: its hypervisor kept running through the agent's restart, but
        // the disk server (and the caches) restarted with the agent.
        if matches!(self.phase, VmPhase::Running)
            && self.disk.cache.is_none()
            && a.vm.host.as_str() == self.host.cfg.host_name
        {
            let h = &self.host;
            match local::reattach(&h.disks, &h.images, &self.files, a, &mut self.disk).await {
                Ok(()) => {
                    tracing::info!(vm = %self.id(), "disk of an adopted vm served again");
                    let (dir, name) = (self.files.run_dir(), a.vm.name.as_str());
                    if let Err(e) = h.plumbing().count(dir, name, &a.vm.nics).await {
                        tracing::warn!(vm = %self.id(), error = %model::error_chain(&e), "cannot count the traffic of an adopted vm");
                    }
                }
                Err(e) => {
                    tracing::warn!(vm = %self.id(), error = %model::error_chain(&e), "cannot serve the disk of an adopted vm")
                }
            }
        }
    }

    async fn start(&mut self, a: &Assignment) {
        self.phase = VmPhase::Starting;
        self.send(ReportedState::Starting, None).await;
        let h = self.host.clone();
        // Windows of an earlier start whose QEMU is gone.
        crate::tables::detach_vm(&h.tables, std::mem::take(&mut self.windows)).await;
        let tables = &a.vm.resource_tables;
        let prepared = if tables.is_empty() {
            Ok(())
        } else {
            self.files.create()
        };
        let result = match prepared {
            Err(err) => Err(local::StartError::Files {
                path: self.files.run_dir().to_owned(),
                err,
            }),
            Ok(()) => crate::tables::attach_vm(
                &h.tables,
                a.vm.tenant,
                a.vm.name.as_str(),
                tables,
                self.files.run_dir(),
            )
            .await
            .map_err(local::StartError::from),
        };
        let result = match result {
            Err(e) => Err(e),
            Ok(windows) => {
                let attach = windows.iter().map(|w| w.attach.clone()).collect();
                self.windows = windows;
                local::start(
                    h.driver.as_ref(),
                    &h.disks,
                    &h.images,
                    &self.files,
                    a,
                    h.cfg.accel,
                    h.plumbing(),
                    attach,
                    &mut self.disk,
                )
                .await
            }
        };
        match result {
            Ok(()) => {
                tracing::info!(vm = %self.id(), name = %a.vm.name, "vm started");
                self.phase = VmPhase::Running;
            }
            Err(e) => {
                let reason = model::error_chain(&e);
                tracing::error!(vm = %self.id(), error = %reason, "vm failed to start");
                crate::tables::detach_vm(&h.tables, std::mem::take(&mut self.windows)).await;
                self.phase = VmPhase::Failed {
                    desired: a.vm.desired,
                    reason,
                    since: Instant::now(),
                };
            }
        }
    }

    /// Stops the hypervisor and the exports, closes the cache; cancels a rebuild.
    async fn halt(&mut self) {
        if let Some(r) = self.phase.mig_mut().and_then(|x| x.rebuild.take()) {
            r.cancel();
        }
        let running = self.phase.guest_here();
        let h = self.host.clone();
        local::stop(
            h.driver.as_ref(),
            &h.disks,
            &self.files,
            running,
            &mut self.disk,
        )
        .await;
        // QEMU is gone: the element saw its window close; a window it never
        // connected to is closed here.
        crate::tables::detach_vm(&h.tables, std::mem::take(&mut self.windows)).await;
    }

    /// Pauses the guest because the host lease expired: its standby may be started any
    /// moment. A migration under way here is given up (its rebuild cancelled). If the
    /// pause fails the hypervisor is stopped: a guest lost here beats two writers on one
    /// storage pair.
    async fn fence(&mut self) {
        if let Some(r) = self.phase.mig_mut().and_then(|x| x.rebuild.take()) {
            r.cancel();
        }
        match self.host.driver.pause(&self.files.driver_id()).await {
            Ok(()) => {
                tracing::warn!(vm = %self.id(), "host lease expired: guest paused (fenced)");
                self.phase = VmPhase::Fenced {
                    since: Instant::now(),
                };
            }
            Err(e) => {
                tracing::error!(vm = %self.id(), error = %model::error_chain(&e),
                    "host lease expired and the guest cannot be paused: stopping it");
                self.halt().await;
                self.phase = VmPhase::Stopped {
                    note: Some("stopped by its agent: the host lease expired and the guest could not be paused".into()),
                };
            }
        }
    }

    /// Resumes a fenced guest: the lease is back and a fresh assignment keeps the VM
    /// here (the cut was shorter than the takeover). If it cannot be resumed, it is
    /// stopped, and the next pass starts it again.
    async fn resume_fenced(&mut self) {
        let VmPhase::Fenced { since } = self.phase else {
            return;
        };
        match self.host.driver.resume(&self.files.driver_id()).await {
            Ok(()) => {
                tracing::info!(vm = %self.id(), paused_ms = since.elapsed().as_millis(),
                    "host lease renewed and the vm still assigned here: guest resumed");
                self.phase = VmPhase::Running;
            }
            Err(e) => {
                tracing::error!(vm = %self.id(), error = %model::error_chain(&e),
                    "cannot resume the fenced guest: stopping it");
                self.halt().await;
                self.phase = VmPhase::Stopped {
                    note: Some("could not be resumed after fencing".into()),
                };
            }
        }
    }

    /// The migration this host took part in is over: a destination that switched over
    /// now runs the VM; a source whose guest never left (the migration failed) runs it
    /// again, resuming it if a full copy had paused it.
    async fn end_migration(&mut self) {
        let phase = std::mem::replace(&mut self.phase, VmPhase::Stopped { note: None });
        let here = phase.guest_here();
        let (VmPhase::MigratingOut(x) | VmPhase::MigratingIn(x)) = phase else {
            self.phase = phase;
            return;
        };
        if let Some(r) = x.rebuild {
            r.cancel();
        }
        if x.paused_at.is_some() && !x.migrated_away {
            match self.host.driver.resume(&self.files.driver_id()).await {
                Ok(()) => tracing::info!(vm = %self.id(), "migration ended here: guest resumed"),
                Err(e) => tracing::error!(vm = %self.id(), error = %e, "cannot resume the guest"),
            }
        }
        self.phase = if here {
            VmPhase::Running
        } else {
            VmPhase::Stopped { note: None }
        };
    }

    /// Reports the VM's state with its console tail, when this host runs it (the
    /// destination before switch-over and the source after it say nothing).
    async fn report(&mut self, a: &Assignment) {
        if a.vm.host.as_str() != self.host.cfg.host_name || a.vm.desired == DesiredState::Deleted {
            return;
        }
        let (state, error) = match &self.phase {
            VmPhase::Failed { reason, .. } => (ReportedState::Failed, Some(reason.clone())),
            VmPhase::Starting => (ReportedState::Starting, None),
            VmPhase::Stopped { note } => (ReportedState::Stopped, note.clone()),
            VmPhase::Running => (ReportedState::Running, None),
            VmPhase::Fenced { .. } => (ReportedState::Fenced, Some(FENCED_NOTE.to_owned())),
            p @ (VmPhase::MigratingOut(_) | VmPhase::MigratingIn(_)) => {
                if !p.guest_here() {
                    return;
                }
                (ReportedState::Running, None)
            }
        };
        self.send(state, error).await;
    }

    pub(crate) async fn send(&mut self, state: ReportedState, error: Option<String>) {
        let report = ObservedReport {
            host: self.host.cfg.host_name.clone(),
            state,
            error,
            console_tail: self.files.console_tail(16 * 1024),
            cpu_time_ms: self
                .host
                .driver
                .cpu_time(&self.files.driver_id())
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        // Skip identical reports: the console tail changes while a guest runs, so a
        // running VM is still reported every pass, an idle one is not.
        if self.last_report.as_ref() == Some(&report) {
            return;
        }
        // With the lease expired the server is out of reach (that is how it expired):
        // skip, and give up a report under way when it expires, so that no request
        // hanging on a dead connection keeps this task from pausing its guest.
        let mut lease = self.lease.clone();
        if lease.borrow().is_expired() {
            return;
        }
        let expired = async move {
            if lease.wait_for(|l| l.is_expired()).await.is_err() {
                // The watchdog ended (the agent stops): the lease no longer changes.
                std::future::pending::<()>().await;
            }
        };
        let sent = tokio::select! {
            r = self.host.client.report_observed(self.id(), &report) => Some(r),
            () = expired => None,
        };
        match sent {
            Some(Ok(_)) => self.last_report = Some(report),
            Some(Err(e)) => {
                tracing::warn!(vm = %self.id(), error = %e, "cannot report observed state");
                // A refusal (4xx) stands: the same report would be refused again. One
                // that did not reach the server (cut, timeout, 5xx) goes out again.
                if e.status().is_some_and(|s| (400..500).contains(&s)) {
                    self.last_report = Some(report);
                }
            }
            None => {
                tracing::debug!(vm = %self.id(), "report given up: the host lease expired")
            }
        }
    }
}
