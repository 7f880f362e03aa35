//! Says so, loudly, when the audit log cannot be written.
//!
//! The writer reports its health ([`WriterHealth`]); this task turns changes into:
//!
//! - the log: one error line when writes start failing (cause, error, fix), then one a minute
//!   while they keep failing (records held and lost so far), never one per event; a warning
//!   when writes succeed again;
//! - the health file `state_dir/audit-health.json`, which `gatekeep-agent status` reads (the
//!   status also measures the audit log's free space itself, so it tells the truth even
//!   when the file could not be written: the file is removed then, rather than left saying
//!   "writable");
//! - the decision service, through `report` (the agent stream's `AuditHealth` message).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use gatekeep_audit::WriterHealth;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The health file, in the state folder.
pub const HEALTH_FILE: &str = "audit-health.json";

/// While writes fail, the log repeats the condition this often.
pub const REPEAT_EVERY: Duration = Duration::from_mins(1);

/// What the health file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthFile {
    /// The agent that wrote it.
    pub pid: u32,
    /// The audit log.
    pub audit_db: PathBuf,
    #[serde(flatten)]
    pub health: WriterHealth,
}

/// Reads the health file of `state_dir`; `None` when there is none (no agent, or it could not
/// write the file) or it cannot be read.
#[must_use]
pub fn read(state_dir: &Path) -> Option<HealthFile> {
    let text = std::fs::read(state_dir.join(HEALTH_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

fn write(path: &Path, file: &HealthFile) {
    let folder = || match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::os::unix::fs::DirBuilderExt::mode(
            std::fs::DirBuilder::new().recursive(true),
            0o700,
        )
        .create(dir),
        _ => Ok(()),
    };
    let written = folder()
        .and_then(|()| serde_json::to_vec_pretty(file).map_err(std::io::Error::other))
        .and_then(|text| {
            gatekeep_util::fs::write_atomic(
                path,
                &text,
                0o600,
                gatekeep_util::fs::Existing::Replace,
            )
        });
    if let Err(error) = written {
        // A stale "writable" must not stay behind: no file reads as "unknown".
        let _ = std::fs::remove_file(path);
        tracing::warn!(path = %path.display(), %error, "cannot write the audit health file");
    }
}

fn log_failing(health: &WriterHealth, first: bool) {
    let Some(failure) = &health.failing else {
        return;
    };
    let what = if first {
        "the audit log cannot be written: asked actions are denied until it can"
    } else {
        "the audit log still cannot be written: asked actions are denied until it can"
    };
    tracing::error!(
        audit_db = %failure.path.display(),
        cause = failure.cause.as_str(),
        error = %failure.error,
        since = %failure.since,
        held = failure.held,
        held_capacity = failure.held_capacity,
        lost = failure.lost,
        fix = %failure.fix,
        "{what}"
    );
}

/// Runs until `shutdown`: writes the health file at `state_dir`, logs, and hands every change
/// between writable and not (and each repeat) to `report`.
pub async fn run(
    mut health: watch::Receiver<WriterHealth>,
    state_dir: PathBuf,
    audit_db: PathBuf,
    report: impl Fn(&WriterHealth) + Send + 'static,
    mut shutdown: watch::Receiver<bool>,
) {
    let path = state_dir.join(HEALTH_FILE);
    let file = |health: &WriterHealth| HealthFile {
        pid: std::process::id(),
        audit_db: audit_db.clone(),
        health: health.clone(),
    };
    let mut current = health.borrow_and_update().clone();
    write(&path, &file(&current));
    report(&current);
    let mut repeat = tokio::time::interval(REPEAT_EVERY);
    repeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    repeat.reset();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            changed = health.changed() => {
                if changed.is_err() {
                    break;
                }
                let next = health.borrow_and_update().clone();
                let started = current.is_writable() && !next.is_writable();
                let ended = !current.is_writable() && next.is_writable();
                if started {
                    log_failing(&next, true);
                    repeat.reset();
                }
                if ended {
                    tracing::warn!(
                        audit_db = %audit_db.display(),
                        "the audit log can be written again; the held records are written, asked actions are decided again"
                    );
                }
                write(&path, &file(&next));
                if started || ended {
                    report(&next);
                }
                current = next;
            }
            _ = repeat.tick() => {
                if !current.is_writable() {
                    log_failing(&current, false);
                    write(&path, &file(&current));
                    report(&current);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use gatekeep_audit::{Failure, FailureCause};

    use super::*;

    fn failing(held: usize) -> WriterHealth {
        WriterHealth {
            failing: Some(Failure {
                path: "/x/audit.db".into(),
                cause: FailureCause::DiskFull,
                error: "database or disk is full".into(),
                fix: FailureCause::DiskFull.fix(Path::new("/x/audit.db")),
                since: time::OffsetDateTime::UNIX_EPOCH,
                held,
                held_capacity: 10,
                lost: 0,
                attempts: 1,
            }),
            recovered: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_file_follows_the_writer_and_the_service_hears_each_change() {
        let parent = tempfile::tempdir().expect("tempdir");
        // A state folder that does not exist yet is made.
        let dir = &parent.path().join("state");
        let (health_tx, health_rx) = watch::channel(WriterHealth::default());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let reports = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&reports);
        let task = tokio::spawn(run(
            health_rx,
            dir.clone(),
            "/x/audit.db".into(),
            move |h: &WriterHealth| seen.lock().expect("lock").push(h.is_writable()),
            shutdown_rx,
        ));
        let state = |dir: &Path| read(dir).expect("health file");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(state(dir).health.is_writable());

        health_tx.send(failing(1)).expect("send");
        tokio::time::sleep(Duration::from_millis(10)).await;
        let file = state(dir);
        assert_eq!(file.health, failing(1));
        assert_eq!(file.pid, std::process::id());
        // More held records: the file follows, the service is not told again...
        health_tx.send(failing(5)).expect("send");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(state(dir).health, failing(5));
        assert_eq!(*reports.lock().expect("lock"), [true, false]);
        // ...until the minute's repeat.
        tokio::time::sleep(REPEAT_EVERY).await;
        assert_eq!(*reports.lock().expect("lock"), [true, false, false]);

        health_tx
            .send(WriterHealth {
                failing: None,
                recovered: 1,
            })
            .expect("send");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(state(dir).health.is_writable());
        assert_eq!(*reports.lock().expect("lock"), [true, false, false, true]);
        shutdown_tx.send(true).expect("send");
        task.await.expect("join");
    }
}
