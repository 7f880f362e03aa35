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
        Some("exec-rewrite") => exec_rewrite(&args[1..]),
        Some("exec-expose") => exec_expose(&args[1..]),
        _ => {
            println!("unknown workload {args:?}");
            2
        }
    }
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
