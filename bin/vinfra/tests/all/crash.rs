//! kill -9 of the server after acknowledged writes loses nothing.

use std::time::Duration;

use crate::harness::Server;

async fn write_then_crash(mut s: Server) {
    let admin = s.admin();
    let mut acked = Vec::new();
    for i in 0..40 {
        let name = format!("t{i}");
        admin.create_tenant(&name).await.unwrap();
        acked.push(name);
    }
    // No grace period: the kill lands right after the last acknowledgement.
    s.kill9_and_restart().await;
    let admin = s.admin();
    let names: Vec<String> = admin
        .list_tenants()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    for n in &acked {
        assert!(
            names.contains(n),
            "acknowledged tenant {n} lost after kill -9"
        );
    }
    // The same admin token still works: it was not re-created.
    assert!(admin.list_hosts().await.is_ok());
}

#[tokio::test]
async fn redb_server_loses_no_acknowledged_write_on_kill9() {
    write_then_crash(Server::start().await).await;
}

#[tokio::test]
async fn etcd_server_loses_no_acknowledged_write_on_kill9() {
    let etcd = test_utils::EtcdFixture::spawn().await.expect("etcd");
    let dir = tempfile::Builder::new()
        .prefix("ve")
        .tempdir_in("/tmp")
        .unwrap();
    let s = Server::start_with(dir, format!("etcd:{}", etcd.endpoint())).await;
    write_then_crash(s).await;
    // Give the server's etcd client no chance to outlive the fixture silently.
    tokio::time::sleep(Duration::from_millis(10)).await;
}
