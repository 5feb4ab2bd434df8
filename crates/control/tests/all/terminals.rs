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

/// Terminal `kiosk` of `tenant`, bound to `vm` (shared): its id, secret and server id.
async fn kiosk_on(c: &Control, tenant: TenantId, vm: model::VmId) -> (TerminalId, String, String) {
    let made = c.create_terminal(tenant, n("kiosk")).await.unwrap();
    c.bind_terminal(
        Scope::Tenant(tenant),
        "kiosk",
        &vm.to_string(),
        SharePolicy::Shared,
    )
    .await
    .unwrap();
    (made.terminal.id, made.secret, made.server)
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

/// Operations held while a VM's live migration is on are answered `failed` when the VM
/// is deleted before the migration ends, in the deletion's transaction: none stays `held`
/// forever, and a later message to the deleted VM is refused.
#[tokio::test]
async fn operations_held_for_a_deleted_vm_are_answered_failed() {
    use model::terminals::OperationOutcome;
    let store = Arc::new(MemStore::new());
    let c = control(&store);
    let tenant = TenantId::new_random();
    // On a host that is not up: deleting the VM removes its record at once.
    let web = vm(store.as_ref(), tenant, "web", "h1").await;
    let key = control::records::keys::vm(web);
    let mut rec: model::Vm =
        serde_json::from_slice(&store.get(&key).await.unwrap().unwrap().value).unwrap();
    let mid = model::MigrationId::new_random();
    let m = model::Migration {
        id: mid,
        vm: web,
        tenant,
        vm_name: n("web"),
        from_host: n("h1"),
        to_host: n("h2"),
        strategy: "heat".into(),
        precopy: false,
        dirty: None,
        state: model::MigrationState::Pending,
        peer_nbd: None,
        incoming_uri: None,
        qemu: None,
        progress: None,
        error: None,
        created_at: 0,
        switched_at: None,
        finished_at: None,
    };
    crate::drain::put(store.as_ref(), &control::records::keys::migration(mid), &m).await;
    rec.migration = Some(mid);
    crate::drain::put(store.as_ref(), &key, &rec).await;

    let (t, secret, server) = kiosk_on(&c, tenant, web).await;
    let now = control::now_ms();
    // Two operations, held (nobody answers): each waits for its answer meanwhile.
    let mut waiting = Vec::new();
    for seq in [1, 2] {
        let (c, secret, server) = (c.clone(), secret.clone(), server.clone());
        waiting.push(tokio::spawn(async move {
            c.perform_operation(&message(&server, t, &secret, seq, now, KEY_A))
                .await
        }));
    }
    let held = || async {
        c.terminal_operations(Scope::Tenant(tenant), "kiosk")
            .await
            .unwrap()
            .iter()
            .filter(|o| o.outcome == OperationOutcome::Held)
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while held().await < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the operations were not held"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    let gone = c
        .delete_vm(Scope::Tenant(tenant), &web.to_string())
        .await
        .unwrap();
    assert!(matches!(gone, control::VmDeleted::Removed(_)), "{gone:?}");
    let log = c
        .terminal_operations(Scope::Tenant(tenant), "kiosk")
        .await
        .unwrap();
    assert_eq!(log.len(), 2);
    for o in &log {
        assert_eq!(o.outcome, OperationOutcome::Failed, "{o:?}");
        assert!(o.performed.is_some());
        assert!(
            o.detail.as_deref().unwrap_or_default().contains("deleted"),
            "{o:?}"
        );
    }
    assert!(store
        .get(&format!("/vinfra/held-operations/{web}"))
        .await
        .unwrap()
        .is_none());
    // The waiting senders got an answer (`failed`, or `held` if they stopped waiting
    // before the deletion: 3 s).
    for w in waiting {
        let r = w.await.unwrap().unwrap();
        assert!(
            matches!(r.outcome, OperationOutcome::Failed | OperationOutcome::Held),
            "{r:?}"
        );
    }
    let e = c
        .perform_operation(&message(&server, t, &secret, 3, now, KEY_A))
        .await;
    assert!(matches!(e, Err(Refused::VmGone { .. })), "{e:?}");
}

/// A session reads its terminal's MAC key and binding once and keeps them until they
/// change: a rebind mid-session sends the next message to the new VM, an unbind refuses
/// it, a deleted terminal's next message is refused — none acts on the VM it was
/// checked against before the change.
#[tokio::test]
async fn a_session_follows_its_terminals_binding_as_it_changes() {
    use model::terminals::OperationOutcome;
    let store = Arc::new(MemStore::new());
    let c = control(&store);
    hosts_answer(&c).await;
    let tenant = TenantId::new_random();
    let web = vm(store.as_ref(), tenant, "web", "h1").await;
    let db = vm(store.as_ref(), tenant, "db", "h2").await;
    let made = c.create_terminal(tenant, n("kiosk")).await.unwrap();
    let (t, secret, server) = (made.terminal.id, made.secret.as_str(), made.server.as_str());
    let scope = Scope::Tenant(tenant);
    c.bind_terminal(scope, "kiosk", &web.to_string(), SharePolicy::Shared)
        .await
        .unwrap();
    let now = control::now_ms();
    let mut session = c.terminal_session();
    let mut seq = 0;
    let send = |seq: &mut u64| {
        *seq += 1;
        message(server, t, secret, *seq, now, KEY_A)
    };
    for _ in 0..5 {
        let p = session.submit(&send(&mut seq)).await.unwrap();
        assert_eq!(p.record().vm, web);
    }
    // Rebound to db: the next message goes there.
    c.bind_terminal(scope, "kiosk", &db.to_string(), SharePolicy::Shared)
        .await
        .unwrap();
    let mut on_db = None;
    for _ in 0..100 {
        // The session learns of the change from the store's watch; a message checked
        // before that is refused by the recording transaction, never sent to web.
        match session.submit(&send(&mut seq)).await {
            Ok(p) => {
                on_db = Some(p.record().vm);
                break;
            }
            Err(r) => assert_eq!(r.refused.reason(), "unbound", "{:?}", r.refused),
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(on_db, Some(db));
    // Unbound: refused.
    c.unbind_terminal(scope, "kiosk").await.unwrap();
    let r = session.submit(&send(&mut seq)).await.unwrap_err();
    assert_eq!(r.refused.reason(), "unbound", "{:?}", r.refused);
    // Deleted: refused, though the session had its key.
    c.bind_terminal(scope, "kiosk", &web.to_string(), SharePolicy::Shared)
        .await
        .unwrap();
    let p = session.submit(&send(&mut seq)).await.unwrap();
    assert_eq!(
        p.answer(std::time::Duration::from_secs(5)).await.outcome,
        OperationOutcome::Performed
    );
    c.delete_terminal(scope, "kiosk").await.unwrap();
    let r = session.submit(&send(&mut seq)).await.unwrap_err();
    assert_eq!(r.refused.reason(), "unknown_terminal", "{:?}", r.refused);
}

/// The waiting sender gets the host's answer as the server takes it (the commit
/// follows), and only from the host the operation was sent to; the stored record and the
/// log say the same as the reply.
#[tokio::test]
async fn the_answer_reaches_the_sender_from_its_host_only() {
    use futures_util::StreamExt;
    use model::terminals::{OperationOutcome, OperationResult, PerformedOperation};
    let store = Arc::new(MemStore::new());
    let c = control(&store);
    let tenant = TenantId::new_random();
    let web = vm(store.as_ref(), tenant, "web", "h1").await;
    let (t, secret, server) = kiosk_on(&c, tenant, web).await;
    let mut sent = store.watch(control::terminals::TERMINAL_OPS).await.unwrap();
    let sender = {
        let c = c.clone();
        let raw = message(&server, t, &secret, 1, control::now_ms(), KEY_A);
        tokio::spawn(async move { c.perform_operation(&raw).await })
    };
    let Some(Ok(store::WatchEvent::Put(kv))) = sent.next().await else {
        panic!("no operation was recorded");
    };
    let op: PerformedOperation = serde_json::from_slice(&kv.value).unwrap();
    assert_eq!(
        (op.outcome, op.host.as_str()),
        (OperationOutcome::Sent, "h1")
    );
    let answer = |host: &str, outcome| OperationResult {
        host: host.to_owned(),
        outcome,
        detail: Some(format!("from {host}")),
        screenshot: None,
    };

    // Another host's answer is refused and does not reach the sender.
    let e = c
        .answer_operation(t, 1, answer("h2", OperationOutcome::Failed))
        .await;
    assert!(matches!(e, Err(ControlError::Taken(_))), "{e:?}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(
        !sender.is_finished(),
        "another host's answer reached the sender"
    );

    let stored = c
        .answer_operation(t, 1, answer("h1", OperationOutcome::Performed))
        .await
        .unwrap();
    let replied = sender.await.unwrap().unwrap();
    assert_eq!(replied.outcome, OperationOutcome::Performed);
    assert_eq!(replied.detail.as_deref(), Some("from h1"));
    assert_eq!(replied.performed, stored.performed);
    assert_eq!(
        serde_json::to_value(&replied).unwrap(),
        serde_json::to_value(&stored).unwrap()
    );
    let log = c
        .terminal_operations(Scope::Tenant(tenant), "kiosk")
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&log).unwrap(),
        serde_json::to_value([&stored]).unwrap()
    );
    // A repeated answer (a host sending again after a failed request) is the same one.
    let again = c
        .answer_operation(t, 1, answer("h1", OperationOutcome::Performed))
        .await
        .unwrap();
    assert_eq!(again.performed, stored.performed);
}
