//! Slack interaction requests (issue 24): whatever reaches `POST /slack/interactions`, its
//! timestamp and signature headers and its body, is verified and parsed into an error or a
//! payload, never a panic. The input is `TIMESTAMP\nSIGNATURE\nBODY`; the signing secret
//! is fixed, so inputs whose signature is right (the seeds' are) reach the payload parser.
#![no_main]

use gatekeep_server::notify::{
    secret::Secret,
    slack::interactions::{Payload, ReplayGuard, verify},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let (Some(timestamp), Some(signature), Some(body)) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let mut headers = axum::http::HeaderMap::new();
    for (name, value) in [
        ("x-slack-request-timestamp", timestamp),
        ("x-slack-signature", signature),
    ] {
        if let Ok(value) = axum::http::HeaderValue::from_bytes(value) {
            headers.insert(name, value);
        }
    }
    let secret = Secret::new("fuzz-signing-secret");
    if verify(&secret, &headers, body, 1_800_000_000, &ReplayGuard::default()).is_ok()
        && let Ok(payload) = Payload::from_body(body)
    {
        let _ = payload.summary();
    }
    // The parser alone, as if every signature were right.
    if let Ok(payload) = Payload::from_body(body) {
        let _ = payload.summary();
    }
});
