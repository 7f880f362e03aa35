//! Code that runs without an exec (issue 19, item 2): a file mapped with
//! `PROT_EXEC` meets the exec rules of that file. ld.so running a program it
//! was handed (`/lib64/ld-linux-x86-64.so.2 /denied`), `LD_PRELOAD` and
//! `dlopen` all map the file as code, and none of them execs it.
//!
//! Kernel (v6.12): `security_mmap_file()` is called from `vm_mmap_pgoff()`
//! (mm/util.c: `mmap`, and the kernel's own `elf_map()` of an exec's binary
//! and its ELF interpreter) before the mmap lock is taken, and from
//! `do_shmat()` and `remap_file_pages`; `security_file_mprotect()` from
//! `do_mprotect_pkey()` (mm/mprotect.c) for each vma, with the mmap lock
//! held. Both run with the final protection (`prot`, after
//! `READ_IMPLIES_EXEC`).
//!
//! What a mapping gets, for a task in a gated cgroup:
//! - the exec's own binary (`current->mm->exe_file`, the very `struct file`
//!   the exec decided on) maps freely: its exec was decided already;
//! - a file an exec rule names, bound to the content it has now: the rule's
//!   action; a stale rule: the stricter of the rule and the exec default;
//! - any other file: the policy's `unlisted_mappings` (`MAP_UNLISTED`):
//!   allow (the default: libc and every library nobody listed), or the exec
//!   default;
//! - `ask` reads as deny: a mapping is refused, never paused (the pause
//!   would stop ld.so inside the kernel's own exec of a binary; see
//!   docs/threat-model.md, section 14).
//!
//! A refusal is `-EPERM` and an `EXEC_DENIED` event flagged
//! [`exec_flags::MAPPED`], which the agent records as "mapped as code".

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_probe_read_kernel, generated::bpf_probe_read_kernel_str},
    macros::lsm,
    programs::LsmContext,
};
use gatekeep_common::{
    ContentVersion, EPERM, ExecEvent, ExecRuleKey, GATED_UNCLASSIFIED, PATH_LEN, action, counter,
    event_kind, exec_denied_for, exec_flags, request_kind,
};

use crate::{
    events::Caller,
    hooks::{
        exec::{EXEC_RULES, bound_to, file_identity, file_name, stricter},
        gating_candidate,
    },
    maps::{EVENTS, POLICIES, bump, gated_entry, offsets},
    pause::await_classification,
};

/// `PROT_EXEC` (include/uapi/asm-generic/mman-common.h).
const PROT_EXEC: u64 = 4;

/// Runs for every `mmap` on the host. A mapping without `PROT_EXEC`, or of
/// no file (anonymous), returns at once; so does a task outside gated
/// cgroups, after one array lookup. For gated tasks, the file's exec rules
/// decide (see the module's documentation).
#[lsm(hook = "mmap_file")]
pub fn mmap_file(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, mmap_file, struct file *file, unsigned long reqprot,
    //          unsigned long prot, unsigned long flags): the verdict of
    // earlier BPF LSM programs on this hook is the last argument.
    let previous: i32 = ctx.arg(4);
    let prot: u64 = ctx.arg(2);
    let file: *const u8 = ctx.arg(0);
    if previous != 0 || prot & PROT_EXEC == 0 || file.is_null() {
        return previous;
    }
    let cgroup_id = match gating_candidate(0) {
        Ok(cgroup_id) => cgroup_id,
        Err(verdict) => return verdict,
    };
    gated_mapping(cgroup_id, file)
}

/// Runs for every `mprotect` on the host: a protection without `PROT_EXEC`
/// returns at once, and so does a task outside gated cgroups, after one
/// array lookup. A gated task adding `PROT_EXEC` to a file's mapping meets
/// that file's exec rules, as an `mmap` would.
#[lsm(hook = "file_mprotect")]
pub fn file_mprotect(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, file_mprotect, struct vm_area_struct *vma,
    //          unsigned long reqprot, unsigned long prot)
    let previous: i32 = ctx.arg(3);
    let prot: u64 = ctx.arg(2);
    if previous != 0 || prot & PROT_EXEC == 0 {
        return previous;
    }
    let cgroup_id = match gating_candidate(0) {
        Ok(cgroup_id) => cgroup_id,
        Err(verdict) => return verdict,
    };
    let vma: *const u8 = ctx.arg(0);
    // SAFETY: probe read of the vma's file; fails safely.
    let Ok(file) = (unsafe {
        bpf_probe_read_kernel::<*const u8>(
            vma.add(offsets().vm_area_struct_vm_file as usize).cast(),
        )
    }) else {
        return EPERM;
    };
    if file.is_null() {
        // Anonymous memory: out of scope (a JIT's own code).
        return 0;
    }
    gated_mapping(cgroup_id, file)
}

/// The gated path of both hooks, returning its verdict in a register (the
/// verifier bounds an LSM program's return value; see `sendmsg.rs`).
#[inline(never)]
fn gated_mapping(cgroup_id: u64, file: *const u8) -> i32 {
    let Some(gated) = gated_entry(cgroup_id) else {
        return 0;
    };
    if gated.flags & GATED_UNCLASSIFIED != 0 {
        // As exec and connect do: wait until the agent classified the
        // cgroup (`mmap` and `mprotect` restart after the stop).
        let caller = Caller::current(cgroup_id, gated.policy_id);
        return await_classification(&caller, request_kind::EXEC);
    }
    if is_exe_file(file) {
        return 0;
    }
    let Ok((dev, ino, content)) = file_identity(file) else {
        return EPERM;
    };
    let key = ExecRuleKey {
        policy_id: gated.policy_id,
        _pad: 0,
        dev,
        ino,
    };
    let Some(defaults) = POLICIES.get(gated.policy_id) else {
        return EPERM;
    };
    // SAFETY: copied out immediately.
    let action = match unsafe { EXEC_RULES.get(&key) }.copied() {
        Some(rule) if bound_to(&rule, &content) => rule.action,
        Some(rule) => stricter(rule.action, defaults.exec_default),
        None if defaults.map_unlisted == action::NONE => action::ALLOW,
        None => defaults.map_unlisted,
    };
    if action == action::ALLOW {
        return 0;
    }
    // Deny, and ask (a mapping is never paused); in audit mode
    // (`mode = "audit"`) reported as what enforcement would do, and allowed.
    let (kind, verdict) = if defaults.audit != 0 {
        (event_kind::EXEC_AUDITED, 0)
    } else {
        bump(counter::EXEC_DENIED);
        (event_kind::EXEC_DENIED, EPERM)
    };
    emit_mapped(
        &Caller::current(cgroup_id, gated.policy_id),
        kind,
        file,
        (dev, ino),
        &content,
    );
    verdict
}

/// Whether `file` is the calling task's executable (`current->mm->exe_file`:
/// the `struct file` its exec decided on, which the kernel's `elf_map()`
/// maps during that exec). Compared by address: another open of the same
/// file (ld.so opening the program it runs) is another `struct file`.
#[inline(always)]
fn is_exe_file(file: *const u8) -> bool {
    let off = offsets();
    // SAFETY: probe reads, which fail safely.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        bpf_probe_read_kernel::<*const u8>(task.add(off.task_struct_mm as usize).cast())
            .and_then(|mm| {
                bpf_probe_read_kernel::<*const u8>(mm.add(off.mm_struct_exe_file as usize).cast())
            })
            .is_ok_and(|exe| exe == file)
    }
}

/// Emits the `EXEC_DENIED` (in audit mode `EXEC_AUDITED`) event of a refused mapping: the file's identity,
/// content and name, no argv.
#[inline(always)]
fn emit_mapped(
    caller: &Caller,
    kind: u32,
    file: *const u8,
    (dev, ino): (u64, u64),
    content: &ContentVersion,
) {
    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        bump(counter::EVENTS_DROPPED);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved ring-buffer record of the right
    // size; fields are written in place (the record is far larger than the
    // stack). The argv bytes are left as they are: `argv_len` is 0.
    unsafe {
        (*event).header = caller.header(kind, 0);
        (*event).dev = dev;
        (*event).ino = ino;
        (*event).content = *content;
        (*event).action = action::DENY;
        (*event).argc = 0;
        (*event).argv_len = 0;
        (*event).argv_truncated = 0;
        (*event).env_len = 0;
        (*event).env_count = 0;
        (*event).denied_for = exec_denied_for::POLICY;
        (*event).flags = exec_flags::MAPPED;
        (*event).filename[0] = 0;
        if let Ok(name) = file_name(file) {
            bpf_probe_read_kernel_str(
                (*event).filename.as_mut_ptr().cast::<c_void>(),
                PATH_LEN as u32,
                name.cast::<c_void>(),
            );
        }
    }
    entry.submit(0);
}
