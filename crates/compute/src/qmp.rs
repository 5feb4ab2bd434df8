//! QMP (QEMU Machine Protocol) client over one long-lived connection.
//!
//! QEMU serves one QMP client per socket at a time (a second `connect()` gets no greeting
//! until the first leaves) and delivers events only to the connected client, so each QEMU
//! gets exactly one [`QmpClient`]: commands carry an `"id"` and are multiplexed on the
//! connection, replies are routed back by id, and events are broadcast to subscribers.
//!
//! Tasks: one actor per connection owns the socket (no lock around it). [`QmpClient`] is a
//! cheap handle (clone it); when the last handle is dropped the actor ends and the socket is
//! closed, which lets the next client (e.g. a restarted agent) connect.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// Longest QMP line accepted. QEMU's largest replies (query-qmp-schema) are a few hundred
/// KiB; anything beyond this is a broken peer, not a reply to buffer forever.
pub const MAX_LINE: usize = 8 << 20;

/// Default time a command may take before [`QmpError::Timeout`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// The socket could not be connected.
    #[error("cannot connect to qmp socket {path}")]
    Connect {
        /// The QMP socket.
        path: PathBuf,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
    /// QEMU sent no greeting in time (another client may hold the socket).
    #[error("no qmp greeting within {timeout:?} (is another client connected?)")]
    NoGreeting {
        /// How long we waited.
        timeout: Duration,
    },
    /// Reading or writing the socket failed.
    #[error("qmp connection i/o failed")]
    Io(#[source] std::io::Error),
    /// A line from QEMU was not valid QMP.
    #[error("malformed qmp message")]
    Codec(#[source] QmpCodecError),
    /// QEMU answered a command with an error.
    #[error("qmp command {command} failed: {class}: {desc}")]
    Command {
        /// The command that failed.
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// A command got no reply in time.
    #[error("qmp command {command} got no reply within {timeout:?}")]
    Timeout {
        /// The command.
        command: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The connection is closed (QEMU exited or closed the monitor).
    #[error("qmp connection closed")]
    Disconnected,
    /// A reply did not have the shape the typed helper expected.
    #[error("unexpected reply to qmp command {command}")]
    Decode {
        /// The command.
        command: String,
        /// The cause.
        #[source]
        err: serde_json::Error,
    },
}

/// Errors decoding one QMP line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpCodecError {
    /// Not JSON.
    #[error("qmp line is not json")]
    Json(#[source] serde_json::Error),
    /// JSON, but none of greeting / return / error / event.
    #[error("qmp message has no QMP, return, error or event member")]
    UnknownShape,
    /// A line longer than [`MAX_LINE`].
    #[error("qmp line longer than {max} bytes")]
    LineTooLong {
        /// The limit.
        max: usize,
    },
}

/// QEMU's greeting, sent once when a client connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpGreeting {
    /// `major.minor.micro` of the QEMU on the other end.
    pub version: String,
    /// The distribution's package string (may be empty).
    pub package: String,
}

/// QEMU's event timestamp (host wall clock when QEMU emitted the event).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QmpTimestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl QmpTimestamp {
    /// Microseconds since the Unix epoch.
    pub fn as_micros(self) -> i64 {
        self.seconds
            .saturating_mul(1_000_000)
            .saturating_add(self.microseconds)
    }
}

/// An asynchronous event from QEMU (`STOP`, `RESUME`, `SHUTDOWN`, `MIGRATION`, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `SHUTDOWN`.
    pub name: String,
    /// The event's `data` member (`Null` when absent).
    pub data: Value,
    /// When QEMU emitted it.
    pub timestamp: Option<QmpTimestamp>,
}

/// One decoded line from QEMU.
#[derive(Clone, Debug, PartialEq)]
pub enum QmpMessage {
    /// The connection greeting.
    Greeting(QmpGreeting),
    /// A successful reply.
    Return {
        /// The echoed id (we only send unsigned integers).
        id: Option<u64>,
        /// The `return` member.
        value: Value,
    },
    /// A failed reply.
    Error {
        /// The echoed id; absent when QEMU could not parse the request.
        id: Option<u64>,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// An event.
    Event(QmpEvent),
}

/// Decodes one QMP line (trailing `\r\n` / whitespace allowed).
pub fn decode(line: &[u8]) -> Result<QmpMessage, QmpCodecError> {
    let v: Value = serde_json::from_slice(line.trim_ascii()).map_err(QmpCodecError::Json)?;
    let obj = v.as_object().ok_or(QmpCodecError::UnknownShape)?;
    let id = obj.get("id").and_then(Value::as_u64);
    if let Some(ret) = obj.get("return") {
        return Ok(QmpMessage::Return {
            id,
            value: ret.clone(),
        });
    }
    if let Some(err) = obj.get("error") {
        let field = |k: &str| {
            err.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        return Ok(QmpMessage::Error {
            id,
            class: field("class"),
            desc: field("desc"),
        });
    }
    if let Some(name) = obj.get("event").and_then(Value::as_str) {
        let timestamp = obj
            .get("timestamp")
            .and_then(|t| serde_json::from_value(t.clone()).ok());
        return Ok(QmpMessage::Event(QmpEvent {
            name: name.to_owned(),
            data: obj.get("data").cloned().unwrap_or(Value::Null),
            timestamp,
        }));
    }
    if let Some(q) = obj.get("QMP") {
        let ver = &q["version"]["qemu"];
        let n = |k: &str| ver.get(k).and_then(Value::as_u64).unwrap_or_default();
        return Ok(QmpMessage::Greeting(QmpGreeting {
            version: format!("{}.{}.{}", n("major"), n("minor"), n("micro")),
            package: q["version"]["package"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        }));
    }
    Err(QmpCodecError::UnknownShape)
}

/// Encodes one command line (with the trailing newline).
pub fn encode_command(id: u64, execute: &str, arguments: Option<&Value>) -> Vec<u8> {
    let mut msg = serde_json::Map::new();
    msg.insert("execute".into(), Value::from(execute));
    if let Some(a) = arguments {
        msg.insert("arguments".into(), a.clone());
    }
    msg.insert("id".into(), Value::from(id));
    let mut out = Value::Object(msg).to_string().into_bytes();
    out.push(b'\n');
    out
}

/// Splits a byte stream into lines, refusing lines longer than a limit.
#[derive(Debug)]
pub struct LineFramer {
    buf: Vec<u8>,
    max: usize,
}

impl LineFramer {
    /// A framer refusing lines longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete non-blank line (without its `\n`), if any.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, QmpCodecError> {
        loop {
            match self.buf.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                    line.pop();
                    if line.len() > self.max {
                        return Err(QmpCodecError::LineTooLong { max: self.max });
                    }
                    if line.trim_ascii().is_empty() {
                        continue;
                    }
                    return Ok(Some(line));
                }
                None if self.buf.len() > self.max => {
                    return Err(QmpCodecError::LineTooLong { max: self.max });
                }
                None => return Ok(None),
            }
        }
    }
}

/// `query-status` result.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct RunStatus {
    /// QEMU's RunState: `running`, `paused`, `inmigrate`, `postmigrate`, `shutdown`, ...
    pub status: String,
    /// Whether guest CPUs execute.
    pub running: bool,
}

/// RAM part of `query-migrate`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationRam {
    /// Bytes sent so far.
    #[serde(default)]
    pub transferred: u64,
    /// Guest RAM size in bytes.
    #[serde(default)]
    pub total: u64,
    /// Bytes still to send.
    #[serde(default)]
    pub remaining: u64,
    /// Dirty-bitmap sync passes.
    #[serde(default)]
    pub dirty_sync_count: u64,
    /// Zero pages (sent as a marker only).
    #[serde(default)]
    pub duplicate: u64,
    /// Full pages sent.
    #[serde(default)]
    pub normal: u64,
    /// Throughput in Mbit/s.
    #[serde(default)]
    pub mbps: f64,
}

/// `query-migrate` result (fields QEMU omits are `None`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// `none`, `setup`, `active`, `device`, `completed`, `failed`, `cancelled`, ...
    #[serde(default)]
    pub status: Option<String>,
    /// Milliseconds since the migration started.
    pub total_time: Option<u64>,
    /// Milliseconds the guest was paused (QEMU's own number).
    pub downtime: Option<u64>,
    /// Expected downtime while active.
    pub expected_downtime: Option<u64>,
    /// Setup milliseconds.
    pub setup_time: Option<u64>,
    /// RAM counters.
    pub ram: Option<MigrationRam>,
    /// Failure description when `status` is `failed`.
    pub error_desc: Option<String>,
    /// Incoming side: the addresses QEMU listens on (resolved port when asked for port 0).
    pub socket_address: Option<Vec<Value>>,
}

/// `migrate-set-parameters` arguments we use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParameters {
    /// Maximum tolerated downtime in ms (QEMU default 300).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Bytes per second (QEMU default 128 MiB/s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Id of a `tls-creds-x509` object: the migration stream runs over TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// The name the destination's certificate must carry (the source connects by
    /// address, the certificate names the host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
}

/// Commands awaiting a reply, by id: the command name (for errors) and where to reply.
type Pending = HashMap<u64, (String, oneshot::Sender<Result<Value, QmpError>>)>;

#[derive(Debug)]
struct Request {
    execute: String,
    arguments: Option<Value>,
    reply: oneshot::Sender<Result<Value, QmpError>>,
}

/// Handle on one QMP connection. Clones share the connection.
#[derive(Clone, Debug)]
pub struct QmpClient {
    tx: mpsc::Sender<Request>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
    greeting: QmpGreeting,
}

impl QmpClient {
    /// Connects to a QMP unix socket, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream =
            tokio::net::UnixStream::connect(path)
                .await
                .map_err(|err| QmpError::Connect {
                    path: path.to_owned(),
                    err,
                })?;
        Self::from_stream(stream, timeout).await
    }

    /// Runs the protocol over any byte stream (used by tests with an in-memory pipe).
    pub async fn from_stream<S>(stream: S, timeout: Duration) -> Result<Self, QmpError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, wr) = tokio::io::split(stream);
        let mut framer = LineFramer::new(MAX_LINE);
        let greeting = tokio::time::timeout(timeout, async {
            let mut chunk = vec![0u8; 8192];
            loop {
                if let Some(line) = framer.next_line().map_err(QmpError::Codec)? {
                    // Seen rarely at VM start: a line that is not the greeting arrives
                    // first. Skip it (bounded by the timeout) rather than fail the start.
                    match decode(&line) {
                        Ok(QmpMessage::Greeting(g)) => return Ok(g),
                        other => {
                            tracing::warn!(
                                line = %String::from_utf8_lossy(&line),
                                decoded = ?other,
                                "qmp line before the greeting, skipped"
                            );
                            continue;
                        }
                    }
                }
                let n = rd.read(&mut chunk).await.map_err(QmpError::Io)?;
                if n == 0 {
                    return Err(QmpError::Disconnected);
                }
                framer.push(&chunk[..n]);
            }
        })
        .await
        .map_err(|_| QmpError::NoGreeting { timeout })??;

        let (tx, rx) = mpsc::channel(64);
        let (events, _) = broadcast::channel(256);
        let (closed_tx, closed) = watch::channel(false);
        tokio::spawn(actor(rd, wr, framer, rx, events.clone(), closed_tx));
        let client = Self {
            tx,
            events,
            closed,
            greeting,
        };
        client
            .execute_timeout("qmp_capabilities", None, timeout)
            .await?;
        Ok(client)
    }

    /// The greeting QEMU sent.
    pub fn greeting(&self) -> &QmpGreeting {
        &self.greeting
    }

    /// Receives every event emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Resolves when the connection has ended (QEMU exited or closed the socket).
    pub async fn closed(&self) {
        let mut rx = self.closed.clone();
        // An Err means the actor is gone, which also means closed.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Runs a command with [`DEFAULT_COMMAND_TIMEOUT`] and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, DEFAULT_COMMAND_TIMEOUT)
            .await
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let (reply, rx) = oneshot::channel();
        let req = Request {
            execute: command.to_owned(),
            arguments,
            reply,
        };
        self.tx
            .send(req)
            .await
            .map_err(|_| QmpError::Disconnected)?;
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(QmpError::Timeout {
                command: command.to_owned(),
                timeout,
            }),
            Ok(Err(_)) => Err(QmpError::Disconnected),
            Ok(Ok(r)) => r,
        }
    }

    async fn typed<T: serde::de::DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T, QmpError> {
        let v = self.execute(command, arguments).await?;
        serde_json::from_value(v).map_err(|err| QmpError::Decode {
            command: command.to_owned(),
            err,
        })
    }

    /// `query-status`.
    pub async fn query_status(&self) -> Result<RunStatus, QmpError> {
        self.typed("query-status", None).await
    }

    /// `stop`: pauses the guest CPUs.
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// `cont`: resumes the guest CPUs.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// `quit`: QEMU exits. A connection that closes before the reply counts as success,
    /// because QEMU may exit before flushing it.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Disconnected) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `migrate` to a URI such as `tcp:127.0.0.1:4444`. Returns once QEMU accepted it;
    /// poll [`QmpClient::query_migrate`] for progress.
    pub async fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(serde_json::json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// `migrate-incoming` (destination started with `-incoming defer`).
    pub async fn migrate_incoming(&self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(serde_json::json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// `migrate_cancel`.
    pub async fn migrate_cancel(&self) -> Result<(), QmpError> {
        self.execute("migrate_cancel", None).await.map(drop)
    }

    /// `query-migrate`.
    pub async fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        self.typed("query-migrate", None).await
    }

    /// `migrate-set-parameters`.
    pub async fn migrate_set_parameters(&self, p: &MigrationParameters) -> Result<(), QmpError> {
        let args = serde_json::to_value(p).map_err(|err| QmpError::Decode {
            command: "migrate-set-parameters".into(),
            err,
        })?;
        self.execute("migrate-set-parameters", Some(args))
            .await
            .map(drop)
    }

    /// `object-add` of a `tls-creds-x509` object `id` reading PEM files from `dir`
    /// (`ca-cert.pem`, and `server-*` or `client-*` per `endpoint`); peers must present
    /// certificates from the same CA.
    pub async fn add_tls_creds(
        &self,
        id: &str,
        dir: &std::path::Path,
        endpoint: &str,
    ) -> Result<(), QmpError> {
        let args = serde_json::json!({
            "qom-type": "tls-creds-x509",
            "id": id,
            "dir": dir.display().to_string(),
            "endpoint": endpoint,
            "verify-peer": true,
        });
        self.execute("object-add", Some(args)).await.map(drop)
    }

    /// `migrate-set-capabilities` with `(capability, state)` pairs, e.g. `("events", true)`.
    pub async fn migrate_set_capabilities(&self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, s)| serde_json::json!({ "capability": c, "state": s }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(serde_json::json!({ "capabilities": list })),
        )
        .await
        .map(drop)
    }
}

/// Owns the socket: writes requests, reads lines, routes replies by id and broadcasts events.
async fn actor<R, W>(
    mut rd: R,
    mut wr: W,
    mut framer: LineFramer,
    mut rx: mpsc::Receiver<Request>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut pending: Pending = HashMap::new();
    let mut next_id: u64 = 1;
    let mut chunk = vec![0u8; 8192];
    // Lines may already be buffered behind the greeting.
    let mut ready = true;
    loop {
        if ready {
            ready = false;
            loop {
                match framer.next_line() {
                    Ok(Some(line)) => route(&line, &mut pending, &events),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "qmp stream broken, closing");
                        finish(pending, &closed);
                        return;
                    }
                }
            }
        }
        tokio::select! {
            req = rx.recv() => {
                let Some(req) = req else { break };
                let id = next_id;
                next_id += 1;
                let line = encode_command(id, &req.execute, req.arguments.as_ref());
                tracing::debug!(id, command = %req.execute, "qmp ->");
                if let Err(e) = wr.write_all(&line).await {
                    let _ = req.reply.send(Err(QmpError::Io(e)));
                    break;
                }
                pending.insert(id, (req.execute, req.reply));
            }
            n = rd.read(&mut chunk) => match n {
                Ok(0) => break,
                Ok(n) => { framer.push(&chunk[..n]); ready = true; }
                Err(e) => {
                    tracing::debug!(error = %e, "qmp read failed");
                    break;
                }
            },
        }
    }
    finish(pending, &closed);
}

fn finish(pending: Pending, closed: &watch::Sender<bool>) {
    for (_, (_, reply)) in pending {
        let _ = reply.send(Err(QmpError::Disconnected));
    }
    closed.send_replace(true);
}

fn route(line: &[u8], pending: &mut Pending, events: &broadcast::Sender<QmpEvent>) {
    match decode(line) {
        Ok(QmpMessage::Return {
            id: Some(id),
            value,
        }) => {
            if let Some((_, reply)) = pending.remove(&id) {
                let _ = reply.send(Ok(value));
            } else {
                tracing::debug!(id, "qmp reply for no pending command");
            }
        }
        Ok(QmpMessage::Error {
            id: Some(id),
            class,
            desc,
        }) => {
            if let Some((command, reply)) = pending.remove(&id) {
                let _ = reply.send(Err(QmpError::Command {
                    command,
                    class,
                    desc,
                }));
            }
        }
        Ok(QmpMessage::Event(ev)) => {
            tracing::debug!(event = %ev.name, "qmp event");
            // No subscribers is fine: nobody asked for events.
            let _ = events.send(ev);
        }
        Ok(other) => tracing::warn!(message = ?other, "unroutable qmp message"),
        Err(e) => tracing::warn!(error = %e, "ignoring malformed qmp line"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded from QEMU 10.0.2 on this machine (see qemu-migration-notes.md), with QEMU's \r\n.
    const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"Debian 1:10.0.2+ds-2+deb13u1~bpo12+1\"}, \"capabilities\": [\"oob\"]}}\r\n";

    #[test]
    fn decodes_recorded_lines() {
        assert_eq!(
            decode(GREETING.as_bytes()).unwrap(),
            QmpMessage::Greeting(QmpGreeting {
                version: "10.0.2".into(),
                package: "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1".into()
            })
        );
        let ev = decode(b"{\"timestamp\": {\"seconds\": 1795594770, \"microseconds\": 170414}, \"event\": \"MIGRATION\", \"data\": {\"status\": \"setup\"}}\r\n").unwrap();
        let QmpMessage::Event(ev) = ev else {
            panic!("not an event: {ev:?}")
        };
        assert_eq!(ev.name, "MIGRATION");
        assert_eq!(ev.data["status"], "setup");
        assert_eq!(ev.timestamp.unwrap().as_micros(), 1_795_594_770_170_414);
        // STOP has no data member.
        let QmpMessage::Event(stop) = decode(b"{\"timestamp\": {\"seconds\": 1795594770, \"microseconds\": 738611}, \"event\": \"STOP\"}").unwrap() else {
            panic!()
        };
        assert_eq!(stop.data, Value::Null);
        assert_eq!(
            decode(b"{\"id\": 7, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command no-such-cmd has not been found\"}}\r\n").unwrap(),
            QmpMessage::Error { id: Some(7), class: "CommandNotFound".into(), desc: "The command no-such-cmd has not been found".into() }
        );
        assert_eq!(
            decode(b"{\"return\": {\"status\": \"postmigrate\", \"running\": false}, \"id\": 3}")
                .unwrap(),
            QmpMessage::Return {
                id: Some(3),
                value: serde_json::json!({"status": "postmigrate", "running": false})
            }
        );
    }

    #[test]
    fn decodes_completed_query_migrate() {
        let line = br#"{"return": {"status": "completed", "setup-time": 5, "downtime": 9, "total-time": 577, "ram": {"total": 268967936, "postcopy-requests": 0, "dirty-sync-count": 3, "multifd-bytes": 0, "pages-per-second": 37140, "downtime-bytes": 3907155, "page-size": 4096, "remaining": 0, "postcopy-bytes": 0, "mbps": 1176.3853286713288, "transferred": 84111551, "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 80080066, "duplicate": 45914, "dirty-pages-rate": 0, "normal-bytes": 83410944, "normal": 20364}}}"#;
        let QmpMessage::Return { value, .. } = decode(line).unwrap() else {
            panic!()
        };
        let info: MigrationInfo = serde_json::from_value(value).unwrap();
        assert_eq!(info.status.as_deref(), Some("completed"));
        assert_eq!(info.downtime, Some(9));
        assert_eq!(info.total_time, Some(577));
        let ram = info.ram.unwrap();
        assert_eq!(ram.transferred, 84_111_551);
        assert_eq!(ram.dirty_sync_count, 3);
        // The incoming side reports the resolved port as a string.
        let line = br#"{"return": {"status": "setup", "socket-address": [{"port": "35919", "ipv4": true, "host": "127.0.0.1", "type": "inet"}]}}"#;
        let QmpMessage::Return { value, .. } = decode(line).unwrap() else {
            panic!()
        };
        let info: MigrationInfo = serde_json::from_value(value).unwrap();
        assert_eq!(info.socket_address.unwrap()[0]["port"], "35919");
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(matches!(decode(b"not json"), Err(QmpCodecError::Json(_))));
        assert!(matches!(decode(b"[1,2]"), Err(QmpCodecError::UnknownShape)));
        assert!(matches!(
            decode(b"{\"foo\": 1}"),
            Err(QmpCodecError::UnknownShape)
        ));
        assert!(decode(b"").is_err());
    }

    #[test]
    fn framer_splits_partial_and_crlf_lines() {
        let mut f = LineFramer::new(64);
        f.push(b"{\"return\": {}, \"id\"");
        assert!(f.next_line().unwrap().is_none());
        f.push(b": 1}\r\n\r\n{\"event\": \"STOP\"}\r\n{\"ret");
        assert_eq!(
            f.next_line().unwrap().unwrap(),
            b"{\"return\": {}, \"id\": 1}\r"
        );
        assert_eq!(f.next_line().unwrap().unwrap(), b"{\"event\": \"STOP\"}\r");
        assert!(f.next_line().unwrap().is_none());
        f.push(&[b'x'; 100]);
        assert!(matches!(
            f.next_line(),
            Err(QmpCodecError::LineTooLong { max: 64 })
        ));
    }

    #[test]
    fn encodes_command_with_id() {
        let line = encode_command(
            4,
            "migrate",
            Some(&serde_json::json!({"uri": "tcp:127.0.0.1:4444"})),
        );
        assert_eq!(line.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444"}, "id": 4})
        );
        let v: Value = serde_json::from_slice(&encode_command(1, "quit", None)).unwrap();
        assert_eq!(v, serde_json::json!({"execute": "quit", "id": 1}));
    }

    /// A fake QEMU on an in-memory pipe: replies out of order, interleaves events, and
    /// answers one command with an error.
    #[tokio::test]
    async fn client_routes_replies_by_id_and_broadcasts_events() {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let fake = tokio::spawn(async move {
            let (rd, mut wr) = tokio::io::split(theirs);
            let mut lines = BufReader::new(rd).lines();
            wr.write_all(GREETING.as_bytes()).await.unwrap();
            let caps: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(caps["execute"], "qmp_capabilities");
            wr.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\r\n", caps["id"]).as_bytes())
                .await
                .unwrap();
            let a: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            let b: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            let (status, bogus) = if a["execute"] == "query-status" {
                (a, b)
            } else {
                (b, a)
            };
            // Answer the second request first, with an event in between.
            let out = format!(
                "{{\"id\": {}, \"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"The command bogus has not been found\"}}}}\r\n\
                 {{\"timestamp\": {{\"seconds\": 1, \"microseconds\": 2}}, \"event\": \"STOP\"}}\r\n\
                 {{\"return\": {{\"status\": \"paused\", \"running\": false}}, \"id\": {}}}\r\n",
                bogus["id"], status["id"]
            );
            // Split mid-line to exercise the framer across reads.
            let (x, y) = out.as_bytes().split_at(50);
            wr.write_all(x).await.unwrap();
            wr.flush().await.unwrap();
            tokio::task::yield_now().await;
            wr.write_all(y).await.unwrap();
            // Then hang up without answering anything else.
            let _ = lines.next_line().await;
        });
        let qmp = QmpClient::from_stream(ours, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(qmp.greeting().version, "10.0.2");
        let mut events = qmp.subscribe();
        let (st, bogus) = tokio::join!(qmp.query_status(), qmp.execute("bogus", None));
        assert_eq!(
            st.unwrap(),
            RunStatus {
                status: "paused".into(),
                running: false
            }
        );
        match bogus {
            Err(QmpError::Command { command, class, .. }) => {
                assert_eq!(command, "bogus");
                assert_eq!(class, "CommandNotFound");
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        let ev = events.recv().await.unwrap();
        assert_eq!(ev.name, "STOP");
        // The fake reads one more line then exits: the pending command sees Disconnected.
        let r = qmp.execute("query-migrate", None).await;
        assert!(matches!(r, Err(QmpError::Disconnected)), "{r:?}");
        qmp.closed().await;
        assert!(qmp.is_closed());
        fake.await.unwrap();
    }

    #[tokio::test]
    async fn no_greeting_times_out() {
        let (ours, _theirs) = tokio::io::duplex(64);
        let r = QmpClient::from_stream(ours, Duration::from_millis(100)).await;
        assert!(matches!(r, Err(QmpError::NoGreeting { .. })), "{r:?}");
    }
}
