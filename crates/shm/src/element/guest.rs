//! VMs as devices. QEMU owns a guest's mapping of the table, so the element
//! cannot flip that guest's pages the way it does a process's (there is no
//! userfaultfd of QEMU's to hold, and a guest's writes do not go through one).
//! A VM therefore maps the table read-only (`ivshmem-plain` over a read-only
//! `memory-backend-file`: its stores are dropped) and gets a writable *window*
//! of its own: one page of request and answer words, then one entry's
//! payload. The element is the window's ivshmem server: QEMU's
//! `ivshmem-doorbell` device connects to a Unix socket, receives the window's
//! memfd and two eventfds, one to ring the element (peer 0, vector 0) and one
//! its own interrupt. On a granted write the element copies the window's
//! payload into the entry as one new version under the sequence word.
//!
//! The ivshmem server protocol (QEMU's docs/specs/ivshmem-spec.rst): 8-byte
//! little-endian signed numbers, some with one descriptor: the protocol
//! version (0), the client's id, -1 with the shared memory, then for each
//! other peer its id with one eventfd per vector, then the client's own id
//! with its own eventfds.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::{lock, token, AuditKind, Dev, Shared, KIND_GUEST, KIND_PIDFD, KIND_REQ, KIND_SOCK};
use crate::proto::{self, Ctrl};
use crate::sys::{self, Mapping};
use crate::{DeviceId, Error};

/// The guest's id among the window's ivshmem peers (its `IVPosition`).
pub const GUEST_PEER: u16 = 1;
/// The element's id: a guest rings it with `DOORBELL = ELEMENT_PEER << 16`.
pub const ELEMENT_PEER: u16 = 0;
/// Where the payload starts in a window (after the page of request and answer
/// words).
pub const WINDOW_PAYLOAD: usize = proto::CTRL_BYTES;

/// A VM's window on a table, from [`Element::attach_guest`](super::Element::attach_guest):
/// give its QEMU `-chardev socket,id=ID,path=SOCKET -device
/// ivshmem-doorbell,chardev=ID,vectors=1`.
///
/// Window layout (little-endian 64-bit words): request `seq` at 0, `op` at 8,
/// `entry` at 16, `timeout_ms` at 24; answer `seq` at 64, `status` at 72,
/// `value` at 80; the payload at [`WINDOW_PAYLOAD`]. A guest fills the
/// request, bumps its `seq`, rings the doorbell and waits for the answer's
/// `seq` to match (or for the interrupt). Ops: 1 request write access
/// (answer 1 granted, value: the entry's version; 3 held, value: the
/// holder), 4 commit the payload into the held entry (7 committed, value:
/// the new version), 2 release (2 released), 5 write once: grant, commit and
/// release in one doorbell (7 committed, or 3 held). Other answers: 4 no such
/// entry, 5 not held, 6 failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestWindow {
    /// The guest's device id at the element (in the BRT and the audit once
    /// its QEMU connects).
    pub device: DeviceId,
    /// The socket its QEMU connects to (removed once it has).
    pub socket: PathBuf,
    /// Bytes of the window (a power of two: it is a BAR).
    pub window_bytes: usize,
}

/// A window whose QEMU has not connected yet.
pub(crate) struct Pending {
    pub(super) listener: UnixListener,
    pub(super) socket: PathBuf,
    name: String,
    memfd: OwnedFd,
    ctrl: Ctrl,
    doorbell: OwnedFd,
    irq: OwnedFd,
}

pub(super) fn create(shared: &Shared, socket: &Path, name: &str) -> Result<GuestWindow, Error> {
    let page = sys::page_size();
    let payload = (shared.layout.entry_size() as usize).div_ceil(page) * page;
    let bytes = (WINDOW_PAYLOAD + payload).next_power_of_two();
    let memfd =
        sys::sealed_memfd(c"vinfra-shm-window", bytes).map_err(Error::io("window memfd"))?;
    let map = Mapping::shared(memfd.as_fd(), bytes).map_err(Error::io("mapping the window"))?;
    let ctrl = Ctrl::from_mapping(map);
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::Io {
                what: "removing an old window socket",
                source: e,
            })
        }
    }
    let listener = UnixListener::bind(socket).map_err(Error::io("binding the window socket"))?;
    listener
        .set_nonblocking(true)
        .map_err(Error::io("window socket"))?;
    let doorbell = sys::eventfd().map_err(Error::io("eventfd"))?;
    let irq = sys::eventfd().map_err(Error::io("eventfd"))?;
    let mut st = lock(shared);
    let device = st.next_device;
    st.next_device += 1;
    shared
        .epoll
        .add(listener.as_raw_fd(), token(device, KIND_GUEST))
        .map_err(Error::io("epoll"))?;
    st.pending.insert(
        device,
        Pending {
            listener,
            socket: socket.to_owned(),
            name: name.to_owned(),
            memfd,
            ctrl,
            doorbell,
            irq,
        },
    );
    Ok(GuestWindow {
        device,
        socket: socket.to_owned(),
        window_bytes: bytes,
    })
}

/// QEMU connected to a window socket: hand it the window and the eventfds and
/// make the guest a device.
pub(super) fn accept(shared: &Shared, device: DeviceId) {
    let mut st = lock(shared);
    let sock = match st.pending.get(&device).map(|p| p.listener.accept()) {
        None => return,
        Some(Ok((sock, _))) => sock,
        Some(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => return,
        Some(Err(e)) => {
            tracing::error!(device, error = %e, "accept on a window socket");
            return;
        }
    };
    let Some(p) = st.pending.remove(&device) else {
        return;
    };
    // One QEMU per window: nobody else may connect.
    shared.epoll.delete(p.listener.as_raw_fd());
    let _ = std::fs::remove_file(&p.socket);
    let (pid, pidfd) = match handshake(&sock, &p) {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(device, guest = %p.name, error = %e, "guest window handshake failed");
            return;
        }
    };
    let added = [
        (sock.as_raw_fd(), KIND_SOCK),
        (pidfd.as_raw_fd(), KIND_PIDFD),
    ]
    .iter()
    .try_for_each(|(fd, kind)| shared.epoll.add(*fd, token(device, *kind)))
    .and_then(|()| {
        shared
            .epoll
            .add_eventfd(p.doorbell.as_raw_fd(), token(device, KIND_REQ))
    });
    if let Err(e) = added {
        for fd in [sock.as_raw_fd(), pidfd.as_raw_fd(), p.doorbell.as_raw_fd()] {
            shared.epoll.delete(fd);
        }
        tracing::error!(device, error = %e, "epoll: guest not attached");
        return;
    }
    st.devices.insert(
        device,
        Dev {
            pid,
            sock,
            uffd: None,
            base: 0,
            guest: Some(p.name.clone()),
            pidfd,
            ctrl: p.ctrl,
            efd_req: p.doorbell,
            efd_resp: p.irq,
            last_req: 0,
            last_rel: 0,
            held: Default::default(),
        },
    );
    st.record(device, None, 0, AuditKind::Attached);
    tracing::debug!(device, pid, guest = %p.name, "guest attached");
    // `p.memfd` closes here: QEMU has its own descriptor and mapping.
}

/// The ivshmem server's side of a connection; the peer's pid and pidfd.
fn handshake(sock: &UnixStream, p: &Pending) -> Result<(i32, OwnedFd), Error> {
    sock.set_nonblocking(false)
        .map_err(Error::io("window socket"))?;
    let pid = sys::peer_pid(sock.as_fd()).map_err(Error::io("SO_PEERCRED"))?;
    let pidfd = sys::pidfd_open(pid).map_err(Error::io("pidfd_open"))?;
    let msg = |n: i64, fd: Option<std::os::fd::BorrowedFd<'_>>| {
        let fds: Vec<_> = fd.into_iter().collect();
        sys::send_with_fds(sock.as_fd(), &n.to_le_bytes(), &fds)
            .map_err(Error::io("ivshmem server message"))
    };
    msg(0, None)?; // protocol version
    msg(i64::from(GUEST_PEER), None)?;
    msg(-1, Some(p.memfd.as_fd()))?;
    // The element as peer 0 with one vector: the guest's doorbell.
    msg(i64::from(ELEMENT_PEER), Some(p.doorbell.as_fd()))?;
    // The guest's own vector 0: the element's answer interrupt.
    msg(i64::from(GUEST_PEER), Some(p.irq.as_fd()))?;
    Ok((pid, pidfd))
}
