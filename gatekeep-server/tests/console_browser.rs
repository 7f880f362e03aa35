//! The web console end to end in Debian's Chromium (headless), driven by Playwright
//! (`tests/browser/console.mjs`): a reviewer signs in with a real OpenID provider, sees the
//! paused requests of a simulated agent (real mTLS gRPC) live, approves one and denies
//! another (the agent gets both verdicts), a reviewer outside the policy's groups cannot
//! approve, and a forged CSRF token is refused. Screenshots go to `target/screenshots/{sqlite,postgres}/`;
//! figures (a live request's delay, the queue with 1,000 pending requests) are printed,
//! never asserted on time.
//!
//! Needs what `cargo xtask setup` installs: Node packages under `target/node`, and
//! `/usr/bin/chromium`.

#![expect(
    clippy::too_many_lines,
    reason = "one scenario end to end, read top to bottom"
)]

mod support;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use base64::Engine as _;
use gatekeep_proto::model::{ProcessInfo, Target, Verdict};
use sha2::{Digest as _, Sha256};
use support::{
    Backend, Harness, answer, connect_request, exec_request,
    idp::{self, Idp},
    submit, wait_pending,
};

const CHROMIUM: &str = "/usr/bin/chromium";

/// The base64 SHA-256 of the certificate's `SubjectPublicKeyInfo`: Chromium trusts exactly
/// that key (`--ignore-certificate-errors-spki-list`), nothing else.
fn spki_hash(cert_pem: &str) -> String {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("server cert");
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parse cert");
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(cert.public_key().raw))
}

async fn reviewers_decide_in_chromium(backend: Backend) {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "the browser test needs Debian's chromium at {CHROMIUM}: run `cargo xtask setup`"
    );
    let keys = tempfile::tempdir().expect("keys dir");
    let mut provider = None;
    let mut harness = Harness::start_on(backend, |config, addr| {
        let idp = Idp::start_any(
            &keys.path().join("keys.json"),
            &format!("https://{addr}/auth/oidc/callback"),
        );
        config.console.oidc = Some(idp.config(addr));
        config.console.token_sign_in = false;
        provider = Some(idp);
    })
    .await;
    let (link, _events) = harness.agent("web-1").await;
    let http = harness.client(None);
    let bob = harness.token("bob");

    // Workload-controlled strings with a terminal escape and a bidi override.
    let mut first = exec_request(&["curl", "\u{1b}[2Jhello", "two words", "rtl\u{202e}txt"]);
    first.ancestry.insert(
        0,
        ProcessInfo {
            pid: 4100,
            comm: "agent\u{1b}]0;owned\u{7}".into(),
            executable: Some("/usr/bin/python3".into()),
            argv: vec!["python3".into(), "agent.py".into()],
            cgroup: None,
        },
    );
    // Its policy requires a reason: the detail page marks the field required.
    first.approval.require_reason = true;
    let first_id = first.id;
    let first_answer = submit(&link, first);
    let second = connect_request();
    let second_id = second.id;
    let second_answer = submit(&link, second);
    wait_pending(&http, &harness, &bob, first_id).await;
    wait_pending(&http, &harness, &bob, second_id).await;

    // One directory per store: both runs may go at once.
    let shots = idp::node_dir()
        .join("../screenshots")
        .join(format!("{backend:?}").to_lowercase());
    let script = idp::script("console.mjs");
    let mut node = Command::new("node")
        .arg(&script)
        .current_dir(idp::node_dir())
        .env("BASE", &harness.base)
        .env("SPKI", spki_hash(&harness.pki.tls().server.cert_pem))
        .env("CHROMIUM", CHROMIUM)
        .env("SHOTS", &shots)
        .env("FIRST", first_id.to_string())
        .env("SECOND", second_id.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start node");
    let mut stdin = node.stdin.take().expect("stdin");
    let (lines, mut from_node) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stdout = node.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });

    let mut live_answer = None;
    let mut bulk = Vec::new();
    let mut passed = false;
    let mut figures = Vec::new();
    loop {
        let Some(output) = tokio::time::timeout(Duration::from_mins(5), from_node.recv())
            .await
            .expect("the browser script makes progress")
        else {
            break;
        };
        println!("[browser] {output}");
        match output.as_str() {
            "STEP submit-live" => {
                let live = exec_request(&["curl", "https://example.com/live"]);
                let id = live.id;
                live_answer = Some((id, submit(&link, live)));
                writeln!(stdin, "GO {id}").expect("to the browser script");
            }
            "STEP submit-1000" => {
                for index in 0..1000 {
                    let mut request =
                        exec_request(&["curl", &format!("https://example.com/{index}")]);
                    if index % 2 == 0 {
                        request.target = connect_request().target;
                        if let Target::Connect(connect) = &mut request.target {
                            connect.port = u16::try_from(1000 + index).expect("port");
                        }
                    }
                    bulk.push(submit(&link, request));
                }
                // Wait until the service holds them all (plus the live one).
                let start = std::time::Instant::now();
                loop {
                    let (_, body) = support::json_of(
                        http.get(harness.url("/api/v1/status"))
                            .bearer_auth(&bob)
                            .send()
                            .await
                            .expect("status"),
                    )
                    .await;
                    if body["pending"].as_u64() >= Some(1001) {
                        break;
                    }
                    assert!(
                        start.elapsed() < Duration::from_mins(2),
                        "1,000 requests never became pending: {body}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                writeln!(stdin, "GO 1001").expect("to the browser script");
            }
            "PASS" => passed = true,
            other if other.starts_with("FIGURE ") => figures.push(other.to_owned()),
            _ => {}
        }
    }
    let status = node.wait().expect("node exits");
    assert!(
        status.success() && passed,
        "the browser script failed ({status}); its output is above"
    );

    // What the browser decided reached the agent.
    let approved = answer(first_answer).await;
    assert_eq!(approved.verdict, Verdict::Allow);
    assert_eq!(approved.decided_by, "alice@example.com (oidc:alice)");
    assert_eq!(approved.reason, "ticket 42");
    let denied = answer(second_answer).await;
    assert_eq!(denied.verdict, Verdict::Deny);
    assert_eq!(denied.reason, "not this host");
    let (live_id, _live) = live_answer.expect("the live request was submitted");
    let (_, detail) = support::json_of(
        http.get(harness.url(&format!("/api/v1/requests/{live_id}")))
            .bearer_auth(&bob)
            .send()
            .await
            .expect("live request"),
    )
    .await;
    assert_eq!(
        detail["request"]["state"], "pending",
        "carol could not approve it"
    );
    for shot in [
        "queue.png",
        "detail.png",
        "detail-not-in-group.png",
        "queue-1000.png",
    ] {
        let path = shots.join(shot);
        assert!(path.is_file(), "screenshot {}", path.display());
        println!(
            "screenshot: {}",
            path.canonicalize().expect("path").display()
        );
    }
    for figure in figures {
        println!("{figure}");
    }
    harness.stop().await;
    drop(bulk);
    drop(Arc::clone(&link));
    drop(provider);
}

on_both_backends!(reviewers_decide_in_chromium,);
