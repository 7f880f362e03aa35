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
use gatekeep_common::{ARGV_LEN, ARGV_MAX_ARGS};

use super::EnvScan;

/// Argv and the bound environment as the exec digest and the events carry
/// them.
#[repr(C)]
pub struct ExecArgs {
    /// Bytes of `argv` used (NUL-separated strings): argv's, then the bound
    /// environment's (the last `env_len`).
    pub len: u32,
    pub argc: u32,
    /// Non-zero when the capture does not hold the whole argv: longer than
    /// [`ARGV_LEN`] or [`ARGV_MAX_ARGS`], or an argument was unreadable; or
    /// not the whole bound environment (see `env`).
    pub truncated: u32,
    pub _pad: u32,
    /// Bytes of the bound environment variables (`LD_*` and the policy's
    /// `bound_env`) at the end of `argv[..len]` (at most [`ENV_LEN`]).
    pub env_len: u32,
    /// Bound environment variables captured.
    pub env_count: u32,
    /// The captured strings; zero from `len` to the end of its 64-byte
    /// block (what the digest hashes, so one loop hashes both argv and the
    /// environment: the hook's frame has no room for a second).
    pub argv: [u8; ARGV_LEN],
}

/// Where an [`ExecArgs`] is built (far beyond the stack). The spill after it
/// lets the verifier prove that every bounded string copy at a masked offset
/// stays inside the value.
#[repr(C)]
pub struct ArgvScratch {
    pub args: ExecArgs,
    pub spill: [u8; ARGV_LEN],
    /// The environment scan's state (`bpf_loop` callbacks keep no stack).
    pub scan: EnvScan,
    /// The hook's decision so far (see `exec_action`).
    pub pending: super::Pending,
    /// The new image's environment walk (see `image`).
    pub image: super::ImageEnvScan,
}

/// Offsets in x86-64 `struct pt_regs`, whose first members the syscall entry
/// code pushes in a fixed order (`PUSH_REGS`): `dx` holds execveat's third
/// argument, `si` execve's second (both `argv`), `orig_ax` the syscall number;
/// `envp` is execve's third (`dx`) and execveat's fourth (`r10`). An ia32
/// syscall passes its arguments in `ebx, ecx, edx, esi, edi, ebp`: execve's
/// `argv` in `ecx` and `envp` in `edx`, execveat's in `edx` and `esi`.
const PT_REGS_R10: usize = 7 * 8;
const PT_REGS_CX: usize = 11 * 8;
const PT_REGS_DX: usize = 12 * 8;
const PT_REGS_SI: usize = 13 * 8;
const PT_REGS_ORIG_AX: usize = 15 * 8;
/// x86-64 syscall numbers.
const NR_EXECVE: u64 = 59;
const NR_EXECVEAT: u64 = 322;
/// ia32 (`int 0x80`, `sysenter`, 32-bit `syscall`) syscall numbers. No
/// 64-bit syscall that reaches this hook carries them (x86-64's 11 is
/// `munmap`; 358 is unassigned), nor 59 or 322 an ia32 one (not execs). The
/// kernel reads an ia32 syscall's arguments as the low 32 bits of the
/// registers (`SC_IA32_REGS_TO_ARGS`, also for `int 0x80` from 64-bit code,
/// whose upper halves the caller controls) and its pointer arrays as 32-bit
/// entries (`compat_ptr`), and so does the capture. x32 execs (520 and 545
/// with bit 30 set) are not read: truncated (`on_truncated` decides).
const NR_IA32_EXECVE: u64 = 11;
const NR_IA32_EXECVEAT: u64 = 358;

/// A user array of pointers as the exec syscall passed it: its address and
/// whether its entries are 32-bit (an ia32 exec).
#[derive(Clone, Copy)]
pub struct UserArray {
    pub base: u64,
    pub compat: bool,
}

impl UserArray {
    /// Entry `i`, zero-extended, or `None` when unreadable.
    #[inline(always)]
    fn entry(self, i: u32) -> Option<u64> {
        // SAFETY: user memory, read through the probe helper, which fails
        // safely.
        unsafe {
            if self.compat {
                let at = self.base.wrapping_add(u64::from(i) * 4) as *const u32;
                bpf_probe_read_user(at).ok().map(u64::from)
            } else {
                let at = self.base.wrapping_add(u64::from(i) * 8) as *const u64;
                bpf_probe_read_user(at).ok()
            }
        }
    }
}

/// The `argv` and `envp` arrays this thread passed to `execve(at)`, 64-bit
/// or ia32.
#[inline(always)]
pub(super) fn user_arrays() -> Option<(UserArray, UserArray)> {
    // SAFETY: helpers on the current task; `regs` is the kernel's saved user
    // registers of the current syscall, and every read of it goes through
    // the probe helper at an offset inside its fixed part.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
        let nr = read_kernel(regs.add(PT_REGS_ORIG_AX).cast::<u64>()).ok()?;
        let (argv, envp, compat) = match nr {
            NR_EXECVE => (PT_REGS_SI, PT_REGS_DX, false),
            NR_EXECVEAT => (PT_REGS_DX, PT_REGS_R10, false),
            NR_IA32_EXECVE => (PT_REGS_CX, PT_REGS_DX, true),
            NR_IA32_EXECVEAT => (PT_REGS_DX, PT_REGS_SI, true),
            _ => return None,
        };
        let register = |at: usize| -> Option<u64> {
            let value = read_kernel(regs.add(at).cast::<u64>()).ok()?;
            Some(if compat { value & 0xffff_ffff } else { value })
        };
        Some((
            UserArray {
                base: register(argv)?,
                compat,
            },
            UserArray {
                base: register(envp)?,
                compat,
            },
        ))
    }
}

#[inline(always)]
pub(super) fn capture(user_argv: UserArray) -> Option<*const ExecArgs> {
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
        args.env_len = 0;
        args.env_count = 0;
        let mut len: u32 = 0;
        let mut i: u32 = 0;
        // A NULL argv is an empty one (the kernel runs it with argc 0, or
        // with "" since v5.18): nothing to read, nothing truncated.
        if user_argv.base == 0 {
            i = ARGV_MAX_ARGS + 1;
        }
        while i < ARGV_MAX_ARGS {
            let Some(arg) = user_argv.entry(i) else {
                // The kernel read this array a moment ago; unreadable now
                // (unmapped by a sibling, paged out): what follows is unknown.
                args.truncated = 1;
                break;
            };
            if arg == 0 {
                break;
            }
            let arg = arg as *const u8;
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
            // A copy that filled the whole read may have been cut short (the
            // helper NUL-terminates what fits): an argument of ARGV_LEN - 1
            // bytes or more cannot be told from a longer one.
            if copied as usize >= ARGV_LEN {
                args.truncated = 1;
            }
            len += copied as u32;
            args.argc += 1;
            i += 1;
        }
        if i == ARGV_MAX_ARGS {
            // There may be more arguments than we keep.
            if let Some(next) = user_argv.entry(ARGV_MAX_ARGS) {
                if next != 0 {
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
