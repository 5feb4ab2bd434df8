//! Standby takeover: when a redundant VM's primary host is down and its standby is up,
//! the VM is re-assigned to the standby with the replica storage; the standby's agent
//! starts it. The failed host becomes the new standby (it takes over again if the new
//! primary fails after it came back).
//!
//! Fencing: the old primary's agent, if it comes back, no longer finds the VM assigned
//! and stops its QEMU. A host that is cut off but still running keeps its QEMU until
//! then — lease fencing of a cut-off primary is not built yet.

use model::{DesiredState, HostState, ObservedState, Vm};
use store::StoreError;

use crate::records::{keys, list_json, to_bytes};
use crate::{Control, ControlError};

impl Control {
    /// One pass over the redundant VMs: each whose primary is down and standby up moves
    /// to the standby. One attempt per VM: if it changed meanwhile, the next pass decides
    /// again. Returns how many moved.
    pub async fn takeover_pass(&self) -> Result<usize, ControlError> {
        let hosts = self.hosts().await?;
        let up = |n: &model::Name| {
            hosts
                .iter()
                .any(|h| &h.name == n && h.state == HostState::Up)
        };
        let mut moved_count = 0;
        for (vm, rev) in list_json::<Vm>(self.store(), keys::VMS).await? {
            let Some(r) = vm.redundancy.clone() else {
                continue;
            };
            if vm.desired != DesiredState::Running || vm.migration.is_some() || up(&vm.host) {
                continue;
            }
            if !up(&r.standby_host) {
                tracing::warn!(vm = %vm.name, primary = %vm.host, standby = %r.standby_host, "redundant vm stranded: both hosts down");
                continue;
            }
            let mut moved = vm.clone();
            moved.host = r.standby_host.clone();
            moved.observed = ObservedState::Pending;
            moved.error = Some(format!(
                "restarted on standby {} (storage {}) after primary {} went down",
                r.standby_host, r.standby_storage, vm.host
            ));
            moved.redundancy = Some(model::Redundancy {
                disk_gib: r.disk_gib,
                primary_storage: r.standby_storage.clone(),
                standby_host: vm.host.clone(),
                standby_storage: r.primary_storage.clone(),
                takeovers: r.takeovers.saturating_add(1),
            });
            match self
                .store()
                .cas(&keys::vm(vm.id), Some(rev), to_bytes(&moved)?)
                .await
            {
                Ok(_) => {
                    moved_count += 1;
                    tracing::warn!(vm = %vm.name, from = %vm.host, to = %r.standby_host, "standby takeover");
                }
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(moved_count)
    }
}
