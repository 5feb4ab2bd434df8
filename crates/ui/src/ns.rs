//! Network services: each NS instance as a topology (its VNFs per site, its links with
//! their states), instantiate from a stored NSD, terminate.

use std::collections::{BTreeMap, HashMap};

use api::{ApiError, AppState};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use model::api::{
    CreateNsInstance, NsInstanceRecord, ScaleDirection, ScaleNsInstance, SiteSpec, StoredDescriptor,
};
use model::Role;

use crate::layout::{self, badge, field, form_error, wire, Change, FormError};
use crate::session::Session;
use crate::{done, val, Fields};

/// The caller's NS instances, with the VMs (VDUs) of the caller's scope: a VNF's VDUs
/// are the VMs named `{ns}-{vnf}-…` of the NS's tenant.
async fn load(
    state: &AppState,
    s: &Session,
) -> Result<(Vec<NsInstanceRecord>, Vec<model::Vm>), ApiError> {
    let recs = api::ns::list_for(state, &s.caller).await?;
    let vms = state.control().vms(s.caller.scope()?).await?;
    Ok((recs, vms))
}

fn vdus<'a>(vms: &'a [model::Vm], r: &NsInstanceRecord, vnf: &str) -> Vec<&'a model::Vm> {
    let prefix = format!("{}-{vnf}-", r.name);
    vms.iter()
        .filter(|v| v.tenant == r.tenant && v.name.as_str().starts_with(&prefix))
        .collect()
}

async fn nsds(state: &AppState, s: &Session) -> Result<Vec<StoredDescriptor>, ApiError> {
    Ok(state
        .control()
        .descriptors(s.caller.scope()?, "nsd")
        .await?)
}

fn link_text(l: &serde_json::Value, k: &str) -> String {
    l[k].as_str().unwrap_or("?").to_owned()
}

fn topology(s: &Session, r: &NsInstanceRecord, vms: &[model::Vm]) -> Markup {
    let mut by_site: BTreeMap<&str, Vec<&model::api::NsVnfStatus>> = BTreeMap::new();
    for v in &r.vnfs {
        by_site.entry(v.site.as_str()).or_default().push(v);
    }
    html! {
        article.ns data-ns=(r.name) aria-labelledby={ "ns-" (r.name) } {
            h3 id={ "ns-" (r.name) } { (r.name) " " span.muted { "(" (r.nsd) ")" } " " (badge(&wire(&r.state))) }
            @if let Some(e) = &r.error { p.error { (e) } }
            div.sites {
                @for (site, vnfs) in &by_site {
                    section.site aria-label={ "site " (site) } {
                        h4 { "site " (site) }
                        ul {
                            @for v in vnfs {
                                @let on = vdus(vms, r, &v.vnf);
                                li data-vnf=(v.vnf) {
                                    (v.vnf) " " (badge(&v.state))
                                    " " span.vdus { (on.len()) " VDU" @if on.len() != 1 { "s" } }
                                    @if !on.is_empty() {
                                        ": "
                                        @for (i, vm) in on.iter().enumerate() {
                                            @if i > 0 { ", " }
                                            a href={ "/ui/vms/" (vm.id) } { (vm.name) } " on " (vm.host)
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if !r.links.is_empty() {
                table.links {
                    caption { "Links" }
                    thead { tr { th scope="col" { "Link" } th scope="col" { "Between" } th scope="col" { "State" } } }
                    tbody {
                        @for l in &r.links {
                            @let st = l["state"]["state"].as_str().unwrap_or("?");
                            tr data-link=(link_text(l, "link")) {
                                th scope="row" { (link_text(l, "link")) }
                                td { (link_text(l, "second_vnf")) "/" (link_text(l, "second_cp")) " → "
                                     (link_text(l, "first_vnf")) "/" (link_text(l, "first_cp")) }
                                td.state { (badge(st))
                                    @if let Some(why) = l["state"]["reason"].as_str() { br; span.error { (why) } } }
                            }
                        }
                    }
                }
            }
            div.actions {
                @let vnfs: std::collections::BTreeSet<&str> = r.vnfs.iter().map(|v| v.vnf.as_str()).collect();
                @for v in &vnfs {
                    form.inline method="post" action={ "/ui/ns/" (r.id) "/scale" } {
                        (layout::csrf(s))
                        input type="hidden" name="vnf" value=(v);
                        button type="submit" name="direction" value="out" aria-label={ "Scale " (v) " of " (r.name) " out" } { "Scale " (v) " out" }
                        button type="submit" name="direction" value="in" aria-label={ "Scale " (v) " of " (r.name) " in" } { "in" }
                    }
                }
                form.inline method="post" action={ "/ui/ns/" (r.id) "/terminate" } {
                    (layout::csrf(s))
                    button.terminate type="submit" aria-label={ "Terminate " (r.name) } { "Terminate" }
                }
            }
        }
    }
}

fn list(s: &Session, recs: &[NsInstanceRecord], vms: &[model::Vm]) -> Markup {
    html! {
        @if recs.is_empty() { p { "No network service instances." } }
        @for r in recs { (topology(s, r, vms)) }
    }
}

const FIELDS: [&str; 3] = ["name", "nsd", "sites"];

/// `site-a=vinfra:host-a` lines (or commas) into sites, as `vinfra ns instantiate
/// --site-map` reads them.
fn parse_sites(text: &str) -> Result<BTreeMap<String, SiteSpec>, ApiError> {
    let bad = |m: String| ApiError::Unprocessable(format!("sites: {m}"));
    let mut out = BTreeMap::new();
    for item in text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (name, spec) = item.split_once('=').ok_or_else(|| {
            bad(format!(
                "'{item}': expected NAME=vinfra[:HOST] or NAME=libvirt:URI:WORK_DIR"
            ))
        })?;
        let spec = match spec.split_once(':') {
            None if spec == "vinfra" => SiteSpec::Vinfra { host: None },
            Some(("vinfra", host)) => SiteSpec::Vinfra {
                host: Some(host.to_owned()),
            },
            Some(("libvirt", rest)) => {
                let (uri, work_dir) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| bad(format!("'{item}': libvirt needs URI:WORK_DIR")))?;
                SiteSpec::Libvirt {
                    uri: uri.to_owned(),
                    work_dir: work_dir.to_owned(),
                }
            }
            _ => {
                return Err(bad(format!(
                    "'{item}': unknown site driver (vinfra, libvirt)"
                )))
            }
        };
        out.insert(name.trim().to_owned(), spec);
    }
    if out.is_empty() {
        return Err(bad("name at least one site".to_owned()));
    }
    Ok(out)
}

fn render(
    s: &Session,
    (recs, vms): (&[NsInstanceRecord], &[model::Vm]),
    nsds: &[StoredDescriptor],
    flash: Option<&str>,
    err: Option<&FormError>,
    values: &Fields,
) -> Markup {
    let body = html! {
        (form_error(err, "terminate"))
        (layout::live("ns-live", "/ui/ns/live", "network services", list(s, recs, vms)))
        section aria-labelledby="inst-h" {
            h2 #inst-h { "Instantiate" }
            form.card #ns-form method="post" action="/ui/ns" {
                (layout::csrf(s))
                (form_error(err, "instantiate"))
                (field(err, "nsd", "NSD", html! {
                    select #nsd name="nsd" aria-describedby="nsd-error" {
                        @for d in nsds {
                            option value=(d.id) selected[d.id == val(values, "nsd")] { (d.id) }
                        }
                    }
                }))
                (field(err, "name", "Instance name", html! {
                    input #name name="name" required value=(val(values, "name")) aria-describedby="name-error";
                }))
                (field(err, "sites", "Sites (NAME=vinfra:HOST, one a line)", html! {
                    textarea #sites name="sites" rows="2" aria-describedby="sites-error" { (val(values, "sites")) }
                }))
                div.actions { button type="submit" { "Instantiate" } }
            }
        }
    };
    layout::page(s, "/ui/ns", "Network services", flash, body)
}

async fn render_with(
    state: &AppState,
    s: &Session,
    flash: Option<&str>,
    err: Option<(&FormError, axum::http::StatusCode)>,
    values: &Fields,
) -> Response {
    let r = async { Ok::<_, ApiError>((load(state, s).await?, nsds(state, s).await?)) }.await;
    match r {
        Ok(((recs, vms), ds)) => {
            let page = render(s, (&recs, &vms), &ds, flash, err.map(|e| e.0), values);
            match err {
                Some((_, status)) => (status, page).into_response(),
                None => page.into_response(),
            }
        }
        Err(e) => layout::error_page(&e),
    }
}

/// `GET /ui/ns`.
pub(crate) async fn page(
    State(state): State<AppState>,
    s: Session,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    render_with(
        &state,
        &s,
        q.get("done").map(String::as_str),
        None,
        &Fields::new(),
    )
    .await
}

/// `GET /ui/ns/live`.
pub(crate) async fn live(State(state): State<AppState>, s: Session) -> Response {
    layout::fragment(
        load(&state, &s)
            .await
            .map(|(recs, vms)| list(&s, &recs, &vms)),
    )
}

/// `POST /ui/ns`: instantiate.
pub(crate) async fn instantiate(
    State(state): State<AppState>,
    Change { s, form }: Change,
) -> Response {
    let r: Result<NsInstanceRecord, ApiError> = async {
        s.caller.require(
            &[Role::Admin, Role::Member],
            "instantiating a network service",
        )?;
        let body = CreateNsInstance {
            name: val(&form, "name").trim().to_owned(),
            nsd: val(&form, "nsd").trim().to_owned(),
            sites: parse_sites(val(&form, "sites"))?,
            endpoints: BTreeMap::new(),
            link_deadline_ms: None,
        };
        api::ns::instantiate(&state, &s.caller, &s.token, body).await
    }
    .await;
    match r {
        Ok(rec) => done("/ui/ns", &format!("instantiating {}", rec.name)),
        Err(e) => {
            let fe = FormError::from_api("instantiate", &e, &FIELDS);
            render_with(&state, &s, None, Some((&fe, e.status().0)), &form).await
        }
    }
}

/// `POST /ui/ns/{id}/terminate`.
pub(crate) async fn terminate(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Change { s, .. }: Change,
) -> Response {
    let r: Result<NsInstanceRecord, ApiError> =
        async { api::ns::terminate(&state, &s.caller, &id).await }.await;
    match r {
        Ok(rec) => done("/ui/ns", &format!("terminating {}", rec.name)),
        Err(e) => {
            let fe = FormError::from_api("terminate", &e, &[]);
            render_with(&state, &s, None, Some((&fe, e.status().0)), &Fields::new()).await
        }
    }
}

/// `POST /ui/ns/{id}/scale`: one VNF out or in by one VDU.
pub(crate) async fn scale(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Change { s, form }: Change,
) -> Response {
    let r: Result<NsInstanceRecord, ApiError> = async {
        let direction = match val(&form, "direction") {
            "out" => ScaleDirection::Out,
            "in" => ScaleDirection::In,
            other => {
                return Err(ApiError::Unprocessable(format!(
                    "direction: must be out or in, got {other:?}"
                )))
            }
        };
        let body = ScaleNsInstance {
            vnf: val(&form, "vnf").to_owned(),
            direction,
        };
        api::ns::scale(&state, &s.caller, &id, body).await
    }
    .await;
    match r {
        Ok(rec) => done(
            "/ui/ns",
            &format!(
                "scaling {} {} {}",
                rec.name,
                val(&form, "vnf"),
                val(&form, "direction")
            ),
        ),
        Err(e) => {
            let fe = FormError::from_api("terminate", &e, &[]);
            render_with(&state, &s, None, Some((&fe, e.status().0)), &Fields::new()).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_maps_parse_like_the_cli() {
        let s = parse_sites("site-a=vinfra:host-a\nsite-b=vinfra:host-c").unwrap();
        assert_eq!(s.len(), 2);
        assert!(matches!(&s["site-a"], SiteSpec::Vinfra { host: Some(h) } if h == "host-a"));
        let e = parse_sites("site-a").unwrap_err();
        assert!(
            e.to_string().starts_with("sites: 'site-a': expected"),
            "{e}"
        );
        assert!(parse_sites(" ").is_err());
        assert!(parse_sites("a=k8s:x").is_err());
    }
}
