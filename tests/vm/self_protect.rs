//! Self-protection (issue 18): what a workload in a gated cgroup tries in
//! order to switch gatekeep off or approve itself, as root (all
//! capabilities), unprivileged, and as root of a user namespace it made.
//! Each attack is refused with its precise errno, and the same action from
//! outside the gated cgroup (or at something gatekeep does not protect)
//! still works, so a test fails if the refusal came from anywhere else.

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path, process::Command, time::Duration};

use aya::maps::MapInfo;
use gatekeep_tests::{
    Agent, Cgroup, embedded_decision, is_stopped, policy, require_vm,
    review::Reviewer as _,
    wait_for,
    workload::{Outcome, finish, run_in, start_paused, tool, workload},
};
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(60);

/// `errno N` as the workload reports it (exit 1).
fn refused(errno: i32) -> Outcome {
    Outcome {
        code: 1,
        stdout: format!("errno {errno}"),
    }
}

fn ok() -> Outcome {
    Outcome {
        code: 0,
        stdout: "ok".to_owned(),
    }
}

const EPERM: i32 = 1;
const ENXIO: i32 = 6;
const EACCES: i32 = 13;
const EEXIST: i32 = 17;

/// The unprivileged user the attacks also run as.
const NOBODY: &str = "65534";

/// Runs the workload with `args` outside any gated cgroup (in the test's).
fn run_outside(args: &[&str]) -> Outcome {
    finish(
        &mut workload(args).spawn().expect("start the workload"),
        PATIENCE,
    )
}

/// A gated cgroup `gk-<name>` whose policy allows every exec and connect
/// (`extra`: more policy tables), and an agent enforcing it with `decision`.
fn gated(name: &str, extra: &[(&str, &str)], decision: Option<&str>) -> (Cgroup, Agent) {
    let cgroup_name = format!("gk-{name}");
    let cgroup = Cgroup::create(&cgroup_name);
    let mut tables = vec![("exec", "default = \"allow\"")];
    tables.extend_from_slice(extra);
    let text = policy::policy(
        &cgroup_name,
        &format!("/sys/fs/cgroup/{cgroup_name}"),
        &tables,
    );
    let agent = match decision {
        Some(decision) => Agent::start_with(name, &text, decision),
        None => Agent::start(name, &text),
    };
    (cgroup, agent)
}

/// The kernel's count of refusals of `protection` in `cgroup`, from
/// `gatekeep-agent status`.
fn refusals(agent: &Agent, protection: &str, cgroup: &Cgroup) -> u64 {
    agent.status()["protect_refusals"]
        .as_array()
        .expect("protect_refusals in the status")
        .iter()
        .find(|r| r["protection"] == protection && r["cgroup_id"] == cgroup.id())
        .and_then(|r| r["count"].as_u64())
        .unwrap_or(0)
}

/// The `protect_refused` audit records of `protection` in `cgroup`.
fn refusal_records(agent: &Agent, protection: &str, cgroup: &Cgroup) -> Vec<Value> {
    agent
        .records_of("protect_refused")
        .into_iter()
        .filter(|r| {
            r["payload"]["protection"] == protection && r["payload"]["cgroup_id"] == cgroup.id()
        })
        .collect()
}

/// Waits until the audit records of `protection` in `cgroup` count `total`
/// refusals; returns them.
fn wait_refusal_records(
    agent: &Agent,
    protection: &str,
    cgroup: &Cgroup,
    total: u64,
) -> Vec<Value> {
    wait_for(
        &format!("protect_refused records of {protection} counting {total}"),
        PATIENCE,
        || {
            let records = refusal_records(agent, protection, cgroup);
            let sum: u64 = records
                .iter()
                .filter_map(|r| r["payload"]["count"].as_u64())
                .sum();
            (sum >= total).then_some(records)
        },
    )
}

#[test]
fn a_gated_task_cannot_signal_trace_or_read_the_agent() {
    require_vm();
    let (cgroup, agent) = gated("protect-signals", &[], None);
    let pid = agent.pid().to_string();
    let mem = format!("/proc/{pid}/mem");
    let environ = format!("/proc/{pid}/environ");
    let status = agent.status();
    assert!(
        status["protected_processes"]
            .as_array()
            .expect("protected_processes")
            .contains(&Value::from(agent.pid())),
        "the agent must protect itself: {status}"
    );

    // Root (all capabilities) in the gated cgroup.
    for signal in ["19", "9", "15", "0"] {
        assert_eq!(
            run_in(&cgroup, &["kill", &pid, signal], PATIENCE),
            refused(EPERM),
            "kill -{signal} of the agent from the gated cgroup"
        );
    }
    assert_eq!(
        run_in(&cgroup, &["ptrace-seize", &pid], PATIENCE),
        refused(EPERM)
    );
    assert_eq!(
        run_in(&cgroup, &["open", &mem, "rw"], PATIENCE),
        refused(EACCES)
    );
    assert_eq!(
        run_in(&cgroup, &["open", &environ, "r"], PATIENCE),
        refused(EACCES)
    );
    // Unprivileged, and root of a user namespace made inside the cgroup.
    assert_eq!(
        run_in(&cgroup, &["as-user", NOBODY, "kill", &pid, "9"], PATIENCE),
        refused(EPERM)
    );
    assert_eq!(
        run_in(&cgroup, &["as-user", NOBODY, "open", &mem, "rw"], PATIENCE),
        refused(EACCES)
    );
    assert_eq!(
        run_in(&cgroup, &["userns-root", "kill", &pid, "9"], PATIENCE),
        refused(EPERM)
    );
    assert_eq!(
        run_in(&cgroup, &["userns-root", "open", &environ, "r"], PATIENCE),
        refused(EACCES)
    );
    assert!(!is_stopped(agent.pid()), "the agent was stopped");

    // What gatekeep does not protect still works from inside: a gated task
    // signals and traces an unprotected process (a sleeper of its own
    // cgroup)...
    let mut sleeper = cgroup.spawn(Command::new("/bin/sleep").arg("60"));
    let sleeper_pid = sleeper.id().to_string();
    assert_eq!(
        run_in(&cgroup, &["kill", &sleeper_pid, "0"], PATIENCE),
        ok()
    );
    assert_eq!(
        run_in(&cgroup, &["ptrace-seize", &sleeper_pid], PATIENCE),
        ok()
    );
    assert_eq!(
        run_in(
            &cgroup,
            &["open", &format!("/proc/{sleeper_pid}/environ"), "r"],
            PATIENCE
        ),
        ok()
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    // ...and from outside the gated cgroup the agent is reachable as ever.
    assert_eq!(run_outside(&["kill", &pid, "0"]), ok());
    assert_eq!(run_outside(&["open", &environ, "r"]), ok());

    // Visible: counted in the status and recorded in the audit log. The
    // unprivileged attempts were refused by the kernel's permission checks
    // before the LSM hooks (so they are not counted); user namespace root
    // (uid 0 outside too) reached gatekeep's signal check, while its
    // `environ` read was refused by the kernel's own ptrace checks first.
    assert_eq!(refusals(&agent, "signals", &cgroup), 5);
    assert_eq!(refusals(&agent, "ptrace", &cgroup), 3);
    let records = wait_refusal_records(&agent, "signals", &cgroup, 5);
    assert_eq!(
        records[0]["payload"]["cgroup"],
        Value::from(cgroup.path().to_string_lossy().into_owned()),
        "{records:?}"
    );
}

#[test]
fn a_flood_of_refused_signals_is_one_audit_record_with_its_count() {
    require_vm();
    let (cgroup, agent) = gated("protect-flood", &[], None);
    let pid = agent.pid().to_string();
    let outcome = run_in(&cgroup, &["kill-loop", &pid, "0", "5000"], PATIENCE);
    assert_eq!(outcome.stdout, "errno 1\nrefused 5000", "{outcome:?}");
    assert_eq!(refusals(&agent, "signals", &cgroup), 5000);
    let records = wait_refusal_records(&agent, "signals", &cgroup, 5000);
    // One burst: bursts close after a quiet second or a minute at most.
    assert!(
        records.len() <= 2,
        "5000 refusals in a burst wrote {} records: {records:#?}",
        records.len()
    );
    assert_eq!(records[0]["payload"]["action"], "deny");
    let (ok, out, err) = agent.admin(&["status"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!(
            "signals refused 5000 time(s) in cgroup {}",
            cgroup.id()
        )),
        "{out}"
    );
}

#[test]
fn a_gated_task_cannot_use_bpf_load_modules_open_raw_devices_or_mount() {
    require_vm();
    let (cgroup, agent) = gated("protect-kernel", &[], None);
    let map = agent.pin_dir().join("maps/GATED_CGROUPS");
    let map_id = MapInfo::from_pin(&map)
        .expect("the agent's pinned GATED_CGROUPS")
        .id()
        .to_string();
    let module = "/lib/modules/gatekeep/failover.ko";
    assert!(Path::new(module).exists(), "the VM loads {module} at boot");
    let scratch = agent.scratch();
    let block = scratch.join("blk");
    let status = Command::new("mknod")
        .arg(&block)
        .args(["b", "7", "0"])
        .status()
        .expect("mknod");
    assert!(status.success(), "mknod a block device node");
    let block = block.to_string_lossy().into_owned();
    let target = scratch.join("mnt");
    fs::create_dir(&target).expect("mount point");
    fs::set_permissions(&target, fs::Permissions::from_mode(0o777)).expect("chmod");
    let target = target.to_string_lossy().into_owned();

    // bpf(): a gatekeep map by id, and any program load.
    assert_eq!(
        run_in(&cgroup, &["bpf-map-by-id", &map_id], PATIENCE),
        refused(EPERM)
    );
    assert_eq!(
        run_in(&cgroup, &["bpf-prog-load"], PATIENCE),
        refused(EPERM)
    );
    assert_eq!(run_outside(&["bpf-map-by-id", &map_id]), ok());
    assert_eq!(run_outside(&["bpf-prog-load"]), ok());

    // Modules: init_module and finit_module of a module the VM loaded at
    // boot, which outside reaches the loader (EEXIST).
    assert_eq!(
        run_in(&cgroup, &["finit-module", module], PATIENCE),
        refused(EPERM)
    );
    assert_eq!(
        run_in(&cgroup, &["init-module", module], PATIENCE),
        refused(EPERM)
    );
    assert_eq!(run_outside(&["finit-module", module]), refused(EEXIST));
    assert_eq!(run_outside(&["init-module", module]), refused(EEXIST));

    // Raw memory and devices. The VM has no block driver, so outside the
    // block node gets the kernel's own ENXIO: past gatekeep, at the driver.
    for path in ["/dev/mem", "/proc/kcore", block.as_str()] {
        assert_eq!(
            run_in(&cgroup, &["open", path, "r"], PATIENCE),
            refused(EPERM),
            "open {path} from the gated cgroup"
        );
    }
    assert_eq!(run_outside(&["open", "/dev/mem", "r"]), ok());
    assert_eq!(run_outside(&["open", "/proc/kcore", "r"]), ok());
    assert_eq!(run_outside(&["open", &block, "r"]), refused(ENXIO));
    // Ordinary character devices still open.
    assert_eq!(
        run_in(&cgroup, &["open", "/dev/null", "rw"], PATIENCE),
        ok()
    );

    // Mounts: a new one, and unmounting one made outside.
    assert_eq!(
        run_in(&cgroup, &["mount-tmpfs", &target], PATIENCE),
        refused(EPERM)
    );
    assert_eq!(run_outside(&["mount-tmpfs", &target]), ok());
    assert_eq!(
        run_in(&cgroup, &["umount", &target], PATIENCE),
        refused(EPERM)
    );
    assert_eq!(run_outside(&["umount", &target]), ok());

    // Root of a user namespace made in the cgroup (unshare -Ur), as root
    // and as an unprivileged user: its own mount namespace changes nothing.
    assert_eq!(
        run_in(&cgroup, &["userns-root", "mount-tmpfs", &target], PATIENCE),
        refused(EPERM)
    );
    assert_eq!(
        run_in(
            &cgroup,
            &["as-user", NOBODY, "userns-root", "mount-tmpfs", &target],
            PATIENCE
        ),
        refused(EPERM)
    );
    assert_eq!(
        run_outside(&["as-user", NOBODY, "userns-root", "mount-tmpfs", &target]),
        ok(),
        "an unprivileged user namespace may mount tmpfs on this kernel"
    );
    assert_eq!(
        run_in(&cgroup, &["userns-root", "bpf-prog-load"], PATIENCE),
        refused(EPERM)
    );
    // Unprivileged: refused (by permissions first).
    assert_eq!(
        run_in(&cgroup, &["as-user", NOBODY, "bpf-prog-load"], PATIENCE),
        refused(EPERM)
    );
    assert_eq!(
        run_in(
            &cgroup,
            &["as-user", NOBODY, "mount-tmpfs", &target],
            PATIENCE
        ),
        refused(EPERM)
    );

    // bpf() and mount: the LSM hooks run before any capability check
    // (`security_sb_mount` before `may_mount()` in `path_mount`), so the
    // unprivileged attempts are counted too.
    assert_eq!(refusals(&agent, "bpf", &cgroup), 4);
    assert_eq!(refusals(&agent, "kernel", &cgroup), 2);
    assert_eq!(refusals(&agent, "raw-devices", &cgroup), 3);
    assert_eq!(refusals(&agent, "mount", &cgroup), 5);
    wait_refusal_records(&agent, "mount", &cgroup, 5);
}

#[test]
fn removing_the_link_pins_detaches_nothing_and_the_agent_pins_them_again() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = tool(dir.path(), "protect-pins-bad");
    let cgroup_name = "gk-protect-pins";
    let cgroup = Cgroup::create(cgroup_name);
    let agent = Agent::start(
        "protect-pins",
        &policy::exec(
            cgroup_name,
            &format!("default = \"allow\"\ndeny = [\"{bad}\"]"),
            "",
        ),
    );
    let links = agent.pin_dir().join("links");
    let pins = || -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&links)
            .expect("links dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = pins();
    assert!(
        before.contains(&"bprm_check_security".to_owned()),
        "{before:?}"
    );

    // The attacker's move (made from outside here: from inside, the file
    // protections refuse the unlink itself).
    for name in &before {
        fs::remove_file(links.join(name)).expect("remove a link pin");
    }
    assert_eq!(
        run_in(&cgroup, &["exec", &bad, "true"], PATIENCE),
        Outcome::exec_denied(),
        "enforcement lapsed after the link pins were removed"
    );
    // Well past the moment an unheld link would be gone.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        run_in(&cgroup, &["exec", &bad, "true"], PATIENCE),
        Outcome::exec_denied(),
        "enforcement lapsed after the link pins were removed"
    );
    let pid = agent.pid().to_string();
    assert_eq!(
        run_in(&cgroup, &["kill", &pid, "9"], PATIENCE),
        refused(EPERM)
    );
    wait_for("the agent to pin its links again", PATIENCE, || {
        (pins() == before).then_some(())
    });
    agent.wait_log("pinned them again", 1, PATIENCE);
}

#[test]
fn a_gated_task_cannot_reach_the_decision_service_nor_approve_its_own_request() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "protect-asked");
    let port: u16 = 17461;
    let cgroup_name = "gk-protect-service";
    let cgroup = Cgroup::create(cgroup_name);
    let agent = Agent::start_with(
        "protect-service",
        &policy::exec(
            cgroup_name,
            &format!("default = \"allow\"\nask = [\"{asked}\"]"),
            "timeout = \"5m\"",
        ),
        &embedded_decision(port),
    );
    let port_text = port.to_string();

    // The listener is fenced off for root, unprivileged and userns root.
    let connect = ["connect", "127.0.0.1", port_text.as_str()];
    assert_eq!(
        run_in(&cgroup, &connect, PATIENCE),
        Outcome::connect_denied()
    );
    let mut as_nobody = vec!["as-user", NOBODY];
    as_nobody.extend_from_slice(&connect);
    assert_eq!(
        run_in(&cgroup, &as_nobody, PATIENCE),
        Outcome::connect_denied()
    );
    let mut in_userns = vec!["userns-root"];
    in_userns.extend_from_slice(&connect);
    assert_eq!(
        run_in(&cgroup, &in_userns, PATIENCE),
        Outcome::connect_denied()
    );
    // Another loopback address reaches a wildcard listener, not this one;
    // the same address outside connects.
    assert_eq!(run_outside(&connect), Outcome::connected());

    // The workload's own paused request...
    let mut paused = start_paused(&cgroup, &["exec", &asked, "true"], PATIENCE);
    let id = agent.wait_request_id(PATIENCE);
    // ...cannot be approved from inside the gated cgroup, even with the
    // bootstrap reviewer's credentials.
    let cli_config = agent.state_dir().join("cli.toml");
    let mut approve = Command::new("gatekeep");
    approve
        .args(["review", "approve", &id])
        .env("GATEKEEP_CLI_CONFIG", &cli_config)
        .env("XDG_CONFIG_HOME", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut attempt = cgroup.spawn(&mut approve);
    let output = gatekeep_tests::wait_child(&mut attempt, PATIENCE);
    assert!(
        !output.status.success(),
        "gatekeep review approve succeeded from the gated cgroup: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(is_stopped(paused.id()), "the request was let through");
    assert_eq!(agent.wait_pending(1, PATIENCE).len(), 1);
    // The reviewer outside approves it.
    agent.cli_ok(&["review", "approve", &id], "approve from outside");
    assert_eq!(finish(&mut paused, PATIENCE), Outcome::exec_ran());
    // The three connects were refused by the fence; the approval attempt was
    // stopped even earlier: the bootstrap reviewer's cli.toml is one of
    // gatekeep's secrets, which a gated task cannot read (issue 18 item 3).
    assert_eq!(refusals(&agent, "service-connect", &cgroup), 3);
    assert!(refusals(&agent, "files", &cgroup) >= 1);
}

#[test]
fn a_policy_relaxes_a_protection_explicitly_and_the_audit_log_says_so() {
    require_vm();
    let port: u16 = 17462;
    let (cgroup, agent) = gated(
        "protect-relaxed",
        &[("protect", "relax = [\"mount\", \"service-connect\"]")],
        Some(&embedded_decision(port)),
    );
    let scratch = agent.scratch();
    let target = scratch.join("mnt");
    fs::create_dir(&target).expect("mount point");
    let target = target.to_string_lossy().into_owned();
    let port_text = port.to_string();

    assert_eq!(
        run_in(&cgroup, &["mount-tmpfs", &target], PATIENCE),
        ok(),
        "mount is relaxed"
    );
    assert_eq!(run_outside(&["umount", &target]), ok());
    assert_eq!(
        run_in(&cgroup, &["connect", "127.0.0.1", &port_text], PATIENCE),
        Outcome::connected(),
        "service-connect is relaxed"
    );
    // What the policy did not relax still holds.
    let pid = agent.pid().to_string();
    assert_eq!(
        run_in(&cgroup, &["kill", &pid, "0"], PATIENCE),
        refused(EPERM)
    );
    assert_eq!(
        run_in(&cgroup, &["bpf-prog-load"], PATIENCE),
        refused(EPERM)
    );

    let loaded = agent.records_of("policy_loaded");
    let relaxed = &loaded[0]["payload"]["protect_relaxed"];
    assert_eq!(
        relaxed,
        &serde_json::json!([{
            "policy": "gk-protect-relaxed",
            "relax": ["mount", "service-connect"],
        }]),
        "{loaded:#?}"
    );
}
