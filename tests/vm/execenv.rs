//! The loader environment in exec requests (issue 19, item 3): `LD_*` and the
//! policy's `exec.bound_env` names are captured from the exec's envp on the ask
//! and deny paths, carried in the event and bound into the request digest, so a
//! verdict or grant for `cmd` does not cover `LD_PRELOAD=x cmd`. An
//! environment the kernel cannot bind completely makes the request truncated
//! (the policy's `on_truncated`, deny by default). Driven through the maps (no
//! agent), as root in the gated cgroup and as an unprivileged user.

use std::{process::Child, time::Duration};

use aya::{
    Ebpf,
    maps::{Array, HashMap, RingBuf},
};
use gatekeep_common::{
    BoundEnv, ExecEvent, Grant, GrantKey, action, counter, event_kind, exec_denied_for, map_names,
    request_kind,
};
use gatekeep_tests::{
    Cgroup,
    kernel::{self, attach_gating, drain_events, exec_rule_on_busybox_copy, wait_event},
    require_vm, wait_stopped,
    workload::{self, Outcome, workload},
};

const POLICY_ID: u32 = 6;
const TIMEOUT: Duration = Duration::from_secs(20);
/// Unprivileged: `nobody`.
const NOBODY: &str = "65534";

/// Every exec event now on the ring buffer (asks and denials).
fn exec_events(ebpf: &mut Ebpf) -> Vec<ExecEvent> {
    let mut ring = RingBuf::try_from(ebpf.map_mut(map_names::EVENTS).expect(map_names::EVENTS))
        .expect("ring buffer");
    drain_events(&mut ring, &[event_kind::EXEC_ASK, event_kind::EXEC_DENIED])
}

/// The workload execing `tool true <tag>` (as `uid` if given) with exactly
/// the environment `env` (plus the workload's own marker).
fn exec_with_env(
    cgroup: &Cgroup,
    uid: Option<&str>,
    tool: &str,
    tag: &str,
    env: &[(String, String)],
) -> Child {
    let mut args: Vec<&str> = uid.map_or_else(Vec::new, |uid| vec!["as-user", uid]);
    args.extend(["exec", tool, "true", tag]);
    let mut command = workload(&args);
    command
        .env_clear()
        .env("GATEKEEP_WORKLOAD", "1")
        .envs(env.iter().map(|(k, v)| (k, v)));
    cgroup.spawn(&mut command)
}

/// Starts the exec, waits until it is paused and returns its ask.
fn asked(
    ebpf: &mut Ebpf,
    cgroup: &Cgroup,
    (uid, tool, tag): (Option<&str>, &str, &str),
    env: &[(String, String)],
) -> (Child, ExecEvent) {
    let _ = exec_events(ebpf);
    let child = exec_with_env(cgroup, uid, tool, tag, env);
    let event: ExecEvent = wait_event(ebpf, event_kind::EXEC_ASK, TIMEOUT);
    wait_stopped(event.header.pid, TIMEOUT);
    (child, event)
}

fn decide(ebpf: &mut Ebpf, event: &ExecEvent, verdict: u32) {
    kernel::decide_paused(
        ebpf,
        event.header.pid,
        event.header.tid,
        event.header.digest,
        verdict,
    );
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn set_grant(ebpf: &mut Ebpf, digest: u64, present: bool) {
    let mut grants: HashMap<_, GrantKey, Grant> =
        HashMap::try_from(ebpf.map_mut(map_names::GRANTS).expect(map_names::GRANTS))
            .expect("hash map");
    let key = GrantKey {
        policy_id: POLICY_ID,
        kind: request_kind::EXEC,
        digest,
        cgroup_id: 0,
    };
    if present {
        let grant = Grant {
            expires_ns: 0,
            cgroup_id: 0,
        };
        grants.insert(key, grant, 0).expect("write grant");
    } else {
        grants.remove(&key).expect("remove grant");
    }
}

fn set_bound_env(ebpf: &mut Ebpf, names: &[&[u8]]) {
    let mut bound: Array<_, BoundEnv> = Array::try_from(
        ebpf.map_mut(map_names::EXEC_BOUND_ENV)
            .expect(map_names::EXEC_BOUND_ENV),
    )
    .expect("array");
    let entry = BoundEnv::from_names(names).expect("valid names");
    bound.set(POLICY_ID, entry, 0).expect("set bound env");
}

#[test]
fn loader_environment_is_shown_and_bound_into_the_exec_digest() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-execenv");
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ALLOW);
    let tool = exec_rule_on_busybox_copy(&mut ebpf, POLICY_ID, "gk-execenv", action::ASK);
    let tool = tool.to_str().expect("utf-8 path");
    set_bound_env(&mut ebpf, &[b"PYTHONPATH"]);

    for uid in [None, Some(NOBODY)] {
        let call = (uid, tool, "env");
        // 1. No loader variables: none shown; an unbound variable is not captured.
        let plain = vars(&[("HOME", "/root"), ("FOO", "bar")]);
        let (mut child, ask) = asked(&mut ebpf, &cgroup, call, &plain);
        assert_eq!(kernel::event_env(&ask), Vec::<String>::new(), "{uid:?}");
        assert_eq!(ask.env_count, 0);
        assert_eq!(ask.argv_truncated, 0);
        decide(&mut ebpf, &ask, action::ALLOW);
        assert_eq!(workload::finish(&mut child, TIMEOUT), Outcome::exec_ran());
        let plain_digest = ask.header.digest;

        // 2. A grant for it: the same exec with another unbound variable runs
        //    granted (unbound variables are not part of the request).
        set_grant(&mut ebpf, plain_digest, true);
        let granted_before = kernel::counter(&ebpf, counter::GRANT_ALLOWED);
        let other = vars(&[("HOME", "/root"), ("FOO", "other")]);
        let mut child = exec_with_env(&cgroup, uid, tool, "env", &other);
        assert_eq!(workload::finish(&mut child, TIMEOUT), Outcome::exec_ran());
        assert!(kernel::counter(&ebpf, counter::GRANT_ALLOWED) > granted_before);

        // 3. The same exec with LD_PRELOAD (between other variables): asked
        //    again despite the grant, shown with it, another digest.
        let preload = vars(&[
            ("HOME", "/root"),
            ("LD_PRELOAD", "/tmp/evil.so"),
            ("FOO", "bar"),
            ("LD_LIBRARY_PATH", "/tmp/lib"),
            ("PYTHONPATH", "/tmp/py"),
            ("PYTHONPATHX", "/not/bound"),
        ]);
        let (mut child, ask) = asked(&mut ebpf, &cgroup, call, &preload);
        assert_eq!(
            kernel::event_env(&ask),
            [
                "LD_LIBRARY_PATH=/tmp/lib",
                "LD_PRELOAD=/tmp/evil.so",
                "PYTHONPATH=/tmp/py"
            ],
            "LD_* and the policy's names, in envp order (std sorts by name) ({uid:?})"
        );
        assert_eq!(ask.env_count, 3);
        assert_eq!(ask.argv_truncated, 0);
        assert_eq!(kernel::event_argv(&ask), ["true", "env"], "argv unchanged");
        assert_ne!(
            ask.header.digest, plain_digest,
            "LD_PRELOAD changes the request"
        );
        let preload_digest = ask.header.digest;
        decide(&mut ebpf, &ask, action::DENY);
        assert_eq!(
            workload::finish(&mut child, TIMEOUT),
            Outcome::exec_denied(),
            "the grant for the plain exec does not cover LD_PRELOAD"
        );
        set_grant(&mut ebpf, plain_digest, false);

        // 4. Only the value differs: another request again.
        let changed = vars(&[
            ("HOME", "/root"),
            ("LD_PRELOAD", "/tmp/evil2.so"),
            ("FOO", "bar"),
            ("LD_LIBRARY_PATH", "/tmp/lib"),
            ("PYTHONPATH", "/tmp/py"),
        ]);
        let (mut child, ask) = asked(&mut ebpf, &cgroup, call, &changed);
        assert_ne!(ask.header.digest, preload_digest);
        assert_ne!(ask.header.digest, plain_digest);
        // 5. A grant for the LD_PRELOAD request does not cover the plain one.
        decide(&mut ebpf, &ask, action::DENY);
        assert_eq!(
            workload::finish(&mut child, TIMEOUT),
            Outcome::exec_denied()
        );
        set_grant(&mut ebpf, preload_digest, true);
        let (mut child, ask) = asked(&mut ebpf, &cgroup, call, &plain);
        assert_eq!(ask.header.digest, plain_digest, "the same request again");
        decide(&mut ebpf, &ask, action::DENY);
        assert_eq!(
            workload::finish(&mut child, TIMEOUT),
            Outcome::exec_denied()
        );
        // ... while the LD_PRELOAD exec itself is granted.
        let granted_before = kernel::counter(&ebpf, counter::GRANT_ALLOWED);
        let mut child = exec_with_env(&cgroup, uid, tool, "env", &preload);
        assert_eq!(workload::finish(&mut child, TIMEOUT), Outcome::exec_ran());
        assert!(kernel::counter(&ebpf, counter::GRANT_ALLOWED) > granted_before);
        set_grant(&mut ebpf, preload_digest, false);
    }
}

/// Runs the exec to its end and checks the kernel denied it for truncation
/// without asking.
fn expect_denied_truncated(
    ebpf: &mut Ebpf,
    cgroup: &Cgroup,
    uid: Option<&str>,
    tool: &str,
    env: &[(String, String)],
) -> ExecEvent {
    let _ = exec_events(ebpf);
    let asked_before = kernel::counter(ebpf, counter::EXEC_ASKED);
    let mut child = exec_with_env(cgroup, uid, tool, "big-env", env);
    assert_eq!(
        workload::finish(&mut child, TIMEOUT),
        Outcome::exec_denied()
    );
    assert_eq!(kernel::counter(ebpf, counter::EXEC_ASKED), asked_before);
    let denied = exec_events(ebpf)
        .into_iter()
        .find(|e| e.header.kind == event_kind::EXEC_DENIED)
        .expect("an EXEC_DENIED event");
    assert_eq!(denied.argv_truncated, 1);
    assert_eq!(denied.denied_for, exec_denied_for::ARGV_TRUNCATED);
    denied
}

#[test]
fn loader_environment_that_does_not_fit_is_truncated_and_denied_by_default() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-execenv-big");
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ALLOW);
    let tool = exec_rule_on_busybox_copy(&mut ebpf, POLICY_ID, "gk-execenv-big", action::ASK);
    let tool = tool.to_str().expect("utf-8 path");

    for uid in [None, Some(NOBODY)] {
        // Bound variables longer than the 1 KiB the kernel keeps: the second
        // one is cut.
        let long = vars(&[
            ("LD_LIBRARY_PATH", &"a".repeat(600)),
            ("LD_PRELOAD", &"b".repeat(600)),
        ]);
        let denied = expect_denied_truncated(&mut ebpf, &cgroup, uid, tool, &long);
        let env = kernel::event_env(&denied);
        assert_eq!(env[0], format!("LD_LIBRARY_PATH={}", "a".repeat(600)));
        assert!(env[1].starts_with("LD_PRELOAD=bbb"), "{env:?}");

        // LD_PRELOAD after more entries than the kernel scans (std passes
        // the environment sorted by name): never silently left out.
        let mut many: Vec<(String, String)> = (0..4200)
            .map(|i| (format!("A{i}"), "1".to_owned()))
            .collect();
        many.push(("LD_PRELOAD".to_owned(), "/tmp/evil.so".to_owned()));
        let denied = expect_denied_truncated(&mut ebpf, &cgroup, uid, tool, &many);
        assert_eq!(kernel::event_env(&denied), Vec::<String>::new());

        // Control: 4,000 unbound entries and then LD_PRELOAD fit the scan.
        let mut fits: Vec<(String, String)> = (0..4000)
            .map(|i| (format!("A{i}"), "1".to_owned()))
            .collect();
        fits.push(("LD_PRELOAD".to_owned(), "/tmp/evil.so".to_owned()));
        let (mut child, ask) = asked(&mut ebpf, &cgroup, (uid, tool, "big-env"), &fits);
        assert_eq!(ask.argv_truncated, 0);
        assert_eq!(kernel::event_env(&ask), ["LD_PRELOAD=/tmp/evil.so"]);
        decide(&mut ebpf, &ask, action::ALLOW);
        assert_eq!(workload::finish(&mut child, TIMEOUT), Outcome::exec_ran());
    }
}

/// With the agent, the embedded service and the CLI: a reviewer sees the
/// bound environment of an asked exec, escaped (`review list` up front,
/// `review show`), the service's request and the audit record carry it, and
/// variables the policy does not bind are not shown.
#[test]
fn loader_environment_end_to_end_is_shown_to_reviewers_and_recorded() {
    use gatekeep_tests::{
        Agent, embedded_decision, policy,
        review::{Reviewer as _, request_id},
        workload::{tool, workload_path},
    };
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    // busybox runs the applet argv[0] names: `true`.
    let echo = tool(dir.path(), "gk-true");
    let cgroup_name = "gk-execenv-e2e";
    let cgroup = Cgroup::create(cgroup_name);
    let exec = format!(
        "default = \"allow\"\nask = [\"{echo}\"]\nbound_env = [\"PYTHONPATH\"]\nallow = [\"{}\"]",
        workload_path()
    );
    let text = policy::policy(
        cgroup_name,
        &format!("/sys/fs/cgroup/{cgroup_name}"),
        &[
            ("exec", exec.as_str()),
            ("approval", "timeout = \"5m\"\non_timeout = \"deny\""),
        ],
    );
    let agent = Agent::start_with("execenv-e2e", &text, &embedded_decision(17493));
    let patience = Duration::from_mins(1);
    let env = vars(&[
        ("FOO", "not-shown"),
        ("LD_PRELOAD", "/tmp/e\u{1b}[2J.so"),
        ("PYTHONPATH", "/tmp/py"),
    ]);
    let mut seen = Vec::new();
    for uid in [None, Some(NOBODY)] {
        let mut child = exec_with_env(&cgroup, uid, &echo, "e2e", &env);
        wait_stopped(child.id(), patience);
        let request = gatekeep_tests::wait_for("a new pending request", patience, || {
            agent
                .wait_pending(1, patience)
                .into_iter()
                .find(|r| !seen.contains(&request_id(r)))
        });
        let id = request_id(&request);
        seen.push(id.clone());
        let target = &request["request"]["target"];
        assert_eq!(
            target["env"],
            serde_json::json!(["LD_PRELOAD=/tmp/e\u{1b}[2J.so", "PYTHONPATH=/tmp/py"]),
            "{request:#}"
        );
        assert!(target.get("argv_truncated").is_none(), "{request:#}");
        let listed = agent.cli_ok(&["review", "list"], "review list");
        assert!(listed.contains("[env LD_PRELOAD=/tmp/e"), "{listed}");
        assert!(!listed.contains("not-shown"), "{listed}");
        assert!(!listed.contains('\u{1b}'), "escaped: {listed}");
        let shown = agent.cli_ok(&["review", "show", &id], "review show");
        assert!(
            shown
                .lines()
                .any(|l| l.starts_with("env") && l.contains("PYTHONPATH=/tmp/py")),
            "{shown}"
        );
        assert!(!shown.contains('\u{1b}'), "escaped: {shown}");
        let requested = agent.wait_record("requested", patience, |r| {
            r["payload"]["request"]["id"] == id.as_str()
        });
        assert_eq!(
            requested["payload"]["request"]["target"]["env"], target["env"],
            "{requested:#}"
        );
        agent.cli_ok(&["review", "deny", &id], "review deny");
        assert_eq!(
            workload::finish(&mut child, patience),
            Outcome::exec_denied()
        );
    }
}
