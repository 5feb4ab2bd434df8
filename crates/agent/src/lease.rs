//! The host lease as this agent holds it, and fencing by it.
//!
//! Each heartbeat the server answers renews the lease for `lease_ms` (the server's
//! heartbeat timeout), counted from when this agent *sent* it: the server received it
//! later, so its own count starts later, and its standby takeover waits a margin beyond
//! that (`control::takeover`). When no heartbeat has been answered for a whole lease,
//! the lease expires here and the VM tasks pause their redundant guests ([`Authority`],
//! `phase::VmPhase::Fenced`): the standby may be started any moment, and two guests
//! writing one storage pair would corrupt it. They start or resume none until a
//! heartbeat is answered again *and* the task's own request, sent after that answer,
//! finds the VM still assigned here: the server recorded that heartbeat before it read
//! the assignment, so a takeover either shows in it or can no longer happen (its write
//! compares the host record the heartbeat changed). A message the reconciler (or a
//! pushed event) delivered is not enough: it may have been read before the lease came
//! back.
//!
//! Tasks: `heartbeat_loop` (lib.rs) sends the heartbeats and publishes each answered
//! one as a [`Renewal`]; `watchdog` alone owns the [`Lease`] state and publishes it on
//! a `watch` channel that every VM task reads. The watchdog wakes at the deadline itself,
//! so an expiry is noticed on time even while a heartbeat request hangs.
//!
//! Times are this agent's monotonic clock; nothing here compares wall clocks.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::phase::Authority;

/// The shortest heartbeat period, whatever the lease (a zero lease must not spin).
const MIN_PERIOD: Duration = Duration::from_millis(100);

/// One heartbeat (or registration) the server answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Renewal {
    /// When the request was sent.
    pub sent_at: Instant,
    /// When its answer arrived.
    pub answered_at: Instant,
    /// The lease it granted.
    pub lease: Duration,
}

/// The host lease now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    /// Renewed in time. `since`: when the answer arrived that began this holding (the
    /// registration's, or the first heartbeat's answered after an expiry).
    Held {
        /// When this holding began.
        since: Instant,
    },
    /// Not renewed within the lease, since `at`.
    Expired {
        /// When the lease ran out.
        at: Instant,
    },
}

impl Lease {
    /// Whether the lease ran out (and no heartbeat has been answered since).
    pub fn is_expired(self) -> bool {
        matches!(self, Lease::Expired { .. })
    }
}

/// When the lease renewed by `r` runs out: a lease's length after the heartbeat was
/// *sent*, which is no later than the server's count from its receipt. `None`: never
/// (a lease too long to add to the clock).
pub fn fence_deadline(r: &Renewal) -> Option<Instant> {
    r.sent_at.checked_add(r.lease)
}

/// The lease at `now`, given the previous state and `r`, the latest renewal.
pub fn lease_at(prev: Lease, r: &Renewal, now: Instant) -> Lease {
    match fence_deadline(r) {
        Some(deadline) if now >= deadline => match prev {
            Lease::Expired { at } => Lease::Expired { at },
            Lease::Held { .. } => Lease::Expired { at: deadline },
        },
        _ => match prev {
            Lease::Held { since } => Lease::Held { since },
            // A renewal that runs out later than now ends the expiry: it was answered
            // after the lease had run out.
            Lease::Expired { .. } => Lease::Held {
                since: r.answered_at,
            },
        },
    }
}

/// What the lease allows for a VM that is `redundant` (`None`: not known yet, as for a
/// VM adopted before its first assignment: counted as redundant), when the task's own
/// request last found it assigned here at `confirmed_at` (its send time).
pub fn authority(
    redundant: Option<bool>,
    lease: Lease,
    confirmed_at: Option<Instant>,
) -> Authority {
    if redundant == Some(false) {
        // No other host ever starts it: the lease does not concern it.
        return Authority::Held;
    }
    match lease {
        Lease::Expired { .. } => Authority::Lost,
        Lease::Held { since } if confirmed_at.is_some_and(|c| c >= since) => Authority::Held,
        Lease::Held { .. } => Authority::Stale,
    }
}

/// The heartbeat period for a configured period `every` and a lease: at least three
/// heartbeats per lease, so that one lost or slow heartbeat does not let it expire.
pub fn heartbeat_period(every: Duration, lease: Duration) -> Duration {
    every.min(lease / 3).max(MIN_PERIOD)
}

/// How long one heartbeat may take before it is given up and sent again: half the
/// lease (an answer later than that leaves less than half the lease, and a request
/// hanging on a dead connection must not hold up the next one).
pub fn attempt_timeout(lease: Duration) -> Duration {
    (lease / 2).max(MIN_PERIOD)
}

/// After a failed heartbeat, the next one goes out this soon: the lease is at risk,
/// and a short cut should end before it expires or before the takeover.
pub fn retry_after(period: Duration) -> Duration {
    (period / 4).max(MIN_PERIOD)
}

/// Owns the lease state: re-evaluates it on every renewal and at the deadline of the
/// latest one, and publishes changes on `lease`. Ends when the heartbeat task does.
pub(crate) async fn watchdog(mut renewals: watch::Receiver<Renewal>, lease: watch::Sender<Lease>) {
    loop {
        let r = *renewals.borrow_and_update();
        let prev = *lease.borrow();
        let now = lease_at(prev, &r, Instant::now());
        if now != prev {
            match now {
                Lease::Expired { .. } => tracing::warn!(
                    lease_ms = r.lease.as_millis(),
                    since_sent_ms = r.sent_at.elapsed().as_millis(),
                    "host lease expired: redundant vms are paused until the control plane answers"
                ),
                Lease::Held { .. } => tracing::info!("host lease renewed again"),
            }
            lease.send_replace(now);
        }
        let deadline = match now {
            Lease::Held { .. } => fence_deadline(&r),
            Lease::Expired { .. } => None,
        };
        let expiry = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = renewals.changed() => if changed.is_err() { return },
            () = expiry => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn renewal(sent_at: Instant, rtt: Duration, lease: Duration) -> Renewal {
        Renewal {
            sent_at,
            answered_at: sent_at + rtt,
            lease,
        }
    }

    #[test]
    fn the_deadline_counts_from_the_send_time() {
        let t = Instant::now();
        // A slow answer does not extend the lease: the server's count began on receipt,
        // which was before the answer came back.
        let r = renewal(t, 2 * S, 6 * S);
        assert_eq!(fence_deadline(&r), Some(t + 6 * S));
        assert_eq!(fence_deadline(&renewal(t, S, Duration::MAX)), None);
    }

    #[test]
    fn the_lease_expires_at_the_deadline_and_returns_with_a_later_renewal() {
        let t = Instant::now();
        let held = Lease::Held { since: t };
        let r = renewal(t, Duration::from_millis(10), 3 * S);
        assert_eq!(lease_at(held, &r, t + 2 * S), held);
        let expired = lease_at(held, &r, t + 3 * S);
        assert_eq!(expired, Lease::Expired { at: t + 3 * S });
        // Still expired later, from the same instant.
        assert_eq!(lease_at(expired, &r, t + 5 * S), expired);
        // An answer that came back after its own deadline renews nothing.
        let late = renewal(t + S, 3 * S, 3 * S);
        assert_eq!(lease_at(expired, &late, t + 4 * S), expired);
        // A fresh one does; the holding begins when its answer arrived.
        let back = renewal(t + 5 * S, Duration::from_millis(10), 3 * S);
        assert_eq!(
            lease_at(expired, &back, t + 5 * S + Duration::from_millis(20)),
            Lease::Held {
                since: back.answered_at
            }
        );
        // While held, renewals keep the holding's start.
        assert_eq!(lease_at(held, &back, t + 6 * S), held);
    }

    #[test]
    fn only_redundant_vms_depend_on_the_lease() {
        let t = Instant::now();
        let held = Lease::Held { since: t };
        let expired = Lease::Expired { at: t };
        assert_eq!(authority(Some(false), expired, None), Authority::Held);
        assert_eq!(authority(Some(true), expired, Some(t + S)), Authority::Lost);
        // Unknown redundancy (an adopted vm before its first assignment) counts as
        // redundant.
        assert_eq!(authority(None, expired, None), Authority::Lost);
        assert_eq!(authority(Some(true), held, Some(t)), Authority::Held);
        // A confirmation asked for before the lease was (re)gained may predate a
        // takeover: not enough to start or resume the guest.
        assert_eq!(
            authority(Some(true), held, Some(t - Duration::from_millis(1))),
            Authority::Stale
        );
        assert_eq!(authority(None, held, None), Authority::Stale);
    }

    #[test]
    fn heartbeats_come_three_times_per_lease_and_sooner_after_a_failure() {
        let ms = Duration::from_millis;
        assert_eq!(heartbeat_period(2 * S, 6 * S), 2 * S);
        assert_eq!(heartbeat_period(2 * S, 3 * S), S);
        assert_eq!(heartbeat_period(ms(300), 3 * S), ms(300));
        assert_eq!(heartbeat_period(2 * S, Duration::ZERO), MIN_PERIOD);
        assert_eq!(attempt_timeout(6 * S), 3 * S);
        assert_eq!(retry_after(2 * S), ms(500));
        assert_eq!(retry_after(ms(300)), MIN_PERIOD);
    }
}
