//! Helpers: fixtures, real-binary runners, a raw protocol speaker for hostile tests.

use nbd::proto::Command as NbdCommand;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd::proto::*;
use nbd::{FileDevice, NbdAddr, ServeConfig, ServerHandle};

/// Fails naming the setup script when a real client is not installed.
pub fn require(bin: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false);
    assert!(found, "{bin} not found on PATH: run scripts/setup.sh (it installs qemu-utils, nbdkit, libnbd-bin, fio)");
}

/// Deterministic pseudo-random bytes (xorshift64*): no extra dependency.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A fully allocated file of random data.
pub fn random_file(dir: &Path, name: &str, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let path = dir.join(name);
    let data = random_bytes(len, seed);
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

pub fn tcp_any() -> NbdAddr {
    NbdAddr::Tcp("127.0.0.1:0".parse().unwrap())
}

/// Our server exporting `path` as `name` on a free TCP port.
pub fn serve_file(path: &Path, name: &str, read_only: bool) -> ServerHandle {
    let dev = FileDevice::open(path, read_only).unwrap();
    nbd::serve(ServeConfig::new(tcp_any()).export(name, Arc::new(dev))).unwrap()
}

pub fn tcp_addr(h: &ServerHandle) -> SocketAddr {
    match h.local_addr() {
        NbdAddr::Tcp(a) => a,
        NbdAddr::Unix(_) => panic!("not tcp"),
    }
}

/// A port that was free a moment ago (for servers we do not control).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a command to completion, killing it after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{desc} timed out after {timeout:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// Runs a command and asserts success, returning stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{desc} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A child process killed when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a server process and waits until `port` accepts connections.
pub fn spawn_server(cmd: &mut Command, port: u16) -> ChildGuard {
    let desc = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard(child);
    let up = wait_for(Duration::from_secs(10), || {
        if let Ok(Some(status)) = guard.0.try_wait() {
            panic!("{desc} exited early: {status}");
        }
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "{desc} did not start listening on port {port}");
    guard
}

// ---------------------------------------------------------------------------
// Raw protocol speaker

pub fn raw_connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads the greeting and sends fixed-newstyle + no-zeroes client flags.
pub fn raw_greet(s: &mut TcpStream) {
    let mut g = [0u8; HANDSHAKE_LEN];
    s.read_exact(&mut g).unwrap();
    assert_eq!(
        parse_handshake(&g).unwrap(),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
}

/// Negotiates `export` with NBD_OPT_EXPORT_NAME; returns (size, flags).
pub fn raw_negotiate(s: &mut TcpStream, export: &str) -> (u64, u16) {
    raw_greet(s);
    let hdr = OptionHeader {
        option: OPT_EXPORT_NAME,
        length: export.len() as u32,
    };
    s.write_all(&hdr.encode()).unwrap();
    s.write_all(export.as_bytes()).unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    (
        u64::from_be_bytes(r[0..8].try_into().unwrap()),
        u16::from_be_bytes([r[8], r[9]]),
    )
}

pub fn raw_request(
    s: &mut TcpStream,
    command: NbdCommand,
    flags: u16,
    handle: u64,
    offset: u64,
    length: u32,
) {
    s.write_all(
        &Request {
            flags,
            command,
            handle,
            offset,
            length,
        }
        .encode(),
    )
    .unwrap();
}

/// Reads a simple reply; returns (error, handle).
pub fn raw_reply(s: &mut TcpStream) -> (u32, u64) {
    let mut h = [0u8; SIMPLE_REPLY_LEN];
    s.read_exact(&mut h).unwrap();
    let r = SimpleReply::parse(&h).unwrap();
    (r.error, r.handle)
}

/// Reads an option reply; returns (header, data).
pub fn raw_option_reply(s: &mut TcpStream) -> (OptionReplyHeader, Vec<u8>) {
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let hdr = OptionReplyHeader::parse(&h).unwrap();
    let mut d = vec![0u8; hdr.length as usize];
    s.read_exact(&mut d).unwrap();
    (hdr, d)
}

/// Asserts the server closes the connection (EOF or reset, not a timeout),
/// discarding anything it still sends first.
pub fn assert_closed(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("expected the server to close the connection, got {e}"),
        }
    }
}
