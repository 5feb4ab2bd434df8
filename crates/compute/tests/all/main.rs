//! Integration tests of the compute crate against real QEMU and the guest images; VM
//! disks are served over NBD by the `nbd` crate's server, as the node agent serves them.
//!
//! The guest image is cached in `$VINFRA_GUEST_CACHE` (default `/var/cache/vinfra/guest`), so
//! only the first run builds it (~10 s). VM tests run one at a time: each TCG QEMU eats a core.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use compute::{
    default_cache_dir, ensure_default_image, prepare_vm_disk, Accel, ComputeDriver, DiskTarget,
    GuestImage, MigrateOptions, OpOutcome, QemuDriver, VmSpec, VmStatus,
};
use model::terminal_ops::Operation;

mod tables;
mod terminal;

/// A core per running TCG QEMU: the VM tests hold a permit per QEMU they run at once
/// (2 cores here), so that two single-VM tests run side by side and a migration test
/// (two QEMUs) runs alone.
static CORES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

fn need_tools() {
    for bin in ["qemu-system-x86_64", "busybox"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()));
        assert!(found, "{bin} not found: run scripts/setup.sh");
    }
}

fn image() -> GuestImage {
    need_tools();
    ensure_default_image(&default_cache_dir(), |l| eprintln!("{l}"))
        .unwrap_or_else(|e| panic!("guest image: {e} (run scripts/setup.sh as root)"))
}

/// Serves `image` read-write as export `disk0` on `listen` through our own NBD server
/// (the one the agent serves VM disks with, there behind its block cache). Several
/// clients at once: a migration's destination connects while the source still is.
/// Dropping the handle stops it.
fn serve_disk(image: &Path, listen: nbd::NbdAddr) -> (nbd::ServerHandle, DiskTarget) {
    let dev = nbd::FileDevice::open(image, false).expect("open the disk");
    let mut sc = nbd::ServeConfig::new(listen);
    sc.exports.insert(
        "disk0".into(),
        std::sync::Arc::new(dev) as std::sync::Arc<dyn nbd::BlockDevice>,
    );
    let server = nbd::serve(sc).expect("serve the disk");
    let target = match server.local_addr() {
        nbd::NbdAddr::Tcp(a) => DiskTarget::NbdTcp {
            host: a.ip().to_string(),
            port: a.port(),
            export: "disk0".into(),
        },
        nbd::NbdAddr::Unix(path) => DiskTarget::NbdUnix {
            path,
            export: "disk0".into(),
        },
    };
    (server, target)
}

/// Stops the disk server (its shutdown waits for its threads: off the runtime).
async fn stop_disk(server: nbd::ServerHandle) {
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .expect("nbd shutdown");
}

/// Short scratch dir: unix socket paths must stay under 108 bytes.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vc")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

fn spec(id: &str, img: &GuestImage, disk: DiskTarget, run_dir: PathBuf) -> VmSpec {
    VmSpec {
        id: id.into(),
        name: format!("test {id}"),
        vcpus: 1,
        memory_mib: 256,
        kernel: img.kernel.clone(),
        initrd: img.initrd.clone(),
        cmdline: img.cmdline.clone(),
        disk,
        nics: vec![],
        run_dir,
        accel: Accel::Auto,
        tables: vec![],
    }
}

/// Kills a test's QEMUs when it ends.
type KillGuard = test_utils::QemuKillGuard;

fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s.get(i + 2..i + 3))
            .is_some_and(|st| st == "Z" || st == "X"),
    }
}

async fn wait_gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if gone(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn read(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Polls `path` until `pred` holds for its content; panics with the content on timeout.
async fn wait_console(path: &Path, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = read(path);
        if pred(&text) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what} in {}:\n{text}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `(tick, ok)` for each complete TICK line.
fn ticks(text: &str) -> Vec<(u64, bool)> {
    text.lines()
        .filter(|l| l.starts_with("TICK ") && l.contains(" write="))
        .filter_map(|l| {
            let n = l.split_whitespace().nth(1)?.parse().ok()?;
            Some((n, l.contains("read=ok write=ok")))
        })
        .collect()
}

fn has_tick(text: &str, n: u64) -> bool {
    ticks(text).iter().any(|&(t, _)| t >= n)
}

async fn wait_running(drv: &QemuDriver, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = drv.status(id).await.expect("status");
        if st == VmStatus::Running {
            return;
        }
        assert!(Instant::now() < deadline, "vm {id} not running: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Terminal operations on a booted guest: a screenshot of its display, keys and pointer
/// taken (the test guest reads neither; `terminal.rs` checks what arrives).
async fn screenshot_and_keys(drv: &QemuDriver, id: &str) {
    let OpOutcome::Screenshot(shot) = drv.perform(id, &Operation::Screenshot).await.unwrap() else {
        panic!("no screenshot")
    };
    assert_eq!(
        compute::png::dimensions(&shot.png).unwrap(),
        (shot.width, shot.height)
    );
    eprintln!("screenshot of the booted guest: {shot:?}");
    for json in [
        r#"{"op":"type_text","text":"uname -a\n"}"#,
        r#"{"op":"key_combo","qcodes":["ctrl","l"]}"#,
        r#"{"op":"pointer_move","x":16384,"y":16384}"#,
        r#"{"op":"wheel","delta":1}"#,
    ] {
        let op: Operation = serde_json::from_str(json).unwrap();
        assert_eq!(
            drv.perform(id, &op).await.unwrap(),
            OpOutcome::Done,
            "{json}"
        );
    }
}

#[tokio::test]
async fn boots_on_nbd_ticks_survives_agent_restart_and_stops() {
    let img = image();
    let _cores = CORES.acquire().await.expect("never closed");
    let tmp = scratch();
    let disk = tmp.path().join("disk.img");
    assert!(prepare_vm_disk(&img.disk_template, &disk).await.unwrap());
    let (nbd, target) = serve_disk(&disk, nbd::NbdAddr::Unix(tmp.path().join("nbd.sock")));
    let run_dir = tmp.path().join("run");
    let spec = spec("boot-1", &img, target, run_dir.clone());
    let mut guard = KillGuard::default();

    let drv = QemuDriver::new();
    let t0 = Instant::now();
    let rt = drv.start(&spec).await.unwrap();
    guard.add(rt.pid, &run_dir);
    // QEMU boots the kernel's own ELF through its PVH entry, unpacked beside the bzImage
    // (qemu/pvh.rs): under TCG that halves the boot.
    let argv = std::fs::read(format!("/proc/{}/cmdline", rt.pid)).unwrap();
    let argv: Vec<String> = argv
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let kernel = argv
        .iter()
        .position(|a| a == "-kernel")
        .and_then(|i| argv.get(i + 1))
        .expect("-kernel in QEMU's arguments");
    assert!(
        kernel.starts_with(&*img.kernel.to_string_lossy()) && kernel.ends_with(".pvh"),
        "QEMU was given {kernel}, not the PVH ELF of {}",
        img.kernel.display()
    );
    assert!(compute::qemu::pvh::has_pvh_entry(
        &std::fs::read(kernel).unwrap()
    ));
    assert_eq!(drv.console_path("boot-1").unwrap(), rt.console_log);
    assert!(matches!(
        drv.start(&spec).await,
        Err(compute::ComputeError::AlreadyRunning { .. })
    ));
    wait_console(
        &rt.console_log,
        "GUEST: READY",
        Duration::from_secs(120),
        |t| t.contains("GUEST: READY"),
    )
    .await;
    eprintln!(
        "boot (exec -> GUEST: READY, accel {:?}): {:.2} s",
        rt.accel,
        t0.elapsed().as_secs_f64()
    );
    wait_console(&rt.console_log, "TICK 3", Duration::from_secs(30), |t| {
        has_tick(t, 3)
    })
    .await;
    assert_eq!(drv.status("boot-1").await.unwrap(), VmStatus::Running);
    screenshot_and_keys(&drv, "boot-1").await;

    // Agent restart: the old driver goes away (the VM keeps running), a new one adopts it.
    drop(drv);
    let drv = QemuDriver::new();
    let adopted = drv.adopt("boot-1", &run_dir).await.unwrap();
    assert_eq!(adopted.pid, rt.pid);
    assert_eq!(drv.status("boot-1").await.unwrap(), VmStatus::Running);
    let seen = ticks(&read(&rt.console_log)).last().unwrap().0;
    wait_console(
        &rt.console_log,
        "a tick after adoption",
        Duration::from_secs(30),
        |t| has_tick(t, seen + 2),
    )
    .await;
    let all = ticks(&read(&rt.console_log));
    assert!(all.iter().all(|&(_, ok)| ok), "bad I/O check: {all:?}");
    screenshot_and_keys(&drv, "boot-1").await;

    let st = drv.stop("boot-1").await.unwrap();
    assert!(
        matches!(&st, VmStatus::Stopped { reason } if reason.contains("stopped by request")),
        "{st:?}"
    );
    assert!(wait_gone(rt.pid).await, "qemu {} still running", rt.pid);
    assert_eq!(drv.status("boot-1").await.unwrap(), st);
    stop_disk(nbd).await;
}

#[tokio::test]
async fn qemu_killed_from_outside_is_reported_crashed() {
    let img = image();
    let _cores = CORES.acquire().await.expect("never closed");
    let tmp = scratch();
    let disk = tmp.path().join("disk.img");
    prepare_vm_disk(&img.disk_template, &disk).await.unwrap();
    let run_dir = tmp.path().join("run");
    let mut guard = KillGuard::default();
    let drv = QemuDriver::new();
    let rt = drv
        .start(&spec(
            "crash-1",
            &img,
            DiskTarget::File(disk),
            run_dir.clone(),
        ))
        .await
        .unwrap();
    guard.add(rt.pid, &run_dir);

    // A migration to a port nobody listens on fails and leaves the source running.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let e = drv
        .migrate(
            "crash-1",
            &format!("tcp:{closed}"),
            &MigrateOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            compute::ComputeError::MigrationFailed { .. } | compute::ComputeError::Qmp { .. }
        ),
        "{e}"
    );
    eprintln!("failed migration reported as: {e}");
    assert_eq!(drv.status("crash-1").await.unwrap(), VmStatus::Running);

    let p = rustix::process::Pid::from_raw(i32::try_from(rt.pid).unwrap()).unwrap();
    rustix::process::kill_process(p, rustix::process::Signal::KILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let st = drv.status("crash-1").await.unwrap();
        if st.is_exited() || Instant::now() > deadline {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        matches!(&st, VmStatus::Crashed { reason } if reason.contains("signal 9")),
        "{st:?}"
    );
}

#[tokio::test]
async fn live_migration_between_two_qemus_keeps_guest_state_and_disk_io() {
    let img = image();
    let _cores = CORES.acquire_many(2).await.expect("never closed"); // two QEMUs
    let tmp = scratch();
    let disk = tmp.path().join("disk.img");
    prepare_vm_disk(&img.disk_template, &disk).await.unwrap();
    let (nbd, target) = serve_disk(&disk, nbd::NbdAddr::Tcp("127.0.0.1:0".parse().unwrap()));
    let mut guard = KillGuard::default();
    // Two "hosts": one driver each, the same VM id on both.
    let (host_a, host_b) = (QemuDriver::new(), QemuDriver::new());
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    let src = host_a
        .start(&spec("web-1", &img, target.clone(), dir_a.clone()))
        .await
        .unwrap();
    guard.add(src.pid, &dir_a);
    wait_console(
        &src.console_log,
        "TICK 5 on the source",
        Duration::from_secs(120),
        |t| has_tick(t, 5),
    )
    .await;

    let dst = host_b
        .start_incoming(
            &spec("web-1", &img, target.clone(), dir_b.clone()),
            "127.0.0.1:0".parse().unwrap(),
            None,
        )
        .await
        .unwrap();
    guard.add(dst.pid, &dir_b);
    let listen = dst.incoming.expect("incoming address");
    assert_ne!(listen.port(), 0);
    assert_eq!(
        host_b.status("web-1").await.unwrap(),
        VmStatus::Paused {
            state: "inmigrate".into()
        }
    );

    let stats = host_a
        .migrate(
            "web-1",
            &format!("tcp:{listen}"),
            &MigrateOptions::default(),
        )
        .await
        .unwrap();
    eprintln!("migration: {stats:?}");
    assert!(stats.ram_transferred_bytes > 1 << 20, "{stats:?}");
    assert!(stats.total_time_ms > 0 && stats.polls > 0, "{stats:?}");
    assert!(stats.source_stopped_at_us.is_some(), "no STOP event seen");

    // The source quit after completing; the destination runs on by itself.
    let st = host_a.status("web-1").await.unwrap();
    assert!(
        matches!(&st, VmStatus::Stopped { reason } if reason.contains("migrated")),
        "{st:?}"
    );
    assert!(
        wait_gone(src.pid).await,
        "source qemu {} still running",
        src.pid
    );
    wait_running(&host_b, "web-1").await;
    let resumed = host_b
        .resumed_at_us("web-1")
        .unwrap()
        .expect("RESUME event on destination");
    let stopped = stats.source_stopped_at_us.unwrap();
    assert!(resumed > stopped, "resume {resumed} before stop {stopped}");
    eprintln!(
        "host-seen downtime (source STOP -> destination RESUME): {:.1} ms",
        (resumed - stopped) as f64 / 1000.0
    );
    let src_text = read(&src.console_log);
    let last_src = ticks(&src_text).last().expect("source ticks").0;
    wait_console(
        &dst.console_log,
        "5 ticks on the destination",
        Duration::from_secs(60),
        |t| has_tick(t, last_src + 6),
    )
    .await;
    let dst_text = read(&dst.console_log);
    assert!(
        !dst_text.contains("GUEST: init"),
        "guest rebooted:\n{dst_text}"
    );
    // The UART may be migrated mid-line: the source's unfinished last line ends on the
    // destination. Joined, the two logs must count 0, 1, 2, ... without a gap or a repeat.
    let all = ticks(&format!("{src_text}{dst_text}"));
    let numbers: Vec<u64> = all.iter().map(|&(n, _)| n).collect();
    let expected: Vec<u64> = (0..numbers.len() as u64).collect();
    assert_eq!(
        numbers, expected,
        "tick sequence broken across the migration"
    );
    assert!(all.iter().all(|&(_, ok)| ok), "bad I/O check: {all:?}");
    let first_dst = ticks(&dst_text).first().unwrap().0;
    eprintln!("last source TICK {last_src} -> first destination TICK {first_dst}");
    assert!(first_dst <= last_src + 2);

    assert!(host_b.stop("web-1").await.unwrap().is_exited());
    assert!(wait_gone(dst.pid).await);
    stop_disk(nbd).await;
}

#[tokio::test]
async fn guest_poweroff_is_reported_stopped() {
    let img = image();
    let _cores = CORES.acquire().await.expect("never closed");
    let tmp = scratch();
    let disk = tmp.path().join("disk.img");
    prepare_vm_disk(&img.disk_template, &disk).await.unwrap();
    let run_dir = tmp.path().join("run");
    let mut guard = KillGuard::default();
    let drv = QemuDriver::new();
    let mut s = spec("off-1", &img, DiskTarget::File(disk), run_dir.clone());
    s.cmdline.push_str(" vinfra.ticks=2 vinfra.tick_ms=10");
    let rt = drv.start(&s).await.unwrap();
    guard.add(rt.pid, &run_dir);
    let deadline = Instant::now() + Duration::from_secs(120);
    let st = loop {
        let st = drv.status("off-1").await.unwrap();
        if st.is_exited() || Instant::now() > deadline {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let console = read(&rt.console_log);
    assert_eq!(
        st,
        VmStatus::Stopped {
            reason: "guest powered off".into()
        },
        "console:\n{console}"
    );
    assert!(
        console.contains("GUEST: POWEROFF reason=ticks-done"),
        "{console}"
    );
    assert_eq!(ticks(&console), vec![(0, true), (1, true)]);
    assert!(wait_gone(rt.pid).await);
}

/// The Debian image (`compute::ensure_image(GuestKind::Debian, …)`, built on first use in
/// ~2 minutes) boots systemd from its ext4 root on the virtio disk and runs fio inside the
/// guest when asked on the kernel command line, reporting on the serial console.
#[tokio::test]
async fn debian_guest_boots_systemd_and_runs_fio() {
    need_tools();
    let img = tokio::task::spawn_blocking(|| {
        compute::ensure_image(compute::GuestKind::Debian, &default_cache_dir(), |l| {
            eprintln!("{l}")
        })
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("debian guest image: {e} (run scripts/setup.sh as root)"));
    assert_eq!(img.pgbench_scale, Some(20));
    let _cores = CORES.acquire().await.expect("never closed");
    let tmp = scratch();
    let disk = tmp.path().join("disk.img");
    prepare_vm_disk(&img.disk_template, &disk).await.unwrap();
    let run_dir = tmp.path().join("run");
    let mut guard = KillGuard::default();
    let drv = QemuDriver::new();
    let mut s = spec("fio-1", &img, DiskTarget::File(disk), run_dir.clone());
    s.cmdline
        .push_str(" vinfra.workload=fio vinfra.fio_secs=3 vinfra.fio_mib=8");
    let rt = drv.start(&s).await.unwrap();
    guard.add(rt.pid, &run_dir);
    wait_console(&rt.console_log, "fio done", Duration::from_secs(240), |c| {
        c.contains("GUEST: WORKLOAD DONE fio")
    })
    .await;
    let console = read(&rt.console_log);
    assert!(
        console.contains("GUEST: READY vda=1536MiB"),
        "systemd started the workload unit:\n{console}"
    );
    let r = console
        .lines()
        .find_map(compute::workload::parse_fio)
        .unwrap_or_else(|| panic!("no FIO RESULT line:\n{console}"));
    assert_eq!(r.err, 0, "{console}");
    assert!(r.read_iops > 0.0 && r.write_iops > 0.0, "{console}");
    drv.stop("fio-1").await.unwrap();
    assert!(wait_gone(rt.pid).await);
}
