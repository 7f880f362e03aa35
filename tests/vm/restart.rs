//! The agent dies or restarts: enforcement never lapses, paused tasks stay
//! paused (fail closed), and the next agent finishes them.

use std::time::{Duration, Instant};

use gatekeep_tests::{
    gate_exec, is_stopped,
    policy::{allow_but, on_timeout},
    require_vm, wait_child,
    workload::{Outcome, finish, run_in, start_paused, tool},
};

#[test]
fn agent_killed_while_a_task_is_paused_leaves_it_paused_and_the_next_agent_finishes_it() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    let bad = tool(dir.path(), "bad-tool");
    let (cgroup, mut agent) = gate_exec(
        "restart-kill",
        &format!("default = \"allow\"\nask = [\"{asked}\"]\ndeny = [\"{bad}\"]"),
        &on_timeout("4s", "allow"),
    );
    let mut child = start_paused(&cgroup, &["exec", &asked, "true"], Duration::from_secs(20));
    let pid = child.id();
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
    assert_eq!(
        run_in(&cgroup, &["exec", &bad, "true"], Duration::from_secs(30)),
        Outcome::exec_denied(),
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
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    let (cgroup, mut agent) = gate_exec(
        "restart-term",
        &allow_but("ask", &asked),
        &on_timeout("5s", "deny"),
    );
    let mut child = start_paused(&cgroup, &["exec", &asked, "true"], Duration::from_secs(20));
    let pid = child.id();
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
        !agent.records_of("agent_stopped").is_empty(),
        "nothing lost on SIGTERM"
    );
    agent.launch();
    assert_eq!(
        finish(&mut child, Duration::from_mins(1)).stdout,
        "errno 1",
        "denied at the timeout by the new agent"
    );
}
