//! Our client against our server: data path, read-only, concurrency,
//! reconnection and shutdown.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nbd::{
    ErrorCode, FileDevice, NbdAddr, NbdClient, NbdError, ReconnectPolicy, ReconnectingClient,
    ServeConfig,
};

use crate::util::*;

const MIB: usize = 1 << 20;

#[test]
fn read_write_trim_zero_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = random_file(dir.path(), "d.raw", 4 * MIB, 21);
    let server = serve_file(&path, "d", false);
    let mut c = NbdClient::connect(&server.local_addr(), "d").unwrap();
    assert_eq!(c.size(), data.len() as u64);
    let mut all = vec![0u8; data.len()];
    c.read_at(&mut all, 0).unwrap();
    assert!(all == data);
    c.write_at(&[7u8; 8192], 4096).unwrap();
    c.write_zeroes(MIB as u64, 65536).unwrap();
    c.trim(2 * MIB as u64, 4096).unwrap();
    c.flush().unwrap();
    let mut b = vec![1u8; 8192];
    c.read_at(&mut b, MIB as u64).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    c.disconnect().unwrap();
    let f = std::fs::read(&path).unwrap();
    assert!(f[4096..12288].iter().all(|&x| x == 7));
    let s = server.stats("d").unwrap();
    assert_eq!(
        (s.writes, s.write_zeroes, s.trims, s.flushes),
        (1, 1, 1, 1),
        "{s:?}"
    );
    assert_eq!(s.bytes_written, 8192);
    assert!(
        s.reads >= 1 && s.bytes_read >= data.len() as u64 + 8192,
        "{s:?}"
    );
    assert_eq!(s.connections_total, 1);
    assert!(wait_for(Duration::from_secs(2), || server
        .stats("d")
        .unwrap()
        .connections_active
        == 0));
    assert!(server.stats("nope").is_none());
}

#[test]
fn large_requests_are_split_by_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = random_file(dir.path(), "big.raw", 40 * MIB, 22);
    let server = serve_file(&path, "", false);
    let mut c = NbdClient::connect(&server.local_addr(), "").unwrap();
    let mut all = vec![0u8; data.len()];
    c.read_at(&mut all, 0).unwrap();
    assert!(all == data);
    let w = random_bytes(33 * MIB, 5);
    c.write_at(&w, 1).unwrap();
    let mut r = vec![0u8; w.len()];
    c.read_at(&mut r, 1).unwrap();
    assert!(r == w);
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = random_file(dir.path(), "ro.raw", MIB, 23);
    let server = serve_file(&path, "ro", true);
    let mut c = NbdClient::connect(&server.local_addr(), "ro").unwrap();
    assert!(c.read_only());
    assert!(matches!(c.write_at(&[1], 0), Err(NbdError::ReadOnly)));
    // The server refuses too, and keeps the connection: raw write with payload.
    let mut s = raw_connect(tcp_addr(&server));
    raw_negotiate(&mut s, "ro");
    raw_request(&mut s, nbd::proto::Command::Write, 0, 1, 0, 4);
    std::io::Write::write_all(&mut s, &[1, 2, 3, 4]).unwrap();
    assert_eq!(raw_reply(&mut s), (ErrorCode::Perm.to_wire(), 1));
    raw_request(&mut s, nbd::proto::Command::Flush, 0, 2, 0, 0);
    assert_eq!(raw_reply(&mut s), (0, 2));
}

#[test]
fn unknown_export_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = random_file(dir.path(), "x.raw", MIB, 24);
    let server = serve_file(&path, "x", false);
    let err = NbdClient::connect(&server.local_addr(), "y").unwrap_err();
    assert!(matches!(err, NbdError::ExportNotFound { .. }), "{err:?}");
    // Exports can be added while running.
    server.add_export("y", Arc::new(FileDevice::open(&path, true).unwrap()));
    assert!(NbdClient::connect(&server.local_addr(), "y")
        .unwrap()
        .read_only());
    assert!(server.remove_export("y"));
    assert_eq!(server.exports(), vec!["x".to_string()]);
}

#[test]
fn many_concurrent_clients_read_correct_data() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = random_file(dir.path(), "c.raw", 8 * MIB, 25);
    let data = Arc::new(data);
    let server = serve_file(&path, "", true);
    let addr = server.local_addr();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let addr = addr.clone();
            let data = data.clone();
            thread::spawn(move || {
                let mut c = NbdClient::connect(&addr, "").unwrap();
                let mut x = t + 1;
                let mut buf = vec![0u8; 65536];
                for _ in 0..200 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let len = 512 + (x >> 40) as usize % 60000;
                    let off = (x >> 20) as usize % (data.len() - len);
                    c.read_at(&mut buf[..len], off as u64).unwrap();
                    assert!(
                        buf[..len] == data[off..off + len],
                        "thread {t} offset {off}"
                    );
                }
                c.disconnect().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = server.stats("").unwrap();
    assert_eq!(s.reads, 1600);
    assert_eq!(s.connections_total, 8);
}

#[test]
fn reconnecting_client_rides_through_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = random_file(dir.path(), "r.raw", MIB, 26);
    let server = serve_file(&path, "r", false);
    let addr = server.local_addr();
    let policy = ReconnectPolicy {
        deadline: Duration::from_secs(10),
        ..ReconnectPolicy::default()
    };
    let mut c = ReconnectingClient::connect(addr.clone(), "r", policy).unwrap();
    let mut b = vec![0u8; 4096];
    c.read_at(&mut b, 0).unwrap();
    assert_eq!(b[..], data[..4096]);

    server.shutdown();
    drop(server);
    let restart_path = path.clone();
    let restarted = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        let dev = FileDevice::open(&restart_path, false).unwrap();
        nbd::serve(ServeConfig::new(addr).export("r", Arc::new(dev))).unwrap()
    });
    let t = Instant::now();
    c.read_at(&mut b, 8192).unwrap();
    assert_eq!(b[..], data[8192..12288]);
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "read cannot have succeeded before the restart"
    );
    assert_eq!(c.reconnects(), 1);
    c.write_at(&[9u8; 100], 0).unwrap();
    let server2 = restarted.join().unwrap();
    assert_eq!(server2.stats("r").unwrap().writes, 1);

    // A refused request is not retried.
    let mut past = [0u8; 10];
    assert!(matches!(
        c.read_at(&mut past, MIB as u64),
        Err(NbdError::OutOfRange { .. })
    ));
}

#[test]
fn reconnecting_client_gives_up_at_the_deadline() {
    let addr = NbdAddr::Tcp(format!("127.0.0.1:{}", free_port()).parse().unwrap());
    let policy = ReconnectPolicy {
        deadline: Duration::from_millis(300),
        ..ReconnectPolicy::default()
    };
    let t = Instant::now();
    let err = ReconnectingClient::connect(addr, "", policy).unwrap_err();
    assert!(err.is_connection_error(), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn shutdown_closes_idle_and_busy_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = random_file(dir.path(), "s.raw", MIB, 27);
    let server = serve_file(&path, "", false);
    let addr = server.local_addr();
    let mut idle = NbdClient::connect(&addr, "").unwrap();
    let mut half = raw_connect(tcp_addr(&server)); // stuck in negotiation
    raw_greet(&mut half);
    assert!(wait_for(Duration::from_secs(2), || server.connections() == 2));
    let t = Instant::now();
    server.shutdown();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        t.elapsed()
    );
    assert_eq!(server.connections(), 0);
    let mut b = [0u8; 512];
    assert!(idle.read_at(&mut b, 0).is_err());
    assert_closed(&mut half);
    assert!(NbdClient::connect(&addr, "").is_err());
    server.shutdown(); // idempotent
}

#[test]
fn unix_socket_export() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = random_file(dir.path(), "u.raw", MIB, 28);
    let sock = dir.path().join("s.sock");
    // A stale socket file from a crashed server is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let dev = FileDevice::open(&path, false).unwrap();
    let _server =
        nbd::serve(ServeConfig::new(NbdAddr::Unix(sock.clone())).export("u", Arc::new(dev)))
            .unwrap();
    let mut c =
        NbdClient::connect_uri(&format!("nbd+unix:///u?socket={}", sock.display())).unwrap();
    let mut b = vec![0u8; 4096];
    c.read_at(&mut b, 4096).unwrap();
    assert_eq!(b[..], data[4096..8192]);
}
