//! The records kept in the state store (JSON-encoded) and returned by the API.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{HostId, ImageId, Name, TenantId, VmId};

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

/// What the store keeps for a token (under the SHA-256 of the token, never the token).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The role the token grants.
    pub role: Role,
    /// The tenant of a member token; `None` for admin and agent tokens.
    pub tenant: Option<TenantId>,
    /// Creation time, unix milliseconds.
    pub created_at: u64,
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
    /// Memory offered to VMs, MiB.
    pub memory_mib: u64,
    /// Disk offered to VMs, GiB.
    pub disk_gib: u64,
    /// Compute drivers the agent supports (`qemu`, `process`).
    pub drivers: Vec<String>,
    /// Where the agent's own API listens, if it has one.
    pub agent_url: Option<String>,
    /// Last heartbeat, unix milliseconds.
    pub last_heartbeat: u64,
    /// Computed from `last_heartbeat` whenever the host is read; the stored
    /// value is only a snapshot.
    pub state: HostState,
}

impl Host {
    /// Recomputes [`Host::state`] for the time `now` (unix ms).
    pub fn refresh_state(&mut self, now: u64, timeout_ms: u64) {
        self.state = HostState::at(self.last_heartbeat, now, timeout_ms);
    }
}

/// A bootable image: where the agent finds the kernel, initrd and disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    /// Stable id.
    pub id: ImageId,
    /// Owning tenant; `None` for a public image, visible to every tenant.
    pub tenant: Option<TenantId>,
    /// Name, unique within its tenant (or among public images).
    pub name: Name,
    /// Kernel path on the hosts (direct kernel boot), if any.
    pub kernel: Option<String>,
    /// Initrd path on the hosts, if any.
    pub initrd: Option<String>,
    /// Disk template path on the hosts that each VM's disk is cloned from, if any.
    pub disk_template: Option<String>,
    /// Kernel command line.
    pub cmdline: String,
    /// Size of each VM's disk, MiB.
    pub disk_mib: u64,
    /// Creation time, unix milliseconds.
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
}

impl ObservedState {
    /// Every state, in lifecycle order (for metrics that list zeros too).
    pub const ALL: [ObservedState; 6] = [
        ObservedState::Pending,
        ObservedState::Starting,
        ObservedState::Running,
        ObservedState::Stopping,
        ObservedState::Stopped,
        ObservedState::Failed,
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

    #[test]
    fn enums_use_snake_case_on_the_wire() {
        assert_eq!(
            serde_json::to_string(&ObservedState::Running).unwrap(),
            "\"running\""
        );
        assert_eq!(serde_json::to_string(&Role::Agent).unwrap(), "\"agent\"");
        for s in ObservedState::ALL {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
    }
}
