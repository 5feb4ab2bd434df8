//! Network-service instances: a stored NSD instantiated across sites,
//! each run by its own cloud-management software through its driver, with the link
//! establishment between the VNFs' connection points.
//!
//! `POST` checks everything it can at once (the NSD, the plan, the drivers), records the
//! instance as `instantiating` and answers 202; a background task runs the executor and
//! writes per-VNF and per-link progress into the record as it happens. The plan is stored
//! with the record, so `DELETE` can terminate after a server restart. Drivers act with the
//! token of the request that made them (the `vinfra` site is this control plane): the
//! server keeps no token.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use model::api::{
    CreateNsInstance, NsInstanceRecord, NsState, NsVnfStatus, Problem, ScaleDirection,
    ScaleNsInstance, SiteSpec, StoredDescriptor,
};
use model::{Image, Role, TenantId};
use nfv::driver::SiteDriver;
use nfv::ns::{NsExecutor, Progress};
use store::{Revision, StoreError};

use crate::extract::AppPath;
use crate::routes::tenants::write_tenant;
use crate::{ApiError, AppJson, AppState, Caller, Scope};
use control::records::{
    insert_named, keys, list_json, now_ms, remove_named, resolve_named, to_bytes,
};

// Long enough for a TCG guest that is still booting to bring its CP up; a peer that never
// answers still fails with a reason after it.
const DEFAULT_LINK_DEADLINE_MS: u64 = 30_000;

fn ns_key(id: uuid::Uuid) -> String {
    format!("{}{id}", keys::NS_INSTANCES)
}

/// What a record's background task is doing, if it has one.
fn busy(state: NsState) -> Option<&'static str> {
    match state {
        NsState::Instantiating => Some("instantiating"),
        NsState::Terminating => Some("terminating"),
        NsState::Scaling => Some("scaling"),
        NsState::Instantiated | NsState::Failed => None,
    }
}

fn redacted(mut r: NsInstanceRecord) -> NsInstanceRecord {
    r.sites = r
        .sites
        .iter()
        .map(|(k, v)| (k.clone(), v.redacted()))
        .collect();
    r
}

/// Instantiates a stored NSD across the given sites (202; follow with GET).
#[utoipa::path(post, path = "/v1/ns-instances", operation_id = "create_ns_instance", tag = "nfv", request_body = CreateNsInstance,
    responses(
        (status = 202, body = NsInstanceRecord),
        (status = 403, description = "a libvirt site needs an admin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "name taken", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "the body is over 2 MiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "bad field, unknown NSD, no site for a VNF", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "over the rate limit, or the server is already validating and planning as many descriptors as it runs at once; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    AppJson(body): AppJson<CreateNsInstance>,
) -> Result<(StatusCode, Json<NsInstanceRecord>), ApiError> {
    caller.require(
        &[Role::Admin, Role::Member],
        "instantiating a network service",
    )?;
    let endpoints = body.validate()?;
    let tenant = write_tenant(&state, &caller, None).await?;
    let (nsd_text, vnfd_texts) = load_nsd(&state, tenant, &body.nsd).await?;
    let sites: Vec<String> = body.sites.keys().cloned().collect();
    // Validating every stored descriptor and planning is the CPU-heavy part: off the
    // async workers, behind the same bound as descriptor uploads.
    let (nsd_id, ns_name, plan_sites) = (body.nsd.clone(), body.name.clone(), sites.clone());
    let plan = state
        .cpu()
        .run(crate::routes::descriptors::VALIDATING, move || {
            let (nsd, vnfds) = validate_nsd(&nsd_id, &nsd_text, &vnfd_texts)?;
            nfv::plan::plan_ns(&ns_name, &nsd, &vnfds, &plan_sites)
                .map_err(|e| ApiError::Unprocessable(format!("sites: {e}")))
        })
        .await??;
    let token = crate::extract::bearer(&headers)
        .ok_or_else(|| ApiError::invariant("an authenticated request without a bearer token"))?
        .to_owned();
    let drivers = build_drivers(&state, &caller, tenant, &body.sites, &token).await?;
    let name = model::validate_name("name", &body.name)?;
    let id = uuid::Uuid::new_v4();
    let rec = NsInstanceRecord {
        id: id.to_string(),
        tenant,
        name: name.clone(),
        nsd: body.nsd.clone(),
        state: NsState::Instantiating,
        sites: body.sites.clone(),
        endpoints: body.endpoints.clone(),
        link_deadline_ms: body.link_deadline_ms.unwrap_or(DEFAULT_LINK_DEADLINE_MS),
        vnfs: plan
            .sites
            .iter()
            .flat_map(|s| {
                s.vnfs.iter().map(|v| NsVnfStatus {
                    vnf: v.vnf.clone(),
                    site: s.site.clone(),
                    state: "pending".into(),
                    ready_ms: None,
                })
            })
            .collect(),
        links: Vec::new(),
        vnf_instances: Vec::new(),
        plan: serde_json::to_value(&plan)
            .map_err(|e| ApiError::internal("encoding an NS plan", e))?,
        cps: serde_json::Value::Null,
        error: None,
        elapsed_ms: None,
        created_at: now_ms(),
        runner: Some(state.server_id().to_owned()),
    };
    insert_named(
        state.store(),
        ns_key(id),
        keys::ns_name(tenant, &name),
        &rec,
        &id,
        || format!("name: ns instance {name} already exists"),
    )
    .await?;
    tracing::info!(ns = %name, %id, sites = ?sites, "instantiating network service");
    let deadline = Duration::from_millis(rec.link_deadline_ms);
    state.jobs().spawn(
        format!("instantiate ns {name}"),
        run_instantiate(
            state.clone(),
            rec.clone(),
            plan,
            NsExecutor::new(drivers, deadline),
            endpoints,
        ),
    );
    Ok((StatusCode::ACCEPTED, Json(redacted(rec))))
}

/// The caller's NS instances.
#[utoipa::path(get, path = "/v1/ns-instances", operation_id = "list_ns_instances", tag = "nfv",
    responses((status = 200, body = Vec<NsInstanceRecord>)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<NsInstanceRecord>>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "listing network services")?;
    let scope = caller.scope()?;
    let mut out: Vec<NsInstanceRecord> =
        list_json::<NsInstanceRecord>(state.store(), keys::NS_INSTANCES)
            .await?
            .into_iter()
            .map(|(r, _)| redacted(r))
            .filter(|r| scope.sees(r.tenant))
            .collect();
    out.sort_by(|a, b| (a.tenant, &a.name).cmp(&(b.tenant, &b.name)));
    Ok(Json(out))
}

/// One NS instance, by name or id, with its VNFs, links and SOL003 records.
#[utoipa::path(get, path = "/v1/ns-instances/{name}", operation_id = "get_ns_instance", tag = "nfv",
    params(("name" = String, Path, description = "instance name or id")),
    responses((status = 200, body = NsInstanceRecord), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(name): AppPath,
) -> Result<Json<NsInstanceRecord>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "reading a network service")?;
    Ok(Json(redacted(
        resolve(&state, caller.scope()?, &name).await?.0,
    )))
}

/// `DELETE /v1/ns-instances/{name}?forget=true`.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeleteParams {
    /// Remove the record without contacting the sites (after a terminate failed because a
    /// site is gone for good): whatever that site still holds is the caller's to clean.
    #[serde(default)]
    forget: bool,
}

/// Terminates an NS instance on every site (202; the record goes when every site is
/// empty, or turns `failed` with the reasons). With `forget=true` on a failed instance,
/// only the record goes (204).
#[utoipa::path(delete, path = "/v1/ns-instances/{name}", operation_id = "delete_ns_instance", tag = "nfv",
    params(("name" = String, Path, description = "instance name or id"), DeleteParams),
    responses(
        (status = 202, body = NsInstanceRecord),
        (status = 204, description = "forgotten (forget=true)"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "still instantiating or terminating", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    AppPath(name): AppPath,
    q: Result<Query<DeleteParams>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    caller.require(
        &[Role::Admin, Role::Member],
        "terminating a network service",
    )?;
    let Query(q) = q.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    let (mut rec, rev) = resolve(&state, caller.scope()?, &name).await?;
    if let Some(doing) = busy(rec.state) {
        return Err(ApiError::Conflict(format!(
            "ns instance {} is {doing}; wait for it to finish",
            rec.name
        )));
    }
    if q.forget {
        if rec.state != NsState::Failed {
            return Err(ApiError::Conflict(format!(
                "forget: ns instance {} is not failed; terminate it (DELETE without forget)",
                rec.name
            )));
        }
        let id: uuid::Uuid = rec
            .id
            .parse()
            .map_err(|e| ApiError::internal("stored ns instance id", e))?;
        return match remove_record(&state, id, &rec, Some(rev)).await {
            Ok(_) => {
                tracing::warn!(ns = %rec.name, "ns instance forgotten without terminate");
                Ok(StatusCode::NO_CONTENT.into_response())
            }
            Err(StoreError::Conflict { .. }) => Err(ApiError::Conflict(format!(
                "ns instance {} changed concurrently, retry",
                rec.name
            ))),
            Err(e) => Err(e.into()),
        };
    }
    let plan: nfv::plan::NsPlan = serde_json::from_value(rec.plan.clone())
        .map_err(|e| ApiError::internal(format!("decoding the plan of {}", rec.name), e))?;
    let token = crate::extract::bearer(&headers)
        .ok_or_else(|| ApiError::invariant("an authenticated request without a bearer token"))?
        .to_owned();
    let drivers = build_drivers(&state, &caller, rec.tenant, &rec.sites, &token).await?;
    rec.state = NsState::Terminating;
    rec.error = None;
    rec.runner = Some(state.server_id().to_owned());
    let id: uuid::Uuid = rec
        .id
        .parse()
        .map_err(|e| ApiError::internal("stored ns instance id", e))?;
    match state
        .store()
        .cas(&ns_key(id), Some(rev), to_bytes(&rec)?)
        .await
    {
        Ok(_) => {}
        Err(StoreError::Conflict { .. }) => {
            return Err(ApiError::Conflict(format!(
                "ns instance {} changed concurrently, retry",
                rec.name
            )))
        }
        Err(e) => return Err(e.into()),
    }
    let executor = NsExecutor::new(drivers, Duration::from_millis(rec.link_deadline_ms));
    let (st, r) = (state.clone(), rec.clone());
    state
        .jobs()
        .spawn(format!("terminate ns {}", rec.name), async move {
            match executor.terminate(&plan).await {
                Ok(()) => match remove_record(&st, id, &r, None).await {
                    Ok(_) => tracing::info!(ns = %r.name, "network service terminated"),
                    Err(e) => tracing::error!(ns = %r.name, error = %e, "cannot remove the record"),
                },
                Err(e) => {
                    let mut r = r;
                    r.state = NsState::Failed;
                    r.error = Some(format!("terminate: {}", model::error_chain(&e)));
                    save(&st, id, &r).await;
                }
            }
        });
    Ok((StatusCode::ACCEPTED, Json(redacted(rec))).into_response())
}

/// Scales one VNF of an instantiated NS out or in by one VDU (202; the state is
/// `scaling` until done; a failed scale-out is undone and reported in `error`).
#[utoipa::path(post, path = "/v1/ns-instances/{name}/scale", operation_id = "scale_ns_instance", tag = "nfv", request_body = ScaleNsInstance,
    params(("name" = String, Path, description = "instance name or id")),
    responses(
        (status = 202, body = NsInstanceRecord),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "not instantiated, or busy", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "unknown VNF", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn scale(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    AppPath(name): AppPath,
    AppJson(body): AppJson<ScaleNsInstance>,
) -> Result<(StatusCode, Json<NsInstanceRecord>), ApiError> {
    caller.require(&[Role::Admin, Role::Member], "scaling a network service")?;
    let (mut rec, rev) = resolve(&state, caller.scope()?, &name).await?;
    if rec.state != NsState::Instantiated {
        return Err(ApiError::Conflict(format!(
            "ns instance {} is {}; only an instantiated NS scales",
            rec.name,
            busy(rec.state).unwrap_or("failed")
        )));
    }
    if !rec.vnfs.iter().any(|v| v.vnf == body.vnf) {
        return Err(ApiError::Unprocessable(format!(
            "vnf: ns instance {} has no VNF {}",
            rec.name, body.vnf
        )));
    }
    let inst = nfv::ns::NsInstance {
        plan: serde_json::from_value(rec.plan.clone())
            .map_err(|e| ApiError::internal(format!("decoding the plan of {}", rec.name), e))?,
        cps: serde_json::from_value(rec.cps.clone()).unwrap_or_default(),
        links: Vec::new(),
        elapsed_ms: rec.elapsed_ms.unwrap_or(0),
    };
    let token = crate::extract::bearer(&headers)
        .ok_or_else(|| ApiError::invariant("an authenticated request without a bearer token"))?
        .to_owned();
    let drivers = build_drivers(&state, &caller, rec.tenant, &rec.sites, &token).await?;
    let id: uuid::Uuid = rec
        .id
        .parse()
        .map_err(|e| ApiError::internal("stored ns instance id", e))?;
    rec.state = NsState::Scaling;
    rec.error = None;
    rec.runner = Some(state.server_id().to_owned());
    match state
        .store()
        .cas(&ns_key(id), Some(rev), to_bytes(&rec)?)
        .await
    {
        Ok(_) => {}
        Err(StoreError::Conflict { .. }) => {
            return Err(ApiError::Conflict(format!(
                "ns instance {} changed concurrently, retry",
                rec.name
            )))
        }
        Err(e) => return Err(e.into()),
    }
    let executor = NsExecutor::new(drivers, Duration::from_millis(rec.link_deadline_ms));
    let (st, mut r) = (state.clone(), rec.clone());
    state
        .jobs()
        .spawn(format!("scale ns {}", rec.name), async move {
            let mut inst = inst;
            let out = body.direction == ScaleDirection::Out;
            let word = if out { "out" } else { "in" };
            match executor.scale(&mut inst, &body.vnf, out).await {
                Ok(vdu) => {
                    tracing::info!(ns = %r.name, vnf = body.vnf, vdu, "scaled {word}");
                    if let Ok(p) = serde_json::to_value(&inst.plan) {
                        r.plan = p;
                    }
                    r.cps = serde_json::to_value(&inst.cps).unwrap_or_default();
                    r.vnf_instances = r
                        .vnfs
                        .iter()
                        .filter_map(|v| inst.vnf_instance_sol003(&v.vnf))
                        .collect();
                }
                Err(e) => {
                    r.error = Some(format!(
                        "scale {word} of {} failed (nothing changed): {}",
                        body.vnf,
                        model::error_chain(&e)
                    ));
                }
            }
            r.state = NsState::Instantiated;
            save(&st, id, &r).await;
        });
    Ok((StatusCode::ACCEPTED, Json(redacted(rec))))
}

/// Marks instances a previous server process left mid-way as failed: their tasks died
/// with it. Their plans are stored, so `DELETE` cleans up every site.
pub(crate) async fn recover(state: &AppState) {
    let recs = match list_json::<NsInstanceRecord>(state.store(), keys::NS_INSTANCES).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot list ns instances");
            return;
        }
    };
    for (mut r, _) in recs {
        // Another server's work is that server's to declare interrupted.
        if r.runner.as_deref().is_some_and(|x| x != state.server_id()) {
            continue;
        }
        if let Some(doing) = busy(r.state) {
            let Ok(id) = r.id.parse::<uuid::Uuid>() else {
                continue;
            };
            // A VDU being added by an interrupted scale-out is not in the stored plan yet:
            // the message says so rather than promising a clean DELETE.
            let extra = if r.state == NsState::Scaling {
                " (a VDU being added may remain on its site)"
            } else {
                ""
            };
            r.error = Some(format!(
                "interrupted by a server restart while {doing}; DELETE it to remove what was made{extra}"
            ));
            r.state = NsState::Failed;
            save(state, id, &r).await;
        }
    }
}

/// Deletes a record and its name index (if it is still at `rev`, when given).
async fn remove_record(
    state: &AppState,
    id: uuid::Uuid,
    rec: &NsInstanceRecord,
    rev: Option<Revision>,
) -> Result<Revision, StoreError> {
    remove_named(
        state.store(),
        ns_key(id),
        keys::ns_name(rec.tenant, &rec.name),
        rev,
    )
    .await
}

async fn save(state: &AppState, id: uuid::Uuid, rec: &NsInstanceRecord) {
    let res = match to_bytes(rec) {
        Ok(b) => state.store().put(&ns_key(id), b).await.map(drop),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode an ns instance");
            return;
        }
    };
    if let Err(e) = res {
        tracing::error!(ns = %rec.name, error = %e, "cannot save ns instance progress");
    }
}

/// The background half of `POST`: runs the executor, folding its progress into the
/// stored record as it comes (one writer: this task).
async fn run_instantiate(
    state: AppState,
    rec: NsInstanceRecord,
    plan: nfv::plan::NsPlan,
    executor: NsExecutor,
    endpoints: BTreeMap<String, std::net::SocketAddr>,
) {
    let Ok(id) = rec.id.parse::<uuid::Uuid>() else {
        return;
    };
    let rec = Arc::new(tokio::sync::Mutex::new(rec));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
    let writer = {
        let (state, rec) = (state.clone(), rec.clone());
        tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                let mut r = rec.lock().await;
                match p {
                    Progress::VnfReady { vnf, ms, .. } => {
                        if let Some(v) = r.vnfs.iter_mut().find(|v| v.vnf == vnf) {
                            v.state = "ready".into();
                            v.ready_ms = Some(ms);
                        }
                    }
                    Progress::Link(l) => {
                        if let Ok(v) = serde_json::to_value(&l) {
                            r.links.retain(|x| x["link"] != v["link"]);
                            r.links.push(v);
                        }
                    }
                    Progress::NetworksReady { .. } | Progress::RollingBack => continue,
                }
                save(&state, id, &r).await;
            }
        })
    };
    let progress = move |p: Progress| {
        let _ = tx.send(p);
    };
    let result = executor.instantiate(&plan, &endpoints, &progress).await;
    drop(progress);
    let _ = writer.await;
    let mut r = rec.lock().await;
    match result {
        Ok(inst) => {
            r.state = NsState::Instantiated;
            r.elapsed_ms = Some(inst.elapsed_ms);
            r.cps = serde_json::to_value(&inst.cps).unwrap_or_default();
            r.links = inst
                .links
                .iter()
                .filter_map(|l| serde_json::to_value(l).ok())
                .collect();
            r.vnf_instances = r
                .vnfs
                .iter()
                .filter_map(|v| inst.vnf_instance_sol003(&v.vnf))
                .collect();
            tracing::info!(ns = %r.name, ms = inst.elapsed_ms, "network service instantiated");
        }
        Err(e) => {
            r.state = NsState::Failed;
            r.error = Some(model::error_chain(&e));
            for v in &mut r.vnfs {
                v.state = "rolled_back".into();
            }
            tracing::warn!(ns = %r.name, error = %model::error_chain(&e), "network service failed");
        }
    }
    save(&state, id, &r).await;
}

pub(crate) async fn resolve(
    state: &AppState,
    scope: Scope,
    s: &str,
) -> Result<(NsInstanceRecord, Revision), ApiError> {
    resolve_named::<uuid::Uuid, NsInstanceRecord>(
        state.store(),
        scope,
        s,
        "ns instance",
        keys::NS_NAMES,
        ns_key,
        |r| r.tenant,
    )
    .await
    .map_err(ApiError::from)
}

/// The text of the tenant's stored NSD `id` and of every stored VNFD it may import.
async fn load_nsd(
    state: &AppState,
    tenant: TenantId,
    id: &str,
) -> Result<(String, Vec<String>), ApiError> {
    let mine = |kind: &'static str| async move {
        Ok::<_, ApiError>(
            list_json::<StoredDescriptor>(state.store(), &keys::descriptors(kind))
                .await?
                .into_iter()
                .map(|(d, _)| d)
                .filter(|d| d.tenant == tenant)
                .collect::<Vec<_>>(),
        )
    };
    let vnfds = mine("vnfd")
        .await?
        .into_iter()
        .map(|d| d.descriptor)
        .collect();
    let text = mine("nsd")
        .await?
        .into_iter()
        .find(|d| d.id == id)
        .ok_or_else(|| ApiError::Unprocessable(format!("nsd: no NSD named {id}")))?
        .descriptor;
    Ok((text, vnfds))
}

/// Validates the stored NSD `id` against the stored VNFDs (CPU-heavy: run it in the
/// CPU pool).
fn validate_nsd(
    id: &str,
    text: &str,
    vnfd_texts: &[String],
) -> Result<(nfv::descriptor::Nsd, Vec<nfv::descriptor::Vnfd>), ApiError> {
    let vnfds: Vec<nfv::descriptor::Vnfd> = vnfd_texts
        .iter()
        .filter_map(|t| nfv::descriptor::validate_vnfd(t).ok())
        .collect();
    let nsd = nfv::descriptor::validate_nsd(text, &vnfds).map_err(|errs| {
        ApiError::Unprocessable(format!(
            "nsd: {id} no longer validates against the stored VNFDs: {}",
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ))
    })?;
    Ok((nsd, vnfds))
}

/// One driver per site, acting with `token` on this control plane.
async fn build_drivers(
    state: &AppState,
    caller: &Caller,
    tenant: TenantId,
    sites: &BTreeMap<String, SiteSpec>,
    token: &str,
) -> Result<BTreeMap<String, Arc<dyn SiteDriver>>, ApiError> {
    use nfv::driver::{kubernetes, libvirt, openstack, vinfra};
    let mut out: BTreeMap<String, Arc<dyn SiteDriver>> = BTreeMap::new();
    // The hosts' link relays, read by the server itself: a member's token does not
    // see them (hosts' internal addresses are for admins and agents), yet its NS
    // needs them to relay link requests into its own guests. The relay still
    // checks that the token may act on the VM. Hosts registering later are asked
    // of the API (and so found for admins only).
    let link_addrs: BTreeMap<String, String> =
        if sites.values().any(|s| matches!(s, SiteSpec::Vinfra { .. })) {
            list_json::<model::Host>(state.store(), keys::HOSTS)
                .await?
                .into_iter()
                .filter_map(|(h, _)| Some((h.name.to_string(), h.link_addr?)))
                .collect()
        } else {
            BTreeMap::new()
        };
    for (name, spec) in sites {
        let d: Arc<dyn SiteDriver> = match spec {
            SiteSpec::Vinfra { host } => {
                let base_url = state.self_url().ok_or_else(|| {
                    ApiError::Unprocessable(format!(
                        "sites.{name}: this server does not know its own URL (not started by serve)"
                    ))
                })?;
                Arc::new(
                    vinfra::VinfraDriver::new(vinfra::VinfraConfig {
                        base_url,
                        token: token.to_owned(),
                        host: host.clone(),
                        poll: Duration::from_millis(200),
                        timeout: Duration::from_secs(180),
                        link_addrs: link_addrs.clone(),
                    })
                    .map_err(|e| ApiError::internal("building the vinfra driver", e))?,
                )
            }
            SiteSpec::Libvirt { uri, work_dir } => {
                if caller.role != Role::Admin {
                    return Err(ApiError::Forbidden(format!(
                        "sites.{name}: a libvirt site runs on the server's machine; only an admin may use one"
                    )));
                }
                // Images come from vinfra's own catalog, as the tenant sees it, their
                // files from this server's image store (libvirtd runs beside it: its
                // domain XML names local files). Images from before the store are left out.
                let blobs = state.blobs().ok_or(ApiError::ImageStoreOff)?;
                let images = list_json::<Image>(state.store(), keys::IMAGES)
                    .await?
                    .into_iter()
                    .map(|(i, _)| i)
                    .filter(|i| i.tenant.is_none_or(|t| t == tenant))
                    .filter_map(|i| {
                        let files = i.blobs().ok()?;
                        Some((
                            i.name.to_string(),
                            libvirt::LibvirtImage {
                                kernel: blobs.path(files.kernel.as_ref()?),
                                initrd: files
                                    .initrd
                                    .as_ref()
                                    .map(|d| blobs.path(d))
                                    .unwrap_or_default(),
                                disk_template: blobs.path(files.disk_template.as_ref()?),
                                cmdline: i.cmdline,
                            },
                        ))
                    })
                    .collect();
                Arc::new(libvirt::LibvirtDriver::new(libvirt::LibvirtConfig {
                    uri: uri.clone(),
                    work_dir: work_dir.into(),
                    images,
                    domain_type: "qemu".into(),
                }))
            }
            SiteSpec::Openstack {
                auth_url,
                username,
                password,
                project,
                domain,
            } => Arc::new(openstack::OpenStackDriver::new(
                openstack::OpenStackConfig {
                    auth_url: auth_url.clone(),
                    username: username.clone(),
                    password: password.clone(),
                    project: project.clone(),
                    domain: domain.clone().unwrap_or_else(|| "Default".into()),
                    poll: Duration::from_secs(1),
                    timeout: Duration::from_secs(300),
                },
            )),
            SiteSpec::Kubernetes {
                api_url,
                token,
                namespace,
            } => Arc::new(kubernetes::KubernetesDriver::new(
                kubernetes::KubernetesConfig {
                    base_url: api_url.clone(),
                    token: token.clone(),
                    namespace: namespace.clone(),
                    poll: Duration::from_secs(1),
                    timeout: Duration::from_secs(300),
                },
            )),
        };
        out.insert(name.clone(), d);
    }
    Ok(out)
}
