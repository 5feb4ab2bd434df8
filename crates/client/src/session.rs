//! The terminal's end of a terminal session (`GET /v1/terminal-sessions`, a
//! WebSocket): signed operation messages out, one [`SessionReply`] back per message, in
//! order. TCP and TLS are set up here (trusting the cluster CA, like the REST client);
//! tungstenite does only the WebSocket handshake and framing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use model::terminals::{SessionReplies, SessionReply};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::terminal::TerminalCredentials;
use crate::ClientTls;

/// A byte stream a session runs over: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Ws = WebSocketStream<Box<dyn Io>>;

/// Why a session could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The credentials' URL is not an http(s) URL with a host.
    #[error("terminal URL {0:?}: must be an http:// or https:// URL with a host")]
    Url(String),
    /// No connection to the server.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// An https URL and no CA to trust.
    #[error("{0} is https: the cluster CA is needed (--ca-file)")]
    NoCa(String),
    /// TLS set-up failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The WebSocket handshake or a frame failed.
    #[error("terminal session: {0}")]
    WebSocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    /// The server sent something that is not a reply.
    #[error("terminal session: the server sent a message that is not a reply: {0}")]
    BadReply(String),
}

/// An open session, to send with ([`SessionSender`]) and read replies from
/// ([`SessionReceiver`]) at once.
pub struct TerminalSession {
    ws: Ws,
    creds: TerminalCredentials,
    /// The server answered one of this session's messages: the session has this
    /// terminal, and later messages leave it and the server out of their headers.
    established: Arc<AtomicBool>,
}

impl std::fmt::Debug for TerminalSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TerminalSession")
            .field("terminal", &self.creds.terminal)
            .finish_non_exhaustive()
    }
}

/// Sends a session's messages.
pub struct SessionSender {
    sink: SplitSink<Ws, Message>,
    creds: TerminalCredentials,
    established: Arc<AtomicBool>,
}

/// Reads a session's replies.
pub struct SessionReceiver {
    stream: SplitStream<Ws>,
    established: Arc<AtomicBool>,
}

/// A message signed for a session: in full until the server answered one of them.
fn signed(
    creds: &TerminalCredentials,
    established: &AtomicBool,
    seq: u64,
    ts: u64,
    body: &str,
) -> Vec<u8> {
    if established.load(Ordering::Acquire) {
        creds.sign_in_session(seq, ts, body)
    } else {
        creds.sign(seq, ts, body)
    }
}

/// Notes an answer on `established` (a refusal says nothing about the session's terminal).
fn note(reply: &SessionReply, established: &AtomicBool) {
    if matches!(
        reply,
        SessionReply::Answer { .. } | SessionReply::Outcome { .. }
    ) {
        established.store(true, Ordering::Release);
    }
}

impl std::fmt::Debug for SessionSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSender")
            .field("terminal", &self.creds.terminal)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SessionReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionReceiver").finish_non_exhaustive()
    }
}

impl TerminalSession {
    /// Opens a session to the first server of the credentials' URL; answers carry the
    /// operation's record.
    pub async fn connect(
        creds: &TerminalCredentials,
        tls: Option<&ClientTls>,
    ) -> Result<Self, SessionError> {
        Self::connect_with(creds, tls, SessionReplies::Full).await
    }

    /// Opens a session whose answers come in `form` (`Brief`: the sequence number and
    /// outcome, [`SessionReply::Outcome`]).
    pub async fn connect_with(
        creds: &TerminalCredentials,
        tls: Option<&ClientTls>,
        form: SessionReplies,
    ) -> Result<Self, SessionError> {
        let first = creds.url.split(',').next().unwrap_or_default().trim();
        let url = reqwest::Url::parse(first).map_err(|_| SessionError::Url(first.to_owned()))?;
        let host = url
            .host_str()
            .ok_or_else(|| SessionError::Url(first.to_owned()))?
            .to_owned();
        let port = url
            .port_or_known_default()
            .ok_or_else(|| SessionError::Url(first.to_owned()))?;
        let addr = format!("{host}:{port}");
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|source| SessionError::Connect {
                addr: addr.clone(),
                source,
            })?;
        // Operation messages are small and each is waited for: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let (io, scheme): (Box<dyn Io>, &str) = match url.scheme() {
            "http" => (Box::new(tcp), "ws"),
            "https" => {
                let tls = tls.ok_or_else(|| SessionError::NoCa(first.to_owned()))?;
                let cfg = tls::client_config(&tls.ca_pem, tls.identity.as_ref())
                    .map_err(|e| SessionError::Tls(e.to_string()))?;
                let name = rustls_pki_name(&host)?;
                let s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| SessionError::Tls(e.to_string()))?;
                (Box::new(s), "wss")
            }
            _ => return Err(SessionError::Url(first.to_owned())),
        };
        let request = match form {
            SessionReplies::Full => format!("{scheme}://{addr}/v1/terminal-sessions"),
            SessionReplies::Brief => {
                format!("{scheme}://{addr}/v1/terminal-sessions?replies=brief")
            }
        };
        let (ws, _) = tokio_tungstenite::client_async(request, io)
            .await
            .map_err(Box::new)?;
        Ok(Self {
            ws,
            creds: creds.clone(),
            established: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Sends one operation message (`body` a JSON object) and waits for its reply.
    pub async fn call(
        &mut self,
        seq: u64,
        timestamp: u64,
        body: &str,
    ) -> Result<SessionReply, SessionError> {
        let msg = signed(&self.creds, &self.established, seq, timestamp, body);
        self.ws
            .send(Message::Binary(msg.into()))
            .await
            .map_err(Box::new)?;
        let reply = next_reply(&mut self.ws).await?;
        note(&reply, &self.established);
        Ok(reply)
    }

    /// The two halves, to send and read at once.
    pub fn split(self) -> (SessionSender, SessionReceiver) {
        let (sink, stream) = self.ws.split();
        (
            SessionSender {
                sink,
                creds: self.creds,
                established: Arc::clone(&self.established),
            },
            SessionReceiver {
                stream,
                established: self.established,
            },
        )
    }
}

impl SessionSender {
    /// Sends one operation message (`body` a JSON object).
    pub async fn send(&mut self, seq: u64, timestamp: u64, body: &str) -> Result<(), SessionError> {
        let msg = signed(&self.creds, &self.established, seq, timestamp, body);
        self.sink
            .send(Message::Binary(msg.into()))
            .await
            .map_err(|e| Box::new(e).into())
    }

    /// Closes the session (the server releases what it holds).
    pub async fn close(mut self) -> Result<(), SessionError> {
        self.sink.close().await.map_err(|e| Box::new(e).into())
    }
}

impl SessionReceiver {
    /// The next reply; `None` when the server closed the session.
    pub async fn next(&mut self) -> Option<Result<SessionReply, SessionError>> {
        loop {
            let frame = match self.stream.next().await? {
                Ok(f) => f,
                Err(e) => return Some(Err(Box::new(e).into())),
            };
            if let Some(r) = decode(frame) {
                if let Ok(reply) = &r {
                    note(reply, &self.established);
                }
                return Some(r);
            }
        }
    }
}

async fn next_reply<S>(ws: &mut S) -> Result<SessionReply, SessionError>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let Some(frame) = ws.next().await else {
            return Err(SessionError::BadReply(
                "the server closed the session".into(),
            ));
        };
        if let Some(r) = decode(frame.map_err(Box::new)?) {
            return r;
        }
    }
}

/// A reply from a frame; `None` for control frames (pings are answered by tungstenite).
fn decode(frame: Message) -> Option<Result<SessionReply, SessionError>> {
    let text = match frame {
        Message::Text(t) => t.as_str().to_owned(),
        Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
        Message::Close(_) => {
            return Some(Err(SessionError::BadReply(
                "the server closed the session".into(),
            )))
        }
        _ => return None,
    };
    Some(serde_json::from_str(&text).map_err(|e| SessionError::BadReply(format!("{e}: {text}"))))
}

fn rustls_pki_name(
    host: &str,
) -> Result<tokio_rustls::rustls::pki_types::ServerName<'static>, SessionError> {
    tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| SessionError::Tls(format!("server name {host:?}: {e}")))
}
