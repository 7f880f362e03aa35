//! The user-space half of the stop-and-restart pause (docs/architecture.md,
//! "The pause protocol"): writing a verdict and resuming the task, and reconciling the
//! kernel's pending requests with the ones the agent tracks.
//!
//! Resuming, in order:
//! 1. if the kernel's pending request of the thread has another digest, or
//!    is another task's (another start time: the thread id was reused), the
//!    decision is for a request that no longer exists: do nothing;
//! 2. write `VERDICTS[{tid, start time, digest}]` (valid for [`VERDICT_TTL`]):
//!    the kernel applies it only to the task that asked, never to a later
//!    task reusing its thread id;
//! 3. wait until the thread is really stopped (`/proc/<pid>/task/<tid>/stat`
//!    state `T` or `t`), so the SIGCONT is not spent on a task still on its
//!    way to the stop;
//! 4. `kill(pid, SIGCONT)`: the syscall restarts and consumes the verdict.
//!
//! A stray SIGCONT (ours for another thread of the same process, or anyone
//! else's) is harmless: without a verdict the hook stops the task again.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    path::PathBuf,
    time::Duration,
};

use gatekeep_common::{PendingRequest, Verdict, VerdictKey};
use gatekeep_util::retry::poll_until;
use nix::{
    errno::Errno,
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    bpf::kernel::{KernelError, PauseKernel, VERDICT_TTL, boot_time_ns},
    decision,
    pause::enrich::Stat,
};

/// The paused request a decision is for: the task (thread id and start time,
/// from the kernel's pending entry) and the digest of what it asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskRequest {
    pub tid: u32,
    /// `task_struct::start_boottime` of the thread ([`PendingRequest::start_ns`]).
    pub start_ns: u64,
    pub digest: u64,
}

/// What a thread is doing, as far as the pause cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Stopped (`T`) or in a tracing stop (`t`).
    Stopped,
    /// Anything else while alive.
    Running,
    /// Exited, a zombie, or never existed.
    Gone,
}

/// Observing and continuing tasks; [`ProcTasks`] is the real one.
pub trait Tasks: Send + Sync + 'static {
    fn state(&self, pid: u32, tid: u32) -> TaskState;
    /// `kill(pid, SIGCONT)`; `Err` with `ESRCH` when the process is gone.
    fn sigcont(&self, pid: u32) -> io::Result<()>;
}

/// Tasks as `/proc` shows them.
#[derive(Debug, Clone)]
pub struct ProcTasks {
    proc_root: PathBuf,
}

impl ProcTasks {
    #[must_use]
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
        }
    }
}

impl Tasks for ProcTasks {
    fn state(&self, pid: u32, tid: u32) -> TaskState {
        let path = self
            .proc_root
            .join(pid.to_string())
            .join("task")
            .join(tid.to_string())
            .join("stat");
        match fs::read_to_string(path)
            .ok()
            .and_then(|text| Stat::parse(&text))
        {
            None => TaskState::Gone,
            Some(stat) => match stat.state {
                'T' | 't' => TaskState::Stopped,
                'Z' | 'X' | 'x' => TaskState::Gone,
                _ => TaskState::Running,
            },
        }
    }

    fn sigcont(&self, pid: u32) -> io::Result<()> {
        let pid = i32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        kill(Pid::from_raw(pid), Signal::SIGCONT)
            .map_err(|errno: Errno| io::Error::from_raw_os_error(errno as i32))
    }
}

/// Timing of the pause protocol.
#[derive(Debug, Clone, Copy)]
pub struct PauseTiming {
    /// Longest wait for a thread to reach its stop before it is continued
    /// anyway (the verdict is written; a SIGCONT before the stop cancels the
    /// stop, and the restarted syscall finds the verdict all the same).
    pub stop_wait: Duration,
    /// How often the thread's state is polled meanwhile.
    pub poll: Duration,
    /// Age below which an untracked pending request is left alone by the
    /// reconciler: its ask event is probably still on its way.
    pub grace: Duration,
}

impl Default for PauseTiming {
    fn default() -> Self {
        Self {
            stop_wait: Duration::from_secs(2),
            poll: Duration::from_millis(5),
            grace: Duration::from_secs(1),
        }
    }
}

/// How resuming went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeOutcome {
    /// Verdict written, the thread was stopped, SIGCONT sent.
    Resumed,
    /// Verdict written and SIGCONT sent, but the thread was not seen stopped
    /// within [`PauseTiming::stop_wait`].
    ResumedUnconfirmed,
    /// The thread now waits on another request (another digest): nothing
    /// was written.
    Superseded,
    /// The task is gone.
    Gone,
}

/// Writes the verdict for `(tid, digest)` and continues the task.
pub async fn resume<K: PauseKernel, T: Tasks>(
    kernel: &K,
    tasks: &T,
    timing: PauseTiming,
    pid: u32,
    task: TaskRequest,
    verdict: decision::Verdict,
) -> Result<ResumeOutcome, KernelError> {
    let TaskRequest {
        tid,
        start_ns,
        digest,
    } = task;
    if let Some(pending) = kernel.pending_of(tid).await?
        && (pending.digest != digest || pending.start_ns != start_ns)
    {
        return Ok(ResumeOutcome::Superseded);
    }
    let ttl = u64::try_from(VERDICT_TTL.as_nanos()).unwrap_or(u64::MAX);
    kernel
        .write_verdict(
            VerdictKey {
                tid,
                _pad: 0,
                digest,
                start_ns,
            },
            Verdict {
                action: verdict.kernel_action(),
                _pad: 0,
                expires_ns: boot_time_ns().saturating_add(ttl),
            },
        )
        .await?;
    let stopped = wait_stopped(tasks, timing, pid, tid).await;
    if stopped == TaskState::Gone {
        return Ok(ResumeOutcome::Gone);
    }
    match tasks.sigcont(pid) {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => return Ok(ResumeOutcome::Gone),
        Err(err) => {
            tracing::warn!(pid, tid, error = %err, "failed to send SIGCONT");
        }
    }
    Ok(if stopped == TaskState::Stopped {
        ResumeOutcome::Resumed
    } else {
        ResumeOutcome::ResumedUnconfirmed
    })
}

/// Polls until the thread is stopped or gone, or `stop_wait` passes.
async fn wait_stopped<T: Tasks>(tasks: &T, timing: PauseTiming, pid: u32, tid: u32) -> TaskState {
    let deadline = tokio::time::Instant::now() + timing.stop_wait;
    let mut state = TaskState::Running;
    poll_until(deadline, timing.poll, || {
        state = tasks.state(pid, tid);
        (state != TaskState::Running).then_some(())
    })
    .await;
    state
}

/// What reconciling found about a pending request the agent does not track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    /// Its task is gone; the entry was removed.
    Dead { tid: u32, pending: PendingRequest },
    /// It was asked again: the entry was removed and the task continued, so
    /// the hook emits a fresh request event and stops the task again.
    Reasked { tid: u32, pending: PendingRequest },
}

/// The kernel's pending requests and what was done about the untracked ones.
#[derive(Debug, Default)]
pub struct Reconciled {
    pub pending: HashMap<u32, PendingRequest>,
    pub findings: Vec<Finding>,
    pub expired_verdicts: usize,
}

/// Compares the kernel's pending requests with `tracked` (thread, digest):
/// untracked requests of dead tasks are removed; untracked requests older
/// than the grace period are asked again. Expired verdicts are removed.
pub async fn reconcile<K: PauseKernel, T: Tasks, S: std::hash::BuildHasher>(
    kernel: &K,
    tasks: &T,
    timing: PauseTiming,
    tracked: &HashSet<(u32, u64), S>,
) -> Result<Reconciled, KernelError> {
    let now = boot_time_ns();
    let grace = u64::try_from(timing.grace.as_nanos()).unwrap_or(u64::MAX);
    let mut out = Reconciled::default();
    for (tid, pending) in kernel.pending().await? {
        out.pending.insert(tid, pending);
        if tracked.contains(&(tid, pending.digest)) {
            continue;
        }
        if tasks.state(pending.pid, tid) == TaskState::Gone {
            if kernel.remove_pending(tid, pending.digest).await? {
                out.findings.push(Finding::Dead { tid, pending });
            }
            continue;
        }
        if now.saturating_sub(pending.created_ns) < grace {
            continue;
        }
        if kernel.remove_pending(tid, pending.digest).await? {
            match tasks.sigcont(pending.pid) {
                Ok(()) => out.findings.push(Finding::Reasked { tid, pending }),
                Err(err) => {
                    tracing::warn!(tid, pid = pending.pid, error = %err, "failed to continue a task to re-ask it");
                }
            }
        }
    }
    for (key, verdict) in kernel.verdicts().await? {
        if verdict.expires_ns < now {
            kernel.remove_verdict(key).await?;
            out.expired_verdicts += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::bpf::testing::{FakeKernel, FakeTask};

    #[test]
    fn proc_task_states() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |pid: u32, tid: u32, state: char| {
            let task = dir.path().join(format!("{pid}/task/{tid}"));
            fs::create_dir_all(&task).expect("mkdir");
            fs::write(task.join("stat"), format!("{tid} (w) {state} 1 1")).expect("stat");
        };
        write(10, 10, 'T');
        write(10, 11, 'S');
        write(12, 12, 't');
        write(13, 13, 'Z');
        let tasks = ProcTasks::new(dir.path());
        assert_eq!(tasks.state(10, 10), TaskState::Stopped);
        assert_eq!(tasks.state(10, 11), TaskState::Running);
        assert_eq!(tasks.state(12, 12), TaskState::Stopped);
        assert_eq!(tasks.state(13, 13), TaskState::Gone);
        assert_eq!(tasks.state(14, 14), TaskState::Gone);
    }

    #[tokio::test(start_paused = true)]
    async fn resume_writes_the_verdict_then_waits_for_the_stop_then_continues() {
        let kernel = Arc::new(FakeKernel::default());
        // The task asks, but takes 50 ms to actually stop.
        kernel.spawn_task(FakeTask::asking(100, 101, 7).stopping_after(10));
        let order = Arc::new(Mutex::new(Vec::new()));
        kernel.observe(Arc::clone(&order));
        let outcome = resume(
            kernel.as_ref(),
            kernel.as_ref(),
            PauseTiming::default(),
            100,
            req(101, 7),
            decision::Verdict::Allow,
        )
        .await
        .expect("resume");
        assert_eq!(outcome, ResumeOutcome::Resumed);
        let order = order.lock().expect("lock").clone();
        assert_eq!(
            order,
            ["verdict 101", "stopped 101", "sigcont 100"],
            "SIGCONT only after the stop"
        );
        assert_eq!(kernel.result_of(101), Some(gatekeep_common::action::ALLOW));
        assert!(kernel.pending_now().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn resume_of_a_superseded_request_writes_nothing() {
        let kernel = Arc::new(FakeKernel::default());
        kernel.spawn_task(FakeTask::asking(100, 100, 8).stopped());
        let outcome = resume(
            kernel.as_ref(),
            kernel.as_ref(),
            PauseTiming::default(),
            100,
            req(100, 7),
            decision::Verdict::Allow,
        )
        .await
        .expect("resume");
        assert_eq!(outcome, ResumeOutcome::Superseded);
        assert!(kernel.verdicts_now().is_empty());
        assert_eq!(kernel.result_of(100), None, "still paused");
    }

    /// The request of `tid` (a [`FakeTask::asking`] task's start time) for `digest`.
    fn req(tid: u32, digest: u64) -> TaskRequest {
        TaskRequest {
            tid,
            start_ns: 1_000 + u64::from(tid),
            digest,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_decision_for_a_task_whose_tid_was_reused_is_never_applied() {
        let kernel = Arc::new(FakeKernel::default());
        // Task A (tid 100) asked about 7 and was tracked; it died, and a later
        // task B reusing tid 100 asked the very same thing.
        kernel.spawn_task(FakeTask::asking(100, 100, 7).stopped());
        kernel.kill(100);
        kernel.spawn_task(FakeTask::asking(100, 100, 7).started_at(5_000).stopped());
        let outcome = resume(
            kernel.as_ref(),
            kernel.as_ref(),
            PauseTiming::default(),
            100,
            req(100, 7),
            decision::Verdict::Allow,
        )
        .await
        .expect("resume");
        assert_eq!(
            outcome,
            ResumeOutcome::Superseded,
            "A's decision is not B's"
        );
        assert!(kernel.verdicts_now().is_empty(), "nothing written for B");
        assert_eq!(kernel.result_of(100), None, "B stays paused");

        // Even a verdict that reached the map for A (written just before B
        // asked) is not B's: B's restart finds its request pending and stops again.
        kernel.insert_verdict(
            VerdictKey {
                tid: 100,
                _pad: 0,
                digest: 7,
                start_ns: 1_100,
            },
            Verdict {
                action: gatekeep_common::action::ALLOW,
                _pad: 0,
                expires_ns: u64::MAX,
            },
        );
        kernel.sigcont(100).expect("sigcont");
        assert_eq!(
            kernel.result_of(100),
            None,
            "A's verdict does not release B"
        );
        assert!(kernel.is_stopped(100));

        // B's own decision applies.
        let outcome = resume(
            kernel.as_ref(),
            kernel.as_ref(),
            PauseTiming::default(),
            100,
            TaskRequest {
                start_ns: 5_000,
                ..req(100, 7)
            },
            decision::Verdict::Deny,
        )
        .await
        .expect("resume");
        assert_eq!(outcome, ResumeOutcome::Resumed);
        assert_eq!(kernel.result_of(100), Some(gatekeep_common::action::DENY));
    }

    #[tokio::test(start_paused = true)]
    async fn resume_of_a_dead_task_reports_it_gone() {
        let kernel = Arc::new(FakeKernel::default());
        kernel.spawn_task(FakeTask::asking(100, 100, 7).stopped());
        kernel.kill(100);
        let outcome = resume(
            kernel.as_ref(),
            kernel.as_ref(),
            PauseTiming::default(),
            100,
            req(100, 7),
            decision::Verdict::Deny,
        )
        .await
        .expect("resume");
        assert_eq!(outcome, ResumeOutcome::Gone);
    }

    #[tokio::test(start_paused = true)]
    async fn resume_continues_an_unconfirmed_task_after_the_stop_wait() {
        let kernel = Arc::new(FakeKernel::default());
        kernel.spawn_task(FakeTask::asking(100, 100, 7).never_stopping());
        let outcome = resume(
            kernel.as_ref(),
            kernel.as_ref(),
            PauseTiming::default(),
            100,
            req(100, 7),
            decision::Verdict::Deny,
        )
        .await
        .expect("resume");
        assert_eq!(outcome, ResumeOutcome::ResumedUnconfirmed);
        assert_eq!(kernel.result_of(100), Some(gatekeep_common::action::DENY));
    }

    #[tokio::test(start_paused = true)]
    async fn reconcile_reasks_old_untracked_requests_and_clears_dead_ones() {
        let kernel = Arc::new(FakeKernel::default());
        kernel.spawn_task(FakeTask::asking(100, 100, 7).stopped().created_secs_ago(5));
        kernel.spawn_task(FakeTask::asking(200, 200, 9).stopped().created_secs_ago(5));
        kernel.spawn_task(FakeTask::asking(300, 300, 3).stopped());
        kernel.spawn_task(FakeTask::asking(400, 400, 4).stopped().created_secs_ago(5));
        kernel.kill_leaving_pending(200);
        let tracked: HashSet<(u32, u64)> = [(400, 4)].into();
        let reconciled = reconcile(
            kernel.as_ref(),
            kernel.as_ref(),
            PauseTiming::default(),
            &tracked,
        )
        .await
        .expect("reconcile");
        let mut findings = reconciled.findings.clone();
        findings.sort_by_key(|f| match f {
            Finding::Dead { tid, .. } | Finding::Reasked { tid, .. } => *tid,
        });
        assert!(
            matches!(findings[0], Finding::Reasked { tid: 100, .. }),
            "{findings:?}"
        );
        assert!(
            matches!(findings[1], Finding::Dead { tid: 200, .. }),
            "{findings:?}"
        );
        assert_eq!(findings.len(), 2, "300 is young, 400 is tracked");
        // 100 was continued and asked again: a fresh event, paused again.
        let events = kernel.take_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].origin().tid, 100);
        let pending = kernel.pending_now();
        assert!(
            pending.contains_key(&100) && pending.contains_key(&300) && pending.contains_key(&400)
        );
        assert!(!pending.contains_key(&200));
    }

    #[tokio::test(start_paused = true)]
    async fn reconcile_removes_expired_verdicts() {
        let kernel = Arc::new(FakeKernel::default());
        kernel.insert_verdict(
            VerdictKey {
                tid: 5,
                _pad: 0,
                digest: 1,
                start_ns: 1_005,
            },
            Verdict {
                action: 1,
                _pad: 0,
                expires_ns: 1,
            },
        );
        kernel.insert_verdict(
            VerdictKey {
                tid: 6,
                _pad: 0,
                digest: 1,
                start_ns: 1_006,
            },
            Verdict {
                action: 1,
                _pad: 0,
                expires_ns: u64::MAX,
            },
        );
        let reconciled = reconcile(
            kernel.as_ref(),
            kernel.as_ref(),
            PauseTiming::default(),
            &HashSet::new(),
        )
        .await
        .expect("reconcile");
        assert_eq!(reconciled.expired_verdicts, 1);
        assert_eq!(kernel.verdicts_now().len(), 1);
    }
}
