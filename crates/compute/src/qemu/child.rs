//! One QEMU child: connecting to its QMP socket, listening for an incoming migration, and
//! watching the process until it exits to say why it did.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};

use super::run_dir::log_tail;
use super::{Shared, START_TIMEOUT};
use crate::qmp::{MigrationParameters, QmpClient, QmpEvent};
use crate::{proc, ComputeError, VmStatus};

pub(super) async fn qmp_set_events(qmp: &QmpClient) -> Result<(), crate::QmpError> {
    qmp.migrate_set_capabilities(&[("events", true)]).await
}

/// Waits for QEMU's QMP socket and connects, failing early if QEMU exits.
pub(super) async fn connect_child(
    id: &str,
    child: &mut tokio::process::Child,
    qmp_path: &Path,
    log_path: &Path,
) -> Result<QmpClient, ComputeError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ComputeError::StartFailed {
                id: id.to_owned(),
                status: describe_exit(status),
                log_tail: log_tail(log_path),
            });
        }
        // QEMU greets once its main loop runs, after opening the disk: on a loaded host
        // that can take a while, so the greeting may use the rest of the start budget.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        match QmpClient::connect(qmp_path, left).await {
            Ok(q) => return Ok(q),
            Err(crate::QmpError::Connect { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => {
                return Err(ComputeError::Qmp {
                    id: id.to_owned(),
                    err,
                })
            }
        }
    }
}

/// Starts listening for the migration stream and returns the address QEMU listens on.
pub(super) async fn listen_incoming(
    id: &str,
    qmp: &QmpClient,
    listen: SocketAddr,
    tls: Option<&crate::MigrationTls>,
) -> Result<SocketAddr, ComputeError> {
    let qmp_err = |err| ComputeError::Qmp {
        id: id.to_owned(),
        err,
    };
    if let Some(t) = tls {
        qmp.add_tls_creds(crate::MIGRATION_TLS_ID, &t.dir, "server")
            .await
            .map_err(qmp_err)?;
        qmp.migrate_set_parameters(&MigrationParameters {
            tls_creds: Some(crate::MIGRATION_TLS_ID.to_owned()),
            ..MigrationParameters::default()
        })
        .await
        .map_err(qmp_err)?;
    }
    // `-incoming defer` + migrate-incoming rather than `-incoming tcp:..`: a busy port then
    // comes back as a QMP error instead of a dead QEMU, and port 0 works (QEMU reports it).
    qmp_set_events(qmp).await.map_err(qmp_err)?;
    let uri = match listen {
        SocketAddr::V4(a) => format!("tcp:{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("tcp:[{}]:{}", a.ip(), a.port()),
    };
    qmp.migrate_incoming(&uri).await.map_err(qmp_err)?;
    let info = qmp.query_migrate().await.map_err(qmp_err)?;
    let port = info
        .socket_address
        .as_ref()
        .and_then(|l| l.first())
        .and_then(|a| match &a["port"] {
            serde_json::Value::String(s) => s.parse::<u16>().ok(),
            v => v.as_u64().and_then(|p| u16::try_from(p).ok()),
        });
    match port {
        Some(p) => Ok(SocketAddr::new(listen.ip(), p)),
        None if listen.port() != 0 => Ok(listen),
        None => Err(ComputeError::StartFailed {
            id: id.to_owned(),
            status: "running".into(),
            log_tail: "qemu did not report its incoming migration port".into(),
        }),
    }
}

#[derive(Debug, Default)]
pub(super) struct Observed {
    pub(super) shutdown_reason: Option<String>,
    pub(super) panicked: bool,
}

impl Observed {
    pub(super) fn see(&mut self, ev: &QmpEvent, shared: &Shared) {
        match ev.name.as_str() {
            "RESUME" => {
                *shared.resumed_at_us.lock().expect("resume lock poisoned") =
                    ev.timestamp.map(|t| t.as_micros());
            }
            "SHUTDOWN" => {
                self.shutdown_reason = ev.data["reason"].as_str().map(str::to_owned);
            }
            "GUEST_PANICKED" => self.panicked = true,
            _ => {}
        }
    }
}

/// Reaps our QEMU child and records why it exited.
pub(super) async fn watch_child(
    mut child: tokio::process::Child,
    mut events: broadcast::Receiver<QmpEvent>,
    shared: Arc<Shared>,
    exit: watch::Sender<Option<VmStatus>>,
    log_path: PathBuf,
) {
    let mut seen = Observed::default();
    let mut events_open = true;
    let status = loop {
        tokio::select! {
            st = child.wait() => break st.ok(),
            ev = events.recv(), if events_open => match ev {
                Ok(ev) => seen.see(&ev, &shared),
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => events_open = false,
            },
        }
    };
    // SHUTDOWN precedes the exit but may still sit in the channel.
    while let Ok(ev) = events.try_recv() {
        seen.see(&ev, &shared);
    }
    let note = shared
        .stop_note
        .lock()
        .expect("stop note lock poisoned")
        .clone();
    let st = classify(
        status.map(Some).unwrap_or(None),
        &seen,
        note,
        &log_tail(&log_path),
    );
    tracing::info!(status = ?st, "qemu exited");
    exit.send_replace(Some(st));
}

/// Watches an adopted QEMU (not our child: no exit status) until it is gone.
pub(super) async fn watch_adopted(
    pid: u32,
    qmp: QmpClient,
    mut events: broadcast::Receiver<QmpEvent>,
    shared: Arc<Shared>,
    exit: watch::Sender<Option<VmStatus>>,
) {
    let mut seen = Observed::default();
    loop {
        tokio::select! {
            _ = qmp.closed() => break,
            ev = events.recv() => match ev {
                Ok(ev) => seen.see(&ev, &shared),
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    while let Ok(ev) = events.try_recv() {
        seen.see(&ev, &shared);
    }
    // The monitor closes as QEMU exits; the process may linger a moment.
    while !proc::wait_gone(pid, Duration::from_secs(1)).await {}
    let note = shared
        .stop_note
        .lock()
        .expect("stop note lock poisoned")
        .clone();
    let st = classify(None, &seen, note, "");
    tracing::info!(status = ?st, "adopted qemu exited");
    exit.send_replace(Some(st));
}

pub(super) fn describe_exit(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => st.to_string(),
    }
}

pub(super) fn shutdown_text(reason: &str) -> String {
    match reason {
        "guest-shutdown" => "guest powered off".into(),
        "host-qmp-quit" => "quit over qmp".into(),
        "host-signal" => "qemu got a termination signal".into(),
        "guest-reset" => "guest reset".into(),
        other => format!("qemu shut down ({other})"),
    }
}

/// Turns what we know about an exit into a status. `exit` is `None` for adopted processes.
pub(super) fn classify(
    exit: Option<ExitStatus>,
    seen: &Observed,
    note: Option<String>,
    tail: &str,
) -> VmStatus {
    if seen.panicked || seen.shutdown_reason.as_deref() == Some("guest-panic") {
        return VmStatus::Crashed {
            reason: "guest panicked".into(),
        };
    }
    let orderly = note
        .clone()
        .or_else(|| seen.shutdown_reason.as_deref().map(shutdown_text));
    let with_tail = |s: String| {
        if tail.is_empty() {
            s
        } else {
            format!("{s}: {tail}")
        }
    };
    match exit {
        Some(st) if st.success() => VmStatus::Stopped {
            reason: orderly.unwrap_or_else(|| "qemu exited".into()),
        },
        // We killed it after a quit timeout: still the stop that was asked for.
        Some(st) if note.is_some() => VmStatus::Stopped {
            reason: format!("{} ({})", note.unwrap_or_default(), describe_exit(st)),
        },
        Some(st) => VmStatus::Crashed {
            reason: with_tail(format!("qemu died ({})", describe_exit(st))),
        },
        None => match orderly {
            Some(reason) => VmStatus::Stopped { reason },
            // Every orderly QEMU exit emits SHUTDOWN first; without one it was killed.
            None => VmStatus::Crashed {
                reason: "qemu exited without shutting down (adopted: exit status unknown)".into(),
            },
        },
    }
}
