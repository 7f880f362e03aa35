//! Hosts' audit logs anchored at the service (`ShipAudit`), on both stores: idempotent
//! re-sends, a different record at a stored seq recorded as a divergence (once, in the
//! service's own audit log too), gaps refused, a head that falls behind flagged as
//! truncation, shipping resumed after the service was down, and the host taken from the
//! agent's certificate.
//!
//! Agents are real mTLS gRPC clients: gatekeep-client's [`AuditShipper`] over an in-memory
//! log, or a raw `AgentServiceClient` for batches the shipper would never send.

#![expect(
    clippy::unwrap_used,
    reason = "tests (`on_both_backends!` runs each per store, which `allow-unwrap-in-tests` \
              misses)"
)]

mod support;

use std::{sync::Arc, time::Duration};

use gatekeep_audit::{ChainFields, GENESIS_HASH};
use gatekeep_client::{
    AgentLinkConfig, AuditShipper, Backoff, ClientIdentity, ClientTls, HostRecords, MemoryLog,
    ReviewClient, ReviewConfig, ShipStatus, ShipperConfig,
};
use gatekeep_proto::{
    host_audit::{HostAuditRecord, ShipBatch},
    v1::{self, agent_service_client::AgentServiceClient},
};
use gatekeep_server::{Server, ServerConfig, certs::Pki};
use support::{Backend, PATIENCE};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A valid chain of records `1..=n` as an agent named `host` writes them.
fn chain(host: &str, n: u64) -> Vec<HostAuditRecord> {
    let mut records: Vec<HostAuditRecord> = Vec::new();
    for seq in 1..=n {
        push(&mut records, host, seq);
    }
    records
}

/// Appends record `seq` (payload marked with `mark`) after the last of `records`.
fn push_marked(records: &mut Vec<HostAuditRecord>, host: &str, seq: u64, mark: &str) {
    let prev = records
        .last()
        .map_or(GENESIS_HASH.to_owned(), |r| r.hash.clone());
    let mut record = HostAuditRecord {
        seq,
        at: format!(
            "2026-12-04T10:{:02}:{:02}.{:09}Z",
            (seq / 60) % 60,
            seq % 60,
            seq
        ),
        kind: "requested".into(),
        request_id: Some(format!("r-{seq}")),
        host: host.to_owned(),
        actor: None,
        payload: format!(r#"{{"argv":["curl","https://example.org/{seq}"],"mark":"{mark}"}}"#),
        prev_hash: prev,
        hash: String::new(),
    };
    record.hash = fields(&record).hash();
    records.push(record);
}

fn push(records: &mut Vec<HostAuditRecord>, host: &str, seq: u64) {
    push_marked(records, host, seq, "");
}

fn fields(record: &HostAuditRecord) -> ChainFields<'_> {
    ChainFields {
        seq: record.seq,
        at: &record.at,
        kind: &record.kind,
        request_id: record.request_id.as_deref(),
        host: &record.host,
        actor: record.actor.as_deref(),
        payload: &record.payload,
        prev_hash: &record.prev_hash,
    }
}

/// A serving task and the switch that stops it.
type Running = (
    oneshot::Sender<()>,
    JoinHandle<Result<(), gatekeep_server::Error>>,
);

/// A service on `backend` that can be stopped and started again on the same address and
/// database (an outage).
struct Service {
    pki: Arc<Pki>,
    config: ServerConfig,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
    running: Option<Running>,
    token: String,
}

impl Service {
    async fn start(backend: Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig {
            data_dir: dir.path().join("data"),
            name: "test-service".into(),
            ..ServerConfig::default()
        };
        backend.configure(&mut config).await;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut service = Self {
            pki: Arc::new(Pki::ephemeral(&[]).unwrap()),
            config,
            addr,
            _dir: dir,
            running: None,
            token: String::new(),
        };
        service.run(listener).await;
        service
    }

    async fn run(&mut self, listener: std::net::TcpListener) {
        let server = Server::builder(self.config.clone())
            .tls(self.pki.tls())
            .listener(listener)
            .build()
            .await
            .unwrap();
        if self.token.is_empty() {
            self.token = server.add_reviewer("alice", &["sre".into()]).await.unwrap();
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            drop(stopped.await);
        }));
        self.running = Some((stop, task));
    }

    async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            stop.send(()).ok();
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("server stops")
                .unwrap()
                .unwrap();
        }
    }

    async fn restart(&mut self) {
        let listener = std::net::TcpListener::bind(self.addr).unwrap();
        self.run(listener).await;
    }

    fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn agent_tls(&self, host: &str) -> ClientTls {
        let identity = self.pki.agent(host).unwrap();
        ClientTls {
            ca_pem: self.pki.ca.cert_pem().to_owned(),
            identity: Some(ClientIdentity {
                cert_pem: identity.cert_pem,
                key_pem: identity.key_pem,
            }),
            domain: None,
        }
    }

    /// A raw agent client with `host`'s certificate (or none).
    async fn raw(&self, host: Option<&str>) -> AgentServiceClient<Channel> {
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.pki.ca.cert_pem()));
        if let Some(host) = host {
            let identity = self.pki.agent(host).unwrap();
            tls = tls.identity(Identity::from_pem(identity.cert_pem, identity.key_pem));
        }
        let channel = Endpoint::from_shared(self.endpoint())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        AgentServiceClient::new(channel)
    }

    fn shipper(&self, host: &str, log: &MemoryLog) -> AuditShipper {
        let mut link = AgentLinkConfig::new(self.endpoint(), self.agent_tls(host));
        link.backoff = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(300),
            jitter: true,
        };
        let mut config = ShipperConfig::new(link);
        config.poll = Duration::from_millis(50);
        config.diverged_retry = Duration::from_millis(200);
        AuditShipper::start(config, log.clone()).unwrap()
    }

    async fn reviewer(&self) -> ReviewClient {
        ReviewClient::connect(ReviewConfig {
            endpoint: self.endpoint(),
            token: self.token.clone(),
            tls: ClientTls {
                ca_pem: self.pki.ca.cert_pem().to_owned(),
                identity: None,
                domain: None,
            },
            connect_timeout: Duration::from_secs(5),
        })
        .await
        .unwrap()
    }
}

/// Waits until the shipper's status passes `done`.
async fn wait_for(shipper: &AuditShipper, what: &str, done: impl Fn(&ShipStatus) -> bool) {
    let mut status = shipper.status();
    tokio::time::timeout(PATIENCE, status.wait_for(|s| done(s)))
        .await
        .unwrap_or_else(|_| panic!("{what}: still {:?}", *shipper.status().borrow()))
        .unwrap();
}

fn anchored_seq(status: &ShipStatus) -> u64 {
    status.anchored.as_ref().map_or(0, |head| head.seq)
}

/// Ships `records`, reporting the last of them as the local head.
async fn ship(
    client: &mut AgentServiceClient<Channel>,
    records: &[HostAuditRecord],
) -> Result<v1::ShipAuditResponse, tonic::Status> {
    ship_with_head(client, records, records.last()).await
}

async fn ship_with_head(
    client: &mut AgentServiceClient<Channel>,
    records: &[HostAuditRecord],
    head: Option<&HostAuditRecord>,
) -> Result<v1::ShipAuditResponse, tonic::Status> {
    let local_head = head.map(|r| gatekeep_proto::host_audit::ChainPoint {
        seq: r.seq,
        hash: r.hash.clone(),
    });
    client
        .ship_audit(v1::ShipAuditRequest::from(ShipBatch {
            records: records.to_vec(),
            local_head,
        }))
        .await
        .map(tonic::Response::into_inner)
}

/// The host's export (its chain alone), as lines.
async fn host_export(service: &Service, host: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    service
        .reviewer()
        .await
        .export_audit_hosts(0, HostRecords::One(host.into()), &mut out)
        .await
        .unwrap();
    let report = gatekeep_audit::verify_export(out.as_slice()).expect("the host chain verifies");
    let lines: Vec<serde_json::Value> = out
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).unwrap())
        .collect();
    assert_eq!(report.records, lines.len() as u64);
    lines
}

async fn shipped_records_are_anchored_and_a_resend_is_idempotent(backend: Backend) {
    let mut service = Service::start(backend).await;
    let log = MemoryLog::default();
    *log.records() = chain("web-1", 1_200);
    let shipper = service.shipper("web-1", &log);
    wait_for(&shipper, "1200 records anchored", |s| {
        anchored_seq(s) == 1_200
    })
    .await;
    let head = log.records()[1_199].hash.clone();
    assert_eq!(
        shipper.status().borrow().anchored.as_ref().unwrap().hash,
        head
    );
    shipper.shutdown().await;

    // The same records again: accepted, nothing changes.
    let mut raw = service.raw(Some("web-1")).await;
    let records = log.records()[4..10].to_vec();
    let last = log.records()[1_199].clone();
    let response = ship_with_head(&mut raw, &records, Some(&last))
        .await
        .unwrap();
    assert_eq!((response.head_seq, response.divergence), (1_200, None));

    let report = service.reviewer().await.host_audit("", 0, 0).await.unwrap();
    assert_eq!(report.hosts.len(), 1);
    assert_eq!(report.hosts[0].host, "web-1");
    assert_eq!(
        (report.hosts[0].head_seq, &report.hosts[0].head_hash),
        (1_200, &head)
    );
    assert!(report.divergences.is_empty());

    let lines = host_export(&service, "web-1").await;
    assert_eq!(lines.len(), 1_200);
    assert!(lines.iter().all(|line| line["anchored_host"] == "web-1"));
    assert_eq!(lines[41]["request_id"], "r-42");

    // The full export: the service's chain, then every host's records.
    let mut all = Vec::new();
    service
        .reviewer()
        .await
        .export_audit_hosts(0, HostRecords::All, &mut all)
        .await
        .unwrap();
    let host_lines = all
        .split(|b| *b == b'\n')
        .filter(|line| line.starts_with(br#"{"anchored_host":"web-1","#))
        .count();
    assert_eq!(host_lines, 1_200);
    println!("anchored 1200 records of web-1; re-sent 6 accepted without change");
    service.stop().await;
}

async fn a_different_record_at_a_stored_seq_is_a_divergence_recorded_once(backend: Backend) {
    let mut service = Service::start(backend).await;
    let records = chain("web-1", 10);
    let mut raw = service.raw(Some("web-1")).await;
    assert_eq!(ship(&mut raw, &records).await.unwrap().head_seq, 10);

    // Record 4 rewritten (hashes recomputed from there on, as a careful attacker would).
    let mut forged = records[..3].to_vec();
    push_marked(&mut forged, "web-1", 4, "forged");
    for seq in 5..=10 {
        push(&mut forged, "web-1", seq);
    }
    for _ in 0..2 {
        let response = ship(&mut raw, &forged[3..]).await.unwrap();
        assert_eq!(response.head_seq, 10, "nothing stored past the divergence");
        let divergence = response.divergence.expect("a divergence");
        assert_eq!((divergence.seq, divergence.kind.as_str()), (4, "rewritten"));
        assert!(
            divergence
                .detail
                .contains("rewritten or rolled back at seq 4"),
            "{}",
            divergence.detail
        );
    }
    let report = service
        .reviewer()
        .await
        .host_audit("web-1", 1, 100)
        .await
        .unwrap();
    assert_eq!(report.divergences.len(), 1);
    assert_eq!(report.hashes.len(), 10);
    assert_eq!(
        report.hashes[3].hash, records[3].hash,
        "the anchored copy is kept"
    );

    // The service's own audit log says so, once.
    service.stop().await;
    let export = support::audit_export(&service.config).await;
    let diverged: Vec<serde_json::Value> = export
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice::<serde_json::Value>(line).unwrap())
        .filter(|record| record["kind"] == "host_audit_diverged")
        .collect();
    assert_eq!(diverged.len(), 1, "{diverged:?}");
    assert_eq!(diverged[0]["host"], "web-1");
    assert_eq!(diverged[0]["payload"]["seq"], 4);
    assert_eq!(diverged[0]["payload"]["kind"], "rewritten");
    println!("divergence: {}", diverged[0]["payload"]["detail"]);
}

async fn gaps_are_refused_and_a_head_behind_is_truncation(backend: Backend) {
    let mut service = Service::start(backend).await;
    let records = chain("web-1", 8);
    let mut raw = service.raw(Some("web-1")).await;
    assert_eq!(ship(&mut raw, &records[..3]).await.unwrap().head_seq, 3);

    let refused = ship(&mut raw, &records[5..]).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .contains("holds this host's log up to seq 3")
            && refused.message().contains("starts at seq 6"),
        "{}",
        refused.message()
    );
    assert_eq!(ship(&mut raw, &records[..8]).await.unwrap().head_seq, 8);

    // The host now says its log ends at seq 5: records 6 to 8 are gone.
    let truncated = raw
        .ship_audit(v1::ShipAuditRequest {
            records: Vec::new(),
            local_head_seq: 5,
            local_head_hash: records[4].hash.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let divergence = truncated.divergence.expect("truncation is flagged");
    assert_eq!((divergence.seq, divergence.kind.as_str()), (5, "truncated"));
    assert!(
        divergence.detail.contains("records 6 to 8 were removed"),
        "{}",
        divergence.detail
    );
    service.stop().await;
}

async fn shipping_resumes_after_an_outage(backend: Backend) {
    let mut service = Service::start(backend).await;
    let log = MemoryLog::default();
    *log.records() = chain("web-1", 100);
    let shipper = service.shipper("web-1", &log);
    wait_for(&shipper, "100 anchored", |s| anchored_seq(s) == 100).await;

    service.stop().await;
    {
        let mut records = log.records();
        for seq in 101..=700 {
            push(&mut records, "web-1", seq);
        }
    }
    wait_for(&shipper, "the outage is noticed", |s| s.error.is_some()).await;
    assert_eq!(anchored_seq(&shipper.status().borrow()), 100);
    service.restart().await;
    wait_for(&shipper, "700 anchored after the outage", |s| {
        anchored_seq(s) == 700 && s.error.is_none()
    })
    .await;
    shipper.shutdown().await;
    let lines = host_export(&service, "web-1").await;
    assert_eq!(lines.len(), 700, "each record once, in one chain");
    println!("resumed from seq 100 after the outage; 700 anchored, chain verifies");
    service.stop().await;
}

async fn the_host_is_the_one_the_certificate_names(backend: Backend) {
    let mut service = Service::start(backend).await;
    // Records that call themselves web-1, shipped with db-7's certificate.
    let log = MemoryLog::default();
    *log.records() = chain("web-1", 5);
    let shipper = service.shipper("db-7", &log);
    wait_for(&shipper, "5 anchored", |s| anchored_seq(s) == 5).await;
    shipper.shutdown().await;
    let report = service.reviewer().await.host_audit("", 0, 0).await.unwrap();
    let hosts: Vec<&str> = report.hosts.iter().map(|h| h.host.as_str()).collect();
    assert_eq!(hosts, ["db-7"], "attributed to the certificate's host");
    let lines = host_export(&service, "db-7").await;
    assert!(lines.iter().all(|l| l["anchored_host"] == "db-7"));
    assert_eq!(
        lines[0]["host"], "web-1",
        "the record itself is kept as written"
    );

    // web-1's own chain is untouched by db-7's batch, and db-7 cannot extend it.
    let mut as_db7 = service.raw(Some("db-7")).await;
    let response = ship(&mut as_db7, &chain("web-1", 5)).await.unwrap();
    assert_eq!((response.head_seq, response.divergence), (5, None));
    let report = service
        .reviewer()
        .await
        .host_audit("web-1", 0, 0)
        .await
        .unwrap();
    assert!(report.hosts.is_empty());

    // Without a client certificate, nothing is shipped.
    let mut anonymous = service.raw(None).await;
    let refused = ship(&mut anonymous, &chain("web-1", 1)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    service.stop().await;
}

on_both_backends!(
    shipped_records_are_anchored_and_a_resend_is_idempotent,
    a_different_record_at_a_stored_seq_is_a_divergence_recorded_once,
    gaps_are_refused_and_a_head_behind_is_truncation,
    shipping_resumes_after_an_outage,
    the_host_is_the_one_the_certificate_names,
);
