//! Many tasks paused at once: 10,000 (or as many as the VM's memory and
//! `kernel.threads-max` allow) ask at the same moment, all are held, and all
//! are resolved; none is left behind. The figures are printed, not asserted.

use std::{
    collections::BTreeMap,
    fs,
    time::{Duration, Instant},
};

use gatekeep_tests::{
    gate_exec,
    policy::{allow_but, on_timeout},
    require_vm, task_state, wait_child,
    workload::{tool, workload},
};

/// What the issue asks for.
const WANTED: usize = 10_000;
/// What a paused task costs the kernel, roughly (task, stack, page tables, the exec's new
/// mm), to size the run by the memory there is.
const PER_TASK_KIB: usize = 160;

/// How many tasks this VM can hold paused with room to spare.
fn tasks_this_vm_allows() -> usize {
    let threads_max: usize = fs::read_to_string("/proc/sys/kernel/threads-max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let available_kib: usize = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    let by_memory = available_kib / 2 / PER_TASK_KIB;
    let by_threads = threads_max.saturating_sub(2_000);
    // GATEKEEP_MASS_PAUSE_TASKS=N runs fewer (to look into a failure quickly).
    let asked = std::env::var("GATEKEEP_MASS_PAUSE_TASKS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(WANTED);
    let n = asked.min(by_memory).min(by_threads);
    eprintln!(
        "mass pause: {n} tasks (wanted {WANTED}; memory allows {by_memory}, threads-max {threads_max})"
    );
    n
}

/// How many tasks of the cgroup (its `cgroup.procs`) are in each state now.
fn states_in(procs: &str) -> BTreeMap<char, usize> {
    let mut states = BTreeMap::new();
    for pid in fs::read_to_string(procs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
    {
        *states
            .entry(task_state(pid, pid).unwrap_or('?'))
            .or_default() += 1;
    }
    states
}

#[test]
fn ten_thousand_tasks_paused_at_once_are_all_resolved() {
    require_vm();
    let n = tasks_this_vm_allows();
    assert!(n >= 1_000, "the VM holds too few tasks to test this: {n}");
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    // Every ask waits out its timeout, so all are paused together before any
    // is released.
    let (cgroup, agent) = gate_exec(
        "mass-pause",
        &allow_but("ask", &asked),
        &on_timeout("90s", "allow"),
    );
    let procs = cgroup.path().join("cgroup.procs");
    let procs = procs.to_string_lossy();
    let started = Instant::now();
    let mut parent = cgroup.spawn(&mut workload(&["exec-many", &n.to_string(), &asked]));
    let (mut peak, mut all_paused_at) = (0, None);
    let mut reported = Instant::now();
    while parent.try_wait().expect("try_wait").is_none() {
        let states = states_in(&procs);
        let stopped =
            states.get(&'T').copied().unwrap_or(0) + states.get(&'t').copied().unwrap_or(0);
        if reported.elapsed() >= Duration::from_secs(30) {
            eprintln!(
                "mass pause: {:?}: {stopped} paused now, {peak} at most; states {states:?}",
                started.elapsed()
            );
            reported = Instant::now();
        }
        if stopped > peak {
            peak = stopped;
            if peak >= n && all_paused_at.is_none() {
                all_paused_at = Some(started.elapsed());
            }
        }
        assert!(
            started.elapsed() < Duration::from_mins(15),
            "not resolved after 15 minutes: {peak} paused at most"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    let output = wait_child(&mut parent, Duration::from_mins(1));
    let resolved_at = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!(
        "mass pause: {stdout}; peak paused {peak}; all paused after {all_paused_at:?}; all resolved after {resolved_at:?}"
    );
    assert!(
        stdout.contains(&format!("forked {n}\n")),
        "the workload could not fork them all: {stdout}"
    );
    assert!(
        stdout.contains(&format!("ran {n} denied 0 other 0")),
        "every task runs, allowed at its timeout: {stdout}"
    );
    assert_eq!(peak, n, "all {n} were paused at the same time");
    let status = agent.status();
    eprintln!("mass pause: agent counters {}", status["counters"]);
    let records = agent.audit_records();
    let count = |kind: &str| records.iter().filter(|r| r["kind"] == kind).count();
    assert!(count("requested") >= n, "{} requested", count("requested"));
    assert!(count("expired") >= n, "{} expired", count("expired"));
    let (ok, out, err) = agent.admin(&["audit", "verify"]);
    assert!(ok, "the chain verifies: {out}{err}");
}

/// The workload's `exec-many N PATH`: forks N children that each wait on a
/// pipe, then lets them all `execv(PATH, ["true"])` (a busybox copy) at once; prints
/// `forked N`, then `ran R denied D other O` once every child has ended.
pub fn run(args: &[String]) -> i32 {
    let (Some(Ok(n)), Some(path)) = (args.first().map(|a| a.parse::<usize>()), args.get(1)) else {
        println!("usage: exec-many N PATH");
        return 2;
    };
    let path = std::ffi::CString::new(path.as_str()).unwrap_or_default();
    let arg0 = c"true";
    let mut gate = [0; 2];
    // SAFETY: plain syscalls in a single-threaded process (the workload
    // runs before libtest starts any thread); a child only reads, execs and
    // exits.
    unsafe {
        if libc::pipe(gate.as_mut_ptr()) != 0 {
            println!("pipe failed");
            return 3;
        }
        let mut children = Vec::with_capacity(n);
        for _ in 0..n {
            match libc::fork() {
                0 => {
                    libc::close(gate[1]);
                    // Nothing a child prints may fill the test's pipes while nobody reads.
                    let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
                    libc::dup2(null, 1);
                    libc::dup2(null, 2);
                    let mut byte = 0u8;
                    libc::read(gate[0], (&raw mut byte).cast(), 1);
                    // argv[0] `true`: the busybox applet.
                    let argv = [arg0.as_ptr(), std::ptr::null()];
                    libc::execv(path.as_ptr(), argv.as_ptr());
                    libc::_exit(111);
                }
                -1 => break,
                child => children.push(child),
            }
        }
        println!("forked {}", children.len());
        // End of file for every child: they all exec now.
        libc::close(gate[0]);
        libc::close(gate[1]);
        let (mut ran, mut denied, mut other) = (0, 0, 0);
        for child in children {
            let mut status = 0;
            libc::waitpid(child, &raw mut status, 0);
            match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
                (true, 0) => ran += 1,
                (true, 111) => denied += 1,
                _ => other += 1,
            }
        }
        println!("ran {ran} denied {denied} other {other}");
    }
    0
}
