//! The writer's Ed25519 key (ring: the workspace already compiles it for rustls, so
//! signing adds no second crypto stack), kept as PKCS#8 in a file only its server reads.

use std::io::Write;
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::hash::key_id;

/// An Ed25519 signing key and its id.
pub struct Signer {
    pair: Ed25519KeyPair,
    id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Why a key could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("cannot access ledger key {path}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The error.
        #[source]
        err: std::io::Error,
    },
    /// The bytes are not an Ed25519 PKCS#8 document.
    #[error("ledger key {path} is not an Ed25519 PKCS#8 key")]
    Invalid {
        /// The key file (empty for keys not read from a file).
        path: PathBuf,
    },
    /// The system random source failed.
    #[error("cannot generate a ledger key")]
    Generate,
}

impl Signer {
    /// A key from its PKCS#8 bytes.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, KeyError> {
        let pair =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).map_err(|_| KeyError::Invalid {
                path: PathBuf::new(),
            })?;
        let id = key_id(pair.public_key().as_ref());
        Ok(Self { pair, id })
    }

    /// A new random key; also returns its PKCS#8 bytes, to be kept.
    pub fn generate() -> Result<(Self, Vec<u8>), KeyError> {
        let doc =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Generate)?;
        let pkcs8 = doc.as_ref().to_vec();
        Ok((Self::from_pkcs8(&pkcs8)?, pkcs8))
    }

    /// The key in `path`, created (mode 0600, written whole then renamed into
    /// place) if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let io = |err| KeyError::Io {
            path: path.to_owned(),
            err,
        };
        match std::fs::read(path) {
            Ok(bytes) => Self::from_pkcs8(&bytes).map_err(|_| KeyError::Invalid {
                path: path.to_owned(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (signer, pkcs8) = Self::generate()?;
                let tmp = path.with_extension("tmp");
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&tmp)
                        .map_err(io)?;
                    f.write_all(&pkcs8).map_err(io)?;
                    f.sync_all().map_err(io)?;
                }
                std::fs::rename(&tmp, path).map_err(io)?;
                Ok(signer)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// The key's id (hex of the first 8 bytes of the public key's SHA-256).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
}
