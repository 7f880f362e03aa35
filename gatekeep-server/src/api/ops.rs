//! Review operations shared by the gRPC service ([`super::ReviewApi`]) and the HTTP/JSON API
//! ([`super::http`]): each validates its input, calls the [`Engine`] or the store and returns
//! domain types, so the two front ends differ only in how they encode messages.

use std::sync::Arc;

use gatekeep_proto::{
    WireError, convert,
    model::{Grant, Kind, RequestRecord, RequestState},
};
use serde::Serialize;
use tokio::sync::{broadcast::error::RecvError, mpsc};

use crate::{
    audit_log::AuditLog,
    auth::Reviewer,
    error::Error,
    lifecycle::Engine,
    store::{GrantQuery, PostgresStore, RequestQuery, postgres},
};

/// Most requests one list returns.
pub const MAX_LIST: u32 = 1000;
/// Bytes of JSON Lines per export chunk.
const EXPORT_CHUNK: usize = 64 * 1024;

/// A validated request filter (host, policy, kind; each optional).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub host: Option<String>,
    pub policy: Option<String>,
    pub kind: Option<Kind>,
}

impl Filter {
    /// Validates a filter; empty strings mean "any".
    pub fn new(host: &str, policy: &str, kind: Option<Kind>) -> Result<Self, WireError> {
        Ok(Self {
            host: opt_name("filter.host", host)?,
            policy: opt_name("filter.policy", policy)?,
            kind,
        })
    }

    /// Whether `record` passes the filter.
    #[must_use]
    pub fn matches(&self, record: &RequestRecord) -> bool {
        self.host.as_ref().is_none_or(|host| *host == record.host)
            && self
                .policy
                .as_ref()
                .is_none_or(|policy| *policy == record.request.policy)
            && self.kind.is_none_or(|kind| kind == record.request.kind())
    }

    fn query(&self, limit: u32) -> RequestQuery {
        RequestQuery {
            state: Some(RequestState::Pending),
            host: self.host.clone(),
            policy: self.policy.clone(),
            kind: self.kind,
            limit: limit as usize,
            ..RequestQuery::default()
        }
    }
}

/// A validated optional name: empty is `None`.
pub fn opt_name(field: &str, value: &str) -> Result<Option<String>, WireError> {
    if value.is_empty() {
        Ok(None)
    } else {
        convert::name(field, value).map(Some)
    }
}

/// The pending requests passing `filter`, oldest first; `limit` 0 is [`MAX_LIST`].
pub async fn list_pending(
    engine: &Engine,
    filter: &Filter,
    limit: u32,
) -> Result<Vec<RequestRecord>, Error> {
    if limit > MAX_LIST {
        return Err(Error::BadArgument {
            message: format!("limit {limit} is more than {MAX_LIST}"),
        });
    }
    let limit = if limit == 0 { MAX_LIST } else { limit };
    Ok(engine.store.list_requests(filter.query(limit)).await?)
}

/// One item of a watch.
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// A request: pending when the watch began (`initial`), or one that changed since.
    Request {
        initial: bool,
        record: Arc<RequestRecord>,
    },
    /// Every request pending when the watch began has been sent; changes follow.
    Ready,
    /// The watcher fell behind the changes and must watch again.
    Lagged { missed: u64 },
    /// The service is stopping.
    ShuttingDown,
    /// The watch's deadline passed (a console session expired).
    Expired,
}

/// Starts a watch: first every pending request passing `filter`, then every change of one,
/// until the receiver is dropped, the service stops or `until` passes. The last item of an
/// ended watch says why.
pub async fn watch(
    engine: &Arc<Engine>,
    filter: Filter,
    until: Option<tokio::time::Instant>,
) -> Result<mpsc::Receiver<WatchItem>, Error> {
    // Subscribe before listing, so nothing falls between the two.
    let mut changes = engine.hub.subscribe();
    let initial = engine.store.list_requests(filter.query(MAX_LIST)).await?;
    let (sender, receiver) = mpsc::channel(256);
    let shutdown = engine.shutdown.clone();
    tokio::spawn(async move {
        let deadline = async {
            match until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        for record in initial {
            let item = WatchItem::Request {
                initial: true,
                record: Arc::new(record),
            };
            if sender.send(item).await.is_err() {
                return;
            }
        }
        if sender.send(WatchItem::Ready).await.is_err() {
            return;
        }
        loop {
            let change = tokio::select! {
                change = changes.recv() => change,
                () = sender.closed() => return,
                () = shutdown.cancelled() => {
                    drop(sender.send(WatchItem::ShuttingDown).await);
                    return;
                }
                () = &mut deadline => {
                    drop(sender.send(WatchItem::Expired).await);
                    return;
                }
            };
            match change {
                Ok(record) if filter.matches(&record) => {
                    let item = WatchItem::Request {
                        initial: false,
                        record,
                    };
                    if sender.send(item).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    drop(sender.send(WatchItem::Lagged { missed }).await);
                    return;
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    Ok(receiver)
}

/// One group of a [`watch_batched`].
#[derive(Debug)]
pub(crate) enum WatchGroup {
    /// Items of this watcher's own: the snapshot, the part of a batch its filter passes,
    /// or why the watch ended.
    Items(Vec<WatchItem>),
    /// A whole batch of the hub's changes, every one of which passes this watcher's
    /// filter: the same value reaches every watcher it passes, so they can share its
    /// encoding.
    Batch(Arc<crate::hub::Batch>),
}

/// A watch for many watchers (the consoles' live queues): like [`watch`], but a stream of
/// groups read by the watcher's own connection, with no task of its own. The first group is
/// the pending requests (`initial`, at most `MAX_LIST`) ending with `Ready`; then one group
/// per batch of the hub's (the latest state of each request changed within
/// [`crate::hub::BATCH_WINDOW`]) that holds a change passing `filter`, so a change costs
/// each watcher a share of one wake-up. The last group of an ended watch says why.
pub(crate) async fn watch_batched(
    engine: &Arc<Engine>,
    filter: Filter,
    until: Option<tokio::time::Instant>,
) -> Result<impl futures_util::Stream<Item = WatchGroup> + Send + use<>, Error> {
    // Subscribe before listing, so nothing falls between the two.
    let batches = engine.hub.subscribe_batches();
    let initial = engine.store.list_requests(filter.query(MAX_LIST)).await?;
    let mut first: Vec<WatchItem> = initial
        .into_iter()
        .map(|record| WatchItem::Request {
            initial: true,
            record: Arc::new(record),
        })
        .collect();
    first.push(WatchItem::Ready);
    let deadline = Box::pin(async move {
        match until {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    });
    let state = BatchedWatch {
        batches,
        filter,
        shutdown: engine.shutdown.clone(),
        deadline,
        ended: false,
    };
    let changes = futures_util::stream::unfold(state, |mut watch| async move {
        if watch.ended {
            return None;
        }
        let group = watch.next_group().await?;
        Some((group, watch))
    });
    Ok(futures_util::StreamExt::chain(
        futures_util::stream::iter([WatchGroup::Items(first)]),
        changes,
    ))
}

/// The state of one [`watch_batched`] after its initial groups.
struct BatchedWatch {
    batches: tokio::sync::broadcast::Receiver<Arc<crate::hub::Batch>>,
    filter: Filter,
    shutdown: tokio_util::sync::CancellationToken,
    deadline: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    ended: bool,
}

impl BatchedWatch {
    /// The next non-empty group; `None` when the hub is gone.
    async fn next_group(&mut self) -> Option<WatchGroup> {
        loop {
            let ending = tokio::select! {
                batch = self.batches.recv() => match batch {
                    Ok(batch) => match &*batch {
                        crate::hub::Batch::Changes(changes) => {
                            if changes.iter().all(|record| self.filter.matches(record)) {
                                return Some(WatchGroup::Batch(batch));
                            }
                            let group: Vec<WatchItem> = changes
                                .iter()
                                .filter(|record| self.filter.matches(record))
                                .map(|record| WatchItem::Request {
                                    initial: false,
                                    record: Arc::clone(record),
                                })
                                .collect();
                            if group.is_empty() {
                                continue;
                            }
                            return Some(WatchGroup::Items(group));
                        }
                        crate::hub::Batch::Lagged(missed) => WatchItem::Lagged { missed: *missed },
                    },
                    Err(RecvError::Lagged(missed)) => WatchItem::Lagged { missed },
                    Err(RecvError::Closed) => return None,
                },
                () = self.shutdown.cancelled() => WatchItem::ShuttingDown,
                () = &mut self.deadline => WatchItem::Expired,
            };
            self.ended = true;
            return Some(WatchGroup::Items(vec![ending]));
        }
    }
}

/// Refuses an approval of request `id` when its policy has a `max_auth_age` and the
/// reviewer's sign-in at the identity provider (`auth_time`; `None` for a token) is older.
pub async fn check_auth_age(
    engine: &Engine,
    max_auth_age: &std::collections::BTreeMap<String, u64>,
    id: uuid::Uuid,
    verdict: gatekeep_proto::model::Verdict,
    auth_time: Option<time::OffsetDateTime>,
) -> Result<(), Error> {
    if verdict != gatekeep_proto::model::Verdict::Allow || max_auth_age.is_empty() {
        return Ok(());
    }
    let (record, _) = engine.get(id).await?;
    let Some(&max_age) = max_auth_age.get(&record.request.policy) else {
        return Ok(());
    };
    let fresh = auth_time.is_some_and(|at| {
        let age = (time::OffsetDateTime::now_utc() - at).whole_seconds();
        age <= i64::try_from(max_age).unwrap_or(i64::MAX)
    });
    if fresh {
        Ok(())
    } else {
        Err(Error::ReauthRequired {
            policy: record.request.policy,
            max_age,
        })
    }
}

/// Grants, by host and policy (both optional), active ones unless `include_inactive`.
pub async fn list_grants(
    engine: &Engine,
    host: &str,
    policy: &str,
    include_inactive: bool,
) -> Result<Vec<Grant>, Error> {
    Ok(engine
        .store
        .list_grants(
            GrantQuery {
                host: opt_name("host", host)?,
                policy: opt_name("policy", policy)?,
                include_inactive,
            },
            time::OffsetDateTime::now_utc(),
        )
        .await?)
}

/// What `status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub version: &'static str,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: time::OffsetDateTime,
    pub pending: u64,
    pub connected_agents: Vec<String>,
    pub audit_records: u64,
    pub audit_head: String,
    pub reviewer: String,
    pub groups: Vec<String>,
}

/// The service's status, as `reviewer` sees it.
pub async fn status(engine: &Engine, reviewer: Reviewer) -> Result<StatusReport, Error> {
    let pending = engine.store.count_pending().await?;
    let audit_records = engine.audit_head().await?;
    let head = engine
        .audit_log
        .head()
        .await
        .map_err(|source| Error::Audit { source })?
        .map(|head| head.hash)
        .unwrap_or_default();
    Ok(StatusReport {
        version: env!("CARGO_PKG_VERSION"),
        started_at: engine.started_at,
        pending,
        connected_agents: engine.hub.connected(),
        audit_records,
        audit_head: head,
        reviewer: reviewer.name,
        groups: reviewer.groups,
    })
}

/// The outcome of verifying the service's audit log.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub records: u64,
    pub head_seq: u64,
    pub head_hash: String,
    pub guards_intact: bool,
}

fn audit_error(source: gatekeep_audit::AuditError) -> Error {
    match source {
        gatekeep_audit::AuditError::Tampered { .. } => Error::AuditTampered { source },
        source => Error::Audit { source },
    }
}

/// Verifies the service's audit hash chain; a broken chain is [`Error::AuditTampered`].
pub async fn verify_audit(engine: &Engine) -> Result<VerifyReport, Error> {
    engine.audit_head().await?;
    let report = engine.audit_log.verify().await.map_err(audit_error)?;
    let head = report.head.unwrap_or(gatekeep_audit::ChainHead {
        seq: 0,
        hash: String::new(),
    });
    Ok(VerifyReport {
        records: report.records,
        head_seq: head.seq,
        head_hash: head.hash,
        guards_intact: report.guards_intact.unwrap_or(false),
    })
}

/// A `from_seq` past any sequence number a log can hold (2^63 - 1) is refused up front,
/// not misread as a damaged record in the middle of the stream (found by the `http_api`
/// fuzz target).
fn check_from_seq(from_seq: u64) -> Result<(), Error> {
    i64::try_from(from_seq)
        .map(drop)
        .map_err(|_| Error::BadArgument {
            message: format!(
                "from_seq {from_seq} is past the largest sequence number a log holds \
                 (9223372036854775807)"
            ),
        })
}

/// Exports the service's audit log as JSON Lines from `from_seq` (0: the start), in chunks
/// of whole lines; an error ends the stream.
pub async fn export_audit(
    engine: &Engine,
    from_seq: u64,
) -> Result<mpsc::Receiver<Result<Vec<u8>, Error>>, Error> {
    check_from_seq(from_seq)?;
    engine.audit_head().await?;
    let (sender, receiver) = mpsc::channel(8);
    let path = match &engine.audit_log {
        AuditLog::Sqlite(path) => path.clone(),
        AuditLog::Postgres(store) => {
            tokio::spawn(export_postgres((**store).clone(), from_seq, sender));
            return Ok(receiver);
        }
    };
    tokio::task::spawn_blocking(move || {
        let mut writer = ChunkWriter {
            sender: sender.clone(),
            buffer: Vec::with_capacity(EXPORT_CHUNK),
        };
        let filter = gatekeep_audit::ExportFilter {
            from_seq: (from_seq > 0).then_some(from_seq),
            kind: None,
        };
        let result = gatekeep_audit::export(&path, &mut writer, &filter).and_then(|_| {
            writer
                .finish()
                .map_err(|source| gatekeep_audit::AuditError::Export { source })
        });
        if let Err(error) = result {
            drop(sender.blocking_send(Err(audit_error(error))));
        }
    });
    Ok(receiver)
}

/// Whose shipped records an export includes besides (or instead of) the service's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRecords {
    /// The service's own chain only.
    None,
    /// The service's chain, then every host's anchored records, host by host.
    All,
    /// Only this host's anchored records (from `from_seq`): one chain, verifiable on its own.
    One(String),
}

/// Host records read per store call of an export.
const HOST_EXPORT_PAGE: usize = 2_000;

/// Like [`export_audit`], with the hosts' anchored records (see [`HostRecords`]): every
/// action on every host in one place. Each host line is a record line of the host's chain
/// with `"anchored_host"` first: the host named by the certificate it was shipped with.
pub async fn export_audit_with_hosts(
    engine: &Engine,
    from_seq: u64,
    hosts: HostRecords,
) -> Result<mpsc::Receiver<Result<Vec<u8>, Error>>, Error> {
    check_from_seq(from_seq)?;
    let (own, hosts) = match hosts {
        HostRecords::None => return export_audit(engine, from_seq).await,
        HostRecords::All => (Some(export_audit(engine, from_seq).await?), None),
        HostRecords::One(host) => (None, Some(convert::name("host", &host)?)),
    };
    let store = Arc::clone(&engine.store);
    let (sender, receiver) = mpsc::channel(8);
    tokio::spawn(async move {
        if let Some(mut own) = own {
            while let Some(chunk) = own.recv().await {
                let failed = chunk.is_err();
                if sender.send(chunk).await.is_err() || failed {
                    return;
                }
            }
        }
        let names = match hosts {
            Some(host) => vec![(host, from_seq.max(1))],
            None => match store.host_audit_heads(None).await {
                Ok(heads) => heads.into_iter().map(|head| (head.host, 1)).collect(),
                Err(error) => {
                    drop(sender.send(Err(error.into())).await);
                    return;
                }
            },
        };
        for (host, from) in names {
            if let Err(error) = export_host(&*store, &host, from, &sender).await {
                drop(sender.send(Err(error)).await);
                return;
            }
        }
    });
    Ok(receiver)
}

/// Sends `host`'s anchored records from `from` on as export lines, a page per chunk.
async fn export_host(
    store: &dyn crate::store::Store,
    host: &str,
    mut from: u64,
    sender: &mpsc::Sender<Result<Vec<u8>, Error>>,
) -> Result<(), Error> {
    let prefix = format!(
        "{{\"anchored_host\":{},",
        serde_json::to_string(host).map_err(|source| Error::Store {
            source: source.into(),
        })?
    );
    loop {
        let page = store
            .host_audit_records(host.to_owned(), from, HOST_EXPORT_PAGE)
            .await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        from = last.seq + 1;
        let mut chunk = Vec::with_capacity(page.len() * 512);
        for record in &page {
            let mut line = Vec::with_capacity(512);
            gatekeep_audit::export_line(
                &mut line,
                &crate::host_audit::fields(record),
                &record.hash,
            )
            .map_err(audit_error)?;
            // `{"seq":...}` becomes `{"anchored_host":"H","seq":...}`.
            chunk.extend_from_slice(prefix.as_bytes());
            chunk.extend_from_slice(line.get(1..).unwrap_or_default());
        }
        if sender.send(Ok(chunk)).await.is_err() {
            return Ok(());
        }
        if page.len() < HOST_EXPORT_PAGE {
            return Ok(());
        }
    }
}

/// What the service anchored of one host's log, or of every host's.
#[derive(Debug, Clone, Serialize)]
pub struct HostAuditReport {
    pub hosts: Vec<gatekeep_proto::host_audit::HostHead>,
    pub divergences: Vec<gatekeep_proto::host_audit::Divergence>,
    /// With a host and a limit: the anchored hashes from `from_seq` on.
    pub hashes: Vec<(u64, String)>,
}

/// Most anchored hashes one [`host_audit`] call returns.
pub const MAX_HOST_HASHES: u32 = 10_000;

/// The anchored heads and divergences of `host` (every host when empty); with a host and a
/// `limit`, also its anchored hashes from `from_seq` on (a client compares a local log).
pub async fn host_audit(
    engine: &Engine,
    host: &str,
    from_seq: u64,
    limit: u32,
) -> Result<HostAuditReport, Error> {
    let host = opt_name("host", host)?;
    if limit > MAX_HOST_HASHES {
        return Err(Error::BadArgument {
            message: format!("limit {limit} is more than {MAX_HOST_HASHES}"),
        });
    }
    let hosts = engine.store.host_audit_heads(host.clone()).await?;
    let divergences = engine.store.host_audit_divergences(host.clone()).await?;
    let hashes = match host {
        Some(host) if limit > 0 => engine
            .store
            .host_audit_records(host, from_seq.max(1), limit as usize)
            .await?
            .into_iter()
            .map(|record| (record.seq, record.hash))
            .collect(),
        _ => Vec::new(),
    };
    Ok(HostAuditReport {
        hosts,
        divergences,
        hashes,
    })
}

/// [`export_audit`] of a chain in `PostgreSQL`: a page of lines per chunk.
async fn export_postgres(
    store: PostgresStore,
    from_seq: u64,
    sender: mpsc::Sender<Result<Vec<u8>, Error>>,
) {
    let mut from = from_seq.max(1);
    loop {
        match postgres::audit::export_page(&store, from, None).await {
            Ok((lines, next, _)) => {
                if !lines.is_empty() && sender.send(Ok(lines)).await.is_err() {
                    return;
                }
                match next {
                    Some(next) => from = next,
                    None => return,
                }
            }
            Err(error) => {
                drop(sender.send(Err(audit_error(error))).await);
                return;
            }
        }
    }
}

/// Sends an export in chunks of whole lines.
struct ChunkWriter {
    sender: mpsc::Sender<Result<Vec<u8>, Error>>,
    buffer: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self, data: Vec<u8>) -> std::io::Result<()> {
        self.sender.blocking_send(Ok(data)).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
        })
    }

    fn finish(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.buffer);
        self.send(data)
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= EXPORT_CHUNK {
            // Cut after the last complete line.
            if let Some(end) = self.buffer.iter().rposition(|b| *b == b'\n') {
                let rest = self.buffer.split_off(end + 1);
                let data = std::mem::replace(&mut self.buffer, rest);
                self.send(data)?;
            }
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
