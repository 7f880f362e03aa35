//! The foundation smoke test: the exec LSM program loads, attaches, sees an
//! exec from a gated cgroup (and not from elsewhere), and detaches cleanly.

use std::{process::Command, time::Duration};

use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use gatekeep_common::{ExecEvent, GatedCgroup, counter, event_kind};
use gatekeep_tests::{Cgroup, require_vm, wait_for};

/// Reads every `ExecEvent` currently on the ring buffer.
fn drain_exec_events(ring: &mut RingBuf<&mut MapData>) -> Vec<ExecEvent> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        assert!(item.len() >= size_of::<ExecEvent>(), "short ring-buffer record: {} bytes", item.len());
        // SAFETY: length checked; ExecEvent is plain old data written by the
        // kernel program with the same layout.
        let event = unsafe { item.as_ptr().cast::<ExecEvent>().read_unaligned() };
        assert_eq!(event.kind, event_kind::EXEC);
        events.push(event);
    }
    events
}

fn exec_gated_count(ebpf: &aya::Ebpf) -> u64 {
    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map("COUNTERS").expect("COUNTERS map")).expect("COUNTERS is a per-CPU array");
    counters.get(&counter::EXEC_GATED, 0).expect("read counter").iter().sum()
}

fn lsm_program_loaded() -> bool {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|p| p.name_as_str() == Some("bprm_check_security"))
}

#[test]
fn exec_hook_sees_gated_exec_and_detaches() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-smoke");
    let mut ebpf = gatekeep_agent::ebpf::load_and_attach().expect("load and attach the exec program");
    assert!(lsm_program_loaded(), "bprm_check_security is not among the loaded programs");

    let mut gated: HashMap<_, u64, GatedCgroup> =
        HashMap::try_from(ebpf.map_mut("GATED_CGROUPS").expect("GATED_CGROUPS map")).expect("hash map");
    gated
        .insert(cgroup.id(), GatedCgroup { policy_id: 7, _pad: 0 }, 0)
        .expect("gate the test cgroup");

    // An exec outside the gated cgroup: must not be reported.
    let outside = Command::new("/bin/true").status().expect("run /bin/true outside");
    assert!(outside.success());

    // An exec inside it: must be reported, with its identity.
    let mut child = cgroup.spawn(&mut Command::new("/bin/true"));
    let child_pid = child.id();
    assert!(child.wait().expect("wait for /bin/true").success(), "gated /bin/true must still run (no policy denies it)");

    let mut ring = RingBuf::try_from(ebpf.map_mut("EVENTS").expect("EVENTS map")).expect("ring buffer");
    let mut seen = Vec::new();
    let event = wait_for("the gated exec event", Duration::from_secs(5), || {
        seen.extend(drain_exec_events(&mut ring));
        seen.iter().find(|e| e.pid == child_pid).copied()
    });
    assert_eq!(event.cgroup_id, cgroup.id());
    assert_eq!(event.policy_id, 7);
    assert_eq!(event.tid, child_pid, "single-threaded child: tid == pid");
    assert_eq!(event.uid, 0);
    assert!(
        seen.iter().all(|e| e.cgroup_id == cgroup.id()),
        "an exec outside the gated cgroup was reported: {seen:?}"
    );
    assert!(exec_gated_count(&ebpf) >= 1, "EXEC_GATED counter did not move");

    drop(ebpf);
    assert!(!lsm_program_loaded(), "bprm_check_security still loaded after the agent dropped it");
    // With the program gone, a gated exec still works (nothing left behind).
    let mut child = cgroup.spawn(&mut Command::new("/bin/true"));
    assert!(child.wait().expect("wait").success());
}
