//! The controller's pure counter merging: per-switch reset epochs and report sequence numbers
//! turn repeated, retried or restarted cumulative reports into deltas that are added exactly
//! once, so domain totals never go backwards and never double count. Also keeps per-second
//! buckets for time-window queries and the per-pair deltas not yet exported as IPFIX.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::core::FlowRecord;
use crate::types::{
    ClassCounters, Counter, DomainId, MacAddr, PortAddress, SwitchId, TrafficClass,
};

/// What a switch sends the controller every report interval (and once more when it stops).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchReport {
    /// The reporting switch.
    pub switch: SwitchId,
    /// The domain it believes it is in.
    pub domain: DomainId,
    /// Chosen at switch start, larger than any earlier epoch of the same switch; counters restart at 0.
    pub epoch: u64,
    /// Increases by one per new report within an epoch; a retried report keeps its number.
    pub seq: u64,
    /// Version of the address table the switch uses.
    pub known_table_version: u64,
    /// The VMs on this switch.
    pub ports: Vec<PortAddress>,
    /// Cumulative counters since the epoch started.
    pub counters: ClassCounters,
    /// Live flows, cumulative since each flow record was created.
    pub flows: Vec<FlowRecord>,
}

/// [`DomainStats::snapshot`]: what a controller persists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Per switch: where its reports stand.
    pub switches: Vec<SwitchSnapshot>,
    /// Lifetime totals.
    pub totals: ClassCounters,
    /// Lifetime totals per switch.
    pub per_switch: Vec<(SwitchId, ClassCounters)>,
    /// Lifetime per-pair counts.
    pub pairs: Vec<SnapshotPair>,
    /// Switch restarts seen.
    pub restarts: u64,
}

/// One switch in a [`StatsSnapshot`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchSnapshot {
    /// The switch.
    pub switch: SwitchId,
    /// Its current epoch.
    pub epoch: u64,
    /// The last report applied.
    pub seq: u64,
    /// Its cumulative counters as of that report.
    pub last: ClassCounters,
    /// Its flows as of that report.
    pub flows: Vec<SnapshotFlow>,
}

/// One flow of a switch in a [`SwitchSnapshot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFlow {
    /// Source MAC.
    pub src: MacAddr,
    /// Destination MAC.
    pub dst: MacAddr,
    /// The flow record's id.
    pub flow_seq: u64,
    /// Its cumulative counts as of the last report.
    pub counter: Counter,
}

/// One VM pair's lifetime counts in a [`StatsSnapshot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPair {
    /// Source MAC.
    pub src: MacAddr,
    /// Destination MAC.
    pub dst: MacAddr,
    /// The pair's class.
    pub class: TrafficClass,
    /// Counts.
    pub counter: Counter,
}

/// How the controller took a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportOutcome {
    /// Its deltas were added.
    Applied,
    /// Already applied (a retry): acknowledged, nothing added.
    Duplicate,
    /// From an epoch older than the newest seen for that switch: ignored.
    StaleEpoch,
    /// Not for this controller's domain.
    WrongDomain,
}

/// Counts per (source MAC, destination MAC), with the pair's class.
pub type PairCounts = BTreeMap<(MacAddr, MacAddr), (TrafficClass, Counter)>;

/// A VM pair's counts not yet exported, for IPFIX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowDelta {
    /// Source MAC.
    pub src: MacAddr,
    /// Destination MAC.
    pub dst: MacAddr,
    /// Class.
    pub class: TrafficClass,
    /// Frames and bytes since the last export.
    pub counter: Counter,
    /// When the first of these frames was reported (unix ms).
    pub start_ms: u64,
    /// When the last of these frames was reported (unix ms).
    pub end_ms: u64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct SwitchState {
    epoch: u64,
    seq: u64,
    last: ClassCounters,
    flows: HashMap<(MacAddr, MacAddr), (u64, Counter)>,
}

#[derive(Debug, Default, Clone)]
struct Bucket {
    counters: ClassCounters,
    pairs: HashMap<(MacAddr, MacAddr), (TrafficClass, Counter)>,
}

/// All counters of one domain, merged from its switches' reports.
#[derive(Debug)]
pub struct DomainStats {
    switches: BTreeMap<SwitchId, SwitchState>,
    totals: ClassCounters,
    per_switch: BTreeMap<SwitchId, ClassCounters>,
    pairs: BTreeMap<(MacAddr, MacAddr), (TrafficClass, Counter)>,
    buckets: BTreeMap<u64, Bucket>,
    retention_s: u64,
    pending: BTreeMap<(MacAddr, MacAddr), FlowDelta>,
    restarts: u64,
}

impl Default for DomainStats {
    fn default() -> Self {
        DomainStats::new(3600)
    }
}

impl DomainStats {
    /// Keeps per-second buckets for `retention_s` seconds.
    pub fn new(retention_s: u64) -> DomainStats {
        DomainStats {
            switches: BTreeMap::new(),
            totals: ClassCounters::default(),
            per_switch: BTreeMap::new(),
            pairs: BTreeMap::new(),
            buckets: BTreeMap::new(),
            retention_s,
            pending: BTreeMap::new(),
            restarts: 0,
        }
    }

    /// Merges one report received at `now_ms` (unix ms).
    pub fn apply(&mut self, r: &SwitchReport, now_ms: u64) -> ReportOutcome {
        let st = self.switches.entry(r.switch.clone()).or_default();
        if r.epoch < st.epoch {
            return ReportOutcome::StaleEpoch;
        }
        if r.epoch == st.epoch && r.seq <= st.seq {
            return ReportOutcome::Duplicate;
        }
        if r.epoch > st.epoch {
            if st.epoch != 0 {
                self.restarts += 1;
            }
            // A new epoch counts from zero: everything in it is new.
            *st = SwitchState {
                epoch: r.epoch,
                ..SwitchState::default()
            };
        }
        st.seq = r.seq;
        let delta = r.counters.since(&st.last);
        st.last = st.last.max(&r.counters);

        let mut pair_deltas = Vec::new();
        for f in &r.flows {
            let key = (f.src, f.dst);
            let d = match st.flows.get(&key) {
                Some(&(seq, _)) if f.flow_seq < seq => continue,
                Some(&(seq, last)) if f.flow_seq == seq => f.counter.since(last),
                _ => f.counter,
            };
            let prev = st
                .flows
                .get(&key)
                .filter(|(s, _)| *s == f.flow_seq)
                .map(|(_, c)| *c);
            st.flows.insert(
                key,
                (f.flow_seq, prev.map_or(f.counter, |p| p.max(f.counter))),
            );
            if !d.is_zero() {
                pair_deltas.push((key, f.class, d));
            }
        }

        self.totals.add(&delta);
        self.per_switch
            .entry(r.switch.clone())
            .or_default()
            .add(&delta);
        let sec = now_ms / 1000;
        let bucket = self.buckets.entry(sec).or_default();
        bucket.counters.add(&delta);
        for &(key, class, d) in &pair_deltas {
            let b = bucket
                .pairs
                .entry(key)
                .or_insert((class, Counter::default()));
            b.0 = class;
            b.1.add(d);
            let t = self.pairs.entry(key).or_insert((class, Counter::default()));
            t.0 = class;
            t.1.add(d);
            let p = self.pending.entry(key).or_insert(FlowDelta {
                src: key.0,
                dst: key.1,
                class,
                counter: Counter::default(),
                start_ms: now_ms,
                end_ms: now_ms,
            });
            p.class = class;
            p.counter.add(d);
            p.end_ms = now_ms;
        }
        let keep_from = sec.saturating_sub(self.retention_s);
        self.buckets = self.buckets.split_off(&keep_from);
        ReportOutcome::Applied
    }

    /// Lifetime totals of the domain.
    pub fn totals(&self) -> &ClassCounters {
        &self.totals
    }

    /// Lifetime totals per switch.
    pub fn per_switch(&self) -> &BTreeMap<SwitchId, ClassCounters> {
        &self.per_switch
    }

    /// How many times a switch came back with a new epoch.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// What a restarted controller needs to go on exactly: per switch its epoch, last
    /// sequence number and last cumulative counters, and the lifetime totals — taken together,
    /// so that reports after the snapshot add exactly what it lacks. Not kept: the per-second
    /// buckets (window queries start again) and the IPFIX deltas not exported yet.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            switches: self
                .switches
                .iter()
                .map(|(id, st)| SwitchSnapshot {
                    switch: id.clone(),
                    epoch: st.epoch,
                    seq: st.seq,
                    last: st.last,
                    flows: st
                        .flows
                        .iter()
                        .map(|(&(src, dst), &(flow_seq, counter))| SnapshotFlow {
                            src,
                            dst,
                            flow_seq,
                            counter,
                        })
                        .collect(),
                })
                .collect(),
            totals: self.totals,
            per_switch: self
                .per_switch
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            pairs: self
                .pairs
                .iter()
                .map(|(&(src, dst), &(class, counter))| SnapshotPair {
                    src,
                    dst,
                    class,
                    counter,
                })
                .collect(),
            restarts: self.restarts,
        }
    }

    /// Stats that go on from `s` (kept `retention_s`).
    pub fn restore(s: StatsSnapshot, retention_s: u64) -> DomainStats {
        let mut d = DomainStats::new(retention_s);
        for sw in s.switches {
            d.switches.insert(
                sw.switch,
                SwitchState {
                    epoch: sw.epoch,
                    seq: sw.seq,
                    last: sw.last,
                    flows: sw
                        .flows
                        .into_iter()
                        .map(|f| ((f.src, f.dst), (f.flow_seq, f.counter)))
                        .collect(),
                },
            );
        }
        d.totals = s.totals;
        d.per_switch = s.per_switch.into_iter().collect();
        d.pairs = s
            .pairs
            .into_iter()
            .map(|p| ((p.src, p.dst), (p.class, p.counter)))
            .collect();
        d.restarts = s.restarts;
        d
    }

    /// Takes the per-pair counts added since the last call (for IPFIX export).
    pub fn take_flow_deltas(&mut self) -> Vec<FlowDelta> {
        std::mem::take(&mut self.pending).into_values().collect()
    }

    /// Counts in `[from_s, to_s)` (unix seconds; `None` = unbounded), lifetime when both are `None`.
    pub fn window(&self, from_s: Option<u64>, to_s: Option<u64>) -> (ClassCounters, PairCounts) {
        if from_s.is_none() && to_s.is_none() {
            return (self.totals, self.pairs.clone());
        }
        let (from, to) = (from_s.unwrap_or(0), to_s.unwrap_or(u64::MAX));
        let mut c = ClassCounters::default();
        let mut pairs: BTreeMap<_, (TrafficClass, Counter)> = BTreeMap::new();
        if from < to {
            for b in self.buckets.range(from..to).map(|(_, b)| b) {
                c.add(&b.counters);
                for (k, (class, d)) in &b.pairs {
                    let e = pairs.entry(*k).or_insert((*class, Counter::default()));
                    e.1.add(*d);
                }
            }
        }
        (c, pairs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_snapshot_goes_on_exactly() {
        let mut s = DomainStats::new(60);
        assert_eq!(
            s.apply(&report(5, 1, 10, 1, 10), 1000),
            ReportOutcome::Applied
        );
        let snap = s.snapshot();
        // Applied after the snapshot, then lost with the controller.
        assert_eq!(
            s.apply(&report(5, 2, 15, 1, 15), 2000),
            ReportOutcome::Applied
        );
        let json = serde_json::to_string(&snap).expect("serialize");
        let mut r = DomainStats::restore(serde_json::from_str(&json).expect("parse"), 60);
        assert_eq!(r.totals(), &snap.totals);
        // The switch resends (or sends a newer) cumulative report: added exactly once.
        assert_eq!(
            r.apply(&report(5, 2, 15, 1, 15), 3000),
            ReportOutcome::Applied
        );
        assert_eq!(
            r.apply(&report(5, 2, 15, 1, 15), 3000),
            ReportOutcome::Duplicate
        );
        assert_eq!(r.totals().class(TrafficClass::InterServer).packets, 15);
        let (_, pairs) = r.window(None, None);
        assert_eq!(pairs.values().map(|(_, c)| c.packets).sum::<u64>(), 15);
        assert_eq!(r.snapshot().totals, s.snapshot().totals);
    }

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }
    fn report(
        epoch: u64,
        seq: u64,
        packets: u64,
        flow_seq: u64,
        flow_packets: u64,
    ) -> SwitchReport {
        let mut counters = ClassCounters::default();
        *counters.class_mut(TrafficClass::InterServer) = Counter {
            packets,
            bytes: packets * 100,
        };
        SwitchReport {
            switch: "h1".into(),
            domain: "d".into(),
            epoch,
            seq,
            known_table_version: 0,
            ports: vec![],
            counters,
            flows: vec![FlowRecord {
                src: mac(1),
                dst: mac(2),
                class: TrafficClass::InterServer,
                flow_seq,
                counter: Counter {
                    packets: flow_packets,
                    bytes: flow_packets * 100,
                },
            }],
        }
    }
    fn inter(s: &DomainStats) -> u64 {
        s.totals().class(TrafficClass::InterServer).packets
    }
    fn pair(s: &DomainStats) -> u64 {
        s.window(None, None).1[&(mac(1), mac(2))].1.packets
    }

    #[test]
    fn retries_and_reordering_never_double_count_or_go_back() {
        let mut s = DomainStats::default();
        assert_eq!(s.apply(&report(10, 1, 5, 1, 5), 0), ReportOutcome::Applied);
        assert_eq!(
            s.apply(&report(10, 1, 5, 1, 5), 0),
            ReportOutcome::Duplicate
        );
        assert_eq!(s.apply(&report(10, 3, 9, 1, 9), 0), ReportOutcome::Applied);
        // seq 2 arrives late: it is older than what was applied.
        assert_eq!(
            s.apply(&report(10, 2, 7, 1, 7), 0),
            ReportOutcome::Duplicate
        );
        assert_eq!((inter(&s), pair(&s)), (9, 9));
    }

    #[test]
    fn a_new_epoch_adds_to_the_old_one_and_old_epochs_are_ignored() {
        let mut s = DomainStats::default();
        s.apply(&report(10, 1, 5, 1, 5), 0);
        s.apply(&report(10, 2, 8, 1, 8), 0);
        // Restart: counters start at 0 again; seq restarts too.
        assert_eq!(s.apply(&report(20, 1, 3, 1, 3), 0), ReportOutcome::Applied);
        assert_eq!((inter(&s), pair(&s)), (11, 11));
        assert_eq!(
            s.apply(&report(10, 3, 100, 1, 100), 0),
            ReportOutcome::StaleEpoch
        );
        assert_eq!(s.apply(&report(20, 2, 4, 1, 4), 0), ReportOutcome::Applied);
        assert_eq!((inter(&s), pair(&s)), (12, 12));
        assert_eq!(s.restarts(), 1);
    }

    #[test]
    fn an_aged_out_flow_that_returns_counts_from_zero() {
        let mut s = DomainStats::default();
        s.apply(&report(10, 1, 5, 1, 5), 0);
        // The flow aged out on the switch and came back as flow 2 with 2 frames.
        s.apply(&report(10, 2, 7, 2, 2), 0);
        assert_eq!((inter(&s), pair(&s)), (7, 7));
        // A late record of the old flow is ignored.
        let mut r = report(10, 3, 7, 1, 6);
        r.flows.push(FlowRecord {
            flow_seq: 2,
            ..r.flows[0]
        });
        r.flows[1].counter = Counter {
            packets: 2,
            bytes: 200,
        };
        s.apply(&r, 0);
        assert_eq!(pair(&s), 7);
    }

    #[test]
    fn windows_and_ipfix_deltas() {
        let mut s = DomainStats::default();
        s.apply(&report(10, 1, 5, 1, 5), 1_000);
        s.apply(&report(10, 2, 8, 1, 8), 5_500);
        assert_eq!(
            s.window(Some(0), Some(5))
                .0
                .class(TrafficClass::InterServer)
                .packets,
            5
        );
        assert_eq!(
            s.window(Some(5), None)
                .0
                .class(TrafficClass::InterServer)
                .packets,
            3
        );
        assert_eq!(
            s.window(Some(6), Some(5))
                .0
                .class(TrafficClass::InterServer)
                .packets,
            0
        );
        let d = s.take_flow_deltas();
        assert_eq!(d.len(), 1);
        assert_eq!(
            (d[0].counter.packets, d[0].start_ms, d[0].end_ms),
            (8, 1_000, 5_500)
        );
        assert!(s.take_flow_deltas().is_empty());
    }
}
