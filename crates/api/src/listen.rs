//! The API's listeners: plain TCP on loopback, TLS (with optional client
//! certificates) beyond it, and [`Peer`], what a handler learns about the connection.
//!
//! TLS handshakes run in their own tasks (at most [`MAX_HANDSHAKES`] at once, each
//! bounded by [`HANDSHAKE_TIMEOUT`]), so a client that stalls its handshake holds up
//! nobody; finished connections reach axum through a channel.
//!
//! A TLS connection the server closes lingers ([`Linger`]): after its close_notify the
//! server reads and drops what the client still sends, for at most [`LINGER_TIMEOUT`]
//! and [`LINGER_MAX_BYTES`], before it closes the socket. Without it, a request refused
//! before its body was read (401, 404, 413, 415) had its connection closed with the body
//! still arriving: the kernel answered the rest with a reset, and the client, still
//! writing, got a TLS EOF instead of the answer waiting in its buffer.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

/// Handshakes in progress at most; more connections wait in the kernel's backlog.
pub(crate) const MAX_HANDSHAKES: usize = 256;
/// A client has this long to finish its TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a closed connection keeps reading what its client still sends.
pub(crate) const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// How much a closed connection reads at most before it closes regardless.
pub(crate) const LINGER_MAX_BYTES: usize = 8 << 20;

/// A served connection that lingers when closed: its shutdown sends the TLS
/// close_notify (and the TCP FIN), then reads and drops what the client still sends
/// until the client closes, [`LINGER_MAX_BYTES`] were dropped or [`LINGER_TIMEOUT`]
/// passed (Apache's lingering close). Reads and writes go straight through.
#[derive(Debug)]
pub struct Linger<S> {
    inner: S,
    state: LingerState,
}

#[derive(Debug)]
enum LingerState {
    Open,
    Draining {
        deadline: Pin<Box<tokio::time::Sleep>>,
        left: usize,
    },
    Closed,
}

impl<S> Linger<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            state: LingerState::Open,
        }
    }

    /// The connection inside.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Linger<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Linger<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                LingerState::Open => {
                    let shut = ready!(Pin::new(&mut this.inner).poll_shutdown(cx));
                    if shut.is_err() {
                        // The client is gone already: nothing to wait for.
                        this.state = LingerState::Closed;
                        return Poll::Ready(shut);
                    }
                    this.state = LingerState::Draining {
                        deadline: Box::pin(tokio::time::sleep(LINGER_TIMEOUT)),
                        left: LINGER_MAX_BYTES,
                    };
                }
                LingerState::Draining { deadline, left } => {
                    if std::future::Future::poll(deadline.as_mut(), cx).is_ready() {
                        this.state = LingerState::Closed;
                        continue;
                    }
                    let mut scratch = [0u8; 8192];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match ready!(Pin::new(&mut this.inner).poll_read(cx, &mut buf)) {
                        Ok(()) if !buf.filled().is_empty() => {
                            *left = left.saturating_sub(buf.filled().len());
                            if *left == 0 {
                                this.state = LingerState::Closed;
                            }
                        }
                        // The client's end (or an error): done.
                        _ => this.state = LingerState::Closed,
                    }
                }
                LingerState::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// The connection a request came over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The common name of the client certificate, when the client presented one
    /// (rustls has verified that it chains to the cluster CA): a joined agent's host.
    pub client_cn: Option<String>,
}

/// A plain TCP listener whose connections send small writes at once (see [`nodelay`]).
#[derive(Debug)]
pub(crate) struct PlainListener(TcpListener);

impl Listener for PlainListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (mut tcp, addr) = Listener::accept(&mut self.0).await;
        nodelay(&mut tcp);
        (tcp, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// Answers, events and terminal session replies are small writes, each waited for:
/// Nagle's algorithm would hold one back until the previous one is acknowledged,
/// which a peer delaying its ACKs does 40 ms later.
pub(crate) fn nodelay(tcp: &mut TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
}

/// The plain listener on `listener`.
pub(crate) fn plain(listener: TcpListener) -> PlainListener {
    PlainListener(listener)
}

impl Connected<IncomingStream<'_, PlainListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, PlainListener>) -> Self {
        Peer {
            addr: *stream.remote_addr(),
            tls: false,
            client_cn: None,
        }
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        let (_, conn) = stream.io().get_ref().get_ref();
        let client_cn = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| tls::common_name(c.as_ref()));
        Peer {
            addr: *stream.remote_addr(),
            tls: true,
            client_cn,
        }
    }
}

/// A TCP listener whose connections come out TLS-established.
#[derive(Debug)]
pub struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(Linger<TlsStream<TcpStream>>, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl TlsListener {
    /// Serves TLS with `config` on `listener`.
    pub fn new(listener: TcpListener, config: rustls::ServerConfig) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let acceptor = tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (mut tcp, addr) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors and the like: wait rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                nodelay(&mut tcp);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((Linger::new(stream), addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            rx,
            local,
            acceptor,
        })
    }
}

impl Listener for TlsListener {
    type Io = Linger<TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The acceptor task ended (only when aborted): no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use axum::routing::post;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A TLS server on a free loopback port whose `/early` answers 415 without reading
    /// the body (as every refusal before the body does: 401, 413, 415, 404); its CA.
    async fn early_server() -> (SocketAddr, String) {
        let ca = tls::Ca::generate().unwrap();
        let cert = ca.issue_server(&["127.0.0.1".to_owned()]).unwrap();
        let cfg = tls::server_config(ca.cert_pem(), &cert).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let l = TlsListener::new(tcp, cfg).unwrap();
        let app = axum::Router::new().route(
            "/early",
            post(|| async { StatusCode::UNSUPPORTED_MEDIA_TYPE }),
        );
        tokio::spawn(async move { axum::serve(l, app).await });
        (addr, ca.cert_pem().to_owned())
    }

    /// The TLS EOF schemathesis met on one run in five: a request whose body the server
    /// refuses unread. The server answered, then closed the connection while the client
    /// was still sending the body; the kernel reset it (unread data), and the client,
    /// between two writes, got a broken pipe or a TLS EOF instead of the answer. Now
    /// the server lingers after its answer (close_notify, then it reads and drops what
    /// still comes, for a bounded time): the client sends its whole body, then reads
    /// the answer and a clean close.
    #[tokio::test]
    async fn a_refused_body_is_read_to_its_end_and_the_answer_arrives() {
        let (addr, ca) = early_server().await;
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(tls::client_config(&ca, None).unwrap()));
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        for round in 0..3 {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut s = connector.connect(name.clone(), tcp).await.unwrap();
            let body = vec![b'x'; 4 << 20];
            let head = format!(
                "POST /early HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).await.unwrap();
            for chunk in body.chunks(64 << 10) {
                if let Err(e) = s.write_all(chunk).await {
                    panic!("round {round}: the server cut the body short: {e}");
                }
            }
            s.flush().await.unwrap();
            let mut answer = Vec::new();
            if let Err(e) = s.read_to_end(&mut answer).await {
                panic!("round {round}: no clean end after the answer: {e}");
            }
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                answer.starts_with("HTTP/1.1 415"),
                "round {round}: {answer}"
            );
        }
    }
}
