//! What the HTTP and console tests share: an in-process server on loopback with reviewers
//! alice, bob (group sre) and carol (group security), a simulated agent (real mTLS gRPC),
//! HTTPS clients trusting the service's CA, and request builders.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different part of this module"
)]

pub mod chat;
pub mod idp;
pub mod pg;

use std::{sync::Arc, time::Duration};

use gatekeep_client::{AgentLink, AgentLinkConfig, Backoff, ClientIdentity, ClientTls, LinkEvent};
use gatekeep_proto::{
    GrantDuration,
    model::{
        ApprovalRequest, ApprovalSettings, ConnectTarget, Decision, ExecTarget, Family,
        ProcessInfo, SocketType, Target, Verdict,
    },
};
use gatekeep_server::{Server, ServerConfig, certs::Pki};
use reqwest::StatusCode;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde_json::Value;
use tokio::{sync::oneshot, task::JoinHandle};
use uuid::Uuid;

pub const PATIENCE: Duration = Duration::from_secs(20);

/// The store a test runs on; [`on_both_backends!`](crate::on_both_backends) runs a test on
/// each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// Points `config` at a fresh store of this backend: `SQLite` in its data directory (the
    /// default), or a new database of the test process's throwaway cluster.
    pub async fn configure(self, config: &mut ServerConfig) {
        if self == Self::Postgres {
            config.store.url = Some(pg::cluster().database().await);
            config.store.pool_size = 4;
        }
    }
}

/// Runs each named `async fn NAME(backend: Backend)` once per backend, as the tests
/// `sqlite::NAME` and `postgres::NAME`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::support::Backend::Sqlite).await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::support::Backend::Postgres).await;
                }
            )+
        }
    };
}

/// The service's audit chain as JSON Lines, from wherever `config` keeps it.
pub async fn audit_export(config: &ServerConfig) -> Vec<u8> {
    let mut out = Vec::new();
    if config.store.url.is_some() {
        let store = gatekeep_server::store::PostgresStore::connect(&config.store)
            .await
            .expect("connect to the test database");
        gatekeep_server::store::postgres::audit::export(
            &store,
            &mut out,
            &gatekeep_audit::ExportFilter::default(),
        )
        .await
        .expect("export the audit chain");
    } else {
        gatekeep_audit::export(
            config.audit_db(),
            &mut out,
            &gatekeep_audit::ExportFilter::default(),
        )
        .expect("export");
    }
    out
}

/// Verifies the service's audit chain (and its append-only guards), wherever `config` keeps
/// it.
pub async fn audit_verify(config: &ServerConfig) -> gatekeep_audit::VerifyReport {
    let report = if config.store.url.is_some() {
        let store = gatekeep_server::store::PostgresStore::connect(&config.store)
            .await
            .expect("connect to the test database");
        gatekeep_server::store::postgres::audit::verify(&store)
            .await
            .expect("the audit chain verifies")
    } else {
        gatekeep_audit::verify(config.audit_db()).expect("the audit chain verifies")
    };
    assert_eq!(
        report.guards_intact,
        Some(true),
        "append-only guards in place"
    );
    report
}

pub struct Harness {
    pub pki: Arc<Pki>,
    dir: tempfile::TempDir,
    pub base: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), gatekeep_server::Error>>>,
    tokens: Vec<(String, String)>,
    /// Where `/metrics` is served, when the config asked for it.
    pub metrics_addr: Option<std::net::SocketAddr>,
    config: ServerConfig,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(|_, _| {}).await
    }

    /// Starts a server on `SQLite`; `adjust` edits its config, knowing the address it will
    /// listen on.
    pub async fn start_with(adjust: impl FnOnce(&mut ServerConfig, std::net::SocketAddr)) -> Self {
        Self::start_on(Backend::Sqlite, adjust).await
    }

    /// Starts a server on `backend`; `adjust` edits its config, knowing the address it will
    /// listen on.
    pub async fn start_on(
        backend: Backend,
        adjust: impl FnOnce(&mut ServerConfig, std::net::SocketAddr),
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Arc::new(Pki::ephemeral(&[]).expect("pki"));
        let mut config = ServerConfig {
            data_dir: dir.path().join("data"),
            name: "test-service".into(),
            ..ServerConfig::default()
        };
        backend.configure(&mut config).await;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        adjust(&mut config, listener.local_addr().expect("address"));
        let server = Server::builder(config.clone())
            .tls(pki.tls())
            .listener(listener)
            .build()
            .await
            .expect("build server");
        let base = server.endpoint();
        let metrics_addr = server.metrics_addr();
        let mut tokens = Vec::new();
        for (name, groups) in [
            ("alice", &["sre"][..]),
            ("bob", &["sre"][..]),
            ("carol", &["security"][..]),
        ] {
            let groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
            let token = server.add_reviewer(name, &groups).await.expect("reviewer");
            tokens.push((name.to_owned(), token));
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            drop(stopped.await);
        }));
        Self {
            pki,
            dir,
            base,
            stop: Some(stop),
            task: Some(task),
            tokens,
            metrics_addr,
            config,
        }
    }

    pub fn token(&self, name: &str) -> String {
        self.tokens
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
            .expect("known reviewer")
    }

    /// The service's data directory (`state.db`, `audit.db`).
    pub fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// The service's audit chain as JSON Lines.
    pub async fn audit_export(&self) -> Vec<u8> {
        audit_export(&self.config).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// An HTTPS client trusting the service's CA (with an agent certificate if `agent`).
    pub fn client(&self, agent: Option<&str>) -> reqwest::Client {
        reqwest::Client::builder()
            .use_preconfigured_tls(self.tls(agent))
            .timeout(PATIENCE)
            .build()
            .expect("client")
    }

    /// TLS trusting the service's CA (with an agent certificate if `agent`), HTTP/2.
    pub fn tls(&self, agent: Option<&str>) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.pki.ca.cert_pem().as_bytes()) {
            roots.add(cert.expect("ca pem")).expect("ca cert");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("tls versions")
            .with_root_certificates(roots);
        let mut tls = match agent {
            Some(host) => {
                let identity = self.pki.agent(host).expect("agent cert");
                let certs = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("agent cert pem");
                let key =
                    PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).expect("agent key");
                builder
                    .with_client_auth_cert(certs, key)
                    .expect("client auth")
            }
            None => builder.with_no_client_auth(),
        };
        // The service speaks HTTP/2 only (gRPC's ALPN).
        tls.alpn_protocols = vec![b"h2".to_vec()];
        tls
    }

    pub async fn agent(
        &self,
        host: &str,
    ) -> (
        Arc<AgentLink>,
        tokio::sync::mpsc::UnboundedReceiver<LinkEvent>,
    ) {
        let identity = self.pki.agent(host).expect("agent cert");
        let tls = ClientTls {
            ca_pem: self.pki.ca.cert_pem().to_owned(),
            identity: Some(ClientIdentity {
                cert_pem: identity.cert_pem,
                key_pem: identity.key_pem,
            }),
            domain: None,
        };
        let mut config = AgentLinkConfig::new(self.base.clone(), tls);
        config.backoff = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            jitter: true,
        };
        let (link, mut events) = AgentLink::start(config).expect("start link");
        loop {
            let event = tokio::time::timeout(PATIENCE, events.recv())
                .await
                .expect("agent connects in time")
                .expect("link alive");
            if matches!(event, LinkEvent::Connected { .. }) {
                break;
            }
        }
        (Arc::new(link), events)
    }

    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("server stops")
                .expect("server task")
                .expect("server ran cleanly");
        }
    }
}

pub trait WithH2 {
    fn with_h2(self) -> Self;
}

impl WithH2 for rustls::ClientConfig {
    fn with_h2(mut self) -> Self {
        self.alpn_protocols = vec![b"h2".to_vec()];
        self
    }
}

pub fn settings() -> ApprovalSettings {
    ApprovalSettings {
        reviewer_groups: vec!["sre".into()],
        approvals_required: 1,
        grant_durations: vec![
            GrantDuration::Once,
            GrantDuration::For(Duration::from_hours(1)),
        ],
        owners: vec![],
        require_reason: false,
    }
}

pub fn exec_request(argv: &[&str]) -> ApprovalRequest {
    let now = time::OffsetDateTime::now_utc();
    ApprovalRequest {
        id: Uuid::new_v4(),
        policy: "ai-agents".into(),
        rule: "ask /usr/bin/curl".into(),
        cgroup: "/sys/fs/cgroup/agents/a1".into(),
        pid: 4242,
        tid: 4242,
        uid: 1000,
        user_name: Some("worker".into()),
        cwd: Some("/srv".into()),
        ancestry: vec![ProcessInfo {
            pid: 4000,
            comm: "bash".into(),
            executable: Some("/usr/bin/bash".into()),
            argv: vec!["bash".into()],
            cgroup: None,
        }],
        target: Target::Exec(ExecTarget {
            executable: "/usr/bin/curl".into(),
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            content: Some("1700000000.000000001:1234:7".into()),
            path_check: None,
            named: None,
            file: None,
            mount_namespace: None,
            argv_truncated: false,
            env: vec!["LD_PRELOAD=/tmp/x.so".into()],
        }),
        requested_at: now,
        deadline: now + time::Duration::minutes(5),
        on_timeout: Verdict::Deny,
        approval: settings(),
    }
}

pub fn connect_request() -> ApprovalRequest {
    let mut request = exec_request(&[]);
    request.target = Target::Connect(ConnectTarget {
        family: Family::Inet,
        address: "192.0.2.7".into(),
        port: 443,
        socket_type: SocketType::Stream,
        resolved: vec!["api.example.com".into()],
    });
    request
}

pub fn submit(link: &Arc<AgentLink>, request: ApprovalRequest) -> JoinHandle<Decision> {
    let link = Arc::clone(link);
    tokio::spawn(async move { link.decide(request).await.expect("a decision") })
}

pub async fn answer(handle: JoinHandle<Decision>) -> Decision {
    tokio::time::timeout(PATIENCE, handle)
        .await
        .expect("a decision in time")
        .expect("decide task")
}

pub async fn json_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not json: {text}"));
    (status, value)
}

/// Polls the pending list (bearer `token`) until `id` is in it.
pub async fn wait_pending(http: &reqwest::Client, harness: &Harness, token: &str, id: Uuid) {
    let start = std::time::Instant::now();
    loop {
        let (status, body) = json_of(
            http.get(harness.url("/api/v1/requests"))
                .bearer_auth(token)
                .send()
                .await
                .expect("list"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["requests"]
            .as_array()
            .expect("requests")
            .iter()
            .any(|r| r["request"]["id"] == id.to_string())
        {
            return;
        }
        assert!(start.elapsed() < PATIENCE, "request {id} never pending");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn error_code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
}
