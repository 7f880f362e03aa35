//! A host's audit log anchored at the decision service, on the real kernel: an agent in
//! remote mode ships its log to a separate `gatekeep-server`; then root on the host rewrites
//! one record of the agent's log (with every later hash recomputed, so that the log still
//! verifies by itself), or truncates it. `gatekeep audit verify --host --db` names the seq at
//! once; once the agent runs again and ships, the service flags the fork itself and records
//! it in its own audit log.

use std::{path::Path, time::Duration};

use gatekeep_tests::{
    Agent, Cgroup, Service,
    policy::{self, allow_but},
    require_vm,
    review::Reviewer as _,
    wait_for,
    workload::{run_in, tool},
};
use serde_json::Value;

/// How long anything in the flow may take under software emulation.
const PATIENCE: Duration = Duration::from_mins(2);

/// `gatekeep --output json audit verify --host HOST [--db DB]` at `service`: its verdict
/// and whether the command succeeded.
fn verdict(service: &Service, host: &str, db: Option<&Path>) -> (bool, Value) {
    let db = db.map(|db| db.to_string_lossy().into_owned());
    let mut args = vec!["--output", "json", "audit", "verify", "--host", host];
    if let Some(db) = &db {
        args.extend(["--db", db.as_str()]);
    }
    let (ok, out, err) = service.cli(&args);
    let value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("audit verify --host json ({e}): {out}{err}"));
    (ok, value)
}

/// An agent gated by a policy that denies one tool, shipping to `service` as `host`, after
/// three denials; returns once the service anchored its whole log.
fn shipping_agent(service: &Service, name: &str, host: &str) -> (Cgroup, Agent) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = tool(dir.path(), "bad-tool");
    let cgroup_name = format!("gk-{name}");
    let cgroup = Cgroup::create(&cgroup_name);
    let agent = Agent::start_with(
        name,
        &policy::exec(&cgroup_name, &allow_but("deny", &bad), ""),
        &service.decision_config(host),
    );
    for _ in 0..3 {
        let denied = run_in(&cgroup, &["exec", &bad, "true"], Duration::from_secs(30));
        assert_eq!(denied.code, 111, "the kernel denies the tool");
    }
    agent.wait_record("kernel_denied", PATIENCE, |_| true);
    let head = last_seq(&agent);
    wait_for("the service to anchor the agent's log", PATIENCE, || {
        let (_, value) = verdict(service, host, None);
        (value["anchored_seq"].as_u64() >= Some(head)).then_some(())
    });
    (cgroup, agent)
}

fn last_seq(agent: &Agent) -> u64 {
    agent
        .audit_records()
        .last()
        .and_then(|r| r["seq"].as_u64())
        .expect("the agent's log has records")
}

/// The `host_audit_diverged` records of the service's own audit log for `host`.
fn recorded_divergences(service: &Service, host: &str) -> Vec<Value> {
    service
        .service_audit()
        .into_iter()
        .filter(|r| r["kind"] == "host_audit_diverged" && r["host"] == host)
        .collect()
}

/// Rewrites record `seq`'s payload in the closed log at `db`, and every later record's
/// hashes, as root could: the log still verifies on its own.
fn rewrite_with_fresh_hashes(db: &Path, seq: u64) {
    let conn = rusqlite::Connection::open(db).expect("open the audit db");
    conn.execute_batch("DROP TRIGGER IF EXISTS audit_records_no_update;")
        .expect("drop the guard");
    let mut prev: String = conn
        .query_row(
            "SELECT hash FROM audit_records WHERE seq = ?1",
            [i64::try_from(seq - 1).expect("seq")],
            |r| r.get(0),
        )
        .expect("the hash before");
    #[expect(clippy::type_complexity, reason = "one row of the audit table")]
    let rows: Vec<(
        i64,
        String,
        String,
        Option<String>,
        String,
        Option<String>,
        String,
    )> = conn
        .prepare(
            "SELECT seq, at, kind, request_id, host, actor, payload FROM audit_records \
             WHERE seq >= ?1 ORDER BY seq",
        )
        .expect("select")
        .query_map([i64::try_from(seq).expect("seq")], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows");
    for (n, at, kind, request_id, host, actor, payload) in rows {
        let payload = if n == i64::try_from(seq).expect("seq") {
            payload.replace("bad-tool", "good-tool")
        } else {
            payload
        };
        let hash = gatekeep_audit::ChainFields {
            seq: u64::try_from(n).expect("seq"),
            at: &at,
            kind: &kind,
            request_id: request_id.as_deref(),
            host: &host,
            actor: actor.as_deref(),
            payload: &payload,
            prev_hash: &prev,
        }
        .hash();
        conn.execute(
            "UPDATE audit_records SET payload = ?1, prev_hash = ?2, hash = ?3 WHERE seq = ?4",
            rusqlite::params![payload, prev, hash, n],
        )
        .expect("rewrite");
        prev = hash;
    }
}

#[test]
fn a_rewritten_host_audit_log_is_detected_at_the_service() {
    require_vm();
    let service = Service::start(17481);
    let (_cgroup, mut agent) = shipping_agent(&service, "host-audit-rewrite", "vm-rewrite");
    let (ok, value) = verdict(&service, "vm-rewrite", Some(&agent.audit_db()));
    assert!(ok, "an untouched log matches what it shipped: {value}");
    assert_eq!(value["local"]["outcome"], "matches");
    assert!(agent.stop(), "clean stop");

    // Root rewrites the first denial ("bad-tool" becomes "good-tool"), hashes and all.
    let denial = agent
        .audit_records()
        .iter()
        .find(|r| r["kind"] == "kernel_denied")
        .and_then(|r| r["seq"].as_u64())
        .expect("a denial");
    rewrite_with_fresh_hashes(&agent.audit_db(), denial);
    let (ok, out, err) = agent.admin(&["audit", "verify"]);
    assert!(ok, "the forged log verifies by itself: {out}{err}");

    // On the host: the comparison with the anchored copy names the record.
    let (ok, value) = verdict(&service, "vm-rewrite", Some(&agent.audit_db()));
    assert!(!ok, "a rewritten log fails: {value}");
    assert_eq!(value["local"]["outcome"], "rewritten");
    assert_eq!(value["local"]["seq"], denial);
    let (_, out, _) = service.cli(&[
        "audit",
        "verify",
        "--host",
        "vm-rewrite",
        "--db",
        &agent.audit_db().to_string_lossy(),
    ]);
    eprintln!("gatekeep audit verify --host --db:\n{out}");
    assert!(out.contains(&format!("REWRITTEN at seq {denial}")), "{out}");

    // The agent runs again and ships: the service sees the fork itself.
    agent.launch();
    let divergence = wait_for("the service to flag the rewritten log", PATIENCE, || {
        let (ok, value) = verdict(&service, "vm-rewrite", None);
        let first = value["recorded"].as_array()?.first()?.clone();
        assert!(!ok, "a flagged host fails `audit verify --host`");
        Some(first)
    });
    eprintln!("the service recorded: {divergence}");
    assert_eq!(divergence[1], "rewritten");
    let anchored = verdict(&service, "vm-rewrite", None).1["anchored_seq"]
        .as_u64()
        .expect("anchored seq");
    let seq = divergence[0].as_u64().expect("seq");
    assert!(
        (denial..=anchored).contains(&seq),
        "{seq} in {denial}..={anchored}"
    );
    let recorded = recorded_divergences(&service, "vm-rewrite");
    assert!(!recorded.is_empty(), "in the service's audit log");
    assert_eq!(recorded[0]["payload"]["seq"], seq);
}

#[test]
fn a_truncated_host_audit_log_is_detected() {
    require_vm();
    let service = Service::start(17482);
    let (_cgroup, mut agent) = shipping_agent(&service, "host-audit-truncate", "vm-truncate");
    assert!(agent.stop(), "clean stop");
    let anchored = verdict(&service, "vm-truncate", None).1["anchored_seq"]
        .as_u64()
        .expect("anchored seq");
    // agent_started, policy_loaded and the denials (one record per burst).
    assert!(
        anchored >= 3,
        "at least the start, the policy and a denial: {anchored}"
    );

    // Root removes the last two anchored records (and whatever followed).
    let keep = anchored - 2;
    let conn = rusqlite::Connection::open(agent.audit_db()).expect("open the audit db");
    conn.execute_batch(&format!(
        "DROP TRIGGER IF EXISTS audit_records_no_delete; DELETE FROM audit_records WHERE seq > {keep};"
    ))
    .expect("truncate");
    drop(conn);
    let (ok, out, err) = agent.admin(&["audit", "verify"]);
    assert!(ok, "a truncated log verifies by itself: {out}{err}");

    let (ok, value) = verdict(&service, "vm-truncate", Some(&agent.audit_db()));
    assert!(!ok, "a truncated log fails: {value}");
    assert_eq!(value["local"]["outcome"], "truncated");
    assert_eq!(value["local"]["local_seq"], keep);
    let (_, out, _) = service.cli(&[
        "audit",
        "verify",
        "--host",
        "vm-truncate",
        "--db",
        &agent.audit_db().to_string_lossy(),
    ]);
    eprintln!("gatekeep audit verify --host --db:\n{out}");
    assert!(
        out.contains(&format!("TRUNCATED: the local log ends at seq {keep}")),
        "{out}"
    );

    // The agent starts again and writes on from seq `keep`: the service sees that its
    // log went back behind what it shipped.
    agent.launch();
    let divergence = wait_for("the service to flag the truncated log", PATIENCE, || {
        let (_, value) = verdict(&service, "vm-truncate", None);
        value["recorded"].as_array()?.first().cloned()
    });
    eprintln!("the service recorded: {divergence}");
    let seq = divergence[0].as_u64().expect("seq");
    assert!(
        seq > keep && seq <= anchored,
        "{seq} in {keep}..={anchored}"
    );
    assert!(
        divergence[2]
            .as_str()
            .is_some_and(|detail| detail.contains("rolled back")),
        "{divergence}"
    );
    assert!(!recorded_divergences(&service, "vm-truncate").is_empty());
}
