//! The baseline of `vinfra bench terminal`'s bytes-on-the-wire rows: the same scripted
//! typing session through QEMU's VNC server behind `websockify`, driven by the
//! `vncdotool` VNC client library — what a user without vinfra would run to type into a
//! VM from a browser.
//!
//! The pieces, all on loopback: the default guest under QEMU with `-vnc`; Debian's
//! `websockify` in front of its VNC port; `vncdotool` (Python, in the venv
//! `scripts/setup.sh` makes) speaking RFB over TCP to a bridge in this process, which
//! carries it as WebSocket binary messages — as a browser's VNC client (noVNC) does — to
//! websockify through a [`Counter`], which counts every byte of that connection both
//! ways. The viewer asks for ZRLE (compressed) updates: the whole screen once when it
//! opens, then, after each key, the changes (the echo of the key), as a person typing
//! and watching the screen gets them. The guest's console must show every typed line
//! (`GUEST: TYPED …`), or the run fails: the bytes are those of a session that worked.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// Where `scripts/setup.sh` installs vncdotool.
pub const DEFAULT_VNC_PYTHON: &str = "/var/cache/vinfra/vnc-venv/bin/python3";

/// The vncdotool side: connect through the bridge, ask for ZRLE, take the whole screen,
/// then per key a press and the screen's changes. Prints `ok` at the end.
const DRIVER: &str = r#"
import json, sys
from vncdotool import api, client, rfb

class Viewer(client.VNCDoToolClient):
    encoding = rfb.Encoding.ZRLE

class Factory(client.VNCDoToolFactory):
    protocol = Viewer

server, lines = sys.argv[1], json.loads(sys.argv[2])
c = api.connect(server, factory_class=Factory, timeout=120)
try:
    c.refreshScreen(False)
    for line in lines:
        for ch in line:
            c.keyPress("space" if ch == " " else ch)
            c.refreshScreen(True)
        c.keyPress("enter")
        c.refreshScreen(True)
    c.disconnect()
finally:
    api.shutdown()
print("ok")
"#;

/// Counts the bytes of one TCP connection relayed from a listener to `target`.
pub struct Counter {
    /// Where the client connects.
    pub addr: SocketAddr,
    done: tokio::task::JoinHandle<std::io::Result<(u64, u64)>>,
}

impl Counter {
    /// Listens on a free loopback port; relays the first connection to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Counter> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let done = tokio::spawn(async move {
            let (mut client, _) = l.accept().await?;
            let mut server = TcpStream::connect(target).await?;
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            tokio::io::copy_bidirectional(&mut client, &mut server).await
        });
        Ok(Counter { addr, done })
    }

    /// Waits for the connection to end: (client → server, server → client) bytes.
    pub async fn bytes(self) -> anyhow::Result<(u64, u64)> {
        match tokio::time::timeout(Duration::from_secs(30), self.done).await {
            Ok(r) => Ok(r.context("byte counter")??),
            Err(_) => bail!("the counted connection did not end within 30 s"),
        }
    }
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A VNC display (port 5900 + n) free on loopback.
fn free_display() -> anyhow::Result<u16> {
    (100..400)
        .find(|d| std::net::TcpListener::bind(("127.0.0.1", 5900 + d)).is_ok())
        .context("no free VNC display between :100 and :400")
}

async fn wait_port(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("{what} is not listening on {addr} after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Carries one RFB connection accepted on `listener` as WebSocket binary messages to
/// `ws` (websockify, through the counter).
async fn bridge(listener: TcpListener, ws: SocketAddr) -> anyhow::Result<()> {
    let (mut tcp, _) = listener.accept().await?;
    let _ = tcp.set_nodelay(true);
    let up = TcpStream::connect(ws).await?;
    let _ = up.set_nodelay(true);
    let req = tokio_tungstenite::tungstenite::http::Request::builder()
        .uri(format!("ws://{ws}/"))
        .header("Host", ws.to_string())
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header(
            "Sec-WebSocket-Key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        )
        .header("Sec-WebSocket-Protocol", "binary")
        .body(())?;
    let (mut wsock, _) = tokio_tungstenite::client_async(req, up)
        .await
        .context("WebSocket handshake with websockify")?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            n = tcp.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    let _ = wsock.close(None).await;
                    return Ok(());
                }
                wsock.send(Message::binary(buf[..n].to_vec())).await?;
            }
            m = wsock.next() => match m {
                Some(Ok(Message::Binary(b))) => tcp.write_all(&b).await?,
                Some(Ok(Message::Close(_))) | None => return Ok(()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }
}

/// Boots the default guest with a VNC server, types `lines` through websockify with
/// vncdotool, and returns the bytes of the viewer's WebSocket connection (to the
/// server, from the server).
pub async fn typing_session(
    python: &Path,
    lines: &[String],
    dir: &Path,
) -> anyhow::Result<(u64, u64)> {
    let ok = Command::new(python)
        .args(["-c", "import vncdotool"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "{} cannot import vncdotool: run scripts/setup.sh (it makes that venv), or pass --vnc-python",
            python.display()
        );
    }
    if Command::new("websockify")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        bail!("websockify not found: run scripts/setup.sh (Debian package websockify)");
    }
    let image = tokio::task::spawn_blocking(|| {
        compute::ensure_default_image(&compute::default_cache_dir(), |_| {})
    })
    .await?
    .context("the default guest image (scripts/setup.sh installs what it needs)")?;
    let disk = dir.join("vnc-disk.img");
    std::fs::copy(&image.disk_template, &disk).context("copy the guest disk")?;
    let console = dir.join("vnc-console.log");
    let display = free_display()?;
    let vnc: SocketAddr = ([127, 0, 0, 1], 5900 + display).into();
    let qemu = Killed(
        Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-machine",
                "q35",
                "-m",
                "128",
                "-nodefaults",
            ])
            .args(["-display", "none", "-device", "VGA", "-no-reboot"])
            .arg("-vnc")
            .arg(format!("127.0.0.1:{display}"))
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args(["-append", &image.cmdline])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=virtio", disk.display()))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start qemu-system-x86_64 (scripts/setup.sh installs it)")?,
    );
    let read_console = || std::fs::read_to_string(&console).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !read_console().contains("GUEST: READY") {
        if Instant::now() > deadline {
            bail!("the VNC guest did not boot in 180 s: {}", read_console());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ws: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let _websockify = Killed(
        Command::new("websockify")
            .arg(ws.to_string())
            .arg(vnc.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start websockify")?,
    );
    wait_port(ws, "websockify").await?;
    let counter = Counter::start(ws).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let rfb = listener.local_addr()?;
    let bridged = tokio::spawn(bridge(listener, counter.addr));
    let script = serde_json::to_string(lines)?;
    let mut driver = tokio::process::Command::new(python);
    driver
        .args(["-c", DRIVER])
        .arg(format!("127.0.0.1::{}", rfb.port()))
        .arg(&script)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(600), driver.output())
        .await
        .context("vncdotool did not finish typing in 600 s")??;
    if !out.status.success() {
        bail!(
            "vncdotool failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    bridged.await??;
    let bytes = counter.bytes().await?;
    // Every line reached the guest's keyboard: its console shows it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = read_console();
        let missing: Vec<&String> = lines
            .iter()
            .filter(|l| !c.contains(&format!("GUEST: TYPED {l}")))
            .collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the guest did not see the lines typed over VNC: {missing:?}\n{c}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(qemu);
    Ok(bytes)
}
