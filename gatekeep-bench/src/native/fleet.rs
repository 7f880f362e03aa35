//! Issue 23's fleet figures: `gatekeep-server` replicas (the binary next to this one, a
//! process each) on one `PostgreSQL` cluster (Debian's server at its default durability,
//! every commit flushed; a throwaway data directory under `target/tmp/pg`, stopped when
//! this process ends), and simulated agents on loopback with mutual TLS, all on this
//! machine (they share its cores):
//!
//! 1. Cross-replica delivery: an agent streaming to replica 0, a reviewer approving on
//!    replica 1, one request at a time: from the `Decide` call to the agent holding the
//!    decision; idle, then while the throughput load runs.
//! 2. Throughput: 100 agents (one certificate and stream each, spread over the replicas),
//!    8 requests in flight each, decided by a server rule: decisions/s, and CPU per decision
//!    of the replicas, of `PostgreSQL` and of the simulated agents (from `/proc`).
//! 3. Failover: an agent on replica 0 (replica 1 its failover address) with requests
//!    pending; replica 0 is killed (SIGKILL) and a reviewer approves them all on replica 1: from
//!    the kill until the agent, reconnected and its requests re-sent, holds every decision.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use gatekeep_client::{AgentLink, LinkEvent, ReviewClient};
use gatekeep_proto::{
    GrantDuration,
    model::{RequestState, Verdict},
};
use gatekeep_server::{ServerConfig, certs::Pki, store::PostgresStore};
use uuid::Uuid;

use super::{
    cluster_pids, cpu_of, pg,
    service::{RULE, connect_agent, drain, request, reviewer},
};
use crate::{
    report::{Figure, Target, p50_p99, per_second},
    server::ServerProcess,
};

/// Requests in flight per agent.
const IN_FLIGHT: usize = 8;
/// Longest wait for one step; reached only when something is stuck.
const PATIENCE: Duration = Duration::from_secs(30);

/// How much to measure.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub replicas: usize,
    pub agents: usize,
    /// Length of the throughput window (after a warm-up of a quarter of it).
    pub window: Duration,
    pub latency_rounds: usize,
    pub latency_rounds_under_load: usize,
    /// Requests pending on the agent whose replica is killed.
    pub failover_pending: usize,
    pub failover_rounds: usize,
}

impl Sizes {
    /// The smoke sizes or the full ones.
    #[must_use]
    pub fn of(smoke: bool) -> Self {
        if smoke { Self::smoke() } else { Self::full() }
    }

    #[must_use]
    pub fn full() -> Self {
        Self {
            replicas: 3,
            agents: 100,
            window: Duration::from_secs(10),
            latency_rounds: 200,
            latency_rounds_under_load: 30,
            failover_pending: 50,
            failover_rounds: 3,
        }
    }

    #[must_use]
    pub fn smoke() -> Self {
        Self {
            replicas: 3,
            agents: 10,
            window: Duration::from_secs(2),
            latency_rounds: 20,
            latency_rounds_under_load: 5,
            failover_pending: 5,
            failover_rounds: 1,
        }
    }
}

/// The replicas, their shared PKI and a reviewer's token.
struct Fleet {
    server: std::path::PathBuf,
    url: String,
    pki: Arc<Pki>,
    token: String,
    dir: tempfile::TempDir,
    replicas: Vec<Option<ServerProcess>>,
    endpoints: Vec<String>,
    /// Replicas started so far (each gets a folder of its own).
    spawned: usize,
}

impl Fleet {
    async fn start(server: &Path, base: &Path, url: String, replicas: usize) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("gk-bench-fleet-")
            .tempdir_in(base)?;
        let pki = Pki::load_or_init(&dir.path().join("tls"), &[])?;
        let mut config = ServerConfig::default();
        config.store.url = Some(url.clone());
        let store = PostgresStore::connect(&config.store).await?;
        let token = gatekeep_server::add_reviewer(&store, "bench", &["sre".into()]).await?;
        drop(store);
        let mut fleet = Self {
            server: server.to_owned(),
            url,
            pki: Arc::new(pki),
            token,
            dir,
            replicas: Vec::new(),
            endpoints: Vec::new(),
            spawned: 0,
        };
        for _ in 0..replicas {
            fleet.spawn()?;
        }
        Ok(fleet)
    }

    /// Starts one more replica, in a folder of its own with a copy of the shared
    /// certificates.
    fn spawn(&mut self) -> Result<()> {
        let n = self.spawned;
        self.spawned += 1;
        let dir = self.dir.path().join(format!("replica-{n}"));
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls)?;
        for entry in std::fs::read_dir(self.dir.path().join("tls"))? {
            let entry = entry?;
            std::fs::copy(entry.path(), tls.join(entry.file_name()))?;
        }
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let config = format!(
            "name = \"replica-{n}\"\n[store]\nurl = \"{url}\"\npool_size = 16\n\n[[rules]]\n\
             name = \"{RULE}\"\naction = \"allow\"\npolicy = \"bench\"\n\
             executable = \"/usr/bin/git\"\ncommand = \"git fetch *\"\n",
            url = self.url
        );
        let process = ServerProcess::start(&self.server, &dir, &config, listen, "warn")?;
        self.replicas.push(Some(process));
        self.endpoints.push(format!("https://{listen}"));
        Ok(())
    }

    fn pids(&self) -> Vec<u32> {
        self.replicas
            .iter()
            .flatten()
            .map(ServerProcess::pid)
            .collect()
    }

    async fn reviewer(&self, n: usize) -> Result<ReviewClient> {
        reviewer(&self.pki, &self.endpoints[n], &self.token).await
    }
}

/// Waits until request `id` is pending as `reviewer`'s replica sees it.
async fn wait_pending(reviewer: &mut ReviewClient, id: Uuid) -> Result<()> {
    let asked = Instant::now();
    loop {
        if let Ok((record, _)) = reviewer.get(id).await
            && record.state == RequestState::Pending
        {
            return Ok(());
        }
        ensure!(
            asked.elapsed() < PATIENCE,
            "request {id} never pending on the reviewer's replica"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One request at a time, pending on `link`'s replica and approved on `reviewer`'s: from
/// the approval to the agent holding the decision.
async fn cross_replica(
    link: &Arc<AgentLink>,
    reviewer: &mut ReviewClient,
    rounds: usize,
) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(rounds);
    for n in 0..rounds {
        let request = request("push", n);
        let id = request.id;
        let agent = Arc::clone(link);
        let (answered, answer) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let decision = agent.decide(request).await;
            drop(answered.send((decision, Instant::now())));
        });
        wait_pending(reviewer, id).await?;
        let sent = Instant::now();
        tokio::time::timeout(
            PATIENCE,
            reviewer.decide(id, Verdict::Allow, "bench", GrantDuration::Once),
        )
        .await
        .context("approving took too long")??;
        let (decision, at) = tokio::time::timeout(PATIENCE, answer)
            .await
            .context("the decision never reached the agent")??;
        ensure!(decision?.request_id == id, "another request's decision");
        samples.push(at.duration_since(sent));
    }
    Ok(samples)
}

/// Agents deciding `git fetch` requests (a server rule allows them), `IN_FLIGHT` each, until
/// `running` is cleared; `decided` counts the decisions.
fn load(
    links: &[Arc<AgentLink>],
    decided: &Arc<AtomicU64>,
    running: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Result<()>>> {
    let mut workers = Vec::new();
    for link in links {
        for worker in 0..IN_FLIGHT {
            let link = Arc::clone(link);
            let decided = Arc::clone(decided);
            let running = Arc::clone(running);
            workers.push(tokio::spawn(async move {
                let mut n = worker;
                while running.load(Ordering::Relaxed) {
                    let decision = tokio::time::timeout(PATIENCE, link.decide(request("fetch", n)))
                        .await
                        .context("no automatic decision in time")??;
                    ensure!(
                        decision.decided_by == format!("rule:{RULE}"),
                        "decided by {}",
                        decision.decided_by
                    );
                    decided.fetch_add(1, Ordering::Relaxed);
                    n += IN_FLIGHT;
                }
                Ok(())
            }));
        }
    }
    workers
}

/// From SIGKILL of the agent's replica until the agent holds every decision of its pending
/// requests, approved meanwhile on the surviving replica.
async fn failover(fleet: &mut Fleet, pending: usize, round: usize) -> Result<Duration> {
    let (link, mut events) = connect_agent(
        &fleet.pki,
        &fleet.endpoints[0],
        &[fleet.endpoints[1].clone()],
        &format!("failover-{round}"),
    )
    .await?;
    let link = Arc::new(link);
    let mut reviewer = fleet.reviewer(1).await?;
    let mut answers = Vec::with_capacity(pending);
    let mut ids = Vec::with_capacity(pending);
    for n in 0..pending {
        let request = request("push", n);
        ids.push(request.id);
        let agent = Arc::clone(&link);
        answers.push(tokio::spawn(async move { agent.decide(request).await }));
    }
    for id in &ids {
        wait_pending(&mut reviewer, *id).await?;
    }
    let killed = Instant::now();
    // Dropping the process kills it (SIGKILL) and reaps it.
    drop(fleet.replicas[0].take());
    for id in &ids {
        reviewer
            .decide(*id, Verdict::Allow, "bench", GrantDuration::Once)
            .await?;
    }
    for answer in answers {
        let decision = tokio::time::timeout(PATIENCE, answer)
            .await
            .context("a decision never reached the agent after the failover")???;
        ensure!(decision.verdict == Verdict::Allow, "not the approval");
    }
    let elapsed = killed.elapsed();
    // The link must have moved to replica 1: it saw the loss and a new connection.
    let mut reconnected = false;
    while let Ok(event) = events.try_recv() {
        reconnected |= matches!(event, LinkEvent::Connected { .. });
    }
    ensure!(reconnected, "the agent never reconnected");
    // A fresh replica in place of the killed one, for the next round.
    fleet.replicas.remove(0);
    fleet.endpoints.remove(0);
    fleet.spawn()?;
    Ok(elapsed)
}

/// Runs the fleet benchmark and returns its figures.
#[expect(clippy::too_many_lines, reason = "the benchmark's phases, in order")]
pub async fn figures(
    server: &Path,
    base: &Path,
    cluster: &pg::Cluster,
    sizes: Sizes,
) -> Result<Vec<Figure>> {
    let url = cluster.database().await;
    let mut fleet = Fleet::start(server, base, url, sizes.replicas.max(2)).await?;
    let setting = format!(
        "{} replicas (one process each) on one PostgreSQL cluster (default durability), on \
         this machine's {} cores with the clients",
        sizes.replicas.max(2),
        std::thread::available_parallelism().map_or(0, usize::from)
    );

    let latency_agent = {
        let (link, events) = connect_agent(&fleet.pki, &fleet.endpoints[0], &[], "latency").await?;
        drain(events);
        Arc::new(link)
    };
    let mut reviewer = fleet.reviewer(1).await?;
    let mut idle = cross_replica(&latency_agent, &mut reviewer, sizes.latency_rounds).await?;

    let mut links = Vec::with_capacity(sizes.agents);
    for n in 0..sizes.agents {
        let endpoint = &fleet.endpoints[n % fleet.endpoints.len()];
        let (link, events) =
            connect_agent(&fleet.pki, endpoint, &[], &format!("bench-{n}")).await?;
        drain(events);
        links.push(Arc::new(link));
    }
    let decided = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let workers = load(&links, &decided, &running);
    tokio::time::sleep(sizes.window / 4).await;
    let replica_pids = fleet.pids();
    let postgres_pids = cluster_pids(cluster.pid);
    let sample = || {
        (
            cpu_of(&replica_pids),
            cpu_of(&postgres_pids),
            cpu_of(&[std::process::id()]),
            decided.load(Ordering::Relaxed),
        )
    };
    let (r0, p0, c0, d0) = sample();
    let window = Instant::now();
    tokio::time::sleep(sizes.window).await;
    let elapsed = window.elapsed();
    let (r1, p1, c1, d1) = sample();
    let mut loaded = cross_replica(
        &latency_agent,
        &mut reviewer,
        sizes.latency_rounds_under_load,
    )
    .await?;
    running.store(false, Ordering::Relaxed);
    for worker in workers {
        worker.await??;
    }
    drop(links);
    let count = usize::try_from(d1 - d0)?;
    ensure!(count > 0, "no decision in the window");
    #[expect(clippy::cast_precision_loss, reason = "a count for a ratio")]
    let per_decision = |seconds: f64| seconds / count as f64 * 1e6;

    let mut failovers = Vec::new();
    for round in 0..sizes.failover_rounds {
        failovers.push(
            failover(&mut fleet, sizes.failover_pending, round)
                .await?
                .as_secs_f64()
                * 1e3,
        );
    }

    let (idle_p50, idle_p99) = p50_p99(&mut idle);
    let (loaded_p50, loaded_p99) = p50_p99(&mut loaded);
    let load_conditions = format!(
        "{} agents x {IN_FLIGHT} in flight, decided by a server rule; {setting}",
        sizes.agents
    );
    let cpu = |id: &str, what: &str, seconds: f64| {
        Figure::from_runs(
            id,
            &format!("fleet, CPU per decision, {what}"),
            "us",
            &[per_decision(seconds)],
        )
        .conditions(load_conditions.clone())
    };
    let delivery = |id: &str, what: &str, ms: f64, rounds: usize, target: Option<f64>| {
        let figure = Figure::from_runs(
            id,
            &format!("fleet, cross-replica delivery, {what}"),
            "ms",
            &[ms],
        )
        .conditions(format!(
            "{rounds} requests one at a time, pending on replica 0's agent, approved on \
             replica 1: approval to the agent holding the decision; {setting}"
        ));
        match target {
            Some(target) => figure.target(Target::at_most(target)),
            None => figure,
        }
    };
    Ok(vec![
        Figure::from_runs(
            "native.fleet.decisions_per_s",
            "fleet, decisions/s",
            "decisions/s",
            &[per_second(count, elapsed)],
        )
        .target(Target::at_least(10_000.0))
        .conditions(format!("{} s window; {load_conditions}", elapsed.as_secs())),
        cpu("native.fleet.cpu_us.replicas", "the replicas", r1 - r0),
        cpu("native.fleet.cpu_us.postgres", "PostgreSQL", p1 - p0),
        cpu(
            "native.fleet.cpu_us.agents",
            "the simulated agents",
            c1 - c0,
        ),
        delivery(
            "native.fleet.delivery.idle.p50_ms",
            "idle, p50",
            idle_p50 / 1e3,
            sizes.latency_rounds,
            None,
        ),
        delivery(
            "native.fleet.delivery.idle.p99_ms",
            "idle, p99",
            idle_p99 / 1e3,
            sizes.latency_rounds,
            Some(50.0),
        ),
        delivery(
            "native.fleet.delivery.loaded.p50_ms",
            "under the throughput load, p50",
            loaded_p50 / 1e3,
            sizes.latency_rounds_under_load,
            None,
        ),
        delivery(
            "native.fleet.delivery.loaded.p99_ms",
            "under the throughput load, p99",
            loaded_p99 / 1e3,
            sizes.latency_rounds_under_load,
            Some(50.0),
        ),
        Figure::from_runs(
            "native.fleet.failover_ms",
            "fleet, agent failover after its replica is SIGKILLed",
            "ms",
            &failovers,
        )
        .target(Target::at_most(2_000.0))
        .conditions(format!(
            "{} requests pending on the killed replica's agent, approved on the other \
             replica after the kill: kill until the agent holds every decision; {setting}",
            sizes.failover_pending
        )),
    ])
}
