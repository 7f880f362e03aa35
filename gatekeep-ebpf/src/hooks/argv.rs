//! Argv capture at execve entry.
//!
//! By the time `bprm_check_security` runs, argv lives in the new mm and
//! cannot be read, so gated threads capture it at `sys_enter_execve(at)`
//! into `EXEC_ARGV`. A restarted execve passes here again, so a sibling
//! thread that rewrites argv while we wait changes the request's digest.
//! The entry is dropped at syscall exit.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_probe_read_user,
        generated::{bpf_probe_read_kernel, bpf_probe_read_user_str},
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use gatekeep_common::{ARGV_LEN, ARGV_MAX_ARGS, counter};

use crate::maps::{ARGV_SCRATCH, EXEC_ARGV, GATED_CGROUPS, ZEROES, bump};

/// Offset of `argv` in the `syscalls/sys_enter_execve` record (after the
/// 8-byte common header, `__syscall_nr` and `filename`); see its `format`.
const EXECVE_ARGV_OFFSET: usize = 24;
/// Offset of `argv` in `syscalls/sys_enter_execveat` (after `fd`, `filename`).
const EXECVEAT_ARGV_OFFSET: usize = 32;

#[tracepoint(category = "syscalls", name = "sys_enter_execve")]
pub fn sys_enter_execve(ctx: TracePointContext) -> u32 {
    capture_argv(&ctx, EXECVE_ARGV_OFFSET);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_execveat")]
pub fn sys_enter_execveat(ctx: TracePointContext) -> u32 {
    capture_argv(&ctx, EXECVEAT_ARGV_OFFSET);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_execve")]
pub fn sys_exit_execve(_ctx: TracePointContext) -> u32 {
    forget_argv();
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_execveat")]
pub fn sys_exit_execveat(_ctx: TracePointContext) -> u32 {
    forget_argv();
    0
}

#[inline(always)]
fn forget_argv() {
    let tid = bpf_get_current_pid_tgid() as u32;
    // Every exec on the host passes here: a lookup first, since a delete takes the
    // bucket's lock even when there is nothing to delete.
    // SAFETY: presence check only.
    if unsafe { EXEC_ARGV.get(&tid) }.is_some() {
        let _ = EXEC_ARGV.remove(&tid);
    }
}

#[inline(always)]
fn capture_argv(ctx: &TracePointContext, argv_offset: usize) {
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: presence check only.
    if unsafe { GATED_CGROUPS.get(&cgroup_id) }.is_none() {
        return;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(args) = ARGV_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the record layout is fixed by the tracepoint's format.
    let Ok(argv) = (unsafe { ctx.read_at::<*const *const u8>(argv_offset) }) else {
        bump(counter::ARGV_MISSED);
        return;
    };
    // SAFETY: `args` points at this CPU's scratch slot; every write below
    // stays inside `argv[..2 * ARGV_LEN]` (offset masked below ARGV_LEN,
    // size at most ARGV_LEN).
    unsafe {
        let args = &mut *args;
        args.len = 0;
        args.argc = 0;
        args.truncated = 0;
        args.approved = 0;
        let mut len: u32 = 0;
        let mut i: u32 = 0;
        while i < ARGV_MAX_ARGS {
            let Ok(arg) = bpf_probe_read_user(argv.add(i as usize)) else {
                break;
            };
            if arg.is_null() {
                break;
            }
            if len as usize >= ARGV_LEN {
                args.truncated = 1;
                break;
            }
            let offset = len as usize & (ARGV_LEN - 1);
            let dst = args.argv.as_mut_ptr().add(offset).cast::<c_void>();
            let copied = bpf_probe_read_user_str(dst, ARGV_LEN as u32, arg.cast::<c_void>());
            if copied <= 0 {
                break;
            }
            len += copied as u32;
            args.argc += 1;
            i += 1;
        }
        if i == ARGV_MAX_ARGS {
            // There may be more arguments than we keep.
            if let Ok(next) = bpf_probe_read_user(argv.add(ARGV_MAX_ARGS as usize)) {
                if !next.is_null() {
                    args.truncated = 1;
                }
            }
        }
        if len as usize > ARGV_LEN {
            len = ARGV_LEN as u32;
            args.truncated = 1;
        }
        args.len = len;
        // Clear the rest of the captured window so the digest can hash all
        // of it without data-dependent branches (which the verifier would
        // explore once per word).
        if (len as usize) < ARGV_LEN {
            if let Some(zeroes) = ZEROES.get_ptr(0) {
                // Volatile: otherwise LLVM drops the mask (it knows len <
                // ARGV_LEN here) and the verifier cannot bound the offset.
                let offset = core::ptr::read_volatile(&raw const len) as usize & (ARGV_LEN - 1);
                bpf_probe_read_kernel(
                    args.argv.as_mut_ptr().add(offset).cast::<c_void>(),
                    ARGV_LEN as u32,
                    zeroes.cast::<c_void>(),
                );
            }
        }
        if EXEC_ARGV.insert(&tid, &*args, 0).is_err() {
            bump(counter::ARGV_MISSED);
        }
    }
}
