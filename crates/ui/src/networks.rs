//! Tenant networks: the list with the NICs on each, create (name, CIDR), delete.

use std::collections::HashMap;

use api::{ApiError, AppState};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use model::{Network, Role, Vm};

use crate::layout::{self, field, form_error, Change, FormError};
use crate::session::Session;
use crate::{done, val, Fields};

async fn load(state: &AppState, s: &Session) -> Result<(Vec<Network>, Vec<Vm>), ApiError> {
    s.caller
        .require(&[Role::Admin, Role::Member], "listing networks")?;
    let scope = s.caller.scope()?;
    let c = state.control();
    Ok((c.networks(scope).await?, c.vms(scope).await?))
}

fn table(s: &Session, nets: &[Network], vms: &[Vm]) -> Markup {
    html! {
        table #networks-table {
            caption { "Networks (" (nets.len()) ")" }
            thead { tr {
                th scope="col" { "Network" } th scope="col" { "Subnet" }
                th scope="col" { "NICs" } th scope="col" { "Actions" }
            } }
            tbody {
                @for n in nets {
                    @let nics: Vec<(&Vm, &model::Nic)> = vms.iter()
                        .flat_map(|v| v.nics.iter().map(move |x| (v, x)))
                        .filter(|(_, x)| x.network == n.id)
                        .collect();
                    tr data-network=(n.name) {
                        th scope="row" { (n.name) }
                        td { (n.cidr) }
                        td {
                            @for (i, (v, x)) in nics.iter().enumerate() {
                                @if i > 0 { ", " }
                                a href={ "/ui/vms/" (v.id) } { (v.name) } " " (x.ip)
                            }
                        }
                        td {
                            form.inline method="post" action={ "/ui/networks/" (n.id) "/delete" } {
                                (layout::csrf(s))
                                button type="submit" aria-label={ "Delete network " (n.name) } { "Delete" }
                            }
                        }
                    }
                }
            }
        }
    }
}

const FIELDS: [&str; 3] = ["name", "cidr", "tenant"];

fn render(
    s: &Session,
    (nets, vms): (&[Network], &[Vm]),
    flash: Option<&str>,
    err: Option<&FormError>,
    values: &Fields,
) -> Markup {
    let body = html! {
        (form_error(err, "delete"))
        (layout::live("networks-live", "/ui/networks/live", "networks", table(s, nets, vms)))
        section aria-labelledby="net-h" {
            h2 #net-h { "Create a network" }
            form.card #network-form method="post" action="/ui/networks" {
                (layout::csrf(s))
                (form_error(err, "create"))
                (field(err, "name", "Name", html! {
                    input #name name="name" required value=(val(values, "name")) aria-describedby="name-error";
                }))
                (field(err, "cidr", "Subnet (CIDR)", html! {
                    input #cidr name="cidr" required placeholder="10.70.0.0/24" value=(val(values, "cidr")) aria-describedby="cidr-error";
                }))
                @if s.is_admin() {
                    (field(err, "tenant", "Tenant (empty: default)", html! {
                        input #tenant name="tenant" value=(val(values, "tenant")) aria-describedby="tenant-error";
                    }))
                }
                div.actions { button type="submit" { "Create" } }
            }
        }
    };
    layout::page(s, "/ui/networks", "Networks", flash, body)
}

async fn respond(
    state: &AppState,
    s: &Session,
    flash: Option<&str>,
    err: Option<(&FormError, axum::http::StatusCode)>,
    values: &Fields,
) -> Response {
    match load(state, s).await {
        Ok((nets, vms)) => {
            let page = render(s, (&nets, &vms), flash, err.map(|e| e.0), values);
            match err {
                Some((_, status)) => (status, page).into_response(),
                None => page.into_response(),
            }
        }
        Err(e) => layout::error_page(&e),
    }
}

/// `GET /ui/networks`.
pub(crate) async fn page(
    State(state): State<AppState>,
    s: Session,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    respond(
        &state,
        &s,
        q.get("done").map(String::as_str),
        None,
        &Fields::new(),
    )
    .await
}

/// `GET /ui/networks/live`.
pub(crate) async fn live(State(state): State<AppState>, s: Session) -> Response {
    layout::fragment(
        load(&state, &s)
            .await
            .map(|(nets, vms)| table(&s, &nets, &vms)),
    )
}

/// `POST /ui/networks`.
pub(crate) async fn create(State(state): State<AppState>, Change { s, form }: Change) -> Response {
    let r: Result<Network, ApiError> = async {
        s.caller
            .require(&[Role::Admin, Role::Member], "creating a network")?;
        let body = model::api::CreateNetwork {
            name: val(&form, "name").trim().to_owned(),
            cidr: val(&form, "cidr").trim().to_owned(),
            tenant: Some(val(&form, "tenant").trim().to_owned()).filter(|t| !t.is_empty()),
        };
        let (name, cidr, tenant) = body.validate()?;
        let tenant = api::tenants::write_tenant(&state, &s.caller, tenant.as_ref()).await?;
        Ok(state.control().create_network(tenant, name, cidr).await?)
    }
    .await;
    match r {
        Ok(n) => done(
            "/ui/networks",
            &format!("network {} ({}) created", n.name, n.cidr),
        ),
        Err(e) => {
            let fe = FormError::from_api("create", &e, &FIELDS);
            respond(&state, &s, None, Some((&fe, e.status().0)), &form).await
        }
    }
}

/// `POST /ui/networks/{id}/delete`.
pub(crate) async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Change { s, .. }: Change,
) -> Response {
    let r: Result<(), ApiError> = async {
        s.caller
            .require(&[Role::Admin, Role::Member], "deleting a network")?;
        Ok(state
            .control()
            .delete_network(s.caller.scope()?, &id)
            .await?)
    }
    .await;
    match r {
        Ok(()) => done("/ui/networks", "network deleted"),
        Err(e) => {
            let fe = FormError::from_api("delete", &e, &[]);
            respond(&state, &s, None, Some((&fe, e.status().0)), &Fields::new()).await
        }
    }
}
