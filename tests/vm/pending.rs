//! The kernel's own bookkeeping of paused threads, driven through the maps
//! (no agent): a paused thread is counted in its `PENDING_SLOTS` slot, which
//! is what lets every other thread exit on the host skip the `PENDING`
//! lookup, and its death is still reported.

use std::{os::unix::process::ExitStatusExt as _, process::Command, time::Duration};

use aya::maps::{Array, HashMap};
use gatekeep_common::{
    PendingRequest, TaskEvent, action, event_kind, map_names, pending_slot, request_kind,
};
use gatekeep_tests::{
    Cgroup,
    kernel::{attach_gating, exec_rule_on_busybox_copy, wait_event},
    require_vm, wait_stopped,
};

const POLICY_ID: u32 = 6;

fn slot_count(ebpf: &aya::Ebpf, tid: u32) -> u64 {
    let slots: Array<_, u64> = Array::try_from(
        ebpf.map(map_names::PENDING_SLOTS)
            .expect(map_names::PENDING_SLOTS),
    )
    .expect("array");
    slots.get(&pending_slot(tid), 0).expect("slot")
}

fn is_pending(ebpf: &aya::Ebpf, tid: u32) -> bool {
    let pending: HashMap<_, u32, PendingRequest> =
        HashMap::try_from(ebpf.map(map_names::PENDING).expect(map_names::PENDING))
            .expect("hash map");
    pending.get(&tid, 0).is_ok()
}

#[test]
fn a_paused_thread_is_counted_until_it_dies_and_its_death_is_reported() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-pending");
    // The shell is allowed, so spawning returns before the pause; the copy
    // it execs is asked about.
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ALLOW);
    let asked =
        exec_rule_on_busybox_copy(&mut ebpf, POLICY_ID, "gatekeep-pending-asked", action::ASK);

    // Nobody answers: the shell's exec of the copy pauses and stays paused.
    let script = format!("exec {} true", asked.display());
    let mut child = cgroup.spawn(Command::new("/bin/sh").args(["-c", &script]));
    let tid = child.id();
    wait_stopped(tid, Duration::from_secs(20));
    assert!(is_pending(&ebpf, tid), "the paused exec is pending");
    assert_eq!(slot_count(&ebpf, tid), 1, "and counted in its slot");

    child.kill().expect("SIGKILL the paused task");
    let status = child.wait().expect("wait for the killed task");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let event: TaskEvent = wait_event(&mut ebpf, event_kind::ABANDONED, Duration::from_secs(5));
    assert_eq!(event.header.tid, tid);
    assert_eq!(event.request_kind, request_kind::EXEC);
    assert!(!is_pending(&ebpf, tid), "nothing stays pending");
    assert_eq!(slot_count(&ebpf, tid), 0, "the slot counts it no more");
}
