//! cgroup patterns: validation, matching and expansion over a cgroup2 mount.
//!
//! A pattern is written as an absolute path under `/sys/fs/cgroup` and may use
//! globs (`*`, `?`, `[abc]`, `{a,b}`, `**`); `*` and `?` never cross a `/`.
//! It is stored relative to the cgroup root (`agents/*` for
//! `/sys/fs/cgroup/agents/*`), so matching works on the cgroup names the
//! kernel reports (`/proc/PID/cgroup` says `0::/agents/job-1`) and expansion
//! can run against any mount point (a temporary directory in tests).
//!
//! A cgroup matched by a pattern is governed together with all its
//! descendants: a workload cannot escape its policy by creating a child
//! cgroup.

use std::{
    collections::BTreeSet,
    fmt, fs,
    path::{Component, Path, PathBuf},
};

use globset::{Glob, GlobBuilder, GlobMatcher};
use serde::{Serialize, Serializer};

/// Where cgroup v2 is mounted; every pattern is written under it.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A validated cgroup path or glob.
#[derive(Clone)]
pub struct CgroupPattern {
    /// As written, e.g. `/sys/fs/cgroup/agents/*`.
    written: String,
    /// Relative to the cgroup root, normalised, e.g. `agents/*`.
    relative: String,
    matcher: GlobMatcher,
}

/// Why a cgroup pattern was refused; `Display` is the diagnostic message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupPatternError {
    #[error(
        "cgroup pattern \"{pattern}\" is relative; write an absolute path under /sys/fs/cgroup, e.g. \"/sys/fs/cgroup/{pattern}\""
    )]
    Relative { pattern: String },
    #[error(
        "cgroup pattern \"{pattern}\" is not under /sys/fs/cgroup; cgroup v2 paths start with /sys/fs/cgroup/ (did you mean \"/sys/fs/cgroup{pattern}\"?)"
    )]
    NotUnderRoot { pattern: String },
    #[error(
        "cgroup pattern \"{pattern}\" is the cgroup root, which would gate every process on the host, gatekeep included; name a child cgroup such as /sys/fs/cgroup/agents"
    )]
    Root { pattern: String },
    #[error("cgroup pattern \"{pattern}\" contains `.` or `..`; write the plain path")]
    DotComponent { pattern: String },
    #[error("invalid glob in cgroup pattern \"{pattern}\": {reason}")]
    Glob { pattern: String, reason: String },
}

impl CgroupPattern {
    /// Validates a pattern as written in a policy file.
    pub fn new(written: &str) -> Result<Self, CgroupPatternError> {
        let pattern = || written.to_owned();
        if !written.starts_with('/') {
            return Err(CgroupPatternError::Relative { pattern: pattern() });
        }
        let Some(rest) = written.strip_prefix(CGROUP_ROOT) else {
            return Err(CgroupPatternError::NotUnderRoot { pattern: pattern() });
        };
        if !(rest.is_empty() || rest.starts_with('/')) {
            // e.g. /sys/fs/cgroup2/...
            return Err(CgroupPatternError::NotUnderRoot { pattern: pattern() });
        }
        let mut parts = Vec::new();
        for part in rest.split('/').filter(|part| !part.is_empty()) {
            if part == "." || part == ".." {
                return Err(CgroupPatternError::DotComponent { pattern: pattern() });
            }
            parts.push(part);
        }
        if parts.is_empty() {
            return Err(CgroupPatternError::Root { pattern: pattern() });
        }
        let relative = parts.join("/");
        let matcher = glob(&relative)
            .map_err(|reason| CgroupPatternError::Glob {
                pattern: pattern(),
                reason,
            })?
            .compile_matcher();
        Ok(Self {
            written: written.to_owned(),
            relative,
            matcher,
        })
    }

    /// The pattern as written, e.g. `/sys/fs/cgroup/agents/*`.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.written
    }

    /// The pattern relative to the cgroup root, e.g. `agents/*`; two patterns
    /// with the same relative form match exactly the same cgroups.
    #[must_use]
    pub fn relative(&self) -> &str {
        &self.relative
    }

    /// Whether the pattern names this very cgroup (not counting descendants;
    /// see [`CgroupPattern::covers`]).
    ///
    /// `cgroup` is the path relative to the cgroup root, as the kernel names
    /// it in `/proc/PID/cgroup`: `/agents/job-1` or `agents/job-1`.
    #[must_use]
    pub fn matches(&self, cgroup: &Path) -> bool {
        normalise(cgroup).is_some_and(|relative| self.matcher.is_match(relative))
    }

    /// Whether the pattern governs this cgroup: it matches the cgroup itself
    /// or one of its ancestors.
    #[must_use]
    pub fn covers(&self, cgroup: &Path) -> bool {
        cgroup.ancestors().any(|dir| self.matches(dir))
    }

    /// Existing cgroup directories under the mount point `root` that this
    /// pattern matches, sorted. Directories that vanish or cannot be read
    /// while listing (cgroups come and go) are skipped.
    #[must_use]
    pub fn expand(&self, root: &Path) -> Vec<PathBuf> {
        let mut frontier: BTreeSet<PathBuf> = BTreeSet::from([PathBuf::new()]);
        for part in self.relative.split('/') {
            let mut next = BTreeSet::new();
            for dir in &frontier {
                if part == "**" {
                    descendants(root, dir, &mut next);
                } else if is_literal(part) {
                    let candidate = dir.join(part);
                    if is_dir(&root.join(&candidate)) {
                        next.insert(candidate);
                    }
                } else {
                    // `*` and `?` stay within a component, so they can prune
                    // here; brackets and braces are left to the full match.
                    let component = simple_glob(part);
                    for child in children(root, dir) {
                        let keep = component.as_ref().is_none_or(|glob| {
                            child.file_name().is_some_and(|name| glob.is_match(name))
                        });
                        if keep {
                            next.insert(child);
                        }
                    }
                }
            }
            frontier = next;
        }
        frontier
            .into_iter()
            .filter(|relative| self.matches(relative))
            .map(|relative| root.join(relative))
            .collect()
    }
}

impl fmt::Debug for CgroupPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CgroupPattern").field(&self.written).finish()
    }
}

impl fmt::Display for CgroupPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.written)
    }
}

impl PartialEq for CgroupPattern {
    fn eq(&self, other: &Self) -> bool {
        self.written == other.written
    }
}

impl Eq for CgroupPattern {}

impl Serialize for CgroupPattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.written)
    }
}

fn glob(pattern: &str) -> Result<Glob, String> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|e| e.kind().to_string())
}

/// A matcher for one path component, when it only uses `*` and `?`.
fn simple_glob(part: &str) -> Option<GlobMatcher> {
    if part.contains(['[', ']', '{', '}', '\\']) {
        return None;
    }
    glob(part).ok().map(|glob| glob.compile_matcher())
}

fn is_literal(part: &str) -> bool {
    !part.contains(['*', '?', '[', ']', '{', '}', '\\'])
}

/// `cgroup` relative to the cgroup root without a leading `/`, or `None` if it
/// contains `.`/`..` or is the root itself.
fn normalise(cgroup: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for component in cgroup.components() {
        match component {
            Component::RootDir => {}
            Component::Normal(part) => parts.push(part.to_str()?),
            Component::Prefix(_) | Component::CurDir | Component::ParentDir => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Does not follow symlinks: cgroupfs has none, and a symlink elsewhere must
/// not make a pattern reach outside the mount.
fn is_dir(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|meta| meta.is_dir())
}

/// Child directories of `root/dir`, as paths relative to `root`.
fn children(root: &Path, dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root.join(dir)) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .map(|entry| dir.join(entry.file_name()))
        .collect()
}

/// `dir` and every directory below it, as paths relative to `root`.
fn descendants(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(next) = stack.pop() {
        stack.extend(children(root, &next));
        out.insert(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> CgroupPattern {
        CgroupPattern::new(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn refused(text: &str) -> String {
        match CgroupPattern::new(text) {
            Ok(p) => panic!("{text} accepted as {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn patterns_are_stored_relative_to_the_root() {
        assert_eq!(pattern("/sys/fs/cgroup/agents/*").relative(), "agents/*");
        assert_eq!(
            pattern("/sys/fs/cgroup//agents/job/").relative(),
            "agents/job"
        );
        assert_eq!(
            pattern("/sys/fs/cgroup/agents/*").as_str(),
            "/sys/fs/cgroup/agents/*"
        );
    }

    #[test]
    fn refuses_patterns_outside_the_cgroup_root() {
        assert_eq!(
            refused("agents/*"),
            "cgroup pattern \"agents/*\" is relative; write an absolute path under /sys/fs/cgroup, e.g. \"/sys/fs/cgroup/agents/*\""
        );
        assert_eq!(
            refused("/agents/*"),
            "cgroup pattern \"/agents/*\" is not under /sys/fs/cgroup; cgroup v2 paths start with /sys/fs/cgroup/ (did you mean \"/sys/fs/cgroup/agents/*\"?)"
        );
        assert!(refused("/sys/fs/cgroup2/agents").contains("is not under /sys/fs/cgroup"));
        assert!(refused("/sys/fs/cgroup/").contains("is the cgroup root"));
        assert!(refused("/sys/fs/cgroup").contains("is the cgroup root"));
        assert_eq!(
            refused("/sys/fs/cgroup/agents/../system.slice"),
            "cgroup pattern \"/sys/fs/cgroup/agents/../system.slice\" contains `.` or `..`; write the plain path"
        );
        assert!(
            refused("/sys/fs/cgroup/agents/[a")
                .starts_with("invalid glob in cgroup pattern \"/sys/fs/cgroup/agents/[a\": ")
        );
    }

    #[test]
    fn matching_uses_kernel_cgroup_names() {
        let star = pattern("/sys/fs/cgroup/agents/*");
        assert!(star.matches(Path::new("/agents/job-1")));
        assert!(star.matches(Path::new("agents/job-1")));
        assert!(!star.matches(Path::new("/agents")), "* needs one component");
        assert!(
            !star.matches(Path::new("/agents/job-1/child")),
            "* does not cross /"
        );
        assert!(!star.matches(Path::new("/other/job-1")));
        assert!(!star.matches(Path::new("/agents/../system.slice")));
        assert!(!star.matches(Path::new("/")));

        let scope = pattern("/sys/fs/cgroup/user.slice/user-*.slice/app-{claude,codex}-*.scope");
        assert!(scope.matches(Path::new("/user.slice/user-1000.slice/app-claude-42.scope")));
        assert!(!scope.matches(Path::new("/user.slice/user-1000.slice/app-vim-42.scope")));

        let deep = pattern("/sys/fs/cgroup/ci/**/runner");
        assert!(deep.matches(Path::new("/ci/runner")));
        assert!(deep.matches(Path::new("/ci/a/b/runner")));
        assert!(!deep.matches(Path::new("/ci/a/b/runner2")));
    }

    #[test]
    fn a_pattern_covers_descendants() {
        let exact = pattern("/sys/fs/cgroup/agents/job-1");
        assert!(exact.covers(Path::new("/agents/job-1")));
        assert!(exact.covers(Path::new("/agents/job-1/child/grandchild")));
        assert!(!exact.matches(Path::new("/agents/job-1/child")));
        assert!(!exact.covers(Path::new("/agents/job-10")));
        assert!(!exact.covers(Path::new("/agents")));
    }

    fn tree(dirs: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        for dir in dirs {
            fs::create_dir_all(root.path().join(dir)).expect("mkdir");
        }
        root
    }

    fn expanded(root: &Path, text: &str) -> Vec<String> {
        pattern(text)
            .expand(root)
            .into_iter()
            .map(|p| {
                p.strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn expansion_lists_existing_directories_only() {
        let root = tree(&[
            "agents/job-1/child",
            "agents/job-2",
            "agents/other",
            "system.slice/gatekeep.service",
            "user.slice/user-1000.slice/app-claude-1.scope",
            "user.slice/user-1000.slice/app-vim-1.scope",
            "user.slice/user-1001.slice/app-codex-7.scope",
            "ci/a/b/runner",
            "ci/runner",
        ]);
        // A regular file must never be listed.
        fs::write(root.path().join("agents/job-file"), "").expect("write");
        let root = root.path();

        assert_eq!(
            expanded(root, "/sys/fs/cgroup/agents/job-*"),
            ["agents/job-1", "agents/job-2"]
        );
        assert_eq!(
            expanded(root, "/sys/fs/cgroup/agents/*"),
            ["agents/job-1", "agents/job-2", "agents/other"]
        );
        assert_eq!(
            expanded(root, "/sys/fs/cgroup/agents/job-1"),
            ["agents/job-1"]
        );
        assert!(expanded(root, "/sys/fs/cgroup/agents/missing").is_empty());
        assert!(expanded(root, "/sys/fs/cgroup/agents/job-file").is_empty());
        assert_eq!(
            expanded(
                root,
                "/sys/fs/cgroup/user.slice/user-*.slice/app-{claude,codex}-*.scope"
            ),
            [
                "user.slice/user-1000.slice/app-claude-1.scope",
                "user.slice/user-1001.slice/app-codex-7.scope"
            ]
        );
        assert_eq!(
            expanded(root, "/sys/fs/cgroup/ci/**/runner"),
            ["ci/a/b/runner", "ci/runner"]
        );
        assert_eq!(
            expanded(root, "/sys/fs/cgroup/*/job-?"),
            ["agents/job-1", "agents/job-2"]
        );
    }
}
