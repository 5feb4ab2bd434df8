//! Network namespaces and veth pairs made by the tests, removed on drop (even on panic).

use std::process::Command;

/// Runs `ip ARGS`, panicking with its stderr (and the install hint) on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip ({e}): install iproute2 (scripts/setup.sh)"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace named `nf<tag><pid>` (≤ 15 chars).
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("nf{tag}{}", std::process::id());
        assert!(name.len() <= 15, "{name} too long");
        // A namespace left by a crashed earlier run with the same pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// A counter of an interface inside the namespace.
    pub fn stat(&self, dev: &str, counter: &str) -> u64 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "cat",
                &format!("/sys/class/net/{dev}/statistics/{counter}"),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no {counter} for {dev} in {}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A veth pair between two namespaces, each end up, with an optional address (CIDR form).
pub fn veth(
    a: &Netns,
    a_dev: &str,
    a_addr: Option<&str>,
    b: &Netns,
    b_dev: &str,
    b_addr: Option<&str>,
) {
    ip(&[
        "link", "add", a_dev, "netns", &a.name, "type", "veth", "peer", "name", b_dev, "netns",
        &b.name,
    ]);
    for (ns, dev, addr) in [(a, a_dev, a_addr), (b, b_dev, b_addr)] {
        if let Some(addr) = addr {
            ip(&["-n", &ns.name, "addr", "add", addr, "dev", dev]);
        }
        ip(&["-n", &ns.name, "link", "set", dev, "up"]);
    }
}
