//! A control plane in this process (the real API server over the in-memory store) and
//! agents on the sim driver, each on its own runtime and thread so that a test can
//! "kill -9" one (drop its runtime mid-flight) while its VMs, which live in the driver,
//! keep running.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use client::Client;
use compute::{ComputeDriver, SimConfig, SimDriver, VmStatus};
use model::api::{CreateImage, CreateToken, CreateVm};
use model::{DesiredState, ObservedState, Role, Vm};
use tokio::sync::oneshot;

/// How long a test waits for anything (every step takes well under a second).
pub const WAIT: Duration = Duration::from_secs(10);

/// Agent periods in the tests: fast, so each step takes a few hundred ms.
const POLL: Duration = Duration::from_millis(100);
const HEARTBEAT: Duration = Duration::from_millis(300);

/// The server, its admin client, an agent token and the sim image.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub admin: Client,
    agent_token: String,
    server: Option<api::ServerHandle>,
}

impl Cluster {
    /// Starts the server and registers the sim image as `default` (ticks every 50 ms).
    pub async fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("va")
            .tempdir_in("/tmp")
            .unwrap();
        let store = Arc::new(store::testing::MemStore::new());
        let admin_token = api::bootstrap_admin(store.as_ref(), dir.path())
            .await
            .unwrap()
            .unwrap();
        let config = api::ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            heartbeat_timeout: Duration::from_secs(3),
            blobs: Some(api::BlobConfig {
                dir: dir.path().join("blobs"),
                import_dir: None,
                max_bytes: api::DEFAULT_MAX_BLOB_BYTES,
            }),
            // Every agent of a test shares one token.
            rate_limit: None,
            secrets_key_file: Some(dir.path().join("secrets.key")),
            ..api::ServerConfig::default()
        };
        let server = api::serve(config, store).await.unwrap();
        let url = format!("http://{}", server.addr());
        let admin = Client::new(&url, &admin_token).unwrap();
        let agent_token = admin
            .create_token(&CreateToken::new(Role::Agent))
            .await
            .unwrap()
            .token;
        let img = compute::sim::write_image(&dir.path().join("image"), 16).unwrap();
        let files = client::ImageFiles {
            kernel: Some(img.kernel),
            initrd: Some(img.initrd),
            disk_template: Some(img.disk_template),
        };
        admin
            .upload_image(
                &files,
                CreateImage {
                    name: "default".into(),
                    kernel: None,
                    initrd: None,
                    disk_template: None,
                    cmdline: format!("{} vinfra.tick_ms=50", img.cmdline),
                    disk_mib: 16,
                    tenant: None,
                },
            )
            .await
            .unwrap();
        Cluster {
            dir,
            url,
            admin,
            agent_token,
            server: Some(server),
        }
    }

    /// A sim driver as the tests use it (quick boots).
    pub fn driver() -> Arc<SimDriver> {
        Arc::new(SimDriver::new(SimConfig {
            boot_time: Duration::from_millis(100),
            ..SimConfig::default()
        }))
    }

    /// The data dir of host `name`.
    pub fn host_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("hosts").join(name)
    }

    /// The config of an agent for host `name` on `driver`.
    pub fn agent_config(&self, name: &str, driver: &Arc<SimDriver>) -> agent::AgentConfig {
        self.agent_config_on(name, driver.clone())
    }

    /// The config of an agent for host `name` on any compute driver.
    pub fn agent_config_on(
        &self,
        name: &str,
        driver: Arc<dyn compute::ComputeDriver>,
    ) -> agent::AgentConfig {
        let mut cfg = agent::AgentConfig::simulated(
            &self.url,
            &self.agent_token,
            name,
            self.host_dir(name),
            driver,
        );
        cfg.poll = POLL;
        cfg.heartbeat = HEARTBEAT;
        // One shared origin dir: the SAN every host sees.
        cfg.disks.origin_dir = self.dir.path().join("origin");
        cfg
    }

    /// Starts an agent for host `name` on `driver` and waits until the host is up.
    pub async fn agent(&self, name: &str, driver: &Arc<SimDriver>) -> TestAgent {
        self.agent_on(name, driver.clone()).await
    }

    /// [`Cluster::agent`] on any compute driver.
    pub async fn agent_on(&self, name: &str, driver: Arc<dyn compute::ComputeDriver>) -> TestAgent {
        let a = TestAgent::spawn(self.agent_config_on(name, driver));
        let admin = self.admin.clone();
        let host = name.to_owned();
        wait(&format!("host {name} up"), || {
            let (admin, host) = (admin.clone(), host.clone());
            async move {
                admin
                    .get_host(&host)
                    .await
                    .is_ok_and(|h| h.state == model::HostState::Up)
            }
        })
        .await;
        a
    }

    /// Creates a VM on `host` (64 MiB, the sim image).
    pub async fn create_vm(&self, name: &str, host: &str) -> Vm {
        self.admin
            .create_vm(&CreateVm {
                name: name.into(),
                image: "default".into(),
                vcpus: 1,
                memory_mib: 64,
                host: Some(host.into()),
                tenant: None,
                redundant: false,
                disk_gib: None,
                nics: vec![],
                kernel_args: None,
                resource_tables: vec![],
            })
            .await
            .unwrap()
    }

    /// Waits until the VM's record satisfies `cond`; returns it.
    pub async fn wait_vm(&self, vm: &Vm, what: &str, cond: impl Fn(&Vm) -> bool) -> Vm {
        let id = vm.id.to_string();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.admin.get_vm(&id).await.unwrap();
            if cond(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "vm {} never got {what}: {v:?}\nconsole:\n{}",
                vm.name,
                self.admin.console(&id).await.unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the VM runs and its console (as reported to the server) shows
    /// `n` ticks whose disk checks passed after the first `after` such lines.
    pub async fn wait_ticks(&self, vm: &Vm, after: usize, n: usize) -> String {
        let id = vm.id.to_string();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let c = self.admin.console(&id).await.unwrap_or_default();
            if good_ticks(&c) >= after + n {
                return c;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "vm {} never showed {n} good ticks after {after}; console:\n{c}",
                vm.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the VM runs here, its guest is ready, and its disk checks pass.
    pub async fn wait_running(&self, vm: &Vm) -> Vm {
        let v = self
            .wait_vm(vm, "observed running", |v| {
                v.observed == ObservedState::Running && v.desired == DesiredState::Running
            })
            .await;
        let c = self.wait_ticks(vm, 0, 2).await;
        assert!(c.contains("GUEST: READY vda=16MiB"), "{c}");
        v
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            // Not awaited: the test runtime is going away.
            drop(s);
        }
    }
}

/// TICK lines whose read and write checks passed.
pub fn good_ticks(console: &str) -> usize {
    console
        .lines()
        .filter(|l| l.starts_with("TICK ") && l.ends_with("read=ok write=ok"))
        .count()
}

/// The tick numbers on a console, in order.
pub fn tick_numbers(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("TICK ")?.split(' ').next()?.parse().ok())
        .collect()
}

/// Polls `cond` until it holds, or panics naming `what` after [`WAIT`].
pub async fn wait<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    if test_utils::wait_for(WAIT, cond).await.is_err() {
        panic!("timed out waiting for {what}");
    }
}

/// Waits until the driver reports `cond` for VM `id`.
pub async fn wait_driver(
    driver: &SimDriver,
    id: &str,
    what: &str,
    cond: impl Fn(&VmStatus) -> bool,
) -> VmStatus {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let st = driver.status(id).await;
        if let Ok(st) = &st {
            if cond(st) {
                return st.clone();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "vm {id} never got {what}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An agent on its own thread and runtime.
pub struct TestAgent {
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Option<oneshot::Sender<()>>,
    crash: Option<oneshot::Sender<()>>,
}

impl TestAgent {
    pub fn spawn(cfg: agent::AgentConfig) -> TestAgent {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (crash_tx, crash_rx) = oneshot::channel::<()>();
        let name = cfg.host_name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("agent-{name}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let shutdown = async move {
                        let _ = stop_rx.await;
                    };
                    tokio::select! {
                        r = agent::run(cfg, shutdown) => r.expect("agent failed"),
                        // Dropping the agent's future and then its runtime mid-flight:
                        // no clean-up code runs, its sockets close — a kill -9.
                        _ = crash_rx => {}
                    }
                });
                rt.shutdown_background();
            })
            .unwrap();
        TestAgent {
            thread: Some(thread),
            stop: Some(stop_tx),
            crash: Some(crash_tx),
        }
    }

    async fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            tokio::task::spawn_blocking(move || t.join().expect("agent thread panicked"))
                .await
                .unwrap();
        }
    }

    /// Stops the agent the orderly way (it stops its VMs).
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.join().await;
    }

    /// Ends the agent at once, as `kill -9` would: its VMs keep running in the driver.
    pub async fn kill(mut self) {
        if let Some(s) = self.crash.take() {
            let _ = s.send(());
        }
        self.join().await;
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(s) = self.crash.take() {
            let _ = s.send(());
        }
    }
}

/// The run dir of VM `vm` on host data dir `host_dir` (the agent's layout).
pub fn run_dir(host_dir: &Path, vm: &Vm) -> PathBuf {
    let short: String = vm.id.0.simple().to_string().chars().take(12).collect();
    host_dir.join("vms").join(short)
}
