//! The batching front: callers queue records, one thread commits them in batches.

use std::{
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use gatekeep_util::retry::{Backoff, Delays};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    error::{AuditError, error_chain},
    health::{Failure, FailureCause, WriterHealth},
    record::{AuditRecord, EncodedRecord, Prepared, RecordKind},
    store::{AuditStore, ChainStore},
};

/// Why [`AuditWriter::try_submit`] did not take a record; the
/// record is handed back where it can be retried.
#[derive(Debug, thiserror::Error)]
pub enum TrySubmitError {
    /// The queue is full: the writer is behind (or its disk is failing). Retry, or submit from a
    /// blocking context.
    #[error("the audit queue is full")]
    Full { record: Box<AuditRecord> },
    /// The writer is shut down.
    #[error("the audit writer is shut down")]
    Closed { record: Box<AuditRecord> },
    /// The record cannot be stored (see [`AuditRecord::validate`]).
    #[error("the audit record is invalid")]
    Invalid {
        #[source]
        source: AuditError,
    },
}

/// Tuning of an [`AuditWriter`]. The defaults suit the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterConfig {
    /// Records the queue holds before `try_submit` reports back-pressure and `submit` waits.
    pub queue_capacity: usize,
    /// Most records committed in one transaction.
    pub max_batch: usize,
    /// First wait before retrying a failed commit; doubles up to [`max_retry_delay`](Self::max_retry_delay).
    pub retry_delay: Duration,
    /// Longest wait between commit retries.
    pub max_retry_delay: Duration,
    /// Commit attempts after shutdown was asked for before the writer gives up on the rest.
    pub shutdown_attempts: u32,
    /// Most records kept in memory while commits fail (disk full, I/O error, read-only).
    /// Records beyond it are not kept, only counted, and the count is written in the
    /// `audit_interrupted` record that comes first once commits succeed again.
    pub held_capacity: usize,
    /// Most bytes of payload kept in memory while commits fail, whichever of the two bounds
    /// comes first (a record's payload may hold a 32 KiB command line).
    pub held_bytes: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            // About 16 MB of typical records: several seconds of a burst at full rate.
            queue_capacity: 16_384,
            // Large enough to amortise the fsync, small enough to keep a commit short.
            max_batch: 4_096,
            retry_delay: Duration::from_millis(50),
            max_retry_delay: Duration::from_secs(5),
            // With the delays above, about 6 s before giving up on a dead disk at shutdown.
            shutdown_attempts: 8,
            // About as much as the queue again: a few MB to a few tens of MB.
            held_capacity: 16_384,
            held_bytes: 64 << 20,
        }
    }
}

enum Command {
    Record(Prepared),
    Flush(oneshot::Sender<Result<u64, AuditError>>),
}

/// Writes records off the caller's path: a dedicated thread owns the [`AuditStore`] and commits
/// whatever has queued up since its last commit (up to [`WriterConfig::max_batch`]) in one
/// transaction. There is no artificial delay: while one batch's fsync runs the next one
/// gathers, so batches grow with load and a lone record is committed at once.
///
/// Share it behind an `Arc`. From async code use [`submit_async`](Self::submit_async) or
/// [`try_submit`](Self::try_submit), never [`submit`](Self::submit) (which blocks and panics
/// inside a runtime). A record whose submit has returned `Ok` is committed before
/// [`shutdown`](Self::shutdown) returns, or shutdown reports it lost. A failed commit is logged
/// and retried with back-off, keeping the records; meanwhile the queue fills and submitters feel
/// back-pressure. Dropping the writer shuts it down.
#[derive(Debug)]
pub struct AuditWriter {
    /// `None` once shut down. Submitters clone the sender out and release the lock before
    /// sending, so shutdown never waits on a full queue; the thread drains until every clone
    /// is gone, which is what makes every accepted record reach the disk.
    sender: RwLock<Option<mpsc::Sender<Command>>>,
    thread: Mutex<Option<JoinHandle<Result<u64, AuditError>>>>,
    closing: Arc<AtomicBool>,
    health: watch::Receiver<WriterHealth>,
}

impl AuditWriter {
    /// Opens the log at `path` and starts the writer thread.
    pub fn open(
        path: impl AsRef<std::path::Path>,
        config: WriterConfig,
    ) -> Result<Self, AuditError> {
        Self::spawn(AuditStore::open(path)?, config)
    }

    /// Starts the writer thread on `store` (the `SQLite` [`AuditStore`], or another
    /// [`ChainStore`]).
    pub fn spawn(store: impl ChainStore, config: WriterConfig) -> Result<Self, AuditError> {
        let (sender, receiver) = mpsc::channel(config.queue_capacity.max(1));
        let closing = Arc::new(AtomicBool::new(false));
        let thread_closing = Arc::clone(&closing);
        let (health_tx, health) = watch::channel(WriterHealth::default());
        let thread = thread::Builder::new()
            .name("audit-writer".to_owned())
            .spawn(move || run(store, receiver, config, &thread_closing, &health_tx))
            .map_err(|source| AuditError::SpawnWriter { source })?;
        Ok(Self {
            sender: RwLock::new(Some(sender)),
            thread: Mutex::new(Some(thread)),
            closing,
            health,
        })
    }

    /// Whether commits succeed, and while they fail, why and what is held: changes as the
    /// writer finds out (a failed commit, a failed retry, the first commit that succeeds).
    #[must_use]
    pub fn health(&self) -> watch::Receiver<WriterHealth> {
        self.health.clone()
    }

    /// Records (and flushes) queued and not yet taken by the writer thread: a backlog figure
    /// for metrics. The batch the thread is committing at that moment is not counted.
    #[must_use]
    pub fn queued(&self) -> usize {
        self.sender()
            .map_or(0, |sender| sender.max_capacity() - sender.capacity())
    }

    fn sender(&self) -> Option<mpsc::Sender<Command>> {
        self.sender
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Queues `record`, waiting while the queue is full. For threads outside an async runtime
    /// (in a runtime it panics: use [`submit_async`](Self::submit_async)).
    pub fn submit(&self, record: AuditRecord) -> Result<(), AuditError> {
        let sender = self.sender().ok_or(AuditError::WriterClosed)?;
        sender
            .blocking_send(Command::Record(record.into_prepared()?))
            .map_err(|_| AuditError::WriterClosed)
    }

    /// Queues `record`, waiting asynchronously while the queue is full.
    pub async fn submit_async(&self, record: AuditRecord) -> Result<(), AuditError> {
        self.submit_encoded_async(record.into_encoded()?).await
    }

    /// Queues `record` (its payload already encoded), waiting asynchronously while the queue
    /// is full.
    pub async fn submit_encoded_async(&self, record: EncodedRecord) -> Result<(), AuditError> {
        let sender = self.sender().ok_or(AuditError::WriterClosed)?;
        sender
            .send(Command::Record(record.into_prepared()?))
            .await
            .map_err(|_| AuditError::WriterClosed)
    }

    /// Queues `record` if there is room, without ever waiting; hands it back when the queue is
    /// full (the writer is behind) or the writer is shut down.
    pub fn try_submit(&self, record: AuditRecord) -> Result<(), TrySubmitError> {
        if let Err(source) = record.validate() {
            return Err(TrySubmitError::Invalid { source });
        }
        let Some(sender) = self.sender() else {
            return Err(TrySubmitError::Closed {
                record: Box::new(record),
            });
        };
        // Room first, so that a refused record goes back as it came.
        let permit = match sender.try_reserve() {
            Ok(permit) => permit,
            Err(mpsc::error::TrySendError::Full(())) => {
                return Err(TrySubmitError::Full {
                    record: Box::new(record),
                });
            }
            Err(mpsc::error::TrySendError::Closed(())) => {
                return Err(TrySubmitError::Closed {
                    record: Box::new(record),
                });
            }
        };
        let prepared = record
            .into_prepared()
            .map_err(|source| TrySubmitError::Invalid { source })?;
        permit.send(Command::Record(prepared));
        Ok(())
    }

    /// Waits until every record submitted before this call is durable; returns the seq of the
    /// last durable record (0 while the log is empty). Fails, without losing the records, when
    /// the commit in front of it failed. Outside an async runtime only (see
    /// [`flush_async`](Self::flush_async)).
    pub fn flush(&self) -> Result<u64, AuditError> {
        let sender = self.sender().ok_or(AuditError::WriterClosed)?;
        let (ack, done) = oneshot::channel();
        sender
            .blocking_send(Command::Flush(ack))
            .map_err(|_| AuditError::WriterClosed)?;
        done.blocking_recv().map_err(|_| AuditError::WriterClosed)?
    }

    /// [`flush`](Self::flush) for async code.
    pub async fn flush_async(&self) -> Result<u64, AuditError> {
        let sender = self.sender().ok_or(AuditError::WriterClosed)?;
        let (ack, done) = oneshot::channel();
        sender
            .send(Command::Flush(ack))
            .await
            .map_err(|_| AuditError::WriterClosed)?;
        done.await.map_err(|_| AuditError::WriterClosed)?
    }

    /// Stops taking records, commits everything accepted so far and joins the thread; returns
    /// the seq of the last durable record. Blocks (from async code, call it in
    /// `spawn_blocking`). A second call returns [`AuditError::WriterClosed`].
    pub fn shutdown(&self) -> Result<u64, AuditError> {
        self.closing.store(true, Ordering::Release);
        drop(
            self.sender
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let thread = thread.ok_or(AuditError::WriterClosed)?;
        thread.join().map_err(|_| AuditError::WriterPanicked)?
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        let running = self
            .thread
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        if running && let Err(err) = self.shutdown() {
            tracing::error!(error = %error_chain(&err), "audit writer shut down with an error");
        }
    }
}

/// The writer thread: commit what has queued, answer flushes in order, until every sender is
/// gone and the queue is empty. While commits fail it keeps taking records into the bounded
/// hold (see [`Failing`]) and retries with back-off.
fn run(
    mut store: impl ChainStore,
    mut receiver: mpsc::Receiver<Command>,
    config: WriterConfig,
    closing: &AtomicBool,
    health: &watch::Sender<WriterHealth>,
) -> Result<u64, AuditError> {
    let max_batch = config.max_batch.max(1);
    let mut commands = Vec::with_capacity(max_batch);
    let mut pending = Vec::with_capacity(max_batch);
    let mut flushes = Vec::new();
    loop {
        if receiver.blocking_recv_many(&mut commands, max_batch) == 0 {
            return Ok(store.head_seq());
        }
        for command in commands.drain(..) {
            match command {
                Command::Record(record) => pending.push(record),
                Command::Flush(ack) => flushes.push(ack),
            }
        }
        match store.append(&pending) {
            Ok(seq) => {
                pending.clear();
                for ack in flushes.drain(..) {
                    // A flusher that stopped waiting is no concern of ours.
                    let _ = ack.send(Ok(seq));
                }
            }
            Err(err) => {
                let failing = Failing::new(&store, &config, err, std::mem::take(&mut pending));
                // Published first: whoever sees a flush fail sees why.
                failing.publish(health);
                failing.refuse_flushes(&mut flushes);
                failing.run(&mut store, &mut receiver, closing, health)?;
            }
        }
    }
}

/// How often a failing writer looks at its queue between commit attempts: a flush waits at
/// most this long for its (failed) answer.
const FAILING_POLL: Duration = Duration::from_millis(20);

/// The writer while commits fail: records go into a bounded hold (what does not fit is
/// counted as lost), flushes are answered with [`AuditError::Unavailable`] at once, and
/// commits are retried with [`Backoff`] delays. The first successful commit writes one
/// [`RecordKind::AuditInterrupted`] record, then the held records in their order, in one
/// transaction.
struct Failing {
    held: Vec<Prepared>,
    capacity: usize,
    /// Payload bytes held, and their bound.
    bytes: usize,
    max_bytes: usize,
    failure: Failure,
    error: Arc<AuditError>,
    first_lost: Option<OffsetDateTime>,
    last_lost: Option<OffsetDateTime>,
    delays: Delays,
    next_attempt: Instant,
    shutdown_attempts: u32,
    closing_attempts: u32,
}

impl Failing {
    fn new(
        store: &impl ChainStore,
        config: &WriterConfig,
        err: AuditError,
        held: Vec<Prepared>,
    ) -> Self {
        let cause = FailureCause::of(&err);
        let mut delays = Backoff {
            initial: config.retry_delay,
            max: config.max_retry_delay,
            jitter: false,
        }
        .delays();
        let first = delays.next().unwrap_or(config.retry_delay);
        let bytes = held.iter().map(|r| r.payload.len()).sum();
        let failing = Self {
            capacity: config.held_capacity.max(held.len()),
            bytes,
            max_bytes: config.held_bytes.max(bytes),
            failure: Failure {
                path: store.location().to_owned(),
                cause,
                error: error_chain(&err),
                fix: cause.fix(store.location()),
                since: OffsetDateTime::now_utc(),
                held: held.len(),
                held_capacity: config.held_capacity,
                lost: 0,
                attempts: 1,
            },
            held,
            error: Arc::new(err),
            first_lost: None,
            last_lost: None,
            delays,
            next_attempt: Instant::now() + first,
            shutdown_attempts: config.shutdown_attempts,
            closing_attempts: 0,
        };
        failing.log();
        failing
    }

    fn log(&self) {
        tracing::error!(
            error = %self.failure.error,
            cause = self.failure.cause.as_str(),
            held = self.failure.held,
            lost = self.failure.lost,
            attempts = self.failure.attempts,
            fix = %self.failure.fix,
            "cannot commit audit records; holding them in memory and retrying"
        );
    }

    fn publish(&self, health: &watch::Sender<WriterHealth>) {
        health.send_modify(|health| health.failing = Some(self.failure.clone()));
    }

    fn refuse_flushes(&self, flushes: &mut Vec<oneshot::Sender<Result<u64, AuditError>>>) {
        for ack in flushes.drain(..) {
            let _ = ack.send(Err(self.unavailable()));
        }
    }

    fn unavailable(&self) -> AuditError {
        AuditError::Unavailable {
            held: self.held.len(),
            source: Arc::clone(&self.error),
        }
    }

    fn hold(&mut self, record: Prepared) {
        if self.held.len() < self.capacity && self.bytes + record.payload.len() <= self.max_bytes {
            self.bytes += record.payload.len();
            self.held.push(record);
        } else {
            let now = OffsetDateTime::now_utc();
            self.first_lost.get_or_insert(now);
            self.last_lost = Some(now);
            self.failure.lost += 1;
        }
        self.failure.held = self.held.len();
    }

    /// Takes what has queued; `false` once every sender is gone.
    fn take_queued(&mut self, receiver: &mut mpsc::Receiver<Command>) -> bool {
        loop {
            match receiver.try_recv() {
                Ok(Command::Record(record)) => self.hold(record),
                Ok(Command::Flush(ack)) => {
                    let _ = ack.send(Err(self.unavailable()));
                }
                Err(mpsc::error::TryRecvError::Empty) => return true,
                Err(mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// The record written first once commits succeed again.
    fn interrupted_record(&self) -> Option<Prepared> {
        let host = self.held.first()?.host.clone();
        let at = |at: Option<OffsetDateTime>| at.and_then(|at| crate::timestamp::format(at).ok());
        let payload = serde_json::json!({
            "cause": self.failure.cause.as_str(),
            "error": self.failure.error,
            "since": crate::timestamp::format(self.failure.since).ok(),
            "attempts": self.failure.attempts,
            "held": self.held.len(),
            "held_capacity": self.failure.held_capacity,
            "records_lost": self.failure.lost,
            "first_lost_at": at(self.first_lost),
            "last_lost_at": at(self.last_lost),
        });
        AuditRecord::new(RecordKind::AuditInterrupted, host, payload)
            .with_actor("audit-writer")
            .into_prepared()
            .ok()
    }

    /// Retries until a commit succeeds (then returns to normal writing), or until the
    /// attempts after shutdown run out.
    fn run(
        mut self,
        store: &mut impl ChainStore,
        receiver: &mut mpsc::Receiver<Command>,
        closing: &AtomicBool,
        health: &watch::Sender<WriterHealth>,
    ) -> Result<(), AuditError> {
        let mut open = true;
        loop {
            open = open && self.take_queued(receiver);
            let now = Instant::now();
            if now < self.next_attempt {
                thread::sleep(FAILING_POLL.min(self.next_attempt - now));
                continue;
            }
            let marker = self.interrupted_record();
            let has_marker = marker.is_some();
            if let Some(marker) = marker {
                self.held.insert(0, marker);
            }
            match store.append(&self.held) {
                Ok(_) => {
                    let written = self.held.len() - usize::from(has_marker);
                    tracing::warn!(
                        held = written,
                        lost = self.failure.lost,
                        cause = self.failure.cause.as_str(),
                        since = %self.failure.since,
                        "audit log writable again; wrote the held records in order"
                    );
                    health.send_modify(|health| {
                        health.failing = None;
                        health.recovered += 1;
                    });
                    return Ok(());
                }
                Err(err) => {
                    if has_marker {
                        self.held.remove(0);
                    }
                    self.failure.attempts += 1;
                    self.failure.error = error_chain(&err);
                    self.failure.cause = FailureCause::of(&err);
                    self.failure.fix = self.failure.cause.fix(store.location());
                    self.error = Arc::new(err);
                    self.publish(health);
                    tracing::debug!(
                        error = %self.failure.error,
                        attempts = self.failure.attempts,
                        held = self.held.len(),
                        "audit commit retry failed"
                    );
                    if !open || closing.load(Ordering::Acquire) {
                        self.closing_attempts += 1;
                        if self.closing_attempts >= self.shutdown_attempts {
                            self.take_queued(receiver);
                            return Err(AuditError::Unwritten {
                                lost: usize::try_from(self.failure.lost)
                                    .unwrap_or(usize::MAX)
                                    .saturating_add(self.held.len()),
                                source: self.error,
                            });
                        }
                    }
                    let delay = self.delays.next().unwrap_or(FAILING_POLL);
                    self.next_attempt = Instant::now() + delay;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rusqlite::Connection;
    use time::macros::datetime;

    use super::*;
    use crate::{ExportFilter, StoredRecord, export, store::tests::sample, verify};

    #[test]
    fn a_logged_error_names_its_causes() {
        let err = AuditError::Sqlite {
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                None,
            ),
        };
        let text = error_chain(&err);
        assert!(text.starts_with("audit log database error: "), "{text}");
        assert!(text.contains("full"), "{text}");
    }

    fn stored(path: &std::path::Path) -> Vec<StoredRecord> {
        let mut out = Vec::new();
        export(path, &mut out, &ExportFilter::default()).unwrap();
        std::str::from_utf8(&out)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    #[test]
    fn records_from_many_threads_all_survive_shutdown_in_submission_order() {
        const THREADS: u64 = 4;
        const EACH: u64 = 2_500;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let writer = AuditWriter::open(
            &path,
            WriterConfig {
                // Small enough that the submitters meet back-pressure.
                queue_capacity: 256,
                max_batch: 512,
                ..WriterConfig::default()
            },
        )
        .unwrap();
        thread::scope(|scope| {
            for t in 0..THREADS {
                let writer = &writer;
                scope.spawn(move || {
                    for i in 0..EACH {
                        writer
                            .submit(sample(i).with_request_id(format!("{t}-{i}")))
                            .unwrap();
                    }
                });
            }
        });
        assert_eq!(writer.shutdown().unwrap(), THREADS * EACH);

        let report = verify(&path).unwrap();
        assert_eq!(report.records, THREADS * EACH);
        let records = stored(&path);
        let mut seen: HashMap<u64, Vec<u64>> = HashMap::new();
        for record in &records {
            let id = record.request_id.as_deref().unwrap();
            let (t, i) = id.split_once('-').unwrap();
            seen.entry(t.parse().unwrap())
                .or_default()
                .push(i.parse().unwrap());
        }
        for t in 0..THREADS {
            // Every record of each thread, once, in the order it submitted them.
            assert_eq!(seen[&t], (0..EACH).collect::<Vec<_>>(), "thread {t}");
        }
    }

    #[test]
    fn flush_returns_once_everything_before_it_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let writer = AuditWriter::open(&path, WriterConfig::default()).unwrap();
        assert_eq!(writer.flush().unwrap(), 0);
        for i in 0..100 {
            writer.submit(sample(i)).unwrap();
        }
        assert_eq!(writer.flush().unwrap(), 100);
        // Another connection sees them while the writer still runs.
        assert_eq!(verify(&path).unwrap().records, 100);
        for i in 100..150 {
            writer.submit(sample(i)).unwrap();
        }
        assert_eq!(writer.flush().unwrap(), 150);
        assert_eq!(stored(&path).len(), 150);
        assert_eq!(writer.shutdown().unwrap(), 150);
    }

    #[test]
    fn try_submit_hands_the_record_back_when_the_queue_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let writer = AuditWriter::open(
            &path,
            WriterConfig {
                queue_capacity: 1,
                ..WriterConfig::default()
            },
        )
        .unwrap();
        // Another connection holds the write lock, so the writer cannot commit.
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();

        // At most one record in the writer's hands and one in the queue: the third must bounce.
        let mut accepted = 0;
        let bounced = (0..3)
            .find_map(|i| match writer.try_submit(sample(i)) {
                Ok(()) => {
                    accepted += 1;
                    None
                }
                Err(TrySubmitError::Full { record }) => Some((i, record)),
                Err(other) => panic!("unexpected {other:?}"),
            })
            .expect("the queue never filled");
        assert_eq!(*bounced.1, sample(bounced.0));

        blocker.execute_batch("ROLLBACK").unwrap();
        assert_eq!(writer.flush().unwrap(), accepted);
        writer.submit(*bounced.1).unwrap();
        assert_eq!(writer.shutdown().unwrap(), accepted + 1);
        assert_eq!(verify(&path).unwrap().records, accepted + 1);
    }

    /// A writer whose store's "disk" the test fills and frees, retrying quickly.
    fn failing_rig(
        path: &std::path::Path,
        held_capacity: usize,
    ) -> (AuditWriter, Arc<std::sync::atomic::AtomicU64>) {
        failing_rig_bytes(path, held_capacity, WriterConfig::default().held_bytes)
    }

    fn failing_rig_bytes(
        path: &std::path::Path,
        held_capacity: usize,
        held_bytes: usize,
    ) -> (AuditWriter, Arc<std::sync::atomic::AtomicU64>) {
        let store = AuditStore::open(path).unwrap();
        let limit = store.page_limit();
        let writer = AuditWriter::spawn(
            store,
            WriterConfig {
                retry_delay: Duration::from_millis(5),
                max_retry_delay: Duration::from_millis(20),
                held_capacity,
                held_bytes,
                ..WriterConfig::default()
            },
        )
        .unwrap();
        (writer, limit)
    }

    /// A record too large for the free room of the last page: it needs new pages.
    fn large(i: u64) -> AuditRecord {
        sample(i).with_request_id(format!("large-{i}").repeat(2_000))
    }

    fn wait_writable(writer: &AuditWriter) -> WriterHealth {
        let health = writer.health();
        gatekeep_util::retry::poll_until_blocking(
            std::time::Instant::now() + Duration::from_mins(1),
            Duration::from_millis(5),
            || {
                health
                    .borrow()
                    .is_writable()
                    .then(|| health.borrow().clone())
            },
        )
        .expect("writable again within a minute")
    }

    #[test]
    fn a_full_disk_holds_records_refuses_flushes_and_writes_them_in_order_once_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let (writer, limit) = failing_rig(&path, 1_000);
        for i in 0..5 {
            writer.submit(sample(i)).unwrap();
        }
        assert_eq!(writer.flush().unwrap(), 5);
        assert!(writer.health().borrow().is_writable());

        // The disk is full: no page can be added.
        limit.store(1, Ordering::Release);
        writer.submit(large(5)).unwrap();
        let Err(AuditError::Unavailable { held, source }) = writer.flush() else {
            panic!("a flush behind a failed commit must fail");
        };
        assert_eq!(held, 1);
        assert!(error_chain(source.as_ref()).contains("full"), "{source:?}");
        let failing = writer.health().borrow().failing.clone().expect("failing");
        assert_eq!(failing.cause, FailureCause::DiskFull);
        assert!(
            failing.fix.contains("free space on the filesystem holding"),
            "{}",
            failing.fix
        );
        assert_eq!(failing.held, 1);
        // Submitters are not held up; flushes keep failing at once.
        for i in 6..9 {
            writer.submit(sample(i)).unwrap();
        }
        assert!(matches!(
            writer.flush(),
            Err(AuditError::Unavailable { held: 4, .. })
        ));
        assert_eq!(verify(&path).unwrap().records, 5, "nothing new is durable");

        // Room again: the retry writes the interruption, then the held records in order.
        limit.store(u64::from(u32::MAX), Ordering::Release);
        let health = wait_writable(&writer);
        assert_eq!(health.recovered, 1);
        assert_eq!(writer.flush().unwrap(), 10);
        let records = stored(&path);
        let kinds: Vec<RecordKind> = records.iter().map(|r| r.kind).collect();
        assert_eq!(kinds[5], RecordKind::AuditInterrupted);
        assert_eq!(records[5].payload["cause"], "disk_full");
        assert_eq!(records[5].payload["held"], 4);
        assert_eq!(records[5].payload["records_lost"], 0);
        assert_eq!(records[6].request_id, large(5).request_id);
        for (record, i) in records[7..].iter().zip(6..) {
            assert_eq!(
                record.payload,
                sample(i).payload,
                "held record {i} in order"
            );
        }
        assert_eq!(writer.shutdown().unwrap(), 10);
        assert_eq!(verify(&path).unwrap().records, 10, "the chain verifies");
    }

    #[test]
    fn the_hold_is_bounded_and_what_overflowed_is_counted_first_once_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let (writer, limit) = failing_rig(&path, 3);
        writer.submit(sample(0)).unwrap();
        writer.flush().unwrap();
        limit.store(1, Ordering::Release);
        writer.submit(large(1)).unwrap();
        assert!(writer.flush().is_err());
        for i in 2..10 {
            writer.submit(sample(i)).unwrap();
        }
        // Every submit is taken (the hold never blocks submitters): 3 held, 6 counted.
        let failing = gatekeep_util::retry::poll_until_blocking(
            std::time::Instant::now() + Duration::from_mins(1),
            Duration::from_millis(5),
            || {
                let _ = writer.flush();
                writer
                    .health()
                    .borrow()
                    .failing
                    .clone()
                    .filter(|f| f.lost == 6)
            },
        )
        .expect("the overflow is counted");
        assert_eq!((failing.held, failing.held_capacity), (3, 3));

        limit.store(u64::from(u32::MAX), Ordering::Release);
        wait_writable(&writer);
        assert_eq!(writer.shutdown().unwrap(), 5);
        let records = stored(&path);
        assert_eq!(records[1].kind, RecordKind::AuditInterrupted);
        assert_eq!(records[1].payload["records_lost"], 6);
        assert!(records[1].payload["first_lost_at"].is_string());
        // The oldest are kept: the large record and samples 2 and 3.
        assert_eq!(records[2].request_id, large(1).request_id);
        assert_eq!(records[3].payload, sample(2).payload);
        assert_eq!(records[4].payload, sample(3).payload);
        assert_eq!(verify(&path).unwrap().records, 5);
    }

    #[test]
    fn the_hold_is_bounded_in_bytes_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        // Room for the batch that failed, nothing more.
        let (writer, limit) = failing_rig_bytes(&path, 1_000, 1);
        writer.submit(sample(0)).unwrap();
        writer.flush().unwrap();
        limit.store(1, Ordering::Release);
        writer.submit(large(1)).unwrap();
        assert!(writer.flush().is_err());
        for i in 2..6 {
            writer.submit(sample(i)).unwrap();
        }
        let failing = gatekeep_util::retry::poll_until_blocking(
            std::time::Instant::now() + Duration::from_mins(1),
            Duration::from_millis(5),
            || {
                let _ = writer.flush();
                writer
                    .health()
                    .borrow()
                    .failing
                    .clone()
                    .filter(|f| f.lost == 4)
            },
        )
        .expect("the overflow is counted");
        assert_eq!(failing.held, 1);
        limit.store(u64::from(u32::MAX), Ordering::Release);
        wait_writable(&writer);
        assert_eq!(writer.shutdown().unwrap(), 3);
        let records = stored(&path);
        assert_eq!(records[1].payload["records_lost"], 4);
        assert_eq!(verify(&path).unwrap().records, 3);
    }

    #[test]
    fn a_disk_that_never_recovers_is_reported_lost_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let (writer, limit) = failing_rig(&path, 100);
        writer.submit(sample(0)).unwrap();
        writer.flush().unwrap();
        limit.store(1, Ordering::Release);
        writer.submit(large(1)).unwrap();
        writer.submit(sample(2)).unwrap();
        let Err(AuditError::Unwritten { lost, .. }) = writer.shutdown() else {
            panic!("shutdown must report what it could not write");
        };
        assert_eq!(lost, 2);
        assert_eq!(verify(&path).unwrap().records, 1);
    }

    #[test]
    fn nothing_is_taken_after_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let writer = AuditWriter::open(&path, WriterConfig::default()).unwrap();
        writer.submit(sample(0)).unwrap();
        assert_eq!(writer.shutdown().unwrap(), 1);

        assert!(matches!(
            writer.submit(sample(1)),
            Err(AuditError::WriterClosed)
        ));
        assert!(matches!(
            writer.try_submit(sample(2)),
            Err(TrySubmitError::Closed { record }) if *record == sample(2)
        ));
        assert!(matches!(writer.flush(), Err(AuditError::WriterClosed)));
        assert!(matches!(writer.shutdown(), Err(AuditError::WriterClosed)));
        assert_eq!(verify(&path).unwrap().records, 1);
    }

    #[test]
    fn dropping_the_writer_commits_what_it_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        {
            let writer = AuditWriter::open(&path, WriterConfig::default()).unwrap();
            for i in 0..50 {
                writer.submit(sample(i)).unwrap();
            }
        }
        assert_eq!(verify(&path).unwrap().records, 50);
        // And a new writer continues the chain.
        let writer = AuditWriter::open(&path, WriterConfig::default()).unwrap();
        writer.submit(sample(50)).unwrap();
        assert_eq!(writer.shutdown().unwrap(), 51);
        assert_eq!(verify(&path).unwrap().records, 51);
    }

    #[test]
    fn invalid_records_are_refused_at_submit() {
        let dir = tempfile::tempdir().unwrap();
        let writer =
            AuditWriter::open(dir.path().join("audit.db"), WriterConfig::default()).unwrap();
        let bad = sample(0).with_at(datetime!(-0001-06-01 0:00 UTC));
        assert!(matches!(
            writer.submit(bad.clone()),
            Err(AuditError::TimestampOutOfRange { .. })
        ));
        assert!(matches!(
            writer.try_submit(bad),
            Err(TrySubmitError::Invalid { .. })
        ));
        assert_eq!(writer.shutdown().unwrap(), 0);
    }

    #[test]
    fn async_callers_submit_and_flush_without_blocking_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let writer = Arc::new(
            AuditWriter::open(
                &path,
                WriterConfig {
                    queue_capacity: 8,
                    ..WriterConfig::default()
                },
            )
            .unwrap(),
        );
        // One runtime thread: a blocking send would deadlock the tasks behind it.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let flushed = runtime.block_on(async {
            let tasks: Vec<_> = (0..4)
                .map(|t| {
                    let writer = Arc::clone(&writer);
                    tokio::spawn(async move {
                        for i in 0..100 {
                            writer.submit_async(sample(t * 100 + i)).await.unwrap();
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
            writer.flush_async().await.unwrap()
        });
        assert_eq!(flushed, 400);
        assert_eq!(writer.shutdown().unwrap(), 400);
        assert_eq!(verify(&path).unwrap().records, 400);
    }
}
