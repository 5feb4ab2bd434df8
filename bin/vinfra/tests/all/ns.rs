//! `vinfra ns instantiate|show|terminate` through a real server and two agents booting
//! real guests: one NS over two sites, each VNF's CPs real NICs with addresses from
//! vinfra's IPAM, the link between their connection points established *inside the
//! guests* (the agents relay the request; the second guest connects to the first over
//! their NICs) and shown as an API object; a link whose peer never answers fails by its
//! deadline and rolls back.

use std::path::Path;
use std::time::Duration;

use nfv::plan::GenericCommand;

use crate::harness::{cli, cluster, path_in, spawn_agent, wait_host_up, Server};

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/nfv")
}

async fn ask_relay(
    at: std::net::SocketAddr,
    req: &model::api::LinkRequest,
) -> model::api::LinkReply {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut s = tokio::net::TcpStream::connect(at).await.unwrap();
    let mut line = serde_json::to_string(req).unwrap();
    line.push('\n');
    s.write_all(line.as_bytes()).await.unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).await.unwrap();
    serde_json::from_str(&answer).unwrap()
}

async fn vms_named(s: &Server, prefix: &str) -> Vec<model::Vm> {
    s.admin()
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.name.as_str().starts_with(prefix))
        .collect()
}

#[tokio::test]
async fn ns_across_two_sites_links_its_vnfs_then_terminates_to_nothing() {
    let (s, token_file) = cluster().await;
    let admin = s.admin();
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

    let (nsd, vnfds) = nfv::descriptor::load_nsd(&ex.join("nsd-edge.yaml")).unwrap();
    let sites = ["site-a".to_owned(), "site-b".to_owned()];
    let plan = nfv::plan::plan_ns("edge", &nsd, &vnfds, &sites).unwrap();
    let Some(GenericCommand::ConnectLink { first, second, .. }) = plan.links().next().cloned()
    else {
        panic!("the example NS plans one link")
    };

    let (ok, out, err) = cli(
        &s,
        &t,
        &[
            "ns",
            "instantiate",
            "nsd-edge",
            "--name",
            "edge",
            "--site-map",
            "site-a=vinfra:host-a,site-b=vinfra:host-b",
        ],
    );
    let logs = || {
        format!(
            "{}\n{}\n{}",
            s.log(),
            test_utils::log_tail(&dir_a.join("agent.log"), 20),
            test_utils::log_tail(&dir_b.join("agent.log"), 20)
        )
    };
    assert!(ok, "ns instantiate: {out}{err}\n{}", logs());
    assert!(
        out.contains("instantiated") && out.contains("1/1 up"),
        "{out}"
    );

    // The API object: every VNF ready on its site, the link up with its history.
    let rec = admin.get_ns_instance("edge").await.unwrap();
    assert_eq!(rec.state, model::api::NsState::Instantiated);
    assert!(
        rec.vnfs.iter().all(|v| v.state == "ready"),
        "{:?}",
        rec.vnfs
    );
    let link = &rec.links[0];
    assert_eq!(link["state"]["state"], "up", "{link}");
    assert_eq!(link["first_cp"], first.resource.as_str());
    assert_eq!(link["first_ip"], first.ip.to_string());
    let steps: Vec<&str> = link["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0]["state"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["requested", "connecting", "up"], "{link}");
    assert!(
        link["history"][2][1].as_u64().unwrap() < 30_000,
        "up within the deadline: {link}"
    );
    // SOL003 records carry the addresses vinfra's IPAM gave the CPs.
    let fw_rec = rec
        .vnf_instances
        .iter()
        .find(|v| v["vnfInstanceName"] == first.vnf.as_str())
        .unwrap();
    let ips = &fw_rec["instantiatedVnfInfo"]["extCpInfo"][0]["cpProtocolInfo"][0]["ipOverEthernet"]
        ["ipAddresses"][0]["addresses"];
    assert_eq!(ips[0], first.ip.to_string(), "{fw_rec}");

    // The VDUs are real guests on the two hosts, their CPs real NICs with those addresses.
    let vms = vms_named(&s, "edge-").await;
    assert_eq!(vms.len(), 2, "{vms:?}");
    let hosts: std::collections::BTreeSet<&str> = vms.iter().map(|v| v.host.as_str()).collect();
    assert_eq!(hosts.len(), 2, "one VDU per site/host: {hosts:?}");
    let fw_vm = vms.iter().find(|v| v.name.as_str() == first.vdu).unwrap();
    let cp_nic = fw_vm
        .nics
        .iter()
        .find(|n| n.name.as_ref().map(|n| n.as_str()) == Some(first.resource.as_str()))
        .expect("the CP is a named NIC");
    assert_eq!(cp_nic.ip, first.ip);
    let want = format!("mac={} ip={}/24", cp_nic.mac, first.ip);
    let web_vm = vms.iter().find(|v| v.name.as_str() == second.vdu).unwrap();
    // The link's packets ran between the guests: the second connected from its CP, the
    // first accepted on its CP (each guest says so on its console).
    let name = link["link"].as_str().unwrap();
    let accepted = format!(
        "LINK {name} accepted from {} on {}",
        second.resource, first.resource
    );
    let up = format!(
        "LINK {name} up from {} to {} at {}:",
        second.resource, first.resource, first.ip
    );
    if test_utils::wait_for(Duration::from_secs(30), || async {
        let fw_con = admin.console(fw_vm.name.as_str()).await.unwrap_or_default();
        let web_con = admin
            .console(web_vm.name.as_str())
            .await
            .unwrap_or_default();
        fw_con.contains(&want) && fw_con.contains(&accepted) && web_con.contains(&up)
    })
    .await
    .is_err()
    {
        panic!("guest consoles lack {want:?} / {accepted:?} / {up:?}");
    }
    assert!(!admin.list_networks().await.unwrap().is_empty());

    // The agent's link relay acts only for a token that may see the VM owning the CP.
    let relay: std::net::SocketAddr = admin
        .get_host(web_vm.host.as_str())
        .await
        .unwrap()
        .link_addr
        .unwrap()
        .parse()
        .unwrap();
    let other = admin.create_tenant("other").await.unwrap().token;
    for (auth, want) in [
        (None, "need a vinfra token"),
        (Some(other), "may not act on the VM"),
        (Some(t.clone()), "ACK"),
    ] {
        let reply = ask_relay(
            relay,
            &model::api::LinkRequest {
                link: "again".into(),
                first_cp: first.resource.clone(),
                first_ip: first.ip,
                port: nfv::link::LINK_PORT,
                second_cp: second.resource.clone(),
                timeout_ms: 5000,
                auth,
            },
        )
        .await;
        if !reply.detail.contains(want) {
            let web_con = admin
                .console(web_vm.name.as_str())
                .await
                .unwrap_or_default();
            let fw_con = admin.console(fw_vm.name.as_str()).await.unwrap_or_default();
            let grep = |c: &str| {
                c.lines()
                    .filter(|l| l.contains("LINK"))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            panic!(
                "{want}: {reply:?}\nweb:\n{}\nfw:\n{}",
                grep(&web_con),
                grep(&fw_con)
            );
        }
        assert_eq!(reply.up, want == "ACK", "{reply:?}");
    }

    // Scale the second VNF out by one VDU (a third guest, its CP a NIC with the next
    // address), then back in; below its minimum it refuses.
    let (ok, out, err) = cli(
        &s,
        &t,
        &["ns", "scale", "edge", "--vnf", &second.vnf, "--out"],
    );
    assert!(ok, "scale out: {out}{err}\n{}", logs());
    assert!(out.contains("now has 2 VDU(s)"), "{out}");
    let vms = vms_named(&s, "edge-").await;
    assert_eq!(vms.len(), 3, "{vms:?}");
    let added = vms
        .iter()
        .find(|v| v.name.as_str() != first.vdu && v.name.as_str() != second.vdu)
        .unwrap();
    assert_eq!(added.observed, model::ObservedState::Running);
    assert!(
        added
            .nics
            .iter()
            .all(|n| n.ip != first.ip && n.ip != second.ip),
        "{added:?}"
    );
    let (ok, out, err) = cli(
        &s,
        &t,
        &["ns", "scale", "edge", "--vnf", &second.vnf, "--in"],
    );
    assert!(ok, "scale in: {out}{err}");
    assert_eq!(vms_named(&s, "edge-").await.len(), 2);
    let (ok, _, err) = cli(
        &s,
        &t,
        &["ns", "scale", "edge", "--vnf", &second.vnf, "--in"],
    );
    assert!(!ok && err.contains("failed (nothing changed)"), "{err}");
    assert_eq!(vms_named(&s, "edge-").await.len(), 2);

    // Terminate: nothing left on either site.
    let (ok, out, err) = cli(&s, &t, &["ns", "terminate", "edge"]);
    assert!(ok, "ns terminate: {out}{err}\n{}", logs());
    assert_eq!(
        admin.get_ns_instance("edge").await.unwrap_err().status(),
        Some(404)
    );
    assert!(vms_named(&s, "edge-").await.is_empty());
    assert_eq!(admin.list_networks().await.unwrap(), vec![]);

    // A link whose peer never answers (the second VNF's endpoint is given explicitly, and
    // it is mute) fails by the deadline with a reason, and the whole NS is rolled back.
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (ok, out, err) = cli(
        &s,
        &t,
        &[
            "ns",
            "instantiate",
            "nsd-edge",
            "--name",
            "mute",
            "--site-map",
            "site-a=vinfra:host-a,site-b=vinfra:host-b",
            "--endpoint",
            &format!("{}={}", second.vnf, mute.local_addr().unwrap()),
            "--link-deadline-ms",
            "1500",
        ],
    );
    assert!(!ok, "a mute peer must fail the NS: {out}");
    assert!(
        err.contains("no answer from VNF") && err.contains("rolled back"),
        "{err}"
    );
    let rec = admin.get_ns_instance("mute").await.unwrap();
    assert_eq!(rec.state, model::api::NsState::Failed);
    assert_eq!(rec.links[0]["state"]["state"], "failed", "{:?}", rec.links);
    assert!(vms_named(&s, "mute-").await.is_empty(), "rolled back");
    let (ok, out, err) = cli(&s, &t, &["ns", "terminate", "mute"]);
    assert!(ok, "{out}{err}");
    assert_eq!(admin.list_networks().await.unwrap(), vec![]);
}

/// `kill -9` of the server in the middle of an NS instantiate over two sites: the
/// restarted server takes its own interrupted work up again and rolls it back, with the
/// reason in the record; no VM and no network of the NS is left on either site.
#[tokio::test]
async fn an_instantiate_cut_by_a_server_kill9_is_rolled_back_after_the_restart() {
    let (mut s, token_file) = cluster().await;
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
    let networks_before = s.admin().list_networks().await.unwrap();
    let sites = [("site-a", "host-a"), ("site-b", "host-b")]
        .into_iter()
        .map(|(site, host)| {
            (
                site.to_owned(),
                model::api::SiteSpec::Vinfra {
                    host: Some(host.to_owned()),
                },
            )
        })
        .collect();
    let rec = s
        .admin()
        .create_ns_instance(&model::api::CreateNsInstance {
            name: "cut".into(),
            nsd: "nsd-edge".into(),
            sites,
            endpoints: Default::default(),
            link_deadline_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(rec.state, model::api::NsState::Instantiating);
    // In the middle: the sites have started making the VNFs.
    test_utils::wait_for(Duration::from_secs(60), || async {
        !vms_named(&s, "cut-").await.is_empty()
    })
    .await
    .expect("the instantiate starts making VNFs");
    s.kill9_and_restart().await;

    let admin = s.admin();
    let ok = test_utils::wait_for(Duration::from_secs(180), || async {
        admin
            .get_ns_instance("cut")
            .await
            .is_ok_and(|r| r.state == model::api::NsState::Failed)
    })
    .await;
    let rec = admin.get_ns_instance("cut").await.unwrap();
    assert!(ok.is_ok(), "not rolled back: {rec:?}\n{}", s.log());
    let why = rec.error.clone().unwrap_or_default();
    assert!(
        why.contains("interrupted by a server restart while instantiating; rolled back"),
        "{why}"
    );
    assert!(
        rec.vnfs.iter().all(|v| v.state == "rolled_back"),
        "{:?}",
        rec.vnfs
    );
    let gone = test_utils::wait_for(Duration::from_secs(60), || async {
        vms_named(&s, "cut-").await.is_empty()
    })
    .await;
    assert!(
        gone.is_ok(),
        "VMs left behind: {:?}",
        vms_named(&s, "cut-").await
    );
    assert_eq!(admin.list_networks().await.unwrap(), networks_before);
    // The record is the user's to forget now.
    let (ok, out, err) = cli(&s, &t, &["ns", "terminate", "cut"]);
    assert!(ok, "{out}{err}");
}
