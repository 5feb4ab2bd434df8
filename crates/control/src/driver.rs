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
//! takeover watcher (every `takeover_period`).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::Control;

/// How often each loop runs.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Between two steps of every active drain (default 300 ms).
    pub drain_period: Duration,
    /// Between two takeover passes (default 1 s).
    pub takeover_period: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            drain_period: Duration::from_millis(300),
            takeover_period: Duration::from_secs(1),
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
    loops: JoinSet<()>,
    jobs: Tasks,
}

impl Driver {
    /// Starts the driver's loops over `control`; it owns `jobs` from now on (stops them
    /// with itself).
    pub fn start(control: Control, config: DriverConfig, jobs: Tasks) -> Self {
        let (stop, stopped) = watch::channel(false);
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
        let c = control;
        loops.spawn(every(config.takeover_period, stopped, move || {
            let c = c.clone();
            async move {
                if let Err(e) = c.takeover_pass().await {
                    tracing::warn!(error = %model::error_chain(&e), "takeover pass failed");
                }
            }
        }));
        Self { stop, loops, jobs }
    }

    /// Where request-started jobs run.
    pub fn jobs(&self) -> &Tasks {
        &self.jobs
    }

    /// Stops the loops (each finishes the step it is in) and the jobs.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        self.jobs.shutdown().await;
        while self.loops.join_next().await.is_some() {}
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
