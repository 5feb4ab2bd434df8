//! Hosts: registration (idempotent by name), heartbeats, liveness.

use model::api::{HostLease, RegisterHost};
use model::{Host, HostId, Name};
use store::{Revision, StoreError};

use crate::records::{get_json, keys, now_ms, to_bytes, update_cas, CAS_ATTEMPTS};
use crate::{Control, ControlError};

fn not_found(name: &Name) -> ControlError {
    ControlError::NotFound {
        kind: "host",
        id: name.to_string(),
    }
}

impl Control {
    /// `NotFound` unless `host` is registered.
    pub(crate) async fn require_host(&self, host: &Name) -> Result<(), ControlError> {
        if self.store().get(&keys::host(host)).await?.is_none() {
            return Err(ControlError::NotFound {
                kind: "host",
                id: host.to_string(),
            });
        }
        Ok(())
    }

    /// Registers `name`, or re-registers it keeping its id (capacity, drivers and
    /// addresses are replaced; the maintenance cordon stays). Counts as a heartbeat.
    /// Returns the host with its state and lease, and whether it is new.
    pub async fn register_host(
        &self,
        name: &Name,
        req: &RegisterHost,
    ) -> Result<(HostLease, bool), ControlError> {
        let key = keys::host(name);
        for _ in 0..CAS_ATTEMPTS {
            let existing = get_json::<Host>(self.store(), &key).await?;
            let (id, expect) = match &existing {
                Some((h, rev)) => (h.id, Some(*rev)),
                None => (HostId::new_random(), None),
            };
            let mut host = Host {
                id,
                name: name.clone(),
                cpus: req.cpus,
                vcpus: req.vcpus.unwrap_or(
                    req.cpus
                        .saturating_mul(model::api::DEFAULT_CPU_ALLOCATION_RATIO),
                ),
                memory_mib: req.memory_mib,
                disk_gib: req.disk_gib,
                drivers: req.drivers.clone(),
                agent_url: req.agent_url.clone(),
                nbd_addr: req.nbd_addr.clone(),
                link_addr: req.link_addr.clone(),
                uplink_ip: req.uplink_ip.clone(),
                // A re-registering agent (restart, crash) does not end maintenance.
                maintenance: existing.as_ref().and_then(|(h, _)| h.maintenance),
                last_heartbeat: renewed(existing.as_ref().map(|(h, _)| h.last_heartbeat)),
                state: model::HostState::Up,
            };
            match self.store().cas(&key, expect, to_bytes(&host)?).await {
                Ok(_) => {
                    host.refresh_state(now_ms(), self.heartbeat_timeout_ms());
                    if existing.is_none() {
                        tracing::info!(host = %name, id = %id, "host registered");
                    }
                    return Ok((self.lease(host), existing.is_none()));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Contended {
            what: format!("host {name}"),
        })
    }

    /// Records a heartbeat of `name`; returns the host with the lease it renewed.
    pub async fn heartbeat(&self, name: &Name) -> Result<HostLease, ControlError> {
        let mut host = update_cas(
            self.store(),
            &keys::host(name),
            || format!("host {name}"),
            || not_found(name),
            |h: &mut Host| {
                h.last_heartbeat = renewed(Some(h.last_heartbeat));
                Ok(())
            },
        )
        .await?;
        host.refresh_state(now_ms(), self.heartbeat_timeout_ms());
        Ok(self.lease(host))
    }

    /// `host` with the lease a heartbeat recorded now grants: the heartbeat timeout
    /// (the takeover waits a margin beyond it, see `takeover`).
    fn lease(&self, host: Host) -> HostLease {
        HostLease {
            host,
            lease_ms: self.heartbeat_timeout_ms(),
        }
    }

    /// One host with its state computed for now.
    pub async fn host(&self, name: &Name) -> Result<(Host, Revision), ControlError> {
        let (mut host, rev) = get_json::<Host>(self.store(), &keys::host(name))
            .await?
            .ok_or_else(|| not_found(name))?;
        host.refresh_state(now_ms(), self.heartbeat_timeout_ms());
        Ok((host, rev))
    }
}

/// The `last_heartbeat` a heartbeat recorded now stores: the wall clock, but always
/// beyond the previous value, so that every heartbeat changes the record. The takeover
/// watcher sees a renewal as a *change* of this value, timed on its own monotonic clock
/// (`takeover::LeaseWatch`); two heartbeats in one millisecond, or a wall clock stepped
/// back, must still count.
fn renewed(previous: Option<u64>) -> u64 {
    match previous {
        Some(p) => now_ms().max(p.saturating_add(1)),
        None => now_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_heartbeat_changes_the_record() {
        let now = now_ms();
        assert!(renewed(None) >= now);
        // A previous value from the future (a server with a clock ahead) still moves on.
        let ahead = now + 60_000;
        assert_eq!(renewed(Some(ahead)), ahead + 1);
        assert!(renewed(Some(1)) >= now);
        assert_eq!(renewed(Some(u64::MAX)), u64::MAX);
    }
}
