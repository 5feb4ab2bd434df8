//! Terminal operations on real QEMUs, checked exactly: VMs whose firmware only halts,
//! started by the QEMU driver in its qtest firmware mode (production's q35 machine and
//! devices under TCG, no guest), each operation performed through
//! `ComputeDriver::perform`, and the scancodes read back at every VM's keyboard
//! controller through qtest (`inb 0x64` / `inb 0x60`). A halted CPU never reads the
//! controller, so what a test reads there is exactly what the host sent.

use std::time::{Duration, Instant};

use compute::qemu::qtest::{write_halting_firmware, Qtest};
use compute::qemu::{files, ps2};
use compute::{png, VmStatus};
use compute::{Accel, ComputeDriver, ComputeError, DiskTarget, OpOutcome, QemuDriver, VmSpec};
use model::terminal_ops::{InputEvent, Operation, PowerAction, QCode, QCODES};
use model::SplitMix64;

use super::KillGuard;

/// VMs running a halting firmware, with a qtest connection each.
struct HaltVms {
    drv: QemuDriver,
    ids: Vec<String>,
    qtest: Vec<Qtest>,
    _guard: KillGuard,
    tmp: tempfile::TempDir,
}

impl HaltVms {
    async fn start(n: usize) -> HaltVms {
        test_utils::require_tool("qemu-system-x86_64", "run scripts/setup.sh").unwrap();
        let tmp = super::scratch();
        let fw = tmp.path().join("hlt.bin");
        write_halting_firmware(&fw).unwrap();
        // The spec's kernel and initrd must exist; the firmware runs instead.
        let unused = tmp.path().join("unused");
        std::fs::write(&unused, b"not booted: the firmware runs instead").unwrap();
        let drv = QemuDriver::new().with_qtest_firmware(&fw);
        let mut guard = KillGuard::default();
        let (mut ids, mut qtest) = (Vec::new(), Vec::new());
        for i in 0..n {
            let id = format!("kbd-{i}");
            // One disk each: QEMU locks an image it opens read-write.
            let disk = tmp.path().join(format!("d{i}.img"));
            std::fs::File::create(&disk)
                .and_then(|f| f.set_len(1 << 20))
                .unwrap();
            let spec = VmSpec {
                id: id.clone(),
                name: id.clone(),
                vcpus: 1,
                memory_mib: 32,
                kernel: unused.clone(),
                initrd: unused.clone(),
                cmdline: String::new(),
                disk: DiskTarget::File(disk),
                nics: vec![],
                run_dir: tmp.path().join(format!("r{i}")),
                accel: Accel::Tcg,
                tables: vec![],
            };
            let rt = drv.start(&spec).await.unwrap();
            guard.add(rt.pid, &rt.run_dir);
            let q = Qtest::connect(&rt.run_dir.join(files::QTEST), Duration::from_secs(10))
                .await
                .unwrap();
            ids.push(id);
            qtest.push(q);
        }
        HaltVms {
            drv,
            ids,
            qtest,
            _guard: guard,
            tmp,
        }
    }

    async fn perform(&self, vm: usize, op: &Operation) -> Result<OpOutcome, ComputeError> {
        self.drv.perform(&self.ids[vm], op).await
    }

    async fn keyboard(&mut self, vm: usize) -> Vec<u8> {
        self.qtest[vm].drain_keyboard().await.unwrap()
    }

    async fn stop(self) {
        for id in &self.ids {
            self.drv.stop(id).await.unwrap();
        }
    }
}

/// The scancodes an operation should put at the controller (no modifier-dependent keys).
fn expected(op: &Operation) -> Vec<u8> {
    op.input_events()
        .iter()
        .flat_map(|e| match e {
            InputEvent::Key { qcode, down } => ps2::scancodes(*qcode, *down).to_vec(),
            _ => Vec::new(),
        })
        .collect()
}

/// Set-2 scancodes back to key events, by the longest scancode sequence of QEMU's table
/// that starts the rest (two codes share one sequence: the first in QEMU's order wins).
fn decode(mut bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let best = QCode::all()
            .flat_map(|q| [(q, true), (q, false)])
            .filter(|&(q, d)| {
                let s = ps2::scancodes(q, d);
                !s.is_empty() && bytes.starts_with(s)
            })
            .max_by_key(|&(q, d)| (ps2::scancodes(q, d).len(), std::cmp::Reverse(q)));
        match best {
            Some((q, d)) => {
                out.push(format!("{q} {}", if d { "down" } else { "up" }));
                bytes = &bytes[ps2::scancodes(q, d).len()..];
            }
            None => {
                out.push(format!("?{:02x}", bytes[0]));
                bytes = &bytes[1..];
            }
        }
    }
    out
}

fn op(json: &str) -> Operation {
    serde_json::from_str(json).unwrap()
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn stats(what: &str, mut d: Vec<Duration>) {
    d.sort();
    eprintln!(
        "{what}: n={} p50={:.3} ms p99={:.3} ms max={:.3} ms",
        d.len(),
        percentile(&d, 50).as_secs_f64() * 1e3,
        percentile(&d, 99).as_secs_f64() * 1e3,
        d.last().unwrap().as_secs_f64() * 1e3
    );
}

#[tokio::test]
async fn qemu_knows_our_qcodes_and_sends_the_scancodes_of_our_table() {
    let _cores = super::CORES.acquire().await.expect("never closed");
    let mut vms = HaltVms::start(1).await;
    // QEMU's QKeyCode enum, from its own schema, is exactly model's list.
    let schema = vms
        .drv
        .qmp(&vms.ids[0])
        .unwrap()
        .execute("query-qmp-schema", None)
        .await
        .unwrap();
    let qkeycode: Vec<&str> = schema
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["meta-type"] == "enum")
        .map(|t| {
            t["values"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
        })
        .find(|v| v.contains(&"kp_enter") && v.contains(&"ctrl"))
        .expect("QKeyCode in the schema");
    assert_eq!(qkeycode, QCODES);

    // Every code, down and up, through the driver: the table's scancodes, nothing else.
    for q in QCode::all() {
        for down in [true, false] {
            vms.perform(0, &Operation::Key { qcode: q, down })
                .await
                .unwrap();
            assert_eq!(
                vms.keyboard(0).await,
                ps2::scancodes(q, down),
                "{q} down={down}"
            );
        }
    }
    vms.stop().await;
}

#[tokio::test]
async fn text_and_combinations_give_exact_scancodes() {
    let _cores = super::CORES.acquire().await.expect("never closed");
    let mut vms = HaltVms::start(1).await;
    // Written out by hand (not from the table): Shift 12, h 33, i 43, Return 5a, break f0.
    vms.perform(0, &op(r#"{"op":"type_text","text":"Hi\n"}"#))
        .await
        .unwrap();
    let got = vms.keyboard(0).await;
    assert_eq!(
        got,
        [0x12, 0x33, 0xf0, 0x33, 0xf0, 0x12, 0x43, 0xf0, 0x43, 0x5a, 0xf0, 0x5a]
    );
    assert_eq!(
        decode(&got),
        [
            "shift down",
            "h down",
            "h up",
            "shift up",
            "i down",
            "i up",
            "ret down",
            "ret up"
        ]
    );
    // Ctrl 14, Alt 11, Delete e0 71: down in order, up in reverse.
    vms.perform(
        0,
        &op(r#"{"op":"key_combo","qcodes":["ctrl","alt","delete"]}"#),
    )
    .await
    .unwrap();
    let got = vms.keyboard(0).await;
    assert_eq!(
        got,
        [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
    );
    assert_eq!(
        decode(&got),
        [
            "ctrl down",
            "alt down",
            "delete down",
            "delete up",
            "alt up",
            "ctrl up"
        ]
    );
    // The queue: a guest that does not read keeps the first 16 bytes of a burst. Twenty
    // characters (60 bytes) go out in five commands; the second waits for the guest to
    // read (`compute::qemu::terminal::STALL`, 2 s), then they go anyway and only the
    // first 16 bytes stay.
    let long = op(r#"{"op":"type_text","text":"abcdefghijklmnopqrst"}"#);
    vms.perform(0, &long).await.unwrap();
    let got = vms.keyboard(0).await;
    assert_eq!(
        got,
        expected(&long)[..ps2::QUEUE_BYTES],
        "{:?}",
        decode(&got)
    );
    // Read out, the controller takes the next operation whole again.
    vms.perform(0, &op(r#"{"op":"type_text","text":"ok"}"#))
        .await
        .unwrap();
    assert_eq!(
        decode(&vms.keyboard(0).await),
        ["o down", "o up", "k down", "k up"]
    );
    vms.stop().await;
}

/// The known bug this fixes: a text longer than the keyboard's 16-byte queue goes out in
/// several commands, and a guest that had not read the first one's bytes before the next
/// came lost keys. Here the "guest" is the test reading the controller through qtest,
/// slowly (one byte every 3 ms, far slower than QMP answers), with translation on as
/// firmware leaves it: every byte of a 40-character text arrives, in order.
#[tokio::test]
async fn a_long_text_reaches_a_slow_reader_whole() {
    let _cores = super::CORES.acquire().await.expect("never closed");
    let mut vms = HaltVms::start(1).await;
    vms.qtest[0].translate_keyboard().await.unwrap();
    let text = "the quick brown fox jumps over lazy dogs";
    let long = Operation::TypeText {
        text: text.to_owned(),
    };
    // Set 1 codes, written out by hand; a release is the code with its high bit set.
    let set1 = |c: char| -> u8 {
        match c {
            'a' => 0x1e,
            'b' => 0x30,
            'c' => 0x2e,
            'd' => 0x20,
            'e' => 0x12,
            'f' => 0x21,
            'g' => 0x22,
            'h' => 0x23,
            'i' => 0x17,
            'j' => 0x24,
            'k' => 0x25,
            'l' => 0x26,
            'm' => 0x32,
            'n' => 0x31,
            'o' => 0x18,
            'p' => 0x19,
            'q' => 0x10,
            'r' => 0x13,
            's' => 0x1f,
            't' => 0x14,
            'u' => 0x16,
            'v' => 0x2f,
            'w' => 0x11,
            'x' => 0x2d,
            'y' => 0x15,
            'z' => 0x2c,
            ' ' => 0x39,
            _ => unreachable!("{c}"),
        }
    };
    let want: Vec<u8> = text
        .chars()
        .flat_map(|c| [set1(c), set1(c) | 0x80])
        .collect();
    assert!(want.len() > 4 * ps2::QUEUE_BYTES);

    let done = std::sync::atomic::AtomicBool::new(false);
    let (drv, id, q) = (&vms.drv, &vms.ids[0], &mut vms.qtest[0]);
    let writer = async {
        let r = drv.perform(id, &long).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    };
    let reader = async {
        let mut got = Vec::new();
        loop {
            let status = q.inb(0x64).await.unwrap();
            if status & 1 == 1 {
                got.push(q.inb(0x60).await.unwrap());
            } else if done.load(std::sync::atomic::Ordering::SeqCst) {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    };
    let t0 = Instant::now();
    let (sent, got) = tokio::join!(writer, reader);
    sent.unwrap();
    eprintln!(
        "{} bytes read one per 3 ms in {:?}",
        got.len(),
        t0.elapsed()
    );
    assert_eq!(got, want, "keys lost or reordered");
    vms.stop().await;
}

/// A random operation whose scancodes do not depend on the modifiers held, and that fits
/// the keyboard's queue (so that each can be read back whole).
fn random_op(rng: &mut SplitMix64, keys: &[QCode]) -> Operation {
    let key = |rng: &mut SplitMix64| keys[rng.index(keys.len())];
    match rng.below(20) {
        0..=13 => Operation::Key {
            qcode: key(rng),
            down: rng.chance(500),
        },
        14 | 15 => {
            let text: String = (0..rng.range(1, 2))
                .map(|_| match rng.below(20) {
                    0 => '\n',
                    1 => '\t',
                    _ => char::from(u8::try_from(rng.range(0x20, 0x7e)).unwrap()),
                })
                .collect();
            Operation::TypeText { text }
        }
        16 | 17 => {
            // At most 3 keys: 3 extended keys are 15 bytes, within one command.
            let mut qcodes: Vec<QCode> = Vec::new();
            let n = rng.range(2, 3);
            while qcodes.len() < usize::try_from(n).unwrap() {
                let k = key(rng);
                if !qcodes.contains(&k) {
                    qcodes.push(k);
                }
            }
            Operation::KeyCombo { qcodes }
        }
        18 => Operation::PointerMove {
            x: u16::try_from(rng.below(32768)).unwrap(),
            y: u16::try_from(rng.below(32768)).unwrap(),
        },
        _ => Operation::Wheel {
            delta: if rng.chance(500) { 1 } else { -3 },
        },
    }
}

#[tokio::test]
async fn random_operations_reach_exactly_their_vm_in_order() {
    let _cores = super::CORES.acquire().await.expect("never closed");
    let mut vms = HaltVms::start(4).await;
    // Print and Pause send other bytes while a modifier is down: left out here, their
    // bytes are checked one by one in the table test.
    let keys: Vec<QCode> = QCode::all()
        .filter(|q| !matches!(q.as_str(), "print" | "sysrq" | "pause"))
        .collect();
    let mut rng = SplitMix64::new(0x7e57_0012);
    let (mut sent, mut got) = (vec![Vec::new(); 4], vec![Vec::new(); 4]);
    let (mut acked, mut visible) = (Vec::new(), Vec::new());
    let mut kinds = std::collections::BTreeMap::new();
    for n in 0..1000 {
        let vm = rng.index(4);
        let o = random_op(&mut rng, &keys);
        *kinds.entry(o.kind()).or_insert(0) += 1;
        let want = expected(&o);
        let t0 = Instant::now();
        vms.perform(vm, &o).await.unwrap();
        let ack = t0.elapsed();
        let bytes = vms.keyboard(vm).await;
        if matches!(o, Operation::Key { .. }) && !want.is_empty() {
            acked.push(ack);
            visible.push(t0.elapsed());
        }
        assert_eq!(
            bytes,
            want,
            "op {n} on vm {vm}: {o:?}: got {:?}, want {:?}",
            decode(&bytes),
            decode(&want)
        );
        for other in (0..4).filter(|&v| v != vm) {
            let stray = vms.keyboard(other).await;
            assert!(
                stray.is_empty(),
                "op {n} for vm {vm} reached vm {other}: {stray:02x?}"
            );
        }
        sent[vm].extend_from_slice(&want);
        got[vm].extend_from_slice(&bytes);
    }
    // Each VM's whole stream, in order.
    for vm in 0..4 {
        assert_eq!(got[vm], sent[vm], "vm {vm}");
        assert!(!sent[vm].is_empty());
    }
    eprintln!(
        "1000 random operations on 4 VMs: {kinds:?}; scancode bytes per VM {:?}",
        sent.iter().map(Vec::len).collect::<Vec<_>>()
    );
    stats("perform(key) -> QMP acknowledged", acked);
    stats(
        "perform(key) -> scancodes read at the i8042 (qtest)",
        visible,
    );
    vms.stop().await;
}

#[tokio::test]
async fn qmp_acknowledges_input_fast() {
    let _cores = super::CORES.acquire().await.expect("never closed");
    let mut vms = HaltVms::start(1).await;
    let a = QCode::from_name("a").unwrap();
    let qmp = vms.drv.qmp(&vms.ids[0]).unwrap();
    let (mut driver, mut raw) = (Vec::new(), Vec::new());
    for i in 0..1000 {
        let down = i % 2 == 0;
        let t0 = Instant::now();
        vms.perform(0, &Operation::Key { qcode: a, down })
            .await
            .unwrap();
        driver.push(t0.elapsed());
        assert_eq!(vms.keyboard(0).await, ps2::scancodes(a, down));
        // The bare QMP command, without the driver around it.
        let args = serde_json::json!({"events": [{"type": "key", "data": {"down": down, "key": {"type": "qcode", "data": "b"}}}]});
        let t0 = Instant::now();
        qmp.execute("input-send-event", Some(args)).await.unwrap();
        raw.push(t0.elapsed());
        vms.keyboard(0).await;
    }
    stats(
        "input-send-event through ComputeDriver::perform (ack)",
        driver,
    );
    stats("input-send-event as a bare QMP command (ack)", raw);
    vms.stop().await;
}

#[tokio::test]
async fn power_pointer_and_screenshots() {
    let _cores = super::CORES.acquire().await.expect("never closed");
    let mut vms = HaltVms::start(1).await;
    let id = vms.ids[0].clone();
    let mut events = vms.drv.qmp(&id).unwrap().subscribe();
    let power = |action: PowerAction| Operation::Power { action };
    let key_a = op(r#"{"op":"key","qcode":"a","down":true}"#);

    // A screenshot: a PNG of the std VGA, whose size its header tells; no file left.
    let OpOutcome::Screenshot(shot) = vms.perform(0, &Operation::Screenshot).await.unwrap() else {
        panic!("no screenshot")
    };
    assert_eq!(
        png::dimensions(&shot.png).unwrap(),
        (shot.width, shot.height)
    );
    // The VGA before any firmware set a mode shows 640x480.
    assert_eq!((shot.width, shot.height), (640, 480));
    let run_dir = vms.tmp.path().join("r0");
    let left: Vec<_> = std::fs::read_dir(&run_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".png"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // Pointer operations go to the tablet: accepted, and nothing at the keyboard.
    for json in [
        r#"{"op":"pointer_move","x":16384,"y":100}"#,
        r#"{"op":"pointer_button","button":"left","down":true}"#,
        r#"{"op":"pointer_button","button":"left","down":false}"#,
        r#"{"op":"wheel","delta":-2}"#,
    ] {
        vms.perform(0, &op(json)).await.unwrap();
    }
    assert!(vms.keyboard(0).await.is_empty());

    // Paused: input is refused and delivers nothing; a screenshot still works.
    vms.perform(0, &power(PowerAction::Pause)).await.unwrap();
    assert_eq!(
        vms.drv.status(&id).await.unwrap(),
        VmStatus::Paused {
            state: "paused".into()
        }
    );
    let e = vms.perform(0, &key_a).await.unwrap_err();
    assert!(
        matches!(e, ComputeError::InvalidState { op: "key", .. }),
        "{e}"
    );
    assert!(vms.keyboard(0).await.is_empty());
    assert!(matches!(
        vms.perform(0, &Operation::Screenshot).await.unwrap(),
        OpOutcome::Screenshot(_)
    ));
    vms.perform(0, &power(PowerAction::Resume)).await.unwrap();
    assert_eq!(vms.drv.status(&id).await.unwrap(), VmStatus::Running);
    vms.perform(0, &key_a).await.unwrap();
    assert_eq!(vms.keyboard(0).await, [0x1c]);

    // Reset and the power button reach QEMU (which reports them as events); this
    // firmware ignores the button, so the VM runs on. The keyboard works after a reset.
    vms.perform(0, &power(PowerAction::Reset)).await.unwrap();
    vms.perform(0, &power(PowerAction::Shutdown)).await.unwrap();
    vms.perform(0, &power(PowerAction::On)).await.unwrap();
    let mut seen = Vec::new();
    while !(seen.iter().any(|e| e == "RESET") && seen.iter().any(|e| e == "POWERDOWN")) {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap_or_else(|_| panic!("no RESET and POWERDOWN events, saw {seen:?}"))
            .unwrap();
        seen.push(ev.name);
    }
    assert_eq!(vms.drv.status(&id).await.unwrap(), VmStatus::Running);
    vms.perform(0, &key_a).await.unwrap();
    assert_eq!(vms.keyboard(0).await, [0x1c]);

    // Refused before QEMU sees them: an invalid operation, an unknown VM.
    let e = vms
        .perform(0, &Operation::PointerMove { x: 40000, y: 0 })
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ComputeError::InvalidOperation { err, .. } if err.field == "x"),
        "{e}"
    );
    assert!(matches!(
        vms.drv.perform("nope", &key_a).await,
        Err(ComputeError::NotFound { .. })
    ));

    // Stopped, the VM takes nothing; powering it on is a start, the agent's job.
    vms.drv.stop(&id).await.unwrap();
    let e = vms.perform(0, &power(PowerAction::On)).await.unwrap_err();
    assert!(
        matches!(e, ComputeError::InvalidState { op: "power on", .. }),
        "{e}"
    );
    let e = vms.perform(0, &Operation::Screenshot).await.unwrap_err();
    assert!(
        matches!(
            e,
            ComputeError::InvalidState {
                op: "screenshot",
                ..
            }
        ),
        "{e}"
    );
}
