//! A gated workload cannot leave gating: not through a cgroup it creates
//! and moves into, and not by having a tracer swallow the pause's SIGSTOP.
//! Driven directly through the maps (no agent), so nothing but the kernel
//! programs can make these pass.

use std::{
    fs,
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    process::Command,
    time::Duration,
};

use aya::maps::HashMap;
use gatekeep_common::{
    GATED_INHERITED, GatedCgroup, PendingRequest, TaskEvent, action, event_kind, map_names,
    request_kind,
};
use gatekeep_tests::{
    Cgroup,
    kernel::{attach_gating, exec_rule_on_busybox_copy, wait_event},
    require_vm,
};

const POLICY_ID: u32 = 5;

#[test]
fn a_cgroup_created_by_a_gated_task_is_gated_before_it_can_be_used() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-escape");
    let child_path = cgroup.path().join("escaped");
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ALLOW);
    let denied =
        exec_rule_on_busybox_copy(&mut ebpf, POLICY_ID, "gatekeep-escape-denied", action::DENY);

    // Inside the gated cgroup: make a child cgroup, move there, then try
    // the denied binary. Exit 126 is the shell's "permission denied".
    let script = format!(
        "mkdir {child} && echo $$ > {child}/cgroup.procs && exec {denied} true",
        child = child_path.display(),
        denied = denied.display(),
    );
    let mut shell = cgroup.spawn(Command::new("/bin/sh").args(["-c", &script]));
    let status = shell.wait().expect("wait for the shell");
    assert_eq!(
        status.code(),
        Some(126),
        "the denied binary ran after moving into a new cgroup: {status}"
    );

    let child_id = fs::metadata(&child_path)
        .expect("the child cgroup exists")
        .ino();
    let gated: HashMap<_, u64, GatedCgroup> = HashMap::try_from(
        ebpf.map(map_names::GATED_CGROUPS)
            .expect(map_names::GATED_CGROUPS),
    )
    .expect("hash map");
    let entry = gated.get(&child_id, 0).expect("the new cgroup is gated");
    assert_eq!(
        entry,
        GatedCgroup {
            policy_id: POLICY_ID,
            flags: GATED_INHERITED
        }
    );

    // A cgroup made by an ungated task (this test) is left to the agent.
    let outside = Cgroup::create("gatekeep-escape-ungated");
    assert!(
        gated.get(&outside.id(), 0).is_err(),
        "a cgroup made outside gating must not be gated by the kernel"
    );
    drop(ebpf);
    let _ = fs::remove_dir(&child_path);
    let _ = fs::remove_file(denied);
}

#[test]
fn a_traced_task_is_refused_instead_of_paused() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-traced");
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ASK);

    // The child asks to be traced by us before its exec: a tracer sees the
    // pause's SIGSTOP first and could swallow it, so the kernel refuses.
    let mut command = Command::new("/bin/true");
    cgroup.place(&mut command);
    // SAFETY: ptrace(PTRACE_TRACEME) is async-signal-safe.
    unsafe {
        command.pre_exec(|| nix::sys::ptrace::traceme().map_err(std::io::Error::from));
    }
    let error = command
        .spawn()
        .expect_err("an asked exec of a traced task must be refused");
    assert_eq!(
        error.raw_os_error(),
        Some(libc::EPERM),
        "expected EPERM, got {error}"
    );

    let event: TaskEvent = wait_event(
        &mut ebpf,
        event_kind::REFUSED_SPINNING,
        Duration::from_secs(5),
    );
    assert_eq!(event.request_kind, request_kind::EXEC);
    assert_eq!(event.header.cgroup_id, cgroup.id());
    let pending: HashMap<_, u32, PendingRequest> =
        HashMap::try_from(ebpf.map(map_names::PENDING).expect(map_names::PENDING))
            .expect("hash map");
    assert_eq!(
        pending.keys().count(),
        0,
        "a refused request must not stay pending"
    );
}
