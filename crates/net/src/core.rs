//! The switch's pure core: address tables, MAC learning, classification, counting and flow
//! aging. No sockets and no clock (callers pass `now_ms`), so every rule is unit-tested here and
//! the benchmark measures exactly the code the real switch runs.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::frame::{self, MalformedFrame};
use crate::types::{
    AddressTable, ClassCounters, Counter, DomainId, MacAddr, PortAddress, SwitchId, TrafficClass,
};

/// A port of one switch: an index into its port list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u16);

/// What a port connects to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortKind {
    /// A VM's interface, with the address the VM uses.
    Vm(PortAddress),
    /// The link to the other hosts.
    Uplink,
}

/// What to do with one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send on exactly this port.
    Forward(PortId),
    /// Send on every port but the ingress one.
    Flood {
        /// The ingress port.
        except: PortId,
    },
    /// Do not send.
    Drop(DropReason),
}

/// Why a frame was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Counted as an error.
    Malformed(MalformedFrame),
    /// The destination is behind the ingress port itself.
    SamePort,
    /// A unicast frame on the uplink for a VM this switch does not have (the fabric flooded it).
    NotForUs,
}

/// Cumulative counts of one VM pair (source MAC to destination MAC) within an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowRecord {
    /// Source MAC.
    pub src: MacAddr,
    /// Destination MAC.
    pub dst: MacAddr,
    /// The pair's class as this switch saw it.
    pub class: TrafficClass,
    /// Distinguishes a flow that aged out and came back: counts restart at 0 under a larger id.
    pub flow_seq: u64,
    /// Frames and bytes since this flow record was created.
    pub counter: Counter,
}

#[derive(Clone, Copy, Debug)]
struct FlowState {
    rec: FlowRecord,
    last_ms: u64,
    /// Value of the core's counted-frame sequence at this flow's last update.
    last_frame: u64,
}

/// Timeouts of the core.
#[derive(Clone, Copy, Debug)]
pub struct CoreTimeouts {
    /// A learned MAC is forgotten after this long without a frame from it.
    pub learn_ttl_ms: u64,
    /// A flow with no frame for this long is removed once its last counts were reported.
    pub flow_idle_ms: u64,
}

impl Default for CoreTimeouts {
    fn default() -> Self {
        CoreTimeouts {
            learn_ttl_ms: 300_000,
            flow_idle_ms: 30_000,
        }
    }
}

/// One host's switching and counting state.
#[derive(Debug)]
pub struct SwitchCore {
    switch: SwitchId,
    domain: DomainId,
    ports: Vec<PortKind>,
    uplink: Option<PortId>,
    local: HashMap<MacAddr, PortId>,
    table: AddressTable,
    /// MAC -> switch for every entry of `table`.
    in_domain: HashMap<MacAddr, SwitchId>,
    learned: HashMap<MacAddr, (PortId, u64)>,
    counters: ClassCounters,
    flows: HashMap<(MacAddr, MacAddr), FlowState>,
    next_flow_seq: u64,
    counted_frames: u64,
    acked_frames: u64,
    timeouts: CoreTimeouts,
}

impl SwitchCore {
    /// A switch with these ports (at most one uplink is used: the first).
    pub fn new(
        switch: SwitchId,
        domain: DomainId,
        ports: Vec<PortKind>,
        timeouts: CoreTimeouts,
    ) -> SwitchCore {
        let mut local = HashMap::new();
        let mut uplink = None;
        for (i, p) in ports.iter().enumerate() {
            let Ok(id) = u16::try_from(i) else { break };
            match p {
                PortKind::Vm(a) => {
                    local.insert(a.mac, PortId(id));
                }
                PortKind::Uplink => {
                    uplink.get_or_insert(PortId(id));
                }
            }
        }
        SwitchCore {
            table: AddressTable::empty(domain.clone()),
            switch,
            domain,
            ports,
            uplink,
            local,
            in_domain: HashMap::new(),
            learned: HashMap::new(),
            counters: ClassCounters::default(),
            flows: HashMap::new(),
            next_flow_seq: 1,
            counted_frames: 0,
            acked_frames: 0,
            timeouts,
        }
    }

    /// This switch's id.
    pub fn switch(&self) -> &SwitchId {
        &self.switch
    }

    /// Number of ports.
    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    /// The addresses of this host's VMs, as reported to the controller.
    pub fn local_addresses(&self) -> Vec<PortAddress> {
        let mut v: Vec<PortAddress> = self
            .ports
            .iter()
            .filter_map(|p| match p {
                PortKind::Vm(a) => Some(a.clone()),
                PortKind::Uplink => None,
            })
            .collect();
        v.sort();
        v
    }

    /// The controller table in use.
    pub fn table(&self) -> &AddressTable {
        &self.table
    }

    /// Installs `table` if it is for this domain and newer than the one in use; returns whether it did.
    pub fn apply_table(&mut self, table: AddressTable) -> bool {
        if table.domain != self.domain || table.version <= self.table.version {
            return false;
        }
        self.in_domain = table
            .entries
            .iter()
            .map(|e| (e.mac, e.switch.clone()))
            .collect();
        self.table = table;
        true
    }

    /// Cumulative counters of this epoch.
    pub fn counters(&self) -> &ClassCounters {
        &self.counters
    }

    /// The live flow records, with a marker to pass to [`SwitchCore::ack`] once a report
    /// carrying them was accepted.
    pub fn snapshot(&self) -> (Vec<FlowRecord>, u64) {
        let mut v: Vec<FlowRecord> = self.flows.values().map(|f| f.rec).collect();
        v.sort_by_key(|r| (r.src, r.dst));
        (v, self.counted_frames)
    }

    /// The controller has every count up to `marker` (from [`SwitchCore::snapshot`]).
    pub fn ack(&mut self, marker: u64) {
        self.acked_frames = self.acked_frames.max(marker);
    }

    /// Which switch of this domain a MAC is on; `None` outside the domain.
    fn locate(&self, mac: MacAddr) -> Option<&SwitchId> {
        if self.local.contains_key(&mac) {
            return Some(&self.switch);
        }
        self.in_domain.get(&mac)
    }

    /// The class of a unicast frame from `src` to `dst`.
    pub fn classify(&self, src: MacAddr, dst: MacAddr) -> TrafficClass {
        match (self.locate(src), self.locate(dst)) {
            (Some(a), Some(b)) if a == b => TrafficClass::IntraServer,
            (Some(_), Some(_)) => TrafficClass::InterServer,
            _ => TrafficClass::InterDomain,
        }
    }

    /// Classifies, counts and decides where one frame goes.
    ///
    /// A frame is counted once per domain: by the switch where a local VM sent it, or, for a frame
    /// from outside the domain, by the switch of the local VM it is addressed to. Frames that
    /// arrive on the uplink from another host of the domain were counted there and are only
    /// forwarded here.
    pub fn process(&mut self, ingress: PortId, frame: &[u8], now_ms: u64) -> Verdict {
        let h = match frame::parse(frame) {
            Ok(h) => h,
            Err(e) => {
                self.counters.errors = self.counters.errors.saturating_add(1);
                return Verdict::Drop(DropReason::Malformed(e));
            }
        };
        let from_uplink = Some(ingress) == self.uplink;
        // Configured VM addresses are authoritative; learning covers what the table does not know.
        if !(self.local.contains_key(&h.src) || from_uplink && self.in_domain.contains_key(&h.src))
        {
            self.learned.insert(h.src, (ingress, now_ms));
        }
        if h.dst.is_multicast() {
            if !from_uplink {
                self.counters.flood.add_frame(frame.len());
            }
            return Verdict::Flood { except: ingress };
        }
        let dst_local = self.local.get(&h.dst).copied();
        let counted = !from_uplink || (dst_local.is_some() && !self.in_domain.contains_key(&h.src));
        if counted {
            let class = self.classify(h.src, h.dst);
            self.count(h.src, h.dst, class, frame.len(), now_ms);
        }
        if let Some(p) = dst_local {
            return if p == ingress {
                Verdict::Drop(DropReason::SamePort)
            } else {
                Verdict::Forward(p)
            };
        }
        if let (Some(sw), Some(up)) = (self.in_domain.get(&h.dst), self.uplink) {
            if *sw != self.switch {
                return if from_uplink {
                    Verdict::Drop(DropReason::NotForUs)
                } else {
                    Verdict::Forward(up)
                };
            }
        }
        match self.learned.get(&h.dst) {
            Some(&(p, seen)) if now_ms.saturating_sub(seen) <= self.timeouts.learn_ttl_ms => {
                if p == ingress {
                    Verdict::Drop(DropReason::SamePort)
                } else {
                    Verdict::Forward(p)
                }
            }
            // Only VMs sit behind VM ports, all configured: an unknown unicast from the uplink is not ours.
            _ if from_uplink => Verdict::Drop(DropReason::NotForUs),
            _ => Verdict::Flood { except: ingress },
        }
    }

    fn count(&mut self, src: MacAddr, dst: MacAddr, class: TrafficClass, len: usize, now_ms: u64) {
        self.counters.class_mut(class).add_frame(len);
        self.counted_frames += 1;
        let seq = &mut self.next_flow_seq;
        let f = self.flows.entry((src, dst)).or_insert_with(|| {
            let flow_seq = *seq;
            *seq += 1;
            FlowState {
                rec: FlowRecord {
                    src,
                    dst,
                    class,
                    flow_seq,
                    counter: Counter::default(),
                },
                last_ms: now_ms,
                last_frame: 0,
            }
        });
        f.rec.class = class;
        f.rec.counter.add_frame(len);
        f.last_ms = now_ms;
        f.last_frame = self.counted_frames;
    }

    /// Removes idle flows whose final counts the controller has, and stale learned MACs.
    /// Returns how many flows were removed.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let (idle, acked) = (self.timeouts.flow_idle_ms, self.acked_frames);
        let before = self.flows.len();
        self.flows
            .retain(|_, f| now_ms.saturating_sub(f.last_ms) <= idle || f.last_frame > acked);
        let ttl = self.timeouts.learn_ttl_ms;
        self.learned
            .retain(|_, &mut (_, seen)| now_ms.saturating_sub(seen) <= ttl);
        before - self.flows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::build;
    use crate::types::AddressEntry;

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }
    fn vm(n: u8) -> PortKind {
        PortKind::Vm(PortAddress {
            vm: format!("vm{n}"),
            mac: mac(n),
            ip: None,
        })
    }
    fn entry(sw: &str, n: u8) -> AddressEntry {
        AddressEntry {
            switch: sw.into(),
            vm: format!("vm{n}"),
            mac: mac(n),
            ip: None,
        }
    }
    /// h1 has vm1 (port 0), vm2 (port 1), uplink (port 2); vm3 is on h2 in the same domain.
    fn core() -> SwitchCore {
        let mut c = SwitchCore::new(
            "h1".into(),
            "d".into(),
            vec![vm(1), vm(2), PortKind::Uplink],
            CoreTimeouts {
                learn_ttl_ms: 1000,
                flow_idle_ms: 100,
            },
        );
        assert!(c.apply_table(AddressTable {
            domain: "d".into(),
            version: 1,
            entries: vec![entry("h1", 1), entry("h1", 2), entry("h2", 3)],
        }));
        c
    }
    fn f(dst: u8, src: u8) -> Vec<u8> {
        build(mac(dst), mac(src), 0x88b5, 60)
    }

    #[test]
    fn classification_and_forwarding() {
        let mut c = core();
        assert_eq!(
            c.process(PortId(0), &f(2, 1), 0),
            Verdict::Forward(PortId(1))
        );
        assert_eq!(
            c.process(PortId(0), &f(3, 1), 0),
            Verdict::Forward(PortId(2))
        );
        assert_eq!(
            c.process(PortId(0), &f(9, 1), 0),
            Verdict::Flood { except: PortId(0) }
        );
        let k = c.counters();
        assert_eq!(k.class(TrafficClass::IntraServer).packets, 1);
        assert_eq!(k.class(TrafficClass::InterServer).packets, 1);
        assert_eq!(k.class(TrafficClass::InterDomain).packets, 1);
        assert_eq!(k.class(TrafficClass::InterDomain).bytes, 60);
    }

    #[test]
    fn uplink_frames_are_counted_once_per_domain() {
        let mut c = core();
        // From vm3 (same domain, counted on h2): forwarded, not counted.
        assert_eq!(
            c.process(PortId(2), &f(1, 3), 0),
            Verdict::Forward(PortId(0))
        );
        // From outside the domain to a local VM: counted here as inter-domain.
        assert_eq!(
            c.process(PortId(2), &f(1, 9), 0),
            Verdict::Forward(PortId(0))
        );
        // Flooded by the fabric, for a VM elsewhere: neither counted nor forwarded.
        assert_eq!(
            c.process(PortId(2), &f(3, 9), 0),
            Verdict::Drop(DropReason::NotForUs)
        );
        assert_eq!(
            c.process(PortId(2), &f(8, 9), 0),
            Verdict::Drop(DropReason::NotForUs)
        );
        let k = c.counters();
        assert_eq!(k.class(TrafficClass::InterServer).packets, 0);
        assert_eq!(k.class(TrafficClass::InterDomain).packets, 1);
        // The outsider was learned behind the uplink.
        assert_eq!(
            c.process(PortId(0), &f(9, 1), 0),
            Verdict::Forward(PortId(2))
        );
    }

    #[test]
    fn malformed_frames_are_errors_and_dropped() {
        let mut c = core();
        for n in 0..14 {
            assert!(matches!(
                c.process(PortId(0), &vec![0xAB; n], 0),
                Verdict::Drop(DropReason::Malformed(_))
            ));
        }
        let mut bad_ip = build(mac(2), mac(1), 0x0800, 60);
        bad_ip[14] = 0x65;
        assert!(matches!(c.process(PortId(0), &bad_ip, 0), Verdict::Drop(_)));
        assert_eq!(c.counters().errors, 15);
        assert_eq!(c.counters().class(TrafficClass::IntraServer).packets, 0);
    }

    #[test]
    fn table_versions_only_move_forward() {
        let mut c = core();
        let old = AddressTable {
            domain: "d".into(),
            version: 1,
            entries: vec![],
        };
        assert!(!c.apply_table(old.clone()));
        assert!(!c.apply_table(AddressTable {
            domain: "other".into(),
            version: 9,
            entries: vec![]
        }));
        assert_eq!(c.classify(mac(1), mac(3)), TrafficClass::InterServer);
        assert!(c.apply_table(AddressTable { version: 2, ..old }));
        // vm3 left the table: now outside the domain.
        assert_eq!(c.classify(mac(1), mac(3)), TrafficClass::InterDomain);
    }

    #[test]
    fn flows_age_out_only_after_their_counts_were_acked() {
        let mut c = core();
        c.process(PortId(0), &f(2, 1), 0);
        assert_eq!(c.expire(1000), 0, "not acked yet");
        let (flows, marker) = c.snapshot();
        assert_eq!(flows.len(), 1);
        c.ack(marker);
        assert_eq!(c.expire(50), 0, "not idle yet");
        assert_eq!(c.expire(1000), 1);
        c.process(PortId(0), &f(2, 1), 1001);
        let (flows, _) = c.snapshot();
        assert_eq!(flows[0].counter.packets, 1);
        assert!(flows[0].flow_seq > 1, "a new flow record after aging");
    }
}
