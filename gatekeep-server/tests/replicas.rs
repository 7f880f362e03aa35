//! A fleet: separate `gatekeep-server` processes (the shipped binary) on one throwaway
//! `PostgreSQL` database. An agent streams to one replica while reviewers decide on
//! others; quorums are reached by approvals on different replicas at once; deadlines expire
//! once although every replica's timer sees them; and the service's audit chain, appended by
//! every replica, verifies.
//!
//! No timing assertions: waits poll with a generous bound; the cross-replica delivery times
//! are printed, not checked.

mod support;

use std::{
    collections::HashMap,
    fs,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use gatekeep_client::{
    AgentLink, AgentLinkConfig, Backoff, ClientError, ClientIdentity, ClientTls, LinkEvent,
    RequestFilter, ReviewClient, ReviewConfig,
};
use gatekeep_proto::{
    GrantDuration,
    model::{ApprovalRequest, Decision, RequestRecord, RequestState, Verdict},
};
use gatekeep_server::{
    ServerConfig, certs,
    store::{PostgresStore, Store as _, postgres::audit::AUDIT_LOCK},
};
use support::{
    PATIENCE,
    chat::{self, StandIn},
    exec_request, pg,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use uuid::Uuid;

/// One `gatekeep-server serve` process; stopped (SIGTERM, then SIGKILL) when dropped.
struct Replica {
    name: String,
    addr: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
}

impl Replica {
    fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Stops it gracefully (it commits its audit records first) and checks it exited 0.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "replica {} exited with {status}: {}",
                    self.name,
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica {} did not stop",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Replica {
    /// Kills it at once (SIGKILL): no graceful shutdown, nothing flushed.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill the replica");
            drop(child.wait());
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.kill());
            drop(child.wait());
        }
    }
}

/// N replicas on one database, reviewers alice and bob (group sre), certificates on disk.
struct Fleet {
    dir: tempfile::TempDir,
    config: ServerConfig,
    ca_pem: String,
    tokens: HashMap<String, String>,
    replicas: Vec<Replica>,
    /// TOML appended to every replica's config (a `[notify]` section).
    extra: String,
}

impl Fleet {
    async fn start(count: usize) -> Self {
        Self::start_with(count, String::new()).await
    }

    async fn start_with(count: usize, extra: String) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let tls = dir.path().join("tls");
        certs::init_dir(&tls, &[]).expect("certificates");
        certs::agent_files(&tls, "web-1", None).expect("agent certificate");
        let mut config = ServerConfig::default();
        config.store.url = Some(pg::cluster().database().await);
        config.store.pool_size = 4;
        // Migrates the new database and adds the reviewers every replica will know.
        let store = PostgresStore::connect(&config.store)
            .await
            .expect("connect to the test database");
        let mut tokens = HashMap::new();
        for name in ["alice", "bob"] {
            let token = gatekeep_server::add_reviewer(&store, name, &["sre".into()])
                .await
                .expect("reviewer");
            tokens.insert(name.to_owned(), token);
        }
        let ca_pem = fs::read_to_string(tls.join("ca.pem")).expect("ca");
        let mut fleet = Self {
            dir,
            config,
            ca_pem,
            tokens,
            replicas: Vec::new(),
            extra,
        };
        for n in 0..count {
            let replica = fleet.spawn(&format!("replica-{n}"));
            fleet.replicas.push(replica);
        }
        for n in 0..count {
            fleet.wait_ready(n).await;
        }
        fleet
    }

    fn spawn(&self, name: &str) -> Replica {
        self.spawn_aborting_at(name, None)
    }

    /// A replica whose debug build aborts at failpoint `abort_at` (see
    /// `gatekeep_server::failpoint`).
    fn spawn_aborting_at(&self, name: &str, abort_at: Option<&str>) -> Replica {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let tls = self.dir.path().join("tls");
        let config_path = self.dir.path().join(format!("{name}.toml"));
        let text = format!(
            "name = \"{name}\"\nlisten = \"{addr}\"\ndata_dir = \"{data}\"\n\
             [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             [store]\nurl = \"{url}\"\npool_size = 4\n",
            data = self.dir.path().join(name).display(),
            ca = tls.join("ca.pem").display(),
            cert = tls.join("server.pem").display(),
            key = tls.join("server.key").display(),
            url = self.config.store.url.as_deref().expect("url"),
        );
        fs::write(&config_path, text + &self.extra).expect("config");
        // A replica started again under the same name keeps the log of the one before.
        let log = self.dir.path().join(format!(
            "{name}-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let mut command = Command::new(env!("CARGO_BIN_EXE_gatekeep-server"));
        command
            .arg("--config")
            .arg(&config_path)
            .arg("serve")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log"));
        if let Some(point) = abort_at {
            command.env(gatekeep_server::failpoint::VARIABLE, point);
        }
        // SAFETY: prctl is async-signal-safe. A test process that dies (killed by a timeout)
        // takes its replicas with it; the test's thread, which spawns them, outlives them.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().expect("start gatekeep-server");
        Replica {
            name: name.to_owned(),
            addr,
            child: Some(child),
            log,
        }
    }

    async fn wait_ready(&self, n: usize) {
        let started = Instant::now();
        loop {
            // Bounded: a replica that accepts but never answers fails the test, not hangs it.
            let ready = tokio::time::timeout(Duration::from_secs(5), async {
                let mut client = self.try_reviewer(n, "alice").await?;
                client.status().await
            })
            .await;
            if matches!(ready, Ok(Ok(_))) {
                return;
            }
            let replica = &self.replicas[n];
            assert!(
                started.elapsed() < PATIENCE,
                "replica {} never served: {}",
                replica.name,
                fs::read_to_string(&replica.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn try_reviewer(
        &self,
        n: usize,
        name: &str,
    ) -> Result<ReviewClient, gatekeep_client::ClientError> {
        ReviewClient::connect(ReviewConfig {
            endpoint: self.replicas[n].endpoint(),
            token: self.tokens[name].clone(),
            tls: ClientTls {
                ca_pem: self.ca_pem.clone(),
                identity: None,
                domain: None,
            },
            connect_timeout: Duration::from_secs(5),
        })
        .await
    }

    async fn reviewer(&self, n: usize, name: &str) -> ReviewClient {
        self.try_reviewer(n, name).await.expect("reviewer connects")
    }

    /// The agent `web-1`, streaming to replica `n`.
    async fn agent(&self, n: usize) -> Arc<AgentLink> {
        let (link, mut events) = self.agent_with_failover(n, &[]).await;
        // Later events (decisions are answered through `decide`) are not needed.
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        link
    }

    /// The agent `web-1`, streaming to replica `n`, failing over to `failover` in turn;
    /// returns once connected, with its events.
    async fn agent_with_failover(
        &self,
        n: usize,
        failover: &[usize],
    ) -> (Arc<AgentLink>, mpsc::UnboundedReceiver<LinkEvent>) {
        let tls = self.dir.path().join("tls");
        let mut config = AgentLinkConfig::new(
            self.replicas[n].endpoint(),
            ClientTls {
                ca_pem: self.ca_pem.clone(),
                identity: Some(ClientIdentity {
                    cert_pem: fs::read_to_string(tls.join("agent-web-1.pem")).expect("cert"),
                    key_pem: fs::read_to_string(tls.join("agent-web-1.key")).expect("key"),
                }),
                domain: None,
            },
        );
        config.failover = failover
            .iter()
            .map(|m| self.replicas[*m].endpoint())
            .collect();
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
        (Arc::new(link), events)
    }

    /// Stops every replica gracefully, then checks the one audit chain they wrote.
    async fn stop_and_verify(&mut self) -> Vec<serde_json::Value> {
        for replica in &mut self.replicas {
            replica.stop();
        }
        let report = support::audit_verify(&self.config).await;
        let lines: Vec<serde_json::Value> =
            String::from_utf8(support::audit_export(&self.config).await)
                .expect("utf-8")
                .lines()
                .map(|line| serde_json::from_str(line).expect("json"))
                .collect();
        assert_eq!(report.records, lines.len() as u64);
        lines
    }
}

/// Asks in the background; the decision arrives on the returned channel.
fn ask(
    link: &Arc<AgentLink>,
    request: ApprovalRequest,
    answers: &mpsc::UnboundedSender<(Uuid, Decision, Instant)>,
) {
    let link = Arc::clone(link);
    let answers = answers.clone();
    tokio::spawn(async move {
        let id = request.id;
        let decision = link.decide(request).await.expect("a decision");
        drop(answers.send((id, decision, Instant::now())));
    });
}

async fn wait_pending(reviewer: &mut ReviewClient, id: Uuid) {
    let started = Instant::now();
    loop {
        if let Ok((record, _)) = reviewer.get(id).await
            && record.state == RequestState::Pending
        {
            return;
        }
        assert!(started.elapsed() < PATIENCE, "request {id} never pending");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn next_answer(
    answers: &mut mpsc::UnboundedReceiver<(Uuid, Decision, Instant)>,
) -> (Uuid, Decision, Instant) {
    tokio::time::timeout(PATIENCE, answers.recv())
        .await
        .expect("a decision reaches the agent in time")
        .expect("answers")
}

/// The state of request `id` in the next event of `watch` about it.
async fn next_watched(
    watch: &mut (impl tokio_stream::Stream<Item = Result<(bool, RequestRecord), ClientError>> + Unpin),
    id: Uuid,
) -> RequestState {
    loop {
        let (_, record) = tokio::time::timeout(PATIENCE, watch.next())
            .await
            .expect("a watch event in time")
            .expect("watch open")
            .expect("event");
        if record.request.id == id {
            return record.state;
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_on_another_replica_reach_the_agent() {
    const REQUESTS: usize = 40;
    let mut fleet = Fleet::start(2).await;
    let link = fleet.agent(0).await;
    let mut on_b = fleet.reviewer(1, "alice").await;
    // A console on replica B watches requests the agent streams to replica A.
    let mut watcher = fleet.reviewer(1, "bob").await;
    let mut watch = Box::pin(
        watcher
            .watch(&RequestFilter::default())
            .await
            .expect("watch on replica b"),
    );
    let (answers, mut answered) = mpsc::unbounded_channel();
    let mut latencies = Vec::new();
    let mut first = None;
    for n in 0..REQUESTS {
        let request = exec_request(&["curl", &format!("https://fleet.example/{n}")]);
        let id = request.id;
        first.get_or_insert(id);
        ask(&link, request, &answers);
        wait_pending(&mut on_b, id).await;
        if n == 0 {
            // B re-reads a request when A's change reaches it: decided before that, the
            // watcher would see it decided only.
            assert_eq!(
                next_watched(&mut watch, id).await,
                RequestState::Pending,
                "the watcher on B sees the request A took"
            );
        }
        let verdict = if n % 4 == 3 {
            Verdict::Deny
        } else {
            Verdict::Allow
        };
        let decided_at = Instant::now();
        let record = on_b
            .decide(id, verdict, "decided on replica b", GrantDuration::Once)
            .await
            .expect("decide on replica b");
        assert_ne!(record.state, RequestState::Pending);
        let (answer_id, decision, at) = next_answer(&mut answered).await;
        assert_eq!(answer_id, id, "the agent got this request's decision");
        assert_eq!(decision.verdict, verdict);
        assert_eq!(decision.decided_by, "alice");
        latencies.push(at.saturating_duration_since(decided_at));
    }
    // The watcher saw the first request arrive on A (above) and be decided on B.
    let first = first.expect("a request");
    assert_eq!(
        next_watched(&mut watch, first).await,
        RequestState::Approved
    );
    latencies.sort();
    println!(
        "cross-replica delivery (decide called on replica B -> the agent streaming to A has \
         the decision), {REQUESTS} decisions one at a time, debug build: p50 {:?}, p99 {:?}, \
         max {:?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().expect("some")
    );
    let lines = fleet.stop_and_verify().await;
    let finals = lines
        .iter()
        .filter(|l| l["kind"] == "decided" && l["payload"]["final"] == true)
        .count();
    assert_eq!(finals, REQUESTS, "one final decision record per request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_reached_on_two_replicas_at_once_counts_each_vote_once() {
    const REQUESTS: usize = 12;
    let mut fleet = Fleet::start(2).await;
    let link = fleet.agent(0).await;
    let (answers, mut answered) = mpsc::unbounded_channel();
    let mut alice = fleet.reviewer(0, "alice").await;
    let mut bob = fleet.reviewer(1, "bob").await;
    let mut ids = Vec::new();
    for n in 0..REQUESTS {
        let mut request = exec_request(&["curl", &format!("https://quorum.example/{n}")]);
        request.approval.approvals_required = 2;
        ids.push(request.id);
        ask(&link, request, &answers);
    }
    for id in &ids {
        wait_pending(&mut alice, *id).await;
        // Both approvals at once, on different replicas.
        let (a, b) = tokio::join!(
            alice.decide(*id, Verdict::Allow, "a", GrantDuration::Once),
            bob.decide(*id, Verdict::Allow, "b", GrantDuration::Once),
        );
        let (a, b) = (
            a.expect("alice's vote counts"),
            b.expect("bob's vote counts"),
        );
        // Exactly one of the two made the quorum.
        let approved = [&a, &b]
            .iter()
            .filter(|r| r.state == RequestState::Approved)
            .count();
        assert_eq!(approved, 1, "{:?} / {:?}", a.state, b.state);
    }
    let mut decided = HashMap::new();
    for _ in 0..REQUESTS {
        let (id, decision, _) = next_answer(&mut answered).await;
        decided.insert(id, decision);
    }
    for id in &ids {
        let decision = &decided[id];
        assert_eq!(decision.verdict, Verdict::Allow);
        let mut by: Vec<&str> = decision.decided_by.split(',').collect();
        by.sort_unstable();
        assert_eq!(by, ["alice", "bob"], "both votes, once each");
        let (record, _) = alice.get(*id).await.expect("get");
        assert_eq!(record.approvals.len(), 2);
    }
    let lines = fleet.stop_and_verify().await;
    for id in &ids {
        let votes: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| l["kind"] == "decided" && l["request_id"] == id.to_string())
            .collect();
        // One vote record and one final record per request.
        assert_eq!(votes.len(), 2, "{id}: {votes:?}");
        assert_eq!(
            votes
                .iter()
                .filter(|l| l["payload"]["final"] == true)
                .count(),
            1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_expires_once_across_replicas() {
    const REQUESTS: usize = 30;
    let mut fleet = Fleet::start(3).await;
    let link = fleet.agent(0).await;
    let (answers, mut answered) = mpsc::unbounded_channel();
    let mut ids = Vec::new();
    let deadline = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    for n in 0..REQUESTS {
        let mut request = exec_request(&["curl", &format!("https://late.example/{n}")]);
        request.deadline = deadline;
        request.on_timeout = Verdict::Deny;
        ids.push(request.id);
        ask(&link, request, &answers);
    }
    for _ in 0..REQUESTS {
        let (_, decision, _) = next_answer(&mut answered).await;
        assert_eq!(decision.state, RequestState::Expired);
        assert_eq!(decision.verdict, Verdict::Deny);
    }
    let lines = fleet.stop_and_verify().await;
    for id in &ids {
        let expired = lines
            .iter()
            .filter(|l| l["kind"] == "expired" && l["request_id"] == id.to_string())
            .count();
        assert_eq!(expired, 1, "request {id} expired once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_when_its_replica_is_killed_and_nothing_is_lost_or_asked_twice() {
    const REQUESTS: usize = 10;
    let mut fleet = Fleet::start(2).await;
    let (link, mut events) = fleet.agent_with_failover(0, &[1]).await;
    let mut on_b = fleet.reviewer(1, "alice").await;
    let (answers, mut answered) = mpsc::unbounded_channel();
    let mut ids = Vec::new();
    for n in 0..REQUESTS {
        let request = exec_request(&["curl", &format!("https://failover.example/{n}")]);
        ids.push(request.id);
        ask(&link, request, &answers);
    }
    for id in &ids {
        wait_pending(&mut on_b, *id).await;
    }
    // The replica the agent streams to dies with every request pending.
    let killed = Instant::now();
    fleet.replicas[0].kill();
    loop {
        let event = tokio::time::timeout(PATIENCE, events.recv())
            .await
            .expect("the agent reconnects in time")
            .expect("link alive");
        if matches!(event, LinkEvent::Connected { .. }) {
            break;
        }
    }
    println!(
        "failover: replica SIGKILLed -> the agent connected to the next one (its pending \
         requests re-sent on connect): {:?}",
        killed.elapsed()
    );
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    for id in &ids {
        on_b.decide(*id, Verdict::Allow, "after failover", GrantDuration::Once)
            .await
            .expect("decide on the surviving replica");
    }
    let mut decided = Vec::new();
    for _ in 0..REQUESTS {
        let (id, decision, _) = next_answer(&mut answered).await;
        assert_eq!(decision.verdict, Verdict::Allow);
        decided.push(id);
    }
    decided.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(decided, expected, "every request decided, each once");
    let lines = fleet.stop_and_verify().await;
    for id in &ids {
        let of = |kind: &str| {
            lines
                .iter()
                .filter(|l| l["kind"] == kind && l["request_id"] == id.to_string())
                .count()
        };
        assert_eq!(of("requested"), 1, "{id} recorded as new once");
        assert_eq!(of("decided"), 1, "{id} decided once");
    }
}

/// The replica an agent streams to dies (SIGKILL) while its audit commits are held up (the
/// test holds the chain's lock, as a slow commit would): the requests it took are not
/// stored, nor shown to a reviewer, before their `requested` record is durable; the agent
/// re-sends them to the other replica, and each request ends with exactly one `requested`
/// and one `decided` record in a chain that verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_before_its_audit_commit_leaves_every_request_recorded_once() {
    const REQUESTS: usize = 10;
    let mut fleet = Fleet::start(2).await;
    let url = fleet.config.store.url.clone().expect("url");
    let (holder, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(connection);
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&AUDIT_LOCK])
        .await
        .expect("hold the audit chain's lock");
    let (link, mut events) = fleet.agent_with_failover(0, &[1]).await;
    let mut on_b = fleet.reviewer(1, "alice").await;
    let (answers, mut answered) = mpsc::unbounded_channel();
    let mut ids = Vec::new();
    for n in 0..REQUESTS {
        let request = exec_request(&["curl", &format!("https://stalled.example/{n}")]);
        ids.push(request.id);
        ask(&link, request, &answers);
    }
    // Replica 0's writer waits for the lock with (some of) the requests' records.
    let started = Instant::now();
    loop {
        let waiting: i64 = holder
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                &[],
            )
            .await
            .expect("pg_locks")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "the audit append never came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for id in &ids {
        assert!(
            on_b.get(*id).await.is_err(),
            "{id} is shown before its `requested` record is durable"
        );
    }
    fleet.replicas[0].kill();
    // Its database session sees the client gone once it gets the lock: that transaction
    // never commits.
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&AUDIT_LOCK])
        .await
        .expect("release the lock");
    loop {
        let event = tokio::time::timeout(PATIENCE, events.recv())
            .await
            .expect("the agent reconnects in time")
            .expect("link alive");
        if matches!(event, LinkEvent::Connected { .. }) {
            break;
        }
    }
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    for id in &ids {
        wait_pending(&mut on_b, *id).await;
        on_b.decide(
            *id,
            Verdict::Allow,
            "after the replica died",
            GrantDuration::Once,
        )
        .await
        .expect("decide on the surviving replica");
    }
    let mut decided = Vec::new();
    for _ in 0..REQUESTS {
        let (id, decision, _) = next_answer(&mut answered).await;
        assert_eq!(decision.verdict, Verdict::Allow);
        decided.push(id);
    }
    decided.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(decided, expected, "every request decided, each once");
    let lines = fleet.stop_and_verify().await;
    for id in &ids {
        let of = |kind: &str| {
            lines
                .iter()
                .filter(|l| l["kind"] == kind && l["request_id"] == id.to_string())
                .count()
        };
        assert_eq!(of("requested"), 1, "{id} recorded as new once");
        assert_eq!(of("decided"), 1, "{id} decided once");
        let requested = lines
            .iter()
            .position(|l| l["kind"] == "requested" && l["request_id"] == id.to_string());
        let decided = lines
            .iter()
            .position(|l| l["kind"] == "decided" && l["request_id"] == id.to_string());
        assert!(
            requested < decided,
            "{id}: `requested` comes before `decided`"
        );
    }
}

/// Waits until replica `n` exits by itself (a failpoint aborted it) and checks it aborted.
fn wait_aborted(replica: &mut Replica) {
    use std::os::unix::process::ExitStatusExt as _;
    let mut child = replica.child.take().expect("the replica runs");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "replica {} did not reach its failpoint",
            replica.name
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        status.signal(),
        Some(nix::sys::signal::Signal::SIGABRT as i32),
        "replica {} stopped at its failpoint: {}",
        replica.name,
        fs::read_to_string(&replica.log).unwrap_or_default()
    );
}

/// The records of request `id` in the chain, by kind (`outcome`: any final one).
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

async fn chain(config: &ServerConfig) -> Vec<serde_json::Value> {
    String::from_utf8(support::audit_export(config).await)
        .expect("utf-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("json"))
        .collect()
}

/// Replicas killed right after storing a decision, before its audit records (a debug
/// build's failpoint aborts them there): the decision stands and reaches the agent, and the
/// records are written once, marked recovered, by the next replica that starts. One of an
/// automatic decision (a server rule), one of a reviewer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_between_a_decision_and_its_record_leaves_it_recorded_once() {
    let rule = "[[rules]]\nname = \"auto\"\naction = \"deny\"\npolicy = \"ai-agents\"\n\
                executable = \"/usr/bin/curl\"\ncommand = \"curl auto *\"\n";
    let mut fleet = Fleet::start_with(2, rule.to_owned()).await;
    fleet.replicas[0].stop();
    fleet.replicas[0] = fleet.spawn_aborting_at(
        "replica-0",
        Some(gatekeep_server::failpoint::AUTOMATIC_DECISION_STORED),
    );
    fleet.wait_ready(0).await;

    // 1. An automatic decision: replica 0 stores it and dies; the agent, failed over to
    // replica 1, asks again and is answered from the store.
    let (link, mut events) = fleet.agent_with_failover(0, &[1]).await;
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let (answers, mut answered) = mpsc::unbounded_channel();
    let automatic = exec_request(&["curl", "auto", "1"]);
    let automatic_id = automatic.id;
    ask(&link, automatic, &answers);
    wait_aborted(&mut fleet.replicas[0]);
    let (id, decision, _) = next_answer(&mut answered).await;
    assert_eq!((id, decision.verdict), (automatic_id, Verdict::Deny));
    assert_eq!(decision.decided_by, "rule:auto");
    let lines = chain(&fleet.config).await;
    assert!(
        records_of(&lines, automatic_id, "outcome").is_empty(),
        "the failpoint stopped replica 0 before the outcome's record"
    );

    // 2. A reviewer's decision: replica 0 (armed again) commits it and dies; the agent on
    // replica 1 still gets it (through the database's notification).
    fleet.replicas[0] = fleet.spawn_aborting_at(
        "replica-0",
        Some(gatekeep_server::failpoint::DECISION_STORED),
    );
    fleet.wait_ready(0).await;
    let reviewed = exec_request(&["curl", "https://reviewed.example/"]);
    let reviewed_id = reviewed.id;
    ask(&link, reviewed, &answers);
    let mut on_0 = fleet.reviewer(0, "alice").await;
    wait_pending(&mut on_0, reviewed_id).await;
    // The replica dies before it answers.
    let refused = on_0
        .decide(
            reviewed_id,
            Verdict::Deny,
            "killed meanwhile",
            GrantDuration::Once,
        )
        .await;
    assert!(refused.is_err(), "replica 0 answered past its failpoint");
    wait_aborted(&mut fleet.replicas[0]);
    let (id, decision, _) = next_answer(&mut answered).await;
    assert_eq!((id, decision.verdict), (reviewed_id, Verdict::Deny));
    let lines = chain(&fleet.config).await;
    assert!(records_of(&lines, reviewed_id, "outcome").is_empty());

    // 3. Another replica starts: its recovery writes what the chain lacks.
    let fresh = fleet.spawn("replica-2");
    fleet.replicas.push(fresh);
    fleet.wait_ready(2).await;
    let started = Instant::now();
    while records_of(&chain(&fleet.config).await, reviewed_id, "outcome").is_empty() {
        assert!(
            started.elapsed() < PATIENCE,
            "the outcome was never recovered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines = fleet.stop_and_verify().await;
    for (id, kind) in [(automatic_id, "decided"), (reviewed_id, "decided")] {
        assert_eq!(
            records_of(&lines, id, "requested").len(),
            1,
            "{id}: one `requested`"
        );
        let outcome = records_of(&lines, id, "outcome");
        assert_eq!(outcome.len(), 1, "{id}: one outcome");
        assert_eq!(outcome[0]["kind"], kind);
        assert_eq!(
            outcome[0]["payload"]["recovered"], true,
            "{id}: written by recovery"
        );
        let requested = lines
            .iter()
            .position(|l| l["kind"] == "requested" && l["request_id"] == id.to_string());
        let decided = lines.iter().position(|l| std::ptr::eq(l, outcome[0]));
        assert!(requested < decided, "{id}: `requested` comes first");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_revoked_on_another_replica_is_removed_from_the_agent() {
    let mut fleet = Fleet::start(2).await;
    let (link, mut events) = fleet.agent_with_failover(0, &[]).await;
    let mut on_b = fleet.reviewer(1, "alice").await;
    let request = exec_request(&["curl", "https://granted.example"]);
    let id = request.id;
    let asking = {
        let link = Arc::clone(&link);
        tokio::spawn(async move { link.decide(request).await.expect("a decision") })
    };
    wait_pending(&mut on_b, id).await;
    on_b.decide(
        id,
        Verdict::Allow,
        "for an hour",
        GrantDuration::For(Duration::from_hours(1)),
    )
    .await
    .expect("approve with a grant on replica b");
    let decision = tokio::time::timeout(PATIENCE, asking)
        .await
        .expect("the decision in time")
        .expect("task");
    let grant = decision.grant.expect("the decision carries its grant");
    on_b.revoke_grant(grant.id, "no longer needed")
        .await
        .expect("revoke on replica b");
    loop {
        let event = tokio::time::timeout(PATIENCE, events.recv())
            .await
            .expect("the revocation reaches the agent on replica a in time")
            .expect("link alive");
        if let LinkEvent::GrantRevoked {
            grant_id,
            revoked_by,
            reason,
        } = event
        {
            assert_eq!(grant_id, grant.id);
            assert_eq!(revoked_by, "alice");
            assert_eq!(reason, "no longer needed");
            break;
        }
    }
    let lines = fleet.stop_and_verify().await;
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["kind"] == "grant_revoked")
            .count(),
        1
    );
}

/// `[notify]` for every replica: Slack (one channel) and a signed webhook, both at `standin`,
/// with a short delivery lease so a dead holder is taken over quickly.
fn notify_section(secrets: &std::path::Path, standin: SocketAddr) -> String {
    fs::write(secrets.join("slack-bot-token"), chat::BOT_TOKEN).expect("test setup");
    fs::write(secrets.join("slack-signing-secret"), chat::SIGNING_SECRET).expect("test setup");
    fs::write(secrets.join("hook-key"), chat::WEBHOOK_KEY).expect("test setup");
    let dir = secrets.display();
    format!(
        r#"
[notify]
lease_ms = 2000
[notify.retry]
initial_ms = 50
max_ms = 1000
[notify.slack]
api_url = "http://{standin}/api"
bot_token = {{ file = "{dir}/slack-bot-token" }}
signing_secret = {{ file = "{dir}/slack-signing-secret" }}
channel = "C0FLEET"
[[notify.webhook]]
name = "siem"
url = "http://{standin}/hooks/siem"
secret = {{ file = "{dir}/hook-key" }}
"#
    )
}

/// Waits until every message posted in `channel` has been updated at least once and
/// there are `count` of them.
async fn wait_updated(standin: &StandIn, channel: &str, count: usize) -> Vec<chat::Message> {
    let started = Instant::now();
    loop {
        let messages = standin.messages(channel);
        if messages.len() >= count && messages.iter().all(|m| m.updates >= 1) {
            return messages;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{count} messages, each updated, never appeared: {messages:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_notifies_and_each_message_is_posted_once_and_updated_once() {
    const REQUESTS: usize = 12;
    let (standin, standin_addr) = StandIn::start().await;
    let secrets = tempfile::tempdir().expect("temp dir");
    let mut fleet = Fleet::start_with(2, notify_section(secrets.path(), standin_addr)).await;
    let link = fleet.agent(0).await;
    let mut on_a = fleet.reviewer(0, "alice").await;
    let mut on_b = fleet.reviewer(1, "alice").await;
    let (answers, mut answered) = mpsc::unbounded_channel();
    let mut ids = Vec::new();
    for n in 0..REQUESTS {
        let request = exec_request(&["curl", &format!("https://notify.example/{n}")]);
        ids.push(request.id);
        ask(&link, request, &answers);
    }
    // Both replicas see every request; each message is posted by one of them.
    let started = Instant::now();
    while standin.messages("C0FLEET").len() < REQUESTS {
        assert!(started.elapsed() < PATIENCE, "not every request was posted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (n, id) in ids.iter().enumerate() {
        let reviewer = if n % 2 == 0 { &mut on_a } else { &mut on_b };
        wait_pending(reviewer, *id).await;
        reviewer
            .decide(*id, Verdict::Allow, "fleet", GrantDuration::Once)
            .await
            .expect("decide");
        next_answer(&mut answered).await;
    }
    wait_updated(&standin, "C0FLEET", REQUESTS).await;
    // Nothing more arrives: no second post, no second update, no second webhook event.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let messages = standin.messages("C0FLEET");
    let posts = standin.ok_calls("chat.postMessage", |_| true).len();
    let updates = standin.ok_calls("chat.update", |_| true).len();
    let hooks = standin.ok_calls("hook:siem", |_| true);
    println!(
        "two replicas, both notifying, {REQUESTS} requests: {} messages, {posts} posts, \
         {updates} updates, {} webhook deliveries",
        messages.len(),
        hooks.len()
    );
    assert_eq!(messages.len(), REQUESTS, "one message per request");
    assert!(messages.iter().all(|m| m.updates == 1), "{messages:#?}");
    assert_eq!(posts, REQUESTS);
    assert_eq!(updates, REQUESTS);
    let mut events: Vec<String> = hooks
        .iter()
        .map(|c| c.body["id"].as_str().expect("id").to_owned())
        .collect();
    events.sort();
    let delivered = events.len();
    events.dedup();
    assert_eq!(delivered, events.len(), "each webhook event once");
    assert_eq!(
        delivered,
        2 * REQUESTS,
        "requested and decided, per request"
    );
    assert_eq!(standin.violations(), Vec::<String>::new());
    fleet.stop_and_verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_replica_died_mid_post_is_taken_over_after_its_lease() {
    let (standin, standin_addr) = StandIn::start().await;
    let secrets = tempfile::tempdir().expect("temp dir");
    let mut fleet = Fleet::start_with(2, notify_section(secrets.path(), standin_addr)).await;
    let link = fleet.agent(0).await;
    let mut on_b = fleet.reviewer(1, "alice").await;
    let request = exec_request(&["curl", "https://ghost.example"]);
    let id = request.id;
    // A replica (no longer running) took the message's lease and started posting: its
    // outcome is unknown. Neither live replica posts while that lease holds.
    let store = PostgresStore::connect(&fleet.config.store)
        .await
        .expect("connect");
    let key = gatekeep_server::store::DeliveryKey::new(id, "slack:C0FLEET", "message");
    let now = time::OffsetDateTime::now_utc();
    let claimed = store
        .claim_delivery(
            key.clone(),
            "ghost".to_owned(),
            now,
            now + Duration::from_secs(3),
        )
        .await
        .expect("claim");
    assert!(matches!(
        claimed,
        gatekeep_server::store::Claim::Taken { .. }
    ));
    store
        .delivery_attempt(key, "ghost".to_owned(), now)
        .await
        .expect("attempt");
    let (answers, mut answered) = mpsc::unbounded_channel();
    let asked = Instant::now();
    ask(&link, request, &answers);
    wait_pending(&mut on_b, id).await;
    let started = Instant::now();
    while standin.messages("C0FLEET").is_empty() {
        assert!(
            started.elapsed() < PATIENCE,
            "the message was never taken over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let taken_over = asked.elapsed();
    // The new holder first looked for the ghost's post (none: it died before Slack had it).
    let lookups = standin.ok_calls("conversations.history", |_| true);
    assert_eq!(lookups.len(), 1, "{lookups:#?}");
    on_b.decide(id, Verdict::Deny, "ghost", GrantDuration::Once)
        .await
        .expect("decide");
    next_answer(&mut answered).await;
    let messages = wait_updated(&standin, "C0FLEET", 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    println!(
        "a lease held by a dead replica (3 s) was taken over {taken_over:?} after the request; \
         {} message, {} update",
        standin.messages("C0FLEET").len(),
        messages[0].updates
    );
    assert_eq!(standin.messages("C0FLEET").len(), 1);
    assert_eq!(standin.messages("C0FLEET")[0].updates, 1);
    assert_eq!(standin.violations(), Vec::<String>::new());
    fleet.stop_and_verify().await;
}
