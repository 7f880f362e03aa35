//! The approval flow end to end on a real kernel: a gated workload's exec
//! and connect are paused, the request reaches the decision service
//! (embedded in the agent, or a separate `gatekeep-server` over mutual TLS),
//! a reviewer decides with the `gatekeep` CLI, and the very syscall
//! completes or fails with EPERM; both audit logs record it.

use std::{
    net::TcpListener,
    process::Child,
    time::{Duration, Instant},
};

use gatekeep_tests::{
    Agent, Cgroup, Service, embedded_decision, is_stopped, require_vm, wait_child, wait_for,
    wait_pending,
};
use serde_json::Value;

use crate::{
    exec::{assert_no_513, run_in},
    workload::{tool, workload},
};

/// How long anything in the flow may take under software emulation.
const PATIENCE: Duration = Duration::from_mins(1);

/// Exec: everything runs but `asked`, which asks. Connect: everything
/// connects but 127.0.0.1:`port`, which asks.
fn policy(name: &str, asked: &str, port: u16, approval: &str) -> String {
    format!(
        "[[policy]]\nname = \"{name}\"\ncgroups = [\"/sys/fs/cgroup/{name}\"]\n\
         [policy.exec]\ndefault = \"allow\"\nask = [\"{asked}\"]\n\
         [policy.connect]\ndefault = \"allow\"\nask = [\"127.0.0.1/32:{port}\"]\n\
         [policy.approval]\n{approval}\n"
    )
}

/// A listener on 127.0.0.1 (outside any gated cgroup) and its port.
fn listener() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback listener");
    let port = listener.local_addr().expect("local addr").port();
    (listener, port)
}

fn wait_paused(child: &Child, what: &str) {
    let pid = child.id();
    wait_for(what, PATIENCE, || is_stopped(pid).then_some(()));
}

/// The pending request whose target is of `kind` (`exec` or `connect`).
fn of_kind<'a>(pending: &'a [Value], kind: &str) -> &'a Value {
    pending
        .iter()
        .find(|r| r["request"]["target"]["kind"] == kind)
        .unwrap_or_else(|| panic!("no pending {kind} request in {pending:#?}"))
}

fn id_of(record: &Value) -> String {
    record["request"]["id"]
        .as_str()
        .expect("request id")
        .to_owned()
}

/// (exit code, stdout) of a finished workload.
fn finish(child: &mut Child) -> (i32, String) {
    let output = wait_child(child, PATIENCE);
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert_no_513(&stdout);
    (output.status.code().unwrap_or(-1), stdout)
}

fn cli_ok(result: (bool, String, String), what: &str) -> String {
    let (ok, out, err) = result;
    assert!(ok, "{what} failed: {out}{err}");
    out
}

/// A kernel counter from `gatekeep-agent status --output json`.
fn counter(agent: &Agent, name: &str) -> u64 {
    let (ok, out, err) = agent.admin(&["status", "--output", "json"]);
    assert!(ok, "status failed: {err}");
    let status: Value = serde_json::from_str(&out).expect("status json");
    status["counters"]
        .as_array()
        .and_then(|c| c.iter().find(|pair| pair[0] == name))
        .and_then(|pair| pair[1].as_u64())
        .unwrap_or_else(|| panic!("no counter {name} in {status}"))
}

/// Every record of the service's audit log, through the CLI.
fn service_audit(cli: impl Fn(&[&str]) -> (bool, String, String)) -> Vec<Value> {
    let out = cli_ok(cli(&["audit", "export", "--format", "jsonl"]), "service audit export");
    out.lines()
        .map(|line| serde_json::from_str(line).expect("export line is json"))
        .collect()
}

#[test]
fn embedded_service_reviewer_approves_a_paused_connect_and_denies_a_paused_exec() {
    require_vm();
    let cgroup = Cgroup::create("gk-e2e-embedded");
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "deploy-tool");
    let (_listener, port) = listener();
    let agent = Agent::start_with(
        "e2e-embedded",
        &policy(
            "gk-e2e-embedded",
            &asked,
            port,
            "timeout = \"5m\"\non_timeout = \"deny\"",
        ),
        &embedded_decision(17443),
    );

    let mut exec = cgroup.spawn(&mut workload(&["exec", &asked, "true", "prod"]));
    let mut connect = cgroup.spawn(&mut workload(&["connect", "127.0.0.1", &port.to_string()]));
    wait_paused(&exec, "the exec to be paused");
    wait_paused(&connect, "the connect to be paused");

    let pending = wait_pending(|args| agent.cli(args), 2, PATIENCE);
    let exec_request = of_kind(&pending, "exec");
    let connect_request = of_kind(&pending, "connect");
    assert_eq!(exec_request["host"], "vm");
    assert_eq!(exec_request["request"]["target"]["executable"], asked.as_str());
    assert_eq!(
        exec_request["request"]["target"]["argv"],
        serde_json::json!(["true", "prod"])
    );
    assert_eq!(exec_request["request"]["policy"], "gk-e2e-embedded");
    assert_eq!(exec_request["request"]["cgroup"], "/gk-e2e-embedded");
    assert_eq!(connect_request["request"]["target"]["address"], "127.0.0.1");
    assert_eq!(connect_request["request"]["target"]["port"], port);
    let (exec_id, connect_id) = (id_of(exec_request), id_of(connect_request));
    assert!(is_stopped(exec.id()) && is_stopped(connect.id()), "both still paused");

    // The reviewer approves the connect: the very connect completes.
    let out = cli_ok(
        agent.cli(&["review", "approve", &connect_id, "--reason", "expected call"]),
        "review approve",
    );
    assert!(out.contains("approved"), "{out}");
    assert_eq!(finish(&mut connect), (0, "ok".to_owned()));

    // ... and denies the exec: EPERM.
    cli_ok(
        agent.cli(&["review", "deny", &exec_id, "--reason", "not on a friday"]),
        "review deny",
    );
    assert_eq!(finish(&mut exec), (111, "errno 1".to_owned()));

    // The agent's audit: who decided, why, the service's record.
    let allowed = agent.wait_record("decided", PATIENCE, |r| r["payload"]["kind"] == "connect");
    assert_eq!(allowed["actor"], "admin");
    assert_eq!(allowed["payload"]["verdict"], "allow");
    assert_eq!(allowed["payload"]["reason"], "expected call");
    assert_eq!(allowed["payload"]["service"]["request_id"], connect_id.as_str());
    assert_eq!(allowed["payload"]["service"]["state"], "approved");
    let requested = agent.wait_record("requested", PATIENCE, |r| r["payload"]["kind"] == "exec");
    assert_eq!(requested["payload"]["service_request_id"], exec_id.as_str());
    let denied = agent.wait_record("decided", PATIENCE, |r| r["payload"]["kind"] == "exec");
    assert_eq!(denied["actor"], "admin");
    assert_eq!(denied["payload"]["verdict"], "deny");
    assert_eq!(denied["payload"]["reason"], "not on a friday");

    // The service's audit holds both requests and both decisions; both
    // chains verify.
    let service = service_audit(|args| agent.cli(args));
    for id in [&exec_id, &connect_id] {
        let kinds: Vec<&str> = service
            .iter()
            .filter(|r| r["request_id"] == id.as_str())
            .filter_map(|r| r["kind"].as_str())
            .collect();
        assert!(kinds.contains(&"requested") && kinds.len() >= 2, "service records of {id}: {kinds:?}");
    }
    cli_ok(agent.cli(&["audit", "verify"]), "service audit verify");
    let agent_db = agent.audit_db();
    cli_ok(
        agent.cli(&["audit", "verify", "--db", &agent_db.to_string_lossy()]),
        "agent audit verify",
    );
    let pending = wait_pending(|args| agent.cli(args), 0, PATIENCE);
    assert!(pending.is_empty(), "nothing left pending: {pending:#?}");
}

#[test]
fn a_grant_for_an_hour_lets_the_identical_exec_run_without_asking() {
    require_vm();
    let cgroup = Cgroup::create("gk-e2e-grant");
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "release-tool");
    let (_listener, port) = listener();
    let agent = Agent::start_with(
        "e2e-grant",
        &policy(
            "gk-e2e-grant",
            &asked,
            port,
            "timeout = \"5m\"\ngrant_durations = [\"1h\"]",
        ),
        &embedded_decision(17444),
    );

    let mut first = cgroup.spawn(&mut workload(&["exec", &asked, "true", "v1.2"]));
    wait_paused(&first, "the first exec to be paused");
    let pending = wait_pending(|args| agent.cli(args), 1, PATIENCE);
    let out = cli_ok(
        agent.cli(&["review", "approve", &id_of(&pending[0]), "--for", "1h"]),
        "review approve --for 1h",
    );
    assert!(out.contains("grant"), "{out}");
    assert_eq!(finish(&mut first), (0, String::new()));
    let granted = agent.wait_record("grant_installed", PATIENCE, |_| true);
    assert_eq!(granted["payload"]["grant"]["duration"], "1h");

    // The identical exec: allowed by the kernel's grant, nobody asked.
    let before = counter(&agent, "grant_allowed");
    let started = Instant::now();
    assert_eq!(
        run_in(&cgroup, &["exec", &asked, "true", "v1.2"], PATIENCE),
        (0, String::new())
    );
    assert!(
        counter(&agent, "grant_allowed") > before,
        "GRANT_ALLOWED did not move"
    );
    let requested = agent
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "requested")
        .count();
    assert_eq!(requested, 1, "the granted exec was not asked again");
    assert!(
        wait_pending(|args| agent.cli(args), 0, PATIENCE).is_empty(),
        "no new pending request"
    );
    eprintln!("granted exec ran in {:?}", started.elapsed());
    let (ok, status, err) = agent.admin(&["status", "--output", "json"]);
    assert!(ok, "{err}");
    let status: Value = serde_json::from_str(&status).expect("status json");
    assert_eq!(status["grants"][0]["duration"], "1h");
    assert_eq!(status["grants"][0]["in_kernel"], true);
    let listed = cli_ok(agent.cli(&["--output", "json", "grants", "list"]), "grants list");
    assert!(listed.contains(&asked), "{listed}");

    // Other argv: another request, asked (and denied).
    let mut other = cgroup.spawn(&mut workload(&["exec", &asked, "true", "v9.9"]));
    wait_paused(&other, "the other exec to be paused");
    let pending = wait_pending(|args| agent.cli(args), 1, PATIENCE);
    cli_ok(agent.cli(&["review", "deny", &id_of(&pending[0])]), "review deny");
    assert_eq!(finish(&mut other), (111, "errno 1".to_owned()));
}

#[test]
fn separate_service_over_mtls_approves_an_exec_and_denies_a_connect() {
    require_vm();
    let cgroup = Cgroup::create("gk-e2e-remote");
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "remote-tool");
    let (_listener, port) = listener();
    let service = Service::start(17450);
    let agent = Agent::start_with(
        "e2e-remote",
        &policy("gk-e2e-remote", &asked, port, "timeout = \"5m\""),
        &service.decision_config("vm"),
    );

    let mut exec = cgroup.spawn(&mut workload(&["exec", &asked, "true"]));
    let mut connect = cgroup.spawn(&mut workload(&["connect", "127.0.0.1", &port.to_string()]));
    wait_paused(&exec, "the exec to be paused");
    wait_paused(&connect, "the connect to be paused");
    let pending = wait_pending(|args| service.cli(args), 2, PATIENCE);
    assert_eq!(of_kind(&pending, "exec")["host"], "vm", "the host named by the agent's certificate");
    cli_ok(
        service.cli(&["review", "approve", &id_of(of_kind(&pending, "exec"))]),
        "review approve",
    );
    assert_eq!(finish(&mut exec), (0, String::new()));
    cli_ok(
        service.cli(&["review", "deny", &id_of(of_kind(&pending, "connect"))]),
        "review deny",
    );
    assert_eq!(finish(&mut connect), (1, "errno 1".to_owned()));

    let approved = agent.wait_record("decided", PATIENCE, |r| r["payload"]["kind"] == "exec");
    assert_eq!(approved["actor"], "alice");
    assert_eq!(approved["payload"]["verdict"], "allow");
    cli_ok(service.cli(&["audit", "verify"]), "service audit verify");
    let service_db = service.audit_db();
    cli_ok(
        service.cli(&["audit", "verify", "--db", &service_db.to_string_lossy()]),
        "service audit verify (file)",
    );
}

#[test]
fn a_decision_made_after_the_service_restarts_reaches_the_paused_task() {
    require_vm();
    let cgroup = Cgroup::create("gk-e2e-restart");
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "patient-tool");
    let (_listener, port) = listener();
    let mut service = Service::start(17451);
    let agent = Agent::start_with(
        "e2e-restart",
        &policy("gk-e2e-restart", &asked, port, "timeout = \"5m\""),
        &service.decision_config("vm"),
    );
    let mut exec = cgroup.spawn(&mut workload(&["exec", &asked, "true"]));
    wait_paused(&exec, "the exec to be paused");
    let pending = wait_pending(|args| service.cli(args), 1, PATIENCE);
    let id = id_of(&pending[0]);

    service.kill_hard();
    agent.wait_log("decision service unreachable", 1, PATIENCE);
    assert!(is_stopped(exec.id()), "still paused while the service is down");
    service.launch();

    // The agent reconnects and re-sends; the service still has the request.
    let pending = wait_pending(|args| service.cli(args), 1, PATIENCE);
    assert_eq!(pending.len(), 1, "re-sent, not duplicated: {pending:#?}");
    assert_eq!(id_of(&pending[0]), id);
    agent.wait_log("decision service connected", 2, PATIENCE);
    cli_ok(service.cli(&["review", "approve", &id]), "review approve");
    assert_eq!(finish(&mut exec), (0, String::new()));
    let decided = agent.wait_record("decided", PATIENCE, |_| true);
    assert_eq!(decided["actor"], "alice");
    assert_eq!(decided["payload"]["service"]["request_id"], id.as_str());
}

#[test]
fn service_down_past_the_deadline_applies_the_timeout_action() {
    require_vm();
    let cgroup = Cgroup::create("gk-e2e-down");
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "late-tool");
    let (_listener, port) = listener();
    let mut service = Service::start(17452);
    let agent = Agent::start_with(
        "e2e-down",
        &policy(
            "gk-e2e-down",
            &asked,
            port,
            "timeout = \"15s\"\non_timeout = \"deny\"",
        ),
        &service.decision_config("vm"),
    );
    let mut exec = cgroup.spawn(&mut workload(&["exec", &asked, "true"]));
    wait_paused(&exec, "the exec to be paused");
    wait_pending(|args| service.cli(args), 1, PATIENCE);
    service.kill_hard();

    // Nobody can decide: at the deadline the policy's action (deny) applies.
    assert_eq!(finish(&mut exec), (111, "errno 1".to_owned()));
    let expired = agent.wait_record("expired", PATIENCE, |_| true);
    assert_eq!(expired["actor"], "timeout");
    assert_eq!(expired["payload"]["verdict"], "deny");
    assert!(
        expired["payload"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("on timeout")),
        "{expired}"
    );
}

#[test]
fn a_session_grant_is_bound_to_its_cgroup_and_ends_with_it() {
    require_vm();
    let first = Cgroup::create("gk-e2e-sess-a");
    let second = Cgroup::create("gk-e2e-sess-b");
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "session-tool");
    let agent = Agent::start_with(
        "e2e-session",
        &format!(
            "[[policy]]\nname = \"gk-e2e-session\"\ncgroups = [\"/sys/fs/cgroup/gk-e2e-sess-*\"]\n\
             [policy.exec]\ndefault = \"allow\"\nask = [\"{asked}\"]\n\
             [policy.approval]\ntimeout = \"5m\"\ngrant_durations = [\"session\"]\n"
        ),
        &embedded_decision(17445),
    );
    let mut exec = first.spawn(&mut workload(&["exec", &asked, "true", "session"]));
    wait_paused(&exec, "the exec to be paused");
    let pending = wait_pending(|args| agent.cli(args), 1, PATIENCE);
    cli_ok(
        agent.cli(&["review", "approve", &id_of(&pending[0]), "--session"]),
        "review approve --session",
    );
    assert_eq!(finish(&mut exec), (0, String::new()));

    // The same request from the same cgroup: not asked.
    let before = counter(&agent, "grant_allowed");
    assert_eq!(
        run_in(&first, &["exec", &asked, "true", "session"], PATIENCE),
        (0, String::new())
    );
    assert!(counter(&agent, "grant_allowed") > before, "GRANT_ALLOWED did not move");

    // From another cgroup of the same policy: asked (and denied).
    let mut other = second.spawn(&mut workload(&["exec", &asked, "true", "session"]));
    wait_paused(&other, "the exec from the other cgroup to be paused");
    let pending = wait_pending(|args| agent.cli(args), 1, PATIENCE);
    cli_ok(agent.cli(&["review", "deny", &id_of(&pending[0])]), "review deny");
    assert_eq!(finish(&mut other), (111, "errno 1".to_owned()));

    // The workload's cgroup goes away: so does the grant, here and at the service.
    drop(first);
    let ended = agent.wait_record("grant_revoked", PATIENCE, |r| {
        r["payload"]["by"] == "session-end"
    });
    assert_eq!(ended["payload"]["grant"]["cgroup"], "/gk-e2e-sess-a");
    let (ok, status, err) = agent.admin(&["status", "--output", "json"]);
    assert!(ok, "{err}");
    let status: Value = serde_json::from_str(&status).expect("status json");
    assert_eq!(status["grants"], serde_json::json!([]));
    assert_eq!(status["kernel_grants"], 0);
    wait_for("the service to end the session grant", PATIENCE, || {
        let out = cli_ok(agent.cli(&["--output", "json", "grants", "list"]), "grants list");
        let listed: Vec<Value> = serde_json::from_str(&out).expect("grants json");
        listed.is_empty().then_some(())
    });
}

#[test]
fn a_grant_survives_a_policy_reload_that_renumbers_the_policies() {
    require_vm();
    let cgroup = Cgroup::create("gk-e2e-reload");
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "reload-tool");
    let (_listener, port) = listener();
    let approval = "timeout = \"5m\"\ngrant_durations = [\"always\"]";
    let agent = Agent::start_with(
        "e2e-reload",
        &policy("gk-e2e-reload", &asked, port, approval),
        &embedded_decision(17446),
    );
    let mut exec = cgroup.spawn(&mut workload(&["exec", &asked, "true", "always"]));
    wait_paused(&exec, "the exec to be paused");
    let pending = wait_pending(|args| agent.cli(args), 1, PATIENCE);
    cli_ok(
        agent.cli(&["review", "approve", &id_of(&pending[0]), "--always"]),
        "review approve --always",
    );
    assert_eq!(finish(&mut exec), (0, String::new()));
    let (_, status, _) = agent.admin(&["status", "--output", "json"]);
    let status: Value = serde_json::from_str(&status).expect("status json");
    assert_eq!(status["grants"][0]["in_kernel"], true, "{status}");

    // A reload gives the policy a new kernel id; the grant follows it.
    agent.replace_policy(&format!(
        "# reloaded\n{}",
        policy("gk-e2e-reload", &asked, port, approval)
    ));
    agent.wait_log("policy reloaded", 1, PATIENCE);
    wait_for("the grant to be keyed by the new policy id", PATIENCE, || {
        let (_, out, _) = agent.admin(&["status", "--output", "json"]);
        let status: Value = serde_json::from_str(&out).ok()?;
        (status["kernel_grants"] == 1 && status["grants"][0]["in_kernel"] == true).then_some(())
    });
    let before = counter(&agent, "grant_allowed");
    assert_eq!(
        run_in(&cgroup, &["exec", &asked, "true", "always"], PATIENCE),
        (0, String::new())
    );
    assert!(counter(&agent, "grant_allowed") > before, "GRANT_ALLOWED did not move");
    let requested = agent
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "requested")
        .count();
    assert_eq!(requested, 1, "not asked again after the reload");
}

#[test]
fn a_restarted_agent_asks_the_same_request_again_and_gets_its_decision() {
    require_vm();
    let cgroup = Cgroup::create("gk-e2e-agent-restart");
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "restart-tool");
    let (_listener, port) = listener();
    let mut agent = Agent::start_with(
        "e2e-agent-restart",
        &policy("gk-e2e-agent-restart", &asked, port, "timeout = \"5m\""),
        &embedded_decision(17447),
    );
    let mut exec = cgroup.spawn(&mut workload(&["exec", &asked, "true", "again"]));
    wait_paused(&exec, "the exec to be paused");
    let id = id_of(&wait_pending(|args| agent.cli(args), 1, PATIENCE)[0]);

    // The agent (and its embedded service) dies; the task stays paused.
    agent.kill_hard();
    assert!(is_stopped(exec.id()), "fail closed: still paused");
    agent.launch();
    agent.wait_log("asking a paused request again", 1, PATIENCE);
    let pending = wait_pending(|args| agent.cli(args), 1, PATIENCE);
    assert_eq!(pending.len(), 1, "the same request, not a second one: {pending:#?}");
    assert_eq!(id_of(&pending[0]), id);
    cli_ok(agent.cli(&["review", "approve", &id]), "review approve");
    assert_eq!(finish(&mut exec), (0, String::new()));
    let decided = agent.wait_record("decided", PATIENCE, |_| true);
    assert_eq!(decided["payload"]["service"]["request_id"], id.as_str());
}
