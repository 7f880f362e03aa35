//! The exec hook (`bprm_check_security`; kernel half:
//! `gatekeep-ebpf/src/hooks/exec.rs`): its requests, and `[policy.exec]`
//! compiled into `EXEC_RULES`.
//!
//! Exec rules: each path is `stat`ed (symlinks followed) and keyed by the
//! file's identity in the kernel's encoding (`dev = major << 20 | minor`).
//! A path that does not exist on this host is skipped with a warning and
//! picked up by a later rescan if it appears.
//!
//! Each rule is bound to the content its file has when the policy is loaded
//! (or reloaded): its [`ContentVersion`] (ctime to the nanosecond and size,
//! from `statx`, and the inode generation where the filesystem tells it,
//! `FS_IOC_GETVERSION`). The kernel applies the rule only while the file
//! still has that version; a rescan keeps the binding of a rule whose file
//! it finds again ([`keep_bindings`]), so only a load re-binds. An exec that
//! meets a stale rule is reported ([`StaleRule`]).
//!
//! Command-line rules, interpreters and multi-call binaries are matched in
//! user space ([`matching`]): their executables compile into `EXEC_RULES`
//! with the ask action, bound like any rule.

use std::{
    collections::HashMap,
    ffi::OsStr,
    fs,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::PathBuf,
};

use aya::maps::{Map, MapError};
use gatekeep_common::{
    ARGV_LEN, BoundEnv, ContentVersion, ENV_LEN, ExecEvent, ExecRule, ExecRuleKey,
    ExecRuleStaleEvent, event_kind, exec_denied_for, exec_flags, exec_rule_flags, map_names,
    request_kind,
};
use gatekeep_policy::{Action, Integrity, Policy, UnlistedMappings};
use gatekeep_proto::{
    audit::{ExecFacts, KernelFacts},
    model,
};

pub mod integrity;
pub mod matching;

use super::{Compiling, Hook, RuleKey, absent_is_ok, kernel_action};
use crate::{
    bpf::record::{Origin, ParseError, origin, read},
    pause::{enrich::Enricher, exe_path::Views, request},
    policy::error::PolicyMapsError,
};

/// An exec as the kernel saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub origin: Origin,
    /// Kernel device number (`major << 20 | minor`) and inode of the file.
    pub dev: u64,
    pub ino: u64,
    /// The file's content version when the kernel saw the exec.
    pub content: ContentVersion,
    /// The path as passed to execve (may be relative).
    pub filename: PathBuf,
    pub argv: Vec<String>,
    /// The bound environment variables (`LD_*` and the policy's `bound_env`),
    /// `NAME=value`, in the order the exec passed them.
    pub env: Vec<String>,
    /// The kernel could not capture the whole argv (longer than it keeps, an
    /// unreadable argument, a compat 32-bit exec): `argv` is a prefix.
    pub argv_truncated: bool,
    /// A denial because of that truncation (the policy would have asked, and
    /// its `on_truncated` is deny), not because of a deny rule.
    pub denied_truncated: bool,
    /// Number of arguments the kernel counted.
    pub argc: u32,
    /// How the code came to run.
    pub via: Via,
    /// The kernel checked a script's interpreter: the file is the
    /// interpreter, `filename` and `argv` the script's as exec'd.
    pub interpreter: bool,
}

/// How the code of an [`ExecRequest`] came to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Via {
    /// An exec of a file with a name on disk.
    #[default]
    Exec,
    /// Not an exec: the file was mapped as code (`mmap`/`mprotect` with
    /// `PROT_EXEC`: ld.so, `LD_PRELOAD`, `dlopen`); `filename` is its name in
    /// its folder, and there is no argv. Only ever a kernel denial.
    Mapped,
    /// An exec of a file with no name on disk (`memfd_create`, `O_TMPFILE`,
    /// deleted): `filename` is the name the workload gave it (`memfd:NAME`).
    Fileless,
}

impl ExecRequest {
    /// How the code came to run, when it was not an exec of a file with a name
    /// on disk: what reviewers and auditors are told.
    #[must_use]
    pub fn via(&self) -> Option<&'static str> {
        match self.via {
            Via::Exec => None,
            Via::Mapped => Some(MAPPED_AS_CODE),
            Via::Fileless => Some(FILELESS),
        }
    }

    /// Whether the file was mapped as code rather than exec'd.
    #[must_use]
    pub fn mapped(&self) -> bool {
        self.via == Via::Mapped
    }

    /// Whether the file has no name on disk.
    #[must_use]
    pub fn fileless(&self) -> bool {
        self.via == Via::Fileless
    }
}

/// [`ExecRequest::via`] of a mapping.
pub const MAPPED_AS_CODE: &str = "mapped as code";
/// [`ExecRequest::via`] of an exec of a file with no name on disk.
pub const FILELESS: &str = "fileless";

/// What a reviewer is shown as the executable of a file with no name on disk:
/// the name the workload gave it (for a memfd, `memfd:NAME`), marked. The name
/// is the workload's: whoever prints it escapes it.
#[must_use]
pub fn fileless_executable(name: &std::path::Path) -> PathBuf {
    let name = name.as_os_str().as_encoded_bytes();
    let mut shown = b"/".to_vec();
    shown.extend_from_slice(name.strip_prefix(b"/").unwrap_or(name));
    shown.extend_from_slice(b" (no file on disk)");
    PathBuf::from(OsStr::from_bytes(&shown))
}

/// What compiling `[policy.exec]` leaves for user space.
#[derive(Debug, Clone, Default)]
pub struct ExecLoaded {
    /// (dev, ino) -> rule path, to name the rule that matched an exec.
    pub paths: HashMap<(u64, u64), PathBuf>,
    /// Command rules, interpreters and multi-call binaries.
    pub matching: matching::Matching,
    /// Allow rules pinned by SHA-256 (`integrity = "sha256"`).
    pub integrity: integrity::Integrity,
}

/// Compiles what the agent matches in user space: each executable it needs
/// argv for gets the ask action in `EXEC_RULES` (its own rule's entry, else
/// a new one bound to the file's content now).
fn compile_matching(policy: &Policy, out: &mut Compiling<'_>, loaded: &mut ExecLoaded) {
    let exec = &policy.exec;
    if exec.commands.is_empty() && exec.multicall.is_empty() {
        // Interpreters alone only ever make an exec stricter for a script
        // some rule names: without command rules, only path rules can.
        if !exec
            .rules
            .iter()
            .any(|rule| rule.action != gatekeep_policy::Action::Allow)
        {
            return;
        }
    }
    let mut paths: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let matcher = gatekeep_policy::ExecMatcher::new(exec, |path| {
        let meta = fs::metadata(path).ok().filter(fs::Metadata::is_file)?;
        let identity = (kernel_dev(meta.dev()), meta.ino());
        paths.entry(identity).or_insert_with(|| path.to_path_buf());
        Some(identity)
    });
    let mut handed_over = HashMap::new();
    for identity in matcher.needs_match() {
        let key = rule_key(out.id, identity.0, identity.1);
        let rule = if let Some(value) = out.rules.get(&key) {
            // Matched here by its argv: a pin must not allow it around that.
            loaded.integrity.pinned.remove(identity);
            let bound = decode_rule(value);
            ExecRule {
                action: gatekeep_common::action::ASK,
                flags: bound.flags & !exec_rule_flags::SHA256,
                ..bound
            }
        } else {
            let Some(path) = paths.get(identity) else {
                continue;
            };
            match bind(path) {
                Ok(Bound { content, flags, .. }) => ExecRule {
                    action: gatekeep_common::action::ASK,
                    flags,
                    content,
                },
                Err(err) => {
                    out.warnings.push(format!(
                        "policy `{}`: {} cannot be bound for its command rules ({err}); skipped until it exists",
                        policy.name,
                        path.display()
                    ));
                    continue;
                }
            }
        };
        handed_over.insert(*identity, (rule.content, rule.flags));
        out.rules.insert(key, encode_rule(&rule));
    }
    loaded.matching = matching::Matching {
        matcher: Some(std::sync::Arc::new(matcher)),
        handed_over,
    };
}

/// The exec hook.
pub struct Exec;

impl Hook for Exec {
    const NAME: &'static str = "exec";
    const MODEL_KIND: model::Kind = model::Kind::Exec;
    const KIND: u32 = request_kind::EXEC;
    const ASK: (u32, &'static str) = (event_kind::EXEC_ASK, "exec_ask");
    const DENIED: (u32, &'static str) = (event_kind::EXEC_DENIED, "exec_denied");
    const AUDITED: (u32, &'static str) = (event_kind::EXEC_AUDITED, "exec_audited");
    const RULE_MAPS: &'static [&'static str] = &[map_names::EXEC_RULES, map_names::EXEC_BOUND_ENV];

    type Request = ExecRequest;
    type Loaded = ExecLoaded;

    fn reported_action(kind: u32, bytes: &[u8]) -> Result<u32, ParseError> {
        let raw: ExecEvent = read(bytes, kind)?;
        Ok(raw.action)
    }

    fn parse(kind: u32, bytes: &[u8]) -> Result<ExecRequest, ParseError> {
        let raw: ExecEvent = read(bytes, kind)?;
        Ok(exec_request(&raw))
    }

    fn origin(request: &ExecRequest) -> &Origin {
        &request.origin
    }

    fn compile(
        policy: &Policy,
        out: &mut Compiling<'_>,
        exec_paths: &mut Self::Loaded,
    ) -> Result<(), PolicyMapsError> {
        out.defaults.exec_default = kernel_action(policy.exec.default);
        out.defaults.on_truncated = kernel_action(policy.exec.on_truncated);
        if !policy.exec.bound_env.is_empty() {
            let names: Vec<&[u8]> = policy.exec.bound_env.iter().map(String::as_bytes).collect();
            let bound = BoundEnv::from_names(&names).ok_or_else(|| PolicyMapsError::BoundEnv {
                policy: policy.name.clone(),
            })?;
            out.rules.insert(
                RuleKey {
                    map: map_names::EXEC_BOUND_ENV,
                    policy_id: out.id,
                    key: Vec::new(),
                },
                encode_bound_env(&bound),
            );
        }
        out.defaults.map_unlisted = match policy.exec.unlisted_mappings {
            UnlistedMappings::Allow => gatekeep_common::action::ALLOW,
            UnlistedMappings::Default => kernel_action(policy.exec.default),
        };
        out.defaults.fileless = kernel_action(policy.exec.fileless);
        exec_paths.integrity.default = Some(policy.exec.default);
        for rule in &policy.exec.rules {
            match bind(&rule.path) {
                Ok(Bound {
                    meta,
                    content,
                    mut flags,
                }) if meta.is_file() => {
                    let identity = (kernel_dev(meta.dev()), meta.ino());
                    if rule.action == Action::Allow && policy.exec.integrity == Integrity::Sha256 {
                        match integrity::sha256_of(&rule.path, identity, &content, flags) {
                            Ok(sha256) => {
                                flags |= exec_rule_flags::SHA256;
                                exec_paths.integrity.pinned.insert(
                                    identity,
                                    integrity::Pinned {
                                        path: rule.path.clone(),
                                        content,
                                        flags,
                                        sha256,
                                    },
                                );
                            }
                            Err(err) => out.warnings.push(format!(
                                "policy `{}`: exec rule {} cannot be hashed for `integrity = \"sha256\"` ({err}); bound to its content version only until the next rescan",
                                policy.name,
                                rule.path.display()
                            )),
                        }
                    }
                    out.rules.insert(
                        rule_key(out.id, identity.0, identity.1),
                        encode_rule(&ExecRule {
                            action: kernel_action(rule.action),
                            flags,
                            content,
                        }),
                    );
                    exec_paths.paths.insert(identity, rule.path.clone());
                }
                Ok(_) => out.warnings.push(format!(
                    "policy `{}`: exec rule {} is not a regular file; skipped",
                    policy.name,
                    rule.path.display()
                )),
                Err(err) => out.warnings.push(format!(
                    "policy `{}`: exec rule {} cannot be resolved ({err}); skipped until it exists",
                    policy.name,
                    rule.path.display()
                )),
            }
        }
        compile_matching(policy, out, exec_paths);
        Ok(())
    }

    fn read_map(name: &'static str, map: &Map) -> Result<Vec<(RuleKey, Vec<u8>)>, MapError> {
        if name == map_names::EXEC_BOUND_ENV {
            let bound = aya::maps::Array::<_, BoundEnv>::try_from(map)?;
            return (0..bound.len())
                .filter_map(|policy_id| match bound.get(&policy_id, 0) {
                    Ok(entry) if entry.count == 0 => None,
                    Ok(entry) => Some(Ok((
                        RuleKey {
                            map: name,
                            policy_id,
                            key: Vec::new(),
                        },
                        encode_bound_env(&entry),
                    ))),
                    Err(err) => Some(Err(err)),
                })
                .collect();
        }
        let rules = aya::maps::HashMap::<_, ExecRuleKey, ExecRule>::try_from(map)?;
        rules
            .iter()
            .map(|entry| {
                entry.map(|(key, value)| {
                    let mut rule = rule_key(key.policy_id, key.dev, key.ino);
                    rule.map = name;
                    (rule, encode_rule(&value))
                })
            })
            .collect()
    }

    fn write_map(map: &mut Map, key: &RuleKey, value: Option<&[u8]>) -> Result<(), MapError> {
        if key.map == map_names::EXEC_BOUND_ENV {
            let mut bound = aya::maps::Array::<_, BoundEnv>::try_from(map)?;
            // Absent: a zeroed entry (no names).
            let entry = value.map(decode_bound_env).unwrap_or_default();
            return bound.set(key.policy_id, entry, 0);
        }
        let mut rules = aya::maps::HashMap::<_, ExecRuleKey, ExecRule>::try_from(map)?;
        let (dev, ino) = decode_identity(&key.key);
        let kernel_key = ExecRuleKey {
            policy_id: key.policy_id,
            _pad: 0,
            dev,
            ino,
        };
        match value {
            Some(value) => rules.insert(kernel_key, decode_rule(value), 0),
            None => absent_is_ok(rules.remove(&kernel_key)),
        }
    }

    fn rule(policy: &Policy, exec_paths: &Self::Loaded, request: &ExecRequest) -> String {
        if request.denied_truncated {
            return format!("exec on_truncated {}", policy.exec.on_truncated);
        }
        if request.fileless() {
            return format!("exec fileless {}", policy.exec.fileless);
        }
        if exec_paths.matching.handed_over((request.dev, request.ino)) && !request.mapped() {
            return format!(
                "exec command rules of {} (matched by the agent)",
                request.filename.display()
            );
        }
        let rule = match exec_paths.paths.get(&(request.dev, request.ino)) {
            Some(path) => {
                let action = policy
                    .exec
                    .rules
                    .iter()
                    .find(|rule| &rule.path == path)
                    .map_or(policy.exec.default, |rule| rule.action);
                format!("exec {action} {}", path.display())
            }
            None if request.mapped() => format!(
                "exec unlisted_mappings {} (default {})",
                policy.exec.unlisted_mappings, policy.exec.default
            ),
            None => format!("exec default {}", policy.exec.default),
        };
        if request.mapped() {
            format!("{rule} ({MAPPED_AS_CODE})")
        } else {
            rule
        }
    }

    /// The executable shown is the host's path of the file that runs, found from the file
    /// the kernel matched (`pause::exe_path`), never just the name the workload passed.
    fn target(request: &ExecRequest, enricher: &Enricher) -> model::Target {
        let tid = request.origin.tid;
        let named = enricher.display_path(tid, &request.filename);
        let mut seen =
            Views::new(enricher.proc_root()).exe_path(tid, &named, request.dev, request.ino);
        if request.fileless() {
            // No host path can be the file: shown by the name the workload gave it.
            seen.path = fileless_executable(&request.filename);
            seen.named = seen.path.clone();
            seen.verified = false;
        }
        let mut target = request::exec_target_seen(
            &seen,
            (request.dev, request.ino),
            &request.argv,
            Some(&request.content),
        );
        if let model::Target::Exec(exec) = &mut target {
            exec.argv_truncated = request.argv_truncated;
            exec.env.clone_from(&request.env);
        }
        target
    }

    /// The file the kernel matched (device, inode, content version), the name as passed
    /// (made absolute) and argv: what [`Hook::target`] is made of, without its path walk
    /// (`pause::exe_path`, a thread per call), which only a burst's first denial pays.
    fn burst_key(request: &ExecRequest, enricher: &Enricher) -> String {
        let named = enricher.display_path(request.origin.tid, &request.filename);
        format!(
            "{}:{} {:?} {:?} {:?} {:?} {} {:?}",
            request.dev,
            request.ino,
            request.content,
            named.as_os_str().as_encoded_bytes(),
            request.argv,
            request.env,
            request.argv_truncated,
            request.via()
        )
    }

    fn denied_because(request: &ExecRequest) -> Option<(&'static str, &'static str)> {
        if request.mapped() {
            return Some((
                "mapped_as_code",
                "the file was mapped as code (mmap or mprotect with PROT_EXEC: ld.so running a \
                 program it was handed, LD_PRELOAD, dlopen), not executed; mappings meet the \
                 exec rules of the file they map (an ask rule refuses them: a mapping is never \
                 paused), and a file no rule names gets the policy's exec unlisted_mappings; \
                 allow the file in [policy.exec] if the workload may load it",
            ));
        }
        if request.fileless() {
            return Some((
                "fileless",
                "the executable has no name on disk (memfd_create, O_TMPFILE or a deleted \
                 file), so no exec rule can name it, and the policy's exec fileless is deny; \
                 write fileless = \"ask\" to have reviewers decide such execs",
            ));
        }
        request.denied_truncated.then_some((
            "argv_truncated",
            "the kernel could not capture the whole argv (more than it keeps, an unreadable \
             argument, or a compat 32-bit exec), so no approval could bind it, and the \
             policy's exec on_truncated is deny; write on_truncated = \"ask\" to have \
             reviewers decide such requests",
        ))
    }

    fn kernel_facts(request: &ExecRequest) -> KernelFacts {
        let exec = ExecFacts {
            filename: request.filename.to_string_lossy().into_owned(),
            dev: request.dev,
            ino: request.ino,
            argc: request.argc,
            argv_truncated: request.argv_truncated,
            via: request.via().map(str::to_owned),
        };
        request::kernel_facts(&request.origin, Some(exec), None)
    }
}

/// The [`RuleKey`] of an exec rule: policy, then file identity.
#[must_use]
pub fn rule_key(policy_id: u32, dev: u64, ino: u64) -> RuleKey {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&dev.to_be_bytes());
    key.extend_from_slice(&ino.to_be_bytes());
    RuleKey {
        map: map_names::EXEC_RULES,
        policy_id,
        key,
    }
}

/// The (dev, ino) of a [`rule_key`].
fn decode_identity(key: &[u8]) -> (u64, u64) {
    let word = |at: usize| {
        let mut bytes = [0; 8];
        if let Some(slice) = key.get(at..at + 8) {
            bytes.copy_from_slice(slice);
        }
        u64::from_be_bytes(bytes)
    };
    (word(0), word(8))
}

/// The action of an encoded `EXEC_RULES` value.
#[must_use]
pub fn decode_action(value: &[u8]) -> u32 {
    decode_rule(value).action
}

/// A file's metadata and content version, read from one open file.
struct Bound {
    meta: fs::Metadata,
    content: ContentVersion,
    /// [`exec_rule_flags`].
    flags: u32,
}

/// Reads the identity and content version of the file at `path` (symlinks
/// followed), from one open file so both describe the same inode.
///
/// Timestamps are coarse (v6.12 sets ctime from the clock tick,
/// `ktime_get_coarse_real_ts64`): a file changed in the current tick could
/// be changed again in that tick and keep its ctime. So the version is read
/// only once the file's ctime lies before the tick in which the read began
/// ([`settled`]); until then (a file changed a moment ago) it waits a tick
/// and reads again, for at most [`SETTLE_LIMIT`].
fn bind(path: &std::path::Path) -> std::io::Result<Bound> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let started = std::time::Instant::now();
    loop {
        let before = coarse_now();
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)?;
        let meta = file.metadata()?;
        let generation = file_generation(&file);
        let (content, flags) = content_version(&meta, generation);
        if settled(&content, before) || started.elapsed() >= SETTLE_LIMIT {
            return Ok(Bound {
                meta,
                content,
                flags,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// How long [`bind`] waits for a file that keeps changing (a rule bound to
/// content still changing then goes stale at its next change).
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_millis(1500);

/// `CLOCK_REALTIME_COARSE`, the clock the kernel stamps ctime from, as
/// (seconds, nanoseconds).
fn coarse_now() -> (i64, u32) {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_REALTIME_COARSE).map_or((i64::MAX, 0), |now| {
        (
            now.tv_sec(),
            u32::try_from(now.tv_nsec()).unwrap_or_default(),
        )
    })
}

/// Whether every change to the file after a read that began at coarse time
/// `before` must give it another ctime than `content`'s: its ctime lies in
/// an earlier tick. A ctime of whole seconds may come from a filesystem
/// that keeps seconds only (ext4 with small inodes), so it must lie in an
/// earlier second.
#[must_use]
pub fn settled(content: &ContentVersion, before: (i64, u32)) -> bool {
    if content.ctime_nsec == 0 {
        content.ctime_sec < before.0
    } else {
        (content.ctime_sec, content.ctime_nsec) < before
    }
}

/// The [`ContentVersion`] of a file (and its [`exec_rule_flags`]) from its
/// `statx` data and, when the filesystem tells it, its inode generation.
#[must_use]
pub fn content_version(meta: &fs::Metadata, generation: Option<u32>) -> (ContentVersion, u32) {
    let content = ContentVersion {
        ctime_sec: meta.ctime(),
        // `statx` gives nanoseconds below 10^9.
        ctime_nsec: u32::try_from(meta.ctime_nsec()).unwrap_or_default(),
        generation: generation.unwrap_or_default(),
        size: i64::try_from(meta.size()).unwrap_or(i64::MAX),
    };
    let flags = if generation.is_some() {
        exec_rule_flags::GENERATION
    } else {
        0
    };
    (content, flags)
}

/// The inode generation (`FS_IOC_GETVERSION`), on filesystems that answer
/// it (ext4, XFS, btrfs; not tmpfs).
fn file_generation(file: &fs::File) -> Option<u32> {
    use std::os::fd::AsRawFd as _;
    // `_IOR('v', 1, long)`; the filesystems write an `int`.
    const FS_IOC_GETVERSION: libc::c_ulong = 0x8008_7601;
    let mut generation: libc::c_long = 0;
    // SAFETY: the ioctl writes at most a `long` into `generation`, which
    // lives across the call; `file` is an open descriptor.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_GETVERSION, &raw mut generation) };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "the kernel writes a 32-bit `i_generation` into the low half"
    )]
    (rc == 0).then_some(generation as u32)
}

/// Encodes an `EXEC_RULES` value (native byte order, the struct's layout).
#[must_use]
pub fn encode_rule(rule: &ExecRule) -> Vec<u8> {
    let mut out = Vec::with_capacity(size_of::<ExecRule>());
    out.extend_from_slice(&rule.action.to_ne_bytes());
    out.extend_from_slice(&rule.flags.to_ne_bytes());
    out.extend_from_slice(&rule.content.ctime_sec.to_ne_bytes());
    out.extend_from_slice(&rule.content.ctime_nsec.to_ne_bytes());
    out.extend_from_slice(&rule.content.generation.to_ne_bytes());
    out.extend_from_slice(&rule.content.size.to_ne_bytes());
    out
}

/// Decodes an [`encode_rule`] value (missing bytes read as zero).
#[must_use]
pub fn decode_rule(value: &[u8]) -> ExecRule {
    let word = |at: usize| {
        let mut bytes = [0; 8];
        if let Some(slice) = value.get(at..at + 8) {
            bytes.copy_from_slice(slice);
        }
        bytes
    };
    let half = |at: usize| {
        let mut bytes = [0; 4];
        if let Some(slice) = value.get(at..at + 4) {
            bytes.copy_from_slice(slice);
        }
        u32::from_ne_bytes(bytes)
    };
    ExecRule {
        action: half(0),
        flags: half(4),
        content: ContentVersion {
            ctime_sec: i64::from_ne_bytes(word(8)),
            ctime_nsec: half(16),
            generation: half(20),
            size: i64::from_ne_bytes(word(24)),
        },
    }
}

/// A rescan recompiles the loaded policies from the filesystem; it must not
/// re-bind a rule to content written since the load. For every exec rule
/// the rescan finds again (same policy id and file identity), the loaded
/// binding stays; rules of files that appeared since are bound now.
pub fn keep_bindings(
    rescanned: &mut std::collections::BTreeMap<super::RuleKey, Vec<u8>>,
    loaded: &std::collections::BTreeMap<super::RuleKey, Vec<u8>>,
) {
    for (key, value) in rescanned.iter_mut() {
        if key.map != map_names::EXEC_RULES {
            continue;
        }
        if decode_rule(value).flags & exec_rule_flags::SHA256 != 0 {
            // Pinned by its bytes: `integrity::rebind` decides.
            continue;
        }
        if let Some(bound) = loaded.get(key) {
            let action = decode_rule(value).action;
            let mut kept = decode_rule(bound);
            kept.action = action;
            *value = encode_rule(&kept);
        }
    }
}

/// An exec met a rule bound to other content than its file has now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleRule {
    pub origin: Origin,
    pub dev: u64,
    pub ino: u64,
    pub bound: ContentVersion,
    pub found: ContentVersion,
    /// The rule's [`gatekeep_common::action`], and the one applied instead.
    pub rule_action: u32,
    pub applied_action: u32,
    /// The rule's [`exec_rule_flags`].
    pub rule_flags: u32,
}

/// The `rule_stale` audit payload of `stale`, under `policy` (its name and
/// what its hooks' compilation left, when the agent still knows the
/// kernel's policy id).
#[must_use]
pub fn stale_payload(
    stale: &StaleRule,
    policy: Option<(&str, &super::Loaded)>,
    info: &crate::pause::enrich::Enrichment,
) -> gatekeep_proto::audit::RuleStale {
    use gatekeep_proto::audit::{self, Schema};
    let path = policy.and_then(|(_, hooks)| hooks.exec.paths.get(&(stale.dev, stale.ino)));
    let version = |content: &ContentVersion, generation: bool| audit::ContentVersion {
        ctime_sec: content.ctime_sec,
        ctime_nsec: content.ctime_nsec,
        size: content.size,
        generation: generation.then_some(content.generation),
    };
    audit::RuleStale {
        schema: Schema::default(),
        kind: model::Kind::Exec,
        policy: policy.map(|(name, _)| name.to_owned()),
        rule: path
            .map(|path| format!("exec {} {}", action_name(stale.rule_action), path.display())),
        path: path.map(|path| path.to_string_lossy().into_owned()),
        dev: stale.dev,
        ino: stale.ino,
        bound: version(
            &stale.bound,
            stale.rule_flags & exec_rule_flags::GENERATION != 0,
        ),
        found: version(&stale.found, true),
        rule_action: action_name(stale.rule_action).to_owned(),
        applied: action_name(stale.applied_action).to_owned(),
        process: request::process(&stale.origin, info),
        kernel: request::kernel_facts(&stale.origin, None, None),
    }
}

/// The policy word of a kernel [`gatekeep_common::action`].
fn action_name(action: u32) -> &'static str {
    match action {
        gatekeep_common::action::ALLOW => "allow",
        gatekeep_common::action::DENY => "deny",
        _ => "ask",
    }
}

/// Parses an [`event_kind::EXEC_RULE_STALE`] record.
pub fn parse_stale(bytes: &[u8]) -> Result<StaleRule, ParseError> {
    let raw: ExecRuleStaleEvent = read(bytes, event_kind::EXEC_RULE_STALE)?;
    Ok(StaleRule {
        origin: origin(&raw.header),
        dev: raw.dev,
        ino: raw.ino,
        bound: raw.bound,
        found: raw.found,
        rule_action: raw.rule_action,
        applied_action: raw.applied_action,
        rule_flags: raw.rule_flags,
    })
}

/// The kernel's encoding of a device number (`MKDEV`: major << 20 | minor).
#[must_use]
pub fn kernel_dev(st_dev: u64) -> u64 {
    let major = u64::from(libc::major(st_dev));
    let minor = u64::from(libc::minor(st_dev));
    (major << 20) | minor
}

fn exec_request(raw: &ExecEvent) -> ExecRequest {
    let end = raw
        .filename
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(raw.filename.len());
    let argv_len = usize::try_from(raw.argv_len).map_or(ARGV_LEN, |len| len.min(ARGV_LEN));
    let mut argv = split_argv(&raw.argv[..argv_len]);
    if let Ok(argc) = usize::try_from(raw.argc)
        && argc > 0
    {
        // Never more arguments than the kernel counted (guards against a
        // length that overstates the data).
        argv.truncate(argc);
    }
    ExecRequest {
        origin: origin(&raw.header),
        dev: raw.dev,
        ino: raw.ino,
        content: raw.content,
        filename: PathBuf::from(OsStr::from_bytes(&raw.filename[..end])),
        argv,
        env: split_env(raw),
        argv_truncated: raw.argv_truncated != 0,
        denied_truncated: raw.header.kind == event_kind::EXEC_DENIED
            && raw.denied_for == exec_denied_for::ARGV_TRUNCATED,
        argc: raw.argc,
        interpreter: raw.flags & exec_flags::INTERPRETER != 0,
        via: if raw.flags & exec_flags::MAPPED != 0 {
            Via::Mapped
        } else if raw.flags & exec_flags::FILELESS != 0 {
            Via::Fileless
        } else {
            Via::Exec
        },
    }
}

/// The bound environment variables of an event (`env[..env_len]`, at most
/// `env_count` of them).
fn split_env(raw: &ExecEvent) -> Vec<String> {
    let len = usize::try_from(raw.env_len).map_or(ENV_LEN, |len| len.min(ENV_LEN));
    let mut env = split_argv(&raw.env[..len]);
    env.truncate(usize::try_from(raw.env_count).unwrap_or(usize::MAX));
    env
}

/// [`BoundEnv`] as the bytes of a rule-map value (native order).
fn encode_bound_env(bound: &BoundEnv) -> Vec<u8> {
    let mut out = Vec::with_capacity(size_of::<BoundEnv>());
    out.extend_from_slice(&bound.count.to_ne_bytes());
    out.extend_from_slice(&bound._pad.to_ne_bytes());
    for words in bound.names.iter().chain(&bound.masks) {
        for word in words {
            out.extend_from_slice(&word.to_ne_bytes());
        }
    }
    out
}

/// Decodes an [`encode_bound_env`] value (missing bytes read as zero).
fn decode_bound_env(value: &[u8]) -> BoundEnv {
    let bytes = |at: usize, len: usize| {
        let mut out = [0u8; 8];
        if let Some(slice) = value.get(at..at + len) {
            out[..len].copy_from_slice(slice);
        }
        out
    };
    let mut bound = BoundEnv {
        count: u32::from_ne_bytes(bytes(0, 4)[..4].try_into().unwrap_or_default()),
        ..BoundEnv::default()
    };
    let mut at = 8;
    for words in bound.names.iter_mut().chain(bound.masks.iter_mut()) {
        for word in words {
            *word = u64::from_ne_bytes(bytes(at, 8));
            at += 8;
        }
    }
    bound
}

/// Splits NUL-separated strings (the last may lack its NUL when truncated).
/// Empty arguments count: `b"\0"` is `[""]`.
pub(crate) fn split_argv(bytes: &[u8]) -> Vec<String> {
    if bytes.is_empty() {
        return Vec::new();
    }
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    bytes
        .split(|b| *b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use gatekeep_common::action;

    use super::*;

    #[test]
    fn bound_env_values_round_trip() {
        let bound = BoundEnv::from_names(&[b"PYTHONPATH", b"NODE_OPTIONS"]).expect("valid");
        assert_eq!(decode_bound_env(&encode_bound_env(&bound)), bound);
        assert_eq!(
            decode_bound_env(&[]),
            BoundEnv::default(),
            "absent reads as none"
        );
    }

    #[test]
    fn rule_keys_order_by_policy_then_identity_and_round_trip() {
        let a = rule_key(1, 9, 1);
        let b = rule_key(2, 1, 1);
        let c = rule_key(2, 1, 2);
        assert!(a < b && b < c);
        assert_eq!(decode_identity(&c.key), (1, 2));
        assert_eq!(decode_action(&action::ASK.to_ne_bytes()), action::ASK);
    }

    #[test]
    fn kernel_dev_uses_the_kernel_encoding() {
        let st_dev = libc::makedev(8, 3);
        assert_eq!(kernel_dev(st_dev), (8 << 20) | 3);
        let st_dev = libc::makedev(259, 0x1_0001);
        assert_eq!(kernel_dev(st_dev), (259 << 20) | 0x1_0001);
    }

    #[test]
    fn exec_rule_values_round_trip_with_their_content_version() {
        let rule = ExecRule {
            action: action::ALLOW,
            flags: exec_rule_flags::GENERATION,
            content: ContentVersion {
                ctime_sec: 1_764_000_000,
                ctime_nsec: 999_999_999,
                generation: 0xdead_beef,
                size: 1 << 40,
            },
        };
        let encoded = encode_rule(&rule);
        assert_eq!(encoded.len(), size_of::<ExecRule>());
        assert_eq!(decode_rule(&encoded), rule);
        assert_eq!(decode_action(&encoded), action::ALLOW);
        // The encoding is the kernel struct's bytes.
        // SAFETY: `ExecRule` is `#[repr(C)]` integers, 32 bytes.
        let raw: [u8; 32] = unsafe { std::mem::transmute(rule) };
        assert_eq!(encoded, raw);
    }

    /// Compiles a policy allowing `path`; returns its only exec rule.
    fn compiled_rule(path: &std::path::Path) -> (RuleKey, ExecRule) {
        let text = format!(
            "[[policy]]\nname = \"p\"\ncgroups = [\"/sys/fs/cgroup/p\"]\n[policy.exec]\ndefault = \"deny\"\nallow = [{}]\n",
            serde_json::to_string(path).unwrap()
        );
        let set = gatekeep_policy::parse_str("t.toml", &text).unwrap();
        let mut defaults = gatekeep_common::PolicyDefaults::default();
        let mut rules = std::collections::BTreeMap::new();
        let mut warnings = Vec::new();
        let mut loaded = ExecLoaded::default();
        Exec::compile(
            &set.policies[0],
            &mut Compiling {
                id: 4,
                defaults: &mut defaults,
                rules: &mut rules,
                warnings: &mut warnings,
            },
            &mut loaded,
        )
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(rules.len(), 1);
        let (key, value) = rules.into_iter().next().unwrap();
        (key, decode_rule(&value))
    }

    #[test]
    fn a_rule_records_its_files_content_version_and_a_rewrite_changes_it() {
        use std::io::{Seek as _, Write as _};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        fs::write(&path, b"#!/bin/sh\necho v1\n").unwrap();
        let (key, rule) = compiled_rule(&path);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(key, rule_key(4, kernel_dev(meta.dev()), meta.ino()));
        assert_eq!(rule.action, action::ALLOW);
        assert_eq!(rule.content.ctime_sec, meta.ctime());
        assert_eq!(i64::from(rule.content.ctime_nsec), meta.ctime_nsec());
        assert_eq!(rule.content.size, 18);
        // The generation is recorded exactly when the filesystem tells it.
        let generation = file_generation(&fs::File::open(&path).unwrap());
        assert_eq!(
            rule.flags & exec_rule_flags::GENERATION != 0,
            generation.is_some()
        );
        assert_eq!(rule.content.generation, generation.unwrap_or_default());

        // Rewritten in place with the same size: the same identity, another
        // content version (its ctime), once the clock has moved on.
        let before = rule.content;
        wait_for_ctime_tick(&path, &before);
        let mut file = fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.rewind().unwrap();
        file.write_all(b"#!/bin/sh\necho v2\n").unwrap();
        drop(file);
        let (again_key, again) = compiled_rule(&path);
        assert_eq!(again_key, key, "same file identity");
        assert_eq!(again.content.size, before.size);
        assert_ne!(again.content, before, "a rewrite is a new content version");
    }

    /// Waits until a file written now gets a ctime other than `version`'s
    /// (the kernel's timestamps are coarse: a clock tick, a few ms).
    fn wait_for_ctime_tick(path: &std::path::Path, version: &ContentVersion) {
        let probe = path.with_extension("probe");
        for _ in 0..1000 {
            fs::write(&probe, b"x").unwrap();
            let meta = fs::metadata(&probe).unwrap();
            if (meta.ctime(), meta.ctime_nsec())
                != (version.ctime_sec, i64::from(version.ctime_nsec))
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("the filesystem clock did not move in a second");
    }

    #[test]
    fn a_rescan_keeps_the_binding_made_at_load_and_binds_new_rules() {
        let bound = |size: i64, action: u32| {
            encode_rule(&ExecRule {
                action,
                flags: 0,
                content: ContentVersion {
                    size,
                    ..ContentVersion::default()
                },
            })
        };
        let kept = rule_key(1, 8, 100);
        let appeared = rule_key(1, 8, 200);
        let loaded = std::collections::BTreeMap::from([(kept.clone(), bound(10, action::ALLOW))]);
        let mut rescanned = std::collections::BTreeMap::from([
            (kept.clone(), bound(11, action::ALLOW)),
            (appeared.clone(), bound(20, action::DENY)),
        ]);
        keep_bindings(&mut rescanned, &loaded);
        assert_eq!(rescanned[&kept], bound(10, action::ALLOW));
        assert_eq!(rescanned[&appeared], bound(20, action::DENY));
        // The binding is compared as the whole state: nothing to apply.
        assert_eq!(
            rescanned.get(&kept),
            loaded.get(&kept),
            "a rescan of a rewritten file changes no map entry"
        );
    }

    #[test]
    fn stale_rule_records_parse() {
        let raw = ExecRuleStaleEvent {
            header: gatekeep_common::EventHeader {
                kind: event_kind::EXEC_RULE_STALE,
                policy_id: 3,
                pid: 9,
                tid: 10,
                digest: 77,
                ..Default::default()
            },
            dev: 8,
            ino: 100,
            bound: ContentVersion {
                size: 1,
                ..ContentVersion::default()
            },
            found: ContentVersion {
                size: 2,
                ..ContentVersion::default()
            },
            rule_action: action::ALLOW,
            applied_action: action::ASK,
            rule_flags: exec_rule_flags::GENERATION,
            _pad: 0,
        };
        // SAFETY: a `#[repr(C)]` struct of integers, viewed as its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw const raw).cast::<u8>(),
                size_of::<ExecRuleStaleEvent>(),
            )
        };
        let stale = parse_stale(bytes).unwrap();
        assert_eq!((stale.dev, stale.ino), (8, 100));
        assert_eq!(stale.origin.policy_id, 3);
        assert_eq!(stale.found.size, 2);
        assert_eq!(stale.applied_action, action::ASK);
        assert_eq!(stale.rule_flags, exec_rule_flags::GENERATION);
        assert!(matches!(
            parse_stale(&bytes[..bytes.len() - 1]),
            Err(ParseError::Truncated { .. })
        ));
        assert!(matches!(
            crate::bpf::events::parse(bytes),
            Ok(crate::bpf::events::Event::ExecRuleStale(_))
        ));
    }

    #[test]
    fn a_version_is_settled_only_once_its_tick_has_passed() {
        let at = |ctime_sec, ctime_nsec| ContentVersion {
            ctime_sec,
            ctime_nsec,
            ..ContentVersion::default()
        };
        // Changed in an earlier tick: any later write gets another ctime.
        assert!(settled(&at(100, 5_000_000), (100, 9_000_000)));
        // Changed in the tick the read began in: a write may still keep it.
        assert!(!settled(&at(100, 9_000_000), (100, 9_000_000)));
        assert!(!settled(&at(100, 9_000_001), (100, 9_000_000)));
        // Whole seconds (a filesystem of second granularity): an earlier second only.
        assert!(!settled(&at(100, 0), (100, 500_000_000)));
        assert!(settled(&at(100, 0), (101, 0)));
    }

    #[test]
    fn binding_a_file_changed_a_moment_ago_waits_until_its_version_is_settled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fresh");
        fs::write(&path, b"x").unwrap();
        let bound = bind(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(bound.content.ctime_sec, meta.ctime());
        // Bound after the coarse clock passed the change: a rewrite now
        // necessarily gets another ctime.
        let now = coarse_now();
        assert!(
            settled(&bound.content, now),
            "{:?} vs {now:?}",
            bound.content
        );
    }
}
