//! Host audit shipping benchmark: simulated hosts ship their audit logs (realistic records,
//! chained and hashed as gatekeep-audit does) with gatekeep-client's `AuditShipper`, over
//! mutual TLS on loopback, to a decision service on a `PostgreSQL` cluster (Debian's server
//! with its default durability, started under `target/tmp/pg` and stopped at the end).
//!
//! Prints records anchored per second and CPU per record: of the benchmark process (the
//! service, which re-hashes every record, and the simulated agents' shippers: one process)
//! and of `PostgreSQL` (from `/proc`). The logs are made before the clock starts. Asserts
//! nothing about time.
//!
//! `cargo run --release -p gatekeep-server --example bench_host_audit [-- HOSTS RECORDS]`
//! (defaults 20 hosts x 10000 records)

#[path = "../tests/support/pg.rs"]
#[expect(
    dead_code,
    reason = "the tests' cluster module; the benchmark uses part of it"
)]
mod pg;

use std::{
    fs,
    time::{Duration, Instant},
};

use gatekeep_audit::{ChainFields, GENESIS_HASH};
use gatekeep_client::{
    AgentLinkConfig, AuditShipper, ClientIdentity, ClientTls, MemoryLog, ShipperConfig,
};
use gatekeep_proto::host_audit::HostAuditRecord;
use gatekeep_server::{Server, ServerConfig, certs::Pki};

/// Longest wait for everything to be anchored; reached only when something is stuck.
const PATIENCE: Duration = Duration::from_mins(10);

/// A host's log of `n` records like the agent's `requested`/`decided`/`kernel_denied`.
fn log(host: &str, n: u64) -> MemoryLog {
    let log = MemoryLog::default();
    let mut records = log.records();
    let mut prev = GENESIS_HASH.to_owned();
    for seq in 1..=n {
        let kind = ["requested", "decided", "kernel_denied"][usize::try_from(seq % 3).unwrap_or(0)];
        let payload = format!(
            r#"{{"ancestry":[{{"exe":"/usr/bin/bash","pid":{p}}},{{"exe":"/usr/lib/systemd/systemd","pid":1}}],"argv":["curl","-s","https://api.example.org/v1/items/{seq}"],"cgroup":"/sys/fs/cgroup/agents.slice/agent-{host}.scope","exe":"/usr/bin/curl","pid":{pid},"policy":"ai-agents","rule":"egress.ask","schema":1,"uid":1000}}"#,
            p = 4000 + seq % 97,
            pid = 5000 + seq,
        );
        let mut record = HostAuditRecord {
            seq,
            at: format!(
                "2026-12-04T10:{:02}:{:02}.{:09}Z",
                (seq / 60) % 60,
                seq % 60,
                seq
            ),
            kind: kind.to_owned(),
            request_id: Some(uuid::Uuid::new_v4().to_string()),
            host: host.to_owned(),
            actor: (kind == "decided").then(|| "alice@example.org".to_owned()),
            payload,
            prev_hash: prev.clone(),
            hash: String::new(),
        };
        record.hash = ChainFields {
            seq,
            at: &record.at,
            kind: &record.kind,
            request_id: record.request_id.as_deref(),
            host: &record.host,
            actor: record.actor.as_deref(),
            payload: &record.payload,
            prev_hash: &record.prev_hash,
        }
        .hash();
        prev.clone_from(&record.hash);
        records.push(record);
    }
    drop(records);
    log
}

/// CPU time (user + system) of a process, in seconds; 0 once it is gone.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
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
fn cluster_cpu(postmaster: u32) -> f64 {
    let mut total = cpu_seconds(postmaster);
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
                total += cpu_seconds(pid);
            }
        }
    }
    total
}

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: HOSTS RECORDS"))
        .collect();
    let hosts = args.first().copied().unwrap_or(20);
    let per_host = args.get(1).copied().unwrap_or(10_000);

    let cluster = pg::start(pg::Durability::Durable).expect("PostgreSQL cluster");
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::ephemeral(&[]).expect("pki");
    let mut config = ServerConfig {
        data_dir: dir.path().join("data"),
        name: "bench".into(),
        ..ServerConfig::default()
    };
    config.store.url = Some(cluster.database().await);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = Server::builder(config)
        .tls(pki.tls())
        .listener(listener)
        .build()
        .await
        .expect("server");
    let endpoint = server.endpoint();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async move {
        stopped.await.ok();
    }));

    let logs: Vec<(String, MemoryLog)> = (0..hosts)
        .map(|n| {
            let host = format!("host-{n}");
            let log = log(&host, per_host);
            (host, log)
        })
        .collect();
    let bytes: usize = logs
        .iter()
        .flat_map(|(_, log)| {
            log.records()
                .iter()
                .map(|r| r.payload.len())
                .collect::<Vec<_>>()
        })
        .sum();
    let total = hosts * per_host;
    println!(
        "host audit shipping: {hosts} hosts x {per_host} records ({} B payload each on \
         average), one service (release build expected) on PostgreSQL {} (durable, defaults), \
         on {} cores",
        bytes / usize::try_from(total).unwrap_or(1).max(1),
        cluster.dir.display(),
        std::thread::available_parallelism().map_or(0, usize::from)
    );

    let cpu_self = cpu_seconds(std::process::id());
    let cpu_pg = cluster_cpu(cluster.pid);
    let started = Instant::now();
    let mut shippers = Vec::new();
    for (host, log) in &logs {
        let identity = pki.agent(host).expect("agent cert");
        let tls = ClientTls {
            ca_pem: pki.ca.cert_pem().to_owned(),
            identity: Some(ClientIdentity {
                cert_pem: identity.cert_pem,
                key_pem: identity.key_pem,
            }),
            domain: None,
        };
        let mut config = ShipperConfig::new(AgentLinkConfig::new(endpoint.clone(), tls));
        config.poll = Duration::from_millis(20);
        shippers.push(AuditShipper::start(config, log.clone()).expect("shipper"));
    }
    for shipper in &shippers {
        let mut status = shipper.status();
        tokio::time::timeout(
            PATIENCE,
            status.wait_for(|s| s.anchored.as_ref().is_some_and(|h| h.seq == per_host)),
        )
        .await
        .expect("everything anchored in time")
        .expect("shipper alive");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_self = cpu_seconds(std::process::id()) - cpu_self;
    let cpu_pg = cluster_cpu(cluster.pid) - cpu_pg;
    #[expect(clippy::cast_precision_loss, reason = "record counts")]
    let records = total as f64;
    println!(
        "anchored {total} records in {elapsed:.2} s: {:.0} records/s",
        records / elapsed
    );
    println!(
        "CPU per record: service + shippers {:.1} us, PostgreSQL {:.1} us, total {:.1} us",
        cpu_self / records * 1e6,
        cpu_pg / records * 1e6,
        (cpu_self + cpu_pg) / records * 1e6
    );
    for shipper in shippers {
        shipper.shutdown().await;
    }
    stop.send(()).ok();
    serving.await.expect("join").expect("served");
}
