//! Prometheus text exposition: gauges computed from the store at scrape time,
//! and an HTTP request counter fed by a middleware.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use model::{HostState, ObservedState};
use tracing::Instrument;

use crate::AppState;

/// Requests by (method, route template, status). Keys use the matched route
/// template (`/v1/vms/{id}`), never the raw path, to bound cardinality.
#[derive(Debug, Default)]
pub(crate) struct HttpCounters {
    counts: Mutex<BTreeMap<(&'static str, String, u16), u64>>,
}

impl HttpCounters {
    fn incr(&self, method: &'static str, route: String, status: u16) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *counts.entry((method, route, status)).or_insert(0) += 1;
    }

    fn snapshot(&self) -> Vec<((&'static str, String, u16), u64)> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

/// Counts every request once its response is ready.
pub(crate) async fn count_requests(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let span = tracing::debug_span!("request", method, route = %route);
    let started = std::time::Instant::now();
    let res = next.run(req).instrument(span.clone()).await;
    let status = res.status().as_u16();
    span.in_scope(|| {
        tracing::debug!(
            status,
            elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "request done"
        );
    });
    state.http().incr(method, route, status);
    res
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Renders the exposition text.
pub(crate) fn render(
    hosts: &[(HostState, u64)],
    vms: &[(ObservedState, u64)],
    http: &HttpCounters,
    terminal_refusals: &std::collections::BTreeMap<&'static str, u64>,
) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP vinfra_hosts Registered hosts by liveness.");
    let _ = writeln!(out, "# TYPE vinfra_hosts gauge");
    for (state, n) in hosts {
        let _ = writeln!(out, "vinfra_hosts{{state=\"{}\"}} {n}", state.as_str());
    }
    let _ = writeln!(out, "# HELP vinfra_vms VMs by observed state.");
    let _ = writeln!(out, "# TYPE vinfra_vms gauge");
    for (state, n) in vms {
        let _ = writeln!(out, "vinfra_vms{{observed=\"{}\"}} {n}", state.as_str());
    }
    let _ = writeln!(
        out,
        "# HELP vinfra_http_requests_total HTTP requests by method, route and status."
    );
    let _ = writeln!(out, "# TYPE vinfra_http_requests_total counter");
    for ((method, route, status), n) in http.snapshot() {
        // Route templates contain no `"` or `\`, but escape anyway: the
        // format requires it and a future route must not break scrapes.
        let route = route.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(
            out,
            "vinfra_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP vinfra_terminal_refusals_total Terminal operation messages this server refused, by reason."
    );
    let _ = writeln!(out, "# TYPE vinfra_terminal_refusals_total counter");
    for (reason, n) in terminal_refusals {
        let _ = writeln!(
            out,
            "vinfra_terminal_refusals_total{{reason=\"{reason}\"}} {n}"
        );
    }
    out
}

/// Renders the exposition text a member sees: its own tenant's gauges only,
/// no host or HTTP counts (they describe every tenant).
pub(crate) fn render_tenant(vms: &[(ObservedState, u64)], networks: u64, images: u64) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "# HELP vinfra_tenant_vms This tenant's VMs by observed state."
    );
    let _ = writeln!(out, "# TYPE vinfra_tenant_vms gauge");
    for (state, n) in vms {
        let _ = writeln!(
            out,
            "vinfra_tenant_vms{{observed=\"{}\"}} {n}",
            state.as_str()
        );
    }
    let _ = writeln!(out, "# HELP vinfra_tenant_networks This tenant's networks.");
    let _ = writeln!(out, "# TYPE vinfra_tenant_networks gauge");
    let _ = writeln!(out, "vinfra_tenant_networks {networks}");
    let _ = writeln!(
        out,
        "# HELP vinfra_tenant_images This tenant's own images (public ones not counted)."
    );
    let _ = writeln!(out, "# TYPE vinfra_tenant_images gauge");
    let _ = writeln!(out, "vinfra_tenant_images {images}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let http = HttpCounters::default();
        http.incr("GET", "/v1/vms".into(), 200);
        http.incr("GET", "/v1/vms".into(), 200);
        let text = render(
            &[(HostState::Up, 2), (HostState::Down, 0)],
            &[(ObservedState::Running, 1)],
            &http,
            &[("bad_mac", 3)].into_iter().collect(),
        );
        assert!(text.contains("vinfra_hosts{state=\"up\"} 2\n"), "{text}");
        assert!(
            text.contains("vinfra_vms{observed=\"running\"} 1\n"),
            "{text}"
        );
        assert!(text.contains(
            "vinfra_http_requests_total{method=\"GET\",route=\"/v1/vms\",status=\"200\"} 2\n"
        ));
        assert!(
            text.contains("vinfra_terminal_refusals_total{reason=\"bad_mac\"} 3\n"),
            "{text}"
        );
    }
}
