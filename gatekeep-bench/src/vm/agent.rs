//! Items 2, 3 and the agent's half of 7, with the real `gatekeep-agent run` in the VM:
//!
//! - the ask path from the paused syscall to its completion, decided automatically by a
//!   server rule (agent -> separate `gatekeep-server` -> agent) and by the agent's local
//!   decider (the policy's timeout action after a 1 ms timeout);
//! - event throughput: kernel-denied connects per second the agent records before the
//!   ring buffer drops anything, and the dropped-event counter below that rate;
//! - no audit record lost across a SIGTERM under load (and a restart that drains the
//!   rest);
//! - the agent's RSS idle in each decision mode, and after the event run.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use gatekeep_agent::{kernel::KernelMaps, pinning::PinLayout};
use gatekeep_common::counter;

use super::{BenchCgroup, Sizes, TINY, finish_worker, spawn_worker, worker};
use crate::{
    native::rss_mib,
    report::{Figure, Summary, Target, micros, percentile},
    server::ServerProcess,
};

/// A `gatekeep-agent run` with its own folder, stopped and unloaded when dropped.
struct Agent {
    dir: tempfile::TempDir,
    pin_dir: PathBuf,
    child: Option<Child>,
}

impl Agent {
    fn start(name: &str, policy: &str, decision: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("gk-bench-agent-{name}-"))
            .tempdir()?;
        let policies = dir.path().join("policies");
        fs::create_dir(&policies)?;
        fs::write(policies.join("policy.toml"), policy)?;
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/gk-bench-{name}"));
        let config = format!(
            "policy_dir = \"{}\"\naudit_db = \"{}\"\npin_dir = \"{}\"\nhost = \"vm\"\n\
             state_dir = \"{}\"\n{decision}",
            policies.display(),
            dir.path().join("audit.db").display(),
            pin_dir.display(),
            dir.path().join("state").display(),
        );
        fs::write(dir.path().join("agent.toml"), config)?;
        let mut agent = Self {
            dir,
            pin_dir,
            child: None,
        };
        agent.launch()?;
        Ok(agent)
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn launch(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "the agent is already running");
        let ready = self.dir.path().join("ready");
        drop(fs::remove_file(&ready));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))?;
        let child = Command::new("gatekeep-agent")
            .arg("run")
            .arg("--config")
            .arg(self.config())
            .arg("--ready-file")
            .arg(&ready)
            // The default level: per-request lines are part of the cost.
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("failed to start gatekeep-agent (is it on PATH?)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_mins(2);
        while !ready.exists() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!("gatekeep-agent exited with {status}; log:\n{}", self.log());
            }
            ensure!(
                Instant::now() < deadline,
                "gatekeep-agent not ready after 120 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn pid(&self) -> Result<u32> {
        Ok(self
            .child
            .as_ref()
            .context("the agent is not running")?
            .id())
    }

    /// SIGTERM; waits for the exit and fails unless it was clean.
    fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(i32::try_from(child.id())?, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            if let Some(status) = child.try_wait()? {
                ensure!(
                    status.success(),
                    "the agent exited with {status}; log:\n{}",
                    self.log()
                );
                return Ok(());
            }
            if Instant::now() >= deadline {
                drop(child.kill());
                drop(child.wait());
                bail!("the agent did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn counters(&self) -> Result<Vec<u64>> {
        Ok(KernelMaps::open(&PinLayout::new(&self.pin_dir))?.counters()?)
    }

    /// Audit records of `kind` durable so far.
    fn records(&self, kind: &str) -> Result<u64> {
        let conn = rusqlite::Connection::open_with_flags(
            self.dir.path().join("audit.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let count: i64 = conn.query_row(
            "SELECT count(*) FROM audit_records WHERE kind = ?1",
            [kind],
            |row| row.get(0),
        )?;
        Ok(u64::try_from(count)?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!("warning: {error:#}");
        }
        let unloaded = Command::new("gatekeep-agent")
            .arg("unload")
            .arg("--config")
            .arg(self.config())
            .stdout(Stdio::null())
            .status();
        if !unloaded.is_ok_and(|s| s.success()) {
            eprintln!(
                "warning: `gatekeep-agent unload` failed; log:\n{}",
                self.log()
            );
        }
    }
}

/// A separate `gatekeep-server` with a rule that allows every request of policy
/// `bench-ask`; killed when dropped.
struct RuleService {
    // Declared first: the service stops before its folder goes.
    _process: ServerProcess,
    dir: tempfile::TempDir,
    endpoint: String,
}

impl RuleService {
    fn start() -> Result<Self> {
        let listen = SocketAddr::from(([127, 0, 0, 1], 7580));
        let dir = tempfile::Builder::new()
            .prefix("gk-bench-service-")
            .tempdir()?;
        let tls = dir.path().join("tls");
        run_quiet(
            Command::new("gatekeep-server")
                .args(["certs", "init", "--dir"])
                .arg(&tls),
        )?;
        run_quiet(
            Command::new("gatekeep-server")
                .args(["certs", "agent", "--name", "vm", "--dir"])
                .arg(&tls),
        )?;
        let process = ServerProcess::start(
            Path::new("gatekeep-server"),
            dir.path(),
            "[[rules]]\nname = \"bench-allow\"\naction = \"allow\"\npolicy = \"bench-ask\"\n",
            listen,
            "info",
        )?;
        Ok(Self {
            _process: process,
            dir,
            endpoint: format!("https://{listen}"),
        })
    }

    fn decision_config(&self) -> String {
        let tls = self.dir.path().join("tls");
        format!(
            "[decision]\nmode = \"remote\"\nserver = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            self.endpoint,
            tls.join("ca.pem").display(),
            tls.join("agent-vm.pem").display(),
            tls.join("agent-vm.key").display(),
        )
    }
}

fn run_quiet(cmd: &mut Command) -> Result<()> {
    let output = cmd.stdin(Stdio::null()).output()?;
    ensure!(
        output.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

fn policy(ask_cgroup: &Path, deny_cgroup: &Path, timeout: &str) -> String {
    format!(
        "[[policy]]\nname = \"bench-ask\"\ncgroups = [\"{}\"]\n\
         [policy.exec]\ndefault = \"ask\"\n[policy.connect]\ndefault = \"ask\"\n\
         [policy.approval]\ntimeout = \"{timeout}\"\non_timeout = \"allow\"\n\n\
         [[policy]]\nname = \"bench-deny\"\ncgroups = [\"{}\"]\n\
         [policy.exec]\ndefault = \"allow\"\n[policy.connect]\ndefault = \"allow\"\ndeny = [\"127.0.0.2/32\"]\n",
        ask_cgroup.display(),
        deny_cgroup.display()
    )
}

/// Where denied connects go (the policy denies 127.0.0.2).
const DENIED: &str = "127.0.0.2:9";

/// p50 and p99 figures of ask-path samples, next to the baseline op time.
fn ask_figures(
    id: &str,
    what: &str,
    samples: &[u64],
    chunks: usize,
    baseline: Option<f64>,
    conditions: &str,
) -> Vec<Figure> {
    let durations: Vec<Duration> = samples.iter().map(|n| Duration::from_nanos(*n)).collect();
    let mut out = Vec::new();
    for (label, p) in [("p50", 0.50), ("p99", 0.99)] {
        let mut all = durations.clone();
        all.sort_unstable();
        let value = micros(percentile(&all, p));
        // Spread: the same percentile over consecutive chunks of the run.
        let per_chunk: Vec<f64> = durations
            .chunks(durations.len().div_ceil(chunks.max(1)).max(1))
            .map(|chunk| {
                let mut chunk = chunk.to_vec();
                chunk.sort_unstable();
                micros(percentile(&chunk, p))
            })
            .collect();
        let spread = Summary::of(&per_chunk);
        let mut figure = Figure::from_runs(
            &format!("{id}.{label}"),
            &format!("{what}: {label}"),
            "us",
            &[value],
        )
        .conditions(format!(
            "{conditions}; {} samples, spread = {label} of {} consecutive chunks",
            samples.len(),
            per_chunk.len()
        ));
        figure.min = spread.min;
        figure.max = spread.max;
        figure.runs = per_chunk.len();
        if let Some(baseline) = baseline {
            figure = figure.baseline("no gatekeep (same op, same VM run)", baseline);
        }
        out.push(figure);
    }
    out
}

/// Runs the ask path (exec and connect) in `cgroup`; returns the per-op samples (ns).
fn ask_path(cgroup: &Path, sizes: Sizes, addr: SocketAddr) -> Result<(Vec<u64>, Vec<u64>)> {
    let exec = worker(
        cgroup,
        3,
        true,
        &["exec".into(), sizes.asks.to_string(), TINY.into()],
    )?;
    let connect = worker(
        cgroup,
        3,
        true,
        &["connect".into(), sizes.asks.to_string(), addr.to_string()],
    )?;
    Ok((exec.samples_ns, connect.samples_ns))
}

/// Waits until the agent recorded `expected` kernel denials, or until the count stops
/// moving for 30 s (records that never come are what the figures report); returns the
/// count reached.
fn wait_recorded(agent: &Agent, expected: u64) -> Result<u64> {
    let stall = Duration::from_secs(30);
    let mut last = (agent.records("kernel_denied")?, Instant::now());
    loop {
        let recorded = agent.records("kernel_denied")?;
        if recorded >= expected {
            return Ok(recorded);
        }
        if recorded != last.0 {
            last = (recorded, Instant::now());
        } else if last.1.elapsed() >= stall {
            eprintln!(
                "[bench] only {recorded} of {expected} denials recorded; none more in {stall:?}"
            );
            return Ok(recorded);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One step of the rate ramp.
#[derive(Debug, Clone, Copy)]
struct Step {
    target: u32,
    achieved: f64,
    dropped: u64,
    /// Denials recorded per second, from the step's start until the agent caught up.
    recorded_rate: f64,
}

/// Raises the rate of denied connects until the ring buffer drops events or the generator
/// cannot go faster.
fn ramp(agent: &Agent, cgroup: &Path, sizes: Sizes) -> Result<Vec<Step>> {
    let rates: &[u32] = if sizes.rounds == 1 {
        &[500, 2_000]
    } else {
        &[500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000]
    };
    let mut steps = Vec::new();
    for &rate in rates {
        let before = agent.counters()?;
        let recorded_before = agent.records("kernel_denied")?;
        let started = Instant::now();
        let report = worker(
            cgroup,
            0,
            false,
            &[
                "denied".into(),
                rate.to_string(),
                sizes.step.as_secs_f64().to_string(),
                DENIED.into(),
            ],
        )?;
        let after = agent.counters()?;
        let moved = |i: u32| after[i as usize] - before[i as usize];
        let (emitted, dropped) = (
            moved(counter::CONNECT_DENIED),
            moved(counter::EVENTS_DROPPED),
        );
        let recorded = wait_recorded(agent, recorded_before + emitted - dropped)? - recorded_before;
        #[expect(clippy::cast_precision_loss, reason = "a rate")]
        let recorded_rate = recorded as f64 / started.elapsed().as_secs_f64();
        let step = Step {
            target: rate,
            achieved: report.rate(),
            dropped,
            recorded_rate,
        };
        eprintln!("[bench] event rate step: {step:?}");
        steps.push(step);
        if dropped > 0 || report.rate() < 0.9 * f64::from(rate) {
            break;
        }
    }
    Ok(steps)
}

fn event_figures(steps: &[Step], sizes: Sizes) -> Vec<Figure> {
    let clean: Vec<&Step> = steps.iter().filter(|s| s.dropped == 0).collect();
    let best = clean.iter().map(|s| s.achieved).fold(0.0_f64, f64::max);
    let first_drop = steps.iter().find(|s| s.dropped > 0);
    let limit = match first_drop {
        Some(step) => format!(
            "ring buffer dropped {} events at {:.0}/s",
            step.dropped, step.achieved
        ),
        None => "no drop at the highest rate one generator reached (a lower bound)".into(),
    };
    let ramp: Vec<String> = steps
        .iter()
        .map(|s| format!("{:.0}/s->{} dropped", s.achieved, s.dropped))
        .collect();
    #[expect(clippy::cast_precision_loss, reason = "a small count")]
    let clean_dropped = clean.iter().map(|s| s.dropped).sum::<u64>() as f64;
    let drain = steps
        .iter()
        .map(|s| s.recorded_rate)
        .fold(0.0_f64, f64::max);
    vec![
        Figure::from_runs(
            "vm.events.sustained_per_s",
            "event throughput: denied connects/s recorded with 0 drops",
            "events/s",
            &[best],
        )
        .conditions(format!(
            "{:.0} s steps: {}; {limit}; each event enriched and audited; 4 MiB ring",
            sizes.step.as_secs_f64(),
            ramp.join(", ")
        )),
        Figure::from_runs(
            "vm.events.dropped_below",
            "EVENTS_DROPPED at and below that rate",
            "events",
            &[clean_dropped],
        )
        .target(Target::at_most(0.0))
        .conditions("the kernel's dropped-event counter, summed over the steps without drops"),
        Figure::from_runs(
            "vm.events.recorded_per_s",
            "agent drain rate: denials recorded per second (peak step)",
            "records/s",
            &[drain],
        )
        .conditions(
            "from a step's start until its last denial was durable in the agent's audit log",
        ),
    ]
}

/// Floods denials, SIGTERMs the agent in the middle, restarts it (it drains what the ring
/// kept meanwhile), and counts: every denial the kernel emitted and did not drop must be
/// in the audit log exactly once.
fn lost_on_sigterm(agent: &mut Agent, cgroup: &Path, rate: u32) -> Result<Figure> {
    let flood = spawn_worker(
        cgroup,
        0,
        false,
        &["denied".into(), rate.to_string(), "3".into(), DENIED.into()],
    )?;
    std::thread::sleep(Duration::from_millis(1_500));
    agent.stop()?;
    let flooded = finish_worker(flood)?;
    agent.launch()?;
    let counters = agent.counters()?;
    let expected =
        counters[counter::CONNECT_DENIED as usize] - counters[counter::EVENTS_DROPPED as usize];
    wait_recorded(agent, expected)?;
    // Anything recorded twice would show up now.
    std::thread::sleep(Duration::from_millis(500));
    let recorded = agent.records("kernel_denied")?;
    #[expect(clippy::cast_precision_loss, reason = "a count")]
    let lost = expected.abs_diff(recorded) as f64;
    Ok(Figure::from_runs(
        "vm.audit.lost_on_sigterm",
        "audit records lost or doubled across SIGTERM under load",
        "records",
        &[lost],
    )
    .target(Target::at_most(0.0))
    .conditions(format!(
        "{} denials at {rate}/s, SIGTERM mid-flood, restart drains the ring; \
         {expected} emitted (not dropped) vs {recorded} kernel_denied records",
        flooded.count
    )))
}

/// How long the agent idles before its RSS is read: long enough for every periodic task
/// (rescans, reconciles, keepalives at 20 s) to have run at least once. Read at 2 s, the
/// figure once missed 3.2 MiB that a buffer taken at about 16 s kept resident.
const IDLE_FOR: Duration = Duration::from_secs(25);

/// The agent's idle RSS, [`IDLE_FOR`] after it said it is ready (the highest of readings
/// taken every second).
fn idle_rss(agent: &Agent, mode: &str, conditions: &str) -> Result<()> {
    let mut highest = 0.0_f64;
    let started = Instant::now();
    while started.elapsed() < IDLE_FOR {
        std::thread::sleep(Duration::from_secs(1));
        highest = highest.max(rss_mib(agent.pid()?)?);
    }
    Figure::from_runs(
        &format!("vm.agent.rss.idle.{mode}"),
        &format!("agent RSS idle, {mode} decisions"),
        "MiB",
        &[highest],
    )
    .target(Target::at_most(32.0))
    .conditions(format!(
        "gatekeep-agent run, {conditions}, 2 policies; the highest of readings every second \
         for {} s after ready",
        IDLE_FOR.as_secs()
    ))
    .emit();
    Ok(())
}

/// The ask path's figures for exec and connect.
fn emit_ask(
    decider: &str,
    what: &str,
    samples: (&[u64], &[u64]),
    sizes: Sizes,
    baselines: Option<(f64, f64)>,
    conditions: &str,
) {
    let (exec_base, connect_base) = baselines.map_or((None, None), |(e, c)| (Some(e), Some(c)));
    let exec = ask_figures(
        &format!("vm.ask.{decider}.exec"),
        &format!("ask path, exec, {what}"),
        samples.0,
        sizes.rounds,
        exec_base,
        conditions,
    );
    let connect = ask_figures(
        &format!("vm.ask.{decider}.connect"),
        &format!("ask path, connect, {what}"),
        samples.1,
        sizes.rounds,
        connect_base,
        conditions,
    );
    for figure in exec.into_iter().chain(connect) {
        figure.emit();
    }
}

/// Runs the agent benchmarks, printing each figure as soon as it is measured; `baselines`
/// are the overhead run's (exec, connect) µs.
pub fn run(sizes: Sizes, addr: SocketAddr, baselines: Option<(f64, f64)>) -> Result<()> {
    let ask = BenchCgroup::create("gk-bench-ask")?;
    let deny = BenchCgroup::create("gk-bench-deny")?;

    // The default mode: the decision service embedded in the agent.
    {
        let agent = Agent::start("embedded", &policy(ask.path(), deny.path(), "5m"), "")?;
        idle_rss(
            &agent,
            "embedded",
            "default mode: the decision service in-process",
        )?;
    }

    // A server rule decides, through a separate service.
    {
        let service = RuleService::start()?;
        let policy = policy(ask.path(), deny.path(), "5m");
        let agent = Agent::start("remote", &policy, &service.decision_config())?;
        idle_rss(&agent, "remote", "connected to a separate gatekeep-server")?;
        let (exec, connect) = ask_path(ask.path(), sizes, addr)?;
        emit_ask(
            "rule",
            "server rule decides",
            (&exec, &connect),
            sizes,
            baselines,
            "paused syscall -> agent -> gatekeep-server (mTLS loopback, rule `bench-allow`) \
             -> verdict + SIGCONT -> syscall completes; per op incl. fork+exec or connect",
        );
    }

    // The local decider: the policy's timeout action after 1 ms; and the event run.
    let policy = policy(ask.path(), deny.path(), "1ms");
    let mut agent = Agent::start("local", &policy, "[decision]\nmode = \"local\"\n")?;
    idle_rss(&agent, "local", "[decision] mode = local")?;
    let (exec, connect) = ask_path(ask.path(), sizes, addr)?;
    emit_ask(
        "local",
        "local decider",
        (&exec, &connect),
        sizes,
        baselines,
        "paused syscall -> agent local decider (policy timeout 1 ms, on_timeout allow) \
         -> verdict + SIGCONT -> syscall completes; includes the 1 ms timeout",
    );
    let steps = ramp(&agent, deny.path(), sizes)?;
    for figure in event_figures(&steps, sizes) {
        figure.emit();
    }
    Figure::from_runs(
        "vm.agent.rss.after_events",
        "agent RSS after the event run",
        "MiB",
        &[rss_mib(agent.pid()?)?],
    )
    .conditions("local decider, after every step of the event-rate ramp was recorded")
    .emit();
    let best = steps
        .iter()
        .filter(|s| s.dropped == 0)
        .map(|s| s.target)
        .max()
        .unwrap_or(500);
    lost_on_sigterm(&mut agent, deny.path(), (best / 2).max(250))?.emit();
    Ok(())
}
