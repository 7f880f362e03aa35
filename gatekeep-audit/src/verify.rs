//! Proving the chain: of a database file, or of a JSON Lines export.

use std::{io::BufRead, path::Path};

use rusqlite::{Connection, Row};

use crate::{
    error::{AuditError, TamperReason},
    export::ExportLine,
    hash::{ChainFields, GENESIS_HASH},
    store::{ChainHead, GUARD_TRIGGERS, from_sql_seq, open_read_only},
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
    /// The seq and prev_hash the next record must have; `None` before a partial export's first.
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
