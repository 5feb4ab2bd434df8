//! The cluster CA in the store, and the TLS configuration of a server.
//!
//! The CA is made by the first server that needs it and kept in the store (created
//! only where none is), so every server of a cluster on one etcd issues and trusts
//! the same certificates. Like Kubernetes' secrets in etcd, its key is as safe as
//! the store; the store's own access is the operator's to guard.

use serde::{Deserialize, Serialize};
use store::{Store, StoreError};

use crate::ApiError;
use control::records::{get_json, to_bytes};

/// Where the CA is kept.
const CA_KEY: &str = "/vinfra/ca";

#[derive(Serialize, Deserialize)]
struct CaRecord {
    cert_pem: String,
    key_pem: String,
}

/// How a server serves TLS.
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// Names and addresses clients reach this server by, besides its listen address,
    /// `127.0.0.1` and `localhost` (which are always in its certificate).
    pub names: Vec<String>,
}

/// The cluster CA, made on first use.
pub(crate) async fn cluster_ca(store: &dyn Store) -> Result<tls::Ca, ApiError> {
    let tls_err = |e| ApiError::internal("the cluster CA", e);
    loop {
        if let Some((rec, _)) = get_json::<CaRecord>(store, CA_KEY).await? {
            return tls::Ca::load(tls::Issued {
                cert_pem: rec.cert_pem,
                key_pem: rec.key_pem,
            })
            .map_err(tls_err);
        }
        let ca = tokio::task::spawn_blocking(tls::Ca::generate)
            .await
            .map_err(|e| ApiError::internal("generating the cluster CA", e))?
            .map_err(tls_err)?;
        let rec = CaRecord {
            cert_pem: ca.material().cert_pem.clone(),
            key_pem: ca.material().key_pem.clone(),
        };
        match store.cas(CA_KEY, None, to_bytes(&rec)?).await {
            Ok(_) => {
                tracing::info!("cluster CA created");
                return Ok(ca);
            }
            // Another server made it first: use that one.
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The rustls configuration of a server listening on `listen`, with a certificate
/// from the cluster CA.
pub(crate) fn server_tls(
    ca: &tls::Ca,
    cfg: &TlsConfig,
    listen: std::net::SocketAddr,
) -> Result<rustls::ServerConfig, ApiError> {
    let mut names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    if !listen.ip().is_unspecified() {
        names.insert(0, listen.ip().to_string());
    }
    for n in &cfg.names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let cert = ca
        .issue_server(&names)
        .map_err(|e| ApiError::internal("issuing the server certificate", e))?;
    tls::server_config(ca.cert_pem(), &cert).map_err(|e| ApiError::internal("server TLS", e))
}
