//! `integrity = "sha256"` (issue 19, item 1): an allow-list trusted by the
//! bytes of its files, as fapolicyd trusts by hash.
//!
//! Every exec rule is bound to its file's content version (ctime, size,
//! inode generation) when the policy is loaded; a file written since then
//! no longer matches its rule. Under `integrity = "sha256"` an allow rule
//! also binds the file's SHA-256, and the kernel asks instead of applying
//! the default when the content version differs
//! (`exec_rule_flags::SHA256`). The agent then hashes the file as it is now
//! ([`Integrity::decide`]): the same bytes are allowed at once (a package
//! reinstalled, a `touch`), other bytes get the policy's default, as a stale
//! rule does. A rescan binds the rule to the new version when the bytes are
//! the same ([`rebind`]), so the kernel decides again from then on (and
//! `PROT_EXEC` mappings, which are never paused, are allowed again).
//!
//! Hashes are cached per file identity and content version: a file is read
//! once per version, however often it runs. A version is hashed only once it
//! is settled (its ctime lies before the tick in which the read began) and
//! found unchanged after the read: any write during or after the read gives
//! the file another version, which the kernel sees, so the request digest a
//! verdict is bound to no longer matches.

use std::{
    collections::HashMap,
    fs,
    io::{self, Read as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Mutex, atomic::AtomicUsize},
    time::Duration,
};

use gatekeep_common::{ContentVersion, exec_rule_flags};
use gatekeep_policy::{Action, Decided};
use sha2::{Digest as _, Sha256};

use super::{ExecRequest, Via, coarse_now, content_version, file_generation, kernel_dev, settled};
use crate::pause::exe_path::within;

/// A file's identity as the kernel reports it: (device in the kernel's
/// encoding, inode).
pub type FileId = (u64, u64);

/// What an allow rule under `integrity = "sha256"` was bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    /// The rule's path, from which the file is read again.
    pub path: PathBuf,
    pub content: ContentVersion,
    /// `exec_rule_flags` of the binding (whether the generation counts).
    pub flags: u32,
    pub sha256: [u8; 32],
}

/// One policy's pinned allow rules.
#[derive(Debug, Clone, Default)]
pub struct Integrity {
    pub pinned: HashMap<FileId, Pinned>,
    /// The policy's exec default: what a file whose bytes changed gets.
    pub default: Option<Action>,
}

/// How long a decision may read a file before the default applies.
const HASH_WITHIN: Duration = Duration::from_secs(5);

/// Hashes being computed now (bounded like `exe_path`'s resolutions).
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Most cached hashes; the cache starts over past it.
const CACHE_LIMIT: usize = 4096;

type CacheKey = (u64, u64, i64, u32, u32, i64);

fn cache() -> &'static Mutex<HashMap<CacheKey, [u8; 32]>> {
    static CACHE: std::sync::OnceLock<Mutex<HashMap<CacheKey, [u8; 32]>>> =
        std::sync::OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn cache_key(file: FileId, content: &ContentVersion) -> CacheKey {
    (
        file.0,
        file.1,
        content.ctime_sec,
        content.ctime_nsec,
        content.generation,
        content.size,
    )
}

/// How many times to wait for a file changed a moment ago to settle.
const SETTLE_TRIES: usize = 750;

/// The SHA-256 of the file at `path`, if it is the file `file` and has
/// content version `content` (as `flags` compares it) before and after the
/// read, from the cache when this version was hashed before.
///
/// # Errors
///
/// The file cannot be read, is another file, or has (or gets) another
/// version.
pub fn sha256_of(
    path: &Path,
    file: FileId,
    content: &ContentVersion,
    flags: u32,
) -> io::Result<[u8; 32]> {
    let key = cache_key(file, content);
    if let Some(hash) = cache().lock().ok().and_then(|c| c.get(&key).copied()) {
        return Ok(hash);
    }
    let changed = || io::Error::other("the file changed while it was read");
    let mut tries = 0;
    let hash = loop {
        let before = coarse_now();
        let mut opened = fs::File::open(path)?;
        let version = |opened: &fs::File| -> io::Result<(FileId, ContentVersion)> {
            let meta = opened.metadata()?;
            let (version, _) = content_version(&meta, file_generation(opened));
            Ok(((kernel_dev(meta.dev()), meta.ino()), version))
        };
        let (identity, found) = version(&opened)?;
        if identity != file {
            return Err(io::Error::other(format!(
                "{} is another file now",
                path.display()
            )));
        }
        if !same_version(content, &found, flags) {
            return Err(changed());
        }
        if !settled(&found, before) {
            tries += 1;
            if tries >= SETTLE_TRIES {
                return Err(changed());
            }
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let mut hasher = Sha256::new();
        let mut buffer = vec![0_u8; 1 << 16];
        loop {
            let read = opened.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
        }
        let (_, after) = version(&opened)?;
        if !same_version(content, &after, flags) {
            return Err(changed());
        }
        break <[u8; 32]>::from(hasher.finalize());
    };
    if let Ok(mut cache) = cache().lock() {
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, hash);
    }
    Ok(hash)
}

/// Whether `found` is version `bound`, compared as the kernel compares it.
fn same_version(bound: &ContentVersion, found: &ContentVersion, flags: u32) -> bool {
    bound.ctime_sec == found.ctime_sec
        && bound.ctime_nsec == found.ctime_nsec
        && bound.size == found.size
        && (flags & exec_rule_flags::GENERATION == 0 || bound.generation == found.generation)
}

impl Integrity {
    /// The decision for an exec the kernel asked about because a pinned
    /// allow rule's file has another content version now; `None` when it is
    /// not one of those, or when the policy's default is ask (a reviewer
    /// decides then, as the kernel asked).
    #[must_use]
    pub fn decide(&self, request: &ExecRequest) -> Option<Decided> {
        let file = (request.dev, request.ino);
        let pinned = self.pinned.get(&file)?;
        if request.via != Via::Exec || same_version(&pinned.content, &request.content, pinned.flags)
        {
            return None;
        }
        let (path, content, flags) = (pinned.path.clone(), request.content, pinned.flags);
        let found = within(&RUNNING, HASH_WITHIN, move || {
            sha256_of(&path, file, &content, flags)
        });
        let rule = pinned.path.display();
        let (same, why) = match found {
            Some(Ok(hash)) if hash == pinned.sha256 => (true, String::new()),
            Some(Ok(hash)) => (false, format!("its SHA-256 is now {}", hex::encode(hash))),
            Some(Err(err)) => (false, format!("it could not be hashed ({err})")),
            None => (false, "it could not be hashed in time".to_owned()),
        };
        if same {
            return Some(Decided {
                action: Action::Allow,
                because: format!(
                    "exec allow \"{rule}\" (integrity sha256: rewritten with the same bytes, {})",
                    hex::encode(pinned.sha256)
                ),
            });
        }
        match self.default? {
            Action::Ask => None,
            action => Some(Decided {
                action,
                because: format!(
                    "exec default {action} (\"{rule}\" was rewritten and {why}, not the {} the rule was bound to)",
                    hex::encode(pinned.sha256)
                ),
            }),
        }
    }
}

/// A rescan's pinned rules against the loaded ones: a file still holding
/// the bytes it had at load is bound to its version now (the rescanned
/// value in `rules` stands); one with other bytes, or one that could not be
/// pinned at load, keeps its load binding (`loaded_rules`), and its pin
/// stays the load's. A file no rule named at load is bound now, as any new
/// rule. `rescanned` is updated to match.
pub fn rebind(
    rules: &mut std::collections::BTreeMap<crate::hooks::RuleKey, Vec<u8>>,
    loaded_rules: &std::collections::BTreeMap<crate::hooks::RuleKey, Vec<u8>>,
    policy_id: u32,
    rescanned: &mut Integrity,
    loaded: &Integrity,
) {
    let files: Vec<FileId> = rescanned.pinned.keys().copied().collect();
    for file in files {
        let key = super::rule_key(policy_id, file.0, file.1);
        let pin = loaded.pinned.get(&file);
        if pin.is_some_and(|pin| {
            rescanned
                .pinned
                .get(&file)
                .is_some_and(|now| now.sha256 == pin.sha256)
        }) {
            continue;
        }
        let Some(bound) = loaded_rules.get(&key) else {
            // New since the load: bound now.
            continue;
        };
        if let Some(value) = rules.get_mut(&key) {
            let action = super::decode_rule(value).action;
            let mut kept = super::decode_rule(bound);
            kept.action = action;
            *value = super::encode_rule(&kept);
        }
        match pin {
            Some(pin) => {
                rescanned.pinned.insert(file, pin.clone());
            }
            None => {
                rescanned.pinned.remove(&file);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, io::Write as _};

    use gatekeep_common::{ExecRule, action};

    use super::*;
    use crate::hooks::exec::{decode_rule, encode_rule, rule_key};

    /// The file's identity and content version now (settled or not).
    fn version(path: &Path) -> (FileId, ContentVersion, u32) {
        let opened = fs::File::open(path).expect("open");
        let meta = opened.metadata().expect("stat");
        let (content, flags) = content_version(&meta, file_generation(&opened));
        ((kernel_dev(meta.dev()), meta.ino()), content, flags)
    }

    fn rewrite(path: &Path, bytes: &[u8]) {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .expect("open for writing");
        file.write_all(bytes).expect("write");
    }

    /// A pin of `path` as a load makes it.
    fn pin(path: &Path) -> (FileId, Pinned) {
        let (file, content, flags) = version(path);
        let sha256 = sha256_of(path, file, &content, flags).expect("hash");
        (
            file,
            Pinned {
                path: path.to_owned(),
                content,
                flags,
                sha256,
            },
        )
    }

    fn request(file: FileId, content: ContentVersion) -> ExecRequest {
        ExecRequest {
            origin: crate::bpf::record::origin(&gatekeep_common::EventHeader::default()),
            dev: file.0,
            ino: file.1,
            content,
            filename: PathBuf::from("tool"),
            argv: vec!["tool".into()],
            env: Vec::new(),
            argv_truncated: false,
            denied_truncated: false,
            argc: 1,
            via: Via::Exec,
            interpreter: false,
        }
    }

    /// A new content version of `path` with the bytes given: rewritten
    /// until its ctime moves (a write in the same coarse tick may keep it).
    fn new_version(path: &Path, bytes: &[u8]) -> ContentVersion {
        let (_, old, _) = version(path);
        loop {
            rewrite(path, bytes);
            let (_, now, _) = version(path);
            if (now.ctime_sec, now.ctime_nsec) != (old.ctime_sec, old.ctime_nsec) {
                return now;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_hash_is_of_the_bytes_and_only_for_the_version_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tool");
        fs::write(&path, b"#!/bin/sh\necho pinned\n").expect("write");
        let (file, content, flags) = version(&path);
        let hash = sha256_of(&path, file, &content, flags).expect("hash");
        assert_eq!(
            hash,
            <[u8; 32]>::from(Sha256::digest(b"#!/bin/sh\necho pinned\n"))
        );
        // Another identity, another version: refused, not hashed.
        let other = (file.0, file.1 + 1);
        assert!(sha256_of(&path, other, &content, flags).is_err());
        let older = ContentVersion {
            size: content.size + 1,
            ..content
        };
        let err = sha256_of(&path, file, &older, flags).expect_err("another version");
        assert_eq!(err.to_string(), "the file changed while it was read");
    }

    #[test]
    fn the_same_bytes_are_allowed_other_bytes_get_the_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tool");
        fs::write(&path, b"same bytes").expect("write");
        let (file, pinned) = pin(&path);
        let sha = hex::encode(pinned.sha256);
        let mut integrity = Integrity {
            pinned: HashMap::from([(file, pinned.clone())]),
            default: Some(Action::Deny),
        };
        // The pinned version itself is the kernel's to allow: not here.
        assert_eq!(integrity.decide(&request(file, pinned.content)), None);
        // Neither is a file no pin names.
        assert_eq!(
            integrity.decide(&request((file.0, file.1 + 1), pinned.content)),
            None
        );

        let same = new_version(&path, b"same bytes");
        let decided = integrity.decide(&request(file, same)).expect("decided");
        assert_eq!(decided.action, Action::Allow);
        assert_eq!(
            decided.because,
            format!(
                "exec allow \"{}\" (integrity sha256: rewritten with the same bytes, {sha})",
                path.display()
            )
        );

        let other = new_version(&path, b"other bytes");
        let decided = integrity.decide(&request(file, other)).expect("decided");
        assert_eq!(decided.action, Action::Deny);
        let now = hex::encode(Sha256::digest(b"other bytes"));
        assert_eq!(
            decided.because,
            format!(
                "exec default deny (\"{}\" was rewritten and its SHA-256 is now {now}, not the {sha} the rule was bound to)",
                path.display()
            )
        );
        // Under `default = "ask"` a reviewer decides, as the kernel asked.
        integrity.default = Some(Action::Ask);
        assert_eq!(integrity.decide(&request(file, other)), None);
        // A version hashed once is known (the cache: a version names one
        // content); one the file does not have cannot be vouched for.
        integrity.default = Some(Action::Deny);
        let known = integrity.decide(&request(file, same)).expect("decided");
        assert_eq!(known.action, Action::Allow);
        let never = ContentVersion {
            size: other.size + 100,
            ..other
        };
        let gone = integrity.decide(&request(file, never)).expect("decided");
        assert_eq!(gone.action, Action::Deny);
        assert!(
            gone.because.contains("could not be hashed"),
            "{}",
            gone.because
        );
    }

    #[test]
    fn a_rescan_rebinds_the_same_bytes_and_keeps_the_load_pin_otherwise() {
        let rule = |size: i64| {
            encode_rule(&ExecRule {
                action: action::ALLOW,
                flags: exec_rule_flags::SHA256,
                content: ContentVersion {
                    size,
                    ..ContentVersion::default()
                },
            })
        };
        let pinned = |size: i64, byte: u8| Pinned {
            path: PathBuf::from("/usr/bin/tool"),
            content: ContentVersion {
                size,
                ..ContentVersion::default()
            },
            flags: exec_rule_flags::SHA256,
            sha256: [byte; 32],
        };
        let (same, changed, unpinned, new) = ((8, 1), (8, 2), (8, 3), (8, 4));
        let key = |file: FileId| rule_key(1, file.0, file.1);
        let loaded_rules = BTreeMap::from([
            (key(same), rule(10)),
            (key(changed), rule(10)),
            (key(unpinned), rule(10)),
        ]);
        let loaded = Integrity {
            pinned: HashMap::from([(same, pinned(10, 0xaa)), (changed, pinned(10, 0xbb))]),
            default: Some(Action::Deny),
        };
        let mut rules = BTreeMap::from([
            (key(same), rule(11)),
            (key(changed), rule(11)),
            (key(unpinned), rule(11)),
            (key(new), rule(11)),
        ]);
        let mut rescanned = Integrity {
            pinned: HashMap::from([
                (same, pinned(11, 0xaa)),
                (changed, pinned(11, 0xcc)),
                (unpinned, pinned(11, 0xdd)),
                (new, pinned(11, 0xee)),
            ]),
            default: Some(Action::Deny),
        };
        rebind(&mut rules, &loaded_rules, 1, &mut rescanned, &loaded);
        let size = |file: FileId| decode_rule(&rules[&key(file)]).content.size;
        // Same bytes: bound to the version now.
        assert_eq!(size(same), 11);
        assert_eq!(rescanned.pinned[&same].content.size, 11);
        // Other bytes: the load's binding and pin.
        assert_eq!(size(changed), 10);
        assert_eq!(rescanned.pinned[&changed], pinned(10, 0xbb));
        // Not pinned at load: never pinned by a rescan.
        assert_eq!(size(unpinned), 10);
        assert!(!rescanned.pinned.contains_key(&unpinned));
        // Named by no rule at load: bound now, like any new rule.
        assert_eq!(size(new), 11);
        assert_eq!(rescanned.pinned[&new], pinned(11, 0xee));
    }
}
