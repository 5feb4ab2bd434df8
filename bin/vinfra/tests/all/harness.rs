//! Real `vinfra` processes for end-to-end tests: a server on a free loopback port
//! with its own data dir, and agents pointed at it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use test_utils::ChildGuard;

pub const VINFRA: &str = env!("CARGO_BIN_EXE_vinfra");

/// A `vinfra server` process.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub store: String,
    pub listen: String,
    pub extra: Vec<String>,
    /// The network namespace the server runs in (one the test made), if not this one.
    pub netns: Option<String>,
    pub child: ChildGuard,
}

impl Server {
    /// Starts a server on a redb store in a fresh temp dir.
    pub async fn start() -> Server {
        let dir = tempfile::Builder::new()
            .prefix("vi")
            .tempdir_in("/tmp")
            .unwrap();
        let store = format!("redb:{}", dir.path().join("state.redb").display());
        Self::start_with(dir, store).await
    }

    /// Starts a server with the given store spec, data dir `dir`.
    pub async fn start_with(dir: tempfile::TempDir, store: String) -> Server {
        Self::start_with_args(dir, store, &[]).await
    }

    /// [`Server::start_with`] with extra `vinfra server` arguments.
    pub async fn start_with_args(dir: tempfile::TempDir, store: String, extra: &[&str]) -> Server {
        Self::start_at(None, "127.0.0.1", dir, store, extra).await
    }

    /// A redb server listening on `ip` (an address of a link the test made).
    pub async fn start_on(ip: &str) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("vi")
            .tempdir_in("/tmp")
            .unwrap();
        let store = format!("redb:{}", dir.path().join("state.redb").display());
        Self::start_at(None, ip, dir, store, &[]).await
    }

    /// A redb server inside network namespace `netns` (one the test made), listening on
    /// `ip` there; the test reaches it through a link of its own into that namespace.
    pub async fn start_in_netns(netns: &str, ip: &str) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("vi")
            .tempdir_in("/tmp")
            .unwrap();
        let store = format!("redb:{}", dir.path().join("state.redb").display());
        Self::start_at(Some(netns), ip, dir, store, &[]).await
    }

    async fn start_at(
        netns: Option<&str>,
        ip: &str,
        dir: tempfile::TempDir,
        store: String,
        extra: &[&str],
    ) -> Server {
        // A port free here is as good a guess in a fresh namespace, where nothing listens.
        let port = test_utils::free_tcp_port();
        let listen = format!("{ip}:{port}");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = spawn_server_in(netns, dir.path(), &store, &listen, &extra);
        // Beyond loopback (or when asked) the server serves HTTPS.
        let tls = !ip.starts_with("127.") || extra.windows(2).any(|w| w == ["--tls", "on"]);
        let scheme = if tls { "https" } else { "http" };
        let mut s = Server {
            url: format!("{scheme}://{listen}"),
            dir,
            store,
            listen,
            extra,
            netns: netns.map(str::to_owned),
            child,
        };
        s.wait_ready().await;
        s
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin-token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    pub fn admin(&self) -> client::Client {
        self.client(&self.admin_token())
    }

    /// The cluster CA file an HTTPS server wrote (`None` for plain HTTP).
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.url
            .starts_with("https://")
            .then(|| self.dir.path().join("ca.pem"))
    }

    /// What a client of this server trusts (`None` for plain HTTP).
    pub fn client_tls(&self) -> Option<client::ClientTls> {
        self.ca_file().map(|f| client::ClientTls {
            ca_pem: std::fs::read_to_string(f).unwrap(),
            identity: None,
        })
    }

    /// A client with `token`, over TLS when the server serves it.
    pub fn client(&self, token: &str) -> client::Client {
        match self.client_tls() {
            Some(t) => client::Client::with_tls(&self.url, token, &t).unwrap(),
            None => client::Client::new(&self.url, token).unwrap(),
        }
    }

    pub fn log(&self) -> String {
        test_utils::log_tail(&self.dir.path().join("server.log"), 40)
    }

    async fn wait_ready(&mut self) {
        let token_path = self.dir.path().join("admin-token");
        let url = self.url.clone();
        let ca_file = self.ca_file();
        let ok = test_utils::wait_for(Duration::from_secs(30), || {
            let token_path = token_path.clone();
            let url = url.clone();
            let ca_file = ca_file.clone();
            async move {
                let Ok(t) = std::fs::read_to_string(&token_path) else {
                    return false;
                };
                let c = match ca_file {
                    Some(f) => {
                        let Ok(ca_pem) = std::fs::read_to_string(f) else {
                            return false;
                        };
                        let tls = client::ClientTls {
                            ca_pem,
                            identity: None,
                        };
                        client::Client::with_tls(&url, t.trim(), &tls).unwrap()
                    }
                    None => client::Client::new(&url, t.trim()).unwrap(),
                };
                c.list_hosts().await.is_ok()
            }
        })
        .await;
        assert!(ok.is_ok(), "server did not come up:\n{}", self.log());
    }

    /// SIGKILL, then the same command line again on the same data.
    pub async fn kill9_and_restart(&mut self) {
        let status = self.child.kill();
        assert!(status.is_some(), "server was not running");
        self.child = spawn_server_in(
            self.netns.as_deref(),
            self.dir.path(),
            &self.store,
            &self.listen,
            &self.extra,
        );
        self.wait_ready().await;
    }
}

impl Drop for Server {
    /// VMs outlive their agents by design (a restarted agent adopts them), so a test's
    /// QEMUs would outlive the test: end every QEMU whose files are under this server's
    /// temp dir (all agents of a test keep their data dirs there).
    fn drop(&mut self) {
        compute::kill_qemus_under(self.dir.path());
        // Their taps are persistent: remove them (and bridges left empty) too.
        agent::netdev::unplug_all_under(self.dir.path());
    }
}

pub fn spawn_server(dir: &Path, store: &str, listen: &str, extra: &[String]) -> ChildGuard {
    spawn_server_in(None, dir, store, listen, extra)
}

/// [`spawn_server`] inside network namespace `netns`, when given.
pub fn spawn_server_in(
    netns: Option<&str>,
    dir: &Path,
    store: &str,
    listen: &str,
    extra: &[String],
) -> ChildGuard {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .unwrap();
    let mut cmd = match netns {
        // `ip netns exec` execs the server: the guard's pid is the server's.
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, VINFRA]);
            c
        }
        None => Command::new(VINFRA),
    };
    let child = cmd
        .args(["server", "--store", store, "--listen", listen, "--data-dir"])
        .arg(dir)
        .args(["--heartbeat-timeout-s", "3"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn vinfra server");
    ChildGuard::new(child)
}

/// A `vinfra agent` process with its origin dir under the server's dir (shared by
/// every agent of the test, like a SAN).
pub fn spawn_agent(server: &Server, host: &str, data_dir: &Path, token_file: &Path) -> ChildGuard {
    spawn_agent_env(server, host, data_dir, token_file, &[])
}

/// [`spawn_agent`] with extra environment variables (fail points).
pub fn spawn_agent_env(
    server: &Server,
    host: &str,
    data_dir: &Path,
    token_file: &Path,
    env: &[(&str, &str)],
) -> ChildGuard {
    spawn_agent_in(server, host, data_dir, token_file, env, None, &[])
}

/// [`spawn_agent_env`] inside network namespace `netns` (a "machine" the test made),
/// with extra agent arguments.
pub fn spawn_agent_in(
    server: &Server,
    host: &str,
    data_dir: &Path,
    token_file: &Path,
    env: &[(&str, &str)],
    netns: Option<&str>,
    extra: &[&str],
) -> ChildGuard {
    std::fs::create_dir_all(data_dir).unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.join("agent.log"))
        .unwrap();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, VINFRA]);
            c
        }
        None => Command::new(VINFRA),
    };
    let child = cmd
        .args([
            "agent",
            "--server",
            &server.url,
            "--host-name",
            host,
            "--data-dir",
        ])
        .arg(data_dir)
        .args(agent_credentials(server, token_file))
        .args(["--accel", "tcg"])
        .arg("--origin-dir")
        .arg(server.dir.path().join("origin"))
        .args(extra)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn vinfra agent");
    ChildGuard::new(child)
}

/// How an agent authenticates: its token file on plain HTTP; on HTTPS a fresh
/// one-time join token (minted with the CLI, as an operator would), unless the agent's
/// data dir already holds the identity of an earlier join.
fn agent_credentials(server: &Server, token_file: &Path) -> Vec<String> {
    if !server.url.starts_with("https://") {
        return vec!["--token-file".into(), token_file.display().to_string()];
    }
    let (ok, out, err) = cli(server, &server.admin_token(), &["token", "join"]);
    assert!(ok, "vinfra token join failed: {out}{err}");
    vec!["--join-token".into(), out.trim().to_owned()]
}

/// Runs the CLI with the given server and token; returns (success, stdout, stderr).
pub fn cli(server: &Server, token: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(VINFRA);
    if let Some(ca) = server.ca_file() {
        cmd.env("VINFRA_CA_FILE", ca);
    }
    let out = cmd
        .args(args)
        .env("VINFRA_URL", &server.url)
        .env("VINFRA_TOKEN", token)
        .stdin(Stdio::null())
        .output()
        .expect("run vinfra cli");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A path with `name` under the server's dir.
pub fn path_in(server: &Server, name: &str) -> PathBuf {
    server.dir.path().join(name)
}

/// A server with an agent token file and the default image registered, ready for agents.
pub async fn cluster() -> (Server, PathBuf) {
    cluster_with(Server::start()).await
}

/// [`cluster`] on a server the caller starts.
pub async fn cluster_with(server: impl std::future::Future<Output = Server>) -> (Server, PathBuf) {
    test_utils::require_tool("qemu-system-x86_64", "run scripts/setup.sh").unwrap();
    let image = tokio::task::spawn_blocking(|| {
        compute::ensure_default_image(&compute::default_cache_dir(), |_| {})
    })
    .await
    .unwrap()
    .expect("default guest image (scripts/setup.sh installs what it needs)");
    let s = server.await;
    let token_file = agent_token_file(&s).await;
    // Through the CLI, as a user would: `vinfra image upload`.
    let (ok, out, err) = cli(
        &s,
        &s.admin_token(),
        &[
            "image",
            "upload",
            "default",
            "--kernel",
            &image.kernel.display().to_string(),
            "--initrd",
            &image.initrd.display().to_string(),
            "--disk",
            &image.disk_template.display().to_string(),
            "--cmdline",
            &image.cmdline,
            "--disk-mib",
            "64",
        ],
    );
    assert!(ok, "vinfra image upload failed: {out}{err}");
    (s, token_file)
}

/// A new agent token in the file `agent-token` of the server's directory, which agents
/// are started with.
pub async fn agent_token_file(s: &Server) -> PathBuf {
    let token = s
        .admin()
        .create_token(&model::api::CreateToken::new(model::Role::Agent))
        .await
        .unwrap()
        .token;
    let file = path_in(s, "agent-token");
    std::fs::write(&file, token).unwrap();
    file
}

/// The sim driver's image registered as `default` (a 16 MiB disk), with `extra`
/// appended to its kernel command line: what agents on `--driver sim` boot.
pub async fn sim_default_image(s: &Server, extra: &str) {
    let img = compute::sim::write_image(&path_in(s, "image"), 16).unwrap();
    s.admin()
        .upload_image(
            &client::ImageFiles {
                kernel: Some(img.kernel),
                initrd: Some(img.initrd),
                disk_template: Some(img.disk_template),
            },
            model::api::CreateImage {
                name: "default".into(),
                kernel: None,
                initrd: None,
                disk_template: None,
                cmdline: format!("{} {extra}", img.cmdline).trim_end().to_owned(),
                disk_mib: 16,
                tenant: None,
            },
        )
        .await
        .unwrap();
}

/// Waits until `host` is registered and up.
pub async fn wait_host_up(s: &Server, host: &str) {
    let admin = s.admin();
    test_utils::wait_for(Duration::from_secs(30), || async {
        admin
            .get_host(host)
            .await
            .is_ok_and(|h| h.state == model::HostState::Up)
    })
    .await
    .unwrap_or_else(|_| panic!("agent {host} did not register"));
}

/// The highest `TICK n` on the console with its read/write checks, and whether any
/// check failed.
pub fn ticks(console: &str) -> (Option<u64>, bool) {
    let mut last = None;
    let mut bad = false;
    for l in console.lines() {
        if let Some(rest) = l.strip_prefix("TICK ") {
            if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok()) {
                last = Some(n);
            }
            bad |= l.contains("BAD");
        }
    }
    (last, bad)
}
