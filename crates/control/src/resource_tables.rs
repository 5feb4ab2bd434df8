//! Resource tables (docs/SHM.md): the server keeps each table's spec as desired state
//! and the host agent's last report beside it. The table itself lives in the agent (a
//! grant is an ioctl on a local userfaultfd): nothing here waits on the agent.

use model::resource_tables::{ResourceTable, ResourceTableReport, ValidTableSpec};
use model::{Host, Name, ResourceTableId, TenantId, Vm};
use store::{Compare, KeyValue, StoreError, TxnOp};

use crate::records::{get_json, keys, list_json, now_ms, to_bytes, CAS_ATTEMPTS};
use crate::vms::CreateVmError;
use crate::{Control, ControlError, Scope};

/// Why a table cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum ResourceTableError {
    /// The host keeps as many tables as it may.
    #[error("host {host} already keeps {limit} resource tables, the limit")]
    TooMany {
        /// The host.
        host: Name,
        /// [`model::resource_tables::MAX_TABLES_PER_HOST`].
        limit: usize,
    },
    /// VMs name the table in their `resource_tables`: it stays until they are gone.
    #[error("resource table {table} on host {host} is mapped by vm {}: delete {} first", .vms.join(", "), if .vms.len() == 1 { "it" } else { "them" })]
    InUse {
        /// The table.
        table: Name,
        /// Its host.
        host: Name,
        /// The VMs naming it (sorted).
        vms: Vec<String>,
    },
    /// No such host, name taken, or the store failed.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// Where a VM with resource tables must go: the one host that keeps all of them, and
/// their name keys as read. A VM create compares those keys and writes them again in
/// its transaction, and a table delete compares its name key in its own: so a delete
/// that did not see a new VM naming its table, or a create that did not see the
/// table's delete, does not commit.
#[derive(Debug)]
pub(crate) struct TablePin {
    /// The host.
    pub(crate) host: Name,
    keys: Vec<KeyValue>,
}

impl TablePin {
    /// The compares and writes that hold the tables for the create's transaction.
    pub(crate) fn txn(self) -> (Vec<Compare>, Vec<TxnOp>) {
        self.keys
            .into_iter()
            .map(|kv| {
                (
                    Compare::ModRevision {
                        key: kv.key.clone(),
                        expect: Some(kv.mod_revision),
                    },
                    TxnOp::Put {
                        key: kv.key,
                        value: kv.value,
                    },
                )
            })
            .unzip()
    }
}

/// Creates on one host retried after losing the count race (each retry means
/// another create committed, so this bounds a burst, not a livelock).
const CREATE_ATTEMPTS: usize = 128;

impl Control {
    /// Creates a table on `host` for `tenant`; the host's agent hears of it on its
    /// event stream and creates it.
    pub async fn create_resource_table(
        &self,
        tenant: TenantId,
        host: &Name,
        spec: ValidTableSpec,
    ) -> Result<ResourceTable, ResourceTableError> {
        self.require_host(host).await?;
        let table = ResourceTable {
            id: ResourceTableId::new_random(),
            tenant,
            host: host.clone(),
            name: spec.name,
            entries: spec.entries,
            entry_size: spec.entry_size,
            max_grant_ms: spec.max_grant_ms,
            created_at: now_ms(),
            state: None,
        };
        let name_key = keys::resource_table_name(host, tenant, &table.name);
        let count_key = keys::resource_table_count(host);
        let limit = model::resource_tables::MAX_TABLES_PER_HOST;
        // The count is checked inside the create transaction: every create rewrites
        // the host's count key and compares its revision with the one read before
        // counting, so of two creates that counted the same tables only one commits;
        // the other counts again. (A delete does not touch the key: it only lowers
        // the count, so a create that raced with one is at worst refused early.)
        for _ in 0..CREATE_ATTEMPTS {
            let guard = self
                .store()
                .get(&count_key)
                .await
                .map_err(ControlError::from)?
                .map(|kv| kv.mod_revision);
            let existing = self
                .store()
                .list(&keys::resource_tables(host))
                .await
                .map_err(ControlError::from)?
                .len();
            if existing >= limit {
                return Err(ResourceTableError::TooMany {
                    host: host.clone(),
                    limit,
                });
            }
            let r = self
                .store()
                .txn(
                    vec![
                        Compare::ModRevision {
                            key: name_key.clone(),
                            expect: None,
                        },
                        Compare::ModRevision {
                            key: count_key.clone(),
                            expect: guard,
                        },
                    ],
                    vec![
                        TxnOp::Put {
                            key: count_key.clone(),
                            value: to_bytes(&(existing + 1))?,
                        },
                        TxnOp::Put {
                            key: name_key.clone(),
                            value: to_bytes(&table.id)?,
                        },
                        TxnOp::Put {
                            key: keys::resource_table(host, table.id),
                            value: to_bytes(&table)?,
                        },
                    ],
                )
                .await;
            match r {
                Ok(_) => {
                    tracing::info!(host = %host, table = %table.name, id = %table.id, "resource table created");
                    return Ok(table);
                }
                // Another create on the host committed since we counted: count again.
                Err(StoreError::Conflict { key }) if key == count_key => continue,
                Err(StoreError::Conflict { .. }) => {
                    return Err(ControlError::Taken(format!(
                        "resource table {} already exists on host {host}",
                        table.name
                    ))
                    .into())
                }
                Err(e) => return Err(ControlError::from(e).into()),
            }
        }
        Err(ControlError::from(StoreError::Conflict { key: count_key }).into())
    }

    /// The tables on `host` that `scope` sees, each with its agent's last report.
    pub async fn resource_tables(
        &self,
        scope: Scope,
        host: &Name,
    ) -> Result<Vec<ResourceTable>, ControlError> {
        let mut out = Vec::new();
        for (mut t, _) in
            list_json::<ResourceTable>(self.store(), &keys::resource_tables(host)).await?
        {
            if !scope.sees(t.tenant) {
                continue;
            }
            t.state =
                get_json::<ResourceTableReport>(self.store(), &keys::resource_table_state(t.id))
                    .await?
                    .map(|(r, _)| r);
            out.push(t);
        }
        out.sort_by(|a, b| (a.tenant, &a.name).cmp(&(b.tenant, &b.name)));
        Ok(out)
    }

    /// One table on `host`, by name or id, as `scope` sees it.
    pub async fn resource_table(
        &self,
        scope: Scope,
        host: &Name,
        name_or_id: &str,
    ) -> Result<ResourceTable, ControlError> {
        let by_id = name_or_id.parse::<ResourceTableId>().ok();
        let mut found: Vec<ResourceTable> = self
            .resource_tables(scope, host)
            .await?
            .into_iter()
            .filter(|t| by_id == Some(t.id) || t.name.as_str() == name_or_id)
            .collect();
        match found.len() {
            0 => Err(ControlError::NotFound {
                kind: "resource table",
                id: format!("{name_or_id} on host {host}"),
            }),
            1 => Ok(found.remove(0)),
            tenants => Err(ControlError::AmbiguousName {
                kind: "resource table",
                name: name_or_id.to_owned(),
                tenants,
            }),
        }
    }

    /// Where a VM of `tenant` naming `tables` goes: `None` without tables (or with
    /// `host` naming no host: placement refuses that); otherwise the one host among
    /// `hosts` (only `host`, when given) where the tenant has every table. Other
    /// tenants' tables are not looked at: a name another tenant uses on a host is,
    /// for this tenant, no table there.
    pub(crate) async fn pin_to_tables(
        &self,
        tenant: TenantId,
        tables: &[Name],
        host: Option<&Name>,
        hosts: &[Host],
    ) -> Result<Option<TablePin>, CreateVmError> {
        if tables.is_empty() || host.is_some_and(|h| !hosts.iter().any(|x| x.name == *h)) {
            return Ok(None);
        }
        let prefix = keys::resource_table_name_prefix();
        let names = self
            .store()
            .list(&prefix)
            .await
            .map_err(ControlError::from)?;
        let tenant_s = tenant.to_string();
        // For each table asked for, the hosts where the tenant has it, with its key.
        let mut found: Vec<Vec<(Name, KeyValue)>> = vec![Vec::new(); tables.len()];
        for kv in names {
            let Some(rest) = kv.key.strip_prefix(&prefix) else {
                continue;
            };
            let mut parts = rest.splitn(3, '/');
            let (Some(h), Some(t), Some(n)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            if t != tenant_s || host.is_some_and(|want| want.as_str() != h) {
                continue;
            }
            let Some(i) = tables.iter().position(|x| x.as_str() == n) else {
                continue;
            };
            let Ok(h) = model::validate_name("host", h) else {
                continue;
            };
            found[i].push((h, kv));
        }
        let place = |h: Option<&Name>| match h {
            Some(h) => format!("on host {h}"),
            None => "on any host".to_owned(),
        };
        if let Some(i) = found.iter().position(Vec::is_empty) {
            return Err(CreateVmError::Tables(format!(
                "no resource table {} {}",
                tables[i],
                place(host)
            )));
        }
        // The hosts that keep every table.
        let mut common: Vec<Name> = found[0].iter().map(|(h, _)| h.clone()).collect();
        common.retain(|h| found.iter().all(|f| f.iter().any(|(x, _)| x == h)));
        common.sort();
        let pinned = match common.as_slice() {
            [one] => one.clone(),
            [] => {
                let wheres: Vec<String> = tables
                    .iter()
                    .zip(&found)
                    .map(|(t, f)| {
                        let mut hs: Vec<&str> = f.iter().map(|(h, _)| h.as_str()).collect();
                        hs.sort_unstable();
                        format!("{t} on {}", hs.join(", "))
                    })
                    .collect();
                return Err(CreateVmError::Tables(format!(
                    "a VM maps tables of its own host only, and no host keeps them all ({})",
                    wheres.join("; ")
                )));
            }
            many => {
                let hs: Vec<&str> = many.iter().map(Name::as_str).collect();
                return Err(CreateVmError::Tables(format!(
                    "hosts {} each keep resource tables of these names: give host",
                    hs.join(", ")
                )));
            }
        };
        let keys = found
            .into_iter()
            .filter_map(|f| f.into_iter().find(|(h, _)| *h == pinned).map(|(_, kv)| kv))
            .collect();
        Ok(Some(TablePin { host: pinned, keys }))
    }

    /// The names of `tenant`'s VMs on `host` that name table `table`, sorted.
    async fn vms_naming(
        &self,
        tenant: TenantId,
        host: &Name,
        table: &Name,
    ) -> Result<Vec<String>, ControlError> {
        let mut out: Vec<String> = list_json::<Vm>(self.store(), keys::VMS)
            .await?
            .into_iter()
            .filter(|(v, _)| {
                v.tenant == tenant && v.host == *host && v.resource_tables.contains(table)
            })
            .map(|(v, _)| v.name.to_string())
            .collect();
        out.sort();
        Ok(out)
    }

    /// Deletes a table: its spec, name and last report. The agent hears of it and
    /// stops serving the table (its devices see the element gone). Refused while a VM
    /// names it ([`ResourceTableError::InUse`]): the VM would lose its table under it,
    /// and its next start would fail.
    pub async fn delete_resource_table(
        &self,
        scope: Scope,
        host: &Name,
        name_or_id: &str,
    ) -> Result<(), ResourceTableError> {
        for _ in 0..CAS_ATTEMPTS {
            let t = self.resource_table(scope, host, name_or_id).await?;
            if self.try_delete_resource_table(host, &t).await? {
                tracing::info!(host = %host, table = %t.name, id = %t.id, "resource table deleted");
                return Ok(());
            }
        }
        Err(ControlError::Contended {
            what: format!("resource table {name_or_id} on host {host}"),
        }
        .into())
    }

    /// One attempt: `false` when a VM create touched the table meanwhile.
    async fn try_delete_resource_table(
        &self,
        host: &Name,
        t: &ResourceTable,
    ) -> Result<bool, ResourceTableError> {
        let name_key = keys::resource_table_name(host, t.tenant, &t.name);
        let Some(kv) = self
            .store()
            .get(&name_key)
            .await
            .map_err(ControlError::from)?
        else {
            return Ok(false);
        };
        let vms = self.vms_naming(t.tenant, host, &t.name).await?;
        if !vms.is_empty() {
            return Err(ResourceTableError::InUse {
                table: t.name.clone(),
                host: host.clone(),
                vms,
            });
        }
        let r = self
            .store()
            .txn(
                vec![Compare::ModRevision {
                    key: name_key,
                    expect: Some(kv.mod_revision),
                }],
                vec![
                    TxnOp::Delete {
                        key: keys::resource_table(host, t.id),
                    },
                    TxnOp::Delete {
                        key: keys::resource_table_name(host, t.tenant, &t.name),
                    },
                    TxnOp::Delete {
                        key: keys::resource_table_state(t.id),
                    },
                ],
            )
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(ControlError::from(e).into()),
        }
    }

    /// Stores the report of `host`'s agent on table `id` (stamped now). A table that is
    /// not (or no longer) on that host is `NotFound`: the agent then drops it.
    pub async fn report_resource_table(
        &self,
        host: &Name,
        id: ResourceTableId,
        mut report: ResourceTableReport,
    ) -> Result<(), ControlError> {
        let spec = keys::resource_table(host, id);
        let Some(kv) = self.store().get(&spec).await? else {
            return Err(ControlError::NotFound {
                kind: "resource table",
                id: format!("{id} on host {host}"),
            });
        };
        report.reported_at = now_ms();
        // Only while the spec is unchanged: a report racing a delete must not outlive it.
        match self
            .store()
            .txn(
                vec![Compare::ModRevision {
                    key: spec,
                    expect: Some(kv.mod_revision),
                }],
                vec![TxnOp::Put {
                    key: keys::resource_table_state(id),
                    value: to_bytes(&report)?,
                }],
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::Conflict { .. }) => Err(ControlError::NotFound {
                kind: "resource table",
                id: format!("{id} on host {host}"),
            }),
            Err(e) => Err(e.into()),
        }
    }
}
