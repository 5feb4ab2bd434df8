//! Standby takeover: when a redundant VM's primary host lost its lease and its standby
//! is up, the VM is re-assigned to the standby with the replica storage; the standby's
//! agent starts it. The failed host becomes the new standby (it takes over again if the
//! new primary fails after it came back).
//!
//! Fencing (no split brain): a primary cut off from the control plane may still run
//! its guest, and two writers on one storage pair would corrupt the disk. The host
//! lease is the heartbeat: a heartbeat renews it for the heartbeat timeout, counted by
//! the agent from when it *sent* the heartbeat. An agent that has not renewed within
//! that time pauses its redundant VMs itself (`agent::lease`). This watcher takes a VM
//! over only when the primary's heartbeat has not changed for the heartbeat timeout
//! plus a margin, timed on this server's own monotonic clock ([`LeaseWatch`]):
//!
//! ```text
//! agent sends its last heartbeat at S ─ server records it at R ≥ S ─ this watcher sees it at W ≥ R
//! agent pauses its redundant guests at S + lease (+ the pause's latency)
//! server takes over at W + lease + margin ≥ S + lease + margin
//! ```
//!
//! Both ends measure *elapsed* time on their own clock from events ordered in real
//! time, so wall clocks never need to agree; the margin covers the agent's pause latency
//! (its watchdog wake-up, a QMP `stop`) and the two clocks' rate difference (ppm). A
//! newly elected watcher has seen no heartbeat yet: it times every host from its first
//! pass, so it waits a whole lease plus margin before its first takeover.
//!
//! The takeover's write compares the primary's host record too: a heartbeat recorded
//! after this pass read the host makes the write fail, so a primary that came back in
//! time keeps its VM, and the agent resumes a fenced VM only when a request it sent after
//! a heartbeat succeeded again finds the VM still assigned there (the server recorded
//! that heartbeat first, so any takeover is already visible in the answer).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use model::{DesiredState, Host, HostState, Name, ObservedState, Vm};
use store::{Compare, Revision, StoreError, TxnOp};

use crate::records::{keys, list_json, now_ms, to_bytes};
use crate::{Control, ControlError};

/// The margin beyond the lease when none is configured: half the heartbeat timeout, at
/// least 2 s. The agent's pause is due at the lease's end and takes a watchdog wake-up
/// plus a QMP `stop` (milliseconds, but a loaded host may take a second); clock rates
/// differ by parts per million. Half the timeout scales with how slow the operator
/// expects the hosts to be; the 2 s floor keeps short test timeouts safe on a loaded
/// machine.
pub fn default_takeover_margin(heartbeat_timeout: Duration) -> Duration {
    (heartbeat_timeout / 2).max(Duration::from_secs(2))
}

/// Whether a primary whose heartbeat this server has seen unchanged for `unchanged_for`
/// has certainly paused its redundant guests: its lease expired `margin` ago.
pub fn lease_expired(unchanged_for: Duration, lease: Duration, margin: Duration) -> bool {
    unchanged_for > lease.saturating_add(margin)
}

/// When this server last saw each host's heartbeat change, on its own monotonic clock.
/// The stored `last_heartbeat` is another server's wall clock (or this one's before a
/// step): it is only compared for *change*, never subtracted from this clock.
#[derive(Debug, Default)]
pub struct LeaseWatch {
    seen: BTreeMap<Name, Seen>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    /// The host's `last_heartbeat` (`None`: no host record).
    value: Option<u64>,
    /// When this watch first saw that value.
    at: Instant,
}

impl LeaseWatch {
    /// Records that `host`'s heartbeat reads `value` at `now`; returns for how long this
    /// watch has seen that value. A host seen for the first time counts from `now`.
    pub fn observe(&mut self, host: &Name, value: Option<u64>, now: Instant) -> Duration {
        let seen = self
            .seen
            .entry(host.clone())
            .or_insert(Seen { value, at: now });
        if seen.value != value {
            *seen = Seen { value, at: now };
        }
        now.saturating_duration_since(seen.at)
    }
}

impl Control {
    /// One pass over the redundant VMs: each whose primary's lease expired beyond
    /// `margin` (by `watch`, see the module doc) and whose standby is up moves to the
    /// standby. One attempt per VM: if it, or its primary's host record, changed
    /// meanwhile, the next pass decides again. Returns how many moved.
    pub async fn takeover_pass(
        &self,
        watch: &mut LeaseWatch,
        margin: Duration,
    ) -> Result<usize, ControlError> {
        let lease = Duration::from_millis(self.heartbeat_timeout_ms());
        let hosts: BTreeMap<Name, (Host, Revision)> = list_json::<Host>(self.store(), keys::HOSTS)
            .await?
            .into_iter()
            .map(|(mut h, rev)| {
                h.refresh_state(now_ms(), self.heartbeat_timeout_ms());
                (h.name.clone(), (h, rev))
            })
            .collect();
        let now = Instant::now();
        let mut unchanged = BTreeMap::new();
        for (name, (h, _)) in &hosts {
            unchanged.insert(
                name.clone(),
                watch.observe(name, Some(h.last_heartbeat), now),
            );
        }
        let up = |n: &Name| hosts.get(n).is_some_and(|(h, _)| h.state == HostState::Up);
        let mut moved_count = 0;
        for (vm, rev) in list_json::<Vm>(self.store(), keys::VMS).await? {
            let Some(r) = vm.redundancy.clone() else {
                continue;
            };
            // A migrating VM is never taken over: its migration's own protocol decides
            // where it runs (and its agent does not fence it, see `agent::phase`).
            if vm.desired != DesiredState::Running || vm.migration.is_some() || up(&vm.host) {
                continue;
            }
            let unchanged_for = match unchanged.get(&vm.host) {
                Some(d) => *d,
                // No host record (never registered here, or removed): its agent gets no
                // lease either; time it from when this watch first missed it.
                None => watch.observe(&vm.host, None, now),
            };
            if !lease_expired(unchanged_for, lease, margin) {
                tracing::debug!(vm = %vm.name, primary = %vm.host,
                    unchanged_ms = unchanged_for.as_millis(), "primary down; waiting for its lease to expire");
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
            // The primary's record as this pass read it: a heartbeat since then
            // changed it, and this write must then fail (the primary is back).
            let primary_key = keys::host(&vm.host);
            let compares = vec![
                Compare::ModRevision {
                    key: keys::vm(vm.id),
                    expect: Some(rev),
                },
                Compare::ModRevision {
                    expect: hosts.get(&vm.host).map(|(_, rev)| *rev),
                    key: primary_key,
                },
            ];
            let ops = vec![TxnOp::Put {
                key: keys::vm(vm.id),
                value: to_bytes(&moved)?,
            }];
            match self.store().txn(compares, ops).await {
                Ok(_) => {
                    moved_count += 1;
                    tracing::warn!(vm = %vm.name, from = %vm.host, to = %r.standby_host,
                        unchanged_ms = unchanged_for.as_millis(), lease_ms = lease.as_millis(),
                        margin_ms = margin.as_millis(), "standby takeover");
                }
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(moved_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        model::validate_name("host", s).unwrap()
    }

    #[test]
    fn the_default_margin_is_half_the_timeout_at_least_two_seconds() {
        let s = Duration::from_secs;
        assert_eq!(default_takeover_margin(s(6)), s(3));
        assert_eq!(default_takeover_margin(s(3)), s(2));
        assert_eq!(default_takeover_margin(Duration::from_millis(300)), s(2));
        assert_eq!(default_takeover_margin(s(60)), s(30));
    }

    #[test]
    fn a_takeover_waits_for_the_lease_and_the_margin() {
        let (lease, margin) = (Duration::from_secs(6), Duration::from_secs(3));
        assert!(!lease_expired(Duration::from_secs(6), lease, margin));
        assert!(!lease_expired(Duration::from_secs(9), lease, margin));
        assert!(lease_expired(Duration::from_millis(9_001), lease, margin));
        assert!(!lease_expired(Duration::MAX, Duration::MAX, margin));
    }

    #[test]
    fn the_watch_times_a_heartbeat_from_its_last_change_on_its_own_clock() {
        let mut w = LeaseWatch::default();
        let h = name("h1");
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // First sight: however old the stored value is by the wall clock, it counts
        // from now (a new leader waits a whole lease and margin).
        assert_eq!(w.observe(&h, Some(5), t0), Duration::ZERO);
        assert_eq!(w.observe(&h, Some(5), t0 + s(4)), s(4));
        // A renewal restarts the count.
        assert_eq!(w.observe(&h, Some(6), t0 + s(5)), Duration::ZERO);
        assert_eq!(w.observe(&h, Some(6), t0 + s(7)), s(2));
        // A record that disappears is a change too.
        assert_eq!(w.observe(&h, None, t0 + s(8)), Duration::ZERO);
        assert_eq!(w.observe(&h, None, t0 + s(9)), s(1));
        // Hosts are timed apart.
        assert_eq!(w.observe(&name("h2"), Some(6), t0 + s(9)), Duration::ZERO);
    }
}
