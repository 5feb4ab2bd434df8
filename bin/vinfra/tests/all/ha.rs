//! A highly available control plane: three `vinfra server`s on a three-member etcd
//! cluster, one elected to run the operation driver. A maintenance drain of a host with
//! two real QEMU VMs goes on when the leading server is killed with SIGKILL in the
//! middle of it (the next leader finishes it), and when an etcd member is.

use std::time::{Duration, Instant};

use model::api::CreateVm;
use model::{DrainItemState, MaintenanceState};

use crate::harness::{
    cluster_with, path_in, spawn_agent, spawn_server, ticks, wait_host_up, Server,
};

/// What to kill in the middle of the drain.
enum Victim {
    LeaderServer,
    EtcdMember,
}

/// Which of `logs` (server logs, but `dead`) last said "operation driver leads", if any.
fn leader(logs: &[std::path::PathBuf], dead: Option<usize>) -> Option<usize> {
    logs.iter().enumerate().position(|(i, p)| {
        Some(i) != dead
            && std::fs::read_to_string(p)
                .map(|t| {
                    // The last leadership line of this log says whether it leads now.
                    let lead = t.rfind("operation driver leads");
                    let lost = t.rfind("operation driver lost its leadership");
                    lead.is_some() && lead > lost
                })
                .unwrap_or(false)
    })
}

async fn drain_survives(victim: Victim) {
    let mut etcd = test_utils::EtcdCluster::spawn(3)
        .await
        .expect("a three-member etcd cluster (scripts/setup.sh installs etcd)");
    let spec = format!("etcd:{}", etcd.endpoints().join(","));
    let lease = ["--election-lease-s", "2"];
    let dir = tempfile::Builder::new()
        .prefix("vi")
        .tempdir_in("/tmp")
        .unwrap();
    // The first server mints the admin token; the other two serve the same store.
    let (mut s, token_file) =
        cluster_with(Server::start_with_args(dir, spec.clone(), &lease)).await;
    let admin_token = s.admin_token();
    let mut servers = vec![];
    let mut urls = vec![s.url.clone()];
    let mut logs = vec![s.dir.path().join("server.log")];
    for i in 1..3 {
        let d = path_in(&s, &format!("server{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let listen = format!("127.0.0.1:{}", test_utils::free_tcp_port());
        // The image store's files are shared by the servers (NFS in production).
        let mut extra: Vec<String> = lease.iter().map(|x| x.to_string()).collect();
        extra.push("--blob-dir".into());
        extra.push(s.dir.path().join("blobs").display().to_string());
        servers.push(spawn_server(&d, &spec, &listen, &extra));
        urls.push(format!("http://{listen}"));
        logs.push(d.join("server.log"));
    }
    for u in &urls[1..] {
        let c = client::Client::new(u, &admin_token).unwrap();
        test_utils::wait_for(Duration::from_secs(30), || async {
            c.list_hosts().await.is_ok()
        })
        .await
        .expect("the other servers serve the same store");
    }
    test_utils::wait_until(Duration::from_secs(15), || leader(&logs, None).is_some())
        .await
        .expect("one server leads the operation driver");
    let first = leader(&logs, None).unwrap();
    // Agents and the test's client try the leader first, so that killing it takes the
    // server they talk to away in the middle of a migration: a cache snapshot uploaded to
    // it is then served by another server (it is in the store, not in its memory).
    let mut order = vec![urls[first].clone()];
    order.extend((0..3).filter(|i| *i != first).map(|i| urls[i].clone()));
    s.url = order.join(",");
    let admin = s.admin();

    let dirs: Vec<_> = ["a", "b", "c"].iter().map(|d| path_in(&s, d)).collect();
    let _agents: Vec<_> = ["host-a", "host-b", "host-c"]
        .iter()
        .zip(&dirs)
        .map(|(h, d)| spawn_agent(&s, h, d, &token_file))
        .collect();
    for h in ["host-a", "host-b", "host-c"] {
        wait_host_up(&s, h).await;
    }
    for name in ["web-1", "web-2"] {
        admin
            .create_vm(&CreateVm {
                name: name.into(),
                image: "default".into(),
                vcpus: 1,
                memory_mib: 256,
                host: Some("host-a".into()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for name in ["web-1", "web-2"] {
        let ok = test_utils::wait_for(Duration::from_secs(180), || async {
            ticks(&admin.console(name).await.unwrap_or_default()).0 >= Some(3)
        })
        .await;
        assert!(
            ok.is_ok(),
            "{name} does not run: {:?}\nagent:\n{}\nservers:\n{}",
            admin.get_vm(name).await,
            test_utils::log_tail(&dirs[0].join("agent.log"), 30),
            logs.iter()
                .map(|l| test_utils::log_tail(l, 15))
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
    }
    let session = admin
        .enter_maintenance("host-a", &Default::default())
        .await
        .unwrap();
    // In the middle: the first VM is on its way.
    test_utils::wait_for(Duration::from_secs(60), || async {
        admin
            .get_maintenance(session.id)
            .await
            .is_ok_and(|m| m.items.iter().any(|i| i.state != DrainItemState::Pending))
    })
    .await
    .expect("the drain starts");
    let killed_at = Instant::now();
    match victim {
        Victim::LeaderServer => {
            if first == 0 {
                s.child.kill();
            } else {
                servers[first - 1].kill();
            }
            eprintln!("killed the leading server {}", urls[first]);
            test_utils::wait_until(Duration::from_secs(30), || {
                leader(&logs, Some(first)).is_some()
            })
            .await
            .expect("another server leads within the lease time");
            eprintln!(
                "failover: another server leads {:.2} s after the kill (lease 2 s)",
                killed_at.elapsed().as_secs_f64()
            );
        }
        Victim::EtcdMember => {
            etcd.kill9(0);
            eprintln!("killed etcd member m0");
        }
    }
    let done = test_utils::wait_for(Duration::from_secs(240), || async {
        admin
            .get_maintenance(session.id)
            .await
            .is_ok_and(|m| m.state == MaintenanceState::InMaintenance)
    })
    .await;
    let m = admin.get_maintenance(session.id).await.unwrap();
    assert!(done.is_ok(), "the drain did not finish: {m:?}\n{}", s.log());
    eprintln!(
        "drain finished {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    if matches!(victim, Victim::LeaderServer) {
        let next = leader(&logs, Some(first)).expect("another server leads");
        eprintln!("server {} leads now", urls[next]);
    }
    // Which server took each cache snapshot (timing decides whether the killed one did).
    for (i, l) in logs.iter().enumerate() {
        let n = std::fs::read_to_string(l)
            .unwrap_or_default()
            .matches("cache snapshot stored")
            .count();
        eprintln!("server {} stored {n} cache snapshot(s)", urls[i]);
    }
    for name in ["web-1", "web-2"] {
        let vm = admin.get_vm(name).await.unwrap();
        assert_ne!(
            vm.host.as_str(),
            "host-a",
            "{name} still on the drained host"
        );
        let (before, _) = ticks(&admin.console(name).await.unwrap_or_default());
        test_utils::wait_for(Duration::from_secs(60), || async {
            ticks(&admin.console(name).await.unwrap_or_default()).0 > before.map(|n| n + 1)
        })
        .await
        .unwrap_or_else(|_| panic!("{name} keeps running on {}", vm.host));
    }
}

#[tokio::test]
async fn a_drain_finishes_under_the_next_leader_after_the_leading_server_is_killed() {
    drain_survives(Victim::LeaderServer).await;
}

#[tokio::test]
async fn a_drain_finishes_when_an_etcd_member_is_killed() {
    drain_survives(Victim::EtcdMember).await;
}
