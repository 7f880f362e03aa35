//! Issue 23's host-audit shipping figure: simulated hosts ship their audit logs (realistic
//! records, chained and hashed as gatekeep-audit does) with gatekeep-client's
//! `AuditShipper`, over mutual TLS on loopback, to one `gatekeep-server` (the binary next
//! to this one, a process of its own) on the `PostgreSQL` cluster the native benchmarks
//! share (Debian's server at its default durability: every commit flushed).
//!
//! Records anchored per second (the service checks each batch against the host's chain,
//! re-hashing every record, and appends it), and CPU per record of the service, of
//! `PostgreSQL` and of the shippers (this process), from `/proc`. The logs are made before
//! the clock starts. Each round ships the logs of hosts the service has not seen yet.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use gatekeep_audit::{ChainFields, GENESIS_HASH};
use gatekeep_client::{
    AgentLinkConfig, AuditShipper, ClientIdentity, ClientTls, MemoryLog, ShipperConfig,
};
use gatekeep_proto::host_audit::HostAuditRecord;
use gatekeep_server::certs::Pki;

use super::{cluster_pids, cpu_of, pg};
use crate::{
    report::{Figure, Target, per_second},
    server::ServerProcess,
};

/// Longest wait for a round's records to be anchored; reached only when something is stuck.
const PATIENCE: Duration = Duration::from_mins(5);

/// How much to ship.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub hosts: u64,
    pub records_per_host: u64,
    pub rounds: usize,
}

impl Sizes {
    /// The smoke sizes (about a second of shipping) or the full ones.
    #[must_use]
    pub fn of(smoke: bool) -> Self {
        if smoke {
            Self {
                hosts: 4,
                records_per_host: 5_000,
                rounds: 1,
            }
        } else {
            Self {
                hosts: 20,
                records_per_host: 10_000,
                rounds: 3,
            }
        }
    }
}

/// A host's log of `n` records like the agent's `requested` / `decided` / `kernel_denied`,
/// chained from the genesis hash.
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

/// One round: `sizes.hosts` new hosts ship their logs at once; returns records/s and the
/// CPU seconds of the service (`service`), `PostgreSQL` (`postmaster` and its children)
/// and this process.
async fn round(
    pki: &Pki,
    endpoint: &str,
    (service, postmaster): (u32, u32),
    sizes: Sizes,
    round: usize,
) -> Result<(f64, [f64; 3])> {
    let logs: Vec<(String, MemoryLog)> = (0..sizes.hosts)
        .map(|n| {
            let host = format!("host-{round}-{n}");
            let log = log(&host, sizes.records_per_host);
            (host, log)
        })
        .collect();
    // The cluster's processes are listed at each sample: a backend the service opens
    // during the round counts whole (all its CPU time is the round's).
    let sample = || {
        [
            cpu_of(&[service]),
            cpu_of(&cluster_pids(postmaster)),
            cpu_of(&[std::process::id()]),
        ]
    };
    let before = sample();
    let started = Instant::now();
    let mut shippers = Vec::with_capacity(logs.len());
    for (host, log) in &logs {
        let identity = pki.agent(host)?;
        let tls = ClientTls {
            ca_pem: pki.ca.cert_pem().to_owned(),
            identity: Some(ClientIdentity {
                cert_pem: identity.cert_pem,
                key_pem: identity.key_pem,
            }),
            domain: None,
        };
        let mut config = ShipperConfig::new(AgentLinkConfig::new(endpoint, tls));
        config.poll = Duration::from_millis(20);
        shippers.push(AuditShipper::start(config, log.clone())?);
    }
    for shipper in &shippers {
        let mut status = shipper.status();
        tokio::time::timeout(
            PATIENCE,
            status.wait_for(|s| {
                s.anchored
                    .as_ref()
                    .is_some_and(|head| head.seq == sizes.records_per_host)
            }),
        )
        .await
        .context("a host's records were not all anchored in time")?
        .context("a shipper stopped")?;
    }
    let elapsed = started.elapsed();
    let after = sample();
    for shipper in shippers {
        shipper.shutdown().await;
    }
    let total = usize::try_from(sizes.hosts * sizes.records_per_host)?;
    Ok((
        per_second(total, elapsed),
        [0, 1, 2].map(|i| after[i] - before[i]),
    ))
}

/// Runs the shipping benchmark against a service on `cluster` and returns its figures.
pub async fn figures(
    server: &Path,
    base: &Path,
    cluster: &pg::Cluster,
    sizes: Sizes,
) -> Result<Vec<Figure>> {
    let dir = tempfile::Builder::new()
        .prefix("gk-bench-host-audit-")
        .tempdir_in(base)?;
    let pki = Pki::load_or_init(&dir.path().join("tls"), &[])?;
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let config = format!(
        "name = \"bench\"\n[store]\nurl = \"{}\"\npool_size = 16\n",
        cluster.database().await
    );
    let service = ServerProcess::start(server, dir.path(), &config, listen, "warn")?;
    let endpoint = format!("https://{listen}");
    let mut rates = Vec::with_capacity(sizes.rounds);
    let mut cpu = [Vec::new(), Vec::new(), Vec::new()];
    let records = sizes.hosts * sizes.records_per_host;
    #[expect(clippy::cast_precision_loss, reason = "a record count for a ratio")]
    let per_record = |seconds: f64| seconds / records as f64 * 1e6;
    for n in 0..sizes.rounds {
        let (rate, seconds) =
            round(&pki, &endpoint, (service.pid(), cluster.pid), sizes, n).await?;
        rates.push(rate);
        for (i, seconds) in seconds.into_iter().enumerate() {
            cpu[i].push(per_record(seconds));
        }
    }
    service.stop()?;
    ensure!(!rates.is_empty(), "no round ran");
    let sample = log("host-sample", 100);
    let payload = sample
        .records()
        .iter()
        .map(|r| r.payload.len())
        .sum::<usize>()
        / 100;
    let conditions = format!(
        "{} hosts x {} records each ({payload} B of payload on average), shipped at once by AuditShipper \
         over mutual TLS to one gatekeep-server on PostgreSQL (default durability), all on \
         this machine's {} cores; {} round(s) of new hosts",
        sizes.hosts,
        sizes.records_per_host,
        std::thread::available_parallelism().map_or(0, usize::from),
        sizes.rounds
    );
    let cpu_figure = |id: &str, what: &str, runs: &[f64]| {
        Figure::from_runs(
            id,
            &format!("host-audit shipping, CPU per record, {what}"),
            "us",
            runs,
        )
        .conditions(conditions.clone())
    };
    Ok(vec![
        Figure::from_runs(
            "native.host_audit.records_per_s",
            "host-audit shipping, records anchored/s into PostgreSQL",
            "records/s",
            &rates,
        )
        .target(Target::at_least(20_000.0))
        .conditions(conditions.clone()),
        cpu_figure("native.host_audit.cpu_us.service", "the service", &cpu[0]),
        cpu_figure("native.host_audit.cpu_us.postgres", "PostgreSQL", &cpu[1]),
        cpu_figure("native.host_audit.cpu_us.shippers", "the shippers", &cpu[2]),
    ])
}
