//! Group commit: writes made at once share commits, and each still behaves as if it
//! were alone — its own revision, its own watch batch, its compare checked against the
//! writes before it, nothing of a failed one written.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures_util::StreamExt;
use store::{Store, StoreError, WatchEvent};
use store_redb::RedbStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_share_commits_and_keep_their_own_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let redb = RedbStore::open(&dir.path().join("state.redb")).unwrap();
    let store: Arc<dyn Store> = Arc::new(redb.clone());
    let base = store.put("/g/shared", "0".into()).await.unwrap();
    let commits_before = redb.commits();
    let mut watch = store.watch("/g/").await.unwrap();

    // 150 fresh keys (each succeeds) and 150 compare-and-swaps of one key against the
    // revision read before (exactly one can win).
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300u32 {
        let store = store.clone();
        tasks.spawn(async move {
            if i % 2 == 0 {
                let key = format!("/g/k{i:03}");
                let r = store.cas(&key, None, i.to_string().into()).await;
                (key, i, r)
            } else {
                let r = store
                    .cas("/g/shared", Some(base), i.to_string().into())
                    .await;
                ("/g/shared".to_owned(), i, r)
            }
        });
    }
    let mut won = Vec::new();
    let mut shared_winners = 0;
    while let Some(r) = tasks.join_next().await {
        let (key, i, r) = r.unwrap();
        match r {
            Ok(rev) => {
                if key == "/g/shared" {
                    shared_winners += 1;
                }
                won.push((rev, key, i));
            }
            Err(StoreError::Conflict { .. }) => assert_eq!(key, "/g/shared"),
            Err(e) => panic!("{key}: {e}"),
        }
    }
    assert_eq!(shared_winners, 1);
    assert_eq!(won.len(), 151);
    // One revision each, no gaps: a failed compare takes none.
    won.sort();
    let revs: Vec<u64> = won.iter().map(|(r, ..)| r.0).collect();
    let first = base.0 + 1;
    assert_eq!(revs, (first..first + 151).collect::<Vec<_>>());
    // Each key holds its own value at its own revision.
    for (rev, key, i) in &won {
        let kv = store.get(key).await.unwrap().unwrap();
        assert_eq!(
            (kv.mod_revision, kv.value),
            (*rev, bytes::Bytes::from(i.to_string()))
        );
    }
    // Watchers see each write once, in revision order.
    let mut seen = Vec::new();
    while seen.len() < 151 {
        match watch.next().await.unwrap().unwrap() {
            WatchEvent::Put(kv) => seen.push(kv.mod_revision.0),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen, revs);
    // And they shared commits.
    let commits = redb.commits() - commits_before;
    eprintln!("151 writes (and 149 refused) in {commits} commits");
    assert!(commits < 151, "{commits} commits for 151 writes");
    let distinct: BTreeSet<_> = won.iter().map(|(r, ..)| *r).collect();
    assert_eq!(distinct.len(), 151);
}

/// The committer lets go of the store before a write has its answer: a store
/// dropped right after a write opens again at once (the file's lock is free),
/// with the write in it — over and over, and with writes in flight from other
/// tasks up to the last answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_dropped_after_its_last_answer_opens_again_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    for round in 0..50u32 {
        let redb = RedbStore::open(&path).unwrap();
        let writes: Vec<_> = (0..4u32)
            .map(|i| {
                let s = redb.clone();
                tokio::spawn(
                    async move { s.put(&format!("/r{round}/{i}"), "v".into()).await.unwrap() },
                )
            })
            .collect();
        for w in writes {
            w.await.unwrap();
        }
        redb.put("/last", round.to_string().into()).await.unwrap();
        drop(redb);
        let again = RedbStore::open(&path).unwrap_or_else(|e| {
            panic!("round {round}: reopening right after the last answer: {e}")
        });
        let last = again.get("/last").await.unwrap().unwrap();
        assert_eq!(&last.value[..], round.to_string().as_bytes());
        assert_eq!(again.list(&format!("/r{round}/")).await.unwrap().len(), 4);
    }
}
