//! A server serving HTTPS with its cluster CA: plain HTTP and other CAs are refused,
//! agents join once with a join token and then need their client certificate.

use std::time::Duration;

use client::{Client, ClientError, ClientTls, JoinError};
use model::api::{CreateJoinToken, RegisterHost};

use crate::harness::{cli, Server};

fn transport_failed<T: std::fmt::Debug>(r: Result<T, ClientError>) -> bool {
    matches!(r, Err(ClientError::Transport { .. }))
}

fn host(name: &str) -> RegisterHost {
    RegisterHost {
        name: name.into(),
        cpus: 2,
        vcpus: None,
        memory_mib: 2048,
        disk_gib: 10,
        drivers: vec!["qemu".into()],
        agent_url: None,
        nbd_addr: None,
        link_addr: None,
        uplink_ip: None,
    }
}

#[tokio::test]
async fn https_refuses_plain_http_other_cas_and_agents_without_their_certificate() {
    let dir = tempfile::Builder::new()
        .prefix("vi")
        .tempdir_in("/tmp")
        .unwrap();
    let store = format!("redb:{}", dir.path().join("state.redb").display());
    let s = Server::start_with_args(dir, store, &["--tls", "on"]).await;
    assert!(s.url.starts_with("https://"), "{}", s.url);
    let token = s.admin_token();
    let admin = s.admin();
    admin.list_hosts().await.unwrap();
    // The CLI trusts the CA file the server wrote.
    let (ok, out, err) = cli(&s, &token, &["host", "list"]);
    assert!(ok, "{out}{err}");

    // Plain HTTP to the TLS port gets no answer.
    let plain = Client::new(&s.url.replace("https://", "http://"), &token).unwrap();
    assert!(transport_failed(plain.list_hosts().await));
    // A client trusting another CA does not trust this server...
    let other = tls::Ca::generate().unwrap();
    let foreign = ClientTls {
        ca_pem: other.cert_pem().to_owned(),
        identity: None,
    };
    assert!(transport_failed(
        Client::with_tls(&s.url, &token, &foreign)
            .unwrap()
            .list_hosts()
            .await
    ));
    // ...and the server refuses a client certificate from another CA.
    let ours = std::fs::read_to_string(s.ca_file().unwrap()).unwrap();
    let impostor = ClientTls {
        ca_pem: ours.clone(),
        identity: Some(other.issue_client("host-j").unwrap()),
    };
    assert!(transport_failed(
        Client::with_tls(&s.url, &token, &impostor)
            .unwrap()
            .list_hosts()
            .await
    ));

    // Joining: the pin must match the CA the server shows.
    let jt = admin
        .create_join_token(&CreateJoinToken::default())
        .await
        .unwrap();
    let (head, _) = jt.token.rsplit_once('.').unwrap();
    let wrong_pin = format!("{head}.{}", tls::fingerprint(other.cert_pem()).unwrap());
    let e = client::join(&s.url, &wrong_pin, "host-j")
        .await
        .unwrap_err();
    assert!(matches!(e, JoinError::WrongCa { .. }), "{e}");
    assert!(matches!(
        client::join(&s.url, "vjoin.x", "host-j").await,
        Err(JoinError::Malformed)
    ));
    let id = client::join(&s.url, &jt.token, "host-j").await.unwrap();
    assert_eq!(id.host.as_str(), "host-j");
    assert_eq!(id.ca_pem, ours);
    // Once only.
    let again = client::join(&s.url, &jt.token, "host-k").await.unwrap_err();
    let JoinError::Api(e) = again else {
        panic!("{again}")
    };
    assert_eq!(e.status(), Some(401));
    assert_eq!(e.detail(), Some("join token unknown, used or expired"));

    // The agent token alone is refused over TLS; with its certificate it works.
    let bare = ClientTls {
        ca_pem: id.ca_pem.clone(),
        identity: None,
    };
    let e = Client::with_tls(&s.url, &id.token, &bare)
        .unwrap()
        .register_host(&host("host-j"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(401));
    assert!(e.detail().unwrap().contains("client certificate"), "{e}");
    let agent = ClientTls {
        ca_pem: id.ca_pem.clone(),
        identity: Some(tls::Issued {
            cert_pem: id.cert_pem.clone(),
            key_pem: id.key_pem.clone(),
        }),
    };
    let registered = Client::with_tls(&s.url, &id.token, &agent)
        .unwrap()
        .register_host(&host("host-j"))
        .await
        .unwrap();
    assert_eq!(registered.host.name.as_str(), "host-j");

    // An unused join token expires.
    let short = admin
        .create_join_token(&CreateJoinToken { ttl_secs: Some(1) })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let e = client::join(&s.url, &short.token, "host-l")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, JoinError::Api(a) if a.status() == Some(401)),
        "{e}"
    );
}

#[tokio::test]
async fn a_loopback_server_stays_plain_and_has_no_join() {
    let s = Server::start().await;
    assert!(s.url.starts_with("http://"));
    let e = s
        .admin()
        .create_join_token(&CreateJoinToken::default())
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert!(e.detail().unwrap().contains("does not serve TLS"), "{e}");
}
