//! A router over an in-memory store, with an admin token, two tenants, an
//! agent token, and helpers to call it.

use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use api::{AppState, ServerConfig};
use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use store::testing::MemStore;
use store::Store;
use tower::ServiceExt;

/// One operation of the OpenAPI document: its method, the path template's segments
/// (`None`: a `{param}`, matching any one segment) and the statuses it documents.
struct Documented {
    method: String,
    template: String,
    segments: Vec<Option<String>>,
    statuses: BTreeSet<u16>,
}

/// Every operation of `api::openapi()`, the contract the router tests hold the server to.
static CONTRACT: LazyLock<Vec<Documented>> = LazyLock::new(|| {
    let doc = serde_json::to_value(api::openapi()).unwrap();
    let mut ops = Vec::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Some(responses) = op.get("responses").and_then(Value::as_object) else {
                continue;
            };
            let segments = template
                .split('/')
                .map(|s| (!(s.starts_with('{') && s.ends_with('}'))).then(|| s.to_owned()))
                .collect();
            let statuses = responses.keys().map(|k| k.parse().unwrap()).collect();
            ops.push(Documented {
                method: method.to_uppercase(),
                template: template.clone(),
                segments,
                statuses,
            });
        }
    }
    ops
});

/// Panics unless `status` is documented for the operation `method path` names. A
/// path that matches no template (or no operation with this method) may get only 404
/// or 405. Among templates that match, the one with the most literal segments wins,
/// as in the router (`/v1/blobs/import` before `/v1/blobs/{digest}`).
pub fn check_documented(method: &Method, path: &str, status: StatusCode) {
    let path = path.split('?').next().unwrap_or(path);
    let parts: Vec<&str> = path.split('/').collect();
    let matches = |d: &&Documented| {
        d.segments.len() == parts.len()
            && d.segments.iter().zip(&parts).all(|(s, p)| match s {
                Some(lit) => lit == p,
                None => !p.is_empty(),
            })
    };
    let literals = |d: &&Documented| d.segments.iter().filter(|s| s.is_some()).count();
    let best = CONTRACT
        .iter()
        .filter(matches)
        .max_by_key(literals)
        .map(|d| literals(&d));
    let op = CONTRACT
        .iter()
        .filter(matches)
        .filter(|d| Some(literals(d)) == best)
        .find(|d| d.method == method.as_str());
    match op {
        Some(op) => assert!(
            op.statuses.contains(&status.as_u16()),
            "{method} {path} returned {status}, which the OpenAPI document does not list \
             for {} {} (documented: {:?})",
            op.method,
            op.template,
            op.statuses,
        ),
        None => assert!(
            matches!(status.as_u16(), 404 | 405),
            "{method} {path} matches no documented operation but returned {status}, not 404/405",
        ),
    }
}

pub struct Resp {
    pub status: StatusCode,
    pub content_type: String,
    pub retry_after: Option<String>,
    pub text: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// Asserts a problem+json error with `status` whose detail contains `needle`.
    pub fn problem(&self, status: u16, needle: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        assert_eq!(
            self.content_type, "application/problem+json",
            "{}",
            self.text
        );
        let p = self.json();
        assert_eq!(p["status"], status);
        assert!(p["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:vinfra:problem:"));
        assert!(p["title"].is_string());
        let detail = p["detail"].as_str().unwrap();
        assert!(
            detail.contains(needle),
            "detail {detail:?} lacks {needle:?}"
        );
    }
}

pub struct App {
    pub router: Router,
    pub store: Arc<dyn Store>,
    pub admin: String,
    pub _dir: tempfile::TempDir,
}

pub struct World {
    pub app: App,
    pub a: String,
    pub b: String,
    pub agent: String,
}

impl App {
    pub async fn new() -> Self {
        Self::with_timeout(Duration::from_secs(6)).await
    }

    pub async fn with_timeout(heartbeat_timeout: Duration) -> Self {
        Self::with_store(Arc::new(MemStore::new()), heartbeat_timeout).await
    }

    /// The one place that picks the store: swap in another backend here.
    pub async fn with_store(store: Arc<dyn Store>, heartbeat_timeout: Duration) -> Self {
        let config = ServerConfig {
            heartbeat_timeout,
            ..ServerConfig::default()
        };
        Self::with_config(store, config).await
    }

    pub async fn with_config(store: Arc<dyn Store>, config: ServerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let admin = api::bootstrap_admin(store.as_ref(), dir.path())
            .await
            .unwrap()
            .expect("first start mints a token");
        let state = AppState::new(store.clone(), &config);
        state.set_blobs(
            api::BlobFiles::open(api::BlobConfig {
                dir: dir.path().join("blobs"),
                import_dir: Some(dir.path().join("import")),
                max_bytes: 1 << 20,
            })
            .unwrap(),
        );
        let router = api::router(state);
        Self {
            router,
            store,
            admin,
            _dir: dir,
        }
    }

    /// The app's scratch directory (its image store and import directory live here).
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: &str,
    ) -> Resp {
        let mut req = Request::builder().method(method.clone()).uri(path);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let req = req.body(Body::from(body.to_owned())).unwrap();
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        check_documented(&method, path, status);
        let content_type = res
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let retry_after = res
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 24)
            .await
            .unwrap();
        Resp {
            status,
            content_type,
            retry_after,
            text: String::from_utf8(bytes.to_vec()).unwrap(),
        }
    }

    pub async fn call(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> Resp {
        match body {
            Some(b) => {
                self.raw(
                    method,
                    path,
                    Some(token),
                    Some("application/json"),
                    &b.to_string(),
                )
                .await
            }
            None => self.raw(method, path, Some(token), None, "").await,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.call(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Resp {
        self.call(Method::POST, path, token, Some(body)).await
    }

    /// Creates a tenant and returns its member token.
    pub async fn tenant(&self, name: &str) -> String {
        let r = self
            .post("/v1/tenants", &self.admin, json!({ "name": name }))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.json()["token"].as_str().unwrap().to_owned()
    }

    pub async fn token(&self, role: &str) -> String {
        let r = self
            .post("/v1/tokens", &self.admin, json!({ "role": role }))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.json()["token"].as_str().unwrap().to_owned()
    }

    pub async fn host(&self, token: &str, name: &str, cpus: u32, memory_mib: u64) -> Value {
        let r = self
            .post(
                "/v1/hosts",
                token,
                // vcpus = cpus: no overcommit, so that tests count vCPUs one for one.
                json!({ "name": name, "cpus": cpus, "vcpus": cpus, "memory_mib": memory_mib, "disk_gib": 100,
                        "drivers": ["process"], "agent_url": "http://127.0.0.1:7071" }),
            )
            .await;
        assert!(r.status.is_success(), "{}", r.text);
        r.json()
    }

    /// Uploads `bytes` into the image store; returns the blob's digest.
    pub async fn blob(&self, token: &str, bytes: &str) -> String {
        let r = self
            .raw(
                Method::POST,
                "/v1/blobs",
                Some(token),
                Some("application/octet-stream"),
                bytes,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.json()["digest"].as_str().unwrap().to_owned()
    }

    pub async fn image(&self, token: &str, name: &str) -> Value {
        let kernel = self.blob(token, "kernel").await;
        let initrd = self.blob(token, "initrd").await;
        let r = self
            .post(
                "/v1/images",
                token,
                json!({ "name": name, "kernel": kernel, "initrd": initrd,
                        "cmdline": "console=ttyS0", "disk_mib": 1024 }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.json()
    }

    pub async fn vm(&self, token: &str, name: &str, vcpus: u32, memory_mib: u64) -> Resp {
        self.post(
            "/v1/vms",
            token,
            json!({ "name": name, "image": "debian", "vcpus": vcpus, "memory_mib": memory_mib }),
        )
        .await
    }
}

impl World {
    /// Admin, tenants `a` and `b`, an agent, host `h1` (8 CPUs, 8 GiB) and a
    /// public image `debian`.
    pub async fn new() -> Self {
        Self::from(App::new().await).await
    }

    pub async fn from(app: App) -> Self {
        let a = app.tenant("a").await;
        let b = app.tenant("b").await;
        let agent = app.token("agent").await;
        app.host(&agent, "h1", 8, 8192).await;
        app.image(&app.admin, "debian").await;
        Self { app, a, b, agent }
    }
}

/// Polls `cond` until it holds or `deadline` passes.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    while !cond().await {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn the_contract_check_knows_templates_and_refuses_undocumented_statuses() {
    check_documented(&Method::GET, "/v1/vms/x?y=1", StatusCode::NOT_FOUND);
    check_documented(&Method::POST, "/v1/blobs/import", StatusCode::CREATED);
    check_documented(&Method::PATCH, "/v1/vms/x", StatusCode::METHOD_NOT_ALLOWED);
    check_documented(&Method::GET, "/v1/nowhere", StatusCode::NOT_FOUND);
    for (method, path, status) in [
        (Method::GET, "/v1/vms/x", StatusCode::IM_A_TEAPOT),
        (Method::GET, "/v1/openapi.json", StatusCode::UNAUTHORIZED),
        (Method::GET, "/v1/nowhere", StatusCode::UNAUTHORIZED),
    ] {
        let r = std::panic::catch_unwind(|| check_documented(&method, path, status));
        assert!(r.is_err(), "{method} {path} {status} passed the check");
    }
}
