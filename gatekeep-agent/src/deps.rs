//! What the agent needs in order to release a paused task must not be something it can
//! pause. The kernel serves every filesystem but one kind: a FUSE filesystem is answered by
//! a process, and if that process sits in a gated cgroup, the agent may pause it, then block
//! in the kernel writing its audit log or reading its state there, and nobody resumes
//! either (threat model, section 19). A configuration like that is refused at start.
//!
//! The agent's other dependencies are bounded where they are used: the log goes through a
//! lossy queue (`main.rs`), name lookups wait at most half a second (`pause::enrich`), and
//! every exchange with the decision service ends at the request's deadline.

use std::path::{Path, PathBuf};

use nix::sys::statfs::{FUSE_SUPER_MAGIC, statfs};

use crate::config::AgentConfig;

/// A path the agent needs that lives on a filesystem served by a process.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} `{}` is on a FUSE filesystem: the process serving it could be paused by \
     gatekeep while the agent waits on it, and then nothing resumes either; move it to \
     a filesystem the kernel serves (ext4, xfs, tmpfs...)",
    path.display()
)]
pub struct ServedByAProcess {
    pub what: &'static str,
    pub path: PathBuf,
}

/// Refuses a configuration whose audit log, state or policy folder is on FUSE.
pub fn check_paths(config: &AgentConfig) -> Result<(), ServedByAProcess> {
    refuse_fuse(&[
        ("the audit log (`audit_db`)", &config.audit_db),
        ("the state folder (`state_dir`)", &config.state_dir),
        ("the policy folder (`policy_dir`)", &config.policy_dir),
    ])
}

/// Refuses any of `paths` (what, path) that is on FUSE. A path that does not exist yet is
/// judged by its nearest existing ancestor, where it will be created.
pub fn refuse_fuse(paths: &[(&'static str, &Path)]) -> Result<(), ServedByAProcess> {
    for &(what, path) in paths {
        let existing = path.ancestors().find(|p| p.exists()).unwrap_or(path);
        if is_fuse(existing) {
            return Err(ServedByAProcess {
                what,
                path: path.to_owned(),
            });
        }
    }
    Ok(())
}

/// Whether `path` is on FUSE; a path that cannot be examined is not (the open that
/// follows reports its error).
fn is_fuse(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == FUSE_SUPER_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_filesystems_pass_even_for_paths_that_do_not_exist_yet() {
        let dir = tempfile::tempdir().expect("tempdir");
        let later = dir.path().join("state/not/yet/audit.db");
        refuse_fuse(&[("the audit log", &later), ("the state folder", dir.path())])
            .expect("a local filesystem is fine");
    }

    #[test]
    fn the_refusal_names_the_path_the_cause_and_the_fix() {
        let error = ServedByAProcess {
            what: "the audit log",
            path: PathBuf::from("/mnt/s3/audit.db"),
        };
        let text = error.to_string();
        assert!(text.starts_with("the audit log `/mnt/s3/audit.db` is on a FUSE filesystem"));
        assert!(text.contains("paused by gatekeep"), "{text}");
        assert!(
            text.contains("move it to a filesystem the kernel serves"),
            "{text}"
        );
    }
}
