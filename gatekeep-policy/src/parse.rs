//! From TOML text to [`Policy`] values, with every problem located.
//!
//! The loader walks toml's spanned document (`toml::de::DeTable`) itself
//! instead of deriving `Deserialize` with `deny_unknown_fields`: serde stops
//! at the first error, and a security team fixing a file wants all of them
//! at once, each with its line and column.

use std::{borrow::Cow, collections::HashMap, ops::Range, path::PathBuf, time::Duration};

use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

use crate::{
    cgroup::CgroupPattern,
    error::Diagnostic,
    model::{
        Action, Approval, ArgPattern, CommandRule, ConnectPolicy, ConnectRule,
        DEFAULT_INTERPRETERS, ExecPolicy, ExecRule, GrantDuration, HostRule, Integrity,
        InterpreterKind, Mode, Policy, Protect, ProtectPoint, UnixRule, UnlistedMappings,
    },
    net::parse_target,
};

pub(crate) type Span = Range<usize>;
type Key<'i> = Spanned<Cow<'i, str>>;
pub(crate) type Value<'i> = Spanned<DeValue<'i>>;

/// How long a paused request waits when a policy does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_mins(5);
/// The longest `timeout` a policy may set.
pub const MAX_TIMEOUT: Duration = Duration::from_hours(24);

const EXEC_PATH_NOTE: &str = "exec rules match absolute paths; relative paths, `..` and symlinks are resolved by the kernel-side identity match";

const POLICY_KEYS: &[&str] = &[
    "name", "cgroups", "mode", "exec", "connect", "approval", "protect",
];
const PROTECT_KEYS: &[&str] = &["relax"];
const EXEC_KEYS: &[&str] = &[
    "default",
    "allow",
    "deny",
    "ask",
    "on_truncated",
    "bound_env",
    "unlisted_mappings",
    "fileless",
    "command",
    "interpreters",
    "multicall",
    "integrity",
];
const COMMAND_KEYS: &[&str] = &["argv", "action"];
/// Most names `exec.bound_env` may list (the kernel matches each one).
const BOUND_ENV_MAX: usize = 8;
/// Longest `exec.bound_env` name, in bytes (the kernel compares 32 bytes, `=` included).
const BOUND_ENV_NAME_MAX: usize = 31;
const CONNECT_KEYS: &[&str] = &[
    "default",
    "allow",
    "deny",
    "ask",
    "unix",
    "raw_sockets",
    "other_families",
];
const APPROVAL_KEYS: &[&str] = &[
    "timeout",
    "on_timeout",
    "reviewers",
    "approvals_required",
    "grant_durations",
    "require_reason",
];
const RULE_LISTS: [(&str, Action); 3] = [
    ("allow", Action::Allow),
    ("deny", Action::Deny),
    ("ask", Action::Ask),
];

/// A place in a file, 1-based.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pos {
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// A policy as parsed, with what the checks across files need to point at.
pub(crate) struct ParsedPolicy {
    pub policy: Policy,
    /// Where the name was written; `None` if it was missing or invalid.
    pub name_at: Option<Pos>,
    /// Where each of `policy.cgroups` was written.
    pub cgroups_at: Vec<Pos>,
    /// Where each of `policy.exec.rules` was written.
    pub exec_at: Vec<Pos>,
    /// Where each of `policy.connect.hosts` was written.
    pub hosts_at: Vec<Pos>,
    /// Where each of `policy.connect.unix_rules` was written.
    pub unix_at: Vec<Pos>,
}

/// Parses one file, appending its problems to `diagnostics`.
pub(crate) fn parse_file(
    file: &str,
    text: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<ParsedPolicy> {
    let mut walker = Walker::new(file, text);
    let (document, errors) = DeTable::parse_recoverable(text);
    let policies = if errors.is_empty() {
        walker.document(document.get_ref())
    } else {
        // Values recovered around a syntax error are guesses; checking them
        // would only add noise.
        for error in errors {
            let span = error.span().unwrap_or(0..0);
            walker.error(&span, format!("invalid TOML: {}", error.message()));
        }
        Vec::new()
    };
    let mut found = walker.diagnostics;
    found.sort_by_key(|d| (d.line, d.column));
    found.dedup();
    diagnostics.extend(found);
    policies
}

pub(crate) struct Walker<'a> {
    file: &'a str,
    text: &'a str,
    line_starts: Vec<usize>,
    pub(crate) diagnostics: Vec<Diagnostic>,
}

impl<'a> Walker<'a> {
    pub(crate) fn new(file: &'a str, text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(at, _)| at + 1))
            .collect();
        Self {
            file,
            text,
            line_starts,
            diagnostics: Vec::new(),
        }
    }

    pub(crate) fn pos(&self, span: &Span) -> Pos {
        let offset = span.start.min(self.text.len());
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let start = self.line_starts[line.saturating_sub(1)];
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |before| before.chars().count());
        Pos {
            file: self.file.to_owned(),
            line: line.max(1),
            column: column + 1,
        }
    }

    pub(crate) fn error(&mut self, span: &Span, message: impl Into<String>) {
        let Pos { file, line, column } = self.pos(span);
        self.diagnostics.push(Diagnostic {
            file,
            line,
            column,
            message: message.into(),
        });
    }

    fn document(&mut self, root: &DeTable<'_>) -> Vec<ParsedPolicy> {
        let mut policies = Vec::new();
        let mut seen_policy = false;
        for (key, value) in sorted(root) {
            if key.get_ref() != "policy" {
                self.unknown_key(key, "this file", &["policy"]);
                continue;
            }
            seen_policy = true;
            match value.get_ref() {
                DeValue::Array(items) => {
                    for item in items {
                        match item.get_ref() {
                            DeValue::Table(table) => {
                                policies.push(self.policy(&item.span(), table));
                            }
                            other => self.error(
                                &item.span(),
                                format!("each policy must be a table, found {}", other.type_str()),
                            ),
                        }
                    }
                }
                DeValue::Table(_) => self.error(
                    &value.span(),
                    "write [[policy]] (an array of tables, one per policy), not [policy]",
                ),
                other => self.error(
                    &key.span(),
                    format!(
                        "`policy` must be written as [[policy]] tables, found {}",
                        other.type_str()
                    ),
                ),
            }
        }
        if !seen_policy {
            self.error(
                &(0..0),
                "no [[policy]] in this file; add one (see examples/ai-agents.toml) or remove the file",
            );
        }
        policies
    }

    fn policy(&mut self, header: &Span, table: &DeTable<'_>) -> ParsedPolicy {
        self.check_keys(table, "[[policy]]", POLICY_KEYS);

        let mut name_at = None;
        let name = match field(table, "name") {
            None => {
                self.error(
                    header,
                    "policy has no name; add name = \"...\" under [[policy]]",
                );
                String::new()
            }
            Some(value) => match self.string(value, "name") {
                Some(name) if name.trim().is_empty() => {
                    self.error(
                        &value.span(),
                        "policy name is empty; give the policy a name such as name = \"ai-agents\"",
                    );
                    name.to_owned()
                }
                Some(name) if name.chars().any(char::is_control) => {
                    self.error(
                        &value.span(),
                        "policy name contains control characters; use printable text",
                    );
                    name.to_owned()
                }
                Some(name) => {
                    name_at = Some(self.pos(&value.span()));
                    name.to_owned()
                }
                None => String::new(),
            },
        };

        let (cgroups, cgroups_at) = self.cgroups(header, table);
        let (exec, exec_at) = self.exec(table);
        let (connect, hosts_at, unix_at) = self.connect(table);
        let approval = self.approval(table);
        let protect = self.protect(table);
        let mode = self.mode(table);
        ParsedPolicy {
            policy: Policy {
                name,
                cgroups,
                exec,
                connect,
                approval,
                protect,
                mode,
            },
            name_at,
            cgroups_at,
            exec_at,
            hosts_at,
            unix_at,
        }
    }

    /// `exec.integrity`: `"content"` or `"sha256"`.
    fn integrity(&mut self, value: &Value<'_>) -> Option<Integrity> {
        match self.string(value, "integrity")? {
            "content" => Some(Integrity::Content),
            "sha256" => Some(Integrity::Sha256),
            other => {
                self.error(
                    &value.span(),
                    format!(
                        "unknown integrity value {other:?} (expected \"content\", the default: an allowed file rewritten after the policy is loaded is no longer allowed until a reload, or \"sha256\": it stays allowed while its SHA-256 is the one it had at load)"
                    ),
                );
                None
            }
        }
    }

    fn cgroups(&mut self, header: &Span, table: &DeTable<'_>) -> (Vec<CgroupPattern>, Vec<Pos>) {
        let mut patterns = Vec::new();
        let mut places = Vec::new();
        let Some(value) = field(table, "cgroups") else {
            self.error(
                header,
                "policy has no cgroups; add cgroups = [\"/sys/fs/cgroup/...\"] to say which workloads it governs",
            );
            return (patterns, places);
        };
        let Some(items) =
            self.string_list(value, "cgroups", "cgroups = [\"/sys/fs/cgroup/agents/*\"]")
        else {
            return (patterns, places);
        };
        if items.is_empty() {
            self.error(
                &value.span(),
                "cgroups is empty, so the policy governs nothing; list at least one cgroup, e.g. \"/sys/fs/cgroup/agents/*\"",
            );
        }
        let mut seen: HashMap<String, Span> = HashMap::new();
        for (text, span) in items {
            match CgroupPattern::new(text) {
                Ok(pattern) => {
                    if let Some(first) = seen.get(pattern.relative()) {
                        let first = self.pos(first);
                        self.error(
                            &span,
                            format!(
                                "cgroup pattern \"{text}\" is listed twice in this policy (first at line {}); remove one",
                                first.line
                            ),
                        );
                        continue;
                    }
                    seen.insert(pattern.relative().to_owned(), span.clone());
                    places.push(self.pos(&span));
                    patterns.push(pattern);
                }
                Err(e) => self.error(&span, e.to_string()),
            }
        }
        (patterns, places)
    }

    /// `[policy.exec]`, and where each kept rule was written.
    fn exec(&mut self, policy: &DeTable<'_>) -> (ExecPolicy, Vec<Pos>) {
        let mut exec = ExecPolicy {
            default: Action::Allow,
            rules: Vec::new(),
            on_truncated: Action::Deny,
            bound_env: Vec::new(),
            unlisted_mappings: UnlistedMappings::Allow,
            fileless: Action::Deny,
            commands: Vec::new(),
            interpreters: DEFAULT_INTERPRETERS.iter().map(PathBuf::from).collect(),
            multicall: Vec::new(),
            integrity: Integrity::Content,
        };
        let mut places = Vec::new();
        let Some(table) = self.section(policy, "exec", EXEC_KEYS) else {
            return (exec, places);
        };
        if let Some(value) = field(table, "default") {
            exec.default = self.action(value, "default").unwrap_or(Action::Allow);
        }
        if let Some(value) = field(table, "on_truncated") {
            match self.string(value, "on_truncated") {
                Some("deny") => exec.on_truncated = Action::Deny,
                Some("ask") => exec.on_truncated = Action::Ask,
                Some("allow") => self.error(
                    &value.span(),
                    "on_truncated cannot be \"allow\": the kernel could not bind the whole argv, so allowing it would allow every exec that differs after the truncation; use \"deny\" (the default) or \"ask\"",
                ),
                Some(other) => self.error(
                    &value.span(),
                    format!(
                        "unknown on_truncated value {other:?} (expected \"deny\" or \"ask\")"
                    ),
                ),
                None => {}
            }
        }
        if let Some(value) = field(table, "bound_env") {
            exec.bound_env = self.bound_env(value);
        }
        if let Some(value) = field(table, "unlisted_mappings") {
            match self.string(value, "unlisted_mappings") {
                Some("allow") => exec.unlisted_mappings = UnlistedMappings::Allow,
                Some("default") => exec.unlisted_mappings = UnlistedMappings::Default,
                Some(other) => self.error(
                    &value.span(),
                    format!(
                        "unknown unlisted_mappings value {other:?} (expected \"allow\", to let programs map any library no rule names, or \"default\", to give such mappings the exec default)"
                    ),
                ),
                None => {}
            }
        }
        if let Some(value) = field(table, "fileless") {
            exec.fileless = self.action(value, "fileless").unwrap_or(Action::Deny);
        }
        if let Some(value) = field(table, "integrity") {
            exec.integrity = self.integrity(value).unwrap_or_default();
        }
        self.exec_matching(table, &mut exec);
        let mut rules: Vec<(Span, ExecRule)> = Vec::new();
        for (key, action) in RULE_LISTS {
            let Some(value) = field(table, key) else {
                continue;
            };
            let example = format!("{key} = [\"/usr/bin/git\"]");
            let Some(items) = self.string_list(value, key, &example) else {
                continue;
            };
            for (text, span) in items {
                if let Some(path) = self.exec_path(text, &span) {
                    rules.push((span, ExecRule { path, action }));
                }
            }
        }
        rules.sort_by_key(|(span, _)| span.start);

        let mut seen: HashMap<PathBuf, (Span, Action)> = HashMap::new();
        for (span, rule) in rules {
            if let Some((first, first_action)) = seen.get(&rule.path) {
                let line = self.pos(first).line;
                let path = rule.path.display();
                let message = if *first_action == rule.action {
                    format!(
                        "exec path \"{path}\" is listed twice under {} (first at line {line}); remove one",
                        rule.action
                    )
                } else {
                    format!(
                        "exec path \"{path}\" is listed under both {first_action} (line {line}) and {}; a path may appear under one action only",
                        rule.action
                    )
                };
                self.error(&span, message);
                continue;
            }
            places.push(self.pos(&span));
            seen.insert(rule.path.clone(), (span, rule.action));
            exec.rules.push(rule);
        }
        (exec, places)
    }

    /// The keys of `[policy.exec]` the agent matches in user space:
    /// `command`, `interpreters`, `multicall`.
    fn exec_matching(&mut self, table: &DeTable<'_>, exec: &mut ExecPolicy) {
        if let Some(value) = field(table, "command") {
            exec.commands = self.commands(value);
        }
        if let Some(value) = field(table, "interpreters") {
            exec.interpreters = self.interpreters(value);
        }
        if let Some(value) = field(table, "multicall") {
            exec.multicall = self.paths(value, "multicall", "multicall = [\"/bin/busybox\"]");
        }
    }

    /// `[[policy.exec.command]]`: command-line rules.
    fn commands(&mut self, value: &Value<'_>) -> Vec<CommandRule> {
        const EXAMPLE: &str = "[[policy.exec.command]] with argv = [\"/usr/bin/kubectl\", \"delete\", \"**\"] and action = \"ask\"";
        let DeValue::Array(items) = value.get_ref() else {
            self.error(
                &value.span(),
                format!(
                    "`command` must be an array of tables ({EXAMPLE}), found {}",
                    value.get_ref().type_str()
                ),
            );
            return Vec::new();
        };
        let mut rules: Vec<CommandRule> = Vec::new();
        let mut seen: HashMap<(PathBuf, Vec<ArgPattern>), usize> = HashMap::new();
        for item in items {
            let DeValue::Table(table) = item.get_ref() else {
                self.error(
                    &item.span(),
                    format!(
                        "`command` must contain tables ({EXAMPLE}), found {}",
                        item.get_ref().type_str()
                    ),
                );
                continue;
            };
            self.check_keys(table, "[[policy.exec.command]]", COMMAND_KEYS);
            let action = if let Some(value) = field(table, "action") {
                self.action(value, "action")
            } else {
                self.error(
                    &item.span(),
                    "[[policy.exec.command]] has no `action`; add action = \"allow\", \"deny\" or \"ask\"",
                );
                None
            };
            let Some(argv_value) = field(table, "argv") else {
                self.error(
                    &item.span(),
                    format!("[[policy.exec.command]] has no `argv`; write the executable and a pattern per argument, e.g. {EXAMPLE}"),
                );
                continue;
            };
            let Some(argv) = self.string_list(argv_value, "argv", EXAMPLE) else {
                continue;
            };
            let Some(((exe, exe_span), patterns)) = argv.split_first() else {
                self.error(
                    &argv_value.span(),
                    "empty argv; its first element is the executable's absolute path, e.g. \"/usr/bin/kubectl\"",
                );
                continue;
            };
            let path = self.exec_path(exe, exe_span);
            let mut patterns_read = Vec::new();
            let mut valid = path.is_some();
            for (text, span) in patterns {
                match ArgPattern::parse(text) {
                    Ok(pattern) => patterns_read.push(pattern),
                    Err(message) => {
                        self.error(span, message);
                        valid = false;
                    }
                }
            }
            let (Some(path), Some(action), true) = (path, action, valid) else {
                continue;
            };
            let line = self.pos(&argv_value.span()).line;
            if let Some(first) = seen.get(&(path.clone(), patterns_read.clone())) {
                self.error(
                    &argv_value.span(),
                    format!(
                        "this argv is already a command rule at line {first}; two rules with the same patterns cannot both win: remove one"
                    ),
                );
                continue;
            }
            seen.insert((path.clone(), patterns_read.clone()), line);
            rules.push(CommandRule {
                path,
                args: patterns_read,
                action,
            });
        }
        rules
    }

    /// `interpreters`: absolute paths whose file names say how to read
    /// their options.
    fn interpreters(&mut self, value: &Value<'_>) -> Vec<PathBuf> {
        let Some(items) = self.string_list(
            value,
            "interpreters",
            "interpreters = [\"/bin/sh\", \"/usr/bin/python3\"]",
        ) else {
            return DEFAULT_INTERPRETERS.iter().map(PathBuf::from).collect();
        };
        let mut out: Vec<PathBuf> = Vec::new();
        for (text, span) in items {
            let Some(path) = self.exec_path(text, &span) else {
                continue;
            };
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if InterpreterKind::from_name(name).is_none() {
                self.error(
                    &span,
                    format!(
                        "interpreter {text:?}: gatekeep cannot tell how {name:?} reads its options; interpreters are known by file name (sh, dash, ash, bash, ksh, mksh, zsh, hush, python*, perl*, node, nodejs, ruby*)"
                    ),
                );
            } else if out.contains(&path) {
                self.error(
                    &span,
                    format!("interpreters lists {text:?} twice; remove one"),
                );
            } else {
                out.push(path);
            }
        }
        out
    }

    /// A list of absolute executable paths.
    fn paths(&mut self, value: &Value<'_>, key: &str, example: &str) -> Vec<PathBuf> {
        let Some(items) = self.string_list(value, key, example) else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = Vec::new();
        for (text, span) in items {
            if let Some(path) = self.exec_path(text, &span) {
                if out.contains(&path) {
                    self.error(&span, format!("{key} lists {text:?} twice; remove one"));
                } else {
                    out.push(path);
                }
            }
        }
        out
    }

    fn exec_path(&mut self, text: &str, span: &Span) -> Option<PathBuf> {
        let message = if text.is_empty() {
            "empty exec path; write the absolute path of an executable, e.g. \"/usr/bin/git\""
                .to_owned()
        } else if !text.starts_with('/') {
            format!("exec path \"{text}\" is not absolute ({EXEC_PATH_NOTE})")
        } else if text.split('/').any(|part| part == "." || part == "..") {
            format!(
                "exec path \"{text}\" contains `.` or `..`; write the plain absolute path ({EXEC_PATH_NOTE})"
            )
        } else if text.ends_with('/') {
            format!("exec path \"{text}\" names a directory; name an executable file")
        } else if text.contains('*') {
            format!(
                "exec path \"{text}\" contains `*`; exec rules name one executable each (they match by file identity), so list each executable"
            )
        } else {
            return Some(PathBuf::from(text));
        };
        self.error(span, message);
        None
    }

    /// The host rules that clash with no earlier one (the others are
    /// errors), and where each is written.
    fn kept_hosts(&mut self, hosts: Vec<(Span, HostRule)>) -> (Vec<HostRule>, Vec<Pos>) {
        let mut kept: Vec<(Span, HostRule)> = Vec::new();
        for (span, rule) in hosts {
            if let Some(message) = self.host_clash(&kept, &rule) {
                self.error(&span, message);
                continue;
            }
            kept.push((span, rule));
        }
        let at = kept.iter().map(|(span, _)| self.pos(span)).collect();
        (kept.into_iter().map(|(_, rule)| rule).collect(), at)
    }

    /// The connect section, and where each of its host and unix rules is
    /// written.
    fn connect(&mut self, policy: &DeTable<'_>) -> (ConnectPolicy, Vec<Pos>, Vec<Pos>) {
        let mut connect = ConnectPolicy {
            default: Action::Allow,
            unix: Action::Allow,
            raw_sockets: Action::Deny,
            other_families: Action::Allow,
            rules: Vec::new(),
            hosts: Vec::new(),
            unix_rules: Vec::new(),
        };
        let Some(table) = self.section(policy, "connect", CONNECT_KEYS) else {
            return (connect, Vec::new(), Vec::new());
        };
        if let Some(value) = field(table, "default") {
            connect.default = self.action(value, "default").unwrap_or(Action::Allow);
        }
        // `unix` and `other_families` follow `default` unless written.
        connect.unix = connect.default;
        connect.other_families = connect.default;
        if let Some(value) = field(table, "unix") {
            connect.unix = self.action(value, "unix").unwrap_or(connect.default);
        }
        if let Some(value) = field(table, "other_families") {
            connect.other_families = self
                .action(value, "other_families")
                .unwrap_or(connect.default);
        }
        if let Some(value) = field(table, "raw_sockets") {
            match self.action(value, "raw_sockets") {
                Some(Action::Ask) => self.error(
                    &value.span(),
                    "raw_sockets cannot be \"ask\": a raw or packet socket is refused or allowed when it is created, before it has a destination to show a reviewer; use \"allow\" or \"deny\"",
                ),
                Some(action) => connect.raw_sockets = action,
                None => {}
            }
        }
        let mut rules: Vec<(Span, ConnectRule)> = Vec::new();
        let mut hosts: Vec<(Span, HostRule)> = Vec::new();
        let mut unix_rules: Vec<(Span, UnixRule)> = Vec::new();
        for (key, action) in RULE_LISTS {
            let Some(value) = field(table, key) else {
                continue;
            };
            let example = format!("{key} = [\"10.0.0.0/8:443\"]");
            let Some(items) = self.string_list(value, key, &example) else {
                continue;
            };
            for (text, span) in items {
                if text.starts_with(crate::unix::UNIX_PREFIX) {
                    match crate::unix::parse_unix_target(text) {
                        Ok(name) => unix_rules.push((
                            span,
                            UnixRule {
                                name: name.to_owned(),
                                action,
                            },
                        )),
                        Err(message) => self.error(&span, message),
                    }
                    continue;
                }
                if crate::hosts::is_host_target(text) {
                    match crate::hosts::parse_host_target(text) {
                        Ok((pattern, ports)) => hosts.push((
                            span,
                            HostRule {
                                pattern,
                                ports,
                                action,
                            },
                        )),
                        Err(message) => self.error(&span, message),
                    }
                    continue;
                }
                match parse_target(text) {
                    Ok((net, ports)) => rules.push((span, ConnectRule { net, ports, action })),
                    Err(e) => self.error(&span, e.to_string()),
                }
            }
        }
        rules.sort_by_key(|(span, _)| span.start);
        hosts.sort_by_key(|(span, _)| span.start);
        let (kept_unix, unix_at) = self.kept_unix(unix_rules);
        connect.unix_rules = kept_unix;
        let (kept_hosts, hosts_at) = self.kept_hosts(hosts);
        connect.hosts = kept_hosts;

        let mut kept: Vec<(Span, ConnectRule)> = Vec::new();
        for (span, rule) in rules {
            if let Some(message) = self.connect_clash(&kept, &rule) {
                self.error(&span, message);
                continue;
            }
            kept.push((span, rule));
        }
        connect.rules = kept.into_iter().map(|(_, rule)| rule).collect();
        (connect, hosts_at, unix_at)
    }

    /// Why `rule` cannot join `kept`: the same network and ports again, or
    /// overlapping port ranges at the same prefix under different actions
    /// (which no "most specific wins" order could settle).
    fn connect_clash(&self, kept: &[(Span, ConnectRule)], rule: &ConnectRule) -> Option<String> {
        let target = rule.target();
        for (span, first) in kept.iter().filter(|(_, first)| first.net == rule.net) {
            let line = self.pos(span).line;
            if first.ports == rule.ports {
                return Some(if first.action == rule.action {
                    format!(
                        "connect rule {target} is listed twice under {} (first at line {line}); remove one",
                        rule.action
                    )
                } else {
                    format!(
                        "connect rule {target} is listed under both {} (line {line}) and {}; a network and port range may appear under one action only",
                        first.action, rule.action
                    )
                });
            }
            let both_specific = !first.ports.is_all() && !rule.ports.is_all();
            if both_specific && first.action != rule.action && first.ports.overlaps(rule.ports) {
                return Some(format!(
                    "connect rule {target} ({}) overlaps {} ({}, line {line}) at the same prefix; split the port ranges so they do not overlap",
                    rule.action,
                    first.target(),
                    first.action
                ));
            }
        }
        None
    }

    /// The `AF_UNIX` rules in file order, those that clash with an earlier
    /// one refused ([`Self::unix_clash`]), and where each is written.
    fn kept_unix(&mut self, mut rules: Vec<(Span, UnixRule)>) -> (Vec<UnixRule>, Vec<Pos>) {
        rules.sort_by_key(|(span, _)| span.start);
        let mut kept: Vec<(Span, UnixRule)> = Vec::new();
        for (span, rule) in rules {
            if let Some(message) = self.unix_clash(&kept, &rule) {
                self.error(&span, message);
                continue;
            }
            kept.push((span, rule));
        }
        let at = kept.iter().map(|(span, _)| self.pos(span)).collect();
        (kept.into_iter().map(|(_, rule)| rule).collect(), at)
    }

    /// Why `AF_UNIX` `rule` cannot join `kept`: a rule on the same name
    /// as the kernel resolves it (`/run/x` and `/run/x` again, under one
    /// action or two).
    fn unix_clash(&self, kept: &[(Span, UnixRule)], rule: &UnixRule) -> Option<String> {
        let hash = crate::unix::rule_hash(&rule.name);
        let (span, first) = kept
            .iter()
            .find(|(_, first)| crate::unix::rule_hash(&first.name) == hash)?;
        let line = self.pos(span).line;
        let target = rule.target();
        Some(if first.action == rule.action {
            format!(
                "connect rule {target} is listed twice under {} (first at line {line}); remove one",
                rule.action
            )
        } else {
            format!(
                "connect rule {target} is listed under both {} (line {line}) and {}; a socket name may appear under one action only",
                first.action, rule.action
            )
        })
    }

    /// Why host `rule` cannot join `kept`: the same pattern and ports
    /// again, or overlapping port ranges of the same pattern under
    /// different actions (as [`Self::connect_clash`] for networks).
    fn host_clash(&self, kept: &[(Span, HostRule)], rule: &HostRule) -> Option<String> {
        let target = rule.target();
        for (span, first) in kept
            .iter()
            .filter(|(_, first)| first.pattern == rule.pattern)
        {
            let line = self.pos(span).line;
            if first.ports == rule.ports {
                return Some(if first.action == rule.action {
                    format!(
                        "connect rule {target} is listed twice under {} (first at line {line}); remove one",
                        rule.action
                    )
                } else {
                    format!(
                        "connect rule {target} is listed under both {} (line {line}) and {}; a host name and port range may appear under one action only",
                        first.action, rule.action
                    )
                });
            }
            let both_specific = !first.ports.is_all() && !rule.ports.is_all();
            if both_specific && first.action != rule.action && first.ports.overlaps(rule.ports) {
                return Some(format!(
                    "connect rule {target} ({}) overlaps {} ({}, line {line}) for the same host name; split the port ranges so they do not overlap",
                    rule.action,
                    first.target(),
                    first.action
                ));
            }
        }
        None
    }

    /// `[policy.protect]`: `relax = ["signals", ...]`.
    /// `mode`: `enforce` (when not written) or `audit`.
    fn mode(&mut self, policy: &DeTable<'_>) -> Mode {
        let Some(value) = field(policy, "mode") else {
            return Mode::Enforce;
        };
        match self.string(value, "mode") {
            Some("audit") => Mode::Audit,
            Some("enforce") | None => Mode::Enforce,
            Some(other) => {
                self.error(
                    &value.span(),
                    format!(
                        "unknown mode {other:?} (expected \"enforce\", the default, or \"audit\" to record what the policy would deny or ask without enforcing it)"
                    ),
                );
                Mode::Enforce
            }
        }
    }

    fn protect(&mut self, policy: &DeTable<'_>) -> Protect {
        let mut protect = Protect::default();
        let Some(table) = self.section(policy, "protect", PROTECT_KEYS) else {
            return protect;
        };
        let Some(value) = field(table, "relax") else {
            return protect;
        };
        let Some(items) = self.string_list(value, "relax", "relax = [\"mount\"]") else {
            return protect;
        };
        for (text, span) in items {
            match text.parse::<ProtectPoint>() {
                Ok(point) if protect.relax.contains(&point) => self.error(
                    &span,
                    format!("protection \"{point}\" is relaxed twice in this policy; remove one"),
                ),
                Ok(point) => protect.relax.push(point),
                Err(e) => self.error(&span, e.to_string()),
            }
        }
        protect
    }

    fn approval(&mut self, policy: &DeTable<'_>) -> Approval {
        let mut approval = Approval {
            timeout: DEFAULT_TIMEOUT,
            on_timeout: Action::Deny,
            reviewers: Vec::new(),
            approvals_required: 1,
            grant_durations: vec![GrantDuration::Once],
            require_reason: false,
        };
        let Some(table) = self.section(policy, "approval", APPROVAL_KEYS) else {
            return approval;
        };

        if let Some(value) = field(table, "timeout")
            && let Some(timeout) = self.timeout(value)
        {
            approval.timeout = timeout;
        }

        if let Some(value) = field(table, "on_timeout") {
            match self.action(value, "on_timeout") {
                Some(Action::Ask) => self.error(
                    &value.span(),
                    "on_timeout cannot be \"ask\": the request has already waited for a reviewer; use \"allow\" or \"deny\"",
                ),
                Some(action) => approval.on_timeout = action,
                None => {}
            }
        }

        if let Some(value) = field(table, "reviewers")
            && let Some(items) = self.string_list(value, "reviewers", "reviewers = [\"sre\"]")
        {
            if items.is_empty() {
                self.error(
                        &value.span(),
                        "reviewers is empty, so nobody could decide; name reviewer groups, or remove the key to let any authenticated reviewer decide",
                    );
            }
            let mut seen: HashMap<&str, Span> = HashMap::new();
            for (group, span) in items {
                if group.trim().is_empty() {
                    self.error(&span, "empty reviewer group name");
                } else if let Some(first) = seen.get(group) {
                    let line = self.pos(first).line;
                    self.error(
                            &span,
                            format!(
                                "reviewer group \"{group}\" is listed twice (first at line {line}); remove one"
                            ),
                        );
                } else {
                    seen.insert(group, span);
                    approval.reviewers.push(group.to_owned());
                }
            }
        }

        if let Some(value) = field(table, "approvals_required")
            && let Some(count) = self.approvals_required(value)
        {
            approval.approvals_required = count;
        }

        if let Some(value) = field(table, "grant_durations")
            && let Some(durations) = self.grant_durations(value)
        {
            approval.grant_durations = durations;
        }

        if let Some(value) = field(table, "require_reason")
            && let Some(required) = self.flag(value, "require_reason")
        {
            approval.require_reason = required;
        }
        approval
    }

    fn flag(&mut self, value: &Value<'_>, key: &str) -> Option<bool> {
        if let DeValue::Boolean(flag) = value.get_ref() {
            return Some(*flag);
        }
        self.error(
            &value.span(),
            format!(
                "`{key}` must be true or false (without quotes), found {}",
                value.get_ref().type_str()
            ),
        );
        None
    }

    fn timeout(&mut self, value: &Value<'_>) -> Option<Duration> {
        let DeValue::String(text) = value.get_ref() else {
            self.error(
                &value.span(),
                format!(
                    "`timeout` must be a duration string such as \"5m\", found {}",
                    value.get_ref().type_str()
                ),
            );
            return None;
        };
        let message = match humantime::parse_duration(text) {
            Err(_) => {
                format!("invalid timeout \"{text}\" (expected a duration such as 30s, 5m or 1h)")
            }
            Ok(timeout) if timeout.is_zero() => {
                format!("timeout \"{text}\" is zero; give reviewers time to answer, e.g. \"5m\"")
            }
            Ok(timeout) if timeout > MAX_TIMEOUT => format!(
                "timeout \"{text}\" is longer than 24h; a paused workload should not wait more than a day (use at most \"24h\")"
            ),
            Ok(timeout) => return Some(timeout),
        };
        self.error(&value.span(), message);
        None
    }

    fn approvals_required(&mut self, value: &Value<'_>) -> Option<u32> {
        let DeValue::Integer(integer) = value.get_ref() else {
            self.error(
                &value.span(),
                format!(
                    "`approvals_required` must be a whole number such as 1, found {}",
                    value.get_ref().type_str()
                ),
            );
            return None;
        };
        let message = match i64::from_str_radix(integer.as_str(), integer.radix()) {
            Ok(count) if count < 1 => format!(
                "approvals_required is {count}; at least 1 reviewer must approve (remove the key for the default of 1)"
            ),
            Ok(count) => match u32::try_from(count) {
                Ok(count) => return Some(count),
                Err(_) => format!("approvals_required {count} is too large"),
            },
            Err(_) => format!("approvals_required {integer} is too large"),
        };
        self.error(&value.span(), message);
        None
    }

    fn grant_durations(&mut self, value: &Value<'_>) -> Option<Vec<GrantDuration>> {
        let items = self.string_list(
            value,
            "grant_durations",
            "grant_durations = [\"once\", \"1h\", \"session\", \"always\"]",
        )?;
        if items.is_empty() {
            self.error(
                &value.span(),
                "grant_durations is empty, so reviewers could grant nothing; use [\"once\"] at least",
            );
            return None;
        }
        let mut durations = Vec::new();
        let mut seen: HashMap<GrantDuration, Span> = HashMap::new();
        for (text, span) in items {
            match text.parse::<GrantDuration>() {
                Ok(duration) => {
                    if let Some(first) = seen.get(&duration) {
                        let line = self.pos(first).line;
                        self.error(
                            &span,
                            format!(
                                "grant duration \"{text}\" is listed twice (first at line {line}); remove one"
                            ),
                        );
                    } else {
                        seen.insert(duration, span);
                        durations.push(duration);
                    }
                }
                Err(e) => self.error(&span, e.to_string()),
            }
        }
        Some(durations)
    }

    /// A sub-table of a policy such as `[policy.exec]`, with its keys checked.
    fn section<'t, 'i>(
        &mut self,
        policy: &'t DeTable<'i>,
        key: &str,
        allowed: &[&str],
    ) -> Option<&'t DeTable<'i>> {
        let value = field(policy, key)?;
        if let DeValue::Table(table) = value.get_ref() {
            self.check_keys(table, &format!("[policy.{key}]"), allowed);
            Some(table)
        } else {
            self.error(
                &value.span(),
                format!(
                    "`{key}` must be a table ([policy.{key}]), found {}",
                    value.get_ref().type_str()
                ),
            );
            None
        }
    }

    pub(crate) fn check_keys(&mut self, table: &DeTable<'_>, section: &str, allowed: &[&str]) {
        for (key, _) in sorted(table) {
            if !allowed.contains(&key.get_ref().as_ref()) {
                self.unknown_key(key, section, allowed);
            }
        }
    }

    pub(crate) fn unknown_key(&mut self, key: &Key<'_>, section: &str, allowed: &[&str]) {
        let name = key.get_ref();
        let hint = closest(name, allowed)
            .map(|near| format!("; did you mean \"{near}\"?"))
            .unwrap_or_default();
        self.error(
            &key.span(),
            format!(
                "unknown key \"{name}\" in {section} (expected {}){hint}",
                one_of(allowed)
            ),
        );
    }

    pub(crate) fn string<'v>(&mut self, value: &'v Value<'_>, key: &str) -> Option<&'v str> {
        if let DeValue::String(text) = value.get_ref() {
            Some(text)
        } else {
            self.error(
                &value.span(),
                format!(
                    "`{key}` must be a string, found {}",
                    value.get_ref().type_str()
                ),
            );
            None
        }
    }

    /// An array of strings; wrong items are reported and left out.
    /// `exec.bound_env`: environment variable names, validated.
    fn bound_env(&mut self, value: &Value<'_>) -> Vec<String> {
        let example = "bound_env = [\"PYTHONPATH\", \"NODE_OPTIONS\"]";
        let Some(items) = self.string_list(value, "bound_env", example) else {
            return Vec::new();
        };
        let mut names: Vec<String> = Vec::new();
        for (name, span) in items {
            let valid = name.len() <= BOUND_ENV_NAME_MAX
                && name
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                self.error(
                    &span,
                    format!(
                        "bound_env name {name:?} is not an environment variable name of at most \
                         {BOUND_ENV_NAME_MAX} bytes (letters, digits and `_`, not starting with a \
                         digit; no `=`), e.g. {example}"
                    ),
                );
            } else if name.starts_with("LD_") {
                self.error(
                    &span,
                    format!(
                        "bound_env name {name:?} is already bound: every `LD_*` variable is; \
                         remove it"
                    ),
                );
            } else if names.iter().any(|n| n == name) {
                self.error(&span, format!("bound_env lists {name:?} twice; remove one"));
            } else if names.len() == BOUND_ENV_MAX {
                self.error(
                    &span,
                    format!(
                        "bound_env lists more than {BOUND_ENV_MAX} names (the kernel matches at \
                         most {BOUND_ENV_MAX}); keep those a loader or interpreter reads code from"
                    ),
                );
            } else {
                names.push(name.to_owned());
            }
        }
        names
    }

    pub(crate) fn string_list<'v>(
        &mut self,
        value: &'v Value<'_>,
        key: &str,
        example: &str,
    ) -> Option<Vec<(&'v str, Span)>> {
        let DeValue::Array(items) = value.get_ref() else {
            self.error(
                &value.span(),
                format!(
                    "`{key}` must be an array of strings, e.g. {example}, found {}",
                    value.get_ref().type_str()
                ),
            );
            return None;
        };
        let mut strings = Vec::new();
        for item in items {
            if let DeValue::String(text) = item.get_ref() {
                strings.push((text.as_ref(), item.span()));
            } else {
                self.error(
                    &item.span(),
                    format!(
                        "`{key}` must contain strings only, found {}",
                        item.get_ref().type_str()
                    ),
                );
            }
        }
        Some(strings)
    }

    pub(crate) fn action(&mut self, value: &Value<'_>, key: &str) -> Option<Action> {
        let text = self.string(value, key)?;
        match text.parse() {
            Ok(action) => Some(action),
            Err(e) => {
                self.error(&value.span(), format!("{e}"));
                None
            }
        }
    }
}

pub(crate) fn field<'t, 'i>(table: &'t DeTable<'i>, key: &str) -> Option<&'t Value<'i>> {
    table
        .iter()
        .find(|(name, _)| name.get_ref() == key)
        .map(|(_, value)| value)
}

/// A table's entries in the order they were written.
pub(crate) fn sorted<'t, 'i>(table: &'t DeTable<'i>) -> Vec<(&'t Key<'i>, &'t Value<'i>)> {
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    entries
}

/// "a, b or c".
fn one_of(words: &[&str]) -> String {
    match words {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// The allowed key closest to a misspelt one, if it is close enough.
fn closest<'w>(word: &str, candidates: &[&'w str]) -> Option<&'w str> {
    candidates
        .iter()
        .map(|candidate| (edit_distance(word, candidate), *candidate))
        .filter(|(distance, candidate)| *distance <= 2.max(candidate.len() / 4))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, path::PathBuf, time::Duration};

    use crate::{
        Action, ArgPattern, DEFAULT_INTERPRETERS, GrantDuration, PolicySet, PortRange,
        ProtectPoint, parse_str,
    };

    const FILE: &str = "policies/agents.toml";

    fn load(text: &str) -> PolicySet {
        parse_str(FILE, text).unwrap_or_else(|e| panic!("expected a valid policy, got:\n{e}"))
    }

    /// Every diagnostic, as `file:line:col: message`.
    fn errors(text: &str) -> Vec<String> {
        match parse_str(FILE, text) {
            Ok(set) => panic!("expected errors, got {set:#?}"),
            Err(e) => e.diagnostics().iter().map(ToString::to_string).collect(),
        }
    }

    /// The single diagnostic of `text`.
    fn error(text: &str) -> String {
        let mut all = errors(text);
        assert_eq!(all.len(), 1, "expected one error, got {all:#?}");
        all.remove(0)
    }

    /// A valid policy head (3 lines), so the lines under test start at 4.
    const HEAD: &str = "[[policy]]\nname = \"a\"\ncgroups = [\"/sys/fs/cgroup/a\"]\n";

    fn with_head(rest: &str) -> String {
        format!("{HEAD}{rest}")
    }

    #[test]
    fn minimal_policy_takes_defaults() {
        let set = load(HEAD);
        let policy = &set.policies[0];
        assert_eq!(policy.name, "a");
        assert_eq!(policy.cgroups[0].relative(), "a");
        assert_eq!(policy.exec.default, Action::Allow);
        assert!(policy.exec.rules.is_empty());
        assert_eq!(policy.exec.on_truncated, Action::Deny, "fail closed");
        assert_eq!(policy.connect.default, Action::Allow);
        assert_eq!(policy.connect.unix, Action::Allow);
        assert_eq!(policy.approval.timeout, Duration::from_mins(5));
        assert_eq!(policy.approval.on_timeout, Action::Deny);
        assert!(policy.approval.reviewers.is_empty());
        assert_eq!(policy.approval.approvals_required, 1);
        assert_eq!(policy.approval.grant_durations, [GrantDuration::Once]);
    }

    #[test]
    fn unknown_action() {
        assert_eq!(
            error(&with_head("[policy.exec]\ndefault = \"alow\"\n")),
            "policies/agents.toml:5:11: unknown action \"alow\" (expected allow, deny or ask)"
        );
        assert_eq!(
            error(&with_head(
                "[policy.connect]\nallow = [\"10.0.0.0/8\"]\n  unix = \"alow\"\n"
            )),
            "policies/agents.toml:6:10: unknown action \"alow\" (expected allow, deny or ask)"
        );
        assert_eq!(
            error(&with_head("[policy.exec]\ndefault = true\n")),
            "policies/agents.toml:5:11: `default` must be a string, found boolean"
        );
    }

    #[test]
    fn unknown_keys_are_all_reported() {
        let text = "\
            version = 2\n\
            [[policy]]\n\
            name = \"a\"\n\
            cgroup = [\"/sys/fs/cgroup/a\"]\n\
            [policy.exec]\n\
            defualt = \"ask\"\n\
            [policy.connect]\n\
            unix = \"deny\"\n\
            allowed = []\n\
            [policy.approval]\n\
            timeout = \"1m\"\n\
            reviewer = [\"sre\"]\n\
            [policy.audit]\n";
        assert_eq!(
            errors(text),
            [
                "policies/agents.toml:1:1: unknown key \"version\" in this file (expected policy)",
                "policies/agents.toml:2:1: policy has no cgroups; add cgroups = [\"/sys/fs/cgroup/...\"] to say which workloads it governs",
                "policies/agents.toml:4:1: unknown key \"cgroup\" in [[policy]] (expected name, cgroups, mode, exec, connect, approval or protect); did you mean \"cgroups\"?",
                "policies/agents.toml:6:1: unknown key \"defualt\" in [policy.exec] (expected default, allow, deny, ask, on_truncated, bound_env, unlisted_mappings, fileless, command, interpreters, multicall or integrity); did you mean \"default\"?",
                "policies/agents.toml:9:1: unknown key \"allowed\" in [policy.connect] (expected default, allow, deny, ask, unix, raw_sockets or other_families); did you mean \"allow\"?",
                "policies/agents.toml:12:1: unknown key \"reviewer\" in [policy.approval] (expected timeout, on_timeout, reviewers, approvals_required, grant_durations or require_reason); did you mean \"reviewers\"?",
                "policies/agents.toml:13:9: unknown key \"audit\" in [[policy]] (expected name, cgroups, mode, exec, connect, approval or protect)",
            ]
        );
    }

    #[test]
    fn policy_names() {
        assert_eq!(
            error("[[policy]]\nname = \"\"\ncgroups = [\"/sys/fs/cgroup/a\"]\n"),
            "policies/agents.toml:2:8: policy name is empty; give the policy a name such as name = \"ai-agents\""
        );
        assert_eq!(
            error("[[policy]]\ncgroups = [\"/sys/fs/cgroup/a\"]\n"),
            "policies/agents.toml:1:1: policy has no name; add name = \"...\" under [[policy]]"
        );
        assert_eq!(
            error("[[policy]]\nname = 7\ncgroups = [\"/sys/fs/cgroup/a\"]\n"),
            "policies/agents.toml:2:8: `name` must be a string, found integer"
        );
        let text = "\
            [[policy]]\n\
            name = \"a\"\n\
            cgroups = [\"/sys/fs/cgroup/a\"]\n\
            [[policy]]\n\
            name = \"a\"\n\
            cgroups = [\"/sys/fs/cgroup/b\"]\n";
        assert_eq!(
            error(text),
            "policies/agents.toml:5:8: duplicate policy name \"a\" (first defined at policies/agents.toml:2:8); policy names must be unique across all policy files"
        );
    }

    #[test]
    fn cgroup_patterns() {
        let text = "\
            [[policy]]\n\
            name = \"a\"\n\
            cgroups = [\"agents/*\", \"/agents/*\", \"/sys/fs/cgroup/ok\", \"/sys/fs/cgroup/ok/\"]\n";
        assert_eq!(
            errors(text),
            [
                "policies/agents.toml:3:12: cgroup pattern \"agents/*\" is relative; write an absolute path under /sys/fs/cgroup, e.g. \"/sys/fs/cgroup/agents/*\"",
                "policies/agents.toml:3:24: cgroup pattern \"/agents/*\" is not under /sys/fs/cgroup; cgroup v2 paths start with /sys/fs/cgroup/ (did you mean \"/sys/fs/cgroup/agents/*\"?)",
                "policies/agents.toml:3:58: cgroup pattern \"/sys/fs/cgroup/ok/\" is listed twice in this policy (first at line 3); remove one",
            ]
        );
        assert_eq!(
            error("[[policy]]\nname = \"a\"\ncgroups = []\n"),
            "policies/agents.toml:3:11: cgroups is empty, so the policy governs nothing; list at least one cgroup, e.g. \"/sys/fs/cgroup/agents/*\""
        );
        assert_eq!(
            error("[[policy]]\nname = \"a\"\ncgroups = \"/sys/fs/cgroup/a\"\n"),
            "policies/agents.toml:3:11: `cgroups` must be an array of strings, e.g. cgroups = [\"/sys/fs/cgroup/agents/*\"], found string"
        );
    }

    #[test]
    fn identical_cgroup_patterns_in_two_policies() {
        let text = "\
            [[policy]]\n\
            name = \"first\"\n\
            cgroups = [\"/sys/fs/cgroup/agents/*\"]\n\
            [[policy]]\n\
            name = \"second\"\n\
            cgroups = [\"/sys/fs/cgroup/other\", \"/sys/fs/cgroup//agents/*\"]\n";
        assert_eq!(
            error(text),
            "policies/agents.toml:6:36: cgroup pattern \"/sys/fs/cgroup//agents/*\" is already used by policy \"first\" (policies/agents.toml:3:12); a cgroup can be governed by one policy only, so keep it in one of them"
        );
        // Overlapping but different globs are allowed: load order decides.
        let text = "\
            [[policy]]\n\
            name = \"first\"\n\
            cgroups = [\"/sys/fs/cgroup/agents/*\"]\n\
            [[policy]]\n\
            name = \"second\"\n\
            cgroups = [\"/sys/fs/cgroup/agents/job-*\"]\n";
        let set = load(text);
        assert_eq!(
            set.policy_for_cgroup(std::path::Path::new("/agents/job-1")),
            Some(0)
        );
    }

    #[test]
    fn command_rules_interpreters_and_multicall_parse() {
        let set = load(&with_head(
            "[policy.exec]\n\
             multicall = [\"/bin/busybox\"]\n\
             interpreters = [\"/bin/sh\", \"/usr/bin/python3.11\"]\n\
             [[policy.exec.command]]\n\
             argv = [\"/usr/bin/kubectl\", \"delete\", \"**\"]\n\
             action = \"ask\"\n\
             [[policy.exec.command]]\n\
             argv = [\"/usr/bin/git\", \"push\", \"**\", \"--force*\"]\n\
             action = \"deny\"\n",
        ));
        let exec = &set.policies[0].exec;
        assert_eq!(exec.multicall, vec![PathBuf::from("/bin/busybox")]);
        assert_eq!(
            exec.interpreters,
            vec![
                PathBuf::from("/bin/sh"),
                PathBuf::from("/usr/bin/python3.11")
            ]
        );
        assert_eq!(exec.commands.len(), 2);
        assert_eq!(
            exec.commands[1].to_string(),
            "deny [\"/usr/bin/git\", \"push\", \"**\", \"--force*\"]"
        );
        assert_eq!(
            exec.commands[0].args,
            vec![ArgPattern::Literal("delete".into()), ArgPattern::Rest]
        );
        // Unwritten: the default interpreters, no multi-call binary.
        let exec = &load(HEAD).policies[0].exec;
        assert_eq!(exec.interpreters.len(), DEFAULT_INTERPRETERS.len());
        assert!(exec.multicall.is_empty() && exec.commands.is_empty());
    }

    #[test]
    fn bad_command_rules_are_located() {
        assert_eq!(
            errors(&with_head(
                "[policy.exec]\n\
                 interpreters = [\"/usr/bin/tclsh\", \"sh\"]\n\
                 multicall = [\"/bin/busybox\", \"/bin/busybox\"]\n\
                 [[policy.exec.command]]\n\
                 argv = [\"kubectl\", \"delete**\"]\n\
                 action = \"maybe\"\n\
                 [[policy.exec.command]]\n\
                 argv = [\"/usr/bin/git\", \"push\"]\n\
                 [[policy.exec.command]]\n\
                 argv = []\n\
                 action = \"ask\"\n\
                 arg = 1\n\
                 [[policy.exec.command]]\n\
                 argv = [\"/usr/bin/git\", \"push\"]\n\
                 action = \"ask\"\n\
                 [[policy.exec.command]]\n\
                 argv = [\"/usr/bin/git\", \"push\"]\n\
                 action = \"allow\"\n"
            )),
            [
                "policies/agents.toml:5:17: interpreter \"/usr/bin/tclsh\": gatekeep cannot tell how \"tclsh\" reads its options; interpreters are known by file name (sh, dash, ash, bash, ksh, mksh, zsh, hush, python*, perl*, node, nodejs, ruby*)",
                "policies/agents.toml:5:35: exec path \"sh\" is not absolute (exec rules match absolute paths; relative paths, `..` and symlinks are resolved by the kernel-side identity match)",
                "policies/agents.toml:6:30: multicall lists \"/bin/busybox\" twice; remove one",
                "policies/agents.toml:8:9: exec path \"kubectl\" is not absolute (exec rules match absolute paths; relative paths, `..` and symlinks are resolved by the kernel-side identity match)",
                "policies/agents.toml:8:20: argument pattern \"delete**\" contains `**` inside an argument; `**` stands for any number of whole arguments and must be an element of its own (use `*` for any characters within one argument)",
                "policies/agents.toml:9:10: unknown action \"maybe\" (expected allow, deny or ask)",
                "policies/agents.toml:10:1: [[policy.exec.command]] has no `action`; add action = \"allow\", \"deny\" or \"ask\"",
                "policies/agents.toml:13:8: empty argv; its first element is the executable's absolute path, e.g. \"/usr/bin/kubectl\"",
                "policies/agents.toml:15:1: unknown key \"arg\" in [[policy.exec.command]] (expected argv or action); did you mean \"argv\"?",
                "policies/agents.toml:20:8: this argv is already a command rule at line 17; two rules with the same patterns cannot both win: remove one",
            ]
        );
    }

    #[test]
    fn exec_paths_must_be_absolute() {
        let text = with_head(
            "[policy.exec]\nallow = [\"bin/ls\", \"/usr/bin/../bin/ls\", \"\", \"/usr/bin/*\", \"/usr/bin/\"]\n",
        );
        assert_eq!(
            errors(&text),
            [
                "policies/agents.toml:5:10: exec path \"bin/ls\" is not absolute (exec rules match absolute paths; relative paths, `..` and symlinks are resolved by the kernel-side identity match)",
                "policies/agents.toml:5:20: exec path \"/usr/bin/../bin/ls\" contains `.` or `..`; write the plain absolute path (exec rules match absolute paths; relative paths, `..` and symlinks are resolved by the kernel-side identity match)",
                "policies/agents.toml:5:42: empty exec path; write the absolute path of an executable, e.g. \"/usr/bin/git\"",
                "policies/agents.toml:5:46: exec path \"/usr/bin/*\" contains `*`; exec rules name one executable each (they match by file identity), so list each executable",
                "policies/agents.toml:5:60: exec path \"/usr/bin/\" names a directory; name an executable file",
            ]
        );
        // `/usr/bin/[` is a real program; brackets are not globs here.
        let set = load(&with_head("[policy.exec]\ndeny = [\"/usr/bin/[\"]\n"));
        assert_eq!(
            set.policies[0].exec.rules[0].path,
            std::path::Path::new("/usr/bin/[")
        );
    }

    #[test]
    fn exec_path_under_two_actions_or_twice() {
        let text = with_head(
            "[policy.exec]\n\
             allow = [\"/usr/bin/ls\", \"/usr/bin/curl\"]\n\
             ask = [\"/usr/bin/curl\"]\n\
             deny = [\"/usr/bin/sudo\", \"/usr/bin//sudo\"]\n",
        );
        assert_eq!(
            errors(&text),
            [
                "policies/agents.toml:6:8: exec path \"/usr/bin/curl\" is listed under both allow (line 5) and ask; a path may appear under one action only",
                "policies/agents.toml:7:26: exec path \"/usr/bin//sudo\" is listed twice under deny (first at line 7); remove one",
            ]
        );
    }

    #[test]
    fn exec_rules_keep_file_order_and_actions() {
        let set = load(&with_head(
            "[policy.exec]\ndefault = \"deny\"\nask = [\"/usr/bin/curl\"]\nallow = [\"/usr/bin/ls\"]\n",
        ));
        let exec = &set.policies[0].exec;
        assert_eq!(exec.default, Action::Deny);
        let rules: Vec<_> = exec
            .rules
            .iter()
            .map(|r| (r.path.to_str(), r.action))
            .collect();
        assert_eq!(
            rules,
            [
                (Some("/usr/bin/curl"), Action::Ask),
                (Some("/usr/bin/ls"), Action::Allow)
            ]
        );
    }

    #[test]
    fn connect_targets_with_positions() {
        let text = with_head(
            "[policy.connect]\n\
             allow = [\"10.1.2.3/16\", \"10.0.0.0/8:0\"]\n\
             deny = [\"10.0.0.0/8:9000-8000\", \"10.0.0.0/8:65536\", \"[2001:db8::1]/32:443\"]\n",
        );
        assert_eq!(
            errors(&text),
            [
                "policies/agents.toml:5:10: 10.1.2.3/16 has host bits set; did you mean 10.1.0.0/16?",
                "policies/agents.toml:5:25: port 0 in \"10.0.0.0/8:0\" is not a destination port (ports are 1-65535; leave the port out to match all)",
                "policies/agents.toml:6:9: port range 9000-8000 in \"10.0.0.0/8:9000-8000\" is reversed; did you mean 8000-9000?",
                "policies/agents.toml:6:33: port 65536 in \"10.0.0.0/8:65536\" is out of range (ports are 1-65535)",
                "policies/agents.toml:6:53: [2001:db8::1]/32:443 has host bits set; did you mean [2001:db8::]/32:443?",
            ]
        );
    }

    #[test]
    fn unix_rules_name_socket_paths_and_abstract_names_beside_the_unix_fallback() {
        let set = load(&with_head(
            "[policy.connect]\n\
             unix = \"allow\"\n\
             allow = [\"10.0.0.0/8\", \"unix:/run/ok.sock\"]\n\
             deny = [\"unix:/run/docker.sock\"]\n\
             ask = [\"unix:@gk-bus\"]\n",
        ));
        let connect = &set.policies[0].connect;
        assert_eq!(connect.rules.len(), 1, "the IP rule stays an IP rule");
        let rules: Vec<String> = connect.unix_rules.iter().map(ToString::to_string).collect();
        assert_eq!(
            rules,
            [
                "allow unix:/run/ok.sock",
                "deny unix:/run/docker.sock",
                "ask unix:@gk-bus"
            ]
        );
        let decide = |name: &[u8]| connect.decide_unix(name);
        assert_eq!(
            decide(b"/run/docker.sock"),
            (
                Action::Deny,
                "connect deny unix:/run/docker.sock".to_owned()
            )
        );
        // Bytes after a path's NUL are not part of the name the kernel uses.
        assert_eq!(decide(b"/run/docker.sock\0junk").0, Action::Deny);
        assert_eq!(decide(b"\0gk-bus").0, Action::Ask);
        assert_eq!(
            decide(b"\0gk-bus\0").0,
            Action::Allow,
            "another abstract name"
        );
        assert_eq!(
            decide(b"/run/other.sock"),
            (Action::Allow, "connect unix allow".to_owned())
        );
    }

    #[test]
    fn invalid_unix_rules_name_the_place_and_the_fix() {
        let all = errors(&with_head(
            "[policy.connect]\n\
             deny = [\"unix:run/docker.sock\", \"unix:/run/docker.sock\"]\n\
             ask = [\"unix:@\", \"unix:/run/docker.sock\"]\n\
             allow = [\"unix:/run/../x.sock\"]\n",
        ));
        assert_eq!(
            all,
            [
                "policies/agents.toml:5:9: unix rule path \"run/docker.sock\" is not absolute; the kernel resolves a relative name from the caller's working directory, so write the absolute path (e.g. \"unix:/run/docker.sock\", or \"unix:@name\" for an abstract socket)",
                "policies/agents.toml:6:8: unix rule \"unix:@\" names no abstract socket; write its name after the @, e.g. \"unix:/run/docker.sock\", or \"unix:@name\" for an abstract socket",
                "policies/agents.toml:6:18: connect rule unix:/run/docker.sock is listed under both deny (line 5) and ask; a socket name may appear under one action only",
                "policies/agents.toml:7:10: unix rule path \"/run/../x.sock\" is not in plain form (`.`, `..`, `//` or a final `/`); a rule matches the path a caller passes byte for byte, so write the plain absolute path",
            ]
        );
    }

    #[test]
    fn unix_and_other_families_follow_the_connect_default_and_raw_sockets_are_denied() {
        let set = load(&with_head("[policy.connect]\ndefault = \"deny\"\n"));
        let connect = &set.policies[0].connect;
        assert_eq!(connect.unix, Action::Deny, "unix follows default");
        assert_eq!(
            connect.other_families,
            Action::Deny,
            "others follow default"
        );
        assert_eq!(connect.raw_sockets, Action::Deny);

        let set = load(&with_head("[policy.connect]\ndefault = \"ask\"\n"));
        let connect = &set.policies[0].connect;
        assert_eq!(
            (connect.unix, connect.other_families),
            (Action::Ask, Action::Ask)
        );

        // Without a connect section: everything allowed but raw sockets.
        let connect = &load(HEAD).policies[0].connect;
        assert_eq!(
            (connect.unix, connect.other_families, connect.raw_sockets),
            (Action::Allow, Action::Allow, Action::Deny)
        );

        let set = load(&with_head(
            "[policy.connect]\n\
             default = \"deny\"\n\
             unix = \"allow\"\n\
             other_families = \"ask\"\n\
             raw_sockets = \"allow\"\n",
        ));
        let connect = &set.policies[0].connect;
        assert_eq!(connect.default, Action::Deny);
        assert_eq!(connect.unix, Action::Allow);
        assert_eq!(connect.other_families, Action::Ask);
        assert_eq!(connect.raw_sockets, Action::Allow);
    }

    #[test]
    fn bound_env_lists_valid_distinct_names_beyond_ld() {
        let set = load(&with_head("[policy.exec]\ndefault = \"ask\"\n"));
        assert!(
            set.policies[0].exec.bound_env.is_empty(),
            "none unless written"
        );
        let set = load(&with_head(
            "[policy.exec]\nbound_env = [\"PYTHONPATH\", \"NODE_OPTIONS\", \"_X1\"]\n",
        ));
        assert_eq!(
            set.policies[0].exec.bound_env,
            ["PYTHONPATH", "NODE_OPTIONS", "_X1"]
        );
        let long = "A".repeat(32);
        assert_eq!(
            errors(&with_head(&format!(
                "[policy.exec]\nbound_env = [\"A=B\", \"1A\", \"\", \"{long}\", \"LD_PRELOAD\", \"X\", \"X\"]\n"
            ))),
            [
                "policies/agents.toml:5:14: bound_env name \"A=B\" is not an environment variable name of at most 31 bytes (letters, digits and `_`, not starting with a digit; no `=`), e.g. bound_env = [\"PYTHONPATH\", \"NODE_OPTIONS\"]",
                "policies/agents.toml:5:21: bound_env name \"1A\" is not an environment variable name of at most 31 bytes (letters, digits and `_`, not starting with a digit; no `=`), e.g. bound_env = [\"PYTHONPATH\", \"NODE_OPTIONS\"]",
                "policies/agents.toml:5:27: bound_env name \"\" is not an environment variable name of at most 31 bytes (letters, digits and `_`, not starting with a digit; no `=`), e.g. bound_env = [\"PYTHONPATH\", \"NODE_OPTIONS\"]",
                &format!(
                    "policies/agents.toml:5:31: bound_env name \"{long}\" is not an environment variable name of at most 31 bytes (letters, digits and `_`, not starting with a digit; no `=`), e.g. bound_env = [\"PYTHONPATH\", \"NODE_OPTIONS\"]"
                ),
                "policies/agents.toml:5:67: bound_env name \"LD_PRELOAD\" is already bound: every `LD_*` variable is; remove it",
                "policies/agents.toml:5:86: bound_env lists \"X\" twice; remove one",
            ]
        );
        let nine: Vec<String> = (0..9).map(|i| format!("\"V{i}\"")).collect();
        assert_eq!(
            error(&with_head(&format!(
                "[policy.exec]\nbound_env = [{}]\n",
                nine.join(", ")
            ))),
            "policies/agents.toml:5:62: bound_env lists more than 8 names (the kernel matches at most 8); keep those a loader or interpreter reads code from"
        );
        assert_eq!(
            error(&with_head("[policy.exec]\nbound_env = \"PYTHONPATH\"\n")),
            "policies/agents.toml:5:13: `bound_env` must be an array of strings, e.g. bound_env = [\"PYTHONPATH\", \"NODE_OPTIONS\"], found string"
        );
    }

    #[test]
    fn unlisted_mappings_and_fileless_have_secure_defaults_and_name_their_values() {
        // Unwritten: libraries map freely, fileless executables are denied.
        let exec = &load(HEAD).policies[0].exec;
        assert_eq!(
            exec.unlisted_mappings,
            crate::model::UnlistedMappings::Allow
        );
        assert_eq!(exec.fileless, Action::Deny);
        let set = load(&with_head(
            "[policy.exec]\ndefault = \"deny\"\nunlisted_mappings = \"default\"\nfileless = \"ask\"\n",
        ));
        let exec = &set.policies[0].exec;
        assert_eq!(
            exec.unlisted_mappings,
            crate::model::UnlistedMappings::Default
        );
        assert_eq!(exec.fileless, Action::Ask);
        let set = load(&with_head(
            "[policy.exec]\nunlisted_mappings = \"allow\"\nfileless = \"allow\"\n",
        ));
        let exec = &set.policies[0].exec;
        assert_eq!(
            exec.unlisted_mappings,
            crate::model::UnlistedMappings::Allow
        );
        assert_eq!(exec.fileless, Action::Allow);
        assert_eq!(
            crate::model::UnlistedMappings::Default.to_string(),
            "default"
        );

        assert_eq!(
            error(&with_head("[policy.exec]\nunlisted_mappings = \"deny\"\n")),
            "policies/agents.toml:5:21: unknown unlisted_mappings value \"deny\" (expected \"allow\", to let programs map any library no rule names, or \"default\", to give such mappings the exec default)"
        );
        assert_eq!(
            error(&with_head("[policy.exec]\nfileless = \"maybe\"\n")),
            "policies/agents.toml:5:12: unknown action \"maybe\" (expected allow, deny or ask)"
        );
        assert_eq!(
            error(&with_head("[policy.exec]\nfileless = 1\n")),
            "policies/agents.toml:5:12: `fileless` must be a string, found integer"
        );
    }

    #[test]
    fn integrity_is_content_unless_sha256_is_written() {
        let set = load(&with_head("[policy.exec]\ndefault = \"deny\"\n"));
        assert_eq!(set.policies[0].exec.integrity, crate::Integrity::Content);
        let set = load(&with_head(
            "[policy.exec]\ndefault = \"deny\"\nintegrity = \"sha256\"\n",
        ));
        assert_eq!(set.policies[0].exec.integrity, crate::Integrity::Sha256);
        assert_eq!(crate::Integrity::Sha256.to_string(), "sha256");
        assert_eq!(
            error(&with_head("[policy.exec]\nintegrity = \"md5\"\n")),
            "policies/agents.toml:5:13: unknown integrity value \"md5\" (expected \"content\", the default: an allowed file rewritten after the policy is loaded is no longer allowed until a reload, or \"sha256\": it stays allowed while its SHA-256 is the one it had at load)"
        );
        assert_eq!(
            error(&with_head("[policy.exec]\nintegrity = true\n")),
            "policies/agents.toml:5:13: `integrity` must be a string, found boolean"
        );
    }

    #[test]
    fn on_truncated_is_deny_or_ask_and_deny_unless_written() {
        let set = load(&with_head("[policy.exec]\ndefault = \"ask\"\n"));
        assert_eq!(set.policies[0].exec.on_truncated, Action::Deny);
        let set = load(&with_head(
            "[policy.exec]\ndefault = \"ask\"\non_truncated = \"ask\"\n",
        ));
        assert_eq!(set.policies[0].exec.on_truncated, Action::Ask);
        let set = load(&with_head("[policy.exec]\non_truncated = \"deny\"\n"));
        assert_eq!(set.policies[0].exec.on_truncated, Action::Deny);

        assert_eq!(
            error(&with_head("[policy.exec]\non_truncated = \"allow\"\n")),
            "policies/agents.toml:5:16: on_truncated cannot be \"allow\": the kernel could not bind the whole argv, so allowing it would allow every exec that differs after the truncation; use \"deny\" (the default) or \"ask\""
        );
        assert_eq!(
            error(&with_head("[policy.exec]\non_truncated = \"prompt\"\n")),
            "policies/agents.toml:5:16: unknown on_truncated value \"prompt\" (expected \"deny\" or \"ask\")"
        );
        assert_eq!(
            error(&with_head("[policy.exec]\non_truncated = true\n")),
            "policies/agents.toml:5:16: `on_truncated` must be a string, found boolean"
        );
        assert_eq!(
            error(&with_head("[policy.connect]\non_truncated = \"ask\"\n")),
            "policies/agents.toml:5:1: unknown key \"on_truncated\" in [policy.connect] (expected default, allow, deny, ask, unix, raw_sockets or other_families)"
        );
    }

    #[test]
    fn raw_sockets_and_other_families_are_validated() {
        assert_eq!(
            error(&with_head("[policy.connect]\nraw_sockets = \"ask\"\n")),
            "policies/agents.toml:5:15: raw_sockets cannot be \"ask\": a raw or packet socket is refused or allowed when it is created, before it has a destination to show a reviewer; use \"allow\" or \"deny\""
        );
        assert_eq!(
            error(&with_head("[policy.connect]\nraw_sockets = \"yes\"\n")),
            "policies/agents.toml:5:15: unknown action \"yes\" (expected allow, deny or ask)"
        );
        assert_eq!(
            error(&with_head("[policy.connect]\nother_families = 1\n")),
            "policies/agents.toml:5:18: `other_families` must be a string, found integer"
        );
        assert_eq!(
            error(&with_head("[policy.connect]\nraw_socket = \"allow\"\n")),
            "policies/agents.toml:5:1: unknown key \"raw_socket\" in [policy.connect] (expected default, allow, deny, ask, unix, raw_sockets or other_families); did you mean \"raw_sockets\"?"
        );
    }

    #[test]
    fn connect_rule_forms() {
        let set = load(&with_head(
            "[policy.connect]\n\
             default = \"deny\"\n\
             unix = \"ask\"\n\
             allow = [\"127.0.0.0/8\", \"10.1.0.0/16:443\", \"[::1]/128\", \"10.2.0.0/16:8000-8999\", \"[2001:db8::]/32:443\", \"192.0.2.7\", \"[2001:db8::7]\"]\n\
             ask = [\"10.1.0.0/16:22\"]\n",
        ));
        let connect = &set.policies[0].connect;
        assert_eq!(connect.default, Action::Deny);
        assert_eq!(connect.unix, Action::Ask);
        let rules: Vec<_> = connect
            .rules
            .iter()
            .map(|r| (r.net.to_string(), r.ports, r.action))
            .collect();
        assert_eq!(
            rules,
            [
                ("127.0.0.0/8".to_owned(), PortRange::ALL, Action::Allow),
                ("10.1.0.0/16".to_owned(), PortRange(443, 443), Action::Allow),
                ("::1/128".to_owned(), PortRange::ALL, Action::Allow),
                (
                    "10.2.0.0/16".to_owned(),
                    PortRange(8000, 8999),
                    Action::Allow
                ),
                (
                    "2001:db8::/32".to_owned(),
                    PortRange(443, 443),
                    Action::Allow
                ),
                ("192.0.2.7/32".to_owned(), PortRange::ALL, Action::Allow),
                ("2001:db8::7/128".to_owned(), PortRange::ALL, Action::Allow),
                ("10.1.0.0/16".to_owned(), PortRange(22, 22), Action::Ask),
            ]
        );
        let ip = |s: &str| s.parse::<IpAddr>().expect(s);
        assert_eq!(connect.action_for(ip("10.2.3.4"), 8500), Action::Allow);
        assert_eq!(connect.action_for(ip("10.2.3.4"), 9000), Action::Deny);
        assert_eq!(connect.action_for(ip("2001:db8:1::1"), 443), Action::Allow);
        assert_eq!(connect.action_for(ip("10.1.0.1"), 22), Action::Ask);
    }

    #[test]
    fn connect_conflicts() {
        let text = with_head(
            "[policy.connect]\n\
             allow = [\"10.1.0.0/16:443\", \"10.0.0.0/8\", \"10.5.0.0/16:80-90\"]\n\
             deny = [\"10.1.0.0/16:443\", \"10.1.0.0/16\", \"10.5.0.0/16:85\", \"10.5.0.0/16:91\"]\n\
             ask = [\"10.0.0.0/8\", \"127.0.0.1/32\", \"127.0.0.1\"]\n",
        );
        assert_eq!(
            errors(&text),
            [
                "policies/agents.toml:6:9: connect rule 10.1.0.0/16:443 is listed under both allow (line 5) and deny; a network and port range may appear under one action only",
                "policies/agents.toml:6:43: connect rule 10.5.0.0/16:85 (deny) overlaps 10.5.0.0/16:80-90 (allow, line 5) at the same prefix; split the port ranges so they do not overlap",
                "policies/agents.toml:7:8: connect rule 10.0.0.0/8 is listed under both allow (line 5) and ask; a network and port range may appear under one action only",
                "policies/agents.toml:7:38: connect rule 127.0.0.1/32 is listed twice under ask (first at line 7); remove one",
            ]
        );
    }

    #[test]
    fn approval_settings() {
        let set = load(&with_head(
            "[policy.approval]\n\
             timeout = \"90s\"\n\
             on_timeout = \"allow\"\n\
             reviewers = [\"sre\", \"security\"]\n\
             approvals_required = 2\n\
             grant_durations = [\"once\", \"1h\", \"session\", \"always\"]\n",
        ));
        let approval = &set.policies[0].approval;
        assert_eq!(approval.timeout, Duration::from_secs(90));
        assert_eq!(approval.on_timeout, Action::Allow);
        assert_eq!(approval.reviewers, ["sre", "security"]);
        assert_eq!(approval.approvals_required, 2);
        assert_eq!(
            approval.grant_durations,
            [
                GrantDuration::Once,
                GrantDuration::For(Duration::from_hours(1)),
                GrantDuration::Session,
                GrantDuration::Always
            ]
        );
        assert!(!approval.require_reason, "a reason is optional by default");
    }

    #[test]
    fn require_reason() {
        let set = load(&with_head("[policy.approval]\nrequire_reason = true\n"));
        assert!(set.policies[0].approval.require_reason);
        let set = load(&with_head("[policy.approval]\nrequire_reason = false\n"));
        assert!(!set.policies[0].approval.require_reason);
        assert_eq!(
            error(&with_head("[policy.approval]\nrequire_reason = \"yes\"\n")),
            "policies/agents.toml:5:18: `require_reason` must be true or false (without quotes), found string"
        );
        assert_eq!(
            error(&with_head("[policy.approval]\nrequire_reason = 1\n")),
            "policies/agents.toml:5:18: `require_reason` must be true or false (without quotes), found integer"
        );
        assert_eq!(
            error(&with_head("[policy.approval]\nrequire_reasons = true\n")),
            "policies/agents.toml:5:1: unknown key \"require_reasons\" in [policy.approval] (expected timeout, on_timeout, reviewers, approvals_required, grant_durations or require_reason); did you mean \"require_reason\"?"
        );
    }

    #[test]
    fn approval_errors() {
        let text = with_head(
            "[policy.approval]\n\
             timeout = \"0s\"\n\
             on_timeout = \"ask\"\n\
             reviewers = []\n\
             approvals_required = 0\n\
             grant_durations = [\"once\", \"sometimes\", \"0m\", \"once\"]\n",
        );
        assert_eq!(
            errors(&text),
            [
                "policies/agents.toml:5:11: timeout \"0s\" is zero; give reviewers time to answer, e.g. \"5m\"",
                "policies/agents.toml:6:14: on_timeout cannot be \"ask\": the request has already waited for a reviewer; use \"allow\" or \"deny\"",
                "policies/agents.toml:7:13: reviewers is empty, so nobody could decide; name reviewer groups, or remove the key to let any authenticated reviewer decide",
                "policies/agents.toml:8:22: approvals_required is 0; at least 1 reviewer must approve (remove the key for the default of 1)",
                "policies/agents.toml:9:28: unknown grant duration \"sometimes\" (expected once, session, always or a duration such as 30m or 1h)",
                "policies/agents.toml:9:41: grant duration \"0m\" is zero; use once for a single request",
                "policies/agents.toml:9:47: grant duration \"once\" is listed twice (first at line 9); remove one",
            ]
        );
        assert_eq!(
            error(&with_head("[policy.approval]\ntimeout = \"25h\"\n")),
            "policies/agents.toml:5:11: timeout \"25h\" is longer than 24h; a paused workload should not wait more than a day (use at most \"24h\")"
        );
        assert_eq!(
            error(&with_head("[policy.approval]\ntimeout = \"soon\"\n")),
            "policies/agents.toml:5:11: invalid timeout \"soon\" (expected a duration such as 30s, 5m or 1h)"
        );
        assert_eq!(
            error(&with_head("[policy.approval]\ntimeout = 300\n")),
            "policies/agents.toml:5:11: `timeout` must be a duration string such as \"5m\", found integer"
        );
        assert_eq!(
            error(&with_head("[policy.approval]\napprovals_required = -1\n")),
            "policies/agents.toml:5:22: approvals_required is -1; at least 1 reviewer must approve (remove the key for the default of 1)"
        );
        assert_eq!(
            error(&with_head(
                "[policy.approval]\napprovals_required = \"2\"\n"
            )),
            "policies/agents.toml:5:22: `approvals_required` must be a whole number such as 1, found string"
        );
        // 24h exactly is the limit, not past it.
        let set = load(&with_head("[policy.approval]\ntimeout = \"24h\"\n"));
        assert_eq!(set.policies[0].approval.timeout, Duration::from_hours(24));
    }

    #[test]
    fn file_shape_errors() {
        assert_eq!(
            error("[policy]\nname = \"a\"\n"),
            "policies/agents.toml:1:1: write [[policy]] (an array of tables, one per policy), not [policy]"
        );
        assert_eq!(
            error("# nothing here yet\n"),
            "policies/agents.toml:1:1: no [[policy]] in this file; add one (see examples/ai-agents.toml) or remove the file"
        );
        assert_eq!(
            error(&with_head("exec = \"deny\"\n")),
            "policies/agents.toml:4:8: `exec` must be a table ([policy.exec]), found string"
        );
    }

    #[test]
    fn syntax_errors_are_located() {
        // The string is unterminated: reported where the closing quote is missing.
        assert_eq!(
            error("[[policy]]\nname = \"a\ncgroups = [\"/sys/fs/cgroup/a\"]\n"),
            "policies/agents.toml:2:10: invalid TOML: invalid basic string, expected `\"`"
        );
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        // "é" is two bytes; the column of the error is still in characters.
        assert_eq!(
            error(
                "[[policy]]\nname = \"é\"\ncgroups = [\"/sys/fs/cgroup/a\"]\n[policy.exec]\nallow = [\"é\"]  ;\n"
            ),
            "policies/agents.toml:5:16: invalid TOML: unexpected key or value, expected newline, `#`"
        );
    }

    #[test]
    fn error_display_is_one_line_per_diagnostic() {
        let text = with_head("[policy.exec]\ndefault = \"alow\"\nallow = [\"ls\"]\n");
        let error = parse_str(FILE, &text).expect_err("invalid");
        let display = error.to_string();
        let lines: Vec<&str> = display.lines().collect();
        assert_eq!(lines.len(), 2, "{display}");
        assert!(lines[0].starts_with("policies/agents.toml:5:11: unknown action"));
        assert!(
            lines[1].starts_with("policies/agents.toml:6:10: exec path \"ls\" is not absolute")
        );
    }

    #[test]
    fn protect_relaxations_are_read_in_order_and_none_by_default() {
        assert!(load(HEAD).policies[0].protect.relax.is_empty());
        let set = load(&with_head(
            "[policy.protect]\nrelax = [\"mount\", \"service-connect\", \"signals\"]\n",
        ));
        assert_eq!(
            set.policies[0].protect.relax,
            [
                ProtectPoint::Mount,
                ProtectPoint::ServiceConnect,
                ProtectPoint::Signals
            ]
        );
    }

    #[test]
    fn mode_is_enforce_unless_audit_is_written() {
        assert_eq!(load(HEAD).policies[0].mode, crate::Mode::Enforce);
        let set = load(&with_head("mode = \"audit\"\n"));
        assert_eq!(set.policies[0].mode, crate::Mode::Audit);
        let set = load(&with_head("mode = \"enforce\"\n"));
        assert_eq!(set.policies[0].mode, crate::Mode::Enforce);
        assert_eq!(
            error(&with_head("mode = \"permissive\"\n")),
            format!(
                "{FILE}:4:8: unknown mode \"permissive\" (expected \"enforce\", the default, or \"audit\" to record what the policy would deny or ask without enforcing it)"
            )
        );
    }

    #[test]
    fn protect_errors_are_located() {
        let text = with_head(
            "[policy.protect]\nrelax = [\"mount\", \"mounts\", \"mount\", 3]\nrelaxed = true\n",
        );
        assert_eq!(
            errors(&text),
            [
                "policies/agents.toml:5:19: unknown protection \"mounts\" (expected signals, ptrace, bpf, kernel, raw-devices, mount or service-connect)",
                "policies/agents.toml:5:29: protection \"mount\" is relaxed twice in this policy; remove one",
                "policies/agents.toml:5:38: `relax` must contain strings only, found integer",
                "policies/agents.toml:6:1: unknown key \"relaxed\" in [policy.protect] (expected relax); did you mean \"relax\"?",
            ]
        );
    }
}
