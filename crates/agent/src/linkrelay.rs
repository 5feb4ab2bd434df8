//! Link establishment between VNF connection points inside vinfra guests: the agent is the
//! link endpoint of every VNF whose VDUs it runs. The orchestrator sends it a
//! [`LinkRequest`] (one JSON line on `--link-listen`); the agent finds the local guest that
//! owns the second CP (the `cps` file in each run dir, written when the NICs were plugged)
//! and asks it, over its virtio-serial port `vinfra.link`, to connect that CP to the first
//! CP's address. The guest's own network stack makes the connection and reports what the
//! first CP answered; the agent passes that back as a [`LinkReply`].
//!
//! Guest protocol (see `scripts/build-guest.sh`): `CONNECT <link> <cp2> <cp1> <ip> <port>
//! <secs>` in, `UP <link> <ack>` or `FAIL <link> <reason>` out. An answer to an earlier
//! request the agent gave up on can still arrive on a later connection; its link name
//! tells it apart, and it is skipped.
//!
//! Requests to one guest are serialized (one control port per guest); requests to
//! different guests run in parallel. Every request must carry a vinfra bearer token
//! (`auth`) that may read the VM owning the CP (asked of the control plane): another
//! tenant's token, or none, is refused, so the relay acts for nobody who could not see the
//! VM through the API.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use model::api::{LinkReply, LinkRequest};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::Mutex;

use crate::files::CPS_FILE;

/// Guest ports in use, so that one guest gets one request at a time.
type PortLocks = Arc<std::sync::Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>>;

/// Serves link requests on `listener` for the guests under `data_dir` until dropped;
/// tokens are checked against the control plane at `server_url`.
pub async fn serve(
    listener: TcpListener,
    data_dir: PathBuf,
    server_url: String,
    tls: Option<client::ClientTls>,
) {
    let locks: PortLocks = Arc::default();
    loop {
        let Ok((s, peer)) = listener.accept().await else {
            continue;
        };
        let (dir, locks, server) = (data_dir.clone(), locks.clone(), server_url.clone());
        let tls = tls.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match serde_json::from_str::<LinkRequest>(&line) {
                Ok(req) => {
                    tracing::info!(%peer, link = req.link, cp = req.second_cp, "link request");
                    match authorize(&server, tls.as_ref(), &dir, &req).await {
                        Ok(()) => relay(&dir, &locks, &req).await,
                        Err(detail) => LinkReply { up: false, detail },
                    }
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

/// The run dir of the local guest that owns CP `cp` (with a control port), if any.
fn find_vm(data_dir: &Path, cp: &str) -> Option<PathBuf> {
    let vms = std::fs::read_dir(data_dir.join(crate::files::VMS_DIR)).ok()?;
    vms.flatten().map(|e| e.path()).find(|dir| {
        std::fs::read_to_string(dir.join(CPS_FILE)).is_ok_and(|cps| cps.lines().any(|l| l == cp))
            && dir.join(compute::qemu::files::LINK).exists()
    })
}

/// Checks that `req.auth` may read the VM owning the CP, through the control plane.
async fn authorize(
    server: &str,
    tls: Option<&client::ClientTls>,
    data_dir: &Path,
    req: &LinkRequest,
) -> Result<(), String> {
    let Some(token) = &req.auth else {
        return Err("link requests to vinfra guests need a vinfra token (auth)".into());
    };
    let Some(dir) = find_vm(data_dir, &req.second_cp) else {
        return Err(format!("no guest on this host has CP {}", req.second_cp));
    };
    let id = std::fs::read_to_string(dir.join("vm-id"))
        .map_err(|e| format!("cannot read the VM id of CP {}: {e}", req.second_cp))?;
    let client = crate::api_client(server, token, tls).map_err(|e| e.to_string())?;
    match client.get_vm(id.trim()).await {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.status(), Some(401 | 403 | 404)) => Err(format!(
            "the token may not act on the VM owning CP {}",
            req.second_cp
        )),
        Err(e) => Err(format!(
            "cannot check the token with the control plane: {e}"
        )),
    }
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
    let Some(port) = find_vm(data_dir, &req.second_cp).map(|d| d.join(compute::qemu::files::LINK))
    else {
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
        let vm = d.path().join(crate::files::VMS_DIR).join("0123456789ab");
        std::fs::create_dir_all(&vm).unwrap();
        std::fs::write(vm.join(CPS_FILE), "fw-cp\nfw-mgmt\n").unwrap();
        // No control port yet (the guest is not running): not found.
        assert_eq!(find_vm(d.path(), "fw-cp"), None);
        std::fs::write(vm.join(compute::qemu::files::LINK), "").unwrap();
        assert_eq!(find_vm(d.path(), "fw-mgmt"), Some(vm.clone()));
        assert_eq!(find_vm(d.path(), "fw"), None);
    }
}
