//! Network slices through the router: NSIs, associations that follow the forecast,
//! refusals with reasons, the NSSF selection surface, and a ledger an auditor
//! verifies and recomputes from the raw keys alone.

use axum::http::StatusCode;
use serde_json::{json, Value};
use translog::hash::{from_hex, hash_from_hex};
use translog::verify::{audit, verify_consistency, verify_inclusion, TrustedKeys};

use crate::harness::App;

async fn nsi(app: &App, token: &str, name: &str, sst: u8, max_clients: u32) -> Value {
    let r = app
        .post(
            "/v1/nsis",
            token,
            json!({"name": name, "snssai": {"sst": sst}, "provider": "site-a",
                   "capacity_mbps": 100, "max_clients": max_clients}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.json()
}

async fn associate(app: &App, token: &str, ty: &str, client: &str) -> Value {
    let r = app
        .post(
            &format!("/v1/slices/{ty}/associations"),
            token,
            json!({"client": client}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.json()
}

#[tokio::test]
async fn associations_follow_the_forecast_and_the_ledger_recomputes() {
    let app = App::new().await;
    let a = app.tenant("slices-a").await;
    let b = app.tenant("slices-b").await;
    let a1 = nsi(&app, &a, "a1", 1, 10).await;
    let a2 = nsi(&app, &a, "a2", 1, 10).await;
    let a3 = nsi(&app, &a, "a3", 1, 1).await;
    nsi(&app, &a, "u1", 2, 10).await;

    // Nothing measured yet: every utilization is 0, the name breaks the tie.
    let first = associate(&app, &a, "embb", "ue-1").await;
    assert_eq!(first["nsi"], a1["id"]);
    assert_eq!(first["candidates"].as_array().unwrap().len(), 3);

    // Load measured: a1 busy, a2 half, a3 idle. The next client goes to a3 (lowest
    // forecast), the one after to a2 (a3 is full).
    for _ in 0..3 {
        let r = app
            .post(
                "/v1/slice-loads",
                &app.admin,
                json!({"loads": {"a1": 80.0, "a2": 50.0, "a3": 10.0}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.json()["allocations"].as_array().unwrap().len(), 1);
    }
    let listed = app.get("/v1/nsis/a1", &a).await.json();
    assert_eq!(listed["measured_mbps"], 80.0);
    assert!(
        listed["allocated_mbps"].as_f64().unwrap() >= 80.0,
        "{listed}"
    );
    let second = associate(&app, &a, "1", "ue-2").await;
    assert_eq!(second["nsi"], a3["id"], "{second}");
    let third = associate(&app, &a, "1", "ue-3").await;
    assert_eq!(third["nsi"], a2["id"], "{third}");

    // Another tenant has no NSI of the type; a type nobody serves; full NSIs.
    app.post("/v1/slices/1/associations", &b, json!({"client": "ue-9"}))
        .await
        .problem(409, "no network slice instance serves S-NSSAI 1");
    app.post(
        "/v1/slices/urllc-00000a/associations",
        &a,
        json!({"client": "ue-9"}),
    )
    .await
    .problem(409, "no network slice instance serves");
    app.post("/v1/slices/999/associations", &a, json!({"client": "ue-9"}))
        .await
        .problem(422, "type");
    app.post("/v1/slices/1/associations", &a, json!({"client": "-bad"}))
        .await
        .problem(422, "client");
    app.post(
        "/v1/slice-loads",
        &app.admin,
        json!({"loads": {"a1": 1000.0, "a2": 1000.0}}),
    )
    .await;
    app.post("/v1/slices/1/associations", &a, json!({"client": "ue-10"}))
        .await
        .problem(409, "a3 has 1 of 1 clients");

    // The NSSF surface: a PDU session gets the NSI a selection gives now.
    let q = |k: &str, v: Value| {
        format!(
            "/nnssf-nsselection/v2/network-slice-information?nf-type=AMF&nf-id=amf-1&{k}={}",
            urlencode(&v.to_string())
        )
    };
    app.post(
        "/v1/slice-loads",
        &app.admin,
        json!({"loads": {"a1": 5.0, "a2": 60.0}}),
    )
    .await;
    let r = app
        .get(
            &q(
                "slice-info-request-for-pdu-session",
                json!({"sNssai": {"sst": 1}, "roamingIndication": "NON_ROAMING"}),
            ),
            &a,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let pdu = r.json();
    assert!(pdu["nsiInformation"]["nsiId"].is_string(), "{pdu}");
    for kind in [
        "slice-info-request-for-registration",
        "slice-info-request-for-ue-cu",
    ] {
        let r = app
            .get(
                &q(kind, json!({"requestedNssai": [{"sst": 1}, {"sst": 9}]})),
                &a,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let v = r.json();
        let allowed = &v["allowedNssaiList"][0]["allowedSnssaiList"];
        assert_eq!(allowed.as_array().unwrap().len(), 1, "{v}");
        assert_eq!(allowed[0]["allowedSnssai"]["sst"], 1);
        assert_eq!(
            allowed[0]["nsiInformationList"][0]["nsiId"],
            pdu["nsiInformation"]["nsiId"]
        );
        assert_eq!(v["rejectedNssaiInPlmn"][0]["sst"], 9, "{v}");
        assert_eq!(v["configuredNssai"].as_array().unwrap().len(), 2, "{v}");
    }
    app.get(
        "/nnssf-nsselection/v2/network-slice-information?nf-type=AMF&nf-id=x",
        &a,
    )
    .await
    .problem(400, "exactly one");

    // The ledger: audited from the raw keys with the announced key pinned, every
    // entry recomputed; 3 associations + 5 allocation rounds.
    let head = app.get("/v1/ledger", &a).await.json();
    assert_eq!(head["size"], 8, "{head}");
    let mut keys = TrustedKeys::new();
    for k in head["keys"].as_array().unwrap() {
        keys.add(&from_hex(k["public_key"].as_str().unwrap()).unwrap());
    }
    app.get("/v1/ledger/entries", &a).await.problem(403, "");
    let raw: Vec<(String, Vec<u8>)> = app
        .get("/v1/ledger/entries", &app.admin)
        .await
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| {
            (
                kv["key"].as_str().unwrap().to_owned(),
                kv["value"].as_str().unwrap().as_bytes().to_vec(),
            )
        })
        .collect();
    let audited = audit(
        control::records::keys::SLICE_LEDGER,
        control::slices::LEDGER_ORIGIN,
        &keys,
        &raw,
        None,
    )
    .unwrap();
    assert_eq!(
        audited.head.root,
        hash_from_hex(head["root"].as_str().unwrap()).unwrap()
    );
    let mut kinds = (0, 0);
    for body in &audited.entries {
        match control::slices::recheck(body).unwrap() {
            control::slices::LedgerEntry::Association { .. } => kinds.0 += 1,
            control::slices::LedgerEntry::Allocation { .. } => kinds.1 += 1,
        }
    }
    assert_eq!(kinds, (3, 5));
    let p = app.get("/v1/ledger/proof?index=0", &app.admin).await.json();
    let proof: Vec<translog::Hash> = p["inclusion"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| hash_from_hex(h.as_str().unwrap()).unwrap())
        .collect();
    verify_inclusion(
        0,
        8,
        &translog::hash::leaf_hash(p["entry"].as_str().unwrap().as_bytes()),
        &proof,
        &audited.head.root,
    )
    .unwrap();
    let c = app.get("/v1/ledger/consistency?from=3", &a).await.json();
    let proof: Vec<translog::Hash> = c["proof"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| hash_from_hex(h.as_str().unwrap()).unwrap())
        .collect();
    let mut folder = translog::verify::RootFolder::default();
    for e in raw.iter().filter(|(k, _)| k.contains("/entries/")).take(3) {
        folder.push(translog::hash::leaf_hash(&e.1));
    }
    verify_consistency(3, 8, &folder.root(), &audited.head.root, &proof).unwrap();
    app.get("/v1/ledger/proof?index=99", &app.admin)
        .await
        .problem(422, "99");
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
