//! The simulated migration stream: a short real TCP transfer between the source's and
//! the destination's driver (two agents, possibly two processes), standing in for
//! QEMU's RAM stream.
//!
//! ```text
//! source -> destination   {"format":1,"id":..,"ram_bytes":N}\n     header
//!                         N bytes                                  "RAM" (pre-copy, guest runs)
//!                         {"memory":{..},"running":true}\n         switch-over (guest paused)
//! destination -> source   OK\n                                     the destination took over
//! ```
//!
//! The "RAM" is [`super::SimConfig::ram_bytes_per_mib`] bytes per MiB of guest memory
//! (a guest made mostly of zero pages), paced to the migration's bandwidth cap. What
//! really crosses is [`GuestMemory`]: the tick counter continues on the destination.
//! A stream that ends early leaves the destination dead, as a QEMU whose incoming
//! migration failed exits.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::guest::GuestMemory;

const STREAM_FORMAT: u32 = 1;
/// Longest header or switch-over line.
const MAX_LINE: u64 = 64 * 1024;
const CHUNK: usize = 64 * 1024;

/// The stream's first line.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: u32,
    id: String,
    ram_bytes: u64,
}

/// The switch-over line: the guest's RAM and run state at the moment it was paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Switchover {
    /// The guest's memory.
    pub memory: GuestMemory,
    /// Whether its CPUs ran (a guest paused for a full copy arrives paused).
    pub running: bool,
}

/// Parses `tcp:IP:PORT` (QEMU's migration URI) into an address.
pub(crate) fn parse_uri(uri: &str) -> Option<SocketAddr> {
    let rest = uri.strip_prefix("tcp:")?;
    rest.parse().ok()
}

/// The source's end, connected.
#[derive(Debug)]
pub(crate) struct Outgoing {
    stream: BufReader<TcpStream>,
    /// Bytes sent so far.
    pub sent: u64,
}

impl Outgoing {
    /// Connects to the destination.
    pub(crate) async fn connect(to: SocketAddr) -> std::io::Result<Self> {
        let s = TcpStream::connect(to).await?;
        s.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(s),
            sent: 0,
        })
    }

    async fn line<T: Serialize>(&mut self, v: &T) -> std::io::Result<()> {
        let mut b = serde_json::to_vec(v).map_err(std::io::Error::other)?;
        b.push(b'\n');
        self.stream.get_mut().write_all(&b).await?;
        self.sent += b.len() as u64;
        Ok(())
    }

    /// Sends the header and the RAM, at most `bandwidth` bytes/s. With `cut_after`, the
    /// connection is dropped after that many RAM bytes (an interrupted migration).
    pub(crate) async fn send_ram(
        &mut self,
        id: &str,
        ram_bytes: u64,
        bandwidth: Option<u64>,
        cut_after: Option<u64>,
    ) -> std::io::Result<()> {
        self.line(&Header {
            format: STREAM_FORMAT,
            id: id.to_owned(),
            ram_bytes,
        })
        .await?;
        let chunk = vec![0u8; CHUNK];
        let t0 = Instant::now();
        let mut done = 0u64;
        while done < ram_bytes {
            if cut_after.is_some_and(|c| done >= c) {
                let _ = self.stream.get_mut().shutdown().await;
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "stream cut by an injected fault",
                ));
            }
            let n = usize::try_from(ram_bytes - done).map_or(CHUNK, |left| left.min(CHUNK));
            self.stream.get_mut().write_all(&chunk[..n]).await?;
            done += n as u64;
            self.sent += n as u64;
            if let Some(bw) = bandwidth.filter(|b| *b > 0) {
                // Pace: never ahead of `bw` bytes/s since the start.
                #[allow(clippy::cast_precision_loss)] // a pacing delay
                let due = Duration::from_secs_f64(done as f64 / bw as f64);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        Ok(())
    }

    /// Sends the switch-over and waits for the destination's `OK`.
    pub(crate) async fn switch_over(&mut self, sw: &Switchover) -> std::io::Result<()> {
        self.line(sw).await?;
        let mut ack = String::new();
        (&mut self.stream)
            .take(MAX_LINE)
            .read_line(&mut ack)
            .await?;
        if ack.trim_end() == "OK" {
            Ok(())
        } else if ack.is_empty() {
            Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the destination closed the stream",
            ))
        } else {
            Err(std::io::Error::other(format!(
                "the destination refused: {}",
                ack.trim_end()
            )))
        }
    }
}

/// The destination's end after the switch-over: acknowledge once the guest runs here.
#[derive(Debug)]
pub(crate) struct Arrived {
    stream: TcpStream,
}

impl Arrived {
    /// Tells the source the guest runs here now.
    pub(crate) async fn ack(mut self) {
        let _ = self.stream.write_all(b"OK\n").await;
        let _ = self.stream.shutdown().await;
    }
}

/// Accepts one migration stream for VM `id` on `listener` and reads it to the
/// switch-over. `max_ram` bounds the RAM bytes accepted. The error is the reason the
/// incoming migration failed.
pub(crate) async fn receive(
    listener: TcpListener,
    id: &str,
    max_ram: u64,
) -> Result<(Switchover, Arrived), String> {
    let (s, peer) = listener
        .accept()
        .await
        .map_err(|e| format!("accept: {e}"))?;
    drop(listener);
    let _ = s.set_nodelay(true);
    let mut r = BufReader::new(s);
    let mut line = String::new();
    (&mut r)
        .take(MAX_LINE)
        .read_line(&mut line)
        .await
        .map_err(|e| format!("reading the header from {peer}: {e}"))?;
    let h: Header = serde_json::from_str(line.trim_end())
        .map_err(|e| format!("bad header from {peer}: {e}"))?;
    if h.format != STREAM_FORMAT || h.id != id {
        return Err(format!(
            "stream from {peer} is for vm {} (format {}), not {id}",
            h.id, h.format
        ));
    }
    if h.ram_bytes > max_ram {
        return Err(format!(
            "stream from {peer} carries {} bytes of RAM, more than the {max_ram} of this vm",
            h.ram_bytes
        ));
    }
    let got = tokio::io::copy(&mut (&mut r).take(h.ram_bytes), &mut tokio::io::sink())
        .await
        .map_err(|e| format!("reading RAM from {peer}: {e}"))?;
    if got != h.ram_bytes {
        return Err(format!(
            "the stream from {peer} ended after {got} of {} RAM bytes",
            h.ram_bytes
        ));
    }
    line.clear();
    (&mut r)
        .take(MAX_LINE)
        .read_line(&mut line)
        .await
        .map_err(|e| format!("reading the switch-over from {peer}: {e}"))?;
    if line.is_empty() {
        return Err(format!(
            "the stream from {peer} ended before the switch-over"
        ));
    }
    let sw: Switchover = serde_json::from_str(line.trim_end())
        .map_err(|e| format!("bad switch-over from {peer}: {e}"))?;
    Ok((
        sw,
        Arrived {
            stream: r.into_inner(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_carries_the_guest_memory() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(parse_uri(&format!("tcp:{addr}")), Some(addr));
        assert_eq!(parse_uri("unix:/x"), None);
        let dest = tokio::spawn(async move {
            let (sw, arrived) = receive(l, "vm-1", 1 << 20).await?;
            arrived.ack().await;
            Ok::<_, String>(sw)
        });
        let sw = Switchover {
            memory: GuestMemory {
                next_tick: 42,
                uptime_ms: 4200,
                ready: true,
                disk_mib: 64,
            },
            running: true,
        };
        let mut out = Outgoing::connect(addr).await.unwrap();
        out.send_ram("vm-1", 300_000, None, None).await.unwrap();
        out.switch_over(&sw).await.unwrap();
        assert!(out.sent > 300_000);
        assert_eq!(dest.await.unwrap().unwrap(), sw);
    }

    #[tokio::test]
    async fn a_cut_stream_fails_both_ends() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let dest = tokio::spawn(async move { receive(l, "vm-1", 1 << 20).await.map(drop) });
        let mut out = Outgoing::connect(addr).await.unwrap();
        let e = out
            .send_ram("vm-1", 300_000, None, Some(100_000))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted);
        let why = dest.await.unwrap().unwrap_err();
        assert!(why.contains("ended after"), "{why}");
    }

    #[tokio::test]
    async fn a_stream_for_another_vm_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let dest = tokio::spawn(async move { receive(l, "vm-2", 1 << 20).await.map(drop) });
        let mut out = Outgoing::connect(addr).await.unwrap();
        let _ = out.send_ram("vm-1", 10, None, None).await;
        let why = dest.await.unwrap().unwrap_err();
        assert!(why.contains("not vm-2"), "{why}");
    }
}
