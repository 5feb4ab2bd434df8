//! Tokens: expiry, revocation, scopes, who may mint and see what, and what
//! members see of hosts and metrics.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{wait_for, App, World};

/// Mints a token through `/v1/tokens` with `body`; returns (secret, id).
async fn mint(app: &App, by: &str, body: Value) -> (String, String) {
    let r = app.post("/v1/tokens", by, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let j = r.json();
    (
        j["token"].as_str().unwrap().to_owned(),
        j["id"].as_str().unwrap().to_owned(),
    )
}

async fn revoke(app: &App, by: &str, id: &str) -> crate::harness::Resp {
    app.call(Method::DELETE, &format!("/v1/tokens/{id}"), by, None)
        .await
}

#[tokio::test]
async fn a_token_with_a_ttl_works_until_it_expires() {
    let w = World::new().await;
    let app = &w.app;
    let r = app
        .post(
            "/v1/tokens",
            &app.admin,
            json!({"role": "member", "tenant": "a", "ttl_secs": 1, "description": "short"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let created = r.json();
    let token = created["token"].as_str().unwrap().to_owned();
    assert_eq!(created["scope"], "read-write");
    assert_eq!(created["description"], "short");
    assert!(token.starts_with(created["prefix"].as_str().unwrap()));
    assert_eq!(app.get("/v1/vms", &token).await.status, StatusCode::OK);
    wait_for("the token to expire", Duration::from_secs(10), || async {
        app.get("/v1/vms", &token).await.status == StatusCode::UNAUTHORIZED
    })
    .await;
    app.get("/v1/vms", &token)
        .await
        .problem(401, "token expired");
    // Still listed for a while, so its owner sees why it stopped working.
    let list = app.get("/v1/tokens", &w.a).await.json();
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == created["id"])
        .expect("an expired token stays listed");
    assert!(listed["expires_at"].as_u64().unwrap() <= created["expires_at"].as_u64().unwrap());
}

#[tokio::test]
async fn defaults_and_bounds_of_the_lifetime() {
    let w = World::new().await;
    let app = &w.app;
    let r = app
        .post(
            "/v1/tokens",
            &app.admin,
            json!({"role": "member", "tenant": "a"}),
        )
        .await;
    let j = r.json();
    let life = j["expires_at"].as_u64().unwrap() - now_ms();
    let thirty_days = 30 * 24 * 3600 * 1000;
    assert!(life <= thirty_days && life > thirty_days - 60_000, "{life}");
    // Agents run unattended: their tokens do not expire by default.
    let r = app
        .post("/v1/tokens", &app.admin, json!({"role": "agent"}))
        .await;
    assert!(r.json().get("expires_at").is_none(), "{}", r.text);
    for ttl in [0u64, 365 * 24 * 3600 + 1] {
        app.post(
            "/v1/tokens",
            &app.admin,
            json!({"role": "member", "tenant": "a", "ttl_secs": ttl}),
        )
        .await
        .problem(422, "ttl_secs");
    }
    app.post(
        "/v1/tokens",
        &app.admin,
        json!({"role": "member", "tenant": "a", "scope": "everything"}),
    )
    .await
    .problem(422, "scope");
}

#[tokio::test]
async fn a_revoked_token_is_refused_on_the_next_request() {
    let w = World::new().await;
    let app = &w.app;
    let (token, id) = mint(app, &app.admin, json!({"role": "member", "tenant": "a"})).await;
    assert_eq!(app.get("/v1/vms", &token).await.status, StatusCode::OK);
    let r = revoke(app, &app.admin, &id).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    app.get("/v1/vms", &token)
        .await
        .problem(401, "invalid bearer token");
    revoke(app, &app.admin, &id).await.problem(404, "not found");
    revoke(app, &app.admin, "not-an-id")
        .await
        .problem(404, "not found");
    let list = app.get("/v1/tokens", &app.admin).await.text;
    assert!(!list.contains(&id), "{list}");
}

#[tokio::test]
async fn a_read_only_token_may_only_read() {
    let w = World::new().await;
    let app = &w.app;
    let (ro, _) = mint(
        app,
        &w.a,
        json!({"role": "member", "scope": "read-only", "description": "dashboard"}),
    )
    .await;
    assert_eq!(app.get("/v1/vms", &ro).await.status, StatusCode::OK);
    assert_eq!(app.get("/v1/hosts", &ro).await.status, StatusCode::OK);
    app.vm(&ro, "web", 1, 64)
        .await
        .problem(403, "scope read-only");
    // A read-only token cannot mint (not even another read-only one) or revoke.
    app.post(
        "/v1/tokens",
        &ro,
        json!({"role": "member", "scope": "read-only"}),
    )
    .await
    .problem(403, "scope read-only");
    let (_, other) = mint(app, &w.a, json!({"role": "member"})).await;
    revoke(app, &ro, &other)
        .await
        .problem(403, "scope read-only");
    // An admin's read-only token is as limited.
    let (ro_admin, _) = mint(
        app,
        &app.admin,
        json!({"role": "admin", "scope": "read-only"}),
    )
    .await;
    assert_eq!(
        app.get("/v1/tenants", &ro_admin).await.status,
        StatusCode::OK
    );
    app.post("/v1/tenants", &ro_admin, json!({"name": "c"}))
        .await
        .problem(403, "scope read-only");
}

#[tokio::test]
async fn members_mint_and_manage_only_their_own_tenants_tokens() {
    let w = World::new().await;
    let app = &w.app;
    app.post("/v1/tokens", &w.a, json!({"role": "admin"}))
        .await
        .problem(403, "member tokens only");
    app.post("/v1/tokens", &w.a, json!({"role": "agent"}))
        .await
        .problem(403, "member tokens only");
    app.post("/v1/tokens", &w.a, json!({"role": "member", "tenant": "b"}))
        .await
        .problem(403, "own tenant");
    app.post(
        "/v1/tokens",
        &w.a,
        json!({"role": "member", "tenant": "nosuch"}),
    )
    .await
    .problem(403, "own tenant");
    app.post("/v1/tokens", &w.agent, json!({"role": "agent"}))
        .await
        .problem(403, "role admin or member");
    let (a2, a2_id) = mint(app, &w.a, json!({"role": "member", "tenant": "a"})).await;
    let (_, a3_id) = mint(app, &w.a, json!({"role": "member"})).await;
    let (_, b2_id) = mint(app, &w.b, json!({"role": "member"})).await;
    assert_eq!(app.get("/v1/vms", &a2).await.status, StatusCode::OK);
    // A member lists its tenant's tokens only (including the tenant's first token).
    let ids = |v: Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let a_list = app.get("/v1/tokens", &w.a).await.json();
    let tenant_a = a_list[0]["tenant"].clone();
    assert!(a_list
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["tenant"] == tenant_a));
    let a_ids = ids(a_list);
    assert_eq!(a_ids.len(), 3, "first token, a2, a3: {a_ids:?}");
    assert!(a_ids.contains(&a2_id) && a_ids.contains(&a3_id));
    assert!(!a_ids.contains(&b2_id));
    app.get("/v1/tokens", &w.agent)
        .await
        .problem(403, "role admin or member");
    // The admin sees every token: its own, the agent's, both tenants'.
    let all = ids(app.get("/v1/tokens", &app.admin).await.json());
    assert_eq!(all.len(), 1 + 1 + 3 + 2, "{all:?}");
    // Another tenant's token is not found, like a missing one.
    revoke(app, &w.a, &b2_id).await.problem(404, "not found");
    assert_eq!(
        revoke(app, &w.a, &a2_id).await.status,
        StatusCode::NO_CONTENT
    );
    app.get("/v1/vms", &a2).await.problem(401, "invalid");
    assert_eq!(
        revoke(app, &app.admin, &b2_id).await.status,
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn a_minted_token_never_outlives_its_minter() {
    let w = World::new().await;
    let app = &w.app;
    let r = app
        .post(
            "/v1/tokens",
            &app.admin,
            json!({"role": "member", "tenant": "a", "ttl_secs": 60}),
        )
        .await;
    let short = r.json();
    let short_token = short["token"].as_str().unwrap();
    let r = app
        .post(
            "/v1/tokens",
            short_token,
            json!({"role": "member", "ttl_secs": 3600}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert!(r.json()["expires_at"].as_u64() <= short["expires_at"].as_u64());
}

#[tokio::test]
async fn token_lists_never_hold_a_secret_or_its_hash() {
    let w = World::new().await;
    let app = &w.app;
    let (secret, _) = mint(app, &app.admin, json!({"role": "member", "tenant": "a"})).await;
    for (who, token) in [("admin", &app.admin), ("member", &w.a)] {
        let text = app.get("/v1/tokens", token).await.text;
        for s in [&secret, &app.admin, &w.a, &w.b, &w.agent] {
            assert!(
                !text.contains(s.as_str()),
                "{who}'s list holds a secret: {text}"
            );
            assert!(
                !text.contains(&api::hash_token(s)),
                "{who}'s list holds a hash: {text}"
            );
        }
        let list: Value = serde_json::from_str(&text).unwrap();
        for t in list.as_array().unwrap() {
            let keys: Vec<&String> = t.as_object().unwrap().keys().collect();
            assert!(
                !keys.iter().any(|k| *k == "token" || *k == "hash"),
                "{keys:?}"
            );
        }
    }
}

#[tokio::test]
async fn legacy_token_records_load_get_an_id_and_can_be_revoked() {
    let w = World::new().await;
    let app = &w.app;
    // A record as servers before token ids wrote it.
    let legacy = "vinfra_legacy-token-of-an-old-agent";
    app.store
        .put(
            &format!("/vinfra/tokens/{}", api::hash_token(legacy)),
            bytes::Bytes::from_static(br#"{"role":"agent","tenant":null,"created_at":1}"#),
        )
        .await
        .unwrap();
    // Works at once: never expiring, read-write.
    let r = app
        .call(Method::POST, "/v1/hosts/h1/heartbeat", legacy, None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // The next server start gives it an id; then it can be listed and revoked.
    assert_eq!(
        api::bootstrap_admin(app.store.as_ref(), app._dir.path())
            .await
            .unwrap(),
        None
    );
    let list = app.get("/v1/tokens", &app.admin).await.json();
    let old = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["created_at"] == 1)
        .expect("the legacy token is listed");
    assert_eq!(old["scope"], "read-write");
    assert!(old.get("expires_at").is_none());
    let id = old["id"].as_str().unwrap().to_owned();
    assert_eq!(
        revoke(app, &app.admin, &id).await.status,
        StatusCode::NO_CONTENT
    );
    app.get("/v1/hosts", legacy)
        .await
        .problem(401, "invalid bearer token");
}

#[tokio::test]
async fn a_revoked_admin_token_is_not_brought_back_from_its_file() {
    let app = App::new().await;
    let (other_admin, _) = mint(&app, &app.admin, json!({"role": "admin"})).await;
    let list = app.get("/v1/tokens", &other_admin).await.json();
    let first = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["role"] == "admin" && t.get("expires_at").is_none())
        .expect("the data dir's admin token never expires");
    let id = first["id"].as_str().unwrap().to_owned();
    assert_eq!(
        revoke(&app, &other_admin, &id).await.status,
        StatusCode::NO_CONTENT
    );
    app.get("/v1/tenants", &app.admin)
        .await
        .problem(401, "invalid");
    // A restart finds the token in its file but does not re-add it.
    assert_eq!(
        api::bootstrap_admin(app.store.as_ref(), app._dir.path())
            .await
            .unwrap(),
        None
    );
    app.get("/v1/tenants", &app.admin)
        .await
        .problem(401, "invalid");
}

#[tokio::test]
async fn members_see_hosts_without_internal_addresses() {
    let w = World::new().await;
    let app = &w.app;
    let r = app
        .post(
            "/v1/hosts",
            &w.agent,
            json!({"name": "h2", "cpus": 4, "memory_mib": 4096, "disk_gib": 10,
                   "drivers": ["process"], "agent_url": "http://10.0.0.2:7071",
                   "nbd_addr": "10.0.0.2:10809", "link_addr": "10.0.0.2:7947",
                   "uplink_ip": "192.168.50.2"}),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    const INTERNAL: [&str; 4] = ["agent_url", "nbd_addr", "link_addr", "uplink_ip"];
    for path in ["/v1/hosts", "/v1/hosts/h2"] {
        let member = app.get(path, &w.a).await;
        assert_eq!(member.status, StatusCode::OK);
        for field in INTERNAL {
            assert!(!member.text.contains(field), "{path}: {}", member.text);
        }
        assert!(!member.text.contains("10.0.0.2"), "{}", member.text);
        assert!(member.text.contains("\"cpus\""), "{}", member.text);
        // Admins and agents (which reach each other's NBD servers and tunnels) see all.
        for token in [&app.admin, &w.agent] {
            let full = app.get(path, token).await.text;
            for field in INTERNAL {
                assert!(full.contains(field), "{path}: {full}");
            }
        }
    }
}

#[tokio::test]
async fn member_metrics_hold_only_their_tenants_counts() {
    let w = World::new().await;
    let app = &w.app;
    assert_eq!(app.vm(&w.a, "web", 1, 64).await.status, StatusCode::CREATED);
    assert_eq!(app.vm(&w.b, "db", 1, 64).await.status, StatusCode::CREATED);
    assert_eq!(app.vm(&w.b, "db2", 1, 64).await.status, StatusCode::CREATED);
    let r = app
        .post(
            "/v1/networks",
            &w.a,
            json!({"name": "net", "cidr": "10.70.0.0/24"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = app.get("/metrics", &w.a).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.content_type.starts_with("text/plain; version=0.0.4"));
    for line in [
        "vinfra_tenant_vms{observed=\"pending\"} 1\n",
        "vinfra_tenant_vms{observed=\"running\"} 0\n",
        "vinfra_tenant_networks 1\n",
        "vinfra_tenant_images 0\n",
    ] {
        assert!(r.text.contains(line), "missing {line:?} in\n{}", r.text);
    }
    for global in ["vinfra_hosts", "vinfra_vms{", "vinfra_http_requests_total"] {
        assert!(
            !r.text.contains(global),
            "member sees {global}:\n{}",
            r.text
        );
    }
    let b = app.get("/metrics", &w.b).await.text;
    assert!(
        b.contains("vinfra_tenant_vms{observed=\"pending\"} 2\n"),
        "{b}"
    );
    let admin = app.get("/metrics", &app.admin).await.text;
    assert!(
        admin.contains("vinfra_vms{observed=\"pending\"} 3\n"),
        "{admin}"
    );
    assert!(admin.contains("vinfra_http_requests_total"), "{admin}");
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
