//! Integration tests of `RedbStore`: the conformance suite, a real `kill -9`
//! durability test, and opening bad files.

mod durability;
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

/// `source()` chain of an error, joined with ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}
