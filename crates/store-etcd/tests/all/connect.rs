//! Connecting: bad endpoints fail clearly and fast; namespaces isolate.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use store::{Store, StoreError, WatchEvent};
use store_etcd::EtcdStore;
use test_utils::EtcdFixture;

#[tokio::test]
async fn nothing_listening_fails_fast_naming_the_endpoint() {
    let port = test_utils::free_tcp_port();
    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    let e = EtcdStore::connect(std::slice::from_ref(&url), None)
        .await
        .unwrap_err();
    let msg = model::error_chain(&e);
    assert!(msg.contains(&url), "{msg}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn bad_urls_and_namespaces_are_rejected() {
    for url in ["https://127.0.0.1:2379", "http://[::1"] {
        let e = EtcdStore::connect(&[url.to_owned()], None)
            .await
            .unwrap_err();
        let msg = model::error_chain(&e);
        assert!(msg.contains(url), "{msg}");
    }
    let e = EtcdStore::connect(&[], None).await.unwrap_err();
    let msg = model::error_chain(&e);
    assert!(msg.contains("empty endpoints"), "{msg}");
    for ns in ["no-slash", "/trailing/", "/nul\0"] {
        let e = EtcdStore::connect(&["http://127.0.0.1:1".to_owned()], Some(ns))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::InvalidKey { .. }), "{ns:?}: {e:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_do_not_see_each_other() {
    let etcd = EtcdFixture::spawn().await.unwrap();
    let ep = [etcd.endpoint()];
    let a = EtcdStore::connect(&ep, Some("/a")).await.unwrap();
    let b = EtcdStore::connect(&ep, Some("/b")).await.unwrap();
    let raw = EtcdStore::connect(&ep, None).await.unwrap();
    assert_eq!(a.namespace(), "/a");

    let mut wb = b.watch("/").await.unwrap();
    let ra = a.put("/k", Bytes::from("in a")).await.unwrap();
    assert_eq!(b.get("/k").await.unwrap(), None);
    assert_eq!(b.list("/").await.unwrap(), vec![]);
    let kv = raw.get("/a/k").await.unwrap().unwrap();
    assert_eq!((kv.value, kv.mod_revision), (Bytes::from("in a"), ra));

    // A conflict names the caller's key, not the stored one.
    let e = a.cas("/k", None, Bytes::new()).await.unwrap_err();
    assert!(
        matches!(&e, StoreError::Conflict { key } if key == "/k"),
        "{e:?}"
    );
    let listed = a.list("/").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, "/k");

    // b's watcher saw nothing of a's write: its first event is its own.
    let rb = b.put("/k", Bytes::from("in b")).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), wb.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match ev {
        WatchEvent::Put(kv) => assert_eq!((kv.key.as_str(), kv.mod_revision), ("/k", rb)),
        other => panic!("{other:?}"),
    }
}

/// `max_txn_ops` is what a default etcd accepts: a txn of exactly that many ops commits,
/// one more is refused by etcd (so batching writers sized by it never are).
#[tokio::test]
async fn max_txn_ops_is_the_limit_of_a_default_etcd() {
    let (store, _etcd) = super::fresh(None).await;
    let limit = store.max_txn_ops();
    assert_eq!(limit, store_etcd::ETCD_MAX_TXN_OPS);
    let ops = |n: usize| {
        (0..n)
            .map(|i| store::TxnOp::Put {
                key: format!("/limit/{i:04}"),
                value: Bytes::from_static(b"x"),
            })
            .collect::<Vec<_>>()
    };
    let compare = || {
        vec![store::Compare::ModRevision {
            key: "/limit/none".into(),
            expect: None,
        }]
    };
    store
        .txn(compare(), ops(limit))
        .await
        .expect("a txn at the limit commits");
    let e = store.txn(compare(), ops(limit + 1)).await.unwrap_err();
    assert!(
        matches!(e, StoreError::Backend { .. }),
        "one over the limit: {}",
        model::error_chain(&e)
    );
}
