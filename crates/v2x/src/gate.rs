//! The PC5 gate: the direct device-to-device path is a bridge in its own network namespace
//! (the sidelink medium), closed by an nftables chain with `policy drop`. A V2X application
//! function opens one direction `device → peer` by adding the address pair to a set, and
//! closes it by deleting it; each pair has its own counter, and a last rule counts what the
//! closed path refused. Standing in for the radio: a device gets no sidelink resources
//! unless its operator granted them.

use std::net::Ipv4Addr;
use std::process::Command;

/// nftables table of the gate (family `bridge`).
pub const TABLE: &str = "v2x_pc5";

/// An `nft` run failed.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// `nft` could not be started.
    #[error("cannot run nft (install it: apt-get install nftables, or scripts/setup.sh): {0}")]
    Spawn(#[source] std::io::Error),
    /// `nft` refused the command.
    #[error("nft {cmd} failed: {stderr}")]
    Nft {
        /// The command.
        cmd: String,
        /// What nft said.
        stderr: String,
    },
    /// `nft -j` printed something we cannot read.
    #[error("cannot read nft's JSON: {0}")]
    Json(String),
}

/// The gate of one PC5 medium namespace.
#[derive(Debug, Clone)]
pub struct Pc5Gate {
    netns: Option<String>,
}

/// Counters of the gate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GateCounters {
    /// Packets the closed path dropped.
    pub dropped_packets: u64,
    /// Per open pair: (src, dst, packets).
    pub open: Vec<(Ipv4Addr, Ipv4Addr, u64)>,
}

impl Pc5Gate {
    /// The gate in namespace `netns` (None: this one).
    pub fn new(netns: Option<&str>) -> Pc5Gate {
        Pc5Gate {
            netns: netns.map(str::to_owned),
        }
    }

    fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, GateError> {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nft"]);
                c
            }
            None => Command::new("nft"),
        };
        c.args(args);
        let out = if let Some(script) = stdin {
            use std::io::Write as _;
            let mut child = c
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(GateError::Spawn)?;
            if let Some(mut i) = child.stdin.take() {
                i.write_all(script.as_bytes()).map_err(GateError::Spawn)?;
            }
            child.wait_with_output().map_err(GateError::Spawn)?
        } else {
            c.output().map_err(GateError::Spawn)?
        };
        if !out.status.success() {
            return Err(GateError::Nft {
                cmd: format!("{} {}", args.join(" "), stdin.unwrap_or("")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates the closed gate (replacing one that was there).
    pub fn install(&self) -> Result<(), GateError> {
        let _ = self.nft(&["delete", "table", "bridge", TABLE], None);
        let script = format!(
            "table bridge {TABLE} {{
  set links {{ type ipv4_addr . ipv4_addr; counter; }}
  chain forward {{
    type filter hook forward priority 0; policy drop;
    ether type ip ip saddr . ip daddr @links accept
    counter comment \"closed\"
  }}
}}
"
        );
        self.nft(&["-f", "-"], Some(&script)).map(drop)
    }

    /// Opens `src → dst`.
    pub fn open(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Result<(), GateError> {
        let e = format!("{{ {src} . {dst} }}");
        self.nft(&["add", "element", "bridge", TABLE, "links", &e], None)
            .map(drop)
    }

    /// Closes `src → dst` (closing a closed pair is not an error).
    pub fn close(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Result<(), GateError> {
        let e = format!("{{ {src} . {dst} }}");
        match self.nft(&["delete", "element", "bridge", TABLE, "links", &e], None) {
            Ok(_) => Ok(()),
            Err(GateError::Nft { stderr, .. })
                if stderr.contains("No such file") || stderr.contains("does not exist") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads the counters.
    pub fn counters(&self) -> Result<GateCounters, GateError> {
        let out = self.nft(&["-j", "list", "table", "bridge", TABLE], None)?;
        let v: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| GateError::Json(e.to_string()))?;
        let mut c = GateCounters::default();
        let items = v["nftables"]
            .as_array()
            .ok_or_else(|| GateError::Json("no nftables array".into()))?;
        for it in items {
            if let Some(rule) = it.get("rule") {
                if rule["comment"] == "closed" {
                    for e in rule["expr"].as_array().into_iter().flatten() {
                        if let Some(p) = e["counter"]["packets"].as_u64() {
                            c.dropped_packets = p;
                        }
                    }
                }
            }
            if let Some(set) = it.get("set") {
                for el in set["elem"].as_array().into_iter().flatten() {
                    let parse = |x: &serde_json::Value| x.as_str().and_then(|s| s.parse().ok());
                    let e = &el["elem"];
                    let concat = e["val"]["concat"].as_array();
                    let (Some(a), Some(b)) = (
                        concat.and_then(|c| c.first()).and_then(parse),
                        concat.and_then(|c| c.get(1)).and_then(parse),
                    ) else {
                        continue;
                    };
                    let packets = e["counter"]["packets"].as_u64().unwrap_or(0);
                    c.open.push((a, b, packets));
                }
            }
        }
        Ok(c)
    }
}
