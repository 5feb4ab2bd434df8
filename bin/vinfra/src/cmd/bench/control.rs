//! `vinfra bench control`: the control plane's API throughput and latency on each store
//! side by side, and how long the operation driver is leaderless when its leader dies.
//!
//! Setups, each on real `vinfra server` processes (children of this binary) reached by
//! the typed client over loopback:
//! - `redb`: one server on an embedded redb file;
//! - `etcd`: one server on a fresh three-member etcd cluster;
//! - `etcd3`: three servers on another fresh three-member etcd cluster, the clients
//!   spread over them (client `i` talks to server `i % 3`).
//!
//! Each setup registers hosts with room for every VM of the run (through the API, with
//! an agent token; no agent runs, so VMs stay `pending`) and an image, then measures
//! `--ops` VM creates and then `--ops` VM lists (which return the VMs just created),
//! issued by `--clients` concurrent clients. Rate limiting is off on these servers.
//!
//! Failover, on the three servers of `etcd3` (election lease `--lease-s`): the bench
//! reads the leader of the operation driver's election from etcd, SIGKILLs that server,
//! and at once enters maintenance of a host holding one stopped VM through a surviving
//! server (the killed leader never saw that drain). It follows etcd's watch until the
//! election key names another server ("leads"), until the drain session's first write
//! by a driver (it leaves `entering`: "first drain step"), and until the host is empty
//! (a stopped VM moves cold, by re-assignment). Then it restarts the killed server on
//! the same data and goes again. Times run from just before the signal.
//!
//! The measurement is here; [`render`] prints it.

pub(crate) mod procs;
pub mod render;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use model::api::{CreateVm, EnterMaintenance};
use model::MaintenanceState;
use serde::Serialize;
use store::Store;

use procs::{EtcdCluster, Server};

/// Options of `vinfra bench control`.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlArgs {
    /// Operations of each kind (VM creates, then VM lists) per setup.
    #[arg(long, default_value_t = 500)]
    pub ops: usize,
    /// Concurrent clients, spread over the servers of a setup.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// A phase (one operation kind on one setup) stops after this many seconds, done or
    /// not; the table says how many operations it did.
    #[arg(long, default_value_t = 15)]
    pub phase_secs: u64,
    /// Leader kills for the failover time (0: no failover measurement).
    #[arg(long, default_value_t = 5)]
    pub failovers: usize,
    /// The operation driver's election lease, seconds (`vinfra server --election-lease-s`).
    #[arg(long, default_value_t = 2)]
    pub lease_s: u64,
}

/// A server-and-store configuration the API is measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Setup {
    /// One server on a redb file.
    Redb,
    /// One server on a three-member etcd cluster.
    Etcd,
    /// Three servers on a three-member etcd cluster.
    Etcd3,
}

impl Setup {
    /// Every setup, in the order of the table's columns.
    pub const ALL: [Setup; 3] = [Setup::Redb, Setup::Etcd, Setup::Etcd3];

    /// The column heading.
    pub fn label(self) -> &'static str {
        match self {
            Setup::Redb => "1 server, redb",
            Setup::Etcd => "1 server, etcd x3",
            Setup::Etcd3 => "3 servers, etcd x3",
        }
    }

    fn servers(self) -> usize {
        match self {
            Setup::Redb | Setup::Etcd => 1,
            Setup::Etcd3 => 3,
        }
    }
}

/// An API operation the bench issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiOp {
    /// `POST /v1/vms` (placement, reservation, one store transaction).
    VmCreate,
    /// `GET /v1/vms`.
    VmList,
}

impl ApiOp {
    /// The row heading.
    pub fn label(self) -> &'static str {
        match self {
            ApiOp::VmCreate => "VM create",
            ApiOp::VmList => "VM list",
        }
    }
}

/// One operation kind on one setup.
#[derive(Debug, Clone, Serialize)]
pub struct ApiRow {
    /// Where.
    pub setup: Setup,
    /// What.
    pub op: ApiOp,
    /// Servers the clients were spread over.
    pub servers: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Operations that succeeded.
    pub ok: usize,
    /// Operations that failed.
    pub errors: usize,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Wall time of the phase.
    pub secs: f64,
    /// Successful operations per second of wall time.
    pub ops_per_s: f64,
    /// Median latency of the successful operations, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, ms.
    pub p99_ms: Option<f64>,
    /// VMs the last list returned (list rows).
    pub vms_per_list: Option<usize>,
}

/// Smallest, median and largest of a few samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// Smallest.
    pub min: f64,
    /// Median (nearest rank).
    pub median: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `samples`, `None` if there are none.
    pub fn of(samples: &[f64]) -> Option<Spread> {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        Some(Spread {
            min: *s.first()?,
            median: quantile(&s, 50)?,
            max: *s.last()?,
        })
    }
}

/// The `pct`th percentile of `sorted` (ascending) by nearest rank: the smallest sample
/// with at least `pct`% of the samples at or below it. `None` when empty.
pub fn quantile(sorted: &[f64], pct: usize) -> Option<f64> {
    let n = sorted.len();
    let rank = (pct.min(100) * n).div_ceil(100).max(1);
    sorted.get(rank.min(n).checked_sub(1)?).copied()
}

/// One leader kill.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverRound {
    /// The server killed (it led).
    pub killed: String,
    /// The server that led next.
    pub new_leader: String,
    /// Kill → the election key names another server, ms.
    pub leads_ms: f64,
    /// Kill → the new leader's first write to the drain session, ms.
    pub first_step_ms: f64,
    /// Kill → the drained host is empty, ms.
    pub drained_ms: f64,
}

/// The failover measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Failover {
    /// Servers on the store.
    pub servers: usize,
    /// Their election lease, seconds.
    pub lease_s: u64,
    /// Every kill.
    pub rounds: Vec<FailoverRound>,
    /// Over the rounds: kill → another server leads, ms.
    pub leads_ms: Option<Spread>,
    /// Over the rounds: kill → first drain step under the new leader, ms.
    pub first_step_ms: Option<Spread>,
    /// Over the rounds: kill → drained host empty, ms.
    pub drained_ms: Option<Spread>,
}

/// Where the numbers were taken.
#[derive(Debug, Clone, Serialize)]
pub struct Environment {
    /// CPUs this process may use.
    pub cores: usize,
    /// Load average (1, 5, 15 min) before the run.
    pub load_before: Option<[f64; 3]>,
    /// Load average after the run.
    pub load_after: Option<[f64; 3]>,
    /// `etcd --version`.
    pub etcd: String,
    /// The filesystem the stores' data is on.
    pub data_fs: String,
    /// `release` or `debug`.
    pub build: &'static str,
}

/// Everything `vinfra bench control` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ControlReport {
    /// Where.
    pub environment: Environment,
    /// Concurrent clients.
    pub clients: usize,
    /// Operations asked for per row.
    pub ops: usize,
    /// The servers' rate limiting (off: it would cap the numbers at 100/s per token).
    pub rate_limit: &'static str,
    /// API rows: every operation on every setup.
    pub api: Vec<ApiRow>,
    /// Leader failover, unless `--failovers 0`.
    pub failover: Option<Failover>,
}

/// Runs the whole bench (progress on stderr).
pub async fn run(args: &ControlArgs) -> anyhow::Result<ControlReport> {
    if args.ops == 0 || args.clients == 0 {
        bail!("--ops and --clients must be at least 1");
    }
    let exe = std::env::current_exe().context("cannot find this vinfra binary")?;
    let tmp = tempfile::Builder::new()
        .prefix("vinfra-bench-control-")
        .tempdir()
        .context("cannot create a temp dir")?;
    // Before anything runs: two of the three setups and the failover need etcd.
    let etcd_version = etcd_version().await?;
    let load_before = loadavg();
    let kernel = tmp.path().join("kernel");
    std::fs::write(&kernel, vec![0u8; 64 << 10]).context("cannot write the bench image")?;
    let mut api = Vec::new();

    eprintln!("[{}] starting", Setup::Redb.label());
    let dir = tmp.path().join("redb");
    let spec = format!("redb:{}", dir.join("state.redb").display());
    let mut s = Server::spawn(
        &exe,
        "bench-redb",
        &dir,
        &spec,
        &dir.join("blobs"),
        args.lease_s,
    )?;
    let token = s.wait_ready(None).await?;
    prepare(&s.url, &token, &kernel).await?;
    api.extend(measure(Setup::Redb, &[s.url.clone()], &token, args).await?);
    s.stop().await;

    eprintln!("[{}] starting etcd and the server", Setup::Etcd.label());
    let dir = tmp.path().join("etcd");
    let etcd = EtcdCluster::start(&dir.join("etcd"), 3).await?;
    let spec = format!("etcd:{}", etcd.endpoints().join(","));
    let mut s = Server::spawn(
        &exe,
        "bench-etcd",
        &dir.join("s0"),
        &spec,
        &dir.join("blobs"),
        args.lease_s,
    )?;
    let token = s.wait_ready(None).await?;
    prepare(&s.url, &token, &kernel).await?;
    api.extend(measure(Setup::Etcd, &[s.url.clone()], &token, args).await?);
    s.stop().await;
    etcd.stop().await;

    eprintln!("[{}] starting etcd and the servers", Setup::Etcd3.label());
    let dir = tmp.path().join("etcd3");
    let etcd = EtcdCluster::start(&dir.join("etcd"), 3).await?;
    let spec = format!("etcd:{}", etcd.endpoints().join(","));
    let mut servers = Vec::new();
    let mut token = None;
    for i in 0..3 {
        // The first one mints the admin token; the others serve the same store.
        let mut s = Server::spawn(
            &exe,
            &format!("bench-s{i}"),
            &dir.join(format!("s{i}")),
            &spec,
            &dir.join("blobs"),
            args.lease_s,
        )?;
        token = Some(s.wait_ready(token.as_deref()).await?);
        servers.push(s);
    }
    let token = token.context("three servers started")?;
    let agent = prepare(&servers[0].url, &token, &kernel).await?;
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    api.extend(measure(Setup::Etcd3, &urls, &token, args).await?);
    let failover = if args.failovers > 0 {
        Some(failover(&mut servers, etcd.endpoints(), &token, &agent, args).await?)
    } else {
        None
    };
    for s in servers {
        s.stop().await;
    }
    etcd.stop().await;

    Ok(ControlReport {
        environment: Environment {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            load_before,
            load_after: loadavg(),
            etcd: etcd_version,
            data_fs: filesystem_of(tmp.path()),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        },
        clients: args.clients,
        ops: args.ops,
        rate_limit: "off",
        api,
        failover,
    })
}

/// What every setup needs before it is measured: four hosts with room for every VM of
/// the run, registered with an agent token, and an image. Returns the agent's client.
async fn prepare(url: &str, token: &str, kernel: &Path) -> anyhow::Result<client::Client> {
    let (_, _, agent) = super::bench_clients(url, token, kernel).await?;
    for i in 0..4 {
        // 16384 vCPUs (4096 CPUs at the default ratio of 4) and 64 TiB each.
        agent
            .register_host(&super::bench_host(&format!("bench-h{i}"), 4096, 1 << 26))
            .await
            .context("cannot register a host")?;
    }
    Ok(agent)
}

fn vm(name: String, host: Option<String>) -> CreateVm {
    CreateVm {
        name,
        image: "bench".into(),
        vcpus: 1,
        memory_mib: 64,
        host,
        ..Default::default()
    }
}

/// VM creates, then VM lists, on `urls` (client `i` on `urls[i % len]`).
async fn measure(
    setup: Setup,
    urls: &[String],
    token: &str,
    args: &ControlArgs,
) -> anyhow::Result<Vec<ApiRow>> {
    let clients = (0..args.clients)
        .map(|i| client::Client::new(&urls[i % urls.len()], token))
        .collect::<Result<Vec<_>, _>>()?;
    // One request each first: the connections are open before the clock starts.
    for c in &clients {
        c.list_hosts().await.context("warm-up request failed")?;
    }
    let cap = Duration::from_secs(args.phase_secs.max(1));
    let mut rows = Vec::new();
    for op in [ApiOp::VmCreate, ApiOp::VmList] {
        eprintln!("[{}] {} x {}", setup.label(), op.label(), args.ops);
        let phase = match op {
            ApiOp::VmCreate => {
                run_phase(&clients, args.ops, cap, |c, i| async move {
                    c.create_vm(&vm(format!("vm-{i}"), None)).await.map(|_| 1)
                })
                .await
            }
            ApiOp::VmList => {
                run_phase(&clients, args.ops, cap, |c, _| async move {
                    c.list_vms().await.map(|v| v.len())
                })
                .await
            }
        };
        rows.push(phase.row(setup, op, args.clients));
    }
    Ok(rows)
}

/// What the clients of one phase saw.
#[derive(Debug, Default)]
struct Phase {
    latencies_ms: Vec<f64>,
    errors: usize,
    first_error: Option<String>,
    wall: Duration,
    /// What the last successful operation returned (a list's length).
    last: usize,
}

impl Phase {
    fn row(mut self, setup: Setup, op: ApiOp, clients: usize) -> ApiRow {
        self.latencies_ms.sort_by(f64::total_cmp);
        let secs = self.wall.as_secs_f64();
        #[allow(clippy::cast_precision_loss)]
        let ok = self.latencies_ms.len() as f64;
        ApiRow {
            setup,
            op,
            servers: setup.servers(),
            clients,
            ok: self.latencies_ms.len(),
            errors: self.errors,
            first_error: self.first_error,
            secs,
            ops_per_s: if secs > 0.0 { ok / secs } else { 0.0 },
            p50_ms: quantile(&self.latencies_ms, 50),
            p99_ms: quantile(&self.latencies_ms, 99),
            vms_per_list: (op == ApiOp::VmList).then_some(self.last),
        }
    }
}

/// Runs `op(client, i)` for `i` in `0..ops`, each client taking the next `i` as soon as
/// its previous operation answered, until all are done or `cap` has passed.
async fn run_phase<F, Fut>(clients: &[client::Client], ops: usize, cap: Duration, op: F) -> Phase
where
    F: Fn(client::Client, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<usize, client::ClientError>> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let op = Arc::new(op);
    let started = Instant::now();
    let deadline = started + cap;
    let mut set = tokio::task::JoinSet::new();
    for c in clients {
        let (c, next, op) = (c.clone(), next.clone(), op.clone());
        set.spawn(async move {
            let mut mine = Phase::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ops || Instant::now() >= deadline {
                    return mine;
                }
                let t = Instant::now();
                match op(c.clone(), i).await {
                    Ok(n) => {
                        mine.latencies_ms.push(t.elapsed().as_secs_f64() * 1e3);
                        mine.last = n;
                    }
                    Err(e) => {
                        mine.errors += 1;
                        mine.first_error
                            .get_or_insert_with(|| model::error_chain(&e));
                    }
                }
            }
        });
    }
    let mut all = Phase::default();
    while let Some(done) = set.join_next().await {
        let Ok(p) = done else { continue };
        all.latencies_ms.extend(p.latencies_ms);
        all.errors += p.errors;
        if all.first_error.is_none() {
            all.first_error = p.first_error;
        }
        all.last = all.last.max(p.last);
    }
    all.wall = started.elapsed();
    all
}

/// `args.failovers` leader kills on `servers` (see the module docs).
async fn failover(
    servers: &mut [Server],
    endpoints: &[String],
    token: &str,
    agent: &client::Client,
    args: &ControlArgs,
) -> anyhow::Result<Failover> {
    let store = store_etcd::EtcdStore::connect(endpoints, None).await?;
    let election_key = store::election_key(control::driver::ELECTION)?;
    let admin = client::Client::new(&servers[0].url, token)?;
    let mut rounds = Vec::new();
    for r in 0..args.failovers {
        // A host with one stopped VM, drained once the leader is dead.
        let host_name = format!("failover-{r}");
        agent
            .register_host(&super::bench_host(&host_name, 4, 4096))
            .await?;
        let vm_name = format!("failover-vm-{r}");
        admin
            .create_vm(&vm(vm_name.clone(), Some(host_name.clone())))
            .await?;
        admin.stop_vm(&vm_name).await?;

        let mut leader = None;
        let wait = Instant::now();
        while leader.is_none() {
            let id = store.leader(control::driver::ELECTION).await?;
            leader = servers.iter().position(|s| Some(&s.id) == id.as_ref());
            if leader.is_none() {
                if wait.elapsed() > Duration::from_secs(60) {
                    bail!("no server leads the operation driver (leader: {id:?})");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let li = leader.context("a leader")?;
        let killed = servers[li].id.clone();
        let other = client::Client::new(&servers[(li + 1) % servers.len()].url, token)?;
        let mut changes = store.watch("/vinfra/").await?;

        let t0 = Instant::now();
        servers[li].kill9().await?;
        let session = other
            .enter_maintenance(&host_name, &EnterMaintenance::default())
            .await
            .context("cannot enter maintenance on a surviving server")?;
        let session_key = control::records::keys::maintenance(session.id);
        let deadline = t0 + Duration::from_secs(args.lease_s * 5 + 30);
        let (mut leads, mut step, mut drained) = (None, None, None);
        while drained.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = match tokio::time::timeout(left, changes.next()).await {
                Ok(Some(ev)) => ev?,
                Ok(None) => bail!("the etcd watch ended"),
                Err(_) => bail!(
                    "round {r}: after killing {killed}, the drain did not finish within {:?} \
                     (another leader: {}, first step: {}); server logs:\n{}",
                    deadline - t0,
                    leads.is_some(),
                    step.is_some(),
                    servers
                        .iter()
                        .map(|s| format!("{}:\n{}", s.id, s.log_tail()))
                        .collect::<Vec<_>>()
                        .join("\n---\n")
                ),
            };
            let at = t0.elapsed();
            let store::WatchEvent::Put(kv) = ev else {
                continue;
            };
            if kv.key == election_key {
                let who = String::from_utf8_lossy(&kv.value).into_owned();
                if who != killed && leads.is_none() {
                    leads = Some((at, who));
                }
            } else if kv.key == session_key {
                let m: model::Maintenance =
                    serde_json::from_slice(&kv.value).context("a drain session record")?;
                if m.state != MaintenanceState::Entering && step.is_none() {
                    step = Some(at);
                }
                match m.state {
                    MaintenanceState::InMaintenance => drained = Some(at),
                    MaintenanceState::Failed | MaintenanceState::Aborted => {
                        bail!("round {r}: the drain ended {:?}: {:?}", m.state, m.error)
                    }
                    _ => {}
                }
            }
        }
        let (leads_at, new_leader) = leads.context("a drain step without a new leader")?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let round = FailoverRound {
            killed: killed.clone(),
            new_leader,
            leads_ms: ms(leads_at),
            first_step_ms: ms(step.context("the drain finished without a first step")?),
            drained_ms: ms(drained.context("drained")?),
        };
        eprintln!(
            "[failover {}/{}] killed {} → {} leads {:.2} s, first drain step {:.2} s",
            r + 1,
            args.failovers,
            round.killed,
            round.new_leader,
            round.leads_ms / 1e3,
            round.first_step_ms / 1e3
        );
        rounds.push(round);
        servers[li].restart(token).await?;
    }
    let pick = |f: fn(&FailoverRound) -> f64| Spread::of(&rounds.iter().map(f).collect::<Vec<_>>());
    Ok(Failover {
        servers: servers.len(),
        lease_s: args.lease_s,
        leads_ms: pick(|r| r.leads_ms),
        first_step_ms: pick(|r| r.first_step_ms),
        drained_ms: pick(|r| r.drained_ms),
        rounds,
    })
}

/// The load average (1, 5, 15 min), if the kernel says.
pub(crate) fn loadavg() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    Some([it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?])
}

/// `etcd --version`'s version number; fails naming the install step when there is no
/// etcd.
async fn etcd_version() -> anyhow::Result<String> {
    let out = tokio::process::Command::new("etcd")
        .arg("--version")
        .output()
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::anyhow!(procs::ETCD_MISSING),
            _ => anyhow::Error::new(e).context("cannot run etcd --version"),
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("etcd Version:").map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| "unknown".to_owned()))
}

/// The type of the filesystem `path` is on (from /proc/self/mounts), with its mount
/// point.
pub(crate) fn filesystem_of(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path));
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, fs) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(at).then(|| (at.to_owned(), fs.to_owned()))
        })
        .max_by_key(|(at, _)| at.len())
        .map_or_else(|| "unknown".to_owned(), |(at, fs)| format!("{fs} ({at})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&s, 50), Some(50.0));
        assert_eq!(quantile(&s, 99), Some(99.0));
        assert_eq!(quantile(&s, 100), Some(100.0));
        assert_eq!(quantile(&s, 0), Some(1.0));
        assert_eq!(quantile(&[7.0], 99), Some(7.0));
        assert_eq!(quantile(&[1.0, 2.0, 3.0], 50), Some(2.0));
        assert_eq!(quantile(&[], 50), None);
    }

    #[test]
    fn spread_of_five_kills() {
        let s = Spread::of(&[2.4, 1.6, 2.0, 1.9, 2.2]).unwrap();
        assert_eq!(
            s,
            Spread {
                min: 1.6,
                median: 2.0,
                max: 2.4
            }
        );
        assert_eq!(Spread::of(&[]), None);
    }

    #[test]
    fn a_phase_row_counts_what_succeeded() {
        let p = Phase {
            latencies_ms: vec![3.0, 1.0, 2.0, 4.0],
            errors: 1,
            first_error: Some("boom".into()),
            wall: Duration::from_secs(2),
            last: 4,
        };
        let r = p.row(Setup::Etcd3, ApiOp::VmList, 8);
        assert_eq!((r.ok, r.errors, r.servers), (4, 1, 3));
        assert_eq!(r.ops_per_s, 2.0);
        assert_eq!((r.p50_ms, r.p99_ms), (Some(2.0), Some(4.0)));
        assert_eq!(r.vms_per_list, Some(4));
    }
}
