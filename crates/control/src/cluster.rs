//! Tenants and one-time join tokens: records whose secrets are made and checked by the
//! API's auth layer; here only how they are stored.

use model::{Name, Tenant, TenantId};
use serde::{Deserialize, Serialize};
use store::{Compare, StoreError, TxnOp};

use crate::records::{get_json, keys, list_json, to_bytes};
use crate::{Control, ControlError};

/// What the store keeps of a join token, under the SHA-256 of its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinToken {
    /// Minted, unix ms.
    pub created_at: u64,
    /// Expires, unix ms.
    pub expires_at: u64,
}

impl Control {
    /// Keeps a join token under the hash of its secret.
    pub async fn put_join_token(&self, hash: &str, t: &JoinToken) -> Result<(), ControlError> {
        self.store()
            .put(&keys::join_token(hash), to_bytes(t)?)
            .await?;
        Ok(())
    }

    /// Takes the join token under `hash` out of the store, once: of two callers racing
    /// for it, one gets it. `None`: unknown or already taken. Expired ones are taken too
    /// (and the caller refuses them).
    pub async fn take_join_token(&self, hash: &str) -> Result<Option<JoinToken>, ControlError> {
        let key = keys::join_token(hash);
        let Some((t, rev)) = get_json::<JoinToken>(self.store(), &key).await? else {
            return Ok(None);
        };
        let taken = self
            .store()
            .txn(
                vec![Compare::ModRevision {
                    key: key.clone(),
                    expect: Some(rev),
                }],
                vec![TxnOp::Delete { key }],
            )
            .await;
        match taken {
            Ok(_) => Ok(Some(t)),
            Err(StoreError::Conflict { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes a new tenant and its name in one transaction with `extra` (the writes of
    /// its first token, when it has one), so that a tenant never exists without its
    /// first token or the reverse. A taken name is [`ControlError::Taken`].
    pub async fn insert_tenant(
        &self,
        tenant: &Tenant,
        extra: (Vec<Compare>, Vec<TxnOp>),
    ) -> Result<(), ControlError> {
        let name_key = keys::tenant_name(&tenant.name);
        let (extra_compares, extra_ops) = extra;
        let ops = [
            TxnOp::Put {
                key: keys::tenant(tenant.id),
                value: to_bytes(tenant)?,
            },
            TxnOp::Put {
                key: name_key.clone(),
                value: to_bytes(&tenant.id)?,
            },
        ]
        .into_iter()
        .chain(extra_ops)
        .collect();
        let compares = std::iter::once(Compare::ModRevision {
            key: name_key,
            expect: None,
        })
        .chain(extra_compares)
        .collect();
        match self.store().txn(compares, ops).await {
            Ok(_) => Ok(()),
            Err(StoreError::Conflict { .. }) => Err(ControlError::Taken(format!(
                "name: tenant {} already exists",
                tenant.name
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Every tenant, by name.
    pub async fn tenants(&self) -> Result<Vec<Tenant>, ControlError> {
        let mut tenants: Vec<Tenant> = list_json::<Tenant>(self.store(), keys::TENANTS)
            .await?
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        tenants.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(tenants)
    }

    /// The tenant named `name`, if any.
    pub async fn tenant_by_name(&self, name: &Name) -> Result<Option<Tenant>, ControlError> {
        let Some((id, _)) = get_json::<TenantId>(self.store(), &keys::tenant_name(name)).await?
        else {
            return Ok(None);
        };
        Ok(get_json::<Tenant>(self.store(), &keys::tenant(id))
            .await?
            .map(|(t, _)| t))
    }
}
