//! The cluster's certificate authority and the rustls configurations built on it.
//!
//! Owns: making the CA (ECDSA P-256, on first start of the first server), issuing
//! server certificates (one per `vinfra server` process, for the names it is reached
//! by) and client certificates (one per joined agent, named after its host), and the
//! rustls server/client configurations that use them. The CA's PEM is what a joining
//! agent pins: [`fingerprint`] is the SHA-256 of its DER, carried in join tokens.
//!
//! Must not depend on: the store, HTTP, the agent. Where the CA is kept (the state
//! store, so every server of a cluster shares it) is the caller's business.

#![warn(missing_docs)]

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// The CA's subject; with its key it identifies the issuer, so a CA loaded from the
/// store signs certificates that chain to the CA certificate made on first start.
const CA_NAME: &str = "vinfra cluster CA";

/// Why TLS material could not be made or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Making or signing a certificate failed.
    #[error("cannot make the {what}")]
    Generate {
        /// Which certificate.
        what: &'static str,
        /// The cause.
        #[source]
        err: rcgen::Error,
    },
    /// PEM text that is not what it should be.
    #[error("{what} is not valid PEM")]
    Pem {
        /// Which material.
        what: &'static str,
    },
    /// rustls refused the material.
    #[error("cannot build the TLS {what} configuration")]
    Config {
        /// `server` or `client`.
        what: &'static str,
        /// The cause.
        #[source]
        err: rustls::Error,
    },
    /// The client-certificate verifier could not be built.
    #[error("cannot build the client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8). Secret.
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem.len())
            .finish_non_exhaustive()
    }
}

/// The cluster CA, able to issue certificates.
pub struct Ca {
    material: Issued,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn gen(what: &'static str) -> impl FnOnce(rcgen::Error) -> TlsError {
    move |err| TlsError::Generate { what, err }
}

fn config(what: &'static str) -> impl FnOnce(rustls::Error) -> TlsError {
    move |err| TlsError::Config { what, err }
}

/// The current year (UTC), for validity periods; certificates start a day early so
/// that a host whose clock is slightly behind accepts them.
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Within a day of New Year this may be off by one, which the margins absorb.
    i32::try_from(1970 + secs / 31_556_952).unwrap_or(2026)
}

fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(gen("CA certificate"))?;
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let y = this_year();
    p.not_before = rcgen::date_time_ymd(y - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(y + 10, 1, 1);
    Ok(p)
}

impl Ca {
    /// A new CA with a fresh key.
    pub fn generate() -> Result<Ca, TlsError> {
        let key = KeyPair::generate().map_err(gen("CA key"))?;
        let cert = ca_params()?
            .self_signed(&key)
            .map_err(gen("CA certificate"))?;
        Ok(Ca {
            material: Issued {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            },
            cert,
            key,
        })
    }

    /// The CA kept from an earlier start (its PEM certificate and key).
    pub fn load(material: Issued) -> Result<Ca, TlsError> {
        let key = KeyPair::from_pem(&material.key_pem)
            .map_err(|_| TlsError::Pem { what: "the CA key" })?;
        // Same subject and key as the stored certificate: what a verifier matches.
        let cert = ca_params()?
            .self_signed(&key)
            .map_err(gen("CA certificate"))?;
        Ok(Ca {
            material,
            cert,
            key,
        })
    }

    /// The CA certificate and key, to keep.
    pub fn material(&self) -> &Issued {
        &self.material
    }

    /// The CA certificate, PEM: what clients trust.
    pub fn cert_pem(&self) -> &str {
        &self.material.cert_pem
    }

    fn issue(&self, what: &'static str, params: CertificateParams) -> Result<Issued, TlsError> {
        let key = KeyPair::generate().map_err(gen(what))?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(gen(what))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for the names and addresses the server is reached by.
    pub fn issue_server(&self, names: &[String]) -> Result<Issued, TlsError> {
        let mut p = leaf_params(names.first().map_or("vinfra server", |n| n))?;
        for n in names {
            p.subject_alt_names
                .push(match n.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(
                        n.clone()
                            .try_into()
                            .map_err(gen("server certificate name"))?,
                    ),
                });
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue("server certificate", p)
    }

    /// A client certificate naming `name` (its common name).
    pub fn issue_client(&self, name: &str) -> Result<Issued, TlsError> {
        let mut p = leaf_params(name)?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue("client certificate", p)
    }

    /// A joined agent's identity: the host name as common name and DNS name, for
    /// client use (towards the server and peer agents) and server use (its NBD peer
    /// exports and incoming migrations, which peers verify by host name).
    pub fn issue_agent(&self, host: &str) -> Result<Issued, TlsError> {
        let mut p = leaf_params(host)?;
        p.subject_alt_names.push(SanType::DnsName(
            host.to_owned()
                .try_into()
                .map_err(gen("agent certificate name"))?,
        ));
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        self.issue("agent certificate", p)
    }
}

fn leaf_params(cn: &str) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(gen("certificate"))?;
    p.distinguished_name.push(DnType::CommonName, cn);
    // Key encipherment means nothing for an ECDSA key, but QEMU's TLS (GnuTLS)
    // refuses a certificate whose critical key usage lacks it.
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let y = this_year();
    p.not_before = rcgen::date_time_ymd(y - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(y + 2, 1, 1);
    Ok(p)
}

/// The SHA-256 (hex) of a PEM certificate's DER: the pin a join token carries.
pub fn fingerprint(cert_pem: &str) -> Result<String, TlsError> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| TlsError::Pem {
        what: "the certificate",
    })?;
    Ok(Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn certs(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let v: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Pem { what })?;
    if v.is_empty() {
        return Err(TlsError::Pem { what });
    }
    Ok(v)
}

fn key(what: &'static str, pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsError::Pem { what })
}

fn roots(ca_pem: &str) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs("the CA certificate", ca_pem)? {
        roots.add(c).map_err(config("trust"))?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side: `server` as this server's certificate; clients may present a
/// certificate, which must then chain to the CA (an agent's; other callers present
/// none). Which requests need one is the API's rule, not TLS's.
pub fn server_config(ca_pem: &str, server: &Issued) -> Result<rustls::ServerConfig, TlsError> {
    server_config_with(ca_pem, server, false)
}

/// The server side of a peer-to-peer link (NBD peer exports): every client must
/// present a certificate from the cluster CA.
pub fn peer_server_config(ca_pem: &str, server: &Issued) -> Result<rustls::ServerConfig, TlsError> {
    server_config_with(ca_pem, server, true)
}

fn server_config_with(
    ca_pem: &str,
    server: &Issued,
    require_client: bool,
) -> Result<rustls::ServerConfig, TlsError> {
    let builder =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider());
    let verifier = if require_client {
        builder.build()?
    } else {
        builder.allow_unauthenticated().build()?
    };
    let mut chain = certs("the server certificate", &server.cert_pem)?;
    chain.extend(certs("the CA certificate", ca_pem)?);
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config("server"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key("the server key", &server.key_pem)?)
        .map_err(config("server"))?;
    Ok(cfg)
}

/// The client side: trusts only the cluster CA; presents `identity` when given.
pub fn client_config(
    ca_pem: &str,
    identity: Option<&Issued>,
) -> Result<rustls::ClientConfig, TlsError> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config("client"))?
        .with_root_certificates(roots(ca_pem)?);
    let cfg = match identity {
        Some(id) => b
            .with_client_auth_cert(
                certs("the client certificate", &id.cert_pem)?,
                key("the client key", &id.key_pem)?,
            )
            .map_err(config("client"))?,
        None => b.with_no_client_auth(),
    };
    Ok(cfg)
}

/// The common name of a DER certificate's subject, if it has one: the host an agent's
/// client certificate names. Minimal DER walk over what [`Ca::issue_client`] writes.
pub fn common_name(der: &[u8]) -> Option<String> {
    // OID 2.5.4.3 (commonName), then a string type tag and a short length.
    const CN_OID: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
    // The subject comes after the issuer; take the last CN in the certificate.
    let mut found = None;
    let mut i = 0;
    while i + CN_OID.len() + 2 <= der.len() {
        if der[i..i + CN_OID.len()] == CN_OID {
            let tag = der[i + CN_OID.len()];
            let len = usize::from(der[i + CN_OID.len() + 1]);
            let start = i + CN_OID.len() + 2;
            if matches!(tag, 0x0c | 0x13 | 0x16) && len < 0x80 && start + len <= der.len() {
                found = std::str::from_utf8(&der[start..start + len])
                    .ok()
                    .map(str::to_owned);
            }
        }
        i += 1;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reloaded_ca_issues_certificates_that_chain_to_the_first() {
        let ca = Ca::generate().unwrap();
        let again = Ca::load(ca.material().clone()).unwrap();
        let client = again.issue_client("host-a").unwrap();
        let agent = again.issue_agent("host-b").unwrap();
        peer_server_config(ca.cert_pem(), &agent).unwrap();
        let server = again
            .issue_server(&["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        // Both configurations accept the material, trusting the first CA's PEM.
        server_config(ca.cert_pem(), &server).unwrap();
        client_config(ca.cert_pem(), Some(&client)).unwrap();
        let der = CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap();
        assert_eq!(common_name(der.as_ref()).as_deref(), Some("host-a"));
        assert_eq!(fingerprint(ca.cert_pem()).unwrap().len(), 64);
        assert_ne!(
            fingerprint(ca.cert_pem()).unwrap(),
            fingerprint(Ca::generate().unwrap().cert_pem()).unwrap()
        );
        assert!(matches!(fingerprint("junk"), Err(TlsError::Pem { .. })));
        assert!(Ca::load(Issued {
            cert_pem: String::new(),
            key_pem: "junk".into()
        })
        .is_err());
    }
}
