//! Leader election: [`Leadership`], the handle a winning candidate holds, and
//! [`campaign_local`], the election of stores whose data one process owns.
//!
//! # Model
//! An election is a name such as `operation-driver`. Its leader is recorded
//! in one key, [`election_key`] (`/vinfra/election/<name>`), whose value is
//! the leader's candidate name. A candidate becomes leader by creating that
//! key while it is absent; it stays leader until the key is deleted or
//! overwritten (resign, a dropped handle, a lease that etcd expired, an
//! operator deleting it).
//!
//! # Fencing
//! The revision at which the leader created the key, [`Leadership::revision`],
//! is the fencing token: store revisions only grow, so every later leader has
//! a larger one. A leader that guards its writes with [`Leadership::fence`]
//! (a compare on the key's revision inside [`Store::txn`]) cannot write once
//! it has been deposed, even if it has not noticed yet: the compare fails with
//! [`StoreError::Conflict`] naming the election key. "Lost" is a local
//! judgement that can come late (a stalled process, a slow network); the
//! fence is what makes a late judgement safe.
//!
//! # Backends
//! - etcd (`store-etcd`): the key is attached to a lease of the campaign's
//!   `ttl` that a background task keeps renewing; if the leader dies or is cut
//!   off, etcd deletes the key when the lease expires and a waiting candidate
//!   takes over.
//! - redb and the in-memory test store: one process owns the data, so there
//!   is no lease to expire. [`campaign_local`] gives them the same semantics
//!   within that process (one leader per election, others wait), and `ttl` is
//!   only validated.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{Compare, Revision, Store, StoreError, TxnOp, WatchEvent, WatchStream};

/// The prefix under which every election keeps its leader key.
pub const ELECTION_PREFIX: &str = "/vinfra/election/";

/// The store key that records the leader of `election`.
///
/// `election` must be non-empty and contain neither `/` (one election is one
/// key, never a prefix of another election's key) nor NUL.
pub fn election_key(election: &str) -> Result<String, StoreError> {
    let reason = if election.is_empty() {
        "the election name is empty"
    } else if election.contains('/') {
        "the election name contains '/'"
    } else if election.contains('\0') {
        "the election name contains NUL"
    } else {
        return Ok(format!("{ELECTION_PREFIX}{election}"));
    };
    Err(StoreError::InvalidCampaign {
        election: election.to_owned(),
        reason,
    })
}

/// Checks the arguments of [`Store::campaign`] against the rules shared by
/// every backend, and returns the election key.
pub fn validate_campaign(
    election: &str,
    candidate: &str,
    ttl: Duration,
) -> Result<String, StoreError> {
    let key = election_key(election)?;
    let reason = if candidate.is_empty() {
        "the candidate name is empty"
    } else if ttl.is_zero() {
        "the ttl is zero"
    } else {
        return Ok(key);
    };
    Err(StoreError::InvalidCampaign {
        election: election.to_owned(),
        reason,
    })
}

/// The backend's half of a [`Leadership`]: it keeps the leadership alive (a
/// lease keep-alive, a watch on the key) and releases it.
///
/// Dropping it without [`resign`](LeadershipBackend::resign) must release
/// the leadership in the background, best effort (a candidate whose handle is
/// dropped must not block the election until a lease expires).
#[async_trait::async_trait]
pub trait LeadershipBackend: Send + Sync + fmt::Debug + 'static {
    /// Releases the leadership and returns once the leader key is gone (or
    /// belongs to someone else already).
    async fn resign(self: Box<Self>) -> Result<(), StoreError>;
}

/// Being the leader of one election, as returned by [`Store::campaign`].
///
/// Hold it for as long as the work that needs leadership runs, and stop that
/// work when [`lost`](Leadership::lost) fires. Dropping it releases the
/// leadership in the background; [`resign`](Leadership::resign) does so and
/// waits for it. Once lost, it never comes back: campaign again.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::{sync::Arc, time::Duration};
/// use store::{Store, StoreError, TxnOp};
/// # let store: Arc<dyn Store> = Arc::new(store::testing::MemStore::new());
/// let leader = store
///     .campaign("operation-driver", "server-1", Duration::from_secs(5))
///     .await?;
/// assert_eq!(store.leader("operation-driver").await?.as_deref(), Some("server-1"));
/// // A write that only the current leader can make.
/// let put = TxnOp::Put { key: "/vinfra/ops/1".into(), value: "step 2".into() };
/// store.txn(vec![leader.fence()], vec![put]).await?;
/// tokio::select! {
///     _ = leader.lost() => { /* stop the driver: someone else leads now */ }
///     _ = std::future::ready(()) => { /* run the driver */ }
/// }
/// leader.resign().await?;
/// # Ok::<(), StoreError>(()) }).unwrap();
/// ```
#[derive(Debug)]
pub struct Leadership {
    election: String,
    candidate: String,
    key: String,
    revision: Revision,
    lost: watch::Receiver<bool>,
    backend: Box<dyn LeadershipBackend>,
}

impl Leadership {
    /// For backends: the handle of a candidate that created `key` (from
    /// [`validate_campaign`]) at `revision`. `lost` turns `true` (or its
    /// sender is dropped) when the leadership is lost; `backend` releases it.
    pub fn new(
        election: &str,
        candidate: &str,
        key: String,
        revision: Revision,
        lost: watch::Receiver<bool>,
        backend: Box<dyn LeadershipBackend>,
    ) -> Leadership {
        Leadership {
            election: election.to_owned(),
            candidate: candidate.to_owned(),
            key,
            revision,
            lost,
            backend,
        }
    }

    /// The election this leadership is of.
    pub fn election(&self) -> &str {
        &self.election
    }

    /// The candidate that won.
    pub fn candidate(&self) -> &str {
        &self.candidate
    }

    /// The store key that records the leader ([`election_key`]).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The fencing token: the revision at which this leader created the
    /// election key. A later leader of the same election always has a larger one.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// A compare that holds only while this leadership does: the election key
    /// still has [`revision`](Leadership::revision). Put it in a
    /// [`Store::txn`] to make a write that a deposed leader cannot make (it
    /// fails with [`StoreError::Conflict`] naming [`key`](Leadership::key)).
    pub fn fence(&self) -> Compare {
        Compare::ModRevision {
            key: self.key.clone(),
            expect: Some(self.revision),
        }
    }

    /// Whether the leadership is known to be lost.
    pub fn is_lost(&self) -> bool {
        // A dropped sender means the backend's task ended: nobody keeps the
        // leadership alive any more.
        *self.lost.borrow() || self.lost.has_changed().is_err()
    }

    /// Resolves when the leadership is lost: the lease could not be renewed
    /// in time, or the election key was deleted or overwritten. It also
    /// resolves once the leadership is resigned or dropped. Independent of
    /// `self` (`'static`), so it can be moved into the task doing the
    /// leader's work.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut lost = self.lost.clone();
        async move {
            // `Err`: the sender is gone, which also means lost (see `is_lost`).
            let _ = lost.wait_for(|lost| *lost).await;
        }
    }

    /// Gives up the leadership and waits until the election key is released,
    /// so that another candidate can take over at once.
    pub async fn resign(self) -> Result<(), StoreError> {
        tracing::info!(election = %self.election, candidate = %self.candidate, "resigning leadership");
        self.backend.resign().await
    }
}

/// The leadership task has ended, so there is no one to resign through.
#[derive(Debug, thiserror::Error)]
#[error("the leadership task has ended")]
struct TaskEnded;

/// A request to resign, answered with the outcome.
type ResignReply = oneshot::Sender<Result<(), StoreError>>;

/// The [`LeadershipBackend`] of [`campaign_local`]: a channel to the task that
/// watches the key and deletes it on resign or drop.
#[derive(Debug)]
struct LocalLeadership {
    resign: mpsc::Sender<ResignReply>,
}

#[async_trait::async_trait]
impl LeadershipBackend for LocalLeadership {
    async fn resign(self: Box<Self>) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.resign
            .send(tx)
            .await
            .map_err(|_| StoreError::backend("cannot resign", TaskEnded))?;
        rx.await
            .map_err(|_| StoreError::backend("cannot resign", TaskEnded))?
    }
}

/// [`Store::campaign`] for a store whose data one process owns (redb, the
/// in-memory test store), built on the store's own cas, watch and txn.
///
/// A candidate creates the election key with `cas(None)`; if it exists, the
/// candidate waits for it to be deleted and tries again (waiters race; there
/// is no queue order). The winner's key is watched by a task that reports the
/// leadership lost if the key is deleted or overwritten, and that deletes the
/// key (fenced on its revision) on resign or when the handle is dropped.
///
/// There is no lease: within one process a leader cannot die without its
/// handle being dropped, so `ttl` is only validated. A key left behind by a
/// previous process (a crash) must be cleared by the backend when it opens the
/// data, or this waits for it forever (redb clears [`ELECTION_PREFIX`] on open).
///
/// Cancel-safe: the attempt runs in a spawned task, so dropping the returned
/// future can never leave a key behind; a leadership won after the caller
/// left is released at once. Needs a tokio runtime.
pub async fn campaign_local(
    store: Arc<dyn Store>,
    election: &str,
    candidate: &str,
    ttl: Duration,
) -> Result<Leadership, StoreError> {
    let key = validate_campaign(election, candidate, ttl)?;
    let (mut tx, rx) = oneshot::channel();
    let (election, candidate) = (election.to_owned(), candidate.to_owned());
    tokio::spawn(async move {
        let result = tokio::select! {
            r = campaign_local_task(store, &election, &candidate, key) => r,
            // The caller is gone: stop waiting.
            () = tx.closed() => return,
        };
        // If the caller left after we won, the unsent `Leadership` is dropped
        // here, which releases it.
        let _ = tx.send(result);
    });
    rx.await
        .map_err(|_| StoreError::backend("cannot campaign", TaskEnded))?
}

async fn campaign_local_task(
    store: Arc<dyn Store>,
    election: &str,
    candidate: &str,
    key: String,
) -> Result<Leadership, StoreError> {
    let (watcher, revision) = loop {
        // Watch before trying, so that a delete between a failed cas and the
        // wait is not missed, and the winner's watch starts before its write.
        let mut watcher = store.watch(&key).await?;
        match store
            .cas(&key, None, Bytes::copy_from_slice(candidate.as_bytes()))
            .await
        {
            Ok(revision) => break (watcher, revision),
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
        tracing::debug!(%election, %candidate, "waiting for the current leader to go");
        // Returns when the key is deleted, or the watch failed: then retry.
        while let Some(Ok(ev)) = watcher.next().await {
            if matches!(&ev, WatchEvent::Delete { key: k, .. } if *k == key) {
                break;
            }
        }
    };
    tracing::info!(%election, %candidate, revision = revision.0, "became leader");
    let (lost_tx, lost_rx) = watch::channel(false);
    let (resign_tx, resign_rx) = mpsc::channel(1);
    let monitor = LocalMonitor {
        store,
        election: election.to_owned(),
        key: key.clone(),
        revision,
        lost: lost_tx,
    };
    tokio::spawn(monitor.run(Some(watcher), resign_rx));
    Ok(Leadership::new(
        election,
        candidate,
        key,
        revision,
        lost_rx,
        Box::new(LocalLeadership { resign: resign_tx }),
    ))
}

/// The task behind a local leadership: the only owner of its watch.
struct LocalMonitor {
    store: Arc<dyn Store>,
    election: String,
    key: String,
    revision: Revision,
    lost: watch::Sender<bool>,
}

/// How long the monitor waits before re-watching after its watch failed.
const REWATCH_DELAY: Duration = Duration::from_millis(200);

impl LocalMonitor {
    async fn run(self, mut watcher: Option<WatchStream>, mut resign: mpsc::Receiver<ResignReply>) {
        loop {
            let lost = *self.lost.borrow();
            tokio::select! {
                req = resign.recv() => {
                    // `None`: the handle was dropped; release all the same.
                    // Lost first: the leader's work stops before the key goes.
                    self.lost.send_replace(true);
                    let result = self.release().await;
                    match req {
                        Some(reply) => { let _ = reply.send(result); }
                        None => if let Err(e) = result {
                            tracing::warn!(election = %self.election, error = &e as &dyn std::error::Error,
                                "cannot release a dropped leadership");
                        }
                    }
                    return;
                }
                ev = next_event(&mut watcher), if !lost => match ev {
                    Some(Ok(ev)) => {
                        if self.deposes(&ev) {
                            self.mark_lost("the election key was deleted or overwritten");
                        }
                    }
                    // The watch failed (or an earlier re-watch did): check
                    // the key, then watch again.
                    _ => watcher = self.rewatch().await,
                },
            }
        }
    }

    /// Whether `ev` ends this leadership: a later write to the key. The watch
    /// started before the winning cas, so it can also deliver older writes
    /// (another leader coming and going just before), which do not count.
    fn deposes(&self, ev: &WatchEvent) -> bool {
        let (key, revision) = match ev {
            WatchEvent::Put(kv) => (&kv.key, kv.mod_revision),
            WatchEvent::Delete { key, revision } => (key, *revision),
        };
        *key == self.key && revision > self.revision
    }

    fn mark_lost(&self, why: &'static str) {
        tracing::warn!(election = %self.election, revision = self.revision.0, why, "leadership lost");
        self.lost.send_replace(true);
    }

    /// A new watch, after checking that the key did not change while there
    /// was none. `None` (after a pause) if the store failed: tried again later.
    async fn rewatch(&self) -> Option<WatchStream> {
        tokio::time::sleep(REWATCH_DELAY).await;
        let watcher = match self.store.watch(&self.key).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(election = %self.election, error = &e as &dyn std::error::Error, "cannot watch the election key");
                return None;
            }
        };
        match self.store.get(&self.key).await {
            Ok(Some(kv)) if kv.mod_revision == self.revision => {}
            Ok(_) => self.mark_lost("the election key changed while unwatched"),
            Err(e) => {
                tracing::warn!(election = %self.election, error = &e as &dyn std::error::Error, "cannot read the election key");
                return None;
            }
        }
        Some(watcher)
    }

    /// Deletes the key if it is still ours.
    async fn release(&self) -> Result<(), StoreError> {
        let released = self
            .store
            .txn(
                vec![Compare::ModRevision {
                    key: self.key.clone(),
                    expect: Some(self.revision),
                }],
                vec![TxnOp::Delete {
                    key: self.key.clone(),
                }],
            )
            .await;
        match released {
            Ok(_) => {
                tracing::info!(election = %self.election, revision = self.revision.0, "leadership released");
                Ok(())
            }
            // Already someone else's (or nobody's): nothing of ours to delete.
            Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The next item of `watcher`; `None` at once if there is no watcher (the
/// caller then makes one).
async fn next_event(watcher: &mut Option<WatchStream>) -> Option<Result<WatchEvent, StoreError>> {
    match watcher {
        Some(w) => w.next().await,
        None => None,
    }
}
