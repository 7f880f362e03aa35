//! Fan-out: the live stream of each connected agent, and the watchers of the review API.
//!
//! One process holds the streams it serves. With several replicas on one database, a
//! decision made on another replica reaches this hub through the database's notifications
//! ([`fanout`](crate::fanout)), and at the latest when the agent re-sends its pending
//! requests.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use gatekeep_proto::{model::RequestRecord, v1};
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

/// What an agent's outbound stream carries.
pub(crate) type AgentSender = mpsc::UnboundedSender<Result<v1::ServerMessage, Status>>;

/// How many changes a watcher may fall behind before its watch ends.
const WATCH_BUFFER: usize = 4096;

struct Slot {
    connection: u64,
    sender: AgentSender,
}

pub(crate) struct Hub {
    agents: Mutex<HashMap<String, Slot>>,
    next_connection: AtomicU64,
    /// Shared, not cloned per watcher (a watcher that serialises it may share that too).
    changes: broadcast::Sender<Arc<RequestRecord>>,
}

impl Hub {
    pub(crate) fn new() -> Self {
        Self {
            agents: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
            changes: broadcast::channel(WATCH_BUFFER).0,
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
}
