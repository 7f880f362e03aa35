//! The agent dies or restarts: enforcement never lapses, paused tasks stay
//! paused (fail closed), and the next agent finishes them.

use std::time::{Duration, Instant};

use gatekeep_tests::{Agent, Cgroup, is_stopped, require_vm, wait_child, wait_for};

use crate::{
    exec::{exec_policy, run_in},
    workload::{tool, workload},
};

#[test]
fn agent_killed_while_a_task_is_paused_leaves_it_paused_and_the_next_agent_finishes_it() {
    require_vm();
    let cgroup = Cgroup::create("gk-restart-kill");
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    let bad = tool(dir.path(), "bad-tool");
    let mut agent = Agent::start(
        "restart-kill",
        &exec_policy(
            "gk-restart-kill",
            &format!("default = \"allow\"\nask = [\"{asked}\"]\ndeny = [\"{bad}\"]"),
            "timeout = \"4s\"\non_timeout = \"allow\"",
        ),
    );
    let mut child = cgroup.spawn(&mut workload(&["exec", &asked, "true"]));
    let pid = child.id();
    wait_for("the task to be paused", Duration::from_secs(20), || {
        is_stopped(pid).then_some(())
    });
    agent.wait_record("requested", Duration::from_secs(20), |_| true);

    agent.kill_hard();
    // Fail closed: well past the timeout, nobody continues it.
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(6) {
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the task ran while no agent was up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(is_stopped(pid), "the task must still be stopped");
    // The programs stay attached: a denied exec is still denied.
    let (code, out) = run_in(&cgroup, &["exec", &bad, "true"], Duration::from_secs(30));
    assert_eq!(
        (code, out.as_str()),
        (111, "errno 1"),
        "enforcement lapsed while the agent was down"
    );

    agent.launch();
    let log = agent.log();
    assert!(
        log.contains("start=adopted") || log.contains("start=\"adopted\""),
        "the restarted agent must adopt the pinned programs:\n{log}"
    );
    assert_eq!(
        log.matches("kernel_logs=true").count(),
        2,
        "both the loading and the adopting agent drain the programs' logs:\n{log}"
    );
    let output = wait_child(&mut child, Duration::from_mins(1));
    assert!(
        output.status.success(),
        "the next agent must finish the paused request: {output:?}"
    );
    let records = agent.audit_records();
    let requested = records.iter().filter(|r| r["kind"] == "requested").count();
    assert!(requested >= 2, "asked again by the new agent");
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "expired" && r["payload"]["verdict"] == "allow")
    );
}

#[test]
fn clean_restart_keeps_paused_tasks_paused_and_finishes_them() {
    require_vm();
    let cgroup = Cgroup::create("gk-restart-term");
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    let mut agent = Agent::start(
        "restart-term",
        &exec_policy(
            "gk-restart-term",
            &format!("default = \"allow\"\nask = [\"{asked}\"]"),
            "timeout = \"5s\"\non_timeout = \"deny\"",
        ),
    );
    let mut child = cgroup.spawn(&mut workload(&["exec", &asked, "true"]));
    let pid = child.id();
    wait_for("the task to be paused", Duration::from_secs(20), || {
        is_stopped(pid).then_some(())
    });
    agent.wait_record("requested", Duration::from_secs(20), |_| true);
    assert!(agent.stop(), "SIGTERM must stop the agent cleanly");
    assert!(
        is_stopped(pid),
        "a clean stop must not release paused tasks"
    );
    let cancelled = agent.wait_record("cancelled", Duration::from_secs(5), |r| {
        r["payload"]["reason"] == "agent_stopped"
    });
    assert!(cancelled["request_id"].is_string());
    assert!(
        agent
            .audit_records()
            .iter()
            .any(|r| r["kind"] == "agent_stopped"),
        "nothing lost on SIGTERM"
    );
    agent.launch();
    let output = wait_child(&mut child, Duration::from_mins(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "errno 1",
        "denied at the timeout by the new agent"
    );
}
