//! Nothing lost from the service's audit chain when a replica dies between a decision's
//! commit and its records'.
//!
//! The store keeps an entry for every request stored in a final state, in the same
//! transaction that stores it ([`Store::audit_owed`]). The replica that decided queues the
//! request's records (`requested`, its outcome, the grant it made) and, once they are
//! durable, removes the entry ([`Engine::run_audit_recovery`]). An entry left behind (the
//! replica was killed, or its audit log could not be written) is taken up by the recovery:
//! at every start, of every entry, and every [`RECOVERY_INTERVAL`] of entries older than
//! [`RECOVERY_GRACE`], by whichever replica looks. It writes each record the chain lacks,
//! marked `"recovered": true`: every record here is once per request
//! ([`EncodedRecord::once_per_request`], [`EncodedRecord::outcome_once`]), so the chain's
//! appender, under the lock every replica takes, keeps whichever copy comes first and drops
//! the others (replicas recovering together, or the deciding replica's own copy still
//! queued).

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;
use uuid::Uuid;

use crate::{
    audit_records::{outcome_records, requested_record},
    error::Error,
    lifecycle::Engine,
};

/// How often a replica looks for requests whose records no replica wrote.
pub(crate) const RECOVERY_INTERVAL: Duration = Duration::from_secs(10);
/// How long after its decision a request's records are left to the replica that decided,
/// before another replica's periodic recovery writes what is missing.
pub(crate) const RECOVERY_GRACE: Duration = Duration::from_secs(30);
/// Requests recovered per store call.
const RECOVERY_BATCH: usize = 256;

impl Engine {
    /// Runs until shutdown: recovers what the store says is owed (everything at start, then
    /// every [`RECOVERY_INTERVAL`] what is older than [`RECOVERY_GRACE`]), and settles the
    /// requests whose records this replica queued once they are durable. Settles what it
    /// was handed before it returns. Runs once per engine (a second call returns at once).
    pub async fn run_audit_recovery(self: Arc<Self>) {
        let Some(mut owed) = self.take_owed_queue() else {
            return;
        };
        // At start every entry: on `SQLite` this process is alone, and on `PostgreSQL` a
        // record another replica still has queued is kept once whoever writes it first.
        self.recover_logged(OffsetDateTime::now_utc()).await;
        let mut tick = tokio::time::interval(RECOVERY_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        let mut ids = Vec::new();
        loop {
            tokio::select! {
                received = owed.recv_many(&mut ids, RECOVERY_BATCH) => {
                    if received == 0 {
                        return;
                    }
                    self.settle(&mut ids).await;
                }
                _ = tick.tick() => {
                    self.recover_logged(OffsetDateTime::now_utc() - RECOVERY_GRACE).await;
                }
                () = self.shutdown.cancelled() => {
                    while let Ok(id) = owed.try_recv() {
                        ids.push(id);
                    }
                    self.settle(&mut ids).await;
                    return;
                }
            }
        }
    }

    /// Waits until the records of `ids` (queued before they were handed over) are durable,
    /// then takes them off the store's list. On failure they stay owed: the recovery writes
    /// what is missing later.
    async fn settle(&self, ids: &mut Vec<Uuid>) {
        if ids.is_empty() {
            return;
        }
        let batch = std::mem::take(ids);
        if let Err(error) = self.audit().flush_async().await {
            tracing::warn!(%error, requests = batch.len(), "audit records not durable yet; left to the recovery");
            return;
        }
        if let Err(error) = self.store.audit_settled(batch).await {
            tracing::warn!(%error, "failed to note durable audit records; the recovery checks them again");
        }
    }

    async fn recover_logged(&self, before: OffsetDateTime) {
        match self.recover_audit(before).await {
            Ok(0) => {}
            Ok(count) => tracing::warn!(
                requests = count,
                "requests stored final without durable audit records (a replica stopped \
                 before writing them, or the log was unwritable): missing records written"
            ),
            Err(error) => tracing::error!(%error, "failed to recover missing audit records"),
        }
    }

    /// Writes the missing records of every request owed since `before` or earlier, and takes
    /// them off the list once durable; returns how many requests it looked at.
    pub(crate) async fn recover_audit(&self, before: OffsetDateTime) -> Result<usize, Error> {
        let mut count = 0;
        loop {
            let owed = self.store.audit_owed(before, RECOVERY_BATCH).await?;
            let batch = owed.len();
            for record in &owed {
                let mut records = vec![requested_record(record, true)];
                if let Some(decision) = &record.decision {
                    records.extend(outcome_records(record, decision, true));
                }
                for encoded in records {
                    let encoded = encoded.map_err(|source| Error::Audit { source })?;
                    self.audit()
                        .submit_encoded_async(encoded)
                        .await
                        .map_err(|source| Error::Audit { source })?;
                }
            }
            if batch == 0 {
                return Ok(count);
            }
            self.audit()
                .flush_async()
                .await
                .map_err(|source| Error::Audit { source })?;
            self.store
                .audit_settled(owed.iter().map(|record| record.request.id).collect())
                .await?;
            count += batch;
            if batch < RECOVERY_BATCH {
                return Ok(count);
            }
        }
    }
}
