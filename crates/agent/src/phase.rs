//! A VM's life on this host as an explicit phase, and the pure transition function
//! that picks the next step from the phase, what the server wants, and what the host
//! lease allows ([`Authority`], see [`crate::lease`]). No I/O: the VM task
//! (`vm.rs`) is the shell that performs each step and sets the phase it reached,
//! so every decision here is a unit test.

use std::time::{Duration, Instant};

use cache::{CacheStats, Rebuild, RebuildPlan};
use model::{DesiredState, Migration, MigrationId, MigrationState, QemuMigrationStats};

/// A failed start is retried after this long (a transient cause, e.g. a busy port or
/// a full disk that was cleaned, should not need the user to stop and start the VM).
pub const RETRY_FAILED_AFTER: Duration = Duration::from_secs(30);

/// Where one VM is on this host.
#[derive(Debug)]
pub enum VmPhase {
    /// No hypervisor: never started, stopped, or it exited on its own (`note` says how).
    Stopped {
        /// Why the hypervisor exited, when it did on its own.
        note: Option<String>,
    },
    /// The start is under way (reported; the task is busy with it).
    Starting,
    /// The hypervisor runs the guest here.
    Running,
    /// The last start failed; not retried until the desired state changes or
    /// [`RETRY_FAILED_AFTER`] passes.
    Failed {
        /// The desired state the start was for.
        desired: DesiredState,
        /// Why it failed, the whole error chain.
        reason: String,
        /// When.
        since: Instant,
    },
    /// This host is the source of a live migration: the guest runs here until QEMU
    /// moved it, then this host serves its cache to the destination.
    MigratingOut(MigLocal),
    /// This host is the destination: QEMU waits for the stream, then runs the guest
    /// while the cache is rebuilt from the source's.
    MigratingIn(MigLocal),
    /// The guest is paused here because the host lease expired (a redundant VM whose
    /// standby may be running it now); resumed only if a fresh assignment says it is
    /// still ours, stopped otherwise. The hypervisor stays up: a short cut costs a pause,
    /// not a reboot.
    Fenced {
        /// When it was paused.
        since: Instant,
    },
}

impl VmPhase {
    /// Whether the guest executes on this host.
    pub fn guest_here(&self) -> bool {
        match self {
            // A fenced guest does not execute, but its hypervisor is here to be stopped.
            VmPhase::Running | VmPhase::Fenced { .. } => true,
            VmPhase::MigratingOut(x) => !x.migrated_away,
            VmPhase::MigratingIn(x) => x.switched,
            VmPhase::Stopped { .. } | VmPhase::Starting | VmPhase::Failed { .. } => false,
        }
    }

    /// This host's part in a migration, if one is under way.
    pub fn mig(&self) -> Option<&MigLocal> {
        match self {
            VmPhase::MigratingOut(x) | VmPhase::MigratingIn(x) => Some(x),
            _ => None,
        }
    }

    /// [`VmPhase::mig`], to change it.
    pub fn mig_mut(&mut self) -> Option<&mut MigLocal> {
        match self {
            VmPhase::MigratingOut(x) | VmPhase::MigratingIn(x) => Some(x),
            _ => None,
        }
    }
}

/// This host's part in one migration.
#[derive(Debug)]
pub struct MigLocal {
    /// The migration.
    pub id: MigrationId,
    /// Source: the snapshot was uploaded.
    pub snapshot_sent: bool,
    /// Source: QEMU moved the VM away (never restart it here).
    pub migrated_away: bool,
    /// Source: QEMU's figures, kept to re-send if the `warming` report failed.
    pub qemu: Option<QemuMigrationStats>,
    /// Destination: where QEMU waits (kept to re-send `ready`).
    pub incoming_uri: Option<String>,
    /// Destination: the switch-over happened; the guest runs here.
    pub switched: bool,
    /// Destination: the fetch plan, until the rebuild starts.
    pub plan: Option<RebuildPlan>,
    /// Destination: the running rebuild.
    pub rebuild: Option<Rebuild>,
    /// Destination: cache counters at switch-over, to report hits since then.
    pub base: Option<CacheStats>,
    /// Source, `full-copy`: when the guest was paused for the copy (None: not paused).
    pub paused_at: Option<Instant>,
    /// Destination, `full-copy`: the guest (which arrives paused) was resumed.
    pub resumed: bool,
    /// Source, pre-copy: the dirty list taken at switch-over, kept to re-send if the
    /// `warming` report failed (taking it ends the tracking).
    pub dirty: Option<Vec<[u64; 2]>>,
    /// Destination, pre-copy: blocks dropped when the source's dirty list was applied
    /// (`None` until then).
    pub precopy_dropped: Option<u64>,
}

impl MigLocal {
    /// A migration this host has done nothing for yet.
    pub fn new(id: MigrationId) -> Self {
        Self {
            id,
            snapshot_sent: false,
            migrated_away: false,
            qemu: None,
            incoming_uri: None,
            switched: false,
            plan: None,
            rebuild: None,
            base: None,
            paused_at: None,
            resumed: false,
            dirty: None,
            precopy_dropped: None,
        }
    }
}

/// Which end of a migration this host is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Moving away from here.
    Source,
    /// Moving here.
    Destination,
}

/// This host's side of `m`, if any.
pub fn side(m: &Migration, me: &str) -> Option<Side> {
    if m.from_host.as_str() == me {
        Some(Side::Source)
    } else if m.to_host.as_str() == me {
        Some(Side::Destination)
    } else {
        None
    }
}

/// What the host lease allows for one VM (computed by [`crate::lease::authority`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authority {
    /// Act on the assignment: the VM is not redundant, or the lease is held and the task
    /// itself found the VM assigned here by a request sent after the lease was last
    /// (re)gained.
    Held,
    /// The lease is held, but the assignment at hand may predate a takeover (a message
    /// may have been read before the lease came back): keep what runs; before starting or
    /// resuming the guest, ask the server ([`Step::Confirm`]).
    Stale,
    /// The lease expired (a redundant VM): its standby may be started any moment, so its
    /// guest must not run here.
    Lost,
}

/// Where a migration state comes in a migration's life: each report moves a
/// migration forward, never back (a failure can come at any point, so it is last).
fn stage(s: MigrationState) -> u8 {
    match s {
        MigrationState::Pending => 0,
        MigrationState::Ready => 1,
        MigrationState::Migrating => 2,
        MigrationState::Warming => 3,
        MigrationState::Completed => 4,
        MigrationState::Failed => 5,
    }
}

/// Whether a view of migration `id` in state `seen` is older than this host's own last
/// report on it (`reported`): the view was read before the report landed (a poll sent
/// earlier, an event delayed), and acting on it would repeat a step the server already
/// took ("ready to ready"). Ordering by state, not by time, holds for polls and pushed
/// events alike.
pub fn is_behind(
    id: MigrationId,
    seen: MigrationState,
    reported: Option<(MigrationId, MigrationState)>,
) -> bool {
    reported.is_some_and(|(rid, r)| rid == id && stage(seen) < stage(r))
}

/// What the server wants of this host for one VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Desired {
    /// Assigned here with this desired state, no migration under way.
    Plain(DesiredState),
    /// A live migration of the VM involves this host on `side`.
    Migration {
        /// The migration.
        id: MigrationId,
        /// Which end this host is.
        side: Side,
    },
    /// No longer assigned here (deleted while the agent was down, or moved away).
    Unassigned,
    /// Not known yet: a VM adopted from an earlier agent process, before the first
    /// assignment pass.
    Unknown,
    /// The agent is shutting down.
    Shutdown,
}

/// One step for the VM task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do until the next message.
    Idle,
    /// Prepare the disk if needed and boot the VM.
    Start,
    /// Stop the hypervisor, keep the disk.
    Stop,
    /// Stop the hypervisor if running, remove every file and the disk, confirm the
    /// deletion; the task ends.
    Destroy,
    /// Stop and remove the VM's files without confirming anything (it is no longer
    /// ours); the task ends.
    Drop,
    /// Forget a start failure (the phase becomes `Stopped`, then decide again).
    Retry,
    /// Take a part in a migration (no I/O: the phase becomes `MigratingOut`/`In`).
    BeginMigration(Side, MigrationId),
    /// One step of this host's side of the migration under way.
    Migrate,
    /// The migration this host took part in is over (or replaced): cancel what is left
    /// of it here, resume a guest paused for it, then decide again.
    EndMigration,
    /// Stop the hypervisor for the agent's shutdown; the task ends.
    Shutdown,
    /// Pause the guest, keep the hypervisor (the phase becomes `Fenced`); stop it if
    /// the pause fails.
    Fence,
    /// Resume a fenced guest (the phase becomes `Running`).
    Resume,
    /// Ask the server now whether the VM is still assigned here, then decide again on
    /// that answer (with [`Authority::Held`] if it is).
    Confirm,
}

/// The next step for a VM in `phase` when the server wants `desired`, the lease allows
/// `authority`, at `now`.
///
/// Stopping is always allowed; without the lease ([`Authority::Lost`]) a guest that
/// runs here is paused, and with a doubtful assignment ([`Authority::Stale`]) nothing
/// is started or resumed before the server confirms it.
pub fn next(phase: &VmPhase, desired: Desired, authority: Authority, now: Instant) -> Step {
    use VmPhase as P;
    let lost = authority == Authority::Lost;
    let stale = authority == Authority::Stale;
    match (desired, phase) {
        (Desired::Shutdown, _) => Step::Shutdown,
        (Desired::Unassigned, _) => Step::Drop,
        (_, P::Starting) => Step::Idle,
        // A cut mid-migration: the server may end the migration without this host
        // (the other end reports it failed) and then take the VM over.
        (_, p @ (P::MigratingOut(_) | P::MigratingIn(_))) if lost && p.guest_here() => Step::Fence,
        (Desired::Migration { id, .. }, P::MigratingOut(x) | P::MigratingIn(x)) if x.id == id => {
            Step::Migrate
        }
        (_, P::MigratingOut(_) | P::MigratingIn(_)) => Step::EndMigration,
        (Desired::Plain(DesiredState::Deleted), _) => Step::Destroy,
        (Desired::Plain(DesiredState::Stopped), P::Running | P::Fenced { .. }) => Step::Stop,
        (_, P::Running) if lost => Step::Fence,
        (_, P::Fenced { .. }) => match authority {
            Authority::Held if desired != Desired::Unknown => Step::Resume,
            Authority::Stale => Step::Confirm,
            _ => Step::Idle,
        },
        (Desired::Unknown, _) => Step::Idle,
        // Nothing starts here without the lease.
        (_, P::Stopped { .. } | P::Failed { .. }) if lost => Step::Idle,
        // A destination's hypervisor would run the guest after switch-over.
        (Desired::Migration { .. }, P::Stopped { .. } | P::Failed { .. }) if stale => Step::Confirm,
        (Desired::Migration { id, side }, _) => Step::BeginMigration(side, id),
        (Desired::Plain(want), P::Failed { desired, since, .. }) => {
            if *desired != want || now.saturating_duration_since(*since) >= RETRY_FAILED_AFTER {
                Step::Retry
            } else {
                Step::Idle
            }
        }
        (Desired::Plain(DesiredState::Running), P::Stopped { .. }) if stale => Step::Confirm,
        (Desired::Plain(DesiredState::Running), P::Stopped { .. }) => Step::Start,
        (Desired::Plain(_), P::Running | P::Stopped { .. }) => Step::Idle,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stopped() -> VmPhase {
        VmPhase::Stopped { note: None }
    }

    fn failed(desired: DesiredState, ago: Duration, now: Instant) -> VmPhase {
        VmPhase::Failed {
            desired,
            reason: "boom".into(),
            since: now.checked_sub(ago).unwrap_or(now),
        }
    }

    fn mig() -> MigrationId {
        MigrationId::new_random()
    }

    const H: Authority = Authority::Held;
    const RUN: Desired = Desired::Plain(DesiredState::Running);
    const STOP: Desired = Desired::Plain(DesiredState::Stopped);
    const DEL: Desired = Desired::Plain(DesiredState::Deleted);

    #[test]
    fn plain_desired_states_start_stop_and_destroy() {
        let now = Instant::now();
        assert_eq!(next(&stopped(), RUN, H, now), Step::Start);
        assert_eq!(next(&VmPhase::Running, RUN, H, now), Step::Idle);
        assert_eq!(next(&VmPhase::Running, STOP, H, now), Step::Stop);
        assert_eq!(next(&stopped(), STOP, H, now), Step::Idle);
        assert_eq!(next(&VmPhase::Running, DEL, H, now), Step::Destroy);
        assert_eq!(next(&stopped(), DEL, H, now), Step::Destroy);
    }

    #[test]
    fn a_start_under_way_is_not_interrupted_except_by_leaving() {
        let now = Instant::now();
        for d in [RUN, STOP, DEL] {
            assert_eq!(next(&VmPhase::Starting, d, H, now), Step::Idle, "{d:?}");
        }
        assert_eq!(
            next(&VmPhase::Starting, Desired::Unassigned, H, now),
            Step::Drop
        );
        assert_eq!(
            next(&VmPhase::Starting, Desired::Shutdown, H, now),
            Step::Shutdown
        );
    }

    #[test]
    fn a_failure_sticks_until_the_desired_state_changes_or_time_passes() {
        let now = Instant::now();
        let recent = failed(DesiredState::Running, Duration::from_secs(1), now);
        assert_eq!(next(&recent, RUN, H, now), Step::Idle);
        assert_eq!(next(&recent, STOP, H, now), Step::Retry);
        assert_eq!(next(&recent, DEL, H, now), Step::Destroy);
        let old = failed(DesiredState::Running, RETRY_FAILED_AFTER, now);
        assert_eq!(next(&old, RUN, H, now), Step::Retry);
    }

    #[test]
    fn a_migration_is_joined_stepped_and_ended() {
        let now = Instant::now();
        let id = mig();
        let out = Desired::Migration {
            id,
            side: Side::Source,
        };
        assert_eq!(
            next(&VmPhase::Running, out, H, now),
            Step::BeginMigration(Side::Source, id)
        );
        let phase = VmPhase::MigratingOut(MigLocal::new(id));
        assert_eq!(next(&phase, out, H, now), Step::Migrate);
        // The migration ended (the assignment carries none) or another one began.
        assert_eq!(next(&phase, RUN, H, now), Step::EndMigration);
        let other = Desired::Migration {
            id: mig(),
            side: Side::Source,
        };
        assert_eq!(next(&phase, other, H, now), Step::EndMigration);
        // A destination that was dropped (the migration failed) leaves.
        let inbound = VmPhase::MigratingIn(MigLocal::new(id));
        assert_eq!(next(&inbound, Desired::Unassigned, H, now), Step::Drop);
        assert_eq!(
            next(
                &stopped(),
                Desired::Migration {
                    id,
                    side: Side::Destination
                },
                H,
                now
            ),
            Step::BeginMigration(Side::Destination, id)
        );
    }

    #[test]
    fn a_view_older_than_our_own_report_is_behind() {
        use MigrationState as S;
        let (id, other) = (mig(), mig());
        assert!(is_behind(id, S::Pending, Some((id, S::Ready))));
        assert!(is_behind(id, S::Warming, Some((id, S::Completed))));
        assert!(is_behind(id, S::Ready, Some((id, S::Warming))));
        // Progress reports repeat a state; the other side moves it on.
        assert!(!is_behind(id, S::Warming, Some((id, S::Warming))));
        assert!(!is_behind(id, S::Warming, Some((id, S::Ready))));
        assert!(!is_behind(id, S::Pending, None));
        assert!(!is_behind(id, S::Pending, Some((other, S::Completed))));
    }

    #[test]
    fn the_guest_is_here_until_moved_and_there_after_switch_over() {
        let mut x = MigLocal::new(mig());
        assert!(VmPhase::MigratingOut(MigLocal::new(x.id)).guest_here());
        x.migrated_away = true;
        assert!(!VmPhase::MigratingOut(x).guest_here());
        let mut y = MigLocal::new(mig());
        assert!(!VmPhase::MigratingIn(MigLocal::new(y.id)).guest_here());
        y.switched = true;
        assert!(VmPhase::MigratingIn(y).guest_here());
    }

    #[test]
    fn shutdown_and_unassignment_win_over_everything() {
        let now = Instant::now();
        for p in [
            stopped(),
            VmPhase::Running,
            failed(DesiredState::Running, Duration::ZERO, now),
            VmPhase::MigratingOut(MigLocal::new(mig())),
        ] {
            assert_eq!(next(&p, Desired::Shutdown, H, now), Step::Shutdown);
            assert_eq!(next(&p, Desired::Unassigned, H, now), Step::Drop);
        }
    }

    fn fenced(now: Instant) -> VmPhase {
        VmPhase::Fenced { since: now }
    }

    const STALE: Authority = Authority::Stale;
    const LOST: Authority = Authority::Lost;

    #[test]
    fn without_the_lease_a_running_guest_is_fenced_and_nothing_starts() {
        let now = Instant::now();
        assert_eq!(next(&VmPhase::Running, RUN, LOST, now), Step::Fence);
        // Adopted before the first assignment: fenced all the same.
        assert_eq!(
            next(&VmPhase::Running, Desired::Unknown, LOST, now),
            Step::Fence
        );
        assert_eq!(next(&fenced(now), RUN, LOST, now), Step::Idle);
        assert_eq!(next(&stopped(), RUN, LOST, now), Step::Idle);
        let gone = failed(DesiredState::Running, RETRY_FAILED_AFTER, now);
        assert_eq!(next(&gone, RUN, LOST, now), Step::Idle);
        let m = Desired::Migration {
            id: mig(),
            side: Side::Destination,
        };
        assert_eq!(next(&stopped(), m, LOST, now), Step::Idle);
        assert_eq!(next(&stopped(), m, STALE, now), Step::Confirm);
        // A start under way finishes; the guest it started is fenced next.
        assert_eq!(next(&VmPhase::Starting, RUN, LOST, now), Step::Idle);
    }

    #[test]
    fn without_the_lease_stopping_is_still_allowed() {
        let now = Instant::now();
        for p in [VmPhase::Running, fenced(now)] {
            assert_eq!(next(&p, STOP, LOST, now), Step::Stop);
            assert_eq!(next(&p, DEL, LOST, now), Step::Destroy);
            assert_eq!(next(&p, Desired::Unassigned, LOST, now), Step::Drop);
            assert_eq!(next(&p, Desired::Shutdown, LOST, now), Step::Shutdown);
        }
    }

    #[test]
    fn a_guest_running_in_a_migration_is_fenced_too() {
        let now = Instant::now();
        let id = mig();
        let out = Desired::Migration {
            id,
            side: Side::Source,
        };
        let src = VmPhase::MigratingOut(MigLocal::new(id));
        assert_eq!(next(&src, out, LOST, now), Step::Fence);
        // Moved away already, or a destination before switch-over: nothing runs here.
        let mut away = MigLocal::new(id);
        away.migrated_away = true;
        assert_eq!(
            next(&VmPhase::MigratingOut(away), out, LOST, now),
            Step::Migrate
        );
        let inbound = Desired::Migration {
            id,
            side: Side::Destination,
        };
        let dst = VmPhase::MigratingIn(MigLocal::new(id));
        assert_eq!(next(&dst, inbound, LOST, now), Step::Migrate);
    }

    #[test]
    fn a_fenced_guest_is_resumed_only_on_a_fresh_assignment_and_dropped_when_moved() {
        let now = Instant::now();
        // The lease is back, but this assignment may be older: ask the server first.
        assert_eq!(next(&fenced(now), RUN, STALE, now), Step::Confirm);
        assert_eq!(next(&fenced(now), RUN, LOST, now), Step::Idle);
        assert_eq!(next(&fenced(now), Desired::Unknown, H, now), Step::Idle);
        // Still assigned here: resume (then go on as the assignment says).
        assert_eq!(next(&fenced(now), RUN, H, now), Step::Resume);
        let m = Desired::Migration {
            id: mig(),
            side: Side::Source,
        };
        assert_eq!(next(&fenced(now), m, H, now), Step::Resume);
        // Taken over meanwhile (no longer assigned here): stopped, never resumed.
        assert_eq!(next(&fenced(now), Desired::Unassigned, H, now), Step::Drop);
        assert_eq!(next(&fenced(now), STOP, H, now), Step::Stop);
    }

    #[test]
    fn a_stale_assignment_keeps_what_runs_and_starts_nothing_unconfirmed() {
        let now = Instant::now();
        assert_eq!(next(&VmPhase::Running, RUN, STALE, now), Step::Idle);
        assert_eq!(next(&stopped(), RUN, STALE, now), Step::Confirm);
        assert_eq!(next(&VmPhase::Running, STOP, STALE, now), Step::Stop);
        // Forgetting a failure starts nothing; the start after it asks first.
        let old = failed(DesiredState::Running, RETRY_FAILED_AFTER, now);
        assert_eq!(next(&old, RUN, STALE, now), Step::Retry);
        assert!(
            fenced(now).guest_here(),
            "a fenced hypervisor is stopped on halt"
        );
    }
}
