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
//! The OpenAPI 3 description is `openapi.json` beside this file, served at
//! `/api/v1/openapi.json`; [`ROUTES`] lists every route and a test checks both agree.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{FromRequest, FromRequestParts, Path, Query, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header, request::Parts},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use gatekeep_proto::{
    convert,
    model::{Kind, RequestRecord, Verdict},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use uuid::Uuid;

use super::{
    ops::{self, Filter},
    sse,
};
use crate::{
    auth::{
        self, Authenticator, Reviewer,
        oidc::{self, Oidc},
        session::{self, Principal, Session, Sessions},
    },
    config::ConsoleConfig,
    error::Error,
    lifecycle::Engine,
    web,
};

/// The OpenAPI 3 description of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route of the HTTP API: method and path (axum syntax). The OpenAPI description
/// must describe exactly these (checked by a test), and the router serves exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/auth"),
    ("GET", "/api/v1/session"),
    ("POST", "/api/v1/session"),
    ("POST", "/api/v1/token"),
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
    ("GET", "/api/v1/notify/dead-letters"),
    ("POST", "/api/v1/notify/dead-letters/{id}/retry"),
];

/// What every handler shares.
#[derive(Clone)]
struct HttpState {
    engine: Arc<Engine>,
    auth: Authenticator,
    sessions: Arc<Sessions>,
    oidc: Option<Arc<Oidc>>,
    config: Arc<ConsoleConfig>,
    /// Recent changes as live queue events, shared by every console watching.
    encoded: Arc<sse::Encoder>,
}

/// The HTTP API and console routes (without the gRPC services), with the security headers
/// on every response. Fails on an unusable `[console.oidc]` section.
pub fn router(
    engine: Arc<Engine>,
    config: &ConsoleConfig,
    sessions: Arc<Sessions>,
) -> Result<Router, Error> {
    let oidc = config
        .oidc
        .clone()
        .map(|oidc| Oidc::new(oidc).map(Arc::new))
        .transpose()?;
    let state = HttpState {
        auth: Authenticator::new(Arc::clone(&engine.store)).with_sessions(Arc::clone(&sessions)),
        engine,
        sessions,
        oidc,
        config: Arc::new(config.clone()),
        encoded: Arc::default(),
    };
    let api = Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/auth", get(auth_methods))
        .route(
            "/api/v1/session",
            get(session_info).post(sign_in).delete(sign_out),
        )
        .route("/api/v1/token", post(device_token))
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
        .route("/api/v1/notify/dead-letters", get(dead_letters))
        .route(
            "/api/v1/notify/dead-letters/{id}/retry",
            post(retry_dead_letter),
        )
        // Unknown API paths get a JSON refusal; the catch-all needs a non-empty rest, so the
        // API's root is routed too (found by the http_api fuzz target).
        .route("/api/v1/{*rest}", axum::routing::any(no_such_route))
        .route("/api/v1/", axum::routing::any(no_such_route))
        .route("/api/v1", axum::routing::any(no_such_route))
        .route("/auth/oidc/login", get(oidc_login))
        .route("/auth/oidc/callback", get(oidc_callback))
        // A known route with another method: a JSON refusal too, not axum's empty 405
        // (found by the http_api fuzz target).
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state);
    Ok(api
        .merge(web::router())
        .route("/", get(|| async { Redirect::to("/console/") }))
        .layer(axum::middleware::map_response(web::security_headers)))
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
        if let Error::ReauthRequired { max_age, .. } = &self.0 {
            // The console sends the reviewer to the provider with this, then back.
            return (
                status,
                Json(serde_json::json!({
                    "error": {
                        "code": "reauthenticate",
                        "message": self.0.to_string(),
                        "reauth_url": format!("/auth/oidc/login?max_age={max_age}"),
                    }
                })),
            )
                .into_response();
        }
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

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ErrorBody {
            error: ErrorDetail {
                code: "method_not_allowed",
                message: format!("{} does not answer {method}", uri.path()),
            },
        }),
    )
        .into_response()
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

/// The route's one path parameter (`{id}`, `{prefix}`), rejected as `invalid_argument`
/// (a percent-encoding that is not UTF-8, say) like every other API error.
struct PathParam(String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| Self(value))
            .map_err(|rejection| bad(format!("path: {}", rejection.body_text())))
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
    /// When the caller last authenticated at the identity provider (`None`: a token).
    auth_time: Option<time::OffsetDateTime>,
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
            let (reviewer, auth_time) = state
                .auth
                .caller_by_token(auth::bearer_token(value)?)
                .await?;
            return Ok(Self {
                reviewer,
                session: None,
                auth_time,
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
        let (reviewer, auth_time) = match &session.principal {
            Principal::Oidc {
                reviewer,
                auth_time,
            } => (reviewer.clone(), Some(*auth_time)),
            Principal::Token { hash } => (
                state
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
                None,
            ),
        };
        Ok(Self {
            reviewer,
            session: Some((id, session)),
            auth_time,
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

#[derive(Serialize)]
struct AuthMethods {
    /// Whether the console accepts a reviewer token to sign in.
    token_sign_in: bool,
    /// The OpenID Connect provider's display name, when one is configured.
    oidc: Option<String>,
    /// What `gatekeep login` needs for the device flow, when the CLI may sign in.
    device: Option<oidc::DeviceClient>,
}

/// `GET /api/v1/auth`: how one may sign in (public).
async fn auth_methods(State(state): State<HttpState>) -> Json<AuthMethods> {
    Json(AuthMethods {
        token_sign_in: state.config.token_sign_in,
        oidc: state
            .oidc
            .as_ref()
            .map(|oidc| oidc.display_name().to_owned()),
        device: state.oidc.as_ref().and_then(|oidc| oidc.device_client()),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceToken {
    /// An ID token from the device flow, issued to `cli_client_id`.
    id_token: String,
}

#[derive(Serialize)]
struct CliSession {
    /// The bearer token for the gRPC and HTTP APIs until `expires_at`.
    token: String,
    reviewer: String,
    groups: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: time::OffsetDateTime,
}

/// `POST /api/v1/token`: `gatekeep login` hands over the provider's ID token and gets a
/// command-line session, whose id is its bearer token.
async fn device_token(
    State(state): State<HttpState>,
    Body(body): Body<DeviceToken>,
) -> Result<Json<CliSession>, ApiError> {
    let oidc = state.oidc.as_ref().ok_or_else(no_oidc)?;
    convert::text("id_token", &body.id_token, 64 * 1024)?;
    let identity = oidc.validate_device_token(&body.id_token).await?;
    tracing::info!(reviewer = %identity.reviewer.name, "command-line sign-in");
    let (token, session) = state.sessions.create_bearer(Principal::Oidc {
        reviewer: identity.reviewer.clone(),
        auth_time: identity.auth_time,
    })?;
    Ok(Json(CliSession {
        token,
        reviewer: identity.reviewer.name,
        groups: identity.reviewer.groups,
        expires_at: session.expires_at,
    }))
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
    if !state.config.token_sign_in {
        return Err(Error::permission(
            "this console signs in with the identity provider only (console.token_sign_in = false)",
        )
        .into());
    }
    let token = auth::bearer_token(&format!("Bearer {}", body.token))?.to_owned();
    let reviewer = state.auth.by_token(&token).await?;
    let (id, session) = state.sessions.create(Principal::Token {
        hash: auth::token_hash(&token),
    })?;
    let cookie = session_cookie(&state, &id)?;
    Ok((
        [(header::SET_COOKIE, cookie)],
        Json(session_info_of(reviewer, &session)),
    )
        .into_response())
}

fn session_cookie(state: &HttpState, id: &str) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(&session::set_cookie(id, state.sessions.ttl()))
        .map_err(|_| bad("unrepresentable cookie"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginParams {
    /// Ask the provider for an authentication at most this old (seconds; 0: now).
    max_age: Option<u64>,
    /// The console route to return to (`#/request/ID`).
    #[serde(default, rename = "return")]
    return_to: String,
}

/// A console route to return to after sign-in: only `#/` followed by plain characters, so
/// the callback never redirects anywhere else.
fn console_route(text: &str) -> &str {
    let plain = text.strip_prefix("#/").is_some_and(|rest| {
        rest.len() <= 100
            && rest
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_'))
    });
    if plain { text } else { "#/queue" }
}

fn no_oidc() -> ApiError {
    ApiError(Error::UnknownRoute {
        route: "openid connect sign-in (no [console.oidc] configured)".to_owned(),
    })
}

/// `GET /auth/oidc/login`: sends the browser to the provider (code flow with PKCE).
async fn oidc_login(
    State(state): State<HttpState>,
    Params(params): Params<LoginParams>,
) -> Result<Response, ApiError> {
    let oidc = state.oidc.as_ref().ok_or_else(no_oidc)?;
    let (url, login_state) = oidc
        .start(params.max_age, console_route(&params.return_to))
        .await?;
    let cookie = HeaderValue::from_str(&session::set_login_cookie(
        oidc::LOGIN_COOKIE,
        &login_state,
        Duration::from_mins(10),
    ))
    .map_err(|_| bad("unrepresentable cookie"))?;
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to(&url)).into_response())
}

#[derive(Deserialize)]
struct CallbackParams {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// `GET /auth/oidc/callback`: the provider's redirect back; opens the session.
async fn oidc_callback(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Query(params): Query<CallbackParams>,
) -> Response {
    let clear_login = (
        header::SET_COOKIE,
        HeaderValue::from_str(&session::clear_named_cookie(oidc::LOGIN_COOKIE))
            .unwrap_or(HeaderValue::from_static("")),
    );
    match finish_sign_in(&state, &headers, params).await {
        Ok((id, return_to)) => {
            let mut response = Redirect::to(&format!("/console/{return_to}")).into_response();
            let headers = response.headers_mut();
            headers.append(clear_login.0, clear_login.1);
            if let Ok(cookie) = session_cookie(&state, &id) {
                headers.append(header::SET_COOKIE, cookie);
            }
            response
        }
        Err(ApiError(error)) => {
            tracing::info!(%error, "console sign-in refused");
            let message = if error.code() == tonic::Code::Internal {
                "internal error in the decision service; see its log".to_owned()
            } else {
                error.to_string()
            };
            let mut query = reqwest::Url::parse("https://x/console/").expect("a valid url");
            query.query_pairs_mut().append_pair("error", &message);
            let target = format!("/console/?{}", query.query().unwrap_or_default());
            let mut response = Redirect::to(&target).into_response();
            response.headers_mut().append(clear_login.0, clear_login.1);
            response
        }
    }
}

async fn finish_sign_in(
    state: &HttpState,
    headers: &HeaderMap,
    params: CallbackParams,
) -> Result<(String, String), ApiError> {
    let oidc = state.oidc.as_ref().ok_or_else(no_oidc)?;
    if let Some(error) = params.error {
        let detail = params.error_description.unwrap_or_default();
        return Err(Error::unauthenticated(format!(
            "the identity provider refused the sign-in: {error} {detail}"
        ))
        .into());
    }
    let (Some(code), Some(login_state)) = (params.code, params.state) else {
        return Err(bad("the callback needs `code` and `state`"));
    };
    let cookie_state = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find_map(|value| session::cookie(value, oidc::LOGIN_COOKIE));
    let (identity, return_to) = oidc.finish(&code, &login_state, cookie_state).await?;
    tracing::info!(reviewer = %identity.reviewer.name, groups = ?identity.reviewer.groups, "console sign-in");
    let (id, _) = state.sessions.create(Principal::Oidc {
        reviewer: identity.reviewer,
        auth_time: identity.auth_time,
    })?;
    Ok((id, return_to))
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
    /// May approve (a vote towards the quorum) now.
    may_decide: bool,
    /// May deny or withdraw it now (owners may; reviewers outside its groups may not).
    may_deny: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    why_not: Option<String>,
}

/// `GET /api/v1/requests/{id}`.
async fn get_request(
    State(state): State<HttpState>,
    caller: Caller,
    PathParam(id): PathParam,
) -> Result<Json<RequestDetail>, ApiError> {
    let id = request_id(&state.engine, &id).await?;
    let (record, similar) = state.engine.get(id).await?;
    let not_in_groups = Engine::authorise(&caller.reviewer, &record).err();
    let why_not = if record.state.is_final() {
        Some(format!("the request is already {}", record.state))
    } else if let Some(error) = &not_in_groups {
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
    let may_deny = !record.state.is_final() && not_in_groups.is_none();
    Ok(Json(RequestDetail {
        request: record,
        similar,
        you: YourPart {
            may_decide: why_not.is_none(),
            may_deny,
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
    PathParam(prefix): PathParam,
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
    PathParam(id): PathParam,
    Body(body): Body<Decide>,
) -> Result<Json<RequestRecord>, ApiError> {
    let id = convert::id("id", &id)?;
    let reason = convert::reason("reason", body.reason)?;
    ops::check_auth_age(
        &state.engine,
        &state.config.max_auth_age,
        id,
        body.verdict,
        caller.auth_time,
    )
    .await?;
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
    PathParam(id): PathParam,
    Body(body): Body<WithReason>,
) -> Result<Json<RequestRecord>, ApiError> {
    let id = convert::id("id", &id)?;
    let reason = convert::reason("reason", body.reason)?;
    Ok(Json(
        state.engine.cancel(&caller.reviewer, id, reason).await?,
    ))
}

/// `GET /api/v1/events`: the live queue as server-sent events. `requests` events carry a
/// JSON array of `{initial, row}`, each request as its queue row (see `queue_row`; its
/// whole record is `GET /api/v1/requests/{id}`): first every pending request
/// (`initial: true`), then `ready`, then every request that entered the queue or changed in
/// it; `left` events a JSON
/// array of `{id, state}`, the requests that left it (decided, expired, withdrawn). Changes
/// close together share their events, each request once in its latest state. `end` says why
/// the stream ended (the session expired, the watcher lagged, the service stops).
async fn events(
    State(state): State<HttpState>,
    caller: Caller,
    Params(params): Params<FilterParams>,
) -> Result<Response, ApiError> {
    let filter = params.filter()?;
    // A console's watch ends with its session.
    let expiry = caller
        .session
        .map(|(_, session)| tokio::time::Instant::from_std(session.expires));
    let groups = ops::watch_batched(&state.engine, filter, expiry).await?;
    Ok(sse::response(Arc::clone(&state.encoded), groups))
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

impl Caller {
    /// Refuses a caller outside `[console] admin_groups`.
    fn require_admin(&self, config: &ConsoleConfig) -> Result<(), ApiError> {
        if self
            .reviewer
            .groups
            .iter()
            .any(|group| config.admin_groups.contains(group))
        {
            return Ok(());
        }
        Err(ApiError(Error::PermissionDenied {
            message: format!(
                "`{}` is not an administrator: only members of [console] admin_groups ({}) may do this",
                self.reviewer.name,
                if config.admin_groups.is_empty() {
                    "none configured".to_owned()
                } else {
                    config.admin_groups.join(", ")
                }
            ),
        }))
    }
}

#[derive(Serialize)]
struct DeadLetterList {
    dead_letters: Vec<crate::notify::replay::DeadLetterView>,
}

/// `GET /api/v1/notify/dead-letters` (administrators).
async fn dead_letters(
    State(state): State<HttpState>,
    caller: Caller,
) -> Result<Json<DeadLetterList>, ApiError> {
    caller.require_admin(&state.config)?;
    Ok(Json(DeadLetterList {
        dead_letters: crate::notify::replay::list(&*state.engine.store).await?,
    }))
}

/// `POST /api/v1/notify/dead-letters/{id}/retry` (administrators).
async fn retry_dead_letter(
    State(state): State<HttpState>,
    caller: Caller,
    PathParam(id): PathParam,
) -> Result<Json<crate::notify::replay::DeadLetterView>, ApiError> {
    caller.require_admin(&state.config)?;
    let id: i64 = id
        .parse()
        .map_err(|_| bad(format!("id: `{id}` is not a dead letter id (a number)")))?;
    let letter = crate::notify::replay::retry(&*state.engine.store, id).await?;
    tracing::info!(
        id,
        sink = letter.sink,
        key = letter.key,
        by = caller.reviewer.name,
        "dead letter queued for delivery again"
    );
    Ok(Json(letter))
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
    PathParam(id): PathParam,
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

    /// Every route in [`ROUTES`] is described in the OpenAPI document, and nothing else is.
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
