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

/// `resource_tables` on a VM: every refusal names the reason (missing, another
/// tenant's, another host's, too many, duplicate, redundant, ambiguous); a VM with a
/// table is placed on its host even when another host has more room; it neither
/// migrates nor drains; its table cannot be deleted while it exists.
#[tokio::test]
async fn vms_name_tables_of_their_host_and_stay_there() {
    let w = World::new().await;
    let app = &w.app;
    // h2 has more room: the scheduler would pick it for a VM without tables.
    app.host(&w.agent, "h2", 32, 65536).await;
    let table = json!({"name": "flows", "entries": 4, "entry_size": 8});
    let r = app.post(TABLES, &w.a, table.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // Tenant b has a table of another name on h1, and one called `mine` on h1.
    let r = app
        .post(
            TABLES,
            &w.b,
            json!({"name": "theirs", "entries": 4, "entry_size": 8}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let vm = |name: &str, extra: serde_json::Value| {
        let mut v = json!({"name": name, "image": "debian", "vcpus": 1, "memory_mib": 64});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };

    app.post(
        "/v1/vms",
        &w.a,
        vm("v", json!({"resource_tables": ["nope"]})),
    )
    .await
    .problem(422, "resource_tables: no resource table nope on any host");
    // Another tenant's table is, for a, no table at all (the same words).
    app.post(
        "/v1/vms",
        &w.a,
        vm("v", json!({"resource_tables": ["theirs"]})),
    )
    .await
    .problem(422, "resource_tables: no resource table theirs on any host");
    app.post(
        "/v1/vms",
        &w.a,
        vm("v", json!({"resource_tables": ["flows"], "host": "h2"})),
    )
    .await
    .problem(422, "resource_tables: no resource table flows on host h2");
    let nine: Vec<String> = (0..9).map(|i| format!("t{i}")).collect();
    app.post("/v1/vms", &w.a, vm("v", json!({"resource_tables": nine})))
        .await
        .problem(
            422,
            "resource_tables: at most 8 resource tables per VM, got 9",
        );
    app.post(
        "/v1/vms",
        &w.a,
        vm("v", json!({"resource_tables": ["flows", "flows"]})),
    )
    .await
    .problem(422, "resource_tables[1]: duplicate: flows");
    app.post(
        "/v1/vms",
        &w.a,
        vm("v", json!({"resource_tables": ["Flows"]})),
    )
    .await
    .problem(422, "resource_tables[0]: must match");
    app.post(
        "/v1/vms",
        &w.a,
        vm(
            "v",
            json!({"resource_tables": ["flows"], "redundant": true}),
        ),
    )
    .await
    .problem(422, "cannot be redundant");

    // Placed on the table's host, not on the roomier h2; shown on the VM.
    let r = app
        .post(
            "/v1/vms",
            &w.a,
            vm("v", json!({"resource_tables": ["flows"]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let v = r.json();
    assert_eq!(v["host"], "h1", "{v}");
    assert_eq!(v["resource_tables"], json!(["flows"]));
    let id = v["id"].as_str().unwrap().to_owned();
    let shown = app.get("/v1/vms/v", &w.a).await.json();
    assert_eq!(shown["resource_tables"], json!(["flows"]));
    // A VM without tables goes to h2 (the pin above was the table's doing).
    let r = app.post("/v1/vms", &w.a, vm("plain", json!({}))).await;
    assert_eq!(r.json()["host"], "h2", "{}", r.text);

    // The table cannot go while the VM names it; b cannot even see it.
    app.call(Method::DELETE, &format!("{TABLES}/flows"), &w.a, None)
        .await
        .problem(
            409,
            "resource table flows on host h1 is mapped by vm v: delete it first",
        );

    // Running, it neither migrates live nor drains away with its host.
    let r = app
        .call(
            Method::PUT,
            &format!("/v1/vms/{id}/observed"),
            &w.agent,
            Some(json!({"host": "h1", "state": "running"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    app.post(&format!("/v1/vms/{id}/migrate"), &w.a, json!({"to": "h2"}))
        .await
        .problem(
            409,
            "vm v maps resource tables of host h1 (flows): it stays on that host",
        );
    app.post("/v1/hosts/h1/maintenance", &app.admin, json!({}))
        .await
        .problem(
            409,
            "vm v: cannot leave host h1: it maps resource tables of the host (flows)",
        );
    let h1 = app.get("/v1/hosts/h1", &app.admin).await.json();
    assert!(
        h1["maintenance"].is_null(),
        "the refused drain cordoned h1: {h1}"
    );

    // A table of the same name on two hosts: the tenant must say which.
    let r = app
        .post("/v1/hosts/h2/resource-tables", &w.a, table.clone())
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    app.post(
        "/v1/vms",
        &w.a,
        vm("w", json!({"resource_tables": ["flows"]})),
    )
    .await
    .problem(
        422,
        "hosts h1, h2 each keep resource tables of these names: give host",
    );
    let r = app
        .post(
            "/v1/vms",
            &w.a,
            vm("w", json!({"resource_tables": ["flows"], "host": "h2"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.json()["host"], "h2");

    // Once the VM is gone (its agent confirmed), the table may go.
    let r = app.call(Method::DELETE, "/v1/vms/v", &w.a, None).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    app.call(Method::DELETE, &format!("{TABLES}/flows"), &w.a, None)
        .await
        .problem(409, "mapped by vm v");
    let r = app
        .call(
            Method::PUT,
            &format!("/v1/vms/{id}/observed"),
            &w.agent,
            Some(json!({"host": "h1", "state": "deleted"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let r = app
        .call(Method::DELETE, &format!("{TABLES}/flows"), &w.a, None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    // The h2 table is still in use by w.
    app.call(
        Method::DELETE,
        "/v1/hosts/h2/resource-tables/flows",
        &w.a,
        None,
    )
    .await
    .problem(409, "is mapped by vm w");
}
