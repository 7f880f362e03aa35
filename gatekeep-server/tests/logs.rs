//! JSON logs (`gatekeep-server --log-format json`) carry the request id on every line about a
//! request, as the `request` span's field, whatever the line's own fields.

mod support;

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::{Duration, Instant},
};

use gatekeep_server::notify::NotifyConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{
    Harness, PATIENCE, answer, chat::StandIn, exec_request, json_of, submit, wait_pending,
};

/// Collects what the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The JSON lines logged so far, by every test of this file (one subscriber per process).
fn captured() -> &'static Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        // As `gatekeep-server --log-format json` sets it up (main.rs `init_logging`), with
        // the notification code's debug lines on.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "info,gatekeep_server::notify=debug",
            ))
            .with_writer(move || writer.clone())
            .json()
            .init();
        captured
    })
}

/// The captured lines, parsed, and their text.
fn lines() -> (Vec<Value>, String) {
    let text = String::from_utf8(
        captured()
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
    )
    .expect("utf-8 logs");
    let lines = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    (lines, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_about_a_request_carry_its_id() {
    let _ = captured();

    let mut harness = Harness::start().await;
    let (link, _events) = harness.agent("web-1").await;
    let mut owned = exec_request(&["curl", "https://example.com"]);
    owned.approval.owners = vec!["alice".into()];
    let id = owned.id;
    let answered = submit(&link, owned);
    let http = harness.client(None);
    wait_pending(&http, &harness, &harness.token("alice"), id).await;
    for (reviewer, verdict, expected) in [
        ("alice", "allow", StatusCode::FORBIDDEN),
        ("bob", "deny", StatusCode::OK),
    ] {
        let (status, body) = json_of(
            http.post(harness.url(&format!("/api/v1/requests/{id}/decision")))
                .bearer_auth(harness.token(reviewer))
                .json(&json!({"verdict": verdict, "reason": "log test"}))
                .send()
                .await
                .expect("decide"),
        )
        .await;
        assert_eq!(status, expected, "{body}");
    }
    answer(answered).await;
    harness.stop().await;

    let (lines, text) = lines();
    let about = |message: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|line| {
                line["fields"]["message"] == message && line["span"]["request_id"] == id.to_string()
            })
            .collect()
    };
    for message in [
        "request received",
        "self-approval refused",
        "request decided",
    ] {
        let found = about(message);
        assert_eq!(found.len(), 1, "one `{message}` line in:\n{text}");
        assert_eq!(
            found[0]["span"]["request_id"],
            id.to_string(),
            "`{message}` carries the request id: {}",
            found[0]
        );
    }
    assert_eq!(about("request decided")[0]["fields"]["state"], "denied");
}

/// The notification code's lines (a webhook delivered after a failed attempt, another's
/// refusal dead-lettered) are in the request's span too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_of_notifications_carry_the_request_id() {
    let _ = captured();
    let (standin, addr) = StandIn::start().await;
    let secrets = tempfile::tempdir().expect("temp dir");
    std::fs::write(secrets.path().join("hook-key"), support::chat::WEBHOOK_KEY).expect("key");
    let dir = secrets.path().display();
    let notify: NotifyConfig = toml::from_str(&format!(
        r#"
[retry]
initial_ms = 50
max_ms = 500
max_attempts = 5
[[webhook]]
name = "siem"
url = "http://{addr}/hooks/siem"
secret = {{ file = "{dir}/hook-key" }}
events = ["request.requested"]
[[webhook]]
name = "refuser"
url = "http://{addr}/hooks/refuser"
secret = {{ file = "{dir}/hook-key" }}
events = ["request.requested"]
"#
    ))
    .expect("notify config");
    // The receiver fails its first delivery with a 500; the other refuses (a 400: final).
    standin.fail("hook:siem", 1, 0);
    standin.refuse("hook:refuser");
    let mut harness = Harness::start_with(|config, _| config.notify = notify).await;
    let (link, _events) = harness.agent("web-1").await;
    let request = exec_request(&["curl", "https://notified.example"]);
    let id = request.id.to_string();
    let answered = submit(&link, request);
    let of = |lines: &[Value], message: &str| -> Vec<Value> {
        lines
            .iter()
            .filter(|line| line["fields"]["message"] == message)
            .filter(|line| {
                line["fields"]["key"]
                    .as_str()
                    .or(line["fields"]["event"].as_str())
                    .is_some_and(|key| key.starts_with(&id))
            })
            .cloned()
            .collect()
    };
    let wanted = [
        "notification delivery failed; retrying",
        "webhook event delivered",
        "notification not delivered; kept as a dead letter",
    ];
    let started = Instant::now();
    let (lines, text) = loop {
        let (lines, text) = lines();
        if wanted.iter().all(|message| !of(&lines, message).is_empty()) {
            break (lines, text);
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the webhook lines of {id} never came:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for message in wanted {
        for line in of(&lines, message) {
            assert_eq!(
                line["span"]["request_id"], id,
                "`{message}` carries the request id: {line}\n{text}"
            );
        }
    }
    let http = harness.client(None);
    let (status, body) = json_of(
        http.post(harness.url(&format!("/api/v1/requests/{id}/decision")))
            .bearer_auth(harness.token("bob"))
            .json(&json!({"verdict": "deny", "reason": "log test"}))
            .send()
            .await
            .expect("decide"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    answer(answered).await;
    harness.stop().await;
}
