//! `GET /v1/openapi.json` and `GET /metrics`.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use model::{Host, HostState, ObservedState, Vm};

use crate::store_io::{keys, list_json, now_ms};
use crate::{ApiError, AppState, Caller};

/// The OpenAPI document of this API.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
pub(crate) async fn openapi_doc() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi_json(),
    )
}

/// Prometheus metrics. Needs any valid token (scrapers send a bearer token).
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses(
        (status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain"),
        (status = 401, body = model::api::Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn metrics(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<impl IntoResponse, ApiError> {
    let now = now_ms();
    let timeout = state.heartbeat_timeout_ms();
    let (mut up, mut down) = (0u64, 0u64);
    for (mut h, _) in list_json::<Host>(state.store(), keys::HOSTS).await? {
        h.refresh_state(now, timeout);
        match h.state {
            HostState::Up => up += 1,
            HostState::Down => down += 1,
        }
    }
    let mut vms: Vec<(ObservedState, u64)> = ObservedState::ALL.iter().map(|s| (*s, 0)).collect();
    for (vm, _) in list_json::<Vm>(state.store(), keys::VMS).await? {
        if let Some(slot) = vms.iter_mut().find(|(s, _)| *s == vm.observed) {
            slot.1 += 1;
        }
    }
    let hosts = [(HostState::Up, up), (HostState::Down, down)];
    let mut text = crate::metrics::render(&hosts, &vms, state.http());
    if let Some(c) = state.traffic() {
        text.push_str(&c.prometheus());
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    ))
}
