//! A local stand-in for Slack's Web API (`chat.postMessage`, `chat.update`,
//! `chat.postEphemeral`, `users.info`), a Teams Workflows webhook and webhook receivers.
//! Every call is checked against the documented shapes (auth header, JSON fields, the
//! Adaptive Card envelope, webhook signatures) and recorded; a shape that is wrong is a
//! recorded violation the tests assert empty. It can fail on purpose: a number of 500s,
//! then 429s with `Retry-After`, before answering.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};

pub const BOT_TOKEN: &str = "xoxb-1234-5678-standin";
pub const SIGNING_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
pub const WEBHOOK_KEY: &str = "whsec-standin-key";
pub const TEAM: &str = "T0GATEKEEP";

/// One call the stand-in received.
#[derive(Debug, Clone)]
pub struct Call {
    /// `chat.postMessage`, `teams`, `hook:NAME`, ...
    pub method: String,
    pub headers: HashMap<String, String>,
    pub body: Value,
    /// The status it was answered with.
    pub status: u16,
}

#[derive(Default)]
struct Inner {
    calls: Vec<Call>,
    violations: Vec<String>,
    /// Failures still to answer, per method: 500s first, then 429s.
    fail_500: HashMap<String, u32>,
    fail_429: HashMap<String, u32>,
    /// Methods answered with a permanent refusal (400 / Slack `channel_not_found`).
    refuse: Vec<String>,
    /// A slow receiver: each answer of these methods waits this long.
    delay: HashMap<String, Duration>,
    next_ts: u64,
}

#[derive(Clone, Default)]
pub struct StandIn(Arc<Mutex<Inner>>);

/// Slack users the stand-in knows: id, email, confirmed, team.
const USERS: &[(&str, &str, bool)] = &[
    ("U0ALICE", "Alice@Example.com", true),
    ("U0CAROL", "carol@example.com", true),
    ("U0WORKER", "worker@example.com", true),
    ("U0MALLORY", "mallory@elsewhere.example", true),
    ("U0BOB", "bob@example.com", true),
    ("U0UNCONFIRMED", "dave@example.com", false),
];

impl StandIn {
    /// Serves on `addr` (bound now) until the test ends.
    pub async fn serve_on(&self, addr: SocketAddr) {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind stand-in");
        let app = Router::new()
            .route("/api/users.info", get(users_info))
            .route("/api/{method}", post(slack_method))
            .route("/teams/workflow", post(teams))
            .route("/hooks/{name}", post(hook))
            .with_state(self.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("stand-in serves");
        });
    }

    /// A free loopback address (nothing listens on it until [`serve_on`](Self::serve_on)).
    pub fn free_addr() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address")
    }

    pub async fn start() -> (Self, SocketAddr) {
        let standin = Self::default();
        let addr = Self::free_addr();
        standin.serve_on(addr).await;
        (standin, addr)
    }

    pub fn fail(&self, method: &str, fail_500: u32, fail_429: u32) {
        let mut inner = self.0.lock().expect("lock");
        inner.fail_500.insert(method.to_owned(), fail_500);
        inner.fail_429.insert(method.to_owned(), fail_429);
    }

    pub fn delay(&self, method: &str, delay: Duration) {
        self.0
            .lock()
            .expect("lock")
            .delay
            .insert(method.to_owned(), delay);
    }

    pub fn refuse(&self, method: &str) {
        self.0.lock().expect("lock").refuse.push(method.to_owned());
    }

    pub fn calls(&self) -> Vec<Call> {
        self.0.lock().expect("lock").calls.clone()
    }

    pub fn violations(&self) -> Vec<String> {
        self.0.lock().expect("lock").violations.clone()
    }

    /// Successful calls of `method` whose body satisfies `filter`.
    pub fn ok_calls(&self, method: &str, filter: impl Fn(&Value) -> bool) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == method && c.status < 300 && filter(&c.body))
            .collect()
    }

    /// Waits until `ok_calls(method, filter)` has `count` calls at least.
    pub async fn wait_for(
        &self,
        method: &str,
        count: usize,
        filter: impl Fn(&Value) -> bool,
    ) -> Vec<Call> {
        let start = std::time::Instant::now();
        loop {
            let calls = self.ok_calls(method, &filter);
            if calls.len() >= count {
                return calls;
            }
            assert!(
                start.elapsed() < super::PATIENCE,
                "the stand-in never got {count} successful `{method}` calls; calls: {:#?}",
                self.calls()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn violation(&self, text: String) {
        self.0.lock().expect("lock").violations.push(text);
    }

    /// Records a call; returns the failure to answer with, if one is due.
    fn record(&self, method: &str, headers: &HeaderMap, body: Value) -> Option<Response> {
        let mut inner = self.0.lock().expect("lock");
        let headers: HashMap<String, String> = headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("?").to_owned()))
            .collect();
        let (status, response) = if let Some(n) = inner.fail_500.get_mut(method).filter(|n| **n > 0)
        {
            *n -= 1;
            (500, Some(StatusCode::INTERNAL_SERVER_ERROR.into_response()))
        } else if let Some(n) = inner.fail_429.get_mut(method).filter(|n| **n > 0) {
            *n -= 1;
            (
                429,
                Some(
                    (
                        StatusCode::TOO_MANY_REQUESTS,
                        [("retry-after", "1")],
                        "slow down",
                    )
                        .into_response(),
                ),
            )
        } else if inner.refuse.iter().any(|m| m == method) {
            (
                400,
                Some((StatusCode::BAD_REQUEST, "refused").into_response()),
            )
        } else {
            (200, None)
        };
        inner.calls.push(Call {
            method: method.to_owned(),
            headers,
            body,
            status,
        });
        response
    }
}

fn check_bearer(standin: &StandIn, method: &str, headers: &HeaderMap) {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if auth != format!("Bearer {BOT_TOKEN}") {
        standin.violation(format!(
            "{method}: authorization is `{auth}`, not `Bearer xoxb-…`"
        ));
    }
}

async fn users_info(
    State(standin): State<StandIn>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    check_bearer(&standin, "users.info", &headers);
    let user = query.get("user").cloned().unwrap_or_default();
    if let Some(failure) = standin.record("users.info", &headers, json!({"user": user})) {
        return failure;
    }
    match USERS.iter().find(|(id, _, _)| *id == user) {
        Some((id, email, confirmed)) => Json(json!({
            "ok": true,
            "user": {
                "id": id, "team_id": TEAM, "name": id.to_lowercase(), "deleted": false,
                "is_bot": false, "is_email_confirmed": confirmed,
                "profile": {"email": email, "real_name": id},
            }
        }))
        .into_response(),
        None => Json(json!({"ok": false, "error": "user_not_found"})).into_response(),
    }
}

async fn slack_method(
    State(standin): State<StandIn>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    check_bearer(&standin, &method, &headers);
    let delay = standin.0.lock().expect("lock").delay.get(&method).copied();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type.starts_with("application/json") {
        standin.violation(format!("{method}: content-type `{content_type}`"));
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
        standin.violation(format!("{method}: body is not json"));
        Value::Null
    });
    let required: &[&str] = match method.as_str() {
        "chat.postMessage" => &["channel", "text", "blocks"],
        "chat.update" => &["channel", "ts", "text", "blocks"],
        "chat.postEphemeral" => &["channel", "user", "text"],
        _ => {
            standin.violation(format!("unknown method {method}"));
            &[]
        }
    };
    for field in required {
        let ok = match *field {
            "blocks" => body[field].as_array().is_some_and(|b| !b.is_empty()),
            _ => body[field].as_str().is_some_and(|s| !s.is_empty()),
        };
        if !ok {
            standin.violation(format!("{method}: `{field}` missing or empty in {body}"));
        }
    }
    if let Some(blocks) = body["blocks"].as_array() {
        for block in blocks {
            if !["header", "section", "context", "actions"]
                .contains(&block["type"].as_str().unwrap_or(""))
            {
                standin.violation(format!("{method}: unexpected block {block}"));
            }
        }
    }
    if let Some(failure) = standin.record(&method, &headers, body.clone()) {
        return failure;
    }
    if standin
        .0
        .lock()
        .expect("lock")
        .refuse
        .iter()
        .any(|m| *m == format!("slack:{method}"))
    {
        return Json(json!({"ok": false, "error": "channel_not_found"})).into_response();
    }
    match method.as_str() {
        "chat.postMessage" => {
            let ts = {
                let mut inner = standin.0.lock().expect("lock");
                inner.next_ts += 1;
                format!("1700000000.{:06}", inner.next_ts)
            };
            // Slack answers with the channel's id (here the id the test gave).
            Json(json!({"ok": true, "channel": body["channel"], "ts": ts, "message": {"text": body["text"]}}))
                .into_response()
        }
        "chat.update" => Json(
            json!({"ok": true, "channel": body["channel"], "ts": body["ts"], "text": body["text"]}),
        )
        .into_response(),
        _ => Json(json!({"ok": true, "message_ts": "1700000001.000001"})).into_response(),
    }
}

async fn teams(State(standin): State<StandIn>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let attachment = &body["attachments"][0];
    let card = &attachment["content"];
    let shape_ok = body["type"] == "message"
        && body["attachments"].as_array().is_some_and(|a| a.len() == 1)
        && attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
        && card["type"] == "AdaptiveCard"
        && card["version"].as_str().is_some()
        && card["body"].as_array().is_some_and(|b| !b.is_empty());
    if !shape_ok {
        standin.violation(format!("teams: not an adaptive card envelope: {body}"));
    }
    if let Some(failure) = standin.record("teams", &headers, body) {
        return failure;
    }
    // Workflows answer 202 Accepted.
    StatusCode::ACCEPTED.into_response()
}

async fn hook(
    State(standin): State<StandIn>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // The receiver's side of the documented recipe: HMAC-SHA256 over `v1:TIMESTAMP:BODY`,
    // compared in constant time, timestamp fresh.
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let timestamp = header("x-gatekeep-timestamp");
    let signature = header("x-gatekeep-signature");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, WEBHOOK_KEY.as_bytes());
    let mut signed = format!("v1:{timestamp}:").into_bytes();
    signed.extend_from_slice(&body);
    let valid = signature
        .strip_prefix("v1=")
        .and_then(|h| hex::decode(h).ok())
        .is_some_and(|mac| ring::hmac::verify(&key, &signed, &mac).is_ok());
    if !valid {
        standin.violation(format!("hook {name}: bad signature `{signature}`"));
    }
    let fresh = timestamp
        .parse::<i64>()
        .is_ok_and(|at| (time::OffsetDateTime::now_utc().unix_timestamp() - at).abs() <= 300);
    if !fresh {
        standin.violation(format!("hook {name}: stale timestamp `{timestamp}`"));
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if body["id"] != header("x-gatekeep-event-id") || body["type"].as_str().is_none() {
        standin.violation(format!(
            "hook {name}: id/type do not match the headers: {body}"
        ));
    }
    if let Some(failure) = standin.record(&format!("hook:{name}"), &headers, body) {
        return failure;
    }
    StatusCode::NO_CONTENT.into_response()
}
