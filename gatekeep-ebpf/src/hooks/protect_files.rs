//! gatekeep's own files, by identity (issue 18, item 3).
//!
//! The agent puts the (device, inode) of its configuration, policy folder,
//! state folder (tokens, CA keys, grants, `cli.toml`), audit databases, pin
//! folder and binaries into `PROTECTED_INODES` with `protected_inode` bits.
//! A gated task (any uid, any capability) then cannot write, truncate,
//! rename, unlink or link over them, nor create or remove anything inside a
//! locked folder, nor read the secrets. Identity, not path: hard links,
//! renames of a parent, bind mounts and `/proc/self/fd` reach the same
//! inode. Files the agent creates later (a grants file replaced by rename is
//! a new inode) are covered by their folder's `CHILDREN_*` bits, checked
//! through the dentry's parent.
//!
//! Hook signatures: `include/linux/lsm_hook_defs.h` (v6.12); every BPF LSM
//! program gets the earlier programs' verdict as its last argument. Callers
//! (v6.12): `vfs_create`/`vfs_mkdir`/`vfs_mknod`/`vfs_symlink`/`vfs_link`/
//! `vfs_unlink`/`vfs_rmdir`/`vfs_rename` (fs/namei.c) and `notify_change`
//! (fs/attr.c: truncate, ftruncate, chmod, chown, utimes).
//!
//! Every hook: ungated tasks return after one array lookup
//! (`gating_candidate`); the rest lives in `#[inline(never)]` functions.

use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::lsm, programs::LsmContext};
use gatekeep_common::{
    EPERM,
    protect::{CGROUPS, FILES},
    protected_inode::{CHILDREN_NO_READ, CHILDREN_NO_WRITE, DIR_LOCKED, NO_READ, NO_WRITE},
};

use crate::{
    hooks::gating_candidate,
    maps::{count_protect_denial, gated_entry, offsets, protect_relaxed, protected_inode},
};

/// `FMODE_READ` and `FMODE_WRITE` (include/linux/fs.h).
const FMODE_READ: u32 = 1;
const FMODE_WRITE: u32 = 2;
/// `CGROUP2_SUPER_MAGIC` (include/uapi/linux/magic.h).
pub const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// The gated policy of the calling task in `cgroup_id` when protection
/// `id` applies to it (gated, and its policy did not relax `id`).
/// Unclassified cgroups have no policy slot, so nothing is relaxed for them.
#[inline(always)]
pub fn protected_policy(cgroup_id: u64, id: u32) -> Option<u32> {
    let gated = gated_entry(cgroup_id)?;
    if protect_relaxed(gated.policy_id, id) {
        None
    } else {
        Some(gated.policy_id)
    }
}

/// `-EPERM`, counted as a refused attempt of protection `id`.
#[inline(always)]
pub fn refuse(id: u32, cgroup_id: u64) -> i32 {
    count_protect_denial(id, cgroup_id);
    EPERM
}

/// Reads a pointer member at `offset` of `base`; null if unreadable.
#[inline(always)]
pub fn read_ptr(base: *const u8, offset: u32) -> *const u8 {
    if base.is_null() {
        return core::ptr::null();
    }
    // SAFETY: probe read, which fails safely on a bad address.
    unsafe { bpf_probe_read_kernel::<*const u8>(base.add(offset as usize).cast()) }
        .unwrap_or(core::ptr::null())
}

/// `dentry->d_inode` (null for a negative dentry).
#[inline(always)]
fn dentry_inode(dentry: *const u8) -> *const u8 {
    read_ptr(dentry, offsets().dentry_d_inode)
}

/// `dentry->d_parent->d_inode`: the folder holding the entry.
#[inline(always)]
fn parent_inode(dentry: *const u8) -> *const u8 {
    let off = offsets();
    dentry_inode(read_ptr(dentry, off.dentry_d_parent))
}

/// `inode->i_sb->s_magic`; 0 if unreadable.
#[inline(always)]
pub fn inode_magic(inode: *const u8) -> u64 {
    let off = offsets();
    let sb = read_ptr(inode, off.inode_i_sb);
    if sb.is_null() {
        return 0;
    }
    // SAFETY: probe read, which fails safely on a bad address.
    unsafe { bpf_probe_read_kernel::<u64>(sb.add(off.super_block_s_magic as usize).cast()) }
        .unwrap_or(0)
}

/// Whether an entry `dentry` of folder `dir` may not be removed or renamed
/// away: the folder is locked, or the entry's inode is protected.
#[inline(always)]
fn entry_pinned(dir: *const u8, dentry: *const u8) -> bool {
    protected_inode(dir) & DIR_LOCKED != 0 || protected_inode(dentry_inode(dentry)) & NO_WRITE != 0
}

/// Whether the file at `dentry` may not be changed: protected itself, or
/// in a folder whose children are.
#[inline(always)]
fn content_pinned(dentry: *const u8) -> bool {
    protected_inode(dentry_inode(dentry)) & NO_WRITE != 0
        || protected_inode(parent_inode(dentry)) & CHILDREN_NO_WRITE != 0
}

/// For `file_open` (protect-proc's program calls this on its gated path,
/// for a task whose policy is `policy_id`): `Some(-EPERM)` when `file` (a
/// `struct file *`) is one of gatekeep's files, or in one of its folders,
/// and is opened for an access they forbid: writing (this includes
/// `O_TRUNC`, which needs write access), or reading a secret.
#[inline(always)]
pub fn protected_file_open(file: *const u8, policy_id: u32, cgroup_id: u64) -> Option<i32> {
    if protect_relaxed(policy_id, FILES) {
        return None;
    }
    let off = offsets();
    // SAFETY: probe read, which fails safely on a bad address.
    let mode = unsafe { bpf_probe_read_kernel::<u32>(file.add(off.file_f_mode as usize).cast()) }
        .unwrap_or(FMODE_READ | FMODE_WRITE);
    let wants = mode & (FMODE_READ | FMODE_WRITE);
    if wants == 0 {
        return None;
    }
    let dentry = read_ptr(file, off.file_f_path_dentry);
    let own = protected_inode(read_ptr(file, off.file_f_inode));
    let parent = protected_inode(parent_inode(dentry));
    let forbids_write = own & NO_WRITE != 0 || parent & CHILDREN_NO_WRITE != 0;
    let forbids_read = own & NO_READ != 0 || parent & CHILDREN_NO_READ != 0;
    if (wants & FMODE_WRITE != 0 && forbids_write) || (wants & FMODE_READ != 0 && forbids_read) {
        Some(refuse(FILES, cgroup_id))
    } else {
        None
    }
}

/// Refused when the new entry's folder is locked.
#[inline(never)]
fn new_entry(dir: *const u8, cgroup_id: u64) -> i32 {
    if protected_policy(cgroup_id, FILES).is_some() && protected_inode(dir) & DIR_LOCKED != 0 {
        refuse(FILES, cgroup_id)
    } else {
        0
    }
}

/// `LSM_HOOK(int, 0, inode_create, struct inode *dir, struct dentry *dentry, umode_t mode)`:
/// no new file in a locked folder (a new policy file, a planted pin...).
#[lsm(hook = "inode_create")]
pub fn inode_create(ctx: LsmContext) -> i32 {
    match gating_candidate(ctx.arg(3)) {
        Ok(cgroup_id) => new_entry(ctx.arg(0), cgroup_id),
        Err(verdict) => verdict,
    }
}

/// `LSM_HOOK(int, 0, inode_mkdir, struct inode *dir, struct dentry *dentry, umode_t mode)`.
#[lsm(hook = "inode_mkdir")]
pub fn inode_mkdir(ctx: LsmContext) -> i32 {
    match gating_candidate(ctx.arg(3)) {
        Ok(cgroup_id) => new_entry(ctx.arg(0), cgroup_id),
        Err(verdict) => verdict,
    }
}

/// `LSM_HOOK(int, 0, inode_mknod, struct inode *dir, struct dentry *dentry, umode_t mode,
/// dev_t dev)`.
#[lsm(hook = "inode_mknod")]
pub fn inode_mknod(ctx: LsmContext) -> i32 {
    match gating_candidate(ctx.arg(4)) {
        Ok(cgroup_id) => new_entry(ctx.arg(0), cgroup_id),
        Err(verdict) => verdict,
    }
}

/// `LSM_HOOK(int, 0, inode_symlink, struct inode *dir, struct dentry *dentry,
/// const char *old_name)`.
#[lsm(hook = "inode_symlink")]
pub fn inode_symlink(ctx: LsmContext) -> i32 {
    match gating_candidate(ctx.arg(3)) {
        Ok(cgroup_id) => new_entry(ctx.arg(0), cgroup_id),
        Err(verdict) => verdict,
    }
}

/// Refused when the entry's folder is locked or the entry is protected.
#[inline(never)]
fn remove_entry(dir: *const u8, dentry: *const u8, cgroup_id: u64) -> i32 {
    if protected_policy(cgroup_id, FILES).is_some() && entry_pinned(dir, dentry) {
        refuse(FILES, cgroup_id)
    } else {
        0
    }
}

/// `LSM_HOOK(int, 0, inode_unlink, struct inode *dir, struct dentry *dentry)`: no
/// protected file is unlinked, nothing leaves a locked folder (pins included).
#[lsm(hook = "inode_unlink")]
pub fn inode_unlink(ctx: LsmContext) -> i32 {
    match gating_candidate(ctx.arg(2)) {
        Ok(cgroup_id) => remove_entry(ctx.arg(0), ctx.arg(1), cgroup_id),
        Err(verdict) => verdict,
    }
}

/// `LSM_HOOK(int, 0, inode_rmdir, struct inode *dir, struct dentry *dentry)`.
#[lsm(hook = "inode_rmdir")]
pub fn inode_rmdir(ctx: LsmContext) -> i32 {
    match gating_candidate(ctx.arg(2)) {
        Ok(cgroup_id) => remove_entry(ctx.arg(0), ctx.arg(1), cgroup_id),
        Err(verdict) => verdict,
    }
}

/// `LSM_HOOK(int, 0, inode_link, struct dentry *old_dentry, struct inode *dir,
/// struct dentry *new_dentry)`: no new name in a locked folder, and no new
/// name for a protected file (or one in a protected folder) anywhere.
#[lsm(hook = "inode_link")]
pub fn inode_link(ctx: LsmContext) -> i32 {
    match gating_candidate(ctx.arg(3)) {
        Ok(cgroup_id) => link(ctx.arg(0), ctx.arg(1), cgroup_id),
        Err(verdict) => verdict,
    }
}

#[inline(never)]
fn link(old_dentry: *const u8, dir: *const u8, cgroup_id: u64) -> i32 {
    if protected_policy(cgroup_id, FILES).is_none() {
        return 0;
    }
    let own = protected_inode(dentry_inode(old_dentry));
    let parent = protected_inode(parent_inode(old_dentry));
    if protected_inode(dir) & DIR_LOCKED != 0
        || own & (NO_WRITE | NO_READ) != 0
        || parent & (CHILDREN_NO_WRITE | CHILDREN_NO_READ) != 0
    {
        refuse(FILES, cgroup_id)
    } else {
        0
    }
}

/// `LSM_HOOK(int, 0, inode_rename, struct inode *old_dir, struct dentry *old_dentry,
/// struct inode *new_dir, struct dentry *new_dentry)` (`RENAME_EXCHANGE` runs it
/// both ways): nothing is renamed into, out of or within a locked folder, no
/// protected file is renamed or renamed over; and no cgroup is renamed (a
/// renamed cgroup could leave its policy's pattern).
#[lsm(hook = "inode_rename")]
pub fn inode_rename(ctx: LsmContext) -> i32 {
    match gating_candidate(ctx.arg(4)) {
        Ok(cgroup_id) => rename(&ctx, cgroup_id),
        Err(verdict) => verdict,
    }
}

#[inline(never)]
fn rename(ctx: &LsmContext, cgroup_id: u64) -> i32 {
    let (old_dir, old_dentry): (*const u8, *const u8) = (ctx.arg(0), ctx.arg(1));
    let (new_dir, new_dentry): (*const u8, *const u8) = (ctx.arg(2), ctx.arg(3));
    if protected_policy(cgroup_id, CGROUPS).is_some() && inode_magic(old_dir) == CGROUP2_SUPER_MAGIC
    {
        return refuse(CGROUPS, cgroup_id);
    }
    if protected_policy(cgroup_id, FILES).is_some()
        && (entry_pinned(old_dir, old_dentry) || entry_pinned(new_dir, new_dentry))
    {
        return refuse(FILES, cgroup_id);
    }
    0
}

/// `LSM_HOOK(int, 0, inode_setattr, struct mnt_idmap *idmap, struct dentry *dentry,
/// struct iattr *attr)`: no truncate (`truncate`, `ftruncate`), chmod, chown or
/// utimes of a protected file, or of a file in a folder whose children are.
#[lsm(hook = "inode_setattr")]
pub fn inode_setattr(ctx: LsmContext) -> i32 {
    match gating_candidate(ctx.arg(3)) {
        Ok(cgroup_id) => setattr(ctx.arg(1), cgroup_id),
        Err(verdict) => verdict,
    }
}

#[inline(never)]
fn setattr(dentry: *const u8, cgroup_id: u64) -> i32 {
    if protected_policy(cgroup_id, FILES).is_some() && content_pinned(dentry) {
        refuse(FILES, cgroup_id)
    } else {
        0
    }
}
