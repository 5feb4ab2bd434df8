//! The store's key layout and JSON (de)serialization of records: the one place that
//! knows where each record lives.
//!
//! Records live under their id; names are unique through a separate index
//! key written in the same transaction, so that two concurrent creates of
//! one name cannot both succeed (the index key's compare fails for one).

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use store::{KeyValue, Revision, Store};

use crate::{ControlError, Scope};

/// Store keys. Every name in a key has passed `validate_name`, so it has no `/`.
// A prefix or key function is named for the record it holds; the ones with a rule
// beyond that say it.
#[allow(missing_docs)]
pub mod keys {
    use model::{ImageId, MaintenanceId, MigrationId, Name, NetworkId, TenantId, TokenId, VmId};

    /// Every record. The push hub watches it whole (one watch per server) and keeps
    /// what concerns the agents: [`VMS`] and [`MIGRATIONS`].
    pub const ROOT: &str = "/vinfra/";
    /// A vSwitch controller's persisted counters, per domain and server (each server of a
    /// domain runs its own controller); both names hex-encoded (they are free text).
    pub fn traffic(domain: &str, server: &str) -> String {
        format!(
            "{TRAFFIC}{}/{}",
            model::hex(domain.as_bytes()),
            model::hex(server.as_bytes())
        )
    }
    /// Prefix of [`traffic`].
    pub const TRAFFIC: &str = "/vinfra/traffic/";
    pub const TOKENS: &str = "/vinfra/tokens/";
    pub const TENANTS: &str = "/vinfra/tenants/";
    pub const HOSTS: &str = "/vinfra/hosts/";
    pub const IMAGES: &str = "/vinfra/images/";
    pub const IMAGE_NAMES: &str = "/vinfra/image-names/";
    pub const VMS: &str = "/vinfra/vms/";
    pub const VM_NAMES: &str = "/vinfra/vm-names/";
    pub const MIGRATIONS: &str = "/vinfra/migrations/";
    pub const MAINTENANCE: &str = "/vinfra/maintenance/";
    /// A VNF or NS descriptor of a tenant, by descriptor id.
    pub fn descriptor(kind: &str, tenant: TenantId, id: &str) -> String {
        // Descriptor ids are free text in SOL001: hex-encode so no `/` reaches the key.
        let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
        format!("/vinfra/{kind}s/{tenant}/{hex}")
    }
    pub fn descriptors(kind: &str) -> String {
        format!("/vinfra/{kind}s/")
    }
    pub const BLOBS: &str = "/vinfra/blobs/";
    /// Who may use an image-store file: one key per owner (a tenant id, or
    /// `shared` for an admin's upload, usable by every tenant).
    pub fn blob(digest: &model::BlobDigest, owner: Option<TenantId>) -> String {
        match owner {
            Some(t) => format!("{BLOBS}{}/{t}", digest.hex()),
            None => format!("{BLOBS}{}/shared", digest.hex()),
        }
    }
    pub fn blob_prefix(digest: &model::BlobDigest) -> String {
        format!("{BLOBS}{}/", digest.hex())
    }
    /// The operator's storage inventory (one document).
    pub const STORAGE: &str = "/vinfra/storage";

    /// A token record, under the hex SHA-256 of the token.
    pub fn token(hash: &str) -> String {
        format!("{TOKENS}{hash}")
    }
    /// Token id index: value is the token's hash (JSON string), so that a
    /// revocation by id finds the record without scanning. Written in the
    /// token's own transaction.
    pub fn token_id(id: TokenId) -> String {
        format!("/vinfra/token-ids/{id}")
    }
    /// Marks a revoked admin token's hash, so that a server restarting with the
    /// token still in its `admin-token` file does not bring it back.
    pub fn token_revoked(hash: &str) -> String {
        format!("/vinfra/token-revoked/{hash}")
    }
    pub fn tenant(id: TenantId) -> String {
        format!("{TENANTS}{id}")
    }
    /// A one-time join token, under the SHA-256 hex of its secret.
    pub fn join_token(hash: &str) -> String {
        format!("/vinfra/join-tokens/{hash}")
    }
    /// Tenant name index: value is the tenant id (JSON).
    pub fn tenant_name(name: &Name) -> String {
        format!("/vinfra/tenant-names/{name}")
    }
    pub fn host(name: &Name) -> String {
        format!("{HOSTS}{name}")
    }
    /// Bumped by every reservation on the host (see `ledger`): the reserving write
    /// compares its revision, so two concurrent ones cannot both take the last room.
    pub fn host_alloc(name: &Name) -> String {
        format!("{HOST_ALLOC}{name}")
    }
    pub const HOST_ALLOC: &str = "/vinfra/host-alloc/";
    /// The same for a storage resource (names from the operator's inventory, which
    /// may hold any character: hex-encoded).
    pub fn storage_alloc(name: &str) -> String {
        let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{STORAGE_ALLOC}{hex}")
    }
    pub const STORAGE_ALLOC: &str = "/vinfra/storage-alloc/";
    pub fn image(id: ImageId) -> String {
        format!("{IMAGES}{id}")
    }
    /// Image name index, per scope (`public` or a tenant id): value is the image id.
    pub fn image_name(tenant: Option<TenantId>, name: &Name) -> String {
        match tenant {
            Some(t) => format!("{IMAGE_NAMES}{t}/{name}"),
            None => format!("{IMAGE_NAMES}public/{name}"),
        }
    }
    pub fn vm(id: VmId) -> String {
        format!("{VMS}{id}")
    }
    pub fn maintenance(id: MaintenanceId) -> String {
        format!("{MAINTENANCE}{id}")
    }
    pub fn migration(id: MigrationId) -> String {
        format!("{MIGRATIONS}{id}")
    }
    /// VM name index, per tenant: value is the VM id.
    pub fn vm_name(tenant: TenantId, name: &Name) -> String {
        format!("{VM_NAMES}{tenant}/{name}")
    }
    pub const NS_INSTANCES: &str = "/vinfra/ns-instances/";
    pub const NS_NAMES: &str = "/vinfra/ns-names/";
    /// NS instance name index, per tenant: value is the instance id.
    pub fn ns_name(tenant: TenantId, name: &Name) -> String {
        format!("{NS_NAMES}{tenant}/{name}")
    }
    /// Network slice instances, by id.
    pub const NSIS: &str = "/vinfra/nsis/";
    /// NSI name index, per tenant (`{NSI_NAMES}{tenant}/{name}`): value is the id.
    pub const NSI_NAMES: &str = "/vinfra/nsi-names/";
    /// Per NSI: its measured load series (the forecaster's input).
    pub const SLICE_SERIES: &str = "/vinfra/slice-series/";
    /// Client associations with NSIs, by id.
    pub const SLICE_ASSOCIATIONS: &str = "/vinfra/slice-associations/";
    /// The slice ledger: a transparency log (crates/translog) under this prefix.
    pub const SLICE_LEDGER: &str = "/vinfra/translog/slices/";
    /// Per server (hex-encoded id, free text): the CPU time its agents last reported
    /// per VM, published for the slice sampler of whichever server leads.
    pub const SLICE_CPU: &str = "/vinfra/slice-cpu/";
    pub const NETWORKS: &str = "/vinfra/networks/";
    pub const NETWORK_NAMES: &str = "/vinfra/network-names/";
    pub fn network(id: NetworkId) -> String {
        format!("{NETWORKS}{id}")
    }
    /// Network name index, per tenant: value is the network id.
    pub fn network_name(tenant: TenantId, name: &Name) -> String {
        format!("{NETWORK_NAMES}{tenant}/{name}")
    }
    /// IPAM: one key per address in use on a network; value is the VM id. Created in
    /// the VM's create transaction (compare: absent), so two VMs never get one address.
    pub fn ipam(net: NetworkId, ip: std::net::Ipv4Addr) -> String {
        format!("/vinfra/ipam/{net}/{ip}")
    }
    pub fn ipam_prefix(net: NetworkId) -> String {
        format!("/vinfra/ipam/{net}/")
    }
    /// Resource table specs, per host (`{RESOURCE_TABLES}{host}/{id}`). The push hub
    /// tells a host's agent when one of its own changes.
    pub const RESOURCE_TABLES: &str = "/vinfra/resource-tables/";
    pub fn resource_tables(host: &Name) -> String {
        format!("{RESOURCE_TABLES}{host}/")
    }
    pub fn resource_table(host: &Name, id: model::ResourceTableId) -> String {
        format!("{RESOURCE_TABLES}{host}/{id}")
    }
    /// How many tables the host keeps, rewritten by every create: its revision is
    /// what concurrent creates compare, so the per-host limit holds (not under
    /// the `RESOURCE_TABLES` prefix: the hub does not wake for it).
    pub fn resource_table_count(host: &Name) -> String {
        format!("/vinfra/resource-table-count/{host}")
    }
    /// Resource table name index, per host and tenant: value is the table id. A VM
    /// create naming the table rewrites it (same value), so that its revision tells a
    /// table delete that a VM came to use the table.
    pub fn resource_table_name_prefix() -> String {
        "/vinfra/resource-table-names/".to_owned()
    }
    /// One entry of that index.
    pub fn resource_table_name(host: &Name, tenant: TenantId, name: &Name) -> String {
        format!("{}{host}/{tenant}/{name}", resource_table_name_prefix())
    }
    /// The agent's last report of a table, apart from the spec so that reports never
    /// race with (or wake the hub for) the spec.
    pub fn resource_table_state(id: model::ResourceTableId) -> String {
        format!("/vinfra/resource-table-state/{id}")
    }
}

/// Encodes a record.
pub fn to_bytes<T: Serialize>(value: &T) -> Result<Bytes, ControlError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(ControlError::Encode)
}

pub(crate) fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, ControlError> {
    serde_json::from_slice(&kv.value).map_err(|source| ControlError::Decode {
        key: kv.key.clone(),
        source,
    })
}

/// Reads and decodes one record with its revision.
pub async fn get_json<T: DeserializeOwned>(
    store: &dyn Store,
    key: &str,
) -> Result<Option<(T, Revision)>, ControlError> {
    match store.get(key).await? {
        Some(kv) => Ok(Some((decode(&kv)?, kv.mod_revision))),
        None => Ok(None),
    }
}

/// Reads and decodes every record under `prefix`, in key order.
pub async fn list_json<T: DeserializeOwned>(
    store: &dyn Store,
    prefix: &str,
) -> Result<Vec<(T, Revision)>, ControlError> {
    store
        .list(prefix)
        .await?
        .iter()
        .map(|kv| Ok((decode(kv)?, kv.mod_revision)))
        .collect()
}

/// Reads and decodes every record under `prefix` with its key, in key order.
pub async fn list_keyed<T: DeserializeOwned>(
    store: &dyn Store,
    prefix: &str,
) -> Result<Vec<(String, T)>, ControlError> {
    store
        .list(prefix)
        .await?
        .iter()
        .map(|kv| Ok((kv.key.clone(), decode(kv)?)))
        .collect()
}

/// Finds a tenant-owned record by id or by name as `scope` sees it. Names are indexed
/// under `{names}{tenant}/{name}`; an admin naming a name several tenants use gets 409.
/// Another tenant's record is 404, like a missing one.
pub async fn resolve_named<I, T>(
    store: &dyn Store,
    scope: Scope,
    s: &str,
    kind: &'static str,
    names: &str,
    record_key: impl Fn(I) -> String,
    tenant_of: impl Fn(&T) -> model::TenantId,
) -> Result<(T, Revision), ControlError>
where
    I: std::str::FromStr + DeserializeOwned,
    T: DeserializeOwned,
{
    let not_found = || ControlError::NotFound {
        kind,
        id: s.to_owned(),
    };
    let id = match s.parse::<I>() {
        Ok(id) => id,
        Err(_) => {
            let name = model::validate_name(kind, s).map_err(|_| not_found())?;
            let mut ids: Vec<I> = match scope {
                Scope::Tenant(t) => get_json::<I>(store, &format!("{names}{t}/{name}"))
                    .await?
                    .map(|(id, _)| id)
                    .into_iter()
                    .collect(),
                Scope::All => {
                    // Names hold no `/`, so the suffix matches whole names only.
                    let suffix = format!("/{name}");
                    list_keyed::<I>(store, names)
                        .await?
                        .into_iter()
                        .filter(|(key, _)| key.ends_with(&suffix))
                        .map(|(_, id)| id)
                        .collect()
                }
            };
            match ids.len() {
                0 => return Err(not_found()),
                1 => ids.remove(0),
                tenants => {
                    return Err(ControlError::AmbiguousName {
                        kind,
                        name: name.to_string(),
                        tenants,
                    })
                }
            }
        }
    };
    match get_json::<T>(store, &record_key(id)).await? {
        Some((rec, rev)) if scope.sees(tenant_of(&rec)) => Ok((rec, rev)),
        _ => Err(not_found()),
    }
}

/// Creates a record under `key` with its name index `name_key` (value: `id`) in one
/// transaction that requires the name to be free. Taken: [`ControlError::Taken`] with
/// `taken`'s message.
pub async fn insert_named<T: Serialize, I: Serialize>(
    store: &dyn Store,
    key: String,
    name_key: String,
    record: &T,
    id: &I,
    taken: impl FnOnce() -> String,
) -> Result<(), ControlError> {
    let res = store
        .txn(
            vec![store::Compare::ModRevision {
                key: name_key.clone(),
                expect: None,
            }],
            vec![
                store::TxnOp::Put {
                    key,
                    value: to_bytes(record)?,
                },
                store::TxnOp::Put {
                    key: name_key,
                    value: to_bytes(id)?,
                },
            ],
        )
        .await;
    match res {
        Ok(_) => Ok(()),
        Err(store::StoreError::Conflict { .. }) => Err(ControlError::Taken(taken())),
        Err(e) => Err(e.into()),
    }
}

/// Deletes a record and its name index, if the record is still at `rev` (when given).
pub async fn remove_named(
    store: &dyn Store,
    key: String,
    name_key: String,
    rev: Option<Revision>,
) -> Result<Revision, store::StoreError> {
    let compares = rev
        .map(|r| store::Compare::ModRevision {
            key: key.clone(),
            expect: Some(r),
        })
        .into_iter()
        .collect();
    store
        .txn(
            compares,
            vec![
                store::TxnOp::Delete { key },
                store::TxnOp::Delete { key: name_key },
            ],
        )
        .await
}

/// Wall-clock time in unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How many times a read-modify-write is retried after losing a race.
pub const CAS_ATTEMPTS: usize = 16;

/// Read-modify-write of one record: reads `key`, lets `change` edit it (or refuse with
/// its own error), writes it back if nobody wrote in between, and retries from the read
/// when somebody did. `what` names the record in the error after [`CAS_ATTEMPTS`] lost
/// races. A missing record is `missing()`.
pub async fn update_cas<T, E>(
    store: &dyn Store,
    key: &str,
    what: impl Fn() -> String,
    missing: impl Fn() -> E,
    mut change: impl FnMut(&mut T) -> Result<(), E>,
) -> Result<T, E>
where
    T: Serialize + DeserializeOwned,
    E: From<ControlError>,
{
    for _ in 0..CAS_ATTEMPTS {
        let Some((mut rec, rev)) = get_json::<T>(store, key).await? else {
            return Err(missing());
        };
        change(&mut rec)?;
        match store.cas(key, Some(rev), to_bytes(&rec)?).await {
            Ok(_) => return Ok(rec),
            Err(store::StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(ControlError::from(e).into()),
        }
    }
    Err(ControlError::Contended { what: what() }.into())
}
