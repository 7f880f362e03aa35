//! The approval flow end to end on a real kernel: a gated workload's exec
//! and connect are paused, the request reaches the decision service
//! (embedded in the agent, or a separate `gatekeep-server` over mutual TLS),
//! a reviewer decides with the `gatekeep` CLI, and the very syscall
//! completes or fails with EPERM; both audit logs record it.

use std::{
    process::Child,
    time::{Duration, Instant},
};

use gatekeep_tests::{
    Agent, Cgroup, Service, embedded_decision, is_stopped, loopback_listener,
    policy::{self, allow_but},
    require_vm,
    review::{Reviewer, pending_of_kind, request_id},
    wait_for,
    workload::{self, Outcome, run_in, start_paused, tool},
};
use serde_json::Value;

/// How long anything in the flow may take under software emulation.
const PATIENCE: Duration = Duration::from_mins(1);

/// Exec: everything runs but `asked`, which asks. Connect: everything
/// connects but 127.0.0.1:`port`, which asks.
fn policy(name: &str, asked: &str, port: u16, approval: &str) -> String {
    policy::exec_and_connect(
        name,
        &allow_but("ask", asked),
        &allow_but("ask", &format!("127.0.0.1/32:{port}")),
        approval,
    )
}

/// Creates the test's cgroup `gk-<name>` and starts an agent (`<name>`)
/// gating it with [`policy`], `decision` saying who decides.
fn gate(name: &str, asked: &str, port: u16, approval: &str, decision: &str) -> (Cgroup, Agent) {
    let cgroup_name = format!("gk-{name}");
    let cgroup = Cgroup::create(&cgroup_name);
    let agent = Agent::start_with(name, &policy(&cgroup_name, asked, port, approval), decision);
    (cgroup, agent)
}

/// How a workload ended (waiting up to [`PATIENCE`]); -ERESTARTNOINTR never
/// reached it.
fn finish(child: &mut Child) -> Outcome {
    let outcome = workload::finish(child, PATIENCE);
    outcome.assert_no_513();
    outcome
}

/// Runs `args` in `cgroup` and checks that the kernel let it through on a
/// grant: it ran, and the `grant_allowed` counter moved.
fn assert_runs_on_grant(agent: &Agent, cgroup: &Cgroup, args: &[&str]) {
    let before = agent.counter("grant_allowed");
    assert_eq!(run_in(cgroup, args, PATIENCE), Outcome::exec_ran());
    assert!(
        agent.counter("grant_allowed") > before,
        "GRANT_ALLOWED did not move"
    );
}

#[test]
fn embedded_service_reviewer_approves_a_paused_connect_and_denies_a_paused_exec() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "deploy-tool");
    let (_listener, port) = loopback_listener();
    let (cgroup, agent) = gate(
        "e2e-embedded",
        &asked,
        port,
        "timeout = \"5m\"\non_timeout = \"deny\"",
        &embedded_decision(17443),
    );

    let mut exec = start_paused(&cgroup, &["exec", &asked, "true", "prod"], PATIENCE);
    let port_arg = port.to_string();
    let mut connect = start_paused(&cgroup, &["connect", "127.0.0.1", &port_arg], PATIENCE);

    let pending = agent.wait_pending(2, PATIENCE);
    let exec_request = pending_of_kind(&pending, "exec");
    let connect_request = pending_of_kind(&pending, "connect");
    assert_eq!(exec_request["host"], "vm");
    assert_eq!(
        exec_request["request"]["target"]["executable"],
        asked.as_str()
    );
    assert_eq!(
        exec_request["request"]["target"]["argv"],
        serde_json::json!(["true", "prod"])
    );
    assert_eq!(exec_request["request"]["policy"], "gk-e2e-embedded");
    assert_eq!(exec_request["request"]["cgroup"], "/gk-e2e-embedded");
    assert_eq!(connect_request["request"]["target"]["address"], "127.0.0.1");
    assert_eq!(connect_request["request"]["target"]["port"], port);
    let (exec_id, connect_id) = (request_id(exec_request), request_id(connect_request));
    assert!(
        is_stopped(exec.id()) && is_stopped(connect.id()),
        "both still paused"
    );

    // The reviewer approves the connect: the very connect completes.
    let out = agent.cli_ok(
        &[
            "review",
            "approve",
            &connect_id,
            "--reason",
            "expected call",
        ],
        "review approve",
    );
    assert!(out.contains("approved"), "{out}");
    assert_eq!(finish(&mut connect), Outcome::connected());

    // ... and denies the exec: EPERM.
    agent.cli_ok(
        &["review", "deny", &exec_id, "--reason", "not on a friday"],
        "review deny",
    );
    assert_eq!(finish(&mut exec), Outcome::exec_denied());

    // The agent's audit: who decided, why, under the service's request id.
    let allowed = agent.wait_record("decided", PATIENCE, |r| r["payload"]["kind"] == "connect");
    assert_eq!(allowed["actor"], "admin");
    assert_eq!(allowed["payload"]["verdict"], "allow");
    assert_eq!(allowed["payload"]["reason"], "expected call");
    assert_eq!(allowed["request_id"], connect_id.as_str());
    assert_eq!(allowed["payload"]["state"], "approved");
    let requested = agent.wait_record("requested", PATIENCE, |r| {
        r["payload"]["request"]["target"]["kind"] == "exec"
    });
    assert_eq!(requested["request_id"], exec_id.as_str());
    assert_eq!(requested["payload"]["request"]["id"], exec_id.as_str());
    let denied = agent.wait_record("decided", PATIENCE, |r| r["payload"]["kind"] == "exec");
    assert_eq!(denied["actor"], "admin");
    assert_eq!(denied["payload"]["verdict"], "deny");
    assert_eq!(denied["payload"]["reason"], "not on a friday");

    // The service's audit holds both requests and both decisions; both
    // chains verify.
    let service = agent.service_audit();
    for id in [&exec_id, &connect_id] {
        let kinds: Vec<&str> = service
            .iter()
            .filter(|r| r["request_id"] == id.as_str())
            .filter_map(|r| r["kind"].as_str())
            .collect();
        assert!(
            kinds.contains(&"requested") && kinds.len() >= 2,
            "service records of {id}: {kinds:?}"
        );
    }
    agent.cli_ok(&["audit", "verify"], "service audit verify");
    let agent_db = agent.audit_db();
    agent.cli_ok(
        &["audit", "verify", "--db", &agent_db.to_string_lossy()],
        "agent audit verify",
    );
    let pending = agent.wait_pending(0, PATIENCE);
    assert!(pending.is_empty(), "nothing left pending: {pending:#?}");
}

#[test]
fn a_grant_for_an_hour_lets_the_identical_exec_run_without_asking() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "release-tool");
    let (_listener, port) = loopback_listener();
    let (cgroup, agent) = gate(
        "e2e-grant",
        &asked,
        port,
        "timeout = \"5m\"\ngrant_durations = [\"1h\"]",
        &embedded_decision(17444),
    );

    let mut first = start_paused(&cgroup, &["exec", &asked, "true", "v1.2"], PATIENCE);
    let id = agent.wait_request_id(PATIENCE);
    let out = agent.cli_ok(
        &["review", "approve", &id, "--for", "1h"],
        "review approve --for 1h",
    );
    assert!(out.contains("grant"), "{out}");
    assert_eq!(finish(&mut first), Outcome::exec_ran());
    let granted = agent.wait_record("grant_installed", PATIENCE, |_| true);
    assert_eq!(granted["payload"]["grant"]["duration"], "1h");

    // The identical exec: allowed by the kernel's grant, nobody asked.
    let started = Instant::now();
    assert_runs_on_grant(&agent, &cgroup, &["exec", &asked, "true", "v1.2"]);
    assert_eq!(
        agent.records_of("requested").len(),
        1,
        "the granted exec was not asked again"
    );
    assert!(
        agent.wait_pending(0, PATIENCE).is_empty(),
        "no new pending request"
    );
    eprintln!("granted exec ran in {:?}", started.elapsed());
    let status = agent.status();
    assert_eq!(status["grants"][0]["duration"], "1h");
    assert_eq!(status["grants"][0]["in_kernel"], true);
    let listed = agent.cli_ok(&["--output", "json", "grants", "list"], "grants list");
    assert!(listed.contains(&asked), "{listed}");

    // Other argv: another request, asked (and denied).
    let mut other = start_paused(&cgroup, &["exec", &asked, "true", "v9.9"], PATIENCE);
    let id = agent.wait_request_id(PATIENCE);
    agent.cli_ok(&["review", "deny", &id], "review deny");
    assert_eq!(finish(&mut other), Outcome::exec_denied());
}

#[test]
fn separate_service_over_mtls_approves_an_exec_and_denies_a_connect() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "remote-tool");
    let (_listener, port) = loopback_listener();
    let service = Service::start(17450);
    let (cgroup, agent) = gate(
        "e2e-remote",
        &asked,
        port,
        "timeout = \"5m\"",
        &service.decision_config("vm"),
    );

    let mut exec = start_paused(&cgroup, &["exec", &asked, "true"], PATIENCE);
    let port_arg = port.to_string();
    let mut connect = start_paused(&cgroup, &["connect", "127.0.0.1", &port_arg], PATIENCE);
    let pending = service.wait_pending(2, PATIENCE);
    let (exec_request, connect_request) = (
        pending_of_kind(&pending, "exec"),
        pending_of_kind(&pending, "connect"),
    );
    assert_eq!(
        exec_request["host"], "vm",
        "the host named by the agent's certificate"
    );
    service.cli_ok(
        &["review", "approve", &request_id(exec_request)],
        "review approve",
    );
    assert_eq!(finish(&mut exec), Outcome::exec_ran());
    service.cli_ok(
        &["review", "deny", &request_id(connect_request)],
        "review deny",
    );
    assert_eq!(finish(&mut connect), Outcome::connect_denied());

    let approved = agent.wait_record("decided", PATIENCE, |r| r["payload"]["kind"] == "exec");
    assert_eq!(approved["actor"], "alice");
    assert_eq!(approved["payload"]["verdict"], "allow");
    service.cli_ok(&["audit", "verify"], "service audit verify");
    let service_db = service.audit_db();
    service.cli_ok(
        &["audit", "verify", "--db", &service_db.to_string_lossy()],
        "service audit verify (file)",
    );
}

#[test]
fn a_decision_made_after_the_service_restarts_reaches_the_paused_task() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "patient-tool");
    let (_listener, port) = loopback_listener();
    let mut service = Service::start(17451);
    let (cgroup, agent) = gate(
        "e2e-restart",
        &asked,
        port,
        "timeout = \"5m\"",
        &service.decision_config("vm"),
    );
    let mut exec = start_paused(&cgroup, &["exec", &asked, "true"], PATIENCE);
    let id = service.wait_request_id(PATIENCE);

    service.kill_hard();
    agent.wait_log("decision service unreachable", 1, PATIENCE);
    assert!(
        is_stopped(exec.id()),
        "still paused while the service is down"
    );
    service.launch();

    // The agent reconnects and re-sends; the service still has the request.
    let pending = service.wait_pending(1, PATIENCE);
    assert_eq!(pending.len(), 1, "re-sent, not duplicated: {pending:#?}");
    assert_eq!(request_id(&pending[0]), id);
    agent.wait_log("decision service connected", 2, PATIENCE);
    service.cli_ok(&["review", "approve", &id], "review approve");
    assert_eq!(finish(&mut exec), Outcome::exec_ran());
    let decided = agent.wait_record("decided", PATIENCE, |_| true);
    assert_eq!(decided["actor"], "alice");
    assert_eq!(decided["request_id"], id.as_str());
}

#[test]
fn service_down_past_the_deadline_applies_the_timeout_action() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "late-tool");
    let (_listener, port) = loopback_listener();
    let mut service = Service::start(17452);
    let (cgroup, agent) = gate(
        "e2e-down",
        &asked,
        port,
        "timeout = \"15s\"\non_timeout = \"deny\"",
        &service.decision_config("vm"),
    );
    let mut exec = start_paused(&cgroup, &["exec", &asked, "true"], PATIENCE);
    service.wait_pending(1, PATIENCE);
    service.kill_hard();

    // Nobody can decide: at the deadline the policy's action (deny) applies.
    assert_eq!(finish(&mut exec), Outcome::exec_denied());
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
        &policy::policy(
            "gk-e2e-session",
            "/sys/fs/cgroup/gk-e2e-sess-*",
            &[
                ("exec", &allow_but("ask", &asked)),
                (
                    "approval",
                    "timeout = \"5m\"\ngrant_durations = [\"session\"]",
                ),
            ],
        ),
        &embedded_decision(17445),
    );
    let mut exec = start_paused(&first, &["exec", &asked, "true", "session"], PATIENCE);
    let id = agent.wait_request_id(PATIENCE);
    agent.cli_ok(
        &["review", "approve", &id, "--session"],
        "review approve --session",
    );
    assert_eq!(finish(&mut exec), Outcome::exec_ran());

    // The same request from the same cgroup: not asked.
    assert_runs_on_grant(&agent, &first, &["exec", &asked, "true", "session"]);

    // From another cgroup of the same policy: asked (and denied).
    let mut other = start_paused(&second, &["exec", &asked, "true", "session"], PATIENCE);
    let id = agent.wait_request_id(PATIENCE);
    agent.cli_ok(&["review", "deny", &id], "review deny");
    assert_eq!(finish(&mut other), Outcome::exec_denied());

    // The workload's cgroup goes away: so does the grant, here and at the service.
    drop(first);
    let ended = agent.wait_record("grant_revoked", PATIENCE, |r| {
        r["payload"]["by"] == "session-end"
    });
    assert_eq!(ended["payload"]["grant"]["cgroup"], "/gk-e2e-sess-a");
    let status = agent.status();
    assert_eq!(status["grants"], serde_json::json!([]));
    assert_eq!(status["kernel_grants"], 0);
    wait_for("the service to end the session grant", PATIENCE, || {
        let out = agent.cli_ok(&["--output", "json", "grants", "list"], "grants list");
        let listed: Vec<Value> = serde_json::from_str(&out).expect("grants json");
        listed.is_empty().then_some(())
    });
}

#[test]
fn a_grant_survives_a_policy_reload_that_renumbers_the_policies() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "reload-tool");
    let (_listener, port) = loopback_listener();
    let approval = "timeout = \"5m\"\ngrant_durations = [\"always\"]";
    let (cgroup, agent) = gate(
        "e2e-reload",
        &asked,
        port,
        approval,
        &embedded_decision(17446),
    );
    let mut exec = start_paused(&cgroup, &["exec", &asked, "true", "always"], PATIENCE);
    let id = agent.wait_request_id(PATIENCE);
    agent.cli_ok(
        &["review", "approve", &id, "--always"],
        "review approve --always",
    );
    assert_eq!(finish(&mut exec), Outcome::exec_ran());
    let status = agent.status();
    assert_eq!(status["grants"][0]["in_kernel"], true, "{status}");

    // A reload gives the policy a new kernel id; the grant follows it.
    agent.replace_policy(&format!(
        "# reloaded\n{}",
        policy("gk-e2e-reload", &asked, port, approval)
    ));
    agent.wait_log("policy reloaded", 1, PATIENCE);
    wait_for(
        "the grant to be keyed by the new policy id",
        PATIENCE,
        || {
            let (_, out, _) = agent.admin(&["status", "--output", "json"]);
            let status: Value = serde_json::from_str(&out).ok()?;
            (status["kernel_grants"] == 1 && status["grants"][0]["in_kernel"] == true).then_some(())
        },
    );
    assert_runs_on_grant(&agent, &cgroup, &["exec", &asked, "true", "always"]);
    assert_eq!(
        agent.records_of("requested").len(),
        1,
        "not asked again after the reload"
    );
}

#[test]
fn a_restarted_agent_asks_the_same_request_again_and_gets_its_decision() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "restart-tool");
    let (_listener, port) = loopback_listener();
    let (cgroup, mut agent) = gate(
        "e2e-agent-restart",
        &asked,
        port,
        "timeout = \"5m\"",
        &embedded_decision(17447),
    );
    let mut exec = start_paused(&cgroup, &["exec", &asked, "true", "again"], PATIENCE);
    let id = agent.wait_request_id(PATIENCE);

    // The agent (and its embedded service) dies; the task stays paused.
    agent.kill_hard();
    assert!(is_stopped(exec.id()), "fail closed: still paused");
    agent.launch();
    agent.wait_log("asking a paused request again", 1, PATIENCE);
    let pending = agent.wait_pending(1, PATIENCE);
    assert_eq!(
        pending.len(),
        1,
        "the same request, not a second one: {pending:#?}"
    );
    assert_eq!(request_id(&pending[0]), id);
    agent.cli_ok(&["review", "approve", &id], "review approve");
    assert_eq!(finish(&mut exec), Outcome::exec_ran());
    let decided = agent.wait_record("decided", PATIENCE, |_| true);
    assert_eq!(decided["request_id"], id.as_str());
}

/// Runs `args` in `cgroup` as root and as nobody; both must be let through
/// by a kernel grant, without a new request.
fn both_run_on_grant(agent: &Agent, cgroup: &Cgroup, args: &[&str]) {
    let requested = agent.records_of("requested").len();
    assert_runs_on_grant(agent, cgroup, args);
    let mut nobody = vec!["as-user", "65534"];
    nobody.extend_from_slice(args);
    assert_runs_on_grant(agent, cgroup, &nobody);
    assert_eq!(
        agent.records_of("requested").len(),
        requested,
        "{args:?} in {} was asked again",
        cgroup.path().display()
    );
}

/// Starts `args` in `cgroup` (as `uid` if given), expects it to be asked
/// about, and denies it.
fn asked_and_denied(agent: &Agent, cgroup: &Cgroup, uid: Option<&str>, args: &[&str]) {
    let mut full: Vec<&str> = uid.map_or_else(Vec::new, |uid| vec!["as-user", uid]);
    full.extend_from_slice(args);
    let mut child = start_paused(cgroup, &full, PATIENCE);
    let id = agent.wait_request_id(PATIENCE);
    agent.cli_ok(&["review", "deny", &id], "review deny");
    assert_eq!(finish(&mut child), Outcome::exec_denied(), "{full:?}");
}

#[test]
fn a_grant_covers_the_workload_that_asked_unless_the_reviewer_chose_the_policy() {
    require_vm();
    let w1 = Cgroup::create("gk-e2e-scope-w1");
    let w2 = Cgroup::create("gk-e2e-scope-w2");
    let dir = tempfile::tempdir().expect("tempdir");
    // nobody runs the tool too.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let asked = tool(dir.path(), "scope-tool");
    let agent = Agent::start_with(
        "e2e-scope",
        &policy::policy(
            "gk-e2e-scope",
            "/sys/fs/cgroup/gk-e2e-scope-*",
            &[
                ("exec", &allow_but("ask", &asked)),
                ("approval", "timeout = \"5m\"\ngrant_durations = [\"1h\"]"),
            ],
        ),
        &embedded_decision(17446),
    );

    // w1 asks; approved for an hour with no scope given: w1's grant.
    let narrow = ["exec", asked.as_str(), "true", "narrow"];
    let mut exec = start_paused(&w1, &narrow, PATIENCE);
    let id = agent.wait_request_id(PATIENCE);
    let out = agent.cli_ok(
        &["review", "approve", &id, "--for", "1h"],
        "review approve --for 1h",
    );
    assert!(out.contains("scope workload"), "{out}");
    assert_eq!(finish(&mut exec), Outcome::exec_ran());
    let installed = agent.wait_record("grant_installed", PATIENCE, |_| true);
    assert_eq!(installed["payload"]["grant"]["scope"], "workload");
    assert_eq!(installed["payload"]["grant"]["cgroup"], "/gk-e2e-scope-w1");

    // w1 again, as root and as nobody: not asked.
    both_run_on_grant(&agent, &w1, &narrow);
    // w2, the identical exec, as root and as nobody: asked (and denied).
    asked_and_denied(&agent, &w2, None, &narrow);
    asked_and_denied(&agent, &w2, Some("65534"), &narrow);

    // w2 asks another; approved for an hour for the whole policy.
    let wide = ["exec", asked.as_str(), "true", "wide"];
    let mut exec = start_paused(&w2, &wide, PATIENCE);
    let id = agent.wait_request_id(PATIENCE);
    let out = agent.cli_ok(
        &["review", "approve", &id, "--for", "1h", "--scope", "policy"],
        "review approve --for 1h --scope policy",
    );
    assert!(out.contains("scope policy"), "{out}");
    assert_eq!(finish(&mut exec), Outcome::exec_ran());
    agent.wait_record("grant_installed", PATIENCE, |r| {
        r["payload"]["grant"]["scope"] == "policy"
    });
    // Both workloads, as root and as nobody: not asked.
    both_run_on_grant(&agent, &w1, &wide);
    both_run_on_grant(&agent, &w2, &wide);

    // Every grant shows its scope: the agent's status and the service's list.
    let status = agent.status();
    let mut scopes: Vec<String> = status["grants"]
        .as_array()
        .expect("grants")
        .iter()
        .map(|g| format!("{} {}", g["scope"], g["cgroup"]))
        .collect();
    scopes.sort();
    assert_eq!(
        scopes,
        ["\"policy\" null", "\"workload\" \"/gk-e2e-scope-w1\""],
        "{status}"
    );
    let listed = agent.cli_ok(&["grants", "list"], "grants list");
    assert!(
        listed.contains("SCOPE") && listed.contains("workload /gk-e2e-scope-w1"),
        "{listed}"
    );
}
