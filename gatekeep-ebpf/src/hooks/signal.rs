//! Signals to gatekeep's processes (protection `SIGNAL`).
//!
//! Kernel: `security_task_kill()` is called from `check_kill_permission()`
//! (kernel/signal.c, v6.12) for `kill`, `tkill`, `tgkill`, `rt_sigqueueinfo`
//! and `pidfd_send_signal`, including signal 0, before anything is
//! delivered. Signals the agent sends to gated tasks (its SIGCONT/SIGSTOP)
//! come from an ungated task and take the fast path.

use aya_ebpf::{macros::lsm, programs::LsmContext};
use gatekeep_common::protect;

use crate::hooks::{
    gating_candidate,
    protect::{is_protected_task, refuse},
};

/// Runs for every signal sent on the host. A gated task sending any
/// signal (0 included) to a protected process gets `-EPERM` unless its
/// policy relaxes `signals`; everything else is left to the kernel.
#[lsm(hook = "task_kill")]
pub fn task_kill(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, task_kill, struct task_struct *p,
    //          struct kernel_siginfo *info, int sig, const struct cred *cred)
    let cgroup_id = match gating_candidate(ctx.arg(4)) {
        Ok(cgroup_id) => cgroup_id,
        Err(verdict) => return verdict,
    };
    gated_task_kill(&ctx, cgroup_id)
}

#[inline(never)]
fn gated_task_kill(ctx: &LsmContext, cgroup_id: u64) -> i32 {
    let target: *const u8 = ctx.arg(0);
    if is_protected_task(target) {
        refuse(cgroup_id, protect::SIGNAL)
    } else {
        0
    }
}
