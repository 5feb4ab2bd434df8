//! A resource table mapped into a VM by the QEMU driver (docs/SHM.md, "VMs as
//! devices"): production's q35 command line with a halting firmware, read and
//! written through qtest. The VM finds the table read-only at one ivshmem BAR and
//! its window at another; a write it asks for through the window reaches the
//! entry as one version; stopping the VM detaches it from the table.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use compute::qemu::files;
use compute::qemu::qtest::{write_halting_firmware, Qtest};
use compute::{Accel, ComputeDriver, DiskTarget, QemuDriver, TableAttach, VmSpec};

use super::KillGuard;

const TABLE_BAR: u64 = 0xc000_0000;
const WINDOW_BAR: u64 = 0xc010_0000;
const REGS: u64 = 0xc020_0000;

async fn cmd(q: &mut Qtest, c: &str) -> u64 {
    let v = q.command(c).await.unwrap();
    u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or(0)
}

async fn cfg_addr(q: &mut Qtest, dev: u32, reg: u32) {
    q.command(&format!(
        "outl 0xcf8 {:#x}",
        0x8000_0000u32 | (dev << 11) | reg
    ))
    .await
    .unwrap();
}

async fn cfg_read(q: &mut Qtest, dev: u32, reg: u32) -> u32 {
    cfg_addr(q, dev, reg).await;
    cmd(q, "inl 0xcfc").await as u32
}

async fn cfg_write(q: &mut Qtest, dev: u32, reg: u32, v: u32) {
    cfg_addr(q, dev, reg).await;
    q.command(&format!("outl 0xcfc {v:#x}")).await.unwrap();
}

/// The size of a device's BAR 2 (sizing it the PCI way, then leaving it unmapped).
async fn bar2_size(q: &mut Qtest, dev: u32) -> u64 {
    cfg_write(q, dev, 0x18, 0xffff_ffff).await;
    let mask = cfg_read(q, dev, 0x18).await & !0xf;
    u64::from(!mask) + 1
}

#[tokio::test]
async fn a_vm_started_with_a_table_sees_it_and_writes_through_its_window() {
    test_utils::require_tool("qemu-system-x86_64", "run scripts/setup.sh").unwrap();
    let tmp = super::scratch();
    let fw = tmp.path().join("hlt.bin");
    write_halting_firmware(&fw).unwrap();
    let unused = tmp.path().join("unused");
    std::fs::write(&unused, b"not booted: the firmware runs instead").unwrap();
    let disk = tmp.path().join("d.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();

    let el =
        shm::Element::start(shm::ElementConfig::new(tmp.path().join("t.sock"), 16, 4088)).unwrap();
    let v1 = el.write(1, &[7u8; 64]).unwrap();
    let win = el
        .attach_guest(&tmp.path().join("w.sock"), "tab-vm")
        .unwrap();
    let spec = VmSpec {
        id: "tab-vm".into(),
        name: "tab-vm".into(),
        vcpus: 1,
        memory_mib: 32,
        kernel: unused.clone(),
        initrd: unused,
        cmdline: String::new(),
        disk: DiskTarget::File(disk),
        nics: vec![],
        run_dir: tmp.path().join("r"),
        accel: Accel::Tcg,
        tables: vec![TableAttach {
            table: format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                el.table_fd().as_raw_fd()
            )
            .into(),
            table_bytes: el.table_file_bytes() as u64,
            window: win.socket.clone(),
        }],
    };
    let drv = QemuDriver::new().with_qtest_firmware(&fw);
    let mut guard = KillGuard::default();
    let rt = drv.start(&spec).await.unwrap();
    guard.add(rt.pid, &rt.run_dir);
    let mut q = Qtest::connect(&rt.run_dir.join(files::QTEST), Duration::from_secs(10))
        .await
        .unwrap();
    // The VM is a device of the table, as QEMU's process.
    let end = Instant::now() + Duration::from_secs(10);
    while !el.devices().iter().any(|d| d.id == win.device) {
        assert!(Instant::now() < end, "the VM never attached");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        el.devices()[0].guest.as_deref(),
        Some("tab-vm"),
        "{:?}",
        el.devices()
    );

    // Find the two ivshmem devices on bus 0 by their BAR 2 sizes.
    let (mut table_dev, mut window_dev) = (None, None);
    for dev in 0..32 {
        if cfg_read(&mut q, dev, 0).await != 0x1110_1af4 {
            continue;
        }
        match bar2_size(&mut q, dev).await {
            s if s == el.table_file_bytes() as u64 => table_dev = Some(dev),
            s if s == win.window_bytes as u64 => window_dev = Some(dev),
            s => panic!("an ivshmem device with a {s}-byte BAR 2"),
        }
    }
    let (t, w) = (table_dev.unwrap(), window_dev.unwrap());
    cfg_write(&mut q, t, 0x18, TABLE_BAR as u32).await;
    cfg_write(&mut q, t, 0x1c, 0).await;
    cfg_write(&mut q, t, 0x04, 0x2).await;
    cfg_write(&mut q, w, 0x10, REGS as u32).await;
    cfg_write(&mut q, w, 0x18, WINDOW_BAR as u32).await;
    cfg_write(&mut q, w, 0x1c, 0).await;
    cfg_write(&mut q, w, 0x04, 0x2).await;

    let slot = el.layout().slot_size() as u64;
    assert_eq!(
        cmd(&mut q, &format!("readq {:#x}", TABLE_BAR + slot)).await,
        v1
    );
    // A store into the table is dropped.
    q.command(&format!("writeq {:#x} 0x5", TABLE_BAR + slot + 8))
        .await
        .unwrap();
    assert_eq!(
        cmd(&mut q, &format!("readq {:#x}", TABLE_BAR + slot + 8)).await,
        0x0707_0707_0707_0707
    );
    // Write entry 2 through the window: payload, request (op 5: grant, copy,
    // release), doorbell to peer 0, answer.
    let payload = shm::WINDOW_PAYLOAD as u64;
    for i in 0..4u64 {
        q.command(&format!(
            "writeq {:#x} {:#x}",
            WINDOW_BAR + payload + 8 * i,
            0xabc0 + i
        ))
        .await
        .unwrap();
    }
    for (off, v) in [(8u64, 5u64), (16, 2), (0, 1)] {
        q.command(&format!("writeq {:#x} {v:#x}", WINDOW_BAR + off))
            .await
            .unwrap();
    }
    q.command(&format!("writel {:#x} 0x0", REGS + 12))
        .await
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while cmd(&mut q, &format!("readq {:#x}", WINDOW_BAR + 64)).await != 1 {
        assert!(Instant::now() < end, "no answer from the element");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        cmd(&mut q, &format!("readq {:#x}", WINDOW_BAR + 72)).await,
        7
    );
    let v2 = cmd(&mut q, &format!("readq {:#x}", WINDOW_BAR + 80)).await;
    let (v, bytes) = el.read(2).unwrap();
    assert_eq!(v, v2);
    assert_eq!(&bytes[..8], &0xabc0u64.to_le_bytes());
    assert_eq!(&bytes[24..32], &0xabc3u64.to_le_bytes());
    assert_eq!(
        cmd(&mut q, &format!("readq {:#x}", TABLE_BAR + 2 * slot + 8)).await,
        0xabc0
    );

    // Stopping the VM detaches it.
    drv.stop("tab-vm").await.unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while !el.devices().is_empty() {
        assert!(Instant::now() < end, "the stopped VM is still a device");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_table_that_is_not_a_power_of_two_is_refused_before_qemu_runs() {
    let tmp = super::scratch();
    let k = tmp.path().join("k");
    std::fs::write(&k, b"k").unwrap();
    let mut spec = VmSpec {
        id: "t".into(),
        name: "t".into(),
        vcpus: 1,
        memory_mib: 32,
        kernel: k.clone(),
        initrd: k,
        cmdline: String::new(),
        disk: DiskTarget::File(tmp.path().join("d")),
        nics: vec![],
        run_dir: tmp.path().join("r"),
        accel: Accel::Tcg,
        tables: vec![TableAttach {
            table: "/proc/1/fd/3".into(),
            table_bytes: 3 << 12,
            window: tmp.path().join("w.sock"),
        }],
    };
    let e = QemuDriver::new().start(&spec).await.unwrap_err();
    assert!(e.to_string().contains("not a power of two"), "{e}");
    spec.tables[0].table_bytes = 1 << 16;
    let args = compute::qemu::qemu_args(&spec, Accel::Tcg, &spec.run_dir, false).unwrap();
    let line = args.join(" ");
    assert!(line.contains("ivshmem-plain,memdev=rtab0"), "{line}");
    assert!(line.contains("size=65536,share=on,readonly=on"), "{line}");
    assert!(
        line.contains("ivshmem-doorbell,chardev=rwin0,vectors=1"),
        "{line}"
    );
}
