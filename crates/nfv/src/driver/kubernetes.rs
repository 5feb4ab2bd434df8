//! Kubernetes site: VDUs as Pods, networks as Multus `NetworkAttachmentDefinition`s.
//!
//! Only the handful of REST calls we need, made with reqwest against the published paths:
//! `POST /api/v1/namespaces/{ns}/pods` (201), `GET .../pods/{name}` until `status.phase` is
//! `Running`, `DELETE .../pods/{name}` then `GET` until 404, and the Multus CRD under
//! `/apis/k8s.cni.cncf.io/v1/namespaces/{ns}/network-attachment-definitions`. A CP is a
//! secondary interface requested through the `k8s.v1.cni.cncf.io/networks` annotation with a
//! static IP; its run-time address is read back from `k8s.v1.cni.cncf.io/network-status`,
//! which Multus writes.

use std::time::Duration;

use serde_json::{json, Value};

use super::{expect_status, json_body, protocol, CpInfo, DriverError, SiteDriver, SiteInventory};
use crate::descriptor::Ipv4Cidr;
use crate::plan::VduSpec;

const SITE: &str = "kubernetes";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";
const NETWORK_STATUS: &str = "k8s.v1.cni.cncf.io/network-status";
/// Our own annotation: which pod interface each CP is.
const CP_IFACES: &str = "nfv.vinfra.io/cp-interfaces";

/// Where and as whom to reach a Kubernetes API server.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// API server base URL.
    pub base_url: String,
    /// Bearer token (a service account's).
    pub token: String,
    /// Namespace to work in.
    pub namespace: String,
    /// Poll interval for pod phase.
    pub poll: Duration,
    /// How long to wait for Running / gone.
    pub timeout: Duration,
}

/// A site run by Kubernetes.
#[derive(Debug)]
pub struct KubernetesDriver {
    cfg: KubernetesConfig,
    http: reqwest::Client,
}

impl KubernetesDriver {
    /// A driver for one namespace.
    pub fn new(cfg: KubernetesConfig) -> Self {
        KubernetesDriver {
            cfg,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}/{}/namespaces/{}/{path}",
            self.cfg.base_url.trim_end_matches('/'),
            if path.starts_with("network-attachment-definitions") {
                "apis/k8s.cni.cncf.io/v1"
            } else {
                "api/v1"
            },
            self.cfg.namespace
        )
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.cfg.token)
    }

    async fn get(&self, path: &str, op: &str) -> Result<Option<Value>, DriverError> {
        let res = self.req(reqwest::Method::GET, path).send().await;
        let res = expect_status(SITE, op, res, &[200, 404]).await?;
        if res.status().as_u16() == 404 {
            return Ok(None);
        }
        json_body(SITE, op, res).await.map(Some)
    }

    async fn wait_pod(&self, name: &str, gone: bool) -> Result<(), DriverError> {
        let deadline = tokio::time::Instant::now() + self.cfg.timeout;
        let path = format!("pods/{name}");
        loop {
            let pod = self.get(&path, "GET pod").await?;
            match (&pod, gone) {
                (None, true) => return Ok(()),
                (None, false) => {
                    return Err(DriverError::NotFound {
                        site: SITE,
                        kind: "pod",
                        name: name.into(),
                    })
                }
                (Some(p), false) => match p["status"]["phase"].as_str() {
                    Some("Running") => return Ok(()),
                    // An image the registry does not have: the kubelet waits forever in
                    // ErrImagePull/ImagePullBackOff; report it instead of timing out.
                    Some("Pending")
                        if p["status"]["containerStatuses"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|c| {
                                matches!(
                                    c["state"]["waiting"]["reason"].as_str(),
                                    Some("ErrImagePull" | "ImagePullBackOff" | "InvalidImageName")
                                )
                            }) =>
                    {
                        return Err(DriverError::NotFound {
                            site: SITE,
                            kind: "image",
                            name: p["spec"]["containers"][0]["image"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned(),
                        })
                    }
                    Some("Failed") => {
                        return Err(DriverError::Failed {
                            site: SITE,
                            kind: "pod",
                            name: name.into(),
                            reason: p["status"]["message"]
                                .as_str()
                                .unwrap_or("phase Failed")
                                .to_owned(),
                        })
                    }
                    _ => {}
                },
                (Some(_), true) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DriverError::Timeout {
                    site: SITE,
                    kind: "pod",
                    name: name.into(),
                    state: if gone { "deleted" } else { "Running" },
                    secs: self.cfg.timeout.as_secs_f64(),
                });
            }
            tokio::time::sleep(self.cfg.poll).await;
        }
    }

    async fn names(&self, path: &str, op: &str) -> Result<Vec<String>, DriverError> {
        let doc = self.get(path, op).await?.unwrap_or(Value::Null);
        Ok(doc["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_owned))
            .collect())
    }
}

#[async_trait::async_trait]
impl SiteDriver for KubernetesDriver {
    fn kind(&self) -> &'static str {
        SITE
    }

    #[tracing::instrument(skip_all, fields(site = SITE, network = name))]
    async fn create_network(&self, name: &str, cidr: Ipv4Cidr) -> Result<(), DriverError> {
        // A bridge per network; addresses are static (the NS planner's), so IPAM is `static`.
        // Hashed, not truncated: two long names with a common prefix must not share a bridge.
        let bridge = super::libvirt::bridge_name(name);
        let config = json!({"cniVersion": "0.3.1", "name": name, "type": "bridge",
            "bridge": bridge, "ipam": {"type": "static"}, "vinfraSubnet": cidr.to_string()});
        let body = json!({"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name, "labels": {MANAGED_BY: "vinfra-nfv"}},
            "spec": {"config": config.to_string()}});
        let op = "POST network-attachment-definitions";
        let res = self
            .req(reqwest::Method::POST, "network-attachment-definitions")
            .json(&body)
            .send()
            .await;
        // 409 AlreadyExists: created by an earlier attempt, which is what we want.
        expect_status(SITE, op, res, &[201, 409]).await.map(drop)
    }

    async fn delete_network(&self, name: &str) -> Result<(), DriverError> {
        let op = "DELETE network-attachment-definition";
        let res = self
            .req(
                reqwest::Method::DELETE,
                &format!("network-attachment-definitions/{name}"),
            )
            .send()
            .await;
        expect_status(SITE, op, res, &[200, 202, 404])
            .await
            .map(drop)
    }

    #[tracing::instrument(skip_all, fields(site = SITE, vdu = %spec.name))]
    async fn create_vdu(&self, spec: &VduSpec) -> Result<(), DriverError> {
        let nets: Vec<Value> = spec
            .cps
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({"name": c.network, "interface": format!("net{}", i + 1),
                    "ips": [format!("{}/{}", c.ip, c.prefix)]})
            })
            .collect();
        let ifaces: serde_json::Map<String, Value> = spec
            .cps
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), json!(format!("net{}", i + 1))))
            .collect();
        let mem = format!("{}Mi", spec.memory_mib);
        let res = json!({"cpu": spec.vcpus.to_string(), "memory": mem});
        let body = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": spec.name, "labels": {MANAGED_BY: "vinfra-nfv"},
                "annotations": {NETWORKS: Value::Array(nets).to_string(),
                    CP_IFACES: Value::Object(ifaces).to_string()}},
            "spec": {"restartPolicy": "Always", "containers": [{"name": "vdu", "image": spec.image,
                "resources": {"requests": res, "limits": res}}]}});
        let op = "POST pods";
        let r = self
            .req(reqwest::Method::POST, "pods")
            .json(&body)
            .send()
            .await;
        expect_status(SITE, op, r, &[201]).await?;
        let r = self.wait_pod(&spec.name, false).await;
        if r.is_err() {
            if let Err(e) = self.delete_vdu(&spec.name).await {
                tracing::warn!(error = %e, "cleanup after failed pod failed");
            }
        }
        r
    }

    async fn delete_vdu(&self, name: &str) -> Result<(), DriverError> {
        let op = "DELETE pod";
        let res = self
            .req(reqwest::Method::DELETE, &format!("pods/{name}"))
            .send()
            .await;
        expect_status(SITE, op, res, &[200, 202, 404]).await?;
        self.wait_pod(name, true).await
    }

    async fn cp_info(&self, vdu: &str, cp: &str) -> Result<CpInfo, DriverError> {
        let op = "GET pod";
        let pod =
            self.get(&format!("pods/{vdu}"), op)
                .await?
                .ok_or_else(|| DriverError::NotFound {
                    site: SITE,
                    kind: "pod",
                    name: vdu.to_owned(),
                })?;
        let ann = &pod["metadata"]["annotations"];
        let parse = |key: &str| -> Result<Value, DriverError> {
            let text = ann[key]
                .as_str()
                .ok_or_else(|| protocol(SITE, op, format!("no {key} annotation")))?;
            serde_json::from_str(text).map_err(|_| protocol(SITE, op, format!("bad {key}")))
        };
        let ifaces = parse(CP_IFACES)?;
        let iface = ifaces[cp].as_str().ok_or_else(|| DriverError::NotFound {
            site: SITE,
            kind: "cp",
            name: cp.to_owned(),
        })?;
        let status = parse(NETWORK_STATUS)?;
        let entry = status
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["interface"] == iface)
            .ok_or_else(|| protocol(SITE, op, format!("no network-status for {iface}")))?;
        Ok(CpInfo {
            cp: cp.to_owned(),
            port_id: Some(iface.to_owned()),
            mac: entry["mac"].as_str().map(str::to_owned),
            ips: entry["ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.as_str()?.split('/').next()?.parse().ok())
                .collect(),
        })
    }

    async fn inventory(&self) -> Result<SiteInventory, DriverError> {
        let sel = format!("?labelSelector={MANAGED_BY}%3Dvinfra-nfv");
        Ok(SiteInventory {
            networks: self
                .names(&format!("network-attachment-definitions{sel}"), "GET nads")
                .await?,
            vdus: self.names(&format!("pods{sel}"), "GET pods").await?,
        })
    }
}
