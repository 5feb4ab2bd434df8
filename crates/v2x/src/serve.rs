//! Starting one operator's MEC service: the HTTP listener (V2X API, V2X application
//! function, VIS), the WebSocket listener for notifications, the UDP relay and the sweeper
//! of expired authorizations and subscriptions. Every socket may live in a namespace (the
//! MEC host's), bound to 127.0.0.1 by default.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::function::{OperatorConfig, PeerOperator, V2xFunction};
use crate::gate::Pc5Gate;
use crate::mec::Mec;
use crate::netns;
use crate::types::Plmn;
use crate::vis::{cell_of, Vis};

/// What `start` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The operator.
    pub plmn: Plmn,
    /// Peer operators.
    pub peers: Vec<PeerOperator>,
    /// Roaming agreement secret (link keys, peer token).
    pub roaming_secret: Vec<u8>,
    /// Operator / MEC application token.
    pub token: String,
    /// HTTP listen address (`127.0.0.1:0` picks a port).
    pub listen: SocketAddr,
    /// Relay UDP port on the listen address (0 picks one).
    pub relay_port: u16,
    /// Namespace the sockets live in.
    pub netns: Option<String>,
    /// PC5 gate the function opens links on.
    pub gate: Option<Pc5Gate>,
    /// Cell site position.
    pub site: (f32, f32),
    /// Address devices and clients reach this MEC at when it listens on 0.0.0.0.
    pub advertise: Option<IpAddr>,
    /// Create the gate's table (false when another MEC on the same medium did).
    pub install_gate: bool,
    /// Directory of the durable state (subscriptions, authorizations, links, VIS
    /// subscriptions); None keeps it in memory only.
    pub state_dir: Option<PathBuf>,
}

impl ServeOptions {
    /// Options for `plmn` on 127.0.0.1 with ephemeral ports and no gate.
    pub fn local(plmn: Plmn, token: &str, secret: &[u8]) -> ServeOptions {
        ServeOptions {
            plmn,
            peers: Vec::new(),
            roaming_secret: secret.to_vec(),
            token: token.to_owned(),
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            relay_port: 0,
            netns: None,
            gate: None,
            site: (48.85, 2.35),
            advertise: None,
            install_gate: true,
            state_dir: None,
        }
    }
}

/// A running MEC service; stops when dropped.
#[derive(Debug)]
pub struct MecHandle {
    /// HTTP address.
    pub http: SocketAddr,
    /// WebSocket address.
    pub ws: SocketAddr,
    /// Relay address.
    pub relay: SocketAddr,
    /// The service.
    pub mec: Arc<Mec>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl MecHandle {
    /// Base URL of the HTTP API.
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }
}

impl Drop for MecHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the service.
pub async fn start(o: ServeOptions) -> std::io::Result<MecHandle> {
    let ns = o.netns.as_deref();
    let http = netns::tcp_listener(ns, o.listen)?;
    let http_addr = http.local_addr()?;
    let ws = netns::tcp_listener(ns, SocketAddr::new(o.listen.ip(), 0))?;
    let ws_addr = ws.local_addr()?;
    let relay = netns::udp(ns, SocketAddr::new(o.listen.ip(), o.relay_port))?;
    let relay_addr = relay.local_addr()?;
    // Every device of the operator sends through this one socket: give bursts room (the
    // forced size needs CAP_NET_ADMIN; without it the kernel's default stays).
    let room = 8usize << 20;
    if nix::sys::socket::setsockopt(&relay, nix::sys::socket::sockopt::RcvBufForce, &room).is_err()
    {
        let _ = nix::sys::socket::setsockopt(&relay, nix::sys::socket::sockopt::RcvBuf, &room);
    }
    let seen = |a: SocketAddr| SocketAddr::new(o.advertise.unwrap_or(a.ip()), a.port());
    let cfg = OperatorConfig {
        cell_id: cell_of(&o.plmn),
        plmn: o.plmn,
        peers: o.peers,
        roaming_secret: o.roaming_secret,
        relay: seen(relay_addr),
        site: o.site,
    };
    let other = |e: String| std::io::Error::other(e);
    // A restart (its journal is there) keeps the gate's rules and reconciles them with what
    // it recorded; a first start installs a closed gate, so that rules nobody recorded
    // (an earlier run without state) do not stay open.
    let restart = o
        .state_dir
        .as_ref()
        .is_some_and(|d| d.join(crate::function::JOURNAL_FILE).exists());
    if let Some(g) = o.gate.as_ref().filter(|_| o.install_gate) {
        let done = if restart {
            g.ensure().await
        } else {
            g.install().await
        };
        done.map_err(|e| other(e.to_string()))?;
    }
    let base = format!("http://{}/vis/v2", seen(http_addr));
    let vis = Arc::new(Vis::new(&cfg, &base));
    vis.set_urls(&base, Some(&format!("ws://{}/vis/v2/ws", seen(ws_addr))));
    let function = match &o.state_dir {
        Some(dir) => {
            let f = V2xFunction::open(cfg, o.gate, dir).map_err(|e| other(e.to_string()))?;
            let (closed, opened) = f.recover().await.map_err(|e| other(e.to_string()))?;
            let subs = vis.restore(dir).map_err(|e| other(e.to_string()))?;
            tracing::info!(dir = %dir.display(), devices = f.devices().len(), links = opened,
                closed, vis_subscriptions = subs, "MEC state restored");
            f
        }
        None => V2xFunction::new(cfg, o.gate),
    };
    let mec = Arc::new(Mec::new(function, vis.clone(), o.token, o.netns.clone()));
    let app = crate::http::router(mec.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let mut tasks = vec![tokio::spawn(async move {
        if let Err(e) = axum::serve(http, app).await {
            tracing::error!(error = %e, "MEC HTTP server stopped");
        }
    })];
    tasks.push(tokio::spawn(crate::ws::serve(ws, vis)));
    tasks.push(tokio::spawn(crate::relay::run(relay, mec.clone())));
    let m = mec.clone();
    tasks.push(tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_millis(20));
        loop {
            t.tick().await;
            m.sweep().await;
        }
    }));
    Ok(MecHandle {
        http: http_addr,
        ws: ws_addr,
        relay: relay_addr,
        mec,
        tasks,
    })
}
