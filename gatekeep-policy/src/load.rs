//! Loading policy files and directories, and the checks across files.

use std::{
    collections::HashMap,
    fmt, fs,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{
    error::{Diagnostic, PolicyError},
    model::PolicySet,
    parse::{ParsedPolicy, Pos, parse_file},
    warning::{Places, Warning, policy_warnings},
};

impl PolicySet {
    /// Loads every `*.toml` file directly in `dir` (for example
    /// `/etc/gatekeep/policies`), in file name order, except policy test
    /// files (`*.cases.toml`, see [`crate::load_cases`]).
    pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyError> {
        PolicySet::load_files(&policy_files(dir)?)
    }

    /// Loads the given files in the given order, reporting every problem of
    /// every file at once.
    pub fn load_files(paths: &[PathBuf]) -> Result<PolicySet, PolicyError> {
        load_sources(&read_sources(paths)?)
    }

    /// Loads policy files as `gatekeep policy validate` names them: each path
    /// is a file, or a directory whose policy files are taken in name order.
    pub fn load_paths(paths: &[PathBuf]) -> Result<PolicySet, PolicyError> {
        load_sources(&read_sources(&policy_paths(paths)?)?)
    }
}

/// `(name, text)` of each file, in order.
fn read_sources(paths: &[PathBuf]) -> Result<Vec<(String, String)>, PolicyError> {
    let mut sources = Vec::with_capacity(paths.len());
    for path in paths {
        let text = fs::read_to_string(path).map_err(|source| PolicyError::ReadFile {
            path: path.clone(),
            source,
        })?;
        sources.push((path.display().to_string(), text));
    }
    Ok(sources)
}

/// Parses and validates one policy file's text; `source_name` is how
/// diagnostics name the file.
pub fn parse_str(source_name: &str, text: &str) -> Result<PolicySet, PolicyError> {
    load_sources(&[(source_name.to_owned(), text.to_owned())])
}

/// What a valid set of policy files holds, for a CLI's one-line report:
/// `println!("ok: {summary}")` prints `ok: 2 policies, 9 exec rules, 4 connect rules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub files: usize,
    pub policies: usize,
    pub cgroup_patterns: usize,
    pub exec_rules: usize,
    pub connect_rules: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |count: usize, one: &str, many: &str| {
            format!("{count} {}", if count == 1 { one } else { many })
        };
        write!(
            f,
            "{}, {}, {}",
            plural(self.policies, "policy", "policies"),
            plural(self.exec_rules, "exec rule", "exec rules"),
            plural(self.connect_rules, "connect rule", "connect rules"),
        )
    }
}

/// What `gatekeep policy validate` reports about a valid set of files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Validation {
    pub summary: Summary,
    /// Where the policies cannot keep their promise on this host, each
    /// located in its file; in load order. Warnings never make a set invalid.
    pub warnings: Vec<Warning>,
}

/// Validates policy files for `gatekeep policy validate`: each path is a file,
/// or a directory whose `*.toml` files are taken in name order. The files are
/// checked together, as the agent would load them (duplicate names and cgroup
/// patterns are found across files); a valid set is then checked against this
/// host for [`Warning`]s.
pub fn validate_paths(paths: &[PathBuf]) -> Result<Validation, PolicyError> {
    let files = policy_paths(paths)?;
    let parsed = load_parsed(&read_sources(&files)?)?;
    let warnings = parsed
        .iter()
        .flat_map(|entry| {
            let places = Places {
                exec: &entry.exec_at,
                hosts: &entry.hosts_at,
                unix: &entry.unix_at,
            };
            policy_warnings(&entry.policy, Some(places))
        })
        .collect();
    let policies = parsed.iter().map(|entry| &entry.policy);
    Ok(Validation {
        summary: Summary {
            files: files.len(),
            policies: parsed.len(),
            cgroup_patterns: policies.clone().map(|p| p.cgroups.len()).sum(),
            exec_rules: policies.clone().map(|p| p.exec.rules.len()).sum(),
            connect_rules: policies.map(|p| p.connect.rules.len()).sum(),
        },
        warnings,
    })
}

/// The files `paths` name: each a file, or a directory's policy files (see
/// [`policy_files`]); each file once, in order.
fn policy_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, PolicyError> {
    let mut files: Vec<PathBuf> = Vec::new();
    for path in paths {
        let meta = fs::metadata(path).map_err(|source| PolicyError::ReadFile {
            path: path.clone(),
            source,
        })?;
        let found = if meta.is_dir() {
            policy_files(path)?
        } else {
            vec![path.clone()]
        };
        for file in found {
            if !files.contains(&file) {
                files.push(file);
            }
        }
    }
    Ok(files)
}

/// The suffix of policy test files ([`crate::load_cases`]), which may sit in
/// a policy directory without being loaded as policies.
pub(crate) const CASES_SUFFIX: &str = ".cases.toml";

/// The regular `*.toml` files directly in `dir` (symlinks followed), sorted by
/// name, except policy test files (`*.cases.toml`).
fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    toml_files(dir, |name| !name.ends_with(CASES_SUFFIX))
}

/// The policy test files (`*.cases.toml`) directly in `dir`, sorted by name.
pub(crate) fn cases_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    toml_files(dir, |name| name.ends_with(CASES_SUFFIX))
}

fn toml_files(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>, PolicyError> {
    let read_dir = |source| PolicyError::ReadDir {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_dir)? {
        let path = entry.map_err(read_dir)?.path();
        let is_toml = path.extension().is_some_and(|ext| ext == "toml");
        let kept = path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(&keep);
        if is_toml && kept && fs::metadata(&path).is_ok_and(|meta| meta.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Parses `(name, text)` sources in order and checks them as one set.
pub(crate) fn load_sources(sources: &[(String, String)]) -> Result<PolicySet, PolicyError> {
    Ok(PolicySet {
        policies: load_parsed(sources)?
            .into_iter()
            .map(|entry| entry.policy)
            .collect(),
    })
}

/// [`load_sources`], keeping where things were written.
fn load_parsed(sources: &[(String, String)]) -> Result<Vec<ParsedPolicy>, PolicyError> {
    let mut diagnostics = Vec::new();
    let mut parsed = Vec::new();
    for (name, text) in sources {
        parsed.extend(parse_file(name, text, &mut diagnostics));
    }
    check_set(&parsed, &mut diagnostics);
    if diagnostics.is_empty() {
        return Ok(parsed);
    }
    // Files in load order, each from top to bottom.
    let order: HashMap<&str, usize> = sources
        .iter()
        .enumerate()
        .map(|(index, (name, _))| (name.as_str(), index))
        .collect();
    diagnostics.sort_by_key(|d| (order.get(d.file.as_str()).copied(), d.line, d.column));
    Err(PolicyError::Invalid { diagnostics })
}

/// Checks across policies (and files): unique names, and no cgroup pattern
/// in two policies.
fn check_set(parsed: &[ParsedPolicy], diagnostics: &mut Vec<Diagnostic>) {
    let mut names: HashMap<&str, &Pos> = HashMap::new();
    let mut patterns: HashMap<&str, (&str, &Pos)> = HashMap::new();
    for entry in parsed {
        let name = entry.policy.name.as_str();
        if let Some(at) = &entry.name_at {
            if let Some(first) = names.get(name) {
                diagnostics.push(diagnostic(
                    at,
                    format!(
                        "duplicate policy name \"{name}\" (first defined at {first}); policy names must be unique across all policy files"
                    ),
                ));
            } else {
                names.insert(name, at);
            }
        }
        for (pattern, at) in entry.policy.cgroups.iter().zip(&entry.cgroups_at) {
            match patterns.get(pattern.relative()) {
                Some((owner, first)) => diagnostics.push(diagnostic(
                    at,
                    format!(
                        "cgroup pattern \"{pattern}\" is already used by policy \"{owner}\" ({first}); a cgroup can be governed by one policy only, so keep it in one of them"
                    ),
                )),
                None => {
                    patterns.insert(pattern.relative(), (name, at));
                }
            }
        }
    }
}

fn diagnostic(at: &Pos, message: String) -> Diagnostic {
    Diagnostic {
        file: at.file.clone(),
        line: at.line,
        column: at.column,
        message,
    }
}
