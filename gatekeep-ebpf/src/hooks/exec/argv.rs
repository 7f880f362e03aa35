//! Argv capture, from inside `bprm_check_security`.
//!
//! When `security_bprm_check()` runs, the new program's mm is built but not
//! yet installed (`begin_new_exec()` comes later, in the binary loader), so
//! the caller's own memory, and the `argv` array it passed to `execve(at)`,
//! is still `current->mm`. The array's address is in the syscall's saved
//! user registers. So argv is read only where it is needed, on the deny and
//! ask paths of gated tasks, into per-CPU scratch that lives as long as the
//! hook's run: no per-thread state, and no program on the syscall's entry or
//! exit that every exec on the host would pay for.
//!
//! Each pass reads the array afresh, so a sibling thread that rewrites argv
//! while the thread is paused changes the restarted request's digest.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel as read_kernel, bpf_probe_read_user,
        generated::{
            bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_probe_read_user_str,
            bpf_task_pt_regs,
        },
    },
    macros::map,
    maps::{Array, PerCpuArray},
};
use gatekeep_common::{ARGV_LEN, ARGV_MAX_ARGS, counter};

use crate::maps::bump;

/// Argv as the exec digest and the events carry it.
#[repr(C)]
pub struct ExecArgs {
    /// Bytes of `argv` used (NUL-separated strings).
    pub len: u32,
    pub argc: u32,
    /// Non-zero when the capture does not hold the whole argv: longer than
    /// [`ARGV_LEN`] or [`ARGV_MAX_ARGS`], or an argument was unreadable.
    pub truncated: u32,
    pub _pad: u32,
    /// The captured strings; zero from `len` to the end of its 64-byte
    /// block (what the digest hashes).
    pub argv: [u8; ARGV_LEN],
}

/// Where an [`ExecArgs`] is built (far beyond the stack). The spill after it
/// lets the verifier prove that every bounded string copy at a masked offset
/// stays inside the value.
#[repr(C)]
pub struct ArgvScratch {
    pub args: ExecArgs,
    pub spill: [u8; ARGV_LEN],
}

/// Offsets in x86-64 `struct pt_regs`, whose first members the syscall entry
/// code pushes in a fixed order (`PUSH_REGS`): `dx` holds execveat's third
/// argument, `si` execve's second (both `argv`), `orig_ax` the syscall number.
const PT_REGS_DX: usize = 12 * 8;
const PT_REGS_SI: usize = 13 * 8;
const PT_REGS_ORIG_AX: usize = 15 * 8;
/// x86-64 syscall numbers. A compat exec has other numbers in `orig_ax`
/// (ia32 `int 0x80`/`sysenter`: execve 11, execveat 358; x32: 520 and 545
/// with bit 30 set) and other register conventions, and no compat syscall
/// reaching this hook carries 59 or 322 (those ia32 numbers are not execs,
/// so they never get here). So any other number is a compat exec: it is
/// not captured (`ARGV_MISSED`), and the request is truncated (the policy's
/// `on_truncated` decides, deny by default).
const NR_EXECVE: u64 = 59;
const NR_EXECVEAT: u64 = 322;

/// Reads the calling thread's exec argv into this CPU's scratch, or `None`
/// (counted in `ARGV_MISSED`) when the syscall or its argv cannot be read.
/// The result is valid until this program run ends.
#[inline(always)]
pub fn capture_current_argv() -> Option<*const ExecArgs> {
    let captured = user_argv().and_then(capture);
    if captured.is_none() {
        bump(counter::ARGV_MISSED);
    }
    captured
}

/// The `argv` pointer this thread passed to `execve(at)`.
#[inline(always)]
fn user_argv() -> Option<*const *const u8> {
    // SAFETY: helpers on the current task; `regs` is the kernel's saved user
    // registers of the current syscall, and every read of it goes through
    // the probe helper at an offset inside its fixed part.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
        let nr = read_kernel(regs.add(PT_REGS_ORIG_AX).cast::<u64>()).ok()?;
        let register = match nr {
            NR_EXECVE => PT_REGS_SI,
            NR_EXECVEAT => PT_REGS_DX,
            _ => return None,
        };
        read_kernel(regs.add(register).cast::<*const *const u8>()).ok()
    }
}

#[inline(always)]
fn capture(user_argv: *const *const u8) -> Option<*const ExecArgs> {
    let scratch = ARGV_SCRATCH.get_ptr_mut(0)?;
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
        let mut len: u32 = 0;
        let mut i: u32 = 0;
        // A NULL argv is an empty one (the kernel runs it with argc 0, or
        // with "" since v5.18): nothing to read, nothing truncated.
        if user_argv.is_null() {
            i = ARGV_MAX_ARGS + 1;
        }
        while i < ARGV_MAX_ARGS {
            let Ok(arg) = bpf_probe_read_user(user_argv.add(i as usize)) else {
                // The kernel read this array a moment ago; unreadable now
                // (unmapped by a sibling, paged out): what follows is unknown.
                args.truncated = 1;
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
                args.truncated = 1;
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
        Some(&raw const (*scratch).args)
    }
}

// The maps only this hook uses. (At the end of the file, so that the line
// numbers in the hook's log records stay those of the code above.)

/// Bytes of argv the exec digest hashes per step; a capture clears the rest
/// of its last block.
pub const ARGV_BLOCK: usize = 64;

/// Zeroes (never written): the source that clears the rest of the last
/// digest block of a captured argv in one helper call.
#[map]
pub static ZEROES: Array<[u8; ARGV_BLOCK]> = Array::with_max_entries(1, 0);

/// Where argv is captured, for the length of one hook run.
#[map]
pub static ARGV_SCRATCH: PerCpuArray<ArgvScratch> = PerCpuArray::with_max_entries(1, 0);
