//! `/v1/operations` over HTTP: who sees what, and the refusals' statuses. The driver
//! that moves operations along is tested in the control crate.

use serde_json::json;

use crate::harness::World;

#[tokio::test]
async fn operations_are_listed_per_tenant_and_cancel_refusals_are_409() {
    let w = World::new().await;
    let app = &w.app;
    app.host(&w.agent, "h2", 8, 8192).await;
    let r = app.vm(&w.a, "web", 1, 256).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let host = r.json()["host"].as_str().unwrap().to_owned();
    let r = app
        .call(
            axum::http::Method::PUT,
            &format!("/v1/vms/{id}/observed"),
            &w.agent,
            Some(json!({ "host": host, "state": "running" })),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let to = if host == "h1" { "h2" } else { "h1" };
    // The harness registers hosts without a block cache: the refusal names it.
    let r = app
        .post(&format!("/v1/vms/{id}/migrate"), &w.a, json!({ "to": to }))
        .await;
    r.problem(409, "serves no block cache");

    // A drain is the operator's: listed for the admin, not for the tenant.
    let r = app
        .post(
            &format!("/v1/hosts/{host}/maintenance"),
            &app.admin,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let sid = r.json()["id"].as_str().unwrap().to_owned();
    let ops = app.get("/v1/operations", &app.admin).await.json();
    let drain = ops
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["id"] == sid.as_str())
        .unwrap_or_else(|| panic!("drain missing from {ops}"));
    assert_eq!(drain["kind"], "drain");
    assert_eq!(drain["state"], "running");
    assert_eq!(drain["target"], format!("host {host}"));
    assert_eq!(
        (drain["done"].as_u64(), drain["total"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(app.get("/v1/operations", &w.a).await.json(), json!([]));
    app.get(&format!("/v1/operations/{sid}"), &w.a)
        .await
        .problem(404, "not found");
    app.post(&format!("/v1/operations/{sid}/cancel"), &w.a, json!({}))
        .await
        .problem(404, "not found");

    let r = app
        .call(
            axum::http::Method::POST,
            &format!("/v1/operations/{sid}/cancel"),
            &app.admin,
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["state"], "cancelled");
    let r = app
        .call(
            axum::http::Method::POST,
            &format!("/v1/operations/{sid}/cancel"),
            &app.admin,
            None,
        )
        .await;
    r.problem(409, "is already cancelled");
    let h = app
        .get(&format!("/v1/hosts/{host}"), &app.admin)
        .await
        .json();
    assert!(h["maintenance"].is_null(), "still cordoned: {h}");
}
