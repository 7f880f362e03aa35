//! The agent dies or restarts: enforcement never lapses, paused tasks stay
//! paused (fail closed), and the next agent finishes them. Programs pinned
//! by another build are refused, never adopted, and keep enforcing until
//! `gatekeep-agent unload`.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, Map, MapData},
    programs::links::{FdLink, PinnedLink},
};
use gatekeep_agent::bpf::pinning::PinLayout;
use gatekeep_common::map_names;
use gatekeep_tests::{
    gate_exec, is_stopped, kernel,
    policy::{allow_but, on_timeout},
    require_vm, wait_child, wait_for,
    workload::{Outcome, finish, run_in, start_paused, tool},
};
use serde_json::json;

#[test]
fn agent_killed_while_a_task_is_paused_leaves_it_paused_and_the_next_agent_finishes_it() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    let bad = tool(dir.path(), "bad-tool");
    let (cgroup, mut agent) = gate_exec(
        "restart-kill",
        &format!("default = \"allow\"\nask = [\"{asked}\"]\ndeny = [\"{bad}\"]"),
        &on_timeout("4s", "allow"),
    );
    let mut child = start_paused(&cgroup, &["exec", &asked, "true"], Duration::from_secs(20));
    let pid = child.id();
    agent.wait_record("requested", Duration::from_secs(20), |_| true);

    agent.kill_hard();
    // Fail closed: well past the timeout, nobody continues it.
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(6) {
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the task ran while no agent was up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(is_stopped(pid), "the task must still be stopped");
    // The programs stay attached: a denied exec is still denied.
    assert_eq!(
        run_in(&cgroup, &["exec", &bad, "true"], Duration::from_secs(30)),
        Outcome::exec_denied(),
        "enforcement lapsed while the agent was down"
    );

    agent.launch();
    let log = agent.log();
    assert!(
        log.contains("start=adopted") || log.contains("start=\"adopted\""),
        "the restarted agent must adopt the pinned programs:\n{log}"
    );
    assert_eq!(
        log.matches("kernel_logs=true").count(),
        2,
        "both the loading and the adopting agent drain the programs' logs:\n{log}"
    );
    let output = wait_child(&mut child, Duration::from_mins(1));
    assert!(
        output.status.success(),
        "the next agent must finish the paused request: {output:?}"
    );
    let records = agent.audit_records();
    let requested = records.iter().filter(|r| r["kind"] == "requested").count();
    assert!(requested >= 2, "asked again by the new agent");
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "expired" && r["payload"]["verdict"] == "allow")
    );
}

#[test]
fn clean_restart_keeps_paused_tasks_paused_and_finishes_them() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    let (cgroup, mut agent) = gate_exec(
        "restart-term",
        &allow_but("ask", &asked),
        &on_timeout("5s", "deny"),
    );
    let mut child = start_paused(&cgroup, &["exec", &asked, "true"], Duration::from_secs(20));
    let pid = child.id();
    agent.wait_record("requested", Duration::from_secs(20), |_| true);
    assert!(agent.stop(), "SIGTERM must stop the agent cleanly");
    assert!(
        is_stopped(pid),
        "a clean stop must not release paused tasks"
    );
    let cancelled = agent.wait_record("cancelled", Duration::from_secs(5), |r| {
        r["payload"]["cause"] == "agent_stopped"
    });
    assert!(cancelled["request_id"].is_string());
    assert!(
        !agent.records_of("agent_stopped").is_empty(),
        "nothing lost on SIGTERM"
    );
    agent.launch();
    assert_eq!(
        finish(&mut child, Duration::from_mins(1)).stdout,
        "errno 1",
        "denied at the timeout by the new agent"
    );
}

/// The kernel's ids of the link pinned at `path` and of its program.
fn pinned_link_ids(path: &Path) -> (u32, u32) {
    let link = FdLink::from(
        PinnedLink::from_pin(path)
            .unwrap_or_else(|e| panic!("open the link pinned at {}: {e}", path.display())),
    );
    let info = link
        .info()
        .unwrap_or_else(|e| panic!("info of the link pinned at {}: {e}", path.display()));
    // Dropping `link` closes our fd: the pin alone keeps the link.
    (info.id(), info.program_id())
}

#[test]
fn upgrade_retires_links_of_programs_this_version_lacks_and_attaches_its_own() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = tool(dir.path(), "bad-tool");
    let (cgroup, mut agent) = gate_exec("upgrade", &allow_but("deny", &bad), "");
    let layout = PinLayout::new(agent.pin_dir());
    let first = agent.wait_record("agent_started", Duration::from_secs(20), |_| true);
    assert_eq!(first["payload"]["start"], "loaded", "{first}");

    // The agent stops; its programs stay pinned.
    assert!(agent.stop(), "SIGTERM must stop the agent cleanly");
    assert_eq!(
        layout.pinned_programs(),
        PinLayout::programs(),
        "every program stays pinned after a clean stop"
    );
    // An older version's program: the exit cleanup pinned under another
    // name (bpffs supports rename(2)).
    let old_pin = layout.links_dir().join("sys_enter_execve");
    let (old_link, old_program) = pinned_link_ids(&layout.link("sched_process_exit"));
    fs::rename(layout.link("sched_process_exit"), &old_pin).expect("rename the pinned link");

    agent.launch();
    let started = wait_for("the second start's record", Duration::from_secs(20), || {
        let started = agent.records_of("agent_started");
        (started.len() >= 2).then_some(started)
    });
    assert_eq!(started.len(), 2, "{started:?}");
    let payload = &started[1]["payload"];
    assert_eq!(payload["start"], "completed", "{payload}");
    assert_eq!(
        payload["attached_now"],
        json!(["sched_process_exit"]),
        "{payload}"
    );
    assert_eq!(payload["retired"], json!(["sys_enter_execve"]), "{payload}");
    let log = agent.log();
    assert!(
        log.contains("detached programs an older agent left pinned")
            && log.contains("sys_enter_execve"),
        "the retired links must be logged:\n{log}"
    );

    // The old link is unpinned and, with nothing else holding it, gone
    // with its program; sched_process_exit is pinned anew, a new link and program.
    assert!(
        !old_pin.exists(),
        "the retired link is still pinned at {}",
        old_pin.display()
    );
    assert_eq!(layout.pinned_programs(), PinLayout::programs());
    let (new_link, new_program) = pinned_link_ids(&layout.link("sched_process_exit"));
    assert_ne!(new_link, old_link, "sched_process_exit must be a new link");
    assert_ne!(
        new_program, old_program,
        "sched_process_exit must be a new program"
    );
    wait_for(
        "the retired link to be released",
        Duration::from_secs(10),
        || {
            let links: Vec<u32> = aya::programs::loaded_links()
                .filter_map(Result::ok)
                .map(|l| l.id())
                .collect();
            (!links.contains(&old_link)).then_some(())
        },
    );
    wait_for(
        "the retired program to be unloaded",
        Duration::from_secs(10),
        || {
            let programs = kernel::loaded_programs();
            (!programs.iter().any(|(id, _)| *id == old_program)).then_some(())
        },
    );

    // argv capture works through the new program: a denied exec is
    // recorded with its argv.
    let _ = agent.exec_denied_with_argv(&cgroup, &bad, &["true", "--after-upgrade"]);
}

#[test]
fn pinned_programs_of_another_build_are_refused_until_unloaded_and_keep_enforcing_meanwhile() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = tool(dir.path(), "bad-tool");
    let (cgroup, mut agent) = gate_exec("other-build", &allow_but("deny", &bad), "");
    agent.wait_record("agent_started", Duration::from_secs(20), |_| true);
    assert!(agent.stop(), "SIGTERM must stop the agent cleanly");

    // Another build's programs: what the pinned build id says.
    let layout = PinLayout::new(agent.pin_dir());
    let data = MapData::from_pin(layout.map(map_names::BUILD_ID)).expect("pinned BUILD_ID");
    let mut build_id: Array<MapData, [u8; 32]> =
        Array::try_from(Map::Array(data)).expect("BUILD_ID is an array of 32-byte ids");
    assert_eq!(
        build_id.get(&0, 0).expect("read the build id"),
        gatekeep_agent::bpf::pinning::object_id(),
        "the agent records its own object's id"
    );
    build_id.set(0, [0xab; 32], 0).expect("write another id");

    let mut refused = Command::new("gatekeep-agent")
        .args(["run", "--config"])
        .arg(agent.config())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gatekeep-agent");
    let output = wait_child(&mut refused, Duration::from_mins(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "must refuse; stderr:\n{stderr}");
    assert!(
        stderr.contains("loaded by another gatekeep build (object abababababababab")
            && stderr.contains("run `gatekeep-agent unload`"),
        "the error must name the cause and the fix:\n{stderr}"
    );
    // Refused, not replaced: the pinned programs still enforce.
    assert_eq!(layout.pinned_programs(), PinLayout::programs());
    let outcome = run_in(&cgroup, &["exec", &bad, "true"], Duration::from_secs(30));
    assert_eq!(
        outcome,
        Outcome::exec_denied(),
        "enforcement must not lapse"
    );

    let (unloaded, stdout, stderr) = agent.admin(&["unload"]);
    assert!(unloaded, "unload failed:\n{stdout}\n{stderr}");
    agent.launch();
    let started = wait_for("the new start's record", Duration::from_secs(20), || {
        let started = agent.records_of("agent_started");
        (started.len() >= 2).then_some(started)
    });
    assert_eq!(started[1]["payload"]["start"], "loaded", "{}", started[1]);
    let _ = agent.exec_denied_with_argv(&cgroup, &bad, &["true", "--after-unload"]);
}
