//! [`RemoteDecider`]: paused requests decided by the decision service
//! (`gatekeep-server`, central or embedded), over the agent's
//! [`AgentLink`].
//!
//! - Each paused request goes out as the [`ApprovalRequest`] the controller built
//!   ([`crate::pause::request`]), under the one request id the agent minted: the service stores it as
//!   its id. A restarted agent asking again about the same paused task mints the same id and
//!   re-sends the same request (the service treats ids idempotently).
//! - Requests go out with [`AgentLink::submit`] and every answer comes back
//!   on the link's one event stream, read by one task ([`pump`]). That keeps
//!   the service's order: the grants listed on (re)connection are applied
//!   before any decision made after it, whose grant is installed before the
//!   verdict is returned.
//! - The link queues requests while the service is away and re-sends them;
//!   the agent's deadline is enforced outside, by
//!   [`decide_by_deadline`](crate::decision::decide_by_deadline) (fail closed:
//!   the policy's timeout action).
//! - Requests whose task died or asked something else are withdrawn.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use gatekeep_client::{AgentLink, LinkError, LinkEvent};
use gatekeep_common::request_kind;
use gatekeep_proto::{
    limits,
    model::{self, RequestState, WithdrawReason},
};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::decision::{
    DecideError, Decider, Decision, DecisionRequest, ServiceOutcome, Withdrawal,
    grants::{GrantTarget, GrantsHandle},
};

type Waiter = oneshot::Sender<Result<model::Decision, LinkError>>;

/// A request sent to the service and not decided yet.
struct Inflight {
    /// Where a grant made by its decision goes.
    target: GrantTarget,
    /// The `decide` call waiting for it; `None` once that call gave up (the
    /// decision may still carry a grant worth installing).
    waiter: Option<Waiter>,
}

#[derive(Default)]
struct Shared {
    inflight: HashMap<Uuid, Inflight>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Asks the decision service.
pub struct RemoteDecider {
    link: Arc<AgentLink>,
    shared: Arc<Mutex<Shared>>,
}

impl RemoteDecider {
    /// A decider over `link`; spawns the task that reads `events` (and
    /// installs grants through `grants`). `host` is the agent's host name (for logs).
    #[must_use]
    pub fn start(
        link: Arc<AgentLink>,
        events: mpsc::UnboundedReceiver<LinkEvent>,
        grants: GrantsHandle,
        host: &str,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        tracing::debug!(%host, "deciding through the decision service");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let task = tokio::spawn(pump(events, Arc::clone(&shared), grants));
        (Self { link, shared }, task)
    }
}

impl Decider for RemoteDecider {
    async fn decide(&self, request: Arc<DecisionRequest>) -> Result<Decision, DecideError> {
        let id = request.id();
        let answer = {
            let (waiter, answer) = oneshot::channel();
            lock(&self.shared).inflight.insert(
                id,
                Inflight {
                    target: grant_target(&request),
                    waiter: Some(waiter),
                },
            );
            if let Err(err) = self.link.submit(request.request.clone()) {
                lock(&self.shared).inflight.remove(&id);
                return Err(refusal(id, err));
            }
            answer
        };
        // Dropped (deadline, task gone): stop waiting, keep the entry so a
        // late decision's grant is still installed.
        let _guard = GiveUp {
            shared: &self.shared,
            id,
        };
        let decision = match answer.await {
            Ok(Ok(decision)) => decision,
            Ok(Err(err)) => return Err(refusal(id, err)),
            Err(_closed) => {
                return Err(DecideError::Unreachable {
                    source: "the decision service link stopped".into(),
                });
            }
        };
        Ok(from_service(&decision))
    }

    fn withdraw(&self, request_id: Uuid, reason: Withdrawal, detail: &str) {
        lock(&self.shared).inflight.remove(&request_id);
        let reason = match reason {
            Withdrawal::TaskExited => WithdrawReason::TaskExited,
            Withdrawal::Superseded => WithdrawReason::Superseded,
            Withdrawal::DeadlinePassed => WithdrawReason::AgentDeadline,
        };
        let detail: String = detail.chars().take(limits::MAX_REASON / 4).collect();
        if let Err(err) = self.link.withdraw(request_id, reason, detail) {
            tracing::warn!(%request_id, error = %err, "cannot withdraw a request");
        }
    }
}

/// Marks a request's waiter gone when its `decide` future is dropped.
struct GiveUp<'a> {
    shared: &'a Mutex<Shared>,
    id: Uuid,
}

impl Drop for GiveUp<'_> {
    fn drop(&mut self) {
        if let Some(entry) = lock(self.shared).inflight.get_mut(&self.id) {
            entry.waiter = None;
        }
    }
}

fn refusal(request_id: Uuid, err: LinkError) -> DecideError {
    match err {
        LinkError::Closed => DecideError::Unreachable {
            source: Box::new(err),
        },
        other => DecideError::Refused {
            request_id,
            reason: other.to_string(),
        },
    }
}

/// The agent's view of a service decision: its verdict, who decided
/// (reviewers, `rule:NAME`, `grant:ID`, `timeout`) and the service's outcome.
fn from_service(decision: &model::Decision) -> Decision {
    Decision {
        verdict: decision.verdict.into(),
        actor: decision.decided_by.clone(),
        reason: decision.reason.clone(),
        expired: decision.state == RequestState::Expired,
        service: Some(ServiceOutcome {
            state: decision.state,
            duration: decision.duration.to_string(),
            grant_id: decision.grant.as_ref().map(|grant| grant.id),
        }),
    }
}

/// Reads the link's events in order: grants on connection, decisions (with
/// their grants), revocations, refusals.
async fn pump(
    mut events: mpsc::UnboundedReceiver<LinkEvent>,
    shared: Arc<Mutex<Shared>>,
    grants: GrantsHandle,
) {
    while let Some(event) = events.recv().await {
        match event {
            LinkEvent::Connected {
                host,
                grants: listed,
            } => {
                tracing::info!(%host, grants = listed.len(), "decision service connected");
                grants.sync(listed).await;
            }
            LinkEvent::Disconnected { error, retry_in } => {
                tracing::warn!(%error, ?retry_in, "decision service unreachable; requests stay queued");
            }
            LinkEvent::Decision(decision) => {
                let entry = lock(&shared).inflight.remove(&decision.request_id);
                let Some(entry) = entry else {
                    if let Some(grant) = &decision.grant {
                        tracing::info!(grant_id = %grant.id, "a grant for a request this agent no longer tracks");
                    }
                    continue;
                };
                if let Some(grant) = &decision.grant {
                    grants.install(grant.clone(), entry.target.clone()).await;
                } else if let Some(grant_id) = decision
                    .decided_by
                    .strip_prefix("grant:")
                    .and_then(|id| Uuid::try_parse(id).ok())
                {
                    grants.adopt(grant_id, entry.target.clone()).await;
                }
                if let Some(waiter) = entry.waiter {
                    drop(waiter.send(Ok(*decision)));
                } else {
                    tracing::info!(
                        request_id = %decision.request_id,
                        decided_by = decision.decided_by,
                        "decision arrived after the agent stopped waiting"
                    );
                }
            }
            LinkEvent::GrantRevoked {
                grant_id,
                revoked_by,
                reason,
            } => grants.revoke(grant_id, revoked_by, reason),
            LinkEvent::Rejected {
                request_id,
                code,
                message,
            } => {
                tracing::warn!(
                    request_id,
                    ?code,
                    message,
                    "the decision service refused a message"
                );
                let entry = Uuid::try_parse(&request_id)
                    .ok()
                    .and_then(|id| lock(&shared).inflight.remove(&id));
                if let Some(waiter) = entry.and_then(|entry| entry.waiter) {
                    drop(waiter.send(Err(LinkError::Rejected {
                        request_id,
                        code,
                        message,
                    })));
                }
            }
        }
    }
}

fn grant_target(request: &DecisionRequest) -> GrantTarget {
    GrantTarget {
        policy: request.request.policy.clone(),
        kind: match request.request.kind() {
            model::Kind::Exec => request_kind::EXEC,
            model::Kind::Connect => request_kind::CONNECT,
        },
        digest: request.digest,
        cgroup_id: request.kernel.cgroup_id,
        cgroup: request.request.cgroup.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        path::Path,
        time::{Duration, SystemTime},
    };

    use gatekeep_client::{AgentLinkConfig, ClientIdentity, ClientTls, ReviewClient, ReviewConfig};
    use gatekeep_common::GrantKey;
    use gatekeep_policy::GrantDuration;
    use gatekeep_server::{Server, ServerConfig, certs::Pki};
    use time::OffsetDateTime;
    use tokio::sync::watch;

    use super::*;
    use crate::{
        audit::MemorySink,
        bpf::{
            events::Origin,
            kernel::boot_time_ns,
            testing::{FakeGrants, compiled_policies},
        },
        decision::{
            Verdict, decide_by_deadline,
            grants::{self, Grants, GrantsConfig},
        },
        pause::{
            enrich::{Enrichment, ProcessInfo as LocalProcess},
            request,
        },
    };

    /// A paused exec of `argv` under policy `agents` (kernel id 3), built as the controller
    /// builds it.
    fn asked(argv: &[&str], digest: u64, timeout: Duration) -> Arc<DecisionRequest> {
        let origin = Origin {
            policy_id: 3,
            pid: 100,
            tid: 101,
            uid: 1000,
            gid: 1000,
            ppid: 1,
            cgroup_id: 42,
            ktime_ns: 0,
            digest,
            comm: "bash".into(),
        };
        let info = Enrichment {
            ancestry: vec![LocalProcess {
                pid: 100,
                comm: "bash".into(),
                exe: Some("/bin/bash".into()),
                cmdline: vec!["bash".into()],
                cgroup: Some("/agents/a1".into()),
            }],
            cwd: Some("/work".into()),
            user: Some("worker".into()),
            cgroup: Some("/agents/a1".into()),
        };
        let argv: Vec<String> = argv.iter().map(|a| (*a).to_owned()).collect();
        let first_seen = boot_time_ns();
        let request = request::approval_request(
            request::Ask {
                id: request::request_id("h1", "boot", first_seen, origin.tid, digest),
                policy: "agents",
                rule: "exec default ask",
                origin: &origin,
                info: &info,
                target: request::exec_target(Path::new("/usr/bin/git"), &argv, None),
                approval: model::ApprovalSettings {
                    grant_durations: vec![
                        GrantDuration::Once,
                        GrantDuration::Session,
                        GrantDuration::For(Duration::from_hours(1)),
                    ],
                    ..model::ApprovalSettings::default()
                },
                on_timeout: model::Verdict::Deny,
                timeout,
                first_seen_ns: first_seen,
            },
            SystemTime::now(),
            boot_time_ns(),
        );
        Arc::new(DecisionRequest {
            request,
            kernel: request::kernel_facts(&origin, None, None),
            digest,
            timeout,
            deadline: tokio::time::Instant::now() + timeout,
        })
    }

    #[test]
    fn service_decisions_map_to_verdict_actor_and_details() {
        let now = OffsetDateTime::now_utc();
        let decision = model::Decision {
            request_id: Uuid::new_v4(),
            state: RequestState::Expired,
            verdict: model::Verdict::Deny,
            decided_by: "timeout".into(),
            reason: "no decision".into(),
            decided_at: now,
            duration: GrantDuration::Once,
            grant: None,
        };
        let mapped = from_service(&decision);
        assert_eq!(mapped.verdict, Verdict::Deny);
        assert!(mapped.expired);
        assert_eq!(mapped.actor, "timeout");
        let service = mapped.service.expect("the service's outcome");
        assert_eq!(service.state, RequestState::Expired);
        assert_eq!(service.duration, "once");
        assert_eq!(service.grant_id, None);
        let approved = model::Decision {
            state: RequestState::Approved,
            verdict: model::Verdict::Allow,
            decided_by: "alice".into(),
            ..decision
        };
        let mapped = from_service(&approved);
        assert_eq!(mapped.verdict, Verdict::Allow);
        assert!(!mapped.expired);
        assert_eq!(mapped.actor, "alice");
    }

    /// A decision service on loopback, an agent's link, grants over a fake
    /// kernel map, and a reviewer.
    struct Service {
        _dir: tempfile::TempDir,
        decider: Arc<RemoteDecider>,
        kernel: Arc<FakeGrants>,
        review: ReviewClient,
        stop: Option<oneshot::Sender<()>>,
        _policies: watch::Sender<Arc<crate::policy::Compiled>>,
        _shutdown: watch::Sender<bool>,
    }

    async fn service() -> Service {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::ephemeral(&[]).expect("pki");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = Server::builder(ServerConfig {
            data_dir: dir.path().join("service"),
            ..ServerConfig::default()
        })
        .tls(pki.tls())
        .listener(listener)
        .build()
        .await
        .expect("server");
        let endpoint = server.endpoint();
        let token = server.add_reviewer("alice", &[]).await.expect("reviewer");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));
        let identity = pki.agent("h1").expect("agent cert");
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
        let kernel = Arc::new(FakeGrants::default());
        let grants = Grants::load(
            Arc::clone(&kernel),
            Arc::new(MemorySink::default()),
            GrantsConfig {
                host: "h1".into(),
                file: None,
                cgroup_root: dir.path().to_owned(),
                fresh_digests: false,
            },
            None,
        )
        .await;
        let (policies, policies_rx) =
            watch::channel(Arc::new(compiled_policies(&["agents"], &[3])));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (handle, _task) =
            grants::spawn(grants, policies_rx, shutdown_rx, Duration::from_secs(1));
        let (decider, _pump) = RemoteDecider::start(Arc::new(link), events, handle, "h1");
        let review = ReviewClient::connect(ReviewConfig {
            endpoint,
            token,
            tls: ClientTls {
                ca_pem: pki.ca.cert_pem().to_owned(),
                identity: None,
                domain: None,
            },
            connect_timeout: Duration::from_secs(5),
        })
        .await
        .expect("reviewer connects");
        Service {
            _dir: dir,
            decider: Arc::new(decider),
            kernel,
            review,
            stop: Some(stop),
            _policies: policies,
            _shutdown: shutdown,
        }
    }

    impl Drop for Service {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
        }
    }

    /// Waits until the service lists `count` pending requests; returns them.
    async fn pending(review: &mut ReviewClient, count: usize) -> Vec<model::RequestRecord> {
        let started = std::time::Instant::now();
        loop {
            let listed = review
                .list_pending(&gatekeep_client::RequestFilter::default(), 0)
                .await
                .expect("list");
            if listed.len() >= count {
                return listed;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "requests never showed up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reviewers_approval_with_a_duration_reaches_the_agent_and_its_kernel_grant() {
        let mut service = service().await;
        let decider = Arc::clone(&service.decider);
        let req = asked(&["git", "push"], 0xaa, Duration::from_mins(1));
        let deciding = tokio::spawn({
            let req = Arc::clone(&req);
            async move { decide_by_deadline(decider.as_ref(), req).await }
        });
        let listed = pending(&mut service.review, 1).await;
        let record = &listed[0];
        assert_eq!(record.host, "h1");
        assert_eq!(
            record.request, req.request,
            "the service holds the agent's request, under the agent's id"
        );
        service
            .review
            .decide_scoped(
                record.request.id,
                model::Verdict::Allow,
                "release",
                GrantDuration::For(Duration::from_hours(1)),
                model::GrantScope::Policy,
            )
            .await
            .expect("approve");
        let decision = tokio::time::timeout(Duration::from_secs(20), deciding)
            .await
            .expect("decided in time")
            .expect("task");
        assert_eq!(decision.verdict, Verdict::Allow);
        assert_eq!(decision.actor, "alice");
        assert!(!decision.expired);
        let outcome = decision.service.expect("the service's outcome");
        assert_eq!(outcome.state, RequestState::Approved);
        assert_eq!(outcome.duration, "1h");
        assert!(outcome.grant_id.is_some());
        // Installed before the verdict came back.
        let grants = service.kernel.now();
        let entry = grants
            .get(&GrantKey {
                policy_id: 3,
                kind: request_kind::EXEC,
                digest: 0xaa,
                cgroup_id: 0,
            })
            .expect("the grant is in the kernel map");
        assert_eq!(entry.cgroup_id, 0);
        assert_ne!(entry.expires_ns, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn denials_and_withdrawals_reach_the_service() {
        let mut service = service().await;
        let decider = Arc::clone(&service.decider);
        let denied = asked(&["git", "push", "--force"], 0xbb, Duration::from_mins(1));
        let deciding = tokio::spawn({
            let denied = Arc::clone(&denied);
            async move { decide_by_deadline(decider.as_ref(), denied).await }
        });
        let listed = pending(&mut service.review, 1).await;
        service
            .review
            .decide(
                listed[0].request.id,
                model::Verdict::Deny,
                "no force pushes",
                GrantDuration::Once,
            )
            .await
            .expect("deny");
        let decision = tokio::time::timeout(Duration::from_secs(20), deciding)
            .await
            .expect("decided in time")
            .expect("task");
        assert_eq!(decision.verdict, Verdict::Deny);
        assert_eq!(decision.reason, "no force pushes");
        assert!(
            service.kernel.now().is_empty(),
            "a one-off decision installs nothing"
        );

        // The task dies while waiting: the request is withdrawn.
        let decider = Arc::clone(&service.decider);
        let gone = asked(&["git", "fetch"], 0xcc, Duration::from_mins(1));
        let waiting = tokio::spawn({
            let gone = Arc::clone(&gone);
            async move { decide_by_deadline(decider.as_ref(), gone).await }
        });
        let listed = pending(&mut service.review, 1).await;
        let id = listed[0].request.id;
        assert_eq!(id, gone.id());
        waiting.abort();
        service
            .decider
            .withdraw(id, Withdrawal::TaskExited, "the task exited");
        let started = std::time::Instant::now();
        loop {
            let (record, _) = service.review.get(id).await.expect("get");
            if record.state == RequestState::Abandoned {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "never abandoned: {:?}",
                record.state
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_service_gets_the_policys_timeout_action_at_the_deadline() {
        // Bound but not listening: the port stays this test's (no other test can take it,
        // as one could after a listener is dropped) and every connection to it is refused.
        let closed = tokio::net::TcpSocket::new_v4().expect("socket");
        closed
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let endpoint = format!("https://{}", closed.local_addr().expect("addr"));
        let pki = Pki::ephemeral(&[]).expect("pki");
        let identity = pki.agent("h1").expect("agent cert");
        let (link, events) = AgentLink::start(AgentLinkConfig::new(
            endpoint,
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
        let (handle, _task) = {
            let grants = Grants::load(
                Arc::new(FakeGrants::default()),
                Arc::new(MemorySink::default()),
                GrantsConfig {
                    host: "h1".into(),
                    file: None,
                    cgroup_root: "/nonexistent".into(),
                    fresh_digests: false,
                },
                None,
            )
            .await;
            let (_p, policies) = watch::channel(Arc::new(compiled_policies(&["agents"], &[1])));
            let (_s, shutdown) = watch::channel(false);
            grants::spawn(grants, policies, shutdown, Duration::from_secs(1))
        };
        let (decider, _pump) = RemoteDecider::start(Arc::new(link), events, handle, "h1");
        let req = asked(&["git", "pull"], 1, Duration::from_millis(1500));
        let decision = decide_by_deadline(&decider, req).await;
        assert!(decision.expired, "fail closed at the deadline");
        assert_eq!(decision.verdict, Verdict::Deny);
        assert_eq!(decision.actor, "timeout");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_service_gets_the_policys_timeout_action_at_the_deadline() {
        // Fault injection (issue 24): a service that accepts connections and never answers
        // (no TLS handshake, no byte at all), as a wedged process or a black-holing proxy
        // would. Expected: the policy's timeout action at the deadline; nobody waits forever.
        let stalled = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let endpoint = format!("https://{}", stalled.local_addr().expect("addr"));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let _holder = tokio::spawn({
            let accepted = Arc::clone(&accepted);
            async move {
                let mut held = Vec::new();
                while let Ok((stream, _)) = stalled.accept().await {
                    accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    held.push(stream);
                }
            }
        });
        let pki = Pki::ephemeral(&[]).expect("pki");
        let identity = pki.agent("h1").expect("agent cert");
        let (link, events) = AgentLink::start(AgentLinkConfig::new(
            endpoint,
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
        let (handle, _task) = {
            let grants = Grants::load(
                Arc::new(FakeGrants::default()),
                Arc::new(MemorySink::default()),
                GrantsConfig {
                    host: "h1".into(),
                    file: None,
                    cgroup_root: "/nonexistent".into(),
                    fresh_digests: false,
                },
                None,
            )
            .await;
            let (_p, policies) = watch::channel(Arc::new(compiled_policies(&["agents"], &[1])));
            let (_s, shutdown) = watch::channel(false);
            grants::spawn(grants, policies, shutdown, Duration::from_secs(1))
        };
        let (decider, _pump) = RemoteDecider::start(Arc::new(link), events, handle, "h1");
        let req = asked(&["git", "pull"], 1, Duration::from_millis(1500));
        // The outer bound only guards against a hang; the deadline is 1.5 s.
        let decision =
            tokio::time::timeout(Duration::from_secs(30), decide_by_deadline(&decider, req))
                .await
                .expect("answered at the deadline, not never");
        assert!(
            accepted.load(std::sync::atomic::Ordering::SeqCst) > 0,
            "the agent reached the stalled service"
        );
        assert!(decision.expired, "fail closed at the deadline");
        assert_eq!(decision.verdict, Verdict::Deny);
        assert_eq!(decision.actor, "timeout");
    }
}
