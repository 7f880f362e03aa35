//! Tamper-evident audit log on `SQLite`, shared by gatekeep's host agent and its decision
//! service.
//!
//! Every request and decision is one record: what happened ([`RecordKind`]), which request,
//! on which host, who decided, the full context as a JSON payload, and when. Records are
//! hash-chained (each holds the previous record's hash), the table refuses `UPDATE` and
//! `DELETE`, [`verify`] proves the chain and [`export`] writes JSON Lines for a SIEM.
//!
//! - [`AuditStore`]: the synchronous store; [`AuditStore::append_batch`] commits a batch in one
//!   durable transaction.
//! - [`AuditWriter`]: a thread that owns a store and commits what callers queue, in batches,
//!   so that no caller waits for an fsync; [`AuditWriter::shutdown`] commits everything
//!   accepted before it returns.
//! - [`verify`], [`export`], [`verify_export`]: read-only, streaming, safe beside a writer.
//!
//! # When the log cannot be written
//!
//! A commit that fails (disk full, I/O error, read-only filesystem) does not stop the
//! writer: it keeps taking records into a bounded hold ([`WriterConfig::held_capacity`] records,
//! [`WriterConfig::held_bytes`] bytes of payload;
//! beyond it records are only counted), answers every flush with
//! [`AuditError::Unavailable`] at once (so nobody mistakes a held record for a durable one),
//! reports the condition through [`AuditWriter::health`], and retries with back-off. The
//! first commit that succeeds writes one `audit_interrupted` record (cause, since when,
//! attempts, how many records were held and how many lost), then the held records in their
//! order, in one transaction: the chain stays continuous and verifies.
//!
//! # Storage
//!
//! One table, `audit_records` (`STRICT`), in WAL mode with `synchronous=FULL`; the schema
//! version is `PRAGMA user_version` (now 1). Triggers `audit_records_no_update`,
//! `audit_records_no_delete` and `audit_records_no_replace` abort any `UPDATE`, `DELETE` or
//! `INSERT OR REPLACE` of an existing seq with `audit records are append-only`.
//! The file is created with mode 0600.
//!
//! | column | content |
//! | --- | --- |
//! | `seq` | 1, 2, 3... without gaps |
//! | `at` | RFC 3339, UTC, nine fractional digits: `2026-11-24T21:42:56.123456789Z` |
//! | `kind` | the [`RecordKind`] name in snake case: `kernel_denied` |
//! | `request_id`, `actor` | text or NULL |
//! | `host` | text |
//! | `payload` | canonical JSON (below) |
//! | `prev_hash` | the previous record's `hash`; 64 zeros (`GENESIS_HASH`) for seq 1 |
//! | `hash` | lowercase hex SHA-256 (below) |
//!
//! # Canonical payload JSON
//!
//! No whitespace; object keys sorted by their UTF-8 bytes at every depth; strings escape only
//! `"`, `\` and control characters (`\b \f \n \r \t`, others `\u00XX`); integers in decimal;
//! floats in shortest round-trip form (as `serde_json`/`ryu` write them). The hash covers the
//! stored text, which [`export`] reproduces byte for byte in each line's `payload`.
//! [`canonical_json`] writes it for a `serde_json::Value`; [`to_canonical_json`] writes the
//! same text straight from any serializable type (what [`EncodedRecord`] carries).
//!
//! # Chain hash
//!
//! `hash` = lowercase hex of SHA-256 over the concatenation of:
//!
//! 1. the 17 ASCII bytes `gatekeep-audit-v1` followed by one zero byte;
//! 2. `seq` as 8 bytes, unsigned big-endian;
//! 3. `str(at)`, `str(kind)`, `opt(request_id)`, `str(host)`, `opt(actor)`, `str(payload)`,
//!    `str(prev_hash)`, in that order,
//!
//! where `str(s)` is the UTF-8 byte length of `s` as 8 bytes unsigned big-endian followed by
//! those bytes, `opt(None)` is the single byte `0x00` and `opt(Some(s))` is `0x01` followed
//! by `str(s)`. `at`, `kind`, `payload` and `prev_hash` are the stored texts described above.
//!
//! Test vector: seq 1, at `2026-11-24T21:42:56.123456789Z`, kind `requested`, `request_id`
//! `r-1`, host `web-1`, no actor, payload `{"argv":["curl","example.org"],"pid":42}`,
//! `prev_hash` 64 zeros hashes to
//! `cb4085752a4836720dac1a2cbff421ebbea6c721d063ca1f91154861f42fd518`. In Python:
//!
//! ```text
//! import hashlib, struct
//! s = lambda x: struct.pack('>Q', len(x.encode())) + x.encode()
//! o = lambda x: b'\0' if x is None else b'\1' + s(x)
//! m = (b'gatekeep-audit-v1\0' + struct.pack('>Q', 1) + s('2026-11-24T21:42:56.123456789Z')
//!      + s('requested') + o('r-1') + s('web-1') + o(None)
//!      + s('{"argv":["curl","example.org"],"pid":42}') + s('0' * 64))
//! print(hashlib.sha256(m).hexdigest())
//! ```
//!
//! # What the chain proves
//!
//! Any change to a record, and any record removed or inserted before the last one, breaks the
//! chain at that record, even when done with the triggers dropped or on the raw file. Removing
//! records from the end, or rewriting the whole log with fresh hashes, leaves a valid chain:
//! anchor the head ([`VerifyReport::head`], [`AuditStore::head`]) somewhere the host cannot
//! rewrite, such as the decision service, and compare.

mod canonical;
mod error;
mod export;
mod hash;
mod health;
mod line;
mod read;
mod record;
mod store;
mod verify;
mod writer;

pub use canonical::to_canonical_json;
pub use error::{AuditError, TamperReason, error_chain};
pub use export::{ExportFilter, export, export_line};
pub use hash::{ChainFields, GENESIS_HASH};
pub use health::{Failure, FailureCause, WriterHealth};
pub use read::{AuditReader, RawRecord};
pub use record::{
    AuditRecord, EncodedRecord, Once, Prepared, RecordKind, StoredRecord, UnknownKind,
    canonical_json, once_filter, timestamp,
};
pub use store::{APPEND_ONLY_MESSAGE, AuditStore, ChainHead, ChainStore, SCHEMA_VERSION};
pub use verify::{VerifyReport, verify, verify_export};
pub use writer::{AuditWriter, TrySubmitError, WriterConfig};
