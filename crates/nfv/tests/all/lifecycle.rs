//! NS lifecycle across sites: parallelism, rollback, and the end-to-end test over a real
//! libvirtd and the OpenStack fake, with the link established between their connection points.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nfv::descriptor::{validate_nsd, validate_vnfd};
use nfv::driver::kubernetes::KubernetesDriver;
use nfv::driver::libvirt::LibvirtDriver;
use nfv::driver::openstack::OpenStackDriver;
use nfv::driver::SiteDriver;
use nfv::link::{AgentCp, LinkAgent, LinkState, LINK_PORT};
use nfv::ns::{InstantiateError, NsExecutor, Progress};
use nfv::plan::plan_ns;

use crate::fakes::{Build, FakeKubernetes, FakeOpenStack};
use crate::links::{example_plan, link_ends};
use crate::netns::{ip, veth, Netns};

fn example(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../../examples/nfv/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// An NSD of `n` web VNFs, alternating between site-a and site-b, without links.
fn wide_nsd(n: usize) -> String {
    let mut s = String::from("tosca_definitions_version: tosca_simple_yaml_1_3\nmetadata:\n  descriptor_id: wide\ntopology_template:\n  node_templates:\n");
    for i in 0..n {
        let site = if i % 2 == 0 { "site-a" } else { "site-b" };
        s.push_str(&format!("    web{i}:\n      type: tosca.nodes.nfv.VNF\n      properties:\n        descriptor_id: vnfd-web\n        vinfra_sites: [{site}]\n"));
    }
    s
}

fn no_progress(_: Progress) {}

#[tokio::test]
async fn vnfs_instantiate_in_parallel_across_and_within_sites() {
    let build = Duration::from_millis(200);
    let os = FakeOpenStack::start(build).await;
    let k8s = FakeKubernetes::start(build).await;
    let sites: BTreeMap<String, Arc<dyn SiteDriver>> = BTreeMap::from([
        (
            "site-a".to_owned(),
            Arc::new(OpenStackDriver::new(os.config())) as Arc<dyn SiteDriver>,
        ),
        (
            "site-b".to_owned(),
            Arc::new(KubernetesDriver::new(k8s.config())) as Arc<dyn SiteDriver>,
        ),
    ]);
    let exec = NsExecutor::new(sites.clone(), Duration::from_secs(2));
    let vnfds = vec![validate_vnfd(&example("vnfd-web.yaml")).unwrap()];
    for n in [2usize, 10, 50] {
        let prefix = format!("w{n}-");
        let nsd = validate_nsd(&wide_nsd(n), &vnfds).unwrap();
        let plan = plan_ns(&format!("w{n}"), &nsd, &vnfds, &exec.site_names()).unwrap();
        let inst = exec
            .instantiate(&plan, &BTreeMap::new(), &no_progress)
            .await
            .unwrap();
        let inv_a = sites["site-a"]
            .inventory()
            .await
            .unwrap()
            .with_prefix(&prefix);
        assert_eq!(inv_a.vdus.len(), n / 2);
        exec.terminate(&inst.plan).await.unwrap();
        for s in sites.values() {
            assert!(s.inventory().await.unwrap().with_prefix(&prefix).is_empty());
        }

        // Parallel means that builds overlapped: one after another, no build would start
        // before the previous one was seen ready. Only the order of events is compared,
        // not how long they took (that is `vinfra bench ns`'s job).
        let os_builds = os.builds();
        let k8s_builds = k8s.builds();
        let ours = |b: &&Build| b.name.starts_with(&prefix);
        let a: Vec<&Build> = os_builds.iter().filter(ours).collect();
        let b: Vec<&Build> = k8s_builds.iter().filter(ours).collect();
        assert_eq!((a.len(), b.len()), (n / 2, n / 2), "one build per VNF");
        assert!(
            a.iter().any(|x| b.iter().any(|y| x.overlaps(y))),
            "{n} VNFs: site-a and site-b never built at the same time"
        );
        if n / 2 > 1 {
            for (site, builds) in [("site-a", &a), ("site-b", &b)] {
                let peak = Build::peak(builds);
                eprintln!(
                    "{n} VNFs: at most {peak} of {} builds at once on {site}",
                    n / 2
                );
                assert!(peak > 1, "{n} VNFs: {site} built one VNF at a time");
            }
        }
    }
}

#[tokio::test]
async fn a_failure_on_one_site_rolls_back_every_site() {
    let os = FakeOpenStack::start(Duration::from_millis(100)).await;
    let k8s = FakeKubernetes::start(Duration::from_millis(100)).await;
    let sites: BTreeMap<String, Arc<dyn SiteDriver>> = BTreeMap::from([
        (
            "site-a".to_owned(),
            Arc::new(OpenStackDriver::new(os.config())) as Arc<dyn SiteDriver>,
        ),
        (
            "site-b".to_owned(),
            Arc::new(KubernetesDriver::new(k8s.config())) as Arc<dyn SiteDriver>,
        ),
    ]);
    let exec = NsExecutor::new(sites.clone(), Duration::from_millis(500));
    let fw = validate_vnfd(&example("vnfd-firewall.yaml")).unwrap();
    let web =
        validate_vnfd(&example("vnfd-web.yaml").replace("file: default", "file: nginx-missing"))
            .unwrap();
    let vnfds = vec![fw, web];
    let nsd = validate_nsd(&example("nsd-edge.yaml"), &vnfds).unwrap();
    let plan = plan_ns("rb", &nsd, &vnfds, &exec.site_names()).unwrap();
    let events = Mutex::new(Vec::new());
    let err = exec
        .instantiate(&plan, &BTreeMap::new(), &|p| events.lock().unwrap().push(p))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "site 'site-b', VNF 'web', failed; rolled back every site"
    );
    let source = std::error::Error::source(&err).map(ToString::to_string);
    assert_eq!(
        source.as_deref(),
        Some("kubernetes: image 'nginx-missing' not found")
    );
    assert!(events.lock().unwrap().contains(&Progress::RollingBack));
    let leftovers = |sites: BTreeMap<String, Arc<dyn SiteDriver>>| async move {
        let mut all = Vec::new();
        for s in sites.values() {
            let inv = s.inventory().await.unwrap().with_prefix("rb-");
            all.extend(inv.networks);
            all.extend(inv.vdus);
        }
        all
    };
    assert_eq!(leftovers(sites.clone()).await, Vec::<String>::new());
    assert_eq!(os.port_names(), Vec::<String>::new());

    // Every VNF comes up, but the second VNF has no link endpoint: the link fails, all goes.
    let vnfds = vec![
        validate_vnfd(&example("vnfd-firewall.yaml")).unwrap(),
        validate_vnfd(&example("vnfd-web.yaml")).unwrap(),
    ];
    let plan = plan_ns("rb", &nsd, &vnfds, &exec.site_names()).unwrap();
    match exec
        .instantiate(&plan, &BTreeMap::new(), &no_progress)
        .await
    {
        Err(InstantiateError::Link { link, reason, .. }) => {
            assert_eq!(
                (link.as_str(), reason.as_str()),
                ("rb-edge-vl-1", "VNF web has no link endpoint")
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(leftovers(sites).await, Vec::<String>::new());
}

/// Done-means: one VNF on a vinfra site (a real control plane; the agent is simulated, see
/// `vinfra_site.rs`), one on a real libvirtd (a real TCG guest boots); a link between VNF
/// connection points, with real packets across the libvirt network's bridge; terminate
/// leaves nothing on either site.
#[tokio::test]
async fn libvirt_conformance_then_ns_across_vinfra_and_libvirt() {
    let lv = crate::libvirtd::Libvirtd::start();
    let libvirt = Arc::new(LibvirtDriver::new(lv.config()));
    let t = Instant::now();
    nfv::driver::conformance::run_all(libvirt.as_ref(), "conf-lv", "default")
        .await
        .unwrap();
    eprintln!("libvirt conformance: {:?}", t.elapsed());

    let vf = crate::vinfra_site::VinfraSite::start().await;
    let sites: BTreeMap<String, Arc<dyn SiteDriver>> = BTreeMap::from([
        (
            "site-a".to_owned(),
            Arc::new(vf.driver()) as Arc<dyn SiteDriver>,
        ),
        ("site-b".to_owned(), libvirt.clone() as Arc<dyn SiteDriver>),
    ]);
    let exec = NsExecutor::new(sites.clone(), Duration::from_secs(5));
    let (plan, _, _) = example_plan("e2e", &["site-a", "site-b"]);
    let (first, second) = link_ends(&plan);
    assert_eq!(
        (first.site.as_str(), second.site.as_str()),
        ("site-a", "site-b")
    );

    // Each CP's data plane: a namespace with a veth whose other end the libvirt site's
    // network bridge takes in once that network exists (in the daemon's namespace).
    let a = Netns::new("ea");
    let b = Netns::new("eb");
    veth(
        &a,
        "cp0",
        Some(&format!("{}/24", first.ip)),
        &lv.netns,
        "upa",
        None,
    );
    veth(
        &b,
        "cp0",
        Some(&format!("{}/24", second.ip)),
        &lv.netns,
        "upb",
        None,
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
    let endpoints = BTreeMap::from([
        ("fw".to_owned(), fw.endpoint()),
        ("web".to_owned(), web.endpoint()),
    ]);
    let events = Mutex::new(Vec::new());
    let lv_ns = lv.netns.name.clone();
    let plug = |p: Progress| {
        if p == (Progress::NetworksReady {
            site: "site-b".into(),
        }) {
            let br = lv.bridge_of("e2e-edge-vl");
            for dev in ["upa", "upb"] {
                ip(&["-n", &lv_ns, "link", "set", dev, "master", &br]);
            }
            ip(&["-n", &lv_ns, "link", "set", &br, "up"]);
        }
        events.lock().unwrap().push(p);
    };
    let t = Instant::now();
    let inst = exec.instantiate(&plan, &endpoints, &plug).await.unwrap();
    eprintln!(
        "NS over vinfra+libvirt instantiated with link up in {:?}",
        t.elapsed()
    );
    assert_eq!(inst.links.len(), 1);
    assert_eq!(inst.links[0].state, LinkState::Up, "{:?}", inst.links[0]);
    assert_eq!(
        inst.links[0].first_ip,
        Some(first.ip),
        "the IP the site reported"
    );
    let web_cp = &inst.cps[&second.resource];
    assert_eq!(
        (web_cp.ips.as_slice(), web_cp.mac.as_deref()),
        ([second.ip].as_slice(), Some("52:54:00:3c:00:02"))
    );
    // SOL003's shape, with the address and MAC the libvirt site reported.
    let rec = inst.vnf_instance_sol003("web").unwrap();
    let pi = &rec["instantiatedVnfInfo"]["extCpInfo"][0]["cpProtocolInfo"][0]["ipOverEthernet"];
    assert_eq!(pi["ipAddresses"][0]["addresses"][0], second.ip.to_string());
    assert_eq!(pi["macAddress"], "52:54:00:3c:00:02");
    assert_eq!(
        rec["instantiatedVnfInfo"]["extCpInfo"][0]["cpdId"],
        "web_cp"
    );
    // The link's packets crossed the libvirt network's bridge.
    assert!(lv.netns.stat("upb", "tx_packets") >= 3 && lv.netns.stat("upa", "rx_packets") >= 3);
    let ev = events.lock().unwrap().clone();
    assert!(ev
        .iter()
        .any(|e| matches!(e, Progress::VnfReady { vnf, .. } if vnf == "web")));
    assert!(ev
        .iter()
        .any(|e| matches!(e, Progress::Link(r) if r.state == LinkState::Up)));

    // The libvirt VDU is a real VM: its guest boots.
    let vdu = &second.vdu;
    let t = Instant::now();
    while !libvirt.console(vdu).await.contains("READY") {
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "guest never printed READY: {}",
            libvirt.console(vdu).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("libvirt guest READY {:?} after instantiation", t.elapsed());

    exec.terminate(&inst.plan).await.unwrap();
    for (name, s) in &sites {
        let inv = s.inventory().await.unwrap().with_prefix("e2e-");
        assert!(inv.is_empty(), "{name} still has {inv:?}");
    }
    let vms = client::Client::new(&vf.url, &vf.admin)
        .unwrap()
        .list_vms()
        .await
        .unwrap();
    assert!(vms.is_empty(), "vinfra still has {vms:?}");
    let files: Vec<_> = std::fs::read_dir(&lv.work)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(files.is_empty(), "libvirt work dir still has {files:?}");
}
