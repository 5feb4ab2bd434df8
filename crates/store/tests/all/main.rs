//! The conformance suite on `testing::MemStore`, so that the store other
//! crates' tests run against keeps the same promises as redb and etcd.

use std::sync::Arc;

use store::testing::MemStore;
use store::Store;

/// A fresh in-memory store; nothing to keep alive.
async fn fresh() -> (Arc<dyn Store>, ()) {
    (Arc::new(MemStore::new()), ())
}

store::store_suite!(suite, fresh());
