//! Human-readable tables (the default) or JSON (`--output json`, one document per command,
//! one line per event for `watch`).

use std::{io::Write as _, path::Path};

use clap::ValueEnum;
use gatekeep_client::{AuditReport, Status};
use gatekeep_proto::model::{Grant, RequestRecord, Target};
use serde_json::json;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

pub struct Printer {
    format: Format,
}

/// Prints rows with columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            out.push_str(cell);
            if i < last {
                out.push_str(&" ".repeat(width - cell.chars().count() + 2));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

fn short(id: uuid::Uuid) -> String {
    id.to_string()[..8].to_owned()
}

/// `12s`, `5m 3s`: how long from `from` to `to` (0s if negative), to the second.
fn span(from: OffsetDateTime, to: OffsetDateTime) -> String {
    let seconds = u64::try_from((to - from).whole_seconds()).unwrap_or(0);
    humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string()
}

fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

fn at(time: OffsetDateTime) -> String {
    gatekeep_audit::timestamp::format(time).unwrap_or_else(|_| time.to_string())
}

fn json_line(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

fn text(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

impl Printer {
    pub fn new(format: Format) -> Self {
        Self { format }
    }

    pub fn requests(&self, requests: &[RequestRecord]) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return json_line(&requests);
        }
        if requests.is_empty() {
            return text("no pending requests\n");
        }
        let now = OffsetDateTime::now_utc();
        let rows: Vec<Vec<String>> = requests
            .iter()
            .map(|record| {
                vec![
                    short(record.request.id),
                    span(record.received_at, now),
                    span(now, record.deadline),
                    record.host.clone(),
                    record.request.policy.clone(),
                    record.request.kind().to_string(),
                    record
                        .request
                        .user_name
                        .clone()
                        .unwrap_or_else(|| record.request.uid.to_string()),
                    format!("{}/{}", record.approvals.len(), record.approvals_required),
                    clip(&record.request.target.to_string(), 60),
                ]
            })
            .collect();
        text(&table(
            &[
                "ID",
                "WAITING",
                "LEFT",
                "HOST",
                "POLICY",
                "KIND",
                "USER",
                "APPROVALS",
                "WHAT",
            ],
            &rows,
        ))
    }

    pub fn watch_event(&self, initial: bool, record: &RequestRecord) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return json_line(&json!({"initial": initial, "request": record}));
        }
        let decided_by = record
            .decision
            .as_ref()
            .map(|d| format!(" by {}", d.decided_by))
            .unwrap_or_default();
        text(&format!(
            "{}  {:<9}  {}  {}  {}  {}{}\n",
            at(OffsetDateTime::now_utc()),
            record.state.as_str(),
            record.request.id,
            record.host,
            record.request.policy,
            clip(&record.request.target.to_string(), 80),
            decided_by
        ))
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one field after another, in display order"
    )]
    pub fn request(&self, record: &RequestRecord, similar: &[RequestRecord]) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return json_line(&json!({"request": record, "similar": similar}));
        }
        let r = &record.request;
        let mut out = String::new();
        let mut field = |name: &str, value: String| {
            out.push_str(name);
            out.push_str(&" ".repeat(13_usize.saturating_sub(name.len())));
            out.push_str(&value);
            out.push('\n');
        };
        field("id", r.id.to_string());
        field("state", record.state.to_string());
        field("host", record.host.clone());
        field("policy", format!("{} (rule: {})", r.policy, r.rule));
        match &r.target {
            Target::Exec(exec) => {
                field("exec", exec.executable.clone());
                field("argv", format!("{:?}", exec.argv));
            }
            Target::Connect(connect) => {
                field("connect", r.target.to_string());
                field(
                    "socket",
                    format!(
                        "{} {}",
                        connect.family.as_str(),
                        connect.socket_type.as_str()
                    ),
                );
            }
        }
        field(
            "process",
            format!(
                "pid {} tid {} uid {}{}",
                r.pid,
                r.tid,
                r.uid,
                r.user_name
                    .as_ref()
                    .map(|u| format!(" ({u})"))
                    .unwrap_or_default()
            ),
        );
        field("cgroup", r.cgroup.clone());
        if let Some(cwd) = &r.cwd {
            field("cwd", cwd.clone());
        }
        for (i, process) in r.ancestry.iter().enumerate() {
            field(
                if i == 0 { "ancestry" } else { "" },
                format!(
                    "{} {} {}",
                    process.pid,
                    process.comm,
                    clip(&process.argv.join(" "), 70)
                ),
            );
        }
        field("requested", at(r.requested_at));
        field("received", at(record.received_at));
        field(
            "deadline",
            format!("{} (then {})", at(record.deadline), r.on_timeout),
        );
        field(
            "reviewers",
            if r.approval.reviewer_groups.is_empty() {
                "any reviewer".to_owned()
            } else {
                format!("groups {}", r.approval.reviewer_groups.join(", "))
            },
        );
        field(
            "approvals",
            format!(
                "{}/{} {}",
                record.approvals.len(),
                record.approvals_required,
                record
                    .approvals
                    .iter()
                    .map(|v| format!("{} ({})", v.reviewer, v.duration))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        field(
            "may grant",
            r.approval
                .grant_durations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        );
        if let Some(decision) = &record.decision {
            field(
                "decision",
                format!(
                    "{} ({}) by {} at {}{}",
                    decision.state,
                    decision.verdict,
                    decision.decided_by,
                    at(decision.decided_at),
                    if decision.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", decision.reason)
                    }
                ),
            );
        }
        if similar.is_empty() {
            out.push_str("\nno similar decisions\n");
        } else {
            out.push_str("\nsimilar decisions (newest first):\n");
            let rows: Vec<Vec<String>> = similar
                .iter()
                .map(|s| {
                    let decision = s.decision.as_ref();
                    vec![
                        short(s.request.id),
                        s.state.to_string(),
                        decision.map(|d| d.decided_by.clone()).unwrap_or_default(),
                        decision.map(|d| at(d.decided_at)).unwrap_or_default(),
                        s.host.clone(),
                        clip(&s.request.target.to_string(), 50),
                    ]
                })
                .collect();
            out.push_str(&table(&["ID", "STATE", "BY", "AT", "HOST", "WHAT"], &rows));
        }
        text(&out)
    }

    pub fn decided(&self, record: &RequestRecord) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return json_line(record);
        }
        let line = match &record.decision {
            Some(decision) => {
                let grant = decision
                    .grant
                    .as_ref()
                    .map(|g| format!("; grant {} ({})", g.id, g.duration))
                    .unwrap_or_default();
                format!(
                    "{} {}: {}{}\n",
                    record.request.id, decision.state, decision.verdict, grant
                )
            }
            None => format!(
                "{} approval recorded ({}/{}); waiting for more reviewers\n",
                record.request.id,
                record.approvals.len(),
                record.approvals_required
            ),
        };
        text(&line)
    }

    pub fn grants(&self, grants: &[Grant]) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return json_line(&grants);
        }
        if grants.is_empty() {
            return text("no grants\n");
        }
        let rows: Vec<Vec<String>> = grants
            .iter()
            .map(|g| {
                let until = match (&g.revoked, g.expires_at, &g.cgroup) {
                    (Some(revoked), _, _) => format!("revoked by {}", revoked.by),
                    (None, Some(expires), _) => at(expires),
                    (None, None, Some(cgroup)) => format!("end of {cgroup}"),
                    (None, None, None) => "revoked".to_owned(),
                };
                vec![
                    g.id.to_string(),
                    g.host.clone(),
                    g.policy.clone(),
                    g.verdict.to_string(),
                    g.duration.to_string(),
                    until,
                    g.created_by.clone(),
                    clip(&g.target.to_string(), 50),
                ]
            })
            .collect();
        text(&table(
            &[
                "ID", "HOST", "POLICY", "VERDICT", "DURATION", "UNTIL", "BY", "WHAT",
            ],
            &rows,
        ))
    }

    pub fn grant_revoked(&self, grant: &Grant) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return json_line(grant);
        }
        text(&format!("revoked grant {} on {}\n", grant.id, grant.host))
    }

    pub fn local_verify(
        &self,
        path: &Path,
        report: &gatekeep_audit::VerifyReport,
    ) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return json_line(report);
        }
        let head = report.head.as_ref().map_or_else(
            || "empty".to_owned(),
            |h| format!("head seq {} hash {}", h.seq, h.hash),
        );
        let guards = match report.guards_intact {
            Some(false) => "; WARNING: the append-only triggers are missing or altered",
            _ => "",
        };
        text(&format!(
            "ok: {} records of `{}` verify ({head}){guards}\n",
            report.records,
            path.display()
        ))
    }

    pub fn remote_verify(&self, report: &AuditReport) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return json_line(&json!({
                "records": report.records,
                "head_seq": report.head_seq,
                "head_hash": report.head_hash,
                "guards_intact": report.guards_intact,
            }));
        }
        if report.records == 0 {
            return text("ok: the service's audit log is empty\n");
        }
        text(&format!(
            "ok: the service's {} audit records verify (head seq {} hash {}){}\n",
            report.records,
            report.head_seq,
            report.head_hash,
            if report.guards_intact {
                ""
            } else {
                "; WARNING: the append-only triggers are missing or altered"
            }
        ))
    }

    pub fn policy_ok(&self, summary: &gatekeep_policy::Summary) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return json_line(summary);
        }
        text(&format!("ok: {summary}\n"))
    }

    pub fn status(&self, server: &str, status: &Status) -> anyhow::Result<()> {
        let started = gatekeep_proto::convert::from_ms("started_at_ms", status.started_at_ms).ok();
        if self.format == Format::Json {
            return json_line(&json!({
                "server": server,
                "version": status.version,
                "started_at": started.map(at),
                "pending": status.pending,
                "connected_agents": status.connected_agents,
                "audit_records": status.audit_records,
                "audit_head": status.audit_head,
                "reviewer": status.reviewer,
                "groups": status.groups,
            }));
        }
        let up = started
            .map(|s| format!(" (up {})", span(s, OffsetDateTime::now_utc())))
            .unwrap_or_default();
        text(&format!(
            "server     {server}\nversion    {}{up}\npending    {}\nagents     {}\naudit      {} records, head {}\nyou        {} ({})\n",
            status.version,
            status.pending,
            if status.connected_agents.is_empty() {
                "none connected".to_owned()
            } else {
                status.connected_agents.join(", ")
            },
            status.audit_records,
            if status.audit_head.is_empty() {
                "-"
            } else {
                &status.audit_head
            },
            status.reviewer,
            if status.groups.is_empty() {
                "no groups".to_owned()
            } else {
                status.groups.join(", ")
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns() {
        let out = table(
            &["ID", "WHAT"],
            &[
                vec!["a".into(), "x".into()],
                vec!["abcdef".into(), "y".into()],
            ],
        );
        assert_eq!(out, "ID      WHAT\na       x\nabcdef  y\n");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abc", 4), "abc");
    }
}
