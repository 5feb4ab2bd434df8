//! One round trip over a real socket through the typed client.

use std::sync::Arc;

use client::{Client, VmDeletion};
use model::api::{CreateImage, CreateToken, CreateVm, ObservedReport, RegisterHost, ReportedState};
use model::{ObservedState, Role};

#[tokio::test]
async fn client_drives_the_server_over_tcp() {
    let store = Arc::new(store::testing::MemStore::new());
    let dir = tempfile::tempdir().unwrap();
    let admin_token = api::bootstrap_admin(store.as_ref(), dir.path())
        .await
        .unwrap()
        .unwrap();
    let config = api::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        blobs: Some(api::BlobConfig {
            dir: dir.path().join("blobs"),
            import_dir: None,
            max_bytes: api::DEFAULT_MAX_BLOB_BYTES,
        }),
        ..api::ServerConfig::default()
    };
    let server = api::serve(config, store).await.unwrap();
    let base = format!("http://{}", server.addr());
    let admin = Client::new(&base, &admin_token).unwrap();

    let tenant = admin.create_tenant("acme").await.unwrap();
    let member = Client::new(&base, &tenant.token).unwrap();
    let agent_token = admin
        .create_token(&CreateToken::new(Role::Agent))
        .await
        .unwrap();
    let agent = Client::new(&base, &agent_token.token).unwrap();

    let host = agent
        .register_host(&RegisterHost {
            name: "h1".into(),
            cpus: 4,
            vcpus: None,
            memory_mib: 4096,
            disk_gib: 20,
            drivers: vec!["process".into()],
            agent_url: None,
            nbd_addr: None,
            link_addr: None,
            uplink_ip: None,
        })
        .await
        .unwrap();
    let beat = agent.heartbeat("h1").await.unwrap();
    assert_eq!(beat.host.id, host.host.id);
    assert_eq!(beat.lease_ms, 6_000, "the default heartbeat timeout");
    // Streamed up and back down through the client, digest checked both ways.
    let kernel = dir.path().join("vmlinuz");
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&kernel, &bytes).unwrap();
    let files = client::ImageFiles {
        kernel: Some(kernel.clone()),
        ..Default::default()
    };
    let image = admin
        .upload_image(
            &files,
            CreateImage {
                name: "debian".into(),
                kernel: None,
                initrd: None,
                disk_template: None,
                cmdline: String::new(),
                disk_mib: 512,
                tenant: None,
            },
        )
        .await
        .unwrap();
    let digest = client::file_digest(&kernel).await.unwrap();
    assert_eq!(image.kernel.as_deref(), Some(digest.as_str()));
    let back = dir.path().join("back");
    assert_eq!(
        agent.download_blob(&digest, &back).await.unwrap(),
        3_000_000
    );
    assert_eq!(std::fs::read(&back).unwrap(), bytes);
    let vm = member
        .create_vm(&CreateVm {
            name: "web".into(),
            image: "debian".into(),
            vcpus: 1,
            memory_mib: 256,
            host: None,
            tenant: None,
            redundant: false,
            disk_gib: None,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(vm.host.as_str(), "h1");
    assert_eq!(member.list_vms().await.unwrap(), vec![vm.clone()]);

    let assigned = agent.assignments("h1").await.unwrap();
    assert_eq!(assigned.len(), 1);
    assert_eq!(assigned[0].image.name.as_str(), "debian");
    agent
        .report_observed(
            vm.id,
            &ObservedReport {
                host: "h1".into(),
                state: ReportedState::Running,
                error: None,
                console_tail: Some("booted\n".into()),
                cpu_time_ms: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        member.get_vm("web").await.unwrap().observed,
        ObservedState::Running
    );
    assert_eq!(member.console("web").await.unwrap(), "booted\n");

    // Errors carry the status and the problem detail.
    let err = member.get_vm("nope").await.unwrap_err();
    assert_eq!(err.status(), Some(404));
    assert_eq!(err.detail(), Some("vm nope not found"));
    let err = member
        .create_vm(&CreateVm {
            name: "big".into(),
            image: "debian".into(),
            vcpus: 0,
            memory_mib: 256,
            host: None,
            tenant: None,
            redundant: false,
            disk_gib: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(422));
    assert_eq!(err.detail(), Some("vcpus: must be between 1 and 64, got 0"));
    let err = Client::new(&base, "wrong")
        .unwrap()
        .list_vms()
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401));

    match member.delete_vm("web").await.unwrap() {
        VmDeletion::Pending(vm) => assert_eq!(vm.desired, model::DesiredState::Deleted),
        VmDeletion::Deleted => panic!("host is up: deletion must wait for the agent"),
    }
    agent
        .report_observed(
            vm.id,
            &ObservedReport {
                host: "h1".into(),
                state: ReportedState::Deleted,
                error: None,
                console_tail: None,
                cpu_time_ms: None,
            },
        )
        .await
        .unwrap();
    assert!(member.list_vms().await.unwrap().is_empty());

    let doc = member.openapi().await.unwrap();
    assert!(doc["paths"]["/v1/vms"].is_object());
    assert!(admin
        .metrics()
        .await
        .unwrap()
        .contains("vinfra_hosts{state=\"up\"} 1"));
    server.shutdown().await.unwrap();
}

/// Two servers of one store, given to the client as a list: when the one in use cannot
/// be reached, requests go to the other, which stays in use.
#[tokio::test]
async fn a_client_given_several_servers_moves_on_when_one_is_gone() {
    let store: Arc<dyn store::Store> = Arc::new(store::testing::MemStore::new());
    let dir = tempfile::tempdir().unwrap();
    let admin = api::bootstrap_admin(store.as_ref(), dir.path())
        .await
        .unwrap()
        .unwrap();
    let serve = || {
        api::serve(
            api::ServerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                ..api::ServerConfig::default()
            },
            store.clone(),
        )
    };
    let (one, two) = (serve().await.unwrap(), serve().await.unwrap());
    let (a, b) = (
        format!("http://{}/", one.addr()),
        format!("http://{}/", two.addr()),
    );
    let c = Client::new(&format!("{a},{b}"), &admin).unwrap();
    c.create_tenant("t1").await.unwrap();
    assert_eq!(c.base_url().as_str(), a);
    one.shutdown().await.unwrap();
    c.create_tenant("t2").await.unwrap();
    assert_eq!(c.base_url().as_str(), b);
    let names: Vec<String> = c
        .list_tenants()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    assert!(
        names.contains(&"t1".into()) && names.contains(&"t2".into()),
        "{names:?}"
    );
    two.shutdown().await.unwrap();
    let e = c.list_tenants().await.unwrap_err();
    assert!(e.to_string().contains("tenants"), "{e}");
}
