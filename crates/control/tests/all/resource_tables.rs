//! The per-host resource table limit holds under concurrent creates: the count is
//! checked inside the create transaction. The store's `list` is slowed so that
//! every create counts the same tables before any of them commits (a count taken
//! outside the transaction would let all of them through).

use std::sync::Arc;
use std::time::Duration;

use control::ResourceTableError;
use control::{Control, CreateVmError, Scope};
use model::resource_tables::{ValidTableSpec, MAX_TABLES_PER_HOST};
use model::TenantId;
use store::testing::MemStore;
use store::{Compare, KeyValue, Leadership, Revision, Store, StoreError, TxnOp, WatchStream};

use crate::drain::{host, image, n, small};

/// A [`MemStore`] whose `list` takes a while, as an etcd round trip does.
struct SlowList(MemStore);

#[async_trait::async_trait]
impl Store for SlowList {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.0.get(key).await
    }
    async fn put(&self, key: &str, value: bytes::Bytes) -> Result<Revision, StoreError> {
        self.0.put(key, value).await
    }
    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.0.delete(key).await
    }
    async fn cas(
        &self,
        key: &str,
        expect: Option<Revision>,
        value: bytes::Bytes,
    ) -> Result<Revision, StoreError> {
        self.0.cas(key, expect, value).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let r = self.0.list(prefix).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        r
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<Revision, StoreError> {
        self.0.txn(compares, ops).await
    }
    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        self.0.watch(prefix).await
    }
    async fn campaign(
        &self,
        election: &str,
        candidate: &str,
        ttl: Duration,
    ) -> Result<Leadership, StoreError> {
        self.0.campaign(election, candidate, ttl).await
    }
}

fn spec(name: &str) -> ValidTableSpec {
    ValidTableSpec {
        name: n(name),
        entries: 4,
        entry_size: 8,
        max_grant_ms: 1000,
        tenant: None,
    }
}

#[tokio::test]
async fn concurrent_creates_never_exceed_the_per_host_limit() {
    let store: Arc<dyn Store> = Arc::new(SlowList(MemStore::new()));
    host(store.as_ref(), "h1").await;
    let c = Control::new(store.clone(), 6_000);
    let (a, b) = (TenantId::new_random(), TenantId::new_random());
    let below = MAX_TABLES_PER_HOST - 4;
    for i in 0..below {
        c.create_resource_table(a, &n("h1"), spec(&format!("t{i}")))
            .await
            .unwrap();
    }
    // Twelve creates at once, two tenants, for the last four places.
    let tries = (0..12).map(|i| {
        let c = &c;
        let tenant = if i % 2 == 0 { a } else { b };
        async move {
            c.create_resource_table(tenant, &n("h1"), spec(&format!("r{i}")))
                .await
        }
    });
    let results = futures_util::future::join_all(tries).await;
    let made = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(made, 4, "{results:?}");
    for r in &results {
        match r {
            Ok(_) => {}
            Err(ResourceTableError::TooMany { limit, .. }) => {
                assert_eq!(*limit, MAX_TABLES_PER_HOST)
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    let listed = store
        .list(&control::records::keys::resource_tables(&n("h1")))
        .await
        .unwrap();
    assert_eq!(listed.len(), MAX_TABLES_PER_HOST);
    // A name taken is still a name conflict, not a count race.
    c.delete_resource_table(control::Scope::Tenant(a), &n("h1"), "t0")
        .await
        .unwrap();
    let e = c
        .create_resource_table(a, &n("h1"), spec("t1"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    c.create_resource_table(a, &n("h1"), spec("t0"))
        .await
        .unwrap();
}

/// A VM create naming a table and that table's delete, racing (the store's `list`
/// slowed so that each reads before the other commits): exactly one of them wins,
/// never both (a VM naming a deleted table) and never neither.
#[tokio::test]
async fn a_table_delete_and_a_vm_naming_it_never_both_commit() {
    let store: Arc<dyn Store> = Arc::new(SlowList(MemStore::new()));
    image(store.as_ref()).await;
    let c = Control::new(store.clone(), 6_000);
    let tenant = TenantId::new_random();
    let (mut vms_won, mut deletes_won) = (0, 0);
    for round in 0..12u64 {
        // A host per round: each VM that wins keeps its room.
        let h = format!("h{round}");
        host(store.as_ref(), &h).await;
        let table = format!("t{round}");
        c.create_resource_table(tenant, &n(&h), spec(&table))
            .await
            .unwrap();
        let mut req = small(&format!("v{round}"), None);
        req.memory_mib = 64;
        req.resource_tables = vec![n(&table)];
        let h1 = n(&h);
        let (vm, del) = tokio::join!(c.create_vm(tenant, &req), async {
            // Staggered, so that the delete lands before, inside and after the
            // create's reads and transaction in different rounds.
            tokio::time::sleep(Duration::from_millis(round * 15)).await;
            c.delete_resource_table(Scope::Tenant(tenant), &h1, &table)
                .await
        });
        match (vm, del) {
            (Ok(v), Err(ResourceTableError::InUse { vms, .. })) => {
                assert_eq!(vms, [v.name.to_string()]);
                vms_won += 1;
            }
            (Err(CreateVmError::Tables(why)), Ok(())) => {
                assert!(why.contains(&format!("no resource table {table}")), "{why}");
                deletes_won += 1;
            }
            (vm, del) => panic!("round {round}: vm {vm:?}, delete {del:?}"),
        }
    }
    // Both orders happen (which one depends on the scheduler, not asserted).
    eprintln!("vm won {vms_won}, delete won {deletes_won}");
}
