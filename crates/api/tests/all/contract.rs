//! Regressions found by schemathesis (`scripts/schemathesis.sh`): requests generated
//! from the OpenAPI document alone. Every request here also goes through the harness's
//! check that its status is documented.

use axum::http::StatusCode;
use serde_json::json;

use crate::harness::App;

/// `from >= to` is a 422 naming the parameter (the document lists 422 for query
/// parameters that break a rule).
#[tokio::test]
async fn traffic_window_that_ends_before_it_starts_is_a_documented_422() {
    let app = App::new().await;
    let r = app.get("/v1/traffic?from=0&to=0", &app.admin).await;
    r.problem(422, "from: must be before to");
}

/// Placement explanations check sizes as VM creates do: a vCPU count past the
/// document's maximum was answered 200.
#[tokio::test]
async fn placement_query_sizes_are_validated() {
    let app = App::new().await;
    for (body, field) in [
        (
            json!({ "disk_gib": 0, "memory_mib": 0, "vcpus": 2_147_483_648_u64 }),
            "disk_gib",
        ),
        (
            json!({ "disk_gib": 1, "memory_mib": 256, "vcpus": 65 }),
            "vcpus",
        ),
        (
            json!({ "disk_gib": 1, "memory_mib": 1, "vcpus": 1 }),
            "memory_mib",
        ),
    ] {
        let r = app.post("/v1/placements:explain", &app.admin, body).await;
        r.problem(422, field);
    }
    let r = app
        .post(
            "/v1/placements:explain",
            &app.admin,
            json!({ "disk_gib": 1, "memory_mib": 256, "vcpus": 1 }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

/// JSON Schema's `integer` includes `2.0`: a body a generated client sends that way is
/// read as the integer, and a real fraction is still refused naming the field.
#[tokio::test]
async fn integral_floats_are_integers() {
    let app = App::new().await;
    let agent = app.token("agent").await;
    let r = app
        .post(
            "/v1/hosts",
            &agent,
            json!({ "name": "h1", "cpus": 4.0, "memory_mib": 1024.0, "disk_gib": 0.0 }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.json()["cpus"], 4);
    let r = app
        .post(
            "/v1/hosts",
            &agent,
            json!({ "name": "h2", "cpus": 4.5, "memory_mib": 1024, "disk_gib": 0 }),
        )
        .await;
    r.problem(422, "cpus: invalid type: floating point");
    let r = app
        .post(
            "/v1/hosts",
            &agent,
            json!({ "name": "h2", "cpus": 1e30, "memory_mib": 1024, "disk_gib": 0 }),
        )
        .await;
    r.problem(422, "cpus");
}

/// An NS instance needs a site; the document says so (`minProperties`).
#[tokio::test]
async fn ns_instance_sites_are_required_by_the_document() {
    let doc = serde_json::to_value(api::openapi()).unwrap();
    assert_eq!(
        doc["components"]["schemas"]["CreateNsInstance"]["properties"]["sites"]["minProperties"],
        1
    );
}

/// An admin naming a network two tenants use gets 409 "use the id" (undocumented on
/// GET until schemathesis found it).
#[tokio::test]
async fn ambiguous_names_are_a_documented_409() {
    let app = App::new().await;
    app.tenant("a").await;
    app.tenant("b").await;
    for t in ["a", "b"] {
        let r = app
            .post(
                "/v1/networks",
                &app.admin,
                json!({ "name": "n", "cidr": "10.0.0.0/24", "tenant": t }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    app.get("/v1/networks/n", &app.admin)
        .await
        .problem(409, "use the network id");
    app.call(
        axum::http::Method::DELETE,
        "/v1/networks/n",
        &app.admin,
        None,
    )
    .await
    .problem(409, "use the network id");
}

/// A network an admin creates (no tenant: the `default` tenant's) can be read back by
/// the id the create answered.
#[tokio::test]
async fn created_network_is_found_by_its_id() {
    let app = App::new().await;
    let r = app
        .post(
            "/v1/networks",
            &app.admin,
            json!({ "name": "32ndk", "cidr": "106.176.0.0/12" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let r = app.get(&format!("/v1/networks/{id}"), &app.admin).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}
