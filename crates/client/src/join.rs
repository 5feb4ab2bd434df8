//! Talking to a TLS server: trusting the cluster CA, presenting an agent's client
//! certificate, and joining with a join token.

use std::time::Duration;

use model::api::{JoinRequest, JoinResponse};

use crate::{Client, ClientError};

/// How a client reaches a TLS server: the CA to trust and, for an agent, the client
/// certificate to present.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// The cluster CA certificate, PEM.
    pub ca_pem: String,
    /// The agent's certificate and key, if this client is an agent.
    pub identity: Option<tls::Issued>,
}

impl ClientTls {
    /// A `reqwest` client that trusts only the cluster CA (and presents the identity).
    pub fn http(&self, timeout: Duration) -> Result<reqwest::Client, JoinError> {
        let cfg = tls::client_config(&self.ca_pem, self.identity.as_ref())?;
        reqwest::Client::builder()
            .timeout(timeout)
            .use_preconfigured_tls(cfg)
            .build()
            .map_err(JoinError::Http)
    }
}

/// Why a join failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// The join token is not `vjoin.<secret>.<CA fingerprint>`.
    #[error("the join token is malformed (expected vjoin.<secret>.<CA fingerprint>)")]
    Malformed,
    /// The server's CA does not match the token's pin: not our cluster, or someone
    /// in between.
    #[error("the server's CA has fingerprint {got}, the join token expects {expected}")]
    WrongCa {
        /// The token's pin.
        expected: String,
        /// The served CA's fingerprint.
        got: String,
    },
    /// The TLS material is unusable.
    #[error("bad TLS material")]
    Tls(#[from] tls::TlsError),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client")]
    Http(#[source] reqwest::Error),
    /// A call failed.
    #[error("join call failed")]
    Api(#[from] ClientError),
}

impl Client {
    /// A client of a TLS server (see [`ClientTls`]).
    pub fn with_tls(base_url: &str, token: &str, tls: &ClientTls) -> Result<Self, JoinError> {
        let http = tls.http(Duration::from_secs(30))?;
        Ok(Self::with_http(http, base_url, token)?)
    }
}

/// Joins the cluster at `server_url` as `host`: fetches the CA, checks it against the
/// pin in `join_token` before trusting anything it says, then trades the token for
/// a client certificate and an agent token over a connection that trusts that CA.
pub async fn join(
    server_url: &str,
    join_token: &str,
    host: &str,
) -> Result<JoinResponse, JoinError> {
    let mut parts = join_token.trim().split('.');
    let (Some("vjoin"), Some(_), Some(pin), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JoinError::Malformed);
    };
    // Unverified on purpose: what comes back is checked against the pin, so a
    // server in between cannot hand us its own CA.
    let insecure = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .danger_accept_invalid_certs(true)
        .build()
        .map_err(JoinError::Http)?;
    let probe = Client::with_http(insecure, server_url, "")?;
    let ca_pem = probe.ca_pem().await?;
    let got = tls::fingerprint(&ca_pem)?;
    if !got.eq_ignore_ascii_case(pin) {
        return Err(JoinError::WrongCa {
            expected: pin.to_owned(),
            got,
        });
    }
    let trusted = ClientTls {
        ca_pem,
        identity: None,
    };
    let c = Client::with_tls(server_url, "", &trusted)?;
    Ok(c.join_cluster(&JoinRequest {
        token: join_token.trim().to_owned(),
        host: host.to_owned(),
    })
    .await?)
}

impl Client {
    /// `GET /v1/ca.pem`.
    pub async fn ca_pem(&self) -> Result<String, ClientError> {
        let segments = ["v1", "ca.pem"];
        let res = self
            .send(reqwest::Method::GET, &segments, crate::NO_BODY)
            .await?;
        res.text().await.map_err(|source| ClientError::Transport {
            method: reqwest::Method::GET,
            path: segments.join("/"),
            source,
        })
    }

    /// `POST /v1/join`.
    pub async fn join_cluster(&self, req: &JoinRequest) -> Result<JoinResponse, ClientError> {
        self.json(reqwest::Method::POST, &["v1", "join"], Some(req))
            .await
    }

    /// `POST /v1/join-tokens` (admin).
    pub async fn create_join_token(
        &self,
        req: &model::api::CreateJoinToken,
    ) -> Result<model::api::JoinTokenCreated, ClientError> {
        self.json(reqwest::Method::POST, &["v1", "join-tokens"], Some(req))
            .await
    }
}
