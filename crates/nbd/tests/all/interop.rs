//! Our client against qemu-nbd and nbdkit.

use std::net::SocketAddr;
use std::process::Command;

use nbd::{NbdAddr, NbdClient, NbdError, NbdUri};

use crate::util::*;

const MIB: usize = 1 << 20;

/// Reads the whole export, writes and reads back, flushes, trims.
fn exercise(client: &mut NbdClient, data: &[u8]) {
    assert_eq!(client.size(), data.len() as u64);
    let mut all = vec![0u8; data.len()];
    client.read_at(&mut all, 0).unwrap();
    assert!(all == data, "export content differs from the file");
    // Unaligned read across a block boundary.
    let mut b = vec![0u8; 10_000];
    client.read_at(&mut b, 4093).unwrap();
    assert_eq!(&b[..], &data[4093..14_093]);
    let w = random_bytes(300_000, 99);
    client.write_at(&w, 123_457).unwrap();
    client.flush().unwrap();
    let mut r = vec![0u8; w.len()];
    client.read_at(&mut r, 123_457).unwrap();
    assert!(r == w);
    client.write_at_fua(&[0x5a; 512], 0).unwrap();
    client.trim(MIB as u64, 65536).unwrap();
    let size = client.size();
    let mut past = [0u8; 512];
    assert!(matches!(
        client.read_at(&mut past, size - 100),
        Err(NbdError::OutOfRange { .. })
    ));
}

#[test]
fn client_against_qemu_nbd() {
    require("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = random_file(dir.path(), "q.raw", 2 * MIB, 11);
    let port = free_port();
    let _qemu = spawn_server(
        Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-e",
                "4",
                "-t",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-x",
                "qdisk",
            ])
            .arg(&path),
        port,
    );
    let addr = NbdAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], port)));
    let mut c = NbdClient::connect(&addr, "qdisk").unwrap();
    exercise(&mut c, &data);
    c.disconnect().unwrap();
    // Unknown export: NBD_REP_ERR_UNKNOWN from qemu-nbd.
    let err = NbdClient::connect(&addr, "nope").unwrap_err();
    assert!(matches!(err, NbdError::ExportNotFound { .. }), "{err:?}");
    // URI form.
    let uri: NbdUri = format!("nbd://127.0.0.1:{port}/qdisk").parse().unwrap();
    let c = NbdClient::connect(&uri.addr, &uri.export).unwrap();
    assert_eq!(c.size(), data.len() as u64);
}

#[test]
fn client_against_nbdkit_file() {
    require("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = random_file(dir.path(), "k.raw", 2 * MIB, 12);
    let port = free_port();
    let _kit = spawn_server(
        Command::new("nbdkit")
            .args([
                "-f",
                "--exit-with-parent",
                "-i",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "file",
            ])
            .arg(&path),
        port,
    );
    let mut c = NbdClient::connect_uri(&format!("nbd://127.0.0.1:{port}/")).unwrap();
    exercise(&mut c, &data);
    c.disconnect().unwrap();
}
