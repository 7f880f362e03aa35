//! Mounting and unmounting (protection `MOUNT`).
//!
//! Kernel (v6.12, fs/namespace.c): `mount(2)` calls `security_sb_mount()`
//! in `path_mount()` for every kind (new, bind, move, remount, propagation)
//! and `security_sb_remount()` for a remount; `umount(2)` calls
//! `security_sb_umount()`; `move_mount(2)`, which attaches what
//! `fsmount(2)` and `open_tree(2)` made, calls `security_move_mount()`;
//! `pivot_root(2)` calls `security_sb_pivotroot()`. `fsopen`, `fsconfig`,
//! `fsmount` and `mount_setattr` have no hook of their own in v6.12: a
//! detached mount they make cannot be attached anywhere (`move_mount`).
//!
//! Each hook refuses a gated task with `-EPERM` unless its policy relaxes
//! `mount`; the user namespace a task made for itself changes nothing.

use aya_ebpf::{macros::lsm, programs::LsmContext};
use gatekeep_common::protect;

use crate::hooks::{gating_candidate, protect::refuse};

#[inline(always)]
fn mount_verdict(previous: i32) -> i32 {
    match gating_candidate(previous) {
        Ok(cgroup_id) => gated_mount(cgroup_id),
        Err(verdict) => verdict,
    }
}

#[inline(never)]
fn gated_mount(cgroup_id: u64) -> i32 {
    refuse(cgroup_id, protect::MOUNT)
}

/// LSM_HOOK(int, 0, sb_mount, const char *dev_name, const struct path *path,
/// const char *type, unsigned long flags, void *data)
#[lsm(hook = "sb_mount")]
pub fn sb_mount(ctx: LsmContext) -> i32 {
    mount_verdict(ctx.arg(5))
}

/// LSM_HOOK(int, 0, sb_umount, struct vfsmount *mnt, int flags)
#[lsm(hook = "sb_umount")]
pub fn sb_umount(ctx: LsmContext) -> i32 {
    mount_verdict(ctx.arg(2))
}

/// LSM_HOOK(int, 0, sb_remount, struct super_block *sb, void *mnt_opts)
#[lsm(hook = "sb_remount")]
pub fn sb_remount(ctx: LsmContext) -> i32 {
    mount_verdict(ctx.arg(2))
}

/// LSM_HOOK(int, 0, move_mount, const struct path *from_path,
/// const struct path *to_path)
#[lsm(hook = "move_mount")]
pub fn move_mount(ctx: LsmContext) -> i32 {
    mount_verdict(ctx.arg(2))
}

/// LSM_HOOK(int, 0, sb_pivotroot, const struct path *old_path,
/// const struct path *new_path)
#[lsm(hook = "sb_pivotroot")]
pub fn sb_pivotroot(ctx: LsmContext) -> i32 {
    mount_verdict(ctx.arg(2))
}
