//! `gatekeep audit verify --host H [--db PATH]`: whether a host's audit log still is what the
//! host shipped to the decision service.
//!
//! The service reports the host's anchored head and every divergence it saw when the host
//! shipped (a record rewritten, the log behind the anchored head). With `--db` (run on the
//! host, as root), the local log is also proved on its own and compared record by record with
//! the anchored hashes: a rewrite, a truncation or a rollback of records already shipped
//! shows, at its seq, even if the agent has not shipped since.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use gatekeep_audit::{AuditError, AuditReader};
use gatekeep_client::ReviewClient;
use gatekeep_proto::v1;
use serde::Serialize;

/// Anchored hashes fetched per call (the service's maximum).
const PAGE: u32 = 10_000;

/// What the comparison found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostVerdict {
    pub host: String,
    /// The anchored head: seq 0 when nothing was shipped.
    pub anchored_seq: u64,
    pub anchored_hash: String,
    /// Divergences the service recorded: `(seq, kind, detail)`.
    pub recorded: Vec<(u64, String, String)>,
    /// What comparing the local log found, when one was given.
    pub local: Option<LocalFinding>,
}

/// How the local log compares with the anchored chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum LocalFinding {
    /// Every anchored record is in the local log, unchanged; `unshipped` more follow.
    Matches { local_seq: u64, unshipped: u64 },
    /// The local chain does not verify by itself at `seq`.
    Broken { seq: u64, detail: String },
    /// The record at `seq` differs from the anchored one.
    Rewritten {
        seq: u64,
        local: String,
        anchored: String,
    },
    /// The local log ends at `local_seq`, before the anchored head.
    Truncated { local_seq: u64, anchored_seq: u64 },
}

impl HostVerdict {
    /// Whether anything diverges.
    #[must_use]
    pub fn diverged(&self) -> bool {
        !self.recorded.is_empty()
            || self
                .local
                .as_ref()
                .is_some_and(|local| !matches!(local, LocalFinding::Matches { .. }))
    }

    /// One line per finding, for people.
    #[must_use]
    pub fn describe(&self) -> String {
        let mut lines = Vec::new();
        if self.anchored_seq == 0 {
            lines.push(format!(
                "the service holds no audit records of host `{}` (not shipped yet, or no such \
                 host)",
                self.host
            ));
        } else {
            lines.push(format!(
                "the service anchored host `{}`'s audit log up to seq {} (hash {})",
                self.host, self.anchored_seq, self.anchored_hash
            ));
        }
        for (seq, kind, detail) in &self.recorded {
            lines.push(format!(
                "DIVERGED ({kind} at seq {seq}), seen by the service: {detail}"
            ));
        }
        match &self.local {
            None => {}
            Some(LocalFinding::Matches {
                local_seq,
                unshipped,
            }) => lines.push(format!(
                "the local log (up to seq {local_seq}) matches every anchored record; \
                 {unshipped} not shipped yet"
            )),
            Some(LocalFinding::Broken { seq, detail }) => lines.push(format!(
                "REWRITTEN at seq {seq}: the local log does not verify ({detail})"
            )),
            Some(LocalFinding::Rewritten {
                seq,
                local,
                anchored,
            }) => lines.push(format!(
                "REWRITTEN at seq {seq}: the local record hashes to {local}, the one the host \
                 shipped to {anchored} (rewritten in place, or rolled back and written on)"
            )),
            Some(LocalFinding::Truncated {
                local_seq,
                anchored_seq,
            }) => lines.push(format!(
                "TRUNCATED: the local log ends at seq {local_seq}, but the host shipped records \
                 up to seq {anchored_seq} (records {} to {anchored_seq} were removed, or the \
                 log rolled back to an older copy)",
                local_seq + 1
            )),
        }
        lines.join("\n")
    }
}

/// Asks the service about `host` and, with `db`, compares the local log.
pub async fn verify(
    client: &mut ReviewClient,
    host: &str,
    db: Option<&Path>,
) -> anyhow::Result<HostVerdict> {
    let report = client
        .host_audit(host, 0, 0)
        .await
        .map_err(|err| anyhow!("{err}"))
        .context("cannot read what the service anchored")?;
    let head = report.hosts.iter().find(|h| h.host == host);
    let mut verdict = HostVerdict {
        host: host.to_owned(),
        anchored_seq: head.map_or(0, |h| h.head_seq),
        anchored_hash: head.map(|h| h.head_hash.clone()).unwrap_or_default(),
        recorded: report
            .divergences
            .iter()
            .map(|d: &v1::HostAuditDivergence| (d.seq, d.kind.clone(), d.detail.clone()))
            .collect(),
        local: None,
    };
    if let Some(db) = db {
        verdict.local = Some(compare(client, host, db, verdict.anchored_seq).await?);
    }
    Ok(verdict)
}

/// Compares the local log at `db` with the host's `anchored_seq` anchored records.
async fn compare(
    client: &mut ReviewClient,
    host: &str,
    db: &Path,
    anchored_seq: u64,
) -> anyhow::Result<LocalFinding> {
    // The chain on its own first: a record changed without fixing the hashes shows here,
    // shipped or not.
    match gatekeep_audit::verify(db) {
        Ok(_) => {}
        Err(AuditError::Tampered { seq, reason }) => {
            return Ok(LocalFinding::Broken {
                seq,
                detail: reason.to_string(),
            });
        }
        Err(err) => {
            return Err(err)
                .with_context(|| format!("cannot read the audit log `{}`", db.display()));
        }
    }
    let reader =
        AuditReader::open(db).with_context(|| format!("cannot read `{}`", db.display()))?;
    let local_seq = reader.head()?.map_or(0, |head| head.seq);
    let mut from = 1;
    while from <= anchored_seq {
        let page = client
            .host_audit(host, from, PAGE)
            .await
            .map_err(|err| anyhow!("{err}"))
            .context("cannot read the anchored hashes")?;
        if page.hashes.is_empty() {
            break;
        }
        let local = reader.read_from(from, page.hashes.len(), usize::MAX)?;
        let mut local = local.iter().peekable();
        for anchored in &page.hashes {
            match local.next_if(|record| record.seq == anchored.seq) {
                Some(record) if record.hash == anchored.hash => {}
                Some(record) => {
                    return Ok(LocalFinding::Rewritten {
                        seq: record.seq,
                        local: record.hash.clone(),
                        anchored: anchored.hash.clone(),
                    });
                }
                None => {
                    return Ok(LocalFinding::Truncated {
                        local_seq,
                        anchored_seq,
                    });
                }
            }
        }
        from = page.hashes.last().map_or(anchored_seq, |h| h.seq) + 1;
    }
    Ok(LocalFinding::Matches {
        local_seq,
        unshipped: local_seq.saturating_sub(anchored_seq),
    })
}
