//! Reading stored records as they are hashed, for whoever re-checks them elsewhere: the
//! agent's shipper (which sends them to the decision service to be anchored) and
//! `gatekeep audit verify --host` (which compares a host's log with the anchored copy).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension as _};
use serde::{Deserialize, Serialize};

use crate::{
    error::AuditError,
    hash::ChainFields,
    store::{ChainHead, from_sql_seq, open_read_only, to_sql_seq},
    verify::row_fields,
};

/// One record with every column as stored: the texts the chain hash covers and the stored
/// hash (not re-checked here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawRecord {
    pub seq: u64,
    pub at: String,
    pub kind: String,
    pub request_id: Option<String>,
    pub host: String,
    pub actor: Option<String>,
    pub payload: String,
    pub prev_hash: String,
    pub hash: String,
}

impl RawRecord {
    /// The hashed fields ([`ChainFields::hash`] recomputes the hash from them).
    #[must_use]
    pub fn chain_fields(&self) -> ChainFields<'_> {
        ChainFields {
            seq: self.seq,
            at: &self.at,
            kind: &self.kind,
            request_id: self.request_id.as_deref(),
            host: &self.host,
            actor: self.actor.as_deref(),
            payload: &self.payload,
            prev_hash: &self.prev_hash,
        }
    }

    /// Whether the stored hash is the hash of the record's fields.
    #[must_use]
    pub fn hash_matches(&self) -> bool {
        self.chain_fields().hash() == self.hash
    }
}

/// A read-only view of a log that another process (the agent's writer) appends to. WAL lets
/// it read beside the writer without taking its lock.
#[derive(Debug)]
pub struct AuditReader {
    conn: Connection,
    path: PathBuf,
}

impl AuditReader {
    /// Opens the existing log at `path` read-only.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, AuditError> {
        let path = path.as_ref().to_owned();
        Ok(Self {
            conn: open_read_only(&path)?,
            path,
        })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last record now; `None` while the log is empty.
    pub fn head(&self) -> Result<Option<ChainHead>, AuditError> {
        let head = self
            .conn
            .prepare_cached("SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1")?
            .query_row([], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })
            .optional()?;
        head.map(|(seq, hash)| {
            Ok(ChainHead {
                seq: from_sql_seq(seq)?,
                hash,
            })
        })
        .transpose()
    }

    /// Records from `from_seq` on, in seq order: at most `limit`, and no more once their
    /// payloads reach `max_bytes` (at least one record is returned when there is one).
    pub fn read_from(
        &self,
        from_seq: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<RawRecord>, AuditError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, at, kind, request_id, host, actor, payload, prev_hash, hash \
             FROM audit_records WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut rows = stmt.query(rusqlite::params![to_sql_seq(from_seq)?, limit])?;
        let mut records = Vec::new();
        let mut bytes = 0;
        while let Some(row) = rows.next()? {
            let seq = from_sql_seq(row.get(0)?)?;
            let fields = row_fields(row, seq)?;
            let hash: String = row.get(8)?;
            bytes += fields.payload.len();
            if bytes > max_bytes && !records.is_empty() {
                break;
            }
            records.push(RawRecord {
                seq,
                at: fields.at.to_owned(),
                kind: fields.kind.to_owned(),
                request_id: fields.request_id.map(str::to_owned),
                host: fields.host.to_owned(),
                actor: fields.actor.map(str::to_owned),
                payload: fields.payload.to_owned(),
                prev_hash: fields.prev_hash.to_owned(),
                hash,
            });
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AuditStore, store::tests::samples};

    #[test]
    fn reads_what_was_stored_in_bounded_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut store = AuditStore::open(&path).unwrap();
        let stored = store.append_batch(&samples(0..10)).unwrap();
        let reader = AuditReader::open(&path).unwrap();
        assert_eq!(reader.head().unwrap(), store.head().cloned());
        let batch = reader.read_from(3, 4, usize::MAX).unwrap();
        assert_eq!(
            batch.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [3, 4, 5, 6]
        );
        for record in &batch {
            assert!(record.hash_matches());
            assert_eq!(
                record.hash,
                stored[usize::try_from(record.seq).unwrap() - 1].hash
            );
        }
        // One payload already passes the byte bound: one record, never none.
        assert_eq!(reader.read_from(1, 100, 1).unwrap().len(), 1);
        assert!(reader.read_from(11, 100, usize::MAX).unwrap().is_empty());
        // Appends after opening are seen.
        store.append_batch(&samples(10..11)).unwrap();
        assert_eq!(reader.head().unwrap().unwrap().seq, 11);
    }
}
