//! [`EtcdStore`]: the distributed [`Store`], on an etcd v3 cluster.
//!
//! Owns: the mapping of the [`Store`] contract onto etcd's KV, Txn and Watch
//! RPCs, and the optional key namespace.
//! Must not depend on: anything above `store`.
//!
//! # Mapping
//! - Revisions are etcd's: the cluster-wide `header.revision` of a write and
//!   each key's `mod_revision`. They are store-wide and strictly increasing, as
//!   the contract asks (etcd's first write is revision 2).
//! - `cas(key, expect)` is one etcd Txn: `mod_revision(key) == expect` (absent:
//!   `mod_revision == 0`, which etcd evaluates for a missing key) then `put`.
//!   `Some(Revision(0))` compiles to an always-false compare, since no
//!   existing key has revision 0.
//! - `txn` is one etcd Txn whose success branch holds the ops. Its failure
//!   branch reads every compared key, at the same revision as the failed
//!   compares, so the first failing compare can be named without a race.
//!   etcd limits each of a txn's compares, success ops and failure ops to
//!   `--max-txn-ops` (default 128, [`ETCD_MAX_TXN_OPS`]), and
//!   a request to `--max-request-bytes` (default 1.5 MiB): beyond that the
//!   call fails with etcd's error.
//! - Writes are durable when they return: etcd acknowledges after the raft
//!   log entry is committed (fsync'd on a quorum).
//! - `watch` creates an etcd watch on the prefix and returns only after etcd
//!   confirmed it (`created`), so every write issued after `watch` returns is
//!   seen. Dropping the stream drops the gRPC stream, which cancels the watch
//!   on the server.
//!
//! # Namespace
//! [`EtcdStore::connect`] takes an optional namespace such as `/tenant-a`: keys
//! are stored as `namespace + key` and returned without it, so stores with
//! different namespaces share one cluster without seeing each other (tests
//! use it; operators can use it to share a cluster).
//!
//! # When etcd goes away (measured: `kill -9` + restart on the same port, `tests/all/restart.rs`)
//! - The client (a tonic channel) reconnects by itself; no new `EtcdStore` is
//!   needed. While no member is reachable every call fails within
//!   milliseconds with a [`StoreError::Backend`] (gRPC `Cancelled`/`Unavailable`,
//!   "connection closed" or "connection refused"); it does not queue or hang.
//!   The first call after the member is healthy again succeeded (about 1 ms).
//!   Reads (`get`, `list`) are tried up to [`READ_ATTEMPTS`] times, 200, 400
//!   and 800 ms apart (a call still fails within 1.5 s while no member is up): they change nothing, and with several members the next attempt goes
//!   to a member that is up (measured: the HA test kills one member of three in
//!   the middle of a drain). Writes are not retried: a write cut off mid-flight
//!   has an unknown outcome, and only the caller knows whether re-sending it is
//!   safe — except a write whose connection could not even be made (a killed
//!   member refusing it), which is sent again the same way (a retried `cas`/`txn` fails with `Conflict` if the first one landed; a
//!   retried `put` simply writes again).
//! - With several endpoints the client balances requests over the reachable
//!   ones (tonic's balanced channel); only the single-member case is tested.
//! - Every unary call is bounded by [`REQUEST_TIMEOUT`], so a hung member
//!   surfaces as an error instead of a stuck task.
//! - An open watch gets one `Err` item when its stream breaks and then ends;
//!   the caller re-lists and watches again (the contract of
//!   [`Store::watch`]). HTTP/2 keep-alive pings ([`KEEPALIVE_INTERVAL`]) detect
//!   a silent network loss; `require_leader` makes a watch on a member that
//!   lost its leader fail instead of going quiet.
//!
//! # Elections
//! [`Store::campaign`] keeps the leader key on an etcd lease that a background
//! task renews; a leader that dies or is cut off loses the key when the lease
//! expires, and a waiting candidate takes over. Renewal, the "lost"
//! deadline and resign are described in `src/election.rs`.
//!
//! Only `http://` endpoints: the crate is built without TLS (`etcd-client`
//! with default features off).
#![warn(missing_docs)]

mod election;

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, KvClient,
    LeaseClient, Txn, TxnOp as EtcdTxnOp, TxnOpResponse, WatchClient, WatchOptions,
};
use futures_util::{stream, StreamExt};
use store::{
    validate_key, validate_txn, Compare, KeyValue, Leadership, Revision, Store, StoreError, TxnOp,
    WatchEvent, WatchStream,
};

/// Upper bound on one unary etcd call (get, put, txn, …).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `connect` waits for the first answer from the cluster.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keep-alive ping interval (the ping times out after as long again).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Largest response accepted (a `list` of a big prefix); etcd-client's default is 4 MiB.
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// Operations etcd accepts in one txn by default (`--max-txn-ops`; etcd checks the
/// compares, the success ops and the failure ops against it each on their own).
pub const ETCD_MAX_TXN_OPS: usize = 128;

/// A [`Store`] on an etcd v3 cluster. Cheap to clone; clones share the connection.
///
/// ```no_run
/// # async fn f() -> Result<(), store::StoreError> {
/// use store::Store;
/// let endpoints = ["http://127.0.0.1:2379".to_owned()];
/// let store = store_etcd::EtcdStore::connect(&endpoints, Some("/vinfra-test")).await?;
/// let mut changes = store.watch("/vms/").await?; // stored under /vinfra-test/vms/
/// store.put("/vms/web-1", "{}".into()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient,
    watch: WatchClient,
    lease: LeaseClient,
    namespace: String,
    endpoints: Vec<String>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// A call did not finish within [`REQUEST_TIMEOUT`] or [`CONNECT_TIMEOUT`].
#[derive(Debug, thiserror::Error)]
#[error("no answer from etcd within {0:?}")]
struct Timeout(Duration);

/// etcd answered something the contract does not allow.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Protocol(String);

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`http://host:port` or
    /// `host:port`) and checks that it answers within [`CONNECT_TIMEOUT`].
    ///
    /// `namespace` (`None`, or a string like `/tenant-a`: starting with `/`, not
    /// ending with it) is prepended to every key.
    pub async fn connect(
        endpoints: &[String],
        namespace: Option<&str>,
    ) -> Result<EtcdStore, StoreError> {
        let namespace = namespace.unwrap_or_default().to_owned();
        if !namespace.is_empty() {
            validate_key(&namespace)?;
            if namespace.ends_with('/') {
                return Err(StoreError::InvalidKey {
                    key: namespace,
                    reason: "a namespace must not end with '/' (keys add it)",
                });
            }
        }
        let context = || format!("cannot connect to etcd at {}", endpoints.join(","));
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_INTERVAL)
            .with_require_leader(true);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| StoreError::backend(context(), e))?;
        let store = EtcdStore {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            lease: client.lease_client(),
            namespace,
            endpoints: endpoints.to_vec(),
        };
        // The channel connects lazily: ask something to know the cluster is there.
        let probe = GetOptions::new().with_count_only();
        let mut kv = store.kv.clone();
        let probe_key = store.full("/"); // any non-empty key would do
        match tokio::time::timeout(CONNECT_TIMEOUT, kv.get(probe_key, Some(probe))).await {
            Ok(Ok(_)) => {
                tracing::info!(endpoints = ?store.endpoints, namespace = %store.namespace, "connected to etcd");
                Ok(store)
            }
            Ok(Err(e)) => Err(StoreError::backend(context(), e)),
            Err(_) => Err(StoreError::backend(context(), Timeout(CONNECT_TIMEOUT))),
        }
    }

    /// The namespace prepended to keys (empty: none).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.namespace)
    }

    /// The store key of an etcd key: without the namespace.
    fn strip(&self, raw: &[u8]) -> Result<String, StoreError> {
        let rest = raw
            .strip_prefix(self.namespace.as_bytes())
            .ok_or_else(|| protocol(format!("etcd returned a key outside {}", self.namespace)))?;
        String::from_utf8(rest.to_vec()).map_err(|_| {
            protocol(format!(
                "etcd key {:?} is not UTF-8",
                String::from_utf8_lossy(raw)
            ))
        })
    }

    fn key_value(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        Ok(KeyValue {
            key: self.strip(kv.key())?,
            value: Bytes::copy_from_slice(kv.value()),
            mod_revision: revision(kv.mod_revision())?,
        })
    }

    /// The etcd compare for "`key`'s mod_revision is `expect`".
    fn compare(&self, key: &str, expect: Option<Revision>) -> EtcdCompare {
        let full = self.full(key);
        match expect.map(|r| i64::try_from(r.0)) {
            // etcd compares a missing key as if its revisions were 0.
            None => EtcdCompare::mod_revision(full, CompareOp::Equal, 0),
            Some(Ok(rev)) if rev > 0 => EtcdCompare::mod_revision(full, CompareOp::Equal, rev),
            // Revision 0 (or beyond i64) names no write: never holds.
            Some(_) => EtcdCompare::mod_revision(full, CompareOp::Less, 0),
        }
    }
}

fn protocol(msg: String) -> StoreError {
    StoreError::backend("unexpected answer from etcd", Protocol(msg))
}

fn revision(rev: i64) -> Result<Revision, StoreError> {
    u64::try_from(rev)
        .map(Revision)
        .map_err(|_| protocol(format!("negative revision {rev}")))
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision, StoreError> {
    let header = header.ok_or_else(|| protocol("response without a header".into()))?;
    revision(header.revision())
}

/// Awaits one etcd call with [`REQUEST_TIMEOUT`], mapping errors to `context`.
async fn call<T>(
    context: impl FnOnce() -> String,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StoreError::backend(context(), e)),
        Err(_) => Err(StoreError::backend(context(), Timeout(REQUEST_TIMEOUT))),
    }
}

/// Whether a failed call never reached etcd: the connection to the member it was sent
/// to could not be made. Only then is a write safe to send again.
fn never_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable && s.message().contains("connect")
        }
        _ => false,
    }
}

/// A write with [`REQUEST_TIMEOUT`], sent again (to another member, the channel
/// balances) only when it could not be sent at all ([`never_sent`]): a killed member
/// refuses connections until the channel drops it.
async fn write<T, F, Fut>(context: impl Fn() -> String, mut attempt: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match tokio::time::timeout(REQUEST_TIMEOUT, attempt()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if never_sent(&e) && tries < READ_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(100 << tries)).await;
            }
            Ok(Err(e)) => return Err(StoreError::backend(context(), e)),
            Err(_) => return Err(StoreError::backend(context(), Timeout(REQUEST_TIMEOUT))),
        }
    }
}

/// How many times a read is tried before its error is returned.
pub const READ_ATTEMPTS: u32 = 4;

/// A read with [`call`], tried again after a backend error (see the crate docs).
async fn read<T, F, Fut>(context: impl Fn() -> String, mut attempt: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match call(&context, attempt()).await {
            Err(StoreError::Backend { .. }) if tries < READ_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(100 << tries)).await;
            }
            other => return other,
        }
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    /// etcd's `--max-txn-ops` default: the client cannot ask the server for its setting,
    /// and vinfra documents running etcd with the default (docs/OPERATIONS.md).
    fn max_txn_ops(&self) -> usize {
        ETCD_MAX_TXN_OPS
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        validate_key(key)?;
        let full = self.full(key);
        let resp = read(
            || format!("cannot get {key} from etcd"),
            || {
                let mut kv = self.kv.clone();
                let full = full.clone();
                async move { kv.get(full, None).await }
            },
        )
        .await?;
        resp.kvs().first().map(|kv| self.key_value(kv)).transpose()
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<Revision, StoreError> {
        validate_key(key)?;
        let (full, value) = (self.full(key), value.to_vec());
        let resp = write(
            || format!("cannot put {key} to etcd"),
            || {
                let (mut kv, full, value) = (self.kv.clone(), full.clone(), value.clone());
                async move { kv.put(full, value, None).await }
            },
        )
        .await?;
        header_revision(resp.header())
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        validate_key(key)?;
        let full = self.full(key);
        let resp = write(
            || format!("cannot delete {key} from etcd"),
            || {
                let (mut kv, full) = (self.kv.clone(), full.clone());
                async move { kv.delete(full, None).await }
            },
        )
        .await?;
        Ok(resp.deleted() > 0)
    }

    async fn cas(
        &self,
        key: &str,
        expect: Option<Revision>,
        value: Bytes,
    ) -> Result<Revision, StoreError> {
        validate_key(key)?;
        let txn = Txn::new()
            .when([self.compare(key, expect)])
            .and_then([EtcdTxnOp::put(self.full(key), value.to_vec(), None)]);
        let resp = write(
            || format!("cannot cas {key} on etcd"),
            || {
                let (mut kv, txn) = (self.kv.clone(), txn.clone());
                async move { kv.txn(txn).await }
            },
        )
        .await?;
        if resp.succeeded() {
            header_revision(resp.header())
        } else {
            Err(StoreError::Conflict {
                key: key.to_owned(),
            })
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        validate_key(prefix)?;
        // etcd returns a range sorted by key (bytewise) unless told otherwise.
        let full = self.full(prefix);
        let resp = read(
            || format!("cannot list {prefix} on etcd"),
            || {
                let mut kv = self.kv.clone();
                let full = full.clone();
                async move { kv.get(full, Some(GetOptions::new().with_prefix())).await }
            },
        )
        .await?;
        resp.kvs().iter().map(|kv| self.key_value(kv)).collect()
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<Revision, StoreError> {
        validate_txn(&compares, &ops)?;
        let when: Vec<EtcdCompare> = compares
            .iter()
            .map(|c| match c {
                Compare::ModRevision { key, expect } => self.compare(key, *expect),
            })
            .collect();
        let then: Vec<EtcdTxnOp> = ops
            .into_iter()
            .map(|op| match op {
                TxnOp::Put { key, value } => EtcdTxnOp::put(self.full(&key), value.to_vec(), None),
                TxnOp::Delete { key } => EtcdTxnOp::delete(self.full(&key), None),
            })
            .collect();
        // On failure, read the compared keys in the same transaction (same
        // revision) to name the first compare that failed.
        let otherwise: Vec<EtcdTxnOp> = compares
            .iter()
            .map(|c| EtcdTxnOp::get(self.full(c.key()), Some(GetOptions::new().with_keys_only())))
            .collect();
        let txn = Txn::new().when(when).and_then(then).or_else(otherwise);

        let resp = write(
            || "cannot run a transaction on etcd".to_owned(),
            || {
                let (mut kv, txn) = (self.kv.clone(), txn.clone());
                async move { kv.txn(txn).await }
            },
        )
        .await?;
        if resp.succeeded() {
            return header_revision(resp.header());
        }
        let reads = resp.op_responses();
        for (c, read) in compares.iter().zip(&reads) {
            let Compare::ModRevision { key, expect } = c;
            let current = match read {
                TxnOpResponse::Get(get) => match get.kvs().first() {
                    Some(kv) => Some(revision(kv.mod_revision())?),
                    None => None,
                },
                _ => return Err(protocol("txn failure branch returned a non-read".into())),
            };
            if current != *expect {
                return Err(StoreError::Conflict { key: key.clone() });
            }
        }
        // Every compare matched the reads: only `Some(Revision(0))` can do that.
        let key = compares
            .first()
            .map(|c| c.key().to_owned())
            .ok_or_else(|| protocol("a transaction without compares failed".into()))?;
        Err(StoreError::Conflict { key })
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        validate_key(prefix)?;
        let context = || format!("cannot watch {prefix} on etcd");
        let mut client = self.watch.clone();
        let mut etcd_stream = call(
            context,
            client.watch(self.full(prefix), Some(WatchOptions::new().with_prefix())),
        )
        .await?;
        // Wait for `created`: from then on etcd delivers every later revision.
        let first = call(context, etcd_stream.message()).await?;
        match first {
            Some(resp) if resp.created() && !resp.canceled() => {}
            Some(resp) => {
                return Err(StoreError::backend(
                    context(),
                    Protocol(format!("watch not created: {}", resp.cancel_reason())),
                ))
            }
            None => {
                return Err(StoreError::backend(
                    context(),
                    Protocol("watch stream closed before it was created".into()),
                ))
            }
        }
        let state = WatchState {
            store: self.clone(),
            prefix: prefix.to_owned(),
            inner: etcd_stream,
            pending: VecDeque::new(),
            done: false,
        };
        Ok(Box::pin(stream::unfold(state, WatchState::next)))
    }

    async fn campaign(
        &self,
        election: &str,
        candidate: &str,
        ttl: Duration,
    ) -> Result<Leadership, StoreError> {
        election::campaign(self, election, candidate, ttl).await
    }
}

struct WatchState {
    store: EtcdStore,
    prefix: String,
    inner: etcd_client::WatchStream,
    pending: VecDeque<Result<WatchEvent, StoreError>>,
    done: bool,
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<WatchEvent, StoreError>, Self)> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some((item, self));
            }
            if self.done {
                return None;
            }
            match self.inner.next().await {
                Some(Ok(resp)) => {
                    if resp.canceled() || resp.compact_revision() != 0 {
                        self.done = true;
                        let why = format!(
                            "etcd cancelled the watch (compact revision {}): {}",
                            resp.compact_revision(),
                            resp.cancel_reason()
                        );
                        self.pending
                            .push_back(Err(StoreError::backend(self.context(), Protocol(why))));
                        continue;
                    }
                    for ev in resp.events() {
                        let item = self.event(ev);
                        self.done |= item.is_err();
                        self.pending.push_back(item);
                        if self.done {
                            break;
                        }
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    self.pending
                        .push_back(Err(StoreError::backend(self.context(), e)));
                }
                None => {
                    // etcd closed the stream (it shut down): not silent, an error.
                    self.done = true;
                    self.pending.push_back(Err(StoreError::backend(
                        self.context(),
                        Protocol("etcd closed the watch stream".into()),
                    )));
                }
            }
        }
    }

    fn context(&self) -> String {
        format!("watch on {} failed", self.prefix)
    }

    fn event(&self, ev: &etcd_client::Event) -> Result<WatchEvent, StoreError> {
        let kv = ev
            .kv()
            .ok_or_else(|| protocol("watch event without a key".into()))?;
        match ev.event_type() {
            EventType::Put => Ok(WatchEvent::Put(self.store.key_value(kv)?)),
            // A delete carries the deleted key with mod_revision = the delete's revision.
            EventType::Delete => Ok(WatchEvent::Delete {
                key: self.store.strip(kv.key())?,
                revision: revision(kv.mod_revision())?,
            }),
        }
    }
}
