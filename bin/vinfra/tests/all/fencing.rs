//! Takeover without split brain: a redundant VM's primary host is cut off from the
//! control plane while its guest keeps running. Its agent pauses the guest when its
//! host lease expires; the server starts the standby only a margin after that; the
//! storage pair never sees the two guests' writes interleave.
//!
//! Real parts: `vinfra server` and two `vinfra agent` processes, each in a network
//! namespace made here (the server's holds a bridge, the agents' reach it over veth
//! pairs, the test over one more), the agents' real disk stack (NBD server, block
//! cache, write-through to the origin in the shared origin dir, which stands for the
//! storage pair) and the sim driver's guests, which write a `SEQ<tick>` record into
//! the last MiB of their disk every tick (50 ms). The sim driver, not QEMU: the
//! guest's writes take the same path through the agent's disk stack, `pause` drains
//! them as QEMU's `stop` does, and a sim guest is up in 100 ms where a TCG boot takes
//! seconds on this 2-core machine, which would blur the timeline measured here.
//!
//! The cut deletes the agent namespace's route to the server (the link stays up, the
//! guest's disk is on the agent's loopback), as a host losing its management network.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use model::api::CreateVm;
use model::{HostState, ObservedState, Vm};

use crate::harness::{agent_token_file, cli, path_in, sim_default_image, spawn_agent_in, Server};
use crate::netns::{ip, veth, Netns};

/// The server's heartbeat timeout (the harness passes `--heartbeat-timeout-s 3`): the
/// host lease. The takeover margin is the default for it, max(2 s, 3 s / 2).
const LEASE: Duration = Duration::from_secs(3);
const MARGIN: Duration = Duration::from_secs(2);
/// Ticks of the sim guest.
const TICK_MS: u64 = 50;
const WAIT: Duration = Duration::from_secs(30);

const INVENTORY: &str = r#"
storage:
  - {name: array-1, capacity_gib: 100, free_gib: 80, replication: [sync], failure_domain: rack-1}
  - {name: array-2, capacity_gib: 100, free_gib: 80, replication: [sync], failure_domain: rack-2}
connectivity:
  host-a: [array-1]
  host-b: [array-2]
"#;

/// The namespaces: `ctl` with the server on a bridge at `<net>.1`, and one per agent
/// (`host-a` at `<net>.2`, `host-b` at `<net>.3`); the test reaches the bridge from
/// its own namespace at `<net>.254`.
struct Lab {
    // Fields drop in this order: agents, then the server (which ends the guests), then
    // the namespaces and the test's link.
    _agents: Vec<test_utils::ChildGuard>,
    s: Server,
    /// The agents' namespaces, kept (and removed) with the lab.
    _hosts: [Netns; 2],
    ctl: Netns,
    _link: DeleteLink,
    dirs: [PathBuf; 2],
}

const HOSTS: [&str; 2] = ["host-a", "host-b"];

impl Lab {
    /// `tag`: one letter, distinct per test (namespace and link names); `subnet`: the
    /// third octet of 10.213.x.0/24, distinct per test.
    async fn start(tag: &str, subnet: u8) -> Lab {
        let pid = std::process::id();
        let net = format!("10.213.{subnet}");
        let ctl = Netns::new(&format!("{tag}c"));
        ip(&["-n", &ctl.name, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &ctl.name,
            "addr",
            "add",
            &format!("{net}.1/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", &ctl.name, "link", "set", "br0", "up"]);
        let hosts = [
            Netns::new(&format!("{tag}a")),
            Netns::new(&format!("{tag}b")),
        ];
        for (i, h) in hosts.iter().enumerate() {
            let port = format!("h{i}");
            let addr = format!("{net}.{}/24", i + 2);
            veth(h, "up0", Some(&addr), &ctl, &port, None);
            ip(&["-n", &ctl.name, "link", "set", &port, "master", "br0"]);
        }
        // The test's own way in: a veth from this namespace to the bridge.
        let link = format!("vf{tag}{pid}");
        ip(&[
            "link", "add", &link, "type", "veth", "peer", "name", "t0", "netns", &ctl.name,
        ]);
        let link = DeleteLink(link);
        ip(&["-n", &ctl.name, "link", "set", "t0", "master", "br0"]);
        ip(&["-n", &ctl.name, "link", "set", "t0", "up"]);
        ip(&["addr", "add", &format!("{net}.254/24"), "dev", &link.0]);
        ip(&["link", "set", &link.0, "up"]);

        let s = Server::start_in_netns(&ctl.name, &format!("{net}.1")).await;
        let token_file = agent_token_file(&s).await;
        sim_default_image(&s, &format!("vinfra.tick_ms={TICK_MS}")).await;
        let dirs = [path_in(&s, "a"), path_in(&s, "b")];
        let agents = HOSTS
            .iter()
            .enumerate()
            .map(|(i, h)| {
                spawn_agent_in(
                    &s,
                    h,
                    &dirs[i],
                    &token_file,
                    &[],
                    Some(&hosts[i].name),
                    &["--driver", "sim", "--sim-boot-ms", "100"],
                )
            })
            .collect();
        let lab = Lab {
            _agents: agents,
            s,
            _hosts: hosts,
            ctl,
            _link: link,
            dirs,
        };
        for h in HOSTS {
            let admin = lab.s.admin();
            test_utils::wait_for(WAIT, || async {
                admin
                    .get_host(h)
                    .await
                    .is_ok_and(|x| x.state == HostState::Up)
            })
            .await
            .unwrap_or_else(|_| panic!("{h} did not come up:\n{}", lab.logs()));
        }
        let file = path_in(&lab.s, "storage.yaml");
        std::fs::write(&file, INVENTORY).unwrap();
        let (ok, out, err) = cli(
            &lab.s,
            &lab.s.admin_token(),
            &["storage", "load", file.to_str().unwrap()],
        );
        assert!(ok, "{out}{err}");
        lab
    }

    fn index(host: &str) -> usize {
        HOSTS.iter().position(|h| *h == host).unwrap()
    }

    /// Host `host` is cut off from the server both ways (its guest runs on).
    fn cut(&self, host: &str) {
        self.port(host, "down");
    }

    /// The cable back.
    fn restore(&self, host: &str) {
        self.port(host, "up");
    }

    /// Sets the host's port on the server's bridge down or up. Down cuts both ways, as
    /// a pulled cable or a failed switch port does: a route deleted on the host's side
    /// alone would still let the server's packets in, and the pushed takeover would
    /// reach the cut-off agent.
    fn port(&self, host: &str, state: &str) {
        let port = format!("h{}", Self::index(host));
        ip(&["-n", &self.ctl.name, "link", "set", &port, state]);
    }

    /// A redundant VM `db`, running, with its first ticks on the storage pair.
    async fn redundant_vm(&self) -> Vm {
        let admin = self.s.admin();
        admin
            .create_vm(&CreateVm {
                name: "db".into(),
                image: "default".into(),
                vcpus: 1,
                memory_mib: 64,
                host: None,
                tenant: None,
                redundant: true,
                disk_gib: Some(2),
                nics: vec![],
                kernel_args: None,
                resource_tables: vec![],
            })
            .await
            .unwrap();
        test_utils::wait_for(WAIT, || async {
            admin
                .get_vm("db")
                .await
                .is_ok_and(|v| v.observed == ObservedState::Running)
        })
        .await
        .unwrap_or_else(|_| panic!("db never ran:\n{}", self.logs()));
        admin.get_vm("db").await.unwrap()
    }

    /// The VM's disk on the storage pair (the shared origin dir of both agents).
    fn origin(&self, vm: &Vm) -> PathBuf {
        path_in(&self.s, "origin").join(format!("{}.img", vm.id))
    }

    /// Where host `host` keeps the VM's files (gone once its agent dropped the VM).
    fn run_dir(&self, host: &str, vm: &Vm) -> PathBuf {
        agent::files::VmFiles::new(&self.dirs[Self::index(host)], vm.id)
            .run_dir()
            .to_owned()
    }

    fn agent_log(&self, host: &str) -> String {
        std::fs::read_to_string(self.dirs[Self::index(host)].join("agent.log")).unwrap_or_default()
    }

    fn logs(&self) -> String {
        let tail = |p: &Path| test_utils::log_tail(p, 30);
        format!(
            "server:\n{}\nhost-a:\n{}\nhost-b:\n{}",
            self.s.log(),
            tail(&self.dirs[0].join("agent.log")),
            tail(&self.dirs[1].join("agent.log")),
        )
    }
}

/// Deletes a link of this namespace on drop.
struct DeleteLink(String);

impl Drop for DeleteLink {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .output();
    }
}

/// One change of the `SEQ` record on the storage pair, when the test saw it.
#[derive(Clone, Copy, Debug)]
struct Write {
    at: Instant,
    seq: u64,
}

/// Watches the VM's `SEQ` record on the storage pair every 2 ms (a guest writes it
/// every 50 ms), from its own thread, and keeps every change with its time.
struct StorageWatch {
    writes: Arc<Mutex<Vec<Write>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StorageWatch {
    fn start(origin: PathBuf) -> StorageWatch {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (w, st) = (writes.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&origin).unwrap();
            let off = f.metadata().unwrap().len() - (1 << 20);
            let mut last = None;
            while !st.load(Ordering::Relaxed) {
                let mut buf = [0u8; 11];
                let seq = f.read_exact_at(&mut buf, off).ok().and_then(|()| {
                    std::str::from_utf8(buf.strip_prefix(b"SEQ")?)
                        .ok()?
                        .parse()
                        .ok()
                });
                if let Some(v) = seq.filter(|_| seq != last) {
                    let at = Instant::now();
                    w.lock().unwrap().push(Write { at, seq: v });
                    last = seq;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        StorageWatch {
            writes,
            stop,
            thread: Some(thread),
        }
    }

    fn writes(&self) -> Vec<Write> {
        self.writes.lock().unwrap().clone()
    }

    fn last(&self) -> Option<Write> {
        self.writes.lock().unwrap().last().copied()
    }

    /// Waits until `cond` holds over the writes seen so far.
    async fn wait(&self, what: &str, cond: impl Fn(&[Write]) -> bool, lab: &Lab) {
        let ok = test_utils::wait_for(WAIT, || {
            let w = self.writes();
            let r = cond(&w);
            async move { r }
        })
        .await;
        assert!(ok.is_ok(), "never saw {what}:\n{}", lab.logs());
    }
}

impl Drop for StorageWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The records written, in order (for messages).
fn seqs(w: &[Write]) -> Vec<u64> {
    w.iter().map(|w| w.seq).collect()
}

/// The highest `TICK n` of a console log.
fn last_tick(console: &str) -> Option<u64> {
    crate::harness::ticks(console).0
}

#[tokio::test]
async fn a_cut_off_primary_pauses_its_guest_before_the_standby_starts() {
    let lab = Lab::start("l", 1).await;
    let vm = lab.redundant_vm().await;
    let red = vm.redundancy.clone().expect("a redundant placement");
    let (primary, standby) = (vm.host.to_string(), red.standby_host.to_string());
    let watch = StorageWatch::start(lab.origin(&vm));
    // Enough ticks that the standby's fresh count (from 0) stays below the primary's
    // for the whole observation: every write is then attributable.
    watch
        .wait("40 writes of the primary", |w| w.len() >= 40, &lab)
        .await;

    let cut = Instant::now();
    lab.cut(&primary);
    let admin = lab.s.admin();
    test_utils::wait_for(WAIT, || async {
        admin
            .get_vm("db")
            .await
            .is_ok_and(|v| v.host.as_str() == standby && v.observed == ObservedState::Running)
    })
    .await
    .unwrap_or_else(|_| panic!("the standby never took over:\n{}", lab.logs()));
    let decreases = |w: &[Write]| w.windows(2).filter(|p| p[1].seq < p[0].seq).count();
    // The standby's guest writes from tick 0: the record goes back once.
    watch
        .wait(
            "20 writes of the standby",
            |w| {
                let from = w.windows(2).position(|p| p[1].seq < p[0].seq);
                from.is_some_and(|i| w.len() - i > 20)
            },
            &lab,
        )
        .await;
    // The primary's guest is paused, not gone: its agent cannot hear of the takeover.
    let primary_run = lab.run_dir(&primary, &vm);
    assert!(primary_run.exists(), "the primary's vm files went early");
    let primary_console =
        std::fs::read_to_string(primary_run.join("console.log")).unwrap_or_default();

    // Back on the network, its agent finds the VM gone and stops it, never resuming.
    let restored = Instant::now();
    lab.restore(&primary);
    test_utils::wait_for(WAIT, || {
        let gone = !primary_run.exists();
        async move { gone }
    })
    .await
    .unwrap_or_else(|_| panic!("the old primary kept the vm:\n{}", lab.logs()));
    let dropped = Instant::now();
    let settled = watch.last().unwrap().seq;
    watch
        .wait(
            "10 more writes of the standby",
            |w| w.last().is_some_and(|x| x.seq >= settled + 10),
            &lab,
        )
        .await;
    let writes = watch.writes();
    drop(watch);

    // Exactly one writer at a time: the primary's run, then the standby's from 0, each
    // strictly increasing, never interleaved (another writer's record would take the
    // value back at least once more).
    assert_eq!(
        decreases(&writes),
        1,
        "interleaved writers: {:?}",
        seqs(&writes)
    );
    let switch = writes.windows(2).position(|p| p[1].seq < p[0].seq).unwrap() + 1;
    let (p_last, s_first) = (writes[switch - 1], writes[switch]);
    assert!(
        s_first.seq <= 2,
        "the standby's guest boots afresh: {s_first:?}"
    );
    // Until the primary came back the standby's count stays below the primary's, so
    // each write is attributable: none continues the primary's count.
    assert!(
        writes[switch..]
            .iter()
            .take_while(|w| w.at < restored)
            .all(|w| w.seq < p_last.seq),
        "a write after the standby began continues the primary's count: {:?}",
        seqs(&writes)
    );
    assert_eq!(
        last_tick(&primary_console),
        Some(p_last.seq),
        "the primary's last tick is its last write on the storage pair"
    );
    let log = lab.agent_log(&primary);
    assert!(
        log.contains("guest paused (fenced)") && !log.contains("guest resumed"),
        "{log}"
    );
    let vm = admin.get_vm("db").await.unwrap();
    let red = vm.redundancy.unwrap();
    assert_eq!(
        (red.takeovers, red.standby_host.as_str()),
        (1, primary.as_str())
    );

    let paused = p_last.at - cut;
    let started = s_first.at - cut;
    let gap = s_first.at - p_last.at;
    eprintln!(
        "fencing timeline (lease {LEASE:?}, margin {MARGIN:?}): cut -> primary's last write \
         {paused:?}; cut -> standby's first write {started:?}; gap {gap:?}; route back -> \
         old primary dropped the vm {:?}",
        dropped - restored
    );
    // The agent pauses within a lease of its last heartbeat's send (≤ the cut), and the
    // server starts the standby at least the margin after that lease ran out: the gap
    // is the margin, less the pause's own latency.
    assert!(
        paused < LEASE + Duration::from_secs(1),
        "paused {paused:?} after the cut"
    );
    assert!(
        gap > MARGIN / 2,
        "the standby started only {gap:?} after the primary's last write"
    );
    drop(lab);
}

#[tokio::test]
async fn a_short_cut_pauses_and_resumes_the_guest_without_a_takeover() {
    let lab = Lab::start("s", 2).await;
    let vm = lab.redundant_vm().await;
    let primary = vm.host.to_string();
    let watch = StorageWatch::start(lab.origin(&vm));
    watch.wait("20 writes", |w| w.len() >= 20, &lab).await;

    let cut = Instant::now();
    lab.cut(&primary);
    // Paused: no write for 6 ticks. Then the route comes back at once, well within the
    // margin beyond the lease, before any takeover.
    let quiet = Duration::from_millis(6 * TICK_MS);
    let ok = test_utils::wait_for(WAIT, || {
        let paused = cut.elapsed() > quiet && watch.last().is_some_and(|w| w.at.elapsed() > quiet);
        async move { paused }
    })
    .await;
    assert!(ok.is_ok(), "the guest was never paused:\n{}", lab.logs());
    let before = watch.last().unwrap();
    let restored = Instant::now();
    lab.restore(&primary);
    watch
        .wait(
            "the guest writing again",
            |w| w.last().is_some_and(|x| x.seq >= before.seq + 20),
            &lab,
        )
        .await;
    let writes = watch.writes();
    drop(watch);
    let after = writes.iter().find(|w| w.seq > before.seq).copied().unwrap();

    // One writer throughout, the same guest, on its host: no takeover.
    assert!(
        writes.windows(2).all(|p| p[1].seq > p[0].seq),
        "another writer: {:?}",
        seqs(&writes)
    );
    let admin = lab.s.admin();
    let vm = admin.get_vm("db").await.unwrap();
    assert_eq!(vm.host.as_str(), primary);
    assert_eq!(vm.redundancy.unwrap().takeovers, 0);
    let log = lab.agent_log(&primary);
    assert!(
        log.contains("guest paused (fenced)") && log.contains("guest resumed"),
        "{log}"
    );
    test_utils::wait_for(WAIT, || async {
        admin
            .get_vm("db")
            .await
            .is_ok_and(|v| v.observed == ObservedState::Running)
    })
    .await
    .unwrap_or_else(|_| panic!("db not reported running again:\n{}", lab.logs()));
    eprintln!(
        "short cut (lease {LEASE:?}, margin {MARGIN:?}): cut -> last write before the pause \
         {:?}; route back {:?} after the cut; writing again {:?} after the route came back",
        before.at - cut,
        restored - cut,
        after.at - restored
    );
    drop(lab);
}
