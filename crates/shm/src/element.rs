//! The element: owns the table and the BRT, attaches devices, grants and
//! revokes write access to single entries, and notices devices that die.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::entry::{Layout, Slots};
use crate::proto::{self, Attach, Ctrl, Notify, Welcome};
use crate::sys::{self, Epoll, Mapping, Uffd};
use crate::{DeviceId, Error};

mod guest;
pub use guest::{GuestWindow, ELEMENT_PEER, GUEST_PEER, WINDOW_PAYLOAD};

/// How to create a table and its element.
#[derive(Debug, Clone)]
pub struct ElementConfig {
    /// Where devices connect (a Unix socket path; replaced if it exists).
    pub socket: PathBuf,
    /// Number of entries.
    pub entries: u32,
    /// Payload bytes per entry (multiple of 8).
    pub entry_size: u32,
    /// How requests and answers are signalled.
    pub notify: Notify,
    /// Longest a grant lasts; a request asking longer (or for no limit) gets
    /// this. `None`: grants last until released, revoked or the device dies.
    pub max_grant: Option<Duration>,
    /// Audit events kept (oldest dropped first; totals are kept forever).
    pub audit_capacity: usize,
}

impl ElementConfig {
    /// A table of `entries` × `entry_size` bytes served on `socket`, eventfd
    /// notification, grants of at most 10 s, 4,096 audit events kept.
    pub fn new(socket: impl Into<PathBuf>, entries: u32, entry_size: u32) -> ElementConfig {
        ElementConfig {
            socket: socket.into(),
            entries,
            entry_size,
            notify: Notify::EventFd,
            max_grant: Some(Duration::from_secs(10)),
            audit_capacity: 4096,
        }
    }
}

/// Why a grant ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeReason {
    /// The device released it (its guard was dropped).
    Released,
    /// Its timeout passed.
    Timeout,
    /// The element (its operator) took it back.
    Element,
    /// The device's process exited or its socket closed.
    DeviceGone,
}

impl RevokeReason {
    /// Stable lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            RevokeReason::Released => "released",
            RevokeReason::Timeout => "timeout",
            RevokeReason::Element => "element",
            RevokeReason::DeviceGone => "device_gone",
        }
    }
}

/// What happened, in the audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditKind {
    /// A device attached (its mapping is write-protected from here on).
    Attached,
    /// A device went away (`reason`: what the element noticed).
    Detached {
        /// "socket closed", "process exited" or "protocol".
        reason: &'static str,
    },
    /// Write access to one entry granted to one device.
    Granted,
    /// Write access taken back.
    Revoked {
        /// Why.
        reason: RevokeReason,
    },
    /// A request refused because another device holds the entry.
    Refused {
        /// The device holding it.
        holder: DeviceId,
    },
    /// A store by the device into the entry raised SIGBUS (no grant), as the
    /// device's library reported it ([`crate::Device::try_store`]): the kernel
    /// tells only the storing process.
    RefusedStore,
    /// The entry was left half-written (its writer died or lost the grant
    /// mid-write) and was put back to its content at grant time, as a new
    /// version.
    RolledBack,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Position in the element's audit (1, 2, …; never reused).
    pub seq: u64,
    /// Wall-clock time.
    pub at: SystemTime,
    /// The device concerned.
    pub device: DeviceId,
    /// The entry concerned, if any.
    pub entry: Option<u32>,
    /// The entry's version after the event (0 when no entry).
    pub version: u64,
    /// What happened.
    pub kind: AuditKind,
}

/// A current grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantInfo {
    /// The entry.
    pub entry: u32,
    /// The one device that may write it.
    pub device: DeviceId,
    /// Entry version when granted.
    pub version: u64,
    /// When it was granted.
    pub granted_at: SystemTime,
    /// Time left before it is revoked, if it has a timeout.
    pub expires_in: Option<Duration>,
}

/// An attached device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its id (unique for the element's lifetime).
    pub id: DeviceId,
    /// Its process id (as seen by the element).
    pub pid: i32,
    /// Entries it holds now.
    pub grants: usize,
    /// For a VM ([`Element::attach_guest`]): its name.
    pub guest: Option<String>,
}

/// Totals since the element started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Grants made.
    pub grants: u64,
    /// Grants ended (any reason).
    pub revokes: u64,
    /// Requests refused.
    pub refused: u64,
    /// Stores refused by the kernel, as the devices reported them.
    pub refused_stores: u64,
    /// Entries rolled back.
    pub rolled_back: u64,
}

struct Grant {
    device: DeviceId,
    serial: u64,
    version: u64,
    granted_at: SystemTime,
    deadline: Option<Instant>,
    snapshot: Vec<u64>,
}

struct Dev {
    pid: i32,
    sock: UnixStream,
    /// `None` for a guest: its table mapping is QEMU's and read-only for good,
    /// so a grant flips no page; it lets the element copy the guest's window
    /// into the entry.
    uffd: Option<Uffd>,
    base: usize,
    /// The VM's name, for a guest.
    guest: Option<String>,
    pidfd: OwnedFd,
    ctrl: Ctrl,
    efd_req: OwnedFd,
    efd_resp: OwnedFd,
    last_req: u64,
    last_rel: u64,
    held: BTreeSet<u32>,
}

struct State {
    slots: Slots,
    notify: Notify,
    max_grant: Option<Duration>,
    /// The BRT: for each entry, the one device whose attribute is read/write
    /// (with the grant's bookkeeping); every other (device, entry) pair is
    /// read-only. Storing the single writer per entry, rather than a device ×
    /// entry matrix, is what makes "exactly one device" hold by construction.
    brt: Vec<Option<Grant>>,
    deadlines: BinaryHeap<Reverse<(Instant, u32, u64)>>,
    devices: BTreeMap<DeviceId, Dev>,
    next_device: DeviceId,
    next_serial: u64,
    audit: VecDeque<AuditEvent>,
    audit_capacity: usize,
    audit_seq: u64,
    totals: Totals,
    spare: Vec<Vec<u64>>,
    /// Guests whose QEMU has not connected to their window socket yet.
    pending: BTreeMap<DeviceId, guest::Pending>,
    /// The copy of a guest's window on its way into an entry.
    copy: Vec<u64>,
    /// When every device's posted release was last looked at.
    swept: Instant,
}

struct Shared {
    state: Mutex<State>,
    epoll: Epoll,
    stop: OwnedFd,
    /// Wakes the serving thread for the next grant timeout or sweep.
    timer: OwnedFd,
    stopping: AtomicU64,
    listener: UnixListener,
    memfd: OwnedFd,
    layout: Layout,
    generation: u64,
    socket: PathBuf,
}

/// How long a release a device posted without waking the element (it protected the
/// entry itself: `Device::post_release`) may wait for the element's bookkeeping at
/// most, while nothing else makes the element look.
const SWEEP: Duration = Duration::from_millis(10);

const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_STOP: u64 = u64::MAX - 1;
const TOKEN_TIMER: u64 = u64::MAX - 2;
const KIND_SOCK: u64 = 0;
const KIND_REQ: u64 = 1;
const KIND_PIDFD: u64 = 2;
/// A guest's window socket, until its QEMU connects.
const KIND_GUEST: u64 = 3;

fn token(dev: DeviceId, kind: u64) -> u64 {
    (u64::from(dev) << 2) | kind
}

/// A resource table and the element serving it: a thread accepts devices on
/// the socket, answers their requests and revokes grants that time out or
/// whose device died. Dropping it stops the thread; attached devices then see
/// the element gone, and their mappings stay write-protected.
pub struct Element {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Element {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Element")
            .field("socket", &self.shared.socket)
            .field("layout", &self.shared.layout)
            .finish()
    }
}

impl Element {
    /// Creates the table (zeroed) and starts serving it.
    pub fn start(cfg: ElementConfig) -> Result<Element, Error> {
        let layout = Layout::new(cfg.entries, cfg.entry_size)?;
        // The file is a power of two long (devices map only `table_bytes`): QEMU
        // maps it whole behind an ivshmem BAR, and a BAR's size is a power of two.
        let memfd = sys::sealed_memfd(
            c"vinfra-shm-table",
            layout.table_bytes().next_power_of_two(),
        )
        .map_err(Error::io("table memfd"))?;
        let map = Mapping::shared_populated(memfd.as_fd(), layout.table_bytes())
            .map_err(Error::io("mapping the table"))?;
        match std::fs::remove_file(&cfg.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Io {
                    what: "removing an old socket",
                    source: e,
                })
            }
        }
        let listener =
            UnixListener::bind(&cfg.socket).map_err(Error::io("binding the device socket"))?;
        listener
            .set_nonblocking(true)
            .map_err(Error::io("device socket"))?;
        let epoll = Epoll::new().map_err(Error::io("epoll"))?;
        let stop = sys::eventfd().map_err(Error::io("eventfd"))?;
        epoll
            .add(listener.as_raw_fd(), TOKEN_LISTENER)
            .map_err(Error::io("epoll"))?;
        epoll
            .add(stop.as_raw_fd(), TOKEN_STOP)
            .map_err(Error::io("epoll"))?;
        let timer = sys::timerfd().map_err(Error::io("timerfd"))?;
        epoll
            .add(timer.as_raw_fd(), TOKEN_TIMER)
            .map_err(Error::io("epoll"))?;
        let generation = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let state = State {
            slots: Slots::new(map, layout),
            notify: cfg.notify,
            max_grant: cfg.max_grant,
            brt: (0..layout.entries()).map(|_| None).collect(),
            deadlines: BinaryHeap::new(),
            devices: BTreeMap::new(),
            next_device: 1,
            next_serial: 1,
            audit: VecDeque::new(),
            audit_capacity: cfg.audit_capacity.max(1),
            audit_seq: 0,
            totals: Totals::default(),
            spare: Vec::new(),
            pending: BTreeMap::new(),
            copy: Vec::new(),
            swept: Instant::now(),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            epoll,
            stop,
            timer,
            stopping: AtomicU64::new(0),
            listener,
            memfd,
            layout,
            generation,
            socket: cfg.socket,
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("shm-element".into())
            .spawn(move || serve(&s))
            .map_err(Error::io("element thread"))?;
        Ok(Element {
            shared,
            thread: Some(thread),
        })
    }

    /// The table's shape.
    pub fn layout(&self) -> Layout {
        self.shared.layout
    }

    /// The table's memfd, for a consumer that maps it by path
    /// (`/proc/PID/fd/N`), e.g. QEMU's `memory-backend-file` behind a read-only
    /// `ivshmem-plain` device for a guest.
    pub fn table_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.shared.memfd.as_fd()
    }

    /// Bytes of the table's memfd: [`Layout::table_bytes`] rounded up to a
    /// power of two (the `size` of a `memory-backend-file` mapping it whole).
    pub fn table_file_bytes(&self) -> usize {
        self.shared.layout.table_bytes().next_power_of_two()
    }

    /// Makes a VM a device of this table: a writable window (its own memfd)
    /// that the VM's QEMU gets by connecting to `socket` as an
    /// `ivshmem-doorbell` device (the element is its ivshmem server). The VM
    /// writes a request in the window's first page and rings the doorbell; on
    /// a granted write the element copies the window's payload into the entry
    /// as one new version. The table itself the VM maps read-only (see
    /// [`GuestWindow`](crate::GuestWindow) and docs/SHM.md). The guest is a
    /// device (in [`Element::devices`], the BRT and the audit) from the moment
    /// its QEMU connects until that connection closes or the process exits.
    pub fn attach_guest(&self, socket: &Path, name: &str) -> Result<crate::GuestWindow, Error> {
        guest::create(&self.shared, socket, name)
    }

    /// Where devices connect.
    pub fn socket_path(&self) -> &Path {
        &self.shared.socket
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.shared)
    }

    /// The state with every posted release served: what the grants are now.
    fn settled(&self) -> MutexGuard<'_, State> {
        let mut st = self.lock();
        st.settle();
        st
    }

    /// Grants `device` write access to `entry` (its attribute becomes
    /// read/write for that device only) and returns the entry's version.
    /// Devices normally ask through [`crate::Device::request_write`]; this is
    /// the element's own call, with the same rules.
    pub fn grant(
        &self,
        device: DeviceId,
        entry: u32,
        timeout: Option<Duration>,
    ) -> Result<u64, Error> {
        self.lock().grant(device, entry, timeout)
    }

    /// Takes `device`'s write access to `entry` back.
    pub fn revoke(&self, device: DeviceId, entry: u32) -> Result<(), Error> {
        let mut st = self.lock();
        st.serve_release(device);
        st.revoke(device, entry, RevokeReason::Element)
    }

    /// Revokes every grant whose timeout is at or before `now`; returns how
    /// many. The serving thread calls this with the clock; a caller may pass a
    /// later instant to end grants early as if their time had passed.
    pub fn expire(&self, now: Instant) -> usize {
        self.lock().expire(now)
    }

    /// Reads a complete entry: its version and payload.
    pub fn read(&self, entry: u32) -> Result<(u64, Vec<u8>), Error> {
        let mut buf = vec![0u8; self.shared.layout.entry_size() as usize];
        let v = self.lock().slots.read(entry, &mut buf, 1 << 20)?;
        Ok((v, buf))
    }

    /// Every entry's sequence word, in entry order: its version when even, odd
    /// while a write is under way (0: never written).
    pub fn versions(&self) -> Vec<u64> {
        let st = self.lock();
        (0..self.shared.layout.entries())
            .map(|e| st.slots.seq(e))
            .collect()
    }

    /// The element writes an entry itself (refused while a device holds it).
    pub fn write(&self, entry: u32, data: &[u8]) -> Result<u64, Error> {
        let mut st = self.lock();
        st.slots.layout().check(entry)?;
        st.serve_holders_release(entry);
        if let Some(g) = &st.brt[entry as usize] {
            return Err(Error::Held {
                entry,
                holder: g.device,
            });
        }
        st.slots.write(entry, data)
    }

    /// Who holds `entry` now.
    pub fn holder(&self, entry: u32) -> Option<DeviceId> {
        self.settled()
            .brt
            .get(entry as usize)
            .and_then(|g| g.as_ref().map(|g| g.device))
    }

    /// Current grants, by entry.
    pub fn grants(&self) -> Vec<GrantInfo> {
        let st = self.settled();
        let now = Instant::now();
        st.devices
            .values()
            .flat_map(|d| d.held.iter().copied())
            .filter_map(|e| {
                st.brt[e as usize].as_ref().map(|g| {
                    let info = GrantInfo {
                        entry: e,
                        device: g.device,
                        version: g.version,
                        granted_at: g.granted_at,
                        expires_in: g.deadline.map(|d| d.saturating_duration_since(now)),
                    };
                    (e, info)
                })
            })
            .collect::<BTreeMap<u32, GrantInfo>>()
            .into_values()
            .collect()
    }

    /// Attached devices.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.settled()
            .devices
            .iter()
            .map(|(id, d)| DeviceInfo {
                id: *id,
                pid: d.pid,
                grants: d.held.len(),
                guest: d.guest.clone(),
            })
            .collect()
    }

    /// Audit events after `after` (0: all kept), oldest first.
    pub fn audit(&self, after: u64) -> Vec<AuditEvent> {
        self.settled()
            .audit
            .iter()
            .filter(|e| e.seq > after)
            .cloned()
            .collect()
    }

    /// Totals since start.
    pub fn totals(&self) -> Totals {
        self.settled().totals
    }

    /// Detaches a device as if it had gone (revokes its grants, closes its
    /// socket so it sees the element gone).
    pub fn detach(&self, device: DeviceId) -> Result<(), Error> {
        let mut st = self.lock();
        if let Some(p) = st.pending.remove(&device) {
            self.shared.epoll.delete(p.listener.as_raw_fd());
            let _ = std::fs::remove_file(&p.socket);
            return Ok(());
        }
        if !st.devices.contains_key(&device) {
            return Err(Error::NoSuchDevice(device));
        }
        st.gone(&self.shared.epoll, device, "detached by the element");
        Ok(())
    }
}

impl Drop for Element {
    fn drop(&mut self) {
        self.shared.stopping.store(1, Ordering::Release);
        let _ = sys::eventfd_signal(self.shared.stop.as_fd());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.shared.socket);
        for p in lock(&self.shared).pending.values() {
            let _ = std::fs::remove_file(&p.socket);
        }
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves the BRT as it was before the call
    // that panicked (every mutation is the last step), so keep serving.
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    fn record(&mut self, device: DeviceId, entry: Option<u32>, version: u64, kind: AuditKind) {
        self.audit_seq += 1;
        if self.audit.len() == self.audit_capacity {
            self.audit.pop_front();
        }
        self.audit.push_back(AuditEvent {
            seq: self.audit_seq,
            at: SystemTime::now(),
            device,
            entry,
            version,
            kind,
        });
    }

    fn grant(
        &mut self,
        device: DeviceId,
        entry: u32,
        timeout: Option<Duration>,
    ) -> Result<u64, Error> {
        self.slots.layout().check(entry)?;
        let timeout = match (timeout, self.max_grant) {
            (Some(t), Some(m)) => Some(t.min(m)),
            (t, m) => t.or(m),
        };
        let deadline = timeout.map(|t| Instant::now() + t);
        // Asking again for an entry just dropped gets a fresh grant, and an entry
        // its holder dropped is free: serve releases posted without waking us.
        self.serve_release(device);
        self.serve_holders_release(entry);
        match &mut self.brt[entry as usize] {
            Some(g) if g.device == device => {
                // Asking again extends the grant.
                g.deadline = deadline;
                let (serial, version) = (g.serial, g.version);
                if let Some(d) = deadline {
                    self.deadlines.push(Reverse((d, entry, serial)));
                }
                return Ok(version);
            }
            Some(g) => {
                let holder = g.device;
                self.totals.refused += 1;
                self.record(device, Some(entry), 0, AuditKind::Refused { holder });
                return Err(Error::Held { entry, holder });
            }
            None => {}
        }
        let dev = self
            .devices
            .get(&device)
            .ok_or(Error::NoSuchDevice(device))?;
        let mut snapshot = self.spare.pop().unwrap_or_default();
        let version = self.slots.snapshot(entry, &mut snapshot);
        let off = self.slots.layout().slot_offset(entry);
        if let Some(uffd) = &dev.uffd {
            uffd.protect(dev.base + off, self.slots.layout().slot_size(), false)
                .map_err(Error::io("granting (UFFDIO_WRITEPROTECT)"))?;
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        if let Some(d) = deadline {
            self.deadlines.push(Reverse((d, entry, serial)));
        }
        self.brt[entry as usize] = Some(Grant {
            device,
            serial,
            version,
            granted_at: SystemTime::now(),
            deadline,
            snapshot,
        });
        if let Some(dev) = self.devices.get_mut(&device) {
            dev.held.insert(entry);
        }
        self.totals.grants += 1;
        self.record(device, Some(entry), version, AuditKind::Granted);
        Ok(version)
    }

    fn revoke(&mut self, device: DeviceId, entry: u32, reason: RevokeReason) -> Result<(), Error> {
        self.revoke_with(device, entry, reason, true)
    }

    /// `protect`: write-protect the entry in the device's address space. Left
    /// out only for a release the same device's next request takes straight
    /// back (`serve_request`), whose grant would undo it at once.
    fn revoke_with(
        &mut self,
        device: DeviceId,
        entry: u32,
        reason: RevokeReason,
        protect: bool,
    ) -> Result<(), Error> {
        self.slots.layout().check(entry)?;
        match &self.brt[entry as usize] {
            Some(g) if g.device == device => {}
            _ => return Err(Error::NotHeld { device, entry }),
        }
        if protect {
            // The page is still writable on failure: say so rather than record a revoke.
            self.write_protect(device, entry).map_err(|e| Error::Io {
                what: "revoking (UFFDIO_WRITEPROTECT)",
                source: e,
            })?;
        }
        let Some(g) = self.brt[entry as usize].take() else {
            return Err(Error::NotHeld { device, entry });
        };
        if let Some(dev) = self.devices.get_mut(&device) {
            dev.held.remove(&entry);
        }
        // From here no device can write the entry. An odd sequence word means
        // its writer stopped mid-write: put back the content it was granted
        // with, under a new (even, larger) version.
        let seq = self.slots.seq(entry);
        let mut version = seq;
        if seq & 1 == 1 {
            version = seq + 1;
            self.slots.restore(entry, &g.snapshot, version);
            self.totals.rolled_back += 1;
            self.record(device, Some(entry), version, AuditKind::RolledBack);
        }
        self.spare.push(g.snapshot);
        self.totals.revokes += 1;
        self.record(device, Some(entry), version, AuditKind::Revoked { reason });
        Ok(())
    }

    fn expire(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(Reverse((at, entry, serial))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            let due = match &self.brt[entry as usize] {
                Some(g) if g.serial == serial => {
                    g.deadline.is_some_and(|d| d <= now).then_some(g.device)
                }
                _ => None,
            };
            if let Some(device) = due {
                // Released before its time ran out, but not yet served.
                self.serve_release(device);
                let still = self.brt[entry as usize]
                    .as_ref()
                    .is_some_and(|g| g.serial == serial);
                if !still {
                    continue;
                }
                match self.revoke(device, entry, RevokeReason::Timeout) {
                    Ok(()) => n += 1,
                    Err(e) => {
                        tracing::error!(device, entry, error = %e, "revoking an expired grant failed")
                    }
                }
            }
        }
        n
    }

    fn gone(&mut self, epoll: &Epoll, device: DeviceId, reason: &'static str) {
        self.serve_release(device);
        let held: Vec<u32> = match self.devices.get(&device) {
            Some(d) => d.held.iter().copied().collect(),
            None => return,
        };
        for entry in held {
            if let Err(e) = self.revoke(device, entry, RevokeReason::DeviceGone) {
                tracing::error!(device, entry, error = %e, "revoking a gone device's grant failed");
            }
        }
        if let Some(d) = self.devices.remove(&device) {
            epoll.delete(d.sock.as_raw_fd());
            epoll.delete(d.pidfd.as_raw_fd());
            epoll.delete(d.efd_req.as_raw_fd());
            let _ = d.sock.shutdown(std::net::Shutdown::Both);
        }
        self.record(device, None, 0, AuditKind::Detached { reason });
        tracing::debug!(device, reason, "device detached");
    }

    /// Does the device's posted release, if it posted a new one.
    fn serve_release(&mut self, device: DeviceId) {
        self.serve_release_before(device, None);
    }

    /// Does the device's posted release, if it posted a new one; `regrant`:
    /// the entry the device's pending request is about to be granted. A
    /// release of that same entry leaves its page as it is rather than
    /// write-protect it for the grant to clear again: one call into the
    /// device's page tables saved per cycle of a device that keeps updating
    /// one entry. Returns whether it did so (the page's protection is then
    /// whatever the device left: the grant must not fail silently).
    fn serve_release_before(&mut self, device: DeviceId, regrant: Option<u32>) -> bool {
        let Some(dev) = self.devices.get_mut(&device) else {
            return false;
        };
        let seq = dev.ctrl.word(proto::REL_SEQ).load(Ordering::Acquire);
        if seq == dev.last_rel {
            return false;
        }
        dev.last_rel = seq;
        let entry = dev.ctrl.word(proto::REL_ENTRY).load(Ordering::Relaxed);
        let entry = u32::try_from(entry).unwrap_or(u32::MAX);
        let keep = regrant == Some(entry);
        let kept = match self.revoke_with(device, entry, RevokeReason::Released, !keep) {
            Ok(()) => keep,
            Err(e) => {
                tracing::debug!(device, entry, error = %e, "posted release");
                false
            }
        };
        if let Some(dev) = self.devices.get(&device) {
            dev.ctrl.word(proto::REL_DONE).store(seq, Ordering::Release);
        }
        kept
    }

    /// Write-protects `entry` in `device`'s address space. Nothing to do for a
    /// device without one here (a guest) or whose address space is gone (it
    /// exited: nothing can write through its mapping any more).
    fn write_protect(&self, device: DeviceId, entry: u32) -> std::io::Result<()> {
        let Some((uffd, base)) = self
            .devices
            .get(&device)
            .and_then(|d| d.uffd.as_ref().map(|u| (u, d.base)))
        else {
            return Ok(());
        };
        let off = self.slots.layout().slot_offset(entry);
        match uffd.protect(base + off, self.slots.layout().slot_size(), true) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            r => r,
        }
    }

    /// Serves the posted release of `entry`'s holder, if it posted one.
    fn serve_holders_release(&mut self, entry: u32) {
        if let Some(holder) = self
            .brt
            .get(entry as usize)
            .and_then(|g| g.as_ref().map(|g| g.device))
        {
            self.serve_release(holder);
        }
    }

    /// Serves every device's posted release not done yet (a device that could
    /// protect a dropped entry itself does not wake the element for it).
    fn settle(&mut self) {
        let posted: Vec<DeviceId> = self
            .devices
            .iter()
            .filter(|(_, d)| d.ctrl.word(proto::REL_SEQ).load(Ordering::Acquire) != d.last_rel)
            .map(|(id, _)| *id)
            .collect();
        for id in posted {
            self.serve_release(id);
        }
        self.swept = Instant::now();
    }

    /// When the serving thread must look without being asked: the next grant
    /// timeout, or the next sweep of posted releases while grants are held.
    fn next_wake(&self) -> Option<Instant> {
        let sweep = (self.notify == Notify::EventFd && self.totals.grants > self.totals.revokes)
            .then(|| self.swept + SWEEP);
        let deadline = self.deadlines.peek().map(|Reverse((at, _, _))| *at);
        deadline.into_iter().chain(sweep).min()
    }

    /// Does the device's posted release and answers its pending request, if
    /// it made new ones.
    fn serve_request(&mut self, device: DeviceId) {
        let Some(dev) = self.devices.get(&device) else {
            return;
        };
        // The request number first: a request seen here was posted after any
        // release the next load can see, so that release is done before it.
        let seq = dev.ctrl.word(proto::REQ_SEQ).load(Ordering::Acquire);
        let new = seq != dev.last_req;
        let op = dev.ctrl.word(proto::REQ_OP).load(Ordering::Relaxed);
        let entry = dev.ctrl.word(proto::REQ_ENTRY).load(Ordering::Relaxed);
        let timeout_ms = dev.ctrl.word(proto::REQ_TIMEOUT_MS).load(Ordering::Relaxed);
        let entry = u32::try_from(entry).unwrap_or(u32::MAX);
        let regrant = (new && op == proto::OP_REQUEST_WRITE).then_some(entry);
        let kept = self.serve_release_before(device, regrant);
        if !new {
            return;
        }
        if let Some(dev) = self.devices.get_mut(&device) {
            dev.last_req = seq;
        }
        let result = match op {
            proto::OP_REQUEST_WRITE => {
                let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms));
                let granted = self.grant(device, entry, timeout);
                if granted.is_err() && kept {
                    // The release above left the page as the device did; the
                    // entry is free now, so no page of it may stay writable.
                    if let Err(e) = self.write_protect(device, entry) {
                        tracing::warn!(device, entry, error = %e, "write-protecting a released entry");
                    }
                }
                granted.map(|v| (proto::ST_GRANTED, v))
            }
            proto::OP_RELEASE => self
                .revoke(device, entry, RevokeReason::Released)
                .map(|()| (proto::ST_RELEASED, 0)),
            proto::OP_COMMIT => self.commit(device, entry).map(|v| (proto::ST_COMMITTED, v)),
            proto::OP_WRITE => self.write_once(device, entry),
            proto::OP_REFUSED_STORE => match self.slots.layout().check(entry) {
                Ok(()) => {
                    let version = self.slots.seq(entry);
                    self.totals.refused_stores += 1;
                    self.record(device, Some(entry), version, AuditKind::RefusedStore);
                    Ok((proto::ST_RELEASED, 0))
                }
                Err(e) => Err(e),
            },
            _ => Err(Error::Protocol(format!("unknown request {op}"))),
        };
        let (status, value) = match result {
            Ok(sv) => sv,
            Err(Error::Held { holder, .. }) => (proto::ST_HELD, u64::from(holder)),
            Err(Error::NoSuchEntry { .. }) => (proto::ST_NO_SUCH_ENTRY, 0),
            Err(Error::NotHeld { .. }) => (proto::ST_NOT_HELD, 0),
            Err(Error::NotAGuest) => (proto::ST_NOT_A_GUEST, 0),
            Err(e) => {
                tracing::warn!(device, entry, error = %e, "request failed");
                (proto::ST_FAILED, 0)
            }
        };
        let Some(dev) = self.devices.get(&device) else {
            return;
        };
        dev.ctrl
            .word(proto::RESP_STATUS)
            .store(status, Ordering::Relaxed);
        dev.ctrl
            .word(proto::RESP_VALUE)
            .store(value, Ordering::Relaxed);
        // Sequentially consistent with the device's `RESP_WAITING` store and
        // reload (`Device::answer`): either the device sees this answer before
        // it sleeps, or this thread sees that it sleeps and wakes it.
        dev.ctrl.word(proto::RESP_SEQ).store(seq, Ordering::SeqCst);
        // A guest's answer is an interrupt (QEMU's vector eventfd) in either
        // mode: a guest that polls the word masks it. A device is woken only
        // if it went to sleep for this answer; one that has not got that far
        // (it was preempted by this thread on a shared core) finds the answer
        // and does not sleep — a write here and a wait and read there saved.
        let sleeping = dev.ctrl.word(proto::RESP_WAITING).load(Ordering::SeqCst) == seq;
        if dev.guest.is_some() || (self.notify == Notify::EventFd && sleeping) {
            let _ = sys::eventfd_signal(dev.efd_resp.as_fd());
        }
    }

    /// Copies a guest's window payload into `entry`, which it must hold, as
    /// one new version (readers see the old or the new payload, never a mix:
    /// the copy is taken first, then written under the sequence word).
    fn commit(&mut self, device: DeviceId, entry: u32) -> Result<u64, Error> {
        self.slots.layout().check(entry)?;
        let dev = self
            .devices
            .get(&device)
            .ok_or(Error::NoSuchDevice(device))?;
        if dev.guest.is_none() {
            return Err(Error::NotAGuest);
        }
        match &self.brt[entry as usize] {
            Some(g) if g.device == device => {}
            _ => return Err(Error::NotHeld { device, entry }),
        }
        let words = self.slots.layout().entry_size() as usize / 8;
        let mut copy = std::mem::take(&mut self.copy);
        copy.clear();
        copy.extend(
            dev.ctrl
                .window_payload(words)
                .iter()
                .map(|w| w.load(Ordering::Relaxed)),
        );
        let version = self.slots.write_words(entry, &copy);
        self.copy = copy;
        Ok(version)
    }

    /// A guest's one-doorbell write: grant, copy the window in, revoke.
    fn write_once(&mut self, device: DeviceId, entry: u32) -> Result<(u64, u64), Error> {
        if self.devices.get(&device).is_some_and(|d| d.guest.is_none()) {
            return Err(Error::NotAGuest);
        }
        let held = self
            .brt
            .get(entry as usize)
            .is_some_and(|g| g.as_ref().is_some_and(|g| g.device == device));
        if !held {
            self.grant(device, entry, None)?;
        }
        let version = self.commit(device, entry);
        if !held {
            self.revoke(device, entry, RevokeReason::Released)?;
        }
        Ok((proto::ST_COMMITTED, version?))
    }
}

fn serve(shared: &Shared) {
    let mut ready = Vec::new();
    let mut ids: Vec<DeviceId> = Vec::new();
    let mut spins: u32 = 0;
    let polled = lock(shared).notify == Notify::Polled;
    // What the timer is armed for: re-armed only when that changes (a sweep
    // every 10 ms, an earlier grant timeout), not on every sleep.
    let mut armed: Option<Instant> = None;
    loop {
        if shared.stopping.load(Ordering::Acquire) != 0 {
            return;
        }
        let timeout = if polled {
            0
        } else {
            let want = lock(shared).next_wake();
            if want != armed {
                match sys::timerfd_set(shared.timer.as_fd(), want) {
                    Ok(()) => armed = want,
                    Err(e) => tracing::error!(error = %e, "arming the element's timer"),
                }
            }
            match (want == armed, want) {
                (true, _) | (false, None) => -1,
                // The timer could not be armed: the wait's own timeout then
                // (rounded up, never before the time).
                (false, Some(at)) => {
                    let d = at.saturating_duration_since(Instant::now());
                    i32::try_from(d.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
                }
            }
        };
        // Polled: look at the sockets and pidfds every 256 passes over the
        // control pages (a syscall per pass would double the latency).
        if !polled || spins.is_multiple_of(256) {
            if let Err(e) = shared.epoll.wait(&mut ready, timeout) {
                tracing::error!(error = %e, "epoll_wait");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        } else {
            ready.clear();
        }
        spins = spins.wrapping_add(1);
        for &t in &ready {
            match t {
                TOKEN_STOP => return,
                TOKEN_TIMER => {
                    let _ = sys::eventfd_drain(shared.timer.as_fd());
                    armed = None;
                }
                TOKEN_LISTENER => accept_all(shared),
                t if t & 3 == KIND_GUEST => guest::accept(shared, (t >> 2) as DeviceId),
                t => {
                    let device = (t >> 2) as DeviceId;
                    let mut st = lock(shared);
                    match t & 3 {
                        // Edge-triggered: nothing to read back (`Epoll::add_eventfd`).
                        KIND_REQ => st.serve_request(device),
                        KIND_PIDFD => st.gone(&shared.epoll, device, "process exited"),
                        KIND_SOCK => {
                            let reason = match st.devices.get(&device) {
                                Some(d) => socket_state(&d.sock),
                                None => None,
                            };
                            if let Some(reason) = reason {
                                st.gone(&shared.epoll, device, reason);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        let mut st = lock(shared);
        if polled {
            ids.clear();
            ids.extend(st.devices.keys().copied());
            for &id in &ids {
                st.serve_request(id);
            }
        }
        let now = Instant::now();
        st.expire(now);
        if !polled && now.saturating_duration_since(st.swept) >= SWEEP {
            st.settle();
        }
        drop(st);
        if polled && spins.is_multiple_of(64) {
            // Let a device sharing this core run.
            std::thread::yield_now();
        }
    }
}

/// Why a device's socket became readable: devices send nothing after
/// attaching, so any readability is either the end of the connection or a
/// protocol violation.
fn socket_state(sock: &UnixStream) -> Option<&'static str> {
    match sys::peek_nonblocking(sock.as_fd()) {
        Ok(0) => Some("socket closed"),
        Ok(_) => Some("protocol"),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(_) => Some("socket closed"),
    }
}

fn accept_all(shared: &Shared) {
    loop {
        match shared.listener.accept() {
            Ok((sock, _)) => {
                if let Err(e) = attach(shared, sock) {
                    tracing::warn!(error = %e, "device failed to attach");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => {
                tracing::error!(error = %e, "accept on the device socket");
                return;
            }
        }
    }
}

/// The handshake: send the table, take the device's userfaultfd, protect its
/// whole mapping (which also proves the mapping is registered for
/// write-protect tracking), then let it start.
fn attach(shared: &Shared, sock: UnixStream) -> Result<(), Error> {
    sock.set_nonblocking(false)
        .map_err(Error::io("device socket"))?;
    sys::set_recv_timeout(sock.as_fd(), 2000).map_err(Error::io("device socket"))?;
    let pid = sys::peer_pid(sock.as_fd()).map_err(Error::io("SO_PEERCRED"))?;
    let pidfd = sys::pidfd_open(pid).map_err(Error::io("pidfd_open"))?;
    let (ctrl, ctrl_fd) = Ctrl::create()?;
    let efd_req = sys::eventfd().map_err(Error::io("eventfd"))?;
    let efd_resp = sys::eventfd().map_err(Error::io("eventfd"))?;
    let (device, notify) = {
        let mut st = lock(shared);
        let id = st.next_device;
        st.next_device += 1;
        (id, st.notify)
    };
    let layout = shared.layout;
    let welcome = Welcome {
        device,
        notify,
        entries: layout.entries(),
        entry_size: layout.entry_size(),
        generation: shared.generation,
    };
    sys::send_with_fds(
        sock.as_fd(),
        &welcome.encode(),
        &[
            shared.memfd.as_fd(),
            ctrl_fd.as_fd(),
            efd_req.as_fd(),
            efd_resp.as_fd(),
        ],
    )
    .map_err(Error::io("sending the table"))?;
    let mut buf = [0u8; proto::ATTACH_LEN];
    let mut fds = sys::recv_with_fds(sock.as_fd(), &mut buf)
        .map_err(Error::io("receiving the attach message"))?;
    let attach = Attach::decode(&buf)?;
    let Some(uffd) = fds.pop().filter(|_| fds.is_empty()) else {
        return Err(Error::Protocol(
            "attach must carry exactly one userfaultfd".into(),
        ));
    };
    let uffd = Uffd::from_fd(uffd);
    if attach.len != layout.table_bytes() as u64 {
        let _ = sys::send_with_fds(sock.as_fd(), &proto::encode_ready(libc::EINVAL as u32), &[]);
        return Err(Error::Protocol(format!(
            "device mapped {} bytes of a {}-byte table",
            attach.len,
            layout.table_bytes()
        )));
    }
    let base = attach.base as usize;
    if let Err(e) = uffd.protect(base, layout.table_bytes(), true) {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        let _ = sys::send_with_fds(sock.as_fd(), &proto::encode_ready(errno as u32), &[]);
        return Err(Error::Io {
            what: "write-protecting the device's mapping",
            source: e,
        });
    }
    let mut st = lock(shared);
    shared
        .epoll
        .add(sock.as_raw_fd(), token(device, KIND_SOCK))
        .map_err(Error::io("epoll"))?;
    shared
        .epoll
        .add(pidfd.as_raw_fd(), token(device, KIND_PIDFD))
        .map_err(Error::io("epoll"))?;
    if notify == Notify::EventFd {
        shared
            .epoll
            .add_eventfd(efd_req.as_raw_fd(), token(device, KIND_REQ))
            .map_err(Error::io("epoll"))?;
    }
    sys::send_with_fds(sock.as_fd(), &proto::encode_ready(0), &[])
        .map_err(Error::io("sending ready"))?;
    st.devices.insert(
        device,
        Dev {
            pid,
            sock,
            uffd: Some(uffd),
            base,
            guest: None,
            pidfd,
            ctrl,
            efd_req,
            efd_resp,
            last_req: 0,
            last_rel: 0,
            held: BTreeSet::new(),
        },
    );
    st.record(device, None, 0, AuditKind::Attached);
    tracing::debug!(device, pid, "device attached");
    Ok(())
}
