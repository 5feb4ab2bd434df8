//! OpenStack site: Keystone v3, Nova, Neutron and Glance REST, as in the OpenStack API reference.
//!
//! Networks are Neutron networks with one subnet (no DHCP, no gateway: addresses come from the
//! NS planner); CPs are Neutron ports with a fixed IP, created before the server and passed to
//! Nova's `POST /servers` as `networks: [{port}]`. Nova creation is asynchronous (202, then
//! polling `GET /servers/{id}` until `ACTIVE`); so is deletion (204, then polling until 404).
//! Ports we created are not deleted by Nova with the server, so we delete them ourselves.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::{expect_status, json_body, protocol, CpInfo, DriverError, SiteDriver, SiteInventory};
use crate::descriptor::Ipv4Cidr;
use crate::plan::VduSpec;

const SITE: &str = "openstack";
/// 2.37 is the first microversion where `networks` is required, which we always send.
const NOVA_MICROVERSION: &str = "compute 2.37";

/// Where and as whom to reach an OpenStack cloud.
#[derive(Debug, Clone)]
pub struct OpenStackConfig {
    /// Keystone base URL, without `/v3` (`http://keystone:5000`).
    pub auth_url: String,
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
    /// Project to scope the token to.
    pub project: String,
    /// Domain of the user and project (`Default`).
    pub domain: String,
    /// How often to poll an asynchronous Nova operation.
    pub poll: Duration,
    /// How long to wait for a server to become ACTIVE or disappear.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
struct Session {
    token: String,
    compute: String,
    network: String,
    image: String,
}

/// A site run by OpenStack.
#[derive(Debug)]
pub struct OpenStackDriver {
    cfg: OpenStackConfig,
    http: reqwest::Client,
    session: Mutex<Option<Session>>,
}

impl OpenStackDriver {
    /// A driver; it authenticates on first use.
    pub fn new(cfg: OpenStackConfig) -> Self {
        OpenStackDriver {
            cfg,
            http: reqwest::Client::new(),
            session: Mutex::new(None),
        }
    }

    /// Keystone v3 password auth, scoped to the project; endpoints from the catalog.
    async fn session(&self) -> Result<Session, DriverError> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        let op = "POST /v3/auth/tokens";
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": self.cfg.username, "domain": {"name": self.cfg.domain},
                "password": self.cfg.password}}},
            "scope": {"project": {"name": self.cfg.project, "domain": {"name": self.cfg.domain}}}
        }});
        let url = format!("{}/v3/auth/tokens", self.cfg.auth_url.trim_end_matches('/'));
        let res = expect_status(
            SITE,
            op,
            self.http.post(url).json(&body).send().await,
            &[201],
        )
        .await?;
        let token = res
            .headers()
            .get("X-Subject-Token")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| protocol(SITE, op, "no X-Subject-Token header"))?
            .to_owned();
        let doc = json_body(SITE, op, res).await?;
        let endpoint = |ty: &str| -> Result<String, DriverError> {
            doc["token"]["catalog"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["type"] == ty)
                .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
                .find(|e| e["interface"] == "public")
                .and_then(|e| e["url"].as_str())
                .map(|u| u.trim_end_matches('/').to_owned())
                .ok_or_else(|| {
                    protocol(SITE, op, format!("no public {ty} endpoint in the catalog"))
                })
        };
        let s = Session {
            token,
            compute: endpoint("compute")?,
            network: endpoint("network")?,
            image: endpoint("image")?,
        };
        *guard = Some(s.clone());
        Ok(s)
    }

    fn req(&self, s: &Session, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        self.http
            .request(method, url)
            .header("X-Auth-Token", &s.token)
            .header("OpenStack-API-Version", NOVA_MICROVERSION)
    }

    async fn get_json(&self, s: &Session, url: String, op: &str) -> Result<Value, DriverError> {
        let res = self.req(s, reqwest::Method::GET, url).send().await;
        json_body(SITE, op, expect_status(SITE, op, res, &[200]).await?).await
    }

    /// Ids of the items of a Neutron/Nova list whose `name` is exactly `name`.
    async fn ids_named(
        &self,
        s: &Session,
        url: String,
        key: &str,
        name: &str,
    ) -> Result<Vec<String>, DriverError> {
        let op = format!("GET {key}");
        let doc = self.get_json(s, url, &op).await?;
        let items = doc[key]
            .as_array()
            .ok_or_else(|| protocol(SITE, &op, format!("no '{key}' list")))?;
        Ok(items
            .iter()
            .filter(|i| i["name"] == name)
            .filter_map(|i| i["id"].as_str().map(str::to_owned))
            .collect())
    }

    async fn network_id(&self, s: &Session, name: &str) -> Result<Option<String>, DriverError> {
        let url = format!("{}/v2.0/networks?name={name}", s.network);
        Ok(self
            .ids_named(s, url, "networks", name)
            .await?
            .into_iter()
            .next())
    }

    async fn server_id(&self, s: &Session, name: &str) -> Result<Option<String>, DriverError> {
        // Nova's name filter is a regular expression; anchor it and still compare exactly.
        let url = format!("{}/servers?name=^{name}$", s.compute);
        Ok(self
            .ids_named(s, url, "servers", name)
            .await?
            .into_iter()
            .next())
    }

    async fn delete(&self, s: &Session, url: String, op: &str) -> Result<(), DriverError> {
        let res = self.req(s, reqwest::Method::DELETE, url).send().await;
        expect_status(SITE, op, res, &[202, 204, 404])
            .await
            .map(drop)
    }

    async fn delete_ports_of(&self, s: &Session, vdu: &str) -> Result<(), DriverError> {
        let doc = self
            .get_json(s, format!("{}/v2.0/ports", s.network), "GET ports")
            .await?;
        let prefix = format!("{vdu}-");
        for p in doc["ports"].as_array().into_iter().flatten() {
            let named = p["name"].as_str().is_some_and(|n| n.starts_with(&prefix));
            if let (true, Some(id)) = (named, p["id"].as_str()) {
                self.delete(s, format!("{}/v2.0/ports/{id}", s.network), "DELETE port")
                    .await?;
            }
        }
        Ok(())
    }

    async fn boot(&self, s: &Session, spec: &VduSpec) -> Result<(), DriverError> {
        let images = self
            .ids_named(
                s,
                format!("{}/v2/images?name={}", s.image, spec.image),
                "images",
                &spec.image,
            )
            .await?;
        let image = images
            .into_iter()
            .next()
            .ok_or_else(|| DriverError::NotFound {
                site: SITE,
                kind: "image",
                name: spec.image.clone(),
            })?;
        let flavor = self.flavor(s, spec).await?;
        let mut ports = Vec::new();
        for cp in &spec.cps {
            let net =
                self.network_id(s, &cp.network)
                    .await?
                    .ok_or_else(|| DriverError::NotFound {
                        site: SITE,
                        kind: "network",
                        name: cp.network.clone(),
                    })?;
            let op = "GET /v2.0/subnets";
            let subnets = self
                .get_json(
                    s,
                    format!("{}/v2.0/subnets?network_id={net}", s.network),
                    op,
                )
                .await?;
            let subnet = subnets["subnets"][0]["id"]
                .as_str()
                .ok_or_else(|| protocol(SITE, op, format!("network {} has no subnet", cp.network)))?
                .to_owned();
            let op = "POST /v2.0/ports";
            let body = json!({"port": {"name": cp.name, "network_id": net,
                "fixed_ips": [{"subnet_id": subnet, "ip_address": cp.ip.to_string()}]}});
            let res = self.req(
                s,
                reqwest::Method::POST,
                format!("{}/v2.0/ports", s.network),
            );
            let doc = json_body(
                SITE,
                op,
                expect_status(SITE, op, res.json(&body).send().await, &[201]).await?,
            )
            .await?;
            let id = doc["port"]["id"]
                .as_str()
                .ok_or_else(|| protocol(SITE, op, "no port.id"))?;
            ports.push(json!({"port": id}));
        }
        let op = "POST /servers";
        let body = json!({"server": {"name": spec.name, "imageRef": image, "flavorRef": flavor,
            "networks": ports}});
        let res = self.req(s, reqwest::Method::POST, format!("{}/servers", s.compute));
        let doc = json_body(
            SITE,
            op,
            expect_status(SITE, op, res.json(&body).send().await, &[202]).await?,
        )
        .await?;
        let id = doc["server"]["id"]
            .as_str()
            .ok_or_else(|| protocol(SITE, op, "no server.id"))?;
        let deadline = tokio::time::Instant::now() + self.cfg.timeout;
        loop {
            let doc = self
                .get_json(
                    s,
                    format!("{}/servers/{id}", s.compute),
                    "GET /servers/{id}",
                )
                .await?;
            match doc["server"]["status"].as_str() {
                Some("ACTIVE") => return Ok(()),
                Some("ERROR") => {
                    return Err(DriverError::Failed {
                        site: SITE,
                        kind: "server",
                        name: spec.name.clone(),
                        reason: doc["server"]["fault"]["message"]
                            .as_str()
                            .unwrap_or("status ERROR")
                            .to_owned(),
                    })
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DriverError::Timeout {
                    site: SITE,
                    kind: "server",
                    name: spec.name.clone(),
                    state: "ACTIVE",
                    secs: self.cfg.timeout.as_secs_f64(),
                });
            }
            tokio::time::sleep(self.cfg.poll).await;
        }
    }

    /// The smallest flavor that fits (Nova only boots flavors; creating them needs admin).
    async fn flavor(&self, s: &Session, spec: &VduSpec) -> Result<String, DriverError> {
        let op = "GET /flavors/detail";
        let doc = self
            .get_json(s, format!("{}/flavors/detail", s.compute), op)
            .await?;
        let disk_gib = spec.storage_mib.div_ceil(1024);
        doc["flavors"]
            .as_array()
            .ok_or_else(|| protocol(SITE, op, "no 'flavors' list"))?
            .iter()
            .filter(|f| {
                f["vcpus"].as_u64() >= Some(u64::from(spec.vcpus))
                    && f["ram"].as_u64() >= Some(spec.memory_mib)
                    && f["disk"].as_u64() >= Some(disk_gib)
            })
            .min_by_key(|f| (f["vcpus"].as_u64(), f["ram"].as_u64(), f["disk"].as_u64()))
            .and_then(|f| f["id"].as_str().map(str::to_owned))
            .ok_or_else(|| DriverError::NotFound {
                site: SITE,
                kind: "flavor",
                name: format!(
                    "{} vcpu, {} MiB, {disk_gib} GiB",
                    spec.vcpus, spec.memory_mib
                ),
            })
    }
}

#[async_trait::async_trait]
impl SiteDriver for OpenStackDriver {
    fn kind(&self) -> &'static str {
        SITE
    }

    #[tracing::instrument(skip_all, fields(site = SITE, network = name))]
    async fn create_network(&self, name: &str, cidr: Ipv4Cidr) -> Result<(), DriverError> {
        let s = self.session().await?;
        if self.network_id(&s, name).await?.is_some() {
            return Ok(());
        }
        let op = "POST /v2.0/networks";
        let res = self
            .req(
                &s,
                reqwest::Method::POST,
                format!("{}/v2.0/networks", s.network),
            )
            .json(&json!({"network": {"name": name, "admin_state_up": true}}))
            .send()
            .await;
        let doc = json_body(SITE, op, expect_status(SITE, op, res, &[201]).await?).await?;
        let id = doc["network"]["id"]
            .as_str()
            .ok_or_else(|| protocol(SITE, op, "no network.id"))?;
        let op = "POST /v2.0/subnets";
        let res = self
            .req(
                &s,
                reqwest::Method::POST,
                format!("{}/v2.0/subnets", s.network),
            )
            .json(
                &json!({"subnet": {"name": name, "network_id": id, "ip_version": 4,
                "cidr": cidr.to_string(), "enable_dhcp": false, "gateway_ip": null}}),
            )
            .send()
            .await;
        expect_status(SITE, op, res, &[201]).await?;
        tracing::debug!(id, "network created");
        Ok(())
    }

    async fn delete_network(&self, name: &str) -> Result<(), DriverError> {
        let s = self.session().await?;
        let url = format!("{}/v2.0/networks?name={name}", s.network);
        for id in self.ids_named(&s, url, "networks", name).await? {
            self.delete(
                &s,
                format!("{}/v2.0/networks/{id}", s.network),
                "DELETE network",
            )
            .await?;
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(site = SITE, vdu = %spec.name))]
    async fn create_vdu(&self, spec: &VduSpec) -> Result<(), DriverError> {
        let s = self.session().await?;
        let r = self.boot(&s, spec).await;
        if r.is_err() {
            // No half-made VDU: a server in ERROR and its ports go too.
            if let Err(e) = self.delete_vdu(&spec.name).await {
                tracing::warn!(error = %e, "cleanup after failed boot failed");
            }
        }
        r
    }

    async fn delete_vdu(&self, name: &str) -> Result<(), DriverError> {
        let s = self.session().await?;
        if let Some(id) = self.server_id(&s, name).await? {
            let url = format!("{}/servers/{id}", s.compute);
            self.delete(&s, url.clone(), "DELETE /servers/{id}").await?;
            let deadline = tokio::time::Instant::now() + self.cfg.timeout;
            loop {
                let res = self.req(&s, reqwest::Method::GET, url.clone()).send().await;
                let res = expect_status(SITE, "GET /servers/{id}", res, &[200, 404]).await?;
                if res.status().as_u16() == 404 {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(DriverError::Timeout {
                        site: SITE,
                        kind: "server",
                        name: name.to_owned(),
                        state: "deleted",
                        secs: self.cfg.timeout.as_secs_f64(),
                    });
                }
                tokio::time::sleep(self.cfg.poll).await;
            }
        }
        self.delete_ports_of(&s, name).await
    }

    async fn cp_info(&self, vdu: &str, cp: &str) -> Result<CpInfo, DriverError> {
        let s = self.session().await?;
        let op = "GET /v2.0/ports";
        let server = self
            .server_id(&s, vdu)
            .await?
            .ok_or_else(|| DriverError::NotFound {
                site: SITE,
                kind: "server",
                name: vdu.to_owned(),
            })?;
        let doc = self
            .get_json(&s, format!("{}/v2.0/ports?name={cp}", s.network), op)
            .await?;
        let port = doc["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == cp && p["device_id"] == server.as_str())
            .ok_or_else(|| DriverError::NotFound {
                site: SITE,
                kind: "port",
                name: cp.to_owned(),
            })?;
        Ok(CpInfo {
            cp: cp.to_owned(),
            port_id: port["id"].as_str().map(str::to_owned),
            mac: port["mac_address"].as_str().map(str::to_owned),
            ips: port["fixed_ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f["ip_address"].as_str()?.parse().ok())
                .collect(),
        })
    }

    async fn inventory(&self) -> Result<SiteInventory, DriverError> {
        let s = self.session().await?;
        let names = |doc: &Value, key: &str| -> Vec<String> {
            doc[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["name"].as_str().map(str::to_owned))
                .collect()
        };
        let servers = self
            .get_json(&s, format!("{}/servers", s.compute), "GET /servers")
            .await?;
        let nets = self
            .get_json(&s, format!("{}/v2.0/networks", s.network), "GET networks")
            .await?;
        Ok(SiteInventory {
            networks: names(&nets, "networks"),
            vdus: names(&servers, "servers"),
        })
    }
}
