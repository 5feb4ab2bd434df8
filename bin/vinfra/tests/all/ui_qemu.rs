//! The dashboard in headless Chromium against real QEMU guests (TCG) on two agents: a VM
//! created from the VMs page boots (its serial console, followed on its page, prints the
//! guest's TICK lines), migrates live from its page with its hit-ratio curve plotted from
//! the destination's reports until `completed`; the example NS instantiated from the
//! Network services page shows its VNFs per site and its link going up inside the guests,
//! scales its web VNF out and back in, another tenant's member does not see it, and
//! terminating it leaves nothing.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::browser::Browser;
use crate::harness::{cli, cluster, path_in, spawn_agent, wait_host_up};

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/nfv")
}

#[tokio::test]
async fn dashboard_with_qemu_guests_migrates_with_a_curve_and_links_the_example_ns() {
    let b = Browser::start().await;
    let (s, token_file) = cluster().await;
    let (dir_a, dir_b) = (path_in(&s, "ha"), path_in(&s, "hb"));
    let _agent_a = spawn_agent(&s, "host-a", &dir_a, &token_file);
    let _agent_b = spawn_agent(&s, "host-b", &dir_b, &token_file);
    wait_host_up(&s, "host-a").await;
    wait_host_up(&s, "host-b").await;
    let t = s.admin_token();
    let ex = examples();
    for (kind, file) in [
        ("vnfd", "vnfd-firewall.yaml"),
        ("vnfd", "vnfd-web.yaml"),
        ("nsd", "nsd-edge.yaml"),
    ] {
        let (ok, out, err) = cli(&s, &t, &[kind, "create", ex.join(file).to_str().unwrap()]);
        assert!(ok, "{kind} create {file}: {out}{err}");
    }
    b.log_in(&s.url, &t).await;

    // A real guest: created from the form, its console followed on its page.
    b.goto(&format!("{}/ui/vms", s.url)).await;
    b.fill("#name", "db-1").await;
    b.select("#host", "host-a").await;
    b.click("#create-vm button[type=submit]").await;
    b.wait_for_text(".flash", "VM db-1 created on host-a").await;
    b.click("tr[data-vm='db-1'] th a").await;
    b.wait_for_text("h1", "VM db-1").await;
    b.wait_for_text("#vm-facts .state", "running").await;
    b.wait_for_text("#console", "TICK 3").await;
    // The console follows its end.
    assert_eq!(
        b.exec(
            "const c = document.getElementById('console'); \
             return c.scrollTop + c.clientHeight >= c.scrollHeight - 8;",
            json!([])
        )
        .await,
        json!(true)
    );
    b.screenshot("vm").await;

    // Live migration from its page; the curve is plotted from the destination's reports.
    b.select("#to", "host-b").await;
    b.select("#strategy", "heat+pattern").await;
    b.click("#migrate-form button[type=submit]").await;
    b.wait_for_text("h1", "Migration of db-1").await;
    b.wait_for_text("#migration-state", "completed").await;
    test_utils::wait_for(Duration::from_secs(30), || async {
        b.exec(
            "const e = document.getElementById('curve'); \
             return e.dataset.states === 'completed' && Number(e.dataset.points || 0) > 0 \
                    && !!e.querySelector('canvas');",
            json!([]),
        )
        .await
            == json!(true)
    })
    .await
    .expect("the hit-ratio curve is plotted");
    b.screenshot("migration").await;
    b.goto(&format!("{}/ui/migrations", s.url)).await;
    b.wait_for_text("#migrations-table tbody", "completed")
        .await;
    b.wait_for_text("#strategies-table tr[data-strategy='heat+pattern'] td", "1")
        .await;
    b.screenshot("migrations").await;

    // The example NS, instantiated from the page: VNFs per site, then its link up.
    b.goto(&format!("{}/ui/ns", s.url)).await;
    b.select("#nsd", "nsd-edge").await;
    b.fill("#name", "edge").await;
    b.fill("#sites", "site-a=vinfra:host-a\nsite-b=vinfra:host-b")
        .await;
    b.click("#ns-form button[type=submit]").await;
    b.wait_for_text(".flash", "instantiating edge").await;
    b.wait_for_text("article[data-ns='edge'] .site", "site-a")
        .await;
    b.wait_text(
        "article[data-ns='edge'] table.links td.state",
        "the link up",
        |t| t.starts_with("up"),
    )
    .await;
    b.wait_for_text("article[data-ns='edge'] h3", "instantiated")
        .await;
    b.wait_for_text("article[data-ns='edge'] li[data-vnf='web'] .vdus", "1 VDU")
        .await;
    b.screenshot("ns").await;
    // Scale the web VNF out by one VDU (a third guest boots), then back in.
    b.click(
        "article[data-ns='edge'] form[action$='/scale'] input[value='web'] ~ button[value='out']",
    )
    .await;
    b.wait_for_text(".flash", "scaling edge web out").await;
    b.wait_for_text("article[data-ns='edge'] li[data-vnf='web'] .vdus", "2 VDUs")
        .await;
    b.wait_for_text("article[data-ns='edge'] h3", "instantiated")
        .await;
    b.click(
        "article[data-ns='edge'] form[action$='/scale'] input[value='web'] ~ button[value='in']",
    )
    .await;
    b.wait_for_text(".flash", "scaling edge web in").await;
    b.wait_for_text("article[data-ns='edge'] li[data-vnf='web'] .vdus", "1 VDU")
        .await;
    b.wait_for_text("article[data-ns='edge'] h3", "instantiated")
        .await;

    // Another tenant's member sees none of it.
    let other = s.admin().create_tenant("blue").await.unwrap().token;
    b.click("form[action='/ui/logout'] button").await;
    b.wait_for_text("h1", "Log in").await;
    b.log_in(&s.url, &other).await;
    for page in ["ns", "vms", "migrations", "operations", "hosts"] {
        b.goto(&format!("{}/ui/{page}", s.url)).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let text = b.body_text().await;
        assert!(
            !text.contains("edge") && !text.contains("db-1"),
            "{page} shows the admin's objects to another tenant:\n{text}"
        );
    }

    // Back as the admin: terminate, and nothing is left.
    b.click("form[action='/ui/logout'] button").await;
    b.log_in(&s.url, &t).await;
    b.goto(&format!("{}/ui/ns", s.url)).await;
    b.click("article[data-ns='edge'] button.terminate").await;
    b.wait_for_text(".flash", "terminating edge").await;
    b.wait_for_text("#ns-live", "No network service instances.")
        .await;
    let left: Vec<_> = s
        .admin()
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.name.as_str().starts_with("edge-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    b.quit().await;
}
