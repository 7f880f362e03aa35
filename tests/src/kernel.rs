//! The kernel programs driven directly through their maps, with no agent:
//! for the tests in which nothing but the programs can make them pass.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
};
use gatekeep_agent::bpf::programs::Attached;
use gatekeep_common::{
    ConnectEvent, ExecEvent, ExecRule, ExecRuleKey, GatedCgroup, PendingRequest, PolicyDefaults,
    TaskEvent, Verdict, VerdictKey, action, gated_filter_slot, map_names,
};
use nix::time::{ClockId, clock_gettime};

use crate::{Cgroup, wait_for};

/// A record the programs put on the `EVENTS` ring buffer, starting with
/// its `EventHeader` (whose first field is the kind).
///
/// # Safety
///
/// Plain old data laid out as the kernel programs write it: any bytes of
/// its size are a valid value.
pub unsafe trait Event: Copy {}

// SAFETY: `#[repr(C)]` records of integers and byte arrays, shared with the
// kernel programs through gatekeep-common.
unsafe impl Event for ExecEvent {}
// SAFETY: as above.
unsafe impl Event for TaskEvent {}
// SAFETY: as above.
unsafe impl Event for ConnectEvent {}

/// Loads and attaches every program, then gates `cgroup` as [`gate`] does.
#[must_use]
pub fn attach_gating(cgroup: &Cgroup, policy_id: u32, exec_default: u32) -> Attached {
    let mut ebpf =
        gatekeep_agent::bpf::programs::load_and_attach().expect("load and attach the programs");
    gate(&mut ebpf, cgroup, policy_id, exec_default);
    ebpf
}

/// Copies busybox to `/tmp/<name>` (its own inode, so a rule on the copy
/// does not touch the busybox shell that runs a test) and gives the copy
/// `action` under policy `policy_id`. Returns the copy's path.
pub fn exec_rule_on_busybox_copy(
    ebpf: &mut Ebpf,
    policy_id: u32,
    name: &str,
    action: u32,
) -> PathBuf {
    let copy = Path::new("/tmp").join(name);
    fs::copy("/bin/busybox", &copy).expect("copy busybox");
    exec_rule_on(ebpf, policy_id, &copy, action);
    copy
}

/// Writes an exec rule with `action` on the file at `path` (bound to its
/// content now, as the agent binds a rule at load) for policy `policy_id`.
pub fn exec_rule_on(ebpf: &mut Ebpf, policy_id: u32, path: &Path, action: u32) {
    let identity = fs::metadata(path).expect("stat the rule's file");
    let mut rules: HashMap<_, ExecRuleKey, ExecRule> = HashMap::try_from(
        ebpf.map_mut(map_names::EXEC_RULES)
            .expect(map_names::EXEC_RULES),
    )
    .expect("hash map");
    let key = ExecRuleKey {
        policy_id,
        _pad: 0,
        dev: kernel_dev(identity.dev()),
        ino: identity.ino(),
    };
    // Bound to the copy's content now, as the agent binds a rule at load.
    let (content, flags) = gatekeep_agent::hooks::exec::content_version(&identity, None);
    let rule = ExecRule {
        action,
        flags,
        content,
    };
    rules.insert(key, rule, 0).expect("exec rule");
}

/// Gates `cgroup` under policy `policy_id`, whose exec default is
/// `exec_default` (connects and unix sockets allowed), in the loaded
/// programs' maps.
pub fn gate(ebpf: &mut Ebpf, cgroup: &Cgroup, policy_id: u32, exec_default: u32) {
    let mut policies: Array<_, PolicyDefaults> = Array::try_from(
        ebpf.map_mut(map_names::POLICIES)
            .expect(map_names::POLICIES),
    )
    .expect("array");
    let defaults = PolicyDefaults {
        exec_default,
        connect_default: action::ALLOW,
        unix_action: action::ALLOW,
        generation: 1,
        raw_action: action::ALLOW,
        other_action: action::ALLOW,
        on_truncated: action::DENY,
        audit: 0,
        map_unlisted: action::ALLOW,
        fileless: action::DENY,
    };
    policies.set(policy_id, defaults, 0).expect("set policy");
    let mut filter: Array<_, u64> = Array::try_from(
        ebpf.map_mut(map_names::GATED_FILTER)
            .expect(map_names::GATED_FILTER),
    )
    .expect("array");
    filter
        .set(gated_filter_slot(cgroup.id()), 1, 0)
        .expect("set filter slot");
    let mut gated: HashMap<_, u64, GatedCgroup> = HashMap::try_from(
        ebpf.map_mut(map_names::GATED_CGROUPS)
            .expect(map_names::GATED_CGROUPS),
    )
    .expect("hash map");
    gated
        .insert(
            cgroup.id(),
            GatedCgroup {
                policy_id,
                flags: 0,
            },
            0,
        )
        .expect("gate cgroup");
}

/// A kernel counter (`COUNTERS`, an index from `gatekeep_common::counter`),
/// summed over the CPUs.
#[must_use]
pub fn counter(ebpf: &Ebpf, index: u32) -> u64 {
    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map(map_names::COUNTERS).expect(map_names::COUNTERS))
            .expect("array");
    counters.get(&index, 0).expect("read counter").iter().sum()
}

/// The kernel's pending request of thread `tid` (`PENDING`), if it has one.
#[must_use]
pub fn pending_of(ebpf: &Ebpf, tid: u32) -> Option<PendingRequest> {
    let pending: HashMap<_, u32, PendingRequest> =
        HashMap::try_from(ebpf.map(map_names::PENDING).expect(map_names::PENDING))
            .expect("hash map");
    pending.get(&tid, 0).ok()
}

/// Writes `action` as the verdict for the paused request of thread `tid`
/// (digest `digest`, bound to the task's start time as the agent binds it)
/// and continues process `pid`, as the agent's resume does.
pub fn decide_paused(ebpf: &mut Ebpf, pid: u32, tid: u32, digest: u64, action: u32) {
    let start_ns = pending_of(ebpf, tid)
        .expect("the paused request is pending")
        .start_ns;
    let mut verdicts: HashMap<_, VerdictKey, Verdict> = HashMap::try_from(
        ebpf.map_mut(map_names::VERDICTS)
            .expect(map_names::VERDICTS),
    )
    .expect("hash map");
    let key = VerdictKey {
        tid,
        _pad: 0,
        digest,
        start_ns,
    };
    let verdict = Verdict {
        action,
        _pad: 0,
        expires_ns: boot_ns() + 30_000_000_000,
    };
    verdicts.insert(key, verdict, 0).expect("write verdict");
    crate::sigcont(pid);
}

/// The kind of a ring buffer record: the first field of its `EventHeader`.
fn kind_of(item: &[u8]) -> u32 {
    u32::from_ne_bytes(item[..4].try_into().expect("4 bytes"))
}

/// A ring buffer record of `kind` read as `T`.
fn read_event<T: Event>(item: &[u8], kind: u32) -> T {
    assert!(
        item.len() >= size_of::<T>(),
        "short record of kind {kind}: {} bytes",
        item.len()
    );
    // SAFETY: length checked; `T: Event` is plain old data with the layout
    // the kernel program wrote.
    unsafe { item.as_ptr().cast::<T>().read_unaligned() }
}

/// The next event of `kind` on the ring buffer (those of other kinds
/// before it are dropped), read as `T`.
pub fn next_event<T: Event>(ring: &mut RingBuf<&mut MapData>, kind: u32) -> Option<T> {
    while let Some(item) = ring.next() {
        if kind_of(&item) == kind {
            return Some(read_event(&item, kind));
        }
    }
    None
}

/// Every event now on the ring buffer whose kind is one of `kinds`, in
/// order, read as `T` (events of other kinds are dropped).
pub fn drain_events<T: Event>(ring: &mut RingBuf<&mut MapData>, kinds: &[u32]) -> Vec<T> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        let kind = kind_of(&item);
        if kinds.contains(&kind) {
            events.push(read_event(&item, kind));
        }
    }
    events
}

/// The arguments an exec event carries (each NUL-terminated in its
/// `argv[..argv_len]`), empty ones included.
#[must_use]
pub fn event_argv(event: &ExecEvent) -> Vec<String> {
    let len = usize::try_from(event.argv_len)
        .expect("argv_len fits usize")
        .min(event.argv.len());
    let Some(args) = event.argv[..len].strip_suffix(&[0]) else {
        return Vec::new();
    };
    args.split(|b| *b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

/// The bound environment variables an exec event carries
/// (`env[..env_len]`), in order.
#[must_use]
pub fn event_env(event: &ExecEvent) -> Vec<String> {
    let len = usize::try_from(event.env_len)
        .expect("env_len fits usize")
        .min(event.env.len());
    let bytes = &event.env[..len];
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|b| *b == 0)
        .map(|var| String::from_utf8_lossy(var).into_owned())
        .collect()
}

/// Names of every BPF program loaded in the kernel (as the kernel keeps
/// them: at most [`PROGRAM_NAME_LEN`] bytes), with their ids.
#[must_use]
pub fn loaded_programs() -> Vec<(u32, String)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| Some((p.id(), p.name_as_str()?.to_owned())))
        .collect()
}

/// How many bytes of a program's name the kernel keeps
/// (`BPF_OBJ_NAME_LEN` less the NUL).
pub const PROGRAM_NAME_LEN: usize = 15;

/// `name` as the kernel keeps it (see [`PROGRAM_NAME_LEN`]).
#[must_use]
pub fn kernel_program_name(name: &str) -> &str {
    &name[..name.len().min(PROGRAM_NAME_LEN)]
}

/// Waits up to `timeout` for an event of `kind` on the `EVENTS` ring buffer.
pub fn wait_event<T: Event>(ebpf: &mut Ebpf, kind: u32, timeout: Duration) -> T {
    let mut ring = RingBuf::try_from(ebpf.map_mut(map_names::EVENTS).expect(map_names::EVENTS))
        .expect("ring buffer");
    wait_for(&format!("an event of kind {kind}"), timeout, || {
        next_event(&mut ring, kind)
    })
}

/// The kernel's encoding of a device number (`MKDEV`), as `s_dev` holds it.
#[must_use]
pub fn kernel_dev(dev: u64) -> u64 {
    (u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev))
}

/// `CLOCK_BOOTTIME` in nanoseconds: the kernel's clock for verdict and
/// grant expiries.
#[must_use]
pub fn boot_ns() -> u64 {
    let now = clock_gettime(ClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME");
    u64::try_from(now.tv_sec()).expect("positive") * 1_000_000_000
        + u64::try_from(now.tv_nsec()).expect("positive")
}
