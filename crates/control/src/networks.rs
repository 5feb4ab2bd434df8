//! Virtual networks' IPAM: addresses for the NICs of a VM being created, allocated in
//! the VM's own create transaction.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use model::api::NicRequest;
use model::{Name, Network, NetworkId, Nic, TenantId};
use store::{Compare, Revision, TxnOp};

use crate::records::{keys, list_keyed, resolve_named, to_bytes};
use crate::{Control, ControlError, Scope};

/// Why a NIC cannot get its address.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    /// The tenant has no such network.
    #[error("{field}.network: no network named {network}")]
    NoSuchNetwork {
        /// `nics[i]`.
        field: String,
        /// The name asked for.
        network: String,
    },
    /// The address asked for is outside the subnet, or its network or broadcast address.
    #[error("{field}.ip: {ip} is not a host address of {network} ({cidr})")]
    NotAHostAddress {
        /// `nics[i]`.
        field: String,
        /// The address.
        ip: Ipv4Addr,
        /// The network.
        network: String,
        /// Its subnet.
        cidr: String,
    },
    /// The address asked for is taken.
    #[error("{field}.ip: {ip} is already in use on network {network}")]
    InUse {
        /// `nics[i]`.
        field: String,
        /// The address.
        ip: Ipv4Addr,
        /// The network.
        network: String,
    },
    /// The network has no free address.
    #[error("{field}: network {network} ({cidr}) has no free address")]
    Full {
        /// `nics[i]`.
        field: String,
        /// The network.
        network: String,
        /// Its subnet.
        cidr: String,
    },
    /// Two NICs of the VM would have the same address on twin subnets.
    #[error("{field}: same address {ip} as nics[{twin}] on a network with the same subnet; the guest could not tell them apart")]
    Twin {
        /// `nics[i]`.
        field: String,
        /// The address.
        ip: Ipv4Addr,
        /// The other NIC's index.
        twin: usize,
    },
    /// A NIC name breaks the name rules.
    #[error(transparent)]
    Name(#[from] model::ValidationError),
    /// The store failed.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// The NICs of a VM being created, with the store compares and writes that make the
/// allocation atomic with the VM record: each address key must be absent, and each
/// network record is rewritten unchanged so that a concurrent delete of the network
/// fails its own compare.
#[derive(Debug, Default)]
pub struct Allocation {
    /// The NICs, addressed.
    pub nics: Vec<Nic>,
    /// What the transaction must compare.
    pub compares: Vec<Compare>,
    /// What it must write.
    pub ops: Vec<TxnOp>,
}

/// The store deletes that free a VM's addresses (in its removal transaction).
pub fn release(nics: &[Nic]) -> Vec<TxnOp> {
    nics.iter()
        .map(|n| TxnOp::Delete {
            key: keys::ipam(n.network, n.ip),
        })
        .collect()
}

impl Control {
    /// A network by id or name, as `scope` sees it.
    pub async fn network(
        &self,
        scope: Scope,
        s: &str,
    ) -> Result<(Network, Revision), ControlError> {
        resolve_named::<NetworkId, Network>(
            self.store(),
            scope,
            s,
            "network",
            keys::NETWORK_NAMES,
            keys::network,
            |n| n.tenant,
        )
        .await
    }

    /// Allocates addresses for `reqs` on the tenant's networks: the asked one (inside
    /// the subnet, not its network or broadcast address, free) or the lowest free one.
    pub async fn allocate_nics(
        &self,
        tenant: TenantId,
        reqs: &[NicRequest],
        vm: model::VmId,
    ) -> Result<Allocation, NicError> {
        let mut out = Allocation::default();
        for (i, r) in reqs.iter().enumerate() {
            let field = format!("nics[{i}]");
            let (net, rev) = self
                .network(Scope::Tenant(tenant), &r.network)
                .await
                .map_err(|e| match e {
                    ControlError::NotFound { .. } => NicError::NoSuchNetwork {
                        field: field.clone(),
                        network: r.network.clone(),
                    },
                    other => other.into(),
                })?;
            let (base, prefix) = model::parse_cidr("cidr", &net.cidr).map_err(|e| {
                ControlError::Invariant(format!("stored network {}: {e}", net.name))
            })?;
            let mut used: BTreeSet<Ipv4Addr> =
                list_keyed::<model::VmId>(self.store(), &keys::ipam_prefix(net.id))
                    .await?
                    .into_iter()
                    .filter_map(|(k, _)| k.rsplit('/').next().and_then(|ip| ip.parse().ok()))
                    .collect();
            // Earlier NICs of this same VM on this network.
            used.extend(
                out.nics
                    .iter()
                    .filter(|n| n.network == net.id)
                    .map(|n| n.ip),
            );
            let first = u32::from(base) + 1;
            let last = u32::from(base) + (1u32 << (32 - u32::from(prefix))) - 2;
            let ip = match r.ip {
                Some(ip) => {
                    let n = u32::from(ip);
                    if n < first || n > last {
                        return Err(NicError::NotAHostAddress {
                            field,
                            ip,
                            network: net.name.to_string(),
                            cidr: net.cidr.clone(),
                        });
                    }
                    if used.contains(&ip) {
                        return Err(NicError::InUse {
                            field,
                            ip,
                            network: net.name.to_string(),
                        });
                    }
                    ip
                }
                None => (first..=last)
                    .map(Ipv4Addr::from)
                    .find(|ip| !used.contains(ip))
                    .ok_or_else(|| NicError::Full {
                        field: field.clone(),
                        network: net.name.to_string(),
                        cidr: net.cidr.clone(),
                    })?,
            };
            let nic = Nic {
                name: r
                    .name
                    .as_deref()
                    .map(|n| model::validate_name(&format!("{field}.name"), n))
                    .transpose()?,
                network: net.id,
                network_name: net.name.clone(),
                ip,
                prefix,
                mac: Nic::mac_for(net.id, ip),
            };
            if let Some(twin) = out.nics.iter().position(|n| n.mac == nic.mac) {
                return Err(NicError::Twin { field, ip, twin });
            }
            let ipam_key = keys::ipam(net.id, ip);
            out.compares.push(Compare::ModRevision {
                key: ipam_key.clone(),
                expect: None,
            });
            out.ops.push(TxnOp::Put {
                key: ipam_key,
                value: to_bytes(&vm)?,
            });
            if !out.nics.iter().any(|n| n.network == net.id) {
                out.compares.push(Compare::ModRevision {
                    key: keys::network(net.id),
                    expect: Some(rev),
                });
                out.ops.push(TxnOp::Put {
                    key: keys::network(net.id),
                    value: to_bytes(&net)?,
                });
            }
            out.nics.push(nic);
        }
        Ok(out)
    }
}

/// Why a network cannot be deleted.
#[derive(Debug, thiserror::Error)]
pub enum NetworkDeleteError {
    /// NICs are on it.
    #[error(
        "network {network} has {count} NIC(s) on it (vm {vm} has {ip}); delete those VMs first"
    )]
    InUse {
        /// The network.
        network: Name,
        /// How many NICs.
        count: usize,
        /// One VM with a NIC on it.
        vm: model::VmId,
        /// That NIC's address.
        ip: String,
    },
    /// The store, a lost race, or no such network.
    #[error(transparent)]
    Control(#[from] ControlError),
}

impl Control {
    /// Creates a network of `tenant` (name and CIDR already validated).
    pub async fn create_network(
        &self,
        tenant: TenantId,
        name: Name,
        cidr: String,
    ) -> Result<Network, ControlError> {
        let net = Network {
            id: NetworkId::new_random(),
            tenant,
            name,
            cidr,
            created_at: crate::now_ms(),
        };
        crate::records::insert_named(
            self.store(),
            keys::network(net.id),
            keys::network_name(tenant, &net.name),
            &net,
            &net.id,
            || format!("name: network {} already exists", net.name),
        )
        .await?;
        Ok(net)
    }

    /// The networks `scope` sees, by tenant then name.
    pub async fn networks(&self, scope: Scope) -> Result<Vec<Network>, ControlError> {
        let mut nets: Vec<Network> =
            crate::records::list_json::<Network>(self.store(), keys::NETWORKS)
                .await?
                .into_iter()
                .map(|(n, _)| n)
                .filter(|n| scope.sees(n.tenant))
                .collect();
        nets.sort_by(|a, b| (a.tenant, &a.name).cmp(&(b.tenant, &b.name)));
        Ok(nets)
    }

    /// Deletes a network no NIC is on. The record's revision is compared: a VM create on
    /// this network rewrites the record in its transaction, so a NIC added after the
    /// check makes the delete fail instead of orphaning it.
    pub async fn delete_network(&self, scope: Scope, s: &str) -> Result<(), NetworkDeleteError> {
        let (net, rev) = self.network(scope, s).await?;
        let used = list_keyed::<model::VmId>(self.store(), &keys::ipam_prefix(net.id)).await?;
        if let Some((key, vm)) = used.first() {
            return Err(NetworkDeleteError::InUse {
                network: net.name.clone(),
                count: used.len(),
                vm: *vm,
                ip: key.rsplit('/').next().unwrap_or_default().to_owned(),
            });
        }
        match crate::records::remove_named(
            self.store(),
            keys::network(net.id),
            keys::network_name(net.tenant, &net.name),
            Some(rev),
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(store::StoreError::Conflict { .. }) => Err(ControlError::Contended {
                what: format!("network {}", net.name),
            }
            .into()),
            Err(e) => Err(ControlError::from(e).into()),
        }
    }
}
