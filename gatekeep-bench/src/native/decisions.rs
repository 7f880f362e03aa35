//! Items 4, 5 and the service's half of 7: decision round trips agent -> service -> agent
//! over gRPC on loopback with mutual TLS, service throughput with 100 agents, and the
//! service's memory with 100 agents and 10,000 pending requests.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use gatekeep_client::AgentLink;

use super::{
    cpu_seconds, rss_mib,
    service::{RULE, Service, request},
};
use crate::report::{Figure, Target, p50_p99, per_second};

/// How much to measure.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub rounds: usize,
    /// Round trips per round at 1 pending.
    pub sequential: usize,
    /// Decides per task per round at 100 and 1,000 pending.
    pub per_task_100: usize,
    pub per_task_1000: usize,
    /// Length of one throughput round.
    pub throughput_round: Duration,
    /// Agents and requests for the memory figure.
    pub agents: usize,
    pub pending: usize,
}

impl Sizes {
    #[must_use]
    pub fn full() -> Self {
        Self {
            rounds: 5,
            sequential: 2_000,
            per_task_100: 30,
            per_task_1000: 4,
            throughput_round: Duration::from_secs(5),
            agents: 100,
            pending: 10_000,
        }
    }

    #[must_use]
    pub fn smoke() -> Self {
        Self {
            rounds: 1,
            sequential: 200,
            per_task_100: 3,
            per_task_1000: 1,
            throughput_round: Duration::from_millis(500),
            agents: 10,
            pending: 500,
        }
    }
}

/// `tasks` tasks each deciding `each` requests back to back (so `tasks` are pending at any
/// time); returns every round trip.
async fn closed_loop(link: &Arc<AgentLink>, tasks: usize, each: usize) -> Result<Vec<Duration>> {
    let mut handles = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let link = Arc::clone(link);
        handles.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(each);
            for n in 0..each {
                let begun = Instant::now();
                let decision = link.decide(request("fetch", task * each + n)).await?;
                samples.push(begun.elapsed());
                ensure!(
                    decision.decided_by == format!("rule:{RULE}"),
                    "decided by `{}`, not the rule",
                    decision.decided_by
                );
            }
            Ok(samples)
        }));
    }
    let mut samples = Vec::with_capacity(tasks * each);
    for handle in handles {
        samples.extend(handle.await??);
    }
    Ok(samples)
}

/// Round trips at 1, 100 and 1,000 pending, p50 and p99 each.
pub async fn round_trips(
    service: &Service,
    sizes: Sizes,
    synchronous: &str,
) -> Result<Vec<Figure>> {
    let link = service.agent("bench-0").await?;
    closed_loop(&link, 1, 200).await?; // warm up the connection, caches, the database
    let mut figures = Vec::new();
    for (pending, tasks, each) in [
        (1, 1, sizes.sequential),
        (100, 100, sizes.per_task_100),
        (1000, 1000, sizes.per_task_1000),
    ] {
        let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
        for _ in 0..sizes.rounds {
            let mut samples = closed_loop(&link, tasks, each).await?;
            let (p50, p99) = p50_p99(&mut samples);
            p50s.push(p50);
            p99s.push(p99);
        }
        let conditions = format!(
            "{tasks} task(s) x {each} decides back to back per round, server rule decides; \
             one agent stream; mTLS loopback; the gatekeep-server binary in its own process, sqlite synchronous={synchronous}"
        );
        let mut p50 = Figure::from_runs(
            &format!("native.rtt.{pending}.p50"),
            &format!("decision round trip, {pending} pending: p50"),
            "us",
            &p50s,
        )
        .conditions(conditions.clone());
        let mut p99 = Figure::from_runs(
            &format!("native.rtt.{pending}.p99"),
            &format!("decision round trip, {pending} pending: p99"),
            "us",
            &p99s,
        )
        .conditions(conditions);
        if pending == 1 {
            p50 = p50.target(Target::at_most(300.0));
            p99 = p99.target(Target::at_most(2000.0));
        }
        figures.push(p50);
        figures.push(p99);
    }
    Arc::into_inner(link)
        .context("the link is still shared")?
        .shutdown()
        .await;
    Ok(figures)
}

/// Decisions per second with `agents` agents (one stream each), 8 requests in flight on each,
/// every request decided by the server rule.
pub async fn throughput(service: &Service, sizes: Sizes, synchronous: &str) -> Result<Vec<Figure>> {
    const IN_FLIGHT: usize = 8;
    let agents = sizes.agents;
    let mut links = Vec::with_capacity(agents);
    for i in 0..agents {
        links.push(service.agent(&format!("fleet-{i}")).await?);
    }
    let mut rates = Vec::new();
    let (mut service_cpu, mut client_cpu) = (Vec::new(), Vec::new());
    let own = std::process::id();
    for _ in 0..sizes.rounds {
        let done = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for link in &links {
            for worker in 0..IN_FLIGHT {
                let (link, done, stop) = (Arc::clone(link), Arc::clone(&done), Arc::clone(&stop));
                tasks.push(tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        link.decide(request("fetch", worker * 1_000_000 + n))
                            .await?;
                        done.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                    anyhow::Ok(())
                }));
            }
        }
        // Let the pipeline fill, then count over a fixed window.
        tokio::time::sleep(sizes.throughput_round / 5).await;
        let (started, before) = (Instant::now(), done.load(Ordering::Relaxed));
        let cpu_before = (cpu_seconds(service.pid())?, cpu_seconds(own)?);
        tokio::time::sleep(sizes.throughput_round).await;
        let counted = done.load(Ordering::Relaxed) - before;
        let elapsed = started.elapsed();
        let cpu_after = (cpu_seconds(service.pid())?, cpu_seconds(own)?);
        #[expect(clippy::cast_precision_loss, reason = "a count")]
        let per = counted.max(1) as f64 / 1e6;
        service_cpu.push((cpu_after.0 - cpu_before.0) / per);
        client_cpu.push((cpu_after.1 - cpu_before.1) / per);
        eprintln!(
            "[bench] throughput round: {:.0} decisions/s, service {:.1} us CPU/decision",
            per_second(counted, elapsed),
            (cpu_after.0 - cpu_before.0) / per
        );
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await??;
        }
        rates.push(per_second(counted, elapsed));
    }
    for link in links {
        if let Some(link) = Arc::into_inner(link) {
            link.shutdown().await;
        }
    }
    let cpu_conditions = format!(
        "CPU time (user + system, /proc) over the throughput windows / decisions; {agents} agents x {IN_FLIGHT} in flight; \
         independent of other load on the machine, unlike the rate"
    );
    Ok(vec![
        Figure::from_runs(
            "native.service.decisions_per_s",
            &format!("service throughput, {agents} agents, rule decides"),
            "decisions/s",
            &rates,
        )
        .target(Target::at_least(20_000.0))
        .conditions(format!(
            "{agents} agents (own mTLS stream each) x {IN_FLIGHT} in flight against the gatekeep-server binary, {:.1} s windows; \
         clients and service share the 2 cores; sqlite synchronous={synchronous}",
            sizes.throughput_round.as_secs_f64()
        )),
        Figure::from_runs(
            "native.service.cpu_us_per_decision",
            "service CPU per decision",
            "us",
            &service_cpu,
        )
        .conditions(cpu_conditions.clone()),
        Figure::from_runs(
            "native.agents.cpu_us_per_decision",
            "agents' (clients') CPU per decision",
            "us",
            &client_cpu,
        )
        .conditions(cpu_conditions),
    ])
}

/// Services started for the memory figures, one after the other.
pub const MEMORY_RUNS: usize = 3;

/// The service's RSS (MiB) idle, with `agents` agents connected, and with `pending`
/// requests pending across them (spread evenly, nothing decides them): one fresh service.
async fn memory_once(server: &Path, base: &Path, sizes: Sizes) -> Result<[f64; 3]> {
    let service = Service::start(server, base, "full")?;
    // Let it settle: the first RSS reading is the idle service.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = rss_mib(service.pid())?;
    let mut links = Vec::with_capacity(sizes.agents);
    for i in 0..sizes.agents {
        links.push(service.agent(&format!("mem-{i}")).await?);
    }
    let connected = rss_mib(service.pid())?;
    for n in 0..sizes.pending {
        links[n % links.len()].submit(request("push", n))?;
    }
    let mut reviewer = service.reviewer().await?;
    let deadline = Instant::now() + Duration::from_mins(2);
    loop {
        let status = reviewer.status().await?;
        if usize::try_from(status.pending).unwrap_or(0) >= sizes.pending {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "only {} of {} requests pending after 120 s",
            status.pending,
            sizes.pending
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let loaded = rss_mib(service.pid())?;
    drop(reviewer);
    for link in links {
        if let Some(link) = Arc::into_inner(link) {
            link.shutdown().await;
        }
    }
    service.stop()?;
    Ok([idle, connected, loaded])
}

/// The service's RSS idle, with `agents` agents connected, and with `pending` requests
/// pending, each over [`MEMORY_RUNS`] fresh services (one in a smoke run); the loaded
/// figures are also given as ratios to the same service's idle RSS.
pub async fn memory(server: &Path, base: &Path, sizes: Sizes) -> Result<Vec<Figure>> {
    let mut runs = Vec::new();
    for _ in 0..MEMORY_RUNS.min(sizes.rounds) {
        runs.push(memory_once(server, base, sizes).await?);
    }
    let column = |i: usize| runs.iter().map(|run| run[i]).collect::<Vec<f64>>();
    let to_idle = |i: usize| runs.iter().map(|run| run[i] / run[0]).collect::<Vec<f64>>();
    let idle = Figure::from_runs(
        "native.service.rss.idle",
        "service RSS, idle",
        "MiB",
        &column(0),
    )
    .conditions(format!(
        "gatekeep-server serve, no agent; {} fresh services",
        runs.len()
    ));
    let idle_median = idle.value;
    let agents = sizes.agents;
    let pending = sizes.pending;
    Ok(vec![
        idle,
        Figure::from_runs(
            "native.service.rss.agents",
            &format!("service RSS, {agents} agents connected"),
            "MiB",
            &column(1),
        )
        .ratio(&to_idle(1))
        .baseline("idle", idle_median)
        .conditions(format!("{agents} mTLS agent streams, nothing pending")),
        Figure::from_runs(
            "native.service.rss.pending",
            &format!("service RSS, {agents} agents, {pending} pending"),
            "MiB",
            &column(2),
        )
        .ratio(&to_idle(2))
        .baseline("idle", idle_median)
        .conditions(format!(
            "{pending} requests spread over {agents} agents, stored and waiting for reviewers"
        )),
    ])
}
