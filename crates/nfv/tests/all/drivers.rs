//! The conformance suite against each driver's software (or published-API fake).

use std::time::Duration;

use nfv::driver::conformance::run_all;
use nfv::driver::kubernetes::KubernetesDriver;
use nfv::driver::openstack::OpenStackDriver;
use nfv::driver::SiteDriver;

use crate::fakes::{FakeKubernetes, FakeOpenStack};

#[tokio::test]
async fn openstack_driver_passes_conformance_against_the_fake() {
    let cloud = FakeOpenStack::start(Duration::from_millis(100)).await;
    let d = OpenStackDriver::new(cloud.config());
    run_all(&d, "conf-os", "default").await.unwrap();
    let log = cloud.log();
    assert_eq!(
        log[0], "POST /identity/v3/auth/tokens",
        "authenticates first, once"
    );
    assert_eq!(
        log.iter().filter(|l| l.ends_with("/auth/tokens")).count(),
        1
    );
    // Nova is asynchronous: the driver polled a BUILD server before it was ACTIVE.
    let polls = log
        .iter()
        .filter(|l| l.starts_with("GET /compute/v2.1/servers/"))
        .count();
    assert!(polls >= 3, "{log:#?}");
    assert!(
        cloud.port_names().is_empty(),
        "ports left: {:?}",
        cloud.port_names()
    );
}

#[tokio::test]
async fn openstack_reports_nova_faults_and_bad_credentials() {
    let cloud = FakeOpenStack::start(Duration::from_millis(30)).await;
    let d = OpenStackDriver::new(cloud.config());
    d.create_network("f-net", "10.98.0.0/24".parse().unwrap())
        .await
        .unwrap();
    let spec = nfv::plan::VduSpec {
        name: "f-vdu".into(),
        vcpus: 1,
        memory_mib: 256,
        storage_mib: 0,
        image: "broken".into(),
        cps: vec![nfv::plan::CpSpec {
            name: "f-vdu-cp".into(),
            network: "f-net".into(),
            ip: "10.98.0.5".parse().unwrap(),
            prefix: 24,
        }],
    };
    let err = d.create_vdu(&spec).await.unwrap_err().to_string();
    assert_eq!(err, "openstack: server 'f-vdu' failed: No valid host was found. There are not enough hosts available.");
    assert!(
        d.inventory().await.unwrap().vdus.is_empty(),
        "the ERROR server was cleaned up"
    );
    assert!(cloud.port_names().is_empty());
    d.delete_network("f-net").await.unwrap();

    let mut cfg = cloud.config();
    cfg.password = "wrong".into();
    let err = OpenStackDriver::new(cfg)
        .inventory()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("openstack: POST /v3/auth/tokens: HTTP 401"),
        "{err}"
    );
}

#[tokio::test]
async fn kubernetes_driver_passes_conformance_against_the_fake() {
    let api = FakeKubernetes::start(Duration::from_millis(100)).await;
    let d = KubernetesDriver::new(api.config());
    run_all(&d, "conf-k8s", "default").await.unwrap();
    assert_eq!(api.pod_count(), 0);
    let mut cfg = api.config();
    cfg.token = "nope".into();
    let err = KubernetesDriver::new(cfg)
        .inventory()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("HTTP 401"), "{err}");
}

#[tokio::test]
async fn process_driver_passes_conformance_with_real_namespaces() {
    let tag = format!("c{}", std::process::id());
    let d = nfv::driver::process::ProcessDriver::new(nfv::driver::process::ProcessConfig {
        tag: tag.clone(),
        images: vec!["default".into()],
        program: vec!["sleep".into(), "infinity".into()],
    });
    run_all(&d, "conf-proc", "default").await.unwrap();
    // Nothing of the site is left in the kernel.
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.contains(&tag))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(left, Vec::<String>::new());
}

#[tokio::test]
async fn sim_driver_passes_conformance() {
    let d = nfv::driver::sim::SimDriver::new(Duration::from_millis(10), &["default"]);
    run_all(&d, "conf-sim", "default").await.unwrap();
}

#[tokio::test]
async fn process_bench_measures_both_orders_and_leaves_nothing() {
    let tag = format!("t{}", std::process::id());
    let rows = nfv::bench::bench_ns_process(&[2, 6], &tag).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.vnfs).collect::<Vec<_>>(), [2, 6]);
    for r in &rows {
        assert!(
            r.parallel > std::time::Duration::ZERO && r.sequential > r.parallel / 4,
            "{r:?}"
        );
    }
    let left = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(&tag))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(left, 0, "namespaces left behind");
}
