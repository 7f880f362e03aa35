//! Exec identity bound to content (issue 19, item 1), tried as the workload
//! would: as root inside the gated cgroup, and unprivileged (`as-user 65534`).
//!
//! - a script paused for approval is rewritten in place while it waits; the
//!   reviewer approves what they were shown, and the new content does not
//!   run under that approval: the restart is a new request, asked again;
//! - an allow-listed file rewritten in place (same inode) no longer runs as
//!   allowed under `default = "deny"`; the agent reports the stale rule
//!   (`rule_stale`), a rescan does not re-bind it, and a policy reload does;
//! - a grant for a file's exec does not cover the file once rewritten.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    process::Child,
    time::Duration,
};

use gatekeep_tests::{
    Agent, Cgroup, embedded_decision, gate_exec, is_stopped, policy, require_vm,
    review::{Reviewer, request_id},
    wait_for,
    workload::{self, Outcome, run_in, start_paused, tool, workload_path},
};
use serde_json::Value;

/// How long anything in the flow may take under software emulation.
const PATIENCE: Duration = Duration::from_mins(1);
/// The unprivileged user the tests drop to.
const NOBODY: &str = "65534";

/// `args`, run as root (`None`) or as `uid`.
fn as_user<'a>(uid: Option<&'a str>, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = Vec::new();
    if let Some(uid) = uid {
        all.extend(["as-user", uid]);
    }
    all.extend_from_slice(args);
    all
}

/// A folder everyone may enter, for files the unprivileged user rewrites.
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod dir");
    dir
}

/// Lets everyone write (and run) `path`.
fn world_writable(path: &str) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o777)).expect("chmod file");
}

/// Rewrites `path` in place from inside `cgroup` (as root or `uid`): the
/// same inode, and (`put`) the same size.
fn rewrite_in_place(cgroup: &Cgroup, uid: Option<&str>, op: &[&str]) {
    let inode = fs::metadata(op[1]).expect("stat before").ino();
    let outcome = run_in(cgroup, &as_user(uid, &[&["fs"], op].concat()), PATIENCE);
    assert_eq!(
        outcome,
        Outcome {
            code: 0,
            stdout: "ok".into()
        },
        "the workload ({uid:?}) may write {}",
        op[1]
    );
    assert_eq!(
        fs::metadata(op[1]).expect("stat after").ino(),
        inode,
        "rewritten in place: the same inode"
    );
}

fn finish(child: &mut Child) -> Outcome {
    let outcome = workload::finish(child, PATIENCE);
    outcome.assert_no_513();
    outcome
}

/// The pending requests at the agent's embedded service other than `seen`.
fn wait_other_request(agent: &Agent, seen: &str) -> Value {
    wait_for("a new pending request", PATIENCE, || {
        agent
            .wait_pending(0, PATIENCE)
            .into_iter()
            .find(|r| request_id(r) != seen)
    })
}

#[test]
fn a_script_rewritten_while_its_exec_waits_is_asked_again_not_run_under_the_approval() {
    require_vm();
    let dir = open_dir();
    let script = dir.path().join("deploy.sh");
    let script = script.to_str().expect("utf8").to_owned();
    // The reviewed content prints `v1`; the rewrite (same size) `v2`.
    let reviewed = "#!/bin/sh\necho v1\n";
    fs::write(&script, reviewed).expect("write script");
    world_writable(&script);
    let cgroup_name = "gk-content-script";
    let cgroup = Cgroup::create(cgroup_name);
    let policy_text = policy::exec(
        cgroup_name,
        &policy::allow_but("ask", &script),
        "timeout = \"5m\"\non_timeout = \"deny\"",
    );
    let agent = Agent::start_with("content-script", &policy_text, &embedded_decision(17471));

    for (round, uid) in [None, Some(NOBODY)].into_iter().enumerate() {
        if round > 0 {
            // The reviewed content again, and a reload binding the rule to it.
            fs::write(&script, reviewed).expect("write script");
            agent.replace_policy(&policy_text);
            agent.wait_log("policy reloaded", round, PATIENCE);
        }

        let mut paused = start_paused(
            &cgroup,
            &as_user(uid, &["exec", &script, "deploy.sh"]),
            PATIENCE,
        );
        let asked = agent.wait_request_id(PATIENCE);

        // While the reviewer looks, the workload rewrites the script.
        rewrite_in_place(&cgroup, uid, &["put", &script, "#!/bin/sh\necho v2\n"]);

        // The reviewer approves what they were shown ...
        agent.cli_ok(&["review", "approve", &asked], "review approve");
        // ... and the restarted exec, which would run the new content, is a
        // new request: asked again, still paused.
        let again = wait_other_request(&agent, &asked);
        assert!(
            is_stopped(paused.id()),
            "({uid:?}) the rewritten script must not run under the old approval"
        );
        assert_eq!(again["request"]["target"]["executable"], script.as_str());
        agent.cli_ok(
            &["review", "deny", &request_id(&again)],
            "review deny the rewritten script",
        );
        assert_eq!(
            finish(&mut paused),
            Outcome::exec_denied(),
            "({uid:?}) the new content never ran (it would print v2)"
        );
    }
}

#[test]
fn an_allowed_file_rewritten_in_place_is_no_longer_allowed_until_a_reload() {
    require_vm();
    let dir = open_dir();
    let allowed = tool(dir.path(), "allowed-tool");
    world_writable(&allowed);
    let exec = format!(
        "default = \"deny\"\nallow = [\"{}\", \"{allowed}\"]",
        workload_path()
    );
    let (cgroup, agent) = gate_exec("content-allow", &exec, "");
    let policy_text = policy::exec("gk-content-allow", &exec, "");

    assert_eq!(
        run_in(&cgroup, &["exec", &allowed, "true"], PATIENCE),
        Outcome::exec_ran(),
        "the allow-listed file runs as loaded"
    );

    for (round, uid) in [None, Some(NOBODY)].into_iter().enumerate() {
        // One byte appended: the ELF still runs, but it is other content.
        rewrite_in_place(&cgroup, uid, &["write", &allowed]);
        let run = as_user(uid, &["exec", &allowed, "true"]);
        assert_eq!(
            run_in(&cgroup, &run, PATIENCE),
            Outcome::exec_denied(),
            "({uid:?}) a rewritten allow-listed file meets the default (deny)"
        );

        // The agent reports it: a warning and a `rule_stale` record.
        let records = wait_for("a rule_stale record per rewrite", PATIENCE, || {
            let records = agent.records_of("rule_stale");
            (records.len() > round).then_some(records)
        });
        let record = &records[round];
        assert_eq!(record["payload"]["path"], allowed.as_str(), "{record}");
        assert_eq!(record["payload"]["policy"], "gk-content-allow");
        assert_eq!(record["payload"]["rule_action"], "allow");
        assert_eq!(record["payload"]["applied"], "deny");
        assert_eq!(
            record["payload"]["found"]["size"],
            fs::metadata(&allowed).expect("stat").len()
        );
        assert_ne!(record["payload"]["bound"], record["payload"]["found"]);
        agent.wait_log("exec rule is stale", round + 1, PATIENCE);

        // The rescans (every second) recompile the rules from the files:
        // they must keep the binding made at load. (Not a timing assertion:
        // the pause only lets rescans happen before the check.)
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(
            run_in(&cgroup, &run, PATIENCE),
            Outcome::exec_denied(),
            "({uid:?}) a rescan must not re-bind the rule to the new content"
        );
        assert_eq!(
            agent.records_of("rule_stale").len(),
            round + 1,
            "one report per rule and content, not one per exec"
        );

        // A reload binds the rule to the file's content now.
        agent.replace_policy(&policy_text);
        agent.wait_log("policy reloaded", round + 1, PATIENCE);
        assert_eq!(
            run_in(&cgroup, &run, PATIENCE),
            Outcome::exec_ran(),
            "({uid:?}) after a reload the rule matches again"
        );
    }
}

#[test]
fn a_grant_does_not_cover_the_file_once_rewritten() {
    require_vm();
    let dir = open_dir();
    let asked = tool(dir.path(), "granted-tool");
    world_writable(&asked);
    let cgroup_name = "gk-content-grant";
    let cgroup = Cgroup::create(cgroup_name);
    let agent = Agent::start_with(
        "content-grant",
        &policy::exec(
            cgroup_name,
            &policy::allow_but("ask", &asked),
            "timeout = \"5m\"\ngrant_durations = [\"1h\"]",
        ),
        &embedded_decision(17472),
    );

    for (round, uid) in [None, Some(NOBODY)].into_iter().enumerate() {
        let run = as_user(uid, &["exec", &asked, "true", "v1"]);
        // Asked, and granted for an hour.
        let mut first = start_paused(&cgroup, &run, PATIENCE);
        let id = agent.wait_request_id(PATIENCE);
        agent.cli_ok(
            &["review", "approve", &id, "--for", "1h"],
            "review approve --for 1h",
        );
        assert_eq!(finish(&mut first), Outcome::exec_ran());
        wait_for("the grant installed", PATIENCE, || {
            (agent.records_of("grant_installed").len() > round).then_some(())
        });

        // The identical exec runs on the grant, unasked.
        let before = agent.counter("grant_allowed");
        assert_eq!(run_in(&cgroup, &run, PATIENCE), Outcome::exec_ran());
        assert!(
            agent.counter("grant_allowed") > before,
            "({uid:?}) the identical exec ran on the grant"
        );

        // Rewritten in place: the same exec is asked again, the grant does
        // not cover the new content.
        rewrite_in_place(&cgroup, uid, &["write", &asked]);
        let requested = agent.records_of("requested").len();
        let mut again = start_paused(&cgroup, &run, PATIENCE);
        let id = agent.wait_request_id(PATIENCE);
        assert_eq!(
            agent.records_of("requested").len(),
            requested + 1,
            "({uid:?}) the rewritten file's exec is a new request"
        );
        agent.cli_ok(&["review", "deny", &id], "review deny");
        assert_eq!(finish(&mut again), Outcome::exec_denied());
    }
    assert!(
        Path::new(&asked).exists(),
        "the tool stays for the agent's records"
    );
}

/// `integrity = "sha256"`: an allow rule trusts its file's bytes. Rewritten
/// with the same bytes (a new content version), the file still runs: the
/// agent hashes it and allows it at once, and a rescan binds the rule to the
/// new version, so the kernel decides it again. Rewritten with other bytes,
/// it gets the default (deny), and the record names the hash found.
#[test]
fn under_integrity_sha256_the_same_bytes_run_after_a_rewrite_and_other_bytes_do_not() {
    require_vm();
    let dir = open_dir();
    let pinned = tool(dir.path(), "pinned-tool");
    world_writable(&pinned);
    let exec = format!(
        "default = \"deny\"\nintegrity = \"sha256\"\nallow = [\"{}\", \"{pinned}\"]",
        workload_path()
    );
    let (cgroup, agent) = gate_exec("content-sha256", &exec, "");
    let requested = || -> Vec<Value> {
        agent
            .records_of("requested")
            .into_iter()
            .filter(|r| r["payload"]["request"]["target"]["executable"] == pinned.as_str())
            .collect()
    };
    assert_eq!(
        run_in(&cgroup, &["exec", &pinned, "true"], PATIENCE),
        Outcome::exec_ran(),
        "the allow-listed file runs as loaded"
    );
    assert!(requested().is_empty(), "decided in the kernel");

    for (round, uid) in [None, Some(NOBODY)].into_iter().enumerate() {
        // The ELF magic written over itself: the same bytes, a new ctime.
        let before = fs::metadata(&pinned).expect("stat");
        rewrite_in_place(&cgroup, uid, &["put", &pinned, "\u{7f}ELF"]);
        let after = fs::metadata(&pinned).expect("stat");
        assert_ne!(
            (before.ctime(), before.ctime_nsec()),
            (after.ctime(), after.ctime_nsec()),
            "a new content version"
        );
        let run = as_user(uid, &["exec", &pinned, "true"]);
        let outcome = run_in(&cgroup, &run, PATIENCE);
        outcome.assert_no_513();
        assert_eq!(
            outcome,
            Outcome::exec_ran(),
            "({uid:?}) the same bytes still run"
        );
        let asked = wait_for("the agent's check", PATIENCE, || {
            requested().into_iter().nth(round)
        });
        let rule = asked["payload"]["request"]["rule"]
            .as_str()
            .expect("rule")
            .to_owned();
        assert!(
            rule.starts_with(&format!(
                "exec allow \"{pinned}\" (integrity sha256: rewritten with the same bytes, "
            )),
            "{asked}"
        );
        let decided = wait_for("the decision", PATIENCE, || {
            agent
                .records_of("decided")
                .into_iter()
                .find(|r| r["request_id"] == asked["request_id"])
        });
        assert_eq!(decided["actor"], "policy", "no reviewer: {decided}");
        assert_eq!(decided["payload"]["verdict"], "allow", "{decided}");
        assert!(
            agent.records_of("rule_stale").is_empty(),
            "a pinned rule is checked, not reported stale"
        );

        // A rescan (every second) binds the rule to the new version: then
        // the kernel allows it with nobody asked.
        wait_for(
            "a rescan to bind the rule to the same bytes",
            PATIENCE,
            || {
                let seen = requested().len();
                assert_eq!(run_in(&cgroup, &run, PATIENCE), Outcome::exec_ran());
                (requested().len() == seen).then_some(())
            },
        );
    }

    // Other bytes: one appended. The default (deny) applies.
    rewrite_in_place(&cgroup, None, &["write", &pinned]);
    let seen = requested().len();
    assert_eq!(
        run_in(&cgroup, &["exec", &pinned, "true"], PATIENCE),
        Outcome::exec_denied(),
        "other bytes are not what the rule allows"
    );
    let asked = wait_for("the agent's check", PATIENCE, || {
        requested().into_iter().nth(seen)
    });
    let rule = asked["payload"]["request"]["rule"].as_str().expect("rule");
    assert!(
        rule.starts_with(&format!(
            "exec default deny (\"{pinned}\" was rewritten and its SHA-256 is now "
        )),
        "{asked}"
    );
    // Rescans keep the load's pin: still denied, still checked by the agent.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        run_in(&cgroup, &["exec", &pinned, "true"], PATIENCE),
        Outcome::exec_denied(),
        "a rescan must not pin the new bytes"
    );
}
