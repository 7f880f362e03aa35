//! Errors of the audit log.

use std::{io, path::PathBuf, sync::Arc};

/// Everything that can go wrong opening, writing, verifying or exporting an audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The database file could not be created or opened.
    #[error("failed to open audit log `{}`", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The database file could not be created with owner-only permissions.
    #[error("failed to create audit log file `{}`", path.display())]
    CreateFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The database holds other tables and no audit schema: it is not an audit log.
    #[error("`{}` is not a gatekeep audit log", path.display())]
    NotAnAuditLog { path: PathBuf },
    /// The database was written by a newer (or unknown) schema version.
    #[error("audit log `{}` has schema version {found}, this build supports {supported}", path.display())]
    UnsupportedSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// A `SQLite` statement failed.
    #[error("audit log database error")]
    Sqlite {
        #[from]
        source: rusqlite::Error,
    },
    /// A [`ChainStore`](crate::ChainStore) other than the `SQLite` one failed.
    #[error("audit log database error ({location})")]
    Backend {
        location: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A record's timestamp cannot be written as RFC 3339 (year outside 0000..=9999).
    #[error("record timestamp {at} is outside the range RFC 3339 can express")]
    TimestampOutOfRange { at: time::OffsetDateTime },
    /// A timestamp could not be formatted.
    #[error("failed to format record timestamp")]
    FormatTimestamp {
        #[source]
        source: time::error::Format,
    },
    /// A payload could not be encoded as JSON.
    #[error("failed to encode record payload as json")]
    EncodePayload {
        #[source]
        source: serde_json::Error,
    },
    /// The hash chain is broken: a record was changed, removed or inserted outside this crate.
    #[error("audit record {seq} was tampered with: {reason}")]
    Tampered { seq: u64, reason: TamperReason },
    /// Writing the JSON Lines export failed.
    #[error("failed to write audit export")]
    Export {
        #[source]
        source: io::Error,
    },
    /// Reading an export to verify it failed.
    #[error("failed to read audit export")]
    ReadExport {
        #[source]
        source: io::Error,
    },
    /// A line of an export is not a record object.
    #[error("line {line} of the audit export is not a valid record")]
    ExportLine {
        line: u64,
        #[source]
        source: serde_json::Error,
    },
    /// The writer thread could not be started.
    #[error("failed to start the audit writer thread")]
    SpawnWriter {
        #[source]
        source: io::Error,
    },
    /// The writer was shut down (or its thread is gone); nothing more can be submitted.
    #[error("the audit writer is shut down")]
    WriterClosed,
    /// The writer thread panicked.
    #[error("the audit writer thread panicked")]
    WriterPanicked,
    /// The writer failed to commit; the records stay queued and are retried.
    #[error("the audit writer failed to commit records (they stay queued and are retried)")]
    Commit {
        #[source]
        source: Arc<AuditError>,
    },
    /// Commits fail (disk full, I/O error, read-only): the records before this flush are held
    /// in memory, not durable. They are written once a commit succeeds.
    #[error("the audit log cannot be written now ({held} records held in memory)")]
    Unavailable {
        held: usize,
        #[source]
        source: Arc<AuditError>,
    },
    /// At shutdown the writer gave up committing after repeated failures: `lost` records were
    /// not written.
    #[error("the audit writer gave up at shutdown, {lost} records were not written")]
    Unwritten {
        lost: usize,
        #[source]
        source: Arc<AuditError>,
    },
}

/// What exactly is wrong with a record of a broken chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TamperReason {
    /// Sequence numbers are not continuous: a record is missing (deleted) before this one.
    #[error("sequence gap, expected seq {expected}")]
    Gap { expected: u64 },
    /// The record's `prev_hash` is not the previous record's `hash`.
    #[error("prev_hash {found} does not match the previous record's hash {expected}")]
    BrokenLink { expected: String, found: String },
    /// The record's content does not hash to its stored `hash`.
    #[error("stored hash {stored} does not match the recomputed hash {computed}")]
    HashMismatch { stored: String, computed: String },
    /// A column has an impossible value (wrong type, invalid JSON, negative seq).
    #[error("malformed record: {detail}")]
    Malformed { detail: String },
}

/// `err` and its causes, `: `-separated on one line: a log line that says "database or disk
/// is full" rather than only "audit log database error".
#[must_use]
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
