//! JSON Lines export for a SIEM or an auditor.

use std::{
    borrow::Cow,
    io::{self, BufWriter, Write},
    path::Path,
};

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{
    error::{AuditError, TamperReason},
    record::RecordKind,
    store::{from_sql_seq, open_read_only, to_sql_seq},
    verify::row_fields,
};

/// Which records to export. The default exports everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportFilter {
    /// Only records with `seq >= from_seq`; a SIEM passes its last seen seq + 1.
    pub from_seq: Option<u64>,
    /// Only records of this kind (such an export has seq gaps and does not pass
    /// [`verify_export`](crate::verify_export)).
    pub kind: Option<RecordKind>,
}

/// One line of an export: every column, the payload as its stored canonical JSON text, in this
/// key order. Absent `request_id`/`actor` are `null`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ExportLine<'a> {
    pub(crate) seq: u64,
    #[serde(borrow)]
    pub(crate) at: Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) kind: Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) request_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(crate) host: Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) actor: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub(crate) payload: &'a RawValue,
    #[serde(borrow)]
    pub(crate) prev_hash: Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) hash: Cow<'a, str>,
}

/// Writes the records of the log at `path` (opened read-only) that pass `filter` to `writer` as
/// JSON Lines, in seq order, one object per line with every field including both hashes:
///
/// ```json
/// {"seq":1,"at":"2026-11-24T21:42:56.123456789Z","kind":"requested","request_id":"r-1","host":"web-1","actor":null,"payload":{"pid":42},"prev_hash":"000…","hash":"cb40…"}
/// ```
///
/// `payload` is the stored canonical JSON byte for byte, so the line carries everything needed
/// to recompute `hash`. Streams row by row; returns the number of records written.
pub fn export(
    path: impl AsRef<Path>,
    writer: impl Write,
    filter: &ExportFilter,
) -> Result<u64, AuditError> {
    export_connection(&open_read_only(path.as_ref())?, writer, filter)
}

pub(crate) fn export_connection(
    conn: &Connection,
    writer: impl Write,
    filter: &ExportFilter,
) -> Result<u64, AuditError> {
    let write_err = |source| AuditError::Export { source };
    let mut out = BufWriter::new(writer);
    let mut stmt = conn.prepare(
        "SELECT seq, at, kind, request_id, host, actor, payload, prev_hash, hash \
         FROM audit_records WHERE seq >= ?1 AND (?2 IS NULL OR kind = ?2) ORDER BY seq",
    )?;
    let from = to_sql_seq(filter.from_seq.unwrap_or(1))?;
    let mut rows = stmt.query(rusqlite::params![from, filter.kind.map(RecordKind::as_str)])?;
    let mut count = 0;
    while let Some(row) = rows.next()? {
        let seq = from_sql_seq(row.get(0)?)?;
        let fields = row_fields(row, seq)?;
        let payload: &RawValue =
            serde_json::from_str(fields.payload).map_err(|err| AuditError::Tampered {
                seq,
                reason: TamperReason::Malformed {
                    detail: format!("payload is not json: {err}"),
                },
            })?;
        let hash = row
            .get_ref(8)?
            .as_str()
            .map_err(|err| AuditError::Tampered {
                seq,
                reason: TamperReason::Malformed {
                    detail: format!("column hash {err}"),
                },
            })?;
        let line = ExportLine {
            seq,
            at: fields.at.into(),
            kind: fields.kind.into(),
            request_id: fields.request_id.map(Cow::from),
            host: fields.host.into(),
            actor: fields.actor.map(Cow::from),
            payload,
            prev_hash: fields.prev_hash.into(),
            hash: hash.into(),
        };
        serde_json::to_writer(&mut out, &line).map_err(|err| write_err(io::Error::from(err)))?;
        out.write_all(b"\n").map_err(write_err)?;
        count += 1;
    }
    out.flush().map_err(write_err)?;
    Ok(count)
}
