//! Types shared by the kernel programs (`gatekeep-ebpf`) and user space.
//!
//! Everything here is `#[repr(C)]` with explicit padding so that the byte
//! layout is identical on both sides of a map or the ring buffer: the kernel
//! writes raw bytes, user space reads them back as these structs. Flags are
//! `u32` rather than `bool` because `bool` has invalid bit patterns that raw
//! kernel bytes could produce.
#![no_std]

/// Length of `task_struct::comm` in the kernel (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// Kinds of records on the `EVENTS` ring buffer; the first `u32` of every
/// record, so user space can dispatch before it knows the full type.
pub mod event_kind {
    /// An `execve`/`execveat` from a gated cgroup reached `bprm_check_security`.
    pub const EXEC: u32 = 1;
}

/// Indices into the per-CPU `COUNTERS` array.
pub mod counter {
    /// `bprm_check_security` ran for a task in a gated cgroup.
    pub const EXEC_GATED: u32 = 0;
    /// An event could not be reserved on the ring buffer (user space is
    /// behind); the action was still decided in the kernel.
    pub const EVENTS_DROPPED: u32 = 1;
    /// Number of counters; size of the `COUNTERS` map.
    pub const COUNT: u32 = 2;
}

/// Value of the `GATED_CGROUPS` map: which policy governs a cgroup.
///
/// Keyed by the cgroup v2 id (the cgroup directory's inode number, as
/// returned by `bpf_get_current_cgroup_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatedCgroup {
    /// Index of the policy, assigned by the agent when it compiles policies.
    pub policy_id: u32,
    /// Reserved, keeps the struct 8-byte sized and aligned.
    pub _pad: u32,
}

/// Fixed header of every exec event on the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecEvent {
    /// Always [`event_kind::EXEC`].
    pub kind: u32,
    /// Policy governing the task's cgroup.
    pub policy_id: u32,
    /// Thread group id (user space's "pid").
    pub pid: u32,
    /// Thread id of the calling thread.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// cgroup v2 id of the calling task.
    pub cgroup_id: u64,
    /// `bpf_ktime_get_boot_ns` when the hook ran.
    pub ktime_ns: u64,
    /// Name of the calling task (before the exec), NUL padded.
    pub comm: [u8; COMM_LEN],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]` plain-old-data with explicit padding and no
    // invalid bit patterns.
    unsafe impl aya::Pod for super::GatedCgroup {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ExecEvent {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    /// The kernel and user space must agree on these sizes; a change here is
    /// a wire-format change.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<GatedCgroup>(), 8);
        assert_eq!(size_of::<ExecEvent>(), 4 * 6 + 8 * 2 + COMM_LEN);
    }
}
