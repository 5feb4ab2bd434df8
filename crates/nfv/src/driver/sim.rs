//! A simulated site: in memory, with a fixed creation delay, for benchmarks and demos
//! (`vinfra bench ns`) where no cloud software is wanted. It passes the conformance suite.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::Mutex;

use super::{CpInfo, DriverError, SiteDriver, SiteInventory};
use crate::descriptor::Ipv4Cidr;
use crate::plan::{CpSpec, VduSpec};

const SITE: &str = "sim";

#[derive(Debug, Default)]
struct State {
    networks: BTreeMap<String, Ipv4Cidr>,
    vdus: BTreeMap<String, Vec<CpSpec>>,
}

/// An in-memory site whose VDUs take `boot` to start.
#[derive(Debug)]
pub struct SimDriver {
    boot: Duration,
    images: Vec<String>,
    state: Mutex<State>,
}

impl SimDriver {
    /// A site that knows `images` and boots a VDU in `boot`.
    pub fn new(boot: Duration, images: &[&str]) -> Self {
        SimDriver {
            boot,
            images: images.iter().map(|s| (*s).to_owned()).collect(),
            state: Mutex::new(State::default()),
        }
    }
}

#[async_trait::async_trait]
impl SiteDriver for SimDriver {
    fn kind(&self) -> &'static str {
        SITE
    }

    async fn create_network(&self, name: &str, cidr: Ipv4Cidr) -> Result<(), DriverError> {
        self.state
            .lock()
            .await
            .networks
            .insert(name.to_owned(), cidr);
        Ok(())
    }

    async fn delete_network(&self, name: &str) -> Result<(), DriverError> {
        self.state.lock().await.networks.remove(name);
        Ok(())
    }

    async fn create_vdu(&self, spec: &VduSpec) -> Result<(), DriverError> {
        if !self.images.contains(&spec.image) {
            return Err(DriverError::NotFound {
                site: SITE,
                kind: "image",
                name: spec.image.clone(),
            });
        }
        {
            let st = self.state.lock().await;
            if let Some(cp) = spec
                .cps
                .iter()
                .find(|c| !st.networks.contains_key(&c.network))
            {
                return Err(DriverError::NotFound {
                    site: SITE,
                    kind: "network",
                    name: cp.network.clone(),
                });
            }
        }
        // The lock is not held while "booting": VDUs boot concurrently, as on a real site.
        tokio::time::sleep(self.boot).await;
        self.state
            .lock()
            .await
            .vdus
            .insert(spec.name.clone(), spec.cps.clone());
        Ok(())
    }

    async fn delete_vdu(&self, name: &str) -> Result<(), DriverError> {
        self.state.lock().await.vdus.remove(name);
        Ok(())
    }

    async fn cp_info(&self, vdu: &str, cp: &str) -> Result<CpInfo, DriverError> {
        let st = self.state.lock().await;
        let cps = st.vdus.get(vdu).ok_or_else(|| DriverError::NotFound {
            site: SITE,
            kind: "vdu",
            name: vdu.into(),
        })?;
        let c = cps
            .iter()
            .find(|c| c.name == cp)
            .ok_or_else(|| DriverError::NotFound {
                site: SITE,
                kind: "cp",
                name: cp.into(),
            })?;
        Ok(CpInfo {
            cp: cp.into(),
            port_id: None,
            mac: None,
            ips: vec![c.ip],
        })
    }

    async fn inventory(&self) -> Result<SiteInventory, DriverError> {
        let st = self.state.lock().await;
        Ok(SiteInventory {
            networks: st.networks.keys().cloned().collect(),
            vdus: st.vdus.keys().cloned().collect(),
        })
    }
}
