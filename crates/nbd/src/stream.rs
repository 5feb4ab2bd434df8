//! A connected socket, TCP, unix or TLS over TCP (after `NBD_OPT_STARTTLS`), behind
//! one type.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{ClientConnection, ServerConnection, StreamOwned};

#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    TlsServer(Box<StreamOwned<ServerConnection, TcpStream>>),
    TlsClient(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    /// The TCP socket under a TCP or TLS stream.
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
            Stream::TlsServer(s) => Some(&s.sock),
            Stream::TlsClient(s) => Some(&s.sock),
            Stream::Unix(_) => None,
        }
    }

    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Stream::TlsServer(_) | Stream::TlsClient(_))
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match (self, self.tcp()) {
            (_, Some(s)) => s.set_read_timeout(t),
            (Stream::Unix(s), None) => s.set_read_timeout(t),
            _ => Ok(()),
        }
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match (self, self.tcp()) {
            (_, Some(s)) => s.set_write_timeout(t),
            (Stream::Unix(s), None) => s.set_write_timeout(t),
            _ => Ok(()),
        }
    }

    pub(crate) fn shutdown(&self) {
        let _ = match (self, self.tcp()) {
            (_, Some(s)) => s.shutdown(Shutdown::Both),
            (Stream::Unix(s), None) => s.shutdown(Shutdown::Both),
            _ => Ok(()),
        };
    }

    /// A second handle on the socket (for shutdown, or a writer thread). A TLS
    /// session has one state and cannot be cloned: only its socket can, for shutdown.
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::TlsServer(_) | Stream::TlsClient(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "a TLS stream cannot be split",
                ))
            }
        })
    }

    /// Small requests and replies must not wait for Nagle's algorithm.
    pub(crate) fn set_nodelay(&self) {
        if let Some(s) = self.tcp() {
            let _ = s.set_nodelay(true);
        }
    }

    pub(crate) fn peer(&self) -> String {
        match self.tcp() {
            Some(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp peer".into()),
            None => "unix peer".into(),
        }
    }

    /// Runs a TLS handshake as the server over this TCP stream (after the ACK of
    /// `NBD_OPT_STARTTLS`), finishing by `deadline`.
    pub(crate) fn start_tls_server(
        &mut self,
        cfg: Arc<rustls::ServerConfig>,
        deadline: Instant,
    ) -> io::Result<()> {
        let conn = ServerConnection::new(cfg).map_err(io::Error::other)?;
        let tls = StreamOwned::new(conn, self.tcp_for_tls()?);
        *self = Stream::TlsServer(Box::new(tls));
        self.finish_handshake(deadline)
    }

    /// Runs a TLS handshake as the client, verifying the server as `name`.
    pub(crate) fn start_tls_client(
        &mut self,
        cfg: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
        deadline: Instant,
    ) -> io::Result<()> {
        let conn = ClientConnection::new(cfg, name).map_err(io::Error::other)?;
        let tls = StreamOwned::new(conn, self.tcp_for_tls()?);
        *self = Stream::TlsClient(Box::new(tls));
        self.finish_handshake(deadline)
    }

    fn tcp_for_tls(&self) -> io::Result<TcpStream> {
        match self {
            // The clone shares the socket; the old handle closes when replaced.
            Stream::Tcp(s) => s.try_clone(),
            Stream::Unix(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "TLS over a unix socket",
            )),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TLS is already on",
            )),
        }
    }

    fn finish_handshake(&mut self, deadline: Instant) -> io::Result<()> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.set_read_timeout(Some(left))?;
            self.set_write_timeout(Some(left))?;
            let done = match self {
                Stream::TlsServer(t) => handshake_step(&mut t.conn, &mut t.sock)?,
                Stream::TlsClient(t) => handshake_step(&mut t.conn, &mut t.sock)?,
                _ => true,
            };
            if done {
                return Ok(());
            }
        }
    }

    /// `read_exact` that gives up at `deadline` however slowly bytes trickle in.
    pub(crate) fn read_exact_by(
        &mut self,
        mut buf: &mut [u8],
        deadline: Instant,
    ) -> io::Result<()> {
        while !buf.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.set_read_timeout(Some(left))?;
            match self.read(buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::TlsServer(s) => s.read(buf),
            Stream::TlsClient(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::TlsServer(s) => s.write(buf),
            Stream::TlsClient(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::TlsServer(s) => s.write_vectored(bufs),
            Stream::TlsClient(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // Plain sockets have no buffer; rustls must be told to send what it holds.
        match self {
            Stream::TlsServer(s) => s.flush(),
            Stream::TlsClient(s) => s.flush(),
            _ => Ok(()),
        }
    }
}

/// One round of a TLS handshake on either side; `true` once it is complete.
fn handshake_step<C, D>(conn: &mut C, sock: &mut TcpStream) -> io::Result<bool>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
{
    if conn.is_handshaking() {
        conn.complete_io(sock)?;
    }
    Ok(!conn.is_handshaking())
}

/// Writes all of `a` then `b` with as few system calls as possible (one `writev`
/// in the common case).
pub(crate) fn write_all2(s: &mut Stream, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() {
        let n = match s.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n >= a.len() {
            b = &b[n - a.len()..];
            a = &[];
        } else {
            a = &a[n..];
        }
    }
    s.write_all(b)
}
