//! Terminals: register (secret shown once), bind to a VM, unbind, delete; and the
//! operation messages they send. A message is authenticated by its MAC with the
//! terminal's secret — the terminal's credential, in place of a bearer token — and acts
//! on the VM of the terminal's binding only (`control::terminals`).

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Query, Request, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use model::api::Problem;
use model::terminals::{
    AnswerOutcome, BindTerminal, CreateTerminal, CreatedTerminal, OperationAnswers,
    OperationOutcome, OperationResult, PerformedOperation, SessionReplies, SessionReply, Terminal,
    MAX_ANSWERS, MAX_OPERATION_MESSAGE,
};
use model::{Role, TerminalId};

use crate::extract::AppPath;
use crate::routes::tenants::write_tenant;
use crate::{ApiError, AppJson, AppState, Caller};

/// Registers a terminal; the answer holds its secret, shown this once.
#[utoipa::path(post, path = "/v1/terminals", tag = "terminals", request_body = CreateTerminal,
    responses(
        (status = 201, body = CreatedTerminal),
        (status = 401, description = "no, invalid or expired token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "agent or read-only token; a member naming a tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "name taken in the tenant", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "bad name or tenant", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the server has no secrets key", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<CreateTerminal>,
) -> Result<(StatusCode, Json<CreatedTerminal>), ApiError> {
    caller.require(&[Role::Admin, Role::Member], "creating a terminal")?;
    let (name, tenant) = body.validate()?;
    let tenant = write_tenant(&state, &caller, tenant.as_ref()).await?;
    let created = state.control().create_terminal(tenant, name).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Lists the caller's terminals (an admin: every tenant's).
#[utoipa::path(get, path = "/v1/terminals", tag = "terminals",
    responses(
        (status = 200, body = Vec<Terminal>),
        (status = 401, description = "no, invalid or expired token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "agent token", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Terminal>>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "listing terminals")?;
    Ok(Json(state.control().list_terminals(caller.scope()?).await?))
}

/// One terminal, by name or id.
#[utoipa::path(get, path = "/v1/terminals/{terminal}", tag = "terminals",
    params(("terminal" = String, Path, description = "terminal name or id")),
    responses(
        (status = 200, body = Terminal),
        (status = 401, description = "no, invalid or expired token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "agent token", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(t): AppPath,
) -> Result<Json<Terminal>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "reading a terminal")?;
    Ok(Json(state.control().terminal(caller.scope()?, &t).await?))
}

/// Deletes a terminal: its secret is worthless from then on.
#[utoipa::path(delete, path = "/v1/terminals/{terminal}", tag = "terminals",
    params(("terminal" = String, Path, description = "terminal name or id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "no, invalid or expired token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "agent or read-only token", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(t): AppPath,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "deleting a terminal")?;
    state.control().delete_terminal(caller.scope()?, &t).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Binds a terminal to a VM of its tenant; `exclusive` keeps other terminals off it.
#[utoipa::path(put, path = "/v1/terminals/{terminal}/binding", tag = "terminals", request_body = BindTerminal,
    params(("terminal" = String, Path, description = "terminal name or id")),
    responses(
        (status = 200, body = Terminal),
        (status = 401, description = "no, invalid or expired token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "agent or read-only token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such terminal, or no such VM in the terminal's tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the VM is held exclusively, or an exclusive bind would share it", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "bad body", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn bind(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(t): AppPath,
    AppJson(body): AppJson<BindTerminal>,
) -> Result<Json<Terminal>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "binding a terminal")?;
    let bound = state
        .control()
        .bind_terminal(caller.scope()?, &t, &body.vm, body.policy)
        .await?;
    Ok(Json(bound))
}

/// Unbinds a terminal: its messages are refused until it is bound again.
#[utoipa::path(delete, path = "/v1/terminals/{terminal}/binding", tag = "terminals",
    params(("terminal" = String, Path, description = "terminal name or id")),
    responses(
        (status = 200, body = Terminal),
        (status = 401, description = "no, invalid or expired token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "agent or read-only token", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn unbind(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(t): AppPath,
) -> Result<Json<Terminal>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "unbinding a terminal")?;
    Ok(Json(
        state.control().unbind_terminal(caller.scope()?, &t).await?,
    ))
}

/// The terminal's recent operations on this server (the second operation information:
/// which operation, from which terminal, on which VM, and how it fared).
#[utoipa::path(get, path = "/v1/terminals/{terminal}/operations", tag = "terminals",
    params(("terminal" = String, Path, description = "terminal name or id")),
    responses(
        (status = 200, body = Vec<PerformedOperation>),
        (status = 401, description = "no, invalid or expired token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "agent token", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn operations(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(t): AppPath,
) -> Result<Json<Vec<PerformedOperation>>, ApiError> {
    caller.require(
        &[Role::Admin, Role::Member],
        "reading a terminal's operations",
    )?;
    Ok(Json(
        state
            .control()
            .terminal_operations(caller.scope()?, &t)
            .await?,
    ))
}

/// Takes one operation message from a terminal: `{"header": {server, terminal, seq,
/// timestamp, mac}, "body": {"operation": …}}`. No bearer token: the MAC with the
/// terminal's secret authenticates it. The VM is the terminal's bound VM, whatever the
/// body says. Answers once the VM's host performed it (200), or after 3 s with the
/// operation still on its way (202; its record shows the outcome later).
#[utoipa::path(post, path = "/v1/terminal-operations", tag = "terminals",
    security(()),
    request_body(content = Object, description = "an operation message", content_type = "application/json"),
    responses(
        (status = 200, description = "performed (or failed) on the VM", body = PerformedOperation),
        (status = 202, description = "sent to the VM's host (or held while the VM's migration moves its memory), no answer yet", body = PerformedOperation),
        (status = 400, description = "not an operation message", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "unknown terminal, MAC that does not verify, timestamp too far off, another server's message", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "sequence number already performed, terminal unbound, VM gone", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "longer than 16 KiB", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "the operation is not valid", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "over the terminal's rate", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn operation(
    State(state): State<AppState>,
    req: Request,
) -> Result<(StatusCode, Json<PerformedOperation>), ApiError> {
    let bytes =
        crate::extract::json_object_bytes(req, "operation message", MAX_OPERATION_MESSAGE).await?;
    let done = state.control().perform_operation(&bytes).await?;
    let status = if matches!(
        done.outcome,
        OperationOutcome::Sent | OperationOutcome::Held
    ) {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(done)))
}

/// Opens a terminal session: a WebSocket on which a terminal sends operation messages
/// (one per text or binary message, each exactly as for `POST /v1/terminal-operations`)
/// and gets one `SessionReply` per message, in order. No bearer token: each message's MAC
/// authenticates it; the session belongs to the terminal of its first accepted message.
/// The server pings every 5 s and there is no idle timeout; when the session ends
/// (closed, dropped, or silent for 15 s) every key and pointer button its operations
/// hold down is released on the VM. A browser's request must come from this server's
/// own origin. With `replies=brief` an answer is the operation's sequence number and
/// outcome (`SessionReply::Outcome`) instead of its whole record.
#[utoipa::path(get, path = "/v1/terminal-sessions", tag = "terminals",
    security(()),
    params(SessionParams),
    responses(
        (status = 101, description = "switching to the WebSocket protocol; then one `SessionReply` per message", body = SessionReply),
        (status = 400, description = "not a WebSocket handshake, or a `replies` other than `full` or `brief`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "an `Origin` other than this server's", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn session(
    State(state): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<SessionParams>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    check_origin(&headers)?;
    let Query(q) = q.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    let ws = ws.map_err(|e| ApiError::BadRequest(format!("not a WebSocket handshake: {e}")))?;
    let session = state.control().terminal_session();
    Ok(ws
        .max_message_size(MAX_OPERATION_MESSAGE)
        .max_frame_size(MAX_OPERATION_MESSAGE)
        .on_upgrade(move |socket| crate::session::serve(socket, session, q.replies)))
}

/// `GET /v1/terminal-sessions?replies=brief`.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct SessionParams {
    /// `full` (default): each answer carries the operation's record; `brief`: its
    /// sequence number and outcome only (and a screenshot's picture, a failure's reason).
    #[serde(default)]
    replies: SessionReplies,
}

/// A browser sends `Origin` with a WebSocket handshake: only a page of this server
/// (same host and port) may open a session, so that another site's page cannot drive a
/// terminal whose secret a user's browser holds. Clients that are not browsers send none.
fn check_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest.trim_end_matches('/'));
    match (origin_host, host) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => Ok(()),
        _ => Err(ApiError::Forbidden(format!(
            "Origin {:?} is not this server's: a terminal session opens only from this server's own pages",
            origin.to_str().unwrap_or("(not text)")
        ))),
    }
}

/// Several answers of hosts to terminal operations they were sent, in one request (agent
/// protocol): each recorded as `PUT …/result` would, and its own status in the answer.
#[utoipa::path(post, path = "/v1/terminal-operations/results", tag = "agents",
    request_body = OperationAnswers,
    responses(
        (status = 200, body = [AnswerOutcome], description = "one outcome per answer, in order"),
        (status = 401, description = "no, invalid or expired token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "not an agent or admin token", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "bad body, or more than 256 answers", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn results(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<OperationAnswers>,
) -> Result<Json<Vec<AnswerOutcome>>, ApiError> {
    caller.require(&[Role::Admin, Role::Agent], "answering terminal operations")?;
    if body.answers.len() > MAX_ANSWERS {
        return Err(ApiError::Unprocessable(format!(
            "answers: {} answers exceed the limit of {MAX_ANSWERS}",
            body.answers.len()
        )));
    }
    let keys: Vec<_> = body.answers.iter().map(|a| (a.terminal, a.seq)).collect();
    let done = state.control().answer_operations(body.answers).await;
    Ok(Json(
        keys.into_iter()
            .zip(done)
            .map(|((terminal, seq), r)| match r {
                Ok(_) => AnswerOutcome {
                    terminal,
                    seq,
                    status: 200,
                    detail: None,
                },
                Err(e) => {
                    let e = ApiError::from(e);
                    AnswerOutcome {
                        terminal,
                        seq,
                        status: e.status().0.as_u16(),
                        detail: Some(e.to_string()),
                    }
                }
            })
            .collect(),
    ))
}

/// The host's answer to a terminal operation it was sent (agent protocol).
#[utoipa::path(put, path = "/v1/terminal-operations/{terminal}/{seq}/result", tag = "agents",
    request_body = OperationResult,
    params(
        ("terminal" = String, Path, description = "terminal id"),
        ("seq" = u64, Path, description = "the message's sequence number"),
    ),
    responses(
        (status = 200, body = PerformedOperation),
        (status = 401, description = "no, invalid or expired token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "not an agent or admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such operation", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the operation was sent to another host", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "bad body", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn result(
    State(state): State<AppState>,
    caller: Caller,
    axum::extract::Path((terminal, seq)): axum::extract::Path<(String, String)>,
    AppJson(body): AppJson<OperationResult>,
) -> Result<Json<PerformedOperation>, ApiError> {
    caller.require(
        &[Role::Admin, Role::Agent],
        "answering a terminal operation",
    )?;
    let not_found = || ApiError::NotFound {
        kind: "terminal operation",
        id: format!("{terminal}/{seq}"),
    };
    let t: TerminalId = terminal.parse().map_err(|_| not_found())?;
    let seq: u64 = seq.parse().map_err(|_| not_found())?;
    Ok(Json(state.control().answer_operation(t, seq, body).await?))
}
