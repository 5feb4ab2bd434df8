//! The push channel's server end: each change of a host's desired state, sent to that
//! host's agent as it happens (`GET /v1/hosts/{name}/events`). Polling the assignments
//! stays the source of truth; this only tells the agent sooner.
//!
//! Every server runs one hub (agents connect to any server of a cluster, not only to the
//! leader). The hub owns one store watch over [`keys::ROOT`] and a mirror of the VM and
//! migration records, so that a change can be mapped to the hosts it concerns before and
//! after it (a delete carries only its key: the mirror knows which host the VM was on).
//! For each change it builds the VM's assignment on each of those hosts with the
//! functions the assignments list uses (`vms::assigned_hosts`, `vms::assignment_for`),
//! and sends it, or `unassigned`, over a `broadcast` channel per host to that host's
//! streams.
//!
//! A stream starts with `resync` (what changed before it is not sent: the agent reads the
//! assignments). It gets `resync` again when it falls more than [`HOST_BUFFER`] events
//! behind, or when the hub's watch broke (the store failed over) and was made again, and
//! `ping` after [`DEFAULT_KEEPALIVE`] of silence.
//!
//! Tasks: the hub, one task, started by the first subscription. It stops on
//! [`Control::close_push`] (the server's shutdown: every stream then ends, so that the
//! server's graceful shutdown is not held by them) or when every `Control` is gone.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};
use model::api::HostEvent;
use model::{Image, ImageId, Migration, MigrationId, Name, Vm, VmId};
use store::{Revision, Store, WatchEvent, WatchStream};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::records::{keys, list_json};
use crate::vms::{assigned_hosts, assignment_for, image_of};
use crate::{Control, ControlError};

/// A quiet stream gets a `ping` after this long.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10);

/// How many events a stream may fall behind before it gets `resync` instead of them.
pub const HOST_BUFFER: usize = 1024;

/// Subscriptions waiting for the hub; more at once are refused (`Busy`), not queued.
const COMMANDS: usize = 256;

/// Between two attempts to watch the store again, doubling.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Why a host's event stream cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The server is shutting down: its streams are closing.
    #[error("this server is shutting down; connect to another one")]
    ShuttingDown,
    /// Too many streams are being opened at this moment.
    #[error("too many event streams are being opened at once")]
    Busy,
    /// No such host, or the store failed.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// The events of one host, as they happen; ends when the server shuts down.
pub type HostEvents = Pin<Box<dyn Stream<Item = Arc<HostEvent>> + Send>>;

/// The handle every `Control` clone shares.
#[derive(Clone)]
pub(crate) struct Push {
    inner: Arc<Shared>,
}

struct Shared {
    keepalive: Duration,
    /// The hub's command queue, once the hub runs.
    hub: OnceLock<mpsc::Sender<Cmd>>,
    /// Set when the server shuts down.
    closed: watch::Sender<bool>,
}

impl Push {
    pub(crate) fn new(keepalive: Duration) -> Self {
        Self {
            inner: Arc::new(Shared {
                keepalive,
                hub: OnceLock::new(),
                closed: watch::channel(false).0,
            }),
        }
    }

    /// The hub's queue; the first call starts the hub.
    fn hub(&self, store: &Arc<dyn Store>) -> &mpsc::Sender<Cmd> {
        self.inner.hub.get_or_init(|| {
            let (tx, rx) = mpsc::channel(COMMANDS);
            let hub = Hub {
                store: store.clone(),
                hosts: HashMap::new(),
                vms: HashMap::new(),
                migrations: HashMap::new(),
                images: HashMap::new(),
            };
            tokio::spawn(run(hub, rx, self.inner.closed.subscribe()));
            tx
        })
    }
}

impl std::fmt::Debug for Push {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Push")
            .field("keepalive", &self.inner.keepalive)
            .field("running", &self.inner.hub.get().is_some())
            .finish()
    }
}

enum Cmd {
    Subscribe {
        host: Name,
        reply: oneshot::Sender<broadcast::Receiver<Arc<HostEvent>>>,
    },
}

impl Control {
    /// Sends a `ping` on a stream that has been quiet for `keepalive` (default
    /// [`DEFAULT_KEEPALIVE`]). Call before any stream is opened.
    #[must_use]
    pub fn with_push_keepalive(mut self, keepalive: Duration) -> Self {
        self.push = Push::new(keepalive);
        self
    }

    /// The events of `host` from now on: `resync` first, then each change of what the
    /// host must run (see the module docs). The host must be registered.
    pub async fn host_events(&self, host: &Name) -> Result<HostEvents, PushError> {
        if *self.push.inner.closed.borrow() {
            return Err(PushError::ShuttingDown);
        }
        self.require_host(host).await?;
        let (reply, subscribed) = oneshot::channel();
        self.push
            .hub(&self.store_arc())
            .try_send(Cmd::Subscribe {
                host: host.clone(),
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => PushError::Busy,
                mpsc::error::TrySendError::Closed(_) => PushError::ShuttingDown,
            })?;
        let rx = subscribed.await.map_err(|_| PushError::ShuttingDown)?;
        Ok(stream(host.clone(), rx, self.push.inner.keepalive))
    }

    /// Ends every host event stream and refuses new ones: the server is shutting down
    /// (an open stream would hold its graceful shutdown forever).
    pub fn close_push(&self) {
        self.push.inner.closed.send_replace(true);
    }
}

/// One subscriber's stream: `resync`, then what the hub sends; `ping` when quiet.
fn stream(host: Name, rx: broadcast::Receiver<Arc<HostEvent>>, keepalive: Duration) -> HostEvents {
    struct State {
        host: Name,
        rx: broadcast::Receiver<Arc<HostEvent>>,
        quiet: Pin<Box<tokio::time::Sleep>>,
        started: bool,
    }
    let state = State {
        host,
        rx,
        quiet: Box::pin(tokio::time::sleep(keepalive)),
        started: false,
    };
    Box::pin(futures_util::stream::unfold(
        state,
        move |mut st| async move {
            if !st.started {
                st.started = true;
                return Some((Arc::new(HostEvent::Resync), st));
            }
            let ev = tokio::select! {
                r = st.rx.recv() => match r {
                    Ok(ev) => ev,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(host = %st.host, missed, "push: a host's event stream fell behind; resync");
                        Arc::new(HostEvent::Resync)
                    }
                    // The hub stopped (the server is shutting down).
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                () = st.quiet.as_mut() => Arc::new(HostEvent::Ping),
            };
            st.quiet
                .as_mut()
                .reset(tokio::time::Instant::now() + keepalive);
            Some((ev, st))
        },
    ))
}

/// The hub: the one owner of the watch, the mirror and the per-host channels.
struct Hub {
    store: Arc<dyn Store>,
    /// The streams of each host (a host without any is dropped at its next event).
    hosts: HashMap<Name, broadcast::Sender<Arc<HostEvent>>>,
    /// Every VM record, with the revision it was read or seen at.
    vms: HashMap<VmId, (Vm, Revision)>,
    /// Every migration record.
    migrations: HashMap<MigrationId, (Migration, Revision)>,
    /// Images by id: an image record never changes, and is not deleted while a VM uses it.
    images: HashMap<ImageId, Image>,
}

/// Watch, mirror, fan out; on a broken watch, resync every stream and watch again.
async fn run(mut hub: Hub, mut cmds: mpsc::Receiver<Cmd>, mut closed: watch::Receiver<bool>) {
    let mut retry = RETRY_MIN;
    loop {
        if *closed.borrow() {
            return;
        }
        let mut changes = match hub.start().await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %model::error_chain(&e), retry_ms = retry.as_millis(), "push: cannot watch the store; retrying");
                let wait = tokio::time::sleep(retry);
                tokio::pin!(wait);
                retry = (retry * 2).min(RETRY_MAX);
                loop {
                    tokio::select! {
                        () = &mut wait => break,
                        c = cmds.recv() => match c {
                            Some(c) => hub.command(c),
                            None => return,
                        },
                        _ = closed.changed() => return,
                    }
                }
                continue;
            }
        };
        // Streams opened while there was no watch missed what changed meanwhile.
        hub.resync_all();
        loop {
            tokio::select! {
                _ = closed.changed() => return,
                c = cmds.recv() => match c {
                    Some(c) => hub.command(c),
                    None => return,
                },
                ev = changes.next() => {
                    let mut batch = Vec::new();
                    let mut broken = match ev {
                        Some(Ok(ev)) => {
                            batch.push(ev);
                            None
                        }
                        Some(Err(e)) => Some(model::error_chain(&e)),
                        None => Some("the watch ended".to_owned()),
                    };
                    // The rest of the transaction (and whatever else is ready) too, so
                    // that a change is announced once, from the state after all of it,
                    // never from a transaction half applied.
                    while broken.is_none() {
                        match changes.next().now_or_never() {
                            Some(Some(Ok(ev))) => batch.push(ev),
                            Some(Some(Err(e))) => broken = Some(model::error_chain(&e)),
                            Some(None) => broken = Some("the watch ended".to_owned()),
                            None => break,
                        }
                    }
                    if !batch.is_empty() {
                        retry = RETRY_MIN;
                        hub.apply(batch).await;
                    }
                    if let Some(why) = broken {
                        // Changes may be lost between this watch and the next one.
                        tracing::warn!(error = %why, "push: the store watch broke; resync every stream and watch again");
                        hub.resync_all();
                        break;
                    }
                }
            }
        }
        // A watch that breaks at once must not spin.
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            _ = closed.changed() => return,
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// What one batch of changes did to one VM.
struct Touched {
    /// The hosts it was assigned to before.
    before: BTreeSet<Name>,
    /// Whether anything an agent acts on changed (not only the observed state, which
    /// the agents report themselves).
    relevant: bool,
}

impl Hub {
    /// Watches, then reads every VM and migration: a write after the reads is in the
    /// watch, and one between the watch and the reads is skipped by its revision.
    async fn start(&mut self) -> Result<WatchStream, ControlError> {
        let changes = self.store.watch(keys::ROOT).await?;
        self.vms = list_json::<Vm>(self.store.as_ref(), keys::VMS)
            .await?
            .into_iter()
            .map(|(vm, rev)| (vm.id, (vm, rev)))
            .collect();
        self.migrations = list_json::<Migration>(self.store.as_ref(), keys::MIGRATIONS)
            .await?
            .into_iter()
            .map(|(m, rev)| (m.id, (m, rev)))
            .collect();
        self.images.clear();
        Ok(changes)
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Subscribe { host, reply } => {
                self.hosts.retain(|_, tx| tx.receiver_count() > 0);
                let tx = self
                    .hosts
                    .entry(host)
                    .or_insert_with(|| broadcast::channel(HOST_BUFFER).0);
                // The subscriber may have gone already; then nothing is lost.
                let _ = reply.send(tx.subscribe());
            }
        }
    }

    fn send(&mut self, host: &Name, ev: &Arc<HostEvent>) {
        if let Some(tx) = self.hosts.get(host) {
            if tx.send(ev.clone()).is_err() {
                // Nobody listens to this host any more.
                self.hosts.remove(host);
            }
        }
    }

    fn resync_all(&mut self) {
        let ev = Arc::new(HostEvent::Resync);
        self.hosts.retain(|_, tx| tx.send(ev.clone()).is_ok());
    }

    /// The hosts `vm` is assigned to now (none once it is gone).
    fn hosts_of(&self, vm: VmId) -> BTreeSet<Name> {
        self.vms.get(&vm).map_or_else(BTreeSet::new, |(vm, _)| {
            assigned_hosts(vm, self.migration_of(vm))
        })
    }

    fn migration_of(&self, vm: &Vm) -> Option<&Migration> {
        vm.migration
            .and_then(|m| self.migrations.get(&m))
            .map(|(m, _)| m)
    }

    /// Applies a batch of store changes to the mirror, then announces each VM it
    /// touched to the hosts concerned.
    async fn apply(&mut self, batch: Vec<WatchEvent>) {
        let mut touched: HashMap<VmId, Touched> = HashMap::new();
        let mut touch = |hub: &Hub, vm: VmId, relevant: bool| {
            touched
                .entry(vm)
                .or_insert_with(|| Touched {
                    before: hub.hosts_of(vm),
                    relevant: false,
                })
                .relevant |= relevant;
        };
        for ev in batch {
            match ev {
                WatchEvent::Put(kv) if kv.key.starts_with(keys::VMS) => {
                    let vm: Vm = match crate::records::decode(&kv) {
                        Ok(vm) => vm,
                        Err(e) => {
                            self.undecodable(&e);
                            continue;
                        }
                    };
                    let old = self.vms.get(&vm.id);
                    if old.is_some_and(|(_, rev)| *rev >= kv.mod_revision) {
                        continue;
                    }
                    let relevant = old.is_none_or(|(old, _)| !only_observed_changed(old, &vm));
                    touch(self, vm.id, relevant);
                    self.vms.insert(vm.id, (vm, kv.mod_revision));
                }
                WatchEvent::Delete { key, revision } if key.starts_with(keys::VMS) => {
                    let Ok(id) = key[keys::VMS.len()..].parse::<VmId>() else {
                        continue;
                    };
                    if self.vms.get(&id).is_some_and(|(_, rev)| *rev < revision) {
                        touch(self, id, true);
                        self.vms.remove(&id);
                    }
                }
                WatchEvent::Put(kv) if kv.key.starts_with(keys::MIGRATIONS) => {
                    let m: Migration = match crate::records::decode(&kv) {
                        Ok(m) => m,
                        Err(e) => {
                            self.undecodable(&e);
                            continue;
                        }
                    };
                    if self
                        .migrations
                        .get(&m.id)
                        .is_some_and(|(_, rev)| *rev >= kv.mod_revision)
                    {
                        continue;
                    }
                    touch(self, m.vm, true);
                    self.migrations.insert(m.id, (m, kv.mod_revision));
                }
                WatchEvent::Delete { key, revision } if key.starts_with(keys::MIGRATIONS) => {
                    let Ok(id) = key[keys::MIGRATIONS.len()..].parse::<MigrationId>() else {
                        continue;
                    };
                    if let Some((m, rev)) = self.migrations.get(&id) {
                        if *rev < revision {
                            touch(self, m.vm, true);
                            self.migrations.remove(&id);
                        }
                    }
                }
                WatchEvent::Put(kv) if kv.key.starts_with(crate::terminals::TERMINAL_OPS) => {
                    self.terminal_operation(&kv);
                }
                // A table spec is written at create and deleted at delete, never
                // changed: either way its host re-lists its tables.
                WatchEvent::Put(store::KeyValue { key, .. }) | WatchEvent::Delete { key, .. }
                    if key.starts_with(keys::RESOURCE_TABLES) =>
                {
                    let host = key[keys::RESOURCE_TABLES.len()..]
                        .split('/')
                        .next()
                        .and_then(|h| model::validate_name("host", h).ok());
                    if let Some(host) = host {
                        self.send(&host, &Arc::new(HostEvent::ResourceTables));
                    }
                }
                _ => {}
            }
        }
        for (vm, t) in touched {
            if t.relevant {
                self.announce(vm, &t.before).await;
            }
        }
    }

    /// A terminal's operation not yet performed goes to its host's stream (`power on`
    /// is the server's own: it sets the desired state, no host acts on it).
    fn terminal_operation(&mut self, kv: &store::KeyValue) {
        use model::terminal_ops::{Operation, PowerAction};
        use model::terminals::{OperationOutcome, PerformedOperation};
        let op: PerformedOperation = match crate::records::decode(kv) {
            Ok(op) => op,
            Err(e) => {
                tracing::warn!(error = %model::error_chain(&e), "push: a terminal operation record cannot be decoded");
                return;
            }
        };
        if op.outcome != OperationOutcome::Sent
            || matches!(
                op.op,
                Operation::Power {
                    action: PowerAction::On
                }
            )
        {
            return;
        }
        let host = op.host.clone();
        let ev = Arc::new(HostEvent::TerminalOperation {
            operation: Box::new(op),
        });
        self.send(&host, &ev);
    }

    /// A record the hub cannot read: what it meant is unknown, so every stream is told
    /// to read the assignments (which report the same record as an error).
    fn undecodable(&mut self, e: &ControlError) {
        tracing::error!(error = %model::error_chain(e), "push: a changed record cannot be decoded; resync every stream");
        self.resync_all();
    }

    /// Tells each host `vm` was assigned to (`before`) or is now what it is to them.
    async fn announce(&mut self, vm_id: VmId, before: &BTreeSet<Name>) {
        let after = self.hosts_of(vm_id);
        let gone = Arc::new(HostEvent::Unassigned { vm: vm_id });
        for host in before.difference(&after) {
            self.send(host, &gone);
        }
        // Only hosts somebody listens to are worth building an assignment for.
        let listening: Vec<Name> = after
            .into_iter()
            .filter(|h| self.hosts.contains_key(h))
            .collect();
        let Some((vm, _)) = self.vms.get(&vm_id) else {
            return;
        };
        if listening.is_empty() {
            return;
        }
        let vm = vm.clone();
        let migration = self.migration_of(&vm).cloned();
        let image = match self.image(&vm).await {
            Ok(i) => i,
            Err(e) => {
                // The assignments list fails the same way; the agent hears it there.
                tracing::error!(vm = %vm.id, error = %model::error_chain(&e), "push: cannot build an assignment; resync");
                let resync = Arc::new(HostEvent::Resync);
                for host in &listening {
                    self.send(host, &resync);
                }
                return;
            }
        };
        for host in &listening {
            if let Some(a) = assignment_for(host, vm.clone(), migration.clone(), image.clone()) {
                let ev = Arc::new(HostEvent::Assignment {
                    assignment: Box::new(a),
                });
                self.send(host, &ev);
            }
        }
    }

    async fn image(&mut self, vm: &Vm) -> Result<Image, ControlError> {
        if let Some(i) = self.images.get(&vm.image) {
            return Ok(i.clone());
        }
        let i = image_of(self.store.as_ref(), vm).await?;
        self.images.insert(i.id, i.clone());
        Ok(i)
    }
}

/// Whether `new` differs from `old` only in what the agents report (observed state and
/// its error): their own reports are not news to them.
fn only_observed_changed(old: &Vm, new: &Vm) -> bool {
    let mut old = old.clone();
    old.observed = new.observed;
    old.error.clone_from(&new.error);
    old == *new
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{DesiredState, ObservedState};

    fn vm() -> Vm {
        Vm {
            id: VmId::new_random(),
            tenant: model::TenantId::new_random(),
            name: model::validate_name("name", "web").unwrap(),
            image: ImageId::new_random(),
            vcpus: 1,
            memory_mib: 64,
            host: model::validate_name("host", "h1").unwrap(),
            desired: DesiredState::Running,
            observed: ObservedState::Pending,
            error: None,
            created_at: 0,
            migration: None,
            redundancy: None,
            nics: Vec::new(),
            kernel_args: None,
            trace: None,
            resource_tables: Vec::new(),
        }
    }

    #[test]
    fn an_observed_report_alone_is_not_news() {
        let old = vm();
        let mut new = old.clone();
        new.observed = ObservedState::Failed;
        new.error = Some("boom".into());
        assert!(only_observed_changed(&old, &new));
        new.desired = DesiredState::Stopped;
        assert!(!only_observed_changed(&old, &new));
        let mut moved = old.clone();
        moved.host = model::validate_name("host", "h2").unwrap();
        assert!(!only_observed_changed(&old, &moved));
    }
}
