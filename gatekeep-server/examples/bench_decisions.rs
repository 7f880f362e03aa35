//! Decision service benchmark, all on loopback with mutual TLS, service and agents in this
//! one process (so they share the machine's cores):
//!
//! 1. Round trip agent -> service -> agent (`AgentLink::decide`, decided at once by a server
//!    rule) with 1, 100 and 1000 requests in flight from one agent: p50/p99 and rate.
//! 2. Reviewer decisions: with 1, 100 and 1000 requests pending, a reviewer approves each
//!    (16 calls at a time); time from the `Decide` call to the agent holding the decision.
//! 3. Throughput: 100 agents (one certificate and stream each), 8 requests in flight each,
//!    an auto-decide rule: decisions/s.
//!
//! `cargo run --release -p gatekeep-server --example bench_decisions [-- --synchronous normal]`

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use gatekeep_client::{
    AgentLink, AgentLinkConfig, ClientIdentity, ClientTls, LinkEvent, ReviewClient, ReviewConfig,
};
use gatekeep_proto::{
    GrantDuration,
    model::{
        ApprovalRequest, ApprovalSettings, Decision, ExecTarget, RequestState, Target, Verdict,
    },
};
use gatekeep_server::{Server, ServerConfig, certs::Pki, rules::RuleConfig, store::Synchronous};
use tokio::sync::mpsc;
use uuid::Uuid;

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
            grant_durations: vec![GrantDuration::Once],
            ..ApprovalSettings::default()
        },
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

fn report(label: &str, mut samples: Vec<Duration>, elapsed: Duration) {
    samples.sort_unstable();
    #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
    let rate = samples.len() as f64 / elapsed.as_secs_f64();
    println!(
        "{label:<44} n={:<6} p50={:>8.2?} p99={:>8.2?} ({rate:.0}/s)",
        samples.len(),
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
    );
}

async fn agent(pki: &Pki, endpoint: &str, host: &str) -> Arc<AgentLink> {
    let identity = pki.agent(host).expect("agent certificate");
    let (link, mut events) = AgentLink::start(AgentLinkConfig::new(
        endpoint,
        ClientTls {
            ca_pem: pki.ca.cert_pem().to_owned(),
            identity: Some(ClientIdentity {
                cert_pem: identity.cert_pem,
                key_pem: identity.key_pem,
            }),
            domain: None,
        },
    ))
    .expect("link");
    loop {
        match events.recv().await.expect("link events") {
            LinkEvent::Connected { .. } => break,
            LinkEvent::Disconnected { error, .. } => eprintln!("{host}: {error}"),
            _ => {}
        }
    }
    // Keep draining events so the queue does not grow.
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    Arc::new(link)
}

/// `count` requests in flight at once from one agent, each decided by the rule.
async fn round_trips(link: &Arc<AgentLink>, count: usize) -> (Vec<Duration>, Duration) {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for n in 0..count {
        let link = Arc::clone(link);
        tasks.push(tokio::spawn(async move {
            let begun = Instant::now();
            let decision = link.decide(request("fetch", n)).await.expect("decision");
            assert_eq!(decision.decided_by, "rule:bench-fetch");
            begun.elapsed()
        }));
    }
    let mut samples = Vec::with_capacity(count);
    for task in tasks {
        samples.push(task.await.expect("task"));
    }
    (samples, started.elapsed())
}

/// `count` requests pending; a reviewer approves each; time until the agent has it.
async fn reviewer_decisions(
    link: &Arc<AgentLink>,
    reviewer: &ReviewClient,
    count: usize,
) -> (Vec<Duration>, Duration) {
    let (answers, mut answered) = mpsc::unbounded_channel::<(Uuid, Instant)>();
    let mut ids = Vec::with_capacity(count);
    for n in 0..count {
        let request = request("push", n);
        ids.push(request.id);
        let link = Arc::clone(link);
        let answers = answers.clone();
        tokio::spawn(async move {
            let decision: Decision = link.decide(request).await.expect("decision");
            answers.send((decision.request_id, Instant::now())).ok();
        });
    }
    drop(answers);
    // Wait until the service holds all of them.
    let mut probe = reviewer.clone();
    loop {
        let pending = probe
            .list_pending(&gatekeep_client::RequestFilter::default(), 0)
            .await
            .expect("list");
        if pending.len() >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let mut sent = std::collections::HashMap::with_capacity(count);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(16));
    let mut calls = Vec::with_capacity(count);
    for id in ids {
        let permit = Arc::clone(&semaphore)
            .acquire_owned()
            .await
            .expect("permit");
        sent.insert(id, Instant::now());
        let mut reviewer = reviewer.clone();
        calls.push(tokio::spawn(async move {
            let record = reviewer
                .decide(id, Verdict::Allow, "bench", GrantDuration::Once)
                .await
                .expect("approve");
            assert_eq!(record.state, RequestState::Approved);
            drop(permit);
        }));
    }
    let mut samples = Vec::with_capacity(count);
    while let Some((id, at)) = answered.recv().await {
        samples.push(at.duration_since(sent[&id]));
    }
    for call in calls {
        call.await.expect("call");
    }
    (samples, started.elapsed())
}

/// 100 agents, 8 requests in flight each, decided by the rule; returns the links.
async fn fleet(pki: &Pki, endpoint: &str) -> Vec<Arc<AgentLink>> {
    let agents = 100;
    let per_agent_in_flight = 8;
    let per_agent_total = 200;
    let mut links = Vec::with_capacity(agents);
    for i in 0..agents {
        links.push(agent(pki, endpoint, &format!("host-{i}")).await);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for link in &links {
        for worker in 0..per_agent_in_flight {
            let link = Arc::clone(link);
            tasks.push(tokio::spawn(async move {
                let mut samples = Vec::new();
                for n in 0..per_agent_total / per_agent_in_flight {
                    let begun = Instant::now();
                    let decision = link
                        .decide(request("fetch", worker * 1000 + n))
                        .await
                        .expect("decision");
                    assert_eq!(decision.verdict, Verdict::Allow);
                    samples.push(begun.elapsed());
                }
                samples
            }));
        }
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.expect("task"));
    }
    report(
        &format!("{agents} agents x {per_agent_in_flight} in flight, rule decides"),
        samples,
        started.elapsed(),
    );

    links
}

#[tokio::main]
async fn main() {
    let synchronous = if std::env::args().any(|a| a == "normal") {
        Synchronous::Normal
    } else {
        Synchronous::Full
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::ephemeral(&[]).expect("pki");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let config = ServerConfig {
        data_dir: dir.path().join("data"),
        synchronous,
        rules: vec![RuleConfig {
            name: "bench-fetch".into(),
            action: Verdict::Allow,
            host_group: None,
            policy: Some("bench".into()),
            kind: None,
            executable: Some("/usr/bin/git".into()),
            command: Some("git fetch *".into()),
            destination: None,
            ports: None,
        }],
        ..ServerConfig::default()
    };
    let server = Server::builder(config)
        .tls(pki.tls())
        .listener(listener)
        .build()
        .await
        .expect("server");
    let endpoint = server.endpoint();
    let token = server.add_reviewer("bench", &[]).await.expect("reviewer");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async move {
        stopped.await.ok();
    }));
    println!(
        "gatekeep decision service benchmark: loopback, mutual TLS, sqlite synchronous={synchronous:?}, {} cores shared by service and clients",
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    );

    let link = agent(&pki, &endpoint, "bench-0").await;
    // Warm up connections and caches.
    round_trips(&link, 50).await;
    for count in [1, 100, 1000] {
        let (samples, elapsed) = round_trips(&link, count).await;
        report(
            &format!("round trip, rule decides, {count} in flight"),
            samples,
            elapsed,
        );
    }
    let reviewer = ReviewClient::connect(ReviewConfig {
        endpoint: endpoint.clone(),
        token,
        tls: ClientTls {
            ca_pem: pki.ca.cert_pem().to_owned(),
            identity: None,
            domain: None,
        },
        connect_timeout: Duration::from_secs(5),
    })
    .await
    .expect("reviewer");
    for count in [1, 100, 1000] {
        let (samples, elapsed) = reviewer_decisions(&link, &reviewer, count).await;
        report(
            &format!("reviewer approve -> agent, {count} pending"),
            samples,
            elapsed,
        );
    }

    let links = fleet(&pki, &endpoint).await;
    drop(links);
    drop(link);
    stop.send(()).ok();
    serving.await.expect("serve task").expect("served");
}
