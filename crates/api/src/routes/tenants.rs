//! Tenants (admin only).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use model::api::{CreateTenant, Problem, TenantCreated, DEFAULT_TOKEN_TTL_SECS};
use model::{Name, Role, Tenant, TenantId, TokenScope};

use crate::auth::{new_token, prepare, NewToken};
use crate::{ApiError, AppJson, AppState, Caller};
use control::records::now_ms;

/// Name of the tenant that an admin's VMs and tenant images go to when the
/// admin names none.
pub(crate) const DEFAULT_TENANT: &str = "default";

/// Creates a tenant and returns its first member token (shown only once).
#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", request_body = CreateTenant,
    responses(
        (status = 201, body = TenantCreated),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "name taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create_tenant(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateTenant>,
) -> Result<(StatusCode, Json<TenantCreated>), ApiError> {
    caller.require(&[Role::Admin], "creating a tenant")?;
    let name = body.validate()?;
    let (tenant, token) = insert_tenant(&state, name, true).await?;
    let token = token.ok_or_else(|| ApiError::invariant("tenant created without its token"))?;
    tracing::info!(tenant = %tenant.name, id = %tenant.id, "tenant created");
    Ok((StatusCode::CREATED, Json(TenantCreated { tenant, token })))
}

/// Writes a new tenant, its name index and (with `with_token`) a member
/// token in one transaction, so that a tenant never exists without its
/// first token or vice versa.
async fn insert_tenant(
    state: &AppState,
    name: Name,
    with_token: bool,
) -> Result<(Tenant, Option<String>), ApiError> {
    let tenant = Tenant {
        id: TenantId::new_random(),
        name,
        created_at: now_ms(),
    };
    let (token, extra) = if with_token {
        let token = new_token()?;
        let new = NewToken {
            role: Role::Member,
            tenant: Some(tenant.id),
            // Like any member token: the tenant's owner mints longer-lived
            // ones as needed.
            expires_at: Some(
                tenant
                    .created_at
                    .saturating_add(DEFAULT_TOKEN_TTL_SECS * 1000),
            ),
            scope: TokenScope::ReadWrite,
            description: Some(format!("first token of tenant {}", tenant.name)),
        };
        let (_, token_ops, token_compares) = prepare(&token, new, tenant.created_at)?;
        (Some(token), (token_compares, token_ops))
    } else {
        (None, (Vec::new(), Vec::new()))
    };
    state.control().insert_tenant(&tenant, extra).await?;
    Ok((tenant, token))
}

/// Lists tenants.
#[utoipa::path(get, path = "/v1/tenants", tag = "tenants",
    responses((status = 200, body = Vec<Tenant>), (status = 403, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list_tenants(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Tenant>>, ApiError> {
    caller.require(&[Role::Admin], "listing tenants")?;
    Ok(Json(state.control().tenants().await?))
}

/// The tenant named `name`, if any.
pub(crate) async fn tenant_by_name(
    state: &AppState,
    name: &Name,
) -> Result<Option<Tenant>, ApiError> {
    Ok(state.control().tenant_by_name(name).await?)
}

/// The tenant a write goes to: the member's own; for an admin the named one
/// or `default` (created on first use).
pub async fn write_tenant(
    state: &AppState,
    caller: &Caller,
    requested: Option<&Name>,
) -> Result<TenantId, ApiError> {
    match (caller.scope()?, requested) {
        (crate::Scope::Tenant(_), Some(_)) => Err(ApiError::Forbidden(
            "tenant: only an admin may choose the tenant".to_owned(),
        )),
        (crate::Scope::Tenant(t), None) => Ok(t),
        (crate::Scope::All, Some(name)) => tenant_by_name(state, name)
            .await?
            .map(|t| t.id)
            .ok_or_else(|| ApiError::Unprocessable(format!("tenant: no tenant named {name}"))),
        (crate::Scope::All, None) => default_tenant(state).await,
    }
}

async fn default_tenant(state: &AppState) -> Result<TenantId, ApiError> {
    let name = model::validate_name("tenant", DEFAULT_TENANT)?;
    if let Some(t) = tenant_by_name(state, &name).await? {
        return Ok(t.id);
    }
    match insert_tenant(state, name.clone(), false).await {
        Ok((t, _)) => Ok(t.id),
        // Another request created it first.
        Err(ApiError::Conflict(_)) => tenant_by_name(state, &name)
            .await?
            .map(|t| t.id)
            .ok_or_else(|| ApiError::invariant("default tenant vanished after a conflict")),
        Err(e) => Err(e),
    }
}
