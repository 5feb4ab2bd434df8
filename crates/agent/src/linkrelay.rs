//! Seed 2 inside vinfra guests: the agent is the link endpoint of every VNF whose VDUs it
//! runs. The orchestrator sends it a [`LinkRequest`] (one JSON line on `--link-listen`);
//! the agent finds the local guest that owns the second CP (the `cps` file in each run
//! dir, written when the NICs were plugged) and asks it, over its virtio-serial port
//! `vinfra.link`, to connect that CP to the first CP's address. The guest's own network
//! stack makes the connection and reports what the first CP answered; the agent passes
//! that back as a [`LinkReply`].
//!
//! Guest protocol (see `scripts/build-guest.sh`): `CONNECT <link> <cp2> <cp1> <ip> <port>
//! <secs>` in, `UP <link> <ack>` or `FAIL <link> <reason>` out. An answer to an earlier
//! request the agent gave up on can still arrive on a later connection; its link name
//! tells it apart, and it is skipped.
//!
//! Requests to one guest are serialized (one control port per guest); requests to
//! different guests run in parallel. The relay listens on loopback by default and has no
//! authentication of its own, like the link agents it stands for.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use model::api::{LinkReply, LinkRequest};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::Mutex;

use crate::netdev::CPS_FILE;

/// Guest ports in use, so that one guest gets one request at a time.
type PortLocks = Arc<std::sync::Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>>;

/// Serves link requests on `listener` for the guests under `data_dir` until dropped.
pub async fn serve(listener: TcpListener, data_dir: PathBuf) {
    let locks: PortLocks = Arc::default();
    loop {
        let Ok((s, peer)) = listener.accept().await else {
            continue;
        };
        let (dir, locks) = (data_dir.clone(), locks.clone());
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match serde_json::from_str::<LinkRequest>(&line) {
                Ok(req) => {
                    tracing::info!(%peer, link = req.link, cp = req.second_cp, "link request");
                    relay(&dir, &locks, &req).await
                }
                Err(e) => LinkReply {
                    up: false,
                    detail: format!("bad request: {e}"),
                },
            };
            let mut out = serde_json::to_string(&reply).unwrap_or_default();
            out.push('\n');
            let _ = w.write_all(out.as_bytes()).await;
        });
    }
}

/// The control port of the local guest that owns CP `cp`, if any.
fn find_port(data_dir: &Path, cp: &str) -> Option<PathBuf> {
    let vms = std::fs::read_dir(data_dir.join(crate::local::VMS_DIR)).ok()?;
    vms.flatten().map(|e| e.path()).find_map(|dir| {
        let cps = std::fs::read_to_string(dir.join(CPS_FILE)).ok()?;
        let port = dir.join(compute::qemu::files::LINK);
        (cps.lines().any(|l| l == cp) && port.exists()).then_some(port)
    })
}

/// A word of the guest protocol: no whitespace, so the guest's `read` splits it right.
fn word(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(char::is_whitespace)
}

async fn relay(data_dir: &Path, locks: &PortLocks, req: &LinkRequest) -> LinkReply {
    let fail = |detail: String| LinkReply { up: false, detail };
    if ![&req.link, &req.first_cp, &req.second_cp]
        .iter()
        .all(|w| word(w))
    {
        return fail("bad request: link and CP ids must be single words".into());
    }
    let Some(port) = find_port(data_dir, &req.second_cp) else {
        return fail(format!("no guest on this host has CP {}", req.second_cp));
    };
    let lock = match locks.lock() {
        Ok(mut m) => m.entry(port.clone()).or_default().clone(),
        Err(_) => return fail("link relay state is poisoned".into()),
    };
    let _one_at_a_time = lock.lock().await;
    let timeout = Duration::from_millis(req.timeout_ms);
    // The guest's connect gets a whole number of seconds, a little under our own
    // deadline, so that its answer arrives before we give up.
    let secs = (req.timeout_ms * 4 / 5 / 1000).max(1);
    let cmd = format!(
        "CONNECT {} {} {} {} {} {secs}\n",
        req.link, req.second_cp, req.first_cp, req.first_ip, req.port
    );
    let talk = async {
        let s = UnixStream::connect(&port)
            .await
            .map_err(|e| format!("guest control port {}: {e}", port.display()))?;
        let (r, mut w) = s.into_split();
        w.write_all(cmd.as_bytes())
            .await
            .map_err(|e| format!("guest control port: {e}"))?;
        // Keep the write half open: a half-closed socket makes QEMU drop the connection
        // before the guest has answered.
        let mut lines = BufReader::new(r).lines();
        loop {
            let Some(line) = lines
                .next_line()
                .await
                .map_err(|e| format!("guest control port: {e}"))?
            else {
                return Err("the guest closed its control port".to_owned());
            };
            match parse_answer(&line, &req.link) {
                Some(reply) => return Ok(reply),
                None => tracing::debug!(line, "skipping a stale guest answer"),
            }
        }
    };
    match tokio::time::timeout(timeout, talk).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => fail(e),
        Err(_) => fail(format!(
            "the guest owning CP {} did not answer within {} ms",
            req.second_cp, req.timeout_ms
        )),
    }
}

/// The guest's answer for `link`, or `None` for an answer to another request.
fn parse_answer(line: &str, link: &str) -> Option<LinkReply> {
    let (verdict, rest) = line.trim().split_once(' ')?;
    let (l, detail) = rest.split_once(' ').unwrap_or((rest, ""));
    if l != link {
        return None;
    }
    match verdict {
        "UP" => Some(LinkReply {
            up: true,
            detail: detail.to_owned(),
        }),
        "FAIL" => Some(LinkReply {
            up: false,
            detail: format!("guest: {detail}"),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_matched_by_link_name() {
        let up = parse_answer("UP l1 ACK l1 FROM b TO a BY a", "l1").unwrap();
        assert!(up.up);
        assert_eq!(up.detail, "ACK l1 FROM b TO a BY a");
        assert!(parse_answer("UP l0 ACK l0 FROM b TO a BY a", "l1").is_none());
        let f = parse_answer("FAIL l1 nc: timed out", "l1").unwrap();
        assert!(!f.up);
        assert_eq!(f.detail, "guest: nc: timed out");
        assert!(parse_answer("FAIL - unknown command X", "l1").is_none());
        assert!(parse_answer("garbage", "l1").is_none());
    }

    #[test]
    fn the_cp_owner_is_found_by_its_cps_file() {
        let d = tempfile::tempdir().unwrap();
        let vm = d.path().join(crate::local::VMS_DIR).join("0123456789ab");
        std::fs::create_dir_all(&vm).unwrap();
        std::fs::write(vm.join(CPS_FILE), "fw-cp\nfw-mgmt\n").unwrap();
        // No control port yet (the guest is not running): not found.
        assert_eq!(find_port(d.path(), "fw-cp"), None);
        std::fs::write(vm.join(compute::qemu::files::LINK), "").unwrap();
        assert_eq!(
            find_port(d.path(), "fw-mgmt"),
            Some(vm.join(compute::qemu::files::LINK))
        );
        assert_eq!(find_port(d.path(), "fw"), None);
    }
}
