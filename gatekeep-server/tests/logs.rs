//! JSON logs (`gatekeep-server --log-format json`) carry the request id on every line about a
//! request, as the `request` span's field, whatever the line's own fields.

mod support;

use std::{
    io::Write,
    sync::{Arc, Mutex, PoisonError},
};

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Harness, answer, exec_request, json_of, submit, wait_pending};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_about_a_request_carry_its_id() {
    let captured = Captured::default();
    let writer = captured.clone();
    // As `gatekeep-server --log-format json` sets it up (main.rs `init_logging`).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(move || writer.clone())
        .json()
        .init();

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

    let text = String::from_utf8(
        captured
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
    )
    .expect("utf-8 logs");
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let about = |message: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|line| line["fields"]["message"] == message)
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
