//! The decision boundary: who says allow or deny for a paused request.
//!
//! [`Decider`] is what the agent asks. [`LocalDecider`] applies the policy's
//! `on_timeout` action once the approval timeout passes;
//! [`RemoteDecider`](crate::decision::remote::RemoteDecider) asks the decision service
//! (embedded or central) behind the same trait.
//! Whatever the decider does, [`decide_by_deadline`] guarantees an answer at
//! the deadline (the policy's timeout action) and retries a failing decider
//! until then.

//!
//! Submodules: [`remote`] (the decision service behind [`Decider`]),
//! [`embedded`] (that service run in-process), [`service`] (which decider,
//! as the configuration says) and [`grants`] (what a decision with a
//! duration leaves in the kernel).

pub mod embedded;
pub mod grants;
pub mod remote;
pub mod service;

use std::{future::Future, sync::Arc, time::Duration};

use gatekeep_policy::Action;
use gatekeep_proto::{
    audit::KernelFacts,
    model::{self, ApprovalRequest, RequestState},
};
use gatekeep_util::retry::{Backoff, retry_until};
use serde::Serialize;
use tokio::time::Instant;
use uuid::Uuid;

/// A paused request, as put to a decider: the request in the domain model (see
/// [`crate::pause::request`]) and what only the agent needs about it.
#[derive(Debug, Clone)]
pub struct DecisionRequest {
    /// What is asked, with its context, under the one request id: what the service stores
    /// and both audit logs carry.
    pub request: ApprovalRequest,
    /// What the kernel reported (its digest binds a grant to the very same request).
    pub kernel: KernelFacts,
    /// The kernel's digest of the request.
    pub digest: u64,
    /// Approval timeout of the policy.
    pub timeout: Duration,
    /// When the decision is due: the request's first sighting plus `timeout`.
    pub deadline: Instant,
}

impl DecisionRequest {
    /// The request id.
    #[must_use]
    pub fn id(&self) -> Uuid {
        self.request.id
    }

    /// What happens at the deadline.
    #[must_use]
    pub fn on_timeout(&self) -> Verdict {
        Verdict::from(self.request.on_timeout)
    }
}

/// Why the agent no longer wants a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawal {
    /// The asking task exited.
    TaskExited,
    /// The task asked something else, or the kernel dropped the request.
    Superseded,
    /// The agent's deadline came before any answer: the timeout action was applied.
    DeadlinePassed,
}

/// The two outcomes a paused syscall can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

impl From<model::Verdict> for Verdict {
    fn from(verdict: model::Verdict) -> Self {
        match verdict {
            model::Verdict::Allow => Verdict::Allow,
            model::Verdict::Deny => Verdict::Deny,
        }
    }
}

impl From<Verdict> for model::Verdict {
    fn from(verdict: Verdict) -> Self {
        match verdict {
            Verdict::Allow => model::Verdict::Allow,
            Verdict::Deny => model::Verdict::Deny,
        }
    }
}

impl Verdict {
    /// `on_timeout` of a policy: `allow` allows, anything else denies (the
    /// policy loader admits only allow or deny; fail closed regardless).
    #[must_use]
    pub fn from_policy(action: Action) -> Self {
        match action {
            Action::Allow => Verdict::Allow,
            Action::Deny | Action::Ask => Verdict::Deny,
        }
    }

    /// The kernel's [`gatekeep_common::action`] value.
    #[must_use]
    pub fn kernel_action(self) -> u32 {
        match self {
            Verdict::Allow => gatekeep_common::action::ALLOW,
            Verdict::Deny => gatekeep_common::action::DENY,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }
}

/// A decider's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    /// Who decided: a reviewer, a server rule, or `timeout`.
    pub actor: String,
    /// Why, in words.
    pub reason: String,
    /// Nobody decided before the deadline; the policy's timeout action applies.
    pub expired: bool,
    /// What the decision service said beyond the verdict (`None` for local decisions).
    pub service: Option<ServiceOutcome>,
}

/// The decision service's side of a decision, for the audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceOutcome {
    pub state: RequestState,
    /// `once`, or the granted duration.
    pub duration: String,
    /// The grant the decision made.
    pub grant_id: Option<Uuid>,
}

impl Decision {
    /// The policy's timeout action, applied at the deadline.
    #[must_use]
    pub fn expired(request: &DecisionRequest) -> Self {
        let on_timeout = request.on_timeout();
        Self {
            verdict: on_timeout,
            actor: "timeout".to_owned(),
            reason: format!(
                "no decision within {}; policy `{}` says {} on timeout",
                humantime::format_duration(request.timeout),
                request.request.policy,
                on_timeout.as_str()
            ),
            expired: true,
            service: None,
        }
    }
}

/// A decider could not answer (yet).
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("the decision service is unreachable")]
    Unreachable {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the decision service refused request `{request_id}`: {reason}")]
    Refused { request_id: Uuid, reason: String },
}

/// Decides paused requests. Implementations may take as long as a human
/// needs; the agent cancels the future (drops it) when the request goes
/// away (the task exited, or asked something else).
pub trait Decider: Send + Sync + 'static {
    fn decide(
        &self,
        request: Arc<DecisionRequest>,
    ) -> impl Future<Output = Result<Decision, DecideError>> + Send;

    /// The request `request_id` no longer needs a decision (its `decide`
    /// future, if any, is dropped too): tell whoever was asked.
    fn withdraw(&self, request_id: Uuid, reason: Withdrawal, detail: &str) {
        let _ = (request_id, reason, detail);
    }
}

/// Decides locally: nobody reviews, so every request waits for its policy's
/// timeout and gets the timeout action.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalDecider;

impl Decider for LocalDecider {
    async fn decide(&self, request: Arc<DecisionRequest>) -> Result<Decision, DecideError> {
        tokio::time::sleep_until(request.deadline).await;
        Ok(Decision::expired(&request))
    }
}

/// How long to wait before asking a failing decider again.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Asks `decider` until it answers, retrying failures, and gives the policy's
/// timeout action if the deadline comes first.
pub async fn decide_by_deadline<D: Decider>(
    decider: &D,
    request: Arc<DecisionRequest>,
) -> Decision {
    let answer = retry_until(
        request.deadline,
        Backoff::fixed(RETRY_DELAY),
        || decider.decide(Arc::clone(&request)),
        |err| {
            tracing::warn!(
                request_id = %request.id(),
                error = %err,
                "decider failed; retrying until the deadline"
            );
        },
    )
    .await;
    answer.unwrap_or_else(|| {
        // The deadline is monotonic; the service's is a wall-clock time that a clock set
        // back (or skewed) puts later. Tell the service, or it keeps listing the request.
        decider.withdraw(
            request.id(),
            Withdrawal::DeadlinePassed,
            "the agent's deadline passed first; it applied the policy's timeout action",
        );
        Decision::expired(&request)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn request(timeout: Duration, on_timeout: Verdict) -> Arc<DecisionRequest> {
        let now = time::OffsetDateTime::now_utc();
        Arc::new(DecisionRequest {
            request: ApprovalRequest {
                id: gatekeep_proto::id::mint(),
                policy: "agents".into(),
                rule: "default".into(),
                cgroup: "/agents".into(),
                pid: 1,
                tid: 1,
                uid: 0,
                user_name: None,
                cwd: None,
                ancestry: Vec::new(),
                target: model::Target::Exec(model::ExecTarget {
                    executable: "/bin/true".into(),
                    argv: vec!["true".into()],
                    content: None,
                    path_check: None,
                    named: None,
                    file: None,
                    mount_namespace: None,
                    argv_truncated: false,
                    env: Vec::new(),
                }),
                requested_at: now,
                deadline: now,
                on_timeout: on_timeout.into(),
                approval: model::ApprovalSettings::default(),
            },
            kernel: KernelFacts {
                policy_id: 1,
                digest: "0000000000000001".into(),
                cgroup_id: 1,
                ppid: 0,
                gid: 0,
                comm: "true".into(),
                exec: None,
                sock_type: None,
                call: None,
            },
            digest: 1,
            timeout,
            deadline: Instant::now() + timeout,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn local_decider_applies_the_timeout_action_at_the_deadline() {
        let started = Instant::now();
        let req = request(Duration::from_mins(2), Verdict::Allow);
        let decision = decide_by_deadline(&LocalDecider, Arc::clone(&req)).await;
        assert_eq!(decision.verdict, Verdict::Allow);
        assert!(decision.expired);
        assert_eq!(decision.actor, "timeout");
        // Virtual time: exactly the timeout passed, not less.
        assert!(started.elapsed() >= Duration::from_mins(2));

        let decision = decide_by_deadline(
            &LocalDecider,
            request(Duration::from_secs(5), Verdict::Deny),
        )
        .await;
        assert_eq!(decision.verdict, Verdict::Deny);
    }

    #[tokio::test(start_paused = true)]
    async fn local_decider_is_still_pending_before_the_deadline() {
        let req = request(Duration::from_mins(1), Verdict::Allow);
        let early = tokio::time::timeout(Duration::from_secs(59), LocalDecider.decide(req)).await;
        assert!(early.is_err(), "decided before the deadline");
    }

    /// Fails twice, then allows.
    struct Flaky {
        calls: AtomicU32,
    }

    impl Decider for Flaky {
        async fn decide(&self, request: Arc<DecisionRequest>) -> Result<Decision, DecideError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < 2 {
                return Err(DecideError::Refused {
                    request_id: request.id(),
                    reason: "busy".into(),
                });
            }
            Ok(Decision {
                verdict: Verdict::Allow,
                actor: "alice".into(),
                reason: "looks fine".into(),
                expired: false,
                service: None,
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failing_decider_is_retried_until_it_answers() {
        let flaky = Flaky {
            calls: AtomicU32::new(0),
        };
        let decision =
            decide_by_deadline(&flaky, request(Duration::from_mins(1), Verdict::Deny)).await;
        assert_eq!(decision.actor, "alice");
        assert!(!decision.expired);
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);
    }

    /// Never answers.
    struct Silent;

    impl Decider for Silent {
        async fn decide(&self, _request: Arc<DecisionRequest>) -> Result<Decision, DecideError> {
            std::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silent_decider_gets_the_timeout_action() {
        let decision =
            decide_by_deadline(&Silent, request(Duration::from_secs(3), Verdict::Deny)).await;
        assert_eq!(decision.verdict, Verdict::Deny);
        assert!(decision.expired);
        assert!(decision.reason.contains("3s"), "{}", decision.reason);
    }

    #[test]
    fn ask_on_timeout_fails_closed() {
        assert_eq!(Verdict::from_policy(Action::Ask), Verdict::Deny);
        assert_eq!(Verdict::from_policy(Action::Allow), Verdict::Allow);
        assert_eq!(
            Verdict::Allow.kernel_action(),
            gatekeep_common::action::ALLOW
        );
    }
}
