//! The agent's `/metrics` on a real kernel: execs allowed and denied in the kernel, one asked
//! and approved by a reviewer, scraped over HTTP from inside the VM; the figures must match
//! what happened and the kernel's own counters (`gatekeep-agent status`).

#![expect(
    clippy::float_cmp,
    reason = "the exposition's counts are whole numbers, exact in f64"
)]

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use gatekeep_tests::{
    Agent, Cgroup, embedded_decision, policy, require_vm,
    review::Reviewer as _,
    workload::{self, Outcome, run_in, start_paused, tool},
};

const PATIENCE: Duration = Duration::from_mins(1);
const METRICS_PORT: u16 = 19464;

/// `GET /metrics` over plain HTTP/1.1; returns the samples as `name{labels}` -> value.
fn scrape() -> BTreeMap<String, f64> {
    let mut stream =
        TcpStream::connect(("127.0.0.1", METRICS_PORT)).expect("connect to the agent's /metrics");
    stream
        .set_read_timeout(Some(PATIENCE))
        .expect("read timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers and body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "a complete exposition: {body}");
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

fn sample(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no `{series}` in {samples:#?}"))
}

#[test]
fn agent_metrics_count_kernel_decisions_and_an_approved_ask() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = tool(dir.path(), "bad-tool");
    let asked = tool(dir.path(), "asked-tool");
    let cgroup_name = "gk-metrics";
    let cgroup = Cgroup::create(cgroup_name);
    let decision = format!(
        "{}[metrics]\nlisten = \"127.0.0.1:{METRICS_PORT}\"\n",
        embedded_decision(17491)
    );
    let agent = Agent::start_with(
        "metrics",
        &policy::exec(
            cgroup_name,
            &format!("default = \"allow\"\ndeny = [\"{bad}\"]\nask = [\"{asked}\"]"),
            "timeout = \"5m\"\non_timeout = \"deny\"",
        ),
        &decision,
    );

    // Two execs the kernel allows, one it denies.
    for _ in 0..2 {
        assert_eq!(
            run_in(&cgroup, &["exec", "/bin/busybox", "true"], PATIENCE),
            Outcome::exec_ran()
        );
    }
    assert_eq!(
        run_in(&cgroup, &["exec", &bad, "true"], PATIENCE),
        Outcome::exec_denied()
    );

    // One ask: paused, scraped while it waits, then approved.
    let mut paused = start_paused(&cgroup, &["exec", &asked, "true"], PATIENCE);
    let id = agent.wait_request_id(PATIENCE);
    let waiting = scrape();
    assert_eq!(
        sample(&waiting, "gatekeep_agent_requests_paused{kind=\"exec\"}"),
        1.0
    );
    agent.cli_ok(
        &["review", "approve", &id, "--reason", "metrics"],
        "review approve",
    );
    assert_eq!(workload::finish(&mut paused, PATIENCE), Outcome::exec_ran());
    agent.wait_record("decided", PATIENCE, |r| r["payload"]["state"] == "approved");

    let samples = scrape();
    println!("{samples:#?}");
    let policy = format!("policy=\"{cgroup_name}\"");
    assert_eq!(
        sample(
            &samples,
            &format!("gatekeep_agent_requests_asked_total{{kind=\"exec\",{policy}}}")
        ),
        1.0
    );
    assert_eq!(
        sample(
            &samples,
            &format!(
                "gatekeep_agent_requests_ended_total{{kind=\"exec\",{policy},outcome=\"approved\"}}"
            )
        ),
        1.0
    );
    assert_eq!(
        sample(
            &samples,
            "gatekeep_agent_decision_seconds_count{kind=\"exec\",outcome=\"approved\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&samples, "gatekeep_agent_requests_paused{kind=\"exec\"}"),
        0.0
    );
    assert_eq!(sample(&samples, "gatekeep_agent_audit_writable"), 1.0);
    for stage in ["forwarder", "writer", "held"] {
        let backlog = sample(
            &samples,
            &format!("gatekeep_agent_audit_backlog_records{{stage=\"{stage}\"}}"),
        );
        assert!(backlog >= 0.0, "{stage}: {backlog}");
    }

    // The kernel's counters, as the status reads them (nothing ran in between).
    for name in [
        "exec_allowed",
        "exec_denied",
        "exec_asked",
        "events_dropped",
    ] {
        let exported = sample(
            &samples,
            &format!("gatekeep_agent_kernel_events_total{{counter=\"{name}\"}}"),
        );
        #[expect(clippy::cast_precision_loss, reason = "small test counts")]
        let status = agent.counter(name) as f64;
        assert_eq!(exported, status, "{name}");
    }
    assert!(
        sample(
            &samples,
            "gatekeep_agent_kernel_events_total{counter=\"exec_allowed\"}"
        ) >= 2.0
    );
    assert!(
        sample(
            &samples,
            "gatekeep_agent_kernel_events_total{counter=\"exec_denied\"}"
        ) >= 1.0
    );
    assert!(
        sample(
            &samples,
            "gatekeep_agent_kernel_events_total{counter=\"exec_asked\"}"
        ) >= 1.0
    );
    assert_eq!(
        sample(&samples, "gatekeep_agent_events_dropped_total"),
        sample(
            &samples,
            "gatekeep_agent_kernel_events_total{counter=\"events_dropped\"}"
        )
    );
}
