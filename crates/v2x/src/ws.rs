//! WebSocket notifications (RFC 6455), server side only what a notification push needs:
//! the opening handshake, unmasked text frames out, and a close when the subscriber goes.
//! Also the matching minimal client, for tests and the CLI's `watch`.

use std::sync::Arc;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::vis::Vis;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The Sec-WebSocket-Accept value for a key.
pub fn accept_key(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.trim().as_bytes());
    ctx.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

/// One unmasked frame (server → client).
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n @ 0..=125 => f.push(u8::try_from(n).unwrap_or(125)),
        n @ 126..=0xFFFF => {
            f.push(126);
            f.extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// Serves `ws://…/vis/v2/ws/{subscriptionId}` on `listener`.
pub async fn serve(listener: TcpListener, vis: Arc<Vis>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let vis = vis.clone();
        tokio::spawn(async move {
            if let Err(e) = session(sock, &vis).await {
                tracing::debug!(error = %e, "websocket session ended");
            }
        });
    }
}

async fn session(sock: TcpStream, vis: &Vis) -> std::io::Result<()> {
    let (rd, mut wr) = sock.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    rd.read_line(&mut line).await?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut key = None;
    loop {
        let mut h = String::new();
        if rd.read_line(&mut h).await? == 0 || h == "\r\n" || h.len() > 8192 {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            if n.eq_ignore_ascii_case("sec-websocket-key") {
                key = Some(v.trim().to_owned());
            }
        }
    }
    let id = path.rsplit('/').next().unwrap_or("");
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let (Some(key), Some(backlog)) = (key, vis.attach_ws(id, tx)) else {
        wr.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(&key)
    );
    wr.write_all(resp.as_bytes()).await?;
    for m in backlog {
        wr.write_all(&frame(1, m.as_bytes())).await?;
    }
    let mut buf = [0u8; 256];
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => wr.write_all(&frame(1, m.as_bytes())).await?,
                None => { wr.write_all(&frame(8, &[])).await?; return Ok(()); }
            },
            // The client only sends control frames (close, ping); a read of 0 is its end.
            n = rd.read(&mut buf) => if n? == 0 { return Ok(()); },
        }
    }
}

/// A minimal WebSocket client: connects to `uri` (`ws://host:port/path`) and yields text
/// frames.
#[derive(Debug)]
pub struct WsClient {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    _wr: tokio::net::tcp::OwnedWriteHalf,
}

impl WsClient {
    /// Connects and completes the handshake.
    pub async fn connect(uri: &str) -> std::io::Result<WsClient> {
        let rest = uri
            .strip_prefix("ws://")
            .ok_or_else(|| std::io::Error::other("not a ws:// URI"))?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let sock = TcpStream::connect(host).await?;
        sock.set_nodelay(true)?;
        let (rd, mut wr) = sock.into_split();
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
        let key = base64::engine::general_purpose::STANDARD.encode(nonce);
        let req = format!(
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        wr.write_all(req.as_bytes()).await?;
        let mut rd = BufReader::new(rd);
        let mut status = String::new();
        rd.read_line(&mut status).await?;
        if !status.contains(" 101 ") {
            return Err(std::io::Error::other(format!(
                "handshake refused: {}",
                status.trim()
            )));
        }
        let mut ok = false;
        loop {
            let mut h = String::new();
            if rd.read_line(&mut h).await? == 0 || h == "\r\n" {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                ok |=
                    n.eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == accept_key(&key);
            }
        }
        if !ok {
            return Err(std::io::Error::other("bad Sec-WebSocket-Accept"));
        }
        Ok(WsClient { rd, _wr: wr })
    }

    /// The next text frame (None when the server closed).
    pub async fn next_text(&mut self) -> std::io::Result<Option<String>> {
        loop {
            let mut h = [0u8; 2];
            if self.rd.read_exact(&mut h).await.is_err() {
                return Ok(None);
            }
            let op = h[0] & 0x0F;
            let mut len = u64::from(h[1] & 0x7F);
            if len == 126 {
                len = u64::from(self.rd.read_u16().await?);
            } else if len == 127 {
                len = self.rd.read_u64().await?;
            }
            if len > 1 << 24 {
                return Err(std::io::Error::other("frame too large"));
            }
            let mut p = vec![0u8; usize::try_from(len).unwrap_or(0)];
            self.rd.read_exact(&mut p).await?;
            match op {
                1 => return Ok(Some(String::from_utf8_lossy(&p).into_owned())),
                8 => return Ok(None),
                _ => {}
            }
        }
    }
}
