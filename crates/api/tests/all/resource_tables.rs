//! Resource tables as API objects: limits named in the 422, tenant scoping (another
//! tenant gets 404 by name and by id), who may report, and what a report shows.

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::harness::World;

const TABLES: &str = "/v1/hosts/h1/resource-tables";

#[tokio::test]
async fn tables_are_validated_scoped_and_show_the_agents_report() {
    let w = World::new().await;
    let app = &w.app;
    let spec = |name: &str, entries: u64, size: u64| json!({"name": name, "entries": entries, "entry_size": size});
    app.post(TABLES, &w.a, spec("t", 0, 8))
        .await
        .problem(422, "entries: must be between 1 and 65536, got 0");
    app.post(TABLES, &w.a, spec("t", 4, 12))
        .await
        .problem(422, "entry_size: must be a multiple of 8, got 12");
    app.post(TABLES, &w.a, spec("t", 65_536, 16_384))
        .await
        .problem(422, "over the limit of 1073741824 bytes");
    app.post(
        TABLES,
        &w.a,
        json!({"name": "t", "entries": 4, "entry_size": 8, "max_grant_ms": 60001}),
    )
    .await
    .problem(422, "max_grant_ms: must be between 1 and 60000, got 60001");
    app.post(
        TABLES,
        &w.a,
        json!({"name": "t", "entries": 4, "entry_size": 8, "slots": 1}),
    )
    .await
    .problem(422, "unknown field `slots`");
    app.post("/v1/hosts/nope/resource-tables", &w.a, spec("t", 4, 8))
        .await
        .problem(404, "host nope not found");
    let r = app
        .raw(
            Method::POST,
            TABLES,
            None,
            Some("application/json"),
            &spec("t", 4, 8).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);

    let r = app.post(TABLES, &w.a, spec("t", 4, 8)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    app.post(TABLES, &w.a, spec("t", 4, 8))
        .await
        .problem(409, "resource table t already exists on host h1");
    // Tenant b may use the same name on the same host: its own table.
    let r = app.post(TABLES, &w.b, spec("t", 2, 16)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);

    // b sees only its own; a's is 404 to b by name and by id, also for delete.
    let listed = app.get(TABLES, &w.b).await.json();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["entries"], 2);
    app.get(&format!("{TABLES}/{id}"), &w.b)
        .await
        .problem(404, "not found");
    let r = app
        .call(Method::DELETE, &format!("{TABLES}/{id}"), &w.b, None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    // The admin and the host's agent see both; the admin must name one by id.
    assert_eq!(
        app.get(TABLES, &app.admin)
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        app.get(TABLES, &w.agent)
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    app.get(&format!("{TABLES}/t"), &app.admin)
        .await
        .problem(409, "use the resource table id");

    // Only an agent (or admin) reports; the report shows in `GET`.
    let report = json!({
        "socket": "/var/lib/vinfra/resource-tables/x.sock",
        "devices": [{"id": 1, "pid": 42, "grants": 1}],
        "grants": [{"entry": 3, "device": 1, "version": 2, "granted_at": 5}],
        "versions": [{"entry": 3, "version": 2}],
        "written_entries": 1,
        "audit": [{"seq": 1, "at": 5, "device": 1, "entry": 3, "version": 2, "kind": "granted"}],
        "totals": {"grants": 1, "revokes": 0, "refused": 0, "refused_writes": 0, "rolled_back": 0},
    });
    let path = format!("{TABLES}/{id}/report");
    let r = app
        .call(Method::PUT, &path, &w.a, Some(report.clone()))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    let r = app
        .call(Method::PUT, &path, &w.agent, Some(report.clone()))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let t = app.get(&format!("{TABLES}/t"), &w.a).await.json();
    assert_eq!(t["state"]["grants"][0]["entry"], 3);
    assert_eq!(t["state"]["audit"][0]["kind"], "granted");
    assert!(t["state"]["reported_at"].as_u64().unwrap() > 0);
    let mut big = report.clone();
    big["audit"] = json!(vec![report["audit"][0].clone(); 257]);
    app.call(Method::PUT, &path, &w.agent, Some(big))
        .await
        .problem(422, "audit: at most 256 items, got 257");

    let r = app
        .call(Method::DELETE, &format!("{TABLES}/t"), &w.a, None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    app.get(&format!("{TABLES}/{id}"), &w.a)
        .await
        .problem(404, "not found");
    // A report after the delete is 404: the agent drops the table.
    let r = app.call(Method::PUT, &path, &w.agent, Some(report)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    // The name is free again.
    let r = app.post(TABLES, &w.a, spec("t", 4, 8)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
}
