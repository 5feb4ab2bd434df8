//! Migrations: the table (state, downtime, bytes from peer and origin, blocks left,
//! hit ratio) and the destination's hit-ratio curve over time, plotted with uPlot from
//! the samples this server received (`api::AppState::curve`).

use std::collections::HashMap;

use api::{ApiError, AppState};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use maud::{html, Markup};
use model::{Migration, Role};

use crate::bench;
use crate::layout::{self, badge, bytes};
use crate::session::Session;

/// Curves on the list page's plot: the most recent migrations'.
const PLOTTED: usize = 6;

async fn list(state: &AppState, s: &Session) -> Result<Vec<Migration>, ApiError> {
    s.caller
        .require(&[Role::Admin, Role::Member], "listing migrations")?;
    Ok(state.control().migrations(s.caller.scope()?).await?)
}

fn row(m: &Migration) -> Markup {
    let p = m.progress.clone().unwrap_or_default();
    html! {
        tr data-migration=(m.id) {
            th scope="row" { a href={ "/ui/migrations/" (m.id) } { (m.vm_name) } }
            td { (m.from_host) " → " (m.to_host) }
            td { (m.strategy) @if m.precopy { " + pre-copy" } }
            td.state { (badge(m.state.as_str())) @if let Some(e) = &m.error { br; span.error { (e) } } }
            td { @match &m.qemu { Some(q) => { (q.downtime_ms) " ms" }, None => "—" } }
            td { (bytes(p.peer_bytes)) }
            td { (bytes(p.origin_bytes)) }
            td.left { (p.left) " of " (p.planned) }
            td.ratio { (format!("{:.1} %", p.hit_ratio * 100.0)) }
        }
    }
}

fn table(ms: &[Migration]) -> Markup {
    html! {
        table #migrations-table {
            caption { "Migrations (" (ms.len()) "), newest first, updated every second" }
            thead { tr {
                th scope="col" { "VM" } th scope="col" { "Hosts" } th scope="col" { "Strategy" }
                th scope="col" { "State" } th scope="col" { "Downtime" }
                th scope="col" { "From peer" } th scope="col" { "From origin" }
                th scope="col" { "Blocks left" } th scope="col" { "Hit ratio" }
            } }
            tbody { @for m in ms { (row(m)) } }
        }
    }
}

/// The completed migrations of each strategy side by side: how many, median downtime,
/// median time from switch-over to a warm cache, mean bytes from peer and origin, mean
/// hit ratio (the latest figures: the destination reports them for
/// `model::WARMUP_REPORT_MS` after completion). A comparison over this cluster's own migrations (workloads differ
/// between them), not a benchmark.
fn by_strategy(ms: &[Migration]) -> Markup {
    let mut groups: std::collections::BTreeMap<&str, Vec<&Migration>> = Default::default();
    for m in ms
        .iter()
        .filter(|m| m.state == model::MigrationState::Completed)
    {
        groups.entry(m.strategy.as_str()).or_default().push(m);
    }
    let median = |mut v: Vec<u64>| -> Option<u64> {
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    };
    html! {
        @if !groups.is_empty() {
            table #strategies-table {
                caption { "Completed migrations by cache fetch order (this cluster's own; workloads differ)" }
                thead { tr {
                    th scope="col" { "Strategy" } th scope="col" { "Migrations" }
                    th scope="col" { "Median downtime" } th scope="col" { "Median warm-up" }
                    th scope="col" { "Mean from peer" } th scope="col" { "Mean from origin" }
                    th scope="col" { "Mean hit ratio" }
                } }
                tbody {
                    @for (st, g) in &groups {
                        @let n = g.len() as u64;
                        @let p = |f: fn(&model::CacheProgress) -> u64| g.iter().filter_map(|m| m.progress.as_ref().map(f)).sum::<u64>() / n.max(1);
                        @let ratio = g.iter().filter_map(|m| m.progress.as_ref().map(|p| p.hit_ratio)).sum::<f64>() / g.len().max(1) as f64;
                        tr data-strategy=(st) {
                            th scope="row" { (st) }
                            td { (n) }
                            td { @match median(g.iter().filter_map(|m| m.qemu.as_ref().map(|q| q.downtime_ms)).collect()) { Some(d) => { (d) " ms" }, None => "—" } }
                            td { @match median(g.iter().filter_map(|m| Some(m.finished_at?.saturating_sub(m.switched_at?))).collect()) { Some(d) => { (d) " ms" }, None => "—" } }
                            td { (bytes(p(|x| x.peer_bytes))) }
                            td { (bytes(p(|x| x.origin_bytes))) }
                            td { (format!("{:.1} %", ratio * 100.0)) }
                        }
                    }
                }
            }
        }
    }
}

pub(crate) fn chart(id: &str, src: &str, label: &str) -> Markup {
    html! {
        figure.chart {
            div.plot id=(id) data-src=(src) role="img" aria-label=(label) {}
            figcaption { (label) }
        }
    }
}

/// The Migrations page, with `flash`, or with a refused upload's error and the text
/// typed.
pub(crate) async fn respond(
    state: &AppState,
    s: &Session,
    flash: Option<&str>,
    err: Option<(&layout::FormError, axum::http::StatusCode)>,
    typed: &str,
) -> Response {
    let loaded = async { Ok::<_, ApiError>((list(state, s).await?, bench::load(state, s).await?)) };
    match loaded.await {
        Ok((ms, doc)) => {
            let body = html! {
                (chart("curves", "/ui/migrations/curves.json",
                    "Destination cache hit ratio after switch-over, one curve per recent migration (seconds since its first report)"))
                (layout::live("migrations-live", "/ui/migrations/live", "migrations", html! {
                    (table(&ms))
                    (by_strategy(&ms))
                }))
                (bench::section(s, doc.as_ref(), err.map(|e| e.0), typed))
            };
            let page = layout::page(s, "/ui/migrations", "Migrations", flash, body);
            match err {
                Some((_, status)) => (status, page).into_response(),
                None => page.into_response(),
            }
        }
        Err(e) => layout::error_page(&e),
    }
}

/// `GET /ui/migrations`.
pub(crate) async fn page(
    State(state): State<AppState>,
    s: Session,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    respond(&state, &s, q.get("done").map(String::as_str), None, "").await
}

/// `GET /ui/migrations/live`.
pub(crate) async fn live(State(state): State<AppState>, s: Session) -> Response {
    layout::fragment(
        list(&state, &s)
            .await
            .map(|ms| html! { (table(&ms)) (by_strategy(&ms)) }),
    )
}

/// One curve for the plot: seconds since the first sample, hit ratio in percent.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Curve {
    pub label: String,
    pub state: String,
    pub x: Vec<f64>,
    pub y: Vec<f64>,
}

fn curve(state: &AppState, m: &Migration) -> Curve {
    let samples = state.curve(m.id);
    let t0 = samples.first().map(|s| s.at_ms).unwrap_or(0);
    Curve {
        label: format!("{} {} ({})", m.vm_name, m.strategy, m.state.as_str()),
        state: m.state.as_str().to_owned(),
        x: samples
            .iter()
            .map(|s| s.at_ms.saturating_sub(t0) as f64 / 1000.0)
            .collect(),
        y: samples.iter().map(|s| s.hit_ratio * 100.0).collect(),
    }
}

#[derive(Debug, serde::Serialize)]
pub(crate) struct Curves {
    pub series: Vec<Curve>,
}

/// `GET /ui/migrations/curves.json`: the recent migrations' curves.
pub(crate) async fn curves(State(state): State<AppState>, s: Session) -> Response {
    match list(&state, &s).await {
        Ok(ms) => Json(Curves {
            series: ms.iter().take(PLOTTED).map(|m| curve(&state, m)).collect(),
        })
        .into_response(),
        Err(e) => layout::error_page(&e),
    }
}

async fn one(state: &AppState, s: &Session, id: &str) -> Result<Migration, ApiError> {
    s.caller
        .require(&[Role::Admin, Role::Member], "reading a migration")?;
    Ok(state.control().migration(s.caller.scope()?, id).await?.0)
}

fn facts(m: &Migration) -> Markup {
    let p = m.progress.clone().unwrap_or_default();
    html! {
        dl.facts #migration-facts {
            dt { "VM" } dd { a href={ "/ui/vms/" (m.vm) } { (m.vm_name) } }
            dt { "Hosts" } dd { (m.from_host) " → " (m.to_host) }
            dt { "Strategy" } dd { (m.strategy) @if m.precopy { ", cache pre-copied (" (p.precopy_dropped) " blocks rewritten meanwhile, dropped)" } }
            dt { "State" } dd.state #migration-state { (badge(m.state.as_str())) }
            dt { "Downtime" } dd { @match &m.qemu { Some(q) => { (q.downtime_ms) " ms (QEMU, total " (q.total_ms) " ms)" }, None => "—" } }
            dt { "Bytes from peer" } dd { (bytes(p.peer_bytes)) }
            dt { "Bytes from origin" } dd { (bytes(p.origin_bytes)) }
            dt { "Blocks left" } dd { (p.left) " of " (p.planned) }
            dt { "Hit ratio" } dd { (format!("{:.1} %", p.hit_ratio * 100.0)) " (" (p.hits) " hits, " (p.misses) " misses)" }
            dt { "Started" } dd { (layout::clock(m.created_at)) " UTC" }
            @if let Some(f) = m.finished_at { dt { "Finished" } dd { (layout::clock(f)) " UTC" } }
            @if let Some(e) = &m.error { dt { "Error" } dd.error { (e) } }
        }
    }
}

/// `GET /ui/migrations/{id}`.
pub(crate) async fn show(
    State(state): State<AppState>,
    s: Session,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match one(&state, &s, &id).await {
        Ok(m) => {
            let body = html! {
                (chart("curve", &format!("/ui/migrations/{}/curve.json", m.id),
                    "Destination cache hit ratio over time (seconds since the first report)"))
                (layout::live("migration-live", &format!("/ui/migrations/{}/live", m.id), "migration", facts(&m)))
            };
            let title = format!("Migration of {}", m.vm_name);
            layout::page(
                &s,
                "/ui/migrations",
                &title,
                q.get("done").map(String::as_str),
                body,
            )
            .into_response()
        }
        Err(e) => layout::error_page(&e),
    }
}

/// `GET /ui/migrations/{id}/live`.
pub(crate) async fn show_live(
    State(state): State<AppState>,
    s: Session,
    Path(id): Path<String>,
) -> Response {
    layout::fragment(one(&state, &s, &id).await.map(|m| facts(&m)))
}

/// `GET /ui/migrations/{id}/curve.json`.
pub(crate) async fn curve_json(
    State(state): State<AppState>,
    s: Session,
    Path(id): Path<String>,
) -> Response {
    match one(&state, &s, &id).await {
        Ok(m) => Json(Curves {
            series: vec![curve(&state, &m)],
        })
        .into_response(),
        Err(e) => layout::error_page(&e),
    }
}
