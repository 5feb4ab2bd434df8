//! A host's event stream (`GET /v1/hosts/{name}/events`): newline-delimited JSON read
//! as it arrives.
//!
//! The bytes come in whatever pieces the connection delivers; [`LineFramer`] cuts them
//! into lines (at most [`MAX_LINE`] bytes each, so a broken or hostile server cannot make
//! the client buffer without end) and [`decode_event`] reads each. Both are pure and
//! fuzzed (`fuzz/fuzz_targets/host_events.rs`). A bad line is an error that names it and
//! does not end the stream; a broken connection, the server's end of the stream, or
//! [`DEFAULT_IDLE_TIMEOUT`] without a single line (the server pings every 10 s) end it.

use std::time::Duration;

use model::api::HostEvent;
use reqwest::Method;

use crate::ClientError;

/// The longest line taken (an assignment is a few KiB; this leaves room for very large
/// ones). A longer line is reported and skipped.
pub const MAX_LINE: usize = 4 << 20;

/// With no line for this long (three missed pings of the server's 10 s keep-alive),
/// the connection is taken for dead.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why one line of the stream is not an event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventLineError {
    /// The line is longer than the limit (it is skipped).
    #[error("longer than the limit of {limit} bytes (at least {len} bytes)")]
    TooLong {
        /// Bytes seen of it.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The line is not a host event (not JSON, an unknown `kind`, a missing field).
    #[error("not a host event: {excerpt}")]
    Invalid {
        /// The line's start, as text (at most 200 characters).
        excerpt: String,
        /// What serde found.
        #[source]
        source: serde_json::Error,
    },
    /// The stream ended in the middle of a line.
    #[error("the stream ended inside a line ({len} bytes without a newline)")]
    Truncated {
        /// Bytes of the unfinished line.
        len: usize,
    },
}

/// Cuts a byte stream into lines of at most `max` bytes (`\n`-terminated; a `\r` before
/// the `\n` is dropped too). Lines are numbered from 1.
#[derive(Debug)]
pub struct LineFramer {
    buf: Vec<u8>,
    /// Where the unread part of `buf` starts.
    start: usize,
    /// How far past `start` no `\n` was found.
    scanned: usize,
    max: usize,
    /// Inside a line already reported as too long: its bytes are dropped up to its `\n`.
    skipping: bool,
    line: u64,
}

impl LineFramer {
    /// A framer taking lines of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            max,
            skipping: false,
            line: 0,
        }
    }

    /// Adds bytes as they arrived.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole line with its number, if one is complete. A line over the limit
    /// is an error (once; the rest of it is dropped as it arrives); the buffer never
    /// holds more than the limit plus what one [`LineFramer::push`] added.
    pub fn next_line(&mut self) -> Option<(u64, Result<Vec<u8>, EventLineError>)> {
        loop {
            let pending = &self.buf[self.start..];
            match pending[self.scanned..].iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let end = self.scanned + i;
                    let mut line = pending[..end].to_vec();
                    self.start += end + 1;
                    self.scanned = 0;
                    if self.skipping {
                        // The end of a line reported already.
                        self.skipping = false;
                        continue;
                    }
                    self.line += 1;
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if line.len() > self.max {
                        let len = line.len();
                        return Some((self.line, Err(self.too_long(len))));
                    }
                    return Some((self.line, Ok(line)));
                }
                None if self.skipping => {
                    self.discard();
                    return None;
                }
                None if pending.len() > self.max => {
                    let len = pending.len();
                    self.line += 1;
                    self.skipping = true;
                    self.discard();
                    return Some((self.line, Err(self.too_long(len))));
                }
                None => {
                    self.scanned = pending.len();
                    return None;
                }
            }
        }
    }

    /// At the end of the stream: the unfinished line left, if any.
    pub fn finish(&mut self) -> Option<(u64, EventLineError)> {
        let len = self.buf.len() - self.start;
        self.discard();
        if len == 0 || std::mem::take(&mut self.skipping) {
            return None;
        }
        self.line += 1;
        Some((self.line, EventLineError::Truncated { len }))
    }

    fn discard(&mut self) {
        self.buf.clear();
        self.start = 0;
        self.scanned = 0;
    }

    fn too_long(&self, len: usize) -> EventLineError {
        EventLineError::TooLong {
            len,
            limit: self.max,
        }
    }
}

/// One line as an event; `None` for a blank line (skipped, as a proxy may send one).
pub fn decode_event(line: &[u8]) -> Result<Option<HostEvent>, EventLineError> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(line)
        .map(Some)
        .map_err(|source| EventLineError::Invalid {
            excerpt: excerpt(line),
            source,
        })
}

/// The start of a line as text, for an error message.
fn excerpt(line: &[u8]) -> String {
    const CHARS: usize = 200;
    let text = String::from_utf8_lossy(line);
    let mut out: String = text.chars().take(CHARS).collect();
    if text.chars().nth(CHARS).is_some() {
        out.push('…');
    }
    out
}

/// An open event stream of one host ([`crate::Client::host_events`]).
#[derive(Debug)]
pub struct HostEventStream {
    res: reqwest::Response,
    lines: LineFramer,
    path: String,
    idle: Duration,
    ended: bool,
}

impl HostEventStream {
    pub(crate) fn new(res: reqwest::Response, path: String) -> Self {
        Self {
            res,
            lines: LineFramer::new(MAX_LINE),
            path,
            idle: DEFAULT_IDLE_TIMEOUT,
            ended: false,
        }
    }

    /// Ends the stream with [`ClientError::StreamIdle`] when no line arrives for `idle`
    /// (default [`DEFAULT_IDLE_TIMEOUT`]; keep it above the server's keep-alive).
    pub fn set_idle_timeout(&mut self, idle: Duration) {
        self.idle = idle;
    }

    /// The next event. `Some(Err(ClientError::EventLine))` is a bad line, and the stream
    /// goes on after it; any other error is the last item. `None`: the stream is over
    /// (the server ended it, when it shuts down); open another one.
    pub async fn next(&mut self) -> Option<Result<HostEvent, ClientError>> {
        loop {
            while let Some((line, framed)) = self.lines.next_line() {
                match framed.and_then(|l| decode_event(&l)) {
                    Ok(Some(ev)) => return Some(Ok(ev)),
                    Ok(None) => {}
                    Err(reason) => return Some(Err(self.bad_line(line, reason))),
                }
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout(self.idle, self.res.chunk()).await {
                Ok(Ok(Some(bytes))) => self.lines.push(&bytes),
                Ok(Ok(None)) => {
                    self.ended = true;
                    let (line, reason) = self.lines.finish()?;
                    return Some(Err(self.bad_line(line, reason)));
                }
                Ok(Err(source)) => {
                    self.ended = true;
                    return Some(Err(ClientError::Transport {
                        method: Method::GET,
                        path: self.path.clone(),
                        source,
                    }));
                }
                Err(_) => {
                    self.ended = true;
                    return Some(Err(ClientError::StreamIdle {
                        path: self.path.clone(),
                        idle: self.idle,
                    }));
                }
            }
        }
    }

    fn bad_line(&self, line: u64, reason: EventLineError) -> ClientError {
        ClientError::EventLine {
            path: self.path.clone(),
            line,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(f: &mut LineFramer) -> Vec<(u64, Result<String, String>)> {
        std::iter::from_fn(|| f.next_line())
            .map(|(n, r)| {
                (
                    n,
                    r.map(|l| String::from_utf8(l).unwrap())
                        .map_err(|e| e.to_string()),
                )
            })
            .collect()
    }

    #[test]
    fn lines_split_across_pushes_come_out_whole() {
        let mut f = LineFramer::new(64);
        f.push(b"{\"kind\":");
        assert!(lines(&mut f).is_empty());
        f.push(b"\"ping\"}\r\n{\"kind\":\"resync\"}\n\n{\"ki");
        assert_eq!(
            lines(&mut f),
            vec![
                (1, Ok(r#"{"kind":"ping"}"#.to_owned())),
                (2, Ok(r#"{"kind":"resync"}"#.to_owned())),
                (3, Ok(String::new())),
            ]
        );
        let (n, e) = f.finish().unwrap();
        assert_eq!(n, 4);
        assert!(matches!(e, EventLineError::Truncated { len: 4 }), "{e}");
        assert!(f.finish().is_none());
    }

    #[test]
    fn a_line_over_the_limit_is_reported_once_and_skipped() {
        let mut f = LineFramer::new(8);
        f.push(b"0123456789");
        let got = lines(&mut f);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 1);
        assert!(
            got[0].1.as_ref().unwrap_err().contains("limit of 8"),
            "{got:?}"
        );
        // The rest of it is dropped as it arrives, and the buffer stays small.
        f.push(&[b'x'; 100]);
        assert!(lines(&mut f).is_empty());
        assert!(f.buf.len() <= 8 + 100);
        f.push(b"xx\nok\n");
        assert_eq!(lines(&mut f), vec![(2, Ok("ok".to_owned()))]);
        // A long line that arrives whole is refused too.
        f.push(b"0123456789\nok\n");
        let got = lines(&mut f);
        assert!(got[0].1.is_err() && got[0].0 == 3, "{got:?}");
        assert_eq!(got[1], (4, Ok("ok".to_owned())));
        assert!(f.finish().is_none());
    }

    #[test]
    fn bad_lines_name_what_is_wrong() {
        assert_eq!(decode_event(b"  ").unwrap(), None);
        assert_eq!(
            decode_event(br#"{"kind":"ping"}"#).unwrap(),
            Some(HostEvent::Ping)
        );
        for (line, needle) in [
            (&br#"{"kind":"reboot"}"#[..], "unknown variant `reboot`"),
            (b"not json", "expected ident"),
            (br#"{"kind":"unassigned"}"#, "missing field `vm`"),
            (b"\xff\xfe", "expected value"),
        ] {
            let e = decode_event(line).unwrap_err();
            let chain = model::error_chain(&e);
            assert!(chain.contains(needle), "{chain}");
            assert!(chain.starts_with("not a host event: "), "{chain}");
        }
        let long = vec![b'a'; 500];
        let e = decode_event(&long).unwrap_err().to_string();
        assert!(e.ends_with('…') && e.len() < 300, "{e}");
    }
}
