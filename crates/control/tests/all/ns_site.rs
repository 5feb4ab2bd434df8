//! The in-process `vinfra` NS site over the control layer: it passes nfv's driver
//! conformance suite (an agent played by the test confirms runs and deletes), and what it
//! makes belongs to the instance's tenant only.

use std::sync::Arc;
use std::time::Duration;

use control::ns_site::{Consoles, LocalSite, LocalSiteConfig};
use control::{Control, Scope};
use model::{DesiredState, ObservedState, TenantId, VmId};
use nfv::descriptor::Ipv4Cidr;
use nfv::driver::{DriverError, SiteDriver};
use nfv::plan::{CpSpec, VduSpec};
use store::testing::MemStore;
use store::Store;

use crate::drain::{host, image, n};

/// Console tails as the API server keeps them; the played agent writes the guest's
/// "ready" line.
#[derive(Default)]
struct Tails(std::sync::Mutex<std::collections::HashMap<VmId, String>>);

impl Consoles for Tails {
    fn tail(&self, vm: VmId) -> String {
        self.0.lock().unwrap().get(&vm).cloned().unwrap_or_default()
    }
    fn forget(&self, vm: VmId) {
        self.0.lock().unwrap().remove(&vm);
    }
}

/// Plays h1's agent: runs what is assigned, confirms deletes, prints the guest's line.
fn agent(c: Control, tails: Arc<Tails>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let h1 = n("h1");
        loop {
            for a in c.assignments(&h1).await.unwrap_or_default() {
                let id = a.vm.id.to_string();
                match a.vm.desired {
                    DesiredState::Running if a.vm.observed != ObservedState::Running => {
                        let _ = c
                            .report_observed(&id, &h1, Some(ObservedState::Running), None)
                            .await;
                        tails
                            .0
                            .lock()
                            .unwrap()
                            .insert(a.vm.id, "GUEST: READY\n".into());
                    }
                    DesiredState::Deleted => {
                        let _ = c.report_observed(&id, &h1, None, None).await;
                    }
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

fn site(c: &Control, tails: &Arc<Tails>, tenant: TenantId) -> LocalSite {
    LocalSite::new(
        c.clone(),
        tails.clone(),
        LocalSiteConfig {
            tenant,
            host: Some("h1".into()),
            poll: Duration::from_millis(10),
            timeout: Duration::from_secs(10),
            link_auth: Some("the requester's token".into()),
        },
    )
}

async fn setup() -> (Control, Arc<Tails>, tokio::task::JoinHandle<()>) {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    host(store.as_ref(), "h1").await;
    image(store.as_ref()).await;
    let c = Control::new(store, 6_000);
    let tails = Arc::new(Tails::default());
    let a = agent(c.clone(), tails.clone());
    (c, tails, a)
}

#[tokio::test]
async fn the_in_process_vinfra_site_passes_the_driver_conformance_suite() {
    let (c, tails, a) = setup().await;
    let t = TenantId::new_random();
    let d = site(&c, &tails, t);
    nfv::driver::conformance::run_all(&d, "conf-lo", "default")
        .await
        .unwrap();
    assert!(c.vms(Scope::All).await.unwrap().is_empty());
    assert!(c.networks(Scope::All).await.unwrap().is_empty());
    a.abort();
}

#[tokio::test]
async fn what_the_site_makes_is_the_instance_tenants_and_no_one_elses() {
    let (c, tails, a) = setup().await;
    let (mine, other) = (TenantId::new_random(), TenantId::new_random());
    let d = site(&c, &tails, mine);
    let cidr: Ipv4Cidr = "10.9.0.0/24".parse().unwrap();
    d.create_network("ns-vl", cidr).await.unwrap();
    let spec = VduSpec {
        name: "ns-fw-0".into(),
        vcpus: 1,
        memory_mib: 256,
        storage_mib: 0,
        image: "default".into(),
        cps: vec![CpSpec {
            name: "ns-fw-0-cp0".into(),
            network: "ns-vl".into(),
            ip: "10.9.0.5".parse().unwrap(),
            prefix: 24,
        }],
    };
    d.create_vdu(&spec).await.unwrap();
    d.wait_guest("ns-fw-0").await.unwrap();
    let info = d.cp_info("ns-fw-0", "ns-fw-0-cp0").await.unwrap();
    assert_eq!(
        info.ips,
        vec!["10.9.0.5".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    assert_eq!(d.link_auth().as_deref(), Some("the requester's token"));

    // The records are the tenant's.
    let vms = c.vms(Scope::All).await.unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!((vms[0].tenant, vms[0].host.as_str()), (mine, "h1"));
    let nets = c.networks(Scope::All).await.unwrap();
    assert_eq!(nets.len(), 1);
    assert_eq!(nets[0].tenant, mine);

    // Another tenant's site sees none of it and touches none of it.
    let theirs = site(&c, &tails, other);
    assert!(theirs.inventory().await.unwrap().is_empty());
    assert!(matches!(
        theirs.cp_info("ns-fw-0", "ns-fw-0-cp0").await,
        Err(DriverError::NotFound { kind: "vm", .. })
    ));
    // Its deletes find nothing (absent is fine), and ours is still there.
    theirs.delete_vdu("ns-fw-0").await.unwrap();
    theirs.delete_network("ns-vl").await.unwrap();
    assert_eq!(c.vms(Scope::Tenant(mine)).await.unwrap().len(), 1);
    // Its own network of the same name is its own (names are per tenant).
    theirs.create_network("ns-vl", cidr).await.unwrap();
    assert_eq!(c.networks(Scope::All).await.unwrap().len(), 2);

    // A network of the same name with another subnet is refused, naming both.
    let e = d
        .create_network("ns-vl", "10.8.0.0/24".parse().unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("exists with subnet 10.9.0.0/24, not 10.8.0.0/24"),
        "{e}"
    );

    // An unknown image is the typed NotFound the executor reports.
    let mut bad = spec.clone();
    bad.name = "ns-fw-1".into();
    bad.image = "nope".into();
    bad.cps.clear();
    assert!(matches!(
        d.create_vdu(&bad).await,
        Err(DriverError::NotFound { kind: "image", .. })
    ));

    d.delete_vdu("ns-fw-0").await.unwrap();
    d.delete_network("ns-vl").await.unwrap();
    assert!(d.inventory().await.unwrap().is_empty());
    assert!(c.vms(Scope::All).await.unwrap().is_empty());
    a.abort();
}
