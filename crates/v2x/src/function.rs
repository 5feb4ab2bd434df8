//! The V2X application function of one operator: subscription data (from the V2X API),
//! authorizations (configuration parameters handed out, with their validity timer) and the
//! links it opened on the PC5 gate. No HTTP here; `http.rs` calls in.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ring::hmac;

use crate::gate::{GateError, Pc5Gate};
use crate::types::{
    dst_layer2_id, pc5_qos, validate_device_id, AuthorizationRequest, ConfigurationParameters,
    Link, LinkKey, LinkRequest, Pc5Authorization, PeerServer, Plmn, Provisioned, Rat, ServiceId,
    ServiceToDestination, V2xSubscription,
};

/// A peer operator the roaming agreement names.
#[derive(Debug, Clone)]
pub struct PeerOperator {
    /// Its PLMN.
    pub plmn: Plmn,
    /// Its V2X application function base URL (over the inter-operator link).
    pub uri: String,
    /// Its message relay.
    pub relay: SocketAddr,
}

/// One operator's MEC configuration.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// This operator's PLMN.
    pub plmn: Plmn,
    /// Peers (the other operators).
    pub peers: Vec<PeerOperator>,
    /// Secret of the roaming agreement, the same at every operator: link keys derive from it.
    pub roaming_secret: Vec<u8>,
    /// This MEC's relay address as devices reach it.
    pub relay: SocketAddr,
    /// Cell id of the operator's cell (28 bits) and its position.
    pub cell_id: u32,
    /// Latitude, longitude of the cell site.
    pub site: (f32, f32),
}

/// Why the function refused.
#[derive(Debug, thiserror::Error)]
pub enum V2xError {
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// No subscription for the device.
    #[error("device {0} has no V2X subscription")]
    NotSubscribed(String),
    /// The device's credential is wrong.
    #[error("the device credential does not match device {0}")]
    BadCredential(String),
    /// The device asked for a service it is not subscribed to.
    #[error("device {device} is not subscribed to V2X service {service}")]
    ServiceNotAllowed {
        /// Device.
        device: String,
        /// Service.
        service: ServiceId,
    },
    /// Not authorized yet, or the configuration parameters expired.
    #[error("device {0} has no valid configuration parameters (authorize first)")]
    NotAuthorized(String),
    /// The peer's PLMN is not in the device's authorized list.
    #[error("PLMN {plmn} is not authorized for device {device} on {rat:?}")]
    PlmnNotAuthorized {
        /// Device.
        device: String,
        /// The peer's PLMN.
        plmn: Plmn,
        /// RAT.
        rat: Rat,
    },
    /// Unknown link.
    #[error("no link {0}")]
    NoLink(String),
    /// The PC5 gate failed.
    #[error("PC5 gate: {0}")]
    Gate(#[from] GateError),
}

#[derive(Debug)]
struct Sub {
    data: V2xSubscription,
    token: String,
}

/// A device's current authorization.
#[derive(Debug, Clone)]
pub struct Authorization {
    /// The parameters handed out.
    pub params: ConfigurationParameters,
    /// When they expire.
    pub expires: Instant,
    /// The device's PC5 address.
    pub pc5: Ipv4Addr,
    /// Where relayed messages reach it.
    pub relay_to: Option<SocketAddr>,
}

#[derive(Debug, Default)]
struct State {
    subs: HashMap<String, Sub>,
    auths: HashMap<String, Authorization>,
    links: HashMap<String, Link>,
}

/// What a lifecycle change took down (for notifications and the peer).
#[derive(Debug, Clone, Default)]
pub struct Teardown {
    /// Links closed.
    pub links: Vec<Link>,
    /// The device's PC5 address, if it had one.
    pub address: Option<Ipv4Addr>,
}

/// The V2X application function.
#[derive(Debug)]
pub struct V2xFunction {
    cfg: OperatorConfig,
    gate: Option<Pc5Gate>,
    state: Mutex<State>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    // getrandom fails only without an OS RNG; a zero token would still be unique per call
    // below because it is never the only factor of identity, but fail loudly instead.
    getrandom::fill(&mut b).expect("the OS random number generator works");
    hex(&b)
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The link key of `service` under `secret`: the same at every operator of the agreement.
pub fn link_key(secret: &[u8], service: ServiceId) -> LinkKey {
    let k = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let key = hmac::sign(&k, format!("v2x link key {service}").as_bytes());
    let id = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key.as_ref()), b"key id");
    LinkKey {
        v2x_service_id: service,
        key_id: hex(&id.as_ref()[..4]),
        key: hex(key.as_ref()),
    }
}

impl V2xFunction {
    /// A function for `cfg`, opening links on `gate` (None: decide only, open nothing).
    pub fn new(cfg: OperatorConfig, gate: Option<Pc5Gate>) -> V2xFunction {
        V2xFunction {
            cfg,
            gate,
            state: Mutex::new(State::default()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &OperatorConfig {
        &self.cfg
    }

    /// The PC5 gate this function opens links on.
    pub fn gate(&self) -> Option<&Pc5Gate> {
        self.gate.as_ref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves maps that are still consistent (every
        // mutation is a single insert/remove), so carry on with them.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// V2X API: provisions (or replaces) a device's subscription; a new device token each time.
    /// Replacing it drops the device's current authorization and links (new terms).
    pub async fn provision(
        &self,
        device: &str,
        data: V2xSubscription,
    ) -> Result<(Provisioned, Teardown), V2xError> {
        validate_device_id(device).map_err(V2xError::Invalid)?;
        data.validate().map_err(V2xError::Invalid)?;
        let token = random_hex(16);
        let down = {
            let mut st = self.lock();
            st.subs.insert(
                device.to_owned(),
                Sub {
                    data: data.clone(),
                    token: token.clone(),
                },
            );
            Self::take_device(&mut st, device)
        };
        self.close_links(&down.links).await?;
        Ok((
            Provisioned {
                device_id: device.to_owned(),
                subscription: data,
                device_token: token,
            },
            down,
        ))
    }

    /// V2X API: a device's subscription.
    pub fn subscription(&self, device: &str) -> Result<V2xSubscription, V2xError> {
        self.lock()
            .subs
            .get(device)
            .map(|s| s.data.clone())
            .ok_or_else(|| V2xError::NotSubscribed(device.to_owned()))
    }

    /// V2X API: every provisioned device id, sorted.
    pub fn devices(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().subs.keys().cloned().collect();
        v.sort();
        v
    }

    /// V2X API: revokes a subscription; its authorization and links go at once.
    pub async fn revoke(&self, device: &str) -> Result<Teardown, V2xError> {
        let down = {
            let mut st = self.lock();
            if st.subs.remove(device).is_none() {
                return Err(V2xError::NotSubscribed(device.to_owned()));
            }
            Self::take_device(&mut st, device)
        };
        self.close_links(&down.links).await?;
        Ok(down)
    }

    /// The device leaves this operator (it moved to another one): its authorization and
    /// links go, its subscription stays.
    pub async fn release(&self, token: &str, device: &str) -> Result<Teardown, V2xError> {
        let down = {
            let mut st = self.lock();
            self.check_token(&st, device, token)?;
            Self::take_device(&mut st, device)
        };
        self.close_links(&down.links).await?;
        Ok(down)
    }

    fn take_device(st: &mut State, device: &str) -> Teardown {
        let address = st.auths.remove(device).map(|a| a.pc5);
        let ids: Vec<String> = st
            .links
            .values()
            .filter(|l| l.device_id == device)
            .map(|l| l.id.clone())
            .collect();
        let links = ids.iter().filter_map(|i| st.links.remove(i)).collect();
        Teardown { links, address }
    }

    async fn close_links(&self, links: &[Link]) -> Result<(), V2xError> {
        if let Some(g) = &self.gate {
            for l in links {
                g.close(l.address, l.peer_address).await?;
            }
        }
        Ok(())
    }

    fn check_token(&self, st: &State, device: &str, token: &str) -> Result<(), V2xError> {
        let sub = st
            .subs
            .get(device)
            .ok_or_else(|| V2xError::NotSubscribed(device.to_owned()))?;
        if !crate::pc5::same(sub.token.as_bytes(), token.as_bytes()) {
            return Err(V2xError::BadCredential(device.to_owned()));
        }
        Ok(())
    }

    /// The V2X application function: answers an authorization request with configuration
    /// parameters built from the device's subscription. `from` is the device's address on
    /// the access network (where relayed messages go back).
    pub fn authorize(
        &self,
        token: &str,
        req: &AuthorizationRequest,
        from: Option<std::net::IpAddr>,
    ) -> Result<ConfigurationParameters, V2xError> {
        validate_device_id(&req.device_id).map_err(V2xError::Invalid)?;
        let mut st = self.lock();
        self.check_token(&st, &req.device_id, token)?;
        let sub = &st.subs[&req.device_id].data;
        let services: Vec<ServiceId> = if req.services.is_empty() {
            sub.services.clone()
        } else {
            for s in &req.services {
                if !sub.services.contains(s) {
                    return Err(V2xError::ServiceNotAllowed {
                        device: req.device_id.clone(),
                        service: *s,
                    });
                }
            }
            req.services.clone()
        };
        let mut plmns = vec![self.cfg.plmn.clone()];
        for p in &sub.plmns {
            if !plmns.contains(p) {
                plmns.push(p.clone());
            }
        }
        let per_rat = |r: Rat| {
            if sub.rats.contains(&r) {
                plmns.clone()
            } else {
                Vec::new()
            }
        };
        let validity = sub.validity_s;
        let params = ConfigurationParameters {
            device_id: req.device_id.clone(),
            serving_plmn: self.cfg.plmn.clone(),
            validity_timer: validity,
            expires_at_ms: now_ms() + u64::from(validity) * 1000,
            pc5_authorization: Pc5Authorization {
                nr: per_rat(Rat::Nr),
                eutra: per_rat(Rat::Eutra),
            },
            service_to_destination: services
                .iter()
                .map(|s| ServiceToDestination {
                    v2x_service_id: *s,
                    dst_layer2_id: dst_layer2_id(*s),
                })
                .collect(),
            pc5_qos: services.iter().map(|s| pc5_qos(*s)).collect(),
            peer_servers: self
                .cfg
                .peers
                .iter()
                .filter(|p| plmns.contains(&p.plmn))
                .map(|p| PeerServer {
                    plmn: p.plmn.clone(),
                    uri: p.uri.clone(),
                    relay: p.relay.to_string(),
                })
                .collect(),
            link_keys: services
                .iter()
                .map(|s| link_key(&self.cfg.roaming_secret, *s))
                .collect(),
            relay: self.cfg.relay.to_string(),
        };
        let relay_to = match (from, req.relay_port) {
            (Some(ip), Some(port)) => Some(SocketAddr::new(ip, port)),
            _ => None,
        };
        st.auths.insert(
            req.device_id.clone(),
            Authorization {
                params: params.clone(),
                expires: Instant::now() + Duration::from_secs(u64::from(validity)),
                pc5: req.pc5_address,
                relay_to,
            },
        );
        Ok(params)
    }

    /// Opens the PC5 path `device → peer` for an authorized device whose parameters list the
    /// peer's PLMN for the RAT. Idempotent per (device, peer, service).
    pub async fn open_link(&self, token: &str, req: &LinkRequest) -> Result<Link, V2xError> {
        req.peer_plmn
            .validate()
            .map_err(|e| V2xError::Invalid(e.to_string()))?;
        let link = {
            let st = self.lock();
            self.check_token(&st, &req.device_id, token)?;
            let auth = st
                .auths
                .get(&req.device_id)
                .filter(|a| a.expires > Instant::now())
                .ok_or_else(|| V2xError::NotAuthorized(req.device_id.clone()))?;
            let list = match req.rat {
                Rat::Nr => &auth.params.pc5_authorization.nr,
                Rat::Eutra => &auth.params.pc5_authorization.eutra,
            };
            if !list.contains(&req.peer_plmn) {
                return Err(V2xError::PlmnNotAuthorized {
                    device: req.device_id.clone(),
                    plmn: req.peer_plmn.clone(),
                    rat: req.rat,
                });
            }
            if !auth
                .params
                .service_to_destination
                .iter()
                .any(|s| s.v2x_service_id == req.v2x_service_id)
            {
                return Err(V2xError::ServiceNotAllowed {
                    device: req.device_id.clone(),
                    service: req.v2x_service_id,
                });
            }
            if let Some(l) = st.links.values().find(|l| {
                l.device_id == req.device_id
                    && l.peer_address == req.peer_address
                    && l.v2x_service_id == req.v2x_service_id
                    && l.address == auth.pc5
            }) {
                return Ok(l.clone());
            }
            Link {
                id: random_hex(8),
                device_id: req.device_id.clone(),
                address: auth.pc5,
                peer_address: req.peer_address,
                peer_plmn: req.peer_plmn.clone(),
                v2x_service_id: req.v2x_service_id,
            }
        };
        // The rule goes in before the link is recorded: a recorded link is always open.
        if let Some(g) = &self.gate {
            g.open(link.address, link.peer_address).await?;
        }
        self.lock().links.insert(link.id.clone(), link.clone());
        Ok(link)
    }

    /// Closes one of the device's links.
    pub async fn close_link(&self, token: &str, device: &str, id: &str) -> Result<Link, V2xError> {
        let link = {
            let mut st = self.lock();
            self.check_token(&st, device, token)?;
            match st.links.get(id) {
                Some(l) if l.device_id == device => {}
                _ => return Err(V2xError::NoLink(id.to_owned())),
            }
            st.links
                .remove(id)
                .ok_or_else(|| V2xError::NoLink(id.to_owned()))?
        };
        self.close_links(std::slice::from_ref(&link)).await?;
        Ok(link)
    }

    /// A peer operator revoked the device at `address`: close every link of ours towards it.
    pub async fn peer_released(&self, address: Ipv4Addr) -> Result<Vec<Link>, V2xError> {
        let links: Vec<Link> = {
            let mut st = self.lock();
            let ids: Vec<String> = st
                .links
                .values()
                .filter(|l| l.peer_address == address)
                .map(|l| l.id.clone())
                .collect();
            ids.iter().filter_map(|i| st.links.remove(i)).collect()
        };
        self.close_links(&links).await?;
        Ok(links)
    }

    /// Links of one device (all when None).
    pub fn links(&self, device: Option<&str>) -> Vec<Link> {
        let mut v: Vec<Link> = self
            .lock()
            .links
            .values()
            .filter(|l| device.is_none_or(|d| l.device_id == d))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Authorizations whose validity timer ran out are dropped with their links.
    pub async fn expire(&self, now: Instant) -> Result<Vec<(String, Teardown)>, V2xError> {
        let downs: Vec<(String, Teardown)> = {
            let mut st = self.lock();
            let expired: Vec<String> = st
                .auths
                .iter()
                .filter(|(_, a)| a.expires <= now)
                .map(|(d, _)| d.clone())
                .collect();
            expired
                .into_iter()
                .map(|d| {
                    let t = Self::take_device(&mut st, &d);
                    (d, t)
                })
                .collect()
        };
        for (_, t) in &downs {
            self.close_links(&t.links).await?;
        }
        Ok(downs)
    }

    /// The relay target of a device on this operator with PC5 address `addr`, if it is
    /// authorized and has one.
    pub fn relay_target(&self, addr: Ipv4Addr) -> Option<SocketAddr> {
        let now = Instant::now();
        self.lock()
            .auths
            .values()
            .find(|a| a.pc5 == addr && a.expires > now)
            .and_then(|a| a.relay_to)
    }

    /// Whether `src` (a device of ours) holds an open link to `dst`, and the peer's relay if
    /// `dst` is on another operator.
    pub fn relay_route(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Option<Option<SocketAddr>> {
        let st = self.lock();
        let l = st
            .links
            .values()
            .find(|l| l.address == src && l.peer_address == dst)?;
        if l.peer_plmn == self.cfg.plmn {
            return Some(None);
        }
        let peer = self.cfg.peers.iter().find(|p| p.plmn == l.peer_plmn)?;
        Some(Some(peer.relay))
    }

    /// The current authorization of a device.
    pub fn authorization(&self, device: &str) -> Option<Authorization> {
        self.lock().auths.get(device).cloned()
    }
}
