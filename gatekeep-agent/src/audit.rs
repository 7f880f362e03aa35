//! The agent's side of the local audit log: a sink the decision path hands
//! records to without waiting, and a forwarder that queues them into the
//! batching [`AuditWriter`] in order. On shutdown the forwarder drains and
//! the writer commits everything before the agent exits.

use std::{
    path::Path,
    sync::{Arc, Mutex, PoisonError},
};

use gatekeep_audit::{AuditError, AuditRecord, AuditWriter, WriterConfig};
use tokio::{sync::mpsc, task::JoinHandle};

/// Takes audit records without blocking the caller.
pub trait AuditSink: Send + Sync + 'static {
    fn record(&self, record: AuditRecord);
}

/// Sends records to the forwarder task.
#[derive(Clone)]
pub struct AuditHandle {
    records: mpsc::UnboundedSender<AuditRecord>,
}

impl AuditSink for AuditHandle {
    fn record(&self, record: AuditRecord) {
        if self.records.send(record).is_err() {
            tracing::error!("audit forwarder is gone; a record was not written");
        }
    }
}

/// The running audit pipeline.
pub struct AuditPipeline {
    pub handle: AuditHandle,
    forwarder: JoinHandle<()>,
    writer: Arc<AuditWriter>,
}

impl AuditPipeline {
    /// Opens the log at `path` (creating it and its folder) and starts the
    /// writer thread and the forwarder task.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|source| AuditError::CreateFile {
                path: parent.to_owned(),
                source,
            })?;
        }
        let writer = Arc::new(AuditWriter::open(path, WriterConfig::default())?);
        let (records, mut receiver) = mpsc::unbounded_channel::<AuditRecord>();
        let forward_to = Arc::clone(&writer);
        let forwarder = tokio::spawn(async move {
            while let Some(record) = receiver.recv().await {
                if let Err(err) = forward_to.submit_async(record).await {
                    tracing::error!(error = %err, "failed to queue an audit record");
                }
            }
        });
        Ok(Self {
            handle: AuditHandle { records },
            forwarder,
            writer,
        })
    }

    /// Drains the forwarder (once every other handle clone is dropped) and
    /// commits everything; returns the last durable seq.
    pub async fn shutdown(self) -> Result<u64, AuditError> {
        let Self {
            handle,
            forwarder,
            writer,
        } = self;
        drop(handle);
        if forwarder.await.is_err() {
            tracing::error!("audit forwarder panicked");
        }
        tokio::task::spawn_blocking(move || writer.shutdown())
            .await
            .map_err(|_| AuditError::WriterPanicked)?
    }
}

/// Collects records in memory (tests, dry runs).
#[derive(Debug, Default, Clone)]
pub struct MemorySink {
    records: Arc<Mutex<Vec<AuditRecord>>>,
}

impl MemorySink {
    #[must_use]
    pub fn records(&self) -> Vec<AuditRecord> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl AuditSink for MemorySink {
    fn record(&self, record: AuditRecord) {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(record);
    }
}

#[cfg(test)]
mod tests {
    use gatekeep_audit::RecordKind;
    use serde_json::json;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_record_is_committed_by_shutdown_and_the_chain_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/audit.db");
        let pipeline = AuditPipeline::open(&path).expect("open");
        for i in 0..500 {
            pipeline.handle.record(AuditRecord::new(
                RecordKind::Requested,
                "h",
                json!({ "i": i }),
            ));
        }
        let last = pipeline.shutdown().await.expect("shutdown");
        assert_eq!(last, 500);
        let report = gatekeep_audit::verify(&path).expect("verify");
        assert_eq!(report.records, 500);
    }
}
