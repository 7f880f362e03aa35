//! The native benchmarks (no kernel needed): `gatekeep-bench native`.

pub mod agent;
pub mod console;
pub mod decisions;
pub mod fleet;
pub mod host;
pub mod host_audit;
pub mod instructions;
pub mod matcher;
pub mod service;

#[path = "../../../gatekeep-server/tests/support/pg.rs"]
#[expect(
    dead_code,
    reason = "the service tests' cluster module; the benchmarks use part of it"
)]
mod pg;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use gatekeep_audit::{AuditRecord, AuditWriter, RecordKind, WriterConfig};
use serde_json::json;

use crate::report::{Figure, Target, per_second};

/// Options of `gatekeep-bench native`.
#[derive(Debug, clap::Args)]
pub struct NativeOptions {
    /// Seconds, not minutes: fewer rounds and samples (checks that everything still runs).
    #[arg(long)]
    pub smoke: bool,
    /// Where the databases go (the disk being measured; default: the system temp folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Only these groups: `host`, `rtt`, `throughput`, `instructions`, `audit`, `memory`,
    /// `matcher`, `fleet`, `host-audit`, `console` (default: all). `fleet` and `host-audit`
    /// need `PostgreSQL` (`cargo xtask setup`).
    #[arg(long = "only", value_name = "GROUP")]
    pub only: Vec<String>,
    /// Durability of the service's state database: `full` (default) or `normal`.
    #[arg(long, default_value = "full", value_parser = ["full", "normal"])]
    pub synchronous: String,
    /// The `gatekeep-server` binary to measure (default: the one next to this binary).
    #[arg(long)]
    pub server: Option<PathBuf>,
    /// Keep the `instructions` group's callgrind files in this folder (for
    /// `callgrind_annotate`).
    #[arg(long, value_name = "DIR")]
    pub callgrind_dir: Option<PathBuf>,
    /// Pairs of rounds of the `console` group (default 16; 1 with `--smoke`): more pairs
    /// narrow the 95 % interval of its ratio (a pair of 600 decisions takes a few seconds).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub console_pairs: Option<u16>,
}

/// The resident set size of `pid`, in MiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let kib: u32 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no VmRSS line")?;
    Ok(f64::from(kib) / 1024.0)
}

/// CPU time (user + system) `pid` used so far, in seconds (`/proc/<pid>/stat`).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    // Fields after the command: state is the first (field 3); utime and stime are 14, 15.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        let value: u32 = fields.get(i).context("short stat line")?.parse()?;
        Ok(f64::from(value))
    };
    // SAFETY: sysconf has no memory arguments.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[expect(
        clippy::cast_precision_loss,
        reason = "clock ticks per second, about 100"
    )]
    let per_second = per_second.max(1) as f64;
    Ok((ticks(11)? + ticks(12)?) / per_second)
}

/// The postmaster and its children (backends, WAL writer, checkpointer...).
pub(crate) fn cluster_pids(postmaster: u32) -> Vec<u32> {
    let mut pids = vec![postmaster];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let rest = stat.rsplit_once(')')?.1.to_owned();
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            });
        if parent == Some(postmaster) {
            pids.push(pid);
        }
    }
    pids
}

pub(crate) fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|pid| cpu_seconds(*pid).ok()).sum()
}

/// Stored bytes per record: the database and its WAL (`SQLite` folds the WAL into the
/// database when the writer's connection closes, so call this after shutdown).
pub fn bytes_per_record(path: &Path, records: usize) -> f64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    #[expect(clippy::cast_precision_loss, reason = "a size for display")]
    let total = (size(path) + size(&wal)) as f64;
    #[expect(clippy::cast_precision_loss, reason = "a count for display")]
    let records = records.max(1) as f64;
    total / records
}

/// A service audit record pair, shaped like the service's own (`requested` with the full
/// request, then `decided`).
fn service_records(n: usize) -> [AuditRecord; 2] {
    let request = service::request("fetch", n);
    let id = request.id.to_string();
    let requested = AuditRecord::new(
        RecordKind::Requested,
        "web-01.prod.example.org",
        json!({ "request": &request, "deadline": "2030-01-01T00:00:00Z" }),
    )
    .with_request_id(id.clone())
    .with_actor("agent:web-01.prod.example.org");
    let decided = AuditRecord::new(
        RecordKind::Decided,
        "web-01.prod.example.org",
        json!({
            "policy": "bench",
            "kind": "exec",
            "target": &request.target,
            "state": "approved",
            "verdict": "allow",
            "reason": "server rule `bench-fetch` says allow",
            "duration": "once",
            "approvals": [],
            "wait_ms": 0,
            "final": true,
        }),
    )
    .with_request_id(id)
    .with_actor("rule:bench-fetch");
    [requested, decided]
}

/// Durable records per second through the service's audit writer (4 submitting tasks, as
/// the service's handlers submit concurrently), submit to durable.
async fn service_audit(base: &Path, records: usize, rounds: usize) -> Result<Vec<Figure>> {
    const SUBMITTERS: usize = 4;
    let mut rates = Vec::new();
    let mut bytes = Vec::new();
    for _ in 0..rounds {
        let dir = tempfile::Builder::new()
            .prefix("gk-bench-saudit-")
            .tempdir_in(base)?;
        let path = dir.path().join("audit.db");
        let writer = Arc::new(AuditWriter::open(&path, WriterConfig::default())?);
        let per_task = records / SUBMITTERS / 2;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..SUBMITTERS {
            let writer = Arc::clone(&writer);
            tasks.push(tokio::spawn(async move {
                for n in 0..per_task {
                    for record in service_records(t * per_task + n) {
                        writer.submit_async(record).await?;
                    }
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        let durable = writer.flush_async().await?;
        let elapsed = started.elapsed();
        let total = per_task * SUBMITTERS * 2;
        ensure!(
            usize::try_from(durable)? == total,
            "{durable} of {total} durable"
        );
        tokio::task::spawn_blocking(move || writer.shutdown()).await??;
        rates.push(per_second(total, elapsed));
        bytes.push(bytes_per_record(&path, total));
    }
    Ok(vec![
        Figure::from_runs(
            "native.audit.service.records_per_s",
            "service audit, durable records/s",
            "records/s",
            &rates,
        )
        .target(Target::at_least(50_000.0))
        .conditions(format!(
            "{records} records (requested + decided pairs, full request JSON), {SUBMITTERS} \
             submitting tasks, AuditWriter batching, WAL synchronous=FULL, hash chain; \
             submit to durable; database in {}",
            base.display()
        )),
        Figure::from_runs(
            "native.audit.service.bytes_per_record",
            "service audit, stored bytes per record",
            "bytes",
            &bytes,
        )
        .conditions("database + WAL files, indexes included"),
    ])
}

/// The groups `--only` may name.
const GROUPS: &[&str] = &[
    "host",
    "rtt",
    "throughput",
    "instructions",
    "audit",
    "memory",
    "matcher",
    "fleet",
    "host-audit",
    "console",
];

/// Runs the native benchmarks and prints their figures.
pub fn run(opts: &NativeOptions) -> Result<()> {
    let sizes = if opts.smoke {
        decisions::Sizes::smoke()
    } else {
        decisions::Sizes::full()
    };
    let base = opts.dir.clone().unwrap_or_else(std::env::temp_dir);
    let server = match &opts.server {
        Some(server) => server.clone(),
        None => service::default_server_binary()?,
    };
    let wants = |group: &str| opts.only.is_empty() || opts.only.iter().any(|g| g == group);
    for group in &opts.only {
        if !GROUPS.contains(&group.as_str()) {
            bail!("unknown benchmark group `{group}`");
        }
    }
    if wants("host") {
        for figure in host::figures(opts.smoke) {
            figure.emit();
        }
    }
    if wants("matcher") {
        for figure in matcher::figures(opts.smoke)? {
            figure.emit();
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if wants("rtt") || wants("throughput") {
            let service = service::Service::start(&server, &base, &opts.synchronous)?;
            if wants("rtt") {
                for figure in decisions::round_trips(&service, sizes, &opts.synchronous).await? {
                    figure.emit();
                }
            }
            if wants("throughput") {
                for figure in decisions::throughput(&service, sizes, &opts.synchronous).await? {
                    figure.emit();
                }
            }
            service.stop()?;
        }
        if wants("instructions") {
            for figure in instructions::service_per_decision(
                &server,
                &base,
                opts.smoke,
                opts.callgrind_dir.as_deref(),
            )
            .await?
            {
                figure.emit();
            }
        }
        if wants("audit") {
            let (records, rounds) = if opts.smoke { (5_000, 1) } else { (100_000, 3) };
            for figure in agent::audit(&base, records, rounds).await? {
                figure.emit();
            }
            for figure in service_audit(&base, records, rounds).await? {
                figure.emit();
            }
        }
        if wants("memory") {
            for figure in decisions::memory(&server, &base, sizes).await? {
                figure.emit();
            }
        }
        if wants("console") {
            for figure in console::figures(&server, &base, opts.smoke, opts.console_pairs).await? {
                figure.emit();
            }
        }
        if wants("fleet") || wants("host-audit") {
            // One cluster for both (its initdb takes seconds); a database each.
            let cluster = pg::start(pg::Durability::Durable).map_err(|message| {
                anyhow::anyhow!("cannot start a PostgreSQL cluster for the benchmarks: {message}")
            })?;
            if wants("fleet") {
                let sizes = fleet::Sizes::of(opts.smoke);
                for figure in fleet::figures(&server, &base, &cluster, sizes).await? {
                    figure.emit();
                }
            }
            if wants("host-audit") {
                let sizes = host_audit::Sizes::of(opts.smoke);
                for figure in host_audit::figures(&server, &base, &cluster, sizes).await? {
                    figure.emit();
                }
            }
        }
        anyhow::Ok(())
    })?;
    if wants("memory") {
        for figure in agent_memory(sizes)? {
            figure.emit();
        }
    }
    Ok(())
}

/// The agent's memory with `sizes.pending` requests, each reading in a process of its own,
/// so that its RSS is the pipeline's alone.
fn agent_memory(sizes: decisions::Sizes) -> Result<Vec<Figure>> {
    let exe = std::env::current_exe()?;
    let mut readings = Vec::new();
    for _ in 0..decisions::MEMORY_RUNS.min(sizes.rounds) {
        let output = Command::new(&exe)
            .arg("agent-memory")
            .arg(sizes.pending.to_string())
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("failed to start `gatekeep-bench agent-memory`")?;
        ensure!(
            output.status.success(),
            "`gatekeep-bench agent-memory` failed with {}",
            output.status
        );
        readings.push(agent::parse_memory(&String::from_utf8_lossy(
            &output.stdout,
        ))?);
    }
    Ok(agent::memory_figures(sizes.pending, &readings))
}
