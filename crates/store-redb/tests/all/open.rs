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
