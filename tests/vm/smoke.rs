//! The foundation smoke test: the programs load and attach, the exec hook
//! sees an exec from a gated cgroup (and nothing from elsewhere), and
//! everything detaches cleanly.

use std::{io, os::unix::fs::MetadataExt as _, process::Command, time::Duration};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use gatekeep_common::{ExecEvent, GatedCgroup, PolicyDefaults, action, counter, event_kind};
use gatekeep_tests::{Cgroup, require_vm, wait_for};

const POLICY_ID: u32 = 7;

/// Reads every exec event currently on the ring buffer.
fn drain_exec_events(ring: &mut RingBuf<&mut MapData>) -> Vec<ExecEvent> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        let kind = u32::from_ne_bytes(item[..4].try_into().expect("4 bytes"));
        if kind != event_kind::EXEC_DENIED && kind != event_kind::EXEC_ASK {
            continue;
        }
        assert!(item.len() >= size_of::<ExecEvent>(), "short exec record: {} bytes", item.len());
        // SAFETY: length checked; ExecEvent is plain old data written by the
        // kernel program with the same layout.
        events.push(unsafe { item.as_ptr().cast::<ExecEvent>().read_unaligned() });
    }
    events
}

fn counter_value(ebpf: &aya::Ebpf, index: u32) -> u64 {
    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map("COUNTERS").expect("COUNTERS map")).expect("COUNTERS is a per-CPU array");
    counters.get(&index, 0).expect("read counter").iter().sum()
}

fn gatekeep_programs_loaded() -> Vec<String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| p.name_as_str().map(str::to_owned))
        .filter(|name| name == "bprm_check_secu" || name.starts_with("bprm_check") || name.starts_with("socket_connect"))
        .collect()
}

/// The kernel's encoding of a device number (`MKDEV`), as `s_dev` holds it.
fn kernel_dev(dev: u64) -> u64 {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    (u64::from(major) << 20) | u64::from(minor)
}

#[test]
fn exec_hook_sees_gated_exec_and_detaches() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-smoke");
    let mut ebpf = gatekeep_agent::ebpf::load_and_attach().expect("load and attach the programs");
    assert!(!gatekeep_programs_loaded().is_empty(), "the LSM programs are not among the loaded programs");

    let mut policies: Array<_, PolicyDefaults> =
        Array::try_from(ebpf.map_mut("POLICIES").expect("POLICIES map")).expect("array");
    let deny_exec = PolicyDefaults {
        exec_default: action::DENY,
        connect_default: action::ALLOW,
        unix_action: action::ALLOW,
        generation: 1,
    };
    policies.set(POLICY_ID, deny_exec, 0).expect("set policy defaults");
    let mut gated: HashMap<_, u64, GatedCgroup> =
        HashMap::try_from(ebpf.map_mut("GATED_CGROUPS").expect("GATED_CGROUPS map")).expect("hash map");
    gated
        .insert(cgroup.id(), GatedCgroup { policy_id: POLICY_ID, flags: 0 }, 0)
        .expect("gate the test cgroup");

    // Outside the gated cgroup: untouched.
    let outside = Command::new("/bin/true").status().expect("run /bin/true outside");
    assert!(outside.success(), "an exec outside gated cgroups was affected");

    // Inside it: the policy denies by default, so the exec fails with EPERM.
    let mut command = Command::new("/bin/true");
    cgroup.place(&mut command);
    let error = command.spawn().expect_err("a gated exec under a deny-by-default policy must fail");
    assert_eq!(error.raw_os_error(), Some(libc::EPERM), "expected EPERM, got {error}");

    let identity = std::fs::metadata("/bin/true").expect("stat /bin/true");
    let mut ring = RingBuf::try_from(ebpf.map_mut("EVENTS").expect("EVENTS map")).expect("ring buffer");
    let mut seen = Vec::new();
    let event = wait_for("the denied exec event", Duration::from_secs(5), || {
        seen.extend(drain_exec_events(&mut ring));
        seen.first().copied()
    });
    assert_eq!(event.header.kind, event_kind::EXEC_DENIED);
    assert_eq!(event.header.cgroup_id, cgroup.id());
    assert_eq!(event.header.policy_id, POLICY_ID);
    assert_eq!(event.header.uid, 0);
    assert_eq!(event.header.ppid, std::process::id(), "the exec'ing child's parent is this test");
    assert_eq!(event.ino, identity.ino(), "event names a different inode than /bin/true's");
    assert_eq!(event.dev, kernel_dev(identity.dev()), "event names a different device than /bin/true's");
    let filename = std::ffi::CStr::from_bytes_until_nul(&event.filename).expect("NUL-terminated filename");
    assert_eq!(filename.to_str(), Ok("/bin/true"));
    let argv: Vec<&[u8]> = event.argv[..event.argv_len as usize].split(|b| *b == 0).filter(|s| !s.is_empty()).collect();
    assert_eq!(argv, [b"/bin/true".as_slice()], "argv captured at syscall entry");
    assert!(seen.iter().all(|e| e.header.cgroup_id == cgroup.id()), "an exec outside the gated cgroup was reported");
    assert!(counter_value(&ebpf, counter::EXEC_GATED) >= 1, "EXEC_GATED counter did not move");
    assert!(counter_value(&ebpf, counter::EXEC_DENIED) >= 1, "EXEC_DENIED counter did not move");

    drop(ebpf);
    assert!(
        gatekeep_programs_loaded().is_empty(),
        "programs still loaded after the agent dropped them: {:?}",
        gatekeep_programs_loaded()
    );
    // With the programs gone, the same exec works again: nothing left behind.
    let mut child = cgroup.spawn(&mut Command::new("/bin/true"));
    assert!(child.wait().map_err(|e: io::Error| e.to_string()).expect("wait").success());
}
