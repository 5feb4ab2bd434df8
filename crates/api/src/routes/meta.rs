//! `GET /v1/openapi.json` and `GET /metrics`.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use model::{HostState, ObservedState, Role, TenantId, Vm};

use crate::{ApiError, AppState, Caller, Scope};

/// The OpenAPI document of this API.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
pub(crate) async fn openapi_doc() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi_json(),
    )
}

/// Prometheus metrics. An admin gets the global gauges (hosts, every VM) and
/// the HTTP counters; a member only gauges of its own tenant (its VMs by
/// state, its networks and images), since the global counts describe other
/// tenants. Agents get 403: they have no use for them.
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses(
        (status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain"),
        (status = 401, body = model::api::Problem, content_type = "application/problem+json"),
        (status = 403, description = "agent token", body = model::api::Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn metrics(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "reading metrics")?;
    let text = match caller.scope()? {
        Scope::All => global_metrics(&state).await?,
        Scope::Tenant(t) => tenant_metrics(&state, t).await?,
    };
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    ))
}

/// VMs by observed state, every state present (a gauge at 0 says "none").
fn count_vms<'a>(vms: impl Iterator<Item = &'a Vm>) -> Vec<(ObservedState, u64)> {
    let mut counts: Vec<(ObservedState, u64)> =
        ObservedState::ALL.iter().map(|s| (*s, 0)).collect();
    for vm in vms {
        if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == vm.observed) {
            slot.1 += 1;
        }
    }
    counts
}

async fn global_metrics(state: &AppState) -> Result<String, ApiError> {
    let (mut up, mut down) = (0u64, 0u64);
    for h in state.control().hosts().await? {
        match h.state {
            HostState::Up => up += 1,
            HostState::Down => down += 1,
        }
    }
    let vms = count_vms(state.control().vms(Scope::All).await?.iter());
    let hosts = [(HostState::Up, up), (HostState::Down, down)];
    let refusals = state.control().terminal_refusals();
    let mut text = crate::metrics::render(&hosts, &vms, state.http(), &refusals);
    if let Some(c) = state.traffic() {
        text.push_str(&c.prometheus());
    }
    Ok(text)
}

async fn tenant_metrics(state: &AppState, tenant: TenantId) -> Result<String, ApiError> {
    let vms = count_vms(state.control().vms(Scope::Tenant(tenant)).await?.iter());
    let networks = state.control().networks(Scope::Tenant(tenant)).await?.len();
    let images = state
        .control()
        .images(Scope::Tenant(tenant))
        .await?
        .iter()
        .filter(|i| i.tenant == Some(tenant))
        .count();
    Ok(crate::metrics::render_tenant(
        &vms,
        u64::try_from(networks).unwrap_or(u64::MAX),
        u64::try_from(images).unwrap_or(u64::MAX),
    ))
}
