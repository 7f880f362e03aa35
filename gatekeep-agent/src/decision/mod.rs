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

use std::{future::Future, path::PathBuf, sync::Arc, time::Duration};

use gatekeep_policy::Action;
use gatekeep_proto::model::ApprovalSettings;
use serde::Serialize;
use tokio::time::Instant;

use crate::{hooks::connect::Destination, pause::enrich::Enrichment};

/// A paused request, as put to a decider.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRequest {
    /// Stable id of the request (audit records carry it).
    pub request_id: String,
    /// `exec` or `connect`.
    pub kind: &'static str,
    /// The policy that asked.
    pub policy: String,
    /// The policy's rule (or default) that said `ask`.
    pub rule: String,
    /// What is asked: executable + argv, or destination; plus enrichment.
    pub context: serde_json::Value,
    /// Approval timeout of the policy.
    #[serde(skip)]
    pub timeout: Duration,
    /// What happens at the deadline (`allow` or `deny`).
    #[serde(skip)]
    pub on_timeout: Verdict,
    /// When the decision is due: the request's first sighting plus `timeout`.
    #[serde(skip)]
    pub deadline: Instant,
    /// The request in typed form, for deciders that forward it.
    #[serde(skip)]
    pub details: RequestDetails,
}

/// Everything known about a paused request, typed (the audit payload in
/// [`DecisionRequest::context`] says the same as JSON).
#[derive(Debug, Clone, Default)]
pub struct RequestDetails {
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    /// The kernel's id of the asking policy (changes with every reload).
    pub policy_id: u32,
    /// [`gatekeep_common::request_kind`].
    pub kind: u32,
    /// The kernel's digest of the request: a grant for it lets the very same
    /// request through.
    pub digest: u64,
    pub cgroup_id: u64,
    /// `CLOCK_BOOTTIME` nanoseconds when the kernel first paused it.
    pub first_seen_ns: u64,
    /// Ancestry, cwd, user and cgroup path.
    pub enrichment: Enrichment,
    pub target: RequestTarget,
    /// The asking policy's approval settings.
    pub approval: ApprovalSettings,
}

/// What a paused request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestTarget {
    Exec {
        /// Absolute (made so against the cwd for display).
        executable: PathBuf,
        argv: Vec<String>,
    },
    Connect {
        destination: Destination,
        /// `SOCK_STREAM` (1), `SOCK_DGRAM` (2), ...
        sock_type: u32,
    },
}

impl Default for RequestTarget {
    fn default() -> Self {
        RequestTarget::Exec {
            executable: PathBuf::new(),
            argv: Vec::new(),
        }
    }
}

/// Why the agent no longer wants a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawal {
    /// The asking task exited.
    TaskExited,
    /// The task asked something else, or the kernel dropped the request.
    Superseded,
}

/// The two outcomes a paused syscall can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
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
    /// What the decider adds to the audit record (e.g. the service's request
    /// id, the decision's state, a granted duration).
    pub details: Option<serde_json::Value>,
}

impl Decision {
    /// The policy's timeout action, applied at the deadline.
    #[must_use]
    pub fn expired(request: &DecisionRequest) -> Self {
        Self {
            verdict: request.on_timeout,
            actor: "timeout".to_owned(),
            reason: format!(
                "no decision within {}; policy `{}` says {} on timeout",
                humantime::format_duration(request.timeout),
                request.policy,
                request.on_timeout.as_str()
            ),
            expired: true,
            details: None,
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
    Refused { request_id: String, reason: String },
}

/// Decides paused requests. Implementations may take as long as a human
/// needs; the agent cancels the future (drops it) when the request goes
/// away (the task exited, or asked something else).
pub trait Decider: Send + Sync + 'static {
    fn decide(
        &self,
        request: Arc<DecisionRequest>,
    ) -> impl Future<Output = Result<Decision, DecideError>> + Send;

    /// How whoever decides knows the request `request_id` (e.g. the decision
    /// service's request id), for the audit record of the request.
    fn reference(&self, request_id: &str) -> Option<String> {
        let _ = request_id;
        None
    }

    /// The request `request_id` no longer needs a decision (its `decide`
    /// future, if any, is dropped too): tell whoever was asked.
    fn withdraw(&self, request_id: &str, reason: Withdrawal, detail: &str) {
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
    let deadline = request.deadline;
    let attempt = async {
        loop {
            match decider.decide(Arc::clone(&request)).await {
                Ok(decision) => return decision,
                Err(err) => {
                    tracing::warn!(
                        request_id = %request.request_id,
                        error = %err,
                        "decider failed; retrying until the deadline"
                    );
                    tokio::time::sleep(RETRY_DELAY).await;
                }
            }
        }
    };
    match tokio::time::timeout_at(deadline, attempt).await {
        Ok(decision) => decision,
        Err(_elapsed) => Decision::expired(&request),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn request(timeout: Duration, on_timeout: Verdict) -> Arc<DecisionRequest> {
        Arc::new(DecisionRequest {
            request_id: "r1".into(),
            kind: "exec",
            policy: "agents".into(),
            rule: "default".into(),
            context: serde_json::json!({}),
            timeout,
            on_timeout,
            deadline: Instant::now() + timeout,
            details: RequestDetails::default(),
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
                    request_id: request.request_id.clone(),
                    reason: "busy".into(),
                });
            }
            Ok(Decision {
                verdict: Verdict::Allow,
                actor: "alice".into(),
                reason: "looks fine".into(),
                expired: false,
                details: None,
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
