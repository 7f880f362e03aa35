//! Every map the programs share with user space. The agent finds them by
//! these names (and pins them under /sys/fs/bpf/gatekeep).

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use gatekeep_common::{GatedCgroup, counter};

/// cgroup v2 id -> policy governing it. A task whose cgroup is absent is not
/// gated: this lookup is all it pays.
#[map]
pub static GATED_CGROUPS: HashMap<u64, GatedCgroup> = HashMap::with_max_entries(4096, 0);

/// Events for user space (requests that need a decision, audit records).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Statistics, indexed by `gatekeep_common::counter::*`; per-CPU so the hot
/// path never contends on a cache line.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Adds one to counter `index`.
#[inline(always)]
pub fn bump(index: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the
        // program runs (BPF programs are not preempted mid-run).
        unsafe { *value += 1 };
    }
}
