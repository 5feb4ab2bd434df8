//! The push hub over the in-memory store, where the test controls what HTTP cannot: a
//! stream that is not read (it falls behind) and a store watch that breaks (as an etcd
//! watch does when its member dies). Both must end in `resync`, never in silence.

use std::sync::Arc;
use std::time::Duration;

use control::Control;
use futures_util::StreamExt;
use model::api::HostEvent;
use model::{DesiredState, ObservedState};
use store::testing::MemStore;
use store::{Compare, KeyValue, Leadership, Revision, Store, StoreError, TxnOp, WatchStream};
use tokio::sync::broadcast;

use crate::drain::{host, n, put};

/// A [`MemStore`] whose watches can be broken on demand.
struct Breakable {
    inner: MemStore,
    breaks: broadcast::Sender<()>,
}

#[async_trait::async_trait]
impl Store for Breakable {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, value: bytes::Bytes) -> Result<Revision, StoreError> {
        self.inner.put(key, value).await
    }
    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.delete(key).await
    }
    async fn cas(
        &self,
        key: &str,
        expect: Option<Revision>,
        value: bytes::Bytes,
    ) -> Result<Revision, StoreError> {
        self.inner.cas(key, expect, value).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<Revision, StoreError> {
        self.inner.txn(compares, ops).await
    }
    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        let changes = self.inner.watch(prefix).await?;
        let mut broken = self.breaks.subscribe();
        let broken = futures_util::stream::once(async move {
            let _ = broken.recv().await;
            Err(StoreError::backend(
                "test",
                "the watch was broken on purpose",
            ))
        });
        // Whichever comes first; the error is the last item, as the contract says.
        let mut failed = false;
        Ok(Box::pin(
            futures_util::stream::select(changes, broken).take_while(move |item| {
                let go = !failed;
                failed |= item.is_err();
                std::future::ready(go)
            }),
        ))
    }
    async fn campaign(
        &self,
        election: &str,
        candidate: &str,
        ttl: Duration,
    ) -> Result<Leadership, StoreError> {
        self.inner.campaign(election, candidate, ttl).await
    }
}

/// The next event that is not a ping, within 5 s.
async fn next(s: &mut control::HostEvents) -> HostEvent {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("an event within 5 s")
            .expect("the stream goes on");
        if *ev != HostEvent::Ping {
            return (*ev).clone();
        }
    }
}

async fn image(store: &dyn Store) -> model::ImageId {
    let i = model::Image {
        id: model::ImageId::new_random(),
        tenant: None,
        name: n("img"),
        kernel: None,
        initrd: None,
        disk_template: None,
        cmdline: String::new(),
        disk_mib: 64,
        created_at: 0,
    };
    put(store, &control::records::keys::image(i.id), &i).await;
    i.id
}

fn vm(image: model::ImageId, on: &str) -> model::Vm {
    model::Vm {
        id: model::VmId::new_random(),
        tenant: model::TenantId::new_random(),
        name: n("web"),
        image,
        vcpus: 1,
        memory_mib: 64,
        host: n(on),
        desired: DesiredState::Running,
        observed: ObservedState::Running,
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

#[tokio::test]
async fn a_stream_that_falls_behind_gets_resync_and_goes_on() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    host(store.as_ref(), "h1").await;
    let mut v = vm(image(store.as_ref()).await, "h1");
    let key = control::records::keys::vm(v.id);
    let c = Control::new(store.clone(), 6_000);
    let mut s = c.host_events(&n("h1")).await.unwrap();
    assert_eq!(next(&mut s).await, HostEvent::Resync);
    // Far more changes than the stream holds, none read meanwhile.
    let changes = control::push::HOST_BUFFER + 200;
    for i in 0..changes {
        v.desired = if i % 2 == 0 {
            DesiredState::Stopped
        } else {
            DesiredState::Running
        };
        put(store.as_ref(), &key, &v).await;
    }
    let last = v.desired;
    // Everything that comes, until the stream is quiet.
    let mut got = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(500), s.next()).await {
        got.push((*ev).clone());
    }
    assert!(
        got.contains(&HostEvent::Resync),
        "no resync after {changes} unread changes ({} events)",
        got.len()
    );
    assert!(
        got.len() < changes,
        "{} events for {changes} changes",
        got.len()
    );
    // Events of one VM come in the store's order: the last one is current.
    match got
        .iter()
        .rev()
        .find(|ev| matches!(ev, HostEvent::Assignment { .. }))
    {
        Some(HostEvent::Assignment { assignment }) => assert_eq!(assignment.desired(), last),
        other => panic!("no assignment after the resync: {other:?}"),
    }
    c.close_push();
}

#[tokio::test]
async fn a_broken_store_watch_is_made_again_and_every_stream_resyncs() {
    let store = Arc::new(Breakable {
        inner: MemStore::new(),
        breaks: broadcast::channel(4).0,
    });
    host(store.as_ref(), "h1").await;
    host(store.as_ref(), "h2").await;
    let img = image(store.as_ref()).await;
    let c = Control::new(store.clone(), 6_000).with_push_keepalive(Duration::from_secs(60));
    let mut s1 = c.host_events(&n("h1")).await.unwrap();
    let mut s2 = c.host_events(&n("h2")).await.unwrap();
    for s in [&mut s1, &mut s2] {
        assert_eq!(next(s).await, HostEvent::Resync);
    }
    store.breaks.send(()).unwrap();
    // Told at once that changes may have been missed, then once more when the hub
    // watches again.
    for s in [&mut s1, &mut s2] {
        assert_eq!(next(s).await, HostEvent::Resync);
        assert_eq!(next(s).await, HostEvent::Resync);
    }
    // The new watch carries changes.
    let v = vm(img, "h2");
    put(store.as_ref(), &control::records::keys::vm(v.id), &v).await;
    match next(&mut s2).await {
        HostEvent::Assignment { assignment } => assert_eq!(assignment.vm, v),
        other => panic!("expected the new VM, got {other:?}"),
    }
    // Closing ends every stream and refuses new ones.
    c.close_push();
    assert!(tokio::time::timeout(Duration::from_secs(5), s1.next())
        .await
        .unwrap()
        .is_none());
    assert!(matches!(
        c.host_events(&n("h1")).await,
        Err(control::PushError::ShuttingDown)
    ));
}

#[tokio::test]
async fn an_unknown_host_has_no_stream() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let c = Control::new(store, 6_000);
    assert!(matches!(
        c.host_events(&n("h9")).await,
        Err(control::PushError::Control(
            control::ControlError::NotFound { kind: "host", .. }
        ))
    ));
}
