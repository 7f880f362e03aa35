//! `execve`/`execveat` gating at `security_bprm_check`.
//!
//! Kernel: `security_bprm_check()` is called from `search_binary_handler()`
//! (fs/exec.c, v6.12) for the file being executed and again for a script's
//! interpreter, before the point of no return, so refusing here fails the
//! exec cleanly and `-ERESTARTNOINTR` restarts the whole execve. The caller's
//! mm is still in place, so its argv is read here (see `argv`).

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_probe_read_kernel as probe_read_kernel_raw, bpf_probe_read_kernel_str},
    },
    macros::lsm,
    programs::LsmContext,
};
use aya_log_ebpf::{error, warn};
use gatekeep_common::{
    ARGV_LEN, ContentVersion, ENV_LEN, EPERM, ERESTARTNOINTR, ExecEvent, ExecRule, ExecRuleKey,
    ExecRuleStaleEvent, GATED_UNCLASSIFIED, PATH_LEN, action, counter, event_kind, exec_denied_for,
    exec_flags, exec_rule_flags, request_kind,
};

use crate::{
    digest::Digest,
    events::{Caller, emit_task_event},
    hooks::{
        exec::argv::{ARGV_SCRATCH, ExecArgs},
        gating_candidate,
    },
    maps::{EVENTS, POLICIES, bump, gated_entry, offsets},
    pause::{Asked, Request, ask, await_classification},
};

/// Runs for every exec on the host.
///
/// Tasks outside gated cgroups return after an array lookup (rarely, a hash
/// lookup too). For gated tasks
/// the executable's identity (device, inode) is looked up in the policy's
/// exec rules, else the policy default applies:
/// - allow: the exec proceeds;
/// - deny: `-EPERM`, and an `EXEC_DENIED` event for the audit;
/// - ask: the thread is paused until user space writes a verdict for this
///   exact request (identity + content + argv + bound environment), then the
///   restarted exec is allowed or fails with `-EPERM`.
///
/// A file with no name on disk (no links: memfd, `O_TMPFILE`, deleted)
/// gets the policy's `fileless` action instead of its rules (deny unless
/// the policy says otherwise).
#[lsm(hook = "bprm_check_security")]
pub fn bprm_check_security(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, bprm_check_security, struct linux_binprm *bprm): the
    // verdict of earlier BPF LSM programs on this hook is the last argument.
    let cgroup_id = match gating_candidate(ctx.arg(1)) {
        Ok(cgroup_id) => cgroup_id,
        Err(verdict) => return verdict,
    };
    // Three calls, so that the argv and environment capture (and its
    // `bpf_loop` callback) is not stacked on the deciding frames: the
    // verifier allows 512 bytes of stack over a call chain.
    // What is left to decide waits in the per-CPU scratch, off the stack.
    // (A verdict comes back in a register: the verifier checks its range.)
    let verdict = exec_action(&ctx, cgroup_id);
    if verdict != UNDECIDED {
        return verdict;
    }
    let args = capture_current_argv();
    let verdict = exec_refuse_or_ask(&ctx, cgroup_id, args);
    // Bound from this frame: the deciding frames leave no stack for it.
    if verdict == 0 && !image::bind_allowed(ctx.arg(0)) {
        error!(
            &ctx,
            "gatekeep: cannot bind an allowed exec's argv: refused"
        );
        return EPERM;
    }
    verdict
}

/// Reads the calling thread's exec argv, and the bound variables of its
/// environment (the names of the pending exec's policy), into this CPU's
/// scratch, or `None` (counted in `ARGV_MISSED`) when the syscall or its
/// argv cannot be read. The result is valid until this program run ends.
/// Not inlined: called from the hook's entry, between the deciding frames.
#[inline(never)]
pub fn capture_current_argv() -> Option<*const ExecArgs> {
    // SAFETY: this CPU's slot; `exec_action` wrote `pending` in this run.
    let policy_id = ARGV_SCRATCH
        .get_ptr(0)
        .map_or(0, |scratch| unsafe { (*scratch).pending.policy_id });
    let captured = argv::user_arrays().and_then(|(user_argv, envp)| {
        let args = argv::capture(user_argv)?;
        env::capture_env(envp, policy_id);
        Some(args)
    });
    if captured.is_none() {
        bump(counter::ARGV_MISSED);
    }
    captured
}

/// The state of one environment scan.
#[repr(C)]
pub struct EnvScan {
    /// The `envp` the exec passed.
    pub(crate) envp: u64,
    /// Non-zero when its entries are 32-bit (an ia32 exec).
    pub(crate) compat: u32,
    pub(crate) _pad: u32,
    /// The entry being looked at (a user pointer).
    pub(crate) entry: u64,
    pub(crate) policy_id: u32,
    /// Non-zero once the scan reached the array's end (or gave up, marking
    /// the capture truncated).
    pub(crate) complete: u32,
    /// The entry's first bytes, zero padded.
    pub(crate) head: [u64; gatekeep_common::BOUND_ENV_NAME_LEN / 8],
}

/// The new image's environment check (see `image`), in this CPU's scratch
/// (`bpf_loop` callbacks keep no stack, and the walk is a call of its own).
/// Here, beside [`EnvScan`], so that `argv`, which holds the scratch, need
/// not use `image`, which uses `argv`.
#[repr(C)]
pub struct ImageEnvScan {
    /// The allowed request's digest, for the report.
    digest: u64,
    /// The bound environment's digest and bytes.
    expected: u64,
    expected_len: u32,
    _pad: u32,
    /// The next string, and the end of the environment (user addresses; 0:
    /// the new mm could not be read).
    at: u64,
    end: u64,
    /// Bytes of bound variables collected (in `args.argv`).
    len: u32,
    policy_id: u32,
    /// Non-zero while inside a string longer than one read.
    skipping: u32,
    /// `image::WALKING`, `WALKED` or `DIFFERS`.
    outcome: u32,
}

/// `exec_action`'s answer when argv decides: never a verdict (those are 0
/// or negative).
const UNDECIDED: i32 = 1;

/// An exec the policy does not simply allow: what `exec_refuse_or_ask`
/// needs once argv is captured (kept in `ARGV_SCRATCH` for this run).
pub struct Pending {
    file: Executable,
    policy_id: u32,
    /// `DENY`, else ask.
    action: u32,
    /// Non-zero when a verdict or grant allowed the exec with a whole argv,
    /// which the hook's entry then binds (see `image`) with this digest.
    bind: u64,
    bind_digest: u64,
}

/// The policy's action for this exec: the verdict when that settles it
/// (allowed; unreadable state; an unclassified cgroup; an approved
/// script's interpreter), else [`UNDECIDED`], with what is left to decide
/// with argv stored as this CPU's [`Pending`].
#[inline(never)]
fn exec_action(ctx: &LsmContext, cgroup_id: u64) -> i32 {
    match exec_action_inner(ctx, cgroup_id) {
        Ok(()) => UNDECIDED,
        Err(verdict) => verdict,
    }
}

#[inline(always)]
fn exec_action_inner(ctx: &LsmContext, cgroup_id: u64) -> Result<(), i32> {
    let Some(gated) = gated_entry(cgroup_id) else {
        return Err(0);
    };
    if gated.flags & GATED_UNCLASSIFIED != 0 {
        let caller = Caller::current(cgroup_id, gated.policy_id);
        return Err(await_classification(&caller, request_kind::EXEC));
    }
    bump(counter::EXEC_GATED);

    let bprm: *const u8 = ctx.arg(0);
    // Unreadable kernel structures mean wrong offsets: fail closed.
    let Ok(interpreter) = is_interpreter_pass(bprm) else {
        error!(
            ctx,
            "gatekeep: cannot read the exec's state (kernel offsets?): exec denied"
        );
        return Err(EPERM);
    };
    if !interpreter {
        forget_approval();
        image::forget(bpf_get_current_pid_tgid() as u32);
    }
    let Ok(file) = executable_identity(bprm) else {
        error!(
            ctx,
            "gatekeep: cannot read the executable's identity (kernel offsets?): exec denied"
        );
        return Err(EPERM);
    };
    let (dev, ino) = (file.dev, file.ino);

    let key = ExecRuleKey {
        policy_id: gated.policy_id,
        _pad: 0,
        dev,
        ino,
    };
    let default = || {
        POLICIES
            .get(gated.policy_id)
            .map_or(action::ASK, |p| p.exec_default)
    };
    // SAFETY: copied out immediately.
    let rule = unsafe { EXEC_RULES.get(&key) }.copied();
    // No name on disk: no rule could have been written for it.
    let action = match rule {
        _ if is_fileless(bprm) => fileless_action(gated.policy_id),
        Some(rule) if bound_to(&rule, &file.content) => rule.action,
        // `integrity = "sha256"`: the agent compares the bytes.
        Some(rule) if rule.flags & exec_rule_flags::SHA256 != 0 && rule.action == action::ALLOW => {
            action::ASK
        }
        Some(rule) => {
            // Rewritten in place since the policy was loaded: the rule
            // vouches for other content. The default applies, never laxer
            // than the rule itself (a stale deny still denies).
            let applied = stricter(rule.action, default());
            bump(counter::EXEC_RULE_STALE);
            emit_stale(
                &Caller::current(cgroup_id, gated.policy_id),
                &key,
                &rule,
                &file.content,
                applied,
            );
            applied
        }
        None => default(),
    };

    if action == action::ALLOW {
        bump(counter::EXEC_ALLOWED);
        return Err(0);
    }
    if action != action::DENY
        && interpreter
        && approved_in_this_exec(bpf_get_current_pid_tgid() as u32, bprm)
    {
        // The interpreter of a script whose exec was just approved.
        return Err(0);
    }
    let Some(scratch) = ARGV_SCRATCH.get_ptr_mut(0) else {
        return Err(EPERM);
    };
    // SAFETY: this CPU's scratch slot, for this run.
    unsafe {
        (*scratch).pending = Pending {
            file,
            policy_id: gated.policy_id,
            action,
            bind: 0,
            bind_digest: 0,
        };
    }
    Ok(())
}

/// Denies or asks about an exec the policy does not allow, with its
/// captured argv and bound environment (`args`).
#[inline(never)]
fn exec_refuse_or_ask(ctx: &LsmContext, cgroup_id: u64, args: Option<*const ExecArgs>) -> i32 {
    let bprm: *const u8 = ctx.arg(0);
    let Some(scratch) = ARGV_SCRATCH.get_ptr(0) else {
        return EPERM;
    };
    // SAFETY: this CPU's scratch slot, written by `exec_action` in this run.
    let pending = unsafe { &(*scratch).pending };
    let file = &pending.file;
    let (dev, ino) = (file.dev, file.ino);
    // Who is asking matters only off the allow path.
    let caller = Caller::current(cgroup_id, pending.policy_id);
    // Audit mode (`mode = "audit"`): what enforcement would do is reported
    // on the denial path (`EXEC_AUDITED`), and the exec runs.
    let audit = audits(pending.policy_id);
    // DENY, else ASK (and anything unknown: a human decides, fail closed).
    let (would, denied_for) = if pending.action == action::DENY {
        (action::DENY, exec_denied_for::POLICY)
    } else {
        // SAFETY: this CPU's capture of this run.
        let truncated = args.is_none_or(|args| unsafe { (*args).truncated } != 0);
        let asks = !truncated || on_truncated(pending.policy_id) == action::ASK;
        if asks && !audit {
            return match ask_exec(ctx, &caller, bprm, file, (args, truncated)) {
                Ok(ret) | Err(ret) => ret,
            };
        }
        if asks {
            (action::ASK, exec_denied_for::POLICY)
        } else {
            // The digest cannot cover the whole argv, so no verdict or grant
            // could bind it: the policy's `on_truncated` (deny by default)
            // refuses it without asking.
            (action::DENY, exec_denied_for::ARGV_TRUNCATED)
        }
    };
    // One denial path for all reasons keeps the frame small.
    let (kind, verdict) = if audit {
        (event_kind::EXEC_AUDITED, 0)
    } else {
        bump(counter::EXEC_DENIED);
        (event_kind::EXEC_DENIED, EPERM)
    };
    emit_exec(&caller, kind, 0, (would, denied_for), bprm, dev, ino, args);
    verdict
}

/// Asks about an exec whose argv was captured as `args`; a `truncated` one
/// (the policy's `on_truncated` is ask) is never covered by a grant.
#[inline(always)]
fn ask_exec(
    ctx: &LsmContext,
    caller: &Caller,
    bprm: *const u8,
    file: &Executable,
    (args, truncated): (Option<*const ExecArgs>, bool),
) -> Result<i32, i32> {
    let (dev, ino) = (file.dev, file.ino);
    let digest = exec_digest(file, args);
    let request = Request {
        tid: caller.tid,
        pid: caller.pid,
        policy_id: caller.policy_id,
        kind: request_kind::EXEC,
        digest,
        now_ns: caller.now_ns,
        cgroup_id: caller.cgroup_id,
    };
    // A truncated request (on_truncated = "ask") is asked every time: a
    // grant never covers it, only a verdict for this very request.
    match ask(&request, !truncated) {
        Asked::Granted => {
            bind_later(digest, truncated);
            remember_approval(caller.tid, bprm);
            Ok(0)
        }
        Asked::Allow => {
            bind_later(digest, truncated);
            remember_approval(caller.tid, bprm);
            emit_task_event(
                caller,
                event_kind::VERDICT_APPLIED,
                digest,
                request_kind::EXEC,
                action::ALLOW,
            );
            Ok(0)
        }
        Asked::Deny => {
            emit_task_event(
                caller,
                event_kind::VERDICT_APPLIED,
                digest,
                request_kind::EXEC,
                action::DENY,
            );
            Ok(EPERM)
        }
        Asked::Refused => {
            warn!(
                ctx,
                "gatekeep: exec by tid {} refused: traced, or re-entering without stopping",
                caller.tid
            );
            emit_task_event(
                caller,
                event_kind::REFUSED_SPINNING,
                digest,
                request_kind::EXEC,
                action::DENY,
            );
            Ok(EPERM)
        }
        Asked::Untrackable => {
            error!(
                ctx,
                "gatekeep: pending map full: exec by tid {} refused", caller.tid
            );
            Ok(EPERM)
        }
        Asked::Paused { new } => {
            if new {
                bump(counter::EXEC_ASKED);
                emit_exec(
                    caller,
                    event_kind::EXEC_ASK,
                    digest,
                    (action::ASK, exec_denied_for::POLICY),
                    bprm,
                    dev,
                    ino,
                    args,
                );
            }
            Ok(ERESTARTNOINTR)
        }
    }
}

/// Marks the argv an exec was just allowed with for binding to the program
/// it starts (see `image`; the hook's entry binds it): a truncated capture
/// binds nothing (it is marked for the reviewer and never granted).
#[inline(always)]
fn bind_later(digest: u64, truncated: bool) {
    if truncated {
        return;
    }
    if let Some(scratch) = ARGV_SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's scratch slot, for this run.
        unsafe {
            (*scratch).pending.bind = 1;
            (*scratch).pending.bind_digest = digest;
        }
    }
}

/// Whether the policy only reports (`mode = "audit"`).
#[inline(always)]
pub fn audits(policy_id: u32) -> bool {
    POLICIES.get(policy_id).is_some_and(|p| p.audit != 0)
}

/// The policy's `on_truncated` action: `ASK` only when the policy says so,
/// else `DENY` (fail closed).
#[inline(always)]
fn on_truncated(policy_id: u32) -> u32 {
    match POLICIES.get(policy_id).map(|p| p.on_truncated) {
        Some(action::ASK) => action::ASK,
        _ => action::DENY,
    }
}

/// Whether this run checks a script's interpreter (or a `binfmt_misc`
/// handler): `alloc_bprm()` points `interp` at `filename`, and the script
/// loader (`bprm_change_interp()`) points it at the interpreter's name.
#[inline(always)]
fn is_interpreter_pass(bprm: *const u8) -> Result<bool, i64> {
    let off = offsets();
    // SAFETY: reads through the probe helper, which fails safely.
    unsafe {
        let filename: u64 =
            bpf_probe_read_kernel(bprm.add(off.linux_binprm_filename as usize).cast())?;
        let interp: u64 = bpf_probe_read_kernel(bprm.add(off.linux_binprm_interp as usize).cast())?;
        Ok(interp != filename)
    }
}

/// Notes that this thread's exec of `bprm` was allowed on the ask path, if
/// an interpreter may follow: the file starts with `#!` (`bprm->buf` holds
/// its first bytes by now). Other files (and `binfmt_misc` handlers) never
/// reach an interpreter pass with the approval: asked about on their own.
#[inline(always)]
fn remember_approval(tid: u32, bprm: *const u8) {
    let buf = offsets().linux_binprm_buf as usize;
    // SAFETY: read through the probe helper, which fails safely.
    let Ok(magic) = (unsafe { bpf_probe_read_kernel::<[u8; 2]>(bprm.add(buf).cast()) }) else {
        return;
    };
    if magic == *b"#!" {
        let _ = EXEC_APPROVED.insert(&tid, &(bprm as u64), 0);
    }
}

/// Whether this thread's exec of `bprm` was approved earlier in the same
/// syscall (the `linux_binprm` lives exactly as long as the syscall). The
/// entry stays for an interpreter's own interpreter; the thread's next exec
/// drops it.
#[inline(always)]
fn approved_in_this_exec(tid: u32, bprm: *const u8) -> bool {
    // SAFETY: copied out immediately.
    unsafe { EXEC_APPROVED.get(&tid) }.is_some_and(|b| *b == bprm as u64)
}

/// Drops an approval left by an earlier exec of this thread (one that ran a
/// binary, not a script, so no interpreter pass took it): a later syscall's
/// `linux_binprm` may reuse the address.
#[inline(always)]
fn forget_approval() {
    let tid = bpf_get_current_pid_tgid() as u32;
    // A lookup first: a delete takes the bucket's lock even when there is
    // nothing to delete.
    // SAFETY: presence check only.
    if unsafe { EXEC_APPROVED.get(&tid) }.is_some() {
        let _ = EXEC_APPROVED.remove(&tid);
    }
}

/// The file about to run: its identity and its content version.
pub struct Executable {
    dev: u64,
    ino: u64,
    content: ContentVersion,
}

/// (device, inode) and content version of `bprm->file`, the file about to
/// run.
///
/// The device is `super_block::s_dev` in the kernel's encoding. The content
/// version is what `struct inode` (v6.12, include/linux/fs.h) keeps of the
/// file's last change: `i_ctime_sec`/`i_ctime_nsec` (set by every write of
/// data or attributes, `file_update_time()` / `inode_set_ctime_current()`),
/// `i_size` and `i_generation`.
#[inline(always)]
fn executable_identity(bprm: *const u8) -> Result<Executable, i64> {
    // SAFETY: a probe read, which fails safely.
    let file: *const u8 =
        unsafe { bpf_probe_read_kernel(bprm.add(offsets().linux_binprm_file as usize).cast())? };
    let (dev, ino, content) = file_identity(file)?;
    Ok(Executable { dev, ino, content })
}

/// The identity (device in the kernel's encoding, inode) and content version
/// of the open `file`: what exec rules are keyed by and bound to, for an exec
/// and for a file mapped as code (`hooks/mmap.rs`) alike.
#[inline(always)]
pub(crate) fn file_identity(file: *const u8) -> Result<(u64, u64, ContentVersion), i64> {
    let off = offsets();
    // SAFETY: every read goes through the probe helper, which fails safely.
    unsafe {
        let inode: *const u8 = bpf_probe_read_kernel(file.add(off.file_f_inode as usize).cast())?;
        let ino: u64 = bpf_probe_read_kernel(inode.add(off.inode_i_ino as usize).cast())?;
        let sb: *const u8 = bpf_probe_read_kernel(inode.add(off.inode_i_sb as usize).cast())?;
        let dev: u32 = bpf_probe_read_kernel(sb.add(off.super_block_s_dev as usize).cast())?;
        let content = ContentVersion {
            ctime_sec: bpf_probe_read_kernel(inode.add(off.inode_i_ctime_sec as usize).cast())?,
            ctime_nsec: bpf_probe_read_kernel(inode.add(off.inode_i_ctime_nsec as usize).cast())?,
            generation: bpf_probe_read_kernel(inode.add(off.inode_i_generation as usize).cast())?,
            size: bpf_probe_read_kernel(inode.add(off.inode_i_size as usize).cast())?,
        };
        Ok((u64::from(dev), ino, content))
    }
}

/// Whether `bprm->file` has no name on disk (no links: a memfd, an
/// `O_TMPFILE` file, a deleted file). Unreadable: fileless (fail closed).
#[inline(always)]
fn is_fileless(bprm: *const u8) -> bool {
    let off = offsets();
    // SAFETY: probe reads, which fail safely.
    unsafe {
        bpf_probe_read_kernel::<*const u8>(bprm.add(off.linux_binprm_file as usize).cast())
            .and_then(|file| {
                bpf_probe_read_kernel::<*const u8>(file.add(off.file_f_inode as usize).cast())
            })
            .and_then(|inode| {
                bpf_probe_read_kernel::<u32>(inode.add(off.inode_i_nlink as usize).cast())
            })
            .map_or(true, |links| links == 0)
    }
}

/// The policy's action for an exec of a file with no name on disk: `ALLOW`
/// or `ASK` only when the policy says so, else `DENY`.
#[inline(always)]
pub fn fileless_action(policy_id: u32) -> u32 {
    match POLICIES.get(policy_id).map(|p| p.fileless) {
        Some(action::ALLOW) => action::ALLOW,
        Some(action::ASK) => action::ASK,
        _ => action::DENY,
    }
}

/// The name of `file` in its folder (`f_path.dentry->d_name.name`:
/// `memfd:NAME` for a memfd), a kernel string. The mapping hook
/// (`mmap.rs`) names the files it refuses with it too.
#[inline(always)]
pub fn file_name(file: *const u8) -> Result<*const u8, i32> {
    let off = offsets();
    // SAFETY: probe reads, which fail safely.
    unsafe {
        bpf_probe_read_kernel::<*const u8>(file.add(off.file_f_path_dentry as usize).cast())
            .and_then(|dentry| {
                bpf_probe_read_kernel::<*const u8>(
                    dentry.add(off.dentry_d_name_name as usize).cast(),
                )
            })
    }
}

/// Whether `rule` was bound to the content the file has now.
#[inline(always)]
pub(crate) fn bound_to(rule: &ExecRule, now: &ContentVersion) -> bool {
    let bound = &rule.content;
    bound.ctime_sec == now.ctime_sec
        && bound.ctime_nsec == now.ctime_nsec
        && bound.size == now.size
        && (rule.flags & exec_rule_flags::GENERATION == 0 || bound.generation == now.generation)
}

/// The stricter of two actions: deny, then ask, then allow (unknown
/// actions count as ask, as everywhere on this hook).
#[inline(always)]
pub(crate) fn stricter(a: u32, b: u32) -> u32 {
    let rank = |action: u32| match action {
        action::ALLOW => 0,
        action::DENY => 2,
        _ => 1,
    };
    let pick = if rank(a) >= rank(b) { a } else { b };
    match pick {
        action::ALLOW | action::DENY => pick,
        _ => action::ASK,
    }
}

/// Reports an exec that met a stale rule (the agent logs and audits it).
#[inline(always)]
fn emit_stale(
    caller: &Caller,
    key: &ExecRuleKey,
    rule: &ExecRule,
    found: &ContentVersion,
    applied: u32,
) {
    let Some(mut entry) = EVENTS.reserve::<ExecRuleStaleEvent>(0) else {
        bump(counter::EVENTS_DROPPED);
        return;
    };
    entry.write(ExecRuleStaleEvent {
        header: caller.header(event_kind::EXEC_RULE_STALE, 0),
        dev: key.dev,
        ino: key.ino,
        bound: rule.content,
        found: *found,
        rule_action: rule.action,
        applied_action: applied,
        rule_flags: rule.flags,
        _pad: 0,
    });
    entry.submit(0);
}

/// Reads the content version of `bprm->file` straight into `out` (a ring
/// buffer record), field by field through the probe helper, so it takes no
/// stack (the hook's frames share 512 bytes). The digest read the same
/// fields a moment earlier in this hook. Unreadable: zeroes.
#[inline(always)]
fn read_content_into(bprm: *const u8, out: *mut ContentVersion) {
    let off = offsets();
    // SAFETY: kernel reads go through the probe helpers, which fail safely
    // (zeroing the destination); `out` points into a reserved record.
    unsafe {
        let Ok(file) =
            bpf_probe_read_kernel::<*const u8>(bprm.add(off.linux_binprm_file as usize).cast())
        else {
            return;
        };
        let Ok(inode) =
            bpf_probe_read_kernel::<*const u8>(file.add(off.file_f_inode as usize).cast())
        else {
            return;
        };
        probe_read_kernel_raw(
            (&raw mut (*out).ctime_sec).cast::<c_void>(),
            8,
            inode.add(off.inode_i_ctime_sec as usize).cast::<c_void>(),
        );
        probe_read_kernel_raw(
            (&raw mut (*out).ctime_nsec).cast::<c_void>(),
            4,
            inode.add(off.inode_i_ctime_nsec as usize).cast::<c_void>(),
        );
        probe_read_kernel_raw(
            (&raw mut (*out).generation).cast::<c_void>(),
            4,
            inode.add(off.inode_i_generation as usize).cast::<c_void>(),
        );
        probe_read_kernel_raw(
            (&raw mut (*out).size).cast::<c_void>(),
            8,
            inode.add(off.inode_i_size as usize).cast::<c_void>(),
        );
    }
}

/// Digest of an exec request: executable identity, its content version, the
/// captured argv and the bound environment (`LD_*` and the policy's
/// `bound_env`, captured after argv in the same buffer), so approving `cmd`
/// does not approve `LD_PRELOAD=x cmd`. A write to the file between a request and its
/// restart changes the content version, so the restart is a new request
/// (asked again), and a verdict or grant for the old content does not
/// cover the new.
#[inline(always)]
fn exec_digest(file: &Executable, args: Option<*const ExecArgs>) -> u64 {
    let mut digest = Digest::new();
    digest.word(file.dev);
    digest.word(file.ino);
    digest.word(file.content.ctime_sec as u64);
    digest.word((u64::from(file.content.ctime_nsec) << 32) | u64::from(file.content.generation));
    digest.word(file.content.size as u64);
    let Some(args) = args else {
        digest.word(u64::MAX);
        return digest.finish();
    };
    // SAFETY: this CPU's capture of this run; reads stay within the first
    // ARGV_LEN bytes of `argv`. Bytes past `len` were zeroed at capture and
    // `len` itself is hashed, so hashing whole 64-byte blocks up to `len` is
    // exact. The block loop's only branch is its exit: the verifier walks
    // each block once (the exits differ only in the dead counter, so they
    // prune), and a typical command line costs one or two blocks instead of
    // the 64 of the whole window.
    unsafe {
        let args = &*args;
        digest.word((u64::from(args.argc) << 32) | u64::from(args.truncated));
        // `len` covers argv and, after it, the bound environment.
        digest.word(u64::from(args.len));
        digest.blocks(args.argv.as_ptr(), args.len as usize, ARGV_LEN);
    }
    digest.finish()
}

/// Emits an exec event (request or denial) with the path and argv.
#[expect(
    clippy::too_many_arguments,
    reason = "one flat call site per event kind reads clearer"
)]
#[inline(always)]
fn emit_exec(
    caller: &Caller,
    kind: u32,
    digest: u64,
    (action, denied_for): (u32, u32),
    bprm: *const u8,
    dev: u64,
    ino: u64,
    args: Option<*const ExecArgs>,
) {
    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        bump(counter::EVENTS_DROPPED);
        return;
    };
    let event = entry.as_mut_ptr();
    let off = offsets();
    // SAFETY: `event` points at a reserved ring-buffer record of the right
    // size; fields are written in place (the record is far larger than the
    // stack). Kernel reads go through the probe helpers.
    unsafe {
        (*event).header = caller.header(kind, digest);
        (*event).dev = dev;
        (*event).ino = ino;
        read_content_into(bprm, &raw mut (*event).content);
        (*event).action = action;
        (*event).denied_for = denied_for;
        (*event).filename[0] = 0;
        // A fileless exec is shown by the name the workload gave the file
        // (`memfd:NAME`), not by the `/dev/fd/N` it was run by.
        let fileless = is_fileless(bprm);
        (*event).flags = if fileless { exec_flags::FILELESS } else { 0 }
            | if is_interpreter_pass(bprm).unwrap_or(false) {
                exec_flags::INTERPRETER
            } else {
                0
            };
        let name = if fileless {
            bpf_probe_read_kernel::<*const u8>(bprm.add(off.linux_binprm_file as usize).cast())
                .and_then(file_name)
        } else {
            bpf_probe_read_kernel::<*const u8>(bprm.add(off.linux_binprm_filename as usize).cast())
        };
        if let Ok(name) = name {
            bpf_probe_read_kernel_str(
                (*event).filename.as_mut_ptr().cast::<c_void>(),
                PATH_LEN as u32,
                name.cast::<c_void>(),
            );
        }
        match args {
            Some(args) => {
                // argv, then the bound environment, share the capture.
                let argv_len = (*args).len.saturating_sub((*args).env_len);
                (*event).argc = (*args).argc;
                (*event).argv_len = argv_len;
                (*event).argv_truncated = (*args).truncated;
                probe_read_kernel_raw(
                    (*event).argv.as_mut_ptr().cast::<c_void>(),
                    ARGV_LEN as u32,
                    (*args).argv.as_ptr().cast::<c_void>(),
                );
                (*event).env_len = (*args).env_len;
                (*event).env_count = (*args).env_count;
                probe_read_kernel_raw(
                    (*event).env.as_mut_ptr().cast::<c_void>(),
                    ENV_LEN as u32,
                    (*args)
                        .argv
                        .as_ptr()
                        .add(argv_len as usize & (ARGV_LEN - 1))
                        .cast::<c_void>(),
                );
            }
            None => {
                bump(counter::ARGV_MISSED);
                (*event).argc = 0;
                (*event).argv_len = 0;
                (*event).argv_truncated = 1;
                (*event).env_len = 0;
                (*event).env_count = 0;
            }
        }
    }
    entry.submit(0);
}

// The argv capture and the maps only this hook uses. (At the end of the
// file, so that the line numbers in the hook's log records stay those of
// the code above.)

mod argv;
mod env;
mod image;

/// (policy, executable identity) -> the rule's action and the content its
/// file had when the policy was loaded.
#[aya_ebpf::macros::map]
pub static EXEC_RULES: aya_ebpf::maps::HashMap<ExecRuleKey, ExecRule> =
    aya_ebpf::maps::HashMap::with_max_entries(65536, 0);

/// Thread id -> address of the `linux_binprm` whose exec a verdict or grant
/// just allowed: the interpreter of an approved script runs as part of the
/// same approved request (`bprm_check_security` runs again for it, in the
/// same syscall). Written only on the ask path, for `#!` files, and cleared
/// by the thread's next gated exec; LRU, so entries of exited threads age
/// out.
#[aya_ebpf::macros::map]
pub static EXEC_APPROVED: aya_ebpf::maps::LruHashMap<u32, u64> =
    aya_ebpf::maps::LruHashMap::with_max_entries(4096, 0);
