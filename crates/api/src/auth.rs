//! Tokens: minting, listing, revoking, hashing, and the first admin token.
//!
//! The store keeps only `sha256(token)` (hex) as the key of a
//! [`TokenRecord`]; a stolen store dump does not grant access. An index key
//! from the token's id to that hash, written in the same transaction, lets a
//! revocation by id go straight to the record. Servers keep no token cache:
//! every request reads the record, so a revocation (or an expiry) holds on
//! every server sharing the store from the next request on.

use std::io::Write;
use std::path::Path;

use model::api::{TokenInfo, TOKEN_PREFIX_LEN};
use model::{Role, TenantId, TokenId, TokenRecord, TokenScope};
use sha2::{Digest, Sha256};
use store::{Compare, Revision, Store, StoreError, TxnOp};

use crate::{ApiError, Scope};
use control::records::{get_json, keys, list_json, now_ms, to_bytes, CAS_ATTEMPTS};

/// Name of the admin token file inside the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Hex SHA-256 of a token: its store key.
pub fn hash_token(token: &str) -> String {
    model::hex(&Sha256::digest(token.as_bytes()))
}

/// A fresh random token: `vinfra_` and 64 hex digits (256 bits).
pub(crate) fn new_token() -> Result<String, ApiError> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| {
        ApiError::internal("generating a token", std::io::Error::other(e.to_string()))
    })?;
    Ok(format!("vinfra_{}", model::hex(&raw)))
}

/// What a new token grants, already checked against the caller.
#[derive(Debug, Clone)]
pub(crate) struct NewToken {
    pub role: Role,
    pub tenant: Option<TenantId>,
    /// Expiry, unix ms; `None`: never.
    pub expires_at: Option<u64>,
    pub scope: TokenScope,
    pub description: Option<String>,
}

impl NewToken {
    /// The admin token of a data dir: never expiring, read-write.
    fn data_dir_admin() -> Self {
        Self {
            role: Role::Admin,
            tenant: None,
            expires_at: None,
            scope: TokenScope::ReadWrite,
            description: Some(format!("{ADMIN_TOKEN_FILE} file of the data dir")),
        }
    }
}

/// A token's record and the store writes that create it: the record under
/// the token's hash and the id index, meant for one transaction (so that a
/// token never exists without its index, which revocation needs).
pub(crate) fn prepare(
    secret: &str,
    new: NewToken,
    now: u64,
) -> Result<(TokenRecord, Vec<TxnOp>, Vec<Compare>), ApiError> {
    let hash = hash_token(secret);
    let rec = TokenRecord {
        role: new.role,
        tenant: new.tenant,
        created_at: now,
        id: Some(TokenId::new_random()),
        prefix: prefix_of(secret).to_owned(),
        expires_at: new.expires_at,
        scope: new.scope,
        description: new.description,
    };
    let (ops, compares) = record_ops(&hash, &rec)?;
    Ok((rec, ops, compares))
}

/// Puts `rec` (which has an id) under `hash` with its id index; compares that
/// both are new.
fn record_ops(hash: &str, rec: &TokenRecord) -> Result<(Vec<TxnOp>, Vec<Compare>), ApiError> {
    let id = rec
        .id
        .ok_or_else(|| ApiError::invariant("writing a token record without an id"))?;
    let ops = vec![
        TxnOp::Put {
            key: keys::token(hash),
            value: to_bytes(rec)?,
        },
        TxnOp::Put {
            key: keys::token_id(id),
            value: to_bytes(&hash)?,
        },
    ];
    let compares = vec![
        Compare::ModRevision {
            key: keys::token(hash),
            expect: None,
        },
        Compare::ModRevision {
            key: keys::token_id(id),
            expect: None,
        },
    ];
    Ok((ops, compares))
}

/// The part of a token shown in lists.
fn prefix_of(secret: &str) -> &str {
    secret.get(..TOKEN_PREFIX_LEN).unwrap_or(secret)
}

/// Mints a token and stores its hash; returns the secret (shown once) and
/// its record.
pub(crate) async fn mint(
    store: &dyn Store,
    new: NewToken,
) -> Result<(String, TokenRecord), ApiError> {
    let secret = new_token()?;
    let rec = store_token(store, &secret, new)
        .await?
        // A random 256-bit token or 122-bit id already in use: not going to
        // happen; say so rather than overwrite another token.
        .ok_or_else(|| ApiError::invariant("token or token id collision"))?;
    Ok((secret, rec))
}

/// Stores a new record for `secret`; `None` if the store already has one
/// (or the new id is taken).
async fn store_token(
    store: &dyn Store,
    secret: &str,
    new: NewToken,
) -> Result<Option<TokenRecord>, ApiError> {
    let (rec, ops, compares) = prepare(secret, new, now_ms())?;
    match store.txn(compares, ops).await {
        Ok(_) => Ok(Some(rec)),
        Err(StoreError::Conflict { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The record as lists show it; `None` for a record without an id (written
/// before ids existed and not yet upgraded by [`upgrade_legacy`]).
pub(crate) fn info(rec: TokenRecord) -> Option<TokenInfo> {
    Some(TokenInfo {
        id: rec.id?,
        prefix: rec.prefix,
        role: rec.role,
        tenant: rec.tenant,
        scope: rec.scope,
        created_at: rec.created_at,
        expires_at: rec.expires_at,
        description: rec.description,
    })
}

/// Expired tokens stay listed (and answer "token expired") this long after
/// their expiry, so that a user sees why a script stopped working; a later
/// list deletes them.
const EXPIRED_KEPT_MS: u64 = 7 * 24 * 3600 * 1000;

/// The tokens `scope` may see, oldest first. Deletes tokens expired more than
/// [`EXPIRED_KEPT_MS`] ago (lazily: nothing else needs to run for them to go).
pub(crate) async fn list(store: &dyn Store, scope: Scope) -> Result<Vec<TokenInfo>, ApiError> {
    let now = now_ms();
    let mut out = Vec::new();
    for kv in store.list(keys::TOKENS).await? {
        let rec: TokenRecord = serde_json::from_slice(&kv.value)
            .map_err(|e| ApiError::internal(format!("decoding {}", kv.key), e))?;
        let visible = match scope {
            Scope::All => true,
            Scope::Tenant(t) => rec.tenant == Some(t),
        };
        if !visible {
            continue;
        }
        if rec
            .expires_at
            .is_some_and(|e| now >= e.saturating_add(EXPIRED_KEPT_MS))
        {
            let hash = kv.key.strip_prefix(keys::TOKENS).unwrap_or(&kv.key);
            // Best effort: a failure leaves the record for the next list.
            if let Err(e) = remove(store, hash, &rec, kv.mod_revision).await {
                tracing::warn!(error = %model::error_chain(&e), "cannot delete an expired token");
            }
            continue;
        }
        match info(rec) {
            Some(i) => out.push(i),
            None => tracing::debug!(key = %kv.key, "token without an id is not listed"),
        }
    }
    out.sort_by_key(|t| (t.created_at, t.id));
    Ok(out)
}

/// Deletes the record under `hash` (if still at `rev`) and its id index; an
/// admin token also leaves a revocation mark (see [`keys::token_revoked`]).
async fn remove(
    store: &dyn Store,
    hash: &str,
    rec: &TokenRecord,
    rev: Revision,
) -> Result<(), StoreError> {
    let mut ops = vec![TxnOp::Delete {
        key: keys::token(hash),
    }];
    if let Some(id) = rec.id {
        ops.push(TxnOp::Delete {
            key: keys::token_id(id),
        });
    }
    if rec.role == Role::Admin {
        ops.push(TxnOp::Put {
            key: keys::token_revoked(hash),
            value: bytes::Bytes::from(now_ms().to_string()),
        });
    }
    let compare = Compare::ModRevision {
        key: keys::token(hash),
        expect: Some(rev),
    };
    store.txn(vec![compare], ops).await.map(drop)
}

/// Revokes the token `id` if `scope` sees it: from the next request on, every
/// server sharing the store refuses it (no server caches tokens).
pub(crate) async fn revoke(store: &dyn Store, scope: Scope, id: TokenId) -> Result<(), ApiError> {
    let not_found = || ApiError::NotFound {
        kind: "token",
        id: id.to_string(),
    };
    for _ in 0..CAS_ATTEMPTS {
        let Some((hash, _)) = get_json::<String>(store, &keys::token_id(id)).await? else {
            return Err(not_found());
        };
        let Some((rec, rev)) = get_json::<TokenRecord>(store, &keys::token(&hash)).await? else {
            return Err(not_found());
        };
        let visible = match scope {
            Scope::All => true,
            Scope::Tenant(t) => rec.tenant == Some(t),
        };
        // Another tenant's token is 404, like a missing one.
        if !visible || rec.id != Some(id) {
            return Err(not_found());
        }
        match remove(store, &hash, &rec, rev).await {
            Ok(()) => return Ok(()),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict(format!(
        "token {id} is being updated concurrently, retry"
    )))
}

/// Gives every token record written before ids existed an id, a prefix-less
/// listing and its id index, so that it can be listed and revoked. Each
/// record is rewritten only if unchanged since read: servers starting at
/// once on one store do not give one token two ids.
async fn upgrade_legacy(store: &dyn Store) -> Result<(), ApiError> {
    for kv in store.list(keys::TOKENS).await? {
        let mut rec: TokenRecord = serde_json::from_slice(&kv.value)
            .map_err(|e| ApiError::internal(format!("decoding {}", kv.key), e))?;
        if rec.id.is_some() {
            continue;
        }
        let hash = kv.key.strip_prefix(keys::TOKENS).unwrap_or(&kv.key);
        rec.id = Some(TokenId::new_random());
        let (ops, mut compares) = record_ops(hash, &rec)?;
        // The record exists: compare its revision instead of its absence.
        compares.retain(|c| c.key() != kv.key);
        compares.push(Compare::ModRevision {
            key: kv.key.clone(),
            expect: Some(kv.mod_revision),
        });
        match store.txn(compares, ops).await {
            Ok(_) => {
                tracing::info!(id = ?rec.id, role = rec.role.as_str(), "gave a legacy token an id")
            }
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Makes sure an admin token exists. On first start it mints one (never
/// expiring: it is the operator's way in, kept in a 0600 file) and writes it
/// to `<data_dir>/admin-token`, and returns it. Later starts return `None`:
/// the file is the authority, and if the store lost its hash (a fresh store,
/// same data dir) it is re-added — unless it was revoked, which is final.
/// Callers must not print the token: it would end up in logs.
///
/// If the store has an admin token but the file is gone, nothing is minted
/// (the token is unrecoverable from its hash; mint another with an admin
/// token, or remove the store) and `None` is returned with a warning.
///
/// Also gives token records from before token ids one (see
/// [`TokenRecord`]), so that every token can be listed and revoked.
pub async fn bootstrap_admin(
    store: &dyn Store,
    data_dir: &Path,
) -> Result<Option<String>, ApiError> {
    upgrade_legacy(store).await?;
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
            let hash = hash_token(token);
            let known = get_json::<TokenRecord>(store, &keys::token(&hash)).await?;
            if known.is_some() {
                return Ok(None);
            }
            if store.get(&keys::token_revoked(&hash)).await?.is_some() {
                tracing::warn!(path = %path.display(), "the admin token in this file was revoked; not re-adding it");
                return Ok(None);
            }
            tracing::info!(path = %path.display(), "re-adding the admin token from its file");
            // `None`: another server sharing the store re-added it first.
            store_token(store, token, NewToken::data_dir_admin()).await?;
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
    store_token(store, &token, NewToken::data_dir_admin())
        .await?
        .ok_or_else(|| ApiError::invariant("a fresh admin token is already stored"))?;
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
