//! The foundation smoke test: the programs load and attach, the exec hook
//! sees an exec from a gated cgroup (and nothing from elsewhere), and
//! everything detaches cleanly.

use std::{io, os::unix::fs::MetadataExt as _, process::Command, time::Duration};

use aya::maps::RingBuf;
use gatekeep_agent::bpf::programs::PROGRAMS;
use gatekeep_common::{ExecEvent, action, counter, event_kind, map_names};
use gatekeep_tests::{
    Cgroup,
    kernel::{self, drain_events, event_argv, gate, kernel_dev, kernel_program_name},
    require_vm, wait_for,
};

const POLICY_ID: u32 = 7;

/// The loaded programs that bear the name of one of the agent's (every
/// program of `PROGRAMS`: LSM hooks, argv capture, cleanup and cgroup
/// tracking).
fn gatekeep_programs_loaded() -> Vec<String> {
    let names: Vec<&str> = PROGRAMS
        .iter()
        .map(|p| kernel_program_name(p.name))
        .collect();
    kernel::loaded_programs()
        .into_iter()
        .map(|(_, name)| name)
        .filter(|name| names.contains(&name.as_str()))
        .collect()
}

#[test]
fn exec_hook_sees_gated_exec_and_detaches() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-smoke");
    let mut ebpf =
        gatekeep_agent::bpf::programs::load_and_attach().expect("load and attach the programs");
    let loaded = gatekeep_programs_loaded();
    for program in PROGRAMS {
        assert!(
            loaded
                .iter()
                .any(|name| name == kernel_program_name(program.name)),
            "program {} is not among the loaded programs: {loaded:?}",
            program.name
        );
    }

    gate(&mut ebpf, &cgroup, POLICY_ID, action::DENY);

    // Outside the gated cgroup: untouched.
    let outside = Command::new("/bin/true")
        .status()
        .expect("run /bin/true outside");
    assert!(
        outside.success(),
        "an exec outside gated cgroups was affected"
    );

    // Inside it: the policy denies by default, so the exec fails with EPERM.
    let mut command = Command::new("/bin/true");
    cgroup.place(&mut command);
    let error = command
        .spawn()
        .expect_err("a gated exec under a deny-by-default policy must fail");
    assert_eq!(
        error.raw_os_error(),
        Some(libc::EPERM),
        "expected EPERM, got {error}"
    );

    let identity = std::fs::metadata("/bin/true").expect("stat /bin/true");
    let mut ring = RingBuf::try_from(ebpf.map_mut(map_names::EVENTS).expect("EVENTS map"))
        .expect("ring buffer");
    // Every exec event (denied or asked), so one from outside the cgroup
    // would show up here.
    let mut seen: Vec<ExecEvent> = Vec::new();
    let event = wait_for("the denied exec event", Duration::from_secs(5), || {
        seen.extend(drain_events::<ExecEvent>(
            &mut ring,
            &[event_kind::EXEC_DENIED, event_kind::EXEC_ASK],
        ));
        seen.first().copied()
    });
    assert_eq!(event.header.kind, event_kind::EXEC_DENIED);
    assert_eq!(event.header.cgroup_id, cgroup.id());
    assert_eq!(event.header.policy_id, POLICY_ID);
    assert_eq!(event.header.uid, 0);
    assert_eq!(
        event.header.ppid,
        std::process::id(),
        "the exec'ing child's parent is this test"
    );
    assert_eq!(
        event.ino,
        identity.ino(),
        "event names a different inode than /bin/true's"
    );
    assert_eq!(
        event.dev,
        kernel_dev(identity.dev()),
        "event names a different device than /bin/true's"
    );
    let filename =
        std::ffi::CStr::from_bytes_until_nul(&event.filename).expect("NUL-terminated filename");
    assert_eq!(filename.to_str(), Ok("/bin/true"));
    assert_eq!(
        event_argv(&event),
        ["/bin/true"],
        "argv captured in the exec hook"
    );
    assert!(
        seen.iter().all(|e| e.header.cgroup_id == cgroup.id()),
        "an exec outside the gated cgroup was reported"
    );
    assert!(
        kernel::counter(&ebpf, counter::EXEC_GATED) >= 1,
        "EXEC_GATED counter did not move"
    );
    assert!(
        kernel::counter(&ebpf, counter::EXEC_DENIED) >= 1,
        "EXEC_DENIED counter did not move"
    );

    drop(ebpf);
    // The kernel frees a detached program once its last RCU grace period
    // ends (a raw tracepoint's waits for tracepoint callers): soon, not at once.
    wait_for(
        "every program to be unloaded after the agent dropped them",
        Duration::from_secs(10),
        || gatekeep_programs_loaded().is_empty().then_some(()),
    );
    // With the programs gone, the same exec works again: nothing left behind.
    let mut child = cgroup.spawn(&mut Command::new("/bin/true"));
    assert!(
        child
            .wait()
            .map_err(|e: io::Error| e.to_string())
            .expect("wait")
            .success()
    );
}
