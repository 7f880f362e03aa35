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
//!
//! The bound environment (`LD_*` and the policy's `bound_env`, see `env`)
//! is read from the caller's memory too, and checked the same way: the new
//! mm's `arg_end..env_end` holds the environment strings in the order the
//! exec passed them; a `bpf_loop` walks them, collects the bound ones as
//! the capture did, and their digest must be the one bound. A walk that
//! cannot finish (an unreadable string, more than [`IMAGE_ENV_STEPS`]
//! steps) reads as a mismatch: unknown fails closed.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_probe_read_kernel,
        generated::{
            bpf_loop, bpf_probe_read_kernel as read_kernel_raw, bpf_probe_read_kernel_str,
            bpf_probe_read_user as read_user_raw, bpf_probe_read_user_str, bpf_send_signal,
        },
    },
    macros::{btf_tracepoint, map},
    maps::LruHashMap,
    programs::BtfTracePointContext,
};
use gatekeep_common::{
    ARGV_LEN, BOUND_ENV_NAME_LEN, ENV_LEN, ENV_MAX_SCAN, action, counter, event_kind, request_kind,
};

use super::{
    argv::{ARGV_BLOCK, ARGV_SCRATCH, ZEROES},
    env::is_bound,
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
    /// Digest of the bound environment variables, in exec order.
    env: u64,
    /// Bytes of the whole argv, and of argv[1..].
    whole_len: u32,
    tail_len: u32,
    policy_id: u32,
    /// Bytes of the bound environment variables.
    env_len: u32,
}

/// Most steps of the new image's environment walk: a step reads one string,
/// or [`ARGV_LEN`] bytes of a longer one. The capture looks at most at
/// [`ENV_MAX_SCAN`] entries (more is truncated, and never bound), so this
/// leaves as many steps again for long values.
const IMAGE_ENV_STEPS: u32 = 2 * ENV_MAX_SCAN;

/// The walk's state ([`super::ImageEnvScan::outcome`]).
const WALKING: u32 = 0;
const WALKED: u32 = 1;
const DIFFERS: u32 = 2;

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
        // The bound environment follows argv in the capture: digest it
        // first, from the spill (the argv digests below clobber both).
        let env_len = (*args).env_len;
        if env_len as usize > ENV_LEN {
            return false;
        }
        let env_at = buf.add(whole_len as usize & (ARGV_LEN - 1));
        if read_bounded(spill, env_len, env_at, Source::Kernel) != 0 {
            return false;
        }
        let env = digest_prefix(spill, env_len);
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
            env,
            whole_len,
            tail_len,
            policy_id,
            env_len,
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
        // Two calls from here, not one inside the other: each walk needs
        // its own frames, and the verifier counts a call chain's together.
        let argv = check_new_argv(&ctx);
        if argv == ARGV_MATCHES && image_env_matches() {
            return 0;
        }
        // The argv first: when it differs the environment was not walked.
        match argv {
            UNBOUND => {}
            ARGV_MATCHES => kill_changed(cgroup_id, event_kind::EXEC_ENV_CHANGED),
            _ => kill_changed(cgroup_id, event_kind::EXEC_ARGV_CHANGED),
        }
    }
    0
}

/// [`check_new_argv`]'s answers.
const UNBOUND: u32 = 0;
const ARGV_MATCHES: u32 = 1;
const ARGV_DIFFERS: u32 = 2;

/// Whether this exec bound its argv, and whether the new mm's is that one.
/// When it bound it, what the environment walk and the report need is left
/// in this CPU's scratch (`image`).
#[inline(never)]
fn check_new_argv(ctx: &BtfTracePointContext) -> u32 {
    // TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm
    // *bprm): `old_pid` is the thread id the exec started in (de_thread()
    // gives a non-leader the leader's).
    let old_tid = ctx.arg::<i32>(1) as u32;
    let bprm: u64 = ctx.arg(2);
    // SAFETY: copied out immediately.
    let Some(bound) = (unsafe { BOUND_ARGV.get(&old_tid) }).copied() else {
        return UNBOUND;
    };
    let _ = BOUND_ARGV.remove(&old_tid);
    if bound.bprm != bprm {
        return UNBOUND;
    }
    let Some(scratch) = ARGV_SCRATCH.get_ptr_mut(0) else {
        return ARGV_DIFFERS;
    };
    let image = image_layout();
    // SAFETY: this CPU's scratch slot, for this run.
    unsafe {
        let scan = &raw mut (*scratch).image;
        (*scan).digest = bound.digest;
        (*scan).policy_id = bound.policy_id;
        (*scan).expected = bound.env;
        (*scan).expected_len = bound.env_len;
        (*scan).at = 0;
        (*scan).end = 0;
        if let Ok(image) = &image {
            (*scan).at = image.arg_end;
            (*scan).end = image.env_end;
        }
    }
    // Unreadable means unknown: fail closed.
    match image {
        Ok(image) if image_argv_matches(bprm as *const u8, &image, &bound) == Ok(true) => {
            ARGV_MATCHES
        }
        _ => ARGV_DIFFERS,
    }
}

/// Kills the new program (its argv or bound environment is not the one its
/// exec was allowed with) and reports it as `changed`
/// (`EXEC_ARGV_CHANGED` or `EXEC_ENV_CHANGED`).
#[inline(never)]
fn kill_changed(cgroup_id: u64, changed: u32) {
    // SAFETY: a signal to the current process, which is not a kernel thread.
    unsafe { bpf_send_signal(SIGKILL) };
    bump(if changed == event_kind::EXEC_ENV_CHANGED {
        counter::EXEC_ENV_CHANGED
    } else {
        counter::EXEC_ARGV_CHANGED
    });
    let Some(scratch) = ARGV_SCRATCH.get_ptr(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot, written by `check_new_argv`.
    let (policy_id, digest) = unsafe { ((*scratch).image.policy_id, (*scratch).image.digest) };
    emit_task_event(
        &Caller::current(cgroup_id, policy_id),
        changed,
        digest,
        request_kind::EXEC,
        action::DENY,
    );
}

/// Where the new mm keeps its argv and environment strings (user
/// addresses): `arg_start..arg_end`, then `arg_end..env_end`.
struct ImageLayout {
    arg_start: u64,
    arg_end: u64,
    env_end: u64,
}

#[inline(always)]
fn image_layout() -> Result<ImageLayout, i64> {
    let off = offsets();
    // SAFETY: every read goes through the probe helper, which fails safely.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let mm: *const u8 = bpf_probe_read_kernel(task.add(off.task_struct_mm as usize).cast())?;
        Ok(ImageLayout {
            arg_start: bpf_probe_read_kernel(mm.add(off.mm_struct_arg_start as usize).cast())?,
            arg_end: bpf_probe_read_kernel(mm.add(off.mm_struct_arg_end as usize).cast())?,
            env_end: bpf_probe_read_kernel(mm.add(off.mm_struct_env_end as usize).cast())?,
        })
    }
}

/// Whether the new mm's argv is the one bound (its tail, after an
/// interpreter's rewrite).
#[inline(always)]
fn image_argv_matches(
    bprm: *const u8,
    image: &ImageLayout,
    bound: &BoundArgv,
) -> Result<bool, i64> {
    let interpreted = is_interpreter_pass(bprm)?;
    let (start, end) = (image.arg_start, image.arg_end);
    // SAFETY: user memory is read through the probe helpers, which fail
    // safely; the copy into this CPU's scratch is bounded by ARGV_LEN.
    unsafe {
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

/// Whether the new mm's bound environment variables are the ones bound:
/// walks `arg_end..env_end` ([`image_env_step`]) collecting them into this
/// CPU's scratch, then compares length and digest with what
/// [`check_new_argv`] left there.
#[inline(never)]
fn image_env_matches() -> bool {
    let Some(scratch) = ARGV_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch slot, for this run; the callback writes the
    // same slot.
    unsafe {
        let scan = &raw mut (*scratch).image;
        if (*scan).end == 0 {
            return false;
        }
        (*scan).len = 0;
        (*scan).skipping = 0;
        (*scan).outcome = WALKING;
        bpf_loop(
            IMAGE_ENV_STEPS,
            image_env_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
        let len = (*scan).len;
        if (*scan).outcome != WALKED || len != (*scan).expected_len || len as usize > ENV_LEN {
            return false;
        }
        let buf = (&raw mut (*scratch).args.argv).cast::<u8>();
        digest_prefix(buf, len) == (*scan).expected
    }
}

/// `bpf_loop` callback: reads the string at `at` into the spill, appends it
/// to the collected variables if it is bound, and moves on; returns 1 to
/// stop.
#[inline(never)]
extern "C" fn image_env_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(scratch) = ARGV_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch slot; user memory is read through the probe
    // helpers into its spill, and a bound string is copied from there to
    // `argv` at an offset below ENV_LEN, at most ENV_LEN bytes long.
    unsafe {
        let scan = &raw mut (*scratch).image;
        if (*scan).at >= (*scan).end {
            (*scan).outcome = WALKED;
            return 1;
        }
        let spill = (&raw mut (*scratch).spill).cast::<u8>();
        let read = bpf_probe_read_user_str(
            spill.cast::<c_void>(),
            ARGV_LEN as u32,
            (*scan).at as *const c_void,
        );
        if read < 0 {
            (*scan).outcome = DIFFERS;
            return 1;
        }
        // "" may read as 0 bytes on some kernels (see `argv`): its NUL.
        let read = if read == 0 { 1 } else { read as usize };
        // A full read may have stopped short of the string's NUL: its last
        // byte is the helper's. Go on from there, inside the same string.
        let whole = read < ARGV_LEN;
        let step = if whole { read } else { ARGV_LEN - 1 };
        if (*scan).skipping != 0 {
            (*scan).skipping = u32::from(!whole);
            (*scan).at += step as u64;
            return 0;
        }
        let mut head = [0_u64; BOUND_ENV_NAME_LEN / 8];
        read_kernel_raw(
            head.as_mut_ptr().cast::<c_void>(),
            BOUND_ENV_NAME_LEN as u32,
            spill.cast::<c_void>(),
        );
        if is_bound(&head, (*scan).policy_id) {
            let len = (*scan).len as usize;
            // Too long to have been bound (the capture would have marked
            // the exec truncated): not the environment that was allowed.
            if !whole || len + read > ENV_LEN {
                (*scan).outcome = DIFFERS;
                return 1;
            }
            let buf = (&raw mut (*scratch).args.argv).cast::<u8>();
            // Volatile, then masked: LLVM knows `len` is small and would drop
            // the mask the verifier needs.
            let offset = core::ptr::read_volatile(&raw const len) & (ARGV_LEN - 1);
            let dst = buf.add(offset);
            if read_bounded(dst, read as u32, spill, Source::Kernel) != 0 {
                (*scan).outcome = DIFFERS;
                return 1;
            }
            (*scan).len = (len + read) as u32;
        } else {
            (*scan).skipping = u32::from(!whole);
        }
        (*scan).at += step as u64;
        0
    }
}
