//! Tokens: minting, hashing, and the first admin token.
//!
//! The store keeps only `sha256(token)` (hex) as the key of a
//! [`TokenRecord`]; a stolen store dump does not grant access.

use std::io::Write;
use std::path::Path;

use model::{Role, TenantId, TokenRecord};
use sha2::{Digest, Sha256};
use store::Store;

use crate::store_io::{get_json, keys, list_json, now_ms, to_bytes};
use crate::ApiError;

/// Name of the admin token file inside the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Hex SHA-256 of a token: its store key.
pub fn hash_token(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A fresh random token: `vinfra_` and 64 hex digits (256 bits).
pub(crate) fn new_token() -> Result<String, ApiError> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| {
        ApiError::internal("generating a token", std::io::Error::other(e.to_string()))
    })?;
    let mut out = String::from("vinfra_");
    for b in raw {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    Ok(out)
}

/// Mints a token with `role` (and `tenant` for members) and stores its hash.
pub(crate) async fn mint(
    store: &dyn Store,
    role: Role,
    tenant: Option<TenantId>,
) -> Result<String, ApiError> {
    let token = new_token()?;
    store_token(store, &token, role, tenant).await?;
    Ok(token)
}

async fn store_token(
    store: &dyn Store,
    token: &str,
    role: Role,
    tenant: Option<TenantId>,
) -> Result<(), ApiError> {
    let rec = TokenRecord {
        role,
        tenant,
        created_at: now_ms(),
    };
    store
        .put(&keys::token(&hash_token(token)), to_bytes(&rec)?)
        .await?;
    Ok(())
}

/// Makes sure an admin token exists. On first start it mints one, writes it
/// to `<data_dir>/admin-token` (mode 0600) and returns it, so the caller can
/// print it once. Later starts return `None`: the file is the authority, and
/// if the store lost its hash (a fresh store, same data dir) it is re-added.
///
/// If the store has an admin token but the file is gone, nothing is minted
/// (the token is unrecoverable from its hash; mint another with an admin
/// token, or remove the store) and `None` is returned with a warning.
pub async fn bootstrap_admin(
    store: &dyn Store,
    data_dir: &Path,
) -> Result<Option<String>, ApiError> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.trim();
            if token.is_empty() {
                return Err(ApiError::DataDir {
                    path,
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, "empty file"),
                });
            }
            let known = get_json::<TokenRecord>(store, &keys::token(&hash_token(token))).await?;
            if known.is_none() {
                tracing::info!(path = %path.display(), "re-adding the admin token from its file");
                store_token(store, token, Role::Admin, None).await?;
            }
            return Ok(None);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ApiError::DataDir { path, source }),
    }
    let tokens = list_json::<TokenRecord>(store, keys::TOKENS).await?;
    if tokens.iter().any(|(t, _)| t.role == Role::Admin) {
        tracing::warn!(
            path = %path.display(),
            "the store has an admin token but its file is missing; not minting another"
        );
        return Ok(None);
    }
    let token = new_token()?;
    write_private(data_dir, &path, &token)?;
    store_token(store, &token, Role::Admin, None).await?;
    tracing::info!(path = %path.display(), "admin token created");
    Ok(Some(token))
}

/// Writes `token` to `path` readable by the owner only, atomically: a crash
/// leaves either no file or the whole token.
fn write_private(dir: &Path, path: &Path, token: &str) -> Result<(), ApiError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ApiError::DataDir { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!("{ADMIN_TOKEN_FILE}.tmp"));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io(&tmp))?;
    // The mode above applies only when the file is created; a leftover
    // tmp file from a crash may have other bits.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io(&tmp))?;
    }
    f.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_hex_sha256() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let t = new_token().unwrap();
        assert_eq!(t.len(), 7 + 64);
        assert_ne!(t, new_token().unwrap());
    }
}
