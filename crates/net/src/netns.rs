//! Throwaway network namespaces for tests and the benchmark, made with `ip` and deleted on drop
//! (deleting a namespace also deletes the veth pairs with an end in it).

use std::process::Command;

/// An `ip` command failed.
#[derive(Debug, thiserror::Error)]
#[error("ip {args} failed: {stderr}")]
pub struct LabError {
    args: String,
    stderr: String,
}

/// Runs `ip ARGS`.
pub fn ip(args: &[&str]) -> Result<(), LabError> {
    let err = |stderr: String| LabError {
        args: args.join(" "),
        stderr,
    };
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Ok(())
}

/// Namespaces created by this value, deleted when it drops (even on a failed test).
#[derive(Debug, Default)]
pub struct NetnsLab {
    names: Vec<String>,
}

impl NetnsLab {
    /// An empty lab.
    pub fn new() -> NetnsLab {
        NetnsLab::default()
    }

    /// Creates namespace `name` with `lo` up and IPv6 off (no router solicitations or DAD noise
    /// on the test links).
    pub fn add(&mut self, name: &str) -> Result<(), LabError> {
        ip(&["netns", "add", name])?;
        self.names.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                name,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ])
            .status();
        Ok(())
    }

    /// A veth pair `a`@`ns_a` <-> `b`@`ns_b`, both up, optionally with fixed MACs.
    pub fn veth(
        &self,
        ns_a: &str,
        a: &str,
        ns_b: &str,
        b: &str,
        mac_a: Option<&str>,
    ) -> Result<(), LabError> {
        let mut args = vec!["link", "add", a, "netns", ns_a];
        if let Some(m) = mac_a {
            args.extend(["address", m]);
        }
        args.extend(["type", "veth", "peer", "name", b, "netns", ns_b]);
        ip(&args)?;
        ip(&["-n", ns_a, "link", "set", "dev", a, "up"])?;
        ip(&["-n", ns_b, "link", "set", "dev", b, "up"])
    }
}

impl Drop for NetnsLab {
    fn drop(&mut self) {
        for n in self.names.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &n]) {
                tracing::warn!(
                    netns = n,
                    error = &e as &dyn std::error::Error,
                    "cannot delete namespace"
                );
            }
        }
    }
}

/// Runs `f` on a thread inside network namespace `netns` (`/run/netns/NAME`), or here.
/// A socket `f` makes belongs to that namespace for its whole life.
pub fn in_netns<T: Send + 'static>(
    netns: Option<&str>,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let Some(ns) = netns else { return f() };
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        f()
    })
    .join()
    .map_err(|_| std::io::Error::other("netns thread panicked"))?
}
