//! The `SQLite` store: schema, opening, appending.

use std::{
    fs::OpenOptions,
    io,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{Connection, OpenFlags, OptionalExtension as _, TransactionBehavior, params};
use time::UtcOffset;

use crate::{
    error::{AuditError, TamperReason},
    hash::{ChainFields, GENESIS_HASH},
    record::{AuditRecord, Once, Prepared, StoredRecord},
};

/// The schema version this build writes, kept in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 1;

/// The message the append-only triggers abort with.
pub const APPEND_ONLY_MESSAGE: &str = "audit records are append-only";

/// How long a statement waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const CREATE_TABLE: &str = "\
CREATE TABLE audit_records (
    seq        INTEGER PRIMARY KEY CHECK (seq >= 1),
    at         TEXT NOT NULL,
    kind       TEXT NOT NULL,
    request_id TEXT,
    host       TEXT NOT NULL,
    actor      TEXT,
    payload    TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
) STRICT;
CREATE INDEX audit_records_request_id ON audit_records (request_id)
    WHERE request_id IS NOT NULL;";

/// The append-only guards: `(name, exact SQL)`. `verify` compares `sqlite_master` with these,
/// so a dropped or rewritten trigger shows.
///
/// `no_replace` is needed because `INSERT OR REPLACE` deletes the row it replaces without
/// firing delete triggers (unless `recursive_triggers` is on).
pub(crate) const GUARD_TRIGGERS: [(&str, &str); 3] = [
    (
        "audit_records_no_update",
        "CREATE TRIGGER audit_records_no_update BEFORE UPDATE ON audit_records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END",
    ),
    (
        "audit_records_no_delete",
        "CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END",
    ),
    (
        "audit_records_no_replace",
        "CREATE TRIGGER audit_records_no_replace BEFORE INSERT ON audit_records
WHEN EXISTS (SELECT 1 FROM audit_records WHERE seq = NEW.seq)
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END",
    ),
];

const INSERT: &str = "INSERT INTO audit_records \
    (seq, at, kind, request_id, host, actor, payload, prev_hash, hash) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

/// Whether the chain holds a record of a kind for a request
/// ([`EncodedRecord::once_per_request`](crate::EncodedRecord::once_per_request)); served by
/// the `request_id` index.
const ONCE_EXISTS: &str = "SELECT 1 FROM audit_records WHERE request_id = ?1 AND kind = ?2";

/// Whether the chain holds an outcome of a request ([`Once::Outcome`]); served by the
/// `request_id` index (the payload is read only of the request's `decided` records).
const OUTCOME_EXISTS: &str = "SELECT 1 FROM audit_records WHERE request_id = ?1 \
    AND (kind IN ('expired', 'cancelled', 'abandoned') \
    OR (kind = 'decided' AND json_extract(payload, '$.final') = 1))";

/// The last record of a chain: the value to anchor elsewhere (the decision service, a ticket)
/// so that truncating the log's tail, which no chain can show by itself, shows too.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: String,
}

/// Where an [`AuditWriter`](crate::AuditWriter) appends: the `SQLite` [`AuditStore`], or a
/// shared database several writers (service replicas) append one chain to.
pub trait ChainStore: Send + 'static {
    /// Where the chain lives, named in health reports and their fixes.
    fn location(&self) -> &Path;
    /// Chains `records` after the stored head and inserts them in one durable transaction;
    /// returns the new head's seq. The head is read inside that transaction, under a lock
    /// every writer takes, so that concurrent writers never fork the chain.
    fn append(&mut self, records: &[Prepared]) -> Result<u64, AuditError>;
    /// The seq of the last record this store wrote or read (0 while the log is empty).
    fn head_seq(&self) -> u64;
}

impl ChainStore for AuditStore {
    fn location(&self) -> &Path {
        self.path()
    }

    fn append(&mut self, records: &[Prepared]) -> Result<u64, AuditError> {
        self.append_prepared(records)
            .map(|head| head.map_or(0, |head| head.seq))
    }

    fn head_seq(&self) -> u64 {
        self.head().map_or(0, |head| head.seq)
    }
}

/// An open, writable audit log.
///
/// Synchronous: async code calls it through `spawn_blocking`, or submits through
/// [`AuditWriter`](crate::AuditWriter), which owns a store on its own thread.
pub struct AuditStore {
    conn: Connection,
    path: PathBuf,
    head: Option<ChainHead>,
    /// Tests make the database "full" with `PRAGMA max_page_count`: a real `SQLITE_FULL`
    /// from `SQLite`, without a small filesystem. Applied before every append.
    #[cfg(test)]
    page_limit: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for AuditStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditStore")
            .field("path", &self.path)
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

impl AuditStore {
    /// Opens (creating if needed, owner-only permissions) the log at `path`: WAL journal,
    /// `synchronous=FULL` so a committed batch survives power loss, schema created or checked.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, AuditError> {
        let path = path.as_ref().to_owned();
        create_private(&path)?;
        let open_err = |source| AuditError::Open {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(open_err(rusqlite::Error::InvalidParameterName(format!(
                "journal_mode stayed {mode}"
            ))));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        migrate(&mut conn, &path)?;
        let head = read_head(&conn)?;
        Ok(Self {
            conn,
            path,
            head,
            #[cfg(test)]
            page_limit: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::from(u32::MAX))),
        })
    }

    /// Where the log lives.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last record written through this store (read at open, updated on every append);
    /// `None` while the log is empty.
    #[must_use]
    pub fn head(&self) -> Option<&ChainHead> {
        self.head.as_ref()
    }

    /// Appends `records` in one transaction, chained after the last stored record, and
    /// returns them as stored. Durable when it returns.
    ///
    /// The chain's head is re-read inside the write transaction, so another process appending
    /// to the same file cannot fork the chain.
    pub fn append_batch(
        &mut self,
        records: &[AuditRecord],
    ) -> Result<Vec<StoredRecord>, AuditError> {
        let prepared = records
            .iter()
            .map(AuditRecord::prepare)
            .collect::<Result<Vec<_>, _>>()?;
        let mut stored = Vec::with_capacity(records.len());
        self.append_each(&prepared, |index, seq, prev_hash, hash| {
            let record = &records[index];
            stored.push(StoredRecord {
                seq,
                // `prepare` already converted it once, so this cannot fail.
                at: record
                    .at
                    .checked_to_offset(UtcOffset::UTC)
                    .unwrap_or(record.at),
                kind: record.kind,
                request_id: record.request_id.clone(),
                host: record.host.clone(),
                actor: record.actor.clone(),
                payload: record.payload.clone(),
                prev_hash: prev_hash.to_owned(),
                hash: hash.to_owned(),
            });
        })?;
        Ok(stored)
    }

    /// Appends records prepared by their submitters, like
    /// [`append_batch`](Self::append_batch), and returns the new head only.
    pub(crate) fn append_prepared(
        &mut self,
        records: &[Prepared],
    ) -> Result<Option<&ChainHead>, AuditError> {
        self.append_each(records, |_, _, _, _| ())?;
        Ok(self.head.as_ref())
    }

    /// Chains and inserts `rows` in one transaction; `each` sees every row's index, seq,
    /// previous hash and hash.
    fn append_each(
        &mut self,
        rows: &[Prepared],
        mut each: impl FnMut(usize, u64, &str, &str),
    ) -> Result<(), AuditError> {
        if rows.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        self.conn.pragma_update(
            None,
            "max_page_count",
            i64::try_from(self.page_limit.load(std::sync::atomic::Ordering::Acquire))
                .unwrap_or(i64::MAX),
        )?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let head = read_head(&tx)?;
        // Inside the write transaction: another process appending to the file waits.
        let keep = {
            let mut exists = tx.prepare_cached(ONCE_EXISTS)?;
            let mut outcome = tx.prepare_cached(OUTCOME_EXISTS)?;
            crate::record::once_filter(rows, |id, kind, once| match once {
                Once::Kind => exists.exists(params![id, kind]),
                Once::Outcome => outcome.exists(params![id]),
            })?
        };
        if keep.is_empty() {
            // Every record was there already: nothing to write.
            self.head = head;
            return Ok(());
        }
        let (mut seq, mut prev) =
            head.map_or((0, GENESIS_HASH.to_owned()), |head| (head.seq, head.hash));
        {
            let mut insert = tx.prepare_cached(INSERT)?;
            for index in keep {
                let row = &rows[index];
                seq += 1;
                let hash = ChainFields {
                    seq,
                    at: &row.at,
                    kind: row.kind,
                    request_id: row.request_id.as_deref(),
                    host: &row.host,
                    actor: row.actor.as_deref(),
                    payload: &row.payload,
                    prev_hash: &prev,
                }
                .hash();
                insert.execute(params![
                    to_sql_seq(seq)?,
                    row.at,
                    row.kind,
                    row.request_id,
                    row.host,
                    row.actor,
                    row.payload,
                    prev,
                    hash,
                ])?;
                each(index, seq, &prev, &hash);
                prev = hash;
            }
        }
        tx.commit()?;
        self.head = Some(ChainHead { seq, hash: prev });
        Ok(())
    }

    /// The knob of the test "disk": the most pages the database may hold (lowering it below
    /// the current size makes the next growing append fail with `SQLITE_FULL`).
    #[cfg(test)]
    pub(crate) fn page_limit(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        std::sync::Arc::clone(&self.page_limit)
    }

    /// The connection, for the read-only operations (`verify`, `export`) that also run
    /// through an open store.
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// Opens an existing log read-only and checks it is one this build understands.
pub(crate) fn open_read_only(path: &Path) -> Result<Connection, AuditError> {
    let open_err = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    match schema_version(&conn)? {
        SCHEMA_VERSION => Ok(conn),
        0 => Err(AuditError::NotAnAuditLog {
            path: path.to_owned(),
        }),
        found => Err(AuditError::UnsupportedSchema {
            path: path.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        }),
    }
}

/// Creates the file with mode 0600 if it does not exist yet: the log holds command lines and
/// addresses. `SQLite` gives its `-wal` and `-shm` files the database file's permissions.
fn create_private(path: &Path) -> Result<(), AuditError> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(AuditError::CreateFile {
            path: path.to_owned(),
            source,
        }),
    }
}

fn schema_version(conn: &Connection) -> Result<i64, AuditError> {
    Ok(conn.pragma_query_value(None, "user_version", |row| row.get(0))?)
}

/// Brings the schema to [`SCHEMA_VERSION`]. Later versions add arms that upgrade step by step.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), AuditError> {
    if schema_version(conn)? == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Read again under the write lock: another process may have just created it.
    match schema_version(&tx)? {
        0 => {
            let objects: i64 =
                tx.query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))?;
            if objects != 0 {
                return Err(AuditError::NotAnAuditLog {
                    path: path.to_owned(),
                });
            }
            tx.execute_batch(CREATE_TABLE)?;
            for (_, sql) in GUARD_TRIGGERS {
                tx.execute_batch(sql)?;
            }
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        SCHEMA_VERSION => {}
        found => {
            return Err(AuditError::UnsupportedSchema {
                path: path.to_owned(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
    }
    tx.commit()?;
    Ok(())
}

fn read_head(conn: &Connection) -> Result<Option<ChainHead>, AuditError> {
    // Cached: it runs at the start of every batch.
    let head = conn
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

pub(crate) fn to_sql_seq(seq: u64) -> Result<i64, AuditError> {
    i64::try_from(seq).map_err(|_| AuditError::Tampered {
        seq,
        reason: TamperReason::Malformed {
            detail: "seq does not fit SQLite's integer".to_owned(),
        },
    })
}

pub(crate) fn from_sql_seq(seq: i64) -> Result<u64, AuditError> {
    u64::try_from(seq).map_err(|_| AuditError::Tampered {
        seq: 0,
        reason: TamperReason::Malformed {
            detail: format!("negative seq {seq}"),
        },
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use serde_json::json;
    use time::macros::datetime;

    use super::*;
    use crate::{RecordKind, verify};

    /// A realistic record, distinct per `i` and the same for the same `i`.
    pub(crate) fn sample(i: u64) -> AuditRecord {
        AuditRecord::new(
            RecordKind::ALL[usize::try_from(i).unwrap() % RecordKind::ALL.len()],
            "web-1",
            json!({
                "pid": 1000 + i,
                "exe": "/usr/bin/curl",
                "argv": ["curl", "-s", format!("https://example.org/{i}")],
                "rule": "net.egress.ask",
                "wait_ms": i * 3,
            }),
        )
        .with_request_id(format!("req-{i}"))
        .with_actor("alice@example.org")
        .with_at(
            datetime!(2026-11-24 21:42:56.123456789 UTC)
                + time::Duration::milliseconds(i64::try_from(i).unwrap()),
        )
    }

    pub(crate) fn samples(range: std::ops::Range<u64>) -> Vec<AuditRecord> {
        range.map(sample).collect()
    }

    #[test]
    fn append_chains_records_and_verify_accepts_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut store = AuditStore::open(&path).unwrap();
        assert_eq!(store.head(), None);

        let first = store.append_batch(&samples(0..3)).unwrap();
        let second = store.append_batch(&samples(3..5)).unwrap();
        let all: Vec<_> = first.iter().chain(&second).collect();
        assert_eq!(
            all.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(all[0].prev_hash, GENESIS_HASH);
        for pair in all.windows(2) {
            assert_eq!(pair[1].prev_hash, pair[0].hash);
        }
        assert_eq!(all[2].payload, sample(2).payload);
        assert_eq!(all[2].request_id.as_deref(), Some("req-2"));
        assert_eq!(
            store.head(),
            Some(&ChainHead {
                seq: 5,
                hash: all[4].hash.clone()
            })
        );

        let report = verify(&path).unwrap();
        assert_eq!(report.records, 5);
        assert_eq!(report.first_seq, Some(1));
        assert_eq!(report.head, store.head().cloned());
        assert_eq!(report.guards_intact, Some(true));
        assert_eq!(store.verify().unwrap(), report);
    }

    #[test]
    fn a_once_per_request_record_is_appended_once_per_request_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let record = |kind: RecordKind, id: &str, once: bool| {
            let record = crate::EncodedRecord::new(kind, "svc", &json!({"n": 1}))
                .unwrap()
                .with_request_id(id);
            if once {
                record.once_per_request()
            } else {
                record
            }
            .into_prepared()
            .unwrap()
        };
        let mut store = AuditStore::open(&path).unwrap();
        // Twice in one batch: the first stays.
        let head = store
            .append_prepared(&[
                record(RecordKind::Requested, "a", true),
                record(RecordKind::Requested, "a", true),
                record(RecordKind::Requested, "b", true),
            ])
            .unwrap()
            .cloned();
        assert_eq!(head.map(|h| h.seq), Some(2));
        // Again in a later batch, and from another store on the same file (another
        // process): nothing. Another kind, or an ordinary record, is appended.
        let mut other = AuditStore::open(&path).unwrap();
        assert_eq!(
            other
                .append_prepared(&[record(RecordKind::Requested, "a", true)])
                .unwrap()
                .map(|h| h.seq),
            Some(2)
        );
        let head = store
            .append_prepared(&[
                record(RecordKind::Requested, "b", true),
                record(RecordKind::Decided, "a", true),
                record(RecordKind::Requested, "a", false),
            ])
            .unwrap()
            .cloned();
        assert_eq!(head.map(|h| h.seq), Some(4));
        let report = verify(&path).unwrap();
        assert_eq!(report.records, 4);
    }

    #[test]
    fn an_outcome_is_appended_once_per_request_whatever_its_kind_and_votes_do_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let outcome = |kind: RecordKind, id: &str, last: bool| {
            crate::EncodedRecord::new(kind, "svc", &json!({"final": last, "n": 1}))
                .unwrap()
                .with_request_id(id)
                .outcome_once()
                .into_prepared()
                .unwrap()
        };
        let vote = |id: &str| {
            crate::EncodedRecord::new(RecordKind::Decided, "svc", &json!({"final": false}))
                .unwrap()
                .with_request_id(id)
                .into_prepared()
                .unwrap()
        };
        let mut store = AuditStore::open(&path).unwrap();
        // A vote stored first does not stand for the outcome; a second outcome in the
        // batch, of another kind, is left out.
        let head = store
            .append_prepared(&[
                vote("a"),
                outcome(RecordKind::Decided, "a", true),
                outcome(RecordKind::Expired, "a", true),
                outcome(RecordKind::Cancelled, "b", true),
            ])
            .unwrap()
            .cloned();
        assert_eq!(head.map(|h| h.seq), Some(3));
        // From another store on the file (another replica, a reconciliation): nothing for
        // `a` or `b`, whatever the kind; `c` is new.
        let mut other = AuditStore::open(&path).unwrap();
        let head = other
            .append_prepared(&[
                outcome(RecordKind::Decided, "a", true),
                outcome(RecordKind::Abandoned, "b", true),
                outcome(RecordKind::Expired, "c", true),
            ])
            .unwrap()
            .cloned();
        assert_eq!(head.map(|h| h.seq), Some(4));
        assert_eq!(verify(&path).unwrap().records, 4);
    }

    #[test]
    fn an_empty_batch_writes_nothing_and_an_empty_log_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut store = AuditStore::open(&path).unwrap();
        assert!(store.append_batch(&[]).unwrap().is_empty());
        let report = verify(&path).unwrap();
        assert_eq!((report.records, report.head), (0, None));
    }

    #[test]
    fn stored_timestamps_are_utc_and_kept_to_the_nanosecond() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = AuditStore::open(dir.path().join("audit.db")).unwrap();
        let at = datetime!(2026-11-24 23:42:56.000000001 +02:00);
        let stored = store.append_batch(&[sample(0).with_at(at)]).unwrap();
        assert_eq!(stored[0].at, at);
        assert_eq!(stored[0].at.offset(), UtcOffset::UTC);
        let text: String = store
            .connection()
            .query_row("SELECT at FROM audit_records", [], |row| row.get(0))
            .unwrap();
        assert_eq!(text, "2026-11-24T21:42:56.000000001Z");
    }

    #[test]
    fn the_chain_continues_across_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let before = {
            let mut store = AuditStore::open(&path).unwrap();
            store.append_batch(&samples(0..4)).unwrap()
        };
        let mut store = AuditStore::open(&path).unwrap();
        assert_eq!(store.head().unwrap().seq, 4);
        let after = store.append_batch(&samples(4..6)).unwrap();
        assert_eq!(after[0].seq, 5);
        assert_eq!(after[0].prev_hash, before[3].hash);
        assert_eq!(verify(&path).unwrap().records, 6);
    }

    #[test]
    fn two_stores_on_one_file_extend_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut a = AuditStore::open(&path).unwrap();
        let mut b = AuditStore::open(&path).unwrap();
        a.append_batch(&samples(0..2)).unwrap();
        let from_b = b.append_batch(&samples(2..3)).unwrap();
        assert_eq!(from_b[0].seq, 3);
        a.append_batch(&samples(3..4)).unwrap();
        assert_eq!(verify(&path).unwrap().records, 4);
    }

    #[test]
    fn update_and_delete_are_refused_by_the_triggers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mut store = AuditStore::open(&path).unwrap();
        store.append_batch(&samples(0..3)).unwrap();

        let conn = Connection::open(&path).unwrap();
        for sql in [
            "UPDATE audit_records SET payload = '{}' WHERE seq = 2",
            "DELETE FROM audit_records WHERE seq = 2",
            "DELETE FROM audit_records",
            "INSERT OR REPLACE INTO audit_records SELECT * FROM audit_records WHERE seq = 1",
            "REPLACE INTO audit_records SELECT * FROM audit_records WHERE seq = 2",
            "INSERT INTO audit_records SELECT * FROM audit_records WHERE seq = 3 \
             ON CONFLICT (seq) DO UPDATE SET host = 'elsewhere'",
        ] {
            let err = conn.execute(sql, []).unwrap_err();
            assert!(
                err.to_string().contains(APPEND_ONLY_MESSAGE),
                "{sql}: {err}"
            );
        }
        assert_eq!(verify(&path).unwrap().records, 3);
    }

    #[test]
    fn the_file_is_private_and_carries_the_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let store = AuditStore::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(schema_version(store.connection()).unwrap(), SCHEMA_VERSION);
        let journal: String = store
            .connection()
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .unwrap();
        assert_eq!(journal, "wal");
        // 2 = FULL.
        let synchronous: i64 = store
            .connection()
            .pragma_query_value(None, "synchronous", |row| row.get(0))
            .unwrap();
        assert_eq!(synchronous, 2);
    }

    #[test]
    fn other_databases_and_newer_schemas_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let foreign = dir.path().join("foreign.db");
        Connection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        assert!(matches!(
            AuditStore::open(&foreign),
            Err(AuditError::NotAnAuditLog { .. })
        ));
        assert!(matches!(
            verify(&foreign),
            Err(AuditError::NotAnAuditLog { .. })
        ));

        let newer = dir.path().join("newer.db");
        drop(AuditStore::open(&newer).unwrap());
        Connection::open(&newer)
            .unwrap()
            .pragma_update(None, "user_version", 2)
            .unwrap();
        assert!(matches!(
            AuditStore::open(&newer),
            Err(AuditError::UnsupportedSchema { found: 2, .. })
        ));
    }

    #[test]
    fn verify_does_not_create_a_missing_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.db");
        assert!(matches!(verify(&path), Err(AuditError::Open { .. })));
        assert!(!path.exists());
    }
}
