//! `execve`/`execveat` gating at `security_bprm_check`.
//!
//! Kernel: `security_bprm_check()` is called from `search_binary_handler()`
//! in fs/exec.c (v6.12), after the new image is opened and argv copied into
//! the new mm.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns},
    macros::lsm,
    programs::LsmContext,
};
use gatekeep_common::{ExecEvent, counter, event_kind};

use crate::maps::{EVENTS, GATED_CGROUPS, bump};

/// Runs for every exec on the host.
///
/// Tasks outside gated cgroups return after one map lookup. For gated tasks
/// the exec is reported to user space.
#[lsm(hook = "bprm_check_security")]
pub fn bprm_check_security(ctx: LsmContext) -> i32 {
    match try_bprm_check_security(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

fn try_bprm_check_security(ctx: &LsmContext) -> Result<i32, i32> {
    // LSM_HOOK(int, 0, bprm_check_security, struct linux_binprm *bprm): the
    // verdict of earlier BPF LSM programs on this hook is the last argument.
    let previous: i32 = ctx.arg(1);
    if previous != 0 {
        return Ok(previous);
    }

    // SAFETY: helper without preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is copied out before anything else touches the map.
    let Some(gated) = (unsafe { GATED_CGROUPS.get(&cgroup_id) }).copied() else {
        return Ok(0);
    };
    bump(counter::EXEC_GATED);

    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        bump(counter::EVENTS_DROPPED);
        return Ok(0);
    };
    // SAFETY: helper without preconditions.
    let ktime_ns = unsafe { bpf_ktime_get_boot_ns() };
    entry.write(ExecEvent {
        kind: event_kind::EXEC,
        policy_id: gated.policy_id,
        pid: ctx.tgid(),
        tid: ctx.pid(),
        uid: ctx.uid(),
        gid: ctx.gid(),
        cgroup_id,
        ktime_ns,
        comm: ctx.command().unwrap_or_default(),
    });
    entry.submit(0);
    Ok(0)
}
