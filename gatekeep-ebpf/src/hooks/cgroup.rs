//! Gating of new cgroups, from the moment they exist.
//!
//! The agent gates every existing descendant of a policy's cgroups, but it
//! sees new ones only at its next rescan. `cgroup_mkdir` closes that window
//! in the kernel, before the `mkdir` returns:
//! - a cgroup made by a gated task is gated under the task's policy
//!   (`GATED_INHERITED`), wherever it is made;
//! - a cgroup made (by anyone) below a *candidate parent* (a cgroup below
//!   which some policy pattern can match, listed by the agent in
//!   `CANDIDATE_PARENTS`) is gated as unclassified (`GATED_UNCLASSIFIED`):
//!   its first gated action waits until the agent has classified it;
//! - a cgroup made by an ungated task inside a gated cgroup that is not a
//!   candidate parent is gated under its parent's policy (`GATED_INHERITED`).
//!
//! Moving a task never gates anything: a gated task cannot move tasks out
//! of its subtree (cgroup_escape.rs), and a move into a gated cgroup needs
//! nothing. (The `cgroup_attach_task` tracepoint used to gate the
//! destination of any move by a gated task, which could gate an unrelated
//! cgroup, even the agent's.)

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_probe_read_kernel},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use gatekeep_common::{GATED_INHERITED, GATED_UNCLASSIFIED, GatedCgroup, UNCLASSIFIED_POLICY};

use crate::{
    hooks::protect_files::read_ptr,
    maps::{CANDIDATE_PARENTS, GATED_CGROUPS, gate_cgroup, gated_cgroup, offsets},
};

/// `TP_PROTO(struct cgroup *cgrp, const char *path)` (include/trace/events/cgroup.h,
/// v6.12), fired by `cgroup_mkdir()` (kernel/cgroup/cgroup.c) once the new
/// cgroup's folder is active. A BTF tracepoint: cgroup creation is rare, but
/// its raw arguments are all it needs.
#[btf_tracepoint(function = "cgroup_mkdir")]
pub fn cgroup_mkdir(ctx: BtfTracePointContext) -> u32 {
    // Argument 0 of this tracepoint is the new `struct cgroup *`.
    let cgrp: *const u8 = ctx.arg(0);
    classify_new_cgroup(cgrp);
    0
}

#[inline(always)]
fn classify_new_cgroup(cgrp: *const u8) {
    let off = offsets();
    let kn = read_ptr(cgrp, off.cgroup_kn);
    let parent = read_ptr(kn, off.kernfs_node_parent);
    if kn.is_null() || parent.is_null() {
        return;
    }
    // SAFETY: probe reads, which fail safely on a bad address.
    let (Ok(id), Ok(parent_id)) = (
        unsafe { bpf_probe_read_kernel::<u64>(kn.add(off.kernfs_node_id as usize).cast()) },
        unsafe { bpf_probe_read_kernel::<u64>(parent.add(off.kernfs_node_id as usize).cast()) },
    ) else {
        return;
    };
    // Only the cgroup v2 hierarchy: a v1 hierarchy numbers its nodes on its
    // own.
    if !on_default_hierarchy(cgrp) {
        return;
    }
    // SAFETY: presence check only.
    if unsafe { GATED_CGROUPS.get(&id) }.is_some() {
        return;
    }
    // SAFETY: helper without arguments.
    let actor = unsafe { bpf_get_current_cgroup_id() };
    if let Some(gated) = gated_cgroup(actor) {
        let inherited = GatedCgroup {
            policy_id: gated.policy_id,
            flags: GATED_INHERITED | (gated.flags & GATED_UNCLASSIFIED),
        };
        gate_cgroup(id, &inherited);
        return;
    }
    // SAFETY: presence check only.
    if unsafe { CANDIDATE_PARENTS.get(&parent_id) }.is_some() {
        let unclassified = GatedCgroup {
            policy_id: UNCLASSIFIED_POLICY,
            flags: GATED_UNCLASSIFIED,
        };
        gate_cgroup(id, &unclassified);
    } else if let Some(gated) = gated_cgroup(parent_id) {
        let inherited = GatedCgroup {
            policy_id: gated.policy_id,
            flags: GATED_INHERITED | (gated.flags & GATED_UNCLASSIFIED),
        };
        gate_cgroup(id, &inherited);
    }
}

/// Whether `cgrp` belongs to the cgroup v2 hierarchy
/// (`cgrp->root->hierarchy_id == 0`, `cgrp_dfl_root`).
#[inline(always)]
fn on_default_hierarchy(cgrp: *const u8) -> bool {
    let off = offsets();
    let root = read_ptr(cgrp, off.cgroup_root);
    if root.is_null() {
        return false;
    }
    // SAFETY: probe read, which fails safely on a bad address.
    unsafe { bpf_probe_read_kernel::<i32>(root.add(off.cgroup_root_hierarchy_id as usize).cast()) }
        .is_ok_and(|id| id == 0)
}
