//! Faults production brings, injected on the real kernel: the agent or the
//! service SIGKILLed at random points while requests are pending and both
//! audit logs are being written, and the wall clock jumping during a pending
//! request. Each test states the outcome the threat model promises (§19)
//! and checks it: no task is released without a recorded verdict, the
//! chains verify, nothing is lost, and nobody waits forever.
//!
//! The kill points come from a seeded generator; the seed is printed, and
//! `GATEKEEP_FAULT_SEED=<n>` replays a run.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use gatekeep_tests::{
    Agent, Cgroup, Service, embedded_decision, is_stopped,
    policy::{self, allow_but, on_timeout},
    require_vm,
    review::{Reviewer, request_id},
    wait_for, wait_stopped,
    workload::{Outcome, finish, tool, workload},
};
use nix::{
    fcntl::{FcntlArg, fcntl},
    mount::{MntFlags, MsFlags, mount, umount2},
    sys::stat::Mode,
    time::{ClockId, clock_gettime, clock_settime},
    unistd::{mkfifo, pipe},
};
use serde_json::Value;

/// How long anything in the flow may take under software emulation.
const PATIENCE: Duration = Duration::from_mins(2);

/// A small xorshift generator: the kill points only need to be spread and
/// replayable, not unpredictable.
struct KillPoints(u64);

impl KillPoints {
    fn new(test: &str) -> Self {
        let seed = std::env::var("GATEKEEP_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
                    | 1
            });
        eprintln!("{test}: kill points from GATEKEEP_FAULT_SEED={seed}");
        Self(seed)
    }

    /// A delay in `0..max`.
    fn delay(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX).max(1);
        Duration::from_millis(self.0 % max_ms)
    }
}

/// The workloads of a test, by pid: each execs the asked tool once.
fn spawn_asking(cgroup: &Cgroup, asked: &str, count: usize, into: &mut BTreeMap<u32, Child>) {
    for _ in 0..count {
        let child = cgroup.spawn(&mut workload(&["exec", asked, "true"]));
        into.insert(child.id(), child);
    }
}

/// The pids the agent's log says were released with `verdict` by a final
/// `decided` or `expired` record.
fn pids_with_verdict(records: &[Value], verdict: &str) -> BTreeSet<u64> {
    records
        .iter()
        .filter(|r| r["kind"] == "decided" || r["kind"] == "expired")
        .filter(|r| r["payload"]["verdict"] == verdict && r["payload"]["final"] != false)
        .filter_map(|r| r["payload"]["pid"].as_u64())
        .collect()
}

#[test]
fn agent_sigkilled_at_random_points_releases_no_task_without_a_recorded_verdict() {
    require_vm();
    const ROUNDS: usize = 6;
    const PER_ROUND: usize = 3;
    let mut points = KillPoints::new("agent kills");
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    // A short timeout that allows: the agent is deciding and writing its log
    // all the time, and a task released without its record would show.
    let (cgroup, mut agent) = gatekeep_tests::gate_exec(
        "faults-agent-kill",
        &allow_but("ask", &asked),
        &on_timeout("1s", "allow"),
    );
    let mut children = BTreeMap::new();
    for round in 0..ROUNDS {
        spawn_asking(&cgroup, &asked, PER_ROUND, &mut children);
        let delay = points.delay(Duration::from_millis(2500));
        thread::sleep(delay);
        eprintln!("round {round}: SIGKILL after {delay:?}");
        agent.kill_hard();
        agent.launch();
    }
    for (pid, child) in &mut children {
        assert_eq!(
            finish(child, PATIENCE),
            Outcome::exec_ran(),
            "task {pid}: allowed at the timeout, by this agent or the next"
        );
    }
    let records = agent.audit_records();
    let released = pids_with_verdict(&records, "allow");
    for pid in children.keys() {
        assert!(
            released.contains(&u64::from(*pid)),
            "task {pid} ran without a recorded allow verdict; released: {released:?}"
        );
    }
    let (ok, out, err) = agent.admin(&["audit", "verify"]);
    assert!(
        ok,
        "the chain must verify after {ROUNDS} SIGKILLs: {out}{err}"
    );
}

#[test]
fn service_sigkilled_mid_commit_loses_no_decision_and_counts_none_twice() {
    require_vm();
    const ROUNDS: usize = 4;
    const PER_ROUND: usize = 2;
    let mut points = KillPoints::new("service kills");
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    let mut service = Service::start(17453);
    let cgroup_name = "gk-faults-service-kill";
    let cgroup = Cgroup::create(cgroup_name);
    let agent = Agent::start_with(
        "faults-service-kill",
        &policy::exec(cgroup_name, &allow_but("ask", &asked), "timeout = \"10m\""),
        &service.decision_config("vm"),
    );
    let mut children = BTreeMap::new();
    for round in 0..ROUNDS {
        spawn_asking(&cgroup, &asked, PER_ROUND, &mut children);
        let pending = service.wait_pending(PER_ROUND, PATIENCE);
        let ids: Vec<String> = pending.iter().map(request_id).collect();
        // The reviewer approves while the service dies at a random point:
        // before, during or after each commit.
        let approving = {
            let cli = ReviewerCli::of(&service);
            thread::spawn(move || {
                for id in ids {
                    let _ = cli.run(&["review", "approve", &id, "--reason", "fault test"]);
                }
            })
        };
        let delay = points.delay(Duration::from_millis(1500));
        thread::sleep(delay);
        eprintln!("round {round}: SIGKILL of the service after {delay:?}");
        service.kill_hard();
        approving.join().expect("the approving thread");
        service.launch();
        // What the kill cut short is still pending (the agent re-sends its
        // requests): approve it again.
        let left = wait_for(
            "the service to list what is still pending",
            PATIENCE,
            || {
                let (ok, out, _) = service.cli(&["--output", "json", "review", "list"]);
                ok.then(|| serde_json::from_str::<Vec<Value>>(&out).ok())
                    .flatten()
            },
        );
        for request in &left {
            service.cli_ok(
                &[
                    "review",
                    "approve",
                    &request_id(request),
                    "--reason",
                    "again",
                ],
                "approve what the kill cut short",
            );
        }
        wait_for("this round's tasks to finish", PATIENCE, || {
            children
                .values_mut()
                .all(|c| c.try_wait().ok().flatten().is_some())
                .then_some(())
        });
    }
    for (pid, child) in &mut children {
        assert_eq!(
            finish(child, PATIENCE),
            Outcome::exec_ran(),
            "task {pid}: approved, before or after the service's restart"
        );
    }
    let released = pids_with_verdict(&agent.audit_records(), "allow");
    for pid in children.keys() {
        assert!(
            released.contains(&u64::from(*pid)),
            "task {pid} ran without a recorded allow verdict; released: {released:?}"
        );
    }
    // The service's log: one final decision per request, never two.
    let service_records = service.service_audit();
    let mut finals: BTreeMap<String, usize> = BTreeMap::new();
    for record in &service_records {
        if record["kind"] == "decided" && record["payload"]["final"] != false {
            let id = record["request_id"].as_str().unwrap_or_default().to_owned();
            *finals.entry(id).or_default() += 1;
        }
    }
    assert!(
        finals.values().all(|count| *count == 1),
        "a request was decided twice: {finals:?}"
    );
    assert!(
        finals.len() >= children.len(),
        "{} final decisions for {} tasks",
        finals.len(),
        children.len()
    );
    service.cli_ok(&["audit", "verify"], "service audit verify");
    let (ok, out, err) = agent.admin(&["audit", "verify"]);
    assert!(ok, "the agent's chain must verify: {out}{err}");
}

/// The `gatekeep` CLI as a service's reviewer, movable to another thread.
struct ReviewerCli {
    env: Vec<(&'static str, std::ffi::OsString)>,
}

impl ReviewerCli {
    fn of(service: &Service) -> Self {
        Self {
            env: service.cli_env(),
        }
    }

    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let env: Vec<(&str, &std::ffi::OsStr)> =
            self.env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
        gatekeep_tests::gatekeep(args, &env)
    }
}

/// Sets the wall clock `offset` away (forward when positive) and puts it
/// back, by the monotonic time that passed meanwhile, when dropped.
struct ClockJump {
    set_at: Instant,
    real_then: Duration,
}

impl ClockJump {
    fn by(offset_secs: i64) -> Self {
        let now = clock_gettime(ClockId::CLOCK_REALTIME).expect("read the wall clock");
        let real_then = Duration::from(now);
        let jumped = Duration::from_secs(
            u64::try_from(i64::try_from(real_then.as_secs()).expect("secs") + offset_secs)
                .expect("a clock after 1970"),
        );
        clock_settime(ClockId::CLOCK_REALTIME, jumped.into()).expect("set the wall clock");
        eprintln!("wall clock moved by {offset_secs} s");
        Self {
            set_at: Instant::now(),
            real_then,
        }
    }
}

impl Drop for ClockJump {
    fn drop(&mut self) {
        let back = self.real_then + self.set_at.elapsed();
        let _ = clock_settime(ClockId::CLOCK_REALTIME, back.into());
    }
}

#[test]
fn a_wall_clock_jumping_back_neither_strands_nor_stretches_a_pending_request() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    let cgroup_name = "gk-faults-clock-back";
    let cgroup = Cgroup::create(cgroup_name);
    let agent = Agent::start_with(
        "faults-clock-back",
        &policy::exec(
            cgroup_name,
            &allow_but("ask", &asked),
            &on_timeout("8s", "deny"),
        ),
        &embedded_decision(17454),
    );
    let mut child = cgroup.spawn(&mut workload(&["exec", &asked, "true"]));
    agent.wait_pending(1, PATIENCE);
    // Two hours back: a deadline kept on the wall clock would now be two
    // hours away. The agent's is monotonic, so the task is denied at 8 s.
    let jump = ClockJump::by(-2 * 3600);
    assert_eq!(
        finish(&mut child, PATIENCE),
        Outcome::exec_denied(),
        "denied by the timeout, on time"
    );
    let expired = agent.wait_record("expired", PATIENCE, |_| true);
    assert_eq!(expired["payload"]["verdict"], "deny", "{expired}");
    // The service does not keep listing the request as pending either.
    wait_for("the service to end the request", PATIENCE, || {
        let listed = agent.cli_ok(&["--output", "json", "review", "list"], "review list");
        (serde_json::from_str::<Vec<Value>>(&listed).ok()?.is_empty()).then_some(())
    });
    drop(jump);
    let (ok, out, err) = agent.admin(&["audit", "verify"]);
    assert!(
        ok,
        "a chain written across a clock jump verifies: {out}{err}"
    );
    agent.cli_ok(&["audit", "verify"], "service audit verify");
}

#[test]
fn a_wall_clock_jumping_forward_ends_a_pending_request_with_its_timeout_action() {
    require_vm();
    let dir = tempfile::tempdir().expect("tempdir");
    let asked = tool(dir.path(), "asked-tool");
    let cgroup_name = "gk-faults-clock-forward";
    let cgroup = Cgroup::create(cgroup_name);
    let agent = Agent::start_with(
        "faults-clock-forward",
        &policy::exec(
            cgroup_name,
            &allow_but("ask", &asked),
            &on_timeout("10m", "deny"),
        ),
        &embedded_decision(17455),
    );
    let mut child = cgroup.spawn(&mut workload(&["exec", &asked, "true"]));
    let id = agent.wait_request_id(PATIENCE);
    // Two hours forward: the service's deadline (wall clock: it may be
    // another host) has passed, so it applies the timeout action at its
    // next check, never later; the task is not left waiting for the
    // agent's own 10-minute deadline.
    let jump = ClockJump::by(2 * 3600);
    assert_eq!(
        finish(&mut child, PATIENCE),
        Outcome::exec_denied(),
        "denied by the timeout action"
    );
    drop(jump);
    let ended = agent.wait_record("expired", PATIENCE, |r| r["request_id"] == id.as_str());
    assert_eq!(ended["payload"]["verdict"], "deny", "{ended}");
    let (ok, out, err) = agent.admin(&["audit", "verify"]);
    assert!(
        ok,
        "a chain written across a clock jump verifies: {out}{err}"
    );
    agent.cli_ok(&["audit", "verify"], "service audit verify");
}

/// `/etc/passwd` replaced by a FIFO that nobody writes: the name service
/// (glibc's `files` source here, LDAP or SSSD elsewhere) never answers a uid
/// the agent's own passwd copy lacks. Dropping it answers (EOF) and unmounts.
struct HungNameService {
    fifo: PathBuf,
}

impl HungNameService {
    fn install(dir: &Path) -> Self {
        let fifo = dir.join("passwd-fifo");
        mkfifo(&fifo, Mode::from_bits_truncate(0o644)).expect("mkfifo");
        mount(
            Some(&fifo),
            "/etc/passwd",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind a FIFO over /etc/passwd");
        Self { fifo }
    }
}

impl Drop for HungNameService {
    fn drop(&mut self) {
        // A writer that closes at once: every lookup stuck in open() or read()
        // gets end of file. Non-blocking, so no reader means no wait.
        let _ = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.fifo);
        let _ = umount2("/etc/passwd", MntFlags::MNT_DETACH);
    }
}

#[test]
fn the_agent_decides_while_its_log_reader_and_name_service_are_stalled_by_its_own_gate() {
    require_vm();
    const WORK: usize = 60;
    let dir = tempfile::tempdir().expect("tempdir");
    // The tools run as an unprivileged uid too.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let stall = tool(dir.path(), "stall-tool");
    let asked = tool(dir.path(), "asked-tool");
    let (stalled_name, work_name) = ("gk-faults-deps-stalled", "gk-faults-deps-work");
    let stalled = Cgroup::create(stalled_name);
    let work = Cgroup::create(work_name);
    let policies = policy::exec(
        stalled_name,
        &allow_but("ask", &stall),
        &on_timeout("10m", "deny"),
    ) + &policy::exec(
        work_name,
        &allow_but("ask", &asked),
        &on_timeout("1s", "allow"),
    );
    // The agent's standard error is a pipe of one page.
    let (read_end, write_end) = pipe().expect("pipe");
    fcntl(&write_end, FcntlArg::F_SETPIPE_SZ(4096)).expect("shrink the pipe");
    let agent = Agent::start_logging_to(
        "faults-deps",
        &policies,
        "[decision]\nmode = \"local\"\n",
        write_end,
    );
    // Its reader sits in a gated cgroup and is paused by the agent itself
    // before it reads a byte (as a journald or log shipper under a policy
    // would be): from now on, nothing drains the agent's log.
    let mut log_reader =
        stalled.spawn(workload(&["exec", &stall, "cat"]).stdin(Stdio::from(read_end)));
    wait_stopped(log_reader.id(), PATIENCE);
    // And the name service hangs.
    let name_service = HungNameService::install(dir.path());

    // Work for the agent, logged at debug level (far more than a page), as a
    // uid its passwd copy lacks, so each request would ask the name service.
    let mut children: Vec<Child> = (0..WORK)
        .map(|_| work.spawn(&mut workload(&["as-user", "4242", "exec", &asked, "true"])))
        .collect();
    for child in &mut children {
        assert_eq!(
            finish(child, PATIENCE),
            Outcome::exec_ran(),
            "allowed at the timeout while the log reader and the name service were stalled"
        );
    }
    let records = agent.audit_records();
    let asked_by_4242: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "requested" && r["payload"]["request"]["uid"] == 4242)
        .collect();
    assert!(
        asked_by_4242.len() >= WORK,
        "{} requests recorded for {WORK} tasks",
        asked_by_4242.len()
    );
    assert!(
        asked_by_4242
            .iter()
            .all(|r| r["payload"]["request"]["user"].is_null()),
        "no name while the name service hangs: {:?}",
        asked_by_4242.first()
    );
    assert!(
        is_stopped(log_reader.id()),
        "the log reader is still paused: the log really was stalled"
    );
    drop(name_service);
    let _ = log_reader.kill();
    let _ = log_reader.wait();
    let (ok, out, err) = agent.admin(&["audit", "verify"]);
    assert!(ok, "the chain verifies: {out}{err}");
}
