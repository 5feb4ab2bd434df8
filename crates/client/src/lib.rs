//! Typed async client of the vinfra control-plane REST API, used by the CLI
//! and the node agent.
//!
//! Owns: one method per route, returning `model` types, and [`ClientError`],
//! which carries the HTTP status and the server's problem `detail`.
//! Must not depend on: the server (`api`); the two meet only through the
//! wire bodies in `model::api`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), client::ClientError> {
//! let c = client::Client::new("http://127.0.0.1:7070", "vinfra_...")?;
//! for vm in c.list_vms().await? {
//!     println!("{} {:?}", vm.name, vm.observed);
//! }
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod blobs;
pub mod events;
mod join;
pub mod session;
pub mod terminal;

use std::time::Duration;

pub use blobs::{file_digest, ImageFiles};
pub use events::{EventLineError, HostEventStream};
pub use join::{join, ClientTls, JoinError};

use model::api::{
    Assignment, CreateImage, CreateNetwork, CreateNsInstance, CreateTenant, CreateToken, CreateVm,
    DescriptorUpload, EnterMaintenance, HostLease, MigrateVm, MigrationReport, NsInstanceRecord,
    ObservedReport, PlacementQuery, Problem, RegisterHost, ScaleNsInstance, StorageInventory,
    StoredDescriptor, TenantCreated, TokenCreated, TokenInfo,
};
use model::{
    Host, Image, Maintenance, MaintenanceId, Migration, MigrationId, Network, Tenant, TokenId, Vm,
    VmId,
};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The base URL is not an absolute http(s) URL.
    #[error("invalid server URL {url:?}")]
    InvalidUrl {
        /// The rejected URL.
        url: String,
        /// Why it was rejected.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The server answered with an error status.
    #[error("{method} {path}: HTTP {status}: {detail}")]
    Api {
        /// Request method.
        method: Method,
        /// Request path.
        path: String,
        /// HTTP status.
        status: u16,
        /// The problem's `title` (or the reason phrase).
        title: String,
        /// The problem's `detail` (or the raw body if it was not a problem).
        detail: String,
    },
    /// The request could not be sent or the response not read.
    #[error("{method} {path}: request failed")]
    Transport {
        /// Request method.
        method: Method,
        /// Request path.
        path: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// A local file could not be read or written.
    #[error("cannot {action} {path}")]
    File {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A downloaded blob hashed to other than its digest.
    #[error("blob {expected}: the download hashed to {got}")]
    DigestMismatch {
        /// The digest asked for.
        expected: model::BlobDigest,
        /// What the bytes hash to.
        got: model::BlobDigest,
    },
    /// A line of a host's event stream is not an event (the stream goes on after it).
    #[error("{path}: event line {line}")]
    EventLine {
        /// Request path.
        path: String,
        /// The line's number in the stream, from 1.
        line: u64,
        /// What is wrong with it.
        #[source]
        reason: EventLineError,
    },
    /// An event stream stayed silent longer than its idle timeout (the server pings a
    /// quiet stream): the connection is taken for dead.
    #[error("{path}: nothing received for {idle:?}; the connection is taken for dead")]
    StreamIdle {
        /// Request path.
        path: String,
        /// The idle timeout.
        idle: Duration,
    },
    /// A success response whose body is not what the route promises.
    #[error("{method} {path}: cannot decode the response")]
    Decode {
        /// Request method.
        method: Method,
        /// Request path.
        path: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// The HTTP status, if the server answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's problem detail, if it answered with an error.
    pub fn detail(&self) -> Option<&str> {
        match self {
            ClientError::Api { detail, .. } => Some(detail),
            _ => None,
        }
    }
}

impl ClientError {
    /// An error about a local file.
    pub fn from_io(action: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        ClientError::File {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// What `DELETE /v1/vms/{id}` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmDeletion {
    /// `desired` is now `deleted`; the record goes when the agent confirms.
    Pending(Box<Vm>),
    /// The record is gone (its host was down or gone).
    Deleted,
}

/// A client bound to one control plane (one server, or several servers of one store)
/// and one bearer token. Cheap to clone; clones share which server is in use.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// The servers, as given; all serve the same store.
    bases: std::sync::Arc<Vec<Url>>,
    /// Which of `bases` requests go to: the first, until it cannot be reached.
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    token: String,
}

impl Client {
    /// A client for the server at `base_url` (e.g. `http://127.0.0.1:7070`) with a
    /// 30 s timeout per request. Several servers of one store may be given, separated by
    /// commas: requests go to the first, and move to the next when a connection cannot
    /// be made (nothing was sent, so any request may be retried there).
    pub fn new(base_url: &str, token: &str) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ClientError::InvalidUrl {
                url: base_url.to_owned(),
                source: Box::new(e),
            })?;
        Self::with_http(http, base_url, token)
    }

    /// A client using a preconfigured `reqwest::Client`.
    pub fn with_http(
        http: reqwest::Client,
        base_url: &str,
        token: &str,
    ) -> Result<Self, ClientError> {
        let invalid = |source: Box<dyn std::error::Error + Send + Sync>| ClientError::InvalidUrl {
            url: base_url.to_owned(),
            source,
        };
        let mut bases = Vec::new();
        for one in base_url.split(',').map(str::trim) {
            let base = Url::parse(one).map_err(|e| invalid(Box::new(e)))?;
            if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
                return Err(invalid("must be an http:// or https:// URL".into()));
            }
            bases.push(base);
        }
        Ok(Self {
            http,
            bases: std::sync::Arc::new(bases),
            current: std::sync::Arc::default(),
            token: token.to_owned(),
        })
    }

    /// The base URL of the server in use.
    pub fn base_url(&self) -> &Url {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        // `with_http` made at least one, and `current` only takes indexes of `bases`.
        &self.bases[i % self.bases.len()]
    }

    // ---- tenants (admin) and tokens ----

    /// `POST /v1/tenants`: creates a tenant; the answer holds its first member token.
    pub async fn create_tenant(&self, name: &str) -> Result<TenantCreated, ClientError> {
        let body = CreateTenant {
            name: name.to_owned(),
        };
        self.json(Method::POST, &["v1", "tenants"], Some(&body))
            .await
    }

    /// `GET /v1/tenants`.
    pub async fn list_tenants(&self) -> Result<Vec<Tenant>, ClientError> {
        self.json(Method::GET, &["v1", "tenants"], NO_BODY).await
    }

    /// `POST /v1/tokens`: mints a token; the answer holds the secret, shown only this once.
    pub async fn create_token(&self, req: &CreateToken) -> Result<TokenCreated, ClientError> {
        self.json(Method::POST, &["v1", "tokens"], Some(req)).await
    }

    /// `GET /v1/tokens`: the tokens this caller may manage (metadata only).
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, ClientError> {
        self.json(Method::GET, &["v1", "tokens"], NO_BODY).await
    }

    /// `DELETE /v1/tokens/{id}`: revokes a token at once.
    pub async fn revoke_token(&self, id: TokenId) -> Result<(), ClientError> {
        let id = id.to_string();
        self.send(Method::DELETE, &["v1", "tokens", &id], NO_BODY)
            .await
            .map(drop)
    }

    // ---- hosts ----

    /// `POST /v1/hosts`: registers (or re-registers) a host.
    pub async fn register_host(&self, req: &RegisterHost) -> Result<HostLease, ClientError> {
        self.json(Method::POST, &["v1", "hosts"], Some(req)).await
    }

    /// `POST /v1/hosts/{name}/heartbeat`: the answer carries the lease it renewed.
    pub async fn heartbeat(&self, host: &str) -> Result<HostLease, ClientError> {
        self.json(Method::POST, &["v1", "hosts", host, "heartbeat"], NO_BODY)
            .await
    }

    /// `GET /v1/hosts`.
    pub async fn list_hosts(&self) -> Result<Vec<Host>, ClientError> {
        self.json(Method::GET, &["v1", "hosts"], NO_BODY).await
    }

    /// `GET /v1/hosts/{name}`.
    pub async fn get_host(&self, host: &str) -> Result<Host, ClientError> {
        self.json(Method::GET, &["v1", "hosts", host], NO_BODY)
            .await
    }

    // ---- images ----

    /// `POST /v1/images`.
    pub async fn create_image(&self, req: &CreateImage) -> Result<Image, ClientError> {
        self.json(Method::POST, &["v1", "images"], Some(req)).await
    }

    /// `GET /v1/images`.
    pub async fn list_images(&self) -> Result<Vec<Image>, ClientError> {
        self.json(Method::GET, &["v1", "images"], NO_BODY).await
    }

    /// `GET /v1/images/{name}` (name or id).
    pub async fn get_image(&self, name_or_id: &str) -> Result<Image, ClientError> {
        self.json(Method::GET, &["v1", "images", name_or_id], NO_BODY)
            .await
    }

    /// `DELETE /v1/images/{name}` (name or id).
    pub async fn delete_image(&self, name_or_id: &str) -> Result<(), ClientError> {
        self.send(Method::DELETE, &["v1", "images", name_or_id], NO_BODY)
            .await
            .map(drop)
    }

    // ---- NS instances ----

    /// `POST /v1/ns-instances` (202: follow with [`Client::get_ns_instance`]).
    pub async fn create_ns_instance(
        &self,
        req: &CreateNsInstance,
    ) -> Result<NsInstanceRecord, ClientError> {
        self.json(Method::POST, &["v1", "ns-instances"], Some(req))
            .await
    }

    /// `GET /v1/ns-instances`.
    pub async fn list_ns_instances(&self) -> Result<Vec<NsInstanceRecord>, ClientError> {
        self.json(Method::GET, &["v1", "ns-instances"], NO_BODY)
            .await
    }

    /// `GET /v1/ns-instances/{name}` (name or id).
    pub async fn get_ns_instance(&self, name_or_id: &str) -> Result<NsInstanceRecord, ClientError> {
        self.json(Method::GET, &["v1", "ns-instances", name_or_id], NO_BODY)
            .await
    }

    /// `POST /v1/ns-instances/{name}/scale` (202: the state is `scaling` until done).
    pub async fn scale_ns_instance(
        &self,
        name_or_id: &str,
        req: &ScaleNsInstance,
    ) -> Result<NsInstanceRecord, ClientError> {
        self.json(
            Method::POST,
            &["v1", "ns-instances", name_or_id, "scale"],
            Some(req),
        )
        .await
    }

    /// `DELETE /v1/ns-instances/{name}?forget=true`: drops a failed instance's record
    /// without contacting its sites (whatever they still hold is the caller's to clean).
    pub async fn forget_ns_instance(&self, name_or_id: &str) -> Result<(), ClientError> {
        self.send_query(
            Method::DELETE,
            &["v1", "ns-instances", name_or_id],
            Some("forget=true"),
        )
        .await
        .map(drop)
    }

    /// `DELETE /v1/ns-instances/{name}` (202: the record goes when every site is empty).
    pub async fn delete_ns_instance(
        &self,
        name_or_id: &str,
    ) -> Result<NsInstanceRecord, ClientError> {
        self.json(Method::DELETE, &["v1", "ns-instances", name_or_id], NO_BODY)
            .await
    }

    // ---- networks ----

    /// `POST /v1/networks`.
    pub async fn create_network(&self, req: &CreateNetwork) -> Result<Network, ClientError> {
        self.json(Method::POST, &["v1", "networks"], Some(req))
            .await
    }

    /// `GET /v1/networks`.
    pub async fn list_networks(&self) -> Result<Vec<Network>, ClientError> {
        self.json(Method::GET, &["v1", "networks"], NO_BODY).await
    }

    /// `GET /v1/networks/{name}` (name or id).
    pub async fn get_network(&self, name_or_id: &str) -> Result<Network, ClientError> {
        self.json(Method::GET, &["v1", "networks", name_or_id], NO_BODY)
            .await
    }

    /// `DELETE /v1/networks/{name}` (name or id).
    pub async fn delete_network(&self, name_or_id: &str) -> Result<(), ClientError> {
        self.send(Method::DELETE, &["v1", "networks", name_or_id], NO_BODY)
            .await
            .map(drop)
    }

    // ---- terminals ----

    /// `POST /v1/terminals`: the answer holds the terminal's secret, shown this once.
    pub async fn create_terminal(
        &self,
        req: &model::terminals::CreateTerminal,
    ) -> Result<model::terminals::CreatedTerminal, ClientError> {
        self.json(Method::POST, &["v1", "terminals"], Some(req))
            .await
    }

    /// `GET /v1/terminals`.
    pub async fn list_terminals(&self) -> Result<Vec<model::terminals::Terminal>, ClientError> {
        self.json(Method::GET, &["v1", "terminals"], NO_BODY).await
    }

    /// `GET /v1/terminals/{terminal}` (name or id).
    pub async fn get_terminal(
        &self,
        name_or_id: &str,
    ) -> Result<model::terminals::Terminal, ClientError> {
        self.json(Method::GET, &["v1", "terminals", name_or_id], NO_BODY)
            .await
    }

    /// `DELETE /v1/terminals/{terminal}`.
    pub async fn delete_terminal(&self, name_or_id: &str) -> Result<(), ClientError> {
        self.send(Method::DELETE, &["v1", "terminals", name_or_id], NO_BODY)
            .await
            .map(drop)
    }

    /// `PUT /v1/terminals/{terminal}/binding`.
    pub async fn bind_terminal(
        &self,
        name_or_id: &str,
        req: &model::terminals::BindTerminal,
    ) -> Result<model::terminals::Terminal, ClientError> {
        self.json(
            Method::PUT,
            &["v1", "terminals", name_or_id, "binding"],
            Some(req),
        )
        .await
    }

    /// `DELETE /v1/terminals/{terminal}/binding`.
    pub async fn unbind_terminal(
        &self,
        name_or_id: &str,
    ) -> Result<model::terminals::Terminal, ClientError> {
        self.json(
            Method::DELETE,
            &["v1", "terminals", name_or_id, "binding"],
            NO_BODY,
        )
        .await
    }

    /// `GET /v1/terminals/{terminal}/operations`.
    pub async fn terminal_operations(
        &self,
        name_or_id: &str,
    ) -> Result<Vec<model::terminals::PerformedOperation>, ClientError> {
        self.json(
            Method::GET,
            &["v1", "terminals", name_or_id, "operations"],
            NO_BODY,
        )
        .await
    }

    /// `PUT /v1/terminal-operations/{terminal}/{seq}/result`: a host's answer.
    pub async fn answer_terminal_operation(
        &self,
        terminal: model::TerminalId,
        seq: u64,
        result: &model::terminals::OperationResult,
    ) -> Result<model::terminals::PerformedOperation, ClientError> {
        let (t, seq) = (terminal.to_string(), seq.to_string());
        self.json(
            Method::PUT,
            &["v1", "terminal-operations", &t, &seq, "result"],
            Some(result),
        )
        .await
    }

    /// `POST /v1/terminal-operations/results`: several answers of a host at once.
    pub async fn answer_terminal_operations(
        &self,
        answers: &model::terminals::OperationAnswers,
    ) -> Result<Vec<model::terminals::AnswerOutcome>, ClientError> {
        self.json(
            Method::POST,
            &["v1", "terminal-operations", "results"],
            Some(answers),
        )
        .await
    }

    /// `POST /v1/terminal-operations` with a signed message ([`terminal::TerminalCredentials::sign`]); the
    /// message authenticates itself, whatever this client's token.
    pub async fn send_operation(
        &self,
        message: Vec<u8>,
    ) -> Result<model::terminals::PerformedOperation, ClientError> {
        let segments = ["v1", "terminal-operations"];
        let path = segments.join("/");
        let res = self
            .execute_any(&Method::POST, &path, |base| {
                self.http
                    .request(Method::POST, Self::join(base, &segments))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(message.clone())
            })
            .await?;
        let res = Self::check(Method::POST, path.clone(), res).await?;
        res.json().await.map_err(|source| ClientError::Transport {
            method: Method::POST,
            path,
            source,
        })
    }

    // ---- VMs ----

    /// `POST /v1/vms`: creates and places a VM.
    pub async fn create_vm(&self, req: &CreateVm) -> Result<Vm, ClientError> {
        self.json(Method::POST, &["v1", "vms"], Some(req)).await
    }

    /// `GET /v1/vms`.
    pub async fn list_vms(&self) -> Result<Vec<Vm>, ClientError> {
        self.json(Method::GET, &["v1", "vms"], NO_BODY).await
    }

    /// `GET /v1/vms/{id}` (id or name).
    pub async fn get_vm(&self, id_or_name: &str) -> Result<Vm, ClientError> {
        self.json(Method::GET, &["v1", "vms", id_or_name], NO_BODY)
            .await
    }

    /// `POST /v1/vms/{id}/start`.
    pub async fn start_vm(&self, id_or_name: &str) -> Result<Vm, ClientError> {
        self.json(Method::POST, &["v1", "vms", id_or_name, "start"], NO_BODY)
            .await
    }

    /// `POST /v1/vms/{id}/stop`.
    pub async fn stop_vm(&self, id_or_name: &str) -> Result<Vm, ClientError> {
        self.json(Method::POST, &["v1", "vms", id_or_name, "stop"], NO_BODY)
            .await
    }

    /// `DELETE /v1/vms/{id}`.
    pub async fn delete_vm(&self, id_or_name: &str) -> Result<VmDeletion, ClientError> {
        let path = ["v1", "vms", id_or_name];
        let res = self.send(Method::DELETE, &path, NO_BODY).await?;
        if res.status() == StatusCode::NO_CONTENT {
            return Ok(VmDeletion::Deleted);
        }
        let vm = self.decode(Method::DELETE, &path, res).await?;
        Ok(VmDeletion::Pending(Box::new(vm)))
    }

    /// `GET /v1/vms/{id}/console`: the latest console tail the agent reported.
    pub async fn console(&self, id_or_name: &str) -> Result<String, ClientError> {
        let path = ["v1", "vms", id_or_name, "console"];
        let res = self.send(Method::GET, &path, NO_BODY).await?;
        res.text().await.map_err(|source| ClientError::Transport {
            method: Method::GET,
            path: path.join("/"),
            source,
        })
    }

    /// `PUT /v1/vms/{id}/trace`: start or stop recording the VM disk's requests.
    pub async fn set_trace(&self, id_or_name: &str, recording: bool) -> Result<Vm, ClientError> {
        self.json(
            Method::PUT,
            &["v1", "vms", id_or_name, "trace"],
            Some(&model::api::SetTrace { recording }),
        )
        .await
    }

    // ---- agent side ----

    /// `GET /v1/hosts/{name}/assignments`: what the host must run.
    pub async fn assignments(&self, host: &str) -> Result<Vec<Assignment>, ClientError> {
        self.json(Method::GET, &["v1", "hosts", host, "assignments"], NO_BODY)
            .await
    }

    /// `GET /v1/hosts/{name}/events`: the host's events as they happen, `resync` first
    /// (see [`HostEventStream::next`]). Like every request it goes to the server in use,
    /// or the next one when no connection can be made.
    pub async fn host_events(&self, host: &str) -> Result<HostEventStream, ClientError> {
        let segments = ["v1", "hosts", host, "events"];
        let path = segments.join("/");
        let res = self
            .execute_any(&Method::GET, &path, |base| {
                self.http
                    .get(Self::join(base, &segments))
                    .bearer_auth(&self.token)
                    .header(reqwest::header::ACCEPT, "application/x-ndjson")
                    // The stream lasts as long as the connection: the client's timeout
                    // per request must not cut it. A dead connection is found by the
                    // stream's idle timeout instead.
                    .timeout(STREAM_LIFETIME)
            })
            .await?;
        let res = Self::check(Method::GET, path.clone(), res).await?;
        Ok(HostEventStream::new(res, path))
    }

    /// `PUT /v1/vms/{id}/observed`: reports a VM's state on this host.
    pub async fn report_observed(
        &self,
        vm: VmId,
        report: &ObservedReport,
    ) -> Result<(), ClientError> {
        let id = vm.to_string();
        self.send(Method::PUT, &["v1", "vms", &id, "observed"], Some(report))
            .await
            .map(drop)
    }

    // ---- resource tables ----

    /// `POST /v1/hosts/{name}/resource-tables`.
    pub async fn create_resource_table(
        &self,
        host: &str,
        req: &model::resource_tables::CreateResourceTable,
    ) -> Result<model::resource_tables::ResourceTable, ClientError> {
        self.json(
            Method::POST,
            &["v1", "hosts", host, "resource-tables"],
            Some(req),
        )
        .await
    }

    /// `GET /v1/hosts/{name}/resource-tables`.
    pub async fn list_resource_tables(
        &self,
        host: &str,
    ) -> Result<Vec<model::resource_tables::ResourceTable>, ClientError> {
        self.json(
            Method::GET,
            &["v1", "hosts", host, "resource-tables"],
            NO_BODY,
        )
        .await
    }

    /// `GET /v1/hosts/{name}/resource-tables/{table}` (name or id).
    pub async fn get_resource_table(
        &self,
        host: &str,
        table: &str,
    ) -> Result<model::resource_tables::ResourceTable, ClientError> {
        self.json(
            Method::GET,
            &["v1", "hosts", host, "resource-tables", table],
            NO_BODY,
        )
        .await
    }

    /// `DELETE /v1/hosts/{name}/resource-tables/{table}` (name or id).
    pub async fn delete_resource_table(&self, host: &str, table: &str) -> Result<(), ClientError> {
        self.send(
            Method::DELETE,
            &["v1", "hosts", host, "resource-tables", table],
            NO_BODY,
        )
        .await
        .map(drop)
    }

    /// `PUT /v1/hosts/{name}/resource-tables/{table}/report`: the agent's report.
    pub async fn report_resource_table(
        &self,
        host: &str,
        table: model::ResourceTableId,
        report: &model::resource_tables::ResourceTableReport,
    ) -> Result<(), ClientError> {
        let id = table.to_string();
        self.send(
            Method::PUT,
            &["v1", "hosts", host, "resource-tables", &id, "report"],
            Some(report),
        )
        .await
        .map(drop)
    }

    // ---- migrations ----

    /// `POST /v1/vms/{id}/migrate`: starts a live migration.
    pub async fn migrate_vm(
        &self,
        id_or_name: &str,
        req: &MigrateVm,
    ) -> Result<Migration, ClientError> {
        self.json(
            Method::POST,
            &["v1", "vms", id_or_name, "migrate"],
            Some(req),
        )
        .await
    }

    /// `GET /v1/migrations`.
    pub async fn list_migrations(&self) -> Result<Vec<Migration>, ClientError> {
        self.json(Method::GET, &["v1", "migrations"], NO_BODY).await
    }

    /// `GET /v1/migrations/{id}`.
    pub async fn get_migration(&self, id: MigrationId) -> Result<Migration, ClientError> {
        let id = id.to_string();
        self.json(Method::GET, &["v1", "migrations", &id], NO_BODY)
            .await
    }

    /// `PUT /v1/migrations/{id}/report` (agent).
    pub async fn report_migration(
        &self,
        id: MigrationId,
        report: &MigrationReport,
    ) -> Result<Migration, ClientError> {
        let id = id.to_string();
        self.json(
            Method::PUT,
            &["v1", "migrations", &id, "report"],
            Some(report),
        )
        .await
    }

    /// `PUT /v1/migrations/{id}/snapshot` (source agent): the cache snapshot.
    pub async fn put_migration_snapshot(
        &self,
        id: MigrationId,
        snapshot: Vec<u8>,
    ) -> Result<(), ClientError> {
        let id = id.to_string();
        let segments = ["v1", "migrations", &id, "snapshot"];
        let path = segments.join("/");
        let body = bytes::Bytes::from(snapshot);
        // The same bytes put again replace themselves, so a server error (its store
        // failing over, say) is retried a few times before the migration gives up.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let req = self
                .http
                .put(self.url(&segments))
                .bearer_auth(&self.token)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(body.clone());
            let res = Self::execute(&Method::PUT, &path, req).await?;
            match Self::check(Method::PUT, path.clone(), res).await {
                Err(e) if e.status().is_some_and(|s| s >= 500) && attempt < 4 => {
                    tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
                }
                other => return other.map(drop),
            }
        }
    }

    /// `GET /v1/migrations/{id}/snapshot` (destination agent); `None` until uploaded.
    pub async fn get_migration_snapshot(
        &self,
        id: MigrationId,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let id = id.to_string();
        let segments = ["v1", "migrations", &id, "snapshot"];
        match self.send(Method::GET, &segments, NO_BODY).await {
            Ok(res) => res
                .bytes()
                .await
                .map(|b| Some(b.to_vec()))
                .map_err(|source| ClientError::Transport {
                    method: Method::GET,
                    path: segments.join("/"),
                    source,
                }),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    // ---- maintenance ----

    /// `POST /v1/hosts/{name}/maintenance`: cordon and drain (or plan, with `dry_run`).
    pub async fn enter_maintenance(
        &self,
        host: &str,
        req: &EnterMaintenance,
    ) -> Result<Maintenance, ClientError> {
        self.json(
            Method::POST,
            &["v1", "hosts", host, "maintenance"],
            Some(req),
        )
        .await
    }

    /// `POST /v1/hosts/{name}/maintenance/exit`.
    pub async fn exit_maintenance(&self, host: &str) -> Result<Maintenance, ClientError> {
        self.json(
            Method::POST,
            &["v1", "hosts", host, "maintenance", "exit"],
            NO_BODY,
        )
        .await
    }

    /// `GET /v1/maintenance/{id}`.
    pub async fn get_maintenance(&self, id: MaintenanceId) -> Result<Maintenance, ClientError> {
        let id = id.to_string();
        self.json(Method::GET, &["v1", "maintenance", &id], NO_BODY)
            .await
    }

    /// `GET /v1/maintenance`.
    pub async fn list_maintenance(&self) -> Result<Vec<Maintenance>, ClientError> {
        self.json(Method::GET, &["v1", "maintenance"], NO_BODY)
            .await
    }

    /// `POST /v1/maintenance/{id}/abort`.
    pub async fn abort_maintenance(&self, id: MaintenanceId) -> Result<Maintenance, ClientError> {
        let id = id.to_string();
        self.json(Method::POST, &["v1", "maintenance", &id, "abort"], NO_BODY)
            .await
    }

    // ---- operations ----

    /// `GET /v1/operations`: the caller's long work, newest first.
    pub async fn list_operations(&self) -> Result<Vec<model::api::Operation>, ClientError> {
        self.json(Method::GET, &["v1", "operations"], NO_BODY).await
    }

    /// `GET /v1/operations/{id}`.
    pub async fn get_operation(&self, id: &str) -> Result<model::api::Operation, ClientError> {
        self.json(Method::GET, &["v1", "operations", id], NO_BODY)
            .await
    }

    /// `POST /v1/operations/{id}/cancel`.
    pub async fn cancel_operation(&self, id: &str) -> Result<model::api::Operation, ClientError> {
        self.json(Method::POST, &["v1", "operations", id, "cancel"], NO_BODY)
            .await
    }

    // ---- storage and placement ----

    /// `PUT /v1/storage`: replaces the storage inventory.
    pub async fn put_storage(
        &self,
        inv: &StorageInventory,
    ) -> Result<StorageInventory, ClientError> {
        self.json(Method::PUT, &["v1", "storage"], Some(inv)).await
    }

    /// `GET /v1/storage`.
    pub async fn get_storage(&self) -> Result<StorageInventory, ClientError> {
        self.json(Method::GET, &["v1", "storage"], NO_BODY).await
    }

    /// `POST /v1/placements:explain`: `{placed, placement?, explanation?, text}`.
    pub async fn explain_placement(
        &self,
        q: &PlacementQuery,
    ) -> Result<serde_json::Value, ClientError> {
        self.json(Method::POST, &["v1", "placements:explain"], Some(q))
            .await
    }

    // ---- descriptors ----

    /// `POST /v1/{kind}s` (`kind`: `vnfd` or `nsd`): validates and stores a descriptor.
    pub async fn upload_descriptor(
        &self,
        kind: &str,
        yaml: &str,
    ) -> Result<StoredDescriptor, ClientError> {
        let path = format!("{kind}s");
        let body = DescriptorUpload {
            descriptor: yaml.to_owned(),
        };
        self.json(Method::POST, &["v1", &path], Some(&body)).await
    }

    /// `GET /v1/{kind}s`.
    pub async fn list_descriptors(&self, kind: &str) -> Result<Vec<StoredDescriptor>, ClientError> {
        let path = format!("{kind}s");
        self.json(Method::GET, &["v1", &path], NO_BODY).await
    }

    // ---- traffic ----

    /// `GET /v1/traffic?window_s=N`: the domain's traffic report (JSON as served).
    pub async fn traffic(&self, window_s: Option<u64>) -> Result<serde_json::Value, ClientError> {
        let segments = ["v1", "traffic"];
        let query = window_s.map(|s| format!("window_s={s}"));
        let res = self
            .send_query(Method::GET, &segments, query.as_deref())
            .await?;
        self.decode(Method::GET, &segments, res).await
    }

    /// `method` on `segments` with a query string and no body, status checked.
    async fn send_query(
        &self,
        method: Method,
        segments: &[&str],
        query: Option<&str>,
    ) -> Result<reqwest::Response, ClientError> {
        let path = segments.join("/");
        let res = self
            .execute_any(&method, &path, |base| {
                let mut url = Self::join(base, segments);
                url.set_query(query);
                self.http
                    .request(method.clone(), url)
                    .bearer_auth(&self.token)
            })
            .await?;
        Self::check(method, path, res).await
    }

    // ---- slices ----

    /// `POST /v1/nsis`.
    pub async fn create_nsi(
        &self,
        req: &model::slices::CreateNsi,
    ) -> Result<model::slices::Nsi, ClientError> {
        self.json(Method::POST, &["v1", "nsis"], Some(req)).await
    }

    /// `GET /v1/nsis`.
    pub async fn list_nsis(&self) -> Result<Vec<model::slices::Nsi>, ClientError> {
        self.json(Method::GET, &["v1", "nsis"], NO_BODY).await
    }

    /// `DELETE /v1/nsis/{nsi}`.
    pub async fn delete_nsi(&self, name_or_id: &str) -> Result<(), ClientError> {
        self.send(Method::DELETE, &["v1", "nsis", name_or_id], NO_BODY)
            .await
            .map(drop)
    }

    /// `POST /v1/slices/{type}/associations`.
    pub async fn associate(
        &self,
        slice_type: &str,
        client: &str,
    ) -> Result<model::slices::Association, ClientError> {
        let body = model::slices::Associate {
            client: client.to_owned(),
        };
        self.json(
            Method::POST,
            &["v1", "slices", slice_type, "associations"],
            Some(&body),
        )
        .await
    }

    /// `GET /v1/slices/{type}/associations`.
    pub async fn list_associations(
        &self,
        slice_type: &str,
    ) -> Result<Vec<model::slices::Association>, ClientError> {
        self.json(
            Method::GET,
            &["v1", "slices", slice_type, "associations"],
            NO_BODY,
        )
        .await
    }

    /// `POST /v1/slice-loads`.
    pub async fn record_slice_loads(
        &self,
        req: &model::slices::SliceLoads,
    ) -> Result<model::slices::SliceLoadsRecorded, ClientError> {
        self.json(Method::POST, &["v1", "slice-loads"], Some(req))
            .await
    }

    /// `GET /v1/ledger`.
    pub async fn ledger_head(&self) -> Result<model::slices::LedgerHead, ClientError> {
        self.json(Method::GET, &["v1", "ledger"], NO_BODY).await
    }

    /// `GET /v1/ledger/entries`.
    pub async fn ledger_entries(&self) -> Result<Vec<model::slices::LedgerRawKey>, ClientError> {
        self.json(Method::GET, &["v1", "ledger", "entries"], NO_BODY)
            .await
    }

    /// `GET /v1/ledger/proof?index=&size=`.
    pub async fn ledger_proof(
        &self,
        index: u64,
        size: Option<u64>,
    ) -> Result<model::slices::LedgerProof, ClientError> {
        let mut q = format!("index={index}");
        if let Some(s) = size {
            q.push_str(&format!("&size={s}"));
        }
        let segments = ["v1", "ledger", "proof"];
        let res = self.send_query(Method::GET, &segments, Some(&q)).await?;
        self.decode(Method::GET, &segments, res).await
    }

    /// `GET /v1/ledger/consistency?from=&to=`.
    pub async fn ledger_consistency(
        &self,
        from: u64,
        to: Option<u64>,
    ) -> Result<model::slices::LedgerConsistency, ClientError> {
        let mut q = format!("from={from}");
        if let Some(t) = to {
            q.push_str(&format!("&to={t}"));
        }
        let segments = ["v1", "ledger", "consistency"];
        let res = self.send_query(Method::GET, &segments, Some(&q)).await?;
        self.decode(Method::GET, &segments, res).await
    }

    // ---- meta ----

    /// `GET /v1/openapi.json`.
    pub async fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        self.json(Method::GET, &["v1", "openapi.json"], NO_BODY)
            .await
    }

    /// `GET /metrics`: Prometheus text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let res = self.send(Method::GET, &["metrics"], NO_BODY).await?;
        res.text().await.map_err(|source| ClientError::Transport {
            method: Method::GET,
            path: "metrics".to_owned(),
            source,
        })
    }

    // ---- plumbing ----

    fn url(&self, segments: &[&str]) -> Url {
        Self::join(self.base_url(), segments)
    }

    fn join(base: &Url, segments: &[&str]) -> Url {
        let mut url = base.clone();
        // `with_http` rejected cannot-be-a-base URLs, so this is `Ok`; each
        // segment is percent-encoded, so a name cannot smuggle `/` or `?`.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&B>,
    ) -> Result<reqwest::Response, ClientError> {
        let path = segments.join("/");
        let res = self
            .execute_any(&method, &path, |base| {
                let req = self
                    .http
                    .request(method.clone(), Self::join(base, segments))
                    .bearer_auth(&self.token);
                match body {
                    Some(b) => req.json(b),
                    None => req,
                }
            })
            .await?;
        Self::check(method, path, res).await
    }

    /// [`Self::execute`] on the server in use; when no connection can be made to it,
    /// on the next one, and so on once round. The first that answers stays in use.
    async fn execute_any(
        &self,
        method: &Method,
        path: &str,
        build: impl Fn(&Url) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        use std::sync::atomic::Ordering;
        let n = self.bases.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut tried = 0;
        loop {
            let i = (start + tried) % n;
            match Self::execute(method, path, build(&self.bases[i])).await {
                Err(ClientError::Transport { source, .. })
                    if source.is_connect() && tried + 1 < n => {}
                Ok(res) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(res);
                }
                Err(e) => return Err(e),
            }
            tried += 1;
        }
    }

    /// Sends `req`; while the server answers 429 (over its rate limit, or too busy for
    /// CPU-heavy work — refused before anything was done, so a retry is safe), waits
    /// its `Retry-After` (at most [`MAX_RETRY_WAIT`]) and retries, up to [`RETRIES_429`]
    /// times. A GET answered 503 with `Retry-After` (the server's store did not answer,
    /// e.g. during an etcd leader election) is retried the same way: a read changes
    /// nothing. Other methods are not: their outcome is unknown. The last answer is
    /// returned as it is.
    async fn execute(
        method: &Method,
        path: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let transport = |source| ClientError::Transport {
            method: method.clone(),
            path: path.to_owned(),
            source,
        };
        for _ in 0..RETRIES_429 {
            // Bodies here are in memory, so the request clones; if one did not, it is
            // sent once, below.
            let Some(attempt) = req.try_clone() else {
                break;
            };
            let res = attempt.send().await.map_err(transport)?;
            if !worth_retrying(method, &res) {
                return Ok(res);
            }
            tokio::time::sleep(retry_after(&res)).await;
        }
        req.send().await.map_err(transport)
    }

    /// Turns a non-2xx response into [`ClientError::Api`] with the problem detail.
    async fn check(
        method: Method,
        path: String,
        res: reqwest::Response,
    ) -> Result<reqwest::Response, ClientError> {
        let status = res.status();
        if status.is_success() {
            return Ok(res);
        }
        let text = res.text().await.unwrap_or_default();
        let (title, detail) = match serde_json::from_str::<Problem>(&text) {
            Ok(p) => (p.title, p.detail),
            Err(_) => (
                status.canonical_reason().unwrap_or("error").to_owned(),
                text,
            ),
        };
        Err(ClientError::Api {
            method,
            path,
            status: status.as_u16(),
            title,
            detail,
        })
    }

    async fn decode<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        res: reqwest::Response,
    ) -> Result<T, ClientError> {
        let path = segments.join("/");
        let bytes = res.bytes().await.map_err(|source| ClientError::Transport {
            method: method.clone(),
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            method,
            path,
            source,
        })
    }

    async fn json<T: DeserializeOwned, B: Serialize>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let res = self.send(method.clone(), segments, body).await?;
        self.decode(method, segments, res).await
    }
}

/// `None` with a concrete body type, for routes without a body.
const NO_BODY: Option<&()> = None;

/// The timeout of an event stream's request: a year, i.e. none (see `host_events`).
const STREAM_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// How many times a 429 (or a GET's 503) is waited out and retried before it is returned.
const RETRIES_429: u32 = 3;

/// The longest `Retry-After` honoured; a longer one is cut to this.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);

/// Whether `res` says the same request may succeed in a moment (see
/// [`Client::execute`]).
fn worth_retrying(method: &Method, res: &reqwest::Response) -> bool {
    match res.status() {
        StatusCode::TOO_MANY_REQUESTS => true,
        StatusCode::SERVICE_UNAVAILABLE => {
            *method == Method::GET && res.headers().contains_key(reqwest::header::RETRY_AFTER)
        }
        _ => false,
    }
}

/// A 429's `Retry-After` in seconds (the server sends whole seconds), 1 s when it is
/// missing or not a number.
fn retry_after(res: &reqwest::Response) -> Duration {
    res.headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(1), Duration::from_secs)
        .min(MAX_RETRY_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_segments() {
        let c = Client::new("http://127.0.0.1:7070/", "t").unwrap();
        assert_eq!(
            c.url(&["v1", "vms", "a/b?c"]).as_str(),
            "http://127.0.0.1:7070/v1/vms/a%2Fb%3Fc"
        );
        let c = Client::new("http://h:1/prefix", "t").unwrap();
        assert_eq!(
            c.url(&["v1", "hosts"]).as_str(),
            "http://h:1/prefix/v1/hosts"
        );
        assert!(matches!(
            Client::new("mailto:x@y", "t"),
            Err(ClientError::InvalidUrl { .. })
        ));
        assert!(Client::new("not a url", "t").is_err());
    }
}
