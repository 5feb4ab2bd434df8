//! NS instances through the router: every refusal names its field, secrets never come
//! back, a site that cannot be reached fails the instance with a reason (everything
//! rolled back) and DELETE then removes it; tenants stay apart.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{wait_for, World};

fn example(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../../examples/nfv/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

async fn with_descriptors() -> World {
    let w = World::new().await;
    for (path, file) in [
        ("/v1/vnfds", "vnfd-firewall.yaml"),
        ("/v1/vnfds", "vnfd-web.yaml"),
        ("/v1/nsds", "nsd-edge.yaml"),
    ] {
        let r = w
            .app
            .post(path, &w.a, json!({ "descriptor": example(file) }))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{file}: {}", r.text);
    }
    w
}

/// Two OpenStack sites nobody answers for (port 1 on loopback refuses at once).
fn unreachable_sites() -> Value {
    let os = json!({"driver": "openstack", "auth_url": "http://127.0.0.1:1", "username": "u",
                    "password": "s3cret", "project": "p"});
    json!({"site-a": os, "site-b": os})
}

#[tokio::test]
async fn bad_requests_are_refused_naming_the_field() {
    let w = with_descriptors().await;
    let app = &w.app;
    let post = |body: Value| app.post("/v1/ns-instances", &w.a, body);
    let sites = unreachable_sites();
    post(json!({"name": "e", "nsd": "nope", "sites": sites}))
        .await
        .problem(422, "nsd: no NSD named nope");
    post(json!({"name": "Bad_Name", "nsd": "nsd-edge", "sites": sites}))
        .await
        .problem(422, "name:");
    post(json!({"name": "a-name-far-too-long-for-a-prefix", "nsd": "nsd-edge", "sites": sites}))
        .await
        .problem(422, "at most 20 bytes");
    post(json!({"name": "e", "nsd": "nsd-edge", "sites": {}}))
        .await
        .problem(422, "sites: at least one site is needed");
    post(json!({"name": "e", "nsd": "nsd-edge", "sites": {"site-x": {"driver": "vinfra"}}}))
        .await
        .problem(422, "sites: VNF 'fw' may go to");
    post(json!({"name": "e", "nsd": "nsd-edge", "sites": {"site-a": {"driver": "vmware"}}}))
        .await
        .problem(422, "unknown variant `vmware`");
    post(json!({"name": "e", "nsd": "nsd-edge", "sites": sites,
                "endpoints": {"web": "10.0.0.1:7946"}}))
    .await
    .problem(
        422,
        "endpoints.web: 10.0.0.1:7946 is not a loopback address",
    );
    post(json!({"name": "e", "nsd": "nsd-edge", "sites": sites, "link_deadline_ms": 5}))
        .await
        .problem(422, "link_deadline_ms: must be between 100 and 600000");
    // A libvirt site runs on the server's machine: admins only.
    post(json!({"name": "e", "nsd": "nsd-edge",
                "sites": {"site-a": {"driver": "libvirt", "uri": "qemu:///system", "work_dir": "/srv/x"},
                          "site-b": {"driver": "vinfra"}}}))
        .await
        .problem(403, "only an admin may use one");
    // Nothing was recorded by any of these.
    assert_eq!(app.get("/v1/ns-instances", &w.a).await.json(), json!([]));
}

#[tokio::test]
async fn an_unreachable_site_fails_the_instance_and_only_forget_drops_its_record() {
    let w = with_descriptors().await;
    let app = &w.app;
    let r = app
        .post(
            "/v1/ns-instances",
            &w.a,
            json!({"name": "edge", "nsd": "nsd-edge", "sites": unreachable_sites()}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert!(!r.text.contains("s3cret"), "{}", r.text);
    assert_eq!(r.json()["sites"]["site-a"]["password"], "********");
    assert_eq!(r.json()["vnfs"][0]["state"], "pending");
    // One name per tenant.
    app.post(
        "/v1/ns-instances",
        &w.a,
        json!({"name": "edge", "nsd": "nsd-edge", "sites": unreachable_sites()}),
    )
    .await
    .problem(409, "name: ns instance edge already exists");
    // Another tenant sees nothing of it.
    app.get("/v1/ns-instances/edge", &w.b)
        .await
        .problem(404, "not found");
    assert_eq!(app.get("/v1/ns-instances", &w.b).await.json(), json!([]));

    wait_for("the instance to fail", Duration::from_secs(20), || async {
        app.get("/v1/ns-instances/edge", &w.a).await.json()["state"] == "failed"
    })
    .await;
    let got = app.get("/v1/ns-instances/edge", &w.a).await;
    assert!(!got.text.contains("s3cret"), "{}", got.text);
    let rec = got.json();
    let error = rec["error"].as_str().unwrap();
    assert!(
        error.contains("rolled back every site") && error.contains("127.0.0.1:1"),
        "{error}"
    );
    assert!(rec["vnfs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["state"] == "rolled_back"));
    // Scaling needs an instantiated NS.
    app.post(
        "/v1/ns-instances/edge/scale",
        &w.a,
        json!({"vnf": "web", "direction": "out"}),
    )
    .await
    .problem(409, "only an instantiated NS scales");

    // Terminate cannot reach the sites either: the record stays, failed, saying so
    // (whatever a site may still hold is not forgotten silently).
    app.call(
        Method::DELETE,
        "/v1/ns-instances/edge?forget=maybe",
        &w.a,
        None,
    )
    .await
    .problem(400, "query:");
    let r = app
        .call(Method::DELETE, "/v1/ns-instances/edge", &w.a, None)
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.json()["state"], "terminating");
    wait_for("the terminate to fail", Duration::from_secs(20), || async {
        let rec = app.get("/v1/ns-instances/edge", &w.a).await.json();
        rec["state"] == "failed"
            && rec["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("terminate:") && e.contains("site-a"))
    })
    .await;
    // The caller takes the leftovers on itself: only the record goes.
    let r = app
        .call(
            Method::DELETE,
            "/v1/ns-instances/edge?forget=true",
            &w.a,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    app.get("/v1/ns-instances/edge", &w.a)
        .await
        .problem(404, "not found");
}
