//! The pause protocol on a real kernel: stray SIGCONTs, argv rewritten by a
//! sibling thread, tasks dying while paused, policy reloads meanwhile.

use std::time::{Duration, Instant};

use gatekeep_tests::{
    gate_exec, is_stopped,
    policy::{self, allow_but, on_timeout},
    require_vm, sigcont, wait_child, wait_stopped,
    workload::{assert_no_513, finish, run_in, start_paused, tool, workload},
};

/// A shell the policy asks about (a busybox copy) and a script for it,
/// `echo "$1" > FILE`, that records which argument the exec ran with.
struct ArgvProbe {
    dir: tempfile::TempDir,
    shell: String,
    script: String,
}

impl ArgvProbe {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let shell = tool(dir.path(), "asked-shell");
        let script = format!("echo \"$1\" > {}", dir.path().join("ran-with").display());
        Self { dir, shell, script }
    }

    /// The workload `command` (`exec-rewrite`, `exec-expose`) exec'ing
    /// `sh -c SCRIPT sh ORIGINAL`, then `--` and `extra`.
    fn workload<'a>(&'a self, command: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            command,
            &self.shell,
            "sh",
            "-c",
            &self.script,
            "sh",
            "ORIGINAL",
            "--",
        ];
        args.extend_from_slice(extra);
        args
    }

    /// The argument the shell ran with.
    fn ran_with(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ran-with"))
            .expect("the shell ran")
            .trim()
            .to_owned()
    }
}

#[test]
fn stray_sigcont_pauses_the_task_again() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    let (cgroup, agent) = gate_exec(
        "pause-stray",
        &allow_but("ask", &asked),
        &on_timeout("8s", "allow"),
    );
    let started = Instant::now();
    let mut child = start_paused(&cgroup, &["exec", &asked, "true"], Duration::from_secs(20));
    let pid = child.id();
    for _ in 0..3 {
        sigcont(pid);
        // Nobody but the verdict lets it through: it stops again.
        wait_stopped(pid, Duration::from_secs(10));
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the exec went through on a stray SIGCONT"
        );
    }
    let repaused = agent.counter("repaused");
    assert!(
        repaused >= 3,
        "the kernel re-paused {repaused} times, expected 3"
    );
    let outcome = finish(&mut child, Duration::from_mins(1));
    outcome.assert_no_513();
    assert_eq!(
        outcome.code, 0,
        "allowed at the timeout: {}",
        outcome.stdout
    );
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "ran before the decision"
    );
    // One request only: re-pausing emits nothing new.
    assert_eq!(agent.records_of("requested").len(), 1);
}

#[test]
fn argv_rewritten_by_a_sibling_thread_is_never_approved_by_the_old_verdict() {
    require_vm();
    let probe = ArgvProbe::new();
    let (cgroup, agent) = gate_exec(
        "pause-argv",
        &allow_but("ask", &probe.shell),
        &on_timeout("3s", "allow"),
    );
    let mut child = start_paused(
        &cgroup,
        &probe.workload("exec-rewrite", &["ORIGINAL", "REWRITTN"]),
        Duration::from_secs(20),
    );
    let pid = child.id();
    // A stray SIGCONT lets the sibling thread run and rewrite argv while
    // the request is still undecided.
    sigcont(pid);
    let output = wait_child(&mut child, Duration::from_secs(90));
    assert_no_513(&String::from_utf8_lossy(&output.stdout));
    assert!(output.status.success(), "{output:?}");
    let ran_with = probe.ran_with();

    // Whatever argv ran must be one that a decision allowed.
    let records = agent.audit_records();
    let allowed: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| {
            (r["kind"] == "expired" || r["kind"] == "decided") && r["payload"]["verdict"] == "allow"
        })
        .collect();
    let approved_argv: Vec<String> = allowed
        .iter()
        .filter_map(|d| {
            records
                .iter()
                .find(|r| r["kind"] == "requested" && r["request_id"] == d["request_id"])
                .and_then(|r| {
                    r["payload"]["request"]["target"]["argv"]
                        .as_array()?
                        .last()?
                        .as_str()
                        .map(str::to_owned)
                })
        })
        .collect();
    assert!(
        approved_argv.contains(&ran_with),
        "ran with {ran_with:?}, but only {approved_argv:?} were approved; records: {records:#?}"
    );
    let requests = records.iter().filter(|r| r["kind"] == "requested").count();
    eprintln!(
        "argv rewrite: ran with {ran_with}, {requests} request(s), approved {approved_argv:?}"
    );
    if ran_with == "REWRITTN" {
        assert!(
            requests >= 2,
            "the rewritten argv must have been asked on its own"
        );
    }
}

#[test]
fn argv_changed_while_paused_is_asked_anew_and_only_the_new_request_is_decided() {
    require_vm();
    let probe = ArgvProbe::new();
    let (cgroup, agent) = gate_exec(
        "pause-argv-mem",
        &allow_but("ask", &probe.shell),
        &on_timeout("3s", "allow"),
    );
    let mut child = cgroup.spawn(&mut workload(&probe.workload("exec-expose", &["ORIGINAL"])));
    let pid = child.id();
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("read the address");
    let addr: u64 = line
        .trim()
        .strip_prefix("addr ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address line: {line:?}"));
    wait_stopped(pid, Duration::from_secs(20));
    let first = agent.wait_record("requested", Duration::from_secs(20), |_| true);
    assert_eq!(first["payload"]["request"]["target"]["argv"][4], "ORIGINAL");

    // Rewrite the argument in the stopped process's memory, then let it
    // retry: what it asks now is not what was asked.
    {
        use std::io::{Seek as _, SeekFrom, Write as _};
        let mut mem = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .expect("open /proc/<pid>/mem");
        mem.seek(SeekFrom::Start(addr)).expect("seek");
        mem.write_all(b"REWRITTN").expect("rewrite argv");
    }
    sigcont(pid);

    let output = wait_child(&mut child, Duration::from_mins(1));
    assert!(output.status.success(), "{output:?}");
    assert_eq!(probe.ran_with(), "REWRITTN");
    let records = agent.audit_records();
    let requested: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["kind"] == "requested")
        .collect();
    assert_eq!(requested.len(), 2, "{records:#?}");
    assert_eq!(
        requested[1]["payload"]["request"]["target"]["argv"][4],
        "REWRITTN"
    );
    let cancelled = records
        .iter()
        .find(|r| r["kind"] == "cancelled")
        .expect("the first request is cancelled");
    assert_eq!(cancelled["request_id"], first["request_id"]);
    assert_eq!(cancelled["payload"]["cause"], "superseded");
    let decided: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["kind"] == "expired" || r["kind"] == "decided")
        .collect();
    assert_eq!(
        decided.len(),
        1,
        "only the new request is decided: {records:#?}"
    );
    assert_eq!(decided[0]["request_id"], requested[1]["request_id"]);
}

#[test]
fn task_killed_while_paused_is_recorded_abandoned_and_leaves_nothing_pending() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    let (cgroup, agent) = gate_exec(
        "pause-kill",
        &allow_but("ask", &asked),
        &on_timeout("60s", "allow"),
    );
    let mut child = start_paused(&cgroup, &["exec", &asked, "true"], Duration::from_secs(20));
    let pid = child.id();
    agent.wait_record("requested", Duration::from_secs(20), |_| true);
    child.kill().expect("SIGKILL the paused task");
    let _ = child.wait();
    let abandoned = agent.wait_record("abandoned", Duration::from_secs(20), |_| true);
    assert_eq!(abandoned["payload"]["pid"], pid);
    assert!(
        abandoned["request_id"].is_string(),
        "linked to its request: {abandoned}"
    );
    assert_eq!(
        agent.status()["paused_requests"],
        serde_json::json!([]),
        "no pending entry leaks"
    );
}

#[test]
fn policy_reload_while_tasks_are_paused_finishes_them_and_applies_the_new_rules() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    let later = tool(dir.path(), "later-tool");
    let (cgroup, agent) = gate_exec(
        "pause-reload",
        &allow_but("ask", &asked),
        &on_timeout("6s", "allow"),
    );
    let mut paused = start_paused(&cgroup, &["exec", &asked, "true"], Duration::from_secs(20));
    let pid = paused.id();

    // An invalid policy is refused and changes nothing.
    agent.replace_policy("[[policy]]\nname = \"broken\"\ncgroups = [\"relative\"]\n");
    agent.wait_log("policy reload refused", 1, Duration::from_secs(20));
    // A valid one replaces the old set while the task waits.
    agent.replace_policy(&policy::exec(
        "gk-pause-reload",
        &format!("default = \"allow\"\nask = [\"{asked}\"]\ndeny = [\"{later}\"]"),
        &on_timeout("6s", "allow"),
    ));
    agent.wait_log("policy reloaded", 1, Duration::from_secs(20));
    assert!(
        is_stopped(pid),
        "the reload must not release the paused task"
    );

    let output = wait_child(&mut paused, Duration::from_mins(1));
    assert!(
        output.status.success(),
        "the paused request is finished under its policy: {output:?}"
    );
    let outcome = run_in(&cgroup, &["exec", &later, "true"], Duration::from_secs(30));
    assert_eq!(outcome.stdout, "errno 1", "the new rule is enforced");
    let loaded = agent.records_of("policy_loaded");
    // Startup, then the valid files (a file change and the SIGHUP may each
    // reload them); the invalid files never loaded.
    assert!(loaded.len() >= 2, "{loaded:#?}");
    assert!(
        loaded
            .iter()
            .all(|r| !r["payload"].to_string().contains("broken")),
        "the invalid policy was loaded: {loaded:#?}"
    );
}

#[test]
fn an_approved_script_runs_its_asked_interpreter_as_part_of_the_same_request() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    // Named `busybox`, so that run as `busybox sh SCRIPT` it is the shell.
    let interpreter_dir = dir.path().join("asked-interpreter");
    std::fs::create_dir(&interpreter_dir).expect("mkdir");
    let interpreter = tool(&interpreter_dir, "busybox");
    let marker = dir.path().join("script-ran");
    let script = dir.path().join("asked-script");
    std::fs::write(
        &script,
        format!("#!{interpreter} sh\necho \"$1\" > {}\n", marker.display()),
    )
    .expect("write the script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod the script");
    let script = script.to_string_lossy().into_owned();
    let (cgroup, agent) = gate_exec(
        "pause-script",
        &format!("default = \"allow\"\nask = [\"{interpreter}\", \"{script}\"]"),
        &on_timeout("2s", "allow"),
    );

    // The script's exec is asked about and allowed; the kernel then checks
    // its interpreter in the same syscall, which the approval covers.
    let outcome = run_in(
        &cgroup,
        &["exec", &script, &script, "FIRST"],
        Duration::from_mins(1),
    );
    outcome.assert_no_513();
    assert_eq!(outcome.code, 0, "the approved script must run: {outcome:?}");
    assert_eq!(
        std::fs::read_to_string(&marker)
            .expect("the script ran")
            .trim(),
        "FIRST"
    );
    let requested = agent.records_of("requested");
    assert_eq!(
        requested.len(),
        1,
        "one request (the script's), none for its interpreter: {requested:#?}"
    );
    assert!(
        requested[0].to_string().contains("asked-script"),
        "{requested:#?}"
    );

    // The approval was the script's alone: the interpreter run directly (by
    // the same kind of exec, from a new thread) is asked about.
    let outcome = run_in(
        &cgroup,
        &["exec", &interpreter, "true"],
        Duration::from_mins(1),
    );
    assert_eq!(outcome.code, 0, "allowed at the timeout: {outcome:?}");
    let requested = agent.records_of("requested");
    assert_eq!(requested.len(), 2, "{requested:#?}");
    assert!(
        requested[1].to_string().contains("asked-interpreter"),
        "{requested:#?}"
    );
}
