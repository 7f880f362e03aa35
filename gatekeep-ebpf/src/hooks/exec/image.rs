//! The argv a new program receives, checked against the argv its exec was
//! allowed with (issue 19, item 3).
//!
//! `bprm_check_security` reads argv from the caller's memory after the
//! kernel copied it for the new program, so another thread (or a process
//! sharing that memory) can change the bytes in between: a verdict or grant
//! would allow one command line and another would run. The new program's
//! own copy is out of their reach. At `sched_process_exec` the binary is
//! loaded, `de_thread()` has ended the caller's other threads, the mm is the
//! new one, and not one instruction of the new program has run. So an exec
//! allowed on the ask path leaves a digest of the argv it was allowed with
//! ([`bind`]), and this hook digests the new mm's `arg_start..arg_end` (the
//! kernel's copy, the same NUL-terminated strings the capture holds). When
//! they differ the process is killed (SIGKILL, taken on its way back to
//! user space) and reported.
//!
//! A script's interpreter (and a `binfmt_misc` handler) runs with an argv
//! the kernel rewrote: `[interpreter, (option,) script path, argv[1..]]`
//! (`remove_arg_zero()`, then `copy_string_kernel()` in front). The
//! original argv[1..] ends it; only that is compared there (argv[0] is not
//! passed on to the script).

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_probe_read_kernel,
        generated::{
            bpf_probe_read_kernel as read_kernel_raw, bpf_probe_read_kernel_str,
            bpf_probe_read_user as read_user_raw, bpf_send_signal,
        },
    },
    macros::{btf_tracepoint, map},
    maps::LruHashMap,
    programs::BtfTracePointContext,
};
use gatekeep_common::{ARGV_LEN, action, counter, event_kind, request_kind};

use super::{
    argv::{ARGV_BLOCK, ARGV_SCRATCH, ZEROES},
    is_interpreter_pass,
};
use crate::{
    digest::Digest,
    events::{Caller, emit_task_event},
    maps::{bump, may_be_gated, offsets},
};

const SIGKILL: u32 = 9;

/// What an allowed exec bound of its argv, until its new program starts.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BoundArgv {
    /// The exec's `linux_binprm` (it lives exactly as long as the syscall).
    bprm: u64,
    /// The allowed request's digest, for the report.
    digest: u64,
    /// Digest of the whole argv.
    whole: u64,
    /// Digest of argv[1..]: what a script's interpreter receives of it.
    tail: u64,
    /// Bytes of the whole argv, and of argv[1..].
    whole_len: u32,
    tail_len: u32,
    policy_id: u32,
    _pad: u32,
}

/// Thread id -> the argv its exec was allowed with. An LRU map: an entry
/// left by an exec that failed after its check (and whose thread never
/// execs again) ages out instead of filling the map; a live entry lives for
/// the microseconds between the check and the new program's start.
#[map]
pub static BOUND_ARGV: LruHashMap<u32, BoundArgv> = LruHashMap::with_max_entries(16384, 0);

/// Binds the argv captured in this CPU's scratch to this thread's exec of
/// `bprm`, if a verdict or grant just allowed it with a whole argv (the
/// hook marked it so: `Pending::bind`). `false` when it could not be
/// recorded: the exec must then be refused. Clobbers the capture (the
/// digest pads in place): call it last.
#[inline(never)]
pub(super) fn bind_allowed(bprm: u64) -> bool {
    let Some(scratch) = ARGV_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch slot, for this run. Every copy is bounded
    // by ARGV_LEN and starts in `argv` at an offset below ARGV_LEN, so it
    // ends inside `argv` + `spill`.
    unsafe {
        let pending = &raw mut (*scratch).pending;
        if (*pending).bind == 0 {
            return true;
        }
        (*pending).bind = 0;
        let digest = (*pending).bind_digest;
        let policy_id = (*pending).policy_id;
        let tid = bpf_get_current_pid_tgid() as u32;
        let args = &raw const (*scratch).args;
        let whole_len = (*args).len.saturating_sub((*args).env_len);
        // Nothing to bind: no argv (the kernel runs it with ""), or one the
        // capture could not hold (never covered by a grant, and marked for
        // the reviewer).
        if (*args).truncated != 0 || whole_len == 0 {
            return true;
        }
        if whole_len as usize > ARGV_LEN {
            return false;
        }
        let buf = (&raw mut (*scratch).args.argv).cast::<u8>();
        let spill = (&raw mut (*scratch).spill).cast::<u8>();
        // argv[0]'s bytes, with its NUL.
        let first = bpf_probe_read_kernel_str(spill.cast(), ARGV_LEN as u32, buf.cast());
        if first <= 0 || first as u32 > whole_len {
            return false;
        }
        let whole = digest_prefix(buf, whole_len);
        // Below ARGV_LEN: argv[0] takes a byte at least.
        let tail_len = whole_len - first as u32;
        // Move argv[1..] to the front, through the spill.
        let from = buf.add(first as usize & (ARGV_LEN - 1));
        read_bounded(spill, tail_len, from, Source::Kernel);
        read_bounded(buf, tail_len, spill, Source::Kernel);
        let tail = digest_prefix(buf, tail_len);
        let bound = BoundArgv {
            bprm,
            digest,
            whole,
            tail,
            whole_len,
            tail_len,
            policy_id,
            _pad: 0,
        };
        BOUND_ARGV.insert(&tid, &bound, 0).is_ok()
    }
}

/// Where [`read_bounded`] reads from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Kernel,
    User,
}

/// Copies `len` bytes (at most ARGV_LEN) from `src` to `dst`, in a form the
/// verifier can bound; 0 or the helper's error.
#[inline(always)]
unsafe fn read_bounded(dst: *mut u8, len: u32, src: *const u8, source: Source) -> i64 {
    let read = |size: u32| {
        // SAFETY: (caller) `dst` has room for ARGV_LEN bytes; the helpers
        // fail safely on a bad `src`.
        unsafe {
            match source {
                Source::Kernel => read_kernel_raw(dst.cast(), size, src.cast()),
                Source::User => read_user_raw(dst.cast(), size, src.cast()),
            }
        }
    };
    if len as usize == ARGV_LEN {
        return read(ARGV_LEN as u32);
    }
    // Volatile, then masked: LLVM would otherwise drop the mask and reuse a
    // register the verifier cannot bound.
    // SAFETY: a read of a local.
    let size = unsafe { core::ptr::read_volatile(&raw const len) } & (ARGV_LEN as u32 - 1);
    if size == 0 {
        return 0;
    }
    read(size)
}

/// Drops what an earlier exec of this thread bound (one that failed after
/// its check): a later syscall's `linux_binprm` may reuse the address.
#[inline(always)]
pub(super) fn forget(tid: u32) {
    // SAFETY: presence check only (a delete takes the bucket's lock even
    // when there is nothing to delete).
    if unsafe { BOUND_ARGV.get(&tid) }.is_some() {
        let _ = BOUND_ARGV.remove(&tid);
    }
}

/// The digest of `buf[..len]`, after zeroing the rest of its last 64-byte
/// block (the bytes there are hashed too). The same block loop as the
/// request digest: the verifier walks each block once.
#[inline(always)]
unsafe fn digest_prefix(buf: *mut u8, len: u32) -> u64 {
    // SAFETY: (caller) `buf` is a scratch `argv`, followed by its spill.
    unsafe {
        if (len as usize) < ARGV_LEN
            && let Some(zeroes) = ZEROES.get_ptr(0)
        {
            // Volatile: otherwise LLVM drops the mask and the verifier
            // cannot bound the offset.
            let offset = core::ptr::read_volatile(&raw const len) as usize & (ARGV_LEN - 1);
            read_kernel_raw(
                buf.add(offset).cast::<c_void>(),
                ARGV_BLOCK as u32,
                zeroes.cast::<c_void>(),
            );
        }
        let mut digest = Digest::new();
        digest.word(u64::from(len));
        digest.blocks(buf, len as usize, ARGV_LEN);
        digest.finish()
    }
}

/// `sched/sched_process_exec` runs for every exec that succeeded on the
/// host, before the new program runs. Tasks outside gated cgroups return
/// after an array lookup.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> u32 {
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if may_be_gated(cgroup_id) {
        check_new_image(&ctx, cgroup_id);
    }
    0
}

/// Kills the new program when its argv is not the one its exec was allowed
/// with.
#[inline(never)]
fn check_new_image(ctx: &BtfTracePointContext, cgroup_id: u64) {
    // TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm
    // *bprm): `old_pid` is the thread id the exec started in (de_thread()
    // gives a non-leader the leader's).
    let old_tid = ctx.arg::<i32>(1) as u32;
    let bprm: u64 = ctx.arg(2);
    // SAFETY: copied out immediately.
    let Some(bound) = (unsafe { BOUND_ARGV.get(&old_tid) }).copied() else {
        return;
    };
    let _ = BOUND_ARGV.remove(&old_tid);
    if bound.bprm != bprm {
        return;
    }
    // Unreadable means unknown: fail closed.
    if image_argv_matches(bprm as *const u8, &bound) == Ok(true) {
        return;
    }
    // SAFETY: a signal to the current process, which is not a kernel thread.
    unsafe { bpf_send_signal(SIGKILL) };
    bump(counter::EXEC_ARGV_CHANGED);
    emit_task_event(
        &Caller::current(cgroup_id, bound.policy_id),
        event_kind::EXEC_ARGV_CHANGED,
        bound.digest,
        request_kind::EXEC,
        action::DENY,
    );
}

/// Whether the new mm's argv is the one bound (its tail, after an
/// interpreter's rewrite).
#[inline(always)]
fn image_argv_matches(bprm: *const u8, bound: &BoundArgv) -> Result<bool, i64> {
    let off = offsets();
    let interpreted = is_interpreter_pass(bprm)?;
    // SAFETY: every read goes through the probe helpers, which fail safely;
    // the copy into this CPU's scratch is bounded by ARGV_LEN.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let mm: *const u8 = bpf_probe_read_kernel(task.add(off.task_struct_mm as usize).cast())?;
        let start: u64 = bpf_probe_read_kernel(mm.add(off.mm_struct_arg_start as usize).cast())?;
        let end: u64 = bpf_probe_read_kernel(mm.add(off.mm_struct_arg_end as usize).cast())?;
        let size = end.checked_sub(start).ok_or(-1i64)?;
        let (from, len, expected) = if interpreted {
            if size < u64::from(bound.tail_len) {
                return Ok(false);
            }
            (end - u64::from(bound.tail_len), bound.tail_len, bound.tail)
        } else {
            if size != u64::from(bound.whole_len) {
                return Ok(false);
            }
            (start, bound.whole_len, bound.whole)
        };
        let scratch = ARGV_SCRATCH.get_ptr_mut(0).ok_or(-1i64)?;
        let buf = (&raw mut (*scratch).args.argv).cast::<u8>();
        if len as usize > ARGV_LEN {
            return Ok(false);
        }
        let read = read_bounded(buf, len, from as *const u8, Source::User);
        if read != 0 {
            return Err(read);
        }
        Ok(digest_prefix(buf, len) == expected)
    }
}
