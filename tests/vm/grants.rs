//! The kernel's pause protocol driven directly through the maps (no agent):
//! an "ask" exec pauses and reports its digest, a verdict resumes exactly
//! that request, and a granted duration (`GRANTS`) lets the identical
//! request through without asking while a different one still pauses.

use std::{
    process::{Command, ExitStatus},
    sync::mpsc,
    thread,
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
};
use gatekeep_common::{
    ExecEvent, GatedCgroup, Grant, GrantKey, PolicyDefaults, Verdict, VerdictKey, action, counter,
    event_kind, request_kind,
};
use gatekeep_tests::{Cgroup, is_stopped, require_vm, wait_for};
use nix::{
    sys::signal::{Signal, kill},
    time::{ClockId, clock_gettime},
    unistd::Pid,
};

const POLICY_ID: u32 = 3;

/// Starts `argv` in `cgroup` on another thread: `spawn` blocks while the
/// exec is paused, so the test reads the result from a channel.
fn exec_in(cgroup: &Cgroup, argv: &[&str]) -> mpsc::Receiver<std::io::Result<ExitStatus>> {
    let (tx, rx) = mpsc::channel();
    let mut command = Command::new(argv[0]);
    command.args(&argv[1..]);
    cgroup.place(&mut command);
    thread::spawn(move || {
        let _ = tx.send(command.spawn().and_then(|mut child| child.wait()));
    });
    rx
}

fn next_ask(ring: &mut RingBuf<&mut MapData>) -> Option<ExecEvent> {
    while let Some(item) = ring.next() {
        let kind = u32::from_ne_bytes(item[..4].try_into().expect("4 bytes"));
        if kind == event_kind::EXEC_ASK {
            assert!(item.len() >= size_of::<ExecEvent>());
            // SAFETY: length checked; plain old data from the kernel program.
            return Some(unsafe { item.as_ptr().cast::<ExecEvent>().read_unaligned() });
        }
    }
    None
}

fn boot_ns() -> u64 {
    let now = clock_gettime(ClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME");
    u64::try_from(now.tv_sec()).expect("positive") * 1_000_000_000 + u64::try_from(now.tv_nsec()).expect("positive")
}

fn counter_value(ebpf: &Ebpf, index: u32) -> u64 {
    let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(ebpf.map("COUNTERS").expect("COUNTERS")).expect("array");
    counters.get(&index, 0).expect("read counter").iter().sum()
}

/// Waits for the ask event of a paused exec and checks the task stopped.
fn paused_request(ebpf: &mut Ebpf) -> ExecEvent {
    let mut ring = RingBuf::try_from(ebpf.map_mut("EVENTS").expect("EVENTS")).expect("ring buffer");
    let event = wait_for("an EXEC_ASK event", Duration::from_secs(10), || next_ask(&mut ring));
    let pid = event.header.pid;
    wait_for("the asking task to stop", Duration::from_secs(10), || is_stopped(pid).then_some(()));
    event
}

fn deny(ebpf: &mut Ebpf, event: &ExecEvent) {
    let mut verdicts: HashMap<_, VerdictKey, Verdict> =
        HashMap::try_from(ebpf.map_mut("VERDICTS").expect("VERDICTS")).expect("hash map");
    let key = VerdictKey { tid: event.header.tid, _pad: 0, digest: event.header.digest };
    let verdict = Verdict { action: action::DENY, _pad: 0, expires_ns: boot_ns() + 30_000_000_000 };
    verdicts.insert(key, verdict, 0).expect("write verdict");
    let pid = i32::try_from(event.header.pid).expect("pid fits i32");
    kill(Pid::from_raw(pid), Signal::SIGCONT).expect("SIGCONT");
}

fn expect_denied(result: &mpsc::Receiver<std::io::Result<ExitStatus>>) {
    let outcome = result.recv_timeout(Duration::from_secs(10)).expect("the denied exec returns");
    let error = outcome.expect_err("a denied exec must fail");
    assert_eq!(error.raw_os_error(), Some(libc::EPERM), "denied exec: expected EPERM, got {error}");
}

#[test]
fn granted_duration_allows_the_identical_request_only() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-grants");
    let mut ebpf = gatekeep_agent::ebpf::load_and_attach().expect("load and attach the programs");
    let mut policies: Array<_, PolicyDefaults> = Array::try_from(ebpf.map_mut("POLICIES").expect("POLICIES")).expect("array");
    let ask_exec = PolicyDefaults {
        exec_default: action::ASK,
        connect_default: action::ALLOW,
        unix_action: action::ALLOW,
        generation: 1,
    };
    policies.set(POLICY_ID, ask_exec, 0).expect("set policy");
    let mut gated: HashMap<_, u64, GatedCgroup> =
        HashMap::try_from(ebpf.map_mut("GATED_CGROUPS").expect("GATED_CGROUPS")).expect("hash map");
    gated.insert(cgroup.id(), GatedCgroup { policy_id: POLICY_ID, flags: 0 }, 0).expect("gate cgroup");

    // 1. An ask: paused, reported with a digest, then denied by a verdict.
    let first = exec_in(&cgroup, &["/bin/true", "granted"]);
    let asked = paused_request(&mut ebpf);
    assert_ne!(asked.header.digest, 0, "an ask carries its request digest");
    deny(&mut ebpf, &asked);
    expect_denied(&first);

    // 2. A grant for that digest: the identical exec runs without asking.
    let mut grants: HashMap<_, GrantKey, Grant> = HashMap::try_from(ebpf.map_mut("GRANTS").expect("GRANTS")).expect("hash map");
    let key = GrantKey { policy_id: POLICY_ID, kind: request_kind::EXEC, digest: asked.header.digest };
    grants.insert(key, Grant { expires_ns: 0, cgroup_id: 0 }, 0).expect("install grant");
    let before = counter_value(&ebpf, counter::GRANT_ALLOWED);
    let again = exec_in(&cgroup, &["/bin/true", "granted"]);
    let status = again.recv_timeout(Duration::from_secs(10)).expect("granted exec returns").expect("granted exec runs");
    assert!(status.success(), "granted exec: {status}");
    assert!(counter_value(&ebpf, counter::GRANT_ALLOWED) > before, "GRANT_ALLOWED did not move");

    // 3. Different argv: a different request, asked again despite the grant.
    let other = exec_in(&cgroup, &["/bin/true", "not-granted"]);
    let asked_again = paused_request(&mut ebpf);
    assert_ne!(asked_again.header.digest, asked.header.digest, "different argv must give a different digest");
    deny(&mut ebpf, &asked_again);
    expect_denied(&other);

    // 4. An expired grant no longer applies.
    let mut grants: HashMap<_, GrantKey, Grant> = HashMap::try_from(ebpf.map_mut("GRANTS").expect("GRANTS")).expect("hash map");
    grants.insert(key, Grant { expires_ns: boot_ns() - 1, cgroup_id: 0 }, 0).expect("expire grant");
    let expired = exec_in(&cgroup, &["/bin/true", "granted"]);
    let asked_expired = paused_request(&mut ebpf);
    assert_eq!(asked_expired.header.digest, asked.header.digest, "same request, same digest");
    deny(&mut ebpf, &asked_expired);
    expect_denied(&expired);
}
