//! The conformance suite every [`crate::Store`] implementation runs.
//!
//! Each check is a plain `async fn` taking a fresh, empty store and panicking
//! (`assert!`) on the first violation, so a failure points at the broken rule.
//! A backend runs all of them with [`store_suite!`](crate::store_suite), which
//! generates one `#[tokio::test]` per check:
//!
//! ```ignore
//! // crates/store-redb/tests/all/main.rs
//! store::store_suite!(redb, async {
//!     let dir = tempfile::tempdir().unwrap();
//!     let store = store_redb::RedbStore::open(&dir.path().join("state.redb")).unwrap();
//!     (std::sync::Arc::new(store) as std::sync::Arc<dyn store::Store>, dir)
//! });
//! ```
//!
//! The fixture expression is a future yielding `(Arc<dyn Store>, guard)`; the
//! guard (a temp dir, an etcd process) lives until the check ends. The tests run
//! on a multi-threaded runtime so the concurrency check really races.
//! [`run_all`] runs every check in one test instead (for a quick in-memory
//! store, say).
//!
//! What is deliberately *not* checked: exact revision numbers (etcd starts at
//! 2, redb at 1; only "strictly increasing" is promised), behaviour across
//! restarts (each backend has its own durability test with a real `kill -9`),
//! and lease expiry (only etcd has leases; its own tests cut a leader off).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

use crate::{
    election_key, Compare, KeyValue, Leadership, Revision, Store, StoreError, TxnOp, WatchEvent,
    WatchStream,
};

/// How long a check waits for one watch event before failing.
const WATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The ttl of the election checks: long enough that a slow CI machine never
/// loses a lease by accident (no check depends on expiry).
const ELECTION_TTL: Duration = Duration::from_secs(5);
/// How long a check waits for a handover (a resign seen by a waiter) or a
/// lost leadership before failing.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a waiting candidate must stay waiting to count as blocked.
const STILL_WAITING: Duration = Duration::from_millis(300);

/// Generates one `#[tokio::test]` per conformance check.
///
/// `store_suite!(name, fixture)` makes a module `name` whose tests each await
/// `fixture` (an expression, evaluated once per test, whose value is a future
/// yielding `(Arc<dyn Store>, G)`; `G` is kept alive until the check ends).
/// The module does `use super::*;`, so the fixture may call helpers of the
/// test file. The calling crate needs `tokio` (with `macros` and
/// `rt-multi-thread`) as a dependency.
#[macro_export]
macro_rules! store_suite {
    ($name:ident, $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::store_suite!(@checks tests [$make]);
        }
    };
    // The one list of checks; `tests` and `run` below expand it.
    (@checks $mode:ident [$make:expr]) => {
        $crate::store_suite!(@$mode [$make]
            get_missing,
            put_get,
            revisions_increase_across_keys,
            delete_returns_existed,
            recreate_gets_bigger_revision,
            cas_absent,
            cas_revision,
            list_prefix,
            txn_all_or_nothing,
            txn_conflict_names_key,
            txn_rejects_duplicate_keys,
            watch_prefix,
            watch_txn_and_many_watchers,
            invalid_keys,
            concurrent_cas_counter,
            large_values,
            election_single_candidate,
            election_rejects_bad_arguments,
            election_second_waits_for_resign,
            election_drop_releases,
            election_cancelled_campaign_leaves_nothing,
            election_deleted_key_deposes_leader,
            election_one_leader_at_a_time,
        );
    };
    (@tests [$make:expr] $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let (store, _guard) = ($make).await;
                $crate::suite::$check(store).await;
            }
        )*
    };
    (@run [$make:expr] $($check:ident),* $(,)?) => {
        $(
            {
                let (store, _guard) = ($make).await;
                $crate::suite::$check(store).await;
            }
        )*
    };
}

/// Runs every check in order, each on a fresh store from `make`.
///
/// Prefer [`store_suite!`](crate::store_suite) for a real backend: one test per
/// check reports every failure, not just the first.
pub async fn run_all<F, Fut, G>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = (Arc<dyn Store>, G)>,
{
    crate::store_suite!(@checks run [make()]);
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn is_conflict_on(e: &StoreError, want: &str) -> bool {
    matches!(e, StoreError::Conflict { key } if key == want)
}

fn is_invalid_key(e: &StoreError, want: &str) -> bool {
    matches!(e, StoreError::InvalidKey { key, .. } if key == want)
}

async fn next_event(w: &mut WatchStream, what: &str) -> WatchEvent {
    match tokio::time::timeout(WATCH_TIMEOUT, w.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("watch failed while waiting for {what}: {e:?}"),
        Ok(None) => panic!("watch ended while waiting for {what}"),
        Err(_) => panic!("no watch event within {WATCH_TIMEOUT:?} while waiting for {what}"),
    }
}

fn expect_put(ev: WatchEvent, key: &str, value: &str, rev: Revision) {
    let want = WatchEvent::Put(KeyValue {
        key: key.to_owned(),
        value: b(value),
        mod_revision: rev,
    });
    assert_eq!(ev, want, "expected a put of {key}");
}

fn expect_delete(ev: WatchEvent, key: &str) -> Revision {
    match ev {
        WatchEvent::Delete { key: k, revision } if k == key => revision,
        other => panic!("expected a delete of {key}, got {other:?}"),
    }
}

/// Reads `key` and asserts it holds `value` at `rev`.
async fn assert_kv(store: &dyn Store, key: &str, value: &[u8], rev: Revision) {
    let kv = store
        .get(key)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("{key} missing"));
    assert_eq!(kv.key, key);
    assert_eq!(&kv.value[..], value, "value of {key}");
    assert_eq!(kv.mod_revision, rev, "mod_revision of {key}");
}

/// A key that was never written reads as `None`, also next to existing keys.
pub async fn get_missing(store: Arc<dyn Store>) {
    assert_eq!(store.get("/missing").await.unwrap(), None);
    store.put("/missing/child", b("x")).await.unwrap();
    store.put("/missingx", b("x")).await.unwrap();
    assert_eq!(
        store.get("/missing").await.unwrap(),
        None,
        "prefix of a key"
    );
    assert_eq!(store.get("/missing/chil").await.unwrap(), None);
    assert_eq!(store.list("/nothing/").await.unwrap(), vec![]);
}

/// A put is read back with its revision; overwrites replace the value; empty,
/// binary and non-ASCII data round-trip.
pub async fn put_get(store: Arc<dyn Store>) {
    let r1 = store.put("/a", b("one")).await.unwrap();
    assert_kv(&*store, "/a", b"one", r1).await;

    let r2 = store.put("/a", b("two")).await.unwrap();
    assert!(r2 > r1, "overwrite: {r2:?} > {r1:?}");
    assert_kv(&*store, "/a", b"two", r2).await;

    let r3 = store.put("/a", b("two")).await.unwrap();
    assert!(r3 > r2, "rewriting the same value is still a write");
    assert_kv(&*store, "/a", b"two", r3).await;

    let r = store.put("/empty", Bytes::new()).await.unwrap();
    assert_kv(&*store, "/empty", b"", r).await;

    let binary = Bytes::from_static(&[0, 255, 1, 254, 0, 0, 10, 13]);
    let r = store.put("/bin", binary.clone()).await.unwrap();
    assert_kv(&*store, "/bin", &binary, r).await;

    let key = "/vinfra/vms/t\u{e9}nant/\u{1f680} id with spaces";
    let r = store.put(key, b("unicode")).await.unwrap();
    assert_kv(&*store, key, b"unicode", r).await;
}

/// Revisions are store-wide: every write, to any key, gets a larger one.
pub async fn revisions_increase_across_keys(store: Arc<dyn Store>) {
    let mut last = Revision(0);
    let mut bump = |r: Revision, what: &str| {
        assert!(r > last, "{what}: revision {r:?} not above {last:?}");
        last = r;
    };
    let ra = store.put("/r/a", b("1")).await.unwrap();
    bump(ra, "put /r/a");
    let rb = store.put("/r/b", b("1")).await.unwrap();
    bump(rb, "put /r/b");
    let rc = store.put("/other", b("1")).await.unwrap();
    bump(rc, "put /other");
    let ra2 = store.cas("/r/a", Some(ra), b("2")).await.unwrap();
    bump(ra2, "cas /r/a");
    let rt = store
        .txn(
            vec![],
            vec![TxnOp::Put {
                key: "/r/c".into(),
                value: b("1"),
            }],
        )
        .await
        .unwrap();
    bump(rt, "txn");
    assert!(store.delete("/r/b").await.unwrap());
    let rd = store.put("/r/d", b("1")).await.unwrap();
    assert!(
        rd.0 > rt.0 + 1,
        "the delete in between took a revision: {rd:?} vs {rt:?}"
    );
    bump(rd, "put /r/d");

    // Every key reports the revision of its own last write, not the newest.
    assert_kv(&*store, "/r/a", b"2", ra2).await;
    assert_kv(&*store, "/other", b"1", rc).await;
    assert_kv(&*store, "/r/c", b"1", rt).await;
}

/// `delete` reports whether the key existed, and really removes it.
pub async fn delete_returns_existed(store: Arc<dyn Store>) {
    assert!(!store.delete("/d").await.unwrap(), "absent key");
    store.put("/d", b("x")).await.unwrap();
    store.put("/d/child", b("x")).await.unwrap();
    assert!(store.delete("/d").await.unwrap(), "present key");
    assert_eq!(store.get("/d").await.unwrap(), None);
    assert!(!store.delete("/d").await.unwrap(), "deleted twice");
    // Delete is exact, not by prefix.
    assert!(store.get("/d/child").await.unwrap().is_some());
}

/// A deleted and re-created key gets a new, larger revision, so a cas holding
/// the old revision fails (no ABA).
pub async fn recreate_gets_bigger_revision(store: Arc<dyn Store>) {
    let r1 = store.put("/k", b("v1")).await.unwrap();
    assert!(store.delete("/k").await.unwrap());
    let r2 = store.put("/k", b("v1")).await.unwrap();
    assert!(r2 > r1, "re-created: {r2:?} > {r1:?}");
    assert_kv(&*store, "/k", b"v1", r2).await;
    let e = store.cas("/k", Some(r1), b("v2")).await.unwrap_err();
    assert!(
        is_conflict_on(&e, "/k"),
        "cas with the pre-delete revision: {e:?}"
    );

    // Re-creating through cas(None) as well.
    assert!(store.delete("/k").await.unwrap());
    let r3 = store.cas("/k", None, b("v3")).await.unwrap();
    assert!(r3 > r2);
    assert_kv(&*store, "/k", b"v3", r3).await;
}

/// `cas(None)` creates only if absent.
pub async fn cas_absent(store: Arc<dyn Store>) {
    let r1 = store.cas("/c", None, b("first")).await.unwrap();
    assert_kv(&*store, "/c", b"first", r1).await;

    let e = store.cas("/c", None, b("second")).await.unwrap_err();
    assert!(is_conflict_on(&e, "/c"), "{e:?}");
    assert_kv(&*store, "/c", b"first", r1).await;

    // A failed cas is not a write: the next write is the next revision in line.
    let r2 = store.put("/other", b("x")).await.unwrap();
    assert!(r2 > r1);
}

/// `cas(Some(rev))` writes only at exactly that revision.
pub async fn cas_revision(store: Arc<dyn Store>) {
    let r1 = store.put("/c", b("1")).await.unwrap();
    let r2 = store.cas("/c", Some(r1), b("2")).await.unwrap();
    assert!(r2 > r1);
    assert_kv(&*store, "/c", b"2", r2).await;

    // Stale revision.
    let e = store.cas("/c", Some(r1), b("3")).await.unwrap_err();
    assert!(is_conflict_on(&e, "/c"), "stale: {e:?}");
    // A revision from the future, or of another key.
    let other = store.put("/other", b("x")).await.unwrap();
    let e = store.cas("/c", Some(other), b("3")).await.unwrap_err();
    assert!(is_conflict_on(&e, "/c"), "another key's revision: {e:?}");
    let e = store
        .cas("/c", Some(Revision(u64::MAX / 2)), b("3"))
        .await
        .unwrap_err();
    assert!(is_conflict_on(&e, "/c"), "future: {e:?}");
    assert_kv(&*store, "/c", b"2", r2).await;

    // Expecting a revision of an absent key fails, Revision(0) included.
    for rev in [Revision(0), r1, r2] {
        let e = store.cas("/absent", Some(rev), b("x")).await.unwrap_err();
        assert!(is_conflict_on(&e, "/absent"), "absent with {rev:?}: {e:?}");
    }
    assert_eq!(store.get("/absent").await.unwrap(), None);

    // Current revision succeeds again.
    let r3 = store.cas("/c", Some(r2), b("3")).await.unwrap();
    assert_kv(&*store, "/c", b"3", r3).await;
}

/// `list` returns exactly the keys under the prefix, sorted by key.
pub async fn list_prefix(store: Arc<dyn Store>) {
    // Written out of order; neighbours that share bytes with the prefix.
    let keys = [
        "/a/c",
        "/a",
        "/ab",
        "/a/b/deep",
        "/a/a",
        "/b/a",
        "/a/",
        "/a0",
        "/A/a",
    ];
    let mut revs = std::collections::HashMap::new();
    for k in keys {
        revs.insert(k, store.put(k, Bytes::from(format!("v{k}"))).await.unwrap());
    }
    let got = store.list("/a/").await.unwrap();
    let got_keys: Vec<&str> = got.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(got_keys, ["/a/", "/a/a", "/a/b/deep", "/a/c"]);
    for kv in &got {
        assert_eq!(kv.value, Bytes::from(format!("v{}", kv.key)));
        assert_eq!(kv.mod_revision, revs[kv.key.as_str()], "{}", kv.key);
    }

    let got: Vec<String> = store
        .list("/a")
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(
        got,
        ["/a", "/a/", "/a/a", "/a/b/deep", "/a/c", "/a0", "/ab"]
    );

    let all: Vec<String> = store
        .list("/")
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    let mut sorted: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
    sorted.sort();
    assert_eq!(all, sorted, "`/` lists everything, sorted bytewise");

    assert_eq!(store.list("/a/b/deep/").await.unwrap(), vec![]);
    assert_eq!(store.list("/zzz").await.unwrap(), vec![]);

    // Deleted keys disappear from the listing.
    assert!(store.delete("/a/a").await.unwrap());
    let got: Vec<String> = store
        .list("/a/")
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(got, ["/a/", "/a/b/deep", "/a/c"]);
}

/// A transaction applies all its ops at one revision if every compare holds,
/// and nothing at all otherwise.
pub async fn txn_all_or_nothing(store: Arc<dyn Store>) {
    let ra = store.put("/t/a", b("a1")).await.unwrap();
    let rb = store.put("/t/b", b("b1")).await.unwrap();
    let rdel = store.put("/t/del", b("gone soon")).await.unwrap();

    let ops = || {
        vec![
            TxnOp::Put {
                key: "/t/a".into(),
                value: b("a2"),
            },
            TxnOp::Put {
                key: "/t/new".into(),
                value: b("n"),
            },
            TxnOp::Delete {
                key: "/t/del".into(),
            },
            TxnOp::Delete {
                key: "/t/never-existed".into(),
            },
        ]
    };
    let compares = |b_expect: Option<Revision>| {
        vec![
            Compare::ModRevision {
                key: "/t/a".into(),
                expect: Some(ra),
            },
            Compare::ModRevision {
                key: "/t/b".into(),
                expect: b_expect,
            },
            Compare::ModRevision {
                key: "/t/new".into(),
                expect: None,
            },
        ]
    };

    // One failing compare among several: nothing applied.
    let e = store.txn(compares(None), ops()).await.unwrap_err();
    assert!(is_conflict_on(&e, "/t/b"), "{e:?}");
    assert_kv(&*store, "/t/a", b"a1", ra).await;
    assert_kv(&*store, "/t/del", b"gone soon", rdel).await;
    assert_eq!(store.get("/t/new").await.unwrap(), None);

    // All hold: everything applied, at the returned revision.
    let rt = store.txn(compares(Some(rb)), ops()).await.unwrap();
    assert!(rt > rdel);
    assert_kv(&*store, "/t/a", b"a2", rt).await;
    assert_kv(&*store, "/t/new", b"n", rt).await;
    assert_kv(&*store, "/t/b", b"b1", rb).await;
    assert_eq!(store.get("/t/del").await.unwrap(), None);
    assert_eq!(store.get("/t/never-existed").await.unwrap(), None);

    // The same transaction again: its compares are now stale.
    let e = store.txn(compares(Some(rb)), ops()).await.unwrap_err();
    assert!(is_conflict_on(&e, "/t/a"), "{e:?}");
    assert_kv(&*store, "/t/a", b"a2", rt).await;

    // Compares only (a consistent check), and no compares (a plain batch).
    store
        .txn(
            vec![Compare::ModRevision {
                key: "/t/a".into(),
                expect: Some(rt),
            }],
            vec![],
        )
        .await
        .unwrap();
    let rt2 = store
        .txn(
            vec![],
            vec![
                TxnOp::Put {
                    key: "/t/x".into(),
                    value: b("x"),
                },
                TxnOp::Put {
                    key: "/t/y".into(),
                    value: b("y"),
                },
            ],
        )
        .await
        .unwrap();
    assert!(rt2 > rt);
    assert_kv(&*store, "/t/x", b"x", rt2).await;
    assert_kv(&*store, "/t/y", b"y", rt2).await;

    // A compare and a write on a key with `expect: Some(Revision(0))` never holds.
    let e = store
        .txn(
            vec![Compare::ModRevision {
                key: "/t/zero".into(),
                expect: Some(Revision(0)),
            }],
            vec![TxnOp::Put {
                key: "/t/zero".into(),
                value: b("z"),
            }],
        )
        .await
        .unwrap_err();
    assert!(is_conflict_on(&e, "/t/zero"), "{e:?}");
    assert_eq!(store.get("/t/zero").await.unwrap(), None);
}

/// A failed transaction names the first compare that did not hold.
pub async fn txn_conflict_names_key(store: Arc<dyn Store>) {
    let r1 = store.put("/n/1", b("x")).await.unwrap();
    let r2 = store.put("/n/2", b("x")).await.unwrap();
    store.put("/n/2", b("y")).await.unwrap();
    let cmp = |key: &str, expect| Compare::ModRevision {
        key: key.into(),
        expect,
    };
    let op = TxnOp::Put {
        key: "/n/out".into(),
        value: b("x"),
    };

    let e = store
        .txn(
            vec![
                cmp("/n/1", Some(r1)),
                cmp("/n/2", Some(r2)),
                cmp("/n/3", Some(r1)),
            ],
            vec![op.clone()],
        )
        .await
        .unwrap_err();
    assert!(
        is_conflict_on(&e, "/n/2"),
        "second compare fails first: {e:?}"
    );

    let e = store
        .txn(
            vec![
                cmp("/n/1", Some(r1)),
                cmp("/n/absent", Some(r1)),
                cmp("/n/2", None),
            ],
            vec![op.clone()],
        )
        .await
        .unwrap_err();
    assert!(is_conflict_on(&e, "/n/absent"), "{e:?}");

    let e = store
        .txn(vec![cmp("/n/1", None)], vec![op.clone()])
        .await
        .unwrap_err();
    assert!(
        is_conflict_on(&e, "/n/1"),
        "present but expected absent: {e:?}"
    );
    assert_eq!(store.get("/n/out").await.unwrap(), None);
}

/// Writing one key twice in a transaction is rejected up front (etcd refuses
/// it, so no backend accepts it).
pub async fn txn_rejects_duplicate_keys(store: Arc<dyn Store>) {
    let e = store
        .txn(
            vec![],
            vec![
                TxnOp::Put {
                    key: "/dup".into(),
                    value: b("1"),
                },
                TxnOp::Put {
                    key: "/other".into(),
                    value: b("1"),
                },
                TxnOp::Delete { key: "/dup".into() },
            ],
        )
        .await
        .unwrap_err();
    assert!(is_invalid_key(&e, "/dup"), "{e:?}");
    assert_eq!(store.get("/dup").await.unwrap(), None);
    assert_eq!(store.get("/other").await.unwrap(), None);
}

/// A watcher sees puts and deletes under its prefix, in revision order, and
/// nothing outside it.
pub async fn watch_prefix(store: Arc<dyn Store>) {
    store.put("/w/before", b("old")).await.unwrap();
    let mut w = store.watch("/w/").await.unwrap();

    // Written right after `watch` returned: must be seen.
    let r1 = store.put("/w/a", b("1")).await.unwrap();
    store.put("/wx", b("outside")).await.unwrap();
    store.put("/w", b("outside")).await.unwrap();
    store.put("/other/w/", b("outside")).await.unwrap();
    let r2 = store.put("/w/b", b("2")).await.unwrap();
    let r3 = store.put("/w/a", b("3")).await.unwrap();
    assert!(store.delete("/w/a").await.unwrap());
    assert!(
        !store.delete("/w/missing").await.unwrap(),
        "no event for this"
    );
    assert!(store.delete("/wx").await.unwrap());
    let r4 = store.cas("/w/c", None, b("4")).await.unwrap();
    assert!(
        store.cas("/w/c", None, b("lost")).await.is_err(),
        "no event for this"
    );
    let r5 = store.put("/w/end", b("sentinel")).await.unwrap();

    expect_put(next_event(&mut w, "put /w/a").await, "/w/a", "1", r1);
    expect_put(next_event(&mut w, "put /w/b").await, "/w/b", "2", r2);
    expect_put(next_event(&mut w, "update /w/a").await, "/w/a", "3", r3);
    let rd = expect_delete(next_event(&mut w, "delete /w/a").await, "/w/a");
    assert!(
        r3 < rd && rd < r4,
        "delete revision {rd:?} between {r3:?} and {r4:?}"
    );
    expect_put(next_event(&mut w, "cas /w/c").await, "/w/c", "4", r4);
    // The sentinel comes next: nothing from outside the prefix slipped in.
    expect_put(
        next_event(&mut w, "sentinel").await,
        "/w/end",
        "sentinel",
        r5,
    );

    // Dropping a watcher cancels it and leaves the store working.
    drop(w);
    store.put("/w/after-drop", b("x")).await.unwrap();
    assert!(store.get("/w/after-drop").await.unwrap().is_some());
}

/// A transaction's ops reach watchers in op order at one revision; several
/// watchers each get their own copy; a key used as a prefix works.
pub async fn watch_txn_and_many_watchers(store: Arc<dyn Store>) {
    store.put("/m/b", b("old")).await.unwrap();
    let mut all = store.watch("/m/").await.unwrap();
    let mut all2 = store.watch("/m/").await.unwrap();
    let mut only_a = store.watch("/m/a").await.unwrap();

    let rt = store
        .txn(
            vec![],
            vec![
                TxnOp::Put {
                    key: "/m/a".into(),
                    value: b("1"),
                },
                TxnOp::Delete { key: "/m/b".into() },
                TxnOp::Put {
                    key: "/zz".into(),
                    value: b("outside"),
                },
                TxnOp::Delete {
                    key: "/m/never".into(),
                },
                TxnOp::Put {
                    key: "/m/ab".into(),
                    value: b("2"),
                },
            ],
        )
        .await
        .unwrap();
    let r_end = store.put("/m/end", b("sentinel")).await.unwrap();

    for w in [&mut all, &mut all2] {
        expect_put(next_event(w, "txn put /m/a").await, "/m/a", "1", rt);
        let rd = expect_delete(next_event(w, "txn delete /m/b").await, "/m/b");
        assert_eq!(rd, rt, "a delete in a txn has the txn's revision");
        expect_put(next_event(w, "txn put /m/ab").await, "/m/ab", "2", rt);
        expect_put(next_event(w, "sentinel").await, "/m/end", "sentinel", r_end);
    }
    expect_put(next_event(&mut only_a, "put /m/a").await, "/m/a", "1", rt);
    expect_put(next_event(&mut only_a, "put /m/ab").await, "/m/ab", "2", rt);
    let r_a = store.put("/m/a", b("sentinel")).await.unwrap();
    expect_put(
        next_event(&mut only_a, "sentinel").await,
        "/m/a",
        "sentinel",
        r_a,
    );
}

/// Every operation rejects an invalid key with [`StoreError::InvalidKey`]
/// naming it, before touching the store.
pub async fn invalid_keys(store: Arc<dyn Store>) {
    for bad in ["", "a", "no-slash/", "/nul\0inside"] {
        let check = |e: StoreError, op: &str| {
            assert!(is_invalid_key(&e, bad), "{op}({bad:?}): {e:?}");
        };
        check(store.get(bad).await.unwrap_err(), "get");
        check(store.put(bad, b("x")).await.unwrap_err(), "put");
        check(store.delete(bad).await.unwrap_err(), "delete");
        check(store.cas(bad, None, b("x")).await.unwrap_err(), "cas");
        check(store.list(bad).await.unwrap_err(), "list");
        match store.watch(bad).await {
            Ok(_) => panic!("watch({bad:?}) accepted"),
            Err(e) => check(e, "watch"),
        }
        let good_op = TxnOp::Put {
            key: "/good".into(),
            value: b("x"),
        };
        let e = store
            .txn(
                vec![Compare::ModRevision {
                    key: bad.into(),
                    expect: None,
                }],
                vec![good_op.clone()],
            )
            .await
            .unwrap_err();
        check(e, "txn compare");
        let e = store
            .txn(
                vec![],
                vec![good_op.clone(), TxnOp::Delete { key: bad.into() }],
            )
            .await
            .unwrap_err();
        check(e, "txn delete");
        let e = store
            .txn(
                vec![],
                vec![
                    good_op,
                    TxnOp::Put {
                        key: bad.into(),
                        value: b("x"),
                    },
                ],
            )
            .await
            .unwrap_err();
        check(e, "txn put");
    }
    assert_eq!(
        store.list("/").await.unwrap(),
        vec![],
        "nothing was written"
    );
}

/// 16 tasks increment one counter through get + cas: no update is lost.
pub async fn concurrent_cas_counter(store: Arc<dyn Store>) {
    const TASKS: usize = 16;
    const PER_TASK: usize = 8;
    let key = "/counter";
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            let mut conflicts = 0u64;
            while revs.len() < PER_TASK {
                let cur = store.get(key).await.expect("get counter");
                let (n, expect) = match &cur {
                    None => (0u64, None),
                    Some(kv) => {
                        let s = std::str::from_utf8(&kv.value).expect("utf-8 counter");
                        (
                            s.parse::<u64>().expect("numeric counter"),
                            Some(kv.mod_revision),
                        )
                    }
                };
                match store
                    .cas(key, expect, Bytes::from((n + 1).to_string()))
                    .await
                {
                    Ok(rev) => revs.push(rev),
                    Err(StoreError::Conflict { key: k }) => {
                        assert_eq!(k, key);
                        conflicts += 1;
                    }
                    Err(e) => panic!("cas failed: {e:?}"),
                }
            }
            (revs, conflicts)
        }));
    }
    let mut all_revs = Vec::new();
    for h in handles {
        let (revs, _conflicts) = h.await.expect("task panicked");
        all_revs.extend(revs);
    }
    let total = TASKS * PER_TASK;
    let kv = store.get(key).await.unwrap().expect("counter exists");
    assert_eq!(kv.value, Bytes::from(total.to_string()), "lost update");
    all_revs.sort();
    all_revs.dedup();
    assert_eq!(all_revs.len(), total, "two successful cas got one revision");
    assert_eq!(kv.mod_revision, *all_revs.last().unwrap());
}

fn pseudo_random(len: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        // xorshift64: cheap, deterministic, not compressible into a pattern.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

/// 1 MiB values round-trip through put, get, list, cas, txn and watch.
pub async fn large_values(store: Arc<dyn Store>) {
    const MIB: usize = 1 << 20;
    let v1 = pseudo_random(MIB, 1);
    let v2 = pseudo_random(MIB, 2);
    let v3 = pseudo_random(MIB, 3);
    let mut w = store.watch("/big/").await.unwrap();

    let r1 = store.put("/big/1", v1.clone()).await.unwrap();
    assert_kv(&*store, "/big/1", &v1, r1).await;
    let r2 = store.cas("/big/1", Some(r1), v2.clone()).await.unwrap();
    assert_kv(&*store, "/big/1", &v2, r2).await;
    let r3 = store
        .txn(
            vec![Compare::ModRevision {
                key: "/big/1".into(),
                expect: Some(r2),
            }],
            vec![TxnOp::Put {
                key: "/big/2".into(),
                value: v3.clone(),
            }],
        )
        .await
        .unwrap();
    assert_kv(&*store, "/big/2", &v3, r3).await;

    let listed = store.list("/big/").await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        listed[0].value == v2 && listed[1].value == v3,
        "listed values"
    );

    for (want, rev) in [(&v1, r1), (&v2, r2), (&v3, r3)] {
        match next_event(&mut w, "big put").await {
            WatchEvent::Put(kv) => {
                assert_eq!(kv.mod_revision, rev);
                assert!(kv.value == *want, "watched value at {rev:?}");
            }
            other => panic!("expected a put, got {other:?}"),
        }
    }
}

/// Campaigns for `election` in a spawned task, so that the check can watch it
/// wait.
fn spawn_campaign(
    store: &Arc<dyn Store>,
    election: &'static str,
    candidate: &'static str,
) -> tokio::task::JoinHandle<Result<Leadership, StoreError>> {
    let store = store.clone();
    tokio::spawn(async move { store.campaign(election, candidate, ELECTION_TTL).await })
}

/// Awaits a spawned campaign that must win within [`HANDOVER_TIMEOUT`].
async fn wins(
    campaign: &mut tokio::task::JoinHandle<Result<Leadership, StoreError>>,
    what: &str,
) -> Leadership {
    match tokio::time::timeout(HANDOVER_TIMEOUT, campaign).await {
        Ok(Ok(Ok(leadership))) => leadership,
        Ok(Ok(Err(e))) => panic!("{what}: campaign failed: {e:?}"),
        Ok(Err(e)) => panic!("{what}: campaign task failed: {e:?}"),
        Err(_) => panic!("{what}: not leader within {HANDOVER_TIMEOUT:?}"),
    }
}

/// Asserts that a spawned campaign is still waiting after [`STILL_WAITING`].
async fn still_waits(
    campaign: &mut tokio::task::JoinHandle<Result<Leadership, StoreError>>,
    what: &str,
) {
    if let Ok(r) = tokio::time::timeout(STILL_WAITING, campaign).await {
        panic!("{what}: campaign returned while another candidate leads: {r:?}");
    }
}

/// A fenced write: `value` to `key` only while `leader` leads.
async fn fenced_put(
    store: &dyn Store,
    leader: &Leadership,
    key: &str,
    value: &str,
) -> Result<Revision, StoreError> {
    store
        .txn(
            vec![leader.fence()],
            vec![TxnOp::Put {
                key: key.to_owned(),
                value: b(value),
            }],
        )
        .await
}

/// A lone candidate leads at once; `leader` reports it; its fence holds;
/// resigning leaves the election empty.
pub async fn election_single_candidate(store: Arc<dyn Store>) {
    assert_eq!(store.leader("driver").await.unwrap(), None, "nobody yet");
    let before = store.put("/before", b("x")).await.unwrap();
    let leader = tokio::time::timeout(
        HANDOVER_TIMEOUT,
        store.campaign("driver", "server-1", ELECTION_TTL),
    )
    .await
    .expect("an uncontested campaign returns at once")
    .unwrap();
    assert_eq!(leader.election(), "driver");
    assert_eq!(leader.candidate(), "server-1");
    assert_eq!(leader.key(), election_key("driver").unwrap());
    assert!(
        leader.revision() > before,
        "the fencing token is a fresh revision"
    );
    assert!(!leader.is_lost());
    assert_eq!(
        store.leader("driver").await.unwrap().as_deref(),
        Some("server-1")
    );
    assert_eq!(
        store.leader("other").await.unwrap(),
        None,
        "elections are independent"
    );
    // The leader key is a visible key at the fencing revision.
    assert_kv(&*store, leader.key(), b"server-1", leader.revision()).await;

    let r = fenced_put(&*store, &leader, "/ops/1", "done")
        .await
        .unwrap();
    assert_kv(&*store, "/ops/1", b"done", r).await;

    // A second election runs alongside.
    let other = store
        .campaign("other", "server-2", ELECTION_TTL)
        .await
        .unwrap();
    assert!(other.revision() > leader.revision());
    assert_eq!(
        store.leader("other").await.unwrap().as_deref(),
        Some("server-2")
    );

    leader.resign().await.unwrap();
    assert_eq!(store.leader("driver").await.unwrap(), None);
    assert_eq!(
        store.leader("other").await.unwrap().as_deref(),
        Some("server-2")
    );
    other.resign().await.unwrap();
    assert_eq!(store.list("/vinfra/").await.unwrap(), vec![], "no key left");
}

/// Bad election names, candidates and ttls are refused up front.
pub async fn election_rejects_bad_arguments(store: Arc<dyn Store>) {
    let bad = [
        ("", "c", ELECTION_TTL),
        ("a/b", "c", ELECTION_TTL),
        ("nul\0", "c", ELECTION_TTL),
        ("ok", "", ELECTION_TTL),
        ("ok", "c", Duration::ZERO),
    ];
    for (election, candidate, ttl) in bad {
        match store.campaign(election, candidate, ttl).await {
            Err(StoreError::InvalidCampaign { election: e, .. }) => assert_eq!(e, election),
            other => panic!("campaign({election:?}, {candidate:?}, {ttl:?}): {other:?}"),
        }
    }
    for election in ["", "a/b"] {
        let e = store.leader(election).await.unwrap_err();
        assert!(
            matches!(e, StoreError::InvalidCampaign { .. }),
            "leader({election:?}): {e:?}"
        );
    }
    assert_eq!(store.list("/").await.unwrap(), vec![], "nothing written");
}

/// A second candidate waits while the first leads, and leads once it
/// resigns, with a larger fencing token; the first one's fence then fails.
pub async fn election_second_waits_for_resign(store: Arc<dyn Store>) {
    let first = store
        .campaign("driver", "server-1", ELECTION_TTL)
        .await
        .unwrap();
    let mut second = spawn_campaign(&store, "driver", "server-2");
    still_waits(&mut second, "server-2").await;
    assert_eq!(
        store.leader("driver").await.unwrap().as_deref(),
        Some("server-1")
    );

    let first_fence = first.fence();
    let first_rev = first.revision();
    let lost = first.lost();
    first.resign().await.unwrap();
    tokio::time::timeout(HANDOVER_TIMEOUT, lost)
        .await
        .expect("lost() of a resigned leadership resolves");

    let second = wins(&mut second, "server-2 after server-1 resigned").await;
    assert!(
        second.revision() > first_rev,
        "fencing tokens grow: {:?} > {first_rev:?}",
        second.revision()
    );
    assert_eq!(
        store.leader("driver").await.unwrap().as_deref(),
        Some("server-2")
    );

    // The deposed leader's fenced write fails and changes nothing.
    let put = TxnOp::Put {
        key: "/ops/1".into(),
        value: b("stale"),
    };
    let e = store.txn(vec![first_fence], vec![put]).await.unwrap_err();
    assert!(is_conflict_on(&e, second.key()), "{e:?}");
    assert_eq!(store.get("/ops/1").await.unwrap(), None);
    fenced_put(&*store, &second, "/ops/1", "fresh")
        .await
        .unwrap();
    second.resign().await.unwrap();
}

/// Dropping a leadership without resigning releases it too.
pub async fn election_drop_releases(store: Arc<dyn Store>) {
    let first = store
        .campaign("driver", "server-1", ELECTION_TTL)
        .await
        .unwrap();
    let mut second = spawn_campaign(&store, "driver", "server-2");
    still_waits(&mut second, "server-2").await;
    drop(first);
    let second = wins(&mut second, "server-2 after server-1 was dropped").await;
    assert_eq!(
        store.leader("driver").await.unwrap().as_deref(),
        Some("server-2")
    );
    drop(second);
    wait_for_no_leader(&*store, "driver").await;
}

/// Polls `leader` until the election is empty.
async fn wait_for_no_leader(store: &dyn Store, election: &str) {
    let deadline = tokio::time::Instant::now() + HANDOVER_TIMEOUT;
    while store.leader(election).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{election} still has a leader after {HANDOVER_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A campaign that is cancelled while it waits never becomes leader later.
pub async fn election_cancelled_campaign_leaves_nothing(store: Arc<dyn Store>) {
    let first = store
        .campaign("driver", "server-1", ELECTION_TTL)
        .await
        .unwrap();
    let mut cancelled = spawn_campaign(&store, "driver", "server-2");
    still_waits(&mut cancelled, "server-2").await;
    cancelled.abort();
    assert!(cancelled.await.unwrap_err().is_cancelled());
    first.resign().await.unwrap();

    // Give a zombie candidacy the time it would need to take the key.
    tokio::time::sleep(STILL_WAITING).await;
    assert_eq!(store.leader("driver").await.unwrap(), None);
    let third = tokio::time::timeout(
        HANDOVER_TIMEOUT,
        store.campaign("driver", "server-3", ELECTION_TTL),
    )
    .await
    .expect("the election is free")
    .unwrap();
    third.resign().await.unwrap();
}

/// A leader whose key disappears (what an expired etcd lease does; an
/// operator can do it too) is told through `lost`, a waiting candidate takes
/// over, and the deposed leader's fenced writes fail.
pub async fn election_deleted_key_deposes_leader(store: Arc<dyn Store>) {
    let first = store
        .campaign("driver", "server-1", ELECTION_TTL)
        .await
        .unwrap();
    let mut second = spawn_campaign(&store, "driver", "server-2");
    still_waits(&mut second, "server-2").await;

    assert!(store.delete(first.key()).await.unwrap());
    tokio::time::timeout(HANDOVER_TIMEOUT, first.lost())
        .await
        .expect("lost fires when the key is deleted");
    assert!(first.is_lost());
    let second = wins(&mut second, "server-2 after server-1's key was deleted").await;
    assert!(second.revision() > first.revision());
    assert!(
        !second.is_lost(),
        "the new leader is not told the old one lost"
    );

    let e = fenced_put(&*store, &first, "/ops/1", "stale")
        .await
        .unwrap_err();
    assert!(is_conflict_on(&e, first.key()), "{e:?}");
    fenced_put(&*store, &second, "/ops/1", "fresh")
        .await
        .unwrap();

    // The deposed leader resigning must not remove the new leader's key.
    first.resign().await.unwrap();
    assert_eq!(
        store.leader("driver").await.unwrap().as_deref(),
        Some("server-2")
    );
    assert!(!second.is_lost());
    second.resign().await.unwrap();
}

/// Several candidates contending: never two leaders at once, every one leads
/// in turn, and each leader's fencing token is larger than the last one's.
pub async fn election_one_leader_at_a_time(store: Arc<dyn Store>) {
    const CANDIDATES: usize = 4;
    const TERMS: usize = 2;
    let leading = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..CANDIDATES {
        let (store, leading, tokens) = (store.clone(), leading.clone(), tokens.clone());
        tasks.push(tokio::spawn(async move {
            let name = format!("server-{c}");
            for _ in 0..TERMS {
                let leader = store
                    .campaign("driver", &name, ELECTION_TTL)
                    .await
                    .expect("campaign");
                let was = leading.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                assert_eq!(was, 0, "{name} leads alongside another leader");
                tokens.lock().expect("tokens lock").push(leader.revision());
                assert_eq!(
                    store.leader("driver").await.expect("leader").as_deref(),
                    Some(name.as_str())
                );
                fenced_put(&*store, &leader, "/ops/last", &name)
                    .await
                    .expect("the current leader's fenced write");
                leading.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                leader.resign().await.expect("resign");
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(HANDOVER_TIMEOUT * 2, t)
            .await
            .expect("all terms within the timeout")
            .expect("candidate task");
    }
    let tokens = tokens.lock().expect("tokens lock").clone();
    assert_eq!(tokens.len(), CANDIDATES * TERMS);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens grow from leader to leader: {tokens:?}"
    );
}
