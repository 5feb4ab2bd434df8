//! Validating a [`VmSpec`] and turning it into QEMU's command line.

use std::path::Path;

use super::{files, MAX_SOCKET_PATH, NBD_RECONNECT_DELAY_S};
use crate::{Accel, ComputeError, DiskTarget, VmSpec};

pub(super) fn invalid(spec: &VmSpec, reason: impl Into<String>) -> ComputeError {
    ComputeError::InvalidSpec {
        id: spec.id.clone(),
        reason: reason.into(),
    }
}

/// Checks a spec the way QEMU would refuse it (the sim driver refuses the same specs).
pub(crate) fn validate(spec: &VmSpec) -> Result<(), ComputeError> {
    let id_ok = !spec.id.is_empty()
        && spec.id.len() <= 64
        && spec
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !id_ok {
        return Err(invalid(spec, "id must be 1-64 bytes of [A-Za-z0-9._-]"));
    }
    if !(1..=64).contains(&spec.vcpus) {
        return Err(invalid(spec, "vcpus must be 1..=64"));
    }
    if !(16..=65536).contains(&spec.memory_mib) {
        return Err(invalid(spec, "memory_mib must be 16..=65536"));
    }
    for (what, p) in [("kernel", &spec.kernel), ("initrd", &spec.initrd)] {
        if !p.is_file() {
            return Err(invalid(
                spec,
                format!("{what} {} is not a file", p.display()),
            ));
        }
    }
    if spec.tables.len() > crate::MAX_VM_TABLES {
        return Err(invalid(
            spec,
            format!(
                "at most {} resource tables per VM, got {}",
                crate::MAX_VM_TABLES,
                spec.tables.len()
            ),
        ));
    }
    for t in &spec.tables {
        if !t.table_bytes.is_power_of_two() {
            return Err(invalid(
                spec,
                format!(
                    "resource table {} is {} bytes, not a power of two",
                    t.table.display(),
                    t.table_bytes
                ),
            ));
        }
        check_socket_path(&t.window)?;
    }
    for (i, n) in spec.nics.iter().enumerate() {
        let tap_ok = !n.tap.is_empty()
            && n.tap.len() <= 15
            && n.tap
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !tap_ok {
            return Err(invalid(
                spec,
                format!("nics[{i}].tap must be 1-15 bytes of [a-z0-9-]"),
            ));
        }
        let mac_ok = n.mac.len() == 17
            && n.mac.split(':').count() == 6
            && n.mac
                .split(':')
                .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
        if !mac_ok {
            return Err(invalid(
                spec,
                format!("nics[{i}].mac '{}' is not xx:xx:xx:xx:xx:xx", n.mac),
            ));
        }
    }
    match &spec.disk {
        DiskTarget::NbdTcp { host, port, export } => {
            if host.is_empty() || *port == 0 || export.is_empty() {
                return Err(invalid(spec, "nbd tcp disk needs host, port and export"));
            }
        }
        DiskTarget::NbdUnix { path, export } => {
            check_socket_path(path)?;
            if export.is_empty() {
                return Err(invalid(spec, "nbd unix disk needs an export"));
            }
        }
        DiskTarget::File(p) => {
            if !p.is_file() {
                return Err(invalid(spec, format!("disk {} is not a file", p.display())));
            }
        }
    }
    Ok(())
}

pub(super) fn check_socket_path(p: &Path) -> Result<(), ComputeError> {
    let len = p.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(ComputeError::SocketPathTooLong {
            path: p.to_owned(),
            len,
        });
    }
    Ok(())
}

/// QEMU splits option values at commas; a literal comma is written twice.
pub(super) fn esc(s: &str) -> String {
    s.replace(',', ",,")
}

pub(super) fn utf8<'a>(spec: &VmSpec, p: &'a Path) -> Result<&'a str, ComputeError> {
    p.to_str()
        .ok_or_else(|| invalid(spec, format!("path {} is not UTF-8", p.display())))
}

/// The QEMU command line for `spec`. Both ends of a migration must get identical machine,
/// RAM and devices, which holds because both come from this one function.
pub fn qemu_args(
    spec: &VmSpec,
    accel: Accel,
    run_dir: &Path,
    incoming: bool,
) -> Result<Vec<String>, ComputeError> {
    build_args(spec, accel, run_dir, incoming, None)
}

/// [`qemu_args`], or with `firmware` the test mode of
/// [`QemuDriver::with_qtest_firmware`](super::QemuDriver::with_qtest_firmware): that
/// firmware instead of the kernel, and a qtest socket.
pub(super) fn build_args(
    spec: &VmSpec,
    accel: Accel,
    run_dir: &Path,
    incoming: bool,
    firmware: Option<&Path>,
) -> Result<Vec<String>, ComputeError> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| (*s).to_owned()));
    push(&["-name", &format!("guest={}", esc(&spec.name))]);
    match accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        _ => push(&["-accel", "tcg"]),
    }
    push(&[
        "-machine",
        "q35",
        "-m",
        &spec.memory_mib.to_string(),
        "-smp",
        &spec.vcpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]);
    match firmware {
        None => push(&[
            "-kernel",
            utf8(spec, &spec.kernel)?,
            "-initrd",
            utf8(spec, &spec.initrd)?,
            "-append",
            &spec.cmdline,
        ]),
        Some(bios) => {
            let qtest = run_dir.join(files::QTEST);
            check_socket_path(&qtest)?;
            push(&[
                "-bios",
                utf8(spec, bios)?,
                "-qtest",
                &format!("unix:{},server=on,wait=off", esc(utf8(spec, &qtest)?)),
                // qtest logs every exchange to stderr by default, which is QEMU's log file.
                "-qtest-log",
                "/dev/null",
            ]);
        }
    }
    match &spec.disk {
        DiskTarget::NbdTcp { host, port, export } => push(&[
            "-blockdev",
            &format!(
                "driver=nbd,node-name=disk0,server.type=inet,server.host={},server.port={port},export={},reconnect-delay={NBD_RECONNECT_DELAY_S}",
                esc(host),
                esc(export)
            ),
        ]),
        DiskTarget::NbdUnix { path, export } => push(&[
            "-blockdev",
            &format!(
                "driver=nbd,node-name=disk0,server.type=unix,server.path={},export={},reconnect-delay={NBD_RECONNECT_DELAY_S}",
                esc(utf8(spec, path)?),
                esc(export)
            ),
        ]),
        DiskTarget::File(p) => push(&[
            "-blockdev",
            &format!(
                "driver=file,node-name=file0,filename={}",
                esc(utf8(spec, p)?)
            ),
            "-blockdev",
            "driver=raw,node-name=disk0,file=file0",
        ]),
    }
    push(&["-device", "virtio-blk-pci,drive=disk0,id=vblk0"]);
    for (i, n) in spec.nics.iter().enumerate() {
        push(&[
            "-netdev",
            &format!("tap,id=net{i},ifname={},script=no,downscript=no", n.tap),
            "-device",
            &format!("virtio-net-pci,netdev=net{i},mac={},id=vnic{i}", n.mac),
        ]);
    }
    if !spec.nics.is_empty() {
        let link = run_dir.join(files::LINK);
        push(&[
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
            &format!(
                "socket,id=link0,path={},server=on,wait=off",
                esc(utf8(spec, &link)?)
            ),
            "-device",
            "virtserialport,bus=vser0.0,chardev=link0,name=vinfra.link",
        ]);
    }
    // After the disk and NICs, so that their PCI slots stay where they were before the
    // display existed (a guest names its NICs by slot).
    push(&super::terminal::DEVICE_ARGS);
    // Resource tables last of all: a VM started without them keeps every slot.
    for (i, t) in spec.tables.iter().enumerate() {
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id=rtab{i},mem-path={},size={},share=on,readonly=on",
                esc(utf8(spec, &t.table)?),
                t.table_bytes
            ),
            "-device",
            &format!("ivshmem-plain,memdev=rtab{i},id=rtab{i}dev"),
            "-chardev",
            &format!("socket,id=rwin{i},path={}", esc(utf8(spec, &t.window)?)),
            "-device",
            &format!("ivshmem-doorbell,chardev=rwin{i},vectors=1,id=rwin{i}dev"),
        ]);
    }
    let console = run_dir.join(files::CONSOLE);
    let qmp = run_dir.join(files::QMP);
    let pid = run_dir.join(files::PID);
    push(&[
        "-chardev",
        &format!("file,id=serial0,path={}", esc(utf8(spec, &console)?)),
        "-serial",
        "chardev:serial0",
        "-chardev",
        &format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            esc(utf8(spec, &qmp)?)
        ),
        "-mon",
        "chardev=qmp0,mode=control",
        "-pidfile",
        utf8(spec, &pid)?,
    ]);
    if incoming {
        push(&["-incoming", "defer"]);
    }
    Ok(a)
}
