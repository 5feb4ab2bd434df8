//! Hosts: registration (idempotent by name), heartbeats, liveness.

use model::api::RegisterHost;
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
    /// Registers `name`, or re-registers it keeping its id (capacity, drivers and
    /// addresses are replaced; the maintenance cordon stays). Counts as a heartbeat.
    /// Returns the host with its state, and whether it is new.
    pub async fn register_host(
        &self,
        name: &Name,
        req: &RegisterHost,
    ) -> Result<(Host, bool), ControlError> {
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
                last_heartbeat: now_ms(),
                state: model::HostState::Up,
            };
            match self.store().cas(&key, expect, to_bytes(&host)?).await {
                Ok(_) => {
                    host.refresh_state(now_ms(), self.heartbeat_timeout_ms());
                    if existing.is_none() {
                        tracing::info!(host = %name, id = %id, "host registered");
                    }
                    return Ok((host, existing.is_none()));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Contended {
            what: format!("host {name}"),
        })
    }

    /// Records a heartbeat of `name`.
    pub async fn heartbeat(&self, name: &Name) -> Result<Host, ControlError> {
        let mut host = update_cas(
            self.store(),
            &keys::host(name),
            || format!("host {name}"),
            || not_found(name),
            |h: &mut Host| {
                h.last_heartbeat = now_ms().max(h.last_heartbeat);
                Ok(())
            },
        )
        .await?;
        host.refresh_state(now_ms(), self.heartbeat_timeout_ms());
        Ok(host)
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
