//! One raw request through the HTTP API and console routes, in process, and the invariants
//! every answer keeps whatever was asked: the `http_api` fuzz target (issue 24) runs it on
//! arbitrary bytes, and a test replays the target's seeds through it.
//!
//! The input is `FLAGS PATH\nBODY`: the first byte picks the method and the credentials
//! (none, the probe's own reviewer token, a garbage token, a garbage session cookie with a
//! CSRF header), then the path and query up to the first newline, then the body, sent as
//! `application/json`.

use std::{path::Path, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    http::{HeaderValue, Method, Request, StatusCode, Uri, header},
};
use tower::ServiceExt as _;

use crate::{
    Error, Server, ServerConfig,
    api::http::{self, CSRF_HEADER},
    auth::session::{COOKIE, Sessions},
    certs::Pki,
};

/// Longest the probe waits for an answer: a request that takes longer is reported as a hang.
const PATIENCE: Duration = Duration::from_secs(10);
/// Largest answer body read back (an export of the probe's small log is far below it).
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// Routes that answer a caller without credentials.
const PUBLIC_ROUTES: &[&str] = &["/api/v1/openapi.json", "/api/v1/auth"];

const METHODS: [Method; 7] = [
    Method::GET,
    Method::POST,
    Method::DELETE,
    Method::PUT,
    Method::PATCH,
    Method::HEAD,
    Method::OPTIONS,
];

/// Who the request claims to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credentials {
    None,
    Reviewer,
    GarbageToken,
    GarbageSession,
}

/// A decision service's HTTP side on a fresh `SQLite` store, with one reviewer.
pub struct HttpProbe {
    runtime: tokio::runtime::Runtime,
    router: Router,
    token: String,
}

impl std::fmt::Debug for HttpProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProbe").finish_non_exhaustive()
    }
}

/// An answer that breaks an invariant: what was asked and what came back.
#[derive(Debug, thiserror::Error)]
#[error("{method} {uri} ({credentials:?}) answered {status}: {what}")]
pub struct Violation {
    method: Method,
    uri: Uri,
    credentials: Credentials,
    status: StatusCode,
    what: String,
}

impl HttpProbe {
    /// A service whose state lives under `data_dir` (created if missing), with the reviewer
    /// `probe` (group `sre`).
    pub fn start(data_dir: &Path) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| Error::ReadConfig {
                path: data_dir.to_owned(),
                source,
            })?;
        let config = ServerConfig {
            data_dir: data_dir.to_owned(),
            name: "http-probe".into(),
            ..ServerConfig::default()
        };
        let (router, token) = runtime.block_on(async {
            let listener =
                std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Bind {
                    addr: "127.0.0.1:0".into(),
                    source,
                })?;
            let server = Server::builder(config.clone())
                .tls(Pki::ephemeral(&[])?.tls())
                .listener(listener)
                .build()
                .await?;
            let token = server.add_reviewer("probe", &["sre".to_owned()]).await?;
            let sessions = Arc::new(Sessions::new(Duration::from_secs(
                config.console.session_ttl_secs,
            )));
            let router = http::router(Arc::clone(server.engine()), &config.console, sessions)?;
            Ok::<_, Error>((router, token))
        })?;
        Ok(Self {
            runtime,
            router,
            token,
        })
    }

    /// Sends `input` (see the module's documentation), checks the answer and returns its
    /// status. Inputs that are not a request (no newline, a path that is not a URI) are
    /// skipped: `None`.
    pub fn exercise(&self, input: &[u8]) -> Result<Option<StatusCode>, Box<Violation>> {
        let Some((&flags, rest)) = input.split_first() else {
            return Ok(None);
        };
        let Some(newline) = rest.iter().position(|b| *b == b'\n') else {
            return Ok(None);
        };
        let (path, body) = (&rest[..newline], &rest[newline + 1..]);
        let Ok(uri) = Uri::try_from(path) else {
            return Ok(None);
        };
        if !uri.path().starts_with('/') || uri.authority().is_some() {
            return Ok(None);
        }
        let method = METHODS[usize::from(flags & 7) % METHODS.len()].clone();
        let credentials = match (flags >> 3) & 3 {
            0 => Credentials::None,
            1 => Credentials::Reviewer,
            2 => Credentials::GarbageToken,
            _ => Credentials::GarbageSession,
        };
        let mut request = Request::builder()
            .method(method.clone())
            .uri(uri.clone())
            .header(header::CONTENT_TYPE, "application/json");
        match credentials {
            Credentials::None => {}
            Credentials::Reviewer => {
                request = request.header(header::AUTHORIZATION, format!("Bearer {}", self.token));
            }
            Credentials::GarbageToken => {
                request = request.header(header::AUTHORIZATION, "Bearer gk_not-a-token");
            }
            Credentials::GarbageSession => {
                request = request
                    .header(header::COOKIE, format!("{COOKIE}=not-a-session"))
                    .header(CSRF_HEADER, "not-a-csrf-token");
            }
        }
        let Ok(request) = request.body(Body::from(body.to_vec())) else {
            return Ok(None);
        };
        let violation = |status, what: String| {
            Box::new(Violation {
                method: method.clone(),
                uri: uri.clone(),
                credentials,
                status,
                what,
            })
        };
        self.runtime.block_on(async {
            let answer = tokio::time::timeout(PATIENCE, self.router.clone().oneshot(request))
                .await
                .map_err(|_| violation(StatusCode::REQUEST_TIMEOUT, "no answer".into()))?
                .unwrap_or_else(|never| match never {});
            let status = answer.status();
            check_answer_headers(&answer).map_err(|what| violation(status, what))?;
            let is_api = uri.path().starts_with("/api/v1/");
            if status == StatusCode::INTERNAL_SERVER_ERROR {
                return Err(violation(status, "an internal error".into()));
            }
            if is_api
                && status.is_success()
                && credentials != Credentials::Reviewer
                && !PUBLIC_ROUTES.contains(&uri.path())
            {
                return Err(violation(status, "succeeded without credentials".into()));
            }
            if is_streaming(&answer) {
                // The event stream never ends; its status and headers are the answer.
                return Ok(Some(status));
            }
            let bytes = tokio::time::timeout(
                PATIENCE,
                axum::body::to_bytes(answer.into_body(), MAX_ANSWER_BYTES),
            )
            .await
            .map_err(|_| violation(status, "the body never ended".into()))?
            .map_err(|error| violation(status, format!("unreadable body: {error}")))?;
            if is_api && status.is_client_error() && method != Method::HEAD {
                check_error_body(&bytes).map_err(|what| violation(status, what))?;
            }
            Ok(Some(status))
        })
    }
}

/// Every answer carries the console's security headers.
fn check_answer_headers(answer: &axum::response::Response) -> Result<(), String> {
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("cache-control", "no-store"),
    ] {
        if answer.headers().get(name) != Some(&HeaderValue::from_static(value)) {
            return Err(format!("header {name} is not {value:?}"));
        }
    }
    if !answer.headers().contains_key("content-security-policy") {
        return Err("no content-security-policy header".into());
    }
    Ok(())
}

fn is_streaming(answer: &axum::response::Response) -> bool {
    answer
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/event-stream"))
}

/// An API's refusal is a JSON object `{"error": {"code": "...", "message": "..."}}`.
fn check_error_body(bytes: &[u8]) -> Result<(), String> {
    let body: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|error| format!("the refusal is not JSON ({error})"))?;
    let error = &body["error"];
    if !error["code"].is_string() || !error["message"].is_string() {
        return Err(format!("the refusal has no error code and message: {body}"));
    }
    Ok(())
}
