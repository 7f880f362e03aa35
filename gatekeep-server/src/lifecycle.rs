//! The request lifecycle: `pending` -> `approved` | `denied` | `expired` | `cancelled` |
//! `abandoned`, with every transition stored (through [`Store`], version-checked) and audited
//! (hash-chained, through [`gatekeep_audit`]).
//!
//! - A request arrives from an agent ([`Engine::submit`]). A standing grant, then a server
//!   rule, may decide it at once; otherwise it waits for reviewers. Re-sending the same id is
//!   idempotent: the stored request is kept, and a decided one is answered again.
//! - Reviewers approve or deny ([`Engine::decide`]). A denial is final at once; approvals
//!   count towards `approvals_required` distinct reviewers, never the workload's owner, and
//!   the quorum grants the most restrictive duration and the narrowest scope its members
//!   chose (one reviewer's `workload` makes the grant `workload`, whatever the others chose).
//! - The service's deadline is the agent's, or sooner by the service's own copy of the
//!   policy; at the deadline the policy's `on_timeout` applies ([`Engine::expire_due`], run by
//!   [`Engine::run_timer`]).
//! - Reviewers cancel (the action is denied); agents withdraw (`abandoned`: the task died or
//!   asked something else).
//!
//! Every final decision is pushed to the agent's stream and every change to watchers.

use std::{
    borrow::Cow,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use gatekeep_audit::{AuditError, AuditWriter, EncodedRecord, RecordKind};
use gatekeep_policy::PolicySet;
use gatekeep_proto::{
    GrantDuration,
    audit::{self as payload, Schema},
    limits,
    model::{
        ApprovalRequest, ApprovalSettings, Decision, Grant, GrantScope, RequestRecord,
        RequestState, Revocation, Verdict, Vote, WithdrawReason,
    },
    v1,
};
use time::OffsetDateTime;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{
    audit_log::AuditLog,
    audit_records::{outcome_records, requested_record},
    auth::{self, Reviewer},
    error::Error,
    failpoint, grants,
    hub::Hub,
    metrics::Metrics,
    rules::Rules,
    store::{AdmissionQuery, GrantQuery, Inserted, RequestQuery, Store, Transition, Versioned},
};

/// How often a transition is retried when another writer changed the request meanwhile.
const MAX_ATTEMPTS: usize = 16;
/// Longest sleep of the timer between checks (it also wakes for every new deadline).
const MAX_TIMER_SLEEP: Duration = Duration::from_secs(30);
/// Requests expired per store call.
const EXPIRE_BATCH: usize = 256;

/// What the service decides with; shared by the API handlers and the timer.
pub struct Engine {
    pub(crate) store: Arc<dyn Store>,
    audit: Arc<AuditWriter>,
    pub(crate) hub: Hub,
    rules: Rules,
    policies: Option<PolicySet>,
    /// Host name of the service's own audit records.
    name: String,
    history_limit: usize,
    wake: Notify,
    pub(crate) shutdown: CancellationToken,
    pub(crate) started_at: OffsetDateTime,
    /// New requests being stored now.
    storing: AtomicUsize,
    /// Where the audit chain can be read (status, verify, export).
    pub(crate) audit_log: AuditLog,
    pub(crate) metrics: Arc<Metrics>,
    /// Requests whose records were queued: once they are durable, the store's
    /// [`audit_owed`](crate::store::Store::audit_owed) entry goes (see
    /// [`Engine::run_audit_recovery`]).
    owed: mpsc::UnboundedSender<Uuid>,
    owed_queue: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Uuid>>>,
}

impl Engine {
    /// The service's host name (in its audit records, and naming it to other replicas).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What [`Engine::submit`] did with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Waiting for reviewers.
    Pending,
    /// Decided without a reviewer; the decision went to `early`.
    Delivered(Decision),
    /// Decided (now, or before for a re-sent id): the decision, to deliver.
    Decided(Decision),
}

/// Requests being stored at once from which automatic decisions are delivered only after
/// their commit (see [`Engine::submit`]).
pub const EARLY_ANSWER_LIMIT: usize = 32;

/// Counts a request being stored for as long as it lives.
struct Storing<'a>(&'a AtomicUsize);

impl<'a> Storing<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Storing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What happened to a request, for the audit and the fan-out.
enum Outcome {
    /// The request left pending.
    Final(Box<Decision>),
    /// An approval was recorded; the quorum is not reached yet.
    Vote(Vote),
}

/// The arguments of [`Engine::new`].
pub(crate) struct EngineParts {
    pub store: Arc<dyn Store>,
    pub audit: Arc<AuditWriter>,
    pub audit_log: AuditLog,
    pub rules: Rules,
    pub policies: Option<PolicySet>,
    pub name: String,
    pub history_limit: usize,
    pub metrics: Arc<Metrics>,
}

impl Engine {
    pub(crate) fn new(parts: EngineParts) -> Self {
        let (owed, owed_queue) = mpsc::unbounded_channel();
        Self {
            owed,
            owed_queue: std::sync::Mutex::new(Some(owed_queue)),
            store: parts.store,
            audit: parts.audit,
            audit_log: parts.audit_log,
            hub: Hub::new(),
            rules: parts.rules,
            policies: parts.policies,
            name: parts.name,
            history_limit: parts.history_limit,
            wake: Notify::new(),
            shutdown: CancellationToken::new(),
            started_at: OffsetDateTime::now_utc(),
            storing: AtomicUsize::new(0),
            metrics: parts.metrics,
        }
    }

    /// The queue of requests whose records were queued, for the one
    /// [`run_audit_recovery`](Self::run_audit_recovery) task.
    pub(crate) fn take_owed_queue(&self) -> Option<mpsc::UnboundedReceiver<Uuid>> {
        self.owed_queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// The audit writer (flushed and shut down by the server at the end).
    pub(crate) fn audit(&self) -> &Arc<AuditWriter> {
        &self.audit
    }

    /// Queues a record whose payload was encoded straight from its type
    /// ([`gatekeep_proto::audit`]).
    async fn record_encoded(&self, record: Result<EncodedRecord, AuditError>) {
        let queued = match record {
            Ok(record) => self.audit.submit_encoded_async(record).await,
            Err(error) => Err(error),
        };
        if let Err(error) = queued {
            tracing::error!(%error, "failed to queue an audit record");
        }
    }

    /// Applies the service's own policy (when it loaded policies) to a request: its approval
    /// settings replace the agent's (keeping the agent's declared owners), its timeout
    /// action applies, and its timeout can only shorten the deadline.
    fn authoritative(
        &self,
        mut request: ApprovalRequest,
        now: OffsetDateTime,
    ) -> Result<(ApprovalRequest, OffsetDateTime), Error> {
        let mut deadline = request.deadline;
        if let Some(policies) = &self.policies {
            let policy = policies
                .policy(&request.policy)
                .ok_or_else(|| Error::UnknownPolicy {
                    policy: request.policy.clone(),
                })?;
            let owners = std::mem::take(&mut request.approval.owners);
            request.approval = ApprovalSettings {
                owners,
                ..ApprovalSettings::from_policy(&policy.approval)
            };
            // A truncated argv is approved by a reviewer or not at all: its deadline denies.
            request.on_timeout = if request.target.argv_truncated() {
                Verdict::Deny
            } else {
                Verdict::from_policy(policy.approval.on_timeout)
            };
            if let Ok(timeout) = time::Duration::try_from(policy.approval.timeout) {
                deadline = deadline.min(now + timeout);
            }
        }
        Ok((request, deadline.min(now + limits::MAX_TIMEOUT)))
    }

    /// A request from the agent on `host`.
    ///
    /// A decision that needs no reviewer (a standing grant, a server rule, a deadline already
    /// past) is handed to `early` as soon as it is made, before the request is stored, unless
    /// [`EARLY_ANSWER_LIMIT`] requests are being stored already: it follows from what the
    /// service keeps (its rules and grants), the agent records it durably on its side, and a
    /// `synchronous = full` commit would add the disk's fsync to every automatic answer.
    /// Storing and auditing follow, and `submit` returns once they are done, so callers keep
    /// their back-pressure. A reviewer's decision is never delivered before it is stored (see
    /// [`decide`](Self::decide)).
    ///
    /// Returns [`Submitted::Decided`] for a decision still to deliver (made now but not given
    /// to `early`, or stored earlier for a re-sent id), [`Submitted::Delivered`] when `early`
    /// had it, and [`Submitted::Pending`] while it waits for reviewers.
    pub async fn submit(
        &self,
        host: &str,
        request: ApprovalRequest,
        early: impl FnOnce(&Decision) + Send,
    ) -> Result<Submitted, Error> {
        let span = request_span(request.id);
        self.submit_traced(host, request, early)
            .instrument(span)
            .await
    }

    async fn submit_traced(
        &self,
        host: &str,
        request: ApprovalRequest,
        early: impl FnOnce(&Decision) + Send,
    ) -> Result<Submitted, Error> {
        let now = OffsetDateTime::now_utc();
        let (request, deadline) = self.authoritative(request, now)?;
        let mut record = RequestRecord {
            approvals_required: request.approval.approvals_required,
            request,
            host: host.to_owned(),
            state: RequestState::Pending,
            received_at: now,
            deadline,
            approvals: Vec::new(),
            decision: None,
        };
        let admission = self
            .store
            .admission(AdmissionQuery {
                id: record.request.id,
                host: record.host.clone(),
                policy: record.request.policy.clone(),
                target: record.request.target.clone(),
                cgroup: record.request.cgroup.clone(),
                now,
            })
            .await?;
        if let Some(existing) = admission.existing {
            return self.resent(host, &record.request, existing).await;
        }
        let decision = self.auto_decide(&record, admission.grant, now);
        let mut delivered = false;
        if let Some(decision) = &decision {
            record.state = decision.state;
            record.decision = Some(decision.clone());
            // Early while the store keeps up; under load after the commit, so that answers
            // leave in groups and agents feel the store's pace (their in-flight requests
            // then bound the work queued here).
            if self.storing.load(Ordering::Relaxed) < EARLY_ANSWER_LIMIT {
                early(decision);
                delivered = true;
            }
        }
        let inserted = {
            let _storing = Storing::enter(&self.storing);
            // A pending request's record is durable before the request is stored, that is
            // before any replica shows it to a reviewer or finds it when the agent re-sends
            // it: a replica that dies in between leaves the record without the request, and
            // whoever stores it on the re-send does not record it again
            // (`once_per_request`). An automatic decision keeps its early answer (see
            // above): its record is queued ahead of the request's storing and decision, not
            // waited for; a re-send after a crash writes it once if it was lost.
            self.record_requested(&record, decision.is_none()).await?;
            self.store.insert_request(record.clone()).await?
        };
        match inserted {
            Inserted::Existing(existing) => {
                if decision.is_some() {
                    // Only an agent re-sending the same request gets here (other uses of the id
                    // were refused above); it got the same automatic answer already.
                    tracing::warn!(id = %record.request.id, "a request was stored twice at once");
                }
                self.resent(host, &record.request, *existing).await
            }
            Inserted::New => {
                tracing::info!(
                    host,
                    kind = record.request.kind().as_str(),
                    policy = record.request.policy,
                    "request received"
                );
                self.metrics
                    .request_received(record.request.kind(), &record.request.policy);
                if let Some(decision) = &decision {
                    failpoint::hit(failpoint::AUTOMATIC_DECISION_STORED);
                    self.audit_final(&record, decision).await;
                } else {
                    self.wake.notify_one();
                }
                self.hub.publish(&record);
                Ok(match decision {
                    Some(decision) if delivered => Submitted::Delivered(decision),
                    Some(decision) => Submitted::Decided(decision),
                    None => Submitted::Pending,
                })
            }
        }
    }

    /// A re-sent id: the same request from the same host is answered with its state; anything
    /// else reusing the id (another host, or another action) is refused.
    ///
    /// "The same request" is the same paused action: policy, target, task and cgroup (an
    /// agent's id already hashes the time of the pause). The context the agent gathered
    /// around it (ancestry, cwd, user name, its rounding of the request time) may differ when
    /// an agent restarted and asks again about a task that stayed paused; the stored one
    /// stands.
    ///
    /// The stored request's `requested` record is written if the chain lacks it (at most
    /// once): a service that stored requests before their record was durable (an older
    /// build) may have died in between.
    async fn resent(
        &self,
        host: &str,
        request: &ApprovalRequest,
        existing: Versioned<RequestRecord>,
    ) -> Result<Submitted, Error> {
        let existing = existing.value;
        let stored = &existing.request;
        let same = existing.host == host
            && stored.policy == request.policy
            && stored.target == request.target
            && stored.pid == request.pid
            && stored.tid == request.tid
            && stored.uid == request.uid
            && stored.cgroup == request.cgroup;
        if !same {
            tracing::warn!(
                id = %request.id,
                host,
                stored_host = existing.host,
                "a request id was sent again for a different action; refused"
            );
            return Err(Error::IdReused { id: request.id });
        }
        self.record_requested(&existing, true).await?;
        Ok(existing
            .decision
            .map_or(Submitted::Pending, Submitted::Decided))
    }

    /// Writes `record`'s `requested` record, unless the chain holds it already, and with
    /// `durable` waits until it is durable. A request whose record cannot be written is
    /// refused (the agent keeps it and asks again, or applies its timeout action): nothing
    /// is shown to a reviewer that the audit does not hold.
    async fn record_requested(&self, record: &RequestRecord, durable: bool) -> Result<(), Error> {
        let encoded = requested_record(record, false).map_err(|source| Error::Audit { source })?;
        self.audit
            .submit_encoded_async(encoded)
            .await
            .map_err(|source| Error::Audit { source })?;
        if durable {
            self.audit
                .flush_async()
                .await
                .map_err(|source| Error::Audit { source })?;
        }
        Ok(())
    }

    /// A decision without a reviewer: the standing `grant` that covers the request, a
    /// server rule, or a deadline already past.
    fn auto_decide(
        &self,
        record: &RequestRecord,
        grant: Option<Grant>,
        now: OffsetDateTime,
    ) -> Option<Decision> {
        let request = &record.request;
        let decision =
            |verdict: Verdict, state: Option<RequestState>, by: String, reason: String| Decision {
                request_id: request.id,
                state: state.unwrap_or(match verdict {
                    Verdict::Allow => RequestState::Approved,
                    Verdict::Deny => RequestState::Denied,
                }),
                verdict,
                decided_by: by,
                reason,
                decided_at: now,
                duration: GrantDuration::Once,
                grant: None,
            };
        // A truncated exec's argv is only a prefix of what runs: no standing grant allows it
        // (it would allow whatever follows the prefix); a reviewer decides each one.
        let truncated = request.target.argv_truncated();
        if let Some(grant) = grant.filter(|g| !(truncated && g.verdict == Verdict::Allow)) {
            return Some(decision(
                grant.verdict,
                None,
                format!("grant:{}", grant.id),
                format!(
                    "standing grant ({}, scope {}) by {}",
                    grant.duration, grant.scope, grant.created_by
                ),
            ));
        }
        if let Some((rule, verdict)) = self.rules.decide(&record.host, request) {
            return Some(decision(
                verdict,
                None,
                format!("rule:{rule}"),
                format!("server rule `{rule}` says {verdict}"),
            ));
        }
        if record.deadline <= now {
            return Some(Self::expiry(record, now));
        }
        None
    }

    fn expiry(record: &RequestRecord, now: OffsetDateTime) -> Decision {
        let waited = record.deadline - record.received_at;
        Decision {
            request_id: record.request.id,
            state: RequestState::Expired,
            verdict: record.request.on_timeout,
            decided_by: "timeout".to_owned(),
            reason: format!(
                "no decision within {}; policy `{}` says {} on timeout",
                humantime::format_duration(Duration::from_millis(
                    u64::try_from(waited.whole_milliseconds()).unwrap_or(0)
                )),
                record.request.policy,
                record.request.on_timeout
            ),
            decided_at: now,
            duration: GrantDuration::Once,
            grant: None,
        }
    }

    /// Logs and counts a request's outcome and queues its records (the outcome, and the
    /// grant it made); once they are durable, the store's entry for them goes.
    async fn audit_final(&self, record: &RequestRecord, decision: &Decision) {
        let waited = decision.decided_at - record.received_at;
        tracing::info!(
            state = decision.state.as_str(),
            decided_by = decision.decided_by,
            policy = record.request.policy,
            wait_ms = u64::try_from(waited.whole_milliseconds()).unwrap_or(0),
            "request decided"
        );
        self.metrics.request_decided(
            record.request.kind(),
            &record.request.policy,
            decision,
            waited.as_seconds_f64(),
        );
        for encoded in outcome_records(record, decision, false) {
            self.record_encoded(encoded).await;
        }
        // The recovery task takes it from the store once the records are durable; it waits
        // for nothing else, so a closed task only leaves the entry for the next start.
        let _ = self.owed.send(record.request.id);
    }

    /// Reads, changes and writes back a pending request, retrying when another writer got
    /// there first. `change` returns what happened and the grant to store with it.
    async fn transition(
        &self,
        id: Uuid,
        mut change: impl FnMut(&mut RequestRecord) -> Result<(Outcome, Option<Grant>), Error>,
    ) -> Result<(RequestRecord, Outcome), Error> {
        for _ in 0..MAX_ATTEMPTS {
            let Versioned { version, value } = self
                .store
                .get_request(id)
                .await?
                .ok_or(Error::UnknownRequest { id })?;
            let mut record = value;
            if record.state.is_final() {
                return Err(Error::NotPending {
                    id,
                    state: record.state,
                });
            }
            let (outcome, new_grant) = change(&mut record)?;
            if let Outcome::Final(decision) = &outcome {
                record.state = decision.state;
                record.decision = Some((**decision).clone());
            }
            let applied = self
                .store
                .transition(Transition {
                    record: record.clone(),
                    expected_version: version,
                    new_grant,
                })
                .await?;
            if applied {
                if matches!(outcome, Outcome::Final(_)) {
                    failpoint::hit(failpoint::DECISION_STORED);
                }
                return Ok((record, outcome));
            }
        }
        Err(Error::Store {
            source: crate::store::StoreError::Corrupt {
                message: format!("request `{id}` kept changing under a transition"),
            },
        })
    }

    /// After a transition: audit it, tell the agent and the watchers. An outcome's records
    /// are durable before this replica delivers it or answers the reviewer (when they cannot
    /// be written, it is delivered anyway: the decision is stored, other replicas deliver it
    /// too, and the store keeps it owed until the records are written).
    async fn after(&self, record: &RequestRecord, outcome: &Outcome, deliver: bool) {
        match outcome {
            Outcome::Final(decision) => {
                self.audit_final(record, decision).await;
                self.durable().await;
                if deliver {
                    self.hub.send(
                        &record.host,
                        v1::server_message::Message::Decision((**decision).clone().into()),
                    );
                }
            }
            Outcome::Vote(vote) => {
                tracing::info!(
                    reviewer = vote.reviewer,
                    approvals = record.approvals.len(),
                    required = record.approvals_required,
                    "approval recorded"
                );
                let wait_ms = (vote.at - record.received_at).whole_milliseconds();
                let payload = payload::Outcome {
                    schema: Schema::default(),
                    policy: Some(Cow::Borrowed(&record.request.policy)),
                    kind: record.request.kind(),
                    target: Some(Cow::Borrowed(&record.request.target)),
                    state: RequestState::Pending,
                    verdict: Some(Verdict::Allow),
                    reason: Cow::Borrowed(&vote.reason),
                    cause: None,
                    detail: None,
                    duration: Some(vote.duration.to_string()),
                    approvals: Some(Cow::Borrowed(&record.approvals)),
                    approvals_required: Some(record.approvals_required),
                    grant_id: None,
                    wait_ms: u64::try_from(wait_ms).unwrap_or(0),
                    is_final: false,
                    pid: None,
                    tid: None,
                    digest: None,
                    comm: None,
                };
                self.record_encoded(
                    EncodedRecord::new(RecordKind::Decided, &record.host, &payload).map(
                        |encoded| {
                            encoded
                                .with_request_id(record.request.id.to_string())
                                .with_actor(&vote.reviewer)
                                .with_at(vote.at)
                        },
                    ),
                )
                .await;
            }
        }
        self.hub.publish(record);
    }

    pub(crate) fn authorise(reviewer: &Reviewer, record: &RequestRecord) -> Result<(), Error> {
        let groups = &record.request.approval.reviewer_groups;
        if reviewer.may_review(groups) {
            Ok(())
        } else {
            Err(Error::permission(format!(
                "reviewer `{}` is not in a reviewer group of policy `{}` (needs one of: {})",
                reviewer.name,
                record.request.policy,
                groups.join(", ")
            )))
        }
    }

    /// The one request whose id starts with `text` (see [`gatekeep_proto::id`]): a reviewer
    /// may type any unique prefix of an id, of a pending request or a past one.
    pub async fn resolve_request_id(&self, text: &str) -> Result<Uuid, Error> {
        /// Candidates named in an "ambiguous" error, at most.
        const CANDIDATES: usize = 11;
        let prefix = gatekeep_proto::id::normalize_prefix(text)?;
        let ids = self
            .store
            .request_ids_with_prefix(prefix, CANDIDATES)
            .await?;
        Ok(gatekeep_proto::id::resolve_prefix(text, "request", ids)?)
    }

    /// A reviewer approves or denies a pending request.
    pub async fn decide(
        &self,
        reviewer: &Reviewer,
        id: Uuid,
        verdict: Verdict,
        reason: String,
        duration: GrantDuration,
        scope: GrantScope,
    ) -> Result<RequestRecord, Error> {
        self.decide_traced(reviewer, id, verdict, reason, duration, scope)
            .instrument(request_span(id))
            .await
    }

    async fn decide_traced(
        &self,
        reviewer: &Reviewer,
        id: Uuid,
        verdict: Verdict,
        reason: String,
        duration: GrantDuration,
        scope: GrantScope,
    ) -> Result<RequestRecord, Error> {
        // Set when the reviewer owns the workload: the refusal is audited and counted.
        let mut self_approval: Option<RequestRecord> = None;
        let decided = self
            .transition(id, |record| {
                Self::authorise(reviewer, record)?;
                no_grant(record, verdict, duration)?;
                duration_allowed(record, duration)?;
                reason_given(record, verdict, &reason)?;
                let now = OffsetDateTime::now_utc();
                match verdict {
                    Verdict::Deny => {
                        let grant =
                            grants::from_decision(record, Verdict::Deny, duration, scope, &reviewer.name, now);
                        Ok((
                            Outcome::Final(Box::new(Decision {
                                request_id: id,
                                state: RequestState::Denied,
                                verdict,
                                decided_by: reviewer.name.clone(),
                                reason: reason.clone(),
                                decided_at: now,
                                duration,
                                grant: grant.clone(),
                            })),
                            grant,
                        ))
                    }
                    Verdict::Allow => {
                        if auth::is_owner(reviewer, record) {
                            self_approval = Some(record.clone());
                            return Err(Error::permission(format!(
                                "`{}` owns the workload that asked (or is its agent) and cannot approve its own request",
                                reviewer.name
                            )));
                        }
                        if record.approvals.iter().any(|vote| reviewer.same_person(&vote.reviewer)) {
                            return Err(Error::AlreadyVoted {
                                id,
                                reviewer: reviewer.name.clone(),
                            });
                        }
                        let vote = Vote {
                            reviewer: reviewer.name.clone(),
                            reason: reason.clone(),
                            duration,
                            scope,
                            at: now,
                        };
                        record.approvals.push(vote.clone());
                        let votes = u32::try_from(record.approvals.len()).unwrap_or(u32::MAX);
                        if votes < record.approvals_required {
                            return Ok((Outcome::Vote(vote), None));
                        }
                        let duration =
                            grants::most_restrictive(record.approvals.iter().map(|v| v.duration));
                        let scope =
                            GrantScope::narrowest(record.approvals.iter().map(|v| v.scope));
                        let decided_by = record
                            .approvals
                            .iter()
                            .map(|v| v.reviewer.as_str())
                            .collect::<Vec<_>>()
                            .join(",");
                        let grant =
                            grants::from_decision(record, Verdict::Allow, duration, scope, &decided_by, now);
                        let reason = record
                            .approvals
                            .iter()
                            .filter(|v| !v.reason.is_empty())
                            .map(|v| v.reason.as_str())
                            .collect::<Vec<_>>()
                            .join("; ");
                        Ok((
                            Outcome::Final(Box::new(Decision {
                                request_id: id,
                                state: RequestState::Approved,
                                verdict,
                                decided_by,
                                reason,
                                decided_at: now,
                                duration,
                                grant: grant.clone(),
                            })),
                            grant,
                        ))
                    }
                }
            })
            .await;
        let (record, outcome) = match (decided, self_approval) {
            (Err(error), Some(record)) => {
                self.self_approval_refused(reviewer, &record, &error).await;
                return Err(error);
            }
            (decided, _) => decided?,
        };
        self.after(&record, &outcome, true).await;
        Ok(record)
    }

    /// Audits and counts an approval refused because `reviewer` owns the workload.
    async fn self_approval_refused(
        &self,
        reviewer: &Reviewer,
        record: &RequestRecord,
        error: &Error,
    ) {
        tracing::warn!(reviewer = reviewer.name, "self-approval refused");
        self.metrics.approval_refused(&record.request.policy);
        let reason = error.to_string();
        let payload = payload::ApprovalRefused {
            schema: Schema::default(),
            policy: Cow::Borrowed(&record.request.policy),
            kind: record.request.kind(),
            cause: Cow::Borrowed("self_approval"),
            reason: Cow::Borrowed(&reason),
        };
        self.record_encoded(
            EncodedRecord::new(RecordKind::ApprovalRefused, &record.host, &payload).map(
                |encoded| {
                    encoded
                        .with_request_id(record.request.id.to_string())
                        .with_actor(&reviewer.name)
                },
            ),
        )
        .await;
    }

    /// Waits until every record queued so far is durable; a failure is logged (the records
    /// stay held by the writer, and owed in the store).
    async fn durable(&self) {
        if let Err(error) = self.audit.flush_async().await {
            tracing::error!(%error, "audit records of a decision are not durable yet");
        }
    }

    /// A reviewer withdraws a pending request; the paused action is denied.
    pub async fn cancel(
        &self,
        reviewer: &Reviewer,
        id: Uuid,
        reason: String,
    ) -> Result<RequestRecord, Error> {
        let span = request_span(id);
        let (record, outcome) = self
            .transition(id, |record| {
                Self::authorise(reviewer, record)?;
                Ok((
                    Outcome::Final(Box::new(Decision {
                        request_id: id,
                        state: RequestState::Cancelled,
                        verdict: Verdict::Deny,
                        decided_by: reviewer.name.clone(),
                        reason: reason.clone(),
                        decided_at: OffsetDateTime::now_utc(),
                        duration: GrantDuration::Once,
                        grant: None,
                    })),
                    None,
                ))
            })
            .instrument(span.clone())
            .await?;
        self.after(&record, &outcome, true).instrument(span).await;
        Ok(record)
    }

    /// The agent on `host` no longer needs a decision. Withdrawing a request that is already
    /// final changes nothing; one of another host is unknown.
    pub async fn withdraw(
        &self,
        host: &str,
        id: Uuid,
        reason: WithdrawReason,
        detail: String,
    ) -> Result<(), Error> {
        let span = request_span(id);
        let result = self
            .transition(id, |record| {
                if record.host != host {
                    return Err(Error::UnknownRequest { id });
                }
                if reason == WithdrawReason::AgentDeadline {
                    // The agent applied the timeout action: the request expired, whatever
                    // this service's clock says.
                    let mut expired = Self::expiry(record, OffsetDateTime::now_utc());
                    expired.decided_by = format!("agent:{host}");
                    expired.reason = format!("{}: {detail}", reason.as_str());
                    return Ok((Outcome::Final(Box::new(expired)), None));
                }
                Ok((
                    Outcome::Final(Box::new(Decision {
                        request_id: id,
                        state: RequestState::Abandoned,
                        verdict: Verdict::Deny,
                        decided_by: format!("agent:{host}"),
                        reason: if detail.is_empty() {
                            reason.as_str().to_owned()
                        } else {
                            format!("{}: {detail}", reason.as_str())
                        },
                        decided_at: OffsetDateTime::now_utc(),
                        duration: GrantDuration::Once,
                        grant: None,
                    })),
                    None,
                ))
            })
            .instrument(span.clone())
            .await;
        match result {
            Ok((record, outcome)) => {
                self.after(&record, &outcome, false).instrument(span).await;
                Ok(())
            }
            Err(Error::NotPending { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Expires every pending request whose deadline has passed; returns how many.
    pub async fn expire_due(&self) -> Result<usize, Error> {
        let mut expired = 0;
        loop {
            let now = OffsetDateTime::now_utc();
            let due = self.store.due_requests(now, EXPIRE_BATCH).await?;
            let batch = due.len();
            let mut done = Vec::new();
            let mut failed = None;
            for Versioned { value, .. } in due {
                let decision = Self::expiry(&value, now);
                let span = request_span(value.request.id);
                match self
                    .transition(value.request.id, |_| {
                        Ok((Outcome::Final(Box::new(decision.clone())), None))
                    })
                    .instrument(span.clone())
                    .await
                {
                    Ok((record, Outcome::Final(decision))) => {
                        self.audit_final(&record, &decision).instrument(span).await;
                        done.push((record, decision));
                    }
                    Ok((_, Outcome::Vote(_))) | Err(Error::NotPending { .. }) => {}
                    Err(error) => {
                        failed = Some(error);
                        break;
                    }
                }
            }
            // One wait for the whole batch's records, then every agent is told (also of
            // what expired before a failure).
            if !done.is_empty() {
                self.durable().await;
            }
            for (record, decision) in done {
                self.hub.send(
                    &record.host,
                    v1::server_message::Message::Decision((*decision).into()),
                );
                self.hub.publish(&record);
                expired += 1;
            }
            if let Some(error) = failed {
                return Err(error);
            }
            let now = OffsetDateTime::now_utc();
            for grant in self.store.due_grants(now).await? {
                self.revoke(grant.id, "expiry", "the grant's duration is over", now)
                    .await?;
            }
            if batch < EXPIRE_BATCH {
                return Ok(expired);
            }
        }
    }

    /// Wakes the deadline timer (a replica stored a new deadline).
    pub(crate) fn wake_timer(&self) {
        self.wake.notify_one();
    }

    /// Runs the deadline timer until shutdown: sleeps until the next pending deadline or grant
    /// expiry (or a new request), then expires what is due.
    pub async fn run_timer(self: Arc<Self>) {
        loop {
            if let Err(error) = self.expire_due().await {
                tracing::error!(%error, "failed to expire due requests");
            }
            let sleep = match self.store.next_wakeup().await {
                Ok(Some(at)) => {
                    let left = at - OffsetDateTime::now_utc();
                    Duration::try_from(left)
                        .unwrap_or(Duration::ZERO)
                        .min(MAX_TIMER_SLEEP)
                }
                Ok(None) => MAX_TIMER_SLEEP,
                Err(error) => {
                    tracing::error!(%error, "failed to read the next deadline");
                    Duration::from_secs(1)
                }
            };
            // Deadlines are in milliseconds; never spin on a sub-millisecond remainder.
            let sleep = sleep.max(Duration::from_millis(1));
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                () = self.wake.notified() => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    async fn revoke(
        &self,
        id: Uuid,
        by: &str,
        reason: &str,
        now: OffsetDateTime,
    ) -> Result<Option<Grant>, Error> {
        let revoked = self
            .store
            .revoke_grant(
                id,
                Revocation {
                    at: now,
                    by: by.to_owned(),
                    reason: reason.to_owned(),
                },
            )
            .await?;
        if let Some(grant) = &revoked {
            let change = payload::GrantChange {
                schema: Schema::default(),
                grant,
                by: Some(by.to_owned()),
                reason: Some(reason.to_owned()),
            };
            self.record_encoded(
                EncodedRecord::new(RecordKind::GrantRevoked, &grant.host, &change).map(|encoded| {
                    encoded
                        .with_request_id(grant.request_id.to_string())
                        .with_actor(by)
                        .with_at(now)
                }),
            )
            .await;
            self.hub.publish_revoked(grant);
            self.hub.send(
                &grant.host,
                v1::server_message::Message::GrantRevoked(v1::GrantRevoked {
                    grant_id: grant.id.to_string(),
                    revoked_by: by.to_owned(),
                    reason: reason.to_owned(),
                }),
            );
        }
        Ok(revoked)
    }

    /// A reviewer revokes a grant; the agent is told to remove it.
    pub async fn revoke_grant(
        &self,
        reviewer: &Reviewer,
        id: Uuid,
        reason: &str,
    ) -> Result<Grant, Error> {
        let grant = self
            .store
            .get_grant(id)
            .await?
            .ok_or(Error::UnknownGrant { id })?;
        if let Some(request) = self.store.get_request(grant.request_id).await? {
            Self::authorise(reviewer, &request.value)?;
        }
        self.revoke(id, &reviewer.name, reason, OffsetDateTime::now_utc())
            .await?
            .ok_or(Error::GrantInactive { id })
    }

    /// The workload's cgroup on `host` went away: its session grants end.
    pub async fn session_ended(&self, host: &str, cgroup: &str) -> Result<usize, Error> {
        let grants = self
            .store
            .session_grants(host.to_owned(), cgroup.to_owned())
            .await?;
        let now = OffsetDateTime::now_utc();
        let mut ended = 0;
        for grant in grants {
            if self
                .revoke(
                    grant.id,
                    "session-end",
                    "the workload's cgroup went away",
                    now,
                )
                .await?
                .is_some()
            {
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// Active grants of `host` (sent to an agent when it connects).
    pub async fn active_grants(&self, host: &str) -> Result<Vec<Grant>, Error> {
        Ok(self
            .store
            .list_grants(
                GrantQuery {
                    host: Some(host.to_owned()),
                    ..GrantQuery::default()
                },
                OffsetDateTime::now_utc(),
            )
            .await?)
    }

    /// One request and the decided requests most like it (same policy and executable or
    /// destination), newest first.
    pub async fn get(&self, id: Uuid) -> Result<(RequestRecord, Vec<RequestRecord>), Error> {
        let record = self
            .store
            .get_request(id)
            .await?
            .ok_or(Error::UnknownRequest { id })?
            .value;
        let similar = self
            .store
            .list_requests(RequestQuery {
                final_only: true,
                policy: Some(record.request.policy.clone()),
                subject: Some(crate::store::subject_key(&record.request.target)),
                exclude: Some(id),
                newest_first: true,
                limit: self.history_limit,
                ..RequestQuery::default()
            })
            .await?;
        Ok((record, similar))
    }

    /// Records an agent's report on its own audit log (`agent_audit_health`): the fleet's
    /// record shows when a host's log could not be written, and why.
    pub async fn agent_audit_health(&self, host: &str, health: &serde_json::Value) {
        self.record_encoded(
            EncodedRecord::new(RecordKind::AgentAuditHealth, host, health)
                .map(|encoded| encoded.with_actor(format!("agent:{host}"))),
        )
        .await;
    }

    /// Anchors a batch of `host`'s audit records ([`crate::host_audit`]). A divergence found
    /// for the first time is logged and recorded in the service's own log
    /// (`host_audit_diverged`), so an auditor sees it there; a refused batch is an error.
    pub async fn ship_host_audit(
        &self,
        host: &str,
        batch: gatekeep_proto::host_audit::ShipBatch,
    ) -> Result<crate::store::Shipped, Error> {
        let shipped = self
            .store
            .ship_host_audit(host.to_owned(), batch, OffsetDateTime::now_utc())
            .await?;
        if let Some(refusal) = &shipped.refused {
            return Err(Error::ShipRefused {
                message: refusal.to_string(),
            });
        }
        if let (Some(divergence), true) = (&shipped.divergence, shipped.new_divergence) {
            tracing::error!(
                %host,
                seq = divergence.seq,
                kind = divergence.kind.as_str(),
                detail = %divergence.detail,
                "a host's audit log no longer matches what it shipped"
            );
            self.record_encoded(
                EncodedRecord::new(RecordKind::HostAuditDiverged, host, divergence)
                    .map(|encoded| encoded.with_actor(format!("agent:{host}"))),
            )
            .await;
        }
        Ok(shipped)
    }

    /// Flushes the audit log; returns its last durable seq.
    pub async fn audit_head(&self) -> Result<u64, Error> {
        self.audit
            .flush_async()
            .await
            .map_err(|source| Error::Audit { source })
    }
}

/// The span every log line about one request is in: its `request_id` field reaches the JSON
/// logs (`--log-format json`) of each line, whatever the line's own fields.
pub(crate) fn request_span(id: Uuid) -> tracing::Span {
    tracing::info_span!("request", request_id = %id)
}

/// Refuses a grant duration the request's policy does not offer.
fn duration_allowed(record: &RequestRecord, duration: GrantDuration) -> Result<(), Error> {
    let settings = &record.request.approval;
    if !settings.allows(duration) {
        return Err(Error::permission(format!(
            "policy `{}` does not let reviewers grant `{duration}` (it allows: {})",
            record.request.policy,
            settings
                .grant_durations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(())
}

/// Refuses an approval without a reason where the policy requires one (`require_reason`);
/// a denial needs none. Every surface (gRPC, HTTP, Slack) decides through
/// [`Engine::decide`], so this one check holds for all of them.
fn reason_given(record: &RequestRecord, verdict: Verdict, reason: &str) -> Result<(), Error> {
    if verdict == Verdict::Allow
        && record.request.approval.require_reason
        && reason.trim().is_empty()
    {
        return Err(Error::ReasonRequired {
            policy: record.request.policy.clone(),
        });
    }
    Ok(())
}

/// Refuses an approval with a grant (any duration but once) of a truncated request: its
/// digest covers only the captured part, so a grant would allow every exec that differs
/// after it (the kernel would ignore the grant; the reviewer is told instead).
fn no_grant(
    record: &RequestRecord,
    verdict: Verdict,
    duration: GrantDuration,
) -> Result<(), Error> {
    if verdict == Verdict::Allow
        && duration != GrantDuration::Once
        && record.request.target.argv_truncated()
    {
        return Err(Error::BadArgument {
            message: format!(
                "request {} is truncated (the kernel could not capture its whole argv or bound \
                 environment), so no grant can cover it: a grant would allow every exec that \
                 differs after the captured part; approve it `once` (each such exec is asked), \
                 or deny it",
                record.request.id
            ),
        });
    }
    Ok(())
}
