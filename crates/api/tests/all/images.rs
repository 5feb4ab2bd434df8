//! The image store: images name files only by digest, tenants use only their own and
//! shared uploads, admins import only from the configured directory.

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::harness::{App, World};

async fn upload(app: &App, token: &str, ct: &str, body: &str) -> crate::harness::Resp {
    app.raw(Method::POST, "/v1/blobs", Some(token), Some(ct), body)
        .await
}

#[tokio::test]
async fn a_member_cannot_point_an_image_at_host_files() {
    let w = World::new().await;
    let app = &w.app;
    // The request of the security report, verbatim.
    app.post(
        "/v1/images",
        &w.a,
        json!({"name": "x", "disk_mib": 1, "kernel": "/etc/shadow", "initrd": "/root/.ssh/id_rsa",
               "disk_template": "/var/lib/vinfra/../../../etc/shadow"}),
    )
    .await
    .problem(422, "kernel: must be an image-store digest sha256:<64 hex digits> (from POST /v1/blobs or POST /v1/blobs/import); host paths are not accepted");
    for field in ["initrd", "disk_template"] {
        let d = app.blob(&w.a, "k").await;
        let mut body = json!({"name": "x", "disk_mib": 1, "kernel": d});
        body[field] = json!("/etc/passwd");
        app.post("/v1/images", &w.a, body)
            .await
            .problem(422, &format!("{field}: must be an image-store digest"));
    }
    assert_eq!(
        app.get("/v1/images", &w.a)
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1,
        "only the public image; nothing half-made"
    );
}

#[tokio::test]
async fn tenants_use_their_own_and_shared_blobs_only() {
    let w = World::new().await;
    let app = &w.app;
    let bs = app.blob(&w.b, "b's private kernel").await;
    let shared = app.blob(&app.admin, "a public kernel").await;
    // A cannot name B's upload (it does not know it exists either).
    app.post(
        "/v1/images",
        &w.a,
        json!({"name": "x", "kernel": bs, "disk_mib": 1}),
    )
    .await
    .problem(
        422,
        &format!("kernel: no blob {bs} in the image store for this tenant"),
    );
    app.get(&format!("/v1/blobs/{bs}"), &w.a)
        .await
        .problem(404, "blob");
    // B and an agent can read it back, byte for byte; A can use the admin's.
    let r = app.get(&format!("/v1/blobs/{bs}"), &w.b).await;
    assert_eq!(
        (r.status, r.text.as_str()),
        (StatusCode::OK, "b's private kernel")
    );
    let r = app.get(&format!("/v1/blobs/{bs}"), &w.agent).await;
    assert_eq!(r.content_type, "application/octet-stream");
    assert_eq!(r.text, "b's private kernel");
    let r = app
        .post(
            "/v1/images",
            &w.a,
            json!({"name": "x", "kernel": shared, "disk_mib": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // Listing: A sees the shared blob and not B's.
    let listed: Vec<String> = app
        .get("/v1/blobs", &w.a)
        .await
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["digest"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        listed.contains(&shared) && !listed.contains(&bs),
        "{listed:?}"
    );
    // A malformed digest is simply not found.
    app.get("/v1/blobs/..%2F..%2Fetc%2Fshadow", &w.b)
        .await
        .problem(404, "blob");
}

#[tokio::test]
async fn uploads_are_checked_and_bounded() {
    let w = World::new().await;
    let app = &w.app;
    upload(app, &w.a, "application/json", "{}")
        .await
        .problem(415, "Content-Type must be application/octet-stream");
    // The harness's store takes 1 MiB at most.
    upload(
        app,
        &w.a,
        "application/octet-stream",
        &"x".repeat((1 << 20) + 1),
    )
    .await
    .problem(413, "blob: exceeds the limit of 1048576 bytes");
    let zeros = format!("sha256:{}", "0".repeat(64));
    app.raw(
        Method::POST,
        &format!("/v1/blobs?expect={zeros}"),
        Some(&w.a),
        Some("application/octet-stream"),
        "abc",
    )
    .await
    .problem(422, &format!("expect: the upload hashed to sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad, not {zeros}"));
    app.raw(
        Method::POST,
        "/v1/blobs?expect=/etc/shadow",
        Some(&w.a),
        Some("application/octet-stream"),
        "abc",
    )
    .await
    .problem(422, "expect: must be an image-store digest");
    upload(app, "nope", "application/octet-stream", "abc")
        .await
        .problem(401, "bearer token");
    upload(app, &w.agent, "application/octet-stream", "abc")
        .await
        .problem(403, "uploading a blob");
}

#[tokio::test]
async fn admins_import_only_from_the_import_directory() {
    let w = World::new().await;
    let app = &w.app;
    let root = app.dir().join("import");
    std::fs::create_dir_all(root.join("k")).unwrap();
    std::fs::write(root.join("k/vmlinuz"), "imported kernel").unwrap();
    std::fs::write(app.dir().join("secret"), "host secret").unwrap();
    std::os::unix::fs::symlink(app.dir().join("secret"), root.join("escape")).unwrap();

    let r = app
        .post("/v1/blobs/import", &app.admin, json!({"path": "k/vmlinuz"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.json()["size"], 15);
    let d = r.json()["digest"].as_str().unwrap().to_owned();
    assert_eq!(
        app.get(&format!("/v1/blobs/{d}"), &w.a).await.text,
        "imported kernel"
    );
    for bad in ["../secret", "escape", "/etc/shadow", "k/../../secret"] {
        app.post("/v1/blobs/import", &app.admin, json!({ "path": bad }))
            .await
            .problem(422, "resolves outside the import directory");
    }
    app.post("/v1/blobs/import", &app.admin, json!({"path": "k"}))
        .await
        .problem(422, "is not a regular file");
    app.post("/v1/blobs/import", &w.a, json!({"path": "k/vmlinuz"}))
        .await
        .problem(403, "importing a blob");
}

#[tokio::test]
async fn an_image_from_before_the_image_store_cannot_start() {
    let w = World::new().await;
    let app = &w.app;
    // A record as older servers wrote it: host paths.
    let id = "00000000-0000-4000-8000-0000000000aa";
    let legacy = json!({"id": id, "tenant": null, "name": "old", "kernel": "/boot/vmlinuz",
        "initrd": null, "disk_template": null, "cmdline": "", "disk_mib": 64, "created_at": 0});
    app.store
        .put(
            &format!("/vinfra/images/{id}"),
            legacy.to_string().into_bytes().into(),
        )
        .await
        .unwrap();
    app.store
        .put(
            "/vinfra/image-names/public/old",
            format!("\"{id}\"").into_bytes().into(),
        )
        .await
        .unwrap();
    app.post("/v1/vms", &w.a, json!({"name": "v", "image": "old", "vcpus": 1, "memory_mib": 64}))
        .await
        .problem(422, "image: image old names the host file \"/boot/vmlinuz\": images made before the image store cannot start; upload its files again (vinfra image upload)");
}
