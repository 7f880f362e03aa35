//! Policy tests: example actions, each with the outcome the policies must
//! give it (`gatekeep policy test`, in the spirit of `opa test`).
//!
//! A cases file is TOML, one `[[case]]` per example action:
//!
//! ```toml
//! [[case]]
//! name = "agents may not use sudo"        # optional, shown in the report
//! cgroup = "/sys/fs/cgroup/agents/job-1"  # the workload's cgroup
//! exec = "/usr/bin/sudo"                  # an exec, with its argv (default: [exec])
//! argv = ["sudo", "-i"]
//! cwd = "/srv/app"                        # optional: where a script operand is found
//! expect = "deny"                         # allow | deny | ask
//!
//! [[case]]
//! cgroup = "/sys/fs/cgroup/agents/job-1"
//! connect = "169.254.169.254:80"          # or "[2001:db8::1]:443"; also stands for sendto
//! expect = "deny"
//!
//! [[case]]
//! cgroup = "/sys/fs/cgroup/agents/job-1"
//! connect = "api.github.com:443"          # the workload resolved the name, then connected
//! expect = "allow"                        # (to an address no network rule names)
//!
//! [[case]]
//! cgroup = "/sys/fs/cgroup/agents/job-1"
//! connect = "140.82.112.5:443"            # an address ...
//! resolved = ["api.github.com"]           # ... the workload resolved these names to
//! expect = "allow"
//!
//! [[case]]
//! cgroup = "/sys/fs/cgroup/agents/job-1"
//! unix = "/run/docker.sock"               # an AF_UNIX connect ("@name": abstract)
//! expect = "ask"
//! ```
//!
//! Each case is decided as the kernel decides it ([`PolicySet::decide`]):
//! the policy governing the cgroup (none: allowed, ungated), then for an
//! exec the rule naming the file (matched by file identity when both the
//! rule's file and the case's file exist on this host, by path otherwise),
//! the interpreter of a `#!` script as a second exec (the kernel checks it
//! too), command rules, scripts run by interpreters and applets of
//! multi-call binaries as the agent matches them ([`crate::ExecMatcher`]),
//! and `on_truncated` for an asked (or matched) exec whose argv the kernel
//! cannot bind completely; for a connect, the network rules as
//! [`crate::ConnectPolicy::action_for`] matches them and the host rules of
//! the names the case says the workload resolved, the strictest winning
//! ([`crate::ConnectPolicy::decide_resolved`]); for `AF_UNIX`, the policy's
//! `unix` action.
//!
//! Not modelled: grants and verdicts (a case is what happens before any
//! reviewer acts), the self-protections (gatekeep's own files, processes,
//! maps and service listeners are refused whatever the policy says), and
//! rules whose file changed after the agent loaded the policy (the agent
//! reports those).

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use gatekeep_common::{ARGV_LEN, ARGV_MAX_ARGS};
use serde::Serialize;
use toml::de::{DeTable, DeValue};

use crate::{
    cgroup::CGROUP_ROOT,
    command::{Decided, ExecMatcher, Resolved, operand_path, strictness},
    error::{Diagnostic, PolicyError},
    load::{CASES_SUFFIX, cases_files},
    model::{Action, Policy, PolicySet},
    parse::{Span, Value, Walker, field, sorted},
};

const CASE_KEYS: &[&str] = &[
    "name", "cgroup", "exec", "argv", "cwd", "connect", "resolved", "unix", "expect",
];

/// One example action and the outcome it must get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Case {
    /// Where the case was written: `file:line:column`.
    pub at: String,
    pub name: Option<String>,
    /// The workload's cgroup as written (`/sys/fs/cgroup/agents/job-1`).
    pub cgroup: String,
    pub example: Example,
    pub expect: Action,
}

/// What the workload does in a [`Case`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Example {
    /// `execve(path, argv)`, from the directory `cwd` (`/` when not
    /// written), against which an interpreter's relative script operand is
    /// found.
    Exec {
        path: PathBuf,
        argv: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        cwd: Option<PathBuf>,
    },
    /// A connect (or a datagram sent) to an IP address and port, by a
    /// workload that resolved `resolved` (fresh answers) to that address.
    Connect {
        to: SocketAddr,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        resolved: Vec<String>,
    },
    /// A connect to an address the workload resolved `host` to, an address
    /// no network rule names.
    ConnectHost { host: String, port: u16 },
    /// An `AF_UNIX` connect to a socket path, or `@name` for an abstract one.
    Unix { path: String },
}

/// What the policies do with an action, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub action: Action,
    /// The policy governing the cgroup; `None` when none does.
    pub policy: Option<String>,
    /// The rule or setting that decided, e.g. `exec rule deny /usr/bin/sudo`.
    pub because: String,
}

/// A case and the outcome it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaseResult {
    #[serde(flatten)]
    pub case: Case,
    pub outcome: Outcome,
    pub passed: bool,
}

/// Reads cases files in order: each path is a file, or a directory whose
/// `*.cases.toml` files are taken in name order. Every problem of every file
/// is reported, each located as `file:line:column`, and any problem fails
/// the whole load.
pub fn load_cases(paths: &[PathBuf]) -> Result<Vec<Case>, PolicyError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let found = cases_files(path)?;
            if found.is_empty() {
                return Err(PolicyError::ReadFile {
                    path: path.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("no *{CASES_SUFFIX} file in this directory"),
                    ),
                });
            }
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    let mut diagnostics = Vec::new();
    let mut cases = Vec::new();
    for path in &files {
        let text = fs::read_to_string(path).map_err(|source| PolicyError::ReadFile {
            path: path.clone(),
            source,
        })?;
        cases.extend(parse_cases_into(
            &path.display().to_string(),
            &text,
            &mut diagnostics,
        ));
    }
    if diagnostics.is_empty() {
        Ok(cases)
    } else {
        Err(PolicyError::Invalid { diagnostics })
    }
}

/// Parses one cases file's text; `source_name` is how diagnostics name it.
pub fn parse_cases(source_name: &str, text: &str) -> Result<Vec<Case>, PolicyError> {
    let mut diagnostics = Vec::new();
    let cases = parse_cases_into(source_name, text, &mut diagnostics);
    if diagnostics.is_empty() {
        Ok(cases)
    } else {
        Err(PolicyError::Invalid { diagnostics })
    }
}

fn parse_cases_into(file: &str, text: &str, diagnostics: &mut Vec<Diagnostic>) -> Vec<Case> {
    let mut walker = Walker::new(file, text);
    let (document, errors) = DeTable::parse_recoverable(text);
    let mut cases = Vec::new();
    if errors.is_empty() {
        cases = document_cases(&mut walker, document.get_ref());
    } else {
        for error in errors {
            let span = error.span().unwrap_or(0..0);
            walker.error(&span, format!("invalid TOML: {}", error.message()));
        }
    }
    let mut found = walker.diagnostics;
    found.sort_by_key(|d| (d.line, d.column));
    found.dedup();
    diagnostics.extend(found);
    cases
}

fn document_cases(walker: &mut Walker<'_>, root: &DeTable<'_>) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut seen = false;
    for (key, value) in sorted(root) {
        if key.get_ref() != "case" {
            walker.unknown_key(key, "a cases file", &["case"]);
            continue;
        }
        seen = true;
        let DeValue::Array(items) = value.get_ref() else {
            walker.error(
                &value.span(),
                "write [[case]] (an array of tables, one per case), not [case] or case = ...",
            );
            continue;
        };
        for item in items {
            match item.get_ref() {
                DeValue::Table(table) => cases.extend(case(walker, &item.span(), table)),
                other => walker.error(
                    &item.span(),
                    format!("each case must be a table, found {}", other.type_str()),
                ),
            }
        }
    }
    if !seen {
        walker.error(
            &(0..0),
            "no [[case]] in this file; add one per example action (see `gatekeep policy test --help`)",
        );
    }
    cases
}

/// One `[[case]]`; `None` (with its problems reported) when it is invalid.
fn case(walker: &mut Walker<'_>, header: &Span, table: &DeTable<'_>) -> Option<Case> {
    walker.check_keys(table, "[[case]]", CASE_KEYS);
    let before = walker.diagnostics.len();

    let name =
        field(table, "name").and_then(|value| walker.string(value, "name").map(str::to_owned));
    let cgroup = match field(table, "cgroup") {
        None => {
            walker.error(
                header,
                "case has no cgroup; add cgroup = \"/sys/fs/cgroup/...\" (the workload's cgroup)",
            );
            None
        }
        Some(value) => cgroup(walker, value),
    };
    let expect = match field(table, "expect") {
        None => {
            walker.error(
                header,
                "case has no expected outcome; add expect = \"allow\", \"deny\" or \"ask\"",
            );
            None
        }
        Some(value) => walker.action(value, "expect"),
    };
    let example = example(walker, header, table);
    if walker.diagnostics.len() > before {
        return None;
    }
    Some(Case {
        at: walker.pos(header).to_string(),
        name,
        cgroup: cgroup?,
        example: example?,
        expect: expect?,
    })
}

fn cgroup(walker: &mut Walker<'_>, value: &Value<'_>) -> Option<String> {
    let text = walker.string(value, "cgroup")?;
    let rest = text
        .strip_prefix(CGROUP_ROOT)
        .filter(|rest| rest.starts_with('/'));
    let problem = match rest {
        None => Some(format!(
            "cgroup \"{text}\" is not under {CGROUP_ROOT}; write the workload's cgroup v2 directory, e.g. \"{CGROUP_ROOT}/agents/job-1\""
        )),
        Some(rest) if rest.split('/').any(|part| part == "." || part == "..") => Some(format!(
            "cgroup \"{text}\" contains `.` or `..`; write the plain path"
        )),
        Some(rest) if rest.contains(['*', '?', '[', '{']) => Some(format!(
            "cgroup \"{text}\" is a pattern; a case names one cgroup, as a process is in one"
        )),
        Some(_) => None,
    };
    if let Some(problem) = problem {
        walker.error(&value.span(), problem);
        return None;
    }
    Some(text.trim_end_matches('/').to_owned())
}

/// A connect case: `IP:PORT` (with the names the workload resolved to it,
/// if any) or `HOST:PORT`.
fn connect_example(
    walker: &mut Walker<'_>,
    value: &Value<'_>,
    text: &str,
    resolved: Vec<String>,
) -> Option<Example> {
    if let Ok(to) = text.parse::<SocketAddr>() {
        return Some(Example::Connect { to, resolved });
    }
    let host = text
        .rsplit_once(':')
        .filter(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
        .and_then(|(host, port)| {
            crate::hosts::parse_host_target(host)
                .ok()
                .filter(|(pattern, _)| matches!(pattern, crate::HostPattern::Exact(_)))
                .map(|(pattern, _)| (pattern.to_string(), port))
        });
    let Some((host, port)) = host.filter(|_| resolved.is_empty()) else {
        walker.error(
            &value.span(),
            format!(
                "connect \"{text}\" is neither IP:PORT nor HOST:PORT; write e.g. \"10.0.0.1:443\", \"[2001:db8::1]:443\" or \"api.github.com:443\" (a HOST:PORT case takes no `resolved`)"
            ),
        );
        return None;
    };
    Some(Example::ConnectHost {
        host,
        port: port.parse().unwrap_or_default(),
    })
}

/// An exec case's `cwd`: an absolute directory.
fn exec_cwd(walker: &mut Walker<'_>, value: &Value<'_>) -> Option<PathBuf> {
    let cwd = walker.string(value, "cwd")?;
    if !cwd.starts_with('/') {
        walker.error(
            &value.span(),
            format!("cwd \"{cwd}\" is not absolute; write the directory the workload runs in, e.g. \"/srv/app\""),
        );
        return None;
    }
    Some(PathBuf::from(cwd))
}

fn example(walker: &mut Walker<'_>, header: &Span, table: &DeTable<'_>) -> Option<Example> {
    let kinds: Vec<&str> = ["exec", "connect", "unix"]
        .into_iter()
        .filter(|key| field(table, key).is_some())
        .collect();
    let kind = match kinds.as_slice() {
        [kind] => *kind,
        [] => {
            walker.error(
                header,
                "case names no action; add exec = \"/usr/bin/...\", connect = \"IP:PORT\" or unix = \"/path/to.sock\"",
            );
            return None;
        }
        _ => {
            walker.error(
                header,
                format!(
                    "case names {} actions; one case is one action, so split it into cases",
                    kinds.join(" and ")
                ),
            );
            return None;
        }
    };
    for key in ["argv", "cwd"] {
        if kind != "exec"
            && let Some(value) = field(table, key)
        {
            walker.error(
                &value.span(),
                format!("{key} belongs to an exec case; remove it"),
            );
        }
    }
    let resolved = match field(table, "resolved") {
        Some(value) if kind != "connect" => {
            walker.error(
                &value.span(),
                "resolved belongs to a connect case; remove it",
            );
            return None;
        }
        Some(value) => resolved_names(walker, value)?,
        None => Vec::new(),
    };
    let value = field(table, kind)?;
    let text = walker.string(value, kind)?;
    match kind {
        "exec" => {
            if !text.starts_with('/') {
                walker.error(
                    &value.span(),
                    format!("exec \"{text}\" is not absolute; write the path the workload runs, e.g. \"/usr/bin/git\""),
                );
                return None;
            }
            let argv = match field(table, "argv") {
                None => vec![text.to_owned()],
                Some(argv) => argv_list(walker, argv)?,
            };
            let cwd = match field(table, "cwd") {
                None => None,
                Some(value) => Some(exec_cwd(walker, value)?),
            };
            Some(Example::Exec {
                path: PathBuf::from(text),
                argv,
                cwd,
            })
        }
        "connect" => connect_example(walker, value, text, resolved),
        _ => {
            if text.is_empty() || text.contains('\0') || text.len() > 107 {
                walker.error(
                    &value.span(),
                    "unix must be a socket path (at most 107 bytes, no NUL), or @name for an abstract socket",
                );
                return None;
            }
            Some(Example::Unix {
                path: text.to_owned(),
            })
        }
    }
}

/// `resolved = "name"` or `resolved = ["name", ...]`: host names.
fn resolved_names(walker: &mut Walker<'_>, value: &Value<'_>) -> Option<Vec<String>> {
    let items: Vec<(String, Span)> = if let DeValue::String(text) = value.get_ref() {
        vec![(text.to_string(), value.span())]
    } else {
        walker
            .string_list(value, "resolved", "resolved = [\"api.github.com\"]")?
            .into_iter()
            .map(|(text, span)| (text.to_owned(), span))
            .collect()
    };
    let mut names = Vec::with_capacity(items.len());
    for (text, span) in items {
        match crate::hosts::parse_host_target(&text) {
            Ok((crate::HostPattern::Exact(name), ports)) if ports.is_all() => names.push(name),
            _ => {
                walker.error(
                    &span,
                    format!("resolved \"{text}\" is not a host name; write the name the workload looked up, e.g. \"api.github.com\""),
                );
                return None;
            }
        }
    }
    Some(names)
}

fn argv_list(walker: &mut Walker<'_>, value: &Value<'_>) -> Option<Vec<String>> {
    let items = walker.string_list(value, "argv", "argv = [\"git\", \"push\"]")?;
    let mut argv = Vec::with_capacity(items.len());
    for (arg, span) in items {
        if arg.contains('\0') {
            walker.error(
                &span,
                "an argument cannot contain NUL (the kernel passes C strings)",
            );
            return None;
        }
        argv.push(arg.to_owned());
    }
    Some(argv)
}

impl PolicySet {
    /// What the kernel does with `example` in `cgroup` (written under
    /// `/sys/fs/cgroup`), before any reviewer acts; see the module docs.
    #[must_use]
    pub fn decide(&self, cgroup: &str, example: &Example) -> Outcome {
        let relative = cgroup.strip_prefix(CGROUP_ROOT).unwrap_or(cgroup);
        let relative = if relative.is_empty() { "/" } else { relative };
        let Some(index) = self.policy_for_cgroup(Path::new(relative)) else {
            return Outcome {
                action: Action::Allow,
                policy: None,
                because: "no policy governs this cgroup".to_owned(),
            };
        };
        let policy = &self.policies[index];
        let (action, because) = match example {
            Example::Exec { path, argv, cwd } => {
                decide_exec(policy, path, argv, cwd.as_deref().unwrap_or(Path::new("/")))
            }
            Example::Connect { to, resolved } => {
                let names: Vec<&str> = resolved.iter().map(String::as_str).collect();
                let decided = policy.connect.decide_resolved(to.ip(), to.port(), &names);
                (decided.action, decided.to_string())
            }
            Example::ConnectHost { host, port } => {
                let decided = policy.connect.decide_host(host, *port);
                (decided.action, decided.to_string())
            }
            Example::Unix { path } => policy.connect.decide_unix(&crate::unix::sun_path(path)),
        };
        Outcome {
            action,
            policy: Some(policy.name.clone()),
            because,
        }
    }

    /// Decides every case, in order.
    #[must_use]
    pub fn run_cases(&self, cases: Vec<Case>) -> Vec<CaseResult> {
        cases
            .into_iter()
            .map(|case| {
                let outcome = self.decide(&case.cgroup, &case.example);
                let passed = outcome.action == case.expect;
                CaseResult {
                    case,
                    outcome,
                    passed,
                }
            })
            .collect()
    }
}

/// An exec: the file's own decision, then, for a `#!` script, its
/// interpreter's (the kernel checks both; the stricter stands). A file with
/// command rules, and an interpreter or multi-call binary the agent reads
/// argv for, is decided as the agent matches it ([`ExecMatcher`]), after the
/// kernel's `on_truncated` for an argv it cannot bind.
fn decide_exec(policy: &Policy, path: &Path, argv: &[String], cwd: &Path) -> (Action, String) {
    let matcher = ExecMatcher::new(&policy.exec, |file| Some(FileKey::of(file)));
    let resolve = |operand: &str| {
        let path = operand_path(cwd, operand);
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Resolved::File(FileKey::of(&path)),
            Ok(_) => Resolved::Missing,
            Err(_) => Resolved::File(FileKey::Path(path)),
        }
    };
    let decide = |file: &Path, argv: &[String]| -> (Action, String, bool) {
        let key = FileKey::of(file);
        if matcher.matches(&key) {
            let Decided { action, because } = matcher.decide(&key, argv, &resolve);
            (action, because, true)
        } else {
            let (action, because) = exec_rule(policy, file);
            (action, because, false)
        }
    };
    let (mut action, mut because, mut handed_over) = decide(path, argv);
    if let Some(interpreter) = script_interpreter(path) {
        // The interpreter pass: the interpreter's own decision (the kernel
        // checked the script itself just before; the agent applies the
        // interpreter's own rule to a handed-over interpreter pass).
        let key = FileKey::of(&interpreter);
        let (second, why, second_matched) = if matcher.matches(&key) {
            let Decided { action, because } = matcher.decide_own(&key);
            (action, because, true)
        } else {
            let (action, because) = exec_rule(policy, &interpreter);
            (action, because, false)
        };
        handed_over |= second_matched;
        if strictness(second) > strictness(action) {
            action = second;
            because = format!("{why} (the interpreter of {})", path.display());
        }
    }
    // The kernel hands a matched exec over on its ask path, so an argv it
    // cannot bind takes `on_truncated` before any matching.
    if (action == Action::Ask || handed_over)
        && let Some(why) = truncation(argv)
    {
        let on = policy.exec.on_truncated;
        return (on, format!("{because}, but {why}: on_truncated {on}"));
    }
    (action, because)
}

/// A file as `policy test` tells files apart: by identity when it exists
/// here, by path otherwise (see [`same_file`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum FileKey {
    Id(u64, u64),
    Path(PathBuf),
}

impl FileKey {
    fn of(path: &Path) -> Self {
        fs::metadata(path).map_or_else(
            |_| FileKey::Path(path.to_path_buf()),
            |meta| FileKey::Id(meta.dev(), meta.ino()),
        )
    }
}

fn exec_rule(policy: &Policy, path: &Path) -> (Action, String) {
    policy
        .exec
        .rules
        .iter()
        .find(|rule| same_file(&rule.path, path))
        .map_or_else(
            || {
                (
                    policy.exec.default,
                    format!("exec default {}", policy.exec.default),
                )
            },
            |rule| {
                (
                    rule.action,
                    format!("exec rule {} {}", rule.action, rule.path.display()),
                )
            },
        )
}

/// By identity (device and inode) when both files exist here, as the
/// kernel matches them; by path otherwise (cases written for another host).
fn same_file(rule: &Path, path: &Path) -> bool {
    match (fs::metadata(rule), fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => rule == path,
    }
}

/// The interpreter a `#!` line names, if `path` is such a script here.
fn script_interpreter(path: &Path) -> Option<PathBuf> {
    let mut line = Vec::new();
    BufReader::new(fs::File::open(path).ok()?)
        .take(256)
        .read_until(b'\n', &mut line)
        .ok()?;
    let rest = line.strip_prefix(b"#!")?;
    let rest = std::str::from_utf8(rest).ok()?;
    let interpreter = rest.split_whitespace().next()?;
    interpreter
        .starts_with('/')
        .then(|| PathBuf::from(interpreter))
}

/// Why the kernel cannot bind this argv completely, if it cannot: more than
/// [`ARGV_MAX_ARGS`] arguments, more than [`ARGV_LEN`] bytes with their
/// NULs, or one argument filling the whole capture.
fn truncation(argv: &[String]) -> Option<String> {
    let bytes: usize = argv.iter().map(|arg| arg.len() + 1).sum();
    if argv.len() > ARGV_MAX_ARGS as usize {
        Some(format!(
            "its {} arguments are more than the kernel binds ({ARGV_MAX_ARGS})",
            argv.len()
        ))
    } else if bytes > ARGV_LEN || argv.iter().any(|arg| arg.len() + 1 >= ARGV_LEN) {
        Some(format!(
            "its argv ({bytes} bytes) is longer than the kernel binds ({ARGV_LEN} bytes)"
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::parse_str;

    const POLICY: &str = r#"
[[policy]]
name = "agents"
cgroups = ["/sys/fs/cgroup/agents/*"]
[policy.exec]
default = "ask"
allow = ["/usr/bin/git"]
deny = ["/usr/bin/sudo"]
[policy.connect]
default = "deny"
allow = ["127.0.0.1", "10.0.0.0/8:443"]
ask = ["10.9.0.0/16"]
unix = "ask"
"#;

    fn policies(text: &str) -> PolicySet {
        parse_str("policies.toml", text).expect("valid policy")
    }

    fn errors(text: &str) -> Vec<String> {
        parse_cases("cases.toml", text)
            .expect_err("invalid cases")
            .diagnostics()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn outcome(set: &PolicySet, cgroup: &str, example: &Example) -> (Action, String) {
        let outcome = set.decide(cgroup, example);
        (outcome.action, outcome.because)
    }

    fn exec(path: &str, argv: &[&str]) -> Example {
        Example::Exec {
            path: path.into(),
            argv: argv.iter().map(|arg| (*arg).to_owned()).collect(),
            cwd: None,
        }
    }

    #[test]
    fn cases_are_read_with_defaults_and_locations() {
        let cases = parse_cases(
            "cases.toml",
            r#"
[[case]]
name = "no sudo"
cgroup = "/sys/fs/cgroup/agents/job-1/"
exec = "/usr/bin/sudo"
expect = "deny"

[[case]]
cgroup = "/sys/fs/cgroup/agents/job-1"
connect = "[::1]:8080"
expect = "allow"
"#,
        )
        .expect("valid cases");
        assert_eq!(cases.len(), 2);
        assert_eq!(cases[0].at, "cases.toml:2:1");
        assert_eq!(cases[0].name.as_deref(), Some("no sudo"));
        assert_eq!(cases[0].cgroup, "/sys/fs/cgroup/agents/job-1");
        assert_eq!(cases[0].example, exec("/usr/bin/sudo", &["/usr/bin/sudo"]));
        assert_eq!(cases[1].at, "cases.toml:8:1");
        assert_eq!(
            cases[1].example,
            Example::Connect {
                to: "[::1]:8080".parse().unwrap(),
                resolved: Vec::new(),
            }
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_place() {
        let found = errors(
            r#"
[[case]]
cgroup = "agents/job-1"
exec = "git"
expect = "alow"
colour = "red"

[[case]]
cgroup = "/sys/fs/cgroup/agents/*"
connect = "api.github.com:443"
unix = "/run/x.sock"
expect = "deny"

[[case]]
cgroup = "/sys/fs/cgroup/a"
connect = "api.github.com"
argv = ["x"]
expect = "deny"
"#,
        );
        assert_eq!(
            found,
            [
                "cases.toml:3:10: cgroup \"agents/job-1\" is not under /sys/fs/cgroup; write the workload's cgroup v2 directory, e.g. \"/sys/fs/cgroup/agents/job-1\"",
                "cases.toml:4:8: exec \"git\" is not absolute; write the path the workload runs, e.g. \"/usr/bin/git\"",
                "cases.toml:5:10: unknown action \"alow\" (expected allow, deny or ask)",
                "cases.toml:6:1: unknown key \"colour\" in [[case]] (expected name, cgroup, exec, argv, cwd, connect, resolved, unix or expect)",
                "cases.toml:8:1: case names connect and unix actions; one case is one action, so split it into cases",
                "cases.toml:9:10: cgroup \"/sys/fs/cgroup/agents/*\" is a pattern; a case names one cgroup, as a process is in one",
                "cases.toml:16:11: connect \"api.github.com\" is neither IP:PORT nor HOST:PORT; write e.g. \"10.0.0.1:443\", \"[2001:db8::1]:443\" or \"api.github.com:443\" (a HOST:PORT case takes no `resolved`)",
                "cases.toml:17:8: argv belongs to an exec case; remove it",
            ]
        );
        assert_eq!(
            errors("[case]\ncgroup = 1\n"),
            [
                "cases.toml:1:1: write [[case]] (an array of tables, one per case), not [case] or case = ..."
            ]
        );
        assert_eq!(
            errors("# nothing\n"),
            [
                "cases.toml:1:1: no [[case]] in this file; add one per example action (see `gatekeep policy test --help`)"
            ]
        );
        assert_eq!(
            errors("[[case]]\nname = \"x\"\n"),
            [
                "cases.toml:1:1: case has no cgroup; add cgroup = \"/sys/fs/cgroup/...\" (the workload's cgroup)",
                "cases.toml:1:1: case has no expected outcome; add expect = \"allow\", \"deny\" or \"ask\"",
                "cases.toml:1:1: case names no action; add exec = \"/usr/bin/...\", connect = \"IP:PORT\" or unix = \"/path/to.sock\"",
            ]
        );
    }

    #[test]
    fn exec_rules_default_and_ungated_cgroups() {
        let set = policies(POLICY);
        let job = "/sys/fs/cgroup/agents/job-1";
        assert_eq!(
            outcome(&set, job, &exec("/no/such/sudo-here", &["x"])),
            (Action::Ask, "exec default ask".to_owned())
        );
        let set = policies(&POLICY.replace("/usr/bin/sudo", "/no/such/sudo"));
        assert_eq!(
            outcome(&set, job, &exec("/no/such/sudo", &["sudo"])),
            (Action::Deny, "exec rule deny /no/such/sudo".to_owned())
        );
        // Descendants of a governed cgroup are governed too; others are not.
        assert_eq!(
            outcome(
                &set,
                "/sys/fs/cgroup/agents/job-1/inner",
                &exec("/no/such/sudo", &[])
            )
            .0,
            Action::Deny
        );
        let ungated = set.decide("/sys/fs/cgroup/system.slice", &exec("/no/such/sudo", &[]));
        assert_eq!(
            (ungated.action, ungated.policy, ungated.because.as_str()),
            (Action::Allow, None, "no policy governs this cgroup")
        );
    }

    #[test]
    fn exec_rules_match_by_identity_and_scripts_by_interpreter() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        fs::write(&tool, b"\x7fELF").unwrap();
        let link = dir.path().join("tool-link");
        fs::hard_link(&tool, &link).unwrap();
        let shell = dir.path().join("shell");
        fs::write(&shell, b"\x7fELF").unwrap();
        let script = dir.path().join("deploy.sh");
        fs::write(&script, format!("#!{} -e\necho hi\n", shell.display())).unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();

        let text = format!(
            "[[policy]]\nname = \"p\"\ncgroups = [\"/sys/fs/cgroup/a\"]\n[policy.exec]\ndefault = \"allow\"\ndeny = [\"{}\"]\nask = [\"{}\"]\n",
            tool.display(),
            shell.display()
        );
        let set = policies(&text);
        let link = link.to_str().unwrap();
        assert_eq!(
            outcome(&set, "/sys/fs/cgroup/a", &exec(link, &["tool-link"])).0,
            Action::Deny,
            "a hard link is the same file"
        );
        let (action, because) = outcome(
            &set,
            "/sys/fs/cgroup/a",
            &exec(script.to_str().unwrap(), &["deploy.sh"]),
        );
        assert_eq!(action, Action::Ask);
        assert_eq!(
            because,
            format!(
                "exec rule ask {} (the interpreter of {})",
                shell.display(),
                script.display()
            )
        );
    }

    #[test]
    fn command_rules_scripts_and_applets_are_decided_as_the_agent_matches_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, content: &[u8]| {
            let path = dir.path().join(name);
            fs::write(&path, content).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
            path.display().to_string()
        };
        let kubectl = file("kubectl", b"\x7fELF");
        let shell = file("sh", b"\x7fELF");
        let busybox = file("busybox", b"\x7fELF");
        let deploy = file("deploy.sh", format!("#!{shell}\necho hi\n").as_bytes());
        let text = format!(
            "[[policy]]\nname = \"p\"\ncgroups = [\"/sys/fs/cgroup/a\"]\n[policy.exec]\n\
             ask = [\"{deploy}\"]\nallow = [\"{busybox}\"]\n\
             interpreters = [\"{shell}\"]\nmulticall = [\"{busybox}\"]\n\
             [[policy.exec.command]]\nargv = [\"{kubectl}\", \"delete\", \"**\"]\naction = \"ask\"\n\
             [[policy.exec.command]]\nargv = [\"{busybox}\", \"wget\", \"**\"]\naction = \"deny\"\n"
        );
        let set = policies(&text);
        let cg = "/sys/fs/cgroup/a";
        let run = |path: &str, argv: &[&str], cwd: Option<&Path>| {
            let example = Example::Exec {
                path: path.into(),
                argv: argv.iter().map(|arg| (*arg).to_owned()).collect(),
                cwd: cwd.map(Path::to_path_buf),
            };
            outcome(&set, cg, &example)
        };
        assert_eq!(
            run(&kubectl, &["kubectl", "get", "pods"], None).0,
            Action::Allow
        );
        let (action, because) = run(&kubectl, &["kubectl", "delete", "pod", "x"], None);
        assert_eq!(action, Action::Ask);
        assert_eq!(
            because,
            format!("exec command ask [\"{kubectl}\", \"delete\", \"**\"]")
        );
        // The script, exec'd or run by its interpreter, from its folder.
        assert_eq!(
            run(&deploy, &["./deploy.sh"], Some(dir.path())).0,
            Action::Ask
        );
        assert_eq!(
            run(&shell, &["sh", "deploy.sh"], Some(dir.path())).0,
            Action::Ask
        );
        assert_eq!(run(&shell, &["sh", "deploy.sh"], None).0, Action::Allow);
        // Applets by name.
        assert_eq!(run(&busybox, &["wget", "x"], None).0, Action::Deny);
        assert_eq!(
            run(&busybox, &["busybox", "wget", "x"], None).0,
            Action::Deny
        );
        assert_eq!(run(&busybox, &["ls"], None).0, Action::Allow);
        assert_eq!(
            run(&busybox, &["sh", "deploy.sh"], Some(dir.path())).0,
            Action::Ask
        );
        // An argv the kernel cannot bind: on_truncated, even for an allow.
        let long = "x".repeat(ARGV_LEN);
        assert_eq!(
            run(&kubectl, &["kubectl", "get", &long], None).0,
            Action::Deny
        );
    }

    #[test]
    fn an_asked_exec_the_kernel_cannot_bind_takes_on_truncated() {
        let set = policies(POLICY);
        let job = "/sys/fs/cgroup/agents/job-1";
        let many: Vec<String> = (0..=ARGV_MAX_ARGS).map(|i| i.to_string()).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let (action, because) = outcome(&set, job, &exec("/x/tool", &many));
        assert_eq!(action, Action::Deny);
        assert_eq!(
            because,
            "exec default ask, but its 33 arguments are more than the kernel binds (32): on_truncated deny"
        );
        assert_eq!(
            outcome(&set, job, &exec("/x/tool", &many[..32])).0,
            Action::Ask
        );
        let long = "x".repeat(ARGV_LEN);
        assert_eq!(
            outcome(&set, job, &exec("/x/tool", &["sh", &long])).0,
            Action::Deny
        );
        let first_fills = "x".repeat(ARGV_LEN - 1);
        assert_eq!(
            outcome(&set, job, &exec("/x/tool", &[&first_fills])).0,
            Action::Deny
        );
        let set = policies(&POLICY.replace(
            "default = \"ask\"",
            "default = \"ask\"\non_truncated = \"ask\"",
        ));
        assert_eq!(outcome(&set, job, &exec("/x/tool", &many)).0, Action::Ask);
    }

    #[test]
    fn connects_follow_the_rules_as_the_kernel_matches_them() {
        let set = policies(POLICY);
        let job = "/sys/fs/cgroup/agents/job-1";
        let connect = |to: &str| Example::Connect {
            to: to.parse().unwrap(),
            resolved: Vec::new(),
        };
        assert_eq!(
            outcome(&set, job, &connect("10.1.2.3:443")),
            (
                Action::Allow,
                "connect rule allow 10.0.0.0/8:443".to_owned()
            )
        );
        assert_eq!(
            outcome(&set, job, &connect("10.9.1.1:443")),
            (Action::Ask, "connect rule ask 10.9.0.0/16".to_owned())
        );
        assert_eq!(
            outcome(&set, job, &connect("10.1.2.3:80")),
            (Action::Deny, "connect default deny".to_owned())
        );
        // 0.0.0.0 and :: reach loopback; an IPv4-mapped address is IPv4.
        assert_eq!(
            outcome(&set, job, &connect("0.0.0.0:9091")).0,
            Action::Allow
        );
        assert_eq!(
            outcome(&set, job, &connect("[::ffff:10.1.2.3]:443")).0,
            Action::Allow
        );
        assert_eq!(
            outcome(
                &set,
                job,
                &Example::Unix {
                    path: "/run/docker.sock".into()
                }
            ),
            (Action::Ask, "connect unix ask".to_owned())
        );
    }

    #[test]
    fn unix_cases_meet_the_unix_rules_before_the_unix_fallback() {
        let set = policies(
            "[[policy]]\nname = \"a\"\ncgroups = [\"/sys/fs/cgroup/a\"]\n\
             [policy.connect]\nunix = \"ask\"\n\
             deny = [\"unix:/run/docker.sock\"]\nallow = [\"unix:@gk-ok\"]\n",
        );
        let unix = |path: &str| Example::Unix { path: path.into() };
        let job = "/sys/fs/cgroup/a";
        assert_eq!(
            outcome(&set, job, &unix("/run/docker.sock")),
            (
                Action::Deny,
                "connect deny unix:/run/docker.sock".to_owned()
            )
        );
        assert_eq!(outcome(&set, job, &unix("@gk-ok")).0, Action::Allow);
        assert_eq!(
            outcome(&set, job, &unix("/run/other.sock")),
            (Action::Ask, "connect unix ask".to_owned())
        );
    }

    #[test]
    fn connects_to_resolved_names_meet_the_host_rules() {
        let set = policies(
            "[[policy]]\nname = \"agents\"\ncgroups = [\"/sys/fs/cgroup/agents/*\"]\n[policy.connect]\ndefault = \"ask\"\nallow = [\"api.github.com:443\", \"10.0.0.0/8:443\"]\ndeny = [\"*.paste.example\", \"10.66.0.0/16\"]\n",
        );
        let job = "/sys/fs/cgroup/agents/job-1";
        let cases = parse_cases(
            "cases.toml",
            "[[case]]\ncgroup = \"/sys/fs/cgroup/agents/j\"\nconnect = \"api.github.com:443\"\nexpect = \"allow\"\n\n[[case]]\ncgroup = \"/sys/fs/cgroup/agents/j\"\nconnect = \"192.0.2.7:443\"\nresolved = \"api.github.com\"\nexpect = \"allow\"\n\n[[case]]\ncgroup = \"/sys/fs/cgroup/agents/j\"\nconnect = \"10.66.0.1:443\"\nresolved = [\"api.github.com\"]\nexpect = \"deny\"\n",
        )
        .unwrap();
        let results = set.run_cases(cases);
        assert!(results.iter().all(|r| r.passed), "{results:#?}");
        assert_eq!(
            results[1].outcome.because,
            "connect rule allow api.github.com:443 (resolved api.github.com)"
        );
        let host = |host: &str, port| Example::ConnectHost {
            host: host.into(),
            port,
        };
        assert_eq!(
            outcome(&set, job, &host("x.paste.example", 443)),
            (
                Action::Deny,
                "connect rule deny *.paste.example (resolved x.paste.example)".to_owned()
            )
        );
        assert_eq!(
            outcome(&set, job, &host("api.github.com", 80)),
            (Action::Ask, "connect default ask".to_owned())
        );
        assert_eq!(
            errors(
                "[[case]]\ncgroup = \"/sys/fs/cgroup/a\"\nconnect = \"1.2.3.4:80\"\nresolved = [\"*.x.test\"]\nexpect = \"deny\"\n"
            ),
            [
                "cases.toml:4:13: resolved \"*.x.test\" is not a host name; write the name the workload looked up, e.g. \"api.github.com\""
            ]
        );
    }

    #[test]
    fn results_say_whether_each_case_passed() {
        let set = policies(POLICY);
        let cases = parse_cases(
            "cases.toml",
            "[[case]]\ncgroup = \"/sys/fs/cgroup/agents/j\"\nconnect = \"127.0.0.1:80\"\nexpect = \"allow\"\n\n[[case]]\ncgroup = \"/sys/fs/cgroup/agents/j\"\nconnect = \"1.1.1.1:80\"\nexpect = \"allow\"\n",
        )
        .unwrap();
        let results = set.run_cases(cases);
        assert_eq!(
            results.iter().map(|r| r.passed).collect::<Vec<_>>(),
            [true, false]
        );
        assert_eq!(results[1].outcome.action, Action::Deny);
        assert_eq!(results[1].outcome.policy.as_deref(), Some("agents"));
    }

    #[test]
    fn cases_files_sit_beside_policies_without_being_loaded_as_policies() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("agents.toml"), POLICY).unwrap();
        fs::write(
            dir.path().join("agents.cases.toml"),
            "[[case]]\ncgroup = \"/sys/fs/cgroup/agents/j\"\nunix = \"@bus\"\nexpect = \"ask\"\n",
        )
        .unwrap();
        let set = PolicySet::load_dir(dir.path()).expect("the cases file is not a policy");
        assert_eq!(set.policies.len(), 1);
        let cases = load_cases(&[dir.path().to_path_buf()]).expect("cases");
        assert_eq!(cases.len(), 1);
        assert!(set.run_cases(cases)[0].passed);
        let empty = tempfile::tempdir().unwrap();
        let error = load_cases(&[empty.path().to_path_buf()]).unwrap_err();
        assert!(
            std::error::Error::source(&error).is_some_and(
                |source| source.to_string() == "no *.cases.toml file in this directory"
            ),
            "{error:?}"
        );
    }
}
