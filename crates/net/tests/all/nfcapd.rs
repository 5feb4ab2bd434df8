//! Debian's `nfcapd` as the IPFIX collector of the traffic tests (shared with the `vinfra`
//! binary's real-VM test through `#[path]`).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

/// Debian's `nfcapd` (package nfdump) on a loopback port, writing into its own directory.
pub struct Nfcapd {
    child: std::process::Child,
    dir: std::path::PathBuf,
    pub addr: std::net::SocketAddr,
}

impl Nfcapd {
    /// Starts one (several may run in one test: each has its own directory and port).
    pub fn start() -> Nfcapd {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vinfra-nfcapd-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("collector dir");
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("free udp port")
            .port();
        let log = std::fs::File::create(dir.join("nfcapd.log")).expect("log");
        let flows = dir.join("flows");
        std::fs::create_dir(&flows).expect("flows dir");
        let child = Command::new("nfcapd")
            .args([
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                "3600",
                "-w",
            ])
            .arg(&flows)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("run nfcapd (install nfdump: bash scripts/setup.sh)");
        let n = Nfcapd {
            child,
            addr: ([127, 0, 0, 1], port).into(),
            dir,
        };
        let end = Instant::now() + Duration::from_secs(10);
        while !n.log().contains("Startup") {
            assert!(Instant::now() < end, "nfcapd did not start: {}", n.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nfcapd.log")).unwrap_or_default()
    }

    /// Stops the collector (it writes its file on SIGTERM) and reads every flow back with
    /// `nfdump`: (source MAC, destination MAC) -> (packets, bytes), summed.
    pub fn stop_and_read(mut self) -> BTreeMap<(String, String), (u64, u64)> {
        // nfcapd writes what it has read when it gets SIGTERM; a datagram still queued on its
        // socket (a niced collector on a loaded machine) would be lost. Wait until it read
        // everything: the socket's receive queue (ss's Recv-Q) is empty.
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("ss")
                .args(["-Hunl", "sport", "=", &format!(":{}", self.addr.port())])
                .output()
                .expect("run ss");
            let text = String::from_utf8_lossy(&out.stdout);
            let queued = text
                .split_whitespace()
                .nth(1)
                .and_then(|q| q.parse::<u64>().ok());
            if queued == Some(0) || Instant::now() > end {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let out = Command::new("nfdump")
            .arg("-R")
            .arg(self.dir.join("flows"))
            .args(["-o", "json"])
            .output()
            .expect("run nfdump");
        assert!(
            out.status.success(),
            "nfdump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "nfdump json ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        let mut flows = BTreeMap::new();
        for f in v.as_array().into_iter().flatten() {
            let key = (
                f["in_src_mac"].as_str().unwrap_or_default().to_owned(),
                f["in_dst_mac"].as_str().unwrap_or_default().to_owned(),
            );
            let e = flows.entry(key).or_insert((0, 0));
            e.0 += f["in_packets"].as_u64().unwrap_or(0);
            e.1 += f["in_bytes"].as_u64().unwrap_or(0);
        }
        flows
    }
}

impl Drop for Nfcapd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
