//! Building and submitting ring-buffer events.

use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_current_uid_gid,
    bpf_ktime_get_boot_ns, bpf_probe_read_kernel,
};
use gatekeep_common::{EventHeader, TaskEvent, counter};

use crate::maps::{EVENTS, bump, offsets};

/// Who is calling, gathered once per hook run.
#[derive(Clone, Copy)]
pub struct Caller {
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub policy_id: u32,
    pub now_ns: u64,
}

impl Caller {
    #[inline(always)]
    pub fn current(cgroup_id: u64, policy_id: u32) -> Self {
        let pid_tgid = bpf_get_current_pid_tgid();
        let uid_gid = bpf_get_current_uid_gid();
        Self {
            pid: (pid_tgid >> 32) as u32,
            tid: pid_tgid as u32,
            uid: uid_gid as u32,
            gid: (uid_gid >> 32) as u32,
            cgroup_id,
            policy_id,
            // SAFETY: helper without arguments.
            now_ns: unsafe { bpf_ktime_get_boot_ns() },
        }
    }

    #[inline(always)]
    pub fn header(&self, kind: u32, digest: u64) -> EventHeader {
        EventHeader {
            kind,
            policy_id: self.policy_id,
            pid: self.pid,
            tid: self.tid,
            uid: self.uid,
            gid: self.gid,
            ppid: parent_tgid(),
            _pad: 0,
            cgroup_id: self.cgroup_id,
            ktime_ns: self.now_ns,
            digest,
            comm: bpf_get_current_comm().unwrap_or_default(),
        }
    }
}

/// `current->real_parent->tgid`; 0 if unreadable.
#[inline(always)]
fn parent_tgid() -> u32 {
    let off = offsets();
    // SAFETY: probe reads, which fail safely on a bad address.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        bpf_probe_read_kernel::<*const u8>(task.add(off.task_struct_real_parent as usize).cast())
            .and_then(|parent| {
                bpf_probe_read_kernel::<i32>(parent.add(off.task_struct_tgid as usize).cast())
            })
            .map_or(0, |tgid| tgid as u32)
    }
}

/// Emits a lifecycle event about a request.
#[inline(always)]
pub fn emit_task_event(caller: &Caller, kind: u32, digest: u64, request_kind: u32, action: u32) {
    let event = TaskEvent {
        header: caller.header(kind, digest),
        request_kind,
        action,
    };
    if EVENTS.output::<TaskEvent>(&event, 0).is_err() {
        bump(counter::EVENTS_DROPPED);
    }
}
