//! A pending request as the live queue shows it: the row that `requests` events of
//! `GET /api/v1/events` carry instead of the whole record.
//!
//! Every byte of such an event is written, encrypted and sent once per open console, so
//! with 100 consoles a request's bytes there are paid 100 times (issue 21: 100 consoles may
//! add at most 10 % to the service's CPU per decision). The queue shows one line per
//! request; a request's detail page fetches its whole record (`GET /api/v1/requests/{id}`).
//! So a row holds what the queue shows, filters and sorts on, and no more: no environment,
//! ancestry, cwd, cgroup, content version, approval settings or votes. Its strings are the
//! workload's, as they are: the console escapes them as it does the record's.

use gatekeep_proto::model::{Family, RequestRecord, RequestState, SocketType, Target};
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

/// Most argv bytes a row carries (summed over its arguments): about what a queue line
/// shows. The rest is in the detail.
const ARGV_BYTES: usize = 512;
/// Most arguments a row carries.
const ARGV_ITEMS: usize = 32;
/// Most resolved names of a connect a row carries.
const RESOLVED_ITEMS: usize = 4;

/// One request of the queue.
#[derive(Debug, Serialize)]
pub(super) struct QueueRow<'a> {
    id: Uuid,
    state: RequestState,
    host: &'a str,
    policy: &'a str,
    rule: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_name: Option<&'a str>,
    uid: u32,
    /// The service's deadline (the queue's order and its time left).
    #[serde(with = "time::serde::rfc3339")]
    deadline: OffsetDateTime,
    /// How many approvals so far (who gave them is in the detail).
    approvals: usize,
    approvals_required: u32,
    target: RowTarget<'a>,
}

/// What the request asks, in short: the record's `target` with the same field names, less
/// what the queue does not show, and `cut` when the row left part of it out.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum RowTarget<'a> {
    Exec {
        executable: &'a str,
        /// At most [`ARGV_ITEMS`] arguments and [`ARGV_BYTES`] bytes; the last one kept may
        /// be cut short (at a character boundary).
        argv: Vec<&'a str>,
        /// The agent's own flag: the kernel did not capture the whole argv.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        argv_truncated: bool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        cut: bool,
    },
    Connect {
        family: Family,
        socket_type: SocketType,
        address: &'a str,
        port: u16,
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        resolved: &'a [String],
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        cut: bool,
    },
}

impl<'a> QueueRow<'a> {
    pub(super) fn of(record: &'a RequestRecord) -> Self {
        let request = &record.request;
        Self {
            id: request.id,
            state: record.state,
            host: &record.host,
            policy: &request.policy,
            rule: &request.rule,
            user_name: request.user_name.as_deref(),
            uid: request.uid,
            deadline: record.deadline,
            approvals: record.approvals.len(),
            approvals_required: record.approvals_required,
            target: RowTarget::of(&request.target),
        }
    }
}

impl<'a> RowTarget<'a> {
    fn of(target: &'a Target) -> Self {
        match target {
            Target::Exec(exec) => {
                let (argv, cut) = short_argv(&exec.argv);
                RowTarget::Exec {
                    executable: &exec.executable,
                    argv,
                    argv_truncated: exec.argv_truncated,
                    cut,
                }
            }
            Target::Connect(connect) => {
                let kept = connect.resolved.len().min(RESOLVED_ITEMS);
                RowTarget::Connect {
                    family: connect.family,
                    socket_type: connect.socket_type,
                    address: &connect.address,
                    port: connect.port,
                    resolved: &connect.resolved[..kept],
                    cut: kept < connect.resolved.len(),
                }
            }
        }
    }
}

/// The first arguments within [`ARGV_ITEMS`] and [`ARGV_BYTES`], and whether any of `argv`
/// was left out.
fn short_argv(argv: &[String]) -> (Vec<&str>, bool) {
    let mut kept = Vec::with_capacity(argv.len().min(ARGV_ITEMS));
    let mut budget = ARGV_BYTES;
    for arg in argv {
        if kept.len() == ARGV_ITEMS || budget == 0 {
            return (kept, true);
        }
        if arg.len() > budget {
            kept.push(&arg[..arg.floor_char_boundary(budget)]);
            return (kept, true);
        }
        budget -= arg.len();
        kept.push(arg.as_str());
    }
    (kept, false)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn record(target: &Value) -> RequestRecord {
        serde_json::from_value(json!({
            "request": {
                "id": "6f1c3a52-8f64-4d7c-9a55-0e7c1b2d3e4f", "policy": "deploys",
                "rule": "prod", "cgroup": "/sys/fs/cgroup/ci", "pid": 7, "tid": 7, "uid": 1000,
                "user_name": "ci", "cwd": "/srv",
                "ancestry": [{"pid": 1, "comm": "init", "executable": "/sbin/init",
                              "argv": ["init"], "cgroup": "/"}],
                "target": target,
                "requested_at": "2026-12-04T10:00:00Z", "deadline": "2026-12-04T10:05:00Z",
                "on_timeout": "deny",
                "approval": {"reviewer_groups": ["ops"], "approvals_required": 2,
                             "grant_durations": ["once"], "owners": []}
            },
            "host": "web-1", "state": "pending", "received_at": "2026-12-04T10:00:00Z",
            "deadline": "2026-12-04T10:04:00Z",
            "approvals": [{"reviewer": "alice", "reason": "ok", "at": "2026-12-04T10:01:00Z",
                           "duration": "once", "scope": "workload"}],
            "approvals_required": 2, "decision": null
        }))
        .expect("a record")
    }

    fn row(record: &RequestRecord) -> Value {
        serde_json::to_value(QueueRow::of(record)).expect("a row")
    }

    #[test]
    fn a_row_holds_what_the_queue_shows_and_nothing_else() {
        let exec = record(&json!({
            "kind": "exec", "executable": "/usr/bin/git",
            "argv": ["git", "push", "\u{1b}[2Jx"], "env": ["LD_PRELOAD=/tmp/x.so"],
            "content": "1.0:1:1"
        }));
        assert_eq!(
            row(&exec),
            json!({
                "id": "6f1c3a52-8f64-4d7c-9a55-0e7c1b2d3e4f", "state": "pending",
                "host": "web-1", "policy": "deploys", "rule": "prod", "user_name": "ci",
                "uid": 1000, "deadline": "2026-12-04T10:04:00Z", "approvals": 1,
                "approvals_required": 2,
                // The workload's bytes as they are (the console escapes them).
                "target": {"kind": "exec", "executable": "/usr/bin/git",
                           "argv": ["git", "push", "\u{1b}[2Jx"]}
            })
        );
        let connect = record(&json!({
            "kind": "connect", "family": "inet6", "socket_type": "stream",
            "address": "2001:db8::1", "port": 443,
            "resolved": ["a.example", "b.example", "c.example", "d.example", "e.example"]
        }));
        assert_eq!(
            row(&connect)["target"],
            json!({"kind": "connect", "family": "inet6", "socket_type": "stream",
                   "address": "2001:db8::1", "port": 443,
                   "resolved": ["a.example", "b.example", "c.example", "d.example"],
                   "cut": true})
        );
    }

    #[test]
    fn a_long_argv_is_cut_at_a_character_boundary_and_says_so() {
        let long = "é".repeat(ARGV_BYTES); // two bytes each
        let exec = record(&json!({
            "kind": "exec", "executable": "/bin/echo", "argv": ["echo", long],
            "argv_truncated": true
        }));
        let target = row(&exec)["target"].clone();
        let kept = target["argv"][1]
            .as_str()
            .expect("the second argument, cut");
        assert_eq!(kept.len(), ARGV_BYTES - "echo".len());
        assert!(long.starts_with(kept));
        assert_eq!(target["cut"], true);
        assert_eq!(target["argv_truncated"], true, "the agent's flag stays");

        let many: Vec<String> = (0..100).map(|n| n.to_string()).collect();
        let (kept, cut) = short_argv(&many);
        assert_eq!((kept.len(), cut), (ARGV_ITEMS, true));
        let few = ["a".to_owned(), String::new()];
        assert_eq!(short_argv(&few), (vec!["a", ""], false));
    }

    #[test]
    fn a_row_is_a_fraction_of_the_record() {
        let exec = record(&json!({
            "kind": "exec", "executable": "/usr/bin/git",
            "argv": ["git", "push", "branch-1"]
        }));
        let full = serde_json::to_string(&exec).expect("the record").len();
        let short = serde_json::to_string(&QueueRow::of(&exec))
            .expect("the row")
            .len();
        assert!(short * 2 < full, "row {short} bytes, record {full}");
    }
}
