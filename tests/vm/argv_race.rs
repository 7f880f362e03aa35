//! The argv race (issue 19, item 3), won on purpose: the kernel copies one
//! argv for the new program, and the exec hook, reading the caller's memory
//! a moment later, finds another. A grant for the argv the hook saw must
//! not let the other one run.
//!
//! The race is made deterministic with userfaultfd, as root inside the gated
//! cgroup: `copy_strings()` copies argv from the last argument to the
//! first, so argv[1] is copied before argv[0]'s page is touched; that page
//! is registered missing, and the fault handler writes the shown word over
//! argv[1] before it supplies the page. The kernel has the run word; the
//! hook reads the shown one.
//!
//! The bound environment (`LD_*`) is raced the same way: the kernel copies
//! it before argv, so it too is copied when argv[0]'s page faults.
//!
//! The workload half is [`exec_swapped`] and [`exec_swapped_env`], reached
//! as `exec-swapped PATH ARG0 SHOWN RUN` and `exec-swapped-env PATH ARG0
//! ARG1 NAME SHOWN RUN` (see `workload.rs`).

use std::{ffi::CString, path::Path, time::Duration};

use aya::{Ebpf, maps::HashMap};
use gatekeep_common::{
    ExecEvent, Grant, GrantKey, TaskEvent, action, counter, event_kind, map_names, request_kind,
};
use gatekeep_tests::{
    Cgroup,
    kernel::{self, attach_gating, exec_rule_on, exec_rule_on_busybox_copy, wait_event},
    require_vm, wait_stopped,
    workload::{Outcome, finish, run_in, workload},
};

const POLICY_ID: u32 = 5;
const TIMEOUT: Duration = Duration::from_secs(30);

/// Asks once for `exec-swapped PATH ARG0 WORD WORD` (no swap), denies that
/// request, grants its digest and returns the request.
fn grant_unswapped(ebpf: &mut Ebpf, cgroup: &Cgroup, path: &str, arg0: &str) -> ExecEvent {
    let mut child = cgroup.spawn(&mut workload(&["exec-swapped", path, arg0, "SAFE", "SAFE"]));
    let asked: ExecEvent = wait_event(ebpf, event_kind::EXEC_ASK, TIMEOUT);
    wait_stopped(asked.header.pid, TIMEOUT);
    assert_eq!(
        kernel::event_argv(&asked),
        [arg0, "SAFE"],
        "what the hook read"
    );
    kernel::decide_paused(
        ebpf,
        asked.header.pid,
        asked.header.tid,
        asked.header.digest,
        action::DENY,
    );
    assert_eq!(finish(&mut child, TIMEOUT), Outcome::exec_denied());
    grant(ebpf, asked.header.digest);
    asked
}

/// A policy-wide, unexpiring grant of the exec request `digest`.
fn grant(ebpf: &mut Ebpf, digest: u64) {
    let mut grants: HashMap<_, GrantKey, Grant> =
        HashMap::try_from(ebpf.map_mut(map_names::GRANTS).expect(map_names::GRANTS))
            .expect("hash map");
    let key = GrantKey {
        policy_id: POLICY_ID,
        kind: request_kind::EXEC,
        digest,
        cgroup_id: 0,
    };
    let grant = Grant {
        expires_ns: 0,
        cgroup_id: 0,
    };
    grants.insert(key, grant, 0).expect("write grant");
}

/// The granted argv runs; the same exec with argv[1] swapped under the
/// hook is killed before its program runs, and reported.
fn granted_runs_and_swapped_is_killed(ebpf: &mut Ebpf, cgroup: &Cgroup, path: &str, arg0: &str) {
    let granted = grant_unswapped(ebpf, cgroup, path, arg0);

    let before = kernel::counter(ebpf, counter::GRANT_ALLOWED);
    let ran = run_in(
        cgroup,
        &["exec-swapped", path, arg0, "SAFE", "SAFE"],
        TIMEOUT,
    );
    assert_eq!(
        ran,
        Outcome::new(0, "SAFE"),
        "the granted argv runs ({path})"
    );
    assert!(kernel::counter(ebpf, counter::GRANT_ALLOWED) > before);

    let changed = kernel::counter(ebpf, counter::EXEC_ARGV_CHANGED);
    let granted_again = kernel::counter(ebpf, counter::GRANT_ALLOWED);
    let swapped = run_in(
        cgroup,
        &["exec-swapped", path, arg0, "SAFE", "EVIL"],
        TIMEOUT,
    );
    assert!(
        kernel::counter(ebpf, counter::GRANT_ALLOWED) > granted_again,
        "the hook saw the granted argv (the race was won): {swapped:?}"
    );
    assert!(
        !swapped.stdout.contains("EVIL"),
        "the swapped argv ran under the grant ({path}): {swapped:?}"
    );
    assert_eq!(
        swapped,
        Outcome::new(-1, ""),
        "killed before the new program ran ({path})"
    );
    assert_eq!(
        kernel::counter(ebpf, counter::EXEC_ARGV_CHANGED),
        changed + 1
    );
    let killed: TaskEvent = wait_event(ebpf, event_kind::EXEC_ARGV_CHANGED, TIMEOUT);
    assert_eq!(
        killed.header.digest, granted.header.digest,
        "the granted request"
    );
    assert_eq!(killed.request_kind, request_kind::EXEC);
}

#[test]
fn argv_changed_after_the_hook_read_it_is_killed_before_it_runs() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-argv-race");
    // Exec allowed by default (the workload runs); an ask rule on a busybox
    // copy, run as its `echo` applet.
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ALLOW);
    let tool = exec_rule_on_busybox_copy(&mut ebpf, POLICY_ID, "gk-argv-race", action::ASK);
    granted_runs_and_swapped_is_killed(
        &mut ebpf,
        &cgroup,
        tool.to_str().expect("utf-8 path"),
        "echo",
    );

    // A script: its interpreter runs with [/bin/sh, script, argv[1..]], and
    // argv[1..] is what is compared.
    let script = Path::new("/tmp/gk-argv-race.sh");
    std::fs::write(script, "#!/bin/sh\necho \"$@\"\n").expect("write script");
    std::fs::set_permissions(script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod script");
    exec_rule_on(&mut ebpf, POLICY_ID, script, action::ASK);
    granted_runs_and_swapped_is_killed(
        &mut ebpf,
        &cgroup,
        script.to_str().expect("utf-8 path"),
        "gk-argv-race.sh",
    );
}

/// The bound environment raced the same way: the kernel copies the
/// environment before argv, so the fault on argv[0] comes after it, and the
/// hook reads the variable the handler rewrote. A grant for the shown value
/// must not let the copied one run. The program is a busybox copy's `env`,
/// which prints its environment: that one variable.
#[test]
fn bound_environment_changed_after_the_hook_read_it_is_killed_before_it_runs() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-env-race");
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ALLOW);
    let tool = exec_rule_on_busybox_copy(&mut ebpf, POLICY_ID, "gk-env-race", action::ASK);
    let path = tool.to_str().expect("utf-8 path");
    // `LD_*` is always bound; the loader ignores a name it does not know.
    let run = |shown: &str, ran: &str| {
        workload(&[
            "exec-swapped-env",
            path,
            "env",
            // Unsets a variable that is not there: `env` prints the rest.
            "-uGK_NONE",
            "LD_GK_MODE",
            shown,
            ran,
        ])
    };

    let mut child = cgroup.spawn(&mut run("SAFE", "SAFE"));
    let asked: ExecEvent = wait_event(&mut ebpf, event_kind::EXEC_ASK, TIMEOUT);
    wait_stopped(asked.header.pid, TIMEOUT);
    assert_eq!(kernel::event_argv(&asked), ["env", "-uGK_NONE"]);
    assert_eq!(
        kernel::event_env(&asked),
        ["LD_GK_MODE=SAFE"],
        "what the hook read"
    );
    kernel::decide_paused(
        &mut ebpf,
        asked.header.pid,
        asked.header.tid,
        asked.header.digest,
        action::DENY,
    );
    assert_eq!(finish(&mut child, TIMEOUT), Outcome::exec_denied());
    grant(&mut ebpf, asked.header.digest);

    let before = kernel::counter(&ebpf, counter::GRANT_ALLOWED);
    let ran = finish(&mut cgroup.spawn(&mut run("SAFE", "SAFE")), TIMEOUT);
    assert_eq!(
        ran,
        Outcome::new(0, "LD_GK_MODE=SAFE"),
        "the granted environment runs"
    );
    assert!(kernel::counter(&ebpf, counter::GRANT_ALLOWED) > before);

    // As root, then as nobody (userfaultfd of kernel-mode faults needs
    // `vm.unprivileged_userfaultfd` for an unprivileged user).
    let _sysctl = Sysctl::set("/proc/sys/vm/unprivileged_userfaultfd", "1");
    for uid in [None, Some("65534")] {
        let argv_changed = kernel::counter(&ebpf, counter::EXEC_ARGV_CHANGED);
        let env_changed = kernel::counter(&ebpf, counter::EXEC_ENV_CHANGED);
        let granted = kernel::counter(&ebpf, counter::GRANT_ALLOWED);
        let mut command = run("SAFE", "EVIL");
        if let Some(uid) = uid {
            command = workload(
                &[
                    &["as-user", uid][..],
                    &["exec-swapped-env", path, "env", "-uGK_NONE", "LD_GK_MODE"],
                    &["SAFE", "EVIL"],
                ]
                .concat(),
            );
        }
        let swapped = finish(&mut cgroup.spawn(&mut command), TIMEOUT);
        assert!(
            kernel::counter(&ebpf, counter::GRANT_ALLOWED) > granted,
            "the hook saw the granted environment (the race was won) as {uid:?}: {swapped:?}"
        );
        assert!(
            !swapped.stdout.contains("EVIL"),
            "the swapped environment ran under the grant as {uid:?}: {swapped:?}"
        );
        assert_eq!(
            swapped,
            Outcome::new(-1, ""),
            "killed before it ran, as {uid:?}"
        );
        assert_eq!(
            (
                kernel::counter(&ebpf, counter::EXEC_ENV_CHANGED),
                kernel::counter(&ebpf, counter::EXEC_ARGV_CHANGED)
            ),
            (env_changed + 1, argv_changed),
            "reported as a changed environment, not argv"
        );
        let killed: TaskEvent = wait_event(&mut ebpf, event_kind::EXEC_ENV_CHANGED, TIMEOUT);
        assert_eq!(
            killed.header.digest, asked.header.digest,
            "the granted request"
        );
    }
}

/// A sysctl set for a test, put back as it was when dropped.
struct Sysctl {
    path: &'static str,
    before: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Self {
        let before = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        std::fs::write(path, value).unwrap_or_else(|e| panic!("write {path}: {e}"));
        Self { path, before }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.before.trim());
    }
}

// ---------------------------------------------------------------------------
// The workload half.

/// `struct uffdio_api` (linux/userfaultfd.h).
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

const UFFD_API: u64 = 0xAA;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const PAGE: usize = 4096;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

/// An anonymous read-write page.
fn anonymous_page() -> Option<*mut u8> {
    // SAFETY: a fresh private mapping, no address hint.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    (page != libc::MAP_FAILED).then_some(page.cast())
}

/// `exec-swapped PATH ARG0 SHOWN RUN`: execs PATH with argv `[ARG0, W]`,
/// where the kernel copies W = RUN and the exec hook then reads W = SHOWN
/// (see the module's comment). With SHOWN = RUN it is a plain exec with the
/// same memory layout. Prints `errno N` (exit 111) if the exec fails.
pub fn exec_swapped(words: &[String]) -> i32 {
    let [path, arg0, shown, run] = words else {
        return 2;
    };
    if shown.len() != run.len() {
        return 2;
    }
    let Some(word) = anonymous_page() else {
        println!("mmap: errno {}", errno());
        return 3;
    };
    // SAFETY: `word` is a fresh page, and RUN fits in it with its NUL.
    unsafe { std::ptr::copy_nonoverlapping(run.as_ptr(), word, run.len()) };
    let swap = Swap {
        at: word as usize,
        shown: shown.clone().into_bytes(),
    };
    exec_racing(path, arg0, &[word.cast_const()], None, swap)
}

/// `exec-swapped-env PATH ARG0 ARG1 NAME SHOWN RUN`: execs PATH with argv
/// `[ARG0, ARG1]` and the environment `[NAME=V]` alone, where the kernel
/// copies V = RUN (the environment is copied before argv) and the exec hook
/// then reads V = SHOWN.
pub fn exec_swapped_env(words: &[String]) -> i32 {
    let [path, arg0, arg1, name, shown, run] = words else {
        return 2;
    };
    let assignment = format!("{name}={run}");
    if shown.len() != run.len() || assignment.len() >= PAGE {
        return 2;
    }
    let (Some(variable), Some(second)) = (anonymous_page(), anonymous_page()) else {
        println!("mmap: errno {}", errno());
        return 3;
    };
    // SAFETY: fresh pages, and each string fits in its page with its NUL.
    unsafe {
        std::ptr::copy_nonoverlapping(assignment.as_ptr(), variable, assignment.len());
        std::ptr::copy_nonoverlapping(arg1.as_ptr(), second, arg1.len().min(PAGE - 1));
    }
    let swap = Swap {
        at: variable as usize + name.len() + 1,
        shown: shown.clone().into_bytes(),
    };
    exec_racing(
        path,
        arg0,
        &[second.cast_const()],
        Some(&[variable.cast_const()]),
        swap,
    )
}

/// What the fault handler writes, and where: over a string the kernel has
/// already copied.
struct Swap {
    at: usize,
    shown: Vec<u8>,
}

/// Execs `path` with argv `[arg0, rest...]` and `envp` (the current
/// environment when `None`), where argv[0]'s page is registered missing
/// with userfaultfd: the kernel copies every other string first, then
/// faults on argv[0], and the handler applies `swap` before it supplies
/// the page. Returns only if the exec fails (`errno N`, 111).
fn exec_racing(
    path: &str,
    arg0: &str,
    rest: &[*const u8],
    envp: Option<&[*const u8]>,
    swap: Swap,
) -> i32 {
    if arg0.len() >= PAGE {
        return 2;
    }
    let Some(lazy) = anonymous_page() else {
        println!("mmap: errno {}", errno());
        return 3;
    };
    // argv[0]'s page is what UFFDIO_COPY supplies.
    let mut source = vec![0u8; PAGE];
    source[..arg0.len()].copy_from_slice(arg0.as_bytes());
    // SAFETY: the userfaultfd syscall and its ioctls, with the structures
    // the kernel defines; the range registered is the page mapped above.
    let uffd = unsafe {
        let uffd =
            i32::try_from(libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC)).unwrap_or(-1);
        if uffd < 0 {
            println!("userfaultfd: errno {}", errno());
            return 3;
        }
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        let mut register = UffdioRegister {
            start: lazy as u64,
            len: PAGE as u64,
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        if libc::ioctl(uffd, UFFDIO_API, &raw mut api) != 0
            || libc::ioctl(uffd, UFFDIO_REGISTER, &raw mut register) != 0
        {
            println!("uffd ioctl: errno {}", errno());
            return 3;
        }
        uffd
    };
    let lazy_at = lazy as usize;
    std::thread::spawn(move || {
        let mut message = [0u8; 32];
        // SAFETY: reads one `struct uffd_msg` (32 bytes): the fault.
        let read = unsafe { libc::read(uffd, message.as_mut_ptr().cast(), message.len()) };
        if read != 32 {
            return;
        }
        for (i, byte) in swap.shown.iter().enumerate() {
            // SAFETY: inside a string's page, which lives until execve
            // replaces the image.
            unsafe { std::ptr::write_volatile((swap.at as *mut u8).add(i), *byte) };
        }
        let mut copy = UffdioCopy {
            dst: lazy_at as u64,
            src: source.as_ptr() as u64,
            len: PAGE as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: supplies the registered page from `source`.
        unsafe { libc::ioctl(uffd, UFFDIO_COPY, &raw mut copy) };
    });
    let path = CString::new(path).unwrap_or_default();
    let pointers: Vec<*const libc::c_char> = std::iter::once(lazy.cast_const())
        .chain(rest.iter().copied())
        .map(<*const u8>::cast::<libc::c_char>)
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // SAFETY: NUL-terminated strings (zeroed pages past the words) and
    // NULL-terminated arrays that outlive the call.
    unsafe {
        match envp {
            None => libc::execv(path.as_ptr(), pointers.as_ptr()),
            Some(envp) => {
                let envp: Vec<*const libc::c_char> = envp
                    .iter()
                    .copied()
                    .map(<*const u8>::cast::<libc::c_char>)
                    .chain(std::iter::once(std::ptr::null()))
                    .collect();
                libc::execve(path.as_ptr(), pointers.as_ptr(), envp.as_ptr())
            }
        }
    };
    println!("errno {}", errno());
    111
}
