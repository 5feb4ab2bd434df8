//! The dashboard's V2X page in a real headless Chromium against a real `vinfra server`
//! started with `--mec op-a=URL` and a real `vinfra mec serve`: without the MEC's
//! operator token the page shows nothing of it; a wrong token gets the MEC's refusal
//! beside the field; the right one shows the devices, their authorizations and links,
//! live (an authorization made meanwhile appears without a reload); "Forget" and logging
//! out drop the token, and another tenant's member, in the same browser, sees nothing.

use test_utils::free_tcp_port;

use crate::browser::Browser;
use crate::harness::Server;
use crate::v2x::{authorize, mec, v2x};

fn provision(url: &str, dev: &str) -> String {
    let (ok, out, err) = v2x(
        url,
        &["provision", dev, "--services", "36", "--plmns", "002-02"],
    );
    assert!(ok, "{err}");
    let p: serde_json::Value = serde_json::from_str(&out).unwrap();
    p["deviceToken"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn v2x_page_shows_a_mec_only_with_its_operator_token() {
    let b = Browser::start().await;
    let mdir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_tcp_port());
    let _mec = mec(mdir.path(), &listen, None).await;
    let url = format!("http://{listen}");
    let t1 = provision(&url, "car-1");
    let t2 = provision(&url, "car-2");
    let (ok, _, err) = authorize(&url, "car-1", &t1, "10.77.1.1");
    assert!(ok, "{err}");

    let dir = tempfile::Builder::new()
        .prefix("vi")
        .tempdir_in("/tmp")
        .unwrap();
    let store = format!("redb:{}", dir.path().join("state.redb").display());
    let s = Server::start_with_args(dir, store, &["--mec", &format!("op-a={url}")]).await;
    b.log_in(&s.url, &s.admin_token()).await;

    // Without a token: the MEC's name and a form, none of its devices.
    b.goto(&format!("{}/ui/v2x", s.url)).await;
    b.wait_for_text("section[data-mec='op-a'] h2", "MEC op-a")
        .await;
    assert!(
        !b.body_text().await.contains("car-1"),
        "the page shows a MEC's devices without its token"
    );
    // A wrong token: the MEC's refusal beside the field.
    b.fill("#token-op-a", "not-the-token").await;
    b.click("#mec-op-a button[type=submit]").await;
    b.wait_for_text("#token-op-a-error", "MEC op-a refused this operator token")
        .await;
    assert!(!b.body_text().await.contains("car-1"));

    // The right token: devices, live.
    b.fill("#token-op-a", "op-token").await;
    b.click("#mec-op-a button[type=submit]").await;
    b.wait_for_text(".flash", "showing MEC op-a").await;
    b.wait_for_text("tr[data-device='car-1'] td.auth", "authorized")
        .await;
    b.wait_for_text("tr[data-device='car-2'] td.auth", "not authorized")
        .await;
    // The token cookie is HttpOnly like the session's.
    assert_eq!(
        b.exec("return document.cookie;", serde_json::json!([]))
            .await,
        serde_json::json!("")
    );
    let (ok, _, err) = authorize(&url, "car-2", &t2, "10.77.1.2");
    assert!(ok, "{err}");
    let t = b
        .wait_text("tr[data-device='car-2'] td.auth", "car-2 authorized", |t| {
            t.contains("authorized") && !t.contains("not authorized")
        })
        .await;
    assert!(t.contains("s left"), "{t}");
    b.wait_for_text("tr[data-device='car-2']", "10.77.1.2")
        .await;
    b.screenshot("v2x").await;
    // A revocation disappears from the page.
    let (ok, _, err) = v2x(&url, &["revoke", "car-1"]);
    assert!(ok, "{err}");
    b.wait_text("table.v2x-devices", "car-1 gone", |t| {
        !t.contains("car-1") && t.contains("car-2")
    })
    .await;

    // Forget: the form again.
    b.click("form[action='/ui/v2x/op-a/forget'] button").await;
    b.wait_for_text(".flash", "token of MEC op-a forgotten")
        .await;
    assert!(!b.body_text().await.contains("car-2"));

    // Token given again, then logout: another tenant's member in the same browser sees
    // the MEC's name only.
    b.fill("#token-op-a", "op-token").await;
    b.click("#mec-op-a button[type=submit]").await;
    b.wait_for_text("tr[data-device='car-2'] td.auth", "authorized")
        .await;
    let other = s.admin().create_tenant("blue").await.unwrap().token;
    b.click("form[action='/ui/logout'] button").await;
    b.wait_for_text("h1", "Log in").await;
    b.log_in(&s.url, &other).await;
    b.goto(&format!("{}/ui/v2x", s.url)).await;
    b.wait_for_text("section[data-mec='op-a'] h2", "MEC op-a")
        .await;
    let text = b.body_text().await;
    assert!(
        !text.contains("car-2") && text.contains("Operator token of this MEC"),
        "another tenant sees the MEC's devices after the owner logged out:\n{text}"
    );
    b.quit().await;
}
