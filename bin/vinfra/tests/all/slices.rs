//! Network slices end to end through the CLI: two servers on one etcd (each signing
//! the slice ledger with its own key, the ledger totally ordered by the store's
//! compare-and-swap), associations following measured load, `vinfra ledger verify`
//! recomputing every entry, and catching a tampered or rolled-back ledger in etcd.

use std::sync::Arc;

use bytes::Bytes;
use store::Store;

use crate::harness::{cli, Server};

fn ok(s: &Server, args: &[&str]) -> String {
    let (ok, out, err) = cli(s, &s.admin_token(), args);
    assert!(ok, "vinfra {args:?} failed: {out}{err}");
    out
}

fn public_key_hex(s: &Server) -> String {
    let pkcs8 = std::fs::read(s.dir.path().join("ledger.key")).unwrap();
    let signer = translog::Signer::from_pkcs8(&pkcs8).unwrap();
    translog::hash::to_hex(signer.public_key())
}

#[tokio::test]
async fn two_servers_one_ledger_associations_follow_load_and_tampering_is_caught() {
    let etcd = test_utils::EtcdFixture::spawn().await.expect("etcd");
    let store = format!("etcd:{}", etcd.endpoint());
    let dir = || {
        tempfile::Builder::new()
            .prefix("vs")
            .tempdir_in("/tmp")
            .unwrap()
    };
    let one = Server::start_with(dir(), store.clone()).await;
    let d = dir();
    std::fs::copy(
        one.dir.path().join("admin-token"),
        d.path().join("admin-token"),
    )
    .unwrap();
    let two = Server::start_with(d, store).await;

    for n in ["a1", "a2", "a3"] {
        ok(
            &one,
            &[
                "slice",
                "create",
                n,
                "--sst",
                "1",
                "--provider",
                "site-a",
                "--capacity-mbps",
                "100",
            ],
        );
    }
    let first = ok(&two, &["-o", "json", "slice", "associate", "embb", "ue-1"]);
    assert!(first.contains("\"nsi_name\": \"a1\""), "{first}");
    ok(&one, &["slice", "loads", "a1=80", "a2=50", "a3=10"]);
    ok(&two, &["slice", "loads", "a1=82", "a2=48", "a3=12"]);
    let second = ok(&one, &["-o", "json", "slice", "associate", "embb", "ue-2"]);
    assert!(second.contains("\"nsi_name\": \"a3\""), "{second}");
    let third = ok(&two, &["-o", "json", "slice", "associate", "1", "ue-3"]);
    assert!(third.contains("\"nsi_name\": \"a3\""), "{third}");
    let list = ok(&one, &["slice", "list"]);
    assert!(list.contains("a3") && list.contains("2/100"), "{list}");

    // Both servers' keys pinned: the audit trusts nothing the servers say.
    let (k1, k2) = (public_key_hex(&one), public_key_hex(&two));
    let witness = one.dir.path().join("witness.json");
    let w = witness.to_str().unwrap();
    let verify = |s: &Server| {
        cli(
            s,
            &s.admin_token(),
            &[
                "ledger",
                "verify",
                "--key",
                &k1,
                "--key",
                &k2,
                "--witness",
                w,
            ],
        )
    };
    let (good, out, err) = verify(&two);
    assert!(good, "{out}{err}");
    assert!(
        out.contains("ledger verified: 5 entries (3 associations, 2 allocations recomputed)"),
        "{out}"
    );
    let proof = ok(&one, &["ledger", "proof", "3"]);
    assert!(proof.contains("verified"), "{proof}");

    // Tampering in etcd behind the servers' backs.
    let raw = store_etcd::EtcdStore::connect(&[etcd.endpoint()], None)
        .await
        .unwrap();
    let raw: Arc<dyn Store> = Arc::new(raw);
    let prefix = control::records::keys::SLICE_LEDGER;
    let entry = format!("{prefix}entries/{:020}", 1);
    let original = raw.get(&entry).await.unwrap().unwrap().value;
    let mut forged = original.to_vec();
    let at = forged.len() - 3;
    forged[at] ^= 1;
    raw.put(&entry, Bytes::from(forged)).await.unwrap();
    let (good, out, err) = verify(&one);
    assert!(!good, "a flipped entry verified: {out}");
    assert!(err.contains("entry 1"), "{err}");
    raw.put(&entry, original).await.unwrap();
    assert!(verify(&one).0, "restored ledger refused");

    // Roll back: drop the last entry and put the previous checkpoint back as head.
    let cps = raw.list(&format!("{prefix}checkpoints/")).await.unwrap();
    let prev = &cps[cps.len() - 2];
    raw.delete(&format!("{prefix}entries/{:020}", 4))
        .await
        .unwrap();
    raw.delete(&cps[cps.len() - 1].key).await.unwrap();
    raw.put(&format!("{prefix}head"), prev.value.clone())
        .await
        .unwrap();
    let (good, _, err) = verify(&two);
    assert!(!good, "a rolled-back ledger verified");
    assert!(err.contains("smaller than the witnessed size"), "{err}");
}
