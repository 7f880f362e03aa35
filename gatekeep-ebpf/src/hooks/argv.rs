//! Argv capture at execve entry.
//!
//! By the time `bprm_check_security` runs, argv lives in the new mm and
//! cannot be read, so gated threads capture it on entry to the execve(at)
//! syscall into `EXEC_ARGV`. A restarted execve passes here again, so a
//! sibling thread that rewrites argv while we wait changes the request's
//! digest. The entry is dropped when the syscall returns.
//!
//! These are fentry/fexit programs on the syscalls' x86-64 entry points, not
//! `syscalls/sys_enter_execve` tracepoints: attaching any syscall tracepoint
//! sends every syscall of every task on the host through the slow tracing
//! path, while a trampoline on `__x64_sys_execve` costs nothing to the other
//! syscalls.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_probe_read_kernel as read_kernel,
        bpf_probe_read_user,
        generated::{bpf_probe_read_kernel, bpf_probe_read_user_str},
    },
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};
use gatekeep_common::{ARGV_LEN, ARGV_MAX_ARGS, ExecArgs, counter};

use crate::maps::{ARGV_BLOCK, ARGV_SCRATCH, EXEC_ARGV, GATED_CGROUPS, ZEROES, bump};

/// Offset of `si` in x86-64 `struct pt_regs`: execve's second argument
/// (`argv`). The first sixteen members are pushed in this order by the
/// kernel's syscall entry code (`PUSH_REGS`), so the layout is fixed.
const PT_REGS_SI: usize = 13 * 8;
/// Offset of `dx`: execveat's third argument (`argv`).
const PT_REGS_DX: usize = 12 * 8;

#[fentry(function = "__x64_sys_execve")]
pub fn execve_entry(ctx: FEntryContext) -> u32 {
    capture_argv(&ctx, PT_REGS_SI);
    0
}

#[fentry(function = "__x64_sys_execveat")]
pub fn execveat_entry(ctx: FEntryContext) -> u32 {
    capture_argv(&ctx, PT_REGS_DX);
    0
}

#[fexit(function = "__x64_sys_execve")]
pub fn execve_exit(_ctx: FExitContext) -> u32 {
    forget_argv();
    0
}

#[fexit(function = "__x64_sys_execveat")]
pub fn execveat_exit(_ctx: FExitContext) -> u32 {
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
fn capture_argv(ctx: &FEntryContext, argv_register: usize) {
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: presence check only.
    if unsafe { GATED_CGROUPS.get(&cgroup_id) }.is_none() {
        return;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(scratch) = ARGV_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // The syscall wrapper's only argument: the user registers at entry.
    let regs: *const u8 = ctx.arg(0);
    // SAFETY: `regs` is the kernel's pt_regs of this syscall; the offset is
    // inside its fixed part.
    let Ok(user_argv) =
        (unsafe { read_kernel(regs.add(argv_register).cast::<*const *const u8>()) })
    else {
        bump(counter::ARGV_MISSED);
        return;
    };
    // SAFETY: `scratch` points at this CPU's scratch slot; every string
    // write below starts in `argv` (offset masked below ARGV_LEN) and is at
    // most ARGV_LEN long, so it ends inside `argv` + `spill`.
    unsafe {
        let strings = scratch
            .cast::<u8>()
            .add(core::mem::offset_of!(ExecArgs, argv));
        let args = &mut (*scratch).args;
        args.len = 0;
        args.argc = 0;
        args.truncated = 0;
        args.approved = 0;
        let mut len: u32 = 0;
        let mut i: u32 = 0;
        while i < ARGV_MAX_ARGS {
            let Ok(arg) = bpf_probe_read_user(user_argv.add(i as usize)) else {
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
            let dst = strings.add(offset).cast::<c_void>();
            let copied = bpf_probe_read_user_str(dst, ARGV_LEN as u32, arg.cast::<c_void>());
            if copied < 0 {
                break;
            }
            // An empty argument is one byte (its NUL). Kernels without the
            // fix "mm: fix strncpy_from_user_nofault() behavior on empty
            // string" return 0 for it; stopping there would leave whatever
            // follows out of the digest (["", "safe"] == ["", "evil"]).
            let copied = if copied == 0 {
                *dst.cast::<u8>() = 0;
                1
            } else {
                copied
            };
            len += copied as u32;
            args.argc += 1;
            i += 1;
        }
        if i == ARGV_MAX_ARGS {
            // There may be more arguments than we keep.
            if let Ok(next) = bpf_probe_read_user(user_argv.add(ARGV_MAX_ARGS as usize)) {
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
        // Clear the rest of the last 64-byte block: the digest hashes whole
        // blocks up to `len`, and must not see the previous capture's bytes.
        if (len as usize) < ARGV_LEN {
            if let Some(zeroes) = ZEROES.get_ptr(0) {
                // Volatile: otherwise LLVM drops the mask (it knows len <
                // ARGV_LEN here) and the verifier cannot bound the offset.
                let offset = core::ptr::read_volatile(&raw const len) as usize & (ARGV_LEN - 1);
                bpf_probe_read_kernel(
                    strings.add(offset).cast::<c_void>(),
                    ARGV_BLOCK as u32,
                    zeroes.cast::<c_void>(),
                );
            }
        }
        if EXEC_ARGV.insert(&tid, &*args, 0).is_err() {
            bump(counter::ARGV_MISSED);
        }
    }
}
