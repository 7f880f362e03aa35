//! The `bpf()` system call (protection `BPF`).
//!
//! Kernel: `security_bpf()` is called at the top of `__sys_bpf()`
//! (kernel/bpf/syscall.c, v6.12) for every command, after the attribute is
//! copied in: map lookups and updates by id, program loads, link detach,
//! object pins. Gated tasks get none of it, so gatekeep's maps and links
//! cannot be reached from a gated cgroup.

use aya_ebpf::{macros::lsm, programs::LsmContext};
use gatekeep_common::protect;

use crate::hooks::{gating_candidate, protect::refuse};

/// Runs for every `bpf()` call on the host. A gated task gets `-EPERM`
/// unless its policy relaxes `bpf`.
#[lsm(hook = "bpf")]
pub fn bpf(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, bpf, int cmd, union bpf_attr *attr, unsigned int size)
    // (v6.12; later kernels add `bool kernel`, moving the verdict to arg 4).
    let cgroup_id = match gating_candidate(ctx.arg(3)) {
        Ok(cgroup_id) => cgroup_id,
        Err(verdict) => return verdict,
    };
    gated_bpf(cgroup_id)
}

#[inline(never)]
fn gated_bpf(cgroup_id: u64) -> i32 {
    refuse(cgroup_id, protect::BPF)
}
