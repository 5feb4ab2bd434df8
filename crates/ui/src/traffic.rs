//! Traffic (admin, as the API): the VM pairs by class, the per-VM counters, and the
//! per-class rates over time (the last 5 s of the vSwitch controller's counters, sampled
//! every second by the page and plotted with uPlot).

use api::{ApiError, AppState};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use maud::{html, Markup};
use model::Role;

use crate::layout::{self, badge, bytes, wire};
use crate::session::Session;

/// The window the rates are computed over, seconds.
const RATE_WINDOW_S: u64 = 5;

fn report(
    state: &AppState,
    s: &Session,
    window_s: Option<u64>,
) -> Result<net::TrafficReport, ApiError> {
    s.caller
        .require(&[Role::Admin], "reading traffic statistics")?;
    let Some(c) = state.traffic() else {
        return Err(ApiError::Conflict(
            "traffic statistics are off: start the server with --vswitch-listen".to_owned(),
        ));
    };
    Ok(c.traffic(&net::TrafficQuery {
        from: None,
        to: None,
        window_s,
    }))
}

fn vm_name(v: &Option<String>, mac: &impl std::fmt::Display) -> String {
    v.clone().unwrap_or_else(|| mac.to_string())
}

/// The VM pairs as a matrix: one row per sender, one column per receiver, each cell the
/// packets sent with their class (`-` where a pair never talked). At most `MATRIX_MAX`
/// VMs across, the busiest (the pair table below lists every pair).
fn matrix(r: &net::TrafficReport) -> Markup {
    const MATRIX_MAX: usize = 16;
    let mut weight: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for p in &r.pairs {
        *weight.entry(vm_name(&p.src_vm, &p.src_mac)).or_default() += p.packets;
        *weight.entry(vm_name(&p.dst_vm, &p.dst_mac)).or_default() += p.packets;
    }
    let mut vms: Vec<(String, u64)> = weight.into_iter().collect();
    vms.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    vms.truncate(MATRIX_MAX);
    vms.sort();
    let cell: std::collections::HashMap<(String, String), &net::controller::PairTraffic> = r
        .pairs
        .iter()
        .map(|p| {
            (
                (
                    vm_name(&p.src_vm, &p.src_mac),
                    vm_name(&p.dst_vm, &p.dst_mac),
                ),
                p,
            )
        })
        .collect();
    html! {
        table #traffic-matrix {
            caption { "Packets by VM pair: row sends, column receives" }
            thead { tr {
                th scope="col" { "From ↓ to →" }
                @for (v, _) in &vms { th scope="col" { (v) } }
            } }
            tbody {
                @for (src, _) in &vms {
                    tr data-src=(src) {
                        th scope="row" { (src) }
                        @for (dst, _) in &vms {
                            @match cell.get(&(src.clone(), dst.clone())) {
                                Some(p) => td data-dst=(dst) { (p.packets) " " (badge(&wire(&p.class))) },
                                None => td data-dst=(dst) { "-" },
                            }
                        }
                    }
                }
            }
        }
    }
}

fn tables(r: &net::TrafficReport) -> Markup {
    html! {
        (matrix(r))
        table #traffic-classes {
            caption { "Totals by class" }
            thead { tr { th scope="col" { "Class" } th scope="col" { "Packets" } th scope="col" { "Bytes" } } }
            tbody {
                @for c in &r.classes {
                    tr { th scope="row" { (wire(&c.class)) } td { (c.packets) } td { (bytes(c.bytes)) } }
                }
                tr { th scope="row" { "broadcast / multicast" } td { (r.flood.packets) } td { (bytes(r.flood.bytes)) } }
                tr { th scope="row" { "ARP / neighbour discovery" } td { (r.neighbor.packets) } td { (bytes(r.neighbor.bytes)) } }
            }
        }
        table #traffic-pairs {
            caption { "VM pairs (" (r.pairs.len()) "), largest first" }
            thead { tr {
                th scope="col" { "From" } th scope="col" { "To" } th scope="col" { "Class" }
                th scope="col" { "Packets" } th scope="col" { "Bytes" }
            } }
            tbody {
                @for p in &r.pairs {
                    tr {
                        th scope="row" { (vm_name(&p.src_vm, &p.src_mac)) }
                        td { (vm_name(&p.dst_vm, &p.dst_mac)) }
                        td { (badge(&wire(&p.class))) }
                        td { (p.packets) }
                        td { (bytes(p.bytes)) }
                    }
                }
            }
        }
        table #traffic-vms {
            caption { "By VM" }
            thead { tr {
                th scope="col" { "VM" } th scope="col" { "Sent" } th scope="col" { "Received" }
            } }
            tbody {
                @for v in &r.vms {
                    tr {
                        th scope="row" { (vm_name(&v.vm, &v.mac)) }
                        td { (v.tx.packets) " packets, " (bytes(v.tx.bytes)) }
                        td { (v.rx.packets) " packets, " (bytes(v.rx.bytes)) }
                    }
                }
            }
        }
    }
}

/// `GET /ui/traffic`.
pub(crate) async fn page(State(state): State<AppState>, s: Session) -> Response {
    let body = match report(&state, &s, None) {
        Ok(r) => html! {
            figure.chart {
                div.plot #rates data-src="/ui/traffic/rates.json" data-kind="rates" role="img"
                    aria-label="Bytes per second by traffic class, sampled every second" {}
                figcaption { "Bytes per second by class (last " (RATE_WINDOW_S) " s), since this page opened" }
            }
            (layout::live("traffic-live", "/ui/traffic/live", "traffic", tables(&r)))
        },
        Err(e) => html! { p.error role="alert" { (e.problem().detail) } },
    };
    layout::page(&s, "/ui/traffic", "Traffic", None, body).into_response()
}

/// `GET /ui/traffic/live`.
pub(crate) async fn live(State(state): State<AppState>, s: Session) -> Response {
    layout::fragment(report(&state, &s, None).map(|r| tables(&r)))
}

#[derive(Debug, serde::Serialize)]
struct Rate {
    class: String,
    bytes_per_s: f64,
}

#[derive(Debug, serde::Serialize)]
struct Rates {
    /// Unix seconds.
    t: u64,
    rates: Vec<Rate>,
}

/// `GET /ui/traffic/rates.json`: bytes per second by class over the last few seconds.
pub(crate) async fn rates(State(state): State<AppState>, s: Session) -> Response {
    match report(&state, &s, Some(RATE_WINDOW_S)) {
        Ok(r) => Json(Rates {
            t: control::now_ms() / 1000,
            rates: r
                .classes
                .iter()
                .map(|c| Rate {
                    class: wire(&c.class),
                    bytes_per_s: c.bytes as f64 / RATE_WINDOW_S as f64,
                })
                .collect(),
        })
        .into_response(),
        Err(e) => layout::error_page(&e),
    }
}
