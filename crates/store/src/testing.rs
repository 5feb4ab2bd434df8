//! An in-memory [`Store`] for tests: etcd semantics (revisions, cas, txn,
//! watch, elections), no durability. Only built with the `testing` feature, which crates
//! enable in their dev-dependencies, so it never ships in a binary; it runs
//! the same conformance suite ([`crate::suite`]) as the real backends.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast;
use tokio::task::yield_now;

use crate::{
    election, validate_key, validate_txn, Compare, KeyValue, Leadership, Revision, Store,
    StoreError, TxnOp, WatchEvent, WatchStream,
};

/// An in-memory store. Every operation first yields to the scheduler, as a
/// real store's I/O would, so that concurrent requests interleave between
/// their reads and writes and races show up in tests. Watchers that fall behind by more than 1024 events
/// get a `Backend` error and their stream ends.
///
/// Elections ([`Store::campaign`]) work as on redb
/// ([`election::campaign_local`]): one leader per election, other candidates
/// wait until it resigns or its handle is dropped. There is no lease; to
/// simulate a leader whose lease expired (it crashed, or was cut off), delete
/// its key ([`crate::election_key`]): the leader's `lost` fires and a waiting
/// candidate takes over.
///
/// Cheap to clone; clones share the data.
#[derive(Clone, Debug)]
pub struct MemStore {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<WatchEvent>,
}

#[derive(Debug, Default)]
struct Inner {
    rev: u64,
    data: BTreeMap<String, (Bytes, Revision)>,
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            inner: Arc::new(Mutex::new(Inner::default())),
            events,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn emit(&self, ev: Vec<WatchEvent>) {
        for e in ev {
            // No receivers is fine.
            let _ = self.events.send(e);
        }
    }
}

impl Inner {
    fn holds(&self, c: &Compare) -> bool {
        match c {
            Compare::ModRevision { key, expect } => self.data.get(key).map(|(_, r)| *r) == *expect,
        }
    }

    fn put(&mut self, key: &str, value: Bytes, rev: Revision) -> WatchEvent {
        self.data.insert(key.to_owned(), (value.clone(), rev));
        WatchEvent::Put(KeyValue {
            key: key.to_owned(),
            value,
            mod_revision: rev,
        })
    }
}

#[async_trait::async_trait]
impl Store for MemStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        yield_now().await;
        validate_key(key)?;
        Ok(self.lock().data.get(key).map(|(v, r)| KeyValue {
            key: key.to_owned(),
            value: v.clone(),
            mod_revision: *r,
        }))
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<Revision, StoreError> {
        yield_now().await;
        validate_key(key)?;
        let (rev, ev) = {
            let mut g = self.lock();
            g.rev += 1;
            let rev = Revision(g.rev);
            (rev, g.put(key, value, rev))
        };
        self.emit(vec![ev]);
        Ok(rev)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        yield_now().await;
        validate_key(key)?;
        let ev = {
            let mut g = self.lock();
            if g.data.contains_key(key) {
                g.rev += 1;
                let rev = Revision(g.rev);
                g.data.remove(key);
                Some(WatchEvent::Delete {
                    key: key.to_owned(),
                    revision: rev,
                })
            } else {
                None
            }
        };
        let existed = ev.is_some();
        self.emit(ev.into_iter().collect());
        Ok(existed)
    }

    async fn cas(
        &self,
        key: &str,
        expect: Option<Revision>,
        value: Bytes,
    ) -> Result<Revision, StoreError> {
        self.txn(
            vec![Compare::ModRevision {
                key: key.to_owned(),
                expect,
            }],
            vec![TxnOp::Put {
                key: key.to_owned(),
                value,
            }],
        )
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        yield_now().await;
        validate_key(prefix)?;
        let g = self.lock();
        Ok(g.data
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (v, r))| KeyValue {
                key: k.clone(),
                value: v.clone(),
                mod_revision: *r,
            })
            .collect())
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<Revision, StoreError> {
        yield_now().await;
        validate_txn(&compares, &ops)?;
        let (rev, events) = {
            let mut g = self.lock();
            if let Some(Compare::ModRevision { key, .. }) = compares.iter().find(|c| !g.holds(c)) {
                return Err(StoreError::Conflict { key: key.clone() });
            }
            g.rev += 1;
            let rev = Revision(g.rev);
            let mut events = Vec::new();
            for op in ops {
                match op {
                    TxnOp::Put { key, value } => events.push(g.put(&key, value, rev)),
                    TxnOp::Delete { key } => {
                        if g.data.remove(&key).is_some() {
                            events.push(WatchEvent::Delete { key, revision: rev });
                        }
                    }
                }
            }
            (rev, events)
        };
        self.emit(events);
        Ok(rev)
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        yield_now().await;
        validate_key(prefix)?;
        let rx = self.events.subscribe();
        let prefix = prefix.to_owned();
        let stream = futures_util::stream::unfold(Some(rx), move |rx| {
            let prefix = prefix.clone();
            async move {
                let mut rx = rx?;
                loop {
                    match rx.recv().await {
                        Ok(ev) => {
                            let key = match &ev {
                                WatchEvent::Put(kv) => &kv.key,
                                WatchEvent::Delete { key, .. } => key,
                            };
                            if key.starts_with(&prefix) {
                                return Some((Ok(ev), Some(rx)));
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let err = StoreError::backend(
                                "in-memory watch",
                                format!("watcher fell behind by {n} events"),
                            );
                            return Some((Err(err), None));
                        }
                    }
                }
            }
        });
        Ok(Box::pin(stream))
    }

    async fn campaign(
        &self,
        election: &str,
        candidate: &str,
        ttl: Duration,
    ) -> Result<Leadership, StoreError> {
        election::campaign_local(Arc::new(self.clone()), election, candidate, ttl).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cas_and_txn_follow_revisions() {
        let s = MemStore::new();
        let r1 = s.cas("/a", None, Bytes::from_static(b"1")).await.unwrap();
        assert!(matches!(
            s.cas("/a", None, Bytes::from_static(b"2")).await,
            Err(StoreError::Conflict { .. })
        ));
        let r2 = s
            .cas("/a", Some(r1), Bytes::from_static(b"2"))
            .await
            .unwrap();
        assert!(r2 > r1);
        let err = s
            .txn(
                vec![
                    Compare::ModRevision {
                        key: "/a".into(),
                        expect: Some(r2),
                    },
                    Compare::ModRevision {
                        key: "/b".into(),
                        expect: Some(r1),
                    },
                ],
                vec![TxnOp::Delete { key: "/a".into() }],
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { key } if key == "/b"));
        assert_eq!(s.list("/").await.unwrap().len(), 1);
        assert!(s.delete("/a").await.unwrap());
        assert!(s.get("/a").await.unwrap().is_none());
    }
}
