//! The exact test of terminals through the whole system: the real API server, push
//! channel and two agents, whose compute driver is QEMU in its qtest firmware mode
//! (production's machine and devices; a firmware that only halts, so nothing in the VM
//! reads its keyboard). What reaches each VM is read at its i8042 keyboard controller
//! through qtest after every operation: exactly the bound VM's controller holds exactly
//! the operation's scancodes, every other holds nothing, and each VM's whole stream is
//! what its terminals sent, in order. Forged, replayed, stale, cross-tenant and
//! VM-naming messages act on nothing (or, for the last, on the bound VM only) and are
//! refused with their reason, counted in `/metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use client::terminal::TerminalCredentials;
use compute::qemu::qtest::{write_halting_firmware, Qtest};
use compute::qemu::{files, ps2};
use compute::{ComputeDriver, QemuDriver};
use model::terminal_ops::{InputEvent, Operation, QCode};
use model::terminals::{BindTerminal, CreateTerminal, OperationOutcome, SharePolicy};
use model::SplitMix64;

use crate::harness::{run_dir, Cluster, TestAgent};

/// The set-2 scancodes an operation puts at the controller (no modifier-dependent keys).
fn expected(op: &Operation) -> Vec<u8> {
    op.input_events()
        .iter()
        .flat_map(|e| match e {
            InputEvent::Key { qcode, down } => ps2::scancodes(*qcode, *down).to_vec(),
            _ => Vec::new(),
        })
        .collect()
}

/// A random operation whose scancodes do not depend on the modifiers held and that fits
/// the keyboard's queue, so that each is read back whole before the next.
fn random_op(rng: &mut SplitMix64, keys: &[QCode]) -> Operation {
    let key = |rng: &mut SplitMix64| keys[rng.index(keys.len())];
    match rng.below(20) {
        0..=12 => Operation::Key {
            qcode: key(rng),
            down: rng.chance(500),
        },
        13..=15 => {
            // At most 2 characters (12 bytes with Shift): one command, so that it is all
            // there to read after the operation (nothing reads in between).
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
            let mut qcodes: Vec<QCode> = Vec::new();
            let n = usize::try_from(rng.range(2, 3)).unwrap();
            while qcodes.len() < n {
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
            delta: if rng.chance(500) { 2 } else { -1 },
        },
    }
}

/// Reads the controller until `n` bytes came (an operation answered `sent` may still be
/// on its way) or 30 s passed, then whatever else is there.
async fn read_keyboard(q: &mut Qtest, n: usize) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = q.drain_keyboard().await.unwrap();
    while got.len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        got.extend(q.drain_keyboard().await.unwrap());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_reaches_exactly_its_bound_vms_keyboard_controller() {
    test_utils::require_tool("qemu-system-x86_64", "run scripts/setup.sh").unwrap();
    let c = Cluster::start().await;
    let fw = c.dir.path().join("hlt.bin");
    write_halting_firmware(&fw).unwrap();
    let drivers: Vec<Arc<dyn ComputeDriver>> = (0..2)
        .map(|_| Arc::new(QemuDriver::new().with_qtest_firmware(&fw)) as Arc<dyn ComputeDriver>)
        .collect();
    let hosts = ["host-a", "host-b"];
    let _agents: Vec<TestAgent> = {
        let mut v = Vec::new();
        for (h, d) in hosts.iter().zip(&drivers) {
            v.push(c.agent_on(h, d.clone()).await);
        }
        v
    };
    // Four VMs, two per host.
    let mut vms = Vec::new();
    for i in 0..4 {
        vms.push(c.create_vm(&format!("vm{i}"), hosts[i / 2]).await);
    }
    let mut qtest = Vec::new();
    // An agent that stops leaves its VMs running (a VM outlives its agent's restart).
    let mut qemus = test_utils::QemuKillGuard::default();
    for (i, vm) in vms.iter().enumerate() {
        // No guest: running is QEMU running (no console to wait for).
        c.wait_vm(vm, "observed running", |v| {
            v.observed == model::ObservedState::Running
        })
        .await;
        let dir = run_dir(&c.host_dir(hosts[i / 2]), vm);
        let pid = std::fs::read_to_string(dir.join(files::PID)).unwrap();
        qemus.add(pid.trim().parse().unwrap(), &dir);
        let sock = run_dir(&c.host_dir(hosts[i / 2]), vm).join(files::QTEST);
        qtest.push(
            Qtest::connect(&sock, Duration::from_secs(30))
                .await
                .unwrap(),
        );
    }
    // Four terminals: one each on vm0 and vm1, two sharing vm2; vm3 has none.
    let bound_to = [0usize, 1, 2, 2];
    let mut creds = Vec::new();
    for (t, vm) in bound_to.iter().enumerate() {
        let name = format!("t{t}");
        let made = c
            .admin
            .create_terminal(&CreateTerminal {
                name: name.clone(),
                tenant: None,
            })
            .await
            .unwrap();
        c.admin
            .bind_terminal(
                &name,
                &BindTerminal {
                    vm: format!("vm{vm}"),
                    policy: SharePolicy::Shared,
                },
            )
            .await
            .unwrap();
        creds.push(TerminalCredentials::new(&made, &c.url));
    }
    // The messages authenticate themselves: a client with no valid token sends them.
    let anon = client::Client::new(&c.url, "no-token").unwrap();
    let metrics_before = c.admin.metrics().await.unwrap();

    let keys: Vec<QCode> = QCode::all()
        .filter(|q| !matches!(q.as_str(), "print" | "sysrq" | "pause"))
        .collect();
    let mut rng = SplitMix64::new(0x7e57_1212);
    let mut seqs = [0u64; 4];
    let (mut sent, mut got) = (vec![Vec::new(); 4], vec![Vec::new(); 4]);
    let mut answered_sent = 0;
    let t0 = Instant::now();
    for n in 0..1000 {
        let t = rng.index(4);
        let vm = bound_to[t];
        let o = random_op(&mut rng, &keys);
        let want = expected(&o);
        seqs[t] += 1;
        // Every tenth names another VM in the body: ignored, the binding decides.
        let body = if n % 10 == 3 {
            let other = &vms[(vm + 1) % 4];
            format!(
                r#"{{"operation":{},"vm":"{}"}}"#,
                serde_json::to_string(&o).unwrap(),
                other.id
            )
        } else {
            format!(r#"{{"operation":{}}}"#, serde_json::to_string(&o).unwrap())
        };
        let rec = anon
            .send_operation(creds[t].sign(seqs[t], control::now_ms(), &body))
            .await
            .unwrap_or_else(|e| panic!("op {n} from t{t}: {e}"));
        assert_eq!(rec.vm, vms[vm].id, "op {n}: recorded on the wrong VM");
        if rec.outcome == OperationOutcome::Sent {
            answered_sent += 1;
        } else {
            assert_eq!(rec.outcome, OperationOutcome::Performed, "op {n}: {rec:?}");
        }
        let bytes = read_keyboard(&mut qtest[vm], want.len()).await;
        assert_eq!(bytes, want, "op {n} from t{t} to vm{vm}: {o:?}");
        sent[vm].extend_from_slice(&want);
        got[vm].extend_from_slice(&bytes);
        for other in (0..4).filter(|&v| v != vm) {
            let stray = qtest[other].drain_keyboard().await.unwrap();
            assert!(
                stray.is_empty(),
                "op {n} from t{t} (bound to vm{vm}) reached vm{other}: {stray:02x?}"
            );
        }
    }
    let took = t0.elapsed();
    assert!(sent[..3].iter().all(|s| !s.is_empty()));
    assert!(
        sent[3].is_empty() && got[3].is_empty(),
        "vm3 has no terminal"
    );
    assert_eq!(sent, got, "each VM's whole stream, in order");
    eprintln!(
        "1000 operations through server and agents to 4 QEMUs in {took:?} ({answered_sent} answered `sent` before the host's answer); bytes per VM: {:?}",
        got.iter().map(Vec::len).collect::<Vec<_>>()
    );

    // Refused messages act on nothing, each with its reason.
    let now = control::now_ms();
    let a_key = r#"{"operation":{"op":"key_combo","qcodes":["ctrl","alt","delete"]}}"#;
    let forged = {
        let mut m = creds[0].sign(seqs[0] + 1, now, a_key);
        // Flip one hex digit of the MAC: the header still parses.
        let s = String::from_utf8(m.clone()).unwrap();
        let at = s.find("\"mac\":\"").unwrap() + 7;
        m[at] = if m[at] == b'0' { b'1' } else { b'0' };
        m
    };
    // Another tenant's terminal: it cannot be bound to this tenant's VM, and unbound it
    // acts on nothing.
    let other_tenant = c.admin.create_tenant("other").await.unwrap();
    let theirs = c
        .admin
        .create_terminal(&CreateTerminal {
            name: "theirs".into(),
            tenant: Some("other".into()),
        })
        .await
        .unwrap();
    let them = client::Client::new(&c.url, &other_tenant.token).unwrap();
    let e = them
        .bind_terminal(
            "theirs",
            &BindTerminal {
                vm: vms[0].id.to_string(),
                policy: SharePolicy::Shared,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e.status(), Some(404 | 403)), "{e}");
    let theirs = TerminalCredentials::new(&theirs, &c.url);
    let refusals: Vec<(&str, u16, Vec<u8>)> = vec![
        ("bad_mac", 401, forged),
        ("replay", 409, creds[1].sign(seqs[1], now, a_key)),
        (
            "stale_timestamp",
            401,
            creds[2].sign(seqs[2] + 1, now - 120_000, a_key),
        ),
        ("unbound", 409, theirs.sign(1, now, a_key)),
        (
            // A VM named inside the operation: not an operation at all.
            "bad_operation",
            422,
            creds[3].sign(
                seqs[3] + 1,
                now,
                &format!(
                    r#"{{"operation":{{"op":"key","qcode":"a","down":true,"vm":"{}"}}}}"#,
                    vms[3].id
                ),
            ),
        ),
    ];
    for (reason, status, raw) in refusals {
        let e = anon.send_operation(raw).await.unwrap_err();
        assert_eq!(e.status(), Some(status), "{reason}: {e}");
    }
    // Nothing reached any VM (a performed one would be there by now: each operation
    // before was read back within its answer).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, q) in qtest.iter_mut().enumerate() {
        assert_eq!(q.drain_keyboard().await.unwrap(), Vec::<u8>::new(), "vm{i}");
    }
    // Counted by reason, one each.
    let metrics = c.admin.metrics().await.unwrap();
    let count = |text: &str, reason: &str| -> u64 {
        let key = format!("vinfra_terminal_refusals_total{{reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    for reason in [
        "bad_mac",
        "replay",
        "stale_timestamp",
        "unbound",
        "bad_operation",
    ] {
        assert_eq!(
            count(&metrics, reason) - count(&metrics_before, reason),
            1,
            "{reason}: {metrics}"
        );
    }
    // The logs: every accepted operation, on its bound VM.
    for (t, vm) in bound_to.iter().enumerate() {
        let log = c.admin.terminal_operations(&format!("t{t}")).await.unwrap();
        assert_eq!(u64::try_from(log.len()).unwrap(), seqs[t]);
        assert!(log.iter().all(|o| o.vm == vms[*vm].id));
    }
}
