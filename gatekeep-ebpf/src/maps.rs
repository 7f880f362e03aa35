//! The maps more than one hook shares, and the load-time globals. A map
//! only one hook uses lives in that hook's module (`hooks/<hook>.rs`). The
//! agent finds every map by its static's name, which is also a constant in
//! `gatekeep_common::map_names` (a test keeps the two equal), and pins it
//! under /sys/fs/bpf/gatekeep.

use core::intrinsics::AtomicOrdering;

use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_NOEXIST},
    helpers::bpf_probe_read_kernel,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use gatekeep_common::{
    GATED_FILTER_SLOTS, GatedCgroup, Grant, GrantKey, InodeKey, KernelOffsets, MAX_POLICIES,
    PendingRequest, PolicyDefaults, ProtectDenialKey, ProtectedTask, ServiceListenerKey, Verdict,
    VerdictKey, counter, gated_filter_slot, pending_slot,
};

/// cgroup v2 id -> policy governing it. A task whose cgroup is absent is not
/// gated.
#[map]
pub static GATED_CGROUPS: HashMap<u64, GatedCgroup> = HashMap::with_max_entries(16384, 0);

/// One word per `gated_filter_slot`: 1 once a cgroup of that slot was gated
/// (set before the `GATED_CGROUPS` entry, never cleared). Every exec and
/// connect on the host asks it first: an array lookup is a few inlined
/// instructions, a hash lookup a call, a hash and a compare. A 0 answers
/// most tasks outside gated cgroups.
#[map]
pub static GATED_FILTER: Array<u64> = Array::with_max_entries(GATED_FILTER_SLOTS, 0);

/// Whether `cgroup_id` may be gated: `false` is certain, `true` needs
/// [`gated_entry`].
#[inline(always)]
pub fn may_be_gated(cgroup_id: u64) -> bool {
    GATED_FILTER
        .get(gated_filter_slot(cgroup_id))
        .is_none_or(|slot| *slot != 0)
}

/// The policy governing `cgroup_id`, if it is gated.
#[inline(always)]
pub fn gated_cgroup(cgroup_id: u64) -> Option<GatedCgroup> {
    if may_be_gated(cgroup_id) {
        gated_entry(cgroup_id)
    } else {
        None
    }
}

/// The `GATED_CGROUPS` entry of `cgroup_id`, once [`may_be_gated`] said it
/// may have one.
#[inline(always)]
pub fn gated_entry(cgroup_id: u64) -> Option<GatedCgroup> {
    // SAFETY: copied out immediately.
    unsafe { GATED_CGROUPS.get(&cgroup_id) }.copied()
}

/// Gates `cgroup_id` under `gated`: its filter slot first, so no reader can
/// find the entry but miss the slot.
#[inline(always)]
pub fn gate_cgroup(cgroup_id: u64, gated: &GatedCgroup) {
    if let Some(slot) = GATED_FILTER.get_ptr_mut(gated_filter_slot(cgroup_id)) {
        // SAFETY: an aligned word of the array; writers only ever store 1.
        unsafe { core::ptr::write_volatile(slot, 1) };
        let _ = GATED_CGROUPS.insert(&cgroup_id, gated, 0);
    }
}

/// Policy id -> what the policy does when no rule matches.
#[map]
pub static POLICIES: Array<PolicyDefaults> = Array::with_max_entries(MAX_POLICIES, 0);

/// Thread id -> the request it is stopped on.
#[map]
pub static PENDING: HashMap<u32, PendingRequest> = HashMap::with_max_entries(65536, 0);

/// How many `PENDING` entries the kernel added per `tid & (PENDING_SLOTS - 1)`,
/// less those it removed: never below the entries present (user space's own
/// removals only leave a count high), so a 0 lets every thread exit on the
/// host skip the `PENDING` hash lookup. Only [`track_pending`] and
/// [`forget_pending`] change it.
#[map]
pub static PENDING_SLOTS: Array<u64> = Array::with_max_entries(gatekeep_common::PENDING_SLOTS, 0);

#[inline(always)]
fn slot_count(tid: u32) -> Option<*mut u64> {
    PENDING_SLOTS.get_ptr_mut(pending_slot(tid))
}

/// Whether `tid` may have a `PENDING` entry: `false` is certain.
#[inline(always)]
pub fn may_be_pending(tid: u32) -> bool {
    PENDING_SLOTS
        .get(pending_slot(tid))
        .is_none_or(|count| *count != 0)
}

/// Adds or replaces `tid`'s `PENDING` entry; counts it if it is new.
#[inline(always)]
pub fn track_pending(tid: u32, pending: &PendingRequest) -> Result<(), i32> {
    // The count goes up before the entry exists: it may be high, never low.
    let Some(slot) = slot_count(tid) else {
        return Err(-1);
    };
    add_to_slot(slot, 1);
    if PENDING.insert(&tid, pending, BPF_NOEXIST.into()).is_ok() {
        return Ok(());
    }
    // Not new (or no room): it was counted already, or is not there.
    add_to_slot(slot, u64::MAX);
    PENDING.insert(&tid, pending, BPF_EXIST.into())
}

/// Removes `tid`'s `PENDING` entry, if there is one, and uncounts it.
#[inline(always)]
pub fn forget_pending(tid: u32) {
    if PENDING.remove(&tid).is_ok()
        && let Some(slot) = slot_count(tid)
    {
        // Wrapping add of -1: the entry was counted.
        add_to_slot(slot, u64::MAX);
    }
}

/// An atomic add (BPF `XADD`): threads on other CPUs change the same word.
#[inline(always)]
fn add_to_slot(slot: *mut u64, value: u64) {
    // SAFETY: an aligned word of `PENDING_SLOTS`, only ever changed atomically.
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, value) };
}

/// (thread id, request digest) -> verdict, written by the agent before it
/// sends SIGCONT; consumed by the restarted syscall.
#[map]
pub static VERDICTS: HashMap<VerdictKey, Verdict> = HashMap::with_max_entries(65536, 0);

/// (policy, request kind, digest) -> a reviewer's granted duration: the
/// same request is allowed without asking while the grant lasts.
#[map]
pub static GRANTS: HashMap<GrantKey, Grant> = HashMap::with_max_entries(65536, 0);

/// Events for user space: requests that need a decision, denials, lifecycle.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// SHA-256 of the object these programs came from, written by the agent
/// that loaded them and never read here: an agent adopts pinned programs only
/// from its own build (one built from other sources could expect other maps
/// or semantics of them).
#[map]
pub static BUILD_ID: Array<[u8; 32]> = Array::with_max_entries(1, 0);

/// Statistics, indexed by `gatekeep_common::counter::*`; per-CPU so the hot
/// path never contends on a cache line.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Kernel struct offsets, set by the agent from the running kernel's BTF.
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    linux_binprm_file: 0,
    linux_binprm_filename: 0,
    linux_binprm_interp: 0,
    linux_binprm_buf: 0,
    file_f_inode: 0,
    inode_i_ino: 0,
    inode_i_sb: 0,
    super_block_s_dev: 0,
    task_struct_ptrace: 0,
    socket_type: 0,
    task_struct_real_parent: 0,
    task_struct_tgid: 0,
    inode_i_mode: 0,
    inode_i_rdev: 0,
    super_block_s_magic: 0,
    task_struct_group_leader: 0,
    task_struct_start_boottime: 0,
    file_f_path_dentry: 0,
    file_f_mode: 0,
    dentry_d_parent: 0,
    dentry_d_inode: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
    kernfs_node_parent: 0,
    cgroup_root: 0,
    cgroup_root_hierarchy_id: 0,
    msghdr_msg_name: 0,
    msghdr_msg_namelen: 0,
    socket_sk: 0,
    sock_skc_family: 0,
    sock_sk_protocol: 0,
    inode_i_ctime_sec: 0,
    inode_i_ctime_nsec: 0,
    inode_i_size: 0,
    inode_i_generation: 0,
    task_struct_mm: 0,
    mm_struct_exe_file: 0,
    vm_area_struct_vm_file: 0,
    inode_i_nlink: 0,
    dentry_d_name_name: 0,
    mm_struct_arg_start: 0,
    mm_struct_arg_end: 0,
    mm_struct_env_end: 0,
};

/// SipHash key for request digests, random per load (set by the agent), so
/// nobody can construct a different request with an approved digest.
#[unsafe(no_mangle)]
static DIGEST_KEY: [u64; 2] = [0, 0];

/// The offsets the agent set at load time.
///
/// A reference whose address the compiler cannot see through (read back
/// from the stack with a volatile load), so each field is loaded from the
/// global as it is used, with the loader's value rather than the
/// compile-time zeroes, and the struct is never copied onto the 512-byte
/// stack.
#[inline(always)]
pub fn offsets() -> &'static KernelOffsets {
    let global = &raw const KERNEL_OFFSETS;
    // SAFETY: a volatile read of a local holding the global's address, and
    // a shared reference to an immutable global.
    unsafe { &*core::ptr::read_volatile(&raw const global) }
}

/// The digest key the agent set at load time.
#[inline(always)]
pub fn digest_key() -> [u64; 2] {
    // SAFETY: as for `offsets`.
    unsafe { core::ptr::read_volatile(&raw const DIGEST_KEY) }
}

/// Adds one to counter `index`.
#[inline(always)]
pub fn bump(index: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the
        // program runs.
        unsafe { *value += 1 };
    }
}

/// gatekeep's own files and directories, by identity -> `protected_inode`
/// bits: what gated tasks may not do to them (hooks/protect_files.rs). The
/// agent fills it at start and refreshes it on every rescan.
#[map]
pub static PROTECTED_INODES: HashMap<InodeKey, u32> = HashMap::with_max_entries(4096, 0);

/// The `PROTECTED_INODES` bits of the inode at `inode` (a `struct inode *`),
/// 0 when it is not one of gatekeep's (or cannot be read).
#[inline(always)]
pub fn protected_inode(inode: *const u8) -> u32 {
    if inode.is_null() {
        return 0;
    }
    let off = offsets();
    // SAFETY: probe reads, which fail safely on a bad address.
    let key = unsafe {
        let Ok(ino) = bpf_probe_read_kernel::<u64>(inode.add(off.inode_i_ino as usize).cast())
        else {
            return 0;
        };
        let Ok(sb) = bpf_probe_read_kernel::<*const u8>(inode.add(off.inode_i_sb as usize).cast())
        else {
            return 0;
        };
        let Ok(dev) = bpf_probe_read_kernel::<u32>(sb.add(off.super_block_s_dev as usize).cast())
        else {
            return 0;
        };
        InodeKey {
            dev: u64::from(dev),
            ino,
        }
    };
    // SAFETY: copied out immediately.
    unsafe { PROTECTED_INODES.get(&key) }.copied().unwrap_or(0)
}

/// Policy id -> a hash of the policy's name (0: no policy), written with
/// `POLICIES` and never read here: a reload (or a restarted agent) gives
/// policies new ids, and finds by it which new policy a cgroup the kernel
/// gated itself (`GATED_INHERITED`) belongs to, so inherited gating
/// survives reloads.
#[map]
pub static POLICY_NAME_HASHES: Array<u64> = Array::with_max_entries(MAX_POLICIES, 0);

/// cgroup ids below which some policy pattern can match a cgroup that does
/// not exist yet (e.g. `/system.slice` for `/system.slice/ai-*.service`),
/// written by the agent. A cgroup made in one by an ungated task is gated as
/// unclassified (`GATED_UNCLASSIFIED`) until the agent classifies it.
#[map]
pub static CANDIDATE_PARENTS: HashMap<u64, u32> = HashMap::with_max_entries(4096, 0);

/// Self-protection (issue 18): policy id -> the [`gatekeep_common::protect`]
/// bits (`1 << id`) the policy relaxed. 0, the default, protects everything.
#[map]
pub static PROTECT_RELAXED: Array<u32> = Array::with_max_entries(MAX_POLICIES, 0);

/// Whether `policy_id` relaxed protection `id`.
#[inline(always)]
pub fn protect_relaxed(policy_id: u32, id: u32) -> bool {
    PROTECT_RELAXED
        .get(policy_id)
        .is_some_and(|mask| *mask & gatekeep_common::protect::bit(id) != 0)
}

/// Thread group id -> a gatekeep process gated tasks may not signal, trace
/// or read through `/proc` (the agent, processes it starts, a local
/// `gatekeep-server`). Filled by the agent.
#[map]
pub static PROTECTED_TASKS: HashMap<u32, ProtectedTask> = HashMap::with_max_entries(64, 0);

/// Refused self-protection attempts per (protection, cgroup), added to
/// atomically. User space reads the counts and writes one audit record per
/// burst, so a flood of attempts costs one entry here, not one event each.
/// LRU: a workload making cgroups to evict entries only loses counts, never
/// a refusal.
#[map]
pub static PROTECT_DENIALS: LruHashMap<ProtectDenialKey, u64> =
    LruHashMap::with_max_entries(4096, 0);

/// Counts one refusal of protection `hook` for `cgroup_id`.
#[inline(always)]
pub fn count_protect_denial(hook: u32, cgroup_id: u64) {
    let key = ProtectDenialKey {
        hook,
        _pad: 0,
        cgroup_id,
    };
    if let Some(count) = PROTECT_DENIALS.get_ptr_mut(&key) {
        add_to_slot(count, 1);
        return;
    }
    // Two first refusals at once: the loser's insert fails, and it adds.
    if PROTECT_DENIALS
        .insert(&key, &1, BPF_NOEXIST.into())
        .is_err()
        && let Some(count) = PROTECT_DENIALS.get_ptr_mut(&key)
    {
        add_to_slot(count, 1);
    }
}

/// The decision service's listening addresses (set by the agent): gated
/// tasks may not connect to them unless their policy relaxes
/// `protect::SERVICE_CONNECT`.
#[map]
pub static SERVICE_LISTENERS: HashMap<ServiceListenerKey, u32> = HashMap::with_max_entries(256, 0);

/// The inode number of `/proc/kcore` (set by the agent at load; the same in
/// every procfs instance: proc entries get their inode number once, at
/// registration). 0: not known, nothing matches.
#[unsafe(no_mangle)]
static PROC_KCORE_INO: u64 = 0;

/// The `/proc/kcore` inode number the agent set at load time.
#[inline(always)]
pub fn proc_kcore_ino() -> u64 {
    // SAFETY: as for `offsets`.
    unsafe { core::ptr::read_volatile(&raw const PROC_KCORE_INO) }
}
