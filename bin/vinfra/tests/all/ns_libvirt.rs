//! The done-means through the CLI: one NS with the firewall on a `vinfra` site (a
//! real agent booting a real guest) and the web server on a real `libvirt` site, the two
//! sites' segments of the NS virtual link joined by a veth pair (the inter-site wire), the
//! link established between the VNFs' connection points — the web side's link agent beside
//! the libvirt guest, the firewall side inside the vinfra guest — and terminate leaving
//! nothing on either site.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nfv::link::{AgentCp, LinkAgent, LINK_PORT};
use nfv::plan::GenericCommand;

use crate::harness::{cli, cluster, path_in, spawn_agent, wait_host_up, VINFRA};
use crate::libvirtd::{Libvirtd, URI};
use crate::netns::{ip, veth, Netns};

fn virsh_names(what: &str) -> BTreeSet<String> {
    let out = Command::new("virsh")
        .args(["-c", URI, what, "--name"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

// Multi-threaded: the web side's link agent runs on this runtime while the test waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ns_over_vinfra_and_libvirt_links_across_sites_and_terminates_to_nothing() {
    let lv = Libvirtd::start();
    let (s, token_file) = cluster().await;
    let admin = s.admin();
    let dir_a = path_in(&s, "ha");
    let _agent = spawn_agent(&s, "host-a", &dir_a, &token_file);
    wait_host_up(&s, "host-a").await;
    let t = s.admin_token();
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/nfv");
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
    let plan = nfv::plan::plan_ns("lv", &nsd, &vnfds, &sites).unwrap();
    let Some(GenericCommand::ConnectLink {
        link,
        first,
        second,
    }) = plan.links().next().cloned()
    else {
        panic!("the example NS plans one link")
    };
    assert_eq!(
        (first.site.as_str(), second.site.as_str()),
        ("site-a", "site-b")
    );

    // The web VNF's link agent, beside its libvirt guest: a namespace whose veth the
    // libvirt network's bridge takes in; and the inter-site wire, a veth pair from the
    // libvirt daemon's namespace to this machine's (where the vinfra bridge is).
    let b = Netns::new("wb");
    veth(
        &b,
        "cp0",
        Some(&format!("{}/24", second.ip)),
        &lv.netns,
        "upb",
        None,
    );
    let wire_a = format!("vxa{}", std::process::id());
    ip(&[
        "link",
        "add",
        &wire_a,
        "type",
        "veth",
        "peer",
        "name",
        "wire",
        "netns",
        &lv.netns.name,
    ]);
    let mut wire = Wire {
        dev: wire_a.clone(),
        bridge: None,
    };
    let web = LinkAgent::start(
        &second.vnf,
        vec![AgentCp {
            id: second.resource.clone(),
            ip: second.ip,
            netns: Some(b.name.clone()),
        }],
        LINK_PORT,
    )
    .await
    .unwrap();

    let site_b = format!("site-b=libvirt:{URI}:{}", lv.work.display());
    let child = Command::new(VINFRA)
        .args([
            "ns",
            "instantiate",
            "nsd-edge",
            "--name",
            "lv",
            "--site-map",
        ])
        .arg(format!("site-a=vinfra:host-a,{site_b}"))
        .arg("--endpoint")
        .arg(format!("{}={}", second.vnf, web.endpoint()))
        .env("VINFRA_URL", &s.url)
        .env("VINFRA_TOKEN", &t)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Plug the wire and the web agent's veth once both sites made their segment.
    let vl = plan
        .sites
        .iter()
        .flat_map(|sp| sp.commands())
        .find_map(|c| match c {
            GenericCommand::CreateNetwork { name, .. } if name.ends_with("edge-vl") => {
                Some(name.clone())
            }
            _ => None,
        })
        .unwrap();
    let start = Instant::now();
    let (vbr, lbr) = loop {
        let vinfra_br = admin
            .get_network(&vl)
            .await
            .ok()
            .map(|n| agent::netdev::bridge_name(n.id))
            .filter(|br| Path::new("/sys/class/net").join(br).exists());
        if let (Some(v), true) = (vinfra_br, virsh_names("net-list").contains(&vl)) {
            break (v, lv.bridge_of(&vl));
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "segments never appeared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ip(&["link", "set", &wire_a, "master", &vbr, "up"]);
    wire.bridge = Some(vbr.clone());
    for dev in ["wire", "upb"] {
        ip(&[
            "-n",
            &lv.netns.name,
            "link",
            "set",
            dev,
            "master",
            &lbr,
            "up",
        ]);
    }
    ip(&["-n", &lv.netns.name, "link", "set", &lbr, "up"]);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "ns instantiate: {stdout}{stderr}\n{}",
        s.log()
    );
    assert!(
        stdout.contains("instantiated") && stdout.contains("1/1 up"),
        "{stdout}"
    );
    eprintln!(
        "NS over vinfra + libvirt with its link up in {:?}",
        start.elapsed()
    );

    // The web VDU is a libvirt domain; the firewall VDU a vinfra VM whose guest took the
    // hello on its CP: it came from beside the libvirt guest, across both sites' bridges.
    assert!(virsh_names("list").contains(&second.vdu));
    let fw_vm = admin.get_vm(&first.vdu).await.unwrap();
    let accepted = format!(
        "LINK {link} accepted from {} on {}",
        second.resource, first.resource
    );
    test_utils::wait_for(Duration::from_secs(20), || async {
        admin
            .console(fw_vm.name.as_str())
            .await
            .unwrap_or_default()
            .contains(&accepted)
    })
    .await
    .unwrap_or_else(|_| panic!("fw guest lacks {accepted:?}"));
    let rec = admin.get_ns_instance("lv").await.unwrap();
    assert_eq!(rec.links[0]["state"]["state"], "up");
    assert_eq!(rec.links[0]["first_ip"], first.ip.to_string());
    // Secrets and paths: the libvirt site is shown as given (it has no secret).
    assert_eq!(rec.sites.len(), 2);

    let (ok, out, err) = cli(&s, &t, &["ns", "terminate", "lv"]);
    assert!(ok, "ns terminate: {out}{err}\n{}", s.log());
    assert!(admin.list_vms().await.unwrap().is_empty());
    assert_eq!(admin.list_networks().await.unwrap(), vec![]);
    assert!(virsh_names("list").is_empty(), "{:?}", virsh_names("list"));
    assert!(!virsh_names("net-list").contains(&vl));
}

/// The wire's root-namespace end (the other end goes with the daemon's namespace). The
/// agent leaves a bridge with a port it did not make, so this removes the vinfra bridge
/// too once the wire was its last port.
struct Wire {
    dev: String,
    bridge: Option<String>,
}

impl Drop for Wire {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.dev]).output();
        if let Some(br) = &self.bridge {
            let empty = std::fs::read_dir(Path::new("/sys/class/net").join(br).join("brif"))
                .is_ok_and(|mut d| d.next().is_none());
            if empty {
                let _ = Command::new("ip").args(["link", "del", br]).output();
            }
        }
    }
}
