//! Tokens: mint, list, revoke. An admin manages every token; a member the
//! member tokens of its own tenant, never wider than its own.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use model::api::{CreateToken, Problem, TokenCreated, TokenInfo};
use model::{Role, TokenId};

use crate::auth::{self, NewToken};
use crate::extract::AppPath;
use crate::routes::tenants::tenant_by_name;
use crate::{ApiError, AppJson, AppState, Caller, Scope};
use control::records::now_ms;

/// Mints a token (the secret is shown only this once). A member may mint
/// member tokens of its own tenant only; the new token never outlives the
/// caller's.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = CreateToken,
    responses(
        (status = 201, body = TokenCreated),
        (status = 401, description = "no, invalid or expired token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "agent or read-only token, a member asking for another role or tenant", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "bad role/tenant combination, unknown tenant, ttl_secs out of range", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateToken>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    caller.require(&[Role::Admin, Role::Member], "minting a token")?;
    let now = now_ms();
    let lifetime = body.lifetime_ms()?;
    let description = body.validate_description()?;
    let tenant = match caller.scope()? {
        Scope::All => match body.validate()? {
            Some(name) => Some(
                tenant_by_name(&state, &name)
                    .await?
                    .ok_or_else(|| {
                        ApiError::Unprocessable(format!("tenant: no tenant named {name}"))
                    })?
                    .id,
            ),
            None => None,
        },
        Scope::Tenant(own) => {
            if body.role != Role::Member {
                return Err(ApiError::Forbidden(format!(
                    "role: a member may mint member tokens only, not {}",
                    body.role.as_str()
                )));
            }
            if let Some(name) = &body.tenant {
                let name = model::validate_name("tenant", name)?;
                let named = tenant_by_name(&state, &name).await?.map(|t| t.id);
                if named != Some(own) {
                    return Err(ApiError::Forbidden(
                        "tenant: a member may mint tokens of its own tenant only".to_owned(),
                    ));
                }
            }
            Some(own)
        }
    };
    let wanted = lifetime.map(|l| now.saturating_add(l));
    // Never outlive the caller's token: a short-lived token must not be able
    // to extend itself by minting a longer one.
    let expires_at = match (wanted, caller.expires_at) {
        (Some(w), Some(limit)) => Some(w.min(limit)),
        (None, limit) => limit,
        (w, None) => w,
    };
    let new = NewToken {
        role: body.role,
        tenant,
        expires_at,
        scope: body.scope,
        description,
    };
    let (token, rec) = auth::mint(state.store(), new).await?;
    let id = rec
        .id
        .ok_or_else(|| ApiError::invariant("minted a token without an id"))?;
    tracing::info!(%id, role = rec.role.as_str(), ?tenant, scope = rec.scope.as_str(), "token minted");
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            token,
            id,
            prefix: rec.prefix,
            role: rec.role,
            tenant: rec.tenant,
            scope: rec.scope,
            expires_at: rec.expires_at,
            description: rec.description,
        }),
    ))
}

/// Lists tokens: ids, prefixes and metadata, never a secret or its hash. An
/// admin sees every token, a member its tenant's. Tokens expired for more
/// than a week are deleted instead of listed.
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    responses(
        (status = 200, body = Vec<TokenInfo>),
        (status = 401, description = "no, invalid or expired token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "agent token", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "listing tokens")?;
    Ok(Json(auth::list(state.store(), caller.scope()?).await?))
}

/// Revokes a token at once: from the next request on, every server sharing
/// the store refuses it. An admin may revoke any token, a member its
/// tenant's (another tenant's is 404).
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "token id")),
    responses(
        (status = 204, description = "revoked"),
        (status = 401, description = "no, invalid or expired token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "agent or read-only token", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the token changed concurrently; retry", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn revoke_token(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(id): AppPath,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "revoking a token")?;
    let scope = caller.scope()?;
    // A malformed id names no token.
    let id: TokenId = id.parse().map_err(|_| ApiError::NotFound {
        kind: "token",
        id: id.clone(),
    })?;
    auth::revoke(state.store(), scope, id).await?;
    tracing::info!(%id, "token revoked");
    Ok(StatusCode::NO_CONTENT)
}
