//! The decision service through real gRPC on loopback: an in-process server (ephemeral port,
//! temporary data directory, in-memory CA), agents on [`AgentLink`], reviewers on
//! [`ReviewClient`], and raw tonic clients for what the typed clients refuse to send.
//!
//! No timing assertions: waits poll for a state with a generous upper bound and fail with a
//! message when it is not reached.
//!
//! Every scenario runs on both stores (`on_both_backends!`): `sqlite::NAME` and
//! `postgres::NAME` (a database of a throwaway cluster, see `support::pg`).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

mod support;

use gatekeep_audit::RecordKind;
use gatekeep_client::{
    AgentLink, AgentLinkConfig, Backoff, ClientError, ClientIdentity, ClientTls, LinkError,
    LinkEvent, RequestFilter, ReviewClient, ReviewConfig,
};
use gatekeep_proto::{
    GrantDuration,
    model::{
        ApprovalRequest, ApprovalSettings, ConnectTarget, Decision, ExecTarget, Family, GrantScope,
        RequestRecord, RequestState, SocketType, Target, Verdict, WithdrawReason,
    },
    v1::{
        self, agent_service_client::AgentServiceClient, review_service_client::ReviewServiceClient,
    },
};
use gatekeep_server::{Server, ServerConfig, certs::Pki, rules::RuleConfig};
use support::Backend;
use tokio::{
    sync::{Mutex, mpsc, oneshot},
    task::JoinHandle,
};
use tokio_stream::{StreamExt as _, wrappers::UnboundedReceiverStream};
use tonic::{
    Code,
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};
use uuid::Uuid;

/// Upper bound of every wait; reached only when something is broken.
const PATIENCE: Duration = Duration::from_secs(20);

struct Harness {
    pki: Arc<Pki>,
    /// Holds the data directory for the test's lifetime.
    _dir: Arc<tempfile::TempDir>,
    addr: SocketAddr,
    config: ServerConfig,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), gatekeep_server::Error>>>,
    /// Reviewer tokens by name.
    tokens: Vec<(String, String)>,
}

fn config(data: PathBuf) -> ServerConfig {
    ServerConfig {
        data_dir: data,
        name: "test-service".into(),
        ..ServerConfig::default()
    }
}

impl Harness {
    async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    async fn start_with(backend: Backend, adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let pki = Arc::new(Pki::ephemeral(&[]).expect("pki"));
        let mut config = config(dir.path().join("data"));
        backend.configure(&mut config).await;
        adjust(&mut config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut harness = Self {
            pki,
            _dir: dir,
            addr,
            config,
            stop: None,
            task: None,
            tokens: Vec::new(),
        };
        let server = harness.serve(listener).await;
        for (name, groups) in [
            ("alice", &["sre"][..]),
            ("bob", &["sre"][..]),
            ("carol", &["security"][..]),
            ("dave", &["sre", "security"][..]),
        ] {
            let groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
            let token = server
                .add_reviewer(name, &groups)
                .await
                .expect("add reviewer");
            harness.tokens.push((name.to_owned(), token));
        }
        harness.spawn(server);
        harness
    }

    async fn serve(&self, listener: std::net::TcpListener) -> Server {
        Server::builder(self.config.clone())
            .tls(self.pki.tls())
            .listener(listener)
            .build()
            .await
            .expect("build server")
    }

    fn spawn(&mut self, server: Server) {
        let (stop, stopped) = oneshot::channel::<()>();
        self.stop = Some(stop);
        self.task = Some(tokio::spawn(server.serve(async move {
            drop(stopped.await);
        })));
    }

    /// Stops the server (graceful) and waits for it.
    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The server may already be gone.
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

    /// Starts a new server on the same port and data directory.
    async fn restart(&mut self) {
        self.stop().await;
        let listener = std::net::TcpListener::bind(self.addr).expect("rebind the same port");
        let server = self.serve(listener).await;
        self.spawn(server);
    }

    fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn token(&self, name: &str) -> String {
        self.tokens
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
            .expect("known reviewer")
    }

    fn agent_tls(&self, host: &str) -> ClientTls {
        let identity = self.pki.agent(host).expect("agent cert");
        ClientTls {
            ca_pem: self.pki.ca.cert_pem().to_owned(),
            identity: Some(ClientIdentity {
                cert_pem: identity.cert_pem,
                key_pem: identity.key_pem,
            }),
            domain: None,
        }
    }

    fn agent_at(&self, host: &str, endpoint: String) -> (AgentLink, Events) {
        let mut config = AgentLinkConfig::new(endpoint, self.agent_tls(host));
        config.backoff = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            jitter: true,
        };
        let (link, events) = AgentLink::start(config).expect("start link");
        (link, Events(events))
    }

    async fn agent(&self, host: &str) -> (AgentLink, Events) {
        let (link, mut events) = self.agent_at(host, self.endpoint());
        events.connected().await;
        (link, events)
    }

    async fn reviewer(&self, name: &str) -> ReviewClient {
        self.reviewer_with(self.token(name), None).await
    }

    async fn reviewer_with(&self, token: String, identity: Option<ClientIdentity>) -> ReviewClient {
        ReviewClient::connect(ReviewConfig {
            endpoint: self.endpoint(),
            token,
            tls: ClientTls {
                ca_pem: self.pki.ca.cert_pem().to_owned(),
                identity,
                domain: None,
            },
            connect_timeout: Duration::from_secs(5),
        })
        .await
        .expect("reviewer connects")
    }

    /// A raw review client, for messages the typed client cannot express.
    async fn raw_review(
        &self,
        name: &str,
    ) -> (ReviewServiceClient<tonic::transport::Channel>, String) {
        let channel = Endpoint::from_shared(self.endpoint())
            .expect("endpoint")
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(self.pki.ca.cert_pem())),
            )
            .expect("tls")
            .connect()
            .await
            .expect("connect");
        (
            ReviewServiceClient::new(channel),
            format!("Bearer {}", self.token(name)),
        )
    }

    /// A raw agent stream (after hello and welcome).
    async fn raw_agent(
        &self,
        identity: Option<Identity>,
    ) -> Result<
        (
            mpsc::UnboundedSender<v1::AgentMessage>,
            tonic::Streaming<v1::ServerMessage>,
        ),
        tonic::Status,
    > {
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.pki.ca.cert_pem()));
        if let Some(identity) = identity {
            tls = tls.identity(identity);
        }
        let channel = Endpoint::from_shared(self.endpoint())
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .map_err(|err| tonic::Status::unavailable(format!("{err:?}")))?;
        let (sender, receiver) = mpsc::unbounded_channel();
        sender
            .send(v1::AgentMessage {
                message: Some(v1::agent_message::Message::Hello(v1::Hello {
                    agent_version: "test".into(),
                })),
            })
            .expect("hello");
        let mut inbound = AgentServiceClient::new(channel)
            .connect(UnboundedReceiverStream::new(receiver))
            .await?
            .into_inner();
        let welcome = inbound.message().await?.expect("welcome");
        assert!(matches!(
            welcome.message,
            Some(v1::server_message::Message::Welcome(_))
        ));
        Ok((sender, inbound))
    }
}

struct Events(mpsc::UnboundedReceiver<LinkEvent>);

impl Events {
    async fn next(&mut self) -> LinkEvent {
        tokio::time::timeout(PATIENCE, self.0.recv())
            .await
            .expect("an event in time")
            .expect("link alive")
    }

    /// Waits for `Connected`, returning its grants.
    async fn connected(&mut self) -> Vec<gatekeep_proto::model::Grant> {
        loop {
            if let LinkEvent::Connected { grants, .. } = self.next().await {
                return grants;
            }
        }
    }

    async fn find(&mut self, mut pick: impl FnMut(&LinkEvent) -> bool) -> LinkEvent {
        loop {
            let event = self.next().await;
            if pick(&event) {
                return event;
            }
        }
    }
}

fn settings() -> ApprovalSettings {
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

fn exec_request(argv: &[&str], timeout: time::Duration, on_timeout: Verdict) -> ApprovalRequest {
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
        ancestry: vec![],
        target: Target::Exec(ExecTarget {
            executable: "/usr/bin/curl".into(),
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
        deadline: now + timeout,
        on_timeout,
        approval: settings(),
    }
}

fn request(argv: &[&str]) -> ApprovalRequest {
    exec_request(argv, time::Duration::minutes(5), Verdict::Deny)
}

/// Starts `decide` in the background.
fn decide_later(
    link: &Arc<AgentLink>,
    request: ApprovalRequest,
) -> JoinHandle<Result<Decision, LinkError>> {
    let link = Arc::clone(link);
    tokio::spawn(async move { link.decide(request).await })
}

async fn answer(handle: JoinHandle<Result<Decision, LinkError>>) -> Result<Decision, LinkError> {
    tokio::time::timeout(PATIENCE, handle)
        .await
        .expect("a decision in time")
        .expect("decide task")
}

/// Polls until the service holds `id` in `state`.
async fn wait_state(reviewer: &mut ReviewClient, id: Uuid, state: RequestState) -> RequestRecord {
    let start = Instant::now();
    loop {
        match reviewer.get(id).await {
            Ok((record, _)) if record.state == state => return record,
            Ok(_) => {}
            Err(err) if err.code() == Some(Code::NotFound) => {}
            Err(err) => panic!("get {id}: {err}"),
        }
        assert!(
            start.elapsed() < PATIENCE,
            "request {id} never became {state}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn code(result: Result<impl std::fmt::Debug, gatekeep_client::ClientError>) -> Code {
    result
        .expect_err("the call must fail")
        .code()
        .expect("a status code")
}

async fn audit_kinds(harness: &Harness) -> Vec<(RecordKind, Option<String>, Option<String>)> {
    let out = support::audit_export(&harness.config).await;
    String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("json line");
            (
                value["kind"]
                    .as_str()
                    .expect("kind")
                    .parse()
                    .expect("known kind"),
                value["request_id"].as_str().map(str::to_owned),
                value["actor"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

async fn approve_deny_and_cancel_reach_the_agent(backend: Backend) {
    let mut harness = Harness::start(backend).await;
    let (link, _events) = harness.agent("web-1").await;
    let link = Arc::new(link);
    let mut alice = harness.reviewer("alice").await;

    // Approve.
    let req = request(&["curl", "https://example.org"]);
    let id = req.id;
    let pending = decide_later(&link, req);
    let record = wait_state(&mut alice, id, RequestState::Pending).await;
    assert_eq!(
        record.host, "web-1",
        "host comes from the agent certificate"
    );
    assert_eq!(record.request.user_name.as_deref(), Some("worker"));
    let listed = alice
        .list_pending(&RequestFilter::default(), 0)
        .await
        .expect("list");
    assert_eq!(listed.iter().filter(|r| r.request.id == id).count(), 1);
    let decided = alice
        .decide(id, Verdict::Allow, "looks fine", GrantDuration::Once)
        .await
        .expect("approve");
    assert_eq!(decided.state, RequestState::Approved);
    let decision = answer(pending).await.expect("decision");
    assert_eq!(decision.state, RequestState::Approved);
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.decided_by, "alice");
    assert_eq!(decision.reason, "looks fine");
    assert!(decision.grant.is_none(), "once makes no grant");

    // Deny.
    let req = request(&["curl", "https://evil.example"]);
    let id = req.id;
    let pending = decide_later(&link, req);
    wait_state(&mut alice, id, RequestState::Pending).await;
    alice
        .decide(id, Verdict::Deny, "no", GrantDuration::Once)
        .await
        .expect("deny");
    let decision = answer(pending).await.expect("decision");
    assert_eq!(
        (decision.state, decision.verdict),
        (RequestState::Denied, Verdict::Deny)
    );

    // Cancel: the action is denied.
    let req = request(&["curl", "https://maybe.example"]);
    let id = req.id;
    let pending = decide_later(&link, req);
    wait_state(&mut alice, id, RequestState::Pending).await;
    let cancelled = alice.cancel(id, "wrong ticket").await.expect("cancel");
    assert_eq!(cancelled.state, RequestState::Cancelled);
    let decision = answer(pending).await.expect("decision");
    assert_eq!(
        (decision.state, decision.verdict),
        (RequestState::Cancelled, Verdict::Deny)
    );

    // Nothing is pending now; the similar history shows the earlier decisions.
    assert!(
        alice
            .list_pending(&RequestFilter::default(), 0)
            .await
            .expect("list")
            .is_empty()
    );
    let (_, similar) = alice.get(id).await.expect("get");
    assert_eq!(similar.len(), 2, "the approved and the denied curl");
    assert!(similar.iter().all(|r| r.state.is_final()));

    // A withdrawn request becomes abandoned.
    let req = request(&["curl", "https://gone.example"]);
    let id = req.id;
    let pending = decide_later(&link, req);
    wait_state(&mut alice, id, RequestState::Pending).await;
    link.withdraw(id, WithdrawReason::TaskExited, "pid 4242 exited")
        .expect("withdraw");
    assert!(matches!(
        answer(pending).await,
        Err(LinkError::Withdrawn { .. })
    ));
    let record = wait_state(&mut alice, id, RequestState::Abandoned).await;
    assert!(
        record
            .decision
            .expect("decision")
            .reason
            .contains("pid 4242 exited")
    );

    harness.stop().await;
    let kinds = audit_kinds(&harness).await;
    for kind in [
        RecordKind::Requested,
        RecordKind::Decided,
        RecordKind::Cancelled,
        RecordKind::Abandoned,
    ] {
        assert!(kinds.iter().any(|(k, _, _)| *k == kind), "no {kind} record");
    }
    assert_eq!(
        kinds
            .iter()
            .filter(|(k, _, _)| *k == RecordKind::Requested)
            .count(),
        4
    );
}

async fn deadlines_apply_the_timeout_action(backend: Backend) {
    let mut harness = Harness::start(backend).await;
    let (link, _events) = harness.agent("web-1").await;
    let link = Arc::new(link);

    let allow = exec_request(
        &["curl", "a"],
        time::Duration::milliseconds(300),
        Verdict::Allow,
    );
    let deny = exec_request(
        &["curl", "b"],
        time::Duration::milliseconds(300),
        Verdict::Deny,
    );
    let (allow_id, deny_id) = (allow.id, deny.id);
    let allowed = decide_later(&link, allow);
    let denied = decide_later(&link, deny);
    let allowed = answer(allowed).await.expect("decision");
    let denied = answer(denied).await.expect("decision");
    assert_eq!(allowed.request_id, allow_id);
    assert_eq!(
        (allowed.state, allowed.verdict),
        (RequestState::Expired, Verdict::Allow)
    );
    assert_eq!(allowed.decided_by, "timeout");
    assert!(
        allowed.reason.contains("says allow on timeout"),
        "{}",
        allowed.reason
    );
    assert_eq!(denied.request_id, deny_id);
    assert_eq!(
        (denied.state, denied.verdict),
        (RequestState::Expired, Verdict::Deny)
    );

    // Deciding an expired request is refused and changes nothing.
    let mut alice = harness.reviewer("alice").await;
    let refused = alice
        .decide(allow_id, Verdict::Deny, "", GrantDuration::Once)
        .await;
    assert_eq!(code(refused), Code::FailedPrecondition);
    let (record, _) = alice.get(allow_id).await.expect("get");
    assert_eq!(record.state, RequestState::Expired);

    harness.stop().await;
    let expired = audit_kinds(&harness)
        .await
        .into_iter()
        .filter(|(k, _, actor)| *k == RecordKind::Expired && actor.as_deref() == Some("timeout"))
        .count();
    assert_eq!(expired, 2);
}

async fn quorum_needs_distinct_reviewers(backend: Backend) {
    let mut harness = Harness::start(backend).await;
    let (link, _events) = harness.agent("web-1").await;
    let link = Arc::new(link);
    let mut req = request(&["curl", "https://quorum.example"]);
    req.approval.approvals_required = 2;
    req.approval.grant_durations.push(GrantDuration::Always);
    let id = req.id;
    let pending = decide_later(&link, req);
    let mut alice = harness.reviewer("alice").await;
    let mut bob = harness.reviewer("bob").await;
    wait_state(&mut alice, id, RequestState::Pending).await;

    let after_one = alice
        .decide_scoped(
            id,
            Verdict::Allow,
            "ok by me",
            GrantDuration::Always,
            GrantScope::Policy,
        )
        .await
        .expect("first approval");
    assert_eq!(after_one.state, RequestState::Pending);
    assert_eq!(after_one.approvals.len(), 1);
    assert_eq!(after_one.approvals_required, 2);

    // The same reviewer twice does not count twice.
    let again = alice
        .decide(id, Verdict::Allow, "really", GrantDuration::Once)
        .await;
    assert_eq!(code(again), Code::AlreadyExists);
    assert_eq!(alice.get(id).await.expect("get").0.approvals.len(), 1);
    assert!(
        !pending.is_finished(),
        "one approval of two decided nothing"
    );

    let done = bob
        .decide(
            id,
            Verdict::Allow,
            "agreed",
            GrantDuration::For(Duration::from_hours(1)),
        )
        .await
        .expect("second approval");
    assert_eq!(done.state, RequestState::Approved);
    let decision = answer(pending).await.expect("decision");
    assert_eq!(decision.decided_by, "alice,bob");
    // The quorum grants what every member agreed to: 1h, not always; for the
    // asking workload (bob's default), not the whole policy (alice's choice).
    assert_eq!(
        decision.duration,
        GrantDuration::For(Duration::from_hours(1))
    );
    let grant = decision.grant.expect("a grant");
    assert_eq!(grant.scope, GrantScope::Workload);
    assert_eq!(grant.cgroup.as_deref(), Some("/sys/fs/cgroup/agents/a1"));
    let record = alice.get(id).await.expect("get").0;
    let scopes: Vec<GrantScope> = record.approvals.iter().map(|v| v.scope).collect();
    assert_eq!(
        scopes,
        [GrantScope::Policy, GrantScope::Workload],
        "each vote keeps its scope"
    );
    harness.stop().await;
}

async fn a_grant_covers_the_asking_workload_unless_the_reviewer_chose_the_policy(backend: Backend) {
    let mut harness = Harness::start(backend).await;
    let (link, _events) = harness.agent("web-1").await;
    let link = Arc::new(link);
    let mut alice = harness.reviewer("alice").await;
    let hour = GrantDuration::For(Duration::from_hours(1));
    let from = |argv: &[&str], cgroup: &str| {
        let mut req = request(argv);
        cgroup.clone_into(&mut req.cgroup);
        req
    };
    let (w1, w2) = ("/sys/fs/cgroup/agents/w1", "/sys/fs/cgroup/agents/w2");

    // Approved for an hour without a scope: the asking workload's.
    let first = from(&["curl", "https://scope.example"], w1);
    let pending = decide_later(&link, first.clone());
    wait_state(&mut alice, first.id, RequestState::Pending).await;
    alice
        .decide(first.id, Verdict::Allow, "", hour)
        .await
        .expect("approve");
    let grant = answer(pending)
        .await
        .expect("decision")
        .grant
        .expect("grant");
    assert_eq!(grant.scope, GrantScope::Workload);
    assert_eq!(grant.cgroup.as_deref(), Some(w1));

    // w1 again: decided by the grant. w2, the same action: asked.
    let mut again = first.clone();
    again.id = Uuid::new_v4();
    let by_grant = link.decide(again).await.expect("decision");
    assert_eq!(by_grant.decided_by, format!("grant:{}", grant.id));
    let other = from(&["curl", "https://scope.example"], w2);
    let pending = decide_later(&link, other.clone());
    wait_state(&mut alice, other.id, RequestState::Pending).await;

    // w2's approved with scope policy: covers every workload, w1 and a new w3.
    alice
        .decide_scoped(other.id, Verdict::Allow, "", hour, GrantScope::Policy)
        .await
        .expect("approve for the policy");
    let wide = answer(pending)
        .await
        .expect("decision")
        .grant
        .expect("grant");
    assert_eq!(wide.scope, GrantScope::Policy);
    assert_eq!(wide.cgroup, None);
    let third = from(
        &["curl", "https://scope.example"],
        "/sys/fs/cgroup/agents/w3",
    );
    let by_wide = link.decide(third).await.expect("decision");
    assert_eq!(by_wide.decided_by, format!("grant:{}", wide.id));

    // Listed with their scopes.
    let listed = alice
        .list_grants(&gatekeep_client::GrantFilter::default())
        .await
        .expect("grants");
    let mut scopes: Vec<(GrantScope, Option<String>)> =
        listed.into_iter().map(|g| (g.scope, g.cgroup)).collect();
    scopes.sort_by_key(|(scope, _)| scope.to_string());
    assert_eq!(
        scopes,
        [
            (GrantScope::Policy, None),
            (GrantScope::Workload, Some(w1.to_owned()))
        ]
    );

    // w1's cgroup goes away: a workload grant that is not a session stays (a
    // cgroup made again at that path is the same workload).
    link.session_ended(w1).expect("session ended");
    let mut later = first.clone();
    later.id = Uuid::new_v4();
    let still = link.decide(later).await.expect("decision");
    assert!(still.decided_by.starts_with("grant:"), "{still:?}");
    let listed = alice
        .list_grants(&gatekeep_client::GrantFilter::default())
        .await
        .expect("grants");
    assert!(
        listed.iter().any(|g| g.id == grant.id),
        "the workload grant outlives its cgroup: {listed:?}"
    );
    harness.stop().await;
}

async fn owners_and_other_groups_cannot_approve(backend: Backend) {
    let mut harness = Harness::start(backend).await;
    let (link, _events) = harness.agent("web-1").await;
    let link = Arc::new(link);

    // The user the workload runs as cannot approve it.
    let mut req = request(&["curl", "https://self.example"]);
    req.user_name = Some("alice".into());
    req.approval.owners = vec!["bob".into()];
    let id = req.id;
    let pending = decide_later(&link, req);
    let mut alice = harness.reviewer("alice").await;
    let mut bob = harness.reviewer("bob").await;
    let mut carol = harness.reviewer("carol").await;
    let mut dave = harness.reviewer("dave").await;
    wait_state(&mut alice, id, RequestState::Pending).await;
    let refused = alice
        .decide(id, Verdict::Allow, "mine", GrantDuration::Once)
        .await;
    let err = refused.expect_err("self-approval refused");
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    assert!(
        err.to_string().contains("cannot approve its own request"),
        "{err}"
    );
    // Nor can a declared owner of the policy.
    assert_eq!(
        code(
            bob.decide(id, Verdict::Allow, "", GrantDuration::Once)
                .await
        ),
        Code::PermissionDenied
    );
    // A reviewer outside the policy's groups can neither approve, deny nor cancel.
    let err = carol
        .decide(id, Verdict::Allow, "", GrantDuration::Once)
        .await
        .expect_err("wrong group");
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    assert!(err.to_string().contains("not in a reviewer group"), "{err}");
    assert_eq!(
        code(
            carol
                .decide(id, Verdict::Deny, "", GrantDuration::Once)
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(code(carol.cancel(id, "").await), Code::PermissionDenied);
    // A duration the policy does not allow is refused.
    assert_eq!(
        code(
            dave.decide(id, Verdict::Allow, "", GrantDuration::Always)
                .await
        ),
        Code::PermissionDenied
    );
    let record = alice.get(id).await.expect("get").0;
    assert_eq!(
        record.state,
        RequestState::Pending,
        "refusals changed nothing"
    );
    assert!(record.approvals.is_empty());
    // Someone else in the group approves.
    dave.decide(id, Verdict::Allow, "fine", GrantDuration::Once)
        .await
        .expect("dave approves");
    assert_eq!(answer(pending).await.expect("decision").decided_by, "dave");
    harness.stop().await;
}

async fn a_truncated_request_is_approved_once_never_granted(backend: Backend) {
    let mut harness = Harness::start(backend).await;
    let (link, _events) = harness.agent("web-1").await;
    let link = Arc::new(link);
    let mut alice = harness.reviewer("alice").await;
    let mut req = request(&["curl", "https://truncated.example"]);
    if let Target::Exec(exec) = &mut req.target {
        exec.argv_truncated = true;
    }
    let id = req.id;
    let pending = decide_later(&link, req);
    wait_state(&mut alice, id, RequestState::Pending).await;
    // An hour (which the policy offers) is refused for a truncated request, with the reason.
    let err = alice
        .decide(
            id,
            Verdict::Allow,
            "",
            GrantDuration::For(Duration::from_hours(1)),
        )
        .await
        .expect_err("no grant for a truncated request");
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(
        err.to_string().contains("is truncated") && err.to_string().contains("approve it `once`"),
        "{err}"
    );
    let record = alice.get(id).await.expect("get").0;
    assert_eq!(
        record.state,
        RequestState::Pending,
        "the refusal changed nothing"
    );
    assert!(record.approvals.is_empty());
    // Once: approved, and no grant.
    alice
        .decide(id, Verdict::Allow, "", GrantDuration::Once)
        .await
        .expect("approve once");
    let decision = answer(pending).await.expect("decision");
    assert_eq!(decision.verdict, Verdict::Allow);
    assert!(decision.grant.is_none());
    harness.stop().await;
}

async fn review_api_refuses_agents_and_bad_tokens(backend: Backend) {
    let mut harness = Harness::start(backend).await;
    let identity = harness.agent_tls("web-1").identity;
    // An agent certificate, even with a valid reviewer token, cannot review.
    let mut as_agent = harness
        .reviewer_with(harness.token("alice"), identity)
        .await;
    let err = as_agent
        .list_pending(&RequestFilter::default(), 0)
        .await
        .expect_err("agent refused");
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    assert!(
        err.to_string()
            .contains("agent certificates cannot use the review api"),
        "{err}"
    );
    let mut unknown = harness.reviewer_with("gk_0000".into(), None).await;
    assert_eq!(code(unknown.status().await), Code::Unauthenticated);
    // No header at all.
    let (mut raw, _) = harness.raw_review("alice").await;
    let status = raw
        .status(v1::StatusRequest {})
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    // And a good token works.
    let status = harness
        .reviewer("alice")
        .await
        .status()
        .await
        .expect("status");
    assert_eq!(status.reviewer, "alice");
    assert_eq!(status.groups, ["sre"]);
    harness.stop().await;
}

async fn untrusted_or_missing_agent_certificates_are_refused(backend: Backend) {
    let mut harness = Harness::start(backend).await;
    // A certificate from another CA fails the TLS handshake: the link never connects.
    let stranger = Pki::ephemeral(&[]).expect("other pki");
    let identity = stranger.agent("web-1").expect("cert");
    let mut config = AgentLinkConfig::new(
        harness.endpoint(),
        ClientTls {
            ca_pem: harness.pki.ca.cert_pem().to_owned(),
            identity: Some(ClientIdentity {
                cert_pem: identity.cert_pem.clone(),
                key_pem: identity.key_pem.clone(),
            }),
            domain: None,
        },
    );
    config.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(50),
        jitter: true,
    };
    let (link, mut events) = AgentLink::start(config).expect("link");
    for _ in 0..3 {
        match events.recv().await.expect("event") {
            LinkEvent::Disconnected { .. } => {}
            other => panic!("an untrusted certificate must not connect: {other:?}"),
        }
    }
    assert!(!link.is_connected());
    link.shutdown().await;

    // Raw: the same stranger certificate, and no certificate at all.
    let refused = harness
        .raw_agent(Some(Identity::from_pem(
            &identity.cert_pem,
            &identity.key_pem,
        )))
        .await
        .expect_err("stranger refused");
    assert_ne!(refused.code(), Code::Ok);
    let status = harness.raw_agent(None).await.expect_err("no certificate");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("client certificate"),
        "{}",
        status.message()
    );
    harness.stop().await;
}

/// A TCP relay whose connections the test can cut.
struct Relay {
    addr: SocketAddr,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let held = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        drop(tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await);
                    }
                });
                held.lock().await.push(task);
            }
        });
        Self { addr, connections }
    }

    async fn cut(&self) {
        for task in self.connections.lock().await.drain(..) {
            task.abort();
        }
    }
}

async fn reconnect_resends_pending_requests_without_duplicates(backend: Backend) {
    let mut harness = Harness::start(backend).await;
    let relay = Relay::start(harness.addr).await;
    // The server certificate names 127.0.0.1, which the relay's address is too.
    let (link, mut events) = harness.agent_at("web-1", format!("https://{}", relay.addr));
    events.connected().await;
    let link = Arc::new(link);
    let mut alice = harness.reviewer("alice").await;
    let requests: Vec<ApprovalRequest> = (0..3)
        .map(|i| request(&["curl", &format!("https://{i}.example")]))
        .collect();
    let waits: Vec<_> = requests
        .iter()
        .map(|r| decide_later(&link, r.clone()))
        .collect();
    for r in &requests {
        wait_state(&mut alice, r.id, RequestState::Pending).await;
    }
    // The same request submitted again is still one request.
    link.submit(requests[0].clone()).expect("resubmit");

    relay.cut().await;
    events
        .find(|e| matches!(e, LinkEvent::Disconnected { .. }))
        .await;
    events.connected().await;
    assert_eq!(link.pending(), 3);

    // Decide one while the agent is connected again: it gets the decision.
    alice
        .decide(requests[1].id, Verdict::Allow, "", GrantDuration::Once)
        .await
        .expect("approve");
    let mut waits = waits.into_iter();
    let first = waits.next().expect("first");
    let second = waits.next().expect("second");
    assert_eq!(
        answer(second).await.expect("decision").verdict,
        Verdict::Allow
    );
    assert!(!first.is_finished());

    // Decide another while the agent is cut off: it gets it on reconnect.
    relay.cut().await;
    alice
        .decide(requests[2].id, Verdict::Deny, "", GrantDuration::Once)
        .await
        .expect("deny");
    let third = waits.next().expect("third");
    assert_eq!(
        answer(third).await.expect("decision").verdict,
        Verdict::Deny
    );

    let pending = alice
        .list_pending(&RequestFilter::default(), 0)
        .await
        .expect("list");
    assert_eq!(pending.len(), 1, "re-sent requests are not duplicated");
    assert_eq!(pending[0].request.id, requests[0].id);
    harness.stop().await;
    let requested = audit_kinds(&harness)
        .await
        .into_iter()
        .filter(|(k, _, _)| *k == RecordKind::Requested)
        .count();
    assert_eq!(requested, 3, "one requested record per request");
    drop(first);
}

async fn restart_keeps_pending_requests(backend: Backend) {
    let mut harness = Harness::start(backend).await;
    let (link, mut events) = harness.agent("web-1").await;
    let link = Arc::new(link);
    let req = request(&["curl", "https://restart.example"]);
    let id = req.id;
    let pending = decide_later(&link, req);
    {
        let mut alice = harness.reviewer("alice").await;
        wait_state(&mut alice, id, RequestState::Pending).await;
    }
    harness.restart().await;
    events
        .find(|e| matches!(e, LinkEvent::Disconnected { .. }))
        .await;
    events.connected().await;
    let mut alice = harness.reviewer("alice").await;
    let record = wait_state(&mut alice, id, RequestState::Pending).await;
    assert_eq!(
        record.request.target.to_string(),
        "/usr/bin/curl curl https://restart.example"
    );
    assert_eq!(
        alice
            .list_pending(&RequestFilter::default(), 0)
            .await
            .expect("list")
            .len(),
        1
    );
    alice
        .decide(id, Verdict::Allow, "after restart", GrantDuration::Once)
        .await
        .expect("approve");
    let decision = answer(pending).await.expect("decision");
    assert_eq!(decision.reason, "after restart");
    harness.stop().await;
    let report = support::audit_verify(&harness.config).await;
    assert!(report.records >= 2);
}

#[expect(
    clippy::too_many_lines,
    reason = "one grant's life: made, used, listed, revoked; then a session grant"
)]
async fn grants_reach_the_agent_and_revocations_are_pushed(backend: Backend) {
    let mut harness = Harness::start(backend).await;
    let (link, mut events) = harness.agent("web-1").await;
    let link = Arc::new(link);
    let mut alice = harness.reviewer("alice").await;
    let req = request(&["curl", "https://grant.example"]);
    let id = req.id;
    let pending = decide_later(&link, req.clone());
    wait_state(&mut alice, id, RequestState::Pending).await;
    alice
        .decide(
            id,
            Verdict::Allow,
            "for an hour",
            GrantDuration::For(Duration::from_hours(1)),
        )
        .await
        .expect("approve for 1h");
    let decision = answer(pending).await.expect("decision");
    let grant = decision.grant.expect("a 1h approval makes a grant");
    assert_eq!(grant.duration, GrantDuration::For(Duration::from_hours(1)));
    assert_eq!(grant.host, "web-1");
    assert_eq!(grant.target, req.target);
    let expires = grant.expires_at.expect("expiry");
    assert!(expires > decision.decided_at);

    // Listed, and the same action again is decided by the grant.
    let grants = alice
        .list_grants(&gatekeep_client::GrantFilter::default())
        .await
        .expect("grants");
    assert_eq!(grants.iter().map(|g| g.id).collect::<Vec<_>>(), [grant.id]);
    let mut again = req.clone();
    again.id = Uuid::new_v4();
    let by_grant = link.decide(again).await.expect("decision");
    assert_eq!(by_grant.decided_by, format!("grant:{}", grant.id));
    assert_eq!(by_grant.verdict, Verdict::Allow);

    // A new connection of the agent gets its grants in welcome.
    let (second, mut second_events) = harness.agent_at("web-2", harness.endpoint());
    assert!(
        second_events.connected().await.is_empty(),
        "grants are per host"
    );
    second.shutdown().await;

    // Revoke: pushed to the agent, gone from the list.
    let revoked = alice.revoke_grant(grant.id, "done").await.expect("revoke");
    assert_eq!(revoked.revoked.expect("revocation").by, "alice");
    let event = events
        .find(|e| matches!(e, LinkEvent::GrantRevoked { .. }))
        .await;
    let LinkEvent::GrantRevoked {
        grant_id,
        revoked_by,
        ..
    } = event
    else {
        unreachable!()
    };
    assert_eq!((grant_id, revoked_by.as_str()), (grant.id, "alice"));
    assert!(
        alice
            .list_grants(&gatekeep_client::GrantFilter::default())
            .await
            .expect("grants")
            .is_empty()
    );
    assert_eq!(
        code(alice.revoke_grant(grant.id, "twice").await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(alice.revoke_grant(Uuid::new_v4(), "").await),
        Code::NotFound
    );

    // Session grants end with their cgroup.
    let mut session = request(&["curl", "https://session.example"]);
    session
        .approval
        .grant_durations
        .push(GrantDuration::Session);
    let pending = decide_later(&link, session.clone());
    wait_state(&mut alice, session.id, RequestState::Pending).await;
    alice
        .decide(session.id, Verdict::Allow, "", GrantDuration::Session)
        .await
        .expect("session approval");
    let grant = answer(pending)
        .await
        .expect("decision")
        .grant
        .expect("session grant");
    assert_eq!(grant.cgroup.as_deref(), Some("/sys/fs/cgroup/agents/a1"));
    assert_eq!(
        grant.scope,
        GrantScope::Workload,
        "a session is its workload's"
    );
    link.session_ended("/sys/fs/cgroup/agents")
        .expect("session ended");
    let event = events
        .find(|e| matches!(e, LinkEvent::GrantRevoked { .. }))
        .await;
    assert!(
        matches!(event, LinkEvent::GrantRevoked { grant_id, ref revoked_by, .. } if grant_id == grant.id && revoked_by == "session-end")
    );

    harness.stop().await;
    let kinds = audit_kinds(&harness).await;
    assert_eq!(
        kinds
            .iter()
            .filter(|(k, _, _)| *k == RecordKind::GrantInstalled)
            .count(),
        2
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|(k, _, _)| *k == RecordKind::GrantRevoked)
            .count(),
        2
    );
}

async fn server_rules_decide_and_are_recorded(backend: Backend) {
    let mut harness = Harness::start_with(backend, |config| {
        config.host_groups.insert("ci".into(), vec!["ci-*".into()]);
        config.rules.push(RuleConfig {
            name: "ci-curl-health".into(),
            action: Verdict::Allow,
            host_group: Some("ci".into()),
            policy: None,
            kind: None,
            executable: Some("/usr/bin/curl".into()),
            command: Some("curl http://localhost/health*".into()),
            destination: None,
            ports: None,
        });
        config.rules.push(RuleConfig {
            name: "no-metadata".into(),
            action: Verdict::Deny,
            host_group: None,
            policy: None,
            kind: None,
            executable: None,
            command: None,
            destination: Some("169.254.169.254/32".parse().expect("net")),
            ports: None,
        });
    })
    .await;
    let (ci, _e) = harness.agent("ci-7").await;
    let (web, _f) = harness.agent("web-1").await;
    let web = Arc::new(web);
    let health = request(&["curl", "http://localhost/health?x=1"]);
    let decision = ci.decide(health.clone()).await.expect("decided by rule");
    assert_eq!(decision.decided_by, "rule:ci-curl-health");
    assert_eq!(
        (decision.state, decision.verdict),
        (RequestState::Approved, Verdict::Allow)
    );

    // Another host group: the rule does not apply, the request waits.
    let mut other = health.clone();
    other.id = Uuid::new_v4();
    let waiting = decide_later(&web, other.clone());
    let mut alice = harness.reviewer("alice").await;
    wait_state(&mut alice, other.id, RequestState::Pending).await;
    assert!(!waiting.is_finished());

    let mut metadata = request(&[]);
    metadata.target = Target::Connect(ConnectTarget {
        family: Family::Inet,
        address: "169.254.169.254".into(),
        port: 80,
        socket_type: SocketType::Stream,
        resolved: Vec::new(),
    });
    let denied = web.decide(metadata.clone()).await.expect("decided by rule");
    assert_eq!(
        (denied.state, denied.decided_by.as_str()),
        (RequestState::Denied, "rule:no-metadata")
    );
    // A rule's decision reaches the agent first; it is stored right after.
    let record = wait_state(&mut alice, metadata.id, RequestState::Denied).await;
    assert_eq!(
        record.decision.expect("decision").decided_by,
        "rule:no-metadata"
    );

    harness.stop().await;
    let kinds = audit_kinds(&harness).await;
    assert!(kinds.iter().any(|(k, id, actor)| *k == RecordKind::Decided
        && id.as_deref() == Some(health.id.to_string().as_str())
        && actor.as_deref() == Some("rule:ci-curl-health")));
}

#[expect(
    clippy::too_many_lines,
    reason = "one scenario: each refusal, then proof nothing changed"
)]
async fn malformed_inputs_get_precise_codes_and_change_nothing(backend: Backend) {
    let mut harness = Harness::start(backend).await;
    let agent_identity = harness.pki.agent("web-1").expect("cert");
    let (sender, mut inbound) = harness
        .raw_agent(Some(Identity::from_pem(
            &agent_identity.cert_pem,
            &agent_identity.key_pem,
        )))
        .await
        .expect("raw agent");
    let mut next_rejection = async || loop {
        let message = tokio::time::timeout(PATIENCE, inbound.message())
            .await
            .expect("an answer")
            .expect("stream")
            .expect("message");
        if let Some(v1::server_message::Message::Rejected(rejected)) = message.message {
            return rejected;
        }
    };

    // Oversized argv.
    let mut wire = v1::ApprovalRequest::from(request(&["curl"]));
    if let Some(v1::approval_request::Target::Exec(exec)) = &mut wire.target {
        exec.argv = vec!["A".repeat(4096); 9];
    }
    let oversized_id = wire.request_id.clone();
    sender
        .send(v1::AgentMessage {
            message: Some(v1::agent_message::Message::Request(wire)),
        })
        .expect("send");
    let rejected = next_rejection().await;
    assert_eq!(Code::from_i32(rejected.code), Code::InvalidArgument);
    assert_eq!(rejected.request_id, oversized_id);
    assert!(
        rejected.message.contains("exec.argv"),
        "{}",
        rejected.message
    );

    // Empty id.
    let mut wire = v1::ApprovalRequest::from(request(&["curl"]));
    wire.request_id.clear();
    sender
        .send(v1::AgentMessage {
            message: Some(v1::agent_message::Message::Request(wire)),
        })
        .expect("send");
    let rejected = next_rejection().await;
    assert_eq!(Code::from_i32(rejected.code), Code::InvalidArgument);
    assert!(
        rejected.message.contains("`request_id` is missing"),
        "{}",
        rejected.message
    );

    // The same id with different content.
    let original = request(&["curl", "one"]);
    sender
        .send(v1::AgentMessage {
            message: Some(v1::agent_message::Message::Request(original.clone().into())),
        })
        .expect("send");
    let mut alice = harness.reviewer("alice").await;
    wait_state(&mut alice, original.id, RequestState::Pending).await;
    let mut forged = original.clone();
    forged.target = Target::Exec(ExecTarget {
        executable: "/usr/bin/curl".into(),
        argv: vec!["curl".into(), "two".into()],
        content: None,
        path_check: None,
        named: None,
        file: None,
        mount_namespace: None,
        argv_truncated: false,
        env: Vec::new(),
    });
    sender
        .send(v1::AgentMessage {
            message: Some(v1::agent_message::Message::Request(forged.into())),
        })
        .expect("send");
    let rejected = next_rejection().await;
    assert_eq!(Code::from_i32(rejected.code), Code::AlreadyExists);

    // Ids not in the one request-id form: uppercase, without hyphens, time-ordered (v7).
    for bad in [
        "5F0C2A9E-8D41-8B7E-9A13-4C2D7E9F0A1B",
        "5f0c2a9e8d418b7e9a134c2d7e9f0a1b",
        "0191ab3c-12aa-7b7e-9a13-4c2d7e9f0a1b",
    ] {
        let mut wire = v1::ApprovalRequest::from(request(&["curl"]));
        wire.request_id = bad.to_owned();
        sender
            .send(v1::AgentMessage {
                message: Some(v1::agent_message::Message::Request(wire)),
            })
            .expect("send");
        let rejected = next_rejection().await;
        assert_eq!(
            Code::from_i32(rejected.code),
            Code::InvalidArgument,
            "{bad}"
        );
        assert!(
            rejected.message.contains("request_id"),
            "{bad}: {}",
            rejected.message
        );
    }

    // Withdrawing an unknown id.
    sender
        .send(v1::AgentMessage {
            message: Some(v1::agent_message::Message::Withdraw(v1::Withdraw {
                request_id: Uuid::new_v4().to_string(),
                reason: v1::WithdrawReason::TaskExited.into(),
                detail: String::new(),
            })),
        })
        .expect("send");
    assert_eq!(Code::from_i32(next_rejection().await.code), Code::NotFound);

    // The review API.
    let (mut raw, bearer) = harness.raw_review("alice").await;
    let call = |message: v1::DecideRequest| {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", bearer.parse().expect("header"));
        request
    };
    let decide = |id: &str, verdict: v1::Verdict, duration: &str| v1::DecideRequest {
        request_id: id.to_owned(),
        verdict: verdict.into(),
        reason: String::new(),
        duration: duration.to_owned(),
        scope: String::new(),
    };
    let id = original.id.to_string();
    let cases = [
        (decide("", v1::Verdict::Allow, ""), Code::InvalidArgument),
        (
            decide("not-a-uuid", v1::Verdict::Allow, ""),
            Code::InvalidArgument,
        ),
        (
            decide(&id, v1::Verdict::Unspecified, ""),
            Code::InvalidArgument,
        ),
        (
            decide(&id, v1::Verdict::Allow, "forever"),
            Code::InvalidArgument,
        ),
        (
            v1::DecideRequest {
                reason: "x".repeat(10_000),
                ..decide(&id, v1::Verdict::Allow, "")
            },
            Code::InvalidArgument,
        ),
        (
            v1::DecideRequest {
                scope: "everywhere".into(),
                ..decide(&id, v1::Verdict::Allow, "")
            },
            Code::InvalidArgument,
        ),
        (
            decide(&Uuid::new_v4().to_string(), v1::Verdict::Allow, ""),
            Code::NotFound,
        ),
    ];
    for (message, expected) in cases {
        let status = raw
            .decide(call(message.clone()))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), expected, "{message:?}: {}", status.message());
    }
    let record = alice.get(original.id).await.expect("get").0;
    assert_eq!(record.state, RequestState::Pending, "nothing changed");
    assert!(record.approvals.is_empty());
    assert_eq!(
        record.request.target, original.target,
        "the forged content was not stored"
    );

    // Deciding an already decided request.
    raw.decide(call(decide(&id, v1::Verdict::Deny, "")))
        .await
        .expect("deny");
    let status = raw
        .decide(call(decide(&id, v1::Verdict::Allow, "")))
        .await
        .expect_err("already decided");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("is already denied"),
        "{}",
        status.message()
    );
    assert_eq!(
        alice.get(original.id).await.expect("get").0.state,
        RequestState::Denied
    );

    // Filters are validated too.
    let mut list = tonic::Request::new(v1::ListPendingRequest {
        filter: Some(v1::RequestFilter {
            host: String::new(),
            policy: String::new(),
            kind: 42,
        }),
        limit: 0,
    });
    list.metadata_mut()
        .insert("authorization", bearer.parse().expect("header"));
    assert_eq!(
        raw.list_pending(list).await.expect_err("bad kind").code(),
        Code::InvalidArgument
    );
    harness.stop().await;
}

async fn next_event(
    watch: &mut (
             impl tokio_stream::Stream<
        Item = Result<(bool, RequestRecord), gatekeep_client::ClientError>,
    > + Unpin
         ),
) -> (bool, RequestRecord) {
    tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("a watch event")
        .expect("stream open")
        .expect("event")
}

async fn watch_streams_new_and_changed_requests_and_the_audit_verifies(backend: Backend) {
    let mut harness = Harness::start(backend).await;
    let (link, _events) = harness.agent("web-1").await;
    let link = Arc::new(link);
    let mut alice = harness.reviewer("alice").await;
    let before = request(&["curl", "https://before.example"]);
    let before_wait = decide_later(&link, before.clone());
    wait_state(&mut alice, before.id, RequestState::Pending).await;

    let mut watch = Box::pin(alice.watch(&RequestFilter::default()).await.expect("watch"));
    let (initial, record): (bool, RequestRecord) = next_event(&mut watch).await;
    assert!(initial);
    assert_eq!(record.request.id, before.id);

    let after = request(&["curl", "https://after.example"]);
    let after_wait = decide_later(&link, after.clone());
    let (initial, record) = next_event(&mut watch).await;
    assert!(!initial);
    assert_eq!(
        (record.request.id, record.state),
        (after.id, RequestState::Pending)
    );
    alice
        .decide(after.id, Verdict::Deny, "", GrantDuration::Once)
        .await
        .expect("deny");
    let (_, record) = next_event(&mut watch).await;
    assert_eq!(
        (record.request.id, record.state),
        (after.id, RequestState::Denied)
    );
    answer(after_wait).await.expect("decision");
    alice.cancel(before.id, "").await.expect("cancel");
    answer(before_wait).await.expect("decision");

    let report = alice.verify_audit().await.expect("verify");
    assert_eq!(
        report.records, 4,
        "2 requested, 1 decided, 1 cancelled: {report:?}"
    );
    assert!(report.guards_intact);
    let mut export = Vec::new();
    alice.export_audit(0, &mut export).await.expect("export");
    let verified = gatekeep_audit::verify_export(export.as_slice()).expect("the export verifies");
    assert_eq!(verified.records, report.records);
    assert_eq!(verified.head.expect("head").hash, report.head_hash);
    drop(watch);
    harness.stop().await;
}

async fn the_services_own_policies_override_the_agents_copy(backend: Backend) {
    let policies = gatekeep_policy::parse_str(
        "service.toml",
        r#"
[[policy]]
name = "ai-agents"
cgroups = ["/sys/fs/cgroup/agents/*"]
[policy.approval]
timeout = "1s"
on_timeout = "allow"
reviewers = ["security"]
approvals_required = 2
"#,
    )
    .expect("policies");
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::ephemeral(&[]).expect("pki");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut config = config(dir.path().join("data"));
    backend.configure(&mut config).await;
    let server = Server::builder(config)
        .tls(pki.tls())
        .listener(listener)
        .policies(policies)
        .build()
        .await
        .expect("server");
    let endpoint = server.endpoint();
    let token = server
        .add_reviewer("alice", &["sre".into()])
        .await
        .expect("reviewer");
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async move {
        stopped.await.ok();
    }));
    let identity = pki.agent("web-1").expect("cert");
    let (link, events) = AgentLink::start(AgentLinkConfig::new(
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
    let mut events = Events(events);
    events.connected().await;

    // The agent says: deny after five minutes, any reviewer, one approval. The service's
    // policy says: allow after one second, security only, two approvals.
    let req = request(&["curl", "https://policy.example"]);
    let link = Arc::new(link);
    let pending = decide_later(&link, req.clone());
    let mut alice = ReviewClient::connect(ReviewConfig {
        endpoint: endpoint.clone(),
        token,
        tls: ClientTls {
            ca_pem: pki.ca.cert_pem().to_owned(),
            identity: None,
            domain: None,
        },
        connect_timeout: Duration::from_secs(5),
    })
    .await
    .expect("reviewer");
    let decision = answer(pending).await.expect("decision");
    assert_eq!(
        (decision.state, decision.verdict),
        (RequestState::Expired, Verdict::Allow)
    );
    let (record, _) = alice.get(req.id).await.expect("get");
    assert_eq!(record.approvals_required, 2);
    assert_eq!(record.request.approval.reviewer_groups, ["security"]);
    assert!(record.deadline - record.received_at <= time::Duration::seconds(1));

    // A policy the service does not know is refused.
    let mut unknown = request(&["curl"]);
    unknown.policy = "nope".into();
    match link.decide(unknown).await {
        Err(LinkError::Rejected { code, message, .. }) => {
            assert_eq!(code, Code::FailedPrecondition);
            assert!(message.contains("policy `nope` is not loaded"), "{message}");
        }
        other => panic!("unknown policy accepted: {other:?}"),
    }
    drop(link);
    stop.send(()).ok();
    serving.await.expect("task").expect("served");
}

async fn a_policy_that_requires_a_reason_refuses_approvals_without_one(backend: Backend) {
    // The service's own policy asks for reasons; the agent's copy (the request) does not.
    let policies = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        policies.path().join("agents.toml"),
        "[[policy]]\n\
         name = \"ai-agents\"\n\
         cgroups = [\"/sys/fs/cgroup/agents/*\"]\n\
         [policy.approval]\n\
         require_reason = true\n",
    )
    .expect("write policy");
    let dir = policies.path().to_owned();
    let mut harness = Harness::start_with(backend, |config| config.policy_dir = Some(dir)).await;
    let (link, _events) = harness.agent("web-1").await;
    let link = Arc::new(link);
    let mut alice = harness.reviewer("alice").await;

    let req = request(&["terraform", "apply"]);
    assert!(!req.approval.require_reason);
    let id = req.id;
    let pending = decide_later(&link, req);
    let record = wait_state(&mut alice, id, RequestState::Pending).await;
    assert!(
        record.request.approval.require_reason,
        "the service's policy wins"
    );
    for blank in ["", " \t\n"] {
        let refused = alice
            .decide(id, Verdict::Allow, blank, GrantDuration::Once)
            .await
            .expect_err("an approval without a reason");
        let ClientError::Status { status } = &refused else {
            panic!("{refused:?}");
        };
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status
                .message()
                .starts_with("policy `ai-agents` requires a reason for approvals; give one")
                && status.message().contains("--reason"),
            "{}",
            status.message()
        );
    }
    let (record, _) = alice.get(id).await.expect("get");
    assert_eq!(record.state, RequestState::Pending, "nothing was recorded");
    assert!(record.approvals.is_empty());
    alice
        .decide(id, Verdict::Allow, "change CHG-7", GrantDuration::Once)
        .await
        .expect("approve with a reason");
    let decision = answer(pending).await.expect("decision");
    assert_eq!(decision.verdict, Verdict::Allow);
    assert_eq!(decision.reason, "change CHG-7");

    // A denial needs no reason.
    let req = request(&["terraform", "destroy"]);
    let id = req.id;
    let pending = decide_later(&link, req);
    wait_state(&mut alice, id, RequestState::Pending).await;
    alice
        .decide(id, Verdict::Deny, "", GrantDuration::Once)
        .await
        .expect("deny without a reason");
    assert_eq!(
        answer(pending).await.expect("decision").verdict,
        Verdict::Deny
    );
    drop(link);
    harness.stop().await;
}

/// Exports the service's audit log as JSON values, one per record.
async fn audit_lines(harness: &Harness) -> Vec<serde_json::Value> {
    let out = support::audit_export(&harness.config).await;
    String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("json line"))
        .collect()
}

async fn the_agents_request_id_is_the_id_in_the_list_and_the_audit_log(backend: Backend) {
    let mut harness = Harness::start(backend).await;
    let (link, _events) = harness.agent("web-1").await;
    let link = Arc::new(link);
    let mut alice = harness.reviewer("alice").await;

    // Minted as the agent mints it: a v8 uuid from a hash.
    let mut asked = request(&["curl", "https://example.org"]);
    asked.id = gatekeep_proto::id::from_hash(*b"host+boot+pause!");
    let waiting = decide_later(&link, asked.clone());
    let pending = wait_state(&mut alice, asked.id, RequestState::Pending).await;
    assert_eq!(pending.request.id, asked.id);
    let listed = alice
        .list_pending(&RequestFilter::default(), 0)
        .await
        .expect("list");
    assert_eq!(
        listed.iter().map(|r| r.request.id).collect::<Vec<_>>(),
        [asked.id]
    );

    // The agent restarted (a new stream from the same host) and asks again about the same
    // paused task: same id, the same action, context gathered anew (another cwd, ancestry).
    // Still one request.
    waiting.abort();
    let _ = waiting.await;
    Arc::try_unwrap(link)
        .map_err(|_| "link still shared")
        .expect("one link")
        .shutdown()
        .await;
    let (restarted, _restarted_events) = harness.agent("web-1").await;
    let restarted = Arc::new(restarted);
    let mut again = asked.clone();
    again.cwd = Some("/elsewhere".into());
    again.ancestry = vec![gatekeep_proto::model::ProcessInfo {
        pid: 1,
        comm: "init".into(),
        executable: None,
        argv: vec![],
        cgroup: None,
    }];
    let resent = decide_later(&restarted, again);

    // Another agent with the same id: refused, and the stored request is untouched.
    let (other, _other_events) = harness.agent("web-2").await;
    let stolen = other.decide(asked.clone()).await;
    assert!(
        matches!(&stolen, Err(LinkError::Rejected { code, .. }) if *code == Code::AlreadyExists),
        "{stolen:?}"
    );
    let stored = wait_state(&mut alice, asked.id, RequestState::Pending).await;
    assert_eq!(stored.host, "web-1");
    assert_eq!(stored.request.cwd.as_deref(), Some("/srv"));

    // Resolved by its short id, decided, and the answer names the same id.
    let short = &gatekeep_proto::id::short_ids(&[asked.id])[0];
    assert_eq!(
        alice.resolve_request_id(short).await.expect("resolve"),
        asked.id
    );
    alice
        .decide(asked.id, Verdict::Allow, "fine", GrantDuration::Once)
        .await
        .expect("approve");
    let decision = answer(resent).await.expect("decision");
    assert_eq!(decision.request_id, asked.id);
    assert_eq!(
        alice
            .list_pending(&RequestFilter::default(), 0)
            .await
            .expect("list")
            .len(),
        0,
        "one request, decided"
    );
    drop(other);

    harness.stop().await;
    let lines = audit_lines(&harness).await;
    let ours: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["request_id"] == asked.id.to_string())
        .collect();
    let kinds: Vec<&str> = ours
        .iter()
        .map(|l| l["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["requested", "decided"], "{lines:#?}");
    let requested = &ours[0]["payload"];
    assert_eq!(requested["schema"], gatekeep_proto::audit::SCHEMA_VERSION);
    assert_eq!(requested["request"]["id"], asked.id.to_string());
    let decided = &ours[1]["payload"];
    assert_eq!(decided["schema"], gatekeep_proto::audit::SCHEMA_VERSION);
    assert_eq!(decided["state"], "approved");
    assert_eq!(decided["final"], true);
    assert_eq!(ours[1]["actor"], "alice");
    // The refused copy from web-2 left no record.
    assert!(
        lines
            .iter()
            .all(|l| l["host"] != "web-2" || l["request_id"] != asked.id.to_string()),
        "{lines:#?}"
    );
}

async fn request_id_prefixes_resolve_to_one_request_or_name_the_candidates(backend: Backend) {
    let mut harness = Harness::start(backend).await;
    let (link, _events) = harness.agent("web-1").await;
    let link = Arc::new(link);
    let mut alice = harness.reviewer("alice").await;
    let ids = [
        "12345678-aaaa-4aaa-8aaa-aaaaaaaaaaaa",
        "12345678-abbb-4bbb-8bbb-bbbbbbbbbbbb",
        "9abcdef0-cccc-4ccc-8ccc-cccccccccccc",
    ]
    .map(|text| Uuid::try_parse(text).expect("uuid"));
    let mut waits = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut asked = request(&["curl", &format!("https://{i}.example")]);
        asked.id = *id;
        waits.push(decide_later(&link, asked));
        wait_state(&mut alice, *id, RequestState::Pending).await;
    }
    assert_eq!(alice.resolve_request_id("9abc").await.expect("one"), ids[2]);
    assert_eq!(
        alice.resolve_request_id("12345678AB").await.expect("one"),
        ids[1]
    );
    assert_eq!(
        code(alice.resolve_request_id("12345678").await),
        Code::FailedPrecondition
    );
    let ambiguous = alice.resolve_request_id("1234").await;
    let message = format!("{:?}", ambiguous.expect_err("ambiguous"));
    assert!(
        message.contains(&ids[0].to_string()) && message.contains(&ids[1].to_string()),
        "{message}"
    );
    assert_eq!(code(alice.resolve_request_id("ffff").await), Code::NotFound);
    assert_eq!(
        code(alice.resolve_request_id("zz").await),
        Code::InvalidArgument
    );
    // Decided requests resolve too.
    alice
        .decide(ids[2], Verdict::Deny, "", GrantDuration::Once)
        .await
        .expect("deny");
    answer(waits.pop().expect("third")).await.expect("denied");
    assert_eq!(
        alice.resolve_request_id("9abcdef0").await.expect("one"),
        ids[2]
    );
    harness.stop().await;
}

async fn an_agents_audit_health_is_recorded_by_the_service(backend: Backend) {
    let mut harness = Harness::start(backend).await;
    let (link, _events) = harness.agent("web-1").await;
    link.audit_health(v1::AuditHealth {
        writable: false,
        cause: "disk_full".into(),
        error: "audit log database error: database or disk is full".into(),
        fix: "free space on the filesystem holding /var/lib/gatekeep".into(),
        since_ms: 1_700_000_000_000,
        held: 3,
        lost: 0,
    })
    .expect("report");
    link.audit_health(v1::AuditHealth {
        writable: true,
        ..v1::AuditHealth::default()
    })
    .expect("report");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let records = loop {
        let records: Vec<serde_json::Value> = audit_lines(&harness)
            .await
            .into_iter()
            .filter(|r| r["kind"] == "agent_audit_health")
            .collect();
        if records.len() == 2 {
            break records;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the service did not record both reports: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(records[0]["host"], "web-1");
    assert_eq!(records[0]["actor"], "agent:web-1");
    assert_eq!(records[0]["payload"]["writable"], false);
    assert_eq!(records[0]["payload"]["cause"], "disk_full");
    assert_eq!(records[0]["payload"]["held"], 3);
    assert_eq!(records[1]["payload"]["writable"], true);
    harness.stop().await;
}

on_both_backends!(
    malformed_inputs_get_precise_codes_and_change_nothing,
    grants_reach_the_agent_and_revocations_are_pushed,
    approve_deny_and_cancel_reach_the_agent,
    deadlines_apply_the_timeout_action,
    quorum_needs_distinct_reviewers,
    a_grant_covers_the_asking_workload_unless_the_reviewer_chose_the_policy,
    owners_and_other_groups_cannot_approve,
    a_truncated_request_is_approved_once_never_granted,
    review_api_refuses_agents_and_bad_tokens,
    untrusted_or_missing_agent_certificates_are_refused,
    reconnect_resends_pending_requests_without_duplicates,
    restart_keeps_pending_requests,
    server_rules_decide_and_are_recorded,
    watch_streams_new_and_changed_requests_and_the_audit_verifies,
    the_services_own_policies_override_the_agents_copy,
    the_agents_request_id_is_the_id_in_the_list_and_the_audit_log,
    request_id_prefixes_resolve_to_one_request_or_name_the_candidates,
    an_agents_audit_health_is_recorded_by_the_service,
    a_policy_that_requires_a_reason_refuses_approvals_without_one,
);
