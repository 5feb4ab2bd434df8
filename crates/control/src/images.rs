//! Image lookup as a tenant sees it.

use model::{Image, ImageId};
use store::Revision;

use crate::records::{get_json, keys, list_keyed};
use crate::{Control, ControlError, Scope};

fn visible(scope: Scope, image: &Image) -> bool {
    match image.tenant {
        None => true,
        Some(t) => scope.sees(t),
    }
}

impl Control {
    /// The images `scope` sees (its own and the public ones), by tenant then name.
    pub async fn images(&self, scope: Scope) -> Result<Vec<Image>, ControlError> {
        let mut images: Vec<Image> = crate::records::list_json::<Image>(self.store(), keys::IMAGES)
            .await?
            .into_iter()
            .map(|(i, _)| i)
            .filter(|i| visible(scope, i))
            .collect();
        images.sort_by(|a, b| (a.tenant, &a.name).cmp(&(b.tenant, &b.name)));
        Ok(images)
    }

    /// Finds an image by id or name as seen from `scope`: a tenant's own image shadows
    /// a public one of the same name.
    pub async fn image(&self, scope: Scope, s: &str) -> Result<(Image, Revision), ControlError> {
        let not_found = || ControlError::NotFound {
            kind: "image",
            id: s.to_owned(),
        };
        if let Ok(id) = s.parse::<ImageId>() {
            return match get_json::<Image>(self.store(), &keys::image(id)).await? {
                Some((image, rev)) if visible(scope, &image) => Ok((image, rev)),
                _ => Err(not_found()),
            };
        }
        let name = model::validate_name("image", s).map_err(|_| not_found())?;
        let public = get_json::<ImageId>(self.store(), &keys::image_name(None, &name)).await?;
        let ids: Vec<ImageId> = match scope {
            Scope::Tenant(t) => {
                match get_json::<ImageId>(self.store(), &keys::image_name(Some(t), &name)).await? {
                    Some((id, _)) => vec![id],
                    None => public.map(|(id, _)| id).into_iter().collect(),
                }
            }
            Scope::All => match public {
                Some((id, _)) => vec![id],
                None => {
                    let suffix = format!("/{name}");
                    // Names hold no `/`, so the suffix matches whole names only.
                    list_keyed::<ImageId>(self.store(), keys::IMAGE_NAMES)
                        .await?
                        .into_iter()
                        .filter(|(key, _)| key.ends_with(&suffix))
                        .map(|(_, id)| id)
                        .collect()
                }
            },
        };
        match ids.as_slice() {
            [] => Err(not_found()),
            [id] => get_json::<Image>(self.store(), &keys::image(*id))
                .await?
                .ok_or_else(not_found),
            _ => Err(ControlError::AmbiguousName {
                kind: "image",
                name: name.to_string(),
                tenants: ids.len(),
            }),
        }
    }
}

/// Why an image cannot be made or deleted.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file the image names is not in the image store for the caller.
    #[error("{field}: no blob {digest} in the image store for this tenant (upload it with POST /v1/blobs)")]
    NoBlob {
        /// `kernel`, `initrd`, `disk_template`.
        field: &'static str,
        /// Its digest.
        digest: model::BlobDigest,
    },
    /// Only an admin deletes a public image.
    #[error("image {0} is public; only an admin may delete it")]
    Public(model::Name),
    /// A VM uses it.
    #[error("image {image} is used by vm {vm}")]
    InUse {
        /// The image.
        image: model::Name,
        /// A VM using it.
        vm: model::Name,
    },
    /// The store, a lost race, a taken name, or no such image.
    #[error(transparent)]
    Control(#[from] ControlError),
}

impl Control {
    /// Records that `owner` (a tenant; `None`: shared, an admin's upload) may use a
    /// stored file.
    pub async fn record_blob(
        &self,
        owner: Option<model::TenantId>,
        digest: model::BlobDigest,
        size: u64,
    ) -> Result<model::Blob, ControlError> {
        let key = keys::blob(&digest, owner);
        if let Some((b, _)) = get_json::<model::Blob>(self.store(), &key).await? {
            return Ok(b);
        }
        let blob = model::Blob {
            digest,
            size,
            tenant: owner,
            created_at: crate::now_ms(),
        };
        self.store()
            .put(&key, crate::records::to_bytes(&blob)?)
            .await?;
        Ok(blob)
    }

    /// The blobs `scope` may use: its tenant's and the shared ones (an admin: all).
    pub async fn blobs(&self, scope: Scope) -> Result<Vec<model::Blob>, ControlError> {
        Ok(
            crate::records::list_json::<model::Blob>(self.store(), keys::BLOBS)
                .await?
                .into_iter()
                .map(|(b, _)| b)
                .filter(|b| b.tenant.is_none_or(|t| scope.sees(t)))
                .collect(),
        )
    }

    /// Whether `scope` may use `digest`: a record for its tenant or a shared one (an
    /// admin: any record).
    pub async fn blob_usable(
        &self,
        scope: Scope,
        digest: &model::BlobDigest,
    ) -> Result<bool, ControlError> {
        Ok(match scope {
            Scope::All => !self
                .store()
                .list(&keys::blob_prefix(digest))
                .await?
                .is_empty(),
            Scope::Tenant(t) => {
                get_json::<model::Blob>(self.store(), &keys::blob(digest, Some(t)))
                    .await?
                    .is_some()
                    || get_json::<model::Blob>(self.store(), &keys::blob(digest, None))
                        .await?
                        .is_some()
            }
        })
    }

    /// Makes an image of `tenant` (`None`: public) from files `scope` may use.
    pub async fn create_image(
        &self,
        scope: Scope,
        tenant: Option<model::TenantId>,
        name: model::Name,
        files: model::ImageBlobs,
        cmdline: String,
        disk_mib: u64,
    ) -> Result<Image, ImageError> {
        // Every file must be in the image store for the caller: a tenant names only its
        // own uploads and the shared ones.
        for (field, digest) in [
            ("kernel", &files.kernel),
            ("initrd", &files.initrd),
            ("disk_template", &files.disk_template),
        ] {
            if let Some(d) = digest {
                if !self.blob_usable(scope, d).await? {
                    return Err(ImageError::NoBlob {
                        field,
                        digest: d.clone(),
                    });
                }
            }
        }
        let text = |d: Option<model::BlobDigest>| d.map(String::from);
        let image = Image {
            id: ImageId::new_random(),
            tenant,
            name,
            kernel: text(files.kernel),
            initrd: text(files.initrd),
            disk_template: text(files.disk_template),
            cmdline,
            disk_mib,
            created_at: crate::now_ms(),
        };
        crate::records::insert_named(
            self.store(),
            keys::image(image.id),
            keys::image_name(tenant, &image.name),
            &image,
            &image.id,
            || format!("name: image {} already exists", image.name),
        )
        .await?;
        Ok(image)
    }

    /// Deletes an image no VM uses (a public one: an admin only).
    pub async fn delete_image(&self, scope: Scope, s: &str) -> Result<(), ImageError> {
        let (image, rev) = self.image(scope, s).await?;
        if image.tenant.is_none() && scope != Scope::All {
            return Err(ImageError::Public(image.name));
        }
        if let Some((vm, _)) = crate::records::list_json::<model::Vm>(self.store(), keys::VMS)
            .await?
            .into_iter()
            .find(|(vm, _)| vm.image == image.id)
        {
            return Err(ImageError::InUse {
                image: image.name,
                vm: vm.name,
            });
        }
        match crate::records::remove_named(
            self.store(),
            keys::image(image.id),
            keys::image_name(image.tenant, &image.name),
            Some(rev),
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(store::StoreError::Conflict { .. }) => Err(ControlError::Contended {
                what: format!("image {}", image.name),
            }
            .into()),
            Err(e) => Err(ControlError::from(e).into()),
        }
    }
}
