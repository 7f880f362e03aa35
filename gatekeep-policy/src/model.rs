//! Domain types of a loaded policy set.
//!
//! These are what the rest of gatekeep works with; the TOML layout is the
//! loader's business (see [`crate::parse_str`]). Everything derives
//! `Serialize` so the agent can log or export the policy it enforces.

use std::{
    collections::BTreeSet,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::cgroup::CgroupPattern;

/// Every policy loaded from a set of files, in load order (files sorted by
/// name, policies in file order).
///
/// Load order matters in one place only: when cgroup globs of two policies
/// match the same cgroup, the first policy in load order governs it (see
/// [`PolicySet::policy_for_cgroup`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicySet {
    pub policies: Vec<Policy>,
}

/// One `[[policy]]`: which cgroups it governs and what their processes may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Unique across the whole policy set; shown to reviewers and in the audit.
    pub name: String,
    /// cgroup v2 directories (or globs of them) the policy governs, each with
    /// all its descendants.
    pub cgroups: Vec<CgroupPattern>,
    pub exec: ExecPolicy,
    pub connect: ConnectPolicy,
    pub approval: Approval,
    /// Self-protections this policy gives up (`[policy.protect]`); none by
    /// default.
    pub protect: Protect,
    /// Whether the policy enforces (the default) or only records what it
    /// would do (`mode = "audit"`).
    pub mode: Mode,
}

/// How a policy applies its rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny and pause as the rules say.
    #[default]
    Enforce,
    /// Deny and pause nothing: every action enforcement would have denied
    /// or asked about runs, and is recorded with what would have happened
    /// ("would deny", "would ask") and the rule. Self-protection is enforced
    /// in both modes. Switching is a policy reload.
    Audit,
}

impl Mode {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a policy does with an `execve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecPolicy {
    /// Action for executables no rule names (`allow` when not written).
    pub default: Action,
    /// In file order. A path appears at most once (validation refuses
    /// duplicates and conflicts), so order carries no meaning.
    pub rules: Vec<ExecRule>,
    /// What an exec that would be asked does when the kernel cannot bind its
    /// whole argv (more arguments or bytes than it captures, an unreadable
    /// argument, a compat 32-bit syscall): `deny` (when not written) or
    /// `ask` (the reviewer sees it marked truncated, and no grant covers
    /// it). Never `allow`: approving a prefix would approve every exec that
    /// differs after it.
    pub on_truncated: Action,
    /// Environment variables bound into exec requests besides the loader's
    /// `LD_*` (always bound): shown to reviewers and part of what a verdict
    /// or grant covers (`PYTHONPATH`, `NODE_OPTIONS`...). At most 8 names of
    /// at most 31 bytes (`[A-Za-z_][A-Za-z0-9_]*`), no duplicates.
    pub bound_env: Vec<String>,
    /// What a `PROT_EXEC` mapping (ld.so, `LD_PRELOAD`, `dlopen`) of a file
    /// no exec rule names gets: `allow` (when not written) or the exec
    /// `default`. A file a rule names always gets its rule's action, for a
    /// mapping as for an exec (`ask` reads as deny: a mapping is never
    /// paused).
    pub unlisted_mappings: UnlistedMappings,
    /// Action for an exec of a file with no name on disk (`memfd_create`,
    /// `O_TMPFILE`, a deleted file), which no rule can name: `deny` when not
    /// written.
    pub fileless: Action,
    /// Command-line rules (`[[policy.exec.command]]`), in file order: an
    /// executable and a pattern per argument. The agent matches them in user
    /// space (see `docs/policy-commands.md` and [`crate::CommandSet`]).
    pub commands: Vec<CommandRule>,
    /// Interpreters whose script operand meets the script's own rules
    /// (`interpreters`; [`DEFAULT_INTERPRETERS`] when not written). How each
    /// one's options are read follows from its file name
    /// ([`InterpreterKind`]).
    pub interpreters: Vec<PathBuf>,
    /// Multi-call binaries (`multicall`, none by default), whose command
    /// rules match the applet name where other rules match `argv[1]`.
    pub multicall: Vec<PathBuf>,
    /// What vouches for an allowed file's content (`integrity`).
    pub integrity: Integrity,
}

/// [`ExecPolicy::integrity`]: what an allow rule binds of its file's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Integrity {
    /// The content version the kernel compares (ctime, size, inode
    /// generation): any write to the file after the policy is loaded makes
    /// its rule stale, and the default applies until a reload.
    #[default]
    Content,
    /// The file's SHA-256 as well: an allowed file rewritten since the load
    /// is handed to the agent, which hashes it (once per content version)
    /// and allows it while it still has the bytes the rule was bound to.
    Sha256,
}

impl fmt::Display for Integrity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Integrity::Content => "content",
            Integrity::Sha256 => "sha256",
        })
    }
}

/// The interpreters a policy knows when it does not say (`interpreters`).
/// Those missing on a host are skipped there.
pub const DEFAULT_INTERPRETERS: &[&str] = &[
    "/bin/sh",
    "/bin/dash",
    "/bin/bash",
    "/usr/bin/sh",
    "/usr/bin/dash",
    "/usr/bin/bash",
    "/usr/bin/python3",
    "/usr/bin/perl",
    "/usr/bin/node",
    "/usr/bin/ruby",
];

/// How an interpreter reads its command line: which options take a value,
/// where the script operand is. Told from the interpreter's file name
/// (applet name for a multi-call binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InterpreterKind {
    /// `sh`, `dash`, `ash`, `bash`, `ksh`, `mksh`, `zsh`, `hush`.
    Shell,
    /// `python`, `python3`, `python3.11`, ...
    Python,
    /// `perl`, `perl5.36.0`, ...
    Perl,
    /// `node`, `nodejs`.
    Node,
    /// `ruby`, `ruby3.1`, ...
    Ruby,
}

impl InterpreterKind {
    /// The kind an interpreter named `name` (a file or applet name) is.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        let versioned = |stem: &str| {
            name.strip_prefix(stem)
                .is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        };
        match name {
            "sh" | "dash" | "ash" | "bash" | "ksh" | "mksh" | "zsh" | "hush" => {
                Some(InterpreterKind::Shell)
            }
            "node" | "nodejs" => Some(InterpreterKind::Node),
            _ if versioned("python") => Some(InterpreterKind::Python),
            _ if versioned("perl") => Some(InterpreterKind::Perl),
            _ if versioned("ruby") => Some(InterpreterKind::Ruby),
            _ => None,
        }
    }
}

/// One `[[policy.exec.command]]`: an executable, a pattern for each of its
/// arguments, and an action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandRule {
    /// The executable (absolute, matched by file identity like
    /// [`ExecRule::path`]); `argv[0]` as written.
    pub path: PathBuf,
    /// Patterns for `argv[1..]` (for a multi-call binary: the applet name,
    /// then its arguments); `argv[1..]` as written.
    pub args: Vec<ArgPattern>,
    pub action: Action,
}

/// A pattern for one argument of a [`CommandRule`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", content = "text", rename_all = "lowercase")]
pub enum ArgPattern {
    /// Exactly this argument (`\*`, `\?` and `\\` written for `*`, `?`
    /// and `\`).
    Literal(String),
    /// One argument matching a glob: `*` any run of characters (`/`
    /// included), `?` one character, `\` escapes the next one. Kept as
    /// written.
    Glob(String),
    /// `**`: any number of arguments, none included.
    Rest,
}

/// [`ExecPolicy::unlisted_mappings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnlistedMappings {
    /// Mapping a file no rule names as code is allowed: libraries load as
    /// usual, and only files a rule names are checked.
    Allow,
    /// It gets the exec `default` (an allow-list must then list the
    /// libraries its programs load, ld.so and libc included).
    Default,
}

impl fmt::Display for UnlistedMappings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnlistedMappings::Allow => "allow",
            UnlistedMappings::Default => "default",
        })
    }
}

/// One executable and what happens when a governed process runs it.
///
/// The path is absolute as written. The agent resolves it to the file's
/// identity (device + inode) when it loads the policy, and the kernel matches
/// that identity, so symlinks, relative paths, `..` and hard links all reach
/// the same rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecRule {
    pub path: std::path::PathBuf,
    pub action: Action,
}

/// What a policy does with a `connect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectPolicy {
    /// Action for IP destinations no rule matches (`allow` when not written).
    pub default: Action,
    /// Action for `AF_UNIX` connects and datagrams, which carry no IP
    /// address (`default` when not written).
    pub unix: Action,
    /// Whether governed processes may create raw sockets (`SOCK_RAW` in any
    /// family but netlink) and packet sockets (`AF_PACKET`): `allow` or
    /// `deny` (`deny` when not written). Their packets carry their own
    /// headers, so no address rule can follow them.
    pub raw_sockets: Action,
    /// Action for connects and datagrams to address families other than
    /// inet, inet6 and unix (vsock, netlink to another process, ...):
    /// `default` when not written.
    pub other_families: Action,
    /// In file order; see [`ConnectPolicy::action_for`] for how they match.
    pub rules: Vec<ConnectRule>,
    /// Host-name rules, in file order (`crate::hosts`, issue 20 item 3):
    /// they apply to addresses the workload resolved the names to.
    pub hosts: Vec<HostRule>,
    /// `AF_UNIX` name rules (`unix:/path`, `unix:@name`; `crate::unix`), in
    /// file order: a destination they do not name gets [`Self::unix`].
    pub unix_rules: Vec<UnixRule>,
}

/// An `AF_UNIX` destination and what a connect or datagram to it does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct UnixRule {
    /// As the rule writes it after `unix:`: an absolute path, or `@` and
    /// an abstract name.
    pub name: String,
    pub action: Action,
}

impl UnixRule {
    /// The rule's destination as a policy file writes it.
    #[must_use]
    pub fn target(&self) -> String {
        format!("{}{}", crate::unix::UNIX_PREFIX, self.name)
    }
}

impl fmt::Display for UnixRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.action, self.target())
    }
}

/// An IP network, a destination port range and an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct ConnectRule {
    /// Always normalised: host bits are zero (validation refuses others).
    pub net: IpNet,
    pub ports: PortRange,
    pub action: Action,
}

/// Inclusive destination port range `lo..=hi`; [`PortRange::ALL`] when a rule
/// names no port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PortRange(pub u16, pub u16);

/// How the approval of an `ask` works for one policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Approval {
    /// How long a paused request waits for reviewers (default 5m, at most 24h).
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
    /// What happens at the deadline: `allow` or `deny` (default `deny`).
    pub on_timeout: Action,
    /// Reviewer groups allowed to decide; empty means any authenticated
    /// reviewer.
    pub reviewers: Vec<String>,
    /// Distinct reviewers who must approve (at least 1).
    pub approvals_required: u32,
    /// What a reviewer may grant beyond this one request (default `once`).
    pub grant_durations: Vec<GrantDuration>,
    /// Whether an approval must say why (default false); denials never need
    /// a reason.
    pub require_reason: bool,
}

/// What a rule (or a reviewer) decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let the syscall through, decided in the kernel.
    Allow,
    /// Refuse the syscall with `EPERM`, decided in the kernel.
    Deny,
    /// Pause the process and ask a reviewer.
    Ask,
}

/// How long a reviewer's "allow" (or "deny") lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrantDuration {
    /// This one request only.
    Once,
    /// The same request from the same workload, for this long.
    For(Duration),
    /// Until the workload's cgroup goes away.
    Session,
    /// Until an administrator removes the grant.
    Always,
}

/// The string was not `allow`, `deny` or `ask`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown action \"{value}\" (expected allow, deny or ask)")]
pub struct ParseActionError {
    pub value: String,
}

/// The string was not a grant duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseGrantDurationError {
    #[error(
        "unknown grant duration \"{value}\" (expected once, session, always or a duration such as 30m or 1h)"
    )]
    Unknown { value: String },
    #[error("grant duration \"{value}\" is zero; use once for a single request")]
    Zero { value: String },
}

impl PortRange {
    /// Every port; what a rule without `:port` means.
    pub const ALL: PortRange = PortRange(0, u16::MAX);

    #[must_use]
    pub fn contains(self, port: u16) -> bool {
        self.0 <= port && port <= self.1
    }

    #[must_use]
    pub fn is_all(self) -> bool {
        self == Self::ALL
    }

    /// Number of ports in the range (1..=65536).
    #[must_use]
    pub fn len(self) -> u32 {
        u32::from(self.1) - u32::from(self.0) + 1
    }

    #[must_use]
    pub fn is_empty(self) -> bool {
        self.1 < self.0
    }

    #[must_use]
    pub fn overlaps(self, other: PortRange) -> bool {
        self.0 <= other.1 && other.0 <= self.1
    }
}

impl fmt::Display for PortRange {
    /// `443`, `8000-8999`, or `all`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_all() {
            f.write_str("all")
        } else if self.0 == self.1 {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{}-{}", self.0, self.1)
        }
    }
}

impl PolicySet {
    /// The policy with this name.
    #[must_use]
    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|policy| policy.name == name)
    }
}

impl ConnectRule {
    /// The rule's destination as a policy file writes it: `10.0.0.0/8`,
    /// `10.1.0.0/16:443`, `[2001:db8::]/32:8000-8999`.
    #[must_use]
    pub fn target(&self) -> String {
        format_target(self.net, self.ports)
    }
}

/// Formats a network and port range in the policy file syntax.
pub(crate) fn format_target(net: IpNet, ports: PortRange) -> String {
    let net = match net {
        IpNet::V4(v4) => v4.to_string(),
        IpNet::V6(v6) => format!("[{}]/{}", v6.addr(), v6.prefix_len()),
    };
    if ports.is_all() {
        net
    } else {
        format!("{net}:{ports}")
    }
}

impl fmt::Display for ConnectRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.action, self.target())
    }
}

impl ConnectPolicy {
    /// The rule naming the `AF_UNIX` destination `sun_path` (the bytes
    /// within the caller's length), matched as the kernel matches it
    /// ([`gatekeep_common::unix_rule_hash`]).
    #[must_use]
    pub fn unix_rule_for(&self, sun_path: &[u8]) -> Option<&UnixRule> {
        let wanted = gatekeep_common::unix_rule_hash(sun_path);
        self.unix_rules
            .iter()
            .find(|rule| crate::unix::rule_hash(&rule.name) == wanted)
    }

    /// What a connect or datagram to the `AF_UNIX` destination `sun_path`
    /// does, and why, as reviewers read it: its rule, else `unix`.
    #[must_use]
    pub fn decide_unix(&self, sun_path: &[u8]) -> (Action, String) {
        match self.unix_rule_for(sun_path) {
            Some(rule) => (rule.action, format!("connect {rule}")),
            None => (self.unix, format!("connect unix {}", self.unix)),
        }
    }

    /// The action for a connect to `addr:port`, as the kernel decides it:
    ///
    /// 1. among the rules whose network contains `addr` and whose ports
    ///    contain `port`, the longest prefix wins;
    /// 2. at the same prefix a port-specific rule beats an all-ports rule
    ///    (and of two port-specific ones, which validation only admits with
    ///    the same action, the narrower range);
    /// 3. if no rule matches, [`ConnectPolicy::default`] applies.
    ///
    /// IPv4-mapped IPv6 destinations (`::ffff:a.b.c.d`) are matched as the
    /// IPv4 address they carry, since that is where the connect goes, and
    /// `0.0.0.0` and `::` as `127.0.0.1` and `::1`, the loopback addresses
    /// a connect to them reaches.
    #[must_use]
    pub fn action_for(&self, addr: IpAddr, port: u16) -> Action {
        self.rule_for(addr, port)
            .map_or(self.default, |rule| rule.action)
    }

    /// The rule that decides a connect to `addr:port` (see
    /// [`ConnectPolicy::action_for`]), or `None` when the default does.
    #[must_use]
    pub fn rule_for(&self, addr: IpAddr, port: u16) -> Option<&ConnectRule> {
        let addr = match addr.to_canonical() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            other => other,
        };
        self.rules
            .iter()
            .filter(|rule| rule.net.contains(&addr) && rule.ports.contains(port))
            .max_by_key(|rule| {
                (
                    rule.net.prefix_len(),
                    !rule.ports.is_all(),
                    std::cmp::Reverse(rule.ports.len()),
                )
            })
    }
}

impl Action {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Ask => "ask",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = ParseActionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            "ask" => Ok(Action::Ask),
            _ => Err(ParseActionError {
                value: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for GrantDuration {
    /// `once`, `session`, `always`, or a duration such as `1h` or `1h 30m`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrantDuration::Once => f.write_str("once"),
            GrantDuration::For(duration) => {
                write!(f, "{}", humantime::format_duration(*duration))
            }
            GrantDuration::Session => f.write_str("session"),
            GrantDuration::Always => f.write_str("always"),
        }
    }
}

impl FromStr for GrantDuration {
    type Err = ParseGrantDurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "once" => Ok(GrantDuration::Once),
            "session" => Ok(GrantDuration::Session),
            "always" => Ok(GrantDuration::Always),
            _ => match humantime::parse_duration(s) {
                Ok(duration) if duration.is_zero() => Err(ParseGrantDurationError::Zero {
                    value: s.to_owned(),
                }),
                Ok(duration) => Ok(GrantDuration::For(duration)),
                Err(_) => Err(ParseGrantDurationError::Unknown {
                    value: s.to_owned(),
                }),
            },
        }
    }
}

impl Serialize for GrantDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GrantDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

fn serialize_duration<S: Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_duration(*duration))
}

// Which policy governs which cgroups (here rather than in `cgroup`, so that
// `cgroup` does not import the model).
impl PolicySet {
    /// Existing cgroup directories under the cgroup2 mount point `root`
    /// (`/sys/fs/cgroup` on a host) matched by each policy's patterns, as
    /// `(policy index, directory)`, ordered by policy then path.
    ///
    /// A directory matched by several policies is listed once, for the first
    /// policy in load order, which is the one that governs it. Each listed
    /// directory also stands for its descendants, which the agent gates too.
    #[must_use]
    pub fn expand_cgroups(&self, root: &Path) -> Vec<(usize, PathBuf)> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for (index, policy) in self.policies.iter().enumerate() {
            let mut dirs = BTreeSet::new();
            for pattern in &policy.cgroups {
                dirs.extend(pattern.expand(root));
            }
            for dir in dirs {
                if seen.insert(dir.clone()) {
                    out.push((index, dir));
                }
            }
        }
        out
    }

    /// The index of the policy governing a cgroup, given as the kernel names
    /// it (`/agents/job-1`, relative to the cgroup root).
    ///
    /// The nearest cgroup on the way up that some pattern matches decides
    /// (the cgroup itself first, then its parent, and so on); if patterns of
    /// several policies match that cgroup, the first policy in load order
    /// wins.
    #[must_use]
    pub fn policy_for_cgroup(&self, cgroup: &Path) -> Option<usize> {
        cgroup.ancestors().find_map(|dir| {
            self.policies
                .iter()
                .position(|policy| policy.cgroups.iter().any(|pattern| pattern.matches(dir)))
        })
    }
}

// Host-name rules (issue 20, item 3); how they match and decide: `crate::hosts`.

/// The names a host rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum HostPattern {
    /// One name, lower case, without a final dot.
    Exact(String),
    /// `*.SUFFIX`: every name ending in `.SUFFIX` with at least one more
    /// label (not `SUFFIX` itself).
    Wildcard(String),
}

impl HostPattern {
    /// Whether `name` (any case, with or without a final dot) is matched.
    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        let name = normalize(name);
        match self {
            HostPattern::Exact(exact) => name == *exact,
            HostPattern::Wildcard(suffix) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }

    /// Larger is more specific: an exact name, then wildcards by how many
    /// labels their suffix has.
    #[must_use]
    pub fn specificity(&self) -> (bool, usize) {
        match self {
            HostPattern::Exact(name) => (true, name.split('.').count()),
            HostPattern::Wildcard(suffix) => (false, suffix.split('.').count()),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// A host-name pattern, a destination port range and an action.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct HostRule {
    pub pattern: HostPattern,
    pub ports: PortRange,
    pub action: Action,
}

impl HostRule {
    /// The rule's destination as a policy file writes it.
    #[must_use]
    pub fn target(&self) -> String {
        if self.ports.is_all() {
            self.pattern.to_string()
        } else {
            format!("{}:{}", self.pattern, self.ports)
        }
    }
}

impl fmt::Display for HostRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.action, self.target())
    }
}

/// A name as compared: lower case, no final dot.
#[must_use]
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn action_round_trips_through_strings() {
        for action in [Action::Allow, Action::Deny, Action::Ask] {
            assert_eq!(action.to_string().parse::<Action>(), Ok(action));
        }
        assert_eq!(
            "alow".parse::<Action>().map_err(|e| e.to_string()),
            Err("unknown action \"alow\" (expected allow, deny or ask)".to_owned())
        );
        assert!("Allow".parse::<Action>().is_err(), "actions are lowercase");
    }

    #[test]
    fn grant_duration_round_trips_through_strings() {
        for text in ["once", "session", "always", "1h", "30m", "1h 30m", "2days"] {
            let parsed: GrantDuration = text.parse().expect(text);
            let again: GrantDuration = parsed.to_string().parse().expect(text);
            assert_eq!(parsed, again, "{text}");
        }
        assert_eq!(
            "1h30m".parse::<GrantDuration>(),
            Ok(GrantDuration::For(Duration::from_mins(90)))
        );
        assert_eq!(
            GrantDuration::For(Duration::from_hours(1)).to_string(),
            "1h"
        );
        assert_eq!(
            "forever".parse::<GrantDuration>(),
            Err(ParseGrantDurationError::Unknown {
                value: "forever".to_owned()
            })
        );
        assert_eq!(
            "0s".parse::<GrantDuration>(),
            Err(ParseGrantDurationError::Zero {
                value: "0s".to_owned()
            })
        );
    }

    #[test]
    fn grant_duration_serde_uses_the_string_form() {
        let json = serde_json::to_string(&[
            GrantDuration::Once,
            GrantDuration::For(Duration::from_hours(1)),
            GrantDuration::Session,
            GrantDuration::Always,
        ])
        .expect("serialize");
        assert_eq!(json, r#"["once","1h","session","always"]"#);
        let back: Vec<GrantDuration> = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back[1], GrantDuration::For(Duration::from_hours(1)));
        assert!(serde_json::from_str::<GrantDuration>(r#""sometimes""#).is_err());
    }

    #[test]
    fn port_range_display_and_overlap() {
        assert_eq!(PortRange::ALL.to_string(), "all");
        assert_eq!(PortRange(443, 443).to_string(), "443");
        assert_eq!(PortRange(8000, 8999).to_string(), "8000-8999");
        assert!(PortRange(80, 90).overlaps(PortRange(90, 100)));
        assert!(!PortRange(80, 89).overlaps(PortRange(90, 100)));
        assert_eq!(PortRange::ALL.len(), 65536);
        assert!(PortRange(8000, 8999).contains(8999));
        assert!(!PortRange(8000, 8999).contains(9000));
    }

    fn rule(net: &str, ports: PortRange, action: Action) -> ConnectRule {
        ConnectRule {
            net: net.parse().expect(net),
            ports,
            action,
        }
    }

    #[test]
    fn most_specific_prefix_then_port_specific_wins() {
        let policy = ConnectPolicy {
            default: Action::Ask,
            unix: Action::Allow,
            raw_sockets: Action::Deny,
            other_families: Action::Ask,
            rules: vec![
                rule("10.0.0.0/8", PortRange::ALL, Action::Deny),
                rule("10.1.0.0/16", PortRange::ALL, Action::Allow),
                rule("10.1.0.0/16", PortRange(22, 22), Action::Deny),
                rule("10.1.2.0/24", PortRange(443, 443), Action::Ask),
                rule("::1/128", PortRange::ALL, Action::Allow),
            ],
            hosts: Vec::new(),
            unix_rules: Vec::new(),
        };
        let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
        // Only the /8 matches.
        assert_eq!(policy.action_for(v4(10, 9, 9, 9), 80), Action::Deny);
        // The /16 is more specific than the /8.
        assert_eq!(policy.action_for(v4(10, 1, 9, 9), 80), Action::Allow);
        // Same /16 prefix: the port-specific rule beats the all-ports one.
        assert_eq!(policy.action_for(v4(10, 1, 9, 9), 22), Action::Deny);
        // The /24 is the longest prefix, but only for port 443...
        assert_eq!(policy.action_for(v4(10, 1, 2, 3), 443), Action::Ask);
        // ...other ports fall back to the /16.
        assert_eq!(policy.action_for(v4(10, 1, 2, 3), 444), Action::Allow);
        // Nothing matches: the default.
        assert_eq!(policy.action_for(v4(192, 0, 2, 1), 80), Action::Ask);
        assert_eq!(
            policy.action_for("::1".parse().expect("v6"), 80),
            Action::Allow
        );
        // An IPv4-mapped IPv6 destination is matched as IPv4.
        assert_eq!(
            policy.action_for("::ffff:10.1.9.9".parse().expect("mapped"), 22),
            Action::Deny
        );
    }

    #[test]
    fn connect_rule_target_uses_file_syntax() {
        assert_eq!(
            rule("10.2.0.0/16", PortRange(8000, 8999), Action::Allow).target(),
            "10.2.0.0/16:8000-8999"
        );
        assert_eq!(
            rule("2001:db8::/32", PortRange(443, 443), Action::Allow).target(),
            "[2001:db8::]/32:443"
        );
        assert_eq!(
            rule("::1/128", PortRange::ALL, Action::Deny).to_string(),
            "deny [::1]/128"
        );
    }
}

/// `[policy.protect]`: which self-protections a policy relaxes. Everything
/// is protected unless named here; every relaxation is recorded in the
/// audit log when the policy is loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Protect {
    /// In file order, without duplicates.
    pub relax: Vec<ProtectPoint>,
}

/// One self-protection a policy may relax. The kernel id of each is in
/// `gatekeep_common::protect` ([`ProtectPoint::kernel_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProtectPoint {
    /// Signals to gatekeep's processes.
    Signals,
    /// ptrace and `/proc/<pid>/mem`, `environ`, ... of gatekeep's processes.
    Ptrace,
    /// The `bpf()` system call.
    Bpf,
    /// Module loading and kexec.
    Kernel,
    /// Block devices, `/dev/mem`, `/dev/kmem`, `/dev/port`, `/proc/kcore`.
    RawDevices,
    /// mount, umount, `move_mount`, `pivot_root`.
    Mount,
    /// Connecting to the decision service's listeners.
    ServiceConnect,
    /// gatekeep's files by identity: configuration, policies, state, audit, pins, binaries.
    Files,
    /// Leaving the gated cgroup subtree.
    Cgroups,
}

impl ProtectPoint {
    /// Every point, in kernel id order.
    pub const ALL: [ProtectPoint; 9] = [
        ProtectPoint::Signals,
        ProtectPoint::Ptrace,
        ProtectPoint::Bpf,
        ProtectPoint::Kernel,
        ProtectPoint::RawDevices,
        ProtectPoint::Mount,
        ProtectPoint::ServiceConnect,
        ProtectPoint::Files,
        ProtectPoint::Cgroups,
    ];

    /// The name a policy file uses.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ProtectPoint::Signals => "signals",
            ProtectPoint::Ptrace => "ptrace",
            ProtectPoint::Bpf => "bpf",
            ProtectPoint::Kernel => "kernel",
            ProtectPoint::RawDevices => "raw-devices",
            ProtectPoint::Mount => "mount",
            ProtectPoint::ServiceConnect => "service-connect",
            ProtectPoint::Files => "files",
            ProtectPoint::Cgroups => "cgroups",
        }
    }

    /// The protection's id in the kernel programs (`gatekeep_common::protect`).
    #[must_use]
    pub fn kernel_id(self) -> u32 {
        match self {
            ProtectPoint::Signals => 1,
            ProtectPoint::Ptrace => 2,
            ProtectPoint::Bpf => 3,
            ProtectPoint::Kernel => 4,
            ProtectPoint::RawDevices => 5,
            ProtectPoint::Mount => 6,
            ProtectPoint::ServiceConnect => 7,
            ProtectPoint::Files => 16,
            ProtectPoint::Cgroups => 17,
        }
    }
}

impl fmt::Display for ProtectPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProtectPoint {
    type Err = ParseProtectPointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProtectPoint::ALL
            .into_iter()
            .find(|point| point.as_str() == s)
            .ok_or_else(|| ParseProtectPointError {
                value: s.to_owned(),
            })
    }
}

/// The string names no self-protection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown protection \"{value}\" (expected signals, ptrace, bpf, kernel, raw-devices, mount or service-connect)"
)]
pub struct ParseProtectPointError {
    pub value: String,
}
