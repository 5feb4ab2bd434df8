//! The control plane's application layer: the rules of every operation (placement,
//! migrations, maintenance drains, standby takeovers) and the background work that
//! carries long operations to their end, over a [`store::Store`].
//!
//! Owns: the store key layout ([`records`]) and every read-modify-write of records.
//! Must not depend on: HTTP (axum), store backends, the agent, compute drivers. The API
//! crate's handlers authenticate, parse, make one call here and map the typed error;
//! this crate never builds an HTTP answer.
//!
//! Tasks: [`driver::Driver`] owns the background tasks (the drain driver, the takeover
//! watcher) and stops them on shutdown. The push hub ([`push`]), which runs on every
//! server, is started by the first host event stream and stopped by
//! [`Control::close_push`].
#![warn(missing_docs)]

pub mod cluster;
mod descriptors;
pub mod driver;
mod error;
mod hosts;
mod images;
pub mod ledger;
mod maintenance;
mod migrations;
pub mod networks;
pub mod ns;
pub mod ns_site;
pub mod operations;
pub mod push;
pub mod records;
mod resource_tables;
pub mod sessions;
pub mod slices;
pub mod snapshots;
pub mod storage;
mod takeover;
pub mod terminals;
mod traces;
mod traffic;
mod vms;

use std::sync::Arc;

use model::{Host, TenantId};
use store::Store;

pub use driver::{Driver, DriverConfig, Tasks};
pub use error::ControlError;
pub use images::ImageError;
pub use maintenance::{plan_drain, DrainPlanError, MaintenanceError};
pub use migrations::{MigrateStartError, MigrationReportError};
pub use networks::{NetworkDeleteError, NicError};
pub use ns::NsError;
pub use operations::CancelError;
pub use push::{HostEvents, PushError};
pub use records::now_ms;
pub use resource_tables::ResourceTableError;
pub use slices::{RecheckError, SliceError};
pub use snapshots::SnapshotError;
pub use storage::StorageError;
pub use takeover::{default_takeover_margin, lease_expired, LeaseWatch};
pub use vms::{CreateVmError, Observed, VmChangeError, VmDeleted};

/// Which tenants' objects a caller sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every tenant's.
    All,
    /// One tenant's (and public images).
    Tenant(TenantId),
}

impl Scope {
    /// Whether an object owned by `tenant` is visible.
    pub fn sees(self, tenant: TenantId) -> bool {
        match self {
            Scope::All => true,
            Scope::Tenant(t) => t == tenant,
        }
    }
}

/// The control layer over one store. Cheap to clone.
#[derive(Clone)]
pub struct Control {
    store: Arc<dyn Store>,
    heartbeat_timeout_ms: u64,
    /// Jobs started by requests (NS work); the operation driver stops them with itself.
    jobs: Tasks,
    /// The hosts' event streams (`push`).
    push: push::Push,
    /// This server's terminal state (rate buckets, refusal counts, recent operations).
    terminals: Arc<terminals::Terminals>,
    /// The slice ledger's key and, once opened, the ledger.
    slices: Arc<slices::SliceState>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("heartbeat_timeout_ms", &self.heartbeat_timeout_ms)
            .finish_non_exhaustive()
    }
}

impl Control {
    /// The control layer over `store`; a host is down when its last heartbeat is older
    /// than `heartbeat_timeout_ms`.
    pub fn new(store: Arc<dyn Store>, heartbeat_timeout_ms: u64) -> Self {
        Self {
            store,
            heartbeat_timeout_ms,
            jobs: Tasks::default(),
            push: push::Push::new(push::DEFAULT_KEEPALIVE),
            terminals: Arc::default(),
            slices: Arc::default(),
        }
    }

    /// This server's terminal state.
    pub(crate) fn terminals(&self) -> &terminals::Terminals {
        &self.terminals
    }

    /// Where request-started jobs run.
    pub fn jobs(&self) -> &Tasks {
        &self.jobs
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The store, shared.
    pub fn store_arc(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// How old a heartbeat may be before its host is down, ms.
    pub fn heartbeat_timeout_ms(&self) -> u64 {
        self.heartbeat_timeout_ms
    }

    /// Every host, with `state` computed for now.
    pub async fn hosts(&self) -> Result<Vec<Host>, ControlError> {
        let now = now_ms();
        Ok(
            records::list_json::<Host>(self.store(), records::keys::HOSTS)
                .await?
                .into_iter()
                .map(|(mut h, _)| {
                    h.refresh_state(now, self.heartbeat_timeout_ms);
                    h
                })
                .collect(),
        )
    }

    /// The VMs `scope` sees, by tenant then name.
    pub async fn vms(&self, scope: Scope) -> Result<Vec<model::Vm>, ControlError> {
        let mut vms: Vec<model::Vm> =
            records::list_json::<model::Vm>(self.store(), records::keys::VMS)
                .await?
                .into_iter()
                .map(|(v, _)| v)
                .filter(|v| scope.sees(v.tenant))
                .collect();
        vms.sort_by(|a, b| (a.tenant, &a.name).cmp(&(b.tenant, &b.name)));
        Ok(vms)
    }
}
