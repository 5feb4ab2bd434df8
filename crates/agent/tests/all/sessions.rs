//! Terminal sessions (a WebSocket per terminal) end to end on the sim driver: keys a
//! dropped session held are released on the VM, a resumed session never performs a
//! number twice, a session carries one terminal, a foreign page cannot open one, and
//! operations sent while the VM migrates reach it exactly once, in order.

use std::time::{Duration, Instant};

use client::session::TerminalSession;
use client::terminal::TerminalCredentials;
use model::api::MigrateVm;
use model::terminal_ops::Operation;
use model::terminals::{
    BindTerminal, CreateTerminal, OperationOutcome, SessionReplies, SessionReply, SharePolicy,
    SERVER_SEQ_BASE,
};
use model::MigrationState;

use crate::harness::{self, Cluster, WAIT};

async fn terminal(c: &Cluster, name: &str, vm: &str) -> TerminalCredentials {
    let made = c
        .admin
        .create_terminal(&CreateTerminal {
            name: name.into(),
            tenant: None,
        })
        .await
        .unwrap();
    c.admin
        .bind_terminal(
            name,
            &BindTerminal {
                vm: vm.into(),
                policy: SharePolicy::Shared,
            },
        )
        .await
        .unwrap();
    TerminalCredentials::new(&made, &c.url)
}

/// A cluster with one agent (`host-a`), its VM `web` running, and terminal `kiosk`
/// bound to it.
async fn one_vm() -> (
    Cluster,
    std::sync::Arc<compute::SimDriver>,
    harness::TestAgent,
    model::Vm,
    TerminalCredentials,
) {
    let c = Cluster::start().await;
    let da = Cluster::driver();
    let a = c.agent("host-a", &da).await;
    let web = c.create_vm("web", "host-a").await;
    c.wait_running(&web).await;
    let creds = terminal(&c, "kiosk", "web").await;
    (c, da, a, web, creds)
}

fn key(q: &str, down: bool) -> String {
    format!(r#"{{"operation":{{"op":"key","qcode":"{q}","down":{down}}}}}"#)
}

fn performed(r: &SessionReply) -> &model::terminals::PerformedOperation {
    match r {
        SessionReply::Answer { operation } if operation.outcome == OperationOutcome::Performed => {
            operation
        }
        other => panic!("not performed: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_session_releases_the_keys_it_held() {
    let (c, da, _a, web, creds) = one_vm().await;
    let now = control::now_ms();

    let mut s = TerminalSession::connect(&creds, None).await.unwrap();
    performed(&s.call(1, now, &key("shift", true)).await.unwrap());
    performed(&s.call(2, now, &key("a", true)).await.unwrap());
    performed(&s.call(3, now, &key("a", false)).await.unwrap());
    performed(&s.call(4, now, &key("ctrl", true)).await.unwrap());
    // The client vanishes holding Shift and Ctrl: no close frame, the socket just goes.
    let dropped = Instant::now();
    drop(s);
    let id = web.id.to_string();
    let released = |ops: &[Operation]| {
        ops.iter()
            .filter(|o| matches!(o, Operation::Key { down: false, .. }))
            .count()
    };
    harness::wait("the held keys released", || {
        let ops = da.performed(&id);
        async move { released(&ops) == 3 }
    })
    .await;
    eprintln!(
        "held keys released {:?} after the client vanished",
        dropped.elapsed()
    );
    let ops = da.performed(&id);
    // Last pressed, first released; `a` (already up) is not released again.
    let tail: Vec<String> = ops[4..]
        .iter()
        .map(|o| match o {
            Operation::Key { qcode, down } => {
                format!("{}{}", qcode.as_str(), if *down { "+" } else { "-" })
            }
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(tail, ["ctrl-", "shift-"], "{ops:?}");
    // The releases are in the terminal's log as the server's own operations. Their outcome
    // is recorded when the agent's answer reaches the server, which can be just after the
    // driver performed them: wait for it rather than read the log once.
    harness::wait("the releases logged as performed", || async {
        let log = c.admin.terminal_operations("kiosk").await.unwrap();
        let server: Vec<_> = log.iter().filter(|o| o.seq > SERVER_SEQ_BASE).collect();
        server.len() == 2
            && server
                .iter()
                .all(|o| o.outcome == OperationOutcome::Performed)
    })
    .await;
    let log = c.admin.terminal_operations("kiosk").await.unwrap();
    let server: Vec<_> = log.iter().filter(|o| o.seq > SERVER_SEQ_BASE).collect();
    assert_eq!(server.len(), 2, "{log:?}");
    assert!(server.iter().all(|o| o.vm == web.id), "{log:?}");

    // A session closed properly while holding nothing releases nothing.
    let mut s = TerminalSession::connect(&creds, None).await.unwrap();
    performed(&s.call(5, now, &key("b", true)).await.unwrap());
    performed(&s.call(6, now, &key("b", false)).await.unwrap());
    let (tx, _rx) = s.split();
    tx.close().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(da.performed(&id).len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_performs_each_number_once() {
    let (_c, da, _a, web, creds) = one_vm().await;
    let now = control::now_ms();
    let typed = |t: &str| format!(r#"{{"operation":{{"op":"type_text","text":"{t}"}}}}"#);

    let mut s = TerminalSession::connect(&creds, None).await.unwrap();
    for seq in 1..=3 {
        performed(&s.call(seq, now, &typed("x")).await.unwrap());
    }
    // The client vanishes before it read every answer.
    drop(s);

    // The client reconnects and resends 3 (whose answer it may have missed) and 4.
    let t0 = Instant::now();
    let mut s = TerminalSession::connect(&creds, None).await.unwrap();
    eprintln!("reconnected in {:?}", t0.elapsed());
    match s.call(3, now, &typed("x")).await.unwrap() {
        SessionReply::Refused {
            seq,
            reason,
            previous,
            ..
        } => {
            assert_eq!((seq, reason.as_str()), (Some(3), "replay"));
            let prev = previous.expect("the earlier record");
            assert_eq!((prev.seq, prev.outcome), (3, OperationOutcome::Performed));
        }
        other => panic!("{other:?}"),
    }
    performed(&s.call(4, now, &typed("x")).await.unwrap());
    let ops = da.performed(&web.id.to_string());
    // 1, 2, 3, 4: once each.
    assert_eq!(ops.len(), 4, "{ops:?}");

    // A burst sent without waiting (recorded in batches), with one number repeated
    // inside it: every other one performed, in order; the repeat refused.
    let (mut tx, mut rx) = s.split();
    let burst: Vec<u64> = (5..45).chain([20]).chain(45..60).collect();
    for seq in &burst {
        tx.send(*seq, now, &key("a", seq % 2 == 1)).await.unwrap();
    }
    let mut got = Vec::new();
    for seq in &burst {
        match rx.next().await.unwrap().unwrap() {
            SessionReply::Answer { operation } => {
                assert_eq!(
                    (operation.seq, operation.outcome),
                    (*seq, OperationOutcome::Performed)
                );
                got.push(operation.seq);
            }
            SessionReply::Refused {
                seq: Some(20),
                reason,
                previous: Some(p),
                ..
            } => {
                assert_eq!((reason.as_str(), p.seq), ("replay", 20));
            }
            other => panic!("{seq}: {other:?}"),
        }
    }
    assert_eq!(got, (5..60).collect::<Vec<_>>());
    let ops = da.performed(&web.id.to_string());
    assert_eq!(ops.len(), 4 + 55, "{ops:?}");
    let downs: Vec<bool> = ops[4..]
        .iter()
        .map(|o| matches!(o, Operation::Key { down: true, .. }))
        .collect();
    assert_eq!(downs, (5..60u64).map(|s| s % 2 == 1).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_carries_one_terminal_and_only_from_its_own_origin() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let (c, da, _a, web, first) = one_vm().await;
    let second = terminal(&c, "other", "web").await;
    let now = control::now_ms();
    let addr = c.url.trim_start_matches("http://").to_owned();
    let url = format!("ws://{addr}/v1/terminal-sessions");

    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let send = |m: Vec<u8>| Message::Binary(m.into());
    ws.send(send(first.sign(1, now, &key("a", true))))
        .await
        .unwrap();
    ws.send(send(second.sign(1, now, &key("b", true))))
        .await
        .unwrap();
    ws.send(send(b"{not json".to_vec())).await.unwrap();
    let mut replies = Vec::new();
    while replies.len() < 3 {
        if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
            replies.push(serde_json::from_str::<SessionReply>(t.as_str()).unwrap());
        }
    }
    performed(&replies[0]);
    assert!(
        matches!(&replies[1], SessionReply::Refused { reason, seq: Some(1), .. } if reason == "other_terminal"),
        "{:?}",
        replies[1]
    );
    assert!(
        matches!(&replies[2], SessionReply::Refused { reason, seq: None, .. } if reason == "malformed"),
        "{:?}",
        replies[2]
    );
    drop(ws);
    // Only `a` went down (and comes up again when the session went).
    harness::wait("the release", || {
        let n = da.performed(&web.id.to_string()).len();
        async move { n == 2 }
    })
    .await;

    // A page of another site cannot open a session; this server's own page can.
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", format!("http://{addr}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap();
}

/// `?replies=brief`: each answer is the message's number and outcome (a failure's reason
/// with it), not the record; refusals are as on any session; the records are in the log as
/// always. A mode the server does not know is refused before the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brief_session_answers_with_number_and_outcome() {
    let (c, da, _a, web, creds) = one_vm().await;
    let now = control::now_ms();
    let mut s = TerminalSession::connect_with(&creds, None, SessionReplies::Brief)
        .await
        .unwrap();
    for (seq, down) in [(1, true), (2, false)] {
        match s.call(seq, now, &key("a", down)).await.unwrap() {
            SessionReply::Outcome {
                seq: got,
                outcome: OperationOutcome::Performed,
                detail: None,
                screenshot: None,
            } => assert_eq!(got, seq),
            other => panic!("message {seq}: {other:?}"),
        }
    }
    match s.call(2, now, &key("a", true)).await.unwrap() {
        SessionReply::Refused {
            reason,
            seq: Some(2),
            ..
        } => assert_eq!(reason, "replay"),
        other => panic!("a replay: {other:?}"),
    }
    let sent = serde_json::to_string(&SessionReply::Outcome {
        seq: 1,
        outcome: OperationOutcome::Performed,
        detail: None,
        screenshot: None,
    })
    .unwrap();
    assert!(sent.len() < 64, "{sent}");
    assert_eq!(da.performed(&web.id.to_string()).len(), 2);
    let log = c.admin.terminal_operations("kiosk").await.unwrap();
    assert_eq!(log.len(), 2, "{log:?}");

    let addr = c.url.trim_start_matches("http://").to_owned();
    let err =
        tokio_tungstenite::connect_async(format!("ws://{addr}/v1/terminal-sessions?replies=terse"))
            .await
            .unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
}

/// Once a session has its terminal, a message's header may leave out the server and the
/// terminal (the MAC still covers the session's): refused before the first accepted
/// message and on a one-off POST; a message signed as another terminal but sent without
/// naming it is taken as the session's terminal's and fails its MAC. The Rust client
/// sends such headers once the session answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_header_may_leave_out_what_the_session_knows() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let (c, da, _a, web, creds) = one_vm().await;
    let other = terminal(&c, "other", "web").await;
    let now = control::now_ms();
    let addr = c.url.trim_start_matches("http://").to_owned();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/terminal-sessions"))
        .await
        .unwrap();
    let mut call = async |m: Vec<u8>| -> SessionReply {
        ws.send(Message::Binary(m.into())).await.unwrap();
        loop {
            if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
                return serde_json::from_str(t.as_str()).unwrap();
            }
        }
    };
    let short = creds.sign_in_session(1, now, &key("a", true));
    assert!(short.len() + 90 < creds.sign(1, now, &key("a", true)).len());
    match call(short).await {
        SessionReply::Refused {
            reason,
            seq: Some(1),
            detail,
            ..
        } => {
            assert_eq!(reason, "malformed", "{detail}");
        }
        other => panic!("before the session has a terminal: {other:?}"),
    }
    performed(&call(creds.sign(2, now, &key("a", true))).await);
    performed(&call(creds.sign_in_session(3, now, &key("a", false))).await);
    match call(other.sign_in_session(4, now, &key("b", true))).await {
        SessionReply::Refused { reason, .. } => assert_eq!(reason, "bad_mac"),
        r => panic!("another terminal's message without its name: {r:?}"),
    }
    let err = c
        .admin
        .send_operation(creds.sign_in_session(5, now, &key("c", true)))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("server and terminal are missing"),
        "{err}"
    );
    assert_eq!(da.performed(&web.id.to_string()).len(), 2);

    // The client: its first message names the terminal, the ones after it need not.
    let mut s = TerminalSession::connect(&creds, None).await.unwrap();
    for seq in 6..9 {
        performed(&s.call(seq, now, &key("d", seq % 2 == 0)).await.unwrap());
    }
    assert_eq!(da.performed(&web.id.to_string()).len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_sent_during_a_migration_reach_the_vm_once_each_in_order() {
    let c = Cluster::start().await;
    let (da, db) = (Cluster::driver(), Cluster::driver());
    let _a = c.agent("host-a", &da).await;
    let _b = c.agent("host-b", &db).await;
    let web = c.create_vm("web", "host-a").await;
    c.wait_running(&web).await;
    c.wait_ticks(&web, 0, 4).await;
    let creds = terminal(&c, "kiosk", "web").await;
    let now = control::now_ms();

    let s = TerminalSession::connect(&creds, None).await.unwrap();
    let (mut tx, mut rx) = s.split();
    let keys = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
    let mut sent = 0u64;
    // One press and release before the migration: performed on host-a. From the
    // migration's start the server holds them, and host-b performs them in order.
    for _ in 0..2 {
        let q = keys[(sent as usize / 2) % keys.len()];
        tx.send(sent + 1, now, &key(q, sent.is_multiple_of(2)))
            .await
            .unwrap();
        sent += 1;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = c
        .admin
        .migrate_vm(
            &web.id.to_string(),
            &MigrateVm {
                to: "host-b".into(),
                strategy: None,
                precopy: false,
            },
        )
        .await
        .unwrap();
    // Press and release key `n` for n = 1, 2, … until the migration is over, 20 ms apart.
    let deadline = Instant::now() + WAIT;
    loop {
        let q = keys[(sent as usize / 2) % keys.len()];
        tx.send(sent + 1, now, &key(q, sent.is_multiple_of(2)))
            .await
            .unwrap();
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let state = c.admin.get_migration(m.id).await.unwrap().state;
        if state.is_final() && sent.is_multiple_of(2) {
            assert_eq!(state, MigrationState::Completed);
            break;
        }
        assert!(Instant::now() < deadline, "the migration did not end");
    }
    let mut hosts = Vec::new();
    for _ in 0..sent {
        let r = rx.next().await.unwrap().unwrap();
        let op = performed(&r);
        hosts.push(op.host.to_string());
    }
    // Every key event reached the VM exactly once, in order, across the two hosts.
    let id = web.id.to_string();
    let mut all = da.performed(&id);
    all.extend(db.performed(&id));
    let got: Vec<String> = all
        .iter()
        .map(|o| match o {
            Operation::Key { qcode, down } => format!("{}{}", qcode.as_str(), down),
            other => format!("{other:?}"),
        })
        .collect();
    let want: Vec<String> = (0..sent)
        .map(|i| {
            format!(
                "{}{}",
                keys[(i as usize / 2) % keys.len()],
                i.is_multiple_of(2)
            )
        })
        .collect();
    assert_eq!(got, want);
    // Some were performed by each host (the session outlived the switch-over).
    let on_b = hosts.iter().filter(|h| *h == "host-b").count();
    eprintln!(
        "{sent} operations during the migration: {} on host-a, {on_b} on host-b",
        hosts.len() - on_b
    );
    assert!(on_b > 0 && on_b < hosts.len(), "{hosts:?}");
    let _ = tx.close().await;
}
