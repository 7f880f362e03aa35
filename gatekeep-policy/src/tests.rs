//! Tests across modules: the shipped example, loading directories and file
//! sets, cgroup expansion of a whole policy set, serialisation.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    Action, GrantDuration, PolicyError, PolicySet, PortRange, load::load_sources, validate_paths,
};

const EXAMPLE: &str = include_str!("../examples/ai-agents.toml");

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ai-agents.toml")
}

#[test]
fn example_loads_with_the_documented_content() {
    let set = PolicySet::load_files(&[example_path()])
        .unwrap_or_else(|e| panic!("examples/ai-agents.toml is invalid:\n{e}"));
    let names: Vec<&str> = set.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["ai-agents", "ci-runners"]);

    let agents = &set.policies[0];
    assert_eq!(agents.cgroups.len(), 2);
    assert_eq!(agents.exec.default, Action::Ask);
    assert_eq!(agents.exec.rules.len(), 8);
    assert_eq!(agents.connect.rules.len(), 8);
    assert_eq!(agents.approval.reviewers, ["sre", "security"]);
    assert_eq!(agents.approval.timeout, Duration::from_mins(5));
    assert_eq!(
        agents.approval.grant_durations,
        [
            GrantDuration::Once,
            GrantDuration::For(Duration::from_hours(1)),
            GrantDuration::Session,
            GrantDuration::Always
        ]
    );
    // What the comments promise about matching.
    let ip = |s: &str| s.parse().expect(s);
    assert_eq!(
        agents.connect.action_for(ip("10.1.2.3"), 443),
        Action::Allow
    );
    assert_eq!(
        agents.connect.action_for(ip("10.1.99.1"), 443),
        Action::Deny
    );
    assert_eq!(
        agents.connect.action_for(ip("169.254.169.254"), 80),
        Action::Deny
    );
    assert_eq!(agents.connect.action_for(ip("192.0.2.1"), 80), Action::Ask);
    assert_eq!(agents.connect.unix, Action::Allow);
    assert_eq!(agents.connect.other_families, Action::Deny);
    assert_eq!(agents.connect.raw_sockets, Action::Deny);

    let ci = &set.policies[1];
    assert_eq!(ci.exec.default, Action::Allow);
    assert!(ci.exec.rules.is_empty());
    assert_eq!(ci.connect.unix, Action::Ask);
    assert_eq!(ci.approval.grant_durations, [GrantDuration::Once]);
}

#[test]
fn example_round_trips_through_serialisation() {
    let set = crate::parse_str("ai-agents.toml", EXAMPLE).expect("valid example");
    let json = serde_json::to_value(&set).expect("serialise");
    let agents = &json["policies"][0];
    assert_eq!(agents["name"], "ai-agents");
    assert_eq!(agents["cgroups"][0], "/sys/fs/cgroup/agents/*");
    assert_eq!(agents["exec"]["default"], "ask");
    assert_eq!(agents["exec"]["rules"][0]["path"], "/usr/bin/ls");
    assert_eq!(agents["exec"]["rules"][0]["action"], "allow");
    assert_eq!(agents["connect"]["rules"][3]["net"], "10.2.0.0/16");
    assert_eq!(
        agents["connect"]["rules"][3]["ports"],
        serde_json::json!([8000, 8999])
    );
    assert_eq!(agents["approval"]["timeout"], "5m");
    assert_eq!(
        agents["approval"]["grant_durations"],
        serde_json::json!(["once", "1h", "session", "always"])
    );

    // Writing the loaded rules back in the file syntax and loading that again
    // gives the same policy set.
    let mut text = String::new();
    for policy in &set.policies {
        text.push_str(&to_toml(policy));
    }
    let again = crate::parse_str("regenerated.toml", &text)
        .unwrap_or_else(|e| panic!("regenerated policy is invalid:\n{e}\n{text}"));
    assert_eq!(again, set);
}

/// The policy in the file syntax, from the domain types only.
fn to_toml(policy: &crate::Policy) -> String {
    use std::fmt::Write as _;

    let quoted = |items: Vec<String>| {
        items
            .iter()
            .map(|item| format!("\"{item}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::new();
    let cgroups = quoted(policy.cgroups.iter().map(ToString::to_string).collect());
    let _ = writeln!(
        out,
        "[[policy]]\nname = \"{}\"\ncgroups = [{cgroups}]",
        policy.name
    );
    let _ = writeln!(out, "[policy.exec]\ndefault = \"{}\"", policy.exec.default);
    for action in [Action::Allow, Action::Deny, Action::Ask] {
        let paths = policy.exec.rules.iter().filter(|r| r.action == action);
        let paths = quoted(paths.map(|r| r.path.display().to_string()).collect());
        let _ = writeln!(out, "{action} = [{paths}]");
    }
    let bound_env = quoted(policy.exec.bound_env.clone());
    let _ = writeln!(out, "bound_env = [{bound_env}]");
    let connect = &policy.connect;
    let _ = writeln!(
        out,
        "[policy.connect]\ndefault = \"{}\"\nunix = \"{}\"\nraw_sockets = \"{}\"\nother_families = \"{}\"",
        connect.default, connect.unix, connect.raw_sockets, connect.other_families
    );
    for action in [Action::Allow, Action::Deny, Action::Ask] {
        let rules = connect.rules.iter().filter(|r| r.action == action);
        let rules = quoted(rules.map(crate::ConnectRule::target).collect());
        let _ = writeln!(out, "{action} = [{rules}]");
    }
    let approval = &policy.approval;
    let durations = quoted(
        approval
            .grant_durations
            .iter()
            .map(ToString::to_string)
            .collect(),
    );
    let _ = writeln!(
        out,
        "[policy.approval]\ntimeout = \"{}\"\non_timeout = \"{}\"\napprovals_required = {}\ngrant_durations = [{durations}]",
        humantime::format_duration(approval.timeout),
        approval.on_timeout,
        approval.approvals_required,
    );
    if !approval.reviewers.is_empty() {
        let _ = writeln!(out, "reviewers = [{}]", quoted(approval.reviewers.clone()));
    }
    out
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).expect("write policy file");
    path
}

fn policy(name: &str, cgroup: &str) -> String {
    format!("[[policy]]\nname = \"{name}\"\ncgroups = [\"/sys/fs/cgroup/{cgroup}\"]\n")
}

#[test]
fn load_dir_reads_toml_files_in_name_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "20-b.toml",
        &format!("{}{}", policy("b1", "b1"), policy("b2", "b2")),
    );
    write(dir.path(), "10-a.toml", &policy("a", "a"));
    write(dir.path(), "README.md", "not a policy");
    write(dir.path(), "30-c.toml.disabled", "not toml at all [");
    fs::create_dir(dir.path().join("99-dir.toml")).expect("mkdir");

    let set = PolicySet::load_dir(dir.path()).expect("valid directory");
    let names: Vec<&str> = set.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a", "b1", "b2"]);
}

#[test]
fn load_dir_of_a_missing_directory_says_which() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("policies");
    match PolicySet::load_dir(&missing) {
        Err(error @ PolicyError::ReadDir { .. }) => {
            assert_eq!(
                error.to_string(),
                format!("failed to read policy directory {}", missing.display())
            );
        }
        other => panic!("expected a directory error, got {other:?}"),
    }
}

#[test]
fn errors_of_all_files_are_collected_in_load_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = write(
        dir.path(),
        "a.toml",
        &format!(
            "{}[policy.exec]\ndefault = \"alow\"\nallow = [\"ls\"]\n",
            policy("shared", "x")
        ),
    );
    let b = write(
        dir.path(),
        "b.toml",
        &format!("{}{}", policy("other", "y"), policy("shared", "x")),
    );
    let error = PolicySet::load_dir(dir.path()).expect_err("invalid");
    let (a, b) = (a.display(), b.display());
    let lines: Vec<String> = error
        .diagnostics()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        lines,
        [
            format!("{a}:5:11: unknown action \"alow\" (expected allow, deny or ask)"),
            format!(
                "{a}:6:10: exec path \"ls\" is not absolute (exec rules match absolute paths; relative paths, `..` and symlinks are resolved by the kernel-side identity match)"
            ),
            format!(
                "{b}:5:8: duplicate policy name \"shared\" (first defined at {a}:2:8); policy names must be unique across all policy files"
            ),
            format!(
                "{b}:6:12: cgroup pattern \"/sys/fs/cgroup/x\" is already used by policy \"shared\" ({a}:3:12); a cgroup can be governed by one policy only, so keep it in one of them"
            ),
        ]
    );
    assert_eq!(error.to_string(), lines.join("\n"));
}

#[test]
fn a_file_with_syntax_errors_does_not_hide_other_files() {
    let sources = [
        ("a.toml".to_owned(), "[[policy]\n".to_owned()),
        (
            "b.toml".to_owned(),
            "[[policy]]\nname = \"\"\ncgroups = [\"/sys/fs/cgroup/b\"]\n".to_owned(),
        ),
    ];
    let error = load_sources(&sources).expect_err("invalid");
    let files: Vec<&str> = error
        .diagnostics()
        .iter()
        .map(|d| d.file.as_str())
        .collect();
    assert!(
        files.contains(&"a.toml") && files.contains(&"b.toml"),
        "{error}"
    );
    assert!(
        error
            .diagnostics()
            .iter()
            .all(|d| d.line >= 1 && d.column >= 1)
    );
}

#[test]
fn validate_paths_takes_files_and_directories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = dir.path().join("policies");
    fs::create_dir(&policies).expect("mkdir");
    write(&policies, "a.toml", &policy("a", "a"));
    let extra = write(dir.path(), "extra.toml", EXAMPLE);

    let summary = validate_paths(&[policies.clone(), extra.clone()])
        .expect("valid")
        .summary;
    assert_eq!(summary.files, 2);
    assert_eq!(summary.policies, 3);
    assert_eq!(summary.cgroup_patterns, 4);
    assert_eq!(summary.exec_rules, 8);
    assert_eq!(summary.connect_rules, 11);
    assert_eq!(
        summary.to_string(),
        "3 policies, 8 exec rules, 11 connect rules"
    );

    // The same file named twice is loaded once.
    let summary = validate_paths(&[extra.clone(), extra])
        .expect("valid")
        .summary;
    assert_eq!(
        summary.to_string(),
        "2 policies, 8 exec rules, 11 connect rules"
    );

    let one = write(dir.path(), "one.toml", &policy("one", "one"));
    let summary = validate_paths(&[one]).expect("valid").summary;
    assert_eq!(
        summary.to_string(),
        "1 policy, 0 exec rules, 0 connect rules"
    );

    match validate_paths(&[dir.path().join("missing.toml")]) {
        Err(PolicyError::ReadFile { path, .. }) => assert!(path.ends_with("missing.toml")),
        other => panic!("expected a read error, got {other:?}"),
    }
}

#[test]
fn expand_cgroups_lists_directories_for_the_governing_policy() {
    let root = tempfile::tempdir().expect("tempdir");
    for dir in [
        "agents/job-1/child",
        "agents/job-2",
        "agents/special",
        "ci/x/runner",
        "system.slice",
    ] {
        fs::create_dir_all(root.path().join(dir)).expect("mkdir");
    }
    let text = "\
        [[policy]]\n\
        name = \"jobs\"\n\
        cgroups = [\"/sys/fs/cgroup/agents/job-*\"]\n\
        [[policy]]\n\
        name = \"agents\"\n\
        cgroups = [\"/sys/fs/cgroup/agents/*\", \"/sys/fs/cgroup/ci/**/runner\", \"/sys/fs/cgroup/missing\"]\n";
    let set = crate::parse_str("p.toml", text).expect("valid");
    let root = root.path();
    let expanded: Vec<(usize, PathBuf)> = set.expand_cgroups(root);
    assert_eq!(
        expanded,
        [
            (0, root.join("agents/job-1")),
            (0, root.join("agents/job-2")),
            // job-1 and job-2 also match "agents/*" but belong to "jobs",
            // which comes first in load order.
            (1, root.join("agents/special")),
            (1, root.join("ci/x/runner")),
        ]
    );

    // At run time the same answer, and descendants follow their ancestor.
    assert_eq!(set.policy_for_cgroup(Path::new("/agents/job-1")), Some(0));
    assert_eq!(
        set.policy_for_cgroup(Path::new("/agents/job-1/child")),
        Some(0)
    );
    assert_eq!(
        set.policy_for_cgroup(Path::new("/agents/special/deeper")),
        Some(1)
    );
    assert_eq!(set.policy_for_cgroup(Path::new("/system.slice")), None);
    assert_eq!(set.policy_for_cgroup(Path::new("/agents")), None);
}

#[test]
fn nearest_matched_cgroup_decides_between_policies() {
    let text = "\
        [[policy]]\n\
        name = \"broad\"\n\
        cgroups = [\"/sys/fs/cgroup/agents\"]\n\
        [[policy]]\n\
        name = \"narrow\"\n\
        cgroups = [\"/sys/fs/cgroup/agents/build\"]\n";
    let set = crate::parse_str("p.toml", text).expect("valid");
    assert_eq!(
        set.policy_for_cgroup(Path::new("/agents/build/step")),
        Some(1)
    );
    assert_eq!(set.policy_for_cgroup(Path::new("/agents/other")), Some(0));
}

#[test]
fn port_range_serialises_as_pair() {
    assert_eq!(
        serde_json::to_string(&PortRange::ALL).expect("json"),
        "[0,65535]"
    );
}
