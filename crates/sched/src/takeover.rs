//! Standby takeover: when the primary server of a redundant placement is down, the VM
//! restarts on the standby server from the replica storage. Pure decision; the
//! integrator carries it out through the standby's agent.

use serde::{Deserialize, Serialize};

use crate::model::{Placement, Replica, ServerResource};

/// Restart the VM on the standby.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Takeover {
    /// Where the VM ran (server down).
    pub failed: Replica,
    /// Where it restarts: the standby server, from the replica storage.
    pub new_primary: Replica,
    /// The standby is in maintenance: it takes the VM anyway, because a running VM on
    /// a host being drained beats a VM that is down; the drain will move it again.
    pub standby_in_maintenance: bool,
}

/// What to do about a redundant VM given the servers' current state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum TakeoverDecision {
    /// The primary server is live: nothing to do.
    PrimaryHealthy,
    /// The primary server is down and the standby is live: restart there.
    RestartOnStandby(Takeover),
    /// Both servers are down (or unknown): the VM stays down until one returns.
    Stranded,
}

impl TakeoverDecision {
    /// The takeover to perform, if any.
    pub fn restart(&self) -> Option<&Takeover> {
        match self {
            TakeoverDecision::RestartOnStandby(t) => Some(t),
            _ => None,
        }
    }
}

/// Decides whether `placement` must fail over, from the servers' current state.
/// A server absent from `servers` counts as down. A primary in maintenance but live
/// is healthy: moving it is the drain's job, by live migration, not a restart.
///
/// ```
/// use sched::{Placement, Replica, ServerResource, takeover, TakeoverDecision};
/// let p = Placement {
///     primary: Replica { server: "h1".into(), storage: "a".into() },
///     standby: Replica { server: "h2".into(), storage: "b".into() },
/// };
/// let h2 = ServerResource { name: "h2".into(), cpus: 4, free_cpus: 4, memory_mib: 1024,
///     free_memory_mib: 1024, live: true, in_maintenance: false, failure_domain: None };
/// let d = takeover(&p, &[h2]); // h1 unknown: down
/// assert_eq!(d.restart().unwrap().new_primary, p.standby);
/// ```
pub fn takeover(placement: &Placement, servers: &[ServerResource]) -> TakeoverDecision {
    let find = |r: &Replica| servers.iter().find(|s| s.name == r.server);
    if find(&placement.primary).is_some_and(|s| s.live) {
        return TakeoverDecision::PrimaryHealthy;
    }
    match find(&placement.standby) {
        Some(s) if s.live => TakeoverDecision::RestartOnStandby(Takeover {
            failed: placement.primary.clone(),
            new_primary: placement.standby.clone(),
            standby_in_maintenance: s.in_maintenance,
        }),
        _ => TakeoverDecision::Stranded,
    }
}
