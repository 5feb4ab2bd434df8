//! The REST API of a real `vinfra server` process: auth, tenancy, bad input.

use serde_json::json;

use crate::harness::{cli, path_in, Server};

async fn raw(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String, String) {
    let http = reqwest::Client::new();
    let mut req = http.request(method, format!("{}{path}", server.url));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let ctype = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    (status, ctype, res.text().await.unwrap())
}

#[tokio::test]
async fn every_call_needs_a_valid_token() {
    let s = Server::start().await;
    for (method, path) in [
        (reqwest::Method::GET, "/v1/vms"),
        (reqwest::Method::GET, "/v1/hosts"),
        (reqwest::Method::POST, "/v1/tenants"),
        (reqwest::Method::GET, "/metrics"),
    ] {
        let (status, ctype, body) = raw(&s, method.clone(), path, None, None).await;
        assert_eq!(status, 401, "{method} {path} without a token: {body}");
        assert!(ctype.starts_with("application/problem+json"), "{ctype}");
        let (status, _, _) = raw(&s, method.clone(), path, Some("not-a-token"), None).await;
        assert_eq!(status, 401, "{method} {path} with a bad token");
    }
    let (status, _, body) = raw(&s, reqwest::Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"/v1/vms\""), "openapi lists the vm routes");
    // The token file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.dir.path().join("admin-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn bad_input_gets_a_4xx_naming_the_field() {
    let s = Server::start().await;
    let t = s.admin_token();
    let cases: &[(&str, &str, u16, &str)] = &[
        ("/v1/tenants", "{\"name\": ", 400, ""),
        ("/v1/tenants", "{\"name\": \"a\", \"colour\": 1}", 422, "colour"),
        ("/v1/tenants", "{\"name\": \"Bad Name\"}", 422, "name"),
        ("/v1/tenants", "{\"name\": 7}", 422, "name"),
        (
            "/v1/vms",
            "{\"name\": \"x\", \"image\": \"default\", \"vcpus\": 0, \"memory_mib\": 256}",
            422,
            "vcpus",
        ),
        (
            "/v1/vms",
            "{\"name\": \"x\", \"image\": \"default\", \"vcpus\": 1, \"memory_mib\": 99999999999}",
            422,
            "memory_mib",
        ),
        (
            "/v1/vms",
            "{\"name\": \"x\", \"image\": \"default\", \"vcpus\": -1, \"memory_mib\": 256}",
            422,
            "vcpus",
        ),
        (
            "/v1/hosts",
            "{\"name\": \"h\", \"cpus\": 1, \"memory_mib\": 1, \"disk_gib\": 1, \"drivers\": [\"Q!\"]}",
            422,
            "drivers[0]",
        ),
    ];
    for (path, body, want, field) in cases {
        let (status, ctype, text) =
            raw(&s, reqwest::Method::POST, path, Some(&t), Some(body)).await;
        assert_eq!(status, *want, "POST {path} {body}: {text}");
        assert!(ctype.starts_with("application/problem+json"), "{ctype}");
        let p: serde_json::Value = serde_json::from_str(&text).unwrap();
        let detail = p["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(field),
            "detail {detail:?} should name {field:?}"
        );
    }
}

#[tokio::test]
async fn tenants_never_see_each_other() {
    let s = Server::start().await;
    let admin = s.admin();
    let a = admin.create_tenant("tenant-a").await.unwrap().token;
    let b = admin.create_tenant("tenant-b").await.unwrap().token;
    // A host and an image to place VMs with; no agent needed for the record.
    admin
        .register_host(&model::api::RegisterHost {
            name: "h1".into(),
            cpus: 8,
            vcpus: None,
            memory_mib: 8192,
            disk_gib: 10,
            drivers: vec!["qemu".into()],
            agent_url: None,
            nbd_addr: None,
            link_addr: None,
            uplink_ip: None,
        })
        .await
        .unwrap();
    let kernel = path_in(&s, "vmlinuz");
    std::fs::write(&kernel, b"no VM boots in this test").unwrap();
    admin
        .upload_image(
            &client::ImageFiles {
                kernel: Some(kernel),
                ..Default::default()
            },
            model::api::CreateImage {
                name: "img".into(),
                kernel: None,
                initrd: None,
                disk_template: None,
                cmdline: String::new(),
                disk_mib: 16,
                tenant: None,
            },
        )
        .await
        .unwrap();
    let ca = client::Client::new(&s.url, &a).unwrap();
    let cb = client::Client::new(&s.url, &b).unwrap();
    let vm = ca
        .create_vm(&model::api::CreateVm {
            name: "secret".into(),
            image: "img".into(),
            vcpus: 1,
            memory_mib: 64,
            host: None,
            tenant: None,
            redundant: false,
            disk_gib: None,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(cb.list_vms().await.unwrap().is_empty(), "b sees no vm");
    for target in [vm.id.to_string(), "secret".to_owned()] {
        assert_eq!(cb.get_vm(&target).await.unwrap_err().status(), Some(404));
        assert_eq!(cb.stop_vm(&target).await.unwrap_err().status(), Some(404));
        assert_eq!(cb.delete_vm(&target).await.unwrap_err().status(), Some(404));
    }
    // B can use the same name in its own tenant.
    cb.create_vm(&model::api::CreateVm {
        name: "secret".into(),
        image: "img".into(),
        vcpus: 1,
        memory_mib: 64,
        host: None,
        tenant: None,
        redundant: false,
        disk_gib: None,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(ca.list_vms().await.unwrap().len(), 1);
    assert_eq!(admin.list_vms().await.unwrap().len(), 2, "admin sees all");
    // A member cannot mint tokens or register hosts.
    assert_eq!(
        ca.create_tenant("evil").await.unwrap_err().status(),
        Some(403)
    );
    // The CLI shows the same through a member token, as JSON for scripts.
    let (ok, out, err) = cli(&s, &a, &["vm", "list", "-o", "json"]);
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().map(|a| a.len()), Some(1), "{out}");
    assert_eq!(list[0]["name"], json!("secret"));
    let (ok, _, err) = cli(&s, &b, &["vm", "show", &vm.id.to_string()]);
    assert!(!ok);
    assert!(err.contains("not found"), "{err}");
}

#[tokio::test]
async fn descriptors_are_refused_by_the_api_with_the_validators_messages() {
    let s = Server::start().await;
    let t = s.admin_token();
    let ex = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/nfv");
    let bad = s.dir.path().join("bad.yaml");
    let good = std::fs::read_to_string(format!("{ex}/vnfd-web.yaml")).unwrap();
    // Break a reference: the CP binds to a VDU that does not exist.
    let broken = good.replacen("virtual_binding: ", "virtual_binding: nosuch", 1);
    assert_ne!(broken, good, "the example has a virtual_binding to break");
    std::fs::write(&bad, &broken).unwrap();
    let (ok, _, local) = cli(&s, &t, &["vnfd", "validate", bad.to_str().unwrap()]);
    assert!(!ok);
    let (ok, _, remote) = cli(&s, &t, &["vnfd", "create", bad.to_str().unwrap()]);
    assert!(!ok, "the API must refuse it");
    let first = local
        .lines()
        .find(|l| l.contains("virtual_binding"))
        .unwrap_or_else(|| panic!("local validation names the field: {local}"))
        .trim();
    assert!(
        remote.contains(first),
        "same message from the API:\nlocal: {local}\nremote: {remote}"
    );
    for f in ["vnfd-web.yaml", "vnfd-firewall.yaml"] {
        let (ok, out, err) = cli(&s, &t, &["vnfd", "create", &format!("{ex}/{f}")]);
        assert!(ok, "{f}: {out}{err}");
    }
    let (ok, out, err) = cli(&s, &t, &["nsd", "create", &format!("{ex}/nsd-edge.yaml")]);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = cli(&s, &t, &["vnfd", "list", "-o", "json"]);
    assert!(ok);
    let l: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(l.as_array().map(|a| a.len()), Some(2), "{out}");
}
