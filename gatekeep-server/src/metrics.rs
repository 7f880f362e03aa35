//! The service's Prometheus metrics: one [`Metrics`] owns the registry and every family, so
//! adding a metric is one field and one `register` line in [`Metrics::new`].
//!
//! Served on a listener of its own (`[metrics] listen`), plain HTTP, off unless configured:
//! the figures name policies and hosts' activity, so exposing them is a deliberate choice.
//!
//! Label values stay bounded: kinds, outcomes, channels and store operations are fixed
//! sets; policy names are admin-controlled but arrive from agents, so [`Bounded`] keeps at
//! most [`MAX_POLICY_LABELS`] of them and folds the rest into `_other`. Nothing a workload
//! controls (argv, paths, addresses) is ever a label.
//!
//! The agent (`gatekeep-agent`) reuses [`Bounded`], [`serve`] and [`CONTENT_TYPE`].

use std::{
    collections::HashSet,
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use gatekeep_proto::{
    host_audit::{Divergence, HostAuditRecord, HostHead, ShipBatch},
    model::{Decision, Grant, Kind, RequestRecord, RequestState, Revocation},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::{
    auth::Reviewer,
    store::{
        Admission, AdmissionQuery, Change, Claim, DeadLetter, DeliveryKey, GrantQuery, Inserted,
        PostgresStore, RequestQuery, Shipped, Store, StoreFuture, StoredDeadLetter, Transition,
        Versioned,
    },
};

/// Distinct policy names kept as label values; later ones count as `_other`.
pub const MAX_POLICY_LABELS: usize = 256;

/// The exposition's content type (prometheus-client writes `OpenMetrics` text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `[metrics]` of a config file: where `/metrics` is served, if anywhere.
///
/// ```toml
/// [metrics]
/// listen = "127.0.0.1:9464"   # off when absent; a non-loopback address exposes the figures
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Plain-HTTP listener of `GET /metrics`; `None` serves nothing.
    pub listen: Option<SocketAddr>,
}

/// A label whose values come from outside a fixed set: the first `limit` distinct values
/// are kept, the rest become `_other`, so a flood of names cannot grow the series without
/// bound.
#[derive(Debug)]
pub struct Bounded {
    seen: Mutex<HashSet<String>>,
    limit: usize,
}

impl Bounded {
    /// Keeps up to `limit` distinct values.
    #[must_use]
    pub fn new(limit: usize) -> Self {
        Self {
            seen: Mutex::new(HashSet::new()),
            limit,
        }
    }

    /// The label value for `value`.
    pub fn label(&self, value: &str) -> String {
        let Ok(mut seen) = self.seen.lock() else {
            return "_other".to_owned();
        };
        if seen.contains(value) {
            return value.to_owned();
        }
        if seen.len() < self.limit {
            seen.insert(value.to_owned());
            return value.to_owned();
        }
        "_other".to_owned()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Received {
    kind: &'static str,
    policy: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Decided {
    kind: &'static str,
    policy: String,
    /// `approved`, `denied`, `expired`, `cancelled`, `abandoned`.
    outcome: &'static str,
    /// Who settled it: `reviewer`, `rule`, `grant`, `timeout`, `agent`.
    via: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Latency {
    kind: &'static str,
    via: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Refused {
    policy: String,
    cause: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Operation {
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Delivery {
    /// `slack`, `teams` or `webhook`.
    channel: &'static str,
    /// `retry` (the attempt failed, another follows) or `dead_letter` (given up).
    result: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// From a millisecond to about six hours, x4 per bucket: decisions by rule take
/// milliseconds, reviewers take minutes, timeouts hours.
fn decision_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

/// From 50 µs to about 3 s, x3 per bucket: a store call is a `SQLite` commit or a
/// `PostgreSQL` round trip.
fn store_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 3.0, 11))
}

/// The service's metrics.
pub struct Metrics {
    registry: Registry,
    policies: Bounded,
    received: Family<Received, Counter>,
    decided: Family<Decided, Counter>,
    pending: Gauge,
    decision_seconds: Histograms<Latency>,
    refused: Family<Refused, Counter>,
    store_seconds: Histograms<Operation>,
    store_errors: Family<Operation, Counter>,
    notification_failures: Family<Delivery, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family, registered.
    #[must_use]
    pub fn new() -> Self {
        let metrics = Self {
            registry: Registry::default(),
            policies: Bounded::new(MAX_POLICY_LABELS),
            received: Family::default(),
            decided: Family::default(),
            pending: Gauge::default(),
            decision_seconds: Family::new_with_constructor(decision_buckets),
            refused: Family::default(),
            store_seconds: Family::new_with_constructor(store_buckets),
            store_errors: Family::default(),
            notification_failures: Family::default(),
        };
        let mut registry = Registry::default();
        let r = &mut registry;
        r.register(
            "gatekeep_requests_received",
            "Requests stored by this replica, by kind and policy",
            metrics.received.clone(),
        );
        r.register(
            "gatekeep_requests_decided",
            "Requests that left pending on this replica, by kind, policy, outcome and who settled them",
            metrics.decided.clone(),
        );
        r.register(
            "gatekeep_requests_pending",
            "Requests waiting for a decision in the store (the whole fleet's, read at scrape)",
            metrics.pending.clone(),
        );
        r.register(
            "gatekeep_decision_seconds",
            "Time from a request's arrival to its final decision",
            metrics.decision_seconds.clone(),
        );
        r.register(
            "gatekeep_approvals_refused",
            "Approvals refused because the reviewer owns the workload (self-approval)",
            metrics.refused.clone(),
        );
        r.register(
            "gatekeep_store_seconds",
            "Duration of store calls, by operation",
            metrics.store_seconds.clone(),
        );
        r.register(
            "gatekeep_store_errors",
            "Store calls that failed, by operation",
            metrics.store_errors.clone(),
        );
        r.register(
            "gatekeep_notification_failures",
            "Failed notification deliveries, by channel; result `dead_letter` means given up",
            metrics.notification_failures.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// A request was stored.
    pub fn request_received(&self, kind: Kind, policy: &str) {
        self.received
            .get_or_create(&Received {
                kind: kind.as_str(),
                policy: self.policies.label(policy),
            })
            .inc();
    }

    /// A request left pending with `decision`, `waited` seconds after it arrived.
    pub fn request_decided(&self, kind: Kind, policy: &str, decision: &Decision, waited: f64) {
        let via = via(&decision.decided_by);
        self.decided
            .get_or_create(&Decided {
                kind: kind.as_str(),
                policy: self.policies.label(policy),
                outcome: outcome(decision.state),
                via,
            })
            .inc();
        self.decision_seconds
            .get_or_create(&Latency {
                kind: kind.as_str(),
                via,
            })
            .observe(waited.max(0.0));
    }

    /// A self-approval was refused.
    pub fn approval_refused(&self, policy: &str) {
        self.refused
            .get_or_create(&Refused {
                policy: self.policies.label(policy),
                cause: "self_approval",
            })
            .inc();
    }

    /// A notification attempt of `sink` failed; `gave_up` when it became a dead letter.
    pub fn notification_failed(&self, sink: &str, gave_up: bool) {
        // Webhooks are named by the admin; their channel is `webhook` whatever the name.
        let channel = match sink {
            "slack" => "slack",
            "teams" => "teams",
            _ => "webhook",
        };
        self.notification_failures
            .get_or_create(&Delivery {
                channel,
                result: if gave_up { "dead_letter" } else { "retry" },
            })
            .inc();
    }

    /// Renders the exposition, after reading the pending count from `store`.
    pub async fn render(&self, store: &dyn Store) -> String {
        match store.count_pending().await {
            Ok(pending) => {
                self.pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
            }
            Err(error) => tracing::warn!(%error, "metrics: cannot count pending requests"),
        }
        self.encode()
    }

    /// The exposition as it stands.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(%error, "metrics: cannot encode");
        }
        text
    }

    fn store_call(&self, op: &'static str, seconds: f64, failed: bool) {
        self.store_seconds
            .get_or_create(&Operation { op })
            .observe(seconds);
        if failed {
            self.store_errors.get_or_create(&Operation { op }).inc();
        }
    }
}

fn outcome(state: RequestState) -> &'static str {
    match state {
        RequestState::Pending => "pending",
        RequestState::Approved => "approved",
        RequestState::Denied => "denied",
        RequestState::Expired => "expired",
        RequestState::Cancelled => "cancelled",
        RequestState::Abandoned => "abandoned",
    }
}

/// Who settled a request, from its `decided_by` (see `lifecycle`): a bounded label.
fn via(decided_by: &str) -> &'static str {
    if decided_by == "timeout" {
        "timeout"
    } else if decided_by.starts_with("rule:") {
        "rule"
    } else if decided_by.starts_with("grant:") {
        "grant"
    } else if decided_by.starts_with("agent:") {
        "agent"
    } else {
        "reviewer"
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes; `render` makes each
/// scrape's text.
pub async fn serve<R, F>(
    listener: tokio::net::TcpListener,
    render: R,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    R: Fn() -> F + Clone + Send + Sync + 'static,
    F: Future<Output = String> + Send + 'static,
{
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                    render().await,
                )
            }
        }),
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the metrics listener of `config`, warning when it is reachable from other hosts.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, crate::Error> {
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "metrics are served on a non-loopback address without authentication; \
             restrict it with a firewall or bind 127.0.0.1"
        );
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::Bind {
            addr: format!("{addr} ([metrics] listen)"),
            source,
        })
}

/// A [`Store`] that times every call into [`Metrics`].
pub(crate) struct TimedStore {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl TimedStore {
    pub(crate) fn wrap(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Arc<dyn Store> {
        Arc::new(Self { inner, metrics })
    }

    fn time<'a, T: 'a>(&'a self, op: &'static str, call: StoreFuture<'a, T>) -> StoreFuture<'a, T> {
        Box::pin(async move {
            let start = Instant::now();
            let result = call.await;
            self.metrics
                .store_call(op, start.elapsed().as_secs_f64(), result.is_err());
            result
        })
    }
}

/// Delegates each listed method to the inner store, timed under its own name.
macro_rules! timed {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $out:ty;)*) => {
        $(fn $name(&self, $($arg: $ty),*) -> StoreFuture<'_, $out> {
            self.time(stringify!($name), self.inner.$name($($arg),*))
        })*
    };
}

impl Store for TimedStore {
    timed! {
        insert_request(record: RequestRecord) -> Inserted;
        get_request(id: Uuid) -> Option<Versioned<RequestRecord>>;
        transition(transition: Transition) -> bool;
        list_requests(query: RequestQuery) -> Vec<RequestRecord>;
        audit_owed(before: OffsetDateTime, limit: usize) -> Vec<RequestRecord>;
        audit_settled(ids: Vec<Uuid>) -> ();
        request_ids_with_prefix(prefix: String, limit: usize) -> Vec<Uuid>;
        due_requests(now: OffsetDateTime, limit: usize) -> Vec<Versioned<RequestRecord>>;
        next_wakeup() -> Option<OffsetDateTime>;
        count_pending() -> u64;
        get_grant(id: Uuid) -> Option<Grant>;
        revoke_grant(id: Uuid, revocation: Revocation) -> Option<Grant>;
        list_grants(query: GrantQuery, now: OffsetDateTime) -> Vec<Grant>;
        admission(request: AdmissionQuery) -> Admission;
        due_grants(now: OffsetDateTime) -> Vec<Grant>;
        session_grants(host: String, cgroup: String) -> Vec<Grant>;
        add_reviewer(reviewer: Reviewer, token_sha256: String) -> ();
        reviewer_by_token(token_sha256: String) -> Option<Reviewer>;
        list_reviewers() -> Vec<Reviewer>;
        remove_reviewer(name: String) -> bool;
        notice(key: String) -> Option<String>;
        set_notice(key: String, value: String) -> ();
        dead_letter(letter: DeadLetter) -> ();
        dead_letters(limit: usize) -> Vec<StoredDeadLetter>;
        take_dead_letter(id: i64) -> Option<StoredDeadLetter>;
        claim_delivery(
            key: DeliveryKey,
            owner: String,
            now: OffsetDateTime,
            lease_until: OffsetDateTime
        ) -> Claim;
        delivery_attempt(key: DeliveryKey, owner: String, at: OffsetDateTime) -> ();
        release_delivery(key: DeliveryKey, owner: String) -> ();
        expired_deliveries(channel: String, now: OffsetDateTime) -> Vec<DeliveryKey>;
        ship_host_audit(host: String, batch: ShipBatch, now: OffsetDateTime) -> Shipped;
        host_audit_heads(host: Option<String>) -> Vec<HostHead>;
        host_audit_divergences(host: Option<String>) -> Vec<Divergence>;
        host_audit_records(host: String, from_seq: u64, limit: usize) -> Vec<HostAuditRecord>;
    }

    fn changes(&self) -> Option<mpsc::UnboundedReceiver<Change>> {
        self.inner.changes()
    }

    fn postgres(&self) -> Option<&PostgresStore> {
        self.inner.postgres()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bounded_label_keeps_its_first_values_and_folds_the_rest() {
        let bounded = Bounded::new(2);
        assert_eq!(bounded.label("a"), "a");
        assert_eq!(bounded.label("b"), "b");
        assert_eq!(bounded.label("c"), "_other");
        assert_eq!(bounded.label("a"), "a");
    }

    #[test]
    fn who_settled_a_request_is_one_of_five_values() {
        assert_eq!(via("timeout"), "timeout");
        assert_eq!(via("rule:ci"), "rule");
        assert_eq!(via("grant:0000"), "grant");
        assert_eq!(via("agent:h1"), "agent");
        assert_eq!(via("alice,bob"), "reviewer");
    }

    #[test]
    fn the_exposition_names_every_family() {
        let metrics = Metrics::new();
        metrics.request_received(Kind::Exec, "deploy");
        metrics.notification_failed("ops-hook", true);
        let text = metrics.encode();
        assert!(
            text.contains("gatekeep_requests_received_total{kind=\"exec\",policy=\"deploy\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "gatekeep_notification_failures_total{channel=\"webhook\",result=\"dead_letter\"} 1"
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
