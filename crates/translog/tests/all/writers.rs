//! Two servers appending to one log through the store's compare-and-swap: every
//! acknowledged entry gets its own index, and the result audits with both keys.

use std::collections::BTreeSet;
use std::sync::Arc;

use store::Store;
use translog::verify::{audit, TrustedKeys};
use translog::{LogConfig, Signer, TransLog};

const PREFIX: &str = "/vinfra/translog/w/";
const ORIGIN: &str = "vinfra.test/w";

async fn two_writers(a: Arc<dyn Store>, b: Arc<dyn Store>, per_writer: usize) {
    let (sa, _) = Signer::generate().unwrap();
    let (sb, _) = Signer::generate().unwrap();
    let mut keys = TrustedKeys::new();
    keys.add(sa.public_key());
    keys.add(sb.public_key());
    let la = TransLog::open(a, LogConfig::new(PREFIX, ORIGIN), sa)
        .await
        .unwrap();
    let lb = TransLog::open(b, LogConfig::new(PREFIX, ORIGIN), sb)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for (name, log) in [("a", la.clone()), ("b", lb.clone())] {
        for k in 0..per_writer {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let body = format!("{name}-{k}");
                (
                    log.append(body.clone().into_bytes()).await.unwrap().index,
                    body,
                )
            }));
        }
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.unwrap());
    }
    let indices: BTreeSet<u64> = acked.iter().map(|(i, _)| *i).collect();
    assert_eq!(indices.len(), 2 * per_writer, "an index was given twice");
    let raw = la.raw().await.unwrap();
    let audited = audit(PREFIX, ORIGIN, &keys, &raw, None).unwrap();
    assert_eq!(audited.head.size, 2 * per_writer as u64);
    for (i, body) in acked {
        assert_eq!(audited.entries[i as usize], body.as_bytes(), "entry {i}");
    }
    // Each writer sees the other's entries in its proofs.
    assert_eq!(lb.head().await.unwrap(), la.head().await.unwrap());
}

#[tokio::test]
async fn two_writers_on_one_memstore_interleave_without_loss() {
    let s: Arc<dyn Store> = Arc::new(store::testing::MemStore::new());
    two_writers(s.clone(), s, 100).await;
}

/// 300 appends queued at once per writer: more than etcd takes in one transaction, so
/// each writer must split its batches at the store's limit.
#[tokio::test]
async fn two_writers_on_etcd_interleave_without_loss() {
    let etcd = test_utils::EtcdFixture::spawn().await.unwrap();
    let ep = vec![etcd.endpoint()];
    let a = store_etcd::EtcdStore::connect(&ep, None).await.unwrap();
    let b = store_etcd::EtcdStore::connect(&ep, None).await.unwrap();
    two_writers(Arc::new(a), Arc::new(b), 300).await;
}
