//! `gatekeep policy forecast`: what policies in audit mode would have done, from an agent's
//! audit log, so a team can tune a policy before it enforces.
//!
//! The agent writes one `audited` record per burst of identical actions a policy in audit
//! mode let through, with `would` (`deny` or `ask`), the rule, the target and a `count`.
//! This module sums them per policy and rule over a time window and ranks the targets that
//! would have asked.

use std::collections::BTreeMap;

use gatekeep_proto::model::Target;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The fields of an `audited` payload (`gatekeep_proto::audit::KernelDenied`) a forecast
/// reads.
#[derive(Debug, Deserialize)]
struct Audited {
    policy: Option<String>,
    rule: Option<String>,
    target: Option<Target>,
    count: Option<u64>,
    would: Option<String>,
}

/// One policy rule's share of the window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RuleRow {
    pub policy: String,
    pub rule: String,
    pub would_ask: u64,
    pub would_deny: u64,
}

/// A target (command line or destination) that would have asked, with how often.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Frequent {
    pub policy: String,
    /// `None` when the records named none.
    pub target: Option<Target>,
    pub count: u64,
}

/// What enforcement would have produced in a window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Forecast {
    /// `audited` records read in the window.
    pub records: u64,
    /// Per policy and rule, ordered by policy then by asks + denials (most first).
    pub rules: Vec<RuleRow>,
    /// Per policy, the `top` targets that would have asked most often.
    pub frequent_asks: Vec<Frequent>,
    /// Records whose payload could not be read (written by another version).
    pub unreadable: u64,
}

/// Sums `records` (`at` and payload of each `audited` record) that fall in `[from, until)`;
/// keeps the `top` most frequent asked targets per policy.
pub fn forecast<'a>(
    records: impl IntoIterator<Item = (OffsetDateTime, &'a serde_json::Value)>,
    from: OffsetDateTime,
    until: OffsetDateTime,
    top: usize,
) -> Forecast {
    let mut out = Forecast::default();
    let mut rules: BTreeMap<(String, String), RuleRow> = BTreeMap::new();
    // Keyed by the target's JSON, which tells targets apart exactly.
    let mut asks: BTreeMap<(String, String), (Option<Target>, u64)> = BTreeMap::new();
    for (at, payload) in records {
        if at < from || at >= until {
            continue;
        }
        out.records += 1;
        let Ok(record) = serde_json::from_value::<Audited>(payload.clone()) else {
            out.unreadable += 1;
            continue;
        };
        let count = record.count.unwrap_or(1);
        let policy = record
            .policy
            .unwrap_or_else(|| "(unknown policy)".to_owned());
        let rule = record.rule.unwrap_or_else(|| "(unknown rule)".to_owned());
        let row = rules
            .entry((policy.clone(), rule.clone()))
            .or_insert_with(|| RuleRow {
                policy: policy.clone(),
                rule,
                ..RuleRow::default()
            });
        if record.would.as_deref() == Some("deny") {
            row.would_deny += count;
        } else {
            row.would_ask += count;
            let key = serde_json::to_string(&record.target).unwrap_or_default();
            asks.entry((policy, key))
                .or_insert_with(|| (record.target.clone(), 0))
                .1 += count;
        }
    }
    let mut rows: Vec<RuleRow> = rules.into_values().collect();
    rows.sort_by(|a, b| {
        a.policy
            .cmp(&b.policy)
            .then((b.would_ask + b.would_deny).cmp(&(a.would_ask + a.would_deny)))
            .then(a.rule.cmp(&b.rule))
    });
    out.rules = rows;
    let mut frequent: Vec<Frequent> = asks
        .into_iter()
        .map(|((policy, _), (target, count))| Frequent {
            policy,
            target,
            count,
        })
        .collect();
    frequent.sort_by(|a, b| {
        a.policy
            .cmp(&b.policy)
            .then(b.count.cmp(&a.count))
            .then_with(|| {
                serde_json::to_string(&a.target)
                    .unwrap_or_default()
                    .cmp(&serde_json::to_string(&b.target).unwrap_or_default())
            })
    });
    let mut kept: BTreeMap<String, usize> = BTreeMap::new();
    frequent.retain(|entry| {
        let seen = kept.entry(entry.policy.clone()).or_default();
        *seen += 1;
        *seen <= top
    });
    out.frequent_asks = frequent;
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use time::macros::datetime;

    use super::*;

    fn audited(
        policy: &str,
        rule: &str,
        would: &str,
        argv: &[&str],
        count: u64,
    ) -> serde_json::Value {
        json!({
            "schema": 1,
            "kind": "exec",
            "policy": policy,
            "rule": rule,
            "process": {"pid": 7, "tid": 7, "uid": 0, "cgroup": "/agents/a"},
            "target": {"kind": "exec", "executable": format!("/usr/bin/{}", argv[0]), "argv": argv},
            "kernel": {},
            "count": count,
            "would": would,
        })
    }

    #[test]
    fn sums_counts_per_rule_and_ranks_asked_targets_within_the_window() {
        let inside = datetime!(2026-12-03 10:00 UTC);
        let before = datetime!(2026-12-01 10:00 UTC);
        let payloads = [
            (
                inside,
                audited(
                    "agents",
                    "exec default ask",
                    "ask",
                    &["kubectl", "delete", "pod"],
                    3,
                ),
            ),
            (
                inside,
                audited(
                    "agents",
                    "exec default ask",
                    "ask",
                    &["kubectl", "get", "pods"],
                    5,
                ),
            ),
            (
                inside,
                audited(
                    "agents",
                    "exec deny /usr/bin/sudo",
                    "deny",
                    &["sudo", "-i"],
                    2,
                ),
            ),
            (
                inside,
                audited(
                    "agents",
                    "exec default ask",
                    "ask",
                    &["kubectl", "get", "pods"],
                    1,
                ),
            ),
            (
                before,
                audited("agents", "exec deny /usr/bin/sudo", "deny", &["sudo"], 100),
            ),
            (inside, json!({"count": "not a number"})),
        ];
        let found = forecast(
            payloads.iter().map(|(at, payload)| (*at, payload)),
            datetime!(2026-12-02 10:00 UTC),
            datetime!(2026-12-04 10:00 UTC),
            1,
        );
        assert_eq!(found.records, 5);
        assert_eq!(found.unreadable, 1);
        assert_eq!(
            found.rules,
            [
                RuleRow {
                    policy: "agents".into(),
                    rule: "exec default ask".into(),
                    would_ask: 9,
                    would_deny: 0
                },
                RuleRow {
                    policy: "agents".into(),
                    rule: "exec deny /usr/bin/sudo".into(),
                    would_ask: 0,
                    would_deny: 2
                },
            ]
        );
        assert_eq!(
            found.frequent_asks,
            [Frequent {
                policy: "agents".into(),
                target: Some(Target::Exec(gatekeep_proto::model::ExecTarget {
                    executable: "/usr/bin/kubectl".into(),
                    argv: vec!["kubectl".into(), "get".into(), "pods".into()],
                    ..serde_json::from_value(json!({"executable": "", "argv": []})).unwrap()
                })),
                count: 6
            }]
        );
    }
}
