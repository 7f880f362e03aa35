//! The service's records of a request's intake and outcome, as the replica that decides
//! writes them and as the recovery ([`crate::recovery`]) writes them again when they are
//! missing (marked `"recovered": true`). Each is once per request in the chain.

use std::borrow::Cow;

use gatekeep_audit::{AuditError, EncodedRecord, RecordKind};
use gatekeep_proto::{
    audit::{self as payload, Schema},
    model::{Decision, RequestRecord, RequestState},
};
use serde::Serialize;

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
