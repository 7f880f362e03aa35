//! Code that runs without an exec (issue 19, item 2), tried as the workload
//! would: as root inside the gated cgroup, and unprivileged (`as-user 65534`).
//!
//! - ld.so handed a denied program (`/lib64/ld-linux-x86-64.so.2 /denied`)
//!   maps it itself: the mapping meets the program's deny rule;
//! - `LD_PRELOAD` of a denied library, `dlopen` of one, and a plain `mmap` or
//!   `mprotect` with `PROT_EXEC` of a denied file are refused;
//! - an allowed program linking libc dynamically still runs (libraries no rule
//!   names map freely by default), and under `unlisted_mappings = "default"`
//!   with `default = "deny"` only the listed libraries load;
//! - an exec of a file with no name on disk (memfd, a deleted file) gets the
//!   policy's `fileless` action: denied by default, asked marked fileless.
//!
//! Driven through the maps (no agent), like `truncated.rs`. The workload half
//! is [`run`], reached as `code COMMAND ...` (see `workload.rs`).

use std::{
    ffi::CString,
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, RingBuf},
};
use gatekeep_common::{
    ExecEvent, ExecRule, ExecRuleKey, PolicyDefaults, action, event_kind, exec_flags, map_names,
};
use gatekeep_tests::{
    Cgroup,
    kernel::{self, attach_gating, drain_events, kernel_dev, wait_event},
    require_vm, wait_stopped,
    workload::{self, Outcome, finish, run_in, workload},
};

const POLICY_ID: u32 = 6;
const TIMEOUT: Duration = Duration::from_secs(30);
/// Unprivileged: `nobody`.
const NOBODY: &str = "65534";
/// The dynamic loader the VM's programs use (`ldd` put it there).
const LD_SO: &str = "/lib64/ld-linux-x86-64.so.2";
/// A library of the workload's (`ldd`), copied to make denied and allowed ones.
const LIBM: &str = "/lib/x86_64-linux-gnu/libm.so.6";
/// Every library the workload binary loads (`ldd` of the VM test binary).
const WORKLOAD_LIBS: &[&str] = &[
    LD_SO,
    "/lib/x86_64-linux-gnu/libc.so.6",
    LIBM,
    "/lib/x86_64-linux-gnu/libgcc_s.so.1",
];

// ---------------------------------------------------------------------------
// The workload's commands.

/// `code COMMAND ...`:
/// - `dlopen PATH`: `dlopen(PATH, RTLD_NOW)`: `ok` (exit 0) or `dlerror X` (exit 1);
/// - `mmap-exec PATH`: `mmap` of PATH's first page with `PROT_READ | PROT_EXEC`;
/// - `mprotect-exec PATH`: `mmap` with `PROT_READ`, then `mprotect` adding
///   `PROT_EXEC`; both print `ok` (exit 0) or `errno N` (exit 1);
/// - `maps-has NAME`: `mapped` or `not mapped` (exit 0): whether an
///   executable mapping of this process names NAME (`/proc/self/maps`; ld.so
///   may leave a library's first, read-only segment mapped when it cannot map
///   its code);
/// - `memfd-exec NAME PATH ARG0 [ARGS...]`: copies PATH into a memfd named
///   NAME and `fexecve`s it; `deleted-exec PATH ARG0 [ARGS...]` opens PATH,
///   unlinks it and execs the open file (`execveat(AT_EMPTY_PATH)`); on
///   failure both print `errno N` and exit 111.
pub fn run(args: &[String]) -> i32 {
    let arg = |i: usize| args.get(i).map_or("", String::as_str);
    match arg(0) {
        "dlopen" => dlopen(arg(1)),
        "mmap-exec" => report(map_exec(arg(1), false)),
        "mprotect-exec" => report(map_exec(arg(1), true)),
        "maps-has" => {
            let maps = fs::read_to_string("/proc/self/maps").unwrap_or_default();
            let code = maps.lines().any(|line| {
                line.contains(arg(1))
                    && line
                        .split_whitespace()
                        .nth(1)
                        .is_some_and(|perms| perms.contains('x'))
            });
            if code {
                println!("mapped");
            } else {
                println!("not mapped");
            }
            0
        }
        "memfd-exec" if args.len() >= 4 => memfd_exec(arg(1), arg(2), &args[3..]),
        "deleted-exec" if args.len() >= 3 => deleted_exec(arg(1), &args[2..]),
        _ => {
            println!("unknown code command {args:?}");
            2
        }
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

fn report(result: Result<(), i32>) -> i32 {
    match result {
        Ok(()) => {
            println!("ok");
            0
        }
        Err(errno) => {
            println!("errno {errno}");
            1
        }
    }
}

fn dlopen(path: &str) -> i32 {
    let path = CString::new(path).unwrap_or_default();
    // SAFETY: a NUL-terminated path; the handle is left open until exit.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
    if handle.is_null() {
        // SAFETY: dlerror returns a NUL-terminated string or NULL.
        let error = unsafe {
            let text = libc::dlerror();
            if text.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr(text)
                    .to_string_lossy()
                    .into_owned()
            }
        };
        println!("dlerror {error}");
        return 1;
    }
    println!("ok");
    0
}

fn map_exec(path: &str, mprotect: bool) -> Result<(), i32> {
    let file = fs::File::open(path).map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let prot = if mprotect {
        libc::PROT_READ
    } else {
        libc::PROT_READ | libc::PROT_EXEC
    };
    // SAFETY: a private mapping of one page of an open file, never touched.
    let at = unsafe { libc::mmap(std::ptr::null_mut(), 4096, prot, libc::MAP_PRIVATE, fd, 0) };
    if at == libc::MAP_FAILED {
        return Err(last_errno());
    }
    if mprotect {
        // SAFETY: the page mapped above.
        if unsafe { libc::mprotect(at, 4096, libc::PROT_READ | libc::PROT_EXEC) } != 0 {
            return Err(last_errno());
        }
    }
    Ok(())
}

fn argv_of(args: &[String]) -> (Vec<CString>, Vec<*const libc::c_char>) {
    let owned: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_bytes()).unwrap_or_default())
        .collect();
    let mut ptrs: Vec<*const libc::c_char> = owned.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    (owned, ptrs)
}

fn memfd_exec(name: &str, path: &str, argv: &[String]) -> i32 {
    let Ok(bytes) = fs::read(path) else {
        println!("cannot read {path}");
        return 2;
    };
    let name = CString::new(name).unwrap_or_default();
    // SAFETY: a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    if fd < 0 {
        println!("memfd_create errno {}", last_errno());
        return 3;
    }
    // SAFETY: writes `bytes` to the memfd made above.
    let written = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    if usize::try_from(written).ok() != Some(bytes.len()) {
        println!("write errno {}", last_errno());
        return 3;
    }
    let (_owned, ptrs) = argv_of(argv);
    // SAFETY: NULL-terminated argv of live strings; `environ` is the process's.
    unsafe { libc::fexecve(fd, ptrs.as_ptr(), environ()) };
    println!("errno {}", last_errno());
    111
}

fn deleted_exec(path: &str, argv: &[String]) -> i32 {
    let Ok(file) = fs::File::open(path) else {
        println!("cannot open {path}");
        return 2;
    };
    if fs::remove_file(path).is_err() {
        println!("cannot unlink {path}");
        return 2;
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let (_owned, ptrs) = argv_of(argv);
    let empty = c"";
    // SAFETY: NULL-terminated argv of live strings; `fd` is open.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd,
            empty.as_ptr(),
            ptrs.as_ptr(),
            environ(),
            libc::AT_EMPTY_PATH,
        )
    };
    println!("errno {}", last_errno());
    111
}

fn environ() -> *const *const libc::c_char {
    unsafe extern "C" {
        static environ: *const *const libc::c_char;
    }
    // SAFETY: reading the C library's environment pointer.
    unsafe { environ }
}

// ---------------------------------------------------------------------------
// The tests.

/// A fresh folder of copies, readable and runnable by everyone.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new("/tmp").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("scratch folder");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// Copies `src` to `dir/name` (a new inode), mode 0755.
fn copy(src: &str, dir: &Path, name: &str) -> PathBuf {
    let dest = dir.join(name);
    fs::copy(src, &dest).expect("copy");
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).expect("chmod");
    dest
}

/// Gives the file at `path` (symlinks followed) `action` under the policy,
/// bound to its content now, as the agent binds a rule at load.
fn rule(ebpf: &mut Ebpf, path: &Path, action: u32) {
    let meta = fs::metadata(path).expect("stat the rule's file");
    let mut rules: HashMap<_, ExecRuleKey, ExecRule> = HashMap::try_from(
        ebpf.map_mut(map_names::EXEC_RULES)
            .expect(map_names::EXEC_RULES),
    )
    .expect("hash map");
    let key = ExecRuleKey {
        policy_id: POLICY_ID,
        _pad: 0,
        dev: kernel_dev(meta.dev()),
        ino: meta.ino(),
    };
    let (content, flags) = gatekeep_agent::hooks::exec::content_version(&meta, None);
    rules
        .insert(
            key,
            ExecRule {
                action,
                flags,
                content,
            },
            0,
        )
        .expect("exec rule");
}

/// Changes the policy's defaults.
fn set_defaults(ebpf: &mut Ebpf, change: impl FnOnce(&mut PolicyDefaults)) {
    let mut policies: Array<_, PolicyDefaults> = Array::try_from(
        ebpf.map_mut(map_names::POLICIES)
            .expect(map_names::POLICIES),
    )
    .expect("array");
    let mut defaults = policies.get(&POLICY_ID, 0).expect("policy");
    change(&mut defaults);
    policies.set(POLICY_ID, defaults, 0).expect("set policy");
}

/// Every exec event now on the ring buffer.
fn exec_events(ebpf: &mut Ebpf) -> Vec<ExecEvent> {
    let mut ring = RingBuf::try_from(ebpf.map_mut(map_names::EVENTS).expect(map_names::EVENTS))
        .expect("ring buffer");
    drain_events(&mut ring, &[event_kind::EXEC_ASK, event_kind::EXEC_DENIED])
}

/// The text of a NUL-terminated event field.
fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The workload command `args`, as `uid` if given.
fn as_user<'a>(uid: Option<&'a str>, args: &[&'a str]) -> Vec<&'a str> {
    let mut all: Vec<&str> = uid.map_or_else(Vec::new, |uid| vec!["as-user", uid]);
    all.extend_from_slice(args);
    all
}

/// Checks that the only mapping refusal since the last drain is one of
/// `file`, flagged as mapped, named by its file name.
fn expect_mapping_denied(ebpf: &mut Ebpf, file: &Path, what: &str) {
    let meta = fs::metadata(file).expect("stat");
    let denials: Vec<ExecEvent> = exec_events(ebpf)
        .into_iter()
        .filter(|e| e.header.kind == event_kind::EXEC_DENIED)
        .collect();
    assert!(
        denials.iter().any(|e| e.flags == exec_flags::MAPPED
            && e.ino == meta.ino()
            && e.dev == kernel_dev(meta.dev())
            && e.argv_len == 0
            && text(&e.filename) == file.file_name().expect("file name").to_string_lossy()),
        "{what}: no mapping denial of {} among {} denial(s)",
        file.display(),
        denials.len()
    );
    assert!(
        denials.iter().all(|e| e.flags == exec_flags::MAPPED),
        "{what}: an exec was denied too"
    );
}

#[test]
fn files_mapped_as_code_meet_their_exec_rules_as_root_and_unprivileged() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-mapped");
    // A deny-list: everything runs but what a rule denies.
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ALLOW);
    let dir = scratch("gatekeep-mapped");
    let program = workload::workload_path();
    let program = program.as_str();
    let denied_bin = copy(program, &dir, "denied-bin");
    let allowed_bin = copy(program, &dir, "allowed-bin");
    let denied_lib = copy(LIBM, &dir, "libdenied.so");
    let allowed_lib = copy(LIBM, &dir, "liballowed.so");
    let asked_lib = copy(LIBM, &dir, "libasked.so");
    rule(&mut ebpf, &denied_bin, action::DENY);
    rule(&mut ebpf, &denied_lib, action::DENY);
    rule(&mut ebpf, &asked_lib, action::ASK);
    rule(&mut ebpf, &allowed_lib, action::ALLOW);
    let (denied_bin, allowed_bin) = (denied_bin.to_str().unwrap(), allowed_bin.to_str().unwrap());
    let (denied_lib, allowed_lib, asked_lib) = (
        denied_lib.to_str().unwrap(),
        allowed_lib.to_str().unwrap(),
        asked_lib.to_str().unwrap(),
    );

    for uid in [None, Some(NOBODY)] {
        let who = uid.unwrap_or("root");
        let _ = exec_events(&mut ebpf);

        // The workload itself links libc dynamically and runs: unlisted
        // libraries map freely.
        let outcome = run_in(
            &cgroup,
            &as_user(uid, &["code", "maps-has", "libc.so.6"]),
            TIMEOUT,
        );
        assert_eq!(
            outcome,
            Outcome::new(0, "mapped"),
            "{who}: a dynamic program runs"
        );

        // ld.so handed the denied program maps it itself: refused, it never runs.
        let outcome = run_in(
            &cgroup,
            &as_user(
                uid,
                &["exec", LD_SO, "ld.so", denied_bin, "code", "maps-has", "x"],
            ),
            TIMEOUT,
        );
        outcome.assert_no_513();
        assert_ne!(
            outcome.code, 0,
            "{who}: ld.so ran the denied program: {outcome:?}"
        );
        assert!(
            !outcome.stdout.contains("mapped"),
            "{who}: the denied program ran under ld.so: {outcome:?}"
        );
        expect_mapping_denied(&mut ebpf, Path::new(denied_bin), &format!("{who}: ld.so"));
        // The same with a copy no rule names runs (the control).
        let outcome = run_in(
            &cgroup,
            &as_user(
                uid,
                &[
                    "exec",
                    LD_SO,
                    "ld.so",
                    allowed_bin,
                    "code",
                    "maps-has",
                    "ld-linux",
                ],
            ),
            TIMEOUT,
        );
        assert_eq!(
            outcome,
            Outcome::new(0, "mapped"),
            "{who}: ld.so runs an allowed program"
        );
        // The denied program exec'd directly is denied at exec, as ever.
        let outcome = run_in(&cgroup, &as_user(uid, &["exec", denied_bin, "x"]), TIMEOUT);
        assert_eq!(outcome, Outcome::exec_denied(), "{who}: direct exec");
        let _ = exec_events(&mut ebpf);

        // dlopen: the denied library fails to load, the allowed one loads;
        // an ask rule refuses a mapping (never paused).
        let outcome = run_in(
            &cgroup,
            &as_user(uid, &["code", "dlopen", denied_lib]),
            TIMEOUT,
        );
        assert!(
            outcome.code == 1 && outcome.stdout.starts_with("dlerror "),
            "{who}: dlopen of a denied library: {outcome:?}"
        );
        expect_mapping_denied(&mut ebpf, Path::new(denied_lib), &format!("{who}: dlopen"));
        let outcome = run_in(
            &cgroup,
            &as_user(uid, &["code", "dlopen", asked_lib]),
            TIMEOUT,
        );
        assert!(
            outcome.code == 1 && outcome.stdout.starts_with("dlerror "),
            "{who}: dlopen of an asked library: {outcome:?}"
        );
        expect_mapping_denied(&mut ebpf, Path::new(asked_lib), &format!("{who}: ask"));
        let outcome = run_in(
            &cgroup,
            &as_user(uid, &["code", "dlopen", allowed_lib]),
            TIMEOUT,
        );
        assert_eq!(
            outcome,
            Outcome::new(0, "ok"),
            "{who}: dlopen of an allowed library"
        );

        // mmap and mprotect with PROT_EXEC, by hand.
        let outcome = run_in(
            &cgroup,
            &as_user(uid, &["code", "mmap-exec", denied_lib]),
            TIMEOUT,
        );
        assert_eq!(outcome, Outcome::new(1, "errno 1"), "{who}: mmap PROT_EXEC");
        let outcome = run_in(
            &cgroup,
            &as_user(uid, &["code", "mprotect-exec", denied_lib]),
            TIMEOUT,
        );
        assert_eq!(
            outcome,
            Outcome::new(1, "errno 1"),
            "{who}: mprotect PROT_EXEC"
        );
        expect_mapping_denied(&mut ebpf, Path::new(denied_lib), &format!("{who}: mmap"));
        let outcome = run_in(
            &cgroup,
            &as_user(uid, &["code", "mprotect-exec", allowed_lib]),
            TIMEOUT,
        );
        assert_eq!(
            outcome,
            Outcome::new(0, "ok"),
            "{who}: mprotect of an allowed file"
        );

        // LD_PRELOAD: ld.so cannot map the denied library and goes on without it.
        let preloaded = |lib: &str| {
            let mut command = workload(&as_user(uid, &["code", "maps-has", lib]));
            command.env("LD_PRELOAD", lib);
            finish(&mut cgroup.spawn(&mut command), TIMEOUT)
        };
        assert_eq!(
            preloaded(denied_lib),
            Outcome::new(0, "not mapped"),
            "{who}: LD_PRELOAD of a denied library"
        );
        expect_mapping_denied(
            &mut ebpf,
            Path::new(denied_lib),
            &format!("{who}: LD_PRELOAD"),
        );
        assert_eq!(
            preloaded(allowed_lib),
            Outcome::new(0, "mapped"),
            "{who}: LD_PRELOAD of an allowed library"
        );
    }

    // Outside the gated cgroup, the rules reach nothing.
    assert_eq!(
        workload::line_of(None, &["code", "dlopen", denied_lib]),
        "ok",
        "dlopen outside the gated cgroup"
    );
    drop(ebpf);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn an_allow_list_with_unlisted_mappings_default_loads_only_listed_libraries() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-mapped-allowlist");
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::DENY);
    set_defaults(&mut ebpf, |d| d.map_unlisted = d.exec_default);
    let dir = scratch("gatekeep-mapped-allowlist");
    let unlisted = copy(LIBM, &dir, "libunlisted.so");
    let unlisted = unlisted.to_str().unwrap();
    // The allow-list: the workload and every library it loads, ld.so included.
    rule(
        &mut ebpf,
        Path::new(&workload::workload_path()),
        action::ALLOW,
    );
    for lib in WORKLOAD_LIBS {
        rule(&mut ebpf, Path::new(lib), action::ALLOW);
    }
    for uid in [None, Some(NOBODY)] {
        let who = uid.unwrap_or("root");
        let _ = exec_events(&mut ebpf);
        let outcome = run_in(
            &cgroup,
            &as_user(uid, &["code", "maps-has", "libc.so.6"]),
            TIMEOUT,
        );
        assert_eq!(
            outcome,
            Outcome::new(0, "mapped"),
            "{who}: the listed program runs"
        );
        let outcome = run_in(
            &cgroup,
            &as_user(uid, &["code", "dlopen", unlisted]),
            TIMEOUT,
        );
        assert!(
            outcome.code == 1 && outcome.stdout.starts_with("dlerror "),
            "{who}: dlopen of an unlisted library under the allow-list: {outcome:?}"
        );
        expect_mapping_denied(&mut ebpf, Path::new(unlisted), &format!("{who}: unlisted"));
    }
    // Without the setting (`allow`, the default), the unlisted library loads.
    set_defaults(&mut ebpf, |d| d.map_unlisted = action::ALLOW);
    let outcome = run_in(&cgroup, &["code", "dlopen", unlisted], TIMEOUT);
    assert_eq!(outcome, Outcome::new(0, "ok"), "unlisted_mappings = allow");
    drop(ebpf);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn fileless_executables_are_denied_by_default_and_asked_marked_fileless() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-fileless");
    // Under default = "allow": even there, fileless is denied unless said otherwise.
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ALLOW);
    let dir = scratch("gatekeep-fileless");
    // Everyone may unlink here (the unprivileged run deletes its own copy).
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
    for uid in [None, Some(NOBODY)] {
        let who = uid.unwrap_or("root");
        let _ = exec_events(&mut ebpf);
        let outcome = run_in(
            &cgroup,
            &as_user(
                uid,
                &["code", "memfd-exec", "payload", "/bin/busybox", "true"],
            ),
            TIMEOUT,
        );
        assert_eq!(outcome, Outcome::exec_denied(), "{who}: memfd exec");
        let denied = exec_events(&mut ebpf)
            .into_iter()
            .find(|e| e.header.kind == event_kind::EXEC_DENIED)
            .unwrap_or_else(|| panic!("{who}: no denial event for the memfd exec"));
        assert_eq!(denied.flags, exec_flags::FILELESS, "{who}");
        assert_eq!(text(&denied.filename), "memfd:payload", "{who}");

        let gone = copy("/bin/busybox", &dir, &format!("gone-{who}"));
        let outcome = run_in(
            &cgroup,
            &as_user(
                uid,
                &["code", "deleted-exec", gone.to_str().unwrap(), "true"],
            ),
            TIMEOUT,
        );
        assert_eq!(
            outcome,
            Outcome::exec_denied(),
            "{who}: exec of a deleted file"
        );
        // The same file with its name runs (the control).
        let kept = copy("/bin/busybox", &dir, &format!("kept-{who}"));
        let outcome = run_in(
            &cgroup,
            &as_user(uid, &["exec", kept.to_str().unwrap(), "true"]),
            TIMEOUT,
        );
        assert_eq!(outcome, Outcome::exec_ran(), "{who}: exec of a named copy");
    }

    // fileless = "ask": paused, the event says fileless and names the memfd.
    set_defaults(&mut ebpf, |d| d.fileless = action::ASK);
    for (verdict, expected) in [
        (action::DENY, Outcome::exec_denied()),
        (action::ALLOW, Outcome::exec_ran()),
    ] {
        let _ = exec_events(&mut ebpf);
        let mut child = cgroup.spawn(&mut workload(&[
            "code",
            "memfd-exec",
            "asked\nname",
            "/bin/busybox",
            "true",
        ]));
        let event: ExecEvent = wait_event(&mut ebpf, event_kind::EXEC_ASK, TIMEOUT);
        wait_stopped(event.header.pid, TIMEOUT);
        assert_eq!(event.flags, exec_flags::FILELESS);
        assert_eq!(text(&event.filename), "memfd:asked\nname");
        kernel::decide_paused(
            &mut ebpf,
            event.header.pid,
            event.header.tid,
            event.header.digest,
            verdict,
        );
        let outcome = finish(&mut child, TIMEOUT);
        outcome.assert_no_513();
        assert_eq!(outcome, expected, "verdict {verdict}");
    }
    drop(ebpf);
    let _ = fs::remove_dir_all(&dir);
}
