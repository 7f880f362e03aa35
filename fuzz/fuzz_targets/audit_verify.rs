//! Audit verification on corrupted or truncated logs. The first byte picks the mode:
//!
//! - 0: the rest is a database file, as found on disk (a torn write, a bad sector, an
//!   attacker's edit): `verify` and `export` return a report or an error, never a panic;
//! - 1: the rest is a JSON Lines export: `verify_export` likewise;
//! - otherwise: the rest is a list of edits of a valid four-record log (overwrite a byte,
//!   truncate the file, change a column of a row to another value with the append-only
//!   triggers dropped). An edit that changed a hashed column must be reported as tampering.
#![no_main]

use std::{
    fs,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use gatekeep_audit::{
    AuditError, AuditRecord, AuditStore, ExportFilter, RecordKind, export, verify, verify_export,
};
use libfuzzer_sys::fuzz_target;
use rusqlite::{Connection, types::Value as Sql};

const COLUMNS: [&str; 9] = [
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

/// A scratch folder of this process (tmpfs where there is one).
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("gatekeep-fuzz-audit-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("scratch folder");
        dir
    })
}

/// The bytes of a valid log of four records (made once).
fn template() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let path = scratch().join("template.db");
        let _ = fs::remove_file(&path);
        let mut store = AuditStore::open(&path).expect("open");
        let records: Vec<AuditRecord> = (0..4)
            .map(|i| {
                AuditRecord::new(
                    RecordKind::ALL[i % RecordKind::ALL.len()],
                    "web-1",
                    serde_json::json!({ "pid": i, "argv": ["curl", "example.org"] }),
                )
                .with_request_id(format!("r-{i}"))
            })
            .collect();
        store.append_batch(&records).expect("append");
        drop(store);
        fs::read(&path).expect("read the template")
    })
}

/// Writes `bytes` as the database at a fresh path (no journal beside it).
fn place(bytes: &[u8]) -> PathBuf {
    let path = scratch().join("audit.db");
    for suffix in ["-wal", "-shm", "-journal"] {
        let _ = fs::remove_file(scratch().join(format!("audit.db{suffix}")));
    }
    fs::write(&path, bytes).expect("write the database");
    path
}

fn check_file(path: &Path) {
    match verify(path) {
        Ok(report) => assert!(report.records <= 1 << 40),
        Err(err) => assert!(!gatekeep_audit::error_chain(&err).is_empty()),
    }
    let _ = export(path, std::io::sink(), &ExportFilter::default());
}

/// Applies SQL edits; whether one changed a hashed value.
fn edit_rows(path: &Path, edits: &[u8]) -> bool {
    let Ok(conn) = Connection::open(path) else {
        return false;
    };
    for trigger in [
        "audit_records_no_update",
        "audit_records_no_delete",
        "audit_records_no_replace",
    ] {
        if conn
            .execute_batch(&format!("DROP TRIGGER {trigger}"))
            .is_err()
        {
            return false;
        }
    }
    let before = snapshot(&conn);
    for edit in edits.chunks(6) {
        let [row, column, kind, a, b, c] = *edit else {
            break;
        };
        let seq = i64::from(row % 4) + 1;
        let column = COLUMNS[usize::from(column) % COLUMNS.len()];
        let value = match kind % 4 {
            0 => Sql::Null,
            1 => Sql::Integer(i64::from(u32::from_le_bytes([a, b, c, 0]))),
            2 => Sql::Text(String::from_utf8_lossy(&[a, b, c]).into_owned()),
            _ => Sql::Blob(vec![a, b, c]),
        };
        // Refused updates (types of a STRICT table, constraints) change nothing.
        let _ = conn.execute(
            &format!("UPDATE audit_records SET {column} = ?1 WHERE seq = ?2"),
            rusqlite::params![value, seq],
        );
    }
    before.is_some() && snapshot(&conn) != before
}

/// Every row, every column quoted with its type, in seq order.
fn snapshot(conn: &Connection) -> Option<Vec<String>> {
    let sql = format!(
        "SELECT {} FROM audit_records ORDER BY seq",
        COLUMNS.map(|c| format!("quote({c})")).join(" || ',' || ")
    );
    let mut stmt = conn.prepare(&sql).ok()?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0)).ok()?;
    rows.collect::<Result<Vec<_>, _>>().ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode {
        0 => check_file(&place(rest)),
        1 => {
            let _ = verify_export(rest);
        }
        _ => {
            let mut bytes = template().to_vec();
            // Byte edits first: (offset lo, offset hi, value) triples until a 0xff marker,
            // then SQL edits.
            let split = rest.iter().position(|b| *b == 0xff).unwrap_or(rest.len());
            let (raw, sql) = rest.split_at(split);
            let sql = sql.get(1..).unwrap_or_default();
            for edit in raw.chunks_exact(3) {
                let offset = usize::from(u16::from_le_bytes([edit[0], edit[1]]));
                if edit[2] == 0 && offset < bytes.len() {
                    bytes.truncate(offset);
                } else if let Some(byte) = bytes.get_mut(offset) {
                    *byte = edit[2];
                }
            }
            let path = place(&bytes);
            let pristine = raw.is_empty();
            let changed = edit_rows(&path, sql);
            let result = verify(&path);
            if pristine && changed {
                assert!(
                    matches!(result, Err(AuditError::Tampered { .. })),
                    "a changed hashed column went unnoticed: {result:?}"
                );
            }
            check_file(&path);
        }
    }
});
