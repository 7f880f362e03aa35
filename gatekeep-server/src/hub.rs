//! Fan-out: the live stream of each connected agent, and the watchers of the review API.
//!
//! One process holds the streams it serves. With several replicas on one database, a
//! decision made on another replica reaches this hub through the database's notifications
//! ([`fanout`](crate::fanout)), and at the latest when the agent re-sends its pending
//! requests.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use gatekeep_proto::{
    model::{Grant, RequestRecord},
    v1,
};
use tokio::sync::{
    broadcast::{
        self,
        error::{RecvError, TryRecvError},
    },
    mpsc,
};
use tonic::Status;

/// What an agent's outbound stream carries.
pub(crate) type AgentSender = mpsc::UnboundedSender<Result<v1::ServerMessage, Status>>;

/// How many changes a watcher may fall behind before its watch ends. The batching task
/// ([`gather`]) reads a window's changes at its end, so this holds a [`BATCH_WINDOW`] of
/// them: 8,192 is about seven times what a busy service makes in one (automatic decisions
/// at 2,700/s, each one change).
const WATCH_BUFFER: usize = 8192;
/// The shortest time between two batches (see [`gather`]), so the longest a change waits
/// for others to share its batch (and a console's event). A new request must show in the
/// consoles within 1 s (issue 21); each batch costs every console a wake-up and a write, so
/// the longer the window, the less 100 consoles cost per decision.
pub(crate) const BATCH_WINDOW: Duration = Duration::from_millis(400);
/// Most changes in one batch (a burst of them costs each console a wake-up per batch).
pub(crate) const BATCH_MAX: usize = 1024;
/// How many batches a watcher may fall behind (each up to `BATCH_MAX` changes).
const BATCH_BUFFER: usize = 256;

/// Changes made within [`BATCH_WINDOW`] of each other: the latest state of each request
/// that changed, in the order of those latest changes.
#[derive(Debug)]
pub(crate) enum Batch {
    Changes(Vec<Arc<RequestRecord>>),
    /// The batcher itself fell behind the changes by this many: watchers must watch again.
    Lagged(u64),
}

struct Slot {
    connection: u64,
    sender: AgentSender,
}

pub(crate) struct Hub {
    agents: Mutex<HashMap<String, Slot>>,
    next_connection: AtomicU64,
    /// Shared, not cloned per watcher (a watcher that serialises it may share that too).
    changes: broadcast::Sender<Arc<RequestRecord>>,
    /// Revoked grants, for notifications (a request's own changes carry the grants made).
    revoked: broadcast::Sender<Arc<Grant>>,
    /// The changes again, gathered into batches by one task for the consoles' live queues:
    /// with 100 consoles open, a decision then wakes each console's connection once per
    /// batch instead of twice per change (its own watch task, then its connection).
    batches: broadcast::Sender<Arc<Batch>>,
    /// Set once the batching task runs (started by the first batch watcher).
    batcher: OnceLock<()>,
}

impl Hub {
    pub(crate) fn new() -> Self {
        Self {
            agents: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
            changes: broadcast::channel(WATCH_BUFFER).0,
            revoked: broadcast::channel(WATCH_BUFFER).0,
            batches: broadcast::channel(BATCH_BUFFER).0,
            batcher: OnceLock::new(),
        }
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.agents.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `sender` the stream of `host`; an older stream of the same host is ended (the
    /// newest connection of an agent wins). Returns the connection's number.
    pub(crate) fn register(&self, host: &str, sender: AgentSender) -> u64 {
        let connection = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let old = self
            .agents()
            .insert(host.to_owned(), Slot { connection, sender });
        if let Some(old) = old {
            drop(old.sender.send(Err(Status::aborted(
                "replaced by a newer connection of the same agent",
            ))));
        }
        connection
    }

    /// Forgets `host`'s stream if it is still `connection`.
    pub(crate) fn unregister(&self, host: &str, connection: u64) {
        let mut agents = self.agents();
        if agents
            .get(host)
            .is_some_and(|slot| slot.connection == connection)
        {
            agents.remove(host);
        }
    }

    /// Sends to `host`'s stream; `false` if it is not connected.
    pub(crate) fn send(&self, host: &str, message: v1::server_message::Message) -> bool {
        let agents = self.agents();
        agents.get(host).is_some_and(|slot| {
            slot.sender
                .send(Ok(v1::ServerMessage {
                    message: Some(message),
                }))
                .is_ok()
        })
    }

    /// Whether `host` has a live stream here.
    pub(crate) fn is_connected(&self, host: &str) -> bool {
        self.agents().contains_key(host)
    }

    /// Whether anyone watches the changes.
    pub(crate) fn watched(&self) -> bool {
        self.changes.receiver_count() > 0
    }

    /// Hosts with a live stream, sorted.
    pub(crate) fn connected(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self.agents().keys().cloned().collect();
        hosts.sort();
        hosts
    }

    /// Ends every agent stream (shutdown).
    pub(crate) fn close_all(&self) {
        for (_, slot) in self.agents().drain() {
            drop(slot.sender.send(Err(Status::unavailable(
                "the decision service is shutting down; reconnect later",
            ))));
        }
    }

    /// Tells watchers about a new or changed request.
    pub(crate) fn publish(&self, record: &RequestRecord) {
        // No watcher is not an error (and needs no copy of the record).
        if self.changes.receiver_count() > 0 {
            drop(self.changes.send(Arc::new(record.clone())));
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<RequestRecord>> {
        self.changes.subscribe()
    }

    /// The changes in batches (see [`Hub::batches`]); starts the batching task on first use,
    /// so it must be called inside the runtime.
    pub(crate) fn subscribe_batches(&self) -> broadcast::Receiver<Arc<Batch>> {
        self.batcher.get_or_init(|| {
            tokio::spawn(gather(self.changes.subscribe(), self.batches.clone()));
        });
        self.batches.subscribe()
    }

    /// Tells notification feeds about a revoked grant.
    pub(crate) fn publish_revoked(&self, grant: &Grant) {
        if self.revoked.receiver_count() > 0 {
            drop(self.revoked.send(Arc::new(grant.clone())));
        }
    }

    /// Whether a notification feed follows revocations.
    pub(crate) fn revocations_watched(&self) -> bool {
        self.revoked.receiver_count() > 0
    }

    pub(crate) fn subscribe_revoked(&self) -> broadcast::Receiver<Arc<Grant>> {
        self.revoked.subscribe()
    }
}

/// The batching task: at most one batch per [`BATCH_WINDOW`] (of at most [`BATCH_MAX`]
/// changes). A change after a quiet window goes out at once with whatever is already queued
/// (a new request shows without waiting); one within a window of the last batch waits for
/// that window's end and takes along what arrived meanwhile, read from the channel then:
/// one wake-up per batch, not one per change. A full batch is followed at once by the
/// next. Ends with the hub.
async fn gather(
    mut changes: broadcast::Receiver<Arc<RequestRecord>>,
    batches: broadcast::Sender<Arc<Batch>>,
) {
    // When the next batch may go out (`None`: at once).
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let first = match changes.recv().await {
            Ok(record) => record,
            Err(RecvError::Lagged(missed)) => {
                drop(batches.send(Arc::new(Batch::Lagged(missed))));
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        if let Some(due) = due.filter(|due| *due > tokio::time::Instant::now()) {
            // The changes meanwhile wait in the channel (up to WATCH_BUFFER of them).
            tokio::time::sleep_until(due).await;
        }
        let mut batch = vec![first];
        let mut lagged = None;
        while batch.len() < BATCH_MAX {
            match changes.try_recv() {
                Ok(record) => batch.push(record),
                Err(TryRecvError::Lagged(missed)) => {
                    lagged = Some(missed);
                    break;
                }
                // Closed: the next recv says so.
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        let full = batch.len() == BATCH_MAX;
        // No watcher is not an error.
        drop(batches.send(Arc::new(Batch::Changes(latest(batch)))));
        due = (!full).then(|| tokio::time::Instant::now() + BATCH_WINDOW);
        if let Some(missed) = lagged {
            drop(batches.send(Arc::new(Batch::Lagged(missed))));
        }
    }
}

/// Only the latest change of each request, in the order of those changes: a watcher keeps
/// a request's latest state, so the earlier ones of one batch would be sent for nothing.
fn latest(mut batch: Vec<Arc<RequestRecord>>) -> Vec<Arc<RequestRecord>> {
    if batch.len() > 1 {
        let mut seen = std::collections::HashSet::with_capacity(batch.len());
        batch.reverse();
        batch.retain(|record| seen.insert(record.request.id));
        batch.reverse();
    }
    batch
}

#[cfg(test)]
mod tests {
    use gatekeep_proto::model::RequestState;

    use super::*;

    fn record(state: RequestState) -> RequestRecord {
        let mut record: RequestRecord = serde_json::from_value(serde_json::json!({
            "request": {
                "id": uuid::Uuid::new_v4(), "policy": "p", "rule": "r", "cgroup": "/c",
                "pid": 1, "tid": 1, "uid": 0, "user_name": null, "cwd": null, "ancestry": [],
                "target": {"kind": "connect", "family": "inet", "socket_type": "stream",
                           "address": "10.0.0.1", "port": 443, "resolved": []},
                "requested_at": "2026-12-04T10:00:00Z", "deadline": "2026-12-04T10:05:00Z",
                "on_timeout": "deny",
                "approval": {"reviewer_groups": [], "approvals_required": 1,
                             "grant_durations": ["once"], "owners": []}
            },
            "host": "h", "state": "pending", "received_at": "2026-12-04T10:00:00Z",
            "deadline": "2026-12-04T10:05:00Z", "approvals": [], "approvals_required": 1,
            "decision": null
        }))
        .expect("a record");
        record.state = state;
        record
    }

    #[tokio::test]
    async fn changes_arrive_in_batches_in_order() {
        let hub = Hub::new();
        let mut batches = hub.subscribe_batches();
        let sent: Vec<RequestRecord> = [
            RequestState::Pending,
            RequestState::Approved,
            RequestState::Denied,
        ]
        .into_iter()
        .map(record)
        .collect();
        for record in &sent {
            hub.publish(record);
        }
        let mut seen = Vec::new();
        while seen.len() < sent.len() {
            let Batch::Changes(batch) = &*batches.recv().await.expect("a batch") else {
                panic!("changes expected");
            };
            assert!(!batch.is_empty(), "no empty batch is sent");
            seen.extend(batch.iter().map(|r| (r.request.id, r.state)));
        }
        let expected: Vec<_> = sent.iter().map(|r| (r.request.id, r.state)).collect();
        assert_eq!(seen, expected, "every change, in the order made");
        // A change after a batch went out is in the next one.
        let later = record(RequestState::Expired);
        hub.publish(&later);
        let Batch::Changes(batch) = &*batches.recv().await.expect("a batch") else {
            panic!("changes expected");
        };
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].request.id, later.request.id);
    }

    #[tokio::test]
    async fn a_batch_carries_each_requests_latest_state_once() {
        let hub = Hub::new();
        let mut batches = hub.subscribe_batches();
        let first = record(RequestState::Pending);
        let second = record(RequestState::Pending);
        let mut first_approved = first.clone();
        first_approved.state = RequestState::Approved;
        // Within one window: first pending, second pending, first approved.
        for record in [&first, &second, &first_approved] {
            hub.publish(record);
        }
        let Batch::Changes(batch) = &*batches.recv().await.expect("a batch") else {
            panic!("changes expected");
        };
        let seen: Vec<_> = batch.iter().map(|r| (r.request.id, r.state)).collect();
        assert_eq!(
            seen,
            [
                (second.request.id, RequestState::Pending),
                (first.request.id, RequestState::Approved),
            ],
            "the first request once, in its latest state, after the second"
        );
    }
}
