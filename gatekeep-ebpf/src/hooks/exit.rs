//! Cleanup when a thread exits: no pending request outlives its task.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use gatekeep_common::{VerdictKey, action, event_kind};

use crate::{
    events::{Caller, emit_task_event},
    maps::{PENDING, VERDICTS, forget_pending, may_be_pending},
};

/// `sched/sched_process_exit` runs for every exiting thread. A thread that
/// dies while paused (e.g. SIGKILL) has its request dropped and reported as
/// abandoned, so user space records it and stops waiting for a decision.
///
/// A BTF-enabled tracepoint (`tp_btf`), not a classic one: it gets the
/// tracepoint's arguments as they are instead of a perf record built for it,
/// which every thread exit on the host would pay for.
///
/// Every thread exit on the host runs the first test: an inlined array word
/// that is 0 unless some thread of this slot was paused; the rest is a
/// function of its own (see `socket_connect`).
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(_ctx: BtfTracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    if may_be_pending(tid) {
        abandon_pending(tid);
    }
    0
}

/// Drops `tid`'s pending request, if it has one, and reports it abandoned.
#[inline(never)]
fn abandon_pending(tid: u32) {
    // SAFETY: copied out immediately.
    if let Some(pending) = unsafe { PENDING.get(&tid) }.copied() {
        forget_pending(tid);
        let _ = VERDICTS.remove(&VerdictKey {
            tid,
            _pad: 0,
            digest: pending.digest,
            start_ns: pending.start_ns,
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
}
