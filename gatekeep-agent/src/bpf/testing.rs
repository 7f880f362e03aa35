//! A simulated kernel for unit tests of the pause protocol: pending
//! requests, verdicts, stopped tasks, and what a restarted syscall does
//! after SIGCONT (consume a verdict, stop again, or ask anew).

use std::{
    collections::HashMap,
    io,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use gatekeep_common::{PendingRequest, Verdict, VerdictKey, action, request_kind};

use crate::{
    bpf::{
        events::{Event, Origin, RequestKind},
        kernel::{KernelError, PauseKernel, boot_time_ns},
    },
    hooks::{Request, exec::ExecRequest},
    pause::resume::{TaskState, Tasks},
};

/// A thread that asks for a decision.
#[derive(Debug, Clone)]
pub struct FakeTask {
    pid: u32,
    tid: u32,
    /// What the thread asks (changes when a sibling rewrites argv).
    digest: u64,
    /// `Some(n)`: stopped after `n` more state polls; `None`: never stops.
    polls_until_stop: Option<u32>,
    stopped: bool,
    alive: bool,
    created_ago_ns: u64,
    /// `task_struct::start_boottime`: with the tid, the task's identity.
    start_ns: u64,
    /// The verdict the restarted syscall consumed.
    result: Option<u32>,
}

impl FakeTask {
    /// A thread that has just asked about `digest` and is on its way to the stop.
    #[must_use]
    pub fn asking(pid: u32, tid: u32, digest: u64) -> Self {
        Self {
            pid,
            tid,
            digest,
            polls_until_stop: Some(0),
            stopped: false,
            alive: true,
            created_ago_ns: 0,
            start_ns: 1_000 + u64::from(tid),
            result: None,
        }
    }

    /// A task started at `start_ns` (a later task reusing a tid starts later).
    #[must_use]
    pub fn started_at(mut self, start_ns: u64) -> Self {
        self.start_ns = start_ns;
        self
    }

    #[must_use]
    pub fn stopped(mut self) -> Self {
        self.stopped = true;
        self
    }

    #[must_use]
    pub fn stopping_after(mut self, polls: u32) -> Self {
        self.polls_until_stop = Some(polls);
        self
    }

    #[must_use]
    pub fn never_stopping(mut self) -> Self {
        self.polls_until_stop = None;
        self
    }

    #[must_use]
    pub fn created_secs_ago(mut self, secs: u64) -> Self {
        self.created_ago_ns = secs * 1_000_000_000;
        self
    }
}

#[derive(Debug, Default)]
struct State {
    tasks: HashMap<u32, FakeTask>,
    pending: HashMap<u32, PendingRequest>,
    verdicts: HashMap<VerdictKey, Verdict>,
    events: Vec<Event>,
    log: Option<Arc<Mutex<Vec<String>>>>,
}

impl State {
    fn note(&self, what: String) {
        if let Some(log) = &self.log {
            log.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(what);
        }
    }

    /// The syscall of `tid` runs (again) after a SIGCONT.
    fn restart(&mut self, tid: u32) {
        let Some(task) = self.tasks.get(&tid).cloned() else {
            return;
        };
        let key = VerdictKey {
            tid,
            _pad: 0,
            digest: task.digest,
            start_ns: task.start_ns,
        };
        if let Some(verdict) = self.verdicts.remove(&key)
            && verdict.expires_ns >= boot_time_ns()
        {
            self.pending.remove(&tid);
            if let Some(task) = self.tasks.get_mut(&tid) {
                task.stopped = false;
                task.result = Some(verdict.action);
            }
            self.events.push(Event::VerdictApplied {
                origin: origin(&task),
                kind: RequestKind(request_kind::EXEC),
                action: verdict.action,
            });
            return;
        }
        let same = self
            .pending
            .get(&tid)
            .is_some_and(|p| p.digest == task.digest && p.start_ns == task.start_ns);
        if !same {
            self.pending.insert(tid, pending_for(&task, boot_time_ns()));
            self.events.push(ask_event_for(&task));
        }
        if let Some(task) = self.tasks.get_mut(&tid) {
            task.stopped = true;
        }
    }
}

fn origin(task: &FakeTask) -> Origin {
    Origin {
        policy_id: 1,
        pid: task.pid,
        tid: task.tid,
        uid: 0,
        gid: 0,
        ppid: 1,
        cgroup_id: 99,
        ktime_ns: boot_time_ns(),
        digest: task.digest,
        comm: "worker".into(),
    }
}

fn pending_for(task: &FakeTask, created_ns: u64) -> PendingRequest {
    PendingRequest {
        digest: task.digest,
        created_ns,
        kind: request_kind::EXEC,
        attempts: 0,
        pid: task.pid,
        policy_id: 1,
        start_ns: task.start_ns,
    }
}

fn ask_event_for(task: &FakeTask) -> Event {
    Event::Ask(Request::Exec(ExecRequest {
        origin: origin(task),
        dev: 1,
        ino: 2,
        content: gatekeep_common::ContentVersion::default(),
        filename: PathBuf::from("/usr/bin/tool"),
        argv: vec!["tool".into(), format!("{:x}", task.digest)],
        argv_truncated: false,
        env: Vec::new(),
        denied_truncated: false,
        argc: 2,
        via: crate::hooks::exec::Via::Exec,
        interpreter: false,
    }))
}

/// The simulated kernel (maps) and tasks (`/proc`, signals) in one.
#[derive(Debug, Default)]
pub struct FakeKernel {
    state: Mutex<State>,
}

impl FakeKernel {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a thread with its pending request (no event is emitted; use
    /// [`FakeKernel::ask_event`]).
    pub fn spawn_task(&self, task: FakeTask) {
        let mut state = self.lock();
        let created = boot_time_ns().saturating_sub(task.created_ago_ns);
        state.pending.insert(task.tid, pending_for(&task, created));
        state.tasks.insert(task.tid, task);
    }

    /// The ask event the kernel emitted for `tid`'s current request.
    #[must_use]
    pub fn ask_event(&self, tid: u32) -> Event {
        let state = self.lock();
        ask_event_for(&state.tasks[&tid])
    }

    /// A sibling rewrote argv: the thread's next restart asks about `digest`.
    pub fn change_request(&self, tid: u32, digest: u64) {
        if let Some(task) = self.lock().tasks.get_mut(&tid) {
            task.digest = digest;
        }
    }

    /// The process exits: its requests are dropped, `ABANDONED` emitted.
    pub fn kill(&self, pid: u32) {
        let mut state = self.lock();
        let tids: Vec<u32> = state
            .tasks
            .values()
            .filter(|t| t.pid == pid)
            .map(|t| t.tid)
            .collect();
        for tid in tids {
            if let Some(task) = state.tasks.get_mut(&tid) {
                task.alive = false;
            }
            if let Some(pending) = state.pending.remove(&tid) {
                state.verdicts.retain(|key, _| key.tid != tid);
                let task = state.tasks[&tid].clone();
                let mut origin = origin(&task);
                origin.digest = pending.digest;
                state.events.push(Event::Abandoned {
                    origin,
                    kind: RequestKind(request_kind::EXEC),
                });
            }
        }
    }

    /// The process is gone but its pending entry stayed (an exit the
    /// kernel side did not clean up).
    pub fn kill_leaving_pending(&self, pid: u32) {
        for task in self.lock().tasks.values_mut().filter(|t| t.pid == pid) {
            task.alive = false;
        }
    }

    pub fn insert_verdict(&self, key: VerdictKey, verdict: Verdict) {
        self.lock().verdicts.insert(key, verdict);
    }

    /// Records "verdict <tid>", "stopped <tid>", "sigcont <pid>" in order.
    pub fn observe(&self, log: Arc<Mutex<Vec<String>>>) {
        self.lock().log = Some(log);
    }

    #[must_use]
    pub fn pending_now(&self) -> HashMap<u32, PendingRequest> {
        self.lock().pending.clone()
    }

    #[must_use]
    pub fn verdicts_now(&self) -> HashMap<VerdictKey, Verdict> {
        self.lock().verdicts.clone()
    }

    /// The action the thread's restarted syscall got, if it got one.
    #[must_use]
    pub fn result_of(&self, tid: u32) -> Option<u32> {
        self.lock().tasks.get(&tid).and_then(|t| t.result)
    }

    #[must_use]
    pub fn is_stopped(&self, tid: u32) -> bool {
        self.lock().tasks.get(&tid).is_some_and(|t| t.stopped)
    }

    /// Events emitted since the last call.
    pub fn take_events(&self) -> Vec<Event> {
        std::mem::take(&mut self.lock().events)
    }
}

impl PauseKernel for FakeKernel {
    async fn pending(&self) -> Result<Vec<(u32, PendingRequest)>, KernelError> {
        Ok(self.lock().pending.iter().map(|(k, v)| (*k, *v)).collect())
    }

    async fn pending_of(&self, tid: u32) -> Result<Option<PendingRequest>, KernelError> {
        Ok(self.lock().pending.get(&tid).copied())
    }

    async fn remove_pending(&self, tid: u32, digest: u64) -> Result<bool, KernelError> {
        let mut state = self.lock();
        if state.pending.get(&tid).is_some_and(|p| p.digest == digest) {
            state.pending.remove(&tid);
            return Ok(true);
        }
        Ok(false)
    }

    async fn write_verdict(&self, key: VerdictKey, verdict: Verdict) -> Result<(), KernelError> {
        let mut state = self.lock();
        state.note(format!("verdict {}", key.tid));
        state.verdicts.insert(key, verdict);
        Ok(())
    }

    async fn verdicts(&self) -> Result<Vec<(VerdictKey, Verdict)>, KernelError> {
        Ok(self.lock().verdicts.iter().map(|(k, v)| (*k, *v)).collect())
    }

    async fn remove_verdict(&self, key: VerdictKey) -> Result<(), KernelError> {
        self.lock().verdicts.remove(&key);
        Ok(())
    }
}

impl Tasks for FakeKernel {
    fn state(&self, _pid: u32, tid: u32) -> TaskState {
        let mut state = self.lock();
        let Some(task) = state.tasks.get_mut(&tid) else {
            return TaskState::Gone;
        };
        if !task.alive {
            return TaskState::Gone;
        }
        if task.stopped {
            return TaskState::Stopped;
        }
        if task.result.is_some() {
            return TaskState::Running;
        }
        match task.polls_until_stop {
            Some(0) => {
                task.stopped = true;
                state.note(format!("stopped {tid}"));
                TaskState::Stopped
            }
            Some(n) => {
                task.polls_until_stop = Some(n - 1);
                TaskState::Running
            }
            None => TaskState::Running,
        }
    }

    fn sigcont(&self, pid: u32) -> io::Result<()> {
        let mut state = self.lock();
        let tids: Vec<u32> = state
            .tasks
            .values()
            .filter(|t| t.pid == pid && t.alive && t.result.is_none())
            .map(|t| t.tid)
            .collect();
        if !state.tasks.values().any(|t| t.pid == pid && t.alive) {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        state.note(format!("sigcont {pid}"));
        for tid in tids {
            state.restart(tid);
        }
        Ok(())
    }
}

/// `action::ALLOW`, for readable assertions.
pub const ALLOW: u32 = action::ALLOW;
/// `action::DENY`.
pub const DENY: u32 = action::DENY;

/// The kernel's `GRANTS` map, in memory.
#[derive(Debug, Default)]
pub struct FakeGrants {
    map: Mutex<HashMap<gatekeep_common::GrantKey, gatekeep_common::Grant>>,
}

impl FakeGrants {
    pub fn now(&self) -> HashMap<gatekeep_common::GrantKey, gatekeep_common::Grant> {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn clear(&self) {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl crate::bpf::kernel::GrantKernel for FakeGrants {
    async fn grants(
        &self,
    ) -> Result<Vec<(gatekeep_common::GrantKey, gatekeep_common::Grant)>, KernelError> {
        Ok(self.now().into_iter().collect())
    }

    async fn set_grant(
        &self,
        key: gatekeep_common::GrantKey,
        grant: gatekeep_common::Grant,
    ) -> Result<(), KernelError> {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, grant);
        Ok(())
    }

    async fn remove_grant(&self, key: gatekeep_common::GrantKey) -> Result<(), KernelError> {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        Ok(())
    }
}

/// Policies named `names` (exec default ask), compiled with kernel ids `ids`.
pub fn compiled_policies(names: &[&str], ids: &[u32]) -> crate::policy::Compiled {
    use std::fmt::Write as _;
    let mut text = String::new();
    for name in names {
        writeln!(
            text,
            "[[policy]]\nname = \"{name}\"\ncgroups = [\"/sys/fs/cgroup/{name}\"]\n[policy.exec]\ndefault = \"ask\"\n[policy.approval]\ngrant_durations = [\"1h\", \"session\", \"always\"]"
        )
        .expect("write to a string");
    }
    let set = gatekeep_policy::parse_str("t.toml", &text).expect("policy");
    let dir = tempfile::tempdir().expect("tempdir");
    let host = crate::policy::HostView {
        cgroup_root: dir.path().to_owned(),
        own_cgroup: None,
        protected: Vec::new(),
    };
    crate::policy::compile(&set, ids, 1, &host).expect("compile")
}
