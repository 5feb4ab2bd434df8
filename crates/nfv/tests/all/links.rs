//! Link establishment between VNF connection points, with real traffic between two network
//! namespaces.

use std::collections::BTreeMap;
use std::time::Duration;

use nfv::descriptor::{validate_nsd, validate_vnfd};
use nfv::link::{establish, AgentCp, LinkAgent, LinkState, LinkTable, LINK_PORT};
use nfv::plan::{plan_ns, GenericCommand, NsPlan};

use crate::netns::{veth, Netns};

pub fn example_plan(
    ns: &str,
    sites: &[&str],
) -> (NsPlan, nfv::descriptor::Nsd, Vec<nfv::descriptor::Vnfd>) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/nfv/");
    let read = |f: &str| std::fs::read_to_string(format!("{dir}{f}")).unwrap();
    let vnfds = vec![
        validate_vnfd(&read("vnfd-firewall.yaml")).unwrap(),
        validate_vnfd(&read("vnfd-web.yaml")).unwrap(),
    ];
    let nsd = validate_nsd(&read("nsd-edge.yaml"), &vnfds).unwrap();
    let sites: Vec<String> = sites.iter().map(|s| s.to_string()).collect();
    (plan_ns(ns, &nsd, &vnfds, &sites).unwrap(), nsd, vnfds)
}

/// The first and second CP of the example's one link.
pub fn link_ends(plan: &NsPlan) -> (nfv::plan::PlannedCp, nfv::plan::PlannedCp) {
    match plan.links().next() {
        Some(GenericCommand::ConnectLink { first, second, .. }) => (first.clone(), second.clone()),
        other => panic!("no link planned: {other:?}"),
    }
}

#[tokio::test]
async fn link_comes_up_with_real_traffic_between_namespaces() {
    let (plan, _, _) = example_plan("lk", &["site-a", "site-b"]);
    let (first, second) = link_ends(&plan);
    let a = Netns::new("la");
    let b = Netns::new("lb");
    veth(
        &a,
        "cp0",
        Some(&format!("{}/24", first.ip)),
        &b,
        "cp0",
        Some(&format!("{}/24", second.ip)),
    );
    let fw = LinkAgent::start(
        "fw",
        vec![AgentCp {
            id: first.resource.clone(),
            ip: first.ip,
            netns: Some(a.name.clone()),
        }],
        LINK_PORT,
    )
    .await
    .unwrap();
    let web = LinkAgent::start(
        "web",
        vec![AgentCp {
            id: second.resource.clone(),
            ip: second.ip,
            netns: Some(b.name.clone()),
        }],
        LINK_PORT,
    )
    .await
    .unwrap();
    // The first CP listens inside namespace a, not here (this machine's default route leads
    // to a gateway that accepts any TCP connection, so "unreachable from here" proves nothing).
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &a.name, "ss", "-Hltn"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{}:{LINK_PORT}", first.ip)));
    let rx_before = a.stat("cp0", "rx_packets");
    let endpoints = BTreeMap::from([
        ("fw".to_owned(), fw.endpoint()),
        ("web".to_owned(), web.endpoint()),
    ]);
    let table = LinkTable::from_plan(&plan);
    assert_eq!(
        table.peers_of(&first.resource),
        [(
            "lk-edge-vl-1".to_owned(),
            "web".to_owned(),
            second.resource.clone()
        )]
    );
    let recs = establish(
        &table,
        "fw",
        &first.resource,
        Some(first.ip),
        &endpoints,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r.state, LinkState::Up, "{r:?}");
    let states: Vec<_> = r.history.iter().map(|(s, _)| s.clone()).collect();
    assert_eq!(
        states,
        [LinkState::Requested, LinkState::Connecting, LinkState::Up]
    );
    // SYN, hello, ACKs... arrived over the veth.
    let rx = a.stat("cp0", "rx_packets") - rx_before;
    assert!(rx >= 3, "only {rx} packets on the first CP's veth");
}

#[tokio::test]
async fn a_peer_that_never_answers_fails_with_a_reason_by_the_deadline() {
    let (plan, _, _) = example_plan("lq", &["site-a", "site-b"]);
    let (first, second) = link_ends(&plan);
    let table = LinkTable::from_plan(&plan);
    // An endpoint that accepts and then says nothing.
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_addr = mute.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = mute.accept().await {
            conns.push(s);
        }
    });
    let endpoints = BTreeMap::from([("web".to_owned(), mute_addr)]);
    let t = std::time::Instant::now();
    let recs = establish(
        &table,
        "fw",
        &first.resource,
        Some(first.ip),
        &endpoints,
        Duration::from_millis(500),
    )
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(
        recs[0].state,
        LinkState::Failed {
            reason: "no answer from VNF web within 0.5 s".into()
        }
    );

    // The second VNF answers, but the first CP's address is dead: its own deadline reports it.
    let b = Netns::new("lc");
    let a = Netns::new("ld");
    veth(
        &a,
        "cp0",
        None,
        &b,
        "cp0",
        Some(&format!("{}/24", second.ip)),
    );
    let web = LinkAgent::start(
        "web",
        vec![AgentCp {
            id: second.resource.clone(),
            ip: second.ip,
            netns: Some(b.name.clone()),
        }],
        LINK_PORT,
    )
    .await
    .unwrap();
    let endpoints = BTreeMap::from([("web".to_owned(), web.endpoint())]);
    let recs = establish(
        &table,
        "fw",
        &first.resource,
        Some(first.ip),
        &endpoints,
        Duration::from_millis(800),
    )
    .await;
    assert_eq!(
        recs[0].state,
        LinkState::Failed {
            reason: format!("no answer from {}:{LINK_PORT} within 600 ms", first.ip)
        }
    );
    // And a CP the site reported no address for fails at once.
    let recs = establish(
        &table,
        "fw",
        &first.resource,
        None,
        &endpoints,
        Duration::from_millis(800),
    )
    .await;
    assert_eq!(
        recs[0].state,
        LinkState::Failed {
            reason: format!("site reported no IP address for CP {}", first.resource)
        }
    );
}
