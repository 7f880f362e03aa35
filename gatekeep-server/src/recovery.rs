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

use std::{borrow::Cow, sync::Arc, time::Duration};

use gatekeep_audit::{AuditError, EncodedRecord, RecordKind};
use gatekeep_proto::{
    audit::{self as payload, Schema},
    model::{Decision, RequestRecord, RequestState},
};
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{error::Error, lifecycle::Engine};

/// How often a replica looks for requests whose records no replica wrote.
pub(crate) const RECOVERY_INTERVAL: Duration = Duration::from_secs(10);
/// How long after its decision a request's records are left to the replica that decided,
/// before another replica's periodic recovery writes what is missing.
pub(crate) const RECOVERY_GRACE: Duration = Duration::from_secs(30);
/// Requests recovered per store call.
const RECOVERY_BATCH: usize = 256;

/// `payload` as a record of `kind` on `host`, marked when written by recovery.
fn encode<P: Serialize>(
    kind: RecordKind,
    host: &str,
    payload: &P,
    recovered: bool,
) -> Result<EncodedRecord, AuditError> {
    if recovered {
        EncodedRecord::new(
            kind,
            host,
            &payload::Recovered {
                payload,
                recovered: true,
            },
        )
    } else {
        EncodedRecord::new(kind, host, payload)
    }
}

/// The service's `requested` record of `record` (once per request).
pub(crate) fn requested_record(
    record: &RequestRecord,
    recovered: bool,
) -> Result<EncodedRecord, AuditError> {
    let host = &record.host;
    let payload = payload::Requested {
        schema: Schema::default(),
        request: Cow::Borrowed(&record.request),
        service_deadline: gatekeep_audit::timestamp::format(record.deadline).ok(),
        kernel: None,
    };
    Ok(encode(RecordKind::Requested, host, &payload, recovered)?
        .with_request_id(record.request.id.to_string())
        .with_actor(format!("agent:{host}"))
        .with_at(record.received_at)
        .once_per_request())
}

/// The records of `record`'s outcome: the outcome itself (once per request, whatever its
/// kind), and the `grant_installed` record of the grant it made (once per request).
pub(crate) fn outcome_records(
    record: &RequestRecord,
    decision: &Decision,
    recovered: bool,
) -> Vec<Result<EncodedRecord, AuditError>> {
    let kind = match decision.state {
        RequestState::Expired => RecordKind::Expired,
        RequestState::Cancelled => RecordKind::Cancelled,
        RequestState::Abandoned => RecordKind::Abandoned,
        RequestState::Approved | RequestState::Denied | RequestState::Pending => {
            RecordKind::Decided
        }
    };
    let wait_ms = (decision.decided_at - record.received_at).whole_milliseconds();
    let outcome = payload::Outcome {
        schema: Schema::default(),
        policy: Some(Cow::Borrowed(&record.request.policy)),
        kind: record.request.kind(),
        target: Some(Cow::Borrowed(&record.request.target)),
        state: decision.state,
        verdict: Some(decision.verdict),
        reason: Cow::Borrowed(&decision.reason),
        cause: None,
        detail: None,
        duration: Some(decision.duration.to_string()),
        approvals: Some(Cow::Borrowed(&record.approvals)),
        approvals_required: Some(record.approvals_required),
        grant_id: decision.grant.as_ref().map(|grant| grant.id),
        wait_ms: u64::try_from(wait_ms).unwrap_or(0),
        is_final: true,
        pid: None,
        tid: None,
        digest: None,
        comm: None,
    };
    let mut records = vec![
        encode(kind, &record.host, &outcome, recovered).map(|encoded| {
            encoded
                .with_request_id(record.request.id.to_string())
                .with_actor(&decision.decided_by)
                .with_at(decision.decided_at)
                .outcome_once()
        }),
    ];
    if let Some(grant) = &decision.grant {
        let change = payload::GrantChange {
            schema: Schema::default(),
            grant,
            by: None,
            reason: None,
        };
        records.push(
            encode(RecordKind::GrantInstalled, &grant.host, &change, recovered).map(|encoded| {
                encoded
                    .with_request_id(record.request.id.to_string())
                    .with_actor(&grant.created_by)
                    .with_at(grant.created_at)
                    .once_per_request()
            }),
        );
    }
    records
}

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
