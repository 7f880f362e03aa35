//! Exec gating end to end: `gatekeep-agent run` with a policy, workloads in
//! a gated cgroup, and what their `execve` gets.

use std::{os::unix::fs::symlink, time::Duration};

use gatekeep_tests::{
    Cgroup, gate_exec,
    policy::{allow_but, on_timeout},
    require_vm, wait_child,
    workload::{Outcome, run_in, tool, workload, workload_path},
};

#[test]
fn exec_allowed_by_rule_runs() {
    require_vm();
    let agent_dir = tempfile::tempdir().expect("tempdir");
    let ok = tool(agent_dir.path(), "ok-tool");
    let (cgroup, agent) = gate_exec(
        "exec-allow",
        &format!(
            "default = \"deny\"\nallow = [\"{}\", \"{ok}\"]",
            workload_path()
        ),
        "",
    );
    let outcome = run_in(&cgroup, &["exec", &ok, "true"], Duration::from_secs(30));
    assert_eq!(outcome, Outcome::exec_ran(), "an allowed exec must run");
    // Anything else is denied by default.
    let other = tool(agent_dir.path(), "other-tool");
    let outcome = run_in(&cgroup, &["exec", &other, "true"], Duration::from_secs(30));
    assert_eq!(
        outcome,
        Outcome::exec_denied(),
        "default deny must give EPERM"
    );
    drop(agent);
}

#[test]
fn exec_denied_by_rule_fails_with_eperm_and_is_audited() {
    require_vm();
    let agent_dir = tempfile::tempdir().expect("tempdir");
    let bad = tool(agent_dir.path(), "bad-tool");
    let (cgroup, agent) = gate_exec("exec-deny", &allow_but("deny", &bad), "");
    let record = agent.exec_denied_with_argv(&cgroup, &bad, &["true", "--flag"]);
    assert_eq!(record["payload"]["policy"], "gk-exec-deny");
    assert!(
        record["payload"]["rule"]
            .as_str()
            .is_some_and(|r| r.starts_with("exec deny")),
        "{record}"
    );
    // An allowed binary in the same cgroup still runs.
    let good = tool(agent_dir.path(), "good-tool");
    let outcome = run_in(&cgroup, &["exec", &good, "true"], Duration::from_secs(30));
    assert_eq!(outcome.code, 0);
}

#[test]
fn denied_binary_is_denied_through_symlink_relative_path_and_hard_link() {
    require_vm();
    let agent_dir = tempfile::tempdir().expect("tempdir");
    let dir = agent_dir.path();
    let bad = tool(dir, "bad-tool");
    let link = dir.join("innocent-link");
    symlink(&bad, &link).expect("symlink");
    let hard = dir.join("innocent-hard");
    std::fs::hard_link(&bad, &hard).expect("hard link");
    std::fs::create_dir(dir.join("sub")).expect("mkdir");
    let (cgroup, _agent) = gate_exec("exec-names", &allow_but("deny", &bad), "");
    let dir_str = dir.to_string_lossy().into_owned();
    let sub = dir.join("sub").to_string_lossy().into_owned();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "symlink",
            vec!["exec", link.to_str().expect("utf8"), "true"],
        ),
        (
            "hard link",
            vec!["exec", hard.to_str().expect("utf8"), "true"],
        ),
        (
            "relative path",
            vec!["chdir-exec", &dir_str, "./bad-tool", "true"],
        ),
        (
            "dot-dot path",
            vec!["chdir-exec", &sub, "../bad-tool", "true"],
        ),
    ];
    for (what, args) in cases {
        assert_eq!(
            run_in(&cgroup, &args, Duration::from_secs(30)),
            Outcome::exec_denied(),
            "exec through a {what} must be denied"
        );
    }
}

#[test]
fn asked_exec_is_allowed_when_the_timeout_action_is_allow() {
    require_vm();
    let agent_dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(agent_dir.path(), "asked-tool");
    let (cgroup, agent) = gate_exec(
        "exec-ask-allow",
        &allow_but("ask", &asked),
        &on_timeout("2s", "allow"),
    );
    let started = std::time::Instant::now();
    let outcome = run_in(&cgroup, &["exec", &asked, "true"], Duration::from_mins(1));
    outcome.assert_no_513();
    assert_eq!(outcome, Outcome::exec_ran(), "allowed at the timeout");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "ran before the decision"
    );
    let requested = agent.wait_record("requested", Duration::from_secs(20), |r| {
        r["payload"]["request"]["target"]["executable"].as_str() == Some(asked.as_str())
    });
    let decided = agent.wait_record("expired", Duration::from_secs(20), |r| {
        r["request_id"] == requested["request_id"]
    });
    assert_eq!(decided["payload"]["verdict"], "allow");
    assert_eq!(decided["actor"], "timeout");
    assert_eq!(requested["payload"]["request"]["user_name"], "root");
    assert_eq!(
        requested["payload"]["request"]["id"], requested["request_id"],
        "one id: the record's and the request's"
    );
    assert!(
        requested["payload"]["request"]["ancestry"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{requested}"
    );
}

#[test]
fn asked_exec_is_denied_when_the_timeout_action_is_deny() {
    require_vm();
    let agent_dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(agent_dir.path(), "asked-tool");
    let (cgroup, agent) = gate_exec(
        "exec-ask-deny",
        &allow_but("ask", &asked),
        &on_timeout("2s", "deny"),
    );
    let outcome = run_in(&cgroup, &["exec", &asked, "true"], Duration::from_mins(1));
    outcome.assert_no_513();
    assert_eq!(outcome, Outcome::exec_denied(), "denied at the timeout");
    let decided = agent.wait_record("expired", Duration::from_secs(20), |_| true);
    assert_eq!(decided["payload"]["verdict"], "deny");
    assert_eq!(
        agent.status()["paused_requests"],
        serde_json::json!([]),
        "no pending entry leaks"
    );
}

#[test]
fn processes_outside_gated_cgroups_are_unaffected() {
    require_vm();
    let other = Cgroup::create("gk-exec-outside-other");
    let agent_dir = tempfile::tempdir().expect("tempdir");
    let bad = tool(agent_dir.path(), "bad-tool");
    let (cgroup, _agent) = gate_exec("exec-outside", &allow_but("deny", &bad), "");
    // In the gated cgroup: denied.
    let outcome = run_in(&cgroup, &["exec", &bad, "true"], Duration::from_secs(30));
    assert_eq!(outcome.code, 111);
    // In a sibling cgroup, and in the test's own: untouched.
    let outcome = run_in(&other, &["exec", &bad, "true"], Duration::from_secs(30));
    assert_eq!(outcome, Outcome::exec_ran());
    let mut child = workload(&["exec", &bad, "true"]).spawn().expect("spawn");
    let output = wait_child(&mut child, Duration::from_secs(30));
    assert!(output.status.success());
}

#[test]
fn child_cgroups_created_later_are_gated_too() {
    require_vm();
    let agent_dir = tempfile::tempdir().expect("tempdir");
    let bad = tool(agent_dir.path(), "bad-tool");
    let (cgroup, agent) = gate_exec("exec-nested", &allow_but("deny", &bad), "");
    // A child cgroup created while the agent runs: picked up by the rescan.
    std::fs::create_dir(cgroup.path().join("job-1")).expect("child cgroup");
    agent.wait_log(
        "rescan updated the gated cgroups",
        1,
        Duration::from_secs(30),
    );
    let child = Cgroup::adopt("gk-exec-nested/job-1");
    let outcome = run_in(&child, &["exec", &bad, "true"], Duration::from_secs(30));
    assert_eq!(
        outcome,
        Outcome::exec_denied(),
        "a new child cgroup must be gated"
    );
}
