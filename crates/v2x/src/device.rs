//! An emulated vehicle: it talks to its operator's V2X application function over its access
//! network (HTTP from inside its namespace), and to its peer over the PC5 medium (UDP from
//! its PC5 address) or through the MEC relay.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::BufReader;
use tokio::net::UdpSocket;

use crate::httpc::HttpConn;

use crate::netns;
use crate::pc5::{self, Msg};
use crate::relay;
use crate::types::{AuthorizationRequest, ConfigurationParameters, Link, LinkRequest, Plmn, Rat};

/// UDP port of the link protocol on a device's PC5 address.
pub const PC5_PORT: u16 = 5000;

/// Nanoseconds since the first call in this process (one clock for every emulated device,
/// so one-way latency is exact).
pub fn mono_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let s = START.get_or_init(Instant::now);
    u64::try_from(s.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What went wrong for a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Socket trouble.
    #[error("device I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The MEC said no.
    #[error("refused by the MEC ({status}): {detail}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// ProblemDetails.detail.
        detail: String,
    },
    /// No answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The peer sent something wrong.
    #[error("link protocol: {0}")]
    Protocol(String),
}

/// Who a device is and where it lives.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Device id.
    pub id: String,
    /// Its credential from the operator.
    pub token: String,
    /// The operator serving it now.
    pub plmn: Plmn,
    /// Its namespace.
    pub netns: Option<String>,
    /// Its PC5 address.
    pub pc5: Ipv4Addr,
    /// Its access-network address (the relay answers there), if it uses the relay.
    pub access: Option<Ipv4Addr>,
    /// Its MEC's HTTP address.
    pub mec: SocketAddr,
    /// Its home operator while it roams (set by [`Device::roam`]).
    pub home: Option<Plmn>,
}

/// An emulated vehicle.
#[derive(Debug)]
pub struct Device {
    /// Who it is.
    pub spec: DeviceSpec,
    http: Option<HttpConn>,
    /// Its configuration parameters, once authorized.
    pub params: Option<ConfigurationParameters>,
    pc5: Arc<UdpSocket>,
    relay: Option<Arc<UdpSocket>>,
}

/// An established link.
#[derive(Debug)]
pub struct Session {
    /// Peer's PC5 address.
    pub peer: Ipv4Addr,
    key: [u8; 32],
    seq: std::sync::atomic::AtomicU64,
    pc5: Arc<UdpSocket>,
    relay: Option<(Arc<UdpSocket>, SocketAddr, Ipv4Addr)>,
}

fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    getrandom::fill(&mut n).expect("the OS random number generator works");
    n
}

impl Device {
    /// Opens the device's sockets in its namespace.
    pub async fn new(spec: DeviceSpec) -> Result<Device, DeviceError> {
        let ns = spec.netns.as_deref();
        let pc5 = Arc::new(netns::udp(ns, SocketAddr::new(spec.pc5.into(), PC5_PORT))?);
        let relay = match spec.access {
            Some(a) => Some(Arc::new(netns::udp(ns, SocketAddr::new(a.into(), 0))?)),
            None => None,
        };
        Ok(Device {
            spec,
            http: None,
            params: None,
            pc5,
            relay,
        })
    }

    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, DeviceError> {
        for attempt in 0..2 {
            if self.http.is_none() {
                let s = netns::tcp_connect(self.spec.netns.as_deref(), self.spec.mec).await?;
                self.http = Some(HttpConn::new(BufReader::new(s)));
            }
            let Some(c) = self.http.as_mut() else {
                continue;
            };
            match c.call(method, path, &self.spec.token, body).await {
                Ok((s, v)) if s < 300 => return Ok(v),
                Ok((s, v)) => {
                    return Err(DeviceError::Refused {
                        status: s,
                        detail: v["detail"].as_str().unwrap_or("").to_owned(),
                    })
                }
                // The server closed an idle keep-alive connection: reconnect once.
                Err(e) if attempt == 0 => {
                    tracing::debug!(error = %e, "reconnecting to the MEC");
                    self.http = None;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(DeviceError::Timeout("the MEC"))
    }

    /// Tells the current operator the device leaves (its links there close).
    pub async fn detach(&mut self) -> Result<(), DeviceError> {
        let path = format!("/v2x/v1/authorizations/{}", self.spec.id);
        self.call("DELETE", &path, None).await.map(drop)
    }

    /// Moves the device to another operator's MEC (after a handover): new credential, new
    /// MEC address; its parameters are gone until it authorizes there.
    pub fn attach(&mut self, plmn: Plmn, mec: SocketAddr, token: String) {
        self.spec.plmn = plmn;
        self.spec.mec = mec;
        self.spec.token = token;
        self.http = None;
        self.params = None;
    }

    /// Roams to another operator's MEC keeping its home credential: the visited MEC fetches
    /// its subscription from home when it authorizes.
    pub fn roam(&mut self, plmn: Plmn, mec: SocketAddr) {
        let home = self
            .spec
            .home
            .take()
            .unwrap_or_else(|| self.spec.plmn.clone());
        let token = self.spec.token.clone();
        self.attach(plmn.clone(), mec, token);
        self.spec.home = (home != plmn).then_some(home);
    }

    /// Sends the authorization request; keeps and returns the configuration parameters.
    pub async fn authorize(&mut self) -> Result<ConfigurationParameters, DeviceError> {
        let req = AuthorizationRequest {
            device_id: self.spec.id.clone(),
            services: Vec::new(),
            pc5_address: self.spec.pc5,
            relay_port: match &self.relay {
                Some(r) => Some(r.local_addr()?.port()),
                None => None,
            },
            home_plmn: self.spec.home.clone(),
        };
        let body = serde_json::to_value(&req).map_err(|e| DeviceError::Protocol(e.to_string()))?;
        let v = self
            .call("POST", "/v2x/v1/authorizations", Some(&body))
            .await?;
        let p: ConfigurationParameters =
            serde_json::from_value(v).map_err(|e| DeviceError::Protocol(e.to_string()))?;
        self.params = Some(p.clone());
        Ok(p)
    }

    /// Asks its operator to open the PC5 path towards `peer`.
    pub async fn open_path(
        &mut self,
        peer: Ipv4Addr,
        peer_plmn: &Plmn,
        service: u64,
    ) -> Result<Link, DeviceError> {
        let req = LinkRequest {
            device_id: self.spec.id.clone(),
            peer_address: peer,
            peer_plmn: peer_plmn.clone(),
            v2x_service_id: service,
            rat: Rat::Nr,
        };
        let body = serde_json::to_value(&req).map_err(|e| DeviceError::Protocol(e.to_string()))?;
        let v = self.call("POST", "/v2x/v1/links", Some(&body)).await?;
        serde_json::from_value(v).map_err(|e| DeviceError::Protocol(e.to_string()))
    }

    fn link_key(&self, service: u64) -> Result<(Vec<u8>, [u8; 4]), DeviceError> {
        let p = self
            .params
            .as_ref()
            .ok_or_else(|| DeviceError::Protocol("not authorized".into()))?;
        let k = p
            .link_keys
            .iter()
            .find(|k| k.v2x_service_id == service)
            .ok_or_else(|| DeviceError::Protocol(format!("no link key for service {service}")))?;
        let key = pc5::unhex(&k.key).ok_or_else(|| DeviceError::Protocol("bad key".into()))?;
        let id = pc5::unhex(&k.key_id)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .ok_or_else(|| DeviceError::Protocol("bad key id".into()))?;
        Ok((key, id))
    }

    async fn recv_msg(
        &self,
        until: Instant,
        what: &'static str,
    ) -> Result<(Msg, SocketAddr), DeviceError> {
        let mut buf = vec![0u8; 2048];
        loop {
            let left = until
                .checked_duration_since(Instant::now())
                .ok_or(DeviceError::Timeout(what))?;
            let (n, from) = tokio::time::timeout(left, self.pc5.recv_from(&mut buf))
                .await
                .map_err(|_| DeviceError::Timeout(what))??;
            match Msg::decode(&buf[..n]) {
                Ok(Msg::Data { .. }) | Err(_) => continue,
                Ok(m) => return Ok((m, from)),
            }
        }
    }

    /// Initiator side: open our path, then request → security mode → accept.
    pub async fn initiate(
        &mut self,
        peer: Ipv4Addr,
        peer_plmn: &Plmn,
        service: u64,
        timeout: Duration,
    ) -> Result<Session, DeviceError> {
        let until = Instant::now() + timeout;
        self.open_path(peer, peer_plmn, service).await?;
        let (key, key_id) = self.link_key(service)?;
        let n1 = nonce();
        let to = SocketAddr::new(peer.into(), PC5_PORT);
        let req = Msg::Request {
            device: self.spec.id.clone(),
            plmn: self.spec.plmn.to_string(),
            service,
            key_id,
            nonce: n1,
        };
        self.pc5.send_to(&req.encode(), to).await?;
        let (m, _) = self.recv_msg(until, "SECURITY MODE COMMAND").await?;
        let Msg::SecurityModeCommand {
            device,
            nonce: n2,
            mac,
            ..
        } = m
        else {
            return Err(DeviceError::Protocol(format!(
                "expected SECURITY MODE COMMAND, got {m:?}"
            )));
        };
        if !pc5::same(&mac, &pc5::smc_mac(&key, &n1, &n2, &self.spec.id, &device)) {
            return Err(DeviceError::Protocol(
                "SECURITY MODE COMMAND fails its MAC".into(),
            ));
        }
        let done = Msg::SecurityModeComplete {
            mac: pc5::smp_mac(&key, &n1, &n2),
        };
        self.pc5.send_to(&done.encode(), to).await?;
        let session = pc5::session_key(&key, &n1, &n2);
        let (m, _) = self.recv_msg(until, "DIRECT COMMUNICATION ACCEPT").await?;
        match m {
            Msg::Accept { mac } if pc5::same(&mac, &pc5::accept_mac(&session)) => {}
            other => {
                return Err(DeviceError::Protocol(format!(
                    "expected ACCEPT, got {other:?}"
                )))
            }
        }
        Ok(self.session(peer, session))
    }

    /// Responder side: wait for a request, open our path back (our operator checks the
    /// initiator's PLMN), then security mode → accept.
    pub async fn respond(&mut self, timeout: Duration) -> Result<Session, DeviceError> {
        let until = Instant::now() + timeout;
        let (m, from) = self.recv_msg(until, "DIRECT COMMUNICATION REQUEST").await?;
        let Msg::Request {
            device,
            plmn,
            service,
            key_id,
            nonce: n1,
        } = m
        else {
            return Err(DeviceError::Protocol(format!(
                "expected REQUEST, got {m:?}"
            )));
        };
        let peer = match from.ip() {
            std::net::IpAddr::V4(a) => a,
            std::net::IpAddr::V6(_) => return Err(DeviceError::Protocol("IPv6 peer".into())),
        };
        let peer_plmn: Plmn = plmn
            .parse()
            .map_err(|e: crate::types::BadPlmn| DeviceError::Protocol(e.to_string()))?;
        self.open_path(peer, &peer_plmn, service).await?;
        let (key, my_id) = self.link_key(service)?;
        if my_id != key_id {
            return Err(DeviceError::Protocol(
                "the request names another link key".into(),
            ));
        }
        let n2 = nonce();
        let smc = Msg::SecurityModeCommand {
            device: self.spec.id.clone(),
            plmn: self.spec.plmn.to_string(),
            nonce: n2,
            mac: pc5::smc_mac(&key, &n1, &n2, &device, &self.spec.id),
        };
        self.pc5.send_to(&smc.encode(), from).await?;
        let (m, _) = self.recv_msg(until, "SECURITY MODE COMPLETE").await?;
        match m {
            Msg::SecurityModeComplete { mac } if pc5::same(&mac, &pc5::smp_mac(&key, &n1, &n2)) => {
            }
            other => {
                return Err(DeviceError::Protocol(format!(
                    "expected COMPLETE, got {other:?}"
                )))
            }
        }
        let session = pc5::session_key(&key, &n1, &n2);
        let acc = Msg::Accept {
            mac: pc5::accept_mac(&session),
        };
        self.pc5.send_to(&acc.encode(), from).await?;
        Ok(self.session(peer, session))
    }

    fn session(&self, peer: Ipv4Addr, key: [u8; 32]) -> Session {
        let relay = match (&self.relay, &self.params) {
            (Some(r), Some(p)) => p
                .relay
                .parse::<SocketAddr>()
                .ok()
                .map(|to| (r.clone(), to, self.spec.pc5)),
            _ => None,
        };
        Session {
            peer,
            key,
            seq: std::sync::atomic::AtomicU64::new(0),
            pc5: self.pc5.clone(),
            relay,
        }
    }

    /// The PC5 socket (for tests that send raw datagrams).
    pub fn pc5_socket(&self) -> Arc<UdpSocket> {
        self.pc5.clone()
    }
}

impl Session {
    /// Sends one message over PC5.
    pub async fn send(&self, payload: &[u8]) -> std::io::Result<()> {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let m = pc5::seal(&self.key, seq, mono_ns(), payload);
        self.pc5
            .send_to(&m, SocketAddr::new(self.peer.into(), PC5_PORT))
            .await
            .map(drop)
    }

    /// Sends one message through the relay (device → MEC → MEC → peer).
    pub async fn send_relayed(&self, payload: &[u8]) -> std::io::Result<()> {
        let Some((sock, to, me)) = &self.relay else {
            return Err(std::io::Error::other("this device has no relay"));
        };
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let m = pc5::seal(&self.key, seq, mono_ns(), payload);
        sock.send_to(&relay::encode(relay::FROM_DEVICE, *me, self.peer, &m), *to)
            .await
            .map(drop)
    }

    /// Receives the next valid message, direct or relayed, within `timeout`:
    /// (seq, one-way latency ns, payload length, came through the relay).
    pub async fn recv(&self, timeout: Duration) -> Option<(u64, u64, usize, bool)> {
        let until = Instant::now() + timeout;
        let mut a = vec![0u8; 2048];
        let mut b = vec![0u8; 2048];
        loop {
            let left = until.checked_duration_since(Instant::now())?;
            let (data, relayed) = match &self.relay {
                Some((r, _, _)) => tokio::select! {
                    x = self.pc5.recv_from(&mut a) => (x.ok().map(|(n, _)| a[..n].to_vec()), false),
                    x = r.recv_from(&mut b) => (x.ok().and_then(|(n, _)| relay::decode(&b[..n]).map(|(_, _, _, p)| p.to_vec())), true),
                    () = tokio::time::sleep(left) => return None,
                },
                None => tokio::select! {
                    x = self.pc5.recv_from(&mut a) => (x.ok().map(|(n, _)| a[..n].to_vec()), false),
                    () = tokio::time::sleep(left) => return None,
                },
            };
            let Some(d) = data else { continue };
            if let Some((seq, sent, p)) = pc5::open(&self.key, &d) {
                return Some((seq, mono_ns().saturating_sub(sent), p.len(), relayed));
            }
        }
    }
}
