//! Fleet benchmark: `gatekeep-server` replicas (the release binary, one process each) on
//! one `PostgreSQL` cluster (Debian's server with its default durability, started under
//! `target/tmp/pg` and stopped at the end), simulated agents on loopback with mutual TLS,
//! all on this machine (so they share its cores):
//!
//! 1. Throughput: 100 agents (one certificate and stream each, spread over the replicas),
//!    8 requests in flight each, decided by a server rule: decisions/s, and CPU per
//!    decision of the replicas, of `PostgreSQL` and of the simulated agents (from `/proc`).
//! 2. Cross-replica delivery: an agent streaming to replica 0, a reviewer approving on
//!    replica 1, one request at a time: from the `Decide` call to the agent holding the
//!    decision, p50/p99; idle, then while the throughput load runs.
//!
//! Prints figures; asserts nothing about time.
//!
//! `cargo build --release -p gatekeep-server && cargo run --release -p gatekeep-server
//! --example bench_fleet [-- SECONDS REPLICAS AGENTS]` (defaults 10 3 100)

#[path = "../tests/support/pg.rs"]
#[expect(
    dead_code,
    reason = "the tests' cluster module; the benchmark uses part of it"
)]
mod pg;

use std::{
    fs,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use gatekeep_client::{
    AgentLink, AgentLinkConfig, ClientIdentity, ClientTls, LinkEvent, ReviewClient, ReviewConfig,
};
use gatekeep_proto::{
    GrantDuration,
    model::{ApprovalRequest, ApprovalSettings, ExecTarget, RequestState, Target, Verdict},
};
use gatekeep_server::{
    ServerConfig,
    certs::{self, CertAuthority},
    store::PostgresStore,
};
use tokio::sync::mpsc;
use uuid::Uuid;

/// Requests in flight per agent.
const IN_FLIGHT: usize = 8;
/// Decisions timed one at a time while idle, and while the throughput load runs (each then
/// waits behind the load's requests: fewer, or the phase takes minutes).
const LATENCY_ROUNDS: usize = 200;
const LATENCY_ROUNDS_UNDER_LOAD: usize = 30;
/// Longest wait for one step; reached only when something is stuck.
const PATIENCE: Duration = Duration::from_secs(30);

fn request(command: &str, n: usize) -> ApprovalRequest {
    let now = time::OffsetDateTime::now_utc();
    ApprovalRequest {
        id: Uuid::new_v4(),
        policy: "bench".into(),
        rule: "default".into(),
        cgroup: "/sys/fs/cgroup/bench".into(),
        pid: 1000,
        tid: 1000,
        uid: 1000,
        user_name: Some("worker".into()),
        cwd: Some("/srv".into()),
        ancestry: vec![],
        target: Target::Exec(ExecTarget {
            executable: "/usr/bin/git".into(),
            argv: vec!["git".into(), command.into(), format!("branch-{n}")],
            content: None,
            path_check: None,
            named: None,
            file: None,
            mount_namespace: None,
            argv_truncated: false,
            env: Vec::new(),
        }),
        requested_at: now,
        deadline: now + time::Duration::hours(1),
        on_timeout: Verdict::Deny,
        approval: ApprovalSettings {
            reviewer_groups: vec!["sre".into()],
            approvals_required: 1,
            grant_durations: vec![GrantDuration::Once],
            owners: vec![],
            require_reason: false,
        },
    }
}

/// CPU time (user + system) of a process, in seconds; 0 once it is gone.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The fields after the command name (which may hold spaces) in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    #[expect(clippy::cast_precision_loss, reason = "CPU ticks")]
    let seconds = ticks as f64 / clock_ticks();
    seconds
}

fn clock_ticks() -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "a small constant")]
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |ticks| ticks as f64)
}

/// The postmaster and its children (backends, WAL writer, checkpointer...).
fn cluster_pids(postmaster: u32) -> Vec<u32> {
    let mut pids = vec![postmaster];
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.filter_map(Result::ok) {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let parent = fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.rsplit_once(')')?.1.to_owned();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            if parent == Some(postmaster) {
                pids.push(pid);
            }
        }
    }
    pids
}

struct Replica {
    addr: SocketAddr,
    child: Child,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.child.wait();
    }
}

fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the benchmark");
    // target/release/examples/bench_fleet -> target/release/gatekeep-server
    let server = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("gatekeep-server"))
        .expect("target folder");
    assert!(
        server.exists(),
        "`{}` is missing: `cargo build --release -p gatekeep-server` first",
        server.display()
    );
    server
}

fn spawn_replica(dir: &Path, n: usize, url: &str) -> Replica {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let tls = dir.join("tls");
    let config = dir.join(format!("replica-{n}.toml"));
    fs::write(
        &config,
        format!(
            "name = \"replica-{n}\"\nlisten = \"{addr}\"\ndata_dir = \"{data}\"\n\
             [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             [store]\nurl = \"{url}\"\npool_size = 16\n\
             [[rules]]\nname = \"bench-fetch\"\naction = \"allow\"\npolicy = \"bench\"\n\
             executable = \"/usr/bin/git\"\ncommand = \"git fetch *\"\n",
            data = dir.join(format!("replica-{n}")).display(),
            ca = tls.join("ca.pem").display(),
            cert = tls.join("server.pem").display(),
            key = tls.join("server.key").display(),
        ),
    )
    .expect("config");
    let mut command = Command::new(server_binary());
    command
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join(format!("replica-{n}.log"))).expect("log"));
    // SAFETY: prctl is async-signal-safe; the replicas die with the benchmark (the main
    // thread, which spawns them, lives until it ends).
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let child = command.spawn().expect("start gatekeep-server");
    Replica { addr, child }
}

struct Setup {
    dir: tempfile::TempDir,
    ca: CertAuthority,
    ca_pem: String,
    token: String,
}

impl Setup {
    async fn reviewer(
        &self,
        replica: &Replica,
    ) -> Result<ReviewClient, gatekeep_client::ClientError> {
        ReviewClient::connect(ReviewConfig {
            endpoint: format!("https://{}", replica.addr),
            token: self.token.clone(),
            tls: ClientTls {
                ca_pem: self.ca_pem.clone(),
                identity: None,
                domain: None,
            },
            connect_timeout: Duration::from_secs(5),
        })
        .await
    }

    async fn agent(&self, replica: &Replica, host: &str) -> Arc<AgentLink> {
        let identity = self.ca.issue_agent(host).expect("agent certificate");
        let (link, mut events) = AgentLink::start(AgentLinkConfig::new(
            format!("https://{}", replica.addr),
            ClientTls {
                ca_pem: self.ca_pem.clone(),
                identity: Some(ClientIdentity {
                    cert_pem: identity.cert_pem,
                    key_pem: identity.key_pem,
                }),
                domain: None,
            },
        ))
        .expect("link");
        loop {
            match events.recv().await.expect("events") {
                LinkEvent::Connected { .. } => break,
                LinkEvent::Disconnected { error, .. } => eprintln!("agent {host}: {error}"),
                _ => {}
            }
        }
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        Arc::new(link)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a list"
    )]
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// One request at a time: pending on replica 0's agent, approved on replica 1.
async fn cross_replica(
    link: &Arc<AgentLink>,
    reviewer: &mut ReviewClient,
    label: &str,
    rounds: usize,
) {
    let (answers, mut answered) = mpsc::unbounded_channel();
    let mut samples = Vec::with_capacity(rounds);
    for n in 0..rounds {
        let request = request("push", n);
        let id = request.id;
        let agent = Arc::clone(link);
        let answers = answers.clone();
        tokio::spawn(async move {
            let decision = agent.decide(request).await.expect("decision");
            let _ = answers.send((decision.request_id, Instant::now()));
        });
        let asked = Instant::now();
        loop {
            let got = tokio::time::timeout(PATIENCE, reviewer.get(id))
                .await
                .unwrap_or_else(|_| panic!("reading request {n} ({label}) took too long"));
            if let Ok((record, _)) = got
                && record.state == RequestState::Pending
            {
                break;
            }
            assert!(
                asked.elapsed() < PATIENCE,
                "request {n} ({label}) never pending on replica 1"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let sent = Instant::now();
        tokio::time::timeout(
            PATIENCE,
            reviewer.decide(id, Verdict::Allow, "bench", GrantDuration::Once),
        )
        .await
        .unwrap_or_else(|_| panic!("approving request {n} ({label}) took too long"))
        .expect("approve");
        let (answer, at) = tokio::time::timeout(PATIENCE, answered.recv())
            .await
            .unwrap_or_else(|_| panic!("decision {n} ({label}) never reached the agent"))
            .expect("answer");
        assert_eq!(answer, id);
        samples.push(at.duration_since(sent));
    }
    samples.sort();
    println!(
        "cross-replica delivery ({label}): {rounds} decisions, p50 {:.2} ms, p99 {:.2} ms, \
         max {:.2} ms",
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().expect("samples").as_secs_f64() * 1e3,
    );
}

#[tokio::main]
#[expect(clippy::too_many_lines, reason = "the benchmark's phases, in order")]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: SECONDS REPLICAS AGENTS"))
        .collect();
    let seconds = args.first().copied().unwrap_or(10);
    let replicas = args.get(1).copied().unwrap_or(3).max(2);
    let agents = args.get(2).copied().unwrap_or(100);

    let cluster = pg::start(pg::Durability::Durable).expect("PostgreSQL cluster");
    let url = cluster.database().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = dir.path().join("tls");
    certs::init_dir(&tls, &[]).expect("certificates");
    let ca_pem = fs::read_to_string(tls.join("ca.pem")).expect("ca");
    let ca = CertAuthority::from_pem(
        &ca_pem,
        &fs::read_to_string(tls.join("ca.key")).expect("ca key"),
    )
    .expect("ca");
    let mut config = ServerConfig::default();
    config.store.url = Some(url.clone());
    let store = PostgresStore::connect(&config.store)
        .await
        .expect("database");
    let token = gatekeep_server::add_reviewer(&store, "alice", &["sre".into()])
        .await
        .expect("reviewer");
    drop(store);
    let setup = Setup {
        dir,
        ca,
        ca_pem,
        token,
    };
    let fleet: Vec<Replica> = (0..replicas)
        .map(|n| spawn_replica(setup.dir.path(), n, &url))
        .collect();
    for replica in &fleet {
        let started = Instant::now();
        loop {
            if let Ok(mut client) = setup.reviewer(replica).await
                && client.status().await.is_ok()
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "replica never served"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!(
        "fleet: {replicas} replicas (release), PostgreSQL {} (durable, defaults), {agents} \
         agents x {IN_FLIGHT} in flight, on {} cores",
        cluster.dir.display(),
        std::thread::available_parallelism().map_or(0, usize::from)
    );

    // Latency while idle.
    let latency_agent = setup.agent(&fleet[0], "latency").await;
    let mut reviewer = setup.reviewer(&fleet[1]).await.expect("reviewer");
    cross_replica(&latency_agent, &mut reviewer, "idle", LATENCY_ROUNDS).await;

    // Throughput.
    let mut links = Vec::with_capacity(agents);
    for n in 0..agents {
        links.push(
            setup
                .agent(&fleet[n % replicas], &format!("bench-{n}"))
                .await,
        );
    }
    let decided = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let mut workers = Vec::new();
    for link in &links {
        for worker in 0..IN_FLIGHT {
            let link = Arc::clone(link);
            let decided = Arc::clone(&decided);
            let running = Arc::clone(&running);
            workers.push(tokio::spawn(async move {
                let mut n = worker;
                while running.load(Ordering::Relaxed) {
                    let decision = tokio::time::timeout(PATIENCE, link.decide(request("fetch", n)))
                        .await
                        .expect("an automatic decision in time")
                        .expect("decision");
                    debug_assert_eq!(decision.decided_by, "rule:bench-fetch");
                    decided.fetch_add(1, Ordering::Relaxed);
                    n += IN_FLIGHT;
                }
            }));
        }
    }
    // Warm up, then measure a window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let replica_pids: Vec<u32> = fleet.iter().map(|r| r.child.id()).collect();
    let sample = || {
        let replicas: f64 = replica_pids.iter().map(|pid| cpu_seconds(*pid)).sum();
        let postgres: f64 = cluster_pids(cluster.pid)
            .iter()
            .map(|pid| cpu_seconds(*pid))
            .sum();
        (replicas, postgres, cpu_seconds(std::process::id()))
    };
    let (r0, p0, c0) = sample();
    let d0 = decided.load(Ordering::Relaxed);
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(u64::try_from(seconds).unwrap_or(10))).await;
    let elapsed = window.elapsed().as_secs_f64();
    let (r1, p1, c1) = sample();
    let d1 = decided.load(Ordering::Relaxed);
    #[expect(clippy::cast_precision_loss, reason = "counts")]
    let count = (d1 - d0) as f64;
    println!(
        "throughput: {:.0} decisions/s over {elapsed:.1} s; CPU per decision: replicas {:.1} us, \
         PostgreSQL {:.1} us, simulated agents {:.1} us",
        count / elapsed,
        (r1 - r0) / count * 1e6,
        (p1 - p0) / count * 1e6,
        (c1 - c0) / count * 1e6,
    );

    // Latency under that load.
    cross_replica(
        &latency_agent,
        &mut reviewer,
        "under the throughput load",
        LATENCY_ROUNDS_UNDER_LOAD,
    )
    .await;
    running.store(false, Ordering::Relaxed);
    for worker in workers {
        drop(worker.await);
    }
    drop(links);
    drop(fleet);
}
