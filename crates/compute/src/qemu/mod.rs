//! The `qemu` compute driver: one `qemu-system-x86_64` process per VM, driven over QMP.
//!
//! Per VM, in its run dir: `console.log` (serial), `qmp.sock`, `qemu.pid` (written by QEMU),
//! `qemu.log` (QEMU's own stdout/stderr) and `vm.json` (what [`QemuDriver::adopt`](crate::ComputeDriver::adopt) needs).
//! QEMU runs in its own process group so that a Ctrl-C aimed at the agent does not kill
//! the VMs: VMs outlive the agent, and a restarted agent adopts them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::qmp::QmpClient;
use crate::{Accel, ComputeError, VmRuntime, VmSpec, VmStatus};

mod args;
mod child;
mod driver;
pub mod ps2;
pub mod pvh;
pub mod qtest;
mod run_dir;
mod terminal;

pub use args::qemu_args;
pub(crate) use args::validate;
use args::{build_args, check_socket_path, invalid};
use child::{connect_child, listen_incoming, watch_child};
use run_dir::{log_tail, owns_run_dir, read_pid, remove_if_exists, write_record};

/// Longest unix socket path (sun_path is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;
const START_TIMEOUT: Duration = Duration::from_secs(15);
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
const RECORD_FORMAT: u32 = 1;

/// Seconds QEMU keeps retrying a lost NBD connection before failing guest I/O: the
/// disk server (the host's block cache) restarts with its agent, and a guest must ride
/// through that rather than see I/O errors.
pub const NBD_RECONNECT_DELAY_S: u32 = 30;

/// File names inside a VM's run dir.
pub mod files {
    /// Serial console log.
    pub const CONSOLE: &str = "console.log";
    /// QMP socket.
    pub const QMP: &str = "qmp.sock";
    /// Pidfile written by QEMU.
    pub const PID: &str = "qemu.pid";
    /// QEMU's stdout and stderr.
    pub const LOG: &str = "qemu.log";
    /// Our record for adoption.
    pub const RECORD: &str = "vm.json";
    /// The guest's control port (virtio-serial `vinfra.link`, a unix socket QEMU serves)
    /// for VMs with NICs: the agent drives link establishment between VNF connection points
    /// through it.
    pub const LINK: &str = "link.sock";
    /// QEMU's qtest socket, only with [`QemuDriver::with_qtest_firmware`](super::QemuDriver::with_qtest_firmware).
    pub const QTEST: &str = "qtest.sock";
}

/// What a restarted agent needs to re-attach (`vm.json`).
#[derive(Debug, Serialize, Deserialize)]
struct VmRecord {
    format: u32,
    id: String,
    pid: u32,
    accel: Accel,
}

/// The QEMU driver. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct QemuDriver {
    binary: PathBuf,
    /// Test mode: boot this firmware instead of the spec's kernel, with a qtest socket.
    firmware: Option<PathBuf>,
    /// Where unpacked PVH kernels are kept (`None`: beside each kernel file).
    kernel_cache: Option<PathBuf>,
    quit_timeout: Duration,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
    /// Ids with a start or adoption in progress.
    starting: Mutex<std::collections::HashSet<String>>,
}

#[derive(Debug)]
struct Reservation<'a> {
    drv: &'a QemuDriver,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.drv
            .starting
            .lock()
            .expect("starting lock poisoned")
            .remove(&self.id);
    }
}

/// What the VM's watcher and the driver both see.
#[derive(Debug, Default)]
struct Shared {
    /// Why we are stopping it, set before an intended quit so the exit reads as orderly.
    stop_note: Mutex<Option<String>>,
    /// QEMU's timestamp of the last `RESUME` event (µs since the epoch).
    resumed_at_us: Mutex<Option<i64>>,
}

#[derive(Debug)]
struct Vm {
    id: String,
    run_dir: PathBuf,
    pid: u32,
    accel: Accel,
    incoming: Option<SocketAddr>,
    /// Adopted VMs are not our children: no exit status, and their pid must be re-checked
    /// before a kill (it could have been reused).
    adopted: bool,
    qmp: QmpClient,
    /// `Some` once the process is gone.
    exit: watch::Receiver<Option<VmStatus>>,
    /// Shared with the watcher.
    shared: Arc<Shared>,
    watcher: tokio::task::JoinHandle<()>,
    /// Terminal operations on this VM take turns here (tokio's mutex is fair: first come,
    /// first served), so that one operation's QMP commands are never interleaved with
    /// another's. Held across the operation's awaits; it guards what is known of the
    /// VM's keyboard queue from one operation to the next.
    ops: tokio::sync::Mutex<terminal::KeyboardQueue>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        // The VM outlives us; only the watching stops (and with it our QMP connection, so
        // that the next agent can connect).
        self.watcher.abort();
    }
}

impl Vm {
    fn runtime(&self) -> VmRuntime {
        VmRuntime {
            id: self.id.clone(),
            pid: self.pid,
            accel: self.accel,
            console_log: self.run_dir.join(files::CONSOLE),
            qmp_socket: self.run_dir.join(files::QMP),
            run_dir: self.run_dir.clone(),
            incoming: self.incoming,
        }
    }

    fn exited(&self) -> Option<VmStatus> {
        self.exit.borrow().clone()
    }

    async fn wait_exit(&self, timeout: Duration) -> Option<VmStatus> {
        let mut rx = self.exit.clone();
        let r = tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await;
        match r {
            Ok(Ok(v)) => v.clone(),
            _ => self.exited(),
        }
    }

    fn note(&self, why: &str) {
        let mut n = self
            .shared
            .stop_note
            .lock()
            .expect("stop note lock poisoned");
        if n.is_none() {
            *n = Some(why.to_owned());
        }
    }
}

impl Default for QemuDriver {
    fn default() -> Self {
        Self::new()
    }
}

impl QemuDriver {
    /// A driver running `qemu-system-x86_64` from `PATH`.
    pub fn new() -> Self {
        Self::with_binary("qemu-system-x86_64")
    }

    /// A driver running the given QEMU binary.
    pub fn with_binary(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            firmware: None,
            kernel_cache: None,
            quit_timeout: Duration::from_secs(5),
            vms: Mutex::new(HashMap::new()),
            starting: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Keeps the kernels unpacked for PVH boot in `dir` (shared by every agent of the
    /// machine; named by each kernel's content) instead of beside each kernel file.
    pub fn with_kernel_cache(mut self, dir: impl Into<PathBuf>) -> Self {
        self.kernel_cache = Some(dir.into());
        self
    }

    /// Test mode, never for production: VMs boot `firmware` (`-bios`, e.g. 64 KiB of `hlt`)
    /// instead of the spec's kernel and initrd (which must still exist), and serve QEMU's
    /// qtest protocol on [`files::QTEST`] in their run dir, so that a test reads what
    /// reaches the VM's devices (the keyboard controller's scancodes) without a guest.
    /// Everything else, devices included, is as in production. qtest gives full access to
    /// guest memory and I/O ports.
    pub fn with_qtest_firmware(mut self, firmware: impl Into<PathBuf>) -> Self {
        self.firmware = Some(firmware.into());
        self
    }

    /// The QMP connection of a live VM, to send other commands or watch events. Do not
    /// open a second connection to its socket: QEMU serves one client at a time.
    pub fn qmp(&self, id: &str) -> Result<QmpClient, ComputeError> {
        Ok(self.get(id)?.qmp.clone())
    }

    /// Runtime facts about a known VM.
    pub fn runtime(&self, id: &str) -> Result<VmRuntime, ComputeError> {
        Ok(self.get(id)?.runtime())
    }

    /// QEMU's timestamp (µs since the epoch) of the VM's last `RESUME` event, if any. On a
    /// migration destination this is the end of the switch-over: minus the source's
    /// [`MigrationStats::source_stopped_at_us`](crate::MigrationStats::source_stopped_at_us) it gives the downtime as the host saw it.
    pub fn resumed_at_us(&self, id: &str) -> Result<Option<i64>, ComputeError> {
        let vm = self.get(id)?;
        let t = *vm
            .shared
            .resumed_at_us
            .lock()
            .expect("resume lock poisoned");
        Ok(t)
    }

    fn get(&self, id: &str) -> Result<Arc<Vm>, ComputeError> {
        self.vms
            .lock()
            .expect("vm table lock poisoned")
            .get(id)
            .cloned()
            .ok_or_else(|| ComputeError::NotFound { id: id.to_owned() })
    }

    /// Claims `id` for a start or adoption in progress, so that two concurrent starts of
    /// one VM cannot both spawn a QEMU. Released when the returned guard drops.
    fn reserve(&self, id: &str) -> Result<Reservation<'_>, ComputeError> {
        let vms = self.vms.lock().expect("vm table lock poisoned");
        let mut busy = self.starting.lock().expect("starting lock poisoned");
        let running = vms.get(id).is_some_and(|vm| vm.exited().is_none());
        if running || !busy.insert(id.to_owned()) {
            return Err(ComputeError::AlreadyRunning { id: id.into() });
        }
        Ok(Reservation {
            drv: self,
            id: id.to_owned(),
        })
    }

    #[tracing::instrument(skip_all, fields(vm = %spec.id, incoming = ?incoming.as_ref().map(|i| i.0)))]
    async fn launch(
        &self,
        spec: &VmSpec,
        incoming: Option<(SocketAddr, Option<crate::MigrationTls>)>,
    ) -> Result<VmRuntime, ComputeError> {
        validate(spec)?;
        let _claim = self.reserve(&spec.id)?;
        let accel = spec.accel.resolve();
        if spec.accel == Accel::Kvm && !crate::kvm_usable() {
            return Err(invalid(
                spec,
                "accel Kvm asked for but /dev/kvm is not usable",
            ));
        }
        let run_dir = std::path::absolute(&spec.run_dir).map_err(|err| ComputeError::Io {
            action: "resolve run dir",
            path: spec.run_dir.clone(),
            err,
        })?;
        let qmp_path = run_dir.join(files::QMP);
        check_socket_path(&qmp_path)?;
        std::fs::create_dir_all(&run_dir).map_err(|err| ComputeError::Io {
            action: "create run dir",
            path: run_dir.clone(),
            err,
        })?;
        // A QEMU from before an agent restart may still own this run dir.
        if let Ok(pid) = read_pid(&run_dir) {
            if owns_run_dir(pid, &qmp_path) {
                return Err(ComputeError::AlreadyRunning {
                    id: spec.id.clone(),
                });
            }
        }
        for f in [files::QMP, files::PID, files::RECORD] {
            remove_if_exists(&run_dir.join(f))?;
        }
        // The kernel's own ELF when it has a PVH entry: under TCG a bzImage spends half
        // its boot decompressing itself (pvh.rs). Not in qtest mode, which boots no kernel.
        let unpacked;
        let spec = if self.firmware.is_none() {
            let kernel = spec.kernel.clone();
            let cache = self.kernel_cache.clone();
            let boot =
                tokio::task::spawn_blocking(move || pvh::boot_kernel(&kernel, cache.as_deref()))
                    .await
                    .unwrap_or_else(|_| spec.kernel.clone());
            unpacked = VmSpec {
                kernel: boot,
                ..spec.clone()
            };
            &unpacked
        } else {
            spec
        };
        let args = build_args(
            spec,
            accel,
            &run_dir,
            incoming.is_some(),
            self.firmware.as_deref(),
        )?;
        let log_path = run_dir.join(files::LOG);
        let log = std::fs::File::create(&log_path).map_err(|err| ComputeError::Io {
            action: "create",
            path: log_path.clone(),
            err,
        })?;
        let log2 = log.try_clone().map_err(|err| ComputeError::Io {
            action: "dup",
            path: log_path.clone(),
            err,
        })?;
        let t0 = Instant::now();
        let mut child = tokio::process::Command::new(&self.binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|err| ComputeError::Spawn {
                binary: self.binary.clone(),
                err,
            })?;
        let pid = child.id().ok_or_else(|| ComputeError::StartFailed {
            id: spec.id.clone(),
            status: "exited immediately".into(),
            log_tail: log_tail(&log_path),
        })?;
        tracing::debug!(pid, ?accel, "qemu spawned");

        let attached = async {
            let qmp = connect_child(&spec.id, &mut child, &qmp_path, &log_path).await?;
            let events = qmp.subscribe();
            let incoming = match incoming {
                Some((listen, tls)) => {
                    Some(listen_incoming(&spec.id, &qmp, listen, tls.as_ref()).await?)
                }
                None => None,
            };
            write_record(
                &run_dir,
                &VmRecord {
                    format: RECORD_FORMAT,
                    id: spec.id.clone(),
                    pid,
                    accel,
                },
            )?;
            Ok::<_, ComputeError>((qmp, events, incoming))
        }
        .await;
        let (qmp, events, incoming) = match attached {
            Ok(v) => v,
            Err(e) => {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                return Err(e);
            }
        };

        let (exit_tx, exit) = watch::channel(None);
        let shared = Arc::new(Shared::default());
        let watcher = tokio::spawn(watch_child(
            child,
            events,
            shared.clone(),
            exit_tx,
            log_path,
        ));
        let vm = Arc::new(Vm {
            id: spec.id.clone(),
            run_dir,
            pid,
            accel,
            incoming,
            adopted: false,
            qmp,
            exit,
            shared,
            watcher,
            ops: tokio::sync::Mutex::default(),
        });
        let rt = vm.runtime();
        self.vms
            .lock()
            .expect("vm table lock poisoned")
            .insert(spec.id.clone(), vm);
        tracing::info!(
            pid,
            ?accel,
            elapsed_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
            "vm started"
        );
        Ok(rt)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::path::Path;
    use std::process::ExitStatus;

    use super::child::{classify, Observed};
    use super::*;
    use crate::{ComputeDriver, DiskTarget};

    fn spec(dir: &Path) -> VmSpec {
        let k = dir.join("vmlinuz");
        std::fs::write(&k, b"k").unwrap();
        VmSpec {
            id: "web-1".into(),
            name: "web, one".into(),
            vcpus: 1,
            memory_mib: 256,
            kernel: k.clone(),
            initrd: k,
            cmdline: "console=ttyS0 quiet".into(),
            disk: DiskTarget::NbdTcp {
                host: "127.0.0.1".into(),
                port: 10809,
                export: "disk0".into(),
            },
            nics: vec![],
            run_dir: dir.join("run"),
            accel: Accel::Tcg,
            tables: vec![],
        }
    }

    #[test]
    fn args_have_the_migration_relevant_shape() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let a = qemu_args(&s, Accel::Tcg, Path::new("/r,x"), true).unwrap();
        let j = a.join(" ");
        assert!(j.contains("-name guest=web,, one"), "{j}");
        assert!(j.contains("-accel tcg -machine q35 -m 256 -smp 1 -nodefaults"));
        assert!(j.contains("-blockdev driver=nbd,node-name=disk0,server.type=inet,server.host=127.0.0.1,server.port=10809,export=disk0,reconnect-delay=30"));
        assert!(j.contains("-device virtio-blk-pci,drive=disk0,id=vblk0"));
        assert!(
            j.contains("-device VGA,id=video0 -device virtio-tablet-pci,id=tablet0,display=video0")
        );
        assert!(j.contains("-kernel") && !j.contains("-qtest") && !j.contains("-bios"));
        assert!(j.contains("socket,id=qmp0,path=/r,,x/qmp.sock,server=on,wait=off"));
        assert!(j.contains("file,id=serial0,path=/r,,x/console.log"));
        assert!(j.ends_with("-incoming defer"));
        // The append string is one argument, spaces and all.
        assert!(a.iter().any(|x| x == "console=ttyS0 quiet"));
        let k = qemu_args(&s, Accel::Kvm, Path::new("/r"), false).unwrap();
        assert!(k.join(" ").contains("-accel kvm -cpu host"));
        assert!(!j.contains("-netdev"));
        let mut n = spec(dir.path());
        n.nics = vec![crate::NicAttach {
            tap: "vtp1234abcd0".into(),
            mac: "02:aa:bb:46:00:01".into(),
        }];
        let j = qemu_args(&n, Accel::Tcg, Path::new("/r"), false)
            .unwrap()
            .join(" ");
        assert!(j.contains("-netdev tap,id=net0,ifname=vtp1234abcd0,script=no,downscript=no -device virtio-net-pci,netdev=net0,mac=02:aa:bb:46:00:01,id=vnic0"), "{j}");
        assert!(j.contains("socket,id=link0,path=/r/link.sock,server=on,wait=off -device virtserialport,bus=vser0.0,chardev=link0,name=vinfra.link"), "{j}");
        assert!(!k.iter().any(|x| x == "-incoming"));
        // The test mode: firmware instead of the kernel, a qtest socket, devices as ever.
        let t = build_args(
            &s,
            Accel::Tcg,
            Path::new("/r"),
            false,
            Some(Path::new("/f/hlt.bin")),
        )
        .unwrap()
        .join(" ");
        assert!(t.contains("-bios /f/hlt.bin -qtest unix:/r/qtest.sock,server=on,wait=off -qtest-log /dev/null"), "{t}");
        assert!(
            !t.contains("-kernel") && t.contains("-machine q35") && t.contains("VGA,id=video0")
        );
    }

    #[test]
    fn validation_rejects_bad_specs() {
        let dir = tempfile::tempdir().unwrap();
        let good = spec(dir.path());
        assert!(validate(&good).is_ok());
        let mut s = good.clone();
        s.id = "a/b".into();
        assert!(matches!(
            validate(&s),
            Err(ComputeError::InvalidSpec { .. })
        ));
        let mut s = good.clone();
        s.vcpus = 0;
        assert!(validate(&s).is_err());
        let mut s = good.clone();
        s.kernel = dir.path().join("missing");
        assert!(validate(&s).is_err());
        let mut s = good.clone();
        s.disk = DiskTarget::NbdUnix {
            path: PathBuf::from(format!("/{}", "x".repeat(120))),
            export: "d".into(),
        };
        assert!(matches!(
            validate(&s),
            Err(ComputeError::SocketPathTooLong { len: 121, .. })
        ));
        for (tap, mac, why) in [
            ("tap-name-too-long", "02:00:00:00:00:01", "nics[0].tap"),
            ("tap,x", "02:00:00:00:00:01", "nics[0].tap"),
            ("tap0", "02:00:00:00:00", "nics[0].mac"),
            ("tap0", "02:00:00:00:00:0g", "nics[0].mac"),
        ] {
            let mut s = good.clone();
            s.nics = vec![crate::NicAttach {
                tap: tap.into(),
                mac: mac.into(),
            }];
            let e = validate(&s).unwrap_err().to_string();
            assert!(e.contains(why), "{tap} {mac}: {e}");
        }
    }

    #[tokio::test]
    async fn deep_run_dir_fails_clearly_before_spawning() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        s.run_dir = dir.path().join("d".repeat(100));
        let drv = QemuDriver::with_binary("/nonexistent/qemu");
        let e = drv.start(&s).await.unwrap_err();
        assert!(matches!(e, ComputeError::SocketPathTooLong { .. }), "{e}");
        assert!(e.to_string().contains("shorter run dir"));
    }

    #[tokio::test]
    async fn missing_binary_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let drv = QemuDriver::with_binary("/nonexistent/qemu");
        let e = drv.start(&spec(dir.path())).await.unwrap_err();
        assert!(matches!(e, ComputeError::Spawn { .. }), "{e}");
        assert!(e.to_string().contains("scripts/setup.sh"));
        assert!(matches!(
            drv.status("web-1").await,
            Err(ComputeError::NotFound { .. })
        ));
    }

    #[test]
    fn exit_classification() {
        let ok = ExitStatus::from_raw(0);
        let killed = ExitStatus::from_raw(9); // terminated by SIGKILL
        let code1 = ExitStatus::from_raw(1 << 8);
        let quit = Observed {
            shutdown_reason: Some("host-qmp-quit".into()),
            panicked: false,
        };
        let poweroff = Observed {
            shutdown_reason: Some("guest-shutdown".into()),
            panicked: false,
        };
        let none = Observed::default();
        assert_eq!(
            classify(Some(ok), &poweroff, None, ""),
            VmStatus::Stopped {
                reason: "guest powered off".into()
            }
        );
        assert_eq!(
            classify(Some(ok), &quit, Some("stopped by request".into()), ""),
            VmStatus::Stopped {
                reason: "stopped by request".into()
            }
        );
        assert!(matches!(
            classify(Some(killed), &none, None, "oops"),
            VmStatus::Crashed { reason } if reason.contains("signal 9") && reason.contains("oops")
        ));
        assert!(matches!(
            classify(Some(killed), &none, Some("stopped by request".into()), ""),
            VmStatus::Stopped { .. }
        ));
        assert!(matches!(
            classify(Some(code1), &none, None, ""),
            VmStatus::Crashed { reason } if reason.contains("exit code 1")
        ));
        assert!(matches!(
            classify(None, &none, None, ""),
            VmStatus::Crashed { .. }
        ));
        assert!(matches!(
            classify(None, &quit, None, ""),
            VmStatus::Stopped { .. }
        ));
        let panicked = Observed {
            shutdown_reason: None,
            panicked: true,
        };
        assert!(matches!(
            classify(Some(ok), &panicked, None, ""),
            VmStatus::Crashed { .. }
        ));
    }
}
