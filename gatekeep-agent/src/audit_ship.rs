//! Shipping the local audit log to a remote decision service, which anchors this host's
//! chain ([`gatekeep_client::AuditShipper`]): the shipper's [`LocalLog`] is a read-only
//! connection to the agent's own audit database, opened beside the writer (WAL), so it
//! never takes the lock the decision path's commits need.

use std::path::{Path, PathBuf};

use gatekeep_audit::{AuditReader, RawRecord};
use gatekeep_client::LocalLog;
use gatekeep_proto::host_audit::{ChainPoint, HostAuditRecord};

/// The agent's audit database, read for shipping. Opened at the first read (the writer
/// creates the file).
#[derive(Debug)]
pub struct AuditDbLog {
    path: PathBuf,
    reader: Option<AuditReader>,
}

impl AuditDbLog {
    #[must_use]
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            reader: None,
        }
    }

    fn reader(&mut self) -> Result<&AuditReader, String> {
        if self.reader.is_none() {
            let reader =
                AuditReader::open(&self.path).map_err(|err| gatekeep_audit::error_chain(&err))?;
            self.reader = Some(reader);
        }
        self.reader
            .as_ref()
            .ok_or_else(|| "the audit log is not open".to_owned())
    }

    /// Runs `read`; a failed read drops the connection, so the next opens the file again
    /// (it may have been replaced).
    fn with_reader<T>(
        &mut self,
        read: impl FnOnce(&AuditReader) -> Result<T, gatekeep_audit::AuditError>,
    ) -> Result<T, String> {
        let result = read(self.reader()?).map_err(|err| gatekeep_audit::error_chain(&err));
        if result.is_err() {
            self.reader = None;
        }
        result
    }
}

impl LocalLog for AuditDbLog {
    fn head(&mut self) -> Result<Option<ChainPoint>, String> {
        Ok(self.with_reader(AuditReader::head)?.map(|head| ChainPoint {
            seq: head.seq,
            hash: head.hash,
        }))
    }

    fn read_from(
        &mut self,
        from_seq: u64,
        limit: usize,
        bytes: usize,
    ) -> Result<Vec<HostAuditRecord>, String> {
        Ok(self
            .with_reader(|reader| reader.read_from(from_seq, limit, bytes))?
            .into_iter()
            .map(shipped)
            .collect())
    }
}

fn shipped(record: RawRecord) -> HostAuditRecord {
    HostAuditRecord {
        seq: record.seq,
        at: record.at,
        kind: record.kind,
        request_id: record.request_id,
        host: record.host,
        actor: record.actor,
        payload: record.payload,
        prev_hash: record.prev_hash,
        hash: record.hash,
    }
}

#[cfg(test)]
mod tests {
    use gatekeep_audit::{AuditRecord, AuditStore, RecordKind};

    use super::*;

    #[test]
    fn reads_the_log_as_stored_and_follows_its_growth() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.db");
        let mut log = AuditDbLog::new(&path);
        assert!(log.head().is_err(), "no log yet");
        let mut store = AuditStore::open(&path).expect("open");
        let record =
            || AuditRecord::new(RecordKind::AgentStarted, "vm", serde_json::json!({"v": 1}));
        let stored = store.append_batch(&[record(), record()]).expect("append");
        assert_eq!(log.head().expect("head").map(|h| h.seq), Some(2));
        let read = log.read_from(1, 10, usize::MAX).expect("read");
        assert_eq!(read.len(), 2);
        assert_eq!(read[1].hash, stored[1].hash);
        assert_eq!(read[1].prev_hash, stored[0].hash);
        store.append_batch(&[record()]).expect("append");
        assert_eq!(log.head().expect("head").map(|h| h.seq), Some(3));
    }
}
