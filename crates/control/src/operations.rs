//! Operations: one view over every kind of long work, read from the records that
//! persist it (migrations, drain sessions, NS instances).
//!
//! Why a view and not a second record: each kind already persists its steps in its own
//! record, written in the same transaction as the objects it changes (a migration flips
//! its VM's host with it). A separate operation record would be a second copy that can
//! disagree with the first after a crash between two writes. The view cannot.

use model::api::{NsInstanceRecord, NsState, Operation, OperationKind, OperationState};
use model::{Maintenance, MaintenanceState, Migration, MigrationState};

use crate::records::{keys, list_json};
use crate::{Control, ControlError, MaintenanceError, Scope};

/// Why an operation cannot be cancelled.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// It is finished.
    #[error("operation {id} is already {}", state_str(*.state))]
    Finished {
        /// The operation.
        id: String,
        /// How it finished.
        state: OperationState,
    },
    /// This kind runs to its end (or fails by itself); the reason says why.
    #[error("operation {id} ({kind}) cannot be cancelled: {why}")]
    NotCancellable {
        /// The operation.
        id: String,
        /// Its kind.
        kind: &'static str,
        /// Why not.
        why: &'static str,
    },
    /// Cancelling a drain failed.
    #[error(transparent)]
    Maintenance(#[from] MaintenanceError),
    /// The store, or no such operation.
    #[error(transparent)]
    Control(#[from] ControlError),
}

fn state_str(s: OperationState) -> &'static str {
    match s {
        OperationState::Running => "running",
        OperationState::Succeeded => "succeeded",
        OperationState::Failed => "failed",
        OperationState::Cancelled => "cancelled",
    }
}

fn kind_str(k: OperationKind) -> &'static str {
    match k {
        OperationKind::Migration => "migration",
        OperationKind::Drain => "drain",
        OperationKind::NsInstantiate => "ns_instantiate",
        OperationKind::NsScale => "ns_scale",
        OperationKind::NsTerminate => "ns_terminate",
    }
}

/// A migration as an operation; progress is the destination's cache rebuild.
pub fn from_migration(m: &Migration) -> Operation {
    let state = match m.state {
        MigrationState::Completed => OperationState::Succeeded,
        MigrationState::Failed => OperationState::Failed,
        _ => OperationState::Running,
    };
    let (done, total) = m
        .progress
        .as_ref()
        .map(|p| (p.done, p.planned))
        .unwrap_or((0, 0));
    Operation {
        id: m.id.to_string(),
        kind: OperationKind::Migration,
        target: format!("vm {} {} → {}", m.vm_name, m.from_host, m.to_host),
        tenant: Some(m.tenant),
        state,
        step: m.state.as_str().to_owned(),
        done,
        total,
        started_at: m.created_at,
        finished_at: m.finished_at,
        error: m.error.clone(),
    }
}

/// A drain session as an operation; progress is VMs moved. A drain succeeds when the
/// host is empty (`in_maintenance`); what happens to the host after (release) is not
/// part of it.
pub fn from_drain(m: &Maintenance) -> Operation {
    let state = match m.state {
        MaintenanceState::Entering | MaintenanceState::Draining => OperationState::Running,
        MaintenanceState::InMaintenance
        | MaintenanceState::Releasing
        | MaintenanceState::Released => OperationState::Succeeded,
        MaintenanceState::Aborted => OperationState::Cancelled,
        MaintenanceState::Failed => OperationState::Failed,
    };
    let done = m
        .items
        .iter()
        .filter(|i| i.state == model::DrainItemState::Moved)
        .count();
    let step = match m
        .items
        .iter()
        .find(|i| i.state == model::DrainItemState::Migrating)
    {
        Some(i) if state == OperationState::Running => {
            format!("{}: moving vm {} to {}", m.state.as_str(), i.vm_name, i.to)
        }
        _ => m.state.as_str().to_owned(),
    };
    Operation {
        id: m.id.to_string(),
        kind: OperationKind::Drain,
        target: format!("host {}", m.host),
        tenant: None,
        state,
        step,
        done: done as u64,
        total: m.items.len() as u64,
        started_at: m.created_at,
        finished_at: (state != OperationState::Running).then_some(m.updated_at),
        error: m.error.clone(),
    }
}

/// An NS instance's current or last work as an operation. The record keeps one state,
/// so a finished NS shows as its instantiation (succeeded or failed); progress is VNFs
/// ready.
pub fn from_ns(r: &NsInstanceRecord) -> Operation {
    let (kind, state) = match r.state {
        NsState::Instantiating => (OperationKind::NsInstantiate, OperationState::Running),
        NsState::Scaling => (OperationKind::NsScale, OperationState::Running),
        NsState::Terminating => (OperationKind::NsTerminate, OperationState::Running),
        NsState::Instantiated => (OperationKind::NsInstantiate, OperationState::Succeeded),
        NsState::Failed => (OperationKind::NsInstantiate, OperationState::Failed),
    };
    let done = r.vnfs.iter().filter(|v| v.state == "ready").count();
    let step = match r.state {
        NsState::Instantiating => "instantiating",
        NsState::Scaling => "scaling",
        NsState::Terminating => "terminating",
        NsState::Instantiated => "instantiated",
        NsState::Failed => "failed",
    };
    Operation {
        id: r.id.clone(),
        kind,
        target: format!("ns {}", r.name),
        tenant: Some(r.tenant),
        state,
        step: step.to_owned(),
        done: done as u64,
        total: r.vnfs.len() as u64,
        started_at: r.created_at,
        finished_at: r
            .elapsed_ms
            .filter(|_| state != OperationState::Running)
            .map(|ms| r.created_at.saturating_add(ms)),
        error: r.error.clone(),
    }
}

impl Control {
    /// Every operation `scope` sees, newest first. Drains are an operator's: only
    /// [`Scope::All`] sees them.
    pub async fn operations(&self, scope: Scope) -> Result<Vec<Operation>, ControlError> {
        let mut out: Vec<Operation> = Vec::new();
        out.extend(self.migrations(scope).await?.iter().map(from_migration));
        if scope == Scope::All {
            out.extend(self.maintenance_sessions().await?.iter().map(from_drain));
        }
        out.extend(
            list_json::<NsInstanceRecord>(self.store(), keys::NS_INSTANCES)
                .await?
                .iter()
                .filter(|(r, _)| scope.sees(r.tenant))
                .map(|(r, _)| from_ns(r)),
        );
        out.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// One operation by id, as `scope` sees it.
    pub async fn operation(&self, scope: Scope, id: &str) -> Result<Operation, ControlError> {
        self.operations(scope)
            .await?
            .into_iter()
            .find(|o| o.id == id)
            .ok_or_else(|| ControlError::NotFound {
                kind: "operation",
                id: id.to_owned(),
            })
    }

    /// Cancels a running operation: a drain stops (the VM in flight finishes its move,
    /// the host is uncordoned). A migration is past the point of no return once its
    /// destination is ready, and an NS job rolls back by itself on failure: those
    /// finish on their own.
    pub async fn cancel_operation(&self, scope: Scope, id: &str) -> Result<Operation, CancelError> {
        let op = self.operation(scope, id).await?;
        if op.state != OperationState::Running {
            return Err(CancelError::Finished {
                id: op.id,
                state: op.state,
            });
        }
        match op.kind {
            OperationKind::Drain => Ok(from_drain(&self.abort_maintenance(id).await?)),
            OperationKind::Migration => Err(CancelError::NotCancellable {
                id: op.id,
                kind: kind_str(op.kind),
                why: "a live migration finishes or fails on its own; migrate the VM back after it",
            }),
            OperationKind::NsInstantiate | OperationKind::NsScale | OperationKind::NsTerminate => {
                Err(CancelError::NotCancellable {
                    id: op.id,
                    kind: kind_str(op.kind),
                    why: "network-service work rolls back by itself if it fails; terminate the NS after it",
                })
            }
        }
    }
}
