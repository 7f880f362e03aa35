//! A service killed between a decision's commit and its audit records' (a debug build's
//! failpoint, `gatekeep_server::failpoint`, aborts the `gatekeep-server` process there), on
//! both backends: the decision stands, and once the service is started again its audit
//! chain holds the request's records exactly once, the missing ones marked recovered, and
//! verifies. A reviewer's decision, and an automatic one (a server rule).

mod support;

use std::{
    fs,
    net::SocketAddr,
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use gatekeep_client::{
    AgentLink, AgentLinkConfig, Backoff, ClientIdentity, ClientTls, LinkEvent, ReviewClient,
    ReviewConfig,
};
use gatekeep_proto::{
    GrantDuration,
    model::{Decision, RequestState, Verdict},
};
use gatekeep_server::{ServerConfig, certs, failpoint, store};
use support::{Backend, PATIENCE, exec_request};
use uuid::Uuid;

/// The rule that decides `curl auto ...` without a reviewer (a deny rule: the test
/// requests bind an environment, which no allow rule matches).
const RULE: &str = "[[rules]]\nname = \"auto\"\naction = \"deny\"\npolicy = \"ai-agents\"\n\
                    executable = \"/usr/bin/curl\"\ncommand = \"curl auto *\"\n";

/// One service (a `gatekeep-server serve` process at a time) and what it keeps.
struct Service {
    dir: tempfile::TempDir,
    config: ServerConfig,
    addr: SocketAddr,
    ca_pem: String,
    token: String,
    child: Option<Child>,
    started: usize,
}

impl Service {
    async fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let tls = dir.path().join("tls");
        certs::init_dir(&tls, &[]).expect("certificates");
        certs::agent_files(&tls, "web-1", None).expect("agent certificate");
        let mut config = ServerConfig {
            data_dir: dir.path().join("data"),
            ..ServerConfig::default()
        };
        fs::create_dir_all(&config.data_dir).expect("data dir");
        backend.configure(&mut config).await;
        let token = {
            let store = store::open(&config.store, config.state_db(), config.synchronous)
                .await
                .expect("open the store");
            gatekeep_server::add_reviewer(&*store, "alice", &["sre".into()])
                .await
                .expect("reviewer")
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        Self {
            ca_pem: fs::read_to_string(tls.join("ca.pem")).expect("ca"),
            dir,
            config,
            addr: ([127, 0, 0, 1], port).into(),
            token,
            child: None,
            started: 0,
        }
    }

    fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn log(&self) -> std::path::PathBuf {
        self.dir.path().join(format!("server-{}.log", self.started))
    }

    /// Starts the service, aborting at failpoint `abort_at` if given; returns once it serves.
    async fn start(&mut self, abort_at: Option<&str>) {
        self.started += 1;
        let tls = self.dir.path().join("tls");
        let store = self
            .config
            .store
            .url
            .as_ref()
            .map(|url| format!("[store]\nurl = \"{url}\"\npool_size = 4\n"))
            .unwrap_or_default();
        let text = format!(
            "name = \"svc\"\nlisten = \"{addr}\"\ndata_dir = \"{data}\"\n\
             [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n{store}{RULE}",
            addr = self.addr,
            data = self.config.data_dir.display(),
            ca = tls.join("ca.pem").display(),
            cert = tls.join("server.pem").display(),
            key = tls.join("server.key").display(),
        );
        let config_path = self.dir.path().join("server.toml");
        fs::write(&config_path, text).expect("config");
        let mut command = Command::new(env!("CARGO_BIN_EXE_gatekeep-server"));
        command
            .arg("--config")
            .arg(&config_path)
            .arg("serve")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.log()).expect("log"));
        if let Some(point) = abort_at {
            command.env(failpoint::VARIABLE, point);
        }
        // SAFETY: prctl is async-signal-safe. The service dies with the test process.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        self.child = Some(command.spawn().expect("start gatekeep-server"));
        let started = Instant::now();
        loop {
            let ready = tokio::time::timeout(Duration::from_secs(5), async {
                self.try_reviewer().await?.status().await
            })
            .await;
            if matches!(ready, Ok(Ok(_))) {
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "the service never served: {}",
                fs::read_to_string(self.log()).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn try_reviewer(&self) -> Result<ReviewClient, gatekeep_client::ClientError> {
        ReviewClient::connect(ReviewConfig {
            endpoint: self.endpoint(),
            token: self.token.clone(),
            tls: ClientTls {
                ca_pem: self.ca_pem.clone(),
                identity: None,
                domain: None,
            },
            connect_timeout: Duration::from_secs(5),
        })
        .await
    }

    /// Waits until the process aborted at its failpoint.
    fn wait_aborted(&mut self) {
        let mut child = self.child.take().expect("the service runs");
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "the service never reached its failpoint"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(
            status.signal(),
            Some(nix::sys::signal::Signal::SIGABRT as i32),
            "the service stopped at its failpoint: {}",
            fs::read_to_string(self.log()).unwrap_or_default()
        );
    }

    /// Stops it gracefully and checks it exited 0.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(status.success(), "the service exited with {status}");
                return;
            }
            assert!(started.elapsed() < PATIENCE, "the service did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent `web-1`; returns once connected.
    async fn agent(&self) -> Arc<AgentLink> {
        let tls = self.dir.path().join("tls");
        let mut config = AgentLinkConfig::new(
            self.endpoint(),
            ClientTls {
                ca_pem: self.ca_pem.clone(),
                identity: Some(ClientIdentity {
                    cert_pem: fs::read_to_string(tls.join("agent-web-1.pem")).expect("cert"),
                    key_pem: fs::read_to_string(tls.join("agent-web-1.key")).expect("key"),
                }),
                domain: None,
            },
        );
        config.backoff = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            jitter: true,
        };
        let (link, mut events) = AgentLink::start(config).expect("start link");
        loop {
            let event = tokio::time::timeout(PATIENCE, events.recv())
                .await
                .expect("the agent connects in time")
                .expect("link alive");
            if matches!(event, LinkEvent::Connected { .. }) {
                break;
            }
        }
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        Arc::new(link)
    }

    async fn chain(&self) -> Vec<serde_json::Value> {
        String::from_utf8(support::audit_export(&self.config).await)
            .expect("utf-8")
            .lines()
            .map(|line| serde_json::from_str(line).expect("json"))
            .collect()
    }

    async fn stored_state(&self, id: Uuid) -> RequestState {
        let store = store::open(
            &self.config.store,
            self.config.state_db(),
            self.config.synchronous,
        )
        .await
        .expect("open the store");
        store
            .get_request(id)
            .await
            .expect("read the request")
            .expect("the request is stored")
            .value
            .state
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.kill());
            drop(child.wait());
        }
    }
}

/// The records of request `id` in `lines` of kind `kind` (`outcome`: any final one).
fn records_of<'a>(
    lines: &'a [serde_json::Value],
    id: Uuid,
    kind: &str,
) -> Vec<&'a serde_json::Value> {
    lines
        .iter()
        .filter(|l| l["request_id"] == id.to_string())
        .filter(|l| match kind {
            "outcome" => {
                ["expired", "cancelled", "abandoned"].contains(&l["kind"].as_str().unwrap_or(""))
                    || (l["kind"] == "decided" && l["payload"]["final"] == true)
            }
            kind => l["kind"] == kind,
        })
        .collect()
}

/// Once the restarted service recovered `id`'s records, stops it: the chain verifies and
/// holds one `requested` record and one outcome of `id`, in that order, the outcome marked
/// recovered.
async fn recorded_once(service: &mut Service, id: Uuid) {
    let started = Instant::now();
    while records_of(&service.chain().await, id, "outcome").is_empty() {
        assert!(
            started.elapsed() < PATIENCE,
            "the outcome was never recovered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    service.stop();
    let report = support::audit_verify(&service.config).await;
    let lines = service.chain().await;
    assert_eq!(report.records, lines.len() as u64);
    assert_eq!(
        records_of(&lines, id, "requested").len(),
        1,
        "one `requested`"
    );
    let outcome = records_of(&lines, id, "outcome");
    assert_eq!(outcome.len(), 1, "one outcome");
    assert_eq!(
        outcome[0]["payload"]["recovered"], true,
        "written by recovery"
    );
    let requested = lines
        .iter()
        .position(|l| l["kind"] == "requested" && l["request_id"] == id.to_string());
    let decided = lines.iter().position(|l| std::ptr::eq(l, outcome[0]));
    assert!(requested < decided, "`requested` comes first");
}

async fn a_reviewers_decision_stored_before_the_kill_is_recorded_once(backend: Backend) {
    let mut service = Service::new(backend).await;
    service.start(Some(failpoint::DECISION_STORED)).await;
    let link = service.agent().await;
    let request = exec_request(&["curl", "https://reviewed.example/"]);
    let id = request.id;
    let asked = {
        let link = Arc::clone(&link);
        tokio::spawn(async move { link.decide(request).await })
    };
    let mut reviewer = service.try_reviewer().await.expect("reviewer");
    let started = Instant::now();
    while !matches!(reviewer.get(id).await, Ok((record, _)) if record.state == RequestState::Pending)
    {
        assert!(started.elapsed() < PATIENCE, "never pending");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answered = reviewer
        .decide(id, Verdict::Allow, "killed meanwhile", GrantDuration::Once)
        .await;
    assert!(answered.is_err(), "the service answered past its failpoint");
    service.wait_aborted();
    assert_eq!(service.stored_state(id).await, RequestState::Approved);
    assert!(
        records_of(&service.chain().await, id, "outcome").is_empty(),
        "the failpoint stopped the service before the outcome's record"
    );
    // The agent asks the restarted service again, and gets the stored decision.
    service.start(None).await;
    let decision: Decision = tokio::time::timeout(PATIENCE, asked)
        .await
        .expect("in time")
        .expect("task")
        .expect("a decision");
    assert_eq!(decision.verdict, Verdict::Allow);
    recorded_once(&mut service, id).await;
}

async fn an_automatic_decision_stored_before_the_kill_is_recorded_once(backend: Backend) {
    let mut service = Service::new(backend).await;
    service
        .start(Some(failpoint::AUTOMATIC_DECISION_STORED))
        .await;
    let link = service.agent().await;
    let request = exec_request(&["curl", "auto", "1"]);
    let id = request.id;
    let asked = {
        let link = Arc::clone(&link);
        tokio::spawn(async move { link.decide(request).await })
    };
    service.wait_aborted();
    assert_eq!(service.stored_state(id).await, RequestState::Denied);
    assert!(records_of(&service.chain().await, id, "outcome").is_empty());
    // The early answer reached the agent, or the re-sent request gets the stored one.
    service.start(None).await;
    let decision = tokio::time::timeout(PATIENCE, asked)
        .await
        .expect("in time")
        .expect("task")
        .expect("a decision");
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(decision.decided_by, "rule:auto");
    recorded_once(&mut service, id).await;
}

on_both_backends!(
    a_reviewers_decision_stored_before_the_kill_is_recorded_once,
    an_automatic_decision_stored_before_the_kill_is_recorded_once,
);
