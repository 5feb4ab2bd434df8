//! `threads_per_connection > 1`: requests of one connection run concurrently.

use std::io::{self, Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nbd::proto::{Command as NbdCommand, Request, CMD_FLAG_FUA};
use nbd::{BlockDevice, FileDevice, NbdClient, ServeConfig, ServerHandle};

use crate::util::*;

const MIB: usize = 1 << 20;

fn serve_pooled(dev: Arc<dyn BlockDevice>, threads: usize) -> ServerHandle {
    let mut config = ServeConfig::new(tcp_any()).export("p", dev);
    config.threads_per_connection = threads;
    nbd::serve(config).unwrap()
}

/// Reads at offset 0 take 300 ms (a cache miss fetched from far away).
struct SlowAtZero(FileDevice);

impl BlockDevice for SlowAtZero {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset == 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.0.write_at(data, offset, fua)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
}

#[test]
fn a_slow_read_does_not_hold_up_later_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = random_file(dir.path(), "s.raw", MIB, 41);
    let server = serve_pooled(
        Arc::new(SlowAtZero(FileDevice::open(&path, false).unwrap())),
        4,
    );
    let mut s = raw_connect(tcp_addr(&server));
    raw_negotiate(&mut s, "p");
    let mut batch = Request {
        flags: 0,
        command: NbdCommand::Read,
        handle: 1,
        offset: 0,
        length: 4096,
    }
    .encode()
    .to_vec();
    batch.extend_from_slice(
        &Request {
            flags: 0,
            command: NbdCommand::Read,
            handle: 2,
            offset: 8192,
            length: 4096,
        }
        .encode(),
    );
    s.write_all(&batch).unwrap();
    let mut b = vec![0u8; 4096];
    let (err, first) = raw_reply(&mut s);
    s.read_exact(&mut b).unwrap();
    assert_eq!((err, first), (0, 2), "the fast read must be answered first");
    assert_eq!(b[..], data[8192..12288]);
    let (err, second) = raw_reply(&mut s);
    s.read_exact(&mut b).unwrap();
    assert_eq!((err, second), (0, 1));
    assert_eq!(b[..], data[..4096]);
}

#[test]
fn pooled_mode_serves_real_clients_and_hostile_input() {
    require("qemu-img");
    require("fio");
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = random_file(dir.path(), "p.raw", 4 * MIB, 42);
    let server = serve_pooled(Arc::new(FileDevice::open(&path, false).unwrap()), 4);
    let out = dir.path().join("out.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &server.uri("p")])
            .arg(&out),
    );
    assert!(std::fs::read(&out).unwrap() == data);
    run_ok(Command::new("fio").current_dir(dir.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", server.uri("p")),
        "--rw=randwrite",
        "--bs=64k",
        "--iodepth=16",
        "--size=4M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_state_save=0",
    ]));
    // Pipelined writes with payloads, then reads of the same data.
    let mut s = raw_connect(tcp_addr(&server));
    raw_negotiate(&mut s, "p");
    let chunk = random_bytes(100_000, 3);
    let mut batch = Vec::new();
    for i in 0..8u64 {
        batch.extend_from_slice(
            &Request {
                flags: CMD_FLAG_FUA,
                command: NbdCommand::Write,
                handle: i,
                offset: i * 100_000,
                length: 100_000,
            }
            .encode(),
        );
        batch.extend_from_slice(&chunk);
    }
    s.write_all(&batch).unwrap();
    let mut handles: Vec<u64> = (0..8)
        .map(|_| raw_reply(&mut s))
        .map(|(e, h)| {
            assert_eq!(e, 0);
            h
        })
        .collect();
    handles.sort();
    assert_eq!(handles, (0..8).collect::<Vec<_>>());
    let mut c = NbdClient::connect(&server.local_addr(), "p").unwrap();
    let mut back = vec![0u8; 100_000];
    c.read_at(&mut back, 700_000).unwrap();
    assert!(back == chunk);
    // Hostile: garbage header and oversized write still close the connection.
    raw_request(&mut s, NbdCommand::Write, 0, 99, 0, u32::MAX);
    assert_eq!(raw_reply(&mut s).1, 99);
    assert_closed(&mut s);
    let mut s = raw_connect(tcp_addr(&server));
    raw_negotiate(&mut s, "p");
    s.write_all(&[0x41; 28]).unwrap();
    assert_closed(&mut s);
    c.read_at(&mut back, 0).unwrap();
    assert!(server.stats("p").unwrap().writes >= 8);
    server.shutdown();
    assert_eq!(server.connections(), 0);
}
