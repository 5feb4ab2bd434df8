//! A minimal HTTP/1.1 client for JSON requests over a connection made in a given network
//! namespace (a device's, a MEC host's): reqwest would connect from whatever namespace the
//! runtime's threads are in.

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A keep-alive HTTP/1.1 connection (just what JSON requests need).
#[derive(Debug)]
pub struct HttpConn {
    s: BufReader<TcpStream>,
}

impl HttpConn {
    /// Over an open connection.
    pub fn new(s: BufReader<TcpStream>) -> HttpConn {
        HttpConn { s }
    }

    /// One request; (status, JSON body or Null).
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> std::io::Result<(u16, Value)> {
        let b = body.map(Value::to_string).unwrap_or_default();
        let auth = if token.is_empty() {
            String::new()
        } else {
            format!("Authorization: Bearer {token}\r\n")
        };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: mec\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        );
        self.s.get_mut().write_all(req.as_bytes()).await?;
        let mut line = String::new();
        self.s.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if self.s.read_line(&mut h).await? == 0 || h == "\r\n" {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                if n.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; len.min(1 << 20)];
        self.s.read_exact(&mut body).await?;
        let v = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or(Value::Null)
        };
        Ok((status, v))
    }
}

/// POSTs `body` to `url` (`http://host:port/path`) from inside `netns`; returns the status.
pub async fn post_json(
    netns: Option<&str>,
    url: &str,
    token: &str,
    body: &Value,
) -> std::io::Result<u16> {
    post_json_answer(netns, url, token, body)
        .await
        .map(|(s, _)| s)
}

/// POSTs `body` to `url` from inside `netns`; returns the status and the JSON answer.
pub async fn post_json_answer(
    netns: Option<&str>,
    url: &str,
    token: &str,
    body: &Value,
) -> std::io::Result<(u16, Value)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other(format!("{url} is not an http:// URL")))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr = tokio::net::lookup_host(host)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{host} has no address")))?;
    let s = crate::netns::tcp_connect(netns, addr).await?;
    let mut c = HttpConn::new(BufReader::new(s));
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        c.call("POST", &format!("/{path}"), token, Some(body)),
    )
    .await
    .map_err(|_| std::io::Error::other(format!("{url} did not answer in 5 s")))?
}
