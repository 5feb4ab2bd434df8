//! Route table and handlers.

pub(crate) mod hosts;
pub(crate) mod images;
pub(crate) mod meta;
pub(crate) mod tenants;
pub(crate) mod vms;

use axum::http::{Method, Uri};
use axum::routing::{get, post, put, MethodRouter};
use axum::Router;

use crate::{ApiError, AppState};

/// Every route. The router is built from this table and the OpenAPI test
/// probes it, so a route cannot be added without the test seeing it.
pub(crate) fn table() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/v1/openapi.json", get(meta::openapi_doc)),
        ("/metrics", get(meta::metrics)),
        (
            "/v1/tenants",
            post(tenants::create_tenant).get(tenants::list_tenants),
        ),
        ("/v1/tokens", post(tenants::create_token)),
        (
            "/v1/hosts",
            post(hosts::register_host).get(hosts::list_hosts),
        ),
        ("/v1/hosts/{name}", get(hosts::get_host)),
        ("/v1/hosts/{name}/heartbeat", post(hosts::heartbeat)),
        ("/v1/hosts/{name}/assignments", get(vms::assignments)),
        (
            "/v1/images",
            post(images::create_image).get(images::list_images),
        ),
        (
            "/v1/images/{name}",
            get(images::get_image).delete(images::delete_image),
        ),
        ("/v1/vms", post(vms::create_vm).get(vms::list_vms)),
        ("/v1/vms/{id}", get(vms::get_vm).delete(vms::delete_vm)),
        ("/v1/vms/{id}/start", post(vms::start_vm)),
        ("/v1/vms/{id}/stop", post(vms::stop_vm)),
        ("/v1/vms/{id}/console", get(vms::console)),
        ("/v1/vms/{id}/observed", put(vms::report_observed)),
    ]
}

pub(crate) fn router(state: AppState) -> Router {
    let mut r = Router::new();
    for (path, route) in table() {
        r = r.route(path, route);
    }
    r.fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
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
