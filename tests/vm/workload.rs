//! The workload the VM tests put in gated cgroups: this very test binary,
//! started again with `GATEKEEP_WORKLOAD=1`. An `.init_array` constructor
//! runs before libtest's `main`, does what the arguments say (exec, connect,
//! thread tricks) and exits, so the VM needs no extra binary and the
//! syscalls under test are made directly, with their raw errno reported.
//! Tests start it with `gatekeep_tests::workload`.
//!
//! Commands (after the binary name):
//! - `exec PATH ARG0 [ARGS...]`: `execv(PATH, [ARG0, ARGS...])`; on failure
//!   prints `errno N` and exits 111.
//! - `chdir-exec DIR PATH ARG0 [ARGS...]`: `chdir(DIR)` first (for relative paths).
//! - `connect IP PORT`: a TCP connect; prints `ok` (exit 0) or `errno N` (exit 1).
//! - `exec-expose PATH ARG0 ARGS... -- WORD`: prints `addr N`, the address
//!   of the argument WORD, then execs (the test rewrites it while paused).
//! - `exec-rewrite PATH ARG0 ARGS... -- WORD REPLACEMENT`: execs from one
//!   thread while a sibling thread, as soon as the process comes back from a
//!   stop, overwrites the argument WORD in place with REPLACEMENT (same length).
//!
//! - `net COMMAND ...`: sends, raw sockets and other families (`egress.rs`).
//! - `dns COMMAND ...`: resolve a name, then connect (`hosts.rs`).
//! - `exec32 PATH ARG0 [ARGS...]`: the same exec made as a compat (ia32)
//!   syscall, `int 0x80` with `eax = 11`, its strings and pointer array in
//!   memory below 4 GiB (`MAP_32BIT`); on failure prints `errno N` and exits
//!   111. A kernel without IA32 emulation (not built, or `ia32_emulation=0`)
//!   has no `int 0x80` gate: the process dies of SIGSEGV.
//!
//! The decoy-path attack (`truth.rs`); each step prints `STEP: errno N` and exits 3 if it
//! fails, and otherwise runs the rest of the command:
//! - `mount-ns COMMAND...`: a private mount namespace (`unshare -m`, `/` made private);
//! - `bind SRC DST COMMAND...`: bind-mounts SRC over DST;
//! - `rm PATH COMMAND...`: unlinks PATH;
//! - `join PROCS COMMAND...`: writes its pid into the `cgroup.procs` file PROCS.
//!
//! Self-protection attacks (`self_protect.rs`); each prints `ok` (exit 0) or
//! `errno N` (exit 1):
//! - `kill PID SIG`; `kill-loop PID SIG N` (N attempts; prints the last
//!   result and `refused K`);
//! - `ptrace-seize PID` (`PTRACE_SEIZE` does not stop the tracee; the
//!   tracer's exit detaches it);
//! - `open PATH r|rw`;
//! - `bpf-map-by-id ID`, `bpf-prog-load` (a two-instruction socket filter);
//! - `init-module PATH`, `finit-module PATH`;
//! - `mount-tmpfs DIR`, `umount DIR`;
//! - `userns-root CMD...`: `unshare(CLONE_NEWUSER | CLONE_NEWNS)` mapping
//!   itself to root first (`unshare -Ur`).
//!
//! File and cgroup attacks (`protect_files.rs`, `cgroup_escape.rs`):
//! - `fs OP PATH [PATH2]`: one file syscall, printing `ok` (exit 0) or
//!   `errno N` (exit 1). OP: `read` (open for reading and read), `write`
//!   (open for appending and write), `trunc-open` (`O_TRUNC`), `truncate`
//!   (`truncate(2)`), `create` (`O_CREAT|O_EXCL`), `mkdir`, `unlink`,
//!   `rmdir`, `rename PATH PATH2`, `link PATH PATH2`, `symlink PATH PATH2`,
//!   `chmod`; `put PATH TEXT` writes TEXT to an existing file in one
//!   `write` (`echo TEXT > PATH`, e.g. a pid into `cgroup.procs`).
//! - `clone3-into DIR PATH ARG0 [ARGS...]`: `clone3(CLONE_INTO_CGROUP)` into
//!   the cgroup folder DIR, the child execs PATH; prints `ok N` (the child's
//!   exit code) or `errno N` of clone3 (exit 1).
//! - `exec-many N PATH`: N children exec PATH at once (`mass_pause.rs`).
//! - `as-user UID COMMAND...`: drops to UID (and its gid, no groups) and
//!   runs COMMAND as above: the unprivileged variants.
//! - `in-userns COMMAND...`: makes a user namespace whose root is this
//!   process's uid and gid, and runs COMMAND as its root (all capabilities in
//!   it): the user-namespace variants.

use std::{
    ffi::CString,
    net::{IpAddr, SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

/// Runs before `main` in every process of this binary.
#[used]
#[unsafe(link_section = ".init_array")]
static WORKLOAD_ENTRY: extern "C" fn() = workload_entry;

extern "C" fn workload_entry() {
    if std::env::var_os("GATEKEEP_WORKLOAD").is_none() {
        return;
    }
    // std's argument list may not be set up yet: read the kernel's copy.
    let cmdline = std::fs::read("/proc/self/cmdline").unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .skip(1)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let code = run(&args);
    std::process::exit(code);
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

fn cstrings(args: &[String]) -> Vec<CString> {
    args.iter()
        .map(|a| CString::new(a.as_bytes()).unwrap_or_default())
        .collect()
}

/// `execv`; returns only on failure, with the exit code to use.
fn exec(path: &str, argv: &[String]) -> i32 {
    let path = CString::new(path).unwrap_or_default();
    let argv = cstrings(argv);
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: NUL-terminated strings and a NULL-terminated array that
    // outlive the call.
    unsafe { libc::execv(path.as_ptr(), ptrs.as_ptr()) };
    println!("errno {}", errno());
    111
}

fn run(args: &[String]) -> i32 {
    match args.first().map(String::as_str) {
        Some("exec") if args.len() >= 3 => exec(&args[1], &args[2..]),
        Some("chdir-exec") if args.len() >= 4 => {
            if let Err(err) = std::env::set_current_dir(&args[1]) {
                println!("chdir failed: {err}");
                return 112;
            }
            exec(&args[2], &args[3..])
        }
        Some("connect") if args.len() == 3 => {
            let (Ok(ip), Ok(port)) = (args[1].parse::<IpAddr>(), args[2].parse::<u16>()) else {
                println!("bad address");
                return 2;
            };
            match TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_secs(30)) {
                Ok(_) => {
                    println!("ok");
                    0
                }
                Err(err) => {
                    println!("errno {}", err.raw_os_error().unwrap_or(-1));
                    1
                }
            }
        }
        Some("fs") if args.len() >= 3 => report(fs_op(&args[1], &args[2..])),
        Some("clone3-into") if args.len() >= 4 => clone3_into(&args[1], &args[2], &args[3..]),
        Some("as-user") if args.len() >= 3 => {
            let Ok(uid) = args[1].parse::<u32>() else {
                return 2;
            };
            // SAFETY: plain syscalls; the process is single-threaded here.
            let dropped = unsafe {
                libc::setgroups(0, std::ptr::null()) == 0
                    && libc::setgid(uid) == 0
                    && libc::setuid(uid) == 0
            };
            if !dropped {
                println!("setuid failed: errno {}", errno());
                return 3;
            }
            // A uid change makes the process undumpable, which leaves its
            // /proc/self files (uid_map...) root's: dumpable again, as a
            // process started by that user would be.
            // SAFETY: a plain prctl.
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
            run(&args[2..])
        }
        Some("in-userns") if args.len() >= 2 => {
            // SAFETY: the first uid/gid read before the unshare; plain syscalls.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            // SAFETY: the process is single-threaded here.
            if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
                println!("unshare failed: errno {}", errno());
                return 3;
            }
            let maps = std::fs::write("/proc/self/setgroups", "deny")
                .and_then(|()| std::fs::write("/proc/self/uid_map", format!("0 {uid} 1")))
                .and_then(|()| std::fs::write("/proc/self/gid_map", format!("0 {gid} 1")));
            if let Err(err) = maps {
                println!("userns maps failed: {err}");
                return 3;
            }
            run(&args[1..])
        }
        Some("mount-ns" | "bind" | "rm" | "join") => decoy_step(args),
        Some("exec-rewrite") => exec_rewrite(&args[1..]),
        Some(
            "kill" | "kill-loop" | "ptrace-seize" | "open" | "bpf-map-by-id" | "bpf-prog-load"
            | "init-module" | "finit-module" | "mount-tmpfs" | "umount" | "userns-root",
        ) => attack(args),
        Some("exec-expose") => exec_expose(&args[1..]),
        Some("exec32") if args.len() >= 3 => exec32(&args[1], &args[2..]),
        // Egress beyond connect (`egress.rs`).
        Some("net") => crate::egress::run(&args[1..]),
        // The argv race, won with userfaultfd (`argv_race.rs`).
        Some("exec-swapped") => crate::argv_race::exec_swapped(&args[1..]),
        Some("exec-swapped-env") => crate::argv_race::exec_swapped_env(&args[1..]),
        // Host-name connect rules (`hosts.rs`).
        Some("dns") => crate::hosts::run(&args[1..]),
        // Code without an exec (`mapped.rs`).
        Some("code") => crate::mapped::run(&args[1..]),
        Some("exec-many") => crate::mass_pause::run(&args[1..]),
        // Run by ld.so (`ld.so PROGRAM ARGS...`): the kernel's argv still names PROGRAM.
        Some(program) if program.starts_with('/') && args.len() > 1 => run(&args[1..]),
        _ => {
            println!("unknown workload {args:?}");
            2
        }
    }
}

/// One step of the decoy-path attack (`truth.rs`), then the rest of the command: prints
/// `STEP: errno N` and exits 3 if the step fails.
fn decoy_step(args: &[String]) -> i32 {
    let arg = |at: usize| cstring(args.get(at).map_or("", String::as_str));
    let (root, source, target) = (cstring("/"), arg(1), arg(2));
    // SAFETY: plain syscalls with NUL-terminated strings that outlive them; the process is
    // single-threaded here.
    let (ok, taken) = unsafe {
        match args[0].as_str() {
            "mount-ns" => (
                libc::unshare(libc::CLONE_NEWNS) == 0
                    && libc::mount(
                        std::ptr::null(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) == 0,
                1,
            ),
            "bind" => (
                libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) == 0,
                3,
            ),
            "rm" => (libc::unlink(source.as_ptr()) == 0, 2),
            "join" => (
                std::fs::write(&args[1], std::process::id().to_string()).is_ok(),
                2,
            ),
            _ => (false, 1),
        }
    };
    if !ok || args.len() <= taken {
        println!("{}: errno {}", args[0], errno());
        return 3;
    }
    run(&args[taken..])
}

static EXEC_STARTED: AtomicBool = AtomicBool::new(false);

fn exec_rewrite(args: &[String]) -> i32 {
    let Some(split) = args.iter().position(|a| a == "--") else {
        return 2;
    };
    let (command, swap) = (&args[..split], &args[split + 1..]);
    let [word, new_word] = swap else {
        return 2;
    };
    if word.len() != new_word.len() || command.len() < 2 {
        return 2;
    }
    let path = CString::new(command[0].as_str()).unwrap_or_default();
    let exec_argv = cstrings(&command[1..]);
    let Some(target) = exec_argv.iter().find(|a| a.as_bytes() == word.as_bytes()) else {
        return 2;
    };
    // The sibling writes into the very bytes execve reads.
    let target_addr = target.as_ptr() as usize;
    let replacement = new_word.clone().into_bytes();
    std::thread::spawn(move || {
        // Busy: wake up and rewrite as early as possible after a stop.
        let mut last = Instant::now();
        loop {
            let now = Instant::now();
            if EXEC_STARTED.load(Ordering::SeqCst)
                && now.duration_since(last) > Duration::from_millis(300)
            {
                for (i, byte) in replacement.iter().enumerate() {
                    // SAFETY: inside the CString's buffer (same length as
                    // the word), which lives until execve replaces the image.
                    unsafe { std::ptr::write_volatile((target_addr as *mut u8).add(i), *byte) };
                }
                return;
            }
            last = now;
            std::hint::spin_loop();
        }
    });
    let mut ptrs: Vec<*const libc::c_char> = exec_argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    EXEC_STARTED.store(true, Ordering::SeqCst);
    // SAFETY: as in `exec`.
    unsafe { libc::execv(path.as_ptr(), ptrs.as_ptr()) };
    println!("errno {}", errno());
    111
}

/// Like `exec`, but first prints `addr N`: where the argument WORD lives in
/// memory, so the test can change it (`/proc/<pid>/mem`) while the exec is
/// paused.
fn exec_expose(args: &[String]) -> i32 {
    let Some(split) = args.iter().position(|a| a == "--") else {
        return 2;
    };
    let (command, rest) = (&args[..split], &args[split + 1..]);
    let [word] = rest else {
        return 2;
    };
    if command.len() < 2 {
        return 2;
    }
    let path = CString::new(command[0].as_str()).unwrap_or_default();
    let exec_argv = cstrings(&command[1..]);
    let Some(target) = exec_argv.iter().find(|a| a.as_bytes() == word.as_bytes()) else {
        return 2;
    };
    println!("addr {}", target.as_ptr() as usize);
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let mut ptrs: Vec<*const libc::c_char> = exec_argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: as in `exec`.
    unsafe { libc::execv(path.as_ptr(), ptrs.as_ptr()) };
    println!("errno {}", errno());
    111
}

/// `ok` (0) or `errno N` (1) for a raw syscall's return value.
fn report_ret(ret: i64) -> i32 {
    if ret < 0 {
        println!("errno {}", errno());
        1
    } else {
        println!("ok");
        0
    }
}

fn cstring(text: &str) -> CString {
    CString::new(text).unwrap_or_default()
}

/// `union bpf_attr`, as far as the commands below use it (zeroes beyond).
#[repr(C, align(8))]
struct BpfAttr([u32; 32]);

fn bpf(cmd: i64, attr: &BpfAttr) -> i64 {
    // SAFETY: a zero-padded attribute of the size passed.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(attr),
            std::mem::size_of::<BpfAttr>(),
        )
    }
}

/// The self-protection attacks (see the module comment).
fn attack(args: &[String]) -> i32 {
    let arg = |i: usize| args.get(i).map_or("", String::as_str);
    let number = |i: usize| arg(i).parse::<i64>().unwrap_or(-1);
    match arg(0) {
        // SAFETY (all arms): plain syscalls on values that outlive them.
        "kill" => report_ret(i64::from(unsafe {
            libc::kill(number(1) as i32, number(2) as i32)
        })),
        "kill-loop" => {
            let (mut refused, mut last) = (0, 0);
            for _ in 0..number(3) {
                last = i64::from(unsafe { libc::kill(number(1) as i32, number(2) as i32) });
                if last < 0 {
                    refused += 1;
                }
            }
            let code = report_ret(last);
            println!("refused {refused}");
            code
        }
        "ptrace-seize" => report_ret(unsafe {
            libc::ptrace(
                libc::PTRACE_SEIZE,
                number(1) as libc::pid_t,
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_void>(),
            )
        }),
        "open" => {
            let flags = if arg(2) == "rw" {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            };
            let path = cstring(arg(1));
            report_ret(i64::from(unsafe { libc::open(path.as_ptr(), flags) }))
        }
        "bpf-map-by-id" => {
            const BPF_MAP_GET_FD_BY_ID: i64 = 14;
            let mut attr = BpfAttr([0; 32]);
            attr.0[0] = number(1) as u32;
            report_ret(bpf(BPF_MAP_GET_FD_BY_ID, &attr))
        }
        "bpf-prog-load" => {
            const BPF_PROG_LOAD: i64 = 5;
            const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
            // r0 = 0; exit
            let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
            let license = cstring("GPL");
            let mut attr = BpfAttr([0; 32]);
            attr.0[0] = BPF_PROG_TYPE_SOCKET_FILTER;
            attr.0[1] = 2;
            let insns_ptr = insns.as_ptr() as u64;
            let license_ptr = license.as_ptr() as u64;
            attr.0[2] = insns_ptr as u32;
            attr.0[3] = (insns_ptr >> 32) as u32;
            attr.0[4] = license_ptr as u32;
            attr.0[5] = (license_ptr >> 32) as u32;
            report_ret(bpf(BPF_PROG_LOAD, &attr))
        }
        "init-module" => {
            let image = std::fs::read(arg(1)).unwrap_or_default();
            let params = cstring("");
            report_ret(unsafe {
                libc::syscall(
                    libc::SYS_init_module,
                    image.as_ptr(),
                    image.len(),
                    params.as_ptr(),
                )
            })
        }
        "finit-module" => {
            let Ok(file) = std::fs::File::open(arg(1)) else {
                println!("cannot open {}", arg(1));
                return 2;
            };
            let params = cstring("");
            report_ret(unsafe {
                libc::syscall(
                    libc::SYS_finit_module,
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    params.as_ptr(),
                    0,
                )
            })
        }
        "mount-tmpfs" => {
            let (source, target, fstype) =
                (cstring("gk-attack"), cstring(arg(1)), cstring("tmpfs"));
            report_ret(i64::from(unsafe {
                libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    fstype.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            }))
        }
        "umount" => {
            let target = cstring(arg(1));
            report_ret(i64::from(unsafe { libc::umount2(target.as_ptr(), 0) }))
        }
        "userns-root" => {
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) } != 0 {
                println!("unshare failed: errno {}", errno());
                return 3;
            }
            let mapped = std::fs::write("/proc/self/setgroups", "deny")
                .and_then(|()| std::fs::write("/proc/self/uid_map", format!("0 {uid} 1")))
                .and_then(|()| std::fs::write("/proc/self/gid_map", format!("0 {gid} 1")));
            if let Err(err) = mapped {
                println!("cannot map root in the new user namespace: {err}");
                return 3;
            }
            run(&args[1..])
        }
        _ => 2,
    }
}

/// Prints `ok` or `errno N`; the exit code says which.
fn report(result: std::io::Result<()>) -> i32 {
    match result {
        Ok(()) => {
            println!("ok");
            0
        }
        Err(err) => {
            println!("errno {}", err.raw_os_error().unwrap_or(-1));
            1
        }
    }
}

fn fs_op(op: &str, args: &[String]) -> std::io::Result<()> {
    use std::{
        fs,
        io::{Read as _, Write as _},
        os::unix::fs::PermissionsExt as _,
    };
    let path = args[0].as_str();
    let second = || {
        args.get(1)
            .map(String::as_str)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))
    };
    match op {
        "read" => fs::File::open(path).and_then(|mut f| f.read_to_end(&mut Vec::new()).map(drop)),
        "write" => fs::OpenOptions::new()
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(b"x")),
        "trunc-open" => fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .map(drop),
        "truncate" => {
            let c = CString::new(path).unwrap_or_default();
            // SAFETY: a NUL-terminated path.
            if unsafe { libc::truncate(c.as_ptr(), 0) } == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }
        "create" => fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map(drop),
        "mkdir" => fs::create_dir(path),
        "unlink" => fs::remove_file(path),
        "rmdir" => fs::remove_dir(path),
        "rename" => fs::rename(path, second()?),
        "link" => fs::hard_link(path, second()?),
        "symlink" => std::os::unix::fs::symlink(path, second()?),
        "chmod" => fs::set_permissions(path, fs::Permissions::from_mode(0o777)),
        // Writes until the filesystem is full: reports the error that stopped it
        // (`errno 28`, ENOSPC, when it filled it).
        "fill" => {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)?;
            let chunk = vec![0x5a_u8; 64 * 1024];
            loop {
                file.write_all(&chunk)?;
            }
        }
        "put" => {
            let text = second()?;
            fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
        }
        _ => Err(std::io::Error::from_raw_os_error(libc::ENOSYS)),
    }
}

/// `struct clone_args` (include/uapi/linux/sched.h), up to `cgroup`.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

fn clone3_into(dir: &str, path: &str, argv: &[String]) -> i32 {
    let Ok(folder) = std::fs::File::open(dir) else {
        println!("errno {}", errno());
        return 1;
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&folder);
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: u64::try_from(fd).unwrap_or(0),
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM: the child is a copy of this process,
    // which only execs (or exits) in it.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw const args,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 {
        println!("errno {}", errno());
        return 1;
    }
    if pid == 0 {
        exec(path, argv);
        // SAFETY: leave the child without running the parent's atexit work.
        unsafe { libc::_exit(111) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(i32::try_from(pid).unwrap_or(-1), &raw mut status, 0) };
    println!("ok {}", libc::WEXITSTATUS(status));
    0
}

/// `execve(PATH, [ARG0, ARGS...], [ENV...])` as an ia32 compat syscall (`int
/// 0x80`, syscall 11; the environment is what follows an argument `--env`,
/// else empty): the path, the strings and the arrays of 32-bit pointers live
/// in one `MAP_32BIT` mapping, since the compat ABI passes 32-bit addresses;
/// the registers' upper halves hold garbage, which the kernel ignores.
/// Returns only on failure, with the exit code to use.
fn exec32(path: &str, argv: &[String]) -> i32 {
    const NR_IA32_EXECVE: u32 = 11;
    const SIZE: usize = 1 << 20;
    // SAFETY: a fresh anonymous private mapping.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        println!("mmap errno {}", errno());
        return 3;
    }
    let base = base.cast::<u8>();
    let Ok(base32) = u32::try_from(base as usize) else {
        println!("mmap: not below 4 GiB");
        return 3;
    };
    let mut at = 0usize;
    // Copies one NUL-terminated string into the mapping; its 32-bit address.
    let mut put = |text: &str| -> Option<u32> {
        let bytes = text.as_bytes();
        if at + bytes.len() + 1 > SIZE / 2 {
            return None;
        }
        // SAFETY: within the first half of the mapping, checked above.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(at), bytes.len());
            *base.add(at + bytes.len()) = 0;
        }
        let address = base32 + u32::try_from(at).ok()?;
        at += bytes.len() + 1;
        Some(address)
    };
    let Some(path32) = put(path) else {
        return 3;
    };
    // Arguments after `--env` are the environment (else it is empty).
    let (argv, env) = match argv.iter().position(|a| a == "--env") {
        Some(at) => (&argv[..at], &argv[at + 1..]),
        None => (argv, &argv[argv.len()..]),
    };
    let mut pointers = Vec::with_capacity(argv.len() + env.len() + 2);
    for arg in argv.iter().chain(env) {
        let Some(address) = put(arg) else {
            return 3;
        };
        pointers.push(address);
    }
    // argv's final NULL, then envp's.
    pointers.insert(argv.len(), 0);
    pointers.push(0);
    // The pointer arrays in the second half: argv, then envp.
    let array = SIZE / 2;
    // SAFETY: the second half of the mapping holds the array (far below 512 KiB).
    unsafe {
        std::ptr::copy_nonoverlapping(
            pointers.as_ptr().cast::<u8>(),
            base.add(array),
            pointers.len() * 4,
        );
    }
    let argv32 = base32 + u32::try_from(array).unwrap_or(0);
    let envp32 = argv32 + u32::try_from((argv.len() + 1) * 4).unwrap_or(0);
    // The kernel reads an ia32 syscall's arguments from the registers' low
    // halves: garbage in the upper ones (possible from 64-bit code) must not
    // make gatekeep read anything else.
    const UPPER: u64 = 0xdead_beef_0000_0000;
    let ret: u32;
    // SAFETY: the compat execve either replaces the process or returns an
    // error in eax. rbx cannot be an asm operand (LLVM reserves it), so the
    // path goes in through rsi and is swapped in and back around the call.
    unsafe {
        core::arch::asm!(
            "xchg rsi, rbx",
            "int 0x80",
            "xchg rsi, rbx",
            inlateout("eax") NR_IA32_EXECVE => ret,
            inout("rsi") u64::from(path32) => _,
            in("rcx") u64::from(argv32) | UPPER,
            in("rdx") u64::from(envp32) | UPPER,
            // Older kernels zero these on `int 0x80` from 64-bit code.
            out("r8") _,
            out("r9") _,
            out("r10") _,
            out("r11") _,
        );
    }
    // eax holds -errno.
    println!("errno {}", ret.wrapping_neg());
    111
}
