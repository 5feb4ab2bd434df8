//! Agents on other machines join over TLS: an admin mints a one-time join token
//! carrying the CA's fingerprint; the agent checks the CA it is served against that
//! pin, then trades the token for a client certificate and an agent bearer token.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use model::api::{CreateJoinToken, JoinRequest, JoinResponse, JoinTokenCreated, Problem};
use model::{Role, TokenScope};

use crate::auth::{hash_token, mint, new_token, NewToken};
use crate::{ApiError, AppJson, AppState, Caller};
use control::records::now_ms;

/// The text before the secret in a join token.
const JOIN_PREFIX: &str = "vjoin";

fn ca(state: &AppState) -> Result<&tls::Ca, ApiError> {
    state.ca().ok_or_else(|| {
        ApiError::Conflict(
            "this server does not serve TLS (it listens on loopback; see --tls)".to_owned(),
        )
    })
}

/// The cluster CA certificate (public): what clients of a TLS server trust.
#[utoipa::path(get, path = "/v1/ca.pem", tag = "cluster", security(()),
    responses(
        (status = 200, description = "PEM certificate", content_type = "application/x-pem-file", body = String),
        (status = 409, description = "this server does not serve TLS", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn ca_pem(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut res = ca(&state)?.cert_pem().to_owned().into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-pem-file"),
    );
    Ok(res)
}

/// Admin: a one-time join token (shown once) for an agent on another machine.
#[utoipa::path(post, path = "/v1/join-tokens", tag = "cluster", request_body = CreateJoinToken,
    responses(
        (status = 201, body = JoinTokenCreated),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "this server does not serve TLS", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create_join_token(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateJoinToken>,
) -> Result<(StatusCode, Json<JoinTokenCreated>), ApiError> {
    caller.require(&[Role::Admin], "minting a join token")?;
    let ttl = body.validate()?;
    let pin = tls::fingerprint(ca(&state)?.cert_pem())
        .map_err(|e| ApiError::internal("the CA fingerprint", e))?;
    let secret = new_token()?;
    let now = now_ms();
    let rec = control::cluster::JoinToken {
        created_at: now,
        expires_at: now.saturating_add(ttl.saturating_mul(1000)),
    };
    state
        .control()
        .put_join_token(&hash_token(&secret), &rec)
        .await?;
    tracing::info!(ttl_secs = ttl, "join token minted");
    Ok((
        StatusCode::CREATED,
        Json(JoinTokenCreated {
            token: format!("{JOIN_PREFIX}.{secret}.{pin}"),
            expires_at: rec.expires_at,
        }),
    ))
}

/// An agent trades a join token for its identity: a client certificate naming its
/// host, the CA, and an agent bearer token. The join token works once.
#[utoipa::path(post, path = "/v1/join", tag = "cluster", request_body = JoinRequest, security(()),
    responses(
        (status = 201, body = JoinResponse),
        (status = 401, description = "join token unknown, used or expired", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "this server does not serve TLS", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn join(
    State(state): State<AppState>,
    AppJson(body): AppJson<JoinRequest>,
) -> Result<(StatusCode, Json<JoinResponse>), ApiError> {
    let host = model::validate_name("host", &body.host)?;
    let ca = ca(&state)?;
    // One answer for every bad token, so that none tells what a good one looks like.
    let refused = || ApiError::JoinRefused;
    let mut parts = body.token.split('.');
    let (Some(JOIN_PREFIX), Some(secret), Some(_pin), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refused());
    };
    // Used up here, whether or not it is still valid: an expired token goes too.
    let Some(rec) = state.control().take_join_token(&hash_token(secret)).await? else {
        return Err(refused());
    };
    if rec.expires_at <= now_ms() {
        return Err(refused());
    }
    let cert = ca
        .issue_agent(host.as_str())
        .map_err(|e| ApiError::internal("issuing an agent certificate", e))?;
    let (token, _) = mint(
        state.store(),
        NewToken {
            role: Role::Agent,
            tenant: None,
            expires_at: None,
            scope: TokenScope::ReadWrite,
            description: Some(format!("agent of host {host}, joined over TLS")),
        },
    )
    .await?;
    tracing::info!(host = %host, "agent joined");
    Ok((
        StatusCode::CREATED,
        Json(JoinResponse {
            host,
            ca_pem: ca.cert_pem().to_owned(),
            cert_pem: cert.cert_pem,
            key_pem: cert.key_pem,
            token,
        }),
    ))
}
