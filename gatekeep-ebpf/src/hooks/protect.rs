//! What the self-protection hooks share (issue 18): the gated path's
//! verdict for a protection, and who gatekeep's processes are.
//!
//! Every protection hook starts like the exec hook: [`super::gating_candidate`]
//! answers every task outside gated cgroups after one array lookup; only a
//! task that may be gated reaches the functions here, which run out of line.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use gatekeep_common::{EPERM, NS_PER_CLOCK_TICK};

use crate::maps::{PROTECTED_TASKS, count_protect_denial, gated_entry, offsets, protect_relaxed};

/// The verdict of protection `id` for a task of `cgroup_id` that is about
/// to do what the protection forbids: `-EPERM` (counted) when the cgroup is
/// gated and its policy did not relax `id`, else 0.
#[inline(always)]
pub fn refuse(cgroup_id: u64, id: u32) -> i32 {
    match gated_entry(cgroup_id) {
        Some(gated) => refuse_gated(gated.policy_id, cgroup_id, id),
        None => 0,
    }
}

/// [`refuse`] without counting the refusal (for permission probes that
/// are not attempts).
#[inline(always)]
pub fn refuse_uncounted(cgroup_id: u64, id: u32) -> i32 {
    match gated_entry(cgroup_id) {
        Some(gated) if !protect_relaxed(gated.policy_id, id) => EPERM,
        _ => 0,
    }
}

/// [`refuse`] for a hook that has its cgroup's policy already.
#[inline(always)]
pub fn refuse_gated(policy_id: u32, cgroup_id: u64, id: u32) -> i32 {
    if protect_relaxed(policy_id, id) {
        return 0;
    }
    count_protect_denial(id, cgroup_id);
    EPERM
}

/// Whether `task` (a `struct task_struct *`) belongs to a protected
/// process: its thread group is in `PROTECTED_TASKS` with the start time of
/// its group leader (so a reused pid is not protected). Unreadable task
/// fields count as protected: fail closed.
#[inline(always)]
pub fn is_protected_task(task: *const u8) -> bool {
    let off = offsets();
    // SAFETY: probe reads of a task the hook was given; they fail safely.
    let Ok(tgid) =
        (unsafe { bpf_probe_read_kernel::<i32>(task.add(off.task_struct_tgid as usize).cast()) })
    else {
        return true;
    };
    // SAFETY: copied out immediately.
    let Some(entry) = (unsafe { PROTECTED_TASKS.get(&(tgid as u32)) }).copied() else {
        return false;
    };
    // SAFETY: as above.
    let start = unsafe {
        bpf_probe_read_kernel::<*const u8>(task.add(off.task_struct_group_leader as usize).cast())
            .and_then(|leader| {
                bpf_probe_read_kernel::<u64>(
                    leader.add(off.task_struct_start_boottime as usize).cast(),
                )
            })
    };
    match start {
        Ok(start_ns) => start_ns / NS_PER_CLOCK_TICK == entry.start_ticks,
        Err(_) => true,
    }
}
