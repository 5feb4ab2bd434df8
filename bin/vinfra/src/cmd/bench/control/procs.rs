//! The processes `vinfra bench control` runs: a multi-member etcd cluster on loopback
//! and `vinfra server` children of this very binary.
//!
//! `test_utils::EtcdCluster` does the same for tests, but a benchmark shipped in the
//! binary cannot use a dev-only crate; the few lines it needs are here. Every child is
//! killed when its handle drops (also when the bench fails or is interrupted), and a
//! server child also exits by itself when this process dies (`--exit-with-stdin`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// What to do when there is no `etcd`.
pub const ETCD_MISSING: &str =
    "etcd not found: run scripts/setup.sh (apt-get install etcd-server etcd-client)";

/// How long a process may take to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// `n` distinct loopback ports that were free a moment ago (all held until all are
/// picked).
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("cannot bind a loopback port")?;
    held.iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect::<std::io::Result<Vec<u16>>>()
        .context("cannot read a bound port")
}

/// The last `lines` lines of a log file (empty if unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn log_file(path: &Path) -> anyhow::Result<(Stdio, Stdio)> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open log {}", path.display()))?;
    let g = f.try_clone()?;
    Ok((Stdio::from(f), Stdio::from(g)))
}

/// An etcd cluster of `n` members on loopback, each with its own data dir and ports,
/// with etcd's default timing (heartbeat 100 ms, election 1 s) and fsync'd writes.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Child>,
    endpoints: Vec<String>,
    dir: PathBuf,
}

impl EtcdCluster {
    /// Starts `n` members under `dir` and waits until each answers `/health`.
    pub async fn start(dir: &Path, n: usize) -> anyhow::Result<EtcdCluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let ports = free_ports(2 * n)?;
        let peers: Vec<String> = (0..n)
            .map(|i| format!("m{i}=http://127.0.0.1:{}", ports[2 * i + 1]))
            .collect();
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            endpoints: Vec::new(),
            dir: dir.to_owned(),
        };
        for i in 0..n {
            let client = format!("http://127.0.0.1:{}", ports[2 * i]);
            let peer = format!("http://127.0.0.1:{}", ports[2 * i + 1]);
            let (out, err) = log_file(&cluster.log_path(i))?;
            let child = Command::new("etcd")
                .arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(dir.join(format!("m{i}")))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &peers.join(",")])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "vinfra-bench"])
                .args(["--logger", "zap", "--log-outputs", "stderr"])
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => anyhow::anyhow!(ETCD_MISSING),
                    _ => anyhow::Error::new(e).context("cannot start etcd"),
                })?;
            cluster.members.push(child);
            cluster.endpoints.push(client);
        }
        for i in 0..n {
            cluster.wait_healthy(i).await?;
        }
        Ok(cluster)
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("m{i}.log"))
    }

    async fn wait_healthy(&mut self, i: usize) -> anyhow::Result<()> {
        let addr: SocketAddr = self.endpoints[i]
            .trim_start_matches("http://")
            .parse()
            .context("etcd member address")?;
        let started = Instant::now();
        loop {
            if let Some(status) = self.members[i].try_wait()? {
                bail!(
                    "etcd member m{i} exited during startup ({status}); last log lines:\n{}",
                    log_tail(&self.log_path(i), 20)
                );
            }
            if etcd_healthy(addr).await {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "etcd member m{i} on {addr} not healthy after {READY_TIMEOUT:?}; last log lines:\n{}",
                    log_tail(&self.log_path(i), 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills every member and waits for them to exit.
    pub async fn stop(mut self) {
        for m in &mut self.members {
            let _ = m.kill().await;
        }
    }
}

/// `GET /health` on etcd's client port: true once the member has a leader. Plain
/// HTTP/1.1 by hand (etcd serves HTTP and gRPC on one port).
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

/// A `vinfra server` child of this binary, tuned for the bench: plain HTTP on loopback,
/// rate limiting off, and hosts that stay `up` for an hour without heartbeats (the
/// bench registers hosts through the API and runs no agents).
#[derive(Debug)]
pub struct Server {
    /// Its `--server-id`: its name in the operation driver's election.
    pub id: String,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its data dir (the first server of a store writes the admin token there).
    pub dir: PathBuf,
    exe: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Server {
    /// Starts `vinfra server` on `store` (a `--store` value) with data dir `dir`, image
    /// files in `blob_dir` (shared by the servers of one store) and an election lease
    /// of `lease_s` seconds. Does not wait for it: see [`Server::wait_ready`].
    pub fn spawn(
        exe: &Path,
        id: &str,
        dir: &Path,
        store: &str,
        blob_dir: &Path,
        lease_s: u64,
    ) -> anyhow::Result<Server> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let port = free_ports(1)?[0];
        let listen = format!("127.0.0.1:{port}");
        let args: Vec<String> = [
            "server",
            "--store",
            store,
            "--listen",
            &listen,
            "--tls",
            "off",
            "--rate-limit",
            "0",
            "--heartbeat-timeout-s",
            "3600",
            "--server-id",
            id,
            "--election-lease-s",
            &lease_s.to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([
            "--data-dir".to_owned(),
            dir.display().to_string(),
            "--blob-dir".to_owned(),
            blob_dir.display().to_string(),
            // Ends with us, even if we are killed: we hold its stdin.
            "--exit-with-stdin".to_owned(),
        ])
        .collect();
        let mut s = Server {
            id: id.to_owned(),
            url: format!("http://{listen}"),
            dir: dir.to_owned(),
            exe: exe.to_owned(),
            args,
            child: None,
        };
        s.start()?;
        Ok(s)
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let (out, err) = log_file(&self.log_path())?;
        let child = Command::new(&self.exe)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} server", self.exe.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The end of its log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path(), 20)
    }

    /// The admin token the first server of a store wrote, once it is there.
    pub fn admin_token(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join(api::ADMIN_TOKEN_FILE))
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    }

    /// Waits until it answers an authenticated request; `token` `None`: the admin token
    /// this server writes (the first server of a store). Returns the token used.
    pub async fn wait_ready(&mut self, token: Option<&str>) -> anyhow::Result<String> {
        let started = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "server {} exited during startup ({status}); last log lines:\n{}",
                    self.id,
                    self.log_tail()
                );
            }
            let t = token.map(str::to_owned).or_else(|| self.admin_token());
            if let Some(t) = t {
                let c = client::Client::new(&self.url, &t)?;
                if c.list_hosts().await.is_ok() {
                    return Ok(t);
                }
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "server {} did not answer on {} within {READY_TIMEOUT:?}; last log lines:\n{}",
                    self.id,
                    self.url,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, and waits until the process is gone.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.start_kill()
                .with_context(|| format!("cannot kill server {}", self.id))?;
            c.wait().await?;
        }
        Ok(())
    }

    /// Starts it again with the same command line (same data, port and id) and waits
    /// until it answers with `token`.
    pub async fn restart(&mut self, token: &str) -> anyhow::Result<()> {
        self.kill9().await?;
        self.start()?;
        self.wait_ready(Some(token)).await.map(drop)
    }

    /// Stops it (SIGKILL: nothing of it is measured any more) and waits.
    pub async fn stop(mut self) {
        let _ = self.kill9().await;
    }
}
