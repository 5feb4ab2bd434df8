//! Route table and handlers.

pub(crate) mod blobs;
pub(crate) mod descriptors;
pub(crate) mod hosts;
pub(crate) mod images;
pub(crate) mod join;
pub(crate) mod maintenance;
pub(crate) mod meta;
pub(crate) mod migrations;
pub(crate) mod networks;
pub(crate) mod ns_instances;
pub(crate) mod operations;
pub(crate) mod resource_tables;
pub(crate) mod slices;
pub(crate) mod storage;
pub(crate) mod tenants;
pub(crate) mod terminals;
pub(crate) mod tokens;
pub(crate) mod traces;
pub(crate) mod traffic;
pub(crate) mod vms;

use axum::http::{Method, Uri};
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::Router;

use crate::{ApiError, AppState};

/// The user API's routes (the agent protocol is [`agent_table`]). The router is built
/// from these tables and the OpenAPI test probes both, so a route cannot be added
/// without the test seeing it.
pub(crate) fn table() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/v1/openapi.json", get(meta::openapi_doc)),
        ("/metrics", get(meta::metrics)),
        (
            "/v1/tenants",
            post(tenants::create_tenant).get(tenants::list_tenants),
        ),
        (
            "/v1/tokens",
            post(tokens::create_token).get(tokens::list_tokens),
        ),
        ("/v1/tokens/{id}", delete(tokens::revoke_token)),
        ("/v1/hosts", get(hosts::list_hosts)),
        ("/v1/hosts/{name}", get(hosts::get_host)),
        (
            "/v1/hosts/{name}/resource-tables",
            post(resource_tables::create).get(resource_tables::list),
        ),
        (
            "/v1/hosts/{name}/resource-tables/{table}",
            get(resource_tables::get).delete(resource_tables::delete),
        ),
        (
            "/v1/images",
            post(images::create_image).get(images::list_images),
        ),
        (
            "/v1/images/{name}",
            get(images::get_image).delete(images::delete_image),
        ),
        ("/v1/ca.pem", get(join::ca_pem)),
        ("/v1/join-tokens", post(join::create_join_token)),
        ("/v1/join", post(join::join)),
        ("/v1/blobs", post(blobs::upload).get(blobs::list)),
        ("/v1/blobs/import", post(blobs::import)),
        ("/v1/blobs/{digest}", get(blobs::download)),
        (
            "/v1/networks",
            post(networks::create_network).get(networks::list_networks),
        ),
        (
            "/v1/networks/{name}",
            get(networks::get_network).delete(networks::delete_network),
        ),
        ("/v1/vms", post(vms::create_vm).get(vms::list_vms)),
        ("/v1/vms/{id}", get(vms::get_vm).delete(vms::delete_vm)),
        ("/v1/vms/{id}/start", post(vms::start_vm)),
        ("/v1/vms/{id}/stop", post(vms::stop_vm)),
        ("/v1/vms/{id}/console", get(vms::console)),
        (
            "/v1/vms/{id}/trace",
            put(traces::set_trace).get(traces::get_trace),
        ),
        ("/v1/vms/{id}/migrate", post(migrations::migrate_vm)),
        ("/v1/migrations", get(migrations::list_migrations)),
        ("/v1/hosts/{name}/maintenance", post(maintenance::enter)),
        ("/v1/hosts/{name}/maintenance/exit", post(maintenance::exit)),
        ("/v1/maintenance", get(maintenance::list)),
        ("/v1/traffic", get(traffic::get_traffic)),
        (
            "/v1/storage",
            put(storage::put_storage).get(storage::get_storage),
        ),
        ("/v1/placements:explain", post(storage::explain)),
        (
            "/v1/vnfds",
            post(descriptors::create_vnfd).get(descriptors::list_vnfds),
        ),
        (
            "/v1/nsds",
            post(descriptors::create_nsd).get(descriptors::list_nsds),
        ),
        (
            "/v1/ns-instances",
            post(ns_instances::create).get(ns_instances::list),
        ),
        (
            "/v1/ns-instances/{name}",
            get(ns_instances::get).delete(ns_instances::delete),
        ),
        ("/v1/ns-instances/{name}/scale", post(ns_instances::scale)),
        ("/v1/operations", get(operations::list)),
        ("/v1/operations/{id}", get(operations::get)),
        ("/v1/operations/{id}/cancel", post(operations::cancel)),
        ("/v1/maintenance/{id}", get(maintenance::get)),
        ("/v1/maintenance/{id}/abort", post(maintenance::abort)),
        ("/v1/migrations/{id}", get(migrations::get_migration)),
        (
            "/v1/terminals",
            post(terminals::create).get(terminals::list),
        ),
        (
            "/v1/terminals/{terminal}",
            get(terminals::get).delete(terminals::delete),
        ),
        (
            "/v1/terminals/{terminal}/binding",
            put(terminals::bind).delete(terminals::unbind),
        ),
        (
            "/v1/terminals/{terminal}/operations",
            get(terminals::operations),
        ),
        ("/v1/terminal-operations", post(terminals::operation)),
        ("/v1/nsis", post(slices::create_nsi).get(slices::list_nsis)),
        (
            "/v1/nsis/{nsi}",
            get(slices::get_nsi).delete(slices::delete_nsi),
        ),
        (
            "/v1/slices/{type}/associations",
            post(slices::associate).get(slices::list_associations),
        ),
        ("/v1/slice-loads", post(slices::record_loads)),
        (
            "/nnssf-nsselection/v2/network-slice-information",
            get(slices::nssf_selection),
        ),
        ("/v1/ledger", get(slices::ledger_head)),
        ("/v1/ledger/entries", get(slices::ledger_entries)),
        ("/v1/ledger/proof", get(slices::ledger_proof)),
        ("/v1/ledger/consistency", get(slices::ledger_consistency)),
        ("/v1/terminal-sessions", get(terminals::session)),
    ]
}

/// The agent protocol: what node agents call (registration, heartbeats, assignments and
/// their event stream, observed state, migration reports and cache snapshots). Kept apart from the user
/// routes so that the two can be served, limited or moved separately; served on the same
/// listener today (same TLS, same tokens: these need an agent or admin token).
pub(crate) fn agent_table() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/v1/hosts", post(hosts::register_host)),
        ("/v1/hosts/{name}/heartbeat", post(hosts::heartbeat)),
        ("/v1/hosts/{name}/assignments", get(vms::assignments)),
        // A response that lasts as long as the connection (newline-delimited JSON).
        ("/v1/hosts/{name}/events", get(hosts::host_events)),
        ("/v1/vms/{id}/observed", put(vms::report_observed)),
        (
            "/v1/hosts/{name}/resource-tables/{table}/report",
            put(resource_tables::report),
        ),
        // Streamed into the blob store under its limit.
        ("/v1/vms/{id}/trace/data", put(traces::upload_trace)),
        (
            "/v1/migrations/{id}/report",
            put(migrations::report_migration),
        ),
        (
            "/v1/terminal-operations/{terminal}/{seq}/result",
            put(terminals::result),
        ),
        ("/v1/terminal-operations/results", post(terminals::results)),
        // The snapshot's limit is applied by the handler, which names it in the 413.
        (
            "/v1/migrations/{id}/snapshot",
            put(migrations::put_snapshot).get(migrations::get_snapshot),
        ),
    ]
}

/// Every route: the user API and the agent protocol.
#[cfg(test)]
pub(crate) fn all_routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    let mut routes = table();
    routes.extend(agent_table());
    routes
}

pub(crate) fn router(state: AppState) -> Router {
    let mut r = Router::new();
    for (path, route) in table() {
        r = r.route(path, route);
    }
    let mut agent = Router::new();
    for (path, route) in agent_table() {
        agent = agent.route(path, route);
    }
    let r = r.merge(agent);
    r.fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        // Inside the metrics layer, so that refusals are counted.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::limits::rate_limit,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::count_requests,
        ))
        .with_state(state)
}

async fn no_route(uri: Uri) -> ApiError {
    ApiError::NoRoute {
        path: uri.path().to_owned(),
    }
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::ServerConfig;
    use store::testing::MemStore;

    const METHODS: [Method; 5] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
    ];

    /// (METHOD, path) of every operation in the OpenAPI document.
    fn documented() -> BTreeSet<(String, String)> {
        let doc = serde_json::to_value(crate::openapi()).unwrap();
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if METHODS
                    .iter()
                    .any(|m| m.as_str().eq_ignore_ascii_case(method))
                {
                    out.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        out
    }

    /// Probes the router with every method on every table path: whatever is
    /// not 405 is served, and must be documented; and every documented
    /// operation must be served.
    #[tokio::test]
    async fn openapi_lists_every_route_and_nothing_else() {
        let store = Arc::new(MemStore::new());
        let app = router(AppState::new(store, &ServerConfig::default()));
        let mut served = BTreeSet::new();
        for (path, _) in all_routes() {
            let concrete = path
                .replace("{name}", "x")
                .replace("{nsi}", "x")
                .replace("{type}", "1")
                .replace("{id}", "00000000-0000-4000-8000-000000000000")
                .replace("{digest}", &format!("sha256:{}", "0".repeat(64)));
            for m in METHODS {
                let req = Request::builder()
                    .method(m.clone())
                    .uri(&concrete)
                    .body(Body::empty())
                    .unwrap();
                let res = app.clone().oneshot(req).await.unwrap();
                assert_ne!(res.status(), StatusCode::NOT_FOUND, "{m} {concrete}");
                if res.status() != StatusCode::METHOD_NOT_ALLOWED {
                    served.insert((m.to_string(), path.to_owned()));
                }
            }
        }
        assert_eq!(served, documented());
        assert_eq!(served.len(), 94, "{served:?}");
    }

    /// Every route that reads a JSON body refuses one over 2 MiB with 413 problem+json
    /// naming the limit, whether declared (`Content-Length`) or found while reading.
    #[tokio::test]
    async fn oversized_json_bodies_are_problem_json_everywhere() {
        let store = Arc::new(MemStore::new());
        let dir = tempfile::tempdir().unwrap();
        let admin = crate::bootstrap_admin(store.as_ref(), dir.path())
            .await
            .unwrap()
            .unwrap();
        let app = router(AppState::new(store, &ServerConfig::default()));
        let doc = serde_json::to_value(crate::openapi()).unwrap();
        let big = format!("{{\"x\":\"{}\"}}", "a".repeat(3 << 20));
        let mut probed = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if op["requestBody"]["content"]
                    .get("application/json")
                    .is_none()
                {
                    continue;
                }
                let concrete = path
                    .replace("{name}", "x")
                    .replace("{nsi}", "x")
                    .replace("{type}", "1")
                    .replace("{terminal}", "x")
                    .replace("{seq}", "1")
                    .replace("{table}", "x")
                    .replace("{id}", "00000000-0000-4000-8000-000000000000");
                // A terminal's message has its own, smaller limit.
                let (what, limit) = if path == "/v1/terminal-operations" {
                    ("operation message", model::terminals::MAX_OPERATION_MESSAGE)
                } else {
                    ("body", 2_097_152)
                };
                for (declared, detail) in [
                    (
                        true,
                        format!(
                            "{what}: {} bytes exceeds the limit of {limit} bytes",
                            big.len()
                        ),
                    ),
                    (false, format!("{what}: exceeds the limit of {limit} bytes")),
                ] {
                    let mut req = Request::builder()
                        .method(method.to_uppercase().as_str())
                        .uri(&concrete)
                        .header("authorization", format!("Bearer {admin}"))
                        .header("content-type", "application/json");
                    if declared {
                        req = req.header("content-length", big.len());
                    }
                    let res = app
                        .clone()
                        .oneshot(req.body(Body::from(big.clone())).unwrap())
                        .await
                        .unwrap();
                    let at = format!("{method} {concrete}");
                    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE, "{at}");
                    assert_eq!(
                        res.headers()["content-type"],
                        "application/problem+json",
                        "{at}"
                    );
                    let body = axum::body::to_bytes(res.into_body(), 1 << 16)
                        .await
                        .unwrap();
                    let p: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    assert_eq!(p["status"], 413, "{at}");
                    assert_eq!(p["type"], "urn:vinfra:problem:payload-too-large", "{at}");
                    assert_eq!(p["detail"], detail, "{at}");
                }
                probed += 1;
            }
        }
        assert_eq!(probed, 30);
    }

    #[test]
    fn openapi_has_schemas_and_bearer_auth() {
        let doc = serde_json::to_value(crate::openapi()).unwrap();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for s in [
            "Vm",
            "Host",
            "Image",
            "CreateVm",
            "Problem",
            "Assignment",
            "ObservedReport",
        ] {
            assert!(schemas.contains_key(s), "missing schema {s}");
        }
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        // The document itself is public.
        assert_eq!(
            doc["paths"]["/v1/openapi.json"]["get"]["security"],
            serde_json::json!([{}])
        );
    }
}
