//! Resource tables (`/v1/hosts/{name}/resource-tables`): a table of fixed-size entries
//! kept by a host's agent, which every device on that host (a process connected to the
//! table's Unix socket) maps read-only and of which one entry at a time is made
//! writable for one device (`crates/shm`, docs/SHM.md).
//!
//! The server stores the *spec* ([`ResourceTable`] without `state`) as desired state;
//! the host's agent creates the table, serves its devices and reports
//! [`ResourceTableReport`]s back, which the server keeps beside the spec and serves
//! as the table's `state`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{validate_name, validate_range, Name, ResourceTableId, TenantId, ValidationError};

/// Most entries a table made through the API may have.
pub const MAX_TABLE_ENTRIES: u32 = 65_536;
/// Largest entry payload through the API, bytes.
pub const MAX_TABLE_ENTRY_SIZE: u32 = 65_536;
/// Largest table through the API: every entry occupies whole 4 KiB pages (write
/// protection is per page) plus an 8-byte sequence word, so this bounds
/// `entries × pages per entry × 4 KiB`.
pub const MAX_TABLE_BYTES: u64 = 1 << 30;
/// Longest grant a table may allow, ms.
pub const MAX_GRANT_MS: u64 = 60_000;
/// The grant limit when the spec gives none, ms.
pub const DEFAULT_MAX_GRANT_MS: u64 = 10_000;
/// Resource tables one host keeps, over all tenants.
pub const MAX_TABLES_PER_HOST: usize = 64;
/// Audit records one report carries (the most recent ones).
pub const MAX_REPORTED_AUDIT: usize = 256;
/// Entry versions one report carries (the lowest written entries).
pub const MAX_REPORTED_ENTRIES: usize = 1024;
/// Devices and grants one report carries.
pub const MAX_REPORTED_DEVICES: usize = 1024;

/// The page size the size limit is computed with (x86-64, aarch64 with 4 KiB pages).
const PAGE: u64 = 4096;

/// Bytes a table of this shape takes on the host.
pub fn table_bytes(entries: u32, entry_size: u32) -> u64 {
    (8 + u64::from(entry_size)).div_ceil(PAGE) * PAGE * u64::from(entries)
}

/// `POST /v1/hosts/{name}/resource-tables`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "flows", "entries": 1024, "entry_size": 248}))]
pub struct CreateResourceTable {
    /// Name, unique among the tenant's tables on the host.
    pub name: String,
    /// Number of entries, 1..=65536.
    pub entries: u32,
    /// Payload bytes per entry: a multiple of 8, 8..=65536.
    pub entry_size: u32,
    /// Longest a grant lasts before the agent revokes it, ms (1..=60000, default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grant_ms: Option<u64>,
    /// Admin only: the owning tenant (default: `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// A [`CreateResourceTable`] whose every field was checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidTableSpec {
    /// Name.
    pub name: Name,
    /// Entries.
    pub entries: u32,
    /// Payload bytes per entry.
    pub entry_size: u32,
    /// Grant limit, ms.
    pub max_grant_ms: u64,
    /// The tenant asked for (admins).
    pub tenant: Option<Name>,
}

impl CreateResourceTable {
    /// Checks every field, naming the limit that is broken.
    pub fn validate(&self) -> Result<ValidTableSpec, ValidationError> {
        let name = validate_name("name", &self.name)?;
        let entries = validate_range("entries", self.entries, 1, MAX_TABLE_ENTRIES)?;
        let entry_size = validate_range("entry_size", self.entry_size, 8, MAX_TABLE_ENTRY_SIZE)?;
        if !entry_size.is_multiple_of(8) {
            return Err(ValidationError::new(
                "entry_size",
                format!("must be a multiple of 8, got {entry_size}"),
            ));
        }
        let bytes = table_bytes(entries, entry_size);
        if bytes > MAX_TABLE_BYTES {
            return Err(ValidationError::new(
                "entries",
                format!(
                    "{entries} entries of {entry_size} bytes take {bytes} bytes (each entry \
                     occupies whole 4 KiB pages), over the limit of {MAX_TABLE_BYTES} bytes"
                ),
            ));
        }
        let max_grant_ms = validate_range(
            "max_grant_ms",
            self.max_grant_ms.unwrap_or(DEFAULT_MAX_GRANT_MS),
            1,
            MAX_GRANT_MS,
        )?;
        let tenant = self
            .tenant
            .as_deref()
            .map(|t| validate_name("tenant", t))
            .transpose()?;
        Ok(ValidTableSpec {
            name,
            entries,
            entry_size,
            max_grant_ms,
            tenant,
        })
    }
}

/// A resource table on a host: its spec, and what the host's agent last reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ResourceTable {
    /// Stable id (the agent's directory and socket are named by it).
    pub id: ResourceTableId,
    /// Owning tenant.
    pub tenant: TenantId,
    /// The host whose agent keeps it.
    pub host: Name,
    /// Name, unique among the tenant's tables on the host.
    pub name: Name,
    /// Number of entries.
    pub entries: u32,
    /// Payload bytes per entry.
    pub entry_size: u32,
    /// Longest a grant lasts, ms.
    pub max_grant_ms: u64,
    /// Creation time, unix ms.
    pub created_at: u64,
    /// The agent's last report; absent until the agent has created the table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ResourceTableReport>,
}

/// `PUT /v1/hosts/{name}/resource-tables/{table}/report`: what the host's agent has
/// for one table (the server stamps `reported_at`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceTableReport {
    /// The Unix socket devices connect to, on the host.
    pub socket: String,
    /// Why the agent cannot serve the table (then the rest is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Attached devices.
    #[serde(default)]
    pub devices: Vec<TableDevice>,
    /// Current grants: each entry written by at most one device.
    #[serde(default)]
    pub grants: Vec<TableGrant>,
    /// Versions of the entries written so far (version > 0), lowest entries first, at
    /// most 1,024; `written_entries` counts them all.
    #[serde(default)]
    pub versions: Vec<EntryVersion>,
    /// How many entries have been written at all.
    #[serde(default)]
    pub written_entries: u32,
    /// The most recent audit records (at most 256), oldest first.
    #[serde(default)]
    pub audit: Vec<TableAuditRecord>,
    /// Counts since the agent created the table (this agent process).
    #[serde(default)]
    pub totals: TableTotals,
    /// When the server stored this report, unix ms (set by the server).
    #[serde(default)]
    pub reported_at: u64,
}

impl ResourceTableReport {
    /// Checks the list lengths against the report limits.
    pub fn validate(&self) -> Result<(), ValidationError> {
        for (field, len, max) in [
            ("devices", self.devices.len(), MAX_REPORTED_DEVICES),
            ("grants", self.grants.len(), MAX_REPORTED_DEVICES),
            ("versions", self.versions.len(), MAX_REPORTED_ENTRIES),
            ("audit", self.audit.len(), MAX_REPORTED_AUDIT),
        ] {
            if len > max {
                return Err(ValidationError::new(
                    field,
                    format!("at most {max} items, got {len}"),
                ));
            }
        }
        if self.socket.len() > 4096 {
            return Err(ValidationError::new("socket", "must be at most 4096 bytes"));
        }
        if self
            .devices
            .iter()
            .any(|d| d.vm.as_ref().is_some_and(|v| v.len() > 256))
        {
            return Err(ValidationError::new(
                "devices",
                "a device's vm must be at most 256 bytes",
            ));
        }
        if self.error.as_ref().is_some_and(|e| e.len() > 4096) {
            return Err(ValidationError::new("error", "must be at most 4096 bytes"));
        }
        Ok(())
    }
}

/// A device attached to a table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TableDevice {
    /// Its id at the agent (1, 2, …; never reused while the agent runs).
    pub id: u32,
    /// Its process id on the host.
    pub pid: i32,
    /// Entries it may write now.
    pub grants: u32,
    /// For a VM (its window on the table, docs/SHM.md): the VM's name; absent for
    /// a process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
}

/// A current grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TableGrant {
    /// The entry.
    pub entry: u32,
    /// The one device that may write it.
    pub device: u32,
    /// The entry's version when granted.
    pub version: u64,
    /// When granted, unix ms.
    pub granted_at: u64,
    /// Time left before the agent revokes it, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_ms: Option<u64>,
}

/// One entry's version (even; 0: never written).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EntryVersion {
    /// The entry.
    pub entry: u32,
    /// Its version.
    pub version: u64,
}

/// What an audit record says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TableAuditKind {
    /// A device attached.
    Attached,
    /// A device went away (`reason`).
    Detached,
    /// Write access to the entry granted to the device.
    Granted,
    /// Write access taken back (`reason`: released, timeout, element, device_gone).
    Revoked,
    /// A request for the entry refused: another device (`holder`) holds it.
    Refused,
    /// A store into the entry without a grant, refused by the kernel (SIGBUS in the
    /// device), as the device's library reported it.
    RefusedWrite,
    /// The entry was left half-written and was put back to its content at grant time.
    RolledBack,
}

/// One audit record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TableAuditRecord {
    /// Position in the agent's audit (1, 2, …).
    pub seq: u64,
    /// When, unix ms.
    pub at: u64,
    /// The device concerned.
    pub device: u32,
    /// The entry concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<u32>,
    /// The entry's version after the event.
    pub version: u64,
    /// What happened.
    pub kind: TableAuditKind,
    /// Why (revoked, detached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The device holding the entry (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<u32>,
}

/// Counts since the table was created by this agent process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TableTotals {
    /// Grants made.
    pub grants: u64,
    /// Grants ended.
    pub revokes: u64,
    /// Requests refused.
    pub refused: u64,
    /// Stores refused by the kernel, as the devices reported them.
    #[serde(default)]
    pub refused_writes: u64,
    /// Entries rolled back.
    pub rolled_back: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(entries: u32, entry_size: u32) -> CreateResourceTable {
        CreateResourceTable {
            name: "flows".into(),
            entries,
            entry_size,
            max_grant_ms: None,
            tenant: None,
        }
    }

    #[test]
    fn limits_are_named() {
        let e = spec(0, 8).validate().unwrap_err();
        assert_eq!(e.field, "entries");
        assert!(e.message.contains("between 1 and 65536"), "{e:?}");
        let e = spec(1, 12).validate().unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("entry_size", "must be a multiple of 8, got 12")
        );
        let e = spec(1, 1 << 20).validate().unwrap_err();
        assert!(e.message.contains("between 8 and 65536"), "{e:?}");
        // 65,536 entries of 4,096 bytes take two pages each: 512 MiB, allowed;
        // of 8,192 bytes three pages: 768 MiB; of 16,384 bytes five: over 1 GiB.
        assert!(spec(65_536, 4096).validate().is_ok());
        let e = spec(65_536, 16_384).validate().unwrap_err();
        assert!(
            e.message.contains("over the limit of 1073741824 bytes"),
            "{e:?}"
        );
        let mut s = spec(4, 8);
        s.max_grant_ms = Some(0);
        assert_eq!(s.validate().unwrap_err().field, "max_grant_ms");
        s.max_grant_ms = None;
        assert_eq!(s.validate().unwrap().max_grant_ms, DEFAULT_MAX_GRANT_MS);
        let mut s = spec(4, 8);
        s.name = "Bad Name".into();
        assert_eq!(s.validate().unwrap_err().field, "name");
    }

    #[test]
    fn report_limits() {
        let mut r = ResourceTableReport::default();
        assert!(r.validate().is_ok());
        r.audit = vec![
            TableAuditRecord {
                seq: 1,
                at: 0,
                device: 1,
                entry: None,
                version: 0,
                kind: TableAuditKind::Attached,
                reason: None,
                holder: None,
            };
            MAX_REPORTED_AUDIT + 1
        ];
        assert_eq!(r.validate().unwrap_err().field, "audit");
    }
}
