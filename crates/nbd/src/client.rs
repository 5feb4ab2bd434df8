//! Blocking NBD client: [`NbdClient`] (one connection, one request at a time) and
//! [`ReconnectingClient`] (rides through a server restart).
//!
//! Negotiation is fixed newstyle with `NBD_OPT_GO` (falling back to
//! `NBD_OPT_EXPORT_NAME` when the server answers `NBD_REP_ERR_UNSUP`). The
//! client asks for no structured replies and no block-size constraints, so
//! every server must accept any offset and length from it; requests larger than
//! the server's advertised maximum (32 MiB by default) are split.
//! Works against our server, `qemu-nbd` and `nbdkit` (see the integration tests).
//!
//! Timeouts: connecting 10 s, each socket read or write 30 s
//! ([`ClientOptions`]); a timed-out connection is unusable and returns
//! [`NbdError::Io`].

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::proto::{self, *};
use crate::stream::{write_all2, Stream};
use crate::NbdError;

/// Default NBD TCP port (IANA).
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdAddr {
    /// TCP.
    Tcp(SocketAddr),
    /// Unix domain socket path.
    Unix(PathBuf),
}

impl fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddr::Tcp(a) => write!(f, "{a}"),
            NbdAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// An NBD URI: `nbd://HOST[:PORT][/EXPORT]` or `nbd+unix:///EXPORT?socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// The server.
    pub addr: NbdAddr,
    /// The export name ("" when the URI has no path).
    pub export: String,
}

impl FromStr for NbdUri {
    type Err = NbdError;

    fn from_str(uri: &str) -> Result<NbdUri, NbdError> {
        let bad = |reason| NbdError::BadUri {
            uri: uri.to_owned(),
            reason,
        };
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path_part, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("missing ?socket="))?;
            if !path_part.is_empty() && !path_part.starts_with('/') {
                return Err(bad("nbd+unix URIs take no host"));
            }
            let export = percent_decode(path_part.strip_prefix('/').unwrap_or(path_part))
                .ok_or_else(|| bad("bad escape"))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| bad("missing socket= parameter"))?;
            let socket = percent_decode(socket).ok_or_else(|| bad("bad escape"))?;
            if socket.is_empty() {
                return Err(bad("empty socket path"));
            }
            return Ok(NbdUri {
                addr: NbdAddr::Unix(PathBuf::from(socket)),
                export,
            });
        }
        let rest = uri
            .strip_prefix("nbd://")
            .ok_or_else(|| bad("scheme must be nbd:// or nbd+unix://"))?;
        let rest = rest.split_once('?').map_or(rest, |(a, _)| a);
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).ok_or_else(|| bad("bad escape"))?;
        if authority.is_empty() {
            return Err(bad("missing host"));
        }
        // [v6]:port, host:port or host.
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None if after.is_empty() => DEFAULT_PORT,
                None => return Err(bad("junk after ]")),
            };
            (h, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| bad("bad port"))?),
                None => (authority, DEFAULT_PORT),
            }
        };
        let sa = (host, port)
            .to_socket_addrs()
            .map_err(|_| bad("cannot resolve host"))?
            .next()
            .ok_or_else(|| bad("host has no address"))?;
        Ok(NbdUri {
            addr: NbdAddr::Tcp(sa),
            export,
        })
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export);
        match &self.addr {
            NbdAddr::Tcp(sa) => write!(f, "nbd://{sa}/{export}"),
            NbdAddr::Unix(p) => write!(
                f,
                "nbd+unix:///{export}?socket={}",
                percent_encode(&p.to_string_lossy())
            ),
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~/".contains(&c) {
            out.push(char::from(c));
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

/// Client timeouts.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// Limit on TCP connect and on the whole negotiation.
    pub connect_timeout: Duration,
    /// Limit on each blocking socket read or write during transmission.
    pub io_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// TLS for a client: `NBD_OPT_STARTTLS` first, then everything else inside TLS.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// Trust (and the client certificate to present, if any).
    pub config: Arc<rustls::ClientConfig>,
    /// The name the server's certificate must carry (a host name or IP address).
    pub server_name: String,
}

/// A blocking NBD client on one connection. Not shareable: each thread that
/// fetches in parallel opens its own (servers advertising multi-conn allow it).
#[derive(Debug)]
pub struct NbdClient {
    stream: Stream,
    peer: String,
    size: u64,
    flags: u16,
    max_request: u32,
    next_handle: u64,
    /// Reused request buffer (header + small write payload).
    wbuf: Vec<u8>,
}

/// Write payloads up to this size are copied behind the header and sent with
/// one `write`; larger ones go out with `writev`.
const COALESCE_LIMIT: usize = 64 << 10;

impl NbdClient {
    /// Connects to `addr` and enters transmission on `export`, with default timeouts.
    pub fn connect(addr: &NbdAddr, export: &str) -> Result<NbdClient, NbdError> {
        NbdClient::connect_with(addr, export, ClientOptions::default())
    }

    /// Connects to the server and export named by an `nbd://` / `nbd+unix://` URI.
    pub fn connect_uri(uri: &str) -> Result<NbdClient, NbdError> {
        let uri: NbdUri = uri.parse()?;
        NbdClient::connect(&uri.addr, &uri.export)
    }

    /// Connects with explicit timeouts.
    pub fn connect_with(
        addr: &NbdAddr,
        export: &str,
        opts: ClientOptions,
    ) -> Result<NbdClient, NbdError> {
        NbdClient::connect_tls(addr, export, opts, None)
    }

    /// Connects, over TLS when `tls` is given (the server must offer
    /// `NBD_OPT_STARTTLS`; a server that refuses it is an error, never a fallback to
    /// clear text).
    pub fn connect_tls(
        addr: &NbdAddr,
        export: &str,
        opts: ClientOptions,
        tls: Option<&ClientTls>,
    ) -> Result<NbdClient, NbdError> {
        let peer = addr.to_string();
        let conn_err = |err| NbdError::Connect {
            addr: peer.clone(),
            err,
        };
        let stream = match addr {
            NbdAddr::Tcp(sa) => {
                let s = TcpStream::connect_timeout(sa, opts.connect_timeout).map_err(conn_err)?;
                Stream::Tcp(s)
            }
            NbdAddr::Unix(p) => Stream::Unix(UnixStream::connect(p).map_err(conn_err)?),
        };
        stream.set_nodelay();
        let mut c = NbdClient {
            stream,
            peer,
            size: 0,
            flags: 0,
            max_request: server_max_default(),
            next_handle: 1,
            wbuf: Vec::with_capacity(REQUEST_LEN + COALESCE_LIMIT),
        };
        let deadline = Instant::now() + opts.connect_timeout;
        c.stream
            .set_write_timeout(Some(opts.connect_timeout))
            .map_err(|e| c.io_err(e))?;
        c.negotiate(export, tls, deadline)?;
        c.stream
            .set_read_timeout(Some(opts.io_timeout))
            .map_err(|e| c.io_err(e))?;
        c.stream
            .set_write_timeout(Some(opts.io_timeout))
            .map_err(|e| c.io_err(e))?;
        Ok(c)
    }

    fn io_err(&self, err: io::Error) -> NbdError {
        NbdError::Io {
            peer: self.peer.clone(),
            err,
        }
    }

    fn proto_err(&self, err: ProtoError) -> NbdError {
        NbdError::Protocol {
            peer: self.peer.clone(),
            err,
        }
    }

    fn read_by(&mut self, buf: &mut [u8], deadline: Instant) -> Result<(), NbdError> {
        self.stream
            .read_exact_by(buf, deadline)
            .map_err(|e| self.io_err(e))
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::Unsupported("option data over 4 GiB"))?;
        let mut msg = OptionHeader {
            option,
            length: len,
        }
        .encode()
        .to_vec();
        msg.extend_from_slice(data);
        self.stream.write_all(&msg).map_err(|e| self.io_err(e))
    }

    fn read_option_reply(
        &mut self,
        deadline: Instant,
    ) -> Result<(OptionReplyHeader, Vec<u8>), NbdError> {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.read_by(&mut h, deadline)?;
        let hdr = OptionReplyHeader::parse(&h).map_err(|e| self.proto_err(e))?;
        // Bound what a hostile server can make us allocate.
        if hdr.length > 1 << 20 {
            return Err(self.proto_err(ProtoError::BadLength {
                what: "option reply",
            }));
        }
        let mut data = vec![0u8; len_usize(hdr.length)];
        self.read_by(&mut data, deadline)?;
        Ok((hdr, data))
    }

    fn negotiate(
        &mut self,
        export: &str,
        tls: Option<&ClientTls>,
        deadline: Instant,
    ) -> Result<(), NbdError> {
        let mut g = [0u8; HANDSHAKE_LEN];
        self.read_by(&mut g, deadline)?;
        let hflags = parse_handshake(&g).map_err(|e| self.proto_err(e))?;
        let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let mut cflags = 0u32;
        if fixed {
            cflags |= FLAG_C_FIXED_NEWSTYLE;
        }
        if no_zeroes {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.stream
            .write_all(&cflags.to_be_bytes())
            .map_err(|e| self.io_err(e))?;
        if export.len() > MAX_STRING_LEN {
            return Err(NbdError::Unsupported("export names over 4096 bytes"));
        }
        if let Some(t) = tls {
            if !fixed {
                return Err(NbdError::Unsupported(
                    "TLS with a non-fixed-newstyle server",
                ));
            }
            self.send_option(OPT_STARTTLS, &[])?;
            let (hdr, data) = self.read_option_reply(deadline)?;
            if hdr.option != OPT_STARTTLS || hdr.reply_type != REP_ACK {
                return Err(NbdError::OptionRefused {
                    peer: self.peer.clone(),
                    option: proto::option_name(OPT_STARTTLS),
                    reply: hdr.reply_type,
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            let name =
                rustls::pki_types::ServerName::try_from(t.server_name.clone()).map_err(|_| {
                    NbdError::Unsupported("a TLS server name that is not a DNS name or IP")
                })?;
            self.stream
                .start_tls_client(t.config.clone(), name, deadline)
                .map_err(|e| self.io_err(e))?;
        }
        if fixed {
            // No NBD_INFO_BLOCK_SIZE request: asking would oblige us to align every
            // request to the server's minimum. A maximum sent unasked is honoured.
            let req = InfoRequest {
                name: export.to_owned(),
                requests: vec![],
            };
            self.send_option(OPT_GO, &req.encode())?;
            let mut got_export = false;
            loop {
                let (hdr, data) = self.read_option_reply(deadline)?;
                if hdr.option != OPT_GO {
                    return Err(self.proto_err(ProtoError::Unexpected {
                        what: "option reply",
                        value: hdr.option.into(),
                    }));
                }
                match hdr.reply_type {
                    REP_INFO => match InfoReply::parse(&data).map_err(|e| self.proto_err(e))? {
                        InfoReply::Export { size, flags } => {
                            self.size = size;
                            self.flags = flags;
                            got_export = true;
                        }
                        InfoReply::BlockSize { max, .. } => {
                            if max >= 512 {
                                self.max_request = max.min(server_max_default());
                            }
                        }
                        InfoReply::Other(_) => {}
                    },
                    REP_ACK => {
                        if !got_export {
                            return Err(self.proto_err(ProtoError::Unexpected {
                                what: "GO without NBD_INFO_EXPORT",
                                value: 0,
                            }));
                        }
                        return Ok(());
                    }
                    REP_ERR_UNSUP => break, // old server: fall back to EXPORT_NAME
                    REP_ERR_UNKNOWN => {
                        return Err(NbdError::ExportNotFound {
                            name: export.to_owned(),
                            peer: self.peer.clone(),
                        })
                    }
                    t if hdr.is_error() => {
                        return Err(NbdError::OptionRefused {
                            peer: self.peer.clone(),
                            option: proto::option_name(OPT_GO),
                            reply: t,
                            message: String::from_utf8_lossy(&data).into_owned(),
                        })
                    }
                    _ => {} // unknown non-error reply: ignore, as the spec asks
                }
            }
        }
        self.send_option(OPT_EXPORT_NAME, export.as_bytes())?;
        let mut r = [0u8; 10];
        match self.stream.read_exact_by(&mut r, deadline) {
            Ok(()) => {}
            // A server closes the connection on an unknown EXPORT_NAME.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(NbdError::ExportNotFound {
                    name: export.to_owned(),
                    peer: self.peer.clone(),
                })
            }
            Err(e) => return Err(self.io_err(e)),
        }
        self.size = u64::from_be_bytes(r[0..8].try_into().unwrap_or([0; 8]));
        self.flags = u16::from_be_bytes([r[8], r[9]]);
        if !no_zeroes {
            let mut z = [0u8; 124];
            self.read_by(&mut z, deadline)?;
        }
        Ok(())
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags the server sent (`proto::FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// Whether the export refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }

    /// The server address, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(NbdError::OutOfRange {
                offset,
                length: len,
                size: self.size,
            }),
        }
    }

    fn send_request(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> Result<u64, NbdError> {
        let handle = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        let hdr = Request {
            flags,
            command,
            handle,
            offset,
            length,
        }
        .encode();
        let r = if data.len() <= COALESCE_LIMIT {
            self.wbuf.clear();
            self.wbuf.extend_from_slice(&hdr);
            self.wbuf.extend_from_slice(data);
            self.stream.write_all(&self.wbuf)
        } else {
            write_all2(&mut self.stream, &hdr, data)
        };
        r.map_err(|e| self.io_err(e))?;
        Ok(handle)
    }

    /// Reads a simple reply; `payload` (for reads) is filled only on success.
    fn recv_reply(&mut self, handle: u64, payload: &mut [u8]) -> Result<(), NbdError> {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.stream.read_exact(&mut h).map_err(|e| self.io_err(e))?;
        let reply = SimpleReply::parse(&h).map_err(|e| self.proto_err(e))?;
        if reply.handle != handle {
            return Err(self.proto_err(ProtoError::Unexpected {
                what: "reply handle",
                value: reply.handle,
            }));
        }
        if reply.error != 0 {
            return Err(NbdError::Request {
                peer: self.peer.clone(),
                code: ErrorCode::from_wire(reply.error),
            });
        }
        self.stream.read_exact(payload).map_err(|e| self.io_err(e))
    }

    /// Fills `buf` from the export at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), NbdError> {
        self.check_range(offset, buf.len() as u64)?;
        let max = len_usize(self.max_request);
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(max);
            let len = u32::try_from(n).map_err(|_| NbdError::Unsupported("request over 4 GiB"))?;
            let off = offset + done as u64;
            let handle = self.send_request(Command::Read, 0, off, len, &[])?;
            self.recv_reply(handle, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (not necessarily durable: see [`NbdClient::flush`]).
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> Result<(), NbdError> {
        self.write_at_flags(data, offset, 0)
    }

    /// Writes `data` at `offset` with FUA: durable when this returns.
    pub fn write_at_fua(&mut self, data: &[u8], offset: u64) -> Result<(), NbdError> {
        if self.flags & FLAG_SEND_FUA == 0 {
            self.write_at(data, offset)?;
            return self.flush();
        }
        self.write_at_flags(data, offset, CMD_FLAG_FUA)
    }

    fn write_at_flags(&mut self, data: &[u8], offset: u64, flags: u16) -> Result<(), NbdError> {
        if self.read_only() {
            return Err(NbdError::ReadOnly);
        }
        self.check_range(offset, data.len() as u64)?;
        let max = len_usize(self.max_request);
        for (i, chunk) in data.chunks(max).enumerate() {
            let len = u32::try_from(chunk.len())
                .map_err(|_| NbdError::Unsupported("request over 4 GiB"))?;
            let off = offset + (i * max) as u64;
            let handle = self.send_request(Command::Write, flags, off, len, chunk)?;
            self.recv_reply(handle, &mut [])?;
        }
        Ok(())
    }

    /// Makes completed writes durable (a no-op if the server has no flush).
    pub fn flush(&mut self) -> Result<(), NbdError> {
        if self.flags & FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        let handle = self.send_request(Command::Flush, 0, 0, 0, &[])?;
        self.recv_reply(handle, &mut [])
    }

    /// Tells the server the range is unused (a no-op if it has no trim).
    pub fn trim(&mut self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.ranged_command(Command::Trim, FLAG_SEND_TRIM, 0, offset, len)
    }

    /// Makes the range read as zeroes.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), NbdError> {
        if self.flags & FLAG_SEND_WRITE_ZEROES == 0 {
            return Err(NbdError::Unsupported("NBD_CMD_WRITE_ZEROES"));
        }
        self.ranged_command(Command::WriteZeroes, FLAG_SEND_WRITE_ZEROES, 0, offset, len)
    }

    fn ranged_command(
        &mut self,
        cmd: Command,
        needs: u16,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> Result<(), NbdError> {
        if self.flags & needs == 0 {
            return Ok(());
        }
        if self.read_only() {
            return Err(NbdError::ReadOnly);
        }
        self.check_range(offset, len)?;
        // Length is 32 bits on the wire: split, staying block aligned.
        const STEP: u64 = 1 << 30;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(STEP);
            let n32 = u32::try_from(n).map_err(|_| NbdError::Unsupported("request over 4 GiB"))?;
            let handle = self.send_request(cmd, flags, offset + done, n32, &[])?;
            self.recv_reply(handle, &mut [])?;
            done += n;
        }
        Ok(())
    }

    /// Ends the session cleanly (`NBD_CMD_DISC`).
    pub fn disconnect(mut self) -> Result<(), NbdError> {
        self.send_request(Command::Disc, 0, 0, 0, &[])?;
        self.stream.shutdown();
        Ok(())
    }
}

fn server_max_default() -> u32 {
    crate::server::MAX_REQUEST_LEN
}

/// Backoff and deadline for [`ReconnectingClient`], and TLS for every connection.
#[derive(Debug, Clone)]
pub struct ReconnectPolicy {
    /// First wait after a failure.
    pub initial_backoff: Duration,
    /// Longest wait between attempts (the wait doubles up to this).
    pub max_backoff: Duration,
    /// Give up when one request has been failing for this long.
    pub deadline: Duration,
    /// Timeouts of each connection.
    pub client: ClientOptions,
    /// TLS on every connection and reconnection (`None`: clear text).
    pub tls: Option<ClientTls>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(1),
            deadline: Duration::from_secs(30),
            client: ClientOptions::default(),
            tls: None,
        }
    }
}

/// An [`NbdClient`] that, when the connection fails (I/O or protocol error,
/// `ESHUTDOWN`), reconnects with exponential backoff and retries the request,
/// until [`ReconnectPolicy::deadline`] has passed since the request first failed.
/// Reads, writes, trims and flushes are idempotent, so a retry after a lost reply
/// is safe (a flush is retried too: it covers writes whose replies we got before
/// the failure only if the server persisted them, which a restarted server that
/// acknowledged them must have done or lost, exactly as after a crash).
/// A refused request (`EINVAL`, `EPERM`, …) is returned at once.
#[derive(Debug)]
pub struct ReconnectingClient {
    addr: NbdAddr,
    export: String,
    policy: ReconnectPolicy,
    client: Option<NbdClient>,
    size: u64,
    connected_once: bool,
    reconnects: u64,
}

impl ReconnectingClient {
    /// Connects (retrying under `policy` as well).
    pub fn connect(
        addr: NbdAddr,
        export: &str,
        policy: ReconnectPolicy,
    ) -> Result<ReconnectingClient, NbdError> {
        let mut c = ReconnectingClient {
            addr,
            export: export.to_owned(),
            policy,
            client: None,
            connected_once: false,
            size: 0,
            reconnects: 0,
        };
        c.with_retry(|_| Ok(()))?;
        Ok(c)
    }

    /// Export size (from the latest connection).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many times the connection was re-established.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    fn with_retry<T>(
        &mut self,
        mut op: impl FnMut(&mut NbdClient) -> Result<T, NbdError>,
    ) -> Result<T, NbdError> {
        let mut first_failure: Option<Instant> = None;
        let mut backoff = self.policy.initial_backoff;
        loop {
            let err = match self.client.as_mut() {
                Some(c) => match op(c) {
                    Ok(v) => return Ok(v),
                    Err(e) if e.is_connection_error() => {
                        tracing::debug!(peer = %self.addr, error = %e, "nbd connection lost; reconnecting");
                        self.client = None;
                        e
                    }
                    Err(e) => return Err(e),
                },
                None => match NbdClient::connect_tls(
                    &self.addr,
                    &self.export,
                    self.policy.client,
                    self.policy.tls.as_ref(),
                ) {
                    Ok(c) => {
                        if self.connected_once {
                            self.reconnects += 1;
                        }
                        self.connected_once = true;
                        self.size = c.size();
                        self.client = Some(c);
                        continue;
                    }
                    // A restarting server may listen before its exports are back.
                    Err(e)
                        if e.is_connection_error()
                            || matches!(e, NbdError::ExportNotFound { .. }) =>
                    {
                        e
                    }
                    Err(e) => return Err(e),
                },
            };
            let since = *first_failure.get_or_insert_with(Instant::now);
            if since.elapsed() + backoff > self.policy.deadline {
                return Err(err);
            }
            thread::sleep(backoff);
            backoff = (backoff * 2).min(self.policy.max_backoff);
        }
    }

    /// [`NbdClient::read_at`], retried across reconnects.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), NbdError> {
        self.with_retry(|c| c.read_at(buf, offset))
    }

    /// [`NbdClient::write_at`], retried across reconnects.
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> Result<(), NbdError> {
        self.with_retry(|c| c.write_at(data, offset))
    }

    /// [`NbdClient::flush`], retried across reconnects.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.with_retry(|c| c.flush())
    }

    /// [`NbdClient::trim`], retried across reconnects.
    pub fn trim(&mut self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.with_retry(|c| c.trim(offset, len))
    }

    /// Disconnects cleanly if connected.
    pub fn disconnect(mut self) -> Result<(), NbdError> {
        match self.client.take() {
            Some(c) => c.disconnect(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_tcp_uris() {
        let u: NbdUri = "nbd://127.0.0.1:10810/disk-1".parse().unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("127.0.0.1:10810".parse().unwrap()));
        assert_eq!(u.export, "disk-1");
        let u: NbdUri = "nbd://127.0.0.1".parse().unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("127.0.0.1:10809".parse().unwrap()));
        assert_eq!(u.export, "");
        let u: NbdUri = "nbd://[::1]:99/a%20b".parse().unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("[::1]:99".parse().unwrap()));
        assert_eq!(u.export, "a b");
        assert_eq!(u.to_string(), "nbd://[::1]:99/a%20b");
    }

    #[test]
    fn parse_unix_uris() {
        let u: NbdUri = "nbd+unix:///vm1?socket=/run/x.sock".parse().unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/run/x.sock".into()));
        assert_eq!(u.export, "vm1");
        assert_eq!(u.to_string(), "nbd+unix:///vm1?socket=/run/x.sock");
        let u: NbdUri = "nbd+unix://?socket=/s".parse().unwrap();
        assert_eq!(u.export, "");
    }

    #[test]
    fn bad_uris() {
        for s in [
            "http://x",
            "nbd://",
            "nbd://h:notaport/",
            "nbd+unix:///x",
            "nbd+unix:///x?socket=",
            "nbd://h/%zz",
        ] {
            assert!(s.parse::<NbdUri>().is_err(), "{s}");
        }
    }
}
