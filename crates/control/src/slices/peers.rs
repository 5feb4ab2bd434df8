//! The counters of every server sharing the store, for the sampler of whichever server
//! leads: each server's vSwitch controller counts only its own domain's switches, and
//! each agent reports its VMs' CPU time only to the server it talks to, so the leader
//! alone sees part of the load.
//!
//! Traffic: every server already saves its controller's snapshot (lifetime bytes per
//! VM pair) under [`keys::traffic`] every few seconds; the leader reads the others'.
//! CPU: every server publishes the CPU times its agents last reported under
//! [`keys::SLICE_CPU`] every sampling period ([`Control::publish_slice_cpu`]).
//!
//! Merging ([`merge`]) is pure. A VM pair whose ends are in two domains is counted by
//! both domains' switches (each sees the whole flow at its own VM's tap), so a pair's
//! bytes are the **largest** count any server has, never the sum. A VM's CPU time is
//! the **freshest** report of it (an agent that moved to another server reports there
//! now; a restarted QEMU counts from zero again, which the sampler takes as a reset).
//! A published CPU report older than the caller's limit is from a server that stopped
//! and is left out; a traffic snapshot is cumulative and never stale (a stopped
//! server's counts only stop growing).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::Counters;
use crate::records::{keys, now_ms, to_bytes};
use crate::{Control, ControlError};

/// What a server publishes each period: the CPU time its agents last reported.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuReport {
    /// When it was published, unix ms.
    pub at_ms: u64,
    /// CPU time per VM id, ms.
    pub cpu_ms: BTreeMap<String, u64>,
}

/// The other servers' counters as the store holds them.
#[derive(Clone, Debug, Default)]
pub struct PeerCounters {
    /// Each other server's CPU report, fresh enough.
    pub cpu: Vec<CpuReport>,
    /// Each other server's saved controller snapshot (opaque: the `net` crate's
    /// format), with its key for messages.
    pub traffic: Vec<(String, Bytes)>,
    /// Records that could not be read, with why (logged by the caller, skipped).
    pub unreadable: Vec<String>,
}

fn cpu_key(server: &str) -> String {
    format!("{}{}", keys::SLICE_CPU, model::hex(server.as_bytes()))
}

impl Control {
    /// Publishes the CPU times this server's agents last reported (one writer per
    /// key: the server itself).
    pub async fn publish_slice_cpu(
        &self,
        server: &str,
        cpu_ms: BTreeMap<String, u64>,
    ) -> Result<(), ControlError> {
        let report = CpuReport {
            at_ms: now_ms(),
            cpu_ms,
        };
        self.store()
            .put(&cpu_key(server), to_bytes(&report)?)
            .await?;
        Ok(())
    }

    /// Every server's counters but `server`'s own: CPU reports published at or after
    /// `fresh_since_ms`, and every saved traffic snapshot.
    pub async fn peer_counters(
        &self,
        server: &str,
        fresh_since_ms: u64,
    ) -> Result<PeerCounters, ControlError> {
        let mut out = PeerCounters::default();
        let own_cpu = cpu_key(server);
        for kv in self.store().list(keys::SLICE_CPU).await? {
            if kv.key == own_cpu {
                continue;
            }
            match serde_json::from_slice::<CpuReport>(&kv.value) {
                Ok(r) if r.at_ms >= fresh_since_ms => out.cpu.push(r),
                Ok(_) => {}
                Err(e) => out.unreadable.push(format!("{}: {e}", kv.key)),
            }
        }
        // Keys are `{TRAFFIC}{hex domain}/{hex server}`.
        let own_traffic = format!("/{}", model::hex(server.as_bytes()));
        for kv in self.store().list(keys::TRAFFIC).await? {
            if !kv.key.ends_with(&own_traffic) {
                out.traffic.push((kv.key, kv.value));
            }
        }
        Ok(out)
    }
}

/// This server's counters merged with the other servers': per VM pair the largest
/// count, per VM the freshest CPU time (this server's own, read now, over any
/// published one).
pub fn merge(
    own: Counters,
    peer_pairs: &[Vec<(String, String, u64)>],
    peer_cpu: &[CpuReport],
) -> Counters {
    let mut pairs: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (s, d, b) in own
        .pairs
        .into_iter()
        .chain(peer_pairs.iter().flatten().cloned())
    {
        let e = pairs.entry((s, d)).or_insert(0);
        *e = (*e).max(b);
    }
    let mut newest: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for r in peer_cpu {
        for (vm, ms) in &r.cpu_ms {
            let e = newest.entry(vm.clone()).or_insert((r.at_ms, *ms));
            if r.at_ms > e.0 {
                *e = (r.at_ms, *ms);
            }
        }
    }
    let mut cpu_ms: BTreeMap<String, u64> =
        newest.into_iter().map(|(vm, (_, ms))| (vm, ms)).collect();
    cpu_ms.extend(own.cpu_ms);
    Counters {
        pairs: pairs.into_iter().map(|((s, d), b)| (s, d, b)).collect(),
        cpu_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(s: &str, d: &str, b: u64) -> (String, String, u64) {
        (s.into(), d.into(), b)
    }

    #[test]
    fn pairs_take_the_largest_count_and_cpu_the_freshest_report() {
        let own = Counters {
            pairs: vec![pair("a", "b", 100), pair("a", "d", 40)],
            cpu_ms: [("vm1".to_string(), 500)].into(),
        };
        // The other domain counted a>d too (the whole flow, later: more) and its own
        // pair c>d.
        let peers = vec![vec![pair("a", "d", 55), pair("c", "d", 7)]];
        let cpu = vec![
            CpuReport {
                at_ms: 10,
                cpu_ms: [("vm1".to_string(), 9_999), ("vm2".to_string(), 300)].into(),
            },
            CpuReport {
                at_ms: 20,
                cpu_ms: [("vm2".to_string(), 10)].into(),
            },
        ];
        let m = merge(own, &peers, &cpu);
        assert_eq!(
            m.pairs,
            vec![pair("a", "b", 100), pair("a", "d", 55), pair("c", "d", 7)]
        );
        // vm1: this server's own reading wins; vm2: the report of time 20 (a reset
        // QEMU), not the larger older one.
        assert_eq!(m.cpu_ms["vm1"], 500);
        assert_eq!(m.cpu_ms["vm2"], 10);
    }
}
