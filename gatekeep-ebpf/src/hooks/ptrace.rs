//! Tracing gatekeep's processes, and reading them through `/proc`
//! (protection `PTRACE`).
//!
//! Kernel: `security_ptrace_access_check()` is called from
//! `__ptrace_may_access()` (kernel/ptrace.c, v6.12), which guards
//! `PTRACE_ATTACH`/`PTRACE_SEIZE`, `/proc/<pid>/{mem,environ,maps,auxv,
//! fd,...}`, `process_vm_readv`/`writev`, `pidfd_getfd` and `kcmp`.

use aya_ebpf::{macros::lsm, programs::LsmContext};
use gatekeep_common::protect;

use crate::hooks::{
    gating_candidate,
    protect::{is_protected_task, refuse, refuse_uncounted},
};

/// `PTRACE_MODE_NOAUDIT` (include/linux/ptrace.h): the caller only asks
/// whether access would be allowed (`/proc/<pid>/stat` deciding which
/// fields to show, `ps`, `top`), it is not an attempt.
const PTRACE_MODE_NOAUDIT: u32 = 0x04;

/// Runs for every ptrace access check on the host. A gated task checked
/// against a protected process gets `-EPERM` (so ptrace fails with EPERM
/// and `/proc/<pid>/mem` with EACCES) unless its policy relaxes `ptrace`.
#[lsm(hook = "ptrace_access_check")]
pub fn ptrace_access_check(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, ptrace_access_check, struct task_struct *child,
    //          unsigned int mode)
    let cgroup_id = match gating_candidate(ctx.arg(2)) {
        Ok(cgroup_id) => cgroup_id,
        Err(verdict) => return verdict,
    };
    gated_ptrace_access_check(&ctx, cgroup_id)
}

#[inline(never)]
fn gated_ptrace_access_check(ctx: &LsmContext, cgroup_id: u64) -> i32 {
    let child: *const u8 = ctx.arg(0);
    let mode: u32 = ctx.arg(1);
    if !is_protected_task(child) {
        0
    } else if mode & PTRACE_MODE_NOAUDIT != 0 {
        // Refused all the same, but not counted: `ps` in a gated cgroup
        // is no attack worth an audit record.
        refuse_uncounted(cgroup_id, protect::PTRACE)
    } else {
        refuse(cgroup_id, protect::PTRACE)
    }
}
