//! Traffic statistics through the control plane: a real virtual switch on veth
//! ports in namespaces reports to the `vinfra server` process's controller, and the
//! API and CLI show exactly the frames sent.

use std::time::Duration;

use net::frame::build;
use net::netns::NetnsLab;
use net::rawsock::{RawPort, Recv};
use net::{DomainId, MacAddr, PortAddress, PortConfig, Switch, SwitchConfig, SwitchId};

use crate::harness::{cli, Server};

#[tokio::test]
async fn switch_counts_reach_the_api_exactly() {
    let dir = tempfile::Builder::new()
        .prefix("vt")
        .tempdir_in("/tmp")
        .unwrap();
    let store = format!("redb:{}", dir.path().join("state.redb").display());
    let port = test_utils::free_tcp_port();
    let mut s = Server::start_with_args(
        dir,
        store,
        &[
            "--vswitch-listen",
            &format!("127.0.0.1:{port}"),
            "--domain",
            "dc1",
        ],
    )
    .await;

    let tag = std::process::id() % 100_000;
    let (host, vm1, vm2) = (
        format!("vth{tag}"),
        format!("vta{tag}"),
        format!("vtb{tag}"),
    );
    let mut lab = NetnsLab::new();
    for n in [&host, &vm1, &vm2] {
        lab.add(n).expect("ip netns (iproute2; run as root)");
    }
    let m1 = MacAddr([0x02, 0x76, 0x69, 0, 0, 1]);
    let m2 = MacAddr([0x02, 0x76, 0x69, 0, 0, 2]);
    lab.veth(&vm1, "eth0", &host, "p1", Some(&m1.to_string()))
        .unwrap();
    lab.veth(&vm2, "eth0", &host, "p2", Some(&m2.to_string()))
        .unwrap();
    let mut cfg = SwitchConfig::new(SwitchId("host-1".into()), DomainId("dc1".into()));
    cfg.netns = Some(host.clone());
    cfg.controller = Some(format!("127.0.0.1:{port}").parse().unwrap());
    cfg.report_interval = Duration::from_millis(100);
    cfg.ports = vec![
        PortConfig {
            ifname: "p1".into(),
            address: PortAddress {
                vm: "vm-1".into(),
                mac: m1,
                ip: None,
            },
        },
        PortConfig {
            ifname: "p2".into(),
            address: PortAddress {
                vm: "vm-2".into(),
                mac: m2,
                ip: None,
            },
        },
    ];
    let sw = Switch::start(cfg.clone()).expect("switch starts");
    let a = RawPort::open(Some(&vm1), "eth0").unwrap();
    let b = RawPort::open(Some(&vm2), "eth0").unwrap();
    // Known traffic: 25 frames vm-1 -> vm-2, each waited for at the receiver.
    let frame = build(m2, m1, 0x88b5, 200);
    let mut got = 0;
    for _ in 0..25 {
        a.send(&frame).unwrap();
        test_utils::wait_until(Duration::from_secs(5), || {
            let mut buf = [0u8; 2048];
            while let Ok(Recv::Frame(n)) = b.recv(&mut buf) {
                if n >= 14 && buf[..6] == m2.0 && buf[12..14] == [0x88, 0xb5] {
                    got += 1;
                }
            }
            got > 0
        })
        .await
        .expect("frame forwarded by the switch");
        got -= 1;
    }
    let admin = s.admin();
    test_utils::wait_for(Duration::from_secs(10), || async {
        let r = admin.traffic(None).await.unwrap_or_default();
        r["classes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["class"] == "intra_server" && c["packets"] == 25)
    })
    .await
    .expect("the controller counted exactly 25 intra-server frames");
    let r = admin.traffic(None).await.unwrap();
    assert_eq!(r["domain"], "dc1");
    let (ok, out, err) = cli(&s, &s.admin_token(), &["traffic", "top"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("intra_server") && out.contains("vm-1") && out.contains("vm-2"),
        "{out}"
    );
    let metrics = admin.metrics().await.unwrap();
    assert!(
        metrics.contains("dc1"),
        "controller metrics are served: {metrics}"
    );
    sw.stop().unwrap();

    // The totals survive a server crash: once the saved snapshot covers every applied
    // report, kill -9 and restart; the 25 are there, and a new switch epoch adds to them.
    let metric = |m: &str, name: &str| {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    test_utils::wait_for(Duration::from_secs(20), || async {
        let m = admin.metrics().await.unwrap_or_default();
        match (
            metric(&m, "vinfra_traffic_reports_applied_total"),
            metric(&m, "vinfra_traffic_reports_persisted"),
        ) {
            (Some(a), Some(p)) => a > 0 && a == p,
            _ => false,
        }
    })
    .await
    .expect("the controller's counters are saved");
    s.kill9_and_restart().await;
    let admin = s.admin();
    let intra = |r: &serde_json::Value| {
        r["classes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["class"] == "intra_server")
            .and_then(|c| c["packets"].as_u64())
    };
    assert_eq!(intra(&admin.traffic(None).await.unwrap()), Some(25));
    let sw = Switch::start(cfg).expect("switch starts again");
    for _ in 0..5 {
        a.send(&frame).unwrap();
    }
    test_utils::wait_for(Duration::from_secs(10), || async {
        intra(&admin.traffic(None).await.unwrap_or_default()) == Some(30)
    })
    .await
    .expect("25 restored + 5 of the new epoch");
    sw.stop().unwrap();
    assert_eq!(intra(&admin.traffic(None).await.unwrap()), Some(30));
    // Without --vswitch-listen the route says why it has nothing.
    let plain = Server::start().await;
    let e = plain.admin().traffic(None).await.unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert!(e.detail().unwrap_or("").contains("--vswitch-listen"), "{e}");
    drop(lab);
}
