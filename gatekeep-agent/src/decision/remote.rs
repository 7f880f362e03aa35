//! [`RemoteDecider`]: paused requests decided by the decision service
//! (`gatekeep-server`, central or embedded), over the agent's
//! [`AgentLink`].
//!
//! - Each paused request becomes an [`ApprovalRequest`] with everything the
//!   agent knows (policy, rule, cgroup, pid/tid, user, executable and argv or
//!   destination, cwd, ancestry, deadline, timeout action, approval
//!   settings). Its id is derived from the agent's own request id, so a
//!   restarted agent asking again about the same paused task re-sends the
//!   same request (the service treats ids idempotently).
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
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use gatekeep_client::{AgentLink, LinkError, LinkEvent};
use gatekeep_common::request_kind;
use gatekeep_proto::{
    limits,
    model::{
        self, ApprovalRequest, ConnectTarget, ExecTarget, Family, ProcessInfo, RequestState,
        SocketType, Target, WithdrawReason,
    },
};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::{
    bpf::kernel::boot_time_ns,
    decision::{
        DecideError, Decider, Decision, DecisionRequest, RequestDetails, RequestTarget, Verdict,
        Withdrawal,
        grants::{GrantTarget, GrantsHandle},
    },
    hooks::connect::Destination,
};

type Waiter = oneshot::Sender<Result<model::Decision, LinkError>>;

/// A request sent to the service and not decided yet.
struct Inflight {
    /// The agent's request id.
    request_id: String,
    /// Where a grant made by its decision goes.
    target: GrantTarget,
    /// The `decide` call waiting for it; `None` once that call gave up (the
    /// decision may still carry a grant worth installing).
    waiter: Option<Waiter>,
}

#[derive(Default)]
struct Shared {
    inflight: HashMap<Uuid, Inflight>,
    /// The agent's request id -> how many ids the service refused for it
    /// (reused with different content, e.g. after a restart re-enriched it).
    attempts: HashMap<String, u32>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Asks the decision service.
pub struct RemoteDecider {
    link: Arc<AgentLink>,
    shared: Arc<Mutex<Shared>>,
    host: String,
}

impl RemoteDecider {
    /// A decider over `link`; spawns the task that reads `events` (and
    /// installs grants through `grants`).
    #[must_use]
    pub fn start(
        link: Arc<AgentLink>,
        events: mpsc::UnboundedReceiver<LinkEvent>,
        grants: GrantsHandle,
        host: String,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let task = tokio::spawn(pump(events, Arc::clone(&shared), grants));
        (Self { link, shared, host }, task)
    }

    /// The service's id for the agent's request `request_id`.
    fn service_id(&self, request_id: &str, shared: &Shared) -> Uuid {
        let attempt = shared.attempts.get(request_id).copied().unwrap_or(0);
        request_uuid(&self.host, request_id, attempt)
    }
}

/// A stable UUID (version 8) for the agent's request id on `host`; `attempt`
/// > 0 gives a new one when the service refused the old.
///
/// The first 48 bits are the milliseconds (since boot) of the request's first
/// sighting, read from the controller's request id (`<first seen ns, hex>-...`);
/// the rest comes from SHA-256 of host, request id and attempt. Ids of one host
/// thus grow with time, so the service's indexes on them take appends instead of
/// random inserts (random ids cost the service a fifth more CPU per request, and
/// more as its database grows).
#[must_use]
pub fn request_uuid(host: &str, request_id: &str, attempt: u32) -> Uuid {
    let mut hash = Sha256::new();
    hash.update(b"gatekeep-agent request\0");
    hash.update(host.as_bytes());
    hash.update(b"\0");
    hash.update(request_id.as_bytes());
    hash.update(attempt.to_le_bytes());
    let digest = hash.finalize();
    let first_seen_ms = request_id
        .split('-')
        .next()
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .map_or(0, |ns| ns / 1_000_000);
    let mut bytes = [0_u8; 16];
    bytes[..6].copy_from_slice(&first_seen_ms.to_be_bytes()[2..]);
    bytes[6..].copy_from_slice(&digest[..10]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

impl Decider for RemoteDecider {
    async fn decide(&self, request: Arc<DecisionRequest>) -> Result<Decision, DecideError> {
        let (answer, id) = {
            let mut shared = lock(&self.shared);
            let id = self.service_id(&request.request_id, &shared);
            let approval = approval_request(id, &request, SystemTime::now(), boot_time_ns());
            let (waiter, answer) = oneshot::channel();
            shared.inflight.insert(
                id,
                Inflight {
                    request_id: request.request_id.clone(),
                    target: grant_target(&request),
                    waiter: Some(waiter),
                },
            );
            drop(shared);
            if let Err(err) = self.link.submit(approval) {
                lock(&self.shared).inflight.remove(&id);
                return Err(refusal(&request.request_id, err));
            }
            (answer, id)
        };
        // Dropped (deadline, task gone): stop waiting, keep the entry so a
        // late decision's grant is still installed.
        let _guard = GiveUp {
            shared: &self.shared,
            id,
        };
        let decision = match answer.await {
            Ok(Ok(decision)) => decision,
            Ok(Err(err)) => {
                if matches!(&err, LinkError::Rejected { code, .. } if *code == tonic::Code::AlreadyExists)
                {
                    // The id is taken by a different request: use a new one.
                    *lock(&self.shared)
                        .attempts
                        .entry(request.request_id.clone())
                        .or_insert(0) += 1;
                }
                return Err(refusal(&request.request_id, err));
            }
            Err(_closed) => {
                return Err(DecideError::Unreachable {
                    source: "the decision service link stopped".into(),
                });
            }
        };
        Ok(from_service(&decision))
    }

    fn reference(&self, request_id: &str) -> Option<String> {
        Some(self.service_id(request_id, &lock(&self.shared)).to_string())
    }

    fn withdraw(&self, request_id: &str, reason: Withdrawal, detail: &str) {
        let id = {
            let mut shared = lock(&self.shared);
            let id = self.service_id(request_id, &shared);
            shared.inflight.remove(&id);
            shared.attempts.remove(request_id);
            id
        };
        let reason = match reason {
            Withdrawal::TaskExited => WithdrawReason::TaskExited,
            Withdrawal::Superseded => WithdrawReason::Superseded,
        };
        let detail: String = detail.chars().take(limits::MAX_REASON / 4).collect();
        if let Err(err) = self.link.withdraw(id, reason, detail) {
            tracing::warn!(request_id, error = %err, "cannot withdraw a request");
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

fn refusal(request_id: &str, err: LinkError) -> DecideError {
    match err {
        LinkError::Closed => DecideError::Unreachable {
            source: Box::new(err),
        },
        other => DecideError::Refused {
            request_id: request_id.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// The agent's view of a service decision: its verdict, who decided
/// (reviewers, `rule:NAME`, `grant:ID`, `timeout`) and the service's record.
fn from_service(decision: &model::Decision) -> Decision {
    let verdict = match decision.verdict {
        model::Verdict::Allow => Verdict::Allow,
        model::Verdict::Deny => Verdict::Deny,
    };
    let grant = decision.grant.as_ref().map(|grant| {
        json!({
            "id": grant.id,
            "duration": grant.duration.to_string(),
            "expires_at": grant.expires_at.and_then(|at| at.format(&time::format_description::well_known::Rfc3339).ok()),
            "cgroup": grant.cgroup,
        })
    });
    Decision {
        verdict,
        actor: decision.decided_by.clone(),
        reason: decision.reason.clone(),
        expired: decision.state == RequestState::Expired,
        details: Some(json!({
            "request_id": decision.request_id,
            "state": decision.state.as_str(),
            "decided_by": decision.decided_by,
            "duration": decision.duration.to_string(),
            "grant": grant,
        })),
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
                lock(&shared).attempts.remove(&entry.request_id);
                if let Some(waiter) = entry.waiter {
                    drop(waiter.send(Ok(*decision)));
                } else {
                    tracing::info!(
                        request_id = entry.request_id,
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
    let details = &request.details;
    GrantTarget {
        policy: request.policy.clone(),
        kind: details.kind,
        digest: details.digest,
        cgroup_id: details.cgroup_id,
        cgroup: cgroup_path(details),
    }
}

fn cgroup_path(details: &RequestDetails) -> String {
    details
        .enrichment
        .cgroup
        .clone()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| format!("cgroup-id:{}", details.cgroup_id))
}

/// Cuts `text` to at most `max` bytes on a character boundary.
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Argv within the service's limits (the kernel's capture is smaller).
fn bounded_argv(argv: &[String]) -> Vec<String> {
    let mut total = 0;
    let mut out = Vec::new();
    for arg in argv.iter().take(limits::MAX_ARGS) {
        let arg = bounded(&arg.replace('\0', ""), limits::MAX_ARG);
        total += arg.len();
        if total > limits::MAX_ARGV_BYTES {
            break;
        }
        out.push(arg);
    }
    out
}

/// A name the service accepts: no control characters, trimmed, bounded;
/// `None` when nothing is left.
fn clean_name(text: &str) -> Option<String> {
    let cleaned: String = text.chars().filter(|c| !c.is_control()).collect();
    let cleaned = bounded(cleaned.trim(), limits::MAX_NAME);
    let cleaned = cleaned.trim();
    (!cleaned.is_empty()).then(|| cleaned.to_owned())
}

fn path_text(path: &Path) -> String {
    bounded(&path.to_string_lossy().replace('\0', ""), limits::MAX_PATH)
}

/// Wall-clock time at `CLOCK_BOOTTIME` `boot_ns`, given the two clocks now,
/// rounded down to the second: a restarted agent computes the same value
/// for the same paused request (the service compares re-sent requests).
fn wall_at(boot_ns: u64, now: SystemTime, boot_now: u64) -> OffsetDateTime {
    let ago = Duration::from_nanos(boot_now.saturating_sub(boot_ns));
    let at = OffsetDateTime::from(now.checked_sub(ago).unwrap_or(now));
    at.replace_nanosecond(0).unwrap_or(at)
}

/// The service's form of a paused request.
#[must_use]
pub fn approval_request(
    id: Uuid,
    request: &DecisionRequest,
    now: SystemTime,
    boot_now: u64,
) -> ApprovalRequest {
    let details = &request.details;
    let info = &details.enrichment;
    let first_seen = if details.first_seen_ns == 0 {
        boot_now
    } else {
        details.first_seen_ns
    };
    let requested_at = wall_at(first_seen, now, boot_now);
    // Rounded up to the second after the agent's own deadline: the agent
    // applies the timeout action first, and the same value comes out again
    // after a restart.
    let timeout = time::Duration::try_from(request.timeout.min(Duration::from_hours(24)))
        .unwrap_or(time::Duration::HOUR);
    let deadline = requested_at + timeout + time::Duration::SECOND;
    let target = match &details.target {
        RequestTarget::Exec { executable, argv } => {
            let executable = if executable.is_absolute() {
                path_text(executable)
            } else {
                // The cwd was unreadable: show the path as given, anchored.
                format!("/{}", path_text(executable).trim_start_matches("./"))
            };
            Target::Exec(ExecTarget {
                executable,
                argv: bounded_argv(argv),
            })
        }
        RequestTarget::Connect {
            destination,
            sock_type,
        } => Target::Connect(connect_target(destination, *sock_type)),
    };
    ApprovalRequest {
        id,
        policy: clean_name(&request.policy).unwrap_or_else(|| "unnamed".to_owned()),
        rule: clean_name(&request.rule).unwrap_or_else(|| "default".to_owned()),
        cgroup: bounded(&cgroup_path(details), limits::MAX_PATH),
        pid: details.pid,
        tid: details.tid,
        uid: details.uid,
        user_name: info.user.as_deref().and_then(clean_name),
        cwd: info.cwd.as_deref().map(path_text),
        ancestry: info
            .ancestry
            .iter()
            .take(limits::MAX_ANCESTRY)
            .map(|process| ProcessInfo {
                pid: process.pid,
                comm: bounded(&process.comm.replace('\0', ""), limits::MAX_NAME),
                executable: process.exe.as_deref().map(path_text),
                argv: bounded_argv(&process.cmdline),
                cgroup: process
                    .cgroup
                    .as_deref()
                    .map(|c| bounded(c, limits::MAX_PATH)),
            })
            .collect(),
        target,
        requested_at,
        deadline,
        on_timeout: match request.on_timeout {
            Verdict::Allow => model::Verdict::Allow,
            Verdict::Deny => model::Verdict::Deny,
        },
        approval: details.approval.clone(),
    }
}

fn connect_target(destination: &Destination, sock_type: u32) -> ConnectTarget {
    let socket_type = match sock_type {
        1 => SocketType::Stream,
        2 => SocketType::Dgram,
        3 => SocketType::Raw,
        5 => SocketType::Seqpacket,
        _ => SocketType::Other,
    };
    match destination {
        Destination::Ip { addr, port } => ConnectTarget {
            family: if addr.is_ipv4() {
                Family::Inet
            } else {
                Family::Inet6
            },
            address: addr.to_string(),
            port: *port,
            socket_type,
        },
        Destination::Unix { path } => ConnectTarget {
            family: Family::Unix,
            address: if path.is_empty() {
                "(unnamed)".to_owned()
            } else {
                bounded(&path.replace('\0', "@"), limits::MAX_PATH)
            },
            port: 0,
            socket_type,
        },
        Destination::Other { family } => ConnectTarget {
            family: Family::Unix,
            address: format!("(address family {family})"),
            port: 0,
            socket_type,
        },
    }
}

/// Whether a request kind is one the service knows.
#[must_use]
pub fn kind_name(kind: u32) -> &'static str {
    if kind == request_kind::CONNECT {
        "connect"
    } else {
        "exec"
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use gatekeep_client::{AgentLinkConfig, ClientIdentity, ClientTls, ReviewClient, ReviewConfig};
    use gatekeep_common::GrantKey;
    use gatekeep_policy::GrantDuration;
    use gatekeep_proto::v1;
    use gatekeep_server::{Server, ServerConfig, certs::Pki};
    use tokio::sync::watch;

    use super::*;
    use crate::{
        audit::MemorySink,
        bpf::testing::{FakeGrants, compiled_policies},
        decision::{
            decide_by_deadline,
            grants::{self, Grants, GrantsConfig},
        },
        pause::enrich::{Enrichment, ProcessInfo as LocalProcess},
    };

    fn request(target: RequestTarget, kind: u32) -> DecisionRequest {
        DecisionRequest {
            request_id: "1f-100-00000000000000aa".into(),
            kind: kind_name(kind),
            policy: "agents".into(),
            rule: "exec default ask".into(),
            context: json!({}),
            timeout: Duration::from_mins(5),
            on_timeout: Verdict::Deny,
            deadline: tokio::time::Instant::now(),
            details: RequestDetails {
                pid: 100,
                tid: 101,
                uid: 1000,
                policy_id: 3,
                kind,
                digest: 0xaa,
                cgroup_id: 42,
                first_seen_ns: 5_000_000_000,
                enrichment: Enrichment {
                    ancestry: vec![LocalProcess {
                        pid: 100,
                        comm: "bash".into(),
                        exe: Some("/bin/bash".into()),
                        cmdline: vec!["bash".into(), "-c".into(), "curl x".into()],
                        cgroup: Some("/agents/a1".into()),
                    }],
                    cwd: Some("/work".into()),
                    user: Some("worker".into()),
                    cgroup: Some("/agents/a1".into()),
                },
                target,
                approval: model::ApprovalSettings {
                    grant_durations: vec![GrantDuration::Once, GrantDuration::Session],
                    ..model::ApprovalSettings::default()
                },
            },
        }
    }

    /// Through the wire form and back, as the link and the service check it.
    fn valid(request: ApprovalRequest) -> ApprovalRequest {
        ApprovalRequest::try_from(v1::ApprovalRequest::from(request))
            .expect("the service accepts it")
    }

    #[test]
    fn an_exec_becomes_a_valid_approval_request_with_its_context() {
        let req = request(
            RequestTarget::Exec {
                executable: "/usr/bin/curl".into(),
                argv: vec!["curl".into(), "https://example.org".into()],
            },
            request_kind::EXEC,
        );
        let now = SystemTime::UNIX_EPOCH
            + Duration::from_secs(1_700_000_000)
            + Duration::from_millis(700);
        let id = request_uuid("h", &req.request_id, 0);
        let approval = valid(approval_request(id, &req, now, 7_000_000_000));
        assert_eq!(approval.id, id);
        assert_eq!(approval.policy, "agents");
        assert_eq!(approval.rule, "exec default ask");
        assert_eq!(approval.cgroup, "/agents/a1");
        assert_eq!((approval.pid, approval.tid, approval.uid), (100, 101, 1000));
        assert_eq!(approval.user_name.as_deref(), Some("worker"));
        assert_eq!(approval.cwd.as_deref(), Some("/work"));
        assert_eq!(approval.ancestry[0].argv, ["bash", "-c", "curl x"]);
        assert_eq!(
            approval.target.to_string(),
            "/usr/bin/curl curl https://example.org"
        );
        // First seen 2 s before `now`, rounded down to the second.
        assert_eq!(approval.requested_at.unix_timestamp(), 1_699_999_998);
        assert_eq!(approval.requested_at.nanosecond(), 0);
        assert_eq!(
            approval.deadline - approval.requested_at,
            time::Duration::seconds(301)
        );
        assert_eq!(approval.on_timeout, model::Verdict::Deny);
        assert!(approval.approval.allows(GrantDuration::Session));

        // The same paused request seen again a moment later (a restarted
        // agent): the very same request.
        let later = now + Duration::from_millis(150);
        let again = valid(approval_request(id, &req, later, 7_150_000_000));
        assert_eq!(again, approval);
    }

    #[test]
    fn a_connect_becomes_a_valid_approval_request() {
        let req = request(
            RequestTarget::Connect {
                destination: Destination::Ip {
                    addr: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
                    port: 443,
                },
                sock_type: 1,
            },
            request_kind::CONNECT,
        );
        let approval = valid(approval_request(
            Uuid::new_v4(),
            &req,
            SystemTime::now(),
            boot_time_ns().max(6_000_000_000),
        ));
        assert_eq!(approval.target.to_string(), "10.1.2.3:443");
        let unix = request(
            RequestTarget::Connect {
                destination: Destination::Unix {
                    path: String::new(),
                },
                sock_type: 1,
            },
            request_kind::CONNECT,
        );
        valid(approval_request(
            Uuid::new_v4(),
            &unix,
            SystemTime::now(),
            6_000_000_000,
        ));
    }

    #[test]
    fn oversized_and_odd_fields_are_bounded_not_refused() {
        let mut req = request(
            RequestTarget::Exec {
                executable: "tool".into(),
                argv: (0..400)
                    .map(|i| format!("{i}{}", "x".repeat(200)))
                    .collect(),
            },
            request_kind::EXEC,
        );
        req.rule = format!("exec {} ask", "/very/long".repeat(100));
        req.details.enrichment.user = Some(" \u{7}".into());
        req.details.enrichment.cgroup = None;
        let approval = valid(approval_request(
            Uuid::new_v4(),
            &req,
            SystemTime::now(),
            6_000_000_000,
        ));
        assert!(approval.rule.len() <= limits::MAX_NAME);
        assert_eq!(approval.user_name, None);
        assert_eq!(approval.cgroup, "cgroup-id:42");
        let Target::Exec(exec) = &approval.target else {
            panic!("exec")
        };
        assert_eq!(exec.executable, "/tool");
        assert!(exec.argv.len() <= limits::MAX_ARGS);
    }

    #[test]
    fn request_ids_are_stable_per_host_request_and_attempt() {
        let a = request_uuid("h", "r1", 0);
        assert_eq!(a, request_uuid("h", "r1", 0));
        assert_ne!(a, request_uuid("h", "r1", 1));
        assert_ne!(a, request_uuid("h2", "r1", 0));
        assert_ne!(a, request_uuid("h", "r2", 0));
        assert_eq!(a.get_version_num(), 8);
    }

    #[test]
    fn request_ids_grow_with_the_time_of_the_request() {
        // `<first seen ns, hex>-<tid>-<digest>`, as the controller makes them.
        let id =
            |ns: u64, tid: u32| request_uuid("h", &format!("{ns:x}-{tid}-00000000000000ab"), 0);
        let (early, late) = (id(5_000_000_000, 900), id(5_001_000_000, 17));
        assert!(early.to_string() < late.to_string(), "{early} < {late}");
        assert!(early < late);
        assert_ne!(
            id(5_000_000_000, 1),
            id(5_000_000_000, 2),
            "same millisecond, other request"
        );
        assert_eq!(&late.as_bytes()[..6], &5_001_u64.to_be_bytes()[2..]);
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
        let details = mapped.details.expect("details");
        assert_eq!(details["state"], "expired");
        assert_eq!(details["request_id"], decision.request_id.to_string());
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
        let (decider, _pump) = RemoteDecider::start(Arc::new(link), events, handle, "h1".into());
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

    fn asked(
        request_id: &str,
        argv: &[&str],
        digest: u64,
        timeout: Duration,
    ) -> Arc<DecisionRequest> {
        let mut req = request(
            RequestTarget::Exec {
                executable: "/usr/bin/git".into(),
                argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            },
            request_kind::EXEC,
        );
        req.request_id = request_id.to_owned();
        req.details.digest = digest;
        req.details.first_seen_ns = boot_time_ns();
        req.details
            .approval
            .grant_durations
            .push(GrantDuration::For(Duration::from_hours(1)));
        req.timeout = timeout;
        req.deadline = tokio::time::Instant::now() + timeout;
        Arc::new(req)
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
        let req = asked("r-approve", &["git", "push"], 0xaa, Duration::from_mins(1));
        let deciding = tokio::spawn({
            let req = Arc::clone(&req);
            async move { decide_by_deadline(decider.as_ref(), req).await }
        });
        let listed = pending(&mut service.review, 1).await;
        let record = &listed[0];
        assert_eq!(record.host, "h1");
        assert_eq!(record.request.id, request_uuid("h1", "r-approve", 0));
        assert_eq!(
            service.decider.reference("r-approve"),
            Some(record.request.id.to_string()),
            "the agent's audit names the service's id"
        );
        assert_eq!(record.request.target.to_string(), "/usr/bin/git git push");
        service
            .review
            .decide(
                record.request.id,
                model::Verdict::Allow,
                "release",
                GrantDuration::For(Duration::from_hours(1)),
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
        let details = decision.details.expect("details");
        assert_eq!(details["state"], "approved");
        assert_eq!(details["grant"]["duration"], "1h");
        // Installed before the verdict came back.
        let grants = service.kernel.now();
        let entry = grants
            .get(&GrantKey {
                policy_id: 3,
                kind: request_kind::EXEC,
                digest: 0xaa,
            })
            .expect("the grant is in the kernel map");
        assert_eq!(entry.cgroup_id, 0);
        assert_ne!(entry.expires_ns, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn denials_and_withdrawals_reach_the_service() {
        let mut service = service().await;
        let decider = Arc::clone(&service.decider);
        let denied = asked(
            "r-deny",
            &["git", "push", "--force"],
            0xbb,
            Duration::from_mins(1),
        );
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
        let gone = asked("r-gone", &["git", "fetch"], 0xcc, Duration::from_mins(1));
        let waiting = tokio::spawn({
            let gone = Arc::clone(&gone);
            async move { decide_by_deadline(decider.as_ref(), gone).await }
        });
        let listed = pending(&mut service.review, 1).await;
        let id = listed[0].request.id;
        waiting.abort();
        service
            .decider
            .withdraw("r-gone", Withdrawal::TaskExited, "the task exited");
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
        let (decider, _pump) = RemoteDecider::start(Arc::new(link), events, handle, "h1".into());
        let req = asked("r-down", &["git", "pull"], 1, Duration::from_millis(1500));
        let decision = decide_by_deadline(&decider, req).await;
        assert!(decision.expired, "fail closed at the deadline");
        assert_eq!(decision.verdict, Verdict::Deny);
        assert_eq!(decision.actor, "timeout");
    }
}
