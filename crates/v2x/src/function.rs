//! The V2X application function of one operator: subscription data (from the V2X API),
//! authorizations (configuration parameters handed out, with their validity timer) and the
//! links it opened on the PC5 gate. No HTTP here; `http.rs` calls in.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::gate::{GateError, Pc5Gate};
use crate::journal::{Journal, JournalError, Pending};
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
    /// The device roams and its home operator's MEC could not be asked.
    #[error("cannot fetch device {device}'s subscription from its home operator {home}: {reason}")]
    HomeUnreachable {
        /// Device.
        device: String,
        /// Its home PLMN.
        home: Plmn,
        /// What went wrong.
        reason: String,
    },
    /// The change could not be made durable (nothing was answered as done).
    #[error("{0}")]
    State(#[from] JournalError),
}

#[derive(Debug)]
struct Sub {
    data: V2xSubscription,
    /// SHA-256 of the device token (hex): the token is shown once, at provisioning.
    token_sha256: String,
    /// A roaming copy fetched from this home operator (kept only while the device's
    /// authorization here lasts).
    roaming_from: Option<Plmn>,
}

fn sha256_hex(b: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
}

/// One change of the function's state, as the journal records it. Replaying the records in
/// order rebuilds the state; the live paths make each change through `apply` too, so the
/// two cannot disagree.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// A subscription provisioned (or replaced: the device's authorization and links go).
    Provision {
        /// Device.
        device: String,
        /// Its terms.
        subscription: V2xSubscription,
        /// SHA-256 of its device token, hex.
        token_sha256: String,
        /// Set for a roaming copy: the home operator it was fetched from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        roaming_from: Option<Plmn>,
    },
    /// A subscription revoked, with the device's authorization and links.
    Revoke {
        /// Device.
        device: String,
    },
    /// The device's authorization and links go; its subscription stays (it left this
    /// operator, or its parameters expired).
    Leave {
        /// Device.
        device: String,
    },
    /// Configuration parameters handed out.
    Authorize {
        /// Device.
        device: String,
        /// The parameters (their `expiresAtMs` is the validity).
        params: ConfigurationParameters,
        /// The device's PC5 address.
        pc5: Ipv4Addr,
        /// Where relayed messages reach it.
        relay_to: Option<SocketAddr>,
    },
    /// A link recorded before its gate rule goes in.
    Link {
        /// The link.
        link: Link,
    },
    /// Links gone.
    Unlink {
        /// Their ids.
        ids: Vec<String>,
    },
    /// A peer released its device at `address`: our links towards it go.
    PeerReleased {
        /// The peer device's PC5 address.
        address: Ipv4Addr,
    },
    /// Gate pairs still to close (written by a rewrite; removals add them implicitly).
    Closing {
        /// (device, peer) pairs.
        pairs: Vec<(Ipv4Addr, Ipv4Addr)>,
    },
    /// Gate pairs closed.
    Closed {
        /// (device, peer) pairs.
        pairs: Vec<(Ipv4Addr, Ipv4Addr)>,
    },
}

/// Applies one change to the state; what it took down.
fn apply(st: &mut State, c: &Change) -> Teardown {
    let down = match c {
        Change::Provision {
            device,
            subscription,
            token_sha256,
            roaming_from,
        } => {
            st.subs.insert(
                device.clone(),
                Sub {
                    data: subscription.clone(),
                    token_sha256: token_sha256.clone(),
                    roaming_from: roaming_from.clone(),
                },
            );
            take_device(st, device)
        }
        Change::Revoke { device } => {
            st.subs.remove(device);
            take_device(st, device)
        }
        Change::Leave { device } => {
            // A roaming copy lasts as long as the authorization it was fetched for: the
            // next authorization fetches it again, so home's current terms apply.
            if st
                .subs
                .get(device)
                .is_some_and(|s| s.roaming_from.is_some())
            {
                st.subs.remove(device);
            }
            take_device(st, device)
        }
        Change::Authorize {
            device,
            params,
            pc5,
            relay_to,
        } => {
            let left = Duration::from_millis(params.expires_at_ms.saturating_sub(now_ms()));
            st.auths.insert(
                device.clone(),
                Authorization {
                    params: params.clone(),
                    expires: Instant::now() + left,
                    pc5: *pc5,
                    relay_to: *relay_to,
                },
            );
            Teardown::default()
        }
        Change::Link { link } => {
            st.links.insert(link.id.clone(), link.clone());
            Teardown::default()
        }
        Change::Unlink { ids } => Teardown {
            links: ids.iter().filter_map(|i| st.links.remove(i)).collect(),
            address: None,
        },
        Change::PeerReleased { address } => {
            let ids: Vec<String> = st
                .links
                .values()
                .filter(|l| l.peer_address == *address)
                .map(|l| l.id.clone())
                .collect();
            Teardown {
                links: ids.iter().filter_map(|i| st.links.remove(i)).collect(),
                address: None,
            }
        }
        Change::Closing { pairs } => {
            st.closing.extend(pairs.iter().copied());
            Teardown::default()
        }
        Change::Closed { pairs } => {
            for p in pairs {
                st.closing.remove(p);
            }
            Teardown::default()
        }
    };
    // A removed link's rule may still be in the gate until `Closed` says otherwise.
    st.closing
        .extend(down.links.iter().map(|l| (l.address, l.peer_address)));
    down
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
    /// Gate pairs of removed links whose rule may still be in the gate.
    closing: BTreeSet<(Ipv4Addr, Ipv4Addr)>,
}

impl State {
    /// The records that rebuild exactly this state.
    fn snapshot(&self) -> Vec<Change> {
        let mut v: Vec<Change> = Vec::new();
        let mut subs: Vec<_> = self.subs.iter().collect();
        subs.sort_by_key(|(d, _)| *d);
        for (device, s) in subs {
            v.push(Change::Provision {
                device: device.clone(),
                subscription: s.data.clone(),
                token_sha256: s.token_sha256.clone(),
                roaming_from: s.roaming_from.clone(),
            });
        }
        for (device, a) in &self.auths {
            v.push(Change::Authorize {
                device: device.clone(),
                params: a.params.clone(),
                pc5: a.pc5,
                relay_to: a.relay_to,
            });
        }
        for l in self.links.values() {
            v.push(Change::Link { link: l.clone() });
        }
        if !self.closing.is_empty() {
            v.push(Change::Closing {
                pairs: self.closing.iter().copied().collect(),
            });
        }
        v
    }
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
    journal: Option<Journal<Change>>,
}

/// File of the function's journal in a MEC state directory.
pub const JOURNAL_FILE: &str = "v2x-function.jsonl";

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
            journal: None,
        }
    }

    /// A function whose state lives in `dir` (created if missing): what an earlier run
    /// acknowledged is replayed, and every change from now on is durable before it is
    /// answered. Call [`V2xFunction::recover`] once the gate is up.
    pub fn open(
        cfg: OperatorConfig,
        gate: Option<Pc5Gate>,
        dir: &Path,
    ) -> Result<V2xFunction, JournalError> {
        std::fs::create_dir_all(dir).map_err(|source| JournalError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(JOURNAL_FILE);
        let mut st = State::default();
        for c in crate::journal::read::<Change>(&path)? {
            apply(&mut st, &c);
        }
        let journal = Journal::open(&path, &st.snapshot())?;
        Ok(V2xFunction {
            cfg,
            gate,
            state: Mutex::new(st),
            journal: Some(journal),
        })
    }

    /// After a restart: closes the gate pairs of links removed before the crash whose
    /// close may not have happened, then (re)opens the rule of every recorded link. Both
    /// are idempotent, so a crash during recovery is recovered by the next start.
    pub async fn recover(&self) -> Result<(usize, usize), V2xError> {
        let (closing, open): (Vec<_>, Vec<_>) = {
            let st = self.lock();
            let live: BTreeSet<(Ipv4Addr, Ipv4Addr)> = st
                .links
                .values()
                .map(|l| (l.address, l.peer_address))
                .collect();
            (
                st.closing.difference(&live).copied().collect(),
                live.into_iter().collect(),
            )
        };
        if let Some(g) = &self.gate {
            for (a, b) in &closing {
                g.close(*a, *b).await?;
            }
            for (a, b) in &open {
                g.open(*a, *b).await?;
            }
        }
        self.closed(&closing);
        Ok((closing.len(), open.len()))
    }

    /// Makes `c` under the held lock `st`: applied, and queued to the journal in the same
    /// order as it was applied.
    fn change(&self, st: &mut State, c: Change) -> (Teardown, Pending) {
        let down = apply(st, &c);
        let pending = match &self.journal {
            Some(j) => {
                let p = j.append(c);
                if j.wants_rewrite(st.subs.len() + st.auths.len() + st.links.len()) {
                    j.rewrite(st.snapshot());
                }
                p
            }
            None => Pending::none(),
        };
        (down, pending)
    }

    /// Records that gate pairs were closed (durability not awaited: a lost `Closed` only
    /// makes the next start close them again).
    fn closed(&self, pairs: &[(Ipv4Addr, Ipv4Addr)]) {
        if pairs.is_empty() {
            return;
        }
        let mut st = self.lock();
        drop(self.change(
            &mut st,
            Change::Closed {
                pairs: pairs.to_vec(),
            },
        ));
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
        let (down, durable) = self.change(
            &mut self.lock(),
            Change::Provision {
                device: device.to_owned(),
                subscription: data.clone(),
                token_sha256: sha256_hex(token.as_bytes()),
                roaming_from: None,
            },
        );
        durable.durable().await?;
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

    /// Home side of roaming: the subscription of a device of ours, for a visited operator
    /// that shows the device's own token (so a peer cannot read subscriptions at will).
    /// A roaming copy is never handed on.
    pub fn roaming_profile(&self, device: &str, token: &str) -> Result<V2xSubscription, V2xError> {
        let st = self.lock();
        self.check_token(&st, device, token)?;
        match st.subs.get(device) {
            Some(s) if s.roaming_from.is_none() => Ok(s.data.clone()),
            _ => Err(V2xError::NotSubscribed(device.to_owned())),
        }
    }

    /// Visited side of roaming: keeps the subscription `home` answered with, under the
    /// device's home token; durable before the authorization that needs it is answered.
    pub async fn adopt_roaming(
        &self,
        device: &str,
        token: &str,
        home: Plmn,
        data: V2xSubscription,
    ) -> Result<(), V2xError> {
        validate_device_id(device).map_err(V2xError::Invalid)?;
        data.validate().map_err(V2xError::Invalid)?;
        let (down, durable) = {
            let mut st = self.lock();
            if st
                .subs
                .get(device)
                .is_some_and(|s| s.roaming_from.is_none())
            {
                // Provisioned here by the operator: that subscription rules.
                return Ok(());
            }
            self.change(
                &mut st,
                Change::Provision {
                    device: device.to_owned(),
                    subscription: data,
                    token_sha256: sha256_hex(token.as_bytes()),
                    roaming_from: Some(home),
                },
            )
        };
        durable.durable().await?;
        self.close_links(&down.links).await
    }

    /// Home revoked its device: the roaming copy from `home` goes with its links
    /// (`NotSubscribed` when there was none).
    pub async fn drop_roaming(&self, device: &str, home: &Plmn) -> Result<Teardown, V2xError> {
        self.revoke_where(device, |s| s.roaming_from.as_ref() == Some(home))
            .await
    }

    /// Whether `device` has a subscription here provisioned by this operator (not a copy).
    pub fn is_home_subscriber(&self, device: &str) -> bool {
        self.lock()
            .subs
            .get(device)
            .is_some_and(|s| s.roaming_from.is_none())
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
        self.revoke_where(device, |_| true).await
    }

    /// Revokes `device`'s subscription if `which` accepts it (`NotSubscribed` otherwise).
    async fn revoke_where(
        &self,
        device: &str,
        which: impl Fn(&Sub) -> bool,
    ) -> Result<Teardown, V2xError> {
        let (down, durable) = {
            let mut st = self.lock();
            if !st.subs.get(device).is_some_and(which) {
                return Err(V2xError::NotSubscribed(device.to_owned()));
            }
            self.change(
                &mut st,
                Change::Revoke {
                    device: device.to_owned(),
                },
            )
        };
        durable.durable().await?;
        self.close_links(&down.links).await?;
        Ok(down)
    }

    /// The device leaves this operator (it moved to another one): its authorization and
    /// links go, its subscription stays.
    pub async fn release(&self, token: &str, device: &str) -> Result<Teardown, V2xError> {
        let (down, durable) = {
            let mut st = self.lock();
            self.check_token(&st, device, token)?;
            self.change(
                &mut st,
                Change::Leave {
                    device: device.to_owned(),
                },
            )
        };
        durable.durable().await?;
        self.close_links(&down.links).await?;
        Ok(down)
    }

    /// Closes the links' gate rules; runs only after their removal is durable, so that a
    /// crash can never leave a rule the journal would reopen after it was closed.
    async fn close_links(&self, links: &[Link]) -> Result<(), V2xError> {
        let pairs: Vec<(Ipv4Addr, Ipv4Addr)> =
            links.iter().map(|l| (l.address, l.peer_address)).collect();
        if let Some(g) = &self.gate {
            for (a, b) in &pairs {
                g.close(*a, *b).await?;
            }
        }
        self.closed(&pairs);
        Ok(())
    }

    fn check_token(&self, st: &State, device: &str, token: &str) -> Result<(), V2xError> {
        let sub = st
            .subs
            .get(device)
            .ok_or_else(|| V2xError::NotSubscribed(device.to_owned()))?;
        if !crate::pc5::same(
            sub.token_sha256.as_bytes(),
            sha256_hex(token.as_bytes()).as_bytes(),
        ) {
            return Err(V2xError::BadCredential(device.to_owned()));
        }
        Ok(())
    }

    /// The V2X application function: answers an authorization request with configuration
    /// parameters built from the device's subscription. `from` is the device's address on
    /// the access network (where relayed messages go back).
    pub async fn authorize(
        &self,
        token: &str,
        req: &AuthorizationRequest,
        from: Option<std::net::IpAddr>,
    ) -> Result<ConfigurationParameters, V2xError> {
        validate_device_id(&req.device_id).map_err(V2xError::Invalid)?;
        // Answered without waiting for the sync: an authorization is soft state with a
        // validity timer. A crash before the sync makes the device's next request fail with
        // "authorize first", and it asks again, as at expiry. What must not be lost waits:
        // a provisioned token, and a link before its rule goes in (which, being later in
        // the same journal, also makes this record durable).
        let (params, durable) = self.authorize_locked(token, req, from)?;
        drop(durable);
        Ok(params)
    }

    fn authorize_locked(
        &self,
        token: &str,
        req: &AuthorizationRequest,
        from: Option<std::net::IpAddr>,
    ) -> Result<(ConfigurationParameters, Pending), V2xError> {
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
        let (_, durable) = self.change(
            &mut st,
            Change::Authorize {
                device: req.device_id.clone(),
                params: params.clone(),
                pc5: req.pc5_address,
                relay_to,
            },
        );
        Ok((params, durable))
    }

    /// Opens the PC5 path `device → peer` for an authorized device whose parameters list the
    /// peer's PLMN for the RAT. Idempotent per (device, peer, service).
    pub async fn open_link(&self, token: &str, req: &LinkRequest) -> Result<Link, V2xError> {
        req.peer_plmn
            .validate()
            .map_err(|e| V2xError::Invalid(e.to_string()))?;
        let link = {
            let mut st = self.lock();
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
            let link = Link {
                id: random_hex(8),
                device_id: req.device_id.clone(),
                address: auth.pc5,
                peer_address: req.peer_address,
                peer_plmn: req.peer_plmn.clone(),
                v2x_service_id: req.v2x_service_id,
            };
            let (_, durable) = self.change(&mut st, Change::Link { link: link.clone() });
            (link, durable)
        };
        // The link is durable before its rule goes in: after a crash, a recorded link is
        // (re)opened and an unrecorded one was never open.
        link.1.durable().await?;
        let link = link.0;
        if let Some(g) = &self.gate {
            if let Err(e) = g.open(link.address, link.peer_address).await {
                let (down, durable) = self.change(
                    &mut self.lock(),
                    Change::Unlink {
                        ids: vec![link.id.clone()],
                    },
                );
                durable.durable().await?;
                // The add may have gone in before nft failed: close it like any removal.
                self.close_links(&down.links).await?;
                return Err(e.into());
            }
        }
        Ok(link)
    }

    /// Closes one of the device's links.
    pub async fn close_link(&self, token: &str, device: &str, id: &str) -> Result<Link, V2xError> {
        let (mut down, durable) = {
            let mut st = self.lock();
            self.check_token(&st, device, token)?;
            match st.links.get(id) {
                Some(l) if l.device_id == device => {}
                _ => return Err(V2xError::NoLink(id.to_owned())),
            }
            self.change(
                &mut st,
                Change::Unlink {
                    ids: vec![id.to_owned()],
                },
            )
        };
        durable.durable().await?;
        self.close_links(&down.links).await?;
        down.links
            .pop()
            .ok_or_else(|| V2xError::NoLink(id.to_owned()))
    }

    /// A peer operator revoked the device at `address`: close every link of ours towards it.
    pub async fn peer_released(&self, address: Ipv4Addr) -> Result<Vec<Link>, V2xError> {
        let (down, durable) = self.change(&mut self.lock(), Change::PeerReleased { address });
        durable.durable().await?;
        self.close_links(&down.links).await?;
        Ok(down.links)
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
        let (downs, durable): (Vec<(String, Teardown)>, Vec<Pending>) = {
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
                    let (t, p) = self.change(&mut st, Change::Leave { device: d.clone() });
                    ((d, t), p)
                })
                .unzip()
        };
        for p in durable {
            p.durable().await?;
        }
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

    /// Every subscribed device with its authorization, read under one lock (the operator's
    /// console).
    pub fn device_status(&self) -> Vec<crate::types::DeviceStatus> {
        let now = Instant::now();
        let st = self.lock();
        let mut v: Vec<crate::types::DeviceStatus> = st
            .subs
            .iter()
            .map(|(d, s)| {
                let auth = st.auths.get(d);
                crate::types::DeviceStatus {
                    device_id: d.clone(),
                    subscription: s.data.clone(),
                    roaming_from: s.roaming_from.clone(),
                    pc5_address: auth.map(|a| a.pc5),
                    expires_in_s: auth.map(|a| a.expires.saturating_duration_since(now).as_secs()),
                }
            })
            .collect();
        v.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        v
    }
}
