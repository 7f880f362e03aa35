//! The one request model through the agent: once a kernel event is parsed and enriched, a
//! paused request is a [`model::ApprovalRequest`] (the domain type the proto crate converts
//! to) under the one request id minted here, plus the few kernel facts only the agent needs
//! ([`KernelFacts`]). The controller builds it, records it (`requested`), hands it to the
//! decider, and the remote decider sends it as it is.
//!
//! Everything is bounded here to the service's limits ([`limits`]), so the service accepts
//! what the agent sends and both audit logs carry the same object.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use gatekeep_proto::{
    audit::{ExecFacts, KernelFacts, Process},
    limits,
    model::{self, ApprovalRequest, ApprovalSettings, ExecTarget, PathCheck, ProcessInfo, Target},
};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{
    bpf::events::Origin,
    pause::{
        enrich::Enrichment,
        exe_path::{self, ExePath},
    },
};

/// Where the kernel says which boot this is.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The kernel's id of the running boot (empty when unreadable: ids then rely on the other
/// inputs, which differ across boots almost always).
#[must_use]
pub fn boot_id(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .unwrap_or_default()
}

/// The request id of a paused request (see `gatekeep_proto::id`): a version 8 UUID from
/// SHA-256 over the host, the boot, and what the kernel paused (thread, first pause in
/// `CLOCK_BOOTTIME` ns, digest). The same paused request gets the same id from a restarted
/// agent; its leading digits are a hash, so short ids differ.
#[must_use]
pub fn request_id(host: &str, boot_id: &str, first_seen_ns: u64, tid: u32, digest: u64) -> Uuid {
    let mut hash = Sha256::new();
    hash.update(b"gatekeep request id v1\0");
    hash.update(host.as_bytes());
    hash.update(b"\0");
    hash.update(boot_id.as_bytes());
    hash.update(b"\0");
    hash.update(first_seen_ns.to_be_bytes());
    hash.update(tid.to_be_bytes());
    hash.update(digest.to_be_bytes());
    let digest = hash.finalize();
    let mut bytes = [0_u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    gatekeep_proto::id::from_hash(bytes)
}

/// Cuts `text` to at most `max` bytes on a character boundary.
#[must_use]
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Argv within the service's limits (the kernel's capture is smaller).
fn bounded_argv(argv: &[String]) -> Vec<String> {
    let mut total = 0;
    let mut out = Vec::new();
    for arg in argv.iter().take(limits::MAX_ARGS) {
        let arg = bounded(&arg.replace('\0', ""), limits::MAX_ARG);
        total += arg.len();
        if total > limits::MAX_ARGV_BYTES {
            break;
        }
        out.push(arg);
    }
    out
}

/// A name the service accepts: no control characters, trimmed, bounded; `None` when nothing
/// is left.
fn clean_name(text: &str) -> Option<String> {
    let cleaned: String = text.chars().filter(|c| !c.is_control()).collect();
    let cleaned = bounded(cleaned.trim(), limits::MAX_NAME);
    let cleaned = cleaned.trim();
    (!cleaned.is_empty()).then(|| cleaned.to_owned())
}

fn path_text(path: &Path) -> String {
    bounded(&path.to_string_lossy().replace('\0', ""), limits::MAX_PATH)
}

/// Wall-clock time at `CLOCK_BOOTTIME` `boot_ns`, given the two clocks now, rounded down to
/// the second: a restarted agent computes the same value for the same paused request (the
/// service compares re-sent requests).
fn wall_at(boot_ns: u64, now: SystemTime, boot_now: u64) -> OffsetDateTime {
    let ago = Duration::from_nanos(boot_now.saturating_sub(boot_ns));
    let at = OffsetDateTime::from(now.checked_sub(ago).unwrap_or(now));
    at.replace_nanosecond(0).unwrap_or(at)
}

/// The cgroup path of an enriched task, or `cgroup-id:N` when `/proc` did not say.
#[must_use]
pub fn cgroup_path(info: &Enrichment, cgroup_id: u64) -> String {
    info.cgroup
        .clone()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| format!("cgroup-id:{cgroup_id}"))
}

/// An exec's target: the executable (absolute; anchored at `/` when the cwd was unreadable),
/// its argv, bounded, and its content version (what a grant binds besides the path).
#[must_use]
pub fn exec_target(
    executable: &Path,
    argv: &[String],
    content: Option<&gatekeep_common::ContentVersion>,
) -> Target {
    let executable = if executable.is_absolute() {
        path_text(executable)
    } else {
        format!("/{}", path_text(executable).trim_start_matches("./"))
    };
    Target::Exec(ExecTarget {
        executable,
        argv: bounded_argv(argv),
        content: content.map(content_text),
        path_check: None,
        named: None,
        file: None,
        mount_namespace: None,
        argv_truncated: false,
        env: Vec::new(),
    })
}

/// An exec's target as the agent saw it on this host: the executable is the host's path of
/// the file that runs when the agent verified it, the workload's name for it otherwise
/// (marked unverified, with the file's device and inode); the name passed is added when it
/// differs, and a mount namespace other than the agent's is noted (see
/// [`crate::pause::exe_path`]).
#[must_use]
pub fn exec_target_seen(
    seen: &ExePath,
    file: (u64, u64),
    argv: &[String],
    content: Option<&gatekeep_common::ContentVersion>,
) -> Target {
    let mut target = exec_target(&seen.path, argv, content);
    if let Target::Exec(exec) = &mut target {
        exec.path_check = Some(if seen.verified {
            PathCheck::Verified
        } else {
            PathCheck::Unverified
        });
        let named = exec_target(&seen.named, &[], None);
        if let Target::Exec(named) = named
            && named.executable != exec.executable
        {
            exec.named = Some(named.executable);
        }
        exec.file = Some(exe_path::file_identity(file.0, file.1));
        exec.mount_namespace = seen.mount_namespace.as_deref().and_then(clean_name);
    }
    target
}

/// The text of a content version in a request's target:
/// `<ctime seconds>.<ctime nanoseconds, 9 digits>:<size>:<generation>`.
#[must_use]
pub fn content_text(content: &gatekeep_common::ContentVersion) -> String {
    format!(
        "{}.{:09}:{}:{}",
        content.ctime_sec, content.ctime_nsec, content.size, content.generation
    )
}

/// The ancestry in the model's form, bounded.
fn ancestry(info: &Enrichment) -> Vec<ProcessInfo> {
    info.ancestry
        .iter()
        .take(limits::MAX_ANCESTRY)
        .map(|process| ProcessInfo {
            pid: process.pid,
            comm: bounded(&process.comm.replace('\0', ""), limits::MAX_NAME),
            executable: process.exe.as_deref().map(path_text),
            argv: bounded_argv(&process.cmdline),
            cgroup: process
                .cgroup
                .as_deref()
                .map(|c| bounded(c, limits::MAX_PATH)),
        })
        .collect()
}

/// The task an agent record is about.
#[must_use]
pub fn process(origin: &Origin, info: &Enrichment) -> Process {
    Process {
        pid: origin.pid,
        tid: origin.tid,
        uid: origin.uid,
        user: info.user.as_deref().and_then(clean_name),
        cgroup: info.cgroup.clone(),
        cwd: info.cwd.as_deref().map(path_text),
        ancestry: ancestry(info),
    }
}

/// What the kernel reported beyond the request: for an exec, `exec` (its hook says what).
#[must_use]
pub fn kernel_facts(
    origin: &Origin,
    exec: Option<ExecFacts>,
    sock_type: Option<u32>,
) -> KernelFacts {
    KernelFacts {
        policy_id: origin.policy_id,
        digest: format!("{:016x}", origin.digest),
        cgroup_id: origin.cgroup_id,
        ppid: origin.ppid,
        gid: origin.gid,
        comm: origin.comm.clone(),
        exec,
        sock_type,
        call: None,
    }
}

/// What the controller knows of an ask when it builds the request.
pub struct Ask<'a> {
    pub id: Uuid,
    pub policy: &'a str,
    pub rule: &'a str,
    pub origin: &'a Origin,
    pub info: &'a Enrichment,
    pub target: Target,
    pub approval: ApprovalSettings,
    pub on_timeout: model::Verdict,
    /// The policy's approval timeout.
    pub timeout: Duration,
    /// `CLOCK_BOOTTIME` ns of the kernel's first pause of it.
    pub first_seen_ns: u64,
}

/// The paused request in the domain model, given the wall clock `now` and the boot clock
/// `boot_now` (ns).
#[must_use]
pub fn approval_request(ask: Ask<'_>, now: SystemTime, boot_now: u64) -> ApprovalRequest {
    let first_seen = if ask.first_seen_ns == 0 {
        boot_now
    } else {
        ask.first_seen_ns
    };
    let requested_at = wall_at(first_seen, now, boot_now);
    // Rounded up to the second after the agent's own deadline: the agent applies the
    // timeout action first, and the same value comes out again after a restart.
    let timeout = time::Duration::try_from(ask.timeout.min(Duration::from_hours(24)))
        .unwrap_or(time::Duration::HOUR);
    let deadline = requested_at + timeout + time::Duration::SECOND;
    ApprovalRequest {
        id: ask.id,
        policy: clean_name(ask.policy).unwrap_or_else(|| "unnamed".to_owned()),
        rule: clean_name(ask.rule).unwrap_or_else(|| "default".to_owned()),
        cgroup: bounded(
            &cgroup_path(ask.info, ask.origin.cgroup_id),
            limits::MAX_PATH,
        ),
        pid: ask.origin.pid,
        tid: ask.origin.tid,
        uid: ask.origin.uid,
        user_name: ask.info.user.as_deref().and_then(clean_name),
        cwd: ask.info.cwd.as_deref().map(path_text),
        ancestry: ancestry(ask.info),
        target: ask.target,
        requested_at,
        deadline,
        on_timeout: ask.on_timeout,
        approval: ask.approval,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use gatekeep_policy::GrantDuration;
    use gatekeep_proto::{model::SocketType, v1};

    use super::*;
    use crate::{
        hooks::connect::{Destination, connect_target},
        pause::enrich::ProcessInfo as LocalProcess,
    };

    fn origin() -> Origin {
        Origin {
            policy_id: 3,
            pid: 100,
            tid: 101,
            uid: 1000,
            gid: 1000,
            ppid: 1,
            cgroup_id: 42,
            ktime_ns: 0,
            digest: 0xaa,
            comm: "bash".into(),
        }
    }

    fn info() -> Enrichment {
        Enrichment {
            ancestry: vec![LocalProcess {
                pid: 100,
                comm: "bash".into(),
                exe: Some("/bin/bash".into()),
                cmdline: vec!["bash".into(), "-c".into(), "curl x".into()],
                cgroup: Some("/agents/a1".into()),
            }],
            cwd: Some("/work".into()),
            user: Some("worker".into()),
            cgroup: Some("/agents/a1".into()),
        }
    }

    fn ask<'a>(origin: &'a Origin, info: &'a Enrichment, target: Target) -> Ask<'a> {
        Ask {
            id: request_id("h", "boot", 5_000_000_000, origin.tid, origin.digest),
            policy: "agents",
            rule: "exec default ask",
            origin,
            info,
            target,
            approval: ApprovalSettings {
                grant_durations: vec![GrantDuration::Once, GrantDuration::Session],
                ..ApprovalSettings::default()
            },
            on_timeout: model::Verdict::Deny,
            timeout: Duration::from_mins(5),
            first_seen_ns: 5_000_000_000,
        }
    }

    /// Through the wire form and back, as the link and the service check it.
    fn valid(request: ApprovalRequest) -> ApprovalRequest {
        ApprovalRequest::try_from(v1::ApprovalRequest::from(request))
            .expect("the service accepts it")
    }

    #[test]
    fn request_ids_are_stable_for_one_pause_and_differ_otherwise() {
        let id = request_id("h", "b", 5, 100, 0xaa);
        assert_eq!(id, request_id("h", "b", 5, 100, 0xaa));
        for other in [
            request_id("h2", "b", 5, 100, 0xaa),
            request_id("h", "b2", 5, 100, 0xaa),
            request_id("h", "b", 6, 100, 0xaa),
            request_id("h", "b", 5, 101, 0xaa),
            request_id("h", "b", 5, 100, 0xab),
        ] {
            assert_ne!(id, other);
        }
        assert_eq!(gatekeep_proto::id::parse(&id.to_string()), Ok(id));
        assert_eq!(id.get_version_num(), 8);
    }

    #[test]
    fn request_ids_of_requests_made_close_together_have_distinct_short_ids() {
        // The old ids led with the time: every id of one host started `00000000`.
        let ids: Vec<Uuid> = (0..64_u32)
            .map(|n| request_id("h", "b", 5_000_000_000 + u64::from(n), 100 + n, 7))
            .collect();
        let shorts = gatekeep_proto::id::short_ids(&ids);
        let eight: std::collections::HashSet<&str> = shorts.iter().map(|s| &s[..8]).collect();
        assert_eq!(eight.len(), ids.len(), "{shorts:?}");
    }

    #[test]
    fn an_exec_becomes_a_valid_approval_request_with_its_context() {
        let (origin, info) = (origin(), info());
        let content = gatekeep_common::ContentVersion {
            ctime_sec: 1_764_000_000,
            ctime_nsec: 5,
            generation: 42,
            size: 4096,
        };
        let target = exec_target(
            Path::new("/usr/bin/curl"),
            &["curl".into(), "https://example.org".into()],
            Some(&content),
        );
        // The content version travels with the target (grants bind it).
        let model::Target::Exec(exec) = &target else {
            panic!("an exec target")
        };
        assert_eq!(
            exec.content.as_deref(),
            Some("1764000000.000000005:4096:42")
        );
        let asked = ask(&origin, &info, target);
        let id = asked.id;
        let now = SystemTime::UNIX_EPOCH
            + Duration::from_secs(1_700_000_000)
            + Duration::from_millis(700);
        let approval = valid(approval_request(asked, now, 7_000_000_000));
        assert_eq!(approval.id, id);
        assert_eq!(approval.policy, "agents");
        assert_eq!(approval.rule, "exec default ask");
        assert_eq!(approval.cgroup, "/agents/a1");
        assert_eq!((approval.pid, approval.tid, approval.uid), (100, 101, 1000));
        assert_eq!(approval.user_name.as_deref(), Some("worker"));
        assert_eq!(approval.cwd.as_deref(), Some("/work"));
        assert_eq!(approval.ancestry[0].argv, ["bash", "-c", "curl x"]);
        let Target::Exec(exec) = &approval.target else {
            panic!("exec")
        };
        assert_eq!(exec.executable, "/usr/bin/curl");
        assert_eq!(exec.argv, ["curl", "https://example.org"]);
        // First seen 2 s before `now`, rounded down to the second.
        assert_eq!(approval.requested_at.unix_timestamp(), 1_699_999_998);
        assert_eq!(approval.requested_at.nanosecond(), 0);
        assert_eq!(
            approval.deadline - approval.requested_at,
            time::Duration::seconds(301)
        );
        assert_eq!(approval.on_timeout, model::Verdict::Deny);
        assert!(approval.approval.allows(GrantDuration::Session));

        // The same paused request seen again a moment later (a restarted agent): the very
        // same request.
        let later = now + Duration::from_millis(150);
        let target = exec_target(
            Path::new("/usr/bin/curl"),
            &["curl".into(), "https://example.org".into()],
            Some(&content),
        );
        let again = valid(approval_request(
            ask(&origin, &info, target),
            later,
            7_150_000_000,
        ));
        assert_eq!(again, approval);
    }

    #[test]
    fn an_exec_target_shows_the_file_that_runs_and_notes_the_name_and_namespace() {
        let exec_of = |target: Target| match target {
            Target::Exec(exec) => exec,
            Target::Connect(_) => panic!("an exec target"),
        };
        let argv = ["echo".to_owned(), "hi".to_owned()];
        // A decoy: another file bound over the name, in another mount namespace.
        let decoy = ExePath {
            path: "/tmp/x/evil".into(),
            verified: true,
            named: "/tmp/innocent/echo".into(),
            mount_namespace: Some("mnt:[4026532301]".into()),
        };
        let exec = exec_of(exec_target_seen(&decoy, (30, 1234), &argv, None));
        assert_eq!(exec.executable, "/tmp/x/evil");
        assert_eq!(exec.path_check, Some(PathCheck::Verified));
        assert_eq!(exec.named.as_deref(), Some("/tmp/innocent/echo"));
        assert_eq!(exec.file.as_deref(), Some("0:30 1234"));
        assert_eq!(exec.mount_namespace.as_deref(), Some("mnt:[4026532301]"));
        assert_eq!(exec.argv, argv);

        // The plain case: the name is the file, nothing more to say.
        let plain = ExePath {
            path: "/usr/bin/echo".into(),
            verified: true,
            named: "/usr/bin/echo".into(),
            mount_namespace: None,
        };
        let exec = exec_of(exec_target_seen(&plain, (8 << 20 | 1, 7), &argv, None));
        assert_eq!(exec.executable, "/usr/bin/echo");
        assert_eq!(exec.named, None);
        assert_eq!(exec.mount_namespace, None);
        assert_eq!(exec.file.as_deref(), Some("8:1 7"));

        // Not found on the host: the name, marked unverified (never passed as verified).
        let unseen = ExePath {
            verified: false,
            path: "/tmp/innocent/echo".into(),
            ..decoy
        };
        let target = exec_target_seen(&unseen, (99, 5), &argv, None);
        let (origin, info) = (origin(), info());
        let approval = valid(approval_request(
            ask(&origin, &info, target),
            SystemTime::now(),
            7_000_000_000,
        ));
        let exec = exec_of(approval.target);
        assert_eq!(exec.executable, "/tmp/innocent/echo");
        assert_eq!(exec.path_check, Some(PathCheck::Unverified));
        assert_eq!(exec.named, None, "the same text as the executable");
        assert_eq!(exec.file.as_deref(), Some("0:99 5"));
    }

    #[test]
    fn a_connect_becomes_a_valid_approval_request() {
        let (origin, info) = (origin(), info());
        let ip = connect_target(
            &Destination::Ip {
                addr: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
                port: 443,
            },
            1,
            &[],
        );
        let approval = valid(approval_request(
            ask(&origin, &info, ip),
            SystemTime::now(),
            6_000_000_000,
        ));
        let Target::Connect(connect) = &approval.target else {
            panic!("connect")
        };
        assert_eq!(
            (connect.address.as_str(), connect.port, connect.socket_type),
            ("10.1.2.3", 443, SocketType::Stream)
        );
        let unix = connect_target(
            &Destination::Unix {
                path: String::new(),
                name: Vec::new(),
            },
            1,
            &[],
        );
        valid(approval_request(
            ask(&origin, &info, unix),
            SystemTime::now(),
            6_000_000_000,
        ));
    }

    #[test]
    fn oversized_and_odd_fields_are_bounded_not_refused() {
        let origin = origin();
        let mut info = info();
        info.user = Some(" \u{7}".into());
        info.cgroup = None;
        let argv: Vec<String> = (0..400)
            .map(|i| format!("{i}{}", "x".repeat(200)))
            .collect();
        let target = exec_target(Path::new("tool"), &argv, None);
        let rule = format!("exec {} ask", "/very/long".repeat(100));
        let mut asked = ask(&origin, &info, target);
        asked.rule = &rule;
        let approval = valid(approval_request(asked, SystemTime::now(), 6_000_000_000));
        assert!(approval.rule.len() <= limits::MAX_NAME);
        assert_eq!(approval.user_name, None);
        assert_eq!(approval.cgroup, "cgroup-id:42");
        let Target::Exec(exec) = &approval.target else {
            panic!("exec")
        };
        assert_eq!(exec.executable, "/tool");
        assert!(exec.argv.len() <= limits::MAX_ARGS);
    }
}
