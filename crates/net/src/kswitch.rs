//! A host's switch on the kernel datapath: the classifier of [`crate::kernel`] counts at
//! each VM NIC (and forwards between the host's VMs on one bridge, the Linux bridge the
//! rest), and this reports to the domain controller exactly
//! like the user-space [`crate::switch`] (same [`SwitchReport`], same epochs and sequence
//! numbers) and installs the controller's address table into the classifier's `addrs` map.
//!
//! Counters live in the pinned BPF maps, not in this process, so they are cumulative since
//! the instance was loaded: the report's epoch is the instance's (stored in its `meta` map)
//! and survives a restart of this process, which then simply continues the same epoch —
//! nothing counted before a crash is lost, nothing is counted twice. Sequence numbers must
//! keep growing across such restarts: each new report takes `max(last + 1, unix ms)`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::controller::unix_ms;
use crate::core::FlowRecord;
use crate::kernel::{AddrLocation, KernelCounts, KernelDatapath, KernelError};
use crate::proto::ProtoError;
use crate::stats::{ReportOutcome, SwitchReport};
use crate::switch::ControllerLink;
use crate::types::{
    AddressTable, ClassCounters, Counter, DomainId, MacAddr, PortAddress, SwitchId,
};

/// How to run one host's kernel-datapath switch.
#[derive(Clone, Debug)]
pub struct KernelSwitchConfig {
    /// This host.
    pub switch: SwitchId,
    /// Its domain.
    pub domain: DomainId,
    /// The controller's switch endpoint; `None` counts without reporting.
    pub controller: Option<SocketAddr>,
    /// How often to report.
    pub report_interval: Duration,
    /// Delete a VM pair's entry from the kernel's pair map once its counts have not changed
    /// for this long and the controller has acknowledged them (the controller keeps its
    /// totals; if the pair talks again it is counted as a new flow). `None`: never.
    pub pair_idle: Option<Duration>,
    /// Leave every frame to the Linux bridge instead of forwarding those between two VMs of
    /// this host on one bridge in the classifier ([`KernelDatapath::set_bridge_only`]).
    pub bridge_only: bool,
}

/// A kernel switch could not start or do its work.
#[derive(Debug, thiserror::Error)]
pub enum KernelSwitchError {
    /// The classifier or its maps.
    #[error("kernel datapath of switch {switch}")]
    Kernel {
        /// Switch.
        switch: SwitchId,
        /// Cause.
        #[source]
        err: KernelError,
    },
    /// The controller did not take a report.
    #[error("report of switch {switch} not acknowledged")]
    Report {
        /// Switch.
        switch: SwitchId,
        /// Cause.
        #[source]
        err: ProtoError,
    },
    /// The report thread could not be spawned.
    #[error("report thread of switch {switch} could not start")]
    Thread {
        /// Switch.
        switch: SwitchId,
    },
}

/// What a running kernel switch shows to its owner.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelSwitchStatus {
    /// Counter epoch (the classifier instance's).
    pub epoch: u64,
    /// Sequence number of the last report built.
    pub seq: u64,
    /// Version of the address table installed.
    pub table_version: u64,
    /// Reports the controller applied (or had already applied).
    pub reports_applied: u64,
    /// Counters as of the last report.
    pub counters: ClassCounters,
    /// VM pairs deleted from the kernel's pair map as idle, in total.
    pub pairs_aged: u64,
}

#[derive(Debug)]
struct Port {
    netns: Option<String>,
    ifindex: u32,
    address: PortAddress,
}

#[derive(Debug)]
struct State {
    cfg: KernelSwitchConfig,
    dp: KernelDatapath,
    link: Option<ControllerLink>,
    ports: BTreeMap<String, Port>,
    table: AddressTable,
    pending: Option<SwitchReport>,
    status: KernelSwitchStatus,
    /// Per pair in the map: its (flow_seq, counts) as last read, when they last changed, and
    /// the sequence number of the first report that carried them.
    seen: HashMap<(MacAddr, MacAddr), SeenPair>,
    /// The last report sequence number the controller acknowledged.
    acked_seq: u64,
}

#[derive(Debug)]
struct SeenPair {
    flow_seq: u64,
    counter: Counter,
    changed: Instant,
    in_report: u64,
}

impl State {
    fn kerr(&self, err: KernelError) -> KernelSwitchError {
        KernelSwitchError::Kernel {
            switch: self.cfg.switch.clone(),
            err,
        }
    }

    /// The classifier's address map: this host's NICs are local, the rest of the domain's
    /// table remote. Table rows naming this host but no NIC of it are left out (a VM that has
    /// just moved away is not local any more).
    fn sync_addresses(&self) -> Result<(), KernelSwitchError> {
        let mut want: BTreeMap<MacAddr, AddrLocation> = BTreeMap::new();
        for e in &self.table.entries {
            if e.switch != self.cfg.switch {
                want.insert(e.mac, AddrLocation::Remote);
            }
        }
        for p in self.ports.values() {
            want.insert(p.address.mac, AddrLocation::Local);
        }
        self.dp.set_addresses(&want).map_err(|e| self.kerr(e))
    }

    /// Forgets NICs of this namespace whose interface is gone (a VM stopped, deleted or
    /// migrated away: its tap was removed). Their counts stay in the maps.
    fn prune(&mut self) -> Result<(), KernelSwitchError> {
        let gone: Vec<String> = self
            .ports
            .iter()
            .filter(|(n, p)| {
                p.netns.is_none() && !std::path::Path::new("/sys/class/net").join(n).exists()
            })
            .map(|(n, _)| n.clone())
            .collect();
        for n in &gone {
            if let Some(p) = self.ports.remove(n) {
                let _ = self.dp.detach(None, n, p.ifindex, p.address.mac);
            }
        }
        if gone.is_empty() {
            Ok(())
        } else {
            self.sync_addresses()
        }
    }

    /// Tracks when each pair's counts last changed (`flows` just read, for the report
    /// `self.status.seq`) and deletes from the kernel map the pairs that have been idle for
    /// `pair_idle` and whose counts an acknowledged report carried. Right after the read, so
    /// the window in which a returning frame could still hit the old entry is a bpftool call.
    fn age(&mut self, flows: &[FlowRecord]) {
        let now = Instant::now();
        let seq = self.status.seq;
        let mut live = HashMap::with_capacity(flows.len());
        let mut idle = Vec::new();
        for f in flows {
            let key = (f.src, f.dst);
            let p = match self.seen.remove(&key) {
                Some(p) if p.flow_seq == f.flow_seq && p.counter == f.counter => p,
                _ => SeenPair {
                    flow_seq: f.flow_seq,
                    counter: f.counter,
                    changed: now,
                    in_report: seq,
                },
            };
            if self.cfg.pair_idle.is_some_and(|t| {
                now.duration_since(p.changed) >= t && p.in_report <= self.acked_seq
            }) {
                idle.push(key);
            }
            live.insert(key, p);
        }
        // Pairs no longer in the map are forgotten with the rest of `seen`.
        self.seen = live;
        if idle.is_empty() {
            return;
        }
        match self.dp.age_pairs(&idle) {
            Ok(()) => {
                for k in &idle {
                    self.seen.remove(k);
                }
                self.status.pairs_aged += idle.len() as u64;
                tracing::debug!(switch = %self.cfg.switch, pairs = idle.len(), "idle VM pairs aged out of the kernel map");
            }
            Err(e) => {
                tracing::warn!(switch = %self.cfg.switch, error = &e as &dyn std::error::Error, "idle VM pairs not aged out")
            }
        }
    }

    fn report(&mut self) -> Result<(), KernelSwitchError> {
        if self.pending.is_none() {
            self.prune()?;
            let KernelCounts {
                counters,
                flows,
                pairs_full,
            } = self.dp.read().map_err(|e| self.kerr(e))?;
            if !pairs_full.is_zero() {
                tracing::warn!(switch = %self.cfg.switch, frames = pairs_full.packets, "VM pair map full: some frames counted by class only");
            }
            self.status.seq = (self.status.seq + 1).max(unix_ms());
            self.age(&flows);
            let mut ports: Vec<PortAddress> =
                self.ports.values().map(|p| p.address.clone()).collect();
            ports.sort();
            ports.dedup();
            self.pending = Some(SwitchReport {
                switch: self.cfg.switch.clone(),
                domain: self.cfg.domain.clone(),
                epoch: self.status.epoch,
                seq: self.status.seq,
                known_table_version: self.table.version,
                ports,
                counters,
                flows,
            });
        }
        let (Some(link), Some(r)) = (&mut self.link, &self.pending) else {
            if let Some(r) = self.pending.take() {
                self.status.counters = r.counters;
                // Nobody to acknowledge: the counts are as safe as they get.
                self.acked_seq = r.seq;
            }
            return Ok(());
        };
        let ack = link.exchange(r).map_err(|err| KernelSwitchError::Report {
            switch: self.cfg.switch.clone(),
            err,
        })?;
        if let Some(r) = self.pending.take() {
            self.status.counters = r.counters;
        }
        match ack.outcome {
            ReportOutcome::Applied | ReportOutcome::Duplicate => {
                self.status.reports_applied += 1;
                self.acked_seq = self.status.seq;
            }
            o => {
                tracing::warn!(switch = %self.cfg.switch, outcome = ?o, "controller refused report")
            }
        }
        if let Some(t) = ack.table {
            if t.domain == self.cfg.domain && t.version > self.table.version {
                self.table = t;
                self.status.table_version = self.table.version;
                self.sync_addresses()?;
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
    wake: Condvar,
    woken: Mutex<bool>,
}

/// A running kernel-datapath switch (reports until stopped or dropped).
#[derive(Debug)]
pub struct KernelSwitch {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl KernelSwitch {
    /// Opens (or loads) the classifier instance `instance` and starts reporting.
    pub fn start(
        cfg: KernelSwitchConfig,
        instance: &str,
    ) -> Result<KernelSwitch, KernelSwitchError> {
        let kerr = |err| KernelSwitchError::Kernel {
            switch: cfg.switch.clone(),
            err,
        };
        let dp = KernelDatapath::open(instance).map_err(kerr)?;
        KernelSwitch::start_on(cfg, dp)
    }

    /// Starts reporting the counts of an already opened classifier instance.
    pub fn start_on(
        cfg: KernelSwitchConfig,
        dp: KernelDatapath,
    ) -> Result<KernelSwitch, KernelSwitchError> {
        let switch = cfg.switch.clone();
        let kerr = |err| KernelSwitchError::Kernel {
            switch: switch.clone(),
            err,
        };
        let epoch = dp.epoch().map_err(kerr)?;
        dp.set_bridge_only(cfg.bridge_only).map_err(kerr)?;
        let state = State {
            link: cfg.controller.map(ControllerLink::new),
            table: AddressTable::empty(cfg.domain.clone()),
            cfg,
            dp,
            ports: BTreeMap::new(),
            pending: None,
            seen: HashMap::new(),
            acked_seq: 0,
            status: KernelSwitchStatus {
                epoch,
                ..KernelSwitchStatus::default()
            },
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            stop: AtomicBool::new(false),
            wake: Condvar::new(),
            woken: Mutex::new(false),
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kswitch-{switch}"))
            .spawn(move || run(&sh))
            .map_err(|_| KernelSwitchError::Thread {
                switch: switch.clone(),
            })?;
        tracing::info!(%switch, epoch, "kernel switch started");
        Ok(KernelSwitch {
            shared,
            thread: Some(thread),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        *self.shared.woken.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.wake.notify_all();
    }

    /// Classifies and counts VM `address`'s NIC `ifname` (in `netns`, or this namespace)
    /// from now on. Idempotent: an agent re-adopting its VMs attaches again.
    pub fn attach(
        &self,
        netns: Option<&str>,
        ifname: &str,
        address: PortAddress,
    ) -> Result<(), KernelSwitchError> {
        let mut st = self.state();
        let ifindex = st
            .dp
            .attach(netns, ifname, address.mac)
            .map_err(|e| st.kerr(e))?;
        st.ports.insert(
            ifname.to_owned(),
            Port {
                netns: netns.map(str::to_owned),
                ifindex,
                address,
            },
        );
        st.sync_addresses()?;
        drop(st);
        self.wake();
        Ok(())
    }

    /// Stops counting NIC `ifname` (unknown names are ignored).
    pub fn detach(&self, ifname: &str) -> Result<(), KernelSwitchError> {
        let mut st = self.state();
        let Some(p) = st.ports.remove(ifname) else {
            return Ok(());
        };
        st.dp
            .detach(p.netns.as_deref(), ifname, p.ifindex, p.address.mac)
            .map_err(|e| st.kerr(e))?;
        st.sync_addresses()?;
        drop(st);
        self.wake();
        Ok(())
    }

    /// The NICs being counted.
    pub fn attached(&self) -> Vec<String> {
        self.state().ports.keys().cloned().collect()
    }

    /// Reports now, from the caller's thread; `Ok` once the controller acknowledged.
    pub fn flush(&self) -> Result<(), KernelSwitchError> {
        self.state().report()
    }

    /// The latest status.
    pub fn status(&self) -> KernelSwitchStatus {
        self.state().status.clone()
    }

    /// The address table installed (as of the last report).
    pub fn table(&self) -> AddressTable {
        self.state().table.clone()
    }

    /// Stops reporting after a final report (the counters stay in the kernel either way).
    pub fn stop(mut self) -> Result<KernelSwitchStatus, KernelSwitchError> {
        self.halt();
        let mut st = self.state();
        let mut last = Ok(());
        for _ in 0..3 {
            last = st.report();
            if last.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        last.map(|()| st.status.clone())
    }

    /// For a host going away with its VMs (agent shutdown): a final report, then the
    /// instance is unpinned so the next start begins a new epoch. When the report fails the
    /// pins stay, and a restart continues the epoch with nothing lost.
    pub fn retire(&self) -> Result<(), KernelSwitchError> {
        self.shared.stop.store(true, Ordering::Release);
        self.wake();
        let mut st = self.state();
        let mut last = Ok(());
        for _ in 0..3 {
            last = st.report();
            if last.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        last?;
        st.dp.clone().remove().map_err(|e| st.kerr(e))
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for KernelSwitch {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run(sh: &Shared) {
    loop {
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        let res = sh.state.lock().unwrap_or_else(|e| e.into_inner()).report();
        if let Err(e) = res {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "kernel switch report failed; will retry"
            );
        }
        let interval = sh
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cfg
            .report_interval;
        let woken = sh.woken.lock().unwrap_or_else(|e| e.into_inner());
        let (mut woken, _) = sh
            .wake
            .wait_timeout_while(woken, interval, |w| !*w)
            .unwrap_or_else(|e| e.into_inner());
        *woken = false;
    }
}
