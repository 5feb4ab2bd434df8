//! A real libvirtd for the tests, started as `real-components-notes.md` §2 says: in its own
//! network namespace, with virtlogd, `/dev/kvm` as `root:kvm 0660` while it runs, under a
//! subreaper so that destroyed QEMUs are reaped at once. Stopped and undone on drop,
//! `/dev/kvm`'s owner and mode included (also when the test panics).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Netns;

const REAPER: &str = r#"
import ctypes, os, sys, signal
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
child = os.fork()
if child == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *a: os.kill(child, signal.SIGTERM))
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
    except InterruptedError:
        pass
"#;

pub const URI: &str = "qemu:///system";

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file()
}

fn virsh_ok(args: &[&str]) -> bool {
    Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `/dev/kvm` as `root:kvm 0660` while it lives, as libvirt expects; its drop puts back the
/// owner and mode it found, also when a test panics. A no-op when there is no `/dev/kvm` or
/// it is already so.
struct DevKvmAccess {
    path: PathBuf,
    /// (mode, uid, gid) to restore.
    restore: Option<(u32, u32, u32)>,
}

impl DevKvmAccess {
    fn grant(path: &Path, kvm_gid: u32) -> DevKvmAccess {
        let mut guard = DevKvmAccess {
            path: path.to_owned(),
            restore: None,
        };
        let Ok(m) = std::fs::metadata(path) else {
            return guard;
        };
        let found = (m.mode() & 0o7777, m.uid(), m.gid());
        if found == (0o660, 0, kvm_gid) {
            return guard;
        }
        // Armed before the first change, so that a half-done change is undone too.
        guard.restore = Some(found);
        std::os::unix::fs::chown(path, Some(0), Some(kvm_gid)).expect("chown root:kvm");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).expect("chmod 0660");
        guard
    }
}

impl Drop for DevKvmAccess {
    fn drop(&mut self) {
        let Some((mode, uid, gid)) = self.restore else {
            return;
        };
        let path = self.path.display();
        // No panic in a drop that may run during unwinding: say what is left instead.
        if let Err(e) = std::os::unix::fs::chown(&self.path, Some(uid), Some(gid)) {
            eprintln!("cannot restore the owner {uid}:{gid} of {path}: {e}");
        }
        if let Err(e) = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(mode))
        {
            eprintln!("cannot restore the mode {mode:o} of {path}: {e}");
        }
    }
}

/// The gid of the `kvm` group, from /etc/group.
fn kvm_gid() -> Option<u32> {
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("kvm:")?.split(':').nth(1)?.parse().ok())
}

pub struct Libvirtd {
    pub netns: Netns,
    daemons: Vec<Child>,
    pub work: PathBuf,
    /// Last, so that `/dev/kvm` is restored after `drop` has stopped every QEMU.
    _kvm: DevKvmAccess,
}

impl Libvirtd {
    pub fn start() -> Libvirtd {
        for tool in ["virsh", "libvirtd", "virtlogd", "python3"] {
            assert!(
                which(tool),
                "{tool} not found: run scripts/setup.sh (Debian packages libvirt-daemon-system libvirt-clients libvirt-daemon-system-sysv)"
            );
        }
        assert!(!virsh_ok(&["version"]), "a libvirtd is already running on /run/libvirt: stop it first (these tests start their own)");
        let netns = Netns::new("lv");
        // L2: with /dev/kvm 0600 libvirt re-probes QEMU on every call (60 s per create).
        let kvm_gid =
            kvm_gid().expect("no kvm group: run scripts/setup.sh (QEMU's packages add it)");
        let kvm = DevKvmAccess::grant(Path::new("/dev/kvm"), kvm_gid);
        let mut fx = Libvirtd {
            netns,
            daemons: Vec::new(),
            work: PathBuf::new(),
            _kvm: kvm,
        };
        let spawn = |args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", &fx.netns.name])
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn daemon")
        };
        // L3: virtlogd must run, or domain creation fails on its socket.
        let v = spawn(&["virtlogd"]);
        let d = spawn(&["python3", "-c", REAPER, "libvirtd"]);
        fx.daemons.push(d);
        fx.daemons.push(v);
        let t = Instant::now();
        while !virsh_ok(&["version"]) {
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "libvirtd not ready after 90 s; see /var/log/libvirt/libvirtd.log"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("libvirtd ready in {:?}", t.elapsed());
        // L4: 0755 all the way up, for libvirt's DAC checks.
        let work = PathBuf::from(format!("/var/tmp/nfv-libvirt-{}", std::process::id()));
        std::fs::create_dir_all(&work).unwrap();
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o755)).unwrap();
        fx.work = work;
        fx
    }

    pub fn config(&self) -> nfv::driver::libvirt::LibvirtConfig {
        let img = compute::ensure_default_image(&compute::default_cache_dir(), |_| {})
            .expect("guest image (scripts/setup.sh)");
        let image = nfv::driver::libvirt::LibvirtImage {
            kernel: img.kernel,
            initrd: img.initrd,
            disk_template: img.disk_template,
            cmdline: img.cmdline,
        };
        nfv::driver::libvirt::LibvirtConfig {
            uri: URI.into(),
            work_dir: self.work.clone(),
            images: [("default".to_owned(), image)].into(),
            domain_type: "qemu".into(),
        }
    }

    /// Bridge of a libvirt network (it lives in the daemon's namespace).
    pub fn bridge_of(&self, net: &str) -> String {
        let out = Command::new("virsh")
            .args(["-c", URI, "net-info", net])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Bridge:").map(|b| b.trim().to_owned()))
            .unwrap_or_else(|| panic!("no bridge for {net}"))
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        // Anything a failed test left: destroy it so that nothing outlives the test.
        if let Ok(out) = Command::new("virsh")
            .args(["-c", URI, "list", "--name"])
            .output()
        {
            for d in String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty())
            {
                let _ = Command::new("virsh")
                    .args(["-c", URI, "destroy", d.trim()])
                    .output();
            }
        }
        if let Ok(out) = Command::new("virsh")
            .args(["-c", URI, "net-list", "--name"])
            .output()
        {
            for n in String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty())
            {
                let _ = Command::new("virsh")
                    .args(["-c", URI, "net-destroy", n.trim()])
                    .output();
            }
        }
        for d in &mut self.daemons {
            // `ip netns exec` execs, so the pid is the reaper's / virtlogd's own.
            let _ = Command::new("kill").arg(d.id().to_string()).status();
            let t = Instant::now();
            while d.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        if !self.work.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

/// The guard on a stand-in for `/dev/kvm`: granted while it lives, the original owner and
/// mode back after a panic.
#[test]
fn dev_kvm_access_is_restored_after_a_panic() {
    // Any group will do for the stand-in; this one is unlikely to be the file's already.
    let kvm = 4242;
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("kvm");
    std::fs::write(&dev, b"").unwrap();
    std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = std::fs::metadata(&dev).unwrap();
    let owner = |m: &std::fs::Metadata| (m.mode() & 0o7777, m.uid(), m.gid());
    let panicked = std::panic::catch_unwind(|| {
        let _guard = DevKvmAccess::grant(&dev, kvm);
        let m = std::fs::metadata(&dev).unwrap();
        assert_eq!(owner(&m), (0o660, 0, kvm));
        panic!("the test fails while libvirtd runs");
    });
    assert!(panicked.is_err());
    assert_eq!(owner(&std::fs::metadata(&dev).unwrap()), owner(&before));
}
