//! Stored VNF and NS descriptors (validated by the caller before they get here).

use model::api::StoredDescriptor;
use model::TenantId;

use crate::records::{keys, list_json, to_bytes};
use crate::{Control, ControlError, Scope};

impl Control {
    /// Stores a descriptor of `kind` (`vnfd`, `nsd`) for `tenant`, replacing one with
    /// the same descriptor id.
    pub async fn put_descriptor(
        &self,
        tenant: TenantId,
        kind: &str,
        id: String,
        text: String,
    ) -> Result<StoredDescriptor, ControlError> {
        let d = StoredDescriptor {
            id,
            kind: kind.to_owned(),
            tenant,
            descriptor: text,
            created_at: crate::now_ms(),
        };
        self.store()
            .put(&keys::descriptor(kind, tenant, &d.id), to_bytes(&d)?)
            .await?;
        Ok(d)
    }

    /// The descriptors of `kind` that `scope` sees.
    pub async fn descriptors(
        &self,
        scope: Scope,
        kind: &str,
    ) -> Result<Vec<StoredDescriptor>, ControlError> {
        Ok(
            list_json::<StoredDescriptor>(self.store(), &keys::descriptors(kind))
                .await?
                .into_iter()
                .map(|(d, _)| d)
                .filter(|d| scope.sees(d.tenant))
                .collect(),
        )
    }
}
