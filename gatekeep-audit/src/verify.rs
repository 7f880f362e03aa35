//! Proving the chain: of a database file, or of a JSON Lines export.

use std::{io::BufRead, path::Path};

use rusqlite::{Connection, Row};

use crate::{
    error::{AuditError, TamperReason},
    hash::{ChainFields, GENESIS_HASH},
    line::ExportLine,
    store::{AuditStore, ChainHead, GUARD_TRIGGERS, from_sql_seq, open_read_only},
};

/// What a successful verification saw.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Records checked.
    pub records: u64,
    /// The first record's seq: 1 for a whole log, the export's start for a partial export.
    pub first_seq: Option<u64>,
    /// The last record; compare it with a copy anchored elsewhere to detect a truncated tail.
    pub head: Option<ChainHead>,
    /// Whether the append-only triggers are present and unaltered. A missing trigger means
    /// someone changed the schema even when the chain is intact. `None` for an export.
    pub guards_intact: Option<bool>,
}

/// Verifies the log at `path`, opened read-only (safe while a writer is running: it checks the
/// snapshot committed when it starts).
///
/// Walks every record in seq order and checks that seqs run 1, 2, 3... without gaps, that each
/// `prev_hash` is the previous record's `hash` (the first's is [`GENESIS_HASH`]), and that each
/// record hashes to its stored `hash`. The first record that fails is reported as
/// [`AuditError::Tampered`] with its seq and a [`TamperReason`].
///
/// A chain proves that no record was changed, inserted or removed before the last one; it
/// cannot show records removed from the end, or a log rewritten from scratch. Anchor
/// [`VerifyReport::head`] elsewhere for that.
pub fn verify(path: impl AsRef<Path>) -> Result<VerifyReport, AuditError> {
    verify_connection(&open_read_only(path.as_ref())?)
}

impl AuditStore {
    /// Verifies the whole chain through this connection; see [`verify`](crate::verify).
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        verify_connection(self.connection())
    }
}

pub(crate) fn verify_connection(conn: &Connection) -> Result<VerifyReport, AuditError> {
    let guards_intact = guards_intact(conn)?;
    let mut chain = ChainCheck::from_genesis();
    let mut stmt = conn.prepare(
        "SELECT seq, at, kind, request_id, host, actor, payload, prev_hash, hash \
         FROM audit_records ORDER BY seq",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let seq_raw: i64 = row.get(0).map_err(|err| chain.malformed(&err))?;
        let seq = from_sql_seq(seq_raw)?;
        let fields = row_fields(row, seq)?;
        chain.check(&fields, text(row, 8, seq)?)?;
    }
    Ok(chain.report(Some(guards_intact)))
}

/// Verifies a JSON Lines export as written by [`export`](crate::export): the same checks as
/// [`verify`] over the lines in order. An export that starts past seq 1 (`from_seq`) is checked
/// from its first line on; one filtered by kind has gaps by construction and fails.
pub fn verify_export(reader: impl BufRead) -> Result<VerifyReport, AuditError> {
    let mut chain = ChainCheck::from_anywhere();
    for (index, line) in (1_u64..).zip(reader.lines()) {
        let line = line.map_err(|source| AuditError::ReadExport { source })?;
        if line.trim().is_empty() {
            continue;
        }
        let record: ExportLine<'_> =
            serde_json::from_str(&line).map_err(|source| AuditError::ExportLine {
                line: index,
                source,
            })?;
        let fields = ChainFields {
            seq: record.seq,
            at: &record.at,
            kind: &record.kind,
            request_id: record.request_id.as_deref(),
            host: &record.host,
            actor: record.actor.as_deref(),
            payload: record.payload.get(),
            prev_hash: &record.prev_hash,
        };
        chain.check(&fields, &record.hash)?;
    }
    Ok(chain.report(None))
}

/// Walks a chain record by record.
struct ChainCheck {
    /// The seq and `prev_hash` the next record must have; `None` before a partial export's first.
    next: Option<(u64, String)>,
    records: u64,
    first_seq: Option<u64>,
    head: Option<ChainHead>,
}

impl ChainCheck {
    fn from_genesis() -> Self {
        Self {
            next: Some((1, GENESIS_HASH.to_owned())),
            records: 0,
            first_seq: None,
            head: None,
        }
    }

    fn from_anywhere() -> Self {
        Self {
            next: None,
            ..Self::from_genesis()
        }
    }

    fn check(&mut self, fields: &ChainFields<'_>, stored_hash: &str) -> Result<(), AuditError> {
        let tampered = |reason| AuditError::Tampered {
            seq: fields.seq,
            reason,
        };
        let (expected_seq, expected_prev) = match self.next.take() {
            Some(next) => next,
            None if fields.seq == 1 => (1, GENESIS_HASH.to_owned()),
            None => (fields.seq, fields.prev_hash.to_owned()),
        };
        if fields.seq != expected_seq {
            return Err(tampered(TamperReason::Gap {
                expected: expected_seq,
            }));
        }
        if fields.prev_hash != expected_prev {
            return Err(tampered(TamperReason::BrokenLink {
                expected: expected_prev,
                found: fields.prev_hash.to_owned(),
            }));
        }
        let computed = fields.hash();
        if computed != stored_hash {
            return Err(tampered(TamperReason::HashMismatch {
                stored: stored_hash.to_owned(),
                computed,
            }));
        }
        self.records += 1;
        self.first_seq.get_or_insert(fields.seq);
        self.next = Some((fields.seq + 1, computed.clone()));
        self.head = Some(ChainHead {
            seq: fields.seq,
            hash: computed,
        });
        Ok(())
    }

    /// A row whose seq cannot even be read: blame the seq it should have had.
    fn malformed(&self, err: &rusqlite::Error) -> AuditError {
        AuditError::Tampered {
            seq: self.next.as_ref().map_or(0, |next| next.0),
            reason: TamperReason::Malformed {
                detail: format!("seq: {err}"),
            },
        }
    }

    fn report(self, guards_intact: Option<bool>) -> VerifyReport {
        VerifyReport {
            records: self.records,
            first_seq: self.first_seq,
            head: self.head,
            guards_intact,
        }
    }
}

/// Whether the guard triggers exist with exactly the SQL this crate created them with.
fn guards_intact(conn: &Connection) -> Result<bool, AuditError> {
    let mut stmt = conn.prepare(
        "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_records' \
         AND name = ?1",
    )?;
    for (name, sql) in GUARD_TRIGGERS {
        let mut rows = stmt.query([name])?;
        let found: Option<String> = match rows.next()? {
            Some(row) => row.get(0)?,
            None => None,
        };
        if found.as_deref() != Some(sql) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The hashed columns of a row (`seq, at, kind, request_id, host, actor, payload, prev_hash`).
pub(crate) fn row_fields<'r>(row: &'r Row<'_>, seq: u64) -> Result<ChainFields<'r>, AuditError> {
    Ok(ChainFields {
        seq,
        at: text(row, 1, seq)?,
        kind: text(row, 2, seq)?,
        request_id: opt_text(row, 3, seq)?,
        host: text(row, 4, seq)?,
        actor: opt_text(row, 5, seq)?,
        payload: text(row, 6, seq)?,
        prev_hash: text(row, 7, seq)?,
    })
}

fn text<'r>(row: &'r Row<'_>, index: usize, seq: u64) -> Result<&'r str, AuditError> {
    opt_text(row, index, seq)?.ok_or_else(|| malformed_column(row, index, seq, "is null"))
}

fn opt_text<'r>(row: &'r Row<'_>, index: usize, seq: u64) -> Result<Option<&'r str>, AuditError> {
    row.get_ref(index)?
        .as_str_or_null()
        .map_err(|err| malformed_column(row, index, seq, &err.to_string()))
}

fn malformed_column(row: &Row<'_>, index: usize, seq: u64, what: &str) -> AuditError {
    let column = row.as_ref().column_name(index).unwrap_or("?").to_owned();
    AuditError::Tampered {
        seq,
        reason: TamperReason::Malformed {
            detail: format!("column {column} {what}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tempfile::TempDir;

    use super::*;
    use crate::{AuditStore, ExportFilter, export, store::tests::samples};

    /// A log of `n` records, closed.
    fn log(n: u64) -> (TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        AuditStore::open(&path)
            .unwrap()
            .append_batch(&samples(0..n))
            .unwrap();
        (dir, path)
    }

    /// Runs `sql` on the raw file with the guards dropped, as an attacker with write access
    /// would.
    fn tamper(path: &Path, sql: &str) {
        let conn = Connection::open(path).unwrap();
        for (name, _) in GUARD_TRIGGERS {
            conn.execute_batch(&format!("DROP TRIGGER {name}")).unwrap();
        }
        conn.execute_batch(sql).unwrap();
    }

    fn tampered_at(result: Result<VerifyReport, AuditError>) -> (u64, TamperReason) {
        match result {
            Err(AuditError::Tampered { seq, reason }) => (seq, reason),
            other => panic!("expected a tampered chain, got {other:?}"),
        }
    }

    #[test]
    fn an_edited_payload_is_reported_at_its_seq() {
        let (_dir, path) = log(10);
        tamper(
            &path,
            "UPDATE audit_records SET payload = '{\"pid\":1}' WHERE seq = 5",
        );
        let (seq, reason) = tampered_at(verify(&path));
        assert_eq!(seq, 5);
        assert!(
            matches!(reason, TamperReason::HashMismatch { .. }),
            "{reason}"
        );
    }

    #[test]
    fn every_hashed_column_is_covered() {
        for (column, value) in [
            ("at", "'2020-01-01T00:00:00.000000000Z'"),
            ("kind", "'decided'"),
            ("request_id", "NULL"),
            ("host", "'web-2'"),
            ("actor", "'mallory'"),
        ] {
            let (_dir, path) = log(4);
            tamper(
                &path,
                &format!("UPDATE audit_records SET {column} = {value} WHERE seq = 3"),
            );
            assert_eq!(tampered_at(verify(&path)).0, 3, "{column}");
        }
    }

    #[test]
    fn a_deleted_middle_record_is_reported_as_a_gap() {
        let (_dir, path) = log(10);
        tamper(&path, "DELETE FROM audit_records WHERE seq = 4");
        assert_eq!(
            tampered_at(verify(&path)),
            (5, TamperReason::Gap { expected: 4 })
        );
    }

    #[test]
    fn a_deleted_first_record_is_reported_as_a_gap() {
        let (_dir, path) = log(3);
        tamper(&path, "DELETE FROM audit_records WHERE seq = 1");
        assert_eq!(
            tampered_at(verify(&path)),
            (2, TamperReason::Gap { expected: 1 })
        );
    }

    #[test]
    fn a_modified_hash_is_reported() {
        let (_dir, path) = log(10);
        let forged = "f".repeat(64);
        tamper(
            &path,
            &format!("UPDATE audit_records SET hash = '{forged}' WHERE seq = 7"),
        );
        let (seq, reason) = tampered_at(verify(&path));
        assert_eq!(seq, 7);
        assert!(
            matches!(&reason, TamperReason::HashMismatch { stored, .. } if *stored == forged),
            "{reason}"
        );
    }

    #[test]
    fn a_rehashed_record_breaks_the_next_link() {
        let (_dir, path) = log(5);
        // Edit record 2 and give it a correct hash of its new content: record 3 still points
        // at the old one.
        let conn = Connection::open(&path).unwrap();
        let old = conn
            .query_row(
                "SELECT at, kind, request_id, host, actor, prev_hash, hash FROM audit_records \
                 WHERE seq = 2",
                [],
                |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, Option<String>>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, Option<String>>(4)?,
                        row.get::<_, String>(5)?,
                        row.get::<_, String>(6)?,
                    ))
                },
            )
            .unwrap();
        let new_hash = ChainFields {
            seq: 2,
            at: &old.0,
            kind: &old.1,
            request_id: old.2.as_deref(),
            host: &old.3,
            actor: old.4.as_deref(),
            payload: "{}",
            prev_hash: &old.5,
        }
        .hash();
        tamper(
            &path,
            &format!(
                "UPDATE audit_records SET payload = '{{}}', hash = '{new_hash}' WHERE seq = 2"
            ),
        );
        assert_eq!(
            tampered_at(verify(&path)),
            (
                3,
                TamperReason::BrokenLink {
                    expected: new_hash,
                    found: old.6
                }
            )
        );
    }

    #[test]
    fn a_wrongly_typed_column_is_reported_as_malformed() {
        let (_dir, path) = log(3);
        // STRICT stops a plain UPDATE from storing a blob; rebuild the table without it.
        tamper(
            &path,
            "CREATE TABLE loose AS SELECT * FROM audit_records;
             UPDATE loose SET host = x'00ff' WHERE seq = 2;
             DROP TABLE audit_records;
             ALTER TABLE loose RENAME TO audit_records;",
        );
        let (seq, reason) = tampered_at(verify(&path));
        assert_eq!(seq, 2);
        assert!(matches!(reason, TamperReason::Malformed { .. }), "{reason}");
    }

    #[test]
    fn dropped_guards_are_reported_even_when_the_chain_holds() {
        let (_dir, path) = log(3);
        tamper(&path, "SELECT 1");
        let report = verify(&path).unwrap();
        assert_eq!(report.records, 3);
        assert_eq!(report.guards_intact, Some(false));
    }

    #[test]
    fn an_export_verifies_on_its_own() {
        let (_dir, path) = log(20);
        let mut out = Vec::new();
        export(&path, &mut out, &ExportFilter::default()).unwrap();
        let report = verify_export(out.as_slice()).unwrap();
        assert_eq!(
            report,
            VerifyReport {
                guards_intact: None,
                ..verify(&path).unwrap()
            }
        );

        let mut tail = Vec::new();
        let filter = ExportFilter {
            from_seq: Some(15),
            kind: None,
        };
        export(&path, &mut tail, &filter).unwrap();
        let report = verify_export(tail.as_slice()).unwrap();
        assert_eq!((report.first_seq, report.records), (Some(15), 6));
    }

    #[test]
    fn a_tampered_export_fails() {
        let (_dir, path) = log(5);
        let mut out = Vec::new();
        export(&path, &mut out, &ExportFilter::default()).unwrap();
        let text = String::from_utf8(out).unwrap();

        let edited = text.replacen("\"pid\":1002", "\"pid\":1003", 1);
        assert_ne!(edited, text);
        assert_eq!(tampered_at(verify_export(edited.as_bytes())).0, 3);

        let lines: Vec<&str> = text.lines().collect();
        let dropped = [lines[0], lines[1], lines[3], lines[4]].join("\n");
        assert_eq!(
            tampered_at(verify_export(dropped.as_bytes())),
            (4, TamperReason::Gap { expected: 3 })
        );

        // A partial export cannot pass itself off as the start of the log.
        let headless = lines[1..].join("\n").replace("\"seq\":2,", "\"seq\":1,");
        assert!(matches!(
            tampered_at(verify_export(headless.as_bytes())).1,
            TamperReason::BrokenLink { .. }
        ));

        assert!(matches!(
            verify_export("{\"seq\":1}\n".as_bytes()),
            Err(AuditError::ExportLine { line: 1, .. })
        ));
    }
}
