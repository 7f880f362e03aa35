//! `gatekeep login` against a real OpenID provider (`oidc-provider` on Node.js, loopback):
//! the CLI runs the device authorization flow, a "user" completes the provider's pages (an
//! HTTP client here, as a browser would), the CLI keeps the service's session token, and
//! the next commands are that provider identity.

#[path = "../../gatekeep-server/tests/support/idp.rs"]
#[allow(
    dead_code,
    reason = "shared with gatekeep-server's tests; this test uses a part"
)]
mod idp;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use gatekeep_server::{Server, ServerConfig, certs::Pki};
use idp::Idp;

/// Completes the provider's pages for `user`: the device confirmation, then the sign-in.
async fn complete_at_provider(url: &str, user: &str) {
    let http = reqwest::Client::builder()
        .cookie_store(true)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let mut page = http.get(url).send().await.expect("device page");
    // Each page has one form: post its fields (hidden inputs, and the user on the sign-in).
    for _ in 0..4 {
        let at = page.url().clone();
        let html = page.text().await.expect("page");
        if html.contains("device-done") {
            return;
        }
        let form = html
            .split("<form")
            .nth(1)
            .unwrap_or_else(|| panic!("no form at {at}: {html}"));
        let action = form
            .split("action=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("form action");
        let mut fields: Vec<(String, String)> = form
            .split("<input")
            .skip(1)
            .filter_map(|input| {
                let attr = |name: &str| {
                    input
                        .split(&format!("{name}=\""))
                        .nth(1)
                        .and_then(|rest| rest.split('"').next())
                        .map(str::to_owned)
                };
                Some((attr("name")?, attr("value").unwrap_or_default()))
            })
            .collect();
        if html.contains("name=\"user\"") {
            fields.push(("user".into(), user.into()));
        }
        page = http
            .post(at.join(action).expect("action url"))
            .form(&fields)
            .send()
            .await
            .expect("submit");
    }
    panic!("the provider's pages did not end in success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one sign-in end to end, read top to bottom"
)]
async fn login_makes_the_cli_a_provider_identity() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::ephemeral(&[]).expect("pki");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pki.ca.cert_pem()).expect("write ca");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let provider = Idp::start_any(
        &dir.path().join("keys.json"),
        &format!("https://{addr}/auth/oidc/callback"),
    );
    let mut config = ServerConfig {
        data_dir: dir.path().join("data"),
        ..ServerConfig::default()
    };
    config.console.oidc = Some(provider.config(addr));
    let server = Server::builder(config)
        .tls(pki.tls())
        .listener(listener)
        .build()
        .await
        .expect("server");
    let endpoint = server.endpoint();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async move {
        stopped.await.ok();
    }));

    let cli_config = dir.path().join("cli.toml");
    std::fs::write(
        &cli_config,
        format!(
            "# mine\nserver = \"{endpoint}\"\nca = \"{}\"\n",
            ca.display()
        ),
    )
    .expect("cli config");
    let gatekeep = env!("CARGO_BIN_EXE_gatekeep");
    let mut login = Command::new(gatekeep)
        .args(["--cli-config"])
        .arg(&cli_config)
        .arg("login")
        .stderr(Stdio::piped())
        .spawn()
        .expect("gatekeep login");
    let stderr = login.stderr.take().expect("stderr");
    let (lines, from_login) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[login] {line}");
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let url = loop {
        let line = from_login
            .recv_timeout(Duration::from_secs(30))
            .expect("gatekeep login shows where to sign in");
        if let Some(url) = line.strip_prefix("To sign in, open ") {
            break url.to_owned();
        }
    };
    complete_at_provider(&url, "dave").await;
    let status = tokio::task::spawn_blocking(move || login.wait())
        .await
        .expect("wait")
        .expect("login exits");
    assert!(status.success(), "gatekeep login failed: {status}");
    let saved = std::fs::read_to_string(&cli_config).expect("config");
    assert!(saved.starts_with("# mine\n"), "other lines kept: {saved}");
    assert!(saved.contains("token = \"gk_"), "{saved}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&cli_config)
            .expect("metadata")
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "the token file is private");

    // The next command is the provider's identity, with its groups.
    let output = Command::new(gatekeep)
        .args(["--cli-config"])
        .arg(&cli_config)
        .args(["--output", "json", "status"])
        .output()
        .expect("gatekeep status");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(
        status["reviewer"], "dave@example.com (oidc:dave)",
        "{status}"
    );
    assert_eq!(status["groups"], serde_json::json!(["sre", "security"]));

    // A made-up token is refused.
    let output = Command::new(gatekeep)
        .args(["--cli-config"])
        .arg(&cli_config)
        .args(["--token", "gk_0000", "status"])
        .output()
        .expect("gatekeep status");
    assert!(!output.status.success());

    stop.send(()).ok();
    serving.await.expect("serve task").expect("served");
    drop(provider);
}
