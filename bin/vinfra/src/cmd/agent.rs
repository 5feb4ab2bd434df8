//! `vinfra agent`: the node agent on one host.

use std::path::{Path, PathBuf};

use anyhow::Context;
use model::api::CreateToken;
use model::Role;

use crate::locate;

/// Which hypervisor an agent drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverKind {
    /// Real VMs: one QEMU process per VM.
    Qemu,
    /// Simulated VMs (no QEMU, no root, no NIC devices): the real agent, disk stack
    /// and migration protocol around a simulated hypervisor. For trying the control
    /// plane with many hosts on one machine, and for tests.
    Sim,
}

impl DriverKind {
    /// The name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Qemu => "qemu",
            DriverKind::Sim => "sim",
        }
    }
}

/// Options of `vinfra agent`.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// This host's name.
    #[arg(long)]
    pub host_name: String,
    /// Where this host keeps VM disks and run dirs.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// File holding a token with the `agent` role (or use --token / VINFRA_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// For an `https://` server: the one-time join token from `vinfra token join`.
    /// The agent checks the server's CA against it, then keeps its certificate,
    /// key and agent token in DATA_DIR/identity.json (0600) for later starts.
    #[arg(long, env = "VINFRA_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Accelerator: auto (KVM only where it really works), kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: String,
    /// Directory with the VMs' origin disk images, shared by every host (a SAN or
    /// NFS mount in production). Default: DATA_DIR/origin (migration then needs the
    /// hosts to share it).
    #[arg(long)]
    pub origin_dir: Option<PathBuf>,
    /// Model a remote SAN: origin bandwidth limit in MB/s (0: unlimited).
    #[arg(long, default_value_t = 0)]
    pub origin_rate_mbps: u64,
    /// Model a remote SAN: origin latency per request in ms.
    #[arg(long, default_value_t = 0)]
    pub origin_latency_ms: u64,
    /// Most 64 KiB blocks each VM's cache holds on this host.
    #[arg(long, default_value_t = 16384)]
    pub cache_blocks: u64,
    /// Where the agent takes link requests for its guests' CPs (registered with
    /// the control plane; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub link_listen: std::net::SocketAddr,
    /// This machine's address on the data network: VM networks reach other machines'
    /// agents through VXLAN (UDP 4789) from it. Run one agent per machine with it.
    #[arg(long)]
    pub uplink_ip: Option<std::net::Ipv4Addr>,
    /// Count this host's VM traffic (a BPF classifier on every VM tap) and report it to
    /// the domain's vSwitch controller at this address (the server's --vswitch-listen).
    #[arg(long)]
    pub vswitch: Option<std::net::SocketAddr>,
    /// The vSwitch controller's domain (the server's --domain).
    #[arg(long, default_value = "default")]
    pub domain: String,
    /// Leave every VM frame to the Linux bridge: by default the classifier forwards frames
    /// between this host's VMs on one bridge itself, skipping the bridge, and with it any
    /// nftables bridge-family or br_netfilter rules you filter VM traffic with.
    #[arg(long)]
    pub bridge_only: bool,
    /// vCPUs offered per CPU: the scheduler places up to CPUs × this many vCPUs here
    /// (like Nova's cpu_allocation_ratio; memory is never overcommitted).
    #[arg(long, default_value_t = 4.0)]
    pub cpu_allocation_ratio: f64,
    /// Where the QEMU driver keeps kernels unpacked for direct (PVH) boot, shared by every
    /// agent of this machine and named by each kernel's content.
    #[arg(long, default_value = "/var/cache/vinfra/kernels")]
    pub kernel_cache: PathBuf,
    /// The hypervisor: qemu, or sim (simulated VMs; see docs/ARCHITECTURE.md).
    #[arg(long, value_enum, default_value = "qemu")]
    pub driver: DriverKind,
    #[command(flatten)]
    pub sim: SimArgs,
}

/// Options of the sim driver (ignored with `--driver qemu`).
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// With --driver sim: CPUs this simulated host registers with.
    #[arg(long, default_value_t = agent::HostResources::SIM_DEFAULT.cpus)]
    pub sim_cpus: u32,
    /// With --driver sim: memory (MiB) this simulated host registers with.
    #[arg(long, default_value_t = agent::HostResources::SIM_DEFAULT.memory_mib)]
    pub sim_memory_mib: u64,
    /// With --driver sim: disk (GiB) this simulated host registers with.
    #[arg(long, default_value_t = agent::HostResources::SIM_DEFAULT.disk_gib)]
    pub sim_disk_gib: u64,
    /// With --driver sim: time from start to the guest's READY line, in ms.
    #[arg(long, default_value_t = 200)]
    pub sim_boot_ms: u64,
    /// With --driver sim: the simulated guests do no disk I/O (their disks are still
    /// made and served; TICK lines say read=off write=off).
    #[arg(long)]
    pub sim_no_disk_io: bool,
}

impl SimArgs {
    fn apply(&self, cfg: &mut agent::AgentConfig) {
        let driver = compute::SimDriver::new(compute::SimConfig {
            boot_time: std::time::Duration::from_millis(self.sim_boot_ms),
            disk_io: !self.sim_no_disk_io,
            ..compute::SimConfig::default()
        });
        cfg.driver = std::sync::Arc::new(driver);
        cfg.host_network = false;
        cfg.resources = Some(agent::HostResources {
            cpus: self.sim_cpus.max(1),
            memory_mib: self.sim_memory_mib,
            disk_gib: self.sim_disk_gib,
        });
    }
}

/// Parses `auto|kvm|tcg`.
pub fn parse_accel(s: &str) -> anyhow::Result<compute::Accel> {
    match s {
        "auto" => Ok(compute::Accel::Auto),
        "kvm" => Ok(compute::Accel::Kvm),
        "tcg" => Ok(compute::Accel::Tcg),
        other => anyhow::bail!("--accel {other:?}: expected auto, kvm or tcg"),
    }
}

/// Runs the agent until SIGINT/SIGTERM.
/// The control plane URL comes from the global `--server` (or `VINFRA_URL`).
pub async fn run(
    args: AgentArgs,
    server: Option<String>,
    token: Option<String>,
) -> anyhow::Result<()> {
    let Some(server_url) = server else {
        anyhow::bail!("the agent needs the control plane URL: pass --server URL or set VINFRA_URL");
    };
    let identity = if server_url.starts_with("https://") {
        Some(joined(&server_url, &args).await?)
    } else {
        None
    };
    let token = match (&identity, &args.token_file, token) {
        (Some(id), _, _) => id.token.clone(),
        (None, Some(f), _) => locate::read_trimmed(f)?,
        (None, None, Some(t)) => t,
        (None, None, None) => {
            anyhow::bail!("the agent needs a token: pass --token-file FILE or set VINFRA_TOKEN")
        }
    };
    let mut cfg =
        agent::AgentConfig::new(&server_url, &token, &args.host_name, args.data_dir.clone());
    cfg.tls = identity.map(|id| client::ClientTls {
        ca_pem: id.ca_pem,
        identity: Some(tls::Issued {
            cert_pem: id.cert_pem,
            key_pem: id.key_pem,
        }),
    });
    cfg.accel = parse_accel(&args.accel)?;
    cfg.driver =
        std::sync::Arc::new(compute::QemuDriver::new().with_kernel_cache(&args.kernel_cache));
    if let Some(d) = args.origin_dir {
        cfg.disks.origin_dir = d;
    }
    cfg.disks.origin_rate = args.origin_rate_mbps.saturating_mul(1_000_000);
    cfg.disks.origin_latency = std::time::Duration::from_millis(args.origin_latency_ms);
    cfg.disks.max_cache_blocks = args.cache_blocks.max(1);
    cfg.link_listen = args.link_listen;
    cfg.uplink_ip = args.uplink_ip;
    cfg.traffic = args.vswitch.map(|controller| agent::TrafficReporting {
        controller,
        domain: args.domain.clone(),
        bridge_only: args.bridge_only,
    });
    if !(args.cpu_allocation_ratio > 0.0 && args.cpu_allocation_ratio <= 64.0) {
        anyhow::bail!(
            "--cpu-allocation-ratio {}: must be above 0 and at most 64",
            args.cpu_allocation_ratio
        );
    }
    cfg.cpu_allocation_ratio = args.cpu_allocation_ratio;
    if args.driver == DriverKind::Sim {
        if args.uplink_ip.is_some() {
            anyhow::bail!("--uplink-ip: the sim driver's guests have no NICs to tunnel");
        }
        args.sim.apply(&mut cfg);
    }
    tracing::info!(host = %cfg.host_name, server = %cfg.server_url, driver = args.driver.as_str(), "agent starting");
    agent::run(cfg, async {
        let _ = crate::cmd::server::wait_for_signal().await;
    })
    .await
    .context("agent failed")
}

/// Where a joined agent keeps its identity.
const IDENTITY_FILE: &str = "identity.json";

/// The agent's identity with a TLS server: the one kept from an earlier join, or a
/// new one from joining with `--join-token` (then kept, 0600).
async fn joined(server: &str, args: &AgentArgs) -> anyhow::Result<model::api::JoinResponse> {
    let path = args.data_dir.join(IDENTITY_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let id: model::api::JoinResponse = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a joined agent's identity", path.display()))?;
        if id.host.as_str() != args.host_name {
            anyhow::bail!(
                "{} belongs to host {}, not {}",
                path.display(),
                id.host,
                args.host_name
            );
        }
        return Ok(id);
    }
    let Some(join_token) = &args.join_token else {
        anyhow::bail!(
            "{server} serves TLS: the first start needs --join-token (an admin makes one with \
             `vinfra token join`)"
        );
    };
    let id = client::join(server, join_token, &args.host_name)
        .await
        .with_context(|| format!("cannot join {server}"))?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    locate::write_private(&path, &serde_json::to_string(&id)?, 0o600)?;
    tracing::info!(host = %id.host, "joined the cluster");
    Ok(id)
}

/// The agent token of one `vinfra up` host, minted once and kept in its data dir
/// (0600). One per host: the server's rate limit is per token, and 50 simulated hosts
/// sharing one would exceed it.
pub async fn agent_token(
    client: &client::Client,
    host: &str,
    host_dir: &Path,
) -> anyhow::Result<PathBuf> {
    let path = host_dir.join("agent-token");
    if locate::read_trimmed(&path).is_ok() {
        return Ok(path);
    }
    let created = client
        .create_token(&CreateToken {
            description: Some(format!("vinfra up agent of {host}")),
            ..CreateToken::new(Role::Agent)
        })
        .await
        .context("cannot mint the agent token")?;
    locate::write_private(&path, &created.token, 0o600)?;
    Ok(path)
}
