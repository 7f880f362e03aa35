//! Opening files (protection `RAW_DEVICE` here; the file protections of
//! issue 18 add their identity check at the marked extension point).
//!
//! Kernel: `security_file_open()` is called from `do_dentry_open()`
//! (fs/open.c, v6.12) before the file system's or driver's `open`, for every
//! open but `O_PATH`.

use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::lsm, programs::LsmContext};
use gatekeep_common::{EPERM, protect};

use crate::{
    hooks::{gating_candidate, protect::refuse_gated, protect_files::protected_file_open},
    maps::{gated_entry, offsets, proc_kcore_ino},
};

/// `S_IFMT`, `S_IFBLK`, `S_IFCHR` (include/uapi/linux/stat.h).
const S_IFMT: u16 = 0o170_000;
const S_IFBLK: u16 = 0o060_000;
const S_IFCHR: u16 = 0o020_000;
/// `MEM_MAJOR` and its minors `mem`, `kmem`, `port`
/// (drivers/char/mem.c), in the kernel's `dev_t` (`major << 20 | minor`).
const MEM_MAJOR: u32 = 1;
const MEM_MINOR: u32 = 1;
const KMEM_MINOR: u32 = 2;
const PORT_MINOR: u32 = 4;
const MINOR_BITS: u32 = 20;
/// `PROC_SUPER_MAGIC` (include/uapi/linux/magic.h).
const PROC_SUPER_MAGIC: u64 = 0x9fa0;

/// Runs for every open on the host. A gated task opening a block device,
/// `/dev/mem`, `/dev/kmem`, `/dev/port` (by device number, wherever the node
/// is) or `/proc/kcore` (in any procfs instance) gets `-EPERM` unless its
/// policy relaxes `raw-devices`.
#[lsm(hook = "file_open")]
pub fn file_open(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, file_open, struct file *file)
    let cgroup_id = match gating_candidate(ctx.arg(1)) {
        Ok(cgroup_id) => cgroup_id,
        Err(verdict) => return verdict,
    };
    gated_file_open(&ctx, cgroup_id)
}

#[inline(never)]
fn gated_file_open(ctx: &LsmContext, cgroup_id: u64) -> i32 {
    let Some(gated) = gated_entry(cgroup_id) else {
        return 0;
    };
    let file: *const u8 = ctx.arg(0);
    let off = offsets();
    // SAFETY: probe read of the file being opened.
    let Ok(inode) =
        (unsafe { bpf_probe_read_kernel::<*const u8>(file.add(off.file_f_inode as usize).cast()) })
    else {
        return EPERM;
    };
    if is_raw_device(inode) {
        return refuse_gated(gated.policy_id, cgroup_id, protect::RAW_DEVICE);
    }
    // gatekeep's own files by identity (issue 18 item 3).
    protected_file_open(file, gated.policy_id, cgroup_id).unwrap_or(0)
}

/// Whether `inode` is a block device, a `mem` character device or
/// `/proc/kcore`. Unreadable fields count as raw: fail closed.
#[inline(always)]
fn is_raw_device(inode: *const u8) -> bool {
    let off = offsets();
    // SAFETY: probe reads of the opened file's inode; they fail safely.
    let Ok(mode) =
        (unsafe { bpf_probe_read_kernel::<u16>(inode.add(off.inode_i_mode as usize).cast()) })
    else {
        return true;
    };
    match mode & S_IFMT {
        S_IFBLK => true,
        S_IFCHR => {
            // SAFETY: as above.
            let Ok(rdev) = (unsafe {
                bpf_probe_read_kernel::<u32>(inode.add(off.inode_i_rdev as usize).cast())
            }) else {
                return true;
            };
            let minor = rdev & ((1 << MINOR_BITS) - 1);
            rdev >> MINOR_BITS == MEM_MAJOR
                && (minor == MEM_MINOR || minor == KMEM_MINOR || minor == PORT_MINOR)
        }
        _ => is_proc_kcore(inode),
    }
}

#[inline(always)]
fn is_proc_kcore(inode: *const u8) -> bool {
    let kcore = proc_kcore_ino();
    if kcore == 0 {
        return false;
    }
    let off = offsets();
    // SAFETY: probe reads; an unreadable inode is not kcore (the mode read
    // above succeeded, so this is a live inode).
    unsafe {
        let ino = bpf_probe_read_kernel::<u64>(inode.add(off.inode_i_ino as usize).cast());
        if ino != Ok(kcore) {
            return false;
        }
        bpf_probe_read_kernel::<*const u8>(inode.add(off.inode_i_sb as usize).cast())
            .and_then(|sb| {
                bpf_probe_read_kernel::<u64>(sb.add(off.super_block_s_magic as usize).cast())
            })
            .is_ok_and(|magic| magic == PROC_SUPER_MAGIC)
    }
}
