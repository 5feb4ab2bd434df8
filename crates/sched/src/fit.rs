//! Where a VM fits by capacity: the one placement rule for a plain VM (create,
//! migration destination, maintenance drain), with the reservation count it is checked
//! against. Pure, so that it is tested without a store.

use std::collections::HashMap;

use ::model::{Host, HostState, Name, Vm};

/// Resources already reserved on a host by its VMs (of every desired state
/// except gone: a stopped VM keeps its reservation so that it can start again).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Sum of vCPUs.
    pub vcpus: u64,
    /// Sum of memory, MiB.
    pub memory_mib: u64,
}

/// Why a VM cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    /// The requested host is not registered.
    #[error("host: no host named {0}")]
    NoSuchHost(Name),
    /// The requested host missed its heartbeats.
    #[error("host: {0} is down")]
    HostDown(Name),
    /// The requested host is cordoned for maintenance.
    #[error("host: {0} is in maintenance")]
    InMaintenance(Name),
    /// The requested host lacks room.
    #[error("host: {host} has {free_vcpus} free vCPUs and {free_mib} MiB free memory, the vm needs {vcpus} vCPUs and {memory_mib} MiB")]
    NoRoom {
        /// The host.
        host: Name,
        /// Its free vCPUs.
        free_vcpus: u64,
        /// Its free memory, MiB.
        free_mib: u64,
        /// Requested vCPUs.
        vcpus: u32,
        /// Requested memory, MiB.
        memory_mib: u64,
    },
    /// No up host has room.
    #[error("host: no up host has {vcpus} free vCPUs and {memory_mib} MiB free memory ({up} of {total} hosts up)")]
    NoHostFits {
        /// Requested vCPUs.
        vcpus: u32,
        /// Requested memory, MiB.
        memory_mib: u64,
        /// Up hosts.
        up: usize,
        /// Registered hosts.
        total: usize,
    },
}

/// Reserved resources per host: every VM record counts, whatever its state, until the
/// record is gone; a redundant VM also holds room on its standby, so a takeover always
/// fits.
pub fn usage<'a>(vms: impl Iterator<Item = &'a Vm>) -> HashMap<Name, Usage> {
    let mut out: HashMap<Name, Usage> = HashMap::new();
    for vm in vms {
        let standby = vm.redundancy.as_ref().map(|r| &r.standby_host);
        for host in std::iter::once(&vm.host).chain(standby) {
            out.entry(host.clone())
                .or_default()
                .add(vm.vcpus, vm.memory_mib);
        }
    }
    out
}

impl Usage {
    /// Counts one more VM of `vcpus` and `memory_mib`.
    pub fn add(&mut self, vcpus: u32, memory_mib: u64) {
        self.vcpus = self.vcpus.saturating_add(u64::from(vcpus));
        self.memory_mib = self.memory_mib.saturating_add(memory_mib);
    }
}

fn free(host: &Host, used: Usage) -> (u64, u64) {
    (
        u64::from(host.schedulable_vcpus()).saturating_sub(used.vcpus),
        host.memory_mib.saturating_sub(used.memory_mib),
    )
}

/// Picks a host for a VM of `vcpus`/`memory_mib`. With `wanted`, that host
/// must exist, be up and have room. Otherwise the up host with the most free
/// memory wins (then most free vCPUs, then name), which spreads VMs out.
/// `hosts` must have fresh `state`s.
pub fn place(
    hosts: &[Host],
    usage: &HashMap<Name, Usage>,
    vcpus: u32,
    memory_mib: u64,
    wanted: Option<&Name>,
) -> Result<Name, PlaceError> {
    let fits = |h: &Host| {
        let (fc, fm) = free(h, usage.get(&h.name).copied().unwrap_or_default());
        (fc >= u64::from(vcpus) && fm >= memory_mib, fc, fm)
    };
    if let Some(name) = wanted {
        let host = hosts
            .iter()
            .find(|h| &h.name == name)
            .ok_or_else(|| PlaceError::NoSuchHost(name.clone()))?;
        if host.state != HostState::Up {
            return Err(PlaceError::HostDown(name.clone()));
        }
        if host.maintenance.is_some() {
            return Err(PlaceError::InMaintenance(name.clone()));
        }
        let (ok, free_vcpus, free_mib) = fits(host);
        return if ok {
            Ok(name.clone())
        } else {
            Err(PlaceError::NoRoom {
                host: name.clone(),
                free_vcpus,
                free_mib,
                vcpus,
                memory_mib,
            })
        };
    }
    hosts
        .iter()
        .filter(|h| h.state == HostState::Up && h.maintenance.is_none())
        .filter_map(|h| {
            let (ok, fc, fm) = fits(h);
            ok.then_some((fm, fc, h))
        })
        .max_by(|a, b| {
            (a.0, a.1)
                .cmp(&(b.0, b.1))
                .then_with(|| b.2.name.cmp(&a.2.name))
        })
        .map(|(_, _, h)| h.name.clone())
        .ok_or(PlaceError::NoHostFits {
            vcpus,
            memory_mib,
            up: hosts.iter().filter(|h| h.state == HostState::Up).count(),
            total: hosts.len(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::model::{validate_name, HostId};

    fn host(name: &str, cpus: u32, mem: u64, state: HostState) -> Host {
        Host {
            id: HostId::new_random(),
            name: validate_name("name", name).unwrap(),
            cpus,
            // No overcommit: these cases count vCPUs one for one.
            vcpus: cpus,
            memory_mib: mem,
            disk_gib: 10,
            drivers: vec![],
            agent_url: None,
            nbd_addr: None,
            link_addr: None,
            uplink_ip: None,
            maintenance: None,
            last_heartbeat: 0,
            state,
        }
    }

    fn n(s: &str) -> Name {
        validate_name("name", s).unwrap()
    }

    #[test]
    fn picks_most_free_memory_among_up_hosts() {
        let hosts = [
            host("a", 8, 4096, HostState::Up),
            host("b", 8, 8192, HostState::Up),
            host("c", 64, 65536, HostState::Down),
        ];
        let mut usage = HashMap::new();
        assert_eq!(place(&hosts, &usage, 2, 1024, None).unwrap(), n("b"));
        usage.insert(
            n("b"),
            Usage {
                vcpus: 2,
                memory_mib: 6144,
            },
        );
        assert_eq!(place(&hosts, &usage, 2, 1024, None).unwrap(), n("a"));
        // Ties go to the first name.
        usage.insert(
            n("b"),
            Usage {
                vcpus: 0,
                memory_mib: 4096,
            },
        );
        assert_eq!(place(&hosts, &usage, 1, 16, None).unwrap(), n("a"));
    }

    #[test]
    fn refuses_when_nothing_fits() {
        let hosts = [
            host("a", 2, 1024, HostState::Up),
            host("c", 64, 65536, HostState::Down),
        ];
        let err = place(&hosts, &HashMap::new(), 4, 512, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "host: no up host has 4 free vCPUs and 512 MiB free memory (1 of 2 hosts up)"
        );
    }

    #[test]
    fn explicit_host_must_exist_be_up_and_fit() {
        let hosts = [
            host("a", 2, 1024, HostState::Up),
            host("c", 64, 65536, HostState::Down),
        ];
        let usage = HashMap::from([(
            n("a"),
            Usage {
                vcpus: 1,
                memory_mib: 512,
            },
        )]);
        assert_eq!(
            place(&hosts, &usage, 1, 512, Some(&n("zz"))).unwrap_err(),
            PlaceError::NoSuchHost(n("zz"))
        );
        assert_eq!(
            place(&hosts, &usage, 1, 512, Some(&n("c"))).unwrap_err(),
            PlaceError::HostDown(n("c"))
        );
        assert!(matches!(
            place(&hosts, &usage, 2, 512, Some(&n("a"))).unwrap_err(),
            PlaceError::NoRoom {
                free_vcpus: 1,
                free_mib: 512,
                ..
            }
        ));
        assert_eq!(
            place(&hosts, &usage, 1, 512, Some(&n("a"))).unwrap(),
            n("a")
        );
    }
}
