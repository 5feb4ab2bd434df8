//! etcd killed with SIGKILL and restarted: acknowledged writes survive, the
//! same client reconnects by itself, and watchers are told.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use store::{Revision, Store};
use store_etcd::EtcdStore;
use test_utils::{wait_for, EtcdFixture};

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_writes_survive_kill_9() {
    let mut etcd = EtcdFixture::spawn().await.unwrap();
    let store = EtcdStore::connect(&[etcd.endpoint()], None).await.unwrap();
    let mut acked: Vec<(String, Revision)> = Vec::new();
    for i in 0..50 {
        let key = format!("/dur/{i:04}");
        let rev = if i % 2 == 0 {
            store.put(&key, Bytes::from(key.clone())).await.unwrap()
        } else {
            store
                .cas(&key, None, Bytes::from(key.clone()))
                .await
                .unwrap()
        };
        acked.push((key, rev));
    }
    // Writes in flight while etcd dies: those that returned Ok must survive.
    let writer = tokio::spawn({
        let store = store.clone();
        async move {
            let mut ok = Vec::new();
            for i in 0.. {
                let key = format!("/inflight/{i:06}");
                match store.put(&key, Bytes::from(key.clone())).await {
                    Ok(rev) => ok.push((key, rev)),
                    Err(_) => return ok,
                }
            }
            ok
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    etcd.kill9();
    let inflight = writer.await.unwrap();
    assert!(!inflight.is_empty(), "the writer ran before the kill");
    acked.extend(inflight);

    etcd.restart().await.unwrap();
    let fresh = EtcdStore::connect(&[etcd.endpoint()], None).await.unwrap();
    for (key, rev) in &acked {
        let kv = fresh
            .get(key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged {key} lost"));
        assert_eq!((&kv.value[..], kv.mod_revision), (key.as_bytes(), *rev));
    }
    let last = acked.iter().map(|(_, r)| *r).max().unwrap();
    assert!(fresh.put("/after", Bytes::new()).await.unwrap() > last);
}

#[tokio::test(flavor = "multi_thread")]
async fn same_client_reconnects_and_watch_reports_the_loss() {
    let mut etcd = EtcdFixture::spawn().await.unwrap();
    let store: Arc<dyn Store> =
        Arc::new(EtcdStore::connect(&[etcd.endpoint()], None).await.unwrap());
    let r1 = store.put("/k", Bytes::from("v1")).await.unwrap();
    let mut w = store.watch("/").await.unwrap();

    etcd.kill9();
    let killed = Instant::now();
    // The watcher gets an error item, then the stream ends.
    let item = tokio::time::timeout(Duration::from_secs(30), w.next())
        .await
        .expect("watch noticed the kill")
        .expect("an item, not a silent end");
    assert!(item.is_err(), "{item:?}");
    eprintln!(
        "watch error {:?} after the kill: {item:?}",
        killed.elapsed()
    );
    assert!(w.next().await.is_none());

    // Calls fail, and do not hang, for as long as etcd is down.
    let down = Instant::now();
    let mut failures = 0;
    while down.elapsed() < Duration::from_millis(1500) {
        let start = Instant::now();
        let e = store.get("/k").await.unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{e:?} after {:?}",
            start.elapsed()
        );
        failures += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{failures} calls failed fast while etcd was down");

    etcd.restart().await.unwrap();
    let start = Instant::now();
    wait_for(Duration::from_secs(20), || {
        let store = store.clone();
        async move { store.get("/k").await.is_ok() }
    })
    .await
    .expect("the same client works again after the restart");
    eprintln!(
        "client usable again {:?} after etcd was healthy",
        start.elapsed()
    );
    let kv = store.get("/k").await.unwrap().unwrap();
    assert_eq!((kv.value, kv.mod_revision), (Bytes::from("v1"), r1));
    assert!(store.put("/k", Bytes::from("v2")).await.unwrap() > r1);
}
