//! The operation driver: the one owner of the control plane's background work.
//!
//! Long work is a record in the store (a drain session, a migration, a redundant VM's
//! placement, an NS instance); the driver's loops read those records and move each one
//! step along, so that whatever this process knew in memory, the next process (after a
//! restart) knows from the store. Work started by a request that must run to its end
//! (an NS instantiate, scale or terminate) runs as a [`Tasks`] job, which the driver owns
//! too: it is counted, named, and stopped with the driver, never detached.
//!
//! The loops: the drain driver (every `drain_period`, one step per active session), the
//! takeover watcher (every `takeover_period`; it alone owns the [`LeaseWatch`] that times
//! each host's heartbeats, so a newly elected leader starts timing afresh).
//!
//! Several servers may share one store: each runs a driver, and the drivers elect one of
//! them through the store ([`store::Store::campaign`], an etcd lease; trivially the one
//! process with redb). Only the leader runs the loops. When it dies, its lease expires
//! and another driver is elected within the lease time and goes on from the records.
//! A driver that loses its leadership (cut off from etcd) stops its loops at once.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::{Control, LeaseWatch};

/// The election every driver of a store campaigns in.
pub const ELECTION: &str = "operation-driver";

/// How often each loop runs, and who this driver is in the election.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Between two steps of every active drain (default 300 ms).
    pub drain_period: Duration,
    /// Between two takeover passes (default 1 s).
    pub takeover_period: Duration,
    /// How long beyond a primary's lease (the heartbeat timeout) a takeover waits, so
    /// that the cut-off primary has certainly paused its guest; `None`:
    /// [`crate::default_takeover_margin`] of the heartbeat timeout.
    pub takeover_margin: Option<Duration>,
    /// This driver's name in the election (default: a random id; servers pass theirs).
    pub identity: String,
    /// The leader's lease: a dead leader is replaced within about this time (default
    /// 4 s; etcd counts whole seconds).
    pub lease: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            drain_period: Duration::from_millis(300),
            takeover_period: Duration::from_secs(1),
            takeover_margin: None,
            identity: format!("driver-{}", model::VmId::new_random()),
            lease: Duration::from_secs(4),
        }
    }
}

/// Jobs started by requests: each runs to its end or until [`Tasks::shutdown`], and
/// which ones run is known (`running`). Cheap to clone.
#[derive(Clone, Default)]
pub struct Tasks {
    inner: Arc<Mutex<TasksInner>>,
}

#[derive(Default)]
struct TasksInner {
    set: JoinSet<()>,
    /// Task id → what it is doing, while it runs.
    running: BTreeMap<tokio::task::Id, String>,
    closed: bool,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks")
            .field("running", &self.running())
            .finish()
    }
}

impl Tasks {
    fn lock(&self) -> std::sync::MutexGuard<'_, TasksInner> {
        // Every update under this lock is a single insert or remove: a panic elsewhere
        // cannot leave it half-done, so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `job`, named `what` while it runs. After shutdown, refused (returns false):
    /// the record it would have moved stays as it is for the next server.
    pub fn spawn(
        &self,
        what: impl Into<String>,
        job: impl Future<Output = ()> + Send + 'static,
    ) -> bool {
        let what = what.into();
        let mut inner = self.lock();
        if inner.closed {
            tracing::warn!(job = %what, "not started: the driver is shutting down");
            return false;
        }
        // Reap the finished ones so the set does not grow with the server's age.
        while let Some(done) = inner.set.try_join_next_with_id() {
            let id = match done {
                Ok((id, ())) => id,
                Err(e) => {
                    if e.is_panic() {
                        tracing::error!(error = %e, "a control job panicked");
                    }
                    e.id()
                }
            };
            inner.running.remove(&id);
        }
        let handle = inner.set.spawn(job);
        inner.running.insert(handle.id(), what);
        true
    }

    /// What runs now.
    pub fn running(&self) -> Vec<String> {
        let mut inner = self.lock();
        while let Some(done) = inner.set.try_join_next_with_id() {
            let id = match done {
                Ok((id, ())) => id,
                Err(e) => e.id(),
            };
            inner.running.remove(&id);
        }
        inner.running.values().cloned().collect()
    }

    /// Refuses new jobs and stops the running ones (their records stay as last
    /// written; the next server takes them from there).
    pub async fn shutdown(&self) {
        let mut set = {
            let mut inner = self.lock();
            inner.closed = true;
            inner.running.clear();
            std::mem::take(&mut inner.set)
        };
        set.shutdown().await;
    }
}

/// The running driver.
#[derive(Debug)]
pub struct Driver {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    jobs: Tasks,
    leading: watch::Receiver<bool>,
}

impl Driver {
    /// Starts the driver over `control`: it campaigns, and runs the loops while it
    /// leads. It owns `jobs` from now on (stops them with itself).
    pub fn start(control: Control, config: DriverConfig, jobs: Tasks) -> Self {
        let (stop, stopped) = watch::channel(false);
        let (leading_tx, leading) = watch::channel(false);
        let task = tokio::spawn(lead(control, config, stopped, leading_tx));
        Self {
            stop,
            task,
            jobs,
            leading,
        }
    }

    /// Where request-started jobs run.
    pub fn jobs(&self) -> &Tasks {
        &self.jobs
    }

    /// Whether this driver leads now (runs the loops).
    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Whether this driver leads, as a watch (for work that only the leader does
    /// but that lives outside the driver, like the slice sampler).
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Waits until this driver leads.
    pub async fn until_leading(&self) {
        let mut l = self.leading.clone();
        let _ = l.wait_for(|x| *x).await;
    }

    /// Stops the loops (each finishes the step it is in), resigns, and stops the jobs.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.jobs.shutdown().await;
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the operation driver panicked");
        }
    }
}

/// Campaign, lead until the leadership is lost or `stop`, campaign again.
async fn lead(
    control: Control,
    config: DriverConfig,
    mut stop: watch::Receiver<bool>,
    leading: watch::Sender<bool>,
) {
    loop {
        let campaign = control
            .store()
            .campaign(ELECTION, &config.identity, config.lease);
        let leadership = tokio::select! {
            l = campaign => l,
            _ = stop.wait_for(|s| *s) => return,
        };
        let leadership = match leadership {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %model::error_chain(&e), "operation driver cannot campaign; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        tracing::info!(identity = %config.identity, term = leadership.revision().0, "operation driver leads");
        let _ = leading.send(true);
        let (loops_stop, loops_stopped) = watch::channel(false);
        let loops = run_loops(&control, &config, loops_stopped);
        let lost = leadership.lost();
        let stopping = tokio::select! {
            _ = lost => {
                tracing::warn!(identity = %config.identity, "operation driver lost its leadership; its loops stop");
                false
            }
            _ = stop.wait_for(|s| *s) => true,
        };
        let _ = loops_stop.send(true);
        let _ = leading.send(false);
        let mut loops = loops;
        while loops.join_next().await.is_some() {}
        if stopping {
            if let Err(e) = leadership.resign().await {
                tracing::warn!(error = %model::error_chain(&e), "resigning the leadership");
            }
            return;
        }
    }
}

/// The leader's loops, until `stopped` turns true.
fn run_loops(
    control: &Control,
    config: &DriverConfig,
    stopped: watch::Receiver<bool>,
) -> JoinSet<()> {
    let mut loops = JoinSet::new();
    let c = control.clone();
    loops.spawn(every(config.drain_period, stopped.clone(), move || {
        let c = c.clone();
        async move {
            match c.active_drains().await {
                Ok(sessions) => {
                    for m in sessions {
                        if let Err(e) = c.drain_step(m).await {
                            tracing::warn!(error = %model::error_chain(&e), "maintenance step failed; retrying");
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %model::error_chain(&e), "drain driver cannot list sessions")
                }
            }
        }
    }));
    let margin = config.takeover_margin.unwrap_or_else(|| {
        crate::default_takeover_margin(Duration::from_millis(control.heartbeat_timeout_ms()))
    });
    loops.spawn(takeover_watcher(
        control.clone(),
        config.takeover_period,
        margin,
        stopped,
    ));
    loops
}

/// The takeover watcher: a pass every `period` until `stop`, with its own [`LeaseWatch`]
/// (which lives as long as this leadership: a new leader has seen no heartbeat yet).
async fn takeover_watcher(
    control: Control,
    period: Duration,
    margin: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut leases = LeaseWatch::default();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = control.takeover_pass(&mut leases, margin).await {
            tracing::warn!(error = %model::error_chain(&e), "takeover pass failed");
        }
    }
}

/// Runs `step` every `period` until `stop` turns true; a step in progress finishes.
async fn every<F, Fut>(period: Duration, mut stop: watch::Receiver<bool>, mut step: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        step().await;
    }
}
