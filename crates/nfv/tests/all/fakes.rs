//! In-test fakes of OpenStack (Keystone v3, Nova, Neutron, Glance) and of the Kubernetes API
//! server with Multus. They are fakes: they follow the published request paths, bodies,
//! status codes and asynchronous behaviour (Nova BUILD→ACTIVE, delete then 404; Pod
//! Pending→Running, delete then 404) closely enough to exercise the drivers, and reject what
//! the real services reject (missing token, unknown image, IP conflicts, networks in use),
//! but they run nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// One server or pod: when it was created and when a client first saw it ready. The tests
/// compare these instants only with each other (what happened before what), never with a
/// duration, so they do not depend on how fast the machine is.
#[derive(Clone, Debug)]
pub struct Build {
    pub name: String,
    pub created: Instant,
    pub seen_ready: Option<Instant>,
}

impl Build {
    fn new(name: &str) -> Build {
        Build {
            name: name.to_owned(),
            created: Instant::now(),
            seen_ready: None,
        }
    }

    fn saw_ready(builds: &mut [Build], name: &str) {
        if let Some(b) = builds.iter_mut().find(|b| b.name == name) {
            b.seen_ready.get_or_insert_with(Instant::now);
        }
    }

    /// Whether both were building at one moment (one was created before the other was seen
    /// ready, both ways round). A build never seen ready is still building.
    pub fn overlaps(&self, other: &Build) -> bool {
        let before = |a: &Build, b: &Build| b.seen_ready.is_none_or(|r| a.created < r);
        before(self, other) && before(other, self)
    }

    /// The most builds that were in progress at one moment.
    pub fn peak(builds: &[&Build]) -> usize {
        builds
            .iter()
            .map(|b| {
                builds
                    .iter()
                    .filter(|o| {
                        o.created <= b.created && o.seen_ready.is_none_or(|r| r > b.created)
                    })
                    .count()
            })
            .max()
            .unwrap_or(0)
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn query(uri: &Uri, key: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            v.replace("%3D", "=")
                .replace("%5E", "^")
                .replace("%24", "$")
        })
    })
}

async fn serve(router: axum::Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(l, router).await.unwrap();
    });
    (addr, task)
}

// ---------------------------------------------------------------- OpenStack

#[derive(Debug, Default)]
struct Os {
    seq: u64,
    token: String,
    networks: Vec<Value>,
    subnets: Vec<Value>,
    ports: Vec<Value>,
    servers: Vec<(Value, Instant, Option<Instant>)>,
    /// Every request line, for the tests' assertions.
    log: Vec<String>,
    build: Duration,
    builds: Vec<Build>,
}

impl Os {
    fn id(&mut self, kind: &str) -> String {
        self.seq += 1;
        format!("{kind}-{:08x}-0000-4000-8000-{:012x}", self.seq, self.seq)
    }

    /// Servers whose deletion completed vanish; Nova detaches (not deletes) their ports.
    fn gc(&mut self) {
        let now = Instant::now();
        let gone: Vec<String> = self
            .servers
            .iter()
            .filter(|(_, _, del)| del.is_some_and(|d| d <= now))
            .map(|(s, _, _)| s["id"].as_str().unwrap().to_owned())
            .collect();
        self.servers
            .retain(|(s, _, _)| !gone.iter().any(|g| s["id"] == g.as_str()));
        for p in &mut self.ports {
            if gone.iter().any(|g| p["device_id"] == g.as_str()) {
                p["device_id"] = json!("");
            }
        }
    }

    fn status(&self, s: &Value, ready: Instant) -> &'static str {
        if Instant::now() < ready {
            "BUILD"
        } else if s["imageRef"] == "img-broken" {
            "ERROR"
        } else {
            "ACTIVE"
        }
    }
}

/// A fake OpenStack cloud on 127.0.0.1.
pub struct FakeOpenStack {
    pub addr: SocketAddr,
    state: Arc<Mutex<Os>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeOpenStack {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeOpenStack {
    /// Servers take `build` to become ACTIVE and `build / 2` to disappear after DELETE.
    pub async fn start(build: Duration) -> FakeOpenStack {
        let state = Arc::new(Mutex::new(Os {
            build,
            token: "gAAAAAfake-token".into(),
            ..Os::default()
        }));
        let st = state.clone();
        let router =
            axum::Router::new().fallback(move |m: Method, uri: Uri, h: HeaderMap, body: Bytes| {
                let st = st.clone();
                async move { os_handle(&st, m, uri, h, body) }
            });
        let (addr, task) = serve(router).await;
        FakeOpenStack { addr, state, task }
    }

    pub fn config(&self) -> nfv::driver::openstack::OpenStackConfig {
        nfv::driver::openstack::OpenStackConfig {
            auth_url: format!("http://{}/identity", self.addr),
            username: "nfv".into(),
            password: "secret".into(),
            project: "demo".into(),
            domain: "Default".into(),
            poll: Duration::from_millis(20),
            timeout: Duration::from_secs(10),
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    /// Every server ever created, in creation order.
    pub fn builds(&self) -> Vec<Build> {
        self.state.lock().unwrap().builds.clone()
    }

    /// Ports left on the cloud (Nova does not delete ports it did not create).
    pub fn port_names(&self) -> Vec<String> {
        let st = self.state.lock().unwrap();
        st.ports
            .iter()
            .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

fn os_handle(st: &Mutex<Os>, m: Method, uri: Uri, h: HeaderMap, body: Bytes) -> Response {
    let mut os = st.lock().unwrap();
    os.gc();
    let path = uri.path().to_owned();
    os.log.push(format!("{m} {path}"));
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
    let base = format!(
        "http://{}",
        h.get("host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("127.0.0.1")
    );
    if seg.as_slice() == ["identity", "v3", "auth", "tokens"] && m == Method::POST {
        let a = &body["auth"];
        let ok = a["identity"]["methods"] == json!(["password"])
            && a["identity"]["password"]["user"]["name"] == "nfv"
            && a["identity"]["password"]["user"]["password"] == "secret"
            && a["identity"]["password"]["user"]["domain"]["name"] == "Default"
            && a["scope"]["project"]["name"] == "demo";
        if !ok {
            return reply(
                StatusCode::UNAUTHORIZED,
                json!({"error": {"code": 401, "title": "Unauthorized",
                "message": "The request you have made requires authentication."}}),
            );
        }
        let ep = |ty: &str, url: String| {
            json!({"type": ty, "name": ty, "endpoints": [
            {"interface": "public", "region": "RegionOne", "url": url},
            {"interface": "internal", "region": "RegionOne", "url": "http://10.255.255.1/unreachable"}]})
        };
        let catalog = json!([
            ep("compute", format!("{base}/compute/v2.1")),
            ep("network", format!("{base}/network")),
            ep("image", format!("{base}/image"))
        ]);
        let mut res = reply(
            StatusCode::CREATED,
            json!({"token": {"methods": ["password"],
            "expires_at": "2099-01-01T00:00:00.000000Z", "catalog": catalog,
            "project": {"name": "demo", "domain": {"name": "Default"}}}}),
        );
        res.headers_mut()
            .insert("X-Subject-Token", os.token.parse().unwrap());
        return res;
    }
    if h.get("X-Auth-Token").and_then(|v| v.to_str().ok()) != Some(os.token.as_str()) {
        return reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": {"code": 401, "title": "Unauthorized"}}),
        );
    }
    let not_found = |what: &str| {
        reply(
            StatusCode::NOT_FOUND,
            json!({"itemNotFound": {"code": 404, "message": format!("{what} could not be found.")}}),
        )
    };
    let name_filter = |items: &[Value], uri: &Uri| -> Vec<Value> {
        match query(uri, "name") {
            None => items.to_vec(),
            Some(n) => {
                let exact = n.trim_start_matches('^').trim_end_matches('$');
                items
                    .iter()
                    .filter(|i| i["name"] == exact)
                    .cloned()
                    .collect()
            }
        }
    };
    match (m.clone(), seg.as_slice()) {
        (Method::GET, ["image", "v2", "images"]) => {
            let imgs = [
                json!({"id": "img-default", "name": "default", "status": "active"}),
                json!({"id": "img-broken", "name": "broken", "status": "active"}),
            ];
            reply(StatusCode::OK, json!({"images": name_filter(&imgs, &uri)}))
        }
        (Method::GET, ["compute", "v2.1", "flavors", "detail"]) => reply(
            StatusCode::OK,
            json!({"flavors": [
            {"id": "3", "name": "m1.medium", "vcpus": 2, "ram": 4096, "disk": 40},
            {"id": "1", "name": "m1.tiny", "vcpus": 1, "ram": 512, "disk": 1},
            {"id": "2", "name": "m1.small", "vcpus": 1, "ram": 2048, "disk": 20}]}),
        ),
        (Method::POST, ["compute", "v2.1", "servers"]) => {
            let s = &body["server"];
            let (Some(name), Some(image), Some(flavor)) = (
                s["name"].as_str(),
                s["imageRef"].as_str(),
                s["flavorRef"].as_str(),
            ) else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"badRequest": {"code": 400, "message": "Invalid input for field/attribute server."}}),
                );
            };
            // Microversion >= 2.37 makes `networks` mandatory.
            let Some(nets) = s["networks"].as_array() else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"badRequest": {"code": 400, "message": "'networks' is a required property"}}),
                );
            };
            if !["img-default", "img-broken"].contains(&image) || !["1", "2", "3"].contains(&flavor)
            {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"badRequest": {"code": 400, "message": "Invalid imageRef or flavorRef."}}),
                );
            }
            let id = os.id("srv");
            for n in nets {
                let Some(p) = os.ports.iter_mut().find(|p| p["id"] == n["port"]) else {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        json!({"badRequest": {"code": 400, "message": "Port not found."}}),
                    );
                };
                if p["device_id"] != "" {
                    return reply(
                        StatusCode::CONFLICT,
                        json!({"conflictingRequest": {"code": 409, "message": "Port is still in use."}}),
                    );
                }
                p["device_id"] = json!(id);
            }
            let ready = Instant::now() + os.build;
            os.builds.push(Build::new(name));
            os.servers.push((
                json!({"id": id, "name": name, "imageRef": image, "flavorRef": flavor}),
                ready,
                None,
            ));
            reply(
                StatusCode::ACCEPTED,
                json!({"server": {"id": id, "adminPass": "fake",
                "links": [{"rel": "self", "href": format!("{base}/compute/v2.1/servers/{id}")}], "security_groups": [{"name": "default"}]}}),
            )
        }
        (Method::GET, ["compute", "v2.1", "servers"]) => {
            let all: Vec<Value> = os
                .servers
                .iter()
                .map(|(s, _, _)| json!({"id": s["id"], "name": s["name"], "links": []}))
                .collect();
            reply(StatusCode::OK, json!({"servers": name_filter(&all, &uri)}))
        }
        (Method::GET, ["compute", "v2.1", "servers", id]) => {
            // Through a plain reference, so that `servers` and `builds` borrow apart.
            let os = &mut *os;
            let Some((s, ready, del)) = os.servers.iter().find(|(s, _, _)| s["id"] == *id) else {
                return not_found("Instance");
            };
            let status = os.status(s, *ready);
            if status == "ACTIVE" {
                Build::saw_ready(&mut os.builds, s["name"].as_str().unwrap_or_default());
            }
            let mut out = json!({"id": s["id"], "name": s["name"], "status": status,
                "OS-EXT-STS:task_state": if del.is_some() { json!("deleting") } else { Value::Null }});
            if status == "ERROR" {
                out["fault"] = json!({"code": 500, "message": "No valid host was found. There are not enough hosts available."});
            }
            reply(StatusCode::OK, json!({"server": out}))
        }
        (Method::DELETE, ["compute", "v2.1", "servers", id]) => {
            let half = os.build / 2;
            let Some(entry) = os.servers.iter_mut().find(|(s, _, _)| s["id"] == *id) else {
                return not_found("Instance");
            };
            entry.2.get_or_insert(Instant::now() + half);
            StatusCode::NO_CONTENT.into_response()
        }
        (Method::GET, ["network", "v2.0", "networks"]) => reply(
            StatusCode::OK,
            json!({"networks": name_filter(&os.networks, &uri)}),
        ),
        (Method::POST, ["network", "v2.0", "networks"]) => {
            let Some(name) = body["network"]["name"].as_str() else {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"NeutronError": {"type": "HTTPBadRequest", "message": "Invalid input"}}),
                );
            };
            let id = os.id("net");
            let n = json!({"id": id, "name": name, "status": "ACTIVE", "admin_state_up": true, "subnets": []});
            os.networks.push(n.clone());
            reply(StatusCode::CREATED, json!({"network": n}))
        }
        (Method::DELETE, ["network", "v2.0", "networks", id]) => {
            if !os.networks.iter().any(|n| n["id"] == *id) {
                return reply(
                    StatusCode::NOT_FOUND,
                    json!({"NeutronError": {"type": "NetworkNotFound", "message": format!("Network {id} could not be found.")}}),
                );
            }
            if os.ports.iter().any(|p| p["network_id"] == *id) {
                return reply(
                    StatusCode::CONFLICT,
                    json!({"NeutronError": {"type": "NetworkInUse",
                    "message": format!("Unable to complete operation on network {id}. There are one or more ports still in use on the network.")}}),
                );
            }
            os.networks.retain(|n| n["id"] != *id);
            os.subnets.retain(|s| s["network_id"] != *id);
            StatusCode::NO_CONTENT.into_response()
        }
        (Method::GET, ["network", "v2.0", "subnets"]) => {
            let subs: Vec<Value> = match query(&uri, "network_id") {
                Some(n) => os
                    .subnets
                    .iter()
                    .filter(|s| s["network_id"] == n.as_str())
                    .cloned()
                    .collect(),
                None => os.subnets.clone(),
            };
            reply(StatusCode::OK, json!({"subnets": subs}))
        }
        (Method::POST, ["network", "v2.0", "subnets"]) => {
            let s = &body["subnet"];
            let ok = s["ip_version"] == 4
                && s["cidr"].as_str().is_some()
                && os.networks.iter().any(|n| n["id"] == s["network_id"]);
            if !ok {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"NeutronError": {"type": "HTTPBadRequest", "message": "Invalid input for subnet"}}),
                );
            }
            let id = os.id("sub");
            let sub = json!({"id": id, "name": s["name"], "network_id": s["network_id"], "cidr": s["cidr"],
                "ip_version": 4, "enable_dhcp": s["enable_dhcp"], "gateway_ip": s["gateway_ip"]});
            os.subnets.push(sub.clone());
            reply(StatusCode::CREATED, json!({"subnet": sub}))
        }
        (Method::GET, ["network", "v2.0", "ports"]) => reply(
            StatusCode::OK,
            json!({"ports": name_filter(&os.ports, &uri)}),
        ),
        (Method::POST, ["network", "v2.0", "ports"]) => {
            let p = &body["port"];
            let ip = p["fixed_ips"][0]["ip_address"].clone();
            let sub_ok = os.subnets.iter().any(|s| {
                s["id"] == p["fixed_ips"][0]["subnet_id"] && s["network_id"] == p["network_id"]
            });
            if !sub_ok || ip.as_str().is_none() {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"NeutronError": {"type": "HTTPBadRequest", "message": "Invalid input for fixed_ips"}}),
                );
            }
            if os.ports.iter().any(|q| {
                q["network_id"] == p["network_id"] && q["fixed_ips"][0]["ip_address"] == ip
            }) {
                return reply(
                    StatusCode::CONFLICT,
                    json!({"NeutronError": {"type": "IpAddressAlreadyAllocated",
                    "message": format!("IP address {ip} already allocated in subnet")}}),
                );
            }
            let id = os.id("port");
            let seq = os.seq;
            let port = json!({"id": id, "name": p["name"], "network_id": p["network_id"], "device_id": "",
                "mac_address": format!("fa:16:3e:00:{:02x}:{:02x}", (seq >> 8) & 0xff, seq & 0xff),
                "fixed_ips": p["fixed_ips"], "status": "DOWN"});
            os.ports.push(port.clone());
            reply(StatusCode::CREATED, json!({"port": port}))
        }
        (Method::DELETE, ["network", "v2.0", "ports", id]) => {
            let before = os.ports.len();
            os.ports.retain(|p| p["id"] != *id);
            if os.ports.len() == before {
                return reply(
                    StatusCode::NOT_FOUND,
                    json!({"NeutronError": {"type": "PortNotFound", "message": format!("Port {id} could not be found.")}}),
                );
            }
            StatusCode::NO_CONTENT.into_response()
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no route {m} {path}")}),
        ),
    }
}

// ---------------------------------------------------------------- Kubernetes

#[derive(Debug, Default)]
struct Kube {
    pods: BTreeMap<String, (Value, Instant, Option<Instant>)>,
    nads: BTreeMap<String, Value>,
    start: Duration,
    builds: Vec<Build>,
}

/// A fake Kubernetes API server (with Multus behaviour) on 127.0.0.1.
pub struct FakeKubernetes {
    pub addr: SocketAddr,
    state: Arc<Mutex<Kube>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKubernetes {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const KTOKEN: &str = "fake-service-account-token";

impl FakeKubernetes {
    /// Pods take `start` to be Running and `start / 2` to disappear after DELETE.
    pub async fn start(start: Duration) -> FakeKubernetes {
        let state = Arc::new(Mutex::new(Kube {
            start,
            ..Kube::default()
        }));
        let st = state.clone();
        let router =
            axum::Router::new().fallback(move |m: Method, uri: Uri, h: HeaderMap, body: Bytes| {
                let st = st.clone();
                async move { kube_handle(&st, m, uri, h, body) }
            });
        let (addr, task) = serve(router).await;
        FakeKubernetes { addr, state, task }
    }

    pub fn config(&self) -> nfv::driver::kubernetes::KubernetesConfig {
        nfv::driver::kubernetes::KubernetesConfig {
            base_url: format!("http://{}", self.addr),
            token: KTOKEN.into(),
            namespace: "nfv".into(),
            poll: Duration::from_millis(20),
            timeout: Duration::from_secs(10),
        }
    }

    pub fn pod_count(&self) -> usize {
        self.state.lock().unwrap().pods.len()
    }

    /// Every pod ever created, in creation order.
    pub fn builds(&self) -> Vec<Build> {
        self.state.lock().unwrap().builds.clone()
    }
}

fn status_obj(code: u16, reason: &str, message: String) -> Response {
    reply(
        StatusCode::from_u16(code).unwrap(),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code}),
    )
}

fn kube_handle(st: &Mutex<Kube>, m: Method, uri: Uri, h: HeaderMap, body: Bytes) -> Response {
    let mut k = st.lock().unwrap();
    let now = Instant::now();
    k.pods
        .retain(|_, (_, _, del)| !del.is_some_and(|d| d <= now));
    if h.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {KTOKEN}")) {
        return status_obj(401, "Unauthorized", "Unauthorized".into());
    }
    let path = uri.path().to_owned();
    let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let selector = query(&uri, "labelSelector");
    let matches = |obj: &Value| match &selector {
        None => true,
        Some(sel) => sel
            .split_once('=')
            .is_some_and(|(key, val)| obj["metadata"]["labels"][key] == val),
    };
    match (m.clone(), seg.as_slice()) {
        (Method::POST, ["api", "v1", "namespaces", ns, "pods"]) => {
            let Some(name) = body["metadata"]["name"].as_str().map(str::to_owned) else {
                return status_obj(
                    422,
                    "Invalid",
                    "Pod \"\" is invalid: metadata.name: Required value".into(),
                );
            };
            if body["kind"] != "Pod"
                || body["spec"]["containers"]
                    .as_array()
                    .is_none_or(|c| c.is_empty())
            {
                return status_obj(
                    422,
                    "Invalid",
                    format!("Pod \"{name}\" is invalid: spec.containers: Required value"),
                );
            }
            if k.pods.contains_key(&name) {
                return status_obj(
                    409,
                    "AlreadyExists",
                    format!("pods \"{name}\" already exists"),
                );
            }
            let mut pod = body.clone();
            pod["metadata"]["namespace"] = json!(ns);
            pod["metadata"]["uid"] = json!(format!("uid-{name}"));
            pod["status"] = json!({"phase": "Pending"});
            let ready = now + k.start;
            k.builds.push(Build::new(&name));
            k.pods.insert(name, (pod.clone(), ready, None));
            reply(StatusCode::CREATED, pod)
        }
        (Method::GET, ["api", "v1", "namespaces", _, "pods"]) => {
            let items: Vec<Value> = k
                .pods
                .values()
                .map(|(p, _, _)| p.clone())
                .filter(|p| matches(p))
                .collect();
            reply(
                StatusCode::OK,
                json!({"kind": "PodList", "apiVersion": "v1", "items": items}),
            )
        }
        (Method::GET, ["api", "v1", "namespaces", ns, "pods", name]) => {
            let nads = k.nads.clone();
            let Some((pod, ready, del)) = k.pods.get(*name) else {
                return status_obj(404, "NotFound", format!("pods \"{name}\" not found"));
            };
            let mut pod = pod.clone();
            let image = pod["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if del.is_some() {
                pod["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            if image != "default" {
                pod["status"]["containerStatuses"] = json!([{"name": "vdu", "ready": false,
                    "state": {"waiting": {"reason": "ErrImagePull", "message": format!("pull access denied for {image}")}}}]);
            } else if now >= *ready {
                // What Multus writes: one entry per requested network, with its IPs and a MAC.
                let nets: Value = pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"]
                    .as_str()
                    .and_then(|s| serde_json::from_str(s).ok())
                    .unwrap_or(json!([]));
                let mut status = vec![
                    json!({"name": "cbr0", "interface": "eth0", "ips": ["10.244.0.9"], "default": true}),
                ];
                for (i, n) in nets.as_array().into_iter().flatten().enumerate() {
                    let Some(nad) = n["name"].as_str() else {
                        continue;
                    };
                    if !nads.contains_key(nad) {
                        // Multus cannot find the attachment: the sandbox never comes up.
                        return reply(StatusCode::OK, pod);
                    }
                    status.push(json!({"name": format!("{ns}/{nad}"), "interface": n["interface"],
                        "ips": n["ips"].as_array().into_iter().flatten().map(|ip| ip.as_str().unwrap_or("").split('/').next().unwrap_or("").to_owned()).collect::<Vec<_>>(),
                        "mac": format!("0a:58:0a:00:00:{:02x}", i + 1)}));
                }
                pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"] =
                    json!(Value::Array(status).to_string());
                pod["status"] = json!({"phase": "Running", "podIP": "10.244.0.9",
                    "containerStatuses": [{"name": "vdu", "ready": true, "state": {"running": {}}}]});
                Build::saw_ready(&mut k.builds, name);
            }
            reply(StatusCode::OK, pod)
        }
        (Method::DELETE, ["api", "v1", "namespaces", _, "pods", name]) => {
            let half = k.start / 2;
            let Some(entry) = k.pods.get_mut(*name) else {
                return status_obj(404, "NotFound", format!("pods \"{name}\" not found"));
            };
            entry.2.get_or_insert(now + half);
            reply(StatusCode::OK, entry.0.clone())
        }
        (
            Method::POST,
            ["apis", "k8s.cni.cncf.io", "v1", "namespaces", _, "network-attachment-definitions"],
        ) => {
            let Some(name) = body["metadata"]["name"].as_str().map(str::to_owned) else {
                return status_obj(422, "Invalid", "metadata.name: Required value".into());
            };
            if k.nads.contains_key(&name) {
                return status_obj(
                    409,
                    "AlreadyExists",
                    format!(
                        "network-attachment-definitions.k8s.cni.cncf.io \"{name}\" already exists"
                    ),
                );
            }
            if body["spec"]["config"]
                .as_str()
                .and_then(|c| serde_json::from_str::<Value>(c).ok())
                .is_none()
            {
                return status_obj(
                    422,
                    "Invalid",
                    "spec.config: must be a JSON CNI config".into(),
                );
            }
            k.nads.insert(name, body.clone());
            reply(StatusCode::CREATED, body)
        }
        (
            Method::GET,
            ["apis", "k8s.cni.cncf.io", "v1", "namespaces", _, "network-attachment-definitions"],
        ) => {
            let items: Vec<Value> = k.nads.values().filter(|n| matches(n)).cloned().collect();
            reply(
                StatusCode::OK,
                json!({"kind": "NetworkAttachmentDefinitionList", "items": items}),
            )
        }
        (
            Method::DELETE,
            ["apis", "k8s.cni.cncf.io", "v1", "namespaces", _, "network-attachment-definitions", name],
        ) => match k.nads.remove(*name) {
            Some(_) => reply(
                StatusCode::OK,
                json!({"kind": "Status", "status": "Success"}),
            ),
            None => status_obj(
                404,
                "NotFound",
                format!("network-attachment-definitions.k8s.cni.cncf.io \"{name}\" not found"),
            ),
        },
        _ => status_obj(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({m} {path})"),
        ),
    }
}
