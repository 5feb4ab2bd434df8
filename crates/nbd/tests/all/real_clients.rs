//! Real NBD clients against our server.

use std::process::Command;
use std::sync::Arc;

use nbd::{FileDevice, NbdAddr, ServeConfig};

use crate::util::*;

const MIB: usize = 1 << 20;

#[test]
fn qemu_img_convert_copies_export_byte_for_byte() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let (src, data) = random_file(dir.path(), "src.raw", 4 * MIB, 1);
    let server = serve_file(&src, "disk", true);
    let out = dir.path().join("out.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &server.uri("disk")])
            .arg(&out),
    );
    assert!(
        std::fs::read(&out).unwrap() == data,
        "qemu-img copy differs from the source"
    );
    let stats = server.stats("disk").unwrap();
    assert!(
        stats.reads > 0 && stats.bytes_read >= data.len() as u64,
        "{stats:?}"
    );
}

#[test]
fn qemu_img_convert_over_unix_socket() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let (src, data) = random_file(dir.path(), "src.raw", 2 * MIB, 2);
    let sock = dir.path().join("nbd.sock");
    let dev = FileDevice::open(&src, true).unwrap();
    let server =
        nbd::serve(ServeConfig::new(NbdAddr::Unix(sock.clone())).export("vm", Arc::new(dev)))
            .unwrap();
    let uri = server.uri("vm");
    assert!(uri.starts_with("nbd+unix:///vm?socket="), "{uri}");
    let out = dir.path().join("out.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(&out),
    );
    assert!(std::fs::read(&out).unwrap() == data);
    server.shutdown();
    assert!(!sock.exists(), "socket file left behind");
}

#[test]
fn qemu_io_write_then_read_with_pattern() {
    require("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = random_file(dir.path(), "disk.raw", 4 * MIB, 3);
    let server = serve_file(&src, "disk", false);
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &server.uri("disk"),
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "write -z 1M 128k",
        "-c",
        "read -P 0 1M 128k",
        "-c",
        "flush",
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(out.contains("read 65536/65536 bytes at offset 0"), "{out}");
    let on_disk = std::fs::read(&src).unwrap();
    assert!(on_disk[..65536].iter().all(|&b| b == 0xab));
    assert!(on_disk[MIB..MIB + 131072].iter().all(|&b| b == 0));
    let stats = server.stats("disk").unwrap();
    assert!(
        stats.writes >= 1 && stats.bytes_written >= 65536,
        "{stats:?}"
    );
    assert!(stats.flushes >= 1, "{stats:?}");
}

#[test]
fn nbdinfo_lists_exports_with_sizes() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = random_file(dir.path(), "a.raw", MIB, 4);
    let (b, _) = random_file(dir.path(), "b.raw", 3 * MIB, 5);
    let config = ServeConfig::new(tcp_any())
        .export("alpha", Arc::new(FileDevice::open(&a, true).unwrap()))
        .export("beta", Arc::new(FileDevice::open(&b, false).unwrap()));
    let server = nbd::serve(config).unwrap();
    let out =
        run_ok(Command::new("nbdinfo").args(["--list", &format!("nbd://{}", tcp_addr(&server))]));
    assert!(out.contains("export=\"alpha\""), "{out}");
    assert!(out.contains("export=\"beta\""), "{out}");
    assert!(out.contains("export-size: 1048576"), "{out}");
    assert!(out.contains("export-size: 3145728"), "{out}");
    // Single export: flags as the client sees them.
    let out = run_ok(Command::new("nbdinfo").arg(server.uri("alpha")));
    assert!(out.contains("is_read_only: true"), "{out}");
    assert!(out.contains("can_multi_conn: true"), "{out}");
    let out = run_ok(Command::new("nbdinfo").arg(server.uri("beta")));
    assert!(
        out.contains("is_read_only: false") && out.contains("can_flush: true"),
        "{out}"
    );
}

#[test]
fn nbdcopy_to_null_and_to_file() {
    require("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let (src, data) = random_file(dir.path(), "src.raw", 4 * MIB, 6);
    let server = serve_file(&src, "", true);
    run_ok(Command::new("nbdcopy").args([&server.uri(""), "null:"]));
    let out = dir.path().join("copy.raw");
    std::fs::File::create(&out).unwrap();
    run_ok(Command::new("nbdcopy").arg(server.uri("")).arg(&out));
    assert!(
        std::fs::read(&out).unwrap() == data,
        "nbdcopy output differs"
    );
}

#[test]
fn fio_nbd_engine_randread_and_verified_writes() {
    require("fio");
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = random_file(dir.path(), "disk.raw", 8 * MIB, 7);
    let server = serve_file(&src, "disk", false);
    let uri = server.uri("disk");
    run_ok(Command::new("fio").current_dir(dir.path()).args([
        "--name=randread",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randread",
        "--bs=4k",
        "--iodepth=16",
        "--size=8M",
        "--runtime=1",
        "--time_based",
    ]));
    let reads = server.stats("disk").unwrap().reads;
    assert!(reads > 100, "fio made only {reads} reads");
    run_ok(Command::new("fio").current_dir(dir.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=16k",
        "--iodepth=8",
        "--size=8M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_state_save=0",
    ]));
}
