//! The agent's admin subcommands: `policy validate`, `audit verify`,
//! `audit export`, `status` and `unload`.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use gatekeep_audit::{AuditError, ExportFilter};
use gatekeep_common::{Verdict, VerdictKey, action, map_names};
use gatekeep_policy::PolicyError;
use gatekeep_util::retry::poll_until_blocking;
use serde::Serialize;

use crate::{
    bpf::{
        kernel::{COUNTER_NAMES, KernelMaps, VERDICT_TTL, boot_time_ns},
        pinning::{self, PinLayout, PinningError},
    },
    decision::grants::{self, LocalGrant},
    pause::resume::{ProcTasks, Tasks as _},
    protect::{self, ProtectError, ProtectMaps},
};

/// Errors of the admin subcommands.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{source}")]
    Policy {
        #[source]
        source: PolicyError,
    },
    #[error("audit log `{}` failed verification", path.display())]
    Verify {
        path: PathBuf,
        #[source]
        source: AuditError,
    },
    #[error("failed to export audit log `{}`", path.display())]
    Export {
        path: PathBuf,
        #[source]
        source: AuditError,
    },
    #[error("failed to create `{}`", path.display())]
    Output {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Pinning(#[from] PinningError),
    #[error("failed to read kernel map `{map}`")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("failed to read or write the self-protection maps")]
    Protect {
        #[source]
        source: ProtectError,
    },
    #[error("failed to write the report")]
    Write {
        #[source]
        source: io::Error,
    },
}

/// `policy validate`: every problem of every file, or a one-line summary
/// after the warnings (where a valid policy cannot keep its promise on this
/// host; they do not fail validation).
pub fn validate_policy(paths: &[PathBuf], out: &mut impl Write) -> Result<(), AdminError> {
    let validation =
        gatekeep_policy::validate_paths(paths).map_err(|source| AdminError::Policy { source })?;
    let write = |out: &mut dyn Write| {
        for warning in &validation.warnings {
            // Rule paths and `#!` lines come from files: control characters
            // are escaped.
            writeln!(
                out,
                "warning[{}]: {}",
                warning.kind,
                escape_controls(&warning.to_string())
            )?;
        }
        writeln!(out, "ok: {}", validation.summary)
    };
    write(out).map_err(|source| AdminError::Write { source })
}

/// `text` with control, bidirectional and invisible format characters (and
/// the backslash) escaped, so file contents cannot drive a terminal.
fn escape_controls(text: &str) -> String {
    text.chars()
        .map(|c| {
            let format = matches!(
                c,
                '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}'
            );
            if c == '\\' || c.is_control() || format {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `audit verify`: proves the hash chain.
pub fn verify_audit(path: &Path, json: bool, out: &mut impl Write) -> Result<(), AdminError> {
    let report = gatekeep_audit::verify(path).map_err(|source| AdminError::Verify {
        path: path.to_owned(),
        source,
    })?;
    let written = if json {
        serde_json::to_string(&report)
            .map_err(io::Error::other)
            .and_then(|text| writeln!(out, "{text}"))
    } else {
        let head = report.head.as_ref().map_or_else(
            || "empty log".to_owned(),
            |h| format!("head seq {} hash {}", h.seq, h.hash),
        );
        let guards = match report.guards_intact {
            Some(false) => "; WARNING: the append-only triggers are missing or altered",
            _ => "",
        };
        writeln!(
            out,
            "ok: {} records, chain intact, {head}{guards}",
            report.records
        )
    };
    written.map_err(|source| AdminError::Write { source })
}

/// `audit export --format jsonl`.
pub fn export_audit(
    path: &Path,
    from_seq: Option<u64>,
    output: Option<&Path>,
) -> Result<u64, AdminError> {
    let filter = ExportFilter {
        from_seq,
        kind: None,
    };
    let export = |writer: &mut dyn Write| {
        gatekeep_audit::export(path, writer, &filter).map_err(|source| AdminError::Export {
            path: path.to_owned(),
            source,
        })
    };
    match output {
        Some(file) => {
            let mut out = std::fs::File::create(file).map_err(|source| AdminError::Output {
                path: file.to_owned(),
                source,
            })?;
            export(&mut out)
        }
        None => export(&mut io::stdout().lock()),
    }
}

/// What `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: PathBuf,
    pub programs_pinned: Vec<&'static str>,
    pub programs_missing: Vec<&'static str>,
    pub paused_requests: Vec<PausedRequest>,
    pub counters: Vec<(&'static str, u64)>,
    /// Granted durations the agent keeps (`state_dir/grants.json`).
    pub grants: Vec<GrantStatus>,
    /// Entries of the kernel's `GRANTS` map.
    pub kernel_grants: usize,
    /// Self-protection refusals the kernel counted, per protection and
    /// cgroup (issue 18), most first.
    pub protect_refusals: Vec<ProtectRefusals>,
    /// Processes gated tasks may not signal or trace (pids).
    pub protected_processes: Vec<u32>,
    /// Whether the audit log can be written.
    pub audit: AuditStatus,
}

/// The audit log's state: what the running agent last reported (its health file) and the
/// free space of the log's filesystem, measured now.
#[derive(Debug, Serialize)]
pub struct AuditStatus {
    pub audit_db: PathBuf,
    /// `writable`, `failing`, or `unknown` (no health file: no agent runs, or it could not
    /// write the file, which the free space below then explains).
    pub state: &'static str,
    /// The agent's report, as written.
    pub health: Option<crate::audit_health::HealthFile>,
    /// Bytes available to the agent (root) on the log's filesystem now.
    pub free_bytes: Option<u64>,
    /// One line for humans: the condition, its cause and the fix.
    pub summary: String,
}

/// The audit part of `status`.
#[must_use]
pub fn audit_status(audit_db: &Path, state_dir: &Path) -> AuditStatus {
    let health = crate::audit_health::read(state_dir);
    let dir = audit_db
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let free_bytes = nix::sys::statvfs::statvfs(dir)
        .ok()
        .map(|fs| fs.blocks_free().saturating_mul(fs.fragment_size()));
    let free = free_bytes.map_or_else(|| "unknown".to_owned(), |b| format!("{b} bytes"));
    let (state, summary) = match health.as_ref().map(|h| &h.health.failing) {
        Some(None) => (
            "writable",
            format!(
                "writable ({free} free on the filesystem of {})",
                dir.display()
            ),
        ),
        Some(Some(failure)) => (
            "failing",
            format!(
                "CANNOT WRITE since {since} ({cause}: {error}); asked actions are denied; \
                 {held} record(s) held in memory (at most {cap}), {lost} lost; fix: {fix}",
                since = gatekeep_audit::timestamp::format(failure.since).unwrap_or_default(),
                cause = failure.cause.as_str(),
                error = failure.error,
                held = failure.held,
                cap = failure.held_capacity,
                lost = failure.lost,
                fix = failure.fix,
            ),
        ),
        None => (
            "unknown",
            format!(
                "unknown: no health file in {} (no agent runs, or it could not write there); {free} free on the filesystem of {}",
                state_dir.display(),
                dir.display()
            ),
        ),
    };
    AuditStatus {
        audit_db: audit_db.to_owned(),
        state,
        health,
        free_bytes,
        summary,
    }
}

/// Refusals of one self-protection in one cgroup since the programs were
/// loaded.
#[derive(Debug, Serialize)]
pub struct ProtectRefusals {
    pub protection: &'static str,
    pub cgroup_id: u64,
    pub count: u64,
}

/// One granted duration.
#[derive(Debug, Serialize)]
pub struct GrantStatus {
    #[serde(flatten)]
    pub grant: LocalGrant,
    /// Whether the kernel holds an entry with its digest.
    pub in_kernel: bool,
}

#[derive(Debug, Serialize)]
pub struct PausedRequest {
    pub pid: u32,
    pub tid: u32,
    pub kind: &'static str,
    pub policy_id: u32,
    pub paused_for_ms: u64,
}

/// `status`: which programs are pinned, what is paused, the counters, the
/// granted durations (from `state_dir`).
pub fn status(pin_dir: &Path, state_dir: &Path, audit_db: &Path) -> Result<Status, AdminError> {
    let layout = PinLayout::new(pin_dir);
    let pinned = layout.pinned_programs();
    let missing = PinLayout::programs()
        .into_iter()
        .filter(|p| !pinned.contains(p))
        .collect();
    let mut status = Status {
        pin_dir: pin_dir.to_owned(),
        programs_pinned: pinned,
        programs_missing: missing,
        paused_requests: Vec::new(),
        counters: Vec::new(),
        grants: Vec::new(),
        kernel_grants: 0,
        protect_refusals: Vec::new(),
        protected_processes: Vec::new(),
        audit: audit_status(audit_db, state_dir),
    };
    let mut kernel_digests = Vec::new();
    if layout.map(map_names::PENDING).exists() {
        let maps = KernelMaps::open(&layout)?;
        let now = boot_time_ns();
        for (tid, pending) in maps.pending().map_err(|source| AdminError::Map {
            map: map_names::PENDING,
            source,
        })? {
            status.paused_requests.push(PausedRequest {
                pid: pending.pid,
                tid,
                kind: crate::bpf::events::RequestKind::from_raw(pending.kind).as_str(),
                policy_id: pending.policy_id,
                paused_for_ms: now.saturating_sub(pending.created_ns) / 1_000_000,
            });
        }
        let counters = maps.counters().map_err(|source| AdminError::Map {
            map: map_names::COUNTERS,
            source,
        })?;
        status.counters = COUNTER_NAMES.iter().copied().zip(counters).collect();
        let entries = maps.grants().map_err(|source| AdminError::Map {
            map: map_names::GRANTS,
            source,
        })?;
        status.kernel_grants = entries.len();
        kernel_digests = entries.iter().map(|(key, _)| key.digest).collect();
    }
    if layout.map("PROTECT_DENIALS").exists() {
        let maps = ProtectMaps::open(&layout)?;
        let protect_error = |source| AdminError::Protect { source };
        let mut refusals: Vec<ProtectRefusals> = maps
            .denials()
            .map_err(protect_error)?
            .into_iter()
            .map(|(key, count)| ProtectRefusals {
                protection: protect::protection_name(key.hook),
                cgroup_id: key.cgroup_id,
                count,
            })
            .collect();
        refusals.sort_by(|a, b| b.count.cmp(&a.count).then(a.cgroup_id.cmp(&b.cgroup_id)));
        status.protect_refusals = refusals;
        status.protected_processes = maps
            .processes()
            .map_err(protect_error)?
            .into_iter()
            .map(|(pid, _)| pid)
            .collect();
        status.protected_processes.sort_unstable();
    }
    status.grants = grants::read_file(&state_dir.join(crate::paths::GRANTS_FILE))
        .into_iter()
        .map(|grant| GrantStatus {
            in_kernel: u64::from_str_radix(&grant.digest, 16)
                .is_ok_and(|digest| kernel_digests.contains(&digest)),
            grant,
        })
        .collect();
    Ok(status)
}

/// `protect PID`: gated tasks may no longer signal or trace process `pid`
/// (a local `gatekeep-server`, say), while it runs.
pub fn protect_process(pin_dir: &Path, proc_root: &Path, pid: u32) -> Result<(), AdminError> {
    let layout = PinLayout::new(pin_dir);
    let mut maps = ProtectMaps::open(&layout)?;
    maps.protect_process(proc_root, pid)
        .map_err(|source| AdminError::Protect { source })
}

/// What `unload` did.
#[derive(Debug, Default, Serialize)]
pub struct Unloaded {
    /// Paused requests denied (verdict written, task continued) first.
    pub denied: usize,
    /// Tasks still paused when the programs went away.
    pub still_paused: Vec<u32>,
    pub pins_removed: Vec<PathBuf>,
}

/// `unload`: denies every paused request (so no task is left stopped with
/// nobody to continue it, and none slips through un-gated), then removes
/// the pinned programs and maps.
pub fn unload(pin_dir: &Path, proc_root: &Path) -> Result<Unloaded, AdminError> {
    let layout = PinLayout::new(pin_dir);
    let mut report = Unloaded::default();
    if layout.map(map_names::PENDING).exists() && !layout.pinned_programs().is_empty() {
        let mut maps = KernelMaps::open(&layout)?;
        let tasks = ProcTasks::new(proc_root);
        let pending = maps.pending().map_err(|source| AdminError::Map {
            map: map_names::PENDING,
            source,
        })?;
        let expires_ns = boot_time_ns()
            .saturating_add(u64::try_from(VERDICT_TTL.as_nanos()).unwrap_or(u64::MAX));
        for (tid, request) in &pending {
            let key = VerdictKey {
                tid: *tid,
                _pad: 0,
                digest: request.digest,
                start_ns: request.start_ns,
            };
            let verdict = Verdict {
                action: action::DENY,
                _pad: 0,
                expires_ns,
            };
            if maps.write_verdict(key, verdict).is_ok() && tasks.sigcont(request.pid).is_ok() {
                report.denied += 1;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut left = Ok(Vec::new());
        poll_until_blocking(deadline, Duration::from_millis(20), || {
            left = maps.pending();
            // Done when none is left, or reading failed (reported below).
            left.as_ref()
                .map_or(Some(()), |left| left.is_empty().then_some(()))
        });
        let left = left.map_err(|source| AdminError::Map {
            map: map_names::PENDING,
            source,
        })?;
        report.still_paused = left.iter().map(|(tid, _)| *tid).collect();
    }
    report.pins_removed = pinning::unpin_all(&layout)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_reports_a_summary_or_every_diagnostic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("good.toml");
        std::fs::write(
            &good,
            "[[policy]]\nname = \"a\"\ncgroups = [\"/sys/fs/cgroup/a\"]\n[policy.exec]\ndefault = \"ask\"\nunlisted_mappings = \"default\"\n",
        )
        .expect("write");
        let mut out = Vec::new();
        validate_policy(std::slice::from_ref(&good), &mut out).expect("valid");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.starts_with("ok: 1 policy"), "{text}");

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[[policy]]\nname = \"b\"\ncgroups = [\"/sys/fs/cgroup/b\"]\n[policy.exec]\ndefault = \"alow\"\n")
            .expect("write");
        let err = validate_policy(&[bad], &mut Vec::new()).expect_err("invalid");
        let message = err.to_string();
        assert!(message.contains("bad.toml:5:"), "{message}");
        assert!(message.contains("alow"), "{message}");
    }

    #[test]
    fn validate_prints_warnings_escaped_before_the_summary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("warn.toml");
        // TOML escapes: the rule's path holds ESC and a right-to-left override.
        std::fs::write(
            &file,
            format!(
                "[[policy]]\nname = \"w\"\ncgroups = [\"/sys/fs/cgroup/w\"]\n[policy.exec]\ndefault = \"deny\"\nallow = [\"{}/gone\\u001b[2J\\u202e\"]\nunlisted_mappings = \"default\"\n",
                dir.path().display()
            ),
        )
        .expect("write");
        let mut out = Vec::new();
        validate_policy(std::slice::from_ref(&file), &mut out).expect("warnings do not fail");
        let text = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].starts_with(&format!(
                "warning[missing-path]: {}:6:10: policy \"w\": exec allow rule \"{}/gone\\u{{1b}}[2J\\u{{202e}}\" names a file that does not exist",
                file.display(),
                dir.path().display()
            )),
            "{text}"
        );
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{202e}'),
            "{text}"
        );
        assert_eq!(lines[1], "ok: 1 policy, 1 exec rule, 0 connect rules");
    }

    #[test]
    fn audit_verify_and_export_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.db");
        let mut store = gatekeep_audit::AuditStore::open(&path).expect("open");
        let records: Vec<_> = (0..3)
            .map(|i| {
                gatekeep_audit::AuditRecord::new(
                    gatekeep_audit::RecordKind::Requested,
                    "h",
                    serde_json::json!({ "i": i }),
                )
            })
            .collect();
        store.append_batch(&records).expect("append");
        drop(store);
        let mut out = Vec::new();
        verify_audit(&path, false, &mut out).expect("verify");
        assert!(
            String::from_utf8(out)
                .expect("utf8")
                .starts_with("ok: 3 records")
        );
        let export = dir.path().join("out.jsonl");
        assert_eq!(export_audit(&path, None, Some(&export)).expect("export"), 3);
        let text = std::fs::read_to_string(&export).expect("read");
        assert_eq!(text.lines().count(), 3);
        let report = gatekeep_audit::verify_export(text.as_bytes()).expect("export verifies");
        assert_eq!(report.records, 3);
    }

    #[test]
    fn the_audit_status_names_the_condition_the_cause_and_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("audit.db");
        let failing = gatekeep_audit::WriterHealth {
            failing: Some(gatekeep_audit::Failure {
                path: db.clone(),
                cause: gatekeep_audit::FailureCause::DiskFull,
                error: "audit log database error: database or disk is full".into(),
                fix: gatekeep_audit::FailureCause::DiskFull.fix(&db),
                since: time::OffsetDateTime::UNIX_EPOCH,
                held: 3,
                held_capacity: 16_384,
                lost: 0,
                attempts: 4,
            }),
            recovered: 0,
        };
        let file = crate::audit_health::HealthFile {
            pid: 1,
            audit_db: db.clone(),
            health: failing,
        };
        std::fs::write(
            dir.path().join(crate::audit_health::HEALTH_FILE),
            serde_json::to_vec(&file).expect("json"),
        )
        .expect("write");
        let status = audit_status(&db, dir.path());
        assert_eq!(status.state, "failing");
        for needle in [
            "CANNOT WRITE since 1970-01-01",
            "disk_full",
            "database or disk is full",
            "asked actions are denied",
            "3 record(s) held",
            &format!(
                "fix: free space on the filesystem holding {}",
                dir.path().display()
            ),
        ] {
            assert!(
                status.summary.contains(needle),
                "`{needle}` in {}",
                status.summary
            );
        }
    }

    #[test]
    fn status_of_an_empty_pin_dir_lists_every_program_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = status(dir.path(), dir.path(), &dir.path().join("audit.db")).expect("status");
        assert_eq!(status.audit.state, "unknown");
        assert!(status.audit.free_bytes.is_some());
        assert!(status.programs_pinned.is_empty());
        assert_eq!(status.programs_missing.len(), PinLayout::programs().len());
        assert!(status.counters.is_empty());
        assert!(status.grants.is_empty());
        assert!(status.protect_refusals.is_empty());
    }
}
