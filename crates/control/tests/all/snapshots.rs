//! A migration's cache snapshot lives in the store, not in a server's memory: written
//! through one control layer, it is read whole through another over the same store (a
//! second server, or the first one restarted); a second upload replaces it; nothing of it
//! is left once the migration ends.

use std::sync::Arc;

use control::snapshots::{CHUNK, MAX_SNAPSHOT, PREFIX};
use control::{Control, Scope, SnapshotError};
use model::{MigrationState, TenantId};
use store::testing::MemStore;
use store::Store;

use crate::drain::{host, n, report, switch_over, vm};

async fn read_all(c: &Control, mig: &str) -> Vec<u8> {
    let snap = c.snapshot(mig).await.unwrap();
    let mut out = Vec::new();
    for i in 0..snap.chunks() {
        out.extend_from_slice(&snap.chunk(i).await.unwrap());
    }
    assert_eq!(out.len() as u64, snap.len());
    out
}

/// Bytes that differ from chunk to chunk, so that a chunk out of order shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

async fn upload(c: &Control, mig: &str, data: &[u8]) {
    let mut up = c.begin_snapshot(mig).await.unwrap();
    // In pieces that do not line up with the chunks, as a body arrives.
    for piece in data.chunks(100_003) {
        up.write(piece).await.unwrap();
    }
    up.finish().await.unwrap();
}

#[tokio::test]
async fn a_snapshot_written_through_one_server_is_read_through_another_and_gone_at_the_end() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    for h in ["h1", "h2"] {
        host(store.as_ref(), h).await;
    }
    let v = vm(store.as_ref(), TenantId::new_random(), "a", "h1").await;
    let one = Control::new(store.clone(), 6_000);
    let m = one
        .start_migration(Scope::All, &v.to_string(), &n("h2"), "heat", true)
        .await
        .unwrap();
    let mig = m.id.to_string();

    // Nothing yet: the destination is told so (it asks again later).
    assert!(matches!(
        one.snapshot(&mig).await,
        Err(SnapshotError::NotUploaded(_))
    ));
    let first = pattern(2 * CHUNK + 12_345, 1);
    upload(&one, &mig, &first).await;
    // Another server, or this one after a restart: a fresh control layer, same store.
    let two = Control::new(store.clone(), 6_000);
    assert_eq!(two.snapshot(&mig).await.unwrap().chunks(), 3);
    assert_eq!(read_all(&two, &mig).await, first);

    // Pre-copy uploads again at switch-over: later readers get the second one.
    let second = pattern(CHUNK / 2, 2);
    upload(&two, &mig, &second).await;
    assert_eq!(read_all(&one, &mig).await, second);

    // Over the limit: refused, and what that upload wrote is removed at once.
    let mut up = one.begin_snapshot(&mig).await.unwrap();
    up.write(&pattern(CHUNK * 3, 3)).await.unwrap();
    let e = up.write(&vec![0u8; MAX_SNAPSHOT]).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("snapshot: exceeds the limit of {MAX_SNAPSHOT} bytes")
    );
    up.abandon().await;
    assert_eq!(read_all(&one, &mig).await, second, "the whole one stays");

    // The migration ends: every upload and the head go.
    assert!(!store.list(PREFIX).await.unwrap().is_empty());
    switch_over(&one, &mig).await;
    two.report_migration(&mig, &n("h2"), &report("h2", MigrationState::Completed))
        .await
        .unwrap();
    let left: Vec<String> = store
        .list(PREFIX)
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let e = one.begin_snapshot(&mig).await.unwrap_err().to_string();
    assert_eq!(e, format!("migration {mig} is completed"));
}
