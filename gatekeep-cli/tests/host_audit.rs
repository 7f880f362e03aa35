//! `gatekeep audit verify --host` against an in-process decision service that anchored a
//! host's log: a record rewritten in place, a rewrite with fresh hashes, and a truncation of
//! the local log are each named with their seq and fail the command; the service flags a
//! truncated host that ships again, and its export carries the host's records.

use std::{path::Path, process::Output, time::Duration};

use gatekeep_audit::{AuditReader, AuditRecord, AuditStore, ChainFields, RecordKind};
use gatekeep_client::{
    AgentLinkConfig, AuditShipper, ClientIdentity, ClientTls, LocalLog, ShipperConfig,
};
use gatekeep_proto::host_audit::{ChainPoint, HostAuditRecord};
use gatekeep_server::{Server, ServerConfig, certs::Pki};
use rusqlite::Connection;

const PATIENCE: Duration = Duration::from_secs(20);

/// The agent's log as its shipper reads it (gatekeep-agent's reader, in a few lines).
struct DbLog(std::path::PathBuf);

impl LocalLog for DbLog {
    fn head(&mut self) -> Result<Option<ChainPoint>, String> {
        let reader = AuditReader::open(&self.0).map_err(|e| e.to_string())?;
        Ok(reader
            .head()
            .map_err(|e| e.to_string())?
            .map(|head| ChainPoint {
                seq: head.seq,
                hash: head.hash,
            }))
    }

    fn read_from(
        &mut self,
        from_seq: u64,
        limit: usize,
        bytes: usize,
    ) -> Result<Vec<HostAuditRecord>, String> {
        let reader = AuditReader::open(&self.0).map_err(|e| e.to_string())?;
        Ok(reader
            .read_from(from_seq, limit, bytes)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|r| HostAuditRecord {
                seq: r.seq,
                at: r.at,
                kind: r.kind,
                request_id: r.request_id,
                host: r.host,
                actor: r.actor,
                payload: r.payload,
                prev_hash: r.prev_hash,
                hash: r.hash,
            })
            .collect())
    }
}

struct Env {
    dir: tempfile::TempDir,
    pki: Pki,
    endpoint: String,
    token: String,
}

impl Env {
    async fn run(&self, args: &[&str]) -> Output {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gatekeep"));
        command
            .args(args)
            .env("GATEKEEP_SERVER", &self.endpoint)
            .env("GATEKEEP_TOKEN", &self.token)
            .env("GATEKEEP_CA", self.dir.path().join("ca.pem"))
            .env("XDG_CONFIG_HOME", self.dir.path());
        tokio::task::spawn_blocking(move || command.output().expect("run gatekeep"))
            .await
            .expect("join")
    }

    /// Ships the log at `db` as host `web-1` until the service holds `seq` (or reports a
    /// divergence, with `diverges`).
    async fn ship(&self, db: &Path, seq: u64, diverges: bool) {
        let identity = self.pki.agent("web-1").expect("agent cert");
        let tls = ClientTls {
            ca_pem: self.pki.ca.cert_pem().to_owned(),
            identity: Some(ClientIdentity {
                cert_pem: identity.cert_pem,
                key_pem: identity.key_pem,
            }),
            domain: None,
        };
        let mut config = ShipperConfig::new(AgentLinkConfig::new(self.endpoint.clone(), tls));
        config.poll = Duration::from_millis(50);
        let shipper = AuditShipper::start(config, DbLog(db.to_owned())).expect("shipper");
        let mut status = shipper.status();
        tokio::time::timeout(
            PATIENCE,
            status.wait_for(|s| {
                if diverges {
                    s.divergence.is_some()
                } else {
                    s.anchored.as_ref().is_some_and(|h| h.seq == seq)
                }
            }),
        )
        .await
        .expect("shipped in time")
        .expect("shipper alive");
        shipper.shutdown().await;
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A copy of the (closed) log at `db`, changed by `sql` with the append-only triggers off.
fn tampered(db: &Path, name: &str, sql: &str) -> std::path::PathBuf {
    let copy = db.with_file_name(name);
    std::fs::copy(db, &copy).expect("copy the log");
    let conn = Connection::open(&copy).expect("open the copy");
    conn.execute_batch(&format!(
        "DROP TRIGGER audit_records_no_update; DROP TRIGGER audit_records_no_delete; {sql}"
    ))
    .expect("tamper");
    copy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one story: the log shipped, then tampered with three ways and shipped again"
)]
async fn a_rewritten_or_truncated_host_log_is_named_at_its_seq_and_fails() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::ephemeral(&[]).expect("pki");
    std::fs::write(dir.path().join("ca.pem"), pki.ca.cert_pem()).expect("write ca");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let config = ServerConfig {
        data_dir: dir.path().join("data"),
        ..ServerConfig::default()
    };
    let server = Server::builder(config)
        .tls(pki.tls())
        .listener(listener)
        .build()
        .await
        .expect("server");
    let endpoint = server.endpoint();
    let token = server
        .add_reviewer("alice", &["sre".into()])
        .await
        .expect("reviewer");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async move {
        stopped.await.ok();
    }));
    let env = Env {
        dir,
        pki,
        endpoint,
        token,
    };

    // The host's log: 20 records, all shipped.
    let db = env.dir.path().join("audit.db");
    {
        let mut store = AuditStore::open(&db).expect("log");
        let records: Vec<AuditRecord> = (0..20)
            .map(|i| {
                AuditRecord::new(
                    RecordKind::KernelDenied,
                    "web-1",
                    serde_json::json!({"exe": "/usr/bin/curl", "n": i}),
                )
            })
            .collect();
        store.append_batch(&records).expect("append");
    }
    env.ship(&db, 20, false).await;
    let db_text = db.to_string_lossy().into_owned();

    let ok = env
        .run(&["audit", "verify", "--host", "web-1", "--db", &db_text])
        .await;
    assert!(
        ok.status.success(),
        "{}{}",
        text(&ok.stdout),
        text(&ok.stderr)
    );
    assert!(
        text(&ok.stdout).contains("matches every anchored record; 0 not shipped yet"),
        "{}",
        text(&ok.stdout)
    );

    // Rewritten in place (the hashes left as they were).
    let in_place = tampered(
        &db,
        "in-place.db",
        r#"UPDATE audit_records SET payload = '{"exe":"/bin/true","n":6}' WHERE seq = 7"#,
    );
    let out = env
        .run(&[
            "audit",
            "verify",
            "--host",
            "web-1",
            "--db",
            &in_place.to_string_lossy(),
        ])
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("REWRITTEN at seq 7"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("host `web-1`'s audit log diverges"),
        "{}",
        text(&out.stderr)
    );

    // Rewritten with fresh hashes from seq 7 on: the local chain verifies, the anchored
    // copy does not match.
    let fresh = tampered(&db, "fresh.db", "SELECT 1");
    {
        let conn = Connection::open(&fresh).expect("open");
        let mut rows: Vec<(i64, String, String, String, String)> = conn
            .prepare("SELECT seq, at, kind, host, payload FROM audit_records ORDER BY seq")
            .expect("select")
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("rows");
        rows[6].4 = r#"{"exe":"/bin/true","n":6}"#.into();
        let mut prev: String = conn
            .query_row("SELECT hash FROM audit_records WHERE seq = 6", [], |r| {
                r.get(0)
            })
            .expect("hash 6");
        for (seq, at, kind, host, payload) in &rows[6..] {
            let hash = ChainFields {
                seq: u64::try_from(*seq).expect("seq"),
                at,
                kind,
                request_id: None,
                host,
                actor: None,
                payload,
                prev_hash: &prev,
            }
            .hash();
            conn.execute(
                "UPDATE audit_records SET payload = ?1, prev_hash = ?2, hash = ?3 WHERE seq = ?4",
                rusqlite::params![payload, prev, hash, seq],
            )
            .expect("rewrite");
            prev = hash;
        }
    }
    assert!(
        gatekeep_audit::verify(&fresh).is_ok(),
        "the forged chain verifies alone"
    );
    let out = env
        .run(&[
            "audit",
            "verify",
            "--host",
            "web-1",
            "--db",
            &fresh.to_string_lossy(),
        ])
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("REWRITTEN at seq 7: the local record hashes to"),
        "{}",
        text(&out.stdout)
    );

    // Truncated: records 16 to 20 removed.
    let truncated = tampered(
        &db,
        "truncated.db",
        "DELETE FROM audit_records WHERE seq > 15",
    );
    let out = env
        .run(&[
            "audit",
            "verify",
            "--host",
            "web-1",
            "--db",
            &truncated.to_string_lossy(),
        ])
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("TRUNCATED: the local log ends at seq 15")
            && text(&out.stdout).contains("records 16 to 20 were removed"),
        "{}",
        text(&out.stdout)
    );

    // The truncated host ships again: the service flags it, and says so without --db.
    env.ship(&truncated, 0, true).await;
    let out = env.run(&["audit", "verify", "--host", "web-1"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("DIVERGED (truncated at seq 15), seen by the service"),
        "{}",
        text(&out.stdout)
    );
    let out = env
        .run(&["--output", "json", "audit", "verify", "--host", "web-1"])
        .await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["diverged"], true);
    assert_eq!(json["anchored_seq"], 20);

    // One export: the service's chain (with the divergence), then the host's records.
    let out = env.run(&["audit", "export", "--all-hosts"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let export = text(&out.stdout);
    assert!(
        export.contains(r#""kind":"host_audit_diverged""#),
        "{export}"
    );
    assert_eq!(
        export
            .lines()
            .filter(|l| l.starts_with(r#"{"anchored_host":"web-1","seq":"#))
            .count(),
        20
    );
    println!("{}", text(&out.stdout).lines().next().unwrap_or_default());

    stop.send(()).ok();
    serving.await.expect("join").expect("served");
}
