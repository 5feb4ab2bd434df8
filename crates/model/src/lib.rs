//! The domain types of vinfra: typed ids, hosts, images, VMs, tenants and
//! tokens, and the rules that make a value valid.
//!
//! Owns: the shapes stored in the state store and sent over the REST API
//! ([`api`] holds the request/response bodies), and validation that names the
//! offending field (`vcpus: must be between 1 and 64, got 0`).
//! Must not depend on: any I/O (no tokio, no store, no HTTP stack; `ring` only for the
//! terminal message MAC, a pure function). Clocks are
//! passed in as unix milliseconds so that every rule here is a pure function.
#![warn(missing_docs)]

pub mod api;
pub mod bench;
mod error_chain;
mod ids;
mod name_type;
pub mod resource_tables;
mod rng;
pub mod slices;
pub mod terminal_ops;
pub mod terminals;
mod types;
mod validate;

pub use error_chain::error_chain;
pub use ids::{
    HostId, IdParseError, ImageId, MaintenanceId, MigrationId, NetworkId, ResourceTableId,
    TenantId, TerminalId, TokenId, VmId,
};
pub use rng::SplitMix64;
pub use types::{
    Blob, CacheProgress, DesiredState, DrainItem, DrainItemState, Host, HostState, Image,
    ImageBlobs, Maintenance, MaintenanceState, Migration, MigrationState, Network, Nic,
    ObservedState, QemuMigrationStats, Redundancy, Role, Tenant, TokenRecord, TokenScope, Vm,
    VmTrace, WARMUP_REPORT_EVERY_MS, WARMUP_REPORT_MS,
};
pub use validate::{
    cidr_pattern, hex, parse_cidr, parse_digest, validate_agent_url, validate_cmdline,
    validate_name, validate_path, validate_range, BlobDigest, Name, ValidationError,
    AGENT_URL_PATTERN, CIDR_PREFIXES, DIGEST_PREFIX, NAME_PATTERN, NO_CONTROL_PATTERN,
};
