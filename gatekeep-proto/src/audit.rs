//! The payloads of audit records, typed: what the agent and the service write into the
//! `payload` column of their hash-chained logs (`gatekeep-audit`), one struct per record
//! kind, shared by both writers.
//!
//! They live here, beside the domain model ([`crate::model`]) they are made of (a request
//! record carries the [`ApprovalRequest`] itself), and not in `gatekeep-audit`, which stays
//! a log of opaque canonical-JSON payloads without a dependency on the API.
//!
//! Every payload starts with `"schema": SCHEMA_VERSION`. `docs/audit-schema.md` documents
//! every field; a change to these types changes that file and, when a consumer would notice,
//! the version.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::model::{ApprovalRequest, Kind, ProcessInfo, RequestState, Target, Verdict, Vote};

/// The version of the payload schema written now. Records without a `schema` field were
/// written before it existed (version 1, the implicit schema).
pub const SCHEMA_VERSION: u32 = 2;

/// The `schema` field of every payload: [`SCHEMA_VERSION`] when written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Schema(pub u32);

impl Default for Schema {
    fn default() -> Self {
        Self(SCHEMA_VERSION)
    }
}

/// `requested`: a paused action was put to a decider. The agent writes it when it asks,
/// the service when it stores the request; both carry the same [`ApprovalRequest`] under
/// the same id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requested<'a> {
    pub schema: Schema,
    pub request: Cow<'a, ApprovalRequest>,
    /// The service's deadline (the agent's, or sooner by the service's own policy), RFC 3339.
    /// Service records only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_deadline: Option<String>,
    /// What the kernel reported. Agent records only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelFacts>,
}

/// What the kernel reported about a request, beyond the [`ApprovalRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFacts {
    /// The kernel's id of the policy (changes with every reload).
    pub policy_id: u32,
    /// The kernel's digest of the request, 16 hex digits.
    pub digest: String,
    pub cgroup_id: u64,
    pub ppid: u32,
    pub gid: u32,
    /// The task's command name (16 bytes at most, workload-controlled).
    pub comm: String,
    /// Exec only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecFacts>,
    /// Connect only: the socket type number (`SOCK_STREAM` 1, `SOCK_DGRAM` 2...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sock_type: Option<u32>,
    /// Connect only: the call the kernel decided: `connect`, `sendmsg` (a
    /// datagram sent to an address, or TCP Fast Open) or `socket` (a raw or
    /// packet socket being made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<String>,
}

/// What the kernel reported about an exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecFacts {
    /// The path as the task passed it to `execve` (maybe relative).
    pub filename: String,
    /// Device and inode of the executable.
    pub dev: u64,
    pub ino: u64,
    /// How many arguments the task passed.
    pub argc: u32,
    /// True when the kernel captured fewer than `argc` arguments or cut one.
    pub argv_truncated: bool,
    /// How the code came to run when it was not an exec of a file with a name on disk:
    /// `mapped as code` (`mmap`/`mprotect` with `PROT_EXEC`: ld.so running a program it was
    /// handed, `LD_PRELOAD`, `dlopen`; `filename` is then the file's name in its folder) or
    /// `fileless` (no name on disk: `memfd_create`, `O_TMPFILE`, a deleted file; `filename`
    /// is the name the workload gave it, e.g. `memfd:NAME`). Absent for a plain exec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

/// `kernel_denied`: the kernel refused an action by policy without asking (or refused a
/// paused request of a traced task, `reason` `refused_spinning`). Agent records only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelDenied {
    pub schema: Schema,
    pub kind: Kind,
    /// The policy's name, when the agent still knows the kernel's policy id.
    pub policy: Option<String>,
    /// The rule that denied it, when known.
    pub rule: Option<String>,
    pub process: Process,
    /// The executable and argv, or the destination, when the event carried them.
    pub target: Option<Target>,
    pub kernel: KernelFacts,
    /// Why, when it is not the policy (`refused_spinning`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Policy denials: how many identical denials (same policy, cgroup, user, kind and
    /// target) this record stands for, one record per burst; `process` is the first one's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The first and last denial of the burst (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_at: Option<String>,
    /// `audited` records only: what enforcement would have done (`deny` or `ask`); the
    /// action ran, as its policy is in audit mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub would: Option<String>,
}

/// `rule_stale`: an exec met a rule whose file was rewritten in place since the policy was
/// loaded (its content version differs from the one the rule was bound to), so the rule did
/// not match and the policy default applied (never laxer than the rule's own action). One
/// record per rule, policy load and new content. Agent records only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleStale {
    pub schema: Schema,
    /// `exec`.
    pub kind: Kind,
    /// The policy's name, when the agent still knows the kernel's policy id.
    pub policy: Option<String>,
    /// The rule as reviewers read it (`exec allow /usr/bin/tool`), when known.
    pub rule: Option<String>,
    /// The rule's path as the policy names it, when known.
    pub path: Option<String>,
    /// Device (kernel encoding) and inode of the file.
    pub dev: u64,
    pub ino: u64,
    /// The content version the rule was bound to at load, and the one the file has now.
    pub bound: ContentVersion,
    pub found: ContentVersion,
    /// The rule's action, and the action applied instead (`allow`, `deny`, `ask`).
    pub rule_action: String,
    pub applied: String,
    /// The task whose exec met the rule.
    pub process: Process,
    pub kernel: KernelFacts,
}

/// A file's content version as the kernel keeps it (`struct inode`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentVersion {
    /// The inode change time: seconds and nanoseconds since the Unix epoch.
    pub ctime_sec: i64,
    pub ctime_nsec: u32,
    pub size: i64,
    /// The inode generation, where the filesystem reports one (`FS_IOC_GETVERSION`);
    /// `null` when the rule was bound without it.
    pub generation: Option<u32>,
}

/// The task an agent record is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub user: Option<String>,
    /// cgroup v2 path relative to the hierarchy root.
    pub cgroup: Option<String>,
    pub cwd: Option<String>,
    /// The task's process first, then its parent...
    pub ancestry: Vec<ProcessInfo>,
}

/// `decided`, `expired`, `cancelled`, `abandoned`: how a request ended, or (`decided`
/// with `final` false) one approval towards a quorum. Both sides write it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome<'a> {
    pub schema: Schema,
    /// The policy that asked; absent only in agent records of requests it no longer knew.
    pub policy: Option<Cow<'a, str>>,
    pub kind: Kind,
    /// What was asked. Absent only in agent records of requests it no longer tracked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Cow<'a, Target>>,
    /// `approved`, `denied`, `expired`, `cancelled`, `abandoned`; `pending` for an approval
    /// short of the quorum.
    pub state: RequestState,
    /// What the paused syscall gets; absent when nothing was applied (abandoned, cancelled
    /// by the agent).
    pub verdict: Option<Verdict>,
    /// Why, in words: the reviewer's reason, the rule's, the timeout's.
    pub reason: Cow<'a, str>,
    /// Why it ended without a decision, as a code: `superseded`, `agent_stopped`,
    /// `task_exited`, `vanished`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Cow<'a, str>>,
    /// `once`, or the granted duration (`1h`, `session`, `always`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// Service records: the approvals so far, and how many the policy needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvals: Option<Cow<'a, [Vote]>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvals_required: Option<u32>,
    /// The grant the decision made (its id; the `grant_installed` record has the rest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<uuid::Uuid>,
    /// Milliseconds from the request (agent: the pause; service: its arrival) to this.
    pub wait_ms: u64,
    /// False only for an approval short of the quorum.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// Agent records: the paused task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tid: Option<u32>,
    /// Agent records: the kernel's digest of the request (16 hex digits) and the task's
    /// command name, for requests the agent ended without tracking them (no `requested`
    /// record of its own holds them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
}

/// A service record written by recovery: payload `P` (a [`Requested`], an [`Outcome`] or a
/// [`GrantChange`]) with `"recovered": true` beside its fields. A replica writes it for a
/// request stored in a final state whose record the chain lacks: the replica that stored it
/// was killed before its record was durable, or had not written it yet when the recovery
/// looked (the chain holds each such record once, whoever writes it first).
#[derive(Debug, Serialize)]
pub struct Recovered<'a, P> {
    #[serde(flatten)]
    pub payload: &'a P,
    pub recovered: bool,
}

/// `approval_refused` (service): a reviewer tried to approve a request of a workload they
/// own (or as its agent) and was refused; nothing changed on the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRefused<'a> {
    pub schema: Schema,
    pub policy: Cow<'a, str>,
    pub kind: Kind,
    /// Why, as a code: `self_approval`.
    pub cause: Cow<'a, str>,
    /// The refusal as the reviewer saw it.
    pub reason: Cow<'a, str>,
}

/// `grant_installed`, `grant_revoked`: a standing grant came or went. `G` is the service's
/// [`Grant`](crate::model::Grant) in service records, the agent's own form of it (kernel
/// digest and cgroup id) in agent records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantChange<G> {
    pub schema: Schema,
    pub grant: G,
    /// Revocations: who ended it (a reviewer, `expiry`, `session-end`) and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `agent_started`. Agent records only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStarted {
    pub schema: Schema,
    pub version: String,
    pub pid: u32,
    /// The kernel programs attached, by name.
    pub programs: Vec<String>,
    /// `loaded` (loaded and pinned now), `adopted` (a previous agent's pins reused) or
    /// `completed` (a half-done set finished).
    pub start: String,
    pub attached_now: Vec<String>,
    pub retired: Vec<String>,
    /// Program links the agent holds open (a removed pin detaches nothing).
    #[serde(default)]
    pub links_held: usize,
    pub pin_dir: String,
    pub paused_requests_found: usize,
    pub decision: DecisionSetting,
}

/// Who decides for an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionSetting {
    /// `local`, `embedded` or `remote`.
    pub mode: String,
    /// The decision service's address (`embedded`, `remote`).
    pub service: Option<String>,
}

/// `agent_stopped`. Agent records only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStopped {
    pub schema: Schema,
    pub pid: u32,
    pub paused_requests_left: usize,
    pub asked: u64,
    pub decided: u64,
    pub abandoned: u64,
}

/// `policy_loaded`. Agent records only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyLoaded {
    pub schema: Schema,
    /// What loaded it: `startup`, or what triggered a reload.
    pub trigger: String,
    pub policy_dir: String,
    pub generation: u32,
    pub policies: Vec<LoadedPolicy>,
    pub cgroups_gated: Vec<String>,
    pub exec_rules: usize,
    pub connect_prefixes: usize,
    pub warnings: Vec<String>,
    /// The self-protections each policy gives up (`[policy.protect] relax`), only
    /// policies that relax any.
    #[serde(default)]
    pub protect_relaxed: Vec<ProtectRelaxed>,
}

/// One policy's relaxed self-protections, in a [`PolicyLoaded`] record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectRelaxed {
    pub policy: String,
    /// Protection names as the policy file spells them (`signal`, `mount`, ...).
    pub relax: Vec<String>,
}

/// One policy of a [`PolicyLoaded`] record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadedPolicy {
    /// The kernel's id for it in this generation.
    pub id: u32,
    pub name: String,
    /// `enforce`, or `audit` for a policy that enforces none of its rules and records what
    /// it would have done (`audited` records).
    #[serde(default = "enforce")]
    pub mode: String,
}

fn enforce() -> String {
    "enforce".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ApprovalSettings, ExecTarget};

    fn request() -> ApprovalRequest {
        ApprovalRequest {
            id: crate::id::from_hash([7; 16]),
            policy: "agents".into(),
            rule: "default".into(),
            cgroup: "/agents".into(),
            pid: 10,
            tid: 11,
            uid: 1000,
            user_name: Some("ada".into()),
            cwd: Some("/tmp".into()),
            ancestry: Vec::new(),
            target: Target::Exec(ExecTarget {
                executable: "/usr/bin/git".into(),
                argv: vec!["git".into(), "push".into()],
                content: None,
                path_check: None,
                named: None,
                file: None,
                mount_namespace: None,
                argv_truncated: false,
                env: Vec::new(),
            }),
            requested_at: time::OffsetDateTime::UNIX_EPOCH,
            deadline: time::OffsetDateTime::UNIX_EPOCH + time::Duration::minutes(5),
            on_timeout: Verdict::Deny,
            approval: ApprovalSettings::default(),
        }
    }

    #[test]
    fn every_payload_says_its_schema_version() {
        let request = request();
        let requested = Requested {
            schema: Schema::default(),
            request: Cow::Borrowed(&request),
            service_deadline: None,
            kernel: None,
        };
        let value = serde_json::to_value(&requested).unwrap();
        assert_eq!(value["schema"], SCHEMA_VERSION);
        assert_eq!(value["request"]["id"], request.id.to_string());
        assert!(value.get("kernel").is_none() && value.get("service_deadline").is_none());
        let back: Requested<'static> = serde_json::from_value(value).unwrap();
        assert_eq!(back, requested);

        let outcome = Outcome {
            schema: Schema::default(),
            policy: Some("agents".into()),
            kind: Kind::Exec,
            target: Some(Cow::Borrowed(&request.target)),
            state: RequestState::Approved,
            verdict: Some(Verdict::Allow),
            reason: "ok".into(),
            cause: None,
            detail: None,
            duration: Some("once".into()),
            approvals: None,
            approvals_required: None,
            grant_id: None,
            wait_ms: 5,
            is_final: true,
            pid: Some(10),
            tid: Some(11),
            digest: None,
            comm: None,
        };
        let value = serde_json::to_value(&outcome).unwrap();
        assert_eq!(value["schema"], SCHEMA_VERSION);
        assert_eq!(value["final"], true);
        assert_eq!(value["state"], "approved");
        assert_eq!(value["target"]["argv"][1], "push");
    }
}
