//! Link establishment between CPs of two VNFs, step by step as the specification describes it.
//!
//! 1. obtain the IP address and the id of a CP of the first VNF (from the site: AttachCp);
//! 2. determine, from that CP id, the second VNF it must connect to ([`LinkTable`]);
//! 3. send the first CP's IP and id to the second VNF's endpoint (its [`LinkAgent`]);
//! 4. the second VNF's CP starts the link connection to the first CP.
//!
//! A link goes `requested → connecting → up` or `failed(reason)`; every step has a deadline,
//! so a peer that never answers fails with a reason instead of hanging (the OSM complaint).
//!
//! A [`LinkAgent`] is the per-VNF endpoint: a management listener on 127.0.0.1 that takes
//! link requests, and a data-plane listener on each CP's address, inside the network
//! namespace where that CP's interface lives. Sockets are created on a short-lived thread
//! that has entered the namespace (`setns`); a socket stays in the namespace it was made in,
//! so the rest runs on tokio as usual.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::plan::{GenericCommand, NsPlan};

/// TCP port a CP accepts link connections on.
pub const LINK_PORT: u16 = 7946;

/// State of a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LinkState {
    /// The orchestrator has the first CP's address and is telling the second VNF.
    Requested,
    /// The second VNF accepted the request; its CP is connecting.
    Connecting,
    /// Both CPs exchanged messages over the data plane.
    Up,
    /// It did not work.
    Failed {
        /// Why.
        reason: String,
    },
}

/// The API object of a link: where it is and how it got there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRecord {
    /// Link name.
    pub link: String,
    /// First VNF.
    pub first_vnf: String,
    /// First CP id (site resource name).
    pub first_cp: String,
    /// First CP's address, as the site reported it.
    pub first_ip: Option<Ipv4Addr>,
    /// Second VNF (determined from the first CP id).
    pub second_vnf: String,
    /// Second CP id.
    pub second_cp: String,
    /// Current state.
    pub state: LinkState,
    /// Every state with the milliseconds since the request.
    pub history: Vec<(LinkState, u64)>,
}

/// Which second VNF/CP each first CP id must connect to; built from the NS plan.
#[derive(Debug, Clone, Default)]
pub struct LinkTable {
    by_first_cp: BTreeMap<String, Vec<(String, String, String)>>,
}

impl LinkTable {
    /// From every ConnectLink in the plan.
    pub fn from_plan(plan: &NsPlan) -> Self {
        let mut t = LinkTable::default();
        for cmd in plan.links() {
            if let GenericCommand::ConnectLink {
                link,
                first,
                second,
            } = cmd
            {
                t.by_first_cp
                    .entry(first.resource.clone())
                    .or_default()
                    .push((link.clone(), second.vnf.clone(), second.resource.clone()));
            }
        }
        t
    }

    /// Step 2: `(link, second VNF, second CP)` for a first CP id.
    pub fn peers_of(&self, first_cp: &str) -> &[(String, String, String)] {
        self.by_first_cp
            .get(first_cp)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

pub use model::api::{LinkReply, LinkRequest};

/// Why a link agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Entering a namespace or binding failed.
    #[error("cannot listen for CP {cp} on {addr}")]
    Bind {
        /// CP id.
        cp: String,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        err: std::io::Error,
    },
}

use net::netns::in_netns;

/// A CP the agent serves: its id, address and the namespace its interface is in.
#[derive(Debug, Clone)]
pub struct AgentCp {
    /// CP id.
    pub id: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Network namespace name (None: the current one).
    pub netns: Option<String>,
}

/// The per-VNF link endpoint.
#[derive(Debug)]
pub struct LinkAgent {
    vnf: String,
    mgmt: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for LinkAgent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl LinkAgent {
    /// Starts the endpoint of VNF `vnf`: accepts on every CP, takes requests on 127.0.0.1:0.
    pub async fn start(vnf: &str, cps: Vec<AgentCp>, port: u16) -> Result<LinkAgent, AgentError> {
        let mut tasks = Vec::new();
        for cp in &cps {
            let addr = SocketAddr::new(IpAddr::V4(cp.ip), port);
            let bind = |err| AgentError::Bind {
                cp: cp.id.clone(),
                addr,
                err,
            };
            let std_l = in_netns(cp.netns.as_deref(), move || {
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .map_err(bind)?;
            let l = TcpListener::from_std(std_l).map_err(bind)?;
            tasks.push(tokio::spawn(serve_cp(l, cp.id.clone())));
        }
        let mgmt_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let l = TcpListener::bind(mgmt_addr)
            .await
            .map_err(|err| AgentError::Bind {
                cp: "(management)".into(),
                addr: mgmt_addr,
                err,
            })?;
        let mgmt = l.local_addr().map_err(|err| AgentError::Bind {
            cp: "(management)".into(),
            addr: mgmt_addr,
            err,
        })?;
        tasks.push(tokio::spawn(serve_mgmt(l, vnf.to_owned(), cps)));
        tracing::info!(vnf, %mgmt, "link agent started");
        Ok(LinkAgent {
            vnf: vnf.to_owned(),
            mgmt,
            tasks,
        })
    }

    /// Its management address (what the orchestrator sends requests to).
    pub fn endpoint(&self) -> SocketAddr {
        self.mgmt
    }

    /// The VNF it serves.
    pub fn vnf(&self) -> &str {
        &self.vnf
    }
}

/// The first CP's side: answer each hello with an ack naming this CP.
async fn serve_cp(l: TcpListener, cp: String) {
    loop {
        let Ok((s, peer)) = l.accept().await else {
            continue;
        };
        let cp = cp.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_ok() {
                if let Some(rest) = line.trim().strip_prefix("LINK ") {
                    tracing::info!(cp, %peer, hello = rest, "link hello received");
                    let _ = w
                        .write_all(format!("ACK {rest} BY {cp}\n").as_bytes())
                        .await;
                }
            }
        });
    }
}

async fn serve_mgmt(l: TcpListener, vnf: String, cps: Vec<AgentCp>) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let (vnf, cps) = (vnf.clone(), cps.clone());
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match serde_json::from_str::<LinkRequest>(&line) {
                Ok(req) => connect_as_second(&vnf, &cps, &req).await,
                Err(e) => LinkReply {
                    up: false,
                    detail: format!("bad request: {e}"),
                },
            };
            let mut out = serde_json::to_string(&reply).unwrap_or_default();
            out.push('\n');
            let _ = w.write_all(out.as_bytes()).await;
        });
    }
}

/// Step 4: this VNF's CP opens the connection to the first CP and exchanges a message.
async fn connect_as_second(vnf: &str, cps: &[AgentCp], req: &LinkRequest) -> LinkReply {
    let fail = |detail: String| LinkReply { up: false, detail };
    let Some(cp) = cps.iter().find(|c| c.id == req.second_cp) else {
        return fail(format!("VNF {vnf} has no CP {}", req.second_cp));
    };
    let local = SocketAddr::new(IpAddr::V4(cp.ip), 0);
    let netns = cp.netns.clone();
    let bound = move || {
        in_netns(netns.as_deref(), move || {
            let s = TcpSocket::new_v4()?;
            s.bind(local)?;
            Ok(s)
        })
    };
    if let Err(e) = bound() {
        return fail(format!("cannot bind CP {} at {local}: {e}", cp.id));
    }
    let peer = SocketAddr::new(IpAddr::V4(req.first_ip), req.port);
    let last_error = std::sync::Mutex::new(None::<String>);
    let exchange = async {
        // The first VNF may still be booting (no ARP answer, nothing listening yet):
        // retry the connection until the deadline below ends the exchange.
        let mut s: TcpStream = loop {
            let sock = bound().map_err(|e| format!("cannot bind CP at {local}: {e}"))?;
            match sock.connect(peer).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "link connect failed; retrying");
                    if let Ok(mut l) = last_error.lock() {
                        *l = Some(e.to_string());
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let hello = format!("LINK {} FROM {} TO {}\n", req.link, cp.id, req.first_cp);
        s.write_all(hello.as_bytes())
            .await
            .map_err(|e| format!("send to {peer}: {e}"))?;
        let mut ack = String::new();
        BufReader::new(&mut s)
            .read_line(&mut ack)
            .await
            .map_err(|e| format!("read from {peer}: {e}"))?;
        let want = format!(
            "ACK {} FROM {} TO {} BY {}",
            req.link, cp.id, req.first_cp, req.first_cp
        );
        if ack.trim() == want {
            Ok(ack.trim().to_owned())
        } else {
            Err(format!("unexpected answer from {peer}: {:?}", ack.trim()))
        }
    };
    match tokio::time::timeout(Duration::from_millis(req.timeout_ms), exchange).await {
        Ok(Ok(ack)) => LinkReply {
            up: true,
            detail: ack,
        },
        Ok(Err(e)) => fail(e),
        Err(_) => fail(format!(
            "no answer from {peer} within {} ms{}",
            req.timeout_ms,
            last_error
                .lock()
                .ok()
                .and_then(|l| l.clone())
                .map(|e| format!(" (last try: {e})"))
                .unwrap_or_default()
        )),
    }
}

/// Runs link establishment for one first CP (steps 2–4; step 1 gave `first_ip`).
///
/// `endpoints` maps VNF id → its agent's management address. Every link the table lists for
/// `first_cp` is established; each returned record ends `up` or `failed`.
pub async fn establish(
    table: &LinkTable,
    first_vnf: &str,
    first_cp: &str,
    first_ip: Option<Ipv4Addr>,
    endpoints: &BTreeMap<String, SocketAddr>,
    deadline: Duration,
) -> Vec<LinkRecord> {
    let none = BTreeMap::new();
    establish_with_auth(
        table, first_vnf, first_cp, first_ip, endpoints, &none, deadline,
    )
    .await
}

/// [`establish`], sending `auth[second VNF]` (a site credential) with each request.
pub async fn establish_with_auth(
    table: &LinkTable,
    first_vnf: &str,
    first_cp: &str,
    first_ip: Option<Ipv4Addr>,
    endpoints: &BTreeMap<String, SocketAddr>,
    auth: &BTreeMap<String, String>,
    deadline: Duration,
) -> Vec<LinkRecord> {
    let peers = table.peers_of(first_cp);
    let mut out = Vec::new();
    for (link, second_vnf, second_cp) in peers {
        let start = Instant::now();
        let mut rec = LinkRecord {
            link: link.clone(),
            first_vnf: first_vnf.to_owned(),
            first_cp: first_cp.to_owned(),
            first_ip,
            second_vnf: second_vnf.clone(),
            second_cp: second_cp.clone(),
            state: LinkState::Requested,
            history: vec![(LinkState::Requested, 0)],
        };
        let result = request(&mut rec, start, endpoints, auth, deadline).await;
        let state = match result {
            Ok(()) => LinkState::Up,
            Err(reason) => LinkState::Failed { reason },
        };
        set(&mut rec, start, state);
        tracing::info!(link = %rec.link, state = ?rec.state, "link finished");
        out.push(rec);
    }
    out
}

fn set(rec: &mut LinkRecord, start: Instant, state: LinkState) {
    let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    rec.history.push((state.clone(), ms));
    rec.state = state;
}

async fn request(
    rec: &mut LinkRecord,
    start: Instant,
    endpoints: &BTreeMap<String, SocketAddr>,
    auth: &BTreeMap<String, String>,
    deadline: Duration,
) -> Result<(), String> {
    let ip = rec
        .first_ip
        .ok_or_else(|| format!("site reported no IP address for CP {}", rec.first_cp))?;
    let ep = *endpoints
        .get(&rec.second_vnf)
        .ok_or_else(|| format!("VNF {} has no link endpoint", rec.second_vnf))?;
    let req = LinkRequest {
        link: rec.link.clone(),
        first_cp: rec.first_cp.clone(),
        first_ip: ip,
        port: LINK_PORT,
        second_cp: rec.second_cp.clone(),
        // The second side must finish before our own deadline, so that its reason reaches us.
        timeout_ms: u64::try_from(deadline.as_millis() * 3 / 4).unwrap_or(u64::MAX),
        auth: auth.get(&rec.second_vnf).cloned(),
    };
    let second_vnf = rec.second_vnf.clone();
    let talk = async {
        let mut s = TcpStream::connect(ep)
            .await
            .map_err(|e| format!("VNF {second_vnf} endpoint {ep}: {e}"))?;
        let mut line = serde_json::to_string(&req).map_err(|e| e.to_string())?;
        line.push('\n');
        s.write_all(line.as_bytes())
            .await
            .map_err(|e| format!("VNF {second_vnf} endpoint {ep}: {e}"))?;
        Ok::<_, String>(s)
    };
    let remaining = |start: Instant| deadline.saturating_sub(start.elapsed());
    let mut s = match tokio::time::timeout(remaining(start), talk).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(format!(
                "VNF {second_vnf} endpoint {ep} did not accept within {deadline:?}"
            ))
        }
    };
    set(rec, start, LinkState::Connecting);
    let mut answer = String::new();
    match tokio::time::timeout(
        remaining(start),
        BufReader::new(&mut s).read_line(&mut answer),
    )
    .await
    {
        Err(_) => Err(format!(
            "no answer from VNF {second_vnf} within {:.1} s",
            deadline.as_secs_f64()
        )),
        Ok(Err(e)) => Err(format!("VNF {second_vnf} endpoint {ep}: {e}")),
        Ok(Ok(0)) => Err(format!(
            "VNF {second_vnf} endpoint {ep} closed without answering"
        )),
        Ok(Ok(_)) => {
            let reply: LinkReply = serde_json::from_str(&answer)
                .map_err(|e| format!("bad answer from VNF {second_vnf}: {e}"))?;
            if reply.up {
                Ok(())
            } else {
                Err(reply.detail)
            }
        }
    }
}
