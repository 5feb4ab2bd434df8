//! Router tests without a socket.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{wait_for, App, World};

#[tokio::test]
async fn bootstrap_writes_a_private_token_once() {
    let store = store::testing::MemStore::new();
    let dir = tempfile::tempdir().unwrap();
    let token = api::bootstrap_admin(&store, dir.path())
        .await
        .unwrap()
        .unwrap();
    let path = dir.path().join(api::ADMIN_TOKEN_FILE);
    assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), token);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(
        api::bootstrap_admin(&store, dir.path()).await.unwrap(),
        None
    );
    // A fresh store with the same data dir re-adds the token from its file.
    let fresh = Arc::new(store::testing::MemStore::new());
    assert_eq!(
        api::bootstrap_admin(fresh.as_ref(), dir.path())
            .await
            .unwrap(),
        None
    );
    let app = api::router(api::AppState::new(fresh, &api::ServerConfig::default()));
    let res = tower::ServiceExt::oneshot(
        app,
        axum::http::Request::get("/v1/tenants")
            .header("authorization", format!("Bearer {token}"))
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn auth_is_required_and_roles_are_enforced() {
    let w = World::new().await;
    let app = &w.app;
    let r = app.raw(Method::GET, "/v1/vms", None, None, "").await;
    r.problem(401, "missing or invalid bearer token");
    let r = app.get("/v1/vms", "vinfra_not-a-token").await;
    r.problem(401, "invalid bearer token");
    let r = app.raw(Method::GET, "/metrics", None, None, "").await;
    r.problem(401, "bearer token");
    let r = app.post("/v1/tenants", &w.a, json!({"name": "c"})).await;
    r.problem(403, "role admin");
    let r = app
        .post("/v1/tokens", &w.agent, json!({"role": "admin"}))
        .await;
    r.problem(403, "role admin");
    let r = app.get("/v1/vms", &w.agent).await;
    r.problem(403, "role admin or member");
    let r = app
        .post(
            "/v1/hosts",
            &w.a,
            json!({"name": "h9", "cpus": 1, "memory_mib": 1, "disk_gib": 1}),
        )
        .await;
    r.problem(403, "role agent or admin");
    let r = app.get("/v1/hosts/h1/assignments", &w.b).await;
    r.problem(403, "role agent or admin");
    // Public routes and reads every role may do.
    let r = app
        .raw(Method::GET, "/v1/openapi.json", None, None, "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(app.get("/v1/hosts", &w.a).await.status, StatusCode::OK);
    assert_eq!(app.get("/metrics", &app.admin).await.status, StatusCode::OK);
    // Metrics are for admins (global) and members (their tenant's), not agents.
    app.get("/metrics", &w.agent)
        .await
        .problem(403, "role admin or member");
    // A minted member token works for its tenant.
    let r = app
        .post(
            "/v1/tokens",
            &app.admin,
            json!({"role": "member", "tenant": "a"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let a2 = r.json()["token"].as_str().unwrap().to_owned();
    assert_eq!(app.vm(&w.a, "web", 1, 64).await.status, StatusCode::CREATED);
    assert_eq!(app.get("/v1/vms/web", &a2).await.status, StatusCode::OK);
}

/// Every class of bad input, with the status and a piece of the detail.
#[tokio::test]
async fn bad_inputs_get_problems_naming_the_field() {
    let w = World::new().await;
    let app = &w.app;
    let vm = |extra: &str| {
        format!(r#"{{"name":"x","image":"debian","vcpus":1,"memory_mib":64{extra}}}"#)
    };
    let missing_id = "00000000-0000-4000-8000-000000000000";
    let nodigest = format!("sha256:{}", "0".repeat(64));
    let admin = app.admin.as_str();
    let (a, agent) = (w.a.as_str(), w.agent.as_str());
    #[rustfmt::skip]
    let cases: Vec<(Method, String, &str, &str, String, u16, &str)> = vec![
        // (method, path, token, content type, body, status, detail substring)
        (Method::POST, "/v1/vms".into(), a, "application/json", "{".into(), 400, "body: invalid JSON"),
        (Method::POST, "/v1/vms".into(), a, "application/json", vm("} x"), 400, "body: invalid JSON"),
        (Method::POST, "/v1/vms".into(), a, "text/plain", vm(""), 415, "Content-Type"),
        (Method::POST, "/v1/vms".into(), a, "application/json", format!("\"{}\"", "x".repeat(3 << 20)), 413, "body: exceeds the limit of 2097152 bytes"),
        (Method::POST, "/v1/vms".into(), a, "", vm(""), 415, "Content-Type"),
        (Method::POST, "/v1/vms".into(), a, "application/json", r#"{"name":"x","image":"debian","vcpus":"two","memory_mib":64}"#.into(), 422, "vcpus: invalid type"),
        (Method::POST, "/v1/vms".into(), a, "application/json", r#"{"name":"x","image":"debian","vcpus":-1,"memory_mib":64}"#.into(), 422, "vcpus: invalid value"),
        (Method::POST, "/v1/vms".into(), a, "application/json", r#"{"name":"x","image":"debian","vcpus":1,"memory_mib":1e99}"#.into(), 422, "memory_mib: invalid type"),
        (Method::POST, "/v1/vms".into(), a, "application/json", r#"{"name":"x","image":"debian","vcpus":0,"memory_mib":64}"#.into(), 422, "vcpus: must be between 1 and 64, got 0"),
        (Method::POST, "/v1/vms".into(), a, "application/json", r#"{"name":"x","image":"debian","vcpus":65,"memory_mib":64}"#.into(), 422, "vcpus: must be between 1 and 64, got 65"),
        (Method::POST, "/v1/vms".into(), a, "application/json", r#"{"name":"x","image":"debian","vcpus":1,"memory_mib":8}"#.into(), 422, "memory_mib: must be between 16"),
        (Method::POST, "/v1/vms".into(), a, "application/json", vm(r#","vcpu":2"#), 422, "unknown field `vcpu`"),
        (Method::POST, "/v1/vms".into(), a, "application/json", r#"{"name":"x","image":"debian","vcpus":1}"#.into(), 422, "missing field `memory_mib`"),
        (Method::POST, "/v1/vms".into(), a, "application/json", r#"{"name":"Web_1","image":"debian","vcpus":1,"memory_mib":64}"#.into(), 422, "name: must match [a-z0-9][a-z0-9-]{0,62}"),
        (Method::POST, "/v1/vms".into(), a, "application/json", r#"{"name":"x","image":"nope","vcpus":1,"memory_mib":64}"#.into(), 422, "image: no image named nope"),
        (Method::POST, "/v1/vms".into(), a, "application/json", vm(r#","host":"zz""#), 422, "host: no host named zz"),
        (Method::POST, "/v1/vms".into(), a, "application/json", vm(r#","host":"H1""#), 422, "host: must match"),
        (Method::POST, "/v1/vms".into(), a, "application/json", vm(r#","tenant":"b""#), 403, "tenant: only an admin"),
        (Method::POST, "/v1/vms".into(), admin, "application/json", vm(r#","tenant":"zz""#), 422, "tenant: no tenant named zz"),
        (Method::POST, "/v1/vms".into(), a, "application/json", "42".into(), 422, "body: must be a JSON object"),
        (Method::POST, "/v1/hosts".into(), agent, "application/json", r#"{"name":"h2","cpus":0,"memory_mib":1,"disk_gib":1}"#.into(), 422, "cpus: must be between 1 and 4096, got 0"),
        (Method::POST, "/v1/hosts".into(), agent, "application/json", r#"{"name":"h2","cpus":1,"memory_mib":1,"disk_gib":1,"drivers":["qemu","Q"]}"#.into(), 422, "drivers[1]: must match"),
        (Method::POST, "/v1/hosts".into(), agent, "application/json", r#"{"name":"h2","cpus":1,"memory_mib":1,"disk_gib":1,"agent_url":"x"}"#.into(), 422, "agent_url: must be an http"),
        (Method::POST, "/v1/hosts".into(), agent, "application/json", r#"{"name":"h2","cpus":1,"memory_mib":1,"disk_gib":1,"drivers":"qemu"}"#.into(), 422, "drivers: invalid type"),
        (Method::POST, "/v1/images".into(), a, "application/json", r#"{"name":"i","disk_mib":1}"#.into(), 422, "kernel: an image needs a kernel or a disk_template"),
        (Method::POST, "/v1/images".into(), a, "application/json", r#"{"name":"i","kernel":"vmlinuz","disk_mib":1}"#.into(), 422, "kernel: must be an image-store digest"),
        (Method::POST, "/v1/images".into(), a, "application/json", format!(r#"{{"name":"i","kernel":"{nodigest}","cmdline":"a\nb","disk_mib":1}}"#), 422, "cmdline: must not contain control"),
        (Method::POST, "/v1/images".into(), a, "application/json", format!(r#"{{"name":"debian","kernel":"{nodigest}","disk_mib":1,"tenant":"b"}}"#), 403, "tenant: only an admin"),
        (Method::POST, "/v1/images".into(), a, "application/json", format!(r#"{{"name":"i","kernel":"{nodigest}","disk_mib":1}}"#), 422, "kernel: no blob sha256:"),
        (Method::POST, "/v1/tokens".into(), admin, "application/json", r#"{"role":"root"}"#.into(), 422, "role: unknown variant `root`"),
        (Method::POST, "/v1/tokens".into(), admin, "application/json", r#"{"role":"member"}"#.into(), 422, "tenant: is required"),
        (Method::POST, "/v1/tokens".into(), admin, "application/json", r#"{"role":"agent","tenant":"a"}"#.into(), 422, "tenant: must be absent"),
        (Method::POST, "/v1/tokens".into(), admin, "application/json", r#"{"role":"member","tenant":"zz"}"#.into(), 422, "tenant: no tenant named zz"),
        (Method::POST, "/v1/tenants".into(), admin, "application/json", r#"{"name":""}"#.into(), 422, "name: must match"),
        (Method::POST, "/v1/tenants".into(), admin, "application/json", r#"{"name":"a"}"#.into(), 409, "name: tenant a already exists"),
        (Method::PUT, format!("/v1/vms/{missing_id}/observed"), agent, "application/json", r#"{"host":"h1","state":"flying"}"#.into(), 422, "state: unknown variant `flying`"),
        (Method::PUT, format!("/v1/vms/{missing_id}/observed"), agent, "application/json", format!( r#"{{"host":"h1","state":"running","console_tail":"{}"}}"#, "x".repeat(70_000) ), 422, "console_tail: must be at most 65536 bytes"),
        (Method::PUT, format!("/v1/vms/{missing_id}/observed"), agent, "application/json", r#"{"host":"h1","state":"running"}"#.into(), 404, "not found"),
        (Method::GET, "/v1/nope".into(), a, "", String::new(), 404, "no route for /v1/nope"),
        (Method::GET, "/".into(), a, "", String::new(), 404, "no route for /"),
        (Method::PATCH, "/v1/vms".into(), a, "", String::new(), 405, "method PATCH not allowed"),
        (Method::GET, "/v1/vms/nope".into(), a, "", String::new(), 404, "vm nope not found"),
        (Method::GET, "/v1/vms/NOT%20A%20NAME".into(), a, "", String::new(), 404, "not found"),
        (Method::POST, format!("/v1/vms/{missing_id}/start"), a, "", String::new(), 404, "not found"),
        (Method::GET, "/v1/hosts/nope".into(), a, "", String::new(), 404, "host nope not found"),
        (Method::POST, "/v1/hosts/nope/heartbeat".into(), agent, "", String::new(), 404, "host nope not found"),
        (Method::GET, "/v1/hosts/nope/assignments".into(), agent, "", String::new(), 404, "host nope not found"),
        (Method::GET, "/v1/images/nope".into(), a, "", String::new(), 404, "image nope not found"),
        (Method::DELETE, "/v1/images/debian".into(), a, "", String::new(), 403, "public"),
    ];
    for (method, path, token, ct, body, status, needle) in cases {
        let ct = (!ct.is_empty()).then_some(ct);
        let r = app.raw(method.clone(), &path, Some(token), ct, &body).await;
        assert_eq!(
            r.status.as_u16(),
            status,
            "{method} {path} {}: {}",
            body.chars().take(120).collect::<String>(),
            r.text
        );
        r.problem(status, needle);
    }
    // Nothing above created a VM.
    assert_eq!(app.get("/v1/vms", admin).await.json(), json!([]));
}

#[tokio::test]
async fn tenants_cannot_see_or_touch_each_other() {
    let w = World::new().await;
    let app = &w.app;
    let r = app.vm(&w.a, "web", 1, 64).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let vm = r.json();
    let id = vm["id"].as_str().unwrap();
    assert_eq!(vm["desired"], "running");
    assert_eq!(vm["observed"], "pending");
    assert_eq!(vm["host"], "h1");

    // B sees nothing and every action is 404, by id and by name.
    assert_eq!(app.get("/v1/vms", &w.b).await.json(), json!([]));
    for path in [
        format!("/v1/vms/{id}"),
        "/v1/vms/web".to_owned(),
        format!("/v1/vms/{id}/console"),
    ] {
        app.get(&path, &w.b).await.problem(404, "not found");
    }
    for action in ["stop", "start"] {
        app.call(Method::POST, &format!("/v1/vms/{id}/{action}"), &w.b, None)
            .await
            .problem(404, "not found");
    }
    app.call(Method::DELETE, &format!("/v1/vms/{id}"), &w.b, None)
        .await
        .problem(404, "not found");
    // ... and nothing changed.
    let r = app.get(&format!("/v1/vms/{id}"), &w.a).await;
    assert_eq!(r.json()["desired"], "running");

    // Names are per tenant: B may use the same one.
    assert_eq!(app.vm(&w.b, "web", 1, 64).await.status, StatusCode::CREATED);
    app.vm(&w.b, "web", 1, 64)
        .await
        .problem(409, "name: vm web already exists");
    // The admin sees both, and a shared name is ambiguous for it.
    assert_eq!(
        app.get("/v1/vms", &app.admin)
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    app.get("/v1/vms/web", &app.admin)
        .await
        .problem(409, "use the vm id");
    assert_eq!(
        app.get(&format!("/v1/vms/{id}"), &app.admin).await.status,
        StatusCode::OK
    );

    // Images: A's private image is invisible to B; the public one is shared.
    let img = app.image(&w.a, "secret").await;
    assert_eq!(img["tenant"], vm["tenant"]);
    let img_id = img["id"].as_str().unwrap();
    app.get(&format!("/v1/images/{img_id}"), &w.b)
        .await
        .problem(404, "not found");
    app.get("/v1/images/secret", &w.b)
        .await
        .problem(404, "not found");
    let names = |v: Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(app.get("/v1/images", &w.b).await.json()), ["debian"]);
    let mut a_images = names(app.get("/v1/images", &w.a).await.json());
    a_images.sort();
    assert_eq!(a_images, ["debian", "secret"]);
    app.post(
        "/v1/vms",
        &w.b,
        json!({"name": "x", "image": "secret", "vcpus": 1, "memory_mib": 64}),
    )
    .await
    .problem(422, "image: no image named secret");
    app.call(Method::DELETE, "/v1/images/secret", &w.b, None)
        .await
        .problem(404, "not found");
}

#[tokio::test]
async fn hosts_register_idempotently_and_go_down_without_heartbeats() {
    let app = App::with_timeout(Duration::from_millis(300)).await;
    let agent = app.token("agent").await;
    let body = json!({"name": "h1", "cpus": 4, "memory_mib": 4096, "disk_gib": 10});
    let r = app.post("/v1/hosts", &agent, body.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let first = r.json();
    assert_eq!(first["state"], "up");
    // The registration renewed the host's lease: the heartbeat timeout.
    assert_eq!(first["lease_ms"], 300);
    let mut bigger = body.clone();
    bigger["cpus"] = json!(8);
    let r = app.post("/v1/hosts", &agent, bigger).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["id"], first["id"], "re-registration keeps the id");
    assert_eq!(r.json()["cpus"], 8);
    assert_eq!(
        app.get("/v1/hosts", &agent)
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );

    wait_for("h1 to go down", Duration::from_secs(10), || async {
        app.get("/v1/hosts/h1", &agent).await.json()["state"] == "down"
    })
    .await;
    // Placement refuses a down host, explicitly or not.
    app.image(&app.admin, "debian").await;
    let vm = json!({"name": "v", "image": "debian", "vcpus": 1, "memory_mib": 64, "host": "h1"});
    app.post("/v1/vms", &app.admin, vm)
        .await
        .problem(409, "host: h1 is down");
    app.vm(&app.admin, "v", 1, 64)
        .await
        .problem(409, "no up host");
    let metrics = app.get("/metrics", &app.admin).await.text;
    assert!(
        metrics.contains("vinfra_hosts{state=\"down\"} 1\n"),
        "{metrics}"
    );

    let r = app
        .call(Method::POST, "/v1/hosts/h1/heartbeat", &agent, None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["state"], "up");
    assert_eq!(r.json()["lease_ms"], 300);
    assert_eq!(
        app.vm(&app.admin, "v", 1, 64).await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn scheduling_places_by_free_capacity_and_refuses_what_does_not_fit() {
    let w = World::new().await; // h1: 8 CPUs, 8192 MiB
    let app = &w.app;
    app.host(&w.agent, "h2", 4, 16384).await;
    let host_of = |r: crate::harness::Resp| {
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.json()["host"].as_str().unwrap().to_owned()
    };
    // Most free memory wins: h2, then h2 again (12 GiB free), then h1.
    assert_eq!(host_of(app.vm(&w.a, "v1", 2, 4096).await), "h2");
    assert_eq!(host_of(app.vm(&w.a, "v2", 2, 4096).await), "h2");
    assert_eq!(host_of(app.vm(&w.a, "v3", 2, 4096).await), "h1");
    // h2 has no CPUs left: a 1-vCPU VM goes to h1 despite h2's free memory.
    assert_eq!(host_of(app.vm(&w.a, "v4", 1, 1024).await), "h1");
    // A stopped VM keeps its reservation.
    assert_eq!(
        app.call(Method::POST, "/v1/vms/v1/stop", &w.a, None)
            .await
            .json()["desired"],
        "stopped"
    );
    let explicit =
        json!({"name": "v5", "image": "debian", "vcpus": 1, "memory_mib": 64, "host": "h2"});
    app.post("/v1/vms", &w.a, explicit).await.problem(
        409,
        "host: h2 has 0 free vCPUs and 8192 MiB free memory, the vm needs 1 vCPUs and 64 MiB",
    );
    app.vm(&w.a, "v6", 6, 1024)
        .await
        .problem(409, "no up host has 6 free vCPUs");
    assert_eq!(host_of(app.vm(&w.a, "v6", 5, 3072).await), "h1");
    app.vm(&w.a, "v7", 1, 16)
        .await
        .problem(409, "no up host has 1 free vCPUs");
    // Nothing failed half-way: exactly the five successful VMs exist.
    assert_eq!(
        app.get("/v1/vms", &w.a)
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        5
    );
}

#[tokio::test]
async fn agent_protocol_runs_a_vm_through_its_life() {
    let w = World::new().await;
    let app = &w.app;
    let vm = app.vm(&w.a, "web", 2, 512).await.json();
    let id = vm["id"].as_str().unwrap().to_owned();

    let assigned = app.get("/v1/hosts/h1/assignments", &w.agent).await.json();
    let assigned = assigned.as_array().unwrap();
    assert_eq!(assigned.len(), 1);
    assert_eq!(assigned[0]["vm"]["id"], id.as_str());
    assert_eq!(assigned[0]["vm"]["desired"], "running");
    // The agent gets the kernel's digest, and may fetch it.
    let kernel = assigned[0]["image"]["kernel"].as_str().unwrap();
    assert!(kernel.starts_with("sha256:"), "{kernel}");
    let k = app.get(&format!("/v1/blobs/{kernel}"), &w.agent).await;
    assert_eq!((k.status, k.text.as_str()), (StatusCode::OK, "kernel"));

    let observed_path = format!("/v1/vms/{id}/observed");
    let observed = |body: Value| app.call(Method::PUT, &observed_path, &w.agent, Some(body));
    let r = observed(json!({"host": "h1", "state": "running", "console_tail": "login: "})).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    assert_eq!(
        app.get(&format!("/v1/vms/{id}"), &w.a).await.json()["observed"],
        "running"
    );
    let c = app.get("/v1/vms/web/console", &w.a).await;
    assert_eq!((c.status, c.text.as_str()), (StatusCode::OK, "login: "));
    assert!(c.content_type.starts_with("text/plain"));

    // A report from another host, or a premature `deleted`, is refused.
    observed(json!({"host": "h2", "state": "stopped"}))
        .await
        .problem(409, "assigned to h1, not h2");
    observed(json!({"host": "h1", "state": "deleted"}))
        .await
        .problem(409, "desired state is deleted");
    // Members may not report.
    app.call(
        Method::PUT,
        &format!("/v1/vms/{id}/observed"),
        &w.a,
        Some(json!({"host": "h1", "state": "failed"})),
    )
    .await
    .problem(403, "role agent or admin");

    let r = observed(json!({"host": "h1", "state": "failed", "error": "qemu exited 1"})).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let got = app.get(&format!("/v1/vms/{id}"), &w.a).await.json();
    assert_eq!(
        (got["observed"].as_str(), got["error"].as_str()),
        (Some("failed"), Some("qemu exited 1"))
    );

    // Delete: pending until the agent confirms.
    let r = app.call(Method::DELETE, "/v1/vms/web", &w.a, None).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.json()["desired"], "deleted");
    app.call(Method::POST, "/v1/vms/web/start", &w.a, None)
        .await
        .problem(409, "being deleted");
    let assigned = app.get("/v1/hosts/h1/assignments", &w.agent).await.json();
    assert_eq!(assigned[0]["vm"]["desired"], "deleted");
    let r = observed(json!({"host": "h1", "state": "deleted"})).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    app.get(&format!("/v1/vms/{id}"), &w.a)
        .await
        .problem(404, "not found");
    assert_eq!(
        app.get("/v1/hosts/h1/assignments", &w.agent).await.json(),
        json!([])
    );
    // The name is free again.
    assert_eq!(
        app.vm(&w.a, "web", 2, 512).await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn deleting_a_vm_on_a_down_host_removes_it_at_once() {
    let app = App::with_timeout(Duration::from_millis(200)).await;
    let w = World::from(app).await;
    let app = &w.app;
    assert_eq!(app.vm(&w.a, "web", 1, 64).await.status, StatusCode::CREATED);
    wait_for("h1 to go down", Duration::from_secs(10), || async {
        app.get("/v1/hosts/h1", &w.a).await.json()["state"] == "down"
    })
    .await;
    let r = app.call(Method::DELETE, "/v1/vms/web", &w.a, None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    app.get("/v1/vms/web", &w.a).await.problem(404, "not found");
}

#[tokio::test]
async fn images_are_unique_per_scope_and_protected_while_used() {
    let w = World::new().await;
    let app = &w.app;
    let kernel = app.blob(&w.a, "a's kernel").await;
    let dup = json!({"name": "debian", "kernel": kernel, "disk_mib": 1});
    app.post("/v1/images", &app.admin, dup.clone())
        .await
        .problem(409, "name: image debian already exists");
    // A tenant may shadow a public image; its own copy wins for it.
    let own = app.post("/v1/images", &w.a, dup).await;
    assert_eq!(own.status, StatusCode::CREATED);
    assert_eq!(
        app.get("/v1/images/debian", &w.a).await.json()["id"],
        own.json()["id"]
    );
    let vm = app.vm(&w.a, "web", 1, 64).await.json();
    assert_eq!(vm["image"], own.json()["id"]);
    app.call(Method::DELETE, "/v1/images/debian", &w.a, None)
        .await
        .problem(409, "used by vm web");
    let r = app.call(Method::DELETE, "/v1/vms/web", &w.a, None).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let id = vm["id"].as_str().unwrap();
    let r = app
        .call(
            Method::PUT,
            &format!("/v1/vms/{id}/observed"),
            &w.agent,
            Some(json!({"host": "h1", "state": "deleted"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app
        .call(Method::DELETE, "/v1/images/debian", &w.a, None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    // The public one is visible again.
    assert_eq!(
        app.get("/v1/images/debian", &w.a).await.json()["tenant"],
        Value::Null
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_name_admit_exactly_one() {
    let w = Arc::new(World::new().await);
    // A barrier makes the requests start together rather than one by one.
    let start = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (w, start) = (w.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            w.app.vm(&w.a, "race", 1, 64).await.status
        }));
    }
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(created, 1);
    assert_eq!(
        w.app
            .get("/v1/vms", &w.a)
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_cannot_overcommit_a_host() {
    let app = App::new().await;
    let agent = app.token("agent").await;
    app.host(&agent, "small", 2, 1024).await;
    app.image(&app.admin, "debian").await;
    // A member token: an admin's first VM would also race to create the
    // `default` tenant, which staggers the requests and hides the race.
    let member = app.tenant("t").await;
    let app = Arc::new(app);
    let start = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (app, start, member) = (app.clone(), start.clone(), member.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            app.vm(&member, &format!("v{i}"), 2, 512).await.status
        }));
    }
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(created, 1, "a 2-CPU host fits one 2-vCPU VM");
}

#[tokio::test]
async fn metrics_count_hosts_vms_and_requests() {
    let w = World::new().await;
    let app = &w.app;
    assert_eq!(app.vm(&w.a, "web", 1, 64).await.status, StatusCode::CREATED);
    app.get("/v1/vms/nope", &w.a)
        .await
        .problem(404, "not found");
    let r = app.get("/metrics", &app.admin).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.content_type.starts_with("text/plain; version=0.0.4"));
    for line in [
        "vinfra_hosts{state=\"up\"} 1\n",
        "vinfra_hosts{state=\"down\"} 0\n",
        "vinfra_vms{observed=\"pending\"} 1\n",
        "vinfra_vms{observed=\"running\"} 0\n",
        "vinfra_http_requests_total{method=\"POST\",route=\"/v1/vms\",status=\"201\"} 1\n",
        "vinfra_http_requests_total{method=\"GET\",route=\"/v1/vms/{id}\",status=\"404\"} 1\n",
        "vinfra_http_requests_total{method=\"POST\",route=\"/v1/tenants\",status=\"201\"} 2\n",
    ] {
        assert!(r.text.contains(line), "missing {line:?} in\n{}", r.text);
    }
}

#[tokio::test]
async fn admin_vms_go_to_the_default_tenant_or_a_named_one() {
    let w = World::new().await;
    let app = &w.app;
    let vm = app.vm(&app.admin, "ops", 1, 64).await.json();
    let tenants = app.get("/v1/tenants", &app.admin).await.json();
    let default = tenants
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "default")
        .unwrap();
    assert_eq!(vm["tenant"], default["id"]);
    let named =
        json!({"name": "for-a", "image": "debian", "vcpus": 1, "memory_mib": 64, "tenant": "a"});
    let r = app.post("/v1/vms", &app.admin, named).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(app.get("/v1/vms/for-a", &w.a).await.status, StatusCode::OK);
    app.get("/v1/vms/ops", &w.a).await.problem(404, "not found");
}

#[tokio::test]
async fn server_errors_say_only_internal_error() {
    let w = World::new().await;
    let app = &w.app;
    // A record no version of the server wrote.
    app.store
        .put(
            "/vinfra/vms/corrupt",
            bytes::Bytes::from_static(b"{\"not\": \"a vm\"}"),
        )
        .await
        .unwrap();
    let r = app.get("/v1/vms", &w.a).await;
    r.problem(500, "internal error");
    assert_eq!(r.json()["detail"], "internal error");
    assert!(!r.text.contains("corrupt"), "{}", r.text);
}

/// Hosts offer CPUs × their allocation ratio as vCPUs (default 4, like Nova's
/// cpu_allocation_ratio); memory is never overcommitted.
#[tokio::test]
async fn vcpus_are_overcommitted_by_the_hosts_ratio() {
    let app = App::new().await;
    let agent = app.token("agent").await;
    let r = app
        .post(
            "/v1/hosts",
            &agent,
            json!({"name": "small", "cpus": 1, "memory_mib": 4096, "disk_gib": 10}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.json()["vcpus"], 4);
    app.image(&app.admin, "debian").await;
    for i in 0..4 {
        let r = app.vm(&app.admin, &format!("v{i}"), 1, 64).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    app.vm(&app.admin, "v4", 1, 64)
        .await
        .problem(409, "no up host has 1 free vCPUs");
    // Memory is not overcommitted.
    app.post(
        "/v1/hosts",
        &agent,
        json!({"name": "small", "cpus": 1, "vcpus": 64, "memory_mib": 300, "disk_gib": 10}),
    )
    .await;
    app.vm(&app.admin, "v5", 1, 64)
        .await
        .problem(409, "no up host has 1 free vCPUs and 64 MiB free memory");
    // At most 64 vCPUs per CPU.
    app.post(
        "/v1/hosts",
        &agent,
        json!({"name": "small", "cpus": 1, "vcpus": 65, "memory_mib": 300, "disk_gib": 10}),
    )
    .await
    .problem(422, "vcpus: must be between 1 and 64, got 65");
}
