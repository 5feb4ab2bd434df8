//! The last `vinfra bench migrate-cache` result on the Migrations page: the user uploads
//! the document the bench writes (`--result FILE`), the server checks it
//! (`model::bench::MigrateCacheResult::validate`) and keeps it in the store, one per
//! tenant (an admin's is the admins'), and the page plots it with uPlot: per workload,
//! one hit-ratio curve per fetch strategy. Nothing of it reaches another tenant.

use std::collections::HashMap;

use api::{ApiError, AppState};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use maud::{html, Markup};
use model::bench::MigrateCacheResult;
use model::Role;

use crate::layout::{self, bytes, field, form_error, Change, FormError};
use crate::migrations::{chart, Curve, Curves};
use crate::session::Session;
use crate::{done, val};

/// Upload size limit: the standard run's document is a few hundred KiB.
pub(crate) const UPLOAD_LIMIT: usize = 4 << 20;

/// Where the caller's tenant keeps its last result.
fn key(s: &Session) -> Result<String, ApiError> {
    s.caller
        .require(&[Role::Admin, Role::Member], "benchmark results")?;
    Ok(match s.caller.scope()? {
        control::Scope::All => "/vinfra/ui/bench-migrate-cache/admin".to_owned(),
        control::Scope::Tenant(t) => format!("/vinfra/ui/bench-migrate-cache/{t}"),
    })
}

fn store_err<E>(e: E) -> ApiError
where
    control::ControlError: From<E>,
{
    ApiError::from(control::ControlError::from(e))
}

/// The caller's tenant's last result, if it uploaded one.
pub(crate) async fn load(
    state: &AppState,
    s: &Session,
) -> Result<Option<MigrateCacheResult>, ApiError> {
    let Some(kv) = state.store().get(&key(s)?).await.map_err(store_err)? else {
        return Ok(None);
    };
    // Checked when uploaded; a document that no longer parses (a newer shape) is shown
    // as none rather than failing the page.
    Ok(std::str::from_utf8(&kv.value)
        .ok()
        .and_then(|t| MigrateCacheResult::parse(t).ok()))
}

/// The section of the Migrations page: the plots and the table of the last result, and
/// the upload form.
pub(crate) fn section(
    s: &Session,
    doc: Option<&MigrateCacheResult>,
    err: Option<&FormError>,
    typed: &str,
) -> Markup {
    html! {
        section #bench aria-labelledby="bench-title" {
            h2 #bench-title { "Last benchmark: cache fetch strategies compared" }
            @match doc {
                Some(d) => {
                    p #bench-meta {
                        "vinfra bench migrate-cache" @if d.quick { " --quick" }
                        ", run at " (layout::clock(d.created_at_ms)) " UTC: destination hit ratio after the migration started, per workload, one curve per strategy ("
                        code { "no migration" } ": the same VM never moved)."
                    }
                    @for (i, w) in d.workloads().iter().enumerate() {
                        (chart(&format!("bench-{i}"), &format!("/ui/migrations/bench.json?workload={i}"),
                            &format!("Workload {w}: hit ratio over time by strategy (seconds since the migration started)")))
                    }
                    table #bench-table {
                        caption { "The benchmark's rows" }
                        thead { tr {
                            th scope="col" { "Workload" } th scope="col" { "Strategy" }
                            th scope="col" { "Time to warm" } th scope="col" { "From peer" }
                            th scope="col" { "From origin" }
                        } }
                        tbody {
                            @for r in &d.rows {
                                tr data-bench=(format!("{}/{}", r.workload, r.strategy)) {
                                    th scope="row" { (r.workload) }
                                    td { (r.strategy) }
                                    td { @match r.time_to_warm_s { Some(t) => { (format!("{t:.1} s")) }, None => "—" } }
                                    td { (bytes(r.peer_bytes)) }
                                    td { (bytes(r.origin_bytes)) }
                                }
                            }
                        }
                    }
                }
                None => p #bench-meta { "No benchmark result uploaded by this tenant yet." }
            }
            form #bench-form method="post" action="/ui/migrations/bench" {
                (layout::csrf(s))
                (form_error(err, "bench"))
                (field(err, "doc", "Result document (the JSON of vinfra bench migrate-cache --result FILE)", html! {
                    textarea #doc name="doc" rows="4" aria-describedby="doc-error doc-help" spellcheck="false" { (typed) }
                }))
                div.field {
                    label for="doc-file" { "or read it from a file" }
                    input #doc-file type="file" accept=".json,application/json" aria-describedby="doc-help";
                }
                p.help #doc-help { "Replaces this tenant's last result; only this tenant sees it." }
                button type="submit" { "Upload the result" }
            }
        }
    }
}

/// `GET /ui/migrations/bench.json?workload=I`: the curves of the `I`th workload.
pub(crate) async fn curves(
    State(state): State<AppState>,
    s: Session,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let r: Result<Curves, ApiError> = async {
        let doc = load(&state, &s).await?;
        let i: usize = q
            .get("workload")
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| ApiError::BadRequest("workload: must be an index".to_owned()))?;
        let series = doc
            .as_ref()
            .and_then(|d| d.workloads().get(i).map(|w| (*w).to_owned()))
            .map(|w| {
                let d = doc.as_ref().map_or(&[][..], |d| &d.rows[..]);
                d.iter()
                    .filter(|r| r.workload == w)
                    .map(|r| Curve {
                        label: r.strategy.clone(),
                        state: "bench".to_owned(),
                        x: r.curve.iter().map(|p| p[0]).collect(),
                        y: r.curve.iter().map(|p| p[1] * 100.0).collect(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Curves { series })
    }
    .await;
    match r {
        Ok(c) => Json(c).into_response(),
        Err(e) => layout::error_page(&e),
    }
}

/// `POST /ui/migrations/bench`: checks and keeps the uploaded document.
pub(crate) async fn upload(
    State(state): State<AppState>,
    Change { s, form }: Change<UPLOAD_LIMIT>,
) -> Response {
    let r: Result<MigrateCacheResult, ApiError> = async {
        let key = key(&s)?;
        let text = val(&form, "doc").trim();
        if text.is_empty() {
            return Err(ApiError::BadRequest(
                "doc: paste the result document or choose its file".to_owned(),
            ));
        }
        let doc =
            MigrateCacheResult::parse(text).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let bytes = serde_json::to_vec(&doc)
            .map_err(|e| ApiError::invariant(format!("cannot encode a checked result: {e}")))?;
        state
            .store()
            .put(&key, bytes.into())
            .await
            .map_err(store_err)?;
        Ok(doc)
    }
    .await;
    match r {
        Ok(doc) => done(
            "/ui/migrations",
            &format!(
                "benchmark result uploaded ({} rows, {} workload{})",
                doc.rows.len(),
                doc.workloads().len(),
                if doc.workloads().len() == 1 { "" } else { "s" }
            ),
        ),
        Err(e) => {
            let fe = FormError::from_api("bench", &e, &["doc"]);
            crate::migrations::respond(
                &state,
                &s,
                None,
                Some((&fe, e.status().0)),
                val(&form, "doc"),
            )
            .await
        }
    }
}
