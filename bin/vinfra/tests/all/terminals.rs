//! A terminal operating a real QEMU guest through the CLI: text typed by `vinfra
//! terminal send` and by `vinfra terminal connect` reaches the guest's keyboard (the
//! guest echoes each line typed on its first virtual terminal to the serial console),
//! and a screenshot is a PNG of the guest's display.
//!
//! The line `send` types is long on purpose: 40 characters are 120 bytes of scancodes,
//! eight times the PS/2 keyboard's 16-byte queue, so they go out in several QMP commands
//! and the driver must wait for the guest to read each before the next (a guest on a
//! loaded host lost keys before it did).

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use crate::harness::{cli, cluster, path_in, spawn_agent, wait_host_up, VINFRA};

#[tokio::test]
async fn a_terminal_types_into_a_real_guest_and_takes_its_picture() {
    let (s, token_file) = cluster().await;
    let admin = s.admin();
    let host_dir = path_in(&s, "h");
    let _agent = spawn_agent(&s, "host-a", &host_dir, &token_file);
    wait_host_up(&s, "host-a").await;
    let t = s.admin_token();
    let (ok, out, err) = cli(&s, &t, &["vm", "create", "demo", "--host", "host-a"]);
    assert!(ok, "vm create: {out}{err}");

    let creds = path_in(&s, "kiosk.json");
    let creds_arg = creds.display().to_string();
    let (ok, out, err) = cli(
        &s,
        &t,
        &["terminal", "create", "kiosk", "--credentials", &creds_arg],
    );
    assert!(ok, "terminal create: {out}{err}");
    let (ok, out, err) = cli(&s, &t, &["terminal", "bind", "kiosk", "demo"]);
    assert!(ok, "terminal bind: {out}{err}");

    // One-off: a line typed with `send`.
    let (ok, out, err) = cli(
        &s,
        "no-token-needed",
        &[
            "terminal",
            "send",
            "--credentials",
            &creds_arg,
            "--text",
            "a line longer than the PS/2 queue, typed\\n",
        ],
    );
    assert!(ok && out.contains("performed"), "terminal send: {out}{err}");
    let typed = |line: &'static str| {
        let admin = admin.clone();
        async move {
            test_utils::wait_for(Duration::from_secs(60), || async {
                admin
                    .console("demo")
                    .await
                    .unwrap_or_default()
                    .contains(&format!("GUEST: TYPED {line}"))
            })
            .await
            .is_ok()
        }
    };
    assert!(
        typed("a line longer than the PS/2 queue, typed").await,
        "the guest never saw the line: {}",
        admin.console("demo").await.unwrap_or_default()
    );

    // A session: keystrokes piped into `connect` (Ctrl-] ends it).
    let mut child = std::process::Command::new(VINFRA)
        .args([
            "terminal",
            "connect",
            "--credentials",
            &creds_arg,
            "--no-console",
        ])
        .env("VINFRA_URL", &s.url)
        .envs(s.ca_file().map(|f| ("VINFRA_CA_FILE", f)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"typed key by key in a session\r").unwrap();
    stdin.flush().unwrap();
    assert!(
        typed("typed key by key in a session").await,
        "the guest never saw the session's line: {}",
        admin.console("demo").await.unwrap_or_default()
    );
    stdin.write_all(&[0x1d]).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "connect: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A screenshot of the guest's display, as PNG of the size the record reports.
    let png = path_in(&s, "demo.png");
    let (ok, out, err) = cli(
        &s,
        "-",
        &[
            "terminal",
            "screenshot",
            "--credentials",
            &creds_arg,
            &png.display().to_string(),
        ],
    );
    assert!(ok, "terminal screenshot: {out}{err}");
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let (w, h) = (be(16), be(20));
    assert!(err.contains(&format!("{w}x{h} PNG")), "{err}");
    assert!(w >= 320 && h >= 200, "{w}x{h}");
    eprintln!("guest display {w}x{h}, PNG {} bytes", bytes.len());

    // The log has all three, performed on the demo VM.
    let (ok, out, _) = cli(&s, &t, &["terminal", "operations", "kiosk"]);
    assert!(ok);
    assert_eq!(out.matches("performed").count(), 3, "{out}");
}
