//! The kernel's pause protocol driven directly through the maps (no agent):
//! an "ask" exec pauses and reports its digest, a verdict resumes exactly
//! that request, and a granted duration (`GRANTS`) lets the identical
//! request through without asking while a different one still pauses; the
//! digest covers all of argv, past its first block and past empty arguments.

use std::{
    process::{Command, ExitStatus},
    sync::mpsc,
    thread,
    time::Duration,
};

use aya::{Ebpf, maps::HashMap};
use gatekeep_common::{
    ConnectEvent, ExecEvent, Grant, GrantKey, Verdict, VerdictKey, action, counter, event_kind,
    map_names, request_kind,
};
use gatekeep_tests::{
    Cgroup,
    kernel::{self, attach_gating, boot_ns, wait_event},
    require_vm, sigcont, wait_stopped, workload,
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

/// Waits for the ask event of a paused exec and checks the task stopped.
fn paused_request(ebpf: &mut Ebpf) -> ExecEvent {
    let event: ExecEvent = wait_event(ebpf, event_kind::EXEC_ASK, Duration::from_secs(10));
    wait_stopped(event.header.pid, Duration::from_secs(10));
    event
}

fn deny(ebpf: &mut Ebpf, event: &ExecEvent) {
    kernel::decide_paused(
        ebpf,
        event.header.pid,
        event.header.tid,
        event.header.digest,
        action::DENY,
    );
}

fn expect_denied(result: &mpsc::Receiver<std::io::Result<ExitStatus>>) {
    let outcome = result
        .recv_timeout(Duration::from_secs(10))
        .expect("the denied exec returns");
    let error = outcome.expect_err("a denied exec must fail");
    assert_eq!(
        error.raw_os_error(),
        Some(libc::EPERM),
        "denied exec: expected EPERM, got {error}"
    );
}

/// Execs `argv` in `cgroup`: it pauses, is asked about, and a verdict
/// denies it (EPERM); returns what it asked.
fn ask_and_deny(ebpf: &mut Ebpf, cgroup: &Cgroup, argv: &[&str]) -> ExecEvent {
    let result = exec_in(cgroup, argv);
    let asked = paused_request(ebpf);
    deny(ebpf, &asked);
    expect_denied(&result);
    asked
}

/// Writes a grant for `key` that ends at `expires_ns` (0: never).
fn write_grant(ebpf: &mut Ebpf, key: GrantKey, expires_ns: u64) {
    let mut grants: HashMap<_, GrantKey, Grant> =
        HashMap::try_from(ebpf.map_mut(map_names::GRANTS).expect(map_names::GRANTS))
            .expect("hash map");
    let grant = Grant {
        expires_ns,
        cgroup_id: 0,
    };
    grants.insert(key, grant, 0).expect("write grant");
}

#[test]
fn granted_duration_allows_the_identical_request_only() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-grants");
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ASK);

    // 1. An ask: paused, reported with a digest, then denied by a verdict.
    let asked = ask_and_deny(&mut ebpf, &cgroup, &["/bin/true", "granted"]);
    assert_ne!(asked.header.digest, 0, "an ask carries its request digest");

    // 2. A grant for that digest: the identical exec runs without asking.
    let key = GrantKey {
        policy_id: POLICY_ID,
        kind: request_kind::EXEC,
        digest: asked.header.digest,
        cgroup_id: 0,
    };
    write_grant(&mut ebpf, key, 0);
    let before = kernel::counter(&ebpf, counter::GRANT_ALLOWED);
    let again = exec_in(&cgroup, &["/bin/true", "granted"]);
    let status = again
        .recv_timeout(Duration::from_secs(10))
        .expect("granted exec returns")
        .expect("granted exec runs");
    assert!(status.success(), "granted exec: {status}");
    assert!(
        kernel::counter(&ebpf, counter::GRANT_ALLOWED) > before,
        "GRANT_ALLOWED did not move"
    );

    // 3. Different argv: a different request, asked again despite the grant.
    let asked_again = ask_and_deny(&mut ebpf, &cgroup, &["/bin/true", "not-granted"]);
    assert_ne!(
        asked_again.header.digest, asked.header.digest,
        "different argv must give a different digest"
    );

    // 4. An expired grant no longer applies.
    write_grant(&mut ebpf, key, boot_ns() - 1);
    let asked_expired = ask_and_deny(&mut ebpf, &cgroup, &["/bin/true", "granted"]);
    assert_eq!(
        asked_expired.header.digest, asked.header.digest,
        "same request, same digest"
    );
}

#[test]
fn exec_digest_binds_the_whole_argv_past_the_first_block() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-grants-argv");
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ASK);

    // "/bin/true\0" + 3000 bytes + "\0tail-1\0": 3018 bytes of argv, the
    // tails differing at byte 3016, in the 48th 64-byte block.
    let long = "a".repeat(3000);
    let tail_1 = ["/bin/true", long.as_str(), "tail-1"];
    let tail_2 = ["/bin/true", long.as_str(), "tail-2"];

    // 1. Asked about, with all of argv captured (so the digest can see it).
    let asked = ask_and_deny(&mut ebpf, &cgroup, &tail_1);
    assert_eq!(
        kernel::event_argv(&asked),
        tail_1,
        "the ask event carries the whole argv"
    );
    assert_eq!(
        asked.argv_truncated, 0,
        "3018 bytes of argv fit the capture"
    );

    // 2. Granted: the identical exec runs without asking.
    write_grant(
        &mut ebpf,
        GrantKey {
            policy_id: POLICY_ID,
            kind: request_kind::EXEC,
            digest: asked.header.digest,
            cgroup_id: 0,
        },
        0,
    );
    let before = kernel::counter(&ebpf, counter::GRANT_ALLOWED);
    let status = exec_in(&cgroup, &tail_1)
        .recv_timeout(Duration::from_secs(10))
        .expect("granted exec returns")
        .expect("granted exec runs");
    assert!(status.success(), "granted exec: {status}");
    assert_eq!(
        kernel::counter(&ebpf, counter::GRANT_ALLOWED),
        before + 1,
        "the identical exec must be let through by the grant"
    );

    // 3. The same but for the last argument, past byte 3000: another
    //    request, asked again despite the grant.
    let asked_tail_2 = ask_and_deny(&mut ebpf, &cgroup, &tail_2);
    assert_eq!(kernel::event_argv(&asked_tail_2), tail_2);
    assert_ne!(
        asked_tail_2.header.digest, asked.header.digest,
        "argv differing past its first 3000 bytes must give another digest"
    );
    assert_eq!(
        kernel::counter(&ebpf, counter::GRANT_ALLOWED),
        before + 1,
        "the grant must not let a different argv through"
    );
}

#[test]
fn exec_digest_counts_empty_arguments_and_what_follows_them() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-grants-empty");
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ASK);

    // Each pair differs only by what comes after an empty argument, or by
    // an empty argument: two requests, two digests, each argv captured as
    // it was. (A grant for the first of the first pair must not allow the
    // second.)
    let pairs: [[&[&str]; 2]; 2] = [
        [&["/bin/true", "", "safe"], &["/bin/true", "", "evil"]],
        [&["/bin/true", "a"], &["/bin/true", "a", ""]],
    ];
    for [left, right] in pairs {
        let asked_left = ask_and_deny(&mut ebpf, &cgroup, left);
        let asked_right = ask_and_deny(&mut ebpf, &cgroup, right);
        assert_ne!(
            asked_left.header.digest,
            asked_right.header.digest,
            "{left:?} and {right:?} must give different digests (captured as {:?} and {:?})",
            kernel::event_argv(&asked_left),
            kernel::event_argv(&asked_right)
        );
        assert_eq!(kernel::event_argv(&asked_left), left);
        assert_eq!(kernel::event_argv(&asked_right), right);
    }
}

/// `/proc/<pid>/task/<tid>/stat` field 22: the thread's start time in clock
/// ticks after boot (the kernel's `start_boottime`, which `/proc` divides by
/// the tick).
fn proc_start_ticks(pid: u32, tid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).expect("stat");
    // Fields after the command name, which ends at the last ')'.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    // `rest` starts at field 3 (state); field 22 is its 20th.
    rest.split(' ')
        .nth(19)
        .expect("field 22")
        .parse()
        .expect("start time")
}

#[test]
fn a_verdict_binds_the_task_identity_not_just_its_thread_id() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-verdict-task");
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ASK);

    let result = exec_in(&cgroup, &["/bin/true", "whose-verdict"]);
    let asked = paused_request(&mut ebpf);
    let (pid, tid) = (asked.header.pid, asked.header.tid);
    let pending = kernel::pending_of(&ebpf, tid).expect("the request is pending");
    // The pending entry names the task by its real start time (the BTF
    // offset is right): /proc shows the same instant, in ticks of 10 ms.
    // SAFETY: sysconf has no memory arguments.
    let tick_ns = 1_000_000_000
        / u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).expect("clock tick");
    let ticks = proc_start_ticks(pid, tid);
    assert!(
        pending.start_ns != 0 && (pending.start_ns / tick_ns).abs_diff(ticks) <= 1,
        "pending start {} ns, /proc start {ticks} ticks",
        pending.start_ns
    );

    // A verdict for another task that had this thread id (same tid and
    // digest, another start time: what the agent would write for a task that
    // died and whose tid was reused) does not release this one.
    let mut verdicts: HashMap<_, VerdictKey, Verdict> = HashMap::try_from(
        ebpf.map_mut(map_names::VERDICTS)
            .expect(map_names::VERDICTS),
    )
    .expect("hash map");
    let earlier_task = VerdictKey {
        tid,
        _pad: 0,
        digest: asked.header.digest,
        start_ns: pending.start_ns - 1_000_000,
    };
    let allow = Verdict {
        action: action::ALLOW,
        _pad: 0,
        expires_ns: boot_ns() + 30_000_000_000,
    };
    verdicts
        .insert(earlier_task, allow, 0)
        .expect("write verdict");
    let repaused = kernel::counter(&ebpf, counter::REPAUSED);
    let applied = kernel::counter(&ebpf, counter::VERDICTS_APPLIED);
    sigcont(pid);
    gatekeep_tests::wait_for("the task to stop again", Duration::from_secs(10), || {
        (kernel::counter(&ebpf, counter::REPAUSED) > repaused).then_some(())
    });
    wait_stopped(pid, Duration::from_secs(10));
    assert_eq!(
        kernel::counter(&ebpf, counter::VERDICTS_APPLIED),
        applied,
        "another task's verdict must not apply"
    );
    assert!(
        result.try_recv().is_err(),
        "the exec must still be paused, not run"
    );
    let verdicts: HashMap<_, VerdictKey, Verdict> =
        HashMap::try_from(ebpf.map(map_names::VERDICTS).expect(map_names::VERDICTS))
            .expect("hash map");
    assert!(
        verdicts.get(&earlier_task, 0).is_ok(),
        "the other task's verdict was not consumed"
    );

    // Its own verdict (its start time, from the pending entry) applies.
    deny(&mut ebpf, &asked);
    expect_denied(&result);
}

/// The workload's `net unix-connect NAME` in `cgroup` (as `uid`, if given):
/// it asks, the ask is denied; returns what it asked.
fn unix_connect_asked(
    ebpf: &mut Ebpf,
    cgroup: &Cgroup,
    uid: Option<&str>,
    name: &str,
) -> ConnectEvent {
    unix_connect_with_nuls_asked(ebpf, cgroup, uid, name, "0")
}

/// [`unix_connect_asked`] of the abstract `name` (`@NAME`) with `nuls` more
/// NULs within the connect's length.
fn unix_connect_with_nuls_asked(
    ebpf: &mut Ebpf,
    cgroup: &Cgroup,
    uid: Option<&str>,
    name: &str,
    nuls: &str,
) -> ConnectEvent {
    let mut args: Vec<&str> = uid.map_or_else(Vec::new, |uid| vec!["as-user", uid]);
    args.extend_from_slice(&["net", "unix-connect", name, nuls]);
    let mut child = cgroup.spawn(&mut workload::workload(&args));
    let asked: ConnectEvent = wait_event(ebpf, event_kind::CONNECT_ASK, Duration::from_secs(10));
    wait_stopped(asked.header.pid, Duration::from_secs(10));
    kernel::decide_paused(
        ebpf,
        asked.header.pid,
        asked.header.tid,
        asked.header.digest,
        action::DENY,
    );
    let outcome = workload::finish(&mut child, Duration::from_secs(10));
    assert_eq!(outcome.stdout, "errno 1", "{args:?}");
    asked
}

/// Runs the workload's `net unix-connect NAME` in `cgroup` (as `uid`, if
/// given) to its end: the line it printed.
fn unix_connect(cgroup: &Cgroup, uid: Option<&str>, name: &str) -> String {
    let mut args: Vec<&str> = uid.map_or_else(Vec::new, |uid| vec!["as-user", uid]);
    args.extend_from_slice(&["net", "unix-connect", name]);
    workload::line_of(Some(cgroup), &args)
}

#[test]
fn unix_socket_digests_cover_the_path_and_abstract_name() {
    use std::os::unix::{
        fs::PermissionsExt as _,
        net::{SocketAddr, UnixListener},
    };
    require_vm();
    let cgroup = Cgroup::create("gatekeep-grants-unix");
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ALLOW);
    // `unix = "ask"`.
    let mut policies: aya::maps::Array<_, gatekeep_common::PolicyDefaults> =
        aya::maps::Array::try_from(
            ebpf.map_mut(map_names::POLICIES)
                .expect(map_names::POLICIES),
        )
        .expect("array");
    let mut defaults = policies.get(&POLICY_ID, 0).expect("policy");
    defaults.unix_action = action::ASK;
    policies.set(POLICY_ID, defaults, 0).expect("set policy");

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (a, b) = (path("a.sock"), path("b.sock"));
    let mut listeners = Vec::new();
    for socket in [&a, &b] {
        listeners.push(UnixListener::bind(socket).expect("bind"));
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o777))
            .expect("chmod the socket");
    }
    for name in ["gk-abstract-a", "gk-abstract-b"] {
        let address = <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name)
            .expect("abstract name");
        listeners.push(UnixListener::bind_addr(&address).expect("bind abstract"));
    }

    // Four names, four requests: the digest tells every one apart, and the
    // request shows each as it was hashed.
    let asked_a = unix_connect_asked(&mut ebpf, &cgroup, None, &a);
    let asked_b = unix_connect_asked(&mut ebpf, &cgroup, None, &b);
    let asked_x = unix_connect_asked(&mut ebpf, &cgroup, None, "@gk-abstract-a");
    let asked_y = unix_connect_asked(&mut ebpf, &cgroup, None, "@gk-abstract-b");
    // An abstract name with trailing NULs within its length is another socket.
    let asked_x_nuls =
        unix_connect_with_nuls_asked(&mut ebpf, &cgroup, None, "@gk-abstract-a", "2");
    let digests = [
        asked_a.header.digest,
        asked_b.header.digest,
        asked_x.header.digest,
        asked_y.header.digest,
        asked_x_nuls.header.digest,
    ];
    for (i, left) in digests.iter().enumerate() {
        for right in &digests[i + 1..] {
            assert_ne!(left, right, "two socket names, one digest: {digests:x?}");
        }
    }
    let shown = |event: &ConnectEvent| event.unix_path.to_vec();
    let mut expected_a = a.as_bytes().to_vec();
    expected_a.resize(108, 0);
    assert_eq!(shown(&asked_a), expected_a, "the path, zero past its end");
    let mut expected_x = b"\0gk-abstract-a".to_vec();
    expected_x.resize(108, 0);
    assert_eq!(
        shown(&asked_x),
        expected_x,
        "the abstract name, nothing past its length"
    );
    // The record says how long each name is, so its reader can show an
    // abstract name's trailing NULs (a pathname connect passes all 108 bytes).
    assert_eq!(asked_a.unix_len, 108, "a pathname's whole sun_path");
    assert_eq!(asked_x.unix_len, 14, "NUL + gk-abstract-a");
    assert_eq!(shown(&asked_x_nuls), expected_x, "the same bytes");
    assert_eq!(asked_x_nuls.unix_len, 16, "NUL + gk-abstract-a + 2 NULs");
    // The same name asks with the same digest (root or not).
    let again = unix_connect_asked(&mut ebpf, &cgroup, Some("65534"), &a);
    assert_eq!(again.header.digest, asked_a.header.digest);

    // A grant for a.sock (this workload's) lets it through, as root and as
    // nobody; b.sock and the abstract names are still asked.
    let mut grants: HashMap<_, GrantKey, Grant> =
        HashMap::try_from(ebpf.map_mut(map_names::GRANTS).expect(map_names::GRANTS))
            .expect("hash map");
    grants
        .insert(
            GrantKey {
                policy_id: POLICY_ID,
                kind: request_kind::CONNECT,
                digest: asked_a.header.digest,
                cgroup_id: cgroup.id(),
            },
            Grant {
                expires_ns: 0,
                cgroup_id: cgroup.id(),
            },
            0,
        )
        .expect("write grant");
    let before = kernel::counter(&ebpf, counter::GRANT_ALLOWED);
    assert_eq!(unix_connect(&cgroup, None, &a), "ok");
    assert_eq!(unix_connect(&cgroup, Some("65534"), &a), "ok");
    assert_eq!(kernel::counter(&ebpf, counter::GRANT_ALLOWED), before + 2);
    for (uid, name, digest) in [
        (None, b.as_str(), asked_b.header.digest),
        (Some("65534"), b.as_str(), asked_b.header.digest),
        (None, "@gk-abstract-a", asked_x.header.digest),
        (Some("65534"), "@gk-abstract-b", asked_y.header.digest),
    ] {
        let asked = unix_connect_asked(&mut ebpf, &cgroup, uid, name);
        assert_eq!(asked.header.digest, digest, "{name} as {uid:?}");
    }
    assert_eq!(
        kernel::counter(&ebpf, counter::GRANT_ALLOWED),
        before + 2,
        "the grant for a.sock let nothing else through"
    );
    drop(listeners);
}
