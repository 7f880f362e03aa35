//! Gating follows a gated task into cgroups it creates or moves tasks into.
//!
//! The agent gates every existing descendant of a policy's cgroups, but it
//! sees new ones only at its next rescan. These tracepoints close that
//! window in the kernel: the new (or destination) cgroup is gated under the
//! acting task's policy before the `mkdir`/`write` returns, flagged
//! `GATED_INHERITED` so the agent knows the kernel added it.

use aya_ebpf::{
    helpers::bpf_get_current_cgroup_id, macros::tracepoint, programs::TracePointContext,
};
use gatekeep_common::{GATED_INHERITED, GatedCgroup};

use crate::maps::{GATED_CGROUPS, gate_cgroup, gated_cgroup};

/// Offsets in the `cgroup/cgroup_mkdir` and `cgroup/cgroup_attach_task`
/// records (see their `format`): `int root` then `int level` then `u64 id`.
const ROOT_OFFSET: usize = 8;
const ID_OFFSET: usize = 16;
/// Hierarchy id of cgroup v2, the one `bpf_get_current_cgroup_id` reports.
const DEFAULT_HIERARCHY: i32 = 0;

#[tracepoint(category = "cgroup", name = "cgroup_mkdir")]
pub fn cgroup_mkdir(ctx: TracePointContext) -> u32 {
    inherit_gating(&ctx);
    0
}

#[tracepoint(category = "cgroup", name = "cgroup_attach_task")]
pub fn cgroup_attach_task(ctx: TracePointContext) -> u32 {
    inherit_gating(&ctx);
    0
}

#[inline(always)]
fn inherit_gating(ctx: &TracePointContext) {
    // SAFETY: helper without arguments.
    let actor = unsafe { bpf_get_current_cgroup_id() };
    let Some(gated) = gated_cgroup(actor) else {
        return;
    };
    // SAFETY: the record layout is fixed by the tracepoint's format.
    let (Ok(root), Ok(id)) = (unsafe { ctx.read_at::<i32>(ROOT_OFFSET) }, unsafe {
        ctx.read_at::<u64>(ID_OFFSET)
    }) else {
        return;
    };
    if root != DEFAULT_HIERARCHY || id == actor {
        return;
    }
    // SAFETY: presence check only.
    if unsafe { GATED_CGROUPS.get(&id) }.is_some() {
        return;
    }
    let inherited = GatedCgroup {
        policy_id: gated.policy_id,
        flags: GATED_INHERITED,
    };
    gate_cgroup(id, &inherited);
}
