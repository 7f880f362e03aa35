//! The agent's Prometheus metrics: [`AgentMetrics`] owns the registry and every family, so a
//! new metric is one field and one `register` line in [`AgentMetrics::new`].
//!
//! Served like the service's (`[metrics] listen` in the agent's config, plain HTTP, off
//! unless set; see `gatekeep_server::metrics`). Three sources:
//! - asked requests, counted in user space as the controller records them (every record goes
//!   through [`AgentMetrics::observe`]): asked, and how each ended, with the time from the
//!   pause to the decision;
//! - the kernel's own counters (`COUNTERS`, per CPU, summed; pinned, so they survive agent
//!   restarts like a Prometheus counter should): allows and denies decided in the kernel,
//!   events dropped on the ring buffer, and the rest, read at each scrape;
//! - gauges read at each scrape: paused requests (the kernel's `PENDING` map, by kind) and the
//!   audit backlog (records handed to the log and not yet committed).
//!
//! - shipping lag: local audit records the service has not anchored yet (remote mode), from
//!   the shipper's status at each scrape; 0 when the agent does not ship.

use std::sync::{Arc, Mutex, PoisonError};

use gatekeep_audit::{AuditRecord, RecordKind};
use gatekeep_common::{counter, request_kind};
use gatekeep_server::metrics::{Bounded, MAX_POLICY_LABELS};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::bpf::kernel::COUNTER_NAMES;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Asked {
    kind: String,
    policy: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Ended {
    kind: String,
    policy: String,
    /// `approved`, `denied`, `expired`, `cancelled`, `abandoned`.
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Latency {
    kind: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Stage {
    /// `forwarder` (handed over, not yet in the writer), `writer` (queued in the writer),
    /// `held` (kept in memory while the log cannot be written).
    stage: &'static str,
}

/// From a millisecond to about six hours, x4 per bucket (as the service's).
fn decision_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

/// The kernel's counters as last read; encoded as counters at each scrape.
#[derive(Debug, Default)]
struct KernelCounters(Mutex<Option<Vec<u64>>>);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CounterName {
    counter: &'static str,
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let values = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // Not read yet, or unreadable: no sample rather than a made-up zero.
        let Some(values) = values else { return Ok(()) };
        let dropped = ConstCounter::new(
            values
                .get(counter::EVENTS_DROPPED as usize)
                .copied()
                .unwrap_or(0),
        );
        dropped.encode(encoder.encode_descriptor(
            "gatekeep_agent_events_dropped",
            "Events the kernel could not put on the ring buffer (user space behind); asked requests are found again by the reconciler",
            None,
            dropped.metric_type(),
        )?)?;
        let mut family = encoder.encode_descriptor(
            "gatekeep_agent_kernel_events",
            "The kernel programs' counters (COUNTERS, summed over CPUs): exec_allowed, exec_denied, connect_denied, ...",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (name, value) in COUNTER_NAMES.iter().zip(values) {
            ConstCounter::new(value)
                .encode(family.encode_family(&CounterName { counter: name })?)?;
        }
        Ok(())
    }
}

/// What a scrape reads from the running agent.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// `COUNTERS`, indexed by `gatekeep_common::counter`; `None` when unreadable.
    pub kernel_counters: Option<Vec<u64>>,
    /// Kinds (`request_kind`) of the kernel's pending entries; `None` when unreadable.
    pub paused_kinds: Option<Vec<u32>>,
    /// Records handed to the audit sink and not yet queued in the writer.
    pub audit_forwarder: usize,
    /// Records queued in the audit writer.
    pub audit_writer: usize,
    /// Records held in memory while the log cannot be written.
    pub audit_held: usize,
    /// Whether the audit log can be written.
    pub audit_writable: bool,
    /// Local audit records the service has not anchored yet; `None` unless the agent ships
    /// its log (remote mode).
    pub shipping_lag: Option<u64>,
}

/// The agent's metrics.
pub struct AgentMetrics {
    registry: Registry,
    policies: Bounded,
    asked: Family<Asked, Counter>,
    ended: Family<Ended, Counter>,
    decision_seconds: Family<Latency, Histogram, fn() -> Histogram>,
    paused: Family<KindLabel, Gauge>,
    audit_backlog: Family<Stage, Gauge>,
    audit_writable: Gauge,
    shipping_lag: Gauge,
    kernel: Arc<KernelCounters>,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Every family, registered.
    #[must_use]
    pub fn new() -> Self {
        let metrics = Self {
            registry: Registry::default(),
            policies: Bounded::new(MAX_POLICY_LABELS),
            asked: Family::default(),
            ended: Family::default(),
            decision_seconds: Family::new_with_constructor(decision_buckets),
            paused: Family::default(),
            audit_backlog: Family::default(),
            audit_writable: Gauge::default(),
            shipping_lag: Gauge::default(),
            kernel: Arc::default(),
        };
        let mut registry = Registry::default();
        let r = &mut registry;
        r.register(
            "gatekeep_agent_requests_asked",
            "Paused requests put to the decider, by kind and policy",
            metrics.asked.clone(),
        );
        r.register(
            "gatekeep_agent_requests_ended",
            "Paused requests that ended, by kind, policy and outcome",
            metrics.ended.clone(),
        );
        r.register(
            "gatekeep_agent_decision_seconds",
            "Time from the pause to the decision the agent applied",
            metrics.decision_seconds.clone(),
        );
        r.register(
            "gatekeep_agent_requests_paused",
            "Tasks paused in the kernel waiting for a verdict (PENDING), by kind",
            metrics.paused.clone(),
        );
        r.register(
            "gatekeep_agent_audit_backlog_records",
            "Audit records not yet committed, by stage (the batch being committed is not counted)",
            metrics.audit_backlog.clone(),
        );
        r.register(
            "gatekeep_agent_audit_writable",
            "1 while the local audit log can be written, 0 while asks are denied for want of it",
            metrics.audit_writable.clone(),
        );
        r.register(
            "gatekeep_agent_audit_shipping_lag_records",
            "Local audit records the decision service has not anchored yet (remote mode only)",
            metrics.shipping_lag.clone(),
        );
        r.register_collector(Box::new(Arc::clone(&metrics.kernel)));
        Self {
            registry,
            ..metrics
        }
    }

    /// Counts what an audit record says about a request: `requested` is an ask; a final
    /// `decided`, `expired`, `cancelled` or `abandoned` is how one ended (`wait_ms` its
    /// latency). Other records are not about asked requests.
    pub fn observe(&self, record: &AuditRecord) {
        let payload = &record.payload;
        match record.kind {
            RecordKind::Requested => {
                let request = &payload["request"];
                self.asked
                    .get_or_create(&Asked {
                        kind: kind_label(request["target"]["kind"].as_str()).to_owned(),
                        policy: self.policy(request["policy"].as_str()),
                    })
                    .inc();
            }
            RecordKind::Decided
            | RecordKind::Expired
            | RecordKind::Cancelled
            | RecordKind::Abandoned => {
                if payload["final"].as_bool() == Some(false) {
                    return;
                }
                let kind = kind_label(payload["kind"].as_str());
                let outcome = outcome_label(payload["state"].as_str());
                self.ended
                    .get_or_create(&Ended {
                        kind: kind.to_owned(),
                        policy: self.policy(payload["policy"].as_str()),
                        outcome: outcome.to_owned(),
                    })
                    .inc();
                if let Some(wait_ms) = payload["wait_ms"].as_u64() {
                    #[expect(
                        clippy::cast_precision_loss,
                        reason = "milliseconds of a wait are far below 2^52"
                    )]
                    let seconds = wait_ms as f64 / 1000.0;
                    self.decision_seconds
                        .get_or_create(&Latency {
                            kind: kind.to_owned(),
                            outcome: outcome.to_owned(),
                        })
                        .observe(seconds);
                }
            }
            _ => {}
        }
    }

    fn policy(&self, name: Option<&str>) -> String {
        self.policies.label(name.unwrap_or("unknown"))
    }

    /// Sets the scrape-time figures and renders the exposition.
    pub fn render(&self, snapshot: Snapshot) -> String {
        if let Some(kinds) = &snapshot.paused_kinds {
            for (kind, code) in [
                ("exec", request_kind::EXEC),
                ("connect", request_kind::CONNECT),
            ] {
                let paused = kinds.iter().filter(|k| **k == code).count();
                self.paused
                    .get_or_create(&KindLabel { kind })
                    .set(i64::try_from(paused).unwrap_or(i64::MAX));
            }
        }
        for (stage, records) in [
            ("forwarder", snapshot.audit_forwarder),
            ("writer", snapshot.audit_writer),
            ("held", snapshot.audit_held),
        ] {
            self.audit_backlog
                .get_or_create(&Stage { stage })
                .set(i64::try_from(records).unwrap_or(i64::MAX));
        }
        self.audit_writable.set(i64::from(snapshot.audit_writable));
        if let Some(lag) = snapshot.shipping_lag {
            self.shipping_lag
                .set(i64::try_from(lag).unwrap_or(i64::MAX));
        }
        *self.kernel.0.lock().unwrap_or_else(PoisonError::into_inner) = snapshot.kernel_counters;
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(%error, "metrics: cannot encode");
        }
        text
    }
}

/// A final state as a bounded label value.
fn outcome_label(state: Option<&str>) -> &'static str {
    match state {
        Some("approved") => "approved",
        Some("denied") => "denied",
        Some("expired") => "expired",
        Some("cancelled") => "cancelled",
        Some("abandoned") => "abandoned",
        _ => "unknown",
    }
}

/// A request kind as a bounded label value.
fn kind_label(kind: Option<&str>) -> &'static str {
    match kind {
        Some("exec") => "exec",
        Some("connect") => "connect",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn records_become_request_figures_and_the_snapshot_gauges() {
        let metrics = AgentMetrics::new();
        let requested = json!({"request": {"policy": "deploy", "target": {"kind": "exec"}}});
        metrics.observe(&AuditRecord::new(RecordKind::Requested, "h", requested));
        let vote = json!({"policy": "deploy", "kind": "exec", "state": "pending", "final": false, "wait_ms": 5});
        metrics.observe(&AuditRecord::new(RecordKind::Decided, "h", vote));
        let approved = json!({"policy": "deploy", "kind": "exec", "state": "approved", "final": true, "wait_ms": 1500});
        metrics.observe(&AuditRecord::new(RecordKind::Decided, "h", approved));
        let mut counters = vec![0; COUNTER_NAMES.len()];
        counters[counter::EVENTS_DROPPED as usize] = 7;
        counters[counter::EXEC_DENIED as usize] = 3;
        let text = metrics.render(Snapshot {
            kernel_counters: Some(counters),
            paused_kinds: Some(vec![
                request_kind::EXEC,
                request_kind::EXEC,
                request_kind::CONNECT,
            ]),
            audit_forwarder: 2,
            audit_writer: 1,
            audit_held: 0,
            audit_writable: true,
            shipping_lag: Some(42),
        });
        for line in [
            "gatekeep_agent_audit_shipping_lag_records 42",
            "gatekeep_agent_requests_asked_total{kind=\"exec\",policy=\"deploy\"} 1",
            "gatekeep_agent_requests_ended_total{kind=\"exec\",policy=\"deploy\",outcome=\"approved\"} 1",
            "gatekeep_agent_decision_seconds_sum{kind=\"exec\",outcome=\"approved\"} 1.5",
            "gatekeep_agent_requests_paused{kind=\"exec\"} 2",
            "gatekeep_agent_requests_paused{kind=\"connect\"} 1",
            "gatekeep_agent_audit_backlog_records{stage=\"forwarder\"} 2",
            "gatekeep_agent_audit_writable 1",
            "gatekeep_agent_events_dropped_total 7",
            "gatekeep_agent_kernel_events_total{counter=\"exec_denied\"} 3",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
        assert!(
            !text.contains("outcome=\"pending\""),
            "a vote is not an ending"
        );
    }

    #[test]
    fn unreadable_kernel_counters_are_left_out_not_zero() {
        let text = AgentMetrics::new().render(Snapshot::default());
        assert!(!text.contains("events_dropped"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
