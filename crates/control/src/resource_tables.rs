//! Resource tables (docs/SHM.md): the server keeps each table's spec as desired state
//! and the host agent's last report beside it. The table itself lives in the agent (a
//! grant is an ioctl on a local userfaultfd): nothing here waits on the agent.

use model::resource_tables::{ResourceTable, ResourceTableReport, ValidTableSpec};
use model::{Name, ResourceTableId, TenantId};
use store::{Compare, StoreError, TxnOp};

use crate::records::{get_json, keys, list_json, now_ms, to_bytes};
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
    /// No such host, name taken, or the store failed.
    #[error(transparent)]
    Control(#[from] ControlError),
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

    /// Deletes a table: its spec, name and last report. The agent hears of it and
    /// stops serving the table (its devices see the element gone).
    pub async fn delete_resource_table(
        &self,
        scope: Scope,
        host: &Name,
        name_or_id: &str,
    ) -> Result<(), ControlError> {
        let t = self.resource_table(scope, host, name_or_id).await?;
        self.store()
            .txn(
                Vec::new(),
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
            .await?;
        tracing::info!(host = %host, table = %t.name, id = %t.id, "resource table deleted");
        Ok(())
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
