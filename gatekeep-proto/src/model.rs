//! Domain types of the decision API: validated, typed forms of the wire messages.
//!
//! The service and its clients work with these; [`crate::convert`] turns wire messages into
//! them (checking every field against [`crate::limits`]) and back. All of them serialise to
//! JSON with RFC 3339 timestamps, which is what the service stores and the CLI prints.

use std::fmt;

use gatekeep_policy::GrantDuration;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// What a paused syscall was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Exec,
    Connect,
}

/// The outcome for a paused syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// Where a request is in its lifecycle: `pending` -> `approved` | `denied` | `expired` |
/// `cancelled` | `abandoned`. Every state but `pending` is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestState {
    Pending,
    Approved,
    Denied,
    /// Nobody decided before the deadline; the policy's `on_timeout` applied.
    Expired,
    /// A reviewer withdrew it; the paused action is denied.
    Cancelled,
    /// The agent withdrew it (the task died, or asked something else).
    Abandoned,
}

/// Socket type of a connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketType {
    Stream,
    Dgram,
    Seqpacket,
    Raw,
    Other,
}

/// Address family of a connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Inet,
    Inet6,
    Unix,
}

/// Why an agent withdrew a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WithdrawReason {
    /// The asking task exited before a decision.
    TaskExited,
    /// The task asked something else; the request no longer applies.
    Superseded,
    /// The agent's deadline passed first: it applied the policy's timeout action.
    AgentDeadline,
}

/// What is asked: an executable with its argv, or a destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Target {
    Exec(ExecTarget),
    Connect(ConnectTarget),
}

/// An `execve`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExecTarget {
    /// Absolute path of the executable.
    pub executable: String,
    pub argv: Vec<String>,
    /// The executable's content version as the host's kernel saw it when it asked
    /// (`<ctime seconds>.<ctime nanoseconds, 9 digits>:<size>:<inode generation>`), so a
    /// grant covers the content it was given for and not a rewrite of the same file.
    /// `None` from callers without a kernel (tests, the API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Whether the host's file at `executable` is the file that runs (the agent checked its
    /// device and inode against the kernel's), or `executable` is only the name the workload
    /// passed (no host path of that file was found: a file of a private mount namespace).
    /// `None` from callers without a kernel (tests, the API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_check: Option<PathCheck>,
    /// The name the workload passed to `execve`, made absolute against its cwd, in its own
    /// mount namespace, when it differs from `executable` (a symbolic link, a bind mount in
    /// a private mount namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named: Option<String>,
    /// The file as the kernel identified it: `major:minor inode` of its filesystem's device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The asking task's mount namespace (`mnt:[4026532301]`) when it is not the agent's:
    /// the workload sees other files at some paths than the host does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_namespace: Option<String>,
    /// The kernel could not capture the whole argv (more arguments or bytes than it keeps,
    /// or a compat 32-bit exec whose argv it does not read): `argv` is a prefix of what
    /// runs. Reviewers are told; no grant or allow rule covers such a request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub argv_truncated: bool,
    /// The exec's bound environment variables, `NAME=value` as the workload passed them
    /// (the loader's `LD_*` and the policy's `exec.bound_env`), in its order: part of what
    /// a verdict or grant covers (approving `cmd` does not approve `LD_PRELOAD=x cmd`).
    /// Workload-controlled: escape before showing. Variables that did not fit the kernel's
    /// capture make the request `argv_truncated`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
}

/// How the agent found an exec's `executable` path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathCheck {
    /// The host's file at that path is the file that runs.
    Verified,
    /// No host path of the file that runs was found: the path is the workload's name for it.
    Unverified,
}

impl PathCheck {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Verified => "verified",
            Self::Unverified => "unverified",
        }
    }
}

/// A `connect`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConnectTarget {
    pub family: Family,
    /// The IP address in its canonical text form, or the socket path for [`Family::Unix`].
    pub address: String,
    /// 0 for [`Family::Unix`].
    pub port: u16,
    pub socket_type: SocketType,
    /// Host names the workload resolved to `address` (fresh DNS answers it
    /// received): what it looked up. Workload controlled: escape to show.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolved: Vec<String>,
}

/// One process of the asking task's ancestry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub comm: String,
    pub executable: Option<String>,
    pub argv: Vec<String>,
    pub cgroup: Option<String>,
}

/// The approval section of the policy that asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalSettings {
    /// Reviewer groups that may decide; empty: any authenticated reviewer.
    pub reviewer_groups: Vec<String>,
    /// Distinct reviewers who must approve (at least 1).
    pub approvals_required: u32,
    /// What reviewers may grant beyond the one request.
    pub grant_durations: Vec<GrantDuration>,
    /// Identities owning the gated workloads: they can never approve.
    pub owners: Vec<String>,
    /// An approval must give a non-blank reason; denials never need one.
    /// Absent in requests stored before the field existed: not required.
    #[serde(default)]
    pub require_reason: bool,
}

impl Default for ApprovalSettings {
    /// What a policy without an `[policy.approval]` section says: any reviewer, one approval,
    /// `once` only, no declared owner.
    fn default() -> Self {
        Self {
            reviewer_groups: Vec::new(),
            approvals_required: 1,
            grant_durations: vec![GrantDuration::Once],
            owners: Vec::new(),
            require_reason: false,
        }
    }
}

impl ApprovalSettings {
    /// The settings of a loaded policy.
    #[must_use]
    pub fn from_policy(approval: &gatekeep_policy::Approval) -> Self {
        Self {
            reviewer_groups: approval.reviewers.clone(),
            approvals_required: approval.approvals_required.max(1),
            grant_durations: approval.grant_durations.clone(),
            owners: Vec::new(),
            require_reason: approval.require_reason,
        }
    }

    /// Whether a reviewer may grant `duration`: `once` always; `session` and `always` when
    /// listed; a duration when a listed duration is at least as long.
    #[must_use]
    pub fn allows(&self, duration: GrantDuration) -> bool {
        match duration {
            GrantDuration::Once => true,
            GrantDuration::For(wanted) => self
                .grant_durations
                .iter()
                .any(|allowed| matches!(allowed, GrantDuration::For(max) if wanted <= *max)),
            other => self.grant_durations.contains(&other),
        }
    }
}

/// A paused action, with the full context the agent knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    /// Generated by the agent; re-sending the same id is idempotent.
    pub id: Uuid,
    /// The policy that said `ask`.
    pub policy: String,
    /// The policy's rule that said `ask` (or `default`).
    pub rule: String,
    /// cgroup v2 path of the asking task.
    pub cgroup: String,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub user_name: Option<String>,
    pub cwd: Option<String>,
    /// The asking process first, then its parent...
    pub ancestry: Vec<ProcessInfo>,
    pub target: Target,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
    /// When the agent applies `on_timeout`.
    #[serde(with = "time::serde::rfc3339")]
    pub deadline: OffsetDateTime,
    pub on_timeout: Verdict,
    pub approval: ApprovalSettings,
}

impl ApprovalRequest {
    #[must_use]
    pub fn kind(&self) -> Kind {
        self.target.kind()
    }
}

impl Target {
    /// Whether this is an exec whose argv the kernel could not capture whole
    /// ([`ExecTarget::argv_truncated`]): no grant, allow rule or timeout allows it.
    #[must_use]
    pub fn argv_truncated(&self) -> bool {
        matches!(self, Target::Exec(exec) if exec.argv_truncated)
    }

    #[must_use]
    pub fn kind(&self) -> Kind {
        match self {
            Target::Exec(_) => Kind::Exec,
            Target::Connect(_) => Kind::Connect,
        }
    }
}

/// Whom a grant covers: the workload (cgroup) that asked, or every workload of the policy.
///
/// A reviewer chooses it with the decision; the default is [`GrantScope::Workload`]. A
/// `session` grant is always [`GrantScope::Workload`] (it ends with its cgroup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantScope {
    /// Only the cgroup that asked (by its path: a cgroup re-created at the same path is the
    /// same workload).
    Workload,
    /// Every cgroup the policy gates on the host.
    Policy,
}

impl GrantScope {
    /// The narrowest of the scopes a quorum's members chose: it grants no more than each
    /// agreed to. No scopes at all (no approvals) is [`GrantScope::Workload`].
    #[must_use]
    pub fn narrowest(scopes: impl IntoIterator<Item = GrantScope>) -> GrantScope {
        let mut any = false;
        for scope in scopes {
            if scope == GrantScope::Workload {
                return GrantScope::Workload;
            }
            any = true;
        }
        if any {
            GrantScope::Policy
        } else {
            GrantScope::Workload
        }
    }

    /// What records made before scopes existed meant: session grants were bound to their
    /// cgroup, every other grant covered the whole policy.
    #[must_use]
    pub fn legacy() -> GrantScope {
        GrantScope::Policy
    }
}

impl std::fmt::Display for GrantScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GrantScope::Workload => "workload",
            GrantScope::Policy => "policy",
        })
    }
}

/// The string was not a grant scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown grant scope \"{value}\" (expected workload or policy)")]
pub struct ParseGrantScopeError {
    pub value: String,
}

impl std::str::FromStr for GrantScope {
    type Err = ParseGrantScopeError;

    /// `workload` or `policy`; empty means `workload` (the default).
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "" | "workload" => Ok(GrantScope::Workload),
            "policy" => Ok(GrantScope::Policy),
            _ => Err(ParseGrantScopeError {
                value: value.to_owned(),
            }),
        }
    }
}

/// A standing rule made from a decision with a duration other than `once`: the agent installs
/// it so the same action is not asked again while it lasts.
///
/// It matches the same policy on the same host and the same [`Target`] (executable and argv,
/// or destination), and, for [`GrantScope::Workload`] (the default), only in the cgroup that
/// asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub id: Uuid,
    pub host: String,
    pub policy: String,
    pub target: Target,
    pub verdict: Verdict,
    pub duration: GrantDuration,
    /// Whom it covers. Records made before scopes existed read as [`GrantScope::legacy`].
    #[serde(default = "GrantScope::legacy")]
    pub scope: GrantScope,
    /// The asking workload's cgroup path, set for [`GrantScope::Workload`] grants: only it may
    /// use the grant. `session` grants end when it goes away.
    pub cgroup: Option<String>,
    /// Set for grants of a duration.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    pub created_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The request whose decision made it.
    pub request_id: Uuid,
    pub revoked: Option<Revocation>,
}

impl Grant {
    /// Neither revoked nor past its expiry at `now`.
    #[must_use]
    pub fn is_active(&self, now: OffsetDateTime) -> bool {
        self.revoked.is_none() && self.expires_at.is_none_or(|at| at > now)
    }
}

/// How a grant ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// A reviewer, `expiry` or `session-end`.
    pub by: String,
    pub reason: String,
}

/// The outcome of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub request_id: Uuid,
    /// Any state but [`RequestState::Pending`].
    pub state: RequestState,
    /// What the paused syscall gets.
    pub verdict: Verdict,
    /// Reviewers (comma separated), `rule:NAME`, `grant:ID`, `timeout`, or the agent's host
    /// for an abandoned request.
    pub decided_by: String,
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub decided_at: OffsetDateTime,
    /// `once`, or the duration of [`grant`](Self::grant).
    pub duration: GrantDuration,
    pub grant: Option<Grant>,
}

/// One reviewer's approval towards the quorum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    pub reviewer: String,
    pub reason: String,
    pub duration: GrantDuration,
    /// The scope this reviewer chose (the quorum grants the narrowest).
    #[serde(default = "GrantScope::legacy")]
    pub scope: GrantScope,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// A request as the service holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub request: ApprovalRequest,
    /// From the agent's certificate.
    pub host: String,
    pub state: RequestState,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    /// The service's own deadline: the agent's, or sooner by the service's policy.
    #[serde(with = "time::serde::rfc3339")]
    pub deadline: OffsetDateTime,
    pub approvals: Vec<Vote>,
    pub approvals_required: u32,
    /// Set once the request left pending.
    pub decision: Option<Decision>,
}

impl RequestState {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Approved => "approved",
            RequestState::Denied => "denied",
            RequestState::Expired => "expired",
            RequestState::Cancelled => "cancelled",
            RequestState::Abandoned => "abandoned",
        }
    }

    /// Every state but `pending` is final.
    #[must_use]
    pub const fn is_final(self) -> bool {
        !matches!(self, RequestState::Pending)
    }
}

impl Verdict {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }

    /// A policy's `on_timeout`: `allow` allows, anything else denies (fail closed).
    #[must_use]
    pub fn from_policy(action: gatekeep_policy::Action) -> Self {
        match action {
            gatekeep_policy::Action::Allow => Verdict::Allow,
            gatekeep_policy::Action::Deny | gatekeep_policy::Action::Ask => Verdict::Deny,
        }
    }
}

impl Family {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Family::Inet => "inet",
            Family::Inet6 => "inet6",
            Family::Unix => "unix",
        }
    }
}

impl SocketType {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            SocketType::Stream => "stream",
            SocketType::Dgram => "dgram",
            SocketType::Seqpacket => "seqpacket",
            SocketType::Raw => "raw",
            SocketType::Other => "other",
        }
    }
}

impl WithdrawReason {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            WithdrawReason::TaskExited => "task_exited",
            WithdrawReason::Superseded => "superseded",
            WithdrawReason::AgentDeadline => "agent_deadline",
        }
    }
}

impl Kind {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Exec => "exec",
            Kind::Connect => "connect",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for RequestState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Target {
    /// `/usr/bin/curl curl -s example.org` or `10.0.0.1:443 (stream)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Exec(exec) => {
                f.write_str(&exec.executable)?;
                for arg in &exec.argv {
                    write!(f, " {arg}")?;
                }
                Ok(())
            }
            Target::Connect(connect) => match connect.family {
                Family::Unix => write!(f, "unix:{}", connect.address),
                Family::Inet => write!(f, "{}:{}", connect.address, connect.port),
                Family::Inet6 => write!(f, "[{}]:{}", connect.address, connect.port),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::GrantScope;

    #[test]
    fn grant_scopes_parse_and_a_quorum_grants_the_narrowest() {
        assert_eq!("".parse::<GrantScope>(), Ok(GrantScope::Workload));
        assert_eq!("workload".parse::<GrantScope>(), Ok(GrantScope::Workload));
        assert_eq!("policy".parse::<GrantScope>(), Ok(GrantScope::Policy));
        assert!("host".parse::<GrantScope>().is_err());
        assert!("Policy".parse::<GrantScope>().is_err());
        assert_eq!(
            GrantScope::narrowest([GrantScope::Policy, GrantScope::Policy]),
            GrantScope::Policy
        );
        assert_eq!(
            GrantScope::narrowest([GrantScope::Policy, GrantScope::Workload]),
            GrantScope::Workload
        );
        assert_eq!(
            GrantScope::narrowest([GrantScope::Workload, GrantScope::Policy]),
            GrantScope::Workload
        );
        assert_eq!(GrantScope::narrowest([]), GrantScope::Workload);
        for scope in [GrantScope::Workload, GrantScope::Policy] {
            assert_eq!(scope.to_string().parse::<GrantScope>(), Ok(scope));
        }
    }
}
