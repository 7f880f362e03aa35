//! Human-readable tables (the default) or JSON (`--output json`, one document per command,
//! one line per event for `watch`).

use std::{fmt::Write as _, io::Write as _, path::Path};

use clap::ValueEnum;
use gatekeep_client::{AuditReport, Status};
use gatekeep_proto::model::{Family, Grant, GrantScope, PathCheck, RequestRecord, Target};
use serde_json::json;
use time::OffsetDateTime;

use crate::escape::{terminal, word, words};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

pub struct Printer {
    format: Format,
}

impl Printer {
    /// Whether `--output json` was asked for.
    pub fn is_json(&self) -> bool {
        matches!(self.format, Format::Json)
    }
}

/// Prints rows with columns padded to their widest cell.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
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

/// `text` escaped for the terminal (see [`crate::escape`]), owned.
fn t(text: &str) -> String {
    terminal(text).into_owned()
}

/// The short id of each record: unique among those listed (see
/// [`gatekeep_proto::id::short_ids`]).
fn short_ids(records: &[RequestRecord]) -> Vec<String> {
    let ids: Vec<uuid::Uuid> = records.iter().map(|r| r.request.id).collect();
    gatekeep_proto::id::short_ids(&ids)
}

/// What a request asks, escaped for the terminal: the executable once, then the arguments
/// after `argv[0]` (`/opt/demo/deploy.sh --env prod`); `argv[0]` is shown only when it is not
/// the executable's path or file name (`/bin/busybox [as sh] -c ...`). The name the workload
/// passed follows the executable when it differs (`/tmp/x/evil [named /tmp/innocent/echo]`),
/// and a path the agent could not verify says so (`/tmp/y [unverified]`). A destination as
/// `address:port`. An argv the kernel could not capture whole is marked `[ARGV TRUNCATED]`
/// right after the executable, followed by the bound environment variables (`[env
/// LD_PRELOAD=/tmp/x.so]`), which are part of what an approval covers.
pub fn what(target: &Target) -> String {
    match target {
        Target::Exec(exec) => {
            let mut out = word(&exec.executable).into_owned();
            if exec.path_check == Some(PathCheck::Unverified) {
                out.push_str(" [unverified]");
            }
            // Up front: `review list` cuts long lines, and this must not be cut.
            if exec.argv_truncated {
                out.push_str(" [ARGV TRUNCATED]");
            }
            // Up front too: what the loader runs besides the file.
            if !exec.env.is_empty() {
                out.push_str(" [env ");
                out.push_str(&words(&exec.env));
                out.push(']');
            }
            if let Some(named) = &exec.named {
                out.push_str(" [named ");
                out.push_str(&word(named));
                out.push(']');
            }
            let file_name = exec.executable.rsplit('/').next().unwrap_or_default();
            if let Some(argv0) = exec.argv.first()
                && *argv0 != exec.executable
                && argv0 != file_name
            {
                out.push_str(" [as ");
                out.push_str(&word(argv0));
                out.push(']');
            }
            if exec.argv.len() > 1 {
                out.push(' ');
                out.push_str(&words(&exec.argv[1..]));
            }
            out
        }
        Target::Connect(connect) => match connect.family {
            Family::Unix => format!("unix:{}", word(&connect.address)),
            Family::Inet => format!(
                "{}:{}{}",
                t(&connect.address),
                connect.port,
                resolved_names(&connect.resolved)
            ),
            Family::Inet6 => format!(
                "[{}]:{}{}",
                t(&connect.address),
                connect.port,
                resolved_names(&connect.resolved)
            ),
        },
    }
}

/// ` (resolved NAME, ...)`: the host names the workload looked up for a
/// connect's address (workload controlled, so escaped), or nothing.
fn resolved_names(names: &[String]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let names: Vec<String> = names.iter().map(|name| word(name).into_owned()).collect();
    format!(" (resolved {})", names.join(", "))
}

/// The lines `review show` prints of an exec before its argv, escaped for the terminal: the
/// executable and whether the agent verified that the host's file there is the one that
/// runs; the name the workload passed when it differs; the file's device and inode; and the
/// workload's mount namespace when it is not the agent's; and an argv the kernel could
/// not capture whole.
fn exec_fields(exec: &gatekeep_proto::model::ExecTarget) -> Vec<(&'static str, String)> {
    let file = exec.file.as_deref().map(t).unwrap_or_default();
    let check = match exec.path_check {
        Some(PathCheck::Verified) => String::new(),
        Some(PathCheck::Unverified) => {
            format!(" (UNVERIFIED: the workload's name; no host path of file {file} was found)")
        }
        None => " (as the caller said; not checked by an agent)".to_owned(),
    };
    let mut out = vec![("exec", format!("{}{check}", word(&exec.executable)))];
    if let Some(named) = &exec.named {
        out.push((
            "named",
            format!("{} (the name the workload passed)", word(named)),
        ));
    }
    if exec.path_check == Some(PathCheck::Verified) && !file.is_empty() {
        out.push(("file", format!("{file} (verified on the host)")));
    }
    if exec.argv_truncated {
        out.push((
            "truncated",
            "ARGV TRUNCATED: the kernel captured only the arguments below; what runs may differ \
             after them, and no grant will cover it"
                .to_owned(),
        ));
    }
    if let Some(namespace) = &exec.mount_namespace {
        out.push((
            "mount ns",
            format!(
                "{} (not the agent's: the workload may see other files at a path)",
                t(namespace)
            ),
        ));
    }
    out
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
            .zip(short_ids(requests))
            .map(|(record, short)| {
                vec![
                    short,
                    span(record.received_at, now),
                    span(now, record.deadline),
                    t(&record.host),
                    t(&record.request.policy),
                    record.request.kind().to_string(),
                    record
                        .request
                        .user_name
                        .as_deref()
                        .map_or_else(|| record.request.uid.to_string(), t),
                    format!("{}/{}", record.approvals.len(), record.approvals_required),
                    clip(&what(&record.request.target), 60),
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
            .map(|d| format!(" by {}", t(&d.decided_by)))
            .unwrap_or_default();
        text(&format!(
            "{}  {:<9}  {}  {}  {}  {}{}\n",
            at(OffsetDateTime::now_utc()),
            record.state.as_str(),
            record.request.id,
            t(&record.host),
            t(&record.request.policy),
            clip(&what(&record.request.target), 80),
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
        field("host", t(&record.host));
        field("policy", format!("{} (rule: {})", t(&r.policy), t(&r.rule)));
        field("what", what(&r.target));
        match &r.target {
            Target::Exec(exec) => {
                for (name, value) in exec_fields(exec) {
                    field(name, value);
                }
                field("argv", words(&exec.argv));
                if !exec.env.is_empty() {
                    field(
                        "env",
                        format!(
                            "{} (bound: the loader's LD_* and the policy's bound_env)",
                            words(&exec.env)
                        ),
                    );
                }
            }
            Target::Connect(connect) => {
                field("connect", what(&r.target));
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
                    .map(|u| format!(" ({})", t(u)))
                    .unwrap_or_default()
            ),
        );
        field("cgroup", word(&r.cgroup).into_owned());
        if let Some(cwd) = &r.cwd {
            field("cwd", word(cwd).into_owned());
        }
        for (i, process) in r.ancestry.iter().enumerate() {
            field(
                if i == 0 { "ancestry" } else { "" },
                format!(
                    "{} {} {}",
                    process.pid,
                    word(&process.comm),
                    clip(&words(&process.argv), 70)
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
                    .map(|v| format!("{} ({})", t(&v.reviewer), v.duration))
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
                    t(&decision.decided_by),
                    at(decision.decided_at),
                    if decision.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", t(&decision.reason))
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
                .zip(short_ids(similar))
                .map(|(s, short)| {
                    let decision = s.decision.as_ref();
                    vec![
                        short,
                        s.state.to_string(),
                        decision.map(|d| t(&d.decided_by)).unwrap_or_default(),
                        decision.map(|d| at(d.decided_at)).unwrap_or_default(),
                        t(&s.host),
                        clip(&what(&s.request.target), 50),
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
                    .map(|g| format!("; grant {} ({}, scope {})", g.id, g.duration, g.scope))
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
                let session = g.duration == gatekeep_proto::GrantDuration::Session;
                let until = match (&g.revoked, g.expires_at, &g.cgroup) {
                    (Some(revoked), _, _) => format!("revoked by {}", t(&revoked.by)),
                    (None, Some(expires), _) => at(expires),
                    (None, None, Some(cgroup)) if session => format!("end of {}", word(cgroup)),
                    (None, None, _) => "revoked".to_owned(),
                };
                let scope = match (g.scope, &g.cgroup) {
                    (GrantScope::Workload, Some(cgroup)) => format!("workload {}", word(cgroup)),
                    (GrantScope::Workload, None) => "workload".to_owned(),
                    (GrantScope::Policy, _) => "policy".to_owned(),
                };
                vec![
                    g.id.to_string(),
                    t(&g.host),
                    t(&g.policy),
                    g.verdict.to_string(),
                    g.duration.to_string(),
                    scope,
                    until,
                    t(&g.created_by),
                    clip(&what(&g.target), 50),
                ]
            })
            .collect();
        text(&table(
            &[
                "ID", "HOST", "POLICY", "VERDICT", "DURATION", "SCOPE", "UNTIL", "BY", "WHAT",
            ],
            &rows,
        ))
    }

    pub fn grant_revoked(&self, grant: &Grant) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return json_line(grant);
        }
        text(&format!(
            "revoked grant {} on {}\n",
            grant.id,
            t(&grant.host)
        ))
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

    /// `audit verify --host`: what the service anchored and how the local log compares.
    pub fn host_verify(&self, verdict: &crate::host_audit::HostVerdict) -> anyhow::Result<()> {
        if self.format == Format::Json {
            let mut value = serde_json::to_value(verdict)?;
            value["diverged"] = json!(verdict.diverged());
            return json_line(&value);
        }
        text(&format!(
            "{}{}\n",
            if verdict.diverged() { "" } else { "ok: " },
            verdict.describe()
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

    /// A valid policy set: its warnings, then (when `ok`) the one-line summary. JSON: one
    /// document, the summary's fields and `warnings` (raw values; JSON escapes them). Text:
    /// the warnings on stderr, escaped for the terminal, the summary on stdout.
    pub fn policy_validated(
        &self,
        validation: &gatekeep_policy::Validation,
        ok: bool,
    ) -> anyhow::Result<()> {
        if self.format == Format::Json {
            let mut document = serde_json::to_value(validation.summary)?;
            if let Some(fields) = document.as_object_mut() {
                fields.insert("ok".into(), ok.into());
                fields.insert(
                    "warnings".into(),
                    serde_json::to_value(&validation.warnings)?,
                );
            }
            return json_line(&document);
        }
        {
            let mut err = std::io::stderr().lock();
            for warning in &validation.warnings {
                writeln!(err, "{}", warning_line(warning))?;
            }
        }
        if !ok {
            return Ok(());
        }
        let count = validation.warnings.len();
        let warnings = match count {
            0 => String::new(),
            1 => "; 1 warning".to_owned(),
            _ => format!("; {count} warnings"),
        };
        text(&format!("ok: {}{warnings}\n", validation.summary))
    }

    /// `policy forecast`: per policy and rule, asks and denials enforcement would have made,
    /// then the targets that would have asked most often. JSON: the [`Forecast`] as one
    /// document.
    pub fn forecast(&self, found: &crate::forecast::Forecast, since: &str) -> anyhow::Result<()> {
        if self.format == Format::Json {
            return json_line(found);
        }
        if found.records == 0 {
            return text(&format!(
                "no audited actions in the last {}: no policy in audit mode met an action it would deny or ask about (or none is in audit mode)\n",
                t(since)
            ));
        }
        let rows: Vec<Vec<String>> = found
            .rules
            .iter()
            .map(|row| {
                vec![
                    t(&row.policy),
                    t(&row.rule),
                    row.would_ask.to_string(),
                    row.would_deny.to_string(),
                ]
            })
            .collect();
        let mut out = format!("in the last {}, enforcement would have:\n", t(since));
        out.push_str(&table(&["POLICY", "RULE", "ASKS", "DENIALS"], &rows));
        if !found.frequent_asks.is_empty() {
            out.push_str("\nmost frequent actions that would have asked:\n");
            let rows: Vec<Vec<String>> = found
                .frequent_asks
                .iter()
                .map(|entry| {
                    vec![
                        t(&entry.policy),
                        entry.count.to_string(),
                        entry
                            .target
                            .as_ref()
                            .map_or_else(|| "(no target)".to_owned(), what),
                    ]
                })
                .collect();
            out.push_str(&table(&["POLICY", "COUNT", "WHAT"], &rows));
        }
        if found.unreadable > 0 {
            let _ = writeln!(
                out,
                "\n{} record(s) could not be read (written by another version) and are not counted",
                found.unreadable
            );
        }
        text(&out)
    }

    /// `policy test`'s results. Text: one line per case (`PASS`/`FAIL`, where it was
    /// written, the action, the outcome and what decided it, escaped), then a summary. JSON:
    /// one document with `cases` (each case, its outcome and `passed`), `passed` and `failed`.
    pub fn policy_tested(&self, results: &[gatekeep_policy::CaseResult]) -> anyhow::Result<()> {
        let failed = results.iter().filter(|result| !result.passed).count();
        if self.format == Format::Json {
            return json_line(&json!({
                "cases": results,
                "passed": results.len() - failed,
                "failed": failed,
            }));
        }
        let mut out = String::new();
        for result in results {
            out.push_str(&case_line(result));
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "{} case(s): {} passed, {failed} failed",
            results.len(),
            results.len() - failed
        );
        text(&out)
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

/// `warning[script]: agents.toml:7:9: policy "agents": ...`, escaped for the terminal (rule
/// paths and `#!` lines come from files).
/// One `policy test` result, every part escaped for the terminal:
/// `PASS at: [name: ]action in cgroup -> outcome (policy: why)`.
fn case_line(result: &gatekeep_policy::CaseResult) -> String {
    use gatekeep_policy::Example;
    let case = &result.case;
    let action = match &case.example {
        Example::Exec { path, argv, .. } => {
            let path = path.display().to_string();
            if argv.len() == 1 && argv[0] == path {
                format!("exec {}", word(&path))
            } else {
                format!("exec {} (argv: {})", word(&path), words(argv))
            }
        }
        Example::Connect { to, resolved } if resolved.is_empty() => format!("connect {to}"),
        Example::Connect { to, resolved } => format!(
            "connect {to} (resolved {})",
            resolved
                .iter()
                .map(|name| word(name))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Example::ConnectHost { host, port } => format!("connect {}:{port}", word(host)),
        Example::Unix { path } => format!("unix {}", word(path)),
    };
    let name = case
        .name
        .as_ref()
        .map(|name| format!("{}: ", t(name)))
        .unwrap_or_default();
    let outcome = &result.outcome;
    let got = if result.passed {
        outcome.action.to_string()
    } else {
        format!("expected {}, got {}", case.expect, outcome.action)
    };
    let why = match &outcome.policy {
        Some(policy) => format!("{}: {}", t(policy), t(&outcome.because)),
        None => t(&outcome.because),
    };
    format!(
        "{} {}: {name}{action} in {} -> {got} ({why})",
        if result.passed { "PASS" } else { "FAIL" },
        t(&case.at),
        t(&case.cgroup)
    )
}

pub fn warning_line(warning: &gatekeep_policy::Warning) -> String {
    format!("warning[{}]: {}", warning.kind, t(&warning.to_string()))
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

    fn exec(executable: &str, argv: &[&str]) -> Target {
        Target::Exec(gatekeep_proto::model::ExecTarget {
            executable: executable.into(),
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            content: None,
            path_check: None,
            named: None,
            file: None,
            mount_namespace: None,
            argv_truncated: false,
            env: Vec::new(),
        })
    }

    #[test]
    fn what_shows_the_executable_once() {
        assert_eq!(
            what(&exec(
                "/opt/demo/deploy.sh",
                &["/opt/demo/deploy.sh", "--env", "prod"]
            )),
            "/opt/demo/deploy.sh --env prod"
        );
        assert_eq!(
            what(&exec("/usr/bin/git", &["git", "push"])),
            "/usr/bin/git push"
        );
        assert_eq!(
            what(&exec("/bin/busybox", &["sh", "-c", "id; uname -a"])),
            r#"/bin/busybox [as sh] -c "id; uname -a""#
        );
        assert_eq!(what(&exec("/usr/bin/true", &[])), "/usr/bin/true");
    }

    #[test]
    fn an_exec_shows_the_file_that_runs_its_name_and_its_mount_namespace() {
        let decoy = gatekeep_proto::model::ExecTarget {
            executable: "/tmp/x/evil".into(),
            argv: vec!["echo".into(), "hi".into()],
            content: None,
            path_check: Some(PathCheck::Verified),
            named: Some("/tmp/innocent/echo".into()),
            file: Some("0:30 1234".into()),
            mount_namespace: Some("mnt:[4026532301]".into()),
            argv_truncated: false,
            env: Vec::new(),
        };
        assert_eq!(
            what(&Target::Exec(decoy.clone())),
            "/tmp/x/evil [named /tmp/innocent/echo] [as echo] hi"
        );
        assert_eq!(
            exec_fields(&decoy),
            [
                ("exec", "/tmp/x/evil".to_owned()),
                (
                    "named",
                    "/tmp/innocent/echo (the name the workload passed)".to_owned()
                ),
                ("file", "0:30 1234 (verified on the host)".to_owned()),
                (
                    "mount ns",
                    "mnt:[4026532301] (not the agent's: the workload may see other files at a path)"
                        .to_owned()
                ),
            ]
        );

        let unverified = gatekeep_proto::model::ExecTarget {
            executable: "/tmp/innocent/echo".into(),
            path_check: Some(PathCheck::Unverified),
            named: None,
            ..decoy.clone()
        };
        assert_eq!(
            what(&Target::Exec(unverified.clone())),
            "/tmp/innocent/echo [unverified] hi"
        );
        let fields = exec_fields(&unverified);
        assert_eq!(
            fields[0].1,
            "/tmp/innocent/echo (UNVERIFIED: the workload's name; no host path of file 0:30 1234 was found)"
        );
        assert!(fields.iter().all(|(name, _)| *name != "file"), "{fields:?}");

        // The workload writes the names: escaped like the rest.
        let hostile = gatekeep_proto::model::ExecTarget {
            named: Some("/tmp/\u{1b}[2Jecho".into()),
            mount_namespace: Some("mnt:[1]\u{202e}".into()),
            ..decoy
        };
        let shown = exec_fields(&hostile);
        assert!(
            shown
                .iter()
                .all(|(_, v)| !v.contains('\u{1b}') && !v.contains('\u{202e}')),
            "{shown:?}"
        );
        assert!(what(&Target::Exec(hostile)).contains(r"[named /tmp/\e[2Jecho]"));
    }

    #[test]
    fn a_truncated_argv_is_marked_in_list_and_show_and_stays_escaped() {
        let exec = gatekeep_proto::model::ExecTarget {
            executable: "/bin/echo".into(),
            argv: vec!["echo".into(), "a\u{1b}[2J".into()],
            content: None,
            path_check: Some(PathCheck::Verified),
            named: None,
            file: Some("0:30 1234".into()),
            mount_namespace: None,
            argv_truncated: true,
            env: Vec::new(),
        };
        let listed = what(&Target::Exec(exec.clone()));
        assert!(
            listed.starts_with("/bin/echo [ARGV TRUNCATED] "),
            "marked before the arguments, which a list may cut: {listed}"
        );
        assert!(!listed.contains('\u{1b}'), "{listed}");
        let fields = exec_fields(&exec);
        assert!(
            fields
                .iter()
                .any(|(name, value)| *name == "truncated" && value.starts_with("ARGV TRUNCATED")),
            "{fields:?}"
        );

        let whole = gatekeep_proto::model::ExecTarget {
            argv_truncated: false,
            ..exec
        };
        assert!(!what(&Target::Exec(whole.clone())).contains("TRUNCATED"));
        assert!(
            exec_fields(&whole)
                .iter()
                .all(|(name, _)| *name != "truncated")
        );
    }

    #[test]
    fn the_bound_environment_is_listed_up_front_and_escaped() {
        let exec = gatekeep_proto::model::ExecTarget {
            executable: "/bin/echo".into(),
            argv: vec!["echo".into(), "hi".into()],
            content: None,
            path_check: Some(PathCheck::Verified),
            named: None,
            file: None,
            mount_namespace: None,
            argv_truncated: false,
            env: vec![
                "LD_PRELOAD=/tmp/e\u{1b}[2J.so".into(),
                "PYTHONPATH=/x y".into(),
            ],
        };
        let listed = what(&Target::Exec(exec.clone()));
        assert_eq!(
            listed,
            r#"/bin/echo [env LD_PRELOAD=/tmp/e\e[2J.so "PYTHONPATH=/x y"] hi"#
        );
        let plain = gatekeep_proto::model::ExecTarget {
            env: Vec::new(),
            ..exec
        };
        assert_eq!(what(&Target::Exec(plain)), "/bin/echo hi");
    }

    #[test]
    fn what_escapes_what_the_workload_wrote() {
        let out = what(&exec(
            "/tmp/\u{1b}]0;x\u{7}evil",
            &["evil", "\u{1b}[2J\u{1b}[H", "a\u{202e}b", "\r\u{8}"],
        ));
        assert!(!out.chars().any(char::is_control), "{out}");
        assert!(!out.contains('\u{202e}'), "{out}");
        assert_eq!(
            out,
            r"/tmp/\e]0;x\aevil [as evil] \e[2J\e[H a\u{202e}b \r\b"
        );
        let unix = Target::Connect(gatekeep_proto::model::ConnectTarget {
            family: Family::Unix,
            address: "/run/\u{1b}[31mred".into(),
            port: 0,
            socket_type: gatekeep_proto::model::SocketType::Stream,
            resolved: Vec::new(),
        });
        assert_eq!(what(&unix), r"unix:/run/\e[31mred");
    }
}
