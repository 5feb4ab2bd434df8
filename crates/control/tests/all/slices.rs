//! The slice ledger's reconciliation: an association committed without its ledger
//! entry (the server died between the commit and the append) is found by the sweep and
//! its entry appended, rebuilt from the record; one whose entry was appended but whose
//! record was not updated is matched to that entry, not logged twice. Afterwards the
//! ledger audits with the writer's key and every entry recomputes.

use std::sync::Arc;

use control::records::keys;
use control::slices::{recheck, LedgerEntry};
use control::{Control, Scope};
use model::slices::{Association, CreateNsi, Snssai};
use model::TenantId;
use store::testing::MemStore;
use store::Store;

/// What `associate` commits before it appends: the record, not yet logged.
async fn committed_unlogged(c: &Control, tenant: TenantId, client: &str) -> Association {
    let snssai = Snssai { sst: 1, sd: None };
    let (chosen, candidates, _) = c.select_nsi(Scope::Tenant(tenant), &snssai).await.unwrap();
    let a = Association {
        id: uuid::Uuid::new_v4().to_string(),
        tenant,
        client: client.into(),
        snssai,
        nsi: chosen.nsi.clone(),
        nsi_name: chosen.name.clone(),
        forecast_hash: control::slices::json_hash(&candidates),
        candidates,
        ledger_index: 0,
        logged: false,
        created_at: 1_000,
    };
    c.store()
        .put(
            &format!("{}{}", keys::SLICE_ASSOCIATIONS, a.id),
            serde_json::to_vec(&a).unwrap().into(),
        )
        .await
        .unwrap();
    a
}

#[tokio::test]
async fn associations_left_without_their_entry_are_logged_once_by_the_sweep() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let c = Control::new(store.clone(), 6_000);
    let tenant = TenantId::new_random();
    for n in ["a1", "a2"] {
        let v = CreateNsi {
            name: n.into(),
            snssai: Snssai { sst: 1, sd: None },
            provider: "site-a".into(),
            capacity_mbps: 100,
            max_clients: 10,
            ns_instance: None,
            tenant: None,
        }
        .validate()
        .unwrap();
        c.create_nsi(tenant, v).await.unwrap();
    }
    let normal = c
        .associate(tenant, &Snssai { sst: 1, sd: None }, "ue-0".into())
        .await
        .unwrap();
    assert!(normal.logged);
    // Nothing to do on a consistent ledger.
    assert_eq!(c.reconcile_slice_ledger(0).await.unwrap(), (0, 0));

    // Died before the append.
    let lost = committed_unlogged(&c, tenant, "ue-1").await;
    // Died after the append, before the record's update.
    let half = committed_unlogged(&c, tenant, "ue-2").await;
    let entry = LedgerEntry::Association {
        association: half.id.clone(),
        tenant,
        client: half.client.clone(),
        snssai: half.snssai.clone(),
        nsi: half.nsi.clone(),
        nsi_name: half.nsi_name.clone(),
        candidates: half.candidates.clone(),
        forecast_hash: half.forecast_hash.clone(),
        at_ms: half.created_at,
    };
    let ledger = c.slice_ledger().await.unwrap();
    let half_index = ledger
        .append(serde_json::to_vec(&entry).unwrap())
        .await
        .unwrap()
        .index;

    // Younger than the grace: left to the server that may still be appending them.
    assert_eq!(
        c.reconcile_slice_ledger(u64::MAX / 2).await.unwrap(),
        (0, 0)
    );
    // One appended, one found; a second sweep has nothing left.
    assert_eq!(c.reconcile_slice_ledger(0).await.unwrap(), (1, 1));
    assert_eq!(c.reconcile_slice_ledger(0).await.unwrap(), (0, 0));

    let all = c.slice_associations(Scope::All).await.unwrap();
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|a| a.logged), "{all:?}");
    let by_id = |id: &str| all.iter().find(|a| a.id == id).unwrap();
    assert_eq!(by_id(&half.id).ledger_index, half_index);
    assert_eq!(by_id(&lost.id).ledger_index, 2);

    // The ledger audits, every entry recomputes, and each association's entry is the
    // one its record points at — exactly once.
    let raw = ledger.raw().await.unwrap();
    let signer_keys: Vec<Vec<u8>> = raw
        .iter()
        .filter(|(k, _)| k.contains("/keys/"))
        .map(|(_, v)| translog::hash::from_hex(std::str::from_utf8(v).unwrap()).unwrap())
        .collect();
    let mut trusted = translog::verify::TrustedKeys::new();
    for k in &signer_keys {
        trusted.add(k);
    }
    let audited = translog::verify::audit(
        keys::SLICE_LEDGER,
        control::slices::LEDGER_ORIGIN,
        &trusted,
        &raw,
        None,
    )
    .unwrap();
    assert_eq!(audited.entries.len(), 3);
    for a in &all {
        let body = &audited.entries[usize::try_from(a.ledger_index).unwrap()];
        match recheck(body).unwrap() {
            LedgerEntry::Association { association, .. } => assert_eq!(association, a.id),
            e => panic!("{e:?}"),
        }
    }
}

/// The slice sampler of the leading server reads the other servers' counters from the
/// store: their published CPU reports (fresh ones only) and their controllers' saved
/// traffic snapshots, never its own; a record that does not parse is reported, not
/// fatal.
#[tokio::test]
async fn the_leader_reads_the_other_servers_counters_from_the_store() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let (a, b, c) = (
        Control::new(store.clone(), 6_000),
        Control::new(store.clone(), 6_000),
        Control::new(store.clone(), 6_000),
    );
    b.publish_slice_cpu("server-b", [("vm1".to_string(), 700)].into())
        .await
        .unwrap();
    c.publish_slice_cpu("server-c", [("vm2".to_string(), 90)].into())
        .await
        .unwrap();
    a.publish_slice_cpu("server-a", [("vm1".to_string(), 5)].into())
        .await
        .unwrap();
    for (ctl, server) in [(&a, "server-a"), (&b, "server-b")] {
        ctl.save_traffic_snapshot("east", server, format!("snapshot of {server}").into())
            .await
            .unwrap();
    }
    let p = a.peer_counters("server-a", 0).await.unwrap();
    let mut cpu: Vec<_> = p.cpu.iter().flat_map(|r| r.cpu_ms.clone()).collect();
    cpu.sort();
    assert_eq!(cpu, vec![("vm1".to_string(), 700), ("vm2".to_string(), 90)]);
    let traffic: Vec<_> = p.traffic.iter().map(|(_, v)| v.clone()).collect();
    assert_eq!(traffic, vec![bytes::Bytes::from("snapshot of server-b")]);
    assert!(p.unreadable.is_empty());

    // Reports older than the limit are from servers that stopped: left out.
    let later = control::now_ms() + 60_000;
    assert!(a
        .peer_counters("server-a", later)
        .await
        .unwrap()
        .cpu
        .is_empty());

    // A record that is not a report is named, and the others still come.
    store
        .put(
            &format!("{}{}", keys::SLICE_CPU, model::hex(b"server-d")),
            bytes::Bytes::from_static(b"{not json"),
        )
        .await
        .unwrap();
    let p = a.peer_counters("server-a", 0).await.unwrap();
    assert_eq!(p.cpu.len(), 2);
    assert_eq!(p.unreadable.len(), 1, "{:?}", p.unreadable);
    assert!(
        p.unreadable[0].contains(keys::SLICE_CPU),
        "{:?}",
        p.unreadable
    );
}
