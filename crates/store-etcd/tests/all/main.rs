//! Integration tests of `EtcdStore` against a real etcd (one per test, on free
//! ports, started by `test_utils::EtcdFixture`): the conformance suite with and
//! without a namespace, `kill -9` durability, reconnection, namespaces, and
//! leaders whose lease stops being renewed.

mod connect;
mod election;
mod restart;

use std::sync::Arc;

use store::Store;
use store_etcd::EtcdStore;
use test_utils::EtcdFixture;

/// A fresh etcd and a store on it; the fixture is the guard.
async fn fresh(namespace: Option<&'static str>) -> (Arc<dyn Store>, EtcdFixture) {
    let etcd = EtcdFixture::spawn().await.expect("start etcd");
    let store = EtcdStore::connect(&[etcd.endpoint()], namespace)
        .await
        .expect("connect to etcd");
    (Arc::new(store), etcd)
}

store::store_suite!(suite, fresh(None));
store::store_suite!(suite_namespaced, fresh(Some("/ns-under-test")));
