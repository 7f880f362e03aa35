//! The exec hook (`bprm_check_security`; kernel half:
//! `gatekeep-ebpf/src/hooks/exec.rs`): its requests, and `[policy.exec]`
//! compiled into `EXEC_RULES`.
//!
//! Exec rules: each path is `stat`ed (symlinks followed) and keyed by the
//! file's identity in the kernel's encoding (`dev = major << 20 | minor`).
//! A path that does not exist on this host is skipped with a warning and
//! picked up by a later rescan if it appears.

use std::{
    collections::HashMap,
    ffi::OsStr,
    fs,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::PathBuf,
};

use aya::maps::{Map, MapError};
use gatekeep_common::{ARGV_LEN, ExecEvent, ExecRuleKey, event_kind, map_names, request_kind};
use gatekeep_policy::Policy;
use gatekeep_proto::{
    audit::{ExecFacts, KernelFacts},
    model,
};

use super::{Compiling, Hook, RuleKey, absent_is_ok, kernel_action};
use crate::{
    bpf::record::{Origin, ParseError, origin, read},
    pause::{enrich::Enricher, request},
    policy::error::PolicyMapsError,
};

/// An exec as the kernel saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub origin: Origin,
    /// Kernel device number (`major << 20 | minor`) and inode of the file.
    pub dev: u64,
    pub ino: u64,
    /// The path as passed to execve (may be relative).
    pub filename: PathBuf,
    pub argv: Vec<String>,
    /// Argv was longer than the kernel captures.
    pub argv_truncated: bool,
    /// Number of arguments the kernel counted.
    pub argc: u32,
}

/// The exec hook.
pub struct Exec;

impl Hook for Exec {
    const NAME: &'static str = "exec";
    const MODEL_KIND: model::Kind = model::Kind::Exec;
    const KIND: u32 = request_kind::EXEC;
    const ASK: (u32, &'static str) = (event_kind::EXEC_ASK, "exec_ask");
    const DENIED: (u32, &'static str) = (event_kind::EXEC_DENIED, "exec_denied");
    const RULE_MAPS: &'static [&'static str] = &[map_names::EXEC_RULES];

    type Request = ExecRequest;
    /// (dev, ino) -> rule path, to name the rule that matched an exec.
    type Loaded = HashMap<(u64, u64), PathBuf>;

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
        for rule in &policy.exec.rules {
            match fs::metadata(&rule.path) {
                Ok(meta) if meta.is_file() => {
                    let identity = (kernel_dev(meta.dev()), meta.ino());
                    out.rules.insert(
                        rule_key(out.id, identity.0, identity.1),
                        kernel_action(rule.action).to_ne_bytes().to_vec(),
                    );
                    exec_paths.insert(identity, rule.path.clone());
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
        Ok(())
    }

    fn read_map(name: &'static str, map: &Map) -> Result<Vec<(RuleKey, Vec<u8>)>, MapError> {
        let rules = aya::maps::HashMap::<_, ExecRuleKey, u32>::try_from(map)?;
        rules
            .iter()
            .map(|entry| {
                entry.map(|(key, action)| {
                    let mut rule = rule_key(key.policy_id, key.dev, key.ino);
                    rule.map = name;
                    (rule, action.to_ne_bytes().to_vec())
                })
            })
            .collect()
    }

    fn write_map(map: &mut Map, key: &RuleKey, value: Option<&[u8]>) -> Result<(), MapError> {
        let mut rules = aya::maps::HashMap::<_, ExecRuleKey, u32>::try_from(map)?;
        let (dev, ino) = decode_identity(&key.key);
        let kernel_key = ExecRuleKey {
            policy_id: key.policy_id,
            _pad: 0,
            dev,
            ino,
        };
        match value {
            Some(value) => rules.insert(kernel_key, decode_action(value), 0),
            None => absent_is_ok(rules.remove(&kernel_key)),
        }
    }

    fn rule(policy: &Policy, exec_paths: &Self::Loaded, request: &ExecRequest) -> String {
        match exec_paths.get(&(request.dev, request.ino)) {
            Some(path) => {
                let action = policy
                    .exec
                    .rules
                    .iter()
                    .find(|rule| &rule.path == path)
                    .map_or(policy.exec.default, |rule| rule.action);
                format!("exec {action} {}", path.display())
            }
            None => format!("exec default {}", policy.exec.default),
        }
    }

    fn target(request: &ExecRequest, enricher: &Enricher) -> model::Target {
        request::exec_target(
            &enricher.display_path(request.origin.pid, &request.filename),
            &request.argv,
        )
    }

    fn kernel_facts(request: &ExecRequest) -> KernelFacts {
        let exec = ExecFacts {
            filename: request.filename.to_string_lossy().into_owned(),
            dev: request.dev,
            ino: request.ino,
            argc: request.argc,
            argv_truncated: request.argv_truncated,
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
    let mut bytes = [0; 4];
    if let Some(slice) = value.get(..4) {
        bytes.copy_from_slice(slice);
    }
    u32::from_ne_bytes(bytes)
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
        filename: PathBuf::from(OsStr::from_bytes(&raw.filename[..end])),
        argv,
        argv_truncated: raw.argv_truncated != 0,
        argc: raw.argc,
    }
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
}
