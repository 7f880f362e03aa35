//! Console sign-in with a real OpenID provider (`oidc-provider` on Node.js, loopback), driven
//! by a browser-like HTTPS client that keeps cookies and follows redirects: the service's
//! `/auth/oidc/login`, the provider's sign-in page, the callback, then the API with the
//! session and its CSRF token. The Chromium test (`console_browser.rs`) does the same in a
//! real browser.

#![expect(
    clippy::too_many_lines,
    reason = "each test is one scenario end to end, read top to bottom"
)]
#![expect(
    clippy::unwrap_used,
    reason = "a panic is the failure report a test wants; the scenarios are plain async fns \
              (`on_both_backends!` runs each per store), which `allow-unwrap-in-tests` misses"
)]

mod support;

use gatekeep_server::auth::oidc::Oidc;
use reqwest::{StatusCode, redirect::Policy};
use serde_json::{Value, json};
use support::{
    Backend, Harness, answer, error_code, exec_request,
    idp::{self, Idp},
    json_of, submit, wait_pending,
};

/// A browser-like client: cookies kept, redirects followed (or stopped at the service's
/// callback with `stop_at_callback`).
fn browser(harness: &Harness, stop_at_callback: bool) -> reqwest::Client {
    let policy = if stop_at_callback {
        Policy::custom(|attempt| {
            if attempt.url().path() == "/auth/oidc/callback" {
                attempt.stop()
            } else {
                attempt.follow()
            }
        })
    } else {
        Policy::limited(10)
    };
    reqwest::Client::builder()
        .use_preconfigured_tls(harness.tls(None))
        .cookie_store(true)
        .redirect(policy)
        .timeout(support::PATIENCE)
        .build()
        .expect("client")
}

/// Follows `start` to the provider's sign-in page and signs in as `user`; returns the last
/// response (the console page, or the redirect to the callback when the client stops there).
async fn sign_in_at_provider(
    client: &reqwest::Client,
    start: &str,
    user: &str,
) -> reqwest::Response {
    let page = client.get(start).send().await.expect("to the provider");
    let page_url = page.url().clone();
    let html = page.text().await.expect("sign-in page");
    let action = html
        .split("action=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no sign-in form at {page_url}: {html}"));
    let action = page_url.join(action).expect("form action");
    client
        .post(action)
        .form(&[("user", user)])
        .send()
        .await
        .expect("sign in at the provider")
}

/// Signs `user` in to the console through the provider; returns the CSRF token.
async fn console_sign_in(client: &reqwest::Client, harness: &Harness, user: &str) -> Value {
    let landed = sign_in_at_provider(client, &harness.url("/auth/oidc/login"), user).await;
    assert_eq!(landed.status(), StatusCode::OK);
    assert_eq!(landed.url().path(), "/console/", "back on the console");
    assert!(landed.url().query().is_none(), "no error: {}", landed.url());
    let (status, session) = json_of(
        client
            .get(harness.url("/api/v1/session"))
            .send()
            .await
            .expect("session"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{session}");
    session
}

async fn provider_identities_sign_in_with_their_groups_and_decide(backend: Backend) {
    let keys = tempfile::tempdir().expect("keys dir");
    let mut provider = None;
    let mut harness = Harness::start_on(backend, |config, addr| {
        let idp = Idp::start_any(
            &keys.path().join("keys.json"),
            &format!("https://{addr}/auth/oidc/callback"),
        );
        config.console.oidc = Some(idp.config(addr));
        // Approving ai-agents requests needs a provider sign-in at most 5 minutes old.
        config.console.max_auth_age.insert("ai-agents".into(), 300);
        provider = Some(idp);
    })
    .await;
    let (link, _events) = harness.agent("web-1").await;
    let http = harness.client(None);

    // The console offers the provider.
    let (_, methods) = json_of(http.get(harness.url("/api/v1/auth")).send().await.unwrap()).await;
    assert_eq!(methods["oidc"], "Test IdP");

    let first = exec_request(&["curl", "https://example.com/one"]);
    let first_id = first.id;
    let first_answer = submit(&link, first);
    let second = exec_request(&["curl", "https://example.com/two"]);
    let second_id = second.id;
    let _second_answer = submit(&link, second);
    wait_pending(&http, &harness, &harness.token("bob"), first_id).await;
    wait_pending(&http, &harness, &harness.token("bob"), second_id).await;

    // A reviewer token may not approve: the policy wants a fresh provider sign-in.
    let (status, body) = json_of(
        http.post(harness.url(&format!("/api/v1/requests/{first_id}/decision")))
            .bearer_auth(harness.token("bob"))
            .json(&json!({"verdict": "allow"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "reauthenticate");
    assert_eq!(body["error"]["reauth_url"], "/auth/oidc/login?max_age=300");

    // alice signs in through the provider: her groups come from its groups claim.
    let alice = browser(&harness, false);
    let session = console_sign_in(&alice, &harness, "alice").await;
    assert_eq!(session["reviewer"], "alice@example.com (oidc:alice)");
    assert_eq!(session["groups"], json!(["sre"]));
    let csrf = session["csrf_token"].as_str().unwrap().to_owned();

    // carol (group security) sees the request but may not decide it.
    let carol = browser(&harness, false);
    let carol_session = console_sign_in(&carol, &harness, "carol").await;
    assert_eq!(carol_session["groups"], json!(["security"]));
    let (status, detail) = json_of(
        carol
            .get(harness.url(&format!("/api/v1/requests/{first_id}")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(detail["you"]["may_decide"], false);
    let (status, refused) = json_of(
        carol
            .post(harness.url(&format!("/api/v1/requests/{first_id}/decision")))
            .header(
                "x-csrf-token",
                carol_session["csrf_token"].as_str().unwrap(),
            )
            .json(&json!({"verdict": "allow"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");

    // alice approves with her session: the decision names her provider identity.
    let (status, record) = json_of(
        alice
            .post(harness.url(&format!("/api/v1/requests/{first_id}/decision")))
            .header("x-csrf-token", &csrf)
            .json(&json!({"verdict": "allow", "reason": "checked"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{record}");
    let decision = answer(first_answer).await;
    assert_eq!(decision.decided_by, "alice@example.com (oidc:alice)");
    let export = http
        .get(harness.url("/api/v1/audit/export"))
        .bearer_auth(harness.token("bob"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let decided: Vec<Value> = export
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|record| record["kind"] == "decided")
        .collect();
    assert!(
        decided
            .iter()
            .any(|record| record["actor"] == "alice@example.com (oidc:alice)"
                && record["request_id"] == first_id.to_string()),
        "the audit log records the provider identity: {decided:?}"
    );

    // Sign-out ends alice's session.
    let response = alice
        .delete(harness.url("/api/v1/session"))
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let response = alice
        .get(harness.url("/api/v1/session"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    harness.stop().await;
    drop(provider);
}

async fn foreign_issuers_forged_logins_refused_and_key_rotation_followed(backend: Backend) {
    let keys = tempfile::tempdir().expect("keys dir");
    let shared_keys = keys.path().join("shared.json");
    let mut provider = None;
    let mut service = None;
    let mut harness = Harness::start_on(backend, |config, addr| {
        let idp = Idp::start_any(&shared_keys, &format!("https://{addr}/auth/oidc/callback"));
        config.console.oidc = Some(idp.config(addr));
        provider = Some(idp);
        service = Some(addr);
    })
    .await;
    let service = service.expect("address");
    let configured = provider.as_ref().expect("provider").config(service);

    // Another provider, signing with the very same keys: its ID tokens verify by signature,
    // but their issuer is not the configured one.
    let other = Idp::start_any(
        &shared_keys,
        &format!("https://{service}/auth/oidc/callback"),
    );
    let (token, nonce) = id_token_from(&harness, &other, service).await;
    let other_config = other.config(service);
    let accepted = Oidc::new(other_config)
        .expect("client of the other provider")
        .validate(&token, &nonce, None)
        .await
        .expect("the token is valid for its own issuer");
    assert_eq!(accepted.subject, "alice");
    let refused = Oidc::new(configured.clone())
        .expect("client of the configured provider")
        .validate(&token, &nonce, None)
        .await
        .expect_err("a token from another issuer");
    assert!(
        refused.to_string().contains("id token refused") && refused.to_string().contains("ssuer"),
        "{refused}"
    );
    // A wrong nonce (a replayed token) is refused too.
    let replayed = Oidc::new(other.config(service))
        .expect("client")
        .validate(&token, "another-nonce", None)
        .await
        .expect_err("a token of another sign-in");
    assert!(replayed.to_string().contains("nonce"), "{replayed}");
    drop(other);

    // Login CSRF: a callback carrying another browser's code and state opens no session.
    let victim_flow = browser(&harness, true);
    let stopped =
        sign_in_at_provider(&victim_flow, &harness.url("/auth/oidc/login"), "alice").await;
    assert!(stopped.status().is_redirection());
    let callback = stopped.headers()["location"].to_str().unwrap().to_owned();
    assert!(callback.contains("/auth/oidc/callback?"), "{callback}");
    let attacker = browser(&harness, false);
    let landed = attacker.get(&callback).send().await.unwrap();
    assert_eq!(landed.url().path(), "/console/");
    let error = landed
        .url()
        .query_pairs()
        .find(|(key, _)| key == "error")
        .map(|(_, value)| value.into_owned())
        .expect("an error for the console");
    assert!(error.contains("not started by this browser"), "{error}");
    let response = attacker
        .get(harness.url("/api/v1/session"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // The browser that started it finishes it.
    let owner = victim_flow.get(&callback).send().await.unwrap();
    assert_eq!(owner.url().path(), "/console/");
    assert!(owner.url().query().is_none(), "{}", owner.url());
    let response = victim_flow
        .get(harness.url("/api/v1/session"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // The provider rotates its signing key (restarted with a new one): the service fetches
    // the new JWKS for the unknown key id and signs the next reviewer in.
    let old = provider.take().expect("provider");
    let port = old.port;
    drop(old);
    let rotated = Idp::start(
        port,
        &keys.path().join("rotated.json"),
        &format!("https://{service}/auth/oidc/callback"),
    );
    let bob = browser(&harness, false);
    let session = console_sign_in(&bob, &harness, "bob").await;
    assert_eq!(session["reviewer"], "bob@example.com (oidc:bob)");
    harness.stop().await;
    drop(rotated);
}

/// Runs the code flow with PKCE against `idp` as its client would, and returns the ID token
/// and the nonce it was issued for.
async fn id_token_from(
    harness: &Harness,
    idp: &Idp,
    service: std::net::SocketAddr,
) -> (String, String) {
    use base64::Engine as _;
    let client = browser(harness, true);
    let verifier = "a-test-verifier-of-sufficient-length-0123456789-abcdefghij";
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(<sha2::Sha256 as sha2::Digest>::digest(verifier.as_bytes()));
    let nonce = "nonce-of-this-sign-in".to_owned();
    let mut start = reqwest::Url::parse(&format!("{}/auth", idp.issuer))
        .expect("code flow at the other provider");
    start
        .query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", idp::CLIENT_ID)
        .append_pair(
            "redirect_uri",
            &format!("https://{service}/auth/oidc/callback"),
        )
        .append_pair("scope", "openid email groups")
        .append_pair("state", "s")
        .append_pair("nonce", &nonce)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    let redirect = sign_in_at_provider(&client, start.as_str(), "alice").await;
    let location = reqwest::Url::parse(
        redirect.headers()["location"]
            .to_str()
            .expect("code flow at the other provider"),
    )
    .expect("code flow at the other provider");
    let code = location
        .query_pairs()
        .find(|(key, _)| key == "code")
        .map_or_else(
            || panic!("no code in {location}"),
            |(_, value)| value.into_owned(),
        );
    let redirect_uri = format!("https://{service}/auth/oidc/callback");
    let (status, tokens) = json_of(
        client
            .post(format!("{}/token", idp.issuer))
            .basic_auth(idp::CLIENT_ID, Some(idp::CLIENT_SECRET))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", &redirect_uri),
                ("code_verifier", verifier),
            ])
            .send()
            .await
            .expect("code flow at the other provider"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    (
        tokens["id_token"]
            .as_str()
            .expect("code flow at the other provider")
            .to_owned(),
        nonce,
    )
}

on_both_backends!(
    provider_identities_sign_in_with_their_groups_and_decide,
    foreign_issuers_forged_logins_refused_and_key_rotation_followed,
);
