//! Storage boundary of the decision service.
//!
//! [`Store`] is everything the service logic needs from its database: requests with an
//! optimistic version (so several service replicas can share one database and never apply two
//! transitions to the same request), grants, and reviewers. [`SqliteStore`] is the default
//! backend (one process); [`PostgresStore`] serves a fleet of replicas on one database
//! (`[store] url` in the config, see [`open`]).
//!
//! The trait is dyn-compatible (the service holds an `Arc<dyn Store>`), so its methods return
//! boxed futures.

pub mod postgres;
mod sqlite;

use std::{future::Future, path::PathBuf, pin::Pin, sync::Arc};

use gatekeep_proto::{
    host_audit::{ChainPoint, Divergence, HostAuditRecord, HostHead, ShipBatch},
    model::{Grant, Kind, RequestRecord, RequestState, Revocation, Target},
};
pub use postgres::PostgresStore;
pub use sqlite::{SqliteStore, Synchronous};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::{host_audit::Refusal, reviewer::Reviewer};

/// A boxed future of a store call.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to open the service database `{}`", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("service database `{}` has schema version {found}, this build supports {supported}", path.display())]
    Schema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("service database error")]
    Sqlite {
        #[from]
        source: rusqlite::Error,
    },
    #[error("failed to encode or decode a stored record")]
    Json {
        #[from]
        source: serde_json::Error,
    },
    #[error("stored value is corrupt: {message}")]
    Corrupt { message: String },
    #[error("invalid service database settings: {message}")]
    Url { message: String },
    #[error(
        "failed to connect to the service database {target}; check that PostgreSQL runs there \
         and accepts this user (pg_hba.conf)"
    )]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "service database {target} has schema version {found}, newer than this build's \
         {supported}: a newer gatekeep-server migrated it; run that version (or restore the \
         database from before the upgrade)"
    )]
    SchemaNewer {
        target: String,
        found: i64,
        supported: i64,
    },
    #[error("service database {target} failed")]
    Postgres {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("no connection to the service database {target}")]
    Pool {
        target: String,
        #[source]
        source: deadpool_postgres::PoolError,
    },
    #[error("reviewer `{name}` already exists")]
    ReviewerExists { name: String },
    #[error("the store is closed")]
    Closed,
}

/// A stored value and its version; a [`Transition`] must name the version it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    pub version: u64,
    pub value: T,
}

/// What [`Store::insert_request`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// The request is new and now stored (version 1).
    New,
    /// A request with this id was already stored; nothing changed.
    Existing(Box<Versioned<RequestRecord>>),
}

/// A request's move to a new state (or a new vote), applied only if the stored version is
/// still `expected_version`; with it, in the same transaction, the grant the decision made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub record: RequestRecord,
    pub expected_version: u64,
    pub new_grant: Option<Grant>,
}

/// Which requests to list. Empty filters match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestQuery {
    pub state: Option<RequestState>,
    /// Only final states (any but pending).
    pub final_only: bool,
    pub host: Option<String>,
    pub policy: Option<String>,
    pub kind: Option<Kind>,
    /// Only requests with this [`subject_key`].
    pub subject: Option<String>,
    /// Leave out this request.
    pub exclude: Option<Uuid>,
    pub newest_first: bool,
    pub limit: usize,
}

/// Which grants to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantQuery {
    pub host: Option<String>,
    pub policy: Option<String>,
    /// Also revoked and expired ones.
    pub include_inactive: bool,
}

/// The request an [`Admission`] is looked up for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionQuery {
    pub id: Uuid,
    pub host: String,
    pub policy: String,
    pub target: Target,
    pub cgroup: String,
    pub now: OffsetDateTime,
}

/// What is stored that bears on a new request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Admission {
    /// The request already stored under the same id (an agent re-sending it).
    pub existing: Option<Versioned<RequestRecord>>,
    /// The standing grant that decides it.
    pub grant: Option<Grant>,
}

/// A change another replica committed (see [`Store::changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A request of the agent on `host` was stored or moved; `pending` if it still waits.
    Request {
        id: Uuid,
        host: String,
        pending: bool,
    },
    /// A grant of `host` was revoked.
    GrantRevoked { id: Uuid, host: String },
    /// Changes may have been missed (the notifications were interrupted).
    Resync,
}

/// The database: `SQLite` files in `data_dir` (default), or `PostgreSQL` shared by replicas.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://USER@HOST:PORT/DATABASE`: every replica with the same URL serves the same
    /// requests, grants, reviewers and audit chain. Unset: `SQLite` in `data_dir`.
    pub url: Option<String>,
    /// A file holding the database password (kept out of the config file and the logs).
    pub password_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign the database server's certificate, trusted beside
    /// the system's roots. TLS is required for any host but this one (see the URL's
    /// `sslmode`, `store::postgres::tls`).
    pub ca_file: Option<PathBuf>,
    /// Most database connections this replica opens for agents' requests and everything
    /// else but what `decision_pool_size` serves.
    pub pool_size: usize,
    /// Most connections kept apart for what a decision waits on: a reviewer's decision and
    /// reads of single requests (a decision made on another replica is read through them
    /// before it goes to the agent), and reviewer sign-ins by token. A burst of agents'
    /// requests queues for `pool_size`, never in front of a decision.
    pub decision_pool_size: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            password_file: None,
            ca_file: None,
            // Enough for the decision path's concurrency on a few cores; PostgreSQL's default
            // max_connections (100) leaves room for several replicas.
            pool_size: 16,
            // A decision takes one for a few milliseconds; reviewers decide far less often
            // than agents ask.
            decision_pool_size: 4,
        }
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never print it.
        f.debug_struct("StoreConfig")
            .field("url", &self.url.as_ref().map(|_| "<set>"))
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("decision_pool_size", &self.decision_pool_size)
            .finish()
    }
}

/// Opens the store `config` names: `PostgreSQL` when `url` is set, else `SQLite` at
/// `state_db`.
pub async fn open(
    config: &StoreConfig,
    state_db: PathBuf,
    synchronous: Synchronous,
) -> Result<Arc<dyn Store>, StoreError> {
    Ok(if config.url.is_some() {
        Arc::new(PostgresStore::connect(config).await?)
    } else {
        Arc::new(SqliteStore::open(state_db, synchronous)?)
    })
}

/// The storage the service logic runs on.
pub trait Store: Send + Sync + 'static {
    /// Stores a new request, or returns the one already stored under its id (unchanged).
    fn insert_request(&self, record: RequestRecord) -> StoreFuture<'_, Inserted>;
    fn get_request(&self, id: Uuid) -> StoreFuture<'_, Option<Versioned<RequestRecord>>>;
    /// Applies `transition` if nobody changed the request since it was read; `false` if the
    /// version moved on (re-read and decide again).
    fn transition(&self, transition: Transition) -> StoreFuture<'_, bool>;
    fn list_requests(&self, query: RequestQuery) -> StoreFuture<'_, Vec<RequestRecord>>;
    /// Requests whose audit records may be missing, oldest first, at most `limit`: every
    /// request stored in a final state (by [`insert_request`](Self::insert_request) or a
    /// [`transition`](Self::transition), in the same transaction) at or before `before`,
    /// until [`audit_settled`](Self::audit_settled) names it. What lets a replica killed
    /// between a decision's commit and its audit record's lose nothing: another replica, or
    /// the same one restarted, writes what is missing (see `lifecycle`'s recovery).
    fn audit_owed(
        &self,
        before: OffsetDateTime,
        limit: usize,
    ) -> StoreFuture<'_, Vec<RequestRecord>>;
    /// The audit records of these requests are durable: they are owed no more.
    fn audit_settled(&self, ids: Vec<Uuid>) -> StoreFuture<'_, ()>;
    /// Ids of requests (any state) whose text form starts with `prefix` (lowercase,
    /// hyphenated as ids are), in id order, at most `limit`.
    fn request_ids_with_prefix(&self, prefix: String, limit: usize) -> StoreFuture<'_, Vec<Uuid>>;
    /// Pending requests whose deadline is at or before `now`, earliest first.
    fn due_requests(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> StoreFuture<'_, Vec<Versioned<RequestRecord>>>;
    /// The earliest pending deadline or active grant expiry.
    fn next_wakeup(&self) -> StoreFuture<'_, Option<OffsetDateTime>>;
    fn count_pending(&self) -> StoreFuture<'_, u64>;

    fn get_grant(&self, id: Uuid) -> StoreFuture<'_, Option<Grant>>;
    /// Revokes an active grant; `None` if it is unknown or no longer active.
    fn revoke_grant(&self, id: Uuid, revocation: Revocation) -> StoreFuture<'_, Option<Grant>>;
    fn list_grants(&self, query: GrantQuery, now: OffsetDateTime) -> StoreFuture<'_, Vec<Grant>>;
    /// What deciding a new request looks up, in one call (one snapshot, one trip to the
    /// store): the request already stored under its id, and the newest active grant of its
    /// host and policy for exactly its target (a session grant only in its cgroup).
    fn admission(&self, request: AdmissionQuery) -> StoreFuture<'_, Admission>;
    /// Active grants whose expiry is at or before `now`.
    fn due_grants(&self, now: OffsetDateTime) -> StoreFuture<'_, Vec<Grant>>;
    /// Active session grants of `host` in `cgroup` or below it.
    fn session_grants(&self, host: String, cgroup: String) -> StoreFuture<'_, Vec<Grant>>;

    /// Adds a reviewer with the SHA-256 (hex) of their token.
    fn add_reviewer(&self, reviewer: Reviewer, token_sha256: String) -> StoreFuture<'_, ()>;
    fn reviewer_by_token(&self, token_sha256: String) -> StoreFuture<'_, Option<Reviewer>>;
    fn list_reviewers(&self) -> StoreFuture<'_, Vec<Reviewer>>;
    /// `false` if there was no such reviewer.
    fn remove_reviewer(&self, name: String) -> StoreFuture<'_, bool>;

    /// What other processes sharing this database change, for a store that several replicas
    /// share; `None` for one only this process uses (and after the first call).
    fn changes(&self) -> Option<mpsc::UnboundedReceiver<Change>> {
        None
    }

    /// The `PostgreSQL` store behind this one, if it is one (its audit chain lives there).
    fn postgres(&self) -> Option<&PostgresStore> {
        None
    }

    /// What a notification sink keeps about a delivery ([`crate::notify`]): e.g. the Slack
    /// message of a request in a channel, or that a webhook event was delivered. `None`
    /// when nothing was delivered under `key` yet.
    fn notice(&self, key: String) -> StoreFuture<'_, Option<String>>;
    /// Records (or replaces) what was delivered under `key`.
    fn set_notice(&self, key: String, value: String) -> StoreFuture<'_, ()>;
    /// Keeps a notification that could not be delivered (retries exhausted, or refused).
    fn dead_letter(&self, letter: DeadLetter) -> StoreFuture<'_, ()>;

    /// Checks a batch of `host`'s audit records against the chain anchored for it
    /// ([`crate::host_audit::check`]) and, in the same transaction (which holds the host's
    /// head), appends what is new and records a divergence once.
    fn ship_host_audit(
        &self,
        host: String,
        batch: ShipBatch,
        now: OffsetDateTime,
    ) -> StoreFuture<'_, Shipped>;
    /// The anchored heads of every host (or of `host`), by host name.
    fn host_audit_heads(&self, host: Option<String>) -> StoreFuture<'_, Vec<HostHead>>;
    /// The divergences recorded for every host (or for `host`), oldest first.
    fn host_audit_divergences(&self, host: Option<String>) -> StoreFuture<'_, Vec<Divergence>>;
    /// `host`'s anchored records from `from_seq` on, at most `limit`.
    fn host_audit_records(
        &self,
        host: String,
        from_seq: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<HostAuditRecord>>;
    /// The dead letters kept, oldest first, at most `limit`.
    fn dead_letters(&self, limit: usize) -> StoreFuture<'_, Vec<StoredDeadLetter>>;
    /// Removes and returns dead letter `id` (to deliver it again); `None` if there is none.
    fn take_dead_letter(&self, id: i64) -> StoreFuture<'_, Option<StoredDeadLetter>>;

    /// Takes the lease of delivery `key` for `owner` until `lease_until`: the row is inserted
    /// if absent, or taken when it is free, its lease has expired, or `owner` holds it
    /// already. One statement (insert-on-conflict), so replicas racing for it never both win.
    fn claim_delivery(
        &self,
        key: DeliveryKey,
        owner: String,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
    ) -> StoreFuture<'_, Claim>;
    /// Notes that `owner` is about to call the receiver for `key`: until it is released, the
    /// outcome of that call is unknown (the first such time is kept).
    fn delivery_attempt(
        &self,
        key: DeliveryKey,
        owner: String,
        at: OffsetDateTime,
    ) -> StoreFuture<'_, ()>;
    /// Frees the lease of `key` held by `owner` (its outcome is known: delivered or given up).
    fn release_delivery(&self, key: DeliveryKey, owner: String) -> StoreFuture<'_, ()>;
    /// Deliveries of `channel` (or of channels `channel:...`) still held under a lease that
    /// expired before `now`: their holder died or stalled, and another may take them over.
    fn expired_deliveries(
        &self,
        channel: String,
        now: OffsetDateTime,
    ) -> StoreFuture<'_, Vec<DeliveryKey>>;
}

/// One delivery of a notification: what it is about (a request or grant id), where it goes
/// (`slack:CHANNEL`, `teams`, `webhook:NAME`) and which event (`message` for a Slack message,
/// which is posted once and then updated; `requested`, `decided`, ... otherwise). Table
/// `deliveries` holds its lease, so one replica at a time delivers it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeliveryKey {
    pub subject: String,
    pub channel: String,
    pub event: String,
}

impl DeliveryKey {
    #[expect(
        clippy::needless_pass_by_value,
        reason = "ids are `Copy`: callers pass them as they are"
    )]
    pub fn new(
        subject: impl ToString,
        channel: impl Into<String>,
        event: impl Into<String>,
    ) -> Self {
        Self {
            subject: subject.to_string(),
            channel: channel.into(),
            event: event.into(),
        }
    }

    /// Reads the text form ([`Display`](std::fmt::Display)): `SUBJECT EVENT CHANNEL`.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.splitn(3, ' ');
        let (subject, event, channel) = (parts.next()?, parts.next()?, parts.next()?);
        (!subject.is_empty() && !event.is_empty() && !channel.is_empty())
            .then(|| Self::new(subject, channel, event))
    }
}

impl std::fmt::Display for DeliveryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The channel last: a webhook's name may hold spaces, ids and events do not.
        write!(f, "{} {} {}", self.subject, self.event, self.channel)
    }
}

/// What [`Store::claim_delivery`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller holds the lease now. `attempted_at`: a call to the receiver was started
    /// then (by the caller or a holder that died) and its outcome never recorded.
    Taken {
        attempted_at: Option<OffsetDateTime>,
    },
    /// Another holder's lease is live: it delivers.
    Held,
}

/// A kept dead letter and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDeadLetter {
    pub id: i64,
    pub letter: DeadLetter,
}

/// What [`Store::ship_host_audit`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Shipped {
    /// The host's anchored head afterwards; `None` while nothing is anchored.
    pub head: Option<ChainPoint>,
    pub appended: usize,
    /// Where the host's log departs from the anchored chain, if it does.
    pub divergence: Option<Divergence>,
    /// Whether this batch found the divergence first (the others re-report it).
    pub new_divergence: bool,
    /// Why nothing was done with the batch, if refused.
    pub refused: Option<Refusal>,
}

/// A notification given up on, kept for an operator (table `dead_letters`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The sink: `slack`, `teams` or `webhook:NAME`.
    pub sink: String,
    /// What it was about: the [`DeliveryKey`]'s text form (`SUBJECT EVENT CHANNEL`).
    pub key: String,
    /// The last failure.
    pub error: String,
    pub attempts: u32,
    pub at: OffsetDateTime,
}

/// What similar requests share: the executable, or the destination (address and port).
#[must_use]
pub fn subject_key(target: &Target) -> String {
    match target {
        Target::Exec(exec) => format!("exec:{}", exec.executable),
        Target::Connect(connect) => format!(
            "connect:{}:{}:{}",
            connect.family.as_str(),
            connect.address,
            connect.port
        ),
    }
}

/// What a grant matches exactly: the whole target (executable and argv, or destination with
/// family and socket type), as canonical JSON.
pub fn target_key(target: &Target) -> Result<String, StoreError> {
    Ok(serde_json::to_string(target)?)
}

/// Milliseconds since the epoch, as stored.
pub(crate) fn ms(at: OffsetDateTime) -> i64 {
    gatekeep_proto::convert::to_ms(at)
}

#[cfg(test)]
mod tests {
    use gatekeep_proto::model::{ConnectTarget, ExecTarget, Family, SocketType};

    use super::*;

    #[test]
    fn keys_separate_what_they_should() {
        let exec = |argv: &[&str]| {
            Target::Exec(ExecTarget {
                executable: "/usr/bin/git".into(),
                argv: argv.iter().map(|s| (*s).to_owned()).collect(),
                content: None,
                path_check: None,
                named: None,
                file: None,
                mount_namespace: None,
                argv_truncated: false,
                env: Vec::new(),
            })
        };
        assert_eq!(subject_key(&exec(&["git", "push"])), "exec:/usr/bin/git");
        assert_eq!(
            subject_key(&exec(&["git", "push"])),
            subject_key(&exec(&["git", "pull"]))
        );
        assert_ne!(
            target_key(&exec(&["git", "push"])).unwrap(),
            target_key(&exec(&["git", "pull"])).unwrap()
        );
        // The bound environment is part of what a grant matches.
        let mut preloaded = exec(&["git", "push"]);
        if let Target::Exec(target) = &mut preloaded {
            target.env = vec!["LD_PRELOAD=/tmp/evil.so".into()];
        }
        assert_ne!(
            target_key(&preloaded).unwrap(),
            target_key(&exec(&["git", "push"])).unwrap()
        );
        let connect = Target::Connect(ConnectTarget {
            family: Family::Inet,
            address: "10.0.0.1".into(),
            port: 443,
            socket_type: SocketType::Stream,
            resolved: Vec::new(),
        });
        assert_eq!(subject_key(&connect), "connect:inet:10.0.0.1:443");
    }
}
