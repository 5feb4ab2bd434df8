//! The records kept in the state store (JSON-encoded) and returned by the API.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    BlobDigest, HostId, ImageId, MaintenanceId, MigrationId, Name, NetworkId, TenantId, TokenId,
    ValidationError, VmId,
};

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, across tenants.
    Admin,
    /// A node agent: registers hosts, reads assignments, reports observed state.
    Agent,
    /// A tenant's user: its own VMs and images, and public images.
    Member,
}

impl Role {
    /// The lowercase wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Agent => "agent",
            Role::Member => "member",
        }
    }
}

/// A tenant: the unit of isolation for VMs and images.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Tenant {
    /// Stable id.
    pub id: TenantId,
    /// Unique name.
    pub name: Name,
    /// Creation time, unix milliseconds.
    pub created_at: u64,
}

/// Which HTTP methods a token may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TokenScope {
    /// `GET` and `HEAD` only: dashboards, scrapers, auditors.
    ReadOnly,
    /// Every method the token's role allows.
    #[default]
    ReadWrite,
}

impl TokenScope {
    /// The wire name (`read-only`, `read-write`).
    pub fn as_str(self) -> &'static str {
        match self {
            TokenScope::ReadOnly => "read-only",
            TokenScope::ReadWrite => "read-write",
        }
    }
}

/// What the store keeps for a token (under the SHA-256 of the token, never the token).
///
/// Records written before tokens had ids, expiry and scopes lack those fields.
/// They load with the serde defaults: no id (the server gives them one at
/// start, see `api::bootstrap_admin`), no prefix, **never expiring** and
/// **read-write** — exactly what such a token granted when it was minted, so
/// that upgrading the server neither locks out a running agent nor widens any
/// token. Operators list and revoke them like any other token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The role the token grants.
    pub role: Role,
    /// The tenant of a member token; `None` for admin and agent tokens.
    pub tenant: Option<TenantId>,
    /// Creation time, unix milliseconds.
    pub created_at: u64,
    /// Stable id, for listing and revoking; `None` only in records written
    /// before ids existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<TokenId>,
    /// The first characters of the token, so that a user can tell tokens
    /// apart in a list; empty in records written before prefixes existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// Expiry, unix milliseconds; `None`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Which methods the token may use.
    #[serde(default)]
    pub scope: TokenScope,
    /// Free text from whoever minted it ("ci deploy key").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl TokenRecord {
    /// Whether the token has expired at `now` (unix ms). A token is refused
    /// from its expiry instant on.
    pub fn expired_at(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|e| now >= e)
    }
}

/// Whether a host's agent is alive, computed from its last heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// A heartbeat arrived within the timeout.
    Up,
    /// No heartbeat within the timeout.
    Down,
}

impl HostState {
    /// `Up` if `last_heartbeat` is at most `timeout_ms` before `now` (all unix ms).
    /// A heartbeat from the future (clock skew) counts as fresh.
    pub fn at(last_heartbeat: u64, now: u64, timeout_ms: u64) -> Self {
        if now.saturating_sub(last_heartbeat) <= timeout_ms {
            HostState::Up
        } else {
            HostState::Down
        }
    }

    /// The lowercase wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Up => "up",
            HostState::Down => "down",
        }
    }
}

/// A machine that runs a node agent and hosts VMs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Host {
    /// Stable id; kept across re-registration under the same name.
    pub id: HostId,
    /// Unique name; the identity agents register under.
    pub name: Name,
    /// CPUs offered to VMs.
    pub cpus: u32,
    /// vCPUs the scheduler may place here (`cpus` × the CPU allocation ratio); 0 in
    /// records from before overcommit, read as `cpus` × the default ratio.
    #[serde(default)]
    pub vcpus: u32,
    /// Memory offered to VMs, MiB.
    pub memory_mib: u64,
    /// Disk offered to VMs, GiB.
    pub disk_gib: u64,
    /// Compute drivers the agent supports (`qemu`, `process`).
    pub drivers: Vec<String>,
    /// Where the agent's own API listens, if it has one. This and the other
    /// addresses below are host internals: members get the host without them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_url: Option<String>,
    /// Where the host's NBD server listens (`IP:PORT`): VM disks through the host's
    /// block cache, and the cache itself for migration peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_addr: Option<String>,
    /// Where the agent relays link requests into its guests (`IP:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_addr: Option<String>,
    /// The host's data-network address (VXLAN tunnel end for VM networks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_ip: Option<String>,
    /// The maintenance session holding this host, if any: the host is cordoned (no new
    /// VMs) while it is set, across agent restarts and crashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<MaintenanceId>,
    /// Last heartbeat, unix milliseconds.
    pub last_heartbeat: u64,
    /// Computed from `last_heartbeat` whenever the host is read; the stored
    /// value is only a snapshot.
    pub state: HostState,
}

impl Host {
    /// vCPUs the scheduler may place on the host.
    pub fn schedulable_vcpus(&self) -> u32 {
        if self.vcpus == 0 {
            self.cpus
                .saturating_mul(crate::api::DEFAULT_CPU_ALLOCATION_RATIO)
        } else {
            self.vcpus
        }
    }

    /// The host as a tenant member sees it: capacity and liveness, without the
    /// internal addresses (agent API, NBD, link relay, data network), which
    /// only the control plane, agents and admins need.
    pub fn without_internals(mut self) -> Self {
        self.agent_url = None;
        self.nbd_addr = None;
        self.link_addr = None;
        self.uplink_ip = None;
        self
    }

    /// Recomputes [`Host::state`] for the time `now` (unix ms).
    pub fn refresh_state(&mut self, now: u64, timeout_ms: u64) {
        self.state = HostState::at(self.last_heartbeat, now, timeout_ms);
    }
}

/// A bootable image: which image-store blobs hold its kernel, initrd and disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    /// Stable id.
    pub id: ImageId,
    /// Owning tenant; `None` for a public image, visible to every tenant.
    pub tenant: Option<TenantId>,
    /// Name, unique within its tenant (or among public images).
    pub name: Name,
    /// Kernel (direct kernel boot): a blob digest `sha256:…`, if any. Text rather
    /// than [`BlobDigest`] because records made before the image store hold a host
    /// path here; [`Image::blobs`] refuses those.
    pub kernel: Option<String>,
    /// Initrd: a blob digest, if any.
    pub initrd: Option<String>,
    /// Disk template each VM's disk is cloned from: a blob digest, if any.
    pub disk_template: Option<String>,
    /// Kernel command line.
    pub cmdline: String,
    /// Size of each VM's disk, MiB.
    pub disk_mib: u64,
    /// Creation time, unix milliseconds.
    pub created_at: u64,
}

impl Image {
    /// The image's blobs. An image made before the image store names host files,
    /// which nothing may open any more: it is refused with the way out.
    pub fn blobs(&self) -> Result<ImageBlobs, ValidationError> {
        let digest = |field: &str, v: &Option<String>| {
            v.as_deref()
                .map(|d| {
                    crate::parse_digest(field, d).map_err(|_| {
                        ValidationError::new(
                            field,
                            format!(
                                "image {} names the host file {d:?}: images made before the image \
                                 store cannot start; upload its files again (vinfra image upload)",
                                self.name
                            ),
                        )
                    })
                })
                .transpose()
        };
        Ok(ImageBlobs {
            kernel: digest("kernel", &self.kernel)?,
            initrd: digest("initrd", &self.initrd)?,
            disk_template: digest("disk_template", &self.disk_template)?,
        })
    }
}

/// The image-store blobs an image boots from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageBlobs {
    /// Kernel, for direct kernel boot.
    pub kernel: Option<BlobDigest>,
    /// Initrd.
    pub initrd: Option<BlobDigest>,
    /// Disk template.
    pub disk_template: Option<BlobDigest>,
}

impl ImageBlobs {
    /// Every blob, once each.
    pub fn all(&self) -> Vec<&BlobDigest> {
        let mut v: Vec<&BlobDigest> = [&self.kernel, &self.initrd, &self.disk_template]
            .into_iter()
            .flatten()
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// A file in the image store, as stored for one owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Blob {
    /// Its content address.
    pub digest: BlobDigest,
    /// Size in bytes.
    pub size: u64,
    /// The tenant that uploaded it; `None` for an admin's blob, which every
    /// tenant's images may use (admins make the public images).
    pub tenant: Option<TenantId>,
    /// When it was first stored for this owner, unix milliseconds.
    pub created_at: u64,
}

/// What the user wants a VM to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    /// Running.
    Running,
    /// Stopped, resources kept reserved on its host.
    Stopped,
    /// Gone: the agent tears it down, then confirms, and the record disappears.
    Deleted,
}

impl DesiredState {
    /// The lowercase wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Running => "running",
            DesiredState::Stopped => "stopped",
            DesiredState::Deleted => "deleted",
        }
    }
}

/// What the agent last reported about a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ObservedState {
    /// No report from the agent yet.
    Pending,
    /// Booting.
    Starting,
    /// Running.
    Running,
    /// Shutting down.
    Stopping,
    /// Stopped.
    Stopped,
    /// Failed; see [`Vm::error`].
    Failed,
    /// Paused by its own agent: the host could not renew its lease (cut off from the
    /// control plane), so the VM's standby may be running it. A redundant VM only; the
    /// agent resumes it if the VM is still assigned there when it reaches the server again.
    Fenced,
}

impl ObservedState {
    /// Every state, in lifecycle order (for metrics that list zeros too).
    pub const ALL: [ObservedState; 7] = [
        ObservedState::Pending,
        ObservedState::Starting,
        ObservedState::Running,
        ObservedState::Stopping,
        ObservedState::Stopped,
        ObservedState::Failed,
        ObservedState::Fenced,
    ];

    /// The lowercase wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ObservedState::Pending => "pending",
            ObservedState::Starting => "starting",
            ObservedState::Running => "running",
            ObservedState::Stopping => "stopping",
            ObservedState::Stopped => "stopped",
            ObservedState::Failed => "failed",
            ObservedState::Fenced => "fenced",
        }
    }
}

/// A virtual machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    /// Stable id.
    pub id: VmId,
    /// Owning tenant.
    pub tenant: TenantId,
    /// Name, unique within the tenant.
    pub name: Name,
    /// The image it boots.
    pub image: ImageId,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Name of the host it is assigned to.
    pub host: Name,
    /// What the user wants.
    pub desired: DesiredState,
    /// What the agent last reported.
    pub observed: ObservedState,
    /// The agent's last error, if `observed` is `failed` (or a failed action).
    pub error: Option<String>,
    /// Creation time, unix milliseconds.
    pub created_at: u64,
    /// The live migration in progress, if any (the VM cannot start another one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationId>,
    /// Redundant placement: replicated storage pair and a standby host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redundancy: Option<Redundancy>,
    /// Network interfaces, in guest order, with the addresses vinfra's IPAM gave them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
    /// Extra kernel arguments appended to the image's command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_args: Option<String>,
    /// Block-trace recording of the VM's disk (`vinfra vm trace start|stop`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<VmTrace>,
    /// Resource tables of its host that it maps (docs/SHM.md, "VMs as devices"), by
    /// name (the tenant's own). Such a VM stays on that host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource_tables: Vec<Name>,
}

/// A recording of a VM disk's block requests, made by the agent's NBD server on the
/// host the VM runs on, in the SNIA / MSR Cambridge CSV format
/// (`Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime`), which
/// `vinfra bench migrate-cache --trace` replays.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmTrace {
    /// Recording is wanted: the host's agent records while this is true.
    pub recording: bool,
    /// When recording was asked for, unix ms.
    pub started_at: u64,
    /// When it was stopped, unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<u64>,
    /// The trace file in the blob store, once the agent has uploaded it after the stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<BlobDigest>,
    /// Its size, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// A virtual network: one L2 segment with one IPv4 subnet, owned by a tenant. VM NICs
/// attach to it and get their addresses from it (vinfra's IPAM).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Network {
    /// Stable id.
    pub id: NetworkId,
    /// Owning tenant.
    pub tenant: TenantId,
    /// Name, unique within the tenant.
    pub name: Name,
    /// Its subnet, canonical (`10.70.0.0/24`).
    pub cidr: String,
    /// Creation time, unix milliseconds.
    pub created_at: u64,
}

/// One VM network interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Nic {
    /// Its name, if it was given one (an NFV connection point's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    /// The network it is on.
    pub network: NetworkId,
    /// That network's name (for display; the id is what counts).
    pub network_name: Name,
    /// Its address, from the network's subnet.
    #[schema(value_type = String)]
    pub ip: std::net::Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix: u8,
    /// Its MAC address (`02:…`, locally administered), derived from the network and IP.
    pub mac: String,
}

impl Nic {
    /// The MAC for `ip` on `network`: locally administered, two bytes of the network id
    /// and the IP's last three octets. Unique on a network (a prefix is at least /8, so
    /// the first octet is the same for every address of a subnet).
    pub fn mac_for(network: NetworkId, ip: std::net::Ipv4Addr) -> String {
        let n = network.0.as_bytes();
        let o = ip.octets();
        format!(
            "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            n[0], n[1], o[1], o[2], o[3]
        )
    }
}

/// Where a redundant VM's two replicas are: the primary (the VM's `host` with
/// `primary_storage`) and the standby (`standby_host` with `standby_storage`), which
/// takes over when the primary host goes down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Redundancy {
    /// Disk size reserved on both storages, GiB.
    pub disk_gib: u64,
    /// Storage of the primary replica.
    pub primary_storage: String,
    /// Host that takes over.
    pub standby_host: Name,
    /// Storage of the standby replica.
    pub standby_storage: String,
    /// How many takeovers happened.
    pub takeovers: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_state_from_heartbeat_age() {
        assert_eq!(HostState::at(1_000, 7_000, 6_000), HostState::Up);
        assert_eq!(HostState::at(1_000, 7_001, 6_000), HostState::Down);
        assert_eq!(HostState::at(9_000, 7_000, 6_000), HostState::Up);
    }

    /// A record stored before tokens had ids, expiry and scopes still loads, as a
    /// never-expiring read-write token (what it granted when it was minted).
    #[test]
    fn legacy_token_records_load_never_expiring_read_write() {
        let tenant = TenantId::new_random();
        let old = format!(r#"{{"role":"member","tenant":"{tenant}","created_at":5}}"#);
        let rec: TokenRecord = serde_json::from_str(&old).unwrap();
        assert_eq!(rec.role, Role::Member);
        assert_eq!(rec.tenant, Some(tenant));
        assert_eq!(rec.id, None);
        assert_eq!(rec.prefix, "");
        assert_eq!(rec.expires_at, None);
        assert_eq!(rec.scope, TokenScope::ReadWrite);
        assert!(!rec.expired_at(u64::MAX));
        let new = TokenRecord {
            expires_at: Some(10),
            ..rec
        };
        assert!(!new.expired_at(9));
        assert!(new.expired_at(10));
    }

    #[test]
    fn enums_use_snake_case_on_the_wire() {
        assert_eq!(
            serde_json::to_string(&ObservedState::Running).unwrap(),
            "\"running\""
        );
        assert_eq!(serde_json::to_string(&Role::Agent).unwrap(), "\"agent\"");
        for s in [TokenScope::ReadOnly, TokenScope::ReadWrite] {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        for s in ObservedState::ALL {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
    }
}

/// Where a live migration is.
///
/// `pending` (created; the source uploads its cache snapshot) → `ready` (the destination
/// opened its cache with the source as peer and started QEMU waiting for the stream) →
/// `migrating` (QEMU moves memory) → `warming` (switched over: the VM runs on the
/// destination, whose cache is rebuilt from the source's) → `completed`; or `failed`
/// from any state before `completed` (the VM stays where it ran).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// Created, waiting for the source's snapshot and the destination's preparation.
    Pending,
    /// The destination waits for the migration stream.
    Ready,
    /// QEMU is moving the VM's memory.
    Migrating,
    /// The VM runs on the destination; its cache is being rebuilt.
    Warming,
    /// Done.
    Completed,
    /// Gave up; `error` says why.
    Failed,
}

impl MigrationState {
    /// The state as text.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationState::Pending => "pending",
            MigrationState::Ready => "ready",
            MigrationState::Migrating => "migrating",
            MigrationState::Warming => "warming",
            MigrationState::Completed => "completed",
            MigrationState::Failed => "failed",
        }
    }

    /// Whether the migration is over (completed or failed).
    pub fn is_final(self) -> bool {
        matches!(self, MigrationState::Completed | MigrationState::Failed)
    }
}

/// QEMU's own numbers for the memory move.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QemuMigrationStats {
    /// Total time, ms.
    pub total_ms: u64,
    /// Guest paused, ms (QEMU's figure).
    pub downtime_ms: u64,
    /// RAM bytes sent.
    pub ram_bytes: u64,
}

/// After reporting `completed`, the destination keeps reporting its cache's figures
/// (state `completed`, [`CacheProgress`] only) for this long, one report every
/// [`WARMUP_REPORT_EVERY_MS`]: the rebuild of a small disk ends in milliseconds, before
/// the guest has read much, and the hit-ratio curve is meant to show the cache serving
/// the guest afterwards. The server accepts such reports for twice as long after
/// `finished_at` and refuses them later.
pub const WARMUP_REPORT_MS: u64 = 30_000;
/// The interval of the reports after `completed` (see [`WARMUP_REPORT_MS`]).
pub const WARMUP_REPORT_EVERY_MS: u64 = 1_000;

/// How the destination's cache rebuild is going.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CacheProgress {
    /// Blocks in the fetch plan.
    pub planned: u64,
    /// Plan entries processed.
    pub done: u64,
    /// Plan entries left.
    pub left: u64,
    /// Bytes read from the source host's cache.
    pub peer_bytes: u64,
    /// Bytes read from the origin.
    pub origin_bytes: u64,
    /// Guest reads served from the destination cache since switch-over.
    pub hits: u64,
    /// Guest reads that missed since switch-over.
    pub misses: u64,
    /// `hits / (hits + misses)`, 0 when there were none.
    pub hit_ratio: f64,
    /// With cache pre-copy: blocks copied before switch-over that the source's guest
    /// rewrote meanwhile, dropped when its dirty list arrived.
    #[serde(default)]
    pub precopy_dropped: u64,
}

/// A live migration of one VM from one host to another, with its cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Migration {
    /// Stable id.
    pub id: MigrationId,
    /// The VM.
    pub vm: VmId,
    /// The VM's tenant (migrations are visible to it).
    pub tenant: TenantId,
    /// The VM's name, for display.
    pub vm_name: Name,
    /// Source host.
    pub from_host: Name,
    /// Destination host.
    pub to_host: Name,
    /// Fetch order of the cache rebuild (`heat+pattern`, `heat`, ...).
    pub strategy: String,
    /// Cache pre-copy: the destination fetches from the source's cache while the memory
    /// moves (see [`crate::api::MigrateVm::precopy`]).
    #[serde(default)]
    pub precopy: bool,
    /// With pre-copy, from the source at switch-over: the blocks its guest wrote since
    /// the cache snapshot, as sorted disjoint ranges `[first block, count]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Vec<u64>>>)]
    pub dirty: Option<Vec<[u64; 2]>>,
    /// Where it is.
    pub state: MigrationState,
    /// The source host's NBD server, where the destination pulls blocks from.
    pub peer_nbd: Option<String>,
    /// Where the destination QEMU listens for the migration stream (`tcp:IP:PORT`).
    pub incoming_uri: Option<String>,
    /// QEMU's figures, once switched over.
    pub qemu: Option<QemuMigrationStats>,
    /// Cache rebuild progress, reported by the destination.
    pub progress: Option<CacheProgress>,
    /// Why it failed.
    pub error: Option<String>,
    /// Creation time, unix ms.
    pub created_at: u64,
    /// Switch-over time, unix ms.
    pub switched_at: Option<u64>,
    /// Completion (or failure) time, unix ms.
    pub finished_at: Option<u64>,
}

/// Where a host maintenance session is.
///
/// `entering` → `draining` (VMs move away one by one, live) → `in_maintenance` (empty,
/// cordoned) → `releasing` → `released`; or `aborted` (the drain stopped on request) or
/// `failed` (a VM could not move: the ones already moved stay where they are).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MaintenanceState {
    /// Accepted, cordoned, not yet draining.
    Entering,
    /// Moving VMs away.
    Draining,
    /// Empty and cordoned.
    InMaintenance,
    /// Being released.
    Releasing,
    /// Released: the host takes VMs again.
    Released,
    /// Stopped on request; see the items for what stays where.
    Aborted,
    /// A VM could not move; see `error`.
    Failed,
}

impl MaintenanceState {
    /// The state as text.
    pub fn as_str(self) -> &'static str {
        match self {
            MaintenanceState::Entering => "entering",
            MaintenanceState::Draining => "draining",
            MaintenanceState::InMaintenance => "in_maintenance",
            MaintenanceState::Releasing => "releasing",
            MaintenanceState::Released => "released",
            MaintenanceState::Aborted => "aborted",
            MaintenanceState::Failed => "failed",
        }
    }

    /// Whether the session still holds its host (cordoned).
    pub fn holds_host(self) -> bool {
        matches!(
            self,
            MaintenanceState::Entering
                | MaintenanceState::Draining
                | MaintenanceState::InMaintenance
                | MaintenanceState::Releasing
        )
    }
}

/// One VM of a drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DrainItemState {
    /// Not started.
    Pending,
    /// Live migration in progress.
    Migrating,
    /// On its new host.
    Moved,
    /// Could not move; still on the host in maintenance.
    Failed,
}

/// A VM to move off a host in maintenance, and where to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DrainItem {
    /// The VM.
    pub vm: VmId,
    /// Its name.
    pub vm_name: Name,
    /// Its target host.
    pub to: Name,
    /// Live migration (a running VM) or a cold move (a stopped one).
    pub live: bool,
    /// Its migration, once started.
    pub migration: Option<MigrationId>,
    /// Where it is.
    pub state: DrainItemState,
    /// Why it failed.
    pub error: Option<String>,
}

/// A maintenance session of one host (maintenance mode, VDUs moved, release).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Maintenance {
    /// Stable id.
    pub id: MaintenanceId,
    /// The host.
    pub host: Name,
    /// Where it is.
    pub state: MaintenanceState,
    /// The VMs to move, in order.
    pub items: Vec<DrainItem>,
    /// Fetch order used by the live migrations.
    pub strategy: String,
    /// Why it failed or was aborted.
    pub error: Option<String>,
    /// Creation time, unix ms.
    pub created_at: u64,
    /// Last change, unix ms.
    pub updated_at: u64,
}
