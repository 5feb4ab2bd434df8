//! `vinfra mec serve` as a process and `vinfra v2x …` against it: an operator provisions a
//! device, the device authorizes with the token it got and receives its configuration
//! parameters, the operator lists and revokes it, and the device is refused afterwards.

use std::process::Command;
use std::time::Duration;

use test_utils::{free_tcp_port, ChildGuard};

use crate::harness::VINFRA;

pub(crate) fn v2x(url: &str, args: &[&str]) -> (bool, String, String) {
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

/// `vinfra v2x authorize DEVICE --device-token T --pc5-address A`.
pub(crate) fn authorize(url: &str, dev: &str, token: &str, pc5: &str) -> (bool, String, String) {
    v2x(
        url,
        &[
            "authorize",
            dev,
            "--device-token",
            token,
            "--pc5-address",
            pc5,
        ],
    )
}

/// Starts `vinfra mec serve` for 001-01 on `listen` and waits until it answers.
pub(crate) async fn mec(
    dir: &std::path::Path,
    listen: &str,
    state: Option<&std::path::Path>,
) -> ChildGuard {
    let tok = dir.join("token");
    let sec = dir.join("secret");
    std::fs::write(&tok, "op-token\n").unwrap();
    std::fs::write(&sec, "roaming\n").unwrap();
    let mut c = tokio::process::Command::new(VINFRA);
    c.args(["mec", "serve", "--operator", "001-01", "--listen", listen])
        .arg("--token-file")
        .arg(&tok)
        .arg("--roaming-secret-file")
        .arg(&sec)
        .kill_on_drop(true);
    if let Some(s) = state {
        c.arg("--state-dir").arg(s);
    }
    let g = ChildGuard::new(c.spawn().unwrap());
    let url = format!("http://{listen}");
    test_utils::wait_for(Duration::from_secs(20), || {
        let url = url.clone();
        async move { v2x(&url, &["devices"]).0 }
    })
    .await
    .expect("the MEC answers");
    g
}

#[tokio::test]
async fn mec_serve_and_the_v2x_cli() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_tcp_port());
    let _mec = mec(dir.path(), &listen, None).await;
    let url = format!("http://{listen}");

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
    let (ok, out, err) = authorize(&url, "car-1", &dev_token, "10.77.1.1");
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
    let (ok, _, err) = authorize(&url, "car-1", &dev_token, "10.77.1.1");
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

/// What a MEC acknowledged survives its `kill -9`: subscriptions (with the device token
/// handed out before), authorizations, links and VIS subscriptions (same ETag).
#[tokio::test]
async fn mec_state_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let listen = format!("127.0.0.1:{}", free_tcp_port());
    let url = format!("http://{listen}");
    let mut m = mec(dir.path(), &listen, Some(&state)).await;
    let provision = |dev: &str| {
        let (ok, out, err) = v2x(
            &url,
            &["provision", dev, "--services", "36", "--plmns", "002-02"],
        );
        assert!(ok, "{err}");
        let p: serde_json::Value = serde_json::from_str(&out).unwrap();
        p["deviceToken"].as_str().unwrap().to_owned()
    };
    let t1 = provision("car-1");
    let t2 = provision("car-2");
    let (ok, _, err) = authorize(&url, "car-1", &t1, "10.77.1.1");
    assert!(ok, "{err}");
    let http = reqwest::Client::new();
    let link: serde_json::Value = http
        .post(format!("{url}/v2x/v1/links"))
        .bearer_auth(&t1)
        .json(
            &serde_json::json!({"deviceId": "car-1", "peerAddress": "10.77.2.1",
            "peerPlmn": {"mcc": "002", "mnc": "02"}, "v2xServiceId": 36}),
        )
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let vis_sub = http
        .post(format!("{url}/vis/v2/subscriptions"))
        .bearer_auth("op-token")
        .json(
            &serde_json::json!({"subscriptionType": "V2xMsgSubscription",
            "callbackReference": "http://127.0.0.1:9/notify",
            "filterCriteria": {"stdOrganization": "ETSI", "msgType": ["2"]}}),
        )
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let etag = vis_sub.headers()["etag"].to_str().unwrap().to_owned();
    let href = vis_sub.headers()["location"].to_str().unwrap().to_owned();
    let (ok, _, err) = v2x(&url, &["revoke", "car-2"]);
    assert!(ok, "{err}");

    m.kill();
    drop(m);
    let _m = mec(dir.path(), &listen, Some(&state)).await;
    let (ok, out, _) = v2x(&url, &["devices"]);
    assert!(
        ok && out.contains("car-1") && !out.contains("car-2"),
        "{out}"
    );
    let (ok, out, err) = v2x(&url, &["links", "--device", "car-1"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(link["id"].as_str().unwrap()),
        "the link survived: {out}"
    );
    // The token shown once before the crash still authorizes; the revoked one does not.
    let (ok, _, err) = authorize(&url, "car-1", &t1, "10.77.1.1");
    assert!(ok, "{err}");
    let (ok, _, err) = authorize(&url, "car-2", &t2, "10.77.1.2");
    assert!(!ok && err.contains("404"), "{err}");
    // A new client: the old one's pooled connection died with the process.
    let back = reqwest::Client::new()
        .get(&href)
        .bearer_auth("op-token")
        .send()
        .await
        .unwrap();
    assert!(
        back.status().is_success(),
        "{href}: {:?}",
        back.text().await
    );
    assert_eq!(back.headers()["etag"].to_str().unwrap(), etag);
    // The token is stored hashed: it appears nowhere in the state files.
    for f in std::fs::read_dir(&state).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        assert!(!text.contains(&t1), "a device token was stored in clear");
    }
}
