//! The vinfra driver against a real vinfra control plane (the `api` crate's server, in
//! process, on 127.0.0.1:0) with a simulated agent that speaks the agent protocol
//! (assignments → observed reports) instead of booting QEMU.

use std::sync::Arc;
use std::time::Duration;

use client::Client;
use model::DesiredState;
use nfv::driver::vinfra::{VinfraConfig, VinfraDriver};
use serde_json::json;

fn de<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

pub struct VinfraSite {
    pub url: String,
    pub admin: String,
    _server: api::ServerHandle,
    agent: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for VinfraSite {
    fn drop(&mut self) {
        self.agent.abort();
    }
}

impl VinfraSite {
    pub async fn start() -> VinfraSite {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(store::testing::MemStore::new());
        let admin = api::bootstrap_admin(store.as_ref(), dir.path())
            .await
            .unwrap()
            .expect("fresh store");
        let config = api::ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            blobs: Some(api::BlobConfig {
                dir: dir.path().join("blobs"),
                import_dir: None,
                max_bytes: 1 << 20,
            }),
            ..api::ServerConfig::default()
        };
        let server = api::serve(config, store).await.unwrap();
        let url = format!("http://{}", server.addr());
        let adm = Client::new(&url, &admin).unwrap();
        // The simulated agent below boots nothing: any file serves as the kernel.
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"not a kernel").unwrap();
        adm.upload_image(
            &client::ImageFiles {
                kernel: Some(kernel),
                ..Default::default()
            },
            de(json!({"name": "default", "disk_mib": 64})),
        )
        .await
        .unwrap();
        let tok = adm
            .create_token(&de(json!({"role": "agent"})))
            .await
            .unwrap()
            .token;
        let agent = Client::new(&url, &tok).unwrap();
        agent
            .register_host(&de(json!({"name": "h1", "cpus": 64, "memory_mib": 262144, "disk_gib": 1000, "drivers": ["process"]})))
            .await
            .unwrap();
        let agent = tokio::spawn(async move {
            loop {
                let _ = agent.heartbeat("h1").await;
                for a in agent.assignments("h1").await.unwrap_or_default() {
                    let state = match a.vm.desired {
                        DesiredState::Running if a.vm.observed != model::ObservedState::Running => {
                            "running"
                        }
                        DesiredState::Deleted => "deleted",
                        _ => continue,
                    };
                    let _ = agent
                        .report_observed(a.vm.id, &de(json!({"host": "h1", "state": state})))
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        });
        VinfraSite {
            url,
            admin,
            _server: server,
            agent,
            _dir: dir,
        }
    }

    pub fn driver(&self) -> VinfraDriver {
        VinfraDriver::new(VinfraConfig {
            base_url: self.url.clone(),
            token: self.admin.clone(),
            host: Some("h1".into()),
            poll: Duration::from_millis(25),
            timeout: Duration::from_secs(10),
            link_addrs: Default::default(),
        })
        .unwrap()
    }
}

#[tokio::test]
async fn vinfra_driver_passes_conformance_against_a_real_control_plane() {
    let site = VinfraSite::start().await;
    let d = site.driver();
    nfv::driver::conformance::run_all(&d, "conf-vf", "default")
        .await
        .unwrap();
    let left = Client::new(&site.url, &site.admin)
        .unwrap()
        .list_vms()
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}
