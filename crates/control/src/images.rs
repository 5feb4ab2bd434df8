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
