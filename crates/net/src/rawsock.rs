//! AF_PACKET raw sockets bound to one interface, opened inside a named network namespace when
//! asked. Plain non-blocking `recvfrom`/`send`: no PACKET_RX_RING, whose mmap would need far
//! more `unsafe` than the one block below.
//!
//! Namespaces: a packet socket belongs to the namespace of the thread that created it and keeps
//! it for life. So [`RawPort::open`] creates the socket on a short-lived thread that first
//! `setns`es into `/run/netns/NAME`; the switch's own thread never changes namespace, and its
//! TCP connection to the controller on 127.0.0.1 stays in the caller's namespace.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::socket::{
    self, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrLike,
};

/// A port could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum RawPortError {
    /// `/run/netns/NAME` could not be opened or entered.
    #[error("cannot enter network namespace {netns}")]
    Netns {
        /// Namespace name.
        netns: String,
        /// Cause.
        #[source]
        err: std::io::Error,
    },
    /// No such interface in that namespace.
    #[error("no interface {ifname}")]
    NoInterface {
        /// Interface name.
        ifname: String,
        /// Cause.
        #[source]
        err: Errno,
    },
    /// socket/bind failed (needs CAP_NET_RAW).
    #[error("cannot open packet socket on {ifname}")]
    Socket {
        /// Interface name.
        ifname: String,
        /// Cause.
        #[source]
        err: Errno,
    },
    /// The opening thread panicked or could not be spawned.
    #[error("namespace helper thread failed")]
    Thread,
}

/// A packet socket bound to one interface.
#[derive(Debug)]
pub struct RawPort {
    fd: OwnedFd,
    ifname: String,
    ifindex: u32,
}

/// What [`RawPort::recv`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recv {
    /// A frame arriving on the interface, of this length (truncated frames report the full length).
    Frame(usize),
    /// A frame this host sent out of the interface (the socket sees both directions): ignore.
    Outgoing,
    /// Nothing queued.
    Empty,
}

impl RawPort {
    /// Opens a non-blocking packet socket on `ifname`, inside `netns` when given.
    pub fn open(netns: Option<&str>, ifname: &str) -> Result<RawPort, RawPortError> {
        let Some(ns) = netns else {
            return Self::open_here(ifname);
        };
        let (ns, ifname) = (ns.to_owned(), ifname.to_owned());
        std::thread::Builder::new()
            .name("netns-open".into())
            .spawn(move || {
                let f =
                    File::open(format!("/run/netns/{ns}")).map_err(|err| RawPortError::Netns {
                        netns: ns.clone(),
                        err,
                    })?;
                nix::sched::setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    RawPortError::Netns {
                        netns: ns.clone(),
                        err: e.into(),
                    }
                })?;
                Self::open_here(&ifname)
            })
            .map_err(|_| RawPortError::Thread)?
            .join()
            .map_err(|_| RawPortError::Thread)?
    }

    fn open_here(ifname: &str) -> Result<RawPort, RawPortError> {
        let ifindex =
            nix::net::if_::if_nametoindex(ifname).map_err(|err| RawPortError::NoInterface {
                ifname: ifname.to_owned(),
                err,
            })?;
        let sock_err = |err| RawPortError::Socket {
            ifname: ifname.to_owned(),
            err,
        };
        let fd = socket::socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthAll,
        )
        .map_err(sock_err)?;
        let sll = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: (libc::ETH_P_ALL as u16).to_be(),
            sll_ifindex: i32::try_from(ifindex).map_err(|_| sock_err(Errno::EINVAL))?,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `sll` is a fully initialised sockaddr_ll living on this stack frame for the
        // whole call, and `len` is exactly its size; from_raw only copies it.
        let addr = unsafe { LinkAddr::from_raw((&raw const sll).cast(), Some(len)) }
            .ok_or_else(|| sock_err(Errno::EINVAL))?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(sock_err)?;
        // A deeper receive queue absorbs bursts while the switch thread is reporting.
        let _ = socket::setsockopt(&fd, socket::sockopt::RcvBuf, &(4 << 20));
        Ok(RawPort {
            fd,
            ifname: ifname.to_owned(),
            ifindex,
        })
    }

    /// Interface name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Interface index (in its namespace).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Receives one frame into `buf` without blocking.
    pub fn recv(&self, buf: &mut [u8]) -> Result<Recv, Errno> {
        match socket::recvfrom::<LinkAddr>(self.fd.as_raw_fd(), buf) {
            Ok((n, addr)) => {
                if addr.is_some_and(|a| a.pkttype() == libc::PACKET_OUTGOING) {
                    Ok(Recv::Outgoing)
                } else {
                    Ok(Recv::Frame(n))
                }
            }
            Err(Errno::EAGAIN) => Ok(Recv::Empty),
            Err(e) => Err(e),
        }
    }

    /// Sends one whole frame out of the interface.
    pub fn send(&self, frame: &[u8]) -> Result<(), Errno> {
        socket::send(self.fd.as_raw_fd(), frame, MsgFlags::empty()).map(|_| ())
    }

    /// For `poll`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
