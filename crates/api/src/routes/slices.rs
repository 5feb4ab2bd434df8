//! Network slices: NSIs (over NS instances), client associations by slice type, the
//! 3GPP NSSF selection surface (TS 29.531 `Nnssf_NSSelection`), measured loads, and
//! the slice ledger (a transparency log: head, raw keys, proofs).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use model::api::Problem;
use model::slices::{
    Associate, Association, AuthorizedNetworkSliceInfo, CreateNsi, LedgerConsistency, LedgerHead,
    LedgerProof, LedgerRawKey, Nsi, SliceLoads, SliceLoadsRecorded, Snssai,
};
use model::Role;

use crate::extract::AppPath;
use crate::routes::tenants::write_tenant;
use crate::{ApiError, AppJson, AppState, Caller};

impl From<control::SliceError> for ApiError {
    fn from(e: control::SliceError) -> Self {
        use control::SliceError as E;
        match e {
            E::Control(c) => c.into(),
            e @ (E::NoInstance { .. } | E::NoRoom { .. }) => ApiError::Conflict(e.to_string()),
            e @ (E::NoNsInstance(_) | E::Proof(_)) => ApiError::Unprocessable(e.to_string()),
            e @ E::Ledger(_) => ApiError::internal("the slice ledger", e),
        }
    }
}

/// Creates a network slice instance over an NS instance of the tenant.
#[utoipa::path(post, path = "/v1/nsis", tag = "slices", request_body = CreateNsi,
    responses(
        (status = 201, body = Nsi),
        (status = 409, description = "name taken in the tenant", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "bad field, or no such NS instance", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create_nsi(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateNsi>,
) -> Result<(StatusCode, Json<Nsi>), ApiError> {
    caller.require(
        &[Role::Admin, Role::Member],
        "creating a network slice instance",
    )?;
    let v = body.validate()?;
    let tenant = write_tenant(&state, &caller, v.tenant.as_ref()).await?;
    let nsi = state.control().create_nsi(tenant, v).await?;
    Ok((StatusCode::CREATED, Json(nsi)))
}

/// The caller's network slice instances, with measured, forecast and allocated load.
#[utoipa::path(get, path = "/v1/nsis", tag = "slices", responses((status = 200, body = Vec<Nsi>)))]
pub(crate) async fn list_nsis(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Nsi>>, ApiError> {
    caller.require(
        &[Role::Admin, Role::Member],
        "listing network slice instances",
    )?;
    Ok(Json(state.control().nsis(caller.scope()?).await?))
}

/// One network slice instance, by name or id.
#[utoipa::path(get, path = "/v1/nsis/{nsi}", tag = "slices",
    params(("nsi" = String, Path, description = "NSI name or id")),
    responses((status = 200, body = Nsi), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get_nsi(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(nsi): AppPath,
) -> Result<Json<Nsi>, ApiError> {
    caller.require(
        &[Role::Admin, Role::Member],
        "reading a network slice instance",
    )?;
    Ok(Json(state.control().nsi(caller.scope()?, &nsi).await?))
}

/// Deletes a network slice instance (its associations stay in the ledger).
#[utoipa::path(delete, path = "/v1/nsis/{nsi}", tag = "slices",
    params(("nsi" = String, Path, description = "NSI name or id")),
    responses((status = 204, description = "deleted"), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn delete_nsi(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(nsi): AppPath,
) -> Result<StatusCode, ApiError> {
    caller.require(
        &[Role::Admin, Role::Member],
        "deleting a network slice instance",
    )?;
    state.control().delete_nsi(caller.scope()?, &nsi).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Associates a client with the NSI of the slice type that has room and the lowest
/// forecast utilization; the association is in the ledger when this answers.
#[utoipa::path(post, path = "/v1/slices/{type}/associations", tag = "slices", request_body = Associate,
    params(("type" = String, Path, description = "slice type: an SST (`1`) or `embb`, `urllc`, `miot`, `v2x`, `hmtc`, with an optional `-SD` (`1-000001`)")),
    responses(
        (status = 201, body = Association),
        (status = 409, description = "no NSI of the type, or none with room (the reason per NSI)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "bad type or client", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn associate(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(slice_type): AppPath,
    AppJson(body): AppJson<Associate>,
) -> Result<(StatusCode, Json<Association>), ApiError> {
    caller.require(
        &[Role::Admin, Role::Member],
        "associating a client with a slice",
    )?;
    let snssai = Snssai::parse_type(&slice_type)?;
    let client = body.validate()?;
    let tenant = write_tenant(&state, &caller, None).await?;
    let a = state.control().associate(tenant, &snssai, client).await?;
    Ok((StatusCode::CREATED, Json(a)))
}

/// The caller's associations of the slice type, oldest first.
#[utoipa::path(get, path = "/v1/slices/{type}/associations", tag = "slices",
    params(("type" = String, Path, description = "slice type, as for POST")),
    responses((status = 200, body = Vec<Association>), (status = 422, description = "bad type", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn list_associations(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(slice_type): AppPath,
) -> Result<Json<Vec<Association>>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "listing slice associations")?;
    let snssai = Snssai::parse_type(&slice_type)?;
    let all = state.control().slice_associations(caller.scope()?).await?;
    Ok(Json(
        all.into_iter()
            .filter(|a| a.snssai.serves(&snssai) || snssai.serves(&a.snssai))
            .collect(),
    ))
}

/// Takes one sampling period's measured load per NSI (admin): forecasts, allocates
/// each provider's pool and appends the allocations to the ledger.
#[utoipa::path(post, path = "/v1/slice-loads", tag = "slices", request_body = SliceLoads,
    responses(
        (status = 200, body = SliceLoadsRecorded),
        (status = 404, description = "no such NSI", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "bad load", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn record_loads(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<SliceLoads>,
) -> Result<Json<SliceLoadsRecorded>, ApiError> {
    caller.require(&[Role::Admin], "recording slice loads")?;
    body.validate()?;
    let allocations = state
        .control()
        .record_slice_loads_named(caller.scope()?, &body.loads)
        .await?;
    Ok(Json(SliceLoadsRecorded { allocations }))
}

/// TS 29.531 query of `GET /nnssf-nsselection/v2/network-slice-information`; the
/// slice-info parameters are JSON-encoded objects, as the specification has them.
#[derive(Debug, Clone, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct NssfParams {
    /// NF type of the consumer (`AMF`, `SMF`, `NSSF`, …).
    #[serde(rename = "nf-type")]
    #[param(rename = "nf-type")]
    nf_type: String,
    /// NF instance id of the consumer.
    #[serde(rename = "nf-id")]
    #[param(rename = "nf-id")]
    nf_id: String,
    /// JSON `SliceInfoForRegistration`.
    #[serde(rename = "slice-info-request-for-registration")]
    #[param(rename = "slice-info-request-for-registration")]
    registration: Option<String>,
    /// JSON `SliceInfoForPDUSession`.
    #[serde(rename = "slice-info-request-for-pdu-session")]
    #[param(rename = "slice-info-request-for-pdu-session")]
    pdu_session: Option<String>,
    /// JSON `SliceInfoForUEConfigurationUpdate`.
    #[serde(rename = "slice-info-request-for-ue-cu")]
    #[param(rename = "slice-info-request-for-ue-cu")]
    ue_cu: Option<String>,
    /// Home PLMN (JSON `PlmnId`; accepted, not used: one PLMN).
    #[serde(rename = "home-plmn-id")]
    #[param(rename = "home-plmn-id")]
    home_plmn_id: Option<String>,
    /// TAI (JSON `Tai`; accepted, not used: one tracking area).
    tai: Option<String>,
    /// Supported features (hex).
    #[serde(rename = "supported-features")]
    #[param(rename = "supported-features")]
    supported_features: Option<String>,
}

fn json_param<T: serde::de::DeserializeOwned>(name: &str, v: &str) -> Result<T, ApiError> {
    serde_json::from_str(v).map_err(|e| ApiError::BadRequest(format!("{name}: {e}")))
}

/// Network slice selection (TS 29.531 `Nnssf_NSSelection_Get`): exactly one of the
/// three request kinds. Registration and UE configuration update answer the allowed
/// S-NSSAIs among those requested (or subscribed), each with the NSI a request for it
/// gets now; a PDU session answers that NSI as `nsiInformation`. Read only: a client
/// is associated (and logged) by `POST /v1/slices/{type}/associations`.
#[utoipa::path(get, path = "/nnssf-nsselection/v2/network-slice-information", tag = "slices",
    params(NssfParams),
    responses(
        (status = 200, body = AuthorizedNetworkSliceInfo),
        (status = 400, description = "not exactly one request kind, or a parameter that is not the JSON object it should be", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "PDU session: no NSI serves the S-NSSAI, or none has room", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "bad S-NSSAI", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn nssf_selection(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<NssfParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuthorizedNetworkSliceInfo>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "selecting a network slice")?;
    let Query(q) = q.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    let _ = (
        &q.nf_type,
        &q.nf_id,
        &q.home_plmn_id,
        &q.tai,
        &q.supported_features,
    );
    let scope = caller.scope()?;
    let nrf = state.self_url().unwrap_or_default();
    let control = state.control();
    match (&q.registration, &q.pdu_session, &q.ue_cu) {
        (None, Some(p), None) => {
            let p: model::slices::SliceInfoForPduSession =
                json_param("slice-info-request-for-pdu-session", p)?;
            let snssai = p.s_nssai.validate("sNssai")?;
            let (chosen, _, _) = control.select_nsi(scope, &snssai).await?;
            Ok(Json(AuthorizedNetworkSliceInfo {
                nsi_information: Some(model::slices::NsiInformation {
                    nrf_id: nrf,
                    nsi_id: chosen.nsi,
                }),
                ..Default::default()
            }))
        }
        (Some(r), None, None) | (None, None, Some(r)) => {
            let name = if q.registration.is_some() {
                "slice-info-request-for-registration"
            } else {
                "slice-info-request-for-ue-cu"
            };
            let info: model::slices::SliceInfoForRegistration = json_param(name, r)?;
            let mut wanted: Vec<Snssai> = if info.requested_nssai.is_empty() {
                info.subscribed_nssai
                    .iter()
                    .map(|s| s.subscribed_snssai.clone())
                    .collect()
            } else {
                info.requested_nssai.clone()
            };
            for (i, s) in wanted.iter_mut().enumerate() {
                *s = s.validate(&format!("requestedNssai[{i}]"))?;
            }
            let mut answer = AuthorizedNetworkSliceInfo::default();
            let mut allowed = Vec::new();
            for s in wanted {
                match control.select_nsi(scope, &s).await {
                    Ok((chosen, _, _)) => allowed.push(model::slices::AllowedSnssai {
                        allowed_snssai: s.clone(),
                        nsi_information_list: vec![model::slices::NsiInformation {
                            nrf_id: nrf.clone(),
                            nsi_id: chosen.nsi,
                        }],
                    }),
                    Err(control::SliceError::NoInstance { .. } | control::SliceError::NoRoom { .. }) => {
                        answer.rejected_nssai_in_plmn.push(s)
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let mut configured: Vec<Snssai> = control
                .nsis(scope)
                .await?
                .into_iter()
                .map(|n| n.snssai)
                .collect();
            configured.sort();
            configured.dedup();
            answer.configured_nssai = configured
                .into_iter()
                .map(|s| model::slices::ConfiguredSnssai { configured_snssai: s })
                .collect();
            if !allowed.is_empty() {
                answer.allowed_nssai_list = vec![model::slices::AllowedNssai {
                    allowed_snssai_list: allowed,
                    access_type: "3GPP_ACCESS".into(),
                }];
            }
            Ok(Json(answer))
        }
        _ => Err(ApiError::BadRequest(
            "query: exactly one of slice-info-request-for-registration, slice-info-request-for-pdu-session, slice-info-request-for-ue-cu".into(),
        )),
    }
}

/// The slice ledger's latest signed checkpoint and announced keys.
#[utoipa::path(get, path = "/v1/ledger", tag = "slices", responses((status = 200, body = LedgerHead)))]
pub(crate) async fn ledger_head(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<LedgerHead>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "reading the slice ledger")?;
    Ok(Json(state.control().ledger_head().await?))
}

/// Every raw key of the slice ledger (admin), for an auditor to verify on its own.
#[utoipa::path(get, path = "/v1/ledger/entries", tag = "slices", responses((status = 200, body = Vec<LedgerRawKey>)))]
pub(crate) async fn ledger_entries(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<LedgerRawKey>>, ApiError> {
    caller.require(&[Role::Admin], "reading the slice ledger's entries")?;
    Ok(Json(state.control().ledger_raw().await?))
}

/// `GET /v1/ledger/proof`.
#[derive(Debug, Clone, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ProofParams {
    /// Entry index.
    index: u64,
    /// Tree size (default: the latest).
    size: Option<u64>,
}

/// An entry of the slice ledger with its inclusion proof (admin).
#[utoipa::path(get, path = "/v1/ledger/proof", tag = "slices", params(ProofParams),
    responses((status = 200, body = LedgerProof), (status = 422, description = "no such entry or size", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn ledger_proof(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<ProofParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<LedgerProof>, ApiError> {
    caller.require(&[Role::Admin], "reading slice ledger proofs")?;
    let Query(q) = q.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    Ok(Json(state.control().ledger_proof(q.index, q.size).await?))
}

/// `GET /v1/ledger/consistency`.
#[derive(Debug, Clone, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ConsistencyParams {
    /// Older tree size.
    from: u64,
    /// Newer tree size (default: the latest).
    to: Option<u64>,
}

/// The proof that the slice ledger at `from` entries is a prefix of it at `to`.
#[utoipa::path(get, path = "/v1/ledger/consistency", tag = "slices", params(ConsistencyParams),
    responses((status = 200, body = LedgerConsistency), (status = 422, description = "sizes the ledger does not have", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn ledger_consistency(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<ConsistencyParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<LedgerConsistency>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "reading slice ledger proofs")?;
    let Query(q) = q.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    Ok(Json(
        state.control().ledger_consistency(q.from, q.to).await?,
    ))
}
