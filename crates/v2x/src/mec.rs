//! One operator's MEC service: the V2X application function and the VIS together, and the
//! lifecycle work that crosses them (a revocation closes links, tells the peer operators
//! over the inter-operator link, and notifies VIS subscribers).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use ring::hmac;

use crate::function::{hex, Teardown, V2xError, V2xFunction};
use crate::httpc::{post_json, post_json_answer};
use crate::types::{
    dst_layer2_id, AuthorizationRequest, ConfigurationParameters, Plmn, Provisioned,
    V2xSubscription,
};
use crate::vis::{Delivery, Vis};

/// The MEC service state shared by its HTTP handlers, relay and sweeper.
#[derive(Debug)]
pub struct Mec {
    /// The V2X application function.
    pub function: V2xFunction,
    /// The VIS.
    pub vis: Arc<Vis>,
    /// Operator / MEC-application token.
    pub token: String,
    /// Namespace outgoing connections (peers, callbacks) are made from.
    netns: Option<String>,
}

/// The token MECs of one roaming agreement present to each other.
pub fn peer_token(secret: &[u8]) -> String {
    let k = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hex(hmac::sign(&k, b"v2x peer token").as_ref())
}

impl Mec {
    /// A MEC around `function` and `vis`, its operator API guarded by `token`.
    pub fn new(function: V2xFunction, vis: Arc<Vis>, token: String, netns: Option<String>) -> Mec {
        Mec {
            function,
            vis,
            token,
            netns,
        }
    }

    /// The token peers must present.
    pub fn peer_token(&self) -> String {
        peer_token(&self.function.config().roaming_secret)
    }

    /// Sends notifications in the background (a slow subscriber delays nobody).
    pub fn deliver(&self, ds: Vec<Delivery>) {
        for d in ds {
            match d {
                Delivery::Ws(tx, text) => {
                    let _ = tx.send(text);
                }
                Delivery::Callback(url, body) => {
                    let ns = self.netns.clone();
                    tokio::spawn(async move {
                        match post_json(ns.as_deref(), &url, "", &body).await {
                            Ok(s) if s < 300 => {}
                            Ok(s) => {
                                tracing::warn!(url, status = s, "subscriber refused a notification")
                            }
                            Err(e) => tracing::warn!(url, error = %e, "notification not delivered"),
                        }
                    });
                }
            }
        }
    }

    /// After links went down: tell the peers whose devices they reached (they close their
    /// way back), then subscribers, so a notification means the link is down on both sides.
    async fn after_teardown(&self, t: &Teardown) {
        if let Some(addr) = t.address {
            let cfg = self.function.config();
            let token = self.peer_token();
            for p in &cfg.peers {
                if !t.links.iter().any(|l| l.peer_plmn == p.plmn) {
                    continue;
                }
                let url = format!("{}/v2x/v1/peer/releases", p.uri.trim_end_matches('/'));
                let body = serde_json::json!({"address": addr});
                match post_json(self.netns.as_deref(), &url, &token, &body).await {
                    Ok(s) if s < 300 => {}
                    Ok(s) => tracing::warn!(peer = %p.plmn, status = s, "peer refused the release"),
                    Err(e) => {
                        tracing::warn!(peer = %p.plmn, error = %e, "peer did not take the release")
                    }
                }
            }
        }
        let mut dsts: Vec<String> = t
            .links
            .iter()
            .map(|l| dst_layer2_id(l.v2x_service_id))
            .collect();
        dsts.sort();
        dsts.dedup();
        for d in dsts {
            self.deliver(self.vis.pc5_changed(&d));
        }
    }

    /// V2X API: provision (replacing terms takes the device's links down first).
    pub async fn provision(
        &self,
        device: &str,
        sub: V2xSubscription,
    ) -> Result<Provisioned, V2xError> {
        let (p, down) = self.function.provision(device, sub).await?;
        self.after_teardown(&down).await;
        Ok(p)
    }

    /// V2X API: revoke. Returns once the device's PC5 paths are closed here and at the peers,
    /// and, for a device of ours, once every peer has dropped a roaming copy it may hold.
    pub async fn revoke(&self, device: &str) -> Result<Teardown, V2xError> {
        let home = self.function.is_home_subscriber(device);
        let down = self.function.revoke(device).await?;
        self.after_teardown(&down).await;
        if home {
            let cfg = self.function.config();
            let body = serde_json::json!({"deviceId": device, "homePlmn": cfg.plmn.clone()});
            for p in &cfg.peers {
                let url = format!("{}/v2x/v1/peer/revocations", p.uri.trim_end_matches('/'));
                match post_json(self.netns.as_deref(), &url, &self.peer_token(), &body).await {
                    // 404: it held no copy.
                    Ok(s) if s < 300 || s == 404 => {}
                    Ok(s) => {
                        tracing::warn!(peer = %p.plmn, status = s, "peer refused the revocation")
                    }
                    Err(e) => {
                        tracing::warn!(peer = %p.plmn, error = %e, "peer did not take the revocation")
                    }
                }
            }
        }
        Ok(down)
    }

    /// The home operator revoked its device: our roaming copy and its links go.
    pub async fn home_revoked(&self, device: &str, home: &Plmn) -> Result<(), V2xError> {
        let down = self.function.drop_roaming(device, home).await?;
        self.after_teardown(&down).await;
        Ok(())
    }

    /// The V2X application function's authorization, with roaming: a device unknown here
    /// that names a peer as its home gets its subscription fetched from there (its own
    /// token is the proof), kept as a roaming copy, then authorized as any other.
    pub async fn authorize(
        &self,
        token: &str,
        req: &AuthorizationRequest,
        from: Option<std::net::IpAddr>,
    ) -> Result<ConfigurationParameters, V2xError> {
        match self.function.authorize(token, req, from).await {
            Err(V2xError::NotSubscribed(d)) => {
                let cfg = self.function.config();
                let Some(peer) = req
                    .home_plmn
                    .as_ref()
                    .and_then(|h| cfg.peers.iter().find(|p| &p.plmn == h))
                else {
                    return Err(V2xError::NotSubscribed(d));
                };
                let url = format!("{}/v2x/v1/peer/roaming", peer.uri.trim_end_matches('/'));
                let ask = serde_json::json!({"deviceId": d, "deviceToken": token});
                let unreachable = |reason: String| V2xError::HomeUnreachable {
                    device: d.clone(),
                    home: peer.plmn.clone(),
                    reason,
                };
                let (status, body) =
                    post_json_answer(self.netns.as_deref(), &url, &self.peer_token(), &ask)
                        .await
                        .map_err(|e| unreachable(e.to_string()))?;
                match status {
                    200 => {}
                    // Home does not know the device, or the token is not its: nothing to
                    // authorize (the same answer a home device without subscription gets).
                    401 | 404 => return Err(V2xError::NotSubscribed(d)),
                    s => return Err(unreachable(format!("it answered {s}"))),
                }
                let sub: V2xSubscription = serde_json::from_value(body)
                    .map_err(|e| unreachable(format!("its answer is not a subscription: {e}")))?;
                self.function
                    .adopt_roaming(&d, token, peer.plmn.clone(), sub)
                    .await?;
                self.function.authorize(token, req, from).await
            }
            other => other,
        }
    }

    /// A device leaves this operator: its links close here and at the peers.
    pub async fn release(&self, token: &str, device: &str) -> Result<Teardown, V2xError> {
        let down = self.function.release(token, device).await?;
        self.after_teardown(&down).await;
        Ok(down)
    }

    /// A peer revoked one of its devices.
    pub async fn peer_released(&self, address: Ipv4Addr) -> Result<(), V2xError> {
        let links = self.function.peer_released(address).await?;
        self.after_teardown(&Teardown {
            links,
            address: None,
        })
        .await;
        Ok(())
    }

    /// Expired authorizations and subscriptions go; runs every few tens of ms.
    pub async fn sweep(&self) {
        match self.function.expire(Instant::now()).await {
            Ok(downs) => {
                for (device, t) in downs {
                    tracing::info!(
                        device,
                        links = t.links.len(),
                        "configuration parameters expired"
                    );
                    self.after_teardown(&t).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot expire authorizations"),
        }
        let now = crate::function::now_ms() / 1000;
        for id in self.vis.expire(now) {
            tracing::info!(
                subscription = id,
                "VIS subscription reached its expiry deadline"
            );
        }
    }
}
