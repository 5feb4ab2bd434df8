//! Opening files that are not (our) redb databases fails clearly, naming the
//! path, and leaves the file alone.

use std::path::Path;

use store::Store;
use store_redb::RedbStore;

fn open_err(path: &Path) -> String {
    let e = RedbStore::open(path).expect_err("open must fail");
    let msg = model::error_chain(&e);
    assert!(
        msg.contains(&path.display().to_string()),
        "error does not name {}: {msg}",
        path.display()
    );
    msg
}

#[test]
fn not_a_database() {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in [
        ("short", b"hello".to_vec()),
        (
            "text",
            "some notes, not a database\n".repeat(500).into_bytes(),
        ),
        ("zeros", vec![0u8; 64 * 1024]),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, &content).unwrap();
        let msg = open_err(&path);
        eprintln!("{name}: {msg}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            content,
            "{name} was modified"
        );
    }
}

#[tokio::test]
async fn corrupt_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    {
        let store = RedbStore::open(&path).unwrap();
        store.put("/k", "v".into()).await.unwrap();
    }
    let mut bytes = std::fs::read(&path).unwrap();
    // Smash the header (magic number and god byte).
    bytes[..64].fill(0xAB);
    std::fs::write(&path, &bytes).unwrap();
    let msg = open_err(&path);
    eprintln!("{msg}");
}

#[test]
fn directory_and_missing_parent() {
    let dir = tempfile::tempdir().unwrap();
    open_err(dir.path());
    open_err(&dir.path().join("no/such/dir/state.redb"));
}

#[test]
fn already_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let _first = RedbStore::open(&path).unwrap();
    let msg = open_err(&path);
    assert!(msg.contains("already open"), "{msg}");
}

#[test]
fn foreign_redb_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("theirs");
            let mut t = tx.open_table(def).unwrap();
            t.insert(1, 2).unwrap();
        }
        tx.commit().unwrap();
    }
    let msg = open_err(&path);
    assert!(msg.contains("format marker"), "{msg}");
}

#[tokio::test]
async fn reopen_keeps_data_and_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let r1 = {
        let store = RedbStore::open(&path).unwrap();
        store.put("/k", "v".into()).await.unwrap()
    };
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.get("/k").await.unwrap().unwrap().mod_revision, r1);
    assert!(store.put("/k2", "v".into()).await.unwrap() > r1);
    assert_eq!(store.path(), path);
}

/// A leader key left by a process that died is cleared on open, so the next
/// campaign does not wait for a leader that will never resign; other keys stay.
#[tokio::test]
async fn stale_leader_key_is_cleared_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let key = store::election_key("driver").unwrap();
    {
        let store = RedbStore::open(&path).unwrap();
        // What a crashed leader leaves behind.
        store.put(&key, "server-dead".into()).await.unwrap();
        store.put("/vinfra/vms/a", "vm".into()).await.unwrap();
        assert_eq!(
            store.leader("driver").await.unwrap().as_deref(),
            Some("server-dead")
        );
    }
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.leader("driver").await.unwrap(), None);
    assert!(store.get("/vinfra/vms/a").await.unwrap().is_some());
    let leader = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        store.campaign("driver", "server-new", std::time::Duration::from_secs(5)),
    )
    .await
    .expect("the election is free after the reopen")
    .unwrap();
    assert_eq!(
        store.leader("driver").await.unwrap().as_deref(),
        Some("server-new")
    );
    leader.resign().await.unwrap();
}
