//! HTTP of the MEC service. Handlers authenticate, parse, make one call into [`Mec`] and map
//! its typed error to a MEC 030 `ProblemDetails` (`application/problem+json`).
//!
//! - V2X API (operator token): `PUT|GET|DELETE /v2x/v1/subscriptions/{device}`,
//!   `GET /v2x/v1/subscriptions`, `GET /v2x/v1/links`, `GET /v2x/v1/gate`, and
//!   `GET /v2x/v1/status` (all three at once, for the dashboard's V2X page).
//! - V2X application function (device token): `POST /v2x/v1/authorizations`,
//!   `DELETE /v2x/v1/authorizations/{device}` (the device leaves this operator),
//!   `POST /v2x/v1/links`, `DELETE /v2x/v1/links/{id}?device=`.
//! - Inter-operator (peer token): `POST /v2x/v1/peer/releases`, `POST /v2x/v1/peer/roaming`
//!   (a visited operator fetches a roaming device's subscription with the device's token),
//!   `POST /v2x/v1/peer/revocations` (home revoked a device: drop its roaming copy).
//! - MEC 030 VIS (operator token, as a MEC application presents it): `/vis/v2/…`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::function::V2xError;
use crate::mec::Mec;
use crate::types::{
    AuthorizationRequest, GatePair, GateStatus, LinkRequest, MecStatus, Plmn, V2xSubscription,
};
use crate::vis::VisError;

/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;

/// An error answer: status + ProblemDetails.
#[derive(Debug)]
pub struct Problem {
    status: StatusCode,
    detail: String,
    etag: Option<String>,
}

impl Problem {
    fn new(status: StatusCode, detail: impl Into<String>) -> Problem {
        Problem {
            status,
            detail: detail.into(),
            etag: None,
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let body = json!({
            "type": format!("https://vinfra.dev/problems/{}", self.status.as_u16()),
            "title": title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let mut r = (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response();
        if let Some(e) = self.etag.and_then(|e| e.parse().ok()) {
            r.headers_mut().insert(header::ETAG, e);
        }
        r
    }
}

impl From<V2xError> for Problem {
    fn from(e: V2xError) -> Problem {
        let s = match &e {
            V2xError::Invalid(_) => StatusCode::BAD_REQUEST,
            V2xError::NotSubscribed(_) | V2xError::NoLink(_) => StatusCode::NOT_FOUND,
            V2xError::BadCredential(_) => StatusCode::UNAUTHORIZED,
            V2xError::ServiceNotAllowed { .. }
            | V2xError::NotAuthorized(_)
            | V2xError::PlmnNotAuthorized { .. } => StatusCode::FORBIDDEN,
            V2xError::Gate(_) => StatusCode::INTERNAL_SERVER_ERROR,
            V2xError::HomeUnreachable { .. } => StatusCode::BAD_GATEWAY,
            // The journal cannot take changes (disk full, I/O error): nothing was done.
            V2xError::State(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Problem::new(s, e.to_string())
    }
}

impl From<VisError> for Problem {
    fn from(e: VisError) -> Problem {
        match e {
            VisError::Invalid(d) => Problem::new(StatusCode::BAD_REQUEST, d),
            VisError::NotFound(d) => Problem::new(StatusCode::NOT_FOUND, d),
            VisError::State(e) => Problem::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            VisError::Precondition { current } => Problem {
                status: StatusCode::PRECONDITION_FAILED,
                detail: format!("the subscription changed: its ETag is {current}"),
                etag: Some(current),
            },
        }
    }
}

type AppState = Arc<Mec>;

fn bearer(h: &HeaderMap) -> Option<&str> {
    h.get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn need(h: &HeaderMap, token: &str) -> Result<(), Problem> {
    match bearer(h) {
        Some(t) if crate::pc5::same(t.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        )),
    }
}

fn parse<T: DeserializeOwned>(b: &Bytes) -> Result<T, Problem> {
    serde_json::from_slice(b)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")))
}

fn json_resp(status: StatusCode, v: &Value, etag: Option<String>) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response();
    if let Some(e) = etag.and_then(|e| e.parse().ok()) {
        r.headers_mut().insert(header::ETAG, e);
    }
    r
}

fn to_value<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// The router of one MEC service.
pub fn router(mec: Arc<Mec>) -> Router {
    Router::new()
        .route("/v2x/v1/subscriptions", get(list_devices))
        .route(
            "/v2x/v1/subscriptions/{device}",
            put(provision).get(show_device).delete(revoke),
        )
        .route("/v2x/v1/authorizations", post(authorize))
        .route(
            "/v2x/v1/authorizations/{device}",
            axum::routing::delete(release),
        )
        .route("/v2x/v1/links", post(open_link).get(list_links))
        .route("/v2x/v1/links/{id}", axum::routing::delete(close_link))
        .route("/v2x/v1/gate", get(gate))
        .route("/v2x/v1/status", get(status))
        .route("/v2x/v1/peer/releases", post(peer_release))
        .route("/v2x/v1/peer/roaming", post(peer_roaming))
        .route("/v2x/v1/peer/revocations", post(peer_revocation))
        .route(
            "/vis/v2/queries/uu_unicast_provisioning_info",
            get(q_uu_unicast),
        )
        .route("/vis/v2/queries/uu_mbms_provisioning_info", get(q_uu_mbms))
        .route("/vis/v2/queries/pc5_provisioning_info", get(q_pc5))
        .route("/vis/v2/provide_predicted_qos", post(predicted_qos))
        .route(
            "/vis/v2/provide_v2x_msg_distribution_server_info",
            post(distribution_server),
        )
        .route("/vis/v2/publish_v2x_message", post(publish))
        .route("/vis/v2/subscriptions", get(list_subs).post(subscribe))
        .route(
            "/vis/v2/subscriptions/{id}",
            get(get_sub).put(put_sub).delete(delete_sub),
        )
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "no such resource") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(mec)
}

async fn list_devices(State(m): State<AppState>, h: HeaderMap) -> Result<Response, Problem> {
    need(&h, &m.token)?;
    Ok(json_resp(
        StatusCode::OK,
        &json!(m.function.devices()),
        None,
    ))
}

async fn provision(
    State(m): State<AppState>,
    h: HeaderMap,
    Path(device): Path<String>,
    body: Bytes,
) -> Result<Response, Problem> {
    need(&h, &m.token)?;
    let sub: V2xSubscription = parse(&body)?;
    let p = m.provision(&device, sub).await?;
    Ok(json_resp(StatusCode::OK, &to_value(&p), None))
}

async fn show_device(
    State(m): State<AppState>,
    h: HeaderMap,
    Path(device): Path<String>,
) -> Result<Response, Problem> {
    need(&h, &m.token)?;
    let s = m.function.subscription(&device)?;
    let links = m.function.links(Some(&device));
    let auth = m.function.authorization(&device).map(|a| a.params);
    Ok(json_resp(
        StatusCode::OK,
        &json!({"deviceId": device, "subscription": s, "authorization": auth, "links": links}),
        None,
    ))
}

async fn revoke(
    State(m): State<AppState>,
    h: HeaderMap,
    Path(device): Path<String>,
) -> Result<StatusCode, Problem> {
    need(&h, &m.token)?;
    m.revoke(&device).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn authorize(
    State(m): State<AppState>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let req: AuthorizationRequest = parse(&body)?;
    let token = bearer(&h).unwrap_or("");
    let p = m.authorize(token, &req, Some(from.ip())).await?;
    Ok(json_resp(StatusCode::CREATED, &to_value(&p), None))
}

async fn release(
    State(m): State<AppState>,
    h: HeaderMap,
    Path(device): Path<String>,
) -> Result<StatusCode, Problem> {
    m.release(bearer(&h).unwrap_or(""), &device).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn open_link(
    State(m): State<AppState>,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let req: LinkRequest = parse(&body)?;
    let l = m.function.open_link(bearer(&h).unwrap_or(""), &req).await?;
    Ok(json_resp(StatusCode::CREATED, &to_value(&l), None))
}

#[derive(Debug, serde::Deserialize)]
struct DeviceQuery {
    device: Option<String>,
}

async fn close_link(
    State(m): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<DeviceQuery>,
) -> Result<StatusCode, Problem> {
    let device = q.device.ok_or_else(|| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "query parameter device is required",
        )
    })?;
    m.function
        .close_link(bearer(&h).unwrap_or(""), &device, &id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_links(
    State(m): State<AppState>,
    h: HeaderMap,
    Query(q): Query<DeviceQuery>,
) -> Result<Response, Problem> {
    need(&h, &m.token)?;
    Ok(json_resp(
        StatusCode::OK,
        &to_value(&m.function.links(q.device.as_deref())),
        None,
    ))
}

/// The gate's counters in wire form; 404 when this MEC runs no gate.
async fn gate_status(m: &Mec) -> Result<GateStatus, Problem> {
    let Some(g) = m.function.gate() else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "this MEC has no PC5 gate",
        ));
    };
    let c = g.counters().await.map_err(V2xError::from)?;
    Ok(GateStatus {
        dropped_packets: c.dropped_packets,
        open: c
            .open
            .iter()
            .map(|&(src, dst, packets)| GatePair { src, dst, packets })
            .collect(),
    })
}

async fn gate(State(m): State<AppState>, h: HeaderMap) -> Result<Response, Problem> {
    need(&h, &m.token)?;
    let g = gate_status(&m).await?;
    Ok(json_resp(StatusCode::OK, &to_value(&g), None))
}

/// The operator's console: devices, links and gate in one answer.
async fn status(State(m): State<AppState>, h: HeaderMap) -> Result<Response, Problem> {
    need(&h, &m.token)?;
    let gate = match m.function.gate() {
        Some(_) => Some(gate_status(&m).await?),
        None => None,
    };
    let s = MecStatus {
        operator: m.function.config().plmn.clone(),
        devices: m.function.device_status(),
        links: m.function.links(None),
        gate,
    };
    Ok(json_resp(StatusCode::OK, &to_value(&s), None))
}

#[derive(Debug, serde::Deserialize)]
struct Release {
    address: std::net::Ipv4Addr,
}

async fn peer_release(
    State(m): State<AppState>,
    h: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, Problem> {
    need(&h, &m.peer_token())?;
    let r: Release = parse(&body)?;
    m.peer_released(r.address).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RoamingAsk {
    device_id: String,
    device_token: String,
}

/// Home side of roaming: a visited operator asks for a device's subscription with the
/// device's own token.
async fn peer_roaming(
    State(m): State<AppState>,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    need(&h, &m.peer_token())?;
    let r: RoamingAsk = parse(&body)?;
    let s = m.function.roaming_profile(&r.device_id, &r.device_token)?;
    Ok(json_resp(StatusCode::OK, &to_value(&s), None))
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HomeRevocation {
    device_id: String,
    home_plmn: Plmn,
}

/// Visited side: the home operator revoked one of its devices.
async fn peer_revocation(
    State(m): State<AppState>,
    h: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, Problem> {
    need(&h, &m.peer_token())?;
    let r: HomeRevocation = parse(&body)?;
    m.home_revoked(&r.device_id, &r.home_plmn).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, serde::Deserialize)]
struct LocQuery {
    location_info: Option<String>,
}

fn loc(q: LocQuery) -> Result<String, Problem> {
    q.location_info.ok_or_else(|| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "query parameter location_info is required",
        )
    })
}

async fn q_uu_unicast(
    State(m): State<AppState>,
    h: HeaderMap,
    Query(q): Query<LocQuery>,
) -> Result<Response, Problem> {
    need(&h, &m.token)?;
    Ok(json_resp(
        StatusCode::OK,
        &m.vis.uu_unicast(&loc(q)?)?,
        None,
    ))
}

async fn q_uu_mbms(
    State(m): State<AppState>,
    h: HeaderMap,
    Query(q): Query<LocQuery>,
) -> Result<Response, Problem> {
    need(&h, &m.token)?;
    Ok(json_resp(StatusCode::OK, &m.vis.uu_mbms(&loc(q)?)?, None))
}

async fn q_pc5(
    State(m): State<AppState>,
    h: HeaderMap,
    Query(q): Query<LocQuery>,
) -> Result<Response, Problem> {
    need(&h, &m.token)?;
    Ok(json_resp(StatusCode::OK, &m.vis.pc5(&loc(q)?)?, None))
}

async fn predicted_qos(
    State(m): State<AppState>,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    need(&h, &m.token)?;
    Ok(json_resp(
        StatusCode::OK,
        &m.vis.predicted_qos(parse(&body)?)?,
        None,
    ))
}

async fn distribution_server(
    State(m): State<AppState>,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    need(&h, &m.token)?;
    Ok(json_resp(
        StatusCode::OK,
        &m.vis.distribution_server(&parse(&body)?)?,
        None,
    ))
}

async fn publish(
    State(m): State<AppState>,
    h: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, Problem> {
    need(&h, &m.token)?;
    let ds = m.vis.publish(&parse(&body)?)?;
    m.deliver(ds);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, serde::Deserialize)]
struct SubQuery {
    subscription_type: Option<String>,
}

async fn list_subs(
    State(m): State<AppState>,
    h: HeaderMap,
    Query(q): Query<SubQuery>,
) -> Result<Response, Problem> {
    need(&h, &m.token)?;
    Ok(json_resp(
        StatusCode::OK,
        &m.vis.list(q.subscription_type.as_deref())?,
        None,
    ))
}

async fn subscribe(
    State(m): State<AppState>,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    need(&h, &m.token)?;
    let (id, created, ds) = m.vis.subscribe(parse(&body)?).await?;
    m.deliver(ds);
    let (_, etag) = m.vis.get(&id)?;
    let mut r = json_resp(StatusCode::CREATED, &created, Some(etag));
    if let Some(l) = created["_links"]["self"]["href"]
        .as_str()
        .and_then(|s| s.parse().ok())
    {
        r.headers_mut().insert(header::LOCATION, l);
    }
    Ok(r)
}

async fn get_sub(
    State(m): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    need(&h, &m.token)?;
    let (b, etag) = m.vis.get(&id)?;
    Ok(json_resp(StatusCode::OK, &b, Some(etag)))
}

async fn put_sub(
    State(m): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Problem> {
    need(&h, &m.token)?;
    let if_match = h.get(header::IF_MATCH).and_then(|v| v.to_str().ok());
    let (b, etag) = m.vis.put(&id, parse(&body)?, if_match).await?;
    Ok(json_resp(StatusCode::OK, &b, Some(etag)))
}

async fn delete_sub(
    State(m): State<AppState>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    need(&h, &m.token)?;
    m.vis.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
