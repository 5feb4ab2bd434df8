//! Token revocation and expiry across a cluster of real `vinfra server` processes
//! on one etcd (servers keep no token cache), the token CLI, and the admin token
//! staying out of server output.

use std::time::{Duration, Instant};

use model::api::CreateToken;
use model::{Role, TokenScope};

use crate::harness::{cli, Server};

/// Three servers on one etcd, sharing the admin token (each finds it in its own
/// data dir, as an operator would copy it).
async fn three_servers(etcd: &test_utils::EtcdFixture) -> Vec<Server> {
    let store = format!("etcd:{}", etcd.endpoint());
    let dir = || {
        tempfile::Builder::new()
            .prefix("vt")
            .tempdir_in("/tmp")
            .unwrap()
    };
    let first = Server::start_with(dir(), store.clone()).await;
    let mut servers = vec![first];
    for _ in 0..2 {
        let d = dir();
        std::fs::copy(
            servers[0].dir.path().join("admin-token"),
            d.path().join("admin-token"),
        )
        .unwrap();
        servers.push(Server::start_with(d, store.clone()).await);
    }
    servers
}

/// The status of `GET /v1/vms` with `token` on `s` (200, or the error's status).
async fn status(s: &Server, token: &str) -> (u16, String) {
    let c = client::Client::new(&s.url, token).unwrap();
    match c.list_vms().await {
        Ok(_) => (200, String::new()),
        Err(e) => (
            e.status().unwrap_or(0),
            e.detail().unwrap_or_default().to_owned(),
        ),
    }
}

#[tokio::test]
async fn a_revoked_or_expired_token_is_refused_at_once_by_every_server() {
    let etcd = test_utils::EtcdFixture::spawn().await.expect("etcd");
    let servers = three_servers(&etcd).await;
    let admin1 = servers[0].admin();
    admin1.create_tenant("acme").await.unwrap();

    // Revocation: minted through server 1, revoked through server 2.
    let minted = admin1
        .create_token(&CreateToken {
            tenant: Some("acme".into()),
            description: Some("revoked soon".into()),
            ..CreateToken::new(Role::Member)
        })
        .await
        .unwrap();
    for s in &servers {
        assert_eq!(status(s, &minted.token).await.0, 200, "{}", s.log());
    }
    servers[1].admin().revoke_token(minted.id).await.unwrap();
    for (i, s) in servers.iter().enumerate() {
        let (code, detail) = status(s, &minted.token).await;
        assert_eq!(code, 401, "server {}: {detail}", i + 1);
        assert!(detail.contains("invalid bearer token"), "{detail}");
    }
    assert!(servers[2]
        .admin()
        .list_tokens()
        .await
        .unwrap()
        .iter()
        .all(|t| t.id != minted.id));

    // Expiry: a short-lived token works on every server, then none takes it.
    const TTL: Duration = Duration::from_secs(4);
    let started = Instant::now();
    let short = admin1
        .create_token(&CreateToken {
            tenant: Some("acme".into()),
            ttl_secs: Some(TTL.as_secs()),
            scope: TokenScope::ReadOnly,
            ..CreateToken::new(Role::Member)
        })
        .await
        .unwrap();
    for s in &servers {
        let (code, detail) = status(s, &short.token).await;
        if started.elapsed() < TTL {
            assert_eq!(code, 200, "{detail}");
        }
    }
    test_utils::wait_for(Duration::from_secs(20), || async {
        status(&servers[0], &short.token).await.0 == 401
    })
    .await
    .expect("the token expires on server 1");
    for (i, s) in servers.iter().enumerate() {
        let (code, detail) = status(s, &short.token).await;
        assert_eq!(code, 401, "server {}: {detail}", i + 1);
        assert_eq!(detail, "token expired", "server {}", i + 1);
    }
}

#[tokio::test]
async fn the_token_cli_mints_lists_and_revokes() {
    let s = Server::start().await;
    let admin = s.admin_token();
    // The server printed where the admin token is, never the token.
    let log = std::fs::read_to_string(s.dir.path().join("server.log")).unwrap();
    assert!(
        !log.contains(&admin),
        "the server log holds the admin token"
    );
    assert!(log.contains("admin token created in"), "{log}");

    let tenant = s.admin().create_tenant("acme").await.unwrap().token;
    let (ok, out, err) = cli(
        &s,
        &tenant,
        &[
            "token",
            "create",
            "--ttl",
            "2h",
            "--read-only",
            "--description",
            "grafana",
        ],
    );
    assert!(ok, "{err}");
    assert!(err.contains("not shown again"), "{err}");
    let secret = out.trim().to_owned();
    assert!(secret.starts_with("vinfra_"), "{out}");
    let member = client::Client::new(&s.url, &secret).unwrap();
    assert!(member.list_vms().await.is_ok());
    assert_eq!(
        member.create_tenant("x").await.unwrap_err().status(),
        Some(403)
    );

    let (ok, out, err) = cli(&s, &tenant, &["token", "list", "-o", "json"]);
    assert!(ok, "{err}");
    assert!(!out.contains(&secret) && !out.contains(&tenant), "{out}");
    let list: Vec<model::api::TokenInfo> = serde_json::from_str(&out).unwrap();
    let ro = list
        .iter()
        .find(|t| t.description.as_deref() == Some("grafana"))
        .expect("the new token is listed");
    assert_eq!(ro.scope, TokenScope::ReadOnly);
    assert!(secret.starts_with(&ro.prefix) && !ro.prefix.is_empty());
    let (ok, table, _) = cli(&s, &tenant, &["token", "list"]);
    assert!(ok);
    assert!(table.starts_with("ID  "), "{table}");
    assert!(
        table.contains("read-only") && table.contains("in 1h 59m"),
        "{table}"
    );

    // Admins may mint other roles; members may not.
    let (ok, _, err) = cli(&s, &tenant, &["token", "create", "--role", "admin"]);
    assert!(!ok);
    assert!(err.contains("member tokens only"), "{err}");
    let (ok, out, err) = cli(
        &s,
        &admin,
        &["token", "create", "--role", "agent", "-o", "json"],
    );
    assert!(ok, "{err}");
    let agent: model::api::TokenCreated = serde_json::from_str(&out).unwrap();
    assert_eq!(
        agent.expires_at, None,
        "agent tokens do not expire by default"
    );

    // The host list works for members (without internals) and admins.
    for t in [&tenant, &admin] {
        let (ok, _, err) = cli(&s, t, &["host", "list"]);
        assert!(ok, "{err}");
    }

    let (ok, _, err) = cli(&s, &tenant, &["token", "revoke", &ro.id.to_string()]);
    assert!(ok, "{err}");
    assert_eq!(member.list_vms().await.unwrap_err().status(), Some(401));
    let (ok, _, err) = cli(&s, &tenant, &["token", "revoke", &ro.id.to_string()]);
    assert!(!ok);
    assert!(err.contains("not found"), "{err}");
}
