//! The `gatekeep` binary against an in-process decision service on loopback.

use std::{path::Path, process::Output, sync::Arc, time::Duration};

use gatekeep_client::{AgentLink, AgentLinkConfig, ClientIdentity, ClientTls, LinkEvent};
use gatekeep_proto::{
    GrantDuration,
    model::{ApprovalRequest, ApprovalSettings, ExecTarget, RequestState, Target, Verdict},
};
use gatekeep_server::{Server, ServerConfig, certs::Pki};
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(20);

struct Env {
    dir: tempfile::TempDir,
    endpoint: String,
    token: String,
}

impl Env {
    /// Runs `gatekeep ARGS` with the service's address, CA and token in the environment.
    async fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, &self.token, &self.endpoint).await
    }

    async fn run_with(&self, args: &[&str], token: &str, server: &str) -> Output {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gatekeep"));
        command
            .args(args)
            .env("GATEKEEP_SERVER", server)
            .env("GATEKEEP_TOKEN", token)
            .env("GATEKEEP_CA", self.dir.path().join("ca.pem"))
            // Keep the user's own ~/.config/gatekeep/cli.toml out of the test.
            .env("XDG_CONFIG_HOME", self.dir.path());
        tokio::task::spawn_blocking(move || command.output().expect("run gatekeep"))
            .await
            .expect("join")
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn request(argv: &[&str]) -> ApprovalRequest {
    let now = time::OffsetDateTime::now_utc();
    ApprovalRequest {
        id: Uuid::new_v4(),
        policy: "ai-agents".into(),
        rule: "default".into(),
        cgroup: "/sys/fs/cgroup/agents/a1".into(),
        pid: 7,
        tid: 7,
        uid: 1000,
        user_name: Some("worker".into()),
        cwd: None,
        ancestry: vec![],
        target: Target::Exec(ExecTarget {
            executable: "/usr/bin/git".into(),
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            content: None,
            path_check: None,
            named: None,
            file: None,
            mount_namespace: None,
            argv_truncated: false,
            env: Vec::new(),
        }),
        requested_at: now,
        deadline: now + time::Duration::minutes(5),
        on_timeout: Verdict::Deny,
        approval: ApprovalSettings {
            grant_durations: vec![
                GrantDuration::Once,
                GrantDuration::For(Duration::from_hours(1)),
            ],
            ..ApprovalSettings::default()
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one session of a reviewer, command after command"
)]
async fn a_reviewer_session() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::ephemeral(&[]).expect("pki");
    std::fs::write(dir.path().join("ca.pem"), pki.ca.cert_pem()).expect("write ca");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let config = ServerConfig {
        data_dir: dir.path().join("data"),
        ..ServerConfig::default()
    };
    let audit_db = config.audit_db();
    let server = Server::builder(config)
        .tls(pki.tls())
        .listener(listener)
        .build()
        .await
        .expect("server");
    let endpoint = server.endpoint();
    let token = server
        .add_reviewer("alice", &["sre".into()])
        .await
        .expect("reviewer");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async move {
        stopped.await.ok();
    }));
    let env = Env {
        dir,
        endpoint: endpoint.clone(),
        token,
    };

    let identity = pki.agent("web-1").expect("agent cert");
    let (link, mut events) = AgentLink::start(AgentLinkConfig::new(
        endpoint.clone(),
        ClientTls {
            ca_pem: pki.ca.cert_pem().to_owned(),
            identity: Some(ClientIdentity {
                cert_pem: identity.cert_pem,
                key_pem: identity.key_pem,
            }),
            domain: None,
        },
    ))
    .expect("link");
    while !matches!(
        tokio::time::timeout(PATIENCE, events.recv())
            .await
            .expect("event"),
        Some(LinkEvent::Connected { .. })
    ) {}
    let link = Arc::new(link);

    let output = env.run(&["review", "list"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "no pending requests\n");

    let first = request(&["git", "push", "origin", "main"]);
    let waiting = {
        let link = Arc::clone(&link);
        let first = first.clone();
        tokio::spawn(async move { link.decide(first).await })
    };
    let started = std::time::Instant::now();
    let listed = loop {
        let output = env.run(&["--output", "json", "review", "list"]).await;
        assert!(output.status.success(), "{}", stderr(&output));
        let listed: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
        if listed.as_array().is_some_and(|a| !a.is_empty()) {
            break listed;
        }
        assert!(started.elapsed() < PATIENCE, "the request never showed up");
    };
    assert_eq!(listed[0]["request"]["id"], first.id.to_string());
    assert_eq!(listed[0]["host"], "web-1");

    let table = stdout(&env.run(&["review", "list"]).await);
    assert!(table.starts_with("ID "), "{table}");
    // WHAT names the executable once, then the arguments after argv[0].
    assert!(table.contains("/usr/bin/git push origin main"), "{table}");
    assert!(!table.contains("/usr/bin/git git"), "{table}");

    let short = &first.id.to_string()[..8];
    let shown = env.run(&["review", "show", short]).await;
    assert!(shown.status.success(), "{}", stderr(&shown));
    assert!(
        stdout(&shown).contains("argv         git push origin main\n"),
        "{}",
        stdout(&shown)
    );

    // A duration the policy does not allow: refused with the reason, nothing changes.
    let refused = env.run(&["review", "approve", short, "--always"]).await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("does not let reviewers grant `always`"),
        "{}",
        stderr(&refused)
    );

    let approved = env
        .run(&[
            "review", "approve", short, "--for", "1h", "--reason", "release",
        ])
        .await;
    assert!(approved.status.success(), "{}", stderr(&approved));
    assert!(
        stdout(&approved).contains("approved: allow; grant"),
        "{}",
        stdout(&approved)
    );
    let decision = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("decided")
        .expect("task")
        .expect("decision");
    assert_eq!(decision.state, RequestState::Approved);
    assert!(decision.grant.is_some());

    // Deciding again: wrong state, named.
    let again = env.run(&["review", "deny", &first.id.to_string()]).await;
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("is already approved"),
        "{}",
        stderr(&again)
    );
    // Unknown id.
    let unknown = env
        .run(&["review", "deny", &Uuid::new_v4().to_string()])
        .await;
    assert!(
        stderr(&unknown).contains("gatekeep review list"),
        "{}",
        stderr(&unknown)
    );
    let prefix = env.run(&["review", "deny", "ffffffff"]).await;
    assert!(
        stderr(&prefix).contains("no request id starts with `ffffffff`"),
        "{}",
        stderr(&prefix)
    );

    let grants = env.run(&["--output", "json", "grants", "list"]).await;
    let grants: serde_json::Value = serde_json::from_slice(&grants.stdout).expect("json");
    let grant_id = grants[0]["id"].as_str().expect("grant id").to_owned();
    // A grant by a prefix of its id.
    let revoked = env.run(&["grants", "revoke", &grant_id[..6]]).await;
    assert!(revoked.status.success(), "{}", stderr(&revoked));

    let status = env.run(&["status"]).await;
    assert!(status.status.success(), "{}", stderr(&status));
    assert!(
        stdout(&status).contains("agents     web-1"),
        "{}",
        stdout(&status)
    );
    assert!(
        stdout(&status).contains("you        alice (sre)"),
        "{}",
        stdout(&status)
    );

    let verify = env.run(&["audit", "verify"]).await;
    assert!(verify.status.success(), "{}", stderr(&verify));
    assert!(
        stdout(&verify).starts_with("ok: the service's "),
        "{}",
        stdout(&verify)
    );
    let export = env.run(&["audit", "export", "--format", "jsonl"]).await;
    let lines = stdout(&export);
    assert!(lines.lines().count() >= 4, "{lines}");
    assert!(lines.contains("\"kind\":\"grant_revoked\""), "{lines}");

    // Bad token, unreachable server: the cause and the fix.
    let bad = env
        .run_with(&["review", "list"], "gk_nope", &endpoint)
        .await;
    assert!(
        stderr(&bad).contains("refused your token") && stderr(&bad).contains("GATEKEEP_TOKEN"),
        "{}",
        stderr(&bad)
    );
    // Bound but not listening: the port stays this test's (no other test can take it,
    // as one could after a listener is dropped) and every connection to it is refused.
    let closed = tokio::net::TcpSocket::new_v4().expect("socket");
    closed
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let nowhere = format!("https://{}", closed.local_addr().expect("addr"));
    let down = env.run_with(&["status"], &env.token, &nowhere).await;
    assert!(
        stderr(&down).contains("cannot reach the decision service"),
        "{}",
        stderr(&down)
    );

    drop(link);
    stop.send(()).ok();
    tokio::time::timeout(PATIENCE, serving)
        .await
        .expect("stops")
        .expect("task")
        .expect("clean");

    // Local audit and policy files, without a server.
    let local = env
        .run(&["audit", "verify", "--db", audit_db.to_str().expect("utf-8")])
        .await;
    assert!(local.status.success(), "{}", stderr(&local));
    assert!(stdout(&local).starts_with("ok: "), "{}", stdout(&local));
    check_policy_validate(&env, env.dir.path()).await;
}

async fn check_policy_validate(env: &Env, dir: &Path) {
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[[policy]]\nname = \"a\"\ncgroups = [\"/sys/fs/cgroup/a\"]\n[policy.exec]\ndefault = \"ask\"\n",
    )
    .expect("write");
    let output = env
        .run(&["policy", "validate", good.to_str().expect("utf-8")])
        .await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "ok: 1 policy, 0 exec rules, 0 connect rules\n"
    );
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[[policy]]\nname = \"b\"\ncgroups = [\"b/*\"]\n").expect("write");
    let output = env
        .run(&["policy", "validate", bad.to_str().expect("utf-8")])
        .await;
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("bad.toml:3:"),
        "{}",
        stderr(&output)
    );
}

/// A service with reviewer `alice` and a connected agent `web-1`.
struct Running {
    env: Env,
    link: Arc<AgentLink>,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<Result<(), gatekeep_server::Error>>,
    /// The token of bob, an administrator (group `admins`).
    admin: String,
}

async fn running() -> Running {
    running_with(|_, _| {}).await
}

/// A service whose config `configure` adjusts (given the test's directory).
async fn running_with(configure: impl FnOnce(&mut ServerConfig, &Path)) -> Running {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::ephemeral(&[]).expect("pki");
    std::fs::write(dir.path().join("ca.pem"), pki.ca.cert_pem()).expect("write ca");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut config = ServerConfig {
        data_dir: dir.path().join("data"),
        ..ServerConfig::default()
    };
    configure(&mut config, dir.path());
    let server = Server::builder(config)
        .tls(pki.tls())
        .listener(listener)
        .build()
        .await
        .expect("server");
    let endpoint = server.endpoint();
    let token = server
        .add_reviewer("alice", &["sre".into()])
        .await
        .expect("reviewer");
    let admin = server
        .add_reviewer("bob", &["sre".into(), "admins".into()])
        .await
        .expect("reviewer");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async move {
        stopped.await.ok();
    }));
    let identity = pki.agent("web-1").expect("agent cert");
    let (link, mut events) = AgentLink::start(AgentLinkConfig::new(
        endpoint.clone(),
        ClientTls {
            ca_pem: pki.ca.cert_pem().to_owned(),
            identity: Some(ClientIdentity {
                cert_pem: identity.cert_pem,
                key_pem: identity.key_pem,
            }),
            domain: None,
        },
    ))
    .expect("link");
    while !matches!(
        tokio::time::timeout(PATIENCE, events.recv())
            .await
            .expect("event"),
        Some(LinkEvent::Connected { .. })
    ) {}
    Running {
        env: Env {
            dir,
            endpoint,
            token,
        },
        link: Arc::new(link),
        stop,
        serving,
        admin,
    }
}

/// Sends `request` from the agent and waits until the service lists it.
async fn ask(running: &Running, request: &ApprovalRequest) {
    let link = Arc::clone(&running.link);
    let sent = request.clone();
    tokio::spawn(async move { link.decide(sent).await });
    let started = std::time::Instant::now();
    loop {
        let output = running
            .env
            .run(&["--output", "json", "review", "list"])
            .await;
        let listed: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
        if listed.as_array().is_some_and(|a| {
            a.iter()
                .any(|r| r["request"]["id"] == request.id.to_string())
        }) {
            return;
        }
        assert!(started.elapsed() < PATIENCE, "the request never showed up");
    }
}

fn with_id(mut request: ApprovalRequest, id: &str) -> ApprovalRequest {
    request.id = Uuid::try_parse(id).expect("uuid");
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_ids_are_unique_and_prefixes_resolve_or_name_the_candidates() {
    let running = running().await;
    let env = &running.env;
    // Two ids that share their first eight digits, and one that does not.
    let a = with_id(
        request(&["git", "push"]),
        "12345678-aaaa-4aaa-8aaa-aaaaaaaaaaaa",
    );
    let b = with_id(
        request(&["git", "fetch"]),
        "12345678-abbb-4bbb-8bbb-bbbbbbbbbbbb",
    );
    let c = with_id(
        request(&["git", "pull"]),
        "9abcdef0-cccc-4ccc-8ccc-cccccccccccc",
    );
    for r in [&a, &b, &c] {
        ask(&running, r).await;
    }

    let table = stdout(&env.run(&["review", "list"]).await);
    let shorts: Vec<&str> = table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().next().expect("id column"))
        .collect();
    let mut expected = vec!["12345678-aa", "12345678-ab", "9abcdef0"];
    let mut sorted = shorts.clone();
    sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(sorted, expected, "{table}");

    // Each short id, as listed, resolves to its request.
    let shown = env.run(&["review", "show", "12345678-ab"]).await;
    assert!(shown.status.success(), "{}", stderr(&shown));
    assert!(
        stdout(&shown).contains(&format!("id           {}\n", b.id)),
        "{}",
        stdout(&shown)
    );
    // Any case, hyphens optional.
    let shown = env.run(&["review", "show", "12345678AA"]).await;
    assert!(
        stdout(&shown).contains(&a.id.to_string()),
        "{}",
        stderr(&shown)
    );
    // An ambiguous prefix names the candidates and changes nothing.
    let ambiguous = env.run(&["review", "deny", "1234"]).await;
    assert!(!ambiguous.status.success());
    let message = stderr(&ambiguous);
    assert!(
        message.contains("`1234` is ambiguous")
            && message.contains(&a.id.to_string())
            && message.contains(&b.id.to_string())
            && !message.contains(&c.id.to_string()),
        "{message}"
    );
    // Too short, not hex: said so.
    let bad = env.run(&["review", "show", "12"]).await;
    assert!(
        stderr(&bad).contains("at least 4 of its hex digits"),
        "{}",
        stderr(&bad)
    );
    // A unique prefix decides exactly that request.
    let denied = env.run(&["review", "deny", "9abc", "--reason", "no"]).await;
    assert!(denied.status.success(), "{}", stderr(&denied));
    assert!(
        stdout(&denied).starts_with(&format!("{} denied", c.id)),
        "{}",
        stdout(&denied)
    );
    // Decided requests still resolve (show works on history too).
    let shown = env.run(&["review", "show", "9abcdef0"]).await;
    assert!(
        stdout(&shown).contains("state        denied"),
        "{}",
        stdout(&shown)
    );

    running.stop.send(()).ok();
    drop(running.link);
    tokio::time::timeout(PATIENCE, running.serving)
        .await
        .expect("stops")
        .expect("task")
        .expect("clean");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario end to end: the CLI, then the console's HTTP API"
)]
async fn an_approval_without_a_reason_is_refused_where_the_policy_requires_one_cli_and_api() {
    let running = running().await;
    let env = &running.env;
    let mut asked = with_id(
        request(&["terraform", "apply"]),
        "4eed0000-aaaa-4aaa-8aaa-aaaaaaaaaaaa",
    );
    asked.approval.require_reason = true;
    ask(&running, &asked).await;

    // No reason, or only blanks: refused, saying which policy wants one and how to give it.
    for args in [
        &["review", "approve", "4eed"][..],
        &["review", "approve", "4eed", "--reason", "  "][..],
    ] {
        let refused = env.run(args).await;
        assert!(!refused.status.success(), "{}", stdout(&refused));
        let message = stderr(&refused);
        assert!(
            message.contains("policy `ai-agents` requires a reason for approvals")
                && message.contains("--reason"),
            "{message}"
        );
    }
    let shown = stdout(&env.run(&["review", "show", "4eed"]).await);
    assert!(shown.contains("state        pending"), "{shown}");

    let approved = env
        .run(&[
            "review",
            "approve",
            "4eed",
            "--reason",
            "planned change CHG-42",
        ])
        .await;
    assert!(approved.status.success(), "{}", stderr(&approved));
    assert!(
        stdout(&approved).starts_with(&format!("{} approved", asked.id)),
        "{}",
        stdout(&approved)
    );

    // The same through the console's HTTP API, signed in as the console is.
    let mut asked = with_id(
        request(&["terraform", "plan"]),
        "4eed1111-aaaa-4aaa-8aaa-aaaaaaaaaaaa",
    );
    asked.approval.require_reason = true;
    ask(&running, &asked).await;
    let path = format!("/api/v1/requests/{}/decision", asked.id);
    let listed = env
        .run(&[
            "api",
            "get",
            "/api/v1/requests?policy=ai-agents",
            "--session",
        ])
        .await;
    assert!(listed.status.success(), "{}", stderr(&listed));
    let queue: serde_json::Value = serde_json::from_str(&stdout(&listed)).expect("json");
    assert!(
        queue["requests"]
            .as_array()
            .expect("requests")
            .iter()
            .any(|r| r["request"]["id"] == asked.id.to_string()),
        "{queue}"
    );
    let refused = env
        .run(&[
            "api",
            "post",
            &path,
            "--session",
            "--body",
            r#"{"verdict": "allow"}"#,
        ])
        .await;
    assert!(!refused.status.success());
    let message = stderr(&refused);
    assert!(
        message.contains("400 Bad Request")
            && message.contains("policy `ai-agents` requires a reason for approvals"),
        "{message}"
    );
    let body = r#"{"verdict": "allow", "reason": "plan only"}"#;
    let approved = env
        .run(&["api", "post", &path, "--session", "--body", body])
        .await;
    assert!(approved.status.success(), "{}", stderr(&approved));
    let record: serde_json::Value = serde_json::from_str(&stdout(&approved)).expect("json");
    assert_eq!(record["state"], "approved", "{record}");
    assert_eq!(record["decision"]["reason"], "plan only", "{record}");
    // The bearer way, and paths outside the API are refused before anything is sent.
    let shown = env.run(&["api", "get", "/api/v1/status"]).await;
    assert!(shown.status.success(), "{}", stderr(&shown));
    let outside = env.run(&["api", "get", "/console/"]).await;
    assert!(
        stderr(&outside).contains("is not an API path"),
        "{}",
        stderr(&outside)
    );

    running.stop.send(()).ok();
    drop(running.link);
    tokio::time::timeout(PATIENCE, running.serving)
        .await
        .expect("stops")
        .expect("task")
        .expect("clean");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_sequences_in_argv_cannot_drive_the_reviewers_terminal() {
    let running = running().await;
    let env = &running.env;
    let hostile = [
        "git",
        "\u{1b}[2J\u{1b}[H",      // CSI: clear the screen, cursor home
        "\u{1b}]0;approved\u{7}", // OSC: set the window title, BEL
        "ok\r\u{8}\u{8}rm -rf /", // CR and backspaces to overwrite the line
        "evil\u{202e}hs.txt",     // bidi override
        "\u{9b}31m",              // C1 CSI
    ];
    let mut asked = request(&hostile);
    asked.cwd = Some("/tmp/\u{1b}[31mred".into());
    asked.cgroup = "/agents/\u{7}bell".into();
    asked.ancestry = vec![gatekeep_proto::model::ProcessInfo {
        pid: 1,
        comm: "sh\u{1b}[8m".into(),
        executable: None,
        argv: vec!["sh".into(), "-c".into(), "\u{1b}[8mhidden".into()],
        cgroup: None,
    }];
    ask(&running, &asked).await;

    let forbidden = |text: &str| {
        text.chars()
            .filter(|c| (c.is_control() && *c != '\n') || ('\u{202a}'..='\u{202e}').contains(c))
            .collect::<Vec<char>>()
    };
    let list = stdout(&env.run(&["review", "list"]).await);
    assert!(forbidden(&list).is_empty(), "{list:?}");
    assert!(list.contains(r"/usr/bin/git \e[2J\e[H"), "{list}");
    let short = &asked.id.to_string()[..8];
    let show = stdout(&env.run(&["review", "show", short]).await);
    assert!(forbidden(&show).is_empty(), "{show:?}");
    for visible in [
        r"\e[2J\e[H",
        r"\e]0;approved\a",
        r#""ok\r\b\brm -rf /""#,
        r"evil\u{202e}hs.txt",
        r"\u{9b}31m",
        r"cwd          /tmp/\e[31mred",
        r"cgroup       /agents/\abell",
        r"sh\e[8m",
        r"\e[8mhidden",
    ] {
        assert!(show.contains(visible), "{visible} missing from\n{show}");
    }
    // JSON stays raw: the consumer gets the values, JSON-escaped (no ESC, BEL, CR, BS).
    let json = env
        .run(&["--output", "json", "review", "show", short])
        .await;
    assert!(
        !stdout(&json)
            .trim_end()
            .chars()
            .any(|c| u32::from(c) < 0x20),
        "{}",
        stdout(&json)
    );
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(
        value["request"]["request"]["target"]["argv"][1],
        "\u{1b}[2J\u{1b}[H"
    );

    running.stop.send(()).ok();
    drop(running.link);
    tokio::time::timeout(PATIENCE, running.serving)
        .await
        .expect("stops")
        .expect("task")
        .expect("clean");
}

/// Runs `gatekeep ARGS` without any service (policy validation is local).
fn run_local(dir: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_gatekeep"))
        .args(args)
        .env_remove("GATEKEEP_SERVER")
        .env_remove("GATEKEEP_TOKEN")
        .env_remove("GATEKEEP_CA")
        .env("XDG_CONFIG_HOME", dir)
        .output()
        .expect("run gatekeep")
}

/// A folder with two copies of an ELF binary (`tool`, `other`) and a `#!/bin/sh` script.
struct PolicyHost {
    dir: tempfile::TempDir,
    base: String,
}

const POLICY_HEAD: &str =
    "[[policy]]\nname = \"agents\"\ncgroups = [\"/sys/fs/cgroup/agents\"]\n[policy.exec]\n";

impl PolicyHost {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy("/bin/true", dir.path().join("tool")).expect("copy /bin/true");
        std::fs::copy("/bin/true", dir.path().join("other")).expect("copy /bin/true");
        std::fs::write(dir.path().join("denied.sh"), "#!/bin/sh\necho hi\n").expect("write");
        let base = dir.path().display().to_string();
        Self { dir, base }
    }

    /// Writes `name` with this `[policy.exec]` body and returns its path.
    fn policy(&self, name: &str, exec: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("{POLICY_HEAD}{exec}")).expect("write");
        path.to_str().expect("utf-8").to_owned()
    }

    /// A deny-list under default allow, on an ELF file, a script and a path that does not
    /// exist (whose name holds an escape sequence, written as a TOML escape).
    fn leaky(&self) -> String {
        let base = &self.base;
        self.policy(
            "leaky.toml",
            &format!(
                "default = \"allow\"\ndeny = [\"{base}/tool\", \"{base}/denied.sh\", \"{base}/gone\\u001b[2J\"]\n"
            ),
        )
    }

    fn run(&self, args: &[&str]) -> Output {
        run_local(self.dir.path(), args)
    }
}

#[test]
fn policy_validate_passes_a_clean_allow_list_and_fails_an_invalid_file() {
    let host = PolicyHost::new();
    let base = &host.base;
    // An allow-list under default deny, on real ELF files, mapped files included: no
    // warnings, with or without the flag.
    let clean = host.policy(
        "clean.toml",
        &format!(
            "default = \"deny\"\nunlisted_mappings = \"default\"\nallow = [\"{base}/tool\"]\ndeny = [\"{base}/other\"]\n"
        ),
    );
    for args in [
        &["policy", "validate", clean.as_str()][..],
        &["policy", "validate", "--deny-warnings", clean.as_str()][..],
    ] {
        let output = host.run(args);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        assert_eq!(
            stdout(&output),
            "ok: 1 policy, 2 exec rules, 0 connect rules\n"
        );
        assert_eq!(stderr(&output), "");
    }

    // An invalid file is status 1, flag or not.
    let bad = host.policy("bad.toml", "default = \"alow\"\n");
    let output = host.run(&["policy", "validate", "--deny-warnings", &bad]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("bad.toml:5:11: unknown action"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn policy_validate_prints_warnings_and_fails_on_them_only_when_asked() {
    let host = PolicyHost::new();
    let base = &host.base;
    let leaky = host.leaky();

    // Warnings alone do not fail: printed on stderr, counted in the summary.
    let output = host.run(&["policy", "validate", &leaky]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "ok: 1 policy, 3 exec rules, 0 connect rules; 3 warnings\n"
    );
    let err = stderr(&output);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(
        lines[0].starts_with(&format!(
            "warning[deny-list-under-allow]: {leaky}:6:9: policy \"agents\": exec default is allow, so deny \"{base}/tool\", deny \"{base}/denied.sh\", deny \"{base}/gone\\e[2J\" hold only for the files named"
        )),
        "{err}"
    );
    assert!(lines[0].contains("write default = \"deny\""), "{err}");
    assert!(
        lines[1].starts_with(&format!(
            "warning[script]: {leaky}:6:{}: policy \"agents\": exec deny rule \"{base}/denied.sh\" is a script (#!/bin/sh)",
            9 + base.len() + 9
        )),
        "{err}"
    );
    assert!(
        lines[1].contains("restrict the interpreter too (deny \"/bin/sh\""),
        "{err}"
    );
    assert!(
        lines[2].starts_with(&format!("warning[missing-path]: {leaky}:6:"))
            && lines[2].contains(&format!(
                "exec deny rule \"{base}/gone\\e[2J\" names a file that does not exist on this host"
            )),
        "{err}"
    );
    assert!(
        !err.contains('\u{1b}'),
        "escape sequences reach the terminal: {err}"
    );

    // --deny-warnings: the same warnings, no "ok", exit status 3.
    let output = host.run(&["policy", "validate", "--deny-warnings", &leaky]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert_eq!(stdout(&output), "");
    let err = stderr(&output);
    assert_eq!(err.lines().count(), 4, "{err}");
    assert!(
        err.lines().take(3).all(|line| line.starts_with("warning[")),
        "{err}"
    );
    assert!(
        err.lines().nth(3).is_some_and(|line| line.starts_with(
            "gatekeep: the policy files are valid but have 3 warning(s), and --deny-warnings makes that a failure"
        )),
        "{err}"
    );
}

#[test]
fn policy_validate_json_carries_the_warnings_and_the_same_exit_status() {
    let host = PolicyHost::new();
    let base = &host.base;
    let leaky = host.leaky();
    let output = host.run(&[
        "--output",
        "json",
        "policy",
        "validate",
        "--deny-warnings",
        &leaky,
    ]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let document: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON document");
    assert_eq!(document["ok"], false);
    assert_eq!(document["exec_rules"], 3);
    let warnings = document["warnings"].as_array().expect("warnings");
    let kinds: Vec<&str> = warnings
        .iter()
        .map(|w| w["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["deny-list-under-allow", "script", "missing-path"]);
    assert_eq!(warnings[0]["rules"].as_array().map(Vec::len), Some(3));
    // Raw values: JSON escapes them itself.
    assert_eq!(
        warnings[2]["rules"][0]["path"],
        format!("{base}/gone\u{1b}[2J")
    );
    assert_eq!(warnings[2]["rules"][0]["action"], "deny");
    assert_eq!(warnings[2]["policy"], "agents");
    assert_eq!(warnings[2]["at"]["line"], 6);
    assert_eq!(warnings[2]["at"]["file"], leaky.as_str());

    let output = host.run(&["--output", "json", "policy", "validate", &leaky]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let document: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON document");
    assert_eq!(document["ok"], true);
    assert_eq!(document["warnings"].as_array().map(Vec::len), Some(3));
}

#[test]
fn policy_test_passes_right_expectations_and_fails_wrong_ones_with_status_4() {
    let host = PolicyHost::new();
    let base = &host.base;
    // The policy and its cases side by side: the directory's policy files are loaded
    // without the `*.cases.toml` files, which hold the cases.
    let policies = host.dir.path().join("policies");
    std::fs::create_dir(&policies).expect("mkdir");
    std::fs::write(
        policies.join("agents.toml"),
        format!(
            "{POLICY_HEAD}default = \"ask\"\nallow = [\"{base}/tool\"]\ndeny = [\"{base}/other\"]\n[policy.connect]\ndefault = \"deny\"\nallow = [\"10.0.0.0/8:443\"]\n"
        ),
    )
    .expect("write");
    let cases = |name: &str, deny_expect: &str| {
        let path = policies.join(name);
        std::fs::write(
            &path,
            format!(
                "[[case]]\nname = \"tool runs\"\ncgroup = \"/sys/fs/cgroup/agents/job-1\"\nexec = \"{base}/tool\"\nexpect = \"allow\"\n\n\
                 [[case]]\ncgroup = \"/sys/fs/cgroup/agents/job-1\"\nexec = \"{base}/other\"\nargv = [\"other\", \"\\u001b[2J\"]\nexpect = \"{deny_expect}\"\n\n\
                 [[case]]\ncgroup = \"/sys/fs/cgroup/agents/job-1\"\nconnect = \"10.1.2.3:443\"\nexpect = \"allow\"\n\n\
                 [[case]]\ncgroup = \"/sys/fs/cgroup/web\"\nconnect = \"1.1.1.1:80\"\nexpect = \"allow\"\n"
            ),
        )
        .expect("write");
        path.to_str().expect("utf-8").to_owned()
    };
    let dir = policies.to_str().expect("utf-8");

    // Right expectations: status 0, one PASS line per case and a summary.
    let right = cases("agents.cases.toml", "deny");
    let output = host.run(&["policy", "test", "--policies", dir, dir]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let out = stdout(&output);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            format!(
                "PASS {right}:1:1: tool runs: exec {base}/tool in /sys/fs/cgroup/agents/job-1 -> allow (agents: exec rule allow {base}/tool)"
            ),
            format!(
                "PASS {right}:7:1: exec {base}/other (argv: other \\e[2J) in /sys/fs/cgroup/agents/job-1 -> deny (agents: exec rule deny {base}/other)"
            ),
            format!(
                "PASS {right}:13:1: connect 10.1.2.3:443 in /sys/fs/cgroup/agents/job-1 -> allow (agents: connect rule allow 10.0.0.0/8:443)"
            ),
            format!(
                "PASS {right}:18:1: connect 1.1.1.1:80 in /sys/fs/cgroup/web -> allow (no policy governs this cgroup)"
            ),
            "4 case(s): 4 passed, 0 failed".to_owned(),
        ]
    );
    assert!(
        !out.contains('\u{1b}'),
        "escape sequences reach the terminal"
    );

    // A wrong expectation: status 4, the case marked FAIL with what it got and why.
    std::fs::remove_file(&right).expect("rm");
    let wrong = cases("wrong.cases.toml", "ask");
    let output = host.run(&["policy", "test", "--policies", dir, &wrong]);
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    assert!(
        stdout(&output).contains(&format!(
            "FAIL {wrong}:7:1: exec {base}/other (argv: other \\e[2J) in /sys/fs/cgroup/agents/job-1 -> expected ask, got deny (agents: exec rule deny {base}/other)"
        )),
        "{}",
        stdout(&output)
    );
    assert!(stdout(&output).ends_with("4 case(s): 3 passed, 1 failed\n"));
    assert!(
        stderr(&output).starts_with(
            "gatekeep: 1 of 4 case(s) did not get the expected outcome; fix the policy, or the expectation if the policy is right"
        ),
        "{}",
        stderr(&output)
    );

    // JSON: the same verdicts, one document, the same status.
    let output = host.run(&[
        "--output",
        "json",
        "policy",
        "test",
        "--policies",
        dir,
        &wrong,
    ]);
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    let document: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON document");
    assert_eq!(
        (document["passed"].as_u64(), document["failed"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(document["cases"][1]["passed"], false);
    assert_eq!(document["cases"][1]["expect"], "ask");
    assert_eq!(document["cases"][1]["outcome"]["action"], "deny");
    assert_eq!(document["cases"][1]["example"]["argv"][1], "\u{1b}[2J");
}

#[test]
fn policy_test_refuses_invalid_cases_and_missing_policies_with_status_1() {
    let host = PolicyHost::new();
    let policy = host.policy("agents.toml", "default = \"ask\"\n");
    let bad = host.dir.path().join("bad.cases.toml");
    std::fs::write(
        &bad,
        "[[case]]\ncgroup = \"/sys/fs/cgroup/a\"\nconnect = \"db.internal\"\nexpect = \"deny\"\n",
    )
    .expect("write");
    let bad = bad.to_str().expect("utf-8");
    // An invalid cases file is status 1 with its place; nothing is decided.
    let output = host.run(&["policy", "test", "--policies", &policy, bad]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert_eq!(stdout(&output), "");
    assert!(
        stderr(&output).contains(&format!(
            "{bad}:3:11: connect \"db.internal\" is neither IP:PORT nor HOST:PORT"
        )),
        "{}",
        stderr(&output)
    );
    // A missing policy directory names itself and the cause.
    let output = host.run(&["policy", "test", "--policies", "/nonexistent/policies", bad]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).starts_with("gatekeep: cannot load the policy files: failed to read policy file /nonexistent/policies: No such file or directory"),
        "{}",
        stderr(&output)
    );
}

/// A webhook receiver on loopback (plain HTTP/1.1): refuses the first delivery with 400,
/// accepts the rest with 204; every delivery's event id in order of arrival.
async fn receiver() -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let events = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut data = Vec::new();
            let mut buffer = [0_u8; 4096];
            // Headers, then as much body as content-length says.
            let (head, length) = loop {
                let n = stream.read(&mut buffer).await.unwrap_or(0);
                if n == 0 {
                    break (String::new(), 0);
                }
                data.extend_from_slice(&buffer[..n]);
                if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    data.drain(..end + 4);
                    break (head, length);
                }
            };
            while data.len() < length {
                let n = stream.read(&mut buffer).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&buffer[..n]);
            }
            let id = head
                .lines()
                .find_map(|l| l.strip_prefix("x-gatekeep-event-id:"))
                .unwrap_or_default()
                .trim()
                .to_owned();
            let first = {
                let mut events = events.lock().expect("lock");
                events.push(id);
                events.len() == 1
            };
            let answer: &[u8] = if first {
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 7\r\nconnection: close\r\n\r\nrefused"
            } else {
                b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"
            };
            drop(stream.write_all(answer).await);
            drop(stream.shutdown().await);
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario end to end, read top to bottom"
)]
async fn an_administrator_lists_dead_letters_and_retries_one_until_it_is_delivered() {
    let (url, seen) = receiver().await;
    let running = running_with(|config, dir| {
        std::fs::write(dir.join("hook-key"), "whsec-cli-test").expect("key");
        let text = format!(
            "lease_ms = 400\n[retry]\ninitial_ms = 50\nmax_ms = 200\n\
             [[webhook]]\nname = \"siem\"\nurl = \"{url}\"\nsecret = {{ file = \"{}\" }}\n\
             events = [\"request.requested\"]\n",
            dir.join("hook-key").display()
        );
        config.notify = toml::from_str(&text).expect("notify config");
        config.console.admin_groups = vec!["admins".into()];
    })
    .await;
    let env = &running.env;
    // bob is an administrator (group `admins`), alice is not.
    let admin = running.admin.clone();
    let request = request(&["curl", "https://dead.example"]);
    ask(&running, &request).await;

    // The receiver refused the `requested` event: a dead letter.
    let started = std::time::Instant::now();
    let letters = loop {
        let output = env
            .run_with(&["notify", "dead-letters", "--json"], &admin, &env.endpoint)
            .await;
        assert!(output.status.success(), "{}", stderr(&output));
        let listed: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
        let letters = listed["dead_letters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !letters.is_empty() {
            break letters;
        }
        assert!(started.elapsed() < PATIENCE, "no dead letter appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter["sink"], "webhook:siem");
    assert_eq!(letter["subject"], request.id.to_string());
    assert_eq!(letter["event"], "requested");
    assert!(
        letter["error"].as_str().unwrap_or_default().contains("400"),
        "{letter}"
    );
    let id = letter["id"].as_i64().expect("id").to_string();

    let table = env
        .run_with(&["notify", "dead-letters"], &admin, &env.endpoint)
        .await;
    let text = stdout(&table);
    println!("{text}");
    assert!(text.starts_with("ID "), "{text}");
    assert!(
        text.contains("webhook:siem") && text.contains("requested"),
        "{text}"
    );

    // A reviewer who is not an administrator sees nothing and retries nothing.
    let refused = env.run(&["notify", "dead-letters"]).await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("not an administrator"),
        "{}",
        stderr(&refused)
    );
    let refused = env.run(&["notify", "retry", &id]).await;
    assert!(
        stderr(&refused).contains("not an administrator"),
        "{}",
        stderr(&refused)
    );

    let retried = env
        .run_with(&["notify", "retry", &id], &admin, &env.endpoint)
        .await;
    assert!(retried.status.success(), "{}", stderr(&retried));
    println!("{}", stdout(&retried));
    assert!(stdout(&retried).contains("queued"), "{}", stdout(&retried));
    // Delivered again, with the same event id (the receiver's idempotency key).
    let started = std::time::Instant::now();
    while seen.lock().expect("lock").len() < 2 {
        assert!(
            started.elapsed() < PATIENCE,
            "the retry was never delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = seen.lock().expect("lock").clone();
    assert_eq!(events[0], events[1], "{events:?}");
    assert_eq!(events[0], format!("{}.requested", request.id));
    let after = env
        .run_with(&["notify", "dead-letters", "--json"], &admin, &env.endpoint)
        .await;
    let listed: serde_json::Value = serde_json::from_slice(&after.stdout).expect("json");
    assert_eq!(listed["dead_letters"], serde_json::json!([]));
    let again = env
        .run_with(&["notify", "retry", &id], &admin, &env.endpoint)
        .await;
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains(&format!("no dead letter {id}")),
        "{}",
        stderr(&again)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        seen.lock().expect("lock").len(),
        2,
        "delivered once more, not twice"
    );
    running.stop.send(()).expect("stop");
    running.serving.await.expect("join").expect("served");
}
