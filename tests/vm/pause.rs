//! The pause protocol on a real kernel: stray SIGCONTs, argv rewritten by a
//! sibling thread, tasks dying while paused, policy reloads meanwhile.

use std::time::{Duration, Instant};

use gatekeep_tests::{Agent, Cgroup, is_stopped, require_vm, wait_child, wait_for};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    exec::{assert_no_513, exec_policy},
    workload::{tool, workload},
};

fn sigcont(pid: u32) {
    kill(
        Pid::from_raw(i32::try_from(pid).expect("pid")),
        Signal::SIGCONT,
    )
    .expect("SIGCONT");
}

#[test]
fn stray_sigcont_pauses_the_task_again() {
    require_vm();
    let cgroup = Cgroup::create("gk-pause-stray");
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    let agent = Agent::start(
        "pause-stray",
        &exec_policy(
            "gk-pause-stray",
            &format!("default = \"allow\"\nask = [\"{asked}\"]"),
            "timeout = \"8s\"\non_timeout = \"allow\"",
        ),
    );
    let started = Instant::now();
    let mut child = cgroup.spawn(&mut workload(&["exec", &asked, "true"]));
    let pid = child.id();
    wait_for("the task to be paused", Duration::from_secs(20), || {
        is_stopped(pid).then_some(())
    });
    for _ in 0..3 {
        sigcont(pid);
        // Nobody but the verdict lets it through: it stops again.
        wait_for(
            "the task to stop again after a stray SIGCONT",
            Duration::from_secs(10),
            || is_stopped(pid).then_some(()),
        );
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the exec went through on a stray SIGCONT"
        );
    }
    let (ok, status, _) = agent.admin(&["status", "--output", "json"]);
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(&status).expect("status json");
    let repaused = status["counters"]
        .as_array()
        .and_then(|c| c.iter().find(|pair| pair[0] == "repaused"))
        .and_then(|pair| pair[1].as_u64())
        .expect("repaused counter");
    assert!(
        repaused >= 3,
        "the kernel re-paused {repaused} times, expected 3"
    );
    let output = wait_child(&mut child, Duration::from_mins(1));
    let out = String::from_utf8_lossy(&output.stdout);
    assert_no_513(&out);
    assert!(output.status.success(), "allowed at the timeout: {out}");
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "ran before the decision"
    );
    // One request only: re-pausing emits nothing new.
    let requested = agent
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "requested")
        .count();
    assert_eq!(requested, 1);
}

#[test]
fn argv_rewritten_by_a_sibling_thread_is_never_approved_by_the_old_verdict() {
    require_vm();
    let cgroup = Cgroup::create("gk-pause-argv");
    let dir = tempfile::tempdir().expect("tempdir");
    let shell = tool(dir.path(), "asked-shell");
    let out_file = dir.path().join("ran-with");
    let agent = Agent::start(
        "pause-argv",
        &exec_policy(
            "gk-pause-argv",
            &format!("default = \"allow\"\nask = [\"{shell}\"]"),
            "timeout = \"3s\"\non_timeout = \"allow\"",
        ),
    );
    let script = format!("echo \"$1\" > {}", out_file.display());
    let mut child = cgroup.spawn(&mut workload(&[
        "exec-rewrite",
        &shell,
        "sh",
        "-c",
        &script,
        "sh",
        "ORIGINAL",
        "--",
        "ORIGINAL",
        "REWRITTN",
    ]));
    let pid = child.id();
    wait_for("the exec to be paused", Duration::from_secs(20), || {
        is_stopped(pid).then_some(())
    });
    // A stray SIGCONT lets the sibling thread run and rewrite argv while
    // the request is still undecided.
    sigcont(pid);
    let output = wait_child(&mut child, Duration::from_secs(90));
    assert_no_513(&String::from_utf8_lossy(&output.stdout));
    assert!(output.status.success(), "{output:?}");
    let ran_with = std::fs::read_to_string(&out_file)
        .expect("the shell ran")
        .trim()
        .to_owned();

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
                    r["payload"]["argv"]
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
    let cgroup = Cgroup::create("gk-pause-argv-mem");
    let dir = tempfile::tempdir().expect("tempdir");
    let shell = tool(dir.path(), "asked-shell");
    let out_file = dir.path().join("ran-with");
    let agent = Agent::start(
        "pause-argv-mem",
        &exec_policy(
            "gk-pause-argv-mem",
            &format!("default = \"allow\"\nask = [\"{shell}\"]"),
            "timeout = \"3s\"\non_timeout = \"allow\"",
        ),
    );
    let script = format!("echo \"$1\" > {}", out_file.display());
    let mut child = cgroup.spawn(&mut workload(&[
        "exec-expose",
        &shell,
        "sh",
        "-c",
        &script,
        "sh",
        "ORIGINAL",
        "--",
        "ORIGINAL",
    ]));
    let pid = child.id();
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("read the address");
    let addr: u64 = line
        .trim()
        .strip_prefix("addr ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address line: {line:?}"));
    wait_for("the exec to be paused", Duration::from_secs(20), || {
        is_stopped(pid).then_some(())
    });
    let first = agent.wait_record("requested", Duration::from_secs(20), |_| true);
    assert_eq!(first["payload"]["argv"][4], "ORIGINAL");

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
    let ran_with = std::fs::read_to_string(&out_file)
        .expect("the shell ran")
        .trim()
        .to_owned();
    assert_eq!(ran_with, "REWRITTN");
    let records = agent.audit_records();
    let requested: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["kind"] == "requested")
        .collect();
    assert_eq!(requested.len(), 2, "{records:#?}");
    assert_eq!(requested[1]["payload"]["argv"][4], "REWRITTN");
    let cancelled = records
        .iter()
        .find(|r| r["kind"] == "cancelled")
        .expect("the first request is cancelled");
    assert_eq!(cancelled["request_id"], first["request_id"]);
    assert_eq!(cancelled["payload"]["reason"], "superseded");
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
    let cgroup = Cgroup::create("gk-pause-kill");
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    let agent = Agent::start(
        "pause-kill",
        &exec_policy(
            "gk-pause-kill",
            &format!("default = \"allow\"\nask = [\"{asked}\"]"),
            "timeout = \"60s\"\non_timeout = \"allow\"",
        ),
    );
    let mut child = cgroup.spawn(&mut workload(&["exec", &asked, "true"]));
    let pid = child.id();
    wait_for("the task to be paused", Duration::from_secs(20), || {
        is_stopped(pid).then_some(())
    });
    agent.wait_record("requested", Duration::from_secs(20), |_| true);
    child.kill().expect("SIGKILL the paused task");
    let _ = child.wait();
    let abandoned = agent.wait_record("abandoned", Duration::from_secs(20), |_| true);
    assert_eq!(abandoned["payload"]["pid"], pid);
    assert!(
        abandoned["request_id"].is_string(),
        "linked to its request: {abandoned}"
    );
    let (ok, status, _) = agent.admin(&["status", "--output", "json"]);
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(&status).expect("status json");
    assert_eq!(
        status["paused_requests"],
        serde_json::json!([]),
        "no pending entry leaks"
    );
}

#[test]
fn policy_reload_while_tasks_are_paused_finishes_them_and_applies_the_new_rules() {
    require_vm();
    let cgroup = Cgroup::create("gk-pause-reload");
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    let later = tool(dir.path(), "later-tool");
    let agent = Agent::start(
        "pause-reload",
        &exec_policy(
            "gk-pause-reload",
            &format!("default = \"allow\"\nask = [\"{asked}\"]"),
            "timeout = \"6s\"\non_timeout = \"allow\"",
        ),
    );
    let mut paused = cgroup.spawn(&mut workload(&["exec", &asked, "true"]));
    let pid = paused.id();
    wait_for("the task to be paused", Duration::from_secs(20), || {
        is_stopped(pid).then_some(())
    });

    // An invalid policy is refused and changes nothing.
    agent.replace_policy("[[policy]]\nname = \"broken\"\ncgroups = [\"relative\"]\n");
    agent.wait_log("policy reload refused", 1, Duration::from_secs(20));
    // A valid one replaces the old set while the task waits.
    agent.replace_policy(&exec_policy(
        "gk-pause-reload",
        &format!("default = \"allow\"\nask = [\"{asked}\"]\ndeny = [\"{later}\"]"),
        "timeout = \"6s\"\non_timeout = \"allow\"",
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
    let mut child = cgroup.spawn(&mut workload(&["exec", &later, "true"]));
    let output = wait_child(&mut child, Duration::from_secs(30));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "errno 1",
        "the new rule is enforced"
    );
    let loaded: Vec<serde_json::Value> = agent
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "policy_loaded")
        .collect();
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
