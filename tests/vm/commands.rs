//! Command-line rules, scripts run by interpreters and applets of multi-call
//! binaries, on the real kernel, as root inside the gated cgroup: the kernel
//! hands the executables with such rules to the agent (paused as an ask),
//! which decides allow and deny itself and asks a reviewer only for ask.

use std::{
    os::unix::fs::{PermissionsExt as _, symlink},
    path::Path,
    time::Duration,
};

use gatekeep_tests::{
    Agent, Cgroup, gate_exec,
    policy::on_timeout,
    require_vm,
    workload::{Outcome, run_in, tool},
};

/// A `[[policy.exec.command]]` table.
fn command(argv: &[&str], action: &str) -> String {
    let argv: Vec<String> = argv.iter().map(|arg| format!("{arg:?}")).collect();
    format!(
        "[[policy.exec.command]]\nargv = [{}]\naction = \"{action}\"\n",
        argv.join(", ")
    )
}

/// The `requested` record of the exec whose argv is `argv`.
fn requested(agent: &Agent, argv: &[&str]) -> serde_json::Value {
    agent.wait_record("requested", Duration::from_secs(30), |r| {
        r["payload"]["request"]["target"]["argv"] == serde_json::json!(argv)
    })
}

/// The decision recorded for `request` (`decided` or `expired`).
fn decision_of(agent: &Agent, request: &serde_json::Value) -> serde_json::Value {
    gatekeep_tests::wait_for("the decision", Duration::from_secs(30), || {
        ["decided", "expired"]
            .iter()
            .flat_map(|kind| agent.records_of(kind))
            .find(|r| r["request_id"] == request["request_id"])
    })
}

/// A shell script at `dir/name`, executable.
fn script(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, "#!/bin/sh\necho deployed\n").expect("write the script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path.to_string_lossy().into_owned()
}

#[test]
fn kubectl_delete_is_asked_while_kubectl_get_runs_at_once() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    // A stand-in: busybox under its own inode, run as `true` (argv[0]) so
    // it exits 0 whatever its arguments; the rules match argv[1..].
    let kubectl = tool(dir.path(), "kubectl");
    let exec = format!(
        "default = \"allow\"\n{}{}{}",
        command(&[&kubectl, "delete", "**"], "ask"),
        command(&[&kubectl, "get", "**"], "allow"),
        command(&[&kubectl, "get", "secrets", "**"], "deny"),
    );
    let (cgroup, agent) = gate_exec("cmd-kubectl", &exec, &on_timeout("3s", "deny"));

    // get: decided by its rule in the agent, no reviewer, runs.
    let outcome = run_in(
        &cgroup,
        &["exec", &kubectl, "true", "get", "pods"],
        Duration::from_secs(30),
    );
    outcome.assert_no_513();
    assert_eq!(outcome, Outcome::exec_ran(), "kubectl get must run");
    let get = requested(&agent, &["true", "get", "pods"]);
    assert_eq!(
        get["payload"]["request"]["rule"],
        format!("exec command allow [\"{kubectl}\", \"get\", \"**\"]"),
        "{get}"
    );
    let decided = decision_of(&agent, &get);
    assert_eq!(decided["kind"], "decided", "{decided}");
    assert_eq!(decided["actor"], "policy", "decided by the rule: {decided}");
    assert_eq!(decided["payload"]["verdict"], "allow", "{decided}");

    // The more specific deny wins over `get **`, also decided at once.
    let outcome = run_in(
        &cgroup,
        &["exec", &kubectl, "true", "get", "secrets", "-A"],
        Duration::from_secs(30),
    );
    assert_eq!(
        outcome,
        Outcome::exec_denied(),
        "kubectl get secrets is denied"
    );
    let secrets = requested(&agent, &["true", "get", "secrets", "-A"]);
    assert_eq!(decision_of(&agent, &secrets)["actor"], "policy");

    // delete: asked; nobody answers, so the timeout (deny) decides.
    let outcome = run_in(
        &cgroup,
        &["exec", &kubectl, "true", "delete", "pod", "web-1"],
        Duration::from_mins(1),
    );
    outcome.assert_no_513();
    assert_eq!(outcome, Outcome::exec_denied(), "denied at the timeout");
    let delete = requested(&agent, &["true", "delete", "pod", "web-1"]);
    assert_eq!(
        delete["payload"]["request"]["rule"],
        format!("exec command ask [\"{kubectl}\", \"delete\", \"**\"]"),
        "{delete}"
    );
    let expired = decision_of(&agent, &delete);
    assert_eq!(
        expired["kind"], "expired",
        "a reviewer was asked: {expired}"
    );
    assert_eq!(expired["actor"], "timeout", "{expired}");

    // An argv the kernel cannot bind whole is on_truncated (deny), even for
    // `get`, which its rule allows.
    let many: Vec<String> = (0..40).map(|i| format!("a{i}")).collect();
    let mut args = vec!["exec", kubectl.as_str(), "true", "get"];
    args.extend(many.iter().map(String::as_str));
    assert_eq!(
        run_in(&cgroup, &args, Duration::from_secs(30)),
        Outcome::exec_denied(),
        "a truncated argv is never matched to an allow"
    );
}

#[test]
fn a_script_run_by_an_interpreter_is_asked_exactly_like_the_script() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let deploy = script(dir.path(), "deploy.sh");
    let other = script(dir.path(), "other.sh");
    let dir_str = dir.path().to_string_lossy().into_owned();
    // /bin/sh is busybox in the VM: its shells are told by applet name.
    let exec = format!(
        "default = \"allow\"\nask = [\"{deploy}\"]\nmulticall = [\"/bin/busybox\"]\ninterpreters = [\"/usr/local/bin/bash\"]"
    );
    let (cgroup, agent) = gate_exec("cmd-script", &exec, &on_timeout("2s", "deny"));

    let ways: [&[&str]; 6] = [
        &["chdir-exec", &dir_str, "./deploy.sh", "./deploy.sh"],
        &["chdir-exec", &dir_str, "/bin/sh", "sh", "deploy.sh"],
        &["chdir-exec", &dir_str, "/bin/sh", "sh", "-e", "./deploy.sh"],
        &["exec", "/bin/busybox", "busybox", "ash", &deploy],
        &[
            "chdir-exec",
            &dir_str,
            "/usr/local/bin/bash",
            "bash",
            "deploy.sh",
        ],
        &[
            "chdir-exec",
            &dir_str,
            "/usr/local/bin/bash",
            "bash",
            "--norc",
            "-x",
            "deploy.sh",
        ],
    ];
    for args in ways {
        let outcome = run_in(&cgroup, args, Duration::from_mins(1));
        outcome.assert_no_513();
        assert_eq!(
            outcome,
            Outcome::exec_denied(),
            "{args:?} must be asked (and denied at the timeout) like ./deploy.sh"
        );
        let argv = &args[if args[0] == "exec" { 2 } else { 3 }..];
        let asked = requested(&agent, argv);
        assert!(
            asked["payload"]["request"]["rule"]
                .as_str()
                .is_some_and(|rule| rule.starts_with(&format!("exec ask {deploy}"))),
            "{asked}"
        );
        assert_eq!(decision_of(&agent, &asked)["actor"], "timeout");
    }

    // Another script runs: the shell's own decision (allow), at once.
    let outcome = run_in(
        &cgroup,
        &["chdir-exec", &dir_str, "/bin/sh", "sh", "other.sh"],
        Duration::from_secs(30),
    );
    assert_eq!(outcome, Outcome::new(0, "deployed"), "{other} runs");
    let ran = requested(&agent, &["sh", "other.sh"]);
    assert_eq!(decision_of(&agent, &ran)["actor"], "policy");
}

#[test]
fn an_applet_of_an_allowed_multicall_binary_is_denied_by_name() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let innocent = dir.path().join("innocent");
    symlink("/bin/busybox", &innocent).expect("symlink");
    let innocent = innocent.to_string_lossy().into_owned();
    let exec = format!(
        "default = \"allow\"\nallow = [\"/bin/busybox\"]\nmulticall = [\"/bin/busybox\"]\n{}",
        command(&["/bin/busybox", "wget", "**"], "deny"),
    );
    let (cgroup, agent) = gate_exec("cmd-applet", &exec, &on_timeout("30s", "allow"));

    let ways: [&[&str]; 5] = [
        &["exec", "/bin/busybox", "wget", "http://10.0.2.2/x"],
        &[
            "exec",
            "/bin/busybox",
            "busybox",
            "wget",
            "http://10.0.2.2/x",
        ],
        &["exec", "/bin/busybox", "/tmp/busybox", "/x/wget", "-q"],
        &["exec", &innocent, "wget", "-q"],
        &["exec", &innocent, "-wget"],
    ];
    for args in ways {
        let outcome = run_in(&cgroup, args, Duration::from_secs(30));
        outcome.assert_no_513();
        assert_eq!(
            outcome,
            Outcome::exec_denied(),
            "{args:?} runs wget: denied"
        );
        let denied = requested(&agent, &args[2..]);
        assert_eq!(
            denied["payload"]["request"]["rule"],
            "exec command deny [\"/bin/busybox\", \"wget\", \"**\"]",
            "{denied}"
        );
        assert_eq!(decision_of(&agent, &denied)["actor"], "policy");
    }
    // Other applets of the same binary run, however named.
    for args in [
        &["exec", "/bin/busybox", "true"][..],
        &["exec", &innocent, "busybox", "true", "wget"][..],
    ] {
        assert_eq!(
            run_in(&cgroup, args, Duration::from_secs(30)),
            Outcome::exec_ran(),
            "{args:?}"
        );
    }
}

#[test]
fn audit_mode_pauses_nothing_for_command_rules_and_records_what_they_would_do() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let kubectl = tool(dir.path(), "kubectl");
    let name = "gk-cmd-audit";
    let cgroup = Cgroup::create(name);
    let text = gatekeep_tests::policy::exec(
        name,
        &format!(
            "default = \"allow\"\nmulticall = [\"/bin/busybox\"]\n{}{}",
            command(&[&kubectl, "delete", "**"], "ask"),
            command(&["/bin/busybox", "wget", "**"], "deny"),
        ),
        &on_timeout("30s", "deny"),
    )
    .replacen("[policy.exec]", "mode = \"audit\"\n[policy.exec]", 1);
    let agent = Agent::start("cmd-audit", &text);

    for args in [
        &["exec", kubectl.as_str(), "true", "delete", "pod", "x"][..],
        &["exec", kubectl.as_str(), "true", "get", "pods"][..],
        &["exec", "/bin/busybox", "true", "wget"][..],
    ] {
        let outcome = run_in(&cgroup, args, Duration::from_secs(30));
        outcome.assert_no_513();
        assert_eq!(outcome, Outcome::exec_ran(), "audit mode runs {args:?}");
    }
    // `wget` runs too (it fails on its own: no such host).
    let outcome = run_in(
        &cgroup,
        &[
            "exec",
            "/bin/busybox",
            "wget",
            "-q",
            "-T",
            "1",
            "http://127.0.0.1:1/",
        ],
        Duration::from_secs(30),
    );
    assert_ne!(outcome, Outcome::exec_denied(), "audit mode must not deny");

    let would = |argv: &str| {
        gatekeep_tests::wait_for("the audited record", Duration::from_secs(30), || {
            agent
                .records_of("audited")
                .into_iter()
                .find(|r| r["payload"]["target"]["argv"].to_string().contains(argv))
        })
    };
    let delete = would("delete");
    assert_eq!(delete["payload"]["would"], "ask", "{delete}");
    assert_eq!(
        delete["payload"]["rule"],
        format!("exec command ask [\"{kubectl}\", \"delete\", \"**\"]")
    );
    let wget = would("http://127.0.0.1:1/");
    assert_eq!(wget["payload"]["would"], "deny", "{wget}");
    assert!(
        agent.records_of("requested").is_empty(),
        "audit mode asks nobody"
    );
    // What an allow decides is not recorded as something enforcement would
    // have touched.
    assert!(
        !agent
            .records_of("audited")
            .iter()
            .any(|r| r["payload"]["target"]["argv"]
                .to_string()
                .contains("\"get\"")),
        "kubectl get would have run"
    );
}
