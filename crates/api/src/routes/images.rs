//! Images: tenant-owned or public.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use model::api::{CreateImage, Problem};
use model::{Image, Role};
use store::Revision;

use crate::extract::AppPath;
use crate::routes::tenants::write_tenant;
use crate::{ApiError, AppJson, AppState, Caller, Scope};

/// Creates an image from files in the image store (`POST /v1/blobs`), named by
/// digest. A member's image belongs to its tenant; an admin's is public unless the
/// admin names a tenant.
#[utoipa::path(post, path = "/v1/images", tag = "images", request_body = CreateImage,
    responses(
        (status = 201, body = Image),
        (status = 409, description = "name taken in this scope", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid field, or a file not in the image store for this tenant", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create_image(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateImage>,
) -> Result<(StatusCode, Json<Image>), ApiError> {
    caller.require(&[Role::Admin, Role::Member], "creating an image")?;
    let (name, tenant, blobs) = body.validate()?;
    let scope = caller.scope()?;
    let tenant = match (scope, tenant) {
        // An admin without a tenant makes a public image.
        (Scope::All, None) => None,
        (_, tenant) => Some(write_tenant(&state, &caller, tenant.as_ref()).await?),
    };
    let image = state
        .control()
        .create_image(scope, tenant, name, blobs, body.cmdline, body.disk_mib)
        .await?;
    Ok((StatusCode::CREATED, Json(image)))
}

/// Lists the images the caller can see: its tenant's and the public ones
/// (an admin: all).
#[utoipa::path(get, path = "/v1/images", tag = "images",
    responses((status = 200, body = Vec<Image>), (status = 403, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list_images(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Image>>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "listing images")?;
    Ok(Json(state.control().images(caller.scope()?).await?))
}

/// One image, by name or id.
#[utoipa::path(get, path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "image name or id")),
    responses(
        (status = 200, body = Image),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "an admin named an image that several tenants have; use the id", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn get_image(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(name): AppPath,
) -> Result<Json<Image>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "reading an image")?;
    let (image, _) = resolve(&state, caller.scope()?, &name).await?;
    Ok(Json(image))
}

/// Deletes an image that no VM uses. Only an admin may delete a public image.
#[utoipa::path(delete, path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "image name or id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "a VM uses it", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn delete_image(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(name): AppPath,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "deleting an image")?;
    state.control().delete_image(caller.scope()?, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Finds an image by id or name as seen from `scope`.
pub(crate) async fn resolve(
    state: &AppState,
    scope: Scope,
    s: &str,
) -> Result<(Image, Revision), ApiError> {
    Ok(state.control().image(scope, s).await?)
}
