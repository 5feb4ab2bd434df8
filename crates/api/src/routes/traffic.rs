//! `GET /v1/traffic`: the vSwitch controller's statistics — traffic by class
//! (intra-server, inter-server intra-domain, inter-domain), by VM and by VM pair.

use axum::extract::{Query, State};
use axum::Json;
use model::Role;

use crate::{ApiError, AppState, Caller};

/// Window of a traffic query.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct TrafficParams {
    /// The last this many seconds.
    window_s: Option<u64>,
    /// Window start, unix seconds (inclusive).
    from: Option<u64>,
    /// Window end, unix seconds (exclusive).
    to: Option<u64>,
}

/// Traffic counted by this domain's virtual switches.
#[utoipa::path(get, path = "/v1/traffic", tag = "traffic", params(TrafficParams),
    responses(
        (status = 200, description = "traffic report of the domain", body = Object),
        (status = 409, description = "statistics are off", body = model::api::Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn get_traffic(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<TrafficParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<net::TrafficReport>, ApiError> {
    caller.require(&[Role::Admin], "reading traffic statistics")?;
    let Query(q) = q.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    if let (Some(f), Some(t)) = (q.from, q.to) {
        if f >= t {
            return Err(ApiError::Unprocessable(format!(
                "from: must be before to ({f} >= {t})"
            )));
        }
    }
    let Some(c) = state.traffic() else {
        return Err(ApiError::Conflict(
            "traffic statistics are off: start the server with --vswitch-listen".to_owned(),
        ));
    };
    Ok(Json(c.traffic(&net::TrafficQuery {
        from: q.from,
        to: q.to,
        window_s: q.window_s,
    })))
}
