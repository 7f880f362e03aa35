//! `gatekeep report`: a per-policy compliance summary of the service's audit log over a time
//! window (requests, approvals by reviewer, denials, expiries, time to decision, refused
//! self-approvals, grants), as JSON, CSV or a printable HTML page.
//!
//! The report is only as good as the log: [`Report::build`] takes the log as the JSON Lines
//! of `gatekeep audit export` and proves its hash chain first ([`gatekeep_audit::verify_export`]),
//! from seq 1, refusing a broken or partial chain. The chain head it checked is printed in
//! every format, so an auditor can compare it with an anchored copy.
//!
//! Which records count (the service's record kinds, `docs/audit-schema.md`), by the time of the
//! record, `from` inclusive and `to` exclusive:
//! - requests: `requested`;
//! - approvals by reviewer: each vote in the `approvals` of a final `decided` record that
//!   approved; an approval without votes (a server rule, a standing grant) counts for its actor
//!   (`rule:NAME`, or `grant` for every grant);
//! - denied, expired, cancelled, abandoned: final records with that state;
//! - time to decision: `wait_ms` (arrival to decision) of final `decided` records (approved or
//!   denied), median and p95 by nearest rank (the smallest value that at least that share of
//!   decisions did not exceed);
//! - self-approvals refused: `approval_refused`;
//! - grants created, revoked: `grant_installed`, `grant_revoked` (revocations include
//!   expiries and session ends; `revoked_by` is not split here).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, Write},
};

use gatekeep_audit::{AuditError, RecordKind, StoredRecord, VerifyReport};
use serde::Serialize;
use time::{
    Date, OffsetDateTime, Time,
    format_description::{BorrowedFormatItem, well_known::Rfc3339},
    macros::format_description,
};

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(
        "{flag} `{value}` is neither an RFC 3339 time (2026-01-31T09:00:00Z) nor a date (2026-01-31)"
    )]
    BadTime { flag: &'static str, value: String },
    #[error("--from {from} is not before --to {to}")]
    EmptyWindow { from: String, to: String },
    #[error(
        "the audit log does not verify; no report is made from a broken chain (run `gatekeep audit verify` and investigate before reporting)"
    )]
    Broken {
        #[source]
        source: AuditError,
    },
    #[error(
        "the audit log's append-only guards were altered; no report is made (run `gatekeep audit verify --db ...`)"
    )]
    GuardsAltered,
    #[error(
        "the export starts at seq {first_seq}, not 1: a report needs the whole chain (export without --from-seq)"
    )]
    Partial { first_seq: u64 },
    #[error("audit line {line} cannot be read as a record")]
    Unreadable {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write the report")]
    Write {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the CSV report")]
    Csv {
        #[source]
        source: csv::Error,
    },
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// One JSON document.
    Json,
    /// One row per policy (RFC 4180 quoting).
    Csv,
    /// A self-contained printable page.
    Html,
}

/// Parses `--from`/`--to`: an RFC 3339 time, or a date (UTC). A date means its start for
/// `--from` and the start of the next day for `--to` (so `--to 2026-01-31` includes that day).
pub fn parse_time(
    flag: &'static str,
    value: &str,
    end: bool,
) -> Result<OffsetDateTime, ReportError> {
    const DATE: &[BorrowedFormatItem<'_>] = format_description!("[year]-[month]-[day]");
    let bad = || ReportError::BadTime {
        flag,
        value: value.to_owned(),
    };
    if let Ok(at) = OffsetDateTime::parse(value, &Rfc3339) {
        return Ok(at);
    }
    let date = Date::parse(value, DATE).map_err(|_| bad())?;
    let date = if end {
        date.next_day().ok_or_else(bad)?
    } else {
        date
    };
    Ok(date.with_time(Time::MIDNIGHT).assume_utc())
}

/// The chain the report was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evidence {
    /// Records in the verified chain (all of it, not only the window's).
    pub records: u64,
    pub head_seq: Option<u64>,
    pub head_hash: Option<String>,
}

/// Time to decision, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Latency {
    pub decisions: u64,
    pub median_ms: Option<u64>,
    pub p95_ms: Option<u64>,
}

/// One policy's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicySummary {
    pub policy: String,
    pub requests: u64,
    pub approved: u64,
    /// Approvals per reviewer (or `rule:NAME`, `grant` for automatic ones).
    pub approvals_by_reviewer: BTreeMap<String, u64>,
    pub denied: u64,
    pub expired: u64,
    pub cancelled: u64,
    pub abandoned: u64,
    pub time_to_decision: Latency,
    pub self_approvals_refused: u64,
    pub grants_created: u64,
    pub grants_revoked: u64,
    #[serde(skip)]
    waits: Vec<u64>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub to: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub generated_at: OffsetDateTime,
    pub chain: Evidence,
    pub policies: Vec<PolicySummary>,
}

impl Report {
    /// Verifies `export` (JSON Lines of the whole log, as `gatekeep audit export` writes) and
    /// sums the records in `[from, to)` per policy.
    pub fn build(
        export: &[u8],
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Self, ReportError> {
        check_window(from, to)?;
        let verified = gatekeep_audit::verify_export(export)
            .map_err(|source| ReportError::Broken { source })?;
        check_whole(&verified)?;
        let mut policies: BTreeMap<String, PolicySummary> = BTreeMap::new();
        for (index, line) in export.lines().enumerate() {
            let line = line.map_err(|source| ReportError::Write { source })?;
            if line.trim().is_empty() {
                continue;
            }
            let record: StoredRecord =
                serde_json::from_str(&line).map_err(|source| ReportError::Unreadable {
                    line: index + 1,
                    source,
                })?;
            if record.at < from || record.at >= to {
                continue;
            }
            count(&mut policies, &record);
        }
        let policies = policies
            .into_values()
            .map(|mut summary| {
                summary.waits.sort_unstable();
                summary.time_to_decision = Latency {
                    decisions: summary.waits.len() as u64,
                    median_ms: nearest_rank(&summary.waits, 50),
                    p95_ms: nearest_rank(&summary.waits, 95),
                };
                summary
            })
            .collect();
        Ok(Self {
            from,
            to,
            generated_at: OffsetDateTime::now_utc(),
            chain: Evidence {
                records: verified.records,
                head_seq: verified.head.as_ref().map(|head| head.seq),
                head_hash: verified.head.map(|head| head.hash),
            },
            policies,
        })
    }

    /// Writes the report in `format`.
    pub fn write(&self, format: ReportFormat, out: impl Write) -> Result<(), ReportError> {
        match format {
            ReportFormat::Json => {
                let mut out = out;
                serde_json::to_writer_pretty(&mut out, self).map_err(|source| {
                    ReportError::Write {
                        source: source.into(),
                    }
                })?;
                out.write_all(b"\n")
                    .map_err(|source| ReportError::Write { source })
            }
            ReportFormat::Csv => self.csv(out),
            ReportFormat::Html => {
                let mut out = out;
                out.write_all(self.html().as_bytes())
                    .map_err(|source| ReportError::Write { source })
            }
        }
    }

    fn csv(&self, out: impl Write) -> Result<(), ReportError> {
        let csv_error = |source| ReportError::Csv { source };
        let mut writer = csv::Writer::from_writer(out);
        writer
            .write_record([
                "policy",
                "requests",
                "approved",
                "approvals_by_reviewer",
                "denied",
                "expired",
                "cancelled",
                "abandoned",
                "decisions",
                "median_ms",
                "p95_ms",
                "self_approvals_refused",
                "grants_created",
                "grants_revoked",
                "from",
                "to",
                "chain_head_seq",
                "chain_head_hash",
            ])
            .map_err(csv_error)?;
        let from = self.from.format(&Rfc3339).unwrap_or_default();
        let to = self.to.format(&Rfc3339).unwrap_or_default();
        let head_seq = self
            .chain
            .head_seq
            .map(|s| s.to_string())
            .unwrap_or_default();
        let head_hash = self.chain.head_hash.clone().unwrap_or_default();
        let optional = |value: Option<u64>| value.map(|v| v.to_string()).unwrap_or_default();
        for p in &self.policies {
            writer
                .write_record([
                    p.policy.clone(),
                    p.requests.to_string(),
                    p.approved.to_string(),
                    reviewers_text(&p.approvals_by_reviewer),
                    p.denied.to_string(),
                    p.expired.to_string(),
                    p.cancelled.to_string(),
                    p.abandoned.to_string(),
                    p.time_to_decision.decisions.to_string(),
                    optional(p.time_to_decision.median_ms),
                    optional(p.time_to_decision.p95_ms),
                    p.self_approvals_refused.to_string(),
                    p.grants_created.to_string(),
                    p.grants_revoked.to_string(),
                    from.clone(),
                    to.clone(),
                    head_seq.clone(),
                    head_hash.clone(),
                ])
                .map_err(csv_error)?;
        }
        writer
            .flush()
            .map_err(|source| ReportError::Write { source })
    }

    /// A self-contained page (inline CSS, no scripts, nothing fetched); every name from the
    /// log is HTML-escaped.
    #[must_use]
    pub fn html(&self) -> String {
        let from = self.from.format(&Rfc3339).unwrap_or_default();
        let to = self.to.format(&Rfc3339).unwrap_or_default();
        let generated = self.generated_at.format(&Rfc3339).unwrap_or_default();
        let mut page = String::new();
        let _ = write!(
            page,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>gatekeep compliance report {from} to {to}</title>\n<style>{STYLE}</style></head>\n<body>\n\
             <h1>gatekeep compliance report</h1>\n\
             <p>Window: <b>{from}</b> (inclusive) to <b>{to}</b> (exclusive). Generated {generated}.</p>\n\
             <p>Audit chain verified from seq 1: {} record(s), head seq {}, hash <code>{}</code>.</p>\n",
            self.chain.records,
            self.chain
                .head_seq
                .map_or_else(|| "none".to_owned(), |s| s.to_string()),
            html_escape(self.chain.head_hash.as_deref().unwrap_or("none")),
        );
        if self.policies.is_empty() {
            page.push_str("<p>No records in this window.</p>\n");
        }
        page.push_str(
            "<table>\n<thead><tr><th>Policy</th><th>Requests</th><th>Approved</th>\
             <th>Denied</th><th>Expired</th><th>Cancelled</th><th>Abandoned</th>\
             <th>Median to decision</th><th>p95 to decision</th>\
             <th>Self-approvals refused</th><th>Grants created</th><th>Grants revoked</th></tr></thead>\n<tbody>\n",
        );
        for p in &self.policies {
            let _ = writeln!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                html_escape(&p.policy),
                p.requests,
                p.approved,
                p.denied,
                p.expired,
                p.cancelled,
                p.abandoned,
                millis(p.time_to_decision.median_ms),
                millis(p.time_to_decision.p95_ms),
                p.self_approvals_refused,
                p.grants_created,
                p.grants_revoked,
            );
        }
        page.push_str("</tbody></table>\n<h2>Approvals by reviewer</h2>\n");
        for p in &self.policies {
            let _ = writeln!(page, "<h3>{}</h3>", html_escape(&p.policy));
            if p.approvals_by_reviewer.is_empty() {
                page.push_str("<p>None.</p>\n");
                continue;
            }
            page.push_str(
                "<table><thead><tr><th>Reviewer</th><th>Approvals</th></tr></thead><tbody>\n",
            );
            for (reviewer, count) in &p.approvals_by_reviewer {
                let _ = writeln!(
                    page,
                    "<tr><td>{}</td><td>{count}</td></tr>",
                    html_escape(reviewer)
                );
            }
            page.push_str("</tbody></table>\n");
        }
        page.push_str(
            "<p class=\"note\">Time to decision: arrival at the service to a reviewer's, rule's \
             or grant's approval or denial (expiries excluded); median and p95 by nearest rank.</p>\n\
             </body></html>\n",
        );
        page
    }
}

/// Print-friendly, no external resources.
const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#111}\
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #999;padding:4px 8px;text-align:right}\
td:first-child,th:first-child{text-align:left}th{background:#eee}code{word-break:break-all}\
.note{font-size:90%;color:#444}@media print{body{margin:0}h2{page-break-before:always}}";

/// Refuses a window that holds no time.
pub fn check_window(from: OffsetDateTime, to: OffsetDateTime) -> Result<(), ReportError> {
    if from >= to {
        return Err(ReportError::EmptyWindow {
            from: from.format(&Rfc3339).unwrap_or_default(),
            to: to.format(&Rfc3339).unwrap_or_default(),
        });
    }
    Ok(())
}

fn check_whole(verified: &VerifyReport) -> Result<(), ReportError> {
    match verified.first_seq {
        Some(first_seq) if first_seq != 1 => Err(ReportError::Partial { first_seq }),
        _ => Ok(()),
    }
}

/// Refuses a local database whose append-only guards were changed (the chain alone cannot
/// show that).
pub fn check_guards(verified: &VerifyReport) -> Result<(), ReportError> {
    if verified.guards_intact == Some(false) {
        return Err(ReportError::GuardsAltered);
    }
    Ok(())
}

fn count(policies: &mut BTreeMap<String, PolicySummary>, record: &StoredRecord) {
    let payload = &record.payload;
    let policy = match record.kind {
        RecordKind::Requested => payload["request"]["policy"].as_str(),
        RecordKind::GrantInstalled | RecordKind::GrantRevoked => {
            payload["grant"]["policy"].as_str()
        }
        _ => payload["policy"].as_str(),
    };
    let Some(policy) = policy else { return };
    let summary = policies
        .entry(policy.to_owned())
        .or_insert_with(|| PolicySummary {
            policy: policy.to_owned(),
            ..PolicySummary::default()
        });
    let is_final = payload["final"].as_bool() == Some(true);
    match record.kind {
        RecordKind::Requested => summary.requests += 1,
        RecordKind::ApprovalRefused => summary.self_approvals_refused += 1,
        RecordKind::GrantInstalled => summary.grants_created += 1,
        RecordKind::GrantRevoked => summary.grants_revoked += 1,
        RecordKind::Decided if is_final => decided(summary, record),
        RecordKind::Expired if is_final => summary.expired += 1,
        RecordKind::Cancelled if is_final => summary.cancelled += 1,
        RecordKind::Abandoned if is_final => summary.abandoned += 1,
        _ => {}
    }
}

fn decided(summary: &mut PolicySummary, record: &StoredRecord) {
    let payload = &record.payload;
    match payload["state"].as_str() {
        Some("approved") => {
            summary.approved += 1;
            let votes: Vec<&str> = payload["approvals"]
                .as_array()
                .map(|votes| {
                    votes
                        .iter()
                        .filter_map(|v| v["reviewer"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            if votes.is_empty() {
                let actor = record.actor.as_deref().unwrap_or("unknown");
                let actor = if actor.starts_with("grant:") {
                    "grant"
                } else {
                    actor
                };
                *summary
                    .approvals_by_reviewer
                    .entry(actor.to_owned())
                    .or_default() += 1;
            }
            for reviewer in votes {
                *summary
                    .approvals_by_reviewer
                    .entry(reviewer.to_owned())
                    .or_default() += 1;
            }
        }
        Some("denied") => summary.denied += 1,
        _ => return,
    }
    if let Some(wait) = payload["wait_ms"].as_u64() {
        summary.waits.push(wait);
    }
}

/// The nearest-rank percentile of sorted `values`.
fn nearest_rank(sorted: &[u64], percent: usize) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

fn reviewers_text(reviewers: &BTreeMap<String, u64>) -> String {
    reviewers
        .iter()
        .map(|(name, count)| format!("{name}={count}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn millis(value: Option<u64>) -> String {
    value.map_or_else(|| "–".to_owned(), |ms| format!("{ms} ms"))
}

/// Escapes text for HTML element content and quoted attributes.
fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<u64> = (1..=20).collect();
        assert_eq!(nearest_rank(&values, 50), Some(10));
        assert_eq!(nearest_rank(&values, 95), Some(19));
        assert_eq!(nearest_rank(&[7], 95), Some(7));
        assert_eq!(nearest_rank(&[], 50), None);
    }

    #[test]
    fn times_are_rfc3339_or_dates_and_a_to_date_includes_its_day() {
        let from = parse_time("--from", "2026-01-31", false).unwrap();
        let to = parse_time("--to", "2026-01-31", true).unwrap();
        assert_eq!(to - from, time::Duration::days(1));
        let at = parse_time("--from", "2026-01-31T09:30:00+01:00", false).unwrap();
        assert_eq!(at.unix_timestamp(), from.unix_timestamp() + 8 * 3600 + 1800);
        let err = parse_time("--to", "yesterday", true).unwrap_err();
        assert!(err.to_string().contains("--to `yesterday`"), "{err}");
    }

    #[test]
    fn html_escapes_every_special_character() {
        assert_eq!(
            html_escape("<b>\"a\" & 'b'</b>"),
            "&lt;b&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/b&gt;"
        );
    }
}
