//! The one place where wire messages become domain types (validated against
//! [`limits`](crate::limits)) and domain types become wire messages.

use std::net::IpAddr;

use gatekeep_policy::GrantDuration;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{
    limits,
    model::{
        ApprovalRequest, ApprovalSettings, ConnectTarget, Decision, ExecTarget, Family, Grant,
        GrantScope, Kind, PathCheck, ProcessInfo, RequestRecord, RequestState, Revocation,
        SocketType, Target, Verdict, Vote, WithdrawReason,
    },
    v1,
};

/// A wire message that does not make a valid domain value. The message names the field and
/// what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("`{field}` is missing")]
    Missing { field: String },
    #[error("`{field}` is {len} bytes long, at most {max} are allowed")]
    TooLong {
        field: String,
        len: usize,
        max: usize,
    },
    #[error("`{field}` has {len} items, at most {max} are allowed")]
    TooMany {
        field: String,
        len: usize,
        max: usize,
    },
    #[error("`{field}` is invalid: {problem}")]
    Invalid { field: String, problem: String },
}

impl WireError {
    pub(crate) fn missing(field: impl Into<String>) -> Self {
        WireError::Missing {
            field: field.into(),
        }
    }

    fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        WireError::Invalid {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

pub(crate) type Result<T, E = WireError> = std::result::Result<T, E>;

/// Checks a free-text field: at most `max` bytes and no NUL.
pub fn text(field: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(WireError::TooLong {
            field: field.to_owned(),
            len: value.len(),
            max,
        });
    }
    if value.contains('\0') {
        return Err(WireError::invalid(field, "contains a NUL byte"));
    }
    Ok(())
}

/// Checks a name (policy, host, reviewer, group...): not empty, at most
/// [`limits::MAX_NAME`] bytes, no control characters or spaces at either end.
pub fn name(field: &str, value: &str) -> Result<String> {
    if value.is_empty() {
        return Err(WireError::missing(field));
    }
    text(field, value, limits::MAX_NAME)?;
    if value.chars().any(char::is_control) {
        return Err(WireError::invalid(field, "contains control characters"));
    }
    if value.trim() != value {
        return Err(WireError::invalid(field, "starts or ends with whitespace"));
    }
    Ok(value.to_owned())
}

/// An optional name: empty means none.
fn opt_name(field: &str, value: &str) -> Result<Option<String>> {
    if value.is_empty() {
        Ok(None)
    } else {
        name(field, value).map(Some)
    }
}

fn path(field: &str, value: String, required: bool) -> Result<Option<String>> {
    if value.is_empty() {
        return if required {
            Err(WireError::missing(field))
        } else {
            Ok(None)
        };
    }
    text(field, &value, limits::MAX_PATH)?;
    Ok(Some(value))
}

/// Parses an id: a UUID in any of its text forms (stored in the lowercase hyphenated form).
pub fn id(field: &str, value: &str) -> Result<Uuid> {
    if value.is_empty() {
        return Err(WireError::missing(field));
    }
    if value.len() > limits::MAX_ID {
        return Err(WireError::TooLong {
            field: field.to_owned(),
            len: value.len(),
            max: limits::MAX_ID,
        });
    }
    Uuid::try_parse(value).map_err(|err| WireError::invalid(field, format!("not a uuid ({err})")))
}

/// Parses the id of a new request: exactly the form [`crate::id::parse`] accepts (a
/// lowercase hyphenated uuid of version 4 or 8).
pub fn request_id(field: &str, value: &str) -> Result<Uuid> {
    if value.is_empty() {
        return Err(WireError::missing(field));
    }
    crate::id::parse(value).map_err(|err| WireError::invalid(field, err.to_string()))
}

/// Checks a reason: at most [`limits::MAX_REASON`] bytes.
pub fn reason(field: &str, value: String) -> Result<String> {
    text(field, &value, limits::MAX_REASON)?;
    Ok(value)
}

fn count(field: &str, len: usize, max: usize) -> Result<()> {
    if len > max {
        Err(WireError::TooMany {
            field: field.to_owned(),
            len,
            max,
        })
    } else {
        Ok(())
    }
}

fn argv(field: &str, argv: Vec<String>) -> Result<Vec<String>> {
    count(field, argv.len(), limits::MAX_ARGS)?;
    let mut total = 0;
    for (i, arg) in argv.iter().enumerate() {
        text(&format!("{field}[{i}]"), arg, limits::MAX_ARG)?;
        total += arg.len();
    }
    if total > limits::MAX_ARGV_BYTES {
        return Err(WireError::TooLong {
            field: field.to_owned(),
            len: total,
            max: limits::MAX_ARGV_BYTES,
        });
    }
    Ok(argv)
}

/// Milliseconds since the epoch.
pub fn from_ms(field: &str, ms: i64) -> Result<OffsetDateTime> {
    if ms <= 0 {
        return Err(WireError::missing(field));
    }
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|_| WireError::invalid(field, "out of range"))
}

fn opt_from_ms(field: &str, ms: i64) -> Result<Option<OffsetDateTime>> {
    if ms == 0 {
        Ok(None)
    } else {
        from_ms(field, ms).map(Some)
    }
}

/// Milliseconds since the epoch, saturating.
#[must_use]
pub fn to_ms(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn opt_to_ms(at: Option<OffsetDateTime>) -> i64 {
    at.map_or(0, to_ms)
}

/// Parses a grant duration; empty means `once`.
pub fn duration(field: &str, value: &str) -> Result<GrantDuration> {
    if value.is_empty() {
        return Ok(GrantDuration::Once);
    }
    text(field, value, limits::MAX_NAME)?;
    value
        .parse()
        .map_err(|err: gatekeep_policy::ParseGrantDurationError| {
            WireError::invalid(field, err.to_string())
        })
}

/// Parses a grant scope; empty means `workload`.
pub fn scope(field: &str, value: &str) -> Result<GrantScope> {
    text(field, value, limits::MAX_NAME)?;
    value
        .parse()
        .map_err(|err: crate::model::ParseGrantScopeError| {
            WireError::invalid(field, err.to_string())
        })
}

// Enums.

impl TryFrom<i32> for Kind {
    type Error = WireError;

    fn try_from(value: i32) -> Result<Self> {
        match v1::RequestKind::try_from(value) {
            Ok(v1::RequestKind::Exec) => Ok(Kind::Exec),
            Ok(v1::RequestKind::Connect) => Ok(Kind::Connect),
            Ok(v1::RequestKind::Unspecified) => Err(WireError::missing("kind")),
            Err(_) => Err(WireError::invalid("kind", format!("unknown value {value}"))),
        }
    }
}

impl From<Kind> for v1::RequestKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Exec => v1::RequestKind::Exec,
            Kind::Connect => v1::RequestKind::Connect,
        }
    }
}

/// Parses a wire verdict; `field` names it in the error.
pub fn verdict(field: &str, value: i32) -> Result<Verdict> {
    match v1::Verdict::try_from(value) {
        Ok(v1::Verdict::Allow) => Ok(Verdict::Allow),
        Ok(v1::Verdict::Deny) => Ok(Verdict::Deny),
        Ok(v1::Verdict::Unspecified) => Err(WireError::missing(field)),
        Err(_) => Err(WireError::invalid(field, format!("unknown value {value}"))),
    }
}

impl From<Verdict> for v1::Verdict {
    fn from(verdict: Verdict) -> Self {
        match verdict {
            Verdict::Allow => v1::Verdict::Allow,
            Verdict::Deny => v1::Verdict::Deny,
        }
    }
}

fn state(field: &str, value: i32) -> Result<RequestState> {
    match v1::RequestState::try_from(value) {
        Ok(v1::RequestState::Pending) => Ok(RequestState::Pending),
        Ok(v1::RequestState::Approved) => Ok(RequestState::Approved),
        Ok(v1::RequestState::Denied) => Ok(RequestState::Denied),
        Ok(v1::RequestState::Expired) => Ok(RequestState::Expired),
        Ok(v1::RequestState::Cancelled) => Ok(RequestState::Cancelled),
        Ok(v1::RequestState::Abandoned) => Ok(RequestState::Abandoned),
        Ok(v1::RequestState::Unspecified) => Err(WireError::missing(field)),
        Err(_) => Err(WireError::invalid(field, format!("unknown value {value}"))),
    }
}

impl From<RequestState> for v1::RequestState {
    fn from(state: RequestState) -> Self {
        match state {
            RequestState::Pending => v1::RequestState::Pending,
            RequestState::Approved => v1::RequestState::Approved,
            RequestState::Denied => v1::RequestState::Denied,
            RequestState::Expired => v1::RequestState::Expired,
            RequestState::Cancelled => v1::RequestState::Cancelled,
            RequestState::Abandoned => v1::RequestState::Abandoned,
        }
    }
}

/// Parses a wire withdraw reason.
pub fn withdraw_reason(value: i32) -> Result<WithdrawReason> {
    match v1::WithdrawReason::try_from(value) {
        Ok(v1::WithdrawReason::TaskExited) => Ok(WithdrawReason::TaskExited),
        Ok(v1::WithdrawReason::Superseded) => Ok(WithdrawReason::Superseded),
        Ok(v1::WithdrawReason::AgentDeadline) => Ok(WithdrawReason::AgentDeadline),
        Ok(v1::WithdrawReason::Unspecified) => Err(WireError::missing("reason")),
        Err(_) => Err(WireError::invalid(
            "reason",
            format!("unknown value {value}"),
        )),
    }
}

impl From<WithdrawReason> for v1::WithdrawReason {
    fn from(reason: WithdrawReason) -> Self {
        match reason {
            WithdrawReason::TaskExited => v1::WithdrawReason::TaskExited,
            WithdrawReason::Superseded => v1::WithdrawReason::Superseded,
            WithdrawReason::AgentDeadline => v1::WithdrawReason::AgentDeadline,
        }
    }
}

fn socket_type(value: i32) -> Result<SocketType> {
    const FIELD: &str = "connect.socket_type";
    match v1::SocketType::try_from(value) {
        Ok(v1::SocketType::Stream) => Ok(SocketType::Stream),
        Ok(v1::SocketType::Dgram) => Ok(SocketType::Dgram),
        Ok(v1::SocketType::Seqpacket) => Ok(SocketType::Seqpacket),
        Ok(v1::SocketType::Raw) => Ok(SocketType::Raw),
        Ok(v1::SocketType::Other) => Ok(SocketType::Other),
        Ok(v1::SocketType::Unspecified) => Err(WireError::missing(FIELD)),
        Err(_) => Err(WireError::invalid(FIELD, format!("unknown value {value}"))),
    }
}

impl From<SocketType> for v1::SocketType {
    fn from(value: SocketType) -> Self {
        match value {
            SocketType::Stream => v1::SocketType::Stream,
            SocketType::Dgram => v1::SocketType::Dgram,
            SocketType::Seqpacket => v1::SocketType::Seqpacket,
            SocketType::Raw => v1::SocketType::Raw,
            SocketType::Other => v1::SocketType::Other,
        }
    }
}

impl From<Family> for v1::AddressFamily {
    fn from(value: Family) -> Self {
        match value {
            Family::Inet => v1::AddressFamily::Inet,
            Family::Inet6 => v1::AddressFamily::Inet6,
            Family::Unix => v1::AddressFamily::Unix,
        }
    }
}

// Targets.

impl TryFrom<v1::ExecTarget> for ExecTarget {
    type Error = WireError;

    fn try_from(wire: v1::ExecTarget) -> Result<Self> {
        let executable = path("exec.executable", wire.executable, true)?.unwrap_or_default();
        if !executable.starts_with('/') {
            return Err(WireError::invalid(
                "exec.executable",
                "not an absolute path",
            ));
        }
        if wire.content.len() > 64 || !wire.content.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(WireError::invalid(
                "exec.content",
                "not a content version (at most 64 printable ASCII characters)",
            ));
        }
        let path_check = match v1::PathCheck::try_from(wire.path_check) {
            Ok(v1::PathCheck::Unspecified) => None,
            Ok(v1::PathCheck::Verified) => Some(PathCheck::Verified),
            Ok(v1::PathCheck::Unverified) => Some(PathCheck::Unverified),
            Err(_) => {
                return Err(WireError::invalid(
                    "exec.path_check",
                    format!("unknown value {}", wire.path_check),
                ));
            }
        };
        let named = path("exec.named", wire.named, false)?;
        let file = opt_name("exec.file", &wire.file)?;
        let mount_namespace = opt_name("exec.mount_namespace", &wire.mount_namespace)?;
        Ok(ExecTarget {
            executable,
            argv: argv("exec.argv", wire.argv)?,
            content: (!wire.content.is_empty()).then_some(wire.content),
            path_check,
            named,
            file,
            mount_namespace,
            argv_truncated: wire.argv_truncated,
            env: argv("exec.env", wire.env)?,
        })
    }
}

impl TryFrom<v1::ConnectTarget> for ConnectTarget {
    type Error = WireError;

    fn try_from(wire: v1::ConnectTarget) -> Result<Self> {
        let socket_type = socket_type(wire.socket_type)?;
        let port = u16::try_from(wire.port).map_err(|_| {
            WireError::invalid("connect.port", format!("{} is not a port", wire.port))
        })?;
        let family = match v1::AddressFamily::try_from(wire.family) {
            Ok(v1::AddressFamily::Inet) => Family::Inet,
            Ok(v1::AddressFamily::Inet6) => Family::Inet6,
            Ok(v1::AddressFamily::Unix) => Family::Unix,
            Ok(v1::AddressFamily::Unspecified) => {
                return Err(WireError::missing("connect.family"));
            }
            Err(_) => {
                return Err(WireError::invalid(
                    "connect.family",
                    format!("unknown value {}", wire.family),
                ));
            }
        };
        let address = match family {
            Family::Unix => {
                if port != 0 {
                    return Err(WireError::invalid("connect.port", "must be 0 for unix"));
                }
                path("connect.address", wire.address, true)?.unwrap_or_default()
            }
            Family::Inet | Family::Inet6 => {
                if wire.address.is_empty() {
                    return Err(WireError::missing("connect.address"));
                }
                text("connect.address", &wire.address, limits::MAX_NAME)?;
                let ip: IpAddr = wire.address.parse().map_err(|_| {
                    WireError::invalid(
                        "connect.address",
                        format!("\"{}\" is not an ip address", wire.address),
                    )
                })?;
                if ip.is_ipv4() != (family == Family::Inet) {
                    return Err(WireError::invalid(
                        "connect.address",
                        "does not match connect.family",
                    ));
                }
                ip.to_string()
            }
        };
        if wire.resolved.len() > limits::MAX_RESOLVED {
            return Err(WireError::invalid(
                "connect.resolved",
                format!("more than {} names", limits::MAX_RESOLVED),
            ));
        }
        for name in &wire.resolved {
            if name.is_empty() {
                return Err(WireError::invalid("connect.resolved", "empty name"));
            }
            text("connect.resolved", name, limits::MAX_HOST_NAME)?;
        }
        Ok(ConnectTarget {
            family,
            address,
            port,
            socket_type,
            resolved: wire.resolved,
        })
    }
}

impl From<ExecTarget> for v1::ExecTarget {
    fn from(exec: ExecTarget) -> Self {
        v1::ExecTarget {
            executable: exec.executable,
            argv: exec.argv,
            content: exec.content.unwrap_or_default(),
            path_check: match exec.path_check {
                None => v1::PathCheck::Unspecified,
                Some(PathCheck::Verified) => v1::PathCheck::Verified,
                Some(PathCheck::Unverified) => v1::PathCheck::Unverified,
            }
            .into(),
            named: exec.named.unwrap_or_default(),
            file: exec.file.unwrap_or_default(),
            mount_namespace: exec.mount_namespace.unwrap_or_default(),
            argv_truncated: exec.argv_truncated,
            env: exec.env,
        }
    }
}

impl From<ConnectTarget> for v1::ConnectTarget {
    fn from(connect: ConnectTarget) -> Self {
        v1::ConnectTarget {
            family: v1::AddressFamily::from(connect.family).into(),
            address: connect.address,
            port: u32::from(connect.port),
            socket_type: v1::SocketType::from(connect.socket_type).into(),
            resolved: connect.resolved,
        }
    }
}

fn request_target(kind: Kind, target: Option<v1::approval_request::Target>) -> Result<Target> {
    let target = match target {
        Some(v1::approval_request::Target::Exec(exec)) => Target::Exec(exec.try_into()?),
        Some(v1::approval_request::Target::Connect(connect)) => {
            Target::Connect(connect.try_into()?)
        }
        None => return Err(WireError::missing("target")),
    };
    if target.kind() != kind {
        return Err(WireError::invalid(
            "kind",
            format!("is {kind} but the target is {}", target.kind()),
        ));
    }
    Ok(target)
}

fn grant_target(kind: Kind, target: Option<v1::grant::Target>) -> Result<Target> {
    request_target(
        kind,
        target.map(|target| match target {
            v1::grant::Target::Exec(exec) => v1::approval_request::Target::Exec(exec),
            v1::grant::Target::Connect(connect) => v1::approval_request::Target::Connect(connect),
        }),
    )
}

impl From<Target> for v1::approval_request::Target {
    fn from(target: Target) -> Self {
        match target {
            Target::Exec(exec) => Self::Exec(exec.into()),
            Target::Connect(connect) => Self::Connect(connect.into()),
        }
    }
}

impl From<Target> for v1::grant::Target {
    fn from(target: Target) -> Self {
        match target {
            Target::Exec(exec) => Self::Exec(exec.into()),
            Target::Connect(connect) => Self::Connect(connect.into()),
        }
    }
}

// Requests.

impl TryFrom<v1::Process> for ProcessInfo {
    type Error = WireError;

    fn try_from(wire: v1::Process) -> Result<Self> {
        text("ancestry.comm", &wire.comm, limits::MAX_NAME)?;
        Ok(ProcessInfo {
            pid: wire.pid,
            comm: wire.comm,
            executable: path("ancestry.executable", wire.executable, false)?,
            argv: argv("ancestry.argv", wire.argv)?,
            cgroup: path("ancestry.cgroup", wire.cgroup, false)?,
        })
    }
}

impl From<ProcessInfo> for v1::Process {
    fn from(process: ProcessInfo) -> Self {
        v1::Process {
            pid: process.pid,
            comm: process.comm,
            executable: process.executable.unwrap_or_default(),
            argv: process.argv,
            cgroup: process.cgroup.unwrap_or_default(),
        }
    }
}

impl TryFrom<v1::ApprovalSettings> for ApprovalSettings {
    type Error = WireError;

    fn try_from(wire: v1::ApprovalSettings) -> Result<Self> {
        count(
            "approval.reviewer_groups",
            wire.reviewer_groups.len(),
            limits::MAX_GROUPS,
        )?;
        count("approval.owners", wire.owners.len(), limits::MAX_GROUPS)?;
        count(
            "approval.grant_durations",
            wire.grant_durations.len(),
            limits::MAX_GROUPS,
        )?;
        if wire.approvals_required == 0 {
            return Err(WireError::invalid(
                "approval.approvals_required",
                "must be at least 1",
            ));
        }
        if wire.approvals_required > limits::MAX_APPROVALS {
            return Err(WireError::invalid(
                "approval.approvals_required",
                format!(
                    "{} is more than {}",
                    wire.approvals_required,
                    limits::MAX_APPROVALS
                ),
            ));
        }
        let names = |field: &str, values: Vec<String>| {
            values
                .iter()
                .map(|value| name(field, value))
                .collect::<Result<Vec<_>>>()
        };
        let mut grant_durations = wire
            .grant_durations
            .iter()
            .map(|value| duration("approval.grant_durations", value))
            .collect::<Result<Vec<_>>>()?;
        if grant_durations.is_empty() {
            grant_durations.push(GrantDuration::Once);
        }
        Ok(ApprovalSettings {
            reviewer_groups: names("approval.reviewer_groups", wire.reviewer_groups)?,
            approvals_required: wire.approvals_required,
            grant_durations,
            owners: names("approval.owners", wire.owners)?,
            require_reason: wire.require_reason,
        })
    }
}

impl From<ApprovalSettings> for v1::ApprovalSettings {
    fn from(settings: ApprovalSettings) -> Self {
        v1::ApprovalSettings {
            reviewer_groups: settings.reviewer_groups,
            approvals_required: settings.approvals_required,
            grant_durations: settings
                .grant_durations
                .iter()
                .map(ToString::to_string)
                .collect(),
            owners: settings.owners,
            require_reason: settings.require_reason,
        }
    }
}

impl TryFrom<v1::ApprovalRequest> for ApprovalRequest {
    type Error = WireError;

    fn try_from(wire: v1::ApprovalRequest) -> Result<Self> {
        let id = request_id("request_id", &wire.request_id)?;
        let kind = Kind::try_from(wire.kind)?;
        let target = request_target(kind, wire.target)?;
        count("ancestry", wire.ancestry.len(), limits::MAX_ANCESTRY)?;
        let requested_at = from_ms("requested_at_ms", wire.requested_at_ms)?;
        let deadline = from_ms("deadline_ms", wire.deadline_ms)?;
        if deadline < requested_at {
            return Err(WireError::invalid(
                "deadline_ms",
                "is before requested_at_ms",
            ));
        }
        if deadline - requested_at > limits::MAX_TIMEOUT {
            return Err(WireError::invalid(
                "deadline_ms",
                "is more than 24h after requested_at_ms",
            ));
        }
        Ok(ApprovalRequest {
            id,
            policy: name("policy", &wire.policy)?,
            rule: if wire.rule.is_empty() {
                "default".to_owned()
            } else {
                text("rule", &wire.rule, limits::MAX_NAME)?;
                wire.rule
            },
            cgroup: path("cgroup", wire.cgroup, true)?.unwrap_or_default(),
            pid: wire.pid,
            tid: wire.tid,
            uid: wire.uid,
            user_name: opt_name("user_name", &wire.user_name)?,
            cwd: path("cwd", wire.cwd, false)?,
            ancestry: wire
                .ancestry
                .into_iter()
                .map(ProcessInfo::try_from)
                .collect::<Result<_>>()?,
            target,
            requested_at,
            deadline,
            on_timeout: verdict("on_timeout", wire.on_timeout)?,
            approval: wire
                .approval
                .map(ApprovalSettings::try_from)
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

impl From<ApprovalRequest> for v1::ApprovalRequest {
    fn from(request: ApprovalRequest) -> Self {
        v1::ApprovalRequest {
            request_id: request.id.to_string(),
            kind: v1::RequestKind::from(request.target.kind()).into(),
            policy: request.policy,
            rule: request.rule,
            cgroup: request.cgroup,
            pid: request.pid,
            tid: request.tid,
            uid: request.uid,
            user_name: request.user_name.unwrap_or_default(),
            cwd: request.cwd.unwrap_or_default(),
            ancestry: request.ancestry.into_iter().map(Into::into).collect(),
            target: Some(request.target.into()),
            requested_at_ms: to_ms(request.requested_at),
            deadline_ms: to_ms(request.deadline),
            on_timeout: v1::Verdict::from(request.on_timeout).into(),
            approval: Some(request.approval.into()),
        }
    }
}

// Grants and decisions (sent by the service; clients convert them back).

impl TryFrom<v1::Grant> for Grant {
    type Error = WireError;

    fn try_from(wire: v1::Grant) -> Result<Self> {
        let kind = Kind::try_from(wire.kind)?;
        let revoked = if wire.revoked_at_ms == 0 {
            None
        } else {
            Some(Revocation {
                at: from_ms("grant.revoked_at_ms", wire.revoked_at_ms)?,
                by: wire.revoked_by,
                reason: wire.revoke_reason,
            })
        };
        Ok(Grant {
            id: id("grant.grant_id", &wire.grant_id)?,
            host: name("grant.host", &wire.host)?,
            policy: name("grant.policy", &wire.policy)?,
            target: grant_target(kind, wire.target)?,
            verdict: verdict("grant.verdict", wire.verdict)?,
            duration: duration("grant.duration", &wire.duration)?,
            scope: scope("grant.scope", &wire.scope)?,
            cgroup: path("grant.cgroup", wire.cgroup, false)?,
            expires_at: opt_from_ms("grant.expires_at_ms", wire.expires_at_ms)?,
            created_by: wire.created_by,
            created_at: from_ms("grant.created_at_ms", wire.created_at_ms)?,
            request_id: id("grant.request_id", &wire.request_id)?,
            revoked,
        })
    }
}

impl From<Grant> for v1::Grant {
    fn from(grant: Grant) -> Self {
        let (revoked_at_ms, revoked_by, revoke_reason) = grant
            .revoked
            .map_or((0, String::new(), String::new()), |r| {
                (to_ms(r.at), r.by, r.reason)
            });
        v1::Grant {
            grant_id: grant.id.to_string(),
            host: grant.host,
            policy: grant.policy,
            kind: v1::RequestKind::from(grant.target.kind()).into(),
            target: Some(grant.target.into()),
            verdict: v1::Verdict::from(grant.verdict).into(),
            duration: grant.duration.to_string(),
            scope: grant.scope.to_string(),
            cgroup: grant.cgroup.unwrap_or_default(),
            expires_at_ms: opt_to_ms(grant.expires_at),
            created_by: grant.created_by,
            created_at_ms: to_ms(grant.created_at),
            request_id: grant.request_id.to_string(),
            revoked_at_ms,
            revoked_by,
            revoke_reason,
        }
    }
}

impl TryFrom<v1::Decision> for Decision {
    type Error = WireError;

    fn try_from(wire: v1::Decision) -> Result<Self> {
        let state = state("decision.state", wire.state)?;
        if state == RequestState::Pending {
            return Err(WireError::invalid("decision.state", "is pending"));
        }
        Ok(Decision {
            request_id: id("decision.request_id", &wire.request_id)?,
            state,
            verdict: verdict("decision.verdict", wire.verdict)?,
            decided_by: wire.decided_by,
            reason: wire.reason,
            decided_at: from_ms("decision.decided_at_ms", wire.decided_at_ms)?,
            duration: duration("decision.duration", &wire.duration)?,
            grant: wire.grant.map(Grant::try_from).transpose()?,
        })
    }
}

impl From<Decision> for v1::Decision {
    fn from(decision: Decision) -> Self {
        v1::Decision {
            request_id: decision.request_id.to_string(),
            state: v1::RequestState::from(decision.state).into(),
            verdict: v1::Verdict::from(decision.verdict).into(),
            decided_by: decision.decided_by,
            reason: decision.reason,
            decided_at_ms: to_ms(decision.decided_at),
            duration: decision.duration.to_string(),
            grant: decision.grant.map(Into::into),
        }
    }
}

impl TryFrom<v1::Vote> for Vote {
    type Error = WireError;

    fn try_from(wire: v1::Vote) -> Result<Self> {
        Ok(Vote {
            reviewer: wire.reviewer,
            reason: wire.reason,
            duration: duration("vote.duration", &wire.duration)?,
            scope: scope("vote.scope", &wire.scope)?,
            at: from_ms("vote.at_ms", wire.at_ms)?,
        })
    }
}

impl From<Vote> for v1::Vote {
    fn from(vote: Vote) -> Self {
        v1::Vote {
            reviewer: vote.reviewer,
            reason: vote.reason,
            duration: vote.duration.to_string(),
            scope: vote.scope.to_string(),
            at_ms: to_ms(vote.at),
        }
    }
}

impl TryFrom<v1::RequestRecord> for RequestRecord {
    type Error = WireError;

    fn try_from(wire: v1::RequestRecord) -> Result<Self> {
        Ok(RequestRecord {
            request: wire
                .request
                .ok_or_else(|| WireError::missing("request"))?
                .try_into()?,
            host: wire.host,
            state: state("state", wire.state)?,
            received_at: from_ms("received_at_ms", wire.received_at_ms)?,
            deadline: from_ms("deadline_ms", wire.deadline_ms)?,
            approvals: wire
                .approvals
                .into_iter()
                .map(Vote::try_from)
                .collect::<Result<_>>()?,
            approvals_required: wire.approvals_required,
            decision: wire.decision.map(Decision::try_from).transpose()?,
        })
    }
}

impl From<RequestRecord> for v1::RequestRecord {
    fn from(record: RequestRecord) -> Self {
        v1::RequestRecord {
            request: Some(record.request.into()),
            host: record.host,
            state: v1::RequestState::from(record.state).into(),
            received_at_ms: to_ms(record.received_at),
            deadline_ms: to_ms(record.deadline),
            approvals: record.approvals.into_iter().map(Into::into).collect(),
            approvals_required: record.approvals_required,
            decision: record.decision.map(Into::into),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn wire_request() -> v1::ApprovalRequest {
        v1::ApprovalRequest {
            request_id: "6f1c1d2e-3a4b-4c5d-8e9f-001122334455".into(),
            kind: v1::RequestKind::Exec.into(),
            policy: "ai-agents".into(),
            rule: "ask /usr/bin/curl".into(),
            cgroup: "/agents/a1".into(),
            pid: 42,
            tid: 42,
            uid: 1000,
            user_name: "alice".into(),
            cwd: "/home/alice".into(),
            ancestry: vec![v1::Process {
                pid: 1,
                comm: "init".into(),
                ..Default::default()
            }],
            target: Some(v1::approval_request::Target::Exec(v1::ExecTarget {
                executable: "/usr/bin/curl".into(),
                argv: vec!["curl".into(), "example.org".into()],
                content: String::new(),
                ..Default::default()
            })),
            requested_at_ms: 1_800_000_000_000,
            deadline_ms: 1_800_000_300_000,
            on_timeout: v1::Verdict::Deny.into(),
            approval: Some(v1::ApprovalSettings {
                reviewer_groups: vec!["sre".into()],
                approvals_required: 2,
                grant_durations: vec!["once".into(), "1h".into()],
                owners: vec!["alice".into()],
                require_reason: true,
            }),
        }
    }

    #[test]
    fn request_round_trips() {
        let domain = ApprovalRequest::try_from(wire_request()).unwrap();
        assert_eq!(domain.kind(), Kind::Exec);
        assert_eq!(domain.approval.approvals_required, 2);
        assert!(domain.approval.require_reason);
        assert_eq!(
            domain.approval.grant_durations[1],
            GrantDuration::For(std::time::Duration::from_hours(1))
        );
        let back = v1::ApprovalRequest::from(domain.clone());
        assert_eq!(back, wire_request());
        // And the JSON the service stores comes back identical.
        let json = serde_json::to_string(&domain).unwrap();
        assert_eq!(
            serde_json::from_str::<ApprovalRequest>(&json).unwrap(),
            domain
        );
    }

    #[test]
    fn what_the_agent_saw_of_an_exec_round_trips_and_is_checked() {
        let mut wire = wire_request();
        let Some(v1::approval_request::Target::Exec(exec)) = &mut wire.target else {
            panic!("an exec target")
        };
        exec.executable = "/tmp/x/evil".into();
        exec.path_check = v1::PathCheck::Verified.into();
        exec.named = "/tmp/innocent/echo".into();
        exec.file = "0:30 1234".into();
        exec.mount_namespace = "mnt:[4026532301]".into();
        exec.env = vec![
            "LD_PRELOAD=/tmp/evil.so".into(),
            "PYTHONPATH=\u{1b}[2J".into(),
        ];
        let domain = ApprovalRequest::try_from(wire.clone()).unwrap();
        let Target::Exec(seen) = &domain.target else {
            panic!("an exec target")
        };
        assert_eq!(seen.path_check, Some(PathCheck::Verified));
        assert_eq!(seen.named.as_deref(), Some("/tmp/innocent/echo"));
        assert_eq!(seen.file.as_deref(), Some("0:30 1234"));
        assert_eq!(seen.mount_namespace.as_deref(), Some("mnt:[4026532301]"));
        assert_eq!(v1::ApprovalRequest::from(domain.clone()), wire);
        let json = serde_json::to_value(&domain).unwrap();
        assert_eq!(json["target"]["path_check"], "verified");
        assert_eq!(json["target"]["mount_namespace"], "mnt:[4026532301]");
        assert_eq!(
            json["target"]["env"],
            serde_json::json!(["LD_PRELOAD=/tmp/evil.so", "PYTHONPATH=\u{1b}[2J"])
        );
        // Absent on the wire: absent in the model (and in its JSON).
        let plain = ApprovalRequest::try_from(wire_request()).unwrap();
        let json = serde_json::to_value(&plain).unwrap();
        for field in ["path_check", "named", "file", "mount_namespace", "env"] {
            assert!(json["target"].get(field).is_none(), "{field}: {json}");
        }

        let exec_of = |r: &mut v1::ApprovalRequest| match &mut r.target {
            Some(v1::approval_request::Target::Exec(exec)) => exec.clone(),
            _ => panic!("an exec target"),
        };
        for (change, expected) in [
            (
                (|e: &mut v1::ExecTarget| e.path_check = 7) as fn(&mut v1::ExecTarget),
                "`exec.path_check` is invalid: unknown value 7",
            ),
            (
                |e: &mut v1::ExecTarget| e.mount_namespace = "mnt:[1]\n\u{1b}[2J".into(),
                "`exec.mount_namespace`",
            ),
            (
                |e: &mut v1::ExecTarget| e.file = "x".repeat(limits::MAX_NAME + 1),
                "`exec.file`",
            ),
            (
                |e: &mut v1::ExecTarget| e.named = "a\0b".into(),
                "`exec.named` is invalid: contains a NUL byte",
            ),
            (
                |e: &mut v1::ExecTarget| e.env = vec!["LD_PRELOAD=a\0b".into()],
                "`exec.env[0]` is invalid: contains a NUL byte",
            ),
        ] {
            let mut wire = wire_request();
            let mut exec = exec_of(&mut wire);
            change(&mut exec);
            wire.target = Some(v1::approval_request::Target::Exec(exec));
            let err = ApprovalRequest::try_from(wire).unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} lacks {expected:?}");
        }
    }

    #[test]
    fn malformed_requests_name_the_field() {
        type Mutation = Box<dyn Fn(&mut v1::ApprovalRequest)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|r| r.request_id.clear()),
                "`request_id` is missing",
            ),
            (
                Box::new(|r| r.request_id = "nope".into()),
                "`request_id` is invalid",
            ),
            (Box::new(|r| r.kind = 0), "`kind` is missing"),
            (
                Box::new(|r| r.kind = 9),
                "`kind` is invalid: unknown value 9",
            ),
            (
                Box::new(|r| r.kind = v1::RequestKind::Connect.into()),
                "`kind` is invalid: is connect but the target is exec",
            ),
            (Box::new(|r| r.on_timeout = 0), "`on_timeout` is missing"),
            (Box::new(|r| r.policy.clear()), "`policy` is missing"),
            (
                Box::new(|r| r.deadline_ms = r.requested_at_ms - 1),
                "`deadline_ms` is invalid",
            ),
            (
                Box::new(|r| {
                    if let Some(v1::approval_request::Target::Exec(exec)) = &mut r.target {
                        exec.argv = vec!["x".into(); limits::MAX_ARGS + 1];
                    }
                }),
                "`exec.argv` has 257 items",
            ),
            (
                Box::new(|r| {
                    if let Some(v1::approval_request::Target::Exec(exec)) = &mut r.target {
                        exec.argv = vec!["x".repeat(limits::MAX_ARG); 9];
                    }
                }),
                "`exec.argv` is 36864 bytes long",
            ),
            (
                Box::new(|r| {
                    if let Some(v1::approval_request::Target::Exec(exec)) = &mut r.target {
                        exec.env = vec!["x".into(); limits::MAX_ARGS + 1];
                    }
                }),
                "`exec.env` has 257 items",
            ),
            (
                Box::new(|r| {
                    if let Some(v1::approval_request::Target::Exec(exec)) = &mut r.target {
                        exec.executable = "curl".into();
                    }
                }),
                "not an absolute path",
            ),
            (
                Box::new(|r| {
                    r.approval.as_mut().unwrap().grant_durations = vec!["forever".into()];
                }),
                "unknown grant duration",
            ),
        ];
        for (mutate, expected) in cases {
            let mut wire = wire_request();
            mutate(&mut wire);
            let err = ApprovalRequest::try_from(wire).unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} lacks {expected:?}");
        }
    }

    #[test]
    fn connect_targets_are_checked() {
        let mut wire = wire_request();
        wire.kind = v1::RequestKind::Connect.into();
        wire.target = Some(v1::approval_request::Target::Connect(v1::ConnectTarget {
            family: v1::AddressFamily::Inet6.into(),
            address: "2001:DB8::1".into(),
            port: 443,
            socket_type: v1::SocketType::Stream.into(),
            resolved: vec!["api.example.test".into()],
        }));
        let domain = ApprovalRequest::try_from(wire.clone()).unwrap();
        let Target::Connect(connect) = &domain.target else {
            panic!("connect expected")
        };
        assert_eq!(connect.address, "2001:db8::1");
        assert_eq!(domain.target.to_string(), "[2001:db8::1]:443");

        if let Some(v1::approval_request::Target::Connect(c)) = &mut wire.target {
            c.family = v1::AddressFamily::Inet.into();
        }
        let err = ApprovalRequest::try_from(wire.clone()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        if let Some(v1::approval_request::Target::Connect(c)) = &mut wire.target {
            c.port = 70_000;
        }
        assert!(ApprovalRequest::try_from(wire).is_err());
    }

    #[test]
    fn allowed_durations() {
        let settings = ApprovalSettings {
            grant_durations: vec![
                GrantDuration::Once,
                GrantDuration::For(std::time::Duration::from_hours(1)),
                GrantDuration::Session,
            ],
            ..ApprovalSettings::default()
        };
        assert!(settings.allows(GrantDuration::Once));
        assert!(settings.allows(GrantDuration::For(std::time::Duration::from_mins(30))));
        assert!(!settings.allows(GrantDuration::For(std::time::Duration::from_hours(2))));
        assert!(settings.allows(GrantDuration::Session));
        assert!(!settings.allows(GrantDuration::Always));
    }
}
