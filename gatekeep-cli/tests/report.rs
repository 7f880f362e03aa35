//! `gatekeep report` on a service audit log with known contents (written through the audit
//! writer, in the service's record schema): the figures of every format, and the refusal of a
//! tampered log.

#![expect(
    clippy::too_many_arguments,
    clippy::too_many_lines,
    reason = "the known log is spelled out record by record, each with all its fields"
)]

use std::{path::Path, process::Output};

use gatekeep_audit::{AuditRecord, AuditWriter, RecordKind, WriterConfig};
use serde_json::{Value, json};
use time::{OffsetDateTime, macros::datetime};

const DEPLOY: &str = "deploy";
/// A policy name with HTML in it: the page must show it as text.
const ODD: &str = "<b>ops</b>&co";

fn record(
    kind: RecordKind,
    at: OffsetDateTime,
    request: u32,
    actor: &str,
    payload: Value,
) -> AuditRecord {
    AuditRecord::new(kind, "web-1", payload)
        .with_request_id(format!("00000000-0000-4000-8000-{request:012}"))
        .with_actor(actor)
        .with_at(at)
}

fn requested(at: OffsetDateTime, request: u32, policy: &str) -> AuditRecord {
    record(
        RecordKind::Requested,
        at,
        request,
        "agent:web-1",
        json!({"schema": 1, "request": {"policy": policy, "argv": ["curl", "<script>"]}}),
    )
}

fn outcome(
    kind: RecordKind,
    at: OffsetDateTime,
    request: u32,
    actor: &str,
    policy: &str,
    state: &str,
    voters: &[&str],
    wait_ms: u64,
    is_final: bool,
) -> AuditRecord {
    let approvals: Vec<Value> = voters
        .iter()
        .map(|reviewer| json!({"reviewer": reviewer, "reason": "", "duration": "once"}))
        .collect();
    record(
        kind,
        at,
        request,
        actor,
        json!({
            "schema": 1, "policy": policy, "kind": "exec", "state": state,
            "reason": "", "approvals": approvals, "wait_ms": wait_ms, "final": is_final,
        }),
    )
}

/// Writes the known log; returns the path of its database.
fn known_log(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("audit.db");
    let writer = AuditWriter::open(&path, WriterConfig::default()).expect("open the audit log");
    let day = datetime!(2026-03-02 10:00 UTC);
    let minute = time::Duration::minutes(1);
    let mut records = Vec::new();
    // deploy: five requests; r1 approved by alice and bob (1 s), r2 by alice (3 s) with a
    // grant that is revoked later, r3 denied by carol (2 s), r4 expired (5 min, not a
    // decision), r5 got a vote from bob (not final) and a refused self-approval by alice.
    for request in 1..=5_u32 {
        records.push(requested(
            day + minute * i32::try_from(request).expect("small"),
            request,
            DEPLOY,
        ));
    }
    let at = day + minute * 10;
    records.push(outcome(
        RecordKind::Decided,
        at,
        1,
        "alice",
        DEPLOY,
        "pending",
        &["alice"],
        500,
        false,
    ));
    records.push(outcome(
        RecordKind::Decided,
        at,
        1,
        "alice,bob",
        DEPLOY,
        "approved",
        &["alice", "bob"],
        1000,
        true,
    ));
    records.push(outcome(
        RecordKind::Decided,
        at,
        2,
        "alice",
        DEPLOY,
        "approved",
        &["alice"],
        3000,
        true,
    ));
    records.push(record(
        RecordKind::GrantInstalled,
        at,
        2,
        "alice",
        json!({"schema": 1, "grant": {"policy": DEPLOY, "created_by": "alice"}}),
    ));
    records.push(outcome(
        RecordKind::Decided,
        at,
        3,
        "carol",
        DEPLOY,
        "denied",
        &[],
        2000,
        true,
    ));
    records.push(outcome(
        RecordKind::Expired,
        at,
        4,
        "timeout",
        DEPLOY,
        "expired",
        &[],
        300_000,
        true,
    ));
    records.push(outcome(
        RecordKind::Decided,
        at,
        5,
        "bob",
        DEPLOY,
        "pending",
        &["bob"],
        700,
        false,
    ));
    records.push(record(
        RecordKind::ApprovalRefused,
        at,
        5,
        "alice",
        json!({"schema": 1, "policy": DEPLOY, "kind": "exec", "cause": "self_approval", "reason": "owns it"}),
    ));
    records.push(record(
        RecordKind::GrantRevoked,
        at + minute,
        2,
        "dave",
        json!({"schema": 1, "grant": {"policy": DEPLOY}, "by": "dave", "reason": "done"}),
    ));
    // bulk: twenty approvals by dave, 100 ms to 2000 ms: median 1000, p95 1900.
    for i in 1..=20_u32 {
        let request = 100 + i;
        records.push(requested(day + minute * 20, request, "bulk"));
        records.push(outcome(
            RecordKind::Decided,
            day + minute * 21,
            request,
            "dave",
            "bulk",
            "approved",
            &["dave"],
            u64::from(i) * 100,
            true,
        ));
    }
    // The odd name: approved by a server rule, no votes.
    records.push(requested(day + minute * 30, 200, ODD));
    records.push(outcome(
        RecordKind::Decided,
        day + minute * 30,
        200,
        "rule:ci",
        ODD,
        "approved",
        &[],
        5,
        true,
    ));
    // Outside the window (April): not counted.
    records.push(requested(datetime!(2026-04-02 10:00 UTC), 300, DEPLOY));
    for record in records {
        writer.submit(record).expect("submit");
    }
    writer.shutdown().expect("flush the audit log");
    path
}

fn gatekeep(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_gatekeep"))
        .args(args)
        .env_remove("GATEKEEP_SERVER")
        .env_remove("GATEKEEP_TOKEN")
        .output()
        .expect("run gatekeep")
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "gatekeep failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("utf-8")
}

const MARCH: [&str; 4] = ["--from", "2026-03-01", "--to", "2026-03-31"];

fn report(db: &Path, format: &str) -> String {
    let db = db.to_str().expect("utf-8 path");
    ok(&gatekeep(
        &[&["report", "--db", db, "--format", format][..], &MARCH[..]].concat(),
    ))
}

#[test]
fn the_report_sums_a_known_log_in_every_format() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = known_log(dir.path());

    // JSON: every figure.
    let doc: Value = serde_json::from_str(&report(&db, "json")).expect("json report");
    println!("{}", serde_json::to_string_pretty(&doc).expect("json"));
    assert_eq!(doc["chain"]["records"], 57, "the whole chain was verified");
    assert_eq!(doc["chain"]["head_seq"], 57);
    let policies = doc["policies"].as_array().expect("policies");
    let names: Vec<&str> = policies
        .iter()
        .map(|p| p["policy"].as_str().expect("name"))
        .collect();
    assert_eq!(names, [ODD, "bulk", DEPLOY]);
    let deploy = &policies[2];
    assert_eq!(
        deploy["requests"], 5,
        "the April request is outside the window"
    );
    assert_eq!(deploy["approved"], 2);
    assert_eq!(
        deploy["approvals_by_reviewer"],
        json!({"alice": 2, "bob": 1})
    );
    assert_eq!(deploy["denied"], 1);
    assert_eq!(deploy["expired"], 1);
    assert_eq!(deploy["cancelled"], 0);
    assert_eq!(
        deploy["time_to_decision"],
        json!({"decisions": 3, "median_ms": 2000, "p95_ms": 3000}),
        "approvals and denials only; the expiry is not a decision"
    );
    assert_eq!(deploy["self_approvals_refused"], 1);
    assert_eq!(deploy["grants_created"], 1);
    assert_eq!(deploy["grants_revoked"], 1);
    let bulk = &policies[1];
    assert_eq!(bulk["requests"], 20);
    assert_eq!(bulk["approvals_by_reviewer"], json!({"dave": 20}));
    assert_eq!(
        bulk["time_to_decision"],
        json!({"decisions": 20, "median_ms": 1000, "p95_ms": 1900})
    );
    assert_eq!(policies[0]["approvals_by_reviewer"], json!({"rule:ci": 1}));

    // CSV: a header and one properly quoted row per policy.
    let csv_text = report(&db, "csv");
    println!("{csv_text}");
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let header = reader.headers().expect("header").clone();
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("row")).collect();
    assert_eq!(rows.len(), 3);
    let column = |row: &csv::StringRecord, name: &str| {
        let index = header.iter().position(|h| h == name).expect("a column");
        row[index].to_owned()
    };
    assert_eq!(column(&rows[0], "policy"), ODD);
    assert_eq!(column(&rows[2], "approvals_by_reviewer"), "alice=2; bob=1");
    assert_eq!(column(&rows[2], "median_ms"), "2000");
    assert_eq!(column(&rows[1], "p95_ms"), "1900");
    assert_eq!(column(&rows[2], "self_approvals_refused"), "1");
    assert_eq!(column(&rows[2], "grants_revoked"), "1");
    assert_eq!(column(&rows[2], "chain_head_seq"), "57");

    // HTML: self-contained, the odd name escaped, never raw.
    let out = dir.path().join("report.html");
    let db_arg = db.to_str().expect("utf-8 path");
    let out_arg = out.to_str().expect("utf-8 path");
    ok(&gatekeep(
        &[
            &[
                "report", "--db", db_arg, "--format", "html", "--out", out_arg,
            ][..],
            &MARCH[..],
        ]
        .concat(),
    ));
    let page = std::fs::read_to_string(&out).expect("the page");
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains("&lt;b&gt;ops&lt;/b&gt;&amp;co"), "{page}");
    assert!(
        !page.contains("<b>ops</b>"),
        "a policy name reached the page raw"
    );
    assert!(!page.contains("<script"), "no script, and argv never shown");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "nothing fetched"
    );
    assert!(page.contains("<td>dave</td><td>20</td>"), "{page}");
    assert!(page.contains("<td>2000 ms</td><td>3000 ms</td>"), "{page}");

    // The same figures from a JSON Lines export of the log.
    let export = dir.path().join("audit.jsonl");
    let lines = ok(&gatekeep(&["audit", "export", "--db", db_arg]));
    std::fs::write(&export, lines).expect("write the export");
    let from_export: Value = serde_json::from_str(&ok(&gatekeep(
        &[
            &["report", "--input", export.to_str().expect("utf-8")][..],
            &MARCH[..],
        ]
        .concat(),
    )))
    .expect("json report");
    assert_eq!(from_export["policies"], doc["policies"]);
}

#[test]
fn a_tampered_log_is_refused_with_no_report() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = known_log(dir.path());
    let db_arg = db.to_str().expect("utf-8 path").to_owned();

    // An export whose line was edited (carol's denial turned into alice's approval).
    let lines = ok(&gatekeep(&["audit", "export", "--db", &db_arg]));
    let edited = lines.replacen("\"actor\":\"carol\"", "\"actor\":\"mallory\"", 1);
    assert_ne!(edited, lines);
    let export = dir.path().join("edited.jsonl");
    std::fs::write(&export, edited).expect("write");
    let output = gatekeep(
        &[
            &["report", "--input", export.to_str().expect("utf-8")][..],
            &MARCH[..],
        ]
        .concat(),
    );
    assert!(!output.status.success());
    assert!(output.stdout.is_empty(), "no report printed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stderr}");
    assert!(stderr.contains("does not verify"), "{stderr}");
    assert!(stderr.contains("record 10"), "names the record: {stderr}");

    // A partial export (from seq 2) is refused too.
    let partial = ok(&gatekeep(&[
        "audit",
        "export",
        "--db",
        &db_arg,
        "--from-seq",
        "2",
    ]));
    let partial_path = dir.path().join("partial.jsonl");
    std::fs::write(&partial_path, partial).expect("write");
    let output = gatekeep(
        &[
            &["report", "--input", partial_path.to_str().expect("utf-8")][..],
            &MARCH[..],
        ]
        .concat(),
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("starts at seq 2"));

    // The database itself: a guard dropped (chain intact) is refused, then a record changed.
    let conn = rusqlite::Connection::open(&db).expect("open");
    conn.execute_batch("DROP TRIGGER audit_records_no_update")
        .expect("drop a guard");
    let output = gatekeep(&[&["report", "--db", &db_arg][..], &MARCH[..]].concat());
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("append-only guards were altered"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    conn.execute(
        "UPDATE audit_records SET actor = 'mallory' WHERE seq = 10",
        [],
    )
    .expect("rewrite a record");
    drop(conn);
    let output = gatekeep(&[&["report", "--db", &db_arg][..], &MARCH[..]].concat());
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stderr}");
    assert!(stderr.contains("does not verify"), "{stderr}");
}

#[test]
fn bad_windows_are_refused_with_their_cause() {
    let output = gatekeep(&[
        "report",
        "--input",
        "/nonexistent",
        "--from",
        "March",
        "--to",
        "2026-03-31",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--from `March`") && stderr.contains("RFC 3339"),
        "{stderr}"
    );
    let output = gatekeep(&[
        "report",
        "--input",
        "/nonexistent",
        "--from",
        "2026-03-31",
        "--to",
        "2026-03-01",
    ]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not before --to"));
}
