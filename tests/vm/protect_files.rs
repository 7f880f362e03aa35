//! gatekeep's own files (issue 18, item 3): from a gated cgroup, root with
//! every capability (and an unprivileged user) can neither change the
//! configuration, the policies, the state, the audit log, the pins or the
//! binaries, nor read the secrets; the very same actions from outside the
//! gated cgroup still work, so nothing but the kernel programs refuses them.
//! Driven through the real agent, which computes the identities.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{HashMap, MapData};
use gatekeep_common::InodeKey;
use gatekeep_tests::{
    Agent, Cgroup, gate_exec, kernel::kernel_dev, policy::on_timeout, require_vm, wait_for,
    workload::line_of,
};

/// What the workload prints when the kernel refuses with `EPERM`.
const EPERM: &str = "errno 1";
/// ... and when the syscall worked.
const OK: &str = "ok";
/// The unprivileged user of the unprivileged variants.
const NOBODY: &str = "65534";

/// Gates `gk-<name>` (everything may run) under an agent whose state
/// folder holds a reviewer config (`cli.toml`) and a grants file, written
/// after the agent started: the folder's protection covers files made later.
fn gated(name: &str) -> (Cgroup, Agent) {
    let (cgroup, agent) = gate_exec(name, "default = \"allow\"", &on_timeout("5m", "deny"));
    let state = agent.state_dir();
    fs::create_dir_all(&state).expect("state dir");
    fs::write(state.join("cli.toml"), "token = \"secret\"\n").expect("cli.toml");
    // Replaced by rename, as the agent does: a new inode the agent never saw.
    fs::write(state.join("grants.json.tmp"), "[]").expect("grants tmp");
    fs::rename(state.join("grants.json.tmp"), state.join("grants.json")).expect("rename");
    wait_protected(&agent, &state);
    (cgroup, agent)
}

/// Waits until the agent has put `path`'s identity into `PROTECTED_INODES`
/// (the state folder may be made after the agent's start; the next rescan
/// finds it).
fn wait_protected(agent: &Agent, path: &Path) {
    let meta = fs::metadata(path).expect("stat protected path");
    let key = InodeKey {
        dev: kernel_dev(meta.dev()),
        ino: meta.ino(),
    };
    let pin = agent.pin_dir().join("maps/PROTECTED_INODES");
    wait_for(
        &format!("{} protected", path.display()),
        Duration::from_mins(1),
        || {
            let data = MapData::from_pin(&pin).ok()?;
            let map: HashMap<MapData, InodeKey, u32> =
                HashMap::try_from(aya::maps::Map::HashMap(data)).ok()?;
            map.get(&key, 0).ok()
        },
    );
}

/// The agent's own executable.
fn agent_binary(agent: &Agent) -> PathBuf {
    fs::read_link(format!("/proc/{}/exe", agent.pid())).expect("agent exe")
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Runs `fs OP ARGS` in `cgroup` (as `user` when given) and asserts the
/// outcome.
fn expect(cgroup: Option<&Cgroup>, user: Option<&str>, op: &[&str], want: &str) {
    let mut args: Vec<&str> = Vec::new();
    if let Some(user) = user {
        args.extend(["as-user", user]);
    }
    args.push("fs");
    args.extend(op);
    let got = line_of(cgroup, &args);
    let place = if cgroup.is_some() {
        "in the gated cgroup"
    } else {
        "outside"
    };
    assert_eq!(got, want, "`{}` {place}", op.join(" "));
}

#[test]
fn root_in_a_gated_cgroup_cannot_change_gatekeeps_files_or_read_its_secrets() {
    require_vm();
    let (cgroup, agent) = gated("protect-root");
    let policies = agent.policy_dir();
    let policy = policies.join("policy.toml");
    let original = fs::read(&policy).expect("policy");
    let audit = agent.audit_db();
    let config = agent.config();
    let state = agent.state_dir();
    let cli = state.join("cli.toml");
    let grants = state.join("grants.json");
    let links = agent.pin_dir().join("links");
    let link = links.join("bprm_check_security");
    let binary = agent_binary(&agent);
    let outside = tempfile::tempdir().expect("tempdir");
    let evil = outside.path().join("evil.toml");
    fs::write(&evil, "[[policy]]\n").expect("evil");
    // Beside the binary's file system (/tmp is a tmpfs of its own: a rename
    // across would fail with EXDEV before any LSM hook).
    let evil_binary = binary.with_file_name("gk-evil-binary");
    fs::write(&evil_binary, "#!/bin/sh\n").expect("evil binary");
    let away = outside.path().join("away");
    let g = Some(&cgroup);

    // Editing the rules.
    for op in [
        vec!["write", s(&policy)],
        vec!["trunc-open", s(&policy)],
        vec!["truncate", s(&policy)],
        vec!["chmod", s(&policy)],
        vec!["unlink", s(&policy)],
        vec!["rename", s(&policy), s(&away)],
        vec!["rename", s(&evil), s(&policy)],
        vec!["link", s(&policy), s(&away)],
        vec!["create", s(&policies.join("new.toml"))],
        vec!["link", s(&evil), s(&policies.join("linked.toml"))],
        vec!["symlink", s(&evil), s(&policies.join("sym.toml"))],
        vec!["mkdir", s(&policies.join("sub"))],
        vec!["rename", s(&policies), s(&away)],
        vec!["write", s(&config)],
        vec!["unlink", s(&config)],
    ] {
        expect(g, None, &op, EPERM);
    }
    // The audit log, its journal files included.
    for op in [
        vec!["write", s(&audit)],
        vec!["truncate", s(&audit)],
        vec!["unlink", s(&audit)],
        vec!["rename", s(&audit), s(&away)],
        vec!["create", &format!("{}-journal", audit.display())],
    ] {
        expect(g, None, &op, EPERM);
    }
    // The state: secrets unreadable, nothing changed or added.
    for op in [
        vec!["read", s(&cli)],
        vec!["write", s(&cli)],
        vec!["read", s(&grants)],
        vec!["write", s(&grants)],
        vec!["unlink", s(&grants)],
        vec!["link", s(&cli), s(&away)],
        vec!["create", s(&state.join("reviewer.token"))],
    ] {
        expect(g, None, &op, EPERM);
    }
    // Switching the agent off: pins stay, the binary stays.
    for op in [
        vec!["unlink", s(&link)],
        vec!["rename", s(&link), s(&links.join("moved"))],
        vec!["create", s(&links.join("planted"))],
        vec!["mkdir", s(&links.join("planted"))],
        vec!["unlink", s(&binary)],
        vec!["rename", s(&evil_binary), s(&binary)],
        vec!["chmod", s(&binary)],
    ] {
        expect(g, None, &op, EPERM);
    }
    // Root of a user namespace made inside the gated cgroup: the same.
    for op in [vec!["write", s(&policy)], vec!["read", s(&cli)]] {
        let mut args = vec!["in-userns", "fs"];
        args.extend(op.iter().copied());
        assert_eq!(
            line_of(g, &args),
            EPERM,
            "`{}` as userns root",
            op.join(" ")
        );
    }
    let mut rm = std::process::Command::new("/bin/sh");
    rm.args(["-c", &format!("rm -f {}/*", links.display())]);
    let status = cgroup.spawn(&mut rm).wait().expect("rm");
    assert!(!status.success(), "rm of the pins succeeded");

    assert_eq!(fs::read(&policy).expect("policy"), original);
    assert_eq!(
        fs::read_to_string(&cli).expect("cli"),
        "token = \"secret\"\n"
    );
    assert!(link.exists(), "a pinned link was removed");
    assert!(binary.exists(), "the agent's binary was removed");
    let _ = fs::remove_file(&evil_binary);
    assert!(!policies.join("new.toml").exists());
    let (verified, out, err) = agent.admin(&["audit", "verify"]);
    assert!(verified, "the agent's audit log must verify: {out}{err}");

    // The same actions from outside any gated cgroup work (the test's own
    // cgroup): the refusals above come from gating, not from the files.
    let note = policies.join("note.txt");
    for (op, want) in [
        (vec!["read", s(&cli)], OK),
        (vec!["create", s(&note)], OK),
        (vec!["rename", s(&note), s(&policies.join("note2.txt"))], OK),
        (vec!["unlink", s(&policies.join("note2.txt"))], OK),
        (vec!["write", s(&grants)], OK),
        // (bpffs makes no regular files; folders it does.)
        (vec!["mkdir", s(&links.join("planted"))], OK),
        (vec!["rmdir", s(&links.join("planted"))], OK),
    ] {
        expect(None, None, &op, want);
    }
}

#[test]
fn an_unprivileged_user_in_a_gated_cgroup_is_refused_where_file_modes_would_allow() {
    require_vm();
    let (cgroup, agent) = gated("protect-user");
    let policies = agent.policy_dir();
    let policy = policies.join("policy.toml");
    let cli = agent.state_dir().join("cli.toml");
    // Everything world-writable (and the folders on the way traversable):
    // the file modes allow it all, so only the kernel programs refuse.
    let mut dir = Some(policies.as_path());
    while let Some(d) = dir {
        if d == Path::new("/") {
            break;
        }
        let mode = fs::metadata(d).expect("stat").permissions().mode();
        fs::set_permissions(d, fs::Permissions::from_mode(mode | 0o711)).expect("chmod");
        dir = d.parent();
    }
    for path in [&policies, &agent.state_dir()] {
        fs::set_permissions(path, fs::Permissions::from_mode(0o777)).expect("chmod dir");
    }
    for path in [&policy, &cli] {
        fs::set_permissions(path, fs::Permissions::from_mode(0o666)).expect("chmod file");
    }
    let g = Some(&cgroup);
    let user = Some(NOBODY);
    for op in [
        vec!["write", s(&policy)],
        vec!["unlink", s(&policy)],
        vec!["create", s(&policies.join("new.toml"))],
        vec!["read", s(&cli)],
        vec!["write", s(&cli)],
    ] {
        expect(g, user, &op, EPERM);
    }
    // Outside, the same user may (the modes say so).
    let note = policies.join("note.txt");
    expect(None, user, &["read", s(&cli)], OK);
    expect(None, user, &["create", s(&note)], OK);
    expect(None, user, &["unlink", s(&note)], OK);
}
