//! The "ask" path shared by every hook: verdict lookup, pending bookkeeping
//! and the stop-and-restart pause (docs/architecture.md, "The pause protocol").

use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel, bpf_send_signal_thread};
use gatekeep_common::{
    EPERM, ERESTARTNOINTR, EVENT_CGROUP_UNCLASSIFIED, GrantKey, MAX_PENDING_ATTEMPTS,
    PendingRequest, VerdictKey, action, counter,
};

use crate::{
    events::{Caller, emit_task_event},
    maps::{GRANTS, PENDING, VERDICTS, bump, forget_pending, offsets, track_pending},
};

const SIGSTOP: u32 = 19;

/// Outcome of asking for a decision.
pub enum Asked {
    /// A granted duration covers this exact request, which was not paused: allowed, and
    /// nothing to tell user space (`GRANT_ALLOWED` counts them). This is the path every use
    /// of a grant takes, so it emits no event.
    Granted,
    /// A verdict from user space (or a grant covering the paused request) allowed this very
    /// request.
    Allow,
    /// A verdict from user space denied it.
    Deny,
    /// The task re-entered without stopping (a tracer swallows SIGSTOP, or
    /// it is traced): refused rather than spinning.
    Refused,
    /// The pending map is full: the request cannot be tracked, so it is
    /// refused (fail closed).
    Untrackable,
    /// The thread will stop; the syscall restarts after SIGCONT. `new` is
    /// true when this request was not pending before (tell user space).
    Paused { new: bool },
}

/// Identity of one request: the thread and the digest of what it asked.
pub struct Request {
    pub tid: u32,
    pub pid: u32,
    pub policy_id: u32,
    pub kind: u32,
    pub digest: u64,
    pub now_ns: u64,
    pub cgroup_id: u64,
}

/// Decides what an "ask" request does right now. `grants`: whether a
/// granted duration may cover it (never for a request whose digest does not
/// cover all of it, such as an exec with a truncated argv: a grant would
/// reach every request that differs only past the truncation).
///
/// A verdict is consumed once: the entry is deleted as it is used. Nobody
/// but a verdict for the same task (thread id and start time) and digest
/// lets the request through: a stray SIGCONT finds the request still pending
/// and stops the task again, and a verdict written for an earlier task whose
/// thread id this one reuses names another start time.
#[inline(always)]
pub fn ask(request: &Request, grants: bool) -> Asked {
    let start_ns = current_start_ns();
    let key = VerdictKey {
        tid: request.tid,
        _pad: 0,
        digest: request.digest,
        start_ns,
    };
    if grants && granted(request) {
        bump(counter::GRANT_ALLOWED);
        // SAFETY: copied out immediately.
        let paused = unsafe { PENDING.get(&request.tid) }
            .is_some_and(|p| p.digest == request.digest && p.start_ns == start_ns);
        if paused {
            // This very request was paused and a grant now covers it (a reviewer granted a
            // duration): finish it like its verdict would, so user space hears of it.
            forget_pending(request.tid);
            let _ = VERDICTS.remove(&key);
            bump(counter::VERDICTS_APPLIED);
            return Asked::Allow;
        }
        return Asked::Granted;
    }
    // SAFETY: copied out immediately.
    if let Some(verdict) = unsafe { VERDICTS.get(&key) }.copied() {
        let _ = VERDICTS.remove(&key);
        if verdict.expires_ns >= request.now_ns {
            forget_pending(request.tid);
            bump(counter::VERDICTS_APPLIED);
            return if verdict.action == action::ALLOW {
                Asked::Allow
            } else {
                Asked::Deny
            };
        }
    }

    if current_is_traced() {
        forget_pending(request.tid);
        return Asked::Refused;
    }

    if let Some(pending) = PENDING.get_ptr_mut(&request.tid) {
        // SAFETY: only this thread touches its own entry while it runs.
        let pending = unsafe { &mut *pending };
        if pending.digest == request.digest && pending.start_ns == start_ns {
            pending.attempts += 1;
            if pending.attempts > MAX_PENDING_ATTEMPTS {
                forget_pending(request.tid);
                return Asked::Refused;
            }
            if !stop_current_thread() {
                return Asked::Refused;
            }
            bump(counter::REPAUSED);
            return Asked::Paused { new: false };
        }
        // The digest changed (e.g. argv rewritten after a SIGCONT), or the
        // entry is an earlier task's with this thread id: this is a new
        // request; the old one is superseded below.
    }

    let pending = PendingRequest {
        digest: request.digest,
        created_ns: request.now_ns,
        kind: request.kind,
        attempts: 0,
        pid: request.pid,
        policy_id: request.policy_id,
        start_ns,
    };
    if track_pending(request.tid, &pending).is_err() {
        // Cannot track it, so cannot pause it safely: fail closed.
        return Asked::Untrackable;
    }
    if !stop_current_thread() {
        forget_pending(request.tid);
        return Asked::Refused;
    }
    Asked::Paused { new: true }
}

/// Whether a reviewer's granted duration covers this exact request: a grant
/// for the asking workload (its cgroup), else one for the whole policy
/// (`cgroup_id` 0). Only the ask path pays these lookups.
#[inline(always)]
fn granted(request: &Request) -> bool {
    let mut key = GrantKey {
        policy_id: request.policy_id,
        kind: request.kind,
        digest: request.digest,
        cgroup_id: request.cgroup_id,
    };
    if grant_live(&key, request) {
        return true;
    }
    key.cgroup_id = 0;
    grant_live(&key, request)
}

/// Whether `GRANTS` holds an unexpired entry for `key` that covers the
/// request's cgroup.
#[inline(always)]
fn grant_live(key: &GrantKey, request: &Request) -> bool {
    // SAFETY: copied out immediately.
    let Some(grant) = (unsafe { GRANTS.get(key) }).copied() else {
        return false;
    };
    (grant.expires_ns == 0 || request.now_ns < grant.expires_ns)
        && (grant.cgroup_id == 0 || grant.cgroup_id == request.cgroup_id)
}

/// The calling thread's start time (`task_struct::start_boottime`), which
/// with its thread id names the task; 0 if unreadable (the pending entry
/// then says 0 too, and binding falls back to the thread id).
#[inline(always)]
fn current_start_ns() -> u64 {
    // SAFETY: reads kernel memory through the probe helper, which fails
    // safely on a bad address.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let field = task
            .add(offsets().task_struct_start_boottime as usize)
            .cast::<u64>();
        bpf_probe_read_kernel(field).unwrap_or(0)
    }
}

/// Sends SIGSTOP to the calling thread; the whole thread group stops on
/// the way back to user mode.
#[inline(always)]
fn stop_current_thread() -> bool {
    // SAFETY: helper without memory arguments.
    unsafe { bpf_send_signal_thread(SIGSTOP) == 0 }
}

/// Whether the calling task is ptraced (`task_struct::ptrace != 0`): a tracer
/// sees our SIGSTOP first and may swallow it, so the task would never stop.
#[inline(always)]
fn current_is_traced() -> bool {
    // SAFETY: reads kernel memory through the probe helper, which fails
    // safely on a bad address.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let field = task
            .add(offsets().task_struct_ptrace as usize)
            .cast::<u32>();
        bpf_probe_read_kernel(field).is_ok_and(|ptrace| ptrace != 0)
    }
}

/// A gated action (`request_kind`) of a task whose cgroup is unclassified
/// (`GATED_UNCLASSIFIED`): the thread stops, as for a pause, and the agent
/// hears of it; once the agent has classified the cgroup it sends SIGCONT
/// and the restarted syscall meets the cgroup's real policy (or none). A
/// stray SIGCONT finds the cgroup still unclassified and stops it again; a
/// traced task is refused (its tracer could swallow the stop).
#[inline(always)]
pub fn await_classification(caller: &Caller, request_kind: u32) -> i32 {
    await_agent(caller, request_kind, EVENT_CGROUP_UNCLASSIFIED)
}

/// Stops the calling thread until the agent has done what `event_kind`
/// tells it (classify the cgroup, process its DNS answers) and sent
/// SIGCONT; the restarted syscall is decided again, so a stray SIGCONT
/// only stops it again. A traced task is refused (its tracer could swallow
/// the stop).
#[inline(always)]
pub fn await_agent(caller: &Caller, request_kind: u32, event_kind: u32) -> i32 {
    if current_is_traced() {
        return EPERM;
    }
    emit_task_event(caller, event_kind, 0, request_kind, action::ASK);
    if stop_current_thread() {
        ERESTARTNOINTR
    } else {
        EPERM
    }
}
