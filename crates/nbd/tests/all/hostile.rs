//! Malformed and hostile clients on a raw socket: each gets an error reply or a
//! closed connection, never a hang, and the server keeps serving.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd::proto::*;
use nbd::{ErrorCode, FileDevice, NbdClient, ServeConfig, ServerHandle};

use crate::util::*;

const SIZE: usize = 1 << 20;

fn setup() -> (tempfile::TempDir, ServerHandle, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = random_file(dir.path(), "h.raw", SIZE, 31);
    let server = serve_file(&path, "h", false);
    (dir, server, data)
}

/// A well-behaved client still gets correct data.
fn assert_still_serving(server: &ServerHandle, data: &[u8]) {
    let mut c = NbdClient::connect(&server.local_addr(), "h").unwrap();
    let mut b = vec![0u8; 4096];
    c.read_at(&mut b, 65536).unwrap();
    assert_eq!(b[..], data[65536..65536 + 4096]);
    c.disconnect().unwrap();
}

#[test]
fn garbage_instead_of_client_flags() {
    let (_d, server, data) = setup();
    let mut s = raw_connect(tcp_addr(&server));
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_closed(&mut s);
    assert_still_serving(&server, &data);
}

#[test]
fn garbage_option_magic() {
    let (_d, server, data) = setup();
    let mut s = raw_connect(tcp_addr(&server));
    raw_greet(&mut s);
    s.write_all(&[0xde; 16]).unwrap();
    assert_closed(&mut s);
    assert_still_serving(&server, &data);
}

#[test]
fn garbage_request_magic() {
    let (_d, server, data) = setup();
    let mut s = raw_connect(tcp_addr(&server));
    raw_negotiate(&mut s, "h");
    s.write_all(&[0x41; 28]).unwrap();
    assert_closed(&mut s);
    assert_still_serving(&server, &data);
}

#[test]
fn option_length_near_4_gib_is_refused() {
    let (_d, server, data) = setup();
    let mut s = raw_connect(tcp_addr(&server));
    raw_greet(&mut s);
    s.write_all(
        &OptionHeader {
            option: OPT_GO,
            length: u32::MAX,
        }
        .encode(),
    )
    .unwrap();
    let (hdr, _) = raw_option_reply(&mut s);
    assert_eq!((hdr.option, hdr.reply_type), (OPT_GO, REP_ERR_TOO_BIG));
    assert_closed(&mut s);
    // Same for NBD_OPT_EXPORT_NAME, which cannot be answered: just closed.
    let mut s = raw_connect(tcp_addr(&server));
    raw_greet(&mut s);
    s.write_all(
        &OptionHeader {
            option: OPT_EXPORT_NAME,
            length: u32::MAX,
        }
        .encode(),
    )
    .unwrap();
    assert_closed(&mut s);
    assert_still_serving(&server, &data);
}

#[test]
fn bad_options_get_error_replies_and_negotiation_continues() {
    let (_d, server, _data) = setup();
    let mut s = raw_connect(tcp_addr(&server));
    raw_greet(&mut s);
    // Unknown option.
    s.write_all(
        &OptionHeader {
            option: 0x1234,
            length: 3,
        }
        .encode(),
    )
    .unwrap();
    s.write_all(b"abc").unwrap();
    assert_eq!(raw_option_reply(&mut s).0.reply_type, REP_ERR_UNSUP);
    // STARTTLS: not supported.
    s.write_all(
        &OptionHeader {
            option: OPT_STARTTLS,
            length: 0,
        }
        .encode(),
    )
    .unwrap();
    assert_eq!(raw_option_reply(&mut s).0.reply_type, REP_ERR_UNSUP);
    // LIST with data is invalid.
    s.write_all(
        &OptionHeader {
            option: OPT_LIST,
            length: 1,
        }
        .encode(),
    )
    .unwrap();
    s.write_all(b"x").unwrap();
    assert_eq!(raw_option_reply(&mut s).0.reply_type, REP_ERR_INVALID);
    // GO whose name length runs past the data.
    s.write_all(
        &OptionHeader {
            option: OPT_GO,
            length: 6,
        }
        .encode(),
    )
    .unwrap();
    s.write_all(&[0, 0, 0, 200, 0, 0]).unwrap();
    assert_eq!(raw_option_reply(&mut s).0.reply_type, REP_ERR_INVALID);
    // INFO on a missing export.
    let req = InfoRequest {
        name: "missing".into(),
        requests: vec![],
    }
    .encode();
    s.write_all(
        &OptionHeader {
            option: OPT_INFO,
            length: req.len() as u32,
        }
        .encode(),
    )
    .unwrap();
    s.write_all(&req).unwrap();
    assert_eq!(raw_option_reply(&mut s).0.reply_type, REP_ERR_UNKNOWN);
    // Then a good GO still works.
    let req = InfoRequest {
        name: "h".into(),
        requests: vec![INFO_BLOCK_SIZE],
    }
    .encode();
    s.write_all(
        &OptionHeader {
            option: OPT_GO,
            length: req.len() as u32,
        }
        .encode(),
    )
    .unwrap();
    s.write_all(&req).unwrap();
    let mut saw_export = false;
    loop {
        let (hdr, d) = raw_option_reply(&mut s);
        match hdr.reply_type {
            REP_INFO => {
                if let InfoReply::Export { size, flags } = InfoReply::parse(&d).unwrap() {
                    assert_eq!(size, SIZE as u64);
                    assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
                    saw_export = true;
                }
            }
            REP_ACK => break,
            t => panic!("unexpected reply {t:#x}"),
        }
    }
    assert!(saw_export);
    raw_request(&mut s, Command::Read, 0, 5, 0, 512);
    assert_eq!(raw_reply(&mut s), (0, 5));
}

#[test]
fn silent_client_times_out_in_negotiation() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = random_file(dir.path(), "t.raw", SIZE, 32);
    let mut config =
        ServeConfig::new(tcp_any()).export("", Arc::new(FileDevice::open(&path, true).unwrap()));
    config.handshake_timeout = Duration::from_millis(300);
    let server = nbd::serve(config).unwrap();
    let mut s = raw_connect(tcp_addr(&server));
    let t = Instant::now();
    assert_closed(&mut s);
    assert!(t.elapsed() < Duration::from_secs(3));
    // A slow drip of bytes does not extend the deadline either.
    let mut s = raw_connect(tcp_addr(&server));
    raw_greet(&mut s);
    let t = Instant::now();
    for b in IHAVEOPT.to_be_bytes() {
        if s.write_all(&[b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_closed(&mut s);
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn truncated_request_header_then_close() {
    let (_d, server, data) = setup();
    let mut s = raw_connect(tcp_addr(&server));
    raw_negotiate(&mut s, "h");
    let hdr = Request {
        flags: 0,
        command: Command::Read,
        handle: 1,
        offset: 0,
        length: 512,
    }
    .encode();
    s.write_all(&hdr[..10]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_closed(&mut s);
    assert_still_serving(&server, &data);
}

#[test]
fn read_beyond_end_gets_einval_and_connection_survives() {
    let (_d, server, data) = setup();
    let mut s = raw_connect(tcp_addr(&server));
    let (size, _) = raw_negotiate(&mut s, "h");
    raw_request(&mut s, Command::Read, 0, 1, size - 512, 4096);
    assert_eq!(raw_reply(&mut s), (ErrorCode::Inval.to_wire(), 1));
    raw_request(&mut s, Command::Read, 0, 2, u64::MAX - 10, 512);
    assert_eq!(raw_reply(&mut s), (ErrorCode::Inval.to_wire(), 2));
    raw_request(&mut s, Command::Read, 0, 3, 0, 0);
    assert_eq!(raw_reply(&mut s), (ErrorCode::Inval.to_wire(), 3));
    // Unknown command flag.
    raw_request(&mut s, Command::Read, 1 << 9, 4, 0, 512);
    assert_eq!(raw_reply(&mut s), (ErrorCode::Inval.to_wire(), 4));
    // Trim past the end.
    raw_request(&mut s, Command::Trim, 0, 5, size, 1);
    assert_eq!(raw_reply(&mut s), (ErrorCode::Inval.to_wire(), 5));
    // Still usable.
    raw_request(&mut s, Command::Read, 0, 6, 512, 512);
    assert_eq!(raw_reply(&mut s), (0, 6));
    let mut b = [0u8; 512];
    std::io::Read::read_exact(&mut s, &mut b).unwrap();
    assert_eq!(b[..], data[512..1024]);
    assert!(server.stats("h").unwrap().errors >= 5);
}

#[test]
fn write_beyond_end_gets_enospc_and_payload_is_skipped() {
    let (_d, server, _data) = setup();
    let mut s = raw_connect(tcp_addr(&server));
    let (size, _) = raw_negotiate(&mut s, "h");
    raw_request(&mut s, Command::Write, 0, 1, size - 100, 4096);
    s.write_all(&[0xee; 4096]).unwrap();
    assert_eq!(raw_reply(&mut s), (ErrorCode::NoSpc.to_wire(), 1));
    raw_request(&mut s, Command::WriteZeroes, 0, 2, size, 4096);
    assert_eq!(raw_reply(&mut s), (ErrorCode::NoSpc.to_wire(), 2));
    raw_request(&mut s, Command::Flush, 0, 3, 0, 0);
    assert_eq!(raw_reply(&mut s), (0, 3));
}

#[test]
fn four_gib_lengths() {
    let (_d, server, data) = setup();
    // A read of 4 GiB - 1 is refused, the connection stays.
    let mut s = raw_connect(tcp_addr(&server));
    raw_negotiate(&mut s, "h");
    raw_request(&mut s, Command::Read, 0, 1, 0, u32::MAX);
    assert_eq!(raw_reply(&mut s), (ErrorCode::Inval.to_wire(), 1));
    raw_request(&mut s, Command::Flush, 0, 2, 0, 0);
    assert_eq!(raw_reply(&mut s), (0, 2));
    // A write announcing 4 GiB - 1 of payload is refused and the connection closed.
    raw_request(&mut s, Command::Write, 0, 3, 0, u32::MAX);
    s.write_all(&[0u8; 65536]).unwrap();
    assert_eq!(raw_reply(&mut s), (ErrorCode::Inval.to_wire(), 3));
    assert_closed(&mut s);
    assert_still_serving(&server, &data);
}

#[test]
fn unknown_command_gets_einval_and_close() {
    let (_d, server, data) = setup();
    let mut s = raw_connect(tcp_addr(&server));
    raw_negotiate(&mut s, "h");
    raw_request(&mut s, Command::Unknown(0x55), 0, 9, 0, 0);
    assert_eq!(raw_reply(&mut s), (ErrorCode::Inval.to_wire(), 9));
    assert_closed(&mut s);
    // Known but unadvertised commands are refused without closing.
    let mut s = raw_connect(tcp_addr(&server));
    raw_negotiate(&mut s, "h");
    raw_request(&mut s, Command::BlockStatus, 0, 1, 0, 512);
    assert_eq!(raw_reply(&mut s), (ErrorCode::Inval.to_wire(), 1));
    raw_request(&mut s, Command::Disc, 0, 2, 0, 0);
    assert_closed(&mut s);
    assert_still_serving(&server, &data);
}

#[test]
fn disconnect_mid_write() {
    let (dir, server, data) = setup();
    let mut s = raw_connect(tcp_addr(&server));
    raw_negotiate(&mut s, "h");
    raw_request(&mut s, Command::Write, 0, 1, 0, 65536);
    s.write_all(&[0xcc; 1000]).unwrap();
    drop(s);
    assert!(wait_for(Duration::from_secs(3), || server.connections() == 0));
    // Nothing was written.
    let on_disk = std::fs::read(dir.path().join("h.raw")).unwrap();
    assert!(on_disk == data);
    assert_eq!(server.stats("h").unwrap().bytes_written, 0);
    assert_still_serving(&server, &data);
}

#[test]
fn pipelined_requests_all_answered() {
    let (_d, server, data) = setup();
    let mut s = raw_connect(tcp_addr(&server));
    raw_negotiate(&mut s, "h");
    // 64 reads sent back to back, one write in the middle.
    let mut batch = Vec::new();
    for i in 0..64u64 {
        if i == 32 {
            batch.extend_from_slice(
                &Request {
                    flags: CMD_FLAG_FUA,
                    command: Command::Write,
                    handle: 1000,
                    offset: 0,
                    length: 8,
                }
                .encode(),
            );
            batch.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        }
        batch.extend_from_slice(
            &Request {
                flags: 0,
                command: Command::Read,
                handle: i,
                offset: i * 4096,
                length: 4096,
            }
            .encode(),
        );
    }
    s.write_all(&batch).unwrap();
    let mut b = vec![0u8; 4096];
    for i in 0..65u64 {
        let (err, handle) = raw_reply(&mut s);
        assert_eq!(err, 0);
        if handle == 1000 {
            continue;
        }
        std::io::Read::read_exact(&mut s, &mut b).unwrap();
        if handle != 0 {
            assert_eq!(
                b[..],
                data[handle as usize * 4096..][..4096],
                "reply {i} handle {handle}"
            );
        }
    }
}
