//! Terminals over the in-memory store: secrets sealed, bindings shared or exclusive per
//! tenant, and every check an operation message goes through — the VM always from the
//! binding, never from the body.

use std::sync::Arc;

use control::terminals::{Refused, SecretsKey, TerminalError};
use control::{Control, ControlError, Scope};
use model::terminals::{message_mac, OperationHeader, SharePolicy};
use model::{TenantId, TerminalId};
use store::testing::MemStore;
use store::Store;

use crate::drain::{n, vm};

fn control(store: &Arc<MemStore>) -> Control {
    let c = Control::new(store.clone(), 6000);
    assert!(c.set_secrets_key(SecretsKey::new(&[42u8; 32]).unwrap()));
    c
}

/// Plays the hosts' agents: answers every operation sent to a host `performed`.
async fn hosts_answer(c: &Control) {
    use futures_util::StreamExt;
    let mut w = c
        .store_arc()
        .watch(control::terminals::TERMINAL_OPS)
        .await
        .unwrap();
    let c = c.clone();
    tokio::spawn(async move {
        while let Some(Ok(store::WatchEvent::Put(kv))) = w.next().await {
            let op: model::terminals::PerformedOperation =
                serde_json::from_slice(&kv.value).unwrap();
            if op.outcome == model::terminals::OperationOutcome::Sent {
                let r = model::terminals::OperationResult {
                    host: op.host.to_string(),
                    outcome: model::terminals::OperationOutcome::Performed,
                    detail: None,
                    screenshot: None,
                };
                c.answer_operation(op.terminal, op.seq, r).await.unwrap();
            }
        }
    });
}

/// A signed message from terminal `t` (secret `secret`) with `body`.
fn message(server: &str, t: TerminalId, secret: &str, seq: u64, ts: u64, body: &str) -> Vec<u8> {
    let mut h = OperationHeader {
        server: server.to_owned(),
        terminal: t,
        seq,
        timestamp: ts,
        mac: String::new(),
    };
    h.mac = message_mac(secret.as_bytes(), &h, body.as_bytes());
    format!(
        "{{\"header\":{},\"body\":{body}}}",
        serde_json::to_string(&h).unwrap()
    )
    .into_bytes()
}

const KEY_A: &str = r#"{"operation":{"op":"key","qcode":"a","down":true}}"#;

#[tokio::test]
async fn without_a_secrets_key_no_terminal_is_made() {
    let store = Arc::new(MemStore::new());
    let c = Control::new(store.clone(), 6000);
    let e = c.create_terminal(TenantId::new_random(), n("t1")).await;
    assert!(matches!(e, Err(TerminalError::NoSecretsKey)), "{e:?}");
}

#[tokio::test]
async fn the_secret_is_shown_once_and_stored_only_sealed() {
    let store = Arc::new(MemStore::new());
    let c = control(&store);
    let tenant = TenantId::new_random();
    let made = c.create_terminal(tenant, n("kiosk")).await.unwrap();
    assert!(made.secret.starts_with("vterm_"), "{}", made.secret);
    assert!(made.secret.starts_with(&made.terminal.secret_prefix));
    assert!(made.server.starts_with("vinfra-"));
    assert_eq!(made.server, c.server_id().await.unwrap(), "stable");
    for kv in store.list("/").await.unwrap() {
        let text = String::from_utf8_lossy(&kv.value);
        assert!(
            !text.contains(&made.secret[6..]),
            "{} holds the secret",
            kv.key
        );
    }
    // Names are unique per tenant.
    let again = c.create_terminal(tenant, n("kiosk")).await;
    assert!(
        matches!(again, Err(TerminalError::Control(ControlError::Taken(_)))),
        "{again:?}"
    );
    c.create_terminal(TenantId::new_random(), n("kiosk"))
        .await
        .unwrap();
    let listed = c.list_terminals(Scope::Tenant(tenant)).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(c.list_terminals(Scope::All).await.unwrap().len(), 2);
}

#[tokio::test]
async fn bindings_are_shared_or_exclusive_and_never_cross_tenants() {
    let store = Arc::new(MemStore::new());
    let c = control(&store);
    let (a, b) = (TenantId::new_random(), TenantId::new_random());
    let web = vm(store.as_ref(), a, "web", "h1").await.to_string();
    let db = vm(store.as_ref(), a, "db", "h1").await.to_string();
    let theirs = vm(store.as_ref(), b, "theirs", "h1").await.to_string();
    let sa = Scope::Tenant(a);
    for t in ["t1", "t2", "t3"] {
        c.create_terminal(a, n(t)).await.unwrap();
    }
    c.bind_terminal(sa, "t1", &web, SharePolicy::Shared)
        .await
        .unwrap();
    c.bind_terminal(sa, "t2", &web, SharePolicy::Shared)
        .await
        .unwrap();
    // Exclusive while others are bound: refused, naming one of them.
    let e = c
        .bind_terminal(sa, "t3", &web, SharePolicy::Exclusive)
        .await;
    assert!(
        matches!(&e, Err(TerminalError::VmTaken { holder, .. }) if holder == "t1" || holder == "t2"),
        "{e:?}"
    );
    // Exclusive on a free VM, then nobody else gets in, shared or not.
    c.bind_terminal(sa, "t3", &db, SharePolicy::Exclusive)
        .await
        .unwrap();
    let e = c.bind_terminal(sa, "t1", &db, SharePolicy::Shared).await;
    assert!(
        matches!(&e, Err(TerminalError::VmTaken { holder, policy, .. }) if holder == "t3" && *policy == "exclusive"),
        "{e:?}"
    );
    // t1 is still on web (a refused bind changes nothing).
    let t1 = c.terminal(sa, "t1").await.unwrap();
    assert_eq!(t1.binding.unwrap().vm.to_string(), web);
    // Another tenant's VM is not found, for a member and for an admin alike.
    for scope in [sa, Scope::All] {
        let e = c
            .bind_terminal(scope, "t1", &theirs, SharePolicy::Shared)
            .await;
        assert!(
            matches!(
                e,
                Err(TerminalError::Control(ControlError::NotFound { .. }))
            ),
            "{e:?}"
        );
    }
    // Moving t3 off db frees it; deleting t2 takes it off web.
    c.bind_terminal(sa, "t3", &web, SharePolicy::Shared)
        .await
        .unwrap();
    c.bind_terminal(sa, "t1", &db, SharePolicy::Exclusive)
        .await
        .unwrap();
    c.delete_terminal(sa, "t2").await.unwrap();
    c.unbind_terminal(sa, "t3").await.unwrap();
    c.bind_terminal(sa, "t3", &db, SharePolicy::Shared)
        .await
        .unwrap_err();
    c.create_terminal(a, n("t4")).await.unwrap();
    c.bind_terminal(sa, "t4", &web, SharePolicy::Exclusive)
        .await
        .unwrap();
    // Tenant b sees none of it.
    let e = c.terminal(Scope::Tenant(b), "t1").await;
    assert!(matches!(e, Err(ControlError::NotFound { .. })), "{e:?}");
}

#[tokio::test]
async fn a_message_acts_on_the_bound_vm_only_and_every_forgery_is_refused() {
    let store = Arc::new(MemStore::new());
    let c = control(&store);
    hosts_answer(&c).await;
    let tenant = TenantId::new_random();
    let web = vm(store.as_ref(), tenant, "web", "h1").await;
    let other = vm(store.as_ref(), tenant, "other", "h2").await;
    let made = c.create_terminal(tenant, n("kiosk")).await.unwrap();
    let (t, secret, server) = (made.terminal.id, made.secret.as_str(), made.server.as_str());
    let now = control::now_ms();

    // Not bound yet.
    let e = c
        .perform_operation(&message(server, t, secret, 1, now, KEY_A))
        .await;
    assert!(matches!(e, Err(Refused::Unbound(_))), "{e:?}");
    c.bind_terminal(
        Scope::Tenant(tenant),
        "kiosk",
        &web.to_string(),
        SharePolicy::Shared,
    )
    .await
    .unwrap();

    let ok = c
        .perform_operation(&message(server, t, secret, 2, now, KEY_A))
        .await
        .unwrap();
    assert_eq!((ok.vm, ok.host.as_str(), ok.seq), (web, "h1", 2));
    assert_eq!(ok.outcome, model::terminals::OperationOutcome::Performed);
    assert!(ok.performed.is_some());
    // A body naming another VM still acts on the bound one.
    let naming = format!(r#"{{"operation":{{"op":"power","action":"reset"}},"vm":"{other}"}}"#);
    let ok = c
        .perform_operation(&message(server, t, secret, 3, now, &naming))
        .await
        .unwrap();
    assert_eq!(ok.vm, web);

    let refusals: Vec<(&str, Vec<u8>)> = vec![
        ("replay", message(server, t, secret, 3, now, KEY_A)),
        ("bad_mac", message(server, t, "vterm_guess", 4, now, KEY_A)),
        ("bad_mac", {
            // A body changed after signing.
            let m = message(server, t, secret, 5, now, KEY_A);
            String::from_utf8(m)
                .unwrap()
                .replace("\"a\"", "\"b\"")
                .into_bytes()
        }),
        (
            "stale_timestamp",
            message(server, t, secret, 6, now - 60_000, KEY_A),
        ),
        (
            "stale_timestamp",
            message(server, t, secret, 7, now + 60_000, KEY_A),
        ),
        (
            "wrong_server",
            message("vinfra-elsewhere", t, secret, 8, now, KEY_A),
        ),
        (
            "unknown_terminal",
            message(server, TerminalId::new_random(), secret, 9, now, KEY_A),
        ),
        (
            "bad_operation",
            message(
                server,
                t,
                secret,
                12,
                now,
                r#"{"operation":{"op":"key","qcode":"nope","down":true}}"#,
            ),
        ),
        ("malformed", b"{\"header\":1}".to_vec()),
        ("malformed", b"not json".to_vec()),
        ("too_large", vec![b' '; 20_000]),
    ];
    for (reason, raw) in &refusals {
        let e = c.perform_operation(raw).await.unwrap_err();
        assert_eq!(e.reason(), *reason, "{e}");
    }
    let counts = c.terminal_refusals();
    assert_eq!(counts["bad_mac"], 2);
    assert_eq!(counts["stale_timestamp"], 2);
    assert_eq!(counts["unbound"], 1);
    // Refused messages took no sequence number: 4 is still free.
    c.perform_operation(&message(server, t, secret, 4, now, KEY_A))
        .await
        .unwrap();

    // Out of order within the window is fine once; a restarted server (a new control
    // layer over the same store) still refuses what the first one performed.
    c.perform_operation(&message(server, t, secret, 10, now, KEY_A))
        .await
        .unwrap();
    let restarted = control(&store);
    let e = restarted
        .perform_operation(&message(server, t, secret, 10, now, KEY_A))
        .await;
    assert!(matches!(e, Err(Refused::Replay(_))), "{e:?}");
    restarted
        .perform_operation(&message(server, t, secret, 9, now, KEY_A))
        .await
        .unwrap();

    // The record of what was performed (in the store: whichever server took it) names
    // terminal, VM and seq, in sequence order.
    let log = c
        .terminal_operations(Scope::Tenant(tenant), "kiosk")
        .await
        .unwrap();
    let seqs: Vec<u64> = log.iter().map(|o| o.seq).collect();
    assert_eq!(seqs, vec![2, 3, 4, 9, 10]);
    assert!(log.iter().all(|o| o.vm == web && o.terminal == t));

    // A deleted terminal's secret is worthless.
    c.delete_terminal(Scope::Tenant(tenant), "kiosk")
        .await
        .unwrap();
    let e = c
        .perform_operation(&message(server, t, secret, 11, now, KEY_A))
        .await;
    assert!(matches!(e, Err(Refused::UnknownTerminal(_))), "{e:?}");
}

#[tokio::test]
async fn a_terminal_over_its_rate_is_told_when_to_retry() {
    let store = Arc::new(MemStore::new());
    let c = control(&store);
    hosts_answer(&c).await;
    let tenant = TenantId::new_random();
    let web = vm(store.as_ref(), tenant, "web", "h1").await;
    let made = c.create_terminal(tenant, n("fast")).await.unwrap();
    c.bind_terminal(
        Scope::Tenant(tenant),
        "fast",
        &web.to_string(),
        SharePolicy::Shared,
    )
    .await
    .unwrap();
    let now = control::now_ms();
    let mut refused = None;
    for seq in 1..=200 {
        let raw = message(
            &made.server,
            made.terminal.id,
            &made.secret,
            seq,
            now,
            KEY_A,
        );
        if let Err(e) = c.perform_operation(&raw).await {
            refused = Some((seq, e));
            break;
        }
    }
    let (seq, e) = refused.expect("the burst ends");
    // The burst is 100; refill during the loop may let a few more through.
    assert!((101..=130).contains(&seq), "refused at {seq}");
    assert!(
        matches!(e, Refused::RateLimited { retry_after_ms, .. } if (1..=1000).contains(&retry_after_ms)),
        "{e:?}"
    );
}
