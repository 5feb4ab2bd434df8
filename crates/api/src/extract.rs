//! Request extractors whose rejections are [`ApiError`]s, so that a bad body,
//! path or token gets the same problem+json shape as every other error.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::{header, request::Parts, HeaderMap, Method};
use http_body_util::BodyExt;
use model::{Role, TenantId, TokenId, TokenRecord, TokenScope};
use serde::de::DeserializeOwned;

use crate::{auth, ApiError, AppState, Scope};
use control::records::{get_json, keys, now_ms};

/// Largest JSON body accepted (axum's default, named here so that a refusal can say
/// it). Documents inside a body have their own, smaller limits (descriptors: 256 KiB).
pub(crate) const MAX_JSON_BODY: usize = 2 << 20;

/// A JSON object body. Unlike `axum::Json`, it is strict and its errors name the
/// field in our shape:
/// - `Content-Type` must be `application/json`, with at most `charset=utf-8` (415):
///   the body is read as UTF-8 JSON, so another charset or a `+json` type the client
///   meant as something else must not be half-understood;
/// - at most `MAX_JSON_BODY` (2 MiB) bytes (413);
/// - a JSON object: an array or scalar is 422 before any parsing, because serde
///   would otherwise accept a struct's sequence form (`["n","10.77.0.0/24"]`);
/// - syntax errors are 400, shape errors (wrong type, unknown or missing field) 422.
#[derive(Debug, Clone)]
pub struct AppJson<T>(pub T);

impl<S, T> FromRequest<S> for AppJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        check_json_type(req.headers())?;
        let bytes = read_body(req, "body", MAX_JSON_BODY).await?;
        check_object(&bytes)?;
        parse_json(&bytes).map(AppJson)
    }
}

/// The bytes of a JSON object body of at most `limit` bytes, checked as [`AppJson`]
/// checks them but not parsed: for a body whose exact bytes matter (a MAC covers them).
pub(crate) async fn json_object_bytes(
    req: Request,
    what: &'static str,
    limit: usize,
) -> Result<Bytes, ApiError> {
    check_json_type(req.headers())?;
    let bytes = read_body(req, what, limit).await?;
    check_object(&bytes)?;
    Ok(bytes)
}

/// Reads a whole body of at most `limit` bytes; over it is 413 naming `what` and the
/// limit. A declared `Content-Length` over the limit is refused before reading.
pub(crate) async fn read_body(
    req: Request,
    what: &'static str,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let too_large = |size| ApiError::PayloadTooLarge { what, size, limit };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared {
        if usize::try_from(n).map_or(true, |n| n > limit) {
            return Err(too_large(Some(n)));
        }
    }
    let body: Body = req.into_body();
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(None)),
        Err(_) => Err(ApiError::BadRequest(format!("{what}: cannot be read"))),
    }
}

/// 415 unless `Content-Type` is `application/json` with at most `charset=utf-8`
/// (case-insensitive, the value optionally quoted).
fn check_json_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let refuse = |got: &str| ApiError::UnsupportedMediaType {
        // Echoed in the detail: bounded so that a huge header does not make a huge error.
        got: got.chars().take(80).collect(),
    };
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(refuse("none"));
    };
    let Ok(ct) = value.to_str() else {
        return Err(refuse("a non-ASCII value"));
    };
    let mut parts = ct.split(';');
    let mime = parts.next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(refuse(ct));
    }
    let params: Vec<&str> = parts.map(str::trim).collect();
    let ok = match params.as_slice() {
        [] => true,
        [p] => p.split_once('=').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("charset")
                && v.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
        }),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(refuse(ct))
    }
}

/// 422 unless the first non-whitespace byte opens an object. An empty body is left
/// to the parser (400, invalid JSON).
fn check_object(bytes: &[u8]) -> Result<(), ApiError> {
    match bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        None | Some(b'{') => Ok(()),
        Some(_) => Err(ApiError::Unprocessable(
            "body: must be a JSON object".to_owned(),
        )),
    }
}

/// Deserializes `bytes`, naming the field of the first error.
///
/// JSON Schema's `integer` includes numbers with a zero fraction (`2.0`), and clients
/// generated from the document may send them: when a float is what stopped the typed
/// parse, the body is read again with every integral float (within the 64-bit range)
/// turned into an integer. Bodies without such a float pay nothing for this.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let err = match serde_path_to_error::deserialize(&mut de) {
        Ok(value) => {
            de.end()
                .map_err(|e| ApiError::BadRequest(format!("body: invalid JSON: {e}")))?;
            return Ok(value);
        }
        Err(e) => e,
    };
    let float_in_the_way = err.inner().classify() == serde_json::error::Category::Data
        && err
            .inner()
            .to_string()
            .starts_with("invalid type: floating point");
    if float_in_the_way {
        if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(bytes) {
            if integral_floats(&mut v) {
                return serde_path_to_error::deserialize(v).map_err(|e| {
                    let path = e.path().to_string();
                    let field = if path == "." { "body".to_owned() } else { path };
                    ApiError::Unprocessable(format!("{field}: {}", e.into_inner()))
                });
            }
        }
    }
    let path = err.path().to_string();
    let inner = err.into_inner();
    let field = if path == "." { "body".to_owned() } else { path };
    Err(match inner.classify() {
        serde_json::error::Category::Data => ApiError::Unprocessable(format!("{field}: {inner}")),
        _ => ApiError::BadRequest(format!("body: invalid JSON: {inner}")),
    })
}

/// Turns every float with a zero fraction that fits an `i64` or `u64` into that
/// integer; returns whether it changed anything.
fn integral_floats(v: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Number(n) if n.is_f64() => {
            let Some(f) = n.as_f64() else { return false };
            if f.fract() != 0.0 || !f.is_finite() {
                return false;
            }
            // `{:.0}` prints the exact integer an integral f64 holds; parsing it back
            // refuses what is out of range, without a lossy cast.
            let text = format!("{f:.0}");
            let int = text
                .parse::<u64>()
                .map(serde_json::Number::from)
                .or_else(|_| text.parse::<i64>().map(serde_json::Number::from));
            match int {
                Ok(i) => {
                    *n = i;
                    true
                }
                Err(_) => false,
            }
        }
        Value::Array(items) => items.iter_mut().fold(false, |c, i| integral_floats(i) | c),
        Value::Object(map) => map.values_mut().fold(false, |c, i| integral_floats(i) | c),
        _ => false,
    }
}

/// One path parameter, with a problem+json rejection.
#[derive(Debug, Clone)]
pub struct AppPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for AppPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(s)| AppPath(s))
            .map_err(|_| ApiError::BadRequest("path: invalid parameter".to_owned()))
    }
}

/// The authenticated caller, from `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The token's role.
    pub role: Role,
    /// The token's tenant (member tokens).
    pub tenant: Option<TenantId>,
    /// The token's id (`None` for a token minted before ids existed and not
    /// yet upgraded).
    pub token_id: Option<TokenId>,
    /// Which methods the token may use (already enforced for this request).
    pub scope: TokenScope,
    /// The token's expiry, unix ms; `None`: never.
    pub expires_at: Option<u64>,
}

impl Caller {
    /// Fails with 403 unless the caller has one of `roles`.
    pub fn require(&self, roles: &[Role], what: &str) -> Result<(), ApiError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            let allowed: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            Err(ApiError::Forbidden(format!(
                "{what} needs a token with role {}, this token has role {}",
                allowed.join(" or "),
                self.role.as_str()
            )))
        }
    }

    /// The caller's scope over tenant objects.
    pub fn scope(&self) -> Result<Scope, ApiError> {
        match (self.role, self.tenant) {
            (Role::Admin, _) => Ok(Scope::All),
            (Role::Member, Some(t)) => Ok(Scope::Tenant(t)),
            (Role::Member, None) => Err(ApiError::invariant("member token without a tenant")),
            (Role::Agent, _) => Err(ApiError::Forbidden(
                "an agent token may not access tenant objects".to_owned(),
            )),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    /// Reads the token's record on every request, with no cache: a revocation
    /// or an expiry must hold at once on every server sharing the store.
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers).ok_or(ApiError::Unauthorized)?;
        let caller = authenticate(state, token, &parts.method).await?;
        // Over TLS an agent proves itself twice: its token and the client
        // certificate it got when it joined (a stolen token alone is not enough).
        if caller.role == Role::Agent {
            let peer = parts
                .extensions
                .get::<axum::extract::ConnectInfo<crate::Peer>>();
            if peer.is_some_and(|p| p.0.tls && p.0.client_cn.is_none()) {
                return Err(ApiError::AgentCertRequired);
            }
        }
        Ok(caller)
    }
}

/// The caller a token stands for, for a request with `method`: its record read from the
/// store (no cache: a revocation or an expiry holds at once), refused when unknown,
/// expired, or read-only for a method that changes something. The bearer extractor and
/// the web UI (whose cookie carries the token) both authenticate through this.
pub async fn authenticate(
    state: &AppState,
    token: &str,
    method: &Method,
) -> Result<Caller, ApiError> {
    let key = keys::token(&auth::hash_token(token));
    let Some((rec, _)) = get_json::<TokenRecord>(state.store(), &key).await? else {
        return Err(ApiError::Unauthorized);
    };
    if rec.expired_at(now_ms()) {
        return Err(ApiError::TokenExpired);
    }
    check_scope(rec.scope, method)?;
    Ok(Caller {
        role: rec.role,
        tenant: rec.tenant,
        token_id: rec.id,
        scope: rec.scope,
        expires_at: rec.expires_at,
    })
}

/// A read-only token may only read: `GET` and `HEAD`.
fn check_scope(scope: TokenScope, method: &Method) -> Result<(), ApiError> {
    match scope {
        TokenScope::ReadWrite => Ok(()),
        TokenScope::ReadOnly if method == Method::GET || method == Method::HEAD => Ok(()),
        TokenScope::ReadOnly => Err(ApiError::Forbidden(format!(
            "this token has scope read-only: {method} needs a read-write token"
        ))),
    }
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        n: u32,
        inner: Option<Inner>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        m: u8,
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<Body>(br#"{"n":"x"}"#).unwrap_err();
        assert!(
            matches!(&e, ApiError::Unprocessable(d) if d.starts_with("n: invalid type")),
            "{e}"
        );
        let e = parse_json::<Body>(br#"{"n":1,"inner":{"m":300}}"#).unwrap_err();
        assert!(e.to_string().starts_with("inner.m: invalid value"), "{e}");
        let e = parse_json::<Body>(br#"{"n":1,"x":2}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `x`"), "{e}");
        let e = parse_json::<Body>(br#"{"n":1"#).unwrap_err();
        assert!(matches!(e, ApiError::BadRequest(_)), "{e}");
        let e = parse_json::<Body>(br#"{"n":1} x"#).unwrap_err();
        assert!(matches!(e, ApiError::BadRequest(_)), "{e}");
        let e = parse_json::<Body>(br#"{}"#).unwrap_err();
        assert_eq!(e.to_string(), "body: missing field `n` at line 1 column 2");
    }

    #[test]
    fn read_only_tokens_only_read() {
        for m in [Method::GET, Method::HEAD] {
            assert!(check_scope(TokenScope::ReadOnly, &m).is_ok());
        }
        for m in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            let e = check_scope(TokenScope::ReadOnly, &m).unwrap_err();
            assert!(e.to_string().contains("scope read-only"), "{e}");
            assert!(check_scope(TokenScope::ReadWrite, &m).is_ok());
        }
    }

    #[test]
    fn only_objects_are_bodies() {
        assert!(check_object(b" \n{\"a\":1}").is_ok());
        assert!(check_object(b"").is_ok());
        for body in [&b"[]"[..], b" [\"n\"]", b"1", b"\"x\"", b"null", b"true"] {
            let e = check_object(body).unwrap_err();
            assert_eq!(e.to_string(), "body: must be a JSON object");
            assert_eq!(e.status().0.as_u16(), 422);
        }
    }

    #[test]
    fn content_types_and_bearer() {
        let mut h = HeaderMap::new();
        assert!(check_json_type(&h).is_err());
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON;CHARSET=\"UTF-8\"",
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ok));
            assert!(check_json_type(&h).is_ok(), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/evil+json",
            "application/json; charset=utf-16",
            "application/json; charset=utf-8; x=y",
            "application/json; boundary=x",
            "application/jsonx",
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(bad));
            let e = check_json_type(&h).unwrap_err();
            assert_eq!(e.status().0.as_u16(), 415, "{bad}");
            assert!(e.to_string().ends_with(bad), "{e}");
        }
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
    }
}
