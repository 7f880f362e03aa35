//! The `slack_interaction` and `http_api` fuzz targets' inputs as plain tests (issue 24):
//! every committed seed and every input that once crashed them (`fuzz/corpus/<target>/`,
//! `fuzz/regressions/<target>/`) goes through the same calls as the targets in
//! `fuzz/agent/`, so `cargo test` keeps fixed crashes fixed without a fuzzing build.

#[path = "../../fuzz/inputs.rs"]
mod corpus;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use gatekeep_server::{
    api::http_probe::HttpProbe,
    notify::{
        secret::Secret,
        slack::interactions::{Payload, ReplayGuard, verify},
    },
};

/// The signing secret the target and `fuzz/make_seeds.py` use.
const SECRET: &str = "fuzz-signing-secret";
/// The target's "now", in Unix seconds.
const NOW: i64 = 1_800_000_000;

#[test]
fn slack_interactions_of_the_fuzz_corpus_verify_and_parse_or_fail_cleanly() {
    let inputs = corpus::inputs("slack_interaction");
    assert!(inputs.len() >= 7, "the slack_interaction seeds are missing");
    let mut accepted = Vec::new();
    for (path, bytes) in &inputs {
        let mut parts = bytes.splitn(3, |b| *b == b'\n');
        let (Some(timestamp), Some(signature), Some(body)) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("x-slack-request-timestamp", timestamp),
            ("x-slack-signature", signature),
        ] {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                headers.insert(name, value);
            }
        }
        let verified = verify(
            &Secret::new(SECRET),
            &headers,
            body,
            NOW,
            &ReplayGuard::default(),
        );
        if verified.is_ok() && Payload::from_body(body).is_ok() {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            accepted.push(name.into_owned());
        }
    }
    // The seeds signed right, recent and with a payload verify and parse; the stale, the
    // unsigned, the one without a payload and the one at i64::MIN do not.
    assert_eq!(
        accepted,
        ["seed-approve", "seed-deny", "seed-other-type"],
        "which seeds pass verify and parse"
    );
}

#[test]
fn http_api_seeds_get_answers_that_keep_the_apis_invariants() {
    let inputs = corpus::inputs("http_api");
    assert!(inputs.len() >= 27, "the http_api seeds are missing");
    let dir = tempfile::tempdir().expect("temp dir");
    let probe = HttpProbe::start(dir.path()).expect("the probe starts");
    let mut statuses = std::collections::BTreeMap::new();
    for (path, bytes) in &inputs {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let status = probe
            .exercise(bytes)
            .unwrap_or_else(|violation| panic!("{name}: {violation}"));
        statuses.insert(name.into_owned(), status);
    }
    // A few answers the seeds must get, so the probe is known to reach the handlers.
    for (seed, expected) in [
        ("seed-openapi", StatusCode::OK),
        ("seed-status", StatusCode::OK),
        ("seed-list-filtered", StatusCode::OK),
        ("seed-list-unknown-field", StatusCode::BAD_REQUEST),
        ("seed-list-no-credentials", StatusCode::UNAUTHORIZED),
        ("seed-decide-bad-token", StatusCode::UNAUTHORIZED),
        ("seed-decide-not-json", StatusCode::BAD_REQUEST),
        ("seed-approve", StatusCode::NOT_FOUND),
        ("seed-unknown-route", StatusCode::NOT_FOUND),
        ("seed-events", StatusCode::OK),
    ] {
        assert_eq!(statuses.get(seed), Some(&Some(expected)), "{seed}");
    }
}
