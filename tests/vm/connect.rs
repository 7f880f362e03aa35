//! Connect gating end to end against a real loopback listener.

use std::{net::TcpListener, time::Duration};

use gatekeep_tests::{Agent, Cgroup, require_vm};

use crate::exec::{assert_no_513, run_in};

fn connect_policy(name: &str, connect: &str, approval: &str) -> String {
    format!(
        "[[policy]]\nname = \"{name}\"\ncgroups = [\"/sys/fs/cgroup/{name}\"]\n[policy.connect]\n{connect}\n[policy.approval]\n{approval}\n"
    )
}

/// A listener on 127.0.0.1 (outside any gated cgroup) and its port.
fn listener() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback listener");
    let port = listener.local_addr().expect("local addr").port();
    (listener, port)
}

#[test]
fn connect_allowed_by_rule_reaches_the_listener() {
    require_vm();
    let cgroup = Cgroup::create("gk-conn-allow");
    let (_listener, port) = listener();
    let (_other, other_port) = listener();
    let _agent = Agent::start(
        "conn-allow",
        &connect_policy(
            "gk-conn-allow",
            &format!("default = \"deny\"\nallow = [\"127.0.0.1:{port}\"]"),
            "",
        ),
    );
    let (code, out) = run_in(
        &cgroup,
        &["connect", "127.0.0.1", &port.to_string()],
        Duration::from_secs(30),
    );
    assert_eq!((code, out.as_str()), (0, "ok"));
    let (code, out) = run_in(
        &cgroup,
        &["connect", "127.0.0.1", &other_port.to_string()],
        Duration::from_secs(30),
    );
    assert_eq!(
        (code, out.as_str()),
        (1, "errno 1"),
        "another port falls to the default deny"
    );
}

#[test]
fn connect_denied_by_rule_fails_with_eperm_and_is_audited() {
    require_vm();
    let cgroup = Cgroup::create("gk-conn-deny");
    let (_listener, port) = listener();
    let agent = Agent::start(
        "conn-deny",
        &connect_policy(
            "gk-conn-deny",
            "default = \"allow\"\ndeny = [\"127.0.0.0/8\"]",
            "",
        ),
    );
    let (code, out) = run_in(
        &cgroup,
        &["connect", "127.0.0.1", &port.to_string()],
        Duration::from_secs(30),
    );
    assert_eq!((code, out.as_str()), (1, "errno 1"));
    let record = agent.wait_record("kernel_denied", Duration::from_secs(20), |r| {
        r["payload"]["kind"] == "connect"
    });
    assert_eq!(record["payload"]["address"], format!("127.0.0.1:{port}"));
    assert_eq!(record["payload"]["rule"], "connect deny 127.0.0.0/8");
}

#[test]
fn more_specific_prefix_and_port_rules_win_in_the_kernel() {
    require_vm();
    let cgroup = Cgroup::create("gk-conn-lpm");
    let (_a, allowed_port) = listener();
    let (_b, other_port) = listener();
    // /8 denied, but one host:port under it allowed (a longer prefix whose
    // entry must carry the /8's rule after its own).
    let _agent = Agent::start(
        "conn-lpm",
        &connect_policy(
            "gk-conn-lpm",
            &format!(
                "default = \"allow\"\ndeny = [\"127.0.0.0/8\"]\nallow = [\"127.0.0.1:{allowed_port}\"]"
            ),
            "",
        ),
    );
    let (code, out) = run_in(
        &cgroup,
        &["connect", "127.0.0.1", &allowed_port.to_string()],
        Duration::from_secs(30),
    );
    assert_eq!((code, out.as_str()), (0, "ok"), "the /32 port rule wins");
    let (code, out) = run_in(
        &cgroup,
        &["connect", "127.0.0.1", &other_port.to_string()],
        Duration::from_secs(30),
    );
    assert_eq!(
        (code, out.as_str()),
        (1, "errno 1"),
        "other ports of the /32 fall back to the /8 deny"
    );
}

#[test]
fn asked_connect_is_allowed_when_the_timeout_action_is_allow() {
    require_vm();
    let cgroup = Cgroup::create("gk-conn-ask-allow");
    let (_listener, port) = listener();
    let agent = Agent::start(
        "conn-ask-allow",
        &connect_policy(
            "gk-conn-ask-allow",
            "default = \"ask\"",
            "timeout = \"2s\"\non_timeout = \"allow\"",
        ),
    );
    let started = std::time::Instant::now();
    let (code, out) = run_in(
        &cgroup,
        &["connect", "127.0.0.1", &port.to_string()],
        Duration::from_mins(1),
    );
    assert_no_513(&out);
    assert_eq!((code, out.as_str()), (0, "ok"));
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "connected before the decision"
    );
    let requested = agent.wait_record("requested", Duration::from_secs(20), |r| {
        r["payload"]["kind"] == "connect"
    });
    assert_eq!(requested["payload"]["address"], format!("127.0.0.1:{port}"));
    assert_eq!(requested["payload"]["rule"], "connect default ask");
}

#[test]
fn asked_connect_is_denied_when_the_timeout_action_is_deny() {
    require_vm();
    let cgroup = Cgroup::create("gk-conn-ask-deny");
    let (_listener, port) = listener();
    let _agent = Agent::start(
        "conn-ask-deny",
        &connect_policy(
            "gk-conn-ask-deny",
            "default = \"ask\"",
            "timeout = \"2s\"\non_timeout = \"deny\"",
        ),
    );
    let (code, out) = run_in(
        &cgroup,
        &["connect", "127.0.0.1", &port.to_string()],
        Duration::from_mins(1),
    );
    assert_no_513(&out);
    assert_eq!((code, out.as_str()), (1, "errno 1"));
}
