//! The slice sampler's arithmetic: from cumulative counters (the vSwitch controller's
//! bytes per VM pair, the agents' CPU time per VM) read at two instants, one NSI's
//! load over the period between them.
//!
//! The counters are cumulative, so a sample is the difference between this reading
//! and the last one, which is kept (the [`Cursor`]) in the NSI's series record and
//! replaced in the same write as the sample is appended: a sampler that dies between
//! two periods neither loses nor counts twice what happened in between.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One NSI's cumulative counters at one instant.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    /// When they were read, unix ms.
    pub at_ms: u64,
    /// Bytes per VM pair (`src-mac>dst-mac`) with one of the NSI's VMs at either end,
    /// as the vSwitch controller has counted them since it started counting.
    #[serde(default)]
    pub pairs: BTreeMap<String, u64>,
    /// CPU time per VM (by id) since its hypervisor started, ms.
    #[serde(default)]
    pub cpu_ms: BTreeMap<String, u64>,
}

/// One period's load of one NSI.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// Traffic of its VMs, Mbit/s (every frame counted once, whichever end is its).
    pub mbps: f64,
    /// CPU its VMs used, in cores (CPU seconds per second); `None` when no VM's CPU
    /// reading moved since the last period (its agents have not reported since, or
    /// none of its VMs runs): nothing is known of this period's CPU, which is not zero.
    pub cores: Option<f64>,
}

/// How much a cumulative counter grew from `old` to `new`: a counter found smaller
/// than before was reset (a new switch epoch, a restarted hypervisor) and counts
/// again from zero.
fn grew(old: Option<u64>, new: u64) -> u64 {
    match old {
        Some(o) if new >= o => new - o,
        // A pair or VM seen for the first time counted from zero since its start.
        Some(_) | None => new,
    }
}

/// The load between `prev` and `now`, and the cursor to keep for the next period
/// (`now`, plus whatever `prev` had that `now` lacks, e.g. a VM whose agent has not
/// reported since the server restarted, so that its next reading is diffed against
/// its last known value, not counted whole). `None` on the first reading (no `prev`)
/// or when no time passed.
pub fn measure(prev: Option<&Cursor>, now: &Cursor) -> (Option<Measured>, Cursor) {
    let mut next = now.clone();
    let Some(prev) = prev else {
        return (None, next);
    };
    for (k, v) in &prev.pairs {
        next.pairs.entry(k.clone()).or_insert(*v);
    }
    for (k, v) in &prev.cpu_ms {
        next.cpu_ms.entry(k.clone()).or_insert(*v);
    }
    if now.at_ms <= prev.at_ms {
        return (None, prev.clone());
    }
    let elapsed_ms = (now.at_ms - prev.at_ms) as f64;
    let bytes: u64 = now
        .pairs
        .iter()
        .map(|(k, v)| grew(prev.pairs.get(k).copied(), *v))
        .fold(0, u64::saturating_add);
    // CPU only of VMs read both times: a VM's first reading includes its boot, which
    // did not happen in this period.
    // A running guest's CPU time always grows: readings that all stand still are the
    // last ones reported again (seen under load, when agents report late), and counting
    // them would make the period look idle.
    let (moved, cpu) = now
        .cpu_ms
        .iter()
        .filter_map(|(k, v)| prev.cpu_ms.get(k).map(|o| (*o, *v)))
        .fold((false, 0u64), |(moved, cpu), (o, n)| {
            (moved || o != n, cpu.saturating_add(grew(Some(o), n)))
        });
    (
        Some(Measured {
            // bytes * 8 bits / (ms * 1000) = Mbit/s
            mbps: bytes as f64 * 8.0 / (elapsed_ms * 1000.0),
            cores: moved.then(|| cpu as f64 / elapsed_ms),
        }),
        next,
    )
}

/// The key of a VM pair in a [`Cursor`].
pub fn pair_key(src_mac: &str, dst_mac: &str) -> String {
    format!("{src_mac}>{dst_mac}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cur(at_ms: u64, pairs: &[(&str, u64)], cpu: &[(&str, u64)]) -> Cursor {
        Cursor {
            at_ms,
            pairs: pairs.iter().map(|(k, v)| ((*k).into(), *v)).collect(),
            cpu_ms: cpu.iter().map(|(k, v)| ((*k).into(), *v)).collect(),
        }
    }

    #[test]
    fn the_first_reading_is_a_baseline_then_differences_are_rates() {
        let a = cur(1_000, &[("x>y", 1_000)], &[("vm1", 500)]);
        let (m, next) = measure(None, &a);
        assert_eq!((m, &next), (None, &a));
        // 1,000,000 bytes in 2 s = 4 Mbit/s; 1,000 ms of CPU in 2 s = 0.5 cores.
        let b = cur(3_000, &[("x>y", 1_001_000)], &[("vm1", 1_500)]);
        let (m, next) = measure(Some(&a), &b);
        assert_eq!(
            m,
            Some(Measured {
                mbps: 4.0,
                cores: Some(0.5)
            })
        );
        assert_eq!(next, b);
    }

    #[test]
    fn resets_new_pairs_and_missing_readings() {
        let a = cur(
            0,
            &[("x>y", 5_000), ("y>x", 100)],
            &[("vm1", 10), ("vm2", 7)],
        );
        // x>y reset (smaller): counts 1,000 anew; z>x is new: 250; y>x unread: carried.
        // vm1 unread this time: carried; vm3 first read: not counted.
        let b = cur(
            1_000,
            &[("x>y", 1_000), ("z>x", 250)],
            &[("vm2", 507), ("vm3", 99)],
        );
        let (m, next) = measure(Some(&a), &b);
        let m = m.unwrap();
        assert!((m.mbps - 1_250.0 * 8.0 / 1e6).abs() < 1e-12, "{m:?}");
        assert!(m.cores.is_some_and(|c| (c - 0.5).abs() < 1e-12), "{m:?}");
        assert_eq!(next.pairs["y>x"], 100);
        assert_eq!(next.cpu_ms["vm1"], 10);
        assert_eq!(next.cpu_ms["vm3"], 99);
        // No time passed: no sample, the cursor stays.
        let (m, same) = measure(Some(&b), &cur(1_000, &[("x>y", 9_999)], &[]));
        assert_eq!((m, same), (None, b));
    }

    #[test]
    fn cpu_readings_that_stand_still_are_no_cpu_sample() {
        let a = cur(1_000, &[("x>y", 0)], &[("vm1", 500), ("vm2", 70)]);
        // The agents reported nothing new: traffic is measured, CPU is not known.
        let b = cur(2_000, &[("x>y", 125_000)], &[("vm1", 500), ("vm2", 70)]);
        let (m, next) = measure(Some(&a), &b);
        assert_eq!(
            m,
            Some(Measured {
                mbps: 1.0,
                cores: None
            })
        );
        // One VM moved: the period is measured from every VM read both times.
        let c = cur(3_000, &[("x>y", 125_000)], &[("vm1", 750), ("vm2", 70)]);
        let (m, _) = measure(Some(&next), &c);
        assert_eq!(m.and_then(|m| m.cores), Some(0.25));
        // No VM read both times: nothing known either.
        let d = cur(4_000, &[], &[("vm9", 1)]);
        let (m, _) = measure(Some(&a), &d);
        assert_eq!(m.and_then(|m| m.cores), None);
    }
}
