//! Helpers for tests that run real processes: free ports, polling with a
//! deadline, child processes that die with the test, required tools, a
//! and a real etcd ([`EtcdFixture`]). (QEMU's qtest client, which reads the scancodes at
//! a guest-less VM's keyboard controller, is `compute::qemu::qtest`: the terminal bench
//! uses it too.)
//!
//! Owns: nothing persistent; every fixture lives in a temp dir removed on drop.
//! Must not depend on: any vinfra crate (every crate may dev-depend on this).
//!
//! Rules the helpers encode (STYLE §12): servers bind `127.0.0.1:0` or a port
//! from [`free_tcp_port`]; tests poll with [`wait_for`] and a deadline instead
//! of sleeping; a missing tool fails naming the install step
//! ([`require_tool`]); a spawned process is killed when its guard drops, also
//! when the test panics ([`ChildGuard`]).
//!
//! Blocking: [`ChildGuard`] and [`EtcdFixture`] reap killed children with a
//! blocking `wait` in `Drop` and in `kill9`; after SIGKILL that returns within
//! milliseconds, so it is acceptable inside async tests.
#![warn(missing_docs)]

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The install hint for a missing `etcd` binary.
pub const ETCD_INSTALL_HINT: &str =
    "run scripts/setup.sh (apt-get install etcd-server etcd-client)";

/// How long [`EtcdFixture`] waits for etcd to become healthy.
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a fixture could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FixtureError {
    /// A required executable is not installed.
    #[error("{tool} not found: {hint}")]
    ToolMissing {
        /// The executable looked for.
        tool: String,
        /// How to install it.
        hint: String,
    },
    /// Creating a temp dir or starting a process failed.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        err: std::io::Error,
    },
    /// The process exited before it became ready.
    #[error("{what} exited during startup ({status}); last log lines:\n{log_tail}")]
    Exited {
        /// The process, with its address.
        what: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The end of its log.
        log_tail: String,
    },
    /// The process did not become ready in time.
    #[error("{what} not ready after {waited:?}; last log lines:\n{log_tail}")]
    NotReady {
        /// The process, with its address.
        what: String,
        /// How long we waited.
        waited: Duration,
        /// The end of its log.
        log_tail: String,
    },
}

/// A condition polled by [`wait_for`] did not hold in time.
#[derive(Debug, thiserror::Error)]
#[error("condition not met within {timeout:?}")]
pub struct WaitTimeout {
    /// The deadline that passed.
    pub timeout: Duration,
}

/// A loopback TCP port that was free a moment ago (bound to `127.0.0.1:0`,
/// then released).
///
/// Another process may take it before you bind it; a server that can bind
/// port 0 itself should do that instead. Use [`free_tcp_ports`] when you need
/// several distinct ports at once.
pub fn free_tcp_port() -> u16 {
    free_tcp_ports::<1>()[0]
}

/// `N` distinct free loopback ports (all held bound until all are picked).
pub fn free_tcp_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    std::array::from_fn(|i| {
        listeners[i]
            .local_addr()
            .expect("local_addr of a bound socket")
            .port()
    })
}

/// Polls `cond` until it returns `true` or `timeout` passes. `cond` runs at
/// least once; the interval grows from 5 ms to 100 ms.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// let start = std::time::Instant::now();
/// test_utils::wait_for(Duration::from_secs(5), || async move {
///     start.elapsed() > Duration::from_millis(20)
/// })
/// .await
/// .unwrap();
/// # });
/// ```
pub async fn wait_for<F, Fut>(timeout: Duration, mut cond: F) -> Result<(), WaitTimeout>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(5);
    loop {
        if cond().await {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(WaitTimeout { timeout });
        }
        tokio::time::sleep(interval.min(deadline - now)).await;
        interval = (interval * 2).min(Duration::from_millis(100));
    }
}

/// [`wait_for`] with a synchronous condition.
pub async fn wait_until(
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<(), WaitTimeout> {
    wait_for(timeout, || std::future::ready(cond())).await
}

/// The path of executable `name` from `PATH` (plus the sbin directories, where
/// root-only tools live), or [`FixtureError::ToolMissing`] with `install_hint`:
/// `"{name} not found: {install_hint}"`.
pub fn require_tool(name: &str, install_hint: &str) -> Result<PathBuf, FixtureError> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .ok_or_else(|| FixtureError::ToolMissing {
            tool: name.to_owned(),
            hint: install_hint.to_owned(),
        })
}

/// SIGKILLs the QEMUs a test started when it ends, passed or failed: a VM outlives the
/// driver or agent that started it, so without this a failed test (or an agent stopped at
/// the end of one) leaves them running. Only a pid whose command line still names its run
/// dir is killed: a pid reused since belongs to someone else.
#[derive(Debug, Default)]
pub struct QemuKillGuard(Vec<(u32, PathBuf)>);

impl QemuKillGuard {
    /// Kills `pid`, the QEMU serving `run_dir`, when the guard drops.
    pub fn add(&mut self, pid: u32, run_dir: &Path) {
        self.0.push((pid, run_dir.to_owned()));
    }
}

impl Drop for QemuKillGuard {
    fn drop(&mut self) {
        for (pid, dir) in &self.0 {
            let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy()))
                .unwrap_or(false);
            if let Some(p) = i32::try_from(*pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
                .filter(|_| ours)
            {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }
}

/// Owns a child process and kills it (SIGKILL) when dropped, so a failing test
/// leaves no process behind. Holds a `std` or a `tokio` child.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<GuardedChild>,
}

#[derive(Debug)]
enum GuardedChild {
    Std(std::process::Child),
    Tokio(tokio::process::Child),
}

impl From<std::process::Child> for ChildGuard {
    fn from(child: std::process::Child) -> Self {
        ChildGuard {
            child: Some(GuardedChild::Std(child)),
        }
    }
}

impl From<tokio::process::Child> for ChildGuard {
    fn from(child: tokio::process::Child) -> Self {
        ChildGuard {
            child: Some(GuardedChild::Tokio(child)),
        }
    }
}

impl ChildGuard {
    /// Guards `child`.
    pub fn new(child: impl Into<ChildGuard>) -> Self {
        child.into()
    }

    /// The process id, unless it has been reaped.
    pub fn id(&self) -> Option<u32> {
        match self.child.as_ref()? {
            GuardedChild::Std(c) => Some(c.id()),
            GuardedChild::Tokio(c) => c.id(),
        }
    }

    /// The `std` child, if this guards one.
    pub fn std_mut(&mut self) -> Option<&mut std::process::Child> {
        match self.child.as_mut()? {
            GuardedChild::Std(c) => Some(c),
            GuardedChild::Tokio(_) => None,
        }
    }

    /// The `tokio` child, if this guards one.
    pub fn tokio_mut(&mut self) -> Option<&mut tokio::process::Child> {
        match self.child.as_mut()? {
            GuardedChild::Tokio(c) => Some(c),
            GuardedChild::Std(_) => None,
        }
    }

    /// Sends SIGKILL (no-op if it already exited) and reaps the process.
    /// Returns its exit status if it could be collected.
    pub fn kill(&mut self) -> Option<std::process::ExitStatus> {
        match self.child.take()? {
            GuardedChild::Std(mut c) => {
                let _ = c.kill();
                c.wait().ok()
            }
            GuardedChild::Tokio(mut c) => {
                let _ = c.start_kill();
                // Reaped by tokio's orphan handling if it is not done yet.
                c.try_wait().ok().flatten()
            }
        }
    }

    /// Stops guarding: the process is no longer killed on drop.
    pub fn disarm(mut self) -> Option<GuardedChildHandle> {
        self.child.take().map(GuardedChildHandle)
    }
}

/// A child released by [`ChildGuard::disarm`].
#[derive(Debug)]
pub struct GuardedChildHandle(GuardedChild);

impl GuardedChildHandle {
    /// The `std` child, if it was one.
    pub fn into_std(self) -> Option<std::process::Child> {
        match self.0 {
            GuardedChild::Std(c) => Some(c),
            GuardedChild::Tokio(_) => None,
        }
    }

    /// The `tokio` child, if it was one.
    pub fn into_tokio(self) -> Option<tokio::process::Child> {
        match self.0 {
            GuardedChild::Tokio(c) => Some(c),
            GuardedChild::Std(_) => None,
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a log file (empty if unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A real single-member etcd on free loopback ports, in its own temp dir,
/// killed on drop.
///
/// Started with fast elections (`--heartbeat-interval 10 --election-timeout
/// 100`): ready in about 0.05–0.3 s, also after [`kill9`](Self::kill9) +
/// [`restart`](Self::restart). Writes are fsync'd as in production, so data
/// survives `kill -9`. The data dir is about 62 MiB (WAL preallocation) while
/// it lives.
///
/// ```no_run
/// # async fn f() -> Result<(), test_utils::FixtureError> {
/// let mut etcd = test_utils::EtcdFixture::spawn().await?;
/// let url = etcd.endpoint(); // "http://127.0.0.1:PORT"
/// etcd.kill9();
/// etcd.restart().await?; // same data dir and ports
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct EtcdFixture {
    etcd: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<ChildGuard>,
    // Dropped after `child` (field order): the process is dead before its
    // data dir is removed.
    dir: tempfile::TempDir,
}

impl EtcdFixture {
    /// Starts etcd and waits until it answers `/health` (deadline 20 s).
    ///
    /// Fails with "etcd not found: run scripts/setup.sh (...)" if the binary
    /// is missing, or with the end of etcd's log if it does not come up. If
    /// another process took a chosen port first, retries on new ports.
    pub async fn spawn() -> Result<EtcdFixture, FixtureError> {
        let etcd = require_tool("etcd", ETCD_INSTALL_HINT)?;
        let dir = tempfile::Builder::new()
            .prefix("vinfra-etcd-")
            .tempdir()
            .map_err(|err| FixtureError::Io {
                what: "create a temp dir for etcd".into(),
                err,
            })?;
        let [client_port, peer_port] = free_tcp_ports::<2>();
        let mut fixture = EtcdFixture {
            etcd,
            client_port,
            peer_port,
            child: None,
            dir,
        };
        let mut attempt = 0;
        loop {
            match fixture.start().await {
                // A port race shows up as an early exit ("address already in use").
                Err(FixtureError::Exited { .. }) if attempt < 3 => {
                    attempt += 1;
                    let [c, p] = free_tcp_ports::<2>();
                    fixture.client_port = c;
                    fixture.peer_port = p;
                    let _ = std::fs::remove_dir_all(fixture.data_dir());
                }
                other => return other.map(|()| fixture),
            }
        }
    }

    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client address.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// etcd's data directory (kept across [`restart`](Self::restart)).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// etcd's combined stdout/stderr log, appended to by every start.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The etcd process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(ChildGuard::id)
    }

    /// Kills etcd with SIGKILL (no clean shutdown) and reaps it. No-op if it
    /// is not running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Starts etcd again with the same data dir and ports (killing it first if
    /// it still runs) and waits until it is healthy.
    pub async fn restart(&mut self) -> Result<(), FixtureError> {
        self.kill9();
        self.start().await
    }

    fn what(&self) -> String {
        format!("etcd on 127.0.0.1:{}", self.client_port)
    }

    async fn start(&mut self) -> Result<(), FixtureError> {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        // Flags as in real-components-notes.md §1; `--initial-*` are ignored
        // once the data dir exists, so restart reuses the same command line.
        let child = spawn_etcd_member(
            &self.etcd,
            &EtcdMember {
                name: "t1",
                data_dir: &self.data_dir(),
                log: &self.log_path(),
                client_port: self.client_port,
                peer_port: self.peer_port,
                initial_cluster: &format!("t1={peer}"),
                // A single member: elect itself at once.
                timing: ["10", "100"],
            },
        )?;
        self.child = Some(child);

        let started = Instant::now();
        let addr = self.client_addr();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(ChildGuard::std_mut)
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(FixtureError::Exited {
                    what: self.what(),
                    status,
                    log_tail: log_tail(&self.log_path(), 20),
                });
            }
            if etcd_healthy(addr).await {
                return Ok(());
            }
            if started.elapsed() > ETCD_READY_TIMEOUT {
                self.kill9();
                return Err(FixtureError::NotReady {
                    what: self.what(),
                    waited: started.elapsed(),
                    log_tail: log_tail(&self.log_path(), 20),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// `GET /health` on etcd's client port: true once it has a leader and serves
/// linearizable reads. Plain HTTP/1.1 by hand: etcd serves HTTP and gRPC on
/// the same port, and this keeps an HTTP client out of the dependency tree.
async fn etcd_healthy(addr: SocketAddr) -> bool {
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.ok()?;
        let text = String::from_utf8_lossy(&body);
        Some(text.starts_with("HTTP/1.1 200") && text.contains(r#""health":"true""#))
    };
    tokio::time::timeout(Duration::from_millis(500), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_the_install_step() {
        let e = require_tool("no-such-tool-vinfra", "apt-get install nothing").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no-such-tool-vinfra not found: apt-get install nothing"
        );
        assert!(require_tool("sh", "x").is_ok());
    }

    #[test]
    fn free_ports_are_distinct_and_bindable() {
        let [a, b, c] = free_tcp_ports::<3>();
        assert!(a != b && b != c && a != c);
        // A port is free when it is returned; another test of this binary (the etcd
        // fixture) may take it before this bind, so a few tries are allowed.
        let bound = (0..5).any(|_| TcpListener::bind(("127.0.0.1", free_tcp_port())).is_ok());
        assert!(
            bound,
            "no port returned by free_tcp_port could be bound in 5 tries"
        );
    }

    #[tokio::test]
    async fn wait_for_times_out_and_succeeds() {
        let e = wait_until(Duration::from_millis(30), || false)
            .await
            .unwrap_err();
        assert_eq!(e.timeout, Duration::from_millis(30));
        let mut n = 0;
        wait_until(Duration::from_secs(5), || {
            n += 1;
            n == 3
        })
        .await
        .unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn child_guard_kills_on_drop() {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        drop(ChildGuard::from(child));
        // Killed and reaped by the guard: no zombie left either.
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "still there");
    }

    #[tokio::test]
    async fn etcd_fixture_starts_restarts_and_cleans_up() {
        let mut etcd = EtcdFixture::spawn().await.unwrap();
        let addr = etcd.client_addr();
        assert!(etcd_healthy(addr).await);
        let data = etcd.data_dir();
        assert!(data.exists());
        etcd.kill9();
        assert!(!etcd_healthy(addr).await);
        etcd.restart().await.unwrap();
        assert!(etcd_healthy(addr).await);
        let pid = etcd.pid().unwrap();
        drop(etcd);
        assert!(!data.exists(), "temp dir removed");
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "process gone");
    }
}

/// A multi-member etcd cluster on loopback, each member with its own data dir and
/// ports, for tests that kill members or need quorum.
#[derive(Debug)]
pub struct EtcdCluster {
    etcd: PathBuf,
    /// (client port, peer port) per member.
    ports: Vec<(u16, u16)>,
    children: Vec<Option<ChildGuard>>,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members and waits until every one answers `/health` (20 s).
    pub async fn spawn(n: usize) -> Result<EtcdCluster, FixtureError> {
        let etcd = require_tool("etcd", ETCD_INSTALL_HINT)?;
        let dir = tempfile::Builder::new()
            .prefix("vinfra-etcd-cluster-")
            .tempdir()
            .map_err(|err| FixtureError::Io {
                what: "create a temp dir for etcd".into(),
                err,
            })?;
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| {
                let [c, p] = free_tcp_ports::<2>();
                (c, p)
            })
            .collect();
        let mut cluster = EtcdCluster {
            etcd,
            children: (0..n).map(|_| None).collect(),
            ports,
            dir,
        };
        for i in 0..n {
            cluster.start(i)?;
        }
        for i in 0..n {
            cluster.wait_healthy(i).await?;
        }
        Ok(cluster)
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|(c, _)| format!("http://127.0.0.1:{c}"))
            .collect()
    }

    /// Member `i`'s log.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("m{i}.log"))
    }

    /// Kills member `i` with SIGKILL.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.children.get_mut(i).and_then(Option::take) {
            c.kill();
        }
    }

    fn start(&mut self, i: usize) -> Result<(), FixtureError> {
        let initial: Vec<String> = self
            .ports
            .iter()
            .enumerate()
            .map(|(j, (_, p))| format!("m{j}=http://127.0.0.1:{p}"))
            .collect();
        let (client_port, peer_port) = self.ports[i];
        let child = spawn_etcd_member(
            &self.etcd,
            &EtcdMember {
                name: &format!("m{i}"),
                data_dir: &self.dir.path().join(format!("m{i}")),
                log: &self.log_path(i),
                client_port,
                peer_port,
                initial_cluster: &initial.join(","),
                // Several members on a loaded machine: etcd's defaults, halved.
                timing: ["50", "500"],
            },
        )?;
        self.children[i] = Some(child);
        Ok(())
    }

    async fn wait_healthy(&mut self, i: usize) -> Result<(), FixtureError> {
        let started = Instant::now();
        let addr = SocketAddr::from(([127, 0, 0, 1], self.ports[i].0));
        loop {
            if etcd_healthy(addr).await {
                return Ok(());
            }
            if started.elapsed() > ETCD_READY_TIMEOUT {
                return Err(FixtureError::NotReady {
                    what: format!("etcd member m{i} on {addr}"),
                    waited: started.elapsed(),
                    log_tail: log_tail(&self.log_path(i), 20),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One etcd member to start.
struct EtcdMember<'a> {
    name: &'a str,
    data_dir: &'a Path,
    log: &'a Path,
    client_port: u16,
    peer_port: u16,
    /// `--initial-cluster`: every member's `name=peer URL`.
    initial_cluster: &'a str,
    /// `--heartbeat-interval` and `--election-timeout`, ms.
    timing: [&'a str; 2],
}

/// Starts one etcd member on loopback, its output appended to its log.
fn spawn_etcd_member(etcd: &Path, m: &EtcdMember<'_>) -> Result<ChildGuard, FixtureError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(m.log)
        .map_err(|err| FixtureError::Io {
            what: format!("open {}", m.log.display()),
            err,
        })?;
    let log2 = log.try_clone().map_err(|err| FixtureError::Io {
        what: "duplicate the etcd log handle".into(),
        err,
    })?;
    let client = format!("http://127.0.0.1:{}", m.client_port);
    let peer = format!("http://127.0.0.1:{}", m.peer_port);
    let child: Child = Command::new(etcd)
        .arg("--name")
        .arg(m.name)
        .arg("--data-dir")
        .arg(m.data_dir)
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", m.initial_cluster])
        .args(["--initial-cluster-state", "new"])
        .args(["--initial-cluster-token", "vinfra-test"])
        .args([
            "--heartbeat-interval",
            m.timing[0],
            "--election-timeout",
            m.timing[1],
        ])
        .args(["--logger", "zap", "--log-outputs", "stderr"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|err| FixtureError::Io {
            what: format!("start {}", etcd.display()),
            err,
        })?;
    Ok(ChildGuard::from(child))
}
