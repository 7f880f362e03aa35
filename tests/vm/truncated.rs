//! Truncated argv (issue 19, item 3): an exec on the ask path whose argv the
//! kernel cannot bind completely (more than 32 arguments or 4 KiB) is never
//! silently approvable; a compat `int 0x80` exec's argv and environment are
//! read like a 64-bit one's. The policy's `on_truncated` decides: deny (the default) refuses
//! it in the kernel, with the event saying why; ask pauses it marked truncated,
//! and no grant ever covers it. Driven through the maps (no agent), as root in
//! the gated cgroup and as an unprivileged user.

use std::time::Duration;

use aya::{
    Ebpf,
    maps::{Array, HashMap, RingBuf},
};
use gatekeep_common::{
    ExecEvent, Grant, GrantKey, PolicyDefaults, action, counter, event_kind, exec_denied_for,
    map_names, request_kind,
};
use gatekeep_tests::{
    Cgroup,
    kernel::{self, attach_gating, drain_events, exec_rule_on_busybox_copy, wait_event},
    require_vm, wait_stopped,
    workload::{self, Outcome, workload},
};

const POLICY_ID: u32 = 5;
const TIMEOUT: Duration = Duration::from_secs(20);
/// Unprivileged: `nobody`.
const NOBODY: &str = "65534";

/// Sets the policy's `on_truncated`.
fn set_on_truncated(ebpf: &mut Ebpf, on_truncated: u32) {
    let mut policies: Array<_, PolicyDefaults> = Array::try_from(
        ebpf.map_mut(map_names::POLICIES)
            .expect(map_names::POLICIES),
    )
    .expect("array");
    let mut defaults = policies.get(&POLICY_ID, 0).expect("policy");
    defaults.on_truncated = on_truncated;
    policies.set(POLICY_ID, defaults, 0).expect("set policy");
}

/// Every exec event now on the ring buffer (asks and denials).
fn exec_events(ebpf: &mut Ebpf) -> Vec<ExecEvent> {
    let mut ring = RingBuf::try_from(ebpf.map_mut(map_names::EVENTS).expect(map_names::EVENTS))
        .expect("ring buffer");
    drain_events(&mut ring, &[event_kind::EXEC_ASK, event_kind::EXEC_DENIED])
}

/// The workload command that execs `tool` with `argv`, as `uid` if given.
fn exec_args<'a>(
    uid: Option<&'a str>,
    how: &'a str,
    tool: &'a str,
    argv: &'a [String],
) -> Vec<&'a str> {
    let mut args: Vec<&str> = uid.map_or_else(Vec::new, |uid| vec!["as-user", uid]);
    args.extend([how, tool]);
    args.extend(argv.iter().map(String::as_str));
    args
}

/// Runs the exec to its end and checks the kernel denied it for truncation
/// without asking: EPERM, no ask event, one denial marked truncated.
fn expect_denied_truncated(ebpf: &mut Ebpf, cgroup: &Cgroup, args: &[&str]) -> ExecEvent {
    let _ = exec_events(ebpf);
    let asked_before = kernel::counter(ebpf, counter::EXEC_ASKED);
    let outcome = workload::run_in(cgroup, args, TIMEOUT);
    assert_eq!(outcome, Outcome::exec_denied(), "{args:?}");
    assert_eq!(
        kernel::counter(ebpf, counter::EXEC_ASKED),
        asked_before,
        "a truncated request must not be asked under on_truncated = deny: {args:?}"
    );
    let events = exec_events(ebpf);
    assert!(
        events.iter().all(|e| e.header.kind != event_kind::EXEC_ASK),
        "asked: {args:?}"
    );
    let denied = events
        .iter()
        .find(|e| e.header.kind == event_kind::EXEC_DENIED)
        .copied()
        .unwrap_or_else(|| panic!("no EXEC_DENIED event for {args:?}"));
    assert_eq!(denied.argv_truncated, 1, "{args:?}");
    assert_eq!(
        denied.denied_for,
        exec_denied_for::ARGV_TRUNCATED,
        "the denial says why: {args:?}"
    );
    denied
}

/// Writes a verdict for the paused request `event` and resumes it.
fn decide(ebpf: &mut Ebpf, event: &ExecEvent, verdict: u32) {
    kernel::decide_paused(
        ebpf,
        event.header.pid,
        event.header.tid,
        event.header.digest,
        verdict,
    );
}

/// Starts the exec, waits until it is paused and returns its ask.
fn asked(ebpf: &mut Ebpf, cgroup: &Cgroup, args: &[&str]) -> (std::process::Child, ExecEvent) {
    let _ = exec_events(ebpf);
    let child = cgroup.spawn(&mut workload(args));
    let event: ExecEvent = wait_event(ebpf, event_kind::EXEC_ASK, TIMEOUT);
    wait_stopped(event.header.pid, TIMEOUT);
    (child, event)
}

/// `true` with 40 arguments in all; argument 35 is `arg35-<tag>`.
fn forty_args(tag: &str) -> Vec<String> {
    let mut argv = vec!["true".to_owned()];
    argv.extend((1..40).map(|i| {
        if i == 35 {
            format!("arg35-{tag}")
        } else {
            format!("a{i}")
        }
    }));
    argv
}

/// `sh -c '<4,200 spaces>COMMAND'`: the command starts past the 4 KiB the
/// kernel captures.
fn spaced_sh(command: &str) -> Vec<String> {
    vec![
        "sh".to_owned(),
        "-c".to_owned(),
        format!("{}{command}", " ".repeat(4200)),
    ]
}

#[test]
fn truncated_argv_is_denied_by_default_and_never_asked() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-truncated-deny");
    // Exec allowed (the workload runs), an ask rule on a busybox copy.
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ALLOW);
    let tool = exec_rule_on_busybox_copy(&mut ebpf, POLICY_ID, "gk-trunc-deny", action::ASK);
    let tool = tool.to_str().expect("utf-8 path");

    for uid in [None, Some(NOBODY)] {
        // 40 arguments: 32 are captured.
        let argv = forty_args("x");
        let denied =
            expect_denied_truncated(&mut ebpf, &cgroup, &exec_args(uid, "exec", tool, &argv));
        assert_eq!(denied.argc, 32, "the capture keeps 32 arguments");
        assert_eq!(
            kernel::event_argv(&denied),
            argv[..32],
            "the captured prefix"
        );

        // `sh -c` with the command after 4,200 spaces.
        let argv = spaced_sh("true");
        let denied =
            expect_denied_truncated(&mut ebpf, &cgroup, &exec_args(uid, "exec", tool, &argv));
        assert!(
            !kernel::event_argv(&denied).concat().contains("true"),
            "the command lies past the capture"
        );

        // One argument longer than the capture, which it fills alone.
        let argv = vec!["y".repeat(5000)];
        let denied =
            expect_denied_truncated(&mut ebpf, &cgroup, &exec_args(uid, "exec", tool, &argv));
        assert_eq!(denied.argc, 1, "the long argument is captured, cut");

        // Control: a short argv still asks, and a verdict allows it.
        let argv = vec!["true".to_owned(), "short".to_owned()];
        let args = exec_args(uid, "exec", tool, &argv);
        let (mut child, ask) = asked(&mut ebpf, &cgroup, &args);
        assert_eq!(ask.argv_truncated, 0);
        assert_eq!(kernel::event_argv(&ask), argv);
        decide(&mut ebpf, &ask, action::ALLOW);
        assert_eq!(
            workload::finish(&mut child, TIMEOUT),
            Outcome::exec_ran(),
            "the approved short exec runs ({uid:?})"
        );
    }
}

#[test]
fn truncated_argv_under_on_truncated_ask_is_asked_marked_and_never_granted() {
    require_vm();
    let cgroup = Cgroup::create("gatekeep-truncated-ask");
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ALLOW);
    let tool = exec_rule_on_busybox_copy(&mut ebpf, POLICY_ID, "gk-trunc-ask", action::ASK);
    let tool = tool.to_str().expect("utf-8 path");
    set_on_truncated(&mut ebpf, action::ASK);

    for uid in [None, Some(NOBODY)] {
        // 1. Asked, marked truncated; a reviewer's verdict allows that request.
        let first = forty_args("first");
        let (mut child, ask) = asked(&mut ebpf, &cgroup, &exec_args(uid, "exec", tool, &first));
        assert_eq!(ask.argv_truncated, 1, "the request is marked truncated");
        assert_eq!(ask.argc, 32);
        decide(&mut ebpf, &ask, action::ALLOW);
        assert_eq!(workload::finish(&mut child, TIMEOUT), Outcome::exec_ran());

        // 2. A grant for its digest (a reviewer granting a duration) covers
        //    nothing truncated: an exec differing only at argument 35 has the
        //    same captured prefix, yet is asked again, not granted.
        let mut grants: HashMap<_, GrantKey, Grant> =
            HashMap::try_from(ebpf.map_mut(map_names::GRANTS).expect(map_names::GRANTS))
                .expect("hash map");
        let key = GrantKey {
            policy_id: POLICY_ID,
            kind: request_kind::EXEC,
            digest: ask.header.digest,
            cgroup_id: 0,
        };
        grants
            .insert(
                key,
                Grant {
                    expires_ns: 0,
                    cgroup_id: 0,
                },
                0,
            )
            .expect("write grant");
        let granted_before = kernel::counter(&ebpf, counter::GRANT_ALLOWED);
        let second = forty_args("second");
        let (mut child, ask_2) = asked(&mut ebpf, &cgroup, &exec_args(uid, "exec", tool, &second));
        assert_eq!(ask_2.argv_truncated, 1);
        decide(&mut ebpf, &ask_2, action::DENY);
        assert_eq!(
            workload::finish(&mut child, TIMEOUT),
            Outcome::exec_denied(),
            "the other exec is not covered by the first one's verdict or grant"
        );
        // And the first one itself is asked again: no grant for truncated requests.
        let (mut child, ask_3) = asked(&mut ebpf, &cgroup, &exec_args(uid, "exec", tool, &first));
        decide(&mut ebpf, &ask_3, action::DENY);
        assert_eq!(
            workload::finish(&mut child, TIMEOUT),
            Outcome::exec_denied()
        );
        assert_eq!(
            kernel::counter(&ebpf, counter::GRANT_ALLOWED),
            granted_before,
            "a grant let a truncated request through"
        );
        let mut grants: HashMap<_, GrantKey, Grant> =
            HashMap::try_from(ebpf.map_mut(map_names::GRANTS).expect(map_names::GRANTS))
                .expect("hash map");
        grants.remove(&key).expect("remove grant");

        // 3. `sh -c` past 4 KiB: asked, marked truncated.
        let argv = spaced_sh("true");
        let (mut child, ask) = asked(&mut ebpf, &cgroup, &exec_args(uid, "exec", tool, &argv));
        assert_eq!(ask.argv_truncated, 1);
        decide(&mut ebpf, &ask, action::DENY);
        assert_eq!(
            workload::finish(&mut child, TIMEOUT),
            Outcome::exec_denied()
        );
    }
}

/// Whether an `int 0x80` exec of an ungated program works here (the kernel has
/// IA32 emulation): it runs `true`, or the process dies of SIGSEGV (no gate).
fn ia32_available() -> bool {
    let outcome = workload::finish(
        &mut workload(&["exec32", "/bin/true", "true"])
            .spawn()
            .expect("start the workload"),
        TIMEOUT,
    );
    match outcome.code {
        0 => true,
        -1 => false,
        _ => panic!("int 0x80 exec of /bin/true outside gating failed: {outcome:?}"),
    }
}

#[test]
fn compat_int80_exec_is_asked_with_its_whole_argv_and_environment() {
    require_vm();
    if !ia32_available() {
        // No IA32 emulation: `int 0x80` faults before any exec, so no compat
        // exec can happen here at all; the gated attempt must not run either.
        eprintln!(
            "kernel without IA32 emulation: int 0x80 faults (SIGSEGV); checking the refusal only"
        );
        let cgroup = Cgroup::create("gatekeep-truncated-compat");
        let _ebpf = attach_gating(&cgroup, POLICY_ID, action::ASK);
        let outcome = workload::run_in(&cgroup, &["exec32", "/bin/true", "true"], TIMEOUT);
        assert_eq!(outcome.code, -1, "{outcome:?}");
        return;
    }
    let cgroup = Cgroup::create("gatekeep-truncated-compat");
    let mut ebpf = attach_gating(&cgroup, POLICY_ID, action::ALLOW);
    let tool = exec_rule_on_busybox_copy(&mut ebpf, POLICY_ID, "gk-trunc-compat", action::ASK);
    let tool = tool.to_str().expect("utf-8 path");
    let argv = vec!["true".to_owned(), "compat".to_owned()];

    for uid in [None, Some(NOBODY)] {
        // The same file by a 64-bit exec: asked with its argv (control).
        set_on_truncated(&mut ebpf, action::DENY);
        let args = exec_args(uid, "exec", tool, &argv);
        let (mut child, ask) = asked(&mut ebpf, &cgroup, &args);
        assert_eq!(ask.argv_truncated, 0);
        decide(&mut ebpf, &ask, action::DENY);
        assert_eq!(
            workload::finish(&mut child, TIMEOUT),
            Outcome::exec_denied()
        );

        let asked_64 = ask;

        // By `int 0x80` (ia32 execve, 32-bit pointer arrays, garbage in the
        // registers' upper halves): asked with its whole argv, not truncated,
        // under the default on_truncated = "deny".
        let args = exec_args(uid, "exec32", tool, &argv);
        let (mut child, ask) = asked(&mut ebpf, &cgroup, &args);
        assert_eq!(
            ask.argv_truncated, 0,
            "a compat exec's argv is read ({uid:?})"
        );
        assert_eq!(kernel::event_argv(&ask), argv, "the whole argv is shown");
        assert_eq!(kernel::event_env(&ask), Vec::<String>::new());
        if kernel::event_env(&asked_64).is_empty() {
            assert_eq!(
                ask.header.digest, asked_64.header.digest,
                "the same file, argv and bound environment: the same request"
            );
        }
        let plain_digest = ask.header.digest;
        decide(&mut ebpf, &ask, action::ALLOW);
        assert_eq!(
            workload::finish(&mut child, TIMEOUT),
            Outcome::exec_ran(),
            "the approved compat exec runs"
        );

        // Its 32-bit envp is read too: LD_PRELOAD is shown and bound.
        let mut with_env = argv.clone();
        with_env.extend(["--env", "FOO=bar", "LD_PRELOAD=/tmp/evil.so"].map(str::to_owned));
        let args = exec_args(uid, "exec32", tool, &with_env);
        let (mut child, ask) = asked(&mut ebpf, &cgroup, &args);
        assert_eq!(ask.argv_truncated, 0);
        assert_eq!(kernel::event_argv(&ask), argv);
        assert_eq!(kernel::event_env(&ask), ["LD_PRELOAD=/tmp/evil.so"]);
        assert_ne!(ask.header.digest, plain_digest);
        decide(&mut ebpf, &ask, action::DENY);
        assert_eq!(
            workload::finish(&mut child, TIMEOUT),
            Outcome::exec_denied()
        );

        // A compat argv past the capture is truncated like a 64-bit one:
        // denied without asking, its first 32 arguments shown.
        let long = forty_args("compat");
        let args = exec_args(uid, "exec32", tool, &long);
        let denied = expect_denied_truncated(&mut ebpf, &cgroup, &args);
        assert_eq!(denied.argc, 32);
        assert_eq!(kernel::event_argv(&denied), long[..32]);
    }
}

/// With the agent, the embedded service and the CLI: a reviewer sees a
/// truncated request marked as such (`review list` and `review show`, and
/// `argv_truncated` in the request), and under the default the kernel's
/// denial is on record with its reason.
#[test]
fn truncated_argv_end_to_end_is_marked_for_reviewers_and_its_denial_recorded() {
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
    let cgroup_name = "gk-truncated-e2e";
    let cgroup = Cgroup::create(cgroup_name);
    let text = |on_truncated: &str| {
        let exec = format!(
            "default = \"allow\"\nask = [\"{echo}\"]\n{on_truncated}\nallow = [\"{}\"]",
            workload_path()
        );
        policy::policy(
            cgroup_name,
            &format!("/sys/fs/cgroup/{cgroup_name}"),
            &[
                ("exec", exec.as_str()),
                ("approval", "timeout = \"5m\"\non_timeout = \"deny\""),
            ],
        )
    };
    let agent = Agent::start_with(
        "truncated-e2e",
        &text("on_truncated = \"ask\""),
        &embedded_decision(17491),
    );
    let patience = Duration::from_mins(1);

    // 1. on_truncated = "ask": asked and marked, as root and unprivileged.
    let mut argv = vec!["true".to_owned()];
    argv.extend((1..40).map(|i| format!("a{i}\u{1b}[2J")));
    let mut seen = Vec::new();
    for uid in [None, Some(NOBODY)] {
        let args = exec_args(uid, "exec", &echo, &argv);
        let mut child = cgroup.spawn(&mut workload(&args));
        wait_stopped(child.id(), patience);
        let request = gatekeep_tests::wait_for("a new pending request", patience, || {
            agent
                .wait_pending(1, patience)
                .into_iter()
                .find(|r| !seen.contains(&request_id(r)))
        });
        seen.push(request_id(&request));
        let target = &request["request"]["target"];
        assert_eq!(target["argv_truncated"], true, "{request:#}");
        assert_eq!(
            target["argv"].as_array().map(Vec::len),
            Some(32),
            "{target}"
        );
        let listed = agent.cli_ok(&["review", "list"], "review list");
        assert!(listed.contains("[ARGV TRUNCATED]"), "{listed}");
        assert!(!listed.contains('\u{1b}'), "escaped: {listed}");
        let shown = agent.cli_ok(&["review", "show", &request_id(&request)], "review show");
        assert!(
            shown
                .lines()
                .any(|l| l.starts_with("truncated") && l.contains("ARGV TRUNCATED")),
            "{shown}"
        );
        assert!(!shown.contains('\u{1b}'), "escaped: {shown}");
        agent.cli_ok(&["review", "deny", &request_id(&request)], "review deny");
        assert_eq!(
            workload::finish(&mut child, patience),
            Outcome::exec_denied()
        );
    }

    // 2. The default (deny): refused in the kernel, on record with its reason.
    agent.replace_policy(&text(""));
    agent.wait_log("policy reloaded", 1, patience);
    let outcome = workload::run_in(&cgroup, &exec_args(None, "exec", &echo, &argv), patience);
    assert_eq!(outcome, Outcome::exec_denied());
    let record = agent.wait_record("kernel_denied", patience, |r| {
        r["payload"]["reason"] == "argv_truncated"
    });
    let payload = &record["payload"];
    assert_eq!(payload["rule"], "exec on_truncated deny", "{payload:#}");
    assert_eq!(
        payload["kernel"]["exec"]["argv_truncated"], true,
        "{payload:#}"
    );
    assert_eq!(payload["target"]["argv_truncated"], true, "{payload:#}");
    // A short argv is still asked (control).
    let short = vec!["true".to_owned(), "short".to_owned()];
    let mut child = cgroup.spawn(&mut workload(&exec_args(None, "exec", &echo, &short)));
    wait_stopped(child.id(), patience);
    let request = gatekeep_tests::wait_for("the short request", patience, || {
        agent
            .wait_pending(1, patience)
            .into_iter()
            .find(|r| !seen.contains(&request_id(r)))
    });
    assert!(
        request["request"]["target"].get("argv_truncated").is_none(),
        "{request:#}"
    );
    agent.cli_ok(
        &["review", "approve", &request_id(&request)],
        "review approve",
    );
    assert_eq!(workload::finish(&mut child, patience), Outcome::exec_ran());
}
