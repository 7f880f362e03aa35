//! [`Store`] on `SQLite`: one dedicated thread owns the writing connection and commits in
//! groups; another owns a reading connection.
//!
//! Writers queue closures; the thread takes everything queued (up to [`MAX_GROUP`]), runs
//! each inside its own savepoint of one transaction, commits once, and only then answers
//! every caller. Under load one fsync covers many requests and decisions; a lone call is
//! committed at once. A closure that fails rolls back its savepoint only (one that writes
//! with a single statement needs none: `SQLite` undoes a failed statement itself).
//!
//! Reads (lookups, lists) go to the reading thread instead, so they never wait behind a
//! group's commit and fsync (WAL lets them run beside it). Every write is answered only
//! once committed, so a read issued after a write's answer sees it.
//!
//! Schema (`PRAGMA user_version`, see [`MIGRATIONS`]), every table `STRICT`, times in milliseconds since the
//! epoch: `requests` (a row per request, the full [`RequestRecord`] as JSON plus the columns
//! queries filter on, and an optimistic `version`), `grants` (likewise) and `reviewers` (name,
//! SHA-256 of the token, groups).

use std::{
    fs::OpenOptions,
    io,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::Duration,
};

use gatekeep_proto::model::{Grant, RequestRecord, RequestState, Revocation};
use rusqlite::{Connection, OptionalExtension as _, params};
use time::OffsetDateTime;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{
    Admission, AdmissionQuery, Claim, DeadLetter, DeliveryKey, GrantQuery, Inserted, RequestQuery,
    Shipped, Store, StoreError, StoreFuture, StoredDeadLetter, Transition, Versioned, ms,
    subject_key, target_key,
};
use crate::reviewer::Reviewer;

mod host_audit;

/// Schema version this build reads and writes: the last of [`MIGRATIONS`].
pub const SCHEMA_VERSION: i64 = 5;

/// `(user_version, SQL)`, applied in order from the database's version on; the same numbers
/// as the `PostgreSQL` migrations. Never edit a released one: add one.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, SCHEMA),
    (2, NOTIFY_SCHEMA),
    (3, host_audit::SCHEMA),
    (4, DELIVERIES_SCHEMA),
    (5, AUDIT_OWED_SCHEMA),
];
const _: () = assert!(
    MIGRATIONS[MIGRATIONS.len() - 1].0 == SCHEMA_VERSION,
    "SCHEMA_VERSION is the last migration's number"
);

/// Most calls committed in one transaction.
const MAX_GROUP: usize = 512;

const SCHEMA: &str = "
CREATE TABLE requests (
    id          TEXT PRIMARY KEY,
    host        TEXT NOT NULL,
    policy      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL,
    subject     TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    deadline    INTEGER NOT NULL,
    decided_at  INTEGER,
    version     INTEGER NOT NULL,
    record      TEXT NOT NULL
) STRICT;
CREATE INDEX requests_pending ON requests (deadline) WHERE state = 'pending';
CREATE INDEX requests_received ON requests (received_at);
CREATE INDEX requests_subject ON requests (policy, subject, decided_at);
CREATE TABLE grants (
    id         TEXT PRIMARY KEY,
    host       TEXT NOT NULL,
    policy     TEXT NOT NULL,
    target     TEXT NOT NULL,
    cgroup     TEXT,
    duration   TEXT NOT NULL,
    expires_at INTEGER,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER,
    grant      TEXT NOT NULL
) STRICT;
CREATE INDEX grants_match ON grants (host, policy, target) WHERE revoked_at IS NULL;
CREATE INDEX grants_expiry ON grants (expires_at) WHERE revoked_at IS NULL AND expires_at IS NOT NULL;
CREATE TABLE reviewers (
    name         TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    groups       TEXT NOT NULL,
    created_at   INTEGER NOT NULL
) STRICT;
";

/// Notification bookkeeping ([`crate::notify`]). Databases of older builds may hold these
/// tables at version 1 already (they were added without a version), hence `IF NOT EXISTS`.
const NOTIFY_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS notices (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS dead_letters (
    id       INTEGER PRIMARY KEY,
    sink     TEXT NOT NULL,
    key      TEXT NOT NULL,
    error    TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    at       INTEGER NOT NULL
) STRICT;
";

/// A lease per notification delivery (as `PostgreSQL`'s migration 4), so that at most one
/// worker calls a receiver for it at a time; a process alone on its `SQLite` file uses it to
/// know, after a crash, which calls have an unknown outcome.
const DELIVERIES_SCHEMA: &str = "
CREATE TABLE deliveries (
    subject      TEXT NOT NULL,
    channel      TEXT NOT NULL,
    event        TEXT NOT NULL,
    owner        TEXT,
    lease_until  INTEGER NOT NULL,
    attempted_at INTEGER,
    PRIMARY KEY (subject, channel, event)
) STRICT;
CREATE INDEX deliveries_held ON deliveries (lease_until) WHERE owner IS NOT NULL;
";

/// What the audit chain is owed (as `PostgreSQL`'s migration 5): a row for every request
/// stored in a final state, put there by the statement that stored it, taken away once its
/// `requested`, outcome and grant records are durable ([`Store::audit_owed`]). Requests
/// stored before this migration are not in it.
const AUDIT_OWED_SCHEMA: &str = "
CREATE TABLE audit_owed (
    id    TEXT PRIMARY KEY,
    since INTEGER NOT NULL
) STRICT;
CREATE INDEX audit_owed_since ON audit_owed (since);
CREATE TRIGGER requests_audit_owed_new AFTER INSERT ON requests
WHEN NEW.state <> 'pending'
BEGIN INSERT OR IGNORE INTO audit_owed (id, since)
    VALUES (NEW.id, coalesce(NEW.decided_at, NEW.received_at)); END;
CREATE TRIGGER requests_audit_owed_final AFTER UPDATE OF state ON requests
WHEN OLD.state = 'pending' AND NEW.state <> 'pending'
BEGIN INSERT OR IGNORE INTO audit_owed (id, since)
    VALUES (NEW.id, coalesce(NEW.decided_at, NEW.received_at)); END;
";

/// Active grants of one host, policy and target; the caller checks expiry and cgroup and
/// picks the newest. Kept this plain because `SQLite` re-planned the former query (with
/// `ORDER BY`, and `now` and the cgroup bound) at every call once anything had been written
/// since: a tenth of the service's CPU per request.
const FIND_GRANT: &str = "SELECT grant, expires_at, cgroup, created_at FROM grants \
     INDEXED BY grants_match WHERE host = ?1 AND policy = ?2 AND target = ?3 \
     AND revoked_at IS NULL";

/// How hard `SQLite` works to make each commit durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync on every commit: nothing acknowledged is lost, even on power loss.
    #[default]
    Full,
    /// WAL `NORMAL`: survives a crash of the service; a power loss can lose the last commits.
    Normal,
}

type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> (bool, Reply) + Send>;

/// A queued write and whether it needs a savepoint of its own.
struct Queued {
    job: Job,
    /// `false` for a job whose only write is one statement: `SQLite` undoes a failed
    /// statement by itself, and a savepoint would copy every page the job touches into the
    /// statement journal first (a fifth of the store thread's time for inserts).
    savepoint: bool,
}
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// The `SQLite` store. Cheap to clone; the threads stop when the last clone is dropped.
#[derive(Clone)]
pub struct SqliteStore {
    jobs: mpsc::Sender<Queued>,
    reads: mpsc::Sender<ReadJob>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating with mode 0600 and migrating) the database at `path` and starts its
    /// thread.
    pub fn open(path: impl AsRef<Path>, synchronous: Synchronous) -> Result<Self, StoreError> {
        let path = path.as_ref().to_owned();
        let conn = open_connection(&path, synchronous)?;
        // Opened after the writer made the schema; it only ever reads.
        let reader = open_reader(&path)?;
        let spawn_err = |source| StoreError::Open {
            path: path.clone(),
            source: rusqlite::Error::ToSqlConversionFailure(Box::new(source)),
        };
        let (jobs, receiver) = mpsc::channel::<Queued>();
        thread::Builder::new()
            .name("gatekeep-store".to_owned())
            .spawn(move || run(&conn, &receiver))
            .map_err(spawn_err)?;
        let (reads, read_receiver) = mpsc::channel::<ReadJob>();
        thread::Builder::new()
            .name("gatekeep-store-read".to_owned())
            .spawn(move || run_reads(&reader, &read_receiver))
            .map_err(spawn_err)?;
        Ok(Self { jobs, reads, path })
    }

    /// The database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the store's thread inside a savepoint; answers once its group committed.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.queue(f, true).await
    }

    /// Like [`Self::call`], for a job that writes with at most one statement.
    async fn call_single_write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.queue(f, false).await
    }

    async fn queue<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        savepoint: bool,
    ) -> Result<T, StoreError> {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = f(conn);
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |commit_error: Option<&StoreError>| {
                let result = match commit_error {
                    Some(error) => Err(StoreError::Corrupt {
                        message: format!("commit failed: {error}"),
                    }),
                    None => result,
                };
                // The caller may have gone away; its result does not matter then.
                drop(answer.send(result));
            });
            (ok, reply)
        });
        self.jobs
            .send(Queued { job, savepoint })
            .map_err(|_| StoreError::Closed)?;
        answered.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on the reading thread (each statement sees every commit answered so far).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (answer, answered) = oneshot::channel();
        let job: ReadJob = Box::new(move |conn| {
            // The caller may have gone away; its result does not matter then.
            drop(answer.send(f(conn)));
        });
        self.reads.send(job).map_err(|_| StoreError::Closed)?;
        answered.await.map_err(|_| StoreError::Closed)?
    }
}

/// The reading connection: same file, `query_only`, no writes ever.
fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(open_err)?;
    conn.pragma_update(None, "query_only", "ON")
        .map_err(open_err)?;
    Ok(conn)
}

fn open_connection(path: &Path, synchronous: Synchronous) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(err) => {
            return Err(open_err(rusqlite::Error::ToSqlConversionFailure(Box::new(
                err,
            ))));
        }
    }
    let mut conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(open_err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(open_err)?;
    conn.pragma_update(
        None,
        "synchronous",
        match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        },
    )
    .map_err(open_err)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(open_err)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Schema {
            path: path.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    for (number, sql) in MIGRATIONS.iter().filter(|(number, _)| *number > version) {
        let tx = conn.transaction().map_err(open_err)?;
        tx.execute_batch(sql).map_err(open_err)?;
        tx.pragma_update(None, "user_version", number)
            .map_err(open_err)?;
        tx.commit().map_err(open_err)?;
    }
    Ok(conn)
}

/// The store thread: group commit until every sender is gone.
fn run(conn: &Connection, jobs: &mpsc::Receiver<Queued>) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let mut replies = Vec::with_capacity(group.len());
        let begun = conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(StoreError::from);
        if let Err(error) = begun {
            tracing::error!(%error, "store: failed to begin a transaction");
            for queued in group {
                let (_, reply) = (queued.job)(conn);
                reply(Some(&error));
            }
            continue;
        }
        for Queued { job, savepoint } in group {
            if !savepoint {
                replies.push(job(conn).1);
                continue;
            }
            // Cached statements: parsing these for every job cost more than some jobs.
            if let Err(error) = execute_cached(conn, "SAVEPOINT job") {
                tracing::error!(%error, "store: savepoint failed");
            }
            let (ok, reply) = job(conn);
            let end = if ok {
                execute_cached(conn, "RELEASE job")
            } else {
                execute_cached(conn, "ROLLBACK TO job")
                    .and_then(|()| execute_cached(conn, "RELEASE job"))
            };
            if let Err(error) = end {
                tracing::error!(%error, "store: failed to end a savepoint");
            }
            replies.push(reply);
        }
        let committed = conn.execute_batch("COMMIT").map_err(StoreError::from);
        if let Err(error) = &committed {
            tracing::error!(%error, "store: commit failed");
            drop(conn.execute_batch("ROLLBACK"));
        }
        for reply in replies {
            reply(committed.as_ref().err());
        }
    }
}

/// The reading thread: everything queued runs in one read transaction.
///
/// `SQLite` drops a connection's page cache whenever it starts a read transaction after
/// another connection committed, which under load is before nearly every statement: each
/// lookup read its B-tree pages again. One transaction per group takes one snapshot and
/// keeps the cache for the group. The snapshot starts after every job in it was queued,
/// so each still sees every write answered before it was asked for.
fn run_reads(conn: &Connection, reads: &mpsc::Receiver<ReadJob>) {
    while let Ok(first) = reads.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match reads.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        // A lone read is its own transaction already.
        let grouped = group.len() > 1 && execute_cached(conn, "BEGIN").is_ok();
        for job in group {
            job(conn);
        }
        if grouped && let Err(error) = execute_cached(conn, "COMMIT") {
            tracing::error!(%error, "store: failed to end a read transaction");
        }
    }
}

fn execute_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

fn version_from_sql(version: i64) -> Result<u64, StoreError> {
    u64::try_from(version).map_err(|_| StoreError::Corrupt {
        message: format!("negative version {version}"),
    })
}

fn version_to_sql(version: u64) -> Result<i64, StoreError> {
    i64::try_from(version).map_err(|_| StoreError::Corrupt {
        message: format!("version {version} too large"),
    })
}

fn read_record(json: &str, version: i64) -> Result<Versioned<RequestRecord>, StoreError> {
    Ok(Versioned {
        version: version_from_sql(version)?,
        value: serde_json::from_str(json)?,
    })
}

fn from_ms(value: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(value) * 1_000_000).map_err(|_| {
        StoreError::Corrupt {
            message: format!("time {value} out of range"),
        }
    })
}

fn insert_request(conn: &Connection, record: &RequestRecord) -> Result<Inserted, StoreError> {
    let id = record.request.id.to_string();
    let existing = conn
        .prepare_cached("SELECT record, version FROM requests WHERE id = ?1")?
        .query_row([&id], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
        })
        .optional()?;
    if let Some((json, version)) = existing {
        return Ok(Inserted::Existing(Box::new(read_record(&json, version)?)));
    }
    conn.prepare_cached(
        "INSERT INTO requests (id, host, policy, kind, state, subject, received_at, deadline, \
         decided_at, version, record) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 1, ?10)",
    )?
    .execute(params![
        id,
        record.host,
        record.request.policy,
        record.request.kind().as_str(),
        record.state.as_str(),
        subject_key(&record.request.target),
        ms(record.received_at),
        ms(record.deadline),
        record.decision.as_ref().map(|d| ms(d.decided_at)),
        serde_json::to_string(record)?,
    ])?;
    Ok(Inserted::New)
}

fn get_request(
    conn: &Connection,
    id: Uuid,
) -> Result<Option<Versioned<RequestRecord>>, StoreError> {
    conn.prepare_cached("SELECT record, version FROM requests WHERE id = ?1")?
        .query_row([id.to_string()], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
        })
        .optional()?
        .map(|(json, version)| read_record(&json, version))
        .transpose()
}

/// The newest live grant for `query` (see [`Store::admission`]).
fn find_grant(conn: &Connection, query: &AdmissionQuery) -> Result<Option<Grant>, StoreError> {
    let now = ms(query.now);
    let mut stmt = conn.prepare_cached(FIND_GRANT)?;
    let rows = stmt.query_map(
        params![query.host, query.policy, target_key(&query.target)?],
        |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, Option<i64>>(1)?,
                row.get::<_, Option<String>>(2)?,
                row.get::<_, i64>(3)?,
            ))
        },
    )?;
    let mut newest: Option<(i64, String)> = None;
    for row in rows {
        let (json, expires_at, grant_cgroup, created_at) = row?;
        let live = expires_at.is_none_or(|at| at > now);
        let here = grant_cgroup.is_none_or(|c| c == query.cgroup);
        if live && here && newest.as_ref().is_none_or(|(at, _)| created_at > *at) {
            newest = Some((created_at, json));
        }
    }
    newest
        .map(|(_, json)| serde_json::from_str(&json))
        .transpose()
        .map_err(StoreError::from)
}

fn insert_grant(conn: &Connection, grant: &Grant) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO grants (id, host, policy, target, cgroup, duration, expires_at, created_at, \
         revoked_at, grant) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        grant.id.to_string(),
        grant.host,
        grant.policy,
        target_key(&grant.target)?,
        grant.cgroup,
        grant.duration.to_string(),
        grant.expires_at.map(ms),
        ms(grant.created_at),
        grant.revoked.as_ref().map(|r| ms(r.at)),
        serde_json::to_string(grant)?,
    ])?;
    Ok(())
}

fn transition(conn: &Connection, transition: &Transition) -> Result<bool, StoreError> {
    let record = &transition.record;
    let changed = conn
        .prepare_cached(
            "UPDATE requests SET state = ?1, decided_at = ?2, deadline = ?3, record = ?4, \
             version = version + 1 WHERE id = ?5 AND version = ?6",
        )?
        .execute(params![
            record.state.as_str(),
            record.decision.as_ref().map(|d| ms(d.decided_at)),
            ms(record.deadline),
            serde_json::to_string(record)?,
            record.request.id.to_string(),
            version_to_sql(transition.expected_version)?,
        ])?;
    if changed == 0 {
        return Ok(false);
    }
    if let Some(grant) = &transition.new_grant {
        insert_grant(conn, grant)?;
    }
    Ok(true)
}

/// See [`Store::request_ids_with_prefix`]: a range on the primary key's index (every
/// character of an id sorts before `g`).
fn request_ids_with_prefix(
    conn: &Connection,
    prefix: &str,
    limit: usize,
) -> Result<Vec<Uuid>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id FROM requests WHERE id >= ?1 AND id < ?2 ORDER BY id LIMIT ?3",
    )?;
    let rows = stmt.query_map(
        params![
            prefix,
            format!("{prefix}g"),
            i64::try_from(limit).unwrap_or(i64::MAX)
        ],
        |row| row.get::<_, String>(0),
    )?;
    let mut out = Vec::new();
    for row in rows {
        let text = row?;
        out.push(Uuid::try_parse(&text).map_err(|err| StoreError::Corrupt {
            message: format!("stored request id `{text}` is not a uuid: {err}"),
        })?);
    }
    Ok(out)
}

fn list_requests(
    conn: &Connection,
    query: &RequestQuery,
) -> Result<Vec<RequestRecord>, StoreError> {
    let order = if query.newest_first { "DESC" } else { "ASC" };
    let sql = format!(
        "SELECT record, version FROM requests WHERE (?1 IS NULL OR state = ?1) \
         AND (?2 = 0 OR state <> 'pending') AND (?3 IS NULL OR host = ?3) \
         AND (?4 IS NULL OR policy = ?4) AND (?5 IS NULL OR kind = ?5) \
         AND (?6 IS NULL OR subject = ?6) AND (?7 IS NULL OR id <> ?7) \
         ORDER BY received_at {order}, id LIMIT ?8"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(
        params![
            query.state.map(RequestState::as_str),
            i64::from(query.final_only),
            query.host,
            query.policy,
            query.kind.map(gatekeep_proto::model::Kind::as_str),
            query.subject,
            query.exclude.map(|id| id.to_string()),
            i64::try_from(query.limit).unwrap_or(i64::MAX),
        ],
        |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)),
    )?;
    let mut out = Vec::new();
    for row in rows {
        let (json, version) = row?;
        out.push(read_record(&json, version)?.value);
    }
    Ok(out)
}

/// See [`Store::audit_owed`].
fn audit_owed(
    conn: &Connection,
    before: OffsetDateTime,
    limit: usize,
) -> Result<Vec<RequestRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT r.record, r.version FROM audit_owed o JOIN requests r ON r.id = o.id \
         WHERE o.since <= ?1 ORDER BY o.since, o.id LIMIT ?2",
    )?;
    let rows = stmt.query_map(
        params![ms(before), i64::try_from(limit).unwrap_or(i64::MAX)],
        |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)),
    )?;
    let mut out = Vec::new();
    for row in rows {
        let (json, version) = row?;
        out.push(read_record(&json, version)?.value);
    }
    Ok(out)
}

fn grants_where(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Grant>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, |row| row.get::<_, String>(0))?;
    let mut out = Vec::new();
    for row in rows {
        out.push(serde_json::from_str(&row?)?);
    }
    Ok(out)
}

impl Store for SqliteStore {
    fn insert_request(&self, record: RequestRecord) -> StoreFuture<'_, Inserted> {
        Box::pin(self.call_single_write(move |conn| insert_request(conn, &record)))
    }

    fn get_request(&self, id: Uuid) -> StoreFuture<'_, Option<Versioned<RequestRecord>>> {
        Box::pin(self.read(move |conn| get_request(conn, id)))
    }

    fn transition(&self, t: Transition) -> StoreFuture<'_, bool> {
        Box::pin(self.call(move |conn| transition(conn, &t)))
    }

    fn list_requests(&self, query: RequestQuery) -> StoreFuture<'_, Vec<RequestRecord>> {
        Box::pin(self.read(move |conn| list_requests(conn, &query)))
    }

    fn audit_owed(
        &self,
        before: OffsetDateTime,
        limit: usize,
    ) -> StoreFuture<'_, Vec<RequestRecord>> {
        Box::pin(self.read(move |conn| audit_owed(conn, before, limit)))
    }

    fn audit_settled(&self, ids: Vec<Uuid>) -> StoreFuture<'_, ()> {
        Box::pin(self.call(move |conn| {
            let mut stmt = conn.prepare_cached("DELETE FROM audit_owed WHERE id = ?1")?;
            for id in ids {
                stmt.execute([id.to_string()])?;
            }
            Ok(())
        }))
    }

    fn request_ids_with_prefix(&self, prefix: String, limit: usize) -> StoreFuture<'_, Vec<Uuid>> {
        Box::pin(self.read(move |conn| request_ids_with_prefix(conn, &prefix, limit)))
    }

    fn due_requests(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> StoreFuture<'_, Vec<Versioned<RequestRecord>>> {
        Box::pin(self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT record, version FROM requests WHERE state = 'pending' AND deadline <= ?1 \
                 ORDER BY deadline LIMIT ?2",
            )?;
            let rows = stmt.query_map(
                params![ms(now), i64::try_from(limit).unwrap_or(i64::MAX)],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)),
            )?;
            let mut out = Vec::new();
            for row in rows {
                let (json, version) = row?;
                out.push(read_record(&json, version)?);
            }
            Ok(out)
        }))
    }

    fn next_wakeup(&self) -> StoreFuture<'_, Option<OffsetDateTime>> {
        Box::pin(self.read(|conn| {
            let next: Option<i64> = conn.query_row(
                "SELECT min(t) FROM (\
                 SELECT min(deadline) AS t FROM requests WHERE state = 'pending' \
                 UNION ALL SELECT min(expires_at) FROM grants \
                 WHERE revoked_at IS NULL AND expires_at IS NOT NULL)",
                [],
                |row| row.get(0),
            )?;
            next.map(from_ms).transpose()
        }))
    }

    fn count_pending(&self) -> StoreFuture<'_, u64> {
        Box::pin(self.read(|conn| {
            let count: i64 = conn.query_row(
                "SELECT count(*) FROM requests WHERE state = 'pending'",
                [],
                |row| row.get(0),
            )?;
            Ok(u64::try_from(count).unwrap_or(0))
        }))
    }

    fn get_grant(&self, id: Uuid) -> StoreFuture<'_, Option<Grant>> {
        Box::pin(self.read(move |conn| {
            Ok(grants_where(
                conn,
                "SELECT grant FROM grants WHERE id = ?1",
                [id.to_string()],
            )?
            .pop())
        }))
    }

    fn revoke_grant(&self, id: Uuid, revocation: Revocation) -> StoreFuture<'_, Option<Grant>> {
        Box::pin(self.call(move |conn| {
            let Some(mut grant) =
                grants_where(conn, "SELECT grant FROM grants WHERE id = ?1", [id.to_string()])?
                    .pop()
            else {
                return Ok(None);
            };
            if grant.revoked.is_some() {
                return Ok(None);
            }
            let at = ms(revocation.at);
            grant.revoked = Some(revocation);
            let changed = conn.execute(
                "UPDATE grants SET revoked_at = ?1, grant = ?2 WHERE id = ?3 AND revoked_at IS NULL",
                params![at, serde_json::to_string(&grant)?, id.to_string()],
            )?;
            Ok((changed == 1).then_some(grant))
        }))
    }

    fn list_grants(&self, query: GrantQuery, now: OffsetDateTime) -> StoreFuture<'_, Vec<Grant>> {
        Box::pin(self.read(move |conn| {
            grants_where(
                conn,
                "SELECT grant FROM grants WHERE (?1 IS NULL OR host = ?1) \
                 AND (?2 IS NULL OR policy = ?2) \
                 AND (?3 = 1 OR (revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?4))) \
                 ORDER BY created_at, id",
                params![
                    query.host,
                    query.policy,
                    i64::from(query.include_inactive),
                    ms(now)
                ],
            )
        }))
    }

    fn admission(&self, query: AdmissionQuery) -> StoreFuture<'_, Admission> {
        Box::pin(self.read(move |conn| {
            Ok(Admission {
                existing: get_request(conn, query.id)?,
                grant: find_grant(conn, &query)?,
            })
        }))
    }

    fn due_grants(&self, now: OffsetDateTime) -> StoreFuture<'_, Vec<Grant>> {
        Box::pin(self.read(move |conn| {
            grants_where(
                conn,
                "SELECT grant FROM grants WHERE revoked_at IS NULL AND expires_at IS NOT NULL \
                 AND expires_at <= ?1 ORDER BY expires_at",
                [ms(now)],
            )
        }))
    }

    fn session_grants(&self, host: String, cgroup: String) -> StoreFuture<'_, Vec<Grant>> {
        Box::pin(self.read(move |conn| {
            let below = format!("{}/", cgroup.trim_end_matches('/'));
            grants_where(
                conn,
                "SELECT grant FROM grants WHERE host = ?1 AND revoked_at IS NULL \
                 AND duration = 'session' AND cgroup IS NOT NULL \
                 AND (cgroup = ?2 OR substr(cgroup, 1, length(?3)) = ?3)",
                params![host, cgroup, below],
            )
        }))
    }

    fn add_reviewer(&self, reviewer: Reviewer, token_sha256: String) -> StoreFuture<'_, ()> {
        Box::pin(self.call(move |conn| {
            let inserted = conn.execute(
                "INSERT INTO reviewers (name, token_sha256, groups, created_at) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (name) DO NOTHING",
                params![
                    reviewer.name,
                    token_sha256,
                    serde_json::to_string(&reviewer.groups)?,
                    ms(OffsetDateTime::now_utc())
                ],
            )?;
            if inserted == 0 {
                return Err(StoreError::ReviewerExists {
                    name: reviewer.name,
                });
            }
            Ok(())
        }))
    }

    fn reviewer_by_token(&self, token_sha256: String) -> StoreFuture<'_, Option<Reviewer>> {
        Box::pin(self.read(move |conn| {
            conn.prepare_cached("SELECT name, groups FROM reviewers WHERE token_sha256 = ?1")?
                .query_row([token_sha256], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
                })
                .optional()?
                .map(|(name, groups)| {
                    Ok(Reviewer {
                        name,
                        groups: serde_json::from_str(&groups)?,
                        email: None,
                    })
                })
                .transpose()
        }))
    }

    fn list_reviewers(&self) -> StoreFuture<'_, Vec<Reviewer>> {
        Box::pin(self.read(|conn| {
            let mut stmt = conn.prepare("SELECT name, groups FROM reviewers ORDER BY name")?;
            let rows = stmt.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (name, groups) = row?;
                out.push(Reviewer {
                    name,
                    groups: serde_json::from_str(&groups)?,
                    email: None,
                });
            }
            Ok(out)
        }))
    }

    fn remove_reviewer(&self, name: String) -> StoreFuture<'_, bool> {
        Box::pin(self.call(move |conn| {
            Ok(conn.execute("DELETE FROM reviewers WHERE name = ?1", [name])? == 1)
        }))
    }

    fn notice(&self, key: String) -> StoreFuture<'_, Option<String>> {
        Box::pin(self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT value FROM notices WHERE key = ?1")?
                .query_row([key], |row| row.get(0))
                .optional()?)
        }))
    }

    fn set_notice(&self, key: String, value: String) -> StoreFuture<'_, ()> {
        Box::pin(self.call_single_write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO notices (key, value, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            )?
            .execute(params![key, value, ms(OffsetDateTime::now_utc())])?;
            Ok(())
        }))
    }

    fn dead_letter(&self, letter: DeadLetter) -> StoreFuture<'_, ()> {
        Box::pin(self.call_single_write(move |conn| {
            conn.execute(
                "INSERT INTO dead_letters (sink, key, error, attempts, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![letter.sink, letter.key, letter.error, letter.attempts, ms(letter.at)],
            )?;
            Ok(())
        }))
    }

    fn ship_host_audit(
        &self,
        host: String,
        batch: gatekeep_proto::host_audit::ShipBatch,
        now: OffsetDateTime,
    ) -> StoreFuture<'_, Shipped> {
        Box::pin(self.call(move |conn| host_audit::ship(conn, &host, &batch, now)))
    }

    fn host_audit_heads(
        &self,
        host: Option<String>,
    ) -> StoreFuture<'_, Vec<gatekeep_proto::host_audit::HostHead>> {
        Box::pin(self.read(move |conn| host_audit::heads(conn, host.as_deref())))
    }

    fn host_audit_divergences(
        &self,
        host: Option<String>,
    ) -> StoreFuture<'_, Vec<gatekeep_proto::host_audit::Divergence>> {
        Box::pin(self.read(move |conn| host_audit::divergences(conn, host.as_deref())))
    }

    fn host_audit_records(
        &self,
        host: String,
        from_seq: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<gatekeep_proto::host_audit::HostAuditRecord>> {
        Box::pin(self.read(move |conn| host_audit::records(conn, &host, from_seq, limit)))
    }

    fn dead_letters(&self, limit: usize) -> StoreFuture<'_, Vec<StoredDeadLetter>> {
        Box::pin(self.read(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT id, sink, key, error, attempts, at FROM dead_letters ORDER BY id LIMIT ?1",
            )?;
            let rows = statement.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, i64>(4)?,
                    row.get::<_, i64>(5)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, sink, key, error, attempts, at) = row?;
                out.push(stored_dead_letter(id, sink, key, error, attempts, at)?);
            }
            Ok(out)
        }))
    }

    fn take_dead_letter(&self, id: i64) -> StoreFuture<'_, Option<StoredDeadLetter>> {
        Box::pin(self.call_single_write(move |conn| {
            let row = conn
                .prepare_cached(
                    "DELETE FROM dead_letters WHERE id = ?1 \
                     RETURNING id, sink, key, error, attempts, at",
                )?
                .query_row([id], |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, i64>(4)?,
                        row.get::<_, i64>(5)?,
                    ))
                })
                .optional()?;
            row.map(|(id, sink, key, error, attempts, at)| {
                stored_dead_letter(id, sink, key, error, attempts, at)
            })
            .transpose()
        }))
    }

    fn claim_delivery(
        &self,
        key: DeliveryKey,
        owner: String,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> StoreFuture<'_, Claim> {
        Box::pin(self.call_single_write(move |conn| {
            let taken: Option<Option<i64>> = conn
                .prepare_cached(CLAIM_DELIVERY)?
                .query_row(
                    params![
                        key.subject,
                        key.channel,
                        key.event,
                        owner,
                        ms(lease_until),
                        ms(now)
                    ],
                    |row| row.get(0),
                )
                .optional()?;
            Ok(match taken {
                None => Claim::Held,
                Some(attempted_at) => Claim::Taken {
                    attempted_at: attempted_at.map(from_ms).transpose()?,
                },
            })
        }))
    }

    fn delivery_attempt(
        &self,
        key: DeliveryKey,
        owner: String,
        at: OffsetDateTime,
    ) -> StoreFuture<'_, ()> {
        Box::pin(self.call_single_write(move |conn| {
            conn.prepare_cached(
                "UPDATE deliveries SET attempted_at = coalesce(attempted_at, ?5) \
                 WHERE subject = ?1 AND channel = ?2 AND event = ?3 AND owner = ?4",
            )?
            .execute(params![key.subject, key.channel, key.event, owner, ms(at)])?;
            Ok(())
        }))
    }

    fn release_delivery(&self, key: DeliveryKey, owner: String) -> StoreFuture<'_, ()> {
        Box::pin(self.call_single_write(move |conn| {
            conn.prepare_cached(
                "UPDATE deliveries SET owner = NULL, attempted_at = NULL \
                 WHERE subject = ?1 AND channel = ?2 AND event = ?3 AND owner = ?4",
            )?
            .execute(params![key.subject, key.channel, key.event, owner])?;
            Ok(())
        }))
    }

    fn expired_deliveries(
        &self,
        channel: String,
        now: OffsetDateTime,
    ) -> StoreFuture<'_, Vec<DeliveryKey>> {
        Box::pin(self.read(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT subject, channel, event FROM deliveries \
                 WHERE owner IS NOT NULL AND lease_until < ?2 \
                 AND (channel = ?1 OR substr(channel, 1, length(?1) + 1) = ?1 || ':') \
                 ORDER BY lease_until LIMIT 1000",
            )?;
            let rows = statement.query_map(params![channel, ms(now)], |row| {
                Ok(DeliveryKey::new(
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                ))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        }))
    }
}

/// Takes a delivery's lease (see [`Store::claim_delivery`]); a row comes back only if the
/// caller holds it now. `?5` the new lease's end, `?6` now.
const CLAIM_DELIVERY: &str = "INSERT INTO deliveries (subject, channel, event, owner, lease_until) \
     VALUES (?1, ?2, ?3, ?4, ?5) \
     ON CONFLICT (subject, channel, event) DO UPDATE SET owner = excluded.owner, \
     lease_until = excluded.lease_until \
     WHERE deliveries.owner IS NULL OR deliveries.owner = excluded.owner \
     OR deliveries.lease_until < ?6 \
     RETURNING attempted_at";

fn stored_dead_letter(
    id: i64,
    sink: String,
    key: String,
    error: String,
    attempts: i64,
    at: i64,
) -> Result<StoredDeadLetter, StoreError> {
    Ok(StoredDeadLetter {
        id,
        letter: DeadLetter {
            sink,
            key,
            error,
            attempts: u32::try_from(attempts).map_err(|_| StoreError::Corrupt {
                message: format!("dead letter {id}: attempts {attempts}"),
            })?,
            at: from_ms(at)?,
        },
    })
}

#[cfg(test)]
mod tests {
    use rusqlite::StatementStatus;

    use super::*;

    #[test]
    fn queued_reads_share_one_transaction_that_ends_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let writer = open_connection(&path, Synchronous::Normal).unwrap();
        let reader = open_reader(&path).unwrap();
        let insert = |id: &str| {
            writer
                .execute(
                    "INSERT INTO requests (id, host, policy, kind, state, subject, received_at, \
                     deadline, decided_at, version, record) \
                     VALUES (?1, 'h', 'p', 'exec', 'approved', 's', 1, 2, 3, 1, '{}')",
                    [id],
                )
                .unwrap();
        };
        let count = |conn: &Connection| -> i64 {
            conn.query_row("SELECT count(*) FROM requests", [], |row| row.get(0))
                .unwrap()
        };
        insert("id-0");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (jobs, queued) = mpsc::channel::<ReadJob>();
        for _ in 0..3 {
            let seen = std::sync::Arc::clone(&seen);
            jobs.send(Box::new(move |conn| {
                seen.lock()
                    .unwrap()
                    .push((conn.is_autocommit(), count(conn)));
            }))
            .unwrap();
        }
        drop(jobs);
        run_reads(&reader, &queued);
        // All three ran inside one transaction and saw the write made before them...
        assert_eq!(*seen.lock().unwrap(), vec![(false, 1); 3]);
        // ...which ended with the group: a later write is seen.
        assert!(reader.is_autocommit());
        insert("id-1");
        assert_eq!(count(&reader), 2);
    }

    /// A job of a group that fails leaves nothing behind and fails no other job: with a
    /// savepoint for a job of several writes, and without one for a single statement.
    #[test]
    fn a_failed_job_undoes_only_itself_with_or_without_a_savepoint() {
        fn insert(conn: &Connection, id: &str) -> rusqlite::Result<usize> {
            conn.execute(
                "INSERT INTO requests (id, host, policy, kind, state, subject, received_at, \
                 deadline, decided_at, version, record) \
                 VALUES (?1, 'h', 'p', 'exec', 'approved', 's', 1, 2, 3, 1, '{}')",
                [id],
            )
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let writer = open_connection(&path, Synchronous::Normal).unwrap();
        let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let job =
            |name: &'static str, savepoint: bool, work: fn(&Connection) -> rusqlite::Result<()>| {
                let answers = std::sync::Arc::clone(&answers);
                Queued {
                    job: Box::new(move |conn| {
                        let ok = work(conn).is_ok();
                        let reply: Reply = Box::new(move |commit: Option<&StoreError>| {
                            answers.lock().unwrap().push((name, ok && commit.is_none()));
                        });
                        (ok, reply)
                    }),
                    savepoint,
                }
            };
        let (jobs, queued) = mpsc::channel::<Queued>();
        jobs.send(job("one", false, |c| insert(c, "id-1").map(drop)))
            .unwrap();
        // The same id again: the statement fails and undoes itself.
        jobs.send(job("again", false, |c| insert(c, "id-1").map(drop)))
            .unwrap();
        // A second write fails after the first succeeded: the savepoint takes both back.
        jobs.send(job("half", true, |c| {
            insert(c, "id-2")?;
            insert(c, "id-1").map(drop)
        }))
        .unwrap();
        jobs.send(job("three", false, |c| insert(c, "id-3").map(drop)))
            .unwrap();
        drop(jobs);
        run(&writer, &queued);
        assert_eq!(
            *answers.lock().unwrap(),
            [
                ("one", true),
                ("again", false),
                ("half", false),
                ("three", true)
            ]
        );
        let mut stmt = writer
            .prepare("SELECT id FROM requests ORDER BY id")
            .unwrap();
        let ids: Vec<String> = stmt
            .query_map([], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(ids, ["id-1", "id-3"]);
    }

    #[test]
    fn grant_lookups_are_not_replanned_for_every_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let writer = open_connection(&path, Synchronous::Normal).unwrap();
        let reader = open_reader(&path).unwrap();
        // What the lookup looked like before.
        let old = "SELECT grant FROM grants WHERE host = ?1 AND policy = ?2 AND target = ?3 \
                   AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?4) \
                   AND (cgroup IS NULL OR cgroup = ?5) ORDER BY created_at DESC LIMIT 1";
        for n in 0..10 {
            // Requests are stored between lookups, as when the service runs.
            writer
                .execute(
                    "INSERT INTO requests (id, host, policy, kind, state, subject, received_at, \
                     deadline, decided_at, version, record) \
                     VALUES (?1, 'h', 'p', 'exec', 'approved', 's', 1, 2, 3, 1, '{}')",
                    [format!("id-{n}")],
                )
                .unwrap();
            let mut stmt = reader.prepare_cached(FIND_GRANT).unwrap();
            assert_eq!(
                stmt.query_map(params!["h", "p", "t"], |_| Ok(()))
                    .unwrap()
                    .count(),
                0
            );
            let mut stmt = reader.prepare_cached(old).unwrap();
            let rows = stmt
                .query_map(params!["h", "p", "t", n, "c"], |_| Ok(()))
                .unwrap();
            assert_eq!(rows.count(), 0);
        }
        let status = |sql| {
            let stmt = reader.prepare_cached(sql).unwrap();
            stmt.get_status(StatementStatus::RePrepare)
        };
        assert_eq!(status(FIND_GRANT), 0, "the lookup is planned once");
        assert!(status(old) >= 9, "the old lookup was planned at every call");
    }
}
