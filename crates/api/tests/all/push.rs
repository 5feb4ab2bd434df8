//! The push channel (`GET /v1/hosts/{name}/events`) on real servers over TCP, read with
//! the typed client as an agent reads it: what reaches which host's stream, who may
//! open one, and what a stream does when its server goes (or is another server of the
//! same store).

use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{Client, ClientError, HostEventStream};
use model::api::{
    CreateImage, CreateToken, CreateVm, EnterMaintenance, HostEvent, MigrateVm, MigrationReport,
    ObservedReport, RegisterHost, ReportedState,
};
use model::{DesiredState, MigrationState, Role, TokenScope, VmId};
use store::Store;

/// Longest wait for an event that should come (they come in milliseconds).
const SOON: Duration = Duration::from_secs(10);

/// A server with an admin, an agent and a member of tenant `t`, hosts `h1` and `h2`
/// (with NBD addresses: migrations need them) and an image `img`.
struct Setup {
    server: api::ServerHandle,
    store: Arc<dyn Store>,
    base: String,
    admin: Client,
    agent: Client,
    member: Client,
    _dir: tempfile::TempDir,
}

fn host(name: &str) -> RegisterHost {
    RegisterHost {
        name: name.into(),
        cpus: 8,
        vcpus: None,
        memory_mib: 16384,
        disk_gib: 100,
        drivers: vec!["process".into()],
        agent_url: None,
        nbd_addr: Some("127.0.0.1:10809".into()),
        link_addr: None,
        uplink_ip: None,
    }
}

fn config(listen: &str) -> api::ServerConfig {
    api::ServerConfig {
        listen: listen.parse().unwrap(),
        rate_limit: None,
        ..api::ServerConfig::default()
    }
}

impl Setup {
    async fn new() -> Self {
        Self::on(
            Arc::new(store::testing::MemStore::new()),
            config("127.0.0.1:0"),
        )
        .await
    }

    async fn on(store: Arc<dyn Store>, mut config: api::ServerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let admin_token = api::bootstrap_admin(store.as_ref(), dir.path())
            .await
            .unwrap()
            .unwrap();
        config.blobs = Some(api::BlobConfig {
            dir: dir.path().join("blobs"),
            import_dir: None,
            max_bytes: api::DEFAULT_MAX_BLOB_BYTES,
        });
        let server = api::serve(config, store.clone()).await.unwrap();
        let base = format!("http://{}", server.addr());
        let admin = Client::new(&base, &admin_token).unwrap();
        let agent_token = admin
            .create_token(&CreateToken::new(Role::Agent))
            .await
            .unwrap()
            .token;
        let agent = Client::new(&base, &agent_token).unwrap();
        for h in ["h1", "h2"] {
            agent.register_host(&host(h)).await.unwrap();
        }
        let member = Client::new(&base, &admin.create_tenant("t").await.unwrap().token).unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"kernel").unwrap();
        admin
            .upload_image(
                &client::ImageFiles {
                    kernel: Some(kernel),
                    ..Default::default()
                },
                CreateImage {
                    name: "img".into(),
                    kernel: None,
                    initrd: None,
                    disk_template: None,
                    cmdline: String::new(),
                    disk_mib: 64,
                    tenant: None,
                },
            )
            .await
            .unwrap();
        Self {
            server,
            store,
            base,
            admin,
            agent,
            member,
            _dir: dir,
        }
    }

    async fn vm(&self, name: &str, host: &str) -> model::Vm {
        self.member
            .create_vm(&CreateVm {
                name: name.into(),
                image: "img".into(),
                vcpus: 1,
                memory_mib: 128,
                host: Some(host.into()),
                ..Default::default()
            })
            .await
            .unwrap()
    }

    async fn report(&self, vm: VmId, host: &str, state: ReportedState) {
        self.agent
            .report_observed(
                vm,
                &ObservedReport {
                    host: host.into(),
                    state,
                    error: None,
                    console_tail: None,
                    cpu_time_ms: None,
                },
            )
            .await
            .unwrap();
    }

    /// A stream of `host` past its first line, which must be `resync`.
    async fn follow(&self, host: &str) -> HostEventStream {
        let mut s = self.agent.host_events(host).await.unwrap();
        assert_eq!(next(&mut s).await, HostEvent::Resync);
        s
    }
}

/// The next event (pings skipped), failing the test after [`SOON`].
async fn next(s: &mut HostEventStream) -> HostEvent {
    let end = Instant::now() + SOON;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.next()).await {
            Ok(Some(Ok(HostEvent::Ping))) => {}
            Ok(Some(Ok(ev))) => return ev,
            Ok(other) => panic!("the stream failed or ended: {other:?}"),
            Err(_) => panic!("no event within {SOON:?}"),
        }
    }
}

/// Nothing but pings for `d`.
async fn quiet(s: &mut HostEventStream, d: Duration) {
    let end = Instant::now() + d;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.next()).await {
            Err(_) => return,
            Ok(Some(Ok(HostEvent::Ping))) => {}
            Ok(other) => panic!("expected nothing, got {other:?}"),
        }
    }
}

/// The next event, which must be `vm`'s assignment; returns it.
async fn assignment(s: &mut HostEventStream, vm: VmId) -> model::api::Assignment {
    match next(s).await {
        HostEvent::Assignment { assignment } if assignment.vm.id == vm => *assignment,
        other => panic!("expected an assignment of {vm}, got {other:?}"),
    }
}

async fn unassigned(s: &mut HostEventStream, vm: VmId) {
    assert_eq!(next(s).await, HostEvent::Unassigned { vm });
}

#[tokio::test]
async fn a_stop_reaches_its_hosts_stream_and_no_other() {
    let w = Setup::new().await;
    let (mut h1, mut h2) = (w.follow("h1").await, w.follow("h2").await);
    let vm = w.vm("web", "h1").await;
    let a = assignment(&mut h1, vm.id).await;
    assert_eq!(a.desired(), DesiredState::Running);
    // What the agent gets pushed is what the assignments list says.
    assert_eq!(w.agent.assignments("h1").await.unwrap(), vec![a]);

    // The agent's own report is no news to it.
    w.report(vm.id, "h1", ReportedState::Running).await;
    quiet(&mut h1, Duration::from_millis(300)).await;

    let t = Instant::now();
    w.member.stop_vm("web").await.unwrap();
    let a = assignment(&mut h1, vm.id).await;
    assert_eq!(a.desired(), DesiredState::Stopped);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(w.agent.assignments("h1").await.unwrap(), vec![a]);
    w.member.start_vm("web").await.unwrap();
    assert_eq!(
        assignment(&mut h1, vm.id).await.desired(),
        DesiredState::Running
    );
    // h2 heard nothing of it.
    quiet(&mut h2, Duration::from_millis(200)).await;
    w.server.shutdown().await.unwrap();
}

/// A resource table's create and delete reach its host's stream (`resource_tables`:
/// list them), not another host's; an agent's report of it does not.
#[tokio::test]
async fn a_resource_table_change_reaches_its_host_only() {
    let w = Setup::new().await;
    let (mut h1, mut h2) = (w.follow("h1").await, w.follow("h2").await);
    let spec = model::resource_tables::CreateResourceTable {
        name: "flows".into(),
        entries: 4,
        entry_size: 8,
        max_grant_ms: None,
        tenant: None,
    };
    let t = w.member.create_resource_table("h1", &spec).await.unwrap();
    assert_eq!(next(&mut h1).await, HostEvent::ResourceTables);
    let report = model::resource_tables::ResourceTableReport {
        socket: "/run/x.sock".into(),
        ..Default::default()
    };
    w.agent
        .report_resource_table("h1", t.id, &report)
        .await
        .unwrap();
    w.member.delete_resource_table("h1", "flows").await.unwrap();
    assert_eq!(next(&mut h1).await, HostEvent::ResourceTables);
    quiet(&mut h1, Duration::from_millis(300)).await;
    quiet(&mut h2, Duration::from_millis(300)).await;
    // Reported after the delete: the agent hears the table is gone.
    let e = w
        .agent
        .report_resource_table("h1", t.id, &report)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
}

#[tokio::test]
async fn a_migration_reaches_both_ends_and_its_end_unassigns_the_source() {
    let w = Setup::new().await;
    let (mut h1, mut h2) = (w.follow("h1").await, w.follow("h2").await);
    let vm = w.vm("web", "h1").await;
    assignment(&mut h1, vm.id).await;
    w.report(vm.id, "h1", ReportedState::Running).await;
    let m = w
        .member
        .migrate_vm(
            "web",
            &MigrateVm {
                to: "h2".into(),
                strategy: None,
                precopy: false,
            },
        )
        .await
        .unwrap();
    for s in [&mut h1, &mut h2] {
        let a = assignment(s, vm.id).await;
        let attached = a.migration.expect("the migration is attached");
        assert_eq!(
            (attached.id, attached.state),
            (m.id, MigrationState::Pending)
        );
        assert_eq!(a.vm.host.as_str(), "h1");
    }
    let report = |host: &str, state| MigrationReport {
        host: host.into(),
        state,
        incoming_uri: (state == MigrationState::Ready).then(|| "tcp:127.0.0.1:4444".into()),
        qemu: None,
        progress: None,
        error: None,
        dirty: None,
    };
    // Each step reaches both ends; at switch-over the VM's host is the destination.
    for (who, state) in [
        ("h2", MigrationState::Ready),
        ("h1", MigrationState::Migrating),
        ("h1", MigrationState::Warming),
    ] {
        w.agent
            .report_migration(m.id, &report(who, state))
            .await
            .unwrap();
        for s in [&mut h1, &mut h2] {
            let a = assignment(s, vm.id).await;
            assert_eq!(a.migration.map(|m| m.state), Some(state));
            let on = if state == MigrationState::Warming {
                "h2"
            } else {
                "h1"
            };
            assert_eq!(a.vm.host.as_str(), on);
        }
    }
    w.agent
        .report_migration(m.id, &report("h2", MigrationState::Completed))
        .await
        .unwrap();
    unassigned(&mut h1, vm.id).await;
    let a = assignment(&mut h2, vm.id).await;
    assert_eq!(a.migration, None);
    assert!(w.agent.assignments("h1").await.unwrap().is_empty());
    assert_eq!(w.agent.assignments("h2").await.unwrap(), vec![a]);
    w.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_deleted_or_moved_vm_is_unassigned() {
    let w = Setup::new().await;
    let (mut h1, mut h2) = (w.follow("h1").await, w.follow("h2").await);
    // Deleted: `desired: deleted` first, then gone once the agent confirms.
    let vm = w.vm("gone", "h1").await;
    assignment(&mut h1, vm.id).await;
    w.member.delete_vm("gone").await.unwrap();
    assert_eq!(
        assignment(&mut h1, vm.id).await.desired(),
        DesiredState::Deleted
    );
    w.report(vm.id, "h1", ReportedState::Deleted).await;
    unassigned(&mut h1, vm.id).await;

    // Moved: a drain re-assigns a stopped VM to another host.
    let vm = w.vm("cold", "h1").await;
    assignment(&mut h1, vm.id).await;
    w.member.stop_vm("cold").await.unwrap();
    assignment(&mut h1, vm.id).await;
    w.admin
        .enter_maintenance(
            "h1",
            &EnterMaintenance {
                to: Some("h2".into()),
                ..EnterMaintenance::default()
            },
        )
        .await
        .unwrap();
    unassigned(&mut h1, vm.id).await;
    let a = assignment(&mut h2, vm.id).await;
    assert_eq!(
        (a.vm.host.as_str(), a.desired()),
        ("h2", DesiredState::Stopped)
    );
    w.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn agents_and_admins_follow_any_host_members_none() {
    let w = Setup::new().await;
    // As with the assignments: an agent token is not bound to one host.
    for c in [&w.agent, &w.admin] {
        for h in ["h1", "h2"] {
            let mut s = c.host_events(h).await.unwrap();
            assert_eq!(next(&mut s).await, HostEvent::Resync);
        }
    }
    // A read-only admin token may read, as it may read the assignments.
    let ro = w
        .admin
        .create_token(&CreateToken {
            scope: TokenScope::ReadOnly,
            ..CreateToken::new(Role::Admin)
        })
        .await
        .unwrap()
        .token;
    let ro = Client::new(&w.base, &ro).unwrap();
    assert!(ro.host_events("h1").await.is_ok());

    // VMs of every tenant go by: not for a member.
    let e = w.member.host_events("h1").await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert!(e.detail().unwrap().contains("role agent or admin"), "{e}");
    let e = w.agent.host_events("nope").await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    assert_eq!(e.detail(), Some("host nope not found"));
    let e = w.agent.host_events("Not A Name").await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    let nobody = Client::new(&w.base, "vinfra_nope").unwrap();
    assert_eq!(
        nobody.host_events("h1").await.unwrap_err().status(),
        Some(401)
    );

    // The wire format, as an agent in another language would read it.
    let res = reqwest::Client::new()
        .get(format!("{}/v1/hosts/h1/events", w.base))
        .bearer_auth(
            w.admin
                .create_token(&CreateToken::new(Role::Agent))
                .await
                .unwrap()
                .token,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/x-ndjson");
    let mut res = res;
    let first = res.chunk().await.unwrap().unwrap();
    assert_eq!(&first[..], b"{\"kind\":\"resync\"}\n");
    w.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_quiet_stream_is_pinged_and_a_silent_one_given_up() {
    let store: Arc<dyn Store> = Arc::new(store::testing::MemStore::new());
    let w = Setup::on(
        store,
        api::ServerConfig {
            push_keepalive: Duration::from_millis(100),
            ..config("127.0.0.1:0")
        },
    )
    .await;
    let mut s = w.agent.host_events("h1").await.unwrap();
    assert!(matches!(s.next().await, Some(Ok(HostEvent::Resync))));
    let t = Instant::now();
    assert!(matches!(s.next().await, Some(Ok(HostEvent::Ping))));
    assert!(matches!(s.next().await, Some(Ok(HostEvent::Ping))));
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "{:?}",
        t.elapsed()
    );

    // A client expecting a line more often than the server sends one takes the
    // connection for dead, and says so.
    let mut s = w.agent.host_events("h1").await.unwrap();
    s.set_idle_timeout(Duration::from_millis(20));
    assert!(matches!(s.next().await, Some(Ok(HostEvent::Resync))));
    match s.next().await {
        Some(Err(ClientError::StreamIdle { idle, .. })) => {
            assert_eq!(idle, Duration::from_millis(20));
        }
        other => panic!("expected StreamIdle, got {other:?}"),
    }
    assert!(s.next().await.is_none());
    w.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_server_restart_ends_the_stream_and_the_next_one_starts_with_resync() {
    let w = Setup::new().await;
    let addr = w.server.addr();
    let mut s = w.follow("h1").await;
    let vm = w.vm("web", "h1").await;
    assignment(&mut s, vm.id).await;

    // Shutdown is not held up by the open stream, which ends.
    let t = Instant::now();
    tokio::time::timeout(SOON, w.server.shutdown())
        .await
        .expect("the shutdown finishes with a stream open")
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(s.next().await.is_none(), "the stream ends with its server");

    // The same server again (same store, same address).
    let again = api::serve(config(&addr.to_string()), w.store.clone())
        .await
        .unwrap();
    let mut s = w.agent.host_events("h1").await.unwrap();
    assert_eq!(next(&mut s).await, HostEvent::Resync);
    w.member.stop_vm("web").await.unwrap();
    assert_eq!(
        assignment(&mut s, vm.id).await.desired(),
        DesiredState::Stopped
    );

    // A client given two servers opens its stream on the second when the first is gone.
    let two = api::serve(config("127.0.0.1:0"), w.store.clone())
        .await
        .unwrap();
    let agent_token = w
        .admin
        .create_token(&CreateToken::new(Role::Agent))
        .await
        .unwrap()
        .token;
    let both = Client::new(&format!("{},http://{}", w.base, two.addr()), &agent_token).unwrap();
    again.shutdown().await.unwrap();
    assert!(s.next().await.is_none());
    let mut s = both.host_events("h1").await.unwrap();
    assert_eq!(next(&mut s).await, HostEvent::Resync);
    assert_eq!(both.base_url().port(), Some(two.addr().port()));
    two.shutdown().await.unwrap();
}

/// Three servers on one etcd cluster: a change made through one server reaches the
/// streams open on the others (each server watches the store, not only the leader).
#[tokio::test]
async fn on_etcd_a_change_through_one_server_reaches_streams_on_the_others() {
    test_utils::require_tool("etcd", test_utils::ETCD_INSTALL_HINT).unwrap();
    let etcd = test_utils::EtcdCluster::spawn(3).await.unwrap();
    let connect = || async {
        let s: Arc<dyn Store> = Arc::new(
            store_etcd::EtcdStore::connect(&etcd.endpoints(), None)
                .await
                .unwrap(),
        );
        s
    };
    let a = Setup::on(connect().await, config("127.0.0.1:0")).await;
    let mut others = Vec::new();
    for _ in 0..2 {
        others.push(
            api::serve(config("127.0.0.1:0"), connect().await)
                .await
                .unwrap(),
        );
    }
    let agent_token = a
        .admin
        .create_token(&CreateToken::new(Role::Agent))
        .await
        .unwrap()
        .token;
    let mut streams = Vec::new();
    for o in &others {
        let c = Client::new(&format!("http://{}", o.addr()), &agent_token).unwrap();
        let mut s = c.host_events("h1").await.unwrap();
        assert_eq!(next(&mut s).await, HostEvent::Resync);
        streams.push(s);
    }
    let vm = a.vm("web", "h1").await;
    for s in &mut streams {
        assert_eq!(assignment(s, vm.id).await.desired(), DesiredState::Running);
    }
    let t = Instant::now();
    a.member.stop_vm("web").await.unwrap();
    for s in &mut streams {
        assert_eq!(assignment(s, vm.id).await.desired(), DesiredState::Stopped);
    }
    eprintln!(
        "stop through server A seen on B and C after {:?}",
        t.elapsed()
    );
    for o in others {
        o.shutdown().await.unwrap();
    }
    a.server.shutdown().await.unwrap();
}
