//! The agent's pure planner: desired state from the server + what runs here →
//! the actions that close the gap. No I/O, so every case is a unit test.

use std::collections::{BTreeMap, BTreeSet};

/// What the server wants for one VM assigned to this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Running.
    Running,
    /// Stopped, files kept.
    Stopped,
    /// Gone: stop it, remove its files, confirm.
    Deleted,
}

/// What this host has for one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Have {
    /// QEMU is running.
    Running,
    /// Files exist, no QEMU (never started, stopped, or crashed).
    Stopped,
    /// The last start failed with this reason; not retried until the desired state changes.
    Failed(String),
}

/// One step for the executor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action<Id> {
    /// Prepare the disk if needed and boot the VM.
    Start(Id),
    /// Stop QEMU, keep the disk.
    Stop(Id),
    /// Stop QEMU if running, remove every file of the VM, then confirm deletion.
    Destroy(Id),
    /// A VM runs here that the server no longer assigns to us (deleted while we were
    /// down, or moved): stop it and remove its files, without confirming anything.
    DropOrphan(Id),
}

/// Plans the actions for one reconcile pass. Failed VMs are not restarted in a
/// tight loop: a failure sticks until the server's desired state changes or
/// `RETRY_FAILED_AFTER` passes (the executor clears `Failed` then).
pub fn plan<Id: Ord + Clone>(
    wanted: &BTreeMap<Id, Want>,
    have: &BTreeMap<Id, Have>,
) -> Vec<Action<Id>> {
    let mut actions = Vec::new();
    for (id, want) in wanted {
        let h = have.get(id);
        match (want, h) {
            (Want::Running, None | Some(Have::Stopped)) => actions.push(Action::Start(id.clone())),
            (Want::Running, Some(Have::Running | Have::Failed(_))) => {}
            (Want::Stopped, Some(Have::Running)) => actions.push(Action::Stop(id.clone())),
            (Want::Stopped, _) => {}
            (Want::Deleted, _) => actions.push(Action::Destroy(id.clone())),
        }
    }
    let wanted_ids: BTreeSet<&Id> = wanted.keys().collect();
    for id in have.keys() {
        if !wanted_ids.contains(id) {
            actions.push(Action::DropOrphan(id.clone()));
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m<V: Clone>(items: &[(u32, V)]) -> BTreeMap<u32, V> {
        items.iter().cloned().collect()
    }

    #[test]
    fn starts_missing_and_stopped_vms_that_should_run() {
        let a = plan(
            &m(&[(1, Want::Running), (2, Want::Running)]),
            &m(&[(2, Have::Stopped)]),
        );
        assert_eq!(a, vec![Action::Start(1), Action::Start(2)]);
    }

    #[test]
    fn leaves_running_and_failed_vms_alone() {
        let a = plan(
            &m(&[(1, Want::Running), (2, Want::Running)]),
            &m(&[(1, Have::Running), (2, Have::Failed("boom".into()))]),
        );
        assert!(a.is_empty(), "{a:?}");
    }

    #[test]
    fn stops_and_destroys() {
        let a = plan(
            &m(&[(1, Want::Stopped), (2, Want::Deleted), (3, Want::Deleted)]),
            &m(&[(1, Have::Running), (2, Have::Running)]),
        );
        assert_eq!(
            a,
            vec![Action::Stop(1), Action::Destroy(2), Action::Destroy(3)]
        );
    }

    #[test]
    fn drops_vms_the_server_no_longer_assigns() {
        let a = plan(&m(&[]), &m(&[(7, Have::Running)]));
        assert_eq!(a, vec![Action::DropOrphan(7)]);
    }
}
