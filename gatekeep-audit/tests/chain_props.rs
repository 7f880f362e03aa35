//! Property tests of the hash chain (issue 24, item 2): on random logs, any single changed
//! field of any record, any record removed before the last, and any two records reordered
//! are detected, both in a JSON Lines export (`verify_export`) and in the database itself
//! (`verify`, edited with the append-only triggers dropped, as an attacker with write access
//! to the file would). Removing the last record is the documented limit: the chain still
//! verifies, and only the head, anchored elsewhere, shows it. An export missing its first
//! record reads as a partial export (`--from-seq 2`): its report's `first_seq` shows it.

use std::path::Path;

use gatekeep_audit::{
    AuditError, AuditRecord, AuditStore, ChainHead, ExportFilter, RecordKind, verify, verify_export,
};
use proptest::prelude::*;
use rusqlite::Connection;
use serde_json::{Value, json};
use time::OffsetDateTime;

/// A record as generated.
#[derive(Debug, Clone)]
struct Gen {
    kind: usize,
    request_id: Option<String>,
    host: String,
    actor: Option<String>,
    payload: Value,
}

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just('a'),
            Just('b'),
            Just('"'),
            Just('\\'),
            Just('é'),
            Just('\n')
        ],
        0..6,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn record() -> impl Strategy<Value = Gen> {
    (
        0..RecordKind::ALL.len(),
        proptest::option::of(text()),
        text(),
        proptest::option::of(text()),
        (any::<i64>(), text(), any::<bool>()),
    )
        .prop_map(|(kind, request_id, host, actor, (n, s, b))| Gen {
            kind,
            request_id,
            host,
            actor,
            payload: json!({ "n": n, "s": s, "b": b, "argv": [s.clone(), "x"] }),
        })
}

/// The hashed columns of a record, as named in the database and the export.
const FIELDS: [&str; 9] = [
    "seq",
    "at",
    "kind",
    "request_id",
    "host",
    "actor",
    "payload",
    "prev_hash",
    "hash",
];

/// One tampering.
#[derive(Debug, Clone)]
enum Tamper {
    /// Change field `FIELDS[field]` of record `index`.
    Change { index: usize, field: usize },
    /// Remove record `index` (not the last).
    Remove { index: usize },
    /// Swap records `a` and `b`.
    Swap { a: usize, b: usize },
}

/// A log of at least two records and one tampering of it.
fn log_and_tamper() -> impl Strategy<Value = (Vec<Gen>, Tamper)> {
    proptest::collection::vec(record(), 2..10).prop_flat_map(|records| {
        let n = records.len();
        let tamper = prop_oneof![
            (0..n, 0..FIELDS.len()).prop_map(|(index, field)| Tamper::Change { index, field }),
            (0..n - 1).prop_map(|index| Tamper::Remove { index }),
            (0..n, 1..n).prop_map(move |(a, offset)| Tamper::Swap {
                a,
                b: (a + offset) % n
            }),
        ];
        (Just(records), tamper)
    })
}

/// Writes `records` to a new log in `dir` (in two batches, so the chain crosses a commit).
fn write_log(dir: &Path, records: &[Gen]) -> std::path::PathBuf {
    let path = dir.join("audit.db");
    let mut store = AuditStore::open(&path).expect("open the log");
    let base = OffsetDateTime::from_unix_timestamp(1_790_000_000).expect("a time");
    let records: Vec<AuditRecord> = records
        .iter()
        .zip(0i64..)
        .map(|(g, i)| {
            let mut record = AuditRecord::new(RecordKind::ALL[g.kind], &g.host, g.payload.clone())
                .with_at(base + time::Duration::milliseconds(i * 1_001));
            record.request_id.clone_from(&g.request_id);
            record.actor.clone_from(&g.actor);
            record
        })
        .collect();
    let half = records.len() / 2;
    store.append_batch(&records[..half]).expect("append");
    store.append_batch(&records[half..]).expect("append");
    path
}

fn export_lines(path: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    gatekeep_audit::export(path, &mut out, &ExportFilter::default()).expect("export");
    String::from_utf8(out)
        .expect("UTF-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

/// Another value for `field` of `line`, of the right type, never equal to the old one.
fn changed(line: &Value, field: &str) -> Value {
    let old = &line[field];
    match field {
        "seq" => json!(old.as_u64().expect("a seq") + 1),
        "request_id" | "actor" if old.is_null() => json!("mallory"),
        "request_id" | "actor" => Value::Null,
        "payload" => json!({ "tampered": old.clone() }),
        "prev_hash" | "hash" => {
            let hex = old.as_str().expect("a hash");
            let first = if hex.starts_with('0') { "1" } else { "0" };
            json!(format!("{first}{}", &hex[1..]))
        }
        // at, kind, host: any other text.
        _ => json!(format!("{}x", old.as_str().expect("a text"))),
    }
}

fn to_text(lines: &[Value]) -> String {
    lines
        .iter()
        .map(|line| {
            // The payload is stored canonical text: an object from `serde_json` has its keys
            // sorted already (no `preserve_order`), so this re-serialisation is faithful.
            serde_json::to_string(line).expect("serialise") + "\n"
        })
        .collect()
}

fn tampered(result: &Result<gatekeep_audit::VerifyReport, AuditError>) -> bool {
    matches!(result, Err(AuditError::Tampered { .. }))
}

/// A scratch folder, on tmpfs where there is one: every case commits (fsync) twice.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::tempdir_in(shm)
    {
        return dir;
    }
    tempfile::tempdir().expect("tempdir")
}

/// The seq of the record at `index`.
fn seq_of(index: usize) -> i64 {
    i64::try_from(index).expect("a small index") + 1
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn an_export_detects_any_single_change_removal_or_reordering(
        (records, tamper) in log_and_tamper(),
    ) {
        let dir = scratch();
        let path = write_log(dir.path(), &records);
        let mut lines = export_lines(&path);
        // Untouched, the export and the database verify, with the same head.
        let report = verify_export(to_text(&lines).as_bytes()).expect("an intact export");
        prop_assert_eq!(report.records, records.len() as u64);
        prop_assert_eq!(&verify(&path).expect("an intact log").head, &report.head);

        match tamper {
            Tamper::Change { index, field } => {
                let name = FIELDS[field];
                lines[index][name] = changed(&lines[index], name);
            }
            Tamper::Remove { index: 0 } => {
                // An export may start anywhere (`--from-seq`), so one missing its first
                // record is a valid partial export: the report's first seq shows it.
                lines.remove(0);
                let report = verify_export(to_text(&lines).as_bytes());
                prop_assert_eq!(report.expect("a partial export").first_seq, Some(2));
                return Ok(());
            }
            Tamper::Remove { index } => {
                lines.remove(index);
            }
            Tamper::Swap { a, b } => lines.swap(a, b),
        }
        prop_assert!(
            tampered(&verify_export(to_text(&lines).as_bytes())),
            "{:?} went unnoticed", tamper
        );
    }

    #[test]
    fn the_database_detects_any_single_change_removal_or_reordering(
        (records, tamper) in log_and_tamper(),
    ) {
        let dir = scratch();
        let path = write_log(dir.path(), &records);
        let lines = export_lines(&path);
        let conn = Connection::open(&path).expect("open the file");
        for trigger in ["audit_records_no_update", "audit_records_no_delete", "audit_records_no_replace"] {
            conn.execute_batch(&format!("DROP TRIGGER {trigger}")).expect("drop a guard");
        }
        match &tamper {
            Tamper::Change { index, field } => {
                let name = FIELDS[*field];
                // A seq moved to a free number (an existing one is a constraint error).
                let value = if name == "seq" {
                    json!(1_000_000 + *index)
                } else {
                    changed(&lines[*index], name)
                };
                let value: rusqlite::types::Value = match value {
                    Value::Null => rusqlite::types::Value::Null,
                    Value::Number(n) => rusqlite::types::Value::Integer(
                        n.as_i64().expect("a seq"),
                    ),
                    Value::String(s) => rusqlite::types::Value::Text(s),
                    other => rusqlite::types::Value::Text(other.to_string()),
                };
                conn.execute(
                    &format!("UPDATE audit_records SET {name} = ?1 WHERE seq = ?2"),
                    rusqlite::params![value, seq_of(*index)],
                )
                .expect("update");
            }
            Tamper::Remove { index } => {
                conn.execute("DELETE FROM audit_records WHERE seq = ?1", [seq_of(*index)])
                    .expect("delete");
            }
            Tamper::Swap { a, b } => {
                // Renumber: the two records trade places in seq order.
                conn.execute_batch(&format!(
                    "UPDATE audit_records SET seq = 1000000 WHERE seq = {a1};
                     UPDATE audit_records SET seq = {a1} WHERE seq = {b1};
                     UPDATE audit_records SET seq = {b1} WHERE seq = 1000000;",
                    a1 = a + 1,
                    b1 = b + 1
                ))
                .expect("swap");
            }
        }
        drop(conn);
        prop_assert!(tampered(&verify(&path)), "{:?} went unnoticed", tamper);
    }

    #[test]
    fn removing_the_last_record_leaves_a_valid_chain_that_the_anchored_head_exposes(
        records in proptest::collection::vec(record(), 2..6),
    ) {
        let dir = scratch();
        let path = write_log(dir.path(), &records);
        let anchored: Option<ChainHead> = verify(&path).expect("intact").head;
        let mut lines = export_lines(&path);
        lines.pop();
        let report = verify_export(to_text(&lines).as_bytes()).expect("still a valid chain");
        prop_assert_ne!(report.head, anchored);
    }
}
