//! The web dashboard (`/ui`) in a real headless Chromium, driven over WebDriver, against
//! a real `vinfra server` with three agents on the sim driver (the real agent, disk stack
//! and migration protocol; a simulated hypervisor, so that the pages, not TCG boots, are
//! what this test waits for): log in (a bad token first), create a VM (a bad name first)
//! and see it running, migrate it and see the hit-ratio curve appear and the migration
//! end at `completed`, preview, enter and exit maintenance, the traffic page, the server killed and
//! restarted under an open page without logging the user out, and another tenant's
//! member seeing none of it. Screenshots of each page go to `$VINFRA_SCREENSHOTS`
//! (`docs/ui` regenerates the README's).

use std::time::Duration;

use model::HostState;
use serde_json::json;

use crate::browser::Browser;
use crate::harness::{agent_token_file, cli, path_in, sim_default_image, spawn_agent_in, Server};

const HOSTS: [&str; 3] = ["host-a", "host-b", "host-c"];

/// A server with three sim agents and the sim image as `default`.
async fn sim_cluster() -> (Server, Vec<test_utils::ChildGuard>) {
    let dir = tempfile::Builder::new()
        .prefix("vi")
        .tempdir_in("/tmp")
        .unwrap();
    let store = format!("redb:{}", dir.path().join("state.redb").display());
    // Traffic statistics on, for the Traffic page (sim guests have no NICs: it stays empty).
    let vswitch = format!("127.0.0.1:{}", test_utils::free_tcp_port());
    let s = Server::start_with_args(dir, store, &["--vswitch-listen", &vswitch]).await;
    let admin = s.admin();
    let token_file = agent_token_file(&s).await;
    sim_default_image(&s, "").await;
    let agents = HOSTS
        .iter()
        .map(|h| {
            spawn_agent_in(
                &s,
                h,
                &path_in(&s, h),
                &token_file,
                &[],
                None,
                &["--driver", "sim", "--sim-boot-ms", "100"],
            )
        })
        .collect();
    for h in HOSTS {
        test_utils::wait_for(Duration::from_secs(30), || async {
            admin
                .get_host(h)
                .await
                .is_ok_and(|x| x.state == HostState::Up)
        })
        .await
        .unwrap_or_else(|_| panic!("{h} did not come up:\n{}", s.log()));
    }
    (s, agents)
}

#[tokio::test]
async fn dashboard_in_chromium_logs_in_creates_migrates_drains_and_keeps_tenants_apart() {
    let b = Browser::start().await;
    let (mut s, _agents) = sim_cluster().await;
    let admin_token = s.admin_token();

    // Every page needs a session: the login page, where a bad token gets the message
    // beside the field.
    b.goto(&format!("{}/ui/vms", s.url)).await;
    b.wait_for_text("h1", "Log in").await;
    b.fill("#token", "vinfra_0000").await;
    b.click("form[action='/ui/login'] button[type=submit]")
        .await;
    b.wait_for_text("#token-error", "token: unknown or revoked token")
        .await;
    b.screenshot("login").await;
    // By keyboard: the token field has the focus; Enter submits.
    b.goto(&format!("{}/ui/login", s.url)).await;
    assert_eq!(
        b.exec("return document.activeElement.id;", json!([])).await,
        json!("token")
    );
    b.fill("#token", &format!("{admin_token}\u{E007}")).await;
    b.wait_for_text("h1", "Hosts").await;
    // An unknown page is an HTML page that says so.
    b.goto(&format!("{}/ui/nope", s.url)).await;
    b.wait_for_text("main", "no route for /ui/nope").await;
    b.goto(&format!("{}/ui/hosts", s.url)).await;
    // The cookie is HttpOnly: no script of the page can read the token.
    let cookies = b.exec("return document.cookie;", json!([])).await;
    assert_eq!(
        cookies,
        json!(""),
        "the session cookie is visible to scripts"
    );

    // Hosts, live.
    for h in HOSTS {
        b.wait_for_text(&format!("tr[data-host='{h}'] td.state"), "up")
            .await;
    }

    // A VM: a bad name first (the API's message beside the field, the form kept), then
    // a good one, which the live table shows running.
    b.goto(&format!("{}/ui/vms", s.url)).await;
    b.fill("#name", "Not A Name").await;
    b.select("#host", "host-a").await;
    b.click("#create-vm button[type=submit]").await;
    let err = b.wait_for_text("#name-error", "name:").await;
    assert!(!err.is_empty());
    assert_eq!(
        b.exec("return document.querySelector('#name').value;", json!([]))
            .await,
        json!("Not A Name")
    );
    b.fill("#name", "web-1").await;
    b.select("#host", "host-a").await;
    b.click("#create-vm button[type=submit]").await;
    b.wait_for_text(".flash", "VM web-1 created on host-a")
        .await;
    b.wait_for_text("tr[data-vm='web-1'] td.state", "running")
        .await;
    b.screenshot("vms").await;

    // Networks: a bad subnet (the message beside it), then two; one deleted again.
    b.goto(&format!("{}/ui/networks", s.url)).await;
    b.fill("#name", "green").await;
    b.fill("#cidr", "10.70.0.0/33").await;
    b.click("#network-form button[type=submit]").await;
    b.wait_for_text("#cidr-error", "cidr:").await;
    b.fill("#cidr", "10.70.0.0/24").await;
    b.click("#network-form button[type=submit]").await;
    b.wait_for_text(".flash", "network green (10.70.0.0/24) created")
        .await;
    b.fill("#name", "tmp").await;
    b.fill("#cidr", "10.71.0.0/24").await;
    b.click("#network-form button[type=submit]").await;
    b.wait_for_text("tr[data-network='tmp']", "10.71.0.0/24")
        .await;
    b.click("tr[data-network='tmp'] form button").await;
    b.wait_for_text(".flash", "network deleted").await;
    b.wait_text("#networks-table tbody", "tmp gone", |t| {
        t.contains("green") && !t.contains("tmp")
    })
    .await;
    b.screenshot("networks").await;
    b.goto(&format!("{}/ui/vms", s.url)).await;

    // Its page, then a live migration to host-b: the curve appears, the state ends at
    // completed.
    b.click("tr[data-vm='web-1'] th a").await;
    b.wait_for_text("h1", "VM web-1").await;
    b.select("#to", "host-b").await;
    b.select("#strategy", "heat+pattern").await;
    b.click("#precopy").await;
    b.click("#migrate-form button[type=submit]").await;
    b.wait_for_text("h1", "Migration of web-1").await;
    b.wait_for_text("#migration-state", "completed").await;
    b.wait_for_text("#migration-facts", "cache pre-copied")
        .await;
    test_utils::wait_for(Duration::from_secs(30), || async {
        b.exec(
            "const e = document.getElementById('curve'); return Number(e.dataset.points || 0) > 0 && !!e.querySelector('canvas');",
            json!([]),
        )
        .await
            == json!(true)
    })
    .await
    .expect("the hit-ratio curve is plotted");
    // After `completed` the destination keeps reporting its cache's hits and misses
    // (model::WARMUP_REPORT_MS): the curve the page plots (its JSON, as app.js fetches
    // it) gets several points and climbs as the guest's reads hit the rebuilt cache.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let ys: Vec<f64> = loop {
        let v = b
            .exec(
                "return fetch(document.getElementById('curve').dataset.src)\
                 .then((r) => r.json()).then((d) => d.series[0].y);",
                json!([]),
            )
            .await;
        let ys: Vec<f64> = serde_json::from_value(v).unwrap_or_default();
        if ys.len() >= 6 {
            break ys;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the curve stopped at {ys:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (first, last) = (ys[0], ys[ys.len() - 1]);
    assert!(
        last > first && last >= 50.0,
        "the hit ratio does not climb: {ys:?}"
    );
    test_utils::wait_for(Duration::from_secs(10), || async {
        b.exec(
            "return Number(document.getElementById('curve').dataset.points || 0);",
            json!([]),
        )
        .await
        .as_u64()
        .is_some_and(|n| n >= 6)
    })
    .await
    .expect("the plot shows the points after completion");
    b.screenshot("migration-sim").await;
    b.goto(&format!("{}/ui/migrations", s.url)).await;
    b.wait_for_text("#migrations-table tbody", "completed")
        .await;
    test_utils::wait_for(Duration::from_secs(30), || async {
        b.exec(
            "const e = document.getElementById('curves'); return e.dataset.states === 'completed' && !!e.querySelector('canvas');",
            json!([]),
        )
        .await
            == json!(true)
    })
    .await
    .expect("the migrations page plots the completed curve");
    b.wait_for_text("#strategies-table tr[data-strategy='heat+pattern'] td", "1")
        .await;
    // The last benchmark: a bad document gets its message beside the field; then a
    // small run's result (`vinfra bench migrate-cache --result`'s document), read from
    // its file by the page, one curve per strategy.
    b.fill("#doc", "{\"kind\": \"nope\"}").await;
    b.click("#bench-form button[type=submit]").await;
    b.wait_for_text("#doc-error", "doc: not a migrate-cache result")
        .await;
    let rows =
        tokio::task::spawn_blocking(|| cache::bench::run_bench(cache::bench::BenchOptions::tiny()))
            .await
            .unwrap()
            .unwrap();
    let doc = cache::bench::result_doc(&rows, true, control::now_ms());
    let doc_file = path_in(&s, "bench-result.json");
    std::fs::write(&doc_file, serde_json::to_vec(&doc).unwrap()).unwrap();
    b.choose_file("#doc-file", &doc_file).await;
    test_utils::wait_for(Duration::from_secs(10), || async {
        b.exec(
            "return document.getElementById('doc').value.length;",
            json!([]),
        )
        .await
        .as_u64()
        .is_some_and(|n| n > 100)
    })
    .await
    .expect("the page reads the chosen file (the bad text replaced)");
    b.click("#bench-form button[type=submit]").await;
    b.wait_for_text(".flash", "benchmark result uploaded").await;
    let strategies = doc.rows.len();
    test_utils::wait_for(Duration::from_secs(30), || async {
        b.exec(
            "const e = document.getElementById('bench-0'); \
             return Number(e.dataset.series || 0) === arguments[0] && !!e.querySelector('canvas');",
            json!([strategies]),
        )
        .await
            == json!(true)
    })
    .await
    .expect("the benchmark's curves are plotted, one per strategy");
    b.wait_for_text("#bench-table", "heat+pattern").await;
    b.screenshot("migrations-sim").await;
    b.exec(
        "document.getElementById('bench').scrollIntoView();",
        json!([]),
    )
    .await;
    b.screenshot("migrations-bench").await;
    let vm = s.admin().get_vm("web-1").await.unwrap();
    assert_eq!(vm.host.as_str(), "host-b");

    // Maintenance of host-b: the dry run lists web-1 and changes nothing; entering moves
    // it away live; exiting releases the host.
    b.goto(&format!("{}/ui/hosts", s.url)).await;
    b.select("#host", "host-b").await;
    b.click("#maintenance-form button[value=preview]").await;
    b.wait_for_text("#drain-plan", "web-1").await;
    b.screenshot("hosts-maintenance-preview").await;
    assert!(s
        .admin()
        .get_host("host-b")
        .await
        .unwrap()
        .maintenance
        .is_none());
    b.select("#host", "host-b").await;
    b.click("#maintenance-form button[value=enter]").await;
    b.wait_for_text(".flash", "host-b entering maintenance")
        .await;
    b.wait_for_text("tr[data-host='host-b'] td.maintenance", "in_maintenance")
        .await;
    b.wait_text(
        "tr[data-host='host-b'] td.vms",
        "no VM on host-b",
        str::is_empty,
    )
    .await;
    b.screenshot("hosts").await;
    b.select("#host", "host-b").await;
    b.click("#maintenance-form button[value=exit]").await;
    b.wait_for_text(".flash", "host-b released").await;
    b.wait_text(
        "tr[data-host='host-b'] td.maintenance",
        "no maintenance",
        |t| t == "—",
    )
    .await;

    // Operations: the migration and the drain.
    b.goto(&format!("{}/ui/operations", s.url)).await;
    b.wait_for_text("#operations-table tbody", "drain").await;
    b.wait_for_text("#operations-table tbody", "migration")
        .await;
    b.screenshot("operations").await;
    b.goto(&format!("{}/ui/ns", s.url)).await;
    b.wait_for_text("h1", "Network services").await;
    b.screenshot("ns-empty").await;
    // Traffic: the tables, and the rates sampled every second.
    b.goto(&format!("{}/ui/traffic", s.url)).await;
    b.wait_for_text("#traffic-classes", "intra_server").await;
    test_utils::wait_for(Duration::from_secs(30), || async {
        b.exec(
            "const e = document.getElementById('rates'); \
             return Number(e.dataset.points || 0) >= 2 && !!e.querySelector('canvas');",
            json!([]),
        )
        .await
            == json!(true)
    })
    .await
    .expect("the traffic rates are plotted");
    b.screenshot("traffic").await;
    // Slices: an instance and an association (through the CLI), then the page with the
    // ledger's signed head and the association's inclusion proof checked.
    for args in [
        &[
            "slice",
            "create",
            "embb-a",
            "--sst",
            "1",
            "--provider",
            "site-a",
            "--capacity-mbps",
            "100",
        ][..],
        &["slice", "associate", "embb", "ue-1"][..],
    ] {
        let (ok, out, err) = cli(&s, &admin_token, args);
        assert!(ok, "vinfra {args:?}: {out}{err}");
    }
    b.goto(&format!("{}/ui/slices", s.url)).await;
    b.wait_for_text("#nsis-table", "embb-a").await;
    b.wait_for_text("tr[data-client='ue-1']", "embb-a").await;
    b.wait_for_text("#ledger-head .signature", "verified").await;
    b.wait_for_text("tr[data-proof='ue-1']", "verified").await;
    b.screenshot("slices").await;
    // Terminals: one bound to web-1 (host-a or host-c after the drain) that sends a line.
    let creds = path_in(&s, "kiosk.json").display().to_string();
    for args in [
        &["terminal", "create", "kiosk", "--credentials", &creds][..],
        &["terminal", "bind", "kiosk", "web-1"][..],
    ] {
        let (ok, out, err) = cli(&s, &admin_token, args);
        assert!(ok, "vinfra {args:?}: {out}{err}");
    }
    let (ok, out, err) = cli(
        &s,
        "no-token-needed",
        &["terminal", "send", "--credentials", &creds, "--text", "hi"],
    );
    assert!(ok, "terminal send: {out}{err}");
    b.goto(&format!("{}/ui/terminals", s.url)).await;
    b.wait_for_text("article[data-terminal='kiosk'] .binding", "bound to web-1")
        .await;
    b.wait_for_text("article[data-terminal='kiosk'] tbody", "hi")
        .await;
    // The browser terminal: the page reads the credentials file and its keys reach the
    // VM (the sim guest prints a console line per input event); the secret stays out of
    // the page and of the cookie.
    b.choose_file("#bt-file", std::path::Path::new(&creds))
        .await;
    test_utils::wait_for(Duration::from_secs(10), || async {
        b.exec(
            "return document.getElementById('bt-creds').value.length;",
            json!([]),
        )
        .await
        .as_u64()
        .is_some_and(|n| n > 0)
    })
    .await
    .expect("the page reads the credentials file");
    b.click("#bt-use").await;
    b.wait_for_text("#bt-status", "Terminal kiosk").await;
    b.type_keys("#bt-keys", "vm\u{E003}\u{E007}").await;
    b.wait_text("#bt-log", "every key performed", |t| {
        t.matches("performed").count() >= 2 && !t.contains("refused") && !t.contains('…')
    })
    .await;
    test_utils::wait_for(Duration::from_secs(20), || async {
        let c = s.admin().console("web-1").await.unwrap_or_default();
        ["v", "m", "backspace", "ret"]
            .iter()
            .all(|k| c.contains(&format!("INPUT key {k} down")))
    })
    .await
    .expect("the keys typed in the browser reach the VM");
    // The pointer box (a click is a move to its centre, a press and a release), the power
    // buttons and the screenshot, whose picture the page shows.
    b.click("#bt-pointer").await;
    b.click("button[data-power='pause']").await;
    b.click("button[data-power='resume']").await;
    b.click("#bt-screenshot").await;
    b.wait_text("#bt-log", "pointer, power and screenshot performed", |t| {
        t.matches("performed").count() >= 7 && !t.contains("refused") && !t.contains('…')
    })
    .await;
    test_utils::wait_for(Duration::from_secs(20), || async {
        let c = s.admin().console("web-1").await.unwrap_or_default();
        // Near the middle of the box (the centre's client coordinates may be fractional).
        let centred = c
            .lines()
            .filter_map(|l| l.strip_prefix("INPUT move "))
            .any(|xy| {
                xy.split(' ')
                    .filter_map(|v| v.parse::<i32>().ok())
                    .filter(|v| (v - 16383).abs() < 1200)
                    .count()
                    == 2
            });
        centred && c.contains("INPUT button left down") && c.contains("INPUT button left up")
    })
    .await
    .expect("the pointer clicked in the browser reaches the VM");
    let shot = b
        .exec(
            "const i = document.getElementById('bt-shot'); return [i.hidden, i.naturalWidth, i.alt];",
            json!([]),
        )
        .await;
    assert_eq!(shot[0], json!(false), "the screenshot is not shown: {shot}");
    assert!(shot[1].as_u64().is_some_and(|w| w > 0), "{shot}");
    b.wait_for_text("article[data-terminal='kiosk'] tbody", "backspace")
        .await;
    let secret =
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&creds).unwrap())
            .unwrap()["secret"]
            .as_str()
            .unwrap()
            .to_owned();
    let page = b
        .exec(
            "return document.documentElement.outerHTML + document.cookie + location.href;",
            json!([]),
        )
        .await;
    assert!(
        !page.as_str().unwrap_or_default().contains(&secret),
        "the terminal's secret is in the page"
    );
    b.screenshot("terminals").await;
    // A button pressed in the pointer box and never released: leaving the page ends the
    // terminal's session, and the server releases the button on the VM.
    let ups = |c: &str| c.matches("INPUT button left up").count();
    let before = ups(&s.admin().console("web-1").await.unwrap_or_default());
    b.exec(
        "const p = document.getElementById('bt-pointer'); const r = p.getBoundingClientRect(); \
         p.dispatchEvent(new MouseEvent('mousedown', {button: 0, bubbles: true, \
         clientX: r.left + 5, clientY: r.top + 5})); return true;",
        json!([]),
    )
    .await;
    b.wait_text("#bt-log", "the press performed", |t| {
        t.matches("performed").count() >= 9 && !t.contains('…')
    })
    .await;
    b.goto(&format!("{}/ui/terminals", s.url)).await;
    test_utils::wait_for(Duration::from_secs(20), || async {
        ups(&s.admin().console("web-1").await.unwrap_or_default()) > before
    })
    .await
    .expect("the button held when the page went is released");

    // Resource tables: one made through the API on host-a, served by its agent; a
    // device (a `vinfra resource-table attach` process on the agent's socket) takes a
    // grant and writes an entry, and the page shows the device, the grant, the entry's
    // version and the audit, live.
    let (ok, out, err) = cli(
        &s,
        &admin_token,
        &[
            "resource-table",
            "create",
            "flows-ui",
            "--host",
            "host-a",
            "--entries",
            "16",
            "--entry-size",
            "248",
        ],
    );
    assert!(ok, "resource-table create: {out}{err}");
    b.goto(&format!("{}/ui/resource-tables", s.url)).await;
    let article = "section[data-host='host-a'] article[data-table='flows-ui']";
    b.wait_for_text(article, "16 entries of 248 bytes").await;
    b.wait_for_text(article, "serving").await;
    let socket = s
        .admin()
        .get_resource_table("host-a", "flows-ui")
        .await
        .unwrap()
        .state
        .expect("the page showed the agent's report")
        .socket;
    let mut dev = std::process::Command::new(crate::harness::VINFRA)
        .args(["resource-table", "attach", &socket])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn a device");
    let mut dev_in = dev.stdin.take().unwrap();
    let mut dev_out = std::io::BufReader::new(dev.stdout.take().unwrap());
    let _dev = test_utils::ChildGuard::new(dev);
    let mut dev_cmd = |c: &str| {
        use std::io::{BufRead, Write};
        if !c.is_empty() {
            writeln!(dev_in, "{c}").unwrap();
            dev_in.flush().unwrap();
        }
        let mut l = String::new();
        dev_out.read_line(&mut l).unwrap();
        l.trim_end().to_owned()
    };
    assert!(dev_cmd("").starts_with("ready "));
    assert!(dev_cmd("req 5 60000").starts_with("granted "));
    let written = dev_cmd("write 5 seen in the browser");
    let version = written
        .strip_prefix("written ")
        .unwrap_or_else(|| panic!("{written}"))
        .to_owned();
    b.wait_for_text(&format!("{article} table.devices tbody"), "process")
        .await;
    b.wait_for_text(&format!("{article} tr[data-grant-entry='5']"), "5")
        .await;
    b.wait_for_text(&format!("{article} tr[data-entry='5']"), &version)
        .await;
    b.wait_for_text(&format!("{article} table.audit"), "granted")
        .await;
    b.screenshot("resource-tables").await;

    // A server restart under an open page: it keeps polling, and the user stays logged in
    // (a lost session would have sent the whole page to the login form, mark and all).
    b.goto(&format!("{}/ui/vms", s.url)).await;
    b.wait_for_text("tr[data-vm='web-1'] td.state", "running")
        .await;
    b.exec(
        "document.querySelector('#vms-live').dataset.mark = 'before';",
        json!([]),
    )
    .await;
    s.kill9_and_restart().await;
    b.exec(
        "document.querySelector('#vms-table').dataset.seen = 'before-poll';",
        json!([]),
    )
    .await;
    test_utils::wait_for(Duration::from_secs(30), || async {
        b.exec(
            "const t = document.querySelector('#vms-table'); \
             return !!t && !t.dataset.seen && t.innerText.includes('web-1');",
            json!([]),
        )
        .await
            == json!(true)
    })
    .await
    .expect("the live table is refreshed after the restart");
    assert_eq!(
        b.exec(
            "return document.querySelector('#vms-live').dataset.mark || '';",
            json!([])
        )
        .await,
        json!("before"),
        "the page was reloaded"
    );
    b.goto(&format!("{}/ui/hosts", s.url)).await;
    b.wait_for_text("h1", "Hosts").await;
    assert!(b.url().await.ends_with("/ui/hosts"));

    // A member of another tenant sees the hosts but none of the admin's objects, and
    // the VM's page is not found.
    let other = s.admin().create_tenant("blue").await.unwrap().token;
    b.click("form[action='/ui/logout'] button").await;
    b.wait_for_text("h1", "Log in").await;
    b.log_in(&s.url, &other).await;
    b.wait_for_text("#who", "member").await;
    for h in HOSTS {
        b.wait_for_text(&format!("tr[data-host='{h}'] td.state"), "up")
            .await;
    }
    let seen = |page: &'static str| {
        let b = &b;
        let url = format!("{}/ui/{page}", s.url);
        async move {
            b.goto(&url).await;
            b.wait_for_text("main", "").await;
            // One refresh of the live region too.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            b.body_text().await
        }
    };
    // Traffic statistics are an admin's, as in the API.
    b.goto(&format!("{}/ui/traffic", s.url)).await;
    b.wait_for_text("main .error", "needs a token with role admin")
        .await;
    for page in [
        "hosts",
        "vms",
        "migrations",
        "operations",
        "ns",
        "slices",
        "terminals",
        "networks",
        "resource-tables",
    ] {
        let text = seen(page).await;
        assert!(
            !text.contains("web-1")
                && !text.contains("embb-a")
                && !text.contains("ue-1")
                && !text.contains("kiosk")
                && !text.contains("green")
                && !text.contains("flows-ui"),
            "{page} shows the admin's objects to another tenant:\n{text}"
        );
    }
    b.goto(&format!("{}/ui/migrations", s.url)).await;
    b.wait_for_text("#bench-meta", "No benchmark result uploaded by this tenant")
        .await;
    b.goto(&format!("{}/ui/vms", s.url)).await;
    b.wait_for_text("#vms-table caption", "VMs (0)").await;
    b.screenshot("vms-other-tenant").await;
    b.goto(&format!("{}/ui/vms/{}", s.url, vm.id)).await;
    b.wait_for_text("main", "not found").await;
    // A change posted without the session's CSRF token is refused.
    let status = b
        .exec(
            "return fetch('/ui/vms', {method: 'POST', headers: {'Content-Type': 'application/x-www-form-urlencoded'}, \
             body: 'name=x&image=default&vcpus=1&memory_mib=64'}).then((r) => r.status);",
            json!([]),
        )
        .await;
    assert_eq!(status, json!(403));
    assert!(s.admin().get_vm("x").await.is_err());
    b.quit().await;
}
