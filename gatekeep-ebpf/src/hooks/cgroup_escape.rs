//! A gated task cannot leave its gated subtree (issue 18, item 5).
//!
//! cgroup v2 moves a task by a write of its pid to `cgroup.procs` (or a
//! thread's tid to `cgroup.threads`) of the destination, or by
//! `clone3(CLONE_INTO_CGROUP)`. Neither has an LSM hook of its own in v6.12,
//! so:
//! - `file_permission` (called by `rw_verify_area` for every `write`,
//!   `writev`, `pwrite`, `splice` and io_uring write; fs/read_write.c) refuses
//!   a gated task's write to any file of cgroupfs whose cgroup is not gated
//!   under the task's own policy: the cgroup of a cgroupfs file is the folder
//!   holding it, whose inode number is the cgroup id. That covers
//!   `cgroup.procs`/`cgroup.threads` outside the subtree, and also
//!   `cgroup.kill`, `cgroup.freeze` and resource limits of other cgroups (the
//!   agent's included). The check is at write time, so a descriptor opened
//!   before the task was gated (or passed to it) does not help.
//! - `task_alloc` refuses `CLONE_INTO_CGROUP` for gated tasks outright (the
//!   destination is a descriptor in `kernel_clone_args` that the hook does
//!   not see); plain fork/clone is untouched.
//! - Renaming a cgroup is refused in `inode_rename` (protect_files.rs).
//!
//! Moving into a cgroup the task created itself is allowed: `cgroup_mkdir`
//! (cgroup.rs) gates it under the creator's policy before `mkdir` returns.

use aya_ebpf::{macros::lsm, programs::LsmContext};
use gatekeep_common::{GATED_UNCLASSIFIED, protect::CGROUPS};

use crate::{
    hooks::{
        gating_candidate,
        protect_files::{CGROUP2_SUPER_MAGIC, inode_magic, read_ptr, refuse},
    },
    maps::{gated_entry, offsets, protect_relaxed},
};

/// `MAY_WRITE` (include/linux/fs.h).
const MAY_WRITE: i32 = 2;
/// `CLONE_INTO_CGROUP` (include/uapi/linux/sched.h).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `LSM_HOOK(int, 0, file_permission, struct file *file, int mask)`: runs for
/// every read and write on the host. Reads return after one compare, writes
/// of ungated tasks after one array lookup.
#[lsm(hook = "file_permission")]
pub fn file_permission(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(2);
    let mask: i32 = ctx.arg(1);
    if mask & MAY_WRITE == 0 {
        return previous;
    }
    match gating_candidate(previous) {
        Ok(cgroup_id) => cgroup_file_write(ctx.arg(0), cgroup_id),
        Err(verdict) => verdict,
    }
}

#[inline(never)]
fn cgroup_file_write(file: *const u8, cgroup_id: u64) -> i32 {
    let Some(gated) = gated_entry(cgroup_id) else {
        return 0;
    };
    if protect_relaxed(gated.policy_id, CGROUPS) {
        return 0;
    }
    let off = offsets();
    if inode_magic(read_ptr(file, off.file_f_inode)) != CGROUP2_SUPER_MAGIC {
        return 0;
    }
    // The cgroup whose file this is: `file->f_path.dentry->d_parent->d_inode->i_ino`
    // (kernfs numbers a node's inode with its id, `kernfs_ino()`, and a
    // cgroup's id is its folder node's id, `cgroup_id()`).
    let dentry = read_ptr(file, off.file_f_path_dentry);
    let dir = read_ptr(read_ptr(dentry, off.dentry_d_parent), off.dentry_d_inode);
    if dir.is_null() {
        return refuse(CGROUPS, cgroup_id);
    }
    // SAFETY: probe read, which fails safely on a bad address.
    let Ok(target) = (unsafe {
        aya_ebpf::helpers::bpf_probe_read_kernel::<u64>(dir.add(off.inode_i_ino as usize).cast())
    }) else {
        return refuse(CGROUPS, cgroup_id);
    };
    if target == cgroup_id {
        return 0;
    }
    // Elsewhere: only within the same policy's cgroups (its subtree, and
    // cgroups it created), never from or into an unclassified one.
    match gated_entry(target) {
        Some(dest)
            if dest.policy_id == gated.policy_id
                && (dest.flags | gated.flags) & GATED_UNCLASSIFIED == 0 =>
        {
            0
        }
        _ => refuse(CGROUPS, cgroup_id),
    }
}

/// `LSM_HOOK(int, 0, task_alloc, struct task_struct *task, unsigned long clone_flags)`:
/// runs for every fork and thread on the host; without `CLONE_INTO_CGROUP`
/// it returns after one compare.
#[lsm(hook = "task_alloc")]
pub fn task_alloc(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(2);
    let flags: u64 = ctx.arg(1);
    if flags & CLONE_INTO_CGROUP == 0 {
        return previous;
    }
    match gating_candidate(previous) {
        Ok(cgroup_id) => clone_into_cgroup(cgroup_id),
        Err(verdict) => verdict,
    }
}

#[inline(never)]
fn clone_into_cgroup(cgroup_id: u64) -> i32 {
    match gated_entry(cgroup_id) {
        Some(gated) if !protect_relaxed(gated.policy_id, CGROUPS) => refuse(CGROUPS, cgroup_id),
        _ => 0,
    }
}
