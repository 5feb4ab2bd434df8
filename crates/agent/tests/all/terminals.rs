//! Terminal operations end to end on the sim driver: a signed message through the real
//! API, pushed to the VM's host, performed by its VM task through the driver, answered.

use base64::Engine;
use client::terminal::TerminalCredentials;
use model::terminal_ops::Operation;
use model::terminals::{BindTerminal, CreateTerminal, OperationOutcome, SharePolicy};

use crate::harness::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_reach_the_bound_vm_and_no_other() {
    let c = Cluster::start().await;
    let (da, db) = (Cluster::driver(), Cluster::driver());
    let _a = c.agent("host-a", &da).await;
    let _b = c.agent("host-b", &db).await;
    let web = c.create_vm("web", "host-a").await;
    let other = c.create_vm("other", "host-b").await;
    c.wait_running(&web).await;
    c.wait_running(&other).await;

    let made = c
        .admin
        .create_terminal(&CreateTerminal {
            name: "kiosk".into(),
            tenant: None,
        })
        .await
        .unwrap();
    c.admin
        .bind_terminal(
            "kiosk",
            &BindTerminal {
                vm: "web".into(),
                policy: SharePolicy::Shared,
            },
        )
        .await
        .unwrap();
    let creds = TerminalCredentials::new(&made, &c.url);
    // A client with no valid token: the message authenticates itself.
    let anon = client::Client::new(&c.url, "no-token").unwrap();
    let now = control::now_ms();
    let mut seq = 0;
    let mut send = |body: String| {
        seq += 1;
        creds.sign(seq, now, &body)
    };

    let t0 = std::time::Instant::now();
    let typed = anon
        .send_operation(send(
            r#"{"operation":{"op":"type_text","text":"hi\n"}}"#.to_owned(),
        ))
        .await
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(typed.outcome, OperationOutcome::Performed, "{typed:?}");
    assert_eq!(typed.vm, web.id);
    assert_eq!(typed.host.as_str(), "host-a");
    eprintln!("type_text answered performed in {took:?}");

    // A body naming the other VM still acts on the bound one.
    let naming = format!(
        r#"{{"operation":{{"op":"key_combo","qcodes":["ctrl","alt","delete"]}},"vm":"{}"}}"#,
        other.id
    );
    let combo = anon.send_operation(send(naming)).await.unwrap();
    assert_eq!(combo.outcome, OperationOutcome::Performed, "{combo:?}");
    assert_eq!(combo.vm, web.id);

    let shot = anon
        .send_operation(send(r#"{"operation":{"op":"screenshot"}}"#.to_owned()))
        .await
        .unwrap();
    let png = shot.screenshot.expect("a screenshot");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&png.png_base64)
        .unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
    assert!(png.width > 0 && png.height > 0);

    // Exactly these reached the bound VM, in order; nothing reached the other.
    let ops = da.performed(&web.id.to_string());
    assert!(
        matches!(
            &ops[..],
            [
                Operation::TypeText { .. },
                Operation::KeyCombo { .. },
                Operation::Screenshot
            ]
        ),
        "{ops:?}"
    );
    assert!(db.performed(&other.id.to_string()).is_empty());
    // The guest printed them on its console (reported with the next pass).
    let t0 = std::time::Instant::now();
    loop {
        let console = c.admin.console(&web.id.to_string()).await.unwrap();
        if console.contains("INPUT key h down") {
            break;
        }
        assert!(t0.elapsed() < crate::harness::WAIT, "{console}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // The log names each, performed.
    let log = c.admin.terminal_operations("kiosk").await.unwrap();
    assert_eq!(log.len(), 3);
    assert!(log
        .iter()
        .all(|o| o.outcome == OperationOutcome::Performed && o.vm == web.id));

    // A replay acts on nothing.
    let replay = anon
        .send_operation(creds.sign(1, now, r#"{"operation":{"op":"type_text","text":"hi\n"}}"#))
        .await
        .unwrap_err();
    assert_eq!(replay.status(), Some(409), "{replay}");
    assert_eq!(da.performed(&web.id.to_string()).len(), 3);
}
