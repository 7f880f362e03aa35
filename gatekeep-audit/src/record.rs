//! What callers submit ([`AuditRecord`]) and what the log holds ([`StoredRecord`]).

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset, format_description::FormatItem};

use crate::error::AuditError;

/// What happened. Stored and exported as its snake-case name (`kernel_denied`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// A paused action was put to the decision service.
    Requested,
    /// A reviewer or a rule decided a request.
    Decided,
    /// Nobody decided before the deadline; the policy's timeout action was applied.
    Expired,
    /// The asking process went away before a decision.
    Abandoned,
    /// The kernel denied an action by policy, without asking.
    KernelDenied,
    /// The kernel allowed an action by policy (recorded when the policy says to audit it).
    KernelAllowed,
    /// A request was withdrawn (by an admin, or the agent restarting).
    Cancelled,
    /// A standing grant was installed (an approval that covers later identical actions).
    GrantInstalled,
    /// A standing grant was revoked or ran out.
    GrantRevoked,
    /// A policy was loaded or replaced.
    PolicyLoaded,
    /// The agent started.
    AgentStarted,
    /// The agent stopped.
    AgentStopped,
    /// Gated tasks tried something self-protection refuses (signal or trace
    /// gatekeep, `bpf()`, load a module, mount, ...): one record per burst of
    /// one protection in one cgroup, with the count.
    ProtectRefused,
    /// The log could not be written for a while (disk full, I/O error, read-only): written
    /// first once writes succeed again, before the records held in memory meanwhile, with
    /// the cause, the period and how many records the bounded hold could not keep.
    AuditInterrupted,
    /// Service only: an agent reported that its own audit log can (no longer) be written
    /// (the agent stream's `AuditHealth`).
    AgentAuditHealth,
    /// Agent only: an exec met a rule whose file was rewritten in place since the policy was
    /// loaded; the rule did not match (the policy default applied).
    RuleStale,
    /// Agent only: a policy in audit mode (`mode = "audit"`) let an action through that
    /// enforcement would have denied or asked about (`would`); one record per burst of
    /// identical ones, with the count.
    Audited,
    /// Service only: a reviewer's approval was refused because they own the workload that
    /// asked (no self-approval); the compliance report counts these.
    ApprovalRefused,
    /// Service only: a host's local audit log no longer matches what the host shipped
    /// earlier (a shipped record rewritten, or the log truncated or rolled back), seen when
    /// the host's agent shipped again.
    HostAuditDiverged,
}

impl RecordKind {
    /// Every kind, in declaration order.
    pub const ALL: [Self; 19] = [
        Self::Requested,
        Self::Decided,
        Self::Expired,
        Self::Abandoned,
        Self::KernelDenied,
        Self::KernelAllowed,
        Self::Cancelled,
        Self::GrantInstalled,
        Self::GrantRevoked,
        Self::PolicyLoaded,
        Self::AgentStarted,
        Self::AgentStopped,
        Self::ProtectRefused,
        Self::AuditInterrupted,
        Self::AgentAuditHealth,
        Self::RuleStale,
        Self::Audited,
        Self::ApprovalRefused,
        Self::HostAuditDiverged,
    ];

    /// The stored name, as in JSON.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Decided => "decided",
            Self::Expired => "expired",
            Self::Abandoned => "abandoned",
            Self::KernelDenied => "kernel_denied",
            Self::KernelAllowed => "kernel_allowed",
            Self::Cancelled => "cancelled",
            Self::GrantInstalled => "grant_installed",
            Self::GrantRevoked => "grant_revoked",
            Self::PolicyLoaded => "policy_loaded",
            Self::AgentStarted => "agent_started",
            Self::AgentStopped => "agent_stopped",
            Self::ProtectRefused => "protect_refused",
            Self::AuditInterrupted => "audit_interrupted",
            Self::AgentAuditHealth => "agent_audit_health",
            Self::RuleStale => "rule_stale",
            Self::Audited => "audited",
            Self::ApprovalRefused => "approval_refused",
            Self::HostAuditDiverged => "host_audit_diverged",
        }
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a [`RecordKind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown audit record kind `{name}`")]
pub struct UnknownKind {
    pub name: String,
}

impl FromStr for RecordKind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| UnknownKind { name: s.to_owned() })
    }
}

/// One thing that happened, as a caller submits it.
///
/// `payload` carries the full context. gatekeep's agent and service write the typed, versioned
/// payloads of `gatekeep_proto::audit`, documented in `docs/audit-schema.md`; this crate stores
/// any JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// What happened.
    pub kind: RecordKind,
    /// The request this record belongs to, when it belongs to one.
    pub request_id: Option<String>,
    /// The host the action happened on.
    pub host: String,
    /// Who decided (a reviewer, a rule) or which agent wrote the record.
    pub actor: Option<String>,
    /// Full context: process, argv, address, rule, reason, wait...
    pub payload: Value,
    /// Wall-clock time it happened. Stored in UTC with nanoseconds.
    #[serde(with = "timestamp")]
    pub at: OffsetDateTime,
}

impl AuditRecord {
    /// A record of `kind` on `host` that happened now.
    #[must_use]
    pub fn new(kind: RecordKind, host: impl Into<String>, payload: Value) -> Self {
        Self {
            kind,
            request_id: None,
            host: host.into(),
            actor: None,
            payload,
            at: OffsetDateTime::now_utc(),
        }
    }

    /// Sets the request this record belongs to.
    #[must_use]
    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }

    /// Sets who decided or wrote it.
    #[must_use]
    pub fn with_actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Sets when it happened.
    #[must_use]
    pub fn with_at(mut self, at: OffsetDateTime) -> Self {
        self.at = at;
        self
    }

    /// Checks that the record can be stored: its timestamp must be expressible in RFC 3339
    /// (years 0000 to 9999 in UTC). Everything else about a record is always storable.
    pub fn validate(&self) -> Result<(), AuditError> {
        timestamp::format(self.at).map(drop)
    }

    /// The stored text forms, ready to hash and insert (the record stays as it is).
    pub(crate) fn prepare(&self) -> Result<Prepared, AuditError> {
        self.clone().into_prepared()
    }

    /// The stored text forms, ready to hash and insert. Consumes the record, so the
    /// payload's tree is freed here, by the caller, not by whoever stores it.
    pub(crate) fn into_prepared(self) -> Result<Prepared, AuditError> {
        self.into_encoded()?.into_prepared()
    }

    /// The same record with its payload encoded.
    pub(crate) fn into_encoded(self) -> Result<EncodedRecord, AuditError> {
        Ok(EncodedRecord {
            kind: self.kind,
            request_id: self.request_id,
            host: self.host,
            actor: self.actor,
            payload: canonical_json(&self.payload)?,
            at: self.at,
            once: None,
        })
    }
}

/// What a record is one of at most one per request (see [`EncodedRecord::once_per_request`]
/// and [`EncodedRecord::outcome_once`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Once {
    /// At most one record of its kind per request (`requested`, `grant_installed`).
    Kind,
    /// At most one outcome per request: one record of kind `expired`, `cancelled` or
    /// `abandoned`, or `decided` with `"final": true` in its payload (a `decided` record
    /// whose payload says `"final": false` is one approval towards a quorum, and does not
    /// count).
    Outcome,
}

/// A record whose payload is already its canonical JSON text: built from any serializable
/// payload without a [`Value`] tree in between (what a busy submitter wants), and queued
/// with [`AuditWriter::submit_encoded_async`](crate::AuditWriter::submit_encoded_async).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRecord {
    kind: RecordKind,
    request_id: Option<String>,
    host: String,
    actor: Option<String>,
    payload: String,
    at: OffsetDateTime,
    once: Option<Once>,
}

impl EncodedRecord {
    /// A record of `kind` on `host` that happened now, with `payload` written as
    /// [`to_canonical_json`](crate::to_canonical_json) writes it.
    pub fn new<P: Serialize + ?Sized>(
        kind: RecordKind,
        host: impl Into<String>,
        payload: &P,
    ) -> Result<Self, AuditError> {
        Ok(Self {
            kind,
            request_id: None,
            host: host.into(),
            actor: None,
            payload: crate::to_canonical_json(payload)?,
            at: OffsetDateTime::now_utc(),
            once: None,
        })
    }

    /// Marks it as a record its request has at most once: a [`ChainStore`](crate::ChainStore)
    /// appends it only if neither the chain nor an earlier record of the same batch holds
    /// one of the same kind for the same request id ([`once_filter`]). For a record whose
    /// writing may be repeated, e.g. a service's intake of a request that an agent re-sends
    /// to another replica after the first died, with or without having committed it.
    /// Without a request id it is an ordinary record.
    #[must_use]
    pub fn once_per_request(mut self) -> Self {
        self.once = Some(Once::Kind);
        self
    }

    /// Marks it as its request's one outcome ([`Once::Outcome`]): a
    /// [`ChainStore`](crate::ChainStore) appends it only if neither the chain nor an earlier
    /// record of the same batch holds an outcome of the same request. For an outcome whose
    /// writing may be repeated: by the replica that decided, and by a reconciliation that
    /// writes what a replica killed after storing a decision did not. Without a request id
    /// it is an ordinary record.
    #[must_use]
    pub fn outcome_once(mut self) -> Self {
        self.once = Some(Once::Outcome);
        self
    }

    /// Sets the request this record belongs to.
    #[must_use]
    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }

    /// Sets who decided or wrote it.
    #[must_use]
    pub fn with_actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Sets when it happened.
    #[must_use]
    pub fn with_at(mut self, at: OffsetDateTime) -> Self {
        self.at = at;
        self
    }

    /// The payload's canonical JSON text.
    #[must_use]
    pub fn payload(&self) -> &str {
        &self.payload
    }

    pub(crate) fn into_prepared(self) -> Result<Prepared, AuditError> {
        Ok(Prepared {
            at: timestamp::format(self.at)?,
            kind: self.kind.as_str(),
            request_id: self.request_id,
            host: self.host,
            actor: self.actor,
            payload: self.payload,
            once: self.once,
        })
    }
}

/// A record's columns as stored (and hashed). The [`AuditWriter`](crate::AuditWriter)'s
/// submitters make them, so that its one thread only chains and inserts; a
/// [`ChainStore`](crate::ChainStore) reads them through the accessors.
#[derive(Debug)]
pub struct Prepared {
    pub(crate) at: String,
    pub(crate) kind: &'static str,
    pub(crate) request_id: Option<String>,
    pub(crate) host: String,
    pub(crate) actor: Option<String>,
    pub(crate) payload: String,
    /// Appended only if its request has no such record yet (see [`Once`]).
    pub(crate) once: Option<Once>,
}

impl Prepared {
    /// `at` as stored (RFC 3339, UTC, nine fractional digits).
    #[must_use]
    pub fn at(&self) -> &str {
        &self.at
    }

    /// The [`RecordKind`] name.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    #[must_use]
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    #[must_use]
    pub fn host(&self) -> &str {
        &self.host
    }

    #[must_use]
    pub fn actor(&self) -> Option<&str> {
        self.actor.as_deref()
    }

    /// The canonical JSON payload.
    #[must_use]
    pub fn payload(&self) -> &str {
        &self.payload
    }

    /// Whether it is appended only once per request ([`EncodedRecord::once_per_request`],
    /// [`EncodedRecord::outcome_once`]).
    #[must_use]
    pub fn once(&self) -> bool {
        self.once_key().is_some()
    }

    /// What it is one of per request, if it is ([`Once`]); `None` without a request id.
    #[must_use]
    pub fn once_key(&self) -> Option<Once> {
        self.once.filter(|_| self.request_id.is_some())
    }

    /// The chain fields of this record at `seq` after `prev_hash` (hash them with
    /// [`ChainFields::hash`](crate::ChainFields::hash)).
    #[must_use]
    pub fn chain_fields<'a>(&'a self, seq: u64, prev_hash: &'a str) -> crate::ChainFields<'a> {
        crate::ChainFields {
            seq,
            at: &self.at,
            kind: self.kind,
            request_id: self.request_id.as_deref(),
            host: &self.host,
            actor: self.actor.as_deref(),
            payload: &self.payload,
            prev_hash,
        }
    }
}

/// Which records of a batch a [`ChainStore`](crate::ChainStore) appends, by index in
/// `batch`: every record but a once-per-request one ([`Once`]) whose request already has
/// such a record, in the chain (`stored(request_id, kind, once)` says; call it inside the
/// append's transaction, so that no other appender slips one in) or earlier in the batch.
pub fn once_filter<E>(
    batch: &[Prepared],
    mut stored: impl FnMut(&str, &str, Once) -> Result<bool, E>,
) -> Result<Vec<usize>, E> {
    let mut seen = std::collections::HashSet::new();
    let mut keep = Vec::with_capacity(batch.len());
    for (index, record) in batch.iter().enumerate() {
        if let (Some(once), Some(id)) = (record.once, record.request_id.as_deref()) {
            // Every outcome kind shares one key; a kind's own record, its kind.
            let key = match once {
                Once::Kind => record.kind,
                Once::Outcome => "",
            };
            if !seen.insert((id, key)) || stored(id, record.kind, once)? {
                continue;
            }
        }
        keep.push(index);
    }
    Ok(keep)
}

/// A record as the log holds it: the submitted fields plus its place in the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// Position in the log, from 1, without gaps.
    pub seq: u64,
    /// When it happened (UTC, nanoseconds).
    #[serde(with = "timestamp")]
    pub at: OffsetDateTime,
    pub kind: RecordKind,
    pub request_id: Option<String>,
    pub host: String,
    pub actor: Option<String>,
    pub payload: Value,
    /// Lowercase hex SHA-256 of the previous record; 64 zeros for the first.
    pub prev_hash: String,
    /// Lowercase hex SHA-256 of this record (see the crate docs for the encoding).
    pub hash: String,
}

/// Writes `value` as canonical JSON: no whitespace, object keys sorted by their UTF-8 bytes,
/// strings and numbers as `serde_json` writes them (only `"`, `\` and control characters
/// escaped; integers in decimal; floats in shortest round-trip form).
///
/// Keys are sorted here rather than relying on `serde_json`'s map type, which keeps insertion
/// order when another crate in the build turns on its `preserve_order` feature.
pub fn canonical_json(value: &Value) -> Result<String, AuditError> {
    let mut out = Vec::with_capacity(128);
    write_canonical(value, &mut out).map_err(|source| AuditError::EncodePayload { source })?;
    // serde_json only writes UTF-8.
    String::from_utf8(out).map_err(|err| AuditError::EncodePayload {
        source: serde::ser::Error::custom(err),
    })
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    match value {
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key)?;
                out.push(b':');
                write_canonical(item, out)?;
            }
            out.push(b'}');
        }
        leaf => serde_json::to_writer(&mut *out, leaf)?,
    }
    Ok(())
}

/// The one timestamp format of the log: RFC 3339 in UTC with exactly nine fractional digits,
/// `2026-11-24T21:42:56.123456789Z`. Fixed width, so text order is time order.
pub mod timestamp {
    use super::{AuditError, FormatItem, OffsetDateTime, PrimitiveDateTime, UtcOffset};

    const FORMAT: &[FormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z"
    );

    /// Formats `at` (converted to UTC) in the log's format.
    pub fn format(at: OffsetDateTime) -> Result<String, AuditError> {
        let utc = at
            .checked_to_offset(UtcOffset::UTC)
            .filter(|utc| (0..=9999).contains(&utc.year()))
            .ok_or(AuditError::TimestampOutOfRange { at })?;
        utc.format(FORMAT)
            .map_err(|source| AuditError::FormatTimestamp { source })
    }

    /// Parses a timestamp written by [`format()`].
    pub fn parse(text: &str) -> Result<OffsetDateTime, time::error::Parse> {
        PrimitiveDateTime::parse(text, FORMAT).map(PrimitiveDateTime::assume_utc)
    }

    pub(crate) fn serialize<S: serde::Serializer>(
        at: &OffsetDateTime,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let text = format(*at).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(&text)
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<OffsetDateTime, D::Error> {
        let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(deserializer)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use time::macros::datetime;

    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in RecordKind::ALL {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(kind.as_str().parse::<RecordKind>().unwrap(), kind);
        }
        assert_eq!(RecordKind::KernelDenied.as_str(), "kernel_denied");
        assert!("kernel-denied".parse::<RecordKind>().is_err());
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth_and_has_no_whitespace() {
        let value = json!({
            "zeta": [3, {"b": 1, "a": "x\ny\"z"}],
            "alpha": null,
            "mid": {"é": 1.5, "e": -7, "Z": true},
        });
        assert_eq!(
            canonical_json(&value).unwrap(),
            r#"{"alpha":null,"mid":{"Z":true,"e":-7,"é":1.5},"zeta":[3,{"a":"x\ny\"z","b":1}]}"#
        );
    }

    #[test]
    fn canonical_json_is_stable_through_a_parse() {
        let value = json!({"f": 0.1, "big": u64::MAX, "neg": i64::MIN, "s": "\u{1}\u{2028}/"});
        let once = canonical_json(&value).unwrap();
        let again = canonical_json(&serde_json::from_str(&once).unwrap()).unwrap();
        assert_eq!(once, again);
    }

    #[test]
    fn timestamps_are_utc_with_nine_digits() {
        let at = datetime!(2026-11-24 22:42:56.5 +01:00);
        assert_eq!(
            timestamp::format(at).unwrap(),
            "2026-11-24T21:42:56.500000000Z"
        );
        assert_eq!(
            timestamp::parse("2026-11-24T21:42:56.500000000Z").unwrap(),
            at
        );
    }

    #[test]
    fn timestamps_outside_rfc3339_are_refused() {
        let record = AuditRecord::new(RecordKind::AgentStarted, "h", json!({}))
            .with_at(datetime!(-0001-01-01 0:00 UTC));
        assert!(matches!(
            record.validate(),
            Err(AuditError::TimestampOutOfRange { .. })
        ));
        // 0000-01-01 00:30 at +01:00 is still year -1 in UTC.
        let record = record.with_at(datetime!(0000-01-01 0:30 +01:00));
        assert!(record.validate().is_err());
        let record = record.with_at(datetime!(0000-01-01 1:30 +01:00));
        assert!(record.validate().is_ok());
    }
}
