//! `/metrics` of the decision service, scraped over HTTP: known requests go through (a
//! quorum approval, a denial, an expiry, a refused self-approval left pending, webhook
//! deliveries to a receiver that is down) and the exposition's figures must match them.

#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario end to end, read top to bottom"
)]
#![expect(
    clippy::float_cmp,
    reason = "the exposition's counts are whole numbers, exact in f64"
)]

mod support;

use std::{collections::BTreeMap, time::Duration};

use gatekeep_proto::model::{RequestState, Verdict};
use gatekeep_server::notify::NotifyConfig;
use reqwest::StatusCode;
use serde_json::json;
use support::{
    Backend, Harness, PATIENCE, answer, chat, exec_request, json_of, submit, wait_pending,
};

/// One sample of the text exposition: its name and labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Series {
    name: String,
    labels: BTreeMap<String, String>,
}

/// Parses the `OpenMetrics` text prometheus-client writes (no escaped quotes in our values).
fn parse(text: &str) -> BTreeMap<Series, f64> {
    assert!(text.ends_with("# EOF\n"), "a complete exposition: {text}");
    let mut samples = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with `}`");
                let labels = body
                    .split("\",")
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (key, value) = pair.split_once("=\"").expect("key=\"value\"");
                        (key.to_owned(), value.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name, labels)
            }
            None => (series, BTreeMap::new()),
        };
        let value: f64 = value.parse().expect("a number");
        samples.insert(
            Series {
                name: name.to_owned(),
                labels,
            },
            value,
        );
    }
    samples
}

/// The sum of every sample named `name` whose labels include `having`.
fn sum(samples: &BTreeMap<Series, f64>, name: &str, having: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            series.name == name
                && having
                    .iter()
                    .all(|(k, v)| series.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, value)| value)
        .sum()
}

async fn scrape(addr: std::net::SocketAddr) -> BTreeMap<Series, f64> {
    let response = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("scrape /metrics");
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response
        .headers()
        .get("content-type")
        .expect("a content type")
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    parse(&response.text().await.expect("body"))
}

async fn decide(harness: &Harness, reviewer: &str, id: uuid::Uuid, verdict: &str) -> StatusCode {
    let (status, _) = json_of(
        harness
            .client(None)
            .post(harness.url(&format!("/api/v1/requests/{id}/decision")))
            .bearer_auth(harness.token(reviewer))
            .json(&json!({"verdict": verdict, "reason": "metrics test"}))
            .send()
            .await
            .expect("decide"),
    )
    .await;
    status
}

async fn the_figures_agree_with_what_happened(backend: Backend) {
    // A webhook receiver that is down: every delivery fails at once and, with one attempt
    // allowed, becomes a dead letter.
    let secrets = tempfile::tempdir().expect("temp dir");
    std::fs::write(secrets.path().join("hook-key"), chat::WEBHOOK_KEY).expect("key file");
    let down = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let down_addr = down.local_addr().expect("address");
    drop(down);
    let notify: NotifyConfig = toml::from_str(&format!(
        r#"
[retry]
initial_ms = 10
max_attempts = 1
[[webhook]]
name = "siem"
url = "http://{down_addr}/hooks"
secret = {{ file = "{}/hook-key" }}
events = ["request.requested"]
"#,
        secrets.path().display()
    ))
    .expect("notify config");
    let mut harness = Harness::start_on(backend, |config, _| {
        config.metrics.listen = Some("127.0.0.1:0".parse().expect("address"));
        config.notify = notify;
    })
    .await;
    let metrics_addr = harness
        .metrics_addr
        .expect("metrics are served when configured");
    let http = harness.client(None);
    let (link, _events) = harness.agent("web-1").await;

    // Nothing happened yet: no request series, nothing pending.
    let before = scrape(metrics_addr).await;
    assert_eq!(sum(&before, "gatekeep_requests_pending", &[]), 0.0);
    assert_eq!(sum(&before, "gatekeep_requests_received_total", &[]), 0.0);

    // 1. Approved by a quorum of two.
    let mut quorum = exec_request(&["curl", "https://one.example"]);
    quorum.policy = "quorum".into();
    quorum.approval.approvals_required = 2;
    let quorum_id = quorum.id;
    let quorum_answer = submit(&link, quorum);
    wait_pending(&http, &harness, &harness.token("alice"), quorum_id).await;
    assert_eq!(
        decide(&harness, "alice", quorum_id, "allow").await,
        StatusCode::OK
    );
    assert_eq!(
        decide(&harness, "bob", quorum_id, "allow").await,
        StatusCode::OK
    );
    assert_eq!(answer(quorum_answer).await.state, RequestState::Approved);

    // 2. Denied.
    let denied = exec_request(&["curl", "https://two.example"]);
    let denied_id = denied.id;
    let denied_answer = submit(&link, denied);
    wait_pending(&http, &harness, &harness.token("bob"), denied_id).await;
    assert_eq!(
        decide(&harness, "bob", denied_id, "deny").await,
        StatusCode::OK
    );
    assert_eq!(answer(denied_answer).await.verdict, Verdict::Deny);

    // 3. Expired: nobody decides within its second.
    let mut expiring = exec_request(&["curl", "https://three.example"]);
    expiring.deadline = time::OffsetDateTime::now_utc() + time::Duration::seconds(1);
    let expired = answer(submit(&link, expiring)).await;
    assert_eq!(expired.state, RequestState::Expired);

    // 4. alice owns the workload: her approval is refused, and it stays pending.
    let mut owned = exec_request(&["curl", "https://four.example"]);
    owned.policy = "owned".into();
    owned.approval.owners = vec!["alice".into()];
    let owned_id = owned.id;
    let owned_answer = submit(&link, owned);
    wait_pending(&http, &harness, &harness.token("alice"), owned_id).await;
    assert_eq!(
        decide(&harness, "alice", owned_id, "allow").await,
        StatusCode::FORBIDDEN
    );

    // The four `request.requested` webhooks fail in the background: wait for them.
    let start = std::time::Instant::now();
    let samples = loop {
        let samples = scrape(metrics_addr).await;
        let failed = sum(
            &samples,
            "gatekeep_notification_failures_total",
            &[("channel", "webhook"), ("result", "dead_letter")],
        );
        if failed >= 4.0 {
            break samples;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "webhook failures never counted: {samples:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let total = |name: &str, having: &[(&str, &str)]| sum(&samples, name, having);
    assert_eq!(
        total(
            "gatekeep_notification_failures_total",
            &[("channel", "webhook"), ("result", "dead_letter")]
        ),
        4.0,
        "one dead letter per request, no more"
    );
    assert_eq!(
        total(
            "gatekeep_notification_failures_total",
            &[("result", "retry")]
        ),
        0.0
    );

    // Requests by kind and policy, and how they ended.
    let received = "gatekeep_requests_received_total";
    assert_eq!(
        total(received, &[("kind", "exec"), ("policy", "quorum")]),
        1.0
    );
    assert_eq!(
        total(received, &[("kind", "exec"), ("policy", "ai-agents")]),
        2.0
    );
    assert_eq!(
        total(received, &[("kind", "exec"), ("policy", "owned")]),
        1.0
    );
    assert_eq!(total(received, &[]), 4.0);
    let decided = "gatekeep_requests_decided_total";
    assert_eq!(
        total(
            decided,
            &[
                ("policy", "quorum"),
                ("outcome", "approved"),
                ("via", "reviewer")
            ]
        ),
        1.0
    );
    assert_eq!(
        total(
            decided,
            &[
                ("policy", "ai-agents"),
                ("outcome", "denied"),
                ("via", "reviewer")
            ]
        ),
        1.0
    );
    // The service's timer or the agent's deadline, whichever came first.
    assert_eq!(
        total(decided, &[("policy", "ai-agents"), ("outcome", "expired")]),
        1.0
    );
    assert_eq!(total(decided, &[]), 3.0);
    assert_eq!(
        total("gatekeep_requests_pending", &[]),
        1.0,
        "the owned request"
    );
    assert_eq!(
        total(
            "gatekeep_approvals_refused_total",
            &[("policy", "owned"), ("cause", "self_approval")]
        ),
        1.0
    );

    // Decision latency: one observation per final decision, the expiry's at least 1 s.
    let latency = "gatekeep_decision_seconds_count";
    assert_eq!(
        total(latency, &[("kind", "exec"), ("via", "reviewer")]),
        2.0
    );
    assert_eq!(total(latency, &[]), 3.0);
    let expiry_sum = total("gatekeep_decision_seconds_sum", &[("via", "timeout")])
        + total("gatekeep_decision_seconds_sum", &[("via", "agent")]);
    assert!(
        expiry_sum >= 0.9,
        "the expiry waited its second: {expiry_sum}"
    );
    let fast = total(
        "gatekeep_decision_seconds_bucket",
        &[("via", "reviewer"), ("le", "+Inf")],
    );
    assert_eq!(fast, 2.0, "+Inf holds every observation");

    // Store latency per operation: one insert per new request, every transition timed.
    assert_eq!(
        total("gatekeep_store_seconds_count", &[("op", "insert_request")]),
        4.0
    );
    assert!(total("gatekeep_store_seconds_count", &[("op", "transition")]) >= 4.0);
    assert!(total("gatekeep_store_seconds_count", &[("op", "count_pending")]) >= 1.0);
    assert_eq!(total("gatekeep_store_errors_total", &[]), 0.0);

    // The refusal is in the audit log too, for the compliance report.
    drop(owned_answer);
    harness.stop().await;
    let export = String::from_utf8(harness.audit_export().await).expect("utf-8");
    let refusals: Vec<serde_json::Value> = export
        .lines()
        .map(|line| serde_json::from_str(line).expect("json line"))
        .filter(|record: &serde_json::Value| record["kind"] == "approval_refused")
        .collect();
    assert_eq!(refusals.len(), 1, "{export}");
    assert_eq!(refusals[0]["actor"], "alice");
    assert_eq!(refusals[0]["request_id"], owned_id.to_string());
    assert_eq!(refusals[0]["payload"]["policy"], "owned");
    assert_eq!(refusals[0]["payload"]["cause"], "self_approval");
}

on_both_backends!(the_figures_agree_with_what_happened);

#[tokio::test]
async fn metrics_are_off_unless_configured() {
    let mut harness = Harness::start().await;
    assert_eq!(harness.metrics_addr, None);
    harness.stop().await;
}

#[tokio::test]
async fn a_taken_metrics_port_stops_the_start_with_its_cause() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = gatekeep_server::ServerConfig {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".parse().expect("address"),
        metrics: gatekeep_server::metrics::MetricsConfig { listen: Some(addr) },
        ..gatekeep_server::ServerConfig::default()
    };
    let pki = gatekeep_server::certs::Pki::ephemeral(&[]).expect("pki");
    let error = gatekeep_server::Server::builder(config)
        .tls(pki.tls())
        .build()
        .await
        .expect_err("the port is taken");
    let text = format!("{error}");
    assert!(text.contains(&addr.to_string()), "{text}");
    assert!(text.contains("[metrics] listen"), "{text}");
}
