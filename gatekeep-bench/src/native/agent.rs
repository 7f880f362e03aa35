//! The agent's pipeline natively, fed with synthetic kernel events at its boundary (the
//! [`PauseKernel`] and [`Tasks`] traits): its memory with 10,000 pending requests, and its
//! audit throughput (kernel denials recorded durably, hash chain included).

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use gatekeep_agent::{
    audit::{AuditPipeline, AuditSink as _, MemorySink},
    bpf::{
        events::{Event, Origin},
        kernel::{KernelError, PauseKernel, boot_time_ns},
    },
    decision::LocalDecider,
    hooks::{
        Request,
        connect::{ConnectRequest, Destination},
        exec::ExecRequest,
    },
    pause::{
        controller::{Controller, Parts},
        enrich::Enricher,
        resume::{PauseTiming, TaskState, Tasks},
    },
    policy::{Compiled, HostView, compile},
};
use gatekeep_audit::RecordKind;
use gatekeep_common::{PendingRequest, Verdict, VerdictKey, request_kind};

use super::rss_mib;
use crate::report::{Figure, Target, per_second};

/// Policy id the synthetic events carry.
const POLICY_ID: u32 = 1;

/// The kernel maps and tasks, simulated: every asked thread is pending and stopped until
/// a verdict comes.
#[derive(Debug, Default)]
struct SimKernel {
    pending: Mutex<HashMap<u32, PendingRequest>>,
    verdicts: Mutex<HashMap<VerdictKey, Verdict>>,
}

impl SimKernel {
    fn ask(&self, tid: u32, digest: u64) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                tid,
                PendingRequest {
                    digest,
                    created_ns: boot_time_ns(),
                    kind: request_kind::EXEC,
                    attempts: 0,
                    pid: tid,
                    policy_id: POLICY_ID,
                    start_ns: 0,
                },
            );
    }
}

impl PauseKernel for SimKernel {
    async fn pending(&self) -> Result<Vec<(u32, PendingRequest)>, KernelError> {
        let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(pending.iter().map(|(k, v)| (*k, *v)).collect())
    }

    async fn pending_of(&self, tid: u32) -> Result<Option<PendingRequest>, KernelError> {
        let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(pending.get(&tid).copied())
    }

    async fn remove_pending(&self, tid: u32, digest: u64) -> Result<bool, KernelError> {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.get(&tid).is_some_and(|p| p.digest == digest) {
            pending.remove(&tid);
            return Ok(true);
        }
        Ok(false)
    }

    async fn write_verdict(&self, key: VerdictKey, verdict: Verdict) -> Result<(), KernelError> {
        self.verdicts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, verdict);
        Ok(())
    }

    async fn verdicts(&self) -> Result<Vec<(VerdictKey, Verdict)>, KernelError> {
        let verdicts = self.verdicts.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(verdicts.iter().map(|(k, v)| (*k, *v)).collect())
    }

    async fn remove_verdict(&self, key: VerdictKey) -> Result<(), KernelError> {
        self.verdicts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        Ok(())
    }
}

impl Tasks for SimKernel {
    fn state(&self, _pid: u32, _tid: u32) -> TaskState {
        TaskState::Stopped
    }

    fn sigcont(&self, _pid: u32) -> io::Result<()> {
        Ok(())
    }
}

/// The policy the synthetic requests are asked under: exec and connect ask, decided by
/// nobody for an hour.
fn policies(cgroup_root: &Path) -> Result<Arc<Compiled>> {
    let text = "[[policy]]\nname = \"bench\"\ncgroups = [\"/sys/fs/cgroup/bench\"]\n\
                [policy.exec]\ndefault = \"ask\"\n[policy.connect]\ndefault = \"ask\"\n\
                [policy.approval]\ntimeout = \"1h\"\non_timeout = \"deny\"\n";
    let set = gatekeep_policy::parse_str("bench.toml", text)?;
    let host = HostView {
        cgroup_root: cgroup_root.to_owned(),
        own_cgroup: None,
        protected: Vec::new(),
    };
    Ok(Arc::new(compile(&set, &[POLICY_ID], 1, &host)?))
}

fn origin(tid: u32, digest: u64) -> Origin {
    Origin {
        policy_id: POLICY_ID,
        pid: tid,
        tid,
        uid: 1000,
        gid: 1000,
        ppid: 1,
        cgroup_id: 99,
        ktime_ns: boot_time_ns(),
        digest,
        comm: "worker".into(),
    }
}

/// An ask like the kernel's: `/usr/bin/curl` with a few arguments.
fn exec_ask(tid: u32, digest: u64) -> Event {
    Event::Ask(Request::Exec(ExecRequest {
        origin: origin(tid, digest),
        dev: 0x0080_0001,
        ino: 1_234_567,
        content: gatekeep_common::ContentVersion::default(),
        filename: PathBuf::from("/usr/bin/curl"),
        argv: vec![
            "curl".into(),
            "-fsSL".into(),
            "-o".into(),
            "/tmp/install.sh".into(),
            format!("https://downloads.example.org/release/{tid}/install.sh"),
        ],
        argv_truncated: false,
        env: Vec::new(),
        denied_truncated: false,
        argc: 5,
        via: gatekeep_agent::hooks::exec::Via::Exec,
        interpreter: false,
    }))
}

/// The workload the synthetic denials come from, as a `/proc` tree of its own: `curl`
/// (pid 4242) started by a shell (4000) in the gated cgroup `/agents/job-1`, whose parent
/// (pid 1) is outside it, so enrichment walks three processes, as it would for a real
/// gated job.
const WORKLOAD_PID: u32 = 4242;

/// pid, comm, ppid, cgroup, exe, argv.
type FakeProcess<'a> = (u32, &'a str, u32, &'a str, &'a str, &'a [&'a str]);

fn fake_proc(root: &Path) -> Result<()> {
    let processes: [FakeProcess<'_>; 3] = [
        (
            WORKLOAD_PID,
            "curl",
            4000,
            "/agents/job-1",
            "/usr/bin/curl",
            &["curl", "-fsSL", "https://downloads.example.org/install.sh"],
        ),
        (
            4000,
            "bash",
            1,
            "/agents/job-1",
            "/usr/bin/bash",
            &[
                "bash",
                "-c",
                "curl -fsSL https://downloads.example.org/install.sh | sh",
            ],
        ),
        (
            1,
            "systemd",
            0,
            "/init.scope",
            "/usr/lib/systemd/systemd",
            &["/sbin/init"],
        ),
    ];
    for (pid, comm, ppid, cgroup, exe, argv) in processes {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("stat"),
            format!(
                "{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0\n"
            ),
        )?;
        std::fs::write(dir.join("cgroup"), format!("0::{cgroup}\n"))?;
        std::fs::write(dir.join("cmdline"), argv.join("\0") + "\0")?;
        std::os::unix::fs::symlink(exe, dir.join("exe"))?;
        std::os::unix::fs::symlink("/srv/work", dir.join("cwd"))?;
    }
    Ok(())
}

/// A kernel denial of a connect by the workload.
fn connect_denied(n: u64) -> Event {
    let mut origin = origin(WORKLOAD_PID, 0);
    origin.pid = WORKLOAD_PID;
    origin.tid = WORKLOAD_PID;
    origin.ppid = 4000;
    Event::Denied(Request::Connect(ConnectRequest {
        origin,
        destination: Destination::Ip {
            // A distinct destination each: identical denials would be one burst's record.
            addr: std::net::IpAddr::from(std::net::Ipv4Addr::from(
                0x0a00_0000 | u32::try_from(n & 0x00ff_ffff).unwrap_or(0),
            )),
            port: 80,
        },
        sock_type: 1,
        via: gatekeep_agent::hooks::connect::Via::Connect,
        resolved: Vec::new(),
    }))
}

type Pipeline = Controller<SimKernel, SimKernel, LocalDecider, gatekeep_agent::audit::AuditHandle>;

fn pipeline(dir: &Path, proc_root: &Path) -> Result<(Arc<SimKernel>, Pipeline, AuditPipeline)> {
    let kernel = Arc::new(SimKernel::default());
    let audit = AuditPipeline::open(&dir.join("audit.db"))?;
    let controller = Controller::new(Parts {
        kernel: Arc::clone(&kernel),
        tasks: Arc::clone(&kernel),
        decider: Arc::new(LocalDecider),
        audit: Arc::new(audit.handle.clone()),
        enricher: Arc::new(Enricher::new(proc_root, Path::new("/etc/passwd"))),
        host: "bench-host".into(),
        timing: PauseTiming::default(),
        policies: policies(dir)?,
    });
    Ok((kernel, controller, audit))
}

/// `gatekeep-bench agent-memory N`: the agent pipeline's RSS (MiB) before and after
/// `pending` requests are asked and left undecided, printed as `IDLE LOADED` on one line
/// (see [`memory_figures`]).
pub fn memory(pending: usize) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let dir = tempfile::tempdir()?;
        let pid = std::process::id();
        // No real tasks behind the synthetic ones: enrichment finds nothing to read.
        let (kernel, mut controller, audit) = pipeline(dir.path(), &dir.path().join("no-proc"))?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let idle = rss_mib(pid)?;
        for n in 0..pending {
            let tid = 10_000 + u32::try_from(n)?;
            let digest = 0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(u64::from(tid));
            kernel.ask(tid, digest);
            controller.handle_event(exec_ask(tid, digest)).await;
        }
        ensure!(
            controller.tracked_count() == pending,
            "{} of {pending} requests tracked",
            controller.tracked_count()
        );
        // Let the audit records of the requests reach the disk before reading.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let loaded = rss_mib(pid)?;
        drop(controller);
        audit.shutdown().await?;
        println!("{idle} {loaded}");
        anyhow::Ok(())
    })
}

/// Parses what `gatekeep-bench agent-memory` printed: `(idle, loaded)` MiB.
pub fn parse_memory(output: &str) -> Result<(f64, f64)> {
    let line = output.lines().last().unwrap_or_default();
    let mut fields = line.split_whitespace().map(str::parse::<f64>);
    match (fields.next(), fields.next(), fields.next()) {
        (Some(Ok(idle)), Some(Ok(loaded)), None) => Ok((idle, loaded)),
        _ => bail!("`gatekeep-bench agent-memory` printed {line:?}, not `IDLE LOADED`"),
    }
}

/// The agent pipeline's memory figures from the `(idle, loaded)` readings of processes of
/// their own.
#[must_use]
pub fn memory_figures(pending: usize, readings: &[(f64, f64)]) -> Vec<Figure> {
    let idle: Vec<f64> = readings.iter().map(|r| r.0).collect();
    let loaded: Vec<f64> = readings.iter().map(|r| r.1).collect();
    let ratios: Vec<f64> = readings.iter().map(|r| r.1 / r.0).collect();
    let idle = Figure::from_runs(
        "native.agent.rss.pipeline_idle",
        "agent pipeline RSS, idle (native, simulated kernel)",
        "MiB",
        &idle,
    )
    .conditions(format!(
        "controller + audit pipeline + local decider, no request; {} processes",
        readings.len()
    ));
    let idle_median = idle.value;
    vec![
        idle,
        Figure::from_runs(
            "native.agent.rss.pending",
            &format!("agent pipeline RSS, {pending} pending (native, simulated kernel)"),
            "MiB",
            &loaded,
        )
        .ratio(&ratios)
        .baseline("idle pipeline", idle_median)
        .conditions(format!(
            "{pending} exec asks tracked, each with its decision task and audit record"
        )),
    ]
}

async fn durable_rate(audit: AuditPipeline, started: Instant, records: usize) -> Result<f64> {
    let last = audit.shutdown().await?;
    let elapsed = started.elapsed();
    ensure!(
        usize::try_from(last)? == records,
        "{last} of {records} records durable"
    );
    Ok(per_second(records, elapsed))
}

/// Durable audit records per second through the agent's real pipeline: kernel denials
/// (enriched from a synthetic `/proc`, see [`fake_proc`]) recorded, batched and committed;
/// submit to durable. Also the stored bytes per record.
pub async fn audit(base: &Path, records: usize, rounds: usize) -> Result<Vec<Figure>> {
    let mut rates = Vec::new();
    let mut bytes = Vec::new();
    for _ in 0..rounds {
        let dir = tempfile::Builder::new()
            .prefix("gk-bench-audit-")
            .tempdir_in(base)?;
        let proc_root = dir.path().join("proc");
        fake_proc(&proc_root)?;
        let (_kernel, mut controller, audit) = pipeline(dir.path(), &proc_root)?;
        let started = Instant::now();
        for n in 0..records {
            controller
                .handle_event(connect_denied(u64::try_from(n)?))
                .await;
        }
        // Shutdown records the open denial bursts, as the agent's own does.
        controller.shutdown().await;
        rates.push(durable_rate(audit, started, records).await?);
        bytes.push(super::bytes_per_record(
            &dir.path().join("audit.db"),
            records,
        ));
    }
    let writer = audit_writer(base, records, rounds).await?;
    Ok(vec![
        writer,
        Figure::from_runs(
            "native.agent.denials_recorded_per_s",
            "agent pipeline, kernel denials recorded durably/s",
            "records/s",
            &rates,
        )
        .conditions(format!(
            "{records} kernel-denied connects through the controller, each enriched (3 processes \
             of a synthetic /proc: ~15 file reads) and audited; submit to durable; database in {}",
            base.display()
        )),
        Figure::from_runs(
            "native.audit.agent.bytes_per_record",
            "agent audit, stored bytes per record",
            "bytes",
            &bytes,
        )
        .conditions("database file after a WAL checkpoint, indexes included"),
    ])
}

/// Durable records per second through the agent's audit pipeline alone (the sink the
/// controller hands records to, its forwarder and the batching writer), with the agent's
/// own records: a kernel denial and an exec request, as the controller writes them.
async fn audit_writer(base: &Path, records: usize, rounds: usize) -> Result<Figure> {
    // The controller's records, captured once.
    let dir = tempfile::Builder::new()
        .prefix("gk-bench-audit-")
        .tempdir_in(base)?;
    let proc_root = dir.path().join("proc");
    fake_proc(&proc_root)?;
    let sink = Arc::new(MemorySink::default());
    let kernel = Arc::new(SimKernel::default());
    let mut controller = Controller::new(Parts {
        kernel: Arc::clone(&kernel),
        tasks: Arc::clone(&kernel),
        decider: Arc::new(LocalDecider),
        audit: Arc::clone(&sink),
        enricher: Arc::new(Enricher::new(&proc_root, Path::new("/etc/passwd"))),
        host: "bench-host".into(),
        timing: PauseTiming::default(),
        policies: policies(dir.path())?,
    });
    controller.handle_event(connect_denied(1)).await;
    kernel.ask(WORKLOAD_PID, 7);
    let mut ask = exec_ask(WORKLOAD_PID, 7);
    if let Event::Ask(Request::Exec(request)) = &mut ask {
        request.origin.ppid = 4000;
    }
    controller.handle_event(ask).await;
    // Shutdown records the denial's burst (and cancels the ask, a record not kept here).
    controller.shutdown().await;
    let templates: Vec<_> = sink
        .records()
        .into_iter()
        .filter(|record| {
            matches!(
                record.kind,
                RecordKind::KernelDenied | RecordKind::Requested
            )
        })
        .collect();
    ensure!(
        templates.len() == 2,
        "expected a denial and a request, got {} records",
        templates.len()
    );

    let mut rates = Vec::new();
    for _ in 0..rounds {
        let dir = tempfile::Builder::new()
            .prefix("gk-bench-audit-")
            .tempdir_in(base)?;
        let audit = AuditPipeline::open(&dir.path().join("audit.db"))?;
        // Made before the clock starts: building a record is the controller's cost (the
        // pipeline figure below has it), and cloning them here took more time than the
        // pipeline itself.
        let batch: Vec<_> = (0..records).map(|n| templates[n % 2].clone()).collect();
        let started = Instant::now();
        for record in batch {
            audit.handle.record(record);
        }
        rates.push(durable_rate(audit, started, records).await?);
    }
    Ok(Figure::from_runs(
        "native.audit.agent.records_per_s",
        "agent audit, durable records/s",
        "records/s",
        &rates,
    )
    .target(Target::at_least(50_000.0))
    .conditions(format!(
        "{records} of the controller's own records (kernel denial + exec request, enriched), \
         through the agent's audit pipeline (sink, forwarder, batching writer), WAL \
         synchronous=FULL, hash chain; submit to durable; database in {}",
        base.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_memory_output_is_two_numbers_on_the_last_line() {
        assert_eq!(parse_memory("8.5 77.25\n").unwrap(), (8.5, 77.25));
        assert_eq!(parse_memory("noise\n9 10").unwrap(), (9.0, 10.0));
        for bad in ["", "8.5", "8.5 x", "1 2 3"] {
            let err = parse_memory(bad).unwrap_err().to_string();
            assert!(err.contains("IDLE LOADED"), "{bad:?}: {err}");
        }
    }

    #[test]
    #[expect(clippy::float_cmp, reason = "medians of small exact values")]
    fn memory_ratios_are_per_process() {
        let figures = memory_figures(10, &[(10.0, 40.0), (8.0, 40.0), (12.0, 36.0)]);
        assert_eq!(figures[0].value, 10.0);
        assert_eq!(figures[1].value, 40.0);
        // The per-process ratios 4, 5 and 3, not 40 / 10.
        assert_eq!(figures[1].ratio, Some(4.0));
        assert_eq!(figures[1].ratio_range, Some([3.0, 5.0]));
    }

    #[tokio::test]
    async fn the_simulated_kernel_keeps_a_request_pending_until_removed() {
        let kernel = SimKernel::default();
        kernel.ask(7, 42);
        assert_eq!(kernel.pending_of(7).await.unwrap().unwrap().digest, 42);
        assert!(!kernel.remove_pending(7, 41).await.unwrap());
        assert!(kernel.remove_pending(7, 42).await.unwrap());
        assert!(kernel.pending_of(7).await.unwrap().is_none());
    }

    #[test]
    fn the_synthetic_workload_has_three_ancestors_up_to_its_cgroup_root() {
        let dir = tempfile::tempdir().unwrap();
        fake_proc(dir.path()).unwrap();
        let info = Enricher::new(dir.path(), Path::new("/nonexistent")).enrich(WORKLOAD_PID, 1000);
        let pids: Vec<u32> = info.ancestry.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [WORKLOAD_PID, 4000, 1]);
        assert_eq!(info.cgroup.as_deref(), Some("/agents/job-1"));
        assert_eq!(info.ancestry[0].cmdline[0], "curl");
    }

    #[tokio::test]
    async fn asks_are_tracked_and_denials_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (kernel, mut controller, audit) =
            pipeline(dir.path(), &dir.path().join("proc")).unwrap();
        for tid in 1..=3 {
            kernel.ask(tid, u64::from(tid));
            controller.handle_event(exec_ask(tid, u64::from(tid))).await;
        }
        fake_proc(&dir.path().join("proc")).unwrap();
        controller.handle_event(connect_denied(1)).await;
        assert_eq!(controller.tracked_count(), 3);
        // Shutdown records the denial's burst and cancels the three undecided asks.
        controller.shutdown().await;
        // Three requests, their three cancellations and one denial.
        assert_eq!(audit.shutdown().await.unwrap(), 7);
    }
}
