//! The virtual switch controller of one domain: it takes the switches' reports (addresses and
//! counters), keeps the domain's versioned address table, merges counters (see [`crate::stats`])
//! and renders them as a [`TrafficReport`] and as Prometheus text, which the API server serves
//! (`GET /v1/traffic`, `GET /metrics`; this crate has no HTTP server), and exports IPFIX.
//!
//! Concurrency: one `std::sync::Mutex` around the state, held only for in-memory work, never
//! across an `.await` or a socket call.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

use crate::ipfix::IpfixExporter;
use crate::proto::{read_msg_async, write_msg_async, ProtoError, ReportAck};
use crate::stats::{DomainStats, FlowDelta, ReportOutcome, SwitchReport};
use crate::types::{
    AddressEntry, AddressTable, ClassCounters, Counter, DomainId, MacAddr, PortAddress, SwitchId,
    TrafficClass,
};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[derive(Debug)]
struct ControllerState {
    table: AddressTable,
    ports: BTreeMap<SwitchId, Vec<PortAddress>>,
    stats: DomainStats,
    /// Every VM name a MAC was reported with (the latest), so the counts of a VM that has
    /// stopped or left still show its name.
    names: BTreeMap<MacAddr, String>,
    /// Reports applied (a persistence cursor).
    applied: u64,
    /// `applied` as of the last snapshot the owner persisted.
    persisted: u64,
}

/// A persisted controller state.
#[derive(Debug, Serialize, Deserialize)]
struct ControllerSnapshot {
    domain: DomainId,
    stats: crate::stats::StatsSnapshot,
    names: Vec<(MacAddr, String)>,
}

/// A snapshot that cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Not a snapshot.
    #[error("traffic snapshot is not valid JSON of the expected shape")]
    Json(#[from] serde_json::Error),
    /// Another domain's.
    #[error("traffic snapshot is for domain {0}")]
    Domain(DomainId),
}

/// The lifetime bytes per VM pair (source MAC, destination MAC, bytes) in a saved
/// snapshot of any domain's controller: what another server's controller had counted
/// when it last saved, for a sampler that merges the servers' counts.
pub fn snapshot_pair_bytes(snapshot: &[u8]) -> Result<Vec<(MacAddr, MacAddr, u64)>, RestoreError> {
    let snap: ControllerSnapshot = serde_json::from_slice(snapshot)?;
    Ok(snap
        .stats
        .pairs
        .into_iter()
        .map(|p| (p.src, p.dst, p.counter.bytes))
        .collect())
}

/// The controller of one domain. Cheap to clone; clones share state.
#[derive(Clone, Debug)]
pub struct Controller {
    domain: DomainId,
    state: Arc<Mutex<ControllerState>>,
}

impl Controller {
    /// A controller owning `domain`, with no switches yet.
    pub fn new(domain: DomainId) -> Controller {
        Controller {
            state: Arc::new(Mutex::new(ControllerState {
                table: AddressTable::empty(domain.clone()),
                ports: BTreeMap::new(),
                stats: DomainStats::default(),
                names: BTreeMap::new(),
                applied: 0,
                persisted: 0,
            })),
            domain,
        }
    }

    /// The domain this controller owns.
    pub fn domain(&self) -> &DomainId {
        &self.domain
    }

    fn lock(&self) -> MutexGuard<'_, ControllerState> {
        // The state stays consistent across a panic in another holder: every update is a few
        // field writes with no early return in between.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The controller's state to persist: the counters' [`crate::stats::StatsSnapshot`] and
    /// the VM names seen, as JSON. Taken under one lock, so it is consistent.
    pub fn snapshot(&self) -> Vec<u8> {
        let st = self.lock();
        let snap = ControllerSnapshot {
            domain: self.domain.clone(),
            stats: st.stats.snapshot(),
            names: st.names.iter().map(|(m, n)| (*m, n.clone())).collect(),
        };
        serde_json::to_vec(&snap).unwrap_or_default()
    }

    /// Counts of applied reports so far: a saver persists when it moved.
    pub fn applied(&self) -> u64 {
        self.lock().applied
    }

    /// Records that the snapshot taken when [`Controller::applied`] was `applied` is saved
    /// (shown as `vinfra_traffic_reports_persisted`).
    pub fn mark_persisted(&self, applied: u64) {
        let mut st = self.lock();
        st.persisted = st.persisted.max(applied);
    }

    /// Goes on from a [`Controller::snapshot`] (taken by a controller of the same domain),
    /// before any report is taken. Reports that reached the old controller after its last
    /// snapshot are added again from the switches' cumulative counters, exactly once.
    pub fn restore(&self, snapshot: &[u8]) -> Result<(), RestoreError> {
        let snap: ControllerSnapshot = serde_json::from_slice(snapshot)?;
        if snap.domain != self.domain {
            return Err(RestoreError::Domain(snap.domain));
        }
        let mut st = self.lock();
        st.stats = DomainStats::restore(snap.stats, 3600);
        st.names = snap.names.into_iter().collect();
        Ok(())
    }

    /// Takes one switch report received now.
    pub fn handle_report(&self, r: &SwitchReport) -> ReportAck {
        self.handle_report_at(r, unix_ms())
    }

    /// Takes one switch report received at `now_ms` (unix ms).
    pub fn handle_report_at(&self, r: &SwitchReport, now_ms: u64) -> ReportAck {
        if r.domain != self.domain {
            tracing::warn!(switch = %r.switch, domain = %r.domain, "report for another domain");
            return ReportAck {
                outcome: ReportOutcome::WrongDomain,
                table: None,
            };
        }
        let mut st = self.lock();
        let outcome = st.stats.apply(r, now_ms);
        if outcome == ReportOutcome::Applied {
            st.applied += 1;
            let mut ports = r.ports.clone();
            ports.sort();
            for p in &ports {
                if st.names.get(&p.mac) != Some(&p.vm) {
                    st.names.insert(p.mac, p.vm.clone());
                }
            }
            if st.ports.get(&r.switch) != Some(&ports) {
                st.ports.insert(r.switch.clone(), ports);
                let entries = st
                    .ports
                    .iter()
                    .flat_map(|(sw, ps)| {
                        ps.iter().map(|p| AddressEntry {
                            switch: sw.clone(),
                            vm: p.vm.clone(),
                            mac: p.mac,
                            ip: p.ip,
                        })
                    })
                    .collect();
                st.table.entries = entries;
                st.table.version += 1;
                tracing::info!(domain = %self.domain, version = st.table.version, switch = %r.switch, "address table changed");
            }
        }
        let table = (outcome != ReportOutcome::StaleEpoch
            && st.table.version > r.known_table_version)
            .then(|| st.table.clone());
        ReportAck { outcome, table }
    }

    /// The domain's current address table.
    pub fn table(&self) -> AddressTable {
        self.lock().table.clone()
    }

    /// Lifetime totals of the domain.
    pub fn totals(&self) -> ClassCounters {
        *self.lock().stats.totals()
    }

    /// Lifetime totals per switch.
    pub fn per_switch(&self) -> BTreeMap<SwitchId, ClassCounters> {
        self.lock().stats.per_switch().clone()
    }

    /// How many switch restarts (new epochs) were seen.
    pub fn restarts(&self) -> u64 {
        self.lock().stats.restarts()
    }

    /// Takes the per-pair counts not exported yet.
    pub fn take_flow_deltas(&self) -> Vec<FlowDelta> {
        self.lock().stats.take_flow_deltas()
    }

    /// Exports the per-pair counts not exported yet as IPFIX over UDP to `collector`; returns the
    /// number of data records sent. Records taken but not sent (socket error) are lost to the
    /// collector, not to the controller's own totals.
    pub fn export_ipfix(
        &self,
        exporter: &mut IpfixExporter,
        socket: &UdpSocket,
        collector: SocketAddr,
    ) -> std::io::Result<usize> {
        let flows = self.take_flow_deltas();
        let n = flows.len();
        for msg in exporter.encode(&flows, unix_ms() / 1000) {
            socket.send_to(&msg, collector)?;
        }
        Ok(n)
    }

    /// Exports new flow deltas to `collector` every `interval` until the task is dropped.
    pub async fn export_ipfix_every(
        &self,
        collector: SocketAddr,
        observation_domain: u32,
        interval: std::time::Duration,
    ) -> std::io::Result<()> {
        let socket = UdpSocket::bind(if collector.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })?;
        let mut exporter = IpfixExporter::new(observation_domain);
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            // A UDP send to a loopback or LAN collector does not block in practice.
            if let Err(e) = self.export_ipfix(&mut exporter, &socket, collector) {
                tracing::warn!(%collector, error = &e as &dyn std::error::Error, "ipfix export failed");
            }
        }
    }

    /// Traffic over a time window, by class, by VM and by VM pair.
    pub fn traffic(&self, q: &TrafficQuery) -> TrafficReport {
        let st = self.lock();
        let (from_s, to_s) = match q.window_s {
            Some(w) => (Some((unix_ms() / 1000).saturating_sub(w)), None),
            None => (q.from, q.to),
        };
        let (counters, pairs) = st.stats.window(from_s, to_s);
        let names: HashMap<MacAddr, (&str, Option<IpAddr>)> = st
            .table
            .entries
            .iter()
            .map(|e| (e.mac, (e.vm.as_str(), e.ip)))
            .collect();
        let name = |m: &MacAddr| {
            names
                .get(m)
                .map(|(n, _)| (*n).to_owned())
                .or_else(|| st.names.get(m).cloned())
        };
        let mut vms: BTreeMap<MacAddr, VmTraffic> = BTreeMap::new();
        let mut pair_rows = Vec::new();
        for ((src, dst), (class, c)) in &pairs {
            for (mac, tx) in [(*src, true), (*dst, false)] {
                let v = vms.entry(mac).or_insert_with(|| VmTraffic {
                    vm: name(&mac),
                    mac,
                    tx: Counter::default(),
                    rx: Counter::default(),
                });
                if tx {
                    v.tx.add(*c)
                } else {
                    v.rx.add(*c)
                }
            }
            pair_rows.push(PairTraffic {
                src_vm: name(src),
                dst_vm: name(dst),
                src_mac: *src,
                dst_mac: *dst,
                class: *class,
                packets: c.packets,
                bytes: c.bytes,
            });
        }
        pair_rows.sort_by_key(|p| std::cmp::Reverse(p.bytes));
        TrafficReport {
            domain: self.domain.clone(),
            from: from_s,
            to: to_s,
            classes: TrafficClass::ALL
                .iter()
                .map(|&class| {
                    let c = counters.class(class);
                    ClassTraffic {
                        class,
                        packets: c.packets,
                        bytes: c.bytes,
                    }
                })
                .collect(),
            flood: counters.flood,
            neighbor: counters.neighbor,
            errors: counters.errors,
            vms: vms.into_values().collect(),
            pairs: pair_rows,
        }
    }

    /// Prometheus text exposition (format 0.0.4) of the domain's counters.
    pub fn prometheus(&self) -> String {
        let st = self.lock();
        let d = escape(&self.domain.0);
        let mut o = String::new();
        let t = st.stats.totals();
        for (metric, help, pick) in [
            (
                "vinfra_traffic_packets_total",
                "Frames counted by the domain's virtual switches.",
                true,
            ),
            (
                "vinfra_traffic_bytes_total",
                "Bytes of the frames counted by the domain's virtual switches.",
                false,
            ),
        ] {
            let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} counter");
            for class in TrafficClass::ALL {
                let c = t.class(class);
                let v = if pick { c.packets } else { c.bytes };
                let _ = writeln!(o, "{metric}{{domain=\"{d}\",class=\"{class}\"}} {v}");
            }
            let v = if pick { t.flood.packets } else { t.flood.bytes };
            let _ = writeln!(o, "{metric}{{domain=\"{d}\",class=\"flood\"}} {v}");
            let v = if pick {
                t.neighbor.packets
            } else {
                t.neighbor.bytes
            };
            let _ = writeln!(o, "{metric}{{domain=\"{d}\",class=\"neighbor\"}} {v}");
        }
        let _ = writeln!(o, "# HELP vinfra_traffic_errors_total Malformed frames dropped, by switch.\n# TYPE vinfra_traffic_errors_total counter");
        for (sw, c) in st.stats.per_switch() {
            let _ = writeln!(
                o,
                "vinfra_traffic_errors_total{{domain=\"{d}\",switch=\"{}\"}} {}",
                escape(&sw.0),
                c.errors
            );
        }
        let _ = writeln!(o, "# HELP vinfra_traffic_reports_applied_total Switch reports applied by this controller since it started.\n# TYPE vinfra_traffic_reports_applied_total counter\nvinfra_traffic_reports_applied_total{{domain=\"{d}\"}} {}", st.applied);
        let _ = writeln!(o, "# HELP vinfra_traffic_reports_persisted Applied reports covered by the last saved snapshot.\n# TYPE vinfra_traffic_reports_persisted gauge\nvinfra_traffic_reports_persisted{{domain=\"{d}\"}} {}", st.persisted);
        let _ = writeln!(o, "# HELP vinfra_switch_restarts_total Switch restarts (new counter epochs) seen.\n# TYPE vinfra_switch_restarts_total counter\nvinfra_switch_restarts_total{{domain=\"{d}\"}} {}", st.stats.restarts());
        let _ = writeln!(o, "# HELP vinfra_address_table_version Version of the domain's address table.\n# TYPE vinfra_address_table_version gauge\nvinfra_address_table_version{{domain=\"{d}\"}} {}", st.table.version);
        let _ = writeln!(o, "# HELP vinfra_address_table_entries VMs in the domain's address table.\n# TYPE vinfra_address_table_entries gauge\nvinfra_address_table_entries{{domain=\"{d}\"}} {}", st.table.entries.len());
        o
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `GET /v1/traffic` parameters: a window of the last `window_s` seconds, or `[from, to)` in
/// unix seconds; neither means lifetime totals.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficQuery {
    /// Window start (unix seconds, inclusive).
    pub from: Option<u64>,
    /// Window end (unix seconds, exclusive).
    pub to: Option<u64>,
    /// The last this many seconds (overrides `from`/`to`).
    pub window_s: Option<u64>,
}

/// One class's counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassTraffic {
    /// Class.
    pub class: TrafficClass,
    /// Frames.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// One VM's sent and received counts (counted frames of every class).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmTraffic {
    /// VM name, if in this domain.
    pub vm: Option<String>,
    /// MAC.
    pub mac: MacAddr,
    /// Sent.
    pub tx: Counter,
    /// Received.
    pub rx: Counter,
}

/// One VM pair's counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairTraffic {
    /// Source VM name, if in this domain.
    pub src_vm: Option<String>,
    /// Destination VM name, if in this domain.
    pub dst_vm: Option<String>,
    /// Source MAC.
    pub src_mac: MacAddr,
    /// Destination MAC.
    pub dst_mac: MacAddr,
    /// Class.
    pub class: TrafficClass,
    /// Frames.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// `GET /v1/traffic` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficReport {
    /// Domain.
    pub domain: DomainId,
    /// Window start used (unix seconds), if any.
    pub from: Option<u64>,
    /// Window end used (unix seconds), if any.
    pub to: Option<u64>,
    /// By class.
    pub classes: Vec<ClassTraffic>,
    /// Broadcast/multicast frames from local VMs.
    pub flood: Counter,
    /// ARP and IPv6 neighbour discovery from local VMs (kernel datapath).
    #[serde(default)]
    pub neighbor: Counter,
    /// Malformed frames.
    pub errors: u64,
    /// By VM.
    pub vms: Vec<VmTraffic>,
    /// By VM pair, largest first.
    pub pairs: Vec<PairTraffic>,
}

/// Serves switch connections on `listener` until the task is dropped.
pub async fn serve_switches(listener: TcpListener, controller: Controller) -> std::io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let c = controller.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_switch(stream, &c).await {
                tracing::warn!(%peer, error = &e as &dyn std::error::Error, "switch connection closed");
            }
        });
    }
}

async fn serve_switch(mut stream: TcpStream, c: &Controller) -> Result<(), ProtoError> {
    while let Some(report) = read_msg_async::<SwitchReport>(&mut stream).await? {
        let ack = c.handle_report(&report);
        write_msg_async(&mut stream, &ack).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(sw: &str, epoch: u64, seq: u64, known: u64, macs: &[u8]) -> SwitchReport {
        SwitchReport {
            switch: sw.into(),
            domain: "d".into(),
            epoch,
            seq,
            known_table_version: known,
            ports: macs
                .iter()
                .map(|&n| PortAddress {
                    vm: format!("vm{n}"),
                    mac: MacAddr([2, 0, 0, 0, 0, n]),
                    ip: None,
                })
                .collect(),
            counters: ClassCounters::default(),
            flows: vec![],
        }
    }

    #[test]
    fn table_aggregates_switches_and_is_sent_only_when_newer() {
        let c = Controller::new("d".into());
        let a1 = c.handle_report(&report("h1", 1, 1, 0, &[1, 2]));
        assert_eq!(
            a1.table.as_ref().map(|t| (t.version, t.entries.len())),
            Some((1, 2))
        );
        let a2 = c.handle_report(&report("h2", 1, 1, 0, &[3]));
        assert_eq!(
            a2.table.as_ref().map(|t| (t.version, t.entries.len())),
            Some((2, 3))
        );
        // Same addresses again: no new version; a switch already at 2 gets nothing.
        assert_eq!(c.handle_report(&report("h1", 1, 2, 2, &[1, 2])).table, None);
        assert_eq!(c.table().version, 2);
        // h1 is behind: it gets version 2 with h2's VM.
        let t = c
            .handle_report(&report("h1", 1, 3, 1, &[1, 2]))
            .table
            .unwrap();
        assert!(t
            .entries
            .iter()
            .any(|e| e.switch.0 == "h2" && e.vm == "vm3"));
        let mut other = report("h9", 1, 1, 0, &[9]);
        other.domain = "x".into();
        assert_eq!(c.handle_report(&other).outcome, ReportOutcome::WrongDomain);
        assert_eq!(c.table().entries.len(), 3);
    }

    #[test]
    fn prometheus_text_has_every_class() {
        let c = Controller::new("d\"x".into());
        let mut r = report("h1", 1, 1, 0, &[1]);
        r.domain = "d\"x".into();
        *r.counters.class_mut(TrafficClass::InterDomain) = Counter {
            packets: 7,
            bytes: 700,
        };
        c.handle_report(&r);
        let text = c.prometheus();
        assert!(
            text.contains(
                "vinfra_traffic_packets_total{domain=\"d\\\"x\",class=\"inter_domain\"} 7"
            ),
            "{text}"
        );
        assert!(text
            .contains("vinfra_traffic_bytes_total{domain=\"d\\\"x\",class=\"inter_domain\"} 700"));
        assert!(text
            .contains("vinfra_traffic_packets_total{domain=\"d\\\"x\",class=\"intra_server\"} 0"));
    }

    #[test]
    fn a_saved_snapshot_gives_the_lifetime_bytes_per_pair() {
        let c = Controller::new("d".into());
        let mut r = report("h1", 1, 1, 0, &[1, 2]);
        let (a, b) = (MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]));
        r.flows = vec![crate::core::FlowRecord {
            src: a,
            dst: b,
            class: TrafficClass::IntraServer,
            flow_seq: 1,
            counter: Counter {
                packets: 3,
                bytes: 300,
            },
        }];
        c.handle_report(&r);
        r.seq = 2;
        r.flows[0].counter = Counter {
            packets: 5,
            bytes: 520,
        };
        c.handle_report(&r);
        assert_eq!(
            snapshot_pair_bytes(&c.snapshot()).unwrap(),
            vec![(a, b, 520)]
        );
        assert!(snapshot_pair_bytes(b"{}").is_err());
    }
}
