//! Hosts' audit logs anchored at the service: checking a shipped batch against what the
//! service holds for the host.
//!
//! Each agent ships its local hash-chained log (`ShipAudit`). The service keeps every host's
//! records and chain head (table `host_audit_records`, `host_audit_heads`), so that a host
//! cannot quietly rewrite what it already shipped: a record at a stored seq must be the same
//! record (idempotent re-send), and a host that reports a head behind the anchored one has
//! lost records. [`check`] decides, from the anchored head and the anchored hashes of the
//! seqs the batch touches, what to append and what diverges; the stores run it inside the
//! transaction that holds the host's head, so two connections of one host never interleave.
//!
//! The hash of every new record is recomputed here (gatekeep-audit's encoding): the service
//! never takes a hash on trust.

use std::collections::BTreeMap;

use gatekeep_audit::{ChainFields, GENESIS_HASH};
use gatekeep_proto::host_audit::{ChainPoint, DivergenceKind, HostAuditRecord, ShipBatch};

/// What the store does with a batch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Records to append (after the anchored head, chained).
    pub append: Vec<HostAuditRecord>,
    /// The first divergence found, if any: `(seq, kind, detail)`.
    pub divergence: Option<(u64, DivergenceKind, String)>,
}

/// A batch the service refuses outright (nothing about the host's log follows from it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The batch starts past the anchored head: records in between were never shipped.
    #[error(
        "audit records must be shipped in order: the service holds this host's log up to seq \
         {head}, the batch starts at seq {first}; ship from seq {head} (or {next})",
        next = head + 1
    )]
    Gap { head: u64, first: u64 },
    /// Records not in increasing seq order.
    #[error("audit records must be shipped in increasing seq order: seq {seq} follows {after}")]
    Order { seq: u64, after: u64 },
    /// A payload that is not JSON (the agent only writes canonical JSON).
    #[error("the payload of audit record {seq} is not json")]
    Payload { seq: u64 },
}

/// The anchored seqs whose hashes [`check`] needs: every batch record at or below the head,
/// and the host's reported head if it is at or below the anchored one.
#[must_use]
pub fn needed(head: Option<&ChainPoint>, batch: &ShipBatch) -> Vec<u64> {
    let head_seq = head.map_or(0, |head| head.seq);
    let mut seqs: Vec<u64> = batch
        .records
        .iter()
        .map(|record| record.seq)
        .chain(batch.local_head.as_ref().map(|local| local.seq))
        .filter(|seq| *seq <= head_seq)
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    seqs
}

/// Checks `batch` against the anchored `head` and the anchored hashes of [`needed`] seqs.
pub fn check(
    head: Option<&ChainPoint>,
    anchored: &BTreeMap<u64, String>,
    batch: &ShipBatch,
) -> Result<Plan, Refusal> {
    let head_seq = head.map_or(0, |head| head.seq);
    let mut expected_seq = head_seq + 1;
    let mut expected_prev = head
        .map_or(GENESIS_HASH, |head| head.hash.as_str())
        .to_owned();
    let mut plan = Plan::default();
    let mut last: Option<u64> = None;
    for record in &batch.records {
        if let Some(after) = last
            && record.seq <= after
        {
            return Err(Refusal::Order {
                seq: record.seq,
                after,
            });
        }
        let first = last.is_none();
        last = Some(record.seq);
        let computed = fields(record).hash();
        if record.seq <= head_seq {
            // A re-sent record: it must be the one anchored.
            let stored = anchored.get(&record.seq).map_or("", String::as_str);
            if computed != stored || record.hash != stored {
                plan.divergence = Some((
                    record.seq,
                    DivergenceKind::Rewritten,
                    format!(
                        "the host's record {seq} (hash {computed}) differs from the one it \
                         shipped before (hash {stored}): its log was rewritten or rolled back \
                         at seq {seq}",
                        seq = record.seq
                    ),
                ));
                return Ok(plan);
            }
            continue;
        }
        if record.seq != expected_seq {
            if first {
                return Err(Refusal::Gap {
                    head: head_seq,
                    first: record.seq,
                });
            }
            plan.divergence = Some((
                expected_seq,
                DivergenceKind::Rewritten,
                format!(
                    "record {expected_seq} is missing from the host's log (seq {} follows \
                     {}): a record was deleted before it was shipped",
                    record.seq,
                    expected_seq - 1
                ),
            ));
            return Ok(plan);
        }
        if record.prev_hash != expected_prev {
            plan.divergence = Some((
                record.seq,
                DivergenceKind::Rewritten,
                format!(
                    "record {seq} does not follow record {before} the service holds (its \
                     prev_hash is {found}, record {before} hashes to {expected_prev}): the \
                     host's log was rewritten or rolled back at or before seq {seq}",
                    seq = record.seq,
                    before = record.seq - 1,
                    found = record.prev_hash,
                ),
            ));
            return Ok(plan);
        }
        if computed != record.hash {
            plan.divergence = Some((
                record.seq,
                DivergenceKind::Rewritten,
                format!(
                    "record {seq}'s stored hash {stored} does not match its content (hash \
                     {computed}): it was altered before it was shipped",
                    seq = record.seq,
                    stored = record.hash,
                ),
            ));
            return Ok(plan);
        }
        if serde_json::from_str::<&serde_json::value::RawValue>(&record.payload).is_err() {
            return Err(Refusal::Payload { seq: record.seq });
        }
        expected_seq += 1;
        expected_prev.clone_from(&record.hash);
        plan.append.push(record.clone());
    }
    plan.divergence = local_head_divergence(head_seq, anchored, batch.local_head.as_ref());
    Ok(plan)
}

/// Whether the host's reported head forks from or falls behind the anchored chain.
fn local_head_divergence(
    head_seq: u64,
    anchored: &BTreeMap<u64, String>,
    local: Option<&ChainPoint>,
) -> Option<(u64, DivergenceKind, String)> {
    let Some(local) = local else {
        return (head_seq > 0).then(|| {
            (
                0,
                DivergenceKind::Truncated,
                format!(
                    "the host's log is empty, but the service holds its records 1 to \
                     {head_seq}: the log was deleted or replaced"
                ),
            )
        });
    };
    if local.seq > head_seq {
        return None;
    }
    let stored = anchored.get(&local.seq).map_or("", String::as_str);
    if local.hash != stored {
        return Some((
            local.seq,
            DivergenceKind::Rewritten,
            format!(
                "the host's log now ends at seq {seq} with hash {hash}, but the record {seq} \
                 it shipped hashes to {stored}: its log was rewritten or rolled back",
                seq = local.seq,
                hash = local.hash,
            ),
        ));
    }
    (local.seq < head_seq).then(|| {
        (
            local.seq,
            DivergenceKind::Truncated,
            format!(
                "the host's log ends at seq {seq}, but the service holds its records up to \
                 {head_seq}: records {from} to {head_seq} were removed (truncated, or the log \
                 rolled back to an older copy)",
                seq = local.seq,
                from = local.seq + 1,
            ),
        )
    })
}

/// The hashed fields of a shipped record.
#[must_use]
pub fn fields(record: &HostAuditRecord) -> ChainFields<'_> {
    ChainFields {
        seq: record.seq,
        at: &record.at,
        kind: &record.kind,
        request_id: record.request_id.as_deref(),
        host: &record.host,
        actor: record.actor.as_deref(),
        payload: &record.payload,
        prev_hash: &record.prev_hash,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid chain of `n` records from seq 1.
    pub(crate) fn chain(n: u64) -> Vec<HostAuditRecord> {
        let mut prev = GENESIS_HASH.to_owned();
        (1..=n)
            .map(|seq| {
                let mut record = HostAuditRecord {
                    seq,
                    at: format!("2026-11-24T21:42:{:02}.000000000Z", seq % 60),
                    kind: "requested".into(),
                    request_id: Some(format!("r-{seq}")),
                    host: "web-1".into(),
                    actor: None,
                    payload: format!(r#"{{"n":{seq}}}"#),
                    prev_hash: prev.clone(),
                    hash: String::new(),
                };
                record.hash = fields(&record).hash();
                prev.clone_from(&record.hash);
                record
            })
            .collect()
    }

    fn batch(records: &[HostAuditRecord]) -> ShipBatch {
        ShipBatch {
            local_head: records.last().map(|r| ChainPoint {
                seq: r.seq,
                hash: r.hash.clone(),
            }),
            records: records.to_vec(),
        }
    }

    fn anchored(records: &[HostAuditRecord]) -> (Option<ChainPoint>, BTreeMap<u64, String>) {
        let head = records.last().map(|r| ChainPoint {
            seq: r.seq,
            hash: r.hash.clone(),
        });
        (
            head,
            records.iter().map(|r| (r.seq, r.hash.clone())).collect(),
        )
    }

    #[test]
    fn new_records_after_the_head_are_appended_and_an_overlap_is_accepted() {
        let all = chain(6);
        let (head, hashes) = anchored(&all[..3]);
        let plan = check(head.as_ref(), &hashes, &batch(&all[2..])).unwrap();
        assert_eq!(plan.divergence, None);
        assert_eq!(
            plan.append.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [4, 5, 6]
        );
        assert_eq!(needed(head.as_ref(), &batch(&all[2..])), [3]);
    }

    #[test]
    fn a_different_record_at_a_stored_seq_diverges() {
        let all = chain(4);
        let (head, hashes) = anchored(&all);
        let mut changed = all.clone();
        changed[1].payload = r#"{"n":99}"#.into();
        changed[1].hash = fields(&changed[1]).hash();
        let plan = check(head.as_ref(), &hashes, &batch(&changed[1..2])).unwrap();
        let (seq, kind, detail) = plan.divergence.unwrap();
        assert_eq!((seq, kind), (2, DivergenceKind::Rewritten));
        assert!(
            detail.contains("rewritten or rolled back at seq 2"),
            "{detail}"
        );
        assert!(plan.append.is_empty());
    }

    #[test]
    fn a_gap_is_refused() {
        let all = chain(6);
        let (head, hashes) = anchored(&all[..2]);
        assert_eq!(
            check(head.as_ref(), &hashes, &batch(&all[4..])),
            Err(Refusal::Gap { head: 2, first: 5 })
        );
    }

    #[test]
    fn a_head_behind_the_anchored_one_is_truncation() {
        let all = chain(5);
        let (head, hashes) = anchored(&all);
        let report = batch(&all[..3]);
        let plan = check(
            head.as_ref(),
            &hashes,
            &ShipBatch {
                records: Vec::new(),
                ..report
            },
        )
        .unwrap();
        let (seq, kind, _) = plan.divergence.unwrap();
        assert_eq!((seq, kind), (3, DivergenceKind::Truncated));
    }

    #[test]
    fn a_record_altered_before_shipping_or_missing_diverges() {
        let all = chain(5);
        let (head, hashes) = anchored(&all[..1]);
        let mut altered = all.clone();
        altered[2].payload = r#"{"n":0}"#.into();
        let plan = check(head.as_ref(), &hashes, &batch(&altered[1..])).unwrap();
        assert_eq!(plan.divergence.unwrap().0, 3);
        assert_eq!(plan.append.len(), 1);

        let mut holed = all[1..].to_vec();
        holed.remove(1);
        let plan = check(head.as_ref(), &hashes, &batch(&holed)).unwrap();
        let (seq, _, detail) = plan.divergence.unwrap();
        assert_eq!(seq, 3);
        assert!(detail.contains("missing"), "{detail}");
    }
}
