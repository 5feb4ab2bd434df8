//! Resource tables (docs/SHM.md): per host, the caller's tables with the agent's last
//! report — devices (processes and VMs), current grants, written entries' versions,
//! totals and the latest audit records. Read-only: a table is made with the API or
//! `vinfra resource-table create`; grants are the devices' own business on the host.

use api::{ApiError, AppState};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use model::resource_tables::ResourceTable;
use model::Role;

use crate::layout::{self, badge, wire};
use crate::session::Session;

/// Audit records shown per table (the report keeps up to 256).
const AUDIT_SHOWN: usize = 10;
/// Entry versions shown per table (the report keeps the lowest 1,024).
const VERSIONS_SHOWN: usize = 32;

async fn list(
    state: &AppState,
    s: &Session,
) -> Result<Vec<(String, Vec<ResourceTable>)>, ApiError> {
    s.caller
        .require(&[Role::Admin, Role::Member], "listing resource tables")?;
    let scope = s.caller.scope()?;
    let c = state.control();
    let mut out = Vec::new();
    for h in c.hosts().await? {
        let tables = c.resource_tables(scope, &h.name).await?;
        if !tables.is_empty() {
            out.push((h.name.to_string(), tables));
        }
    }
    Ok(out)
}

fn table(s: &Session, hosts: &[(String, Vec<ResourceTable>)]) -> Markup {
    html! {
        @if hosts.is_empty() {
            p #no-tables { "No resource tables. Make one with "
                code { "vinfra resource-table create NAME --host HOST --entries N --entry-size BYTES" } "." }
        }
        @for (host, tables) in hosts {
            section.host-tables data-host=(host) {
                h2 { "Host " (host) }
                @for t in tables { (one(s, t)) }
            }
        }
    }
}

fn one(s: &Session, t: &ResourceTable) -> Markup {
    let r = t.state.as_ref();
    html! {
        article.resource-table data-table=(t.name) {
            table {
                caption { "Resource table " strong { (t.name) } ": " (t.entries) " entries of " (t.entry_size)
                    " bytes, grants of at most " (t.max_grant_ms) " ms"
                    @if s.is_admin() { ", tenant " (t.tenant) } }
                tbody {
                    tr { th scope="row" { "State" } td {
                        @match r {
                            None => { (badge("pending")) " the agent has not reported it yet" }
                            Some(r) => {
                                @match &r.error {
                                    Some(e) => { (badge("failed")) " " span.error { (e) } }
                                    None => { (badge("serving")) " at " code { (r.socket) } " (reported " (layout::clock(r.reported_at)) ")" }
                                }
                            }
                        }
                    } }
                    @if let Some(r) = r {
                        tr { th scope="row" { "Totals" } td {
                            (r.totals.grants) " grants, " (r.totals.revokes) " revokes, "
                            (r.totals.refused) " refused requests, " (r.totals.refused_writes) " refused writes, "
                            (r.totals.rolled_back) " rolled back; " (r.written_entries) " entries written"
                        } }
                    }
                }
            }
            @if let Some(r) = r {
                table.devices {
                    caption { "Devices of " (t.name) " (" (r.devices.len()) ")" }
                    thead { tr { th scope="col" { "Device" } th scope="col" { "Kind" } th scope="col" { "PID" } th scope="col" { "Grants held" } } }
                    tbody {
                        @for d in &r.devices {
                            tr data-device=(d.id) {
                                th scope="row" { (d.id) }
                                td { @match &d.vm { Some(vm) => { "VM " (vm) }, None => "process" } }
                                td { (d.pid) } td { (d.grants) }
                            }
                        }
                    }
                }
                table.grants {
                    caption { "Current grants of " (t.name) " (" (r.grants.len()) ")" }
                    thead { tr { th scope="col" { "Entry" } th scope="col" { "Device" } th scope="col" { "Version when granted" }
                        th scope="col" { "Granted" } th scope="col" { "Time left" } } }
                    tbody {
                        @for g in &r.grants {
                            tr data-grant-entry=(g.entry) {
                                th scope="row" { (g.entry) } td { (g.device) } td { (g.version) }
                                td { (layout::clock(g.granted_at)) }
                                td { @match g.expires_in_ms { Some(ms) => { (ms / 1000) " s" }, None => "no limit" } }
                            }
                        }
                    }
                }
                table.versions {
                    caption { "Written entries of " (t.name) " and their versions (the first " (VERSIONS_SHOWN) ")" }
                    thead { tr { th scope="col" { "Entry" } th scope="col" { "Version" } } }
                    tbody {
                        @for v in r.versions.iter().take(VERSIONS_SHOWN) {
                            tr data-entry=(v.entry) { th scope="row" { (v.entry) } td { (v.version) } }
                        }
                    }
                }
                table.audit {
                    caption { "Latest audit of " (t.name) }
                    thead { tr { th scope="col" { "#" } th scope="col" { "At" } th scope="col" { "Device" }
                        th scope="col" { "Entry" } th scope="col" { "What" } th scope="col" { "Version" } } }
                    tbody {
                        @for a in r.audit.iter().rev().take(AUDIT_SHOWN) {
                            tr {
                                th scope="row" { (a.seq) } td { (layout::clock(a.at)) } td { (a.device) }
                                td { @match a.entry { Some(e) => (e), None => "—" } }
                                td { (wire(&a.kind))
                                    @if let Some(why) = &a.reason { " (" (why) ")" }
                                    @if let Some(h) = a.holder { " (held by " (h) ")" } }
                                td { (a.version) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `GET /ui/resource-tables`.
pub(crate) async fn page(State(state): State<AppState>, s: Session) -> Response {
    match list(&state, &s).await {
        Ok(hosts) => {
            let body = layout::live(
                "tables-live",
                "/ui/resource-tables/live",
                "resource tables",
                table(&s, &hosts),
            );
            layout::page(&s, "/ui/resource-tables", "Resource tables", None, body).into_response()
        }
        Err(e) => layout::error_page(&e),
    }
}

/// `GET /ui/resource-tables/live`.
pub(crate) async fn live(State(state): State<AppState>, s: Session) -> Response {
    layout::fragment(list(&state, &s).await.map(|h| table(&s, &h)))
}
