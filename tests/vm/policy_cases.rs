//! `gatekeep policy test` against the real kernel: the outcomes it predicts
//! for a policy's cases are the outcomes the gated workload then gets.

use std::{collections::BTreeMap, time::Duration};

use gatekeep_tests::{
    Agent, Cgroup, gatekeep, loopback_listener,
    policy::{exec_and_connect, on_timeout},
    require_vm,
    workload::{Outcome, run_in, tool},
};

/// What the kernel did with one case's action, as `policy test` names it.
fn kernel_outcome(agent: &Agent, cgroup: &Cgroup, case: &serde_json::Value) -> &'static str {
    let example = &case["example"];
    match example["kind"].as_str() {
        Some("exec") => {
            let path = example["path"].as_str().expect("path");
            let outcome = run_in(cgroup, &["exec", path, "true"], Duration::from_mins(1));
            outcome.assert_no_513();
            let asked = agent.audit_records().iter().any(|record| {
                record["kind"] == "requested"
                    && record["payload"]["request"]["target"]["executable"].as_str() == Some(path)
            });
            match (asked, outcome) {
                (true, _) => "ask",
                (false, o) if o == Outcome::exec_ran() => "allow",
                (false, o) if o == Outcome::exec_denied() => "deny",
                (false, o) => panic!("exec {path}: unexpected outcome {o:?}"),
            }
        }
        Some("connect") => {
            let to: std::net::SocketAddr =
                example["to"].as_str().expect("to").parse().expect("addr");
            let (ip, port) = (to.ip().to_string(), to.port().to_string());
            match run_in(cgroup, &["connect", &ip, &port], Duration::from_mins(1)) {
                o if o == Outcome::connected() => "allow",
                o if o == Outcome::connect_denied() => "deny",
                o => panic!("connect {to}: unexpected outcome {o:?}"),
            }
        }
        other => panic!("unexpected case kind {other:?}"),
    }
}

#[test]
fn policy_test_predicts_what_the_kernel_does_and_fails_on_a_wrong_expectation() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let allowed = tool(dir.path(), "allowed-tool");
    let denied = tool(dir.path(), "denied-tool");
    let asked = tool(dir.path(), "asked-tool");
    let (open, open_port) = loopback_listener();
    let (closed, closed_port) = loopback_listener();
    let name = "gk-policy-cases";
    let cgroup = Cgroup::create(name);
    let agent = Agent::start(
        "policy-cases",
        &exec_and_connect(
            name,
            &format!("default = \"allow\"\ndeny = [\"{denied}\"]\nask = [\"{asked}\"]"),
            &format!("default = \"allow\"\ndeny = [\"127.0.0.1/32:{closed_port}\"]"),
            &on_timeout("2s", "deny"),
        ),
    );
    let cases_file = dir.path().join("agents.cases.toml");
    let write_cases = |denied_expect: &str| {
        let at = format!("cgroup = \"/sys/fs/cgroup/{name}\"");
        std::fs::write(
            &cases_file,
            format!(
                "[[case]]\n{at}\nexec = \"{allowed}\"\nexpect = \"allow\"\n\n\
                 [[case]]\n{at}\nexec = \"{denied}\"\nexpect = \"{denied_expect}\"\n\n\
                 [[case]]\n{at}\nexec = \"{asked}\"\nexpect = \"ask\"\n\n\
                 [[case]]\n{at}\nconnect = \"127.0.0.1:{open_port}\"\nexpect = \"allow\"\n\n\
                 [[case]]\n{at}\nconnect = \"0.0.0.0:{closed_port}\"\nexpect = \"deny\"\n"
            ),
        )
        .expect("write cases");
    };
    let policies = agent.policy_dir();
    let run = || {
        gatekeep(
            &[
                "--output",
                "json",
                "policy",
                "test",
                "--policies",
                policies.to_str().expect("utf-8"),
                cases_file.to_str().expect("utf-8"),
            ],
            &[],
        )
    };

    write_cases("deny");
    let (ok, out, err) = run();
    assert!(ok, "policy test must pass: {out}{err}");
    let document: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(document["failed"], 0, "{document}");
    let cases = document["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 5);

    // Every predicted outcome is what the workload gets from the kernel.
    let mut compared = BTreeMap::new();
    for case in cases {
        let predicted = case["outcome"]["action"].as_str().expect("action");
        let happened = kernel_outcome(&agent, &cgroup, case);
        compared.insert(
            case["at"].as_str().expect("at").to_owned(),
            (predicted, happened),
        );
    }
    for (at, (predicted, happened)) in &compared {
        assert_eq!(
            predicted, happened,
            "case {at}: policy test predicted {predicted}, the kernel did {happened}"
        );
    }

    // A wrong expectation fails with status 4 and names the case.
    write_cases("allow");
    let (ok, out, _) = run();
    assert!(!ok, "a wrong expectation must fail");
    let document: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(document["failed"], 1, "{document}");
    assert_eq!(document["cases"][1]["passed"], false);
    assert_eq!(document["cases"][1]["outcome"]["action"], "deny");
    drop((open, closed));
}
