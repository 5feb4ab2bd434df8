//! [`RedbStore`]: the embedded [`Store`], one redb file on local disk.
//!
//! Owns: the redb file format of the state store (tables below), its revision
//! counter, and the in-process watch fan-out.
//! Must not depend on: anything above `store` (the control plane talks to
//! `Arc<dyn Store>` only).
//!
//! # Layout (format 1)
//! - table `kv`: key `&str` → `(mod_revision: u64, value: &[u8])`.
//! - table `meta`: `"format"` → `1`; `"revision"` → the store-wide revision of
//!   the last write (0 or absent: nothing written yet).
//!
//! Every write takes the next revision: it reads `revision`, writes the keys with
//! `revision + 1` and stores the new `revision`, in a redb write transaction
//! committed with [`Durability::Immediate`] (fsync'd before `Ok` is returned), so
//! a write that returned `Ok` survives `kill -9` and the revision never goes
//! backwards after a restart.
//!
//! **Group commit.** Writes wait in a queue; one committer takes every queued
//! write and runs them one after another in arrival order (each sees the ones
//! before it, each takes its own revision and sends its own watch batch), in one
//! redb transaction with one fsync, hands each its result, and goes on with what
//! was queued meanwhile until the queue is empty. An fsync is most of a write's
//! time, so concurrent writers (hundreds of terminal operations a second, each
//! taking a sequence number) share it instead of queueing for one each; a lone
//! writer commits at once, as before. A write that fails its compare takes no
//! part; a backend error in the middle of a batch aborts the batch and every
//! write of it gets the error (none was applied). A write that changes nothing
//! (a delete of an absent key, a failed compare) takes no revision, as in etcd.
//! Opening a file with an unknown `format` fails instead of guessing. After an
//! unclean shutdown redb repairs the file on open; that walks the whole file,
//! which is fine at control-plane sizes (megabytes).
//!
//! # Threads and tasks
//! redb is a blocking API. The committer runs on tokio's blocking pool
//! ([`tokio::task::spawn_blocking`]): a commit waits for an fsync (milliseconds),
//! which must not stall a runtime worker; a write's task awaits its result
//! without holding a thread. Lists run on the pool too (a long one would hold a
//! worker). A `get` runs on the caller's thread: a few microseconds in redb's
//! page cache, where a hand-off to the pool and back would cost two thread
//! wake-ups. Consequence for cancellation: if the caller drops the future of a
//! write, the write still runs to completion (or not) in the background, the
//! same "maybe applied" outcome as a cancelled etcd request. Calls need a tokio
//! runtime.
//!
//! # Watch
//! Watchers are in-process: a write commits, then hands each watcher whose
//! prefix matches one of its events those events (one batch per commit) on the
//! watcher's own channel of [`WATCH_CHANNEL_COMMITS`] batches. Writers hold a
//! mutex from `begin_write` through the hand-off, so batches go out in revision
//! order. Watchers are indexed by prefix (a map from prefix to watchers, and the
//! set of prefix lengths in use), so a commit costs a few map lookups per event
//! and wakes only the watchers it concerns: with one broadcast channel that
//! every watcher filtered, a control plane with hundreds of watches (a terminal
//! operation waiting for its answer, a session following its terminal) woke
//! every one of them on every commit. A watcher that falls more than that many
//! of *its* batches behind gets one `Err` item and its stream ends (the caller
//! re-lists), never a silent gap.
//! Another process opening the same file is refused by redb's file lock, so no
//! write can bypass the watchers.
//!
//! # Elections
//! [`Store::campaign`] is [`store::election::campaign_local`]: the process that
//! opened the file is the only one that can campaign, so there is no lease;
//! candidates within the process take turns on the election key. A leader key
//! found when the file is opened belongs to a process that has died (the file
//! lock says no other process has it open), so [`RedbStore::open`] deletes
//! every key under [`ELECTION_PREFIX`]; otherwise the next campaign would
//! wait for that dead leader forever.
#![warn(missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use redb::{
    Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};
use store::election::{campaign_local, ELECTION_PREFIX};
use store::{
    validate_key, validate_txn, Compare, KeyValue, Leadership, Revision, Store, StoreError, TxnOp,
    WatchEvent, WatchStream,
};
use tokio::sync::mpsc;

/// key → (mod_revision, value)
const KV: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("kv");
/// "format" and "revision" → u64
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_FORMAT: &str = "format";
const META_REVISION: &str = "revision";
/// The layout this code reads and writes (see the crate docs).
const FORMAT: u64 = 1;

/// How many of its batches (commits that touched its prefix) a watcher may fall
/// behind before it gets an error.
pub const WATCH_CHANNEL_COMMITS: usize = 4096;

/// A [`Store`] in one redb file. Cheap to clone; clones share the database.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use store::Store;
/// let dir = tempfile::tempdir().unwrap();
/// let store = store_redb::RedbStore::open(&dir.path().join("state.redb")).unwrap();
/// let rev = store.put("/vinfra/hosts/h1", "up".into()).await.unwrap();
/// // Only succeeds if nobody wrote the key since we read `rev`.
/// store.cas("/vinfra/hosts/h1", Some(rev), "down".into()).await.unwrap();
/// # });
/// ```
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// Held from `begin_write` until the commit's events are sent, so that
    /// watchers get batches in revision order. Guards no data: a panic while
    /// holding it leaves nothing inconsistent (redb aborts the transaction).
    writer: Mutex<()>,
    /// Writes waiting for the next group commit (see the crate docs).
    queue: Mutex<Queue>,
    /// Durable commits made (each one fsync), for [`RedbStore::commits`].
    commits: AtomicU64,
    /// Shared with the watch streams (weakly), which leave it when dropped.
    watchers: Arc<Mutex<Watchers>>,
}

/// One watch: where its batches go, and whether it fell behind.
struct Watcher {
    id: u64,
    tx: mpsc::Sender<Vec<WatchEvent>>,
    lagged: Arc<AtomicBool>,
}

/// The watches by prefix.
#[derive(Default)]
struct Watchers {
    next_id: u64,
    by_prefix: HashMap<String, Vec<Watcher>>,
    /// Prefix length → how many prefixes of that length are watched: the
    /// lengths an event's key is cut at to find its watchers.
    lengths: BTreeMap<usize, usize>,
}

impl Watchers {
    fn add(&mut self, prefix: &str) -> (u64, mpsc::Receiver<Vec<WatchEvent>>, Arc<AtomicBool>) {
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_COMMITS);
        let lagged = Arc::new(AtomicBool::new(false));
        self.next_id += 1;
        let id = self.next_id;
        let list = self.by_prefix.entry(prefix.to_owned()).or_default();
        if list.is_empty() {
            *self.lengths.entry(prefix.len()).or_default() += 1;
        }
        list.push(Watcher {
            id,
            tx,
            lagged: lagged.clone(),
        });
        (id, rx, lagged)
    }

    fn remove(&mut self, prefix: &str, id: u64) {
        let Some(list) = self.by_prefix.get_mut(prefix) else {
            return;
        };
        list.retain(|w| w.id != id);
        if list.is_empty() {
            self.by_prefix.remove(prefix);
            if let Some(n) = self.lengths.get_mut(&prefix.len()) {
                *n -= 1;
                if *n == 0 {
                    self.lengths.remove(&prefix.len());
                }
            }
        }
    }

    /// Hands one commit's events to the watchers whose prefix they match. A
    /// watcher whose channel is full is marked lagged and dropped (its stream
    /// ends with an error); one whose stream is gone is dropped.
    fn dispatch(&mut self, events: &[WatchEvent]) {
        if self.by_prefix.is_empty() {
            return;
        }
        // Watcher id → the watcher, its prefix and its events of this commit, in order.
        let mut out: BTreeMap<u64, (&str, &Watcher, Vec<WatchEvent>)> = BTreeMap::new();
        for ev in events {
            let key = event_key(ev);
            for &len in self.lengths.keys() {
                if len > key.len() {
                    break;
                }
                let Some(cut) = key.get(..len) else {
                    continue;
                };
                if let Some((prefix, list)) = self.by_prefix.get_key_value(cut) {
                    for w in list {
                        out.entry(w.id)
                            .or_insert_with(|| (prefix.as_str(), w, Vec::new()))
                            .2
                            .push(ev.clone());
                    }
                }
            }
        }
        let mut gone: Vec<(String, u64)> = Vec::new();
        for (id, (prefix, w, evs)) in out {
            match w.tx.try_send(evs) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    w.lagged.store(true, Ordering::Release);
                    gone.push((prefix.to_owned(), id));
                }
                Err(mpsc::error::TrySendError::Closed(_)) => gone.push((prefix.to_owned(), id)),
            }
        }
        for (prefix, id) in gone {
            self.remove(&prefix, id);
        }
    }
}

/// A write's result, its type erased so that writes of any result share a batch.
type Erased = Box<dyn std::any::Any + Send>;

/// A write as queued: what it does in the batch's transaction.
type WriteFn = Box<dyn FnOnce(&mut WriteCtx<'_>) -> Result<Erased, StoreError> + Send>;

/// A queued write and where its result goes.
struct Job {
    f: WriteFn,
    done: tokio::sync::oneshot::Sender<Result<Erased, StoreError>>,
}

impl Job {
    /// `f` as a job, and where its result will come.
    fn new<R: Send + 'static>(
        f: impl FnOnce(&mut WriteCtx<'_>) -> Result<R, StoreError> + Send + 'static,
    ) -> (
        Job,
        tokio::sync::oneshot::Receiver<Result<Erased, StoreError>>,
    ) {
        let (done, result) = tokio::sync::oneshot::channel();
        let f: WriteFn =
            Box::new(move |ctx: &mut WriteCtx<'_>| f(ctx).map(|r| Box::new(r) as Erased));
        (Job { f, done }, result)
    }
}

/// A write's result as its writer gets it (`None`: its batch was aborted
/// before it ran).
fn unerase<R: 'static>(result: Option<Result<Erased, StoreError>>) -> Result<R, StoreError> {
    let erased = result.ok_or_else(|| {
        StoreError::backend(
            "redb write",
            RedbError("the group commit was aborted before this write ran".into()),
        )
    })??;
    match erased.downcast::<R>() {
        Ok(r) => Ok(*r),
        Err(_) => Err(StoreError::backend(
            "redb write",
            RedbError("a write's result has the wrong type".into()),
        )),
    }
}

/// The writes waiting for a group commit, and whether a committer is running
/// (then it takes them; otherwise the writer that queues one starts it).
#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    committing: bool,
}

/// The committer: commits what is queued, one group commit at a time, until
/// nothing is (`RedbStore::write` starts it when none runs). Whether more is
/// queued is settled before a batch's answers go out; after the last batch
/// it lets go of the store first (see [`Committer`]).
fn commit_queued(inner: Arc<Inner>) {
    let mut running = Committer(Some(inner));
    while let Some(inner) = running.0.clone() {
        let batch = std::mem::take(&mut inner.queue.lock().unwrap_or_else(|p| p.into_inner()).jobs);
        let outcomes = inner.commit_batch(batch);
        let last = {
            let mut q = inner.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.committing = !q.jobs.is_empty();
            !q.committing
        };
        drop(inner);
        if last {
            running.0 = None;
        }
        for (done, r) in outcomes {
            let _ = done.send(r);
        }
    }
}

/// A write's answer, sent once its batch is settled.
type Outcome = (
    tokio::sync::oneshot::Sender<Result<Erased, StoreError>>,
    Result<Erased, StoreError>,
);

/// The committer's hold on the store. Dropped before the last batch's answers
/// go out, so that a writer that has its answer and drops the store closes the
/// file (and may open it again at once). If the committer leaves otherwise (a
/// panic in a write), the next write starts a new one.
struct Committer(Option<Arc<Inner>>);

impl Drop for Committer {
    fn drop(&mut self) {
        if let Some(inner) = &self.0 {
            inner
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .committing = false;
        }
    }
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// A redb error, carried as the source of [`StoreError::Backend`].
///
/// redb's own error types are not all `Sync` (one variant holds a read
/// transaction), so the error is kept as its message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RedbError(String);

fn backend<E: std::fmt::Display>(context: impl Into<String>) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::backend(context, RedbError(e.to_string()))
}

/// Says what redb's open error means for an operator: its own messages for a
/// foreign or damaged file ("invalid data") do not say which.
fn describe_open_error(e: redb::DatabaseError) -> RedbError {
    use redb::{DatabaseError, StorageError};
    let what = match &e {
        DatabaseError::Storage(StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::InvalidData =>
        {
            "not a redb database, or its header is corrupt"
        }
        DatabaseError::Storage(StorageError::Corrupted(_)) => "the redb file is corrupt",
        DatabaseError::DatabaseAlreadyOpen => {
            "already open (by this process or another one holding the file lock)"
        }
        DatabaseError::UpgradeRequired(_) => "written by an incompatible redb version",
        _ => return RedbError(e.to_string()),
    };
    RedbError(format!("{what} ({e})"))
}

/// The stored `format` is not one this code understands.
#[derive(Debug, thiserror::Error)]
#[error("unsupported store format {found} (this build reads format {FORMAT})")]
struct UnsupportedFormat {
    found: u64,
}

/// A watcher fell too far behind the writers.
#[derive(Debug, thiserror::Error)]
#[error("watcher fell behind: more than {batches} of its batches were not read")]
struct WatchLagged {
    batches: usize,
}

impl RedbStore {
    /// Opens the database at `path`, creating the file if it does not exist.
    ///
    /// Fails, naming `path`, if the file is not a redb database, is corrupt
    /// beyond redb's repair, has an unknown format, or is already open (in this
    /// or another process). Blocks: after a crash redb repairs the file here.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let context = || format!("cannot open redb database {}", path.display());
        // A file that exists but is not a redb database must fail, not be
        // reinitialised: redb's `create` only initialises empty files.
        let db = Database::builder()
            .create(path)
            .map_err(|e| StoreError::backend(context(), describe_open_error(e)))?;
        let mut tx = db.begin_write().map_err(backend(context()))?;
        tx.set_durability(Durability::Immediate);
        {
            let kv = tx.open_table(KV).map_err(backend(context()))?;
            let mut meta = tx.open_table(META).map_err(backend(context()))?;
            let format = meta
                .get(META_FORMAT)
                .map_err(backend(context()))?
                .map(|g| g.value());
            match format {
                Some(FORMAT) => {}
                Some(found) => {
                    return Err(StoreError::backend(context(), UnsupportedFormat { found }));
                }
                None => {
                    // A fresh file. Refuse a redb file written by someone else.
                    let other_tables = tx
                        .list_tables()
                        .map_err(backend(context()))?
                        .any(|t| t.name() != KV.name() && t.name() != META.name());
                    let foreign = other_tables
                        || !kv.is_empty().map_err(backend(context()))?
                        || meta.len().map_err(backend(context()))? != 0;
                    if foreign {
                        return Err(StoreError::backend(
                            context(),
                            RedbError("redb file without a vinfra store format marker".into()),
                        ));
                    }
                    meta.insert(META_FORMAT, FORMAT)
                        .map_err(backend(context()))?;
                }
            }
        }
        tx.commit().map_err(backend(context()))?;
        let inner = Inner {
            db,
            path: path.to_owned(),
            writer: Mutex::new(()),
            queue: Mutex::new(Queue::default()),
            commits: AtomicU64::new(0),
            watchers: Arc::default(),
        };
        let stale = inner
            .clear_elections()
            .map_err(|e| StoreError::backend(context(), e))?;
        tracing::info!(path = %path.display(), stale_leader_keys = stale, "opened redb store");
        Ok(RedbStore {
            inner: Arc::new(inner),
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// How many durable commits (fsyncs) writes took since the store was opened:
    /// fewer than the writes when group commits shared them.
    pub fn commits(&self) -> u64 {
        self.inner
            .commits
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `f` on the blocking pool with the shared state.
    async fn blocking<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Inner) -> Result<R, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        match tokio::task::spawn_blocking(move || f(&inner)).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(StoreError::backend("redb task cancelled", e)),
        }
    }

    /// One write: `f` reads and writes through the [`WriteCtx`]; if it returns
    /// `Ok` and changed something, it takes the next revision, is committed
    /// durably (in a group commit with the writes queued beside it) and its
    /// events go to watchers. On `Err` nothing of it is written.
    ///
    /// The write waits as a task, not as a thread: it is queued, and the one
    /// committer (on the blocking pool, started by the write that found none
    /// running) commits what is queued, batch after batch, until the queue is
    /// empty. Before, each write held a pool thread and the writers of a batch
    /// handed a lock on one after another to find their write done — a thread
    /// wake-up per write on top of its answer's.
    async fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut WriteCtx<'_>) -> Result<R, StoreError> + Send + 'static,
    {
        let (job, result) = Job::new(f);
        let start = {
            let mut q = self.inner.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.jobs.push(job);
            !std::mem::replace(&mut q.committing, true)
        };
        if start {
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || commit_queued(inner));
        }
        unerase(result.await.ok())
    }
}

/// What a write closure sees: the `kv` table and the revision it writes at.
struct WriteCtx<'t> {
    kv: redb::Table<'t, &'static str, (u64, &'static [u8])>,
    /// The revision of the last commit.
    current: Revision,
    /// The revision this transaction writes at if it changes anything.
    next: Revision,
    events: Vec<WatchEvent>,
}

impl WriteCtx<'_> {
    fn mod_revision(&self, key: &str) -> Result<Option<Revision>, StoreError> {
        Ok(self
            .kv
            .get(key)
            .map_err(backend(format!("cannot read {key}")))?
            .map(|g| Revision(g.value().0)))
    }

    fn put(&mut self, key: &str, value: Bytes) -> Result<(), StoreError> {
        self.kv
            .insert(key, (self.next.0, &value[..]))
            .map_err(backend(format!("cannot write {key}")))?;
        self.events.push(WatchEvent::Put(KeyValue {
            key: key.to_owned(),
            value,
            mod_revision: self.next,
        }));
        Ok(())
    }

    fn delete(&mut self, key: &str) -> Result<bool, StoreError> {
        let existed = self
            .kv
            .remove(key)
            .map_err(backend(format!("cannot delete {key}")))?
            .is_some();
        if existed {
            self.events.push(WatchEvent::Delete {
                key: key.to_owned(),
                revision: self.next,
            });
        }
        Ok(existed)
    }

    /// Fails with [`StoreError::Conflict`] unless `key`'s revision is `expect`.
    fn check(&self, key: &str, expect: Option<Revision>) -> Result<(), StoreError> {
        if self.mod_revision(key)? == expect {
            Ok(())
        } else {
            Err(StoreError::Conflict {
                key: key.to_owned(),
            })
        }
    }

    /// The revision to report: `next` if this transaction wrote, else `current`.
    fn result_revision(&self) -> Revision {
        if self.events.is_empty() {
            self.current
        } else {
            self.next
        }
    }
}

impl Inner {
    /// One write committed at once on this thread: for opening the store,
    /// before anything else can write.
    fn write_now<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut WriteCtx<'_>) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (job, mut result) = Job::new(f);
        for (done, r) in self.commit_batch(vec![job]) {
            let _ = done.send(r);
        }
        unerase(result.try_recv().ok())
    }

    /// Runs `batch` in one redb transaction, commits it with one fsync and
    /// sends each write's events (in revision order, under the writer lock);
    /// returns each write's answer, for the caller to send.
    fn commit_batch(&self, batch: Vec<Job>) -> Vec<Outcome> {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut outcomes = Vec::with_capacity(batch.len());
        let run = || -> Result<Vec<Vec<WatchEvent>>, StoreError> {
            let mut tx = self
                .db
                .begin_write()
                .map_err(backend("cannot begin a redb write"))?;
            tx.set_durability(Durability::Immediate);
            let mut batches = Vec::new();
            {
                let mut meta = tx
                    .open_table(META)
                    .map_err(backend("cannot open the meta table"))?;
                let current = meta
                    .get(META_REVISION)
                    .map_err(backend("cannot read the store revision"))?
                    .map_or(0, |g| g.value());
                let kv = tx
                    .open_table(KV)
                    .map_err(backend("cannot open the kv table"))?;
                let mut ctx = WriteCtx {
                    kv,
                    current: Revision(current),
                    next: Revision(current + 1),
                    events: Vec::new(),
                };
                for job in batch {
                    let r = (job.f)(&mut ctx);
                    let events = std::mem::take(&mut ctx.events);
                    match r {
                        Ok(v) => {
                            if !events.is_empty() {
                                batches.push(events);
                                ctx.current = ctx.next;
                                ctx.next = Revision(ctx.next.0 + 1);
                            }
                            outcomes.push((job.done, Ok(v)));
                        }
                        // Failed before writing (a compare): no part of the batch.
                        Err(e) if events.is_empty() => outcomes.push((job.done, Err(e))),
                        // Failed half-way (a backend error): nothing of the batch
                        // may be committed.
                        Err(e) => {
                            let aborted = StoreError::backend(
                                "redb write",
                                RedbError(format!("the group commit was aborted: {e}")),
                            );
                            outcomes.push((job.done, Err(e)));
                            return Err(aborted);
                        }
                    }
                }
                if !batches.is_empty() {
                    meta.insert(META_REVISION, ctx.current.0)
                        .map_err(backend("cannot write the store revision"))?;
                }
            }
            if batches.is_empty() {
                // Nothing changed: no commit, no fsync, no revision.
                tx.abort().map_err(backend("cannot end a redb write"))?;
            } else {
                tx.commit()
                    .map_err(backend(format!("cannot commit to {}", self.path.display())))?;
                self.commits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(batches)
        };
        match run() {
            Ok(batches) => {
                let mut watchers = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
                for events in batches {
                    watchers.dispatch(&events);
                }
                drop(watchers);
                outcomes
            }
            Err(e) => {
                // Nothing of the batch was applied: every write of it fails (one that
                // failed on its own keeps its error; writes never run see their
                // sender dropped).
                let msg = e.to_string();
                outcomes
                    .into_iter()
                    .map(|(done, r)| {
                        let r = match r {
                            Err(own) => Err(own),
                            Ok(_) => Err(StoreError::backend(
                                "redb write",
                                RedbError(format!("the group commit was aborted: {msg}")),
                            )),
                        };
                        (done, r)
                    })
                    .collect()
            }
        }
    }
}

impl Inner {
    /// Deletes every election key (see the crate docs: their holders are
    /// gone) in one write; returns how many there were.
    fn clear_elections(&self) -> Result<usize, StoreError> {
        self.write_now(|ctx| {
            let mut stale = Vec::new();
            for entry in ctx
                .kv
                .range(ELECTION_PREFIX..)
                .map_err(backend("cannot list the election keys"))?
            {
                let (k, _) = entry.map_err(backend("cannot list the election keys"))?;
                let key = k.value();
                if !key.starts_with(ELECTION_PREFIX) {
                    break;
                }
                stale.push(key.to_owned());
            }
            for key in &stale {
                tracing::info!(key = %key, "deleting the leader key of a previous process");
                ctx.delete(key)?;
            }
            Ok(stale.len())
        })
    }
}

fn read_error<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::backend("cannot read from redb", RedbError(e.to_string()))
}

#[async_trait::async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        validate_key(key)?;
        // On the caller's thread, not the blocking pool: one key is a few
        // microseconds of B-tree walk in redb's page cache (a page read from
        // the file at worst), where a hand-off to the pool and back is two
        // thread wake-ups — on a 2-vCPU VM most of the cost of a get, and gets
        // are on every terminal operation's path (docs/TERMINALS.md).
        let inner = &self.inner;
        let tx = inner.db.begin_read().map_err(read_error)?;
        let table = tx.open_table(KV).map_err(read_error)?;
        let kv = table.get(key).map_err(read_error)?.map(|g| {
            let (rev, value) = g.value();
            KeyValue {
                key: key.to_owned(),
                value: Bytes::copy_from_slice(value),
                mod_revision: Revision(rev),
            }
        });
        Ok(kv)
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<Revision, StoreError> {
        validate_key(key)?;
        let key = key.to_owned();
        self.write(move |ctx| {
            ctx.put(&key, value)?;
            Ok(ctx.next)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        validate_key(key)?;
        let key = key.to_owned();
        self.write(move |ctx| ctx.delete(&key)).await
    }

    async fn cas(
        &self,
        key: &str,
        expect: Option<Revision>,
        value: Bytes,
    ) -> Result<Revision, StoreError> {
        validate_key(key)?;
        let key = key.to_owned();
        self.write(move |ctx| {
            ctx.check(&key, expect)?;
            ctx.put(&key, value)?;
            Ok(ctx.next)
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        validate_key(prefix)?;
        let prefix = prefix.to_owned();
        self.blocking(move |inner| {
            let tx = inner.db.begin_read().map_err(read_error)?;
            let table = tx.open_table(KV).map_err(read_error)?;
            let mut out = Vec::new();
            // Keys sort bytewise, so everything under `prefix` is one run
            // starting at `prefix`.
            for entry in table.range(prefix.as_str()..).map_err(read_error)? {
                let (k, v) = entry.map_err(read_error)?;
                let key = k.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                let (rev, value) = v.value();
                out.push(KeyValue {
                    key: key.to_owned(),
                    value: Bytes::copy_from_slice(value),
                    mod_revision: Revision(rev),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<Revision, StoreError> {
        validate_txn(&compares, &ops)?;
        self.write(move |ctx| {
            for c in &compares {
                match c {
                    Compare::ModRevision { key, expect } => ctx.check(key, *expect)?,
                }
            }
            for op in ops {
                match op {
                    TxnOp::Put { key, value } => ctx.put(&key, value)?,
                    TxnOp::Delete { key } => {
                        ctx.delete(&key)?;
                    }
                }
            }
            Ok(ctx.result_revision())
        })
        .await
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        validate_key(prefix)?;
        // Subscribing is synchronous: every commit after this line is seen.
        let (id, rx, lagged) = self
            .inner
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(prefix);
        Ok(watch_stream(WatchState {
            rx,
            lagged,
            pending: Vec::new().into_iter(),
            done: false,
            leave: Leave {
                watchers: Arc::downgrade(&self.inner.watchers),
                prefix: prefix.to_owned(),
                id,
            },
        }))
    }

    async fn campaign(
        &self,
        election: &str,
        candidate: &str,
        ttl: Duration,
    ) -> Result<Leadership, StoreError> {
        campaign_local(Arc::new(self.clone()), election, candidate, ttl).await
    }
}

fn event_key(ev: &WatchEvent) -> &str {
    match ev {
        WatchEvent::Put(kv) => &kv.key,
        WatchEvent::Delete { key, .. } => key,
    }
}

/// Takes a watch out of the store's index when its stream is dropped.
struct Leave {
    watchers: Weak<Mutex<Watchers>>,
    prefix: String,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        if let Some(w) = self.watchers.upgrade() {
            w.lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.prefix, self.id);
        }
    }
}

struct WatchState {
    rx: mpsc::Receiver<Vec<WatchEvent>>,
    lagged: Arc<AtomicBool>,
    pending: std::vec::IntoIter<WatchEvent>,
    done: bool,
    leave: Leave,
}

fn watch_stream(state: WatchState) -> WatchStream {
    Box::pin(stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.pending.next() {
                return Some((Ok(ev), st));
            }
            if st.done {
                return None;
            }
            // Fell behind: the caller re-lists, so what is still queued is of
            // no use; say so at once.
            if st.lagged.load(Ordering::Acquire) {
                st.done = true;
                let prefix = &st.leave.prefix;
                tracing::warn!(%prefix, "redb watcher fell behind");
                let e = StoreError::backend(
                    format!("watch on {prefix}"),
                    WatchLagged {
                        batches: WATCH_CHANNEL_COMMITS,
                    },
                );
                return Some((Err(e), st));
            }
            match st.rx.recv().await {
                Some(batch) => st.pending = batch.into_iter(),
                // The store is gone (nobody can write any more), or it dropped
                // this watcher for falling behind (checked above next time).
                None if st.lagged.load(Ordering::Acquire) => {}
                None => return None,
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn lagging_watcher_gets_an_error_then_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("db")).unwrap();
        let mut w = store.watch("/").await.unwrap();
        // Not polled while more commits than the channel holds go by. Sent
        // straight into the channel: 4097 fsync'd commits would be slow.
        for i in 0..=WATCH_CHANNEL_COMMITS as u64 {
            let ev = WatchEvent::Delete {
                key: "/x".into(),
                revision: Revision(i + 1),
            };
            store.inner.watchers.lock().unwrap().dispatch(&[ev]);
        }
        let e = w.next().await.unwrap().unwrap_err();
        let msg = model::error_chain(&e);
        assert!(msg.contains("fell behind"), "{msg}");
        assert!(w.next().await.is_none(), "ends after the error");
    }

    /// Only the commits that touch a watcher's prefix count against it: a
    /// watcher of a quiet prefix never falls behind, however busy the store.
    #[tokio::test]
    async fn a_watcher_of_a_quiet_prefix_never_lags() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("db")).unwrap();
        let mut quiet = store.watch("/quiet/").await.unwrap();
        for i in 0..=2 * WATCH_CHANNEL_COMMITS as u64 {
            let ev = WatchEvent::Delete {
                key: "/busy/x".into(),
                revision: Revision(i + 1),
            };
            store.inner.watchers.lock().unwrap().dispatch(&[ev]);
        }
        store.put("/quiet/a", "1".into()).await.unwrap();
        match quiet.next().await.unwrap().unwrap() {
            WatchEvent::Put(kv) => assert_eq!(kv.key, "/quiet/a"),
            other => panic!("{other:?}"),
        }
    }

    /// Every watcher whose prefix starts an event's key gets it, in commit
    /// order, and no other; a dropped stream leaves the index.
    #[tokio::test]
    async fn events_go_to_exactly_the_matching_prefixes_and_dropped_watches_leave() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("db")).unwrap();
        let prefixes = ["/", "/v/", "/v/a", "/v/ab", "/v/abc", "/v/b", "/w"];
        let mut streams = Vec::new();
        for p in prefixes {
            streams.push((p, store.watch(p).await.unwrap()));
        }
        let keys = ["/v/abc", "/v/a", "/w/1", "/v/b2", "/x"];
        for k in keys {
            store.put(k, "v".into()).await.unwrap();
        }
        store.delete("/v/abc").await.unwrap();
        let mut all = keys.to_vec();
        all.push("/v/abc");
        for (p, w) in &mut streams {
            let want: Vec<&str> = all.iter().copied().filter(|k| k.starts_with(*p)).collect();
            let mut got = Vec::new();
            for _ in 0..want.len() {
                got.push(event_key(&w.next().await.unwrap().unwrap()).to_owned());
            }
            assert_eq!(got, want, "watch on {p}");
        }
        // Nothing more for anyone.
        for (p, w) in &mut streams {
            let more = tokio::time::timeout(Duration::from_millis(50), w.next()).await;
            assert!(more.is_err(), "watch on {p} got {more:?}");
        }
        drop(streams);
        let w = store.inner.watchers.lock().unwrap();
        assert!(w.by_prefix.is_empty() && w.lengths.is_empty());
    }

    #[tokio::test]
    async fn watch_ends_when_store_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("db")).unwrap();
        let mut w = store.watch("/").await.unwrap();
        drop(store);
        assert!(w.next().await.is_none());
    }
}
