//! Host audit shipping: the validated forms of `ShipAudit`'s records and of what the service
//! anchored (heads, divergences), and their conversions.
//!
//! A shipped record is the host log's row as stored: the texts gatekeep-audit hashes and the
//! stored hashes. The service recomputes each hash itself; here only shapes and sizes are
//! checked, so that nothing unbounded reaches it.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{
    convert::{self, Result, WireError},
    limits, v1,
};

/// Most records one `ShipAudit` batch carries.
pub const MAX_SHIP_RECORDS: usize = 1000;
/// Longest payload of one shipped record (the agent's payloads are a few KiB; argv is bounded
/// to 32 KiB).
pub const MAX_SHIPPED_PAYLOAD: usize = 256 * 1024;
/// Longest timestamp or kind text.
const MAX_SHORT: usize = 64;

/// One record of a host's audit log, as that log stores (and hashes) it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostAuditRecord {
    pub seq: u64,
    pub at: String,
    pub kind: String,
    pub request_id: Option<String>,
    /// The host name the agent wrote; the service attributes the record to the host of the
    /// agent's certificate, whatever this says.
    pub host: String,
    pub actor: Option<String>,
    /// Canonical JSON text.
    pub payload: String,
    pub prev_hash: String,
    pub hash: String,
}

/// The last record of a chain: its seq and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainPoint {
    pub seq: u64,
    pub hash: String,
}

/// How a host's local log departs from what the service anchored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DivergenceKind {
    /// A record the service holds differs from the host's record at the same seq: rewritten
    /// in place, or rolled back to an older copy and written on.
    Rewritten,
    /// The host's log ends before the anchored head and matches up to its end: records
    /// removed from the end, or the log restored from an older copy.
    Truncated,
}

impl DivergenceKind {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Rewritten => "rewritten",
            Self::Truncated => "truncated",
        }
    }
}

impl std::str::FromStr for DivergenceKind {
    type Err = WireError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "rewritten" => Ok(Self::Rewritten),
            "truncated" => Ok(Self::Truncated),
            other => Err(WireError::Invalid {
                field: "divergence.kind".into(),
                problem: format!("unknown divergence kind `{other}`"),
            }),
        }
    }
}

/// A divergence the service recorded for a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergence {
    pub host: String,
    /// The first seq found to differ (truncated: the host's head seq).
    pub seq: u64,
    pub kind: DivergenceKind,
    pub detail: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// A host's anchored chain head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostHead {
    pub host: String,
    pub head: ChainPoint,
    #[serde(with = "time::serde::rfc3339")]
    pub updated: OffsetDateTime,
}

/// A validated `ShipAudit` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipBatch {
    pub records: Vec<HostAuditRecord>,
    /// The local log's head when the agent read the batch; `None` while it is empty.
    pub local_head: Option<ChainPoint>,
}

/// A lowercase hex SHA-256.
fn hash(field: &str, value: &str) -> Result<()> {
    if value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(WireError::Invalid {
            field: field.to_owned(),
            problem: "must be 64 lowercase hex digits (a SHA-256)".into(),
        })
    }
}

fn opt_text(field: &str, value: Option<String>, max: usize) -> Result<Option<String>> {
    if let Some(value) = &value {
        convert::text(field, value, max)?;
    }
    Ok(value)
}

impl TryFrom<v1::ShippedRecord> for HostAuditRecord {
    type Error = WireError;

    fn try_from(wire: v1::ShippedRecord) -> Result<Self> {
        if wire.seq == 0 {
            return Err(WireError::missing("record.seq"));
        }
        for (field, value) in [("record.at", &wire.at), ("record.kind", &wire.kind)] {
            if value.is_empty() {
                return Err(WireError::missing(field));
            }
            convert::text(field, value, MAX_SHORT)?;
        }
        convert::text("record.host", &wire.host, limits::MAX_NAME)?;
        convert::text("record.payload", &wire.payload, MAX_SHIPPED_PAYLOAD)?;
        hash("record.prev_hash", &wire.prev_hash)?;
        hash("record.hash", &wire.hash)?;
        Ok(Self {
            seq: wire.seq,
            at: wire.at,
            kind: wire.kind,
            request_id: opt_text("record.request_id", wire.request_id, limits::MAX_NAME)?,
            host: wire.host,
            actor: opt_text("record.actor", wire.actor, limits::MAX_NAME)?,
            payload: wire.payload,
            prev_hash: wire.prev_hash,
            hash: wire.hash,
        })
    }
}

impl From<HostAuditRecord> for v1::ShippedRecord {
    fn from(record: HostAuditRecord) -> Self {
        Self {
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
}

impl TryFrom<v1::ShipAuditRequest> for ShipBatch {
    type Error = WireError;

    fn try_from(wire: v1::ShipAuditRequest) -> Result<Self> {
        if wire.records.len() > MAX_SHIP_RECORDS {
            return Err(WireError::TooMany {
                field: "records".into(),
                len: wire.records.len(),
                max: MAX_SHIP_RECORDS,
            });
        }
        let local_head = if wire.local_head_seq == 0 {
            None
        } else {
            hash("local_head_hash", &wire.local_head_hash)?;
            Some(ChainPoint {
                seq: wire.local_head_seq,
                hash: wire.local_head_hash,
            })
        };
        Ok(Self {
            records: wire
                .records
                .into_iter()
                .map(HostAuditRecord::try_from)
                .collect::<Result<_>>()?,
            local_head,
        })
    }
}

impl From<ShipBatch> for v1::ShipAuditRequest {
    fn from(batch: ShipBatch) -> Self {
        let (seq, hash) = batch
            .local_head
            .map_or((0, String::new()), |head| (head.seq, head.hash));
        Self {
            records: batch.records.into_iter().map(Into::into).collect(),
            local_head_seq: seq,
            local_head_hash: hash,
        }
    }
}

impl From<Divergence> for v1::HostAuditDivergence {
    fn from(divergence: Divergence) -> Self {
        Self {
            seq: divergence.seq,
            kind: divergence.kind.as_str().to_owned(),
            detail: divergence.detail,
            at_ms: convert::to_ms(divergence.at),
            host: divergence.host,
        }
    }
}

impl TryFrom<v1::HostAuditDivergence> for Divergence {
    type Error = WireError;

    fn try_from(wire: v1::HostAuditDivergence) -> Result<Self> {
        convert::text("divergence.detail", &wire.detail, limits::MAX_REASON)?;
        Ok(Self {
            host: convert::name("divergence.host", &wire.host)?,
            seq: wire.seq,
            kind: wire.kind.parse()?,
            detail: wire.detail,
            at: convert::from_ms("divergence.at_ms", wire.at_ms)?,
        })
    }
}

impl From<HostHead> for v1::HostAuditHead {
    fn from(head: HostHead) -> Self {
        Self {
            host: head.host,
            head_seq: head.head.seq,
            head_hash: head.head.hash,
            updated_ms: convert::to_ms(head.updated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire() -> v1::ShippedRecord {
        v1::ShippedRecord {
            seq: 1,
            at: "2026-11-24T21:42:56.123456789Z".into(),
            kind: "requested".into(),
            request_id: Some("r-1".into()),
            host: "web-1".into(),
            actor: None,
            payload: "{}".into(),
            prev_hash: "0".repeat(64),
            hash: "a".repeat(64),
        }
    }

    #[test]
    fn a_well_formed_record_converts_and_back() {
        let record = HostAuditRecord::try_from(wire()).unwrap();
        assert_eq!(v1::ShippedRecord::from(record), wire());
    }

    #[test]
    fn malformed_records_are_refused_naming_the_field() {
        type Case = (fn(&mut v1::ShippedRecord), &'static str);
        let cases: [Case; 5] = [
            (|w| w.seq = 0, "record.seq"),
            (|w| w.hash = "A".repeat(64), "record.hash"),
            (|w| w.prev_hash = "0".repeat(63), "record.prev_hash"),
            (|w| w.kind = String::new(), "record.kind"),
            (
                |w| w.payload = "x".repeat(MAX_SHIPPED_PAYLOAD + 1),
                "record.payload",
            ),
        ];
        for (change, field) in cases {
            let mut bad = wire();
            change(&mut bad);
            let err = HostAuditRecord::try_from(bad).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn a_batch_is_bounded() {
        let request = v1::ShipAuditRequest {
            records: vec![wire(); MAX_SHIP_RECORDS + 1],
            local_head_seq: 0,
            local_head_hash: String::new(),
        };
        assert!(matches!(
            ShipBatch::try_from(request),
            Err(WireError::TooMany { .. })
        ));
    }
}
