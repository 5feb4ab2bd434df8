//! vinfra's web dashboard: server-rendered pages under `/ui`, served by `vinfra server`
//! beside the REST API (the API crate nests [`router`] at `/ui` through
//! `ServerConfig::ui`).
//!
//! Owns: the pages, their live fragments (polled every second by htmx), the session
//! cookie and CSRF checks, and the vendored scripts (htmx, uPlot) embedded in the binary.
//! Must not: call the API over HTTP. Handlers here do what the REST handlers do:
//! authenticate (the token from the cookie, through `api::authenticate`), parse, make one
//! call into the control layer (or an `api` function where the REST handler's own work is
//! more than a call: NS jobs), and show the typed error's API message. Tenancy is the
//! API's: every list is read with the caller's scope.
#![warn(missing_docs)]

mod bench;
mod hosts;
mod layout;
mod migrations;
mod networks;
mod ns;
mod ops;
mod session;
mod slices;
mod tables;
mod terminals;
mod traffic;
mod v2x;
mod vms;

use std::collections::HashMap;

use api::AppState;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

/// A posted form's fields.
pub(crate) type Fields = HashMap<String, String>;

/// A posted form (`application/x-www-form-urlencoded`, at most `LIMIT` bytes, 64 KiB
/// unless a form needs more): its fields.
#[derive(Debug)]
pub(crate) struct Posted<const LIMIT: usize = 65_536>(pub Fields);

impl<S: Send + Sync, const LIMIT: usize> axum::extract::FromRequest<S> for Posted<LIMIT> {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, _: &S) -> Result<Self, Response> {
        let bad = |m: &str| layout::error_page(&api::ApiError::BadRequest(format!("form: {m}")));
        let body = axum::body::to_bytes(req.into_body(), LIMIT)
            .await
            .map_err(|_| {
                bad(&format!(
                    "cannot be read or larger than {} KiB",
                    LIMIT >> 10
                ))
            })?;
        serde_urlencoded::from_bytes::<Fields>(&body)
            .map(Posted)
            .map_err(|_| bad("not a urlencoded form"))
    }
}

/// A field's value, empty when absent.
pub(crate) fn val<'a>(form: &'a Fields, k: &str) -> &'a str {
    form.get(k).map(String::as_str).unwrap_or("")
}

/// After a change: back to `to` with a message (303, so a reload does not post again).
pub(crate) fn done(to: &str, msg: &str) -> Response {
    let sep = if to.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{to}{sep}done={}", percent(msg))).into_response()
}

/// Percent-encodes all but unreserved characters (RFC 3986).
fn percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The vendored libraries and our own script and style, compiled in.
const ASSETS: [(&str, &str, &str); 5] = [
    (
        "htmx.min.js",
        "text/javascript",
        include_str!("../assets/vendor/htmx-2.0.11.min.js"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript",
        include_str!("../assets/vendor/uPlot-1.6.32.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css",
        include_str!("../assets/vendor/uPlot-1.6.32.min.css"),
    ),
    (
        "app.js",
        "text/javascript",
        include_str!("../assets/app.js"),
    ),
    ("app.css", "text/css", include_str!("../assets/app.css")),
];

async fn asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, ct, body)) => (
            [
                (header::CONTENT_TYPE, *ct),
                (header::CACHE_CONTROL, "public, max-age=300"),
            ],
            *body,
        )
            .into_response(),
        None => (axum::http::StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

/// Security headers on every dashboard answer: scripts only from here (no inline
/// script: the CSP allows none), no framing, no referrer, and no caching of pages that
/// show a tenant's objects.
async fn headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let is_asset =
        req.uri().path().starts_with("/ui/assets/") || req.uri().path().starts_with("/assets/");
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
             img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; \
             form-action 'self'; base-uri 'none'; object-src 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !is_asset {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

/// The dashboard's routes, to be nested at `/ui`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/hosts") }))
        .route("/assets/{name}", get(asset))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/hosts", get(hosts::page))
        .route("/hosts/live", get(hosts::live))
        .route("/hosts/maintenance", post(hosts::maintenance))
        .route("/vms", get(vms::page).post(vms::create))
        .route("/vms/live", get(vms::live))
        .route("/vms/{id}", get(vms::show))
        .route("/vms/{id}/live", get(vms::show_live))
        .route("/vms/{id}/console", get(vms::console))
        .route("/vms/{id}/migrate", post(vms::migrate))
        .route("/vms/{id}/{verb}", post(vms::act))
        .route("/networks", get(networks::page).post(networks::create))
        .route("/networks/live", get(networks::live))
        .route("/networks/{id}/delete", post(networks::delete))
        .route("/migrations", get(migrations::page))
        .route("/migrations/live", get(migrations::live))
        .route("/migrations/curves.json", get(migrations::curves))
        .route("/migrations/bench", post(bench::upload))
        .route("/migrations/bench.json", get(bench::curves))
        .route("/migrations/{id}", get(migrations::show))
        .route("/migrations/{id}/live", get(migrations::show_live))
        .route("/migrations/{id}/curve.json", get(migrations::curve_json))
        .route("/operations", get(ops::page))
        .route("/operations/live", get(ops::live))
        .route("/ns", get(ns::page).post(ns::instantiate))
        .route("/ns/live", get(ns::live))
        .route("/ns/{id}/terminate", post(ns::terminate))
        .route("/ns/{id}/scale", post(ns::scale))
        .route("/operations/{id}/cancel", post(ops::cancel))
        .route("/resource-tables", get(tables::page))
        .route("/resource-tables/live", get(tables::live))
        .route("/terminals", get(terminals::page))
        .route("/terminals/live", get(terminals::live))
        .route("/slices", get(slices::page))
        .route("/slices/live", get(slices::live))
        .route("/traffic", get(traffic::page))
        .route("/traffic/live", get(traffic::live))
        .route("/traffic/rates.json", get(traffic::rates))
        .route("/v2x", get(v2x::page))
        .route("/v2x/{mec}/live", get(v2x::live))
        .route("/v2x/{mec}/token", post(v2x::token))
        .route("/v2x/{mec}/forget", post(v2x::forget))
        // Nested at /ui, which the nested router does not see (axum's `original-uri`
        // feature is off).
        .fallback(|uri: axum::http::Uri| async move {
            layout::error_page(&api::ApiError::NoRoute {
                path: format!("/ui{}", uri.path()),
            })
        })
        .layer(axum::middleware::from_fn(headers))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{HeaderValue, Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    fn app() -> Router {
        let store = Arc::new(store::testing::MemStore::new());
        let state = AppState::new(store, &api::ServerConfig::default());
        Router::new().nest("/ui", router(state))
    }

    async fn get(app: &Router, path: &str, cookie: Option<&str>) -> Response {
        let mut req = Request::builder().uri(path);
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        app.clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn pages_need_a_session_and_assets_do_not() {
        let app = app();
        for p in [
            "/ui/hosts",
            "/ui/vms",
            "/ui/migrations",
            "/ui/operations",
            "/ui/ns",
            "/ui/resource-tables",
        ] {
            let r = get(&app, p, None).await;
            assert_eq!(r.status(), StatusCode::SEE_OTHER, "{p}");
            assert_eq!(r.headers()[header::LOCATION], "/ui/login", "{p}");
            let r = get(&app, p, Some("vinfra_ui=vinfra_nope")).await;
            assert_eq!(r.status(), StatusCode::SEE_OTHER, "{p}");
        }
        // A live region's poll without a session: htmx is told to load the login page.
        let r = app
            .clone()
            .oneshot(
                Request::builder()
                    .uri("/ui/vms/live")
                    .header("hx-request", "true")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()["hx-redirect"], "/ui/login");
        let r = get(&app, "/ui/assets/htmx.min.js", None).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("script-src 'self'"));
        assert_eq!(
            get(&app, "/ui/assets/nope.js", None).await.status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(get(&app, "/ui/login", None).await.status(), StatusCode::OK);
        // An unknown page: an HTML page that says so, not the API's JSON.
        let r = get(&app, "/ui/nope", None).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
    }

    async fn send(app: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
        let r = app.clone().oneshot(req).await.unwrap();
        let (parts, body) = r.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    fn post(path: &str, cookie: Option<&str>, body: &str) -> Request<Body> {
        let mut req = Request::builder()
            .method("POST")
            .uri(path)
            .header(header::HOST, "127.0.0.1:7070")
            .header(header::ORIGIN, "http://127.0.0.1:7070")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        req.body(Body::from(body.to_owned())).unwrap()
    }

    /// Log in, the cookie's attributes, CSRF and Origin refusals, and a refused form
    /// with the API's message beside its field: in process, on a memory store.
    #[tokio::test]
    async fn login_cookie_csrf_and_field_errors() {
        let store: Arc<dyn store::Store> = Arc::new(store::testing::MemStore::new());
        let dir = std::env::temp_dir().join(format!("vinfra-ui-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join(api::ADMIN_TOKEN_FILE));
        let token = api::bootstrap_admin(store.as_ref(), &dir)
            .await
            .unwrap()
            .expect("a new admin token");
        let state = AppState::new(store, &api::ServerConfig::default());
        let app = Router::new().nest("/ui", router(state));

        // A bad token: 422 with the message beside the field.
        let (status, _, body) = send(&app, post("/ui/login", None, "token=vinfra_00")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            body.contains("id=\"token-error\"") && body.contains("unknown or revoked token"),
            "{body}"
        );
        // A form from another site: refused.
        let mut req = post("/ui/login", None, &format!("token={token}"));
        req.headers_mut().insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert_eq!(send(&app, req).await.0, StatusCode::FORBIDDEN);
        // The token: a cookie for /ui only, not for scripts, not for other sites.
        let (status, headers, _) =
            send(&app, post("/ui/login", None, &format!("token={token}"))).await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        let set = headers[header::SET_COOKIE].to_str().unwrap().to_owned();
        assert!(
            set.starts_with(&format!("{}={token};", session::COOKIE)),
            "{set}"
        );
        for attr in ["Path=/ui", "HttpOnly", "SameSite=Strict"] {
            assert!(set.contains(attr), "{set}");
        }
        assert!(!set.contains("Secure"), "plain HTTP: {set}");
        let cookie = format!("{}={token}", session::COOKIE);
        let csrf = session::csrf_for(&token);

        let (status, _, page) = send(
            &app,
            Request::builder()
                .uri("/ui/vms")
                .header(header::COOKIE, &cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            page.contains(&format!("value=\"{csrf}\"")),
            "the forms carry the CSRF token"
        );
        assert!(page.contains("VMs (0)"), "{page}");

        // No CSRF token, or a wrong one: 403, nothing created.
        for body in [
            "name=a&image=default&vcpus=1&memory_mib=64".to_owned(),
            "_csrf=00&name=a&image=default&vcpus=1&memory_mib=64".to_owned(),
        ] {
            let (status, _, page) = send(&app, post("/ui/vms", Some(&cookie), &body)).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{page}");
            assert!(page.contains("CSRF"), "{page}");
        }
        // A bad name: the API's message beside the field, the typed values kept.
        let (status, _, page) = send(
            &app,
            post(
                "/ui/vms",
                Some(&cookie),
                &format!("_csrf={csrf}&name=Bad+Name&image=default&vcpus=1&memory_mib=64"),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            page.contains("id=\"name-error\"") && page.contains("value=\"Bad Name\""),
            "{page}"
        );
        // Not a number: the same, beside vCPUs.
        let (status, _, page) = send(
            &app,
            post(
                "/ui/vms",
                Some(&cookie),
                &format!("_csrf={csrf}&name=ok&image=default&vcpus=many&memory_mib=64"),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(page.contains("id=\"vcpus-error\""), "{page}");
        // Without an image in the store the create is refused with the API's message.
        let (status, _, page) = send(
            &app,
            post(
                "/ui/vms",
                Some(&cookie),
                &format!("_csrf={csrf}&name=ok&image=nope&vcpus=1&memory_mib=64"),
            ),
        )
        .await;
        assert!(status.is_client_error(), "{status}");
        assert!(page.contains("role=\"alert\""), "{page}");
        // Traffic statistics are off on this server: said on the page.
        let (status, _, page) = send(
            &app,
            Request::builder()
                .uri("/ui/traffic")
                .header(header::COOKIE, &cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(page.contains("--vswitch-listen"), "{page}");

        // A benchmark result: a bad document gets 400 and its message beside the field,
        // the text kept; a good one is kept and plotted.
        for (doc, says) in [
            ("{\"kind\": 1", "doc: not a migrate-cache result"),
            ("", "doc: paste the result document"),
            (
                "{\"kind\":\"vinfra.bench.migrate-cache/v1\",\"created_at_ms\":1,\"rows\":[{\"workload\":\"w\",\"strategy\":\"heat\",\"curve\":[[0,0.5],[1,2]]}]}",
                "rows[0].curve[1]: the hit ratio must be between 0 and 1, got 2",
            ),
        ] {
            let body = format!("_csrf={csrf}&doc={}", percent(doc));
            let (status, _, page) =
                send(&app, post("/ui/migrations/bench", Some(&cookie), &body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{page}");
            assert!(
                page.contains("id=\"doc-error\"") && page.contains(says),
                "{says}: {page}"
            );
        }
        let good = "{\"kind\":\"vinfra.bench.migrate-cache/v1\",\"created_at_ms\":1,\"rows\":[{\"workload\":\"w\",\"strategy\":\"heat\",\"curve\":[[0,0.5],[1,0.75]]}]}";
        let body = format!("_csrf={csrf}&doc={}", percent(good));
        let (status, headers, page) =
            send(&app, post("/ui/migrations/bench", Some(&cookie), &body)).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
        assert!(headers[header::LOCATION]
            .to_str()
            .unwrap()
            .starts_with("/ui/migrations?done=benchmark%20result%20uploaded"));
        let (status, _, json) = send(
            &app,
            Request::builder()
                .uri("/ui/migrations/bench.json?workload=0")
                .header(header::COOKIE, &cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["series"][0]["label"], "heat");
        assert_eq!(v["series"][0]["y"], serde_json::json!([50.0, 75.0]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn flash_messages_are_encoded() {
        assert_eq!(percent("a b/é"), "a%20b%2F%C3%A9");
    }
}
