//! Whether the log can be written: what [`AuditWriter::health`](crate::AuditWriter::health)
//! reports, for the agent's status, logs and decision service.

use std::path::{Path, PathBuf};

use rusqlite::ErrorCode;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{error::AuditError, record::timestamp};

/// Why commits fail, as `SQLite` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCause {
    /// `SQLITE_FULL`: the filesystem (or a quota) has no room (`ENOSPC`, `EDQUOT`).
    DiskFull,
    /// `SQLITE_READONLY`: the file or its filesystem became read-only.
    ReadOnly,
    /// `SQLITE_IOERR` and `SQLITE_CANTOPEN`: the disk failed a read or write (`EIO`).
    Io,
    /// `SQLITE_BUSY`/`SQLITE_LOCKED`: another process held the write lock too long.
    Busy,
    /// Anything else.
    Other,
}

impl FailureCause {
    /// The cause of a failed commit.
    #[must_use]
    pub fn of(err: &AuditError) -> Self {
        let AuditError::Sqlite {
            source: rusqlite::Error::SqliteFailure(failure, _),
        } = err
        else {
            return Self::Other;
        };
        match failure.code {
            ErrorCode::DiskFull => Self::DiskFull,
            ErrorCode::ReadOnly => Self::ReadOnly,
            ErrorCode::SystemIoFailure | ErrorCode::CannotOpen => Self::Io,
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => Self::Busy,
            _ => Self::Other,
        }
    }

    /// The name records and status use.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::DiskFull => "disk_full",
            Self::ReadOnly => "read_only",
            Self::Io => "io_error",
            Self::Busy => "busy",
            Self::Other => "other",
        }
    }

    /// What an operator does about it, for the log at `path`.
    #[must_use]
    pub fn fix(self, path: &Path) -> String {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        match self {
            Self::DiskFull => format!(
                "free space on the filesystem holding {} (df {}); held records are written as soon as it has room",
                dir.display(),
                dir.display()
            ),
            Self::ReadOnly => format!(
                "make {} writable again (remount its filesystem read-write)",
                dir.display()
            ),
            Self::Io => format!(
                "check the disk holding {} (the kernel log, dmesg, names the failing device)",
                path.display()
            ),
            Self::Busy => format!(
                "another process holds the write lock of {}; stop it",
                path.display()
            ),
            Self::Other => format!("check {} and the agent's log", path.display()),
        }
    }
}

/// The log cannot be written: since when, why, and what is kept meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The log's file.
    pub path: PathBuf,
    pub cause: FailureCause,
    /// The last error, with its causes (`database or disk is full`).
    pub error: String,
    /// What to do about it.
    pub fix: String,
    /// The first failed commit.
    #[serde(with = "timestamp")]
    pub since: OffsetDateTime,
    /// Records kept in memory, written in order once a commit succeeds.
    pub held: usize,
    /// The most records kept in memory ([`WriterConfig::held_capacity`](crate::WriterConfig)).
    pub held_capacity: usize,
    /// Records that arrived with the hold full: not kept, counted in the
    /// [`AuditInterrupted`](crate::RecordKind::AuditInterrupted) record.
    pub lost: u64,
    /// Commit attempts that failed.
    pub attempts: u32,
}

/// Whether the log can be written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterHealth {
    /// `Some` while commits fail.
    pub failing: Option<Failure>,
    /// Failures that ended (each written as one `audit_interrupted` record).
    pub recovered: u64,
}

impl WriterHealth {
    /// Whether records are committed (nothing failing).
    #[must_use]
    pub fn is_writable(&self) -> bool {
        self.failing.is_none()
    }
}
