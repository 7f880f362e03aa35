//! Audit mode (`mode = "audit"`): a policy that denies and pauses nothing,
//! records what enforcement would have done, and feeds `policy forecast`;
//! switching it to enforce is a reload.

use std::time::{Duration, Instant};

use gatekeep_tests::{
    Agent, Cgroup, gatekeep, loopback_listener,
    policy::{exec_and_connect, on_timeout},
    require_vm,
    workload::{Outcome, connect_in, run_in, tool},
};

/// The audited records so far whose target names `needle` (an executable or
/// a port), with what enforcement would have done.
fn audited(agent: &Agent, needle: &str) -> Vec<serde_json::Value> {
    agent
        .records_of("audited")
        .into_iter()
        .filter(|record| record["payload"]["target"].to_string().contains(needle))
        .collect()
}

#[test]
fn audit_mode_denies_and_pauses_nothing_records_what_it_would_do_and_forecasts_it() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let denied = tool(dir.path(), "denied-tool");
    let asked = tool(dir.path(), "asked-tool");
    let (_listener, port) = loopback_listener();
    let name = "gk-audit-mode";
    let cgroup = Cgroup::create(name);
    let text = |mode: &str| {
        exec_and_connect(
            name,
            &format!("default = \"allow\"\ndeny = [\"{denied}\"]\nask = [\"{asked}\"]"),
            &format!("default = \"allow\"\ndeny = [\"127.0.0.1/32:{port}\"]"),
            &on_timeout("30s", "deny"),
        )
        .replacen(
            "[policy.exec]",
            &format!("mode = \"{mode}\"\n[policy.exec]"),
            1,
        )
    };
    let agent = Agent::start("audit-mode", &text("audit"));

    // Nothing is denied, nothing waits for a reviewer (the ask would wait 30 s).
    for _ in 0..3 {
        assert_eq!(
            run_in(&cgroup, &["exec", &denied, "true"], Duration::from_secs(30)),
            Outcome::exec_ran(),
            "audit mode must not deny"
        );
    }
    let started = Instant::now();
    let outcome = run_in(&cgroup, &["exec", &asked, "true"], Duration::from_secs(30));
    outcome.assert_no_513();
    assert_eq!(outcome, Outcome::exec_ran(), "audit mode must not pause");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the asked exec waited for the timeout"
    );
    assert_eq!(
        connect_in(&cgroup, port, Duration::from_secs(30)),
        Outcome::connected(),
        "audit mode must not deny a connect"
    );
    assert!(
        agent.records_of("requested").is_empty(),
        "audit mode must not ask anyone"
    );
    assert!(agent.records_of("kernel_denied").is_empty());

    // What enforcement would have done is on record, with the rule and a count.
    let denied_record =
        gatekeep_tests::wait_for("the would-deny record", Duration::from_secs(30), || {
            audited(&agent, &denied).pop()
        });
    assert_eq!(denied_record["payload"]["would"], "deny", "{denied_record}");
    assert_eq!(denied_record["payload"]["count"], 3, "{denied_record}");
    assert_eq!(
        denied_record["payload"]["rule"],
        format!("exec deny {denied}"),
        "{denied_record}"
    );
    let asked_record =
        gatekeep_tests::wait_for("the would-ask record", Duration::from_secs(30), || {
            audited(&agent, &asked).pop()
        });
    assert_eq!(asked_record["payload"]["would"], "ask", "{asked_record}");
    let connect_record =
        gatekeep_tests::wait_for("the connect record", Duration::from_secs(30), || {
            audited(&agent, &format!("\"port\":{port}")).pop()
        });
    assert_eq!(
        connect_record["payload"]["would"], "deny",
        "{connect_record}"
    );

    assert_forecast(&agent, &denied, &asked);

    // The loaded policy is on record with its mode, and the agent says so in its log.
    let loaded = agent.records_of("policy_loaded");
    assert_eq!(
        loaded[0]["payload"]["policies"][0]["mode"], "audit",
        "{loaded:?}"
    );
    assert!(
        agent.log().contains("policy is in audit mode"),
        "{}",
        agent.log()
    );

    // Switching to enforce is a reload: the same exec is now denied.
    agent.replace_policy(&text("enforce"));
    agent.wait_log("policy reloaded", 1, Duration::from_secs(30));
    assert_eq!(
        run_in(&cgroup, &["exec", &denied, "true"], Duration::from_secs(30)),
        Outcome::exec_denied(),
        "enforce mode must deny"
    );
}

/// The forecast sums the audited records per policy and rule and lists the asked command.
fn assert_forecast(agent: &Agent, denied: &str, asked: &str) {
    let db = agent.audit_db();
    let (ok, out, err) = gatekeep(
        &[
            "policy",
            "forecast",
            "--db",
            db.to_str().expect("utf-8"),
            "--since",
            "1h",
        ],
        &[],
    );
    assert!(ok, "forecast failed: {err}");
    let line_of = |needle: &str| {
        out.lines()
            .find(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle} in:\n{out}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let row = line_of(&format!("exec deny {denied}"));
    assert_eq!(row[row.len() - 2..], ["0", "3"], "{out}");
    let row = line_of(&format!("exec ask {asked}"));
    assert_eq!(row[row.len() - 2..], ["1", "0"], "{out}");
    assert!(
        out.contains("most frequent actions that would have asked"),
        "{out}"
    );
}
