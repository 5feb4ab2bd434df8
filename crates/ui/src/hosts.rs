//! Hosts: state, allocated against capacity, maintenance, their VMs; maintenance
//! enter (with a dry-run preview) and exit.

use std::collections::HashMap;

use api::{ApiError, AppState};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use model::{Host, Maintenance, Role, Vm};

use crate::layout::{self, badge, field, form_error, Change, FormError};
use crate::session::Session;
use crate::{done, val, Fields};

struct HostsView {
    hosts: Vec<Host>,
    /// Every VM for an admin; the member's own otherwise.
    vms: Vec<Vm>,
    sessions: Vec<Maintenance>,
}

async fn load(state: &AppState, s: &Session) -> Result<HostsView, ApiError> {
    let c = state.control();
    let mut hosts = c.hosts().await?;
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    let admin = s.caller.role == Role::Admin;
    if !admin {
        hosts = hosts.into_iter().map(Host::without_internals).collect();
    }
    let vms = c.vms(s.caller.scope()?).await?;
    // Maintenance sessions are an operator's: a member sees only that a host is cordoned.
    let sessions = if admin {
        c.maintenance_sessions().await?
    } else {
        Vec::new()
    };
    Ok(HostsView {
        hosts,
        vms,
        sessions,
    })
}

fn table(s: &Session, v: &HostsView) -> Markup {
    let admin = s.is_admin();
    html! {
        table #hosts-table {
            caption { "Hosts (" (v.hosts.len()) "), updated every second" }
            thead { tr {
                th scope="col" { "Host" }
                th scope="col" { "State" }
                th scope="col" { @if admin { "vCPUs allocated / schedulable" } @else { "Your vCPUs / schedulable" } }
                th scope="col" { @if admin { "Memory allocated / capacity" } @else { "Your memory / capacity" } }
                th scope="col" { "Maintenance" }
                th scope="col" { "VMs" }
            } }
            tbody {
                @for h in &v.hosts {
                    @let on: Vec<&Vm> = v.vms.iter().filter(|m| m.host == h.name).collect();
                    @let cpus: u64 = on.iter().map(|m| u64::from(m.vcpus)).sum();
                    @let mem: u64 = on.iter().map(|m| m.memory_mib).sum();
                    @let maint = h.maintenance.map(|id| {
                        v.sessions.iter().find(|m| m.id == id)
                            .map(|m| layout::wire(&m.state))
                            .unwrap_or_else(|| "cordoned".to_owned())
                    });
                    tr data-host=(h.name) {
                        th scope="row" { (h.name) }
                        td.state { (badge(h.state.as_str())) }
                        td {
                            meter min="0" max=(h.schedulable_vcpus()) value=(cpus)
                                aria-label={ "vCPUs on " (h.name) } {}
                            " " (cpus) " / " (h.schedulable_vcpus())
                        }
                        td {
                            meter min="0" max=(h.memory_mib) value=(mem)
                                aria-label={ "memory on " (h.name) } {}
                            " " (mem) " / " (h.memory_mib) " MiB"
                        }
                        td.maintenance {
                            @match &maint {
                                Some(m) => (badge(m)),
                                None => "—",
                            }
                        }
                        td.vms {
                            @for (i, m) in on.iter().enumerate() {
                                @if i > 0 { ", " }
                                a href={ "/ui/vms/" (m.id) } { (m.name) }
                            }
                        }
                    }
                }
            }
        }
    }
}

const MAINT_FIELDS: [&str; 3] = ["host", "to", "strategy"];

fn maintenance_form(
    s: &Session,
    v: &HostsView,
    err: Option<&FormError>,
    values: &Fields,
    preview: Option<&Maintenance>,
) -> Markup {
    let host = val(values, "host");
    let to = val(values, "to");
    let strategy = val(values, "strategy");
    html! {
        section aria-labelledby="maint-h" {
            h2 #maint-h { "Maintenance" }
            form.card #maintenance-form method="post" action="/ui/hosts/maintenance" {
                (layout::csrf(s))
                (form_error(err, "maintenance"))
                (field(err, "host", "Host", html! {
                    select #host name="host" aria-describedby="host-error" {
                        @for h in &v.hosts {
                            option value=(h.name) selected[h.name.as_str() == host] { (h.name) }
                        }
                    }
                }))
                (field(err, "to", "Move its VMs to", html! {
                    select #to name="to" aria-describedby="to-error" {
                        option value="" { "the scheduler's choice" }
                        @for h in &v.hosts {
                            option value=(h.name) selected[h.name.as_str() == to] { (h.name) }
                        }
                    }
                }))
                (strategy_field(err, strategy))
                div.actions {
                    button type="submit" name="action" value="preview" { "Preview (dry run)" }
                    button type="submit" name="action" value="enter" { "Enter maintenance" }
                    button type="submit" name="action" value="exit" { "Exit maintenance" }
                }
            }
            @if let Some(p) = preview {
                div #drain-plan role="status" {
                    h3 { "Dry run: draining " (p.host) " would move" }
                    @if p.items.is_empty() {
                        p { "no VM (the host is empty)." }
                    } @else {
                        table {
                            thead { tr { th scope="col" { "VM" } th scope="col" { "To" } th scope="col" { "How" } } }
                            tbody {
                                @for i in &p.items {
                                    tr { td { (i.vm_name) } td { (i.to) } td { @if i.live { "live migration" } @else { "cold move" } } }
                                }
                            }
                        }
                    }
                    p { "Nothing has changed yet." }
                }
            }
        }
    }
}

/// The strategy select shared with the migrate form.
pub(crate) fn strategy_field(err: Option<&FormError>, chosen: &str) -> Markup {
    let chosen = if chosen.is_empty() {
        model::api::DEFAULT_STRATEGY
    } else {
        chosen
    };
    field(
        err,
        "strategy",
        "Cache fetch order",
        html! {
            select #strategy name="strategy" aria-describedby="strategy-error" {
                @for st in model::api::STRATEGIES {
                    option value=(st) selected[st == chosen] { (st) }
                }
            }
        },
    )
}

fn render(
    s: &Session,
    v: &HostsView,
    flash: Option<&str>,
    err: Option<&FormError>,
    values: &Fields,
    preview: Option<&Maintenance>,
) -> Markup {
    let body = html! {
        (layout::live("hosts-live", "/ui/hosts/live", "hosts", table(s, v)))
        @if s.is_admin() {
            (maintenance_form(s, v, err, values, preview))
        }
    };
    layout::page(s, "/ui/hosts", "Hosts", flash, body)
}

/// `GET /ui/hosts`.
pub(crate) async fn page(
    State(state): State<AppState>,
    s: Session,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match load(&state, &s).await {
        Ok(v) => render(&s, &v, q.get("done").map(String::as_str), None, &q, None).into_response(),
        Err(e) => layout::error_page(&e),
    }
}

/// `GET /ui/hosts/live`: the table alone.
pub(crate) async fn live(State(state): State<AppState>, s: Session) -> Response {
    layout::fragment(load(&state, &s).await.map(|v| table(&s, &v)))
}

/// `POST /ui/hosts/maintenance`: preview, enter or exit.
pub(crate) async fn maintenance(
    State(state): State<AppState>,
    Change { s, form }: Change,
) -> Response {
    let r: Result<(Option<Maintenance>, String), ApiError> = async {
        s.caller
            .require(&[Role::Admin], "putting a host into maintenance")?;
        let host = model::validate_name("host", val(&form, "host"))?;
        let body = model::api::EnterMaintenance {
            to: Some(val(&form, "to").to_owned()).filter(|t| !t.is_empty()),
            dry_run: val(&form, "action") == "preview",
            strategy: Some(val(&form, "strategy").to_owned()).filter(|t| !t.is_empty()),
        };
        let c = state.control();
        match val(&form, "action") {
            "exit" => {
                c.exit_maintenance(&host).await?;
                Ok((None, format!("{host} released from maintenance")))
            }
            action => {
                let (to, strategy) = body.validate()?;
                let m = c
                    .enter_maintenance(&host, to.as_ref(), &strategy, body.dry_run)
                    .await?;
                if action == "preview" {
                    Ok((Some(m), String::new()))
                } else {
                    Ok((
                        None,
                        format!(
                            "{host} entering maintenance: {} VM(s) to move",
                            m.items.len()
                        ),
                    ))
                }
            }
        }
    }
    .await;
    match r {
        Ok((None, msg)) => done("/ui/hosts", &msg),
        Ok((Some(plan), _)) => match load(&state, &s).await {
            Ok(v) => render(&s, &v, None, None, &form, Some(&plan)).into_response(),
            Err(e) => layout::error_page(&e),
        },
        Err(e) => {
            let fe = FormError::from_api("maintenance", &e, &MAINT_FIELDS);
            match load(&state, &s).await {
                Ok(v) => {
                    (e.status().0, render(&s, &v, None, Some(&fe), &form, None)).into_response()
                }
                Err(e) => layout::error_page(&e),
            }
        }
    }
}
