//! JSON Lines export for a SIEM or an auditor.

use std::{
    borrow::Cow,
    io::{self, BufWriter, Write},
    path::Path,
};

use rusqlite::Connection;
use serde_json::value::RawValue;

use crate::{
    error::{AuditError, TamperReason},
    hash::ChainFields,
    line::ExportLine,
    record::RecordKind,
    store::{AuditStore, from_sql_seq, open_read_only, to_sql_seq},
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

impl AuditStore {
    /// Exports through this connection; see [`export`](crate::export).
    pub fn export(&self, writer: impl io::Write, filter: &ExportFilter) -> Result<u64, AuditError> {
        export_connection(self.connection(), writer, filter)
    }
}

/// Writes one record as a line of the export, exactly as [`export`] does: for a
/// [`ChainStore`](crate::ChainStore) that keeps its records in another database, so that its
/// export reads (and [`verify_export`](crate::verify_export) verifies) the same.
pub fn export_line(
    mut out: impl Write,
    fields: &ChainFields<'_>,
    hash: &str,
) -> Result<(), AuditError> {
    let write_err = |source| AuditError::Export { source };
    let seq = fields.seq;
    let payload: &RawValue =
        serde_json::from_str(fields.payload).map_err(|err| AuditError::Tampered {
            seq,
            reason: TamperReason::Malformed {
                detail: format!("payload is not json: {err}"),
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
    out.write_all(b"\n").map_err(write_err)
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
        let hash = row
            .get_ref(8)?
            .as_str()
            .map_err(|err| AuditError::Tampered {
                seq,
                reason: TamperReason::Malformed {
                    detail: format!("column hash {err}"),
                },
            })?;
        export_line(&mut out, &fields, hash)?;
        count += 1;
    }
    out.flush().map_err(write_err)?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::{AuditStore, GENESIS_HASH, StoredRecord, store::tests::samples};

    fn lines(out: &[u8]) -> Vec<Value> {
        std::str::from_utf8(out)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    #[test]
    fn exports_every_record_in_order_with_all_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut store = AuditStore::open(&path).unwrap();
        let stored = store.append_batch(&samples(0..25)).unwrap();

        let mut out = Vec::new();
        assert_eq!(
            export(&path, &mut out, &ExportFilter::default()).unwrap(),
            25
        );
        assert!(out.ends_with(b"\n"));
        let lines = lines(&out);
        assert_eq!(lines.len(), 25);
        for (line, record) in lines.iter().zip(&stored) {
            let mut keys: Vec<&str> = line
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            keys.sort_unstable();
            let mut expected = [
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
            expected.sort_unstable();
            assert_eq!(keys, expected);
            // Every line reads back as the record that was stored.
            let back: StoredRecord = serde_json::from_value(line.clone()).unwrap();
            assert_eq!(&back, record);
        }
        assert_eq!(lines[0]["prev_hash"], GENESIS_HASH);

        // The same through the open store.
        let mut again = Vec::new();
        store.export(&mut again, &ExportFilter::default()).unwrap();
        assert_eq!(again, out);
    }

    #[test]
    fn payload_is_the_stored_canonical_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut record = samples(0..1).remove(0);
        record.payload = serde_json::json!({"z": 1, "a": {"y": [1.5, null], "b": "\u{e9}\n"}});
        AuditStore::open(&path)
            .unwrap()
            .append_batch(&[record])
            .unwrap();
        let mut out = Vec::new();
        export(&path, &mut out, &ExportFilter::default()).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(r#""payload":{"a":{"b":"é\n","y":[1.5,null]},"z":1}"#),
            "{text}"
        );
    }

    #[test]
    fn filters_by_seq_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let stored = AuditStore::open(&path)
            .unwrap()
            .append_batch(&samples(0..30))
            .unwrap();

        let mut out = Vec::new();
        let from = ExportFilter {
            from_seq: Some(21),
            kind: None,
        };
        assert_eq!(export(&path, &mut out, &from).unwrap(), 10);
        let seqs: Vec<u64> = lines(&out)
            .iter()
            .map(|l| l["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, (21..=30).collect::<Vec<_>>());

        let mut out = Vec::new();
        let kind = ExportFilter {
            from_seq: Some(5),
            kind: Some(RecordKind::Decided),
        };
        let expected: Vec<u64> = stored
            .iter()
            .filter(|r| r.seq >= 5 && r.kind == RecordKind::Decided)
            .map(|r| r.seq)
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(
            export(&path, &mut out, &kind).unwrap(),
            expected.len() as u64
        );
        let lines = lines(&out);
        assert!(lines.iter().all(|l| l["kind"] == "decided"));
        let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, expected);
    }

    #[test]
    fn an_empty_log_exports_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        drop(AuditStore::open(&path).unwrap());
        let mut out = Vec::new();
        assert_eq!(
            export(&path, &mut out, &ExportFilter::default()).unwrap(),
            0
        );
        assert!(out.is_empty());
    }
}
