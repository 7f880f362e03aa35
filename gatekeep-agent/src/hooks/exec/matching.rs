//! The user-space half of command-line rules, scripts run by interpreters and
//! applets of multi-call binaries (`[[policy.exec.command]]`, `interpreters`,
//! `multicall`).
//!
//! At policy load, the executables the matcher needs argv for
//! ([`ExecMatcher::needs_match`]) are compiled into `EXEC_RULES` with the
//! kernel's ask action: the kernel pauses their execs exactly as an ask
//! (argv and bound environment captured into the request digest, the
//! policy's `on_truncated` for an argv it cannot bind, audit mode reported
//! instead of paused). The agent then decides them here before any reviewer
//! hears of them ([`Matching::decide`]): an allow or a deny is answered at
//! once (a short local pause, recorded with the rule that decided), and only
//! an ask goes to the decision service. Every other executable is decided
//! in the kernel as before, at no added cost.
//!
//! A matched exec is decided here only while its file has the content the
//! rule was bound to, its argv is complete and valid UTF-8, and the task's
//! files can be read in time; otherwise the request goes to a reviewer as
//! the kernel asked it (never laxer).

use std::{
    collections::HashMap,
    fs,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Component, Path, PathBuf},
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use gatekeep_common::{ContentVersion, exec_rule_flags};
use gatekeep_policy::{Action, Decided, ExecMatcher, Resolved, operand_path};

use super::{ExecRequest, Via, kernel_dev};
use crate::pause::exe_path::within;

/// A file's identity as the kernel reports it: (device in the kernel's
/// encoding, inode).
pub type FileId = (u64, u64);

/// What one policy's exec compilation left for user-space matching.
#[derive(Debug, Clone, Default)]
pub struct Matching {
    pub matcher: Option<Arc<ExecMatcher<FileId>>>,
    /// The executables handed to user space, each with the content its rule
    /// was bound to when compiled and the rule's flags (`exec_rule_flags`).
    pub handed_over: HashMap<FileId, (ContentVersion, u32)>,
}

/// How long a decision may read the workload's files (its cwd, root and
/// script operand) before the request goes to a reviewer instead.
const DECIDE_WITHIN: Duration = Duration::from_secs(2);

/// Decisions reading files now (bounded like `exe_path`'s resolutions).
static RUNNING: AtomicUsize = AtomicUsize::new(0);

impl Matching {
    /// Whether the kernel hands execs of `file` to user space.
    #[must_use]
    pub fn handed_over(&self, file: FileId) -> bool {
        self.handed_over.contains_key(&file)
    }

    /// The decision for a paused exec the kernel handed over, or `None` when
    /// it is not one of those, or cannot be decided here (another content
    /// than the rule's, a truncated argv): a reviewer decides it then.
    /// `proc_root` is usually `/proc`.
    #[must_use]
    pub fn decide(&self, request: &ExecRequest, proc_root: &Path) -> Option<Decided> {
        let matcher = Arc::clone(self.matcher.as_ref()?);
        let file = (request.dev, request.ino);
        let bound = self.handed_over.get(&file)?;
        if !bound_to(bound, &request.content) || request.argv_truncated || request.via != Via::Exec
        {
            return None;
        }
        if request.filename.to_str().is_none()
            || request.argv.iter().any(|arg| arg.contains('\u{fffd}'))
        {
            // Lossily decoded: the words matched would not be the bytes the
            // program reads (a script named in other bytes could hide).
            return Some(not_text());
        }
        if request.interpreter {
            // The interpreter pass of a `#!` script (or a binfmt_misc
            // handler), as the kernel says: it checked the script itself by
            // identity just before, and now the interpreter, with the
            // script's argv. The interpreter's own decision applies (its
            // command rules speak of its own command lines).
            return Some(matcher.decide_own(&file));
        }
        let task = proc_root.join(request.origin.tid.to_string());
        let argv = request.argv.clone();
        within(&RUNNING, DECIDE_WITHIN, move || {
            let root = task.join("root");
            // Unreadable (the task is gone: an audit-mode report read late):
            // no name can be resolved, so scripts are not looked at.
            let cwd = fs::read_link(task.join("cwd")).ok();
            let resolve = |name: &str| match &cwd {
                Some(cwd) => identity_in(&root, cwd, name),
                None => Resolved::Missing,
            };
            matcher.decide(&file, &argv, &resolve)
        })
    }
}

/// Whether `now` is the content a rule was bound to, compared as the kernel
/// compares it (`bound_to` in `gatekeep-ebpf/src/hooks/exec.rs`): the inode
/// generation only where it was read from the file (tmpfs gives every inode
/// a random one the agent cannot read).
fn bound_to((bound, flags): &(ContentVersion, u32), now: &ContentVersion) -> bool {
    bound.ctime_sec == now.ctime_sec
        && bound.ctime_nsec == now.ctime_nsec
        && bound.size == now.size
        && (flags & exec_rule_flags::GENERATION == 0 || bound.generation == now.generation)
}

/// An argv or file name that is not UTF-8: asked.
fn not_text() -> Decided {
    Decided {
        action: Action::Ask,
        because: "exec command rules: argv or file name is not UTF-8, so it is asked".to_owned(),
    }
}

/// The identity of the file `name` names for a task whose root is reached at
/// `root` (`/proc/<tid>/root`) and whose cwd is `cwd` (in its own view):
/// symbolic links are followed in the task's view. A walk that enters
/// `/proc` (or `/dev/fd`, a link into it) is [`Resolved::Unknown`]: there
/// `self` and `fd/N` would name the agent's files, not the task's.
#[must_use]
pub fn identity_in(root: &Path, cwd: &Path, name: &str) -> Resolved<FileId> {
    let path = operand_path(cwd, name);
    let mut done = PathBuf::from("/");
    // Components still to walk, last first.
    let mut todo: Vec<std::ffi::OsString> = Vec::new();
    push_components(&mut todo, &path);
    let mut links = 0;
    while let Some(part) = todo.pop() {
        match part.as_bytes() {
            b"." => continue,
            b".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        let next = done.join(&part);
        if next.starts_with("/proc") || next.starts_with("/dev/fd") {
            return Resolved::Unknown;
        }
        let inside = root.join(next.strip_prefix("/").unwrap_or(&next));
        match fs::symlink_metadata(&inside) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                let Ok(target) = fs::read_link(&inside) else {
                    return Resolved::Missing;
                };
                if links > MAX_LINKS {
                    return Resolved::Missing;
                }
                if target.is_absolute() {
                    done = PathBuf::from("/");
                }
                push_components(&mut todo, &target);
            }
            Ok(meta) if todo.is_empty() => {
                return if meta.is_file() {
                    Resolved::File((kernel_dev(meta.dev()), meta.ino()))
                } else {
                    Resolved::Missing
                };
            }
            Ok(_) => done = next,
            Err(_) => return Resolved::Missing,
        }
    }
    Resolved::Missing
}

/// Most symbolic links followed (the kernel's `MAXSYMLINKS`).
const MAX_LINKS: usize = 40;

/// Pushes the components of `path` onto `todo` so the first is popped first.
fn push_components(todo: &mut Vec<std::ffi::OsString>, path: &Path) {
    let names: Vec<&std::ffi::OsStr> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name),
            Component::ParentDir => Some(std::ffi::OsStr::new("..")),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
        })
        .collect();
    todo.extend(names.into_iter().rev().map(ToOwned::to_owned));
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn id(path: &Path) -> FileId {
        let meta = fs::metadata(path).unwrap();
        (kernel_dev(meta.dev()), meta.ino())
    }

    #[test]
    fn content_is_compared_as_the_kernel_compares_it() {
        let bound = ContentVersion {
            ctime_sec: 10,
            ctime_nsec: 20,
            generation: 0,
            size: 129,
        };
        // tmpfs: a random generation the agent could not read.
        let now = ContentVersion {
            generation: 0x5eed,
            ..bound
        };
        assert!(bound_to(&(bound, 0), &now));
        assert!(!bound_to(&(bound, exec_rule_flags::GENERATION), &now));
        let rewritten = ContentVersion {
            ctime_nsec: 21,
            ..now
        };
        assert!(!bound_to(&(bound, 0), &rewritten));
    }

    #[test]
    fn operands_resolve_in_the_tasks_root_and_cwd() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("srv/app")).unwrap();
        fs::write(root.join("srv/app/deploy.sh"), "echo hi\n").unwrap();
        // An absolute link target starts again at the task's root.
        symlink("/srv/app/deploy.sh", root.join("srv/link.sh")).unwrap();
        let want = Resolved::File(id(&root.join("srv/app/deploy.sh")));
        let cwd = Path::new("/srv/app");
        assert_eq!(identity_in(root, cwd, "deploy.sh"), want);
        assert_eq!(identity_in(root, cwd, "./deploy.sh"), want);
        assert_eq!(identity_in(root, cwd, "../link.sh"), want);
        assert_eq!(identity_in(root, cwd, "/srv/link.sh"), want);
        assert_eq!(identity_in(root, cwd, "missing.sh"), Resolved::Missing);
        assert_eq!(
            identity_in(root, cwd, "/srv"),
            Resolved::Missing,
            "a directory is no script"
        );
        // Through /proc (`self`, `fd/N`) names the reader's files: unknown.
        symlink("/proc/self/fd/3", root.join("srv/app/fd3")).unwrap();
        fs::create_dir(root.join("dev")).unwrap();
        symlink("/proc/self/fd", root.join("dev/fd")).unwrap();
        assert_eq!(identity_in(root, cwd, "fd3"), Resolved::Unknown);
        assert_eq!(identity_in(root, cwd, "/dev/fd/3"), Resolved::Unknown);
        assert_eq!(identity_in(root, cwd, "/proc/self/fd/3"), Resolved::Unknown);
    }
}
