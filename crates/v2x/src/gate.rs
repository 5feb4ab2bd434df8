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

/// A request to the gate's thread: nft arguments, optional script, where to answer.
type Job = (
    Vec<String>,
    Option<String>,
    tokio::sync::oneshot::Sender<Result<String, GateError>>,
);

/// The gate of one PC5 medium namespace. `nft` runs from a thread that entered the
/// namespace once (a child inherits it), instead of `ip netns exec` per change, which
/// mounts a fresh /sys each time and cost tens of ms.
#[derive(Debug, Clone)]
pub struct Pc5Gate {
    tx: std::sync::mpsc::Sender<Job>,
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
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let ns = netns.map(|n| format!("/run/netns/{n}"));
        std::thread::spawn(move || {
            let entered = match ns {
                None => Ok(()),
                Some(path) => std::fs::File::open(&path)
                    .map_err(GateError::Spawn)
                    .and_then(|f| {
                        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(|e| GateError::Spawn(e.into()))
                    }),
            };
            while let Ok(first) = rx.recv() {
                if let Err(e) = &entered {
                    let _ = first.2.send(Err(GateError::Nft {
                        cmd: "setns".into(),
                        stderr: e.to_string(),
                    }));
                    continue;
                }
                // Element changes that queued up meanwhile go to nft as one script: one
                // process for many links when many devices ask at once.
                let mut jobs = vec![first];
                while jobs.len() < 512 && batchable(&jobs[0]) {
                    match rx.try_recv() {
                        Ok(j) if batchable(&j) => jobs.push(j),
                        Ok(j) => {
                            run_jobs(jobs);
                            jobs = vec![j];
                            break;
                        }
                        Err(_) => break,
                    }
                }
                run_jobs(jobs);
            }
        });
        Pc5Gate { tx }
    }

    async fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, GateError> {
        let (rtx, rrx) = tokio::sync::oneshot::channel();
        let job = (
            args.iter().map(|s| (*s).to_owned()).collect(),
            stdin.map(str::to_owned),
            rtx,
        );
        let gone = || GateError::Spawn(std::io::Error::other("the gate's thread is gone"));
        self.tx.send(job).map_err(|_| gone())?;
        rrx.await.map_err(|_| gone())?
    }

    /// Creates the closed gate (replacing one that was there).
    pub async fn install(&self) -> Result<(), GateError> {
        let _ = self.nft(&["delete", "table", "bridge", TABLE], None).await;
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
        self.nft(&["-f", "-"], Some(&script)).await.map(drop)
    }

    /// Installs the closed gate unless its table is there already (a restarted MEC keeps
    /// the rules of its recorded links and of other MECs on the same medium).
    pub async fn ensure(&self) -> Result<(), GateError> {
        match self.nft(&["list", "table", "bridge", TABLE], None).await {
            Ok(_) => Ok(()),
            Err(GateError::Nft { .. }) => self.install().await,
            Err(e) => Err(e),
        }
    }

    /// Opens `src → dst`.
    pub async fn open(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Result<(), GateError> {
        let e = format!("{{ {src} . {dst} }}");
        self.nft(&["add", "element", "bridge", TABLE, "links", &e], None)
            .await
            .map(drop)
    }

    /// Closes `src → dst` (closing a closed pair is not an error).
    pub async fn close(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Result<(), GateError> {
        let e = format!("{{ {src} . {dst} }}");
        match self
            .nft(&["delete", "element", "bridge", TABLE, "links", &e], None)
            .await
        {
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
    pub async fn counters(&self) -> Result<GateCounters, GateError> {
        let out = self
            .nft(&["-j", "list", "table", "bridge", TABLE], None)
            .await?;
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

fn run_nft(args: &[String], stdin: Option<&str>) -> Result<String, GateError> {
    let mut c = Command::new("nft");
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

fn batchable(j: &Job) -> bool {
    j.1.is_none() && matches!(j.0.first().map(String::as_str), Some("add" | "delete"))
}

/// Runs jobs: several batchable ones as one script, falling back to one by one when the
/// script fails (one bad line fails the whole script, and each caller gets its own answer).
fn run_jobs(jobs: Vec<Job>) {
    if jobs.len() > 1 {
        let script: String = jobs.iter().map(|j| j.0.join(" ") + "\n").collect();
        if run_nft(&["-f".to_owned(), "-".to_owned()], Some(&script)).is_ok() {
            for j in jobs {
                let _ = j.2.send(Ok(String::new()));
            }
            return;
        }
    }
    for (args, stdin, reply) in jobs {
        let _ = reply.send(run_nft(&args, stdin.as_deref()));
    }
}
