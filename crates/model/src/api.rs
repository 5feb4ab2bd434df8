//! REST wire bodies of the control-plane API, shared by the server (`api`)
//! and the typed client (`client`).
//!
//! Requests reject unknown fields so that a typo (`vcpu`) is an error rather
//! than a silently ignored field; each has a `validate` that checks the rules
//! the type system cannot, naming the field.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    parse_cidr, parse_digest, validate_agent_url, validate_cmdline, validate_name, validate_path,
    validate_range, CacheProgress, DesiredState, Image, ImageBlobs, Migration, MigrationState,
    Name, ObservedState, QemuMigrationStats, Role, Tenant, TenantId, TokenId, TokenScope,
    ValidationError, Vm,
};

/// Most vCPUs one VM may have.
pub const MAX_VCPUS: u32 = 64;
/// Least memory one VM may have, MiB.
pub const MIN_VM_MEMORY_MIB: u64 = 16;
/// Most memory one VM may have, MiB (1 TiB).
pub const MAX_VM_MEMORY_MIB: u64 = 1 << 20;
/// Most CPUs a host may offer.
pub const MAX_HOST_CPUS: u32 = 4096;
/// vCPUs a host offers per CPU unless its agent says otherwise, like Nova's default
/// `cpu_allocation_ratio` (guests rarely keep every vCPU busy).
pub const DEFAULT_CPU_ALLOCATION_RATIO: u32 = 4;
/// The most vCPUs a host may offer per CPU.
pub const MAX_CPU_ALLOCATION_RATIO: u32 = 64;
/// Most memory a host may offer, MiB (64 TiB).
pub const MAX_HOST_MEMORY_MIB: u64 = 1 << 26;
/// Most disk a host may offer, GiB (1 PiB).
pub const MAX_HOST_DISK_GIB: u64 = 1 << 20;
/// Largest image disk, MiB (16 TiB).
pub const MAX_DISK_MIB: u64 = 1 << 24;
/// Most drivers a host may list.
pub const MAX_DRIVERS: usize = 16;
/// Largest console tail an agent may report, bytes. The server keeps only
/// the latest tail per VM, in memory.
pub const MAX_CONSOLE_TAIL: usize = 64 * 1024;
/// Longest error text an agent may report, bytes.
pub const MAX_ERROR_LEN: usize = 4096;

/// An RFC 9457 problem document: the body of every error response
/// (`Content-Type: application/problem+json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URN naming the class of problem, e.g. `urn:vinfra:problem:validation`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Short summary of the class (the HTTP reason phrase).
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What was wrong with this request, naming the field when there is one.
    pub detail: String,
}

/// `POST /v1/tenants`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "acme"}))]
pub struct CreateTenant {
    /// Unique tenant name.
    pub name: String,
}

impl CreateTenant {
    /// Checks the name.
    pub fn validate(&self) -> Result<Name, ValidationError> {
        validate_name("name", &self.name)
    }
}

/// Answer to `POST /v1/tenants`: the tenant and its first member token,
/// shown only this once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TenantCreated {
    /// The new tenant.
    pub tenant: Tenant,
    /// A member token for the tenant. The server keeps only its hash.
    pub token: String,
}

/// Lifetime of a member or admin token when `ttl_secs` is not given: 30 days.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;
/// Longest lifetime a token may be given: one year.
pub const MAX_TOKEN_TTL_SECS: u64 = 365 * 24 * 3600;
/// Longest token description, bytes.
pub const MAX_TOKEN_DESCRIPTION: usize = 256;
/// How many characters of a token are kept in clear as its prefix
/// (`vinfra_` and 5 hex digits: 20 bits, enough to tell a user's tokens apart,
/// far too few to help guess the remaining 236).
pub const TOKEN_PREFIX_LEN: usize = 12;

/// `POST /v1/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"role": "admin", "ttl_secs": 3600, "scope": "read-only", "description": "dashboards"}))]
pub struct CreateToken {
    /// Role of the new token. A member may mint `member` tokens only.
    pub role: Role,
    /// Tenant name: required for `member` (a member may omit it: its own
    /// tenant), forbidden for `admin` and `agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Lifetime in seconds (1 to one year). Default: 30 days for member and
    /// admin tokens; agent tokens never expire unless given one. The token
    /// never outlives the token that mints it (the lifetime is cut short).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// `read-only` (GET and HEAD only) or `read-write` (default).
    #[serde(default)]
    pub scope: TokenScope,
    /// Free text shown in token lists (at most 256 bytes, no control characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl CreateToken {
    /// A request for a read-write token of `role` with the default lifetime.
    pub fn new(role: Role) -> Self {
        Self {
            role,
            tenant: None,
            ttl_secs: None,
            scope: TokenScope::ReadWrite,
            description: None,
        }
    }

    /// Checks that `tenant` is given exactly when the role needs one.
    pub fn validate(&self) -> Result<Option<Name>, ValidationError> {
        match (self.role, &self.tenant) {
            (Role::Member, Some(t)) => validate_name("tenant", t).map(Some),
            (Role::Member, None) => Err(ValidationError::new(
                "tenant",
                "is required for a member token",
            )),
            (role, Some(_)) => Err(ValidationError::new(
                "tenant",
                format!("must be absent for a {} token", role.as_str()),
            )),
            (_, None) => Ok(None),
        }
    }

    /// The token's lifetime in milliseconds; `None`: it never expires.
    ///
    /// Agent tokens default to no expiry: an agent runs unattended from a token
    /// file and has no way to renew it, so an expiring agent token would turn
    /// its host `down` (and its VMs unmanaged) on a timer. They are revoked
    /// when a host is retired instead.
    pub fn lifetime_ms(&self) -> Result<Option<u64>, ValidationError> {
        let secs = match (self.ttl_secs, self.role) {
            (None, Role::Agent) => return Ok(None),
            (None, _) => DEFAULT_TOKEN_TTL_SECS,
            (Some(s), _) => validate_range("ttl_secs", s, 1, MAX_TOKEN_TTL_SECS)?,
        };
        // At most a year in ms: cannot overflow.
        Ok(Some(secs * 1000))
    }

    /// The description, checked.
    pub fn validate_description(&self) -> Result<Option<String>, ValidationError> {
        let Some(d) = &self.description else {
            return Ok(None);
        };
        if d.len() > MAX_TOKEN_DESCRIPTION {
            return Err(ValidationError::new(
                "description",
                format!("must be at most {MAX_TOKEN_DESCRIPTION} bytes"),
            ));
        }
        if d.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "description",
                "must not contain control characters",
            ));
        }
        Ok(Some(d.clone()))
    }
}

/// A token as lists show it: its id, prefix and metadata, never the secret
/// or its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    /// Stable id: what `DELETE /v1/tokens/{id}` takes.
    pub id: TokenId,
    /// The first characters of the token (empty for tokens minted before
    /// prefixes existed).
    pub prefix: String,
    /// Its role.
    pub role: Role,
    /// Its tenant (member tokens).
    pub tenant: Option<TenantId>,
    /// `read-only` or `read-write`.
    pub scope: TokenScope,
    /// Creation time, unix milliseconds.
    pub created_at: u64,
    /// Expiry, unix milliseconds; absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// What the token is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Answer to `POST /v1/tokens`: the token, shown only this once, and what
/// lists will show of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    /// The bearer token. The server keeps only its hash.
    pub token: String,
    /// Its id (for `DELETE /v1/tokens/{id}`).
    pub id: TokenId,
    /// The first characters of the token, as lists show them.
    pub prefix: String,
    /// Its role.
    pub role: Role,
    /// Its tenant (member tokens).
    pub tenant: Option<TenantId>,
    /// `read-only` or `read-write`.
    pub scope: TokenScope,
    /// Expiry, unix milliseconds; absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// What the token is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `POST /v1/hosts`: register a host, or re-register it under the same name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "h2", "cpus": 4096, "memory_mib": 32768, "disk_gib": 500, "drivers": ["process"], "agent_url": "http://10.0.0.2:7071"}))]
pub struct RegisterHost {
    /// Unique host name.
    pub name: String,
    /// CPUs offered to VMs (1..=4096).
    pub cpus: u32,
    /// vCPUs the scheduler may place on the host: `cpus` times the agent's CPU
    /// allocation ratio (default `cpus` × 4; at most `cpus` × 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Memory offered to VMs, MiB.
    pub memory_mib: u64,
    /// Disk offered to VMs, GiB.
    pub disk_gib: u64,
    /// Compute drivers the agent supports.
    #[serde(default)]
    pub drivers: Vec<String>,
    /// Where the agent's own API listens, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_url: Option<String>,
    /// Where the host's NBD server listens (`IP:PORT`), if it runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_addr: Option<String>,
    /// Where the agent relays link requests into its guests (`IP:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_addr: Option<String>,
    /// The host's address on the data network: VXLAN tunnels for VM networks end there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_ip: Option<String>,
}

impl RegisterHost {
    /// Checks every field; returns the validated name.
    pub fn validate(&self) -> Result<Name, ValidationError> {
        let name = validate_name("name", &self.name)?;
        validate_range("cpus", self.cpus, 1, MAX_HOST_CPUS)?;
        if let Some(v) = self.vcpus {
            validate_range(
                "vcpus",
                v,
                1,
                self.cpus.saturating_mul(MAX_CPU_ALLOCATION_RATIO),
            )?;
        }
        validate_range("memory_mib", self.memory_mib, 1, MAX_HOST_MEMORY_MIB)?;
        validate_range("disk_gib", self.disk_gib, 0, MAX_HOST_DISK_GIB)?;
        if self.drivers.len() > MAX_DRIVERS {
            return Err(ValidationError::new(
                "drivers",
                format!(
                    "must list at most {MAX_DRIVERS} drivers, got {}",
                    self.drivers.len()
                ),
            ));
        }
        for (i, d) in self.drivers.iter().enumerate() {
            validate_name(&format!("drivers[{i}]"), d)?;
        }
        if let Some(url) = &self.agent_url {
            validate_agent_url("agent_url", url)?;
        }
        if let Some(ip) = &self.uplink_ip {
            if ip.parse::<std::net::Ipv4Addr>().is_err() {
                return Err(ValidationError::new(
                    "uplink_ip",
                    format!("must be an IPv4 address, got {ip:?}"),
                ));
            }
        }
        for (field, addr) in [("nbd_addr", &self.nbd_addr), ("link_addr", &self.link_addr)] {
            if let Some(addr) = addr {
                if addr.parse::<std::net::SocketAddr>().is_err() {
                    return Err(ValidationError::new(
                        field,
                        format!("must be IP:PORT, got {addr:?}"),
                    ));
                }
            }
        }
        Ok(name)
    }
}

/// The answer to a registration or a heartbeat: the host, and the lease the heartbeat
/// renewed. The host fields are at the top level, so a client that reads only a `Host`
/// from this answer keeps working.
///
/// The lease is the server's heartbeat timeout: `lease_ms` after the agent *sent* this
/// heartbeat, the server may already count the host down, and after a further margin
/// start its redundant VMs on their standbys. An agent that has not renewed by then
/// pauses its redundant VMs itself (fencing; docs/ARCHITECTURE.md, "Takeover without
/// split brain").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostLease {
    /// The host, with its state.
    #[serde(flatten)]
    pub host: crate::Host,
    /// How long the heartbeat just recorded keeps the host up, ms, counted by the
    /// agent from when it sent the request.
    pub lease_ms: u64,
}

/// `POST /v1/images`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateImage {
    /// Name, unique within the tenant (or among public images).
    pub name: String,
    /// Kernel: the digest of a blob in the image store (`POST /v1/blobs`), never a path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^sha256:[0-9a-f]{64}$")]
    pub kernel: Option<String>,
    /// Initrd: a blob digest; needs `kernel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^sha256:[0-9a-f]{64}$")]
    pub initrd: Option<String>,
    /// Disk template each VM's disk is cloned from: a blob digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^sha256:[0-9a-f]{64}$")]
    pub disk_template: Option<String>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Size of each VM's disk, MiB.
    pub disk_mib: u64,
    /// Admin only: the tenant that owns the image. An admin's image without
    /// a tenant is public; a member's image always belongs to its tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl CreateImage {
    /// Checks every field; returns the validated name, tenant name and blobs.
    pub fn validate(&self) -> Result<(Name, Option<Name>, ImageBlobs), ValidationError> {
        let name = validate_name("name", &self.name)?;
        if self.kernel.is_none() && self.disk_template.is_none() {
            return Err(ValidationError::new(
                "kernel",
                "an image needs a kernel or a disk_template",
            ));
        }
        if self.initrd.is_some() && self.kernel.is_none() {
            return Err(ValidationError::new("initrd", "needs a kernel"));
        }
        let digest = |field: &str, v: &Option<String>| {
            v.as_deref().map(|d| parse_digest(field, d)).transpose()
        };
        let blobs = ImageBlobs {
            kernel: digest("kernel", &self.kernel)?,
            initrd: digest("initrd", &self.initrd)?,
            disk_template: digest("disk_template", &self.disk_template)?,
        };
        validate_cmdline("cmdline", &self.cmdline)?;
        validate_range("disk_mib", self.disk_mib, 0, MAX_DISK_MIB)?;
        let tenant = match &self.tenant {
            Some(t) => Some(validate_name("tenant", t)?),
            None => None,
        };
        Ok((name, tenant, blobs))
    }
}

/// `POST /v1/join-tokens` (admin): a one-time token with which an agent on another
/// machine joins over TLS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJoinToken {
    /// Seconds until it expires unused (default 3600, at most 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 86400)]
    pub ttl_secs: Option<u64>,
}

/// Default life of a join token, seconds.
pub const DEFAULT_JOIN_TTL_SECS: u64 = 3600;
/// Longest life of a join token, seconds.
pub const MAX_JOIN_TTL_SECS: u64 = 86_400;

impl CreateJoinToken {
    /// The token's life, seconds.
    pub fn validate(&self) -> Result<u64, ValidationError> {
        validate_range(
            "ttl_secs",
            self.ttl_secs.unwrap_or(DEFAULT_JOIN_TTL_SECS),
            1,
            MAX_JOIN_TTL_SECS,
        )
    }
}

/// A join token, shown once: `vjoin.<secret>.<sha256 of the cluster CA>`. The agent
/// checks the CA it is served against the pin before it trusts the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenCreated {
    /// The token.
    pub token: String,
    /// When it expires unused, unix milliseconds.
    pub expires_at: u64,
}

/// `POST /v1/join` (no bearer token): an agent trades a join token for its identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The join token (whole, as `POST /v1/join-tokens` gave it).
    #[schema(max_length = 256)]
    pub token: String,
    /// The joining host's name.
    #[schema(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub host: String,
}

/// What a joined agent keeps (secret): its client certificate and key, the CA to trust,
/// and an agent bearer token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinResponse {
    /// The host the certificate names.
    pub host: Name,
    /// The cluster CA certificate, PEM.
    pub ca_pem: String,
    /// The agent's client certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// A bearer token with the agent role.
    pub token: String,
}

impl std::fmt::Debug for JoinResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinResponse")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// `POST /v1/blobs/import` (admin): a file in the server's import directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportBlob {
    /// Relative to the import directory (an absolute path must lie inside it).
    #[schema(min_length = 1, max_length = 4096)]
    pub path: String,
}

/// Most NICs one VM may have.
pub const MAX_NICS: usize = 8;
/// Most resource tables one VM maps (the QEMU driver's `compute::MAX_VM_TABLES`).
pub const MAX_VM_TABLES: usize = 8;
/// Longest `kernel_args`, bytes.
pub const MAX_KERNEL_ARGS: usize = 1024;
/// Kernel argument the agent sets for each NIC; users may not set it themselves.
pub const NIC_KERNEL_ARG: &str = "vinfra.nic=";

/// `POST /v1/networks`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "backend", "cidr": "10.1.0.0/24"}))]
pub struct CreateNetwork {
    /// Name, unique within the tenant.
    pub name: String,
    /// IPv4 subnet `a.b.c.d/p`, prefix 8..=30, no host bits.
    pub cidr: String,
    /// Admin only: the owning tenant (default: `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl CreateNetwork {
    /// Checks every field: the name, the tenant and the canonical CIDR.
    pub fn validate(&self) -> Result<(Name, String, Option<Name>), ValidationError> {
        let name = validate_name("name", &self.name)?;
        let (ip, prefix) = parse_cidr("cidr", &self.cidr)?;
        let tenant = match &self.tenant {
            Some(t) => Some(validate_name("tenant", t)?),
            None => None,
        };
        Ok((name, format!("{ip}/{prefix}"), tenant))
    }
}

/// One NIC asked for in [`CreateVm`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicRequest {
    /// Network name or id (the VM's tenant's).
    pub network: String,
    /// A name for the interface (a port name: an NFV connection point's), unique in the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A fixed address in the network's subnet; when absent IPAM gives the lowest free one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub ip: Option<std::net::Ipv4Addr>,
}

/// `POST /v1/vms`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "web-1", "image": "debian", "vcpus": 1, "memory_mib": 256}))]
pub struct CreateVm {
    /// Name, unique within the tenant.
    pub name: String,
    /// Image name (the tenant's own first, then public) or id.
    pub image: String,
    /// Virtual CPUs (1..=64).
    pub vcpus: u32,
    /// Memory, MiB (16..=1048576).
    pub memory_mib: u64,
    /// Host to place it on; when absent the scheduler picks an up host with room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Admin only: the owning tenant (default: the tenant named `default`,
    /// created on first use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Place on a redundant storage pair with a paired standby host.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redundant: bool,
    /// Disk size to reserve on the storage pair, GiB (redundant VMs; default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u64>,
    /// Network interfaces, in guest order (at most 8).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicRequest>,
    /// Extra kernel arguments appended to the image's command line (at most 1024 bytes;
    /// `vinfra.nic=` is reserved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_args: Option<String>,
    /// Resource tables the VM maps (docs/SHM.md, "VMs as devices"): names of the
    /// tenant's tables on the VM's host, at most 8, each once. The VM is placed on the
    /// host that keeps them (with `host`, they must be there), and stays there: it
    /// neither migrates live nor moves in a drain. Not with `redundant`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource_tables: Vec<String>,
}

/// A [`CreateVm`] whose fields passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmRequest {
    /// VM name.
    pub name: Name,
    /// Image name or id, as given.
    pub image: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Requested host.
    pub host: Option<Name>,
    /// Requested tenant (admin only).
    pub tenant: Option<Name>,
    /// Redundant placement: disk GiB to reserve on the storage pair.
    pub redundant_disk_gib: Option<u64>,
    /// NICs, as asked.
    pub nics: Vec<NicRequest>,
    /// Extra kernel arguments.
    pub kernel_args: Option<String>,
    /// Resource tables, by name.
    pub resource_tables: Vec<Name>,
}

impl CreateVm {
    /// Checks every field.
    pub fn validate(&self) -> Result<VmRequest, ValidationError> {
        let name = validate_name("name", &self.name)?;
        // An image is named either by name or by id.
        if self.image.parse::<uuid::Uuid>().is_err() {
            validate_name("image", &self.image)?;
        }
        let vcpus = validate_range("vcpus", self.vcpus, 1, MAX_VCPUS)?;
        let memory_mib = validate_range(
            "memory_mib",
            self.memory_mib,
            MIN_VM_MEMORY_MIB,
            MAX_VM_MEMORY_MIB,
        )?;
        let host = match &self.host {
            Some(h) => Some(validate_name("host", h)?),
            None => None,
        };
        let tenant = match &self.tenant {
            Some(t) => Some(validate_name("tenant", t)?),
            None => None,
        };
        let redundant_disk_gib = match (self.redundant, self.disk_gib) {
            (false, Some(_)) => {
                return Err(ValidationError::new(
                    "disk_gib",
                    "is only used with redundant: true",
                ))
            }
            (false, None) => None,
            (true, d) => Some(validate_range(
                "disk_gib",
                d.unwrap_or(1),
                1,
                MAX_DISK_MIB >> 10,
            )?),
        };
        if self.nics.len() > MAX_NICS {
            return Err(ValidationError::new(
                "nics",
                format!("at most {MAX_NICS} NICs, got {}", self.nics.len()),
            ));
        }
        for (i, n) in self.nics.iter().enumerate() {
            if n.network.parse::<uuid::Uuid>().is_err() {
                validate_name(&format!("nics[{i}].network"), &n.network)?;
            }
            if let Some(name) = &n.name {
                let field = format!("nics[{i}].name");
                validate_name(&field, name)?;
                if self.nics[..i].iter().any(|o| o.name.as_ref() == Some(name)) {
                    return Err(ValidationError::new(field, format!("duplicate: {name}")));
                }
            }
        }
        if let Some(k) = &self.kernel_args {
            validate_cmdline("kernel_args", k)?;
            if k.len() > MAX_KERNEL_ARGS {
                return Err(ValidationError::new(
                    "kernel_args",
                    format!("must be at most {MAX_KERNEL_ARGS} bytes"),
                ));
            }
            if k.split_whitespace().any(|a| a.starts_with(NIC_KERNEL_ARG)) {
                return Err(ValidationError::new(
                    "kernel_args",
                    format!("{NIC_KERNEL_ARG} is set by vinfra from nics"),
                ));
            }
        }
        if self.redundant && host.is_some() {
            return Err(ValidationError::new(
                "host",
                "a redundant VM is placed by its storage pair; leave host out",
            ));
        }
        let resource_tables = self.validate_tables()?;
        Ok(VmRequest {
            name,
            image: self.image.clone(),
            vcpus,
            memory_mib,
            host,
            tenant,
            redundant_disk_gib,
            nics: self.nics.clone(),
            kernel_args: self.kernel_args.clone(),
            resource_tables,
        })
    }

    /// `resource_tables`: at most [`MAX_VM_TABLES`] valid names, each once, and not on
    /// a redundant VM (a takeover moves it to its standby host; a table stays on its
    /// host).
    fn validate_tables(&self) -> Result<Vec<Name>, ValidationError> {
        const FIELD: &str = "resource_tables";
        if self.resource_tables.len() > MAX_VM_TABLES {
            return Err(ValidationError::new(
                FIELD,
                format!(
                    "at most {MAX_VM_TABLES} resource tables per VM, got {}",
                    self.resource_tables.len()
                ),
            ));
        }
        if self.redundant && !self.resource_tables.is_empty() {
            return Err(ValidationError::new(
                FIELD,
                "a redundant VM moves to its standby host on a takeover, and a resource \
                 table stays on its own host: a VM with resource tables cannot be redundant",
            ));
        }
        let mut out: Vec<Name> = Vec::with_capacity(self.resource_tables.len());
        for (i, t) in self.resource_tables.iter().enumerate() {
            let name = validate_name(&format!("{FIELD}[{i}]"), t)?;
            if out.contains(&name) {
                return Err(ValidationError::new(
                    format!("{FIELD}[{i}]"),
                    format!("duplicate: {name}"),
                ));
            }
            out.push(name);
        }
        Ok(out)
    }
}

/// The state an agent reports for a VM: the observed states, plus `deleted`
/// to confirm that a VM whose desired state is `deleted` is gone from the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReportedState {
    /// Booting.
    Starting,
    /// Running.
    Running,
    /// Shutting down.
    Stopping,
    /// Stopped.
    Stopped,
    /// Failed; put the reason in `error`.
    Failed,
    /// Torn down after `desired: deleted`; the server then forgets the VM.
    Deleted,
    /// Paused by the agent because the host lease expired (see [`HostLease`]).
    Fenced,
}

impl ReportedState {
    /// The observed state this report sets, or `None` for `deleted`.
    pub fn observed(self) -> Option<ObservedState> {
        match self {
            ReportedState::Starting => Some(ObservedState::Starting),
            ReportedState::Running => Some(ObservedState::Running),
            ReportedState::Stopping => Some(ObservedState::Stopping),
            ReportedState::Stopped => Some(ObservedState::Stopped),
            ReportedState::Failed => Some(ObservedState::Failed),
            ReportedState::Fenced => Some(ObservedState::Fenced),
            ReportedState::Deleted => None,
        }
    }
}

/// `PUT /v1/vms/{id}/observed`: an agent's report about one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ObservedReport {
    /// The reporting host; must be the VM's assigned host, so that a stale
    /// agent cannot overwrite the state of a VM that moved.
    pub host: String,
    /// What the agent sees.
    pub state: ReportedState,
    /// Why it failed; cleared when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The latest console output (at most 64 KiB); replaces the previous tail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_tail: Option<String>,
    /// CPU time the VM has used since its hypervisor started, ms (user + system of the
    /// QEMU process; the simulated driver reports 0), when the driver can tell. The
    /// slice sampler turns its growth into cores in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time_ms: Option<u64>,
}

/// An agent's `error` text is bounded: it is stored with the record.
fn validate_error_len(error: Option<&str>) -> Result<(), ValidationError> {
    match error {
        Some(e) if e.len() > MAX_ERROR_LEN => Err(ValidationError::new(
            "error",
            format!("must be at most {MAX_ERROR_LEN} bytes, got {}", e.len()),
        )),
        _ => Ok(()),
    }
}

impl ObservedReport {
    /// Checks every field; returns the validated host name.
    pub fn validate(&self) -> Result<Name, ValidationError> {
        let host = validate_name("host", &self.host)?;
        validate_error_len(self.error.as_deref())?;
        if let Some(c) = &self.console_tail {
            if c.len() > MAX_CONSOLE_TAIL {
                return Err(ValidationError::new(
                    "console_tail",
                    format!("must be at most {MAX_CONSOLE_TAIL} bytes, got {}", c.len()),
                ));
            }
        }
        // The contract says int64 (what JSON tools and the sampler's arithmetic handle);
        // 2^63 ms is 292 million years, so a larger value is a broken report.
        if let Some(ms) = self.cpu_time_ms {
            if i64::try_from(ms).is_err() {
                return Err(ValidationError::new(
                    "cpu_time_ms",
                    format!("must be at most {}, got {ms}", i64::MAX),
                ));
            }
        }
        Ok(host)
    }
}

/// One VM an agent must run, with everything it needs to do so.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Assignment {
    /// The VM (its `desired` field is what the agent converges to).
    pub vm: Vm,
    /// The VM's image (paths on the host).
    pub image: Image,
    /// The VM's live migration, when one is in progress and this host is its
    /// source or destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
}

impl Assignment {
    /// Shorthand for `self.vm.desired`.
    pub fn desired(&self) -> DesiredState {
        self.vm.desired
    }
}

/// One line of a host's event stream (`GET /v1/hosts/{name}/events`, newline-delimited
/// JSON): what changed in the host's desired state, pushed as it happens. Polling
/// `GET /v1/hosts/{name}/assignments` stays the source of truth: a `resync` says to poll.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HostEvent {
    /// Reconcile everything: read the assignments again. The first line of every stream
    /// (what changed before it is not sent), and sent again whenever the server may
    /// have missed changes (this stream fell behind, the server's store watch restarted).
    Resync,
    /// One VM's assignment on this host, whole and current: the same object
    /// `GET /v1/hosts/{name}/assignments` lists for it (a new VM, a desired-state
    /// change, a migration of it to or from this host moving on).
    Assignment {
        /// The VM, its image and its migration, as the assignments list has them.
        assignment: Box<Assignment>,
    },
    /// The VM is no longer assigned to this host (deleted, moved, migrated away): the
    /// agent destroys its copy here, as when the VM leaves the assignments list.
    Unassigned {
        /// The VM.
        vm: crate::VmId,
    },
    /// Keep-alive, sent when the stream has been quiet for a while (10 s), so that
    /// both ends notice a dead connection.
    Ping,
    /// A terminal's operation for a VM on this host, to perform now and answer with
    /// `PUT /v1/terminal-operations/{terminal}/{seq}/result`.
    TerminalOperation {
        /// What to perform, on which VM, for which terminal.
        operation: Box<crate::terminals::PerformedOperation>,
    },
    /// A resource table of this host was created or deleted: the agent lists the
    /// host's tables (`GET /v1/hosts/{name}/resource-tables`) and converges to them.
    ResourceTables,
}

/// Link establishment, step 3: the first CP's IP and id, sent to the second VNF's link endpoint (a
/// link agent, or the vinfra agent of the host running the VNF, which relays it into the
/// guest). One JSON line; the answer is one [`LinkReply`] line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkRequest {
    /// Link name.
    pub link: String,
    /// First CP id.
    pub first_cp: String,
    /// First CP address.
    pub first_ip: std::net::Ipv4Addr,
    /// Port the first CP accepts on.
    pub port: u16,
    /// Which of the second VNF's CPs must connect.
    pub second_cp: String,
    /// Milliseconds the second side may spend connecting.
    pub timeout_ms: u64,
    /// A vinfra bearer token, for endpoints that act on vinfra VMs (an agent's link relay
    /// checks that the token may see the VM owning the CP); link agents ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
}

/// The second VNF's answer to a [`LinkRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkReply {
    /// `true` when the data-plane exchange succeeded.
    pub up: bool,
    /// What the first CP answered, or why it failed.
    pub detail: String,
}

/// Where one site of a network service is and which software runs it. The
/// orchestrator builds that software's driver from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "driver", rename_all = "snake_case", deny_unknown_fields)]
pub enum SiteSpec {
    /// This vinfra control plane (driven in process, as the instance's tenant), on one
    /// host or where the scheduler puts each VDU.
    Vinfra {
        /// Host for every VDU of the site.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
    },
    /// A libvirtd on the server's machine (admin only). Images come from vinfra's catalog.
    Libvirt {
        /// Connection URI (`qemu:///system`).
        uri: String,
        /// Absolute directory for VDU disks and logs (mode 0755 up to `/`).
        work_dir: String,
    },
    /// An OpenStack cloud (Keystone v3 password auth; Nova, Neutron, Glance).
    Openstack {
        /// Keystone URL without `/v3`.
        auth_url: String,
        /// User.
        username: String,
        /// Password (never shown back).
        password: String,
        /// Project.
        project: String,
        /// Domain of user and project (default `Default`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        domain: Option<String>,
    },
    /// A Kubernetes namespace (Pods with Multus networks).
    Kubernetes {
        /// API server URL.
        api_url: String,
        /// Bearer token (never shown back).
        token: String,
        /// Namespace.
        namespace: String,
    },
}

impl SiteSpec {
    /// The same spec with its secrets replaced, for responses.
    pub fn redacted(&self) -> SiteSpec {
        let mut s = self.clone();
        match &mut s {
            SiteSpec::Openstack { password, .. } => *password = "********".into(),
            SiteSpec::Kubernetes { token, .. } => *token = "********".into(),
            SiteSpec::Vinfra { .. } | SiteSpec::Libvirt { .. } => {}
        }
        s
    }
}

/// `POST /v1/ns-instances`: instantiate a stored NSD across sites.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNsInstance {
    /// Instance name: the prefix of every resource on every site (`[a-z][a-z0-9-]`, at
    /// most 20 bytes).
    pub name: String,
    /// The stored NSD's descriptor id.
    pub nsd: String,
    /// Site name (as in the NSD's `vinfra_sites`) → where it is and what runs it.
    pub sites: std::collections::BTreeMap<String, SiteSpec>,
    /// VNF id → its link agent's management address (`127.0.0.1:port`; loopback only):
    /// where the link request for that VNF goes.
    #[serde(default)]
    pub endpoints: std::collections::BTreeMap<String, String>,
    /// How long a link may take before it fails with a reason (default 30000 ms: a guest
    /// may still be booting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_deadline_ms: Option<u64>,
}

/// Most ms a link may be given.
pub const MAX_LINK_DEADLINE_MS: u64 = 600_000;

impl CreateNsInstance {
    /// Checks the fields that need no store: the name, the site names, the endpoint
    /// addresses (loopback only), the deadline. Returns the parsed endpoints.
    pub fn validate(
        &self,
    ) -> Result<std::collections::BTreeMap<String, std::net::SocketAddr>, ValidationError> {
        let name = validate_name("name", &self.name)?;
        if name.as_str().len() > 20 || !name.as_str().starts_with(|c: char| c.is_ascii_lowercase())
        {
            return Err(ValidationError::new(
                "name",
                "must start with a letter and be at most 20 bytes (it prefixes every site resource)",
            ));
        }
        if self.nsd.is_empty() {
            return Err(ValidationError::new("nsd", "must name a stored NSD"));
        }
        if self.sites.is_empty() {
            return Err(ValidationError::new("sites", "at least one site is needed"));
        }
        for (site, spec) in &self.sites {
            validate_name(&format!("sites.{site}"), site)?;
            if let SiteSpec::Libvirt { work_dir, .. } = spec {
                validate_path(&format!("sites.{site}.work_dir"), work_dir)?;
            }
            if let SiteSpec::Vinfra { host: Some(h) } = spec {
                validate_name(&format!("sites.{site}.host"), h)?;
            }
        }
        let mut eps = std::collections::BTreeMap::new();
        for (vnf, addr) in &self.endpoints {
            let field = format!("endpoints.{vnf}");
            let a: std::net::SocketAddr = addr
                .parse()
                .map_err(|_| ValidationError::new(&field, format!("'{addr}' is not ip:port")))?;
            if !a.ip().is_loopback() {
                return Err(ValidationError::new(
                    field,
                    format!(
                        "{addr} is not a loopback address; link agents are reached on 127.0.0.1"
                    ),
                ));
            }
            eps.insert(vnf.clone(), a);
        }
        if let Some(ms) = self.link_deadline_ms {
            validate_range("link_deadline_ms", ms, 100, MAX_LINK_DEADLINE_MS)?;
        }
        Ok(eps)
    }
}

/// Where an NS instance is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NsState {
    /// Sites are creating networks and VNFs, then links are being established.
    Instantiating,
    /// Every VNF runs and every link is up.
    Instantiated,
    /// Instantiation failed and was rolled back, or a terminate failed: see `error`.
    Failed,
    /// Every site is removing what it made.
    Terminating,
    /// A VNF is gaining or losing one VDU (the NS stays up meanwhile).
    Scaling,
}

/// Which way to scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScaleDirection {
    /// One VDU more.
    Out,
    /// One VDU less (never below the VDU's minimum).
    In,
}

/// `POST /v1/ns-instances/{name}/scale`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleNsInstance {
    /// VNF id in the NSD.
    pub vnf: String,
    /// Out or in, by one VDU.
    pub direction: ScaleDirection,
}

/// One VNF of an NS instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NsVnfStatus {
    /// VNF id in the NSD.
    pub vnf: String,
    /// Site it went to.
    pub site: String,
    /// `pending`, `ready`.
    pub state: String,
    /// Milliseconds from the start to ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_ms: Option<u64>,
}

/// `GET /v1/ns-instances/{id}`: an NS instance with per-VNF and per-link progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NsInstanceRecord {
    /// Id (a UUID).
    pub id: String,
    /// Owning tenant.
    pub tenant: TenantId,
    /// Name, unique within the tenant.
    pub name: Name,
    /// NSD descriptor id.
    pub nsd: String,
    /// State.
    pub state: NsState,
    /// Sites (secrets redacted in responses).
    pub sites: std::collections::BTreeMap<String, SiteSpec>,
    /// Link agent addresses by VNF.
    pub endpoints: std::collections::BTreeMap<String, String>,
    /// Link deadline, ms.
    pub link_deadline_ms: u64,
    /// Per VNF.
    pub vnfs: Vec<NsVnfStatus>,
    /// Per link: the link-establishment state machine (requested → connecting → up | failed
    /// with a reason) with the ms of every step.
    #[schema(value_type = Vec<Object>)]
    pub links: Vec<serde_json::Value>,
    /// SOL003 `VnfInstance` records, once instantiated.
    #[schema(value_type = Vec<Object>)]
    pub vnf_instances: Vec<serde_json::Value>,
    /// The plan: per-site generic commands (what terminate undoes).
    #[schema(value_type = Object)]
    pub plan: serde_json::Value,
    /// Run-time CP information the sites reported, by CP id.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub cps: serde_json::Value,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Wall-clock ms of the instantiation, once done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<u64>,
    /// Creation time, unix ms.
    pub created_at: u64,
    /// The server running its current work (instantiate, scale, terminate): only that
    /// server, restarted, declares the work interrupted. Absent on records from before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_lists_must_be_sorted_disjoint_ranges() {
        assert!(validate_dirty(&[]).is_ok());
        assert!(validate_dirty(&[[0, 2], [2, 1], [9, 4]]).is_ok());
        let bad = |d: &[[u64; 2]], what: &str| {
            let e = validate_dirty(d).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        };
        bad(&[[5, 0]], "range 0 is empty");
        bad(&[[5, 2], [6, 1]], "sorted and disjoint");
        bad(&[[9, 1], [3, 1]], "sorted and disjoint");
        bad(&[[u64::MAX, 2]], "beyond the largest block");
        let many: Vec<[u64; 2]> = (0..=MAX_DIRTY_RANGES as u64).map(|i| [2 * i, 1]).collect();
        bad(&many, "at most");
    }

    #[test]
    fn host_events_are_tagged_by_kind() {
        let vm = crate::VmId::new_random();
        for (ev, line) in [
            (HostEvent::Resync, r#"{"kind":"resync"}"#.to_owned()),
            (HostEvent::Ping, r#"{"kind":"ping"}"#.to_owned()),
            (
                HostEvent::Unassigned { vm },
                format!(r#"{{"kind":"unassigned","vm":"{vm}"}}"#),
            ),
        ] {
            assert_eq!(serde_json::to_string(&ev).unwrap(), line);
            assert_eq!(serde_json::from_str::<HostEvent>(&line).unwrap(), ev);
        }
        let err = serde_json::from_str::<HostEvent>(r#"{"kind":"reboot"}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `reboot`"),
            "{err}"
        );
    }

    #[test]
    fn create_vm_rejects_unknown_fields() {
        let err = serde_json::from_str::<CreateVm>(
            r#"{"name":"a","image":"i","vcpus":1,"memory_mib":64,"vcpu":2}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `vcpu`"), "{err}");
    }

    #[test]
    fn create_vm_resource_tables_are_checked() {
        let req = |tables: &[&str], redundant: bool| CreateVm {
            name: "web-1".into(),
            image: "debian".into(),
            vcpus: 1,
            memory_mib: 64,
            redundant,
            resource_tables: tables.iter().map(|t| (*t).to_owned()).collect(),
            ..Default::default()
        };
        let ok = req(&["flows", "routes"], false).validate().unwrap();
        assert_eq!(
            ok.resource_tables
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>(),
            ["flows", "routes"]
        );
        let e = req(&["flows", "Bad"], false).validate().unwrap_err();
        assert_eq!(e.field, "resource_tables[1]");
        let e = req(&["flows", "routes", "flows"], false)
            .validate()
            .unwrap_err();
        assert_eq!(e.to_string(), "resource_tables[2]: duplicate: flows", "{e}");
        let nine: Vec<String> = (0..=MAX_VM_TABLES).map(|i| format!("t{i}")).collect();
        let nine: Vec<&str> = nine.iter().map(String::as_str).collect();
        let e = req(&nine, false).validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "resource_tables: at most 8 resource tables per VM, got 9"
        );
        let e = req(&["flows"], true).validate().unwrap_err();
        assert_eq!(e.field, "resource_tables");
        assert!(e.message.contains("cannot be redundant"), "{e}");
        // Absent from the JSON when empty; read when given.
        let json = serde_json::to_string(&req(&[], false)).unwrap();
        assert!(!json.contains("resource_tables"), "{json}");
        let back: CreateVm = serde_json::from_str(
            r#"{"name":"a","image":"i","vcpus":1,"memory_mib":64,"resource_tables":["flows"]}"#,
        )
        .unwrap();
        assert_eq!(back.resource_tables, ["flows"]);
    }

    #[test]
    fn create_vm_validation_names_field() {
        let mut req = CreateVm {
            name: "web-1".into(),
            image: "debian".into(),
            vcpus: 0,
            memory_mib: 512,
            host: None,
            tenant: None,
            redundant: false,
            disk_gib: None,
            ..Default::default()
        };
        assert_eq!(
            req.validate().unwrap_err().to_string(),
            "vcpus: must be between 1 and 64, got 0"
        );
        req.vcpus = 2;
        req.memory_mib = 8;
        assert_eq!(req.validate().unwrap_err().field, "memory_mib");
        req.memory_mib = 512;
        req.host = Some("Bad".into());
        assert_eq!(req.validate().unwrap_err().field, "host");
        req.host = None;
        req.image = String::new();
        assert_eq!(req.validate().unwrap_err().field, "image");
        req.image = "debian".into();
        assert_eq!(req.validate().unwrap().vcpus, 2);
    }

    #[test]
    fn create_token_tenant_rules() {
        let t = |role, tenant: Option<&str>| CreateToken {
            tenant: tenant.map(str::to_owned),
            ..CreateToken::new(role)
        };
        assert!(t(Role::Member, Some("acme")).validate().is_ok());
        assert_eq!(
            t(Role::Member, None).validate().unwrap_err().field,
            "tenant"
        );
        assert_eq!(
            t(Role::Agent, Some("acme"))
                .validate()
                .unwrap_err()
                .to_string(),
            "tenant: must be absent for a agent token"
        );
        assert_eq!(t(Role::Admin, None).validate().unwrap(), None);
    }

    #[test]
    fn create_token_lifetime_and_description() {
        let mut t = CreateToken::new(Role::Member);
        assert_eq!(
            t.lifetime_ms().unwrap(),
            Some(DEFAULT_TOKEN_TTL_SECS * 1000)
        );
        t.ttl_secs = Some(0);
        assert_eq!(t.lifetime_ms().unwrap_err().field, "ttl_secs");
        t.ttl_secs = Some(MAX_TOKEN_TTL_SECS + 1);
        assert_eq!(t.lifetime_ms().unwrap_err().field, "ttl_secs");
        t.ttl_secs = Some(1);
        assert_eq!(t.lifetime_ms().unwrap(), Some(1000));
        // Agents never expire unless asked to.
        assert_eq!(CreateToken::new(Role::Agent).lifetime_ms().unwrap(), None);
        t.description = Some("x".repeat(MAX_TOKEN_DESCRIPTION + 1));
        assert_eq!(t.validate_description().unwrap_err().field, "description");
        t.description = Some("ci\nkey".into());
        assert_eq!(t.validate_description().unwrap_err().field, "description");
        t.description = Some("ci key".into());
        assert_eq!(t.validate_description().unwrap().as_deref(), Some("ci key"));
        // Scope defaults to read-write and is spelled with a dash.
        let parsed: CreateToken =
            serde_json::from_str(r#"{"role":"member","scope":"read-only"}"#).unwrap();
        assert_eq!(parsed.scope, TokenScope::ReadOnly);
        let parsed: CreateToken = serde_json::from_str(r#"{"role":"member"}"#).unwrap();
        assert_eq!(parsed.scope, TokenScope::ReadWrite);
    }

    #[test]
    fn register_host_validation() {
        let mut h = RegisterHost {
            name: "h1".into(),
            cpus: 8,
            vcpus: None,
            memory_mib: 8192,
            disk_gib: 100,
            drivers: vec!["process".into(), "Q".into()],
            agent_url: None,
            nbd_addr: None,
            link_addr: None,
            uplink_ip: None,
        };
        assert_eq!(h.validate().unwrap_err().field, "drivers[1]");
        h.drivers.pop();
        h.agent_url = Some("localhost:1".into());
        assert_eq!(h.validate().unwrap_err().field, "agent_url");
        h.agent_url = Some("http://127.0.0.1:1".into());
        assert_eq!(h.validate().unwrap().as_str(), "h1");
        h.cpus = 0;
        assert_eq!(h.validate().unwrap_err().field, "cpus");
    }

    #[test]
    fn image_needs_something_to_boot() {
        let mut i = CreateImage {
            name: "img".into(),
            kernel: None,
            initrd: Some("/boot/initrd".into()),
            disk_template: None,
            cmdline: String::new(),
            disk_mib: 0,
            tenant: None,
        };
        assert_eq!(i.validate().unwrap_err().field, "kernel");
        let d = format!("sha256:{}", "0f".repeat(32));
        i.disk_template = Some(d.clone());
        assert_eq!(i.validate().unwrap_err().field, "initrd");
        i.initrd = None;
        assert_eq!(i.validate().unwrap().2.disk_template.unwrap().as_str(), d);
        // The hole the image store closes: a host path is refused with the reason.
        i.kernel = Some("/etc/shadow".into());
        let e = i.validate().unwrap_err();
        assert_eq!(e.field, "kernel");
        assert!(e.message.contains("host paths are not accepted"), "{e}");
    }

    #[test]
    fn report_limits() {
        let r = ObservedReport {
            host: "h1".into(),
            state: ReportedState::Running,
            error: None,
            console_tail: Some("x".repeat(MAX_CONSOLE_TAIL + 1)),
            cpu_time_ms: None,
        };
        assert_eq!(r.validate().unwrap_err().field, "console_tail");
        // Found by schemathesis: 2^63 was accepted against the contract's int64.
        let r = ObservedReport {
            console_tail: None,
            cpu_time_ms: Some(1 << 63),
            ..r
        };
        let e = r.validate().unwrap_err();
        assert_eq!(e.field, "cpu_time_ms");
        assert!(e.message.contains("9223372036854775808"), "{e}");
        let r = ObservedReport {
            cpu_time_ms: Some(i64::MAX as u64),
            ..r
        };
        assert!(r.validate().is_ok());
        assert_eq!(ReportedState::Deleted.observed(), None);
    }
}

/// The fetch orders a migration's cache rebuild can use (see `docs/CACHE.md`).
pub const STRATEGIES: [&str; 7] = [
    "none",
    "redirect",
    "linear",
    "full-copy",
    "heat",
    "pattern",
    "heat+pattern",
];

/// The default fetch order: the seed's method.
pub const DEFAULT_STRATEGY: &str = "heat+pattern";

/// A fetch order name (default [`DEFAULT_STRATEGY`]), checked against [`STRATEGIES`].
pub fn validate_strategy(strategy: Option<&str>) -> Result<String, ValidationError> {
    let s = strategy.unwrap_or(DEFAULT_STRATEGY);
    if STRATEGIES.contains(&s) {
        Ok(s.to_owned())
    } else {
        Err(ValidationError::new(
            "strategy",
            format!("must be one of {}, got {s:?}", STRATEGIES.join(", ")),
        ))
    }
}

/// `POST /v1/vms/{id}/migrate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateVm {
    /// Destination host.
    pub to: String,
    /// Fetch order of the cache rebuild; default `heat+pattern`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Cache pre-copy: the destination starts fetching from the source's cache while the
    /// memory still moves (not only at switch-over); the source's dirty list then drops
    /// what its guest rewrote meanwhile. No effect with `none` and `full-copy`.
    #[serde(default)]
    pub precopy: bool,
}

impl MigrateVm {
    /// Checks the host name and the strategy.
    pub fn validate(&self) -> Result<(Name, String), ValidationError> {
        let to = validate_name("to", &self.to)?;
        Ok((to, validate_strategy(self.strategy.as_deref())?))
    }
}

/// `PUT /v1/vms/{id}/trace`: start or stop recording the VM disk's block requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTrace {
    /// `true` starts a new recording (replacing a finished one); `false` stops it.
    pub recording: bool,
}

/// `PUT /v1/migrations/{id}/report`: an agent moves a migration along.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationReport {
    /// The reporting host: the migration's source or destination.
    pub host: String,
    /// The new state.
    pub state: MigrationState,
    /// Destination, with `ready`: where QEMU waits for the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming_uri: Option<String>,
    /// Source, with `warming`: QEMU's figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<QemuMigrationStats>,
    /// Destination: cache rebuild progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<CacheProgress>,
    /// With `failed`: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Source, with `warming` of a pre-copy migration: the blocks its guest wrote since
    /// the snapshot, as sorted disjoint ranges `[first block, count]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Vec<u64>>>)]
    pub dirty: Option<Vec<[u64; 2]>>,
}

/// Most ranges a dirty list may have; a source with more sends their hull instead (a
/// superset, which is always safe).
pub const MAX_DIRTY_RANGES: usize = 65_536;

/// Checks a dirty list: at most [`MAX_DIRTY_RANGES`] ranges, each non-empty, sorted,
/// disjoint and inside `u64`.
pub fn validate_dirty(dirty: &[[u64; 2]]) -> Result<(), ValidationError> {
    if dirty.len() > MAX_DIRTY_RANGES {
        return Err(ValidationError::new(
            "dirty",
            format!("{} ranges, at most {MAX_DIRTY_RANGES}", dirty.len()),
        ));
    }
    let mut end = 0u64;
    for (i, r) in dirty.iter().enumerate() {
        let [first, count] = *r;
        if count == 0 {
            return Err(ValidationError::new("dirty", format!("range {i} is empty")));
        }
        if i > 0 && first < end {
            return Err(ValidationError::new(
                "dirty",
                format!("range {i} starts at block {first}, before the end of the previous one ({end}): ranges must be sorted and disjoint"),
            ));
        }
        end = first.checked_add(count).ok_or_else(|| {
            ValidationError::new(
                "dirty",
                format!("range {i} ends beyond the largest block number"),
            )
        })?;
    }
    Ok(())
}

impl MigrationReport {
    /// Checks the host name and field lengths.
    pub fn validate(&self) -> Result<Name, ValidationError> {
        let host = validate_name("host", &self.host)?;
        validate_error_len(self.error.as_deref())?;
        if let Some(d) = &self.dirty {
            validate_dirty(d)?;
        }
        if let Some(u) = &self.incoming_uri {
            let ok = u
                .strip_prefix("tcp:")
                .is_some_and(|a| a.parse::<std::net::SocketAddr>().is_ok());
            if !ok {
                return Err(ValidationError::new(
                    "incoming_uri",
                    format!("must be tcp:IP:PORT, got {u:?}"),
                ));
            }
        }
        Ok(host)
    }
}

/// `POST /v1/hosts/{name}/maintenance`: cordon the host and move its VMs away.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnterMaintenance {
    /// Move every VM to this host (default: the scheduler picks hosts that fit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Only return the plan (which VM goes where); change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Fetch order for the live migrations (default `heat+pattern`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
}

impl EnterMaintenance {
    /// Checks the target name and the strategy.
    pub fn validate(&self) -> Result<(Option<Name>, String), ValidationError> {
        let to = match &self.to {
            Some(t) => Some(validate_name("to", t)?),
            None => None,
        };
        Ok((to, validate_strategy(self.strategy.as_deref())?))
    }
}

/// `PUT /v1/storage`: the storage resources and which host reaches which storage.
/// Servers are the registered hosts; their capacity and liveness come from them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StorageInventory {
    /// Storage resources (arrays, pools), in the `sched` crate's format: `name`,
    /// `capacity_gib`, `free_gib`, `replication` (tags), `peers`, `failure_domain`.
    #[schema(value_type = Vec<Object>)]
    pub storage: Vec<serde_json::Value>,
    /// Host name → storage names it can connect to.
    #[serde(default)]
    pub connectivity: std::collections::BTreeMap<String, Vec<String>>,
}

/// `POST /v1/placements:explain`: what a redundant VM of this size would get, and
/// why not when nothing fits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementQuery {
    /// Disk size on each storage of the pair, GiB.
    pub disk_gib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
}

impl PlacementQuery {
    /// Checks the sizes against the limits of a VM ([`CreateVm::validate`]).
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_range("disk_gib", self.disk_gib, 1, MAX_DISK_MIB >> 10)?;
        validate_range("vcpus", self.vcpus, 1, MAX_VCPUS)?;
        validate_range(
            "memory_mib",
            self.memory_mib,
            MIN_VM_MEMORY_MIB,
            MAX_VM_MEMORY_MIB,
        )?;
        Ok(())
    }
}

/// `POST /v1/vnfds` and `POST /v1/nsds`: a descriptor's YAML text (ETSI SOL001 style).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DescriptorUpload {
    /// The YAML document.
    pub descriptor: String,
}

/// A stored VNF or NS descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StoredDescriptor {
    /// `metadata.descriptor_id`.
    pub id: String,
    /// `vnfd` or `nsd`.
    pub kind: String,
    /// The owning tenant.
    pub tenant: TenantId,
    /// The YAML text as uploaded.
    pub descriptor: String,
    /// Upload time, unix ms.
    pub created_at: u64,
}

/// What kind of long work an [`Operation`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    /// A live migration of one VM (its record: `/v1/migrations/{id}`).
    Migration,
    /// A maintenance drain of one host (`/v1/maintenance/{id}`).
    Drain,
    /// Instantiating a network service (`/v1/ns-instances/{id}`).
    NsInstantiate,
    /// Scaling a network service.
    NsScale,
    /// Terminating a network service.
    NsTerminate,
}

/// Where an [`Operation`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    /// Not finished; the operation driver moves it along (after a restart too).
    Running,
    /// Finished as asked.
    Succeeded,
    /// Finished without doing what was asked; `error` says why.
    Failed,
    /// Stopped on request.
    Cancelled,
}

/// Long work of the control plane, one view over the record that persists it (a
/// migration, a drain session, an NS instance), so that every kind is listed, followed
/// and cancelled the same way. The id is that record's id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Operation {
    /// The id of the record that persists it.
    pub id: String,
    /// What kind of work.
    pub kind: OperationKind,
    /// What it works on, as text: `vm web-1 host-a → host-b`, `host host-a`, `ns edge`.
    pub target: String,
    /// The tenant whose object it is; none for an operator's (a drain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
    /// Where it is.
    pub state: OperationState,
    /// The step it is at, in the record's words (`draining`, `warming`, `instantiating`).
    pub step: String,
    /// Units done (blocks warmed, VMs moved, VNFs ready).
    pub done: u64,
    /// Units in all; 0 when not known yet.
    pub total: u64,
    /// Start, unix ms.
    pub started_at: u64,
    /// End, unix ms, once finished (when the record keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
