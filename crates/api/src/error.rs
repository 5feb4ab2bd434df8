//! [`ApiError`]: every way a request can fail, and its problem+json shape.

use std::path::PathBuf;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use model::api::Problem;
use model::ValidationError;
use store::StoreError;

/// Why a request (or starting the server) failed. A 4xx's `Display` is the
/// `detail` the client sees; a 5xx shows only "internal error" and the chain
/// is logged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The body is not JSON, or a path segment is unreadable.
    #[error("{0}")]
    BadRequest(String),
    /// The body is JSON but breaks a rule; names the field.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// The body is JSON of the wrong shape (wrong type, unknown or missing
    /// field); names the field.
    #[error("{0}")]
    Unprocessable(String),
    /// No token, or a token the store does not know (never minted, revoked).
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// A known token past its expiry.
    #[error("token expired")]
    TokenExpired,
    /// A terminal's operation message that does not authenticate (unknown terminal,
    /// MAC, timestamp): the message names why.
    #[error("{0}")]
    MessageNotAuthentic(String),
    /// This server cannot do it as configured (the message says what is missing), or
    /// not now (it is shutting down: another server may).
    #[error("{0}")]
    Unavailable(String),
    /// An agent token over TLS without the agent's client certificate.
    #[error("an agent token needs the agent's client certificate on a TLS listener")]
    AgentCertRequired,
    /// A join token that is unknown, used or expired (one message for all).
    #[error("join token unknown, used or expired")]
    JoinRefused,
    /// The token's role may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// No such object, or one the caller may not see.
    #[error("{kind} {id} not found")]
    NotFound {
        /// `vm`, `host`, `image`, `tenant`.
        kind: &'static str,
        /// What the caller asked for.
        id: String,
    },
    /// No route matches the path.
    #[error("no route for {path}")]
    NoRoute {
        /// The requested path.
        path: String,
    },
    /// The path exists but not with this method.
    #[error("method {method} not allowed here")]
    MethodNotAllowed {
        /// The requested method.
        method: String,
    },
    /// The request conflicts with current state (duplicate name, no capacity).
    #[error("{0}")]
    Conflict(String),
    /// The body is not `application/json` (with at most `charset=utf-8`).
    #[error(
        "body: Content-Type must be application/json (optionally with charset=utf-8), got {got}"
    )]
    UnsupportedMediaType {
        /// The request's `Content-Type`, shortened, or `none`.
        got: String,
    },
    /// The body is not of the one media type this route takes.
    #[error("body: Content-Type must be {expected}")]
    UnsupportedMediaTypeFor {
        /// The media type the route takes.
        expected: &'static str,
    },
    /// The server was started without an image store.
    #[error("this server has no image store (start it with a data directory)")]
    ImageStoreOff,
    /// Storing or reading an image-store file failed.
    #[error(transparent)]
    Blob(#[from] crate::blobs::BlobError),
    /// The body, or a document inside it, exceeds its limit; names the limit.
    #[error("{what}: {}exceeds the limit of {limit} bytes", .size.map(|s| format!("{s} bytes ")).unwrap_or_default())]
    PayloadTooLarge {
        /// `body`, `descriptor`, `snapshot`.
        what: &'static str,
        /// Its size, when known before reading all of it.
        size: Option<u64>,
        /// The limit in bytes.
        limit: usize,
    },
    /// The caller is over its request rate, or the server's bounded pool for CPU-heavy
    /// work is full. The response carries `Retry-After`.
    #[error("{reason}, retry after {retry_after_secs} s")]
    TooManyRequests {
        /// What is exhausted.
        reason: String,
        /// Seconds until a retry can succeed (at least 1).
        retry_after_secs: u64,
    },
    /// The store failed.
    #[error("store operation failed")]
    Store(#[from] StoreError),
    /// A stored record could not be decoded, or another invariant broke.
    #[error("internal error: {context}")]
    Internal {
        /// What the server was doing.
        context: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// Reading or writing a file in the data directory failed.
    #[error("cannot access {path}")]
    DataDir {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The server task failed or panicked.
    #[error("server task failed")]
    Serve(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    /// An internal error with context and a source.
    pub fn internal(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        ApiError::Internal {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// An internal error without a source (a broken invariant).
    pub fn invariant(context: impl Into<String>) -> Self {
        ApiError::Internal {
            context: context.into(),
            source: None,
        }
    }

    /// The HTTP status and problem type slug.
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request"),
            ApiError::Validation(_) | ApiError::Unprocessable(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "validation")
            }
            ApiError::Unauthorized
            | ApiError::TokenExpired
            | ApiError::MessageNotAuthentic(_)
            | ApiError::AgentCertRequired
            | ApiError::JoinRefused => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound { .. } | ApiError::NoRoute { .. } => {
                (StatusCode::NOT_FOUND, "not-found")
            }
            ApiError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed")
            }
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::UnsupportedMediaType { .. } => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type")
            }
            ApiError::UnsupportedMediaTypeFor { .. } => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type")
            }
            ApiError::ImageStoreOff | ApiError::Unavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            ApiError::Blob(e) => {
                use crate::blobs::BlobError as B;
                match e {
                    B::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large"),
                    B::DigestMismatch { .. }
                    | B::ImportOff
                    | B::BadImportPath { .. }
                    | B::OutsideImportDir { .. }
                    | B::NotAFile { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "validation"),
                    B::Body(_) => (StatusCode::BAD_REQUEST, "bad-request"),
                    B::Io { .. } | B::Join(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
                }
            }
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large")
            }
            ApiError::TooManyRequests { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "too-many-requests")
            }
            // The store did not answer (an etcd member killed, a leader election): a
            // client may try again in a moment, so say so instead of "internal".
            ApiError::Store(StoreError::Backend { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "store-unavailable")
            }
            ApiError::Store(_)
            | ApiError::Internal { .. }
            | ApiError::DataDir { .. }
            | ApiError::Bind { .. }
            | ApiError::Serve(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// The problem document for this error.
    pub fn problem(&self) -> Problem {
        let (status, slug) = self.status();
        let detail = if slug == "store-unavailable" {
            STORE_UNAVAILABLE.to_owned()
        } else if status.is_server_error() {
            "internal error".to_owned()
        } else {
            self.to_string()
        };
        Problem {
            type_: format!("urn:vinfra:problem:{slug}"),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail,
        }
    }
}

/// What a client sees when the store did not answer; the cause goes to the log.
pub const STORE_UNAVAILABLE: &str = "the cluster store did not answer; try again";

/// The control layer's shared failures, as HTTP answers.
impl From<control::ControlError> for ApiError {
    fn from(e: control::ControlError) -> Self {
        use control::ControlError as C;
        match e {
            C::Store(e) => ApiError::Store(e),
            C::NotFound { kind, id } => ApiError::NotFound { kind, id },
            e @ (C::AmbiguousName { .. } | C::Taken(_) | C::Contended { .. }) => {
                ApiError::Conflict(e.to_string())
            }
            e @ (C::Decode { .. } | C::Encode(_) | C::Invariant(_)) => {
                ApiError::internal("the control layer", e)
            }
            e => ApiError::internal("the control layer", e),
        }
    }
}

impl From<control::PushError> for ApiError {
    fn from(e: control::PushError) -> Self {
        use control::PushError as E;
        match e {
            E::Control(c) => c.into(),
            e @ E::ShuttingDown => ApiError::Unavailable(e.to_string()),
            // Refused at once, not queued, like the other limits: the client retries.
            e @ E::Busy => ApiError::TooManyRequests {
                reason: e.to_string(),
                retry_after_secs: 1,
            },
        }
    }
}

impl From<control::terminals::TerminalError> for ApiError {
    fn from(e: control::terminals::TerminalError) -> Self {
        use control::terminals::TerminalError as E;
        match e {
            E::Control(e) => e.into(),
            e @ E::NoSecretsKey => ApiError::Unavailable(e.to_string()),
            e => ApiError::Conflict(e.to_string()),
        }
    }
}

impl From<control::terminals::Refused> for ApiError {
    fn from(e: control::terminals::Refused) -> Self {
        use control::terminals::Refused as R;
        match e {
            R::Control(e) => e.into(),
            R::TooLarge { len } => ApiError::PayloadTooLarge {
                what: "operation message",
                size: u64::try_from(len).ok(),
                limit: model::terminals::MAX_OPERATION_MESSAGE,
            },
            e @ R::Malformed(_) => ApiError::BadRequest(e.to_string()),
            e @ (R::UnknownTerminal(_) | R::BadMac | R::Stale { .. } | R::WrongServer { .. }) => {
                ApiError::MessageNotAuthentic(e.to_string())
            }
            R::RateLimited { retry_after_ms, .. } => ApiError::TooManyRequests {
                reason: e.to_string(),
                retry_after_secs: retry_after_ms.div_ceil(1000),
            },
            e @ R::BadOperation(_) => ApiError::Unprocessable(e.to_string()),
            e => ApiError::Conflict(e.to_string()),
        }
    }
}

impl From<control::MigrateStartError> for ApiError {
    fn from(e: control::MigrateStartError) -> Self {
        use control::MigrateStartError as E;
        match e {
            E::Control(c) => c.into(),
            e @ (E::SameHost { .. } | E::NoSuchDestination { .. }) => {
                ApiError::Unprocessable(e.to_string())
            }
            e => ApiError::Conflict(e.to_string()),
        }
    }
}

impl From<control::MigrationReportError> for ApiError {
    fn from(e: control::MigrationReportError) -> Self {
        use control::MigrationReportError as E;
        match e {
            E::Control(c) => c.into(),
            e @ (E::NotParticipant { .. }
            | E::IllegalTransition { .. }
            | E::ReportWindowClosed { .. }) => ApiError::Conflict(e.to_string()),
        }
    }
}

impl From<control::MaintenanceError> for ApiError {
    fn from(e: control::MaintenanceError) -> Self {
        use control::MaintenanceError as E;
        match e {
            E::Control(c) => c.into(),
            e => ApiError::Conflict(e.to_string()),
        }
    }
}

impl From<control::CancelError> for ApiError {
    fn from(e: control::CancelError) -> Self {
        use control::CancelError as E;
        match e {
            E::Control(c) => c.into(),
            E::Maintenance(m) => m.into(),
            e @ (E::Finished { .. } | E::NotCancellable { .. }) => {
                ApiError::Conflict(e.to_string())
            }
        }
    }
}

impl From<control::StorageError> for ApiError {
    fn from(e: control::StorageError) -> Self {
        match e {
            control::StorageError::Control(c) => c.into(),
            e @ control::StorageError::Document(_) => ApiError::Unprocessable(e.to_string()),
        }
    }
}

impl From<control::ResourceTableError> for ApiError {
    fn from(e: control::ResourceTableError) -> Self {
        use control::ResourceTableError as E;
        match e {
            E::Control(c) => c.into(),
            e @ (E::TooMany { .. } | E::InUse { .. }) => ApiError::Conflict(e.to_string()),
        }
    }
}

impl From<control::NicError> for ApiError {
    fn from(e: control::NicError) -> Self {
        use control::NicError as E;
        match e {
            E::Control(c) => c.into(),
            E::Name(v) => ApiError::Validation(v),
            e @ (E::InUse { .. } | E::Full { .. }) => ApiError::Conflict(e.to_string()),
            e @ (E::NoSuchNetwork { .. } | E::NotAHostAddress { .. } | E::Twin { .. }) => {
                ApiError::Unprocessable(e.to_string())
            }
        }
    }
}

impl From<control::CreateVmError> for ApiError {
    fn from(e: control::CreateVmError) -> Self {
        use control::CreateVmError as E;
        match e {
            E::Control(c) => c.into(),
            E::Nic(n) => n.into(),
            E::Storage(s) => s.into(),
            e @ (E::NoSuchImage(_) | E::ImageNotInStore(_) | E::NoSuchHost(_) | E::Tables(_)) => {
                ApiError::Unprocessable(e.to_string())
            }
            e @ (E::NameTaken(_) | E::NoRoom { .. } | E::NoRedundantPlacement(_)) => {
                ApiError::Conflict(e.to_string())
            }
        }
    }
}

impl From<control::SnapshotError> for ApiError {
    fn from(e: control::SnapshotError) -> Self {
        use control::SnapshotError as E;
        match e {
            E::Control(c) => c.into(),
            E::TooLarge { limit } => ApiError::PayloadTooLarge {
                what: "snapshot",
                size: None,
                limit,
            },
            E::NotUploaded(m) => ApiError::NotFound {
                kind: "snapshot of migration",
                id: m.to_string(),
            },
            e @ (E::Finished { .. } | E::ChunkGone { .. }) => ApiError::Conflict(e.to_string()),
        }
    }
}

impl From<control::VmChangeError> for ApiError {
    fn from(e: control::VmChangeError) -> Self {
        match e {
            control::VmChangeError::Control(c) => c.into(),
            e => ApiError::Conflict(e.to_string()),
        }
    }
}

impl From<control::NetworkDeleteError> for ApiError {
    fn from(e: control::NetworkDeleteError) -> Self {
        match e {
            control::NetworkDeleteError::Control(c) => c.into(),
            e => ApiError::Conflict(e.to_string()),
        }
    }
}

impl From<control::ImageError> for ApiError {
    fn from(e: control::ImageError) -> Self {
        use control::ImageError as E;
        match e {
            E::Control(c) => c.into(),
            e @ E::NoBlob { .. } => ApiError::Unprocessable(e.to_string()),
            e @ E::Public(_) => ApiError::Forbidden(e.to_string()),
            e @ E::InUse { .. } => ApiError::Conflict(e.to_string()),
        }
    }
}

impl From<control::NsError> for ApiError {
    fn from(e: control::NsError) -> Self {
        use control::NsError as E;
        match e {
            E::Control(c) => c.into(),
            e @ E::NoSuchVnf { .. } => ApiError::Unprocessable(e.to_string()),
            e => ApiError::Conflict(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = self.problem();
        let status =
            StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(error = %model::error_chain(&self), "request failed");
        } else {
            tracing::debug!(status = problem.status, detail = %problem.detail, "request rejected");
        }
        let body = match serde_json::to_vec(&problem) {
            Ok(b) => b,
            Err(_) => br#"{"type":"urn:vinfra:problem:internal","title":"Internal Server Error","status":500,"detail":"internal error"}"#.to_vec(),
        };
        let mut res = (status, body).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match self {
            ApiError::Unauthorized | ApiError::TokenExpired => {
                res.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::TooManyRequests {
                retry_after_secs, ..
            } => {
                res.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs.max(1)),
                );
            }
            ApiError::Store(StoreError::Backend { .. }) => {
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(1));
            }
            _ => {}
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_hide_detail() {
        let e = ApiError::internal("decoding vm", std::io::Error::other("secret path"));
        let p = e.problem();
        assert_eq!(p.status, 500);
        assert_eq!(p.detail, "internal error");
        assert!(model::error_chain(&e).contains("secret path"));
    }

    #[test]
    fn limits_are_named_and_retry_after_is_sent() {
        let e = ApiError::PayloadTooLarge {
            what: "descriptor",
            size: Some(1_900_000),
            limit: 262_144,
        };
        assert_eq!(
            e.problem().detail,
            "descriptor: 1900000 bytes exceeds the limit of 262144 bytes"
        );
        let e = ApiError::PayloadTooLarge {
            what: "body",
            size: None,
            limit: 10,
        };
        assert_eq!(e.to_string(), "body: exceeds the limit of 10 bytes");
        let res = ApiError::TooManyRequests {
            reason: "x".into(),
            retry_after_secs: 3,
        }
        .into_response();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()[header::RETRY_AFTER], "3");
    }

    #[test]
    fn an_unreachable_store_is_503_with_retry_after_and_no_cause() {
        let e = ApiError::Store(StoreError::backend(
            "cannot get /vinfra/tokens/x from etcd",
            std::io::Error::other("connection refused to 10.0.0.9"),
        ));
        let p = e.problem();
        assert_eq!(p.status, 503);
        assert_eq!(p.detail, STORE_UNAVAILABLE);
        let res = e.into_response();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[header::RETRY_AFTER], "1");
        // Any other store failure (a conflict nobody expected) stays internal.
        let p = ApiError::Store(StoreError::Conflict { key: "/k".into() }).problem();
        assert_eq!((p.status, p.detail.as_str()), (500, "internal error"));
    }

    #[test]
    fn client_errors_show_detail() {
        let p = ApiError::from(ValidationError::new(
            "vcpus",
            "must be between 1 and 64, got 0",
        ))
        .problem();
        assert_eq!(p.status, 422);
        assert_eq!(p.detail, "vcpus: must be between 1 and 64, got 0");
        assert_eq!(p.type_, "urn:vinfra:problem:validation");
    }
}
