//! The sim driver against its contract: lifecycle, failure injection, migration between
//! two drivers, adoption by a new driver. File disks, so no NBD server is needed here
//! (the agent's tests run it over the real disk stack).

use std::path::Path;
use std::time::Duration;

use super::*;
use crate::{DiskTarget, GuestImage};
use model::terminal_ops::Operation;

fn config() -> SimConfig {
    SimConfig {
        boot_time: Duration::from_millis(20),
        ..SimConfig::default()
    }
}

fn spec(dir: &Path, img: &GuestImage, id: &str, run: &str) -> VmSpec {
    VmSpec {
        id: id.into(),
        name: id.into(),
        vcpus: 1,
        memory_mib: 64,
        kernel: img.kernel.clone(),
        initrd: img.initrd.clone(),
        cmdline: "console=ttyS0 vinfra.tick_ms=10".into(),
        disk: DiskTarget::File(dir.join(format!("{id}.img"))),
        nics: vec![],
        run_dir: dir.join(run),
        accel: Accel::Auto,
        tables: vec![],
    }
}

fn setup(id: &str) -> (tempfile::TempDir, GuestImage) {
    let dir = tempfile::tempdir().unwrap();
    let img = write_image(&dir.path().join("image"), 8).unwrap();
    std::fs::copy(&img.disk_template, dir.path().join(format!("{id}.img"))).unwrap();
    (dir, img)
}

fn console(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

async fn wait_console(path: &Path, what: impl Fn(&str) -> bool) -> String {
    for _ in 0..500 {
        let c = console(path);
        if what(&c) {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("console never matched:\n{}", console(path));
}

fn ticks_ok(c: &str) -> usize {
    c.lines()
        .filter(|l| l.starts_with("TICK ") && l.ends_with("read=ok write=ok"))
        .count()
}

#[tokio::test]
async fn boots_ticks_pauses_and_stops() {
    let (dir, img) = setup("a");
    let drv = SimDriver::new(config());
    let s = spec(dir.path(), &img, "a", "run-a");
    let rt = drv.start(&s).await.unwrap();
    assert!(drv.pidfile(&rt.run_dir).exists());
    assert!(matches!(
        drv.start(&s).await,
        Err(ComputeError::AlreadyRunning { .. })
    ));
    let c = wait_console(&rt.console_log, |c| ticks_ok(c) >= 3).await;
    assert!(c.starts_with("GUEST: init started"), "{c}");
    assert!(c.contains("GUEST: READY vda=8MiB"), "{c}");
    drv.pause("a").await.unwrap();
    assert_eq!(
        drv.status("a").await.unwrap(),
        VmStatus::Paused {
            state: "paused".into()
        }
    );
    let n = ticks_ok(&console(&rt.console_log));
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(
        ticks_ok(&console(&rt.console_log)),
        n,
        "a paused guest ticks"
    );
    drv.resume("a").await.unwrap();
    wait_console(&rt.console_log, |c| ticks_ok(c) > n).await;
    let st = drv.stop("a").await.unwrap();
    assert_eq!(
        st,
        VmStatus::Stopped {
            reason: "stopped by request".into()
        }
    );
    assert!(!drv.pidfile(&rt.run_dir).exists());
    assert_eq!(drv.status("a").await.unwrap(), st);
    assert_eq!(drv.start_count("a"), 1);
    // A stopped VM starts again, with a fresh console.
    drv.start(&s).await.unwrap();
    assert_eq!(drv.start_count("a"), 2);
    drv.stop("a").await.unwrap();
}

#[tokio::test]
async fn the_guest_powers_off_after_its_ticks() {
    let (dir, img) = setup("p");
    let drv = SimDriver::new(config());
    let mut s = spec(dir.path(), &img, "p", "run-p");
    s.cmdline.push_str(" vinfra.ticks=3");
    let rt = drv.start(&s).await.unwrap();
    let mut w = drv.get("p").unwrap().status.clone();
    w.wait_for(VmStatus::is_exited).await.unwrap();
    assert_eq!(
        drv.status("p").await.unwrap(),
        VmStatus::Stopped {
            reason: "guest powered off".into()
        }
    );
    let c = console(&rt.console_log);
    assert_eq!(ticks_ok(&c), 3, "{c}");
    assert!(c.ends_with("GUEST: POWEROFF reason=ticks-done\n"), "{c}");
}

#[tokio::test]
async fn injected_faults_fail_delay_and_kill() {
    let (dir, img) = setup("f");
    let drv = SimDriver::new(config());
    let s = spec(dir.path(), &img, "f", "run-f");
    drv.fail_next_start("f", "no room for the guest");
    let e = drv.start(&s).await.unwrap_err();
    assert!(
        matches!(&e, ComputeError::StartFailed { log_tail, .. } if log_tail == "no room for the guest"),
        "{e}"
    );
    assert_eq!(drv.start_count("f"), 0);
    drv.delay_next_start("f", Duration::from_millis(300));
    let t0 = Instant::now();
    drv.start(&s).await.unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(300));
    drv.crash("f", "simulated qemu crash").await.unwrap();
    assert_eq!(
        drv.status("f").await.unwrap(),
        VmStatus::Crashed {
            reason: "simulated qemu crash".into()
        }
    );
    // A missing disk fails the start, as QEMU fails to open its blockdev.
    let mut bad = spec(dir.path(), &img, "g", "run-g");
    bad.disk = DiskTarget::File(img.kernel.with_file_name("nope.img"));
    bad.id = "g".into();
    assert!(matches!(
        drv.start(&bad).await,
        Err(ComputeError::InvalidSpec { .. })
    ));
    bad.disk = DiskTarget::NbdTcp {
        host: "127.0.0.1".into(),
        port: 1,
        export: "x".into(),
    };
    assert!(matches!(
        drv.start(&bad).await,
        Err(ComputeError::StartFailed { .. })
    ));
}

/// Both ends share the disk file, as hosts share an origin.
#[tokio::test]
async fn migrates_between_two_drivers_and_the_tick_count_continues() {
    let (dir, img) = setup("m");
    let (src, dst) = (SimDriver::new(config()), SimDriver::new(config()));
    let s = spec(dir.path(), &img, "m", "src");
    let d = spec(dir.path(), &img, "m", "dst");
    let rt = src.start(&s).await.unwrap();
    wait_console(&rt.console_log, |c| ticks_ok(c) >= 5).await;
    let inc = dst
        .start_incoming(&d, "127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let at = inc.incoming.unwrap();
    assert_ne!(at.port(), 0);
    assert_eq!(
        dst.status("m").await.unwrap(),
        VmStatus::Paused {
            state: "inmigrate".into()
        }
    );
    let stats = src
        .migrate("m", &format!("tcp:{at}"), &MigrateOptions::default())
        .await
        .unwrap();
    assert!(stats.ram_transferred_bytes >= 64 * 4096, "{stats:?}");
    assert!(matches!(
        src.status("m").await.unwrap(),
        VmStatus::Stopped { reason } if reason.starts_with("migrated to tcp:")
    ));
    assert!(!src.pidfile(&rt.run_dir).exists());
    assert_eq!(dst.status("m").await.unwrap(), VmStatus::Running);
    let last_src = console(&rt.console_log)
        .lines()
        .filter_map(|l| {
            l.strip_prefix("TICK ")?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap();
    let c = wait_console(&inc.console_log, |c| ticks_ok(c) >= 2).await;
    assert!(
        !c.contains("GUEST: init"),
        "no reboot on the destination: {c}"
    );
    let first_dst: u64 = c
        .lines()
        .find_map(|l| l.strip_prefix("TICK ")?.split(' ').next()?.parse().ok())
        .unwrap();
    assert_eq!(first_dst, last_src + 1, "{c}");
    dst.stop("m").await.unwrap();
}

#[tokio::test]
async fn an_interrupted_migration_leaves_the_source_running() {
    let (dir, img) = setup("i");
    let (src, dst) = (SimDriver::new(config()), SimDriver::new(config()));
    let rt = src
        .start(&spec(dir.path(), &img, "i", "src"))
        .await
        .unwrap();
    wait_console(&rt.console_log, |c| ticks_ok(c) >= 1).await;
    let inc = dst
        .start_incoming(
            &spec(dir.path(), &img, "i", "dst"),
            "127.0.0.1:0".parse().unwrap(),
            None,
        )
        .await
        .unwrap();
    src.interrupt_next_migration("i");
    let e = src
        .migrate(
            "i",
            &format!("tcp:{}", inc.incoming.unwrap()),
            &MigrateOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ComputeError::MigrationFailed { .. }), "{e}");
    assert_eq!(src.status("i").await.unwrap(), VmStatus::Running);
    let n = ticks_ok(&console(&rt.console_log));
    wait_console(&rt.console_log, |c| ticks_ok(c) > n).await;
    let mut w = dst.get("i").unwrap().status.clone();
    tokio::time::timeout(Duration::from_secs(5), w.wait_for(VmStatus::is_exited))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        dst.status("i").await.unwrap(),
        VmStatus::Crashed { reason } if reason.starts_with("incoming migration failed")
    ));
    src.stop("i").await.unwrap();
}

#[tokio::test]
async fn a_new_driver_adopts_a_running_vm_from_its_files() {
    let (dir, img) = setup("r");
    let s = spec(dir.path(), &img, "r", "run-r");
    let old = SimDriver::new(config());
    let rt = old.start(&s).await.unwrap();
    wait_console(&rt.console_log, |c| ticks_ok(c) >= 3).await;
    // The same driver: the VM never stopped.
    assert_eq!(old.adopt("r", &rt.run_dir).await.unwrap().id, "r");
    drop(old); // the hypervisor process dies; the pidfile stays
    let n = ticks_ok(&console(&rt.console_log));
    let new = SimDriver::new(config());
    assert!(new.pidfile(&rt.run_dir).exists());
    new.adopt("r", &rt.run_dir).await.unwrap();
    assert_eq!(new.status("r").await.unwrap(), VmStatus::Running);
    let c = wait_console(&rt.console_log, |c| ticks_ok(c) > n + 1).await;
    assert_eq!(c.matches("GUEST: init started").count(), 1, "{c}");
    let ticks: Vec<u64> = c
        .lines()
        .filter_map(|l| l.strip_prefix("TICK ")?.split(' ').next()?.parse().ok())
        .collect();
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "{ticks:?}");
    assert_eq!(new.start_count("r"), 0);
    new.stop("r").await.unwrap();
    assert!(matches!(
        SimDriver::new(config()).adopt("r", &rt.run_dir).await,
        Err(ComputeError::Adopt { .. })
    ));
}

fn op(json: &str) -> Operation {
    serde_json::from_str(json).unwrap()
}

fn input_lines(c: &str) -> Vec<&str> {
    c.lines().filter_map(|l| l.strip_prefix("INPUT ")).collect()
}

#[tokio::test]
async fn terminal_operations_reach_the_guest_in_order() {
    let (dir, img) = setup("t");
    let drv = SimDriver::new(config());
    let rt = drv
        .start(&spec(dir.path(), &img, "t", "run-t"))
        .await
        .unwrap();
    wait_console(&rt.console_log, |c| c.contains("GUEST: READY")).await;
    let ops = [
        op(r#"{"op":"type_text","text":"Hi\n"}"#),
        op(r#"{"op":"key_combo","qcodes":["ctrl","alt","delete"]}"#),
        op(r#"{"op":"key","qcode":"f1","down":true}"#),
        op(r#"{"op":"pointer_move","x":100,"y":32767}"#),
        op(r#"{"op":"pointer_button","button":"left","down":true}"#),
        op(r#"{"op":"wheel","delta":-1}"#),
    ];
    for o in &ops {
        assert_eq!(drv.perform("t", o).await.unwrap(), OpOutcome::Done, "{o:?}");
    }
    let c = console(&rt.console_log);
    let expect: Vec<String> = ops
        .iter()
        .flat_map(Operation::input_events)
        .map(|e| e.to_string())
        .collect();
    assert_eq!(input_lines(&c), expect);
    assert_eq!(
        input_lines(&c)[..4],
        ["key shift down", "key h down", "key h up", "key shift up"]
    );
    assert!(c.contains("INPUT move 100 32767\n"));

    // A screenshot is a small PNG that changes with the input performed.
    let OpOutcome::Screenshot(a) = drv.perform("t", &Operation::Screenshot).await.unwrap() else {
        panic!("no screenshot")
    };
    assert_eq!((a.width, a.height), (SIM_SCREEN_WIDTH, SIM_SCREEN_HEIGHT));
    assert_eq!(crate::png::dimensions(&a.png).unwrap(), (320, 200));
    drv.perform("t", &ops[2]).await.unwrap();
    let OpOutcome::Screenshot(b) = drv.perform("t", &Operation::Screenshot).await.unwrap() else {
        panic!("no screenshot")
    };
    assert_ne!(a.png, b.png);

    // Invalid operations are refused before they reach anything.
    let e = drv
        .perform("t", &Operation::Wheel { delta: 0 })
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ComputeError::InvalidOperation { err, .. } if err.field == "delta"),
        "{e}"
    );
    assert!(matches!(
        drv.perform("nope", &ops[0]).await,
        Err(ComputeError::NotFound { .. })
    ));

    // Paused, the guest takes no input (as QEMU refuses it); power resume runs it again.
    let pause = op(r#"{"op":"power","action":"pause"}"#);
    drv.perform("t", &pause).await.unwrap();
    assert!(matches!(
        drv.status("t").await.unwrap(),
        VmStatus::Paused { .. }
    ));
    let e = drv.perform("t", &ops[0]).await.unwrap_err();
    assert!(
        matches!(
            &e,
            ComputeError::InvalidState {
                op: "type_text",
                ..
            }
        ),
        "{e}"
    );
    drv.perform("t", &op(r#"{"op":"power","action":"resume"}"#))
        .await
        .unwrap();
    drv.perform("t", &op(r#"{"op":"power","action":"on"}"#))
        .await
        .unwrap();
    assert_eq!(drv.status("t").await.unwrap(), VmStatus::Running);

    // The record holds what was performed, in order; the refused ones are not in it.
    let done: Vec<&str> = drv.performed("t").iter().map(Operation::kind).collect();
    assert_eq!(
        done,
        [
            "type_text",
            "key_combo",
            "key",
            "pointer_move",
            "pointer_button",
            "wheel",
            "screenshot",
            "key",
            "screenshot",
            "power",
            "power",
            "power"
        ]
    );
    assert!(drv.performed("nope").is_empty());
    drv.stop("t").await.unwrap();
}

#[tokio::test]
async fn reset_reboots_and_the_power_button_powers_off() {
    let (dir, img) = setup("r");
    let drv = SimDriver::new(config());
    let s = spec(dir.path(), &img, "r", "run-r");
    let rt = drv.start(&s).await.unwrap();
    wait_console(&rt.console_log, |c| ticks_ok(c) >= 3).await;
    drv.perform("r", &op(r#"{"op":"power","action":"reset"}"#))
        .await
        .unwrap();
    // A second boot, and the tick count starts again (it lived in guest RAM).
    let c = wait_console(&rt.console_log, |c| {
        c.matches("GUEST: init started").count() == 2 && c.matches("TICK 0 ").count() == 2
    })
    .await;
    assert_eq!(c.matches("GUEST: READY").count(), 2, "{c}");
    assert_eq!(drv.status("r").await.unwrap(), VmStatus::Running);

    // The power button of a paused guest takes effect when it runs again.
    drv.perform("r", &op(r#"{"op":"power","action":"pause"}"#))
        .await
        .unwrap();
    let shutdown = op(r#"{"op":"power","action":"shutdown"}"#);
    drv.perform("r", &shutdown).await.unwrap();
    assert!(matches!(
        drv.status("r").await.unwrap(),
        VmStatus::Paused { .. }
    ));
    drv.perform("r", &op(r#"{"op":"power","action":"resume"}"#))
        .await
        .unwrap();
    let mut w = drv.get("r").unwrap().status.clone();
    w.wait_for(VmStatus::is_exited).await.unwrap();
    assert_eq!(
        drv.status("r").await.unwrap(),
        VmStatus::Stopped {
            reason: "guest powered off".into()
        }
    );
    assert!(console(&rt.console_log).ends_with("GUEST: POWEROFF reason=power-button\n"));
    // Off, it takes nothing; powering it on is its agent's job (a start with the spec).
    for (o, name) in [
        (op(r#"{"op":"power","action":"on"}"#), "power on"),
        (op(r#"{"op":"key","qcode":"a","down":true}"#), "key"),
        (Operation::Screenshot, "screenshot"),
    ] {
        let e = drv.perform("r", &o).await.unwrap_err();
        assert!(
            matches!(&e, ComputeError::InvalidState { op, .. } if *op == name),
            "{e}"
        );
    }
    drv.start(&s).await.unwrap();
    drv.perform("r", &shutdown).await.unwrap();
    let mut w = drv.get("r").unwrap().status.clone();
    w.wait_for(VmStatus::is_exited).await.unwrap();
}
