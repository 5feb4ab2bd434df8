//! `vinfra mec serve` as a process and `vinfra v2x …` against it: an operator provisions a
//! device, the device authorizes with the token it got and receives its configuration
//! parameters, the operator lists and revokes it, and the device is refused afterwards.

use std::process::Command;
use std::time::Duration;

use test_utils::{free_tcp_port, ChildGuard};

use crate::harness::VINFRA;

fn v2x(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(VINFRA)
        .args(["v2x", "--mec", url, "--mec-token", "op-token"])
        .args(args)
        .output()
        .expect("vinfra runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn mec_serve_and_the_v2x_cli() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("token");
    let sec = dir.path().join("secret");
    std::fs::write(&tok, "op-token\n").unwrap();
    std::fs::write(&sec, "roaming\n").unwrap();
    let port = free_tcp_port();
    let listen = format!("127.0.0.1:{port}");
    let _mec = ChildGuard::new(
        tokio::process::Command::new(VINFRA)
            .args(["mec", "serve", "--operator", "001-01", "--listen", &listen])
            .arg("--token-file")
            .arg(&tok)
            .arg("--roaming-secret-file")
            .arg(&sec)
            .kill_on_drop(true)
            .spawn()
            .unwrap(),
    );
    let url = format!("http://{listen}");
    test_utils::wait_for(Duration::from_secs(20), || {
        let url = url.clone();
        async move { v2x(&url, &["devices"]).0 }
    })
    .await
    .expect("the MEC answers");

    let (ok, out, err) = v2x(
        &url,
        &[
            "provision",
            "car-1",
            "--services",
            "36,37",
            "--plmns",
            "002-02",
            "--validity",
            "120",
        ],
    );
    assert!(ok, "{err}");
    let p: serde_json::Value = serde_json::from_str(&out).unwrap();
    let dev_token = p["deviceToken"].as_str().unwrap().to_owned();
    let (ok, out, err) = v2x(
        &url,
        &[
            "authorize",
            "car-1",
            "--device-token",
            &dev_token,
            "--pc5-address",
            "10.77.1.1",
        ],
    );
    assert!(ok, "{err}");
    let cp: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cp["validityTimer"], 120);
    assert_eq!(cp["pc5Authorization"]["nr"][1]["mnc"], "02");
    let (ok, out, _) = v2x(&url, &["devices"]);
    assert!(ok && out.contains("car-1"), "{out}");
    let (ok, out, err) = v2x(
        &url,
        &["provision", "car-2", "--services", "36", "--plmns", "1-1"],
    );
    assert!(!ok && err.contains("not a PLMN"), "{out}{err}");
    let (ok, _, err) = v2x(&url, &["revoke", "car-1"]);
    assert!(ok, "{err}");
    let (ok, _, err) = v2x(
        &url,
        &[
            "authorize",
            "car-1",
            "--device-token",
            &dev_token,
            "--pc5-address",
            "10.77.1.1",
        ],
    );
    assert!(!ok && err.contains("404"), "{err}");
    let (ok, _, err) = Command::new(VINFRA)
        .args(["v2x", "--mec", &url, "--mec-token", "wrong", "devices"])
        .output()
        .map(|o| {
            (
                o.status.success(),
                (),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert!(!ok && err.contains("401"), "{err}");
}
