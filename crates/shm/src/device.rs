//! The device library: attach to an element's table, read entries, and ask for
//! write access to one entry at a time.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::entry::{Layout, Slots};
use crate::proto::{self, Attach, Ctrl, Notify, Welcome};
use crate::sys::{self, Mapping, Uffd};
use crate::{DeviceId, Error};

/// How long a device waits for the element's answer before calling it gone.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A device attached to a table. Its mapping of the table is write-protected
/// except for the entries it holds a grant for; a store anywhere else raises
/// SIGBUS in this process.
pub struct Device {
    // Field order is drop order: unmap the table before the userfaultfd goes.
    table: Slots,
    ctrl: Ctrl,
    id: DeviceId,
    notify: Notify,
    generation: u64,
    sock: UnixStream,
    efd_req: OwnedFd,
    efd_resp: OwnedFd,
    /// Ends a wait for an answer that outlived its answer timeout (the wait
    /// itself has no timeout: see `sys::timerfd`), and when it is armed for.
    watchdog: OwnedFd,
    watchdog_at: Mutex<Option<Instant>>,
    /// `ANSWER_TIMEOUT` (shorter in this module's tests).
    answer_timeout: Duration,
    // Kept open so that the protection outlives the element: if the element
    // exits, its copy of this userfaultfd closes, and the kernel would clear
    // write protection from the mapping if ours were the last one gone. Also
    // how a release protects its entry here first (`protect_own`).
    uffd: Uffd,
    /// The last request number.
    seq: Mutex<u64>,
    /// The last posted release's number (a dropped guard's).
    rel_seq: Mutex<u64>,
    held: Mutex<BTreeSet<u32>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("id", &self.id)
            .field("layout", self.table.layout())
            .field("notify", &self.notify)
            .finish()
    }
}

/// An answer to a request that was not a grant.
fn refusal(status: u64, value: u64, id: DeviceId, entry: u32, entries: u32) -> Error {
    match status {
        proto::ST_HELD => Error::Held {
            entry,
            holder: u32::try_from(value).unwrap_or(u32::MAX),
        },
        proto::ST_NO_SUCH_ENTRY => Error::NoSuchEntry { entry, entries },
        proto::ST_NOT_HELD => Error::NotHeld { device: id, entry },
        _ => Error::Protocol(format!("element answered status {status} ({value})")),
    }
}

impl Device {
    /// Connects to the element at `socket`, maps the table, registers the
    /// mapping for write-protect tracking and hands the userfaultfd to the
    /// element, which protects every entry before this returns.
    pub fn connect(socket: &Path) -> Result<Device, Error> {
        let sock = UnixStream::connect(socket).map_err(Error::io("connecting to the element"))?;
        sock.set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(Error::io("element socket"))?;
        let mut buf = [0u8; proto::WELCOME_LEN];
        let fds =
            sys::recv_with_fds(sock.as_fd(), &mut buf).map_err(Error::io("receiving the table"))?;
        let welcome = Welcome::decode(&buf)?;
        let [memfd, ctrl_fd, efd_req, efd_resp]: [OwnedFd; 4] =
            fds.try_into().map_err(|v: Vec<OwnedFd>| {
                Error::Protocol(format!("welcome carried {} descriptors, not 4", v.len()))
            })?;
        let layout = Layout::new(welcome.entries, welcome.entry_size)?;
        let size = sys::file_len(memfd.as_fd()).map_err(Error::io("table size"))?;
        if size < layout.table_bytes() as u64 {
            return Err(Error::Protocol(format!(
                "table memfd of {size} bytes, layout needs {}",
                layout.table_bytes()
            )));
        }
        let map = Mapping::shared(memfd.as_fd(), layout.table_bytes())
            .map_err(Error::io("mapping the table"))?;
        let ctrl = Ctrl::open(ctrl_fd.as_fd())?;
        let uffd = Uffd::open().map_err(Error::io(
            "userfaultfd (needs Linux ≥ 5.19 for shared memory)",
        ))?;
        let base = map.as_ptr() as usize;
        uffd.register_wp(base, map.len())
            .map_err(Error::io("UFFDIO_REGISTER write-protect"))?;
        let attach = Attach {
            base: base as u64,
            len: map.len() as u64,
        };
        sys::send_with_fds(sock.as_fd(), &attach.encode(), &[uffd.fd()])
            .map_err(Error::io("sending the userfaultfd"))?;
        let mut ready = [0u8; proto::READY_LEN];
        sys::recv_with_fds(sock.as_fd(), &mut ready)
            .map_err(Error::io("waiting for the element"))?;
        let status = proto::decode_ready(&ready)?;
        if status != 0 {
            return Err(Error::Io {
                what: "the element could not protect this device's mapping",
                source: std::io::Error::from_raw_os_error(status as i32),
            });
        }
        Ok(Device {
            table: Slots::new(map, layout),
            ctrl,
            id: welcome.device,
            notify: welcome.notify,
            generation: welcome.generation,
            sock,
            efd_req,
            efd_resp,
            watchdog: sys::timerfd().map_err(Error::io("timerfd"))?,
            watchdog_at: Mutex::new(None),
            answer_timeout: ANSWER_TIMEOUT,
            uffd,
            seq: Mutex::new(0),
            rel_seq: Mutex::new(0),
            held: Mutex::new(BTreeSet::new()),
        })
    }

    /// This device's id at the element.
    pub fn id(&self) -> DeviceId {
        self.id
    }

    /// The table's shape.
    pub fn layout(&self) -> Layout {
        *self.table.layout()
    }

    /// The element instance this device is attached to (changes when the
    /// element restarts; a device must then reconnect).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How the element signals answers.
    pub fn notify(&self) -> Notify {
        self.notify
    }

    /// Reads a complete entry into `out` (up to its length) and returns its
    /// version; never returns a half-written entry.
    pub fn read_into(&self, entry: u32, out: &mut [u8]) -> Result<u64, Error> {
        self.table.read(entry, out, 1 << 24)
    }

    /// Reads a complete entry.
    pub fn read(&self, entry: u32) -> Result<(u64, Vec<u8>), Error> {
        let mut buf = vec![0u8; self.table.layout().entry_size() as usize];
        let v = self.read_into(entry, &mut buf)?;
        Ok((v, buf))
    }

    /// Asks the element for write access to `entry` (for at most `timeout`,
    /// bounded by the element's own limit). The returned guard writes the
    /// entry in place; dropping it gives the access back.
    pub fn request_write(
        &self,
        entry: u32,
        timeout: Option<Duration>,
    ) -> Result<WriteGuard<'_>, Error> {
        self.table.layout().check(entry)?;
        let ms = timeout
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1))
            .unwrap_or(0);
        let version = self.call(proto::OP_REQUEST_WRITE, entry, ms)?;
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(entry);
        Ok(WriteGuard {
            device: self,
            entry,
            version,
            done: false,
        })
    }

    fn release(&self, entry: u32) -> Result<(), Error> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&entry);
        self.protect_own(entry);
        self.call(proto::OP_RELEASE, entry, 0).map(|_| ())
    }

    /// Posts a release without waiting for the element (a dropped guard: this
    /// device stops writing at once, so nothing waits on the revoke itself).
    /// It goes in the control page's release words, not the request words, so
    /// the next request is not held up by it; the element serves a posted
    /// release before any request it sees after it.
    ///
    /// The element is woken for it only if this device could not protect the
    /// entry itself: then the element's revoke is what stops its stores and
    /// must come now. Otherwise no store of this device lands any more, and
    /// the element's bookkeeping (its revoke, the audit line) can wait for its
    /// next look: this device's next request, another device asking for the
    /// entry, a read of the grants, or its periodic sweep (`SWEEP`). A wake-up
    /// less per cycle is two context switches fewer when device and element
    /// share a core (docs/SHM.md).
    fn post_release(&self, entry: u32) -> Result<(), Error> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&entry);
        let protected = self.protect_own(entry);
        let mut rel = self.rel_seq.lock().unwrap_or_else(|p| p.into_inner());
        // One release slot: the previous posted release must be done. It is
        // whenever a request came between the two drops; if not (two guards
        // dropped in a row), wake the element for it rather than wait for its
        // sweep.
        if self.ctrl.word(proto::REL_DONE).load(Ordering::Acquire) != *rel {
            if self.notify == Notify::EventFd {
                sys::eventfd_signal(self.efd_req.as_fd())
                    .map_err(Error::io("signalling the element"))?;
            }
            self.wait_word(proto::REL_DONE, *rel)?;
        }
        *rel += 1;
        self.ctrl
            .word(proto::REL_ENTRY)
            .store(u64::from(entry), Ordering::Relaxed);
        self.ctrl
            .word(proto::REL_SEQ)
            .store(*rel, Ordering::Release);
        if self.notify == Notify::EventFd && !protected {
            sys::eventfd_signal(self.efd_req.as_fd())
                .map_err(Error::io("signalling the element"))?;
        }
        Ok(())
    }

    /// Write-protects `entry` in this device's own mapping before the release goes to the
    /// element. A page written under the grant is writable in this CPU's TLB; protected
    /// from here, only this CPU's TLB is flushed, where the element's revoke would
    /// interrupt the CPU this device runs on to flush it (an IPI: about 10 µs on a VM, most
    /// of a grant cycle). The element still revokes — its guarantee does not rest on this
    /// — and then finds nothing left to change, so nothing to flush. A failure here
    /// leaves that work to the element, and the release then wakes it (`false`).
    fn protect_own(&self, entry: u32) -> bool {
        let len = self.table.layout().slot_size();
        match self.uffd.protect(self.table.slot_addr(entry), len, true) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(entry, error = %e, "write-protecting a released entry here");
                false
            }
        }
    }

    /// Waits (spinning, then sleeping in short steps) until control word `i`
    /// reads `value`: for answers nobody signals.
    fn wait_word(&self, i: usize, value: u64) -> Result<(), Error> {
        let deadline = Instant::now() + self.answer_timeout;
        let mut spins: u32 = 0;
        while self.ctrl.word(i).load(Ordering::Acquire) != value {
            spins = spins.wrapping_add(1);
            if spins < 256 {
                std::hint::spin_loop();
                continue;
            }
            self.check_element(0)?;
            if Instant::now() > deadline {
                return Err(Error::ElementGone);
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        Ok(())
    }

    /// One request on the control page; returns the answer's value.
    fn call(&self, op: u64, entry: u32, timeout_ms: u64) -> Result<u64, Error> {
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        *seq += 1;
        let s = *seq;
        self.ctrl.word(proto::REQ_OP).store(op, Ordering::Relaxed);
        self.ctrl
            .word(proto::REQ_ENTRY)
            .store(u64::from(entry), Ordering::Relaxed);
        self.ctrl
            .word(proto::REQ_TIMEOUT_MS)
            .store(timeout_ms, Ordering::Relaxed);
        self.ctrl.word(proto::REQ_SEQ).store(s, Ordering::Release);
        if self.notify == Notify::EventFd {
            sys::eventfd_signal(self.efd_req.as_fd())
                .map_err(Error::io("signalling the element"))?;
        }
        self.answer(s, entry)
    }

    /// Waits for the answer to request `s`.
    fn answer(&self, s: u64, entry: u32) -> Result<u64, Error> {
        let deadline = Instant::now() + self.answer_timeout;
        let mut spins: u32 = 0;
        while self.ctrl.word(proto::RESP_SEQ).load(Ordering::Acquire) != s {
            match self.notify {
                Notify::Polled => {
                    spins = spins.wrapping_add(1);
                    if spins.is_multiple_of(1024) {
                        self.check_element(0)?;
                        if Instant::now() > deadline {
                            return Err(Error::ElementGone);
                        }
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
                Notify::EventFd => {
                    // Say what this thread sleeps for, then look once more
                    // (sequentially consistent with the element's answer and
                    // its load of this word): the element signals only a
                    // device that says it sleeps.
                    self.ctrl
                        .word(proto::RESP_WAITING)
                        .store(s, Ordering::SeqCst);
                    if self.ctrl.word(proto::RESP_SEQ).load(Ordering::SeqCst) == s {
                        break;
                    }
                    if Instant::now() >= deadline {
                        return Err(Error::ElementGone);
                    }
                    self.arm_watchdog(deadline)?;
                    let ready = sys::poll_readable(
                        &[
                            self.efd_resp.as_fd(),
                            self.sock.as_fd(),
                            self.watchdog.as_fd(),
                        ],
                        -1,
                    )
                    .map_err(Error::io("waiting for the element"))?;
                    if ready[1] {
                        self.check_element(0)?;
                    }
                    if ready[2] {
                        sys::eventfd_drain(self.watchdog.as_fd()).map_err(Error::io("timerfd"))?;
                        *self.watchdog_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    }
                    if ready[0] {
                        sys::eventfd_drain(self.efd_resp.as_fd()).map_err(Error::io("eventfd"))?;
                    }
                }
            }
        }
        let status = self.ctrl.word(proto::RESP_STATUS).load(Ordering::Relaxed);
        let value = self.ctrl.word(proto::RESP_VALUE).load(Ordering::Relaxed);
        match status {
            proto::ST_GRANTED | proto::ST_RELEASED => Ok(value),
            _ => Err(refusal(
                status,
                value,
                self.id,
                entry,
                self.table.layout().entries(),
            )),
        }
    }

    /// Makes sure the watchdog fires by `deadline`. One armed for an earlier
    /// request's deadline that has not come yet is kept (it comes sooner; when
    /// it fires, the wait re-arms for its own): so a device that keeps asking
    /// arms it once per answer timeout, not per request.
    fn arm_watchdog(&self, deadline: Instant) -> Result<(), Error> {
        let mut at = self.watchdog_at.lock().unwrap_or_else(|p| p.into_inner());
        if at.is_some_and(|t| t > Instant::now() && t <= deadline) {
            return Ok(());
        }
        sys::timerfd_set(self.watchdog.as_fd(), Some(deadline)).map_err(Error::io("timerfd"))?;
        *at = Some(deadline);
        Ok(())
    }

    /// The element never sends after the handshake: a readable socket means
    /// it closed.
    fn check_element(&self, timeout_ms: i32) -> Result<(), Error> {
        let ready = sys::poll_readable(&[self.sock.as_fd()], timeout_ms)
            .map_err(Error::io("element socket"))?;
        if ready[0] {
            Err(Error::ElementGone)
        } else {
            Ok(())
        }
    }

    /// Whether the element is still there.
    pub fn element_alive(&self) -> bool {
        self.check_element(0).is_ok()
    }

    /// A single 8-byte store at `offset` bytes into entry `entry`'s slot that
    /// bypasses the grant protocol (a stray write), reporting whether the
    /// kernel refused it with SIGBUS instead of letting the signal end the
    /// process. For testing the protection; x86-64 only.
    pub fn stray_store(
        &self,
        entry: u32,
        offset: usize,
        value: u64,
    ) -> Result<crate::StoreOutcome, Error> {
        self.table.layout().check(entry)?;
        if !offset.is_multiple_of(8) || offset >= self.table.layout().slot_size() {
            return Err(Error::Invalid(format!(
                "offset {offset} is not an aligned word of the slot"
            )));
        }
        crate::probe::store(self.table.slot_addr(entry) + offset, value, &self.table)
    }

    /// [`Device::stray_store`], and a refused store is reported to the element,
    /// which audits it (`refused_store`): the kernel tells only this process, so
    /// the audit has what devices using this library report. x86-64 only.
    pub fn try_store(
        &self,
        entry: u32,
        offset: usize,
        value: u64,
    ) -> Result<crate::StoreOutcome, Error> {
        let outcome = self.stray_store(entry, offset, value)?;
        if outcome == crate::StoreOutcome::Sigbus {
            self.call(proto::OP_REFUSED_STORE, entry, 0)?;
        }
        Ok(outcome)
    }

    /// Address of entry `entry`'s slot in this process (for diagnostics).
    pub fn slot_addr(&self, entry: u32) -> usize {
        self.table.slot_addr(entry)
    }
}

/// Write access to one entry. Writes go straight into the shared table (no
/// copy through the element); dropping the guard gives the access back
/// without waiting for the element's confirmation ([`WriteGuard::release`]
/// waits). If the grant times out first, the next write raises SIGBUS.
#[derive(Debug)]
pub struct WriteGuard<'a> {
    device: &'a Device,
    entry: u32,
    version: u64,
    done: bool,
}

impl WriteGuard<'_> {
    /// The entry.
    pub fn entry(&self) -> u32 {
        self.entry
    }

    /// The entry's version when granted, or after this guard's last write.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Replaces the start of the entry's payload with `data` (zero-padded to
    /// a multiple of 8) as one new version, which readers see whole or not
    /// at all.
    pub fn write(&mut self, data: &[u8]) -> Result<u64, Error> {
        self.version = self.device.table.write(self.entry, data)?;
        Ok(self.version)
    }

    /// Gives the access back and waits for the element to confirm.
    pub fn release(mut self) -> Result<(), Error> {
        self.done = true;
        self.device.release(self.entry)
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = self.device.post_release(self.entry) {
                tracing::debug!(entry = self.entry, error = %e, "release on drop");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::proto::{Attach, Ctrl};

    /// An element that attaches one device, answers its first `answered`
    /// requests with a grant 50 ms late (so that the device sleeps for each),
    /// then never answers again (hung, not gone: its socket stays open until
    /// `stop` is dropped).
    fn hung_element(
        socket: &Path,
        answered: u64,
    ) -> (std::thread::JoinHandle<()>, std::sync::mpsc::Sender<()>) {
        let listener = UnixListener::bind(socket).unwrap();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let layout = Layout::new(2, 56).unwrap();
            let memfd = sys::sealed_memfd(c"hung", layout.table_bytes()).unwrap();
            let (ctrl, ctrl_fd) = Ctrl::create().unwrap();
            let efd_req = sys::eventfd().unwrap();
            let efd_resp = sys::eventfd().unwrap();
            let welcome = Welcome {
                device: 1,
                notify: Notify::EventFd,
                entries: layout.entries(),
                entry_size: layout.entry_size(),
                generation: 1,
            };
            let fds = [
                memfd.as_fd(),
                ctrl_fd.as_fd(),
                efd_req.as_fd(),
                efd_resp.as_fd(),
            ];
            sys::send_with_fds(sock.as_fd(), &welcome.encode(), &fds).unwrap();
            let mut buf = [0u8; proto::ATTACH_LEN];
            let _uffd = sys::recv_with_fds(sock.as_fd(), &mut buf).unwrap();
            Attach::decode(&buf).unwrap();
            sys::send_with_fds(sock.as_fd(), &proto::encode_ready(0), &[]).unwrap();
            for seq in 1..=answered {
                while ctrl.word(proto::REQ_SEQ).load(Ordering::Acquire) < seq {
                    sys::poll_readable(&[efd_req.as_fd()], 1000).unwrap();
                    sys::eventfd_drain(efd_req.as_fd()).unwrap();
                }
                std::thread::sleep(Duration::from_millis(50));
                ctrl.word(proto::RESP_STATUS)
                    .store(proto::ST_GRANTED, Ordering::Relaxed);
                ctrl.word(proto::RESP_SEQ).store(seq, Ordering::SeqCst);
                if ctrl.word(proto::RESP_WAITING).load(Ordering::SeqCst) == seq {
                    sys::eventfd_signal(efd_resp.as_fd()).unwrap();
                }
            }
            let _ = stopped.recv();
        });
        (thread, stop)
    }

    #[test]
    fn a_hung_element_ends_the_wait_at_its_own_timeout() {
        let dir = std::env::temp_dir().join(format!("shm-hung-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("hung.sock");
        let _ = std::fs::remove_file(&socket);
        let (thread, stop) = hung_element(&socket, 1);
        let mut dev = Device::connect(&socket).unwrap();
        let timeout = Duration::from_millis(400);
        dev.answer_timeout = timeout;
        // Answered after the device went to sleep for it: the watchdog is
        // armed for this request's deadline.
        let first = Instant::now();
        drop(dev.request_write(0, None).unwrap());
        // Asked half a timeout later, unanswered: the watchdog armed for the
        // first request fires first, and the wait goes on to its own deadline.
        std::thread::sleep((timeout / 2).saturating_sub(first.elapsed()));
        let t = Instant::now();
        let err = dev.request_write(1, None).err();
        let waited = t.elapsed();
        assert!(
            matches!(err, Some(Error::ElementGone)),
            "a hung element: {err:?}"
        );
        assert!(
            waited >= timeout,
            "gave up after {waited:?}, before {timeout:?}"
        );
        assert!(
            waited < timeout * 5,
            "waited {waited:?} for a {timeout:?} timeout"
        );
        // And again, with nothing armed left over.
        let t = Instant::now();
        assert!(matches!(
            dev.request_write(1, None).err(),
            Some(Error::ElementGone)
        ));
        let waited = t.elapsed();
        assert!(waited >= timeout && waited < timeout * 5, "{waited:?}");
        drop(stop);
        thread.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
