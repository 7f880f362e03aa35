//! Reading the service's audit chain wherever it lives: the `SQLite` file beside the state
//! database, or the `PostgreSQL` database every replica appends to.

use std::path::PathBuf;

use gatekeep_audit::{AuditError, ChainHead, VerifyReport};

use crate::store::{PostgresStore, postgres::audit};

/// Where the service's audit chain lives.
#[derive(Debug, Clone)]
pub(crate) enum AuditLog {
    Sqlite(PathBuf),
    Postgres(Box<PostgresStore>),
}

impl AuditLog {
    /// The chain's last record.
    pub(crate) async fn head(&self) -> Result<Option<ChainHead>, AuditError> {
        match self {
            Self::Sqlite(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    gatekeep_audit::AuditStore::open(&path).map(|store| store.head().cloned())
                })
                .await
                .map_err(|_| AuditError::WriterClosed)?
            }
            Self::Postgres(store) => audit::head(store).await,
        }
    }

    /// Verifies the chain and its guards.
    pub(crate) async fn verify(&self) -> Result<VerifyReport, AuditError> {
        match self {
            Self::Sqlite(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || gatekeep_audit::verify(&path))
                    .await
                    .map_err(|_| AuditError::WriterClosed)?
            }
            Self::Postgres(store) => audit::verify(store).await,
        }
    }
}
