//! Tests against the real kernel mechanism: the element in the test process,
//! devices as child processes (`shm-device`) in their own network namespaces.

mod basic;
mod crash;
mod guest;
mod ivshmem;
mod model;
mod storm;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// A device process.
#[derive(Debug)]
pub struct DeviceProc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub id: u32,
}

impl DeviceProc {
    /// Starts a device in a new network namespace, attached to `socket`.
    pub fn spawn(socket: &Path) -> DeviceProc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shm-device"))
            .arg("--netns")
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning shm-device");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut d = DeviceProc {
            child,
            stdin,
            stdout,
            id: 0,
        };
        let hello = d.line();
        let id = hello
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("device did not attach: {hello}"));
        d.id = id.parse().expect("device id");
        d
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).expect("reading the device");
        s.trim_end().to_string()
    }

    /// Sends one command, returns the answer line.
    pub fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("writing to the device");
        self.stdin.flush().expect("flush");
        self.line()
    }

    /// Sends a command without waiting for an answer line.
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("writing to the device");
        self.stdin.flush().expect("flush");
    }

    /// Reads one line the device printed.
    pub fn read_line(&mut self) -> String {
        self.line()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DeviceProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits (bounded) until `cond` holds.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Parses the `stored=S sigbus=B` counts of a storm answer.
pub fn storm_counts(answer: &str) -> (u64, u64) {
    let field = |k: &str| -> u64 {
        answer
            .split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad storm answer {answer:?}"))
    };
    (field("stored="), field("sigbus="))
}
