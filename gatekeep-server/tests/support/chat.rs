//! A local stand-in for Slack's Web API (`chat.postMessage`, `chat.update`,
//! `chat.postEphemeral`, `users.info`, `conversations.history`), a Teams Workflows webhook
//! and webhook receivers. Every call is checked against the documented shapes (auth header,
//! JSON fields, message `metadata`, the Adaptive Card envelope, webhook signatures) and
//! recorded; a shape that is wrong is a recorded violation the tests assert empty. Posted
//! Slack messages are kept per channel (with their metadata), so updates must name a real
//! `ts` and `conversations.history` reads them back, newest first. It can fail on purpose: a
//! number of 500s, then 429s with `Retry-After`, before answering; or accept a post and
//! drop its answer (the connection breaks after the status line: the caller never learns
//! the `ts`).

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
    /// Calls of these methods still to carry out but answer with a broken body.
    drop_answer: HashMap<String, u32>,
    /// Posted messages per channel, oldest first.
    messages: HashMap<String, Vec<Message>>,
    next_ts: u64,
}

/// A message the stand-in keeps, as `conversations.history` returns it.
#[derive(Debug, Clone)]
pub struct Message {
    pub ts: String,
    pub text: Value,
    pub blocks: Value,
    pub metadata: Option<Value>,
    /// How many times `chat.update` changed it.
    pub updates: u32,
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
            .route("/api/conversations.history", get(conversations_history))
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

    /// The next `count` calls of `method` are carried out but their answers are lost.
    pub fn drop_answer(&self, method: &str, count: u32) {
        self.0
            .lock()
            .expect("lock")
            .drop_answer
            .insert(method.to_owned(), count);
    }

    /// The messages posted in `channel`, oldest first.
    pub fn messages(&self, channel: &str) -> Vec<Message> {
        self.0
            .lock()
            .expect("lock")
            .messages
            .get(channel)
            .cloned()
            .unwrap_or_default()
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

#[expect(
    clippy::too_many_lines,
    reason = "every Web API method the stand-in speaks, checked and answered in one place"
)]
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
    if let Some(metadata) = body.get("metadata") {
        // Slack's message metadata: an alphanumeric `event_type` and an object payload.
        let event_type = metadata["event_type"].as_str().unwrap_or_default();
        let type_ok = !event_type.is_empty()
            && event_type
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !type_ok || !metadata["event_payload"].is_object() {
            standin.violation(format!(
                "{method}: metadata {metadata} is not event_type + event_payload"
            ));
        }
    }
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
    let drop_answer = {
        let mut inner = standin.0.lock().expect("lock");
        inner
            .drop_answer
            .get_mut(&method)
            .filter(|n| **n > 0)
            .map(|n| *n -= 1)
            .is_some()
    };
    let answer = match method.as_str() {
        "chat.postMessage" => {
            let mut inner = standin.0.lock().expect("lock");
            inner.next_ts += 1;
            // Slack's ts: Unix seconds and a sequence, unique in the channel.
            let ts = format!(
                "{}.{:06}",
                time::OffsetDateTime::now_utc().unix_timestamp(),
                inner.next_ts
            );
            let channel = body["channel"].as_str().unwrap_or_default().to_owned();
            inner.messages.entry(channel).or_default().push(Message {
                ts: ts.clone(),
                text: body["text"].clone(),
                blocks: body["blocks"].clone(),
                metadata: body.get("metadata").cloned(),
                updates: 0,
            });
            // Slack answers with the channel's id (here the id the test gave).
            json!({"ok": true, "channel": body["channel"], "ts": ts, "message": {"text": body["text"]}})
        }
        "chat.update" => {
            let mut inner = standin.0.lock().expect("lock");
            let channel = body["channel"].as_str().unwrap_or_default();
            let message = inner
                .messages
                .get_mut(channel)
                .and_then(|messages| messages.iter_mut().find(|m| body["ts"] == m.ts.as_str()));
            if let Some(message) = message {
                message.text = body["text"].clone();
                message.blocks = body["blocks"].clone();
                message.updates += 1;
                json!({"ok": true, "channel": body["channel"], "ts": body["ts"], "text": body["text"]})
            } else {
                drop(inner);
                standin.violation(format!(
                    "chat.update: no message {} in {}",
                    body["ts"], body["channel"]
                ));
                json!({"ok": false, "error": "message_not_found"})
            }
        }
        _ => json!({"ok": true, "message_ts": "1700000001.000001"}),
    };
    if drop_answer {
        // The status line goes out, then the connection breaks: the caller cannot tell
        // whether Slack acted.
        let broken = futures_util::stream::once(async {
            Err::<Bytes, std::io::Error>(std::io::Error::other("answer dropped by the stand-in"))
        });
        return (
            StatusCode::OK,
            [("content-type", "application/json")],
            axum::body::Body::from_stream(broken),
        )
            .into_response();
    }
    Json(answer).into_response()
}

/// `conversations.history` (GET, query arguments): the channel's messages newest first,
/// from `oldest` (exclusive unless `inclusive`), `limit` per page with a `cursor`; message
/// metadata only with `include_all_metadata=true`.
async fn conversations_history(
    State(standin): State<StandIn>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    check_bearer(&standin, "conversations.history", &headers);
    for (name, value) in &query {
        let ok = match name.as_str() {
            "channel" => !value.is_empty(),
            "oldest" | "latest" => value.parse::<f64>().is_ok(),
            "inclusive" | "include_all_metadata" => {
                ["true", "false", "1", "0"].contains(&value.as_str())
            }
            "limit" => value.parse::<u32>().is_ok_and(|n| (1..=999).contains(&n)),
            "cursor" => value.parse::<usize>().is_ok(),
            _ => false,
        };
        if !ok {
            standin.violation(format!("conversations.history: argument {name}={value}"));
        }
    }
    let body = serde_json::to_value(&query).unwrap_or(Value::Null);
    if let Some(failure) = standin.record("conversations.history", &headers, body) {
        return failure;
    }
    let arg = |name: &str| query.get(name).map(String::as_str);
    let Some(channel) = arg("channel").filter(|c| !c.is_empty()) else {
        return Json(json!({"ok": false, "error": "channel_not_found"})).into_response();
    };
    let truthy = |name: &str| matches!(arg(name), Some("true" | "1"));
    let ts_of = |ts: &str| ts.parse::<f64>().unwrap_or(0.0);
    let oldest = arg("oldest").map_or(0.0, ts_of);
    let inclusive = truthy("inclusive");
    let metadata = truthy("include_all_metadata");
    let limit = arg("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(100);
    let start = arg("cursor")
        .and_then(|c| c.parse::<usize>().ok())
        .unwrap_or(0);
    let inner = standin.0.lock().expect("lock");
    let Some(messages) = inner.messages.get(channel) else {
        return Json(json!({"ok": false, "error": "channel_not_found"})).into_response();
    };
    let matching: Vec<Value> = messages
        .iter()
        .rev()
        .filter(|m| {
            let ts = ts_of(&m.ts);
            ts > oldest || (inclusive && (ts - oldest).abs() < f64::EPSILON)
        })
        .map(|m| {
            let mut message = json!({
                "type": "message", "subtype": "bot_message", "bot_id": "B0GATEKEEP",
                "app_id": "A0GATEKEEP", "text": m.text, "ts": m.ts, "blocks": m.blocks,
            });
            if metadata && let Some(meta) = &m.metadata {
                message["metadata"] = meta.clone();
            }
            message
        })
        .collect();
    let page: Vec<Value> = matching.iter().skip(start).take(limit).cloned().collect();
    let more = start + page.len() < matching.len();
    let next = if more {
        (start + page.len()).to_string()
    } else {
        String::new()
    };
    Json(json!({
        "ok": true, "messages": page, "has_more": more, "pin_count": 0,
        "response_metadata": {"next_cursor": next},
    }))
    .into_response()
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
    let drop_answer = {
        let mut inner = standin.0.lock().expect("lock");
        inner
            .drop_answer
            .get_mut("teams")
            .filter(|n| **n > 0)
            .map(|n| *n -= 1)
            .is_some()
    };
    if drop_answer {
        // The card is posted, then the connection breaks before any answer: ending the
        // handler's task drops the connection (`resume_unwind` runs no panic hook).
        std::panic::resume_unwind(Box::new("answer dropped by the stand-in"));
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
    // Receivers dedupe on the event id, sent as `Idempotency-Key` too.
    if body["id"] != header("x-gatekeep-event-id")
        || header("idempotency-key") != header("x-gatekeep-event-id")
        || body["type"].as_str().is_none()
    {
        standin.violation(format!(
            "hook {name}: id/type do not match the headers: {body}"
        ));
    }
    if let Some(failure) = standin.record(&format!("hook:{name}"), &headers, body) {
        return failure;
    }
    StatusCode::NO_CONTENT.into_response()
}
