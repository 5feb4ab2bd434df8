//! VMs: the list, create, start, stop, delete; one VM with its migrate form and its
//! serial console, followed.

use std::collections::HashMap;

use api::{ApiError, AppState};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use model::{DesiredState, Host, Role, Vm};

use crate::hosts::strategy_field;
use crate::layout::{self, badge, field, form_error, Change, FormError};
use crate::session::Session;
use crate::{done, val, Fields};

struct VmsView {
    vms: Vec<Vm>,
    hosts: Vec<Host>,
    /// Tenant names by id, for an admin's tenant column.
    tenants: HashMap<model::TenantId, String>,
}

async fn load(state: &AppState, s: &Session) -> Result<VmsView, ApiError> {
    let c = state.control();
    let vms = c.vms(s.caller.scope()?).await?;
    let mut hosts = c.hosts().await?;
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    let tenants = if s.is_admin() {
        c.tenants()
            .await?
            .into_iter()
            .map(|t| (t.id, t.name.to_string()))
            .collect()
    } else {
        HashMap::new()
    };
    Ok(VmsView {
        vms,
        hosts,
        tenants,
    })
}

fn action(s: &Session, vm: &Vm, verb: &str, label: &str) -> Markup {
    html! {
        form.inline method="post" action={ "/ui/vms/" (vm.id) "/" (verb) } {
            (layout::csrf(s))
            button type="submit" aria-label={ (label) " " (vm.name) } { (label) }
        }
    }
}

fn nics(vm: &Vm) -> Markup {
    html! {
        @for (i, n) in vm.nics.iter().enumerate() {
            @if i > 0 { br; }
            (n.network_name) " " (n.ip) "/" (n.prefix)
        }
    }
}

fn table(s: &Session, v: &VmsView) -> Markup {
    let admin = s.is_admin();
    html! {
        table #vms-table {
            caption { "VMs (" (v.vms.len()) "), updated every second" }
            thead { tr {
                th scope="col" { "Name" }
                @if admin { th scope="col" { "Tenant" } }
                th scope="col" { "State" }
                th scope="col" { "Desired" }
                th scope="col" { "Host" }
                th scope="col" { "vCPUs" }
                th scope="col" { "Memory" }
                th scope="col" { "NICs" }
                th scope="col" { "Actions" }
            } }
            tbody {
                @for vm in &v.vms {
                    tr data-vm=(vm.name) {
                        th scope="row" { a href={ "/ui/vms/" (vm.id) } { (vm.name) } }
                        @if admin { td { (v.tenants.get(&vm.tenant).map(String::as_str).unwrap_or("?")) } }
                        td.state {
                            (badge(vm.observed.as_str()))
                            @if vm.migration.is_some() { " " (badge("migrating")) }
                            @if let Some(e) = &vm.error { br; span.error { (e) } }
                        }
                        td { (vm.desired.as_str()) }
                        td.host { (vm.host) }
                        td { (vm.vcpus) }
                        td { (vm.memory_mib) " MiB" }
                        td { (nics(vm)) }
                        td.actions {
                            @if vm.desired != DesiredState::Running { (action(s, vm, "start", "Start")) }
                            @if vm.desired == DesiredState::Running { (action(s, vm, "stop", "Stop")) }
                            @if vm.desired != DesiredState::Deleted { (action(s, vm, "delete", "Delete")) }
                        }
                    }
                }
            }
        }
    }
}

const CREATE_FIELDS: [&str; 8] = [
    "name",
    "image",
    "vcpus",
    "memory_mib",
    "host",
    "tenant",
    "nics",
    "kernel_args",
];

fn create_form(s: &Session, v: &VmsView, err: Option<&FormError>, values: &Fields) -> Markup {
    let or = |k: &str, d: &'static str| {
        let x = val(values, k);
        if x.is_empty() {
            d.to_owned()
        } else {
            x.to_owned()
        }
    };
    html! {
        section aria-labelledby="create-h" {
            h2 #create-h { "Create a VM" }
            form.card #create-vm method="post" action="/ui/vms" {
                (layout::csrf(s))
                (form_error(err, "create"))
                (field(err, "name", "Name", html! {
                    input #name name="name" required value=(val(values, "name")) aria-describedby="name-error";
                }))
                (field(err, "image", "Image", html! {
                    input #image name="image" required value=(or("image", "default")) aria-describedby="image-error";
                }))
                (field(err, "vcpus", "vCPUs", html! {
                    input #vcpus name="vcpus" type="number" min="1" value=(or("vcpus", "1")) aria-describedby="vcpus-error";
                }))
                (field(err, "memory_mib", "Memory (MiB)", html! {
                    input #memory_mib name="memory_mib" type="number" min="16" value=(or("memory_mib", "256")) aria-describedby="memory_mib-error";
                }))
                (field(err, "host", "Host", html! {
                    select #host name="host" aria-describedby="host-error" {
                        option value="" { "the scheduler's choice" }
                        @for h in &v.hosts {
                            option value=(h.name) selected[h.name.as_str() == val(values, "host")] { (h.name) }
                        }
                    }
                }))
                (field(err, "nics", "NICs (network names, comma-separated)", html! {
                    input #nics name="nics" value=(val(values, "nics")) aria-describedby="nics-error";
                }))
                (field(err, "kernel_args", "Extra kernel arguments", html! {
                    input #kernel_args name="kernel_args" value=(val(values, "kernel_args")) aria-describedby="kernel_args-error";
                }))
                @if s.is_admin() {
                    (field(err, "tenant", "Tenant (empty: default)", html! {
                        input #tenant name="tenant" value=(val(values, "tenant")) aria-describedby="tenant-error";
                    }))
                }
                div.actions { button type="submit" { "Create" } }
            }
        }
    }
}

fn render(
    s: &Session,
    v: &VmsView,
    flash: Option<&str>,
    err: Option<&FormError>,
    values: &Fields,
) -> Markup {
    let body = html! {
        (form_error(err, "action"))
        (layout::live("vms-live", "/ui/vms/live", "virtual machines", table(s, v)))
        (create_form(s, v, err, values))
    };
    layout::page(s, "/ui/vms", "VMs", flash, body)
}

/// `GET /ui/vms`.
pub(crate) async fn page(
    State(state): State<AppState>,
    s: Session,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match load(&state, &s).await {
        Ok(v) => render(
            &s,
            &v,
            q.get("done").map(String::as_str),
            None,
            &Fields::new(),
        )
        .into_response(),
        Err(e) => layout::error_page(&e),
    }
}

/// `GET /ui/vms/live`.
pub(crate) async fn live(State(state): State<AppState>, s: Session) -> Response {
    layout::fragment(load(&state, &s).await.map(|v| table(&s, &v)))
}

fn number<T: std::str::FromStr>(form: &Fields, k: &str) -> Result<T, ApiError> {
    val(form, k)
        .trim()
        .parse()
        .map_err(|_| ApiError::Unprocessable(format!("{k}: must be a whole number")))
}

/// `POST /ui/vms`: create.
pub(crate) async fn create(State(state): State<AppState>, Change { s, form }: Change) -> Response {
    let r: Result<Vm, ApiError> = async {
        s.caller
            .require(&[Role::Admin, Role::Member], "creating a vm")?;
        let opt = |k: &str| Some(val(&form, k).trim().to_owned()).filter(|x| !x.is_empty());
        let body = model::api::CreateVm {
            name: val(&form, "name").trim().to_owned(),
            image: val(&form, "image").trim().to_owned(),
            vcpus: number(&form, "vcpus")?,
            memory_mib: number(&form, "memory_mib")?,
            host: opt("host"),
            tenant: opt("tenant"),
            nics: val(&form, "nics")
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(|n| model::api::NicRequest {
                    network: n.to_owned(),
                    name: None,
                    ip: None,
                })
                .collect(),
            kernel_args: opt("kernel_args"),
            ..Default::default()
        };
        let req = body.validate()?;
        let tenant = api::tenants::write_tenant(&state, &s.caller, req.tenant.as_ref()).await?;
        Ok(state.control().create_vm(tenant, &req).await?)
    }
    .await;
    match r {
        Ok(vm) => done("/ui/vms", &format!("VM {} created on {}", vm.name, vm.host)),
        Err(e) => {
            let fe = FormError::from_api("create", &e, &CREATE_FIELDS);
            match load(&state, &s).await {
                Ok(v) => (e.status().0, render(&s, &v, None, Some(&fe), &form)).into_response(),
                Err(e) => layout::error_page(&e),
            }
        }
    }
}

/// `POST /ui/vms/{id}/{start|stop|delete}`.
pub(crate) async fn act(
    State(state): State<AppState>,
    Path((id, verb)): Path<(String, String)>,
    Change { s, .. }: Change,
) -> Response {
    let r: Result<String, ApiError> = async {
        s.caller
            .require(&[Role::Admin, Role::Member], "changing a vm")?;
        let scope = s.caller.scope()?;
        let c = state.control();
        match verb.as_str() {
            "start" => {
                let vm = c.set_desired(scope, &id, DesiredState::Running).await?;
                Ok(format!("{} starting", vm.name))
            }
            "stop" => {
                let vm = c.set_desired(scope, &id, DesiredState::Stopped).await?;
                Ok(format!("{} stopping", vm.name))
            }
            "delete" => match c.delete_vm(scope, &id).await? {
                control::VmDeleted::Pending(vm) => Ok(format!("{} being deleted", vm.name)),
                control::VmDeleted::Removed(vm) => {
                    state.forget_console(vm.id);
                    Ok(format!("{} deleted", vm.name))
                }
            },
            other => Err(ApiError::NoRoute {
                path: format!("/ui/vms/{id}/{other}"),
            }),
        }
    }
    .await;
    match r {
        Ok(msg) => done("/ui/vms", &msg),
        Err(e) => {
            let fe = FormError::from_api("action", &e, &[]);
            match load(&state, &s).await {
                Ok(v) => (
                    e.status().0,
                    render(&s, &v, None, Some(&fe), &Fields::new()),
                )
                    .into_response(),
                Err(e) => layout::error_page(&e),
            }
        }
    }
}

fn detail(vm: &Vm) -> Markup {
    html! {
        dl.facts #vm-facts {
            dt { "State" } dd.state { (badge(vm.observed.as_str())) }
            dt { "Desired" } dd { (vm.desired.as_str()) }
            dt { "Host" } dd.host { (vm.host) }
            dt { "vCPUs, memory" } dd { (vm.vcpus) ", " (vm.memory_mib) " MiB" }
            dt { "NICs" } dd { @if vm.nics.is_empty() { "none" } @else { (nics(vm)) } }
            dt { "Migration" } dd {
                @match vm.migration {
                    Some(m) => a href={ "/ui/migrations/" (m) } { "in progress" },
                    None => "none",
                }
            }
            @if let Some(e) = &vm.error { dt { "Error" } dd.error { (e) } }
        }
    }
}

const MIGRATE_FIELDS: [&str; 3] = ["to", "strategy", "precopy"];

fn render_one(
    s: &Session,
    vm: &Vm,
    hosts: &[Host],
    console: &str,
    flash: Option<&str>,
    err: Option<&FormError>,
    values: &Fields,
) -> Markup {
    let body = html! {
        (layout::live("vm-live", &format!("/ui/vms/{}/live", vm.id), "VM state", detail(vm)))
        section aria-labelledby="migrate-h" {
            h2 #migrate-h { "Migrate" }
            form.card #migrate-form method="post" action={ "/ui/vms/" (vm.id) "/migrate" } {
                (layout::csrf(s))
                (form_error(err, "migrate"))
                (field(err, "to", "To host", html! {
                    select #to name="to" aria-describedby="to-error" {
                        @for h in hosts {
                            option value=(h.name) selected[h.name.as_str() == val(values, "to")] disabled[h.name == vm.host] { (h.name) }
                        }
                    }
                }))
                (strategy_field(err, val(values, "strategy")))
                (field(err, "precopy", "Pre-copy the cache", html! {
                    input #precopy type="checkbox" name="precopy" checked[val(values, "precopy") == "on"]
                        aria-describedby="precopy-error";
                }))
                div.actions { button type="submit" { "Migrate live" } }
            }
        }
        section aria-labelledby="console-h" {
            h2 #console-h { "Serial console (following)" }
            pre.console #console tabindex="0" hx-get={ "/ui/vms/" (vm.id) "/console" }
                hx-trigger="every 1s" hx-swap="innerHTML" { (console) }
        }
    };
    layout::page(s, "/ui/vms", &format!("VM {}", vm.name), flash, body)
}

async fn one(state: &AppState, s: &Session, id: &str) -> Result<(Vm, Vec<Host>), ApiError> {
    s.caller
        .require(&[Role::Admin, Role::Member], "reading a vm")?;
    let (vm, _) = state.control().vm(s.caller.scope()?, id).await?;
    let mut hosts = state.control().hosts().await?;
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((vm, hosts))
}

/// `GET /ui/vms/{id}`.
pub(crate) async fn show(
    State(state): State<AppState>,
    s: Session,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match one(&state, &s, &id).await {
        Ok((vm, hosts)) => {
            let console = state.console(vm.id);
            render_one(
                &s,
                &vm,
                &hosts,
                &console,
                q.get("done").map(String::as_str),
                None,
                &Fields::new(),
            )
            .into_response()
        }
        Err(e) => layout::error_page(&e),
    }
}

/// `GET /ui/vms/{id}/live`.
pub(crate) async fn show_live(
    State(state): State<AppState>,
    s: Session,
    Path(id): Path<String>,
) -> Response {
    layout::fragment(one(&state, &s, &id).await.map(|(vm, _)| detail(&vm)))
}

/// `GET /ui/vms/{id}/console`: the console tail, as text (escaped into the `<pre>`).
pub(crate) async fn console(
    State(state): State<AppState>,
    s: Session,
    Path(id): Path<String>,
) -> Response {
    match one(&state, &s, &id).await {
        Ok((vm, _)) => {
            let text = state.console(vm.id);
            (
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                html! { (text) },
            )
                .into_response()
        }
        Err(e) => layout::error_page(&e),
    }
}

/// `POST /ui/vms/{id}/migrate`.
pub(crate) async fn migrate(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Change { s, form }: Change,
) -> Response {
    let r: Result<model::Migration, ApiError> = async {
        s.caller
            .require(&[Role::Admin, Role::Member], "migrating a vm")?;
        let body = model::api::MigrateVm {
            to: val(&form, "to").to_owned(),
            strategy: Some(val(&form, "strategy").to_owned()).filter(|x| !x.is_empty()),
            precopy: val(&form, "precopy") == "on",
        };
        let (to, strategy) = body.validate()?;
        Ok(state
            .control()
            .start_migration(s.caller.scope()?, &id, &to, &strategy, body.precopy)
            .await?)
    }
    .await;
    match r {
        Ok(m) => done(
            &format!("/ui/migrations/{}", m.id),
            &format!(
                "migrating {} from {} to {}",
                m.vm_name, m.from_host, m.to_host
            ),
        ),
        Err(e) => {
            let fe = FormError::from_api("migrate", &e, &MIGRATE_FIELDS);
            match one(&state, &s, &id).await {
                Ok((vm, hosts)) => {
                    let console = state.console(vm.id);
                    (
                        e.status().0,
                        render_one(&s, &vm, &hosts, &console, None, Some(&fe), &form),
                    )
                        .into_response()
                }
                Err(e) => layout::error_page(&e),
            }
        }
    }
}
