//! Reviewers see the truth (issue 19, item 4): the path a reviewer is shown for a paused
//! exec is the host's path of the file that runs, not the name the workload passed, and a
//! mount namespace other than the agent's is noted.
//!
//! The attack: in a private mount namespace the workload bind-mounts another binary over an
//! innocent path and execs that path. The request used to name the innocent path, so a
//! reviewer looking at it on the host saw the innocent file. Tried as root inside the gated
//! cgroup, unprivileged as root of a user namespace it made, and with the namespace made
//! outside the cgroup before joining it (what a container runtime does; the policy then
//! needs no `mount` relaxation). A file the host cannot reach at any path (bound, then
//! unlinked) is shown as unverified, with its device and inode, never as the name alone.
//! The control: a plain exec in the host's namespace shows its path and no namespace note.

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path, process::Child, time::Duration};

use gatekeep_tests::{
    Agent, Cgroup, embedded_decision, policy, require_vm,
    review::{Reviewer, request_id},
    wait_for, wait_stopped,
    workload::{self, Outcome, tool, workload, workload_path},
};
use serde_json::Value;

/// How long anything in the flow may take under software emulation.
const PATIENCE: Duration = Duration::from_mins(1);

/// A folder everyone may enter.
fn open_dir(path: &Path) {
    fs::create_dir_all(path).expect("mkdir");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod dir");
}

/// `major:minor inode` of `path`, as the request names a file.
fn identity(path: &str) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(path).expect("stat");
    format!(
        "{}:{} {}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    )
}

/// The test's (and the agent's) mount namespace.
fn own_mount_namespace() -> String {
    fs::read_link("/proc/self/ns/mnt")
        .expect("readlink /proc/self/ns/mnt")
        .to_string_lossy()
        .into_owned()
}

/// An agent (embedded service on `port`) whose policy for cgroup `gk-<name>` asks for every
/// exec but the workload binary's, and (`relax_mount`) lets the workload mount.
fn gate(name: &str, port: u16, relax_mount: bool) -> (Cgroup, Agent) {
    let cgroup_name = format!("gk-{name}");
    let cgroup = Cgroup::create(&cgroup_name);
    let exec = format!("default = \"ask\"\nallow = [\"{}\"]", workload_path());
    let approval = "timeout = \"5m\"\non_timeout = \"deny\"";
    let mut tables = vec![("exec", exec.as_str()), ("approval", approval)];
    if relax_mount {
        tables.push(("protect", "relax = [\"mount\"]"));
    }
    let text = policy::policy(
        &cgroup_name,
        &format!("/sys/fs/cgroup/{cgroup_name}"),
        &tables,
    );
    let agent = Agent::start_with(name, &text, &embedded_decision(port));
    (cgroup, agent)
}

/// The one pending request whose id is not in `seen` (added to it).
fn next_request(agent: &Agent, seen: &mut Vec<String>) -> Value {
    let request = wait_for("a new pending request", PATIENCE, || {
        agent
            .wait_pending(1, PATIENCE)
            .into_iter()
            .find(|r| !seen.contains(&request_id(r)))
    });
    seen.push(request_id(&request));
    request
}

/// Denies `request` and checks that the paused exec failed with EPERM.
fn deny(agent: &Agent, request: &Value, mut child: Child, round: &str) {
    agent.cli_ok(&["review", "deny", &request_id(request)], "review deny");
    let outcome = workload::finish(&mut child, PATIENCE);
    outcome.assert_no_513();
    assert_eq!(outcome, Outcome::exec_denied(), "({round}) denied");
}

#[test]
fn a_decoy_name_in_a_private_mount_namespace_shows_the_file_that_runs() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    open_dir(dir.path());
    open_dir(&dir.path().join("innocent"));
    open_dir(&dir.path().join("evil"));
    // Two files with their own inodes: what the reviewer would look at, and what runs.
    let innocent = tool(&dir.path().join("innocent"), "echo");
    let evil = tool(&dir.path().join("evil"), "payload");
    let (cgroup, agent) = gate("truth-decoy", 17481, true);
    let procs = cgroup.path().join("cgroup.procs");
    let procs = procs.to_str().expect("utf8");
    let own = own_mount_namespace();

    let attack = ["bind", &evil, &innocent, "exec", &innocent, "echo", "hi"];
    let rounds: [(&str, Vec<&str>, bool); 3] = [
        (
            "root in the cgroup",
            [&["mount-ns"][..], &attack].concat(),
            true,
        ),
        (
            "unprivileged, root of its own user namespace",
            [&["as-user", "65534", "in-userns", "mount-ns"][..], &attack].concat(),
            true,
        ),
        (
            "namespace made outside, then the gated cgroup joined",
            [
                &["mount-ns", "bind", &evil, &innocent, "join", procs][..],
                &["exec", &innocent, "echo", "hi"],
            ]
            .concat(),
            false,
        ),
    ];
    let mut seen = Vec::new();
    for (round, args, inside) in rounds {
        let child = if inside {
            cgroup.spawn(&mut workload(&args))
        } else {
            workload(&args).spawn().expect("start the workload")
        };
        wait_stopped(child.id(), PATIENCE);
        let request = next_request(&agent, &mut seen);
        let exec = &request["request"]["target"];
        assert_eq!(exec["executable"], evil.as_str(), "({round}) {request:#}");
        assert_eq!(exec["path_check"], "verified", "({round}) {exec}");
        assert_eq!(exec["named"], innocent.as_str(), "({round}) {exec}");
        assert_eq!(exec["file"], identity(&evil).as_str(), "({round}) {exec}");
        let namespace = exec["mount_namespace"].as_str().unwrap_or_default();
        assert!(
            namespace.starts_with("mnt:[") && namespace != own,
            "({round}) the namespace is noted: {exec}"
        );
        assert_eq!(exec["argv"], serde_json::json!(["echo", "hi"]));

        // What the reviewer reads.
        let shown = agent.cli_ok(&["review", "show", &request_id(&request)], "review show");
        let line = |name: &str| {
            shown
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("({round}) no `{name}` line in:\n{shown}"))
                .to_owned()
        };
        assert!(line("exec ").ends_with(&format!(" {evil}")), "{shown}");
        assert!(line("named ").contains(&innocent), "{shown}");
        assert!(line("mount ns ").contains(namespace), "{shown}");
        assert!(line("file ").contains("verified on the host"), "{shown}");
        deny(&agent, &request, child, round);
    }

    // The agent's audit record of the request carries the same target.
    let requested = agent.wait_record("requested", PATIENCE, |r| {
        r["request_id"].as_str() == seen.first().map(String::as_str)
    });
    let target = &requested["payload"]["request"]["target"];
    assert_eq!(target["executable"], evil.as_str(), "{requested:#}");
    assert_eq!(target["named"], innocent.as_str(), "{requested:#}");

    // A file the host reaches at no path: bound over the name, then unlinked. It has no
    // name on disk, so the policy's `fileless` action decides it, whatever the name it runs
    // under (deny by default; threat model section 14). What reviewers see of an asked
    // fileless exec is `mapped::fileless_executables_are_denied_by_default_and_asked_marked_fileless`.
    let gone = tool(&dir.path().join("evil"), "gone");
    let args = [
        "mount-ns", "bind", &gone, &innocent, "rm", &gone, "exec", &innocent, "echo", "hi",
    ];
    let mut child = cgroup.spawn(&mut workload(&args));
    let outcome = workload::finish(&mut child, PATIENCE);
    assert_eq!(
        outcome,
        Outcome::exec_denied(),
        "an unlinked file bound over a name is fileless: denied by default"
    );
    let denied = agent.wait_record("kernel_denied", PATIENCE, |r| {
        r["payload"]["reason"] == "fileless"
    });
    assert_eq!(denied["payload"]["policy"], "gk-truth-decoy", "{denied:#}");
}

#[test]
fn a_plain_exec_in_the_hosts_namespace_shows_its_path_and_no_namespace_note() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    open_dir(dir.path());
    let tool_path = tool(dir.path(), "deploy-tool");
    let link = dir.path().join("deploy");
    std::os::unix::fs::symlink(&tool_path, &link).expect("symlink");
    let link = link.to_str().expect("utf8").to_owned();
    let (cgroup, agent) = gate("truth-plain", 17482, false);

    let mut seen = Vec::new();
    for (round, name) in [("by its path", &tool_path), ("through a symlink", &link)] {
        let child = cgroup.spawn(&mut workload(&["exec", name, "deploy", "prod"]));
        wait_stopped(child.id(), PATIENCE);
        let request = next_request(&agent, &mut seen);
        let exec = &request["request"]["target"];
        assert_eq!(
            exec["executable"],
            tool_path.as_str(),
            "({round}) {request:#}"
        );
        assert_eq!(exec["path_check"], "verified", "({round}) {exec}");
        assert_eq!(exec["file"], identity(&tool_path).as_str(), "({round})");
        assert!(exec.get("mount_namespace").is_none(), "({round}) {exec}");
        if name == &link {
            assert_eq!(exec["named"], link.as_str(), "({round}) {exec}");
        } else {
            assert!(exec.get("named").is_none(), "({round}) {exec}");
        }
        let shown = agent.cli_ok(&["review", "show", &request_id(&request)], "review show");
        assert!(!shown.contains("mount ns"), "({round}) {shown}");
        assert!(!shown.contains("UNVERIFIED"), "({round}) {shown}");
        deny(&agent, &request, child, round);
    }
}
