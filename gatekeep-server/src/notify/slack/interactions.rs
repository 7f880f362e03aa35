//! `POST /slack/interactions`: Slack calls it when a reviewer presses Approve or Deny.
//!
//! 1. **Authenticity**: Slack signs every request with the app's signing secret:
//!    `X-Slack-Signature: v0=HEX(HMAC-SHA256(secret, "v0:" + X-Slack-Request-Timestamp +
//!    ":" + raw body))`. The timestamp must be within five minutes of now, the signature is
//!    compared in constant time (ring's `hmac::verify`), and a signature already seen
//!    within that window is refused (a replayed request).
//! 2. **Identity**: the Slack user becomes a reviewer through their *verified* email
//!    (`users.info`: `is_email_confirmed`, `profile.email`), mapped to reviewer groups in
//!    `[notify.slack.reviewers]`; a user of another workspace (`team_id`), an unconfirmed
//!    or unmapped email gets an ephemeral refusal and decides nothing.
//! 3. **Rules**: the decision goes through [`Engine::decide`] like the console's and the
//!    CLI's (reviewer groups, quorum, no self-approval, allowed durations), after the
//!    same re-authentication check ([`ops::check_auth_age`]: a policy that needs a fresh
//!    sign-in is not approved from Slack). A policy with `require_reason` is not approved
//!    from Slack either: a button carries no reason. Any refusal is told to the user
//!    ephemerally.
//!
//! The signature is checked before anything else is read; Slack gets its `200` at once and
//! the rest runs in a task (Slack wants an answer within 3 s).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError},
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
    routing::post,
};
use gatekeep_proto::{
    GrantDuration, convert,
    model::{GrantScope, Verdict},
};
use ring::hmac;
use serde::Deserialize;
use serde_json::json;

use super::{APPROVE, DENY, Routing, SlackApi};
use crate::{
    api::ops,
    auth::Reviewer,
    lifecycle::Engine,
    notify::{config::SlackApprovals, secret::Secret},
};

/// How far a request's timestamp may be from now (Slack's recommendation).
pub const REPLAY_WINDOW_SECS: i64 = 300;
/// Largest interaction body accepted (Slack's payloads are a few KiB).
const MAX_BODY: usize = 64 * 1024;
/// Signatures remembered at most; beyond it the oldest are forgotten first.
const MAX_SEEN: usize = 65_536;

/// What the endpoint needs.
pub(crate) struct Interactions {
    pub engine: Arc<Engine>,
    pub api: SlackApi,
    pub signing_secret: Secret,
    pub team_id: Option<String>,
    /// Lowercase verified email -> reviewer groups.
    pub reviewers: BTreeMap<String, Vec<String>>,
    pub routing: Arc<Routing>,
    pub max_auth_age: BTreeMap<String, u64>,
    seen: ReplayGuard,
}

impl Interactions {
    pub(crate) fn new(
        engine: Arc<Engine>,
        api: SlackApi,
        signing_secret: Secret,
        team_id: Option<String>,
        reviewers: &BTreeMap<String, Vec<String>>,
        routing: Arc<Routing>,
        max_auth_age: BTreeMap<String, u64>,
    ) -> Self {
        Self {
            engine,
            api,
            signing_secret,
            team_id,
            reviewers: reviewers
                .iter()
                .map(|(email, groups)| (email.to_lowercase(), groups.clone()))
                .collect(),
            routing,
            max_auth_age,
            seen: ReplayGuard::default(),
        }
    }
}

/// The route.
pub(crate) fn router(state: Arc<Interactions>) -> Router {
    Router::new()
        .route("/slack/interactions", post(interaction))
        // Refused while reading, not after buffering megabytes.
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Why a request was refused before its payload was read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("missing or malformed X-Slack-Request-Timestamp")]
    Timestamp,
    #[error("X-Slack-Request-Timestamp is more than 5 minutes from now (clock skew, or a replay)")]
    Stale,
    #[error("missing or malformed X-Slack-Signature")]
    SignatureHeader,
    #[error("X-Slack-Signature does not match the body (check the app's signing secret)")]
    BadSignature,
    #[error("this signed request was already received (a replay)")]
    Replayed,
}

/// Signatures seen within the replay window, with their timestamps.
#[derive(Debug, Default)]
pub struct ReplayGuard(Mutex<HashMap<String, i64>>);

/// Checks a request's signature, timestamp and freshness (`now` in Unix seconds).
pub fn verify(
    secret: &Secret,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
    seen: &ReplayGuard,
) -> Result<(), Refused> {
    let timestamp = headers
        .get("x-slack-request-timestamp")
        .and_then(|v| v.to_str().ok())
        .ok_or(Refused::Timestamp)?;
    let at: i64 = timestamp.parse().map_err(|_| Refused::Timestamp)?;
    // abs_diff: a timestamp near i64::MIN must not overflow (found by fuzzing's shape).
    if now.abs_diff(at) > REPLAY_WINDOW_SECS.unsigned_abs() {
        return Err(Refused::Stale);
    }
    let signature = headers
        .get("x-slack-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or(Refused::SignatureHeader)?;
    let mac = signature
        .strip_prefix("v0=")
        .and_then(|hex_mac| hex::decode(hex_mac).ok())
        .ok_or(Refused::SignatureHeader)?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
    let mut signed = Vec::with_capacity(body.len() + timestamp.len() + 4);
    signed.extend_from_slice(b"v0:");
    signed.extend_from_slice(timestamp.as_bytes());
    signed.push(b':');
    signed.extend_from_slice(body);
    // Constant time: ring compares the tags without an early exit.
    hmac::verify(&key, &signed, &mac).map_err(|_| Refused::BadSignature)?;
    let mut seen = seen.0.lock().unwrap_or_else(PoisonError::into_inner);
    seen.retain(|_, at| now - *at <= REPLAY_WINDOW_SECS);
    if seen.contains_key(signature) {
        return Err(Refused::Replayed);
    }
    if seen.len() >= MAX_SEEN
        && let Some(oldest) = seen
            .iter()
            .min_by_key(|(_, at)| **at)
            .map(|(sig, _)| sig.clone())
    {
        seen.remove(&oldest);
    }
    seen.insert(signature.to_owned(), at);
    Ok(())
}

/// The parts of a `block_actions` payload used here.
#[derive(Debug, Deserialize)]
pub struct Payload {
    #[serde(rename = "type")]
    kind: String,
    user: User,
    #[serde(default)]
    team: Option<Id>,
    #[serde(default)]
    channel: Option<Id>,
    #[serde(default)]
    actions: Vec<Action>,
    #[serde(default)]
    state: Option<ActionState>,
}

#[derive(Debug, Deserialize)]
struct User {
    id: String,
    #[serde(default)]
    team_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Id {
    id: String,
}

#[derive(Debug, Deserialize)]
struct Action {
    action_id: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ActionState {
    #[serde(default)]
    values: HashMap<String, HashMap<String, Selected>>,
}

#[derive(Debug, Deserialize)]
struct Selected {
    #[serde(default)]
    selected_option: Option<SelectedOption>,
}

#[derive(Debug, Deserialize)]
struct SelectedOption {
    value: String,
}

impl Payload {
    /// The `payload` field of a verified form body (`application/x-www-form-urlencoded`),
    /// parsed; the error says what is wrong, for the `400` answer.
    pub fn from_body(body: &[u8]) -> Result<Self, String> {
        let payload = form_urlencoded::parse(body)
            .find(|(name, _)| name == "payload")
            .map(|(_, value)| value.into_owned())
            .ok_or_else(|| "no `payload` field".to_owned())?;
        serde_json::from_str(&payload)
            .map_err(|err| format!("payload is not a slack interaction: {err}"))
    }

    /// What the payload asks, for a log line: its type, and its actions' ids.
    #[must_use]
    pub fn summary(&self) -> String {
        let actions: Vec<&str> = self.actions.iter().map(|a| a.action_id.as_str()).collect();
        format!("{} {:?}", self.kind, actions)
    }
}

async fn interaction(
    State(state): State<Arc<Interactions>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    if body.len() > MAX_BODY {
        return (StatusCode::PAYLOAD_TOO_LARGE, "body too large").into_response();
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Err(refused) = verify(&state.signing_secret, &headers, &body, now, &state.seen) {
        tracing::warn!(reason = %refused, "slack interaction refused");
        return (StatusCode::UNAUTHORIZED, refused.to_string()).into_response();
    }
    let payload = match Payload::from_body(&body) {
        Ok(payload) => payload,
        Err(err) => return (StatusCode::BAD_REQUEST, err).into_response(),
    };
    tracing::debug!(payload = %payload.summary(), "slack interaction");
    tokio::spawn(async move { handle(&state, payload).await });
    StatusCode::OK.into_response()
}

/// Acts on a verified payload; tells the user ephemerally when nothing was done.
async fn handle(state: &Interactions, payload: Payload) {
    if payload.kind != "block_actions" {
        return;
    }
    let Some(action) = payload
        .actions
        .iter()
        .find(|a| a.action_id == APPROVE || a.action_id == DENY)
    else {
        // The duration choice and the console link also send actions: nothing to do.
        return;
    };
    let verdict = if action.action_id == APPROVE {
        Verdict::Allow
    } else {
        Verdict::Deny
    };
    let outcome = decide(state, &payload, action, verdict).await;
    let text = match outcome {
        Ok(()) => return,
        Err(text) => text,
    };
    tracing::info!(
        user = payload.user.id,
        refusal = text,
        "slack decision refused"
    );
    let Some(channel) = payload.channel.as_ref().map(|c| c.id.clone()) else {
        return;
    };
    // Error texts quote names (policies, reviewers): escaped, as all mrkdwn text is.
    let body = json!({"channel": channel, "user": payload.user.id, "text": super::escape(&text)});
    if let Err(error) = state.api.call("chat.postEphemeral", &body).await {
        tracing::warn!(
            ?error,
            "cannot tell a slack user why their decision was refused"
        );
    }
}

/// Maps the user, then decides through the engine. `Err` is what to tell the user.
async fn decide(
    state: &Interactions,
    payload: &Payload,
    action: &Action,
    verdict: Verdict,
) -> Result<(), String> {
    let team = payload
        .user
        .team_id
        .as_deref()
        .or(payload.team.as_ref().map(|t| t.id.as_str()));
    if let Some(expected) = &state.team_id
        && team != Some(expected.as_str())
    {
        return Err("gatekeep: your Slack workspace is not the one allowed to decide requests; nothing was done".to_owned());
    }
    let reviewer = reviewer(state, &payload.user.id).await?;
    let id = action
        .value
        .as_deref()
        .ok_or("gatekeep: the button carries no request id")
        .and_then(|value| {
            convert::id("value", value)
                .map_err(|_| "gatekeep: the button carries no valid request id")
        })
        .map_err(str::to_owned)?;
    let duration = if verdict == Verdict::Allow {
        chosen_duration(payload)?
    } else {
        GrantDuration::Once
    };
    let engine = &state.engine;
    let refusal = |error: crate::error::Error| format!("gatekeep: not recorded: {error}");
    let (record, _) = engine.get(id).await.map_err(refusal)?;
    if state.routing.approvals(&record.request.policy) == SlackApprovals::Link {
        return Err(format!(
            "gatekeep: requests of policy `{}` are decided in the console only",
            record.request.policy
        ));
    }
    // The engine would take the button's fixed "from Slack" as the reason: a policy that
    // wants reviewers to say why is approved where they can.
    if verdict == Verdict::Allow && record.request.approval.require_reason {
        return Err(format!(
            "gatekeep: policy `{}` requires a reason for approvals, and a Slack button carries none; nothing was done. Approve it in the console (its reason field) or with `gatekeep review approve {id} --reason \"...\"`; Deny works here",
            record.request.policy,
        ));
    }
    ops::check_auth_age(engine, &state.max_auth_age, id, verdict, None)
        .await
        .map_err(refusal)?;
    engine
        .decide(
            &reviewer,
            id,
            verdict,
            "from Slack".to_owned(),
            duration,
            GrantScope::Workload,
        )
        .await
        .map_err(refusal)?;
    Ok(())
}

/// The duration picked in the message's select (`once` when none).
fn chosen_duration(payload: &Payload) -> Result<GrantDuration, String> {
    let chosen = payload.state.as_ref().and_then(|state| {
        state
            .values
            .values()
            .filter_map(|block| block.get(super::DURATION))
            .find_map(|selected| selected.selected_option.as_ref())
    });
    match chosen {
        None => Ok(GrantDuration::Once),
        Some(option) => convert::duration("duration", &option.value)
            .map_err(|err| format!("gatekeep: not recorded: {err}")),
    }
}

/// The reviewer a Slack user is: their verified email and its configured groups.
async fn reviewer(state: &Interactions, user: &str) -> Result<Reviewer, String> {
    let info = state.api.user_info(user).await.map_err(|error| {
        tracing::warn!(?error, "users.info failed");
        "gatekeep: cannot look up your Slack profile right now; try again, or use the console"
            .to_owned()
    })?;
    let user_info = &info["user"];
    let confirmed = user_info["is_email_confirmed"].as_bool() == Some(true);
    let email = user_info["profile"]["email"].as_str().unwrap_or_default();
    if user_info["deleted"].as_bool() == Some(true) || user_info["is_bot"].as_bool() == Some(true) {
        return Err("gatekeep: bots and deactivated users cannot decide requests".to_owned());
    }
    if email.is_empty() || !confirmed {
        return Err("gatekeep: your Slack account has no confirmed email, so it maps to no reviewer; nothing was done".to_owned());
    }
    let email = email.to_lowercase();
    let Some(groups) = state.reviewers.get(&email) else {
        return Err(format!(
            "gatekeep: {email} is not a gatekeep reviewer (ask an administrator to add it to [notify.slack.reviewers]); nothing was done"
        ));
    };
    // The same checks as an email from the identity provider: reviewer lists in the audit
    // log are comma separated.
    let email = convert::name("email", &email)
        .ok()
        .filter(|e| !e.contains(','))
        .ok_or("gatekeep: your email cannot name a reviewer")?;
    if convert::name("slack user", user).is_err() || user.contains(',') {
        return Err("gatekeep: malformed slack user id".to_owned());
    }
    Ok(Reviewer {
        name: format!("{email} (slack:{user})"),
        groups: groups.clone(),
        email: Some(email),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let mut signed = format!("v0:{timestamp}:").into_bytes();
        signed.extend_from_slice(body);
        format!("v0={}", hex::encode(hmac::sign(&key, &signed).as_ref()))
    }

    fn headers(timestamp: &str, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-slack-request-timestamp", timestamp.parse().unwrap());
        headers.insert("x-slack-signature", signature.parse().unwrap());
        headers
    }

    #[test]
    fn slack_documented_example_verifies() {
        // The example of Slack's "Verifying requests from Slack" page.
        let secret = Secret::new("8f742231b10e8888abcd99yyyzzz85a5");
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let expected = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";
        assert_eq!(sign(secret.expose(), "1531420618", body), expected);
        let seen = ReplayGuard::default();
        verify(
            &secret,
            &headers("1531420618", expected),
            body,
            1_531_420_618,
            &seen,
        )
        .unwrap();
    }

    #[test]
    fn refusals() {
        let secret = Secret::new("s3cret");
        let seen = ReplayGuard::default();
        let now = 1_800_000_000_i64;
        let body = b"payload=%7B%7D";
        let ts = now.to_string();
        let good = sign("s3cret", &ts, body);
        assert_eq!(
            verify(
                &secret,
                &headers(&ts, &sign("other", &ts, body)),
                body,
                now,
                &seen
            ),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            verify(
                &secret,
                &headers(&ts, &good),
                b"payload=%7B%7Dx",
                now,
                &seen
            ),
            Err(Refused::BadSignature),
            "a changed body"
        );
        let old = (now - 301).to_string();
        assert_eq!(
            verify(
                &secret,
                &headers(&old, &sign("s3cret", &old, body)),
                body,
                now,
                &seen
            ),
            Err(Refused::Stale)
        );
        assert_eq!(
            verify(&secret, &headers(&ts, "v1=00"), body, now, &seen),
            Err(Refused::SignatureHeader)
        );
        assert_eq!(
            verify(&secret, &headers(&ts, &good), body, now, &seen),
            Ok(())
        );
        assert_eq!(
            verify(&secret, &headers(&ts, &good), body, now + 10, &seen),
            Err(Refused::Replayed)
        );
    }

    #[test]
    fn timestamps_at_the_ends_of_the_range_are_stale_not_a_panic() {
        let (secret, seen) = (Secret::new("s3cret"), ReplayGuard::default());
        for ts in [i64::MIN.to_string(), i64::MAX.to_string()] {
            let headers = headers(&ts, &sign("s3cret", &ts, b""));
            assert_eq!(
                verify(&secret, &headers, b"", 1_800_000_000, &seen),
                Err(Refused::Stale),
                "{ts}"
            );
        }
    }

    #[test]
    fn bodies_without_a_slack_payload_say_what_is_wrong() {
        let missing = Payload::from_body(b"token=x").unwrap_err();
        assert_eq!(missing, "no `payload` field");
        let not_json = Payload::from_body(b"payload=%7Bnope").unwrap_err();
        assert!(
            not_json.starts_with("payload is not a slack interaction"),
            "{not_json}"
        );
        let ok = Payload::from_body(
            b"payload=%7B%22type%22%3A%22block_actions%22%2C%22user%22%3A%7B%22id%22%3A%22U1%22%7D%7D",
        )
        .expect("a minimal block_actions payload");
        assert_eq!(ok.summary(), "block_actions []");
    }
}
