//! Integration tests of `RedbStore`: the conformance suite, a real `kill -9`
//! durability test, and opening bad files.

mod durability;
mod group_commit;
mod open;

use std::sync::Arc;

use store::Store;
use store_redb::RedbStore;

/// A fresh store in its own temp dir (the guard).
async fn fresh() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = RedbStore::open(&dir.path().join("state.redb")).expect("open redb");
    (Arc::new(store), dir)
}

store::store_suite!(suite, fresh());
