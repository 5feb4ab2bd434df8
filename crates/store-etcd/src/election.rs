//! [`Store::campaign`](store::Store::campaign) on etcd: a lease, a
//! create-if-absent transaction, and watches. (etcd's own v3election service
//! would do the same server-side; doing it here keeps the namespace handling,
//! timeouts and the "lost" judgement in one place.)
//!
//! # Campaign
//! 1. Grant a lease of `ttl` (whole seconds, rounded up) and start its keeper
//!    task (below): the lease must stay alive while the candidate waits.
//! 2. One Txn: if the election key's `create_revision == 0` (absent), put it
//!    with the candidate's name, attached to the lease; else read it.
//! 3. Created: leader, at the Txn's revision (the fencing token). Otherwise
//!    watch the key from the Txn's revision + 1 (so a delete in between is
//!    not missed) until it is deleted, and go back to 2.
//!
//!    If the candidate's own lease is lost while it waits, it starts over at 1
//!    with a new lease.
//!
//! # The keeper task (one per lease, the only owner of the lease)
//! - Renews the lease every `ttl / 3` over one keep-alive stream, re-opened
//!   after a failure.
//! - Deadline: a renewal sent at `t` that etcd acknowledged keeps the lease
//!   alive on etcd until at least `t + ttl` (etcd restarts the ttl when the
//!   request arrives, which is after `t`, and may round the ttl up, never
//!   down). The keeper holds on to leadership only until `t + ttl * 5/6`
//!   ([`hold`]) without a newer acknowledgement, then reports it lost: the
//!   sixth kept in reserve is for a timer that fires late on a loaded machine
//!   and for clock-rate differences, so that the old leader stops before etcd
//!   can expire the lease and a successor can start. (Measured without it:
//!   the successor started 0.1 to 0.3 s after the old leader noticed.) The
//!   fence covers whatever is left.
//! - Also lost: etcd answers a renewal with ttl 0 (the lease is gone, e.g.
//!   revoked), or, once leading, the election key is deleted or rewritten
//!   (seen through a watch on it).
//! - Lost is final: renewals stop, the candidate must campaign again.
//! - On resign, or when the handle is dropped, it revokes the lease (which
//!   deletes the key at once, so a waiting candidate takes over without
//!   waiting for the ttl) and ends. A revoke that fails is harmless: the lease
//!   then expires by itself within the ttl.

use std::collections::VecDeque;
use std::time::Duration;

use etcd_client::{
    Compare as EtcdCompare, CompareOp, EventType, LeaseClient, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, Txn, TxnOp as EtcdTxnOp, TxnOpResponse, WatchOptions,
};
use futures_util::StreamExt;
use store::election::{validate_campaign, LeadershipBackend};
use store::{Leadership, StoreError};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::{call, protocol, revision, EtcdStore, Timeout, REQUEST_TIMEOUT};

/// How long a waiting candidate pauses after its watch failed before trying
/// again (the next Txn tells whether etcd is reachable at all).
const RETRY_DELAY: Duration = Duration::from_millis(200);

/// The campaign of [`Store::campaign`](store::Store::campaign) on etcd (see
/// the module docs).
pub(crate) async fn campaign(
    store: &EtcdStore,
    election: &str,
    candidate: &str,
    ttl: Duration,
) -> Result<Leadership, StoreError> {
    let key = validate_campaign(election, candidate, ttl)?;
    let lease_ttl = lease_ttl(election, ttl)?;
    let full = store.full(&key);
    loop {
        let mut lease = Lease::grant(store, election, lease_ttl).await?;
        if let Some(rev) = lead_or_wait(store, &mut lease, election, candidate, &full).await? {
            tracing::info!(%election, %candidate, revision = rev, lease = lease.id, "became leader");
            // Not sent only if the keeper has ended, which `lost` then says.
            let _ = lease.cmds.send(KeeperCmd::Lead { key: full, rev }).await;
            return Ok(Leadership::new(
                election,
                candidate,
                key,
                revision(rev)?,
                lease.lost,
                Box::new(EtcdLeadership {
                    lease: lease.id,
                    cmds: lease.cmds,
                }),
            ));
        }
        tracing::warn!(%election, %candidate, lease = lease.id,
            "lease lost while waiting to lead; campaigning again with a new one");
        // Dropping `lease` revokes it.
    }
}

/// How long after sending an acknowledged renewal the keeper still counts
/// itself leader (see the module docs): five sixths of the ttl, so that two
/// renewals (every third of the ttl) can fail before it gives up.
fn hold(ttl: Duration) -> Duration {
    ttl - ttl / 6
}

/// `ttl` as etcd lease seconds: rounded up, so the lease never lives
/// shorter than asked.
fn lease_ttl(election: &str, ttl: Duration) -> Result<Duration, StoreError> {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    if i64::try_from(secs).is_err() {
        return Err(StoreError::InvalidCampaign {
            election: election.to_owned(),
            reason: "the ttl is too long for an etcd lease",
        });
    }
    Ok(Duration::from_secs(secs))
}

/// Creates the election key if absent; else waits until it is deleted and
/// tries again. `Some(revision)` once created, `None` if the lease was lost
/// meanwhile.
async fn lead_or_wait(
    store: &EtcdStore,
    lease: &mut Lease,
    election: &str,
    candidate: &str,
    full: &str,
) -> Result<Option<i64>, StoreError> {
    let context = || format!("cannot campaign in election {election} on etcd");
    loop {
        if *lease.lost.borrow() {
            return Ok(None);
        }
        let put = PutOptions::new().with_lease(lease.id);
        let txn = Txn::new()
            .when([EtcdCompare::create_revision(full, CompareOp::Equal, 0)])
            .and_then([EtcdTxnOp::put(full, candidate, Some(put))])
            .or_else([EtcdTxnOp::get(full, None)]);
        let mut kv = store.kv.clone();
        let resp = call(context, kv.txn(txn)).await?;
        let rev = resp
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| protocol("txn response without a header".into()))?;
        if resp.succeeded() {
            return Ok(Some(rev));
        }
        let holder = match resp.op_responses().first() {
            Some(TxnOpResponse::Get(get)) => get
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => {
                return Err(protocol(
                    "campaign txn failure branch returned no read".into(),
                ))
            }
        };
        // Deleted between the compare and the read: try again at once.
        let Some(holder) = holder else { continue };
        tracing::debug!(%election, %candidate, %holder, "waiting for the leader to go");
        match wait_deleted(store, full, rev + 1, &mut lease.lost).await {
            Wait::Deleted => {}
            Wait::LeaseLost => return Ok(None),
            Wait::WatchFailed(e) => {
                tracing::debug!(%election, error = &e as &dyn std::error::Error,
                    "watch on the election key failed; retrying");
                tokio::time::sleep(RETRY_DELAY).await;
            }
        }
    }
}

enum Wait {
    Deleted,
    LeaseLost,
    WatchFailed(StoreError),
}

/// Waits until `full` is deleted at or after revision `from`.
async fn wait_deleted(
    store: &EtcdStore,
    full: &str,
    from: i64,
    lost: &mut watch::Receiver<bool>,
) -> Wait {
    let context = || format!("cannot watch {full} on etcd");
    let mut client = store.watch.clone();
    let options = WatchOptions::new().with_start_revision(from);
    let mut stream = match call(context, client.watch(full, Some(options))).await {
        Ok(s) => s,
        Err(e) => return Wait::WatchFailed(e),
    };
    loop {
        tokio::select! {
            // `Err`: the keeper ended, so the lease is not kept alive either.
            _ = lost.wait_for(|lost| *lost) => return Wait::LeaseLost,
            msg = stream.next() => match msg {
                Some(Ok(resp)) => {
                    if resp.canceled() {
                        let why = format!("watch cancelled: {}", resp.cancel_reason());
                        return Wait::WatchFailed(StoreError::backend(context(), crate::Protocol(why)));
                    }
                    if resp.events().iter().any(|ev| ev.event_type() == EventType::Delete) {
                        return Wait::Deleted;
                    }
                }
                Some(Err(e)) => return Wait::WatchFailed(StoreError::backend(context(), e)),
                None => {
                    let e = crate::Protocol("etcd closed the watch stream".into());
                    return Wait::WatchFailed(StoreError::backend(context(), e));
                }
            },
        }
    }
}

/// What the campaign and the handle tell the keeper task.
#[derive(Debug)]
enum KeeperCmd {
    /// The candidate created `key` (full, with the namespace) at `rev`:
    /// watch it.
    Lead { key: String, rev: i64 },
    /// Revoke the lease and end.
    Resign(oneshot::Sender<Result<(), StoreError>>),
}

/// A granted lease and the channels to its keeper task. Dropping it (or the
/// [`EtcdLeadership`] it turns into) revokes the lease.
struct Lease {
    id: i64,
    lost: watch::Receiver<bool>,
    cmds: mpsc::Sender<KeeperCmd>,
}

impl Lease {
    async fn grant(store: &EtcdStore, election: &str, ttl: Duration) -> Result<Lease, StoreError> {
        let secs = i64::try_from(ttl.as_secs())
            .map_err(|_| protocol(format!("lease ttl {ttl:?} out of range")))?;
        let mut client = store.lease.clone();
        // Taken before the request: the lease cannot expire on etcd before
        // `sent + ttl`, so leadership can last until `sent + hold(ttl)`.
        let sent = Instant::now();
        let resp = call(
            || format!("cannot grant a lease for election {election} on etcd"),
            client.grant(secs, None),
        )
        .await?;
        if !resp.error().is_empty() {
            return Err(protocol(format!("lease grant failed: {}", resp.error())));
        }
        let (lost_tx, lost) = watch::channel(false);
        let (cmds, cmd_rx) = mpsc::channel(4);
        let keeper = Keeper {
            client: store.clone(),
            election: election.to_owned(),
            id: resp.id(),
            ttl,
            lost: lost_tx,
            deadline: sent + hold(ttl),
            stream: None,
            outstanding: VecDeque::new(),
            leading: None,
        };
        tracing::debug!(%election, lease = resp.id(), granted_ttl = resp.ttl(), "lease granted");
        tokio::spawn(keeper.run(cmd_rx));
        Ok(Lease {
            id: resp.id(),
            lost,
            cmds,
        })
    }
}

/// The [`LeadershipBackend`] of an etcd leadership.
#[derive(Debug)]
struct EtcdLeadership {
    lease: i64,
    cmds: mpsc::Sender<KeeperCmd>,
}

/// The keeper task has ended (the runtime is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the lease keeper task has ended")]
struct KeeperEnded;

#[async_trait::async_trait]
impl LeadershipBackend for EtcdLeadership {
    async fn resign(self: Box<Self>) -> Result<(), StoreError> {
        let context = || format!("cannot resign lease {:x}", self.lease);
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(KeeperCmd::Resign(tx))
            .await
            .map_err(|_| StoreError::backend(context(), KeeperEnded))?;
        rx.await
            .map_err(|_| StoreError::backend(context(), KeeperEnded))?
    }
}

/// The leader key being watched by the keeper.
struct Leading {
    key: String,
    rev: i64,
    /// `None` after the watch failed; re-created at the next renewal tick.
    watch: Option<etcd_client::WatchStream>,
}

/// The task that keeps one lease alive (see the module docs).
struct Keeper {
    client: EtcdStore,
    election: String,
    id: i64,
    ttl: Duration,
    lost: watch::Sender<bool>,
    /// Until when this keeper counts the lease as held: [`hold`] after the
    /// last acknowledged renewal was sent.
    deadline: Instant,
    /// The open keep-alive stream, if any.
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// When each unanswered renewal on `stream` was sent, oldest first
    /// (etcd answers in order).
    outstanding: VecDeque<Instant>,
    leading: Option<Leading>,
}

impl Keeper {
    async fn run(mut self, mut cmds: mpsc::Receiver<KeeperCmd>) {
        // A third of the ttl: two renewals can fail before the deadline
        // (`hold`).
        let mut tick = tokio::time::interval((self.ttl / 3).max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let lost = *self.lost.borrow();
            let watching = self.leading.as_ref().is_some_and(|l| l.watch.is_some());
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(KeeperCmd::Lead { key, rev }) => {
                        self.leading = Some(Leading { key, rev, watch: None });
                        self.watch_key().await;
                    }
                    // Lost first: the leader's work stops now, not after a
                    // revoke that may take until the lease expires.
                    Some(KeeperCmd::Resign(reply)) => {
                        self.lost.send_replace(true);
                        let result = self.revoke().await;
                        let _ = reply.send(result);
                        return;
                    }
                    // The handle (or the campaign) was dropped.
                    None => {
                        self.lost.send_replace(true);
                        if let Err(e) = self.revoke().await {
                            tracing::warn!(election = %self.election, lease = self.id,
                                error = &e as &dyn std::error::Error,
                                "cannot revoke the lease of a dropped candidacy; it will expire");
                        }
                        return;
                    }
                },
                () = tokio::time::sleep_until(self.deadline), if !lost => {
                    self.mark_lost("the lease was not renewed in time");
                }
                _ = tick.tick(), if !lost => {
                    self.renew().await;
                    if self.leading.as_ref().is_some_and(|l| l.watch.is_none()) {
                        self.watch_key().await;
                    }
                }
                resp = next_keep_alive(&mut self.stream), if !lost && self.stream.is_some() => {
                    self.on_keep_alive(resp);
                }
                resp = next_watch(&mut self.leading), if !lost && watching => {
                    self.on_key_watch(resp);
                }
            }
        }
    }

    fn mark_lost(&mut self, why: &'static str) {
        // While still campaigning this only means a new lease; once leading,
        // the leadership is over.
        let leading = self.leading.is_some();
        tracing::warn!(election = %self.election, lease = self.id, leading, why, "election lease lost");
        self.lost.send_replace(true);
        // Lost is final: no more renewals or watches.
        self.stream = None;
        self.leading = None;
    }

    /// Sends one renewal, opening the keep-alive stream if there is none.
    async fn renew(&mut self) {
        let sent = Instant::now();
        if let Some((keeper, _)) = &mut self.stream {
            match keeper.keep_alive().await {
                Ok(()) => self.outstanding.push_back(sent),
                Err(e) => self.stream_failed(e),
            }
            return;
        }
        // Opening the stream sends a first renewal and waits for its answer.
        // Bounded by the deadline: past it, the leadership is lost anyway.
        let budget = self
            .deadline
            .saturating_duration_since(sent)
            .min(REQUEST_TIMEOUT);
        let mut client: LeaseClient = self.client.lease.clone();
        match tokio::time::timeout(budget, client.keep_alive(self.id)).await {
            Ok(Ok(stream)) => {
                self.stream = Some(stream);
                self.outstanding.clear();
                self.extend(sent);
            }
            // etcd-client's word for a renewal answered with ttl 0.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(msg))) if msg.contains("not found") => {
                self.mark_lost("etcd says the lease has expired");
            }
            Ok(Err(e)) => {
                tracing::debug!(election = %self.election, lease = self.id,
                    error = &e as &dyn std::error::Error, "cannot open the lease keep-alive stream");
            }
            Err(_) => {
                tracing::debug!(election = %self.election, lease = self.id, ?budget,
                    "no answer to a lease renewal");
            }
        }
    }

    fn stream_failed(&mut self, e: etcd_client::Error) {
        tracing::debug!(election = %self.election, lease = self.id,
            error = &e as &dyn std::error::Error, "lease keep-alive stream failed; reopening");
        self.stream = None;
        self.outstanding.clear();
    }

    /// etcd acknowledged a renewal sent at `sent`.
    fn extend(&mut self, sent: Instant) {
        self.deadline = self.deadline.max(sent + hold(self.ttl));
    }

    fn on_keep_alive(
        &mut self,
        resp: Option<Result<etcd_client::LeaseKeepAliveResponse, etcd_client::Error>>,
    ) {
        match resp {
            Some(Ok(resp)) if resp.ttl() <= 0 => {
                self.mark_lost("etcd says the lease has expired");
            }
            Some(Ok(_)) => match self.outstanding.pop_front() {
                Some(sent) => self.extend(sent),
                None => {
                    tracing::debug!(election = %self.election, "unrequested lease renewal answer")
                }
            },
            Some(Err(e)) => self.stream_failed(e),
            None => self.stream_failed(etcd_client::Error::LeaseKeepAliveError(
                "etcd closed the keep-alive stream".into(),
            )),
        }
    }

    /// (Re)starts the watch on the leader key: checks the key is still ours,
    /// then watches from the revision of that check, so nothing is missed.
    /// Bounded by the deadline, so that a hung call cannot delay the "lost"
    /// judgement; after a failure the next renewal tick tries again.
    async fn watch_key(&mut self) {
        let Some(leading) = &mut self.leading else {
            return;
        };
        let check = check_and_watch(&self.client, self.id, &leading.key, leading.rev);
        let why = match tokio::time::timeout_at(self.deadline, check).await {
            Ok(Ok(Some(stream))) => {
                leading.watch = Some(stream);
                return;
            }
            Ok(Ok(None)) => {
                self.mark_lost("the leader key was deleted or rewritten");
                return;
            }
            Ok(Err(e)) => e,
            Err(_) => StoreError::backend(
                format!("cannot watch the leader key {}", leading.key),
                crate::Protocol("no answer before the lease deadline".into()),
            ),
        };
        tracing::debug!(election = %self.election, error = &why as &dyn std::error::Error,
            "cannot watch the leader key; retrying at the next renewal");
    }

    fn on_key_watch(
        &mut self,
        resp: Option<Result<etcd_client::WatchResponse, etcd_client::Error>>,
    ) {
        let Some(leading) = &mut self.leading else {
            return;
        };
        match resp {
            Some(Ok(resp)) if !resp.canceled() => {
                let deposed = resp.events().iter().any(|ev| match ev.event_type() {
                    EventType::Delete => true,
                    EventType::Put => ev.kv().is_some_and(|kv| kv.mod_revision() != leading.rev),
                });
                if deposed {
                    self.mark_lost("the leader key was deleted or rewritten");
                }
            }
            // Cancelled (compaction, no etcd leader) or broken: re-check and
            // re-watch at the next tick.
            _ => {
                tracing::debug!(election = %self.election, "watch on the leader key ended; re-watching");
                leading.watch = None;
            }
        }
    }

    /// Revokes the lease, which deletes the leader key if it holds it.
    /// Bounded by the ttl: by then the lease has expired by itself.
    async fn revoke(&mut self) -> Result<(), StoreError> {
        self.stream = None;
        let mut client = self.client.lease.clone();
        let limit = self.ttl.min(REQUEST_TIMEOUT);
        let context = || format!("cannot revoke lease {:x} on etcd", self.id);
        match tokio::time::timeout(limit, client.revoke(self.id)).await {
            Ok(Ok(_)) => {
                tracing::info!(election = %self.election, lease = self.id, "lease revoked");
                Ok(())
            }
            // Expired already (etcd's ErrGRPCLeaseNotFound): what we wanted.
            Ok(Err(etcd_client::Error::GRpcStatus(s)))
                if s.message().contains("requested lease not found") =>
            {
                Ok(())
            }
            Ok(Err(e)) => Err(StoreError::backend(context(), e)),
            Err(_) => Err(StoreError::backend(context(), Timeout(limit))),
        }
    }
}

/// A watch on `key` (full) from now on, or `None` if it is no longer the key
/// that `lease` created at `rev`.
async fn check_and_watch(
    store: &EtcdStore,
    lease: i64,
    key: &str,
    rev: i64,
) -> Result<Option<etcd_client::WatchStream>, StoreError> {
    let context = || format!("cannot watch the leader key {key}");
    let mut kv = store.kv.clone();
    let checked = call(context, kv.get(key, None)).await?;
    let ours = checked
        .kvs()
        .first()
        .is_some_and(|kv| kv.mod_revision() == rev && kv.lease() == lease);
    if !ours {
        return Ok(None);
    }
    let from = checked
        .header()
        .map(|h| h.revision() + 1)
        .ok_or_else(|| protocol("get response without a header".into()))?;
    let mut client = store.watch.clone();
    let options = WatchOptions::new().with_start_revision(from);
    call(context, client.watch(key, Some(options)))
        .await
        .map(Some)
}

/// The next answer on the keep-alive stream (never, if there is none).
async fn next_keep_alive(
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> Option<Result<etcd_client::LeaseKeepAliveResponse, etcd_client::Error>> {
    match stream {
        Some((_, s)) => s.next().await,
        None => std::future::pending().await,
    }
}

/// The next message on the leader key's watch (never, if there is none).
async fn next_watch(
    leading: &mut Option<Leading>,
) -> Option<Result<etcd_client::WatchResponse, etcd_client::Error>> {
    match leading.as_mut().and_then(|l| l.watch.as_mut()) {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}
