//! Warnings: where a valid policy cannot keep its promise on this host.
//!
//! A policy can be well-formed and still promise more than the kernel can
//! hold. The exec hook matches the identity of the file being executed, so:
//!
//! - a **deny-list under `default = "allow"`** holds only for the very files
//!   it names: a copy or a rebuild of a denied program is a new file no rule
//!   names, and the default lets it run ([`WarningKind::DenyListUnderAllow`]);
//! - a rule on a path that **does not exist** here, or that is not a regular
//!   file, matches nothing ([`WarningKind::MissingPath`],
//!   [`WarningKind::NotAFile`]);
//! - a deny or ask rule on a **script** (a file starting with `#!`, or any
//!   file that is not an ELF binary) holds only when the script is exec'ed
//!   or named to an interpreter the policy lists (`interpreters`): `sh <
//!   denied.sh`, or an interpreter the policy does not list, reads the
//!   script as data ([`WarningKind::Script`]);
//! - a **host-name deny-list under connect `default = "allow"`** holds only
//!   for addresses the workload resolved those names to in DNS answers the
//!   agent saw: a hard-coded address, DNS over HTTPS, or a resolver it does
//!   not watch reaches the same host under the default
//!   ([`WarningKind::HostDenyListUnderAllow`]);
//! - an **`AF_UNIX` deny-list under `unix = "allow"`** holds only for the
//!   names it lists: a symlink, hard link or bind mount of the socket, or a
//!   relative name, reaches it under `unix`
//!   ([`WarningKind::UnixDenyListUnderAllow`]).
//!
//! Warnings never make a policy invalid; `gatekeep policy validate` prints
//! them (and fails on them with `--deny-warnings`), and the agent logs them
//! when it loads the policy. The checks read the files the rules name, so
//! they describe the host they run on.

use std::{
    fmt,
    fs::{self, File},
    io::{self, Read as _},
    path::Path,
};

use serde::Serialize;

use crate::{
    model::{Action, ExecPolicy, ExecRule, Policy, PolicySet, UnlistedMappings},
    parse::Pos,
};

/// How many bytes of a rule's file are read to tell an ELF binary from a
/// script: the ELF magic, or a `#!` line (the kernel itself reads at most
/// 256 bytes of it, `BINPRM_BUF_SIZE`).
const HEAD_LEN: usize = 256;

/// What a policy cannot keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WarningKind {
    /// Exec rules deny or ask named files while `default = "allow"`: any copy
    /// or rebuild of those programs escapes them.
    DenyListUnderAllow,
    /// An exec rule names a path that does not exist on this host.
    MissingPath,
    /// An exec rule names a directory or another file that cannot be
    /// executed.
    NotAFile,
    /// An exec rule's file could not be read to check it (permissions).
    Unreadable,
    /// A deny or ask rule names a script, or another file that is not an ELF
    /// binary: an interpreter can run it without exec'ing it.
    Script,
    /// An allow-list (`default = "deny"`) that lets files no rule names be
    /// mapped as code (`unlisted_mappings = "allow"`): a program it allows
    /// can load code it does not list (`dlopen`, `LD_PRELOAD`).
    UnlistedMappingsUnderAllowList,
    /// Host-name rules deny or ask while connect's `default = "allow"`: an
    /// address reached without a DNS answer the agent saw escapes them.
    HostDenyListUnderAllow,
    /// `unix:` rules deny or ask while `unix = "allow"`: another name for
    /// the same socket escapes them.
    UnixDenyListUnderAllow,
}

impl WarningKind {
    /// The name in JSON output and logs: `deny-list-under-allow`,
    /// `missing-path`, `not-a-file`, `unreadable`, `script`,
    /// `unlisted-mappings-under-allow-list`, `host-deny-list-under-allow`,
    /// `unix-deny-list-under-allow`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            WarningKind::DenyListUnderAllow => "deny-list-under-allow",
            WarningKind::MissingPath => "missing-path",
            WarningKind::NotAFile => "not-a-file",
            WarningKind::Unreadable => "unreadable",
            WarningKind::Script => "script",
            WarningKind::UnlistedMappingsUnderAllowList => "unlisted-mappings-under-allow-list",
            WarningKind::HostDenyListUnderAllow => "host-deny-list-under-allow",
            WarningKind::UnixDenyListUnderAllow => "unix-deny-list-under-allow",
        }
    }
}

impl fmt::Display for WarningKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a rule is written: file, 1-based line and column (in characters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// One thing a valid policy cannot keep, with its cause and its fix.
///
/// `message` holds paths and file text as they are: escape it before it
/// reaches a terminal. `Display` gives `file:line:column: message` (or the
/// message alone when the location is unknown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    pub kind: WarningKind,
    /// The policy's name.
    pub policy: String,
    /// The exec rules concerned, in file order: one, or for
    /// [`WarningKind::DenyListUnderAllow`] every deny and ask rule (none for
    /// the warnings about a whole policy or its connect rules).
    pub rules: Vec<ExecRule>,
    /// Where the (first) rule is written; `None` for a policy checked
    /// without its file positions ([`PolicySet::warnings`]).
    pub at: Option<Location>,
    /// Cause and fix, one line.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.at {
            Some(at) => write!(f, "{at}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl PolicySet {
    /// Every [`Warning`] of every policy, in load order, checked against
    /// this host's files. Locations are unknown here; `validate_paths` gives
    /// them.
    #[must_use]
    pub fn warnings(&self) -> Vec<Warning> {
        self.policies
            .iter()
            .flat_map(|policy| policy_warnings(policy, None))
            .collect()
    }
}

impl Policy {
    /// This policy's [`Warning`]s, checked against this host's files.
    #[must_use]
    pub fn warnings(&self) -> Vec<Warning> {
        policy_warnings(self, None)
    }
}

/// Where a policy's rules are written, one position per rule.
#[derive(Clone, Copy)]
pub(crate) struct Places<'a> {
    pub exec: &'a [Pos],
    pub hosts: &'a [Pos],
    pub unix: &'a [Pos],
}

fn location(pos: &Pos) -> Location {
    Location {
        file: pos.file.clone(),
        line: pos.line,
        column: pos.column,
    }
}

/// One policy's warnings; `places` are where its rules are written, when
/// known.
pub(crate) fn policy_warnings(policy: &Policy, places: Option<Places<'_>>) -> Vec<Warning> {
    let at = |index: usize| {
        places
            .and_then(|places| places.exec.get(index))
            .map(location)
    };
    let host_at = |index: usize| {
        places
            .and_then(|places| places.hosts.get(index))
            .map(location)
    };
    let mut warnings = Vec::new();
    let exec = &policy.exec;

    let restricted: Vec<usize> = (0..exec.rules.len())
        .filter(|&index| exec.rules[index].action != Action::Allow)
        .collect();
    if exec.default == Action::Allow && !restricted.is_empty() {
        let listed: Vec<String> = restricted
            .iter()
            .map(|&index| {
                let rule = &exec.rules[index];
                format!("{} \"{}\"", rule.action, rule.path.display())
            })
            .collect();
        warnings.push(Warning {
            kind: WarningKind::DenyListUnderAllow,
            policy: policy.name.clone(),
            rules: restricted
                .iter()
                .map(|&index| exec.rules[index].clone())
                .collect(),
            at: at(restricted[0]),
            message: format!(
                "policy \"{}\": exec default is allow, so {} hold{} only for the file{} named: a copy or a rebuild of {} is a new file that no rule names, and it runs; write default = \"deny\" (or \"ask\") under [policy.exec] and list the programs the workload may run under allow",
                policy.name,
                listed.join(", "),
                if listed.len() == 1 { "s" } else { "" },
                if listed.len() == 1 { "" } else { "s" },
                if listed.len() == 1 {
                    "that program"
                } else {
                    "any of those programs"
                },
            ),
        });
    }

    // Under `default = "ask"` listing every library would ask about each
    // mapping (a mapping is never paused: ask reads as deny); only an
    // allow-list proper is told.
    if exec.default == Action::Deny && exec.unlisted_mappings == UnlistedMappings::Allow {
        warnings.push(Warning {
            kind: WarningKind::UnlistedMappingsUnderAllowList,
            policy: policy.name.clone(),
            rules: Vec::new(),
            at: at(0),
            message: format!(
                "policy \"{}\": exec default is {}, but unlisted_mappings is allow: a program the policy allows can still map a file no rule names as code (dlopen, LD_PRELOAD, a library it downloads) and run it; write unlisted_mappings = \"default\" under [policy.exec] and list the libraries its programs load (ld.so and libc included) under allow",
                policy.name, exec.default
            ),
        });
    }

    let connect = &policy.connect;
    let restricted_hosts: Vec<usize> = (0..connect.hosts.len())
        .filter(|&index| connect.hosts[index].action != Action::Allow)
        .collect();
    if connect.default == Action::Allow && !restricted_hosts.is_empty() {
        let listed: Vec<String> = restricted_hosts
            .iter()
            .map(|&index| {
                let rule = &connect.hosts[index];
                format!("{} \"{}\"", rule.action, rule.target())
            })
            .collect();
        warnings.push(Warning {
            kind: WarningKind::HostDenyListUnderAllow,
            policy: policy.name.clone(),
            rules: Vec::new(),
            at: host_at(restricted_hosts[0]),
            message: format!(
                "policy \"{}\": connect default is allow, so {} hold{} only for addresses the workload resolved through DNS answers the agent saw: a hard-coded address, DNS over HTTPS or TLS, or a resolver the agent does not watch reaches the same host{} under the default; write default = \"deny\" (or \"ask\") under [policy.connect] and list what the workload may reach under allow",
                policy.name,
                listed.join(", "),
                if listed.len() == 1 { "s" } else { "" },
                if listed.len() == 1 { "" } else { "s" },
            ),
        });
    }

    warnings.extend(unix_deny_list_under_allow(policy, places));

    for (index, rule) in exec.rules.iter().enumerate() {
        if let Some((kind, message)) = check_file(&policy.name, exec, rule) {
            warnings.push(Warning {
                kind,
                policy: policy.name.clone(),
                rules: vec![rule.clone()],
                at: at(index),
                message,
            });
        }
    }
    warnings
}

/// [`WarningKind::UnixDenyListUnderAllow`], if `policy` earns it.
fn unix_deny_list_under_allow(policy: &Policy, places: Option<Places<'_>>) -> Option<Warning> {
    let connect = &policy.connect;
    let restricted: Vec<usize> = (0..connect.unix_rules.len())
        .filter(|&index| connect.unix_rules[index].action != Action::Allow)
        .collect();
    if connect.unix != Action::Allow || restricted.is_empty() {
        return None;
    }
    let listed: Vec<String> = restricted
        .iter()
        .map(|&index| {
            let rule = &connect.unix_rules[index];
            format!("{} \"{}\"", rule.action, rule.target())
        })
        .collect();
    Some(Warning {
        kind: WarningKind::UnixDenyListUnderAllow,
        policy: policy.name.clone(),
        rules: Vec::new(),
        at: places
            .and_then(|places| places.unix.get(restricted[0]))
            .map(location),
        message: format!(
            "policy \"{}\": unix is allow, so {} hold{} only for that name: a symlink, hard link or bind mount of the socket, or a relative name from its folder, reaches it under unix; write unix = \"deny\" (or \"ask\") under [policy.connect] and list the sockets the workload may use under allow",
            policy.name,
            listed.join(", "),
            if listed.len() == 1 { "s" } else { "" },
        ),
    })
}

/// What is wrong with the file one rule of `exec` names, if anything.
fn check_file(policy: &str, exec: &ExecPolicy, rule: &ExecRule) -> Option<(WarningKind, String)> {
    let path = rule.path.display();
    let named = format!("policy \"{policy}\": exec {} rule \"{path}\"", rule.action);
    let meta = match fs::metadata(&rule.path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Some((
                WarningKind::MissingPath,
                format!(
                    "{named} names a file that does not exist on this host (or a dangling symlink), so it matches nothing here until the file appears; correct the path (rules name the absolute path, $PATH is not searched), or remove the rule where the program is not installed"
                ),
            ));
        }
        Err(err) => return Some(unreadable(&named, &err)),
    };
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "a special file"
        };
        return Some((
            WarningKind::NotAFile,
            format!(
                "{named} names {what}, not a regular file, so no exec can match it; name the executable file itself"
            ),
        ));
    }
    if rule.action == Action::Allow {
        // Allowing a script keeps its promise: whatever runs it, it runs.
        return None;
    }
    let head = match read_head(&rule.path) {
        Ok(head) => head,
        Err(err) => return Some(unreadable(&named, &err)),
    };
    if head.starts_with(b"\x7fELF") {
        return None;
    }
    let message = match shebang(&head) {
        Some(line) => {
            let interpreter = interpreter(&line);
            let instead = if interpreter == interpreter_path(&line) {
                format!("{} \"{interpreter}\"", rule.action)
            } else {
                format!(
                    "{} the {interpreter} that `{}` finds in $PATH",
                    rule.action,
                    interpreter_path(&line)
                )
            };
            if lists_interpreter(exec, interpreter) {
                format!(
                    "{named} is a script (#!{line}): `{interpreter} {path}` meets the rule (the policy's interpreters), but {interpreter} can still read the script without being given its name (`{interpreter} < {path}`, `cat {path} | {interpreter}`), so the rule holds only as far as the interpreter is kept from the workload; restrict the interpreter too ({instead}, or a command rule on it)"
                )
            } else {
                format!(
                    "{named} is a script (#!{line}): running its interpreter on it (`{interpreter} {path}`) reads the script without exec'ing it, and {interpreter} is not among the policy's interpreters, so the rule does not hold; add the interpreter to `interpreters` under [policy.exec], or put the rule on the interpreter instead ({instead}), or deny that interpreter to the workload"
                )
            }
        }
        None => format!(
            "{named} is not an ELF binary and has no #! line: shells run such a file themselves when exec fails, and `sh {path}` (or the program binfmt_misc hands it to) reads it without exec'ing it, so the rule does not hold; put the rule on the program that runs it (e.g. {} \"/bin/sh\"), or deny that program to the workload",
            rule.action
        ),
    };
    Some((WarningKind::Script, message))
}

fn unreadable(named: &str, err: &io::Error) -> (WarningKind, String) {
    (
        WarningKind::Unreadable,
        format!(
            "{named} could not be checked ({err}); run the validation as the agent's user (root) to check it"
        ),
    )
}

/// The first bytes of a file (fewer if it is shorter).
fn read_head(path: &Path) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(HEAD_LEN);
    File::open(path)?
        .take(HEAD_LEN as u64)
        .read_to_end(&mut head)?;
    Ok(head)
}

/// The `#!` line without `#!`, trimmed (lossy UTF-8, as much as the kernel
/// reads), if the file starts with one.
fn shebang(head: &[u8]) -> Option<String> {
    let rest = head.strip_prefix(b"#!")?;
    let line = rest.split(|&byte| byte == b'\n').next().unwrap_or(rest);
    Some(String::from_utf8_lossy(line).trim().to_owned())
}

/// The interpreter's path as the `#!` line names it (`/bin/sh`, or
/// `/usr/bin/env`); `/bin/sh` when the line names none.
fn interpreter_path(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or("/bin/sh")
}

/// Whether `exec.interpreters` holds `interpreter` (a path, or a program
/// name that `env` looks up): by path, by the file it leads to, or by name.
fn lists_interpreter(exec: &ExecPolicy, interpreter: &str) -> bool {
    let wanted = Path::new(interpreter);
    let real = fs::canonicalize(wanted).ok();
    exec.interpreters.iter().any(|listed| {
        if wanted.is_absolute() {
            listed == wanted || real.is_some() && fs::canonicalize(listed).ok() == real
        } else {
            listed.file_name() == Some(wanted.as_os_str())
        }
    })
}

/// The program that really runs the script: the `#!` line's interpreter, or
/// for `#!/usr/bin/env [-S] python3` the program `env` looks up.
fn interpreter(line: &str) -> &str {
    let mut words = line.split_whitespace();
    let first = words.next().unwrap_or("/bin/sh");
    if Path::new(first)
        .file_name()
        .is_some_and(|name| name == "env")
        && let Some(program) = words.find(|word| !word.starts_with('-'))
    {
        return program;
    }
    first
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        path::{Path, PathBuf},
    };

    use super::*;
    use crate::{parse_str, validate_paths};

    /// A temporary folder with a copied ELF binary (`elf`, `elf2`), a
    /// `#!/bin/sh` script, an `env` script, a text file without `#!` and a
    /// directory.
    struct Host {
        dir: tempfile::TempDir,
    }

    impl Host {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            for name in ["elf", "elf2"] {
                fs::copy("/bin/true", dir.path().join(name)).expect("copy /bin/true");
            }
            fs::write(dir.path().join("denied.sh"), "#!/bin/sh\necho hi\n").expect("write");
            fs::write(
                dir.path().join("tool.py"),
                "#!/usr/bin/env -S python3 -u\nprint(1)\n",
            )
            .expect("write");
            fs::write(dir.path().join("plain"), "echo no shebang\n").expect("write");
            fs::create_dir(dir.path().join("subdir")).expect("mkdir");
            Self { dir }
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).display().to_string()
        }

        /// A policy with this `[policy.exec]` body; `{dir}` stands for the
        /// temporary folder.
        fn policy(&self, exec: &str) -> String {
            // Allow-lists here check their rules, not their mappings
            // (unless the test is about those).
            let mappings = if exec.contains("unlisted_mappings") {
                ""
            } else {
                "unlisted_mappings = \"default\"\n"
            };
            format!(
                "[[policy]]\nname = \"agents\"\ncgroups = [\"/sys/fs/cgroup/agents\"]\n[policy.exec]\n{}{mappings}",
                exec.replace("{dir}", &self.dir.path().display().to_string())
            )
        }

        fn warnings(&self, exec: &str) -> Vec<Warning> {
            parse_str("agents.toml", &self.policy(exec))
                .expect("valid policy")
                .warnings()
        }

        /// Writes the policy to `agents.toml` and validates it, locations
        /// included.
        fn validate(&self, exec: &str) -> Vec<Warning> {
            let file = self.dir.path().join("agents.toml");
            fs::write(&file, self.policy(exec)).expect("write");
            validate_paths(&[file]).expect("valid").warnings
        }
    }

    fn kinds(warnings: &[Warning]) -> Vec<WarningKind> {
        warnings.iter().map(|w| w.kind).collect()
    }

    fn rule_paths(warning: &Warning) -> Vec<PathBuf> {
        warning.rules.iter().map(|r| r.path.clone()).collect()
    }

    #[test]
    fn an_allow_list_under_default_deny_or_ask_keeps_its_promise() {
        let host = Host::new();
        for default in ["deny", "ask"] {
            let warnings = host.validate(&format!(
                "default = \"{default}\"\nallow = [\"{{dir}}/elf\", \"{{dir}}/denied.sh\"]\ndeny = [\"{{dir}}/elf2\"]\n"
            ));
            assert_eq!(warnings, [], "default {default}");
        }
        // No exec rules at all: nothing to warn about, whatever the default.
        assert_eq!(host.warnings("default = \"allow\"\n"), []);
        // Only allow rules under default allow: redundant, but no promise broken.
        assert_eq!(host.warnings("allow = [\"{dir}/elf\"]\n"), []);
    }

    #[test]
    fn an_allow_list_that_lets_unlisted_files_be_mapped_as_code_says_so_and_the_fix() {
        let host = Host::new();
        let warnings = host.validate(
            "default = \"deny\"\nallow = [\"{dir}/elf\"]\nunlisted_mappings = \"allow\"\n",
        );
        assert_eq!(
            kinds(&warnings),
            [WarningKind::UnlistedMappingsUnderAllowList]
        );
        let warning = &warnings[0];
        assert!(warning.rules.is_empty());
        let at = warning.at.as_ref().expect("located at the first rule");
        assert_eq!((at.line, at.column), (6, 10), "{at}");
        assert!(
            warning.message.contains("exec default is deny")
                && warning
                    .message
                    .contains("write unlisted_mappings = \"default\""),
            "{}",
            warning.message
        );
        // Under default allow there is no allow-list to bypass; under ask,
        // every library would have to be listed.
        for default in ["allow", "ask"] {
            let policy = format!("default = \"{default}\"\nunlisted_mappings = \"allow\"\n");
            assert_eq!(host.warnings(&policy), [], "default {default}");
        }
    }

    #[test]
    fn a_deny_list_under_default_allow_names_its_rules_and_the_fix() {
        let host = Host::new();
        let warnings = host
            .validate("default = \"allow\"\nallow = [\"{dir}/elf\"]\ndeny = [\"{dir}/elf2\"]\n");
        assert_eq!(kinds(&warnings), [WarningKind::DenyListUnderAllow]);
        let warning = &warnings[0];
        assert_eq!(warning.policy, "agents");
        assert_eq!(rule_paths(warning), [PathBuf::from(host.path("elf2"))]);
        assert_eq!(warning.rules[0].action, Action::Deny);
        let at = warning.at.as_ref().expect("located");
        assert!(at.file.ends_with("agents.toml"), "{at}");
        assert_eq!((at.line, at.column), (7, 9), "the deny rule");
        assert_eq!(
            warning.message,
            format!(
                "policy \"agents\": exec default is allow, so deny \"{}\" holds only for the file named: a copy or a rebuild of that program is a new file that no rule names, and it runs; write default = \"deny\" (or \"ask\") under [policy.exec] and list the programs the workload may run under allow",
                host.path("elf2")
            )
        );
        assert!(
            warning
                .to_string()
                .starts_with(&format!("{at}: policy \"agents\""))
        );
    }

    #[test]
    fn a_deny_list_warning_lists_every_deny_and_ask_rule() {
        let host = Host::new();
        // default left out is allow.
        let warnings = host.warnings("deny = [\"{dir}/elf2\"]\nask = [\"{dir}/elf\"]\n");
        assert_eq!(kinds(&warnings), [WarningKind::DenyListUnderAllow]);
        assert_eq!(
            rule_paths(&warnings[0]),
            [
                PathBuf::from(host.path("elf2")),
                PathBuf::from(host.path("elf"))
            ]
        );
        assert_eq!(warnings[0].at, None, "no positions without the file");
        assert!(
            warnings[0].message.contains(&format!(
                "deny \"{}\", ask \"{}\" hold only for the files named",
                host.path("elf2"),
                host.path("elf")
            )),
            "{}",
            warnings[0].message
        );
    }

    #[test]
    fn an_elf_binary_gets_no_script_warning() {
        let host = Host::new();
        let warnings =
            host.warnings("default = \"deny\"\ndeny = [\"{dir}/elf\"]\nask = [\"{dir}/elf2\"]\n");
        assert_eq!(warnings, []);
    }

    #[test]
    fn a_missing_path_names_the_rule_the_path_and_the_fix() {
        let host = Host::new();
        let warnings =
            host.validate("default = \"deny\"\nallow = [\"{dir}/elf\", \"{dir}/gone\"]\n");
        assert_eq!(kinds(&warnings), [WarningKind::MissingPath]);
        let warning = &warnings[0];
        assert_eq!(rule_paths(warning), [PathBuf::from(host.path("gone"))]);
        assert_eq!(warning.rules[0].action, Action::Allow);
        let at = warning.at.as_ref().expect("located");
        assert_eq!(at.line, 6);
        assert_eq!(
            at.column,
            10 + host.path("elf").chars().count() + 4,
            "the second item of the list"
        );
        assert!(
            warning.message.starts_with(&format!(
                "policy \"agents\": exec allow rule \"{}\" names a file that does not exist on this host",
                host.path("gone")
            )),
            "{}",
            warning.message
        );
        assert!(
            warning.message.contains("correct the path"),
            "{}",
            warning.message
        );

        // A dangling symlink is missing too; a symlink to an ELF binary is fine.
        std::os::unix::fs::symlink(host.path("nowhere"), host.path("dangling")).expect("symlink");
        std::os::unix::fs::symlink(host.path("elf"), host.path("link")).expect("symlink");
        let warnings =
            host.warnings("default = \"deny\"\ndeny = [\"{dir}/dangling\", \"{dir}/link\"]\n");
        assert_eq!(kinds(&warnings), [WarningKind::MissingPath]);
        assert_eq!(
            rule_paths(&warnings[0]),
            [PathBuf::from(host.path("dangling"))]
        );
    }

    #[test]
    fn a_directory_is_not_a_file() {
        let host = Host::new();
        let warnings = host.warnings("default = \"deny\"\nallow = [\"{dir}/subdir\"]\n");
        assert_eq!(kinds(&warnings), [WarningKind::NotAFile]);
        assert!(
            warnings[0]
                .message
                .contains("names a directory, not a regular file"),
            "{}",
            warnings[0].message
        );
    }

    #[test]
    fn a_deny_or_ask_rule_on_a_shell_script_names_the_interpreter_and_the_fix() {
        let host = Host::new();
        for action in ["deny", "ask"] {
            // /bin/sh is not among this policy's interpreters: `sh script`
            // itself gets around the rule.
            let warnings = host.validate(&format!(
                "default = \"deny\"\ninterpreters = [\"/usr/bin/perl\"]\nallow = [\"/bin/sh\"]\n{action} = [\"{{dir}}/denied.sh\"]\n"
            ));
            assert_eq!(kinds(&warnings), [WarningKind::Script], "{action}");
            let warning = &warnings[0];
            assert_eq!(rule_paths(warning), [PathBuf::from(host.path("denied.sh"))]);
            assert_eq!(warning.at.as_ref().map(|at| at.line), Some(8));
            let script = host.path("denied.sh");
            assert_eq!(
                warning.message,
                format!(
                    "policy \"agents\": exec {action} rule \"{script}\" is a script (#!/bin/sh): running its interpreter on it (`/bin/sh {script}`) reads the script without exec'ing it, and /bin/sh is not among the policy's interpreters, so the rule does not hold; add the interpreter to `interpreters` under [policy.exec], or put the rule on the interpreter instead ({action} \"/bin/sh\"), or deny that interpreter to the workload"
                )
            );
        }
    }

    #[test]
    fn a_script_whose_interpreter_is_listed_is_told_what_still_gets_around_it() {
        let host = Host::new();
        // The default interpreters hold /bin/sh: `sh script` meets the
        // rule, reading the script from standard input does not.
        let warnings = host
            .validate("default = \"deny\"\nallow = [\"/bin/sh\"]\nask = [\"{dir}/denied.sh\"]\n");
        assert_eq!(kinds(&warnings), [WarningKind::Script]);
        let script = host.path("denied.sh");
        assert_eq!(
            warnings[0].message,
            format!(
                "policy \"agents\": exec ask rule \"{script}\" is a script (#!/bin/sh): `/bin/sh {script}` meets the rule (the policy's interpreters), but /bin/sh can still read the script without being given its name (`/bin/sh < {script}`, `cat {script} | /bin/sh`), so the rule holds only as far as the interpreter is kept from the workload; restrict the interpreter too (ask \"/bin/sh\", or a command rule on it)"
            )
        );
    }

    #[test]
    fn an_env_script_names_the_program_env_runs() {
        let host = Host::new();
        for (interpreters, said) in [
            ("", "meets the rule (the policy's interpreters)"),
            (
                "interpreters = [\"/bin/sh\"]\n",
                "python3 is not among the policy's interpreters",
            ),
        ] {
            let warnings = host.warnings(&format!(
                "default = \"ask\"\n{interpreters}deny = [\"{{dir}}/tool.py\"]\n"
            ));
            assert_eq!(kinds(&warnings), [WarningKind::Script]);
            let message = &warnings[0].message;
            assert!(
                message.contains(&format!("`python3 {}`", host.path("tool.py"))),
                "{message}"
            );
            assert!(message.contains(said), "{message}");
            assert!(
                message.contains("(deny the python3 that `/usr/bin/env` finds in $PATH"),
                "{message}"
            );
        }
    }

    #[test]
    fn host_rules_stricter_than_a_connect_default_of_allow_are_warned_about() {
        let host = Host::new();
        let connect = |body: &str| {
            let file = host.dir.path().join("hosts.toml");
            fs::write(
                &file,
                format!(
                    "[[policy]]\nname = \"agents\"\ncgroups = [\"/sys/fs/cgroup/agents\"]\n[policy.connect]\n{body}"
                ),
            )
            .expect("write");
            validate_paths(&[file]).expect("valid").warnings
        };
        let warnings = connect(
            "default = \"allow\"\nallow = [\"api.github.com:443\"]\ndeny = [\"*.paste.example\"]\nask = [\"10.0.0.0/8\", \"upload.example.com:443\"]\n",
        );
        assert_eq!(kinds(&warnings), [WarningKind::HostDenyListUnderAllow]);
        let warning = &warnings[0];
        assert!(warning.rules.is_empty());
        // The first stricter host rule, as written.
        assert_eq!(
            warning.at.as_ref().map(|at| (at.line, at.column)),
            Some((7, 9))
        );
        assert_eq!(
            warning.message,
            "policy \"agents\": connect default is allow, so deny \"*.paste.example\", ask \"upload.example.com:443\" hold only for addresses the workload resolved through DNS answers the agent saw: a hard-coded address, DNS over HTTPS or TLS, or a resolver the agent does not watch reaches the same hosts under the default; write default = \"deny\" (or \"ask\") under [policy.connect] and list what the workload may reach under allow"
        );
        // An allow-list of hosts, or host rules under a stricter default,
        // keep their promise.
        for body in [
            "default = \"allow\"\nallow = [\"api.github.com:443\"]\n",
            "default = \"deny\"\ndeny = [\"*.paste.example\"]\n",
            "default = \"ask\"\ndeny = [\"*.paste.example\"]\n",
        ] {
            assert_eq!(kinds(&connect(body)), [], "{body}");
        }
    }

    #[test]
    fn unix_deny_rules_under_unix_allow_are_told_that_another_name_escapes_them() {
        let host = Host::new();
        let connect = |body: &str| {
            let file = host.dir.path().join("unix.toml");
            fs::write(
                &file,
                format!(
                    "[[policy]]\nname = \"agents\"\ncgroups = [\"/sys/fs/cgroup/agents\"]\n[policy.connect]\n{body}"
                ),
            )
            .expect("write");
            validate_paths(&[file]).expect("valid").warnings
        };
        let warnings = connect(
            "unix = \"allow\"\nallow = [\"unix:/run/ok.sock\"]\ndeny = [\"unix:/run/docker.sock\"]\n",
        );
        assert_eq!(kinds(&warnings), [WarningKind::UnixDenyListUnderAllow]);
        assert_eq!(
            warnings[0].at.as_ref().map(|at| (at.line, at.column)),
            Some((7, 9))
        );
        assert_eq!(
            warnings[0].message,
            "policy \"agents\": unix is allow, so deny \"unix:/run/docker.sock\" holds only for that name: a symlink, hard link or bind mount of the socket, or a relative name from its folder, reaches it under unix; write unix = \"deny\" (or \"ask\") under [policy.connect] and list the sockets the workload may use under allow"
        );
        for body in [
            "unix = \"deny\"\nallow = [\"unix:/run/ok.sock\"]\n",
            "unix = \"ask\"\ndeny = [\"unix:/run/docker.sock\"]\n",
        ] {
            assert_eq!(kinds(&connect(body)), [], "{body}");
        }
    }

    #[test]
    fn a_file_that_is_neither_elf_nor_a_script_is_run_by_a_shell() {
        let host = Host::new();
        let warnings = host.warnings("default = \"deny\"\ndeny = [\"{dir}/plain\"]\n");
        assert_eq!(kinds(&warnings), [WarningKind::Script]);
        assert!(
            warnings[0]
                .message
                .contains("is not an ELF binary and has no #! line"),
            "{}",
            warnings[0].message
        );
    }

    #[test]
    fn an_allow_rule_on_a_script_keeps_its_promise() {
        let host = Host::new();
        assert_eq!(
            host.warnings("default = \"deny\"\nallow = [\"{dir}/denied.sh\", \"{dir}/plain\"]\n"),
            []
        );
    }

    #[test]
    fn warnings_of_one_policy_come_in_order_deny_list_first_then_rule_by_rule() {
        let host = Host::new();
        let warnings =
            host.validate("deny = [\"{dir}/denied.sh\", \"{dir}/gone\"]\nask = [\"{dir}/elf\"]\n");
        assert_eq!(
            kinds(&warnings),
            [
                WarningKind::DenyListUnderAllow,
                WarningKind::Script,
                WarningKind::MissingPath
            ]
        );
        assert_eq!(warnings[0].rules.len(), 3);
        let json = serde_json::to_value(&warnings[2]).expect("json");
        assert_eq!(json["kind"], "missing-path");
        assert_eq!(json["policy"], "agents");
        assert_eq!(json["rules"][0]["path"], host.path("gone"));
        assert_eq!(json["rules"][0]["action"], "deny");
        assert_eq!(json["at"]["line"], 5);
    }

    #[test]
    fn shebang_parsing() {
        assert_eq!(shebang(b"#!/bin/sh -e\nx").as_deref(), Some("/bin/sh -e"));
        assert_eq!(
            shebang(b"#! /usr/bin/perl").as_deref(),
            Some("/usr/bin/perl")
        );
        assert_eq!(shebang(b"\x7fELF"), None);
        assert_eq!(interpreter("/usr/bin/env python3"), "python3");
        assert_eq!(interpreter("/usr/bin/env -S node --x"), "node");
        assert_eq!(interpreter("/usr/bin/env"), "/usr/bin/env");
        assert_eq!(interpreter(""), "/bin/sh");
        assert_eq!(interpreter_path("/bin/bash -eu"), "/bin/bash");
        assert!(Path::new("/bin/true").exists(), "tests need /bin/true");
    }
}
