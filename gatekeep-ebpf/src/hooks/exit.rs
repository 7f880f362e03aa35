//! Cleanup when a thread exits: no pending request outlives its task.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use gatekeep_common::{VerdictKey, action, event_kind};

use crate::{
    events::{Caller, emit_task_event},
    maps::{EXEC_ARGV, PENDING, VERDICTS},
};

/// `sched/sched_process_exit` runs for every exiting thread. A thread that
/// dies while paused (e.g. SIGKILL) has its request dropped and reported as
/// abandoned, so user space records it and stops waiting for a decision.
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: copied out immediately.
    if let Some(pending) = unsafe { PENDING.get(&tid) }.copied() {
        let _ = PENDING.remove(&tid);
        let _ = VERDICTS.remove(&VerdictKey {
            tid,
            _pad: 0,
            digest: pending.digest,
        });
        let caller = Caller::current(0, pending.policy_id);
        emit_task_event(
            &caller,
            event_kind::ABANDONED,
            pending.digest,
            pending.kind,
            action::NONE,
        );
    }
    // Every exit on the host passes here: a lookup first (a delete takes the bucket's lock).
    // SAFETY: presence check only.
    if unsafe { EXEC_ARGV.get(&tid) }.is_some() {
        let _ = EXEC_ARGV.remove(&tid);
    }
    0
}
