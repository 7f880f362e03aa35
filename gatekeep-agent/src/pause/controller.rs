//! The request state machine: kernel events in, decisions out, every step
//! recorded.
//!
//! For each paused thread the controller tracks one request:
//!
//! ```text
//! ask event ──► Deciding ──decision──► Resuming ──resumed──► Resumed ──verdict applied──► (done)
//!                  │                       │                     │
//!                  └── abandoned / superseded / vanished ────────┴──► (done, recorded)
//! ```
//!
//! - An ask event is believed only if the kernel still holds that pending
//!   request (same thread and digest); stale events (already answered
//!   before a restart) are dropped.
//! - A new ask from a thread that is tracked with another digest supersedes
//!   the old request (a sibling rewrote argv): the old decision is dropped and
//!   recorded as cancelled, and the new request is asked on its own.
//! - The periodic [`Controller::reconcile`] finds requests whose events were
//!   lost (ring buffer full, agent restart) and asks them again, and clears
//!   requests whose task died unseen.
//! - On shutdown, undecided requests are recorded as cancelled and their
//!   tasks stay stopped (fail closed); the next agent asks them again.
//! - Nothing runs off the record: a decision is recorded before its verdict
//!   is written, and the verdict waits until the request and the decision are
//!   durable ([`AuditSink::durable`]). When the log cannot be written, the
//!   verdict becomes deny (recorded as `audit_unavailable`, held in memory
//!   until the log can be written), and new requests are denied at once
//!   without asking anyone.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use gatekeep_audit::{AuditRecord, RecordKind};
use gatekeep_common::VerdictKey;
use gatekeep_proto::{
    audit::{self as payload, Schema},
    model::{self, ApprovalSettings, Kind, RequestState},
};
use serde::Serialize;
use tokio::{
    sync::{mpsc, watch},
    task::{AbortHandle, JoinSet},
    time::Instant,
};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{
    audit::AuditSink,
    bpf::{
        events::{Event, Origin, RequestKind},
        kernel::{PauseKernel, boot_time_ns},
    },
    bursts::{BURST_QUIET, Bursts},
    decision::{Decider, Decision, DecisionRequest, Verdict, Withdrawal, decide_by_deadline},
    hooks::Request,
    metrics::AgentMetrics,
    pause::{
        enrich::{Enricher, Enrichment, RecentEnrichments},
        request,
        resume::{
            Finding, PauseTiming, ResumeOutcome, TaskRequest, TaskState, Tasks, reconcile, resume,
        },
    },
    policy::{Compiled, LoadedPolicy},
};

/// Longest wait at shutdown for the event reader to hand over what it read.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// Where a tracked request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Deciding,
    Resuming,
    /// Verdict written and SIGCONT sent; waiting for the kernel to apply it.
    Resumed {
        at: Instant,
        verdict: Verdict,
    },
}

#[derive(Debug)]
struct Tracked {
    /// The request as asked (its id is the request id).
    request: Arc<DecisionRequest>,
    pid: u32,
    digest: u64,
    /// The asking thread's start time, from the kernel's pending entry: a
    /// verdict names it, so it never applies to a later task reusing the tid.
    start_ns: u64,
    asked_at: Instant,
    stage: Stage,
    decision_task: Option<AbortHandle>,
    /// The decision's record was handed to the audit log (it is written once, before the
    /// first attempt to apply it).
    decision_recorded: bool,
    /// Denied without asking because the audit log could not be written: the error.
    audit_unavailable: Option<String>,
}

impl Tracked {
    fn id(&self) -> Uuid {
        self.request.id()
    }

    fn waited_ms(&self) -> u64 {
        u64::try_from(self.asked_at.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The payload of the record that ends it (`state`), before the decision's details.
    fn outcome<'a>(
        &'a self,
        tid: u32,
        state: RequestState,
        verdict: Option<Verdict>,
        reason: &'a str,
    ) -> payload::Outcome<'a> {
        let request = &self.request.request;
        payload::Outcome {
            schema: Schema::default(),
            policy: Some(Cow::Borrowed(&request.policy)),
            kind: request.kind(),
            target: Some(Cow::Borrowed(&request.target)),
            state,
            verdict: verdict.map(model::Verdict::from),
            reason: Cow::Borrowed(reason),
            cause: None,
            detail: None,
            duration: None,
            approvals: None,
            approvals_required: None,
            grant_id: None,
            wait_ms: self.waited_ms(),
            is_final: true,
            pid: Some(self.pid),
            tid: Some(tid),
            digest: None,
            comm: None,
        }
    }
}

/// What of an allowed exec the new program received changed
/// (`EXEC_ARGV_CHANGED`, `EXEC_ENV_CHANGED`).
#[derive(Clone, Copy)]
enum Changed {
    Argv,
    /// The bound environment (`LD_*` and the policy's `bound_env`).
    Env,
}

impl Changed {
    /// The `kernel_denied` record's `reason`.
    fn reason(self) -> &'static str {
        match self {
            Changed::Argv => "argv_changed",
            Changed::Env => "env_changed",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Changed::Argv => "argv",
            Changed::Env => "bound environment",
        }
    }
}

/// Messages from the controller's own decision and resume tasks.
#[derive(Debug)]
enum Internal {
    Decided {
        tid: u32,
        request_id: Uuid,
        decision: Decision,
    },
    Resumed {
        tid: u32,
        request_id: Uuid,
        decision: Decision,
        outcome: Result<ResumeOutcome, String>,
        /// False when a verdict is written again (already logged).
        first: bool,
        /// The decision allowed, but it could not be made durable: denied instead, for this
        /// reason.
        undurable: Option<String>,
    },
}

/// [`AuditSink::durable`], boxed: resolves once the records before it are durable.
type Durable = std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// The reason of a request denied because the audit log cannot be written.
pub const AUDIT_UNAVAILABLE_REASON: &str =
    "denied: the audit log cannot be written, and nothing asked runs off the record";

/// Counts for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub asked: u64,
    pub decided: u64,
    pub abandoned: u64,
    pub superseded: u64,
    pub reasked: u64,
    pub kernel_denied: u64,
    /// Actions policies in audit mode let through that enforcement would have denied or
    /// asked about.
    pub audited: u64,
    /// Execs decided by their command rules (or a script's, or an applet's)
    /// in the agent, without a reviewer.
    pub matched: u64,
    pub stale_events: u64,
}

/// The request state machine.
pub struct Controller<K: PauseKernel, T: Tasks, D: Decider, A: AuditSink> {
    kernel: Arc<K>,
    tasks: Arc<T>,
    decider: Arc<D>,
    audit: Arc<A>,
    enricher: Arc<Enricher>,
    /// Enrichments reused across a process's kernel denials (a flood of them must not cost
    /// a full `/proc` walk each).
    recent_denials: RecentEnrichments,
    /// Identical kernel denials, aggregated into one record per burst.
    denials: Bursts<DenialKey, payload::KernelDenied>,
    host: String,
    /// The kernel's boot id: part of every request id (see [`request::request_id`]).
    boot_id: String,
    timing: PauseTiming,
    current: Arc<Compiled>,
    previous: Option<Arc<Compiled>>,
    tracked: HashMap<u32, Tracked>,
    /// (thread, digest) asked again by the reconciler -> (when the kernel
    /// first saw the request, pid); its deadline counts from then.
    reasked: HashMap<(u32, u64), (u64, u32)>,
    /// Stale exec rules already reported: (policy id, dev, ino, the content
    /// found). A reload gives policies new ids, so they are reported again.
    stale_reported: HashSet<(u32, u64, u64, gatekeep_common::ContentVersion)>,
    decisions: JoinSet<()>,
    resumes: JoinSet<()>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    pub stats: Stats,
    /// Counts asked requests and their outcomes from the records made (`None`: not counted).
    metrics: Option<Arc<AgentMetrics>>,
}

/// Everything the controller works with.
pub struct Parts<K, T, D, A> {
    pub kernel: Arc<K>,
    pub tasks: Arc<T>,
    pub decider: Arc<D>,
    pub audit: Arc<A>,
    pub enricher: Arc<Enricher>,
    pub host: String,
    pub timing: PauseTiming,
    pub policies: Arc<Compiled>,
}

impl<K: PauseKernel, T: Tasks, D: Decider, A: AuditSink> Controller<K, T, D, A> {
    #[must_use]
    pub fn new(parts: Parts<K, T, D, A>) -> Self {
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        Self {
            kernel: parts.kernel,
            tasks: parts.tasks,
            decider: parts.decider,
            audit: parts.audit,
            enricher: parts.enricher,
            recent_denials: RecentEnrichments::default(),
            denials: Bursts::default(),
            host: parts.host,
            boot_id: request::boot_id(std::path::Path::new(request::BOOT_ID_PATH)),
            timing: parts.timing,
            current: parts.policies,
            previous: None,
            tracked: HashMap::new(),
            reasked: HashMap::new(),
            stale_reported: HashSet::new(),
            decisions: JoinSet::new(),
            resumes: JoinSet::new(),
            internal_tx,
            internal_rx,
            stats: Stats::default(),
            metrics: None,
        }
    }

    /// Counts requests into `metrics` (`/metrics`).
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<AgentMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Requests currently tracked (paused tasks the agent knows of).
    #[must_use]
    pub fn tracked_count(&self) -> usize {
        self.tracked.len()
    }

    /// Switches to a newly loaded policy set; requests already asked keep
    /// the policy they were asked under.
    pub fn set_policies(&mut self, compiled: Arc<Compiled>) {
        self.previous = Some(std::mem::replace(&mut self.current, compiled));
    }

    fn policy(&self, id: u32) -> Option<Arc<LoadedPolicy>> {
        self.current
            .policies
            .get(&id)
            .or_else(|| self.previous.as_ref().and_then(|p| p.policies.get(&id)))
            .cloned()
    }

    /// Records `payload` (one of [`gatekeep_proto::audit`]'s types) as a record of `kind`.
    fn record(
        &self,
        kind: RecordKind,
        request_id: Option<Uuid>,
        actor: Option<&str>,
        payload: &impl Serialize,
    ) {
        let payload = match serde_json::to_value(payload) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(%error, %kind, "cannot encode an audit payload");
                return;
            }
        };
        let mut record = AuditRecord::new(kind, self.host.clone(), payload);
        if let Some(id) = request_id {
            record = record.with_request_id(id.to_string());
        }
        if let Some(actor) = actor {
            record = record.with_actor(actor);
        }
        if let Some(metrics) = &self.metrics {
            metrics.observe(&record);
        }
        self.audit.record(record);
    }

    /// Runs until `shutdown` turns true (or every input closes).
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<Vec<Event>>,
        mut policies: watch::Receiver<Arc<Compiled>>,
        mut shutdown: watch::Receiver<bool>,
        reconcile_every: Duration,
    ) -> Stats {
        let mut tick = tokio::time::interval(reconcile_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut bursts = tokio::time::interval(BURST_QUIET / 2);
        bursts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                batch = events.recv() => {
                    let Some(batch) = batch else { break };
                    for event in batch {
                        self.handle_event(event).await;
                    }
                }
                Some(message) = self.internal_rx.recv() => self.handle_internal(message),
                changed = policies.changed() => {
                    if changed.is_ok() {
                        let compiled = Arc::clone(&policies.borrow_and_update());
                        if !Arc::ptr_eq(&compiled, &self.current) {
                            self.set_policies(compiled);
                        }
                    }
                }
                _ = tick.tick() => self.reconcile().await,
                _ = bursts.tick() => self.record_denial_bursts(SystemTime::now(), false),
                Some(_) = self.decisions.join_next(), if !self.decisions.is_empty() => {}
                Some(_) = self.resumes.join_next(), if !self.resumes.is_empty() => {}
            }
        }
        // The reader took these records off the ring buffer already: handle (and so
        // record) every one before stopping. The reader stops at the same signal and
        // closes the channel.
        let drain = async {
            while let Some(batch) = events.recv().await {
                for event in batch {
                    self.handle_event(event).await;
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_DRAIN, drain).await.is_err() {
            tracing::warn!("kernel events still arriving at shutdown; stopped reading them");
        }
        self.shutdown().await
    }

    /// Handles messages from decision and resume tasks until none is ready.
    pub fn drain_internal(&mut self) {
        while let Ok(message) = self.internal_rx.try_recv() {
            self.handle_internal(message);
        }
    }

    /// Waits for the next message of a decision or resume task and handles it.
    pub async fn step_internal(&mut self) {
        if let Some(message) = self.internal_rx.recv().await {
            self.handle_internal(message);
        }
    }

    /// One kernel event.
    pub async fn handle_event(&mut self, event: Event) {
        tracing::debug!(
            event = event.name(),
            tid = event.origin().tid,
            pid = event.origin().pid,
            "kernel event"
        );
        match event {
            Event::Ask(request) => {
                let origin = request.origin().clone();
                self.handle_ask(&origin, request).await;
            }
            Event::Denied(request) => {
                self.audit.has_room().await;
                self.stats.kernel_denied += 1;
                self.add_to_burst(&request, None);
            }
            Event::Audited { request, would } => {
                // A handed-over exec: what the matcher would have done.
                let matched = self
                    .policy(request.origin().policy_id)
                    .and_then(|policy| self.match_exec(&request, &policy));
                let (would, rule) = match matched {
                    Some(matched) => match matched.action {
                        gatekeep_policy::Action::Allow => return,
                        action => (crate::hooks::kernel_action(action), Some(matched.because)),
                    },
                    None => (would, None),
                };
                self.audit.has_room().await;
                self.stats.audited += 1;
                self.add_to_burst_with(&request, Some(would), rule);
            }
            // The daemon hands these to the policy watcher, which classifies
            // the cgroup and resumes the task; nothing to track here.
            Event::Unclassified { .. } | Event::DnsPacket { .. } | Event::DnsWait { .. } => {}
            Event::ExecRuleStale(stale) => self.handle_stale_rule(&stale),
            Event::Abandoned { origin, kind } => self.handle_gone(&origin, kind, false),
            Event::RefusedSpinning { origin, kind } => self.handle_gone(&origin, kind, true),
            Event::ArgvChanged { origin } => self.handle_image_changed(&origin, Changed::Argv),
            Event::EnvChanged { origin } => self.handle_image_changed(&origin, Changed::Env),
            Event::VerdictApplied { origin, action, .. } => {
                tracing::debug!(tid = origin.tid, action, "verdict applied");
                if let Some(tracked) = self.tracked.get(&origin.tid)
                    && tracked.digest == origin.digest
                    && matches!(tracked.stage, Stage::Resumed { .. })
                {
                    self.tracked.remove(&origin.tid);
                }
            }
        }
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one ask from event to decision task, step by step"
    )]
    async fn handle_ask(&mut self, origin: &Origin, asked: Request) {
        let tid = origin.tid;
        let pending = match self.kernel.pending_of(tid).await {
            Ok(pending) => pending,
            Err(err) => {
                tracing::error!(tid, error = %err, "cannot read the pending request; the reconciler will retry");
                return;
            }
        };
        let Some(pending) = pending.filter(|p| p.digest == origin.digest) else {
            // Answered or gone already (an old event read after a restart).
            self.stats.stale_events += 1;
            tracing::debug!(tid, "stale ask event ignored");
            return;
        };
        if let Some(tracked) = self.tracked.get(&tid) {
            if tracked.digest == origin.digest {
                return;
            }
            self.supersede(tid);
        }
        let Some(policy) = self.policy(origin.policy_id) else {
            // Asked under a policy id this agent did not load (an old set):
            // ask again, so the current policy governs it.
            tracing::info!(
                tid,
                policy_id = origin.policy_id,
                "request under an unknown policy id; asking again"
            );
            if matches!(
                self.kernel.remove_pending(tid, origin.digest).await,
                Ok(true)
            ) && let Err(err) = self.tasks.sigcont(origin.pid)
            {
                tracing::warn!(tid, error = %err, "failed to continue a task to re-ask it");
            }
            return;
        };
        let first_seen = self
            .reasked
            .remove(&(tid, origin.digest))
            .map_or(pending.created_ns, |(first, _pid)| first);
        let age = Duration::from_nanos(boot_time_ns().saturating_sub(first_seen));
        let timeout = policy.policy.approval.timeout;
        let deadline = Instant::now() + timeout.saturating_sub(age);
        let id = request::request_id(&self.host, &self.boot_id, first_seen, tid, origin.digest);

        let info = self.enricher.enrich(origin.pid, origin.uid);
        let (mut rule, target, kernel) = self.describe(&asked, &policy);
        // Command rules, scripts, applets: decided here when no reviewer is
        // needed (a short local pause, recorded like any decision).
        let local = self.match_exec(&asked, &policy).and_then(|matched| {
            rule.clone_from(&matched.because);
            match matched.action {
                gatekeep_policy::Action::Allow => Some(Verdict::Allow),
                gatekeep_policy::Action::Deny => Some(Verdict::Deny),
                gatekeep_policy::Action::Ask => None,
            }
        });
        // A truncated argv is approved by a reviewer or not at all: its deadline denies.
        let on_timeout = if target.argv_truncated() {
            model::Verdict::Deny
        } else {
            model::Verdict::from_policy(policy.policy.approval.on_timeout)
        };
        let approval = request::approval_request(
            request::Ask {
                id,
                policy: &policy.policy.name,
                rule: &rule,
                origin,
                info: &info,
                target,
                approval: ApprovalSettings::from_policy(&policy.policy.approval),
                on_timeout,
                timeout,
                first_seen_ns: first_seen,
            },
            SystemTime::now(),
            boot_time_ns(),
        );
        let request = Arc::new(DecisionRequest {
            request: approval,
            kernel,
            digest: origin.digest,
            timeout,
            deadline,
        });
        self.stats.asked += 1;
        tracing::info!(
            request_id = %id,
            kind = request.request.kind().as_str(),
            policy = policy.policy.name,
            rule,
            pid = origin.pid,
            tid,
            "request paused, asking for a decision"
        );
        self.record(
            RecordKind::Requested,
            Some(id),
            None,
            &payload::Requested {
                schema: Schema::default(),
                request: Cow::Borrowed(&request.request),
                service_deadline: None,
                kernel: Some(request.kernel.clone()),
            },
        );

        let internal = self.internal_tx.clone();
        let (task, audit_unavailable) = if let Some(verdict) = local {
            self.stats.matched += 1;
            let _ = internal.send(Internal::Decided {
                tid,
                request_id: id,
                decision: Decision {
                    verdict,
                    actor: "policy".to_owned(),
                    reason: rule.clone(),
                    expired: false,
                    service: None,
                },
            });
            (None, None)
        } else if self.audit.is_writable() {
            let decider = Arc::clone(&self.decider);
            let asked_request = Arc::clone(&request);
            let task = self.decisions.spawn(
                async move {
                    let decision = decide_by_deadline(decider.as_ref(), asked_request).await;
                    let _ = internal.send(Internal::Decided {
                        tid,
                        request_id: id,
                        decision,
                    });
                }
                .instrument(request_span(id)),
            );
            (Some(task), None)
        } else {
            // Whatever anyone would decide could not be put on record: deny now.
            tracing::warn!(request_id = %id, tid, "the audit log cannot be written; request denied without asking");
            let _ = internal.send(Internal::Decided {
                tid,
                request_id: id,
                decision: Decision {
                    verdict: Verdict::Deny,
                    actor: "agent".to_owned(),
                    reason: AUDIT_UNAVAILABLE_REASON.to_owned(),
                    expired: false,
                    service: None,
                },
            });
            (
                None,
                Some("the audit log could not be written when the request arrived".to_owned()),
            )
        };
        self.tracked.insert(
            tid,
            Tracked {
                request,
                pid: origin.pid,
                digest: origin.digest,
                start_ns: pending.start_ns,
                asked_at: Instant::now(),
                stage: Stage::Deciding,
                decision_task: task,
                decision_recorded: false,
                audit_unavailable,
            },
        );
    }

    /// The user-space decision of an exec the kernel handed over for its
    /// command rules, interpreters or multi-call binaries, or for the bytes
    /// of a rewritten file an allow rule pinned by SHA-256 (`None`: not one,
    /// or one a reviewer must decide as the kernel asked it).
    fn match_exec(
        &self,
        asked: &Request,
        policy: &LoadedPolicy,
    ) -> Option<gatekeep_policy::Decided> {
        match asked {
            Request::Exec(exec) => policy.hooks.exec.integrity.decide(exec).or_else(|| {
                policy
                    .hooks
                    .exec
                    .matching
                    .decide(exec, self.enricher.proc_root())
            }),
            Request::Connect(_) => None,
        }
    }

    /// The rule that said ask, what is asked, and what the kernel reported.
    fn describe(
        &self,
        asked: &Request,
        policy: &LoadedPolicy,
    ) -> (String, model::Target, payload::KernelFacts) {
        (
            policy.rule_for(asked),
            asked.target(&self.enricher),
            asked.kernel_facts(),
        )
    }

    /// The tracked request of `tid` was replaced by a new one.
    fn supersede(&mut self, tid: u32) {
        let Some(old) = self.tracked.remove(&tid) else {
            return;
        };
        if let Some(task) = &old.decision_task {
            task.abort();
        }
        self.stats.superseded += 1;
        tracing::info!(
            request_id = %old.id(),
            tid,
            "request superseded by a new one from the same thread"
        );
        if let Stage::Resumed { .. } | Stage::Resuming = old.stage {
            // Its verdict (for the old digest) can never apply now.
            let kernel = Arc::clone(&self.kernel);
            let key = VerdictKey {
                tid,
                _pad: 0,
                digest: old.digest,
                start_ns: old.start_ns,
            };
            tokio::spawn(async move {
                let _ = kernel.remove_verdict(key).await;
            });
        }
        if old.stage == Stage::Deciding {
            self.decider.withdraw(
                old.id(),
                Withdrawal::Superseded,
                "the thread asked something else before the decision applied",
            );
        }
        if old.stage == Stage::Deciding || old.stage == Stage::Resuming {
            let payload = payload::Outcome {
                cause: Some(Cow::Borrowed("superseded")),
                detail: Some(Cow::Borrowed(
                    "the thread asked something else before the decision applied (e.g. argv rewritten)",
                )),
                ..old.outcome(tid, RequestState::Cancelled, None, "")
            };
            self.record(RecordKind::Cancelled, Some(old.id()), None, &payload);
        }
    }

    /// The task exited while paused, or the kernel refused a spinning one.
    fn handle_gone(&mut self, origin: &Origin, kind: RequestKind, refused: bool) {
        let tracked = match self.tracked.get(&origin.tid) {
            Some(t) if t.digest == origin.digest => self.tracked.remove(&origin.tid),
            _ => None,
        };
        if let Some(task) = tracked.as_ref().and_then(|t| t.decision_task.as_ref()) {
            task.abort();
        }
        if let Some(tracked) = tracked.as_ref().filter(|t| t.stage == Stage::Deciding) {
            let (reason, detail) = if refused {
                (
                    Withdrawal::Superseded,
                    "the kernel refused the request: the task is traced",
                )
            } else {
                (
                    Withdrawal::TaskExited,
                    "the task exited while it waited for a decision",
                )
            };
            self.decider.withdraw(tracked.id(), reason, detail);
        }
        let request_id = tracked.as_ref().map(Tracked::id);
        if refused {
            self.stats.kernel_denied += 1;
            tracing::warn!(
                tid = origin.tid,
                pid = origin.pid,
                "paused request refused: the task is traced and would spin"
            );
            let known = tracked.as_ref().map(|t| &t.request.request);
            let policy = self.policy(origin.policy_id);
            let payload = payload::KernelDenied {
                schema: Schema::default(),
                kind: model_kind(kind),
                policy: known
                    .map(|r| r.policy.clone())
                    .or_else(|| policy.map(|p| p.policy.name.clone())),
                rule: known.map(|r| r.rule.clone()),
                process: request::process(origin, &Enrichment::default()),
                target: known.map(|r| r.target.clone()),
                kernel: request::kernel_facts(origin, None, None),
                reason: Some("refused_spinning".to_owned()),
                detail: Some(
                    "the task re-entered the hook without stopping (traced); refused with EPERM"
                        .to_owned(),
                ),
                count: None,
                first_at: None,
                last_at: None,
                would: None,
            };
            self.record(
                RecordKind::KernelDenied,
                request_id,
                Some("kernel"),
                &payload,
            );
        } else {
            self.stats.abandoned += 1;
            tracing::info!(
                tid = origin.tid,
                pid = origin.pid,
                request_id = ?request_id,
                "paused task exited; request abandoned"
            );
            let detail = "the task exited while it waited for a decision";
            let payload = match &tracked {
                Some(tracked) => payload::Outcome {
                    cause: Some(Cow::Borrowed("task_exited")),
                    detail: Some(Cow::Borrowed(detail)),
                    ..tracked.outcome(origin.tid, RequestState::Abandoned, None, "")
                },
                None => self.untracked_outcome(
                    origin.policy_id,
                    kind,
                    origin.pid,
                    origin.tid,
                    origin.digest,
                    Some(&origin.comm),
                    detail,
                ),
            };
            self.record(RecordKind::Abandoned, request_id, None, &payload);
        }
    }

    /// An allowed exec killed before its program ran: the argv (or the
    /// bound environment) the kernel gave it was changed (by another
    /// thread) after the hook read it.
    fn handle_image_changed(&mut self, origin: &Origin, changed: Changed) {
        self.stats.kernel_denied += 1;
        tracing::warn!(
            pid = origin.pid,
            digest = format_args!("{:016x}", origin.digest),
            "allowed exec killed: its {} changed after it was read",
            changed.what()
        );
        let payload = payload::KernelDenied {
            schema: Schema::default(),
            kind: Kind::Exec,
            policy: self.policy(origin.policy_id).map(|p| p.policy.name.clone()),
            rule: None,
            process: request::process(origin, &Enrichment::default()),
            target: None,
            kernel: request::kernel_facts(origin, None, None),
            reason: Some(changed.reason().to_owned()),
            detail: Some(format!(
                "the exec was allowed for one {what}, and the kernel gave the new program \
                 another (changed in the caller's memory after it was read): killed \
                 before it ran",
                what = changed.what()
            )),
            count: None,
            first_at: None,
            last_at: None,
            would: None,
        };
        self.record(RecordKind::KernelDenied, None, Some("kernel"), &payload);
    }

    /// The end of a request the agent did not track (its event was missed, or it was asked
    /// before this agent started): what the kernel said of it.
    #[expect(clippy::too_many_arguments, reason = "the kernel's facts, one by one")]
    fn untracked_outcome<'a>(
        &self,
        policy_id: u32,
        kind: RequestKind,
        pid: u32,
        tid: u32,
        digest: u64,
        comm: Option<&str>,
        detail: &'a str,
    ) -> payload::Outcome<'a> {
        payload::Outcome {
            schema: Schema::default(),
            policy: self
                .policy(policy_id)
                .map(|p| Cow::Owned(p.policy.name.clone())),
            kind: model_kind(kind),
            target: None,
            state: RequestState::Abandoned,
            verdict: None,
            reason: Cow::Borrowed(""),
            cause: Some(Cow::Borrowed("task_exited")),
            detail: Some(Cow::Borrowed(detail)),
            duration: None,
            approvals: None,
            approvals_required: None,
            grant_id: None,
            wait_ms: 0,
            is_final: true,
            pid: Some(pid),
            tid: Some(tid),
            digest: Some(format!("{digest:016x}")),
            comm: comm.map(str::to_owned),
        }
    }

    fn handle_internal(&mut self, message: Internal) {
        match message {
            Internal::Decided {
                tid,
                request_id,
                decision,
            } => {
                let Some(tracked) = self.tracked.get_mut(&tid) else {
                    return;
                };
                if tracked.id() != request_id || tracked.stage != Stage::Deciding {
                    return;
                }
                tracked.stage = Stage::Resuming;
                tracked.decision_task = None;
                let first = !tracked.decision_recorded;
                if first {
                    tracked.decision_recorded = true;
                    self.record_decision(tid, request_id, &decision);
                }
                // Queued behind the request's and the decision's records.
                let durable = Box::pin(self.audit.durable());
                self.spawn_resume(tid, decision, first, Some(durable));
            }
            Internal::Resumed {
                tid,
                request_id,
                decision,
                outcome,
                first,
                undurable,
            } => {
                let Some(tracked) = self.tracked.get_mut(&tid) else {
                    return;
                };
                if tracked.id() != request_id {
                    return;
                }
                match outcome {
                    Ok(ResumeOutcome::Resumed | ResumeOutcome::ResumedUnconfirmed) => {
                        let verdict = if undurable.is_some() {
                            Verdict::Deny
                        } else {
                            decision.verdict
                        };
                        tracked.stage = Stage::Resumed {
                            at: Instant::now(),
                            verdict,
                        };
                        if first {
                            self.stats.decided += 1;
                            tracing::info!(
                                request_id = %request_id,
                                verdict = verdict.as_str(),
                                actor = decision.actor,
                                wait_ms = tracked.waited_ms(),
                                "request decided, task resumed"
                            );
                        }
                        if let Some(error) = undurable {
                            self.record_undurable(tid, request_id, &error);
                        }
                    }
                    Ok(ResumeOutcome::Superseded) => self.supersede(tid),
                    Ok(ResumeOutcome::Gone) => {
                        let Some(tracked) = self.tracked.remove(&tid) else {
                            return;
                        };
                        self.stats.abandoned += 1;
                        let payload = payload::Outcome {
                            cause: Some(Cow::Borrowed("task_exited")),
                            detail: Some(Cow::Borrowed(
                                "the task exited before its decision could be applied",
                            )),
                            ..tracked.outcome(tid, RequestState::Abandoned, None, &decision.reason)
                        };
                        self.record(RecordKind::Abandoned, Some(request_id), None, &payload);
                    }
                    Err(err) => {
                        tracing::error!(%request_id, error = err, "failed to resume; retrying");
                        let internal = self.internal_tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            let _ = internal.send(Internal::Decided {
                                tid,
                                request_id,
                                decision,
                            });
                        });
                        if let Some(tracked) = self.tracked.get_mut(&tid) {
                            tracked.stage = Stage::Deciding;
                        }
                    }
                }
            }
        }
    }

    /// Records the decision of a request, before its verdict is applied.
    fn record_decision(&self, tid: u32, request_id: Uuid, decision: &Decision) {
        let (kind, state) = match (&decision.service, decision.expired) {
            (_, true) => (RecordKind::Expired, RequestState::Expired),
            (Some(service), false) => (RecordKind::Decided, service.state),
            (None, false) => (
                RecordKind::Decided,
                match decision.verdict {
                    Verdict::Allow => RequestState::Approved,
                    Verdict::Deny => RequestState::Denied,
                },
            ),
        };
        let Some(tracked) = self.tracked.get(&tid) else {
            return;
        };
        let payload = payload::Outcome {
            cause: tracked
                .audit_unavailable
                .as_ref()
                .map(|_| Cow::Borrowed("audit_unavailable")),
            detail: tracked.audit_unavailable.as_deref().map(Cow::Borrowed),
            duration: Some(
                decision
                    .service
                    .as_ref()
                    .map_or_else(|| "once".to_owned(), |s| s.duration.clone()),
            ),
            grant_id: decision.service.as_ref().and_then(|s| s.grant_id),
            ..tracked.outcome(tid, state, Some(decision.verdict), &decision.reason)
        };
        self.record(kind, Some(request_id), Some(&decision.actor), &payload);
    }

    /// Records that an allowing decision was turned into a denial because it could not be
    /// made durable (the record itself is held in memory until the log can be written).
    fn record_undurable(&self, tid: u32, request_id: Uuid, error: &str) {
        let Some(tracked) = self.tracked.get(&tid) else {
            return;
        };
        tracing::warn!(
            request_id = %request_id,
            error,
            "the decision could not be made durable; denied instead"
        );
        let detail = format!(
            "the decision could not be made durable in the audit log, so it was not applied: {error}"
        );
        let payload = payload::Outcome {
            cause: Some(Cow::Borrowed("audit_unavailable")),
            detail: Some(Cow::Borrowed(&detail)),
            duration: Some("once".to_owned()),
            ..tracked.outcome(
                tid,
                RequestState::Denied,
                Some(Verdict::Deny),
                AUDIT_UNAVAILABLE_REASON,
            )
        };
        self.record(
            RecordKind::Decided,
            Some(request_id),
            Some("agent"),
            &payload,
        );
    }

    /// Writes the verdict and resumes the task, in a task of its own. With `durable`, the
    /// verdict waits for it, and becomes deny when it fails.
    fn spawn_resume(
        &mut self,
        tid: u32,
        decision: Decision,
        first: bool,
        durable: Option<Durable>,
    ) {
        let Some(tracked) = self.tracked.get(&tid) else {
            return;
        };
        let (pid, request_id) = (tracked.pid, tracked.id());
        let task = TaskRequest {
            tid,
            start_ns: tracked.start_ns,
            digest: tracked.digest,
        };
        let kernel = Arc::clone(&self.kernel);
        let tasks = Arc::clone(&self.tasks);
        let timing = self.timing;
        let internal = self.internal_tx.clone();
        let span = request_span(request_id);
        self.resumes.spawn(
            async move {
                let undurable = match durable {
                    Some(durable) => durable.await.err(),
                    None => None,
                }
                // A denial releases nothing: it needs no record to be applied.
                .filter(|_| decision.verdict == Verdict::Allow);
                let verdict = if undurable.is_some() {
                    Verdict::Deny
                } else {
                    decision.verdict
                };
                let outcome = resume(kernel.as_ref(), tasks.as_ref(), timing, pid, task, verdict)
                    .await
                    .map_err(|err| err.to_string());
                let _ = internal.send(Internal::Resumed {
                    tid,
                    request_id,
                    decision,
                    outcome,
                    first,
                    undurable,
                });
            }
            .instrument(span),
        );
    }

    /// Compares the kernel's pending requests with the tracked ones.
    pub async fn reconcile(&mut self) {
        let tracked: HashSet<(u32, u64)> = self
            .tracked
            .iter()
            .map(|(tid, t)| (*tid, t.digest))
            .collect();
        let reconciled = match reconcile(
            self.kernel.as_ref(),
            self.tasks.as_ref(),
            self.timing,
            &tracked,
        )
        .await
        {
            Ok(reconciled) => reconciled,
            Err(err) => {
                tracing::error!(error = %err, "reconciling pending requests failed");
                return;
            }
        };
        for finding in &reconciled.findings {
            match *finding {
                Finding::Dead { tid, pending } => {
                    self.stats.abandoned += 1;
                    let payload = self.untracked_outcome(
                        pending.policy_id,
                        RequestKind::from_raw(pending.kind),
                        pending.pid,
                        tid,
                        pending.digest,
                        None,
                        "found by the reconciler: the task is gone",
                    );
                    self.record(RecordKind::Abandoned, None, None, &payload);
                }
                Finding::Reasked { tid, pending } => {
                    self.stats.reasked += 1;
                    tracing::info!(
                        tid,
                        pid = pending.pid,
                        "asking a paused request again (its event was missed)"
                    );
                    let first = self
                        .reasked
                        .get(&(tid, pending.digest))
                        .map_or(pending.created_ns, |(first, _pid)| *first);
                    self.reasked.insert(
                        (tid, pending.digest),
                        (first.min(pending.created_ns), pending.pid),
                    );
                }
            }
        }
        // Re-asked requests whose task died before asking again.
        let tasks = Arc::clone(&self.tasks);
        self.reasked
            .retain(|(tid, _), (_, pid)| tasks.state(*pid, *tid) != TaskState::Gone);
        if reconciled.expired_verdicts > 0 {
            tracing::debug!(
                count = reconciled.expired_verdicts,
                "removed expired verdicts"
            );
        }
        self.check_tracked(&reconciled.pending);
    }

    /// Tracked requests the kernel no longer holds are dropped (and recorded
    /// if undecided); decided ones whose task stopped again before using
    /// its verdict get the verdict again.
    fn check_tracked(&mut self, pending: &HashMap<u32, gatekeep_common::PendingRequest>) {
        let grace = self.timing.grace;
        let mut vanished = Vec::new();
        let mut retry = Vec::new();
        for (tid, tracked) in &self.tracked {
            let in_kernel = pending
                .get(tid)
                .is_some_and(|p| p.digest == tracked.digest && p.start_ns == tracked.start_ns);
            match tracked.stage {
                Stage::Resumed { at, verdict } if at.elapsed() >= grace => {
                    if in_kernel {
                        // Continued, but stopped again before it used the
                        // verdict (a sibling thread's pause): write it again.
                        retry.push((*tid, verdict));
                    } else {
                        vanished.push((*tid, false));
                    }
                }
                Stage::Deciding if !in_kernel && tracked.asked_at.elapsed() >= grace => {
                    vanished.push((*tid, true));
                }
                _ => {}
            }
        }
        for (tid, record) in vanished {
            let Some(tracked) = self.tracked.remove(&tid) else {
                continue;
            };
            if let Some(task) = &tracked.decision_task {
                task.abort();
            }
            if record {
                let gone = self.tasks.state(tracked.pid, tid) == TaskState::Gone;
                self.decider.withdraw(
                    tracked.id(),
                    if gone {
                        Withdrawal::TaskExited
                    } else {
                        Withdrawal::Superseded
                    },
                    "the kernel no longer holds this request",
                );
                let kind = if gone {
                    RecordKind::Abandoned
                } else {
                    RecordKind::Cancelled
                };
                let (state, cause) = if gone {
                    (RequestState::Abandoned, "task_exited")
                } else {
                    (RequestState::Cancelled, "vanished")
                };
                let payload = payload::Outcome {
                    cause: Some(Cow::Borrowed(cause)),
                    detail: Some(Cow::Borrowed("the kernel no longer holds this request")),
                    ..tracked.outcome(tid, state, None, "")
                };
                self.record(kind, Some(tracked.id()), None, &payload);
            }
        }
        for (tid, verdict) in retry {
            if let Some(tracked) = self.tracked.get_mut(&tid) {
                tracked.stage = Stage::Resuming;
                let decision = Decision {
                    verdict,
                    actor: "agent".to_owned(),
                    reason: "verdict written again: the task stopped before using it".to_owned(),
                    expired: false,
                    service: None,
                };
                self.spawn_resume(tid, decision, false, None);
            }
        }
    }

    /// Stops: lets resumes in flight finish (a written verdict is best
    /// followed by its SIGCONT), drops undecided requests (their tasks stay
    /// stopped) and records them as cancelled.
    pub async fn shutdown(mut self) -> Stats {
        self.decisions.abort_all();
        let finish = async { while let Some(_done) = self.resumes.join_next().await {} };
        if tokio::time::timeout(self.timing.stop_wait + Duration::from_secs(1), finish)
            .await
            .is_err()
        {
            tracing::warn!("resumes still running at shutdown; the next agent finishes them");
        }
        self.drain_internal();
        self.record_denial_bursts(SystemTime::now(), true);
        for (tid, tracked) in std::mem::take(&mut self.tracked) {
            if tracked.stage == Stage::Deciding || tracked.stage == Stage::Resuming {
                let payload = payload::Outcome {
                    cause: Some(Cow::Borrowed("agent_stopped")),
                    detail: Some(Cow::Borrowed(
                        "the agent stopped before a decision; the task stays paused and the next agent asks again",
                    )),
                    ..tracked.outcome(tid, RequestState::Cancelled, None, "")
                };
                self.record(RecordKind::Cancelled, Some(tracked.id()), None, &payload);
            }
        }
        self.stats
    }

    /// A `kernel_denied` payload for a request the kernel refused by policy.
    /// An exec met a stale rule: one warning and one `rule_stale` record per
    /// rule, policy load and content found (a loop of execs is one report).
    fn handle_stale_rule(&mut self, stale: &crate::hooks::exec::StaleRule) {
        const MAX_REMEMBERED: usize = 4096;
        let key = (stale.origin.policy_id, stale.dev, stale.ino, stale.found);
        if self.stale_reported.contains(&key) {
            return;
        }
        if self.stale_reported.len() >= MAX_REMEMBERED {
            self.stale_reported.clear();
        }
        self.stale_reported.insert(key);
        let policy = self.policy(stale.origin.policy_id);
        let info = self
            .recent_denials
            .enrich(&self.enricher, stale.origin.pid, stale.origin.uid);
        let payload = crate::hooks::exec::stale_payload(
            stale,
            policy
                .as_deref()
                .map(|p| (p.policy.name.as_str(), &p.hooks)),
            &info,
        );
        tracing::warn!(
            policy = payload.policy.as_deref().unwrap_or("?"),
            path = %payload.path.as_deref().unwrap_or("?").escape_debug(),
            dev = stale.dev,
            ino = stale.ino,
            rule_action = payload.rule_action,
            applied = payload.applied,
            pid = stale.origin.pid,
            "exec rule is stale: its file was rewritten since the policy was loaded, so the \
             rule no longer matches; reload the policy to bind the rule to the file's new content"
        );
        self.record(RecordKind::RuleStale, None, Some("kernel"), &payload);
    }

    /// Counts a kernel denial, or (`would`: what enforcement would have done) an action a
    /// policy in audit mode let through, into its burst: identical ones (same policy,
    /// cgroup, user, kind, target and `would`) make one record, written when the burst
    /// ends.
    fn add_to_burst(&mut self, request: &Request, would: Option<u32>) {
        self.add_to_burst_with(request, would, None);
    }

    /// [`Self::add_to_burst`], naming `rule` instead of the kernel rule.
    fn add_to_burst_with(&mut self, request: &Request, would: Option<u32>, rule: Option<String>) {
        let origin = request.origin();
        let would = would.map(would_name);
        let mut target = request.burst_key(&self.enricher);
        if let Some(would) = would {
            target = format!("{would} {target}");
        }
        let key = (
            origin.policy_id,
            origin.cgroup_id,
            origin.uid,
            request.model_kind().as_str(),
            target,
        );
        let now = SystemTime::now();
        // Identical to an open burst's first: counted, recorded with it.
        if !self.denials.add_if_open(&key, 1, now) {
            let info = self
                .recent_denials
                .enrich(&self.enricher, origin.pid, origin.uid);
            let mut payload = self.kernel_denied(request, &info);
            payload.would = would.map(str::to_owned);
            if rule.is_some() {
                payload.rule = rule;
            }
            self.denials.add(key, 1, now, || payload);
        }
    }

    fn kernel_denied(&self, request: &Request, info: &Enrichment) -> payload::KernelDenied {
        let origin = request.origin();
        let policy = self.policy(origin.policy_id);
        let because = request.denied_because();
        payload::KernelDenied {
            schema: Schema::default(),
            kind: request.model_kind(),
            policy: policy.as_ref().map(|p| p.policy.name.clone()),
            rule: policy.map(|p| p.rule_for(request)),
            process: request::process(origin, info),
            target: Some(request.target(&self.enricher)),
            kernel: request.kernel_facts(),
            reason: because.map(|(reason, _)| reason.to_owned()),
            detail: because.map(|(_, detail)| detail.to_owned()),
            count: None,
            first_at: None,
            last_at: None,
            would: None,
        }
    }

    /// Records the denial bursts that ended by `now` (all of them with `all`).
    fn record_denial_bursts(&mut self, now: SystemTime, all: bool) {
        let closed = if all {
            self.denials.drain()
        } else {
            self.denials.close(now)
        };
        for burst in closed {
            let at = |at: SystemTime| gatekeep_audit::timestamp::format(at.into()).ok();
            let payload = payload::KernelDenied {
                count: Some(burst.count),
                first_at: at(burst.first_seen),
                last_at: at(burst.last_seen),
                ..burst.value
            };
            let kind = if payload.would.is_some() {
                RecordKind::Audited
            } else {
                RecordKind::KernelDenied
            };
            self.record(kind, None, Some("kernel"), &payload);
        }
    }
}

/// How an `audited` record names what enforcement would have done.
/// The span of a request's decision and resume tasks: their log lines (the decider's, the
/// resume's) carry `request_id` in the JSON logs.
fn request_span(id: Uuid) -> tracing::Span {
    tracing::info_span!("request", request_id = %id)
}

fn would_name(action: u32) -> &'static str {
    if action == gatekeep_common::action::DENY {
        "deny"
    } else {
        "ask"
    }
}

/// Kernel policy denials that are identical: policy id, cgroup id, uid, kind and the target
/// (as JSON: executable and argv, or destination).
type DenialKey = (u32, u64, u32, &'static str, String);

/// The model's kind of a kernel request kind (a kind no registered hook writes, which
/// the kernel never reports, is reported as exec).
fn model_kind(kind: RequestKind) -> Kind {
    crate::hooks::model_kind(kind.0).unwrap_or(Kind::Exec)
}

#[cfg(test)]
mod tests {
    use gatekeep_policy::parse_str;
    use serde_json::json;

    use super::*;
    use crate::{
        audit::MemorySink,
        bpf::testing::{ALLOW, DENY, FakeKernel, FakeTask},
        decision::LocalDecider,
        hooks::connect::{ConnectRequest, Destination, Via},
        policy::{HostView, compile},
    };

    fn policies(on_timeout: &str, timeout: &str) -> Arc<Compiled> {
        let text = format!(
            "[[policy]]\nname = \"agents\"\ncgroups = [\"/sys/fs/cgroup/agents\"]\n[policy.exec]\ndefault = \"ask\"\n[policy.approval]\ntimeout = \"{timeout}\"\non_timeout = \"{on_timeout}\"\n"
        );
        let set = parse_str("t.toml", &text).expect("policy");
        let dir = tempfile::tempdir().expect("tempdir");
        let host = HostView {
            cgroup_root: dir.path().to_owned(),
            own_cgroup: None,
            protected: Vec::new(),
        };
        // FakeKernel's events carry policy id 1.
        Arc::new(compile(&set, &[1], 1, &host).expect("compile"))
    }

    struct Rig {
        kernel: Arc<FakeKernel>,
        audit: Arc<MemorySink>,
        controller: Controller<FakeKernel, FakeKernel, LocalDecider, MemorySink>,
    }

    fn rig(on_timeout: &str, timeout: &str) -> Rig {
        let kernel = Arc::new(FakeKernel::default());
        let audit = Arc::new(MemorySink::default());
        let controller = Controller::new(Parts {
            kernel: Arc::clone(&kernel),
            tasks: Arc::clone(&kernel),
            decider: Arc::new(LocalDecider),
            audit: Arc::clone(&audit),
            enricher: Arc::new(Enricher::new(
                "/nonexistent-proc",
                std::path::Path::new("/nonexistent"),
            )),
            host: "test-host".into(),
            timing: PauseTiming::default(),
            policies: policies(on_timeout, timeout),
        });
        Rig {
            kernel,
            audit,
            controller,
        }
    }

    impl Rig {
        /// Feeds every event the fake kernel emitted into the controller.
        async fn pump(&mut self) {
            for event in self.kernel.take_events() {
                self.controller.handle_event(event).await;
            }
        }

        fn kinds(&self) -> Vec<RecordKind> {
            self.audit.records().iter().map(|r| r.kind).collect()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn asked_exec_is_allowed_at_the_timeout_and_recorded() {
        let mut rig = rig("allow", "2s");
        rig.kernel
            .spawn_task(FakeTask::asking(100, 100, 7).stopped());
        let started = Instant::now();
        let ask = rig.kernel.ask_event(100);
        rig.controller.handle_event(ask).await;
        assert_eq!(rig.controller.tracked_count(), 1);
        rig.controller.step_internal().await; // decided
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "decided before the timeout"
        );
        rig.controller.step_internal().await; // resumed
        assert_eq!(rig.kernel.result_of(100), Some(ALLOW));
        rig.pump().await; // VERDICT_APPLIED
        assert_eq!(rig.controller.tracked_count(), 0);
        assert_eq!(rig.kinds(), [RecordKind::Requested, RecordKind::Expired]);
        let records = rig.audit.records();
        assert_eq!(records[0].request_id, records[1].request_id);
        let requested = &records[0].payload;
        assert_eq!(requested["schema"], gatekeep_proto::audit::SCHEMA_VERSION);
        assert_eq!(requested["request"]["rule"], "exec default ask");
        assert_eq!(requested["request"]["target"]["argv"], json!(["tool", "7"]));
        // One id: the record's, the request's, and a valid request id.
        let id = records[0].request_id.clone().expect("request id");
        assert_eq!(requested["request"]["id"], id.as_str());
        assert!(gatekeep_proto::id::parse(&id).is_ok(), "{id}");
        assert_eq!(records[1].payload["verdict"], "allow");
        assert_eq!(records[1].payload["state"], "expired");
        assert_eq!(records[1].actor.as_deref(), Some("timeout"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_truncated_exec_is_denied_at_the_timeout_even_when_the_policy_allows() {
        let mut rig = rig("allow", "2s");
        rig.kernel
            .spawn_task(FakeTask::asking(100, 100, 7).stopped());
        let Event::Ask(Request::Exec(mut exec)) = rig.kernel.ask_event(100) else {
            unreachable!("an exec ask")
        };
        exec.argv_truncated = true;
        rig.controller
            .handle_event(Event::Ask(Request::Exec(exec)))
            .await;
        rig.controller.step_internal().await; // decided
        rig.controller.step_internal().await; // resumed
        assert_eq!(
            rig.kernel.result_of(100),
            Some(DENY),
            "never allowed unseen"
        );
        let records = rig.audit.records();
        let requested = &records[0].payload;
        assert_eq!(requested["request"]["target"]["argv_truncated"], true);
        assert_eq!(requested["request"]["on_timeout"], "deny");
    }

    #[tokio::test(start_paused = true)]
    async fn asked_exec_is_denied_when_the_policy_says_so() {
        let mut rig = rig("deny", "3s");
        rig.kernel
            .spawn_task(FakeTask::asking(100, 101, 7).stopped());
        let ask = rig.kernel.ask_event(101);
        rig.controller.handle_event(ask).await;
        rig.controller.step_internal().await;
        rig.controller.step_internal().await;
        assert_eq!(rig.kernel.result_of(101), Some(DENY));
        assert!(
            rig.kernel.verdicts_now().is_empty(),
            "the verdict was consumed"
        );
        assert!(
            rig.kernel.pending_now().is_empty(),
            "no pending entry leaks"
        );
    }

    /// The rig's policy, with `/usr/bin/tool` (the fake kernel's exec, identity (1, 2))
    /// handed over for the command rules `commands`.
    fn with_commands(commands: &str) -> Arc<Compiled> {
        let text = format!(
            "[[policy]]\nname = \"agents\"\ncgroups = [\"/sys/fs/cgroup/agents\"]\n\
             [policy.exec]\ndefault = \"ask\"\n{commands}\
             [policy.approval]\ntimeout = \"24h\"\non_timeout = \"allow\"\n"
        );
        let set = parse_str("t.toml", &text).expect("policy");
        let dir = tempfile::tempdir().expect("tempdir");
        let host = HostView {
            cgroup_root: dir.path().to_owned(),
            own_cgroup: None,
            protected: Vec::new(),
        };
        let mut compiled = compile(&set, &[1], 1, &host).expect("compile");
        let loaded = Arc::get_mut(compiled.policies.get_mut(&1).expect("policy 1")).expect("own");
        let matcher = gatekeep_policy::ExecMatcher::new(&loaded.policy.exec, |path| {
            (path == std::path::Path::new("/usr/bin/tool")).then_some((1, 2))
        });
        loaded.hooks.exec.matching = crate::hooks::exec::matching::Matching {
            matcher: Some(Arc::new(matcher)),
            handed_over: [((1, 2), (gatekeep_common::ContentVersion::default(), 0))].into(),
        };
        Arc::new(compiled)
    }

    #[tokio::test(start_paused = true)]
    async fn command_rules_that_allow_or_deny_are_answered_by_the_agent_without_a_reviewer() {
        // The fake exec's argv is ["tool", "<digest in hex>"].
        for (rule, verdict) in [("allow", ALLOW), ("deny", DENY)] {
            let mut rig = rig("allow", "24h");
            rig.controller.set_policies(with_commands(&format!(
                "[[policy.exec.command]]\nargv = [\"/usr/bin/tool\", \"*\"]\naction = \"{rule}\"\n"
            )));
            rig.kernel
                .spawn_task(FakeTask::asking(100, 101, 0xabc).stopped());
            let ask = rig.kernel.ask_event(101);
            rig.controller.handle_event(ask).await;
            rig.controller.step_internal().await; // decided, by the matcher
            rig.controller.step_internal().await; // resumed
            assert_eq!(rig.kernel.result_of(101), Some(verdict), "{rule}");
            assert_eq!(rig.controller.stats.matched, 1);
            let records = rig.audit.records();
            assert_eq!(records[0].kind, RecordKind::Requested);
            assert_eq!(
                records[0].payload["request"]["rule"],
                format!("exec command {rule} [\"/usr/bin/tool\", \"*\"]")
            );
            assert_eq!(records[1].kind, RecordKind::Decided);
            assert_eq!(records[1].actor.as_deref(), Some("policy"), "no reviewer");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_rule_that_asks_goes_to_the_decider() {
        let mut rig = rig("allow", "24h");
        rig.controller.set_policies(with_commands(
            "[[policy.exec.command]]\nargv = [\"/usr/bin/tool\", \"**\"]\naction = \"ask\"\n",
        ));
        rig.kernel
            .spawn_task(FakeTask::asking(100, 101, 0xabc).stopped());
        let ask = rig.kernel.ask_event(101);
        rig.controller.handle_event(ask).await;
        rig.controller.step_internal().await;
        rig.controller.step_internal().await;
        assert_eq!(
            rig.kernel.result_of(101),
            Some(ALLOW),
            "the timeout's allow"
        );
        assert_eq!(rig.controller.stats.matched, 0);
        let records = rig.audit.records();
        assert_eq!(
            records[0].payload["request"]["rule"],
            "exec command ask [\"/usr/bin/tool\", \"**\"]"
        );
        assert_eq!(
            records[1].actor.as_deref(),
            Some("timeout"),
            "the decider decided"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_dying_while_paused_is_abandoned_and_never_resumed() {
        let mut rig = rig("allow", "60s");
        rig.kernel
            .spawn_task(FakeTask::asking(100, 100, 7).stopped());
        let ask = rig.kernel.ask_event(100);
        rig.controller.handle_event(ask).await;
        rig.kernel.kill(100);
        rig.pump().await; // ABANDONED
        assert_eq!(rig.controller.tracked_count(), 0);
        assert_eq!(rig.kinds(), [RecordKind::Requested, RecordKind::Abandoned]);
        // The decision was dropped: nothing arrives even after the timeout.
        tokio::time::sleep(Duration::from_mins(2)).await;
        rig.controller.drain_internal();
        assert!(rig.kernel.verdicts_now().is_empty());
        assert_eq!(rig.kinds().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn rewritten_argv_supersedes_and_only_the_new_request_is_decided() {
        let mut rig = rig("allow", "2s");
        rig.kernel
            .spawn_task(FakeTask::asking(100, 100, 7).stopped());
        let ask = rig.kernel.ask_event(100);
        rig.controller.handle_event(ask).await;
        // A stray SIGCONT, and meanwhile a sibling rewrote argv: the
        // restarted exec asks about something else.
        rig.kernel.change_request(100, 8);
        nix_free_sigcont(&rig.kernel, 100);
        rig.pump().await;
        let records = rig.audit.records();
        assert_eq!(
            rig.kinds(),
            [
                RecordKind::Requested,
                RecordKind::Cancelled,
                RecordKind::Requested
            ]
        );
        assert_eq!(records[1].payload["cause"], "superseded");
        assert_ne!(records[0].request_id, records[2].request_id);
        // The new request is decided; the verdict names the new digest only.
        rig.controller.step_internal().await;
        rig.controller.step_internal().await;
        assert_eq!(rig.kernel.result_of(100), Some(ALLOW));
        assert_eq!(rig.kinds().last(), Some(&RecordKind::Expired));
        assert_eq!(
            rig.audit
                .records()
                .last()
                .and_then(|r| r.request_id.clone()),
            records[2].request_id
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_verdict_waits_until_the_request_and_the_decision_are_durable() {
        let mut rig = rig("allow", "2s");
        let gate = rig.audit.gate_durable();
        rig.kernel
            .spawn_task(FakeTask::asking(100, 100, 7).stopped());
        let ask = rig.kernel.ask_event(100);
        rig.controller.handle_event(ask).await;
        rig.controller.step_internal().await; // decided: recorded, waiting to be durable
        assert_eq!(rig.kinds(), [RecordKind::Requested, RecordKind::Expired]);
        tokio::time::sleep(Duration::from_mins(1)).await;
        rig.controller.drain_internal();
        assert_eq!(
            rig.kernel.result_of(100),
            None,
            "released before it was durable"
        );
        assert!(rig.kernel.is_stopped(100));
        gate.add_permits(1);
        rig.controller.step_internal().await; // resumed
        assert_eq!(rig.kernel.result_of(100), Some(ALLOW));
    }

    #[tokio::test(start_paused = true)]
    async fn asks_are_denied_at_once_while_the_log_cannot_be_written() {
        let mut rig = rig("allow", "60s");
        rig.audit.set_unwritable(true);
        rig.kernel
            .spawn_task(FakeTask::asking(100, 100, 7).stopped());
        let started = Instant::now();
        let ask = rig.kernel.ask_event(100);
        rig.controller.handle_event(ask).await;
        rig.controller.step_internal().await;
        rig.controller.step_internal().await;
        assert_eq!(started.elapsed(), Duration::ZERO, "nobody was asked");
        assert_eq!(rig.kernel.result_of(100), Some(DENY));
        let records = rig.audit.records();
        assert_eq!(rig.kinds(), [RecordKind::Requested, RecordKind::Decided]);
        assert_eq!(records[1].payload["verdict"], "deny");
        assert_eq!(records[1].payload["state"], "denied");
        assert_eq!(records[1].payload["cause"], "audit_unavailable");
        assert_eq!(records[1].actor.as_deref(), Some("agent"));
        assert_eq!(rig.controller.stats.decided, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_allow_that_cannot_be_made_durable_is_denied_and_says_why() {
        let mut rig = rig("allow", "2s");
        rig.kernel
            .spawn_task(FakeTask::asking(100, 100, 7).stopped());
        let ask = rig.kernel.ask_event(100);
        rig.controller.handle_event(ask).await;
        // The disk fills while the request waits.
        rig.audit.set_unwritable(true);
        rig.controller.step_internal().await;
        rig.controller.step_internal().await;
        assert_eq!(rig.kernel.result_of(100), Some(DENY));
        let records = rig.audit.records();
        assert_eq!(
            rig.kinds(),
            [
                RecordKind::Requested,
                RecordKind::Expired,
                RecordKind::Decided
            ]
        );
        assert_eq!(records[1].payload["verdict"], "allow");
        assert_eq!(records[2].payload["verdict"], "deny");
        assert_eq!(records[2].payload["cause"], "audit_unavailable");
        assert!(
            records[2].payload["detail"]
                .as_str()
                .is_some_and(|d| d.contains("disk is full")),
            "{}",
            records[2].payload
        );
    }

    fn nix_free_sigcont(kernel: &FakeKernel, pid: u32) {
        crate::pause::resume::Tasks::sigcont(kernel, pid).expect("sigcont");
    }

    #[tokio::test(start_paused = true)]
    async fn stale_ask_events_are_ignored() {
        let mut rig = rig("allow", "2s");
        rig.kernel
            .spawn_task(FakeTask::asking(100, 100, 7).stopped());
        let ask = rig.kernel.ask_event(100);
        rig.kernel.change_request(100, 9);
        nix_free_sigcont(&rig.kernel, 100);
        rig.kernel.take_events();
        // The event for digest 7 arrives late: the kernel now waits on 9.
        rig.controller.handle_event(ask).await;
        assert_eq!(rig.controller.tracked_count(), 0);
        assert_eq!(rig.controller.stats.stale_events, 1);
        assert!(rig.audit.records().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_restart_untracked_requests_are_reasked_and_keep_their_deadline() {
        let mut rig = rig("deny", "10s");
        // Paused 4 s ago under a previous agent; its event is long gone.
        rig.kernel
            .spawn_task(FakeTask::asking(300, 301, 5).stopped().created_secs_ago(4));
        let started = Instant::now();
        rig.controller.reconcile().await;
        assert_eq!(rig.controller.stats.reasked, 1);
        rig.pump().await; // the fresh ask event
        assert_eq!(rig.controller.tracked_count(), 1);
        rig.controller.step_internal().await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(7),
            "deadline counts from the first pause (10 s - 4 s), waited {waited:?}"
        );
        rig.controller.step_internal().await;
        assert_eq!(rig.kernel.result_of(301), Some(DENY));
    }

    #[tokio::test(start_paused = true)]
    async fn events_read_before_shutdown_are_recorded() {
        let rig = rig("allow", "60s");
        let (events_tx, events_rx) = mpsc::channel(4);
        let (_policies_tx, policies_rx) = watch::channel(policies("allow", "60s"));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let denied = |n: u8| {
            Event::Denied(Request::Connect(ConnectRequest {
                origin: Origin {
                    policy_id: 1,
                    pid: 100,
                    tid: 100,
                    uid: 0,
                    gid: 0,
                    ppid: 1,
                    cgroup_id: 99,
                    ktime_ns: 0,
                    digest: 0,
                    comm: "worker".into(),
                },
                destination: Destination::Ip {
                    addr: std::net::IpAddr::from([169, 254, 169, n]),
                    port: 80,
                },
                sock_type: 1,
                via: Via::Connect,
                resolved: Vec::new(),
            }))
        };
        // Read by the reader, queued, and the stop signal already given.
        events_tx.send(vec![denied(1), denied(2)]).await.unwrap();
        events_tx.send(vec![denied(3)]).await.unwrap();
        drop(events_tx);
        shutdown_tx.send(true).unwrap();
        let stats = rig
            .controller
            .run(events_rx, policies_rx, shutdown_rx, Duration::from_secs(1))
            .await;
        assert_eq!(stats.kernel_denied, 3);
        let denied = rig
            .audit
            .records()
            .iter()
            .filter(|r| r.kind == RecordKind::KernelDenied)
            .count();
        assert_eq!(denied, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn identical_kernel_denials_are_one_record_per_burst_with_their_count() {
        let mut rig = rig("allow", "60s");
        let denied = |n: u8| {
            Event::Denied(Request::Connect(ConnectRequest {
                origin: Origin {
                    policy_id: 1,
                    pid: 100,
                    tid: 100,
                    uid: 0,
                    gid: 0,
                    ppid: 1,
                    cgroup_id: 99,
                    ktime_ns: 0,
                    digest: 0,
                    comm: "worker".into(),
                },
                destination: Destination::Ip {
                    addr: std::net::IpAddr::from([169, 254, 169, n]),
                    port: 80,
                },
                sock_type: 1,
                via: Via::Connect,
                resolved: Vec::new(),
            }))
        };
        for _ in 0..5_000 {
            rig.controller.handle_event(denied(1)).await;
        }
        rig.controller.handle_event(denied(2)).await;
        assert!(
            rig.audit.records().is_empty(),
            "recorded per burst, not per denial"
        );
        rig.controller
            .record_denial_bursts(SystemTime::now() + BURST_QUIET, false);
        let records = rig.audit.records();
        assert_eq!(records.len(), 2, "{records:?}");
        let count = |r: &AuditRecord| r.payload["count"].as_u64();
        let first = records
            .iter()
            .find(|r| r.payload["target"]["address"] == "169.254.169.1")
            .expect("the flood's record");
        assert_eq!(count(first), Some(5_000));
        assert!(first.payload["first_at"].is_string() && first.payload["last_at"].is_string());
        assert_eq!(first.actor.as_deref(), Some("kernel"));
        let other = records
            .iter()
            .find(|r| r.payload["target"]["address"] == "169.254.169.2")
            .expect("the other destination's record");
        assert_eq!(count(other), Some(1));
        assert_eq!(rig.controller.stats.kernel_denied, 5_001);
        // A later denial opens a new burst.
        rig.controller.handle_event(denied(1)).await;
        rig.controller.shutdown().await;
        assert_eq!(rig.audit.records().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_leaves_tasks_paused_and_records_them_cancelled() {
        let mut rig = rig("allow", "60s");
        rig.kernel
            .spawn_task(FakeTask::asking(100, 100, 7).stopped());
        let ask = rig.kernel.ask_event(100);
        rig.controller.handle_event(ask).await;
        let Rig {
            kernel,
            audit,
            controller,
        } = rig;
        controller.shutdown().await;
        assert!(kernel.is_stopped(100), "fail closed: still paused");
        assert!(kernel.pending_now().contains_key(&100));
        assert!(kernel.verdicts_now().is_empty());
        let kinds: Vec<RecordKind> = audit.records().iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [RecordKind::Requested, RecordKind::Cancelled]);
        assert_eq!(audit.records()[1].payload["cause"], "agent_stopped");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_of_unknown_policy_ids_are_asked_again() {
        let mut rig = rig("allow", "2s");
        rig.kernel
            .spawn_task(FakeTask::asking(100, 100, 7).stopped());
        let Event::Ask(Request::Exec(mut request)) = rig.kernel.ask_event(100) else {
            panic!("exec ask");
        };
        request.origin.policy_id = 42;
        rig.controller
            .handle_event(Event::Ask(Request::Exec(request)))
            .await;
        assert_eq!(rig.controller.tracked_count(), 0);
        let events = rig.kernel.take_events();
        assert_eq!(events.len(), 1, "the task was continued and asked again");
    }

    #[tokio::test(start_paused = true)]
    async fn run_loop_decides_and_stops_on_shutdown() {
        let rig = rig("allow", "1s");
        rig.kernel
            .spawn_task(FakeTask::asking(100, 100, 7).stopped());
        let (events_tx, events_rx) = mpsc::channel(8);
        let (_policies_tx, policies_rx) = watch::channel(policies("allow", "1s"));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let kernel = Arc::clone(&rig.kernel);
        let run = tokio::spawn(rig.controller.run(
            events_rx,
            policies_rx,
            shutdown_rx,
            Duration::from_secs(1),
        ));
        events_tx
            .send(vec![kernel.ask_event(100)])
            .await
            .expect("send");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(kernel.result_of(100), Some(ALLOW));
        shutdown_tx.send(true).expect("shutdown");
        let stats = run.await.expect("join");
        assert_eq!(stats.asked, 1);
        assert_eq!(stats.decided, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_exec_rule_is_reported_once_per_content_with_its_path() {
        use std::os::unix::fs::MetadataExt as _;

        use gatekeep_common::{ContentVersion, action};

        use crate::hooks::exec::StaleRule;

        let dir = tempfile::tempdir().expect("tempdir");
        // A rule path with a control character: escaped in the log, JSON in the record.
        let tool = dir.path().join("tool\u{1b}[31m");
        std::fs::write(&tool, b"v1").expect("write tool");
        let meta = std::fs::metadata(&tool).expect("stat");
        let text = format!(
            "[[policy]]\nname = \"agents\"\ncgroups = [\"/sys/fs/cgroup/agents\"]\n[policy.exec]\ndefault = \"deny\"\nallow = [{}]\n",
            serde_json::to_string(&tool).expect("json path")
        );
        let set = parse_str("t.toml", &text).expect("policy");
        let host = HostView {
            cgroup_root: dir.path().to_owned(),
            own_cgroup: None,
            protected: Vec::new(),
        };
        let mut rig = rig("deny", "5m");
        rig.controller
            .set_policies(Arc::new(compile(&set, &[1], 2, &host).expect("compile")));

        let (dev, ino) = (crate::hooks::exec::kernel_dev(meta.dev()), meta.ino());
        let bound = ContentVersion {
            ctime_sec: 10,
            ctime_nsec: 1,
            generation: 0,
            size: 2,
        };
        let stale = |size: i64| {
            Event::ExecRuleStale(StaleRule {
                origin: Origin {
                    policy_id: 1,
                    pid: 40,
                    tid: 40,
                    uid: 65534,
                    gid: 65534,
                    ppid: 1,
                    cgroup_id: 7,
                    ktime_ns: 1,
                    digest: 0xfeed,
                    comm: "sh".into(),
                },
                dev,
                ino,
                bound,
                found: ContentVersion { size, ..bound },
                rule_action: action::ALLOW,
                applied_action: action::DENY,
                rule_flags: 0,
            })
        };
        // A loop of execs of the rewritten file: one report.
        for _ in 0..3 {
            rig.controller.handle_event(stale(3)).await;
        }
        // Rewritten again: reported again.
        rig.controller.handle_event(stale(4)).await;

        let records = rig.audit.records();
        assert_eq!(
            records.iter().map(|r| r.kind).collect::<Vec<_>>(),
            [RecordKind::RuleStale, RecordKind::RuleStale]
        );
        let payload = &records[0].payload;
        assert_eq!(payload["schema"], 2);
        assert_eq!(payload["kind"], "exec");
        assert_eq!(payload["policy"], "agents");
        assert_eq!(payload["path"], tool.to_str().expect("utf8"));
        assert_eq!(
            payload["rule"],
            format!("exec allow {}", tool.display()).as_str()
        );
        assert_eq!(payload["rule_action"], "allow");
        assert_eq!(payload["applied"], "deny");
        assert_eq!(
            payload["bound"],
            json!({"ctime_sec": 10, "ctime_nsec": 1, "size": 2, "generation": null})
        );
        assert_eq!(payload["found"]["size"], 3);
        assert_eq!(payload["dev"], dev);
        assert_eq!(payload["ino"], ino);
        assert_eq!(payload["process"]["uid"], 65534);
        assert_eq!(records[0].actor.as_deref(), Some("kernel"));
        assert_eq!(records[1].payload["found"]["size"], 4);
    }
}
