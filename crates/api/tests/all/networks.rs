//! Networks and IPAM: tenant scoping, address allocation, release and races.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{App, World};

async fn vm_with(app: &App, token: &str, name: &str, nics: Value) -> crate::harness::Resp {
    app.post(
        "/v1/vms",
        token,
        json!({"name": name, "image": "debian", "vcpus": 1, "memory_mib": 64, "nics": nics}),
    )
    .await
}

async fn delete_confirmed(w: &World, name: &str) {
    let app = &w.app;
    let vm = app.get(&format!("/v1/vms/{name}"), &w.a).await.json();
    let r = app
        .call(Method::DELETE, &format!("/v1/vms/{name}"), &w.a, None)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let r = app
        .call(
            Method::PUT,
            &format!("/v1/vms/{}/observed", vm["id"].as_str().unwrap()),
            &w.agent,
            Some(json!({"host": "h1", "state": "deleted"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
}

#[tokio::test]
async fn networks_give_addresses_per_tenant_and_take_them_back() {
    let w = World::new().await;
    let app = &w.app;
    let net = json!({"name": "blue", "cidr": "10.70.0.0/24"});
    let r = app.post("/v1/networks", &w.a, net.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let blue = r.json();
    app.post("/v1/networks", &w.a, net.clone())
        .await
        .problem(409, "name: network blue already exists");
    app.post(
        "/v1/networks",
        &w.a,
        json!({"name": "x", "cidr": "10.70.0.1/24"}),
    )
    .await
    .problem(422, "cidr: bad CIDR '10.70.0.1/24': host bits are set");
    app.post(
        "/v1/networks",
        &w.a,
        json!({"name": "x", "cidr": "10.70.0.0/31"}),
    )
    .await
    .problem(422, "prefix must be 8..=30");
    // Tenant b sees nothing of a's network, and cannot put a NIC on it.
    app.get("/v1/networks/blue", &w.b)
        .await
        .problem(404, "not found");
    assert_eq!(app.get("/v1/networks", &w.b).await.json(), json!([]));
    vm_with(app, &w.b, "spy", json!([{"network": "blue"}]))
        .await
        .problem(422, "nics[0].network: no network named blue");
    // b may have its own "blue" with the same subnet: a separate segment.
    let r = app.post("/v1/networks", &w.b, net.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);

    // IPAM: lowest free host address first; a fixed one must be free and inside.
    let v1 = vm_with(app, &w.a, "v1", json!([{"network": "blue"}])).await;
    assert_eq!(v1.status, StatusCode::CREATED, "{}", v1.text);
    let nic = &v1.json()["nics"][0];
    assert_eq!(nic["ip"], "10.70.0.1");
    assert_eq!(nic["prefix"], 24);
    assert_eq!(nic["network"], blue["id"]);
    let mac = nic["mac"].as_str().unwrap();
    assert!(
        mac.starts_with("02:") && mac.ends_with(":46:00:01"),
        "{mac}"
    );
    vm_with(
        app,
        &w.a,
        "v2",
        json!([{"network": "blue", "ip": "10.70.0.1"}]),
    )
    .await
    .problem(
        409,
        "nics[0].ip: 10.70.0.1 is already in use on network blue",
    );
    vm_with(
        app,
        &w.a,
        "v2",
        json!([{"network": "blue", "ip": "10.70.0.255"}]),
    )
    .await
    .problem(422, "nics[0].ip: 10.70.0.255 is not a host address of blue");
    vm_with(
        app,
        &w.a,
        "v2",
        json!([{"network": "blue", "ip": "10.71.0.9"}]),
    )
    .await
    .problem(422, "is not a host address");
    let r = app
        .post(
            "/v1/vms",
            &w.a,
            json!({"name": "v2", "image": "debian", "vcpus": 1, "memory_mib": 64,
                   "kernel_args": "vinfra.nic=02:00:00:00:00:01,10.0.0.1/24"}),
        )
        .await;
    r.problem(422, "kernel_args: vinfra.nic= is set by vinfra from nics");
    // Two NICs on one network get two addresses; a refused VM used up none.
    let v2 = vm_with(
        app,
        &w.a,
        "v2",
        json!([{"network": "blue"}, {"network": blue["id"]}]),
    )
    .await;
    assert_eq!(v2.status, StatusCode::CREATED, "{}", v2.text);
    let v2 = v2.json();
    assert_eq!(
        (&v2["nics"][0]["ip"], &v2["nics"][1]["ip"]),
        (&json!("10.70.0.2"), &json!("10.70.0.3"))
    );
    // The agent sees the NICs in its assignment.
    let assigned = app.get("/v1/hosts/h1/assignments", &w.agent).await.json();
    assert!(assigned
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["vm"]["nics"][1]["ip"] == "10.70.0.3"));

    // A network in use cannot go; once its VMs are gone their addresses are free.
    app.call(Method::DELETE, "/v1/networks/blue", &w.a, None)
        .await
        .problem(409, "network blue has 3 NIC(s) on it");
    delete_confirmed(&w, "v1").await;
    let v3 = vm_with(app, &w.a, "v3", json!([{"network": "blue"}])).await;
    assert_eq!(v3.json()["nics"][0]["ip"], "10.70.0.1", "{}", v3.text);
    delete_confirmed(&w, "v2").await;
    delete_confirmed(&w, "v3").await;
    let r = app
        .call(Method::DELETE, "/v1/networks/blue", &w.a, None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    app.get("/v1/networks/blue", &w.a)
        .await
        .problem(404, "not found");
}

#[tokio::test]
async fn concurrent_creates_never_share_an_address() {
    let w = World::new().await;
    // A /29 has six host addresses.
    let r = w
        .app
        .post(
            "/v1/networks",
            &w.a,
            json!({"name": "tiny", "cidr": "10.72.0.0/29"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let w = Arc::new(w);
    let start = Arc::new(tokio::sync::Barrier::new(10));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (w, start) = (w.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            vm_with(&w.app, &w.a, &format!("c{i}"), json!([{"network": "tiny"}])).await
        }));
    }
    let mut ips = BTreeSet::new();
    let mut created = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            StatusCode::CREATED => {
                created += 1;
                assert!(ips.insert(r.json()["nics"][0]["ip"].as_str().unwrap().to_owned()));
            }
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}: {}", r.text),
        }
    }
    assert!((1..=6).contains(&created), "created {created}");
    assert_eq!(ips.len(), created);
    // What is left is exactly what the created VMs do not hold.
    let r = vm_with(&w.app, &w.a, "late", json!([{"network": "tiny"}])).await;
    if created == 6 {
        r.problem(409, "network tiny (10.72.0.0/29) has no free address");
    } else {
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert!(!ips.contains(r.json()["nics"][0]["ip"].as_str().unwrap()));
    }
}
