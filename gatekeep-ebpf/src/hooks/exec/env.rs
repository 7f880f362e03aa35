//! Capture of the bound environment variables, from inside
//! `bprm_check_security`, next to argv (see `argv`): the loader's `LD_*`
//! (`LD_PRELOAD`, `LD_LIBRARY_PATH`, `LD_AUDIT`, ...) and the names the
//! policy's `exec.bound_env` adds (`EXEC_BOUND_ENV`). Only on the deny and
//! ask paths of gated tasks, like argv: nothing else pays for it.
//!
//! The `envp` array is scanned with `bpf_loop` (one verified callback, up
//! to [`ENV_MAX_SCAN`] entries, whatever the environment's size), whose
//! state lives in the per-CPU scratch: the hook's frames already use most
//! of the 512 bytes of stack the verifier allows over the call chain, and a
//! callback's frame counts on top of its caller's. Each entry's first
//! [`BOUND_ENV_NAME_LEN`] bytes are read to match the names; a bound one is
//! then copied whole into the argv buffer, after argv and the previous ones,
//! so the digest's one loop over that buffer covers it. An environment that
//! does not fit (more than [`ENV_LEN`] bytes of bound variables, or less
//! room than that left after argv, more than [`ENV_MAX_SCAN`] entries, an
//! unreadable entry) marks the capture truncated, and the policy's
//! `on_truncated` decides.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{
        bpf_loop, bpf_probe_read_kernel, bpf_probe_read_user, bpf_probe_read_user_str,
    },
    macros::map,
    maps::Array,
};
use gatekeep_common::{
    ARGV_LEN, BOUND_ENV_NAME_LEN, BOUND_ENV_NAMES, BoundEnv, ENV_LEN, ENV_MAX_SCAN, MAX_POLICIES,
};

use super::argv::{ARGV_BLOCK, ARGV_SCRATCH, UserArray, ZEROES};

/// Words of a bound name.
const NAME_WORDS: usize = BOUND_ENV_NAME_LEN / 8;
/// `"LD_"` as the low three bytes of a little-endian word.
const LD_PREFIX: u64 = 0x005f_444c;

/// Captures the bound variables of `envp` into this CPU's scratch, after
/// the argv `argv` just captured there, for `policy_id`'s names. Not
/// inlined: the hook's frame has no room for its registers.
#[inline(never)]
pub fn capture_env(envp: UserArray, policy_id: u32) {
    let Some(scratch) = ARGV_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: `scratch` is this CPU's slot; only raw places are written
    // (the callback writes the same slot).
    unsafe {
        let args = &raw mut (*scratch).args;
        (*args).env_len = 0;
        (*args).env_count = 0;
        // A NULL envp is an empty environment.
        if envp.base != 0 {
            let scan = &raw mut (*scratch).scan;
            (*scan).envp = envp.base;
            (*scan).compat = u32::from(envp.compat);
            (*scan).policy_id = policy_id;
            (*scan).complete = 0;
            bpf_loop(
                ENV_MAX_SCAN,
                scan_entry as *mut c_void,
                core::ptr::null_mut(),
                0,
            );
            if (*scan).complete == 0 {
                // More entries than the scan looks at: a bound one may follow.
                (*args).truncated = 1;
            }
        }
        // Clear the rest of the last 64-byte block: the digest hashes whole
        // blocks up to `len`.
        let len = (*args).len;
        if (*args).env_len != 0
            && (len as usize) < ARGV_LEN
            && let Some(zeroes) = ZEROES.get_ptr(0)
        {
            // Volatile: keeps the mask, so the verifier can bound the offset.
            let offset = core::ptr::read_volatile(&raw const len) as usize & (ARGV_LEN - 1);
            bpf_probe_read_kernel(
                (&raw mut (*args).argv)
                    .cast::<u8>()
                    .add(offset)
                    .cast::<c_void>(),
                ARGV_BLOCK as u32,
                zeroes.cast::<c_void>(),
            );
        }
    }
}

/// `bpf_loop` callback: looks at `envp[index]`; returns 1 to stop.
#[inline(never)]
extern "C" fn scan_entry(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(scratch) = ARGV_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: `scratch` is this CPU's slot; user memory is read through the
    // probe helpers into it, and every write into `argv` starts at an offset
    // masked below ARGV_LEN and is at most ENV_LEN long, so it ends inside
    // `argv` + `spill`.
    unsafe {
        let args = &raw mut (*scratch).args;
        let scan = &raw mut (*scratch).scan;
        let stop = |truncated: bool| stop(scratch, truncated);
        let entry = (&raw mut (*scan).entry).cast::<c_void>();
        // A 32-bit entry lands zero-extended (little-endian).
        (*scan).entry = 0;
        let read = if (*scan).compat != 0 {
            let at = (*scan).envp.wrapping_add(index * 4) as *const c_void;
            bpf_probe_read_user(entry, 4, at)
        } else {
            let at = (*scan).envp.wrapping_add(index * 8) as *const c_void;
            bpf_probe_read_user(entry, 8, at)
        };
        if read < 0 {
            // The kernel read this array a moment ago; unreadable now: what
            // follows is unknown.
            return stop(true);
        }
        let entry = (*scan).entry as *const c_void;
        if entry.is_null() {
            return stop(false);
        }
        let head = &raw mut (*scan).head;
        (*head) = [0; NAME_WORDS];
        if bpf_probe_read_user_str(head.cast::<c_void>(), BOUND_ENV_NAME_LEN as u32, entry) < 0 {
            return stop(true);
        }
        if !is_bound(&*head, (*scan).policy_id) {
            return 0;
        }
        let len = (*args).len as usize;
        let env_len = (*args).env_len as usize;
        if len >= ARGV_LEN || env_len >= ENV_LEN {
            return stop(true);
        }
        let offset = len & (ARGV_LEN - 1);
        let dst = (&raw mut (*args).argv).cast::<u8>().add(offset);
        let copied = bpf_probe_read_user_str(dst.cast::<c_void>(), ENV_LEN as u32, entry);
        if copied < 0 {
            return stop(true);
        }
        // An entry "" reads as 0 bytes on some kernels (see `argv`); one
        // that matched a name is never empty, but keep the count exact.
        let copied = if copied == 0 {
            *dst = 0;
            1
        } else {
            copied as usize
        };
        (*args).env_count += 1;
        let room = (ENV_LEN - env_len).min(ARGV_LEN - offset);
        if copied >= room || copied == ENV_LEN {
            // Cut (or exactly filling the room, which cannot tell a cut):
            // only a prefix of this variable is kept.
            (*args).len = (offset + room) as u32;
            (*args).env_len = (env_len + room) as u32;
            return stop(true);
        }
        (*args).len = (offset + copied) as u32;
        (*args).env_len = (env_len + copied) as u32;
        0
    }
}

/// Ends the scan (the callback returns what this returns), marking the
/// capture truncated if `truncated`.
#[inline(always)]
unsafe fn stop(scratch: *mut super::argv::ArgvScratch, truncated: bool) -> i64 {
    // SAFETY: the caller's `scratch` is this CPU's slot.
    unsafe {
        if truncated {
            (*scratch).args.truncated = 1;
        }
        (*scratch).scan.complete = 1;
    }
    1
}

/// Whether an environment entry starting with `head` (zero padded) is
/// bound: `LD_*`, or a name of the policy's `bound_env`.
#[inline(always)]
pub(super) fn is_bound(head: &[u64; NAME_WORDS], policy_id: u32) -> bool {
    if head[0] & 0x00ff_ffff == LD_PREFIX {
        return true;
    }
    let Some(bound) = EXEC_BOUND_ENV.get(policy_id) else {
        return false;
    };
    let mut i = 0;
    while i < BOUND_ENV_NAMES {
        if i as u32 >= bound.count {
            break;
        }
        let (names, masks) = (&bound.names[i], &bound.masks[i]);
        if head[0] & masks[0] == names[0]
            && head[1] & masks[1] == names[1]
            && head[2] & masks[2] == names[2]
            && head[3] & masks[3] == names[3]
        {
            return true;
        }
        i += 1;
    }
    false
}

// The maps only this capture uses. (At the end of the file, so that the line
// numbers in log records stay those of the code above.)

/// Policy id -> the names its `exec.bound_env` binds besides `LD_*`
/// (`count` 0: none).
#[map]
pub static EXEC_BOUND_ENV: Array<BoundEnv> = Array::with_max_entries(MAX_POLICIES, 0);
