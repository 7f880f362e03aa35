//! Connect gating end to end against a real loopback listener.

use std::time::Duration;

use gatekeep_tests::{
    gate_connect, loopback_listener,
    policy::on_timeout,
    require_vm,
    workload::{Outcome, connect_in},
};

#[test]
fn connect_allowed_by_rule_reaches_the_listener() {
    require_vm();
    let (_listener, port) = loopback_listener();
    let (_other, other_port) = loopback_listener();
    let (cgroup, _agent) = gate_connect(
        "conn-allow",
        &format!("default = \"deny\"\nallow = [\"127.0.0.1:{port}\"]"),
        "",
    );
    assert_eq!(
        connect_in(&cgroup, port, Duration::from_secs(30)),
        Outcome::connected()
    );
    assert_eq!(
        connect_in(&cgroup, other_port, Duration::from_secs(30)),
        Outcome::connect_denied(),
        "another port falls to the default deny"
    );
}

#[test]
fn connect_denied_by_rule_fails_with_eperm_and_is_audited() {
    require_vm();
    let (_listener, port) = loopback_listener();
    let (cgroup, agent) = gate_connect(
        "conn-deny",
        "default = \"allow\"\ndeny = [\"127.0.0.0/8\"]",
        "",
    );
    assert_eq!(
        connect_in(&cgroup, port, Duration::from_secs(30)),
        Outcome::connect_denied()
    );
    let record = agent.wait_record("kernel_denied", Duration::from_secs(20), |r| {
        r["payload"]["kind"] == "connect"
    });
    assert_eq!(record["payload"]["target"]["address"], "127.0.0.1");
    assert_eq!(record["payload"]["target"]["port"], port);
    assert_eq!(record["payload"]["rule"], "connect deny 127.0.0.0/8");
}

#[test]
fn more_specific_prefix_and_port_rules_win_in_the_kernel() {
    require_vm();
    let (_a, allowed_port) = loopback_listener();
    let (_b, other_port) = loopback_listener();
    // /8 denied, but one host:port under it allowed (a longer prefix whose
    // entry must carry the /8's rule after its own).
    let (cgroup, _agent) = gate_connect(
        "conn-lpm",
        &format!(
            "default = \"allow\"\ndeny = [\"127.0.0.0/8\"]\nallow = [\"127.0.0.1:{allowed_port}\"]"
        ),
        "",
    );
    assert_eq!(
        connect_in(&cgroup, allowed_port, Duration::from_secs(30)),
        Outcome::connected(),
        "the /32 port rule wins"
    );
    assert_eq!(
        connect_in(&cgroup, other_port, Duration::from_secs(30)),
        Outcome::connect_denied(),
        "other ports of the /32 fall back to the /8 deny"
    );
}

#[test]
fn asked_connect_is_allowed_when_the_timeout_action_is_allow() {
    require_vm();
    let (_listener, port) = loopback_listener();
    let (cgroup, agent) = gate_connect(
        "conn-ask-allow",
        "default = \"ask\"",
        &on_timeout("2s", "allow"),
    );
    let started = std::time::Instant::now();
    let outcome = connect_in(&cgroup, port, Duration::from_mins(1));
    outcome.assert_no_513();
    assert_eq!(outcome, Outcome::connected());
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "connected before the decision"
    );
    let requested = agent.wait_record("requested", Duration::from_secs(20), |r| {
        r["payload"]["request"]["target"]["kind"] == "connect"
    });
    assert_eq!(
        requested["payload"]["request"]["target"]["address"],
        "127.0.0.1"
    );
    assert_eq!(requested["payload"]["request"]["target"]["port"], port);
    assert_eq!(
        requested["payload"]["request"]["rule"],
        "connect default ask"
    );
}

#[test]
fn asked_connect_is_denied_when_the_timeout_action_is_deny() {
    require_vm();
    let (_listener, port) = loopback_listener();
    let (cgroup, _agent) = gate_connect(
        "conn-ask-deny",
        "default = \"ask\"",
        &on_timeout("2s", "deny"),
    );
    let outcome = connect_in(&cgroup, port, Duration::from_mins(1));
    outcome.assert_no_513();
    assert_eq!(outcome, Outcome::connect_denied());
}
