//! Leaving the gate (issue 18, item 5), tried as root (and as an
//! unprivileged user) inside a gated cgroup: moving out by writing
//! `cgroup.procs`/`cgroup.threads` of a cgroup outside the gated subtree,
//! moving another task out, `clone3(CLONE_INTO_CGROUP)`; cgroups the
//! workload makes stay gated, also across a policy reload; moving a task
//! never gates an unrelated cgroup; a cgroup made under a policy pattern is
//! gated from birth. Driven through the real agent.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use gatekeep_common::{GATED_INHERITED, GatedCgroup};
use gatekeep_tests::{
    Agent, CGROUP_ROOT, Cgroup,
    policy::{self, allow_but, on_timeout},
    require_vm, wait_child,
    workload::{Outcome, line_of, run_in, tool},
};

const PATIENCE: Duration = Duration::from_mins(1);
const EPERM: &str = "errno 1";
const NOBODY: &str = "65534";

/// The gated cgroups' map entry of `id`, read from the agent's pins.
fn gated_entry(agent: &Agent, id: u64) -> Option<GatedCgroup> {
    let data =
        MapData::from_pin(agent.pin_dir().join("maps/GATED_CGROUPS")).expect("GATED_CGROUPS pin");
    let map: HashMap<MapData, u64, GatedCgroup> =
        HashMap::try_from(Map::HashMap(data)).expect("hash map");
    map.get(&id, 0).ok()
}

/// An agent gating `gk-<name>-parent/gated` (the parent is not gated):
/// everything runs but a copy of busybox, `denied`, which is denied.
struct Setup {
    gated: Cgroup,
    parent: Cgroup,
    agent: Agent,
    denied: String,
    _tools: tempfile::TempDir,
}

fn setup(name: &str) -> Setup {
    let tools = tempfile::tempdir().expect("tempdir");
    let denied = tool(tools.path(), "escape-denied");
    let parent = Cgroup::create(&format!("gk-{name}-parent"));
    let gated = Cgroup::create(&format!("gk-{name}-parent/gated"));
    let pattern = format!("{CGROUP_ROOT}/gk-{name}-parent/gated");
    let policy = policy::policy(
        &format!("gk-{name}"),
        &pattern,
        &[
            ("exec", &allow_but("deny", &denied)),
            ("approval", &on_timeout("5m", "deny")),
        ],
    );
    let agent = Agent::start(name, &policy);
    Setup {
        gated,
        parent,
        agent,
        denied,
        _tools: tools,
    }
}

fn procs(dir: &Path) -> String {
    dir.join("cgroup.procs").display().to_string()
}

/// Runs `script` with `sh -c` in `cgroup`; returns its exit code.
fn sh_in(cgroup: &Cgroup, script: &str) -> Option<i32> {
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cgroup.spawn(&mut command);
    wait_child(&mut child, PATIENCE).status.code()
}

#[test]
fn root_in_a_gated_cgroup_cannot_move_itself_or_others_out_of_its_subtree() {
    require_vm();
    let s = setup("leave");
    let unrelated = Cgroup::create("gk-leave-unrelated");
    let root = PathBuf::from(CGROUP_ROOT);
    let g = Some(&s.gated);

    for dest in [unrelated.path(), s.parent.path(), root.as_path()] {
        for file in ["cgroup.procs", "cgroup.threads"] {
            let target = dest.join(file).display().to_string();
            assert_eq!(
                line_of(g, &["fs", "put", &target, "0"]),
                EPERM,
                "write to {target} from the gated cgroup"
            );
        }
        // ... and the denied binary stays denied after trying.
        let script = format!("echo $$ > {}; exec {} true", procs(dest), s.denied);
        assert_eq!(
            sh_in(&s.gated, &script),
            Some(126),
            "the denied binary ran after `echo $$ > {}`",
            procs(dest)
        );
    }
    // Nor another task of the subtree, nor the agent's own cgroup's files.
    let mut sleeper = s.gated.spawn(Command::new("/bin/sleep").arg("60"));
    let pid = sleeper.id().to_string();
    assert_eq!(
        line_of(g, &["fs", "put", &procs(unrelated.path()), &pid]),
        EPERM
    );
    assert_eq!(s.gated.pids(), vec![sleeper.id()], "the sleeper stayed");
    // (The root cgroup has no cgroup.kill; the parent's would kill the
    // parent's tasks, e.g. an agent running beside the workload.)
    let kill = s.parent.path().join("cgroup.kill").display().to_string();
    assert_eq!(
        line_of(g, &["fs", "put", &kill, "1"]),
        EPERM,
        "cgroup.kill outside the subtree"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();

    // Root of a user namespace made inside the gated cgroup: the same.
    assert_eq!(
        line_of(
            g,
            &["in-userns", "fs", "put", &procs(unrelated.path()), "0"]
        ),
        EPERM,
        "a move out as userns root"
    );
    // clone3(CLONE_INTO_CGROUP) is refused for gated tasks, wherever to.
    let into = unrelated.path().display().to_string();
    assert_eq!(
        line_of(g, &["clone3-into", &into, "/bin/true", "true"]),
        EPERM
    );
    // No move gated anything unrelated.
    assert_eq!(gated_entry(&s.agent, unrelated.id()), None);
    assert_eq!(gated_entry(&s.agent, s.parent.id()), None);

    // From outside, the same moves work.
    assert_eq!(
        line_of(None, &["clone3-into", &into, "/bin/true", "true"]),
        "ok 0"
    );
    assert_eq!(
        line_of(None, &["fs", "put", &procs(unrelated.path()), "0"]),
        "ok"
    );
}

#[test]
fn an_unprivileged_user_in_a_gated_cgroup_cannot_move_out_where_file_modes_would_allow() {
    require_vm();
    let s = setup("leave-user");
    let unrelated = Cgroup::create("gk-leave-user-unrelated");
    // Let nobody write the destination's and the common ancestor's
    // cgroup.procs (the kernel's own checks for a move), so only the
    // programs refuse; restored at the end.
    struct Restore(Vec<PathBuf>);
    impl Drop for Restore {
        fn drop(&mut self) {
            for path in &self.0 {
                let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o644));
            }
        }
    }
    let opened = Restore(vec![
        unrelated.path().join("cgroup.procs"),
        Path::new(CGROUP_ROOT).join("cgroup.procs"),
    ]);
    for path in &opened.0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o666)).expect("chmod procs");
    }
    let target = procs(unrelated.path());
    assert_eq!(
        line_of(
            Some(&s.gated),
            &["as-user", NOBODY, "fs", "put", &target, "0"]
        ),
        EPERM
    );
    let into = unrelated.path().display().to_string();
    assert_eq!(
        line_of(
            Some(&s.gated),
            &["as-user", NOBODY, "clone3-into", &into, "/bin/true", "true"]
        ),
        EPERM
    );
    // Outside, the modes let nobody move itself.
    assert_eq!(
        line_of(None, &["as-user", NOBODY, "fs", "put", &target, "0"]),
        "ok"
    );
    drop(opened);
}

#[test]
fn cgroups_a_gated_task_makes_stay_gated_there_and_across_a_reload() {
    require_vm();
    let s = setup("made");
    // Inside its subtree, and (as root) anywhere in the hierarchy.
    let inside = s.gated.path().join("sub");
    let elsewhere = Path::new(CGROUP_ROOT).join("gk-made-elsewhere");
    let _ = fs::remove_dir(&elsewhere);
    for dir in [&inside, &elsewhere] {
        let script = format!(
            "mkdir {dir} && echo $$ > {procs} && exec {denied} true",
            dir = dir.display(),
            procs = procs(dir),
            denied = s.denied
        );
        assert_eq!(
            sh_in(&s.gated, &script),
            Some(126),
            "the denied binary ran after moving into {}",
            dir.display()
        );
    }
    let elsewhere_cgroup = Cgroup::adopt("gk-made-elsewhere");
    let before = gated_entry(&s.agent, elsewhere_cgroup.id()).expect("gated by the kernel");
    assert_eq!(before.flags, GATED_INHERITED);
    let policy_before = gated_entry(&s.agent, s.gated.id())
        .expect("gated")
        .policy_id;
    assert_eq!(before.policy_id, policy_before);

    // A reload gives the policy a new id; the inherited cgroup follows it.
    s.agent.signal(nix::sys::signal::Signal::SIGHUP);
    s.agent.wait_log("policy reloaded", 1, PATIENCE);
    let policy_after = gated_entry(&s.agent, s.gated.id())
        .expect("gated")
        .policy_id;
    assert_ne!(policy_after, policy_before, "the reload assigned new ids");
    let after = gated_entry(&s.agent, elsewhere_cgroup.id()).expect("still gated after reload");
    assert_eq!(after.policy_id, policy_after);
    assert_eq!(
        run_in(&elsewhere_cgroup, &["exec", &s.denied, "true"], PATIENCE),
        Outcome::exec_denied()
    );
    let inside_id = fs::metadata(&inside).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let inside_entry = gated_entry(&s.agent, inside_id.expect("sub exists"));
    assert_eq!(inside_entry.map(|e| e.policy_id), Some(policy_after));
    drop(elsewhere_cgroup);
    let _ = fs::remove_dir(&inside);
}

#[test]
fn a_cgroup_made_under_a_policy_pattern_is_gated_from_birth() {
    require_vm();
    let tools = tempfile::tempdir().expect("tempdir");
    let denied = tool(tools.path(), "born-denied");
    let policy = policy::policy(
        "gk-born",
        &format!("{CGROUP_ROOT}/gk-born-*"),
        &[
            ("exec", &allow_but("deny", &denied)),
            ("approval", &on_timeout("5m", "deny")),
        ],
    );
    let agent = Agent::start("born", &policy);
    // Made by an ungated task (the test, like systemd), used at once.
    let born = Cgroup::create("gk-born-1");
    assert!(
        gated_entry(&agent, born.id()).is_some(),
        "the new cgroup is gated (or unclassified) the moment mkdir returns"
    );
    assert_eq!(
        run_in(&born, &["exec", &denied, "true"], PATIENCE),
        Outcome::exec_denied()
    );
    assert_eq!(
        run_in(&born, &["exec", "/bin/true", "true"], PATIENCE),
        Outcome::exec_ran()
    );
    // A new cgroup beside it that no pattern matches: classified ungated,
    // its denied-elsewhere binary runs.
    let other = Cgroup::create("gk-other-1");
    assert_eq!(
        run_in(&other, &["exec", &denied, "true"], PATIENCE),
        Outcome::exec_ran()
    );
    assert_eq!(gated_entry(&agent, other.id()), None);
    assert_eq!(gated_entry(&agent, born.id()).map(|e| e.flags), Some(0));
}
