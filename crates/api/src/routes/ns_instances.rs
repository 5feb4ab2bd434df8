//! Network-service instances: a stored NSD instantiated across sites,
//! each run by its own cloud-management software through its driver, with the link
//! establishment between the VNFs' connection points.
//!
//! `POST` checks everything it can at once (the NSD, the plan, the drivers), records the
//! instance as `instantiating` and answers 202; a background task runs the executor and
//! writes per-VNF and per-link progress into the record as it happens. The plan is stored
//! with the record, so `DELETE` can terminate after a server restart. The `vinfra` site is
//! this control plane, driven in process (`control::ns_site`) as the instance's tenant;
//! the request's token goes only into its link requests (the agents' relays check it),
//! and the server keeps no token.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use model::api::{
    CreateNsInstance, NsInstanceRecord, NsState, NsVnfStatus, Problem, ScaleNsInstance, SiteSpec,
};
use model::{Role, TenantId};
use nfv::driver::SiteDriver;
use store::Revision;

use crate::extract::AppPath;
use crate::routes::tenants::write_tenant;
use crate::{ApiError, AppJson, AppState, Caller, Scope};
use control::records::now_ms;

// Long enough for a TCG guest that is still booting to bring its CP up; a peer that never
// answers still fails with a reason after it.
const DEFAULT_LINK_DEADLINE_MS: u64 = 30_000;

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
    let token = crate::extract::bearer(&headers)
        .ok_or_else(|| ApiError::invariant("an authenticated request without a bearer token"))?
        .to_owned();
    let rec = instantiate(&state, &caller, &token, body).await?;
    Ok((StatusCode::ACCEPTED, Json(rec)))
}

/// Instantiates an NS for `caller`, whose `token` its link requests carry to the agents'
/// relays (the web UI calls this with its session's token); the record as the caller
/// may see it.
pub async fn instantiate(
    state: &AppState,
    caller: &Caller,
    token: &str,
    body: CreateNsInstance,
) -> Result<NsInstanceRecord, ApiError> {
    let token = token.to_owned();
    caller.require(
        &[Role::Admin, Role::Member],
        "instantiating a network service",
    )?;
    let endpoints = body.validate()?;
    let tenant = write_tenant(state, caller, None).await?;
    let (nsd_text, vnfd_texts) = load_nsd(state, tenant, &body.nsd).await?;
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
    let drivers = build_drivers(
        state,
        caller.role == Role::Admin,
        tenant,
        &body.sites,
        Some(&token),
    )
    .await?;
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
    let rec = state
        .control()
        .instantiate_ns(rec, plan, drivers, endpoints)
        .await?;
    Ok(redacted(rec))
}

/// The caller's NS instances.
#[utoipa::path(get, path = "/v1/ns-instances", operation_id = "list_ns_instances", tag = "nfv",
    responses((status = 200, body = Vec<NsInstanceRecord>)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<NsInstanceRecord>>, ApiError> {
    Ok(Json(list_for(&state, &caller).await?))
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
    AppPath(name): AppPath,
    q: Result<Query<DeleteParams>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    caller.require(
        &[Role::Admin, Role::Member],
        "terminating a network service",
    )?;
    let Query(q) = q.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    let scope = caller.scope()?;
    if q.forget {
        state.control().forget_ns(scope, &name).await?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let rec = terminate(&state, &caller, &name).await?;
    Ok((StatusCode::ACCEPTED, Json(rec)).into_response())
}

/// Starts terminating `caller`'s NS `name` on every site; the record as the caller may
/// see it.
pub async fn terminate(
    state: &AppState,
    caller: &Caller,
    name: &str,
) -> Result<NsInstanceRecord, ApiError> {
    caller.require(
        &[Role::Admin, Role::Member],
        "terminating a network service",
    )?;
    let scope = caller.scope()?;
    let (rec, _) = resolve(state, scope, name).await?;
    let drivers = build_drivers(
        state,
        caller.role == Role::Admin,
        rec.tenant,
        &rec.sites,
        None, // only an instantiate makes links
    )
    .await?;
    let rec = state
        .control()
        .terminate_ns(scope, name, state.server_id(), drivers)
        .await?;
    Ok(redacted(rec))
}

/// The NS instances `caller` sees, by tenant then name (site credentials redacted).
pub async fn list_for(
    state: &AppState,
    caller: &Caller,
) -> Result<Vec<NsInstanceRecord>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "listing network services")?;
    let mut out: Vec<NsInstanceRecord> = state
        .control()
        .ns_instances(caller.scope()?)
        .await?
        .into_iter()
        .map(redacted)
        .collect();
    out.sort_by(|a, b| (a.tenant, &a.name).cmp(&(b.tenant, &b.name)));
    Ok(out)
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
    AppPath(name): AppPath,
    AppJson(body): AppJson<ScaleNsInstance>,
) -> Result<(StatusCode, Json<NsInstanceRecord>), ApiError> {
    let rec = scale_by(&state, &caller, &name, body).await?;
    Ok((StatusCode::ACCEPTED, Json(rec)))
}

/// Starts scaling one VNF of `caller`'s NS `name` by one VDU; the record as the caller
/// may see it.
pub async fn scale_by(
    state: &AppState,
    caller: &Caller,
    name: &str,
    body: ScaleNsInstance,
) -> Result<NsInstanceRecord, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "scaling a network service")?;
    let scope = caller.scope()?;
    let (rec, _) = resolve(state, scope, name).await?;
    let drivers = build_drivers(
        state,
        caller.role == Role::Admin,
        rec.tenant,
        &rec.sites,
        None, // only an instantiate makes links
    )
    .await?;
    let rec = state
        .control()
        .scale_ns(
            scope,
            name,
            body.vnf,
            body.direction,
            state.server_id(),
            drivers,
        )
        .await?;
    Ok(redacted(rec))
}

pub(crate) async fn resolve(
    state: &AppState,
    scope: Scope,
    s: &str,
) -> Result<(NsInstanceRecord, Revision), ApiError> {
    Ok(state.control().ns_instance(scope, s).await?)
}

async fn load_nsd(
    state: &AppState,
    tenant: TenantId,
    id: &str,
) -> Result<(String, Vec<String>), ApiError> {
    state
        .control()
        .nsd_texts(tenant, id)
        .await?
        .ok_or_else(|| ApiError::Unprocessable(format!("nsd: no NSD named {id}")))
}

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

/// The console tails this server holds, for the in-process `vinfra` site.
impl control::ns_site::Consoles for AppState {
    fn tail(&self, vm: model::VmId) -> String {
        self.console(vm)
    }

    fn forget(&self, vm: model::VmId) {
        self.forget_console(vm);
    }
}

/// One driver per site. The `vinfra` site is this control plane, in process, as
/// `tenant`; `link_auth` is the token its link requests carry to the agents' relays
/// (none after a restart: a rollback or a terminate makes no link).
pub(crate) async fn build_drivers(
    state: &AppState,
    admin: bool,
    tenant: TenantId,
    sites: &BTreeMap<String, SiteSpec>,
    link_auth: Option<&str>,
) -> Result<BTreeMap<String, Arc<dyn SiteDriver>>, ApiError> {
    use nfv::driver::{kubernetes, libvirt, openstack};
    let mut out: BTreeMap<String, Arc<dyn SiteDriver>> = BTreeMap::new();
    for (name, spec) in sites {
        let d: Arc<dyn SiteDriver> = match spec {
            SiteSpec::Vinfra { host } => Arc::new(control::ns_site::LocalSite::new(
                state.control().clone(),
                Arc::new(state.clone()),
                control::ns_site::LocalSiteConfig {
                    tenant,
                    host: host.clone(),
                    poll: Duration::from_millis(200),
                    timeout: Duration::from_secs(180),
                    link_auth: link_auth.map(str::to_owned),
                },
            )),
            SiteSpec::Libvirt { uri, work_dir } => {
                if !admin {
                    return Err(ApiError::Forbidden(format!(
                        "sites.{name}: a libvirt site runs on the server's machine; only an admin may use one"
                    )));
                }
                // Images come from vinfra's own catalog, as the tenant sees it, their
                // files from this server's image store (libvirtd runs beside it: its
                // domain XML names local files). Images from before the store are left out.
                let blobs = state.blobs().ok_or(ApiError::ImageStoreOff)?;
                let images = state
                    .control()
                    .images(Scope::Tenant(tenant))
                    .await?
                    .into_iter()
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

/// Takes up the NS work this server left unfinished when it died (see
/// `Control::recover_ns`): an interrupted instantiate is rolled back, an interrupted
/// terminate finished. The `vinfra` sites act in process as the instance's tenant, so no
/// token is needed (none is minted).
pub(crate) async fn resume(state: &AppState) {
    for rec in state.control().recover_ns(state.server_id()).await {
        // It was accepted with these sites, libvirt ones included, when it was made.
        let drivers = build_drivers(state, true, rec.tenant, &rec.sites, None).await;
        match drivers {
            Ok(d) => state.control().resume_ns(rec, d),
            Err(e) => {
                tracing::error!(ns = %rec.name, error = %model::error_chain(&e), "cannot resume ns work");
                state
                    .control()
                    .fail_ns(rec, format!("cannot resume after a server restart: {e}"))
                    .await;
            }
        }
    }
}
