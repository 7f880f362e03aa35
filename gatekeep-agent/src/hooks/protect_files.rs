//! gatekeep's own files, protected from gated tasks by identity (issue 18,
//! item 3; the kernel side is gatekeep-ebpf `hooks/protect_files.rs`).
//!
//! [`protected_paths`] names what is protected and how; [`identities`]
//! resolves it to (device, inode) in the kernel's encoding, walking the
//! protected folders, at every compile (start, reload, rescan), so files
//! replaced since (a new inode) are covered again. Between two passes, a
//! file the agent makes in a protected folder is covered by the folder's
//! `CHILDREN_*` bits.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use gatekeep_common::protected_inode::{
    CHILDREN_NO_READ, CHILDREN_NO_WRITE, DIR_LOCKED, NO_READ, NO_WRITE,
};

use crate::{config::AgentConfig, hooks::exec::kernel_dev};

/// One protected path and its `protected_inode` bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedPath {
    pub path: PathBuf,
    pub flags: u32,
    /// A folder whose sub-folders (and their files) get the same bits.
    pub recursive: bool,
}

impl ProtectedPath {
    fn file(path: impl Into<PathBuf>, flags: u32) -> Self {
        Self {
            path: path.into(),
            flags,
            recursive: false,
        }
    }

    fn tree(path: impl Into<PathBuf>, flags: u32) -> Self {
        Self {
            path: path.into(),
            flags,
            recursive: true,
        }
    }
}

/// A folder nobody gated changes: nothing created, removed or renamed in
/// it, no file in it written; the folder itself not renamed or chmod'ed.
const LOCKED_DIR: u32 = DIR_LOCKED | CHILDREN_NO_WRITE | NO_WRITE;
/// A locked folder of secrets: nothing in it read either.
const SECRET_DIR: u32 = LOCKED_DIR | CHILDREN_NO_READ;

/// What gated tasks may not touch, from the agent's configuration:
/// - the configuration file (`config_file`; with its folder when that
///   folder also holds the policy folder, as `/etc/gatekeep` does);
/// - the policy folder, its files and sub-folders (no edit, no new policy);
/// - the state folder and everything in it (tokens, CA keys, grants,
///   `cli.toml`, the embedded service's databases): neither written nor read;
/// - the audit database's folder (the database and its `-wal`/`-journal`
///   files, including ones made later);
/// - the bpffs pin folder with its `links`/`maps` folders (no pin removed);
/// - gatekeep's binaries (`binaries`);
/// - the remote decision service's CA, certificate and key (the key secret).
#[must_use]
pub fn protected_paths(
    config: &AgentConfig,
    config_file: Option<&Path>,
    binaries: &[PathBuf],
) -> Vec<ProtectedPath> {
    let mut paths = Vec::new();
    if let Some(file) = config_file {
        paths.push(ProtectedPath::file(file, NO_WRITE));
        if let Some(dir) = file.parent()
            && config.policy_dir.parent() == Some(dir)
        {
            paths.push(ProtectedPath::file(dir, DIR_LOCKED | NO_WRITE));
        }
    }
    paths.push(ProtectedPath::tree(&config.policy_dir, LOCKED_DIR));
    paths.push(ProtectedPath::tree(&config.state_dir, SECRET_DIR));
    paths.push(ProtectedPath::file(&config.audit_db, NO_WRITE));
    if let Some(dir) = config.audit_db.parent() {
        paths.push(ProtectedPath::file(dir, LOCKED_DIR));
    }
    paths.push(ProtectedPath::tree(&config.pin_dir, LOCKED_DIR));
    for binary in binaries {
        paths.push(ProtectedPath::file(binary, NO_WRITE));
    }
    let decision = &config.decision;
    for file in [&decision.ca, &decision.cert].into_iter().flatten() {
        paths.push(ProtectedPath::file(file, NO_WRITE));
    }
    if let Some(key) = &decision.key {
        paths.push(ProtectedPath::file(key, NO_WRITE | NO_READ));
    }
    paths
}

/// gatekeep's binaries: the running agent's executable and the `gatekeep`,
/// `gatekeep-agent` and `gatekeep-server` beside it.
#[must_use]
pub fn own_binaries() -> Vec<PathBuf> {
    let Ok(exe) = std::env::current_exe() else {
        return Vec::new();
    };
    let mut binaries = vec![exe.clone()];
    if let Some(dir) = exe.parent() {
        for name in ["gatekeep", "gatekeep-agent", "gatekeep-server"] {
            let path = dir.join(name);
            if path.is_file() && path != exe {
                binaries.push(path);
            }
        }
    }
    binaries
}

/// The bits a folder's `CHILDREN_*` give each file directly inside.
fn child_bits(dir_flags: u32) -> u32 {
    let mut bits = 0;
    if dir_flags & CHILDREN_NO_WRITE != 0 {
        bits |= NO_WRITE;
    }
    if dir_flags & CHILDREN_NO_READ != 0 {
        bits |= NO_READ;
    }
    bits
}

/// (dev, ino) -> bits of every existing protected path (and, for trees,
/// every folder and file below). Paths that do not exist are skipped:
/// a later pass covers them once they do (and their folder meanwhile).
#[must_use]
pub fn identities(paths: &[ProtectedPath]) -> BTreeMap<(u64, u64), u32> {
    let mut out: BTreeMap<(u64, u64), u32> = BTreeMap::new();
    let mut add = |meta: &fs::Metadata, flags: u32| {
        *out.entry((kernel_dev(meta.dev()), meta.ino())).or_default() |= flags;
    };
    for protected in paths {
        // Symlinks followed: the protected thing is what the path reaches.
        let Ok(meta) = fs::metadata(&protected.path) else {
            continue;
        };
        add(&meta, protected.flags);
        if !meta.is_dir() {
            continue;
        }
        let mut stack = vec![protected.path.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                // Not followed: a symlink inside is its own entry.
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                if meta.is_dir() {
                    if protected.recursive {
                        add(&meta, protected.flags);
                        stack.push(entry.path());
                    }
                } else {
                    add(&meta, child_bits(protected.flags));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(path: &Path) -> (u64, u64) {
        let meta = fs::metadata(path).expect("stat");
        (kernel_dev(meta.dev()), meta.ino())
    }

    #[test]
    fn state_folder_is_secret_to_its_last_file_and_sub_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        fs::create_dir_all(state.join("pki")).expect("mkdir");
        fs::write(state.join("cli.toml"), "token").expect("write");
        fs::write(state.join("pki/ca.key"), "key").expect("write");
        let ids = identities(&[ProtectedPath::tree(&state, SECRET_DIR)]);
        assert_eq!(ids[&key(&state)], SECRET_DIR);
        assert_eq!(ids[&key(&state.join("pki"))], SECRET_DIR);
        assert_eq!(ids[&key(&state.join("cli.toml"))], NO_WRITE | NO_READ);
        assert_eq!(ids[&key(&state.join("pki/ca.key"))], NO_WRITE | NO_READ);
        assert_eq!(ids.len(), 4);
    }

    #[test]
    fn a_file_under_two_protections_gets_both_and_missing_paths_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("audit.db");
        fs::write(&db, "").expect("write");
        let ids = identities(&[
            ProtectedPath::file(&db, NO_WRITE),
            ProtectedPath::file(dir.path(), LOCKED_DIR),
            ProtectedPath::file(dir.path().join("missing"), NO_WRITE),
        ]);
        assert_eq!(ids[&key(&db)], NO_WRITE);
        assert_eq!(ids[&key(dir.path())], LOCKED_DIR);
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn the_default_layout_locks_etc_gatekeep_and_keeps_binaries_writable_by_path_only() {
        let config = AgentConfig::default();
        let paths = protected_paths(
            &config,
            Some(Path::new("/etc/gatekeep/agent.toml")),
            &[PathBuf::from("/usr/bin/gatekeep-agent")],
        );
        let find = |p: &str| {
            paths
                .iter()
                .find(|x| x.path == Path::new(p))
                .unwrap_or_else(|| panic!("{p} not protected: {paths:#?}"))
        };
        assert_eq!(find("/etc/gatekeep").flags, DIR_LOCKED | NO_WRITE);
        assert_eq!(find("/etc/gatekeep/policies").flags, LOCKED_DIR);
        assert!(find("/etc/gatekeep/policies").recursive);
        assert_eq!(find("/var/lib/gatekeep").flags, SECRET_DIR);
        assert_eq!(find("/sys/fs/bpf/gatekeep").flags, LOCKED_DIR);
        assert_eq!(find("/usr/bin/gatekeep-agent").flags, NO_WRITE);
        assert!(
            paths.iter().all(|p| p.path != Path::new("/usr/bin")),
            "a binary's shared folder is not locked"
        );
    }
}
