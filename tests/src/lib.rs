//! Helpers shared by gatekeep's integration tests: cgroups that clean up
//! after themselves, the agent and the decision service as processes, and a
//! guard that refuses to run kernel tests outside the VM. The modules hold
//! the rest: [`workload`] (what runs in a gated cgroup and how it ended),
//! [`policy`] (policy files), [`review`] (a reviewer at the decision
//! service) and [`kernel`] (the programs driven through their maps).

pub mod kernel;
pub mod policy;
pub mod review;
pub mod workload;

use std::{
    fs,
    io::Write as _,
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Where cgroup v2 is mounted (by the VM's `/init`, and on systemd hosts).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Panics unless running inside the test VM (`cargo xtask vm-test` sets
/// `GATEKEEP_IN_VM=1`): these tests load BPF LSM programs and change kernel
/// state, which must never happen on a developer's host.
pub fn require_vm() {
    assert!(
        std::env::var_os("GATEKEEP_IN_VM").is_some(),
        "this test needs a kernel with BPF LSM and runs only inside the VM: use `cargo xtask vm-test`"
    );
}

/// A cgroup v2 directory created for one test and removed when dropped
/// (after killing anything still inside it).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `/sys/fs/cgroup/<name>` (removing a leftover of an earlier
    /// run first).
    #[must_use]
    pub fn create(name: &str) -> Self {
        let path = Path::new(CGROUP_ROOT).join(name);
        if path.exists() {
            drop(Self { path: path.clone() });
        }
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("failed to create cgroup {}: {e}", path.display()));
        Self { path }
    }

    /// Takes charge of an existing cgroup directory (e.g. a child created
    /// by the test), removing it when dropped.
    #[must_use]
    pub fn adopt(name: &str) -> Self {
        let path = Path::new(CGROUP_ROOT).join(name);
        assert!(path.is_dir(), "cgroup {} does not exist", path.display());
        Self { path }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id the kernel reports (`bpf_get_current_cgroup_id`): the
    /// inode number of the cgroup directory.
    #[must_use]
    pub fn id(&self) -> u64 {
        fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("failed to stat {}: {e}", self.path.display()))
            .ino()
    }

    /// Makes `command` join this cgroup between fork and exec, so the exec
    /// itself is already gated.
    pub fn place(&self, command: &mut Command) {
        let procs = self.path.join("cgroup.procs");
        // SAFETY: the closure only opens and writes a file (async-signal-safe
        // syscalls); the path was allocated before the fork.
        unsafe {
            command.pre_exec(move || {
                let mut file = fs::OpenOptions::new().write(true).open(&procs)?;
                file.write_all(b"0")
            });
        }
    }

    /// Starts `command` inside this cgroup.
    pub fn spawn(&self, command: &mut Command) -> Child {
        self.place(command);
        command.spawn().unwrap_or_else(|e| {
            panic!(
                "failed to start {command:?} in {}: {e}",
                self.path.display()
            )
        })
    }

    /// Pids currently in the cgroup.
    #[must_use]
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // cgroup.kill (5.14+) kills every process inside, including stopped
        // ones; then the (empty) directory can be removed.
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

/// Polls `condition` every 10 ms until it returns `Some` or `timeout`
/// passes; panics with `what` on timeout.
pub fn wait_for<T>(what: &str, timeout: Duration, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The state letter of a thread (`/proc/<pid>/task/<tid>/stat`): `T` when
/// stopped, `t` in a tracing stop, `S`, `R`...; `None` once it is gone.
#[must_use]
pub fn task_state(pid: u32, tid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().next()?.chars().next()
}

/// Whether any thread of `pid` is stopped (`T`).
#[must_use]
pub fn is_stopped(pid: u32) -> bool {
    fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .any(|tid| task_state(pid, tid) == Some('T'))
}

/// Waits until a thread of `pid` is stopped (a paused syscall).
pub fn wait_stopped(pid: u32, timeout: Duration) {
    wait_for(&format!("process {pid} to be stopped"), timeout, || {
        is_stopped(pid).then_some(())
    });
}

/// Sends `signal` to process `pid`.
pub fn send_signal(pid: u32, signal: nix::sys::signal::Signal) {
    let target = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits i32"));
    nix::sys::signal::kill(target, signal)
        .unwrap_or_else(|e| panic!("failed to send {signal} to {pid}: {e}"));
}

/// Sends SIGCONT to `pid`: a stray one, as far as a paused syscall goes.
pub fn sigcont(pid: u32) {
    send_signal(pid, nix::sys::signal::Signal::SIGCONT);
}

/// A listener on 127.0.0.1 (outside any gated cgroup) and its port.
#[must_use]
pub fn loopback_listener() -> (std::net::TcpListener, u16) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback listener");
    let port = listener.local_addr().expect("local addr").port();
    (listener, port)
}

/// A `gatekeep-agent run` (from `PATH`) with its own config, policy folder,
/// audit log and pin directory in a temporary folder, killed and unloaded
/// when dropped. Its log is printed if the test panicked.
#[derive(Debug)]
pub struct Agent {
    dir: tempfile::TempDir,
    pin_dir: PathBuf,
    audit_db: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// Where the agent's standard output and error go instead of its log file.
    log_to: Option<std::os::fd::OwnedFd>,
}

impl Agent {
    /// Writes `policy` (TOML) as the only policy file and starts the agent
    /// with the local decider (timeouts only: the kernel and pause tests need
    /// no reviewer); returns once it says it is ready. `name` names the pin
    /// directory.
    #[must_use]
    pub fn start(name: &str, policy: &str) -> Self {
        Self::start_with(name, policy, "[decision]\nmode = \"local\"\n")
    }

    /// Like [`start`](Self::start), with `decision` (a `[decision]` TOML
    /// section) saying who decides: e.g. [`embedded_decision`] or
    /// [`Service::decision_config`].
    #[must_use]
    pub fn start_with(name: &str, policy: &str, decision: &str) -> Self {
        Self::start_full(name, policy, decision, None)
    }

    /// Like [`start`](Self::start), with the audit log at `audit_db` (e.g. on a small
    /// filesystem of the test's own) instead of the agent's temporary folder.
    #[must_use]
    pub fn start_with_audit_db(name: &str, policy: &str, audit_db: &Path) -> Self {
        Self::start_full(
            name,
            policy,
            "[decision]\nmode = \"local\"\n",
            Some(audit_db.to_owned()),
        )
    }

    /// Like [`start_with`](Self::start_with), with the agent's standard output and error
    /// going to `log` (e.g. a pipe that nobody reads) instead of its log file, so
    /// [`log`](Self::log) has nothing.
    #[must_use]
    pub fn start_logging_to(
        name: &str,
        policy: &str,
        decision: &str,
        log: std::os::fd::OwnedFd,
    ) -> Self {
        Self::start_full_with(name, policy, decision, None, Some(log))
    }

    fn start_full(name: &str, policy: &str, decision: &str, audit_db: Option<PathBuf>) -> Self {
        Self::start_full_with(name, policy, decision, audit_db, None)
    }

    fn start_full_with(
        name: &str,
        policy: &str,
        decision: &str,
        audit_db: Option<PathBuf>,
        log_to: Option<std::os::fd::OwnedFd>,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("gk-agent-{name}-"))
            .tempdir()
            .expect("temp dir for the agent");
        let policies = dir.path().join("policies");
        fs::create_dir(&policies).expect("policy dir");
        fs::write(policies.join("policy.toml"), policy).expect("write policy");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/gk-test-{name}"));
        let audit_db = audit_db.unwrap_or_else(|| dir.path().join("audit.db"));
        let config = format!(
            "policy_dir = \"{}\"\naudit_db = \"{}\"\npin_dir = \"{}\"\nhost = \"vm\"\n\
             reconcile_interval = \"500ms\"\nrescan_interval = \"500ms\"\nstate_dir = \"{}\"\n{decision}",
            policies.display(),
            audit_db.display(),
            pin_dir.display(),
            dir.path().join("state").display(),
        );
        fs::write(dir.path().join("agent.toml"), config).expect("write config");
        let mut agent = Self {
            dir,
            pin_dir,
            audit_db,
            child: None,
            starts: 0,
            log_to,
        };
        agent.launch();
        agent
    }

    #[must_use]
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    #[must_use]
    pub fn audit_db(&self) -> PathBuf {
        self.audit_db.clone()
    }

    /// Where the agent pins its programs' links (`links/<program>`) and
    /// its maps (`maps/<MAP>`), on bpffs.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The agent's state folder (grants, the embedded service's data).
    #[must_use]
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The embedded decision service's audit log.
    #[must_use]
    pub fn service_audit_db(&self) -> PathBuf {
        self.state_dir().join("service/audit.db")
    }

    /// The folder the agent loads policies from.
    #[must_use]
    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    /// A scratch folder for the test's own files.
    #[must_use]
    pub fn scratch(&self) -> PathBuf {
        let scratch = self.dir.path().join("scratch");
        fs::create_dir_all(&scratch).expect("scratch dir");
        scratch
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// Everything the agent (every start of it) logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// Starts (another) agent process on the same config; waits until ready.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "the agent is already running");
        let ready = self.dir.path().join("ready");
        let _ = fs::remove_file(&ready);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("agent log");
        self.starts += 1;
        let (stdout, stderr) = match &self.log_to {
            Some(fd) => (
                Stdio::from(fd.try_clone().expect("log fd")),
                Stdio::from(fd.try_clone().expect("log fd")),
            ),
            None => (
                Stdio::from(log.try_clone().expect("log fd")),
                Stdio::from(log),
            ),
        };
        let child = Command::new("gatekeep-agent")
            .arg("run")
            .arg("--config")
            .arg(self.config())
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info,gatekeep_agent=debug")
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start gatekeep-agent (is it on PATH?)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_mins(2);
        while !ready.exists() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "gatekeep-agent exited with {status} before it was ready; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "gatekeep-agent not ready after 120 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        send_signal(self.pid(), signal);
    }

    /// SIGKILL: the agent dies without any cleanup.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Replaces the policy file and sends SIGHUP.
    pub fn replace_policy(&self, policy: &str) {
        let path = self.policy_dir().join("policy.toml");
        let tmp = self.policy_dir().join(".policy.toml.new");
        fs::write(&tmp, policy).expect("write policy");
        fs::rename(&tmp, &path).expect("replace policy");
        self.signal(nix::sys::signal::Signal::SIGHUP);
    }

    /// Waits until the agent logged `needle` (at least `count` times in all).
    pub fn wait_log(&self, needle: &str, count: usize, timeout: Duration) {
        wait_for(
            &format!("agent log line `{needle}` x{count}"),
            timeout,
            || (self.log().matches(needle).count() >= count).then_some(()),
        );
    }

    /// Runs `gatekeep-agent <args> --config <config>` and returns (exit
    /// success, stdout, stderr).
    #[must_use]
    pub fn admin(&self, args: &[&str]) -> (bool, String, String) {
        let output = Command::new("gatekeep-agent")
            .args(args)
            .arg("--config")
            .arg(self.config())
            .output()
            .expect("run gatekeep-agent");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Every audit record so far, from `gatekeep-agent audit export`.
    #[must_use]
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        let (ok, out, err) = self.admin(&["audit", "export", "--format", "jsonl"]);
        assert!(ok, "audit export failed: {err}");
        out.lines()
            .map(|line| serde_json::from_str(line).expect("export line is json"))
            .collect()
    }

    /// The audit records of `kind` so far.
    #[must_use]
    pub fn records_of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.audit_records()
            .into_iter()
            .filter(|r| r["kind"] == kind)
            .collect()
    }

    /// `gatekeep-agent status --output json`.
    #[must_use]
    pub fn status(&self) -> serde_json::Value {
        let (ok, out, err) = self.admin(&["status", "--output", "json"]);
        assert!(ok, "gatekeep-agent status failed: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status json ({e}): {out}"))
    }

    /// A kernel counter (e.g. `grant_allowed`, `repaused`) from the status.
    #[must_use]
    pub fn counter(&self, name: &str) -> u64 {
        let status = self.status();
        status["counters"]
            .as_array()
            .and_then(|c| c.iter().find(|pair| pair[0] == name))
            .and_then(|pair| pair[1].as_u64())
            .unwrap_or_else(|| panic!("no counter {name} in {status}"))
    }

    /// Waits until the audit log holds a record of `kind` matching `filter`.
    pub fn wait_record(
        &self,
        kind: &str,
        timeout: Duration,
        filter: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(&format!("an audit record `{kind}`"), timeout, || {
            self.audit_records()
                .into_iter()
                .find(|r| r["kind"] == kind && filter(r))
        })
    }

    /// Runs `exe` with `argv` (from argv[0]) in `cgroup`, expects the kernel to
    /// deny it (EPERM), and returns its `kernel_denied` record after checking
    /// that the record carries that argv.
    #[must_use = "the record, for further checks"]
    pub fn exec_denied_with_argv(
        &self,
        cgroup: &Cgroup,
        exe: &str,
        argv: &[&str],
    ) -> serde_json::Value {
        let mut command = vec!["exec", exe];
        command.extend_from_slice(argv);
        let outcome = workload::run_in(cgroup, &command, Duration::from_secs(30));
        assert_eq!(outcome, workload::Outcome::exec_denied());
        let record = self.wait_record("kernel_denied", Duration::from_secs(20), |r| {
            r["payload"]["target"]["executable"].as_str() == Some(exe)
        });
        assert_eq!(
            record["payload"]["target"]["argv"],
            serde_json::json!(argv),
            "the denial must carry the captured argv: {record}"
        );
        record
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let clean = self.stop();
        let (unloaded, out, err) = self.admin(&["unload"]);
        if std::thread::panicking() || !clean || !unloaded {
            eprintln!(
                "---- gatekeep-agent log ({} start(s), clean stop: {clean}) ----\n{}\n---- unload: {out}{err}",
                self.starts,
                self.log()
            );
        }
    }
}

/// Waits for `child` with a deadline; panics (after killing it) on timeout.
pub fn wait_child(child: &mut Child, timeout: Duration) -> std::process::Output {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("process {} did not finish within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait().expect("wait");
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = std::io::Read::read_to_end(&mut out, &mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = std::io::Read::read_to_end(&mut err, &mut stderr);
    }
    std::process::Output {
        status,
        stdout,
        stderr,
    }
}

/// Creates the test's cgroup `gk-<name>` and starts an agent (`<name>`)
/// whose only policy, `gk-<name>`, gates it with the `[policy.exec]` table
/// `exec` and the `[policy.approval]` table `approval` (the local decider:
/// timeouts only).
#[must_use]
pub fn gate_exec(name: &str, exec: &str, approval: &str) -> (Cgroup, Agent) {
    gate(name, |cgroup| policy::exec(cgroup, exec, approval))
}

/// Like [`gate_exec`], with a `[policy.connect]` table `connect` instead.
#[must_use]
pub fn gate_connect(name: &str, connect: &str, approval: &str) -> (Cgroup, Agent) {
    gate(name, |cgroup| policy::connect(cgroup, connect, approval))
}

/// Creates cgroup `gk-<name>`, then starts agent `<name>` with the policy
/// `policy` writes for it (given the cgroup's name).
fn gate(name: &str, policy: impl FnOnce(&str) -> String) -> (Cgroup, Agent) {
    let cgroup_name = format!("gk-{name}");
    let cgroup = Cgroup::create(&cgroup_name);
    let agent = Agent::start(name, &policy(&cgroup_name));
    (cgroup, agent)
}

/// The `[decision]` section of an agent running the embedded decision
/// service on 127.0.0.1:`port`.
#[must_use]
pub fn embedded_decision(port: u16) -> String {
    format!("[decision]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n")
}

/// Runs the `gatekeep` CLI (from `PATH`) with `env`; returns (success,
/// stdout, stderr).
#[must_use]
pub fn gatekeep(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> (bool, String, String) {
    let mut command = Command::new("gatekeep");
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run gatekeep (is it on PATH?)");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `program args` and returns its stdout; panics with its output if
/// it fails.
fn run_ok(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("failed to run {program} (is it on PATH?): {e}"));
    assert!(
        output.status.success(),
        "`{program} {}` failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A separate `gatekeep-server serve` process on 127.0.0.1, with certificates
/// minted by `gatekeep-server certs init` and one reviewer, `alice`; killed
/// when dropped (its log printed if the test panicked).
#[derive(Debug)]
pub struct Service {
    dir: tempfile::TempDir,
    port: u16,
    token: String,
    child: Option<Child>,
}

impl Service {
    /// Mints the CA, adds the reviewer and starts serving on `port`.
    #[must_use]
    pub fn start(port: u16) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("gk-service-")
            .tempdir()
            .expect("temp dir for the service");
        let tls = dir.path().join("tls");
        run_ok(
            "gatekeep-server",
            &["certs", "init", "--dir", &tls.to_string_lossy()],
        );
        let token = run_ok(
            "gatekeep-server",
            &[
                "reviewers",
                "add",
                "alice",
                "--db",
                &dir.path().join("data/state.db").to_string_lossy(),
            ],
        )
        .trim()
        .to_owned();
        let mut service = Self {
            dir,
            port,
            token,
            child: None,
        };
        service.launch();
        service
    }

    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    #[must_use]
    pub fn audit_db(&self) -> PathBuf {
        self.dir.path().join("data/audit.db")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("service.log")
    }

    /// Everything the service logged so far (every start).
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts (again) on the same data; returns once it accepts connections.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "the service is already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("service log");
        let child = Command::new("gatekeep-server")
            .args(["serve", "--listen"])
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--tls-dir")
            .arg(self.dir.path().join("tls"))
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start gatekeep-server (is it on PATH?)");
        self.child = Some(child);
        let port = self.port;
        wait_for(
            "the decision service to listen",
            Duration::from_mins(1),
            || {
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    panic!("gatekeep-server exited with {status}; log:\n{}", self.log());
                }
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(drop)
            },
        );
    }

    /// SIGKILL: the service dies without any cleanup.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// An agent certificate for `host` (`gatekeep-server certs agent`) and
    /// the agent's `[decision]` section to reach this service with it.
    #[must_use]
    pub fn decision_config(&self, host: &str) -> String {
        let tls = self.dir.path().join("tls");
        let out = self.dir.path().join(format!("agent-{host}"));
        fs::create_dir_all(&out).expect("agent cert dir");
        if !out.join(format!("agent-{host}.pem")).exists() {
            run_ok(
                "gatekeep-server",
                &[
                    "certs",
                    "agent",
                    "--dir",
                    &tls.to_string_lossy(),
                    "--name",
                    host,
                    "--out",
                    &out.to_string_lossy(),
                ],
            );
        }
        format!(
            "[decision]\nmode = \"remote\"\nserver = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            self.endpoint(),
            tls.join("ca.pem").display(),
            out.join(format!("agent-{host}.pem")).display(),
            out.join(format!("agent-{host}.key")).display(),
        )
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill_hard();
        if std::thread::panicking() {
            eprintln!("---- gatekeep-server log ----\n{}", self.log());
        }
    }
}
