//! The HTTP/JSON API (`/api/v1/...`) and the web console (`/console/`), beside the gRPC
//! services.
//!
//! **One port.** It is served by the same listener and TLS configuration as gRPC: tonic
//! routes with axum already, so the gRPC services and these routes are one router, told
//! apart by path (`/gatekeep.v1.*/...` is gRPC). One port means one certificate, one
//! firewall rule and, in the agent's embedded service on `127.0.0.1`, the console for free.
//! TLS offers only `h2` (tonic's ALPN); every browser and HTTP client in use speaks it.
//!
//! **Same operations, same code.** Every handler validates its input with
//! [`gatekeep_proto::convert`] and calls [`ops`] or the [`Engine`], exactly as the gRPC
//! handlers do; errors map to HTTP statuses from the one gRPC code mapping
//! ([`Error::code`]). Bodies are JSON of the domain types ([`gatekeep_proto::model`]);
//! errors are `{"error": {"code": "not_found", "message": "..."}}`.
//!
//! **Who calls.** Automation sends `authorization: Bearer TOKEN` (a reviewer token, bound to
//! its named identity). The console signs in once with `POST /api/v1/session` and then uses
//! the session cookie; a call authenticated by a session that changes state (any method but
//! GET/HEAD) must carry the session's CSRF token in `x-csrf-token`. Agent certificates are
//! refused here as on the gRPC review service.
//!
//! The `OpenAPI` 3 description is `openapi.json` beside this file, served at
//! `/api/v1/openapi.json`; [`ROUTES`] lists every route and a test checks both agree.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{FromRequest, FromRequestParts, Path, Query, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header, request::Parts},
    response::{
        IntoResponse, Redirect, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use gatekeep_proto::{
    convert,
    model::{Kind, RequestRecord, Verdict},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use uuid::Uuid;

use super::ops::{self, Filter, WatchItem};
use crate::{
    auth::{
        self, Authenticator, Reviewer,
        session::{self, Principal, Session, Sessions},
    },
    config::ConsoleConfig,
    error::Error,
    lifecycle::Engine,
    web,
};

/// The `OpenAPI` 3 description of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route of the HTTP API: method and path (axum syntax). The `OpenAPI` description
/// must describe exactly these (checked by a test), and the router serves exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/session"),
    ("POST", "/api/v1/session"),
    ("DELETE", "/api/v1/session"),
    ("GET", "/api/v1/status"),
    ("GET", "/api/v1/requests"),
    ("GET", "/api/v1/requests/{id}"),
    ("POST", "/api/v1/requests/{id}/decision"),
    ("POST", "/api/v1/requests/{id}/cancel"),
    ("GET", "/api/v1/resolve/{prefix}"),
    ("GET", "/api/v1/events"),
    ("GET", "/api/v1/grants"),
    ("POST", "/api/v1/grants/{id}/revoke"),
    ("GET", "/api/v1/audit/verify"),
    ("GET", "/api/v1/audit/export"),
];

/// What every handler shares.
#[derive(Clone)]
struct HttpState {
    engine: Arc<Engine>,
    auth: Authenticator,
    sessions: Arc<Sessions>,
}

/// The HTTP API and console routes (without the gRPC services), with the security headers
/// on every response.
pub fn router(engine: Arc<Engine>, config: &ConsoleConfig) -> Router {
    let state = HttpState {
        auth: Authenticator::new(Arc::clone(&engine.store)),
        engine,
        sessions: Arc::new(Sessions::new(Duration::from_secs(config.session_ttl_secs))),
    };
    let api = Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route(
            "/api/v1/session",
            get(session_info).post(sign_in).delete(sign_out),
        )
        .route("/api/v1/status", get(status))
        .route("/api/v1/requests", get(list_pending))
        .route("/api/v1/requests/{id}", get(get_request))
        .route("/api/v1/requests/{id}/decision", post(decide))
        .route("/api/v1/requests/{id}/cancel", post(cancel))
        .route("/api/v1/resolve/{prefix}", get(resolve))
        .route("/api/v1/events", get(events))
        .route("/api/v1/grants", get(list_grants))
        .route("/api/v1/grants/{id}/revoke", post(revoke_grant))
        .route("/api/v1/audit/verify", get(verify_audit))
        .route("/api/v1/audit/export", get(export_audit))
        .route("/api/v1/{*rest}", axum::routing::any(no_such_route))
        .with_state(state);
    api.merge(web::router())
        .route("/", get(|| async { Redirect::to("/console/") }))
        .layer(axum::middleware::map_response(web::security_headers))
}

// Errors.

/// An API error: an [`Error`] as an HTTP status and a JSON body.
#[derive(Debug)]
pub struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        Self(error)
    }
}

impl From<gatekeep_proto::WireError> for ApiError {
    fn from(error: gatekeep_proto::WireError) -> Self {
        Self(error.into())
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError(Error::BadArgument {
        message: message.into(),
    })
}

#[derive(Serialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize)]
struct ErrorDetail {
    /// The gRPC code's name in snake case (`invalid_argument`, `not_found`, ...).
    code: &'static str,
    message: String,
}

/// The HTTP status and snake-case name of a gRPC code.
fn http_status(code: tonic::Code) -> (StatusCode, &'static str) {
    use tonic::Code;
    match code {
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_argument"),
        Code::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        Code::FailedPrecondition => (StatusCode::CONFLICT, "failed_precondition"),
        Code::AlreadyExists => (StatusCode::CONFLICT, "already_exists"),
        Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        Code::DataLoss => (StatusCode::INTERNAL_SERVER_ERROR, "data_loss"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = http_status(self.0.code());
        let message = if code == "internal" {
            // Internal details stay in the service's log.
            tracing::error!(error = %self.0, source = ?std::error::Error::source(&self.0), "internal error");
            "internal error in the decision service; see its log".to_owned()
        } else {
            self.0.to_string()
        };
        (
            status,
            Json(ErrorBody {
                error: ErrorDetail { code, message },
            }),
        )
            .into_response()
    }
}

async fn no_such_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError(Error::UnknownRoute {
        route: format!("{method} {}", uri.path()),
    })
}

// Extractors whose rejections are JSON errors too.

/// A JSON body (`content-type: application/json`), rejected as `invalid_argument`.
struct Body<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        Json::<T>::from_request(request, state)
            .await
            .map(|Json(value)| Self(value))
            .map_err(|rejection| bad(format!("body: {}", rejection.body_text())))
    }
}

/// Query parameters, rejected as `invalid_argument`.
struct Params<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| Self(value))
            .map_err(|rejection| bad(format!("query: {}", rejection.body_text())))
    }
}

// Authentication.

/// The header a session-authenticated change of state must carry.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// An authenticated caller.
struct Caller {
    reviewer: Reviewer,
    /// The session it came with, if not a bearer token.
    session: Option<(String, Session)>,
}

impl FromRequestParts<HttpState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ApiError> {
        if parts
            .extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
            .is_some_and(|certs| !certs.is_empty())
        {
            return Err(Error::permission(
                "agent certificates cannot use the review api; connect without a client certificate",
            )
            .into());
        }
        if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
            let value = value
                .to_str()
                .map_err(|_| Error::unauthenticated("malformed authorization header"))?;
            let reviewer = state.auth.by_token(auth::bearer_token(value)?).await?;
            return Ok(Self {
                reviewer,
                session: None,
            });
        }
        let (id, session) = session_of(&parts.headers, &state.sessions)?;
        if !matches!(parts.method, Method::GET | Method::HEAD) {
            let presented = parts
                .headers
                .get(CSRF_HEADER)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default();
            if !session.csrf_matches(presented) {
                return Err(Error::permission(format!(
                    "missing or wrong `{CSRF_HEADER}` header: a change made with a session must carry its csrf token (GET /api/v1/session)"
                ))
                .into());
            }
        }
        let reviewer = match &session.principal {
            Principal::Token { hash } => state
                .engine
                .store
                .reviewer_by_token(hash.clone())
                .await
                .map_err(Error::from)?
                .ok_or_else(|| {
                    Error::unauthenticated(
                        "the reviewer of this session was removed; sign in again",
                    )
                })?,
        };
        Ok(Self {
            reviewer,
            session: Some((id, session)),
        })
    }
}

/// The live session the request's cookie names.
fn session_of(headers: &HeaderMap, sessions: &Sessions) -> Result<(String, Session), Error> {
    let id = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find_map(|value| session::cookie(value, session::COOKIE))
        .ok_or_else(|| {
            Error::unauthenticated(
                "not signed in: send `authorization: Bearer TOKEN` or sign in (POST /api/v1/session)",
            )
        })?;
    let session = sessions.get(id).ok_or_else(|| {
        Error::unauthenticated("the session expired or was signed out; sign in again")
    })?;
    Ok((id.to_owned(), session))
}

// Handlers.

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    /// A reviewer token.
    token: String,
}

#[derive(Serialize)]
struct SessionInfo {
    reviewer: String,
    groups: Vec<String>,
    csrf_token: String,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    signed_in_at: time::OffsetDateTime,
}

fn session_info_of(reviewer: Reviewer, session: &Session) -> SessionInfo {
    SessionInfo {
        reviewer: reviewer.name,
        groups: reviewer.groups,
        csrf_token: session.csrf.clone(),
        expires_at: session.expires_at,
        signed_in_at: session.signed_in_at,
    }
}

/// `POST /api/v1/session`: signs in with a reviewer token, sets the session cookie.
async fn sign_in(
    State(state): State<HttpState>,
    Body(body): Body<SignIn>,
) -> Result<Response, ApiError> {
    let token = auth::bearer_token(&format!("Bearer {}", body.token))?.to_owned();
    let reviewer = state.auth.by_token(&token).await?;
    let (id, session) = state.sessions.create(Principal::Token {
        hash: auth::token_hash(&token),
    })?;
    let cookie = HeaderValue::from_str(&session::set_cookie(&id, state.sessions.ttl()))
        .map_err(|_| bad("unrepresentable cookie"))?;
    Ok((
        [(header::SET_COOKIE, cookie)],
        Json(session_info_of(reviewer, &session)),
    )
        .into_response())
}

/// `GET /api/v1/session`: who is signed in, and the session's CSRF token.
async fn session_info(caller: Caller) -> Result<Json<SessionInfo>, ApiError> {
    let (_, session) = caller
        .session
        .ok_or_else(|| bad("this call authenticated with a bearer token, not a session"))?;
    Ok(Json(session_info_of(caller.reviewer, &session)))
}

/// `DELETE /api/v1/session`: signs out (needs the CSRF token).
async fn sign_out(State(state): State<HttpState>, caller: Caller) -> Result<Response, ApiError> {
    let (id, _) = caller
        .session
        .ok_or_else(|| bad("this call authenticated with a bearer token, not a session"))?;
    state.sessions.remove(&id);
    let cookie = HeaderValue::from_str(&session::clear_cookie())
        .map_err(|_| bad("unrepresentable cookie"))?;
    Ok(([(header::SET_COOKIE, cookie)], StatusCode::NO_CONTENT).into_response())
}

async fn status(
    State(state): State<HttpState>,
    caller: Caller,
) -> Result<Json<ops::StatusReport>, ApiError> {
    Ok(Json(ops::status(&state.engine, caller.reviewer).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterParams {
    #[serde(default)]
    host: String,
    #[serde(default)]
    policy: String,
    kind: Option<Kind>,
    #[serde(default)]
    limit: u32,
}

impl FilterParams {
    fn filter(&self) -> Result<Filter, ApiError> {
        Ok(Filter::new(&self.host, &self.policy, self.kind)?)
    }
}

#[derive(Serialize)]
struct RequestList {
    requests: Vec<RequestRecord>,
}

/// `GET /api/v1/requests`: pending requests, oldest first.
async fn list_pending(
    State(state): State<HttpState>,
    _caller: Caller,
    Params(params): Params<FilterParams>,
) -> Result<Json<RequestList>, ApiError> {
    let filter = params.filter()?;
    let requests = ops::list_pending(&state.engine, &filter, params.limit).await?;
    Ok(Json(RequestList { requests }))
}

/// A request id in a path: a full id or a unique prefix of one (as the CLI accepts).
async fn request_id(engine: &Engine, text: &str) -> Result<Uuid, ApiError> {
    if let Ok(id) = convert::id("id", text) {
        return Ok(id);
    }
    convert::text("id", text, gatekeep_proto::limits::MAX_ID)?;
    Ok(engine.resolve_request_id(text).await?)
}

#[derive(Serialize)]
struct RequestDetail {
    request: RequestRecord,
    /// Decided requests of the same subject, newest first.
    similar: Vec<RequestRecord>,
    /// Whether the caller may decide it now, and why not.
    you: YourPart,
}

#[derive(Serialize)]
struct YourPart {
    may_decide: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    why_not: Option<String>,
}

/// `GET /api/v1/requests/{id}`.
async fn get_request(
    State(state): State<HttpState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<RequestDetail>, ApiError> {
    let id = request_id(&state.engine, &id).await?;
    let (record, similar) = state.engine.get(id).await?;
    let why_not = if record.state.is_final() {
        Some(format!("the request is already {}", record.state))
    } else if let Err(error) = Engine::authorise(&caller.reviewer, &record) {
        Some(error.to_string())
    } else if auth::is_owner(&caller.reviewer, &record) {
        Some(format!(
            "`{}` owns the workload that asked and may deny or cancel it, not approve it",
            caller.reviewer.name
        ))
    } else if record
        .approvals
        .iter()
        .any(|vote| vote.reviewer == caller.reviewer.name)
    {
        Some("you already approved it; another reviewer must approve".to_owned())
    } else {
        None
    };
    Ok(Json(RequestDetail {
        request: record,
        similar,
        you: YourPart {
            may_decide: why_not.is_none(),
            why_not,
        },
    }))
}

#[derive(Serialize)]
struct Resolved {
    request_id: Uuid,
}

/// `GET /api/v1/resolve/{prefix}`: the one request id starting with `prefix`.
async fn resolve(
    State(state): State<HttpState>,
    _caller: Caller,
    Path(prefix): Path<String>,
) -> Result<Json<Resolved>, ApiError> {
    convert::text("prefix", &prefix, gatekeep_proto::limits::MAX_ID)?;
    let request_id = state.engine.resolve_request_id(&prefix).await?;
    Ok(Json(Resolved { request_id }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Decide {
    verdict: Verdict,
    #[serde(default)]
    reason: String,
    /// `once` (default), `session`, `always` or a duration such as `1h`.
    #[serde(default)]
    duration: String,
    /// `workload` (default) or `policy`.
    #[serde(default)]
    scope: String,
}

/// `POST /api/v1/requests/{id}/decision`: approve (one vote towards the quorum) or deny.
async fn decide(
    State(state): State<HttpState>,
    caller: Caller,
    Path(id): Path<String>,
    Body(body): Body<Decide>,
) -> Result<Json<RequestRecord>, ApiError> {
    let id = convert::id("id", &id)?;
    let reason = convert::reason("reason", body.reason)?;
    let duration = convert::duration("duration", &body.duration)?;
    let scope = convert::scope(
        "scope",
        if body.scope.is_empty() {
            "workload"
        } else {
            &body.scope
        },
    )?;
    let record = state
        .engine
        .decide(&caller.reviewer, id, body.verdict, reason, duration, scope)
        .await?;
    Ok(Json(record))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WithReason {
    #[serde(default)]
    reason: String,
}

/// `POST /api/v1/requests/{id}/cancel`: withdraw a pending request (the action is denied).
async fn cancel(
    State(state): State<HttpState>,
    caller: Caller,
    Path(id): Path<String>,
    Body(body): Body<WithReason>,
) -> Result<Json<RequestRecord>, ApiError> {
    let id = convert::id("id", &id)?;
    let reason = convert::reason("reason", body.reason)?;
    Ok(Json(
        state.engine.cancel(&caller.reviewer, id, reason).await?,
    ))
}

#[derive(Serialize)]
struct WatchEvent {
    initial: bool,
    request: RequestRecord,
}

/// `GET /api/v1/events`: server-sent events. `request` events carry `{initial, request}`:
/// first every pending request (`initial: true`), then every change; `end` says why the
/// stream ended (the session expired, the watcher lagged, the service stops).
async fn events(
    State(state): State<HttpState>,
    caller: Caller,
    Params(params): Params<FilterParams>,
) -> Result<impl IntoResponse, ApiError> {
    let filter = params.filter()?;
    let mut items = ops::watch(&state.engine, filter).await?;
    let expiry = caller
        .session
        .map(|(_, session)| tokio::time::Instant::from_std(session.expires));
    let (sender, receiver) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let session_end = async {
            match expiry {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(session_end);
        loop {
            let item = tokio::select! {
                item = items.recv() => item,
                () = &mut session_end => {
                    drop(sender.send(end_event("the session expired; sign in again")).await);
                    return;
                }
                () = sender.closed() => return,
            };
            let event = match item {
                Some(WatchItem::Request { initial, record }) => {
                    match Event::default().event("request").json_data(WatchEvent {
                        initial,
                        request: *record,
                    }) {
                        Ok(event) => event,
                        Err(error) => {
                            tracing::error!(%error, "cannot encode a watch event");
                            return;
                        }
                    }
                }
                Some(WatchItem::Lagged { missed }) => {
                    drop(
                        sender
                            .send(end_event(&format!(
                                "the watch fell {missed} changes behind; watch again"
                            )))
                            .await,
                    );
                    return;
                }
                Some(WatchItem::ShuttingDown) | None => {
                    drop(
                        sender
                            .send(end_event("the decision service is shutting down"))
                            .await,
                    );
                    return;
                }
            };
            if sender.send(event).await.is_err() {
                return;
            }
        }
    });
    let stream = ReceiverStream::new(receiver).map(Ok::<_, Infallible>);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn end_event(message: &str) -> Event {
    Event::default().event("end").data(message)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantParams {
    #[serde(default)]
    host: String,
    #[serde(default)]
    policy: String,
    #[serde(default)]
    include_inactive: bool,
}

#[derive(Serialize)]
struct GrantList {
    grants: Vec<gatekeep_proto::model::Grant>,
}

/// `GET /api/v1/grants`.
async fn list_grants(
    State(state): State<HttpState>,
    _caller: Caller,
    Params(params): Params<GrantParams>,
) -> Result<Json<GrantList>, ApiError> {
    let grants = ops::list_grants(
        &state.engine,
        &params.host,
        &params.policy,
        params.include_inactive,
    )
    .await?;
    Ok(Json(GrantList { grants }))
}

/// `POST /api/v1/grants/{id}/revoke`.
async fn revoke_grant(
    State(state): State<HttpState>,
    caller: Caller,
    Path(id): Path<String>,
    Body(body): Body<WithReason>,
) -> Result<Json<gatekeep_proto::model::Grant>, ApiError> {
    let id = convert::id("id", &id)?;
    let reason = convert::reason("reason", body.reason)?;
    Ok(Json(
        state
            .engine
            .revoke_grant(&caller.reviewer, id, &reason)
            .await?,
    ))
}

/// `GET /api/v1/audit/verify`.
async fn verify_audit(
    State(state): State<HttpState>,
    _caller: Caller,
) -> Result<Json<ops::VerifyReport>, ApiError> {
    Ok(Json(ops::verify_audit(&state.engine).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportParams {
    #[serde(default)]
    from_seq: u64,
}

/// `GET /api/v1/audit/export`: JSON Lines, streamed.
async fn export_audit(
    State(state): State<HttpState>,
    _caller: Caller,
    Params(params): Params<ExportParams>,
) -> Result<Response, ApiError> {
    let chunks = ops::export_audit(&state.engine, params.from_seq).await?;
    let body = axum::body::Body::from_stream(ReceiverStream::new(chunks).map(|chunk| {
        chunk.map_err(|error| {
            tracing::error!(%error, "audit export failed");
            std::io::Error::other(error.to_string())
        })
    }));
    Ok((
        [
            (header::CONTENT_TYPE, "application/jsonl"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"gatekeep-audit.jsonl\"",
            ),
        ],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route in [`ROUTES`] is described in the `OpenAPI` document, and nothing else is.
    #[test]
    fn openapi_describes_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let mut described = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if ["get", "post", "delete", "put", "patch"].contains(&method.as_str()) {
                    described.push((method.to_uppercase(), format!("/api/v1{path}")));
                }
            }
        }
        described.sort();
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(method, path)| ((*method).to_owned(), (*path).to_owned()))
            .collect();
        routes.sort();
        assert_eq!(described, routes);
        // Every operation says what it returns and has an id.
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if method == "parameters" {
                    continue;
                }
                assert!(
                    op["operationId"].is_string(),
                    "{method} {path}: operationId"
                );
                assert!(op["responses"].is_object(), "{method} {path}: responses");
            }
        }
    }

    #[test]
    fn codes_map_to_http() {
        assert_eq!(
            http_status(tonic::Code::PermissionDenied).0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(http_status(tonic::Code::NotFound).0, StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(tonic::Code::InvalidArgument).0,
            StatusCode::BAD_REQUEST
        );
    }
}
